//! Validation of one service: ports, endpoints, routes, and the
//! resilience settings (retries, circuit breaking, outlier detection,
//! health checks, rate limits). Pure, like the rest of validation.

use super::{Checker, Endpoint, Service, ServicePort, UNKNOWN};
use crate::config::FieldPath;

pub(super) fn check_service(
    check: &mut Checker<'_>,
    file: usize,
    at: &FieldPath,
    spec: crate::config::ServiceSpec,
    trust_domain: &str,
) -> (usize, FieldPath, Service) {
    check.dns_label(file, &at.clone().key("name"), &spec.name);
    check.dns_label(file, &at.clone().key("namespace"), &spec.namespace);
    let vip = check.ipv4(file, &at.clone().key("vip"), spec.vip);
    if vip.is_unspecified() || vip.is_loopback() || vip.is_broadcast() || vip.is_multicast() {
        check.fail(
            file,
            &at.clone().key("vip"),
            format!("{vip} cannot be a service address"),
        );
    }
    if spec.ports.is_empty() {
        check.fail(
            file,
            &at.clone().key("ports"),
            "a service needs at least one port",
        );
    }
    let mut ports = Vec::with_capacity(spec.ports.len());
    for (i, port) in spec.ports.iter().enumerate() {
        let field = at.clone().key("ports").index(i);
        if port.port == 0 {
            check.fail(file, &field.clone().key("port"), "must not be 0");
        }
        if port.target_port == Some(0) {
            check.fail(file, &field.clone().key("targetPort"), "must not be 0");
        }
        if ports.iter().any(|p: &ServicePort| p.port == port.port) {
            check.fail(
                file,
                &field.clone().key("port"),
                format!("port {} is listed twice", port.port),
            );
        }
        ports.push(ServicePort {
            protocol: port.protocol,
            port: port.port,
            target_port: port.target_port.unwrap_or(port.port),
        });
    }
    let mut endpoints: Vec<Endpoint> = Vec::with_capacity(spec.endpoints.len());
    for (i, endpoint) in spec.endpoints.into_iter().enumerate() {
        let field = at.clone().key("endpoints").index(i).key("address");
        let address = check.ipv4(file, &field, endpoint.address);
        if endpoints.iter().any(|e| e.address == address) {
            check.fail(file, &field, format!("endpoint {address} is listed twice"));
        }
        let identity = check.identity(
            file,
            &at.clone().key("endpoints").index(i).key("serviceAccount"),
            trust_domain,
            &spec.namespace,
            &endpoint.service_account,
        );
        let workload = check.intern(endpoint.workload.as_deref().unwrap_or(UNKNOWN));
        let labels = check.labels(&endpoint.labels);
        endpoints.push(Endpoint {
            address,
            node: endpoint.node.as_deref().map(|n| check.intern(n)),
            reported: check.endpoint_reported(&endpoint.labels, &labels, &workload),
            workload,
            identity,
            labels,
        });
    }
    let routes: Vec<crate::policy::routing::Route> = spec
        .routes
        .iter()
        .enumerate()
        .filter_map(|(i, route)| {
            check_route(check, file, &at.clone().key("routes").index(i), i, route)
        })
        .collect();
    let routes = if routes.is_empty() {
        crate::policy::routing::Route::default_routes()
    } else {
        routes.into()
    };
    let rate_limit = match &spec.rate_limit {
        None => (None, None),
        Some(limits) => {
            let field = at.clone().key("rateLimit");
            let service_limit = limits.rps.map(|rps| crate::policy::ratelimit::Limit {
                rps,
                burst: limits.burst,
            });
            for (name, limit) in [("rps", service_limit), ("perSource", limits.per_source)] {
                if let Some(limit) = limit {
                    if !(limit.rps > 0.0 && limit.rps.is_finite())
                        || limit.burst.is_some_and(|b| b.is_nan() || b < 1.0)
                    {
                        check.fail(
                            file,
                            &field.clone().key(name),
                            "rates must be positive and bursts at least 1",
                        );
                    }
                }
            }
            (service_limit, limits.per_source)
        }
    };
    let circuit_breaker = spec.circuit_breaker.unwrap_or_default();
    if [
        circuit_breaker.max_requests,
        circuit_breaker.max_connections,
        circuit_breaker.max_pending_requests,
    ]
    .contains(&Some(0))
    {
        check.fail(
            file,
            &at.clone().key("circuitBreaker"),
            "limits must be at least 1",
        );
    }
    let retries = match &spec.retries {
        Some(retries) => check_retries(check, file, &at.clone().key("retries"), retries),
        None => crate::policy::retry::Policy::default(),
    };
    let outlier = spec
        .outlier_detection
        .as_ref()
        .map(|o| check_outlier(check, file, &at.clone().key("outlierDetection"), o));
    let health_check = spec.health_check.as_ref().map(|h| {
        check_health(
            check,
            file,
            &at.clone().key("healthCheck"),
            h,
            ports.first().map_or(0, |p| p.target_port),
        )
    });
    let service = Service {
        retries,
        outlier,
        health_check,
        access_log: spec.access_log,
        circuit_breaker,
        rate_limit,
        load_balancer: spec.load_balancer,
        timeout: spec.timeout,
        routes,
        hostname: format!("{}.{}.svc.cluster.local", spec.name, spec.namespace).into(),
        name: spec.name.into(),
        namespace: spec.namespace.into(),
        vip,
        ports,
        endpoints,
    };
    (file, at.clone(), service)
}

fn check_route(
    check: &mut Checker<'_>,
    file: usize,
    at: &FieldPath,
    index: usize,
    spec: &crate::config::RouteSpec,
) -> Option<crate::policy::routing::Route> {
    use crate::policy::routing::{Backend, Match, PathMatch, Route};
    let path_at = at.clone().key("match").key("path");
    let path = match spec
        .matches
        .path
        .as_ref()
        .map(|p| (&p.exact, &p.prefix, &p.regex))
    {
        None => None,
        Some((Some(exact), None, None)) => Some(PathMatch::Exact(exact.clone())),
        Some((None, Some(prefix), None)) => Some(PathMatch::Prefix(prefix.clone())),
        Some((None, None, Some(regex))) => match regex::Regex::new(regex) {
            Ok(regex) => Some(PathMatch::Regex(regex)),
            Err(err) => {
                check.fail(file, &path_at.key("regex"), format!("invalid regex: {err}"));
                return None;
            }
        },
        Some(_) => {
            check.fail(file, &path_at, "give exactly one of exact, prefix or regex");
            return None;
        }
    };
    let method = match &spec.matches.method {
        None => None,
        Some(m) => match hyper::Method::from_bytes(m.as_bytes()) {
            Ok(method) => Some(method),
            Err(_) => {
                check.fail(
                    file,
                    &at.clone().key("match").key("method"),
                    format!("{m:?} is not an HTTP method"),
                );
                return None;
            }
        },
    };
    let mut headers = Vec::new();
    for (name, value) in &spec.matches.headers {
        match hyper::header::HeaderName::from_bytes(name.to_ascii_lowercase().as_bytes()) {
            Ok(header) => headers.push((header, value.clone())),
            Err(_) => check.fail(
                file,
                &at.clone().key("match").key("headers"),
                format!("{name:?} is not a header name"),
            ),
        }
    }
    if spec.to.is_empty() {
        check.fail(
            file,
            &at.clone().key("to"),
            "a route needs at least one backend",
        );
        return None;
    }
    if spec.to.iter().all(|b| b.weight == 0) {
        check.fail(file, &at.clone().key("to"), "every backend has weight 0");
        return None;
    }
    Some(Route {
        name: spec
            .name
            .clone()
            .unwrap_or_else(|| format!("route-{index}"))
            .into(),
        matcher: Match {
            path,
            method,
            headers,
        },
        backends: spec
            .to
            .iter()
            .map(|b| Backend {
                subset: b.subset.clone(),
                weight: b.weight,
            })
            .collect(),
        timeout: spec.timeout,
        retries: spec
            .retries
            .as_ref()
            .map(|r| check_retries(check, file, &at.clone().key("retries"), r)),
    })
}

fn check_retries(
    check: &mut Checker<'_>,
    file: usize,
    at: &FieldPath,
    spec: &crate::config::RetrySpec,
) -> crate::policy::retry::Policy {
    use crate::policy::retry::{Condition, Policy};
    let defaults = Policy::default();
    let mut conditions = Vec::new();
    for (i, name) in spec.retry_on.iter().flatten().enumerate() {
        match Condition::parse(name) {
            Some(condition) => conditions.push(condition),
            None => check.fail(
                file,
                &at.clone().key("retryOn").index(i),
                format!(
                    "unknown condition {name:?}; use one of {}",
                    Condition::NAMES.join(", ")
                ),
            ),
        }
    }
    if spec.retry_on.is_none() {
        conditions = defaults.conditions.clone();
    }
    for (i, status) in spec.statuses.iter().enumerate() {
        if !(100..=599).contains(status) {
            check.fail(
                file,
                &at.clone().key("statuses").index(i),
                format!("{status} is not an HTTP status"),
            );
        }
    }
    let ratio = spec.budget_ratio.unwrap_or(defaults.budget_ratio);
    let floor = spec
        .budget_min_per_second
        .unwrap_or(defaults.budget_min_per_second);
    for (name, value) in [("budgetRatio", ratio), ("budgetMinPerSecond", floor)] {
        if !(value >= 0.0 && value.is_finite()) {
            check.fail(file, &at.clone().key(name), "must be zero or more");
        }
    }
    let backoff_base = spec.backoff_base.unwrap_or(defaults.backoff_base);
    let backoff_max = spec.backoff_max.unwrap_or(defaults.backoff_max);
    if backoff_max < backoff_base {
        check.fail(
            file,
            &at.clone().key("backoffMax"),
            "must not be less than backoffBase",
        );
    }
    if spec.per_try_timeout == Some(std::time::Duration::ZERO) {
        check.fail(file, &at.clone().key("perTryTimeout"), "must be above 0");
    }
    Policy {
        max_retries: spec.max_retries,
        conditions,
        statuses: spec.statuses.clone(),
        per_try_timeout: spec.per_try_timeout,
        backoff_base,
        backoff_max,
        budget_ratio: ratio,
        budget_min_per_second: floor,
        non_idempotent: spec.non_idempotent,
        buffer_limit: spec.buffer_limit.unwrap_or(defaults.buffer_limit),
    }
}

fn check_outlier(
    check: &mut Checker<'_>,
    file: usize,
    at: &FieldPath,
    spec: &crate::config::OutlierSpec,
) -> crate::policy::outlier::Settings {
    use std::time::Duration;
    let settings = crate::policy::outlier::Settings {
        consecutive_errors: spec.consecutive_errors.unwrap_or(5),
        base_ejection_time: spec.base_ejection_time.unwrap_or(Duration::from_secs(30)),
        max_ejection_time: spec.max_ejection_time.unwrap_or(Duration::from_secs(300)),
        max_ejection_percent: spec.max_ejection_percent.unwrap_or(50),
    };
    if settings.consecutive_errors == 0 {
        check.fail(
            file,
            &at.clone().key("consecutiveErrors"),
            "must be at least 1",
        );
    }
    if settings.base_ejection_time.is_zero() {
        check.fail(file, &at.clone().key("baseEjectionTime"), "must be above 0");
    }
    if settings.max_ejection_time < settings.base_ejection_time {
        check.fail(
            file,
            &at.clone().key("maxEjectionTime"),
            "must not be less than baseEjectionTime",
        );
    }
    if settings.max_ejection_percent > 100 {
        check.fail(
            file,
            &at.clone().key("maxEjectionPercent"),
            "must be 0 to 100",
        );
    }
    settings
}

fn check_health(
    check: &mut Checker<'_>,
    file: usize,
    at: &FieldPath,
    spec: &crate::config::HealthCheckSpec,
    default_port: u16,
) -> crate::policy::health::Check {
    use std::time::Duration;
    let health = crate::policy::health::Check {
        protocol: spec.protocol,
        path: spec.path.clone().unwrap_or_else(|| "/healthz".to_owned()),
        port: spec.port.unwrap_or(default_port),
        interval: spec.interval.unwrap_or(Duration::from_secs(5)),
        timeout: spec.timeout.unwrap_or(Duration::from_secs(1)),
        unhealthy_threshold: spec.unhealthy_threshold.unwrap_or(2),
        healthy_threshold: spec.healthy_threshold.unwrap_or(1),
    };
    if !health.path.starts_with('/') {
        check.fail(file, &at.clone().key("path"), "must start with /");
    }
    if health.port == 0 {
        check.fail(file, &at.clone().key("port"), "must not be 0");
    }
    if health.interval.is_zero() || health.timeout.is_zero() {
        check.fail(file, at, "interval and timeout must be above 0");
    }
    if health.unhealthy_threshold == 0 || health.healthy_threshold == 0 {
        check.fail(file, at, "thresholds must be at least 1");
    }
    health
}

//! Retries: which failed tries may be tried again, how long to wait before
//! the next one, and a budget that keeps retries a bounded share of the
//! traffic so they never multiply an outage. Pure decisions over an
//! explicit clock and explicit random numbers.

use std::{sync::Mutex, time::Duration};

use hyper::{HeaderMap, Method, StatusCode};

/// How one try ended, as far as retrying is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// A response arrived (any status).
    Response(StatusCode),
    /// No connection could be made: the request never left meshd.
    ConnectFailure,
    /// The connection failed after the request may have been sent.
    Reset,
    /// The per-try timeout fired.
    Timeout,
}

/// A retry-on condition, as Envoy names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Condition {
    /// Any 5xx answer, no answer at all, or a per-try timeout.
    ServerError,
    /// 502, 503, 504, a connect failure, a reset or a per-try timeout.
    GatewayError,
    ConnectFailure,
    Reset,
    /// A gRPC status (from a trailers-only response).
    Grpc(u32),
}

impl Condition {
    /// The names `retryOn` accepts.
    pub const NAMES: [&'static str; 9] = [
        "5xx",
        "gateway-error",
        "connect-failure",
        "reset",
        "cancelled",
        "deadline-exceeded",
        "internal",
        "resource-exhausted",
        "unavailable",
    ];

    pub fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "5xx" => Self::ServerError,
            "gateway-error" => Self::GatewayError,
            "connect-failure" => Self::ConnectFailure,
            "reset" => Self::Reset,
            "cancelled" => Self::Grpc(1),
            "deadline-exceeded" => Self::Grpc(4),
            "resource-exhausted" => Self::Grpc(8),
            "internal" => Self::Grpc(13),
            "unavailable" => Self::Grpc(14),
            _ => return None,
        })
    }
}

/// A compiled retry policy.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    /// Retries after the first try.
    pub max_retries: u32,
    pub conditions: Vec<Condition>,
    /// Response statuses retried besides the conditions.
    pub statuses: Vec<u16>,
    pub per_try_timeout: Option<Duration>,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    /// Retries allowed per original request, over the budget's window.
    pub budget_ratio: f64,
    /// Retries always allowed per second, whatever the ratio says.
    pub budget_min_per_second: f64,
    /// Retry methods that are not idempotent (POST, PATCH) too.
    pub non_idempotent: bool,
    /// Largest request body kept for replay; a larger one is not retried.
    pub buffer_limit: usize,
}

impl Default for Policy {
    /// What a service without `retries` gets: connect failures (the request
    /// never reached the endpoint, so any method is safe) retried twice.
    fn default() -> Self {
        Self {
            max_retries: 2,
            conditions: vec![Condition::ConnectFailure],
            statuses: Vec::new(),
            per_try_timeout: None,
            backoff_base: Duration::from_millis(25),
            backoff_max: Duration::from_millis(250),
            budget_ratio: 0.2,
            budget_min_per_second: 10.0,
            non_idempotent: false,
            buffer_limit: 64 * 1024,
        }
    }
}

/// Why a try is worth retrying, for `meshd_retries_total{reason}`.
pub type Reason = &'static str;

impl Policy {
    /// Whether `method` may be sent again at all under this policy. A
    /// connect failure is always retriable: nothing was sent.
    pub fn method_allowed(&self, method: &Method) -> bool {
        self.non_idempotent || method.is_idempotent()
    }

    /// The reason to retry a try that ended with `outcome` (and, for a
    /// response, its headers), or `None` when it stands.
    pub fn retriable(
        &self,
        outcome: Outcome,
        headers: Option<&HeaderMap>,
        method_allowed: bool,
    ) -> Option<Reason> {
        let has = |c: Condition| self.conditions.contains(&c);
        match outcome {
            Outcome::ConnectFailure => (has(Condition::ConnectFailure)
                || has(Condition::GatewayError)
                || has(Condition::ServerError))
            .then_some("connect-failure"),
            _ if !method_allowed => None,
            Outcome::Reset => (has(Condition::Reset)
                || has(Condition::GatewayError)
                || has(Condition::ServerError))
            .then_some("reset"),
            Outcome::Timeout => {
                (has(Condition::GatewayError) || has(Condition::ServerError)).then_some("timeout")
            }
            Outcome::Response(status) => {
                let code = status.as_u16();
                if self.statuses.contains(&code) {
                    return Some("status");
                }
                if matches!(code, 502..=504) && has(Condition::GatewayError) {
                    return Some("gateway-error");
                }
                if status.is_server_error() && has(Condition::ServerError) {
                    return Some("5xx");
                }
                let grpc = headers
                    .and_then(|h| h.get("grpc-status"))
                    .and_then(|v| v.to_str().ok()?.parse::<u32>().ok());
                match grpc {
                    Some(code) if has(Condition::Grpc(code)) => Some("grpc"),
                    _ => None,
                }
            }
        }
    }

    /// How long to wait before retry number `retry` (1-based): "full
    /// jitter", a uniform draw below an exponentially growing cap.
    pub fn backoff(&self, retry: u32, random: u64) -> Duration {
        let cap = self
            .backoff_base
            .saturating_mul(1u32 << retry.saturating_sub(1).min(16))
            .min(self.backoff_max);
        let nanos = cap.as_nanos() as u64;
        if nanos == 0 {
            return Duration::ZERO;
        }
        Duration::from_nanos(random % (nanos + 1))
    }
}

/// How far back the budget looks.
const WINDOW: Duration = Duration::from_secs(10);
const SLOTS: usize = 10;

/// A retry budget: over the last ten seconds, retries may number at most
/// `ratio` × requests plus `min_per_second` × 10. Time is a `Duration`
/// since any fixed origin.
#[derive(Debug, Default)]
pub struct Budget {
    inner: Mutex<Window>,
}

#[derive(Debug, Default)]
struct Window {
    /// Requests and retries per one-second slot, and each slot's second.
    requests: [u64; SLOTS],
    retries: [u64; SLOTS],
    second: [u64; SLOTS],
}

impl Window {
    fn slot(&mut self, now: Duration) -> usize {
        let second = now.as_secs();
        let slot = (second % SLOTS as u64) as usize;
        if self.second[slot] != second {
            self.second[slot] = second;
            self.requests[slot] = 0;
            self.retries[slot] = 0;
        }
        slot
    }

    fn totals(&self, now: Duration) -> (u64, u64) {
        let oldest = now.as_secs().saturating_sub(SLOTS as u64 - 1);
        (0..SLOTS)
            .filter(|&s| self.second[s] >= oldest && self.second[s] <= now.as_secs())
            .fold((0, 0), |(q, r), s| {
                (q + self.requests[s], r + self.retries[s])
            })
    }
}

impl Budget {
    /// Counts an original request: it earns `ratio` retries.
    pub fn deposit(&self, now: Duration) {
        let mut window = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let slot = window.slot(now);
        window.requests[slot] += 1;
    }

    /// Takes one retry from the budget, or refuses when it is spent.
    pub fn withdraw(&self, policy: &Policy, now: Duration) -> bool {
        let mut window = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let slot = window.slot(now);
        let (requests, retries) = window.totals(now);
        let allowed = policy.budget_ratio * requests as f64
            + policy.budget_min_per_second * WINDOW.as_secs_f64();
        if (retries as f64) < allowed {
            window.retries[slot] += 1;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(conditions: &[&str]) -> Policy {
        Policy {
            conditions: conditions
                .iter()
                .map(|c| Condition::parse(c).expect("known"))
                .collect(),
            ..Policy::default()
        }
    }

    #[test]
    fn conditions_decide_what_is_retried() {
        use Outcome::*;
        let s = |c| Response(StatusCode::from_u16(c).expect("status"));
        let cases: [(&[&str], Outcome, bool, Option<Reason>); 12] = [
            (
                &["connect-failure"],
                ConnectFailure,
                false,
                Some("connect-failure"),
            ),
            (&["connect-failure"], Reset, true, None),
            (&["reset"], Reset, true, Some("reset")),
            (&["reset"], Reset, false, None),
            (&["5xx"], s(500), true, Some("5xx")),
            (&["5xx"], s(404), true, None),
            (&["5xx"], Timeout, true, Some("timeout")),
            (&["gateway-error"], s(500), true, None),
            (&["gateway-error"], s(503), true, Some("gateway-error")),
            (
                &["gateway-error"],
                ConnectFailure,
                false,
                Some("connect-failure"),
            ),
            (&["5xx"], s(503), false, None),
            (&[], s(503), true, None),
        ];
        for (conditions, outcome, allowed, want) in cases {
            assert_eq!(
                policy(conditions).retriable(outcome, None, allowed),
                want,
                "{conditions:?} {outcome:?}"
            );
        }
    }

    #[test]
    fn listed_statuses_and_grpc_codes_are_retried() {
        let mut p = policy(&["unavailable"]);
        p.statuses = vec![409];
        assert_eq!(
            p.retriable(Outcome::Response(StatusCode::CONFLICT), None, true),
            Some("status")
        );
        let mut headers = HeaderMap::new();
        headers.insert("grpc-status", "14".parse().expect("value"));
        let ok = Outcome::Response(StatusCode::OK);
        assert_eq!(p.retriable(ok, Some(&headers), true), Some("grpc"));
        headers.insert("grpc-status", "5".parse().expect("value"));
        assert_eq!(p.retriable(ok, Some(&headers), true), None);
    }

    #[test]
    fn only_idempotent_methods_unless_configured() {
        let p = Policy::default();
        assert!(p.method_allowed(&Method::GET));
        assert!(p.method_allowed(&Method::PUT));
        assert!(!p.method_allowed(&Method::POST));
        let p = Policy {
            non_idempotent: true,
            ..p
        };
        assert!(p.method_allowed(&Method::POST));
    }

    #[test]
    fn backoff_is_jittered_below_a_growing_capped_limit() {
        let p = Policy::default();
        assert_eq!(p.backoff(1, 25_000_000), Duration::from_millis(25));
        assert!(p.backoff(1, u64::MAX) <= Duration::from_millis(25));
        assert!(p.backoff(2, 12_345_678_901) <= Duration::from_millis(50));
        assert!(p.backoff(30, u64::MAX - 7) <= Duration::from_millis(250));
        let draws: std::collections::HashSet<_> =
            (0..50u64).map(|r| p.backoff(3, r * 7_919_993)).collect();
        assert!(draws.len() > 40, "jitter spreads the waits");
    }

    #[test]
    fn budget_allows_a_floor_plus_a_ratio_then_refuses() {
        let p = Policy {
            budget_ratio: 0.5,
            budget_min_per_second: 1.0,
            ..Policy::default()
        };
        let budget = Budget::default();
        let now = Duration::from_secs(100);
        for _ in 0..20 {
            budget.deposit(now);
        }
        // 0.5 × 20 requests + 1/s × 10 s = 20 retries.
        let granted = (0..100).filter(|_| budget.withdraw(&p, now)).count();
        assert_eq!(granted, 20);
        // Ten seconds on, the window has forgotten them: the floor again.
        let later = now + Duration::from_secs(11);
        let granted = (0..100).filter(|_| budget.withdraw(&p, later)).count();
        assert_eq!(granted, 10);
    }
}

//! L7 routing: which route a request takes and which weighted backend
//! (a subset of a service's endpoints, chosen by labels) serves it.
//! Pure: a request's parts in, a decision out.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use hyper::{HeaderMap, Method};

/// How a route matches a path.
#[derive(Debug, Clone)]
pub enum PathMatch {
    Exact(String),
    Prefix(String),
    Regex(regex::Regex),
}

impl PathMatch {
    fn matches(&self, path: &str) -> bool {
        match self {
            Self::Exact(exact) => path == exact,
            // `/api` matches `/api` and `/api/x`, not `/apis`.
            Self::Prefix(prefix) => {
                path.starts_with(prefix.as_str())
                    && (prefix.ends_with('/')
                        || path.len() == prefix.len()
                        || path.as_bytes()[prefix.len()] == b'/')
            }
            Self::Regex(regex) => regex.is_match(path),
        }
    }
}

/// Conditions on a request; every one given must hold.
#[derive(Debug, Clone, Default)]
pub struct Match {
    pub path: Option<PathMatch>,
    pub method: Option<Method>,
    /// Header name (lowercase) → exact value.
    pub headers: Vec<(hyper::header::HeaderName, String)>,
}

impl Match {
    fn matches(&self, method: &Method, path: &str, headers: &HeaderMap) -> bool {
        self.path.as_ref().is_none_or(|p| p.matches(path))
            && self.method.as_ref().is_none_or(|m| m == method)
            && self.headers.iter().all(|(name, value)| {
                headers
                    .get_all(name)
                    .iter()
                    .any(|v| v.to_str().is_ok_and(|v| v == value))
            })
    }
}

/// An endpoint's labels, sorted by key. A mesh's endpoints have few
/// distinct label sets (a version, an app), so config validation keeps
/// each set once, shared by every endpoint that has it: tens of thousands
/// of endpoints cost a pointer each, not a map each.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Labels(Arc<[(Arc<str>, Arc<str>)]>);

impl FromIterator<(Arc<str>, Arc<str>)> for Labels {
    fn from_iter<I: IntoIterator<Item = (Arc<str>, Arc<str>)>>(pairs: I) -> Self {
        let mut pairs: Vec<(Arc<str>, Arc<str>)> = pairs.into_iter().collect();
        pairs.sort();
        pairs.dedup_by(|a, b| a.0 == b.0);
        Self(pairs.into())
    }
}

impl FromIterator<(String, String)> for Labels {
    fn from_iter<I: IntoIterator<Item = (String, String)>>(pairs: I) -> Self {
        pairs
            .into_iter()
            .map(|(k, v)| (Arc::from(k), Arc::from(v)))
            .collect()
    }
}

impl Labels {
    /// The value of label `key`.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0
            .binary_search_by(|(k, _)| (**k).cmp(key))
            .ok()
            .map(|i| &*self.0[i].1)
    }

    /// The labels, by key.
    pub fn iter(&self) -> impl Iterator<Item = (&Arc<str>, &Arc<str>)> {
        self.0.iter().map(|(k, v)| (k, v))
    }

    /// Whether both are the one shared set.
    pub fn same_set(&self, other: &Labels) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }

    /// Which shared set this is: equal for sets that are `same_set`, and
    /// unique while the set lives.
    pub fn set_id(&self) -> usize {
        Arc::as_ptr(&self.0).cast::<()>() as usize
    }
}

/// A share of a route's traffic: the endpoints whose labels include all of
/// `subset`.
#[derive(Debug, Clone)]
pub struct Backend {
    pub subset: BTreeMap<String, String>,
    pub weight: u32,
}

impl Backend {
    /// Whether an endpoint with `labels` belongs to this backend.
    pub fn admits(&self, labels: &Labels) -> bool {
        self.subset
            .iter()
            .all(|(k, v)| labels.get(k) == Some(v.as_str()))
    }
}

#[derive(Debug, Clone)]
pub struct Route {
    pub name: Arc<str>,
    pub matcher: Match,
    pub backends: Vec<Backend>,
    /// Overrides the service's request timeout.
    pub timeout: Option<Duration>,
    /// Overrides the service's retry policy.
    pub retries: Option<crate::policy::retry::Policy>,
}

impl Route {
    /// Every endpoint, evenly: what a service without routes does.
    /// The routes of a service that has none of its own (the default
    /// route), one list for all such services.
    pub fn default_routes() -> Arc<[Route]> {
        static DEFAULT: std::sync::LazyLock<Arc<[Route]>> =
            std::sync::LazyLock::new(|| Arc::new([Route::default_route()]));
        DEFAULT.clone()
    }

    pub fn default_route() -> Self {
        Self {
            name: "default".into(),
            matcher: Match::default(),
            backends: vec![Backend {
                subset: BTreeMap::new(),
                weight: 1,
            }],
            timeout: None,
            retries: None,
        }
    }

    fn total_weight(&self) -> u64 {
        self.backends.iter().map(|b| u64::from(b.weight)).sum()
    }

    /// The backend a uniformly random `roll` lands on (weights need not sum
    /// to anything in particular).
    pub fn backend(&self, roll: u64) -> &Backend {
        let total = self.total_weight().max(1);
        let mut point = roll % total;
        for backend in &self.backends {
            if point < u64::from(backend.weight) {
                return backend;
            }
            point -= u64::from(backend.weight);
        }
        &self.backends[0]
    }
}

/// The first route whose match holds, in order.
pub fn select<'a>(
    routes: &'a [Route],
    method: &Method,
    path: &str,
    headers: &HeaderMap,
) -> Option<&'a Route> {
    routes
        .iter()
        .find(|r| r.matcher.matches(method, path, headers))
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::header::{HeaderName, HeaderValue};

    fn subset(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn route(name: &str, matcher: Match, backends: &[(&[(&str, &str)], u32)]) -> Route {
        Route {
            name: name.into(),
            matcher,
            backends: backends
                .iter()
                .map(|(s, weight)| Backend {
                    subset: subset(s),
                    weight: *weight,
                })
                .collect(),
            timeout: None,
            retries: None,
        }
    }

    fn routes() -> Vec<Route> {
        vec![
            route(
                "canary-header",
                Match {
                    headers: vec![(HeaderName::from_static("x-canary"), "1".into())],
                    ..Match::default()
                },
                &[(&[("version", "v2")], 1)],
            ),
            route(
                "admin",
                Match {
                    path: Some(PathMatch::Prefix("/admin".into())),
                    method: Some(Method::POST),
                    ..Match::default()
                },
                &[(&[("version", "v1")], 1)],
            ),
            route(
                "ids",
                Match {
                    path: Some(PathMatch::Regex(
                        regex::Regex::new("^/items/[0-9]+$").expect("regex"),
                    )),
                    ..Match::default()
                },
                &[(&[("version", "v1")], 1)],
            ),
            route(
                "exact",
                Match {
                    path: Some(PathMatch::Exact("/health".into())),
                    ..Match::default()
                },
                &[(&[], 1)],
            ),
            route(
                "split",
                Match::default(),
                &[(&[("version", "v1")], 90), (&[("version", "v2")], 10)],
            ),
        ]
    }

    #[test]
    fn the_first_matching_route_wins() {
        let routes = routes();
        let mut canary = HeaderMap::new();
        canary.insert("x-canary", HeaderValue::from_static("1"));
        let none = HeaderMap::new();
        let cases: &[(Method, &str, &HeaderMap, &str)] = &[
            (Method::GET, "/x", &canary, "canary-header"),
            (Method::POST, "/admin", &none, "admin"),
            (Method::POST, "/admin/users", &none, "admin"),
            (Method::POST, "/administrator", &none, "split"),
            (Method::GET, "/admin", &none, "split"),
            (Method::GET, "/items/42", &none, "ids"),
            (Method::GET, "/items/abc", &none, "split"),
            (Method::GET, "/health", &none, "exact"),
            (Method::GET, "/health/deep", &none, "split"),
            (Method::GET, "/", &none, "split"),
        ];
        for (method, path, headers, want) in cases {
            let got = select(&routes, method, path, headers).map(|r| &*r.name);
            assert_eq!(got, Some(*want), "{method} {path}");
        }
    }

    #[test]
    fn weights_split_the_roll_space() {
        let routes = routes();
        let split = &routes[4];
        let v2 = (0..1000u64)
            .filter(|roll| {
                split
                    .backend(*roll)
                    .subset
                    .get("version")
                    .map(String::as_str)
                    == Some("v2")
            })
            .count();
        assert_eq!(v2, 100);
        let labels = |pairs| subset(pairs).into_iter().collect();
        assert!(split
            .backend(89)
            .admits(&labels(&[("version", "v1"), ("app", "x")])));
        assert!(!split.backend(95).admits(&labels(&[("version", "v1")])));
        assert!(!split.backend(89).admits(&labels(&[("app", "x")])));
    }
}

//! The respond stage: what the client gets, decided in one place — meshd's
//! own answer for a refusal or a failed request (status and flag), or the
//! upstream's answer made fit to forward — and recorded once in the
//! request's result.

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::{header::HeaderValue, Response, StatusCode};
use tracing::warn;

use super::{
    message::{splice_upgrade, strip_hop_by_hop},
    retry::Try,
    upstream::{Answer, Body, UpstreamError},
};
use crate::telemetry::{RequestResult, ResponseFlag};

/// The header meshd's own answers carry their flag in, for the client to
/// read. meshd never reads it, and removes it from upstream answers.
pub const FLAGS_HEADER: &str = "x-meshd-response-flags";

/// Why meshd answers a request itself, before or instead of any upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal {
    pub status: StatusCode,
    pub flag: ResponseFlag,
}

impl Refusal {
    const fn new(status: StatusCode, flag: ResponseFlag) -> Self {
        Self { status, flag }
    }

    /// No route matched, or the service went away with a reload.
    pub const NO_ROUTE: Self = Self::new(StatusCode::NOT_FOUND, ResponseFlag::NoRoute);
    pub const UNKNOWN_SERVICE: Self =
        Self::new(StatusCode::SERVICE_UNAVAILABLE, ResponseFlag::NoRoute);
    /// An endpoint on a node the config does not list.
    pub const UNKNOWN_NODE: Self =
        Self::new(StatusCode::SERVICE_UNAVAILABLE, ResponseFlag::NoRoute);
    pub const RATE_LIMITED: Self =
        Self::new(StatusCode::TOO_MANY_REQUESTS, ResponseFlag::RateLimited);
    pub const OVERFLOW: Self = Self::new(
        StatusCode::SERVICE_UNAVAILABLE,
        ResponseFlag::UpstreamOverflow,
    );
    pub const NO_ENDPOINT: Self = Self::new(
        StatusCode::SERVICE_UNAVAILABLE,
        ResponseFlag::NoHealthyUpstream,
    );
    pub const DENIED: Self = Self::new(StatusCode::FORBIDDEN, ResponseFlag::Rbac);
    /// The destination's meshd refused the tunnel stream by its policy: its
    /// decision, so no flag of this meshd's.
    pub const DENIED_THERE: Self = Self::new(StatusCode::FORBIDDEN, ResponseFlag::None);
    pub const BAD_REQUEST: Self = Self::new(
        StatusCode::BAD_REQUEST,
        ResponseFlag::DownstreamProtocolError,
    );
    /// Across nodes without an identity to tunnel with.
    pub const NO_TUNNEL: Self = Self::new(
        StatusCode::SERVICE_UNAVAILABLE,
        ResponseFlag::UpstreamConnectFailure,
    );
    pub const TIMEOUT: Self = Self::new(StatusCode::GATEWAY_TIMEOUT, ResponseFlag::UpstreamTimeout);
    /// The upstream's connection ended before it answered.
    pub const UPSTREAM_RESET: Self = Self::new(
        StatusCode::SERVICE_UNAVAILABLE,
        ResponseFlag::UpstreamConnectionTermination,
    );
    pub const UPSTREAM_UNREACHABLE: Self = Self::new(
        StatusCode::SERVICE_UNAVAILABLE,
        ResponseFlag::UpstreamConnectFailure,
    );
}

/// meshd's own answer: the status, a one-line body, the flag header.
pub fn reply(status: StatusCode, flag: ResponseFlag) -> Response<Body> {
    let mut response = Response::new(
        Full::new(Bytes::from(format!(
            "meshd: {}\n",
            status.canonical_reason().unwrap_or("error")
        )))
        .map_err(|never| match never {})
        .boxed(),
    );
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(FLAGS_HEADER, HeaderValue::from_static(flag.as_str()));
    response
}

/// Answers `refusal` and records it.
pub fn refuse(refusal: Refusal, result: RequestResult) -> Response<Body> {
    result.finish(reply(refusal.status, refusal.flag), refusal.flag)
}

/// What the client gets for the try that stood.
pub fn ended(
    tried: Try<Response<Answer>, UpstreamError, Refusal>,
    upgrade: Option<hyper::upgrade::OnUpgrade>,
    result: RequestResult,
) -> Response<Body> {
    match tried {
        Try::Refused(refusal) => refuse(refusal, result),
        Try::Failed(_, None) => refuse(Refusal::TIMEOUT, result),
        Try::Failed(_, Some(err)) => {
            warn!(error = %err, "upstream request failed");
            let refusal = match err {
                UpstreamError::Http(..) => Refusal::UPSTREAM_RESET,
                _ => Refusal::UPSTREAM_UNREACHABLE,
            };
            refuse(refusal, result)
        }
        Try::Answered(response) => {
            let upgrading =
                upgrade.filter(|_| response.status() == StatusCode::SWITCHING_PROTOCOLS);
            match upgrading {
                Some(downstream) => forward(upgraded(downstream, response), result),
                None => {
                    let (mut parts, body) = response.into_parts();
                    strip_hop_by_hop(&mut parts.headers, false);
                    forward(Response::from_parts(parts, body), result)
                }
            }
        }
    }
}

/// An upstream's answer as the client gets it: without meshd's own flag
/// header (an upstream cannot speak for meshd), recorded with no flag.
fn forward<B>(mut response: Response<B>, result: RequestResult) -> Response<Body>
where
    B: hyper::body::Body<Data = Bytes, Error = hyper::Error> + Send + Sync + Unpin + 'static,
{
    response.headers_mut().remove(FLAGS_HEADER);
    result.finish(response, ResponseFlag::None)
}

/// Completes a 101 answer: the upgraded streams are relayed both ways.
fn upgraded(downstream: hyper::upgrade::OnUpgrade, response: Response<Answer>) -> Response<Body> {
    let (mut parts, body) = response.into_parts();
    splice_upgrade(downstream, Response::from_parts(parts.clone(), body));
    strip_hop_by_hop(&mut parts.headers, true);
    Response::from_parts(
        parts,
        http_body_util::Empty::new()
            .map_err(|never| match never {})
            .boxed(),
    )
}

//! Envoy's response flags, as Istio's `response_flags` label carries them:
//! why meshd answered or ended a request or connection itself. A closed
//! set decided by meshd — never read back from a message, so no upstream
//! or client can set it.

use std::fmt;

use prometheus_client::encoding::{EncodeLabelValue, LabelValueEncoder};

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum ResponseFlag {
    /// Nothing went wrong: `-`.
    #[default]
    None,
    /// `UT`: the request timed out upstream.
    UpstreamTimeout,
    /// `UF`: no connection to the upstream could be made.
    UpstreamConnectFailure,
    /// `UC`: the upstream connection ended mid-request.
    UpstreamConnectionTermination,
    /// `UH`: no endpoint to send to.
    NoHealthyUpstream,
    /// `NR`: no route (or no service) for the request.
    NoRoute,
    /// `RBAC`: denied by authorization policy.
    Rbac,
    /// `RL`: refused by a rate limit.
    RateLimited,
    /// `UO`: shed by a circuit-breaker limit.
    UpstreamOverflow,
    /// `DPE`: the client's request could not be forwarded as it was.
    DownstreamProtocolError,
    /// `DC`: the client went away before the answer.
    DownstreamConnectionTermination,
}

impl ResponseFlag {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::None => "-",
            Self::UpstreamTimeout => "UT",
            Self::UpstreamConnectFailure => "UF",
            Self::UpstreamConnectionTermination => "UC",
            Self::NoHealthyUpstream => "UH",
            Self::NoRoute => "NR",
            Self::Rbac => "RBAC",
            Self::RateLimited => "RL",
            Self::UpstreamOverflow => "UO",
            Self::DownstreamProtocolError => "DPE",
            Self::DownstreamConnectionTermination => "DC",
        }
    }
}

impl fmt::Display for ResponseFlag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl EncodeLabelValue for ResponseFlag {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), fmt::Error> {
        fmt::Write::write_str(encoder, self.as_str())
    }
}

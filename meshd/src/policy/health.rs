//! Active health-check thresholds: an endpoint leaves the rotation after
//! `unhealthyThreshold` failed checks in a row and comes back after
//! `healthyThreshold` passes in a row. Pure counting; the checks
//! themselves are made by `proxy::health`.

use std::time::Duration;

/// What a check does: an HTTP GET answered 2xx, or a TCP connect.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HealthProtocol {
    Http,
    Tcp,
}

/// A service's check, as validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    pub protocol: HealthProtocol,
    pub path: String,
    pub port: u16,
    pub interval: Duration,
    pub timeout: Duration,
    pub unhealthy_threshold: u32,
    pub healthy_threshold: u32,
}

/// Checks in a row, passed or failed, of one endpoint.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Tally {
    passes: u32,
    failures: u32,
}

impl Tally {
    /// Counts one check of an endpoint that is `healthy` now; returns its
    /// new health when this check changes it.
    pub fn observe(&mut self, check: &Check, passed: bool, healthy: bool) -> Option<bool> {
        if passed {
            self.failures = 0;
            self.passes = self.passes.saturating_add(1);
            (!healthy && self.passes >= check.healthy_threshold).then_some(true)
        } else {
            self.passes = 0;
            self.failures = self.failures.saturating_add(1);
            (healthy && self.failures >= check.unhealthy_threshold).then_some(false)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thresholds_count_checks_in_a_row() {
        let check = Check {
            protocol: HealthProtocol::Tcp,
            path: String::new(),
            port: 80,
            interval: Duration::from_secs(1),
            timeout: Duration::from_secs(1),
            unhealthy_threshold: 2,
            healthy_threshold: 3,
        };
        let mut tally = Tally::default();
        let mut healthy = true;
        let mut run = |passes: &[bool]| -> Vec<bool> {
            passes
                .iter()
                .map(|passed| {
                    if let Some(now) = tally.observe(&check, *passed, healthy) {
                        healthy = now;
                    }
                    healthy
                })
                .collect()
        };
        // One failure is not enough; a pass resets the run; two in a row are.
        assert_eq!(run(&[false, true, false, false]), [true, true, true, false]);
        // Back after three passes in a row, not before.
        assert_eq!(
            run(&[true, true, false, true, true, true]),
            [false, false, false, false, false, true]
        );
    }
}

//! The retry stage: tries a request until one try stands — it answered
//! and the answer is not retriable, the policy allows no more, the
//! deadline or the retry budget is spent, or the body cannot be sent
//! again — waiting a jittered backoff between tries. It knows nothing of
//! sockets: each try is an `Attempt`, so the loop is tested with scripted
//! tries and paused time.

use std::future::Future;

use hyper::{HeaderMap, StatusCode};
use tokio::time::Instant;

use crate::{
    net::clock,
    policy::retry::{Budget, Outcome, Policy, Reason},
};

/// What a retry decision looks at in an answer.
pub trait Answer {
    fn status(&self) -> StatusCode;
    fn headers(&self) -> &HeaderMap;
}

impl<B> Answer for hyper::Response<B> {
    fn status(&self) -> StatusCode {
        self.status()
    }

    fn headers(&self) -> &HeaderMap {
        self.headers()
    }
}

/// How one try ended.
#[derive(Debug)]
pub enum Try<R, E, F> {
    /// An answer arrived (any status).
    Answered(R),
    /// No answer: a connect failure, a reset or a per-try timeout.
    Failed(Outcome, Option<E>),
    /// meshd refused the try before it left (policy, no endpoint, an
    /// overflowing limit): it stands, whatever the policy says.
    Refused(F),
}

/// One try of a request, as the loop drives it.
pub trait Attempt {
    type Response: Answer;
    type Error;
    type Refusal;

    /// Makes one try.
    fn attempt(&mut self) -> impl Future<Output = Try<Self::Response, Self::Error, Self::Refusal>>;

    /// Whether the request can be sent again (its body was never sent, or
    /// a complete copy was kept).
    fn replayable(&self) -> bool;

    /// Another try follows, for `reason`; `retry` counts from 1.
    fn retrying(&mut self, reason: Reason, retry: u32);

    /// A retriable failure stands because the budget is spent.
    fn budget_exhausted(&mut self);
}

/// What the loop needs besides the tries.
pub struct Retry<'a> {
    pub policy: &'a Policy,
    pub budget: &'a Budget,
    /// Whether the request's method may be sent twice (see
    /// `Policy::method_allowed`); a connect failure is retried regardless.
    pub method_allowed: bool,
    /// When the whole request times out.
    pub deadline: Option<Instant>,
}

impl Retry<'_> {
    /// Tries until one try stands, and returns it. `random` draws the
    /// backoff's jitter.
    pub async fn run<A: Attempt>(
        &self,
        attempt: &mut A,
        mut random: impl FnMut() -> u64,
    ) -> Try<A::Response, A::Error, A::Refusal> {
        self.budget.deposit(clock::since_origin());
        let mut retries = 0;
        loop {
            let tried = attempt.attempt().await;
            let (outcome, headers) = match &tried {
                Try::Refused(_) => return tried,
                Try::Answered(answer) => {
                    (Outcome::Response(answer.status()), Some(answer.headers()))
                }
                Try::Failed(outcome, _) => (*outcome, None),
            };
            let out_of_time = self.deadline.is_some_and(|d| Instant::now() >= d);
            let Some(reason) = self
                .policy
                .retriable(outcome, headers, self.method_allowed)
                .filter(|_| retries < self.policy.max_retries && !out_of_time)
                .filter(|_| attempt.replayable())
            else {
                return tried;
            };
            if !self.budget.withdraw(self.policy, clock::since_origin()) {
                attempt.budget_exhausted();
                return tried;
            }
            retries += 1;
            attempt.retrying(reason, retries);
            // The failed answer goes before the wait, freeing its connection.
            drop(tried);
            let mut wait = self.policy.backoff(retries, random());
            if let Some(deadline) = self.deadline {
                wait = wait.min(deadline.saturating_duration_since(Instant::now()));
            }
            tokio::time::sleep(wait).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::retry::Condition;
    use std::{collections::VecDeque, time::Duration};

    struct Answered(StatusCode, HeaderMap);

    impl Answer for Answered {
        fn status(&self) -> StatusCode {
            self.0
        }
        fn headers(&self) -> &HeaderMap {
            &self.1
        }
    }

    /// Tries that end as scripted; records what the loop did.
    #[derive(Default)]
    struct Script {
        tries: VecDeque<Try<Answered, (), &'static str>>,
        made: u32,
        /// How many tries may be sent again (`None`: any).
        replays: Option<u32>,
        retried: Vec<(Reason, u32)>,
        exhausted: u32,
    }

    fn status(code: u16) -> Try<Answered, (), &'static str> {
        Try::Answered(Answered(
            StatusCode::from_u16(code).expect("status"),
            HeaderMap::new(),
        ))
    }

    impl Script {
        fn of(tries: Vec<Try<Answered, (), &'static str>>) -> Self {
            Self {
                tries: tries.into(),
                ..Self::default()
            }
        }
    }

    impl Attempt for Script {
        type Response = Answered;
        type Error = ();
        type Refusal = &'static str;

        async fn attempt(&mut self) -> Try<Answered, (), &'static str> {
            self.made += 1;
            self.tries.pop_front().expect("the script has another try")
        }

        fn replayable(&self) -> bool {
            self.replays.is_none_or(|n| self.made <= n)
        }

        fn retrying(&mut self, reason: Reason, retry: u32) {
            self.retried.push((reason, retry));
        }

        fn budget_exhausted(&mut self) {
            self.exhausted += 1;
        }
    }

    fn policy(conditions: &[&str], max_retries: u32) -> Policy {
        Policy {
            max_retries,
            conditions: conditions
                .iter()
                .map(|c| Condition::parse(c).expect("condition"))
                .collect(),
            ..Policy::default()
        }
    }

    async fn run(
        policy: &Policy,
        budget: &Budget,
        method_allowed: bool,
        script: &mut Script,
    ) -> Option<u16> {
        let retry = Retry {
            policy,
            budget,
            method_allowed,
            deadline: None,
        };
        match retry.run(script, || u64::MAX).await {
            Try::Answered(a) => Some(a.0.as_u16()),
            _ => None,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn retries_what_the_policy_names_until_an_answer_stands() {
        let p = policy(&["5xx"], 2);
        let mut script = Script::of(vec![status(503), status(500), status(200)]);
        let got = run(&p, &Budget::default(), true, &mut script).await;
        assert_eq!(got, Some(200));
        assert_eq!(script.retried, [("5xx", 1), ("5xx", 2)]);
        // A 404 is not a 5xx: it stands at once.
        let mut script = Script::of(vec![status(404)]);
        assert_eq!(
            run(&p, &Budget::default(), true, &mut script).await,
            Some(404)
        );
        assert_eq!(script.made, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn stops_at_max_retries_with_the_last_answer() {
        let p = policy(&["5xx"], 2);
        let mut script = Script::of(vec![status(503), status(502), status(500)]);
        assert_eq!(
            run(&p, &Budget::default(), true, &mut script).await,
            Some(500)
        );
        assert_eq!(script.made, 3);
    }

    #[tokio::test(start_paused = true)]
    async fn backoff_grows_and_is_capped() {
        // Each jitter draw equals its cap, so the waits are the caps:
        // 100 ms, then 200 ms capped to 150 ms, twice.
        let p = Policy {
            backoff_base: Duration::from_millis(100),
            backoff_max: Duration::from_millis(150),
            ..policy(&["5xx"], 3)
        };
        let start = Instant::now();
        let mut script = Script::of(vec![status(503), status(503), status(503), status(200)]);
        let retry = Retry {
            policy: &p,
            budget: &Budget::default(),
            method_allowed: true,
            deadline: None,
        };
        let mut draws = [100_000_000u64, 150_000_000, 150_000_000].into_iter();
        retry
            .run(&mut script, || draws.next().expect("three waits"))
            .await;
        assert_eq!(script.made, 4);
        assert_eq!(start.elapsed(), Duration::from_millis(400));
    }

    #[tokio::test(start_paused = true)]
    async fn only_idempotent_methods_are_retried_after_sending() {
        let p = policy(&["5xx", "connect-failure"], 2);
        // A POST (method not allowed) that got a 503 is not sent again...
        let mut script = Script::of(vec![status(503)]);
        assert_eq!(
            run(&p, &Budget::default(), false, &mut script).await,
            Some(503)
        );
        assert_eq!(script.made, 1);
        // ...but one that never left meshd (connect failure) is.
        let mut script = Script::of(vec![
            Try::Failed(Outcome::ConnectFailure, None),
            status(200),
        ]);
        assert_eq!(
            run(&p, &Budget::default(), false, &mut script).await,
            Some(200)
        );
        assert_eq!(script.made, 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_that_cannot_be_replayed_is_not_retried() {
        let p = policy(&["5xx"], 2);
        let mut script = Script::of(vec![status(503), status(200)]);
        script.replays = Some(0);
        assert_eq!(
            run(&p, &Budget::default(), true, &mut script).await,
            Some(503)
        );
        assert_eq!(script.made, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_refused_try_stands() {
        let p = policy(&["5xx", "connect-failure"], 2);
        let mut script = Script::of(vec![Try::Refused("RBAC")]);
        let retry = Retry {
            policy: &p,
            budget: &Budget::default(),
            method_allowed: true,
            deadline: None,
        };
        assert!(matches!(
            retry.run(&mut script, || 0).await,
            Try::Refused("RBAC")
        ));
        assert_eq!(script.made, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn the_budget_caps_retries_across_requests() {
        // No floor, 25%: the second request may retry (2 × 0.25 > 0
        // retries), the third may not (3 × 0.25 < 1 retry taken).
        let p = Policy {
            budget_ratio: 0.25,
            budget_min_per_second: 0.0,
            ..policy(&["5xx"], 1)
        };
        let budget = Budget::default();
        let mut first = Script::of(vec![status(200)]);
        run(&p, &budget, true, &mut first).await;
        let mut second = Script::of(vec![status(503), status(200)]);
        assert_eq!(run(&p, &budget, true, &mut second).await, Some(200));
        let mut third = Script::of(vec![status(503)]);
        assert_eq!(run(&p, &budget, true, &mut third).await, Some(503));
        assert_eq!((second.exhausted, third.exhausted), (0, 1));
    }

    #[tokio::test(start_paused = true)]
    async fn the_deadline_ends_retrying_and_shortens_the_wait() {
        let p = Policy {
            backoff_base: Duration::from_secs(10),
            backoff_max: Duration::from_secs(10),
            ..policy(&["5xx"], 5)
        };
        let start = Instant::now();
        let mut script = Script::of(vec![status(503), status(503)]);
        let retry = Retry {
            policy: &p,
            budget: &Budget::default(),
            method_allowed: true,
            deadline: Some(start + Duration::from_millis(300)),
        };
        let got = retry.run(&mut script, || u64::MAX).await;
        assert!(matches!(
            got,
            Try::Answered(Answered(StatusCode::SERVICE_UNAVAILABLE, _))
        ));
        // One wait, cut to the deadline; then no time is left to retry.
        assert_eq!(script.made, 2);
        assert_eq!(start.elapsed(), Duration::from_millis(300));
    }
}

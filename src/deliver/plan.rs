//! The retry and failover policy, as a pure function: given where an alarm
//! stands in its provider chain and how the last attempt went, what happens
//! next. All retry policy lives here (STYLE.md principle 10).
//!
//! - Accepted (2xx, 409): delivered.
//! - Retriable (408, 425, 429, 5xx, timeouts, connection errors): retried
//!   with exponential backoff and jitter, capped at 30 s, never sooner than
//!   the provider's `Retry-After`, until the current provider's failover
//!   deadline: `stored_at + failover_after × (position + 1)`. Then the next
//!   provider is tried, and the earlier one is not tried again.
//! - Rejected (other 4xx, any 3xx): that provider is out for this alarm;
//!   the next one is tried at once.
//! - With the chain exhausted (every deadline passed), every provider that
//!   has not rejected the alarm is retried in turn: an alarm is never
//!   abandoned because a deadline passed. Only when every provider in the
//!   chain rejected it does it become a dead letter.

use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::route::Route;

/// The first retry waits about this long; each further one twice as long.
const BACKOFF_BASE: Duration = Duration::from_millis(250);
/// Backoff never exceeds this (before `Retry-After`).
pub const BACKOFF_CAP: Duration = Duration::from_secs(30);
/// A provider's `Retry-After` is honoured up to this long.
const RETRY_AFTER_CAP: Duration = Duration::from_secs(300);

/// Where an alarm stands in its provider chain (an outbox row).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// Provider ids, primary first. Never empty.
    pub chain: Vec<String>,
    /// Index in `chain` of the provider to try next.
    pub position: usize,
    /// Providers that rejected the alarm permanently.
    pub rejected: Vec<String>,
    /// Every deadline has passed: providers are retried in turn.
    pub exhausted: bool,
    /// Attempts made so far, across providers.
    pub attempts: u32,
    /// Attempts made on the current provider (backoff restarts with each
    /// provider).
    pub provider_attempts: u32,
    /// When the alarm was stored (deadlines count from here).
    pub stored_at: DateTime<Utc>,
    /// Each provider's share of time before the next is tried.
    pub failover_after: Duration,
}

/// How one attempt went, as far as the policy cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttemptOutcome {
    Accepted,
    Retriable { retry_after: Option<Duration> },
    Rejected,
}

/// What happens next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// A provider accepted the alarm.
    Delivered,
    /// Try again at `due_at` with the updated plan.
    Retry { plan: Plan, due_at: DateTime<Utc> },
    /// Every provider in the chain rejected the alarm.
    DeadLetter { plan: Plan },
}

impl Plan {
    /// Where a newly stored alarm stands: at the start of its route's chain.
    pub fn first(route: &Route, stored_at: DateTime<Utc>) -> Plan {
        Plan {
            chain: route.chain.clone(),
            position: 0,
            rejected: Vec::new(),
            exhausted: false,
            attempts: 0,
            provider_attempts: 0,
            stored_at,
            failover_after: route.failover_after,
        }
    }

    /// The provider the next attempt goes to.
    pub fn provider(&self) -> &str {
        self.chain
            .get(self.position)
            .or_else(|| self.chain.first())
            .map_or("", String::as_str)
    }

    /// Whether the next attempt goes to a provider other than the primary.
    pub fn is_fallback(&self) -> bool {
        self.position > 0
    }

    /// Until when the current provider may keep the alarm.
    pub fn deadline(&self) -> DateTime<Utc> {
        let slots = u32::try_from(self.position + 1).unwrap_or(u32::MAX);
        let span = self.failover_after.saturating_mul(slots);
        chrono::Duration::from_std(span)
            .ok()
            .and_then(|d| self.stored_at.checked_add_signed(d))
            .unwrap_or(DateTime::<Utc>::MAX_UTC)
    }

    /// Moves to the next provider when the current one's deadline has passed
    /// before an attempt was even made (the alarm waited in the outbox).
    pub fn at(mut self, now: DateTime<Utc>) -> Plan {
        while !self.exhausted && now >= self.deadline() {
            self.advance();
        }
        self
    }

    /// Decides what follows an attempt that ended at `now`. `jitter` in
    /// [0, 1) spreads retries (0.5–1.0 of the backoff).
    pub fn next(&self, outcome: AttemptOutcome, now: DateTime<Utc>, jitter: f64) -> Decision {
        let mut plan = self.clone();
        plan.attempts = plan.attempts.saturating_add(1);
        plan.provider_attempts = plan.provider_attempts.saturating_add(1);
        match outcome {
            AttemptOutcome::Accepted => Decision::Delivered,
            AttemptOutcome::Rejected => {
                let provider = plan.provider().to_owned();
                if !plan.rejected.contains(&provider) {
                    plan.rejected.push(provider);
                }
                if plan.chain.iter().all(|p| plan.rejected.contains(p)) {
                    return Decision::DeadLetter { plan };
                }
                plan.advance();
                Decision::Retry { plan, due_at: now }
            }
            AttemptOutcome::Retriable { retry_after } => {
                let delay = backoff(plan.provider_attempts, jitter, retry_after);
                let due = add(now, delay);
                if plan.exhausted {
                    plan.advance();
                    return Decision::Retry { plan, due_at: due };
                }
                let deadline = plan.deadline();
                if due >= deadline {
                    // The next try would come after this provider's time is
                    // up: hand the alarm to the next provider at the deadline.
                    plan.advance();
                    Decision::Retry {
                        plan,
                        due_at: deadline.max(now),
                    }
                } else {
                    Decision::Retry { plan, due_at: due }
                }
            }
        }
    }

    /// Moves to the next provider that has not rejected the alarm: along the
    /// chain while deadlines remain, then round the chain in turn.
    fn advance(&mut self) {
        self.provider_attempts = 0;
        let len = self.chain.len();
        if len == 0 {
            return;
        }
        if !self.exhausted {
            if let Some(next) =
                (self.position + 1..len).find(|&i| !self.rejected.contains(&self.chain[i]))
            {
                self.position = next;
                return;
            }
            self.exhausted = true;
        }
        if let Some(next) = (1..=len)
            .map(|step| (self.position + step) % len)
            .find(|&i| !self.rejected.contains(&self.chain[i]))
        {
            self.position = next;
        }
    }
}

/// Exponential backoff with jitter, capped at [`BACKOFF_CAP`], and never
/// shorter than the provider's `Retry-After` (itself capped).
pub fn backoff(attempts: u32, jitter: f64, retry_after: Option<Duration>) -> Duration {
    let exp = attempts.saturating_sub(1).min(16);
    let raw = BACKOFF_BASE.saturating_mul(1 << exp).min(BACKOFF_CAP);
    let jittered = raw.mul_f64(0.5 + 0.5 * jitter.clamp(0.0, 1.0));
    match retry_after {
        Some(ra) => jittered.max(ra.min(RETRY_AFTER_CAP)),
        None => jittered,
    }
}

fn add(t: DateTime<Utc>, d: Duration) -> DateTime<Utc> {
    chrono::Duration::from_std(d)
        .ok()
        .and_then(|d| t.checked_add_signed(d))
        .unwrap_or(DateTime::<Utc>::MAX_UTC)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(secs: i64) -> DateTime<Utc> {
        DateTime::<Utc>::from_timestamp(1_790_000_000 + secs, 0).unwrap()
    }

    fn plan(chain: &[&str]) -> Plan {
        Plan {
            chain: chain.iter().map(|s| s.to_string()).collect(),
            position: 0,
            rejected: vec![],
            exhausted: false,
            attempts: 0,
            provider_attempts: 0,
            stored_at: t(0),
            failover_after: Duration::from_secs(10),
        }
    }

    fn retry(d: Decision) -> (Plan, DateTime<Utc>) {
        match d {
            Decision::Retry { plan, due_at } => (plan, due_at),
            other => panic!("expected a retry, got {other:?}"),
        }
    }

    const BUSY: AttemptOutcome = AttemptOutcome::Retriable { retry_after: None };

    #[test]
    fn accepted_is_delivered() {
        assert_eq!(
            plan(&["a"]).next(AttemptOutcome::Accepted, t(1), 0.5),
            Decision::Delivered
        );
    }

    #[test]
    fn retriable_failures_back_off_within_the_deadline() {
        let (p, due) = retry(plan(&["a", "b"]).next(BUSY, t(1), 0.0));
        assert_eq!(p.provider(), "a");
        assert_eq!(p.attempts, 1);
        assert_eq!(due, t(1) + chrono::Duration::milliseconds(125));
        let (p2, due2) = retry(p.next(BUSY, due, 0.0));
        assert_eq!(p2.provider(), "a");
        assert_eq!(due2 - due, chrono::Duration::milliseconds(250), "doubles");
    }

    #[test]
    fn the_deadline_moves_the_alarm_to_the_fallback_and_not_back() {
        let mut p = plan(&["a", "b"]);
        p.provider_attempts = 6; // the next backoff is several seconds
        let (p, due) = retry(p.next(BUSY, t(9), 0.9));
        assert_eq!(p.provider(), "b", "the next try would pass a's deadline");
        assert_eq!(due, t(10), "handed over at the deadline");
        assert!(p.is_fallback());
        // b fails too; its deadline is stored + 20 s. It is retried until then,
        // then the chain is exhausted and providers are tried in turn.
        let (p, _) = retry(p.next(BUSY, t(10), 0.0));
        assert_eq!(p.provider(), "b");
        let (p, due) = retry(p.next(BUSY, t(25), 0.0));
        assert!(p.exhausted);
        assert_eq!(p.provider(), "a");
        assert!(due >= t(25));
        let (p, _) = retry(p.next(BUSY, t(26), 0.0));
        assert_eq!(p.provider(), "b", "in turn");
    }

    #[test]
    fn a_permanent_rejection_fails_over_at_once() {
        let (p, due) = retry(plan(&["a", "b", "c"]).next(AttemptOutcome::Rejected, t(1), 0.3));
        assert_eq!(p.provider(), "b");
        assert_eq!(due, t(1));
        assert_eq!(p.rejected, ["a"]);
    }

    #[test]
    fn dead_letter_only_when_every_provider_rejected() {
        let (p, _) = retry(plan(&["a", "b"]).next(AttemptOutcome::Rejected, t(1), 0.0));
        // b only times out: never a dead letter, retried on its own in turn.
        let (p, _) = retry(p.next(BUSY, t(40), 0.0));
        assert!(p.exhausted);
        assert_eq!(p.provider(), "b", "a rejected it, so a is skipped");
        let (p, _) = retry(p.next(BUSY, t(41), 0.0));
        assert_eq!(p.provider(), "b");
        match p.next(AttemptOutcome::Rejected, t(42), 0.0) {
            Decision::DeadLetter { plan } => assert_eq!(plan.rejected, ["a", "b"]),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            plan(&["solo"]).next(AttemptOutcome::Rejected, t(1), 0.0),
            Decision::DeadLetter { .. }
        ));
    }

    #[test]
    fn a_plan_that_waited_past_its_deadline_starts_at_the_right_provider() {
        let p = plan(&["a", "b", "c"]).at(t(25));
        assert_eq!(p.provider(), "c");
        let p = plan(&["a"]).at(t(1000));
        assert!(p.exhausted);
        assert_eq!(p.provider(), "a");
    }

    #[test]
    fn backoff_is_capped_jittered_and_honours_retry_after() {
        assert_eq!(backoff(1, 1.0, None), Duration::from_millis(250));
        assert_eq!(backoff(1, 0.0, None), Duration::from_millis(125));
        assert_eq!(backoff(30, 1.0, None), BACKOFF_CAP);
        assert!(backoff(30, 0.0, None) >= BACKOFF_CAP / 2);
        assert_eq!(
            backoff(1, 0.0, Some(Duration::from_secs(7))),
            Duration::from_secs(7)
        );
        assert_eq!(
            backoff(1, 0.0, Some(Duration::from_secs(100_000))),
            Duration::from_secs(300)
        );
    }
}

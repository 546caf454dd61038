//! Conditions that go bad and recover — a store that does not answer, a
//! subscription that keeps dropping — logged once per change of state, not
//! once per occurrence: an outage under load would otherwise write one
//! warning per request.

use crate::ErrorChain;
use std::error::Error;
use std::sync::atomic::{AtomicBool, Ordering};

/// One condition of one component (e.g. "Redis reads of this replica").
///
/// [`fail`](Self::fail) on every occurrence and [`recover`](Self::recover) on
/// every success. The first failure after a success logs a warning with its
/// error, the first success after failures logs at info; every other
/// failure logs at debug. Every failure counts in
/// `condition_failures_total{condition}`, every change of state in
/// `condition_changes_total{condition, state="failing"|"ok"}`.
///
/// Hold one per component instance, not in a static: two instances in one
/// process (tests, or two clients of the same server) have states of their
/// own.
#[derive(Debug)]
pub struct Condition {
    name: &'static str,
    failing_message: &'static str,
    recovered_message: &'static str,
    failing: AtomicBool,
}

impl Condition {
    /// `name` is the metric label (`redis_read`); the messages say what
    /// failing and recovering mean for the service, e.g. "Redis reads fail;
    /// serving from MongoDB" and "Redis reads work again".
    pub const fn new(
        name: &'static str,
        failing_message: &'static str,
        recovered_message: &'static str,
    ) -> Self {
        Self {
            name,
            failing_message,
            recovered_message,
            failing: AtomicBool::new(false),
        }
    }

    /// Records one failure. Returns `true` when it turned the condition bad.
    pub fn fail(&self, err: &(dyn Error + 'static)) -> bool {
        metrics::counter!("condition_failures_total", "condition" => self.name).increment(1);
        if self.failing.swap(true, Ordering::AcqRel) {
            tracing::debug!(condition = self.name, error = %ErrorChain(err), "{}", self.failing_message);
            return false;
        }
        metrics::counter!("condition_changes_total", "condition" => self.name, "state" => "failing")
            .increment(1);
        tracing::warn!(condition = self.name, error = %ErrorChain(err), "{}", self.failing_message);
        true
    }

    /// Records one success. Returns `true` when it ended a failing spell.
    pub fn recover(&self) -> bool {
        // Healthy is the common case: a plain load, no write to a cache line
        // every request shares.
        if !self.failing.load(Ordering::Relaxed) || !self.failing.swap(false, Ordering::AcqRel) {
            return false;
        }
        metrics::counter!("condition_changes_total", "condition" => self.name, "state" => "ok")
            .increment(1);
        tracing::info!(condition = self.name, "{}", self.recovered_message);
        true
    }

    pub fn is_failing(&self) -> bool {
        self.failing.load(Ordering::Relaxed)
    }

    pub fn name(&self) -> &'static str {
        self.name
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use testkit::CapturedLogs;

    #[test]
    fn logs_each_change_of_state_once() {
        let (logs, guard) = CapturedLogs::capture("debug");
        let redis = Condition::new("redis_read", "reads fail", "reads work again");
        let err = std::io::Error::other("connection refused");
        let mut changes = vec![redis.recover()];
        for _ in 0..50 {
            changes.push(redis.fail(&err));
        }
        assert!(redis.is_failing());
        for _ in 0..3 {
            changes.push(redis.recover());
        }
        changes.push(redis.fail(&err));
        changes.push(redis.recover());
        drop(guard);

        // fail, recover, fail, recover: four changes among 56 calls.
        assert_eq!(changes.iter().filter(|c| **c).count(), 4, "{changes:?}");
        assert!(!redis.is_failing());
        let lines = logs.lines();
        assert_eq!(logs.count("WARN", "reads fail"), 2, "{lines:#?}");
        assert_eq!(logs.count("INFO", "reads work again"), 2, "{lines:#?}");
        assert_eq!(logs.count("DEBUG", "reads fail"), 49, "{lines:#?}");
        let warning = lines.iter().find(|l| l.contains("WARN")).unwrap();
        assert!(warning.contains("connection refused"), "{warning}");
        assert!(warning.contains("condition=\"redis_read\""), "{warning}");
    }

    #[test]
    fn conditions_are_independent() {
        let reads = Condition::new("a", "a fails", "a works");
        let writes = Condition::new("b", "b fails", "b works");
        let err = std::io::Error::other("x");
        assert!(reads.fail(&err));
        assert!(writes.fail(&err));
        assert!(reads.recover());
        assert!(writes.is_failing());
    }
}

//! Per-principal rate limits (`RATE_LIMIT_PER_SECOND`, `RATE_LIMIT_BURST`)
//! and global load shedding (`MAX_CONCURRENT_REQUESTS`).

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota};
use std::net::IpAddr;
use std::num::{NonZeroU32, NonZeroUsize};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimitConfig {
    /// Requests per second each principal may make on average.
    pub per_second: NonZeroU32,
    /// How many it may make at once after a quiet spell.
    pub burst: NonZeroU32,
}

/// Whom a rate limit counts: a key, a token's subject, or an anonymous
/// client's address. Kinds never collide (a key named like a subject is
/// another principal).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum RateKey {
    Key(Arc<str>),
    Subject(Arc<str>),
    Ip(IpAddr),
}

/// How often idle principals are forgotten: their state is indistinguishable
/// from a fresh one, and without sweeping every address ever seen would stay
/// in memory.
pub const SWEEP_EVERY: Duration = Duration::from_secs(10);

pub struct RateLimiter {
    limiter: DefaultKeyedRateLimiter<RateKey>,
}

impl RateLimiter {
    pub fn new(config: RateLimitConfig) -> Self {
        let quota = Quota::per_second(config.per_second).allow_burst(config.burst);
        Self {
            limiter: DefaultKeyedRateLimiter::keyed(quota),
        }
    }

    /// Takes one request from `key`'s allowance, or says how long until one
    /// is available.
    pub fn check(&self, key: &RateKey) -> Result<(), Duration> {
        self.limiter
            .check_key(key)
            .map_err(|not_until| not_until.wait_time_from(DefaultClock::default().now()))
    }

    /// Forgets principals whose allowance is full again.
    pub fn sweep(&self) {
        self.limiter.retain_recent();
        self.limiter.shrink_to_fit();
        metrics::gauge!("rate_limit_principals").set(self.limiter.len() as f64);
    }

    pub fn len(&self) -> usize {
        self.limiter.len()
    }

    pub fn is_empty(&self) -> bool {
        self.limiter.is_empty()
    }
}

/// At most `MAX_CONCURRENT_REQUESTS` requests in the service at once; the
/// next is refused at once rather than queued (a queue only turns overload
/// into latency for everyone).
pub struct LoadShedder {
    permits: Arc<Semaphore>,
}

impl LoadShedder {
    pub fn new(max_concurrent: NonZeroUsize) -> Self {
        Self {
            permits: Arc::new(Semaphore::new(
                max_concurrent.get().min(Semaphore::MAX_PERMITS),
            )),
        }
    }

    /// A place for one request, held until it is dropped; `None` when full.
    pub fn try_enter(&self) -> Option<OwnedSemaphorePermit> {
        self.permits.clone().try_acquire_owned().ok()
    }
}

/// A wait as the whole seconds of a `Retry-After` header (at least 1).
pub fn retry_after_secs(wait: Duration) -> u64 {
    (wait.as_secs() + u64::from(wait.subsec_nanos() > 0)).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_principal_gets_its_burst_then_waits() {
        let limiter = RateLimiter::new(RateLimitConfig {
            per_second: NonZeroU32::new(1).unwrap(),
            burst: NonZeroU32::new(3).unwrap(),
        });
        let alice = RateKey::Key("alice".into());
        for _ in 0..3 {
            assert!(limiter.check(&alice).is_ok());
        }
        let wait = limiter.check(&alice).unwrap_err();
        assert!(wait <= Duration::from_secs(1), "{wait:?}");
        assert_eq!(retry_after_secs(wait), 1);
        // Others keep their own allowance; a subject named like a key is another principal.
        assert!(limiter.check(&RateKey::Subject("alice".into())).is_ok());
        assert!(limiter.check(&RateKey::Ip([127, 0, 0, 1].into())).is_ok());
    }

    #[test]
    fn retry_after_rounds_up() {
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1)), 1);
        assert_eq!(retry_after_secs(Duration::from_secs(2)), 2);
        assert_eq!(retry_after_secs(Duration::from_millis(2001)), 3);
    }

    #[test]
    fn shedding_refuses_beyond_the_limit_and_frees_on_drop() {
        let shedder = LoadShedder::new(NonZeroUsize::new(2).unwrap());
        let first = shedder.try_enter().unwrap();
        let _second = shedder.try_enter().unwrap();
        assert!(shedder.try_enter().is_none());
        drop(first);
        assert!(shedder.try_enter().is_some());
    }
}

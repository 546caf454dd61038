//! Whether Redis's eviction policy keeps the guarantees.
//!
//! Fills need their reservation and every change rewrites or removes its
//! key, so eviction of cached entries (documents, tombstones, reservations)
//! never makes a cache wrong. What must not happen is that Redis, full,
//! refuses the invalidator's writes and announcements (`noeviction`): then
//! changes stop reaching the caches. And a policy that evicts any key
//! (`allkeys-*`) can take the invalidators' own keys — the lease, the saved
//! position, the invalidation stream — which is safe (fencing, a fresh start
//! with a flush, replicas flush) but costs a flush each time. `volatile-*`
//! evicts only keys with a TTL, which every cached entry has and no control
//! key does.

use crate::redis_tier::{RedisTier, TierError};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// What the eviction policy means for the guarantees.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EvictionVerdict {
    /// No memory limit: nothing is evicted.
    Unbounded,
    /// A limit that evicts only keys with a TTL.
    Safe { policy: String },
    /// May evict the invalidators' keys: every such eviction costs a flush.
    EvictsControlKeys { policy: String },
    /// Once full, refuses writes: changes stop reaching the caches.
    RefusesWritesWhenFull { policy: String },
}

impl EvictionVerdict {
    /// Judges `maxmemory` (bytes; 0 = no limit) with `maxmemory-policy`.
    pub fn of(maxmemory: u64, policy: &str) -> Self {
        let policy = policy.to_owned();
        match policy.as_str() {
            _ if maxmemory == 0 => Self::Unbounded,
            "noeviction" => Self::RefusesWritesWhenFull { policy },
            p if p.starts_with("allkeys-") => Self::EvictsControlKeys { policy },
            _ => Self::Safe { policy },
        }
    }
}

impl RedisTier {
    /// The server's eviction policy, judged (`INFO memory`, which managed
    /// services allow where `CONFIG GET` is refused).
    pub async fn eviction_verdict(&self) -> Result<EvictionVerdict, TierError> {
        let info = self.info_memory().await?;
        let field = |name: &str| {
            info.lines()
                .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))
                .map(str::trim)
        };
        let maxmemory = field("maxmemory").and_then(|v| v.parse().ok()).unwrap_or(0);
        let policy = field("maxmemory_policy").unwrap_or("noeviction");
        Ok(EvictionVerdict::of(maxmemory, policy))
    }
}

/// Reads the eviction policy once Redis answers (it may be down at start)
/// and says once what it means: an error for a policy that breaks the
/// guarantees, a warning for one that costs flushes. Exposed as the gauge
/// `redis_eviction_policy_safe` (1 safe, 0 not).
pub async fn report_eviction_policy(redis: RedisTier, shutdown: CancellationToken) {
    loop {
        match redis.eviction_verdict().await {
            Ok(verdict) => {
                let safe = matches!(
                    verdict,
                    EvictionVerdict::Safe { .. } | EvictionVerdict::Unbounded
                );
                metrics::gauge!("redis_eviction_policy_safe").set(if safe { 1.0 } else { 0.0 });
                match verdict {
                    EvictionVerdict::Unbounded => {
                        tracing::info!("Redis has no memory limit: it evicts nothing");
                    }
                    EvictionVerdict::Safe { policy } => {
                        tracing::info!(%policy, "Redis eviction policy keeps the cache's guarantees");
                    }
                    EvictionVerdict::EvictsControlKeys { policy } => tracing::warn!(
                        %policy,
                        "Redis may evict the invalidators' keys (lease, saved position, stream); each such eviction flushes every cache — use volatile-lru or volatile-lfu"
                    ),
                    EvictionVerdict::RefusesWritesWhenFull { policy } => tracing::error!(
                        %policy,
                        "Redis refuses writes when full: changes then stop reaching the caches, which may stay wrong until it has room — use volatile-lru or volatile-lfu"
                    ),
                }
                return;
            }
            Err(_) => {
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep(Duration::from_secs(5)) => {}
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policies_are_judged_by_what_they_may_evict() {
        assert_eq!(
            EvictionVerdict::of(0, "noeviction"),
            EvictionVerdict::Unbounded
        );
        assert!(matches!(
            EvictionVerdict::of(1 << 20, "noeviction"),
            EvictionVerdict::RefusesWritesWhenFull { .. }
        ));
        assert!(matches!(
            EvictionVerdict::of(1 << 20, "allkeys-lru"),
            EvictionVerdict::EvictsControlKeys { .. }
        ));
        for policy in [
            "volatile-lru",
            "volatile-lfu",
            "volatile-ttl",
            "volatile-random",
        ] {
            assert!(matches!(
                EvictionVerdict::of(1 << 20, policy),
                EvictionVerdict::Safe { .. }
            ));
        }
    }
}

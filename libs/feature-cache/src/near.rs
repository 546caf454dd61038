use crate::entry::Entry;
use crate::tier::{CacheTier, TierError};
use moka::notification::RemovalCause;
use moka::ops::compute::Op;
use moka::sync::Cache;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// How big the near cache may grow and how long an entry may stay.
#[derive(Debug, Clone, Copy)]
pub struct NearCacheConfig {
    pub max_entries: u64,
    pub ttl: Duration,
}

/// The in-process near cache: bounded by entries and a short TTL, guarded by
/// version like every tier.
///
/// Its epoch advances on every flush; a fill that began before a flush carries
/// the old epoch and is refused, so a flush cannot be undone by a slow reader.
pub struct NearCache {
    // foldhash: keys are hashed on every hit, and SipHash (the default) was a
    // measurable share of a hit; foldhash is seeded per process, too.
    entries: Cache<String, Entry, foldhash::fast::RandomState>,
    epoch: AtomicU64,
}

impl NearCache {
    pub fn new(config: &NearCacheConfig) -> Self {
        let entries = Cache::builder()
            .max_capacity(config.max_entries)
            .time_to_live(config.ttl)
            .eviction_listener(|_key, _value, cause| {
                let cause = match cause {
                    RemovalCause::Expired => "expired",
                    RemovalCause::Size => "size",
                    RemovalCause::Explicit => "explicit",
                    RemovalCause::Replaced => return,
                };
                metrics::counter!("near_cache_evictions_total", "cause" => cause).increment(1);
            })
            .build_with_hasher(foldhash::fast::RandomState::default());
        Self {
            entries,
            epoch: AtomicU64::new(0),
        }
    }

    /// The hot path: a synchronous lookup.
    pub fn get(&self, customer_id: &str) -> Option<Entry> {
        self.entries.get(customer_id)
    }

    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    /// Offers an entry read while the cache was at `epoch`.
    pub fn offer_at(&self, entry: Entry, epoch: u64) -> bool {
        if self.epoch() != epoch {
            return false;
        }
        let key = entry.customer_id().to_owned();
        let result = self
            .entries
            .entry(key.clone())
            .and_compute_with(|current| match current {
                Some(current) if !entry.supersedes(current.value()) => Op::Nop,
                _ => Op::Put(entry),
            });
        let stored = matches!(
            result,
            moka::ops::compute::CompResult::Inserted(_)
                | moka::ops::compute::CompResult::ReplacedWith(_)
        );
        if !stored {
            metrics::counter!("version_guard_rejections_total", "tier" => "local").increment(1);
        }
        // A flush that raced the compute above wins: drop what we just put.
        if stored && self.epoch() != epoch {
            self.entries.invalidate(&key);
            return false;
        }
        stored
    }

    pub fn offer(&self, entry: Entry) -> bool {
        self.offer_at(entry, self.epoch())
    }

    /// Drops everything and refuses fills that started before now.
    pub fn flush(&self) {
        self.epoch.fetch_add(1, Ordering::AcqRel);
        self.entries.invalidate_all();
    }

    pub fn len(&self) -> u64 {
        self.entries.run_pending_tasks();
        self.entries.entry_count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl CacheTier for NearCache {
    async fn lookup(&self, customer_id: &str) -> Result<Option<Entry>, TierError> {
        Ok(self.get(customer_id))
    }

    async fn offer(&self, entry: Entry) -> Result<bool, TierError> {
        Ok(NearCache::offer(self, entry))
    }
}

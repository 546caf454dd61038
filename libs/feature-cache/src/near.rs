use crate::entry::Entry;
use crate::tier::{CacheTier, TierError};
use moka::Expiry;
use moka::notification::RemovalCause;
use moka::ops::compute::{CompResult, Op};
use moka::sync::Cache;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// Invalidation counters the keys are spread over: enough that an
/// invalidation rarely refuses an unrelated fill, few enough to stay small.
const STRIPES: usize = 4096;

/// How big the near cache may grow and how long an entry may stay.
#[derive(Debug, Clone, Copy)]
pub struct NearCacheConfig {
    pub max_entries: u64,
    /// What the entries may weigh together ([`weight`]).
    pub max_bytes: u64,
    pub ttl: Duration,
    /// How long a cached absence may stay (never longer than `ttl`).
    pub negative_ttl: Duration,
}

/// Each entry lives `ttl` from when it was stored (a replacement starts
/// again); an absence at most `negative_ttl`.
struct Lifetimes {
    ttl: Duration,
    negative_ttl: Duration,
}

impl Lifetimes {
    fn of(&self, entry: &Entry) -> Duration {
        match entry {
            Entry::Absent { .. } => self.negative_ttl.min(self.ttl),
            _ => self.ttl,
        }
    }
}

impl Expiry<String, Entry> for Lifetimes {
    fn expire_after_create(&self, _key: &String, entry: &Entry, _at: Instant) -> Option<Duration> {
        Some(self.of(entry))
    }

    fn expire_after_update(
        &self,
        _key: &String,
        entry: &Entry,
        _at: Instant,
        _left: Option<Duration>,
    ) -> Option<Duration> {
        Some(self.of(entry))
    }
}

/// Bytes an entry costs beyond its key and JSON: the map slot, the `Arc`,
/// moka's bookkeeping; roughly, and on the generous side.
const ENTRY_OVERHEAD: u64 = 160;

/// What one entry weighs: its key, its rendered JSON and the overhead.
pub fn weight(key: &str, entry: &Entry) -> u64 {
    let body = match entry {
        Entry::Document(doc) => doc.json.get().len() + doc.customer_id.len(),
        Entry::Floor { customer_id, .. }
        | Entry::Tombstone { customer_id, .. }
        | Entry::Absent { customer_id, .. } => customer_id.len(),
    };
    (key.len() + body) as u64 + ENTRY_OVERHEAD
}

/// The in-process near cache: bounded by entries, by bytes and a short TTL,
/// guarded by version like every tier.
///
/// moka bounds one measure, so both bounds become one: the cache holds
/// `max_bytes` of weight, and each entry weighs at least
/// `max_bytes / max_entries`, so neither more entries nor more bytes fit.
///
/// A fill is accepted only if nothing invalidated its key since the fill
/// began: a flush advances the epoch; each key's invalidations advance a
/// counter, and each ordered change (one whose version orders it) raises a
/// version floor, of one of [`STRIPES`] stripes by hash. A fill carries the
/// [`Ticket`] it took before it read anything, and is refused if the epoch
/// or its stripe's counter moved, or its stripe's floor rose above the
/// fill's version. The stripes live outside the cache, so no eviction can
/// make the cache forget an invalidation a slow fill missed; keys sharing a
/// stripe only ever cost a refused fill.
pub struct NearCache {
    // foldhash: keys are hashed on every hit, and SipHash (the default) was a
    // measurable share of a hit; foldhash is seeded per process, too.
    entries: Cache<String, Entry, foldhash::fast::RandomState>,
    hasher: foldhash::fast::RandomState,
    epoch: AtomicU64,
    stripes: Box<[Stripe]>,
    /// How many flushes there were, for whoever refills after one.
    flushes: watch::Sender<u64>,
}

#[derive(Default)]
struct Stripe {
    /// Invalidations whose version does not order them.
    unordered: AtomicU64,
    /// The highest version of an ordered change seen.
    floor: AtomicI64,
}

/// Where the near cache stood for one key when a fill began.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ticket {
    epoch: u64,
    stripe: usize,
    unordered: u64,
    floor: i64,
}

impl NearCache {
    pub fn new(config: &NearCacheConfig) -> Self {
        let hasher = foldhash::fast::RandomState::default();
        let min_weight = (config.max_bytes / config.max_entries.max(1)).max(1);
        let entries = Cache::builder()
            .max_capacity(config.max_bytes)
            .weigher(move |key: &String, entry: &Entry| {
                u32::try_from(weight(key, entry).max(min_weight)).unwrap_or(u32::MAX)
            })
            .expire_after(Lifetimes {
                ttl: config.ttl,
                negative_ttl: config.negative_ttl,
            })
            .eviction_listener(|_key, _value, cause| {
                let cause = match cause {
                    RemovalCause::Expired => "expired",
                    RemovalCause::Size => "size",
                    RemovalCause::Explicit => "explicit",
                    RemovalCause::Replaced => return,
                };
                metrics::counter!("near_cache_evictions_total", "cause" => cause).increment(1);
            })
            .build_with_hasher(hasher.clone());
        Self {
            entries,
            hasher,
            epoch: AtomicU64::new(0),
            stripes: (0..STRIPES).map(|_| Stripe::default()).collect(),
            flushes: watch::Sender::new(0),
        }
    }

    /// The hot path: a synchronous lookup.
    pub fn get(&self, customer_id: &str) -> Option<Entry> {
        self.entries.get(customer_id)
    }

    /// Takes a ticket for a fill of `customer_id` that is about to read the
    /// tiers below.
    pub fn ticket(&self, customer_id: &str) -> Ticket {
        let index = self.stripe_of(customer_id);
        let stripe = &self.stripes[index];
        Ticket {
            epoch: self.epoch.load(Ordering::Acquire),
            stripe: index,
            unordered: stripe.unordered.load(Ordering::Acquire),
            floor: stripe.floor.load(Ordering::Acquire),
        }
    }

    /// Offers an entry read under `ticket`: refused if the key was
    /// invalidated or the cache flushed since, or if the guard refuses.
    pub fn offer_with(&self, entry: Entry, ticket: Ticket) -> bool {
        let version = entry.version();
        if !self.still_valid(ticket, version) {
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
            CompResult::Inserted(_) | CompResult::ReplacedWith(_)
        );
        if !stored {
            metrics::counter!("version_guard_rejections_total", "tier" => "local").increment(1);
        }
        // An invalidation that raced the compute above wins: drop what we put.
        if stored && !self.still_valid(ticket, version) {
            self.entries.invalidate(&key);
            return false;
        }
        stored
    }

    /// Offers an entry read just now (under a fresh ticket).
    pub fn offer(&self, entry: Entry) -> bool {
        let ticket = self.ticket(entry.customer_id());
        self.offer_with(entry, ticket)
    }

    /// After an ordered change to `version`: a copy at that version or newer
    /// stays; anything else is dropped (and fills that began before are
    /// refused).
    pub fn settle(&self, customer_id: &str, version: i64) {
        self.stripes[self.stripe_of(customer_id)]
            .floor
            .fetch_max(version, Ordering::AcqRel);
        if let Some(Entry::Document(doc)) = self.entries.get(customer_id)
            && doc.version >= version
        {
            return;
        }
        self.entries.invalidate(customer_id);
    }

    /// Drops the key and refuses every fill of it that began before now.
    pub fn invalidate(&self, customer_id: &str) {
        self.stripes[self.stripe_of(customer_id)]
            .unordered
            .fetch_add(1, Ordering::AcqRel);
        self.entries.invalidate(customer_id);
    }

    /// Drops everything and refuses every fill that began before now.
    pub fn flush(&self) {
        self.epoch.fetch_add(1, Ordering::AcqRel);
        self.entries.invalidate_all();
        self.flushes.send_modify(|flushes| *flushes += 1);
    }

    /// Follows the flushes: the value is how many there were, and it
    /// changes after each (once the cache is empty).
    pub fn flushes(&self) -> watch::Receiver<u64> {
        self.flushes.subscribe()
    }

    pub fn len(&self) -> u64 {
        self.entries.run_pending_tasks();
        self.entries.entry_count()
    }

    /// What the entries weigh together (at least [`weight`] each), after
    /// pending evictions ran.
    pub fn weighted_size(&self) -> u64 {
        self.entries.run_pending_tasks();
        self.entries.weighted_size()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether a fill of `version` under `ticket` may still be taken.
    fn still_valid(&self, ticket: Ticket, version: i64) -> bool {
        let stripe = &self.stripes[ticket.stripe];
        let floor = stripe.floor.load(Ordering::Acquire);
        self.epoch.load(Ordering::Acquire) == ticket.epoch
            && stripe.unordered.load(Ordering::Acquire) == ticket.unordered
            && (floor == ticket.floor || floor <= version)
    }

    fn stripe_of(&self, customer_id: &str) -> usize {
        // The modulo keeps the index in range whatever the hash.
        (self.hasher.hash_one(customer_id) % STRIPES as u64) as usize
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::entry::CachedDocument;
    use std::sync::Arc;

    fn document(id: &str, bytes: usize) -> Entry {
        let json = format!(r#"{{"customer_id":"{id}","blob":"{}"}}"#, "x".repeat(bytes));
        Entry::Document(Arc::new(CachedDocument {
            customer_id: id.to_owned(),
            version: 1,
            expires_at: None,
            json: serde_json::value::RawValue::from_string(json).unwrap(),
        }))
    }

    /// Filled far past its bound in bytes, the near cache evicts: what it
    /// holds weighs at most the bound, and the newest entries are there.
    #[test]
    fn the_near_cache_stays_within_its_bound_in_bytes() {
        let max_bytes = 50_000;
        let near = NearCache::new(&NearCacheConfig {
            max_entries: 100_000,
            max_bytes,
            ttl: Duration::from_secs(600),
            negative_ttl: Duration::from_secs(5),
        });
        let ids: Vec<String> = (0..200).map(|i| format!("C{i}")).collect();
        for id in &ids {
            assert!(near.offer(document(id, 2_000)));
        }
        let weighed = near.weighted_size();
        assert!(weighed <= max_bytes, "{weighed} > {max_bytes}");
        let held = near.len();
        assert!(held > 0 && held < 200, "{held} entries held");
        // Each entry weighs its JSON, its key and the overhead.
        let one = weight("C1", &document("C1", 2_000));
        assert!(one > 2_000);
        assert!(held * one <= max_bytes, "{held} × {one}");
    }

    /// The entry bound still holds: small entries weigh at least
    /// `max_bytes / max_entries` each.
    #[test]
    fn the_entry_bound_still_holds_for_small_entries() {
        let near = NearCache::new(&NearCacheConfig {
            max_entries: 10,
            max_bytes: 1 << 30,
            ttl: Duration::from_secs(600),
            negative_ttl: Duration::from_secs(5),
        });
        for i in 0..100 {
            near.offer(document(&format!("S{i}"), 1));
        }
        assert!(near.len() <= 10, "{} entries", near.len());
    }

    /// An absence leaves after the negative TTL; a document stays its TTL.
    #[test]
    fn an_absence_lives_the_negative_ttl() {
        let near = NearCache::new(&NearCacheConfig {
            max_entries: 100,
            max_bytes: 1 << 20,
            ttl: Duration::from_secs(600),
            negative_ttl: Duration::from_millis(50),
        });
        assert!(near.offer(Entry::absent("GONE", -1)));
        assert!(near.offer(document("HERE", 10)));
        assert!(matches!(near.get("GONE"), Some(Entry::Absent { .. })));
        std::thread::sleep(Duration::from_millis(120));
        assert!(near.get("GONE").is_none());
        assert!(near.get("HERE").is_some());
        // A document replacing an absence gets the document's TTL.
        assert!(near.offer(Entry::absent("LATER", -1)));
        assert!(near.offer(document("LATER", 10)));
        std::thread::sleep(Duration::from_millis(120));
        assert!(near.get("LATER").is_some());
    }
}

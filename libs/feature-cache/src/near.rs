use crate::entry::{CachedDocument, Entry};
use crate::tier::{CacheTier, TierError};
use quick_cache::sync::{Cache, EntryAction, EntryResult};
use quick_cache::{DefaultHashBuilder, Lifecycle, OptionsBuilder, Weighter};
use std::hash::BuildHasher;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// Invalidation counters the keys are spread over: enough that an
/// invalidation rarely refuses an unrelated fill, few enough to stay small.
const STRIPES: usize = 4096;

/// How often at most expired entries are swept out for the count.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

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

/// Bytes an entry costs beyond its key and JSON: the cache's slot and
/// table, the document's `Arc` and allocator rounding; roughly, and on the
/// generous side (BENCHMARKS.md measures it).
const ENTRY_OVERHEAD: u64 = 128;

/// What one entry weighs: its key, its rendered JSON and the overhead.
pub fn weight(key: &str, entry: &Entry) -> u64 {
    let body = match entry {
        Entry::Document(doc) => document_bytes(doc),
        marker => marker.customer_id().len(),
    };
    weigh(key, body)
}

fn weigh(key: &str, body: usize) -> u64 {
    (key.len() + body) as u64 + ENTRY_OVERHEAD
}

fn document_bytes(doc: &CachedDocument) -> usize {
    doc.json_bytes().len() + doc.customer_id().len()
}

/// What the near cache keeps for one key, in three words: documents
/// (nearly every entry) as their shared allocation, the small markers behind
/// an `Arc` of their own, and when the entry leaves.
#[derive(Clone)]
struct Held {
    stored: Stored,
    /// Nanoseconds after the cache's `born`.
    deadline: u64,
}

impl Held {
    fn is_expired(&self, now: u64) -> bool {
        self.deadline <= now
    }
}

#[derive(Clone)]
enum Stored {
    Document(CachedDocument),
    Marker(Arc<Entry>),
}

impl Stored {
    fn new(entry: Entry) -> Self {
        match entry {
            Entry::Document(doc) => Self::Document(doc),
            marker => Self::Marker(Arc::new(marker)),
        }
    }

    fn entry(&self) -> Entry {
        match self {
            Self::Document(doc) => Entry::Document(doc.clone()),
            Self::Marker(marker) => Entry::clone(marker),
        }
    }

    fn into_entry(self) -> Entry {
        match self {
            Self::Document(doc) => Entry::Document(doc),
            Self::Marker(marker) => Arc::unwrap_or_clone(marker),
        }
    }

    fn is_of(&self, customer_id: &str) -> bool {
        match self {
            Self::Document(doc) => doc.is_of(customer_id),
            Self::Marker(marker) => marker.customer_id() == customer_id,
        }
    }
}

/// Weighs each entry by [`weight`], at least `min`.
#[derive(Clone)]
struct Weigh {
    min: u64,
}

impl Weighter<u64, Held> for Weigh {
    fn weight(&self, _key: &u64, held: &Held) -> u64 {
        let weight = match &held.stored {
            Stored::Document(doc) => weigh(doc.customer_id(), document_bytes(doc)),
            Stored::Marker(marker) => weight(marker.customer_id(), marker),
        };
        weight.max(self.min)
    }
}

/// Counts the entries evicted for room.
#[derive(Clone)]
struct CountEvictions;

impl Lifecycle<u64, Held> for CountEvictions {
    type RequestState = ();

    fn on_evict(&self, _state: &mut (), _key: u64, _held: Held) {
        record_evictions("size", 1);
    }
}

fn record_evictions(cause: &'static str, count: u64) {
    metrics::counter!("near_cache_evictions_total", "cause" => cause).increment(count);
}

type Entries = Cache<u64, Held, Weigh, DefaultHashBuilder, CountEvictions>;

/// The in-process near cache: bounded by entries, by bytes and a short TTL,
/// guarded by version like every tier.
///
/// The table (quick_cache) bounds one measure, so both bounds become one:
/// it holds `max_bytes` of weight, and each entry weighs at least
/// `max_bytes / max_entries`, so neither more entries nor more bytes fit.
///
/// Entries are keyed by the 64-bit hash of the customer id, not the id:
/// the id is in the entry already, and storing it twice was a tenth of an
/// entry. Every read checks the id, so two ids sharing a hash (about one in
/// 10^13 pairs) cost each other misses, never a wrong answer.
///
/// Each entry carries its deadline and is never served past it; an
/// expired entry is dropped when read and makes room like any cold one.
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
    entries: Entries,
    // foldhash: keys are hashed on every hit, and SipHash (the default) was a
    // measurable share of a hit; foldhash is seeded per process, too.
    hasher: foldhash::fast::RandomState,
    born: Instant,
    ttl: u64,
    negative_ttl: u64,
    /// When expired entries were last swept out (ns after `born`), and how
    /// often at most: a sweep scans every shard under its write lock.
    last_sweep: AtomicU64,
    sweep_every: u64,
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
        let max_entries = config.max_entries.max(1);
        let min_weight = (config.max_bytes / max_entries).max(1);
        // The table is sized for the bound up front: a full cache never
        // regrows it, and pages not yet used cost no memory.
        let options = OptionsBuilder::new()
            .estimated_items_capacity(usize::try_from(max_entries).unwrap_or(usize::MAX))
            .weight_capacity(config.max_bytes.max(1))
            .build();
        let entries = match options {
            Ok(options) => Cache::with_options(
                options,
                Weigh { min: min_weight },
                DefaultHashBuilder::default(),
                CountEvictions,
            ),
            // Only a hot or ghost share out of range is refused, and we set
            // neither; keep a cache of the same bounds all the same.
            Err(_) => Cache::with(
                usize::try_from(max_entries).unwrap_or(usize::MAX),
                config.max_bytes.max(1),
                Weigh { min: min_weight },
                DefaultHashBuilder::default(),
                CountEvictions,
            ),
        };
        let nanos = |d: Duration| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        let negative_ttl = config.negative_ttl.min(config.ttl);
        Self {
            entries,
            hasher: foldhash::fast::RandomState::default(),
            born: Instant::now(),
            ttl: nanos(config.ttl),
            negative_ttl: nanos(negative_ttl),
            last_sweep: AtomicU64::new(0),
            sweep_every: nanos(negative_ttl.min(SWEEP_EVERY)),
            epoch: AtomicU64::new(0),
            stripes: (0..STRIPES).map(|_| Stripe::default()).collect(),
            flushes: watch::Sender::new(0),
        }
    }

    /// The hot path: a synchronous lookup.
    pub fn get(&self, customer_id: &str) -> Option<Entry> {
        let key = self.key_of(customer_id);
        let held = self.entries.get(&key)?;
        if !held.stored.is_of(customer_id) {
            return None;
        }
        let now = self.now();
        if held.is_expired(now) {
            self.drop_expired(key, now);
            return None;
        }
        Some(held.stored.into_entry())
    }

    /// Takes a ticket for a fill of `customer_id` that is about to read the
    /// tiers below.
    pub fn ticket(&self, customer_id: &str) -> Ticket {
        let index = self.stripe_of(self.key_of(customer_id));
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
        let key = self.key_of(entry.customer_id());
        let now = self.now();
        let lifetime = match entry {
            Entry::Absent { .. } => self.negative_ttl,
            _ => self.ttl,
        };
        // What is held yields if it is another id's, expired, or older.
        let yields = |current: &Held| {
            !current.stored.is_of(entry.customer_id())
                || current.is_expired(now)
                || entry.supersedes(&current.stored.entry())
        };
        let mut offered = Some(Held {
            stored: Stored::new(entry.clone()),
            deadline: now.saturating_add(lifetime),
        });
        let stored = match self
            .entries
            .entry(&key, None, |_, current| match offered.take() {
                Some(held) if yields(current) => {
                    *current = held;
                    EntryAction::Retain(true)
                }
                _ => EntryAction::Retain(false),
            }) {
            EntryResult::Retained(stored) => stored,
            EntryResult::Vacant(slot) => match offered.take() {
                Some(held) => slot.insert(held).is_ok(),
                None => false,
            },
            // Our callback neither removes nor asks to replace; nothing
            // was stored.
            _ => false,
        };
        if !stored {
            metrics::counter!("version_guard_rejections_total", "tier" => "local").increment(1);
        }
        // An invalidation that raced the store above wins: drop what we put.
        if stored && !self.still_valid(ticket, version) {
            self.entries.remove(&key);
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
        let key = self.key_of(customer_id);
        self.stripes[self.stripe_of(key)]
            .floor
            .fetch_max(version, Ordering::AcqRel);
        let stays = |held: &Held| {
            matches!(&held.stored, Stored::Document(doc)
                if doc.is_of(customer_id) && doc.version() >= version)
        };
        if self.entries.remove_if(&key, |held| !stays(held)).is_some() {
            record_evictions("explicit", 1);
        }
    }

    /// Drops the key and refuses every fill of it that began before now.
    pub fn invalidate(&self, customer_id: &str) {
        let key = self.key_of(customer_id);
        self.stripes[self.stripe_of(key)]
            .unordered
            .fetch_add(1, Ordering::AcqRel);
        if self.entries.remove(&key).is_some() {
            record_evictions("explicit", 1);
        }
    }

    /// Drops everything and refuses every fill that began before now.
    pub fn flush(&self) {
        self.epoch.fetch_add(1, Ordering::AcqRel);
        let held = self.entries.len() as u64;
        self.entries.clear();
        record_evictions("explicit", held);
        self.flushes.send_modify(|flushes| *flushes += 1);
    }

    /// Follows the flushes: the value is how many there were, and it
    /// changes after each (once the cache is empty).
    pub fn flushes(&self) -> watch::Receiver<u64> {
        self.flushes.subscribe()
    }

    /// How many entries are held; expired ones leave the count within
    /// [`SWEEP_EVERY`] (or the negative TTL, if shorter).
    pub fn len(&self) -> u64 {
        self.drop_all_expired();
        self.entries.len() as u64
    }

    /// What the entries weigh together (at least [`weight`] each); expired
    /// ones leave it as they leave [`NearCache::len`].
    pub fn weighted_size(&self) -> u64 {
        self.drop_all_expired();
        self.entries.weight()
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

    fn key_of(&self, customer_id: &str) -> u64 {
        self.hasher.hash_one(customer_id)
    }

    fn stripe_of(&self, key: u64) -> usize {
        // The modulo keeps the index in range whatever the hash.
        (key % STRIPES as u64) as usize
    }

    fn now(&self) -> u64 {
        u64::try_from(self.born.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    fn drop_expired(&self, key: u64, now: u64) {
        if self
            .entries
            .remove_if(&key, |held| held.is_expired(now))
            .is_some()
        {
            record_evictions("expired", 1);
        }
    }

    /// Sweeps expired entries out, unless a sweep ran within `sweep_every`
    /// (the metrics scrape and the heartbeat both ask for the count).
    fn drop_all_expired(&self) {
        let now = self.now();
        let last = self.last_sweep.load(Ordering::Acquire);
        if now.saturating_sub(last) < self.sweep_every
            || self
                .last_sweep
                .compare_exchange(last, now, Ordering::AcqRel, Ordering::Acquire)
                .is_err()
        {
            return;
        }
        let before = self.entries.len();
        self.entries.retain(|_, held| !held.is_expired(now));
        let dropped = before.saturating_sub(self.entries.len()) as u64;
        if dropped > 0 {
            record_evictions("expired", dropped);
        }
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

    /// A near cache bounded as given, whose entries outlive the test.
    fn bounded(max_entries: u64, max_bytes: u64) -> NearCache {
        NearCache::new(&NearCacheConfig {
            max_entries,
            max_bytes,
            ttl: Duration::from_secs(600),
            negative_ttl: Duration::from_secs(5),
        })
    }

    /// A roomy near cache with the given lifetimes.
    fn lasting(ttl: Duration, negative_ttl: Duration) -> NearCache {
        NearCache::new(&NearCacheConfig {
            max_entries: 100,
            max_bytes: 1 << 20,
            ttl,
            negative_ttl,
        })
    }

    fn document(id: &str, bytes: usize) -> Entry {
        let json = format!(r#"{{"customer_id":"{id}","blob":"{}"}}"#, "x".repeat(bytes));
        Entry::Document(CachedDocument::new(id, 1, None, &json))
    }

    /// Filled far past its bound in bytes, the near cache evicts: what it
    /// holds weighs at most the bound, and the newest entries are there.
    #[test]
    fn the_near_cache_stays_within_its_bound_in_bytes() {
        let max_bytes = 50_000;
        let near = bounded(100_000, max_bytes);
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
        let near = bounded(10, 1 << 30);
        for i in 0..100 {
            near.offer(document(&format!("S{i}"), 1));
        }
        assert!(near.len() <= 10, "{} entries", near.len());
    }

    /// An entry is served only for its own id: one stored under another
    /// id's key (as a hash collision would) reads as a miss, and an offer
    /// for the right id replaces it.
    #[test]
    fn an_entry_under_another_ids_key_is_never_served() {
        let near = lasting(Duration::from_secs(600), Duration::from_secs(5));
        let intruder = Held {
            stored: Stored::new(document("OTHER", 10)),
            deadline: u64::MAX,
        };
        near.entries.insert(near.key_of("MINE"), intruder);
        assert!(near.get("MINE").is_none());
        assert!(near.offer(document("MINE", 10)));
        assert_eq!(
            near.get("MINE").map(|e| e.customer_id().to_owned()),
            Some("MINE".into())
        );
    }

    /// Expired entries are not counted, and what they weighed is freed.
    #[test]
    fn expired_entries_leave_the_count_and_the_weight() {
        let near = lasting(Duration::from_millis(50), Duration::from_millis(50));
        for i in 0..10 {
            assert!(near.offer(document(&format!("E{i}"), 10)));
        }
        assert_eq!(near.len(), 10);
        std::thread::sleep(Duration::from_millis(120));
        assert_eq!(near.len(), 0);
        assert_eq!(near.weighted_size(), 0);
    }

    /// A newer version replaces an older one; an older offer is refused.
    #[test]
    fn the_guard_holds_in_the_near_cache() {
        let near = lasting(Duration::from_secs(600), Duration::from_secs(5));
        let at = |version: i64| {
            let json = format!(r#"{{"version":{version}}}"#);
            Entry::Document(CachedDocument::new("G", version, None, &json))
        };
        assert!(near.offer(at(2)));
        assert!(!near.offer(at(1)));
        assert!(!near.offer(at(2)));
        assert_eq!(near.get("G").map(|e| e.version()), Some(2));
        assert!(near.offer(Entry::tombstone("G", 2)));
        assert!(!near.offer(at(2)));
        assert!(near.offer(at(3)));
        near.settle("G", 4);
        assert!(near.get("G").is_none());
    }

    /// An absence leaves after the negative TTL; a document stays its TTL.
    #[test]
    fn an_absence_lives_the_negative_ttl() {
        let near = lasting(Duration::from_secs(600), Duration::from_millis(50));
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

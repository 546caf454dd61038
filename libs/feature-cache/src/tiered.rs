use crate::coalesce::{Coalescer, Role};
use crate::entry::{CachedDocument, Entry};
use crate::hot::HotRecorder;
use crate::lease::{Waited, wait_for_fill};
use crate::near::{NearCache, Ticket};
use crate::redis_tier::{Offer, RedisTier, Reservation, ReserveFor, Writer};
use crate::refresh::RefreshAhead;
use chrono::Utc;
use feature_store::{CustomerId, FeatureDocument, FeatureStore, FeatureWrite, StoreError};
use metrics::{Counter, counter};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use telemetry::Condition;
use tracing::Instrument;

/// The tier that answered a read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Local,
    Redis,
    Mongodb,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Local => "local",
            Self::Redis => "redis",
            Self::Mongodb => "mongodb",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Lookup {
    pub document: CachedDocument,
    pub source: Source,
}

/// The result of a write: the stored document, rendered once.
#[derive(Debug, Clone)]
pub struct WriteOutcome {
    pub document: CachedDocument,
    pub created: bool,
}

/// How the read path spares MongoDB beyond caching documents (absences are
/// cached as the tiers' TTL policy says: `TtlPolicy::negative_ttl` and
/// `NearCacheConfig::negative_ttl`).
#[derive(Debug, Clone, Copy, Default)]
pub struct ReadPolicy {
    /// How long a miss waits for another replica's load of the same key
    /// (its reservation in Redis) before it reads MongoDB itself; zero: it
    /// does not wait.
    pub miss_lease_wait: Duration,
    /// A document read from Redis in this last fraction of its TTL is
    /// refreshed in the background; zero: never.
    pub refresh_ahead_fraction: f64,
}

/// What Redis (or a lease holder's fill) had for a read.
enum Found {
    Document(Lookup),
    /// A cached absence: "not found", without MongoDB.
    Absent,
    Miss,
}

/// A key a read is about to look up in MongoDB: the writer its fill offers
/// as (none without a reservation), the order its reservation kept (for an
/// absence; none when it holds no reservation of its own) and the near
/// cache's ticket.
struct Pending {
    id: CustomerId,
    writer: Option<Writer>,
    kept: Option<i64>,
    ticket: Option<Ticket>,
}

/// Reads and writes fail only when MongoDB is needed and cannot answer (or
/// refuses); Redis trouble degrades to MongoDB and is never an error for the
/// caller. A failed load is shared by every caller that waited on it.
type LoadResult = Result<Option<Lookup>, StoreError>;

/// MongoDB seen through its cache tiers: reads go near cache → Redis →
/// MongoDB and warm the tiers above on the way back; writes go to MongoDB
/// first and then through the version guard into Redis and the near cache.
#[derive(Clone)]
pub struct TieredStore {
    inner: Arc<Inner>,
}

struct Inner {
    near: Option<Arc<NearCache>>,
    redis: RedisTier,
    store: FeatureStore,
    loads: Coalescer<CustomerId, LoadResult>,
    counters: ReadCounters,
    policy: ReadPolicy,
    /// Negative caching is on (`NEGATIVE_TTL_MS` > 0): absences are cached,
    /// and tombstones are served as "not found" too.
    serve_absence: bool,
    refresh: Option<RefreshAhead>,
    /// Where served reads are counted (the hot-key record), once set.
    hot: OnceLock<HotRecorder>,
    /// While Redis is down every request fails against it: these log the
    /// outage once when it starts and once when it ends (each failure is
    /// still counted, in `redis_errors_total`, and logged at debug).
    redis_reads: Condition,
    redis_writes: Condition,
}

/// The read path's counters, registered once: the hit path then costs an
/// atomic add per counter instead of a registry lookup.
struct ReadCounters {
    local_hit: Counter,
    local_miss: Counter,
    redis_hit: Counter,
    redis_miss: Counter,
    local_negative_hit: Counter,
    redis_negative_hit: Counter,
    coalesced_waits: Counter,
    /// Near-cache hits and misses since start, readable (for the replica's
    /// heartbeat; the counters above only export).
    near_hits: AtomicU64,
    near_misses: AtomicU64,
    lease_leader: Counter,
    lease_waited: Counter,
    lease_fallback: Counter,
}

impl ReadCounters {
    fn register() -> Self {
        Self {
            local_hit: counter!("cache_requests_total", "tier" => "local", "result" => "hit"),
            local_miss: counter!("cache_requests_total", "tier" => "local", "result" => "miss"),
            redis_hit: counter!("cache_requests_total", "tier" => "redis", "result" => "hit"),
            redis_miss: counter!("cache_requests_total", "tier" => "redis", "result" => "miss"),
            local_negative_hit: counter!("cache_requests_total", "tier" => "local", "result" => "negative_hit"),
            redis_negative_hit: counter!("cache_requests_total", "tier" => "redis", "result" => "negative_hit"),
            coalesced_waits: counter!("cache_coalesced_waits_total"),
            near_hits: AtomicU64::new(0),
            near_misses: AtomicU64::new(0),
            lease_leader: counter!("cache_miss_lease_total", "outcome" => "leader"),
            lease_waited: counter!("cache_miss_lease_total", "outcome" => "waited"),
            lease_fallback: counter!("cache_miss_lease_total", "outcome" => "fallback"),
        }
    }
}

impl TieredStore {
    /// Registers the read counters, so install the metrics recorder first.
    /// Misses do not wait on other replicas' loads and nothing is refreshed
    /// ahead (see [`TieredStore::with_policy`]).
    pub fn new(near: Option<NearCache>, redis: RedisTier, store: FeatureStore) -> Self {
        Self::with_policy(near, redis, store, ReadPolicy::default())
    }

    /// As [`TieredStore::new`], with misses and refreshes as `policy` says.
    pub fn with_policy(
        near: Option<NearCache>,
        redis: RedisTier,
        store: FeatureStore,
        policy: ReadPolicy,
    ) -> Self {
        let refresh = RefreshAhead::new(policy.refresh_ahead_fraction, redis.ttl().document_ttl);
        let serve_absence = !redis.ttl().negative_ttl.is_zero();
        Self {
            inner: Arc::new(Inner {
                near: near.map(Arc::new),
                redis,
                store,
                loads: Coalescer::default(),
                counters: ReadCounters::register(),
                policy,
                serve_absence,
                refresh,
                hot: OnceLock::new(),
                redis_reads: Condition::new(
                    "redis_read",
                    "Redis reads fail; reading through to MongoDB",
                    "Redis reads work again",
                ),
                redis_writes: Condition::new(
                    "redis_write",
                    "Redis writes fail; the invalidator will repair Redis",
                    "Redis writes work again",
                ),
            }),
        }
    }

    /// Counts every read served from now on in the hot-key record (the
    /// first recorder set stays).
    pub fn record_reads(&self, recorder: HotRecorder) {
        let _ = self.inner.hot.set(recorder);
    }

    fn record(&self, doc: &CachedDocument) {
        if let Some(hot) = self.inner.hot.get() {
            hot.record(doc);
        }
    }

    pub fn near(&self) -> Option<&NearCache> {
        self.inner.near.as_deref()
    }

    /// A shared handle on the near cache, for the invalidation subscriber.
    pub fn near_handle(&self) -> Option<Arc<NearCache>> {
        self.inner.near.clone()
    }

    /// Single reads served by the near cache and those it missed, since start.
    pub fn near_reads(&self) -> (u64, u64) {
        let counters = &self.inner.counters;
        (
            counters.near_hits.load(Ordering::Relaxed),
            counters.near_misses.load(Ordering::Relaxed),
        )
    }

    pub fn redis(&self) -> &RedisTier {
        &self.inner.redis
    }

    pub fn store(&self) -> &FeatureStore {
        &self.inner.store
    }

    /// The near cache's fresh document for `id` (a valid customer id), if
    /// it holds one, counted as the near hit [`get`](Self::get) would count;
    /// otherwise `None`, and nothing counted: the caller then asks `get`.
    /// For answering near hits before anything else is set up for a request.
    pub fn near_hit(&self, id: &str) -> Option<CachedDocument> {
        let near = self.inner.near.as_ref()?;
        match near.get(id) {
            Some(Entry::Document(doc)) if !doc.is_expired(Utc::now()) => {
                let _span =
                    tracing::info_span!("near_cache.get", cache.tier = "local", cache.hit = true)
                        .entered();
                self.served_from_near(&doc);
                Some(doc)
            }
            _ => None,
        }
    }

    /// Counts and records a document the near cache answered with.
    fn served_from_near(&self, doc: &CachedDocument) {
        self.inner.counters.local_hit.increment(1);
        self.inner
            .counters
            .near_hits
            .fetch_add(1, Ordering::Relaxed);
        self.record(doc);
        tracing::debug!(customer_id = doc.customer_id(), source = "local", "served");
    }

    /// One customer's document from the nearest tier that has it.
    pub async fn get(&self, id: &CustomerId) -> LoadResult {
        if let Some(near) = &self.inner.near {
            let span = tracing::info_span!(
                "near_cache.get",
                cache.tier = "local",
                cache.hit = tracing::field::Empty
            )
            .entered();
            match near.get(id.as_str()) {
                Some(Entry::Document(doc)) if !doc.is_expired(Utc::now()) => {
                    span.record("cache.hit", true);
                    self.served_from_near(&doc);
                    return Ok(Some(Lookup {
                        document: doc,
                        source: Source::Local,
                    }));
                }
                Some(entry) if self.is_absence(&entry) => {
                    span.record("cache.hit", true);
                    self.inner.counters.local_negative_hit.increment(1);
                    self.inner
                        .counters
                        .near_hits
                        .fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(customer_id = %id, source = "local", "absent");
                    return Ok(None);
                }
                _ => {}
            }
            span.record("cache.hit", false);
            self.inner.counters.local_miss.increment(1);
            self.inner
                .counters
                .near_misses
                .fetch_add(1, Ordering::Relaxed);
        }
        // Boxed: the load's future (Redis, then MongoDB) is large, and
        // every caller's future would carry it, copied on each move, even
        // when the near cache answers.
        let loaded = Box::pin(self.load(id)).await;
        if let Ok(Some(lookup)) = &loaded {
            self.record(&lookup.document);
        }
        loaded
    }

    /// Below the near cache: Redis, then MongoDB. Redis hits are not
    /// coalesced (a GET costs less than the bookkeeping); MongoDB loads are.
    #[tracing::instrument(name = "cache.load", skip_all, fields(customer_id = %id))]
    async fn load(&self, id: &CustomerId) -> LoadResult {
        // Taken before anything is read: a near fill of what is read below
        // is refused if the key is invalidated meanwhile.
        let ticket = self.ticket(id.as_str());
        match self.redis_hit(id, ticket).await {
            Found::Document(hit) => return Ok(Some(hit)),
            Found::Absent => return Ok(None),
            Found::Miss => {}
        }
        let this = self.clone();
        let key = id.clone();
        let (result, role) = self
            .inner
            .loads
            .run(id.clone(), || {
                async move { this.load_from_store(&key, ticket).await }.in_current_span()
            })
            .await;
        if role == Role::Waiter {
            self.inner.counters.coalesced_waits.increment(1);
            tracing::debug!(customer_id = %id, "waited on a coalesced load");
        }
        result.unwrap_or_else(|| Err(StoreError::Lost("the coalesced load did not finish".into())))
    }

    /// The document (or the absence) Redis holds for `id`, when it holds a
    /// current one (also offered to the near cache). With refresh ahead on,
    /// the GET comes with the key's PTTL in the same round trip, and a
    /// document in the last part of its TTL is refreshed in the background.
    async fn redis_hit(&self, id: &CustomerId, ticket: Option<Ticket>) -> Found {
        let counters = &self.inner.counters;
        let found = match &self.inner.refresh {
            Some(_) => self.inner.redis.get_with_ttl(id.as_str()).await,
            None => self.inner.redis.get(id.as_str()).await.map(|e| (e, None)),
        };
        if found.is_ok() {
            self.inner.redis_reads.recover();
        }
        match found {
            Ok((Some(Entry::Document(doc)), left)) if !doc.is_expired(Utc::now()) => {
                counters.redis_hit.increment(1);
                if let (Some(refresh), Some(left)) = (&self.inner.refresh, left)
                    && refresh.due(left, &doc)
                {
                    self.refresh_in_background(id);
                }
                Found::Document(self.served_from_redis(doc, ticket))
            }
            Ok((Some(absent), _)) if self.is_absence(&absent) => {
                counters.redis_negative_hit.increment(1);
                self.served_absent(absent, ticket);
                Found::Absent
            }
            Ok(_) => {
                counters.redis_miss.increment(1);
                Found::Miss
            }
            Err(err) => {
                self.inner.redis_reads.fail(&err);
                Found::Miss
            }
        }
    }

    /// Whether `entry` is served as "not found": a cached absence, and with
    /// negative caching on a tombstone (deleted at its version: any create
    /// replaces it as it replaces an absence).
    fn is_absence(&self, entry: &Entry) -> bool {
        match entry {
            Entry::Absent { .. } => true,
            Entry::Tombstone { .. } => self.inner.serve_absence,
            Entry::Document(_) | Entry::Floor { .. } => false,
        }
    }

    /// An absence found in Redis, offered to the near cache.
    fn served_absent(&self, absent: Entry, ticket: Option<Ticket>) {
        tracing::debug!(
            customer_id = absent.customer_id(),
            source = "redis",
            "absent"
        );
        self.offer_near(absent, ticket);
    }

    /// Reads `id` from MongoDB again and puts it back into Redis through the
    /// guard (a newer version stored, the same one's TTL renewed; refused if
    /// the key changed meanwhile), once per key at a time, in a task of its
    /// own. Counted in `cache_refresh_ahead_total{outcome}`.
    fn refresh_in_background(&self, id: &CustomerId) {
        let Some(claim) = self
            .inner
            .refresh
            .as_ref()
            .and_then(|refresh| refresh.begin(id.as_str()))
        else {
            return;
        };
        let this = self.clone();
        let id = id.clone();
        let span = tracing::info_span!("cache.refresh_ahead", customer_id = %id);
        tokio::spawn(
            async move {
                let _claim = claim;
                let outcome = match this.inner.store.get(&id).await {
                    Ok(Some(doc)) if doc.customer_id == id.as_str() => {
                        let entry = Entry::Document(CachedDocument::from_document(&doc));
                        match this.inner.redis.refresh(entry).await {
                            Ok(Offer::Stored) => "refreshed",
                            Ok(Offer::AlreadyCurrent) => "extended",
                            Ok(_) => "refused",
                            Err(err) => {
                                tracing::debug!(error = %telemetry::ErrorChain(&err), "refresh ahead: Redis failed");
                                "failed"
                            }
                        }
                    }
                    // Gone (or not cacheable): the invalidator removes the key.
                    Ok(_) => "gone",
                    Err(err) => {
                        tracing::debug!(error = %telemetry::ErrorChain(&err), "refresh ahead: MongoDB failed");
                        "failed"
                    }
                };
                counter!("cache_refresh_ahead_total", "outcome" => outcome).increment(1);
            }
            .instrument(span),
        );
    }

    fn served_from_redis(&self, doc: CachedDocument, ticket: Option<Ticket>) -> Lookup {
        self.offer_near(Entry::Document(doc.clone()), ticket);
        tracing::debug!(customer_id = %doc.customer_id(), source = "redis", "served");
        Lookup {
            document: doc,
            source: Source::Redis,
        }
    }

    /// The coalesced part of a miss: reserve the key in Redis (which also
    /// serves a document another load has filled meanwhile), read MongoDB,
    /// and fill onto the reservation — refused if anything changed the key
    /// since.
    ///
    /// A reservation placed by this load makes it the leader; one found
    /// there (another replica's load) is waited on for up to
    /// `MISS_LEASE_WAIT_MS` before this load reads MongoDB itself.
    async fn load_from_store(&self, id: &CustomerId, ticket: Option<Ticket>) -> LoadResult {
        let counters = &self.inner.counters;
        let (writer, kept) = match self.reserve(&[id], false).await.pop() {
            Some(Reservation::Document(Entry::Document(doc))) if !doc.is_expired(Utc::now()) => {
                return Ok(Some(self.served_from_redis(doc, ticket)));
            }
            Some(Reservation::Absent(absent)) => {
                counters.redis_negative_hit.increment(1);
                self.served_absent(absent, ticket);
                return Ok(None);
            }
            Some(Reservation::Lease {
                writer,
                kept,
                placed,
            }) => {
                if placed {
                    counters.lease_leader.increment(1);
                } else if let Some(served) = self.wait_for_lease(id, &writer, ticket).await {
                    counters.lease_waited.increment(1);
                    return served;
                } else {
                    counters.lease_fallback.increment(1);
                }
                (Some(writer), Some(kept))
            }
            Some(Reservation::Reserved(writer)) => (Some(writer), None),
            _ => (None, None),
        };
        let Some(doc) = self.inner.store.get(id).await? else {
            tracing::debug!(customer_id = %id, "not found in MongoDB");
            self.not_found(vec![Pending {
                id: id.clone(),
                writer,
                kept,
                ticket,
            }])
            .await;
            return Ok(None);
        };
        let document = CachedDocument::from_document(&doc);
        if document.customer_id() == id.as_str() {
            self.warm(vec![(Entry::Document(document.clone()), writer, ticket)])
                .await;
        } else {
            // Its `customer_id` is another customer's: serve it as stored,
            // never cache it (it would land under that customer's key).
            tracing::warn!(customer_id = %id, stored_customer_id = %document.customer_id(), "document's customer_id differs from its _id; not cached");
        }
        tracing::debug!(customer_id = %id, source = "mongodb", "served");
        Ok(Some(Lookup {
            document,
            source: Source::Mongodb,
        }))
    }

    /// Waits on another load's reservation for its fill; `None` when the
    /// wait ran out (or the key changed otherwise): read MongoDB yourself.
    async fn wait_for_lease(
        &self,
        id: &CustomerId,
        writer: &Writer,
        ticket: Option<Ticket>,
    ) -> Option<LoadResult> {
        let Writer::Reserved(token) = writer else {
            return None;
        };
        let wait = self.inner.policy.miss_lease_wait;
        if wait.is_zero() {
            return None;
        }
        match wait_for_fill(&self.inner.redis, id.as_str(), token, wait).await {
            Waited::Filled(Entry::Document(doc)) if !doc.is_expired(Utc::now()) => {
                Some(Ok(Some(self.served_from_redis(doc, ticket))))
            }
            Waited::Filled(absent @ Entry::Absent { .. }) => {
                self.inner.counters.redis_negative_hit.increment(1);
                self.served_absent(absent, ticket);
                Some(Ok(None))
            }
            _ => None,
        }
    }

    /// Reads that found no document: each caches an absence onto its
    /// reservation at the order the reservation kept (when absences are
    /// cached), or gives the reservation back.
    async fn not_found(&self, misses: Vec<Pending>) {
        let cache_absence = self.inner.serve_absence;
        let mut absences = Vec::new();
        let mut released = Vec::new();
        for Pending {
            id,
            writer,
            kept,
            ticket,
        } in misses
        {
            match (writer, kept) {
                (Some(writer), Some(kept)) if cache_absence => {
                    absences.push((Entry::absent(id.as_str(), kept), Some(writer), ticket));
                }
                (Some(writer), _) => released.push((id, writer)),
                (None, _) => {}
            }
        }
        self.warm(absences).await;
        let released: Vec<(&str, &Writer)> =
            released.iter().map(|(id, w)| (id.as_str(), w)).collect();
        self.release(&released).await;
    }

    /// Many customers at once: near cache, one MGET, one `$in` query.
    /// Returns the found documents by id and the ids found nowhere.
    pub async fn get_many(
        &self,
        ids: &[CustomerId],
    ) -> Result<(Vec<Lookup>, Vec<CustomerId>), StoreError> {
        let (found, missing) = self.read_many(ids).await?;
        for lookup in &found {
            self.record(&lookup.document);
        }
        Ok((found, missing))
    }

    /// Loads customers into the tiers the way [`Self::get_many`] reads them
    /// (the same guard, reservations and tickets), without counting the
    /// reads as reads: a warm-up. Returns how many documents were not in the
    /// near cache already and are now.
    pub async fn preload(&self, ids: &[CustomerId]) -> Result<usize, StoreError> {
        let (found, _) = self.read_many(ids).await?;
        Ok(found
            .iter()
            .filter(|lookup| lookup.source != Source::Local)
            .filter(|lookup| {
                self.near()
                    .and_then(|near| near.get(lookup.document.customer_id()))
                    .and_then(|entry| {
                        entry
                            .document()
                            .map(|doc| doc.is_same_copy(&lookup.document))
                    })
                    .unwrap_or(self.near().is_none())
            })
            .count())
    }

    #[tracing::instrument(skip_all, fields(count = ids.len()))]
    async fn read_many(
        &self,
        ids: &[CustomerId],
    ) -> Result<(Vec<Lookup>, Vec<CustomerId>), StoreError> {
        let mut seen = HashSet::with_capacity(ids.len());
        let unique: Vec<&CustomerId> = ids.iter().filter(|id| seen.insert(id.as_str())).collect();
        let now = Utc::now();
        let mut found = Vec::with_capacity(unique.len());
        let mut absent = Vec::new();
        let mut pending: Vec<(&CustomerId, Option<Ticket>)> = Vec::new();
        for id in unique {
            match self
                .inner
                .near
                .as_ref()
                .and_then(|near| near.get(id.as_str()))
            {
                Some(Entry::Document(doc)) if !doc.is_expired(now) => found.push(Lookup {
                    document: doc,
                    source: Source::Local,
                }),
                Some(entry) if self.is_absence(&entry) => {
                    self.inner.counters.local_negative_hit.increment(1);
                    absent.push(id.clone());
                }
                _ => pending.push((id, self.ticket(id.as_str()))),
            }
        }

        let keys: Vec<&CustomerId> = pending.iter().map(|(id, _)| *id).collect();
        let reservations = self.reserve(&keys, false).await;
        // Batch reads share reservations but do not wait on them: one `$in`
        // query answers every key at once.
        let mut from_mongo: Vec<Pending> = Vec::new();
        let mut reservations = reservations.into_iter();
        for (id, ticket) in pending {
            match reservations.next() {
                Some(Reservation::Document(Entry::Document(doc))) if !doc.is_expired(now) => {
                    found.push(self.served_from_redis(doc, ticket));
                }
                Some(Reservation::Absent(entry)) => {
                    self.inner.counters.redis_negative_hit.increment(1);
                    self.served_absent(entry, ticket);
                    absent.push(id.clone());
                }
                Some(Reservation::Lease { writer, kept, .. }) => from_mongo.push(Pending {
                    id: id.clone(),
                    writer: Some(writer),
                    kept: Some(kept),
                    ticket,
                }),
                Some(Reservation::Reserved(writer)) => from_mongo.push(Pending {
                    id: id.clone(),
                    writer: Some(writer),
                    kept: None,
                    ticket,
                }),
                _ => from_mongo.push(Pending {
                    id: id.clone(),
                    writer: None,
                    kept: None,
                    ticket,
                }),
            }
        }

        let mut missing = absent;
        if !from_mongo.is_empty() {
            let wanted: Vec<CustomerId> = from_mongo.iter().map(|p| p.id.clone()).collect();
            let docs = self.inner.store.get_many(&wanted).await?;
            let mut by_id: HashMap<String, FeatureDocument> = docs
                .into_iter()
                .map(|d| (d.customer_id.clone(), d))
                .collect();
            let mut fills = Vec::new();
            let mut unfilled = Vec::new();
            for pending in from_mongo {
                match by_id.remove(pending.id.as_str()) {
                    Some(doc) => {
                        let document = CachedDocument::from_document(&doc);
                        fills.push((
                            Entry::Document(document.clone()),
                            pending.writer,
                            pending.ticket,
                        ));
                        found.push(Lookup {
                            document,
                            source: Source::Mongodb,
                        });
                    }
                    None => {
                        missing.push(pending.id.clone());
                        unfilled.push(pending);
                    }
                }
            }
            self.warm(fills).await;
            self.not_found(unfilled).await;
        }
        Ok((found, missing))
    }

    /// Writes one document to MongoDB, then to the tiers.
    pub async fn upsert(&self, write: &FeatureWrite) -> Result<WriteOutcome, StoreError> {
        let mut outcomes = self.upsert_with(std::slice::from_ref(write), true).await?;
        outcomes
            .pop()
            .unwrap_or_else(|| Err(StoreError::Lost("no outcome for the write".into())))
    }

    /// Writes many documents with one bulk write and one Redis pipeline.
    pub async fn upsert_many(
        &self,
        writes: &[FeatureWrite],
    ) -> Result<Vec<Result<WriteOutcome, StoreError>>, StoreError> {
        self.upsert_with(writes, false).await
    }

    /// The write path: reserve the keys, write MongoDB, fill the tiers onto
    /// the reservations (a change made by someone else in between wins).
    async fn upsert_with(
        &self,
        writes: &[FeatureWrite],
        single: bool,
    ) -> Result<Vec<Result<WriteOutcome, StoreError>>, StoreError> {
        let ids: Vec<&CustomerId> = writes.iter().map(|w| &w.customer_id).collect();
        let writers: Vec<Option<Writer>> = self
            .reserve(&ids, true)
            .await
            .into_iter()
            .map(|reservation| match reservation {
                Reservation::Reserved(writer) | Reservation::Lease { writer, .. } => Some(writer),
                Reservation::Document(_) | Reservation::Absent(_) => Some(Writer::Held),
            })
            .chain(std::iter::repeat(None))
            .take(writes.len())
            .collect();
        let stored = match writes {
            [write] if single => self.inner.store.upsert(write).await.map(|o| vec![Ok(o)]),
            _ => self.inner.store.upsert_many(writes).await,
        };
        let outcomes = match stored {
            Ok(outcomes) => outcomes,
            Err(err) => {
                let reserved: Vec<(&str, &Writer)> = ids
                    .iter()
                    .zip(&writers)
                    .filter_map(|(id, w)| w.as_ref().map(|w| (id.as_str(), w)))
                    .collect();
                self.release(&reserved).await;
                return Err(err);
            }
        };
        let mut fills = Vec::new();
        let mut unfilled = Vec::new();
        let results = outcomes
            .into_iter()
            .zip(ids.iter().zip(writers))
            .map(|(outcome, (id, writer))| match outcome {
                Ok(o) => {
                    let document = CachedDocument::from_document(&o.document);
                    // What was written is the truth as of the write: the near
                    // cache's ticket is taken when the fill begins.
                    let ticket = self.ticket(&o.document.customer_id);
                    fills.push((Entry::Document(document.clone()), writer, ticket));
                    Ok(WriteOutcome {
                        document,
                        created: o.created,
                    })
                }
                Err(err) => {
                    // Not written (or not known to be): nothing to fill.
                    if let Some(writer) = writer {
                        unfilled.push((id.as_str(), writer));
                    }
                    Err(err)
                }
            })
            .collect();
        let unfilled: Vec<(&str, &Writer)> = unfilled.iter().map(|(id, w)| (*id, w)).collect();
        self.release(&unfilled).await;
        self.warm(fills).await;
        Ok(results)
    }

    /// Deletes from MongoDB and leaves a tombstone at the removed version, so
    /// that the invalidator's late replay of an older change cannot bring the
    /// document back. `false` when it was absent.
    pub async fn delete(&self, id: &CustomerId) -> Result<bool, StoreError> {
        let Some(version) = self.inner.store.delete(id).await? else {
            return Ok(false);
        };
        let ticket = self.ticket(id.as_str());
        let tombstone = Entry::tombstone(id.as_str(), version);
        self.warm(vec![(tombstone, Some(Writer::Ordered), ticket)])
            .await;
        Ok(true)
    }

    /// The near cache's ticket for a fill of `id` that begins now.
    fn ticket(&self, customer_id: &str) -> Option<Ticket> {
        self.inner
            .near
            .as_deref()
            .map(|near| near.ticket(customer_id))
    }

    /// Reserves keys in Redis for fills; when Redis cannot be reached, no
    /// fill will be accepted there (and the near cache still guards itself).
    /// `for_write`: a write's reservation, whose failure counts as a failed
    /// Redis write.
    async fn reserve(&self, ids: &[&CustomerId], for_write: bool) -> Vec<Reservation> {
        let condition = if for_write {
            &self.inner.redis_writes
        } else {
            &self.inner.redis_reads
        };
        let keys: Vec<&str> = ids.iter().map(|id| id.as_str()).collect();
        if keys.is_empty() {
            return Vec::new();
        }
        let purpose = if for_write {
            ReserveFor::Write
        } else {
            ReserveFor::Read {
                serve_absence: self.inner.serve_absence,
            }
        };
        match self.inner.redis.reserve_many(&keys, purpose).await {
            Ok(reservations) => {
                condition.recover();
                reservations
            }
            Err(err) => {
                // No reservation: the fill goes to the near cache only.
                condition.fail(&err);
                Vec::new()
            }
        }
    }

    /// Gives up reservations of reads that found nothing (best effort: a
    /// reservation left behind expires, and refuses nothing it should not).
    async fn release(&self, reservations: &[(&str, &Writer)]) {
        if let Err(err) = self.inner.redis.release_many(reservations).await {
            tracing::debug!(error = %telemetry::ErrorChain(&err), "could not release reservations");
        }
    }

    /// Offers entries to Redis, each as its writer, and then to the near
    /// cache. The near cache takes an entry only if Redis holds it now
    /// (stored, or already there) or Redis could not be asked: a refusal
    /// means Redis holds something newer, or the key changed since the fill
    /// began, and so the near cache must not take it either.
    async fn warm(&self, fills: Vec<(Entry, Option<Writer>, Option<Ticket>)>) {
        if fills.is_empty() {
            return;
        }
        // Without a reservation (Redis was unreachable), Redis gets nothing.
        let to_redis: Vec<(Entry, Writer)> = fills
            .iter()
            .filter_map(|(entry, writer, _)| writer.clone().map(|w| (entry.clone(), w)))
            .collect();
        let mut offers = match self.inner.redis.fill_many(&to_redis).await {
            Ok(offers) => {
                if !to_redis.is_empty() {
                    self.inner.redis_writes.recover();
                }
                offers.into_iter().map(|o| o.accepted()).collect()
            }
            Err(err) => {
                // The invalidator repairs Redis from the change feed.
                self.inner.redis_writes.fail(&err);
                vec![true; to_redis.len()]
            }
        }
        .into_iter();
        for (entry, writer, ticket) in fills {
            let accepted = match writer {
                Some(_) => offers.next().unwrap_or(false),
                None => true,
            };
            if accepted {
                self.offer_near(entry, ticket);
            }
        }
    }

    fn offer_near(&self, entry: Entry, ticket: Option<Ticket>) {
        if let (Some(near), Some(ticket)) = (&self.inner.near, ticket) {
            near.offer_with(entry, ticket);
        }
    }
}

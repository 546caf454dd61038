use crate::coalesce::{Coalescer, Role};
use crate::entry::{CachedDocument, Entry};
use crate::near::NearCache;
use crate::redis_tier::{Offer, RedisTier};
use chrono::Utc;
use feature_store::{CustomerId, FeatureDocument, FeatureStore, FeatureWrite, StoreError};
use metrics::{Counter, counter};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
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
    pub document: Arc<CachedDocument>,
    pub source: Source,
}

/// The result of a write: the stored document, rendered once.
#[derive(Debug, Clone)]
pub struct WriteOutcome {
    pub document: Arc<CachedDocument>,
    pub created: bool,
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
    coalesced_waits: Counter,
}

impl ReadCounters {
    fn register() -> Self {
        Self {
            local_hit: counter!("cache_requests_total", "tier" => "local", "result" => "hit"),
            local_miss: counter!("cache_requests_total", "tier" => "local", "result" => "miss"),
            redis_hit: counter!("cache_requests_total", "tier" => "redis", "result" => "hit"),
            redis_miss: counter!("cache_requests_total", "tier" => "redis", "result" => "miss"),
            coalesced_waits: counter!("cache_coalesced_waits_total"),
        }
    }
}

impl TieredStore {
    /// Registers the read counters, so install the metrics recorder first.
    pub fn new(near: Option<NearCache>, redis: RedisTier, store: FeatureStore) -> Self {
        Self {
            inner: Arc::new(Inner {
                near: near.map(Arc::new),
                redis,
                store,
                loads: Coalescer::default(),
                counters: ReadCounters::register(),
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

    pub fn near(&self) -> Option<&NearCache> {
        self.inner.near.as_deref()
    }

    /// A shared handle on the near cache, for the invalidation follower.
    pub fn near_handle(&self) -> Option<Arc<NearCache>> {
        self.inner.near.clone()
    }

    pub fn redis(&self) -> &RedisTier {
        &self.inner.redis
    }

    pub fn store(&self) -> &FeatureStore {
        &self.inner.store
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
            if let Some(Entry::Document(doc)) = near.get(id.as_str())
                && !doc.is_expired(Utc::now())
            {
                span.record("cache.hit", true);
                self.inner.counters.local_hit.increment(1);
                tracing::debug!(customer_id = %id, source = "local", "served");
                return Ok(Some(Lookup {
                    document: doc,
                    source: Source::Local,
                }));
            }
            span.record("cache.hit", false);
            self.inner.counters.local_miss.increment(1);
        }
        self.load(id).await
    }

    /// Below the near cache: Redis, then MongoDB. Redis hits are not
    /// coalesced (a GET costs less than the bookkeeping); MongoDB loads are.
    #[tracing::instrument(name = "cache.load", skip_all, fields(customer_id = %id))]
    async fn load(&self, id: &CustomerId) -> LoadResult {
        let epoch = self.inner.near.as_deref().map(NearCache::epoch);
        if let Some(hit) = self.redis_hit(id, epoch, true).await {
            return Ok(Some(hit));
        }
        let this = self.clone();
        let key = id.clone();
        let (result, role) = self
            .inner
            .loads
            .run(id.clone(), || {
                async move { this.load_from_store(&key, epoch).await }.in_current_span()
            })
            .await;
        if role == Role::Waiter {
            self.inner.counters.coalesced_waits.increment(1);
            tracing::debug!(customer_id = %id, "waited on a coalesced load");
        }
        result
    }

    /// The document Redis holds for `id`, when it holds a current one (also
    /// offered to the near cache). `count` records the hit or miss.
    async fn redis_hit(&self, id: &CustomerId, epoch: Option<u64>, count: bool) -> Option<Lookup> {
        let counters = &self.inner.counters;
        let found = self.inner.redis.get(id.as_str()).await;
        if found.is_ok() {
            self.inner.redis_reads.recover();
        }
        match found {
            Ok(Some(Entry::Document(doc))) if !doc.is_expired(Utc::now()) => {
                if count {
                    counters.redis_hit.increment(1);
                }
                self.offer_near(Entry::Document(Arc::clone(&doc)), epoch);
                tracing::debug!(customer_id = %id, source = "redis", "served");
                Some(Lookup {
                    document: doc,
                    source: Source::Redis,
                })
            }
            Ok(_) => {
                if count {
                    counters.redis_miss.increment(1);
                }
                None
            }
            Err(err) => {
                self.inner.redis_reads.fail(&err);
                None
            }
        }
    }

    /// The coalesced part of a miss. Redis is asked once more first: a load
    /// that finished between this caller's Redis miss and its joining the
    /// coalescer has filled it, and MongoDB need not be asked again.
    async fn load_from_store(&self, id: &CustomerId, epoch: Option<u64>) -> LoadResult {
        if let Some(hit) = self.redis_hit(id, epoch, false).await {
            return Ok(Some(hit));
        }
        let Some(doc) = self.inner.store.get(id).await? else {
            tracing::debug!(customer_id = %id, "not found in MongoDB");
            return Ok(None);
        };
        let document = CachedDocument::from_document(&doc);
        self.warm(Entry::Document(Arc::clone(&document)), epoch)
            .await;
        tracing::debug!(customer_id = %id, source = "mongodb", "served");
        Ok(Some(Lookup {
            document,
            source: Source::Mongodb,
        }))
    }

    /// Many customers at once: near cache, one MGET, one `$in` query.
    /// Returns the found documents by id and the ids found nowhere.
    #[tracing::instrument(skip_all, fields(count = ids.len()))]
    pub async fn get_many(
        &self,
        ids: &[CustomerId],
    ) -> Result<(Vec<Lookup>, Vec<CustomerId>), StoreError> {
        let mut seen = HashSet::with_capacity(ids.len());
        let unique: Vec<&CustomerId> = ids.iter().filter(|id| seen.insert(id.as_str())).collect();
        let now = Utc::now();
        let epoch = self.inner.near.as_deref().map(NearCache::epoch);
        let mut found = Vec::with_capacity(unique.len());
        let mut pending: Vec<&CustomerId> = Vec::new();
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
                _ => pending.push(id),
            }
        }

        let mut from_mongo: Vec<CustomerId> = Vec::new();
        let keys: Vec<&str> = pending.iter().map(|id| id.as_str()).collect();
        match self.inner.redis.get_many(&keys).await {
            Ok(entries) => {
                // No keys: Redis was not asked, so it proved nothing.
                if !keys.is_empty() {
                    self.inner.redis_reads.recover();
                }
                for (id, entry) in pending.iter().zip(entries) {
                    match entry {
                        Some(Entry::Document(doc)) if !doc.is_expired(now) => {
                            self.offer_near(Entry::Document(Arc::clone(&doc)), epoch);
                            found.push(Lookup {
                                document: doc,
                                source: Source::Redis,
                            });
                        }
                        _ => from_mongo.push((*id).clone()),
                    }
                }
            }
            Err(err) => {
                self.inner.redis_reads.fail(&err);
                from_mongo.extend(pending.iter().map(|id| (*id).clone()));
            }
        }

        let mut missing = Vec::new();
        if !from_mongo.is_empty() {
            let docs = self.inner.store.get_many(&from_mongo).await?;
            let mut by_id: HashMap<String, FeatureDocument> = docs
                .into_iter()
                .map(|d| (d.customer_id.clone(), d))
                .collect();
            let mut fills = Vec::new();
            for id in from_mongo {
                match by_id.remove(id.as_str()) {
                    Some(doc) => {
                        let document = CachedDocument::from_document(&doc);
                        fills.push(Entry::Document(Arc::clone(&document)));
                        found.push(Lookup {
                            document,
                            source: Source::Mongodb,
                        });
                    }
                    None => missing.push(id),
                }
            }
            self.warm_many(fills, epoch).await;
        }
        Ok((found, missing))
    }

    /// Writes one document to MongoDB, then to the tiers.
    pub async fn upsert(&self, write: &FeatureWrite) -> Result<WriteOutcome, StoreError> {
        let outcome = self.inner.store.upsert(write).await?;
        let document = CachedDocument::from_document(&outcome.document);
        self.warm(
            Entry::Document(Arc::clone(&document)),
            self.inner.near.as_deref().map(NearCache::epoch),
        )
        .await;
        Ok(WriteOutcome {
            document,
            created: outcome.created,
        })
    }

    /// Writes many documents with one bulk write and one Redis pipeline.
    pub async fn upsert_many(
        &self,
        writes: &[FeatureWrite],
    ) -> Result<Vec<Result<WriteOutcome, StoreError>>, StoreError> {
        let epoch = self.inner.near.as_deref().map(NearCache::epoch);
        let outcomes = self.inner.store.upsert_many(writes).await?;
        let mut fills = Vec::new();
        let results = outcomes
            .into_iter()
            .map(|outcome| {
                outcome.map(|o| {
                    let document = CachedDocument::from_document(&o.document);
                    fills.push(Entry::Document(Arc::clone(&document)));
                    WriteOutcome {
                        document,
                        created: o.created,
                    }
                })
            })
            .collect();
        self.warm_many(fills, epoch).await;
        Ok(results)
    }

    /// Deletes from MongoDB and leaves a tombstone at the removed version, so
    /// no late fill can bring the document back. `false` when it was absent.
    pub async fn delete(&self, id: &CustomerId) -> Result<bool, StoreError> {
        let Some(version) = self.inner.store.delete(id).await? else {
            return Ok(false);
        };
        let tombstone = Entry::Tombstone {
            customer_id: id.to_string(),
            version,
        };
        self.warm(tombstone, self.inner.near.as_deref().map(NearCache::epoch))
            .await;
        Ok(true)
    }

    /// Offers an entry to Redis and then to the near cache. The near cache
    /// takes it only if Redis holds it now (stored, or already there) or
    /// Redis is down: when Redis refuses, it holds something newer, and so
    /// the near cache must not take this.
    async fn warm(&self, entry: Entry, epoch: Option<u64>) {
        self.warm_many(vec![entry], epoch).await;
    }

    async fn warm_many(&self, entries: Vec<Entry>, epoch: Option<u64>) {
        if entries.is_empty() {
            return;
        }
        let accepted: Vec<bool> = match self.inner.redis.offer_many(&entries).await {
            Ok(outcomes) => {
                self.inner.redis_writes.recover();
                outcomes.into_iter().map(|o| o != Offer::Refused).collect()
            }
            Err(err) => {
                self.inner.redis_writes.fail(&err);
                vec![true; entries.len()]
            }
        };
        for (entry, accepted) in entries.into_iter().zip(accepted) {
            if accepted {
                self.offer_near(entry, epoch);
            }
        }
    }

    fn offer_near(&self, entry: Entry, epoch: Option<u64>) {
        if let (Some(near), Some(epoch)) = (&self.inner.near, epoch) {
            near.offer_at(entry, epoch);
        }
    }
}

//! The version guard, against a real Redis and the real near cache, and the
//! read/write race through the tiered store against the MongoDB stand-in.

use chrono::{Duration as ChronoDuration, Utc};
use feature_cache::redis_tier::{Reservation, ReserveFor, Writer};
use feature_cache::{
    CacheTier, CachedDocument, Entry, Fence, FencedWriteError, Lookup, NearCache, NearCacheConfig,
    Offer, RedisConfig, RedisTier, TieredStore, TtlPolicy,
};
use feature_store::{
    CustomerId, FeatureDocument, FeatureStore, FeatureWrite, StoreConfig, StoreError,
};
use serde_json::json;
use std::time::Duration;
use testkit::mongo::{DEFAULT_COLLECTION, mongo_uri, unique_db};
use testkit::proxy::GatedProxy;
use testkit::redis::TestRedis;

/// A read's reservation, absences not served.
const READ: ReserveFor = ReserveFor::Read {
    serve_absence: false,
};

fn doc(version: i64, marker: i64) -> Entry {
    doc_expiring(version, marker, Utc::now() + ChronoDuration::days(1))
}

fn doc_expiring(version: i64, marker: i64, expires_at: chrono::DateTime<Utc>) -> Entry {
    let document = FeatureDocument {
        version,
        customer_id: "C1".into(),
        features: json!({ "marker": marker })
            .as_object()
            .cloned()
            .unwrap_or_default(),
        calculated_at: Utc::now(),
        model_version: "v1.0.0".into(),
        expires_at: Some(expires_at),
    };
    Entry::Document(CachedDocument::from_document(&document))
}

fn tombstone(version: i64) -> Entry {
    Entry::tombstone("C1", version)
}

fn floor(version: i64) -> Entry {
    Entry::floor("C1", version)
}

async fn held<T: CacheTier>(tier: &T) -> Option<(i64, u8)> {
    tier.lookup("C1")
        .await
        .unwrap()
        .map(|e| (e.version(), e.rank()))
}

/// The contract both tiers must keep: only strictly newer (version, rank) wins.
async fn guard_contract<T: CacheTier>(tier: &T) {
    assert!(
        tier.offer(doc(1, 1)).await.unwrap(),
        "empty tier takes anything"
    );
    assert!(tier.offer(doc(2, 2)).await.unwrap(), "newer version wins");
    assert!(
        !tier.offer(doc(1, 1)).await.unwrap(),
        "a slow reader's older version loses"
    );
    assert!(
        !tier.offer(doc(2, 99)).await.unwrap(),
        "same version is not replaced"
    );
    assert_eq!(held(tier).await, Some((2, 1)));

    assert!(
        tier.offer(tombstone(2)).await.unwrap(),
        "delete of v2 beats v2"
    );
    assert!(
        !tier.offer(doc(2, 2)).await.unwrap(),
        "late fill of the deleted version loses"
    );
    assert!(!tier.offer(doc(1, 1)).await.unwrap());
    assert_eq!(held(tier).await, Some((2, 2)));
    assert!(
        tier.offer(doc(3, 3)).await.unwrap(),
        "re-creation with a newer version wins"
    );

    assert!(
        tier.offer(floor(5)).await.unwrap(),
        "a floor evicts older content"
    );
    assert!(
        !tier.offer(doc(4, 4)).await.unwrap(),
        "content older than the floor loses"
    );
    assert!(
        tier.offer(doc(5, 5)).await.unwrap(),
        "the floor's version itself gets in"
    );
    assert_eq!(held(tier).await, Some((5, 1)));
}

#[tokio::test]
async fn near_cache_keeps_the_guard_contract() {
    let near = near_cache();
    guard_contract(&near).await;
}

#[tokio::test]
async fn redis_keeps_the_guard_contract() {
    let redis = TestRedis::start().await;
    let tier = redis_tier(&redis, Duration::from_secs(3600), Duration::from_secs(60));
    guard_contract(&tier).await;
}

#[tokio::test]
async fn a_near_fill_that_started_before_a_flush_or_an_invalidation_is_refused() {
    let near = near_cache();
    let ticket = near.ticket("C1");
    near.flush();
    assert!(!near.offer_with(doc(1, 1), ticket));
    assert!(near.get("C1").is_none());
    assert!(near.offer_with(doc(1, 1), near.ticket("C1")));

    // An invalidation leaves no marker behind that eviction could take: the
    // refusal does not depend on the cache remembering anything.
    let ticket = near.ticket("C1");
    near.invalidate("C1");
    assert!(near.get("C1").is_none());
    assert!(!near.offer_with(doc(1, 1), ticket), "the stale fill lost");
    assert!(near.offer_with(doc(2, 2), near.ticket("C1")));
}

#[tokio::test]
async fn an_ordered_change_refuses_older_fills_in_flight_but_not_its_own_version() {
    let near = near_cache();
    let ticket = near.ticket("C1");
    near.settle("C1", 5);
    assert!(!near.offer_with(doc(4, 4), ticket), "older than the change");
    assert!(
        near.offer_with(doc(5, 5), ticket),
        "the change's own version"
    );
    // A copy at the change's version (or newer) stays when the change arrives.
    near.settle("C1", 5);
    assert_eq!(near.get("C1").map(|e| e.version()), Some(5));
    near.settle("C1", 6);
    assert!(near.get("C1").is_none(), "older than the change: dropped");
}

#[tokio::test]
async fn a_redis_fill_lands_only_on_its_own_reservation() {
    let redis = TestRedis::start().await;
    let tier = redis_tier(&redis, Duration::from_secs(3600), Duration::from_secs(60));
    let reserved = |r: Reservation| match r {
        Reservation::Reserved(writer) | Reservation::Lease { writer, .. } => writer,
        other => panic!("unexpected {other:?}"),
    };
    let fill = |writer: Writer, entry: Entry| {
        let tier = tier.clone();
        async move { tier.fill_many(&[(entry, writer)]).await.unwrap().remove(0) }
    };

    // Reserved, read, filled.
    let writer = reserved(tier.reserve_many(&["C1"], READ).await.unwrap().remove(0));
    assert_eq!(fill(writer.clone(), doc(1, 1)).await, Offer::Stored);
    // The next reader finds the document instead of a reservation.
    assert!(matches!(
        tier.reserve_many(
            &["C1"],
            ReserveFor::Read {
                serve_absence: false
            }
        )
        .await
        .unwrap()
        .remove(0),
        Reservation::Document(_)
    ));

    // A change after the reservation: the fill's read may be stale.
    let mut conn = redis.client().await;
    let del = |mut conn: redis::aio::MultiplexedConnection| async move {
        let _: () = redis::cmd("DEL")
            .arg("features:C1")
            .query_async(&mut conn)
            .await
            .unwrap();
    };
    del(conn.clone()).await;
    let writer = reserved(tier.reserve_many(&["C1"], READ).await.unwrap().remove(0));
    assert!(tier.offer(tombstone(3)).await.unwrap());
    assert!(
        !fill(writer, doc(2, 2)).await.accepted(),
        "older than the delete"
    );
    // The same after the change's marker is evicted (DEL stands in for eviction).
    del(conn.clone()).await;
    let writer = reserved(tier.reserve_many(&["C1"], READ).await.unwrap().remove(0));
    assert!(tier.offer(tombstone(3)).await.unwrap());
    del(conn.clone()).await;
    assert_eq!(fill(writer, doc(2, 2)).await, Offer::ReservationLost);
    // A flush takes the reservations with it.
    let writer = reserved(tier.reserve_many(&["C1"], READ).await.unwrap().remove(0));
    assert!(tier.flush_documents().await.unwrap() >= 1);
    assert_eq!(fill(writer, doc(2, 2)).await, Offer::ReservationLost);
    assert!(tier.get("C1").await.unwrap().is_none());

    // Fillers that reserve while a reservation stands share it.
    let first = reserved(tier.reserve_many(&["C1"], READ).await.unwrap().remove(0));
    let second = reserved(tier.reserve_many(&["C1"], READ).await.unwrap().remove(0));
    assert_eq!(first, second);
    assert_eq!(fill(second, doc(4, 4)).await, Offer::Stored);
    assert_eq!(fill(first, doc(4, 4)).await, Offer::AlreadyCurrent);
    let _: () = redis::cmd("PING").query_async(&mut conn).await.unwrap();
}

/// A reader whose MongoDB read was answered before a delete, but whose
/// answer arrives after it: the fill finds its reservation gone, also when
/// the delete's tombstone has been evicted since (memory pressure).
#[tokio::test]
async fn a_slow_reader_never_refills_after_a_delete_or_a_flush() {
    let mut bed = SlowReaderBed::start().await;
    let id = CustomerId::parse("SLOW").unwrap();

    for disturbance in ["delete then eviction", "flush"] {
        let _: () = redis::cmd("FLUSHALL")
            .query_async(&mut bed.conn)
            .await
            .unwrap();
        bed.writer.upsert(&write(&id, 1)).await.unwrap();
        bed.evict(&id).await;
        let reader = bed.read_held(&id).await;
        match disturbance {
            "flush" => {
                bed.writer.store().delete(&id).await.unwrap();
                bed.writer.redis().flush_documents().await.unwrap();
            }
            _ => {
                assert!(bed.writer.delete(&id).await.unwrap());
                bed.evict(&id).await;
            }
        }
        bed.proxy.open();
        let served = reader.await.unwrap().unwrap();
        assert!(
            served.is_some(),
            "{disturbance}: the slow reader itself gets what it read"
        );
        bed.assert_not_cached(&id, disturbance).await;
    }
}

/// The only caller of a load goes away (its client disconnected); the load
/// finishes in the background and leaves nothing behind: a much later reader
/// gets a load of its own, not the old result.
#[tokio::test]
async fn an_abandoned_load_is_never_handed_to_a_later_reader() {
    let mut bed = SlowReaderBed::start().await;
    let id = CustomerId::parse("GONE").unwrap();
    bed.writer.upsert(&write(&id, 1)).await.unwrap();
    bed.evict(&id).await;

    let reader = bed.read_held(&id).await;
    reader.abort();
    // Another tool deletes the customer; the invalidator removes its entry.
    bed.writer.store().delete(&id).await.unwrap();
    bed.evict(&id).await;
    bed.proxy.open();
    tokio::time::sleep(Duration::from_millis(500)).await;

    bed.assert_not_cached(&id, "the old document came back")
        .await;
}

/// A writer's tiers and a slow reader's over one Redis and MongoDB: the
/// reader's MongoDB answers pass a proxy that can hold them.
struct SlowReaderBed {
    _redis: TestRedis,
    writer: TieredStore,
    slow: TieredStore,
    proxy: GatedProxy,
    conn: redis::aio::MultiplexedConnection,
}

impl SlowReaderBed {
    async fn start() -> Self {
        let redis = TestRedis::start().await;
        let (writer, store) = tiered(&redis, false).await;
        let proxy = GatedProxy::start_holding_answers(testkit::mongo::mongo_addr()).await;
        let slow = slow_tiers(&redis, &proxy, store.database_name()).await;
        // Connected before the gate closes: held answers are then answers
        // to reads.
        slow.store().ping().await.unwrap();
        let conn = redis.client().await;
        Self {
            _redis: redis,
            writer,
            slow,
            proxy,
            conn,
        }
    }

    /// Drops the key's Redis entry, as eviction or the invalidator does.
    async fn evict(&mut self, id: &CustomerId) {
        let _: () = redis::cmd("DEL")
            .arg(format!("features:{id}"))
            .query_async(&mut self.conn)
            .await
            .unwrap();
    }

    /// A read by the slow reader that has reached MongoDB and whose answer
    /// the proxy holds until [`GatedProxy::open`].
    async fn read_held(
        &self,
        id: &CustomerId,
    ) -> tokio::task::JoinHandle<Result<Option<Lookup>, StoreError>> {
        self.proxy.close();
        let reader = {
            let (slow, id) = (self.slow.clone(), id.clone());
            tokio::spawn(async move { slow.get(&id).await })
        };
        tokio::time::sleep(Duration::from_millis(300)).await;
        reader
    }

    /// Neither of the slow reader's tiers holds the key, and a read of its
    /// own finds it absent.
    async fn assert_not_cached(&self, id: &CustomerId, context: &str) {
        assert!(
            self.slow.redis().get(id.as_str()).await.unwrap().is_none(),
            "{context}: the stale read was cached in Redis"
        );
        if let Some(near) = self.slow.near() {
            assert!(
                near.get(id.as_str()).is_none(),
                "{context}: the stale read was cached in the near cache"
            );
        }
        assert!(self.slow.get(id).await.unwrap().is_none(), "{context}");
    }
}

/// A tiered store whose MongoDB traffic goes through `proxy`.
async fn slow_tiers(redis: &TestRedis, proxy: &GatedProxy, database: &str) -> TieredStore {
    let store = FeatureStore::connect(&StoreConfig {
        uri: format!(
            "mongodb://127.0.0.1:{}/?directConnection=true&retryWrites=false",
            proxy.port()
        ),
        database: database.to_owned(),
        collection: DEFAULT_COLLECTION.to_owned(),
        timeout: Duration::from_secs(10),
        app_name: "slow".to_owned(),
    })
    .await
    .unwrap();
    let tier = redis_tier(redis, Duration::from_secs(3600), Duration::from_secs(60));
    TieredStore::new(Some(near_cache()), tier, store)
}

#[tokio::test]
async fn redis_ttl_is_capped_by_expiry_and_setting_and_jitter_only_shortens() {
    let redis = TestRedis::start().await;
    let tier = redis_tier(
        &redis,
        Duration::from_secs(100),
        Duration::from_millis(1500),
    );
    let mut conn = redis.client().await;
    let pttl = |mut conn: redis::aio::MultiplexedConnection| async move {
        let ms: i64 = redis::cmd("PTTL")
            .arg("features:C1")
            .query_async(&mut conn)
            .await
            .unwrap();
        ms
    };

    assert!(tier.offer(doc(1, 1)).await.unwrap());
    let ms = pttl(conn.clone()).await;
    assert!(
        (94_000..=100_000).contains(&ms),
        "REDIS_TTL caps, jitter ≤ 5 %: {ms}"
    );

    assert!(
        tier.offer(doc_expiring(2, 2, Utc::now() + ChronoDuration::seconds(10)))
            .await
            .unwrap()
    );
    let ms = pttl(conn.clone()).await;
    assert!((8_000..=10_000).contains(&ms), "expiry caps: {ms}");

    assert!(tier.offer(tombstone(2)).await.unwrap());
    let ms = pttl(conn.clone()).await;
    assert!(
        (0..=1_500).contains(&ms),
        "tombstones live TOMBSTONE_TTL: {ms}"
    );

    // An already expired document is never stored.
    let _: () = redis::cmd("DEL")
        .arg("features:C1")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(
        !tier
            .offer(doc_expiring(3, 3, Utc::now() - ChronoDuration::seconds(1)))
            .await
            .unwrap()
    );
    assert!(tier.lookup("C1").await.unwrap().is_none());
}

async fn tiered(redis: &TestRedis, near: bool) -> (TieredStore, FeatureStore) {
    let store = FeatureStore::connect(&StoreConfig {
        uri: mongo_uri(),
        database: unique_db("guard"),
        collection: DEFAULT_COLLECTION.to_owned(),
        timeout: Duration::from_secs(10),
        app_name: "test".to_owned(),
    })
    .await
    .unwrap();
    let tier = redis_tier(redis, Duration::from_secs(3600), Duration::from_secs(60));
    let near = near.then(near_cache);
    (TieredStore::new(near, tier, store.clone()), store)
}

fn write(id: &CustomerId, marker: i64) -> FeatureWrite {
    FeatureWrite {
        customer_id: id.clone(),
        features: json!({ "marker": marker })
            .as_object()
            .cloned()
            .unwrap_or_default(),
        model_version: "v1.0.0".into(),
        ttl_days: 7,
        traceparent: None,
    }
}

/// The race drawn in CACHE_STRATEGY.md: a reader fetches v1 from MongoDB, a
/// writer commits v2 and updates the caches, then the reader's fill of v1
/// arrives. It must lose, in both tiers; after a delete it must not
/// resurrect the document.
#[tokio::test]
async fn a_slow_readers_fill_never_overwrites_a_newer_write_or_a_delete() {
    let redis = TestRedis::start().await;
    let (tiers, store) = tiered(&redis, true).await;
    let id = CustomerId::parse("C1").unwrap();

    tiers.upsert(&write(&id, 1)).await.unwrap();
    let v1 = store.get(&id).await.unwrap().unwrap(); // the slow reader's copy
    let v2 = tiers.upsert(&write(&id, 2)).await.unwrap().document;
    assert!(v2.version() > v1.version);

    let stale = Entry::Document(CachedDocument::from_document(&v1));
    assert!(
        !tiers.redis().offer(stale.clone()).await.unwrap(),
        "Redis refuses v1 after v2"
    );
    assert!(
        !tiers.near().unwrap().offer(stale.clone()),
        "near cache refuses v1 after v2"
    );
    let served = tiers.get(&id).await.unwrap().unwrap();
    assert_eq!(served.document.version(), v2.version());

    let v2_doc = store.get(&id).await.unwrap().unwrap();
    assert!(tiers.delete(&id).await.unwrap());
    let late = Entry::Document(CachedDocument::from_document(&v2_doc));
    assert!(
        !tiers.redis().offer(late.clone()).await.unwrap(),
        "no resurrection in Redis"
    );
    assert!(
        !tiers.near().unwrap().offer(late),
        "no resurrection in the near cache"
    );
    assert!(tiers.get(&id).await.unwrap().is_none());

    let v3 = tiers.upsert(&write(&id, 3)).await.unwrap().document;
    assert!(
        v3.version() > v2_doc.version,
        "re-creation gets a larger version than any before"
    );
    assert_eq!(
        tiers.get(&id).await.unwrap().unwrap().document.version(),
        v3.version()
    );
}

/// Readers and a writer racing for real through the whole read path
/// (coalesced single reads and uncoalesced batch reads): whatever
/// interleaving happens, once everyone is done, Redis and the near cache hold
/// MongoDB's latest version. The stand-in's latencies rarely open the stale
/// fill window by themselves; the deterministic test above forces it.
#[tokio::test]
async fn concurrent_readers_and_writer_leave_the_latest_version_cached() {
    let redis = TestRedis::start().await;
    let (tiers, store) = tiered(&redis, true).await;
    let id = CustomerId::parse("RACE").unwrap();
    tiers.upsert(&write(&id, 0)).await.unwrap();
    let mut conn = redis.client().await;
    for round in 1..=20 {
        // Cold caches, so readers go all the way to MongoDB.
        let _: () = redis::cmd("DEL")
            .arg("features:RACE")
            .query_async(&mut conn)
            .await
            .unwrap();
        tiers.near().unwrap().flush();
        let mut tasks = Vec::new();
        // Single reads coalesce into one load; batch reads do not, so both
        // paths race the writer. Staggered starts spread the reads around it.
        for reader in 0..20_u64 {
            let tiers = tiers.clone();
            let id = id.clone();
            tasks.push(tokio::spawn(async move {
                tokio::time::sleep(Duration::from_micros(reader * 150)).await;
                if reader % 2 == 0 {
                    tiers.get(&id).await.map(|_| ())
                } else {
                    tiers.get_many(std::slice::from_ref(&id)).await.map(|_| ())
                }
            }));
        }
        let writer = {
            let tiers = tiers.clone();
            let id = id.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_micros(round as u64 * 37 % 1500)).await;
                tiers.upsert(&write(&id, round)).await.map(|_| ())
            })
        };
        for task in tasks {
            task.await.unwrap().unwrap();
        }
        writer.await.unwrap().unwrap();

        let latest = store.get(&id).await.unwrap().unwrap().version;
        let in_redis = tiers
            .redis()
            .get("RACE")
            .await
            .unwrap()
            .map(|e| e.version());
        assert_eq!(
            in_redis,
            Some(latest),
            "round {round}: Redis holds an older version"
        );
        if let Some(near) = tiers.near().unwrap().get("RACE") {
            assert_eq!(
                near.version(),
                latest,
                "round {round}: near cache holds an older version"
            );
        }
        assert_eq!(
            tiers.get(&id).await.unwrap().unwrap().document.version(),
            latest
        );
    }
}

fn near_cache() -> NearCache {
    NearCache::new(&NearCacheConfig {
        max_entries: 1000,
        max_bytes: 64 << 20,
        ttl: Duration::from_secs(60),
        negative_ttl: Duration::from_secs(5),
    })
}

fn redis_tier(redis: &TestRedis, document_ttl: Duration, marker_ttl: Duration) -> RedisTier {
    RedisTier::connect(&RedisConfig {
        url: redis.url(),
        cluster_nodes: Vec::new(),
        tls: Default::default(),
        timeout: Duration::from_secs(2),
        ttl: TtlPolicy {
            document_ttl,
            marker_ttl,
            // Absences not cached: these tests read what MongoDB holds after
            // changes no invalidator announces (negative caching has its own
            // tests, services/api/tests/it/absence.rs).
            negative_ttl: Duration::ZERO,
        },
    })
    .unwrap()
}

#[tokio::test]
async fn a_fenced_writer_writes_only_while_its_fence_holds() {
    let redis = TestRedis::start().await;
    let tier = redis_tier(&redis, Duration::from_secs(3600), Duration::from_secs(60));
    let mut conn = redis.client().await;
    let mut hold = async |token: &str| {
        let _: () = redis::cmd("SET")
            .arg("lease")
            .arg(token)
            .query_async(&mut conn)
            .await
            .unwrap();
    };
    hold("holder:1").await;
    let writer = tier.fenced(Fence::new("lease", "holder:1"));
    assert_eq!(writer.offer(&doc(1, 1)).await.unwrap(), Offer::Stored);
    assert_eq!(
        writer.offer(&doc(1, 1)).await.unwrap(),
        Offer::AlreadyCurrent
    );
    assert!(matches!(
        writer.offer(&floor(0)).await.unwrap(),
        Offer::Refused { holds: Some(1) }
    ));

    // A successor took the lease: the old writer is refused, whatever it writes.
    hold("holder:2").await;
    assert!(matches!(
        writer.offer(&doc(2, 2)).await,
        Err(FencedWriteError::Fenced)
    ));
    assert_eq!(tier.get("C1").await.unwrap().map(|e| e.version()), Some(1));
}

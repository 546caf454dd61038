//! The hot-key record (sampled counts, forward decay, trimming, rescaling)
//! against a real Redis, and the warm-ups built on it against the MongoDB
//! stand-in: the replica's preload and the invalidator's fenced refill.

use feature_cache::hot::{self, HotConfig, HotRecord, LANDMARK};
use feature_cache::warm::{self, WarmConfig, WarmError};
use feature_cache::{
    CachedDocument, Entry, Fence, NearCache, NearCacheConfig, RedisConfig, RedisConnection,
    RedisTier, Source, TieredStore, TtlPolicy,
};
use feature_store::{CustomerId, FeatureDocument, FeatureStore, FeatureWrite, StoreConfig};
use serde_json::json;
use std::time::{Duration, Instant};
use testkit::mongo::{DEFAULT_COLLECTION, TestDb, mongo_uri};
use testkit::redis::TestRedis;
use tokio_util::sync::CancellationToken;

const KEY: &str = "cache-invalidator:test.features:hot";

async fn connection(redis: &TestRedis) -> RedisConnection {
    RedisConnection::Single(
        redis::Client::open(redis.url())
            .unwrap()
            .get_connection_manager()
            .await
            .unwrap(),
    )
}

fn config(half_life: Duration, capacity: usize) -> HotConfig {
    HotConfig {
        key: KEY.into(),
        half_life,
        capacity,
        flush_every: Duration::from_millis(50),
    }
}

fn pairs(reads: &[(&str, u64)]) -> Vec<(String, u64)> {
    reads.iter().map(|(id, n)| ((*id).to_owned(), *n)).collect()
}

async fn top(conn: &RedisConnection, n: usize) -> Vec<String> {
    hot::top(conn, KEY, n)
        .await
        .unwrap()
        .iter()
        .map(|id| id.as_str().to_owned())
        .collect()
}

async fn score(conn: &RedisConnection, member: &str) -> Option<f64> {
    redis::cmd("ZSCORE")
        .arg(KEY)
        .arg(member)
        .query_async(&mut conn.clone())
        .await
        .unwrap()
}

/// Recent reads weigh more than old ones: two half-lives later, 4 reads
/// count for more than 10 read before, and 5 old reads for about as much as
/// one new one... less than 2 new ones. The set keeps its capacity's
/// hottest keys, and reading it never returns the landmark.
#[tokio::test]
async fn recent_reads_outweigh_old_ones_and_the_record_keeps_the_hottest() {
    let redis = TestRedis::start().await;
    let conn = connection(&redis).await;
    let config = config(Duration::from_millis(500), 3);
    hot::add_reads(&conn, &config, &pairs(&[("A", 10), ("B", 5)]))
        .await
        .unwrap();
    assert_eq!(top(&conn, 10).await, ["A", "B"]);

    tokio::time::sleep(Duration::from_millis(1000)).await;
    // Now: A decayed to ~2.5, B to ~1.25, new reads count in full.
    hot::add_reads(&conn, &config, &pairs(&[("C", 4), ("D", 2), ("E", 1)]))
        .await
        .unwrap();
    assert_eq!(
        top(&conn, 10).await,
        ["C", "A", "D"],
        "C (4 now) > A (10, two half-lives ago) > D (2 now) > B (5 then) > E (1 now); three kept"
    );
    assert_eq!(top(&conn, 2).await, ["C", "A"]);
    let members: i64 = redis::cmd("ZCARD")
        .arg(KEY)
        .query_async(&mut conn.clone())
        .await
        .unwrap();
    assert_eq!(members, 4, "three keys and the landmark");
    assert!(score(&conn, LANDMARK).await.unwrap() < 0.0);
}

/// The weights grow as 2^(age / half-life); past 20 half-lives the whole set
/// is scaled down and the landmark moves to now, keeping the order.
#[tokio::test]
async fn the_scores_are_rescaled_before_the_weights_grow_too_large() {
    let redis = TestRedis::start().await;
    let conn = connection(&redis).await;
    let config = config(Duration::from_millis(20), 100);
    hot::add_reads(&conn, &config, &pairs(&[("OLD", 1000)]))
        .await
        .unwrap();
    let first_landmark = -score(&conn, LANDMARK).await.unwrap();
    tokio::time::sleep(Duration::from_millis(600)).await; // 30 half-lives
    hot::add_reads(&conn, &config, &pairs(&[("NEW", 1)]))
        .await
        .unwrap();
    let landmark = -score(&conn, LANDMARK).await.unwrap();
    assert!(
        landmark >= first_landmark + 500.0,
        "{first_landmark} -> {landmark}"
    );
    let old = score(&conn, "OLD").await.unwrap();
    let new = score(&conn, "NEW").await.unwrap();
    // Without the rescale NEW would have added 2^30 and OLD kept 1000.
    assert!((0.9..=1.1).contains(&new), "NEW {new}");
    assert!(
        old > 0.0 && old < 0.01,
        "OLD {old}: 1000 reads 30 half-lives ago"
    );
    assert_eq!(top(&conn, 10).await, ["NEW", "OLD"]);
}

/// The read path's recorder samples reads and its task adds them to Redis:
/// a key read 10 times as often ranks first.
#[tokio::test]
async fn sampled_reads_reach_the_record() {
    let redis = TestRedis::start().await;
    let conn = connection(&redis).await;
    let (recorder, record) = HotRecord::new(conn.clone(), config(Duration::from_secs(600), 100));
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(record.run(shutdown.clone()));
    let often = document("OFTEN", 1);
    let rarely = document("RARELY", 1);
    for i in 0..2200 {
        recorder.record(&often);
        if i % 10 == 0 {
            recorder.record(&rarely);
        }
    }
    let started = Instant::now();
    while top(&conn, 10).await != ["OFTEN", "RARELY"] {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "record: {:?}",
            top(&conn, 10).await
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Each sample counts for the reads it stands for.
    let often_score = score(&conn, "OFTEN").await.unwrap();
    assert!(
        (1000.0..=4000.0).contains(&often_score),
        "2200 reads scored {often_score}"
    );
    shutdown.cancel();
    task.await.unwrap();
}

fn document(id: &str, version: i64) -> CachedDocument {
    let doc: FeatureDocument = serde_json::from_value(json!({
        "version": version,
        "customer_id": id,
        "features": {"n": 1},
        "calculated_at": "2026-01-01T00:00:00.000Z",
        "model_version": "v1.0.0",
        "expires_at": "2999-01-01T00:00:00.000Z",
    }))
    .unwrap();
    CachedDocument::from_document(&doc)
}

fn redis_tier(redis: &TestRedis) -> RedisTier {
    RedisTier::connect(&RedisConfig {
        url: redis.url(),
        cluster_nodes: Vec::new(),
        tls: Default::default(),
        timeout: Duration::from_secs(2),
        ttl: TtlPolicy {
            document_ttl: Duration::from_secs(3600),
            marker_ttl: Duration::from_secs(60),
            negative_ttl: Duration::from_secs(5),
        },
    })
    .unwrap()
}

async fn store() -> FeatureStore {
    let db = TestDb::new("warm").await;
    FeatureStore::connect(&StoreConfig {
        uri: mongo_uri(),
        database: db.name().to_owned(),
        collection: DEFAULT_COLLECTION.to_owned(),
        timeout: Duration::from_secs(10),
        app_name: "warm-test".to_owned(),
    })
    .await
    .unwrap()
}

async fn write(store: &FeatureStore, id: &str) -> i64 {
    store
        .upsert(&FeatureWrite {
            customer_id: CustomerId::parse(id).unwrap(),
            features: json!({"id": id}).as_object().cloned().unwrap_or_default(),
            model_version: "v1.0.0".into(),
            ttl_days: 7,
            traceparent: None,
        })
        .await
        .unwrap()
        .document
        .version
}

fn warm_config(keys: usize) -> WarmConfig {
    WarmConfig {
        hot_key: KEY.into(),
        keys,
        rate_per_second: 1000,
    }
}

async fn redis_keys(conn: &RedisConnection) -> Vec<String> {
    let mut keys: Vec<String> = redis::cmd("KEYS")
        .arg("features:*")
        .query_async(&mut conn.clone())
        .await
        .unwrap();
    keys.sort();
    keys
}

/// After a flush of Redis the invalidator puts the hottest keys back, behind
/// its fence and through the guard: documents MongoDB holds land, ids it
/// does not hold leave nothing behind, keys beyond WARM_KEYS are not read,
/// a newer version already in Redis is kept, and a writer whose fence moved
/// writes nothing.
#[tokio::test]
async fn the_refill_puts_the_hottest_documents_back_behind_the_fence() {
    let redis = TestRedis::start().await;
    let conn = connection(&redis).await;
    let tier = redis_tier(&redis);
    let store = store().await;
    let mut h2 = 0;
    for id in ["H1", "H2", "H3", "COLD"] {
        let version = write(&store, id).await;
        if id == "H2" {
            h2 = version;
        }
    }
    let hot_config = config(Duration::from_secs(600), 100);
    hot::add_reads(
        &conn,
        &hot_config,
        &pairs(&[
            ("H1", 50),
            ("H2", 40),
            ("GONE", 30),
            ("H3", 20),
            ("COLD", 1),
        ]),
    )
    .await
    .unwrap();
    // Someone filled H2 meanwhile (with a version MongoDB does not hold
    // yet, to tell it apart): a key holding a document is left alone.
    let offers = tier
        .offer_many(&[Entry::Document(document("H2", h2 + 1))])
        .await
        .unwrap();
    assert!(offers[0].accepted());
    let newer_version = h2 + 1;

    let lease = "cache-invalidator:test.features:leader";
    let _: () = redis::cmd("SET")
        .arg(lease)
        .arg("term-1")
        .query_async(&mut conn.clone())
        .await
        .unwrap();
    let writer = tier.fenced(Fence::new(lease, "term-1"));
    let stored = warm::refill_redis(&tier, &writer, &store, &warm_config(4))
        .await
        .unwrap();
    assert_eq!(stored, 2, "H1 and H3 stored; H2 held a document already");
    assert_eq!(
        redis_keys(&conn).await,
        ["features:H1", "features:H2", "features:H3"],
        "no reservation left for GONE, COLD not among the 4 hottest"
    );
    assert_eq!(
        tier.get("H2").await.unwrap().unwrap().version(),
        newer_version
    );

    // A successor holds the lease: the old term's refill writes nothing.
    let _: () = redis::cmd("DEL")
        .arg("features:H1")
        .arg("features:H3")
        .query_async(&mut conn.clone())
        .await
        .unwrap();
    let _: () = redis::cmd("SET")
        .arg(lease)
        .arg("term-2")
        .query_async(&mut conn.clone())
        .await
        .unwrap();
    let refused = warm::refill_redis(&tier, &writer, &store, &warm_config(4)).await;
    assert!(matches!(refused, Err(WarmError::Fenced)), "{refused:?}");
    for id in ["H1", "H3"] {
        assert!(
            !matches!(tier.get(id).await.unwrap(), Some(Entry::Document(_))),
            "{id} written by a fenced writer"
        );
    }
}

/// A replica's warm-up: after the near cache's first flush (the start) and
/// after every flush since, the hottest keys are in the near cache before
/// anyone reads them; the warm-up's own reads are not counted as reads.
#[tokio::test]
async fn a_replica_preloads_the_hottest_keys_after_each_flush() {
    let redis = TestRedis::start().await;
    let conn = connection(&redis).await;
    let store = store().await;
    let ids = ["W1", "W2", "W3"];
    for id in ids {
        write(&store, id).await;
    }
    hot::add_reads(
        &conn,
        &config(Duration::from_secs(600), 100),
        &pairs(&[("W1", 30), ("W2", 20), ("W3", 10)]),
    )
    .await
    .unwrap();
    let near = NearCache::new(&NearCacheConfig {
        max_entries: 1000,
        max_bytes: 64 << 20,
        ttl: Duration::from_secs(60),
        negative_ttl: Duration::from_secs(5),
    });
    let tiers = TieredStore::new(Some(near), redis_tier(&redis), store);
    let warmer = warm::Warmer::new(&tiers, warm_config(2)).expect("a near cache");
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(warmer.run(shutdown.clone()));
    let held = |tiers: &TieredStore| -> Vec<&'static str> {
        ids.into_iter()
            .filter(|id| tiers.near().unwrap().get(id).is_some())
            .collect()
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(held(&tiers).is_empty(), "nothing before the first flush");

    for round in 0..2 {
        tiers.near().unwrap().flush();
        let started = Instant::now();
        while held(&tiers) != ["W1", "W2"] {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "round {round}: near cache holds {:?}",
                held(&tiers)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let id = CustomerId::parse("W1").unwrap();
    let lookup = tiers.get(&id).await.unwrap().unwrap();
    assert_eq!(lookup.source, Source::Local);
    shutdown.cancel();
    task.await.unwrap();
}

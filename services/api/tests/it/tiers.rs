//! What the cache tiers hold, seen from outside: the version guard refusing
//! stale fills and resurrections, tombstones, Redis TTLs, and expired
//! documents that are never served from any tier.

use crate::support::TestStack;
use chrono::{DateTime, Duration, Utc};
use feature_cache::{CacheTier, CachedDocument, Entry};
use feature_store::FeatureDocument;
use redis::AsyncCommands;
use serde_json::{Value, json};

async fn redis_value(stack: &TestStack, id: &str) -> Option<String> {
    let mut redis = stack.redis_conn().await;
    redis.get(format!("features:{id}")).await.unwrap()
}

async fn redis_pttl(stack: &TestStack, id: &str) -> i64 {
    let mut redis = stack.redis_conn().await;
    redis.pttl(format!("features:{id}")).await.unwrap()
}

fn version(doc: &Value) -> i64 {
    doc["version"].as_i64().unwrap()
}

/// A document as another writer would have made it.
fn document(id: &str, version: i64, expires_at: DateTime<Utc>, tag: &str) -> FeatureDocument {
    FeatureDocument {
        version,
        customer_id: id.to_owned(),
        features: json!({"tag": tag}).as_object().cloned().unwrap(),
        calculated_at: expires_at - Duration::days(7),
        model_version: "v0.9.0".to_owned(),
        expires_at: Some(expires_at),
    }
}

/// Writes a document straight into MongoDB with the driver.
async fn insert_into_mongo(stack: &TestStack, doc: &FeatureDocument) {
    let features = bson::to_document(&doc.features).unwrap();
    stack
        .db
        .features()
        .insert_one(bson::doc! {
            "_id": &doc.customer_id,
            "customer_id": &doc.customer_id,
            "features": features,
            "calculated_at": feature_store::model::format_time(doc.calculated_at),
            "model_version": &doc.model_version,
            "expires_at": bson::DateTime::from_chrono(doc.expires_at.unwrap()),
            "version": doc.version,
        })
        .await
        .unwrap();
}

/// Writes a document straight into Redis (`SET features:X <json>`).
async fn set_in_redis(stack: &TestStack, doc: &FeatureDocument) {
    let mut redis = stack.redis_conn().await;
    let _: () = redis
        .set_ex(
            format!("features:{}", doc.customer_id),
            serde_json::to_string(doc).unwrap(),
            3600,
        )
        .await
        .unwrap();
}

#[tokio::test]
async fn an_old_document_offered_after_an_update_is_refused() {
    let stack = TestStack::start("tiers_stale_fill", &[]).await;
    let v1 = stack.upsert("RACE", json!({"gen": 1})).await;
    let reply = stack.api.get("/api/features/RACE/").await;
    assert_eq!(reply.json()["version"], v1["version"]);
    let raw_v1 = redis_value(&stack, "RACE").await.expect("v1 in Redis");

    let v2 = stack.upsert("RACE", json!({"gen": 2})).await;
    assert!(version(&v2) > version(&v1));

    // A reader that loaded v1 before the update now tries to fill it.
    let stale = Entry::from_redis_value("RACE", raw_v1.clone()).expect("a document entry");
    let tiers = &stack.api.state().tiers;
    assert!(
        !tiers.redis().offer(stale.clone()).await.unwrap(),
        "Redis took v1 over v2"
    );
    let near = tiers.near().expect("near cache on");
    assert!(
        !CacheTier::offer(near, stale).await.unwrap(),
        "near cache took v1 over v2"
    );

    let held = redis_value(&stack, "RACE").await.unwrap();
    assert_eq!(serde_json::from_str::<Value>(&held).unwrap(), v2);
    let reply = stack.api.get("/api/features/RACE/").await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.header("x-cache-source"), Some("local"));
    assert_eq!(reply.json()["version"], v2["version"]);
    assert_eq!(reply.json()["features"], json!({"gen": 2}));

    // The same through Redis alone.
    let mut redis = stack.redis_conn().await;
    let _: () = redis.del("features:RACE").await.unwrap();
    tiers.near().unwrap().flush();
    let reply = stack.api.get("/api/features/RACE/").await;
    assert_eq!(reply.header("x-cache-source"), Some("mongodb"));
    assert_eq!(reply.json()["version"], v2["version"]);
    let stale = Entry::from_redis_value("RACE", raw_v1.clone()).unwrap();
    assert!(!tiers.redis().offer(stale).await.unwrap());
    tiers.near().unwrap().flush();
    let reply = stack.api.get("/api/features/RACE/").await;
    assert_eq!(reply.header("x-cache-source"), Some("redis"));
    assert_eq!(reply.json()["version"], v2["version"]);
    stack.finish().await;
}

#[tokio::test]
async fn a_deleted_document_leaves_a_tombstone_that_refuses_it() {
    let stack = TestStack::start(
        "tiers_tombstone",
        &[
            ("LOCAL_CACHE_ENABLED", "false"),
            ("TOMBSTONE_TTL_MS", "60000"),
        ],
    )
    .await;
    let v1 = stack.upsert("GONE", json!({"a": 1})).await;
    let reply = stack.api.get("/api/features/GONE/").await;
    assert_eq!(reply.header("x-cache-source"), Some("redis"));
    let raw_v1 = redis_value(&stack, "GONE").await.unwrap();

    assert_eq!(stack.api.delete("/api/features/GONE/").await.status, 204);
    let tombstone = redis_value(&stack, "GONE").await.expect("a tombstone");
    assert_eq!(
        tombstone,
        format!(r#"{{"version":{},"deleted":true}}"#, version(&v1))
    );
    let ttl = redis_pttl(&stack, "GONE").await;
    assert!((50_000..=60_000).contains(&ttl), "tombstone PTTL {ttl}");

    let tiers = &stack.api.state().tiers;
    let stale = Entry::from_redis_value("GONE", raw_v1.clone()).unwrap();
    assert!(
        !tiers.redis().offer(stale).await.unwrap(),
        "the deleted document came back"
    );
    let older = Entry::Document(CachedDocument::from_document(&document(
        "GONE",
        version(&v1) - 1,
        Utc::now() + Duration::days(1),
        "older",
    )));
    assert!(!tiers.redis().offer(older).await.unwrap());
    assert_eq!(redis_value(&stack, "GONE").await.unwrap(), tombstone);

    let reply = stack.api.get("/api/features/GONE/").await;
    reply.expect_error(404, "not_found");
    assert_eq!(redis_value(&stack, "GONE").await.unwrap(), tombstone);

    // Created again: a larger version replaces the tombstone.
    let v2 = stack.upsert("GONE", json!({"a": 2})).await;
    assert!(version(&v2) > version(&v1));
    let held: Value = serde_json::from_str(&redis_value(&stack, "GONE").await.unwrap()).unwrap();
    assert_eq!(held, v2);
    let reply = stack.api.get("/api/features/GONE/").await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.json()["features"], json!({"a": 2}));
    stack.finish().await;
}

#[tokio::test]
async fn redis_keys_live_no_longer_than_redis_ttl_nor_the_document() {
    let two_days_ms = 2 * 86_400_000;
    let stack = TestStack::start("tiers_ttl", &[("REDIS_TTL", "172800")]).await;
    stack.upsert("LONG", json!({})).await; // expires in 7 days
    let ttl = redis_pttl(&stack, "LONG").await;
    // Up to 5 % jitter below the bound, and a few seconds for the test.
    assert!(
        ttl <= two_days_ms && ttl >= two_days_ms * 95 / 100 - 5_000,
        "PTTL {ttl}"
    );

    let reply = stack
        .api
        .post(
            "/api/features/",
            &json!({"customer_id": "SHORT", "features": {}, "ttl_days": 1}),
        )
        .await;
    assert_eq!(reply.status, 201);
    let ttl = redis_pttl(&stack, "SHORT").await;
    let day_ms = 86_400_000;
    assert!(
        ttl <= day_ms && ttl >= day_ms * 95 / 100 - 5_000,
        "PTTL {ttl}"
    );
    stack.finish().await;
}

#[tokio::test]
async fn expired_documents_are_never_served() {
    let stack = TestStack::start("tiers_expired", &[]).await;
    let past = Utc::now() - Duration::minutes(5);
    let future = Utc::now() + Duration::days(1);

    // Expired in MongoDB (not yet removed by the TTL monitor).
    insert_into_mongo(&stack, &document("EXP_MONGO", 5, past, "expired")).await;
    // Expired in Redis, absent from MongoDB.
    set_in_redis(&stack, &document("EXP_REDIS", 7, past, "expired")).await;
    // Expired in both.
    insert_into_mongo(&stack, &document("EXP_BOTH", 3, past, "expired")).await;
    set_in_redis(&stack, &document("EXP_BOTH", 3, past, "expired")).await;
    // Expired in Redis, a valid document in MongoDB.
    set_in_redis(&stack, &document("EXP_CACHED", 9, past, "expired")).await;
    insert_into_mongo(&stack, &document("EXP_CACHED", 4, future, "valid")).await;

    for id in ["EXP_MONGO", "EXP_REDIS", "EXP_BOTH"] {
        for _ in 0..2 {
            let reply = stack.api.get(&format!("/api/features/{id}/")).await;
            assert_eq!(
                reply.json(),
                json!({"error": format!("Features not found for customer_id: {id}"), "code": "not_found"}),
                "{id}"
            );
        }
    }
    for _ in 0..2 {
        let reply = stack.api.get("/api/features/EXP_CACHED/").await;
        assert_eq!(reply.status, 200);
        let body = reply.json();
        assert_eq!(body["features"], json!({"tag": "valid"}));
        assert_eq!(body["version"], 4);
    }

    let reply = stack
        .api
        .post(
            "/api/features/batch/",
            &json!({"customer_ids": ["EXP_MONGO", "EXP_REDIS", "EXP_BOTH", "EXP_CACHED"]}),
        )
        .await;
    assert_eq!(reply.status, 200);
    let body = reply.json();
    let found = body["found"].as_object().unwrap();
    assert_eq!(found.keys().collect::<Vec<_>>(), ["EXP_CACHED"]);
    assert_eq!(found["EXP_CACHED"]["features"], json!({"tag": "valid"}));
    let mut missing: Vec<&str> = body["missing"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    missing.sort_unstable();
    assert_eq!(missing, ["EXP_BOTH", "EXP_MONGO", "EXP_REDIS"]);
    stack.finish().await;
}

/// An entry planted in Redis with a version far ahead of anything MongoDB
/// could give (someone with write access to Redis) does not pin the
/// document: it counts as absent, is served from MongoDB and replaced.
#[tokio::test]
async fn a_forged_entry_from_the_future_is_replaced() {
    let stack = TestStack::start("tiers_forged", &[("LOCAL_CACHE_ENABLED", "false")]).await;
    let real = stack.upsert("FORGED", json!({"who": "real"})).await;
    let forged = document(
        "FORGED",
        (Utc::now() + Duration::days(1)).timestamp_millis() * 1000,
        Utc::now() + Duration::days(1),
        "forged",
    );
    let raw = Entry::Document(CachedDocument::from_document(&forged)).to_redis_value();
    let mut conn = stack.redis_conn().await;
    let _: () = conn.set("features:FORGED", raw).await.unwrap();

    let reply = stack.api.get("/api/features/FORGED/").await;
    assert_eq!(reply.status, 200);
    assert_eq!(
        reply.json()["features"],
        json!({"who": "real"}),
        "the forged entry was served"
    );
    assert_eq!(reply.header("x-cache-source"), Some("mongodb"));
    let held: Value = serde_json::from_str(&redis_value(&stack, "FORGED").await.unwrap()).unwrap();
    assert_eq!(
        held["version"], real["version"],
        "the forged entry was not replaced"
    );
    let reply = stack.api.get("/api/features/FORGED/").await;
    assert_eq!(reply.header("x-cache-source"), Some("redis"));
    stack.finish().await;
}

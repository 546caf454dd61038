//! Behaviour while a store is down: Redis trouble degrades to MongoDB and
//! heals by itself; without MongoDB, cached documents are still served and
//! everything else fails fast with 503.

use crate::support::TestApi;
use crate::support::env;
use chrono::{Duration as Days, Utc};
use feature_cache::{CacheTier, CachedDocument, Entry};
use feature_store::FeatureDocument;
use serde_json::json;
use std::time::{Duration, Instant};
use testkit::{TestRedis, eventually, free_port, unique_db};

#[tokio::test]
async fn redis_down_degrades_to_mongodb_and_recovers() {
    let mut stack = crate::support::TestStack::start(
        "resilience_redis",
        &[
            ("LOCAL_CACHE_ENABLED", "false"),
            ("REDIS_TIMEOUT_MS", "500"),
        ],
    )
    .await;
    let api = &stack.api;
    for id in ["R1", "R2"] {
        let reply = api
            .post(
                "/api/features/",
                &json!({"customer_id": id, "features": {"id": id}}),
            )
            .await;
        assert_eq!(reply.status, 201);
    }
    assert_eq!(
        api.get("/api/features/R1/").await.header("x-cache-source"),
        Some("redis")
    );

    stack.redis.stop();
    let api = &stack.api;

    let started = Instant::now();
    let reply = api.get("/api/features/R1/").await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.header("x-cache-source"), Some("mongodb"));
    assert_eq!(reply.json()["source"], "mongodb");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );

    let reply = api
        .post(
            "/api/features/",
            &json!({"customer_id": "R3", "features": {"new": true}}),
        )
        .await;
    assert_eq!(reply.status, 201, "{}", reply.text());
    let reply = api
        .post(
            "/api/features/",
            &json!({"customer_id": "R1", "features": {"id": "R1", "v": 2}}),
        )
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let reply = api.get("/api/features/R1/").await;
    assert_eq!(reply.json()["features"], json!({"id": "R1", "v": 2}));
    let reply = api
        .post(
            "/api/features/batch/",
            &json!({"customer_ids": ["R1", "R2", "R3", "R4"]}),
        )
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.json()["found"].as_object().unwrap().len(), 3);
    assert_eq!(reply.json()["missing"], json!(["R4"]));
    assert_eq!(api.delete("/api/features/R2/").await.status, 204);
    assert_eq!(api.get("/api/features/R2/").await.status, 404);

    let reply = api.get("/api/health/").await;
    assert_eq!(reply.status, 503, "{}", reply.text());
    let health = reply.json();
    assert_eq!(health["status"], "degraded");
    assert_eq!(health["redis"]["available"], false);
    assert!(
        health["redis"]["status"]
            .as_str()
            .unwrap()
            .starts_with("error"),
        "{health}"
    );
    assert!(health["redis"]["total_keys"].is_null());
    assert_eq!(health["mongodb"]["available"], true);

    stack.redis.restart().await;
    let api = &stack.api;
    eventually(
        Duration::from_secs(10),
        Duration::from_millis(100),
        || async {
            let reply = api.get("/api/health/").await;
            if reply.status == 200 && reply.json()["status"] == "healthy" {
                Ok(())
            } else {
                Err(format!("health {}: {}", reply.status, reply.text()))
            }
        },
    )
    .await
    .expect("health recovers after Redis restarts");

    // The restarted Redis is empty: a read warms it, the next is a hit.
    let reply = api.get("/api/features/R1/").await;
    assert_eq!(reply.header("x-cache-source"), Some("mongodb"));
    let reply = api.get("/api/features/R1/").await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.header("x-cache-source"), Some("redis"));
    assert_eq!(reply.json()["features"], json!({"id": "R1", "v": 2}));
    stack.finish().await;
}

#[tokio::test]
async fn mongodb_down_fails_fast_and_serves_what_is_cached() {
    let redis = TestRedis::start().await;
    // Nothing listens on this port.
    let dead = format!(
        "mongodb://127.0.0.1:{}/?replicaSet=secantus&retryWrites=false",
        free_port()
    );
    let api = TestApi::start(
        &redis.url(),
        &unique_db("resilience_mongo"),
        env(&[("MONGO_URI", &dead), ("MONGO_TIMEOUT_MS", "300")]),
    )
    .await;

    let bound = Duration::from_secs(3);
    let json_ct =
        |request: reqwest::RequestBuilder| request.header("content-type", "application/json");
    let client = api.client();
    for (what, request) in [
        ("GET", client.get(api.url("/api/features/UNCACHED/"))),
        (
            "POST",
            json_ct(client.post(api.url("/api/features/")))
                .body(r#"{"customer_id": "NEW", "features": {}}"#),
        ),
        ("DELETE", client.delete(api.url("/api/features/UNCACHED/"))),
        (
            "bulk",
            json_ct(client.post(api.url("/api/features/bulk/")))
                .body(r#"{"features_list": [{"customer_id": "NEW", "features": {}}]}"#),
        ),
        (
            "batch",
            json_ct(client.post(api.url("/api/features/batch/")))
                .body(r#"{"customer_ids": ["UNCACHED"]}"#),
        ),
    ] {
        let started = Instant::now();
        let reply = api.send(request).await;
        let took = started.elapsed();
        reply.expect_error(503, "service_unavailable");
        assert_eq!(reply.header("retry-after"), Some("1"), "{what}");
        assert!(took < bound, "{what} took {took:?}");
    }

    let started = Instant::now();
    let reply = api.get("/api/health/").await;
    assert!(started.elapsed() < bound);
    assert_eq!(reply.status, 503);
    let health = reply.json();
    assert_eq!(health["status"], "degraded");
    assert_eq!(health["mongodb"]["available"], false);
    assert!(health["mongodb"]["documents_count"].is_null());
    assert_eq!(health["redis"]["available"], true);

    // A document that is in Redis is still served.
    let doc = FeatureDocument {
        version: 42,
        customer_id: "CACHED".into(),
        features: json!({"kept": true}).as_object().cloned().unwrap(),
        calculated_at: Utc::now(),
        model_version: "v1.0.0".into(),
        expires_at: Some(Utc::now() + Days::days(1)),
    };
    let offered = Entry::Document(CachedDocument::from_document(&doc));
    assert!(api.state().tiers.redis().offer(offered).await.unwrap());
    let reply = api.get("/api/features/CACHED/").await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.header("x-cache-source"), Some("redis"));
    let body = reply.json();
    assert_eq!(body["version"], 42);
    assert_eq!(body["features"], json!({"kept": true}));
    let reply = api.get("/api/features/CACHED").await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.header("x-cache-source"), Some("local"));
    let reply = api
        .post("/api/features/batch/", &json!({"customer_ids": ["CACHED"]}))
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.json()["found"]["CACHED"]["version"], 42);

    api.shutdown()
        .await
        .expect("clean shutdown without MongoDB");
}

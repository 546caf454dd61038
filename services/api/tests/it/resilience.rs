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
use testkit::{CapturedLogs, TestRedis, eventually, free_port, unique_db};

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

/// An outage is logged when it starts and when it ends, not per request:
/// 50 reads and 5 writes with Redis down give one warning per condition
/// (each failure is still there at debug), and one info line each once
/// Redis is back.
#[tokio::test]
async fn a_redis_outage_is_logged_once_per_change_of_state() {
    let (logs, _guard) = CapturedLogs::capture("info,telemetry::condition=debug");
    let mut stack =
        crate::support::TestStack::start("resilience_outage_logs", &[("REDIS_TIMEOUT_MS", "300")])
            .await;
    let reads_fail = "Redis reads fail";
    let writes_fail = "Redis writes fail";
    let subscription_lost = "invalidation subscription lost";

    stack.redis.stop();
    let api = &stack.api;
    for i in 0..50 {
        // Ids nobody wrote: every read asks Redis, then MongoDB.
        let reply = api.get(&format!("/api/features/ABSENT{i}/")).await;
        assert_eq!(reply.status, 404, "{}", reply.text());
    }
    for i in 0..5 {
        let reply = api
            .post(
                "/api/features/",
                &json!({"customer_id": format!("W{i}"), "features": {"i": i}}),
            )
            .await;
        assert_eq!(reply.status, 201, "{}", reply.text());
    }
    // Let the subscriber fail a few reconnects (backoff 0.1 s, doubling).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let lines = logs.lines();
    assert_eq!(logs.count("WARN", reads_fail), 1, "{lines:#?}");
    assert_eq!(logs.count("WARN", writes_fail), 1, "{lines:#?}");
    assert_eq!(logs.count("WARN", subscription_lost), 1, "{lines:#?}");
    assert!(logs.count("DEBUG", reads_fail) >= 99, "{lines:#?}");
    assert!(logs.count("DEBUG", subscription_lost) >= 2, "{lines:#?}");
    // The fleet view (heartbeat, near-cache responder) reports the same
    // outage at most once each.
    for condition in ["fleet_heartbeat", "fleet_responder"] {
        assert!(logs.count("WARN", condition) <= 1, "{lines:#?}");
    }
    // Besides the start's one warning that the API is open (no credentials
    // configured), only the three state changes warn.
    let warnings = lines
        .iter()
        .filter(|l| {
            l.contains("WARN") && !l.contains("no credentials configured") && !l.contains("fleet_")
        })
        .count();
    assert_eq!(warnings, 3, "only the three state changes warn: {lines:#?}");
    let warning = lines
        .iter()
        .find(|l| l.contains("WARN") && l.contains(reads_fail))
        .unwrap();
    assert!(
        warning.contains("error="),
        "the warning carries the error: {warning}"
    );

    stack.redis.restart().await;
    let api = &stack.api;
    eventually(
        Duration::from_secs(15),
        Duration::from_millis(100),
        || async {
            // An id no tier holds, so the read asks Redis.
            let read = api.get("/api/features/ABSENT0/").await;
            let write = api
                .post(
                    "/api/features/",
                    &json!({"customer_id": "W1", "features": {"again": true}}),
                )
                .await;
            assert_eq!((read.status, write.status), (404, 200));
            for text in [
                "Redis reads work again",
                "Redis writes work again",
                "invalidation subscription restored",
            ] {
                if logs.count("INFO", text) == 0 {
                    return Err(format!("no {text:?} yet"));
                }
            }
            Ok(())
        },
    )
    .await
    .unwrap_or_else(|err| panic!("{err}: {:#?}", logs.lines()));
    for i in 0..20 {
        let reply = api.get(&format!("/api/features/ABSENT{i}/")).await;
        assert_eq!(reply.status, 404);
    }
    let lines = logs.lines();
    assert_eq!(
        logs.count("INFO", "Redis reads work again"),
        1,
        "{lines:#?}"
    );
    assert_eq!(
        logs.count("INFO", "Redis writes work again"),
        1,
        "{lines:#?}"
    );
    assert_eq!(
        logs.count("INFO", "invalidation subscription restored"),
        1,
        "{lines:#?}"
    );
    assert_eq!(logs.count("WARN", reads_fail), 1, "{lines:#?}");
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
    let (logs, _guard) = CapturedLogs::capture("info");
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
    assert_eq!(health["mongodb"]["collection"], "customer_features");
    assert_eq!(health["redis"]["available"], true);
    // Six failed requests and a failed health check: one warning, for the
    // outage (and none per request).
    let lines = logs.lines();
    assert_eq!(
        logs.count("WARN", "MongoDB does not answer"),
        1,
        "{lines:#?}"
    );
    assert_eq!(logs.count("WARN", "request failed"), 0, "{lines:#?}");

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

/// A Redis that refuses writes once full (`noeviction` with a memory limit)
/// would stop changes from reaching the caches: the replica says so once,
/// at error level, as soon as it can ask Redis; a policy that evicts only
/// keys with a TTL is reported as safe.
#[tokio::test]
async fn the_eviction_policy_is_judged_at_start() {
    for (policy, level, text) in [
        ("noeviction", "ERROR", "refuses writes when full"),
        ("allkeys-lru", "WARN", "may evict the invalidators' keys"),
        ("volatile-lru", "INFO", "keeps the cache's guarantees"),
    ] {
        let (logs, _guard) = CapturedLogs::capture("info");
        let redis =
            TestRedis::start_with(&["--maxmemory", "8mb", "--maxmemory-policy", policy]).await;
        let api = TestApi::start(&redis.url(), &unique_db("eviction_policy"), env(&[])).await;
        eventually(
            Duration::from_secs(10),
            Duration::from_millis(50),
            || async {
                if logs.count(level, text) == 1 {
                    Ok(())
                } else {
                    Err(format!("{policy}: {:#?}", logs.lines()))
                }
            },
        )
        .await
        .unwrap_or_else(|err| panic!("{err}"));
        let metrics = api.get("/metrics").await.text();
        let safe = policy.starts_with("volatile");
        assert!(
            metrics.contains(&format!(
                "redis_eviction_policy_safe {}",
                if safe { 1 } else { 0 }
            )),
            "{policy}: {metrics}"
        );
        api.shutdown().await.expect("shutdown");
    }
}

/// A replica started while MongoDB cannot be reached still gets the TTL
/// index in place once MongoDB answers: it keeps trying in the background.
#[tokio::test]
async fn the_ttl_index_is_ensured_once_mongodb_answers() {
    let redis = TestRedis::start().await;
    let proxy = testkit::proxy::GatedProxy::start(testkit::mongo::mongo_addr()).await;
    proxy.close();
    let db = testkit::TestDb::new("ttl_index").await;
    let uri = format!(
        "mongodb://127.0.0.1:{}/?directConnection=true&retryWrites=false",
        proxy.port()
    );
    let api = TestApi::start(
        &redis.url(),
        db.name(),
        env(&[("MONGO_URI", &uri), ("MONGO_TIMEOUT_MS", "300")]),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    proxy.open();
    eventually(
        Duration::from_secs(20),
        Duration::from_millis(200),
        || async {
            let names = db.features().list_index_names().await.unwrap_or_default();
            if names.iter().any(|n| n == "expires_at_ttl") {
                Ok(())
            } else {
                Err(format!("indexes: {names:?}"))
            }
        },
    )
    .await
    .expect("the TTL index was never created");
    api.shutdown().await.expect("shutdown");
    db.drop_db().await;
}

//! The REST contract, endpoint by endpoint (each with and without its trailing
//! slash), against the real router with a Redis and a database of each test's
//! own.

use crate::support::Reply;
use crate::support::{NEAR_OFF, TestStack};
use chrono::{DateTime, Utc};
use redis::AsyncCommands;
use serde_json::{Value, json};
use std::collections::BTreeSet;
use testkit::prometheus;

fn time(doc: &Value, field: &str) -> DateTime<Utc> {
    let raw = doc[field]
        .as_str()
        .unwrap_or_else(|| panic!("{field} is not a string: {doc}"));
    // RFC 3339, UTC, milliseconds: 2026-01-02T03:04:05.678Z
    assert!(raw.len() == 24 && raw.ends_with('Z'), "{field} = {raw:?}");
    DateTime::parse_from_rfc3339(raw)
        .unwrap()
        .with_timezone(&Utc)
}

fn keys(doc: &Value) -> BTreeSet<String> {
    doc.as_object()
        .unwrap_or_else(|| panic!("not an object: {doc}"))
        .keys()
        .cloned()
        .collect()
}

fn set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|s| (*s).to_owned()).collect()
}

/// A stored document as the API returns it after a write: exactly these
/// fields, and `expires_at` = `calculated_at` + `ttl_days`.
fn assert_stored(doc: &Value, id: &str, features: &Value, model_version: &str, ttl_days: i64) {
    assert_eq!(
        keys(doc),
        set(&[
            "version",
            "customer_id",
            "features",
            "calculated_at",
            "model_version",
            "expires_at"
        ]),
        "{doc}"
    );
    assert_eq!(doc["customer_id"], id);
    assert_eq!(&doc["features"], features);
    assert_eq!(doc["model_version"], model_version);
    assert!(doc["version"].as_i64().is_some_and(|v| v > 0), "{doc}");
    let calculated_at = time(doc, "calculated_at");
    let expires_at = time(doc, "expires_at");
    assert_eq!(expires_at - calculated_at, chrono::Duration::days(ttl_days));
    let age = Utc::now() - calculated_at;
    assert!(
        age.num_seconds().abs() < 300,
        "calculated_at {calculated_at} is not now"
    );
}

/// A document as `GET` serves it: the stored one plus `source`, which the
/// `x-cache-source` header repeats.
fn assert_served(reply: &Reply, stored: &Value, source: &str) {
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.header("content-type"), Some("application/json"));
    assert_eq!(reply.header("x-cache-source"), Some(source));
    let mut body = reply.json();
    assert_eq!(body["source"], source, "{body}");
    body.as_object_mut().unwrap().remove("source");
    assert_eq!(&body, stored);
}

#[tokio::test]
async fn get_serves_the_document_with_and_without_slash() {
    let stack = TestStack::start("contract_get", &[NEAR_OFF]).await;
    let features = json!({"score": 0.75, "segment": "gold", "nested": {"list": [1, "two", null]}});
    let stored = stack.create("CUST00001", features.clone()).await;
    assert_stored(&stored, "CUST00001", &features, "v1.0.0", 7);

    for path in ["/api/features/CUST00001/", "/api/features/CUST00001"] {
        let reply = stack.api.get(path).await;
        assert_served(&reply, &stored, "redis");
    }
    stack.finish().await;
}

#[tokio::test]
async fn post_creates_then_updates_with_and_without_slash() {
    let stack = TestStack::start("contract_post", &[]).await;
    let first = stack
        .api
        .post(
            "/api/features/",
            &json!({"customer_id": "C.1:a-b_c", "features": {"a": 1}}),
        )
        .await;
    assert_eq!(first.status, 201, "{}", first.text());
    assert_eq!(first.header("content-type"), Some("application/json"));
    let first = first.json();
    assert_stored(&first, "C.1:a-b_c", &json!({"a": 1}), "v1.0.0", 7);

    let second = stack
        .api
        .post(
            "/api/features",
            &json!({"customer_id": "C.1:a-b_c", "features": {"b": [true]}, "model_version": "v2.3.4", "ttl_days": 1}),
        )
        .await;
    assert_eq!(second.status, 200, "{}", second.text());
    let second = second.json();
    assert_stored(&second, "C.1:a-b_c", &json!({"b": [true]}), "v2.3.4", 1);
    assert!(second["version"].as_i64() > first["version"].as_i64());

    // The bounds of ttl_days are accepted.
    for ttl in [1, 30] {
        let reply = stack
            .api
            .post(
                "/api/features/",
                &json!({"customer_id": "TTL", "features": {}, "ttl_days": ttl}),
            )
            .await;
        assert!(matches!(reply.status, 200 | 201), "{}", reply.text());
        assert_stored(&reply.json(), "TTL", &json!({}), "v1.0.0", ttl);
    }

    // MongoDB holds what the API answered.
    let raw = stack
        .db
        .features()
        .find_one(bson::doc! {"_id": "C.1:a-b_c"})
        .await
        .unwrap()
        .expect("stored in MongoDB");
    assert_eq!(
        raw.get_i64("version").unwrap(),
        second["version"].as_i64().unwrap()
    );
    assert_eq!(raw.get_str("model_version").unwrap(), "v2.3.4");
    let stored = feature_store::codec::decode(&raw).unwrap();
    assert_eq!(serde_json::to_value(&stored).unwrap(), second);

    // A charset parameter on the content type is fine.
    let reply = stack
        .api
        .send(
            stack
                .api
                .request(reqwest::Method::POST, "/api/features/")
                .header("content-type", "application/json; charset=utf-8")
                .body(r#"{"customer_id": "CHARSET", "features": {"x": "ü"}}"#),
        )
        .await;
    assert_eq!(reply.status, 201, "{}", reply.text());
    assert_eq!(reply.json()["features"]["x"], "ü");
    stack.finish().await;
}

#[tokio::test]
async fn delete_answers_on_every_route() {
    let stack = TestStack::start("contract_delete", &[]).await;
    for (n, template) in [
        "/api/features/{}/delete/",
        "/api/features/{}/delete",
        "/api/features/{}/",
        "/api/features/{}",
    ]
    .into_iter()
    .enumerate()
    {
        let id = format!("DEL{n}");
        let path = template.replace("{}", &id);
        stack.create(&id, json!({"n": n})).await;
        let reply = stack.api.delete(&path).await;
        assert_eq!(reply.status, 204, "DELETE {path}: {}", reply.text());
        assert!(reply.body.is_empty(), "204 with a body: {}", reply.text());
        let reply = stack.api.get(&format!("/api/features/{id}/")).await;
        assert_eq!(reply.status, 404, "{}", reply.text());
        let reply = stack.api.delete(&path).await;
        assert_eq!(reply.status, 404, "second DELETE {path}");
        assert_eq!(
            reply.json(),
            json!({"error": format!("Features not found for customer_id: {id}"), "code": "not_found"})
        );
        assert!(
            stack
                .db
                .features()
                .find_one(bson::doc! {"_id": &id})
                .await
                .unwrap()
                .is_none()
        );
    }
    stack.finish().await;
}

/// GETs `id` and checks that it is `stored`, served from `source`.
async fn assert_get(stack: &TestStack, id: &str, stored: &Value, source: &str) {
    let reply = stack.api.get(&format!("/api/features/{id}/")).await;
    assert_served(&reply, stored, source);
}

/// The original service's quick test, with the near cache off: a write fills
/// Redis, a read after `DEL features:X` comes from MongoDB and refills Redis.
#[tokio::test]
async fn quick_test_with_near_cache_off() {
    let stack = TestStack::start("contract_quick", &[NEAR_OFF]).await;
    let stored = stack.create("QUICK", json!({"f1": 1.5})).await;
    assert_get(&stack, "QUICK", &stored, "redis").await;

    assert!(stack.drop_from_redis("QUICK").await);
    assert_get(&stack, "QUICK", &stored, "mongodb").await;
    assert_get(&stack, "QUICK", &stored, "redis").await;
    stack.finish().await;
}

/// The quick test with the near cache on (short TTL): a write warms the near
/// cache, which keeps answering after Redis lost the key until its TTL ends.
#[tokio::test]
async fn quick_test_with_near_cache_on() {
    let stack = TestStack::start("contract_quick_near", &[("LOCAL_CACHE_TTL_MS", "300")]).await;
    let stored = stack.create("QUICK", json!({"f1": 1.5})).await;
    assert_get(&stack, "QUICK", &stored, "local").await;

    assert!(stack.drop_from_redis("QUICK").await);
    assert_get(&stack, "QUICK", &stored, "local").await;

    tokio::time::sleep(std::time::Duration::from_millis(700)).await;
    assert_get(&stack, "QUICK", &stored, "mongodb").await;
    assert_get(&stack, "QUICK", &stored, "local").await;
    let cached: Option<String> = stack
        .redis_conn()
        .await
        .get("features:QUICK")
        .await
        .unwrap();
    assert!(cached.is_some(), "the MongoDB read refilled Redis");
    stack.finish().await;
}

#[tokio::test]
async fn every_write_increases_the_version_even_across_a_delete() {
    let stack = TestStack::start("contract_version", &[]).await;
    let mut versions = Vec::new();
    for n in 0..3 {
        let reply = stack
            .api
            .post(
                "/api/features/",
                &json!({"customer_id": "VER", "features": {"n": n}}),
            )
            .await;
        assert_eq!(reply.status, if n == 0 { 201 } else { 200 });
        versions.push(reply.json()["version"].as_i64().unwrap());
    }
    assert!(versions.windows(2).all(|w| w[0] < w[1]), "{versions:?}");
    let served = stack.api.get("/api/features/VER/").await.json();
    assert_eq!(served["version"].as_i64(), versions.last().copied());

    assert_eq!(stack.api.delete("/api/features/VER/").await.status, 204);
    let again = stack
        .api
        .post(
            "/api/features/",
            &json!({"customer_id": "VER", "features": {"n": 9}}),
        )
        .await;
    assert_eq!(again.status, 201, "a re-created document counts as created");
    let version = again.json()["version"].as_i64().unwrap();
    assert!(
        version > *versions.last().unwrap(),
        "re-created at {version}, before {versions:?}"
    );
    stack.finish().await;
}

#[tokio::test]
async fn health_reports_both_stores() {
    let stack = TestStack::start("contract_health", &[]).await;
    stack.create("H1", json!({})).await;
    for path in ["/api/health/", "/api/health"] {
        let reply = stack.api.get(path).await;
        assert_eq!(reply.status, 200, "{}", reply.text());
        let body = reply.json();
        assert_eq!(keys(&body), set(&["status", "redis", "mongodb"]));
        assert_eq!(body["status"], "healthy");
        let redis = &body["redis"];
        assert_eq!(
            keys(redis),
            set(&[
                "available",
                "status",
                "total_keys",
                "used_memory",
                "latency_ms"
            ])
        );
        assert_eq!(redis["available"], true);
        assert_eq!(redis["status"], "connected");
        // DBSIZE: the write's key and this replica's heartbeat (its key
        // and the replicas set).
        assert_eq!(redis["total_keys"], 3, "the write filled one key");
        assert!(redis["used_memory"].as_str().is_some_and(|m| !m.is_empty()));
        assert!(redis["latency_ms"].as_f64().is_some_and(|l| l >= 0.0));
        let mongo = &body["mongodb"];
        assert_eq!(
            keys(mongo),
            set(&[
                "available",
                "status",
                "documents_count",
                "collection",
                "latency_ms"
            ])
        );
        assert_eq!(mongo["available"], true);
        assert_eq!(mongo["status"], "connected");
        assert_eq!(mongo["documents_count"], 1);
        // The collection's bare name, as the Django service reports it.
        assert_eq!(mongo["collection"], "customer_features");
        assert!(mongo["latency_ms"].as_f64().is_some_and(|l| l >= 0.0));
    }
    stack.finish().await;
}

#[tokio::test]
async fn info_describes_the_strategy() {
    let stack = TestStack::start(
        "contract_info",
        &[
            ("INSTANCE_ID", "replica-7"),
            ("REDIS_TTL", "3600"),
            ("TOMBSTONE_TTL_MS", "45000"),
            ("LOCAL_CACHE_MAX_ENTRIES", "1234"),
            ("LOCAL_CACHE_TTL_MS", "5000"),
            ("MONGO_TIMEOUT_MS", "1500"),
        ],
    )
    .await;
    for path in ["/api/info/", "/api/info"] {
        let reply = stack.api.get(path).await;
        assert_eq!(reply.status, 200, "{}", reply.text());
        let info = reply.json();
        for field in [
            "service",
            "version",
            "instance_id",
            "strategy",
            "tiers",
            "read_flow",
            "write_flow",
            "invalidation",
        ] {
            assert!(info.get(field).is_some(), "{field} missing: {info}");
        }
        assert_eq!(info["service"], "redis-mongo-cache");
        assert_eq!(info["instance_id"], "replica-7");
        let tiers = info["tiers"].as_array().unwrap();
        let names: Vec<&str> = tiers.iter().map(|t| t["name"].as_str().unwrap()).collect();
        assert_eq!(names, ["local", "redis", "mongodb"]);
        assert_eq!(tiers[0]["enabled"], true);
        assert_eq!(tiers[0]["max_entries"], 1234);
        assert_eq!(tiers[0]["ttl_ms"], 5000);
        assert_eq!(tiers[1]["key"], "features:{customer_id}");
        assert_eq!(tiers[1]["ttl_seconds"], 3600);
        assert_eq!(tiers[1]["tombstone_ttl_ms"], 45000);
        assert_eq!(tiers[2]["database"], stack.db.name());
        assert_eq!(tiers[2]["collection"], "customer_features");
        assert_eq!(tiers[2]["timeout_ms"], 1500);
        assert!(info["read_flow"].as_array().is_some_and(|f| !f.is_empty()));
        assert!(info["write_flow"].as_array().is_some_and(|f| !f.is_empty()));
        assert!(info["invalidation"]["mode"].is_string());
    }
    stack.finish().await;
}

#[tokio::test]
async fn api_docs_are_served() {
    let stack = TestStack::start("contract_docs", &[]).await;
    let reply = stack.api.get("/api-docs/openapi.json").await;
    assert_eq!(reply.status, 200);
    let spec = reply.json();
    assert!(
        spec["openapi"].as_str().is_some_and(|v| v.starts_with('3')),
        "{}",
        spec["openapi"]
    );
    let paths = spec["paths"].as_object().expect("paths");
    for path in [
        "/api/features/",
        "/api/features/{customer_id}/",
        "/api/features/bulk/",
        "/api/features/batch/",
        "/api/health/",
        "/api/info/",
    ] {
        assert!(
            paths.contains_key(path),
            "{path} missing from {:?}",
            paths.keys()
        );
    }
    assert!(paths["/api/features/{customer_id}/"].get("get").is_some());
    assert!(
        paths["/api/features/{customer_id}/"]
            .get("delete")
            .is_some()
    );
    assert!(paths["/api/features/"].get("post").is_some());

    for path in ["/swagger/", "/redoc/"] {
        let reply = stack.api.get(path).await;
        assert_eq!(reply.status, 200, "{path}");
        assert!(
            reply
                .header("content-type")
                .is_some_and(|t| t.starts_with("text/html")),
            "{path}: {:?}",
            reply.header("content-type")
        );
        assert!(
            reply.text().to_ascii_lowercase().contains("<html"),
            "{path}"
        );
    }
    let reply = stack.api.get("/redoc").await;
    assert_eq!(reply.status, 308);
    assert_eq!(reply.header("location"), Some("/redoc/"));
    let reply = stack.api.get("/swagger").await;
    assert_eq!(reply.status, 303);
    assert_eq!(reply.header("location"), Some("/swagger/"));
    stack.finish().await;
}

#[tokio::test]
async fn metrics_are_prometheus_text_and_count_requests() {
    let stack = TestStack::start("contract_metrics", &[]).await;
    let requests = |reply: &Reply| {
        assert_eq!(reply.status, 200);
        assert!(
            reply
                .header("content-type")
                .is_some_and(|t| t.starts_with("text/plain")),
            "{:?}",
            reply.header("content-type")
        );
        let samples = prometheus::parse(&reply.text()).expect("Prometheus text");
        prometheus::sum(
            &samples,
            "http_requests_total",
            &[
                ("method", "GET"),
                ("route", "/api/info/"),
                ("status", "200"),
            ],
        )
    };
    let before = requests(&stack.api.get("/metrics").await);
    assert_eq!(stack.api.get("/api/info/").await.status, 200);
    let after = requests(&stack.api.get("/metrics").await);
    assert!(
        after >= before + 1.0,
        "http_requests_total {before} -> {after}"
    );

    // Made-up methods share one label: clients cannot mint new series.
    for method in ["FROB", "WIBBLE"] {
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let reply = stack
            .api
            .send(stack.api.request(method, "/api/info/"))
            .await;
        assert_eq!(reply.status, 405);
    }
    let reply = stack.api.get("/metrics").await;
    let samples = prometheus::parse(&reply.text()).expect("Prometheus text");
    let other = prometheus::sum(
        &samples,
        "http_requests_total",
        &[
            ("method", "OTHER"),
            ("route", "/api/info/"),
            ("status", "405"),
        ],
    );
    assert_eq!(other, 2.0);
    assert!(
        !reply.text().contains("FROB") && !reply.text().contains("WIBBLE"),
        "a made-up method became a label"
    );
    stack.finish().await;
}

/// Trace context is not checked here (no telemetry layer in-process); a
/// request that carries a `traceparent`, valid or not, is served as usual.
#[tokio::test]
async fn requests_with_trace_context_are_served_as_usual() {
    let stack = TestStack::start("contract_trace", &[]).await;
    let stored = stack.create("TRACED", json!({"t": 1})).await;
    for traceparent in [
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        "not a traceparent",
    ] {
        let reply = stack
            .api
            .send(
                stack
                    .api
                    .request(reqwest::Method::GET, "/api/features/TRACED/")
                    .header("traceparent", traceparent),
            )
            .await;
        assert_served(&reply, &stored, "local");
    }
    stack.finish().await;
}

//! Bulk writes (`POST /api/features/bulk/`) and batch reads
//! (`POST /api/features/batch/`).

use crate::support::{NEAR_OFF, TestStack};
use chrono::{DateTime, Duration, Utc};
use feature_cache::{CacheTier, CachedDocument, Entry};
use feature_store::FeatureDocument;
use redis::AsyncCommands;
use serde_json::{Value, json};
use std::collections::BTreeSet;

fn time(doc: &Value, field: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(doc[field].as_str().unwrap())
        .unwrap()
        .with_timezone(&Utc)
}

#[tokio::test]
async fn bulk_writes_the_valid_items_and_reports_each() {
    let stack = TestStack::start("bulk_mixed", &[NEAR_OFF]).await;
    let old = stack.create("OLD", json!({"x": 0})).await;

    let reply = stack
        .api
        .post(
            "/api/features/bulk/",
            &json!({
                "features_list": [
                    {"customer_id": "A", "features": {"x": 1}},
                    {"customer_id": "bad id", "features": {"x": 1}},
                    {"customer_id": "B", "features": "not an object"},
                    {"customer_id": "OLD", "features": {"x": 2}},
                    {"customer_id": "C", "features": {"$set": {"x": 1}}},
                    {"customer_id": 42, "features": {}},
                    {"customer_id": "D", "features": {"nested": {"a": [1, 2]}}},
                ],
                "model_version": "v3.0.0",
                "ttl_days": 2,
            }),
        )
        .await;
    assert_eq!(reply.status, 201, "{}", reply.text());
    let body = reply.json();
    assert_eq!(body["success"], 3, "{body}");
    assert_eq!(body["failed"], 4, "{body}");
    assert_eq!(body["message"], "Bulk operation completed");
    let results = body["results"].as_array().unwrap();
    let summary: Vec<(Value, &str)> = results
        .iter()
        .map(|r| (r["customer_id"].clone(), r["status"].as_str().unwrap()))
        .collect();
    assert_eq!(
        summary,
        vec![
            (json!("A"), "created"),
            (json!("bad id"), "failed"),
            (json!("B"), "failed"),
            (json!("OLD"), "updated"),
            (json!("C"), "failed"),
            (json!(42), "failed"),
            (json!("D"), "created"),
        ]
    );
    for result in results {
        let keys: BTreeSet<&str> = result
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        if result["status"] == "failed" {
            assert_eq!(
                keys,
                BTreeSet::from(["customer_id", "status", "error"]),
                "{result}"
            );
            assert!(result["error"].as_str().is_some_and(|e| !e.is_empty()));
        } else {
            assert_eq!(
                keys,
                BTreeSet::from(["customer_id", "status", "version"]),
                "{result}"
            );
        }
    }
    assert!(
        results[1]["error"]
            .as_str()
            .unwrap()
            .contains("customer_id")
    );
    assert!(results[2]["error"].as_str().unwrap().contains("object"));
    assert!(results[4]["error"].as_str().unwrap().contains('$'));
    assert!(results[3]["version"].as_i64() > old["version"].as_i64());

    // What each good item reported is what is stored and served.
    for (index, id, features) in [
        (0, "A", json!({"x": 1})),
        (3, "OLD", json!({"x": 2})),
        (6, "D", json!({"nested": {"a": [1, 2]}})),
    ] {
        let reply = stack.api.get(&format!("/api/features/{id}/")).await;
        assert_eq!(reply.status, 200);
        assert_eq!(
            reply.header("x-cache-source"),
            Some("redis"),
            "bulk filled Redis"
        );
        let doc = reply.json();
        assert_eq!(doc["version"], results[index]["version"], "{id}");
        assert_eq!(doc["features"], features);
        assert_eq!(doc["model_version"], "v3.0.0");
        assert_eq!(
            time(&doc, "expires_at") - time(&doc, "calculated_at"),
            Duration::days(2)
        );
    }
    // Only the good items reached MongoDB.
    assert_eq!(stack.stored_ids().await, ["A", "D", "OLD"]);

    // Without the trailing slash, and with defaults.
    let reply = stack
        .api
        .post(
            "/api/features/bulk",
            &json!({"features_list": [{"customer_id": "E", "features": {}}]}),
        )
        .await;
    assert_eq!(reply.status, 201);
    assert_eq!(reply.json()["results"][0]["status"], "created");
    let doc = stack.api.get("/api/features/E/").await.json();
    assert_eq!(doc["model_version"], "v1.0.0");
    assert_eq!(
        time(&doc, "expires_at") - time(&doc, "calculated_at"),
        Duration::days(7)
    );

    // Nothing to do is fine.
    let reply = stack
        .api
        .post("/api/features/bulk/", &json!({"features_list": []}))
        .await;
    assert_eq!(reply.status, 201);
    assert_eq!(
        reply.json(),
        json!({"success": 0, "failed": 0, "message": "Bulk operation completed", "results": []})
    );
    stack.finish().await;
}

#[tokio::test]
async fn bulk_refuses_whole_requests_that_break_the_limits() {
    let stack = TestStack::start("bulk_limits", &[]).await;
    let items: Vec<Value> = (0..1001)
        .map(|i| json!({"customer_id": format!("C{i}"), "features": {}}))
        .collect();
    let reply = stack
        .api
        .post("/api/features/bulk/", &json!({"features_list": items}))
        .await;
    let body = reply.expect_error(400, "validation_error");
    assert_eq!(body["details"][0]["field"], "features_list", "{body}");

    for (what, request, field) in [
        (
            "ttl_days 0",
            json!({"features_list": [{"customer_id": "A", "features": {}}], "ttl_days": 0}),
            "ttl_days",
        ),
        (
            "ttl_days 31",
            json!({"features_list": [{"customer_id": "A", "features": {}}], "ttl_days": 31}),
            "ttl_days",
        ),
        ("no list", json!({"model_version": "v1"}), "body"),
        ("list of strings", json!({"features_list": ["A"]}), "body"),
        (
            "item without features",
            json!({"features_list": [{"customer_id": "A"}]}),
            "body",
        ),
    ] {
        let reply = stack.api.post("/api/features/bulk/", &request).await;
        let body = reply.expect_error(400, "validation_error");
        assert_eq!(body["details"][0]["field"], field, "{what}: {body}");
    }
    assert!(
        stack.db.all_features().await.is_empty(),
        "nothing was written"
    );

    // Exactly the limit is accepted. (Items that each fail validation keep it
    // cheap: a thousand upserts take the Python stand-in several seconds.)
    let items: Vec<Value> = (0..1000)
        .map(|i| json!({"customer_id": format!("bad id {i}"), "features": {"i": i}}))
        .collect();
    let reply = stack
        .api
        .post("/api/features/bulk/", &json!({"features_list": items}))
        .await;
    assert_eq!(reply.status, 201, "{}", reply.text());
    let body = reply.json();
    assert_eq!(
        (body["success"].as_u64(), body["failed"].as_u64()),
        (Some(0), Some(1000))
    );
    assert_eq!(body["results"].as_array().unwrap().len(), 1000);
    assert!(stack.db.all_features().await.is_empty());
    stack.finish().await;
}

#[tokio::test]
async fn batch_answers_found_and_missing_from_redis_and_mongodb() {
    let stack = TestStack::start("batch_found", &[NEAR_OFF]).await;
    let a = stack.create("A", json!({"n": "a"})).await;
    let b = stack.create("B", json!({"n": "b"})).await;
    let c = stack.create("C", json!({"n": "c"})).await;

    // B is only in MongoDB now.
    let mut redis = stack.redis_conn().await;
    let _: () = redis.del("features:B").await.unwrap();
    // Redis holds a newer A than MongoDB: a batch answer with it came from Redis.
    let mut from_redis: FeatureDocument = serde_json::from_value(a.clone()).unwrap();
    from_redis.version += 1;
    from_redis.features = json!({"n": "a, from redis"}).as_object().cloned().unwrap();
    let offered = Entry::Document(CachedDocument::from_document(&from_redis));
    assert!(
        stack
            .api
            .state()
            .tiers
            .redis()
            .offer(offered)
            .await
            .unwrap()
    );

    for path in ["/api/features/batch/", "/api/features/batch"] {
        let reply = stack
            .api
            .post(
                path,
                &json!({"customer_ids": ["A", "B", "Z", "A", "Z", "C"]}),
            )
            .await;
        assert_eq!(reply.status, 200, "{}", reply.text());
        assert!(
            reply
                .header("content-type")
                .is_some_and(|t| t.starts_with("application/json"))
        );
        let body = reply.json();
        let found = body["found"].as_object().unwrap();
        assert_eq!(found.len(), 3, "{body}");
        assert_eq!(found["A"], serde_json::to_value(&from_redis).unwrap());
        assert_eq!(found["B"], b);
        assert_eq!(found["C"], c);
        assert_eq!(
            body["missing"],
            json!(["Z"]),
            "duplicates are answered once"
        );
    }
    // The MongoDB answer for B warmed Redis.
    let cached: Option<String> = redis.get("features:B").await.unwrap();
    let cached: Value = serde_json::from_str(&cached.expect("B refilled")).unwrap();
    assert_eq!(cached, b);

    let reply = stack
        .api
        .post("/api/features/batch/", &json!({"customer_ids": []}))
        .await;
    assert_eq!(reply.json(), json!({"found": {}, "missing": []}));
    stack.finish().await;
}

#[tokio::test]
async fn batch_refuses_bad_id_lists() {
    let stack = TestStack::start("batch_limits", &[]).await;
    let ids: Vec<String> = (0..1001).map(|i| format!("C{i}")).collect();
    let reply = stack
        .api
        .post("/api/features/batch/", &json!({"customer_ids": ids}))
        .await;
    let body = reply.expect_error(400, "validation_error");
    assert_eq!(body["details"][0]["field"], "customer_ids");

    let reply = stack
        .api
        .post(
            "/api/features/batch/",
            &json!({"customer_ids": ["ok", "a b", "also:ok", "x".repeat(129)]}),
        )
        .await;
    let body = reply.expect_error(400, "validation_error");
    let fields: Vec<&str> = body["details"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["field"].as_str().unwrap())
        .collect();
    assert_eq!(fields, ["customer_ids[1]", "customer_ids[3]"]);

    for request in [
        json!({"customer_ids": "A"}),
        json!({"customer_ids": [1]}),
        json!({}),
    ] {
        let reply = stack.api.post("/api/features/batch/", &request).await;
        reply.expect_error(400, "validation_error");
    }

    // Exactly the limit is fine.
    let ids: Vec<String> = (0..1000).map(|i| format!("C{i}")).collect();
    let reply = stack
        .api
        .post("/api/features/batch/", &json!({"customer_ids": ids}))
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.json()["missing"].as_array().unwrap().len(), 1000);
    stack.finish().await;
}

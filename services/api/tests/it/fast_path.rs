//! Reads of one customer's document answered before the router
//! (`cache_api::fast_path`): the same answers as the router gives (near hit,
//! Redis hit, 404), the router's own routes first, admission once per request.
//!
//! The router's answer to the same request is reached with the id
//! percent-encoded: the fast path leaves ids that need decoding to it.

use crate::support::{Reply, TestApi, TestStack};
use feature_cache::Entry;
use reqwest::Method;
use serde_json::json;

/// `id` with every byte percent-encoded: the same customer to the router,
/// a path the fast path does not take.
fn encoded(id: &str) -> String {
    id.bytes().map(|b| format!("%{b:02X}")).collect()
}

fn in_near_cache(api: &TestApi, id: &str) -> bool {
    let near = api.state().tiers.near().expect("a near cache");
    matches!(near.get(id), Some(Entry::Document(_)))
}

/// The parts of an answer a client sees (`date` aside).
fn seen(reply: &Reply) -> (u16, Vec<(String, String)>, String) {
    let mut headers: Vec<(String, String)> = reply
        .headers
        .iter()
        .filter(|(name, _)| name.as_str() != "date")
        .map(|(name, value)| {
            (
                name.to_string(),
                value.to_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    headers.sort();
    (reply.status, headers, reply.text())
}

#[tokio::test]
async fn a_near_hit_is_answered_as_the_router_answers_it() {
    let stack = TestStack::start("fast_same", &[]).await;
    let api = &stack.api;
    stack
        .create(
            "FP.1:a-b_c",
            json!({"a": 1, "b": [1.5, "x"], "c": {"d": null}}),
        )
        .await;
    assert!(
        in_near_cache(api, "FP.1:a-b_c"),
        "a write fills the near cache"
    );
    let routed = encoded("FP.1:a-b_c");
    for (fast, router) in [
        (
            "/api/features/FP.1:a-b_c/".to_owned(),
            format!("/api/features/{routed}/"),
        ),
        (
            "/api/features/FP.1:a-b_c".to_owned(),
            format!("/api/features/{routed}"),
        ),
        (
            "/api/features/FP.1:a-b_c/?fields=all".to_owned(),
            format!("/api/features/{routed}/?fields=all"),
        ),
    ] {
        let fast_reply = api.get(&fast).await;
        let router_reply = api.get(&router).await;
        assert_eq!(fast_reply.status, 200, "{fast}: {}", fast_reply.text());
        assert_eq!(fast_reply.header("x-cache-source"), Some("local"), "{fast}");
        assert_eq!(seen(&fast_reply), seen(&router_reply), "{fast} vs {router}");
        let body = fast_reply.json();
        assert_eq!(body["customer_id"], "FP.1:a-b_c");
        assert_eq!(body["features"]["b"], json!([1.5, "x"]));
        assert_eq!(body["source"], "local");
    }
    // A Redis hit (each read finds the near cache without the key) and a 404.
    let near = api.state().tiers.near().expect("a near cache");
    near.invalidate("FP.1:a-b_c");
    let fast_reply = api.get("/api/features/FP.1:a-b_c/").await;
    near.invalidate("FP.1:a-b_c");
    let router_reply = api.get(&format!("/api/features/{routed}/")).await;
    assert_eq!(fast_reply.header("x-cache-source"), Some("redis"));
    assert_eq!(seen(&fast_reply), seen(&router_reply));
    let fast_reply = api.get("/api/features/NOBODY/").await;
    fast_reply.expect_error(404, "not_found");
    let router_reply = api
        .get(&format!("/api/features/{}/", encoded("NOBODY")))
        .await;
    assert_eq!(seen(&fast_reply), seen(&router_reply));
    stack.finish().await;
}

#[tokio::test]
async fn the_routers_own_routes_and_methods_are_left_to_it() {
    let stack = TestStack::start("fast_routes", &[]).await;
    let api = &stack.api;
    // Valid customer ids that name the router's static routes.
    for id in ["bulk", "batch", "FP2"] {
        stack.create(id, json!({"a": 1})).await;
        assert!(in_near_cache(api, id), "{id} is in the near cache");
    }
    for path in [
        "/api/features/bulk/",
        "/api/features/bulk",
        "/api/features/batch/",
        "/api/features/batch",
    ] {
        api.get(path).await.expect_error(405, "method_not_allowed");
    }
    // HEAD: the router's answer, without a body.
    let head = api
        .send(api.request(Method::HEAD, "/api/features/FP2/"))
        .await;
    assert_eq!(head.status, 200);
    assert_eq!(head.header("x-cache-source"), Some("local"));
    assert!(head.body.is_empty());
    // Another method on the same route, and paths that only look alike.
    api.send(api.request(Method::PUT, "/api/features/FP2/"))
        .await
        .expect_error(405, "method_not_allowed");
    api.get("/api/features/FP2//")
        .await
        .expect_error(404, "route_not_found");
    api.get("/api/features/")
        .await
        .expect_error(405, "method_not_allowed");
    let invalid = api
        .get(&format!("/api/features/{}/", "x".repeat(129)))
        .await;
    invalid.expect_error(400, "invalid_customer_id");
    stack.finish().await;
}

const READER: &str = "reader-key-0123456789abcdef";
const WRITER: &str = "writer-key-0123456789abcdef";

#[tokio::test]
async fn admission_decides_near_hits_and_is_charged_once_per_request() {
    let keys = format!("reader:features:read:{READER},writer:features:write:{WRITER}");
    let stack = TestStack::start(
        "fast_admission",
        &[
            ("API_KEYS", keys.as_str()),
            ("RATE_LIMIT_PER_SECOND", "1"),
            ("RATE_LIMIT_BURST", "2"),
        ],
    )
    .await;
    let api = &stack.api;
    let write = |id: &str| {
        api.request(Method::POST, "/api/features/")
            .bearer_auth(WRITER)
            .json(&json!({"customer_id": id, "features": {"a": 1}}))
    };
    for id in ["HIT", "MISS"] {
        assert_eq!(api.send(write(id)).await.status, 201);
    }
    // MISS is left in Redis only.
    api.state()
        .tiers
        .near()
        .expect("near cache")
        .invalidate("MISS");
    assert!(in_near_cache(api, "HIT"));
    assert!(!in_near_cache(api, "MISS"));
    let read = |id: &str| api.request(Method::GET, &format!("/api/features/{id}/"));

    // Refused before anything is served, as the router refuses.
    let anonymous = api.send(read("HIT")).await;
    anonymous.expect_error(401, "unauthorized");
    assert!(anonymous.header("www-authenticate").is_some());
    assert!(
        !anonymous.text().contains("\"a\""),
        "nothing of the document"
    );
    api.send(read("HIT").bearer_auth("not-a-key-0123456789abcdef"))
        .await
        .expect_error(401, "unauthorized");
    api.send(read("HIT").bearer_auth(WRITER))
        .await
        .expect_error(403, "forbidden");

    // The reader's burst of 2: a near miss and a near hit, each charged
    // once; then the limit.
    let miss = api.send(read("MISS").bearer_auth(READER)).await;
    assert_eq!(miss.status, 200, "{}", miss.text());
    assert_eq!(miss.header("x-cache-source"), Some("redis"));
    let hit = api.send(read("HIT").bearer_auth(READER)).await;
    assert_eq!(
        hit.status,
        200,
        "the miss was charged twice: {}",
        hit.text()
    );
    assert_eq!(hit.header("x-cache-source"), Some("local"));
    let mut limited = None;
    for _ in 0..20 {
        let reply = api.send(read("HIT").bearer_auth(READER)).await;
        if reply.status == 429 {
            limited = Some(reply);
            break;
        }
        assert_eq!(reply.status, 200, "{}", reply.text());
    }
    let limited = limited.expect("twenty requests at once exceed a burst of 2 at 1/s");
    limited.expect_error(429, "rate_limited");
    assert!(limited.header("retry-after").is_some());
    stack.finish().await;
}

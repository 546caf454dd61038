//! Every way a request can be refused: the status, the machine code and the
//! JSON body — and that nothing stored changes because of it.

use crate::support::Reply;
use crate::support::TestStack;
use redis::AsyncCommands;
use serde_json::{Value, json};

/// The id every bad request below aims at (when it names one).
const KEEP: &str = "KEEP";

/// A request and the refusal it must get.
struct Bad {
    what: &'static str,
    method: &'static str,
    path: String,
    content_type: Option<&'static str>,
    body: String,
    status: u16,
    code: &'static str,
    /// For validation errors: a field that `details` must name.
    field: Option<&'static str>,
}

fn bad_post(what: &'static str, body: Value, field: &'static str) -> Bad {
    Bad {
        what,
        method: "POST",
        path: "/api/features/".into(),
        content_type: Some("application/json"),
        body: body.to_string(),
        status: 400,
        code: "validation_error",
        field: Some(field),
    }
}

fn raw(
    what: &'static str,
    method: &'static str,
    path: &str,
    content_type: Option<&'static str>,
    body: &str,
    status: u16,
    code: &'static str,
) -> Bad {
    Bad {
        what,
        method,
        path: path.into(),
        content_type,
        body: body.into(),
        status,
        code,
        field: None,
    }
}

async fn send(stack: &TestStack, bad: &Bad) -> Reply {
    let method = reqwest::Method::from_bytes(bad.method.as_bytes()).unwrap();
    let mut request = stack.api.request(method, &bad.path).body(bad.body.clone());
    if let Some(content_type) = bad.content_type {
        request = request.header("content-type", content_type);
    }
    stack.api.send(request).await
}

/// Everything stored about `KEEP` and the rest: MongoDB's documents and
/// Redis' keys with their values (but the replica's heartbeat, which
/// changes on its own).
pub(crate) async fn snapshot(
    stack: &TestStack,
) -> (Vec<bson::Document>, Vec<(String, Option<String>)>) {
    let mongo = stack.db.all_features().await;
    let mut redis = stack.redis_conn().await;
    let mut keys: Vec<String> = redis.keys("*").await.unwrap();
    keys.retain(|key| !key.contains(":replica"));
    keys.sort();
    let mut values = Vec::new();
    for key in keys {
        let value: Option<String> = redis.get(&key).await.unwrap();
        values.push((key, value));
    }
    (mongo, values)
}

async fn seed(stack: &TestStack) {
    let reply = stack
        .api
        .post(
            "/api/features/",
            &json!({"customer_id": KEEP, "features": {"score": 1}}),
        )
        .await;
    assert_eq!(reply.status, 201, "{}", reply.text());
}

async fn run_all(stack: &TestStack, cases: &[Bad]) {
    seed(stack).await;
    let before = snapshot(stack).await;
    assert_eq!(before.0.len(), 1);
    for bad in cases {
        let reply = send(stack, bad).await;
        assert_eq!(
            reply.status,
            bad.status,
            "{}: {} {} -> {}",
            bad.what,
            bad.method,
            bad.path,
            reply.text()
        );
        let body = reply.expect_error(bad.status, bad.code);
        match bad.field {
            Some(field) => {
                let details = body["details"]
                    .as_array()
                    .unwrap_or_else(|| panic!("{}: no details in {body}", bad.what));
                assert!(
                    details.iter().any(|d| d["field"] == field
                        && d["message"].as_str().is_some_and(|m| !m.is_empty())),
                    "{}: details do not name {field}: {body}",
                    bad.what
                );
            }
            None => assert!(body.get("details").is_none(), "{}: {body}", bad.what),
        }
        assert_eq!(
            snapshot(stack).await,
            before,
            "{} changed stored data",
            bad.what
        );
    }
    // The document is still served as it was.
    let reply = stack.api.get(&format!("/api/features/{KEEP}/")).await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.json()["features"], json!({"score": 1}));
}

#[tokio::test]
async fn invalid_customer_ids_in_the_path_are_400() {
    let stack = TestStack::start("errors_path", &[]).await;
    let long = "x".repeat(129);
    let mut cases = Vec::new();
    for id in [
        "a%20b",
        long.as_str(),
        "a%2Fb",
        "%24set",
        "%C3%BC",
        "a%7Bb%7D",
        "%FF",
    ] {
        for (method, template) in [
            ("GET", "/api/features/{}/"),
            ("GET", "/api/features/{}"),
            ("DELETE", "/api/features/{}/"),
            ("DELETE", "/api/features/{}/delete/"),
            ("DELETE", "/api/features/{}/delete"),
        ] {
            cases.push(raw(
                "invalid id in path",
                method,
                &template.replace("{}", id),
                None,
                "",
                400,
                "invalid_customer_id",
            ));
        }
    }
    run_all(&stack, &cases).await;
    // 128 characters is still a valid id.
    let reply = stack
        .api
        .get(&format!("/api/features/{}/", "x".repeat(128)))
        .await;
    reply.expect_error(404, "not_found");
    stack.finish().await;
}

#[tokio::test]
async fn unknown_ids_are_404_with_the_original_body() {
    let stack = TestStack::start("errors_404", &[]).await;
    for path in ["/api/features/NOPE/", "/api/features/NOPE"] {
        let reply = stack.api.get(path).await;
        assert_eq!(reply.status, 404);
        assert_eq!(reply.header("content-type"), Some("application/json"));
        assert_eq!(
            reply.json(),
            json!({"error": "Features not found for customer_id: NOPE", "code": "not_found"})
        );
    }
    let reply = stack.api.delete("/api/features/NOPE/delete/").await;
    assert_eq!(
        reply.json(),
        json!({"error": "Features not found for customer_id: NOPE", "code": "not_found"})
    );
    stack.finish().await;
}

#[tokio::test]
async fn bad_bodies_are_refused_and_change_nothing() {
    let stack = TestStack::start("errors_body", &[("MAX_BODY_BYTES", "1024")]).await;
    let post = |what, ct, body: &str, status, code| {
        raw(what, "POST", "/api/features/", ct, body, status, code)
    };
    let json_ct = Some("application/json");
    let cases = vec![
        post("truncated JSON", json_ct, r#"{"customer_id": "KEEP", "features": {"#, 400, "malformed_json"),
        post("not JSON", json_ct, "customer_id=KEEP", 400, "malformed_json"),
        post("empty body", json_ct, "", 400, "malformed_json"),
        post("trailing garbage", json_ct, r#"{"customer_id": "KEEP", "features": {}} x"#, 400, "malformed_json"),
        bad_post("features a string", json!({"customer_id": KEEP, "features": "score=2"}), "features"),
        bad_post("features an array", json!({"customer_id": KEEP, "features": [1, 2]}), "features"),
        bad_post("features null", json!({"customer_id": KEEP, "features": null}), "features"),
        bad_post("customer_id a number", json!({"customer_id": 42, "features": {}}), "body"),
        bad_post("customer_id missing", json!({"features": {"score": 2}}), "body"),
        bad_post("features missing", json!({"customer_id": KEEP}), "body"),
        bad_post("body an array", json!([{"customer_id": KEEP, "features": {}}]), "body"),
        bad_post("ttl_days 0", json!({"customer_id": KEEP, "features": {"score": 2}, "ttl_days": 0}), "ttl_days"),
        bad_post("ttl_days 31", json!({"customer_id": KEEP, "features": {"score": 2}, "ttl_days": 31}), "ttl_days"),
        bad_post("ttl_days -1", json!({"customer_id": KEEP, "features": {"score": 2}, "ttl_days": -1}), "ttl_days"),
        bad_post("ttl_days a string", json!({"customer_id": KEEP, "features": {"score": 2}, "ttl_days": "7"}), "body"),
        bad_post("model_version empty", json!({"customer_id": KEEP, "features": {"score": 2}, "model_version": " "}), "model_version"),
        bad_post("customer_id with a space", json!({"customer_id": "KE EP", "features": {}}), "customer_id"),
        bad_post("customer_id empty", json!({"customer_id": "", "features": {}}), "customer_id"),
        bad_post("customer_id 129 chars", json!({"customer_id": "x".repeat(129), "features": {}}), "customer_id"),
        bad_post("$set at the top", json!({"customer_id": KEEP, "features": {"$set": {"score": 2}}}), r#"features["$set"]"#),
        bad_post("$inc nested", json!({"customer_id": KEEP, "features": {"a": {"b": {"$inc": 1}}}}), r#"features.a.b["$inc"]"#),
        bad_post("$ key inside an array", json!({"customer_id": KEEP, "features": {"a": [1, {"$x": 1}]}}), r#"features.a[1]["$x"]"#),
        post("no content type", None, r#"{"customer_id": "KEEP", "features": {"score": 2}}"#, 415, "unsupported_media_type"),
        post("text/plain", Some("text/plain"), r#"{"customer_id": "KEEP", "features": {"score": 2}}"#, 415, "unsupported_media_type"),
        post("form", Some("application/x-www-form-urlencoded"), "customer_id=KEEP", 415, "unsupported_media_type"),
        post("too large", json_ct, &json!({"customer_id": KEEP, "features": {"blob": "x".repeat(2000)}}).to_string(), 413, "payload_too_large"),
        raw("bulk too large", "POST", "/api/features/bulk/", json_ct,
            &json!({"features_list": [{"customer_id": KEEP, "features": {"blob": "x".repeat(2000)}}]}).to_string(),
            413, "payload_too_large"),
        raw("bulk malformed", "POST", "/api/features/bulk/", json_ct, "{", 400, "malformed_json"),
        raw("bulk without content type", "POST", "/api/features/bulk", None, "{}", 415, "unsupported_media_type"),
        raw("batch malformed", "POST", "/api/features/batch/", json_ct, "[", 400, "malformed_json"),
        raw("PUT a document", "PUT", "/api/features/KEEP/", json_ct, r#"{"features": {}}"#, 405, "method_not_allowed"),
        raw("PATCH a document", "PATCH", "/api/features/KEEP", json_ct, "{}", 405, "method_not_allowed"),
        raw("POST to a document", "POST", "/api/features/KEEP/", json_ct, "{}", 405, "method_not_allowed"),
        raw("GET the collection", "GET", "/api/features/", None, "", 405, "method_not_allowed"),
        raw("DELETE the collection", "DELETE", "/api/features", None, "", 405, "method_not_allowed"),
        raw("GET bulk", "GET", "/api/features/bulk/", None, "", 405, "method_not_allowed"),
        raw("GET /delete/", "GET", "/api/features/KEEP/delete/", None, "", 405, "method_not_allowed"),
        raw("POST health", "POST", "/api/health/", json_ct, "{}", 405, "method_not_allowed"),
        raw("unknown route", "GET", "/api/nothing/", None, "", 404, "route_not_found"),
        raw("unknown route below a document", "GET", "/api/features/KEEP/extra/", None, "", 404, "route_not_found"),
        raw("DELETE an unknown route", "DELETE", "/api/features/KEEP/remove/", None, "", 404, "route_not_found"),
        raw("root", "GET", "/", None, "", 404, "route_not_found"),
    ];
    run_all(&stack, &cases).await;
    stack.finish().await;
}

#[tokio::test]
async fn a_body_just_under_the_limit_is_accepted() {
    let stack = TestStack::start("errors_limit", &[("MAX_BODY_BYTES", "1024")]).await;
    let prefix = json!({"customer_id": "EDGE", "features": {"blob": ""}}).to_string();
    let body =
        json!({"customer_id": "EDGE", "features": {"blob": "x".repeat(1024 - prefix.len())}})
            .to_string();
    assert_eq!(body.len(), 1024);
    let reply = stack.api.post_text("/api/features/", body.clone()).await;
    assert_eq!(reply.status, 201, "{}", reply.text());
    let over = format!("{body} ");
    let reply = stack.api.post_text("/api/features/", over).await;
    let body = reply.expect_error(413, "payload_too_large");
    assert!(body["error"].as_str().unwrap().contains("1024"), "{body}");
    stack.finish().await;
}

//! One trace from a write to every replica's eviction, exported over real
//! OTLP/HTTP protobuf by the real binaries to a receiver in this test; and
//! metrics that move as the requests dictate.

use serde_json::json;
use std::time::{Duration, Instant};
use system_tests::{Deployment, Options};
use testkit::otlp::{OtlpReceiver, Span};

const CLIENT_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CLIENT_SPAN: &str = "00f067aa0ba902b7";

async fn spans_until(
    receiver: &OtlpReceiver,
    what: &str,
    done: impl Fn(&[Span]) -> bool,
) -> Vec<Span> {
    let started = Instant::now();
    loop {
        let spans = receiver.spans();
        if done(&spans) {
            return spans;
        }
        if started.elapsed() > Duration::from_secs(20) {
            let names: Vec<String> = spans
                .iter()
                .map(|s| format!("{}:{}:{}", s.instance, s.name, &s.trace_id[..8]))
                .collect();
            panic!("{what}: not exported within 20 s; got {names:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn find<'a>(spans: &'a [Span], instance: &str, name: &str, trace_id: &str) -> Option<&'a Span> {
    spans
        .iter()
        .find(|s| s.instance == instance && s.name == name && s.trace_id == trace_id)
}

fn parent_of<'a>(spans: &'a [Span], child: &Span) -> Option<&'a Span> {
    spans
        .iter()
        .find(|s| s.span_id == child.parent_span_id && s.trace_id == child.trace_id)
}

/// Walks up from `span` and returns the names on the way to the root.
fn ancestry(spans: &[Span], span: &Span) -> Vec<String> {
    let mut names = vec![format!("{}:{}", span.instance, span.name)];
    let mut current = span;
    while let Some(parent) = parent_of(spans, current) {
        names.push(format!("{}:{}", parent.instance, parent.name));
        current = parent;
    }
    names
}

#[tokio::test]
async fn a_post_is_one_trace_from_the_client_to_every_replicas_eviction() {
    let receiver = OtlpReceiver::start().await;
    let env = vec![
        (
            "OTEL_EXPORTER_OTLP_ENDPOINT".to_owned(),
            receiver.endpoint().to_owned(),
        ),
        (
            "OTEL_EXPORTER_OTLP_PROTOCOL".to_owned(),
            "http/protobuf".to_owned(),
        ),
        ("OTEL_BSP_SCHEDULE_DELAY".to_owned(), "100".to_owned()),
    ];
    let deployment = Deployment::start(
        "trace",
        Options {
            env,
            ..Options::default()
        },
    )
    .await;
    let http = reqwest::Client::new();

    // Both replicas hold the document in their near caches.
    deployment
        .post(&deployment.a, "T1", json!({"score": 1}))
        .await;
    deployment.warm(&deployment.a, "T1").await;
    deployment.warm(&deployment.b, "T1").await;

    // The client's trace context is continued and handed back.
    let response = http
        .post(deployment.a.url("/api/features/"))
        .header("traceparent", format!("00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"))
        .json(&json!({"customer_id": "T1", "features": {"score": 2}}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let returned = response
        .headers()
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    assert!(
        returned.starts_with(&format!("00-{CLIENT_TRACE}-")),
        "traceparent answered: {returned:?}"
    );

    let spans = spans_until(&receiver, "the POST's path to both replicas", |spans| {
        find(spans, "api-a", "POST /api/features/", CLIENT_TRACE).is_some()
            && find(spans, "inv-0", "invalidator.change", CLIENT_TRACE).is_some()
            && find(spans, "api-a", "near_cache.invalidate", CLIENT_TRACE).is_some()
            && find(spans, "api-b", "near_cache.invalidate", CLIENT_TRACE).is_some()
    })
    .await;

    let request = find(&spans, "api-a", "POST /api/features/", CLIENT_TRACE).unwrap();
    assert_eq!(
        request.parent_span_id, CLIENT_SPAN,
        "the server span is the client span's child"
    );
    assert_eq!(request.service, "cache-api");
    assert_eq!(request.attr("http.route"), Some("/api/features/"));
    let change = find(&spans, "inv-0", "invalidator.change", CLIENT_TRACE).unwrap();
    assert_eq!(change.service, "cache-invalidator");
    assert_eq!(change.attr("op"), Some("update"));
    assert!(change.attr("lag_published_ms").is_some());
    let chain = ancestry(&spans, change);
    assert!(
        chain.contains(&"api-a:POST /api/features/".to_owned()),
        "invalidator span descends from the POST: {chain:?}"
    );
    let eviction = find(&spans, "api-b", "near_cache.invalidate", CLIENT_TRACE).unwrap();
    let chain = ancestry(&spans, eviction);
    assert!(
        chain.contains(&"inv-0:invalidator.change".to_owned()),
        "B's eviction descends from the invalidator: {chain:?}"
    );
    assert!(
        chain
            .last()
            .is_some_and(|root| root == "api-a:POST /api/features/"),
        "one trace up to the POST: {chain:?}"
    );
    let mongo = spans
        .iter()
        .find(|s| s.trace_id == CLIENT_TRACE && s.attr("db.system") == Some("mongodb"));
    assert!(mongo.is_some(), "the MongoDB write is in the trace");

    println!("decoded trace {CLIENT_TRACE}:");
    let mut ours: Vec<&Span> = spans
        .iter()
        .filter(|s| s.trace_id == CLIENT_TRACE)
        .collect();
    ours.sort_by_key(|s| ancestry(&spans, s).len());
    for span in ours {
        let parent = parent_of(&spans, span).map_or_else(
            || format!("client {}", span.parent_span_id),
            |p| format!("{}:{}", p.instance, p.name),
        );
        println!(
            "  {:<18} {:<26} {:<22} parent {}",
            span.service, span.name, span.instance, parent
        );
    }

    // A GET on B after the eviction: near miss, Redis hit, with tier spans
    // under the request span.
    let get_trace = "0af7651916cd43dd8448eb211c80319c";
    let response = http
        .get(deployment.b.url("/api/features/T1/"))
        .header("traceparent", format!("00-{get_trace}-b7ad6b7169203331-01"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        response
            .headers()
            .get("x-cache-source")
            .and_then(|v| v.to_str().ok()),
        Some("redis")
    );
    let spans = spans_until(&receiver, "the GET's spans", |spans| {
        spans
            .iter()
            .any(|s| s.trace_id == get_trace && s.attr("db.system") == Some("redis"))
            && find(spans, "api-b", "near_cache.get", get_trace).is_some()
            && find(
                spans,
                "api-b",
                "GET /api/features/{customer_id}/",
                get_trace,
            )
            .is_some()
    })
    .await;
    let near = find(&spans, "api-b", "near_cache.get", get_trace).unwrap();
    assert_eq!(near.attr("cache.hit"), Some("false"));
    assert_eq!(near.attr("cache.tier"), Some("local"));
    let redis = spans
        .iter()
        .find(|s| s.trace_id == get_trace && s.attr("db.system") == Some("redis"))
        .unwrap();
    let chain = ancestry(&spans, redis);
    assert!(
        chain.iter().any(|n| n.ends_with(":cache.load")),
        "{chain:?}"
    );
    assert_eq!(
        chain.last().map(String::as_str),
        Some("api-b:GET /api/features/{customer_id}/"),
        "{chain:?}"
    );
    assert!(
        !spans
            .iter()
            .any(|s| s.trace_id == get_trace && s.attr("db.system") == Some("mongodb")),
        "a Redis hit does not touch MongoDB"
    );

    // Export failures never fail requests.
    receiver.stop();
    for _ in 0..20 {
        assert_eq!(deployment.get(&deployment.b, "T1").await.status, 200);
        let stored = deployment
            .post(&deployment.a, "T1", json!({"score": 3}))
            .await;
        assert!(stored["version"].as_i64().is_some());
    }
}

#[tokio::test]
async fn metrics_move_as_the_requests_dictate() {
    let deployment = Deployment::start("metrics", Options::default()).await;
    let replica = &deployment.a;
    let hits = |samples: &[testkit::prometheus::Sample], tier: &str, result: &str| {
        testkit::prometheus::sum(
            samples,
            "cache_requests_total",
            &[("tier", tier), ("result", result)],
        )
    };
    deployment.post(replica, "M1", json!({"x": 1})).await;
    let before = deployment.metrics(replica).await;

    // A near-cache hit counts one local hit and no Redis request.
    assert_eq!(deployment.get(replica, "M1").await.source(), Some("local"));
    let after = deployment.metrics(replica).await;
    assert_eq!(
        hits(&after, "local", "hit") - hits(&before, "local", "hit"),
        1.0
    );
    assert_eq!(hits(&after, "redis", "hit"), hits(&before, "redis", "hit"));
    assert!(
        testkit::prometheus::sum(&after, "near_cache_entries", &[]) >= 1.0,
        "near-cache size gauge"
    );

    // An unknown id misses every tier and counts a 404.
    assert_eq!(deployment.get(replica, "NOPE").await.status, 404);
    let later = deployment.metrics(replica).await;
    assert_eq!(
        hits(&later, "local", "miss") - hits(&after, "local", "miss"),
        1.0
    );
    assert_eq!(
        hits(&later, "redis", "miss") - hits(&after, "redis", "miss"),
        1.0
    );
    let not_found = |s: &[testkit::prometheus::Sample]| {
        testkit::prometheus::sum(
            s,
            "http_requests_total",
            &[("route", "/api/features/{customer_id}/"), ("status", "404")],
        )
    };
    assert_eq!(not_found(&later) - not_found(&after), 1.0);
    assert!(
        testkit::prometheus::sum(&later, "mongodb_commands_total", &[("command", "find")]) >= 1.0
    );

    // The other replica applied the invalidation of a write it did not make.
    deployment.warm(&deployment.b, "M1").await;
    let applied = |s: &[testkit::prometheus::Sample]| {
        testkit::prometheus::sum(s, "invalidation_messages_applied_total", &[])
    };
    let b_before = applied(&deployment.metrics(&deployment.b).await);
    deployment.post(replica, "M1", json!({"x": 2})).await;
    let started = Instant::now();
    while applied(&deployment.metrics(&deployment.b).await) <= b_before {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "B never applied the invalidation"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // The invalidator counts events by operation and observes lag. (What B
    // applied above may have been the earlier insert's message, so the
    // update's count is waited for, within the same bound.)
    let inv = &deployment.invalidators[0];
    let updates = |s: &[testkit::prometheus::Sample]| {
        testkit::prometheus::sum(s, "invalidator_events_total", &[("op", "update")])
    };
    let started = Instant::now();
    let mut samples = deployment.metrics(inv).await;
    while updates(&samples) < 1.0 {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the invalidator never counted the update"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
        samples = deployment.metrics(inv).await;
    }
    assert!(
        testkit::prometheus::sum(
            &samples,
            "invalidation_lag_seconds_count",
            &[("stage", "published")]
        ) >= 1.0
    );
    assert!(testkit::prometheus::sum(&samples, "invalidator_resume_token_saves_total", &[]) >= 1.0);
}

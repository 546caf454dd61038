//! Request coalescing through HTTP: many concurrent reads of one cold key cost
//! MongoDB a single `find`.
//!
//! This file holds one test on purpose: the Prometheus recorder is global to
//! the process, and the exact `find` count below must not see other tests.

use crate::support::TestStack;
use chrono::{Duration as Days, Utc};
use std::collections::BTreeMap;
use std::sync::Arc;
use testkit::prometheus;
use tokio::sync::Barrier;

const READERS: usize = 500;

async fn counters(stack: &TestStack) -> (f64, f64) {
    let reply = stack.api.get("/metrics").await;
    assert_eq!(reply.status, 200);
    let samples = prometheus::parse(&reply.text()).expect("Prometheus text");
    (
        prometheus::sum(&samples, "mongodb_commands_total", &[("command", "find")]),
        prometheus::sum(&samples, "cache_coalesced_waits_total", &[]),
    )
}

/// Sends `READERS` GETs of `path` at once (all released by one barrier) and
/// returns the replies.
async fn burst(stack: &TestStack, path: &str) -> Vec<crate::support::Reply> {
    let barrier = Arc::new(Barrier::new(READERS));
    let mut tasks = Vec::with_capacity(READERS);
    for _ in 0..READERS {
        let barrier = Arc::clone(&barrier);
        let request = stack.api.request(reqwest::Method::GET, path);
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            crate::support::Reply::of(request).await
        }));
    }
    let mut replies = Vec::with_capacity(READERS);
    for task in tasks {
        replies.push(task.await.expect("reader task"));
    }
    replies
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_cold_reads_share_one_mongodb_find() {
    let stack = TestStack::start("coalescing", &[("LOCAL_CACHE_ENABLED", "true")]).await;
    let expires_at = Utc::now() + Days::days(1);
    stack
        .db
        .features()
        .insert_one(bson::doc! {
            "_id": "HOT",
            "customer_id": "HOT",
            "features": {"score": 0.5},
            "calculated_at": feature_store::model::format_time(Utc::now()),
            "model_version": "v1.0.0",
            "expires_at": bson::DateTime::from_chrono(expires_at),
            "version": 77_i64,
        })
        .await
        .unwrap();

    // Open the client's connections first, so the reads below arrive together.
    for reply in burst(&stack, "/api/info/").await {
        assert_eq!(reply.status, 200);
    }

    let (finds_before, waits_before) = counters(&stack).await;
    let replies = burst(&stack, "/api/features/HOT/").await;
    let mut sources: BTreeMap<String, usize> = BTreeMap::new();
    for reply in &replies {
        assert_eq!(reply.status, 200, "{}", reply.text());
        let body = reply.json();
        assert_eq!(body["version"], 77);
        assert_eq!(body["features"]["score"], 0.5);
        let source = body["source"].as_str().unwrap().to_owned();
        assert_eq!(reply.header("x-cache-source"), Some(source.as_str()));
        *sources.entry(source).or_default() += 1;
    }
    let (finds_after, waits_after) = counters(&stack).await;
    eprintln!(
        "sources {sources:?}; coalesced waits {}",
        waits_after - waits_before
    );

    assert_eq!(
        finds_after - finds_before,
        1.0,
        "MongoDB finds for {READERS} concurrent cold reads (sources {sources:?})"
    );
    assert!(
        waits_after > waits_before,
        "no reader waited on the shared load (sources {sources:?})"
    );
    assert!(
        sources.get("mongodb").is_some_and(|n| *n >= 1),
        "{sources:?}"
    );
    assert!(
        sources
            .keys()
            .all(|s| ["local", "redis", "mongodb"].contains(&s.as_str())),
        "{sources:?}"
    );
    stack.finish().await;
}

//! Changes reach every replica: writes made straight into MongoDB (bypassing
//! the API), writes through the other replica, and edits that do not touch
//! the version. Real processes: one `cache-invalidator`, two `cache-api`
//! replicas with near caches, a Redis and a database of each test's own.

use serde_json::json;
use std::time::{Duration, Instant};
use system_tests::{Deployment, LAG_BOUND, Options, POLL, Served, ms};
use testkit::services::ServiceProcess;

/// Polls `replica` until `done` holds for what it serves; returns the time
/// taken and the last answer. Panics after `bound`, showing the last answer.
async fn until(
    deployment: &Deployment,
    replica: &ServiceProcess,
    id: &str,
    bound: Duration,
    what: &str,
    done: impl Fn(&Served) -> bool,
) -> (Duration, Served) {
    let started = Instant::now();
    loop {
        let served = deployment.get(replica, id).await;
        if done(&served) {
            return (started.elapsed(), served);
        }
        assert!(
            started.elapsed() < bound,
            "{}: {what} not seen for {id} within {bound:?}; last answer {} {}",
            replica.name(),
            served.status,
            served.body
        );
        tokio::time::sleep(POLL).await;
    }
}

/// Both replicas, one after the other, from the same starting instant.
async fn until_both(
    deployment: &Deployment,
    id: &str,
    what: &str,
    done: impl Fn(&Served) -> bool + Copy,
) -> Duration {
    let started = Instant::now();
    let mut slowest = Duration::ZERO;
    for replica in deployment.replicas() {
        let left = LAG_BOUND.saturating_sub(started.elapsed());
        until(deployment, replica, id, left, what, done).await;
        slowest = started.elapsed();
    }
    slowest
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_insert_update_and_delete_reach_both_replicas() {
    let deployment = Deployment::start("inv_direct", Options::default()).await;
    let id = "direct-1";
    for replica in deployment.replicas() {
        assert_eq!(deployment.get(replica, id).await.status, 404);
    }

    // Insert by another tool: no version. The invalidator stamps one.
    deployment.insert_unversioned(id, json!({"score": 1})).await;
    let took = until_both(&deployment, id, "the stamped insert", |s| {
        s.version().is_some_and(|v| v > 0) && s.body["features"] == json!({"score": 1})
    })
    .await;
    println!(
        "direct insert (stamped) visible on both replicas after {}",
        ms(took)
    );
    let inserted = deployment.truth(id).await.expect("inserted").version;
    assert!(inserted > 0, "the invalidator gave the insert a version");
    for replica in deployment.replicas() {
        let warm = deployment.warm(replica, id).await;
        assert_eq!(warm.version(), Some(inserted));
    }

    // A versioned update (as the API does it) while both near caches hold it.
    let updated = deployment.write_versioned(id, json!({"score": 2})).await;
    assert!(updated > inserted);
    let took = until_both(&deployment, id, "the update", |s| {
        s.version() == Some(updated) && s.body["features"] == json!({"score": 2})
    })
    .await;
    println!("direct update visible on both replicas after {}", ms(took));
    assert!(took <= LAG_BOUND);
    for replica in deployment.replicas() {
        deployment.warm(replica, id).await;
    }

    // A delete while both near caches hold the document.
    assert_eq!(deployment.delete_direct(id).await, Some(updated));
    let took = until_both(&deployment, id, "the delete", |s| s.status == 404).await;
    println!("direct delete visible on both replicas after {}", ms(took));
    assert!(took <= LAG_BOUND);
    assert!(
        !matches!(
            deployment.cached(id).await,
            system_tests::Cached::Document { .. }
        ),
        "Redis still holds the deleted document"
    );
    deployment.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_through_a_reaches_b_near_cache() {
    let deployment = Deployment::start("inv_a_to_b", Options::default()).await;
    let id = "a-to-b";
    let first = deployment.post(&deployment.a, id, json!({"n": 1})).await;
    let v1 = first["version"].as_i64().expect("version");
    // B reads it into its near cache.
    let warm = deployment.warm(&deployment.b, id).await;
    assert_eq!(warm.version(), Some(v1));

    let second = deployment.post(&deployment.a, id, json!({"n": 2})).await;
    let v2 = second["version"].as_i64().expect("version");
    let written = Instant::now();
    assert!(v2 > v1);

    // B: never older than what it served before, then the new version.
    let mut highest = v1;
    let mut stale_answers = 0;
    loop {
        let served = deployment.get(&deployment.b, id).await;
        let version = served
            .version()
            .unwrap_or_else(|| panic!("B answered {} {}", served.status, served.body));
        assert!(
            version >= highest,
            "B went back from v{highest} to v{version}"
        );
        highest = version;
        if version == v2 {
            assert_eq!(served.body["features"], json!({"n": 2}));
            break;
        }
        stale_answers += 1;
        assert!(
            written.elapsed() < LAG_BOUND,
            "B still serves v{version} {LAG_BOUND:?} after A wrote v{v2}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let took = written.elapsed();
    println!(
        "B served A's write after {} ({stale_answers} answers of the old version before)",
        ms(took)
    );
    // A serves its own write.
    let on_a = deployment.get(&deployment.a, id).await;
    assert_eq!(on_a.version(), Some(v2), "A: {}", on_a.body);
    // And B's near cache holds the new version again.
    let warm = deployment.warm(&deployment.b, id).await;
    assert_eq!(warm.version(), Some(v2));
    deployment.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unversioned_edit_gets_a_new_version_everywhere() {
    let deployment = Deployment::start("inv_unversioned", Options::default()).await;
    let id = "edit-1";
    let created = deployment
        .post(&deployment.a, id, json!({"x": 1, "y": "keep"}))
        .await;
    let before = created["version"].as_i64().expect("version");
    for replica in deployment.replicas() {
        deployment.warm(replica, id).await;
    }

    let edited = Instant::now();
    let seen = deployment.set_unversioned(id, "features.x", 42).await;
    assert_eq!(seen, Some(before), "the edit does not touch the version");

    let took = until_both(&deployment, id, "features.x == 42 at a new version", |s| {
        s.body["features"] == json!({"x": 42, "y": "keep"})
            && s.version().is_some_and(|v| v > before)
    })
    .await;
    println!(
        "unversioned edit served at a new version on both replicas after {}",
        ms(took)
    );
    assert!(edited.elapsed() <= LAG_BOUND + Duration::from_secs(1));

    let truth = deployment.truth(id).await.expect("document");
    assert!(
        truth.version > before,
        "MongoDB got a new version: {truth:?}"
    );
    let found = deployment
        .wait_consistent(&[id.to_owned()], LAG_BOUND)
        .await;
    println!("every tier agreed with MongoDB {} later", ms(found));
    // The near caches settle on it.
    for replica in deployment.replicas() {
        let warm = deployment.warm(replica, id).await;
        assert_eq!(warm.version(), Some(truth.version));
        assert_eq!(warm.body["features"]["x"], 42);
    }

    // A tool that rewrites the whole document and drops `version` with it.
    let replaced = Instant::now();
    let result = deployment
        .collection()
        .replace_one(
            bson::doc! {"_id": id},
            bson::doc! {
                "_id": id, "customer_id": id, "features": {"x": 7},
                "calculated_at": "2026-01-01T00:00:00.000Z", "model_version": "tool-2",
            },
        )
        .await
        .expect("replace_one");
    assert_eq!(result.modified_count, 1);
    let took = until_both(&deployment, id, "the replacement at a new version", |s| {
        s.body["features"] == json!({"x": 7}) && s.version().is_some_and(|v| v > truth.version)
    })
    .await;
    println!(
        "a replacement without a version was served at a new version on both replicas after {}",
        ms(took)
    );
    assert!(replaced.elapsed() <= LAG_BOUND + Duration::from_secs(1));
    deployment
        .wait_consistent(&[id.to_owned()], LAG_BOUND)
        .await;
    deployment.finish().await;
}

/// A customer whose id is a control key's suffix (`changes`, the old
/// stream's name under `features:`) is an ordinary customer: written while
/// the stream does not exist (a Redis restart), it does not stall
/// invalidation.
#[tokio::test]
async fn a_customer_named_like_a_control_key_is_just_a_customer() {
    let mut deployment = Deployment::start("names", Options::default()).await;
    deployment.inv().terminate(Duration::from_secs(10)).await;
    deployment.redis.restart().await;
    for id in ["changes", "invalidations", "leader", "resume-token"] {
        deployment.post(&deployment.a, id, json!({"who": id})).await;
    }
    deployment.inv().restart().await;
    deployment.wait_leading(Duration::from_secs(20)).await;
    deployment.wait_subscribed(&deployment.b).await;

    deployment
        .post(&deployment.a, "OTHER", json!({"n": 1}))
        .await;
    deployment.warm(&deployment.b, "OTHER").await;
    let version = deployment.write_versioned("OTHER", json!({"n": 2})).await;
    let started = Instant::now();
    while deployment.get(&deployment.b, "OTHER").await.version() != Some(version) {
        assert!(started.elapsed() < LAG_BOUND, "invalidation stalled");
        tokio::time::sleep(POLL).await;
    }
    let served = deployment.get(&deployment.b, "changes").await;
    assert_eq!(served.body["features"]["who"], "changes");
    deployment.finish().await;
}

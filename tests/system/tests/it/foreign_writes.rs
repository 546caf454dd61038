//! Every write to MongoDB reaches every tier, whatever it does to `version`:
//! a restore that lowers it, a tool whose clock runs ahead, a delete whose
//! removed version is unknown, a re-creation with a lower version, and a
//! document whose `customer_id` is another customer's.

use serde_json::json;
use std::time::Duration;
use system_tests::{Deployment, LAG_BOUND, Options, POLL};

/// Now in version units (ms × 1000), shifted by `shift`.
fn version_at(shift: chrono::Duration) -> i64 {
    (chrono::Utc::now() + shift).timestamp_millis() * 1000
}

#[tokio::test]
async fn a_restore_that_lowers_the_version_reaches_every_tier() {
    let deployment = Deployment::start("restore", Options::default()).await;
    // Restored by an update that sets the old fields (the version among
    // them), and by a whole-document replace.
    for (id, by_update) in [("RESTORED-SET", true), ("RESTORED-REPLACE", false)] {
        deployment
            .post(&deployment.a, id, json!({"state": "newest"}))
            .await;
        for replica in deployment.replicas() {
            deployment.warm(replica, id).await;
        }
        let cached = deployment.truth(id).await.expect("written").version;

        // A backup from an hour ago comes back, with the version it had then.
        let old_version = version_at(chrono::Duration::hours(-1));
        if by_update {
            deployment
                .set_fields(
                    id,
                    bson::doc! { "features": { "state": "restored" }, "version": old_version },
                )
                .await;
        } else {
            let restored =
                Deployment::raw_document(id, id, json!({"state": "restored"}), old_version);
            deployment.replace_raw(id, restored).await;
        }
        // It gets a version of its own above everything cached before (the
        // invalidator stamps one after it removed the key), and every tier
        // serves the restored content.
        testkit::eventually(LAG_BOUND, POLL, || async {
            let version = deployment.truth(id).await.expect("restored").version;
            if version > cached {
                Ok(())
            } else {
                Err(format!("{id}: still version {version}, not above {cached}"))
            }
        })
        .await
        .expect("the restored document is stamped with a new version");
        deployment
            .wait_consistent(&[id.to_owned()], LAG_BOUND)
            .await;
        for replica in deployment.replicas() {
            let served = deployment.get(replica, id).await;
            assert_eq!(
                served.body["features"]["state"], "restored",
                "{id}: {served:?}"
            );
        }
    }
    deployment.finish().await;
}

#[tokio::test]
async fn a_delete_and_recreation_after_a_tool_with_a_fast_clock_reach_every_tier() {
    let deployment = Deployment::start("skewed", Options::default()).await;
    for (round, id) in ["SKEW-API", "SKEW-TOOL"].iter().enumerate() {
        deployment.post(&deployment.a, id, json!({"n": 1})).await;
        // A tool whose clock runs 30 s ahead stamps a version from its clock.
        deployment
            .set_fields(
                id,
                bson::doc! {
                    "features": { "n": 2 },
                    "version": version_at(chrono::Duration::seconds(30)),
                },
            )
            .await;
        deployment
            .wait_consistent(&[id.to_string()], LAG_BOUND)
            .await;
        for replica in deployment.replicas() {
            deployment.warm(replica, id).await;
        }

        // Deleted by the tool; the removed version is not in the event.
        deployment.delete_direct(id).await;
        deployment
            .wait_consistent(&[id.to_string()], LAG_BOUND)
            .await;

        // Created again, with a version below the skewed one.
        if round == 0 {
            deployment.post(&deployment.a, id, json!({"n": 3})).await;
        } else {
            let again = Deployment::raw_document(
                id,
                id,
                json!({"n": 3}),
                version_at(chrono::Duration::zero()),
            );
            deployment.replace_raw(id, again).await;
        }
        deployment
            .wait_consistent(&[id.to_string()], LAG_BOUND)
            .await;
        for replica in deployment.replicas() {
            let served = deployment.get(replica, id).await;
            assert_eq!(served.body["features"]["n"], 3, "{id}: {served:?}");
        }
    }
    deployment.finish().await;
}

#[tokio::test]
async fn a_document_is_never_cached_under_another_customers_key() {
    let deployment = Deployment::start("identity", Options::default()).await;
    deployment
        .post(&deployment.a, "OWNER", json!({"who": "owner"}))
        .await;
    for replica in deployment.replicas() {
        deployment.warm(replica, "OWNER").await;
    }

    // Another tool writes a document whose customer_id names OWNER.
    let impostor = Deployment::raw_document(
        "IMPOSTOR",
        "OWNER",
        json!({"who": "impostor"}),
        version_at(chrono::Duration::zero()),
    );
    deployment.replace_raw("IMPOSTOR", impostor).await;
    let started = std::time::Instant::now();
    while started.elapsed() < Duration::from_secs(2) {
        for replica in deployment.replicas() {
            let owner = deployment.get(replica, "OWNER").await;
            assert_eq!(owner.body["features"]["who"], "owner", "{owner:?}");
            let impostor = deployment.get(replica, "IMPOSTOR").await;
            assert_eq!(impostor.status, 200);
            assert_eq!(impostor.body["features"]["who"], "impostor");
            assert_eq!(impostor.source(), Some("mongodb"), "it must not be cached");
        }
        tokio::time::sleep(POLL).await;
    }
    assert!(
        deployment
            .redis_get("features:OWNER")
            .await
            .is_none_or(|raw| raw.contains("owner")),
        "OWNER's key holds the impostor"
    );
    deployment.finish().await;
}

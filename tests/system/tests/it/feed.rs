//! The change feed never stalls invalidation silently: a position the server
//! keeps refusing is given up (fresh start with a flush), and a leader whose
//! feed makes no progress gives its lease to a standby and says so.

use serde_json::json;
use std::time::{Duration, Instant};
use system_tests::{Deployment, LAG_BOUND, Options, POLL};
use testkit::proxy::GatedProxy;

/// A saved position the server refuses with an error that is not history
/// loss (observed with the stand-in: code 13, "Resume token namespace does
/// not match the change-stream watch scope") must not stall invalidation:
/// after a few attempts it is treated as lost. Planted here as a position
/// from another collection's feed.
#[tokio::test]
async fn a_saved_position_the_server_keeps_refusing_is_given_up() {
    let mut deployment = Deployment::start("refused", Options::default()).await;
    deployment.write_versioned("AFTER", json!({"n": 0})).await;
    for replica in deployment.replicas() {
        deployment.warm(replica, "AFTER").await;
    }
    deployment.inv().kill9();
    let foreign = foreign_position(&deployment).await;
    deployment
        .redis_set(&deployment.token_key(), &foreign)
        .await;
    deployment.inv().restart().await;
    deployment.wait_leading(Duration::from_secs(20)).await;

    let version = deployment.write_versioned("AFTER", json!({"n": 1})).await;
    let started = Instant::now();
    for replica in deployment.replicas() {
        // Cached everywhere: the change reached Redis and both replicas.
        while deployment.warm(replica, "AFTER").await.version() != Some(version) {
            assert!(
                started.elapsed() < LAG_BOUND * 2,
                "the change never arrived"
            );
            tokio::time::sleep(POLL).await;
        }
    }
    assert!(
        deployment.inv().log_text().contains("keeps refusing"),
        "the refusal was not what happened"
    );
    deployment.finish().await;
}

/// A feed position of another collection, as the invalidator saves them.
async fn foreign_position(deployment: &Deployment) -> String {
    let other = deployment
        .mongo
        .database(&deployment.db_name)
        .collection::<bson::Document>("elsewhere");
    let mut feed = other.watch().await.expect("watch another collection");
    other
        .insert_one(bson::doc! { "x": 1 })
        .await
        .expect("insert");
    while feed.next_if_any().await.expect("next").is_none() {}
    let token = feed.resume_token().expect("a position");
    bson::to_bson(&token)
        .expect("token as BSON")
        .into_relaxed_extjson()
        .to_string()
}

/// The leader's way to MongoDB stalls (its requests are held, no error
/// comes back). It stops renewing the lease, the standby takes over, and the
/// stalled one reports it on `/health` and `/readyz`.
#[tokio::test]
async fn a_leader_cut_off_from_mongodb_lets_the_standby_lead() {
    let proxy = GatedProxy::start(testkit::mongo::mongo_addr()).await;
    let through_proxy = format!(
        "mongodb://127.0.0.1:{}/?directConnection=true&retryWrites=false",
        proxy.port()
    );
    let mut deployment = Deployment::start(
        "cutoff",
        Options {
            invalidator_env: vec![("MONGO_URI".into(), through_proxy)],
            ..Options::default()
        },
    )
    .await;
    let direct = testkit::mongo_uri();
    let standby = deployment
        .start_invalidator("inv-direct", &[("MONGO_URI", &direct)])
        .await;
    assert!(deployment.is_leader(&deployment.invalidators[0]).await);

    proxy.close();
    let cut = Instant::now();
    while !deployment
        .is_leader(&deployment.invalidators[standby])
        .await
    {
        assert!(
            cut.elapsed() < Duration::from_secs(15),
            "the standby never took over from the stalled leader"
        );
        tokio::time::sleep(POLL).await;
    }
    println!(
        "the standby leads {:?} after the leader was cut off",
        cut.elapsed()
    );

    let health = deployment
        .health(&deployment.invalidators[0])
        .await
        .expect("the stalled invalidator answers /health");
    assert_eq!(health["feed"]["state"], "stalled", "{health}");
    let ready = reqwest::get(deployment.invalidators[0].url("/readyz"))
        .await
        .expect("readyz");
    assert_eq!(ready.status(), 503);

    // Changes flow through the new leader.
    let version = deployment.write_versioned("CUTOFF", json!({"n": 1})).await;
    for replica in deployment.replicas() {
        let started = Instant::now();
        while deployment.warm(replica, "CUTOFF").await.version() != Some(version) {
            assert!(started.elapsed() < LAG_BOUND, "the change never arrived");
            tokio::time::sleep(POLL).await;
        }
    }

    // Its way back: it stands by and is ready again.
    proxy.open();
    let opened = Instant::now();
    loop {
        let health = deployment.health(&deployment.invalidators[0]).await;
        if health
            .as_ref()
            .is_some_and(|h| h["role"] == "standby" && h["status"] == "healthy")
        {
            break;
        }
        assert!(opened.elapsed() < Duration::from_secs(15), "{health:?}");
        tokio::time::sleep(POLL).await;
    }
    deployment.finish().await;
}

/// A change too large to deliver in one message (a 15 MB document updated
/// with 7 MB more: the event with the full document is over 16 MB) comes
/// split into fragments, and is put together: every tier gets the new
/// content.
#[tokio::test]
async fn a_change_too_large_for_one_message_reaches_every_tier() {
    // One invalidator, and what is tested is the reassembly, not leadership:
    // a lease long enough that a CPU-starved leader (other tests running on
    // the same two cores) is not fenced in the middle of the 15 MB change
    // over and over.
    let options = Options {
        lease_ms: 10_000,
        ..Options::default()
    };
    let deployment = Deployment::start("large", options).await;
    let big = "x".repeat(8 * 1024 * 1024);
    deployment
        .write_versioned("LARGE", json!({"big": big, "step": 1}))
        .await;
    for replica in deployment.replicas() {
        deployment.warm(replica, "LARGE").await;
    }
    deployment
        .set_fields(
            "LARGE",
            bson::doc! {
                "features.more": "y".repeat(7 * 1024 * 1024),
                "features.step": 2,
                "version": chrono::Utc::now().timestamp_millis() * 1000,
            },
        )
        .await;
    let started = Instant::now();
    for replica in deployment.replicas() {
        loop {
            let served = deployment.get(replica, "LARGE").await;
            if served.body["features"]["step"] == 2 {
                break;
            }
            // 15 MB through the stand-in and Redis is slow on a busy machine:
            // a bound for "never", not a latency goal.
            assert!(
                started.elapsed() < LAG_BOUND * 6,
                "the large change never arrived"
            );
            tokio::time::sleep(POLL).await;
        }
    }
    deployment.finish().await;
}

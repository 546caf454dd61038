//! When the usual path of a change breaks — a replica's subscription is cut,
//! the collection is dropped, the change history the invalidator would resume
//! from is gone — the caches still end up equal to MongoDB: replicas catch up
//! from the stream, and whole tiers are flushed where nothing else is safe.

use serde_json::json;
use std::time::{Duration, Instant};
use system_tests::{Cached, Deployment, LAG_BOUND, Options, POLL, ids, ms};
use testkit::secantus::TestMongo;

async fn seed(deployment: &Deployment, ids: &[String]) -> Vec<i64> {
    let mut versions = Vec::new();
    for id in ids {
        let doc = deployment.post(&deployment.a, id, json!({"n": 0})).await;
        versions.push(doc["version"].as_i64().expect("version"));
    }
    for id in ids {
        for replica in deployment.replicas() {
            deployment.warm(replica, id).await;
        }
    }
    versions
}

fn counter(follower: &serde_json::Value, name: &str) -> u64 {
    follower[name]
        .as_u64()
        .unwrap_or_else(|| panic!("follower status without {name}: {follower}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_subscription_heals_from_the_stream() {
    const ROUNDS: usize = 5;
    let deployment = Deployment::start("inv_pubsub_cut", Options::default()).await;
    let ids = ids("cut", 20);
    seed(&deployment, &ids).await;
    let before = [
        deployment.follower(&deployment.a).await,
        deployment.follower(&deployment.b).await,
    ];

    let mut resubscribed = Vec::new();
    for round in 0..ROUNDS {
        let mut gaps_before = Vec::new();
        for replica in deployment.replicas() {
            gaps_before.push(counter(&deployment.follower(replica).await, "gaps"));
        }
        let killed = deployment.kill_pubsub_clients().await;
        let cut = Instant::now();
        if round == 0 {
            assert!(
                killed >= 2,
                "expected both replicas' subscriptions, killed {killed}"
            );
        }
        // Writes while the subscriptions are down (or coming back).
        for i in 0..4 {
            let id = &ids[(round * 4 + i) % ids.len()];
            deployment
                .post(&deployment.a, id, json!({"n": round + 1}))
                .await;
        }
        deployment
            .write_versioned(
                &ids[(round * 4 + 2) % ids.len()],
                json!({"n": round + 1, "via": "driver"}),
            )
            .await;
        deployment
            .set_unversioned(
                &ids[(round * 4 + 3) % ids.len()],
                "features.m",
                round as i64,
            )
            .await;
        // Back: subscribed again, after catching up from the stream.
        for (replica, gaps_before) in deployment.replicas().into_iter().zip(gaps_before) {
            loop {
                let follower = deployment.follower(replica).await;
                if follower["subscribed"] == true && counter(&follower, "gaps") > gaps_before {
                    break;
                }
                assert!(
                    cut.elapsed() < LAG_BOUND,
                    "{} did not come back after the cut: {follower}",
                    replica.name()
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        resubscribed.push(cut.elapsed());
    }
    let took = deployment.wait_consistent(&ids, LAG_BOUND).await;
    let after = [
        deployment.follower(&deployment.a).await,
        deployment.follower(&deployment.b).await,
    ];
    println!(
        "{ROUNDS} cuts; both replicas subscribed again after {:?}; all keys equal MongoDB {} after \
         the last writes; follower A {} -> {}, B {} -> {}",
        resubscribed.iter().map(|d| ms(*d)).collect::<Vec<_>>(),
        ms(took),
        before[0],
        after[0],
        before[1],
        after[1]
    );
    for (name, before, after) in [("A", &before[0], &after[0]), ("B", &before[1], &after[1])] {
        assert!(
            counter(after, "gaps") >= counter(before, "gaps") + ROUNDS as u64,
            "replica {name}: gaps did not grow with every cut: {before} -> {after}"
        );
        assert_eq!(after["subscribed"], true, "replica {name}: {after}");
    }
    // Reconnecting does not slow down with the number of cuts a replica has
    // seen so far: each came back about as fast as the first.
    let last = *resubscribed.last().expect("rounds");
    assert!(
        last < Duration::from_millis(1500),
        "the last reconnect took {} (all: {resubscribed:?})",
        ms(last)
    );
    deployment.finish().await;
}

/// Redis's `features:*` keys, but those holding a cached absence (what
/// the 404s of a test's own reads leave).
async fn held_besides_absences(deployment: &Deployment) -> Vec<String> {
    let mut keys = Vec::new();
    for key in deployment.feature_keys().await {
        let id = key.trim_start_matches("features:");
        if !matches!(deployment.cached(id).await, Cached::NotFound(_)) {
            keys.push(key);
        }
    }
    keys
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_collection_drop_flushes_every_tier() {
    let deployment = Deployment::start("inv_drop", Options::default()).await;
    let ids = ids("drop", 10);
    seed(&deployment, &ids).await;
    assert_eq!(
        deployment.feature_keys().await.len(),
        ids.len(),
        "Redis holds every key"
    );

    deployment.collection().drop().await.expect("drop");
    let dropped = Instant::now();
    loop {
        let mut left = Vec::new();
        for id in &ids {
            for replica in deployment.replicas() {
                let served = deployment.get(replica, id).await;
                if served.status != 404 {
                    left.push(format!(
                        "{id} on {}: {} {}",
                        replica.name(),
                        served.status,
                        served.body
                    ));
                }
            }
        }
        let keys = held_besides_absences(&deployment).await;
        if left.is_empty() && keys.is_empty() {
            break;
        }
        assert!(
            dropped.elapsed() < LAG_BOUND,
            "{LAG_BOUND:?} after the drop: still served {left:?}; Redis keys {keys:?}"
        );
        tokio::time::sleep(POLL).await;
    }
    let took = dropped.elapsed();
    println!(
        "every replica answered 404 and Redis held no documents {} after the drop",
        ms(took)
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        held_besides_absences(&deployment).await,
        Vec::<String>::new(),
        "something refilled Redis"
    );

    // The invalidator follows the re-created collection.
    let id = &ids[0];
    let doc = deployment
        .post(&deployment.a, id, json!({"n": "again"}))
        .await;
    let v1 = doc["version"].as_i64().expect("version");
    // B holds its own 404 of the dropped id until A's create is announced.
    deployment.wait_served(&deployment.b, id, v1).await;
    deployment.warm(&deployment.b, id).await;
    let v2 = deployment.write_versioned(id, json!({"n": "tool"})).await;
    assert!(v2 > v1);
    let took = deployment
        .wait_consistent(std::slice::from_ref(id), LAG_BOUND)
        .await;
    println!(
        "a change after the re-creation reached both replicas after {}",
        ms(took)
    );
    assert_eq!(deployment.get(&deployment.b, id).await.version(), Some(v2));
    deployment.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_history_flushes_every_tier_and_tailing_goes_on() {
    // A server of the test's own: pruning the oplog would disturb every other
    // test's change stream on the shared one.
    let mongo = TestMongo::start(&["--oplog-max-entries", "20"]).await;
    let mut deployment = Deployment::start(
        "inv_history",
        Options {
            mongo_uri: Some(mongo.uri()),
            ..Options::default()
        },
    )
    .await;
    let ids = ids("lost", 6);
    let seeded = seed(&deployment, &ids).await;
    deployment.wait_consistent(&ids, LAG_BOUND).await;

    // Graceful stop: the invalidator saves where it stands.
    let status = deployment.inv().terminate(Duration::from_secs(15)).await;
    assert!(
        status.is_some_and(|s| s.success()),
        "invalidator exit: {status:?}"
    );
    assert!(
        deployment
            .redis_get(&deployment.token_key())
            .await
            .is_some(),
        "no saved token"
    );

    // Changes nobody announces: through A (B's near cache keeps the old
    // version), and straight into MongoDB (both near caches and Redis keep it).
    for id in &ids[..3] {
        deployment.post(&deployment.a, id, json!({"n": 1})).await;
    }
    for id in &ids[3..] {
        deployment
            .write_versioned(id, json!({"n": 1, "via": "driver"}))
            .await;
    }
    // Enough other writes that a 20-entry oplog no longer holds the token.
    let other = deployment
        .mongo
        .database(&deployment.db_name)
        .collection::<bson::Document>("other");
    for i in 0..30 {
        other.insert_one(bson::doc! {"i": i}).await.expect("insert");
    }
    let reply = mongo.prune_oplog().await;
    println!("pruneOplog: {reply}");
    let stale = deployment.get(&deployment.b, &ids[0]).await;
    assert_eq!(
        (stale.version(), stale.source()),
        (Some(seeded[0]), Some("local")),
        "B's near cache should still hold the version before the outage: {}",
        stale.body
    );
    let gaps_before = counter(&deployment.follower(&deployment.b).await, "gaps");

    let restarted = Instant::now();
    deployment.inv().restart().await;
    let inv = &deployment.invalidators[0];
    loop {
        let lost = deployment
            .metric(inv, "invalidator_history_lost_total", &[])
            .await;
        let flushed = deployment
            .metric(
                inv,
                "invalidator_flushes_total",
                &[("reason", "history_lost")],
            )
            .await;
        if lost >= 1.0 && flushed >= 1.0 {
            break;
        }
        assert!(
            restarted.elapsed() < Duration::from_secs(15),
            "no history-lost flush: invalidator_history_lost_total {lost}, flushes {flushed}"
        );
        tokio::time::sleep(POLL).await;
    }
    println!(
        "history-lost flush counted {} after the restart",
        ms(restarted.elapsed())
    );
    assert_eq!(
        deployment.feature_keys().await,
        Vec::<String>::new(),
        "Redis still holds cached documents after the flush"
    );
    assert!(
        inv.log_text().contains("change history lost"),
        "the invalidator did not log the loss"
    );

    // The replicas drop their near caches: nothing stale is served.
    let took = deployment.wait_consistent(&ids, LAG_BOUND).await;
    println!("every tier equal to MongoDB {} after the flush", ms(took));
    let follower = deployment.follower(&deployment.b).await;
    assert!(
        counter(&follower, "gaps") > gaps_before,
        "B noticed no gap: {follower}"
    );

    // And later changes propagate as usual.
    for id in &ids {
        for replica in deployment.replicas() {
            deployment.warm(replica, id).await;
        }
    }
    deployment
        .post(&deployment.a, &ids[0], json!({"n": 2}))
        .await;
    deployment
        .write_versioned(&ids[3], json!({"n": 2, "via": "driver"}))
        .await;
    deployment.set_unversioned(&ids[4], "features.x", 42).await;
    let took = deployment.wait_consistent(&ids, LAG_BOUND).await;
    println!(
        "changes after the restart reached both replicas after {}",
        ms(took)
    );
    let served = deployment.get(&deployment.b, &ids[4]).await;
    assert_eq!(served.body["features"]["x"], 42);
    deployment.finish().await;
    drop(mongo);
}

/// An invalidator that starts without a saved position (first start, or
/// after Redis lost its keys) flushes every cache and opens a change stream
/// at "now". A write made while that stream is being opened is in no event;
/// only the flush can clear what caches held before it. So the stream must
/// be open before the flush: here the invalidator's requests to MongoDB are
/// held (a slow network) while a replica caches a key and the key is written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_while_the_stream_opens_is_not_lost() {
    let proxy = testkit::proxy::GatedProxy::start(testkit::mongo::mongo_addr()).await;
    let through_proxy = format!(
        "mongodb://127.0.0.1:{}/?directConnection=true&retryWrites=false",
        proxy.port()
    );
    let mut deployment = Deployment::start(
        "inv_fresh_start",
        Options {
            invalidator_env: vec![
                ("MONGO_URI".into(), through_proxy),
                // Held requests wait rather than time out.
                ("MONGO_TIMEOUT_MS".into(), "15000".into()),
            ],
            ..Options::default()
        },
    )
    .await;
    let id = "fresh-1".to_owned();
    let v1 = deployment.post(&deployment.a, &id, json!({"n": 1})).await["version"]
        .as_i64()
        .expect("version");
    deployment.warm(&deployment.b, &id).await;

    // Restart without a saved position, while MongoDB answers it slowly.
    deployment.inv().kill9();
    let token_key = deployment.token_key();
    let _: i64 = redis::cmd("DEL")
        .arg(&token_key)
        .query_async(&mut deployment.redis.client().await)
        .await
        .expect("DEL");
    proxy.close();
    deployment.inv().restart().await;
    let started = Instant::now();
    while !deployment.is_leader(&deployment.invalidators[0]).await {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "it does not lead"
        );
        tokio::time::sleep(POLL).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;

    // Meanwhile B caches the key, and the key is written.
    let cached = deployment.get(&deployment.b, &id).await;
    assert_eq!(cached.version(), Some(v1));
    deployment.get(&deployment.b, &id).await;
    let v2 = deployment
        .write_versioned(&id, json!({"n": 2, "via": "driver"}))
        .await;
    assert!(v2 > v1);

    proxy.open();
    while deployment
        .redis_get(&token_key)
        .await
        .is_none_or(|t| t.is_empty())
    {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the stream never opened"
        );
        tokio::time::sleep(POLL).await;
    }
    let took = deployment
        .wait_consistent(std::slice::from_ref(&id), LAG_BOUND)
        .await;
    println!(
        "B served the write made while the stream opened after {}",
        ms(took)
    );
    deployment.finish().await;
}

/// A replica that starts while Redis is down serves (and caches) from
/// MongoDB, and hears nothing: neither the change made meanwhile nor, once
/// Redis is back (empty: a restart), the invalidator's fresh-start flush when
/// that was announced before the replica subscribed. Its first subscription
/// must not leave it holding what it cached before. (The replica reaches
/// Redis through a gated proxy, so it subscribes after that flush for sure.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_started_while_redis_is_down_serves_nothing_stale() {
    let mut deployment = Deployment::start("inv_redis_down", Options::default()).await;
    let id = "down-1".to_owned();
    let v1 = deployment.post(&deployment.a, &id, json!({"n": 1})).await["version"]
        .as_i64()
        .expect("version");

    deployment.redis.stop();
    let redis_addr = std::net::SocketAddr::from(([127, 0, 0, 1], deployment.redis.port()));
    let proxy = testkit::proxy::GatedProxy::start(redis_addr).await;
    proxy.close();
    let c_redis = format!("redis://127.0.0.1:{}/0", proxy.port());
    let c = deployment
        .start_replica("api-c", &[("REDIS_URL", c_redis.as_str())])
        .await;
    let mut served = deployment.get(&c, &id).await;
    for _ in 0..5 {
        if served.source() == Some("local") {
            break;
        }
        served = deployment.get(&c, &id).await;
    }
    assert_eq!(
        (served.version(), served.source()),
        (Some(v1), Some("local")),
        "C should cache what MongoDB holds while Redis is down: {}",
        served.body
    );
    let v2 = deployment
        .write_versioned(&id, json!({"n": 2, "via": "driver"}))
        .await;

    // Redis comes back empty: no resume token, no lease, no stream. The
    // invalidator starts afresh (and announces a flush) before C gets through.
    deployment.redis.restart().await;
    let back = Instant::now();
    deployment.wait_leading(Duration::from_secs(15)).await;
    proxy.open();
    deployment.wait_subscribed(&c).await;
    println!(
        "after Redis came back: the invalidator led again and C subscribed within {}",
        ms(back.elapsed())
    );
    loop {
        let served = deployment.get(&c, &id).await;
        if served.version() == Some(v2) {
            break;
        }
        assert!(
            back.elapsed() < LAG_BOUND + Duration::from_secs(3),
            "C still serves v{:?} (source {:?}) {:?} after Redis came back; MongoDB has v{v2}",
            served.version(),
            served.source(),
            back.elapsed()
        );
        tokio::time::sleep(POLL).await;
    }
    println!(
        "C served the current version {} after Redis came back",
        ms(back.elapsed())
    );
    let follower = deployment.follower(&c).await;
    assert!(
        counter(&follower, "flushes") >= 1,
        "C did not flush: {follower}"
    );
    drop(c);
    deployment.finish().await;
}

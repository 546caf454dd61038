//! Warm start: replicas record which keys they read most (the hot-key record
//! in Redis); a replica started later holds those keys in its near cache
//! before anyone asks it for them; after a flush every replica preloads them
//! again, and the invalidator puts them back into Redis without any read.

use serde_json::{Value, json};
use std::time::{Duration, Instant};
use system_tests::{COLLECTION, Cached, Deployment, Options, POLL, ids};
use testkit::services::ServiceProcess;

/// How long the record, a warm-up or a refill may take here.
const WARM_BOUND: Duration = Duration::from_secs(20);
/// Batch reads of the hot keys: each read of a key is sampled with
/// probability 1/8, so 150 reads leave every hot key sampled many times.
const HOT_READS: usize = 150;

fn hot_key(deployment: &Deployment) -> String {
    format!("cache-invalidator:{}.{COLLECTION}:hot", deployment.db_name)
}

async fn seed(deployment: &Deployment, ids: &[String]) {
    for id in ids {
        deployment.post(&deployment.a, id, json!({"id": id})).await;
    }
}

/// Reads `ids` through `replica`'s batch route `rounds` times.
async fn read_often(replica: &ServiceProcess, ids: &[String], rounds: usize) {
    let http = reqwest::Client::new();
    for _ in 0..rounds {
        let response = http
            .post(replica.url("/api/features/batch/"))
            .json(&json!({ "customer_ids": ids }))
            .send()
            .await
            .expect("batch read");
        assert_eq!(response.status().as_u16(), 200);
        let body: Value = response.json().await.expect("batch body");
        assert!(
            body["missing"].as_array().is_some_and(Vec::is_empty),
            "{body}"
        );
    }
}

/// The record's hottest `n` keys.
async fn hottest(deployment: &Deployment, n: usize) -> Vec<String> {
    let mut conn = deployment.redis.client().await;
    redis::cmd("ZREVRANGEBYSCORE")
        .arg(hot_key(deployment))
        .arg("+inf")
        .arg("(0")
        .arg("LIMIT")
        .arg(0)
        .arg(n)
        .query_async(&mut conn)
        .await
        .expect("ZREVRANGEBYSCORE")
}

/// Waits until the record's hottest `ids.len()` keys are `ids`.
async fn wait_recorded(deployment: &Deployment, ids: &[String]) {
    let started = Instant::now();
    loop {
        let mut top = hottest(deployment, ids.len()).await;
        top.sort();
        let mut want = ids.to_vec();
        want.sort();
        if top == want {
            return;
        }
        assert!(
            started.elapsed() < WARM_BOUND,
            "the record's hottest keys are {top:?}, not {want:?}"
        );
        tokio::time::sleep(POLL).await;
    }
}

async fn warm_loaded(deployment: &Deployment, replica: &ServiceProcess, reason: &str) -> f64 {
    deployment
        .metric(
            replica,
            "cache_warm_keys_loaded_total",
            &[("reason", reason)],
        )
        .await
}

/// Waits until `replica` counts at least `n` keys loaded by warm-ups for `reason`.
async fn wait_warmed(deployment: &Deployment, replica: &ServiceProcess, reason: &str, n: f64) {
    let started = Instant::now();
    loop {
        let loaded = warm_loaded(deployment, replica, reason).await;
        if loaded >= n {
            return;
        }
        assert!(
            started.elapsed() < WARM_BOUND,
            "{}: {loaded} keys loaded by warm-ups ({reason}), expected {n}",
            replica.name()
        );
        tokio::time::sleep(POLL).await;
    }
}

/// The first read of every hot key on `replica` is a near-cache hit.
async fn assert_served_locally(deployment: &Deployment, replica: &ServiceProcess, ids: &[String]) {
    for id in ids {
        let served = deployment.get(replica, id).await;
        assert_eq!(served.status, 200, "{id}: {}", served.body);
        assert_eq!(
            served.source(),
            Some("local"),
            "the first read of hot key {id} on {} was not a near-cache hit",
            replica.name()
        );
    }
}

/// Flushes every tier the way a lost change-feed position does: the
/// invalidator restarts without its saved position, flushes Redis and
/// announces a flush to every replica.
async fn flush_everything(deployment: &mut Deployment) {
    deployment.inv().kill9();
    let mut conn = deployment.redis.client().await;
    let _: () = redis::cmd("DEL")
        .arg(deployment.token_key())
        .query_async(&mut conn)
        .await
        .expect("DEL resume token");
    deployment.inv().restart().await;
    deployment.wait_leading(WARM_BOUND).await;
}

/// Replica C, started after A made some keys hot, holds exactly those keys
/// in its near cache before it is asked for any of them; the rest it reads
/// from the tiers below.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_started_later_holds_the_hot_keys_before_any_request() {
    let deployment = Deployment::start("warm_start", Options::default()).await;
    let hot = ids("hot", 20);
    let cold = ids("cold", 10);
    seed(&deployment, &hot).await;
    seed(&deployment, &cold).await;
    read_often(&deployment.a, &hot, HOT_READS).await;
    wait_recorded(&deployment, &hot).await;

    let c = deployment
        .start_replica("api-c", &[("WARM_KEYS", "20")])
        .await;
    deployment.wait_subscribed(&c).await;
    wait_warmed(&deployment, &c, "start", hot.len() as f64).await;
    assert_served_locally(&deployment, &c, &hot).await;
    for id in &cold {
        let served = deployment.get(&c, id).await;
        assert_ne!(
            served.source(),
            Some("local"),
            "{id} is not among the 20 hottest, yet C preloaded it"
        );
    }
    assert_eq!(warm_loaded(&deployment, &c, "flush").await, 0.0);
    assert!(
        c.log_text().contains("warm-up done"),
        "C did not log its warm-up"
    );
    drop(c);
    deployment.finish().await;
}

/// After a flush of every tier, both replicas preload the hot keys again
/// (their first reads are near-cache hits) and the invalidator has put them
/// back into Redis.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_flush_every_replica_preloads_the_hot_keys_again() {
    let mut deployment = Deployment::start("warm_flush", Options::default()).await;
    let hot = ids("hot", 20);
    seed(&deployment, &hot).await;
    read_often(&deployment.a, &hot, HOT_READS / 2).await;
    read_often(&deployment.b, &hot, HOT_READS / 2).await;
    wait_recorded(&deployment, &hot).await;

    let before = [
        warm_loaded(&deployment, &deployment.a, "flush").await,
        warm_loaded(&deployment, &deployment.b, "flush").await,
    ];
    flush_everything(&mut deployment).await;
    for (replica, before) in deployment.replicas().into_iter().zip(before) {
        wait_warmed(&deployment, replica, "flush", before + hot.len() as f64).await;
    }
    for replica in deployment.replicas() {
        assert_served_locally(&deployment, replica, &hot).await;
    }
    for id in &hot {
        assert!(
            matches!(deployment.cached(id).await, Cached::Document { .. }),
            "{id} is not back in Redis"
        );
    }
    deployment.finish().await;
}

/// The invalidator's own refill: with warm-ups off on the replicas (they
/// neither record nor preload), the keys of the record are back in Redis
/// after the flush, though nothing read them; keys outside the record, and
/// ids MongoDB does not hold, are not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_flush_the_invalidator_refills_redis_with_the_hot_keys() {
    let mut deployment = Deployment::start(
        "warm_refill",
        Options {
            env: vec![("WARM_KEYS".into(), "0".into())],
            invalidator_env: vec![("WARM_KEYS".into(), "10".into())],
            ..Options::default()
        },
    )
    .await;
    let hot = ids("hot", 10);
    let cold = ids("cold", 5);
    seed(&deployment, &hot).await;
    seed(&deployment, &cold).await;
    // The record as replicas leave it (these replicas keep none).
    let mut conn = deployment.redis.client().await;
    let absent = ["ABSENT-1".to_owned(), "ABSENT-2".to_owned()];
    for (rank, id) in hot.iter().chain(&absent).enumerate() {
        let _: () = redis::cmd("ZADD")
            .arg(hot_key(&deployment))
            .arg(1000 - rank as i64)
            .arg(id)
            .query_async(&mut conn)
            .await
            .expect("ZADD");
    }
    let reads_before = deployment
        .metric(&deployment.a, "cache_requests_total", &[])
        .await
        + deployment
            .metric(&deployment.b, "cache_requests_total", &[])
            .await;

    flush_everything(&mut deployment).await;
    let started = Instant::now();
    loop {
        let mut missing = Vec::new();
        for id in &hot {
            if !matches!(deployment.cached(id).await, Cached::Document { .. }) {
                missing.push(id.clone());
            }
        }
        if missing.is_empty() {
            break;
        }
        assert!(
            started.elapsed() < WARM_BOUND,
            "not refilled into Redis after the flush: {missing:?}"
        );
        tokio::time::sleep(POLL).await;
    }
    for id in cold.iter().chain(&absent) {
        assert!(
            matches!(deployment.cached(id).await, Cached::Absent),
            "{id} is in Redis after the flush: {:?}",
            deployment.cached(id).await
        );
    }
    let reads_after = deployment
        .metric(&deployment.a, "cache_requests_total", &[])
        .await
        + deployment
            .metric(&deployment.b, "cache_requests_total", &[])
            .await;
    assert_eq!(reads_before, reads_after, "a replica read something");
    let inv = &deployment.invalidators[0];
    assert!(
        deployment
            .metric(inv, "invalidator_refilled_keys_total", &[])
            .await
            >= hot.len() as f64
    );
    deployment.finish().await;
}

//! Absence and load, on real processes: cached 404s give way to creates made
//! outside the API on every replica; a storm of reads of missing ids costs
//! MongoDB one find per id; replicas that miss one key together read it
//! from MongoDB once, also when the lease holder dies mid-load; and a hot
//! key is refreshed ahead of its expiry instead of falling through.

use futures::future::join_all;
use serde_json::json;
use std::sync::Arc;
use std::time::{Duration, Instant};
use system_tests::{Cached, Deployment, LAG_BOUND, Options, POLL};
use testkit::proxy::GatedProxy;
use testkit::services::ServiceProcess;
use tokio::sync::Barrier;

/// The sum over `replicas` of `name{labels}`.
async fn total(
    deployment: &Deployment,
    replicas: &[&ServiceProcess],
    name: &str,
    labels: &[(&str, &str)],
) -> f64 {
    let mut sum = 0.0;
    for replica in replicas {
        sum += deployment.metric(replica, name, labels).await;
    }
    sum
}

async fn finds(deployment: &Deployment, replicas: &[&ServiceProcess]) -> f64 {
    total(
        deployment,
        replicas,
        "mongodb_commands_total",
        &[("command", "find")],
    )
    .await
}

/// Waits until Redis holds what `want` accepts for `id`.
async fn wait_cached(deployment: &Deployment, id: &str, want: impl Fn(&Cached) -> bool) -> Cached {
    let started = Instant::now();
    loop {
        let cached = deployment.cached(id).await;
        if want(&cached) {
            return cached;
        }
        assert!(
            started.elapsed() < LAG_BOUND,
            "Redis holds {cached:?} for {id}"
        );
        tokio::time::sleep(POLL).await;
    }
}

/// Puts `id` into MongoDB (as another tool would), waits until the
/// invalidator has put it into Redis, then removes it from Redis: a cold key.
async fn cold_document(deployment: &Deployment, id: &str) -> i64 {
    let version = deployment.write_versioned(id, json!({"n": 1})).await;
    wait_cached(deployment, id, |c| matches!(c, Cached::Document { .. })).await;
    let _: i64 = redis::cmd("DEL")
        .arg(format!("features:{id}"))
        .query_async(&mut deployment.redis.client().await)
        .await
        .unwrap();
    version
}

#[tokio::test]
async fn a_404_cached_on_two_replicas_gives_way_to_creates_outside_the_api() {
    let deployment = Deployment::start("absent_create", Options::default()).await;
    let replicas = deployment.replicas();
    for id in ["NEW-VERSIONED", "NEW-UNVERSIONED"] {
        for replica in replicas {
            for _ in 0..3 {
                assert_eq!(deployment.get(replica, id).await.status, 404);
            }
        }
        assert!(
            matches!(deployment.cached(id).await, Cached::NotFound(_)),
            "the 404 is cached in Redis"
        );
    }
    let negative_hits = total(
        &deployment,
        &replicas,
        "cache_requests_total",
        &[("result", "negative_hit")],
    )
    .await;
    assert!(
        negative_hits >= 8.0,
        "{negative_hits} negative hits for 12 reads of 2 ids"
    );

    // Created straight in MongoDB: with a version, and without one (the
    // invalidator stamps it).
    let version = deployment
        .write_versioned("NEW-VERSIONED", json!({"made": "by a tool"}))
        .await;
    deployment
        .insert_unversioned("NEW-UNVERSIONED", json!({"made": "by another tool"}))
        .await;
    for replica in replicas {
        deployment
            .wait_served(replica, "NEW-VERSIONED", version)
            .await;
    }
    let ids = vec!["NEW-VERSIONED".to_owned(), "NEW-UNVERSIONED".to_owned()];
    deployment.wait_consistent(&ids, LAG_BOUND).await;
    deployment.finish().await;
}

#[tokio::test]
async fn a_storm_of_gets_for_missing_ids_costs_one_find_per_id() {
    const IDS: usize = 50;
    const ROUNDS: usize = 10;
    let deployment = Deployment::start(
        "absent_storm",
        Options {
            // The storm must fit in one negative TTL, and a replica waiting
            // on the other's lease must not give up on a loaded machine.
            env: vec![
                ("NEGATIVE_TTL_MS".into(), "60000".into()),
                ("MISS_LEASE_WAIT_MS".into(), "10000".into()),
            ],
            ..Options::default()
        },
    )
    .await;
    let replicas = deployment.replicas();
    let ids = system_tests::ids("MISSING", IDS);
    let before = finds(&deployment, &replicas).await;
    let started = Instant::now();
    for _ in 0..ROUNDS {
        let reads = ids
            .iter()
            .flat_map(|id| replicas.map(|replica| deployment.get(replica, id)));
        for served in join_all(reads).await {
            assert_eq!(served.status, 404, "{}", served.body);
        }
    }
    let elapsed = started.elapsed();
    let spent = finds(&deployment, &replicas).await - before;
    println!(
        "{} reads of {IDS} missing ids on 2 replicas in {elapsed:?}: {spent} MongoDB finds",
        IDS * ROUNDS * 2
    );
    assert_eq!(spent, IDS as f64);
    deployment.finish().await;
}

/// `GET url`, tried again (up to 10 times, briefly apart) when the
/// connection is refused or reset: thousands of connections opened at once
/// can overflow a listen backlog on a busy test machine.
async fn get_json(client: &reqwest::Client, url: &str) -> (u16, serde_json::Value) {
    let mut attempt = 0;
    loop {
        attempt += 1;
        match client.get(url).send().await {
            Ok(response) => {
                let status = response.status().as_u16();
                return (status, response.json().await.unwrap_or_default());
            }
            Err(err) if attempt < 10 && (err.is_connect() || err.is_request()) => {
                tokio::time::sleep(Duration::from_millis(20 * attempt)).await;
            }
            Err(err) => panic!("GET {url}: {err}"),
        }
    }
}

/// Sends `n` GETs of `path` to `replica` at once (released by one barrier
/// shared with the other replicas' GETs).
fn burst(
    client: &reqwest::Client,
    replica: &ServiceProcess,
    path: &str,
    n: usize,
    barrier: &Arc<Barrier>,
) -> Vec<tokio::task::JoinHandle<(u16, serde_json::Value)>> {
    (0..n)
        .map(|_| {
            let client = client.clone();
            let url = replica.url(path);
            let barrier = Arc::clone(barrier);
            tokio::spawn(async move {
                barrier.wait().await;
                get_json(&client, &url).await
            })
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replicas_missing_one_key_together_read_mongodb_once() {
    const PER_REPLICA: usize = 1000;
    let deployment = Deployment::start(
        "lease_storm",
        Options {
            // Coalescing is measured here, not timeouts: on a loaded test
            // machine 2,000 reads at once can hold a Redis answer past the
            // default 500 ms (a fill that times out leaves its reservation,
            // and the other replica falls back after its wait).
            env: vec![
                ("MISS_LEASE_WAIT_MS".into(), "10000".into()),
                ("REDIS_TIMEOUT_MS".into(), "5000".into()),
            ],
            lease_ms: 10_000,
            ..Options::default()
        },
    )
    .await;
    let replicas = deployment.replicas();
    let version = cold_document(&deployment, "COLD").await;
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(PER_REPLICA)
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap();
    // Open the connections first, so the reads below arrive together.
    let barrier = Arc::new(Barrier::new(PER_REPLICA * replicas.len()));
    let mut warmups = Vec::new();
    for replica in replicas {
        warmups.extend(burst(&client, replica, "/api/info/", PER_REPLICA, &barrier));
    }
    for warmup in warmups {
        assert_eq!(warmup.await.unwrap().0, 200);
    }

    let before = finds(&deployment, &replicas).await;
    let barrier = Arc::new(Barrier::new(PER_REPLICA * replicas.len()));
    let mut reads = Vec::new();
    for replica in replicas {
        reads.extend(burst(
            &client,
            replica,
            "/api/features/COLD/",
            PER_REPLICA,
            &barrier,
        ));
    }
    let mut sources = std::collections::BTreeMap::<String, usize>::new();
    for read in reads {
        let (status, body) = read.await.unwrap();
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["version"], version);
        *sources
            .entry(body["source"].as_str().unwrap_or("?").to_owned())
            .or_default() += 1;
    }
    let spent = finds(&deployment, &replicas).await - before;
    let mut leases = Vec::new();
    for outcome in ["leader", "waited", "fallback"] {
        leases.push(
            total(
                &deployment,
                &replicas,
                "cache_miss_lease_total",
                &[("outcome", outcome)],
            )
            .await,
        );
    }
    let [leaders, waited, fallbacks] = leases[..] else {
        unreachable!()
    };
    println!(
        "{} cold reads on 2 replicas: {spent} MongoDB finds; sources {sources:?}; \
         leases: {leaders} leader, {waited} waited, {fallbacks} fallback",
        PER_REPLICA * 2
    );
    assert_eq!(spent, 1.0, "sources {sources:?}");
    assert_eq!(leaders, 1.0);
    assert_eq!(fallbacks, 0.0);
    deployment.finish().await;
}

#[tokio::test]
async fn a_lease_holder_killed_mid_load_leaves_the_others_a_fallback() {
    let deployment = Deployment::start(
        "lease_killed",
        Options {
            env: vec![("MISS_LEASE_WAIT_MS".into(), "300".into())],
            ..Options::default()
        },
    )
    .await;
    let version = cold_document(&deployment, "ORPHAN").await;

    // A third replica reaches MongoDB through a proxy that will hold its
    // requests: its load takes the lease and never comes back.
    let proxy = GatedProxy::start(testkit::mongo::mongo_addr()).await;
    let through_proxy = format!(
        "mongodb://127.0.0.1:{}/?directConnection=true&retryWrites=false",
        proxy.port()
    );
    let mut slow = deployment
        .start_replica("api-slow", &[("MONGO_URI", &through_proxy)])
        .await;
    proxy.close();
    let stuck = {
        let url = slow.url("/api/features/ORPHAN/");
        tokio::spawn(async move { reqwest::get(url).await.map(|r| r.status()) })
    };
    wait_cached(&deployment, "ORPHAN", |c| matches!(c, Cached::Reserved(_))).await;
    slow.kill9();
    stuck.abort();

    let before = deployment
        .metric(
            &deployment.a,
            "cache_miss_lease_total",
            &[("outcome", "fallback")],
        )
        .await;
    let served = deployment.get(&deployment.a, "ORPHAN").await;
    assert_eq!(served.status, 200, "{}", served.body);
    assert_eq!(served.version(), Some(version));
    let after = deployment
        .metric(
            &deployment.a,
            "cache_miss_lease_total",
            &[("outcome", "fallback")],
        )
        .await;
    assert_eq!(after - before, 1.0, "the read fell back to MongoDB");
    // Filled onto the dead holder's reservation: B is served from Redis.
    let served = deployment.get(&deployment.b, "ORPHAN").await;
    assert_eq!(served.version(), Some(version));
    assert_eq!(served.source(), Some("redis"));
    drop(proxy);
    deployment.finish().await;
}

#[tokio::test]
async fn a_hot_key_is_never_served_from_mongodb_after_its_first_read() {
    let deployment = Deployment::start(
        "refresh_ahead",
        Options {
            // A 2 s Redis TTL refreshed in its last second; near caches that
            // keep a copy only 200 ms, so reads reach Redis all the time.
            env: vec![
                ("REDIS_TTL".into(), "2".into()),
                ("REFRESH_AHEAD_FRACTION".into(), "0.5".into()),
                ("LOCAL_CACHE_TTL_MS".into(), "200".into()),
            ],
            ..Options::default()
        },
    )
    .await;
    let replicas = deployment.replicas();
    let version = cold_document(&deployment, "HOT").await;
    let first = deployment.get(&deployment.a, "HOT").await;
    assert_eq!(first.version(), Some(version));

    let started = Instant::now();
    let mut sources = std::collections::BTreeMap::<String, usize>::new();
    while started.elapsed() < Duration::from_secs(5) {
        for replica in replicas {
            let served = deployment.get(replica, "HOT").await;
            assert_eq!(served.version(), Some(version), "{}", served.body);
            let source = served.source().unwrap_or("?").to_owned();
            assert_ne!(
                source,
                "mongodb",
                "{} fell through to MongoDB after {:?} (sources so far {sources:?})",
                replica.name(),
                started.elapsed()
            );
            *sources.entry(source).or_default() += 1;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let refreshes = total(&deployment, &replicas, "cache_refresh_ahead_total", &[]).await;
    println!("5 s of reads of a key with a 2 s TTL: sources {sources:?}, {refreshes} refreshes");
    assert!(sources.get("redis").is_some_and(|n| *n > 0), "{sources:?}");
    assert!(refreshes >= 2.0, "{refreshes} refreshes");
    deployment.finish().await;
}

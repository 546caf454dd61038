//! Both sides of the fleet against a real Redis: replicas (heartbeat +
//! responder over a real near cache) and the asking side — listing, a
//! fan-out of many keys in several parts, a replica that stays silent, and
//! an eviction request through the invalidator's queue and its fenced
//! position.

use feature_cache::{ControlKeys, Entry, Fence, NearCache, NearCacheConfig};
use fleet::{FleetClient, FleetConfig, Heartbeat, RequestKind, RequestQueue, Responder, Vitals};
use std::sync::Arc;
use std::time::Duration;
use testkit::TestRedis;
use tokio_util::sync::CancellationToken;

fn config() -> FleetConfig {
    FleetConfig::new(
        &ControlKeys::for_collection("db", "coll"),
        "test:invalidations",
        Duration::from_millis(100),
    )
}

fn near() -> Arc<NearCache> {
    Arc::new(NearCache::new(&NearCacheConfig {
        max_entries: 10_000,
        max_bytes: 64 << 20,
        ttl: Duration::from_secs(600),
        negative_ttl: Duration::from_secs(5),
    }))
}

async fn manager(redis: &TestRedis) -> feature_cache::RedisConnection {
    feature_cache::RedisConnection::Single(
        redis::Client::open(redis.url())
            .unwrap()
            .get_connection_manager()
            .await
            .unwrap(),
    )
}

/// Starts a replica's heartbeat and (when `answers`) its responder.
async fn replica(
    redis: &TestRedis,
    id: &str,
    near: Arc<NearCache>,
    answers: bool,
    shutdown: &CancellationToken,
) {
    let entries = Arc::clone(&near);
    let heartbeat = Heartbeat::new(
        manager(redis).await,
        config(),
        id.to_owned(),
        "9.9.9".into(),
        move || Vitals {
            near_entries: entries.len(),
            subscribed: true,
            ..Vitals::default()
        },
    );
    tokio::spawn(heartbeat.run(shutdown.child_token()));
    if answers {
        let responder = Responder::new(
            redis::Client::open(redis.url()).unwrap(),
            manager(redis).await,
            config(),
            id.to_owned(),
            Some(near),
        );
        tokio::spawn(responder.run(shutdown.child_token()));
    }
}

async fn client(redis: &TestRedis) -> FleetClient {
    FleetClient::new(
        redis::Client::open(redis.url()).unwrap(),
        manager(redis).await,
        config(),
    )
}

/// Waits until the listed replicas are `expected`.
async fn until_listed(client: &FleetClient, expected: &[&str]) {
    testkit::eventually(
        Duration::from_secs(10),
        Duration::from_millis(20),
        || async {
            let ids: Vec<String> = client
                .replicas()
                .await
                .unwrap()
                .into_iter()
                .map(|r| r.instance_id)
                .collect();
            ids == expected
        },
    )
    .await
    .unwrap_or_else(|err| panic!("replicas never listed as {expected:?}: {err}"));
}

#[tokio::test]
async fn every_replica_answers_for_many_keys_and_a_silent_one_is_named() {
    let redis = TestRedis::start().await;
    let shutdown = CancellationToken::new();
    let (one, two) = (near(), near());
    // 250 keys: three parts of a query. `one` holds the even ones as
    // floors, `two` the first as a tombstone.
    let ids: Vec<String> = (0..250).map(|i| format!("K{i}")).collect();
    for (i, id) in ids.iter().enumerate() {
        if i % 2 == 0 {
            assert!(one.offer(Entry::floor(id.as_str(), i as i64)));
        }
    }
    assert!(two.offer(Entry::tombstone("K0", 5)));
    replica(&redis, "r1", Arc::clone(&one), true, &shutdown).await;
    replica(&redis, "r2", Arc::clone(&two), true, &shutdown).await;
    // Beats, never answers.
    replica(&redis, "r3", near(), false, &shutdown).await;
    let client = client(&redis).await;
    until_listed(&client, &["r1", "r2", "r3"]).await;
    let listed = client.replicas().await.unwrap();
    assert_eq!(listed[0].binary_version, "9.9.9");
    assert_eq!(listed[0].vitals.near_entries, 125);
    assert!(listed[0].vitals.subscribed);

    // Responders subscribe asynchronously: ask until both answer.
    let mut report = client
        .near_entries_many(&ids, Duration::from_millis(500))
        .await
        .unwrap();
    for _ in 0..20 {
        if report.answers.len() == 2 {
            break;
        }
        report = client
            .near_entries_many(&ids, Duration::from_millis(500))
            .await
            .unwrap();
    }
    assert_eq!(report.silent, vec!["r3".to_owned()]);
    let names: Vec<&str> = report.answers.iter().map(|(id, _)| id.as_str()).collect();
    assert_eq!(names, ["r1", "r2"]);
    let r1 = &report.answers[0].1;
    assert_eq!(r1.len(), 125, "every part answered");
    assert_eq!(r1["K248"].kind, "floor");
    assert_eq!(r1["K248"].version, 248);
    assert!(!r1.contains_key("K1"));
    let r2 = &report.answers[1].1;
    assert_eq!(r2.len(), 1);
    assert_eq!(r2["K0"].kind, "tombstone");

    let single = client
        .near_entries("K2", Duration::from_millis(500))
        .await
        .unwrap();
    assert_eq!(single.silent, vec!["r3".to_owned()]);
    assert_eq!(single.answers[0].instance_id, "r1");
    assert_eq!(single.answers[0].entry.as_ref().unwrap().version, 2);
    assert_eq!(single.answers[1].entry, None);

    // A replica that stops leaves: at once when it shuts down cleanly.
    shutdown.cancel();
    until_listed(&client, &[]).await;
}

#[tokio::test]
async fn an_eviction_request_is_read_once_and_handled_behind_the_fence() {
    let redis = TestRedis::start().await;
    let client = client(&redis).await;
    let mut conn = manager(&redis).await;
    let queue = RequestQueue::new(manager(&redis).await, &config());
    assert!(queue.pending(10).await.unwrap().is_empty());

    let first = client
        .request_eviction("C1", "test", Some("00-abc-def-01".into()))
        .await
        .unwrap();
    let second = client.request_eviction("C2", "test", None).await.unwrap();
    assert!(matches!(
        client.request_eviction("bad id", "test", None).await,
        Err(fleet::FleetError::InvalidCustomerId(_))
    ));
    let pending = queue.pending(10).await.unwrap();
    assert_eq!(pending.len(), 2);
    assert_eq!(pending[0].id, first);
    assert_eq!(
        pending[0].kind,
        RequestKind::Evict {
            customer_id: "C1".into()
        }
    );
    assert_eq!(pending[0].traceparent.as_deref(), Some("00-abc-def-01"));
    assert!(
        !client
            .wait_handled(&first, Duration::from_millis(100))
            .await
            .unwrap()
    );

    // The fence holds: the position moves, the first request is handled.
    let _: () = redis::cmd("SET")
        .arg("lease")
        .arg("token-1")
        .query_async(&mut conn)
        .await
        .unwrap();
    let fenced = queue.fenced(Fence::new("lease", "token-1"));
    fenced.save_position(&first).await.unwrap();
    assert!(
        client
            .wait_handled(&first, Duration::from_millis(100))
            .await
            .unwrap()
    );
    assert!(
        !client
            .wait_handled(&second, Duration::from_millis(100))
            .await
            .unwrap()
    );
    let pending = queue.pending(10).await.unwrap();
    assert_eq!(pending.len(), 1);
    assert_eq!(pending[0].id, second);

    // Another term moved the fence: the old one cannot save.
    let _: () = redis::cmd("SET")
        .arg("lease")
        .arg("token-2")
        .query_async(&mut conn)
        .await
        .unwrap();
    let err = fenced.save_position(&second).await.unwrap_err();
    assert!(Fence::refused(&err), "{err}");
    assert!(
        !client
            .wait_handled(&second, Duration::from_millis(50))
            .await
            .unwrap()
    );
}

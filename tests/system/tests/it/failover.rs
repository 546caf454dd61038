//! The invalidator dies (`kill -9`) in the middle of a burst of writes: a
//! restarted one, or a standby that takes the lease over, replays what was
//! missed from the saved resume token, and every tier of every replica ends
//! up equal to MongoDB.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;
use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use system_tests::{Deployment, LAG_BOUND, Options, WriteKind, ids, ms};

const LEASE_MS: u64 = 1000;

/// Creates every key through A and reads it into both near caches.
async fn seed(deployment: &Deployment, ids: &[String]) {
    for chunk in ids.chunks(10) {
        futures::future::join_all(
            chunk
                .iter()
                .map(|id| deployment.post(&deployment.a, id, json!({"n": 0, "via": "seed"}))),
        )
        .await;
    }
    for id in ids {
        for replica in deployment.replicas() {
            deployment.get(replica, id).await;
        }
    }
}

/// Reads random keys through both replicas until `stop`, so near caches keep
/// holding what they served (and would keep serving it if nobody told them).
async fn read_until(deployment: &Deployment, ids: &[String], stop: &AtomicBool, seed: u64) -> u64 {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut reads = 0;
    while !stop.load(Ordering::SeqCst) {
        let id = &ids[rng.random_range(0..ids.len())];
        let replica = if rng.random_bool(0.5) {
            &deployment.a
        } else {
            &deployment.b
        };
        deployment.get(replica, id).await;
        reads += 1;
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    reads
}

fn count(kinds: &Mutex<BTreeMap<WriteKind, u32>>, kind: WriteKind) {
    *kinds.lock().unwrap().entry(kind).or_default() += 1;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_during_a_burst_then_restart_converges() {
    const KEYS: usize = 50;
    const WRITES: usize = 200;
    const KILL_AT: usize = 60;
    const RESTART_AT: usize = 130;
    let mut deployment = Deployment::start(
        "inv_kill9",
        Options {
            lease_ms: LEASE_MS,
            ..Options::default()
        },
    )
    .await;
    let ids = ids("burst", KEYS);
    seed(&deployment, &ids).await;
    let mut invalidators = std::mem::take(&mut deployment.invalidators);

    let next = AtomicUsize::new(0);
    let done = AtomicUsize::new(0);
    let stop_reading = AtomicBool::new(false);
    let kinds = Mutex::new(BTreeMap::new());
    let c = &deployment;
    let writer = |worker: u64| {
        let (next, done, kinds, ids) = (&next, &done, &kinds, &ids);
        async move {
            let mut rng = StdRng::seed_from_u64(worker);
            loop {
                let n = next.fetch_add(1, Ordering::SeqCst);
                if n >= WRITES {
                    return;
                }
                let id = &ids[rng.random_range(0..ids.len())];
                count(kinds, c.random_write(&mut rng, id, n as u64 + 1).await);
                done.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    };
    let writers = async {
        futures::future::join_all((0..4).map(writer)).await;
        stop_reading.store(true, Ordering::SeqCst);
    };
    let control = async {
        let inv = &mut invalidators[0];
        while done.load(Ordering::SeqCst) < KILL_AT {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        inv.kill9();
        println!("killed the invalidator (kill -9) after {KILL_AT} writes");
        while done.load(Ordering::SeqCst) < RESTART_AT {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        inv.restart().await;
        println!(
            "restarted the invalidator after {} writes",
            done.load(Ordering::SeqCst)
        );
    };
    let started = Instant::now();
    let ((), (), reads) = tokio::join!(writers, control, read_until(c, &ids, &stop_reading, 99));
    let burst = started.elapsed();

    // Leading again (the dead one's lease expired), then every key converges.
    let leader_wait = Instant::now();
    while !deployment.is_leader(&invalidators[0]).await {
        assert!(
            leader_wait.elapsed() < Duration::from_secs(10),
            "the restarted invalidator does not lead"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // It first replays what happened while it was down (each event with a
    // MongoDB lookup): twice the lag bound for that backlog.
    let took = deployment.wait_consistent(&ids, 2 * LAG_BOUND).await;
    let events = deployment.health(&invalidators[0]).await.expect("health")["events"].clone();
    println!(
        "{WRITES} writes {:?} and {reads} reads in {}; all {KEYS} keys equal MongoDB in Redis and on \
         both replicas {} after the burst; the restarted invalidator handled {events} events",
        kinds.lock().unwrap(),
        ms(burst),
        ms(took)
    );
    assert!(
        events.as_u64().is_some_and(|e| e > 0),
        "the restarted invalidator replayed nothing"
    );
    drop(invalidators);
    deployment.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standby_takes_over_after_the_leader_is_killed() {
    const KEYS: usize = 20;
    let mut deployment = Deployment::start(
        "inv_standby",
        Options {
            invalidators: 2,
            lease_ms: LEASE_MS,
            ..Options::default()
        },
    )
    .await;
    // Exactly one leads, and keeps leading.
    let mut leader = None;
    for _ in 0..10 {
        let leaders = deployment.leaders().await;
        assert_eq!(leaders.len(), 1, "leaders: {leaders:?}");
        assert!(
            leader.is_none() || leader == Some(leaders[0]),
            "leadership moved without a failure: {leader:?} -> {leaders:?}"
        );
        leader = Some(leaders[0]);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let leader = leader.expect("a leader");
    let standby = 1 - leader;
    let health = deployment
        .health(&deployment.invalidators[standby])
        .await
        .expect("standby health");
    assert_eq!(health["role"], "standby", "{health}");

    let ids = ids("handover", KEYS);
    seed(&deployment, &ids).await;
    let mut invalidators = std::mem::take(&mut deployment.invalidators);
    let c = &deployment;

    let stop_writing = AtomicBool::new(false);
    let stop_reading = AtomicBool::new(false);
    let written = AtomicUsize::new(0);
    let kinds = Mutex::new(BTreeMap::new());
    let writer = |worker: u64| {
        let (stop, written, kinds, ids) = (&stop_writing, &written, &kinds, &ids);
        async move {
            let mut rng = StdRng::seed_from_u64(100 + worker);
            while !stop.load(Ordering::SeqCst) {
                let n = written.fetch_add(1, Ordering::SeqCst) as u64 + 1;
                let id = &ids[rng.random_range(0..ids.len())];
                count(kinds, c.random_write(&mut rng, id, n).await);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    };
    let writers = async {
        futures::future::join_all((0..2).map(writer)).await;
        stop_reading.store(true, Ordering::SeqCst);
    };
    let control = async {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let before = written.load(Ordering::SeqCst);
        invalidators[leader].kill9();
        let killed = Instant::now();
        let bound = Duration::from_millis(2 * LEASE_MS) + Duration::from_millis(1500);
        while !c.is_leader(&invalidators[standby]).await {
            assert!(
                killed.elapsed() < bound,
                "the standby did not take over within {bound:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let took = killed.elapsed();
        let at = written.load(Ordering::SeqCst);
        // Writes go on under the new leader for a while.
        tokio::time::sleep(Duration::from_secs(1)).await;
        stop_writing.store(true, Ordering::SeqCst);
        (took, before, at)
    };
    let ((), (took, before, at), reads) =
        tokio::join!(writers, control, read_until(c, &ids, &stop_reading, 7));
    let total = written.load(Ordering::SeqCst);
    println!(
        "the standby led {} after the leader's kill -9 (lease {LEASE_MS} ms); writes: {before} \
         before the kill, {} during the hand-over, {} after; {:?}; {reads} reads",
        ms(took),
        at - before,
        total - at,
        kinds.lock().unwrap()
    );
    assert!(at > before, "no write happened during the hand-over");
    assert!(deployment.is_leader(&invalidators[standby]).await);
    assert!(
        deployment.health(&invalidators[leader]).await.is_none(),
        "the killed one answers"
    );

    let converged = deployment.wait_consistent(&ids, LAG_BOUND).await;
    println!(
        "all {KEYS} keys equal MongoDB everywhere {} after the writes stopped",
        ms(converged)
    );
    drop(invalidators);
    deployment.finish().await;
}

/// `(stream id ms, run_id)` of every invalidation message in the stream.
async fn stream_runs(deployment: &Deployment) -> Vec<(u64, String)> {
    let mut conn = deployment.redis.client().await;
    let reply: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
        .arg(deployment.stream_key())
        .arg("-")
        .arg("+")
        .query_async(&mut conn)
        .await
        .expect("XRANGE");
    reply
        .ids
        .iter()
        .map(|entry| {
            let ms = entry
                .id
                .split('-')
                .next()
                .and_then(|ms| ms.parse().ok())
                .unwrap_or(0);
            let message: String = entry.get("message").unwrap_or_default();
            let message: serde_json::Value = serde_json::from_str(&message).unwrap_or_default();
            (
                ms,
                message["run_id"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_leader_is_fenced_when_it_wakes() {
    const KEYS: usize = 10;
    let mut deployment = Deployment::start(
        "inv_paused",
        Options {
            invalidators: 2,
            lease_ms: LEASE_MS,
            ..Options::default()
        },
    )
    .await;
    let leader = deployment.wait_leading(Duration::from_secs(10)).await;
    let standby = 1 - leader;
    let run_of = |health: Option<serde_json::Value>| {
        health.expect("health")["run_id"]
            .as_str()
            .expect("run_id")
            .to_owned()
    };
    let old_run = run_of(deployment.health(&deployment.invalidators[leader]).await);
    let new_run = run_of(deployment.health(&deployment.invalidators[standby]).await);
    let ids = ids("paused", KEYS);
    seed(&deployment, &ids).await;

    // The leader freezes (a long GC pause, a stalled VM) with its lease.
    deployment.invalidators[leader].pause();
    let paused = Instant::now();
    while !deployment
        .is_leader(&deployment.invalidators[standby])
        .await
    {
        assert!(
            paused.elapsed() < Duration::from_millis(2 * LEASE_MS + 1500),
            "the standby did not take the lease from the paused leader"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!(
        "the standby led {} after the leader froze",
        ms(paused.elapsed())
    );
    let mut rng = StdRng::seed_from_u64(5);
    for (n, id) in ids.iter().enumerate() {
        deployment.random_write(&mut rng, id, n as u64 + 1).await;
    }

    // It wakes up believing it leads; its writes must be refused.
    let woke_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64;
    deployment.invalidators[leader].resume();
    for (n, id) in ids.iter().enumerate() {
        deployment.random_write(&mut rng, id, 100 + n as u64).await;
    }
    let woke = Instant::now();
    while deployment.is_leader(&deployment.invalidators[leader]).await {
        assert!(
            woke.elapsed() < Duration::from_millis(2 * LEASE_MS + 1500),
            "the woken leader never noticed it lost the lease"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!(
        "the woken leader stood down {} after waking",
        ms(woke.elapsed())
    );
    assert!(
        deployment
            .is_leader(&deployment.invalidators[standby])
            .await
    );

    let converged = deployment.wait_consistent(&ids, LAG_BOUND).await;
    println!(
        "all {KEYS} keys equal MongoDB everywhere after {}",
        ms(converged)
    );
    let late: Vec<(u64, String)> = stream_runs(&deployment)
        .await
        .into_iter()
        .filter(|(ms, _)| *ms >= woke_ms)
        .collect();
    assert!(!late.is_empty(), "nothing was announced after the wake-up");
    assert!(
        late.iter().all(|(_, run)| *run == new_run),
        "the fenced leader (run {old_run}) announced after waking: {late:?}"
    );
    assert!(
        deployment.invalidators[leader]
            .log_text()
            .contains("lost the lease"),
        "the woken leader did not log that it lost the lease"
    );
    deployment.finish().await;
}

//! The convergence check: many keys, random reads through both replicas and
//! random writes of every kind at once for a while (`CONVERGENCE_SECONDS`,
//! default 20); afterwards every tier of every replica must equal MongoDB.
//!
//! Knobs (environment): `CONVERGENCE_SECONDS` (20), `CONVERGENCE_KEYS` (200),
//! `CONVERGENCE_WRITES_PER_SEC` (40, over all writers: the MongoDB stand-in
//! takes a few hundred writes per second in all), `CONVERGENCE_LAG_MS`
//! (3000: the wait between the last write and the final check),
//! `CONVERGENCE_INVALIDATION_MODE` (`refresh`; or `delete`).

use bson::doc;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;
use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use system_tests::{Deployment, LAG_BOUND, Options, ids};

const WRITERS: u64 = 3;
const READERS_PER_REPLICA: u64 = 2;

fn knob(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(raw) => raw
            .parse()
            .unwrap_or_else(|_| panic!("{name}={raw:?} is not a whole number")),
        Err(_) => default,
    }
}

/// What MongoDB holds for a key after a write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Doc(i64),
    Deleted,
    /// The write failed: its effect is unknown, reads after it are not judged.
    Unknown,
}

#[derive(Debug, Clone, Copy)]
struct Op {
    start: Instant,
    end: Instant,
    after: State,
}

#[derive(Debug, Clone, Copy)]
struct Read {
    key: usize,
    replica: usize,
    start: Instant,
    end: Instant,
    /// `None`: 404.
    version: Option<i64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    ApiUpsert,
    ApiDelete,
    DirectVersioned,
    DirectUnversioned,
    DirectDelete,
    Failed,
}

/// Stale reads, by the definition in `judge`.
#[derive(Debug, Default)]
struct Verdict {
    judged: u64,
    stale: u64,
    stale_beyond: BTreeMap<u64, u64>,
    regressions: u64,
    examples: Vec<String>,
}

/// Judges every read against the writes of its key.
///
/// Writes of one key never overlap (each writer holds the key's lock), so
/// they form a sequence, and `committed(t)` — the state after the last write
/// of the key that had completed by `t` (the seeded document before any) — is
/// well defined. A read started at `rs` and ended at `re` is **stale** when
/// its answer is older than `committed(rs)`:
/// - `committed(rs)` is a document at version `vc`: stale if it served a
///   version below `vc`, or 404 while no delete of the key started before
///   `re` (a write still in flight during the read may legitimately show);
/// - `committed(rs)` is "deleted": stale if it served a version `v` while no
///   write that started before `re` (and ended after `rs`) created a version
///   at or below `v` — only a re-created document may be served, and those
///   are newer than anything before the delete;
/// - after a failed write the key's state is unknown: not judged.
///
/// Versions only: an edit that changes content without a new version (until
/// the invalidator stamps one) is invisible here; the final check compares
/// content. Writes through replica A are seen by B only once the invalidation
/// arrives, so reads of B right after a write count as stale: "stale beyond
/// g" judges against `committed(rs - g)` instead, i.e. counts only answers
/// that were still older than a write which had completed `g` before the read
/// began — staleness that outlived an allowance `g` for propagation.
///
/// A **regression** is a read served by a replica with a lower version than
/// a read of the same key on the same replica that completed before it began
/// (404s are not compared: a delete makes them legitimate).
fn judge(ops: &[Vec<Op>], reads: &[Read], allowances: &[Duration], run_start: Instant) -> Verdict {
    let mut verdict = Verdict::default();
    let stale_at = |read: &Read, at: Instant| -> Option<bool> {
        let key_ops = &ops[read.key];
        let committed = key_ops.partition_point(|op| op.end <= at);
        let state = key_ops[committed.checked_sub(1)?].after;
        let in_flight = key_ops[committed..]
            .iter()
            .take_while(|op| op.start < read.end);
        match (state, read.version) {
            (State::Unknown, _) => None,
            (State::Doc(vc), Some(v)) => Some(v < vc),
            (State::Doc(_), None) => {
                Some(!in_flight.into_iter().any(|op| op.after == State::Deleted))
            }
            (State::Deleted, None) => Some(false),
            (State::Deleted, Some(v)) => Some(
                !in_flight
                    .into_iter()
                    .any(|op| matches!(op.after, State::Doc(created) if created <= v)),
            ),
        }
    };
    for read in reads {
        match stale_at(read, read.start) {
            None => continue,
            Some(stale) => {
                verdict.judged += 1;
                if stale {
                    verdict.stale += 1;
                }
            }
        }
        for allowance in allowances {
            let at = read.start.checked_sub(*allowance).unwrap_or(run_start);
            if stale_at(read, at.max(run_start)) == Some(true) {
                *verdict
                    .stale_beyond
                    .entry(allowance.as_millis() as u64)
                    .or_default() += 1;
                if verdict.examples.len() < 10 {
                    verdict.examples.push(format!(
                        "key {} replica {} read at +{:?} served {:?}, stale beyond {allowance:?}; writes: {:?}",
                        read.key,
                        read.replica,
                        read.start - run_start,
                        read.version,
                        ops[read.key]
                            .iter()
                            .map(|op| (op.start.saturating_duration_since(run_start), op.end.saturating_duration_since(run_start), op.after))
                            .collect::<Vec<_>>()
                    ));
                }
            }
        }
    }
    // Regressions, per key and replica: the highest version served by reads
    // that ended before each read began.
    let mut by_stream: BTreeMap<(usize, usize), Vec<&Read>> = BTreeMap::new();
    for read in reads {
        by_stream
            .entry((read.key, read.replica))
            .or_default()
            .push(read);
    }
    for list in by_stream.values_mut() {
        let mut by_end: Vec<&Read> = list.clone();
        by_end.sort_by_key(|r| r.end);
        list.sort_by_key(|r| r.start);
        let mut highest = None::<i64>;
        let mut ended = 0;
        for read in list.iter() {
            while ended < by_end.len() && by_end[ended].end < read.start {
                if let Some(v) = by_end[ended].version {
                    highest = Some(highest.map_or(v, |h| h.max(v)));
                }
                ended += 1;
            }
            if let (Some(v), Some(h)) = (read.version, highest)
                && v < h
            {
                verdict.regressions += 1;
            }
        }
    }
    verdict
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn caches_converge_under_random_reads_and_writes() {
    let seconds = knob("CONVERGENCE_SECONDS", 20);
    let keys = knob("CONVERGENCE_KEYS", 200) as usize;
    let rate = knob("CONVERGENCE_WRITES_PER_SEC", 40).max(1);
    let lag = Duration::from_millis(knob("CONVERGENCE_LAG_MS", 3000));
    let mode = std::env::var("CONVERGENCE_INVALIDATION_MODE").unwrap_or_else(|_| "refresh".into());
    let deployment = Deployment::start(
        "inv_converge",
        Options {
            env: vec![("INVALIDATION_MODE".into(), mode.clone())],
            ..Options::default()
        },
    )
    .await;
    let ids = ids("conv", keys);

    // Seed every key straight into MongoDB with a version; the invalidator
    // fills Redis from the insert events.
    let seeded_at = Instant::now();
    let base = chrono::Utc::now();
    let seed_version = base.timestamp_millis() * 1000;
    let docs: Vec<bson::Document> = ids
        .iter()
        .map(|id| {
            doc! {
                "_id": id, "customer_id": id, "features": {"n": 0_i64},
                "calculated_at": base.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
                "model_version": "seed",
                "expires_at": bson::DateTime::from_millis(base.timestamp_millis() + 86_400_000),
                "version": seed_version,
            }
        })
        .collect();
    deployment
        .collection()
        .insert_many(docs)
        .await
        .expect("seed");
    // The run starts once the invalidator has worked through the seed (its
    // backlog would otherwise delay the first writes' invalidations).
    let waited = Instant::now();
    loop {
        let events = deployment
            .health(&deployment.invalidators[0])
            .await
            .expect("health")["events"]
            .as_u64()
            .unwrap_or(0);
        if events >= keys as u64 && deployment.feature_keys().await.len() == keys {
            break;
        }
        assert!(
            waited.elapsed() < Duration::from_secs(30),
            "the invalidator did not work through the seed: {events} events"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!(
        "seeded {keys} keys; the invalidator had them all in Redis after {}",
        ms_of(waited.elapsed())
    );
    let ops: Vec<Mutex<Vec<Op>>> = (0..keys)
        .map(|_| {
            Mutex::new(vec![Op {
                start: seeded_at,
                end: seeded_at,
                after: State::Doc(seed_version),
            }])
        })
        .collect();
    let locks: Vec<tokio::sync::Mutex<()>> =
        (0..keys).map(|_| tokio::sync::Mutex::new(())).collect();
    let kinds = Mutex::new(BTreeMap::<Kind, u64>::new());
    let reads = Mutex::new(Vec::<Read>::new());
    let writing = AtomicBool::new(true);
    let counter = AtomicU64::new(0);

    let run_start = Instant::now();
    let deadline = run_start + Duration::from_secs(seconds);
    let c = &deployment;
    let writer = |worker: u64| {
        let (ops, locks, kinds, counter, ids) = (&ops, &locks, &kinds, &counter, &ids);
        async move {
            let mut rng = StdRng::seed_from_u64(1000 + worker);
            let period = Duration::from_secs_f64(WRITERS as f64 / rate as f64);
            let mut next = Instant::now();
            while Instant::now() < deadline {
                let key = rng.random_range(0..ids.len());
                let id = &ids[key];
                let n = counter.fetch_add(1, Ordering::SeqCst) as i64 + 1;
                let _held = locks[key].lock().await;
                let start = Instant::now();
                let (kind, after) = write_one(c, &mut rng, id, n).await;
                let end = Instant::now();
                ops[key].lock().unwrap().push(Op { start, end, after });
                *kinds.lock().unwrap().entry(kind).or_default() += 1;
                drop(_held);
                next += period;
                tokio::time::sleep_until(next.into()).await;
            }
        }
    };
    let writers = async {
        futures::future::join_all((0..WRITERS).map(writer)).await;
        writing.store(false, Ordering::SeqCst);
    };
    let reader = |task: u64| {
        let (reads, writing, ids) = (&reads, &writing, &ids);
        async move {
            let replica = (task % 2) as usize;
            let service = [&c.a, &c.b][replica];
            let mut rng = StdRng::seed_from_u64(2000 + task);
            let mut local = Vec::new();
            while writing.load(Ordering::SeqCst) {
                let key = rng.random_range(0..ids.len());
                let start = Instant::now();
                let served = c.get(service, &ids[key]).await;
                let end = Instant::now();
                // "MongoDB did not answer in time" on a busy machine serves
                // nothing, so nothing stale: no observation.
                if served.status == 503 {
                    continue;
                }
                assert!(
                    matches!(served.status, 200 | 404),
                    "read of {} on {}: {} {}",
                    ids[key],
                    service.name(),
                    served.status,
                    served.body
                );
                local.push(Read {
                    key,
                    replica,
                    start,
                    end,
                    version: served.version(),
                });
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            reads.lock().unwrap().extend(local);
        }
    };
    let readers = futures::future::join_all((0..2 * READERS_PER_REPLICA).map(reader));
    tokio::join!(writers, readers);
    let run = run_start.elapsed();

    // The lag bound passes; then every key is checked once.
    tokio::time::sleep(lag).await;
    let mut stale_keys = Vec::new();
    for chunk in ids.chunks(20) {
        let found = futures::future::join_all(chunk.iter().map(|id| c.mismatches(id))).await;
        stale_keys.extend(found.into_iter().flatten());
    }

    let ops: Vec<Vec<Op>> = ops.into_iter().map(|m| m.into_inner().unwrap()).collect();
    let reads = reads.into_inner().unwrap();
    let allowances = [
        Duration::from_millis(500),
        Duration::from_secs(1),
        LAG_BOUND,
    ];
    let verdict = judge(&ops, &reads, &allowances, run_start);
    let kinds = kinds.into_inner().unwrap();
    let writes: u64 = kinds.values().sum();
    println!(
        "convergence ({mode} mode): {keys} keys, {:.1} s: {} reads ({} judged), {writes} writes {kinds:?}",
        run.as_secs_f64(),
        reads.len(),
        verdict.judged,
    );
    println!(
        "stale reads during the run: {} (answers older than committed at read start); beyond an \
         allowance (ms -> count): {:?}; per-replica regressions: {}",
        verdict.stale, verdict.stale_beyond, verdict.regressions
    );
    for example in &verdict.examples {
        println!("  e.g. {example}");
    }
    println!(
        "stale keys {} after the writers stopped: {}",
        ms_of(lag),
        stale_keys.len()
    );
    assert!(writes > 0 && !reads.is_empty(), "nothing ran");
    let beyond_bound = verdict
        .stale_beyond
        .get(&(LAG_BOUND.as_millis() as u64))
        .copied()
        .unwrap_or(0);
    assert_eq!(
        beyond_bound, 0,
        "reads were still stale {LAG_BOUND:?} after a write had completed"
    );
    assert!(
        stale_keys.is_empty(),
        "{} keys disagree with MongoDB {lag:?} after the last write:\n{}",
        stale_keys.len(),
        stale_keys.join("\n")
    );
    deployment.finish().await;
}

fn ms_of(d: Duration) -> String {
    system_tests::ms(d)
}

/// One random write of `id` (the caller holds the key's lock): 80 % through
/// the API of a random replica (19 in 20 of them upserts, 1 a delete), 20 %
/// straight into MongoDB (40 % with a new version — also re-creating a
/// deleted key —, 40 % a `$set` that leaves the version alone, 20 % deletes).
async fn write_one(c: &Deployment, rng: &mut StdRng, id: &str, n: i64) -> (Kind, State) {
    if rng.random_bool(0.8) {
        let replica = if rng.random_bool(0.5) { &c.a } else { &c.b };
        if rng.random_range(0..20) == 0 {
            c.delete(replica, id).await;
            return (Kind::ApiDelete, State::Deleted);
        }
        let response = c
            .http_post(replica, id, json!({"n": n, "via": replica.name()}))
            .await;
        return match response {
            Ok(doc) => match doc["version"].as_i64() {
                Some(v) => (Kind::ApiUpsert, State::Doc(v)),
                None => (Kind::Failed, State::Unknown),
            },
            Err(err) => {
                eprintln!("write of {id} failed: {err}");
                (Kind::Failed, State::Unknown)
            }
        };
    }
    match rng.random_range(0..10) {
        0..=3 => {
            let v = c
                .write_versioned(id, json!({"n": n, "via": "driver"}))
                .await;
            (Kind::DirectVersioned, State::Doc(v))
        }
        4..=7 => match c.set_unversioned(id, "features.x", n).await {
            Some(v) => (Kind::DirectUnversioned, State::Doc(v)),
            None => (Kind::DirectUnversioned, State::Deleted),
        },
        _ => {
            c.delete_direct(id).await;
            (Kind::DirectDelete, State::Deleted)
        }
    }
}

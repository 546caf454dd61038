//! The deployment on a Redis Cluster of 3 masters and 3 replicas with the
//! invalidations split into partitions (`INVALIDATION_PARTITIONS`), each
//! with its own stream, sharded channel and saved position: changes reach
//! every replica from every partition; caches converge under a mixed
//! workload; a master killed (`kill -9`) and replaced by its replica, or
//! slots moved to another master while writes go on, lose nothing.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use system_tests::{ClusterShape, Deployment, LAG_BOUND, Options, ids, ms};
use testkit::redis_cluster::key_slot_of;

/// Partitions of the invalidations: more than the masters, so some master
/// carries two and each master at least one.
const PARTITIONS: u32 = 4;
/// Keys of the workload tests.
const KEYS: usize = 50;
/// Pause of each writer between its writes (2 writers: up to ~60 writes/s,
/// what the MongoDB stand-in takes beside everything else).
const WRITE_PAUSE: Duration = Duration::from_millis(30);
/// Pause of each reader between its reads.
const READ_PAUSE: Duration = Duration::from_millis(5);
/// How long caches may take to agree with MongoDB once writes stop after a
/// failover or a slot move (replicas may have to resubscribe and catch up).
const SETTLE_BOUND: Duration = Duration::from_secs(20);

async fn start(prefix: &str) -> Deployment {
    let started = Instant::now();
    let deployment = Deployment::start(
        prefix,
        Options {
            cluster: Some(ClusterShape::default()),
            partitions: Some(PARTITIONS),
            ..Options::default()
        },
    )
    .await;
    println!(
        "deployment on a 3+3 cluster ({}) with {PARTITIONS} partitions up in {}",
        deployment.redis.cluster().seeds(),
        ms(started.elapsed())
    );
    deployment
}

/// Customer ids `prefix-N`, one per partition, in partition order.
fn one_id_per_partition(deployment: &Deployment, prefix: &str) -> Vec<String> {
    let mut found: Vec<Option<String>> = vec![None; PARTITIONS as usize];
    for n in 0.. {
        let id = format!("{prefix}-{n}");
        let slot = &mut found[deployment.partition_of(&id) as usize];
        if slot.is_none() {
            *slot = Some(id);
        }
        if found.iter().all(Option::is_some) {
            break;
        }
    }
    found.into_iter().flatten().collect()
}

/// The master serving `key`'s slot.
async fn master_of(deployment: &Deployment, key: &str) -> u16 {
    deployment
        .redis
        .cluster()
        .master_of_slot(key_slot_of(key))
        .await
}

/// Creates every key through A and reads it through both replicas.
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

/// What a workload did; failures are counted, not fatal (during a failover
/// a replica may answer a write with an error: its effect is then unknown,
/// and the final check compares with what MongoDB holds whatever it is).
#[derive(Default)]
struct Load {
    stop: AtomicBool,
    writes: AtomicU64,
    failed_writes: AtomicU64,
    reads: AtomicU64,
    failed_reads: AtomicU64,
    first_failures: Mutex<Vec<String>>,
}

impl Load {
    fn failure(&self, counter: &AtomicU64, what: String) {
        counter.fetch_add(1, Ordering::Relaxed);
        let mut first = self.first_failures.lock().unwrap();
        if first.len() < 5 {
            first.push(what);
        }
    }

    fn report(&self, took: Duration) -> String {
        let writes = self.writes.load(Ordering::Relaxed);
        format!(
            "{writes} writes ({} failed, {:.0}/s), {} reads ({} failed); first failures: {:?}",
            self.failed_writes.load(Ordering::Relaxed),
            writes as f64 / took.as_secs_f64(),
            self.reads.load(Ordering::Relaxed),
            self.failed_reads.load(Ordering::Relaxed),
            self.first_failures.lock().unwrap()
        )
    }
}

/// Writes random keys until told to stop: 70 % through a random replica's
/// API, 20 % straight into MongoDB with a new version, 10 % a `$set` in
/// MongoDB that leaves the version alone.
async fn write_until(deployment: &Deployment, ids: &[String], load: &Load, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut n: i64 = 0;
    while !load.stop.load(Ordering::SeqCst) {
        n += 1;
        let id = &ids[rng.random_range(0..ids.len())];
        match rng.random_range(0..10) {
            0..=6 => {
                let replica = if rng.random_bool(0.5) {
                    &deployment.a
                } else {
                    &deployment.b
                };
                let written = deployment
                    .http_post(replica, id, json!({"n": n, "via": "api", "w": seed}))
                    .await;
                if let Err(err) = written {
                    load.failure(&load.failed_writes, err);
                }
            }
            7..=8 => {
                deployment
                    .write_versioned(id, json!({"n": n, "via": "driver", "w": seed}))
                    .await;
            }
            _ => {
                deployment.set_unversioned(id, "features.m", n).await;
            }
        }
        load.writes.fetch_add(1, Ordering::Relaxed);
        tokio::time::sleep(WRITE_PAUSE).await;
    }
}

/// Reads random keys through both replicas until told to stop, so near
/// caches keep holding what they served.
async fn read_until(deployment: &Deployment, ids: &[String], load: &Load, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    while !load.stop.load(Ordering::SeqCst) {
        let id = &ids[rng.random_range(0..ids.len())];
        let replica = if rng.random_bool(0.5) {
            &deployment.a
        } else {
            &deployment.b
        };
        let served = deployment.get(replica, id).await;
        load.reads.fetch_add(1, Ordering::Relaxed);
        if !matches!(served.status, 200 | 404) {
            load.failure(
                &load.failed_reads,
                format!(
                    "GET {id} on {}: {} {}",
                    replica.name(),
                    served.status,
                    served.body
                ),
            );
        }
        tokio::time::sleep(READ_PAUSE).await;
    }
}

/// Runs 2 writers and 2 readers while `during` runs, then stops them.
async fn under_load<F: std::future::Future<Output = ()>>(
    deployment: &Deployment,
    ids: &[String],
    load: &Load,
    during: F,
) {
    let stop_after = async {
        during.await;
        load.stop.store(true, Ordering::SeqCst);
    };
    tokio::join!(
        stop_after,
        write_until(deployment, ids, load, 1),
        write_until(deployment, ids, load, 2),
        read_until(deployment, ids, load, 3),
        read_until(deployment, ids, load, 4),
    );
}

/// A new write through A of a key of each partition reaches B: every
/// partition's announcements flow again.
async fn every_partition_flows(deployment: &Deployment, prefix: &str) {
    for id in one_id_per_partition(deployment, prefix) {
        deployment.post(&deployment.a, &id, json!({"n": 1})).await;
        deployment.warm(&deployment.b, &id).await;
        let stored = deployment.post(&deployment.a, &id, json!({"n": 2})).await;
        let version = stored["version"].as_i64().expect("version");
        let written = Instant::now();
        deployment.wait_served(&deployment.b, &id, version).await;
        println!(
            "partition {}: a write through A reached B's near cache in {}",
            deployment.partition_of(&id),
            ms(written.elapsed())
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_propagation_reaches_both_replicas_from_every_partition() {
    let test_started = Instant::now();
    let deployment = start("cl_prop").await;
    let ids = one_id_per_partition(&deployment, "prop");
    for id in &ids {
        let partition = deployment.partition_of(id);
        let master = master_of(&deployment, &format!("features:{id}")).await;
        let stream = deployment.stream_key_of(partition);
        let stream_master = master_of(&deployment, &stream).await;

        // A write through A reaches B's near cache.
        let first = deployment.post(&deployment.a, id, json!({"n": 1})).await;
        let v1 = first["version"].as_i64().expect("version");
        assert_eq!(deployment.warm(&deployment.b, id).await.version(), Some(v1));
        let second = deployment.post(&deployment.a, id, json!({"n": 2})).await;
        let v2 = second["version"].as_i64().expect("version");
        let written = Instant::now();
        deployment.wait_served(&deployment.b, id, v2).await;
        let through_a = written.elapsed();

        // A write straight into MongoDB reaches both near caches.
        for replica in deployment.replicas() {
            assert_eq!(deployment.warm(replica, id).await.version(), Some(v2));
        }
        let v3 = deployment.write_versioned(id, json!({"n": 3})).await;
        assert!(v3 > v2);
        let written = Instant::now();
        for replica in deployment.replicas() {
            deployment.wait_served(replica, id, v3).await;
        }
        let direct = written.elapsed();
        let served = deployment.get(&deployment.b, id).await;
        assert_eq!(served.body["features"], json!({"n": 3}));

        // The announcement went through the partition's own stream.
        let length: u64 = deployment
            .redis_query(redis::cmd("XLEN").arg(&stream))
            .await
            .unwrap_or_else(|err| panic!("XLEN {stream}: {err}"));
        assert!(
            length > 0,
            "partition {partition}'s stream {stream} is empty"
        );
        println!(
            "{id}: partition {partition} (stream {stream} on master {stream_master}, document \
             on master {master}): A -> B {}, MongoDB -> both {}, B now serves from {:?}",
            ms(through_a),
            ms(direct),
            served.source()
        );
    }
    let converged = deployment.wait_consistent(&ids, LAG_BOUND).await;
    println!("Redis and both replicas equal MongoDB {}", ms(converged));
    deployment.finish().await;
    println!("test took {}", ms(test_started.elapsed()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_convergence_under_concurrent_writes() {
    let test_started = Instant::now();
    let deployment = start("cl_conv").await;
    let ids = ids("conv", KEYS);
    seed(&deployment, &ids).await;
    let load = Load::default();
    let started = Instant::now();
    under_load(
        &deployment,
        &ids,
        &load,
        tokio::time::sleep(Duration::from_secs(5)),
    )
    .await;
    println!("workload: {}", load.report(started.elapsed()));
    assert_eq!(
        load.failed_writes.load(Ordering::Relaxed),
        0,
        "writes failed on a healthy cluster"
    );
    assert_eq!(
        load.failed_reads.load(Ordering::Relaxed),
        0,
        "reads failed on a healthy cluster"
    );
    let converged = deployment.wait_consistent(&ids, LAG_BOUND).await;
    println!(
        "{KEYS} keys: Redis and both replicas equal MongoDB {} after the last write",
        ms(converged)
    );
    deployment.finish().await;
    println!("test took {}", ms(test_started.elapsed()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_master_killed_under_writes_loses_nothing() {
    let test_started = Instant::now();
    let deployment = start("cl_kill").await;
    let ids = ids("kill", KEYS);
    seed(&deployment, &ids).await;
    let cluster = deployment.redis.cluster();

    // The master of partition 0's stream, channel and position.
    let stream = deployment.stream_key_of(0);
    let victim = master_of(&deployment, &stream).await;
    let mut partitions_on_victim = Vec::new();
    for p in 0..PARTITIONS {
        if master_of(&deployment, &deployment.stream_key_of(p)).await == victim {
            partitions_on_victim.push(p);
        }
    }
    let mut keys_on_victim = 0;
    for id in &ids {
        if master_of(&deployment, &format!("features:{id}")).await == victim {
            keys_on_victim += 1;
        }
    }
    println!(
        "killing master {victim}: partitions {partitions_on_victim:?}, {keys_on_victim} of {KEYS} \
         document keys"
    );
    assert!(keys_on_victim > 0);

    let load = Load::default();
    let started = Instant::now();
    let failover = async {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let killed = Instant::now();
        cluster.kill_master(victim).await;
        let promoted = cluster.wait_promoted(victim).await;
        println!(
            "replica {promoted} took over from {victim} {} after the kill",
            ms(killed.elapsed())
        );
        tokio::time::sleep(Duration::from_secs(3)).await;
    };
    under_load(&deployment, &ids, &load, failover).await;
    println!("workload: {}", load.report(started.elapsed()));

    let converged = deployment.wait_consistent(&ids, SETTLE_BOUND).await;
    println!(
        "{KEYS} keys: Redis and both replicas equal MongoDB {} after the last write",
        ms(converged)
    );
    assert_eq!(
        deployment.leaders().await.len(),
        1,
        "one invalidator leads after the failover"
    );
    every_partition_flows(&deployment, "after-kill").await;
    deployment.finish().await;
    println!("test took {}", ms(test_started.elapsed()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_slots_moved_under_writes_lose_nothing() {
    let test_started = Instant::now();
    let deployment = start("cl_move").await;
    let ids = ids("move", KEYS);
    seed(&deployment, &ids).await;
    let cluster = deployment.redis.cluster();

    // Partition 0's slot (stream, channel, position) and up to 5 slots of
    // document keys on the same master go to another master.
    let stream_slot = key_slot_of(&deployment.stream_key_of(0));
    let from = cluster.master_of_slot(stream_slot).await;
    let to = *cluster
        .masters()
        .await
        .iter()
        .find(|m| **m != from)
        .expect("another master");
    let mut slots = vec![stream_slot];
    for id in &ids {
        let slot = key_slot_of(&format!("features:{id}"));
        if slots.len() < 6 && !slots.contains(&slot) && cluster.master_of_slot(slot).await == from {
            slots.push(slot);
        }
    }
    assert!(slots.len() > 1, "no document key on master {from}");

    let load = Load::default();
    let started = Instant::now();
    let resharding = async {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        for slot in &slots {
            let began = Instant::now();
            let moved = cluster.migrate_slot(*slot, to).await;
            println!(
                "slot {slot}: {moved} keys moved from {from} to {to} in {}",
                ms(began.elapsed())
            );
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    };
    under_load(&deployment, &ids, &load, resharding).await;
    println!("workload: {}", load.report(started.elapsed()));
    // A slot move is invisible to clients: they follow ASK and MOVED.
    assert_eq!(
        load.failed_writes.load(Ordering::Relaxed),
        0,
        "writes failed while slots moved"
    );
    for slot in &slots {
        assert_eq!(cluster.master_of_slot(*slot).await, to);
    }

    let converged = deployment.wait_consistent(&ids, SETTLE_BOUND).await;
    println!(
        "{KEYS} keys: Redis and both replicas equal MongoDB {} after the last write",
        ms(converged)
    );
    every_partition_flows(&deployment, "after-move").await;
    deployment.finish().await;
    println!("test took {}", ms(test_started.elapsed()));
}

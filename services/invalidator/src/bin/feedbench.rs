//! `invalidator-feedbench`: the invalidator's own ceiling, without MongoDB.
//!
//! Feeds the apply pipeline — the same code path from a decoded change to
//! the guarded Redis write, the announcement on its partition's stream and
//! channel, and the position save — with a synthetic change feed, in
//! batches of `--batch` changes (1: one change at a time, as the live feed
//! applies them), at `--rate` changes per second (0: as fast as it goes),
//! for `--seconds`. Redis (single or cluster) and the partitions come from
//! the usual settings (`REDIS_URL`, `REDIS_CLUSTER_NODES`,
//! `INVALIDATION_PARTITIONS`, `MONGO_DB`, …); MongoDB is never contacted.
//! Prints one JSON line: changes/s and the lag of each change from the
//! moment it was due to the moment its batch was announced.

use anyhow::Context;
use cache_invalidator::apply::{Apply, ApplyParts};
use cache_invalidator::audit::AuditHandle;
use cache_invalidator::leadership::Lease;
use cache_invalidator::worker::{Progress, WorkerStatus};
use clap::Parser;
use feature_cache::RedisTier;
use feature_store::{Change, ChangeKind, FeatureDocument, FeatureStore, FeedPosition, WriteOp};
use invalidation::Announcer;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(about = "Feeds the invalidator's apply pipeline a synthetic change feed")]
struct Args {
    /// Changes applied together (1: one at a time).
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Changes per second offered (0: as fast as the pipeline goes).
    #[arg(long, default_value_t = 0)]
    rate: u64,
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Distinct customers the changes touch.
    #[arg(long, default_value_t = 10_000)]
    keys: usize,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(args.batch > 0, "--batch must be at least 1");
    let settings =
        settings::load(settings::Defaults::INVALIDATOR).context("invalid configuration")?;
    let redis = RedisTier::connect(&settings.redis_config()).context("REDIS_URL")?;
    let connection = redis.connection();
    let run_id = uuid::Uuid::new_v4().to_string();
    let announcer = Announcer::new(connection.clone(), settings.channels(), run_id.clone());
    let lease = Lease::new(
        connection.clone(),
        settings.control_keys(),
        settings.leader_lease,
        format!("feedbench:{run_id}"),
    );
    let shutdown = CancellationToken::new();
    let progress = Progress::default();
    let term = lease
        .acquire(&shutdown, &progress)
        .await
        .context("no lease")?;
    // Never contacted: the synthetic changes need no stamping or audit.
    let store = FeatureStore::connect(&settings.store_config("invalidator-feedbench"))
        .await
        .context("MONGO_URI")?;
    let parts = ApplyParts {
        redis: redis.clone(),
        announcer,
        requests: fleet::RequestQueue::new(connection.clone(), &settings.fleet_config()),
        store,
        mode: settings.invalidation_mode,
        status: Arc::new(WorkerStatus::default()),
        audit: AuditHandle::off(),
        warm: None,
    };
    let apply = Apply::for_term(&parts, &term.fence);

    // Versions as MongoDB gives them (its clock in ms × 1000), so a later
    // run's changes are newer than what an earlier run left in Redis.
    let first_version = chrono::Utc::now().timestamp_millis().saturating_mul(1000);
    let started = Instant::now();
    let deadline = started + Duration::from_secs(args.seconds);
    // The changes are made by a task of their own, as the invalidator's
    // reader decodes the feed beside the applier: what is measured is the
    // apply pipeline, not the making of synthetic documents.
    let (batches, mut incoming) = tokio::sync::mpsc::channel::<Vec<(Change, Duration)>>(2);
    let (batch_size, rate, keys) = (args.batch as u64, args.rate, args.keys);
    let producer = tokio::spawn(async move {
        let mut next: u64 = 0;
        while Instant::now() < deadline {
            // The changes due by now (at the rate), at most a batch.
            let due = if rate == 0 {
                next + batch_size
            } else {
                let elapsed = started.elapsed().as_secs_f64();
                ((elapsed * rate as f64) as u64).min(next + batch_size)
            };
            if due <= next {
                tokio::time::sleep(Duration::from_micros(200)).await;
                continue;
            }
            let batch = (next..due)
                .map(|n| {
                    let due_at = if rate == 0 {
                        started.elapsed()
                    } else {
                        Duration::from_secs_f64(n as f64 / rate as f64)
                    };
                    (change(n, first_version, keys), due_at)
                })
                .collect();
            if batches.send(batch).await.is_err() {
                return;
            }
            next = due;
        }
    });
    let mut lags_us: Vec<u64> = Vec::new();
    let mut applied: u64 = 0;
    while let Some(batch) = incoming.recv().await {
        let (changes, due_at): (Vec<Change>, Vec<Duration>) = batch.into_iter().unzip();
        if args.batch == 1 {
            for change in &changes {
                apply.change(change).await?;
            }
        } else {
            apply.batch(&changes).await?;
        }
        progress.mark();
        let done = started.elapsed();
        lags_us.extend(
            due_at
                .iter()
                .map(|at| u64::try_from(done.saturating_sub(*at).as_micros()).unwrap_or(u64::MAX)),
        );
        applied += changes.len() as u64;
    }
    producer.await.context("the change maker failed")?;
    let seconds = started.elapsed().as_secs_f64();
    lease.end(term).await;
    lags_us.sort_unstable();
    let pct = |p: f64| -> f64 {
        if lags_us.is_empty() {
            return 0.0;
        }
        let at = ((lags_us.len() as f64 - 1.0) * p).round() as usize;
        lags_us[at.min(lags_us.len() - 1)] as f64 / 1000.0
    };
    println!(
        "{}",
        serde_json::json!({
            "cluster": !settings.redis_cluster_nodes.is_empty(),
            "partitions": settings.invalidation_partitions,
            "batch": args.batch,
            "rate": args.rate,
            "changes": applied,
            "seconds": seconds,
            "changes_per_s": applied as f64 / seconds,
            "lag_ms": {"p50": pct(0.5), "p99": pct(0.99), "max": pct(1.0)},
        })
    );
    Ok(())
}

/// The `n`th synthetic change: an update of customer `n mod keys` to
/// version `first_version + n` (versions only grow, as MongoDB's do).
fn change(n: u64, first_version: i64, keys: usize) -> Change {
    let customer_id = format!("bench-{}", n % keys as u64);
    let document: Option<FeatureDocument> = serde_json::from_value(serde_json::json!({
        "version": first_version.saturating_add(i64::try_from(n).unwrap_or(i64::MAX)),
        "customer_id": customer_id,
        "features": {"score": (n % 1000) as f64 / 1000.0, "segment": "b", "recent": [1, 2, 3]},
        "calculated_at": "2026-12-01T00:00:00.000Z",
        "model_version": "bench",
    }))
    .ok();
    Change {
        position: FeedPosition::parse(&format!("{{\"_data\":\"{n:016x}\"}}"))
            .unwrap_or_else(unreachable_position),
        kind: ChangeKind::Written {
            op: WriteOp::Update,
            customer_id,
            document,
            version_advanced: true,
            traceparent: None,
        },
        cluster_time: None,
        wall_time: None,
    }
}

/// A resume token of a made-up change always parses; if it ever did not,
/// the benchmark could not run at all.
fn unreachable_position() -> FeedPosition {
    eprintln!("invalidator-feedbench: a synthetic position did not parse");
    std::process::exit(2)
}

//! `cachectl audit --full`: every `features:*` key in Redis against MongoDB,
//! in batches (a SCAN page, one MGET, one `$in` query), judged by the same
//! rules as the invalidator's continuous audit (`consistency::verdict`).
//!
//! With `--near`, every live replica's near cache is asked about each batch
//! too (the fleet's fan-out, within `ADMIN_FANOUT_TIMEOUT_MS`). A key found
//! inconsistent is read once more after `--settle-ms`, so a write in flight
//! between the reads of the scan (caches first, then MongoDB) is not
//! reported; what still differs is reported and, with `--repair`, evicted
//! everywhere through the fleet's eviction requests, which the leading
//! invalidator handles (the Redis entry removed behind its fence, every
//! replica told).

use anyhow::Context;
use clap::Args;
use consistency::{Checker, FleetNear, KeyState, Mismatch, Verdict};
use feature_cache::keyspace::DOCUMENT_PREFIX;
use feature_cache::{RedisTier, TieredStore};
use feature_store::CustomerId;
use fleet::FleetClient;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use std::collections::BTreeMap;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Debug, Args)]
pub struct AuditArgs {
    /// Scan every key in Redis (the continuous, sampled audit runs in the
    /// invalidator: AUDIT_SAMPLE_RATE).
    #[arg(long, required = true)]
    full: bool,
    /// Also ask every live replica's near cache about each scanned key.
    #[arg(long)]
    near: bool,
    /// Evict every key that differs from MongoDB, everywhere (needs a
    /// leading invalidator, which handles the evictions).
    #[arg(long)]
    repair: bool,
    /// How long `--repair` waits for the invalidator to handle the evictions.
    #[arg(long, default_value_t = 10_000)]
    repair_wait_ms: u64,
    /// Print the summary as JSON, for scripts (no progress bar).
    #[arg(long)]
    json: bool,
    /// Keys per batch: one SCAN page, one MGET, one MongoDB query.
    #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    batch: u64,
    /// How long to wait before reading a key found inconsistent once more
    /// (a write in flight is not an inconsistency).
    #[arg(long, default_value_t = 500)]
    settle_ms: u64,
}

/// One tier of one key that differs from MongoDB.
#[derive(Debug, Clone, Serialize)]
pub struct Finding {
    pub customer_id: String,
    pub tier: &'static str,
    /// The replica, for a near cache.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub instance: Option<String>,
    pub mismatch: &'static str,
    pub cached_version: Option<i64>,
    pub stored_version: Option<i64>,
}

/// What an audit found; `--json` prints it as is.
#[derive(Debug, Default, Serialize)]
pub struct Summary {
    /// Keys read.
    pub scanned: u64,
    /// Keys every tier agrees on with MongoDB.
    pub consistent: u64,
    /// Keys some tier disagrees on.
    pub inconsistent: u64,
    /// Findings per tier and kind (`stale`, `ahead`, `content`, `orphan`).
    pub by_kind: BTreeMap<&'static str, BTreeMap<&'static str, u64>>,
    /// Inconsistent keys evicted (`--repair`).
    pub repaired: u64,
    /// Keys whose repair failed.
    pub repair_failed: u64,
    /// Keys under `features:` whose id no client could ask for.
    pub skipped: u64,
    /// Whether replicas' near caches were asked.
    pub near_checked: bool,
    pub seconds: f64,
    pub findings: Vec<Finding>,
}

impl Summary {
    /// Inconsistent keys left after repairs.
    pub fn remaining(&self) -> u64 {
        self.inconsistent
            .saturating_sub(self.repaired)
            .max(self.repair_failed)
    }
}

pub async fn run(
    settings: &settings::Settings,
    tiers: &TieredStore,
    args: AuditArgs,
) -> anyhow::Result<ExitCode> {
    let redis = tiers.redis();
    let fleet = FleetClient::new(
        redis.client().context("REDIS_URL")?,
        redis.connection(),
        settings.fleet_config(),
    );
    let mut checker = Checker::new(redis.clone(), tiers.store().clone());
    if args.near {
        checker = checker.with_near(
            Arc::new(FleetNear(fleet.clone())),
            settings.admin_fanout_timeout,
        );
    }
    let started = Instant::now();
    let mut summary = Summary {
        near_checked: checker.checks_near(),
        ..Summary::default()
    };
    let progress = progress_bar(redis, args.json).await;
    let mut suspects: Vec<CustomerId> = Vec::new();
    let mut cursor: u64 = 0;
    loop {
        let (next, keys) = redis
            .scan_documents(cursor, args.batch)
            .await
            .context("SCAN of features:* in Redis")?;
        let mut ids = Vec::with_capacity(keys.len());
        for key in &keys {
            match key.strip_prefix(DOCUMENT_PREFIX).map(CustomerId::parse) {
                Some(Ok(id)) => ids.push(id),
                _ => summary.skipped += 1,
            }
        }
        summary.scanned += keys.len() as u64;
        if !ids.is_empty() {
            let (states, _) = checker.read(&ids).await.context("reading a batch")?;
            let now = chrono::Utc::now();
            suspects.extend(
                states
                    .iter()
                    .filter(|state| !findings(state, now).is_empty())
                    .filter_map(|state| CustomerId::parse(&state.customer_id).ok()),
            );
        }
        progress.inc(keys.len() as u64);
        progress.set_message(format!("{} suspect", suspects.len()));
        if next == 0 {
            break;
        }
        cursor = next;
    }
    progress.finish_and_clear();

    // What still differs once writes in flight have landed (SCAN may
    // return a key twice: each is judged once).
    suspects.sort_by(|a, b| a.as_str().cmp(b.as_str()));
    suspects.dedup_by(|a, b| a.as_str() == b.as_str());
    if !suspects.is_empty() {
        tokio::time::sleep(Duration::from_millis(args.settle_ms)).await;
    }
    let mut last_request: Option<String> = None;
    for chunk in suspects.chunks(usize::try_from(args.batch).unwrap_or(500)) {
        let (states, _) = checker
            .read(chunk)
            .await
            .context("reading suspects again")?;
        let now = chrono::Utc::now();
        for state in &states {
            let found = findings(state, now);
            if found.is_empty() {
                continue;
            }
            summary.inconsistent += 1;
            for finding in &found {
                *summary
                    .by_kind
                    .entry(finding.tier)
                    .or_default()
                    .entry(finding.mismatch)
                    .or_default() += 1;
            }
            summary.findings.extend(found);
            if args.repair {
                match fleet
                    .request_eviction(&state.customer_id, "audit --full", None)
                    .await
                {
                    Ok(id) => {
                        summary.repaired += 1;
                        last_request = Some(id);
                    }
                    Err(err) => {
                        summary.repair_failed += 1;
                        eprintln!("repair of {} failed: {err:#}", state.customer_id);
                    }
                }
            }
        }
    }
    // The leader handles requests in order: the last one handled, all are.
    if let Some(last) = last_request {
        let handled = fleet
            .wait_handled(&last, Duration::from_millis(args.repair_wait_ms))
            .await
            .context("waiting for the invalidator to handle the evictions")?;
        if !handled {
            eprintln!(
                "the evictions were requested but not handled within {} ms: is an invalidator leading?",
                args.repair_wait_ms
            );
            summary.repair_failed += summary.repaired;
            summary.repaired = 0;
        }
    }
    summary.consistent = summary
        .scanned
        .saturating_sub(summary.skipped)
        .saturating_sub(summary.inconsistent);
    summary.seconds = started.elapsed().as_secs_f64();
    if args.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        print!("{}", render(&summary, args.repair));
    }
    Ok(if summary.remaining() == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// A bar over Redis's key count (an estimate: it counts every key), or
/// nothing for `--json`.
async fn progress_bar(redis: &RedisTier, json: bool) -> ProgressBar {
    if json {
        return ProgressBar::hidden();
    }
    let total: u64 = redis::cmd("DBSIZE")
        .query_async(&mut redis.connection())
        .await
        .unwrap_or(0);
    let progress = ProgressBar::new(total);
    progress.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {bar:40} {pos}/~{len} keys ({per_sec}) {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    progress
}

/// Every tier of `state` that differs from MongoDB.
fn findings(state: &KeyState, now: chrono::DateTime<chrono::Utc>) -> Vec<Finding> {
    let stored_version = state.truth.as_ref().map(|t| t.version);
    let finding = |tier, instance: Option<&str>, cached: Option<i64>, mismatch: Mismatch| Finding {
        customer_id: state.customer_id.clone(),
        tier,
        instance: instance.map(str::to_owned),
        mismatch: mismatch.as_str(),
        cached_version: cached,
        stored_version,
    };
    let mut found = Vec::new();
    if let Verdict::Inconsistent(mismatch) = state.redis_verdict(now) {
        found.push(finding("redis", None, state.redis.version(), mismatch));
    }
    for (instance, observed, verdict) in state.near_verdicts(now) {
        if let Verdict::Inconsistent(mismatch) = verdict {
            found.push(finding(
                "near",
                Some(instance),
                observed.version(),
                mismatch,
            ));
        }
    }
    found
}

/// The summary: the counts, then the findings (the first [`SHOWN`]).
fn render(summary: &Summary, repair: bool) -> String {
    let mut totals = crate::admin::table(&["keys", ""]);
    totals.add_row(vec!["scanned".to_owned(), summary.scanned.to_string()]);
    totals.add_row(vec![
        "consistent".to_owned(),
        summary.consistent.to_string(),
    ]);
    totals.add_row(vec![
        "inconsistent".to_owned(),
        summary.inconsistent.to_string(),
    ]);
    for (tier, kinds) in &summary.by_kind {
        for mismatch in Mismatch::ALL {
            if let Some(n) = kinds.get(mismatch.as_str()) {
                totals.add_row(vec![
                    format!("  {tier} {}", mismatch.as_str()),
                    n.to_string(),
                ]);
            }
        }
    }
    if repair {
        totals.add_row(vec!["repaired".to_owned(), summary.repaired.to_string()]);
        if summary.repair_failed > 0 {
            totals.add_row(vec![
                "repair failed".to_owned(),
                summary.repair_failed.to_string(),
            ]);
        }
    }
    if summary.skipped > 0 {
        totals.add_row(vec![
            "skipped (not a customer id)".to_owned(),
            summary.skipped.to_string(),
        ]);
    }
    let mut out = format!(
        "audit of Redis{} against MongoDB in {:.1}s\n{totals}\n",
        if summary.near_checked {
            " and every near cache"
        } else {
            ""
        },
        summary.seconds
    );
    if !summary.findings.is_empty() {
        let mut findings = crate::admin::table(&[
            "customer",
            "tier",
            "replica",
            "kind",
            "cached version",
            "MongoDB version",
        ]);
        for finding in summary.findings.iter().take(SHOWN) {
            findings.add_row(vec![
                finding.customer_id.clone(),
                finding.tier.to_owned(),
                finding.instance.clone().unwrap_or_default(),
                finding.mismatch.to_owned(),
                finding
                    .cached_version
                    .map_or_else(|| "-".into(), |v| v.to_string()),
                finding
                    .stored_version
                    .map_or_else(|| "none".into(), |v| v.to_string()),
            ]);
        }
        out.push_str(&format!("{findings}\n"));
        if summary.findings.len() > SHOWN {
            out.push_str(&format!(
                "… and {} more (--json lists them all)\n",
                summary.findings.len() - SHOWN
            ));
        }
    }
    let remaining = summary.remaining();
    out.push_str(&if remaining == 0 {
        "result: consistent\n".to_owned()
    } else if repair {
        format!("result: {remaining} inconsistent keys left\n")
    } else {
        format!("result: {remaining} inconsistent keys (--repair evicts them)\n")
    });
    out
}

/// Findings the table shows (`--json` has them all).
const SHOWN: usize = 20;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_remains_decides_the_exit_status() {
        let mut summary = Summary {
            scanned: 10,
            consistent: 8,
            inconsistent: 2,
            ..Summary::default()
        };
        assert_eq!(summary.remaining(), 2);
        assert!(render(&summary, false).contains("--repair evicts them"));
        summary.repaired = 2;
        assert_eq!(summary.remaining(), 0);
        assert!(render(&summary, true).ends_with("result: consistent\n"));
        summary.repaired = 1;
        summary.repair_failed = 1;
        assert_eq!(summary.remaining(), 1);
    }
}

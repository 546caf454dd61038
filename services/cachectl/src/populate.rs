//! Sample data like the original service's `populate_sample_data`: credit-
//! style features for customers `CUST00001`, `CUST00002`, …

use anyhow::{Context, bail};
use clap::Args;
use feature_cache::TieredStore;
use feature_store::{CustomerId, FeatureWrite};
use indicatif::{ProgressBar, ProgressStyle};
use rand::Rng;
use serde_json::{Map, Value, json};
use std::time::Instant;

#[derive(Debug, Args)]
pub struct PopulateArgs {
    /// How many customers to create or overwrite.
    #[arg(long, default_value_t = 1000)]
    count: u32,
    /// Customers per bulk write (at most 1000).
    #[arg(long, default_value_t = 500)]
    batch: usize,
    /// Number of the first customer.
    #[arg(long, default_value_t = 1)]
    start: u32,
    #[arg(long, default_value = FeatureWrite::DEFAULT_MODEL_VERSION)]
    model_version: String,
    #[arg(long, default_value_t = FeatureWrite::DEFAULT_TTL_DAYS)]
    ttl_days: u32,
}

pub async fn run(tiers: &TieredStore, args: PopulateArgs) -> anyhow::Result<()> {
    if !(1..=1000).contains(&args.batch) {
        bail!("--batch must be 1-1000");
    }
    if !FeatureWrite::TTL_DAYS_RANGE.contains(&args.ttl_days) {
        bail!("--ttl-days must be 1-30");
    }
    tiers
        .store()
        .ensure_indexes()
        .await
        .context("creating indexes")?;
    let started = Instant::now();
    let progress = ProgressBar::new(u64::from(args.count));
    progress.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {bar:40} {pos}/{len} customers ({per_sec}, eta {eta})",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let mut failed = 0usize;
    let ids: Vec<u32> = (args.start..args.start + args.count).collect();
    for chunk in ids.chunks(args.batch) {
        let writes = chunk
            .iter()
            .map(|n| {
                Ok(FeatureWrite {
                    customer_id: CustomerId::parse(&format!("CUST{n:05}"))?,
                    features: sample_features(&mut rand::rng()),
                    model_version: args.model_version.clone(),
                    ttl_days: args.ttl_days,
                    traceparent: None,
                })
            })
            .collect::<Result<Vec<_>, feature_store::InvalidCustomerId>>()?;
        let outcomes = tiers.upsert_many(&writes).await.context("bulk write")?;
        failed += outcomes.iter().filter(|o| o.is_err()).count();
        progress.inc(chunk.len() as u64);
    }
    progress.finish_and_clear();
    let elapsed = started.elapsed();
    println!(
        "populated {} customers ({} failed) in {:.1}s ({:.0}/s)",
        args.count as usize - failed,
        failed,
        elapsed.as_secs_f64(),
        f64::from(args.count) / elapsed.as_secs_f64().max(1e-9)
    );
    if failed > 0 {
        bail!("{failed} writes failed");
    }
    Ok(())
}

/// About ten credit-style features, as the original's sample data had.
fn sample_features(rng: &mut impl Rng) -> Map<String, Value> {
    let segments = ["premium", "standard", "basic", "new"];
    let value = json!({
        "credit_score": rng.random_range(300..=850),
        "annual_income": rng.random_range(20_000..=250_000),
        "debt_to_income": (rng.random_range(0.0..0.8_f64) * 1000.0).round() / 1000.0,
        "account_age_months": rng.random_range(1..=240),
        "num_credit_cards": rng.random_range(0..=10),
        "late_payments_12m": rng.random_range(0..=6),
        "utilization_rate": (rng.random_range(0.0..1.0_f64) * 1000.0).round() / 1000.0,
        "has_mortgage": rng.random_bool(0.4),
        "customer_segment": segments[rng.random_range(0..segments.len())],
        "risk_score": (rng.random_range(0.0..1.0_f64) * 10_000.0).round() / 10_000.0,
    });
    match value {
        Value::Object(map) => map,
        _ => Map::new(),
    }
}

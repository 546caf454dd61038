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
    /// Write through a running API (`POST /api/features/bulk/`) at this base
    /// URL, e.g. http://127.0.0.1:8000, instead of straight into MongoDB and
    /// Redis.
    #[arg(long)]
    pub api: Option<String>,
    /// The API key (or token) for `--api`, sent as `Authorization: Bearer`;
    /// needs scope `features:write`. Prefer the environment: command lines
    /// are visible to every user of the machine.
    #[arg(long, env = "CACHE_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
}

impl PopulateArgs {
    fn check(&self) -> anyhow::Result<()> {
        if !(1..=1000).contains(&self.batch) {
            bail!("--batch must be 1-1000");
        }
        if !FeatureWrite::TTL_DAYS_RANGE.contains(&self.ttl_days) {
            bail!("--ttl-days must be 1-30");
        }
        Ok(())
    }
}

/// Populates through the API's bulk endpoint, with the key when one is given.
pub async fn run_via_api(base: &str, args: PopulateArgs) -> anyhow::Result<()> {
    args.check()?;
    let client = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(120))
        .build()
        .context("HTTP client")?;
    let url = format!("{}/api/features/bulk/", base.trim_end_matches('/'));
    let started = Instant::now();
    let mut failed = 0usize;
    let ids: Vec<u32> = (args.start..args.start + args.count).collect();
    for chunk in ids.chunks(args.batch) {
        let items: Vec<Value> = chunk
            .iter()
            .map(|n| json!({"customer_id": format!("CUST{n:05}"), "features": sample_features(&mut rand::rng())}))
            .collect();
        let body = json!({"features_list": items, "model_version": args.model_version, "ttl_days": args.ttl_days});
        let mut request = client.post(&url).json(&body);
        if let Some(key) = args.api_key.as_deref().filter(|k| !k.is_empty()) {
            request = request.bearer_auth(key);
        }
        let response = request
            .send()
            .await
            .with_context(|| format!("POST {url}"))?;
        let status = response.status();
        let reply: Value = response.json().await.unwrap_or(Value::Null);
        if !status.is_success() {
            let hint = match status.as_u16() {
                401 => " (set CACHE_API_KEY or --api-key)",
                403 => " (the key needs scope features:write)",
                _ => "",
            };
            bail!(
                "POST {url}: {status}{hint}: {}",
                reply["error"].as_str().unwrap_or_default()
            );
        }
        failed += usize::try_from(reply["failed"].as_u64().unwrap_or(0)).unwrap_or(usize::MAX);
    }
    report(args.count, failed, started)
}

fn report(count: u32, failed: usize, started: Instant) -> anyhow::Result<()> {
    let elapsed = started.elapsed();
    println!(
        "populated {} customers ({} failed) in {:.1}s ({:.0}/s)",
        (count as usize).saturating_sub(failed),
        failed,
        elapsed.as_secs_f64(),
        f64::from(count) / elapsed.as_secs_f64().max(1e-9)
    );
    if failed > 0 {
        bail!("{failed} writes failed");
    }
    Ok(())
}

pub async fn run(tiers: &TieredStore, args: PopulateArgs) -> anyhow::Result<()> {
    args.check()?;
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
    report(args.count, failed, started)
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

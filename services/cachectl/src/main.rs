//! `cachectl`: operator tasks through the same library code paths as the
//! services (same configuration, same store, same cache tiers).

mod populate;

use anyhow::Context;
use clap::{Parser, Subcommand};
use feature_cache::{RedisTier, TieredStore};
use feature_store::FeatureStore;

#[derive(Debug, Parser)]
#[command(
    name = "cachectl",
    version,
    about = "Operate a redis-mongo-cache deployment"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create realistic sample customers (CUST00001…) with bulk writes.
    Populate(populate::PopulateArgs),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let settings = settings::load(settings::Defaults::API).context("invalid configuration")?;
    let _telemetry = telemetry::init("cachectl", &settings.instance_id, false)?;
    let store = FeatureStore::connect(
        &settings.mongo_uri,
        &settings.mongo_db,
        &settings.mongo_collection,
        settings.mongo_timeout,
        "cachectl",
    )
    .await
    .context("MONGO_URI")?;
    let redis = RedisTier::connect(
        &settings.redis_url,
        settings.redis_timeout,
        settings.redis_ttl,
        settings.tombstone_ttl,
    )
    .context("REDIS_URL")?;
    let tiers = TieredStore::new(None, redis, store.clone());
    let result = match cli.command {
        Command::Populate(args) => populate::run(&tiers, args).await,
    };
    store.shutdown().await;
    result
}

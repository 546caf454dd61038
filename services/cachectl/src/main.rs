//! `cachectl`: operator tasks through the same library code paths as the
//! services (same configuration, same store, same cache tiers).

mod admin;
mod audit;
mod populate;
mod reference;

use anyhow::Context;
use clap::{Parser, Subcommand};
use feature_cache::{RedisTier, TieredStore};
use feature_store::FeatureStore;
use std::process::ExitCode;

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
    /// Compare every key in Redis with MongoDB (`--full`), print a summary,
    /// `--repair` what differs; exit status 1 while inconsistencies remain.
    Audit(audit::AuditArgs),
    /// Create realistic sample customers (CUST00001…) with bulk writes.
    Populate(populate::PopulateArgs),
    /// One key in every tier: MongoDB, Redis (with its TTL) and each live
    /// replica's near cache (through the API's admin routes).
    Inspect(admin::KeyArgs),
    /// Remove one key from Redis and every replica's near cache.
    Evict(admin::KeyArgs),
    /// The live API replicas, from their heartbeats.
    Replicas(admin::ApiArgs),
    /// Serve a constant JSON body at GET /api/features/{id}/ (needs no Redis
    /// or MongoDB), or with --redis-url the bytes of one Redis GET of the
    /// customer's key: the HTTP stack's reference points for the benchmarks.
    ReferenceServer(reference::ReferenceArgs),
}

/// The same allocator as the services, so the reference server is their
/// like-for-like baseline.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<ExitCode> {
    match Cli::parse().command {
        Command::Populate(mut args) => {
            if let Some(api) = args.api.take() {
                populate::run_via_api(&api, args).await?;
                return Ok(ExitCode::SUCCESS);
            }
            let (_, tiers, telemetry) =
                connect(|name, instance| telemetry::init(name, instance, false)).await?;
            let result = populate::run(&tiers, args).await;
            tiers.store().clone().shutdown().await;
            telemetry.shutdown();
            result.map(|()| ExitCode::SUCCESS)
        }
        Command::Audit(args) => {
            // Its standard output is the summary: logs go to standard error.
            let (settings, tiers, telemetry) = connect(telemetry::init_cli).await?;
            let result = audit::run(&settings, &tiers, args).await;
            tiers.store().clone().shutdown().await;
            telemetry.shutdown();
            result
        }
        Command::ReferenceServer(args) => reference::run(args).await.map(|()| ExitCode::SUCCESS),
        Command::Inspect(args) => admin::inspect(args).await.map(|()| ExitCode::SUCCESS),
        Command::Evict(args) => admin::evict(args).await.map(|()| ExitCode::SUCCESS),
        Command::Replicas(args) => admin::replicas(args).await.map(|()| ExitCode::SUCCESS),
    }
}

/// The settings, and the store and Redis as the services see them (no near
/// cache: a CLI run is too short for one to help).
async fn connect(
    init_telemetry: impl FnOnce(&str, &str) -> Result<telemetry::Telemetry, telemetry::TelemetryError>,
) -> anyhow::Result<(settings::Settings, TieredStore, telemetry::Telemetry)> {
    let settings = settings::load(settings::Defaults::API).context("invalid configuration")?;
    let telemetry = init_telemetry("cachectl", &settings.instance_id)?;
    let store = FeatureStore::connect(&settings.store_config("cachectl"))
        .await
        .context("MONGO_URI")?;
    let redis = RedisTier::connect(&settings.redis_config()).context("REDIS_URL")?;
    Ok((settings, TieredStore::new(None, redis, store), telemetry))
}

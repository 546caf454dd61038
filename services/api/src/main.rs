use anyhow::Context;
use cache_api::Application;

/// Every request allocates; mimalloc does that markedly cheaper than the
/// system allocator (see BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let settings = settings::load(settings::Defaults::API).context("invalid configuration")?;
    let telemetry = settings.init_telemetry("cache-api")?;
    let app = Application::build(settings).await?;
    telemetry.serve(|shutdown| app.run(shutdown)).await
}

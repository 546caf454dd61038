use anyhow::Context;
use cache_invalidator::Application;

/// Every change is decoded, rendered and sent in fresh buffers; mimalloc
/// allocates markedly cheaper than the system allocator (see BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let settings =
        settings::load(settings::Defaults::INVALIDATOR).context("invalid configuration")?;
    let telemetry = settings.init_telemetry("cache-invalidator")?;
    let app = Application::build(settings).await?;
    telemetry.serve(|shutdown| app.run(shutdown)).await
}

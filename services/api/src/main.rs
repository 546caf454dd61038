use anyhow::Context;
use cache_api::Application;

/// Every request allocates; mimalloc does that markedly cheaper than the
/// system allocator (see BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let settings = settings::load(settings::Defaults::API).context("invalid configuration")?;
    let telemetry = telemetry::init(
        "cache-api",
        &settings.instance_id,
        settings.log_format == settings::LogFormat::Json,
    )?;
    let app = Application::build(settings).await?;
    let result = app.run(telemetry::shutdown::on_signal()).await;
    telemetry.shutdown();
    result
}

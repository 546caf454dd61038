use anyhow::Context;
use cache_invalidator::Application;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let settings =
        settings::load(settings::Defaults::INVALIDATOR).context("invalid configuration")?;
    let telemetry = telemetry::init(
        "cache-invalidator",
        &settings.instance_id,
        settings.log_format == settings::LogFormat::Json,
    )?;
    let app = Application::build(settings).await?;
    let result = app.run_until(shutdown_signal()).await;
    telemetry.shutdown();
    result
}

async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut sigterm) => {
                sigterm.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        () = ctrl_c => {}
        () = terminate => {}
    }
}

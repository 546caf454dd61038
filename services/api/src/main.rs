use anyhow::Context;
use cache_api::Application;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let settings = settings::load(settings::Defaults::API).context("invalid configuration")?;
    let telemetry = telemetry::init(
        "cache-api",
        &settings.instance_id,
        settings.log_format == settings::LogFormat::Json,
    )?;
    let app = Application::build(settings).await?;
    let result = app.run_until(shutdown_signal()).await;
    telemetry.shutdown();
    result
}

/// SIGTERM or Ctrl-C.
async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut sigterm) => {
                sigterm.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = terminate => {}
    }
}

use crate::lease::{ControlKeys, Lease};
use crate::publish::{Channels, Publisher};
use crate::worker::{Worker, WorkerStatus};
use anyhow::Context;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use feature_cache::RedisTier;
use feature_store::FeatureStore;
use redis::aio::ConnectionManager;
use serde_json::json;
use settings::Settings;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use tokio::net::TcpListener;
use tokio::sync::broadcast;

/// The invalidator, built and bound but not yet running.
pub struct Application {
    listener: TcpListener,
    worker: Worker,
    store: FeatureStore,
    health: HealthState,
}

#[derive(Clone)]
struct HealthState {
    status: Arc<WorkerStatus>,
    redis: ConnectionManager,
    run_id: String,
    instance_id: String,
    mode: &'static str,
}

impl Application {
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        telemetry::metrics::install();
        let store = FeatureStore::from_settings(&settings, "cache-invalidator")
            .await
            .context("MONGO_URI")?;
        let redis = RedisTier::from_settings(&settings)
            .context("REDIS_URL")?
            .connection();

        let run_id = uuid::Uuid::new_v4().to_string();
        let keys = ControlKeys::for_collection(&settings.mongo_db, &settings.mongo_collection);
        let lease = Lease::new(
            redis.clone(),
            keys.clone(),
            settings.leader_lease,
            format!("{}:{run_id}", settings.instance_id),
        );
        let publisher = Publisher::new(
            redis.clone(),
            keys,
            Channels {
                channel: settings.invalidation_channel.clone(),
                stream: settings.invalidation_stream.clone(),
                stream_maxlen: settings.invalidation_stream_maxlen,
            },
            settings.redis_ttl,
            settings.tombstone_ttl,
        );
        let status = Arc::new(WorkerStatus::default());
        let worker = Worker::new(
            store.clone(),
            publisher,
            lease,
            settings.invalidation_mode,
            run_id.clone(),
            Arc::clone(&status),
        );
        let listener = TcpListener::bind(settings.http_addr)
            .await
            .with_context(|| format!("HTTP_ADDR: cannot bind {}", settings.http_addr))?;
        Ok(Self {
            listener,
            worker,
            store,
            health: HealthState {
                status,
                redis,
                run_id,
                instance_id: settings.instance_id.clone(),
                mode: settings.invalidation_mode.as_str(),
            },
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 0)))
    }

    /// Runs until `signal`; then finishes the event in hand, saves the
    /// resume token, releases the lease and closes connections.
    pub async fn run_until(
        self,
        signal: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let Self {
            listener,
            worker,
            store,
            health,
        } = self;
        let (shutdown, _) = broadcast::channel(1);
        tracing::info!(addr = %listener.local_addr()?, run_id = %health.run_id, mode = health.mode, "cache-invalidator started");
        let worker = tokio::spawn(worker.run(shutdown.subscribe()));
        let router = Router::new()
            .route("/health", get(health_handler))
            .route("/metrics", get(telemetry::metrics::handler))
            .with_state(health);
        let notify = shutdown.clone();
        let server = axum::serve(listener, router).with_graceful_shutdown(async move {
            signal.await;
            tracing::info!("shutting down");
            let _ = notify.send(());
        });
        server.await?;
        if let Err(err) = worker.await {
            tracing::error!(error = %err, "worker task failed");
        }
        store.shutdown().await;
        tracing::info!("stopped");
        Ok(())
    }
}

async fn health_handler(State(state): State<HealthState>) -> impl IntoResponse {
    let mut redis = state.redis.clone();
    let redis_ok = redis::cmd("PING")
        .query_async::<String>(&mut redis)
        .await
        .is_ok();
    let leading = state.status.leading.load(Ordering::SeqCst);
    let code = if redis_ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        code,
        Json(json!({
            "status": if redis_ok { "healthy" } else { "degraded" },
            "role": if leading { "leader" } else { "standby" },
            "run_id": state.run_id,
            "instance_id": state.instance_id,
            "mode": state.mode,
            "events": state.status.events.load(Ordering::Relaxed),
            "redis": { "available": redis_ok },
        })),
    )
}

//! The invalidator's HTTP endpoint: `/health` (role and progress) and
//! `/metrics`.

use crate::worker::WorkerStatus;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use invalidation::InvalidationMode;
use redis::aio::ConnectionManager;
use serde_json::json;
use std::sync::Arc;
use std::sync::atomic::Ordering;

/// What `/health` reports.
#[derive(Clone)]
pub struct HealthState {
    pub status: Arc<WorkerStatus>,
    pub redis: ConnectionManager,
    pub run_id: String,
    pub instance_id: String,
    pub mode: InvalidationMode,
}

pub fn router(state: HealthState) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/metrics", get(telemetry::metrics::handler))
        .with_state(state)
}

async fn health(State(state): State<HealthState>) -> impl IntoResponse {
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
            "mode": state.mode.as_str(),
            "events": state.status.events.load(Ordering::Relaxed),
            "redis": { "available": redis_ok },
        })),
    )
}

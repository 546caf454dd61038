//! The invalidator's HTTP endpoint: `/health` (role and progress),
//! `/livez` (the process is up), `/readyz` (it does its job: a leader whose
//! feed progresses, or a standby that can reach Redis) and `/metrics`.

use crate::worker::WorkerStatus;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use feature_cache::RedisConnection;
use invalidation::InvalidationMode;
use serde_json::json;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

/// What `/health` reports.
#[derive(Clone)]
pub struct HealthState {
    pub status: Arc<WorkerStatus>,
    pub redis: RedisConnection,
    pub run_id: String,
    pub instance_id: String,
    pub mode: InvalidationMode,
    /// How long a leader's feed may go without progress before it counts
    /// as stalled.
    pub stall_bound: Duration,
}

pub fn router(state: HealthState) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/livez", get(|| async { "ok" }))
        .route("/readyz", get(ready))
        .route("/metrics", get(telemetry::metrics::handler))
        .with_state(state)
}

/// What the worker is doing, as `/health` and `/readyz` judge it.
struct Observed {
    redis_ok: bool,
    leading: bool,
    stalled: bool,
    since_progress: Duration,
}

impl Observed {
    async fn now(state: &HealthState) -> Self {
        let mut redis = state.redis.clone();
        let redis_ok = redis::cmd("PING")
            .query_async::<String>(&mut redis)
            .await
            .is_ok();
        let leading = state.status.leading.load(Ordering::SeqCst);
        let since_progress = state.status.progress.since();
        Self {
            redis_ok,
            leading,
            stalled: leading && since_progress >= state.stall_bound,
            since_progress,
        }
    }

    fn ready(&self) -> bool {
        self.redis_ok && !self.stalled
    }
}

async fn health(State(state): State<HealthState>) -> impl IntoResponse {
    let observed = Observed::now(&state).await;
    let code = if observed.ready() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let feed = match (observed.leading, observed.stalled) {
        (false, _) => "standby",
        (true, false) => "progressing",
        (true, true) => "stalled",
    };
    (
        code,
        Json(json!({
            "status": if observed.ready() { "healthy" } else { "degraded" },
            "role": if observed.leading { "leader" } else { "standby" },
            "run_id": state.run_id,
            "instance_id": state.instance_id,
            "mode": state.mode.as_str(),
            "events": state.status.events.load(Ordering::Relaxed),
            "feed": {
                "state": feed,
                "last_progress_ms_ago": observed.leading.then(|| {
                    u64::try_from(observed.since_progress.as_millis()).unwrap_or(u64::MAX)
                }),
            },
            "redis": { "available": observed.redis_ok },
        })),
    )
}

async fn ready(State(state): State<HealthState>) -> impl IntoResponse {
    let observed = Observed::now(&state).await;
    if observed.ready() {
        (StatusCode::OK, "ready")
    } else if observed.stalled {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "the change feed is stalled",
        )
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "Redis is unreachable")
    }
}

use super::both;
use crate::state::AppState;
use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use serde::Serialize;
use std::time::{Duration, Instant};
use utoipa::ToSchema;

pub(super) fn routes(router: Router<AppState>) -> Router<AppState> {
    both(router, "/api/health/", get(health))
        .route("/livez", get(live))
        .route("/readyz", get(ready))
}

/// How long a probe's answer is shared: however many callers there are,
/// the stores see at most one check per probe per this.
const PROBE_TTL: Duration = Duration::from_secs(1);

/// The last answer of each probe. A caller that finds it stale checks while
/// holding the slot, so concurrent callers wait for that one check.
#[derive(Default)]
pub struct ProbeCache {
    health: tokio::sync::Mutex<Option<(Instant, (StatusCode, Health))>>,
    ready: tokio::sync::Mutex<Option<(Instant, Readiness)>>,
}

async fn shared<T: Clone>(
    slot: &tokio::sync::Mutex<Option<(Instant, T)>>,
    check: impl Future<Output = T>,
) -> T {
    let mut slot = slot.lock().await;
    if let Some((at, value)) = &*slot
        && at.elapsed() < PROBE_TTL
    {
        return value.clone();
    }
    let value = check.await;
    *slot = Some((Instant::now(), value.clone()));
    value
}

/// The process is up and serving HTTP.
#[utoipa::path(get, path = "/livez", tag = "operations",
    responses((status = 200, description = "The process is up")))]
pub async fn live() -> &'static str {
    "ok"
}

/// Whether this replica can serve: a store answers, and with a near cache
/// the invalidation subscription is live (else its near cache could serve
/// stale documents).
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Readiness {
    /// `ready` or `not_ready`.
    pub status: &'static str,
    pub redis: bool,
    pub mongodb: bool,
    /// `None` without a near cache.
    pub invalidation_subscription: Option<bool>,
}

#[utoipa::path(get, path = "/readyz", tag = "operations",
    responses((status = 200, description = "Ready", body = Readiness),
              (status = 503, description = "Not ready", body = Readiness)))]
pub async fn ready(State(state): State<AppState>) -> impl IntoResponse {
    let readiness = shared(&state.probes.ready, async {
        let (redis, mongodb) = tokio::join!(state.tiers.redis().ping(), state.tiers.store().ping());
        let (redis, mongodb) = (redis.is_ok(), mongodb.is_ok());
        let invalidation_subscription = state.invalidation.as_ref().map(|status| {
            status
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .subscribed
        });
        let ready = (redis || mongodb) && invalidation_subscription.unwrap_or(true);
        Readiness {
            status: if ready { "ready" } else { "not_ready" },
            redis,
            mongodb,
            invalidation_subscription,
        }
    })
    .await;
    let code = if readiness.status == "ready" {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, axum::Json(readiness))
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct RedisStatus {
    pub available: bool,
    pub status: String,
    pub total_keys: Option<u64>,
    pub used_memory: Option<String>,
    pub latency_ms: Option<f64>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct MongoStatus {
    pub available: bool,
    pub status: String,
    pub documents_count: Option<u64>,
    pub collection: String,
    pub latency_ms: Option<f64>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Health {
    /// `healthy` when both stores answer, `degraded` otherwise.
    pub status: &'static str,
    pub redis: RedisStatus,
    pub mongodb: MongoStatus,
}

#[utoipa::path(
    get, path = "/api/health/", tag = "operations",
    description = "Shared for a second between callers: the stores see one check per second at most.",
    responses((status = 200, description = "Both stores answer", body = Health),
              (status = 503, description = "At least one store is down", body = Health))
)]
pub async fn health(State(state): State<AppState>) -> impl IntoResponse {
    let (status, body) = shared(&state.probes.health, check_health(&state)).await;
    (status, axum::Json(body))
}

/// Both stores' state: read-only calls, MongoDB's on the probes' own
/// connection (never a request's permit).
async fn check_health(state: &AppState) -> (StatusCode, Health) {
    let tiers = &state.tiers;
    let (redis, ping, count) = tokio::join!(
        tiers.redis().health(),
        tiers.store().ping(),
        tiers.store().count()
    );
    let redis = match redis {
        Ok(h) => RedisStatus {
            available: true,
            status: "connected".into(),
            total_keys: Some(h.total_keys),
            used_memory: Some(h.used_memory),
            latency_ms: Some(millis(h.latency)),
        },
        Err(err) => RedisStatus {
            available: false,
            status: format!("error: {err}"),
            total_keys: None,
            used_memory: None,
            latency_ms: None,
        },
    };
    // The bare name, as the Django service reports it (the database is in
    // `/api/info/`).
    let collection = tiers.store().collection_name().to_owned();
    let mongodb = match (ping, count) {
        (Ok(latency), Ok(count)) => MongoStatus {
            available: true,
            status: "connected".into(),
            documents_count: Some(count),
            collection,
            latency_ms: Some(millis(latency)),
        },
        (Err(err), _) | (_, Err(err)) => MongoStatus {
            available: false,
            status: format!("error: {err}"),
            documents_count: None,
            collection,
            latency_ms: None,
        },
    };
    let healthy = redis.available && mongodb.available;
    let status = if healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = Health {
        status: if healthy { "healthy" } else { "degraded" },
        redis,
        mongodb,
    };
    (status, body)
}

fn millis(d: std::time::Duration) -> f64 {
    (d.as_secs_f64() * 1_000_000.0).round() / 1000.0
}

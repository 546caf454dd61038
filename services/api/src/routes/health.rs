use super::both;
use crate::state::AppState;
use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use serde::Serialize;
use utoipa::ToSchema;

pub(super) fn routes(router: Router<AppState>) -> Router<AppState> {
    both(router, "/api/health/", get(health))
}

#[derive(Debug, Serialize, ToSchema)]
pub struct RedisStatus {
    pub available: bool,
    pub status: String,
    pub total_keys: Option<u64>,
    pub used_memory: Option<String>,
    pub latency_ms: Option<f64>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct MongoStatus {
    pub available: bool,
    pub status: String,
    pub documents_count: Option<u64>,
    pub collection: String,
    pub latency_ms: Option<f64>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Health {
    /// `healthy` when both stores answer, `degraded` otherwise.
    pub status: &'static str,
    pub redis: RedisStatus,
    pub mongodb: MongoStatus,
}

#[utoipa::path(
    get, path = "/api/health/", tag = "operations",
    responses((status = 200, description = "Both stores answer", body = Health),
              (status = 503, description = "At least one store is down", body = Health))
)]
pub async fn health(State(state): State<AppState>) -> impl IntoResponse {
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
    (status, axum::Json(body))
}

fn millis(d: std::time::Duration) -> f64 {
    (d.as_secs_f64() * 1_000_000.0).round() / 1000.0
}

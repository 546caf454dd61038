//! Operators' view of one key in every tier, evicting it everywhere, and
//! the live replicas. These routes are not in the admission table, so they
//! need scope `admin` whenever credentials are configured.

use super::both;
use crate::error::ApiError;
use crate::extract::CustomerIdPath;
use crate::state::AppState;
use axum::Json;
use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use chrono::SecondsFormat;
use feature_cache::StoredEntry;
use serde_json::{Value, json};
use std::time::Duration;

/// How long an eviction waits for the invalidator before answering 202.
pub const EVICT_WAIT: Duration = Duration::from_secs(2);

pub(super) fn routes(router: Router<AppState>) -> Router<AppState> {
    let router = both(router, "/admin/keys/{customer_id}/", get(inspect_key));
    let router = both(router, "/admin/keys/{customer_id}/evict/", post(evict_key));
    both(router, "/admin/replicas/", get(replicas))
}

/// One key in every tier.
#[utoipa::path(
    get, path = "/admin/keys/{customer_id}/", tag = "admin",
    params(("customer_id" = String, Path, description = "1–128 characters of [A-Za-z0-9_.:-]")),
    responses(
        (status = 200, description = "`mongodb`: the stored document's version and timestamps (or null); \
            `redis`: the entry's `kind` (document, tombstone, floor, absent, reservation, unknown), `version`, \
            `ttl_ms` (PTTL) and `document` (or null); `replicas`: each live replica's near-cache entry \
            (`entry` null when it holds none) with its `instance_id`; `silent_replicas`: replicas known \
            from heartbeats that did not answer within ADMIN_FANOUT_TIMEOUT_MS", body = Object),
        (status = 400, body = crate::error::ErrorBody),
        (status = 503, description = "MongoDB or Redis unavailable", body = crate::error::ErrorBody)
    )
)]
#[tracing::instrument(skip_all, fields(customer_id = %id.0))]
pub async fn inspect_key(
    State(state): State<AppState>,
    id: CustomerIdPath,
) -> Result<Json<Value>, ApiError> {
    let CustomerIdPath(id) = id;
    let deadline = state.settings.admin_fanout_timeout;
    // The three tiers are asked at once; the fan-out bounds the wait.
    let (stored, cached, near) = tokio::join!(
        state.tiers.store().get(&id),
        state.tiers.redis().inspect(id.as_str()),
        state.fleet.near_entries(id.as_str(), deadline),
    );
    let mongodb = stored?.map(|doc| {
        json!({
            "version": doc.version,
            "calculated_at": doc.calculated_at.to_rfc3339_opts(SecondsFormat::Millis, true),
            "expires_at": doc.expires_at.map(|at| at.to_rfc3339_opts(SecondsFormat::Millis, true)),
            "model_version": doc.model_version,
        })
    });
    let redis = cached?.map(|entry| redis_view(&entry));
    let near = near?;
    let replicas: Vec<Value> = near
        .answers
        .iter()
        .map(|answer| json!({"instance_id": answer.instance_id, "entry": answer.entry}))
        .collect();
    Ok(Json(json!({
        "customer_id": id.as_str(),
        "mongodb": mongodb,
        "redis": redis,
        "replicas": replicas,
        "silent_replicas": near.silent,
    })))
}

/// A Redis entry as the inspection shows it.
fn redis_view(entry: &StoredEntry) -> Value {
    let document = match entry.kind {
        feature_cache::StoredKind::Document => serde_json::from_str::<Value>(&entry.raw).ok(),
        _ => None,
    };
    json!({
        "kind": entry.kind.as_str(),
        "version": entry.version,
        "ttl_ms": entry.ttl.map(|ttl| u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX)),
        "document": document,
    })
}

/// Evicts one key from Redis and every near cache.
#[utoipa::path(
    post, path = "/admin/keys/{customer_id}/evict/", tag = "admin",
    params(("customer_id" = String, Path, description = "1–128 characters of [A-Za-z0-9_.:-]")),
    responses(
        (status = 200, description = "The invalidator removed the Redis entry and announced the eviction \
            to every replica (`handled: true`, with the request's `request_id`)", body = Object),
        (status = 202, description = "Queued, but the invalidator did not handle it within 2 s \
            (`handled: false`); it will when a leader runs", body = Object),
        (status = 400, body = crate::error::ErrorBody),
        (status = 503, description = "Redis unavailable", body = crate::error::ErrorBody)
    )
)]
#[tracing::instrument(skip_all, fields(customer_id = %id.0))]
pub async fn evict_key(
    State(state): State<AppState>,
    id: CustomerIdPath,
) -> Result<Response, ApiError> {
    let CustomerIdPath(id) = id;
    // This replica at once; the others through the invalidator's announcement.
    if let Some(near) = state.tiers.near() {
        near.invalidate(id.as_str());
    }
    let request_id = state
        .fleet
        .request_eviction(
            id.as_str(),
            "admin api",
            telemetry::propagation::current_traceparent(),
        )
        .await?;
    let handled = state.fleet.wait_handled(&request_id, EVICT_WAIT).await?;
    tracing::info!(customer_id = %id, %request_id, handled, "eviction requested");
    let status = if handled {
        StatusCode::OK
    } else {
        StatusCode::ACCEPTED
    };
    Ok((
        status,
        Json(json!({
            "customer_id": id.as_str(),
            "request_id": request_id,
            "handled": handled,
        })),
    )
        .into_response())
}

/// The live replicas, from their heartbeats.
#[utoipa::path(
    get, path = "/admin/replicas/", tag = "admin",
    responses(
        (status = 200, description = "`replicas`: each live replica's last heartbeat: `instance_id`, \
            `binary_version`, `started_at`, `uptime_ms`, `last_stream_id` and `lag_ms` (the last \
            invalidation applied and how long after its announcement), `near_entries`, `near_bytes`, \
            `hit_ratio` (near-cache share of reads since start), `subscribed`, `last_heartbeat_ms`", body = Object),
        (status = 503, description = "Redis unavailable", body = crate::error::ErrorBody)
    )
)]
pub async fn replicas(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    let replicas = state.fleet.replicas().await?;
    Ok(Json(json!({ "replicas": replicas })))
}

use super::both;
use crate::state::AppState;
use axum::Json;
use axum::Router;
use axum::extract::State;
use axum::routing::get;
use serde_json::{Value, json};

pub(super) fn routes(router: Router<AppState>) -> Router<AppState> {
    both(router, "/api/info/", get(info))
}

/// The caching strategy in force on this replica.
#[utoipa::path(get, path = "/api/info/", tag = "operations",
    responses((status = 200, description = "Tiers, flows, TTLs and identity of this replica", body = Object)))]
pub async fn info(State(state): State<AppState>) -> Json<Value> {
    let s = &state.settings;
    let near = state.tiers.near();
    let subscriber = state.invalidation.as_ref().map(|status| {
        status
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    });
    Json(json!({
        "service": "redis-mongo-cache",
        "version": env!("CARGO_PKG_VERSION"),
        "instance_id": s.instance_id,
        "strategy": "read-through near cache -> Redis -> MongoDB; write-through with version guard",
        "tiers": [
            {"name": "local", "kind": "in-process (quick_cache)", "enabled": near.is_some(),
             "max_entries": s.local_cache_max_entries, "ttl_ms": s.local_cache_ttl.as_millis() as u64,
             "entries": near.map(|n| n.len())},
            {"name": "redis", "key": "features:{customer_id}", "ttl_seconds": s.redis_ttl.as_secs(),
             "tombstone_ttl_ms": s.tombstone_ttl.as_millis() as u64},
            {"name": "mongodb", "database": s.mongo_db, "collection": s.mongo_collection,
             "timeout_ms": s.mongo_timeout.as_millis() as u64, "role": "source of truth"},
        ],
        "read_flow": [
            "near cache hit -> serve (source=local)",
            "Redis hit -> warm near cache, serve (source=redis)",
            "MongoDB hit -> version-guarded fill of Redis and near cache, serve (source=mongodb)",
            "concurrent misses of one key share one load",
        ],
        "write_flow": [
            "atomic upsert in MongoDB advances the version",
            "version-guarded write of Redis, then near cache",
            "delete leaves a versioned tombstone in Redis",
            "invalidator propagates every change to all replicas",
        ],
        "invalidation": {
            "mode": if subscriber.is_some() { "pubsub+stream" } else { "none (no near cache)" },
            "follower": subscriber.map(|f| json!({
                "subscribed": f.subscribed, "last_stream_id": f.last_stream_id,
                "applied": f.applied, "gaps": f.gaps, "flushes": f.flushes,
            })),
            "channel": s.invalidation_channel,
            "stream": s.channels().stream,
            "gap_check_interval_ms": s.invalidation_check_interval.as_millis() as u64,
        },
    }))
}

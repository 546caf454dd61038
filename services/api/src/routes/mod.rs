//! The HTTP surface. Every path answers with and without its trailing slash.

pub mod admin;
pub mod docs;
pub mod features;
pub mod health;
pub mod info;

use crate::error::ApiError;
use crate::state::AppState;
use axum::Router;
use axum::extract::State;
use axum::http::Uri;
use axum::response::IntoResponse;
use axum::routing::MethodRouter;

/// Registers `handler` at `path` and at `path` with a trailing slash.
pub(crate) fn both(
    router: Router<AppState>,
    path: &str,
    handler: MethodRouter<AppState>,
) -> Router<AppState> {
    let bare = path.trim_end_matches('/');
    router
        .route(bare, handler.clone())
        .route(&format!("{bare}/"), handler)
}

/// Every route; request bodies (writes only) are limited to `max_body_bytes`.
pub fn router(max_body_bytes: usize) -> Router<AppState> {
    let router = Router::new();
    let router = features::routes(router, max_body_bytes);
    let router = health::routes(router);
    let router = info::routes(router);
    let router = admin::routes(router);
    router
        .merge(docs::routes())
        .route("/metrics", axum::routing::get(metrics))
        .fallback(route_not_found)
        .method_not_allowed_fallback(method_not_allowed)
}

/// Prometheus metrics, with the gauges that are read rather than counted
/// brought up to date first.
async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    if let Some(near) = state.tiers.near() {
        metrics::gauge!("near_cache_entries").set(near.len() as f64);
    }
    telemetry::metrics::handler().await
}

async fn route_not_found(uri: Uri) -> ApiError {
    ApiError::RouteNotFound(uri.path().to_owned())
}

async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}

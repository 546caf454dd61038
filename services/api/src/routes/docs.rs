//! OpenAPI 3 at `/api-docs/openapi.json`, Swagger UI at `/swagger/`, ReDoc at
//! `/redoc/`; every asset is compiled in, so they work with no internet.

use crate::state::AppState;
use axum::Router;
use utoipa::OpenApi;
use utoipa_redoc::{Redoc, Servable};
use utoipa_swagger_ui::SwaggerUi;

#[derive(OpenApi)]
#[openapi(
    info(title = "redis-mongo-cache", description = "Customer feature documents served from near cache, Redis or MongoDB."),
    paths(
        super::features::get_features,
        super::features::create_features,
        super::features::delete_features,
        super::features::bulk_create,
        super::features::batch_get,
        super::health::health,
        super::info::info,
    ),
    tags((name = "features", description = "Feature documents"), (name = "operations", description = "Health and strategy"))
)]
pub struct ApiDoc;

pub(super) fn routes() -> Router<AppState> {
    Router::new()
        .merge(SwaggerUi::new("/swagger").url("/api-docs/openapi.json", ApiDoc::openapi()))
        .merge(Redoc::with_url("/redoc/", ApiDoc::openapi()))
        .route(
            "/redoc",
            axum::routing::get(|| async { axum::response::Redirect::permanent("/redoc/") }),
        )
}

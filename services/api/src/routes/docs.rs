//! OpenAPI 3 at `/api-docs/openapi.json`, Swagger UI at `/swagger/`, ReDoc at
//! `/redoc/`; every asset is compiled in and neither page asks another host
//! for anything, so both work with no internet.

use crate::state::AppState;
use axum::Router;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use std::sync::LazyLock;
use utoipa::OpenApi;
use utoipa_redoc::{Redoc, Servable};
use utoipa_swagger_ui::{Config, SwaggerUi};

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
        super::health::live,
        super::health::ready,
        super::info::info,
        super::admin::inspect_key,
        super::admin::evict_key,
        super::admin::replicas,
    ),
    tags((name = "features", description = "Feature documents"), (name = "operations", description = "Health and strategy"),
         (name = "admin", description = "Operators: one key in every tier, evicting it everywhere, the live replicas (scope `admin`)"))
)]
pub struct ApiDoc;

/// ReDoc 2.5.4's standalone bundle from the npm package `redoc`, unchanged
/// (source, checksums and licenses in `assets/redoc/`).
const REDOC_BUNDLE: &str = include_str!("../../assets/redoc/redoc.standalone.js");

/// The bundle as served. Its one request to another host is the Redocly
/// logo beside "API docs by Redocly", an `<img>` from ReDoc's CDN that
/// removes itself when it fails to load: `data:,` is no image, so it fails
/// at once and without a request (the link and its text stay).
static REDOC_JS: LazyLock<String> =
    LazyLock::new(|| REDOC_BUNDLE.replace(REDOC_LOGO, "\"data:,\""));

const REDOC_LOGO: &str = "\"https://cdn.redoc.ly/redoc/logo-mini.svg\"";

/// utoipa-redoc's page loads ReDoc and fonts from CDNs; this one only the
/// bundle above (relative to `/redoc/`), with the spec inlined as `$spec`.
const REDOC_HTML: &str = r#"<!DOCTYPE html>
<html>
  <head>
    <title>redis-mongo-cache API (ReDoc)</title>
    <meta charset="utf-8" />
    <meta name="viewport" content="width=device-width, initial-scale=1" />
    <style>
      body { margin: 0; padding: 0; }
    </style>
  </head>
  <body>
    <div id="redoc-container"></div>
    <script src="redoc.standalone.js"></script>
    <script>
      Redoc.init($spec, $config, document.getElementById("redoc-container"));
    </script>
  </body>
</html>
"#;

pub(super) fn routes() -> Router<AppState> {
    // Swagger UI's default validator badge fetches an image from
    // validator.swagger.io for every page not served from localhost.
    let swagger = SwaggerUi::new("/swagger")
        .url("/api-docs/openapi.json", ApiDoc::openapi())
        .config(Config::default().validator_url("none"));
    Router::new()
        .merge(swagger)
        .merge(Redoc::with_url("/redoc/", ApiDoc::openapi()).custom_html(REDOC_HTML))
        .route("/redoc/redoc.standalone.js", get(redoc_js))
        .route(
            "/redoc",
            get(|| async { axum::response::Redirect::permanent("/redoc/") }),
        )
}

async fn redoc_js() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
            // Changes only with the binary; an hour keeps reloads cheap.
            (header::CACHE_CONTROL, "public, max-age=3600"),
        ],
        REDOC_JS.as_str(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_served_bundle_names_no_other_host_to_load_from() {
        // A new ReDoc version that moves the logo must update the patch.
        assert_eq!(REDOC_BUNDLE.matches(REDOC_LOGO).count(), 1);
        assert!(!REDOC_JS.contains("cdn.redoc.ly"));
        assert!(!REDOC_HTML.contains("//"), "the page loads only local URLs");
    }
}

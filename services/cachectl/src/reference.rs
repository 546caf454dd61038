//! `cachectl reference-server`: the HTTP stack's reference points for the
//! benchmarks (`bench/run.sh`). A trivial axum handler at
//! `GET /api/features/{customer_id}/` (with or without the slash), with the
//! same runtime (multi-threaded tokio), HTTP stack (hyper through axum),
//! allocator and `content-type` as `cache-api`, but no validation, no cache,
//! no metrics, no tracing. It serves either
//! - one constant JSON body of a chosen size (the default): what
//!   `cache-api`'s near-cache hit costs on top of this is the cost of the
//!   service itself; or
//! - with `--redis-url`, the bytes stored at the customer's Redis key, read
//!   with one `GET` on the kind of connection `cache-api` uses: the reference
//!   of a Redis hit.

use anyhow::Context;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use clap::Args;
use feature_cache::keyspace::document_key;
use feature_cache::{RedisConfig, RedisConnection, RedisTls, TtlPolicy};
use std::net::SocketAddr;
use std::time::Duration;

#[derive(Debug, Args)]
pub struct ReferenceArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8090")]
    addr: SocketAddr,
    /// Size of the JSON body in bytes (at least the size of its skeleton, 82).
    #[arg(long, default_value_t = 400)]
    body_bytes: usize,
    /// Serve each request with one Redis `GET` of the customer's key on this
    /// Redis (`redis://`, `rediss://`, `redis+unix://`) instead of the
    /// constant body: 200 with the stored bytes, 404 when the key is absent,
    /// 503 when Redis fails.
    #[arg(long)]
    redis_url: Option<String>,
    /// Deadline of each Redis command in milliseconds (`cache-api`'s
    /// default `REDIS_TIMEOUT_MS`).
    #[arg(long, default_value_t = 500)]
    redis_timeout_ms: u64,
}

pub async fn run(args: ReferenceArgs) -> anyhow::Result<()> {
    let (app, what) = match &args.redis_url {
        Some(url) => {
            let redis = redis_connection(url, Duration::from_millis(args.redis_timeout_ms))?;
            (redis_app(redis), "one Redis GET per request".to_owned())
        }
        None => {
            let body = Bytes::from(constant_body(args.body_bytes));
            let what = format!("{}-byte constant body", body.len());
            (constant_app(body), what)
        }
    };
    let listener = tokio::net::TcpListener::bind(args.addr)
        .await
        .with_context(|| format!("cannot bind {}", args.addr))?;
    println!(
        "reference server on http://{}/api/features/{{id}}/ ({what})",
        listener.local_addr()?
    );
    axum::serve(listener, app)
        .with_graceful_shutdown(telemetry::shutdown::signal())
        .await
        .context("serving")
}

/// Both spellings of the route `cache-api` serves, to one handler.
fn routes<H, T, S>(handler: H) -> Router<S>
where
    H: axum::handler::Handler<T, S>,
    T: 'static,
    S: Clone + Send + Sync + 'static,
{
    Router::new()
        .route("/api/features/{customer_id}/", get(handler.clone()))
        .route("/api/features/{customer_id}", get(handler))
}

fn constant_app(body: Bytes) -> Router {
    let handler = move || {
        let body = body.clone();
        async move { ([(header::CONTENT_TYPE, json())], body) }
    };
    routes(handler)
}

/// The connection `cache-api`'s Redis tier makes (`RedisConfig::connection`:
/// multiplexed, reconnecting, TCP_NODELAY), for a single Redis.
fn redis_connection(url: &str, timeout: Duration) -> anyhow::Result<RedisConnection> {
    let config = RedisConfig {
        url: url.to_owned(),
        tls: RedisTls::default(),
        cluster_nodes: Vec::new(),
        timeout,
        // Never used: this server only reads.
        ttl: TtlPolicy {
            document_ttl: Duration::from_secs(3600),
            marker_ttl: Duration::from_secs(60),
            negative_ttl: Duration::ZERO,
        },
    };
    let redacted = config.redacted_url();
    config
        .connection()
        .with_context(|| format!("--redis-url {redacted}"))
}

fn redis_app(redis: RedisConnection) -> Router {
    routes(from_redis).with_state(redis)
}

async fn from_redis(
    State(mut redis): State<RedisConnection>,
    Path(customer_id): Path<String>,
) -> Response {
    let stored: redis::RedisResult<Option<Vec<u8>>> = redis::cmd("GET")
        .arg(document_key(&customer_id))
        .query_async(&mut redis)
        .await;
    match stored {
        Ok(Some(bytes)) => ([(header::CONTENT_TYPE, json())], Bytes::from(bytes)).into_response(),
        Ok(None) => error(StatusCode::NOT_FOUND, r#"{"error":"not found"}"#),
        Err(_) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            r#"{"error":"redis unavailable"}"#,
        ),
    }
}

fn error(status: StatusCode, body: &'static str) -> Response {
    (status, [(header::CONTENT_TYPE, json())], body).into_response()
}

fn json() -> HeaderValue {
    HeaderValue::from_static("application/json")
}

/// A JSON document shaped like a served feature document, padded to exactly
/// `size` bytes (or its skeleton's size, if that is larger).
fn constant_body(size: usize) -> Vec<u8> {
    const HEAD: &str = r#"{"version":1,"customer_id":"REFERENCE","features":{"pad":""#;
    const TAIL: &str = r#""},"source":"reference"}"#;
    let pad = size.saturating_sub(HEAD.len() + TAIL.len());
    let mut body = Vec::with_capacity(HEAD.len() + pad + TAIL.len());
    body.extend_from_slice(HEAD.as_bytes());
    body.resize(HEAD.len() + pad, b'x');
    body.extend_from_slice(TAIL.as_bytes());
    body
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_is_json_of_the_requested_size() {
        for size in [0, 82, 83, 400, 4096] {
            let body = constant_body(size);
            let value: serde_json::Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(value["customer_id"], "REFERENCE");
            assert_eq!(body.len(), size.max(82), "size {size}");
        }
    }

    /// Serves `app` on a free port of 127.0.0.1; its base URL.
    async fn serve(app: Router) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        format!("http://{addr}")
    }

    /// Status, content type and body of a GET.
    async fn fetch(url: &str) -> (u16, String, String) {
        let resp = reqwest::get(url).await.unwrap();
        let status = resp.status().as_u16();
        let content_type = resp
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        (status, content_type, resp.text().await.unwrap())
    }

    #[tokio::test]
    async fn constant_body_on_both_spellings_of_the_route() {
        let base = serve(constant_app(Bytes::from(constant_body(200)))).await;
        for path in ["/api/features/C1/", "/api/features/C1"] {
            let (status, content_type, body) = fetch(&format!("{base}{path}")).await;
            assert_eq!((status, content_type.as_str()), (200, "application/json"));
            assert_eq!(body.len(), 200, "{path}");
        }
    }

    #[tokio::test]
    async fn redis_down_is_503_json() {
        // A port nothing listens on: the lazy connection fails per request.
        let port = testkit::free_port();
        let redis = redis_connection(
            &format!("redis://127.0.0.1:{port}/0"),
            Duration::from_millis(200),
        )
        .unwrap();
        let base = serve(redis_app(redis)).await;
        let (status, content_type, body) = fetch(&format!("{base}/api/features/C1/")).await;
        assert_eq!((status, content_type.as_str()), (503, "application/json"));
        let value: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert!(value["error"].is_string(), "{body}");
    }

    #[tokio::test]
    async fn one_redis_get_of_the_document_key() {
        let server = testkit::redis::TestRedis::start().await;
        let mut admin = server.client().await;
        let stored = r#"{"version":7,"customer_id":"C1","features":{"a":1}}"#;
        let _: () = redis::cmd("SET")
            .arg(document_key("C1"))
            .arg(stored)
            .query_async(&mut admin)
            .await
            .unwrap();
        let redis = redis_connection(&server.url(), Duration::from_millis(500)).unwrap();
        let base = serve(redis_app(redis)).await;
        for path in ["/api/features/C1/", "/api/features/C1"] {
            let (status, content_type, body) = fetch(&format!("{base}{path}")).await;
            assert_eq!((status, content_type.as_str()), (200, "application/json"));
            assert_eq!(body, stored, "{path}");
        }
        let (status, content_type, body) = fetch(&format!("{base}/api/features/C2/")).await;
        assert_eq!((status, content_type.as_str()), (404, "application/json"));
        assert_eq!(body, r#"{"error":"not found"}"#);
    }
}

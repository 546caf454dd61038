//! `cachectl reference-server`: the HTTP stack's reference point for the
//! benchmarks (`bench/run.sh`). A trivial axum handler serves one constant
//! JSON body of a chosen size at `GET /api/features/{customer_id}/`, with the
//! same runtime (multi-threaded tokio), HTTP stack (hyper through axum) and
//! `content-type` as `cache-api`, but no validation, no cache, no metrics, no
//! tracing. What `cache-api`'s hit path costs on top of this is the cost of
//! the service itself.

use anyhow::Context;
use axum::Router;
use axum::body::Bytes;
use axum::http::{HeaderValue, header};
use axum::routing::get;
use clap::Args;
use std::net::SocketAddr;

#[derive(Debug, Args)]
pub struct ReferenceArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8090")]
    addr: SocketAddr,
    /// Size of the JSON body in bytes (at least the size of its skeleton, 82).
    #[arg(long, default_value_t = 400)]
    body_bytes: usize,
}

pub async fn run(args: ReferenceArgs) -> anyhow::Result<()> {
    let body = Bytes::from(constant_body(args.body_bytes));
    let body_len = body.len();
    let handler = move || {
        let body = body.clone();
        async move {
            (
                [(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                )],
                body,
            )
        }
    };
    let app = Router::new()
        .route("/api/features/{customer_id}/", get(handler.clone()))
        .route("/api/features/{customer_id}", get(handler));
    let listener = tokio::net::TcpListener::bind(args.addr)
        .await
        .with_context(|| format!("cannot bind {}", args.addr))?;
    println!(
        "reference server on http://{}/api/features/{{id}}/ ({body_len}-byte body)",
        listener.local_addr()?
    );
    axum::serve(listener, app)
        .with_graceful_shutdown(telemetry::shutdown::signal())
        .await
        .context("serving")
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
    use super::constant_body;

    #[test]
    fn body_is_json_of_the_requested_size() {
        for size in [0, 82, 83, 400, 4096] {
            let body = constant_body(size);
            let value: serde_json::Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(value["customer_id"], "REFERENCE");
            assert_eq!(body.len(), size.max(82), "size {size}");
        }
    }
}

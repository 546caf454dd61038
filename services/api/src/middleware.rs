use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderValue, Method};
use axum::middleware::Next;
use axum::response::Response;
use metrics::{Counter, Histogram};
use std::collections::HashMap;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Instant;
use tracing::Instrument;

/// Wraps every request in a server span (continuing the caller's W3C trace),
/// records request metrics by route and status, and returns `traceparent`.
pub async fn observe(
    State(metrics): State<Arc<RequestMetrics>>,
    request: Request,
    next: Next,
) -> Response {
    let started = Instant::now();
    let method = request.method().clone();
    let matched = request.extensions().get::<MatchedPath>().cloned();
    let route = matched.as_ref().map_or(UNMATCHED, MatchedPath::as_str);
    // What the client chose goes into the span bounded: the method as one of
    // the standard ones or `_OTHER` (as OpenTelemetry's conventions say),
    // the path cut to a length.
    let method_label = if is_standard(&method) {
        method.as_str()
    } else {
        "_OTHER"
    };
    let span = tracing::info_span!(
        "HTTP request",
        otel.name = format!("{method_label} {route}"),
        otel.kind = "server",
        http.request.method = method_label,
        http.route = %route,
        url.path = truncated(request.uri().path(), MAX_ATTRIBUTE_CHARS),
        http.response.status_code = tracing::field::Empty,
    );
    telemetry::propagation::continue_from_headers(&span, request.headers());

    let mut response = next.run(request).instrument(span.clone()).await;

    let status = response.status().as_u16();
    span.record("http.response.status_code", status);
    if let Some(traceparent) = telemetry::propagation::traceparent_of(&span)
        && let Ok(value) = HeaderValue::from_str(&traceparent)
    {
        response.headers_mut().insert("traceparent", value);
    }
    metrics.record(&method, route, status, started.elapsed().as_secs_f64());
    response
}

/// The longest client-chosen text a span attribute carries.
pub const MAX_ATTRIBUTE_CHARS: usize = 256;

/// `text` cut to at most `max` characters (on a character boundary).
pub fn truncated(text: &str, max: usize) -> &str {
    match text.char_indices().nth(max) {
        Some((end, _)) => &text[..end],
        None => text,
    }
}

type FoldMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;
type HandlesByMethodStatus = FoldMap<(Method, u16), RequestHandles>;

/// The `route` label of requests no route matched.
const UNMATCHED: &str = "unmatched";

/// `http_requests_total` and `http_request_duration_seconds` handles, one
/// pair per (route, method, status), registered on first use. Looking a pair
/// up takes a read lock and no allocation, where building the labels for
/// every request cost a dozen allocations on the hit path.
#[derive(Default)]
pub struct RequestMetrics {
    by_route: RwLock<FoldMap<Box<str>, HandlesByMethodStatus>>,
}

struct RequestHandles {
    requests: Counter,
    duration: Histogram,
}

impl RequestHandles {
    fn record(&self, seconds: f64) {
        self.requests.increment(1);
        self.duration.record(seconds);
    }
}

impl RequestMetrics {
    fn record(&self, method: &Method, route: &str, status: u16, seconds: f64) {
        // Methods outside the standard set share one label, so that clients
        // cannot grow the table (or the metrics) without bound.
        let method = if is_standard(method) {
            method.clone()
        } else {
            Method::from_bytes(b"OTHER").unwrap_or_default()
        };
        let key = (method, status);
        if let Some(found) = self
            .by_route
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(route)
            .and_then(|by_key| by_key.get(&key))
        {
            found.record(seconds);
            return;
        }
        let labels = [
            ("method", key.0.to_string()),
            ("route", route.to_owned()),
            ("status", status.to_string()),
        ];
        let handles = RequestHandles {
            requests: metrics::counter!("http_requests_total", &labels),
            duration: metrics::histogram!("http_request_duration_seconds", &labels),
        };
        handles.record(seconds);
        self.by_route
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(route.into())
            .or_default()
            .insert(key, handles);
    }
}

fn is_standard(method: &Method) -> bool {
    [
        Method::GET,
        Method::POST,
        Method::PUT,
        Method::DELETE,
        Method::HEAD,
        Method::OPTIONS,
        Method::PATCH,
        Method::CONNECT,
        Method::TRACE,
    ]
    .contains(method)
}

#[cfg(test)]
mod tests {
    use super::truncated;

    #[test]
    fn attributes_are_cut_on_character_boundaries() {
        assert_eq!(truncated("abc", 5), "abc");
        assert_eq!(truncated("abcdef", 3), "abc");
        assert_eq!(truncated("ééé", 2), "éé");
        assert_eq!(truncated(&"x".repeat(10_000), 256).len(), 256);
    }
}

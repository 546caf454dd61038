//! The one layer around every route ([`RequestLayer`]), outermost first:
//!
//! 1. observation: a server span per request (continuing the caller's W3C
//!    trace), request metrics by route and status, the `traceparent`
//!    response header;
//! 2. admission (only when [`Access`] does anything; see [`crate::admission`]);
//! 3. the per-request deadline (`HTTP_REQUEST_TIMEOUT_MS`): a request not
//!    answered within it gets 503 `request_timeout` (its work is dropped; a
//!    database call already sent still runs to its end, see feature-store's
//!    `CallLimiter`).
//!
//! One hand-written layer rather than three `from_fn` middlewares: each of
//! those cloned the route's boxed service and boxed a future per request; this
//! one boxes one future, and clones the route only when admission has to wait.
//!
//! The fast path ([`crate::fast_path`]) answers reads of one customer's
//! document before the router with the same pieces: [`request_span`],
//! [`within`] and [`observe`].

use crate::admission;
use crate::error::ApiError;
use access::Access;
use axum::extract::{ConnectInfo, MatchedPath, Request};
use axum::http::{HeaderMap, HeaderValue, Method};
use axum::response::{IntoResponse, Response};
use futures::future::BoxFuture;
use metrics::{Counter, Histogram};
use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, PoisonError, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tower::{Layer, Service};
use tracing::Instrument;

/// Observation, admission and the deadline for every route.
#[derive(Clone)]
pub struct RequestLayer {
    shared: Arc<Shared>,
}

struct Shared {
    metrics: Arc<RequestMetrics>,
    /// `None` in open mode (no credentials, no limits): requests then skip
    /// admission altogether.
    access: Option<Arc<Access>>,
    deadline: Duration,
}

impl RequestLayer {
    /// `metrics` is shared with the fast path ([`crate::fast_path`]).
    pub fn new(access: Arc<Access>, deadline: Duration, metrics: Arc<RequestMetrics>) -> Self {
        let access = (!access.is_open()).then_some(access);
        Self {
            shared: Arc::new(Shared {
                metrics,
                access,
                deadline,
            }),
        }
    }
}

impl<S> Layer<S> for RequestLayer {
    type Service = RequestService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RequestService {
            inner,
            shared: Arc::clone(&self.shared),
        }
    }
}

/// A route wrapped by [`RequestLayer`].
#[derive(Clone)]
pub struct RequestService<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S> Service<Request> for RequestService<S>
where
    S: Service<Request, Response = Response, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = Response;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Response, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request) -> Self::Future {
        let started = Instant::now();
        let shared = Arc::clone(&self.shared);
        let method = request.method().clone();
        let route = request.extensions().get::<MatchedPath>().cloned();
        let span = request_span(
            &method,
            route.as_ref().map(MatchedPath::as_str),
            request.uri().path(),
            request.headers(),
        );
        let deadline = shared.deadline;
        let work = match &shared.access {
            // The inner service is ready (`poll_ready` above): calling it now
            // spares a clone of it.
            None => Work::Admitted(self.inner.call(request)),
            Some(access) => {
                // Admission may wait (a JWT's keys): the ready service goes
                // with the request, a clone stays for the next one.
                let clone = self.inner.clone();
                let inner = std::mem::replace(&mut self.inner, clone);
                Work::Admit(Arc::clone(access), inner, request)
            }
        };
        Box::pin(async move {
            let served = async {
                match work {
                    Work::Admitted(future) => within(deadline, future).await,
                    Work::Admit(access, mut inner, request) => {
                        let route = route.as_ref().map(MatchedPath::as_str);
                        let client = client_ip(&request);
                        let (method, headers) = (request.method(), request.headers());
                        let verdict =
                            admission::admit(&access, route, method, headers, client).await;
                        match verdict {
                            // Held until the response is produced.
                            Ok(_permit) => within(deadline, inner.call(request)).await,
                            Err(refusal) => refusal,
                        }
                    }
                }
            };
            let mut response = served.instrument(span.clone()).await;
            let route = route.as_ref().map(MatchedPath::as_str);
            observe(
                &mut response,
                &span,
                &shared.metrics,
                &method,
                route,
                started,
            );
            Ok(response)
        })
    }
}

/// What every answer goes out with: its status in the request's span, the
/// span's `traceparent` header, and the request metrics.
pub fn observe(
    response: &mut Response,
    span: &tracing::Span,
    metrics: &RequestMetrics,
    method: &Method,
    route: Option<&str>,
    started: Instant,
) {
    let status = response.status().as_u16();
    span.record("http.response.status_code", status);
    if let Some(traceparent) = telemetry::propagation::traceparent_of(span)
        && let Ok(value) = HeaderValue::from_str(&traceparent)
    {
        response.headers_mut().insert("traceparent", value);
    }
    let route = route.unwrap_or(UNMATCHED);
    metrics.record(method, route, status, started.elapsed().as_secs_f64());
}

/// What a request still has to go through. It lives in the request's one
/// boxed future, which is as large as its largest state anyway: boxing the
/// request here would only add an allocation.
#[allow(clippy::large_enum_variant)]
enum Work<F, S> {
    /// Open mode: the route's future, already made.
    Admitted(F),
    /// Admission first, then the route.
    Admit(Arc<Access>, S, Request),
}

/// The route's answer, or 503 once the deadline passed.
pub async fn within<F>(deadline: Duration, future: F) -> Response
where
    F: Future<Output = Result<Response, Infallible>>,
{
    match tokio::time::timeout(deadline, future).await {
        Ok(Ok(response)) => response,
        Ok(Err(never)) => match never {},
        Err(_) => ApiError::RequestTimeout(deadline).into_response(),
    }
}

/// The server span of one request to `route` (`None`: no route matched),
/// continuing the caller's trace from `headers`. What the client chose goes
/// into it bounded: the method as one of the standard ones or `_OTHER` (as
/// OpenTelemetry's conventions say), the path cut to a length.
pub fn request_span(
    method: &Method,
    route: Option<&str>,
    path: &str,
    headers: &HeaderMap,
) -> tracing::Span {
    let route = route.unwrap_or(UNMATCHED);
    let method_label = if is_standard(method) {
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
        url.path = truncated(path, MAX_ATTRIBUTE_CHARS),
        http.response.status_code = tracing::field::Empty,
    );
    telemetry::propagation::continue_from_headers(&span, headers);
    span
}

/// The client's address, as the serving loop records it.
fn client_ip(request: &Request) -> Option<std::net::IpAddr> {
    request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|info| info.0.ip())
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
    pub fn record(&self, method: &Method, route: &str, status: u16, seconds: f64) {
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

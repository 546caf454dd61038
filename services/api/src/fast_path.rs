//! `GET /api/features/{customer_id}/`, the service's hot path, answered
//! before the router.
//!
//! Through the router a read also paid for routing, the path's extraction,
//! the request layer's and the handler's boxed futures and the request
//! layer's deadline timer: together more than a near-cache hit and the HTTP
//! exchange themselves (BENCHMARKS.md, "The document route before the
//! router"). [`FastPath::answer`] looks at each request's method and path
//! first and answers a read of one customer's document itself, with what
//! the router would answer: the same admission ([`admission::admit_now`]),
//! the same answer ([`features::document_answer`]: near cache, Redis,
//! MongoDB, 404), within the same deadline, with the same server span and
//! request metrics ([`middleware::observe`]). A near hit is answered at
//! once, without a future; its trace is the server span and the near-cache
//! lookup's span.
//!
//! Everything else goes to the router unchanged: other methods and routes,
//! an id the router would have to decode, and a read whose admission cannot
//! be decided without waiting (a JWT naming a key not loaded yet); nothing
//! was taken or charged for those.

use crate::admission;
use crate::middleware::{self, RequestMetrics};
use crate::routes::features;
use access::Access;
use axum::http::{HeaderMap, Method, Uri};
use axum::response::{IntoResponse, Response};
use feature_cache::TieredStore;
use feature_store::CustomerId;
use futures::future::BoxFuture;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::Instrument;

/// Answers reads of one customer's document (see the module).
pub struct FastPath {
    tiers: TieredStore,
    /// `None` in open mode (no credentials, no limits).
    access: Option<Arc<Access>>,
    metrics: Arc<RequestMetrics>,
    /// `HTTP_REQUEST_TIMEOUT_MS`, as the request layer applies it.
    deadline: Duration,
}

/// What [`FastPath::answer`] did with a request.
pub enum Answer {
    /// Answered at once: send this.
    Served(Response),
    /// Being answered: send what this gives.
    Later(BoxFuture<'static, Response>),
    /// Not taken: the router answers it.
    Router,
}

impl FastPath {
    pub fn new(
        tiers: TieredStore,
        access: Arc<Access>,
        metrics: Arc<RequestMetrics>,
        deadline: Duration,
    ) -> Self {
        let access = (!access.is_open()).then_some(access);
        Self {
            tiers,
            access,
            metrics,
            deadline,
        }
    }

    /// A request's answer if it is a `GET` of one customer's document (from
    /// `client`); [`Answer::Router`] otherwise.
    pub fn answer(
        &self,
        method: &Method,
        uri: &Uri,
        headers: &HeaderMap,
        client: IpAddr,
    ) -> Answer {
        if method != Method::GET {
            return Answer::Router;
        }
        let Some((id, route)) = features::document_route(uri.path()) else {
            return Answer::Router;
        };
        let started = Instant::now();
        let span = middleware::request_span(method, Some(route), uri.path(), headers);
        let permit = match &self.access {
            None => None,
            Some(access) => {
                let admitted = span.in_scope(|| {
                    admission::admit_now(access, Some(route), method, headers, Some(client))
                });
                match admitted {
                    // Admission would wait: the router's layer admits it.
                    None => return Answer::Router,
                    Some(Err(mut refusal)) => {
                        middleware::observe(
                            &mut refusal,
                            &span,
                            &self.metrics,
                            method,
                            Some(route),
                            started,
                        );
                        return Answer::Served(refusal);
                    }
                    Some(Ok(permit)) => permit,
                }
            }
        };
        if let Some(document) = span.in_scope(|| self.tiers.near_hit(id)) {
            let mut response = features::served_response(&document, "local");
            // Held until the response is produced.
            drop(permit);
            middleware::observe(
                &mut response,
                &span,
                &self.metrics,
                method,
                Some(route),
                started,
            );
            return Answer::Served(response);
        }
        // `document_route` checked the id already.
        let Ok(id) = CustomerId::parse(id) else {
            return Answer::Router;
        };
        let tiers = self.tiers.clone();
        let metrics = Arc::clone(&self.metrics);
        let deadline = self.deadline;
        Answer::Later(Box::pin(async move {
            let answer = async { Ok(features::document_answer(&tiers, id).await.into_response()) };
            let mut response = middleware::within(deadline, answer)
                .instrument(span.clone())
                .await;
            drop(permit);
            middleware::observe(
                &mut response,
                &span,
                &metrics,
                &Method::GET,
                Some(route),
                started,
            );
            response
        }))
    }
}

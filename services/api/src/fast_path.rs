//! Near-cache hits answered before the router.
//!
//! `GET /api/features/{customer_id}/` answered by the near cache is the
//! service's hot path. Through the router it also paid for routing, the
//! path's extraction, the request layer's boxed future and deadline timer
//! and the handler's own future: together more than the near cache and the
//! HTTP exchange themselves (BENCHMARKS.md, "The hit path before the
//! router"). [`FastPath::answer`] looks at each request's method and path
//! first and answers a near hit at once with what the router would answer:
//! the same body and headers ([`features::served_response`]), admission
//! ([`admission::admit_now`]), server span and request metrics
//! ([`middleware::observe`]). Its trace is the server span and the
//! near-cache lookup's span (no handler span between them).
//!
//! Everything else goes to the router unchanged: other methods and routes,
//! an id the router would have to decode, a miss, and admission that cannot
//! decide without waiting (a JWT's keys). What was already done for such a
//! request (its span, its admission) goes with it ([`Prepared`]), so that
//! nothing is done twice: a rate limit is charged once per request.

use crate::admission;
use crate::middleware::{self, Prepared, RequestMetrics};
use crate::routes::features;
use access::Access;
use axum::http::{HeaderMap, Method, Uri};
use axum::response::Response;
use feature_cache::TieredStore;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

/// Answers near-cache hits of one customer's document (see the module).
pub struct FastPath {
    tiers: TieredStore,
    /// `None` in open mode (no credentials, no limits).
    access: Option<Arc<Access>>,
    metrics: Arc<RequestMetrics>,
}

/// What [`FastPath::answer`] did with a request.
pub enum Answer {
    /// Answered: send this.
    Served(Response),
    /// For the router, with what was done for it already (if anything):
    /// put into the request's extensions.
    Router(Option<Prepared>),
}

impl FastPath {
    /// `None` without a near cache: there is nothing to answer from.
    pub fn new(
        tiers: TieredStore,
        access: Arc<Access>,
        metrics: Arc<RequestMetrics>,
    ) -> Option<Self> {
        tiers.near()?;
        let access = (!access.is_open()).then_some(access);
        Some(Self {
            tiers,
            access,
            metrics,
        })
    }

    /// A request's answer if it is a near hit of `GET` on one customer's
    /// document (from `client`), or what the router needs to go on.
    pub fn answer(
        &self,
        method: &Method,
        uri: &Uri,
        headers: &HeaderMap,
        client: IpAddr,
    ) -> Answer {
        if method != Method::GET {
            return Answer::Router(None);
        }
        let Some((id, route)) = features::document_route(uri.path()) else {
            return Answer::Router(None);
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
                    // Admission would wait: the router's layer admits it
                    // (nothing was taken or charged yet).
                    None => return Answer::Router(None),
                    Some(Err(mut refusal)) => {
                        let metrics = &self.metrics;
                        middleware::observe(
                            &mut refusal,
                            &span,
                            metrics,
                            method,
                            Some(route),
                            started,
                        );
                        return Answer::Served(refusal);
                    }
                    Some(Ok(permit)) => permit.map(Arc::new),
                }
            }
        };
        match span.in_scope(|| self.tiers.near_hit(id)) {
            Some(document) => {
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
                Answer::Served(response)
            }
            None => Answer::Router(Some(Prepared {
                span,
                started,
                permit,
            })),
        }
    }
}

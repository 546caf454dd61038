//! Admission control on every request: load shedding, authentication, the
//! route's scope, the principal's rate limit, in that order — each step is
//! cheaper than the next, and what a refused request costs stays small.
//! The decisions are the `access` crate's; this module maps routes to
//! scopes and refusals to [`ApiError`]s; [`crate::middleware::RequestLayer`]
//! runs it.
//!
//! Health, probes and the documentation pages stay open (and are never shed
//! or limited: an orchestrator must see a busy replica as alive). A route
//! this table does not name needs `admin`, so a new endpoint is closed until
//! it is classified.

use crate::error::ApiError;
use access::{Access, Denial, Scope};
use axum::http::{HeaderMap, Method};
use axum::response::{IntoResponse, Response};
use std::net::IpAddr;
use tokio::sync::OwnedSemaphorePermit;

/// What a route needs: nothing (open) or one scope.
pub fn required_scope(method: &Method, route: Option<&str>) -> Option<Scope> {
    let Some(route) = route else {
        // No route matched: a 404 that serves nothing.
        return None;
    };
    let route = route.strip_suffix('/').unwrap_or(route);
    match route {
        "/api/health" | "/livez" | "/readyz" | "/api-docs/openapi.json" => None,
        _ if route.starts_with("/swagger") || route.starts_with("/redoc") => None,
        "/api/features/batch" => Some(Scope::FeaturesRead),
        "/api/features" | "/api/features/bulk" | "/api/features/{customer_id}/delete" => {
            Some(Scope::FeaturesWrite)
        }
        "/api/features/{customer_id}" => Some(if is_read(method) {
            Scope::FeaturesRead
        } else {
            Scope::FeaturesWrite
        }),
        _ => Some(Scope::Admin),
    }
}

fn is_read(method: &Method) -> bool {
    method == Method::GET || method == Method::HEAD
}

/// Admission of one request to `route`: `Ok` with its place under
/// `MAX_CONCURRENT_REQUESTS` (to hold until the response is produced), or
/// the refusal to answer with.
pub async fn admit(
    access: &Access,
    route: Option<&str>,
    method: &Method,
    headers: &HeaderMap,
    client: Option<IpAddr>,
) -> Result<Option<OwnedSemaphorePermit>, Response> {
    let Some(scope) = required_scope(method, route) else {
        return Ok(None);
    };
    let permit = access
        .try_enter()
        .map_err(|access::Overloaded| ApiError::Overloaded.into_response())?;
    let principal = access.authenticate(headers).await;
    match decide(access, principal, scope, route, client) {
        Ok(()) => Ok(permit),
        Err(refusal) => Err(refusal.into_response()),
    }
}

/// [`admit`]'s verdict when it needs no waiting (see
/// [`Access::authenticate_now`]); `None`, with nothing kept or charged,
/// when it would wait.
pub fn admit_now(
    access: &Access,
    route: Option<&str>,
    method: &Method,
    headers: &HeaderMap,
    client: Option<IpAddr>,
) -> Option<Result<Option<OwnedSemaphorePermit>, Response>> {
    let Some(scope) = required_scope(method, route) else {
        return Some(Ok(None));
    };
    // In `admit`'s order: shedding before authentication (a place taken
    // here is given back if authentication would wait).
    let permit = match access.try_enter() {
        Ok(permit) => permit,
        Err(access::Overloaded) => return Some(Err(ApiError::Overloaded.into_response())),
    };
    let principal = access.authenticate_now(headers)?;
    Some(
        decide(access, principal, scope, route, client)
            .map(|()| permit)
            .map_err(IntoResponse::into_response),
    )
}

/// The rest of admission once the caller is known (or refused): the
/// scope, then the principal's rate limit.
fn decide(
    access: &Access,
    principal: Result<access::Principal, Denial>,
    scope: Scope,
    route: Option<&str>,
    client: Option<IpAddr>,
) -> Result<(), ApiError> {
    let principal = match principal {
        Ok(principal) => principal,
        Err(denial) => {
            // Failed attempts count against the client's address, so that
            // guessing costs a rate-limited request each.
            if let Err(secs) = access.check_rate(&access::RateKey::Ip(
                client.unwrap_or(std::net::Ipv4Addr::UNSPECIFIED.into()),
            )) {
                return Err(ApiError::RateLimited(secs));
            }
            denial.count();
            tracing::debug!(
                reason = denial.reason(),
                route = route.unwrap_or_default(),
                "request denied"
            );
            return Err(ApiError::Unauthorized(denial));
        }
    };
    if !principal.scopes.contains(scope) {
        let denial = Denial::Scope(scope);
        denial.count();
        tracing::debug!(reason = denial.reason(), principal = principal.name(), scope = %scope, "request denied");
        return Err(ApiError::Forbidden(scope));
    }
    if let Err(secs) = access.check_rate(&principal.rate_key(client)) {
        return Err(ApiError::RateLimited(secs));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_need_their_scope() {
        let get = Method::GET;
        let post = Method::POST;
        let delete = Method::DELETE;
        let cases = [
            (
                &get,
                Some("/api/features/{customer_id}/"),
                Some(Scope::FeaturesRead),
            ),
            (
                &get,
                Some("/api/features/{customer_id}"),
                Some(Scope::FeaturesRead),
            ),
            (
                &delete,
                Some("/api/features/{customer_id}/"),
                Some(Scope::FeaturesWrite),
            ),
            (
                &Method::PUT,
                Some("/api/features/{customer_id}/"),
                Some(Scope::FeaturesWrite),
            ),
            (
                &delete,
                Some("/api/features/{customer_id}/delete/"),
                Some(Scope::FeaturesWrite),
            ),
            (&post, Some("/api/features/"), Some(Scope::FeaturesWrite)),
            (
                &post,
                Some("/api/features/bulk"),
                Some(Scope::FeaturesWrite),
            ),
            (
                &post,
                Some("/api/features/batch/"),
                Some(Scope::FeaturesRead),
            ),
            (&get, Some("/metrics"), Some(Scope::Admin)),
            (&get, Some("/api/info/"), Some(Scope::Admin)),
            (&get, Some("/api/some-new-endpoint"), Some(Scope::Admin)),
            (&get, Some("/admin/keys/{customer_id}/"), Some(Scope::Admin)),
            (&get, Some("/admin/keys/{customer_id}"), Some(Scope::Admin)),
            (
                &post,
                Some("/admin/keys/{customer_id}/evict/"),
                Some(Scope::Admin),
            ),
            (&get, Some("/admin/replicas"), Some(Scope::Admin)),
            (&get, Some("/api/health/"), None),
            (&get, Some("/livez"), None),
            (&get, Some("/readyz"), None),
            (&get, Some("/swagger/{*rest}"), None),
            (&get, Some("/redoc"), None),
            (&get, Some("/api-docs/openapi.json"), None),
            (&get, None, None),
        ];
        for (method, route, scope) in cases {
            assert_eq!(required_scope(method, route), scope, "{method} {route:?}");
        }
    }
}

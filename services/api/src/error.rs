use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use feature_store::StoreError;
use feature_store::codec::Unstorable;
use serde::Serialize;
use thiserror::Error;

/// One problem with one field of the input.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }

    /// A value that cannot be stored exactly, named by its path
    /// (`features.a[0]`).
    pub fn unstorable(err: &Unstorable) -> Self {
        Self::new(err.path.to_string(), err.problem.to_string())
    }
}

/// The JSON body of every error.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ErrorBody {
    pub error: String,
    pub code: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub details: Option<Vec<FieldError>>,
}

/// What a 503 asks clients to wait before retrying, in seconds. What is
/// behind a 503 (an election, a broken connection, an overloaded database)
/// mostly passes within seconds, and the store has already retried a failed
/// write once: a client that comes back soon learns cheaply whether it is
/// over.
const RETRY_AFTER_SECS: &str = "1";

/// Every way a request can fail, each with its status and machine code.
#[derive(Debug, Error)]
pub enum ApiError {
    #[error("Features not found for customer_id: {0}")]
    NotFound(String),
    #[error("invalid customer_id {0:?}: must be 1-128 characters of [A-Za-z0-9_.:-]")]
    InvalidCustomerId(String),
    #[error("request validation failed")]
    Validation(Vec<FieldError>),
    #[error("malformed JSON: {0}")]
    MalformedJson(String),
    #[error("request body must be JSON (Content-Type: application/json)")]
    UnsupportedMediaType,
    #[error("request body is larger than {0} bytes")]
    PayloadTooLarge(usize),
    #[error("method not allowed")]
    MethodNotAllowed,
    /// A write's `features` beyond `MAX_DOCUMENT_BYTES`.
    #[error("features are {size} bytes of JSON, more than MAX_DOCUMENT_BYTES ({limit})")]
    DocumentTooLarge { size: usize, limit: usize },
    /// A batch whose documents pass `MAX_BATCH_RESPONSE_BYTES`.
    #[error(
        "the documents asked for pass MAX_BATCH_RESPONSE_BYTES ({0} bytes); ask for fewer ids per batch"
    )]
    BatchTooLarge(usize),
    /// Not answered within `HTTP_REQUEST_TIMEOUT_MS`.
    #[error("request not answered within HTTP_REQUEST_TIMEOUT_MS ({} ms)", .0.as_millis())]
    RequestTimeout(std::time::Duration),
    #[error("no route for {0}")]
    RouteNotFound(String),
    #[error("concurrent writes to the same customer kept conflicting; retry")]
    Conflict,
    /// MongoDB was needed and could not answer.
    #[error("database unavailable")]
    Unavailable(#[source] StoreError),
    /// Anything else the store reported; logged with its causes, never
    /// shown to the client beyond "internal error".
    #[error("internal error")]
    Internal(#[source] StoreError),
    /// No credentials, or credentials that are not valid.
    #[error("{}", unauthorized_message(*.0))]
    Unauthorized(access::Denial),
    /// Valid credentials without the scope the route needs.
    #[error("this route needs scope {0}")]
    Forbidden(access::Scope),
    /// The principal is over `RATE_LIMIT_PER_SECOND`; retry after the seconds given.
    #[error("rate limit exceeded; retry in {0} s")]
    RateLimited(u64),
    /// The service is at `MAX_CONCURRENT_REQUESTS`.
    #[error("the service is at its limit of concurrent requests; retry")]
    Overloaded,
    /// Redis was needed (the admin routes) and could not answer.
    #[error("Redis unavailable")]
    RedisUnavailable(#[source] Box<dyn std::error::Error + Send + Sync>),
}

fn unauthorized_message(denial: access::Denial) -> &'static str {
    match denial {
        access::Denial::Missing => {
            "credentials required: Authorization: Bearer <key or token>, or X-API-Key"
        }
        access::Denial::Expired => "the token has expired",
        access::Denial::Invalid | access::Denial::Scope(_) => "invalid credentials",
    }
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            Self::NotFound(_) | Self::RouteNotFound(_) => StatusCode::NOT_FOUND,
            Self::InvalidCustomerId(_) | Self::Validation(_) | Self::MalformedJson(_) => {
                StatusCode::BAD_REQUEST
            }
            Self::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::PayloadTooLarge(_) | Self::DocumentTooLarge { .. } => {
                StatusCode::PAYLOAD_TOO_LARGE
            }
            Self::BatchTooLarge(_) => StatusCode::BAD_REQUEST,
            Self::RequestTimeout(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::Conflict => StatusCode::CONFLICT,
            Self::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            Self::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Self::Forbidden(_) => StatusCode::FORBIDDEN,
            Self::RateLimited(_) => StatusCode::TOO_MANY_REQUESTS,
            Self::Overloaded | Self::RedisUnavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            Self::NotFound(_) => "not_found",
            Self::InvalidCustomerId(_) => "invalid_customer_id",
            Self::Validation(_) => "validation_error",
            Self::MalformedJson(_) => "malformed_json",
            Self::UnsupportedMediaType => "unsupported_media_type",
            Self::PayloadTooLarge(_) => "payload_too_large",
            Self::DocumentTooLarge { .. } => "document_too_large",
            Self::BatchTooLarge(_) => "batch_response_too_large",
            Self::RequestTimeout(_) => "request_timeout",
            Self::MethodNotAllowed => "method_not_allowed",
            Self::RouteNotFound(_) => "route_not_found",
            Self::Conflict => "conflict",
            Self::Unavailable(_) => "service_unavailable",
            Self::Internal(_) => "internal_error",
            Self::Unauthorized(_) => "unauthorized",
            Self::Forbidden(_) => "forbidden",
            Self::RateLimited(_) => "rate_limited",
            Self::Overloaded => "overloaded",
            Self::RedisUnavailable(_) => "redis_unavailable",
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(err: StoreError) -> Self {
        match err {
            StoreError::Conflict => Self::Conflict,
            StoreError::Unstorable(err) => Self::Validation(vec![FieldError::unstorable(&err)]),
            err if err.is_unavailable() => Self::Unavailable(err),
            err => Self::Internal(err),
        }
    }
}

impl From<fleet::FleetError> for ApiError {
    fn from(err: fleet::FleetError) -> Self {
        match err {
            fleet::FleetError::InvalidCustomerId(id) => Self::InvalidCustomerId(id),
            err @ fleet::FleetError::Redis(_) => Self::RedisUnavailable(Box::new(err)),
        }
    }
}

impl From<feature_cache::TierError> for ApiError {
    fn from(err: feature_cache::TierError) -> Self {
        Self::RedisUnavailable(Box::new(err))
    }
}

impl ApiError {
    /// The message the client reads: the error itself, and for an outage
    /// what the store said (never the driver's details: addresses, hosts).
    fn public_message(&self) -> String {
        match self {
            Self::Unavailable(cause) => format!("{self}: {cause}"),
            _ => self.to_string(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        match &self {
            Self::Internal(_) => {
                tracing::error!(error = %telemetry::ErrorChain(&self), "request failed");
            }
            // The store logs an outage when it starts and when it ends; one
            // warning per request would bury both under load.
            _ if status.is_server_error() => {
                tracing::debug!(error = %telemetry::ErrorChain(&self), "request failed");
            }
            _ => {}
        }
        let details = match &self {
            Self::Validation(details) => Some(details.clone()),
            _ => None,
        };
        let body = ErrorBody {
            error: self.public_message(),
            code: self.code(),
            details,
        };
        let mut response = (status, Json(body)).into_response();
        let headers = response.headers_mut();
        match &self {
            Self::Unavailable(_)
            | Self::RequestTimeout(_)
            | Self::Overloaded
            | Self::RedisUnavailable(_) => {
                headers.insert(
                    header::RETRY_AFTER,
                    HeaderValue::from_static(RETRY_AFTER_SECS),
                );
            }
            Self::RateLimited(secs) => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from(*secs));
            }
            // RFC 6750: the scheme to use, and what was wrong with the token.
            Self::Unauthorized(denial) => {
                let challenge = match denial {
                    access::Denial::Missing => "Bearer realm=\"cache-api\"",
                    access::Denial::Expired => {
                        "Bearer realm=\"cache-api\", error=\"invalid_token\", error_description=\"expired\""
                    }
                    _ => "Bearer realm=\"cache-api\", error=\"invalid_token\"",
                };
                headers.insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static(challenge),
                );
            }
            Self::Forbidden(scope) => {
                if let Ok(challenge) = HeaderValue::from_str(&format!(
                    "Bearer realm=\"cache-api\", error=\"insufficient_scope\", scope=\"{scope}\""
                )) {
                    headers.insert(header::WWW_AUTHENTICATE, challenge);
                }
            }
            _ => {}
        }
        response
    }
}

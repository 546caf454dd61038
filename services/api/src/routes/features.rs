use super::both;
use crate::error::{ApiError, FieldError};
use crate::extract::{ApiJson, CustomerIdPath};
use crate::state::AppState;
use axum::Router;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use feature_cache::{CachedDocument, TieredStore, WriteOutcome};
use feature_store::codec;
use feature_store::{CustomerId, FeatureDocument, FeatureWrite};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use utoipa::ToSchema;

/// Most items in one bulk write or batch read.
pub const MAX_ITEMS: usize = 1000;

/// Ids a batch read looks up at a time (see `PIPELINE_CHUNK` in feature-cache).
const BATCH_CHUNK: usize = feature_cache::redis_tier::PIPELINE_CHUNK;

pub(super) fn routes(router: Router<AppState>, max_body_bytes: usize) -> Router<AppState> {
    // Only the routes that read a body carry the limit: the hit path stays
    // free of it.
    let limit = DefaultBodyLimit::max(max_body_bytes);
    let router = both(router, "/api/features/", post(create_features).layer(limit));
    let router = both(
        router,
        &format!("/api/features/{BULK}/"),
        post(bulk_create).layer(limit),
    );
    let router = both(
        router,
        &format!("/api/features/{BATCH}/"),
        post(batch_get).layer(limit),
    );
    let router = both(
        router,
        "/api/features/{customer_id}/delete/",
        delete(delete_features),
    );
    both(
        router,
        DOCUMENT_ROUTE,
        get(get_features).delete(delete_features),
    )
}

/// The one-segment routes under `/api/features/` that are not a customer's:
/// the router matches them before `{customer_id}`.
const BULK: &str = "bulk";
const BATCH: &str = "batch";

/// The route of one customer's document, as the router registers and names
/// it (its `MatchedPath`, the `route` label of the request metrics), with
/// and without the trailing slash.
pub const DOCUMENT_ROUTE: &str = "/api/features/{customer_id}/";
pub const DOCUMENT_ROUTE_BARE: &str = "/api/features/{customer_id}";

/// The customer id in `path` and the route it matches, when `path` is the
/// route of one customer's document with an id that needs no decoding;
/// `None` otherwise (another route, or an id the router must decode and
/// check itself).
pub fn document_route(path: &str) -> Option<(&str, &'static str)> {
    let rest = path.strip_prefix("/api/features/")?;
    let (id, route) = match rest.strip_suffix('/') {
        Some(id) => (id, DOCUMENT_ROUTE),
        None => (rest, DOCUMENT_ROUTE_BARE),
    };
    // Valid ids hold no `/` and no `%`.
    (CustomerId::is_valid(id) && id != BULK && id != BATCH).then_some((id, route))
}

/// The answer with one customer's document, served by the tier `source`
/// (its name also goes into the body and the `x-cache-source` header).
pub fn served_response(document: &CachedDocument, source: &'static str) -> Response {
    (
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            ),
            (
                header::HeaderName::from_static("x-cache-source"),
                HeaderValue::from_static(source),
            ),
        ],
        document.body_with_source(source),
    )
        .into_response()
}

/// Body of `POST /api/features/`.
#[derive(Debug, Deserialize, ToSchema)]
pub struct CreateFeatures {
    #[schema(example = "CUST00001")]
    pub customer_id: String,
    /// Kept as sent: what parsing would change silently (integers beyond
    /// 64 bits, repeated keys) is checked on the text.
    #[schema(value_type = Object)]
    pub features: Box<RawValue>,
    #[schema(example = "v1.0.0")]
    pub model_version: Option<String>,
    /// 1–30, default 7.
    pub ttl_days: Option<i64>,
}

/// A document as served: the stored fields plus the tier that answered.
#[derive(Debug, Serialize, ToSchema)]
pub struct ServedDocument {
    #[serde(flatten)]
    pub document: FeatureDocument,
    /// `local`, `redis` or `mongodb`.
    pub source: String,
}

#[utoipa::path(
    get, path = "/api/features/{customer_id}/", tag = "features",
    params(("customer_id" = String, Path, description = "1–128 characters of [A-Za-z0-9_.:-]")),
    responses(
        (status = 200, description = "The document; `source` and header `x-cache-source` name the tier", body = ServedDocument),
        (status = 400, body = crate::error::ErrorBody), (status = 404, body = crate::error::ErrorBody),
        (status = 503, description = "Not cached and MongoDB unavailable", body = crate::error::ErrorBody)
    )
)]
pub async fn get_features(
    State(state): State<AppState>,
    id: CustomerIdPath,
) -> Result<Response, ApiError> {
    document_answer(&state.tiers, id.0).await
}

/// The answer to `GET` of one customer's document: from the nearest tier
/// that has it, or 404. Also what the fast path answers with
/// ([`crate::fast_path`]).
#[tracing::instrument(name = "get_features", skip_all, fields(customer_id = %id, cache.tier = tracing::field::Empty))]
pub async fn document_answer(tiers: &TieredStore, id: CustomerId) -> Result<Response, ApiError> {
    let Some(lookup) = tiers.get(&id).await? else {
        return Err(ApiError::NotFound(id.to_string()));
    };
    let source = lookup.source.as_str();
    tracing::Span::current().record("cache.tier", source);
    Ok(served_response(&lookup.document, source))
}

#[utoipa::path(
    post, path = "/api/features/", tag = "features", request_body = CreateFeatures,
    responses(
        (status = 201, description = "Created", body = FeatureDocument),
        (status = 200, description = "Updated", body = FeatureDocument),
        (status = 400, body = crate::error::ErrorBody), (status = 413, body = crate::error::ErrorBody),
        (status = 415, body = crate::error::ErrorBody), (status = 503, body = crate::error::ErrorBody)
    )
)]
// The customer id goes into the span only once validated: the client's
// text is neither trusted nor bounded before.
#[tracing::instrument(skip_all, fields(customer_id = tracing::field::Empty))]
pub async fn create_features(
    State(state): State<AppState>,
    ApiJson(body): ApiJson<CreateFeatures>,
) -> Result<Response, ApiError> {
    let limit = state.settings.max_document_bytes;
    let size = body.features.get().len();
    if size > limit {
        return Err(ApiError::DocumentTooLarge { size, limit });
    }
    let options = WriteOptions::validate(
        body.model_version.as_deref(),
        body.ttl_days,
        state.settings.max_document_bytes,
    )
    .map_err(ApiError::Validation)?;
    let write =
        validate_item(&body.customer_id, &body.features, &options).map_err(ApiError::Validation)?;
    tracing::Span::current().record("customer_id", write.customer_id.as_str());
    let WriteOutcome { document, created } = state.tiers.upsert(&write).await?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok(document_response(status, &document))
}

#[utoipa::path(
    delete, path = "/api/features/{customer_id}/", tag = "features",
    params(("customer_id" = String, Path)),
    responses((status = 204, description = "Deleted"), (status = 404, body = crate::error::ErrorBody),
              (status = 400, body = crate::error::ErrorBody), (status = 503, body = crate::error::ErrorBody))
)]
#[tracing::instrument(skip_all, fields(customer_id = %id.0))]
pub async fn delete_features(
    State(state): State<AppState>,
    id: CustomerIdPath,
) -> Result<StatusCode, ApiError> {
    let CustomerIdPath(id) = id;
    if state.tiers.delete(&id).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::NotFound(id.to_string()))
    }
}

/// One item of a bulk write.
#[derive(Debug, Deserialize, ToSchema)]
pub struct BulkItem {
    pub customer_id: Value,
    #[schema(value_type = Object)]
    pub features: Box<RawValue>,
}

/// Body of `POST /api/features/bulk/`.
#[derive(Debug, Deserialize, ToSchema)]
pub struct BulkCreate {
    pub features_list: Vec<BulkItem>,
    pub model_version: Option<String>,
    pub ttl_days: Option<i64>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct BulkItemResult {
    pub customer_id: Value,
    /// `created`, `updated` or `failed`.
    pub status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct BulkResponse {
    pub success: usize,
    pub failed: usize,
    pub message: &'static str,
    pub results: Vec<BulkItemResult>,
}

#[utoipa::path(
    post, path = "/api/features/bulk/", tag = "features", request_body = BulkCreate,
    responses((status = 201, body = BulkResponse), (status = 400, body = crate::error::ErrorBody),
              (status = 503, body = crate::error::ErrorBody))
)]
#[tracing::instrument(skip_all, fields(count = body.features_list.len()))]
pub async fn bulk_create(
    State(state): State<AppState>,
    ApiJson(body): ApiJson<BulkCreate>,
) -> Result<Response, ApiError> {
    if body.features_list.len() > MAX_ITEMS {
        return Err(ApiError::Validation(vec![FieldError::new(
            "features_list",
            format!(
                "at most {MAX_ITEMS} items, got {}",
                body.features_list.len()
            ),
        )]));
    }
    let options = WriteOptions::validate(
        body.model_version.as_deref(),
        body.ttl_days,
        state.settings.max_document_bytes,
    )
    .map_err(ApiError::Validation)?;

    // Each item is validated alone; the valid ones go to MongoDB together.
    let mut results: Vec<Option<BulkItemResult>> = Vec::with_capacity(body.features_list.len());
    let mut writes = Vec::new();
    let mut write_slots = Vec::new();
    for (index, item) in body.features_list.iter().enumerate() {
        let id = item.customer_id.as_str().unwrap_or_default();
        match validate_item(id, &item.features, &options) {
            Ok(write) => {
                writes.push(write);
                write_slots.push(index);
                results.push(None);
            }
            Err(details) => results.push(Some(BulkItemResult {
                customer_id: item.customer_id.clone(),
                status: "failed",
                version: None,
                error: Some(
                    details
                        .into_iter()
                        .map(|d| format!("{}: {}", d.field, d.message))
                        .collect::<Vec<_>>()
                        .join("; "),
                ),
            })),
        }
    }
    let outcomes = state.tiers.upsert_many(&writes).await?;
    for ((slot, write), outcome) in write_slots.into_iter().zip(&writes).zip(outcomes) {
        results[slot] = Some(match outcome {
            Ok(outcome) => BulkItemResult {
                customer_id: Value::String(write.customer_id.to_string()),
                status: if outcome.created {
                    "created"
                } else {
                    "updated"
                },
                version: Some(outcome.document.version()),
                error: None,
            },
            Err(err) => BulkItemResult {
                customer_id: Value::String(write.customer_id.to_string()),
                status: "failed",
                version: None,
                error: Some(err.to_string()),
            },
        });
    }
    let results: Vec<BulkItemResult> = results.into_iter().flatten().collect();
    let failed = results.iter().filter(|r| r.status == "failed").count();
    let response = BulkResponse {
        success: results.len() - failed,
        failed,
        message: "Bulk operation completed",
        results,
    };
    Ok((StatusCode::CREATED, axum::Json(response)).into_response())
}

/// Body of `POST /api/features/batch/`.
#[derive(Debug, Deserialize, ToSchema)]
pub struct BatchGet {
    pub customer_ids: Vec<String>,
}

/// `found` maps each id to its document; `missing` lists the ids found nowhere.
#[derive(Debug, ToSchema)]
pub struct BatchResponse {
    #[schema(value_type = Object)]
    pub found: BTreeMap<String, CachedDocument>,
    pub missing: Vec<String>,
}

impl IntoResponse for BatchResponse {
    /// Written rather than derived: each document goes in as its tier holds
    /// it (checked as JSON when it entered the tier), where serde would have
    /// to parse every one again to embed it.
    fn into_response(self) -> Response {
        let documents: usize = self.found.values().map(|d| d.json_bytes().len()).sum();
        let mut body =
            Vec::with_capacity(documents + 160 * (self.found.len() + self.missing.len()));
        body.extend_from_slice(b"{\"found\":{");
        for (index, (id, document)) in self.found.iter().enumerate() {
            if index > 0 {
                body.push(b',');
            }
            push_json(&mut body, id);
            body.push(b':');
            body.extend_from_slice(document.json_bytes());
        }
        body.extend_from_slice(b"},\"missing\":");
        push_json(&mut body, &self.missing);
        body.push(b'}');
        (
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            )],
            body,
        )
            .into_response()
    }
}

/// Appends `value` as JSON: strings and lists of them, which cannot fail
/// to serialize into memory.
fn push_json<T: Serialize + ?Sized>(body: &mut Vec<u8>, value: &T) {
    let _ = serde_json::to_writer(body, value);
}

#[utoipa::path(
    post, path = "/api/features/batch/", tag = "features", request_body = BatchGet,
    responses((status = 200, body = BatchResponse), (status = 400, body = crate::error::ErrorBody),
              (status = 503, body = crate::error::ErrorBody))
)]
#[tracing::instrument(skip_all, fields(count = body.customer_ids.len()))]
pub async fn batch_get(
    State(state): State<AppState>,
    ApiJson(body): ApiJson<BatchGet>,
) -> Result<Response, ApiError> {
    if body.customer_ids.len() > MAX_ITEMS {
        return Err(ApiError::Validation(vec![FieldError::new(
            "customer_ids",
            format!("at most {MAX_ITEMS} ids, got {}", body.customer_ids.len()),
        )]));
    }
    let mut ids = Vec::with_capacity(body.customer_ids.len());
    let mut invalid = Vec::new();
    for (index, raw) in body.customer_ids.iter().enumerate() {
        match CustomerId::parse(raw) {
            Ok(id) => ids.push(id),
            Err(err) => invalid.push(FieldError::new(
                format!("customer_ids[{index}]"),
                err.to_string(),
            )),
        }
    }
    if !invalid.is_empty() {
        return Err(ApiError::Validation(invalid));
    }
    let limit = state.settings.max_batch_response_bytes;
    let mut seen = std::collections::HashSet::with_capacity(ids.len());
    ids.retain(|id| seen.insert(id.to_string()));
    let mut response = BatchResponse {
        found: BTreeMap::new(),
        missing: Vec::new(),
    };
    // A chunk at a time, so that a batch over the bound is refused after
    // reading at most one chunk past it, never holding more.
    let mut bytes = 0usize;
    for chunk in ids.chunks(BATCH_CHUNK) {
        let (found, missing) = state.tiers.get_many(chunk).await?;
        for lookup in found {
            bytes = bytes.saturating_add(lookup.document.json_bytes().len());
            if bytes > limit {
                return Err(ApiError::BatchTooLarge(limit));
            }
            response
                .found
                .insert(lookup.document.customer_id().to_owned(), lookup.document);
        }
        response
            .missing
            .extend(missing.into_iter().map(|id| id.to_string()));
    }
    Ok(response.into_response())
}

fn document_response(status: StatusCode, document: &CachedDocument) -> Response {
    (
        status,
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        document.json().to_owned(),
    )
        .into_response()
}

/// Options shared by every item of a write.
struct WriteOptions {
    model_version: String,
    ttl_days: u32,
    /// `MAX_DOCUMENT_BYTES`: the largest `features` JSON taken.
    max_document_bytes: usize,
}

impl WriteOptions {
    /// The longest `model_version`, in characters.
    const MODEL_VERSION_CHARS: usize = 128;

    fn validate(
        model_version: Option<&str>,
        ttl_days: Option<i64>,
        max_document_bytes: usize,
    ) -> Result<Self, Vec<FieldError>> {
        let mut errors = Vec::new();
        let model_version = model_version.unwrap_or(FeatureWrite::DEFAULT_MODEL_VERSION);
        if model_version.trim().is_empty()
            || model_version.chars().count() > Self::MODEL_VERSION_CHARS
            || model_version.chars().any(char::is_control)
        {
            errors.push(FieldError::new(
                "model_version",
                "must be 1-128 characters, not only spaces, without control characters",
            ));
        }
        let ttl_days = ttl_days.unwrap_or(i64::from(FeatureWrite::DEFAULT_TTL_DAYS));
        let range = FeatureWrite::TTL_DAYS_RANGE;
        let ttl_days = match u32::try_from(ttl_days) {
            Ok(days) if range.contains(&days) => days,
            _ => {
                errors.push(FieldError::new(
                    "ttl_days",
                    format!(
                        "must be an integer from {} to {}",
                        range.start(),
                        range.end()
                    ),
                ));
                0
            }
        };
        if errors.is_empty() {
            Ok(Self {
                model_version: model_version.to_owned(),
                ttl_days,
                max_document_bytes,
            })
        } else {
            Err(errors)
        }
    }
}

/// Validates one customer's write, down to every value of its features:
/// one that cannot be stored exactly is refused here, before the write
/// touches any tier (the store checks again before sending).
fn validate_item(
    customer_id: &str,
    features: &RawValue,
    options: &WriteOptions,
) -> Result<FeatureWrite, Vec<FieldError>> {
    let mut errors = Vec::new();
    if features.get().len() > options.max_document_bytes {
        let too_large = ApiError::DocumentTooLarge {
            size: features.get().len(),
            limit: options.max_document_bytes,
        };
        return Err(vec![FieldError::new("features", too_large.to_string())]);
    }
    let id = CustomerId::parse(customer_id)
        .map_err(|err| errors.push(FieldError::new("customer_id", err.to_string())))
        .ok();
    let features = parse_features(features)
        .map_err(|err| errors.push(err))
        .ok();
    let (Some(customer_id), Some(features)) = (id, features) else {
        return Err(errors);
    };
    let write = FeatureWrite {
        customer_id,
        features,
        model_version: options.model_version.clone(),
        ttl_days: options.ttl_days,
        traceparent: telemetry::propagation::current_traceparent(),
    };
    codec::check_write(&write).map_err(|err| vec![FieldError::unstorable(&err)])?;
    Ok(write)
}

/// The features object as sent, or why it cannot be taken exactly.
fn parse_features(raw: &RawValue) -> Result<Map<String, Value>, FieldError> {
    let text = raw.get().trim_start();
    if !text.starts_with('{') {
        return Err(FieldError::new("features", "must be a JSON object"));
    }
    codec::check_features_json(text).map_err(|err| FieldError::unstorable(&err))?;
    serde_json::from_str(text).map_err(|err| FieldError::new("features", err.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn document_routes_are_recognized_as_the_router_registers_them() {
        assert_eq!(DOCUMENT_ROUTE.trim_end_matches('/'), DOCUMENT_ROUTE_BARE);
        let cases = [
            ("/api/features/C1/", Some(("C1", DOCUMENT_ROUTE))),
            ("/api/features/C1", Some(("C1", DOCUMENT_ROUTE_BARE))),
            (
                "/api/features/a.b:c-d_e/",
                Some(("a.b:c-d_e", DOCUMENT_ROUTE)),
            ),
            // The router's own routes, and ids it must decode or refuse.
            ("/api/features/bulk/", None),
            ("/api/features/batch", None),
            ("/api/features/", None),
            ("/api/features", None),
            ("/api/features//", None),
            ("/api/features/C1//", None),
            ("/api/features/C1/delete/", None),
            ("/api/features/%43%31/", None),
            ("/api/features/C%201/", None),
            ("/api/Features/C1/", None),
            ("/api/features/é/", None),
        ];
        for (path, expected) in cases {
            assert_eq!(document_route(path), expected, "{path}");
        }
        let longest = format!("/api/features/{}/", "x".repeat(CustomerId::MAX_LEN));
        assert!(document_route(&longest).is_some());
        let too_long = format!("/api/features/{}/", "x".repeat(CustomerId::MAX_LEN + 1));
        assert_eq!(document_route(&too_long), None);
    }
}

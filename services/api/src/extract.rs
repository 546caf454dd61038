use crate::error::{ApiError, FieldError};
use crate::state::AppState;
use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::StatusCode;
use axum::http::request::Parts;
use feature_store::CustomerId;
use serde::de::DeserializeOwned;

/// A JSON body whose every rejection is an [`ApiError`]: malformed JSON 400,
/// wrong shape 400 with details, wrong content type 415, too large 413.
pub struct ApiJson<T>(pub T);

impl<T> FromRequest<AppState> for ApiJson<T>
where
    T: DeserializeOwned,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, Self::Rejection> {
        let limit = state.settings.max_body_bytes;
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(value)) => Ok(Self(value)),
            Err(rejection) => Err(match rejection {
                JsonRejection::MissingJsonContentType(_) => ApiError::UnsupportedMediaType,
                JsonRejection::JsonSyntaxError(err) => ApiError::MalformedJson(err.body_text()),
                JsonRejection::JsonDataError(err) => ApiError::Validation(vec![FieldError::new(
                    "body",
                    err.body_text()
                        .trim_start_matches(
                            "Failed to deserialize the JSON body into the target type: ",
                        )
                        .to_owned(),
                )]),
                other if other.status() == StatusCode::PAYLOAD_TOO_LARGE => {
                    ApiError::PayloadTooLarge(limit)
                }
                other => ApiError::MalformedJson(other.body_text()),
            }),
        }
    }
}

/// A `{customer_id}` path segment, validated (400 when invalid).
pub struct CustomerIdPath(pub CustomerId);

impl<S: Send + Sync> FromRequestParts<S> for CustomerIdPath {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let axum::extract::Path(raw) =
            axum::extract::Path::<String>::from_request_parts(parts, state)
                .await
                .map_err(|err| ApiError::InvalidCustomerId(err.body_text()))?;
        CustomerId::parse(&raw)
            .map(Self)
            .map_err(|_| ApiError::InvalidCustomerId(raw))
    }
}

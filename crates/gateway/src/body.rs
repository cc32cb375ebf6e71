//! Request bodies: JSON parsed strictly, refused with our error format.

use axum::body::Bytes;
use axum::extract::{FromRequest, Request as HttpRequest};
use axum::http::StatusCode;
use harbor_api::ErrorCode;
use serde::de::DeserializeOwned;

use crate::error::ApiError;

/// A JSON body parsed strictly: unknown fields, wrong types, malformed JSON
/// and oversized bodies are all refused with our error format.
pub(crate) struct JsonBody<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: HttpRequest, state: &S) -> Result<Self, ApiError> {
        let bytes = Bytes::from_request(req, state).await.map_err(|e| {
            if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    ErrorCode::BodyTooLarge,
                    "the request body is over the size limit",
                )
            } else {
                ApiError::bad_request(ErrorCode::InvalidBody, e.body_text())
            }
        })?;
        parse_json(&bytes).map(JsonBody)
    }
}

pub(crate) fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(bytes).map_err(|e| {
        use serde_json::error::Category;
        match e.classify() {
            Category::Syntax | Category::Eof | Category::Io => ApiError::bad_request(
                ErrorCode::InvalidJson,
                format!("the body is not valid JSON: {e}"),
            ),
            Category::Data => ApiError::unprocessable(ErrorCode::InvalidRequest, e.to_string()),
        }
    })
}

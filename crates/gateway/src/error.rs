use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use harbor_api::ErrorCode;
use harbor_reservation::Rejection;
use harbor_wire::NodeError;
use serde_json::{json, Map, Value};

/// An error answer: `{"error": CODE, "message": TEXT, "retryable": BOOL, ...}`.
#[derive(Clone, Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: ErrorCode,
    pub message: String,
    pub retryable: bool,
    /// Extra machine-readable fields merged into the body.
    pub details: Map<String, Value>,
    pub retry_after_ms: Option<u64>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: ErrorCode, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
            retryable: false,
            details: Map::new(),
            retry_after_ms: None,
        }
    }

    pub fn bad_request(code: ErrorCode, message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, code, message)
    }

    pub fn unprocessable(code: ErrorCode, message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, code, message)
    }

    pub fn not_found(code: ErrorCode, message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, code, message)
    }

    pub fn with(mut self, key: &str, value: impl serde::Serialize) -> ApiError {
        self.details
            .insert(key.to_string(), serde_json::to_value(value).unwrap());
        self
    }

    /// A state-machine rejection: its code, its message and its fields.
    pub fn rejection(rejection: &Rejection) -> ApiError {
        let status = match rejection {
            Rejection::InsufficientExposure { .. }
            | Rejection::TokenAbandoned { .. }
            | Rejection::InvalidTransition { .. }
            | Rejection::HoldExpired { .. }
            | Rejection::HomeRegionMismatch { .. }
            | Rejection::LimitBelowReserved { .. } => StatusCode::CONFLICT,
            Rejection::TokenPayloadMismatch { .. }
            | Rejection::InvalidAmount { .. }
            | Rejection::InvalidField { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            Rejection::UnknownIssuer { .. } | Rejection::UnknownReservation { .. } => {
                StatusCode::NOT_FOUND
            }
            // Gateways follow a moved bucket; one that ends a call here
            // waited out the move (retryable, nothing changed).
            Rejection::Moved { .. } => StatusCode::SERVICE_UNAVAILABLE,
        };
        let mut error = ApiError::new(status, rejection.error_code(), rejection.to_string());
        error.retryable = matches!(rejection, Rejection::Moved { .. });
        // Externally tagged: {"insufficient_exposure": {...fields}}.
        if let Ok(Value::Object(tagged)) = serde_json::to_value(rejection) {
            if let Some(Value::Object(fields)) = tagged.into_iter().next().map(|(_, v)| v) {
                error.details.extend(fields);
            }
        }
        error
    }

    /// A node's refusal (not leader, over the RPO budget, timeout, ...).
    pub fn node(e: &NodeError) -> ApiError {
        let status = match e.code() {
            ErrorCode::Timeout => StatusCode::GATEWAY_TIMEOUT,
            ErrorCode::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            _ => StatusCode::SERVICE_UNAVAILABLE,
        };
        let mut error = ApiError::new(status, e.code(), e.message.clone());
        error.retryable = e.retryable();
        error.retry_after_ms = e.retry_after_ms();
        error
            .details
            .insert("outcome_unknown".into(), json!(e.outcome_unknown));
        if e.outcome_unknown {
            error.message.push_str(
                ". The outcome is unknown: retry with the same reservation_token, or ask GET /v1/reservation-tokens/{token}?issuer_id=... and POST .../resolve",
            );
        }
        error
    }
}

impl ApiError {
    /// The body of the error answer.
    pub fn body(&self) -> harbor_api::ErrorBody {
        let mut details = self.details.clone();
        for named in ["error", "message", "retryable"] {
            details.remove(named);
        }
        harbor_api::ErrorBody {
            error: self.code.to_string(),
            message: self.message.clone(),
            retryable: self.retryable,
            details,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, axum::Json(self.body())).into_response();
        if let Some(ms) = self.retry_after_ms {
            let seconds = ms.div_ceil(1000).max(1);
            response.headers_mut().insert(
                header::RETRY_AFTER,
                HeaderValue::from_str(&seconds.to_string()).unwrap(),
            );
        }
        response
    }
}

use std::fmt;
use std::time::Duration;

use serde_json::{Map, Value};

/// An error answer of the gateway: `{"error": CODE, "message": TEXT,
/// "retryable": BOOL, ...details}`.
#[derive(Clone, Debug, PartialEq)]
pub struct ApiError {
    /// The HTTP status.
    pub status: u16,
    /// The machine-readable code, such as `insufficient_exposure`.
    pub code: String,
    pub message: String,
    /// The same request may succeed later (the client already retried it
    /// while its deadline allowed).
    pub retryable: bool,
    /// A write that may or may not have taken effect.
    pub outcome_unknown: bool,
    /// From the `Retry-After` header.
    pub retry_after: Option<Duration>,
    /// Every other field of the answer (`remaining`, `field`, `region`, ...).
    pub details: Map<String, Value>,
}

impl ApiError {
    /// The code as a known [`harbor_api::ErrorCode`]; `None` for a code this
    /// client does not know (a newer gateway's).
    pub fn error_code(&self) -> Option<harbor_api::ErrorCode> {
        self.code.parse().ok()
    }

    /// A field of the answer.
    pub fn detail(&self, key: &str) -> Option<&Value> {
        self.details.get(key)
    }

    /// The issuer's headroom (on `insufficient_exposure` and other rejections
    /// of a reserve).
    pub fn remaining(&self) -> Option<u64> {
        self.detail("remaining").and_then(Value::as_u64)
    }

    /// The amount asked for (on `insufficient_exposure`).
    pub fn requested(&self) -> Option<u64> {
        self.detail("requested").and_then(Value::as_u64)
    }

    /// The request field at fault (on `invalid_field`, `invalid_amount`, ...).
    pub fn field(&self) -> Option<&str> {
        self.detail("field").and_then(Value::as_str)
    }
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({}): {}", self.code, self.status, self.message)
    }
}

/// Everything a call can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The gateway refused the request for a reason other than the data's
    /// state (bad input, unknown issuer, ...), or a retryable refusal came
    /// back when no time was left to retry it.
    #[error("{0}")]
    Api(ApiError),
    /// The cluster decided against the request given the data's state: every
    /// `409` answer (`insufficient_exposure`, `invalid_transition`,
    /// `hold_expired`, `limit_below_reserved`, ...). For a reserve this is
    /// the token's durable outcome: retrying the token gives the same answer.
    #[error("rejected: {0}")]
    Rejected(ApiError),
    /// The reserve's token was resolved as abandoned: nothing was reserved
    /// and a late copy of the request can never reserve.
    #[error(
        "reservation token {reservation_token} is abandoned: it did not reserve and never will"
    )]
    Abandoned { reservation_token: String },
    /// The gateway could not be reached or the connection broke, and the
    /// call could not go on (see [`Error::DeadlineExceeded`] for retries
    /// that ran out of time).
    #[error("cannot talk to {url}: {message}")]
    Transport { url: String, message: String },
    /// The call's deadline passed before it had a definite answer.
    #[error("{}", deadline_message(.deadline, *.outcome_unknown, .reservation_token.as_deref(), .reservation_id.as_deref(), .last_error.as_deref()))]
    DeadlineExceeded {
        deadline: Duration,
        /// `true`: a write may or may not have taken effect. A reserve only
        /// ends so when resolving its token failed too: look the token up
        /// or resolve it later ([`crate::Client::resolve_token`]). Confirm,
        /// release and issuer writes are idempotent: call them again.
        outcome_unknown: bool,
        /// The reserve's token.
        reservation_token: Option<String>,
        /// The reserve is known to have committed as this reservation, but
        /// there was no time left to read it.
        reservation_id: Option<String>,
        /// The last failure before time ran out.
        last_error: Option<Box<Error>>,
    },
    /// The caller's input breaks the API's rules; nothing was sent.
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// An answer the client could not understand.
    #[error("unexpected answer from the gateway: {0}")]
    Protocol(String),
}

fn deadline_message(
    deadline: &Duration,
    outcome_unknown: bool,
    token: Option<&str>,
    reservation_id: Option<&str>,
    last: Option<&Error>,
) -> String {
    let mut text = format!("no definite answer within the deadline of {deadline:?}");
    if let Some(id) = reservation_id {
        text.push_str(&format!("; the reserve committed as {id}"));
    } else if outcome_unknown {
        text.push_str("; the write may or may not have taken effect");
    }
    if let Some(token) = token {
        text.push_str(&format!(" (reservation token {token})"));
    }
    if let Some(last) = last {
        text.push_str(&format!("; last error: {last}"));
    }
    text
}

impl Error {
    /// The gateway's answer, for `Api` and `Rejected`.
    pub fn api(&self) -> Option<&ApiError> {
        match self {
            Error::Api(e) | Error::Rejected(e) => Some(e),
            _ => None,
        }
    }

    /// The error code of a gateway answer.
    pub fn code(&self) -> Option<&str> {
        self.api().map(|e| e.code.as_str())
    }

    /// Whether a write may have taken effect although the call failed.
    pub fn outcome_unknown(&self) -> bool {
        matches!(
            self,
            Error::DeadlineExceeded {
                outcome_unknown: true,
                ..
            }
        )
    }
}

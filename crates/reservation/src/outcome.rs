use harbor_api::ErrorCode;
use harbor_types::{
    Amount, BucketId, CommitToken, IssuerId, Region, ReservationId, ReservationToken, ShardId,
    Timestamp,
};
use serde::{Deserialize, Serialize};
use std::fmt;

/// The life cycle of a reservation: `held` → `confirmed` | `released` |
/// `expired`, `confirmed` → `released`, or created directly `confirmed`.
/// `held` and `confirmed` count against the issuer's limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Held,
    Confirmed,
    Released,
    Expired,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Held => "held",
            Status::Confirmed => "confirmed",
            Status::Released => "released",
            Status::Expired => "expired",
        }
    }

    /// Whether a reservation in this status counts against the limit.
    pub fn is_open(self) -> bool {
        matches!(self, Status::Held | Status::Confirmed)
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IssuerView {
    pub issuer_id: IssuerId,
    pub home_region: Region,
    pub limit: Amount,
    /// Sum of the amounts of held and confirmed reservations; `<= limit`.
    pub reserved: Amount,
    pub remaining: Amount,
    pub reservations_open: u64,
    /// The last entry that changed `limit` or `reserved`. Always `Some` for a
    /// view read from a [`crate::StateMachine`].
    pub updated: Option<CommitToken>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReservationView {
    pub reservation_id: ReservationId,
    pub issuer_id: IssuerId,
    pub reservation_token: ReservationToken,
    pub amount: Amount,
    pub desk: String,
    pub trader: String,
    pub status: Status,
    /// `Some` exactly while the reservation is held.
    pub expires_at_ms: Option<u64>,
    /// The entry that created the reservation (the commit token the client got).
    pub created: CommitToken,
    pub created_at: Timestamp,
    /// The last entry that changed the reservation.
    pub updated: CommitToken,
    /// The customer it was made for, if the request named one.
    pub customer_id: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenView {
    pub issuer_id: IssuerId,
    pub token: ReservationToken,
    pub outcome: TokenOutcome,
}

/// The durable, final outcome of a reservation token.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TokenOutcome {
    Committed {
        reservation_id: ReservationId,
        commit_token: CommitToken,
    },
    /// `code` is a [`Rejection::code`] for which `is_token_outcome()` holds.
    Rejected {
        code: String,
        commit_token: CommitToken,
    },
    Abandoned {
        commit_token: CommitToken,
    },
}

/// What applying one entry did.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Applied {
    pub outcome: Outcome,
    /// Changes made by this entry, in the order made. Empty when the entry
    /// changed nothing (replays, idempotent repeats, most rejections).
    pub events: Vec<Event>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Issuer {
        issuer: IssuerView,
        created: bool,
        changed: bool,
    },
    /// A reserve, confirm or release. `replayed` is true when the entry
    /// changed nothing and returned an earlier result: a same-token reserve
    /// replay, or a confirm/release of a reservation already in that status.
    Reservation {
        reservation: ReservationView,
        replayed: bool,
    },
    Token(TokenView),
    Expired {
        count: u64,
    },
    Noop,
    Rejected(Rejection),
    /// A batch's outcomes, one per command, in order.
    Batch(Vec<Outcome>),
    /// A bucket command's answer: where the group stands with the bucket
    /// after it, and the issuers it holds in it (staged ones included).
    Bucket {
        bucket: BucketId,
        record: crate::BucketRecord,
        issuers: u64,
    },
}

/// An expected refusal. Only [`Rejection::InsufficientExposure`] is recorded
/// as a token's durable outcome; every other rejection leaves state unchanged
/// except [`Rejection::HoldExpired`], whose entry also expires the hold.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[serde(rename_all = "snake_case")]
pub enum Rejection {
    #[error("issuer {issuer_id} has {remaining} left of its limit; {requested} requested")]
    InsufficientExposure {
        issuer_id: IssuerId,
        requested: Amount,
        remaining: Amount,
    },
    #[error("reservation token {token} was already used with a different request")]
    TokenPayloadMismatch { token: ReservationToken },
    #[error("reservation token {token} was resolved as abandoned and can never commit")]
    TokenAbandoned { token: ReservationToken },
    #[error("unknown issuer {issuer_id}")]
    UnknownIssuer { issuer_id: IssuerId },
    #[error("unknown reservation {reservation_id}")]
    UnknownReservation { reservation_id: ReservationId },
    #[error("cannot {action} reservation {reservation_id}: it is {from}")]
    InvalidTransition {
        reservation_id: ReservationId,
        from: Status,
        action: String,
    },
    #[error("hold {reservation_id} expired at {expires_at_ms} ms")]
    HoldExpired {
        reservation_id: ReservationId,
        expires_at_ms: u64,
    },
    #[error("issuer {issuer_id} is homed in {home_region}; moving an issuer is not supported")]
    HomeRegionMismatch {
        issuer_id: IssuerId,
        home_region: Region,
    },
    #[error("limit {limit} of issuer {issuer_id} is below its reserved {reserved}")]
    LimitBelowReserved {
        issuer_id: IssuerId,
        limit: Amount,
        reserved: Amount,
    },
    #[error("{field} must be within {min}..={max}, got {value}")]
    InvalidAmount {
        field: String,
        value: Amount,
        min: Amount,
        max: Amount,
    },
    #[error("{field} is invalid: {reason}")]
    InvalidField { field: String, reason: String },
    /// The issuer's bucket is sealed in this group (it is moving to
    /// another): nothing changed and no token was decided, so the request
    /// may be sent to the bucket's next owner as it is. A whole batch is
    /// refused when one of its commands is.
    #[error("{bucket} is sealed in this group: it is moving to another")]
    Moved { bucket: BucketId },
}

impl Rejection {
    /// A stable machine-readable code for APIs and metrics.
    pub fn code(&self) -> &'static str {
        self.error_code().as_str()
    }

    pub fn error_code(&self) -> ErrorCode {
        match self {
            Rejection::InsufficientExposure { .. } => ErrorCode::InsufficientExposure,
            Rejection::TokenPayloadMismatch { .. } => ErrorCode::TokenPayloadMismatch,
            Rejection::TokenAbandoned { .. } => ErrorCode::TokenAbandoned,
            Rejection::UnknownIssuer { .. } => ErrorCode::UnknownIssuer,
            Rejection::UnknownReservation { .. } => ErrorCode::UnknownReservation,
            Rejection::InvalidTransition { .. } => ErrorCode::InvalidTransition,
            Rejection::HoldExpired { .. } => ErrorCode::HoldExpired,
            Rejection::HomeRegionMismatch { .. } => ErrorCode::HomeRegionMismatch,
            Rejection::LimitBelowReserved { .. } => ErrorCode::LimitBelowReserved,
            Rejection::InvalidAmount { .. } => ErrorCode::InvalidAmount,
            Rejection::InvalidField { .. } => ErrorCode::InvalidField,
            Rejection::Moved { .. } => ErrorCode::Moved,
        }
    }

    /// Whether this rejection is a token's durable outcome: a replay of the
    /// token gets it again, even after headroom frees up.
    pub fn is_token_outcome(&self) -> bool {
        matches!(self, Rejection::InsufficientExposure { .. })
    }
}

/// One change made by an applied entry: the outbox, and later the CDC stream.
/// Every event carries the entry's position and time.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Event {
    IssuerRegistered {
        position: CommitToken,
        at: Timestamp,
        issuer_id: IssuerId,
        home_region: Region,
        limit: Amount,
    },
    LimitChanged {
        position: CommitToken,
        at: Timestamp,
        issuer_id: IssuerId,
        limit_before: Amount,
        limit: Amount,
    },
    ReservationCreated {
        position: CommitToken,
        at: Timestamp,
        reservation: ReservationView,
    },
    /// A token's durable rejection; `code` as in [`TokenOutcome::Rejected`].
    ReservationRejected {
        position: CommitToken,
        at: Timestamp,
        issuer_id: IssuerId,
        token: ReservationToken,
        code: String,
        requested: Amount,
        remaining: Amount,
    },
    /// `reservation` as it stands after the change.
    ReservationConfirmed {
        position: CommitToken,
        at: Timestamp,
        reservation: ReservationView,
    },
    /// `reservation` as it stands after the change.
    ReservationReleased {
        position: CommitToken,
        at: Timestamp,
        reservation: ReservationView,
    },
    /// `reservation` as it stands after the change.
    ReservationExpired {
        position: CommitToken,
        at: Timestamp,
        reservation: ReservationView,
    },
    TokenAbandoned {
        position: CommitToken,
        at: Timestamp,
        issuer_id: IssuerId,
        token: ReservationToken,
    },
    /// The group took a moved bucket over, with the rows of `issuers` as
    /// group `from` left them; `epoch` counts the bucket's moves.
    BucketAcquired {
        position: CommitToken,
        at: Timestamp,
        bucket: BucketId,
        from: ShardId,
        epoch: u64,
        issuers: Vec<IssuerId>,
    },
    /// The rows of `issuers` left the group: group `to` took the bucket.
    BucketReleased {
        position: CommitToken,
        at: Timestamp,
        bucket: BucketId,
        to: ShardId,
        issuers: Vec<IssuerId>,
    },
}

impl Event {
    /// The issuer the change is about (`None` for a bucket's move, which
    /// names several).
    pub fn issuer(&self) -> Option<&IssuerId> {
        match self {
            Event::IssuerRegistered { issuer_id, .. }
            | Event::LimitChanged { issuer_id, .. }
            | Event::ReservationRejected { issuer_id, .. }
            | Event::TokenAbandoned { issuer_id, .. } => Some(issuer_id),
            Event::ReservationCreated { reservation, .. }
            | Event::ReservationConfirmed { reservation, .. }
            | Event::ReservationReleased { reservation, .. }
            | Event::ReservationExpired { reservation, .. } => Some(&reservation.issuer_id),
            Event::BucketAcquired { .. } | Event::BucketReleased { .. } => None,
        }
    }

    /// The time of the entry that made the change (the leader's HLC).
    pub fn at(&self) -> Timestamp {
        match self {
            Event::IssuerRegistered { at, .. }
            | Event::LimitChanged { at, .. }
            | Event::ReservationCreated { at, .. }
            | Event::ReservationRejected { at, .. }
            | Event::ReservationConfirmed { at, .. }
            | Event::ReservationReleased { at, .. }
            | Event::ReservationExpired { at, .. }
            | Event::TokenAbandoned { at, .. }
            | Event::BucketAcquired { at, .. }
            | Event::BucketReleased { at, .. } => *at,
        }
    }

    pub fn position(&self) -> CommitToken {
        match self {
            Event::IssuerRegistered { position, .. }
            | Event::LimitChanged { position, .. }
            | Event::ReservationCreated { position, .. }
            | Event::ReservationRejected { position, .. }
            | Event::ReservationConfirmed { position, .. }
            | Event::ReservationReleased { position, .. }
            | Event::ReservationExpired { position, .. }
            | Event::TokenAbandoned { position, .. }
            | Event::BucketAcquired { position, .. }
            | Event::BucketReleased { position, .. } => *position,
        }
    }
}

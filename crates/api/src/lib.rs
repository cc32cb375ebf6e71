//! Harbor's HTTP API as types: what a client sends (request bodies), what
//! the gateway answers (reservations, issuers, token outcomes, each stamped
//! with who served it and how fresh it is) and the error body. The gateway
//! writes these types and `harbor-client` reads them, so the contract is
//! written once.
//!
//! Answers tolerate fields they do not know (the gateway adds fields over
//! time) and default the ones an older gateway does not send yet. Request
//! bodies refuse unknown fields: a misspelt field is an error, not a
//! silently ignored one.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A commit position: `shard15@g1:3` is entry 3 of shard 15's generation 1.
/// Of two tokens of one shard, the higher `(generation, index)` is newer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CommitToken {
    pub shard: u32,
    pub generation: u64,
    pub index: u64,
}

impl CommitToken {
    /// Whether `self` is a later position of the same shard than `other`.
    pub fn is_newer_than(&self, other: &CommitToken) -> bool {
        self.shard == other.shard && (self.generation, self.index) > (other.generation, other.index)
    }
}

impl fmt::Display for CommitToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "shard{}@g{}:{}", self.shard, self.generation, self.index)
    }
}

/// A string that is not a commit token.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("a commit token looks like shard15@g1:3, got {0:?}")]
pub struct ParseCommitTokenError(pub String);

impl FromStr for CommitToken {
    type Err = ParseCommitTokenError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let err = || ParseCommitTokenError(text.to_string());
        // Digits only: `parse` alone would also take a leading '+'.
        let number = |s: &str| -> Result<u64, ParseCommitTokenError> {
            if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
                return Err(err());
            }
            s.parse().map_err(|_| err())
        };
        let rest = text.strip_prefix("shard").ok_or_else(err)?;
        let (shard, rest) = rest.split_once("@g").ok_or_else(err)?;
        let (generation, index) = rest.split_once(':').ok_or_else(err)?;
        Ok(CommitToken {
            shard: u32::try_from(number(shard)?).map_err(|_| err())?,
            generation: number(generation)?,
            index: number(index)?,
        })
    }
}

impl Serialize for CommitToken {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for CommitToken {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

// ----- Request bodies ------------------------------------------------------

/// `PUT /v1/issuers/{issuer_id}`: register an issuer or change its limit.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PutIssuer {
    pub home_region: String,
    pub limit: u64,
}

/// `POST /v1/reservations` (and each item of a batch).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Reserve {
    /// The idempotency token: every retry sends the same one.
    pub reservation_token: String,
    pub issuer_id: String,
    pub amount: u64,
    pub desk: String,
    pub trader: String,
    /// A hold that expires unless confirmed; absent or null: confirmed at
    /// once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hold_ttl_ms: Option<u64>,
    /// The customer the reservation is for (the customer view lists a
    /// customer's reservations across issuers). Part of the token's payload.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub customer_id: Option<String>,
}

/// `POST /v1/reservations:batch`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReserveBatch {
    pub reservations: Vec<Reserve>,
}

/// `POST /v1/reservation-tokens/{token}/resolve` (the issuer may instead be
/// given as `?issuer_id=`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResolveToken {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issuer_id: Option<String>,
}

/// `POST /v1/admin/groups/{group}/transfer-leader`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TransferLeader {
    /// The replica to lead next (a member in the group's home region).
    pub to: String,
}

/// `POST /v1/admin/groups/{group}/members`: exactly one of the two.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChangeMembers {
    /// A node to give a replica of the group (a learner until it holds
    /// the log, then a voter).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub add: Option<String>,
    /// A node whose replica leaves the group (not its leader).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remove: Option<String>,
}

/// Confirm, release and a drain take no fields: an empty object (or no
/// body).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Empty {}

// ----- Answers --------------------------------------------------------------

/// A hybrid logical clock time: wall milliseconds, then a counter.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct HlcTime {
    pub wall_ms: u64,
    pub logical: u32,
}

/// How and where an answer was produced. Every answer carries these fields
/// (the items of a list or a batch do not: their answer does); the
/// consistency ones (`consistency`, `fallback`, `staleness_ms`, `stale`)
/// are those of reads.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Served {
    /// The mode the read was served with (`strong`, `session`, ...).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub consistency: Option<String>,
    /// `leader` or `follower` (`gateway` on answers the gateway gave itself).
    pub served_by: String,
    /// A nearby replica could not serve the read, so the leader did.
    pub fallback: bool,
    /// The region and node of the replica that answered.
    pub region: String,
    pub node: String,
    /// The newest entry applied to the state shown.
    pub applied: Option<CommitToken>,
    /// How old the state may be; `None` when the replica knows no bound.
    pub staleness_ms: Option<u64>,
    /// The replica could not promise the requested bound (bounded reads
    /// with `allow_stale`).
    pub stale: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shard: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub generation: Option<u64>,
    /// The region of the gateway the client talked to.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gateway_region: Option<String>,
    /// The caller's session raised by what this answer showed (also in the
    /// `Harbor-Session` header): send it with the next request.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub session: Option<String>,
}

impl Served {
    /// Nothing set: an item of a list, whose answer carries the stamp.
    pub fn is_empty(&self) -> bool {
        *self == Served::default()
    }
}

/// An issuer and its exposure.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Issuer {
    pub issuer_id: String,
    pub home_region: String,
    pub limit: u64,
    /// Held plus confirmed amounts.
    pub reserved: u64,
    pub remaining: u64,
    #[serde(default)]
    pub reservations_open: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bucket: Option<u32>,
    /// The last entry that changed `limit` or `reserved`.
    #[serde(default)]
    pub updated: Option<CommitToken>,
    /// Writes: this call registered the issuer (a retried call whose first
    /// attempt registered it answers `false`). Reads say `false`.
    #[serde(default)]
    pub created: bool,
    /// Writes: this call changed the limit. Reads say `false`.
    #[serde(default)]
    pub changed: bool,
    /// Writes only: the entry that recorded the write.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commit_token: Option<CommitToken>,
    #[serde(flatten)]
    pub served: Served,
}

/// The life cycle of a reservation: `held` → `confirmed` | `released` |
/// `expired`, `confirmed` → `released`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReservationStatus {
    Held,
    Confirmed,
    Released,
    Expired,
    /// A status this client does not know yet.
    #[serde(other)]
    Other,
}

/// A reservation, as a write made it or a read found it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reservation {
    /// `ISSUER:rN`.
    pub reservation_id: String,
    pub issuer_id: String,
    pub reservation_token: String,
    pub amount: u64,
    #[serde(default)]
    pub desk: String,
    #[serde(default)]
    pub trader: String,
    pub status: ReservationStatus,
    /// Set exactly while the reservation is held.
    #[serde(default)]
    pub expires_at_ms: Option<u64>,
    /// The entry that created the reservation.
    #[serde(default)]
    pub created: Option<CommitToken>,
    /// When that entry was ordered (the leader's hybrid logical clock).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_at: Option<HlcTime>,
    /// The last entry that changed it.
    #[serde(default)]
    pub updated: Option<CommitToken>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub customer_id: Option<String>,
    /// Writes: an earlier attempt (or request) with this token or
    /// transition had already done it; this answer repeats its outcome.
    /// Reads say `false`.
    #[serde(default)]
    pub replayed: bool,
    /// Writes: the entry that recorded the answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commit_token: Option<CommitToken>,
    /// Writes: the issuer's headroom after the write.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remaining: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reserved: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<u64>,
    /// Who served the answer; empty on the items of a list.
    #[serde(flatten, skip_serializing_if = "Served::is_empty")]
    pub served: Served,
}

/// An issuer's held and confirmed reservations.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpenReservations {
    pub issuer_id: String,
    #[serde(default)]
    pub count: u64,
    pub reservations: Vec<Reservation>,
    #[serde(flatten)]
    pub served: Served,
}

/// `GET /v1/health`: whether every group has a ready leader. A cluster
/// still starting answers 503 with code `unavailable`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Health {
    /// `ok`, or `starting` (with the fields of an [`ErrorBody`]).
    pub status: String,
    pub groups: u64,
    #[serde(default)]
    pub groups_not_ready: Vec<u32>,
    pub map_version: u64,
    pub region: String,
    pub node: String,
}

/// A finished planned leader transfer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Transfer {
    #[serde(default)]
    pub shard: u32,
    pub from: String,
    pub to: String,
    pub generation: u64,
    /// How long the group took no writes.
    pub pause_ms: u64,
}

/// A finished membership change.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MembersChanged {
    pub group: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub added: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub removed: Option<String>,
    /// The group's voters afterwards.
    pub members: Vec<String>,
    pub members_epoch: u64,
    pub took_ms: u64,
}

/// A fault injected on demand (`harbor dev` only): the fault as understood,
/// and whether it changed anything (crashing a crashed node does not).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FaultDone {
    pub fault: serde_json::Value,
    pub changed: bool,
}

/// The durable outcome of a reservation token.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TokenState {
    /// Nothing is recorded for it yet: a request with it may still commit.
    Unknown,
    /// It reserved `reservation_id`.
    Committed,
    /// It was refused for `reason` (an error code such as
    /// `insufficient_exposure`); it never reserves.
    Rejected,
    /// It was resolved before any request with it committed; it never
    /// reserves.
    Abandoned,
}

/// A token lookup's or resolve's answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenStatus {
    pub reservation_token: String,
    #[serde(default)]
    pub issuer_id: Option<String>,
    pub status: TokenState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reservation_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The entry that recorded the outcome.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commit_token: Option<CommitToken>,
    /// Resolve only: the entry of the resolve itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resolved_at: Option<CommitToken>,
    #[serde(flatten)]
    pub served: Served,
}

// ----- Admin answers ----------------------------------------------------------

/// `GET /v1/admin/cluster`: every node and group as the gateway that
/// assembled it found them (each replica was asked for its status).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterView {
    pub map_version: u64,
    pub regions: Vec<String>,
    pub nodes: Vec<NodeView>,
    pub groups: Vec<GroupView>,
    /// The gateway that assembled the view, and how long it took.
    pub gateway: String,
    pub gathered_ms: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeView {
    pub node: String,
    pub region: String,
    /// `up` when every replica on it answered, `degraded` when some did,
    /// `unreachable` when none did.
    pub health: String,
    pub replicas: u64,
    pub replicas_answering: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupView {
    pub shard: u32,
    pub home_region: String,
    pub leader: String,
    pub generation: u64,
    pub members: Vec<String>,
    /// Replicas being added: sent the log, counted for nothing, not in
    /// `members` until they caught up and were made voters.
    #[serde(default)]
    pub learners: Vec<String>,
    /// Members on their way out: their acks no longer count.
    #[serde(default)]
    pub leaving: Vec<String>,
    /// Bumped on every membership change.
    #[serde(default)]
    pub members_epoch: u64,
    /// Where recent generations' logs ended (newest last).
    pub generation_ends: Vec<GenerationEnd>,
    /// The named leader answered as leader of the published generation and
    /// committed its first entry.
    pub leader_ready: bool,
    pub commit_index: Option<u64>,
    /// Each follower as the leader sees it (empty when the leader does not
    /// answer).
    pub followers: Vec<FollowerView>,
    /// Each member as it sees itself.
    pub replicas: Vec<ReplicaView>,
}

/// Generation `generation` of a group ended with the entry at `last_index`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GenerationEnd {
    pub generation: u64,
    pub last_index: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaView {
    pub node: String,
    pub region: String,
    /// `leader`, `follower`, or `unknown` when it did not answer.
    pub role: String,
    pub answering: bool,
    pub applied: Option<CommitToken>,
    /// How old its state may be (see [`Served::staleness_ms`]); `None` when
    /// it knows no bound or did not answer.
    pub staleness_ms: Option<u64>,
    /// It lost its durable state (a replaced disk) and has not caught up:
    /// it will not lead, and a failover does not count on it.
    #[serde(default)]
    pub recovering: bool,
    /// Estimated bytes of changes it keeps for change feeds.
    #[serde(default)]
    pub changes_retained_bytes: u64,
}

fn yes() -> bool {
    true
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FollowerView {
    pub node: String,
    pub local: bool,
    /// Its acks count (false for a learner or a member leaving).
    #[serde(default = "yes")]
    pub voter: bool,
    pub lag_entries: u64,
    pub lag_ms: u64,
}

/// Every machine-readable code an error answer's `error` field can hold,
/// written once: the gateway answers with these, the node's refusals and
/// the state machine's rejections name theirs from here, and a client
/// matches on them. A client should treat a code it does not know as a
/// refusal of that request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ErrorCode {
    // Request checks: the body, the query, the path.
    InvalidJson,
    InvalidBody,
    BodyTooLarge,
    InvalidQuery,
    InvalidRequest,
    InvalidField,
    InvalidAmount,
    InvalidSession,
    InvalidConsistency,
    InvalidBatch,
    InvalidGroup,
    InvalidCursor,
    CursorExpired,
    NotYetVisible,
    IssuerRequired,
    NotFound,
    UnknownIssuer,
    UnknownReservation,
    UnknownRegion,
    UnknownNode,
    UnknownGroup,
    AmbiguousToken,
    // The state machine's rejections (a token's durable outcome where it says so).
    InsufficientExposure,
    TokenPayloadMismatch,
    TokenAbandoned,
    InvalidTransition,
    HoldExpired,
    HomeRegionMismatch,
    LimitBelowReserved,
    // A node's refusals (most are retryable).
    NotLeader,
    UnknownShard,
    RpoBudgetExceeded,
    Overloaded,
    LeadershipChanged,
    ReplicaFailed,
    TooLarge,
    Timeout,
    Unavailable,
    StaleRoute,
    ReplicaBehind,
    Moved,
    // The cluster and its control plane.
    MetadataUnavailable,
    TransferRefused,
    TransferAbandoned,
    MoveRefused,
    MoveAborted,
    MembersRefused,
    MembersAbandoned,
    UnknownBucket,
    FaultsDisabled,
    RestartFailed,
    Internal,
}

impl ErrorCode {
    pub const ALL: [ErrorCode; 52] = [
        ErrorCode::InvalidJson,
        ErrorCode::InvalidBody,
        ErrorCode::BodyTooLarge,
        ErrorCode::InvalidQuery,
        ErrorCode::InvalidRequest,
        ErrorCode::InvalidField,
        ErrorCode::InvalidAmount,
        ErrorCode::InvalidSession,
        ErrorCode::InvalidConsistency,
        ErrorCode::InvalidBatch,
        ErrorCode::InvalidGroup,
        ErrorCode::InvalidCursor,
        ErrorCode::CursorExpired,
        ErrorCode::NotYetVisible,
        ErrorCode::IssuerRequired,
        ErrorCode::NotFound,
        ErrorCode::UnknownIssuer,
        ErrorCode::UnknownReservation,
        ErrorCode::UnknownRegion,
        ErrorCode::UnknownNode,
        ErrorCode::UnknownGroup,
        ErrorCode::AmbiguousToken,
        ErrorCode::InsufficientExposure,
        ErrorCode::TokenPayloadMismatch,
        ErrorCode::TokenAbandoned,
        ErrorCode::InvalidTransition,
        ErrorCode::HoldExpired,
        ErrorCode::HomeRegionMismatch,
        ErrorCode::LimitBelowReserved,
        ErrorCode::NotLeader,
        ErrorCode::UnknownShard,
        ErrorCode::RpoBudgetExceeded,
        ErrorCode::Overloaded,
        ErrorCode::LeadershipChanged,
        ErrorCode::ReplicaFailed,
        ErrorCode::TooLarge,
        ErrorCode::Timeout,
        ErrorCode::Unavailable,
        ErrorCode::StaleRoute,
        ErrorCode::ReplicaBehind,
        ErrorCode::Moved,
        ErrorCode::MetadataUnavailable,
        ErrorCode::TransferRefused,
        ErrorCode::TransferAbandoned,
        ErrorCode::MoveRefused,
        ErrorCode::MoveAborted,
        ErrorCode::MembersRefused,
        ErrorCode::MembersAbandoned,
        ErrorCode::UnknownBucket,
        ErrorCode::FaultsDisabled,
        ErrorCode::RestartFailed,
        ErrorCode::Internal,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidJson => "invalid_json",
            ErrorCode::InvalidBody => "invalid_body",
            ErrorCode::BodyTooLarge => "body_too_large",
            ErrorCode::InvalidQuery => "invalid_query",
            ErrorCode::InvalidRequest => "invalid_request",
            ErrorCode::InvalidField => "invalid_field",
            ErrorCode::InvalidAmount => "invalid_amount",
            ErrorCode::InvalidSession => "invalid_session",
            ErrorCode::InvalidConsistency => "invalid_consistency",
            ErrorCode::InvalidBatch => "invalid_batch",
            ErrorCode::InvalidGroup => "invalid_group",
            ErrorCode::InvalidCursor => "invalid_cursor",
            ErrorCode::CursorExpired => "cursor_expired",
            ErrorCode::NotYetVisible => "not_yet_visible",
            ErrorCode::IssuerRequired => "issuer_required",
            ErrorCode::NotFound => "not_found",
            ErrorCode::UnknownIssuer => "unknown_issuer",
            ErrorCode::UnknownReservation => "unknown_reservation",
            ErrorCode::UnknownRegion => "unknown_region",
            ErrorCode::UnknownNode => "unknown_node",
            ErrorCode::UnknownGroup => "unknown_group",
            ErrorCode::AmbiguousToken => "ambiguous_token",
            ErrorCode::InsufficientExposure => "insufficient_exposure",
            ErrorCode::TokenPayloadMismatch => "token_payload_mismatch",
            ErrorCode::TokenAbandoned => "token_abandoned",
            ErrorCode::InvalidTransition => "invalid_transition",
            ErrorCode::HoldExpired => "hold_expired",
            ErrorCode::HomeRegionMismatch => "home_region_mismatch",
            ErrorCode::LimitBelowReserved => "limit_below_reserved",
            ErrorCode::NotLeader => "not_leader",
            ErrorCode::UnknownShard => "unknown_shard",
            ErrorCode::RpoBudgetExceeded => "rpo_budget_exceeded",
            ErrorCode::Overloaded => "overloaded",
            ErrorCode::LeadershipChanged => "leadership_changed",
            ErrorCode::ReplicaFailed => "replica_failed",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::Timeout => "timeout",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::StaleRoute => "stale_route",
            ErrorCode::ReplicaBehind => "replica_behind",
            ErrorCode::Moved => "moved",
            ErrorCode::MetadataUnavailable => "metadata_unavailable",
            ErrorCode::TransferRefused => "transfer_refused",
            ErrorCode::TransferAbandoned => "transfer_abandoned",
            ErrorCode::MoveRefused => "move_refused",
            ErrorCode::MoveAborted => "move_aborted",
            ErrorCode::MembersRefused => "members_refused",
            ErrorCode::MembersAbandoned => "members_abandoned",
            ErrorCode::UnknownBucket => "unknown_bucket",
            ErrorCode::FaultsDisabled => "faults_disabled",
            ErrorCode::RestartFailed => "restart_failed",
            ErrorCode::Internal => "internal",
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for ErrorCode {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        ErrorCode::ALL
            .into_iter()
            .find(|c| c.as_str() == text)
            .ok_or_else(|| format!("unknown error code {text:?}"))
    }
}

/// An error answer: `{"error": CODE, "message": TEXT, "retryable": BOOL,
/// ...details}`. The details are the fields the code defines (`remaining`
/// and `requested` for `insufficient_exposure`, `field` for
/// `invalid_field`, `outcome_unknown` for a node's refusal, ...) and who
/// answered (`region`, `node`, `served_by`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// The machine-readable code, such as `insufficient_exposure`.
    pub error: String,
    #[serde(default)]
    pub message: String,
    /// The same request may succeed later.
    #[serde(default)]
    pub retryable: bool,
    #[serde(flatten)]
    pub details: serde_json::Map<String, serde_json::Value>,
}

/// One item of a batch's answer: `ok`, and its reservation or its refusal.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BatchItem {
    pub ok: bool,
    #[serde(flatten)]
    pub outcome: BatchOutcome,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum BatchOutcome {
    Reserved(Box<Reservation>),
    /// With the HTTP status the item would have had alone.
    Refused {
        http_status: u16,
        #[serde(flatten)]
        error: ErrorBody,
    },
}

/// `POST /v1/reservations:batch`: one result per item, in order.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BatchAnswer {
    pub count: u64,
    /// Items that reserved (or replayed a reservation).
    pub reserved: u64,
    pub failed: u64,
    pub results: Vec<BatchItem>,
    #[serde(default)]
    pub gateway_region: Option<String>,
    #[serde(default)]
    pub session: Option<String>,
}

// ----- Change feed ---------------------------------------------------------------

/// One line of `GET /v1/changefeed` (`application/x-ndjson`): a change, or
/// a resolved mark. `cursor` is opaque: `from=CURSOR` continues right
/// after the line that carried it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum FeedLine {
    Change(ChangeLine),
    Resolved(ResolvedLine),
    /// The feed cannot go on (a position expired while it ran): the last
    /// line. Resume from the cursor of the line before it.
    Error(ErrorBody),
}

/// A committed change, in the Debezium envelope's shape: `op`, `source`,
/// `before` and `after` (the fields the change touched; `before` is
/// `null` where the row is new or its earlier state is not part of the
/// change).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ChangeLine {
    pub cursor: String,
    /// `issuer_registered`, `limit_changed`, `reservation_created`,
    /// `reservation_rejected`, `reservation_confirmed`,
    /// `reservation_released`, `reservation_expired`, `token_abandoned`.
    pub op: String,
    pub source: ChangeSource,
    pub key: ChangeKey,
    pub reservation_token: Option<String>,
    pub before: Option<serde_json::Value>,
    pub after: Option<serde_json::Value>,
}

/// Where a change was committed: its group, the generation and index of
/// its log entry, its place (`sub`) among the entry's changes, the group's
/// home region, and the entry's HLC time.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChangeSource {
    pub shard: u32,
    pub generation: u64,
    pub index: u64,
    pub sub: u32,
    pub region: String,
    pub hlc: HlcTime,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChangeKey {
    pub issuer_id: String,
    pub reservation_id: Option<String>,
}

/// Every change with a time at or before `resolved` on the shards of the
/// feed has been sent on this feed before this line.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResolvedLine {
    pub cursor: String,
    pub resolved: HlcTime,
}

/// How complete a projection's answer is. Every answer of a projection
/// (search, reports, the customer view) carries these fields.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProjectionServed {
    /// `projection`.
    pub served_by: String,
    /// The region whose gateway built the projection from its local
    /// replicas.
    pub region: String,
    /// Every change with a time at or before this is in the answer; `null`
    /// while the projection is still being built.
    pub watermark: Option<HlcTime>,
    /// Now minus the watermark; `null` with it.
    pub lag_ms: Option<u64>,
    /// The lag is over `max_lag_ms` (or unknown).
    pub stale: bool,
    /// The endpoint's budget (or the request's own `max_lag_ms`).
    pub max_lag_ms: u64,
}

/// `GET /v1/admin/projections`: where a gateway's projection stands.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProjectionStatus {
    pub projection: String,
    pub region: String,
    pub watermark: Option<HlcTime>,
    pub lag_ms: Option<u64>,
    pub groups: u64,
    /// Groups whose state is being scanned (at start, in a rebuild, or
    /// after their change stream expired).
    pub groups_scanning: u64,
    pub reservations: u64,
    pub issuers: u64,
    pub changes_applied: u64,
    pub rows_scanned: u64,
    pub scans: u64,
    /// It went on at start from the save in the gateway's data directory
    /// (instead of scanning every group).
    #[serde(default)]
    pub loaded_from_save: bool,
    /// The last save since start: its size, the reservations it holds
    /// and how long ago it was written.
    #[serde(default)]
    pub saved_bytes: Option<u64>,
    #[serde(default)]
    pub saved_reservations: Option<u64>,
    #[serde(default)]
    pub saved_ago_ms: Option<u64>,
}

/// `GET /v1/search/reservations`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SearchAnswer {
    /// Newest first.
    pub reservations: Vec<Reservation>,
    /// More match: send it back as `cursor` for the next page.
    pub next_cursor: Option<String>,
    #[serde(flatten)]
    pub served: ProjectionServed,
}

/// `GET /v1/customers/{customer_id}/reservations`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CustomerAnswer {
    pub customer_id: String,
    /// Newest first, across issuers and groups.
    pub reservations: Vec<Reservation>,
    pub next_cursor: Option<String>,
    #[serde(flatten)]
    pub served: ProjectionServed,
}

/// `GET /v1/reports/exposure`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExposureReport {
    pub group_by: String,
    pub lines: Vec<ExposureLine>,
    #[serde(flatten)]
    pub served: ProjectionServed,
}

/// One line of the exposure report: held and confirmed reservations of
/// one desk, home region or issuer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExposureLine {
    pub key: String,
    /// Held plus confirmed.
    pub reserved: u64,
    pub held: u64,
    pub confirmed: u64,
    pub held_count: u64,
    pub confirmed_count: u64,
    /// The issuer's limit (`group_by=issuer`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commit_tokens_parse_print_and_order() {
        let t: CommitToken = "shard15@g1:3".parse().unwrap();
        assert_eq!(
            t,
            CommitToken {
                shard: 15,
                generation: 1,
                index: 3
            }
        );
        assert_eq!(t.to_string(), "shard15@g1:3");
        let later_gen: CommitToken = "shard15@g2:1".parse().unwrap();
        assert!(later_gen.is_newer_than(&t));
        assert!(!t.is_newer_than(&later_gen));
        let other_shard: CommitToken = "shard3@g9:9".parse().unwrap();
        assert!(!other_shard.is_newer_than(&t));
        for bad in [
            "",
            "shard",
            "shard1@g2",
            "shard1@g:3",
            "shard+1@g2:3",
            "s1@g2:3",
            "shard1@g2:3x",
        ] {
            assert!(bad.parse::<CommitToken>().is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn answers_tolerate_unknown_and_missing_fields() {
        let body = serde_json::json!({
            "reservation_id": "MUNI-77:r1", "issuer_id": "MUNI-77", "reservation_token": "t1",
            "amount": 600, "desk": "d", "trader": "t", "status": "confirmed",
            "expires_at_ms": null, "created": "shard15@g1:3", "updated": "shard15@g1:3",
            "created_at": {"wall_ms": 1, "logical": 0}, "replayed": false,
            "commit_token": "shard15@g1:3", "remaining": 400, "region": "newyork",
            "node": "newyork-2", "served_by": "leader", "applied": "shard15@g1:3",
            "staleness_ms": 0, "stale": false, "something_new": [1, 2]
        });
        let r: Reservation = serde_json::from_value(body).unwrap();
        assert_eq!(r.status, ReservationStatus::Confirmed);
        assert_eq!(r.remaining, Some(400));
        assert_eq!(r.served.node, "newyork-2");
        assert_eq!(r.served.staleness_ms, Some(0));
        assert!(!r.served.fallback);
        let s: TokenStatus = serde_json::from_value(serde_json::json!({
            "reservation_token": "t", "status": "abandoned", "commit_token": "shard1@g1:5"
        }))
        .unwrap();
        assert_eq!(s.status, TokenState::Abandoned);
    }

    #[test]
    fn request_bodies_refuse_unknown_fields_and_omit_what_is_unset() {
        let body = Reserve {
            reservation_token: "t1".into(),
            issuer_id: "MUNI-77".into(),
            amount: 5,
            desk: "d".into(),
            trader: "t".into(),
            hold_ttl_ms: None,
            customer_id: None,
        };
        let json = serde_json::to_value(&body).unwrap();
        assert!(json.get("hold_ttl_ms").is_none());
        assert!(json.get("customer_id").is_none());
        assert_eq!(serde_json::from_value::<Reserve>(json).unwrap(), body);
        let misspelt = serde_json::json!({"home_region": "madrid", "limit": 1, "limt": 2});
        assert!(serde_json::from_value::<PutIssuer>(misspelt).is_err());
    }

    #[test]
    fn a_list_item_carries_no_stamp_and_an_answer_its_whole_stamp() {
        let item = Reservation {
            reservation_id: "MUNI-77:r1".into(),
            issuer_id: "MUNI-77".into(),
            reservation_token: "t1".into(),
            amount: 5,
            desk: "d".into(),
            trader: "t".into(),
            status: ReservationStatus::Held,
            expires_at_ms: Some(9),
            created: None,
            created_at: None,
            updated: None,
            customer_id: None,
            replayed: false,
            commit_token: None,
            remaining: None,
            reserved: None,
            limit: None,
            served: Served::default(),
        };
        let json = serde_json::to_value(&item).unwrap();
        for absent in ["served_by", "node", "session", "commit_token", "remaining"] {
            assert!(json.get(absent).is_none(), "{absent} in {json}");
        }
        let answer = Reservation {
            served: Served {
                served_by: "leader".into(),
                node: "madrid-1".into(),
                session: Some("s".into()),
                ..Served::default()
            },
            ..item
        };
        let json = serde_json::to_value(&answer).unwrap();
        assert_eq!(json["served_by"], "leader");
        assert_eq!(json["session"], "s");
        assert_eq!(json["staleness_ms"], serde_json::Value::Null);
        assert_eq!(serde_json::from_value::<Reservation>(json).unwrap(), answer);
    }

    #[test]
    fn batch_items_are_told_apart_by_their_fields() {
        let answer: BatchAnswer = serde_json::from_value(serde_json::json!({
            "count": 2, "reserved": 1, "failed": 1, "gateway_region": "madrid",
            "results": [
                {"ok": true, "reservation_id": "I:r1", "issuer_id": "I", "reservation_token": "t1",
                 "amount": 5, "status": "confirmed", "replayed": false},
                {"ok": false, "http_status": 409, "error": "insufficient_exposure",
                 "message": "m", "retryable": false, "reservation_token": "t2", "remaining": 3}
            ]
        }))
        .unwrap();
        let BatchOutcome::Reserved(reservation) = &answer.results[0].outcome else {
            panic!("{:?}", answer.results[0]);
        };
        assert_eq!(reservation.reservation_id, "I:r1");
        let BatchOutcome::Refused { http_status, error } = &answer.results[1].outcome else {
            panic!("{:?}", answer.results[1]);
        };
        assert_eq!(
            (*http_status, error.error.as_str()),
            (409, "insufficient_exposure")
        );
        assert_eq!(error.details["remaining"], 3);
        assert!(!error.details.contains_key("ok"));
        let again = serde_json::to_value(&answer).unwrap();
        assert_eq!(again["results"][1]["ok"], false);
        assert_eq!(
            serde_json::from_value::<BatchAnswer>(again).unwrap(),
            answer
        );
    }

    #[test]
    fn error_codes_are_distinct_snake_case_and_parse_back() {
        let mut seen = std::collections::BTreeSet::new();
        for code in ErrorCode::ALL {
            let text = code.as_str();
            assert!(seen.insert(text), "{text} twice");
            assert!(
                text.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'),
                "{text}"
            );
            assert_eq!(text.parse::<ErrorCode>(), Ok(code));
        }
        assert!("no_such_code".parse::<ErrorCode>().is_err());
    }
}

//! What travels between nodes and gateways. One envelope type for both
//! replication traffic and client requests, so the simulated WAN delay and
//! every fault apply to both alike.

use harbor_replication::{Message, ReplicaStatus};

use crate::driver::Control;
use harbor_reservation::{Command, IssuerView, Outcome, ReservationView, TokenView};
use harbor_types::{
    CommitToken, Generation, IssuerId, NodeId, ReservationId, ReservationToken, ShardId,
};
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Envelope {
    pub from: NodeId,
    pub to: NodeId,
    pub body: Body,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum Body {
    Replication(Message),
    Request {
        id: u64,
        request: Request,
        /// The generation the sender's shard map names for the request's
        /// group. A replica at a newer one refuses with `stale_route` (the
        /// sender refreshes its map); one at an older one refuses as not
        /// leader. `None` addresses one replica whatever its role (status).
        route: Option<Generation>,
    },
    /// Boxed: responses are large and rare next to replication traffic.
    Response {
        id: u64,
        response: Box<Response>,
    },
    /// The control plane tells one replica its role (no answer: the
    /// control plane sees the effect in the replica's next status).
    Control {
        shard: ShardId,
        control: Control,
    },
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum Request {
    /// Order a command through the group's leader.
    Write { shard: ShardId, command: Command },
    /// Read the leader's applied state.
    Read { shard: ShardId, query: Query },
}

impl Request {
    pub fn shard(&self) -> ShardId {
        match self {
            Request::Write { shard, .. } | Request::Read { shard, .. } => *shard,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum Query {
    Issuer(IssuerId),
    Reservation(ReservationId),
    OpenReservations(IssuerId),
    Token(IssuerId, ReservationToken),
    /// Every issuer's token record for this token (a lookup without issuer).
    TokenAnyIssuer(ReservationToken),
    Status,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum QueryResult {
    Issuer(Option<IssuerView>),
    Reservation(Option<ReservationView>),
    OpenReservations(Option<Vec<ReservationView>>),
    Token(Option<TokenView>),
    Tokens(Vec<TokenView>),
    Status(GroupStatus),
}

/// How and where an answer was produced.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Served {
    pub node: NodeId,
    pub shard: ShardId,
    pub generation: Generation,
    /// The newest entry applied to the state the answer shows.
    pub applied: Option<CommitToken>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum Response {
    Applied {
        outcome: Outcome,
        /// The issuer the command touched, after it applied.
        issuer: Option<IssuerView>,
        commit_token: CommitToken,
        served: Served,
    },
    Read {
        result: QueryResult,
        served: Served,
    },
    Error(NodeError),
}

/// A refusal from a node. `retryable` errors may be retried with the same
/// token; `outcome_unknown` means the write may or may not commit: look the
/// token up (or resolve it) before giving up.
#[derive(Clone, Debug, Serialize, Deserialize, thiserror::Error)]
#[error("{code}: {message}")]
pub struct NodeError {
    pub code: ErrorCode,
    pub message: String,
    pub retryable: bool,
    pub outcome_unknown: bool,
    pub leader_hint: Option<NodeId>,
    /// For `rpo_budget_exceeded` and `overloaded`: when to try again.
    pub retry_after_ms: Option<u64>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
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
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
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
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A replica's view of its group, for health and admin pages.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct GroupStatus {
    pub shard: ShardId,
    pub node: NodeId,
    pub replica: ReplicaStatus,
    /// A leader whose first entry of its generation has committed.
    pub ready: bool,
    pub applied: Option<CommitToken>,
    pub issuers: u64,
}

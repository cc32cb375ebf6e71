//! What travels between nodes and gateways. One envelope type for both
//! replication traffic and client requests, so the simulated WAN delay and
//! every fault apply to both alike.

use harbor_replication::{Member, Message, ReplicaStatus, Role};

use crate::changes::{ChangePosition, ChangesPage, ScanPage};
use crate::error::NodeError;
use harbor_reservation::{
    Command, ExportKey, ExportPage, IssuerView, Outcome, ReservationView, ScanKey, TokenView,
};
use harbor_types::{
    BucketId, CommitToken, Generation, IssuerId, LogIndex, NodeId, ReservationId, ReservationToken,
    ShardId,
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
        /// Where the sender's shard map sent the request. `None` addresses
        /// one replica whatever its role (status).
        route: Option<Route>,
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

/// What a routed request says of the sender's shard map.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Route {
    /// The generation the map names for the request's group. A replica at
    /// a newer one refuses with `stale_route` (the sender refreshes its
    /// map); one at an older one refuses as not leader.
    pub generation: Generation,
    /// The version of the sender's map. Carried for logs and traces: a
    /// group decides by its own log whether it takes a bucket.
    pub map_version: u64,
    /// The bucket the request is for, when it is for one: a group that
    /// sealed it answers `moved` (the sender refreshes its map and sends
    /// the request to the bucket's next owner).
    pub bucket: Option<BucketId>,
}

impl Route {
    pub fn at(generation: Generation) -> Route {
        Route {
            generation,
            map_version: 0,
            bucket: None,
        }
    }
}

/// Orders from the metadata plane (and the node) to one replica.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Control {
    /// Lead this generation (the control plane named it only after the
    /// previous leader's lease ran out).
    Lead(Generation),
    /// Lead this generation of a group that holds nothing anywhere: every
    /// member reported it is recovering with an empty log (a new group,
    /// or one that lost every copy). The only way a replica that started
    /// empty may lead.
    LeadNewGroup(Generation),
    Follow(Generation, NodeId),
    /// A planned transfer: take no writes for `for_ms`.
    Drain {
        for_ms: u64,
    },
    /// Stop accepting appends older than this generation; the leader is
    /// named later (failover).
    Seal(Generation),
    /// The group's members as the metadata plane committed them, at
    /// `epoch` (a learner added, made a voter, a voter on its way out, a
    /// member removed); an epoch no newer than the replica's is ignored.
    /// A node opens an empty replica of a group that names it (once the
    /// map agrees); a replica a newer membership leaves out stops, and its
    /// node deletes its data.
    Members {
        epoch: u64,
        members: Vec<Member>,
    },
    /// From the node itself only; refused from the network.
    Shutdown,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum Request {
    /// Order a command through the group's leader.
    Write { shard: ShardId, command: Command },
    /// Read the leader's applied state; it must hold a lease (strong). A
    /// `Query::Status` is the exception: any replica answers it about
    /// itself, whatever its role (the admin view and the control plane).
    Read { shard: ShardId, query: Query },
    /// Read this replica's applied state, whatever its role, if it is fresh
    /// enough for the caller; else it answers `replica_behind` and the
    /// caller asks the leader. Sent without a route.
    LocalRead {
        shard: ShardId,
        query: Query,
        need: Freshness,
    },
}

impl Request {
    pub fn shard(&self) -> ShardId {
        match self {
            Request::Write { shard, .. }
            | Request::Read { shard, .. }
            | Request::LocalRead { shard, .. } => *shard,
        }
    }

    /// The same request for another group (its bucket moved there).
    pub fn set_shard(&mut self, to: ShardId) {
        match self {
            Request::Write { shard, .. }
            | Request::Read { shard, .. }
            | Request::LocalRead { shard, .. } => *shard = to,
        }
    }
}

/// What a local read needs from the replica that serves it.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Freshness {
    /// It must have applied this entry: the caller's session (read your
    /// writes, monotonic reads) or the dependencies of a causal read.
    pub applied_at_least: Option<LogIndex>,
    /// Its state must be at most this old (bounded staleness); `None`
    /// accepts any age (the answer still says how old).
    pub max_staleness_ms: Option<u64>,
    /// How long it may wait to apply `applied_at_least` (causal reads);
    /// 0 answers at once.
    pub wait_ms: u64,
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
    /// The group's changes after `after`, at most `max` (change feeds).
    Changes {
        after: ChangePosition,
        max: u32,
    },
    /// A page of the group's whole state after `after`, at most `max`
    /// rows (initial scans).
    Scan {
        after: Option<ScanKey>,
        max: u32,
    },
    /// A page of one bucket's rows (written after `since`, if named),
    /// after `after`, at most `max`: what a move copies.
    Export {
        bucket: BucketId,
        since: Option<CommitToken>,
        after: Option<ExportKey>,
        max: u32,
    },
    /// Issuers that do not know their bucket, after `after`, at most
    /// `max`.
    UntaggedIssuers {
        after: Option<IssuerId>,
        max: u32,
    },
    /// The leader's load and its `top` hottest buckets (hot-bucket
    /// detection, the rebalancer).
    BucketLoad {
        top: u32,
    },
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum QueryResult {
    Issuer(Option<IssuerView>),
    Reservation(Option<ReservationView>),
    OpenReservations(Option<Vec<ReservationView>>),
    Token(Option<TokenView>),
    Tokens(Vec<TokenView>),
    Status(GroupStatus),
    Changes(ChangesPage),
    Scan(ScanPage),
    Export(ExportPage),
    Issuers(Vec<IssuerId>),
    BucketLoad(crate::LoadReport),
}

/// How and where an answer was produced.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Served {
    pub node: NodeId,
    pub shard: ShardId,
    pub generation: Generation,
    /// The newest entry applied to the state the answer shows.
    pub applied: Option<CommitToken>,
    pub role: Role,
    /// How far behind the group the state may be: 0 for a leader under a
    /// lease; for a follower, the age of its closed timestamp on its own
    /// clock; `None` when the replica knows no bound.
    pub staleness_ms: Option<u64>,
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

/// A replica's view of its group, for health and admin pages.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct GroupStatus {
    pub shard: ShardId,
    pub node: NodeId,
    pub replica: ReplicaStatus,
    /// A leader whose first entry of its generation has committed.
    pub ready: bool,
    pub applied: Option<CommitToken>,
    /// As in [`Served::staleness_ms`].
    pub staleness_ms: Option<u64>,
    pub issuers: u64,
    /// Estimated bytes of changes kept for change feeds.
    #[serde(default)]
    pub changes_retained_bytes: u64,
    /// The epoch of the membership the replica holds.
    pub members_epoch: u64,
}

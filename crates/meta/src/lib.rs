//! The metadata plane's pure parts: who owns each shard, at which
//! generation.
//!
//! [`placement`] builds topologies and maps issuers to buckets. [`state`] is
//! the metadata state machine (shard map and issuer directory, changed by
//! commands in log order); `harbor-meta-raft` replicates it with Raft.
//! [`failover`] plans each group's leadership, and [`control`] turns the
//! plans into orders, round by round, for the control loop that runs them. [`metadata`] is how gateways
//! and the control plane reach whichever metadata plane runs.

pub mod control;
pub mod drain;
pub mod failover;
pub mod members_driver;
pub mod membership;
pub mod metadata;
pub mod placement;
pub mod state;

pub use control::{
    Ask, ControlConfig, ControlCore, ControlStats, Order, TransferDone, TransferFailed,
};
pub use drain::{next_drain_step, DrainStep};
pub use failover::{
    Action, CatchUp, FailoverConfig, GroupLeadership, Observation, Phase, TransferError,
};
pub use members_driver::{MembersDone, MembersFailed, MembersGoal, StepFailed};
pub use membership::MemberChange;
pub use metadata::{MetaError, MetaFuture, Metadata};
pub use placement::{
    BucketMove, GenerationEnd, GroupInfo, MovePhase, MoveProgress, NodeInfo, ShardMap, Topology,
    BUCKETS_DEFAULT, GENERATION_ENDS_KEPT, RECENT_MOVES_KEPT,
};
pub use state::{DirectoryEntry, DirectoryError, MetaCommand, MetaReply, MetaState};

//! The metadata plane: who owns each shard, at which generation.
//!
//! [`placement`] is pure: it builds topologies and maps issuers to buckets.
//! [`store`] keeps the shard map and the issuer directory durable on local
//! disk. This is the embedded, single-voter form the write-path issue needs;
//! the control-plane issue replaces the store with a Raft state machine
//! without changing what it holds.

pub mod failover;
pub mod placement;
pub mod state;
pub mod store;

pub use failover::{
    Action, CatchUp, FailoverConfig, GroupLeadership, Observation, Phase, TransferError,
};
pub use placement::{GroupInfo, NodeInfo, ShardMap, Topology, BUCKETS_DEFAULT};
pub use state::{MetaCommand, MetaReply, MetaState};
pub use store::{DirectoryEntry, DirectoryError, MetaError, MetaStore};

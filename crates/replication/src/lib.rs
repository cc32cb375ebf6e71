//! The replication core of one replica group, sans IO.
//!
//! A [`Replica`] is a deterministic state machine over its inputs
//! (`propose`, `receive`, `persisted`, `tick`, `become_leader`, ...). Every
//! input whose outcome depends on time takes both clocks from the caller
//! (`Now`; `seal`, `become_follower` and `compact` do not need them) and
//! pushes [`Effect`]s, which the caller drains with [`Replica::drain_effects`] and
//! executes **in order**. There is no IO, no clock and no randomness in here:
//! the node runtime drives it with a real WAL and sockets, the simulator with
//! fake ones.
//!
//! The protocol in one paragraph: the metadata plane names one leader per
//! generation. The leader orders proposals into its log, persists them and
//! streams them to every follower in parallel. An entry commits when it is
//! durable on the leader and on `sync_acks` followers in the home region and
//! it belongs to the leader's own generation (earlier entries commit with it,
//! as in Raft). Remote-region followers receive the same stream but never
//! count towards a commit; their lag gates new writes against the RPO budget.
//! Every message carries the generation; a replica refuses anything older
//! than the newest generation it has made durable.

mod config;
mod message;
mod replica;

pub use config::{Config, ConfigError, Member};
pub use message::{
    AckEcho, Append, AppendAck, Entry, InstallSnapshot, Message, SnapshotAck, SnapshotMeta,
};
pub use replica::{Effect, FollowerStatus, ProposeError, Recovered, Replica, ReplicaStatus, Role};

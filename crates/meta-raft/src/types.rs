//! The Raft type configuration of the metadata plane.

use std::io::Cursor;

use harbor_meta::{MetaCommand, MetaReply};

/// Voters are numbered; each has the address of its HTTP endpoint.
pub type NodeId = u64;

openraft::declare_raft_types!(
    /// Metadata commands in, their replies out; snapshots are JSON bytes.
    pub TypeConfig:
        D = MetaCommand,
        R = MetaReply,
);

pub type Raft = openraft::Raft<TypeConfig>;

use harbor_types::sim::Bugs;
use harbor_types::{NodeId, ShardId};
use serde::{Deserialize, Serialize};

/// One replica of a group as the core sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub node: NodeId,
    /// In the group's home region. Only local followers count towards a
    /// commit; remote ones are the asynchronous disaster-recovery copies.
    pub local: bool,
}

/// Default bytes of a snapshot in one message (see
/// [`Config::snapshot_chunk_bytes_max`]).
pub const SNAPSHOT_CHUNK_BYTES_DEFAULT: usize = 1 << 20;
/// Default payload bytes in one append message.
pub const APPEND_BYTES_DEFAULT: usize = 4 << 20;
/// Default largest payload of one entry.
pub const ENTRY_BYTES_DEFAULT: usize = 1 << 20;
/// Default entries kept in memory for lagging followers.
pub const RETAINED_ENTRIES_DEFAULT: u64 = 1_000_000;

/// Limits and timings of one replica. Every limit of the core lives here.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Config {
    pub shard: ShardId,
    pub me: NodeId,
    /// Local followers that must hold an entry durably before it commits.
    pub sync_acks: usize,
    /// A leader sends at least one message per follower this often.
    pub heartbeat_interval_ms: u64,
    /// Entries sent but unacknowledged for this long are sent again.
    pub retransmit_timeout_ms: u64,
    /// Entries in one append message.
    pub append_entries_max: usize,
    /// Payload bytes in one append message (at least one entry is always sent).
    pub append_bytes_max: usize,
    /// Entries sent to one follower and not yet acknowledged.
    pub inflight_entries_max: u64,
    /// Proposals accepted but not yet committed; beyond it the leader refuses
    /// new ones (backpressure instead of an unbounded queue).
    pub uncommitted_entries_max: u64,
    /// A leader refuses writes while a remote follower's oldest missing entry
    /// is older than this: it bounds what a regional failover can lose.
    pub rpo_budget_ms: u64,
    /// Entries kept in memory for lagging followers beyond the last snapshot;
    /// a follower further behind is sent a snapshot instead.
    pub retained_entries_max: u64,
    /// The largest payload of one entry.
    pub entry_bytes_max: usize,
    /// Bytes of a snapshot in one message: a lagging follower is sent the
    /// state machine in chunks this size, so no message outgrows the
    /// transport's frame limit however large the state is.
    pub snapshot_chunk_bytes_max: usize,
    /// A leader serves strong reads only while `sync_acks` local followers
    /// acknowledged, in this generation, an append it sent less than this
    /// long ago. The control plane waits at least this long (plus a drift
    /// margin) after sealing a generation before it names the next leader.
    pub lease_ms: u64,
    /// Protocol bugs for the simulator to prove its checker; always off
    /// outside it.
    #[serde(skip)]
    pub bugs: Bugs,
}

impl Config {
    pub fn new(shard: ShardId, me: NodeId) -> Config {
        Config {
            shard,
            me,
            sync_acks: 1,
            heartbeat_interval_ms: 50,
            retransmit_timeout_ms: 500,
            append_entries_max: 4096,
            append_bytes_max: APPEND_BYTES_DEFAULT,
            inflight_entries_max: 65_536,
            uncommitted_entries_max: 65_536,
            rpo_budget_ms: 5_000,
            retained_entries_max: RETAINED_ENTRIES_DEFAULT,
            entry_bytes_max: ENTRY_BYTES_DEFAULT,
            snapshot_chunk_bytes_max: SNAPSHOT_CHUNK_BYTES_DEFAULT,
            lease_ms: 2_000,
            bugs: Bugs::none(),
        }
    }

    /// Checks the limits against each other and against the membership.
    pub fn validate(&self, members: &[Member]) -> Result<(), ConfigError> {
        let me = members
            .iter()
            .filter(|m| m.node == self.me)
            .collect::<Vec<_>>();
        if me.len() != 1 {
            return Err(ConfigError::NotAMember {
                node: self.me.to_string(),
            });
        }
        let mut names: Vec<&NodeId> = members.iter().map(|m| &m.node).collect();
        names.sort();
        names.dedup();
        if names.len() != members.len() {
            return Err(ConfigError::DuplicateMember);
        }
        let local_followers = members.iter().filter(|m| m.local).count() - 1;
        if self.sync_acks > local_followers {
            return Err(ConfigError::NotEnoughLocalFollowers {
                sync_acks: self.sync_acks,
                local_followers,
            });
        }
        let positive = [
            ("heartbeat_interval_ms", self.heartbeat_interval_ms),
            ("retransmit_timeout_ms", self.retransmit_timeout_ms),
            ("append_entries_max", self.append_entries_max as u64),
            ("append_bytes_max", self.append_bytes_max as u64),
            ("inflight_entries_max", self.inflight_entries_max),
            ("uncommitted_entries_max", self.uncommitted_entries_max),
            ("rpo_budget_ms", self.rpo_budget_ms),
            ("retained_entries_max", self.retained_entries_max),
            ("entry_bytes_max", self.entry_bytes_max as u64),
            (
                "snapshot_chunk_bytes_max",
                self.snapshot_chunk_bytes_max as u64,
            ),
            ("lease_ms", self.lease_ms),
        ];
        for (name, value) in positive {
            if value == 0 {
                return Err(ConfigError::Zero { name });
            }
        }
        if self.retransmit_timeout_ms < self.heartbeat_interval_ms {
            return Err(ConfigError::Inconsistent {
                why: "retransmit_timeout_ms must be at least heartbeat_interval_ms",
            });
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("node {node} is not exactly once in the group's members")]
    NotAMember { node: String },
    #[error("a node appears twice in the group's members")]
    DuplicateMember,
    #[error("sync_acks = {sync_acks} but the group has only {local_followers} local followers")]
    NotEnoughLocalFollowers {
        sync_acks: usize,
        local_followers: usize,
    },
    #[error("{name} must be greater than zero")]
    Zero { name: &'static str },
    #[error("{why}")]
    Inconsistent { why: &'static str },
}

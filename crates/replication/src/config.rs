use harbor_types::limits;
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
    /// A voter counts: towards commits and leases when local, in the RPO
    /// gate when remote. A learner is only sent the log: a
    /// replica being added catches up as one (snapshot, then log) before
    /// the metadata plane makes it a voter, and a replica being removed is
    /// one until every entry committed with its acks is on the voters left.
    pub voter: bool,
}

/// Limits and timings of one replica: every one the core takes from its
/// runtime (the bounds of its own bookkeeping and every default are in
/// `harbor_types::limits`).
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
            sync_acks: limits::SYNC_ACKS,
            heartbeat_interval_ms: limits::HEARTBEAT_INTERVAL_MS,
            retransmit_timeout_ms: limits::RETRANSMIT_TIMEOUT_MS,
            append_entries_max: limits::APPEND_ENTRIES_MAX,
            append_bytes_max: limits::APPEND_BYTES_MAX,
            inflight_entries_max: limits::INFLIGHT_ENTRIES_MAX,
            uncommitted_entries_max: limits::UNCOMMITTED_ENTRIES_MAX,
            rpo_budget_ms: limits::RPO_BUDGET_MS,
            retained_entries_max: limits::RETAINED_ENTRIES_MAX,
            entry_bytes_max: limits::ENTRY_BYTES_MAX,
            snapshot_chunk_bytes_max: limits::SNAPSHOT_CHUNK_BYTES_MAX,
            lease_ms: limits::LEASE_MS,
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
        // The same rule on every replica, whichever it is: a leader and
        // `sync_acks` voting followers in the home region.
        let local_followers =
            (members.iter().filter(|m| m.local && m.voter).count()).saturating_sub(1);
        if self.sync_acks > local_followers {
            return Err(ConfigError::NotEnoughLocalFollowers {
                sync_acks: self.sync_acks,
                local_followers,
            });
        }
        self.check_limits()
    }

    /// Checks the limits against each other (the membership aside): what
    /// a node checks once at start for all its replicas.
    pub fn check_limits(&self) -> Result<(), ConfigError> {
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
        if self.retransmit_timeout_ms <= self.heartbeat_interval_ms {
            return Err(ConfigError::Inconsistent {
                why: "retransmit_timeout_ms must be longer than heartbeat_interval_ms",
            });
        }
        if self.lease_ms <= self.retransmit_timeout_ms {
            return Err(ConfigError::Inconsistent {
                why: "lease_ms must be longer than retransmit_timeout_ms",
            });
        }
        if self.rpo_budget_ms <= self.retransmit_timeout_ms {
            return Err(ConfigError::Inconsistent {
                why: "rpo_budget_ms must be longer than retransmit_timeout_ms",
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
    #[error(
        "sync_acks = {sync_acks} but the group has only {local_followers} local voting followers"
    )]
    NotEnoughLocalFollowers {
        sync_acks: usize,
        local_followers: usize,
    },
    #[error("the leader cannot be made a learner or removed: transfer its leadership first")]
    LeaderNotVoter,
    #[error("{name} must be greater than zero")]
    Zero { name: &'static str },
    #[error("{why}")]
    Inconsistent { why: &'static str },
}

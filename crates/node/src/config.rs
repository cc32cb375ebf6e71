use std::path::PathBuf;

use harbor_replication::Member;
use harbor_replication::{Config as CoreConfig, ConfigError as CoreConfigError};
use harbor_types::limits;
use harbor_types::sim::Bugs;
use harbor_types::{Generation, NodeId, ShardId};
use harbor_wal::WalOptions;

/// Limits and timings of a node's replicas. Every one is configurable; the
/// defaults are in `harbor_types::limits`, and [`NodeConfig::validate`]
/// checks their rules at start-up.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    /// Each replica keeps its WAL in `data_dir/shard-{id}`.
    pub data_dir: PathBuf,
    /// The groups are being created: a replica that starts with no durable
    /// state starts a new group. Otherwise (the default) it lost its state
    /// (a replaced disk, a wiped directory) and starts recovering: it will
    /// not lead, and reports itself recovering, until it has caught up.
    pub groups_are_new: bool,
    /// Bytes of a snapshot sent to a lagging follower in one message (see
    /// `harbor_replication::Config::snapshot_chunk_bytes_max`): far below
    /// the TCP transport's frame limit, so any state size catches up.
    pub snapshot_chunk_bytes_max: usize,
    /// Payload bytes in one append message (the core's
    /// `append_bytes_max`).
    pub append_bytes_max: usize,
    /// Entries a leader keeps in memory for lagging followers beyond its
    /// snapshot (the core's `retained_entries_max`); further behind, a
    /// follower is sent a snapshot.
    pub retained_entries_max: u64,
    /// Local followers that must hold an entry durably before it commits.
    pub sync_acks: usize,
    /// Writes are refused while a remote copy is further behind than this.
    pub rpo_budget_ms: u64,
    pub heartbeat_interval_ms: u64,
    /// A leader serves strong reads only under a lease this long, renewed by
    /// its local followers' acks.
    pub lease_ms: u64,
    pub retransmit_timeout_ms: u64,
    /// How long a replica thread sleeps waiting for input before ticking.
    pub tick_interval_ms: u64,
    /// Applied entries between state-machine snapshots.
    pub snapshot_interval_entries: u64,
    /// Inputs queued for one replica before new ones are refused.
    pub replica_inbox_capacity: usize,
    /// Inputs taken in one batch (one fsync) by a replica.
    pub batch_inputs_max: usize,
    /// Proposals waiting to commit before the leader refuses new ones.
    pub uncommitted_entries_max: u64,
    /// Local reads (session, bounded, causal) a replica holds at once while
    /// they wait to apply what they need; more are sent to the leader.
    pub local_reads_waiting_max: usize,
    /// Changes each replica keeps for change feeds (estimated bytes), in
    /// memory and with each snapshot; a feed cursor older than what is
    /// kept is refused as expired.
    pub changes_retained_bytes: usize,
    /// Changes older than this (before the newest entry applied) go,
    /// whatever their size.
    pub changes_retained_ms: u64,
    /// An idle leader proposes a no-op after this long, so the resolved
    /// time change feeds promise keeps advancing.
    pub resolved_tick_ms: u64,
    pub wal: WalOptions,
    /// Simulator-only protocol bugs; always off in a running node.
    pub bugs: Bugs,
}

impl NodeConfig {
    pub fn new(data_dir: PathBuf) -> NodeConfig {
        NodeConfig {
            data_dir,
            groups_are_new: false,
            snapshot_chunk_bytes_max: limits::SNAPSHOT_CHUNK_BYTES_MAX,
            append_bytes_max: limits::APPEND_BYTES_MAX,
            retained_entries_max: limits::RETAINED_ENTRIES_MAX,
            sync_acks: limits::SYNC_ACKS,
            rpo_budget_ms: limits::RPO_BUDGET_MS,
            heartbeat_interval_ms: limits::HEARTBEAT_INTERVAL_MS,
            lease_ms: limits::LEASE_MS,
            retransmit_timeout_ms: limits::RETRANSMIT_TIMEOUT_MS,
            tick_interval_ms: limits::TICK_INTERVAL_MS,
            snapshot_interval_entries: limits::SNAPSHOT_INTERVAL_ENTRIES,
            replica_inbox_capacity: limits::REPLICA_INBOX_CAPACITY,
            batch_inputs_max: limits::BATCH_INPUTS_MAX,
            uncommitted_entries_max: limits::UNCOMMITTED_ENTRIES_MAX,
            local_reads_waiting_max: limits::LOCAL_READS_WAITING_MAX,
            changes_retained_bytes: limits::CHANGES_RETAINED_BYTES,
            changes_retained_ms: limits::CHANGES_RETAINED_MS,
            resolved_tick_ms: limits::RESOLVED_TICK_MS,
            wal: WalOptions::default(),
            bugs: Bugs::none(),
        }
    }

    /// Where the replica of `shard` keeps its WAL.
    pub fn replica_dir(&self, shard: ShardId) -> PathBuf {
        self.data_dir.join(format!("shard-{}", shard.0))
    }

    /// The replication core's config for one replica of `shard` here: the
    /// core's own defaults, with every field this config sets.
    pub fn core_config(&self, shard: ShardId, me: NodeId) -> CoreConfig {
        let mut core = CoreConfig::new(shard, me);
        core.sync_acks = self.sync_acks;
        core.rpo_budget_ms = self.rpo_budget_ms;
        core.heartbeat_interval_ms = self.heartbeat_interval_ms;
        core.retransmit_timeout_ms = self.retransmit_timeout_ms;
        core.uncommitted_entries_max = self.uncommitted_entries_max;
        core.lease_ms = self.lease_ms;
        core.snapshot_chunk_bytes_max = self.snapshot_chunk_bytes_max;
        core.append_bytes_max = self.append_bytes_max;
        core.retained_entries_max = self.retained_entries_max;
        core.bugs = self.bugs;
        core
    }

    /// Checks the limits against each other, at start-up: a node with a
    /// config that breaks one refuses to start, saying which. The core's
    /// own rules are the core's (`Config::check_limits`); these are the
    /// node's.
    pub fn validate(&self) -> Result<(), NodeConfigError> {
        let positive = [
            ("tick_interval_ms", self.tick_interval_ms),
            ("snapshot_interval_entries", self.snapshot_interval_entries),
            ("replica_inbox_capacity", self.replica_inbox_capacity as u64),
            ("batch_inputs_max", self.batch_inputs_max as u64),
            (
                "local_reads_waiting_max",
                self.local_reads_waiting_max as u64,
            ),
            ("changes_retained_bytes", self.changes_retained_bytes as u64),
            ("changes_retained_ms", self.changes_retained_ms),
            ("resolved_tick_ms", self.resolved_tick_ms),
        ];
        if let Some((name, _)) = positive.iter().find(|(_, value)| *value == 0) {
            return Err(NodeConfigError::Zero { name });
        }
        let ordered = [
            (
                "tick_interval_ms <= heartbeat_interval_ms",
                self.tick_interval_ms <= self.heartbeat_interval_ms,
            ),
            (
                "batch_inputs_max <= replica_inbox_capacity",
                self.batch_inputs_max <= self.replica_inbox_capacity,
            ),
            (
                "an entry fits one WAL record",
                limits::ENTRY_BYTES_MAX + WAL_RECORD_OVERHEAD_BYTES
                    <= self.wal.record_size_bytes_max as usize,
            ),
        ];
        if let Some((rule, _)) = ordered.iter().find(|(_, holds)| !holds) {
            return Err(NodeConfigError::Inconsistent { rule });
        }
        let any = NodeId::new("any").expect("a valid id");
        Ok(self.core_config(ShardId(0), any).check_limits()?)
    }
}

/// What a WAL record adds to an entry's payload (its timestamp, lengths).
const WAL_RECORD_OVERHEAD_BYTES: usize = 64;
const _: () = assert!(
    limits::ENTRY_BYTES_MAX + WAL_RECORD_OVERHEAD_BYTES
        <= harbor_wal::RECORD_SIZE_BYTES_DEFAULT as usize
);

/// A node config that breaks a limit's rule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NodeConfigError {
    /// A rule of the replication core.
    #[error("{0}")]
    Core(#[from] CoreConfigError),
    #[error("{name} must be greater than zero")]
    Zero { name: &'static str },
    #[error("the node's limits must keep {rule}")]
    Inconsistent { rule: &'static str },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_defaults_hold_and_a_broken_rule_is_named() {
        let config = NodeConfig::new(PathBuf::from("data"));
        assert_eq!(config.validate(), Ok(()));
        let mut bad = config.clone();
        bad.lease_ms = bad.retransmit_timeout_ms;
        assert_eq!(
            bad.validate(),
            Err(NodeConfigError::Core(CoreConfigError::Inconsistent {
                why: "lease_ms must be longer than retransmit_timeout_ms"
            }))
        );
        let mut bad = config.clone();
        bad.batch_inputs_max = 0;
        assert_eq!(
            bad.validate(),
            Err(NodeConfigError::Zero {
                name: "batch_inputs_max"
            })
        );
        let mut bad = config;
        bad.tick_interval_ms = bad.heartbeat_interval_ms + 1;
        assert!(bad.validate().is_err());
    }
}

/// One replica a node runs, as the metadata plane described its group when
/// the node started.
#[derive(Clone, Debug)]
pub struct ReplicaPlan {
    pub shard: ShardId,
    pub members: Vec<Member>,
    /// The group's fence (`GroupInfo::fence`), read linearizably: where the
    /// replica starts if it finds its disk empty, so it refuses every
    /// order older than what the metadata plane had recorded.
    pub fence: Generation,
    /// The fence generation has a published leader
    /// (`GroupInfo::fence_is_led`): such a replica refuses to lead it.
    pub fence_is_led: bool,
    /// The epoch of `members` (`GroupInfo::members_epoch`): a membership
    /// order of this epoch or older is one the replica started past.
    pub members_epoch: u64,
}

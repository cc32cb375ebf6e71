use std::path::PathBuf;

use harbor_types::sim::Bugs;
use harbor_wal::WalOptions;

/// Limits and timings of a node's replicas. Every one is configurable and
/// has a default sized for the 2-region dev cluster.
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
    pub wal: WalOptions,
    /// Simulator-only protocol bugs; always off in a running node.
    pub bugs: Bugs,
}

impl NodeConfig {
    pub fn new(data_dir: PathBuf) -> NodeConfig {
        NodeConfig {
            data_dir,
            groups_are_new: false,
            snapshot_chunk_bytes_max: harbor_replication::SNAPSHOT_CHUNK_BYTES_DEFAULT,
            append_bytes_max: harbor_replication::APPEND_BYTES_DEFAULT,
            retained_entries_max: harbor_replication::RETAINED_ENTRIES_DEFAULT,
            sync_acks: 1,
            rpo_budget_ms: 5_000,
            heartbeat_interval_ms: 100,
            lease_ms: 2_000,
            retransmit_timeout_ms: 500,
            tick_interval_ms: 25,
            snapshot_interval_entries: 100_000,
            replica_inbox_capacity: 65_536,
            batch_inputs_max: 8_192,
            uncommitted_entries_max: 65_536,
            local_reads_waiting_max: 4_096,
            wal: WalOptions::default(),
            bugs: Bugs::none(),
        }
    }
}

use harbor_types::{Generation, LogIndex, MonoMs, NodeId, ShardId, Timestamp};
use serde::{Deserialize, Serialize};

/// One log entry. An empty payload is a barrier (a new leader's first entry):
/// it commits the earlier generations' entries and changes no state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub index: LogIndex,
    pub generation: Generation,
    /// The leader's HLC time when it ordered the entry. The state machine
    /// uses it as "now" (hold expiry), so apply stays deterministic.
    pub at: Timestamp,
    pub payload: Vec<u8>,
}

impl Entry {
    pub fn is_barrier(&self) -> bool {
        self.payload.is_empty()
    }
}

/// What a snapshot covers: every entry up to and including `last_index`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotMeta {
    pub last_index: LogIndex,
    pub last_generation: Generation,
}

/// Replication messages between the replicas of one group.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Message {
    Append(Append),
    AppendAck(AppendAck),
    InstallSnapshot(InstallSnapshot),
    SnapshotAck(SnapshotAck),
}

impl Message {
    pub fn generation(&self) -> Generation {
        match self {
            Message::Append(m) => m.generation,
            Message::AppendAck(m) => m.generation,
            Message::InstallSnapshot(m) => m.generation,
            Message::SnapshotAck(m) => m.generation,
        }
    }

    pub fn shard(&self) -> ShardId {
        match self {
            Message::Append(m) => m.shard,
            Message::AppendAck(m) => m.shard,
            Message::InstallSnapshot(m) => m.shard,
            Message::SnapshotAck(m) => m.shard,
        }
    }
}

/// Leader → follower: entries after `prev_index` (possibly none: a heartbeat).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Append {
    pub shard: ShardId,
    pub generation: Generation,
    pub leader: NodeId,
    pub prev_index: LogIndex,
    pub prev_generation: Generation,
    pub entries: Vec<Entry>,
    pub commit_index: LogIndex,
    /// Closed timestamp: the leader will order no new entry at or below this
    /// time, and every entry at or below it has index <= `leader_last_index`.
    pub closed: Timestamp,
    pub leader_last_index: LogIndex,
    /// How far `closed` lies behind the leader's clock as it sent this
    /// (0 unless its lease ran out): a duration, measured at one instant.
    pub closed_lag_ms: u64,
    /// The newest ack of this follower the leader had received when it
    /// sent this: the leader's state at sending is at least as recent as
    /// the moment that ack left the follower, which the follower measures
    /// on its own monotonic clock. `None` before any ack.
    pub echo_ack: Option<AckEcho>,
    /// The leader's monotonic clock when it sent this; echoed in the ack so
    /// the leader extends its lease from its own monotonic clock only.
    pub sent_at: MonoMs,
}

/// A follower's ack, named back to it: which incarnation of the replica
/// sent it (a restarted one has a new monotonic origin) and when, on that
/// replica's monotonic clock.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AckEcho {
    pub incarnation: u64,
    pub sent_at: MonoMs,
}

/// Follower → leader.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppendAck {
    pub shard: ShardId,
    /// The follower's generation; a newer one than the leader's fences it.
    pub generation: Generation,
    pub success: bool,
    /// Durable on the follower and known to match the leader's log.
    pub match_index: LogIndex,
    /// On failure: the highest index known to match; resend after it.
    pub hint: LogIndex,
    /// `sent_at` of the newest append this follower accepted in this
    /// generation (`MonoMs::ZERO` if none): the leader's clock, not ours.
    pub echo: MonoMs,
    /// This ack, as the leader will name it back (see [`Append::echo_ack`]).
    pub ack: AckEcho,
    /// The follower lost its durable state and has not caught up: what its
    /// earlier life acknowledged is gone (a restart with its disk keeps
    /// everything it ever acknowledged).
    pub recovering: bool,
}

/// Leader → follower too far behind the leader's in-memory log: one chunk
/// of a state-machine snapshot. Chunks go one at a time, each answered by a
/// [`SnapshotAck`], so no message is larger than a chunk and an interrupted
/// transfer resumes where the follower stands. The follower installs the
/// snapshot only once it holds every byte.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstallSnapshot {
    pub shard: ShardId,
    pub generation: Generation,
    pub leader: NodeId,
    pub meta: SnapshotMeta,
    /// Where this chunk starts in the snapshot.
    pub offset: u64,
    /// The whole snapshot's size.
    pub total_bytes: u64,
    /// At most `snapshot_chunk_bytes_max` bytes.
    pub data: Vec<u8>,
    pub commit_index: LogIndex,
    pub closed: Timestamp,
}

/// Follower → leader: how many bytes of the snapshot ending at
/// `last_index` it holds (the next chunk starts there).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotAck {
    pub shard: ShardId,
    pub generation: Generation,
    pub last_index: LogIndex,
    pub received_bytes: u64,
    /// The follower's life (see [`AckEcho::incarnation`]): a new one may
    /// hold less than an earlier one acknowledged.
    pub incarnation: u64,
}

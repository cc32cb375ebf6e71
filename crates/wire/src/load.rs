//! What a leader's buckets cost it, as a load report carries it.

use harbor_types::BucketId;
use serde::{Deserialize, Serialize};

/// Requests one bucket (or a whole group) took.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoadCounts {
    pub writes: u64,
    /// The encoded size of the writes' commands.
    pub bytes: u64,
    /// Reads the leader served (follower reads are counted by nobody).
    pub reads: u64,
}

impl LoadCounts {
    pub fn add(&mut self, other: LoadCounts) {
        self.writes += other.writes;
        self.bytes += other.bytes;
        self.reads += other.reads;
    }

    /// Takes away what `add` added (saturating: never below zero).
    pub fn sub(&mut self, other: LoadCounts) {
        self.writes = self.writes.saturating_sub(other.writes);
        self.bytes = self.bytes.saturating_sub(other.bytes);
        self.reads = self.reads.saturating_sub(other.reads);
    }
}

/// A leader's load over the last `window_ms`: the group's and its
/// hottest buckets' (by writes, then bytes), at most as many as asked.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoadReport {
    pub window_ms: u64,
    pub total: LoadCounts,
    pub buckets: Vec<(BucketId, LoadCounts)>,
}

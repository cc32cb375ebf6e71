//! The write-ahead log of one Harbor replica.
//!
//! A replica appends log records here and acknowledges them only after
//! [`Wal::sync`] returned: one fsync covers every append since the previous
//! sync (group commit). Records live in checksummed segment files; a snapshot
//! replaces a log prefix; the hard state (the newest generation seen) sits in
//! its own small file.
//!
//! Recovery promises: everything a completed `sync` covered comes back unless
//! a later completed truncation or snapshot removed it; nothing comes back that
//! was never appended; indexes are contiguous. A torn tail (the unsynced end of
//! the last segment) is cut; damage anywhere else is [`WalError::Corrupt`],
//! because refusing to start beats silently losing acknowledged data.
//!
//! All IO goes through [`Storage`], so the simulator can run the WAL on
//! [`MemStorage`] and crash it at any operation.

mod format;
mod mem;
mod storage;
mod wal;

pub use format::{segment_name, snapshot_name, HARD_STATE_NAME, RECORD_HEADER_BYTES};
pub use mem::MemStorage;
pub use storage::{FileStorage, Storage};
pub use wal::Wal;

use harbor_types::{Generation, LogIndex};
use std::io;

/// Default size after which the WAL starts a new segment.
pub const SEGMENT_SIZE_BYTES_DEFAULT: u64 = 64 << 20;
/// The smallest segment size accepted; tests use tiny segments to exercise rolling.
pub const SEGMENT_SIZE_BYTES_MIN: u64 = RECORD_HEADER_BYTES as u64;
/// The largest segment size accepted: recovery reads a whole segment into memory.
pub const SEGMENT_SIZE_BYTES_MAX: u64 = 1 << 30;
/// Default zeros written ahead of the active segment's end.
pub const PREALLOCATE_BYTES_DEFAULT: u64 = 1 << 20;
/// Default largest payload of one record.
pub const RECORD_SIZE_BYTES_DEFAULT: u32 = 16 << 20;
/// The format's hard limit on a payload; a length above it is damage, not data.
pub const RECORD_SIZE_BYTES_LIMIT: u32 = 256 << 20;
/// The largest snapshot accepted, written or read.
pub const SNAPSHOT_SIZE_BYTES_MAX: u64 = 4 << 30;

const _: () = assert!(RECORD_SIZE_BYTES_DEFAULT <= RECORD_SIZE_BYTES_LIMIT);
const _: () = assert!(SEGMENT_SIZE_BYTES_MIN <= SEGMENT_SIZE_BYTES_DEFAULT);
const _: () = assert!(SEGMENT_SIZE_BYTES_DEFAULT <= SEGMENT_SIZE_BYTES_MAX);
// A record larger than the segment size gets a segment of its own; that
// segment must still be one recovery is willing to read.
const _: () =
    assert!(RECORD_SIZE_BYTES_LIMIT as u64 + RECORD_HEADER_BYTES as u64 <= SEGMENT_SIZE_BYTES_MAX);

/// Tunables of one WAL, validated by [`Wal::open`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WalOptions {
    /// A segment that would grow past this starts a new one (a single larger
    /// record gets a segment of its own).
    pub segment_size_bytes: u64,
    /// The largest payload `append` accepts; larger is [`WalError::RecordTooLarge`].
    pub record_size_bytes_max: u32,
    /// Zeros written ahead of the active segment's end when an append would
    /// pass them (0: none). An fsync then commits only data, not a new file
    /// size: on the 2-core ext4 test VM a synced 4 KiB write took 0.24 ms
    /// over existing blocks and 0.7 ms growing the file (`dd oflag=dsync`).
    pub preallocate_bytes: u64,
}

impl Default for WalOptions {
    fn default() -> WalOptions {
        WalOptions {
            segment_size_bytes: SEGMENT_SIZE_BYTES_DEFAULT,
            record_size_bytes_max: RECORD_SIZE_BYTES_DEFAULT,
            preallocate_bytes: PREALLOCATE_BYTES_DEFAULT,
        }
    }
}

impl WalOptions {
    /// Checks the options against the compile-time limits.
    pub fn validate(&self) -> Result<(), WalError> {
        let size = self.segment_size_bytes;
        if !(SEGMENT_SIZE_BYTES_MIN..=SEGMENT_SIZE_BYTES_MAX).contains(&size) {
            return Err(WalError::InvalidOptions {
                reason: format!(
                    "segment_size_bytes {size} outside [{SEGMENT_SIZE_BYTES_MIN}, {SEGMENT_SIZE_BYTES_MAX}]"
                ),
            });
        }
        if self.preallocate_bytes > SEGMENT_SIZE_BYTES_MAX {
            return Err(WalError::InvalidOptions {
                reason: format!(
                    "preallocate_bytes {} above the largest segment, {SEGMENT_SIZE_BYTES_MAX}",
                    self.preallocate_bytes
                ),
            });
        }
        let record = self.record_size_bytes_max;
        if !(1..=RECORD_SIZE_BYTES_LIMIT).contains(&record) {
            return Err(WalError::InvalidOptions {
                reason: format!(
                    "record_size_bytes_max {record} outside [1, {RECORD_SIZE_BYTES_LIMIT}]"
                ),
            });
        }
        Ok(())
    }
}

/// One log entry: an opaque payload at (index, generation).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    pub index: LogIndex,
    pub generation: Generation,
    pub payload: Vec<u8>,
}

/// A state-machine image that replaces every record up to `last_index`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Snapshot {
    pub last_index: LogIndex,
    /// Generation of the record at `last_index`.
    pub last_generation: Generation,
    pub data: Vec<u8>,
    /// Opaque bytes the replica keeps with its own snapshot and never sends
    /// to another (a group keeps there the change history its feeds still
    /// need, so a restart does not lose it). Empty when there is none.
    pub history: Vec<u8>,
}

/// Small durable state a replica must not forget: the newest generation it
/// has seen, which fences off older leaders after a restart, whether it
/// led that generation (a restarted leader must never continue it: its
/// followers may hold entries of it that it lost), and whether it lost its
/// state and has not caught up since.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HardState {
    pub generation: Generation,
    pub led: bool,
    pub recovering: bool,
}

/// What [`Wal::open`] found on disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Recovered {
    pub snapshot: Option<Snapshot>,
    /// Contiguous, starting at the snapshot's `last_index + 1` (or at 1).
    pub records: Vec<Record>,
    /// Generation 0 when never set.
    pub hard_state: HardState,
    /// Bytes of torn tail cut from the last segment; 0 when the tail was clean.
    pub torn_tail_bytes_cut: u64,
    /// Zeros cut from the end of the last segment: preallocated space the
    /// log had not reached (or a torn write that left only zeros).
    pub zero_tail_bytes_cut: u64,
}

/// Why a WAL operation failed. `Io`, `Corrupt` and `UnsupportedFormat` are
/// fatal for the replica;
/// the others are expected outcomes the caller can act on.
#[derive(Debug, thiserror::Error)]
pub enum WalError {
    #[error("{op} on {file:?} failed: {source}")]
    Io {
        op: &'static str,
        file: String,
        #[source]
        source: io::Error,
    },
    #[error("{file} is corrupt at byte {offset}: {reason}")]
    Corrupt {
        file: String,
        offset: u64,
        reason: String,
    },
    /// A whole record with a valid checksum that this binary cannot read
    /// (another release's format). Fatal, and nothing was changed: the
    /// data belongs to the binary that wrote it.
    #[error(
        "{file} holds at byte {offset} a record of kind {kind}, format version {version}, \
         which this binary does not read (written by another Harbor release?); nothing was changed"
    )]
    UnsupportedFormat {
        file: String,
        offset: u64,
        kind: u8,
        version: u8,
    },
    /// An earlier write or fsync failed, so what is durable is unknown; the
    /// replica must restart and recover rather than carry on.
    #[error("the WAL is poisoned by an earlier IO failure; reopen it")]
    Poisoned,
    #[error(
        "record {index} has a {size_bytes}-byte payload; at most {size_bytes_max} are allowed"
    )]
    RecordTooLarge {
        index: LogIndex,
        size_bytes: usize,
        size_bytes_max: u32,
    },
    #[error("snapshot of {size_bytes} bytes exceeds the limit of {size_bytes_max}")]
    SnapshotTooLarge {
        size_bytes: u64,
        size_bytes_max: u64,
    },
    /// The requested records are covered by the snapshot and gone from the log.
    #[error("records from {from} are compacted; the log starts at {first_index}")]
    Compacted {
        from: LogIndex,
        first_index: LogIndex,
    },
    #[error("invalid WAL options: {reason}")]
    InvalidOptions { reason: String },
}

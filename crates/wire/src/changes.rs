//! The committed log as a change stream: what a replica hands a change
//! feed (DESIGN.md section 8).
//!
//! Every applied entry yields the reservation state machine's events, in
//! order; each is a [`Change`] at a position `(index, sub)` of its group's
//! log. The state machine is deterministic and only committed entries
//! apply, so every replica of a group yields the same changes at the same
//! positions: a feed may read from any of them and resume on another.

use harbor_reservation::{Event, ScanRows};
use harbor_types::{LogIndex, Timestamp};
use serde::{Deserialize, Serialize};

/// A place in one group's change stream: the `sub`-th change of the entry
/// at `index`. [`ChangePosition::entry_end`] stands after every change of
/// an entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ChangePosition {
    pub index: LogIndex,
    pub sub: u32,
}

impl ChangePosition {
    /// Before every change.
    pub const START: ChangePosition = ChangePosition::entry_end(LogIndex::ZERO);

    /// After every change of the entry at `index`.
    pub const fn entry_end(index: LogIndex) -> ChangePosition {
        ChangePosition {
            index,
            sub: u32::MAX,
        }
    }
}

/// One change, at its position.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Change {
    pub sub: u32,
    /// The last change of its entry: a cursor after it stands at the
    /// entry's end.
    pub last: bool,
    /// Carries the entry's position (shard, generation, index) and HLC time.
    pub event: Event,
    /// How many moves brought the changed issuer's bucket to this group
    /// (0: it never moved): a consumer orders an issuer's rows by (epoch,
    /// position), so a late change from the group a bucket left never
    /// overwrites a newer one from the group it went to.
    pub epoch: u64,
}

impl Change {
    /// Where the change is in its group's stream.
    pub fn position(&self) -> ChangePosition {
        ChangePosition {
            index: self.event.position().index,
            sub: self.sub,
        }
    }

    /// Where a feed stands once it delivered this change.
    pub fn cursor(&self) -> ChangePosition {
        let index = self.event.position().index;
        if self.last {
            ChangePosition::entry_end(index)
        } else {
            ChangePosition {
                index,
                sub: self.sub,
            }
        }
    }
}

/// A replica's answer to `Query::Changes`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChangesPage {
    /// The changes after the asked position, oldest first.
    pub changes: Vec<Change>,
    /// Where the caller stands after this page: past every change it holds
    /// and every entry this replica applied without changes. Never behind
    /// the asked position.
    pub upto: ChangePosition,
    /// When the page reaches everything this replica applied: every change
    /// of the group with a time at or before this one is at or before
    /// `upto` (a resolved mark). `None` when unknown or the page was cut.
    pub resolved: Option<Timestamp>,
    /// The asked position is older than what this replica keeps (it
    /// restarted, installed a snapshot, or the change budget evicted it):
    /// nothing is returned, and this is the oldest position it can continue
    /// from.
    pub expired: Option<ChangePosition>,
}

/// A replica's answer to `Query::Scan`: a page of its state as it stood
/// once it had applied up to `at`. Pages of one scan may stand at
/// different positions; a reader applies a later change to a scanned row
/// only if the change is after the row's page (see `harbor_cdc`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScanPage {
    pub rows: ScanRows,
    /// The end of the last entry the replica had applied.
    pub at: ChangePosition,
    /// That entry's time (`None` from a state restored from a snapshot of
    /// format 1 before an entry applied).
    pub at_time: Option<Timestamp>,
}

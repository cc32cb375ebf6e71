//! The changes a replica keeps for change feeds: what its applied entries
//! yielded, in log order, within a budget of estimated bytes and an age.
//! Served from memory, and written with every snapshot the replica takes
//! ([`ChangeLog::history`]), so a restart restores them from the snapshot
//! and rebuilds the rest by applying the log after it. A snapshot installed
//! from the leader starts them again after the state it brought, and an
//! asked position older than what is kept is answered as expired, never
//! with a gap.

use std::collections::VecDeque;

use harbor_reservation::Event;
use harbor_types::sim::probe;
use harbor_types::{LogIndex, Timestamp};
use harbor_wire::{Change, ChangePosition, ChangesPage};
use serde::{Deserialize, Serialize};

/// What a replica keeps, and for how long.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Budget {
    pub(crate) bytes: usize,
    /// A change whose entry is older than this, against the newest entry
    /// applied, goes. Entry times rise along the log and an idle leader
    /// orders a no-op every second, so every replica lets the same changes
    /// go at the same entry, whatever its own clock says.
    pub(crate) age_ms: u64,
}

pub(crate) struct ChangeLog {
    changes: VecDeque<Change>,
    /// Everything after this position that has applied is in `changes`.
    kept_after: ChangePosition,
    bytes: usize,
    budget: Budget,
}

/// The first byte of [`ChangeLog::history`]: its format. 2: each change
/// with its bucket's epoch; format 1 (without) is still read, at epoch 0.
const HISTORY_FORMAT: u8 = 2;

#[derive(Serialize)]
struct HistoryOut<'a> {
    /// The applied index it was written at: the snapshot's.
    upto: LogIndex,
    kept_after: ChangePosition,
    changes: &'a VecDeque<Change>,
}

#[derive(Deserialize)]
struct HistoryIn {
    upto: LogIndex,
    kept_after: ChangePosition,
    changes: Vec<Change>,
}

/// Format 1: changes before buckets moved.
#[derive(Deserialize)]
struct HistoryInV1 {
    upto: LogIndex,
    kept_after: ChangePosition,
    changes: Vec<ChangeV1>,
}

#[derive(Deserialize)]
struct ChangeV1 {
    sub: u32,
    last: bool,
    event: Event,
}

impl ChangeLog {
    /// Starts after the entry at `applied`: the state was restored there.
    pub(crate) fn new(applied: LogIndex, budget: Budget) -> ChangeLog {
        ChangeLog {
            changes: VecDeque::new(),
            kept_after: ChangePosition::entry_end(applied),
            bytes: 0,
            budget,
        }
    }

    /// What [`ChangeLog::history`] wrote with the snapshot at `applied`;
    /// starts after `applied` when there is none, or it cannot be read
    /// (written by another release), or it does not end there.
    pub(crate) fn restore(applied: LogIndex, history: &[u8], budget: Budget) -> ChangeLog {
        let mut log = ChangeLog::new(applied, budget);
        let Some((&format, rest)) = history.split_first() else {
            return log;
        };
        let decoded = match format {
            HISTORY_FORMAT => postcard::from_bytes::<HistoryIn>(rest).map_err(|e| e.to_string()),
            1 => postcard::from_bytes::<HistoryInV1>(rest)
                .map(|v1| HistoryIn {
                    upto: v1.upto,
                    kept_after: v1.kept_after,
                    changes: v1
                        .changes
                        .into_iter()
                        .map(|c| Change {
                            sub: c.sub,
                            last: c.last,
                            event: c.event,
                            epoch: 0,
                        })
                        .collect(),
                })
                .map_err(|e| e.to_string()),
            other => Err(format!("unknown format {other}")),
        };
        let history = match decoded {
            Ok(history) => history,
            Err(reason) => {
                tracing::warn!(%applied, %reason, "the change history kept with the snapshot does not decode; change feeds restart after it");
                return log;
            }
        };
        let end = ChangePosition::entry_end(applied);
        let in_order = history
            .changes
            .windows(2)
            .all(|pair| pair[0].position() < pair[1].position());
        let within = history.changes.first().is_none_or(|first| {
            history.kept_after < first.position()
                && history.changes.last().is_some_and(|l| l.cursor() <= end)
        });
        if history.upto != applied || !in_order || !within || history.kept_after > end {
            tracing::warn!(%applied, "the change history kept with the snapshot is out of order; change feeds restart after it");
            return log;
        }
        probe("changes.restored_from_snapshot");
        log.kept_after = history.kept_after;
        log.bytes = history.changes.iter().map(estimated_bytes).sum();
        log.changes = history.changes.into();
        log.evict_over_budget();
        log
    }

    /// Everything kept, to write with a snapshot of the state at `applied`
    /// (the replica's applied index): read back by [`ChangeLog::restore`].
    /// `drop_newest` is the simulator's bug switch
    /// `changes-history-drops-newest`.
    pub(crate) fn history(&self, applied: LogIndex, drop_newest: bool) -> Vec<u8> {
        let mut changes = &self.changes;
        let mut fewer;
        if drop_newest && !self.changes.is_empty() {
            fewer = self.changes.clone();
            fewer.pop_back();
            changes = &fewer;
        }
        let history = HistoryOut {
            upto: applied,
            kept_after: self.kept_after,
            changes,
        };
        postcard::to_extend(&history, vec![HISTORY_FORMAT]).expect("a change history encodes")
    }

    /// The state was replaced by a snapshot at `applied`: the changes of the
    /// entries it covers were never seen here.
    pub(crate) fn restart(&mut self, applied: LogIndex) {
        self.changes.clear();
        self.bytes = 0;
        self.kept_after = ChangePosition::entry_end(applied);
    }

    /// The events of one applied entry (at time `at`), in order.
    /// Keeps one applied entry's changes, each with its issuer's bucket
    /// epoch.
    pub(crate) fn push(&mut self, events: Vec<(Event, u64)>, at: Timestamp) {
        let count = events.len();
        for (sub, (event, epoch)) in events.into_iter().enumerate() {
            let change = Change {
                sub: sub as u32,
                last: sub + 1 == count,
                event,
                epoch,
            };
            self.bytes += estimated_bytes(&change);
            self.changes.push_back(change);
        }
        self.evict_over_budget();
        self.evict_older_than_budget(at);
    }

    fn evict_over_budget(&mut self) {
        while self.bytes > self.budget.bytes {
            probe("changes.evicted_for_budget");
            self.evict_oldest();
        }
    }

    /// Lets go of the changes older than the age budget before `newest`.
    fn evict_older_than_budget(&mut self, newest: Timestamp) {
        let Some(oldest_kept) = newest.wall_ms.checked_sub(self.budget.age_ms) else {
            return;
        };
        while self
            .changes
            .front()
            .is_some_and(|c| c.event.at().wall_ms < oldest_kept)
        {
            probe("changes.evicted_for_age");
            self.evict_oldest();
        }
    }

    fn evict_oldest(&mut self) {
        let oldest = self
            .changes
            .pop_front()
            .expect("evicting from a kept change");
        self.bytes -= estimated_bytes(&oldest);
        self.kept_after = oldest.cursor();
    }

    /// Changes after `after`, at most `max`. `applied` is the replica's
    /// applied index, `resolved` its resolved time (valid only if every
    /// committed entry is applied).
    pub(crate) fn page(
        &self,
        after: ChangePosition,
        max: usize,
        applied: LogIndex,
        resolved: Option<Timestamp>,
    ) -> ChangesPage {
        if after < self.kept_after {
            probe("changes.position_expired");
            return ChangesPage {
                changes: Vec::new(),
                upto: after,
                resolved: None,
                expired: Some(self.kept_after),
            };
        }
        let start = self.changes.partition_point(|c| c.position() <= after);
        let changes: Vec<Change> = self.changes.iter().skip(start).take(max).cloned().collect();
        let cut = self.changes.len() - start > changes.len();
        let upto = match changes.last() {
            Some(last) if cut => last.cursor(),
            // Everything applied is in the page (or nothing new applied).
            _ => after.max(ChangePosition::entry_end(applied)),
        };
        ChangesPage {
            changes,
            upto,
            resolved: if cut { None } else { resolved },
            expired: None,
        }
    }

    /// Every change kept after `after`, as it is.
    pub(crate) fn kept_after(&self, after: ChangePosition) -> impl Iterator<Item = &Change> {
        let start = self.changes.partition_point(|c| c.position() <= after);
        self.changes.iter().skip(start)
    }

    pub(crate) fn retained_bytes(&self) -> usize {
        self.bytes
    }
}

/// What a change costs in memory, roughly: its own size and its strings'
/// (an allocation's overhead aside).
fn estimated_bytes(change: &Change) -> usize {
    let strings = match &change.event {
        Event::IssuerRegistered {
            issuer_id,
            home_region,
            ..
        } => issuer_id.as_str().len() + home_region.as_str().len(),
        Event::LimitChanged { issuer_id, .. } => issuer_id.as_str().len(),
        Event::ReservationRejected {
            issuer_id,
            token,
            code,
            ..
        } => issuer_id.as_str().len() + token.as_str().len() + code.len(),
        Event::TokenAbandoned {
            issuer_id, token, ..
        } => issuer_id.as_str().len() + token.as_str().len(),
        Event::ReservationCreated { reservation, .. }
        | Event::ReservationConfirmed { reservation, .. }
        | Event::ReservationReleased { reservation, .. }
        | Event::ReservationExpired { reservation, .. } => {
            // The reservation id holds the issuer's id again.
            2 * reservation.issuer_id.as_str().len()
                + reservation.reservation_token.as_str().len()
                + reservation.desk.len()
                + reservation.trader.len()
        }
        Event::BucketAcquired { issuers, .. } | Event::BucketReleased { issuers, .. } => issuers
            .iter()
            .map(|i| std::mem::size_of::<harbor_types::IssuerId>() + i.as_str().len())
            .sum(),
    };
    std::mem::size_of::<Change>() + strings
}

#[cfg(test)]
mod tests {
    use harbor_types::{Amount, CommitToken, Generation, IssuerId, ShardId};

    use super::*;

    fn event(index: u64) -> Event {
        Event::LimitChanged {
            position: CommitToken {
                shard: ShardId(0),
                generation: Generation(1),
                index: LogIndex(index),
            },
            at: Timestamp::from_wall_ms(index),
            issuer_id: IssuerId::new("acme").unwrap(),
            limit_before: Amount(1),
            limit: Amount(2),
        }
    }

    fn at(index: u64, sub: u32) -> ChangePosition {
        ChangePosition {
            index: LogIndex(index),
            sub,
        }
    }

    fn time(wall_ms: u64) -> Timestamp {
        Timestamp::from_wall_ms(wall_ms)
    }

    fn budget(bytes: usize) -> Budget {
        Budget {
            bytes,
            age_ms: u64::MAX,
        }
    }

    fn positions(page: &ChangesPage) -> Vec<ChangePosition> {
        page.changes.iter().map(Change::position).collect()
    }

    #[test]
    fn pages_resume_inside_an_entry_and_cover_entries_without_changes() {
        let mut log = ChangeLog::new(LogIndex(0), budget(1 << 20));
        log.push(vec![(event(1), 0), (event(1), 0), (event(1), 0)], time(1));
        log.push(Vec::new(), time(2));
        log.push(vec![(event(3), 0)], time(3));
        let resolved = Some(Timestamp::from_wall_ms(9));
        // Cut after two changes: no resolved mark, the cursor is inside
        // entry 1.
        let page = log.page(ChangePosition::START, 2, LogIndex(3), resolved);
        assert_eq!(positions(&page), vec![at(1, 0), at(1, 1)]);
        assert_eq!((page.upto, page.resolved), (at(1, 1), None));
        let page = log.page(page.upto, 10, LogIndex(3), resolved);
        assert_eq!(positions(&page), vec![at(1, 2), at(3, 0)]);
        assert_eq!(
            page.changes[1].cursor(),
            ChangePosition::entry_end(LogIndex(3))
        );
        assert_eq!(
            (page.upto, page.resolved),
            (ChangePosition::entry_end(LogIndex(3)), resolved)
        );
        // Nothing new: the cursor stays, the mark is repeated.
        let again = log.page(page.upto, 10, LogIndex(3), resolved);
        assert!(again.changes.is_empty());
        assert_eq!(again.upto, page.upto);
        // A caller ahead of this replica is never moved back.
        let ahead = ChangePosition::entry_end(LogIndex(7));
        assert_eq!(log.page(ahead, 10, LogIndex(3), resolved).upto, ahead);
    }

    #[test]
    fn an_evicted_or_restored_position_is_expired_never_a_gap() {
        let bytes = 3 * estimated_bytes(&Change {
            epoch: 0,
            sub: 0,
            last: true,
            event: event(1),
        });
        let mut log = ChangeLog::new(LogIndex(0), budget(bytes));
        for index in 1..=5 {
            log.push(vec![(event(index), 0)], time(index));
        }
        let page = log.page(ChangePosition::START, 10, LogIndex(5), None);
        assert!(page.changes.is_empty());
        assert_eq!(page.expired, Some(ChangePosition::entry_end(LogIndex(2))));
        let page = log.page(
            ChangePosition::entry_end(LogIndex(2)),
            10,
            LogIndex(5),
            None,
        );
        assert_eq!(page.changes.len(), 3);
        assert!(log.retained_bytes() <= bytes);
        // A snapshot from the leader replaced the state at 9.
        log.restart(LogIndex(9));
        let page = log.page(
            ChangePosition::entry_end(LogIndex(5)),
            10,
            LogIndex(9),
            None,
        );
        assert_eq!(page.expired, Some(ChangePosition::entry_end(LogIndex(9))));
    }

    #[test]
    fn a_history_written_with_a_snapshot_restores_what_was_kept() {
        let mut log = ChangeLog::new(LogIndex(0), budget(1 << 20));
        for index in 1..=4 {
            log.push(vec![(event(index), 0), (event(index), 0)], time(index));
        }
        let restored = ChangeLog::restore(
            LogIndex(4),
            &log.history(LogIndex(4), false),
            budget(1 << 20),
        );
        let all = |log: &ChangeLog| {
            log.kept_after(ChangePosition::START)
                .cloned()
                .collect::<Vec<_>>()
        };
        assert_eq!(all(&restored), all(&log));
        assert_eq!(restored.kept_after, log.kept_after);
        assert_eq!(restored.retained_bytes(), log.retained_bytes());
        // A smaller budget now keeps the newest, and says where it starts.
        let small = ChangeLog::restore(LogIndex(4), &log.history(LogIndex(4), false), budget(1));
        assert_eq!(small.kept_after, ChangePosition::entry_end(LogIndex(4)));
        // Nothing to read, another format, or a history that does not end
        // at the snapshot: start after the snapshot.
        let mut short = ChangeLog::new(LogIndex(0), budget(1 << 20));
        short.push(vec![(event(1), 0)], time(1));
        for history in [
            Vec::new(),
            vec![9, 1, 2],
            log.history(LogIndex(4), false),
            // Written at 2, but its changes end at 1: not taken for 3.
            short.history(LogIndex(2), false),
        ] {
            let fresh = ChangeLog::restore(LogIndex(3), &history, budget(1 << 20));
            assert_eq!(fresh.kept_after, ChangePosition::entry_end(LogIndex(3)));
            assert_eq!(fresh.changes.len(), 0);
        }
    }

    #[test]
    fn changes_older_than_the_age_budget_before_the_newest_entry_go() {
        let mut log = ChangeLog::new(
            LogIndex(0),
            Budget {
                bytes: 1 << 20,
                age_ms: 30,
            },
        );
        // Entry times 10..=40: none is older than 30 ms before the newest.
        for index in 1..=4 {
            log.push(vec![(event(index * 10), 0)], time(index * 10));
        }
        assert_eq!(log.changes.len(), 4);
        // An entry at 60 without changes (an idle leader's no-op): what is
        // older than 30 goes.
        log.push(Vec::new(), time(60));
        assert_eq!(log.kept_after, ChangePosition::entry_end(LogIndex(20)));
        assert_eq!(log.changes.len(), 2);
    }
}

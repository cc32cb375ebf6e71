//! The changes a replica keeps for change feeds: what its applied entries
//! yielded, in log order, within a budget of estimated bytes. Kept in
//! memory: a restart, or a snapshot installed from the leader, starts it
//! again after the state it restored, and an asked position older than
//! what it keeps is answered as expired, never with a gap.

use std::collections::VecDeque;

use harbor_reservation::Event;
use harbor_types::sim::probe;
use harbor_types::{LogIndex, Timestamp};
use harbor_wire::{Change, ChangePosition, ChangesPage};

pub(crate) struct ChangeLog {
    changes: VecDeque<Change>,
    /// Everything after this position that has applied is in `changes`.
    kept_after: ChangePosition,
    bytes: usize,
    budget_bytes: usize,
}

impl ChangeLog {
    /// Starts after the entry at `applied`: the state was restored there.
    pub(crate) fn new(applied: LogIndex, budget_bytes: usize) -> ChangeLog {
        ChangeLog {
            changes: VecDeque::new(),
            kept_after: ChangePosition::entry_end(applied),
            bytes: 0,
            budget_bytes,
        }
    }

    /// The state was replaced by a snapshot at `applied`: the changes of the
    /// entries it covers were never seen here.
    pub(crate) fn restart(&mut self, applied: LogIndex) {
        self.changes.clear();
        self.bytes = 0;
        self.kept_after = ChangePosition::entry_end(applied);
    }

    /// The events of one applied entry, in order.
    pub(crate) fn push(&mut self, events: Vec<Event>) {
        let count = events.len();
        for (sub, event) in events.into_iter().enumerate() {
            let change = Change {
                sub: sub as u32,
                last: sub + 1 == count,
                event,
            };
            self.bytes += estimated_bytes(&change);
            self.changes.push_back(change);
        }
        while self.bytes > self.budget_bytes {
            let Some(oldest) = self.changes.pop_front() else {
                break;
            };
            probe("changes.evicted_for_budget");
            self.bytes -= estimated_bytes(&oldest);
            self.kept_after = oldest.cursor();
        }
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

    fn positions(page: &ChangesPage) -> Vec<ChangePosition> {
        page.changes.iter().map(Change::position).collect()
    }

    #[test]
    fn pages_resume_inside_an_entry_and_cover_entries_without_changes() {
        let mut log = ChangeLog::new(LogIndex(0), 1 << 20);
        log.push(vec![event(1), event(1), event(1)]);
        log.push(Vec::new());
        log.push(vec![event(3)]);
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
        let budget = 3 * estimated_bytes(&Change {
            sub: 0,
            last: true,
            event: event(1),
        });
        let mut log = ChangeLog::new(LogIndex(0), budget);
        for index in 1..=5 {
            log.push(vec![event(index)]);
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
        assert!(log.retained_bytes() <= budget);
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
}

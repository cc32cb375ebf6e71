//! One module per promise. Each states the promise it guards in its doc
//! comment and in [`crate::Property::promise`], and its tests include a
//! history that breaks the promise on purpose, to show the checker can fail.

mod acknowledged_writes_survive;
mod bounded_reads;
mod failed_means_not_applied;
mod never_oversold;
mod one_leader_per_generation;
mod one_owner_per_bucket;
mod session_reads;
mod strong_reads_not_stale;
mod token_single_reservation;

pub use acknowledged_writes_survive::AcknowledgedWritesSurvive;
pub use bounded_reads::{BoundedReads, BOUNDED_STALENESS_MS_DEFAULT};
pub use failed_means_not_applied::FailedMeansNotApplied;
pub use never_oversold::NeverOversold;
pub use one_leader_per_generation::OneLeaderPerGeneration;
pub use one_owner_per_bucket::OneOwnerPerBucket;
pub use session_reads::SessionReads;
pub use strong_reads_not_stale::StrongReadsNotStale;
pub use token_single_reservation::TokenSingleReservation;

use harbor_types::{CommitToken, ShardId};
use std::collections::HashMap;

/// Whether `applied` includes `token`: commit tokens are ordered per shard by
/// `(generation, index)`. `None` across shards, whose positions are unrelated
/// (a bucket may have moved), so nothing can be concluded.
pub(crate) fn includes(applied: CommitToken, token: CommitToken) -> Option<bool> {
    (applied.shard == token.shard)
        .then(|| (applied.generation, applied.index) >= (token.generation, token.index))
}

/// A token that an answer should have included, and the op it came from.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Seen {
    pub token: CommitToken,
    pub op: u64,
}

/// Per shard, the newest commit token seen at or before each moment;
/// answers "what is the newest token that was known strictly before `t`?".
#[derive(Default)]
pub(crate) struct Timeline {
    /// Shard → (time_ms, running newest) sorted by time.
    by_shard: HashMap<ShardId, Vec<(u64, Seen)>>,
}

impl Timeline {
    /// `events` are `(time_ms, seen)` in any order.
    pub fn new(mut events: Vec<(u64, Seen)>) -> Timeline {
        events.sort_by_key(|(time_ms, _)| *time_ms);
        let mut timeline = Timeline::default();
        for (time_ms, seen) in events {
            let list = timeline.by_shard.entry(seen.token.shard).or_default();
            let newest = match list.last() {
                Some((_, prev)) if prev.token > seen.token => *prev,
                _ => seen,
            };
            list.push((time_ms, newest));
        }
        timeline
    }

    pub fn newest_before(&self, shard: ShardId, time_ms: u64) -> Option<Seen> {
        let list = self.by_shard.get(&shard)?;
        let n = list.partition_point(|(t, _)| *t < time_ms);
        n.checked_sub(1).map(|i| list[i].1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::ct;

    #[test]
    fn tokens_compare_by_generation_then_index_within_a_shard_only() {
        assert_eq!(includes(ct("shard1@g2:1"), ct("shard1@g1:99")), Some(true));
        assert_eq!(includes(ct("shard1@g1:5"), ct("shard1@g1:5")), Some(true));
        assert_eq!(includes(ct("shard1@g1:5"), ct("shard1@g1:6")), Some(false));
        assert_eq!(includes(ct("shard2@g9:9"), ct("shard1@g1:1")), None);
    }

    #[test]
    fn timeline_answers_strictly_before() {
        let seen = |token: &str, op| Seen {
            token: ct(token),
            op,
        };
        let timeline = Timeline::new(vec![
            (20, seen("shard1@g1:5", 2)),
            (10, seen("shard1@g1:7", 1)),
            (30, seen("shard2@g1:1", 3)),
        ]);
        assert!(timeline.newest_before(ShardId(1), 10).is_none());
        assert_eq!(timeline.newest_before(ShardId(1), 11).unwrap().op, 1);
        assert_eq!(timeline.newest_before(ShardId(1), 99).unwrap().op, 1);
        assert!(timeline.newest_before(ShardId(2), 30).is_none());
    }
}

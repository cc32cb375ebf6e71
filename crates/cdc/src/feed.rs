//! The change feed's rules, without IO: where a feed stands in each
//! group's change stream (its cursor), what it sends for a replica's page
//! of changes, and when it may send a resolved mark. The HTTP feed
//! (`GET /v1/changefeed`, in `feed_http`) and the simulator's feed
//! consumer drive the same [`Feed`].
//!
//! Rules it keeps:
//! - A change is sent once per position, in log order per group: a page
//!   is taken only at the position it was asked after, and the position
//!   moves past each change as it is sent.
//! - A resolved mark at T is sent only once every group of the feed has
//!   promised T (its replica had applied everything committed, and every
//!   change at or before T was in the pages already taken): the minimum
//!   over groups, never moving back.
//! - A position older than what a replica keeps is refused as expired,
//!   never skipped.

use std::collections::BTreeMap;

use harbor_types::{LogIndex, ShardId, Timestamp};
use harbor_wire::{Change, ChangePosition, ChangesPage};

/// Where a feed stands in each of its groups' change streams. Its text
/// form is the opaque `cursor` of the feed's lines:
/// `c1.SHARD-INDEX-SUB...` with `e` for the end of an entry.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FeedCursor(pub BTreeMap<ShardId, ChangePosition>);

impl FeedCursor {
    pub fn encode(&self) -> String {
        let mut text = String::from("c1");
        for (shard, at) in &self.0 {
            let sub = match at.sub {
                u32::MAX => "e".to_string(),
                sub => sub.to_string(),
            };
            text.push_str(&format!(".{}-{}-{sub}", shard.0, at.index.0));
        }
        text
    }

    pub fn parse(text: &str) -> Result<FeedCursor, String> {
        let mut parts = text.split('.');
        if parts.next() != Some("c1") {
            return Err(format!("{text:?} is not a cursor of this feed"));
        }
        let mut positions = BTreeMap::new();
        for part in parts {
            let bad = || format!("{text:?} is not a cursor of this feed (at {part:?})");
            let fields: Vec<&str> = part.split('-').collect();
            let [shard, index, sub] = fields[..] else {
                return Err(bad());
            };
            let shard = ShardId(shard.parse().map_err(|_| bad())?);
            let index = LogIndex(index.parse().map_err(|_| bad())?);
            let sub = match sub {
                "e" => u32::MAX,
                sub => sub.parse().map_err(|_| bad())?,
            };
            if positions
                .insert(shard, ChangePosition { index, sub })
                .is_some()
            {
                return Err(bad());
            }
        }
        if positions.is_empty() {
            return Err(format!("{text:?} follows no group"));
        }
        Ok(FeedCursor(positions))
    }
}

/// What a feed sends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Sent {
    /// A change of `shard`, and the cursor right after it.
    Change {
        shard: ShardId,
        change: Box<Change>,
        cursor: FeedCursor,
    },
    /// Every change at or before `resolved` on the feed's groups was sent.
    Resolved {
        resolved: Timestamp,
        cursor: FeedCursor,
    },
}

/// A page answered for a position older than its replica keeps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Expired {
    pub shard: ShardId,
    /// The oldest position that replica can continue from.
    pub oldest: ChangePosition,
}

/// One feed over a set of groups.
#[derive(Clone, Debug)]
pub struct Feed {
    at: FeedCursor,
    /// Each group's newest resolved time taken so far.
    resolved: BTreeMap<ShardId, Timestamp>,
    sent_resolved: Option<Timestamp>,
}

impl Feed {
    /// A feed that stands at `start` (one position per group it follows).
    pub fn new(start: FeedCursor) -> Feed {
        Feed {
            at: start,
            resolved: BTreeMap::new(),
            sent_resolved: None,
        }
    }

    pub fn shards(&self) -> Vec<ShardId> {
        self.at.0.keys().copied().collect()
    }

    /// Where the next page of `shard` must be asked from.
    pub fn position(&self, shard: ShardId) -> ChangePosition {
        self.at.0[&shard]
    }

    pub fn cursor(&self) -> &FeedCursor {
        &self.at
    }

    /// Takes `page`, asked of a replica of `shard` after
    /// [`Feed::position`]: the changes to send, each with the cursor after
    /// it.
    pub fn take(&mut self, shard: ShardId, page: ChangesPage) -> Result<Vec<Sent>, Expired> {
        if let Some(oldest) = page.expired {
            return Err(Expired { shard, oldest });
        }
        let mut sent = Vec::with_capacity(page.changes.len());
        for change in page.changes {
            let cursor = change.cursor();
            assert!(
                cursor > self.at.0[&shard],
                "{shard}: change at {cursor:?} is not after the feed's position {:?}",
                self.at.0[&shard]
            );
            self.at.0.insert(shard, cursor);
            sent.push(Sent::Change {
                shard,
                change: Box::new(change),
                cursor: self.at.clone(),
            });
        }
        let at = self.at.0.get_mut(&shard).expect("a shard of the feed");
        *at = (*at).max(page.upto);
        if let Some(resolved) = page.resolved {
            let newest = self.resolved.entry(shard).or_insert(resolved);
            *newest = (*newest).max(resolved);
        }
        Ok(sent)
    }

    /// The resolved mark every group has promised, sent or not (the last
    /// line of a feed that ends).
    pub fn resolved_now(&self) -> Option<Sent> {
        let resolved = self.promised()?;
        Some(Sent::Resolved {
            resolved,
            cursor: self.at.clone(),
        })
    }

    /// A resolved mark, when every group has promised a time past the last
    /// one sent.
    pub fn resolved(&mut self) -> Option<Sent> {
        let low = self.promised()?;
        if self.sent_resolved.is_some_and(|sent| sent >= low) {
            return None;
        }
        self.sent_resolved = Some(low);
        self.resolved_now()
    }

    /// The time every group of the feed has promised: the oldest of their
    /// marks, once each has given one.
    fn promised(&self) -> Option<Timestamp> {
        if self.resolved.len() < self.at.0.len() {
            return None;
        }
        self.resolved.values().min().copied()
    }
}

#[cfg(test)]
mod tests {
    use harbor_reservation::Event;
    use harbor_types::{Amount, CommitToken, Generation, IssuerId};

    use super::*;

    fn change(shard: u32, index: u64, sub: u32, last: bool) -> Change {
        Change {
            sub,
            last,
            event: Event::LimitChanged {
                position: CommitToken {
                    shard: ShardId(shard),
                    generation: Generation(1),
                    index: LogIndex(index),
                },
                at: Timestamp::from_wall_ms(index),
                issuer_id: IssuerId::new("acme").unwrap(),
                limit_before: Amount(1),
                limit: Amount(2),
            },
        }
    }

    fn page(changes: Vec<Change>, upto: u64, resolved: Option<u64>) -> ChangesPage {
        ChangesPage {
            changes,
            upto: ChangePosition::entry_end(LogIndex(upto)),
            resolved: resolved.map(Timestamp::from_wall_ms),
            expired: None,
        }
    }

    #[test]
    fn a_cursor_reads_back_and_refuses_what_it_did_not_write() {
        let mut positions = BTreeMap::new();
        positions.insert(ShardId(0), ChangePosition::entry_end(LogIndex(120)));
        positions.insert(
            ShardId(3),
            ChangePosition {
                index: LogIndex(55),
                sub: 2,
            },
        );
        let cursor = FeedCursor(positions);
        assert_eq!(cursor.encode(), "c1.0-120-e.3-55-2");
        assert_eq!(FeedCursor::parse(&cursor.encode()), Ok(cursor));
        for bad in [
            "",
            "c2.0-1-e",
            "c1.0-1",
            "c1.x-1-e",
            "c1.0-1-e.0-2-e",
            "c1.0-1-e-3",
        ] {
            assert!(FeedCursor::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn resolved_waits_for_every_group_and_never_moves_back() {
        let start = FeedCursor(
            [ShardId(0), ShardId(1)]
                .into_iter()
                .map(|s| (s, ChangePosition::START))
                .collect(),
        );
        let mut feed = Feed::new(start);
        let sent = feed
            .take(
                ShardId(0),
                page(
                    vec![change(0, 1, 0, false), change(0, 1, 1, true)],
                    4,
                    Some(10),
                ),
            )
            .unwrap();
        assert_eq!(sent.len(), 2);
        let Sent::Change { cursor, .. } = &sent[0] else {
            panic!()
        };
        assert_eq!(
            cursor.0[&ShardId(0)],
            ChangePosition {
                index: LogIndex(1),
                sub: 0
            }
        );
        assert_eq!(
            feed.position(ShardId(0)),
            ChangePosition::entry_end(LogIndex(4))
        );
        assert_eq!(feed.resolved(), None, "group 1 promised nothing yet");
        feed.take(ShardId(1), page(Vec::new(), 2, Some(7))).unwrap();
        assert!(
            matches!(feed.resolved(), Some(Sent::Resolved { resolved, .. }) if resolved == Timestamp::from_wall_ms(7))
        );
        assert_eq!(feed.resolved(), None, "nothing newer");
        // An older mark from a replica that lags changes nothing.
        feed.take(ShardId(1), page(Vec::new(), 2, Some(5))).unwrap();
        assert_eq!(feed.resolved(), None);
        let expired = ChangesPage {
            expired: Some(ChangePosition::entry_end(LogIndex(9))),
            ..page(Vec::new(), 0, None)
        };
        assert_eq!(
            feed.take(ShardId(1), expired),
            Err(Expired {
                shard: ShardId(1),
                oldest: ChangePosition::entry_end(LogIndex(9))
            })
        );
    }
}

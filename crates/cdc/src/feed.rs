//! The change feed's rules, without IO: where a feed stands in each
//! group's change stream (its cursor), what it sends for a replica's page
//! of changes or of an initial scan, and when it may send a resolved mark.
//! The HTTP feed (`GET /v1/changefeed`), the sinks and the simulator's
//! feed consumer drive the same [`Feed`].
//!
//! Rules it keeps:
//! - A change is sent once per position, in log order per group: a page
//!   is taken only at the position it was asked after, and the position
//!   moves past each change as it is sent.
//! - A group whose log no longer reaches back to where the feed starts
//!   from the beginning is **scanned** instead: its current rows are sent
//!   as snapshot rows, page by page (each page at the position its
//!   replica had applied, none before the first page's), then its changes
//!   follow from the first page's position. A later change of a row can
//!   therefore repeat what a later page's snapshot row already showed; a
//!   consumer applies a change to a key only if it is after the snapshot
//!   row it holds for it.
//! - A resolved mark at T is sent only once every group of the feed has
//!   promised T (its replica had applied everything committed, and every
//!   change at or before T was in the pages already taken, or in its
//!   scan): the minimum over groups, never moving back.
//! - A position older than what a replica keeps is refused as expired,
//!   never skipped.

use std::collections::BTreeMap;

use harbor_reservation::{IssuerView, ReservationView, ScanKey};
use harbor_types::sim::probe;
use harbor_types::{IssuerId, LogIndex, ShardId, Timestamp};
use harbor_wire::{Change, ChangePosition, ChangesPage, ScanPage};

/// Where a feed (or a projection) stands in one group.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Place {
    /// After this position of the group's change stream.
    At(ChangePosition),
    /// Inside a scan of the group's state: the first page stood at
    /// `start` (where the changes then follow from), the rows up to
    /// `after` are taken.
    Scan {
        start: Option<ChangePosition>,
        after: Option<ScanKey>,
    },
}

impl Place {
    /// The start of a scan.
    pub const SCAN: Place = Place::Scan {
        start: None,
        after: None,
    };
}

/// What to ask a group for next.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Next {
    /// A page of the group's state after this key (`None`: from the start).
    Scan(Option<ScanKey>),
    /// A page of the group's changes after this position.
    Changes(ChangePosition),
}

/// Where a feed stands in each of its groups. Its text form is the opaque
/// `cursor` of the feed's lines: `c1.` then per group
/// `SHARD-INDEX-SUB` (`e` for the end of an entry), or inside a scan
/// `SHARD-s-START-KEY` (`x` for none yet; a key is the issuer id in hex,
/// `_` and the reservation's seq).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FeedCursor(pub BTreeMap<ShardId, Place>);

impl FeedCursor {
    /// Every group of `shards` at `at`.
    pub fn at(shards: impl IntoIterator<Item = ShardId>, at: ChangePosition) -> FeedCursor {
        FeedCursor(shards.into_iter().map(|s| (s, Place::At(at))).collect())
    }

    pub fn encode(&self) -> String {
        let mut text = String::from("c1");
        for (shard, place) in &self.0 {
            match place {
                Place::At(at) => {
                    let sub = match at.sub {
                        u32::MAX => "e".to_string(),
                        sub => sub.to_string(),
                    };
                    text.push_str(&format!(".{}-{}-{sub}", shard.0, at.index.0));
                }
                Place::Scan { start, after } => {
                    let start = start.map_or("x".to_string(), |s| s.index.0.to_string());
                    let key = after.as_ref().map_or("x".to_string(), |k| {
                        let hex: String = k
                            .issuer_id
                            .as_str()
                            .bytes()
                            .map(|b| format!("{b:02x}"))
                            .collect();
                        format!("{hex}_{}", k.seq)
                    });
                    text.push_str(&format!(".{}-s-{start}-{key}", shard.0));
                }
            }
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
            let (shard, place) = match fields[..] {
                [shard, "s", start, key] => {
                    let start = match start {
                        "x" => None,
                        index => Some(ChangePosition::entry_end(LogIndex(
                            index.parse().map_err(|_| bad())?,
                        ))),
                    };
                    let after = match key {
                        "x" => None,
                        key => Some(parse_key(key).ok_or_else(bad)?),
                    };
                    if start.is_none() && after.is_some() {
                        return Err(bad());
                    }
                    (shard, Place::Scan { start, after })
                }
                [shard, index, sub] => {
                    let index = LogIndex(index.parse().map_err(|_| bad())?);
                    let sub = match sub {
                        "e" => u32::MAX,
                        sub => sub.parse().map_err(|_| bad())?,
                    };
                    (shard, Place::At(ChangePosition { index, sub }))
                }
                _ => return Err(bad()),
            };
            let shard = ShardId(shard.parse().map_err(|_| bad())?);
            if positions.insert(shard, place).is_some() {
                return Err(bad());
            }
        }
        if positions.is_empty() {
            return Err(format!("{text:?} follows no group"));
        }
        Ok(FeedCursor(positions))
    }
}

fn parse_key(text: &str) -> Option<ScanKey> {
    let (hex, seq) = text.split_once('_')?;
    if hex.len() % 2 != 0 {
        return None;
    }
    let bytes: Option<Vec<u8>> = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
        .collect();
    let issuer_id = IssuerId::new(String::from_utf8(bytes?).ok()?).ok()?;
    Some(ScanKey {
        issuer_id,
        seq: seq.parse().ok()?,
    })
}

/// A row of a group's state, as a scan sends it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SnapshotRow {
    Issuer(IssuerView),
    Reservation(ReservationView),
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
    /// A row of `shard`'s state as it stood at `at`, and the cursor right
    /// after it.
    Snapshot {
        shard: ShardId,
        row: Box<SnapshotRow>,
        at: ChangePosition,
        cursor: FeedCursor,
    },
    /// Every change at or before `resolved` on the feed's groups was sent
    /// (or is reflected in a snapshot row sent).
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

/// A scan page that stands before its scan's first page: its rows may miss
/// changes that will not follow. Ask again (another replica, or later).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StaleScanPage {
    pub shard: ShardId,
    pub at: ChangePosition,
    pub start: ChangePosition,
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
    /// A feed that stands at `start` (one place per group it follows).
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

    /// What to ask `shard` for next.
    pub fn next(&self, shard: ShardId) -> Next {
        match &self.at.0[&shard] {
            Place::At(at) => Next::Changes(*at),
            Place::Scan { after, .. } => Next::Scan(after.clone()),
        }
    }

    /// Whether the feed has taken `shard`'s changes up to `end`.
    pub fn reached(&self, shard: ShardId, end: ChangePosition) -> bool {
        matches!(self.at.0[&shard], Place::At(at) if at >= end)
    }

    pub fn cursor(&self) -> &FeedCursor {
        &self.at
    }

    /// Where a scan page of `shard` must stand at least: its scan's first
    /// page (`None`: anywhere, or not scanning).
    pub fn scan_floor(&self, shard: ShardId) -> Option<ChangePosition> {
        match &self.at.0[&shard] {
            Place::Scan { start, .. } => *start,
            Place::At(_) => None,
        }
    }

    /// Scans `shard` instead of reading its changes: its log no longer
    /// reaches back to where the feed stood, which was the beginning.
    /// Refused (false) anywhere else: a gap there is the consumer's to know.
    pub fn scan_from_the_beginning(&mut self, shard: ShardId) -> bool {
        if self.at.0[&shard] != Place::At(ChangePosition::START) {
            return false;
        }
        probe("feed.scanned_from_the_beginning");
        self.at.0.insert(shard, Place::SCAN);
        self.resolved.remove(&shard);
        true
    }

    /// Takes `page`, asked of a replica of `shard` after what
    /// [`Feed::next`] said: the changes to send, each with the cursor
    /// after it.
    pub fn take(&mut self, shard: ShardId, page: ChangesPage) -> Result<Vec<Sent>, Expired> {
        if let Some(oldest) = page.expired {
            return Err(Expired { shard, oldest });
        }
        let Place::At(mut at) = self.at.0[&shard] else {
            panic!("{shard}: changes taken during its scan");
        };
        let mut sent = Vec::with_capacity(page.changes.len());
        for change in page.changes {
            let cursor = change.cursor();
            assert!(
                cursor > at,
                "{shard}: change at {cursor:?} is not after the feed's position {at:?}"
            );
            at = cursor;
            self.at.0.insert(shard, Place::At(at));
            sent.push(Sent::Change {
                shard,
                change: Box::new(change),
                cursor: self.at.clone(),
            });
        }
        self.at.0.insert(shard, Place::At(at.max(page.upto)));
        if let Some(resolved) = page.resolved {
            let newest = self.resolved.entry(shard).or_insert(resolved);
            *newest = (*newest).max(resolved);
        }
        Ok(sent)
    }

    /// Takes a scan page of `shard`, asked after what [`Feed::next`] said:
    /// its rows, each with the cursor after it. The last row of the scan's
    /// last page carries the cursor where its changes follow.
    pub fn take_scan(
        &mut self,
        shard: ShardId,
        page: ScanPage,
    ) -> Result<Vec<Sent>, StaleScanPage> {
        let Place::Scan { start, .. } = &self.at.0[&shard] else {
            panic!("{shard}: a scan page taken while not scanning");
        };
        let start = start.unwrap_or(page.at);
        if page.at < start {
            return Err(StaleScanPage {
                shard,
                at: page.at,
                start,
            });
        }
        let rows: Vec<(ScanKey, SnapshotRow)> = page
            .rows
            .issuers
            .into_iter()
            .map(|i| (ScanKey::issuer(i.issuer_id.clone()), SnapshotRow::Issuer(i)))
            .chain(page.rows.reservations.into_iter().map(|r| {
                let key = ScanKey {
                    issuer_id: r.issuer_id.clone(),
                    seq: r.reservation_id.seq(),
                };
                (key, SnapshotRow::Reservation(r))
            }))
            .collect();
        // Rows in scan order: an issuer's row, then its reservations.
        let mut rows = rows;
        rows.sort_by(|a, b| a.0.cmp(&b.0));
        let done = page.rows.next.is_none();
        let count = rows.len();
        let mut sent = Vec::with_capacity(count);
        for (n, (key, row)) in rows.into_iter().enumerate() {
            let place = if done && n + 1 == count {
                Place::At(start)
            } else {
                Place::Scan {
                    start: Some(start),
                    after: Some(key),
                }
            };
            self.at.0.insert(shard, place);
            sent.push(Sent::Snapshot {
                shard,
                row: Box::new(row),
                at: page.at,
                cursor: self.at.clone(),
            });
        }
        let place = match page.rows.next {
            None => Place::At(start),
            Some(after) => Place::Scan {
                start: Some(start),
                after: Some(after),
            },
        };
        self.at.0.insert(shard, place);
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
    pub fn promised(&self) -> Option<Timestamp> {
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
            epoch: 0,
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
        positions.insert(
            ShardId(0),
            Place::At(ChangePosition::entry_end(LogIndex(120))),
        );
        positions.insert(
            ShardId(3),
            Place::At(ChangePosition {
                index: LogIndex(55),
                sub: 2,
            }),
        );
        positions.insert(
            ShardId(4),
            Place::Scan {
                start: Some(ChangePosition::entry_end(LogIndex(9))),
                after: Some(ScanKey {
                    issuer_id: IssuerId::new("MUNI-7.a").unwrap(),
                    seq: 12,
                }),
            },
        );
        positions.insert(ShardId(5), Place::SCAN);
        let cursor = FeedCursor(positions);
        assert_eq!(
            cursor.encode(),
            "c1.0-120-e.3-55-2.4-s-9-4d554e492d372e61_12.5-s-x-x"
        );
        assert_eq!(FeedCursor::parse(&cursor.encode()), Ok(cursor));
        for bad in [
            "",
            "c2.0-1-e",
            "c1.0-1",
            "c1.x-1-e",
            "c1.0-1-e.0-2-e",
            "c1.0-1-e-3",
            "c1.0-s-x-4d_1",
            "c1.0-s-3-4_1",
            "c1.0-s-3-zz_1",
        ] {
            assert!(FeedCursor::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn resolved_waits_for_every_group_and_never_moves_back() {
        let start = FeedCursor::at([ShardId(0), ShardId(1)], ChangePosition::START);
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
            Place::At(ChangePosition {
                index: LogIndex(1),
                sub: 0
            })
        );
        assert_eq!(
            feed.next(ShardId(0)),
            Next::Changes(ChangePosition::entry_end(LogIndex(4)))
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

    #[test]
    fn a_feed_from_the_beginning_scans_a_group_whose_log_does_not_reach_back() {
        use harbor_reservation::{ApplyContext, Command, StateMachine};
        use harbor_types::{Region, ReservationToken};

        let mut machine = StateMachine::default();
        let mut apply = |index: u64, cmd: Command| {
            let ctx = ApplyContext {
                position: CommitToken {
                    shard: ShardId(0),
                    generation: Generation(1),
                    index: LogIndex(index),
                },
                at: Timestamp::from_wall_ms(index),
            };
            machine.apply(&ctx, &cmd);
        };
        apply(
            1,
            Command::UpsertIssuer {
                issuer_id: IssuerId::new("acme").unwrap(),
                home_region: Region::new("madrid").unwrap(),
                limit: Amount(100),
            },
        );
        for (index, token) in [(2, "a"), (3, "b")] {
            apply(
                index,
                Command::Reserve {
                    token: ReservationToken::new(token).unwrap(),
                    issuer_id: IssuerId::new("acme").unwrap(),
                    amount: Amount(1),
                    desk: "d".into(),
                    trader: "t".into(),
                    hold_ttl_ms: None,
                },
            );
        }
        let page = |after: Option<&ScanKey>, at: u64| ScanPage {
            rows: machine.scan(after, 2),
            at: ChangePosition::entry_end(LogIndex(at)),
            at_time: None,
        };
        let mut feed = Feed::new(FeedCursor::at([ShardId(0)], ChangePosition::START));
        assert!(feed.scan_from_the_beginning(ShardId(0)));
        let first = feed.take_scan(ShardId(0), page(None, 5)).unwrap();
        assert_eq!(first.len(), 2, "the issuer and its first reservation");
        let Sent::Snapshot { cursor, at, .. } = &first[1] else {
            panic!("{first:?}")
        };
        assert_eq!(*at, ChangePosition::entry_end(LogIndex(5)));
        // A consumer that stops here resumes inside the scan.
        let resumed = FeedCursor::parse(&cursor.encode()).unwrap();
        assert_eq!(resumed, *cursor);
        let Next::Scan(after) = feed.next(ShardId(0)) else {
            panic!("still scanning")
        };
        assert_eq!(
            feed.take_scan(ShardId(0), page(after.as_ref(), 4)),
            Err(StaleScanPage {
                shard: ShardId(0),
                at: ChangePosition::entry_end(LogIndex(4)),
                start: ChangePosition::entry_end(LogIndex(5)),
            })
        );
        let last = feed.take_scan(ShardId(0), page(after.as_ref(), 6)).unwrap();
        let Some(Sent::Snapshot { cursor, .. }) = last.last() else {
            panic!("{last:?}")
        };
        assert_eq!(
            cursor.0[&ShardId(0)],
            Place::At(ChangePosition::entry_end(LogIndex(5))),
            "the changes follow from where the first page stood"
        );
        assert_eq!(feed.resolved(), None, "no tail page promised anything yet");
        assert!(
            !feed.scan_from_the_beginning(ShardId(0)),
            "past the beginning, an expired position is the consumer's to know"
        );
    }
}

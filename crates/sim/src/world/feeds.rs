//! A change-feed consumer on every seed: the gateway's [`Feed`] reading
//! the groups' change streams from replicas chosen at random (whatever
//! their role, up to date or not), in small pages, with consumer crashes
//! that resume from an older checkpointed cursor. At the end, every
//! session of the feed is checked against what the replicas hold:
//!
//! - every change is delivered once per position, in log order, with no
//!   position skipped and the content every replica agrees on;
//! - a resolved mark at T comes after every change with a time at or
//!   before T.

use std::collections::btree_map::Entry as MapEntry;
use std::ops::Bound::{Excluded, Included, Unbounded};

use harbor_cdc::feed::{Feed, FeedCursor, Next, Place, Sent};
use harbor_types::Timestamp;
use harbor_wire::{Change, ChangePosition};

use super::*;

/// How often the consumer asks for more.
const FEED_POLL_MS: (u64, u64) = (10, 80);

pub(super) struct SimFeed {
    feed: Feed,
    /// Every change any replica held at any poll, by group and position:
    /// the reference the sessions are checked against.
    truth: BTreeMap<ShardId, BTreeMap<ChangePosition, Change>>,
    /// Where the consumer durably stands: it resumes here after a crash.
    checkpoint: FeedCursor,
    sessions: Vec<FeedSession>,
}

/// What one connection of the consumer received, from its start cursor.
struct FeedSession {
    start: FeedCursor,
    received: Vec<Received>,
    /// Where the feed stood when the session ended (or now).
    end: FeedCursor,
}

enum Received {
    Change(ShardId, ChangePosition, Box<Change>),
    Resolved(Timestamp, FeedCursor),
    /// The group's initial scan ended; its changes follow from here.
    ScanDone(ShardId, ChangePosition),
}

impl SimFeed {
    pub(super) fn new(shards: impl Iterator<Item = ShardId>) -> SimFeed {
        let start = FeedCursor::at(shards, ChangePosition::START);
        SimFeed {
            feed: Feed::new(start.clone()),
            truth: BTreeMap::new(),
            checkpoint: start.clone(),
            sessions: vec![FeedSession {
                start: start.clone(),
                received: Vec::new(),
                end: start,
            }],
        }
    }

    /// Every change any replica held, by group and position.
    pub(super) fn truth(&self) -> &BTreeMap<ShardId, BTreeMap<ChangePosition, Change>> {
        &self.truth
    }

    fn resume(&mut self, from: FeedCursor) {
        self.feed = Feed::new(from.clone());
        self.sessions.push(FeedSession {
            start: from.clone(),
            received: Vec::new(),
            end: from,
        });
    }
}

impl World {
    pub(super) fn start_feed(&mut self) {
        self.feed = Some(SimFeed::new(self.groups.keys().copied()));
        let at = self.now + self.rng.range(FEED_POLL_MS.0, FEED_POLL_MS.1);
        self.schedule(at, Event::FeedPoll);
    }

    /// One round of the consumer: a page of every group from a replica
    /// picked at random, then a resolved mark if every group promised one.
    pub(super) fn feed_poll(&mut self) {
        let Some(mut sim) = self.feed.take() else {
            return;
        };
        if self.safety && self.rng.chance(2) {
            // The consumer crashed: it resumes from its checkpoint, or
            // a new one starts from the beginning.
            self.stats.feed_restarts += 1;
            let from = if self.rng.chance(30) {
                FeedCursor::at(self.groups.keys().copied(), ChangePosition::START)
            } else {
                sim.checkpoint.clone()
            };
            self.trace(|| format!("feed consumer restarts from {from:?}"));
            sim.resume(from);
        }
        self.gather_truth(&mut sim);
        for shard in sim.feed.shards() {
            let members = self.groups[&shard].members.clone();
            let node = self.rng.pick(&members).clone();
            let Some(driver) = self.nodes[&node].replicas.get(&shard) else {
                continue;
            };
            if !self.nodes[&node].up || self.nodes[&node].paused_until > self.now {
                continue;
            }
            let max = self.rng.range(1, 8) as usize;
            let after = match sim.feed.next(shard) {
                Next::Changes(after) => after,
                Next::Scan(key) => {
                    let page = driver.group().scan(key.as_ref(), max);
                    self.trace(|| format!("feed {shard} scan from {node} at {:?}", page.at));
                    if sim.feed.take_scan(shard, page).is_ok() {
                        if let Next::Changes(start) = sim.feed.next(shard) {
                            let session = sim.sessions.last_mut().unwrap();
                            session.received.push(Received::ScanDone(shard, start));
                        }
                    }
                    continue;
                }
            };
            let page = driver.group().changes(after, max);
            self.trace(|| {
                format!(
                    "feed {shard} from {node}: {} changes after {after:?}, up to {:?}, resolved {:?}, expired {:?}",
                    page.changes.len(),
                    page.upto,
                    page.resolved,
                    page.expired
                )
            });
            match sim.feed.take(shard, page) {
                Ok(sent) => {
                    let session = sim.sessions.last_mut().unwrap();
                    for sent in sent {
                        if let Sent::Change { shard, change, .. } = sent {
                            let position = change.position();
                            session
                                .received
                                .push(Received::Change(shard, position, change));
                        }
                    }
                }
                Err(_) if sim.feed.scan_from_the_beginning(shard) => {
                    // From the beginning on a log that no longer reaches
                    // back: the group's rows, then its changes.
                    self.stats.feed_scans += 1;
                }
                Err(expired) => {
                    // A real consumer gets `410 cursor_expired` and starts
                    // again where the replica can continue: a new session,
                    // whose gap is known.
                    self.stats.feed_expired += 1;
                    let mut from = sim.feed.cursor().clone();
                    from.0.insert(shard, Place::At(expired.oldest));
                    sim.sessions.last_mut().unwrap().end = sim.feed.cursor().clone();
                    sim.resume(from);
                }
            }
        }
        if let Some(Sent::Resolved { resolved, cursor }) = sim.feed.resolved() {
            self.stats.feed_resolved += 1;
            self.trace(|| format!("feed resolved {resolved:?} at {cursor:?}"));
            let session = sim.sessions.last_mut().unwrap();
            session.received.push(Received::Resolved(resolved, cursor));
        }
        sim.sessions.last_mut().unwrap().end = sim.feed.cursor().clone();
        if self.rng.chance(30) {
            sim.checkpoint = sim.feed.cursor().clone();
        }
        self.feed = Some(sim);
        let at = self.now + self.rng.range(FEED_POLL_MS.0, FEED_POLL_MS.1);
        self.schedule(at, Event::FeedPoll);
    }

    /// The feed's promises, against every change a replica held at a poll
    /// or holds now, and every change a page carried.
    pub(super) fn check_feed(&mut self) {
        let Some(mut sim) = self.feed.take() else {
            return;
        };
        self.gather_truth(&mut sim);
        for session in &sim.sessions {
            for received in &session.received {
                if let Received::Change(shard, _, change) = received {
                    let violation = add_truth(&mut sim.truth, *shard, change, "a page");
                    self.violations.extend(violation);
                }
            }
        }
        let truth = std::mem::take(&mut sim.truth);
        for (n, session) in sim.sessions.iter().enumerate() {
            self.check_session(n, session, &truth);
        }
    }

    /// What every replica holds past what the reference has: changes are
    /// evicted, so the reference is gathered as the run goes.
    pub(super) fn gather_truth(&mut self, sim: &mut SimFeed) {
        for (shard, group) in &self.groups {
            for member in &group.members {
                let Some(driver) = self.nodes[member].replicas.get(shard) else {
                    continue;
                };
                let after = sim
                    .truth
                    .get(shard)
                    .and_then(|t| t.keys().next_back().copied())
                    .unwrap_or(ChangePosition::START);
                for change in driver.group().kept_changes_after(after) {
                    let violation = add_truth(&mut sim.truth, *shard, &change, member.as_str());
                    self.violations.extend(violation);
                }
            }
        }
    }

    fn check_session(
        &mut self,
        n: usize,
        session: &FeedSession,
        truth: &BTreeMap<ShardId, BTreeMap<ChangePosition, Change>>,
    ) {
        let empty = BTreeMap::new();
        // Where each group's changes stand (`None` inside a scan).
        let mut at: BTreeMap<ShardId, Option<ChangePosition>> = session
            .start
            .0
            .iter()
            .map(|(shard, place)| match place {
                Place::At(at) => (*shard, Some(*at)),
                Place::Scan { .. } => (*shard, None),
            })
            .collect();
        for received in &session.received {
            match received {
                Received::ScanDone(shard, start) => {
                    at.insert(*shard, Some(*start));
                }
                Received::Change(shard, position, _) => {
                    let Some(before) = at[shard] else {
                        self.violations.push(format!(
                            "feed session {n}: {shard} change at {position:?} during its scan"
                        ));
                        continue;
                    };
                    if *position <= before {
                        self.violations.push(format!(
                            "feed session {n}: {shard} change at {position:?} after {before:?} (repeated or out of order)"
                        ));
                    }
                    let stream = truth.get(shard).unwrap_or(&empty);
                    // Positions strictly between hold nothing.
                    if let Some((skipped, _)) =
                        stream.range((Excluded(before), Excluded(*position))).next()
                    {
                        self.violations.push(format!(
                            "feed session {n}: {shard} skipped the change at {skipped:?} (delivered {position:?} after {before:?})"
                        ));
                    }
                    at.insert(*shard, Some(*position));
                }
                Received::Resolved(resolved, cursor) => {
                    for (shard, stream) in truth {
                        let Some(Place::At(upto)) = cursor.0.get(shard) else {
                            continue;
                        };
                        if let Some((late, change)) = stream
                            .range((Excluded(*upto), Unbounded))
                            .find(|(_, c)| c.event.at() <= *resolved)
                        {
                            self.violations.push(format!(
                                "feed session {n}: resolved {resolved:?} was sent before {shard}'s change at {late:?} of {:?}",
                                change.event.at()
                            ));
                            break;
                        }
                    }
                }
            }
        }
        // Nothing skipped between the last change and where the session
        // ended.
        for (shard, end) in &session.end.0 {
            let (Place::At(end), Some(last)) = (end, at[shard]) else {
                continue;
            };
            let stream = truth.get(shard).unwrap_or(&empty);
            if let Some((skipped, _)) = stream.range((Excluded(last), Included(*end))).next() {
                self.violations.push(format!(
                    "feed session {n}: {shard} moved past the change at {skipped:?} without delivering it"
                ));
            }
        }
    }
}

/// Adds a change to the reference; a different change at the same
/// position is a violation.
fn add_truth(
    truth: &mut BTreeMap<ShardId, BTreeMap<ChangePosition, Change>>,
    shard: ShardId,
    change: &Change,
    from: &str,
) -> Option<String> {
    let at = change.position();
    match truth.entry(shard).or_default().entry(at) {
        MapEntry::Vacant(v) => {
            v.insert(change.clone());
            None
        }
        MapEntry::Occupied(o) if o.get() != change => Some(format!(
            "feed: {shard} has two different changes at {at:?} ({from}): {:?} and {change:?}",
            o.get()
        )),
        MapEntry::Occupied(_) => None,
    }
}

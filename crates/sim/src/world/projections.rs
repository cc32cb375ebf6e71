//! A projection on every seed: `harbor_cdc`'s [`Projection`] scanning
//! and tailing the groups from replicas picked at random (whatever their
//! role, up to date or not), in small pages, through expired positions
//! (a rescan), crashes (a rebuild from nothing) and restarts from an
//! earlier save (what a gateway does at start). At random polls and at
//! the end it is checked against every change the replicas held (the
//! change feed's reference):
//!
//! - every change at or before the projection's position in its group is
//!   in (its row was written by it or by something later), and a row a
//!   change wrote holds what that change carried;
//! - every change with a time at or before the watermark is in;
//! - a commit token the projection says it includes has every change of
//!   its entry in.

use harbor_cdc::projection::{words, GroupBy, Next, Projection, Search};
use harbor_reservation::Event as Change;
use harbor_wire::ChangePosition;

use super::*;

/// How often the projection asks for more.
const PROJECTION_POLL_MS: (u64, u64) = (10, 80);

pub(super) struct SimProjection {
    projection: Projection,
    /// What the projection saved last, as a gateway does every few seconds.
    saved: Option<Vec<u8>>,
}

impl World {
    pub(super) fn start_projection(&mut self) {
        self.projection = Some(SimProjection {
            projection: Projection::new(self.groups.keys().copied(), self.node_config.bugs),
            saved: None,
        });
        let at = self.now + self.rng.range(PROJECTION_POLL_MS.0, PROJECTION_POLL_MS.1);
        self.schedule(at, Event::ProjectionPoll);
    }

    /// One round: a page of every group from a replica picked at random.
    pub(super) fn projection_poll(&mut self) {
        let Some(mut sim) = self.projection.take() else {
            return;
        };
        if self.safety && self.rng.chance(1) {
            // The projection's process crashed: it is rebuilt from nothing.
            self.stats.projection_rebuilds += 1;
            self.trace(|| "projection rebuilt from nothing".to_string());
            sim.projection = Projection::new(self.groups.keys().copied(), self.node_config.bugs);
            sim.saved = None;
        } else if self.rng.chance(10) {
            sim.saved = Some(sim.projection.save());
        } else if self.safety && self.rng.chance(2) {
            if let Some(saved) = &sim.saved {
                // Its process restarted: it goes on from its last save.
                self.stats.projection_reloads += 1;
                self.trace(|| "projection restarted from its last save".to_string());
                let shards = self.groups.keys().copied();
                sim.projection = match Projection::load(saved, shards, self.node_config.bugs) {
                    Ok(projection) => projection,
                    Err(why) => {
                        self.violations
                            .push(format!("projection: its own save does not load: {why}"));
                        Projection::new(self.groups.keys().copied(), self.node_config.bugs)
                    }
                };
            }
        }
        for shard in sim.projection.shards() {
            let members = self.groups[&shard].members.clone();
            let node = self.rng.pick(&members).clone();
            let Some(driver) = self.nodes[&node].replicas.get(&shard) else {
                continue;
            };
            if !self.nodes[&node].up || self.nodes[&node].paused_until > self.now {
                continue;
            }
            let max = self.rng.range(1, 8) as usize;
            match sim.projection.next(shard) {
                Next::Scan(after) => {
                    let page = driver.group().scan(after.as_ref(), max);
                    self.trace(|| format!("projection: {shard} scan page after {after:?} from {node} at {:?}, next {:?}", page.at, page.rows.next));
                    if let Err(stale) = sim.projection.take_scan(shard, page) {
                        self.stats.projection_stale_scan_pages += 1;
                        self.trace(|| format!("projection: {stale:?} from {node}"));
                    }
                }
                Next::Changes(after) => {
                    let page = driver.group().changes(after, max);
                    if let Err(expired) = sim.projection.take_changes(shard, page) {
                        self.stats.projection_rescans += 1;
                        self.trace(|| format!("projection: {expired:?} at {node}, rescanning"));
                        sim.projection.rescan(expired);
                    }
                }
            }
        }
        self.projection = Some(sim);
        if self.rng.chance(10) {
            self.check_projection();
        }
        let at = self.now + self.rng.range(PROJECTION_POLL_MS.0, PROJECTION_POLL_MS.1);
        self.schedule(at, Event::ProjectionPoll);
    }

    /// The projection's promises, against every change the replicas held.
    pub(super) fn check_projection(&mut self) {
        let (Some(sim), Some(mut feed)) = (self.projection.take(), self.feed.take()) else {
            return;
        };
        self.gather_truth(&mut feed);
        let projection = &sim.projection;
        let positions = projection.positions();
        let watermark = projection.watermark();
        let mut violations = Vec::new();
        // Where each group let issuers go (to which group), and where each
        // group acquired them: a moved issuer's rows are owed by the group
        // that acquired them once the projection reached the acquisition.
        let mut released: Vec<(ShardId, ChangePosition, ShardId, &IssuerId)> = Vec::new();
        let mut acquired: BTreeMap<(ShardId, &IssuerId), Vec<ChangePosition>> = BTreeMap::new();
        for (shard, stream) in feed.truth() {
            for (at, change) in stream {
                match &change.event {
                    Change::BucketReleased { to, issuers, .. } => {
                        released.extend(issuers.iter().map(|i| (*shard, *at, *to, i)));
                    }
                    Change::BucketAcquired { issuers, .. } => {
                        for issuer in issuers {
                            acquired.entry((*shard, issuer)).or_default().push(*at);
                        }
                    }
                    _ => {}
                }
            }
        }
        // Whether a change of `issuer` at `at` in `shard` is owed by a
        // group its bucket moved to since (following every move the
        // projection passed), which has not yet taken it over.
        let reached = |shard: ShardId| match projection.scanning(shard) {
            true => ChangePosition::START,
            false => positions
                .get(&shard)
                .copied()
                .unwrap_or(ChangePosition::START),
        };
        let owed_elsewhere = |shard: ShardId, at: ChangePosition, issuer: &IssuerId| {
            let (mut holder, mut since) = (shard, at);
            for _ in 0..64 {
                let passed = positions
                    .get(&holder)
                    .copied()
                    .unwrap_or(ChangePosition::START);
                let next = released
                    .iter()
                    .filter(|(from, r, _, i)| {
                        *from == holder && *r > since && *r <= passed && *i == issuer
                    })
                    .min_by_key(|(_, r, ..)| *r);
                let Some((_, _, to, _)) = next else {
                    return holder != shard;
                };
                let taken = acquired
                    .get(&(*to, issuer))
                    .and_then(|cs| cs.iter().filter(|c| **c <= reached(*to)).max().copied());
                match taken {
                    Some(c) => (holder, since) = (*to, c),
                    None => return true,
                }
            }
            true
        };
        for (shard, stream) in feed.truth() {
            let Some(position) = positions.get(shard) else {
                continue;
            };
            for (at, change) in stream {
                if change
                    .event
                    .issuer()
                    .is_some_and(|i| owed_elsewhere(*shard, *at, i))
                {
                    continue;
                }
                let within = at <= position;
                let resolved = watermark.is_some_and(|w| change.event.at() <= w);
                let included = projection.includes(&change.event.position());
                if !(within || resolved || included) {
                    continue;
                }
                if let Some(missing) = missing(projection, change, *at, *position) {
                    let why = if within {
                        format!("it is at or before the projection's position {position:?}")
                    } else if resolved {
                        format!(
                            "its time {:?} is at or before the watermark {watermark:?}",
                            change.event.at()
                        )
                    } else {
                        format!(
                            "the projection says it includes {}",
                            change.event.position()
                        )
                    };
                    violations.push(format!(
                        "projection: {shard}'s change at {at:?} is missing ({missing}), yet {why} (scanning: {})",
                        projection.scanning(*shard)
                    ));
                    break;
                }
            }
        }
        // A row a change wrote holds what the change carried.
        for row in projection.rows() {
            if row.version.sub == u32::MAX {
                continue; // written by a scan page
            }
            let Some(change) = feed
                .truth()
                .get(&row.shard)
                .and_then(|s| s.get(&row.version))
            else {
                continue;
            };
            let carried = match &change.event {
                Change::ReservationCreated { reservation, .. }
                | Change::ReservationConfirmed { reservation, .. }
                | Change::ReservationReleased { reservation, .. }
                | Change::ReservationExpired { reservation, .. } => Some(reservation),
                _ => None,
            };
            if carried != Some(&row.reservation) {
                violations.push(format!(
                    "projection: {} holds {:?}, but the change at {:?} that wrote it carried {carried:?}",
                    row.reservation.reservation_id, row.reservation, row.version
                ));
            }
        }
        // The report's kept sums match the rows.
        for group_by in [GroupBy::Desk, GroupBy::Issuer, GroupBy::HomeRegion] {
            let kept = projection.exposure(group_by);
            let counted = projection.exposure_from_rows(group_by);
            if kept != counted {
                violations.push(format!(
                    "projection: the {group_by:?} exposure it keeps, {kept:?}, is not its rows', {counted:?}"
                ));
            }
        }
        // Search through its indexes finds what walking every row finds.
        let rows = projection.rows().count();
        if rows > 0 {
            let row = projection
                .rows()
                .nth(self.rng.range(0, rows as u64 - 1) as usize)
                .expect("in range");
            let r = &row.reservation;
            let mut text = words(&r.desk);
            text.extend(words(&r.trader));
            text.extend(words(r.reservation_token.as_str()));
            text.extend(words(r.issuer_id.as_str()));
            text.push("nosuchword".into());
            let word = self.rng.pick(&text).clone();
            let limit = self.rng.range(1, 6) as usize;
            let searches = [
                Search {
                    text: Some(word.clone()),
                    limit,
                    ..Search::default()
                },
                Search {
                    text: Some(format!("{word} {}", self.rng.pick(&text))),
                    status: self.rng.chance(50).then_some(r.status),
                    limit,
                    ..Search::default()
                },
                Search {
                    issuer_id: Some(r.issuer_id.clone()),
                    text: self.rng.chance(50).then(|| word.clone()),
                    limit,
                    ..Search::default()
                },
                Search {
                    customer_id: r.customer_id.clone(),
                    limit,
                    ..Search::default()
                },
                Search {
                    text: Some("nosuchword".into()),
                    limit,
                    ..Search::default()
                },
            ];
            for mut search in searches {
                // Two pages of each.
                for _ in 0..2 {
                    let indexed = projection.search(&search);
                    let walked = projection.search_walking(&search);
                    if indexed != walked {
                        violations.push(format!(
                            "projection: search {search:?} found {indexed:?} through its indexes, {walked:?} walking every row"
                        ));
                        break;
                    }
                    self.stats.projection_searches_checked += 1;
                    match walked.next {
                        Some(next) => search.before = Some(next),
                        None => break,
                    }
                }
            }
        }
        for v in &violations {
            self.trace(|| format!("projection check: {v}"));
        }
        self.violations.extend(violations.into_iter().take(3));
        self.projection = Some(sim);
        self.feed = Some(feed);
    }
}

impl World {
    /// At the end, with the replicas settled: the projection catches up
    /// with one replica of each group and must then hold exactly its
    /// rows, scanned or changed (a check of every scanned row's content).
    pub(super) fn settle_projection(&mut self) {
        let Some(mut sim) = self.projection.take() else {
            return;
        };
        let projection = &mut sim.projection;
        for shard in projection.shards() {
            let group = &self.groups[&shard];
            let Some(driver) = group
                .members
                .iter()
                .filter(|m| self.nodes[*m].up)
                .find_map(|m| self.nodes[m].replicas.get(&shard))
            else {
                continue;
            };
            let core = driver.group();
            let mut caught_up = false;
            for _ in 0..10_000 {
                match projection.next(shard) {
                    Next::Scan(after) => {
                        if projection
                            .take_scan(shard, core.scan(after.as_ref(), 64))
                            .is_err()
                        {
                            break;
                        }
                    }
                    Next::Changes(after) => {
                        let page = core.changes(after, 64);
                        let empty = page.changes.is_empty();
                        if let Err(expired) = projection.take_changes(shard, page) {
                            projection.rescan(expired);
                        } else if empty {
                            caught_up = true;
                            break;
                        }
                    }
                }
            }
            let applied = core
                .machine()
                .applied()
                .map(|a| a.index)
                .unwrap_or_default();
            let at = projection.positions()[&shard];
            if !caught_up || at != ChangePosition::entry_end(applied) {
                continue;
            }
            // The group's issuers now (a moved bucket's rows were last
            // written by whichever group changed them last; a group keeps
            // the rows of a bucket it let go, refused to everyone).
            let issuers: BTreeSet<&IssuerId> = core
                .machine()
                .issuers()
                .filter(|i| core.machine().serves_issuer(i))
                .collect();
            let state = core.machine().scan(None, usize::MAX);
            let mut expected: BTreeMap<_, _> = state
                .reservations
                .into_iter()
                .filter(|r| issuers.contains(&r.issuer_id))
                .map(|r| (r.reservation_id.clone(), r))
                .collect();
            for row in projection
                .rows()
                .filter(|r| issuers.contains(&r.reservation.issuer_id))
            {
                match expected.remove(&row.reservation.reservation_id) {
                    Some(r) if r == row.reservation => {}
                    other => self.violations.push(format!(
                        "projection: caught up with {shard} at {at:?}, it holds {:?} where the replica holds {other:?}",
                        row.reservation
                    )),
                }
            }
            if let Some((id, _)) = expected.into_iter().next() {
                self.violations.push(format!(
                    "projection: caught up with {shard} at {at:?}, it lacks {id}"
                ));
            }
        }
        self.projection = Some(sim);
    }
}

/// What of `change` (at `at` of a group the projection tails at
/// `position`) the projection lacks, if anything.
fn missing(
    projection: &Projection,
    change: &harbor_wire::Change,
    at: ChangePosition,
    position: ChangePosition,
) -> Option<String> {
    // A row a later owner of the bucket wrote is newer than any change of
    // an earlier one.
    let newer = |epoch: u64| epoch > change.epoch;
    let row_version = match &change.event {
        Change::ReservationCreated { reservation, .. }
        | Change::ReservationConfirmed { reservation, .. }
        | Change::ReservationReleased { reservation, .. }
        | Change::ReservationExpired { reservation, .. } => {
            let Some(row) = projection.row(&reservation.reservation_id) else {
                return Some(format!("no row for {}", reservation.reservation_id));
            };
            if newer(row.epoch) {
                return None;
            }
            if row.version < at {
                return Some(format!(
                    "{} stands at {:?}",
                    reservation.reservation_id, row.version
                ));
            }
            row.version
        }
        Change::IssuerRegistered { issuer_id, .. } | Change::LimitChanged { issuer_id, .. } => {
            let Some(row) = projection.issuer(issuer_id) else {
                return Some(format!("no row for issuer {issuer_id}"));
            };
            if newer(row.epoch) {
                return None;
            }
            row.version
        }
        // Nothing in the view; only the position says it was taken.
        Change::ReservationRejected { .. }
        | Change::TokenAbandoned { .. }
        | Change::BucketAcquired { .. }
        | Change::BucketReleased { .. } => position,
    };
    (row_version < at).then(|| format!("the row stands at {row_version:?}"))
}

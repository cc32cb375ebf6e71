//! A projection: every group's reservations and issuers as one derived
//! view (compliance search, exposure report), built from the groups'
//! change streams and complete up to a watermark it publishes.
//!
//! How it stays exact without a frozen copy of any group:
//! - A group starts with a **scan** of its state, page by page, each page
//!   read at the position its replica had applied (pages may stand at
//!   different positions, none before the first's). Then the projection
//!   **tails** the group's changes from the first page's position.
//! - Every row remembers the position that wrote it (a change's, or the
//!   end of its scan page), and a change is applied to a row only if it is
//!   after that position. A change the scan already reflected is skipped;
//!   every later one is applied, once, in log order.
//! - The **watermark** is the oldest of the groups' resolved marks, taken
//!   only from tail pages once every group tails: every change with a time
//!   at or before it is in. It never moves back, not even while a group
//!   whose stream expired is scanned again (a rescan only adds newer rows).
//! - A commit token is **included** once its group's tail has passed the
//!   end of its entry: every change of that entry is in.
//! - It can be **saved** as bytes and loaded back ([`Projection::save`],
//!   [`Projection::load`]): where each group stands, the rows and the
//!   watermark; the indexes are built again from the rows. A loaded
//!   projection goes on from where it was saved, as if it had never
//!   stopped (a group that expired since is scanned again).

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Bound;

use harbor_reservation::{Event, IssuerView, ReservationView, ScanKey, Status};
use harbor_types::sim::{probe, Bugs};
use harbor_types::{Amount, CommitToken, IssuerId, Region, ReservationId, ShardId, Timestamp};
use harbor_wire::{ChangePosition, ChangesPage, ScanPage};
use serde::{Deserialize, Serialize};

pub use crate::feed::{Expired, Next, StaleScanPage};

/// Where the projection stands in one group.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Stream {
    /// `Some` while the group's state is being scanned.
    scan: Option<Scan>,
    /// Where the tail continues (after a scan: its start, unless the tail
    /// had gone further).
    position: ChangePosition,
    /// The newest resolved mark a tail page gave.
    resolved: Option<Timestamp>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct Scan {
    /// The first page's position: the tail starts here.
    start: Option<ChangePosition>,
    /// A rescan's first page must stand here or later: the oldest
    /// position the replicas keep, or the tail would expire again.
    floor: Option<ChangePosition>,
    next: Option<ScanKey>,
}

/// A reservation as the projection holds it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Row {
    pub reservation: ReservationView,
    /// The group whose change (or scan) wrote the row.
    pub shard: ShardId,
    /// The change (or the end of the scan page) that wrote the row.
    pub version: ChangePosition,
    /// How many moves had brought the issuer's bucket to that group: rows
    /// are ordered by (epoch, version), so a late change from the group a
    /// bucket left never overwrites one from the group it went to.
    pub epoch: u64,
}

/// An issuer as the projection holds it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IssuerRow {
    /// `None` if the projection saw a limit change but not the issuer's
    /// registration (it never does once complete).
    pub home_region: Option<Region>,
    pub limit: Amount,
    pub shard: ShardId,
    pub version: ChangePosition,
    /// As in [`Row::epoch`].
    pub epoch: u64,
}

/// Counts of what the projection applied, for metrics and the simulator.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Applied {
    pub changes: u64,
    pub skipped_as_scanned: u64,
    pub scanned_rows: u64,
    pub scans: u64,
}

#[derive(Clone, Debug)]
pub struct Projection {
    streams: BTreeMap<ShardId, Stream>,
    rows: BTreeMap<ReservationId, Row>,
    /// `(created_at, id)` of every row: search answers newest first.
    by_created: BTreeSet<(Timestamp, ReservationId)>,
    /// Held and confirmed sums by issuer and by desk, kept as rows change,
    /// so a report costs its lines, not the rows.
    open_by_issuer: BTreeMap<IssuerId, Sums>,
    open_by_desk: BTreeMap<String, Sums>,
    /// Reservations by customer: the customer view reads these.
    by_customer: BTreeMap<String, BTreeSet<ReservationId>>,
    /// Every reservation's id, in the order the projection first saw them:
    /// the word index names rows by their place here.
    slots: Vec<ReservationId>,
    /// The rows whose desk, trader, issuer or token has each word: search's
    /// text index. Slots only grow, so each list is sorted as it is built
    /// (a token's words are mostly its own: a list of one costs little).
    by_word: BTreeMap<Box<str>, Vec<u32>>,
    issuers: BTreeMap<IssuerId, IssuerRow>,
    watermark: Option<Timestamp>,
    applied: Applied,
    bugs: Bugs,
}

/// The first byte of [`Projection::save`]'s bytes: their format.
/// 2: rows and issuers carry their epoch (format 1 is refused: the
/// projection is scanned again).
const SAVED_FORMAT: u8 = 2;

#[derive(Serialize)]
struct SavedOut<'a> {
    streams: &'a BTreeMap<ShardId, Stream>,
    rows: Vec<&'a Row>,
    issuers: &'a BTreeMap<IssuerId, IssuerRow>,
    watermark: Option<Timestamp>,
}

#[derive(Deserialize)]
struct SavedIn {
    streams: BTreeMap<ShardId, Stream>,
    rows: Vec<Row>,
    issuers: BTreeMap<IssuerId, IssuerRow>,
    watermark: Option<Timestamp>,
}

impl Projection {
    /// Everything [`Projection::load`] needs to go on from here.
    pub fn save(&self) -> Vec<u8> {
        let saved = SavedOut {
            streams: &self.streams,
            rows: self.rows.values().collect(),
            issuers: &self.issuers,
            watermark: self.watermark,
        };
        postcard::to_extend(&saved, vec![SAVED_FORMAT]).expect("a projection encodes")
    }

    /// A projection of `shards` from what [`Projection::save`] wrote; an
    /// error (another format, other shards, damage) says why it cannot go
    /// on from there, and the caller builds one anew.
    pub fn load(
        bytes: &[u8],
        shards: impl IntoIterator<Item = ShardId>,
        bugs: Bugs,
    ) -> Result<Projection, String> {
        let Some((&format, rest)) = bytes.split_first() else {
            return Err("empty".into());
        };
        if format != SAVED_FORMAT {
            return Err(format!("format {format}, this build reads {SAVED_FORMAT}"));
        }
        let saved: SavedIn = postcard::from_bytes(rest).map_err(|e| e.to_string())?;
        let mut projection = Projection::new(shards, bugs);
        let wanted: Vec<ShardId> = projection.shards();
        let had: Vec<ShardId> = saved.streams.keys().copied().collect();
        if wanted != had {
            return Err(format!("saved for groups {had:?}, the map has {wanted:?}"));
        }
        if let Some(row) = saved
            .rows
            .iter()
            .find(|r| !saved.streams.contains_key(&r.shard))
        {
            return Err(format!("a row of {}, which is not a group", row.shard));
        }
        projection.streams = saved.streams;
        projection.issuers = saved.issuers;
        projection.watermark = saved.watermark;
        for row in saved.rows {
            projection.upsert(row.shard, row.reservation, row.version, row.epoch);
        }
        projection.applied = Applied::default();
        probe("projection.loaded_from_a_save");
        Ok(projection)
    }

    /// An empty projection of `shards`; each starts with a scan.
    pub fn new(shards: impl IntoIterator<Item = ShardId>, bugs: Bugs) -> Projection {
        let streams = shards
            .into_iter()
            .map(|shard| {
                let stream = Stream {
                    scan: Some(Scan::default()),
                    position: ChangePosition::START,
                    resolved: None,
                };
                (shard, stream)
            })
            .collect();
        Projection {
            streams,
            rows: BTreeMap::new(),
            by_created: BTreeSet::new(),
            open_by_issuer: BTreeMap::new(),
            open_by_desk: BTreeMap::new(),
            by_customer: BTreeMap::new(),
            slots: Vec::new(),
            by_word: BTreeMap::new(),
            issuers: BTreeMap::new(),
            watermark: None,
            applied: Applied::default(),
            bugs,
        }
    }

    pub fn shards(&self) -> Vec<ShardId> {
        self.streams.keys().copied().collect()
    }

    /// What to ask `shard` for next.
    pub fn next(&self, shard: ShardId) -> Next {
        let stream = &self.streams[&shard];
        match &stream.scan {
            Some(scan) => Next::Scan(scan.next.clone()),
            None => Next::Changes(stream.position),
        }
    }

    /// Where the tail of each group stands (scanning groups at their last
    /// tail position).
    pub fn positions(&self) -> BTreeMap<ShardId, ChangePosition> {
        self.streams
            .iter()
            .map(|(shard, s)| (*shard, s.position))
            .collect()
    }

    pub fn scanning(&self, shard: ShardId) -> bool {
        self.streams[&shard].scan.is_some()
    }

    /// Where a scan page of `shard` must stand at least (`None`: anywhere,
    /// or not scanning).
    pub fn scan_floor(&self, shard: ShardId) -> Option<ChangePosition> {
        let scan = self.streams[&shard].scan.as_ref()?;
        scan.start.or(scan.floor)
    }

    /// Every change with a time at or before this is in the projection.
    pub fn watermark(&self) -> Option<Timestamp> {
        self.watermark
    }

    pub fn applied(&self) -> Applied {
        self.applied
    }

    /// Reservations and issuers held.
    pub fn size(&self) -> (usize, usize) {
        (self.rows.len(), self.issuers.len())
    }

    /// Groups being scanned.
    pub fn groups_scanning(&self) -> usize {
        self.streams.values().filter(|s| s.scan.is_some()).count()
    }

    pub fn row(&self, id: &ReservationId) -> Option<&Row> {
        self.rows.get(id)
    }

    pub fn rows(&self) -> impl Iterator<Item = &Row> {
        self.rows.values()
    }

    pub fn issuer(&self, id: &IssuerId) -> Option<&IssuerRow> {
        self.issuers.get(id)
    }

    /// Whether every change of the entry `token` names is in.
    pub fn includes(&self, token: &CommitToken) -> bool {
        let Some(stream) = self.streams.get(&token.shard) else {
            return false;
        };
        if stream.scan.is_some() {
            return false;
        }
        if self.bugs.projection_includes_by_index {
            return stream.position.index >= token.index;
        }
        stream.position >= ChangePosition::entry_end(token.index)
    }

    /// Starts `shard` over from a scan of its state: its stream expired
    /// (a replica no longer keeps the changes after the projection's
    /// position). Rows stay; the scan only brings newer ones.
    pub fn rescan(&mut self, expired: Expired) {
        probe("projection.rescanned_after_expiry");
        let stream = self
            .streams
            .get_mut(&expired.shard)
            .expect("a shard of the projection");
        stream.scan = Some(Scan {
            floor: Some(expired.oldest),
            ..Scan::default()
        });
        stream.resolved = None;
    }

    /// Takes a page of `shard`'s state, asked after what
    /// [`Projection::next`] said.
    pub fn take_scan(&mut self, shard: ShardId, page: ScanPage) -> Result<(), StaleScanPage> {
        let stream = self
            .streams
            .get_mut(&shard)
            .expect("a shard of the projection");
        let scan = stream
            .scan
            .as_mut()
            .expect("a scan page for a scanning shard");
        let floor = scan.start.or(scan.floor).unwrap_or(ChangePosition::START);
        if page.at < floor {
            probe("projection.stale_scan_page_refused");
            return Err(StaleScanPage {
                shard,
                at: page.at,
                start: floor,
            });
        }
        let start = *scan.start.get_or_insert(page.at);
        if page.at < start {
            probe("projection.stale_scan_page_refused");
            return Err(StaleScanPage {
                shard,
                at: page.at,
                start,
            });
        }
        if scan.next.is_none() {
            self.applied.scans += 1;
        }
        scan.next = page.rows.next.clone();
        if scan.next.is_none() {
            // Everything up to the old position was in before the scan
            // (a rescan's pages never replace newer rows): the tail goes
            // on from the later of the two.
            stream.scan = None;
            stream.position = stream.position.max(start);
        }
        let epochs: BTreeMap<IssuerId, u64> = page.rows.epochs.into_iter().collect();
        let epoch_of = |id: &IssuerId| epochs.get(id).copied().unwrap_or(0);
        for issuer in page.rows.issuers {
            let epoch = epoch_of(&issuer.issuer_id);
            self.scanned_issuer(shard, issuer, page.at, epoch);
        }
        for reservation in page.rows.reservations {
            self.applied.scanned_rows += 1;
            let epoch = epoch_of(&reservation.issuer_id);
            self.upsert(shard, reservation, page.at, epoch);
        }
        Ok(())
    }

    /// Takes a page of `shard`'s changes, asked after
    /// [`Projection::next`]'s position. An expired position is refused:
    /// [`Projection::rescan`] the group.
    pub fn take_changes(&mut self, shard: ShardId, page: ChangesPage) -> Result<(), Expired> {
        if let Some(oldest) = page.expired {
            return Err(Expired { shard, oldest });
        }
        let stream = self
            .streams
            .get_mut(&shard)
            .expect("a shard of the projection");
        assert!(
            stream.scan.is_none(),
            "{shard}: changes taken while scanning"
        );
        let mut page = page;
        // A bucket this group acquired brings rows no change carries (the
        // group they came from may be scanned after it let them go): the
        // group is scanned again from the acquisition on, and the rest of
        // the page waits for that.
        let acquired = page
            .changes
            .iter()
            .position(|c| matches!(c.event, Event::BucketAcquired { .. }));
        if let Some(k) = acquired {
            page.changes.truncate(k + 1);
        }
        let mut position = stream.position;
        for change in &page.changes {
            assert!(
                change.position() > position,
                "{shard}: change at {:?} is not after the projection's position {position:?}",
                change.position()
            );
            position = change.cursor();
        }
        match acquired {
            Some(_) => stream.position = position,
            None => {
                stream.position = position.max(page.upto);
                if let Some(resolved) = page.resolved {
                    stream.resolved = Some(stream.resolved.map_or(resolved, |r| r.max(resolved)));
                }
            }
        }
        for change in page.changes {
            let at = change.position();
            self.apply(shard, change.event, at, change.epoch);
        }
        if acquired.is_some() {
            probe("projection.rescanned_after_a_move");
            let stream = self.streams.get_mut(&shard).expect("a shard");
            stream.scan = Some(Scan {
                floor: Some(ChangePosition::entry_end(position.index)),
                ..Scan::default()
            });
            stream.resolved = None;
        }
        self.advance_watermark();
        Ok(())
    }

    fn advance_watermark(&mut self) {
        let mut marks = Vec::with_capacity(self.streams.len());
        for stream in self.streams.values() {
            match (stream.scan.is_none(), stream.resolved) {
                (true, Some(resolved)) => marks.push(resolved),
                _ => return,
            }
        }
        let candidate = if self.bugs.projection_watermark_early {
            marks.into_iter().max()
        } else {
            marks.into_iter().min()
        };
        if let Some(candidate) = candidate {
            self.watermark = Some(self.watermark.map_or(candidate, |w| w.max(candidate)));
        }
    }

    fn apply(&mut self, shard: ShardId, event: Event, at: ChangePosition, epoch: u64) {
        self.applied.changes += 1;
        match event {
            Event::IssuerRegistered {
                issuer_id,
                home_region,
                limit,
                ..
            } => {
                self.put_issuer(shard, issuer_id, Some(home_region), limit, at, epoch);
            }
            Event::LimitChanged {
                issuer_id, limit, ..
            } => {
                let home_region = self
                    .issuers
                    .get(&issuer_id)
                    .and_then(|i| i.home_region.clone());
                self.put_issuer(shard, issuer_id, home_region, limit, at, epoch);
            }
            Event::ReservationCreated { reservation, .. }
            | Event::ReservationConfirmed { reservation, .. }
            | Event::ReservationReleased { reservation, .. }
            | Event::ReservationExpired { reservation, .. } => {
                self.upsert(shard, reservation, at, epoch);
            }
            // A moved bucket's rows are the same rows: they keep what the
            // group they left wrote until the new group changes them.
            Event::ReservationRejected { .. }
            | Event::TokenAbandoned { .. }
            | Event::BucketAcquired { .. }
            | Event::BucketReleased { .. } => {}
        }
    }

    fn scanned_issuer(
        &mut self,
        shard: ShardId,
        issuer: IssuerView,
        at: ChangePosition,
        epoch: u64,
    ) {
        self.put_issuer(
            shard,
            issuer.issuer_id,
            Some(issuer.home_region),
            issuer.limit,
            at,
            epoch,
        );
    }

    fn put_issuer(
        &mut self,
        shard: ShardId,
        issuer_id: IssuerId,
        home_region: Option<Region>,
        limit: Amount,
        version: ChangePosition,
        epoch: u64,
    ) {
        if let Some(row) = self.issuers.get(&issuer_id) {
            if (row.epoch, row.version) >= (epoch, version) {
                self.applied.skipped_as_scanned += 1;
                return;
            }
        }
        let row = IssuerRow {
            home_region,
            limit,
            shard,
            version,
            epoch,
        };
        self.issuers.insert(issuer_id, row);
    }

    fn upsert(
        &mut self,
        shard: ShardId,
        reservation: ReservationView,
        version: ChangePosition,
        epoch: u64,
    ) {
        let id = reservation.reservation_id.clone();
        if let Some(row) = self.rows.get(&id) {
            if (row.epoch, row.version) >= (epoch, version) {
                self.applied.skipped_as_scanned += 1;
                return;
            }
        }
        self.by_created.insert((reservation.created_at, id.clone()));
        if let Some(customer_id) = &reservation.customer_id {
            self.by_customer
                .entry(customer_id.clone())
                .or_default()
                .insert(id.clone());
        }
        if let Some(old) = self.rows.get(&id) {
            let old = &old.reservation;
            Sums::change(&mut self.open_by_issuer, old.issuer_id.clone(), old, -1);
            Sums::change(&mut self.open_by_desk, old.desk.clone(), old, -1);
        } else {
            // The words of a reservation never change: indexed once.
            let slot = u32::try_from(self.slots.len()).expect("fewer than 2^32 reservations");
            self.slots.push(id.clone());
            for word in text_words(&reservation) {
                // Most words are already keys: no key is built for them.
                match self.by_word.get_mut(word.as_str()) {
                    Some(slots) => slots.push(slot),
                    None => {
                        self.by_word.insert(word.into_boxed_str(), vec![slot]);
                    }
                }
            }
        }
        Sums::change(
            &mut self.open_by_issuer,
            reservation.issuer_id.clone(),
            &reservation,
            1,
        );
        Sums::change(
            &mut self.open_by_desk,
            reservation.desk.clone(),
            &reservation,
            1,
        );
        let row = Row {
            reservation,
            shard,
            version,
            epoch,
        };
        self.rows.insert(id, row);
    }

    /// Reservations that match `search`, newest first. With an issuer,
    /// only that issuer's rows are looked at; else with a customer, that
    /// customer's; else with text, the rows that have its rarest word (if
    /// they are not too many to sort); otherwise rows are walked from the
    /// newest until a page is full.
    pub fn search(&self, search: &Search) -> SearchPage {
        self.search_in(search, true)
    }

    /// [`Projection::search`] walking every row from the newest, with no
    /// index: what the simulator checks the indexes against.
    pub fn search_walking(&self, search: &Search) -> SearchPage {
        self.search_in(search, false)
    }

    fn search_in(&self, search: &Search, indexes: bool) -> SearchPage {
        let words: Vec<String> = search.text.as_deref().map(words).unwrap_or_default();
        let upper = match &search.before {
            Some(before) => Bound::Excluded((before.created_at, before.reservation_id.clone())),
            None => Bound::Unbounded,
        };
        // An issuer's or a customer's rows, newest first, before `upper`.
        let newest_first = |ids: &mut dyn Iterator<Item = &ReservationId>| {
            let mut rows: Vec<(Timestamp, ReservationId)> = ids
                .map(|id| (self.rows[id].reservation.created_at, id.clone()))
                .filter(|key| match &upper {
                    Bound::Excluded(before) => key < before,
                    _ => true,
                })
                .collect();
            rows.sort_unstable_by(|a, b| b.cmp(a));
            rows
        };
        let narrowed: Option<Vec<(Timestamp, ReservationId)>> =
            match (&search.issuer_id, &search.customer_id) {
                _ if !indexes => None,
                (Some(issuer), _) => {
                    let first = ReservationId::new(issuer.clone(), 1);
                    let last = ReservationId::new(issuer.clone(), u64::MAX);
                    Some(newest_first(
                        &mut self.rows.range(first..=last).map(|(id, _)| id),
                    ))
                }
                (None, Some(customer)) => Some(match self.by_customer.get(customer) {
                    Some(ids) => newest_first(&mut ids.iter()),
                    None => Vec::new(),
                }),
                (None, None) if !words.is_empty() => {
                    let rarest = words
                        .iter()
                        .map(|w| self.by_word.get(w.as_str()))
                        .min_by_key(|slots| slots.map_or(0, Vec::len))
                        .flatten();
                    match rarest {
                        // A word no row has: nothing matches.
                        None => Some(Vec::new()),
                        Some(slots) if slots.len() <= SEARCH_EXAMINE_MAX => Some(newest_first(
                            &mut slots.iter().map(|slot| &self.slots[*slot as usize]),
                        )),
                        Some(_) => None,
                    }
                }
                (None, None) => None,
            };
        let candidates: Box<dyn Iterator<Item = (Timestamp, ReservationId)>> = match narrowed {
            Some(rows) => Box::new(rows.into_iter()),
            None => Box::new(
                self.by_created
                    .range((Bound::Unbounded, upper.clone()))
                    .rev()
                    .cloned(),
            ),
        };
        let mut page = SearchPage::default();
        let mut examined: Option<(Timestamp, ReservationId)> = None;
        for (count, (created_at, id)) in candidates.enumerate() {
            // A bounded look per request: a selective filter stops after
            // `SEARCH_EXAMINE_MAX` rows, with a cursor to go on from (a
            // page with fewer rows than asked and a cursor).
            if count == SEARCH_EXAMINE_MAX {
                if let Some((created_at, reservation_id)) = examined {
                    page.next = Some(SearchCursor {
                        created_at,
                        reservation_id,
                    });
                }
                break;
            }
            examined = Some((created_at, id.clone()));
            let r = &self.rows[&id].reservation;
            if !search.matches(r, &words) {
                continue;
            }
            if page.rows.len() == search.limit {
                let last = page.rows.last().expect("limit is at least 1");
                page.next = Some(SearchCursor {
                    created_at: last.created_at,
                    reservation_id: last.reservation_id.clone(),
                });
                break;
            }
            page.rows.push(r.clone());
        }
        page
    }

    /// Held and confirmed sums and counts, by `group_by`, sorted by key.
    pub fn exposure(&self, group_by: GroupBy) -> Vec<Exposure> {
        let mut lines: BTreeMap<String, Sums> = BTreeMap::new();
        let mut limits: BTreeMap<String, u64> = BTreeMap::new();
        match group_by {
            GroupBy::Desk => lines = self.open_by_desk.clone(),
            GroupBy::Issuer => {
                for (id, issuer) in &self.issuers {
                    limits.insert(id.to_string(), issuer.limit.0);
                    lines.entry(id.to_string()).or_default();
                }
                for (id, sums) in &self.open_by_issuer {
                    lines.entry(id.to_string()).or_default().add(sums);
                }
            }
            GroupBy::HomeRegion => {
                for (id, sums) in &self.open_by_issuer {
                    let region = self
                        .issuers
                        .get(id)
                        .and_then(|i| i.home_region.as_ref())
                        .map_or_else(|| "unknown".to_string(), |r| r.to_string());
                    lines.entry(region).or_default().add(sums);
                }
            }
        }
        lines
            .into_iter()
            .map(|(key, sums)| {
                // Sums are kept wide: thousands of issuers each near the
                // largest amount could pass u64; a report saturates.
                let clamp = |n: u128| u64::try_from(n).unwrap_or(u64::MAX);
                Exposure {
                    limit: limits.get(&key).copied(),
                    key,
                    reserved: clamp(sums.held + sums.confirmed),
                    held: clamp(sums.held),
                    confirmed: clamp(sums.confirmed),
                    held_count: sums.held_count,
                    confirmed_count: sums.confirmed_count,
                }
            })
            .collect()
    }
}

impl Projection {
    /// The exposure report computed from every row, the slow way: the
    /// simulator checks the kept sums against it.
    pub fn exposure_from_rows(&self, group_by: GroupBy) -> Vec<Exposure> {
        let mut copy = self.clone();
        copy.open_by_issuer.clear();
        copy.open_by_desk.clear();
        for row in self.rows.values() {
            let r = &row.reservation;
            Sums::change(&mut copy.open_by_issuer, r.issuer_id.clone(), r, 1);
            Sums::change(&mut copy.open_by_desk, r.desk.clone(), r, 1);
        }
        copy.exposure(group_by)
    }
}

/// Held and confirmed amounts and counts of some reservations.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Sums {
    held: u128,
    confirmed: u128,
    held_count: u64,
    confirmed_count: u64,
}

impl Sums {
    fn add(&mut self, other: &Sums) {
        self.held += other.held;
        self.confirmed += other.confirmed;
        self.held_count += other.held_count;
        self.confirmed_count += other.confirmed_count;
    }

    /// Adds (`sign` 1) or takes away (-1) `r` from `key`'s sums, if it is
    /// open; a key left with nothing open goes.
    fn change<K: Ord + Clone>(sums: &mut BTreeMap<K, Sums>, key: K, r: &ReservationView, sign: i8) {
        if !r.status.is_open() {
            return;
        }
        let amount = u128::from(r.amount.0);
        let line = sums.entry(key.clone()).or_default();
        match (r.status, sign > 0) {
            (Status::Held, true) => {
                line.held += amount;
                line.held_count += 1;
            }
            (Status::Held, false) => {
                line.held -= amount;
                line.held_count -= 1;
            }
            (_, true) => {
                line.confirmed += amount;
                line.confirmed_count += 1;
            }
            (_, false) => {
                line.confirmed -= amount;
                line.confirmed_count -= 1;
            }
        }
        if line.held_count == 0 && line.confirmed_count == 0 {
            sums.remove(&key);
        }
    }
}

/// Rows one search looks at, at most, before it answers with what it
/// found and a cursor to go on from.
pub const SEARCH_EXAMINE_MAX: usize = 100_000;

/// The words of a text, as search matches them: runs of letters and
/// digits, lower-cased.
pub fn words(text: &str) -> Vec<String> {
    text.split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_lowercase)
        .collect()
}

/// The words search's text matches in a reservation, each once.
fn text_words(r: &ReservationView) -> BTreeSet<String> {
    let mut have: BTreeSet<String> = words(&r.desk).into_iter().collect();
    have.extend(words(&r.trader));
    have.extend(words(r.issuer_id.as_str()));
    have.extend(words(r.reservation_token.as_str()));
    have
}

/// A compliance search. Every filter given must hold.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Search {
    pub issuer_id: Option<IssuerId>,
    pub desk: Option<String>,
    pub trader: Option<String>,
    pub status: Option<Status>,
    pub customer_id: Option<String>,
    /// Every word must be a word of the desk, trader, issuer or token.
    pub text: Option<String>,
    pub min_amount: Option<Amount>,
    pub max_amount: Option<Amount>,
    pub created_after_ms: Option<u64>,
    pub created_before_ms: Option<u64>,
    /// Continue after the last row of a previous page.
    pub before: Option<SearchCursor>,
    pub limit: usize,
}

impl Search {
    fn matches(&self, r: &ReservationView, words_wanted: &[String]) -> bool {
        let wall = r.created_at.wall_ms;
        self.issuer_id.as_ref().is_none_or(|i| *i == r.issuer_id)
            && self.desk.as_ref().is_none_or(|d| *d == r.desk)
            && self.trader.as_ref().is_none_or(|t| *t == r.trader)
            && self.status.is_none_or(|s| s == r.status)
            && self
                .customer_id
                .as_ref()
                .is_none_or(|c| r.customer_id.as_ref() == Some(c))
            && self.min_amount.is_none_or(|a| r.amount >= a)
            && self.max_amount.is_none_or(|a| r.amount <= a)
            && self.created_after_ms.is_none_or(|ms| wall >= ms)
            && self.created_before_ms.is_none_or(|ms| wall < ms)
            && (words_wanted.is_empty() || {
                let have = text_words(r);
                words_wanted.iter().all(|w| have.contains(w))
            })
    }
}

/// Where a search page ended: its text form is the `next` cursor of the
/// answer, `s1.WALL.LOGICAL.RESERVATION_ID`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SearchCursor {
    pub created_at: Timestamp,
    pub reservation_id: ReservationId,
}

impl SearchCursor {
    pub fn encode(&self) -> String {
        format!(
            "s1.{}.{}.{}",
            self.created_at.wall_ms, self.created_at.logical, self.reservation_id
        )
    }

    pub fn parse(text: &str) -> Option<SearchCursor> {
        let mut parts = text.splitn(4, '.');
        if parts.next()? != "s1" {
            return None;
        }
        let wall_ms = parts.next()?.parse().ok()?;
        let logical = parts.next()?.parse().ok()?;
        let reservation_id = ReservationId::parse(parts.next()?).ok()?;
        Some(SearchCursor {
            created_at: Timestamp { wall_ms, logical },
            reservation_id,
        })
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SearchPage {
    pub rows: Vec<ReservationView>,
    /// More rows may match: ask again with this (also when the page has
    /// fewer rows than asked, if the search stopped at its examine bound).
    pub next: Option<SearchCursor>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GroupBy {
    Desk,
    HomeRegion,
    Issuer,
}

impl GroupBy {
    pub fn parse(text: &str) -> Option<GroupBy> {
        match text {
            "desk" => Some(GroupBy::Desk),
            "home_region" => Some(GroupBy::HomeRegion),
            "issuer" => Some(GroupBy::Issuer),
            _ => None,
        }
    }
}

/// One line of the exposure report.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Exposure {
    pub key: String,
    /// Held plus confirmed.
    pub reserved: u64,
    pub held: u64,
    pub confirmed: u64,
    pub held_count: u64,
    pub confirmed_count: u64,
    /// The issuer's limit (grouped by issuer).
    pub limit: Option<u64>,
}

#[cfg(test)]
mod tests {
    use harbor_reservation::{ApplyContext, Command, StateMachine};
    use harbor_types::{Generation, LogIndex, ReservationToken};
    use harbor_wire::Change;

    use super::*;

    const SHARD: ShardId = ShardId(0);

    /// One group: a state machine and every change it made, by position.
    struct Group {
        machine: StateMachine,
        changes: Vec<Change>,
        index: u64,
    }

    impl Group {
        fn new() -> Group {
            Group {
                machine: StateMachine::default(),
                changes: Vec::new(),
                index: 0,
            }
        }

        fn apply(&mut self, cmd: Command) -> CommitToken {
            self.index += 1;
            let position = CommitToken {
                shard: SHARD,
                generation: Generation(1),
                index: LogIndex(self.index),
            };
            let ctx = ApplyContext {
                position,
                at: Timestamp::from_wall_ms(1_000 + self.index),
            };
            let events = self.machine.apply(&ctx, &cmd).events;
            let count = events.len();
            for (sub, event) in events.into_iter().enumerate() {
                self.changes.push(Change {
                    epoch: 0,
                    sub: sub as u32,
                    last: sub + 1 == count,
                    event,
                });
            }
            position
        }

        fn issuer(&mut self, id: &str, limit: u64) {
            self.apply(Command::UpsertIssuer {
                issuer_id: IssuerId::new(id).unwrap(),
                home_region: Region::new("madrid").unwrap(),
                limit: Amount(limit),
            });
        }

        fn reserve(&mut self, issuer: &str, token: &str, amount: u64, desk: &str) -> CommitToken {
            self.apply(Command::Reserve {
                token: ReservationToken::new(token).unwrap(),
                issuer_id: IssuerId::new(issuer).unwrap(),
                amount: Amount(amount),
                desk: desk.to_string(),
                trader: "t-1".to_string(),
                hold_ttl_ms: Some(60_000),
            })
        }

        fn confirm(&mut self, id: &str) {
            self.apply(Command::Confirm {
                reservation_id: ReservationId::parse(id).unwrap(),
            });
        }

        /// The changes after `after`, at most `max`, resolved at the last
        /// entry's time once the page reaches the end.
        fn page(&self, after: ChangePosition, max: usize) -> ChangesPage {
            let changes: Vec<Change> = self
                .changes
                .iter()
                .filter(|c| c.position() > after)
                .take(max)
                .cloned()
                .collect();
            let whole = changes.len() < max;
            let upto = match changes.last() {
                Some(c) if !whole => c.cursor(),
                _ => ChangePosition::entry_end(LogIndex(self.index)),
            };
            ChangesPage {
                changes,
                upto: upto.max(after),
                resolved: whole.then(|| Timestamp::from_wall_ms(1_000 + self.index)),
                expired: None,
            }
        }

        fn scan(&self, after: Option<ScanKey>, max: usize) -> ScanPage {
            ScanPage {
                rows: self.machine.scan(after.as_ref(), max),
                at: ChangePosition::entry_end(LogIndex(self.index)),
                at_time: None,
            }
        }
    }

    /// Drives `projection` through `group` until it has taken everything.
    fn catch_up(projection: &mut Projection, group: &Group, max: usize) {
        for _ in 0..1_000 {
            match projection.next(SHARD) {
                Next::Scan(after) => projection.take_scan(SHARD, group.scan(after, max)).unwrap(),
                Next::Changes(after) => {
                    let page = group.page(after, max);
                    let done = page.changes.is_empty();
                    projection.take_changes(SHARD, page).unwrap();
                    if done {
                        return;
                    }
                }
            }
        }
        panic!("the projection never caught up");
    }

    #[test]
    fn a_scan_then_the_tail_apply_every_change_once_and_skip_what_the_scan_reflected() {
        let mut group = Group::new();
        group.issuer("acme", 1_000);
        group.reserve("acme", "tok-1", 100, "rates");
        group.reserve("acme", "tok-2", 200, "fx");
        let mut projection = Projection::new([SHARD], Bugs::none());
        // The first scan page stands at entry 3.
        projection.take_scan(SHARD, group.scan(None, 2)).unwrap();
        assert!(projection.scanning(SHARD));
        // The group moves on before the second page: it stands at entry 5
        // and already shows the confirmation.
        group.confirm("acme:r2");
        group.reserve("acme", "tok-3", 50, "rates");
        let Next::Scan(after) = projection.next(SHARD) else {
            panic!("still scanning")
        };
        projection.take_scan(SHARD, group.scan(after, 10)).unwrap();
        assert!(!projection.scanning(SHARD));
        assert_eq!(
            projection.next(SHARD),
            Next::Changes(ChangePosition::entry_end(LogIndex(3))),
            "the tail starts where the first page stood"
        );
        catch_up(&mut projection, &group, 1);
        let applied = projection.applied();
        assert!(applied.skipped_as_scanned >= 1, "{applied:?}");
        for row in projection.rows() {
            assert_eq!(
                Some(&row.reservation),
                group
                    .machine
                    .reservation(&row.reservation.reservation_id)
                    .as_ref()
            );
        }
        assert_eq!(projection.rows().count(), 3);
        assert_eq!(projection.watermark(), Some(Timestamp::from_wall_ms(1_005)));
    }

    #[test]
    fn a_scan_page_older_than_the_first_is_refused() {
        let mut group = Group::new();
        group.issuer("acme", 1_000);
        let behind = group.scan(None, 1);
        group.reserve("acme", "tok-1", 100, "rates");
        let mut projection = Projection::new([SHARD], Bugs::none());
        projection.take_scan(SHARD, group.scan(None, 1)).unwrap();
        let stale = projection.take_scan(SHARD, behind).unwrap_err();
        assert_eq!(stale.start, ChangePosition::entry_end(LogIndex(2)));
    }

    #[test]
    fn a_token_is_included_once_every_change_of_its_entry_is() {
        let mut group = Group::new();
        group.issuer("acme", 1_000);
        let mut projection = Projection::new([SHARD], Bugs::none());
        catch_up(&mut projection, &group, 10);
        // An entry with two changes: a batch of two reservations.
        let token = group.apply(Command::Batch(vec![
            Command::Reserve {
                token: ReservationToken::new("a").unwrap(),
                issuer_id: IssuerId::new("acme").unwrap(),
                amount: Amount(1),
                desk: "d".into(),
                trader: "t".into(),
                hold_ttl_ms: None,
            },
            Command::Reserve {
                token: ReservationToken::new("b").unwrap(),
                issuer_id: IssuerId::new("acme").unwrap(),
                amount: Amount(1),
                desk: "d".into(),
                trader: "t".into(),
                hold_ttl_ms: None,
            },
        ]));
        let Next::Changes(after) = projection.next(SHARD) else {
            panic!()
        };
        projection
            .take_changes(SHARD, group.page(after, 1))
            .unwrap();
        assert!(!projection.includes(&token), "half of the entry is in");
        catch_up(&mut projection, &group, 1);
        assert!(projection.includes(&token));
    }

    #[test]
    fn the_watermark_waits_for_every_group_and_survives_a_rescan() {
        let other = ShardId(1);
        let mut group = Group::new();
        group.issuer("acme", 1_000);
        let mut projection = Projection::new([SHARD, other], Bugs::none());
        catch_up(&mut projection, &group, 10);
        assert_eq!(projection.watermark(), None, "group 1 promised nothing");
        projection
            .take_scan(
                other,
                ScanPage {
                    rows: Default::default(),
                    at: ChangePosition::START,
                    at_time: None,
                },
            )
            .unwrap();
        let page = ChangesPage {
            changes: Vec::new(),
            upto: ChangePosition::START,
            resolved: Some(Timestamp::from_wall_ms(900)),
            expired: None,
        };
        projection.take_changes(other, page).unwrap();
        assert_eq!(projection.watermark(), Some(Timestamp::from_wall_ms(900)));
        projection.rescan(Expired {
            shard: SHARD,
            oldest: ChangePosition::entry_end(LogIndex(1)),
        });
        assert_eq!(projection.watermark(), Some(Timestamp::from_wall_ms(900)));
        assert!(!projection.includes(&CommitToken {
            shard: SHARD,
            generation: Generation(1),
            index: LogIndex(1)
        }));
    }

    #[test]
    fn a_rescan_from_a_replica_behind_the_tail_does_not_move_the_tail_back() {
        let mut group = Group::new();
        group.issuer("acme", 1_000);
        let behind = group.scan(None, 10);
        group.reserve("acme", "tok-1", 100, "rates");
        group.confirm("acme:r1");
        let mut projection = Projection::new([SHARD], Bugs::none());
        catch_up(&mut projection, &group, 10);
        let tail = projection.positions()[&SHARD];
        // A rescan's first page must stand at what the replicas keep.
        let mut refused = projection.clone();
        refused.rescan(Expired {
            shard: SHARD,
            oldest: ChangePosition::entry_end(LogIndex(3)),
        });
        assert!(refused.take_scan(SHARD, behind.clone()).is_err());
        projection.rescan(Expired {
            shard: SHARD,
            oldest: ChangePosition::entry_end(LogIndex(1)),
        });
        projection.take_scan(SHARD, behind).unwrap();
        assert_eq!(projection.next(SHARD), Next::Changes(tail));
        let row = projection
            .row(&ReservationId::parse("acme:r1").unwrap())
            .unwrap();
        assert_eq!(
            row.reservation.status,
            Status::Confirmed,
            "the older page did not replace it"
        );
    }

    #[test]
    fn search_filters_pages_newest_first_and_exposure_sums_open_rows() {
        let mut group = Group::new();
        group.issuer("acme", 10_000);
        group.issuer("zeta", 10_000);
        for n in 0..5 {
            let desk = if n % 2 == 0 { "madrid-rates" } else { "fx" };
            group.reserve("acme", &format!("tok-{n}"), 100 + n, desk);
        }
        group.reserve("zeta", "tok-z", 7, "madrid-rates");
        group.confirm("acme:r1");
        let mut projection = Projection::new([SHARD], Bugs::none());
        catch_up(&mut projection, &group, 3);
        let mut search = Search {
            text: Some("RATES".into()),
            limit: 2,
            ..Search::default()
        };
        let first = projection.search(&search);
        let ids: Vec<String> = first
            .rows
            .iter()
            .map(|r| r.reservation_id.to_string())
            .collect();
        assert_eq!(ids, ["zeta:r1", "acme:r5"]);
        let cursor = first.next.expect("more rows match");
        assert_eq!(SearchCursor::parse(&cursor.encode()), Some(cursor.clone()));
        search.before = Some(cursor);
        let second = projection.search(&search);
        let ids: Vec<String> = second
            .rows
            .iter()
            .map(|r| r.reservation_id.to_string())
            .collect();
        assert_eq!(ids, ["acme:r3", "acme:r1"]);
        assert_eq!(second.next, None);
        // One issuer's rows, paged the same way.
        let mut acme = Search {
            issuer_id: Some(IssuerId::new("acme").unwrap()),
            limit: 3,
            ..Search::default()
        };
        let first = projection.search(&acme);
        let ids: Vec<String> = first
            .rows
            .iter()
            .map(|r| r.reservation_id.to_string())
            .collect();
        assert_eq!(ids, ["acme:r5", "acme:r4", "acme:r3"]);
        acme.before = first.next;
        let second = projection.search(&acme);
        let ids: Vec<String> = second
            .rows
            .iter()
            .map(|r| r.reservation_id.to_string())
            .collect();
        assert_eq!(ids, ["acme:r2", "acme:r1"]);
        assert_eq!(second.next, None);
        let held = projection.search(&Search {
            status: Some(Status::Confirmed),
            limit: 10,
            ..Search::default()
        });
        assert_eq!(held.rows.len(), 1);
        let by_issuer = projection.exposure(GroupBy::Issuer);
        assert_eq!(by_issuer[0].key, "acme");
        assert_eq!(by_issuer[0].reserved, 100 + 101 + 102 + 103 + 104);
        assert_eq!(by_issuer[0].confirmed, 100);
        assert_eq!(by_issuer[0].held_count, 4);
        assert_eq!(by_issuer[0].limit, Some(10_000));
        let by_region = projection.exposure(GroupBy::HomeRegion);
        assert_eq!(by_region.len(), 1);
        assert_eq!(by_region[0].key, "madrid");
        assert_eq!(by_region[0].reserved, 510 + 7);
    }

    #[test]
    fn a_saved_projection_loads_back_and_goes_on_where_it_stood() {
        let mut group = Group::new();
        group.issuer("acme", 10_000);
        for n in 0..4 {
            group.reserve("acme", &format!("tok-{n}"), 100 + n, "fx");
        }
        let mut projection = Projection::new([SHARD], Bugs::none());
        catch_up(&mut projection, &group, 2);
        let loaded = Projection::load(&projection.save(), [SHARD], Bugs::none()).unwrap();
        assert_eq!(loaded.rows, projection.rows);
        assert_eq!(loaded.issuers, projection.issuers);
        assert_eq!(loaded.positions(), projection.positions());
        assert_eq!(loaded.watermark(), projection.watermark());
        for group_by in [GroupBy::Issuer, GroupBy::Desk, GroupBy::HomeRegion] {
            assert_eq!(loaded.exposure(group_by), projection.exposure(group_by));
        }
        let all = Search {
            limit: 10,
            ..Search::default()
        };
        assert_eq!(loaded.search(&all), projection.search(&all));
        // It goes on from the saved position: later changes come from the
        // tail, none twice.
        let mut loaded = loaded;
        group.confirm("acme:r2");
        group.reserve("acme", "tok-9", 9, "fx");
        catch_up(&mut loaded, &group, 2);
        catch_up(&mut projection, &group, 2);
        assert_eq!(loaded.rows, projection.rows);
        assert_eq!(
            loaded.exposure(GroupBy::Desk),
            projection.exposure(GroupBy::Desk)
        );
        assert_eq!(loaded.applied().skipped_as_scanned, 0);
        // Saved for other groups, another format, or damage: not loaded.
        assert!(Projection::load(&projection.save(), [SHARD, ShardId(9)], Bugs::none()).is_err());
        assert!(Projection::load(&[7, 1, 2], [SHARD], Bugs::none()).is_err());
        let saved = projection.save();
        assert!(Projection::load(&saved[..saved.len() / 2], [SHARD], Bugs::none()).is_err());
        assert!(Projection::load(&[], [SHARD], Bugs::none()).is_err());
    }
}

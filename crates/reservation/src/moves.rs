//! A bucket's rows leaving one group and arriving in another (DESIGN.md
//! §9). The source exports them in pages, a full pass and then only what
//! changed since a position; the target stages them out of sight (no read,
//! scan or write sees a staged row) and acquires them in one entry, once
//! the source sealed the bucket and the target holds its rows as of the
//! seal. The source then releases them. Every step is an entry of one
//! group's log, so the outcome of a move is decided in the logs (an
//! acquisition and an abort of the same import: whichever applies first
//! wins) and never in a driver's memory.
//!
//! Each acquisition counts one more move of the bucket (its epoch): a
//! change consumer orders a moved issuer's rows by (epoch, position), so a
//! late change from the group the bucket left never overwrites a newer one
//! from the group it went to.

use std::collections::{BTreeMap, BTreeSet};

use harbor_types::{
    Amount, BucketId, CommitToken, IssuerId, Region, ReservationId, ReservationToken, ShardId,
    AMOUNT_MAX,
};
use serde::{Deserialize, Serialize};

use crate::command::ApplyContext;
use crate::machine::{check_row, RowId, StateMachine};
use crate::outcome::{Event, Outcome, Rejection};
use crate::rows::{
    reservation_of, reservation_row, token_record_of, token_row, BucketRows, Issuer, IssuerRow,
    Reservation, Staged, StagedOut, TokenRecord,
};

/// Where an export stands: after an issuer's own row, one of its
/// reservations, or one of its tokens (in that order, issuer by issuer).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ExportKey {
    pub issuer_id: IssuerId,
    pub part: ExportPart,
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum ExportPart {
    Issuer,
    Reservation(u64),
    Token(ReservationToken),
}

/// A page of [`StateMachine::export`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExportPage {
    pub rows: BucketRows,
    /// Where the next page starts; `None` once the bucket is read through.
    pub next: Option<ExportKey>,
    /// The position the page shows the state at.
    pub at: Option<CommitToken>,
    /// The bucket's record here when the page was read (`sealed_at` tells
    /// whether nothing can change any more).
    pub record: crate::BucketRecord,
}

/// Rows an export page examines at most for each row it may return: a
/// delta over a large bucket ends its page early rather than read it all.
const EXAMINED_PER_ROW: usize = 64;

impl StateMachine {
    /// A page of `bucket`'s rows after `after`, at most `max` of them:
    /// with `since`, only those written after it (a row written by another
    /// group came with an acquisition, before any position `since` names).
    pub fn export(
        &self,
        bucket: BucketId,
        since: Option<CommitToken>,
        after: Option<&ExportKey>,
        max: usize,
    ) -> ExportPage {
        let max = max.max(1);
        let changed = |p: CommitToken| {
            since.is_none_or(|s| {
                p.shard == s.shard && (p.generation, p.index) > (s.generation, s.index)
            })
        };
        let mut page = ExportPage {
            at: self.applied,
            record: self.bucket(bucket),
            ..ExportPage::default()
        };
        let mut examined = 0usize;
        let budget = max.saturating_mul(EXAMINED_PER_ROW);
        let from = match after {
            Some(key) => std::ops::Bound::Included(&key.issuer_id),
            None => std::ops::Bound::Unbounded,
        };
        let ids = self
            .by_bucket
            .get(&bucket)
            .into_iter()
            .flat_map(|ids| ids.range::<IssuerId, _>((from, std::ops::Bound::Unbounded)));
        for issuer_id in ids {
            let issuer = &self.issuers[issuer_id];
            let start = match after {
                Some(key) if key.issuer_id == *issuer_id => Some(&key.part),
                _ => None,
            };
            let mut parts: Vec<(ExportPart, bool)> = Vec::new();
            if start.is_none() {
                parts.push((ExportPart::Issuer, changed(issuer.updated)));
            }
            let seq_from = match start {
                Some(ExportPart::Reservation(seq)) => seq.saturating_add(1),
                Some(ExportPart::Token(_)) => u64::MAX,
                _ => 0,
            };
            let reservations = issuer
                .reservations
                .range(seq_from..)
                .map(|(seq, r)| (ExportPart::Reservation(*seq), changed(r.updated)));
            let tokens = issuer
                .tokens
                .iter()
                .filter(|(token, _)| match start {
                    Some(ExportPart::Token(after)) => *token > after,
                    _ => true,
                })
                .map(|(token, record)| {
                    (
                        ExportPart::Token(token.clone()),
                        changed(record.commit_token()),
                    )
                });
            for (part, wanted) in parts.into_iter().chain(reservations).chain(tokens) {
                if page.rows.len() == max || examined == budget {
                    return page;
                }
                examined += 1;
                if wanted {
                    self.export_row(issuer_id, issuer, &part, &mut page.rows);
                }
                page.next = Some(ExportKey {
                    issuer_id: issuer_id.clone(),
                    part,
                });
            }
        }
        page.next = None;
        page
    }

    fn export_row(
        &self,
        issuer_id: &IssuerId,
        issuer: &Issuer,
        part: &ExportPart,
        rows: &mut BucketRows,
    ) {
        match part {
            ExportPart::Issuer => rows.issuers.push(IssuerRow {
                issuer_id: issuer_id.clone(),
                home_region: issuer.home_region.clone(),
                limit: issuer.limit,
                reserved: issuer.reserved,
                next_seq: issuer.next_seq,
                updated: issuer.updated,
            }),
            ExportPart::Reservation(seq) => {
                let r = &issuer.reservations[seq];
                rows.reservations.push(reservation_row(issuer_id, *seq, r));
            }
            ExportPart::Token(token) => {
                let record = &issuer.tokens[token];
                rows.tokens.push(token_row(issuer_id, token, record));
            }
        }
    }

    /// The first entry of an import stages the rows; the next ones (of the
    /// same move) add to them. Refused when the group takes the bucket's
    /// writes, or stages it for another move.
    pub(crate) fn import_bucket(
        &mut self,
        bucket: BucketId,
        move_id: u64,
        from: ShardId,
        rows: &BucketRows,
    ) -> Result<Outcome, Rejection> {
        if move_id <= self.bucket(bucket).aborted_up_to {
            return Err(refused(format!(
                "move {move_id} of {bucket} was aborted here"
            )));
        }
        if let Some(row) = rows.reservations.iter().find(|r| r.seq == 0) {
            return Err(refused(format!("a row of {} has seq 0", row.issuer_id)));
        }
        let staged = self.staged.get(&bucket).map(|s| s.move_id);
        if staged.is_none() && self.holds_bucket(bucket) {
            // A group that holds the bucket's rows cannot take them from
            // elsewhere.
            return Err(refused(format!("{bucket} is held by this group")));
        }
        if staged.is_some_and(|id| id != move_id) {
            return Err(refused(format!(
                "{bucket} is staged here for move {}, not {move_id}",
                staged.unwrap()
            )));
        }
        if self.bucket(bucket).acquired_by == Some(move_id) {
            // A late copy of an entry of a move that finished: nothing to do.
            return Ok(self.bucket_outcome(bucket));
        }
        let staged = (self.staged.entry(bucket)).or_insert_with(|| Staged::new(move_id, from));
        staged.add(bucket, rows);
        Ok(self.bucket_outcome(bucket))
    }

    /// Whether this group holds `bucket`'s rows as their owner (a released
    /// bucket's rows it keeps are no one's).
    fn holds_bucket(&self, bucket: BucketId) -> bool {
        self.bucket(bucket).released_to.is_none() && self.bucket_issuers(bucket).next().is_some()
    }

    /// The staged rows become the group's, and the bucket's writes are
    /// taken from this entry on. Refused, changing nothing, when the rows
    /// are not consistent (a copy that missed a change) or collide with
    /// issuers the group has.
    pub(crate) fn acquire_bucket(
        &mut self,
        ctx: &ApplyContext,
        events: &mut Vec<Event>,
        bucket: BucketId,
        move_id: u64,
        epoch: u64,
    ) -> Result<Outcome, Rejection> {
        if self.bucket(bucket).acquired_by == Some(move_id) {
            return Ok(self.bucket_outcome(bucket)); // a retry
        }
        let Some(staged) = self.staged.get(&bucket).filter(|s| s.move_id == move_id) else {
            return Err(refused(format!(
                "{bucket} has nothing staged for move {move_id} (aborted?)"
            )));
        };
        // The rows it kept when the bucket left it last give way.
        let kept: BTreeSet<IssuerId> = match self.bucket(bucket).released_to {
            Some(_) => self.bucket_issuers(bucket).cloned().collect(),
            None => BTreeSet::new(),
        };
        let taken = |id: &&IssuerId| self.issuers.contains_key(*id) && !kept.contains(*id);
        if let Some(taken) = staged.issuers.keys().find(taken) {
            return Err(refused(format!(
                "issuer {taken} of {bucket} is already here"
            )));
        }
        // Every staged issuer is checked before anything changes; a failed
        // check leaves the staging for an abort to clear. (A unit test
        // reaches this; a correct copy never does.)
        let staged = self.staged.remove(&bucket).expect("checked above");
        for (issuer_id, issuer) in &staged.issuers {
            if let Err(reason) = staged.check(issuer_id, issuer) {
                self.staged.insert(bucket, staged);
                return Err(refused(format!(
                    "the rows staged for {bucket} are not consistent: {reason}"
                )));
            }
        }
        for issuer_id in &kept {
            self.issuers.remove(issuer_id);
        }
        self.sealed_holds
            .retain(|(_, id)| !kept.contains(id.issuer()));
        let ids: Vec<IssuerId> = staged.issuers.keys().cloned().collect();
        self.holds_by_expiry.extend(staged.holds);
        self.issuers.extend(staged.issuers);
        let placed = self.by_bucket.entry(bucket).or_default();
        placed.retain(|id| !kept.contains(id));
        placed.extend(ids.iter().cloned());
        if placed.is_empty() {
            self.by_bucket.remove(&bucket);
        }
        let record = self.buckets.entry(bucket).or_default();
        *record = crate::BucketRecord {
            opened_at: Some(ctx.position),
            epoch,
            acquired_by: Some(move_id),
            aborted_up_to: record.aborted_up_to,
            ..crate::BucketRecord::default()
        };
        events.push(Event::BucketAcquired {
            position: ctx.position,
            at: ctx.at,
            bucket,
            from: staged.from,
            epoch,
            issuers: ids,
        });
        Ok(self.bucket_outcome(bucket))
    }

    /// Drops what a move staged, unless the bucket was acquired already
    /// (the answer says which).
    pub(crate) fn abort_import(&mut self, bucket: BucketId, move_id: u64) -> Outcome {
        if self.bucket(bucket).acquired_by == Some(move_id) {
            return self.bucket_outcome(bucket);
        }
        if self
            .staged
            .get(&bucket)
            .is_some_and(|s| s.move_id == move_id)
        {
            self.staged.remove(&bucket);
        }
        let record = self.buckets.entry(bucket).or_default();
        record.aborted_up_to = record.aborted_up_to.max(move_id);
        self.bucket_outcome(bucket)
    }

    /// A sealed bucket is its next owner's (which acquired it). Its rows
    /// stay here, refused to every read and write, so that a change
    /// consumer scanning this group while the bucket moves never sees rows
    /// vanish (it orders them by epoch: the next owner's win). Refused
    /// unless the bucket is sealed here.
    pub(crate) fn release_bucket(
        &mut self,
        ctx: &ApplyContext,
        events: &mut Vec<Event>,
        bucket: BucketId,
        to: ShardId,
    ) -> Result<Outcome, Rejection> {
        let record = self.bucket(bucket);
        if record.released_to.is_some() {
            return Ok(self.bucket_outcome(bucket));
        }
        if record.sealed_at.is_none() {
            return Err(refused(format!("{bucket} is not sealed here")));
        }
        let ids: Vec<IssuerId> = self.bucket_issuers(bucket).cloned().collect();
        self.buckets.get_mut(&bucket).expect("sealed").released_to = Some(to);
        events.push(Event::BucketReleased {
            position: ctx.position,
            at: ctx.at,
            bucket,
            to,
            issuers: ids,
        });
        Ok(self.bucket_outcome(bucket))
    }

    /// How many moves brought an issuer's bucket here (0: never moved).
    pub fn epoch_of(&self, issuer: &IssuerId) -> u64 {
        self.bucket_of(issuer)
            .map_or(0, |bucket| self.bucket(bucket).epoch)
    }

    /// What snapshot format 4 writes of the staged imports.
    pub(crate) fn staged_out(&self) -> Vec<StagedOut> {
        self.staged
            .iter()
            .map(|(bucket, staged)| {
                let mut rows = BucketRows::default();
                for (issuer_id, issuer) in &staged.issuers {
                    // An issuer whose own row has not arrived yet is
                    // written without one, so that a replica restored from
                    // the snapshot comes to the same tally.
                    let own = (staged.tallies.get(issuer_id))
                        .is_some_and(|t| t.has_issuer_row)
                        .then_some(ExportPart::Issuer);
                    for part in own
                        .into_iter()
                        .chain(
                            issuer
                                .reservations
                                .keys()
                                .map(|s| ExportPart::Reservation(*s)),
                        )
                        .chain(issuer.tokens.keys().map(|t| ExportPart::Token(t.clone())))
                    {
                        self.export_row(issuer_id, issuer, &part, &mut rows);
                    }
                }
                StagedOut {
                    bucket: *bucket,
                    move_id: staged.move_id,
                    from: staged.from,
                    rows,
                }
            })
            .collect()
    }
}

impl Staged {
    pub(crate) fn new(move_id: u64, from: ShardId) -> Staged {
        Staged {
            move_id,
            from,
            issuers: BTreeMap::new(),
            tallies: BTreeMap::new(),
            holds: BTreeSet::new(),
        }
    }

    /// Adds the rows of one import entry, keeping the tallies and the
    /// holds as they change (a later pass may replace a row an earlier one
    /// copied, and a row that failed its checks with one that passes).
    /// Depends on nothing but the rows, so a replica that rebuilds the
    /// staging from a snapshot's rows comes to the same tallies. (Positions
    /// against the group's own log are checked by the full check of the
    /// state, at restore and in the simulator.)
    pub(crate) fn add(&mut self, bucket: BucketId, rows: &BucketRows) {
        let unknown = || Region::new("unknown").expect("a valid region");
        for row in &rows.issuers {
            let issuer = (self.issuers.entry(row.issuer_id.clone()))
                .or_insert_with(|| empty_issuer(row.home_region.clone(), bucket));
            issuer.home_region = row.home_region.clone();
            issuer.limit = row.limit;
            issuer.reserved = row.reserved;
            issuer.next_seq = row.next_seq;
            issuer.updated = row.updated;
            let tally = self.tallies.entry(row.issuer_id.clone()).or_default();
            tally.has_issuer_row = true;
        }
        for row in &rows.reservations {
            let issuer = (self.issuers.entry(row.issuer_id.clone()))
                .or_insert_with(|| empty_issuer(unknown(), bucket));
            let tally = self.tallies.entry(row.issuer_id.clone()).or_default();
            let id = ReservationId::new(row.issuer_id.clone(), row.seq);
            let key = ExportPart::Reservation(row.seq);
            if let Some(old) = issuer.reservations.remove(&row.seq) {
                if old.status.is_open() {
                    tally.open_amount -= u128::from(old.amount.0);
                }
                if carries(issuer, row.seq, &old) {
                    tally.matched -= 1;
                }
                if let Some(expires_at_ms) = old.expires_at_ms {
                    self.holds.remove(&(expires_at_ms, id.clone()));
                }
                tally.broken.remove(&key);
            }
            let new = reservation_of(row);
            if let Err(reason) = check_row(&RowId(&row.issuer_id, row.seq), &new) {
                tally.broken.insert(key, reason);
            }
            match new.status.is_open() {
                true => {
                    tally.open_amount += u128::from(new.amount.0);
                    issuer.open.insert(row.seq)
                }
                false => issuer.open.remove(&row.seq),
            };
            if let Some(expires_at_ms) = new.expires_at_ms {
                self.holds.insert((expires_at_ms, id));
            }
            if carries(issuer, row.seq, &new) {
                tally.matched += 1;
            }
            issuer.reservations.insert(row.seq, new);
        }
        for row in &rows.tokens {
            let issuer = (self.issuers.entry(row.issuer_id.clone()))
                .or_insert_with(|| empty_issuer(unknown(), bucket));
            let tally = self.tallies.entry(row.issuer_id.clone()).or_default();
            let key = ExportPart::Token(row.token.clone());
            if let Some(TokenRecord::Committed { seq, commit_token }) =
                issuer.tokens.get(&row.token)
            {
                tally.committed -= 1;
                if carried(issuer, &row.token, *seq, *commit_token) {
                    tally.matched -= 1;
                }
            }
            tally.broken.remove(&key);
            let record = token_record_of(&row.outcome);
            match &record {
                TokenRecord::Committed { seq, commit_token } => {
                    tally.committed += 1;
                    if carried(issuer, &row.token, *seq, *commit_token) {
                        tally.matched += 1;
                    }
                }
                TokenRecord::Rejected {
                    request, remaining, ..
                } if request.amount <= *remaining => {
                    let reason = format!(
                        "{}: token {} rejected {} with {remaining} remaining",
                        row.issuer_id, row.token, request.amount
                    );
                    tally.broken.insert(key, reason);
                }
                _ => {}
            }
            issuer.tokens.insert(row.token.clone(), record);
        }
    }

    /// Whether a staged issuer's rows are consistent, from its tally.
    pub(crate) fn check(&self, issuer_id: &IssuerId, issuer: &Issuer) -> Result<(), String> {
        let tally = self.tallies.get(issuer_id).cloned().unwrap_or_default();
        if let Some(reason) = tally.broken.into_values().next() {
            return Err(reason);
        }
        if !tally.has_issuer_row {
            return Err(format!("{issuer_id}: rows without the issuer's own"));
        }
        let (limit, reserved) = (issuer.limit, issuer.reserved);
        if limit.0 > AMOUNT_MAX || reserved > limit {
            return Err(format!("{issuer_id}: reserved {reserved} of limit {limit}"));
        }
        if tally.open_amount != u128::from(reserved.0) {
            return Err(format!(
                "{issuer_id}: reserved {reserved} but held + confirmed sum to {}",
                tally.open_amount
            ));
        }
        let last_seq = issuer.reservations.last_key_value().map_or(0, |(s, _)| *s);
        if issuer.next_seq == 0 || last_seq >= issuer.next_seq {
            return Err(format!(
                "{issuer_id}: reservation r{last_seq} with next seq {}",
                issuer.next_seq
            ));
        }
        let rows = issuer.reservations.len();
        if tally.committed != rows || tally.matched != rows {
            return Err(format!(
                "{issuer_id}: {rows} reservations, {} committed tokens, {} of them carried by \
                 their reservation",
                tally.committed, tally.matched
            ));
        }
        Ok(())
    }
}

/// Whether reservation `seq` is the one its token's committed outcome
/// names.
fn carries(issuer: &Issuer, seq: u64, r: &Reservation) -> bool {
    let named = TokenRecord::Committed {
        seq,
        commit_token: r.created,
    };
    issuer.tokens.get(&r.token) == Some(&named)
}

/// Whether the reservation a committed token names carries it.
fn carried(issuer: &Issuer, token: &ReservationToken, seq: u64, at: CommitToken) -> bool {
    (issuer.reservations.get(&seq)).is_some_and(|r| r.token == *token && r.created == at)
}

fn refused(reason: String) -> Rejection {
    Rejection::InvalidField {
        field: "bucket".into(),
        reason,
    }
}

fn empty_issuer(home_region: Region, bucket: BucketId) -> Issuer {
    Issuer {
        home_region,
        limit: Amount::ZERO,
        reserved: Amount::ZERO,
        next_seq: 1,
        updated: CommitToken {
            shard: ShardId(0),
            generation: harbor_types::Generation::ZERO,
            index: harbor_types::LogIndex(0),
        },
        reservations: BTreeMap::new(),
        tokens: BTreeMap::new(),
        open: BTreeSet::new(),
        bucket: Some(bucket),
    }
}

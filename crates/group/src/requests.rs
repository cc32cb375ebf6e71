//! Client requests: which ones this replica takes, and what each read
//! needs before it is answered.
//!
//! - Status: any replica, at once.
//! - Local reads (session, bounded staleness, causal): any replica, once it
//!   has applied the entry the caller names (or the wait runs out) and its
//!   state is young enough.
//! - Writes and strong reads: the leader of the sender's generation only.
//!   A write is answered when its entry applies; a strong read needs a
//!   lease and the leader's first entry applied.

use harbor_replication::ProposeError;
use harbor_reservation::{Command, ScanKey};
use harbor_types::limits::CHANGES_PAGE_MAX;
use harbor_types::sim::probe;
use harbor_types::{BucketId, Generation, NodeId, Now, ShardId};
use harbor_wire::{
    Change, ChangePosition, ChangesPage, ErrorKind, GroupStatus, LoadCounts, NodeError, Query,
    QueryResult, Request, Response, Route, ScanPage,
};

use crate::group::{GroupCore, LocalRead, Waiter};

impl GroupCore {
    pub(crate) fn request(
        &mut self,
        now: Now,
        from: NodeId,
        id: u64,
        request: Request,
        route: Option<Route>,
    ) {
        if let Err(e) = self.running() {
            return self.reply_error(&from, id, e);
        }
        if let Request::Read {
            query: Query::Status,
            ..
        }
        | Request::LocalRead {
            query: Query::Status,
            ..
        } = request
        {
            let status = self.status(now).expect("running");
            let response = Response::Read {
                result: QueryResult::Status(status),
                served: self.served(),
            };
            return self.reply(&from, id, response);
        }
        if let Request::LocalRead { query, need, .. } = request {
            if self.local_reads.len() >= self.settings.local_reads_waiting_max {
                let e = NodeError::new(
                    ErrorKind::ReplicaBehind,
                    format!("{} of {} holds too many waiting reads", self.me, self.shard),
                );
                return self.reply_error(&from, id, e);
            }
            let until = now.mono.plus(need.wait_ms);
            self.local_reads.push(LocalRead {
                reply_to: from,
                request_id: id,
                query,
                need,
                until,
            });
            return;
        }
        if let Err(e) = self.admit(route.map(|r| r.generation)) {
            return self.reply_error(&from, id, e);
        }
        // A request for a bucket this group does not take is refused: a
        // write before it costs an entry (the seal's entry refuses the
        // ones already ordered), a read because the bucket's newest state
        // may be its next group's already.
        if let Some(bucket) = route.and_then(|r| r.bucket) {
            let refused = match request {
                Request::Write { .. } => {
                    !self.machine.takes_writes(bucket)
                        && !self.settings.bugs.source_accepts_after_seal
                }
                _ => !self.machine.serves_reads(bucket),
            };
            if refused {
                probe("node.sealed_bucket_refused_at_admission");
                return self.reply_error(&from, id, crate::group::moved(self.shard, bucket));
            }
        }
        let bucket = route.and_then(|r| r.bucket);
        match request {
            Request::Write { command, .. } => {
                let payload = postcard::to_allocvec(&command).expect("commands serialize");
                let bytes = payload.len();
                match self.core.propose(now, payload) {
                    Ok(index) => {
                        self.count_write(now, bucket, &command, bytes);
                        let previous = self.waiters.insert(
                            index,
                            Waiter {
                                reply_to: from,
                                request_id: id,
                            },
                        );
                        assert!(previous.is_none(), "two waiters for entry {index}");
                    }
                    Err(e) => {
                        let e = propose_error(self.shard, e);
                        self.reply_error(&from, id, e);
                    }
                }
            }
            Request::LocalRead { .. } => unreachable!("answered before admission"),
            Request::Read { query, .. } => {
                if !self.core.has_lease(now) && !self.settings.bugs.strong_read_without_lease {
                    probe("node.strong_read_refused_without_lease");
                    let e = NodeError::new(
                        ErrorKind::Unavailable,
                        format!("the leader of {} holds no lease right now; a strong read could be stale", self.shard),
                    );
                    return self.reply_error(&from, id, e);
                }
                if !self.is_ready() {
                    let e = NodeError::new(
                        ErrorKind::Unavailable,
                        format!(
                            "the leader of {} has not committed its first entry yet",
                            self.shard
                        ),
                    );
                    return self.reply_error(&from, id, e);
                }
                // Clients' reads count; the feeds', the movers' and the
                // load reports' own do not.
                let client_read = matches!(
                    query,
                    Query::Issuer(_)
                        | Query::Reservation(_)
                        | Query::OpenReservations(_)
                        | Query::Token(..)
                        | Query::TokenAnyIssuer(_)
                );
                if client_read {
                    let reads = LoadCounts {
                        reads: 1,
                        ..LoadCounts::default()
                    };
                    self.load.count(now.mono, bucket, reads);
                }
                let result = self.query(query);
                let response = Response::Read {
                    result,
                    served: self.served(),
                };
                self.reply(&from, id, response);
            }
        }
    }

    /// Counts a write the leader ordered against its bucket (each of a
    /// batch's buckets gets its share of the bytes). A move's own commands
    /// are not the bucket's load.
    fn count_write(&mut self, now: Now, bucket: Option<BucketId>, command: &Command, bytes: usize) {
        if command.moves_a_bucket() {
            return;
        }
        let one = |bytes: usize| LoadCounts {
            writes: 1,
            bytes: bytes as u64,
            reads: 0,
        };
        match command {
            Command::BucketBatch(commands) if !commands.is_empty() => {
                let share = bytes / commands.len();
                for (bucket, _) in commands {
                    self.load.count(now.mono, Some(*bucket), one(share));
                }
            }
            _ => self.load.count(now.mono, bucket, one(bytes)),
        }
    }

    /// Refuses everything once the replica stopped.
    fn running(&self) -> Result<(), NodeError> {
        match &self.failed {
            None => Ok(()),
            Some(why) => Err(NodeError::new(
                ErrorKind::ReplicaFailed,
                format!("replica of {} on {} stopped: {why}", self.shard, self.me),
            )),
        }
    }

    /// What the control plane asks every round; a stopped replica answers
    /// with its failure.
    pub fn status(&self, now: Now) -> Result<GroupStatus, NodeError> {
        self.running()?;
        Ok(GroupStatus {
            shard: self.shard,
            node: self.me.clone(),
            replica: self.core.status(now),
            ready: self.is_ready(),
            applied: self.machine.applied(),
            staleness_ms: self.staleness_ms(now),
            issuers: self.machine.issuers().count() as u64,
            changes_retained_bytes: self.changes.retained_bytes() as u64,
            members_epoch: self.members_epoch(),
        })
    }

    /// Whether this replica takes a write or a strong read routed at
    /// `route`: only as the leader of that generation.
    fn admit(&self, route: Option<Generation>) -> Result<(), NodeError> {
        let generation = self.core.generation();
        if let Some(route) = route.filter(|&r| r < generation) {
            probe("node.stale_route_refused");
            return Err(NodeError::new(
                ErrorKind::StaleRoute {
                    hint: self.core.leader().cloned(),
                },
                format!(
                    "{} is at {generation} of {}, newer than the sender's map ({route}); refresh the map",
                    self.me, self.shard,
                ),
            ));
        }
        // A replica behind the sender's map has not heard the news yet: it is
        // not the leader of that generation, even if it leads an older one.
        let ahead = route.is_some_and(|r| r > generation);
        if self.core.is_leader() && !ahead {
            return Ok(());
        }
        // Our idea of the leader is older than the sender's: no hint.
        let hint = if ahead {
            None
        } else {
            self.core.leader().cloned()
        };
        Err(NodeError::new(
            ErrorKind::NotLeader { hint },
            format!("{} is not the leader of {}", self.me, self.shard),
        ))
    }

    /// Answers the local reads that can be answered: the ones whose entry
    /// applied, and the ones whose wait ran out (refused, so the caller
    /// asks the leader).
    pub(crate) fn answer_local_reads(&mut self, now: Now) {
        if self.local_reads.is_empty() {
            return;
        }
        let reads = std::mem::take(&mut self.local_reads);
        for read in reads {
            let missing = read.need.applied_at_least.filter(|&index| {
                self.applied < index && !self.settings.bugs.follower_ignores_session
            });
            match missing {
                Some(_) if now.mono < read.until => self.local_reads.push(read),
                Some(index) => {
                    probe("node.local_read_behind_session");
                    let e = NodeError::new(
                        ErrorKind::ReplicaBehind,
                        format!(
                            "{} of {} has applied up to {}, not yet {index}",
                            self.me, self.shard, self.applied
                        ),
                    );
                    self.reply_error(&read.reply_to, read.request_id, e);
                }
                None => self.answer_local_read(now, read),
            }
        }
    }

    fn answer_local_read(&mut self, now: Now, read: LocalRead) {
        if let Some(issuer) = query_issuer(&read.query) {
            if !self.machine.serves_issuer(issuer) {
                let e = NodeError::new(
                    ErrorKind::ReplicaBehind,
                    format!(
                        "{issuer}'s bucket is moving out of {}: ask its leader",
                        self.shard
                    ),
                );
                return self.reply_error(&read.reply_to, read.request_id, e);
            }
        }
        let staleness_ms = self.staleness_ms(now);
        if let Some(max) = read.need.max_staleness_ms {
            if staleness_ms.is_none_or(|s| s > max) {
                probe("node.local_read_too_stale");
                let age =
                    staleness_ms.map_or("of unknown age".to_string(), |s| format!("{s} ms old"));
                let e = NodeError::new(
                    ErrorKind::ReplicaBehind,
                    format!(
                        "the state of {} on {} is {age}, over the {max} ms budget",
                        self.shard, self.me
                    ),
                );
                return self.reply_error(&read.reply_to, read.request_id, e);
            }
        }
        if !self.core.is_leader() {
            probe("node.follower_served_read");
        }
        let result = self.query(read.query);
        let mut served = self.served();
        served.staleness_ms = staleness_ms;
        self.reply(
            &read.reply_to,
            read.request_id,
            Response::Read { result, served },
        );
    }

    fn query(&self, query: Query) -> QueryResult {
        match query {
            Query::Issuer(issuer) => QueryResult::Issuer(self.machine.issuer(&issuer)),
            Query::Reservation(id) => QueryResult::Reservation(self.machine.reservation(&id)),
            Query::OpenReservations(issuer) => {
                QueryResult::OpenReservations(self.machine.open_reservations(&issuer))
            }
            Query::Token(issuer, token) => QueryResult::Token(self.machine.token(&issuer, &token)),
            // A moving bucket's tokens are answered by its next group.
            Query::TokenAnyIssuer(token) => QueryResult::Tokens(
                self.machine
                    .issuers()
                    .filter(|issuer| self.machine.serves_issuer(issuer))
                    .filter_map(|issuer| self.machine.token(issuer, &token))
                    .collect(),
            ),
            Query::Status => unreachable!("answered before admission"),
            Query::Changes { after, max } => {
                QueryResult::Changes(self.changes(after, max as usize))
            }
            Query::Scan { after, max } => {
                QueryResult::Scan(self.scan(after.as_ref(), max as usize))
            }
            Query::Export {
                bucket,
                since,
                after,
                max,
            } => QueryResult::Export(self.machine.export(
                bucket,
                since,
                after.as_ref(),
                (max as usize).clamp(1, CHANGES_PAGE_MAX),
            )),
            Query::BucketLoad { top } => QueryResult::BucketLoad(self.load_report(top)),
            Query::UntaggedIssuers { after, max } => QueryResult::Issuers(
                self.machine
                    .untagged_issuers(after.as_ref(), (max as usize).clamp(1, CHANGES_PAGE_MAX)),
            ),
        }
    }
}

impl GroupCore {
    /// The group's changes after `after`, at most `max` (and at most
    /// `CHANGES_PAGE_MAX`): what a change feed reads from this replica.
    pub fn changes(&self, after: ChangePosition, max: usize) -> ChangesPage {
        let bugs = self.settings.bugs;
        let resolved = if bugs.resolved_from_lease {
            self.core.closed_timestamp(self.now)
        } else {
            self.resolved()
        };
        let max = max.clamp(1, CHANGES_PAGE_MAX);
        let mut page = self.changes.page(after, max, self.applied, resolved);
        if bugs.feed_skips_change && page.changes.len() > 1 {
            page.changes.remove(0);
        }
        page
    }

    /// A page of this replica's state after `after`, at most `max` rows
    /// (and at most `CHANGES_PAGE_MAX`), at the position it had applied.
    pub fn scan(&self, after: Option<&ScanKey>, max: usize) -> ScanPage {
        ScanPage {
            rows: self.machine.scan(after, max.clamp(1, CHANGES_PAGE_MAX)),
            at: ChangePosition::entry_end(self.applied),
            at_time: self.machine.applied_at(),
        }
    }

    /// Every change this replica keeps after `after`, as it is, whatever
    /// the bug switches (the simulator's reference for its feeds).
    pub fn kept_changes_after(&self, after: ChangePosition) -> Vec<Change> {
        self.changes.kept_after(after).cloned().collect()
    }
}

/// The issuer a read is about, if one.
fn query_issuer(query: &Query) -> Option<&harbor_types::IssuerId> {
    match query {
        Query::Issuer(issuer) | Query::OpenReservations(issuer) | Query::Token(issuer, _) => {
            Some(issuer)
        }
        Query::Reservation(id) => Some(id.issuer()),
        _ => None,
    }
}

fn propose_error(shard: ShardId, e: ProposeError) -> NodeError {
    let kind = match e {
        ProposeError::NotLeader { ref leader, .. } => ErrorKind::NotLeader {
            hint: leader.clone(),
        },
        ProposeError::RpoBudgetExceeded { budget_ms, .. } => {
            let retry_after_ms = (budget_ms / 5).max(100);
            let message = format!("{shard}: {e}; writes resume when the remote copy catches up");
            return NodeError::new(ErrorKind::RpoBudgetExceeded { retry_after_ms }, message);
        }
        ProposeError::Overloaded { .. } => ErrorKind::Overloaded {
            retry_after_ms: Some(50),
        },
        ProposeError::TooLarge { .. } => ErrorKind::TooLarge,
        ProposeError::Draining { retry_after_ms } => ErrorKind::LeadershipChanged {
            retry_after_ms: Some(retry_after_ms),
        },
    };
    let message = match kind {
        ErrorKind::NotLeader { .. } | ErrorKind::TooLarge => e.to_string(),
        _ => format!("{shard}: {e}"),
    };
    NodeError::new(kind, message)
}

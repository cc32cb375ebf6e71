//! One bucket move (DESIGN.md §9), as a pure state machine: no clock, no
//! IO. The gateway's admin endpoint and the simulator drive this same
//! code, one step at a time: a write or a read for a group (sent through
//! a [`crate::call::Call`] to its leader), a metadata command, or a wait.
//!
//! 1. Copy: pages of the bucket's rows from the source, each imported
//!    into the target (staged there, out of sight); then passes over only
//!    what changed since the previous pass began, until one finds few.
//! 2. Seal: the source refuses the bucket's writes from that entry on.
//! 3. Final pass: what changed since the last pass began (nothing can
//!    change after the seal), then the target acquires the bucket.
//! 4. Commit: the metadata plane names the target; gateways follow.
//! 5. Release: the source lets the rows go.
//!
//! A step that fails is tried again (every step is idempotent) until the
//! move's time is up; then the move aborts: the target drops what it
//! staged, and the source unseals. The abort is decided in the target's
//! log: if the acquisition applied first, the move goes on instead, so no
//! instant has two groups taking the bucket's writes and none is lost.

use harbor_meta::{BucketMove, MetaCommand, MetaError, MovePhase, MoveProgress};
use harbor_reservation::{BucketRecord, BucketRows, Command, ExportKey, Outcome};
use harbor_types::{limits, BucketId, CommitToken, IssuerId, MonoMs, ShardId};
use harbor_wire::{Query, QueryResult, Response};

/// How a move copies and how long it may take. Defaults are in
/// `harbor_types::limits`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MoveLimits {
    /// Rows per copied page, and so per import entry.
    pub chunk_rows: u32,
    /// A pass that copied at most this many rows is the last before the
    /// seal (the write pause is the time to copy what the next one finds).
    pub final_pass_rows: u64,
    /// Passes before the seal, at most.
    pub passes_max: u32,
    /// A move not sealed by then aborts (a target too slow, a group
    /// without a leader).
    pub copy_timeout_ms: u64,
    /// A sealed move not acquired by then aborts: the bucket's writes
    /// wait at most this long.
    pub cutover_timeout_ms: u64,
    /// A failed step is tried again after this.
    pub retry_ms: u64,
}

impl Default for MoveLimits {
    fn default() -> Self {
        MoveLimits {
            chunk_rows: limits::MOVE_CHUNK_ROWS,
            final_pass_rows: limits::MOVE_FINAL_PASS_ROWS,
            passes_max: limits::MOVE_PASSES_MAX,
            copy_timeout_ms: limits::MOVE_COPY_TIMEOUT_MS,
            cutover_timeout_ms: limits::MOVE_CUTOVER_TIMEOUT_MS,
            retry_ms: limits::MOVE_RETRY_MS,
        }
    }
}

/// What the driver does next.
#[derive(Clone, Debug)]
pub enum MoveStep {
    /// Order `command` through `shard`'s leader; answer with
    /// [`Mover::on_response`].
    Write { shard: ShardId, command: Command },
    /// Read through `shard`'s leader; answer with [`Mover::on_response`].
    Read { shard: ShardId, query: Query },
    /// Commit to the metadata plane; answer with [`Mover::on_meta`].
    Meta(MetaCommand),
    /// Call [`Mover::on_timer`] at this time.
    WakeAt(MonoMs),
    /// The move is over: the record as the metadata plane ended it, or why
    /// not.
    Done(Box<Result<BucketMove, MoveFailure>>),
}

/// A move that did not happen.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MoveFailure {
    pub reason: String,
    /// The abort finished: the source has the bucket and takes its writes.
    /// Otherwise the move is stuck part-way (a group or the metadata
    /// plane unreachable for the whole abort): its record stays under way,
    /// and recovering it finishes or aborts it.
    pub aborted: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Phase {
    /// The source learns the bucket of issuers registered before buckets
    /// were recorded, so the copy takes them along.
    Tag,
    /// Reading a page of the current pass.
    Read,
    /// Importing the page just read.
    Import(BucketRows),
    Seal,
    RecordSeal,
    Acquire,
    Commit,
    Release,
    /// The source was unsealed after the target acquired: seal it again.
    Reseal,
    End,
    /// Abort: the target drops its staging (or says it acquired already).
    AbortImport,
    Unseal,
    EndAborted,
    Done,
}

pub struct Mover {
    record: BucketMove,
    limits: MoveLimits,
    /// Issuers of the bucket the source may not know the bucket of.
    untagged: Vec<IssuerId>,
    phase: Phase,
    /// The step in flight failed: it is sent again at this time.
    retry_at: Option<MonoMs>,
    /// Pre-seal and cutover deadlines.
    copy_deadline: MonoMs,
    cutover_deadline: Option<MonoMs>,
    /// Abort steps stop being tried at this time (the move is stuck).
    abort_deadline: Option<MonoMs>,
    /// The current pass: rows written after `since`, from `after` on.
    since: Option<CommitToken>,
    after: Option<ExportKey>,
    /// The position of this pass's first page: the next pass's `since`.
    pass_start: Option<CommitToken>,
    pass_rows: u64,
    /// After the seal, the pass under way is the last.
    sealed_at: Option<MonoMs>,
    epoch: Option<u64>,
    progress: MoveProgress,
    abort_reason: Option<String>,
}

impl Mover {
    /// Drives `record` (just begun in the metadata plane) from `now`.
    /// `untagged` are issuers the directory places in the bucket that the
    /// source may know without their bucket (registered before buckets
    /// were recorded): the seal names them.
    pub fn start(
        now: MonoMs,
        record: BucketMove,
        untagged: Vec<IssuerId>,
        limits: MoveLimits,
    ) -> (Mover, MoveStep) {
        let phase = match untagged.is_empty() {
            true => Phase::Read,
            false => Phase::Tag,
        };
        let mover = Mover {
            limits,
            untagged,
            phase,
            retry_at: None,
            copy_deadline: now.plus(limits.copy_timeout_ms),
            cutover_deadline: None,
            abort_deadline: None,
            since: None,
            after: None,
            pass_start: None,
            pass_rows: 0,
            sealed_at: None,
            epoch: None,
            progress: record.progress,
            abort_reason: None,
            record,
        };
        let step = mover.step();
        (mover, step)
    }

    /// Finishes a move whose driver is gone: abort it, unless the target
    /// acquired the bucket already (then it goes on to the end).
    pub fn recover(now: MonoMs, record: BucketMove, limits: MoveLimits) -> (Mover, MoveStep) {
        let (mut mover, _) = Mover::start(now, record, Vec::new(), limits);
        mover.abort(now, "its driver stopped".into());
        let step = mover.step();
        (mover, step)
    }

    pub fn record(&self) -> &BucketMove {
        &self.record
    }

    pub fn progress(&self) -> MoveProgress {
        self.progress
    }

    /// The phase for progress lines.
    pub fn phase(&self) -> &'static str {
        match self.phase {
            Phase::Read | Phase::Import(_) if self.sealed_at.is_some() => "final copy",
            Phase::Tag | Phase::Read | Phase::Import(_) => "copying",
            Phase::Seal | Phase::RecordSeal => "sealing",
            Phase::Acquire => "acquiring",
            Phase::Commit => "committing",
            Phase::Release | Phase::Reseal | Phase::End => "releasing",
            Phase::AbortImport | Phase::Unseal | Phase::EndAborted => "aborting",
            Phase::Done => "done",
        }
    }

    /// The step under way, finer than [`Mover::phase`] (for traces).
    pub fn step_name(&self) -> &'static str {
        match self.phase {
            Phase::Tag => "tag",
            Phase::Read => "read",
            Phase::Import(_) => "import",
            Phase::Seal => "seal",
            Phase::RecordSeal => "record seal",
            Phase::Acquire => "acquire",
            Phase::Commit => "commit",
            Phase::Release => "release",
            Phase::Reseal => "reseal",
            Phase::End => "end",
            Phase::AbortImport => "abort import",
            Phase::Unseal => "unseal",
            Phase::EndAborted => "end aborted",
            Phase::Done => "done",
        }
    }

    fn bucket(&self) -> BucketId {
        self.record.bucket
    }

    /// The request (or metadata command) of the current phase.
    fn step(&self) -> MoveStep {
        let (bucket, id) = (self.bucket(), self.record.id);
        let (from, to) = (self.record.from, self.record.to);
        match &self.phase {
            Phase::Tag => MoveStep::Write {
                shard: from,
                command: Command::TagIssuers {
                    bucket,
                    issuers: self.untagged.clone(),
                },
            },
            Phase::Read => MoveStep::Read {
                shard: from,
                query: Query::Export {
                    bucket,
                    since: self.since,
                    after: self.after.clone(),
                    max: self.limits.chunk_rows,
                },
            },
            Phase::Import(rows) => MoveStep::Write {
                shard: to,
                command: Command::ImportBucket {
                    bucket,
                    move_id: id,
                    from,
                    rows: rows.clone(),
                },
            },
            Phase::Seal => MoveStep::Write {
                shard: from,
                command: Command::SealBucket {
                    bucket,
                    issuers: self.untagged.clone(),
                },
            },
            Phase::RecordSeal => MoveStep::Meta(MetaCommand::UpdateMove {
                id,
                phase: MovePhase::Sealed,
                progress: self.progress,
            }),
            Phase::Acquire => MoveStep::Write {
                shard: to,
                command: Command::AcquireBucket {
                    bucket,
                    move_id: id,
                    epoch: self.epoch.expect("an epoch from the first page"),
                },
            },
            Phase::Commit => MoveStep::Meta(MetaCommand::CommitMove { id }),
            Phase::Release => MoveStep::Write {
                shard: from,
                command: Command::ReleaseBucket { bucket, to },
            },
            Phase::Reseal => MoveStep::Write {
                shard: from,
                command: Command::SealBucket {
                    bucket,
                    issuers: Vec::new(),
                },
            },
            Phase::End => MoveStep::Meta(MetaCommand::EndMove {
                id,
                aborted: None,
                progress: self.progress,
                at_ms: 0,
            }),
            Phase::AbortImport => MoveStep::Write {
                shard: to,
                command: Command::AbortImport {
                    bucket,
                    move_id: id,
                },
            },
            Phase::Unseal => MoveStep::Write {
                shard: from,
                command: Command::UnsealBucket { bucket },
            },
            Phase::EndAborted => MoveStep::Meta(MetaCommand::EndMove {
                id,
                aborted: self.abort_reason.clone(),
                progress: self.progress,
                at_ms: 0,
            }),
            Phase::Done => unreachable!("a finished move has no step"),
        }
    }

    /// The answer to the current write or read (`Err`: it did not get one,
    /// or the call gave up).
    pub fn on_response(&mut self, now: MonoMs, answer: Result<Response, String>) -> MoveStep {
        let answer = match answer {
            Ok(Response::Error(e)) => Err(e.to_string()),
            other => other,
        };
        let response = match answer {
            Ok(response) => response,
            Err(reason) => return self.failed(now, reason),
        };
        match (&self.phase, response) {
            (Phase::Tag, Response::Applied { .. }) => {
                self.phase = Phase::Read;
                self.step()
            }
            (
                Phase::Read,
                Response::Read {
                    result: QueryResult::Export(page),
                    ..
                },
            ) => {
                if self.sealed_at.is_some() && page.record.sealed_at.is_none() {
                    return self.failed(now, "the source answered as if unsealed".into());
                }
                if self.epoch.is_none() {
                    self.epoch = Some(page.record.epoch + 1);
                }
                self.pass_start = self.pass_start.or(page.at);
                self.after = page.next.clone();
                if page.rows.is_empty() {
                    return self.after_page(now);
                }
                let rows = page.rows.len() as u64;
                self.pass_rows += rows;
                self.progress.copied_rows += rows;
                self.progress.copied_reservations += page.rows.reservations.len() as u64;
                self.progress.copied_bytes += page.rows.encoded_bytes();
                self.phase = Phase::Import(page.rows);
                self.step()
            }
            (Phase::Import(_), Response::Applied { outcome, .. }) => match outcome {
                Outcome::Bucket { .. } => self.after_page(now),
                other => self.abort_now(now, format!("the target refused the rows: {other:?}")),
            },
            (Phase::Seal, Response::Applied { outcome, .. }) => match outcome {
                Outcome::Bucket {
                    record:
                        BucketRecord {
                            sealed_at: Some(_), ..
                        },
                    ..
                } => {
                    self.sealed_at = Some(now);
                    self.cutover_deadline = Some(now.plus(self.limits.cutover_timeout_ms));
                    self.phase = Phase::RecordSeal;
                    self.step()
                }
                other => self.abort_now(now, format!("the source did not seal: {other:?}")),
            },
            (Phase::Acquire, Response::Applied { outcome, .. }) => match outcome {
                Outcome::Bucket { record, .. } if record.acquired_by == Some(self.record.id) => {
                    self.phase = Phase::Commit;
                    self.step()
                }
                other => self.abort_now(now, format!("the target did not acquire: {other:?}")),
            },
            (Phase::Release, Response::Applied { outcome, .. }) => match outcome {
                Outcome::Bucket { record, .. } if record.released_to == Some(self.record.to) => {
                    self.phase = Phase::End;
                    self.step()
                }
                // Not sealed any more (unsealed by a driver that aborted
                // it after the acquisition): seal it again, then release.
                Outcome::Rejected(_) => {
                    self.phase = Phase::Reseal;
                    self.step()
                }
                other => self.failed(now, format!("the source did not release: {other:?}")),
            },
            (Phase::Reseal, Response::Applied { .. }) => {
                self.phase = Phase::Release;
                self.step()
            }
            (Phase::AbortImport, Response::Applied { outcome, .. }) => match outcome {
                // The acquisition applied first: the move goes on.
                Outcome::Bucket { record, .. } if record.acquired_by == Some(self.record.id) => {
                    self.abort_reason = None;
                    self.abort_deadline = None;
                    self.phase = Phase::Commit;
                    self.step()
                }
                _ => {
                    self.phase = Phase::Unseal;
                    self.step()
                }
            },
            (Phase::Unseal, Response::Applied { .. }) => {
                self.phase = Phase::EndAborted;
                self.step()
            }
            (_, other) => self.failed(now, format!("unexpected answer {other:?}")),
        }
    }

    /// The answer to the current metadata command.
    pub fn on_meta(&mut self, now: MonoMs, answer: Result<BucketMove, MetaError>) -> MoveStep {
        let record = match answer {
            Ok(record) => record,
            Err(MetaError::Refused(reason)) if self.phase == Phase::EndAborted => {
                // Committed meanwhile by another driver, though this one
                // unsealed the source: recovery seals and releases it again.
                self.phase = Phase::Done;
                return MoveStep::Done(Box::new(Err(MoveFailure {
                    reason: format!(
                        "{}; the metadata plane refused to end it aborted: {reason}",
                        self.abort_reason.clone().unwrap_or_default()
                    ),
                    aborted: false,
                })));
            }
            Err(e) => return self.failed(now, e.to_string()),
        };
        match self.phase {
            Phase::RecordSeal => {
                self.record = record;
                self.phase = Phase::Read;
                self.since = self.next_since();
                self.after = None;
                self.pass_start = None;
                self.pass_rows = 0;
                self.step()
            }
            Phase::Commit => {
                if let Some(sealed_at) = self.sealed_at {
                    self.progress.pause_ms = Some(now.since(sealed_at));
                }
                self.record = record;
                self.phase = Phase::Release;
                self.step()
            }
            Phase::End => {
                self.phase = Phase::Done;
                MoveStep::Done(Box::new(Ok(record)))
            }
            Phase::EndAborted => {
                self.phase = Phase::Done;
                let reason = record.reason.clone().unwrap_or_default();
                MoveStep::Done(Box::new(Err(MoveFailure {
                    reason,
                    aborted: true,
                })))
            }
            _ => self.failed(now, format!("unexpected metadata answer {record:?}")),
        }
    }

    /// Time passed (a retry's wait).
    pub fn on_timer(&mut self, now: MonoMs) -> MoveStep {
        match self.retry_at {
            Some(at) if now >= at => {
                self.retry_at = None;
                self.step()
            }
            Some(at) => MoveStep::WakeAt(at),
            None => self.step(),
        }
    }

    /// Where the next pass starts: the first page of the last one.
    fn next_since(&self) -> Option<CommitToken> {
        self.pass_start.or(self.since)
    }

    /// A page is in: the next one, or the end of the pass.
    fn after_page(&mut self, now: MonoMs) -> MoveStep {
        if self.after.is_some() {
            self.phase = Phase::Read;
            return self.step();
        }
        self.progress.passes += 1;
        if self.sealed_at.is_some() {
            self.phase = Phase::Acquire;
            return self.step();
        }
        let last = self.pass_rows <= self.limits.final_pass_rows
            || self.progress.passes >= self.limits.passes_max;
        if now >= self.copy_deadline {
            return self.abort_now(now, "the copy did not finish in time".into());
        }
        self.since = self.next_since();
        self.after = None;
        self.pass_start = None;
        self.pass_rows = 0;
        self.phase = if last { Phase::Seal } else { Phase::Read };
        self.step()
    }

    /// The current step failed: try it again later, or give up on the move.
    fn failed(&mut self, now: MonoMs, reason: String) -> MoveStep {
        tracing::debug!(id = self.record.id, phase = self.phase(), %reason, "a move's step failed");
        let deadline = match self.phase {
            Phase::Tag | Phase::Read | Phase::Import(_) | Phase::Seal
                if self.sealed_at.is_none() =>
            {
                Some(self.copy_deadline)
            }
            Phase::Read | Phase::Import(_) | Phase::Seal | Phase::RecordSeal | Phase::Acquire => {
                self.cutover_deadline
            }
            Phase::AbortImport | Phase::Unseal | Phase::EndAborted => self.abort_deadline,
            // Committed: it goes on until done.
            _ => None,
        };
        if deadline.is_some_and(|d| now >= d) {
            if matches!(
                self.phase,
                Phase::AbortImport | Phase::Unseal | Phase::EndAborted
            ) {
                self.phase = Phase::Done;
                let reason = format!(
                    "{}; the abort could not finish ({reason}): the move stays under way until it is recovered",
                    self.abort_reason.clone().unwrap_or_default()
                );
                return MoveStep::Done(Box::new(Err(MoveFailure {
                    reason,
                    aborted: false,
                })));
            }
            return self.abort_now(now, format!("{} timed out: {reason}", self.phase()));
        }
        let at = now.plus(self.limits.retry_ms);
        self.retry_at = Some(at);
        MoveStep::WakeAt(at)
    }

    fn abort(&mut self, now: MonoMs, reason: String) {
        self.abort_reason = Some(reason);
        self.abort_deadline = Some(now.plus(self.limits.copy_timeout_ms));
        self.retry_at = None;
        self.phase = Phase::AbortImport;
    }

    fn abort_now(&mut self, now: MonoMs, reason: String) -> MoveStep {
        tracing::info!(id = self.record.id, bucket = %self.record.bucket, %reason, "move aborts");
        self.abort(now, reason);
        self.step()
    }
}

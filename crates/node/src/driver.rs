//! One replica's thread: the replication core, the state machine and the WAL,
//! driven by real time and real IO.
//!
//! The loop: take a batch of inputs (up to `batch_inputs_max`), step the core
//! with each, flush, execute the effects in order (WAL writes are buffered),
//! fsync once for the whole batch, report durability back to the core, apply
//! what committed and answer the clients whose entries were applied. A write
//! is answered only after its entry is applied, so an acknowledged write is
//! durable on the leader and on `sync_acks` local followers.

use std::collections::BTreeMap;
use std::sync::mpsc::RecvTimeoutError;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use harbor_replication::{Effect, Entry, Member, ProposeError, Recovered, Replica, SnapshotMeta};
use harbor_reservation::{ApplyContext, Command, StateMachine};
use harbor_types::sim::probe;
use harbor_types::{
    CommitToken, Generation, LogIndex, MonoMs, NodeId, Now, ShardId, Timestamp, WallMs,
};
use harbor_wal::{FileStorage, HardState, Record, Snapshot, Storage, Wal, WalError};
use serde::{Deserialize, Serialize};

use harbor_wire::{
    Body, Control, Envelope, ErrorKind, Freshness, GroupStatus, NodeError, Query, QueryResult,
    Request, Response, Served, Transport,
};

use crate::config::NodeConfig;

pub enum ReplicaInput {
    Envelope(Envelope),
    Control(Control),
}

/// What the WAL stores per entry besides index and generation.
#[derive(Serialize, Deserialize)]
struct WalPayload {
    at: Timestamp,
    payload: Vec<u8>,
}

/// Both clocks, read now: the monotonic one from `Instant` (since the
/// first reading in this process, starting at 1), the wall one from
/// `SystemTime` (a wall clock set before 1970 reads as the epoch).
pub fn read_clocks() -> Now {
    static ORIGIN: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    let origin = *ORIGIN.get_or_init(Instant::now);
    let mono = u64::try_from(origin.elapsed().as_millis()).unwrap_or(u64::MAX - 1) + 1;
    let wall = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    Now::new(MonoMs::from_millis(mono), WallMs::from_millis(wall))
}

/// A client waiting for its entry to apply.
struct Waiter {
    reply_to: NodeId,
    request_id: u64,
}

/// A local read, answered at the end of the batch it arrived in (when what
/// committed in the batch is applied) or, if it waits for an entry, when
/// that entry applies or its wait runs out.
struct LocalRead {
    reply_to: NodeId,
    request_id: u64,
    query: Query,
    need: Freshness,
    /// When its wait runs out, on the monotonic clock.
    until: MonoMs,
}

/// One replica: the replication core, the state machine and the WAL. The
/// node runs it on a thread with [`Driver::run`]; the simulator calls
/// [`Driver::handle`], [`Driver::tick`] and [`Driver::finish_batch`] itself,
/// on a simulated disk.
pub struct Driver<S: Storage = FileStorage> {
    me: NodeId,
    shard: ShardId,
    config: NodeConfig,
    core: Replica,
    machine: StateMachine,
    wal: Wal<S>,
    transport: Arc<dyn Transport>,
    /// Last entry applied to `machine` (barriers included).
    applied: LogIndex,
    /// Index of the snapshot the WAL holds.
    snapshot_index: LogIndex,
    waiters: BTreeMap<LogIndex, Waiter>,
    /// The first entry of the generation we lead; reads wait until it is
    /// applied. Tagged with its generation, so news about an older one
    /// (a step-down from it) never touches it.
    barrier: Option<(Generation, LogIndex)>,
    /// An `ExpireHolds` proposal not yet applied.
    expiry_pending: Option<LogIndex>,
    local_reads: Vec<LocalRead>,
    /// Set after an IO failure: the replica stops taking part.
    failed: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum DriverStartError {
    #[error("WAL of {shard}: {source}")]
    Wal { shard: ShardId, source: WalError },
    #[error("{shard}: {what}")]
    Recovery { shard: ShardId, what: String },
}

impl Driver<FileStorage> {
    /// Opens (or creates) the replica's WAL in `data_dir/shard-{id}` and
    /// rebuilds its state.
    pub fn open(
        me: NodeId,
        shard: ShardId,
        members: Vec<Member>,
        config: NodeConfig,
        transport: Arc<dyn Transport>,
    ) -> Result<Driver, DriverStartError> {
        let dir = config.data_dir.join(format!("shard-{}", shard.0));
        let storage = FileStorage::new(&dir).map_err(|source| DriverStartError::Wal {
            shard,
            source: WalError::Io {
                op: "create_dir",
                file: dir.display().to_string(),
                source,
            },
        })?;
        Driver::open_on(
            me,
            shard,
            members,
            config,
            storage,
            transport,
            read_clocks(),
        )
    }
}

impl<S: Storage> Driver<S> {
    /// Opens the replica on `storage` and rebuilds its state from it.
    pub fn open_on(
        me: NodeId,
        shard: ShardId,
        members: Vec<Member>,
        config: NodeConfig,
        storage: S,
        transport: Arc<dyn Transport>,
        now: Now,
    ) -> Result<Driver<S>, DriverStartError> {
        let wal_err = |source| DriverStartError::Wal { shard, source };
        let started = Instant::now();
        let (mut wal, recovered) = Wal::open(storage, config.wal.clone()).map_err(wal_err)?;
        // A replica that finds nothing on its disk in a group that has run
        // before lost its state: it says so durably before it holds anything,
        // so a crash while it catches up cannot make it look whole.
        let empty = recovered.snapshot.is_none()
            && recovered.records.is_empty()
            && recovered.hard_state.generation == Generation::ZERO;
        let mut hard_state = recovered.hard_state;
        if empty && !hard_state.recovering && !config.groups_are_new {
            probe("node.replica_started_without_its_state");
            tracing::warn!(
                %shard, node = %me,
                "no durable state: this replica lost its data (or is new to a group that has run); \
                 it will not lead and counts for nothing until it has caught up"
            );
            hard_state.recovering = true;
            wal.set_hard_state(&hard_state).map_err(wal_err)?;
        }
        if recovered.torn_tail_bytes_cut > 0 {
            probe("wal.torn_tail_cut_at_recovery");
            tracing::warn!(%shard, node = %me, bytes = recovered.torn_tail_bytes_cut, "cut a torn WAL tail");
        }
        let (machine, snapshot) = match &recovered.snapshot {
            Some(s) => {
                let machine =
                    StateMachine::restore(&s.data).map_err(|e| DriverStartError::Recovery {
                        shard,
                        what: format!("snapshot at {} does not decode: {e}", s.last_index),
                    })?;
                let meta = SnapshotMeta {
                    last_index: s.last_index,
                    last_generation: s.last_generation,
                };
                (machine, meta)
            }
            None => (StateMachine::new(), SnapshotMeta::default()),
        };
        let mut entries = Vec::with_capacity(recovered.records.len());
        for record in &recovered.records {
            let decoded: WalPayload =
                postcard::from_bytes(&record.payload).map_err(|e| DriverStartError::Recovery {
                    shard,
                    what: format!("WAL entry {} does not decode: {e}", record.index),
                })?;
            entries.push(Entry {
                index: record.index,
                generation: record.generation,
                at: decoded.at,
                payload: decoded.payload,
            });
        }
        tracing::info!(
            %shard, node = %me,
            snapshot_index = %snapshot.last_index,
            entries = entries.len(),
            last_index = %entries.last().map_or(snapshot.last_index, |e| e.index),
            generation = %hard_state.generation,
            recovering = hard_state.recovering,
            zero_tail_bytes = recovered.zero_tail_bytes_cut,
            torn_tail_bytes = recovered.torn_tail_bytes_cut,
            ms = started.elapsed().as_millis() as u64,
            "recovered the replica"
        );
        let core_config = config.core_config(shard, me.clone());
        let mut machine = machine;
        machine.set_bugs(config.bugs);
        core_config
            .validate(&members)
            .map_err(|e| DriverStartError::Recovery {
                shard,
                what: e.to_string(),
            })?;
        let core = Replica::new(
            core_config,
            members,
            Recovered {
                generation: hard_state.generation,
                snapshot,
                entries,
                recovering: hard_state.recovering,
                life_salt: u64::from(std::process::id()).rotate_left(17),
            },
            now,
        );
        Ok(Driver {
            me,
            shard,
            config,
            core,
            machine,
            wal,
            transport,
            applied: snapshot.last_index,
            snapshot_index: snapshot.last_index,
            waiters: BTreeMap::new(),
            barrier: None,
            expiry_pending: None,
            local_reads: Vec::new(),
            failed: None,
        })
    }

    /// The replica's loop; returns on `Control::Shutdown` or when every
    /// sender is gone.
    pub fn run(mut self, inbox: crate::queue::Receiver<ReplicaInput>) {
        let tick = Duration::from_millis(self.config.tick_interval_ms);
        // Followers have no timers of their own: they wake for messages, and
        // rarely otherwise, which keeps an idle process idle.
        let follower_wait = Duration::from_millis(harbor_types::limits::FOLLOWER_WAIT_MS);
        let mut last_tick = MonoMs::ZERO;
        loop {
            let wait = if self.core.is_leader() || !self.local_reads.is_empty() {
                tick
            } else {
                follower_wait
            };
            let first = match inbox.recv_timeout(wait) {
                Ok(input) => Some(input),
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) => return,
            };
            let now = read_clocks();
            let mut batch = 0;
            let mut next = first;
            while let Some(input) = next {
                if let ReplicaInput::Control(Control::Shutdown) = input {
                    self.finish_batch(now);
                    return;
                }
                self.handle(now, input);
                batch += 1;
                next = if batch < self.config.batch_inputs_max {
                    inbox.try_recv()
                } else {
                    None
                };
            }
            if now.mono.since(last_tick) >= self.config.tick_interval_ms {
                last_tick = now.mono;
                self.tick(now);
            }
            self.finish_batch(now);
        }
    }

    /// Timers: heartbeats, retransmissions, hold expiry.
    pub fn tick(&mut self, now: Now) {
        if self.failed.is_none() {
            self.core.tick(now);
            self.propose_expiry(now);
        }
    }

    pub fn core(&self) -> &Replica {
        &self.core
    }

    pub fn machine(&self) -> &StateMachine {
        &self.machine
    }

    /// The last entry applied to the state machine.
    pub fn applied_index(&self) -> LogIndex {
        self.applied
    }

    /// Why the replica stopped, if it did.
    pub fn failure(&self) -> Option<&str> {
        self.failed.as_deref()
    }

    /// Steps the core with one input. Call [`Driver::finish_batch`] after a
    /// batch of them.
    pub fn handle(&mut self, now: Now, input: ReplicaInput) {
        match input {
            ReplicaInput::Control(control) => self.control(now, control),
            ReplicaInput::Envelope(envelope) => match envelope.body {
                Body::Replication(message) => {
                    if self.failed.is_none() {
                        self.core.receive(now, &envelope.from, message);
                    }
                }
                Body::Request { id, request, route } => {
                    self.request(now, envelope.from, id, request, route)
                }
                Body::Response { .. } => {
                    tracing::warn!(shard = %self.shard, "replica got a response; dropped");
                }
                // The node's dispatcher turns these into `ReplicaInput::Control`.
                Body::Control { control, .. } => {
                    if !matches!(control, Control::Shutdown) {
                        self.control(now, control);
                    }
                }
            },
        }
    }

    fn control(&mut self, now: Now, control: Control) {
        if self.failed.is_some() {
            return;
        }
        match control {
            Control::LeadNewGroup(generation) => {
                if self.core.is_recovering() && self.core.last_index() == LogIndex::ZERO {
                    tracing::warn!(
                        shard = %self.shard, node = %self.me, %generation,
                        "every replica of the group is empty: starting it as a new group"
                    );
                    self.core.forget_lost_state();
                }
                self.control(now, Control::Lead(generation));
            }
            Control::Lead(generation) if self.core.is_recovering() => {
                // A replica without its state must never lead: it would
                // order new entries over ones it lost. It takes the
                // generation without a leader, reports itself recovering,
                // and the control plane names another.
                probe("node.recovering_replica_refused_to_lead");
                tracing::warn!(
                    shard = %self.shard, node = %self.me, %generation,
                    "named leader while recovering lost state; refused"
                );
                self.core.seal(generation);
            }
            Control::Lead(generation) => {
                self.core.become_leader(now, generation);
                self.barrier = Some((generation, self.core.last_index()));
                tracing::debug!(shard = %self.shard, node = %self.me, %generation, "leading");
            }
            Control::Follow(generation, leader) => {
                self.barrier = None;
                self.core.become_follower(generation, leader);
            }
            Control::Drain { for_ms } => self.core.drain(now, for_ms),
            Control::Seal(generation) => {
                probe("replication.sealed_for_failover");
                self.barrier = None;
                self.core.seal(generation);
            }
            Control::Shutdown => unreachable!("handled by the loop"),
        }
    }

    /// Runs effects until the core is quiet: one fsync per round of writes.
    pub fn finish_batch(&mut self, now: Now) {
        if self.failed.is_some() {
            return;
        }
        self.core.flush(now);
        for _round in 0..8 {
            let effects = self.core.drain_effects();
            if effects.is_empty() {
                break;
            }
            let mut wrote = false;
            for effect in effects {
                match self.execute(now, effect) {
                    Ok(w) => wrote |= w,
                    Err(e) => return self.fail(e),
                }
            }
            if wrote {
                if let Err(e) = self.wal.sync() {
                    return self.fail(e);
                }
                let last = self.core.last_index();
                if let Some(generation) = self.core.generation_at(last) {
                    self.core.persisted(now, last, generation);
                }
            }
            self.apply_committed();
            self.core.flush(now);
        }
        self.maybe_snapshot();
        self.answer_local_reads(now);
    }

    /// Returns whether the WAL needs an fsync.
    fn execute(&mut self, now: Now, effect: Effect) -> Result<bool, WalError> {
        match effect {
            Effect::PersistGeneration(generation) => {
                // The durable flag as it stands: only `CaughtUp`, ordered
                // after what it vouches for, may clear it.
                self.wal.set_hard_state(&HardState {
                    generation,
                    recovering: self.wal.hard_state().recovering,
                })?;
                Ok(false)
            }
            Effect::Persist {
                truncate_from,
                entries,
            } => {
                if let Some(from) = truncate_from {
                    tracing::info!(shard = %self.shard, node = %self.me, %from, "truncating a suffix from an older generation");
                    self.wal.truncate_from(from)?;
                }
                let records: Vec<Record> = entries
                    .into_iter()
                    .map(|e| Record {
                        index: e.index,
                        generation: e.generation,
                        payload: postcard::to_allocvec(&WalPayload {
                            at: e.at,
                            payload: e.payload,
                        })
                        .expect("entries serialize"),
                    })
                    .collect();
                self.wal.append(&records)?;
                Ok(true)
            }
            Effect::PersistSnapshot { meta, data } => {
                let machine = match StateMachine::restore(&data) {
                    Ok(m) => m,
                    Err(e) => {
                        self.failed =
                            Some(format!("snapshot from the leader does not decode: {e}"));
                        return Ok(false);
                    }
                };
                self.wal.install_snapshot(&Snapshot {
                    last_index: meta.last_index,
                    last_generation: meta.last_generation,
                    data,
                })?;
                // The core replaced its whole log with the snapshot; records
                // the WAL kept past it may belong to an older generation and
                // must go too, or the WAL and the core disagree.
                if self.wal.last_index() > meta.last_index {
                    self.wal.truncate_from(meta.last_index.next())?;
                }
                self.machine = machine;
                self.machine.set_bugs(self.config.bugs);
                self.applied = meta.last_index;
                self.snapshot_index = meta.last_index;
                Ok(false)
            }
            Effect::Send { to, message } => {
                self.transport.send(Envelope {
                    from: self.me.clone(),
                    to,
                    body: Body::Replication(message),
                });
                Ok(false)
            }
            Effect::Commit { .. } => Ok(false),
            Effect::SnapshotNeeded { to } => {
                let meta = SnapshotMeta {
                    last_index: self.applied,
                    last_generation: self
                        .core
                        .generation_at(self.applied)
                        .expect("applied entry is in memory or the compaction point"),
                };
                let data = self.machine.snapshot();
                self.core.send_snapshot(now, &to, meta, data);
                Ok(false)
            }
            Effect::CaughtUp => {
                tracing::info!(
                    shard = %self.shard, node = %self.me, commit = %self.core.commit_index(),
                    "caught up after losing its state: no longer recovering"
                );
                // The generation already durable: a `PersistGeneration` of a
                // newer one may follow in this batch.
                self.wal.set_hard_state(&HardState {
                    generation: self.wal.hard_state().generation,
                    recovering: false,
                })?;
                Ok(false)
            }
            Effect::SteppedDown { generation } => {
                tracing::info!(shard = %self.shard, node = %self.me, %generation, "stepped down");
                self.expiry_pending = None;
                let waiters = std::mem::take(&mut self.waiters);
                for (_, waiter) in waiters {
                    self.reply_error(
                        &waiter.reply_to,
                        waiter.request_id,
                        NodeError::in_doubt(
                            ErrorKind::LeadershipChanged {
                                retry_after_ms: None,
                            },
                            format!("leadership of {} changed to generation {generation}; the write may or may not commit", self.shard),
                        ),
                    );
                }
                Ok(false)
            }
        }
    }

    fn fail(&mut self, e: WalError) {
        probe("node.wal_failure_stops_replica");
        tracing::error!(shard = %self.shard, node = %self.me, error = %e, "WAL failure: replica stopped");
        self.failed = Some(e.to_string());
        let waiters = std::mem::take(&mut self.waiters);
        for (_, waiter) in waiters {
            self.reply_error(
                &waiter.reply_to,
                waiter.request_id,
                NodeError::in_doubt(
                    ErrorKind::ReplicaFailed,
                    format!("the leader of {} stopped after a storage failure; the write may or may not commit", self.shard),
                ),
            );
        }
    }

    fn apply_committed(&mut self) {
        let commit = self.core.commit_index();
        while self.applied < commit {
            let index = self.applied.next();
            let entry = self
                .core
                .entry(index)
                .unwrap_or_else(|| panic!("{}: committed entry {index} not in memory", self.shard));
            let command = if entry.is_barrier() {
                Command::Noop
            } else {
                match postcard::from_bytes::<Command>(&entry.payload) {
                    Ok(command) => command,
                    Err(e) => panic!(
                        "{}: committed entry {index} does not decode ({e}); a build that cannot read its own log must not run",
                        self.shard
                    ),
                }
            };
            let position = CommitToken {
                shard: self.shard,
                generation: entry.generation,
                index,
            };
            let ctx = ApplyContext {
                position,
                at: entry.at,
            };
            let applied = self.machine.apply(&ctx, &command);
            self.applied = index;
            if self.expiry_pending == Some(index) {
                self.expiry_pending = None;
            }
            if let Some(waiter) = self.waiters.remove(&index) {
                let issuer = command_issuer(&command).and_then(|id| self.machine.issuer(id));
                let response = Response::Applied {
                    outcome: applied.outcome,
                    issuer,
                    commit_token: position,
                    served: self.served(),
                };
                self.reply(&waiter.reply_to, waiter.request_id, response);
            }
        }
    }

    fn maybe_snapshot(&mut self) {
        if self.failed.is_some()
            || self.snapshot_index.distance_to(self.applied) < self.config.snapshot_interval_entries
        {
            return;
        }
        let Some(generation) = self.core.generation_at(self.applied) else {
            return;
        };
        let snapshot = Snapshot {
            last_index: self.applied,
            last_generation: generation,
            data: self.machine.snapshot(),
        };
        if let Err(e) = self.wal.install_snapshot(&snapshot) {
            return self.fail(e);
        }
        self.snapshot_index = self.applied;
        self.core.compact(self.applied);
    }

    fn propose_expiry(&mut self, now: Now) {
        if !self.is_ready() || self.expiry_pending.is_some() {
            return;
        }
        let Some(due) = self.machine.next_hold_expiry_ms() else {
            return;
        };
        // Hold expiry is business time: the HLC's, on the wall clock.
        if due > now.wall.as_millis() {
            return;
        }
        let payload = postcard::to_allocvec(&Command::ExpireHolds).unwrap();
        if let Ok(index) = self.core.propose(now, payload) {
            self.expiry_pending = Some(index);
        }
    }

    /// A leader whose first entry of its generation is applied: its state
    /// includes every write committed before it took over.
    pub fn is_ready(&self) -> bool {
        self.core.is_leader()
            && self
                .barrier
                .is_some_and(|(g, b)| g == self.core.generation() && self.applied >= b)
    }

    fn served(&self) -> Served {
        Served {
            node: self.me.clone(),
            shard: self.shard,
            generation: self.core.generation(),
            applied: self.machine.applied(),
            role: self.core.role(),
            staleness_ms: Some(0),
        }
    }

    /// How old this replica's applied state may be at `now`: 0 for a ready
    /// leader under a lease, the age of the closed timestamp (on the
    /// leader's clock) for a follower that has applied everything it
    /// committed, else unknown.
    pub fn staleness_ms(&self, now: Now) -> Option<u64> {
        if self.applied < self.core.commit_index() {
            return None;
        }
        if self.core.is_leader() && !self.is_ready() {
            return None;
        }
        self.core.staleness_ms(now)
    }

    /// Answers the local reads that can be answered: the ones whose entry
    /// applied, and the ones whose wait ran out (refused, so the caller
    /// asks the leader).
    fn answer_local_reads(&mut self, now: Now) {
        if self.local_reads.is_empty() {
            return;
        }
        let reads = std::mem::take(&mut self.local_reads);
        for read in reads {
            let missing = read.need.applied_at_least.filter(|&index| {
                self.applied < index && !self.config.bugs.follower_ignores_session
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

    fn request(
        &mut self,
        now: Now,
        from: NodeId,
        id: u64,
        request: Request,
        route: Option<Generation>,
    ) {
        if let Some(why) = &self.failed {
            let e = NodeError::new(
                ErrorKind::ReplicaFailed,
                format!("replica of {} on {} stopped: {why}", self.shard, self.me),
            );
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
            let status = GroupStatus {
                shard: self.shard,
                node: self.me.clone(),
                replica: self.core.status(now),
                ready: self.is_ready(),
                applied: self.machine.applied(),
                staleness_ms: self.staleness_ms(now),
                issuers: self.machine.issuers().count() as u64,
            };
            let response = Response::Read {
                result: QueryResult::Status(status),
                served: self.served(),
            };
            return self.reply(&from, id, response);
        }
        if let Request::LocalRead { query, need, .. } = request {
            if self.local_reads.len() >= self.config.local_reads_waiting_max {
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
        let generation = self.core.generation();
        if route.is_some_and(|r| r < generation) {
            probe("node.stale_route_refused");
            let e = NodeError::new(
                ErrorKind::StaleRoute {
                    hint: self.core.leader().cloned(),
                },
                format!(
                    "{} is at {generation} of {}, newer than the sender's map ({}); refresh the map",
                    self.me,
                    self.shard,
                    route.unwrap()
                ),
            );
            return self.reply_error(&from, id, e);
        }
        // A replica behind the sender's map has not heard the news yet: it is
        // not the leader of that generation, even if it leads an older one.
        if !self.core.is_leader() || route.is_some_and(|r| r > generation) {
            // Our idea of the leader is older than the sender's: no hint.
            let hint = if route.is_none_or(|r| r <= generation) {
                self.core.leader().cloned()
            } else {
                None
            };
            let e = NodeError::new(
                ErrorKind::NotLeader { hint },
                format!("{} is not the leader of {}", self.me, self.shard),
            );
            return self.reply_error(&from, id, e);
        }
        match request {
            Request::Write { command, .. } => {
                let payload = postcard::to_allocvec(&command).expect("commands serialize");
                match self.core.propose(now, payload) {
                    Ok(index) => {
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
            Request::LocalRead { .. } => unreachable!("answered before the leader check"),
            Request::Read { query, .. } => {
                if !self.core.has_lease(now) && !self.config.bugs.strong_read_without_lease {
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
                let result = self.query(query);
                let response = Response::Read {
                    result,
                    served: self.served(),
                };
                self.reply(&from, id, response);
            }
        }
    }

    fn query(&self, query: Query) -> QueryResult {
        match query {
            Query::Issuer(issuer) => QueryResult::Issuer(self.machine.issuer(&issuer)),
            Query::Reservation(id) => QueryResult::Reservation(self.machine.reservation(&id)),
            Query::OpenReservations(issuer) => {
                QueryResult::OpenReservations(self.machine.open_reservations(&issuer))
            }
            Query::Token(issuer, token) => QueryResult::Token(self.machine.token(&issuer, &token)),
            Query::TokenAnyIssuer(token) => QueryResult::Tokens(
                self.machine
                    .issuers()
                    .filter_map(|issuer| self.machine.token(issuer, &token))
                    .collect(),
            ),
            Query::Status => unreachable!("answered before the leader check"),
        }
    }

    fn reply(&self, to: &NodeId, id: u64, response: Response) {
        self.transport.send(Envelope {
            from: self.me.clone(),
            to: to.clone(),
            body: Body::Response {
                id,
                response: Box::new(response),
            },
        });
    }

    fn reply_error(&self, to: &NodeId, id: u64, e: NodeError) {
        self.reply(to, id, Response::Error(e));
    }
}

/// The issuer a command is about, if any.
fn command_issuer(command: &Command) -> Option<&harbor_types::IssuerId> {
    match command {
        Command::UpsertIssuer { issuer_id, .. }
        | Command::Reserve { issuer_id, .. }
        | Command::ResolveToken { issuer_id, .. } => Some(issuer_id),
        Command::Confirm { reservation_id } | Command::Release { reservation_id } => {
            Some(reservation_id.issuer())
        }
        Command::ExpireHolds | Command::Noop | Command::Batch(_) => None,
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

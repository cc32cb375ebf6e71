//! The group core: inputs, the `Ready` it hands back, and what happens
//! between (effects of the replication core, apply, snapshots). Client
//! requests are in `requests.rs`.

use std::collections::BTreeMap;

use crate::changes::{Budget, ChangeLog};
use harbor_replication::{
    Config as CoreConfig, ConfigError as CoreConfigError, Effect, Entry, Member, Message,
    Recovered, Replica, SnapshotMeta,
};
use harbor_reservation::{ApplyContext, Command, Outcome, Rejection, StateMachine};
use harbor_types::sim::{probe, Bugs};
use harbor_types::{
    BucketId, CommitToken, Generation, LogIndex, MonoMs, NodeId, Now, ShardId, Timestamp,
};
use harbor_wal::{HardState, Record, Snapshot};
use harbor_wire::{
    Body, Control, Envelope, ErrorKind, Freshness, NodeError, Query, Request, Response, Route,
    Served,
};
use serde::{Deserialize, Serialize};

/// What the core needs besides the replication core's config.
#[derive(Clone, Copy, Debug)]
pub struct Settings {
    /// Applied entries between state-machine snapshots.
    pub snapshot_interval_entries: u64,
    /// Local reads held at once while they wait to apply what they need.
    pub local_reads_waiting_max: usize,
    /// Changes kept for change feeds (in memory, and with each snapshot),
    /// by estimated size.
    pub changes_retained_bytes: usize,
    /// Changes whose entry is older than this, against the newest entry
    /// applied, go, whatever their size.
    pub changes_retained_ms: u64,
    /// An idle leader proposes a no-op after this long, so its group's
    /// resolved time (what change feeds promise) keeps advancing.
    pub resolved_tick_ms: u64,
    /// Simulator-only protocol bugs; always off in a running node.
    pub bugs: Bugs,
}

impl Settings {
    pub(crate) fn changes_budget(&self) -> Budget {
        Budget {
            bytes: self.changes_retained_bytes,
            age_ms: self.changes_retained_ms,
        }
    }
}

/// One input, stepped with the time it was read.
pub enum Input {
    /// A client's request, routed by a gateway whose map names `route`.
    Request {
        from: NodeId,
        id: u64,
        request: Request,
        route: Option<Route>,
    },
    /// A replication message from another replica of the group.
    Peer { from: NodeId, message: Message },
    /// An order of the control plane.
    Control(Control),
    /// Timers: heartbeats, retransmissions, hold expiry.
    Tick,
    /// The writes of the `Ready` that handed out this token are durable.
    Synced(Unsynced),
    /// A storage write or fsync failed: the replica stops taking part.
    StorageFailed(String),
}

/// A storage write, executed in the order given.
#[derive(Debug)]
pub enum Write {
    /// Replace the hard state; durable when the write returns.
    HardState(HardState),
    /// Append records (after cutting the log from `truncate_from`);
    /// durable after the fsync the `Ready` asks for.
    Append {
        truncate_from: Option<LogIndex>,
        records: Vec<Record>,
    },
    /// Install a snapshot; durable when the write returns. `replaces_log`:
    /// it came from the leader and replaces the whole log, so records past
    /// it go too (they may be of an older generation).
    Snapshot {
        snapshot: Snapshot,
        replaces_log: bool,
    },
}

/// Proof that a `Ready` appended entries that still have to be synced.
/// Only the core makes one; the runtime hands it back, after the fsync, as
/// [`Input::Synced`].
#[derive(Debug)]
#[must_use = "sync the writes, then step Input::Synced with this token"]
pub struct Unsynced {
    index: LogIndex,
    generation: Generation,
}

/// What the runtime executes after a batch of inputs.
#[derive(Debug, Default)]
#[must_use]
pub struct Ready {
    /// In order; a failure stops the replica (step `Input::StorageFailed`).
    pub writes: Vec<Write>,
    /// Set when `writes` appended entries: fsync, then step
    /// `Input::Synced(token)`.
    pub sync: Option<Unsynced>,
    /// Peer messages and client replies: send them once `writes`
    /// succeeded (none if one failed), before the sync; none vouches for
    /// the records the sync makes durable.
    pub messages: Vec<Envelope>,
}

impl Ready {
    pub fn is_empty(&self) -> bool {
        self.writes.is_empty() && self.sync.is_none() && self.messages.is_empty()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RecoverError {
    #[error("snapshot at {index} does not decode: {reason}")]
    Snapshot { index: LogIndex, reason: String },
    #[error("WAL entry {index} does not decode: {reason}")]
    Entry { index: LogIndex, reason: String },
    #[error(transparent)]
    Config(#[from] CoreConfigError),
}

/// What the WAL stores per entry besides index and generation.
#[derive(Serialize, Deserialize)]
struct WalPayload {
    at: Timestamp,
    payload: Vec<u8>,
}

/// A client waiting for its entry to apply.
pub(crate) struct Waiter {
    pub(crate) reply_to: NodeId,
    pub(crate) request_id: u64,
}

/// A local read, answered once what committed up to now is applied or, if
/// it waits for an entry, when that entry applies or its wait runs out.
pub(crate) struct LocalRead {
    pub(crate) reply_to: NodeId,
    pub(crate) request_id: u64,
    pub(crate) query: Query,
    pub(crate) need: Freshness,
    /// When its wait runs out, on the monotonic clock.
    pub(crate) until: MonoMs,
}

/// One replica of one group: see the crate documentation.
pub struct GroupCore {
    pub(crate) me: NodeId,
    pub(crate) shard: ShardId,
    pub(crate) settings: Settings,
    pub(crate) core: Replica,
    pub(crate) machine: StateMachine,
    /// The time of the last step.
    pub(crate) now: Now,
    /// Last entry applied to `machine` (barriers included).
    pub(crate) applied: LogIndex,
    /// Index of the snapshot the WAL holds (or will, once `writes` run).
    snapshot_index: LogIndex,
    /// What applied entries yielded, for change feeds.
    pub(crate) changes: ChangeLog,
    /// The epoch of the members it holds: those it was opened with (see
    /// [`GroupCore::opened_at_members_epoch`]), then the last
    /// `Control::Members` it took.
    members_epoch: u64,
    /// A membership newer than ours left this replica out: the group no
    /// longer counts it, and its runtime closes it and deletes its data.
    removed: bool,
    /// What each bucket cost this replica while it led (hot buckets).
    pub(crate) load: crate::load::BucketLoad,
    /// The hard state as the writes handed out leave it.
    hard_state: HardState,
    pub(crate) waiters: BTreeMap<LogIndex, Waiter>,
    /// The first entry of the generation we lead; reads wait until it is
    /// applied. Tagged with its generation, so news about an older one
    /// (a step-down from it) never touches it.
    pub(crate) barrier: Option<(Generation, LogIndex)>,
    /// An `ExpireHolds` proposal not yet applied.
    expiry_pending: Option<LogIndex>,
    /// The leader's last index when it last looked, and since when it has
    /// not moved: an idle leader proposes a no-op now and then, so the
    /// group's resolved time keeps advancing.
    idle: (LogIndex, MonoMs),
    pub(crate) local_reads: Vec<LocalRead>,
    /// Set after a storage failure: the replica stops taking part.
    pub(crate) failed: Option<String>,
    writes: Vec<Write>,
    pub(crate) outbox: Vec<Envelope>,
}

impl GroupCore {
    /// Rebuilds a replica from what its WAL held. `groups_are_new`: a
    /// replica with nothing on disk starts a new group, rather than one
    /// that lost its state. `fence`: the oldest generation the metadata
    /// plane may still name to this group's replicas (`GroupInfo::fence`,
    /// read when the node starts), where a replica that lost its state
    /// starts, and whether that generation has a published leader (then it
    /// will not lead it). `life_salt` differs between two lives of the replica (see
    /// `Recovered::life_salt`).
    #[allow(clippy::too_many_arguments)]
    pub fn recover(
        me: NodeId,
        members: Vec<Member>,
        core_config: CoreConfig,
        settings: Settings,
        found: harbor_wal::Recovered,
        groups_are_new: bool,
        (fence, fence_is_led): (Generation, bool),
        life_salt: u64,
        now: Now,
    ) -> Result<GroupCore, RecoverError> {
        core_config.validate(&members)?;
        let shard = core_config.shard;
        let mut writes = Vec::new();
        // A replica that finds nothing on its disk in a group that has run
        // before lost its state: it says so durably before it holds
        // anything (the first write of the first `Ready`), so a crash while
        // it catches up cannot make it look whole.
        let empty = found.snapshot.is_none()
            && found.records.is_empty()
            && found.hard_state.generation == Generation::ZERO;
        let mut hard_state = found.hard_state;
        if empty && !hard_state.recovering && !groups_are_new {
            probe("node.replica_started_without_its_state");
            tracing::warn!(
                %shard, node = %me,
                "no durable state: this replica lost its data (or is new to a group that has run); \
                 it will not lead and counts for nothing until it has caught up"
            );
            hard_state.recovering = true;
            // It cannot tell a late order from a current one by what it
            // holds: it starts at the group's fence, which every order
            // still current names at least.
            if fence > Generation::ZERO {
                probe("node.lost_replica_starts_at_the_fence");
                hard_state.generation = fence;
                // If it led that generation, followers hold entries of it
                // that it lost: a late order to lead it must fail.
                hard_state.led = fence_is_led;
            }
            writes.push(Write::HardState(hard_state));
        }
        let (mut machine, snapshot) = match &found.snapshot {
            Some(s) => {
                let machine =
                    StateMachine::restore(&s.data).map_err(|e| RecoverError::Snapshot {
                        index: s.last_index,
                        reason: e.to_string(),
                    })?;
                let meta = SnapshotMeta {
                    last_index: s.last_index,
                    last_generation: s.last_generation,
                };
                (machine, meta)
            }
            None => (StateMachine::new(), SnapshotMeta::default()),
        };
        machine.set_bugs(settings.bugs);
        let mut entries = Vec::with_capacity(found.records.len());
        for record in found.records {
            let decoded: WalPayload =
                postcard::from_bytes(&record.payload).map_err(|e| RecoverError::Entry {
                    index: record.index,
                    reason: e.to_string(),
                })?;
            entries.push(Entry {
                index: record.index,
                generation: record.generation,
                at: decoded.at,
                payload: decoded.payload,
            });
        }
        let mut core = Replica::new(
            core_config,
            members,
            Recovered {
                generation: hard_state.generation,
                led: hard_state.led,
                snapshot,
                entries,
                recovering: hard_state.recovering,
                life_salt,
            },
            now,
        );
        if let Some(at) = machine.applied_at() {
            core.observe_time(at);
        }
        Ok(GroupCore {
            me,
            shard,
            settings,
            core,
            machine,
            now,
            applied: snapshot.last_index,
            snapshot_index: snapshot.last_index,
            load: crate::load::BucketLoad::default(),
            members_epoch: 0,
            removed: false,
            changes: ChangeLog::restore(
                snapshot.last_index,
                found.snapshot.as_ref().map_or(&[][..], |s| &s.history),
                settings.changes_budget(),
            ),
            hard_state,
            waiters: BTreeMap::new(),
            barrier: None,
            expiry_pending: None,
            idle: (LogIndex::ZERO, now.mono),
            local_reads: Vec::new(),
            failed: None,
            writes,
            outbox: Vec::new(),
        })
    }

    pub fn members_epoch(&self) -> u64 {
        self.members_epoch
    }

    /// The metadata plane's epoch of the members this replica was opened
    /// with: an order of that epoch or older is stale.
    pub fn opened_at_members_epoch(&mut self, epoch: u64) {
        self.members_epoch = epoch;
    }

    // ----- Reading the state -------------------------------------------

    pub fn replica(&self) -> &Replica {
        &self.core
    }

    pub fn machine(&self) -> &StateMachine {
        &self.machine
    }

    /// What this replica's buckets cost it while it led, with the `top`
    /// hottest of those it still takes writes for (`Query::BucketLoad`).
    pub fn load_report(&self, top: u32) -> harbor_wire::LoadReport {
        let machine = &self.machine;
        self.load
            .report(self.now.mono, top, |b| machine.takes_writes(b))
    }

    /// The last entry applied to the state machine.
    pub fn applied_index(&self) -> LogIndex {
        self.applied
    }

    /// A newer membership left this replica out: the runtime should close
    /// it and delete its data.
    pub fn removed(&self) -> bool {
        self.removed
    }

    /// Why the replica stopped, if it did.
    pub fn failure(&self) -> Option<&str> {
        self.failed.as_deref()
    }

    /// Whether the runtime should step `Input::Tick` at its tick interval:
    /// a leader has heartbeats and expiries to send, and waiting local
    /// reads run out. Followers wake for messages, and rarely otherwise.
    pub fn wants_ticks(&self) -> bool {
        self.core.is_leader() || !self.local_reads.is_empty()
    }

    /// A leader whose first entry of its generation is applied: its state
    /// includes every write committed before it took over.
    pub fn is_ready(&self) -> bool {
        self.core.is_leader()
            && self
                .barrier
                .is_some_and(|(g, b)| g == self.core.generation() && self.applied >= b)
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

    pub(crate) fn served(&self) -> Served {
        Served {
            node: self.me.clone(),
            shard: self.shard,
            generation: self.core.generation(),
            applied: self.machine.applied(),
            role: self.core.role(),
            staleness_ms: Some(0),
        }
    }

    // ----- Inputs --------------------------------------------------------

    /// Takes one input at `now`. What it leads to comes out of the next
    /// [`GroupCore::ready`].
    pub fn step(&mut self, now: Now, input: Input) {
        self.now = now;
        match input {
            Input::Request {
                from,
                id,
                request,
                route,
            } => self.request(now, from, id, request, route),
            Input::Peer { from, message } => {
                if self.failed.is_none() {
                    self.core.receive(now, &from, message);
                }
            }
            Input::Control(control) => self.control(now, control),
            Input::Tick => {
                if self.failed.is_none() {
                    self.core.tick(now);
                    self.propose_expiry(now);
                    self.propose_tick(now);
                }
            }
            Input::Synced(Unsynced { index, generation }) => {
                if self.failed.is_none() {
                    self.core.persisted(now, index, generation);
                }
            }
            Input::StorageFailed(why) => self.fail(why),
        }
    }

    fn control(&mut self, now: Now, control: Control) {
        if self.failed.is_some() {
            return;
        }
        match control {
            Control::LeadNewGroup(generation) => {
                if self.core.is_recovering()
                    && self.core.last_index() == LogIndex::ZERO
                    && self.core.may_lead(generation)
                {
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
            Control::Lead(generation) if !self.core.may_lead(generation) => {
                self.stale_order(Control::Lead(generation))
            }
            Control::Lead(generation) => {
                self.core.become_leader(now, generation);
                self.barrier = Some((generation, self.core.last_index()));
                tracing::debug!(shard = %self.shard, node = %self.me, %generation, "leading");
            }
            Control::Follow(generation, leader) if !self.core.may_follow(generation, &leader) => {
                self.stale_order(Control::Follow(generation, leader))
            }
            Control::Follow(generation, leader) => {
                self.barrier = None;
                self.core.become_follower(generation, leader);
            }
            Control::Drain { for_ms } => self.core.drain(now, for_ms),
            Control::Seal(generation) => {
                if self.core.seal(generation) {
                    probe("replication.sealed_for_failover");
                    self.barrier = None;
                } else {
                    self.stale_order(Control::Seal(generation));
                }
            }
            Control::Members { epoch, .. } if epoch <= self.members_epoch => {
                self.stale_order(control)
            }
            // The metadata plane never removes the leader it names, so this
            // is a follower, a learner, or a deposed leader cut off from
            // its group: the group no longer sends to it. Reads waiting
            // here go to the leader.
            Control::Members { epoch, members } if !members.iter().any(|m| m.node == self.me) => {
                probe("group.replica_removed_from_its_group");
                tracing::info!(shard = %self.shard, node = %self.me, epoch, "removed from the group");
                self.members_epoch = epoch;
                self.removed = true;
                for read in std::mem::take(&mut self.local_reads) {
                    let e = NodeError::new(
                        ErrorKind::ReplicaBehind,
                        format!("{} left {}: ask its leader", self.me, self.shard),
                    );
                    self.reply_error(&read.reply_to, read.request_id, e);
                }
            }
            Control::Members { epoch, members } => match self.core.set_members(now, members) {
                Ok(()) => {
                    self.members_epoch = epoch;
                    self.removed = false;
                }
                Err(e) => tracing::warn!(
                    shard = %self.shard, node = %self.me, epoch, "refused a membership: {e}"
                ),
            },
            // The runtime's own: it stops the loop; nothing to step.
            Control::Shutdown => {}
        }
    }

    /// An order older than what this replica knows (it arrived late, or a
    /// deposed control loop sent it): it changes nothing. The control plane
    /// sends the current role (or membership) when the replica next reports
    /// a stale one.
    fn stale_order(&mut self, control: Control) {
        probe("node.stale_control_order_ignored");
        tracing::warn!(
            shard = %self.shard, node = %self.me, order = ?control,
            generation = %self.core.generation(), leader = ?self.core.leader(),
            "ignored a control order older than this replica's state"
        );
    }

    /// A ready leader whose log has not moved for `resolved_tick_ms`
    /// orders a no-op: its time, once applied, is the group's new
    /// resolved time (see [`GroupCore::resolved`]).
    fn propose_tick(&mut self, now: Now) {
        let last = self.core.last_index();
        if last != self.idle.0 || !self.is_ready() {
            self.idle = (last, now.mono);
            return;
        }
        if now.mono.since(self.idle.1) < self.settings.resolved_tick_ms {
            return;
        }
        let payload = postcard::to_allocvec(&Command::Noop).unwrap();
        if self.core.propose(now, payload).is_ok() {
            probe("node.idle_leader_ticked");
        }
        self.idle = (self.core.last_index(), now.mono);
    }

    /// The newest time every change of the group at or before it is
    /// applied here: the time of the newest applied entry, once every
    /// entry this replica knows committed is applied. Entries' times rise
    /// along the log: a leader stamps its entries from its HLC, and a new
    /// leader's HLC has seen every entry it holds, which includes every
    /// committed one. So no entry after it, in this generation or a later
    /// one, has an earlier time: a change feed that sent every change up
    /// to here may promise it (its resolved mark). Unlike a closed
    /// timestamp, it rests on no clock and no lease.
    pub fn resolved(&self) -> Option<Timestamp> {
        if self.applied < self.core.commit_index() {
            return None;
        }
        // The state machine keeps it, snapshots included (unknown from a
        // snapshot of format 1 until an entry applies).
        self.machine.applied_at()
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

    fn fail(&mut self, why: String) {
        if self.failed.is_some() {
            return;
        }
        probe("node.wal_failure_stops_replica");
        tracing::error!(shard = %self.shard, node = %self.me, error = %why, "storage failure: replica stopped");
        self.failed = Some(why);
        self.writes.clear();
        let waiters = std::mem::take(&mut self.waiters);
        for (_, waiter) in waiters {
            let e = NodeError::in_doubt(
                ErrorKind::ReplicaFailed,
                format!("the leader of {} stopped after a storage failure; the write may or may not commit", self.shard),
            );
            self.reply(&waiter.reply_to, waiter.request_id, Response::Error(e));
        }
    }

    // ----- Ready ---------------------------------------------------------

    /// Everything the inputs so far led to: the replication core's effects
    /// turned into writes and messages, committed entries applied (and
    /// their clients answered), a snapshot when one is due, local reads
    /// answered. Call after a batch of steps, and again after stepping
    /// `Input::Synced`, until it comes back empty.
    pub fn ready(&mut self) -> Ready {
        if self.failed.is_none() {
            self.core.flush(self.now);
            // `SnapshotNeeded` feeds the core again; everything else is
            // one pass.
            loop {
                let effects = self.core.drain_effects();
                if effects.is_empty() {
                    break;
                }
                for effect in effects {
                    self.effect(effect);
                }
                if self.failed.is_some() {
                    break;
                }
            }
        }
        if self.failed.is_none() {
            self.maybe_snapshot();
            self.answer_local_reads(self.now);
        }
        let writes = std::mem::take(&mut self.writes);
        let appended = writes.iter().any(|w| matches!(w, Write::Append { .. }));
        let sync = appended.then(|| {
            let index = self.core.last_index();
            Unsynced {
                index,
                generation: self
                    .core
                    .generation_at(index)
                    .expect("the last appended entry is in memory"),
            }
        });
        Ready {
            writes,
            sync,
            messages: std::mem::take(&mut self.outbox),
        }
    }

    fn effect(&mut self, effect: Effect) {
        match effect {
            Effect::PersistGeneration { generation, led } => {
                // The durable flag as it stands: only `CaughtUp`, ordered
                // after what it vouches for, may clear it.
                self.hard_state.generation = generation;
                self.hard_state.led = led;
                self.writes.push(Write::HardState(self.hard_state));
            }
            Effect::Persist {
                truncate_from,
                entries,
            } => {
                if let Some(from) = truncate_from {
                    tracing::info!(shard = %self.shard, node = %self.me, %from, "truncating a suffix from an older generation");
                }
                let records = entries
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
                self.writes.push(Write::Append {
                    truncate_from,
                    records,
                });
            }
            Effect::PersistSnapshot { meta, data } => {
                let machine = match StateMachine::restore(&data) {
                    Ok(m) => m,
                    Err(e) => {
                        return self.fail(format!("snapshot from the leader does not decode: {e}"))
                    }
                };
                self.writes.push(Write::Snapshot {
                    snapshot: Snapshot {
                        last_index: meta.last_index,
                        last_generation: meta.last_generation,
                        data,
                        history: Vec::new(),
                    },
                    replaces_log: true,
                });
                self.machine = machine;
                self.machine.set_bugs(self.settings.bugs);
                self.applied = meta.last_index;
                self.snapshot_index = meta.last_index;
                self.changes.restart(meta.last_index);
                if let Some(at) = self.machine.applied_at() {
                    self.core.observe_time(at);
                }
            }
            Effect::Send { to, message } => self.outbox.push(Envelope {
                from: self.me.clone(),
                to,
                body: Body::Replication(message),
            }),
            Effect::Commit { upto } => self.apply(upto),
            Effect::SnapshotNeeded { to } => {
                let meta = SnapshotMeta {
                    last_index: self.applied,
                    last_generation: self
                        .core
                        .generation_at(self.applied)
                        .expect("applied entry is in memory or the compaction point"),
                };
                let data = self.machine.snapshot();
                self.core.send_snapshot(self.now, &to, meta, data);
            }
            Effect::CaughtUp => {
                tracing::info!(
                    shard = %self.shard, node = %self.me, commit = %self.core.commit_index(),
                    "caught up after losing its state: no longer recovering"
                );
                self.hard_state.recovering = false;
                self.writes.push(Write::HardState(self.hard_state));
            }
            Effect::SteppedDown { generation } => {
                tracing::info!(shard = %self.shard, node = %self.me, %generation, "stepped down");
                self.expiry_pending = None;
                let waiters = std::mem::take(&mut self.waiters);
                for (_, waiter) in waiters {
                    let e = NodeError::in_doubt(
                        ErrorKind::LeadershipChanged {
                            retry_after_ms: None,
                        },
                        format!("leadership of {} changed to generation {generation}; the write may or may not commit", self.shard),
                    );
                    self.reply(&waiter.reply_to, waiter.request_id, Response::Error(e));
                }
            }
        }
    }

    /// Applies committed entries up to `upto` and answers the clients that
    /// wait for them.
    fn apply(&mut self, upto: LogIndex) {
        assert!(
            upto <= self.core.commit_index(),
            "{}: told to apply {upto}, past the commit index {}",
            self.shard,
            self.core.commit_index()
        );
        while self.applied < upto {
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
            let mut applied = self.machine.apply(&ctx, &command);
            self.applied = index;
            let events = std::mem::take(&mut applied.events)
                .into_iter()
                .map(|event| {
                    let epoch = event.issuer().map_or(0, |id| self.machine.epoch_of(id));
                    (event, epoch)
                })
                .collect();
            self.changes.push(events, entry.at);
            if self.expiry_pending == Some(index) {
                self.expiry_pending = None;
            }
            if let Some(waiter) = self.waiters.remove(&index) {
                // Durable before acknowledged: committed needs the entry
                // durable here.
                assert!(
                    index <= self.core.durable_index(),
                    "{}: answering entry {index}, durable only up to {}",
                    self.shard,
                    self.core.durable_index()
                );
                let response = match applied.outcome {
                    // Refused whole, nothing changed: the gateway follows
                    // the bucket to its next owner.
                    Outcome::Rejected(Rejection::Moved { bucket }) => {
                        Response::Error(moved(self.shard, bucket))
                    }
                    outcome => Response::Applied {
                        outcome,
                        issuer: command.issuer().and_then(|id| self.machine.issuer(id)),
                        commit_token: position,
                        served: self.served(),
                    },
                };
                self.reply(&waiter.reply_to, waiter.request_id, response);
            }
        }
    }

    fn maybe_snapshot(&mut self) {
        if self.snapshot_index.distance_to(self.applied) < self.settings.snapshot_interval_entries {
            return;
        }
        let Some(generation) = self.core.generation_at(self.applied) else {
            return;
        };
        // The in-memory log is cut now; if the write fails, the replica
        // stops, so nothing reads the log it no longer has.
        self.writes.push(Write::Snapshot {
            snapshot: Snapshot {
                last_index: self.applied,
                last_generation: generation,
                data: self.machine.snapshot(),
                history: self.changes.history(
                    self.applied,
                    self.settings.bugs.changes_history_drops_newest,
                ),
            },
            replaces_log: false,
        });
        self.snapshot_index = self.applied;
        self.core.compact(self.applied);
    }

    pub(crate) fn reply(&mut self, to: &NodeId, id: u64, response: Response) {
        self.outbox.push(Envelope {
            from: self.me.clone(),
            to: to.clone(),
            body: Body::Response {
                id,
                response: Box::new(response),
            },
        });
    }

    pub(crate) fn reply_error(&mut self, to: &NodeId, id: u64, e: NodeError) {
        self.reply(to, id, Response::Error(e));
    }
}

/// The refusal of a request for a bucket sealed in `shard`.
pub(crate) fn moved(shard: ShardId, bucket: BucketId) -> NodeError {
    NodeError::new(
        ErrorKind::Moved { bucket },
        format!("{bucket} is sealed in {shard}: it is moving to another group"),
    )
}

use std::collections::{BTreeMap, VecDeque};

use harbor_types::limits::{APPEND_MARKS_MAX, CLOSED_PENDING_MAX, RETIRED_LIVES_MAX};
use harbor_types::sim::probe;
use harbor_types::{Generation, Hlc, LogIndex, MonoMs, NodeId, Now, Timestamp};
use serde::{Deserialize, Serialize};

use crate::config::{Config, ConfigError, Member};
use crate::message::{
    AckEcho, Append, AppendAck, Entry, InstallSnapshot, Message, SnapshotAck, SnapshotMeta,
};
use std::sync::Arc;

/// What the runtime must do, in the order given.
///
/// Ordering rules (the runtime keeps them, the simulator checks them):
/// - `PersistGeneration` and `PersistSnapshot` are durable when executed
///   (before the next effect runs): a replica must never ack in a generation
///   it could forget, or claim a snapshot it does not hold.
/// - `Persist` is buffered; it becomes durable at the next fsync, after which
///   the runtime calls [`Replica::persisted`] with the last entry written.
///   Nothing is acknowledged to a client or a leader before that.
/// - `Send` may go out before earlier `Persist` effects are durable: a leader
///   streams entries to followers while its own fsync runs.
/// - `Commit` means every entry up to `upto` is committed: apply them in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Effect {
    /// The newest generation, and whether this replica leads it.
    PersistGeneration {
        generation: Generation,
        led: bool,
    },
    Persist {
        truncate_from: Option<LogIndex>,
        entries: Vec<Entry>,
    },
    PersistSnapshot {
        meta: SnapshotMeta,
        data: Vec<u8>,
    },
    Send {
        to: NodeId,
        message: Message,
    },
    Commit {
        upto: LogIndex,
    },
    /// A follower is behind the in-memory log: the runtime builds a snapshot
    /// of the state machine and hands it to [`Replica::send_snapshot`].
    SnapshotNeeded {
        to: NodeId,
    },
    /// This replica was leader and learned of a newer generation: proposals
    /// it had not committed have an unknown outcome now.
    SteppedDown {
        generation: Generation,
    },
    /// A recovering replica holds again everything its group had committed
    /// when it came back (so everything it may ever have acknowledged):
    /// persist that it is no longer recovering. Comes after the `Persist`
    /// of those entries.
    CaughtUp,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Leader,
    Follower,
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ProposeError {
    #[error("not the leader of generation {generation}; leader is {leader:?}")]
    NotLeader {
        generation: Generation,
        leader: Option<NodeId>,
    },
    #[error("remote follower {node} is {lag_ms} ms behind, over the RPO budget of {budget_ms} ms")]
    RpoBudgetExceeded {
        node: NodeId,
        lag_ms: u64,
        budget_ms: u64,
    },
    #[error("{uncommitted} entries are waiting to commit (limit {max})")]
    Overloaded { uncommitted: u64, max: u64 },
    #[error("entry of {bytes} bytes is over the limit of {max}")]
    TooLarge { bytes: usize, max: usize },
    #[error("leadership is being handed over; writes resume within {retry_after_ms} ms")]
    Draining { retry_after_ms: u64 },
}

/// What a replica recovered from its WAL.
#[derive(Clone, Debug, Default)]
pub struct Recovered {
    pub generation: Generation,
    /// This replica led `generation` (it must never lead it again).
    pub led: bool,
    pub snapshot: SnapshotMeta,
    /// Durable entries after the snapshot, contiguous.
    pub entries: Vec<Entry>,
    /// This replica lost its durable state (it started on an empty disk in
    /// a cluster that had run before) and has not caught up since: it may
    /// lack entries it acknowledged in an earlier life.
    pub recovering: bool,
    /// Something that differs between two lives of this replica (the
    /// runtime's process id): mixed with the clocks it starts at into its
    /// incarnation, so a host whose clocks read the same at every start
    /// still gets a new one.
    pub life_salt: u64,
}

/// The leader's view of one follower.
#[derive(Clone, Debug)]
struct Progress {
    local: bool,
    /// See [`Member::voter`]: a learner's acks count for nothing.
    voter: bool,
    /// Durable on the follower and matching the leader's log.
    match_index: LogIndex,
    /// Next entry to send. `next_index - 1 - match_index` entries are in flight.
    next_index: LogIndex,
    last_sent: MonoMs,
    last_ack: Option<MonoMs>,
    /// When `match_index` last advanced (or a retransmit started).
    last_progress: MonoMs,
    snapshot_pending: bool,
    /// The commit index in the last message sent.
    sent_commit: LogIndex,
    /// The newest `sent_at` the follower echoed in a successful ack of this
    /// generation: the lease runs from there, on the leader's lease clock.
    lease_from: Option<MonoMs>,
    /// The newest ack received from the follower, echoed in appends.
    ack_echo: Option<AckEcho>,
    /// The follower's current life, and its earlier ones seen in this
    /// generation (newest last, at most `RETIRED_LIVES_MAX`): acks of a
    /// retired life arriving late are ignored, since that life's log is
    /// gone.
    life: Option<u64>,
    retired_lives: Vec<u64>,
    /// A snapshot being sent in chunks, and how much of it the follower
    /// holds.
    outgoing: Option<OutgoingSnapshot>,
}

impl Progress {
    /// A follower a new leader (or a membership change) starts sending to:
    /// from the leader's next entry, backing off on its rejections.
    fn new(member: &Member, last: LogIndex, now: Now) -> Progress {
        Progress {
            local: member.local,
            voter: member.voter,
            match_index: LogIndex::ZERO,
            next_index: last.next(),
            last_sent: now.mono,
            last_ack: None,
            last_progress: now.mono,
            snapshot_pending: false,
            sent_commit: LogIndex::ZERO,
            lease_from: None,
            ack_echo: None,
            life: None,
            retired_lives: Vec::new(),
            outgoing: None,
        }
    }
}

#[derive(Clone, Debug)]
struct OutgoingSnapshot {
    meta: SnapshotMeta,
    data: Arc<Vec<u8>>,
    /// Bytes the follower acknowledged holding; the next chunk starts here.
    acked_bytes: u64,
    /// The follower life those bytes belong to.
    life: Option<u64>,
}

/// A snapshot a follower is receiving: it is installed only once whole,
/// so nothing is ever served from part of one.
#[derive(Clone, Debug)]
struct IncomingSnapshot {
    meta: SnapshotMeta,
    total_bytes: u64,
    data: Vec<u8>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FollowerStatus {
    pub node: NodeId,
    pub local: bool,
    /// A learner's acks count for nothing (see [`Member::voter`]).
    pub voter: bool,
    pub match_index: LogIndex,
    pub lag_entries: u64,
    pub lag_ms: u64,
    pub last_ack_ms_ago: Option<u64>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ReplicaStatus {
    pub role: Role,
    pub generation: Generation,
    pub leader: Option<NodeId>,
    pub last_index: LogIndex,
    /// Generation of the entry at `last_index`: with it, the control plane
    /// picks the longest log at a failover.
    pub last_generation: Generation,
    pub durable_index: LogIndex,
    pub commit_index: LogIndex,
    pub followers: Vec<FollowerStatus>,
    /// The newest time this replica's state is complete for (see
    /// [`Replica::closed_timestamp`]); `None` while it knows of none.
    pub closed: Option<Timestamp>,
    /// Time since this replica last acknowledged a leader's append, or since
    /// it started. A sealed replica acks no older leader, so an old leader's
    /// lease resting on it ends `lease_ms` after this point at the latest.
    pub acked_ms_ago: u64,
    /// It lost its durable state and has not caught up yet (see
    /// [`Recovered::recovering`]): it must not lead, and its log says
    /// nothing about what was acknowledged.
    #[serde(default)]
    pub recovering: bool,
}

/// An identity for one life of a replica, from the clocks it started at:
/// two lives never start at the same instant of both clocks.
fn incarnation_of(now: Now) -> u64 {
    // splitmix64 of both readings.
    let mut z = now.mono.as_millis() ^ now.wall.as_millis().rotate_left(32);
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// One replica of one group.
pub struct Replica {
    config: Config,
    members: Vec<Member>,
    role: Role,
    /// The newest generation made durable here. Invariant: never decreases.
    generation: Generation,
    /// This replica led `generation` (durable: see [`Recovered::led`]).
    led: bool,
    leader: Option<NodeId>,
    hlc: Hlc,

    /// Entries up to `compacted.last_index` are dropped from memory; they are
    /// committed and covered by a state-machine snapshot.
    compacted: SnapshotMeta,
    /// Entries `compacted.last_index + 1 ..= last_index()`.
    entries: VecDeque<Entry>,
    /// Entries up to here are durable locally. Invariant: <= last_index().
    durable: LogIndex,
    /// Invariant: commit <= durable on a follower; on the leader commit <=
    /// durable as well (the leader counts itself only once durable).
    commit: LogIndex,

    // Follower side.
    /// Highest index known to match the current leader's log.
    leader_matched: LogIndex,
    leader_commit: LogIndex,
    /// The newest closed timestamp whose entries are all committed here.
    closed: Option<Timestamp>,
    /// The latest moment, on this replica's monotonic clock, at which its
    /// committed state was known complete (the `as_of` of `closed`): its
    /// staleness is the time since, so no wall clock enters it.
    closed_as_of: Option<MonoMs>,
    /// Closed timestamps heard from the leader that wait for their
    /// `leader_last_index` to commit here, oldest first, each with the
    /// moment on this replica's monotonic clock it was complete as of
    /// (when known).
    closed_pending: VecDeque<(Timestamp, LogIndex, Option<MonoMs>)>,
    /// `sent_at` of the newest append accepted in this generation (the
    /// leader's clock, echoed back to it).
    echo: MonoMs,
    /// When this replica last acknowledged a leader's append (or started).
    /// A leader's lease rests on such acks, so once the replica is sealed
    /// the control plane knows when the old leader's lease ends.
    acked_at: MonoMs,
    /// Tells this replica's acks from those of its earlier lives (which
    /// ran on another monotonic origin), in the leader's echoes.
    incarnation: u64,
    /// See [`Recovered::recovering`]. Cleared (and `Effect::CaughtUp`
    /// emitted) once `commit` reaches `recover_to`.
    recovering: bool,
    /// The last index of the first leader this recovering replica heard
    /// from in the newest generation the control plane told it of.
    recover_to: Option<LogIndex>,
    /// A snapshot arriving in chunks from the current leader.
    incoming: Option<IncomingSnapshot>,

    // Leader side.
    progress: BTreeMap<NodeId, Progress>,
    /// A planned transfer: no proposals before this (replication goes on).
    draining_until: MonoMs,
    /// When each run of entries was appended here, on the monotonic clock:
    /// `(first index of the run, when)`, ascending. The age of the oldest
    /// entry a follower lacks is its lag. Pruned as every follower acks;
    /// at most `APPEND_MARKS_MAX` (older runs merge, overstating lag).
    append_marks: VecDeque<(LogIndex, MonoMs)>,
    /// First leader entry not yet handed to the runtime in a `Persist`.
    unflushed_from: Option<LogIndex>,

    effects: Vec<Effect>,
}

impl Replica {
    /// A replica restarted from its WAL. It is a follower without a leader
    /// until the metadata plane names one.
    /// `now` is when it starts: it may have acknowledged a leader just
    /// before it stopped, so its lease grant is counted from here.
    pub fn new(config: Config, members: Vec<Member>, recovered: Recovered, now: Now) -> Replica {
        if let Err(e) = config.validate(&members) {
            panic!("invalid replica config for {}: {e}", config.shard);
        }
        let mut expect = recovered.snapshot.last_index;
        for entry in &recovered.entries {
            expect = expect.next();
            assert_eq!(entry.index, expect, "recovered log is not contiguous");
            assert!(
                entry.generation <= recovered.generation,
                "entry {} of generation {} is newer than the durable generation {}",
                entry.index,
                entry.generation,
                recovered.generation
            );
        }
        let last = expect;
        let mut hlc = Hlc::new();
        if let Some(entry) = recovered.entries.last() {
            hlc.observe(entry.at);
        }
        Replica {
            config,
            members,
            role: Role::Follower,
            generation: recovered.generation,
            led: recovered.led,
            leader: None,
            hlc,
            compacted: recovered.snapshot,
            entries: recovered.entries.into(),
            durable: last,
            commit: recovered.snapshot.last_index,
            leader_matched: recovered.snapshot.last_index,
            leader_commit: recovered.snapshot.last_index,
            closed: None,
            closed_as_of: None,
            closed_pending: VecDeque::new(),
            echo: MonoMs::ZERO,
            acked_at: now.mono,
            incarnation: incarnation_of(now) ^ recovered.life_salt,
            recovering: recovered.recovering,
            recover_to: None,
            incoming: None,
            progress: BTreeMap::new(),
            draining_until: MonoMs::ZERO,
            append_marks: VecDeque::new(),
            unflushed_from: None,
            effects: Vec::new(),
        }
    }

    // ----- Accessors -------------------------------------------------------

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn members(&self) -> &[Member] {
        &self.members
    }

    // ----- Membership ------------------------------------------------------

    /// Takes the membership the metadata plane committed: replicas added
    /// as learners, learners made voters, voters made learners on their
    /// way out, learners removed. A leader starts sending to a new member
    /// at once (from its next entry, backing off to a snapshot) and counts
    /// acks by the new voting rule from here on; the control plane orders
    /// changes so that this is safe (`harbor_meta::members_driver`: a
    /// voter is counted only once failover asks it, and dropped from
    /// failover only once the voters left hold what it acknowledged). Refused,
    /// changing nothing, when the members break the config's rules or
    /// would take away the leader's own vote.
    pub fn set_members(&mut self, now: Now, members: Vec<Member>) -> Result<(), ConfigError> {
        self.config.validate(&members)?;
        if self.role == Role::Leader {
            let me = &self.config.me;
            if !members.iter().any(|m| &m.node == me && m.voter) {
                return Err(ConfigError::LeaderNotVoter);
            }
            let last = self.last_index();
            self.progress
                .retain(|node, _| members.iter().any(|m| &m.node == node));
            for m in members.iter().filter(|m| &m.node != me) {
                match self.progress.get_mut(&m.node) {
                    Some(p) => {
                        p.local = m.local;
                        p.voter = m.voter;
                    }
                    None => {
                        probe("replication.leader_sends_to_a_new_member");
                        self.progress
                            .insert(m.node.clone(), Progress::new(m, last, now));
                    }
                }
            }
            self.maybe_commit();
        }
        self.members = members;
        Ok(())
    }

    pub fn role(&self) -> Role {
        self.role
    }

    pub fn is_leader(&self) -> bool {
        self.role == Role::Leader
    }

    /// See [`Recovered::recovering`].
    pub fn is_recovering(&self) -> bool {
        self.recovering
    }

    /// The control plane found every replica of the group empty: nothing
    /// was lost that anyone holds, and this one starts the group anew.
    pub fn forget_lost_state(&mut self) {
        assert!(self.recovering, "{}: not recovering", self.config.shard);
        assert_eq!(
            self.last_index(),
            LogIndex::ZERO,
            "{}: a replica with a log cannot start its group anew",
            self.config.shard
        );
        self.recovering = false;
        self.effects.push(Effect::CaughtUp);
    }

    pub fn generation(&self) -> Generation {
        self.generation
    }

    pub fn leader(&self) -> Option<&NodeId> {
        self.leader.as_ref()
    }

    pub fn commit_index(&self) -> LogIndex {
        self.commit
    }

    pub fn durable_index(&self) -> LogIndex {
        self.durable
    }

    pub fn last_index(&self) -> LogIndex {
        LogIndex(self.compacted.last_index.0 + self.entries.len() as u64)
    }

    pub fn compacted(&self) -> SnapshotMeta {
        self.compacted
    }

    /// The entry at `index`, if it is still in memory.
    pub fn entry(&self, index: LogIndex) -> Option<&Entry> {
        if index <= self.compacted.last_index {
            return None;
        }
        let offset = (index.0 - self.compacted.last_index.0 - 1) as usize;
        let entry = self.entries.get(offset)?;
        assert_eq!(entry.index, index, "in-memory log is misindexed");
        Some(entry)
    }

    /// Entries `from ..= to` still in memory.
    pub fn entries(&self, from: LogIndex, to: LogIndex) -> impl Iterator<Item = &Entry> {
        let start = from.0.max(self.compacted.last_index.0 + 1);
        (start..=to.0).map_while(move |i| self.entry(LogIndex(i)))
    }

    /// The generation of the entry at `index`, when known.
    pub fn generation_at(&self, index: LogIndex) -> Option<Generation> {
        if index == self.compacted.last_index {
            return Some(self.compacted.last_generation);
        }
        self.entry(index).map(|e| e.generation)
    }

    pub fn status(&self, now: Now) -> ReplicaStatus {
        let followers = self
            .progress
            .iter()
            .map(|(node, p)| FollowerStatus {
                node: node.clone(),
                local: p.local,
                voter: p.voter,
                match_index: p.match_index,
                lag_entries: p.match_index.distance_to(self.last_index()),
                lag_ms: self.lag_ms(p, now),
                last_ack_ms_ago: p.last_ack.map(|t| now.mono.since(t)),
            })
            .collect();
        ReplicaStatus {
            role: self.role,
            generation: self.generation,
            leader: self.leader.clone(),
            last_index: self.last_index(),
            last_generation: self.generation_at(self.last_index()).unwrap_or_default(),
            durable_index: self.durable,
            commit_index: self.commit,
            followers,
            closed: self.closed_timestamp(now),
            acked_ms_ago: now.mono.since(self.acked_at),
            recovering: self.recovering,
        }
    }

    /// Effects produced since the last drain, in execution order.
    pub fn drain_effects(&mut self) -> Vec<Effect> {
        std::mem::take(&mut self.effects)
    }

    // ----- Generations -----------------------------------------------------

    /// Whether `generation` is one [`Replica::become_leader`] may take, as
    /// far as generations go (a recovering replica may take none): a newer
    /// one, or the one it is sealed at without a leader, provided it holds
    /// no entry of it (and never led it). An order that arrives late (a
    /// deposed control loop's, a slow connection's) fails this and is
    /// ignored by the runtime, unless the replica lost its state: at
    /// generation 0 it cannot tell a late order from a current one.
    pub fn may_lead(&self, generation: Generation) -> bool {
        generation > self.generation
            || (self.sealed_at(generation)
                && !self.led
                && self.generation_at(self.last_index()).unwrap_or_default() < generation)
    }

    /// Sealed at `generation` with no leader yet: the one named next may be
    /// this replica, provided it never took part in that generation (a
    /// restarted leader of N looks sealed at N too, and must never continue
    /// N: followers may hold entries of N it lost, since a leader sends
    /// entries before its own fsync; it remembers that it led N in its hard
    /// state, as it may hold no entry of N).
    fn sealed_at(&self, generation: Generation) -> bool {
        generation == self.generation && self.role == Role::Follower && self.leader.is_none()
    }

    /// Whether [`Replica::become_follower`] may take `generation` led by
    /// `leader`.
    pub fn may_follow(&self, generation: Generation, leader: &NodeId) -> bool {
        generation >= self.generation && *leader != self.config.me
    }

    /// The time of an entry this replica holds only inside a snapshot (its
    /// state machine's last applied one): like every entry it holds, its
    /// own entries, if it leads, are ordered after it.
    pub fn observe_time(&mut self, at: Timestamp) {
        self.hlc.observe(at);
    }

    /// The metadata plane named this replica leader of `generation`.
    pub fn become_leader(&mut self, now: Now, generation: Generation) {
        assert!(
            !self.recovering,
            "{}: a replica that lost its state was named to lead {generation}",
            self.config.shard
        );
        assert!(
            self.may_lead(generation),
            "{}: named to lead generation {generation}, which is older than the known {}, \
             or one it already holds entries of",
            self.config.shard,
            self.generation
        );
        let sealed = self.sealed_at(generation);
        if self.role == Role::Leader {
            self.step_down(generation);
        }
        if sealed {
            self.leader = Some(self.config.me.clone());
            self.led = true;
            self.effects.push(Effect::PersistGeneration {
                generation,
                led: true,
            });
        } else {
            self.adopt_generation(generation, Some(self.config.me.clone()));
        }
        self.role = Role::Leader;
        let last = self.last_index();
        self.progress = self
            .members
            .iter()
            .filter(|m| m.node != self.config.me)
            .map(|m| (m.node.clone(), Progress::new(m, last, now)))
            .collect();
        self.append_marks.clear();
        // The barrier commits everything earlier generations left behind.
        self.append_local(now, Vec::new());
        self.flush(now);
    }

    /// Whether this leader may serve strong reads at `now`: `sync_acks`
    /// local followers acknowledged, in this generation, appends sent within
    /// the last `lease_ms`. A sealed or fenced leader loses it within
    /// `lease_ms`, which the control plane waits out before naming the next.
    /// Measured on the monotonic clock: a wall-clock step never stretches it.
    pub fn has_lease(&self, now: Now) -> bool {
        let lease_now = self.lease_clock(now);
        self.lease_until().is_some_and(|until| lease_now < until)
    }

    /// The clock leases run on: monotonic (the `lease_on_wall_clock` bug
    /// switch puts them back on the wall clock, for the simulator to catch).
    fn lease_clock(&self, now: Now) -> MonoMs {
        if self.config.bugs.lease_on_wall_clock {
            MonoMs::from_millis(now.wall.as_millis())
        } else {
            now.mono
        }
    }

    /// When this leader's lease ends, on its own lease clock
    /// (`MonoMs::MAX` when no follower ack is required); `None` if it holds
    /// none.
    fn lease_until(&self) -> Option<MonoMs> {
        if self.role != Role::Leader {
            return None;
        }
        let mut starts: Vec<MonoMs> = self
            .progress
            .values()
            .filter(|p| p.local && p.voter)
            .filter_map(|p| p.lease_from)
            .collect();
        starts.sort_unstable_by(|a, b| b.cmp(a));
        match self.config.sync_acks {
            0 => Some(MonoMs::MAX),
            n => starts
                .get(n - 1)
                .map(|start| start.plus(self.config.lease_ms)),
        }
    }

    /// The newest time this replica's committed state is complete for:
    /// every entry the group ordered at or before it is committed here.
    ///
    /// A leader under a lease is complete up to now. A follower is complete
    /// up to the newest closed timestamp (see [`Append::closed`]) whose
    /// `leader_last_index` it has committed. A leader closes no time past
    /// its lease, and the control plane names the next leader only after
    /// that lease ran out, so a closed timestamp from a deposed leader still
    /// holds: the next generation orders entries after it (up to clock skew,
    /// which the failover margin covers).
    pub fn closed_timestamp(&self, now: Now) -> Option<Timestamp> {
        match self.role {
            Role::Leader => self
                .has_lease(now)
                .then(|| Timestamp::from_wall_ms(now.wall.as_millis())),
            Role::Follower => self.closed,
        }
    }

    /// How far behind real time this replica's committed state may be, in
    /// milliseconds: 0 for a leader under its lease; for a follower, the
    /// time on its own monotonic clock since the moment its closed
    /// timestamp was known complete (bounded by the round trip of an ack
    /// the leader echoed, see [`Append::echo_ack`]): no wall clock enters
    /// it, so no wall-clock step makes a state look fresher than it is.
    /// `None` when unknown.
    pub fn staleness_ms(&self, now: Now) -> Option<u64> {
        match self.role {
            Role::Leader => self.has_lease(now).then_some(0),
            Role::Follower => self.closed_as_of.map(|as_of| now.mono.since(as_of)),
        }
    }

    /// The timestamp a leader closes in a message sent now: its clock,
    /// but never past its lease (see [`Replica::closed_timestamp`]).
    /// Also returns how far the timestamp lies behind this leader's clock
    /// (0 unless the lease ran out), for [`Append::closed_lag_ms`].
    fn close_timestamp(&mut self, now: Now) -> (Timestamp, u64) {
        let stamp = self.hlc.now(now.wall);
        let Some(until) = self.lease_until() else {
            return (Timestamp::ZERO, 0);
        };
        // The lease's end, translated from the lease clock into wall time
        // as the two clocks stand now.
        let lease_now = self.lease_clock(now);
        let wall = now.wall.as_millis();
        let until_wall = if until >= lease_now {
            wall.saturating_add(until.since(lease_now))
        } else {
            wall.saturating_sub(lease_now.since(until))
        };
        if until_wall <= stamp.wall_ms {
            (Timestamp::from_wall_ms(until_wall), lease_now.since(until))
        } else {
            (stamp, 0)
        }
    }

    /// A planned transfer: take no proposals for `for_ms` while a follower
    /// catches up; keep replicating. The control plane then seals the
    /// generation, or gives up and lets the drain run out.
    pub fn drain(&mut self, now: Now, for_ms: u64) {
        if self.role == Role::Leader {
            probe("replication.leader_drained_for_transfer");
            self.draining_until = now.mono.plus(for_ms);
        }
    }

    /// The control plane sealed this replica's generation: it stops
    /// accepting appends of older generations and waits to be told the new
    /// leader. Returns false, changing nothing, for a generation it already
    /// has (an order that arrived late).
    pub fn seal(&mut self, generation: Generation) -> bool {
        if generation <= self.generation {
            return false;
        }
        if self.role == Role::Leader {
            self.step_down(generation);
        }
        self.adopt_generation(generation, None);
        true
    }

    /// The metadata plane named `leader` for `generation`.
    pub fn become_follower(&mut self, generation: Generation, leader: NodeId) {
        assert!(
            self.may_follow(generation, &leader),
            "{}: cannot follow {leader} in generation {generation}, already at {} (or it is us)",
            self.config.shard,
            self.generation
        );
        if generation > self.generation {
            if self.role == Role::Leader {
                self.step_down(generation);
            }
            self.adopt_generation(generation, Some(leader));
        } else {
            self.leader = Some(leader);
        }
    }

    fn adopt_generation(&mut self, generation: Generation, leader: Option<NodeId>) {
        assert!(generation > self.generation);
        self.generation = generation;
        self.led = leader.as_ref() == Some(&self.config.me);
        self.leader = leader;
        // Only the committed prefix is known to be in every later leader's log.
        self.leader_matched = self.commit;
        self.closed = None;
        self.closed_pending.clear();
        self.echo = MonoMs::ZERO;
        self.closed_as_of = None;
        self.incoming = None;
        // A recovering replica's target comes from a leader of the newest
        // generation it was told of.
        self.recover_to = None;
        self.effects.push(Effect::PersistGeneration {
            generation,
            led: self.led,
        });
    }

    fn step_down(&mut self, newer: Generation) {
        assert_eq!(self.role, Role::Leader);
        self.role = Role::Follower;
        self.draining_until = MonoMs::ZERO;
        self.append_marks.clear();
        self.progress.clear();
        self.leader_matched = self.commit;
        if self.unflushed_from.is_some() {
            // Entries still unflushed must reach the WAL: the runtime's
            // in-memory log and its WAL must agree.
            self.flush_persist();
        }
        self.effects.push(Effect::SteppedDown { generation: newer });
    }

    // ----- Leader: proposals -----------------------------------------------

    /// Orders `payload` into the log. The entry is not durable, not sent and
    /// not committed yet: call [`Replica::flush`] after a batch of proposals
    /// (group commit), then wait for `Commit`.
    pub fn propose(&mut self, now: Now, payload: Vec<u8>) -> Result<LogIndex, ProposeError> {
        if self.role != Role::Leader {
            return Err(ProposeError::NotLeader {
                generation: self.generation,
                leader: self.leader.clone(),
            });
        }
        assert!(
            !payload.is_empty(),
            "an empty payload is a barrier, not a proposal"
        );
        if payload.len() > self.config.entry_bytes_max {
            return Err(ProposeError::TooLarge {
                bytes: payload.len(),
                max: self.config.entry_bytes_max,
            });
        }
        if now.mono < self.draining_until {
            return Err(ProposeError::Draining {
                retry_after_ms: self.draining_until.since(now.mono),
            });
        }
        let uncommitted = self.commit.distance_to(self.last_index());
        if uncommitted >= self.config.uncommitted_entries_max {
            return Err(ProposeError::Overloaded {
                uncommitted,
                max: self.config.uncommitted_entries_max,
            });
        }
        for (node, p) in &self.progress {
            // Local followers are waited for at commit; a remote learner
            // catching up must not stop the group's writes.
            if p.local || !p.voter {
                continue;
            }
            let lag_ms = self.lag_ms(p, now);
            if lag_ms > self.config.rpo_budget_ms {
                probe("replication.rpo_gate_refused_write");
                return Err(ProposeError::RpoBudgetExceeded {
                    node: node.clone(),
                    lag_ms,
                    budget_ms: self.config.rpo_budget_ms,
                });
            }
        }
        Ok(self.append_local(now, payload))
    }

    fn append_local(&mut self, now: Now, payload: Vec<u8>) -> LogIndex {
        assert_eq!(self.role, Role::Leader);
        let index = self.last_index().next();
        let entry = Entry {
            index,
            generation: self.generation,
            at: self.hlc.now(now.wall),
            payload,
        };
        self.entries.push_back(entry);
        self.mark_append(index, now.mono);
        self.unflushed_from.get_or_insert(index);
        index
    }

    /// Hands the entries proposed since the last flush to the WAL (one
    /// `Persist`, so one fsync for the batch), streams them to followers, and
    /// tells followers a commit index they have not heard yet. The runtime
    /// calls it once per batch of inputs, so a burst costs one message per
    /// follower, not one per proposal or ack.
    pub fn flush(&mut self, now: Now) {
        if self.role != Role::Leader {
            return;
        }
        self.flush_persist();
        let last = self.last_index();
        let nodes: Vec<NodeId> = self.progress.keys().cloned().collect();
        for node in nodes {
            let p = &self.progress[&node];
            let news = p.next_index <= last || p.sent_commit < self.commit;
            if news && !p.snapshot_pending {
                self.send_append(now, &node);
            }
        }
    }

    fn flush_persist(&mut self) {
        if let Some(from) = self.unflushed_from.take() {
            let entries: Vec<Entry> = self.entries(from, self.last_index()).cloned().collect();
            assert!(!entries.is_empty());
            self.effects.push(Effect::Persist {
                truncate_from: None,
                entries,
            });
        }
    }

    fn send_append(&mut self, now: Now, to: &NodeId) {
        assert_eq!(self.role, Role::Leader);
        let last = self.last_index();
        let p = self.progress.get_mut(to).expect("unknown follower");
        if p.next_index <= self.compacted.last_index {
            if !p.snapshot_pending {
                probe("replication.snapshot_sent_to_lagging_follower");
                p.snapshot_pending = true;
                p.last_sent = now.mono;
                self.effects.push(Effect::SnapshotNeeded { to: to.clone() });
            }
            return;
        }
        let inflight = p.match_index.distance_to(p.next_index.prev());
        let room = self.config.inflight_entries_max.saturating_sub(inflight);
        let count_max = (self.config.append_entries_max as u64).min(room);
        let prev_index = p.next_index.prev();
        let prev_generation = match prev_index {
            i if i == self.compacted.last_index => self.compacted.last_generation,
            i => {
                let offset = (i.0 - self.compacted.last_index.0 - 1) as usize;
                self.entries[offset].generation
            }
        };
        let mut batch = Vec::new();
        let mut bytes = 0usize;
        let mut index = p.next_index;
        while index <= last && (batch.len() as u64) < count_max {
            let offset = (index.0 - self.compacted.last_index.0 - 1) as usize;
            let entry = &self.entries[offset];
            if !batch.is_empty() && bytes + entry.payload.len() > self.config.append_bytes_max {
                break;
            }
            bytes += entry.payload.len();
            batch.push(entry.clone());
            index = index.next();
        }
        p.next_index = index;
        p.last_sent = now.mono;
        p.sent_commit = self.commit;
        let echo_ack = p.ack_echo;
        let sent_at = self.lease_clock(now);
        let (closed, closed_lag_ms) = self.close_timestamp(now);
        let message = Message::Append(Append {
            shard: self.config.shard,
            generation: self.generation,
            leader: self.config.me.clone(),
            prev_index,
            prev_generation,
            entries: batch,
            commit_index: self.commit,
            closed,
            leader_last_index: last,
            closed_lag_ms,
            echo_ack,
            sent_at,
        });
        self.effects.push(Effect::Send {
            to: to.clone(),
            message,
        });
    }

    /// Sends a state-machine snapshot the runtime built after `SnapshotNeeded`.
    pub fn send_snapshot(&mut self, now: Now, to: &NodeId, meta: SnapshotMeta, data: Vec<u8>) {
        if self.role != Role::Leader {
            return;
        }
        assert!(
            meta.last_index <= self.commit,
            "snapshot at {} is past the commit index {}",
            meta.last_index,
            self.commit
        );
        let Some(p) = self.progress.get_mut(to) else {
            return;
        };
        p.next_index = meta.last_index.next();
        p.snapshot_pending = true;
        p.outgoing = Some(OutgoingSnapshot {
            meta,
            data: Arc::new(data),
            acked_bytes: 0,
            life: None,
        });
        self.send_snapshot_chunk(now, to);
    }

    /// Sends the chunk of the outgoing snapshot that starts where the
    /// follower stands.
    fn send_snapshot_chunk(&mut self, now: Now, to: &NodeId) {
        let chunk_max = self.config.snapshot_chunk_bytes_max as u64;
        let (closed, _) = self.close_timestamp(now);
        let p = self.progress.get_mut(to).expect("unknown follower");
        let Some(out) = &p.outgoing else {
            return;
        };
        let total = out.data.len() as u64;
        assert!(out.acked_bytes <= total, "acked past the snapshot's end");
        let end = total.min(out.acked_bytes + chunk_max);
        let data = out.data[out.acked_bytes as usize..end as usize].to_vec();
        assert!(data.len() as u64 <= chunk_max);
        let message = Message::InstallSnapshot(InstallSnapshot {
            shard: self.config.shard,
            generation: self.generation,
            leader: self.config.me.clone(),
            meta: out.meta,
            offset: out.acked_bytes,
            total_bytes: total,
            data,
            commit_index: self.commit,
            closed,
        });
        p.last_sent = now.mono;
        self.effects.push(Effect::Send {
            to: to.clone(),
            message,
        });
    }

    fn on_snapshot_ack(&mut self, now: Now, from: &NodeId, m: SnapshotAck) {
        if m.generation != self.generation || self.role != Role::Leader {
            return;
        }
        let Some(p) = self.progress.get_mut(from) else {
            return;
        };
        let Some(out) = p.outgoing.as_mut() else {
            return;
        };
        if out.meta.last_index != m.last_index {
            return;
        }
        let total = out.data.len() as u64;
        let received = m.received_bytes.min(total);
        let same_life = out.life.is_none_or(|l| l == m.incarnation);
        // One chunk in flight: only an ack that moves forward (or one from a
        // new life of the follower, which may hold less) sends the next.
        // Duplicated and late acks send nothing, so a resend after a
        // timeout never becomes a second stream.
        let advance = if same_life {
            received > out.acked_bytes
        } else {
            true
        };
        if same_life && received < out.acked_bytes {
            // The follower holds less than we counted (it dropped a partial
            // snapshot, or this ack is a late duplicate): resume from what
            // it says when the transfer stalls, never from bytes it lacks.
            // A late duplicate costs nothing: the next ack moves forward.
            probe("replication.snapshot_ack_went_backwards");
            out.acked_bytes = received;
            return;
        }
        if !advance {
            return;
        }
        out.life = Some(m.incarnation);
        out.acked_bytes = received;
        p.last_progress = now.mono;
        if out.acked_bytes < total {
            self.send_snapshot_chunk(now, from);
        }
    }

    /// How long ago the oldest entry the follower does not hold durably
    /// was appended here, on the monotonic clock. Entries from before this
    /// leadership count from when it began.
    fn lag_ms(&self, p: &Progress, now: Now) -> u64 {
        if p.match_index >= self.last_index() {
            return 0;
        }
        let missing = p.match_index.next();
        let runs_at_or_before = self.append_marks.partition_point(|(i, _)| *i <= missing);
        let mark = match runs_at_or_before {
            0 => self.append_marks.front(),
            n => self.append_marks.get(n - 1),
        };
        let (_, appended) = mark.expect("a leader has appended its barrier");
        now.mono.since(*appended)
    }

    fn mark_append(&mut self, index: LogIndex, at: MonoMs) {
        assert!(self
            .append_marks
            .back()
            .is_none_or(|(i, t)| *i < index && *t <= at));
        if self.append_marks.back().is_some_and(|(_, t)| *t == at) {
            return; // the run that began this millisecond covers it
        }
        if self.append_marks.len() >= APPEND_MARKS_MAX {
            // Merge the second run into the first: its entries then count
            // from the older time, so lag is overstated, never understated.
            self.append_marks.remove(1);
        }
        self.append_marks.push_back((index, at));
    }

    /// Drops the runs every follower holds (all but the one covering the
    /// slowest follower's first missing entry).
    fn prune_append_marks(&mut self) {
        let Some(slowest) = self.progress.values().map(|p| p.match_index).min() else {
            return;
        };
        let missing = slowest.next();
        while self.append_marks.len() > 1 && self.append_marks[1].0 <= missing {
            self.append_marks.pop_front();
        }
    }

    fn maybe_commit(&mut self) {
        assert_eq!(self.role, Role::Leader);
        let mut acks: Vec<LogIndex> = self
            .progress
            .values()
            .filter(|p| (p.local && p.voter) || (!p.voter && self.config.bugs.learner_acks_count))
            .map(|p| p.match_index)
            .collect();
        acks.sort_unstable_by(|a, b| b.cmp(a));
        let candidate = match self.config.sync_acks {
            _ if self.config.bugs.commit_without_follower_ack => self.durable,
            0 => self.durable,
            n => self.durable.min(acks[n - 1]),
        };
        // Like Raft, only an entry of our own generation commits by counting;
        // earlier entries commit with it.
        if candidate > self.commit && self.generation_at(candidate) == Some(self.generation) {
            self.commit = candidate;
            self.effects.push(Effect::Commit { upto: candidate });
        }
    }

    // ----- Durability ------------------------------------------------------

    /// The runtime made everything up to `index` (an entry of `generation`)
    /// durable. Stale reports (the entry was truncated since) are ignored.
    pub fn persisted(&mut self, now: Now, index: LogIndex, generation: Generation) {
        if index <= self.durable || self.generation_at(index) != Some(generation) {
            return;
        }
        assert!(index <= self.last_index());
        self.durable = index;
        match self.role {
            Role::Leader => self.maybe_commit(),
            Role::Follower => {
                self.follower_advance_commit();
                self.ack_leader(now, true);
            }
        }
    }

    // ----- Messages --------------------------------------------------------

    pub fn receive(&mut self, now: Now, from: &NodeId, message: Message) {
        assert_eq!(
            message.shard(),
            self.config.shard,
            "message for another shard"
        );
        match message {
            Message::Append(m) => self.on_append(now, m),
            Message::AppendAck(m) => self.on_ack(now, from, m),
            Message::InstallSnapshot(m) => self.on_install_snapshot(now, m),
            Message::SnapshotAck(m) => self.on_snapshot_ack(now, from, m),
        }
    }

    /// Common fencing for leader → follower messages. Returns false when the
    /// message must be refused.
    fn accept_from_leader(&mut self, generation: Generation, leader: &NodeId) -> bool {
        if generation < self.generation && self.config.bugs.accept_old_generation {
            // The bug: a follower takes an old leader's append as current.
            return self.role == Role::Follower;
        }
        if generation < self.generation {
            probe("replication.follower_rejects_old_generation");
            // Fenced: tell the old leader about the newer generation.
            self.effects.push(Effect::Send {
                to: leader.clone(),
                message: Message::AppendAck(AppendAck {
                    shard: self.config.shard,
                    generation: self.generation,
                    success: false,
                    match_index: LogIndex::ZERO,
                    hint: LogIndex::ZERO,
                    echo: MonoMs::ZERO,
                    ack: AckEcho {
                        incarnation: self.incarnation,
                        sent_at: MonoMs::ZERO,
                    },
                    recovering: self.recovering,
                }),
            });
            return false;
        }
        if generation > self.generation && self.recovering {
            // A replica that lost its state does not know which generation
            // its earlier life took part in: a leader it hears from may be a
            // deposed one (of a generation older than the one it acked in,
            // with less committed), whose commit index would count it caught
            // up too early. It takes generations only from the control plane
            // until it is caught up.
            probe("replication.recovering_replica_ignores_untold_generation");
            return false;
        }
        if generation > self.generation {
            if self.role == Role::Leader {
                self.step_down(generation);
            }
            self.adopt_generation(generation, Some(leader.clone()));
        }
        assert!(
            !(self.role == Role::Leader && *leader != self.config.me),
            "{}: two leaders in generation {generation}: {} and {leader}",
            self.config.shard,
            self.config.me
        );
        self.leader = Some(leader.clone());
        true
    }

    fn on_append(&mut self, now: Now, m: Append) {
        if !self.accept_from_leader(m.generation, &m.leader) {
            return;
        }
        self.hlc.observe(m.closed);
        // Times rise along the log, across leaders too: a replica named
        // leader orders its entries after every one it holds (change feeds
        // promise resolved times on that).
        if let Some(last) = m.entries.last() {
            self.hlc.observe(last.at);
        }
        let mut prev_index = m.prev_index;
        let mut prev_generation = m.prev_generation;
        let mut entries = m.entries;
        // Entries at or below our compaction point are committed, hence match.
        if prev_index < self.compacted.last_index {
            let skip = entries
                .iter()
                .take_while(|e| e.index <= self.compacted.last_index)
                .count();
            entries.drain(..skip);
            prev_index = self.compacted.last_index;
            prev_generation = self.compacted.last_generation;
            if let Some(first) = entries.first() {
                assert_eq!(first.index, prev_index.next());
            }
        }
        if prev_index > self.last_index() || self.generation_at(prev_index) != Some(prev_generation)
        {
            probe("replication.append_gap_rejected");
            assert!(
                prev_index > self.commit
                    || prev_index > self.last_index()
                    || self.config.bugs.accept_old_generation,
                "{}: committed entry {prev_index} conflicts with the leader's log",
                self.config.shard
            );
            self.ack_leader(now, false);
            return;
        }
        // After this message our log matches the leader's through its last
        // entry (or through prev_index for a heartbeat).
        let matched = entries.last().map_or(prev_index, |e| e.index);
        let mut truncate_from = None;
        let mut appended = Vec::new();
        for entry in entries {
            if entry.index <= self.last_index() {
                if self.generation_at(entry.index) == Some(entry.generation) {
                    continue;
                }
                if entry.index <= self.commit {
                    // Only reachable with the accept-old-generation bug: an
                    // honest protocol never rewrites a committed entry.
                    assert!(
                        self.config.bugs.accept_old_generation,
                        "{}: truncating committed entry {} (commit {})",
                        self.config.shard, entry.index, self.commit
                    );
                    self.commit = entry.index.prev();
                }
                probe("replication.follower_truncates_suffix");
                self.truncate_from(entry.index);
                truncate_from = Some(entry.index);
            }
            assert_eq!(entry.index, self.last_index().next());
            self.entries.push_back(entry.clone());
            appended.push(entry);
        }
        self.leader_matched = self.leader_matched.max(matched);
        assert!(self.leader_matched <= self.last_index());
        self.leader_commit = self.leader_commit.max(m.commit_index);
        if self.recovering {
            // Everything the leader holds, not only what it has committed:
            // an ack of our earlier life it has not counted yet may still
            // commit an entry, and that entry is in its log.
            self.recover_to
                .get_or_insert(m.leader_last_index.max(m.commit_index));
        }
        // Complete as of when the echoed ack left here, less how far the
        // leader's closed timestamp lay behind its clock; an echo of an
        // ack of an earlier life of this replica, or from the future, says
        // nothing.
        let as_of = m
            .echo_ack
            .filter(|e| e.incarnation == self.incarnation && e.sent_at <= now.mono)
            .map(|e| MonoMs::from_millis(e.sent_at.as_millis().saturating_sub(m.closed_lag_ms)));
        self.hear_closed(m.closed, m.leader_last_index, as_of);
        self.echo = self.echo.max(m.sent_at);
        let persisting = truncate_from.is_some() || !appended.is_empty();
        if persisting {
            self.effects.push(Effect::Persist {
                truncate_from,
                entries: appended,
            });
        }
        self.follower_advance_commit();
        if !persisting {
            self.ack_leader(now, true);
        }
    }

    fn truncate_from(&mut self, from: LogIndex) {
        assert!(from > self.commit, "truncating committed entries");
        assert!(from > self.compacted.last_index);
        assert!(from > self.compacted.last_index);
        let keep = (from.0 - self.compacted.last_index.0 - 1) as usize;
        self.entries.truncate(keep);
        self.durable = self.durable.min(from.prev());
        self.leader_matched = self.leader_matched.min(from.prev());
    }

    fn follower_advance_commit(&mut self) {
        let candidate = self
            .leader_commit
            .min(self.leader_matched)
            .min(self.durable);
        if candidate > self.commit {
            self.commit = candidate;
            self.effects.push(Effect::Commit { upto: candidate });
        }
        self.advance_closed();
        self.check_caught_up();
    }

    /// A recovering replica is caught up once it has committed everything
    /// the leader of the current generation held when it first heard from
    /// it: every entry its earlier life acknowledged that was, or may yet
    /// be, committed is in that leader's log (a leader holds every entry
    /// committed before its generation, and the replica's acks of this
    /// generation went to it, before anything it sent since). The current
    /// generation is the one the control plane told it of: a deposed
    /// leader's log may lack entries committed after it.
    fn check_caught_up(&mut self) {
        if !self.recovering {
            return;
        }
        let Some(target) = self.recover_to else {
            return;
        };
        if self.commit >= target {
            probe("replication.recovering_replica_caught_up");
            self.recovering = false;
            self.effects.push(Effect::CaughtUp);
        }
    }

    /// A closed timestamp from the current leader: it becomes this
    /// follower's once the leader's log up to `leader_last_index` has
    /// committed here. Under steady writes that index is always ahead of the
    /// commit index in the same message, so pending ones are kept.
    fn hear_closed(
        &mut self,
        closed: Timestamp,
        leader_last_index: LogIndex,
        as_of: Option<MonoMs>,
    ) {
        if closed == Timestamp::ZERO || self.closed.is_some_and(|c| c >= closed) {
            return;
        }
        if self.closed_pending.len() >= CLOSED_PENDING_MAX {
            // Keep the oldest (they become readable first) and the newest.
            self.closed_pending.pop_back();
        }
        self.closed_pending
            .push_back((closed, leader_last_index, as_of));
        self.advance_closed();
    }

    fn advance_closed(&mut self) {
        while let Some(&(closed, upto, as_of)) = self.closed_pending.front() {
            if upto > self.commit {
                break;
            }
            self.closed_pending.pop_front();
            if self.closed.is_none_or(|c| c < closed) {
                self.closed = Some(closed);
            }
            // Completeness as of a moment never ends: keep the latest.
            if as_of > self.closed_as_of {
                self.closed_as_of = as_of;
            }
        }
    }

    fn ack_leader(&mut self, now: Now, success: bool) {
        let Some(leader) = self.leader.clone() else {
            return;
        };
        if leader == self.config.me {
            return;
        }
        if success {
            self.acked_at = now.mono;
        }
        self.effects.push(Effect::Send {
            to: leader,
            message: Message::AppendAck(AppendAck {
                shard: self.config.shard,
                generation: self.generation,
                success,
                match_index: self.durable.min(self.leader_matched),
                hint: self.leader_matched,
                echo: self.echo,
                ack: AckEcho {
                    incarnation: self.incarnation,
                    sent_at: now.mono,
                },
                recovering: self.recovering,
            }),
        });
    }

    fn on_install_snapshot(&mut self, now: Now, m: InstallSnapshot) {
        if !self.accept_from_leader(m.generation, &m.leader) {
            return;
        }
        self.hlc.observe(m.closed);
        self.leader_commit = self.leader_commit.max(m.commit_index);
        // A recovering replica takes its target from the appends that follow
        // (they say how long the leader's log is).
        if m.meta.last_index <= self.commit {
            self.incoming = None;
            self.ack_leader(now, true);
            return;
        }
        // A chunk that does not fit the snapshot it names is ignored (the
        // leader is told again where this follower stands).
        let end = m.offset.checked_add(m.data.len() as u64);
        let fits = end.is_some_and(|end| end <= m.total_bytes);
        let same = |i: &IncomingSnapshot| i.meta == m.meta && i.total_bytes == m.total_bytes;
        // Another snapshot replaces the one being received only from its
        // start, and only if it is not older: a late chunk of an earlier
        // snapshot (reordered, duplicated) must not throw away the newer
        // one's progress.
        let replaces = m.offset == 0
            && self
                .incoming
                .as_ref()
                .is_none_or(|i| !same(i) && i.meta.last_index <= m.meta.last_index);
        if replaces {
            self.incoming = Some(IncomingSnapshot {
                meta: m.meta,
                total_bytes: m.total_bytes,
                data: Vec::new(),
            });
        }
        // What this follower holds of the snapshot the chunk is from.
        let received = match self.incoming.as_mut().filter(|i| same(i)) {
            Some(incoming) => {
                // The next chunk exactly; duplicates and gaps change nothing.
                if m.offset == incoming.data.len() as u64 && fits {
                    incoming.data.extend_from_slice(&m.data);
                }
                incoming.data.len() as u64
            }
            None => {
                probe("replication.snapshot_chunk_of_another_snapshot_ignored");
                0
            }
        };
        let whole = self
            .incoming
            .as_ref()
            .is_some_and(|i| i.data.len() as u64 == i.total_bytes);
        if !whole {
            self.effects.push(Effect::Send {
                to: m.leader.clone(),
                message: Message::SnapshotAck(SnapshotAck {
                    shard: self.config.shard,
                    generation: self.generation,
                    last_index: m.meta.last_index,
                    received_bytes: received,
                    incarnation: self.incarnation,
                }),
            });
            return;
        }
        let incoming = self.incoming.take().expect("a whole snapshot");
        // Whole: replace the log; the snapshot covers committed entries we
        // lack.
        probe("replication.snapshot_installed_from_chunks");
        self.entries.clear();
        self.compacted = m.meta;
        self.durable = m.meta.last_index;
        self.commit = m.meta.last_index;
        self.leader_matched = m.meta.last_index;
        self.advance_closed();
        self.effects.push(Effect::PersistSnapshot {
            meta: incoming.meta,
            data: incoming.data,
        });
        self.check_caught_up();
        self.ack_leader(now, true);
    }

    fn on_ack(&mut self, now: Now, from: &NodeId, m: AppendAck) {
        if m.generation > self.generation && self.recovering {
            // As for appends: generations only from the control plane.
            probe("replication.recovering_replica_ignores_untold_generation");
            return;
        }
        if m.generation > self.generation {
            probe("replication.leader_fenced_by_newer_generation");
            // A newer generation exists: we are fenced. The metadata plane
            // tells us who leads it.
            if self.role == Role::Leader {
                self.step_down(m.generation);
            }
            self.adopt_generation(m.generation, None);
            return;
        }
        if m.generation < self.generation || self.role != Role::Leader {
            return;
        }
        let last = self.last_index();
        let Some(p) = self.progress.get_mut(from) else {
            return;
        };
        let life = m.ack.incarnation;
        if p.retired_lives.contains(&life) {
            return;
        }
        if p.life.is_some_and(|current| current != life) {
            // The follower restarted. With its disk it still holds all it
            // ever acknowledged; without (a replaced disk, it says it is
            // recovering) its log went backwards: believe what it holds
            // now and send it everything again.
            if p.retired_lives.len() >= RETIRED_LIVES_MAX {
                p.retired_lives.remove(0);
            }
            p.retired_lives.extend(p.life);
            if m.recovering {
                probe("replication.follower_came_back_with_another_log");
                p.match_index = m.match_index.min(p.match_index);
                p.next_index = p.match_index.next();
                p.snapshot_pending = false;
                p.outgoing = None;
                p.last_progress = now.mono;
            }
        }
        p.life = Some(life);
        p.last_ack = Some(now.mono);
        // Echo the newest ack of the follower's current life (a new life
        // replaces an old one even if its clock reads lower).
        let newer = p
            .ack_echo
            .is_none_or(|e| e.incarnation != m.ack.incarnation || e.sent_at < m.ack.sent_at);
        if newer && m.ack.sent_at > MonoMs::ZERO {
            p.ack_echo = Some(m.ack);
        }
        if m.success && m.echo > MonoMs::ZERO {
            p.lease_from = Some(p.lease_from.unwrap_or(MonoMs::ZERO).max(m.echo));
        }
        if m.success {
            assert!(
                m.match_index <= last,
                "{from} acked {} past the leader's last index {last}",
                m.match_index
            );
            if m.match_index > p.match_index {
                p.match_index = m.match_index;
                p.last_progress = now.mono;
            }
            if p.snapshot_pending && p.match_index >= self.compacted.last_index {
                p.snapshot_pending = false;
            }
            if p.outgoing
                .as_ref()
                .is_some_and(|o| p.match_index >= o.meta.last_index)
            {
                p.outgoing = None;
            }
            if p.next_index <= p.match_index {
                p.next_index = p.match_index.next();
            }
            self.maybe_commit();
            self.prune_append_marks();
            let p = &self.progress[from];
            if p.next_index <= last && !p.snapshot_pending {
                self.send_append(now, from);
            }
        } else {
            let resend_from = p.match_index.max(m.hint).next();
            // A follower being sent a snapshot rejects appends until it
            // installs it: the snapshot covers what it lacks, so starting
            // another (from scratch) would only restart the transfer.
            let covered = p
                .outgoing
                .as_ref()
                .is_some_and(|o| resend_from <= o.meta.last_index);
            if covered {
                probe("replication.rejection_covered_by_the_snapshot_in_flight");
                return;
            }
            if resend_from < p.next_index {
                p.next_index = resend_from;
                p.last_progress = now.mono;
                p.snapshot_pending = false;
                self.send_append(now, from);
            }
        }
    }

    // ----- Time --------------------------------------------------------------

    /// Heartbeats and retransmissions. Call every few milliseconds.
    pub fn tick(&mut self, now: Now) {
        if self.role != Role::Leader {
            return;
        }
        let heartbeat = self.config.heartbeat_interval_ms;
        let retransmit = self.config.retransmit_timeout_ms;
        let nodes: Vec<NodeId> = self.progress.keys().cloned().collect();
        for node in nodes {
            let p = self.progress.get_mut(&node).unwrap();
            let inflight = p.next_index.prev() > p.match_index;
            let stuck = now.mono.since(p.last_progress) >= retransmit;
            if stuck && p.outgoing.is_some() {
                // A chunk or its ack was lost: resume where the follower
                // stands, rather than build the snapshot again.
                probe("replication.snapshot_resumed");
                p.last_progress = now.mono;
                self.send_snapshot_chunk(now, &node);
            } else if inflight && stuck {
                probe("replication.retransmit_after_silence");
                // Lost or reordered appends: start again after the last ack.
                p.next_index = p.match_index.next();
                p.last_progress = now.mono;
                p.snapshot_pending = false;
                self.send_append(now, &node);
            } else if now.mono.since(p.last_sent) >= heartbeat {
                if p.snapshot_pending {
                    // Ask again: the snapshot or its ack may have been lost.
                    if p.outgoing.is_none() && now.mono.since(p.last_sent) >= retransmit {
                        p.snapshot_pending = false;
                        self.send_append(now, &node);
                    }
                } else {
                    self.send_append(now, &node);
                }
            }
        }
    }

    // ----- Compaction ------------------------------------------------------

    /// The state machine is durably snapshotted at `upto`: drop in-memory
    /// entries that no follower still needs (or, past `retained_entries_max`,
    /// that only a snapshot can serve now).
    pub fn compact(&mut self, upto: LogIndex) {
        let mut limit = upto.min(self.commit);
        if self.role == Role::Leader {
            if let Some(slowest) = self.progress.values().map(|p| p.match_index).min() {
                if slowest.distance_to(self.last_index()) <= self.config.retained_entries_max {
                    limit = limit.min(slowest);
                }
            }
        }
        if limit <= self.compacted.last_index {
            return;
        }
        let generation = self
            .generation_at(limit)
            .expect("compaction point in memory");
        let drop = (limit.0 - self.compacted.last_index.0) as usize;
        self.entries.drain(..drop);
        self.compacted = SnapshotMeta {
            last_index: limit,
            last_generation: generation,
        };
    }
}

//! Scenario tests of the replication core: a handful of replicas, a message
//! queue we control by hand, and a "disk" that persists when told to.

use std::collections::{BTreeMap, VecDeque};

use harbor_replication::{
    Config, Effect, Entry, Member, Message, ProposeError, Recovered, Replica, Role,
};
use harbor_types::{Generation, LogIndex, MonoMs, NodeId, Now, ShardId, WallMs};

fn node(name: &str) -> NodeId {
    NodeId::new(name).unwrap()
}

/// Three replicas in the home region and one remote.
fn members() -> Vec<Member> {
    vec![
        Member {
            node: node("l1"),
            local: true,
            voter: true,
        },
        Member {
            node: node("l2"),
            local: true,
            voter: true,
        },
        Member {
            node: node("l3"),
            local: true,
            voter: true,
        },
        Member {
            node: node("r1"),
            local: false,
            voter: true,
        },
    ]
}

/// Three local replicas (l1 leads) and one remote (r1).
struct Group {
    now_ms: u64,
    /// Added to every replica's wall clock (a step), not to its monotonic one.
    wall_step_ms: i64,
    replicas: BTreeMap<NodeId, Replica>,
    /// Messages in flight: (from, to, message).
    network: VecDeque<(NodeId, NodeId, Message)>,
    /// Per node: entries written but not yet fsynced.
    unsynced: BTreeMap<NodeId, Vec<Entry>>,
    /// Per node: the durable log as the fake WAL holds it.
    disk: BTreeMap<NodeId, Vec<Entry>>,
    committed: BTreeMap<NodeId, LogIndex>,
    down: Vec<NodeId>,
    snapshots_needed: Vec<(NodeId, NodeId)>,
    snapshots_installed: Vec<(NodeId, LogIndex)>,
    caught_up: Vec<NodeId>,
}

impl Group {
    fn new() -> Group {
        Group::with_config(|_| {})
    }

    fn with_config(tune: impl Fn(&mut Config)) -> Group {
        let members = members();
        let mut replicas = BTreeMap::new();
        for m in &members {
            let mut config = Config::new(ShardId(7), m.node.clone());
            tune(&mut config);
            replicas.insert(
                m.node.clone(),
                Replica::new(
                    config,
                    members.clone(),
                    Recovered::default(),
                    Now::both(1_000),
                ),
            );
        }
        let mut group = Group {
            now_ms: 1_000,
            wall_step_ms: 0,
            replicas,
            network: VecDeque::new(),
            unsynced: BTreeMap::new(),
            disk: BTreeMap::new(),
            committed: BTreeMap::new(),
            down: Vec::new(),
            snapshots_needed: Vec::new(),
            snapshots_installed: Vec::new(),
            caught_up: Vec::new(),
        };
        group.elect(node("l1"), Generation(1));
        group
    }

    fn elect(&mut self, leader: NodeId, generation: Generation) {
        let now = self.clocks();
        for (name, replica) in self.replicas.iter_mut() {
            if *name == leader {
                replica.become_leader(now, generation);
            } else {
                replica.become_follower(generation, leader.clone());
            }
        }
        self.run_effects();
    }

    /// Both clocks: monotonic at `now_ms`, wall stepped by `wall_step_ms`.
    fn clocks(&self) -> Now {
        let wall = (self.now_ms as i64 + self.wall_step_ms).max(0) as u64;
        Now::new(MonoMs::from_millis(self.now_ms), WallMs::from_millis(wall))
    }

    fn get(&self, name: &str) -> &Replica {
        &self.replicas[&node(name)]
    }

    fn replica(&mut self, name: &str) -> &mut Replica {
        self.replicas.get_mut(&node(name)).unwrap()
    }

    fn run_effects(&mut self) {
        let names: Vec<NodeId> = self.replicas.keys().cloned().collect();
        for name in names {
            let effects = self.replicas.get_mut(&name).unwrap().drain_effects();
            for effect in effects {
                match effect {
                    Effect::Persist {
                        truncate_from,
                        entries,
                    } => {
                        let unsynced = self.unsynced.entry(name.clone()).or_default();
                        let disk = self.disk.entry(name.clone()).or_default();
                        if let Some(from) = truncate_from {
                            disk.retain(|e| e.index < from);
                            unsynced.retain(|e| e.index < from);
                        }
                        unsynced.extend(entries);
                    }
                    Effect::Send { to, message } => {
                        self.network.push_back((name.clone(), to, message))
                    }
                    Effect::Commit { upto } => {
                        self.committed.insert(name.clone(), upto);
                    }
                    Effect::SnapshotNeeded { to } => {
                        self.snapshots_needed.push((name.clone(), to));
                    }
                    Effect::PersistSnapshot { meta, .. } => {
                        self.disk.entry(name.clone()).or_default().clear();
                        self.committed.insert(name.clone(), meta.last_index);
                        self.snapshots_installed
                            .push((name.clone(), meta.last_index));
                    }
                    Effect::CaughtUp => self.caught_up.push(name.clone()),
                    Effect::PersistGeneration { .. } | Effect::SteppedDown { .. } => {}
                }
            }
        }
    }

    /// fsync on one node.
    fn sync(&mut self, name: &str) {
        let n = node(name);
        let unsynced = std::mem::take(self.unsynced.entry(n.clone()).or_default());
        let Some(last) = unsynced.last().cloned() else {
            return;
        };
        self.disk.entry(n.clone()).or_default().extend(unsynced);
        let now = self.clocks();
        self.replicas
            .get_mut(&n)
            .unwrap()
            .persisted(now, last.index, last.generation);
        self.run_effects();
    }

    /// Delivers every message in flight (and those they cause), syncing every
    /// node's disk after each delivery round, until the network is quiet.
    fn settle(&mut self) {
        for _ in 0..100 {
            let names: Vec<String> = self.replicas.keys().map(|n| n.to_string()).collect();
            for name in &names {
                if !self.down.contains(&node(name)) {
                    self.sync(name);
                }
            }
            if self.network.is_empty() {
                return;
            }
            let batch: Vec<_> = self.network.drain(..).collect();
            for (from, to, message) in batch {
                if self.down.contains(&to) || self.down.contains(&from) {
                    continue;
                }
                let now = self.clocks();
                self.replicas
                    .get_mut(&to)
                    .unwrap()
                    .receive(now, &from, message);
            }
            self.flush_all();
        }
        panic!("network did not settle");
    }

    /// What the runtime does after each batch of inputs.
    fn flush_all(&mut self) {
        let now = self.clocks();
        for replica in self.replicas.values_mut() {
            replica.flush(now);
        }
        self.run_effects();
    }

    fn deliver_to(&mut self, to: &str) {
        let target = node(to);
        let mut keep = VecDeque::new();
        while let Some((from, dest, message)) = self.network.pop_front() {
            if dest == target {
                let now = self.clocks();
                self.replicas
                    .get_mut(&dest)
                    .unwrap()
                    .receive(now, &from, message);
            } else {
                keep.push_back((from, dest, message));
            }
        }
        self.network = keep;
        self.run_effects();
    }

    fn propose(&mut self, payload: &str) -> LogIndex {
        let now = self.clocks();
        let leader = self.leader_name();
        let r = self.replicas.get_mut(&leader).unwrap();
        let index = r.propose(now, payload.as_bytes().to_vec()).unwrap();
        r.flush(now);
        self.run_effects();
        index
    }

    fn leader_name(&self) -> NodeId {
        self.replicas
            .iter()
            .find(|(_, r)| r.role() == Role::Leader)
            .map(|(n, _)| n.clone())
            .expect("a leader")
    }

    fn committed(&self, name: &str) -> LogIndex {
        self.committed.get(&node(name)).copied().unwrap_or_default()
    }

    fn tick(&mut self, ms: u64) {
        self.now_ms += ms;
        let now = self.clocks();
        for replica in self.replicas.values_mut() {
            replica.tick(now);
        }
        self.run_effects();
    }
}

#[test]
fn leader_barrier_commits_once_a_local_follower_is_durable() {
    let mut g = Group::new();
    g.settle();
    assert_eq!(
        g.committed("l1"),
        LogIndex(1),
        "the generation's barrier commits"
    );
}

#[test]
fn commit_waits_for_a_same_region_follower() {
    let mut g = Group::new();
    g.settle();
    let index = g.propose("reserve 600");
    // The leader's own fsync is not enough.
    g.sync("l1");
    assert!(g.committed("l1") < index, "committed on the leader alone");
    // The remote follower's ack does not count either.
    g.deliver_to("r1");
    g.sync("r1");
    g.deliver_to("l1");
    assert!(g.committed("l1") < index, "committed on a remote ack");
    // A local follower that received but has not fsynced does not count.
    g.deliver_to("l2");
    g.deliver_to("l1");
    assert!(
        g.committed("l1") < index,
        "committed before the follower's fsync"
    );
    g.sync("l2");
    g.deliver_to("l1");
    assert_eq!(g.committed("l1"), index);
}

#[test]
fn a_down_remote_follower_never_delays_commits() {
    let mut g = Group::new();
    g.settle();
    g.down.push(node("r1"));
    for i in 0..20 {
        let index = g.propose(&format!("write {i}"));
        g.settle();
        assert_eq!(g.committed("l1"), index, "write {i} did not commit");
    }
    let now = g.clocks();
    let status = g.replica("l1").status(now);
    let remote = status.followers.iter().find(|f| !f.local).unwrap();
    // r1 holds the generation's barrier only.
    assert_eq!(remote.lag_entries, 20);
}

#[test]
fn writes_are_refused_when_the_remote_copy_is_over_the_rpo_budget() {
    let mut g = Group::new();
    g.settle();
    g.down.push(node("r1"));
    g.propose("write");
    g.settle();
    g.tick(6_000);
    let now = g.clocks();
    let err = g.replica("l1").propose(now, b"late".to_vec()).unwrap_err();
    match err {
        ProposeError::RpoBudgetExceeded {
            node: n,
            lag_ms,
            budget_ms,
        } => {
            assert_eq!(n, node("r1"));
            assert!(lag_ms > budget_ms);
        }
        other => panic!("expected RpoBudgetExceeded, got {other:?}"),
    }
    // The remote comes back, catches up on retransmission, and writes resume.
    g.down.clear();
    g.network.clear();
    g.tick(600);
    g.settle();
    let now = g.clocks();
    assert!(g.replica("l1").propose(now, b"again".to_vec()).is_ok());
}

#[test]
fn followers_refuse_older_generations_and_fence_the_old_leader() {
    let mut g = Group::new();
    g.settle();
    g.propose("one");
    g.settle();
    // Generation 2: l2 leads. l1 does not hear about it.
    let now = g.clocks();
    for name in ["l2", "l3", "r1"] {
        if name == "l2" {
            g.replica(name).become_leader(now, Generation(2));
        } else {
            g.replica(name).become_follower(Generation(2), node("l2"));
        }
    }
    g.run_effects();
    g.network.clear();
    // The old leader still believes it leads and proposes.
    let now = g.clocks();
    let stale = {
        let r = g.replica("l1");
        let index = r.propose(now, b"stale".to_vec()).unwrap();
        r.flush(now);
        index
    };
    g.run_effects();
    g.settle();
    g.tick(600);
    g.settle();
    assert_eq!(
        g.replica("l1").role(),
        Role::Follower,
        "old leader was not fenced"
    );
    assert!(g.replica("l1").generation() >= Generation(2));
    // The stale entry never committed anywhere, and l1 adopted the new log.
    let l2_commit = g.replica("l2").commit_index();
    let l2_entry = g.replica("l2").entry(stale).map(|e| e.generation);
    assert_ne!(
        l2_entry,
        Some(Generation(1)),
        "a generation-1 entry got in after the fence"
    );
    assert!(l2_commit >= LogIndex(3));
    g.elect_followers_of_l2();
    let index = g.propose("new");
    g.settle();
    assert_eq!(g.committed("l1"), index);
    assert_eq!(
        g.replica("l1").entry(stale).unwrap().generation,
        Generation(2),
        "old suffix truncated and replaced"
    );
}

impl Group {
    fn elect_followers_of_l2(&mut self) {
        self.replica("l1")
            .become_follower(Generation(2), node("l2"));
        self.run_effects();
    }
}

#[test]
fn lost_messages_are_retransmitted() {
    let mut g = Group::new();
    g.settle();
    let index = g.propose("lost");
    g.network.clear();
    g.settle();
    assert!(g.committed("l1") < index);
    g.tick(600);
    g.settle();
    assert_eq!(g.committed("l1"), index);
    for name in ["l2", "l3", "r1"] {
        assert_eq!(g.committed(name), index, "{name} did not learn the commit");
    }
}

#[test]
fn uncommitted_proposals_are_bounded() {
    let mut g = Group::new();
    g.settle();
    let now = g.clocks();
    let limit = g.replica("l1").config().uncommitted_entries_max;
    let mut refused = None;
    for i in 0..=limit {
        if let Err(e) = g.replica("l1").propose(now, vec![1]) {
            refused = Some((i, e));
            break;
        }
    }
    let (at, err) = refused.expect("proposals were never refused");
    assert!(matches!(err, ProposeError::Overloaded { .. }), "{err:?}");
    assert_eq!(at, limit);
}

#[test]
fn compaction_keeps_entries_a_lagging_follower_still_needs() {
    let mut g = Group::new();
    g.settle();
    g.down.push(node("r1"));
    for i in 0..10 {
        g.propose(&format!("w{i}"));
    }
    g.settle();
    let commit = g.replica("l1").commit_index();
    g.replica("l1").compact(commit);
    assert!(g.replica("l1").compacted().last_index < commit);
    g.down.clear();
    g.tick(600);
    g.settle();
    g.replica("l1").compact(commit);
    assert_eq!(g.replica("l1").compacted().last_index, commit);
    assert!(g.snapshots_needed.is_empty());
}

#[test]
fn a_follower_behind_the_retention_window_gets_a_snapshot() {
    let mut g = Group::with_config(|c| c.retained_entries_max = 2);
    g.settle();
    g.down.push(node("r1"));
    for i in 0..10 {
        g.propose(&format!("w{i}"));
    }
    g.settle();
    let commit = g.replica("l1").commit_index();
    g.replica("l1").compact(commit);
    assert_eq!(g.replica("l1").compacted().last_index, commit);
    g.down.clear();
    g.tick(600);
    g.settle();
    assert_eq!(g.snapshots_needed, vec![(node("l1"), node("r1"))]);
    let meta = g.replica("l1").compacted();
    let now = g.clocks();
    g.replica("l1")
        .send_snapshot(now, &node("r1"), meta, b"state".to_vec());
    g.run_effects();
    g.settle();
    assert_eq!(g.snapshots_installed, vec![(node("r1"), commit)]);
    let index = g.propose("after");
    g.settle();
    assert_eq!(g.committed("r1"), index);
    let now = g.clocks();
    let status = g.replica("l1").status(now);
    assert!(
        status.followers.iter().all(|f| f.lag_entries == 0),
        "{status:?}"
    );
}

#[test]
fn the_lease_needs_a_recent_local_ack_and_lapses_without_one() {
    let mut g = Group::new();
    let now = g.clocks();
    assert!(!g.replica("l1").has_lease(now), "no lease before any ack");
    g.settle();
    let now = g.clocks();
    assert!(g.replica("l1").has_lease(now));
    // Followers go silent: the lease runs out after lease_ms of the leader's
    // own clock, counted from the last acked send.
    let lease_ms = g.replica("l1").config().lease_ms;
    g.down = vec![node("l2"), node("l3"), node("r1")];
    g.tick(lease_ms - 1);
    g.settle();
    let now = g.clocks();
    assert!(g.replica("l1").has_lease(now), "lease ended early");
    g.tick(2);
    g.settle();
    let now = g.clocks();
    assert!(!g.replica("l1").has_lease(now), "lease outlived its acks");
    // A remote ack never extends the lease.
    g.down = vec![node("l2"), node("l3")];
    g.tick(200);
    g.settle();
    let now = g.clocks();
    assert!(
        !g.replica("l1").has_lease(now),
        "a remote follower granted a lease"
    );
}

#[test]
fn a_sealed_generation_fences_the_old_leader_and_the_sealed_replica_can_lead_it() {
    let mut g = Group::new();
    g.settle();
    let committed = g.propose("before");
    g.settle();
    // The control plane seals generation 2 on the followers; l1 is cut off.
    for name in ["l2", "l3", "r1"] {
        g.replica(name).seal(Generation(2));
    }
    g.run_effects();
    // The old leader's next append is refused and fences it.
    g.tick(200);
    g.settle();
    assert_eq!(g.replica("l1").role(), Role::Follower);
    assert_eq!(g.replica("l1").generation(), Generation(2));
    // l2, sealed at 2 with no leader, is named leader of 2.
    let now = g.clocks();
    g.replica("l2").become_leader(now, Generation(2));
    for name in ["l1", "l3", "r1"] {
        g.replica(name).become_follower(Generation(2), node("l2"));
    }
    g.run_effects();
    g.settle();
    let after = g.propose("after");
    g.settle();
    assert!(after > committed);
    assert_eq!(g.committed("l1"), after);
    assert_eq!(
        g.replica("l1").entry(committed).unwrap().generation,
        Generation(1)
    );
}

/// A leader of generation N that restarts before its first entry of N is
/// durable looks sealed at N (a follower of N with no leader and no entry
/// of N), yet its followers may hold entries of N it sent before its own
/// fsync. Its hard state says it led N, so a late order to lead N again
/// (queued on a connection across its restart) is not one it may take.
#[test]
fn a_restarted_leader_never_leads_its_generation_again() {
    let mut g = Group::new();
    g.settle();
    let now = g.clocks();
    g.replica("l2").seal(Generation(2));
    g.replica("l2").become_leader(now, Generation(2));
    let effects = g.replica("l2").drain_effects();
    assert!(
        effects.contains(&Effect::PersistGeneration {
            generation: Generation(2),
            led: true
        }),
        "leading a sealed generation is made durable first: {effects:?}"
    );
    let members = members();
    let restarted = |led| {
        let recovered = Recovered {
            generation: Generation(2),
            led,
            ..Recovered::default()
        };
        Replica::new(
            Config::new(ShardId(7), node("l2")),
            members.clone(),
            recovered,
            now,
        )
    };
    // It held no entry of generation 2 (its barrier was not durable).
    let leader = restarted(true);
    assert!(!leader.may_lead(Generation(2)));
    assert!(leader.may_lead(Generation(3)));
    // A replica only sealed at 2 may still be named its leader.
    assert!(restarted(false).may_lead(Generation(2)));
}

#[test]
fn a_sealed_follower_knows_when_the_old_leaders_lease_ends() {
    let mut g = Group::new();
    g.settle();
    let lease_ms = g.replica("l1").config().lease_ms;
    // The leader is cut off from everyone; its followers are sealed.
    g.down = vec![node("l1")];
    for name in ["l2", "l3"] {
        g.replica(name).seal(Generation(2));
    }
    g.run_effects();
    let sealed_at = g.now_ms;
    g.tick(300);
    let now = g.clocks();
    // Every local follower last acked at or before the seal: the old
    // leader's lease ends `lease_ms` after the newest of those acks.
    let newest_ack = ["l2", "l3"]
        .iter()
        .map(|n| now.mono.as_millis() - g.replica(n).status(now).acked_ms_ago)
        .max()
        .unwrap();
    assert!(newest_ack <= sealed_at);
    let bound = Now::both(newest_ack + lease_ms);
    assert!(
        !g.replica("l1").has_lease(bound),
        "the old leader's lease outlived the followers' last acks"
    );
}

#[test]
fn a_follower_is_fresh_up_to_the_closed_timestamp_it_has_committed() {
    let mut g = Group::new();
    let now = g.clocks();
    assert_eq!(
        g.replica("r1").closed_timestamp(now),
        None,
        "nothing heard yet"
    );
    g.settle();
    g.tick(100);
    g.settle();
    let heard_at = g.now_ms;
    let closed = g.get("r1").closed_timestamp(g.clocks()).unwrap();
    assert!(closed.wall_ms >= heard_at - 100, "{closed} at {heard_at}");
    assert_eq!(
        g.get("l1").closed_timestamp(g.clocks()).unwrap().wall_ms,
        heard_at,
        "a leader under a lease is fresh now"
    );

    // A proposal is in flight to r1 but not committed there: the timestamp
    // closed with it must wait for it.
    g.tick(50);
    let index = g.propose("in flight");
    g.deliver_to("r1");
    g.run_effects();
    let now = g.clocks();
    assert!(g.committed("r1") < index);
    let ordered_at = g.replica("l1").entry(index).unwrap().at;
    let fresh_to = g.replica("r1").closed_timestamp(now).unwrap();
    assert!(
        fresh_to < ordered_at,
        "fresh to {fresh_to} without entry {index} ordered at {ordered_at}"
    );
    g.settle();
    g.tick(100);
    g.settle();
    let now = g.clocks();
    assert!(g.replica("r1").closed_timestamp(now).unwrap() > closed);

    // Cut off from its followers, the leader closes nothing past its lease:
    // r1 (which it can still reach) does not get fresher than that.
    let lease_ms = g.replica("l1").config().lease_ms;
    g.down = vec![node("l2"), node("l3")];
    for _ in 0..(lease_ms / 100 + 5) {
        g.tick(100);
        g.settle();
    }
    let now = g.clocks();
    assert!(!g.replica("l1").has_lease(now));
    assert_eq!(g.replica("l1").closed_timestamp(now), None);
    let stuck = g.replica("r1").closed_timestamp(now).unwrap();
    assert!(
        stuck.wall_ms <= g.now_ms - 400,
        "r1 closed at {stuck} though l1's lease ended; now {now:?}"
    );
    g.tick(300);
    g.settle();
    let later = g.clocks();
    assert_eq!(g.replica("r1").closed_timestamp(later), Some(stuck));
}

/// Leases run on the monotonic clock: a backward step of the leader's wall
/// clock by far more than the lease does not let it serve strong reads
/// once its followers stopped acknowledging (with the bug switch that puts
/// leases on the wall clock, it does). A forward step does not end a lease
/// early either.
#[test]
fn a_wall_clock_step_neither_stretches_nor_cuts_a_lease() {
    for bug in [false, true] {
        let mut g = Group::with_config(|c| c.bugs.lease_on_wall_clock = bug);
        g.settle();
        g.tick(100);
        g.settle();
        assert!(g.get("l1").has_lease(g.clocks()));
        g.wall_step_ms = 60_000;
        assert!(
            bug || g.get("l1").has_lease(g.clocks()),
            "a forward step cut the lease"
        );
        g.wall_step_ms = 0;
        let lease_ms = g.replica("l1").config().lease_ms;
        g.down = vec![node("l2"), node("l3")];
        for _ in 0..(lease_ms / 100 + 5) {
            g.tick(100);
            g.settle();
        }
        assert!(!g.get("l1").has_lease(g.clocks()));
        g.wall_step_ms = -10 * lease_ms as i64;
        assert_eq!(
            g.get("l1").has_lease(g.clocks()),
            bug,
            "bug switch {bug}: a backward wall-clock step"
        );
    }
}

/// A follower's staleness is measured on the leader's clock, estimated on
/// the follower's monotonic one: a step of the follower's own wall clock
/// changes nothing, and staleness grows while it hears nothing.
#[test]
fn a_followers_staleness_ignores_its_own_wall_clock() {
    let mut g = Group::new();
    g.settle();
    g.tick(100);
    g.settle();
    let fresh = g.get("l2").staleness_ms(g.clocks()).unwrap();
    assert!(fresh <= 100, "{fresh}");
    g.wall_step_ms = -5_000;
    assert_eq!(g.get("l2").staleness_ms(g.clocks()), Some(fresh));
    // Cut off from the leader, l2 ages on its monotonic clock.
    g.down = vec![node("l2")];
    g.tick(3_000);
    let aged = g.get("l2").staleness_ms(g.clocks()).unwrap();
    assert_eq!(aged, fresh + 3_000);
}

/// A follower whose disk was replaced comes back recovering: the leader,
/// seeing acks of another life, stops believing what the old life held
/// (its lag is no longer 0) and sends everything again; the follower says
/// it caught up once it holds what was committed when it came back.
#[test]
fn a_follower_with_a_replaced_disk_is_noticed_and_caught_up() {
    let mut g = Group::new();
    for i in 0..20 {
        g.propose(&format!("before-{i}"));
    }
    g.settle();
    let last = g.get("l1").last_index();
    assert_eq!(g.committed("l2"), last);

    // l2's disk is replaced: a new life with nothing, recovering.
    let members: Vec<Member> = ["l1", "l2", "l3"]
        .iter()
        .map(|n| Member {
            node: node(n),
            local: true,
            voter: true,
        })
        .chain([Member {
            node: node("r1"),
            local: false,
            voter: true,
        }])
        .collect();
    g.tick(10);
    let fresh = Replica::new(
        Config::new(ShardId(7), node("l2")),
        members,
        Recovered {
            recovering: true,
            ..Recovered::default()
        },
        g.clocks(),
    );
    g.replicas.insert(node("l2"), fresh);
    g.disk.remove(&node("l2"));
    g.unsynced.remove(&node("l2"));
    g.committed.remove(&node("l2"));
    g.replica("l2").become_follower(Generation(1), node("l1"));
    assert!(g.get("l2").status(g.clocks()).recovering);

    g.tick(100);
    g.settle();
    for _ in 0..5 {
        g.tick(600);
        g.settle();
    }
    assert_eq!(g.committed("l2"), last, "l2 never got its log back");
    assert!(!g.get("l2").status(g.clocks()).recovering);
    assert_eq!(g.caught_up, vec![node("l2")]);
    let status = g.get("l1").status(g.clocks());
    let l2 = status
        .followers
        .iter()
        .find(|f| f.node == node("l2"))
        .unwrap();
    assert_eq!(l2.match_index, last);
}

/// A group with 3-byte snapshot chunks whose remote follower r1 missed
/// ten entries the leader has compacted away: r1 needs a snapshot. Returns
/// the group and the compaction point.
fn r1_behind_the_compaction_point() -> (Group, LogIndex) {
    let mut g = Group::with_config(|c| {
        c.retained_entries_max = 2;
        c.snapshot_chunk_bytes_max = 3;
    });
    g.settle();
    g.down.push(node("r1"));
    for i in 0..10 {
        g.propose(&format!("w{i}"));
    }
    g.settle();
    let commit = g.get("l1").commit_index();
    g.replica("l1").compact(commit);
    g.down.clear();
    (g, commit)
}

/// A snapshot goes in chunks no larger than `snapshot_chunk_bytes_max`,
/// one at a time; nothing is installed before the last byte arrives; a
/// lost chunk is sent again from where the follower stands, not from the
/// start.
#[test]
fn a_snapshot_streams_in_chunks_and_resumes_after_a_loss() {
    let (mut g, commit) = r1_behind_the_compaction_point();
    g.tick(600);
    g.settle();
    assert_eq!(g.snapshots_needed, vec![(node("l1"), node("r1"))]);
    let meta = g.get("l1").compacted();
    let state = b"a state of 10".to_vec();
    let now = g.clocks();
    g.replica("l1")
        .send_snapshot(now, &node("r1"), meta, state.clone());
    g.run_effects();
    let chunks: Vec<(u64, usize)> = g
        .network
        .iter()
        .filter_map(|(_, to, m)| match m {
            Message::InstallSnapshot(s) if *to == node("r1") => Some((s.offset, s.data.len())),
            _ => None,
        })
        .collect();
    assert_eq!(chunks, vec![(0, 3)], "one chunk at a time, at most 3 bytes");
    // Two chunks arrive; the third is lost with r1's link.
    g.deliver_to("r1");
    g.run_effects();
    g.deliver_to("l1");
    g.run_effects();
    g.deliver_to("r1");
    g.run_effects();
    assert!(
        g.snapshots_installed.is_empty(),
        "installed from part of a snapshot"
    );
    g.down.push(node("r1"));
    g.deliver_to("l1");
    g.run_effects();
    g.settle();
    g.down.clear();
    // The leader resumes at byte 6 after the retransmit timeout.
    g.tick(600);
    g.run_effects();
    let resumed: Vec<u64> = g
        .network
        .iter()
        .filter_map(|(_, to, m)| match m {
            Message::InstallSnapshot(s) if *to == node("r1") => Some(s.offset),
            _ => None,
        })
        .collect();
    assert_eq!(resumed, vec![6]);
    g.settle();
    assert_eq!(g.snapshots_installed, vec![(node("r1"), commit)]);
    let index = g.propose("after");
    g.settle();
    assert_eq!(g.committed("r1"), index);
}

/// Found by the swarm sweep (a 3-region seed): a leader that started a
/// second snapshot for a follower sent its chunks while a chunk of the
/// first was still on the wire. The late chunk made the follower drop the
/// second snapshot's progress, and the leader, ignoring an ack that went
/// backwards, resent from bytes the follower no longer had, forever.
#[test]
fn a_late_chunk_of_an_earlier_snapshot_does_not_stall_the_newer_one() {
    let (mut g, _) = r1_behind_the_compaction_point();

    let chunks_to_r1 = |g: &mut Group| -> Vec<(u64, LogIndex)> {
        g.network
            .iter()
            .filter_map(|(_, to, m)| match m {
                Message::InstallSnapshot(s) if *to == node("r1") => {
                    Some((s.offset, s.meta.last_index))
                }
                _ => None,
            })
            .collect()
    };
    // The first snapshot: its first chunk arrives, its second is held back.
    let first = g.get("l1").compacted();
    let now = g.clocks();
    g.replica("l1")
        .send_snapshot(now, &node("r1"), first, b"first state".to_vec());
    g.run_effects();
    g.deliver_to("r1");
    g.deliver_to("l1");
    assert_eq!(chunks_to_r1(&mut g), vec![(3, first.last_index)]);
    let late = g
        .network
        .pop_front()
        .expect("the first snapshot's second chunk");

    // The leader moves on to a newer snapshot for r1 (as when it asks
    // again after a lost message), and r1 receives its first chunk.
    for i in 0..3 {
        g.propose(&format!("x{i}"));
    }
    g.down.push(node("r1"));
    g.settle();
    g.down.clear();
    let commit = g.get("l1").commit_index();
    g.replica("l1").compact(commit);
    let second = g.get("l1").compacted();
    assert!(second.last_index > first.last_index);
    let now = g.clocks();
    g.replica("l1")
        .send_snapshot(now, &node("r1"), second, b"second state".to_vec());
    g.run_effects();
    g.network.retain(|(_, to, _)| *to == node("r1"));
    g.deliver_to("r1");
    g.deliver_to("l1");
    assert_eq!(chunks_to_r1(&mut g), vec![(3, second.last_index)]);

    // The first snapshot's late chunk arrives before the second's.
    g.network.push_front(late);
    g.deliver_to("r1");
    g.settle();
    for _ in 0..20 {
        g.tick(600);
        g.settle();
    }
    assert_eq!(g.snapshots_installed, vec![(node("r1"), second.last_index)]);
    let index = g.propose("after");
    g.settle();
    assert_eq!(g.committed("r1"), index);
}

/// Members as the metadata plane would publish them: `(name, local, voter)`.
fn members_of(list: &[(&str, bool, bool)]) -> Vec<Member> {
    list.iter()
        .map(|(n, local, voter)| Member {
            node: node(n),
            local: *local,
            voter: *voter,
        })
        .collect()
}

/// A replica added to a running group (l4, empty, as a learner) is sent
/// the log, catches up by snapshot and log, and counts for nothing until
/// it is made a voter; a voter made a learner (l2, on its way out) stops
/// counting; the leader refuses a membership that takes its own vote or
/// breaks the commit rule, and nothing changes then.
#[test]
fn learners_catch_up_without_counting_and_count_once_made_voters() {
    let mut g = Group::with_config(|c| c.retained_entries_max = 2);
    for i in 0..10 {
        g.propose(&format!("before-{i}"));
    }
    g.settle();
    let commit = g.get("l1").commit_index();
    g.replica("l1").compact(commit);

    // l4 starts empty and recovering, told of the generation and leader.
    let with_learner = members_of(&[
        ("l1", true, true),
        ("l2", true, true),
        ("l3", true, true),
        ("l4", true, false),
        ("r1", false, true),
    ]);
    let fresh = Replica::new(
        Config::new(ShardId(7), node("l4")),
        with_learner.clone(),
        Recovered {
            recovering: true,
            ..Recovered::default()
        },
        g.clocks(),
    );
    g.replicas.insert(node("l4"), fresh);
    g.replica("l4").become_follower(Generation(1), node("l1"));
    let now = g.clocks();
    for name in ["l1", "l2", "l3", "r1"] {
        g.replica(name)
            .set_members(now, with_learner.clone())
            .unwrap();
    }

    // With l2 and l3 down, the learner's acks commit nothing.
    g.down = vec![node("l2"), node("l3")];
    let index = g.propose("while-l4-learns");
    g.tick(600);
    g.settle();
    assert!(g.snapshots_needed.contains(&(node("l1"), node("l4"))));
    let meta = g.get("l1").compacted();
    let now = g.clocks();
    g.replica("l1")
        .send_snapshot(now, &node("l4"), meta, b"state".to_vec());
    g.run_effects();
    g.settle();
    g.tick(600);
    g.settle();
    let status = g.get("l1").status(g.clocks());
    let l4 = status
        .followers
        .iter()
        .find(|f| f.node == node("l4"))
        .unwrap();
    assert!(!l4.voter);
    assert_eq!(l4.match_index, index, "the learner holds the log");
    assert!(
        g.committed("l1") < index,
        "a learner's ack committed an entry"
    );
    // l2's and l3's last acks run out; l4's keep coming and grant nothing.
    for _ in 0..4 {
        g.tick(600);
        g.settle();
    }
    assert!(
        !g.get("l1").has_lease(g.clocks()),
        "a learner's acks grant a lease"
    );

    // Made a voter, l4 counts: the entry commits with l2 and l3 still down.
    let with_voter: Vec<Member> = (with_learner.iter().cloned())
        .map(|mut m| {
            m.voter = true;
            m
        })
        .collect();
    let now = g.clocks();
    g.replica("l1")
        .set_members(now, with_voter.clone())
        .unwrap();
    g.tick(100);
    g.settle();
    assert_eq!(g.committed("l1"), index);
    assert!(g.get("l1").has_lease(g.clocks()));

    // l2 on its way out (a learner), then gone; with l3 down too, only
    // l4 commits.
    let l2_leaving: Vec<Member> = (with_voter.iter().cloned())
        .map(|mut m| {
            m.voter &= m.node != node("l2");
            m
        })
        .collect();
    let now = g.clocks();
    g.replica("l1")
        .set_members(now, l2_leaving.clone())
        .unwrap();
    let without_l2: Vec<Member> = (l2_leaving.iter())
        .filter(|m| m.node != node("l2"))
        .cloned()
        .collect();
    g.replica("l1")
        .set_members(now, without_l2.clone())
        .unwrap();
    g.down = vec![node("l3")];
    let after = g.propose("after-l2-left");
    g.settle();
    assert_eq!(g.committed("l1"), after);
    let status = g.get("l1").status(g.clocks());
    assert!(status.followers.iter().all(|f| f.node != node("l2")));

    // The leader keeps its vote, and the commit rule holds.
    let leader_learner: Vec<Member> = (without_l2.iter().cloned())
        .map(|mut m| {
            m.voter &= m.node != node("l1");
            m
        })
        .collect();
    let now = g.clocks();
    assert!(g.replica("l1").set_members(now, leader_learner).is_err());
    let no_local_voter =
        members_of(&[("l1", true, true), ("l3", true, false), ("r1", false, true)]);
    assert!(g.replica("l1").set_members(now, no_local_voter).is_err());
    assert_eq!(g.get("l1").members(), &without_l2[..]);
}

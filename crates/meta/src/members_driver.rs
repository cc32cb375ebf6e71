//! The control loop's driver of membership changes (the steps and rules
//! are in `membership.rs`): it commits each step in the metadata plane,
//! tells every replica of the group the membership the map then holds,
//! and decides from the replicas' statuses when the next step is safe.
//!
//! - Add N: commit N as a learner; the node opens an empty replica when
//!   told, which catches up from the leader (snapshot, then log). Once N
//!   holds the new membership, is no longer recovering and the leader
//!   (holding the same membership) reports N holding the commit index it
//!   reported at an earlier round (a learner never holds the commit index
//!   of the moment under a steady load), commit N as a voter: the failover planner asks N from then on, and
//!   only after that is the leader told to count it. A learner that does
//!   not catch up within `member_catch_up_ms` is removed again.
//! - Remove N: a learner is removed at once. A voter first leaves: the
//!   planner still asks it, the leader (told) stops counting its acks.
//!   Once the leader holds that membership, its commit index C then is
//!   held by as many voting home-region followers that stay as a commit
//!   needs (`sync_acks`), and a lease has
//!   passed since (no lease rests on N's acks any more), N is removed.
//!   While N leads, it is not removed: after `member_catch_up_ms` it votes
//!   again and the change fails (transfer its leadership first).
//!
//! A control loop that starts (a new metadata leader) takes over the
//! changes the map shows under way: a learner is driven to promotion, a
//! leaving member to removal, without a caller to answer.

use std::collections::BTreeMap;

use harbor_replication::{Member, Role};
use harbor_types::{Generation, LogIndex, NodeId, ShardId};
use harbor_wire::{Control, GroupStatus};
use serde::{Deserialize, Serialize};

use crate::control::{ControlCore, Order};
use crate::failover::Phase;
use crate::membership::MemberChange;
use crate::placement::ShardMap;

/// What a caller asks for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MembersGoal {
    Add(NodeId),
    Remove(NodeId),
}

impl MembersGoal {
    pub fn node(&self) -> &NodeId {
        match self {
            MembersGoal::Add(n) | MembersGoal::Remove(n) => n,
        }
    }
}

/// A finished membership change.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MembersDone {
    pub shard: ShardId,
    pub goal: MembersGoal,
    /// The group's voters afterwards.
    pub members: Vec<NodeId>,
    pub members_epoch: u64,
    pub took_ms: u64,
}

/// Why a membership change did not happen.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MembersFailed {
    /// Nothing was committed: it does not fit the group as it is.
    Refused(String),
    /// Steps were committed, then it was undone (a learner that did not
    /// catch up, a leaving member that leads): the group is as before.
    Abandoned(String),
}

/// Why a membership step is not known to have committed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StepFailed {
    /// The metadata plane refused it, and the map does not show it.
    Refused(String),
    /// No answer, and no map to tell: it may have committed, or may yet.
    /// The step is sent again (a copy of a step that did commit is
    /// refused, and the map read then shows it).
    Unanswered(String),
}

/// Each group's membership as the map last said, and the changes under way.
#[derive(Debug, Default)]
pub(crate) struct MemberChanges {
    groups: BTreeMap<ShardId, Known>,
    pending: BTreeMap<ShardId, Pending>,
    /// Nodes a group removed, told of it again every round until the time
    /// given (one that missed the order would keep its replica running
    /// until it restarts).
    removed: BTreeMap<(ShardId, NodeId), u64>,
}

#[derive(Debug, Clone)]
struct Known {
    epoch: u64,
    members: Vec<Member>,
    learners: Vec<NodeId>,
}

#[derive(Debug)]
struct Pending {
    goal: MembersGoal,
    /// `None`: taken over from the map, nobody waits for it.
    ticket: Option<u64>,
    started_ms: u64,
    step: Step,
    /// Why it failed, once it is being undone.
    failed: Option<String>,
    /// A step of it committed: a refused step is retried, not the end.
    committed: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Step {
    /// This change is with the metadata plane.
    Committing(MemberChange),
    /// The metadata plane refused or did not answer it: sent again next
    /// round.
    Retry(MemberChange),
    /// The learner is catching up; the leader's commit index as a round
    /// saw it, in its generation: the learner is caught up once it holds
    /// it.
    CatchingUp {
        target: Option<(Generation, LogIndex)>,
    },
    /// The leader's commit index once it held the leaving membership, in
    /// its generation, and when that was seen.
    Leaving {
        covered: Option<(Generation, LogIndex, u64)>,
    },
}

impl MemberChanges {
    pub(crate) fn from_map(map: &ShardMap) -> MemberChanges {
        let mut changes = MemberChanges::default();
        for g in map.groups.values() {
            changes.groups.insert(g.shard, known(map, g.shard));
            let goal = match (g.learners.first(), g.leaving.first()) {
                (Some(n), _) => MembersGoal::Add(n.clone()),
                (None, Some(n)) => MembersGoal::Remove(n.clone()),
                (None, None) => continue,
            };
            let step = match goal {
                MembersGoal::Add(_) => Step::CatchingUp { target: None },
                MembersGoal::Remove(_) => Step::Leaving { covered: None },
            };
            let pending = Pending {
                goal,
                ticket: None,
                started_ms: 0,
                step,
                failed: None,
                committed: true,
            };
            changes.pending.insert(g.shard, pending);
        }
        changes
    }

    pub(crate) fn learners(&self, shard: ShardId) -> impl Iterator<Item = &NodeId> {
        self.groups
            .get(&shard)
            .into_iter()
            .flat_map(|k| &k.learners)
    }
}

fn known(map: &ShardMap, shard: ShardId) -> Known {
    let g = &map.groups[&shard];
    Known {
        epoch: g.members_epoch,
        members: map.replica_members(shard),
        learners: g.learners.clone(),
    }
}

impl ControlCore {
    /// Starts a membership change of `shard`, asked for with `ticket`
    /// (which its `MembersEnded` carries).
    pub fn change_members(
        &mut self,
        now_ms: u64,
        shard: ShardId,
        goal: MembersGoal,
        ticket: u64,
    ) -> Vec<Order> {
        let refused = |why: String| {
            vec![Order::MembersEnded {
                ticket,
                result: Err(MembersFailed::Refused(why)),
            }]
        };
        if let Some(pending) = self.members.pending.get_mut(&shard) {
            // A change taken over from the map has nobody to answer: the
            // caller whose answer was lost with the last metadata leader,
            // asking again, waits for it.
            if pending.ticket.is_none() && pending.goal == goal {
                pending.ticket = Some(ticket);
                return Vec::new();
            }
            return refused(format!("{shard} is in another membership change"));
        }
        let Some(plan) = self.plan(shard) else {
            return refused(format!("no group {shard}"));
        };
        if plan.phase != Phase::Active || self.transferring(shard) {
            return refused(format!(
                "{shard} is changing leaders; ask again when it is done"
            ));
        }
        let node = goal.node().clone();
        let first = match &goal {
            MembersGoal::Add(_) => MemberChange::AddLearner(node),
            MembersGoal::Remove(_) if node == plan.leader => {
                return refused(format!(
                    "{node} leads {shard}: transfer its leadership first"
                ))
            }
            MembersGoal::Remove(_) if self.members.learners(shard).any(|n| *n == node) => {
                MemberChange::Remove(node)
            }
            MembersGoal::Remove(_)
                if plan.members.iter().any(|(n, local)| *n == node && *local) =>
            {
                let left = (plan.members.iter())
                    .filter(|(n, local)| *local && *n != node)
                    .count();
                if left < self.config().sync_acks + 1 {
                    return refused(format!(
                        "{shard} would keep {left} voter(s) in its home region: a commit needs \
                         the leader and {} follower(s) there; add a replica first",
                        self.config().sync_acks
                    ));
                }
                MemberChange::BeginLeave(node)
            }
            MembersGoal::Remove(_) => MemberChange::BeginLeave(node),
        };
        tracing::info!(%shard, ?goal, "membership change");
        let pending = Pending {
            goal,
            ticket: Some(ticket),
            started_ms: now_ms,
            step: Step::Committing(first.clone()),
            failed: None,
            committed: false,
        };
        self.members.pending.insert(shard, pending);
        vec![Order::ChangeMembers {
            shard,
            change: first,
        }]
    }

    /// How a membership step went in the metadata plane (with the map
    /// after it): on success every replica of the group is told the new
    /// membership and the planner learns of it.
    pub fn members_changed(
        &mut self,
        now_ms: u64,
        shard: ShardId,
        change: &MemberChange,
        result: Result<&ShardMap, StepFailed>,
    ) -> Vec<Order> {
        let mut orders = Vec::new();
        let Some(pending) = self.members.pending.get_mut(&shard) else {
            return orders;
        };
        if pending.step != Step::Committing(change.clone()) {
            return orders;
        }
        let map = match result {
            Ok(map) => map,
            Err(StepFailed::Refused(why)) if !pending.committed => {
                // Nothing changed: the change is refused.
                tracing::warn!(%shard, ?change, %why, "the metadata plane refused a membership change");
                return self.end_members(now_ms, shard, Err(why));
            }
            Err(StepFailed::Unanswered(why)) => {
                tracing::warn!(%shard, ?change, %why, "the metadata plane did not answer a membership step; sending it again");
                pending.step = Step::Retry(change.clone());
                return orders;
            }
            Err(StepFailed::Refused(why)) => {
                // A later step the map does not take (a leaving member that
                // became leader cannot be removed): back to the step it
                // came from, whose checks and time limit decide again.
                tracing::warn!(%shard, ?change, %why, "the metadata plane refused a membership step; deciding again");
                let learner = self.members.learners(shard).any(|n| n == change.node());
                let pending = self.members.pending.get_mut(&shard).unwrap();
                pending.step = match learner {
                    true => Step::CatchingUp { target: None },
                    false => Step::Leaving { covered: None },
                };
                return orders;
            }
        };
        // The planner asks what the map names members from now on.
        let group = &map.groups[&shard];
        let voters: Vec<(NodeId, bool)> = (group.members.iter())
            .map(|n| (n.clone(), map.region_of(n) == Some(&group.home_region)))
            .collect();
        if let Some(plan) = self.plans_mut().get_mut(&shard) {
            plan.members = voters;
        }
        let before = self.members.groups.insert(shard, known(map, shard));
        let known = &self.members.groups[&shard];
        // Everyone who held or holds a replica hears it (a removed one
        // stops, and its node deletes its data).
        let mut told: Vec<NodeId> = known.members.iter().map(|m| m.node.clone()).collect();
        let gone = (before.into_iter().flat_map(|b| b.members))
            .map(|m| m.node)
            .filter(|n| !known.members.iter().any(|m| m.node == *n));
        let until = now_ms + self.config().member_catch_up_ms;
        for node in gone {
            self.members.removed.insert((shard, node.clone()), until);
            told.push(node);
        }
        (self.members.removed)
            .retain(|(s, n), _| *s != shard || !known.members.iter().any(|m| m.node == *n));
        told.sort();
        told.dedup();
        orders.extend(told.iter().map(|node| tell_members(shard, node, known)));
        let pending = self.members.pending.get_mut(&shard).unwrap();
        pending.committed = true;
        pending.step = match change {
            MemberChange::AddLearner(_) => Step::CatchingUp { target: None },
            MemberChange::BeginLeave(_) => Step::Leaving { covered: None },
            MemberChange::Promote(_) | MemberChange::Remove(_) | MemberChange::Stay(_) => {
                let result = match pending.failed.take() {
                    Some(why) => Err(why),
                    None => Ok(()),
                };
                orders.extend(self.end_members(now_ms, shard, result));
                return orders;
            }
        };
        orders
    }

    /// One round's look at a group's membership change.
    pub(crate) fn drive_members(
        &mut self,
        now_ms: u64,
        shard: ShardId,
        statuses: &[GroupStatus],
        orders: &mut Vec<Order>,
    ) {
        let pending = self.members.pending.contains_key(&shard);
        // Replicas that answer with an older membership are told it again
        // (a new leader that missed it would not send to a new member);
        // while a change is under way, so are those that do not answer
        // (a node that missed the order never opened its replica).
        let Some(known) = self.members.groups.get(&shard) else {
            return;
        };
        let epoch = known.epoch;
        let missed =
            (known.members.iter()).filter(|m| match statuses.iter().find(|s| s.node == m.node) {
                Some(s) => s.members_epoch < epoch,
                None => pending,
            });
        orders.extend(missed.map(|m| tell_members(shard, &m.node, known)));
        (self.members.removed).retain(|_, until| *until > now_ms);
        let removed = (self.members.removed.keys()).filter(|(s, _)| *s == shard);
        orders.extend(removed.map(|(_, node)| tell_members(shard, node, known)));
        let Some(pending) = self.members.pending.get_mut(&shard) else {
            return;
        };
        if pending.started_ms == 0 {
            pending.started_ms = now_ms; // taken over from the map
        }
        let plan = self.plan(shard).expect("a planned group").clone();
        let lease_wait = self.config().failover.lease_ms + self.config().failover.lease_margin_ms;
        let node = self.members.pending[&shard].goal.node().clone();
        let catch_up_ms = self.config().member_catch_up_ms;
        let sync_acks = self.config().sync_acks;
        let pending = self.members.pending.get_mut(&shard).unwrap();
        let timed_out = now_ms.saturating_sub(pending.started_ms) > catch_up_ms;
        let leader = statuses.iter().find(|s| {
            s.node == plan.leader
                && s.replica.role == Role::Leader
                && s.replica.generation == plan.generation
                && s.members_epoch >= epoch
        });
        let next = match pending.step.clone() {
            Step::Committing(_) => None,
            Step::Retry(_) if timed_out && !pending.committed => {
                // Not known to have started: given up (a copy that
                // commits late leaves a change the next metadata leader's
                // loop takes over from the map).
                let why =
                    format!("the metadata plane did not take the change within {catch_up_ms} ms");
                // It may have: answered as abandoned (retryable), not as
                // refused.
                pending.committed = true;
                orders.extend(self.end_members(now_ms, shard, Err(why)));
                return;
            }
            Step::Retry(change) => Some(change),
            Step::CatchingUp { .. } if timed_out => {
                pending.failed = Some(format!(
                    "{node} did not catch up with {shard} within {catch_up_ms} ms; removed again"
                ));
                Some(MemberChange::Remove(node.clone()))
            }
            Step::CatchingUp { target } => {
                // Holding what the leader had committed a round ago is
                // caught up: under a steady load a learner (a remote one
                // most of all) never holds the commit index of the moment.
                let learner_ready = statuses
                    .iter()
                    .any(|s| s.node == node && !s.replica.recovering && s.members_epoch >= epoch);
                let Some(l) = leader.filter(|_| learner_ready) else {
                    pending.step = Step::CatchingUp { target: None };
                    return;
                };
                let matched = (l.replica.followers.iter())
                    .find(|f| f.node == node)
                    .map(|f| f.match_index);
                // The target stays until reached (a learner further behind
                // than a round, a remote one on a slow link, gets there),
                // or until the generation changes.
                match target {
                    Some((generation, commit)) if generation == l.replica.generation => {
                        (matched >= Some(commit)).then(|| MemberChange::Promote(node.clone()))
                    }
                    _ => {
                        pending.step = Step::CatchingUp {
                            target: Some((l.replica.generation, l.replica.commit_index)),
                        };
                        None
                    }
                }
            }
            Step::Leaving { covered }
                if timed_out && (plan.leader == node || covered.is_none()) =>
            {
                pending.failed = Some(match plan.leader == node {
                    true => format!("{node} leads {shard}: it votes again; transfer its leadership first"),
                    false => format!("{shard}'s leader did not take the membership within {catch_up_ms} ms; {node} votes again"),
                });
                Some(MemberChange::Stay(node.clone()))
            }
            Step::Leaving { .. } if plan.leader == node => None,
            Step::Leaving { covered } => {
                let Some(l) = leader else { return };
                match covered {
                    Some((generation, commit, at)) if generation == plan.generation => {
                        // As many voting followers that stay as a commit
                        // needs hold it.
                        let holders = (l.replica.followers.iter())
                            .filter(|f| f.node != node && f.local && f.voter)
                            .filter(|f| f.match_index >= commit)
                            .count();
                        let held = holders >= sync_acks;
                        (held && now_ms >= at + lease_wait)
                            .then(|| MemberChange::Remove(node.clone()))
                    }
                    _ => {
                        pending.step = Step::Leaving {
                            covered: Some((plan.generation, l.replica.commit_index, now_ms)),
                        };
                        None
                    }
                }
            }
        };
        if let Some(change) = next {
            pending.step = Step::Committing(change.clone());
            orders.push(Order::ChangeMembers { shard, change });
        }
    }

    fn end_members(
        &mut self,
        now_ms: u64,
        shard: ShardId,
        result: Result<(), String>,
    ) -> Vec<Order> {
        let Some(pending) = self.members.pending.remove(&shard) else {
            return Vec::new();
        };
        let known = &self.members.groups[&shard];
        let committed = pending.committed;
        let result = result.map_err(|why| match committed {
            false => MembersFailed::Refused(why),
            true => MembersFailed::Abandoned(why),
        });
        let result = result.map(|()| MembersDone {
            shard,
            goal: pending.goal.clone(),
            members: (known.members.iter())
                .filter(|m| m.voter)
                .map(|m| m.node.clone())
                .collect(),
            members_epoch: known.epoch,
            took_ms: now_ms.saturating_sub(pending.started_ms),
        });
        tracing::info!(%shard, goal = ?pending.goal, ?result, "membership change ended");
        match pending.ticket {
            Some(ticket) => vec![Order::MembersEnded { ticket, result }],
            None => Vec::new(),
        }
    }
}

fn tell_members(shard: ShardId, node: &NodeId, known: &Known) -> Order {
    Order::Tell {
        node: node.clone(),
        shard,
        control: Control::Members {
            epoch: known.epoch,
            members: known.members.clone(),
        },
    }
}

#[cfg(test)]
mod tests {
    use harbor_replication::{FollowerStatus, ReplicaStatus};
    use harbor_types::Region;

    use super::*;
    use crate::control::{Ask, ControlConfig};
    use crate::placement::Topology;
    use crate::state::{MetaCommand, MetaReply, MetaState};

    const SHARD: ShardId = ShardId(0);

    /// One region of four nodes; group 0 has three of them, at generation 1.
    fn start() -> (ControlCore, MetaState) {
        let mut map = ShardMap::from_topology(&Topology {
            regions: vec![Region::new("madrid").unwrap()],
            nodes_per_region: 4,
            groups_per_region: 1,
            local_replicas: 3,
            remote_replicas: 0,
            buckets: 4,
        });
        map.groups.get_mut(&SHARD).unwrap().generation = Generation(1);
        let core = ControlCore::new(&map, ControlConfig::for_tests());
        let meta = MetaState {
            map: Some(map),
            ..MetaState::default()
        };
        (core, meta)
    }

    /// Carries out orders: commits membership steps in `meta`; returns the
    /// rest.
    fn run(
        core: &mut ControlCore,
        meta: &mut MetaState,
        now: u64,
        orders: Vec<Order>,
    ) -> Vec<Order> {
        let mut rest = Vec::new();
        let mut queue = std::collections::VecDeque::from(orders);
        while let Some(order) = queue.pop_front() {
            match order {
                Order::ChangeMembers { shard, change } => {
                    let reply = meta.apply(&MetaCommand::ChangeMembers {
                        shard,
                        change: change.clone(),
                    });
                    let result = match reply {
                        MetaReply::Map { .. } => Ok(meta.map.as_ref().unwrap()),
                        other => Err(StepFailed::Refused(format!("{other:?}"))),
                    };
                    queue.extend(core.members_changed(now, shard, &change, result));
                }
                other => rest.push(other),
            }
        }
        rest
    }

    fn n(name: &str) -> NodeId {
        NodeId::new(name).unwrap()
    }

    /// Every replica answers at `epoch`; the leader (madrid-1) sees each
    /// follower at `matched` and has committed `commit`.
    fn round(
        core: &mut ControlCore,
        meta: &mut MetaState,
        now: u64,
        epoch: u64,
        matched: &[(&str, u64, bool)],
        commit: u64,
    ) -> Vec<Order> {
        let answers = statuses(core, epoch, matched, commit);
        let orders = core.round(now, answers);
        run(core, meta, now, orders)
    }

    /// Every replica's answer, as `round` describes them.
    fn statuses(
        core: &ControlCore,
        epoch: u64,
        matched: &[(&str, u64, bool)],
        commit: u64,
    ) -> Vec<(Ask, Option<GroupStatus>)> {
        let asks: Vec<Ask> = core.asks();
        let answers = asks
            .into_iter()
            .map(|ask| {
                let leading = ask.node == n("madrid-1");
                let followers = match leading {
                    true => (matched.iter())
                        .map(|(node, at, voter)| FollowerStatus {
                            node: n(node),
                            local: true,
                            voter: *voter,
                            match_index: LogIndex(*at),
                            lag_entries: 0,
                            lag_ms: 0,
                            last_ack_ms_ago: Some(0),
                        })
                        .collect(),
                    false => Vec::new(),
                };
                let status = GroupStatus {
                    shard: SHARD,
                    node: ask.node.clone(),
                    replica: ReplicaStatus {
                        role: if leading {
                            Role::Leader
                        } else {
                            Role::Follower
                        },
                        generation: Generation(1),
                        leader: Some(n("madrid-1")),
                        last_index: LogIndex(commit),
                        last_generation: Generation(1),
                        durable_index: LogIndex(commit),
                        commit_index: LogIndex(commit),
                        followers,
                        closed: None,
                        acked_ms_ago: 10_000,
                        recovering: false,
                    },
                    ready: leading,
                    applied: None,
                    staleness_ms: Some(0),
                    issuers: 0,
                    changes_retained_bytes: 0,
                    members_epoch: epoch,
                };
                (ask, Some(status))
            })
            .collect();
        answers
    }

    fn ended(orders: &[Order]) -> Option<&Result<MembersDone, MembersFailed>> {
        orders.iter().find_map(|o| match o {
            Order::MembersEnded { result, .. } => Some(result),
            _ => None,
        })
    }

    #[test]
    fn a_replica_is_added_as_a_learner_and_promoted_once_it_holds_the_log() {
        let (mut core, mut meta) = start();
        let orders = core.change_members(0, SHARD, MembersGoal::Add(n("madrid-4")), 7);
        let told = run(&mut core, &mut meta, 0, orders);
        // Every replica, the new one too, hears epoch 1 with a learner.
        let heard: Vec<&NodeId> = (told.iter())
            .filter_map(|o| match o {
                Order::Tell {
                    node,
                    control:
                        Control::Members {
                            epoch: 1, members, ..
                        },
                    ..
                } if members.iter().any(|m| m.node == n("madrid-4") && !m.voter) => Some(node),
                _ => None,
            })
            .collect();
        assert_eq!(heard.len(), 4, "{told:?}");
        assert!(core.asks().iter().any(|a| a.node == n("madrid-4")));
        assert!(!core
            .plan(SHARD)
            .unwrap()
            .members
            .iter()
            .any(|(m, _)| *m == n("madrid-4")));
        // Behind the leader's commit index: not promoted.
        let behind = [
            ("madrid-2", 9, true),
            ("madrid-3", 9, true),
            ("madrid-4", 5, false),
        ];
        let orders = round(&mut core, &mut meta, 100, 1, &behind, 9);
        assert!(ended(&orders).is_none(), "{orders:?}");
        // Holding what the leader had committed at the last round (9),
        // though the leader has moved on: promoted, planner first, then
        // everyone told.
        let trailing = [
            ("madrid-2", 12, true),
            ("madrid-3", 12, true),
            ("madrid-4", 10, false),
        ];
        let orders = round(&mut core, &mut meta, 200, 1, &trailing, 12);
        let done = ended(&orders).expect("ended").clone().unwrap();
        assert_eq!(done.members.len(), 4);
        assert_eq!(done.members_epoch, 2);
        assert!(core
            .plan(SHARD)
            .unwrap()
            .members
            .iter()
            .any(|(m, _)| *m == n("madrid-4")));
    }

    /// The membership steps among `orders`.
    fn steps(orders: &[Order]) -> Vec<MemberChange> {
        orders
            .iter()
            .filter_map(|o| match o {
                Order::ChangeMembers { change, .. } => Some(change.clone()),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn an_unanswered_step_is_sent_again_and_a_first_one_never_answered_is_abandoned() {
        let (mut core, mut meta) = start();
        let add = MemberChange::AddLearner(n("madrid-4"));
        let orders = core.change_members(0, SHARD, MembersGoal::Add(n("madrid-4")), 1);
        assert_eq!(steps(&orders), vec![add.clone()]);
        let unanswered = || Err(StepFailed::Unanswered("no leader".into()));
        assert!(core
            .members_changed(0, SHARD, &add, unanswered())
            .is_empty());
        // Sent again next round (`round` commits it), and it goes through.
        let holding = [("madrid-2", 9, true), ("madrid-3", 9, true)];
        round(&mut core, &mut meta, 100, 0, &holding, 9);
        assert!(meta.map.as_ref().unwrap().groups[&SHARD]
            .learners
            .contains(&n("madrid-4")));

        // Another group's first step is never answered: abandoned (it may
        // have committed), not refused.
        let (mut core, mut meta) = start();
        core.change_members(0, SHARD, MembersGoal::Add(n("madrid-4")), 2);
        assert!(core
            .members_changed(0, SHARD, &add, unanswered())
            .is_empty());
        let mut now = 0;
        let ended = loop {
            now += 1_000;
            let holding = [("madrid-2", 9, true), ("madrid-3", 9, true)];
            let orders = core.round(now, statuses(&core, 0, &holding, 9));
            if let Some(result) = ended(&orders) {
                break result.clone();
            }
            for change in steps(&orders) {
                assert!(core
                    .members_changed(now, SHARD, &change, unanswered())
                    .is_empty());
            }
            assert!(now < 30_000, "never given up");
        };
        assert!(
            matches!(ended, Err(MembersFailed::Abandoned(_))),
            "{ended:?}"
        );
        assert!(meta.map.as_mut().unwrap().groups[&SHARD]
            .learners
            .is_empty());
    }

    #[test]
    fn a_caller_asking_again_waits_for_the_change_a_new_leader_took_over() {
        let (mut core, mut meta) = start();
        let orders = core.change_members(0, SHARD, MembersGoal::Add(n("madrid-4")), 1);
        run(&mut core, &mut meta, 0, orders);
        // The metadata leader changes: a new core takes over from the map.
        let map = meta.map.clone().unwrap();
        let mut core = ControlCore::new(&map, ControlConfig::for_tests());
        let other = core.change_members(10, SHARD, MembersGoal::Add(n("madrid-1")), 2);
        assert!(matches!(
            ended(&other),
            Some(Err(MembersFailed::Refused(_)))
        ));
        let again = core.change_members(10, SHARD, MembersGoal::Add(n("madrid-4")), 3);
        assert!(again.is_empty(), "{again:?}");
        let holding = [
            ("madrid-2", 9, true),
            ("madrid-3", 9, true),
            ("madrid-4", 9, false),
        ];
        round(&mut core, &mut meta, 100, 1, &holding, 9);
        let orders = round(&mut core, &mut meta, 200, 1, &holding, 9);
        let Some(Order::MembersEnded { ticket, result }) = orders
            .iter()
            .find(|o| matches!(o, Order::MembersEnded { .. }))
        else {
            panic!("not ended: {orders:?}");
        };
        assert_eq!(*ticket, 3);
        assert!(result.is_ok(), "{result:?}");
    }

    #[test]
    fn a_voter_leaves_once_the_voters_that_stay_hold_what_it_acknowledged() {
        let (mut core, mut meta) = start();
        let refused = core.change_members(0, SHARD, MembersGoal::Remove(n("madrid-1")), 1);
        assert!(
            matches!(ended(&refused), Some(Err(MembersFailed::Refused(why))) if why.contains("leads"))
        );
        let orders = core.change_members(0, SHARD, MembersGoal::Remove(n("madrid-2")), 2);
        run(&mut core, &mut meta, 0, orders);
        // Still asked in failover while it leaves.
        assert!(core
            .plan(SHARD)
            .unwrap()
            .members
            .iter()
            .any(|(m, _)| *m == n("madrid-2")));
        // The leader took epoch 1 with commit index 20; madrid-3 lacks it.
        let lacking = [("madrid-2", 20, false), ("madrid-3", 10, true)];
        let orders = round(&mut core, &mut meta, 100, 1, &lacking, 20);
        assert!(ended(&orders).is_none());
        let orders = round(&mut core, &mut meta, 1_000, 1, &lacking, 20);
        assert!(
            ended(&orders).is_none(),
            "removed before the voters that stay held its acks"
        );
        // madrid-3 holds it, but no lease has run out since the leader
        // stopped counting madrid-2 (seen at 100).
        let held = [("madrid-2", 20, false), ("madrid-3", 20, true)];
        let orders = round(&mut core, &mut meta, 2_000, 1, &held, 20);
        assert!(ended(&orders).is_none(), "removed within a lease");
        let orders = round(&mut core, &mut meta, 2_400, 1, &held, 20);
        let done = ended(&orders).expect("removed").clone().unwrap();
        assert_eq!(done.members, vec![n("madrid-1"), n("madrid-3")]);
        // The removed node hears it again each round for a while, in case
        // it missed it (its replica would run on until a restart).
        let told_removed = |orders: &[Order]| {
            orders.iter().any(|o| {
                matches!(o, Order::Tell { node, control: Control::Members { members, .. }, .. }
                    if *node == n("madrid-2") && !members.iter().any(|m| m.node == n("madrid-2")))
            })
        };
        let after = [("madrid-3", 20, true)];
        assert!(told_removed(&round(
            &mut core, &mut meta, 2_500, 3, &after, 20
        )));
        assert!(!told_removed(&round(
            &mut core, &mut meta, 20_000, 3, &after, 20
        )));
        assert!(!core
            .plan(SHARD)
            .unwrap()
            .members
            .iter()
            .any(|(m, _)| *m == n("madrid-2")));
        // Now a leader and one follower: neither may leave.
        let refused = core.change_members(6_000, SHARD, MembersGoal::Remove(n("madrid-3")), 3);
        assert!(matches!(
            ended(&refused),
            Some(Err(MembersFailed::Refused(why))) if why.contains("add a replica first")
        ));
    }
}

//! The control loop's decisions, without IO: the runtime (`harbor`'s
//! control loop, or the simulator) asks every replica for its status at the
//! interval [`ControlCore::interval_ms`] names, hands the answers to
//! [`ControlCore::round`], and executes the [`Order`]s that come back:
//! orders to replicas, leaders to publish in the metadata plane (reported
//! back with [`ControlCore::published`]) and transfers to answer.
//!
//! Rules it keeps:
//! - A new leader is published before anyone is told (gateways route by the
//!   map, and a replica told first would refuse as "not leader"); when the
//!   metadata plane cannot take it, it is published again every round and
//!   nobody is told in between.
//! - A seal is recorded in the metadata plane before anyone is told, the
//!   same way: every generation an order names is one the metadata plane
//!   holds, so a replica that lost its disk starts at the group's fence
//!   (`GroupInfo::fence`) and refuses any order older than it.
//! - A group whose publication is outstanding is not looked at again.
//! - Replicas that missed news are told again, but not in a round that just
//!   acted (their statuses predate the news).

use std::collections::{BTreeMap, BTreeSet};

use harbor_replication::Role;
use harbor_types::{Generation, LogIndex, NodeId, ShardId};
use harbor_wire::{Control, GroupStatus};
use serde::{Deserialize, Serialize};

use crate::failover::{Action, CatchUp, FailoverConfig, GroupLeadership, Observation, Phase};
use crate::placement::ShardMap;

/// The control loop's timings; defaults in `harbor_types::limits`.
#[derive(Clone, Copy, Debug)]
pub struct ControlConfig {
    pub failover: FailoverConfig,
    /// Between two rounds.
    pub interval_ms: u64,
    /// Between two rounds while a planned transfer is under way.
    pub transfer_interval_ms: u64,
    /// How long a round waits for a replica's status.
    pub status_timeout_ms: u64,
    /// ... for one on a node that did not answer the previous round.
    pub suspect_timeout_ms: u64,
    /// How long a replica being added may take to catch up.
    pub member_catch_up_ms: u64,
    /// The replicas' commit rule (local voting followers a commit needs):
    /// a membership change never leaves fewer.
    pub sync_acks: usize,
}

impl ControlConfig {
    /// Short timings for the control core's unit tests.
    #[cfg(test)]
    pub(crate) fn for_tests() -> ControlConfig {
        ControlConfig {
            failover: FailoverConfig {
                unreachable_after_ms: 500,
                lease_ms: 2_000,
                lease_margin_ms: 250,
                drain_ms: 1_000,
            },
            interval_ms: 100,
            transfer_interval_ms: 5,
            status_timeout_ms: 250,
            suspect_timeout_ms: 40,
            member_catch_up_ms: 10_000,
            sync_acks: 1,
        }
    }

    /// The defaults of `harbor_types::limits`, for replicas whose leases
    /// last `lease_ms`.
    pub fn new(lease_ms: u64) -> ControlConfig {
        use harbor_types::limits::{
            CONTROL_INTERVAL_MS, DRAIN_MS, LEASE_MARGIN_MS, STATUS_TIMEOUT_MS, SUSPECT_TIMEOUT_MS,
            TRANSFER_INTERVAL_MS, UNREACHABLE_AFTER_MS,
        };
        ControlConfig {
            failover: FailoverConfig {
                unreachable_after_ms: UNREACHABLE_AFTER_MS,
                lease_ms,
                lease_margin_ms: LEASE_MARGIN_MS,
                drain_ms: DRAIN_MS,
            },
            interval_ms: CONTROL_INTERVAL_MS,
            transfer_interval_ms: TRANSFER_INTERVAL_MS,
            status_timeout_ms: STATUS_TIMEOUT_MS,
            suspect_timeout_ms: SUSPECT_TIMEOUT_MS,
            member_catch_up_ms: harbor_types::limits::MEMBER_CATCH_UP_MS,
            sync_acks: harbor_types::limits::SYNC_ACKS,
        }
    }
}

/// One status to ask for in a round.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ask {
    pub shard: ShardId,
    pub node: NodeId,
    pub timeout_ms: u64,
}

/// What the runtime does for the core.
#[derive(Clone, Debug)]
pub enum Order {
    /// Send this order to the replica of `shard` on `node`. An order that
    /// does not arrive is sent again when the replica reports a stale role.
    Tell {
        node: NodeId,
        shard: ShardId,
        control: Control,
    },
    /// Publish `leader` of `generation` in the metadata plane; report the
    /// result with [`ControlCore::published`].
    Publish {
        shard: ShardId,
        leader: NodeId,
        generation: Generation,
        ended_at: Option<LogIndex>,
    },
    /// Record in the metadata plane that `shard`'s replicas are about to be
    /// sealed at `generation`; report the result with
    /// [`ControlCore::published`].
    RecordSeal {
        shard: ShardId,
        generation: Generation,
    },
    /// A planned transfer ended: answer its caller.
    TransferEnded {
        ticket: u64,
        result: Result<TransferDone, TransferFailed>,
    },
    /// Commit one step of a membership change in the metadata plane;
    /// report the result (and the map after it) with
    /// [`ControlCore::members_changed`].
    ChangeMembers {
        shard: ShardId,
        change: crate::membership::MemberChange,
    },
    /// A membership change ended: answer its caller.
    MembersEnded {
        ticket: u64,
        result: Result<crate::members_driver::MembersDone, crate::members_driver::MembersFailed>,
    },
}

/// A finished transfer: writes to the group paused for `pause_ms`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransferDone {
    pub shard: ShardId,
    pub from: NodeId,
    pub to: NodeId,
    pub generation: Generation,
    pub pause_ms: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TransferFailed {
    /// Not started: a bad target, or the group is changing leaders already.
    Refused(String),
    /// Started, then given up; the old leader still leads.
    Abandoned(String),
}

/// What the core decided so far, for tests and the simulator.
#[derive(Clone, Copy, Debug, Default)]
pub struct ControlStats {
    /// A leader replaced without a transfer.
    pub failovers: u64,
    pub transfers: u64,
    pub transfers_abandoned: u64,
    /// Publications the metadata plane refused (tried again next round).
    pub publish_failures: u64,
}

struct PendingTransfer {
    from: NodeId,
    started_ms: u64,
    ticket: u64,
}

pub struct ControlCore {
    config: ControlConfig,
    plans: BTreeMap<ShardId, GroupLeadership>,
    transfers: BTreeMap<ShardId, PendingTransfer>,
    /// Nodes with a replica that did not answer the previous round.
    suspects: BTreeSet<NodeId>,
    /// Leaders chosen, handed out to publish, not yet reported.
    publishing: BTreeMap<ShardId, Action>,
    /// Leaders the metadata plane did not take: published again every
    /// round, and nobody is told before.
    unpublished: BTreeMap<ShardId, Action>,
    /// A finished transfer's answer, held until its new leader is
    /// published: a caller answered finds the map naming it.
    transfer_answers: BTreeMap<ShardId, Order>,
    /// Replicas seen recovering lost state, so each is logged once as it
    /// starts and once as it is done.
    recovering: BTreeSet<(ShardId, NodeId)>,
    /// Membership changes under way, and each group's membership as the
    /// map last said (learners are asked for their status too).
    pub(crate) members: crate::members_driver::MemberChanges,
    stats: ControlStats,
}

impl ControlCore {
    /// Plans every group of `map` from what it publishes.
    pub fn new(map: &ShardMap, config: ControlConfig) -> ControlCore {
        config.failover.validate().expect("valid failover config");
        let plans = map
            .groups
            .values()
            .map(|g| {
                let members = g
                    .members
                    .iter()
                    .map(|m| (m.clone(), map.region_of(m) == Some(&g.home_region)))
                    .collect();
                (
                    g.shard,
                    GroupLeadership::new(g.shard, g.generation, g.leader.clone(), members),
                )
            })
            .collect();
        ControlCore {
            config,
            plans,
            transfers: BTreeMap::new(),
            suspects: BTreeSet::new(),
            publishing: BTreeMap::new(),
            unpublished: BTreeMap::new(),
            transfer_answers: BTreeMap::new(),
            recovering: BTreeSet::new(),
            members: crate::members_driver::MemberChanges::from_map(map),
            stats: ControlStats::default(),
        }
    }

    /// Until the next round: shorter while a transfer is under way.
    pub fn interval_ms(&self) -> u64 {
        if self.transfers.is_empty() {
            self.config.interval_ms
        } else {
            self.config.transfer_interval_ms
        }
    }

    pub fn plan(&self, shard: ShardId) -> Option<&GroupLeadership> {
        self.plans.get(&shard)
    }

    pub fn stats(&self) -> ControlStats {
        self.stats
    }

    /// Every replica of every group, asked at once: a round costs one
    /// status timeout at most, however many replicas are down.
    pub fn asks(&self) -> Vec<Ask> {
        self.plans
            .iter()
            .flat_map(|(shard, plan)| {
                let learners = self.members.learners(*shard);
                let nodes = plan.members.iter().map(|(node, _)| node).chain(learners);
                nodes.map(move |node| Ask {
                    shard: *shard,
                    node: node.clone(),
                    timeout_ms: if self.suspects.contains(node) {
                        self.config.suspect_timeout_ms
                    } else {
                        self.config.status_timeout_ms
                    },
                })
            })
            .collect()
    }

    /// What the last round could not publish, to publish again before
    /// asking for statuses.
    pub fn republish(&mut self) -> Vec<Order> {
        let mut orders = Vec::new();
        for (shard, action) in std::mem::take(&mut self.unpublished) {
            self.apply(shard, action, &mut orders);
        }
        orders
    }

    /// One round: the answers to [`ControlCore::asks`] (`None`: no answer
    /// in time) at `now_ms` (monotonic).
    pub fn round(&mut self, now_ms: u64, answers: Vec<(Ask, Option<GroupStatus>)>) -> Vec<Order> {
        let mut by_shard: BTreeMap<ShardId, Vec<GroupStatus>> = BTreeMap::new();
        self.suspects.clear();
        for (ask, status) in answers {
            if status.is_none() {
                self.suspects.insert(ask.node.clone());
            }
            by_shard.entry(ask.shard).or_default().extend(status);
        }
        let mut orders = Vec::new();
        for (shard, statuses) in by_shard {
            self.look_at(now_ms, shard, statuses, &mut orders);
        }
        orders
    }

    /// A planned transfer of `shard`'s leadership to `to`, asked for with
    /// `ticket` (which its `TransferEnded` carries).
    pub fn transfer(
        &mut self,
        now_ms: u64,
        shard: ShardId,
        to: &NodeId,
        ticket: u64,
    ) -> Vec<Order> {
        let refused = |why: String| {
            vec![Order::TransferEnded {
                ticket,
                result: Err(TransferFailed::Refused(why)),
            }]
        };
        let Some(plan) = self.plans.get_mut(&shard) else {
            return refused(format!("no group {shard}"));
        };
        let from = plan.leader.clone();
        match plan.transfer(&self.config.failover, now_ms, to) {
            Err(e) => refused(e.to_string()),
            Ok(action) => {
                tracing::info!(%shard, %from, %to, "leader transfer");
                let mut orders = Vec::new();
                let earlier = self.transfers.insert(
                    shard,
                    PendingTransfer {
                        from,
                        started_ms: now_ms,
                        ticket,
                    },
                );
                if let Some(earlier) = earlier {
                    // The planner took a new transfer, so the earlier one
                    // is over without a leader change.
                    orders.push(Order::TransferEnded {
                        ticket: earlier.ticket,
                        result: Err(TransferFailed::Abandoned(format!(
                            "a later transfer of {shard} replaced this one"
                        ))),
                    });
                }
                self.apply(shard, action, &mut orders);
                orders
            }
        }
    }

    /// How the publication of `shard`'s leader (or seal) went: on success
    /// the replicas are told; otherwise it is published again next round.
    pub fn published(&mut self, shard: ShardId, result: Result<(), String>) -> Vec<Order> {
        let Some(action) = self.publishing.remove(&shard) else {
            return Vec::new();
        };
        if let Err(e) = result {
            tracing::error!(%shard, ?action, error = %e, "the metadata plane did not take it; will retry");
            self.stats.publish_failures += 1;
            self.unpublished.insert(shard, action);
            return Vec::new();
        }
        let (generation, leader, lead) = match action {
            Action::Seal { generation, nodes } => {
                return nodes
                    .into_iter()
                    .map(|node| Order::Tell {
                        node,
                        shard,
                        control: Control::Seal(generation),
                    })
                    .collect();
            }
            Action::Lead {
                generation, leader, ..
            } => (generation, leader, Control::Lead(generation)),
            Action::StartNewGroup { generation, leader } => {
                (generation, leader, Control::LeadNewGroup(generation))
            }
            other => unreachable!("published {other:?}"),
        };
        let mut orders: Vec<Order> = (self.plans[&shard].members.iter())
            .map(|(member, _)| Order::Tell {
                node: member.clone(),
                shard,
                control: if *member == leader {
                    lead.clone()
                } else {
                    Control::Follow(generation, leader.clone())
                },
            })
            .collect();
        orders.extend(self.transfer_answers.remove(&shard));
        orders
    }

    /// One group's round: the planner's decision, then news for replicas
    /// that missed it.
    fn look_at(
        &mut self,
        now_ms: u64,
        shard: ShardId,
        statuses: Vec<GroupStatus>,
        orders: &mut Vec<Order>,
    ) {
        if self.unpublished.contains_key(&shard) || self.publishing.contains_key(&shard) {
            return;
        }
        // Learners are asked (to drive their catching up) but count for
        // nothing in the planner's decisions.
        let plan_members = &self.plans[&shard].members;
        let observations: Vec<Observation> = (statuses.iter())
            .filter(|s| plan_members.iter().any(|(n, _)| *n == s.node))
            .map(observation)
            .collect();
        for o in &observations {
            let key = (shard, o.node.clone());
            if o.recovering && self.recovering.insert(key.clone()) {
                tracing::warn!(
                    %shard, node = %o.node,
                    "replica lost its state and is catching up: it will not lead, and a failover \
                     of this group waits for it (or for the old leader) rather than risk an \
                     acknowledged write"
                );
            } else if !o.recovering && self.recovering.remove(&key) {
                tracing::info!(%shard, node = %o.node, "replica caught up after losing its state");
            }
        }
        let plan = self
            .plans
            .get_mut(&shard)
            .expect("asked about a group it plans");
        let before = plan.leader.clone();
        let transfer = matches!(
            plan.phase,
            Phase::Draining { .. }
                | Phase::Sealed {
                    prefer: Some(_),
                    ..
                }
        );
        let action = plan.observe(&self.config.failover, now_ms, &observations);
        match &action {
            Action::Lead {
                leader, generation, ..
            } if *leader != before => {
                if transfer {
                    self.stats.transfers += 1;
                } else {
                    self.stats.failovers += 1;
                    tracing::warn!(%shard, from = %before, to = %leader, %generation, "leader failed over");
                }
            }
            Action::TransferAbandoned { .. } => self.stats.transfers_abandoned += 1,
            _ => {}
        }
        self.transfer_ended(now_ms, shard, &action, orders);
        if !matches!(action, Action::None) {
            return self.apply(shard, action, orders);
        }
        for status in &statuses {
            let replica = &status.replica;
            let catch_up = self.plans[&shard].catch_up(
                &status.node,
                replica.generation,
                replica.role == Role::Leader,
                replica.leader.as_ref(),
                replica.recovering,
            );
            let control = match catch_up {
                CatchUp::Nothing => continue,
                CatchUp::Seal(generation) => Control::Seal(generation),
                CatchUp::Lead(generation) => Control::Lead(generation),
                CatchUp::Follow(generation, leader) => Control::Follow(generation, leader),
                CatchUp::NewGeneration => {
                    let action = self.plans.get_mut(&shard).unwrap().leader_restarted();
                    return self.apply(shard, action, orders);
                }
            };
            orders.push(Order::Tell {
                node: status.node.clone(),
                shard,
                control,
            });
        }
        self.drive_members(now_ms, shard, &statuses, orders);
    }

    pub(crate) fn config(&self) -> &ControlConfig {
        &self.config
    }

    pub(crate) fn plans_mut(&mut self) -> &mut BTreeMap<ShardId, GroupLeadership> {
        &mut self.plans
    }

    pub(crate) fn transferring(&self, shard: ShardId) -> bool {
        self.transfers.contains_key(&shard)
            || self.publishing.contains_key(&shard)
            || self.unpublished.contains_key(&shard)
    }

    /// Answers the caller of a transfer that just ended.
    fn transfer_ended(
        &mut self,
        now_ms: u64,
        shard: ShardId,
        action: &Action,
        orders: &mut Vec<Order>,
    ) {
        let (Action::Lead { .. } | Action::TransferAbandoned { .. }) = action else {
            return;
        };
        let Some(pending) = self.transfers.remove(&shard) else {
            return;
        };
        let result = match action {
            Action::Lead {
                leader, generation, ..
            } => {
                let done = TransferDone {
                    shard,
                    from: pending.from,
                    to: leader.clone(),
                    generation: *generation,
                    pause_ms: now_ms.saturating_sub(pending.started_ms),
                };
                tracing::info!(?done, "leader transfer done");
                Ok(done)
            }
            Action::TransferAbandoned { to } => Err(TransferFailed::Abandoned(format!(
                "{to} did not catch up with {from} within {drain} ms (or one of them stopped \
                 answering); {from} still leads {shard}",
                from = pending.from,
                drain = self.config.failover.drain_ms,
            ))),
            _ => unreachable!(),
        };
        let answer = Order::TransferEnded {
            ticket: pending.ticket,
            result,
        };
        match action {
            // Answered once the new leader is published (`published`).
            Action::Lead { .. } => {
                self.transfer_answers.insert(shard, answer);
            }
            _ => orders.push(answer),
        }
    }

    fn apply(&mut self, shard: ShardId, action: Action, orders: &mut Vec<Order>) {
        match action {
            Action::None | Action::TransferAbandoned { .. } => {}
            Action::Seal { generation, .. } => {
                orders.push(Order::RecordSeal { shard, generation });
                self.publishing.insert(shard, action);
            }
            Action::Drain { leader, for_ms } => orders.push(Order::Tell {
                node: leader,
                shard,
                control: Control::Drain { for_ms },
            }),
            Action::StartNewGroup {
                generation,
                ref leader,
            } => {
                tracing::warn!(
                    %shard, %leader, %generation,
                    "every replica of the group is empty: starting it as a new group"
                );
                orders.push(Order::Publish {
                    shard,
                    leader: leader.clone(),
                    generation,
                    ended_at: None,
                });
                self.publishing.insert(shard, action);
            }
            Action::Lead {
                generation,
                ref leader,
                ended_at,
            } => {
                orders.push(Order::Publish {
                    shard,
                    leader: leader.clone(),
                    generation,
                    ended_at,
                });
                self.publishing.insert(shard, action);
            }
        }
    }
}

/// What the planner reads from a replica's status: it answered, so it is
/// reachable and running (a stopped replica answers with an error).
fn observation(s: &GroupStatus) -> Observation {
    Observation {
        node: s.node.clone(),
        reachable: true,
        healthy: true,
        generation: s.replica.generation,
        leading: s.replica.role == Role::Leader,
        last_index: s.replica.last_index,
        last_generation: s.replica.last_generation,
        acked_ms_ago: s.replica.acked_ms_ago,
        recovering: s.replica.recovering,
    }
}

#[cfg(test)]
mod tests {
    use harbor_replication::ReplicaStatus;
    use harbor_types::{Region, Timestamp};

    use super::*;
    use crate::placement::Topology;

    const SHARD: ShardId = ShardId(0);

    /// One region, one group of three replicas at generation 1.
    fn core() -> (ControlCore, Vec<NodeId>) {
        let mut map = ShardMap::from_topology(&Topology {
            regions: vec![Region::new("madrid").unwrap()],
            nodes_per_region: 3,
            groups_per_region: 1,
            local_replicas: 3,
            remote_replicas: 0,
            buckets: 4,
        });
        let group = map.groups.get_mut(&SHARD).unwrap();
        group.generation = Generation(1);
        let members = group.members.clone();
        let config = ControlConfig::for_tests();
        (ControlCore::new(&map, config), members)
    }

    fn status(node: &NodeId, generation: u64, leader: Option<&NodeId>, last: u64) -> GroupStatus {
        let leading = leader == Some(node);
        GroupStatus {
            shard: SHARD,
            node: node.clone(),
            replica: ReplicaStatus {
                role: if leading {
                    Role::Leader
                } else {
                    Role::Follower
                },
                generation: Generation(generation),
                leader: leader.cloned(),
                last_index: LogIndex(last),
                last_generation: Generation(1),
                durable_index: LogIndex(last),
                commit_index: LogIndex(last),
                followers: Vec::new(),
                closed: None::<Timestamp>,
                // Long enough ago that no old lease rests on it.
                acked_ms_ago: 10_000,
                recovering: false,
            },
            ready: leading,
            members_epoch: 0,
            applied: None,
            staleness_ms: None,
            issuers: 0,
            changes_retained_bytes: 0,
        }
    }

    /// Answers every ask: `None` for the nodes in `silent`.
    fn answers(
        core: &ControlCore,
        f: impl Fn(&NodeId) -> Option<GroupStatus>,
    ) -> Vec<(Ask, Option<GroupStatus>)> {
        core.asks()
            .into_iter()
            .map(|ask| {
                let status = f(&ask.node);
                (ask, status)
            })
            .collect()
    }

    fn told(orders: &[Order]) -> Vec<(NodeId, Control)> {
        orders
            .iter()
            .filter_map(|o| match o {
                Order::Tell { node, control, .. } => Some((node.clone(), control.clone())),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_failed_over_leader_is_published_before_anyone_is_told_and_a_refused_publication_is_retried(
    ) {
        let (mut core, m) = core();
        let (old, a, b) = (&m[0], &m[1], &m[2]);
        // The leader stops answering; its followers still follow it.
        let mut publish = None;
        let mut sealed = false;
        let mut now = 0;
        while publish.is_none() {
            now += 100;
            assert!(now < 10_000, "no failover");
            // Once sealed, they follow nobody.
            let gen = core.plan(SHARD).unwrap().generation.0;
            let follows = (gen == 1).then_some(old);
            let round = answers(&core, |n| match n {
                n if n == old => None,
                n if n == a => Some(status(n, gen, follows, 10)),
                n => Some(status(n, gen, follows, 8)),
            });
            let mut orders = core.round(now, round);
            // A seal is recorded before anyone is told of it.
            if let [Order::RecordSeal { generation, .. }] = &orders[..] {
                assert_eq!(*generation, Generation(2));
                assert!(core.published(SHARD, Err("no leader".into())).is_empty());
                let again = core.republish();
                assert!(
                    matches!(&again[..], [Order::RecordSeal { .. }]),
                    "{again:?}"
                );
                orders = core.published(SHARD, Ok(()));
                assert_eq!(told(&orders).len(), 2, "the reachable replicas are sealed");
                sealed = true;
            }
            for order in &orders {
                match order {
                    Order::Publish { leader, .. } => publish = Some(leader.clone()),
                    Order::Tell { control, .. } => assert!(
                        matches!(control, Control::Seal(_)),
                        "told {control:?} before the new leader was published"
                    ),
                    Order::RecordSeal { .. }
                    | Order::TransferEnded { .. }
                    | Order::ChangeMembers { .. }
                    | Order::MembersEnded { .. } => unreachable!("{order:?}"),
                }
            }
        }
        assert!(sealed, "the generation was never sealed");
        // The longest log leads.
        assert_eq!(publish.as_ref(), Some(a));
        // The metadata plane refuses: nobody is told, and the group is not
        // looked at again until the publication goes through.
        assert!(core.published(SHARD, Err("no leader".into())).is_empty());
        assert_eq!(core.stats().publish_failures, 2);
        let round = answers(&core, |n| Some(status(n, 2, None, 10)));
        assert!(core.round(now + 100, round).is_empty());
        let again = core.republish();
        assert!(matches!(&again[..], [Order::Publish { leader, .. }] if leader == a));
        let orders = core.published(SHARD, Ok(()));
        let mut told = told(&orders);
        told.sort_by(|x, y| x.0.cmp(&y.0));
        let generation = core.plan(SHARD).unwrap().generation;
        assert_eq!(
            told,
            vec![
                (old.clone(), Control::Follow(generation, a.clone())),
                (a.clone(), Control::Lead(generation)),
                (b.clone(), Control::Follow(generation, a.clone())),
            ]
        );
        assert_eq!(core.stats().failovers, 1);
    }

    #[test]
    fn a_transfer_is_answered_once_its_new_leader_is_published() {
        let (mut core, m) = core();
        let (old, to) = (&m[0], &m[1]);
        let orders = core.transfer(0, SHARD, to, 7);
        assert!(
            !orders
                .iter()
                .any(|o| matches!(o, Order::TransferEnded { .. })),
            "{orders:?}"
        );
        let mut now = 0;
        let publish = loop {
            now += 100;
            assert!(now < 10_000, "the transfer never finished");
            let gen = core.plan(SHARD).unwrap().generation.0;
            let follows = (gen == 1).then_some(old);
            let round = answers(&core, |n| Some(status(n, gen, follows, 10)));
            let mut orders = core.round(now, round);
            if let [Order::RecordSeal { .. }] = &orders[..] {
                orders = core.published(SHARD, Ok(()));
            }
            assert!(
                !orders
                    .iter()
                    .any(|o| matches!(o, Order::TransferEnded { .. })),
                "answered before the new leader was published: {orders:?}"
            );
            if let Some(p) = orders.iter().find(|o| matches!(o, Order::Publish { .. })) {
                break p.clone();
            }
        };
        assert!(matches!(&publish, Order::Publish { leader, .. } if leader == to));
        // The metadata plane does not take it: still no answer.
        assert!(core.published(SHARD, Err("no leader".into())).is_empty());
        let again = core.republish();
        assert!(matches!(&again[..], [Order::Publish { .. }]), "{again:?}");
        let orders = core.published(SHARD, Ok(()));
        let answer = orders.iter().find_map(|o| match o {
            Order::TransferEnded { ticket: 7, result } => Some(result.clone()),
            _ => None,
        });
        assert!(
            matches!(&answer, Some(Ok(done)) if done.to == *to),
            "{orders:?}"
        );
    }

    #[test]
    fn a_replica_that_missed_news_is_told_again_and_a_restarted_leader_gets_a_new_generation() {
        let (mut core, m) = core();
        let (leader, b) = (&m[0], &m[2]);
        // `b` restarted and follows nobody; the leader is fine.
        let round = answers(&core, |n| match n {
            n if n == b => Some(status(n, 1, None, 5)),
            n => Some(status(n, 1, Some(leader), 5)),
        });
        let orders = core.round(100, round);
        assert_eq!(
            told(&orders),
            vec![(b.clone(), Control::Follow(Generation(1), leader.clone()))]
        );
        // The leader restarted: it reports its generation without leading
        // it, and must never continue it.
        let round = answers(&core, |n| match n {
            n if n == leader => Some(status(n, 1, None, 5)),
            n => Some(status(n, 1, Some(leader), 5)),
        });
        let orders = core.round(200, round);
        assert!(
            matches!(&orders[..], [Order::Publish { leader: l, generation, .. }] if l == leader && *generation == Generation(2)),
            "{orders:?}"
        );
    }
}

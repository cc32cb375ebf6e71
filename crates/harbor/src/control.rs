//! The embedded cluster's control loop: every `CONTROL_INTERVAL_MS` it asks
//! every replica for its status, feeds each group's failover planner
//! (`harbor_meta::failover`), publishes leadership changes in the shard map
//! and tells the replicas. Until the metadata plane runs on Raft this is the
//! single control-plane voter of `harbor dev`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use harbor_gateway::Gateway;
use harbor_meta::{Action, CatchUp, FailoverConfig, GroupLeadership, MetaStore, Observation};
use harbor_node::wire::{GroupStatus, Query, QueryResult, Request, Response};
use harbor_node::Control;
use harbor_replication::Role;
use harbor_types::{NodeId, ShardId};
use tokio::sync::watch;

use crate::dev::NodeSet;

/// How often the control loop looks at every group.
pub const CONTROL_INTERVAL_MS: u64 = 100;
/// A replica that does not answer a status request within this is
/// unreachable for this round.
const STATUS_TIMEOUT_MS: u64 = 250;
/// How long a leader may stay unreachable before its generation is sealed.
pub const UNREACHABLE_AFTER_MS: u64 = 500;
/// Added to the lease for clock drift between the old leader and us.
const LEASE_MARGIN_MS: u64 = 250;

pub struct ControlLoop {
    endpoint: Arc<Gateway>,
    meta: Arc<MetaStore>,
    nodes: Arc<NodeSet>,
    plans: BTreeMap<ShardId, GroupLeadership>,
    config: FailoverConfig,
    started: Instant,
}

impl ControlLoop {
    pub fn new(
        endpoint: Arc<Gateway>,
        meta: Arc<MetaStore>,
        nodes: Arc<NodeSet>,
        lease_ms: u64,
    ) -> ControlLoop {
        let map = meta.map();
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
        let config = FailoverConfig {
            unreachable_after_ms: UNREACHABLE_AFTER_MS,
            lease_ms,
            lease_margin_ms: LEASE_MARGIN_MS,
        };
        config.validate().expect("valid failover config");
        ControlLoop {
            endpoint,
            meta,
            nodes,
            plans,
            config,
            started: Instant::now(),
        }
    }

    pub async fn run(mut self, mut stop: watch::Receiver<bool>) {
        loop {
            tokio::select! {
                _ = stop.wait_for(|s| *s) => return,
                _ = tokio::time::sleep(Duration::from_millis(CONTROL_INTERVAL_MS)) => {}
            }
            // Ask every replica of every group at once: a round costs one
            // status timeout at most, however many replicas are down.
            let asks: Vec<(ShardId, NodeId)> = self
                .plans
                .iter()
                .flat_map(|(shard, plan)| {
                    plan.members.iter().map(move |(n, _)| (*shard, n.clone()))
                })
                .collect();
            let this = &self;
            let answers = futures::future::join_all(
                asks.iter()
                    .map(|(shard, node)| async move { (*shard, this.status(node, *shard).await) }),
            )
            .await;
            let mut by_shard: BTreeMap<ShardId, Vec<GroupStatus>> = BTreeMap::new();
            for (shard, status) in answers {
                by_shard.entry(shard).or_default().extend(status);
            }
            for (shard, statuses) in by_shard {
                self.look_at(shard, statuses);
            }
        }
    }

    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    async fn status(&self, node: &NodeId, shard: ShardId) -> Option<GroupStatus> {
        let request = Request::Read {
            shard,
            query: Query::Status,
        };
        match self
            .endpoint
            .call_node_within(node, request, STATUS_TIMEOUT_MS)
            .await
        {
            Ok(Response::Read {
                result: QueryResult::Status(status),
                ..
            }) => Some(status),
            _ => None,
        }
    }

    /// One group's round: the planner's decision, then news for replicas
    /// that missed it.
    fn look_at(&mut self, shard: ShardId, statuses: Vec<GroupStatus>) {
        let observations: Vec<Observation> = statuses
            .iter()
            .map(|s| Observation {
                node: s.node.clone(),
                reachable: true,
                healthy: true,
                generation: s.replica.generation,
                leading: s.replica.role == Role::Leader,
                last_index: s.replica.last_index,
                last_generation: s.replica.last_generation,
            })
            .collect();
        let now = self.now_ms();
        let plan = self.plans.get_mut(&shard).unwrap();
        let before = plan.leader.clone();
        let action = plan.observe(&self.config, now, &observations);
        if let Action::Lead {
            leader, generation, ..
        } = &action
        {
            if *leader != before {
                tracing::warn!(%shard, from = %before, to = %leader, %generation, "leader failed over");
            }
        }
        let acted = !matches!(action, Action::None);
        self.apply(shard, action);
        // Replicas that missed news (restarted, or away when it went out).
        // Not in a round that just acted: these statuses predate the news.
        if acted {
            return;
        }
        for status in &statuses {
            let replica = &status.replica;
            let leading = replica.role == Role::Leader;
            let plan = &self.plans[&shard];
            let control = match plan.catch_up(
                &status.node,
                replica.generation,
                leading,
                replica.leader.as_ref(),
            ) {
                CatchUp::Nothing => continue,
                CatchUp::Seal(generation) => Control::Seal(generation),
                CatchUp::Lead(generation) => Control::Lead {
                    generation,
                    reads_after_ms: plan.reads_wait_ms(&self.config, now),
                },
                CatchUp::Follow(generation, leader) => Control::Follow(generation, leader),
                CatchUp::NewGeneration => {
                    let action = self.plans.get_mut(&shard).unwrap().leader_restarted();
                    self.apply(shard, action);
                    return;
                }
            };
            self.nodes.control(&status.node, shard, control);
        }
    }

    fn apply(&mut self, shard: ShardId, action: Action) {
        match action {
            Action::None => {}
            Action::Seal { generation, nodes } => {
                for node in nodes {
                    self.nodes.control(&node, shard, Control::Seal(generation));
                }
            }
            Action::Lead {
                generation,
                leader,
                reads_after_ms,
            } => {
                // Publish first: gateways route by the map, and a replica
                // told before the map changes would refuse as "not leader".
                if let Err(e) = self.meta.update_group(shard, &leader, generation) {
                    tracing::error!(%shard, error = %e, "cannot publish the new leader");
                    return;
                }
                let members: Vec<NodeId> = self.plans[&shard]
                    .members
                    .iter()
                    .map(|(n, _)| n.clone())
                    .collect();
                for member in members {
                    let control = if member == leader {
                        Control::Lead {
                            generation,
                            reads_after_ms,
                        }
                    } else {
                        Control::Follow(generation, leader.clone())
                    };
                    self.nodes.control(&member, shard, control);
                }
            }
        }
    }
}

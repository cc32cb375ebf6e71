//! The control loop: every `CONTROL_INTERVAL_MS` it asks every replica for
//! its status, feeds each group's failover planner (`harbor_meta::failover`),
//! publishes leadership changes through the metadata plane, tells the
//! replicas, and runs planned transfers. `harbor dev` runs one in process;
//! in a deployment it runs on whichever voter leads the metadata plane.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use harbor_gateway::{AdminError, Gateway};
use harbor_meta::{Action, CatchUp, FailoverConfig, GroupLeadership, Metadata, Observation, Phase};
use harbor_replication::Role;
use harbor_types::{Generation, LogIndex, NodeId, ShardId};
use harbor_wire::Control;
use harbor_wire::{GroupStatus, Query, QueryResult, Request, Response};
use serde_json::Value;
use tokio::sync::{mpsc, oneshot, watch};

/// How the control loop reaches replicas with orders.
pub trait Replicas: Send + Sync {
    /// Tells one replica its role. An order that does not arrive (the node
    /// is down) is sent again when the replica reports a stale role.
    fn control(&self, node: &NodeId, shard: ShardId, control: Control);
}

/// Orders sent over the transport (a metadata process to node processes).
pub struct OverTheWire(pub Arc<Gateway>);

impl Replicas for OverTheWire {
    fn control(&self, node: &NodeId, shard: ShardId, control: Control) {
        self.0.send_control(node, shard, control);
    }
}

use harbor_types::limits::{
    CONTROL_INTERVAL_MS, DRAIN_MS, LEASE_MARGIN_MS, STATUS_TIMEOUT_MS, SUSPECT_TIMEOUT_MS,
    TRANSFER_INTERVAL_MS, UNREACHABLE_AFTER_MS,
};

/// A planned leader transfer asked for over the admin API.
pub struct TransferRequest {
    pub shard: ShardId,
    pub to: NodeId,
    pub reply: oneshot::Sender<Result<TransferDone, TransferFailed>>,
}

#[derive(Debug, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TransferFailed {
    /// Not started: a bad target, or the group is changing leaders already.
    Refused(String),
    /// Started, then given up; the old leader still leads.
    Abandoned(String),
}

/// A transfer's outcome as the admin API answers it.
pub fn transfer_answer(result: Result<TransferDone, TransferFailed>) -> Result<Value, AdminError> {
    match result {
        Ok(done) => Ok(serde_json::to_value(done).expect("serializes")),
        Err(TransferFailed::Refused(message)) => Err(AdminError::Refused {
            code: "transfer_refused",
            message,
        }),
        Err(TransferFailed::Abandoned(message)) => Err(AdminError::Unavailable {
            code: "transfer_abandoned",
            message,
        }),
    }
}

/// A finished transfer: writes to the group paused for `pause_ms`.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct TransferDone {
    pub shard: ShardId,
    pub from: NodeId,
    pub to: NodeId,
    pub generation: harbor_types::Generation,
    pub pause_ms: u64,
}

struct PendingTransfer {
    from: NodeId,
    started: Instant,
    reply: oneshot::Sender<Result<TransferDone, TransferFailed>>,
}

pub struct ControlLoop {
    endpoint: Arc<Gateway>,
    meta: Arc<dyn Metadata>,
    nodes: Arc<dyn Replicas>,
    plans: BTreeMap<ShardId, GroupLeadership>,
    config: FailoverConfig,
    started: Instant,
    requests: mpsc::Receiver<TransferRequest>,
    transfers: BTreeMap<ShardId, PendingTransfer>,
    /// Nodes with a replica that did not answer the previous round.
    suspects: BTreeSet<NodeId>,
    /// Leaders the planner chose that the metadata plane has not taken yet
    /// (it was unavailable): published again every round, and nobody is
    /// told before.
    unpublished: BTreeMap<ShardId, Action>,
    /// Replicas seen recovering lost state, so each is logged once as it
    /// starts and once as it is done.
    recovering: BTreeSet<(ShardId, NodeId)>,
}

impl ControlLoop {
    pub fn new(
        endpoint: Arc<Gateway>,
        meta: Arc<dyn Metadata>,
        nodes: Arc<dyn Replicas>,
        lease_ms: u64,
        requests: mpsc::Receiver<TransferRequest>,
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
            drain_ms: DRAIN_MS,
        };
        config.validate().expect("valid failover config");
        ControlLoop {
            endpoint,
            meta,
            nodes,
            plans,
            config,
            started: Instant::now(),
            requests,
            transfers: BTreeMap::new(),
            suspects: BTreeSet::new(),
            unpublished: BTreeMap::new(),
            recovering: BTreeSet::new(),
        }
    }

    /// Runs until `stop`; hands back the transfer requests' receiver (a
    /// metadata process gives it to its next term's loop).
    pub async fn run(mut self, mut stop: watch::Receiver<bool>) -> mpsc::Receiver<TransferRequest> {
        let mut round_started = Instant::now();
        loop {
            let interval = if self.transfers.is_empty() {
                CONTROL_INTERVAL_MS
            } else {
                TRANSFER_INTERVAL_MS
            };
            // A fixed cadence: a slow round shortens the next wait.
            let next_round = round_started + Duration::from_millis(interval);
            let request = tokio::select! {
                _ = stop.wait_for(|s| *s) => break,
                Some(request) = self.requests.recv() => Some(request),
                _ = tokio::time::sleep_until(next_round.into()) => None,
            };
            if let Some(request) = request {
                self.start_transfer(request).await;
                continue;
            }
            round_started = Instant::now();
            for (shard, action) in std::mem::take(&mut self.unpublished) {
                self.apply(shard, action).await;
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
            self.suspects.clear();
            for ((shard, status), (_, node)) in answers.into_iter().zip(&asks) {
                if status.is_none() {
                    self.suspects.insert(node.clone());
                }
                by_shard.entry(shard).or_default().extend(status);
            }
            for (shard, statuses) in by_shard {
                self.look_at(shard, statuses).await;
            }
        }
        self.requests
    }

    async fn start_transfer(&mut self, request: TransferRequest) {
        let now = self.now_ms();
        let Some(plan) = self.plans.get_mut(&request.shard) else {
            let _ = request.reply.send(Err(TransferFailed::Refused(format!(
                "no group {}",
                request.shard
            ))));
            return;
        };
        let from = plan.leader.clone();
        match plan.transfer(&self.config, now, &request.to) {
            Err(e) => {
                let _ = request
                    .reply
                    .send(Err(TransferFailed::Refused(e.to_string())));
            }
            Ok(action) => {
                tracing::info!(shard = %request.shard, %from, to = %request.to, "leader transfer");
                self.transfers.insert(
                    request.shard,
                    PendingTransfer {
                        from,
                        started: Instant::now(),
                        reply: request.reply,
                    },
                );
                self.apply(request.shard, action).await;
            }
        }
    }

    /// Answers the caller of a transfer that just ended.
    fn transfer_ended(&mut self, shard: ShardId, action: &Action) {
        let result = match action {
            Action::Lead {
                leader, generation, ..
            } => {
                let Some(pending) = self.transfers.remove(&shard) else {
                    return;
                };
                Ok((pending, leader.clone(), *generation))
            }
            Action::TransferAbandoned { to } => match self.transfers.remove(&shard) {
                Some(pending) => Err((pending, to.clone())),
                None => return,
            },
            _ => return,
        };
        match result {
            Ok((pending, leader, generation)) => {
                let done = TransferDone {
                    shard,
                    from: pending.from,
                    to: leader,
                    generation,
                    pause_ms: pending.started.elapsed().as_millis() as u64,
                };
                tracing::info!(?done, "leader transfer done");
                let _ = pending.reply.send(Ok(done));
            }
            Err((pending, to)) => {
                let _ = pending.reply.send(Err(TransferFailed::Abandoned(format!(
                    "{to} did not catch up with {} within {DRAIN_MS} ms (or one of them stopped \
                     answering); {} still leads {shard}",
                    pending.from, pending.from
                ))));
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
        let timeout_ms = if self.suspects.contains(node) {
            SUSPECT_TIMEOUT_MS
        } else {
            STATUS_TIMEOUT_MS
        };
        match self
            .endpoint
            .call_node_within(node, request, timeout_ms)
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
    async fn look_at(&mut self, shard: ShardId, statuses: Vec<GroupStatus>) {
        if self.unpublished.contains_key(&shard) {
            return;
        }
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
                acked_ms_ago: s.replica.acked_ms_ago,
                recovering: s.replica.recovering,
            })
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
        let now = self.now_ms();
        let plan = self.plans.get_mut(&shard).unwrap();
        let before = plan.leader.clone();
        let transfer = matches!(
            plan.phase,
            Phase::Draining { .. }
                | Phase::Sealed {
                    prefer: Some(_),
                    ..
                }
        );
        let action = plan.observe(&self.config, now, &observations);
        if let Action::Lead {
            leader, generation, ..
        } = &action
        {
            if *leader != before && !transfer {
                tracing::warn!(%shard, from = %before, to = %leader, %generation, "leader failed over");
            }
        }
        self.transfer_ended(shard, &action);
        let acted = !matches!(action, Action::None);
        self.apply(shard, action).await;
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
                replica.recovering,
            ) {
                CatchUp::Nothing => continue,
                CatchUp::Seal(generation) => Control::Seal(generation),
                CatchUp::Lead(generation) => Control::Lead(generation),
                CatchUp::Follow(generation, leader) => Control::Follow(generation, leader),
                CatchUp::NewGeneration => {
                    let action = self.plans.get_mut(&shard).unwrap().leader_restarted();
                    self.apply(shard, action).await;
                    return;
                }
            };
            self.nodes.control(&status.node, shard, control);
        }
    }

    async fn apply(&mut self, shard: ShardId, action: Action) {
        match action {
            Action::None => {}
            Action::Seal { generation, nodes } => {
                for node in nodes {
                    self.nodes.control(&node, shard, Control::Seal(generation));
                }
            }
            Action::Drain { leader, for_ms } => {
                self.nodes
                    .control(&leader, shard, Control::Drain { for_ms });
            }
            Action::TransferAbandoned { .. } => {}
            Action::StartNewGroup {
                generation,
                ref leader,
            } => {
                tracing::warn!(
                    %shard, %leader, %generation,
                    "every replica of the group is empty: starting it as a new group"
                );
                let lead = Control::LeadNewGroup(generation);
                self.name_leader(shard, generation, leader.clone(), None, lead, action)
                    .await;
            }
            Action::Lead {
                generation,
                ref leader,
                ended_at,
            } => {
                let lead = Control::Lead(generation);
                self.name_leader(shard, generation, leader.clone(), ended_at, lead, action)
                    .await;
            }
        }
    }

    /// Publishes `leader` of `generation` (gateways route by the map, and a
    /// replica told before the map changes would refuse as "not leader"),
    /// then tells the leader `lead` and everyone else to follow. When the
    /// metadata plane cannot take it, `action` is kept and published again
    /// every round, and nobody is told.
    async fn name_leader(
        &mut self,
        shard: ShardId,
        generation: Generation,
        leader: NodeId,
        ended_at: Option<LogIndex>,
        lead: Control,
        action: Action,
    ) {
        if let Err(e) = self
            .meta
            .update_group(shard, &leader, generation, ended_at)
            .await
        {
            tracing::error!(%shard, error = %e, "cannot publish the new leader; will retry");
            self.unpublished.insert(shard, action);
            return;
        }
        let members: Vec<NodeId> = self.plans[&shard]
            .members
            .iter()
            .map(|(n, _)| n.clone())
            .collect();
        for member in members {
            let control = if member == leader {
                lead.clone()
            } else {
                Control::Follow(generation, leader.clone())
            };
            self.nodes.control(&member, shard, control);
        }
    }
}

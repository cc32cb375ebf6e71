//! The control loop: the runtime of `harbor_meta::ControlCore`, which makes
//! every decision. Each round it asks every replica for its status (all at
//! once, each within its timeout), hands the answers to the core, and
//! executes its orders: publish a leader through the metadata plane, tell
//! replicas, commit membership steps, answer transfers and membership
//! changes. `harbor dev` runs one in process; in a
//! deployment it runs on whichever voter leads the metadata plane. The
//! simulator runs the same core.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use harbor_gateway::endpoint::Endpoint;
use harbor_gateway::AdminError;
use harbor_meta::{
    Ask, ControlConfig, ControlCore, MemberChange, MetaCommand, MetaError, MetaReply, Metadata,
    Order, ShardMap, StepFailed,
};
pub use harbor_meta::{MembersDone, MembersFailed, MembersGoal, TransferDone, TransferFailed};
use harbor_types::{NodeId, ShardId};
use harbor_wire::Control;
use harbor_wire::{GroupStatus, Query, QueryResult, Request, Response};
use tokio::sync::{mpsc, oneshot, watch};

/// How the control loop reaches replicas with orders.
pub trait Replicas: Send + Sync {
    /// Tells one replica its role. An order that does not arrive (the node
    /// is down) is sent again when the replica reports a stale role.
    fn control(&self, node: &NodeId, shard: ShardId, control: Control);
}

/// Orders sent over the transport (a metadata process to node processes).
pub struct OverTheWire(pub Arc<Endpoint>);

impl Replicas for OverTheWire {
    fn control(&self, node: &NodeId, shard: ShardId, control: Control) {
        self.0.send_control(node, shard, control);
    }
}

/// A planned leader transfer asked for over the admin API.
pub struct TransferRequest {
    pub shard: ShardId,
    pub to: NodeId,
    pub reply: oneshot::Sender<Result<TransferDone, TransferFailed>>,
}

/// A membership change asked for over the admin API.
pub struct MembersRequest {
    pub shard: ShardId,
    pub goal: MembersGoal,
    pub reply: oneshot::Sender<Result<MembersDone, MembersFailed>>,
}

/// What the admin API asks of the control loop.
pub enum ControlRequest {
    Transfer(TransferRequest),
    Members(MembersRequest),
}

/// A membership change's outcome as the admin API answers it.
pub fn members_answer(
    result: Result<MembersDone, MembersFailed>,
) -> Result<harbor_api::MembersChanged, AdminError> {
    match result {
        Ok(done) => Ok(harbor_api::MembersChanged {
            group: done.shard.to_string(),
            added: match &done.goal {
                MembersGoal::Add(n) => Some(n.to_string()),
                MembersGoal::Remove(_) => None,
            },
            removed: match &done.goal {
                MembersGoal::Remove(n) => Some(n.to_string()),
                MembersGoal::Add(_) => None,
            },
            members: done.members.iter().map(|n| n.to_string()).collect(),
            members_epoch: done.members_epoch,
            took_ms: done.took_ms,
        }),
        Err(MembersFailed::Refused(message)) => Err(AdminError::Refused {
            code: harbor_api::ErrorCode::MembersRefused,
            message,
        }),
        Err(MembersFailed::Abandoned(message)) => Err(AdminError::Unavailable {
            code: harbor_api::ErrorCode::MembersAbandoned,
            message,
        }),
    }
}

/// A transfer's outcome as the admin API answers it.
pub fn transfer_answer(
    result: Result<TransferDone, TransferFailed>,
) -> Result<harbor_api::Transfer, AdminError> {
    match result {
        Ok(done) => Ok(harbor_api::Transfer {
            shard: done.shard.0,
            from: done.from.to_string(),
            to: done.to.to_string(),
            generation: done.generation.0,
            pause_ms: done.pause_ms,
        }),
        Err(TransferFailed::Refused(message)) => Err(AdminError::Refused {
            code: harbor_api::ErrorCode::TransferRefused,
            message,
        }),
        Err(TransferFailed::Abandoned(message)) => Err(AdminError::Unavailable {
            code: harbor_api::ErrorCode::TransferAbandoned,
            message,
        }),
    }
}

/// Linearizable reads of the map after a membership step, and the pause
/// between them: about 5 s of a metadata plane electing a leader (past
/// that, the step is sent again next round).
const MAP_READ_BACK_ATTEMPTS: u32 = 10;
const MAP_READ_BACK_PAUSE_MS: u64 = 500;

pub struct ControlLoop {
    core: ControlCore,
    endpoint: Arc<Endpoint>,
    meta: Arc<dyn Metadata>,
    nodes: Arc<dyn Replicas>,
    started: Instant,
    requests: mpsc::Receiver<ControlRequest>,
    /// Callers of transfers under way, by ticket.
    waiting: BTreeMap<u64, oneshot::Sender<Result<TransferDone, TransferFailed>>>,
    /// Callers of membership changes under way, by ticket.
    members_waiting: BTreeMap<u64, oneshot::Sender<Result<MembersDone, MembersFailed>>>,
    next_ticket: u64,
}

impl ControlLoop {
    /// A loop that plans from `map`, which the caller read linearizably
    /// (`Metadata::map_linearizable`): a loop that starts from a map that
    /// trails the metadata plane would tell replicas of generations that
    /// are over.
    pub fn new(
        endpoint: Arc<Endpoint>,
        meta: Arc<dyn Metadata>,
        map: &harbor_meta::ShardMap,
        nodes: Arc<dyn Replicas>,
        lease_ms: u64,
        requests: mpsc::Receiver<ControlRequest>,
    ) -> ControlLoop {
        ControlLoop {
            core: ControlCore::new(map, ControlConfig::new(lease_ms)),
            endpoint,
            meta,
            nodes,
            started: Instant::now(),
            requests,
            waiting: BTreeMap::new(),
            members_waiting: BTreeMap::new(),
            next_ticket: 0,
        }
    }

    /// Runs until `stop`; hands back the admin requests' receiver (a
    /// metadata process gives it to its next term's loop).
    pub async fn run(mut self, mut stop: watch::Receiver<bool>) -> mpsc::Receiver<ControlRequest> {
        let mut round_started = Instant::now();
        loop {
            // A fixed cadence: a slow round shortens the next wait.
            let next_round = round_started + Duration::from_millis(self.core.interval_ms());
            let request = tokio::select! {
                _ = stop.wait_for(|s| *s) => break,
                Some(request) = self.requests.recv() => Some(request),
                _ = tokio::time::sleep_until(next_round.into()) => None,
            };
            if let Some(request) = request {
                self.next_ticket += 1;
                let ticket = self.next_ticket;
                let now = self.now_ms();
                let orders = match request {
                    ControlRequest::Transfer(r) => {
                        self.waiting.insert(ticket, r.reply);
                        self.core.transfer(now, r.shard, &r.to, ticket)
                    }
                    ControlRequest::Members(r) => {
                        self.members_waiting.insert(ticket, r.reply);
                        self.core.change_members(now, r.shard, r.goal, ticket)
                    }
                };
                self.execute(orders).await;
                continue;
            }
            round_started = Instant::now();
            let orders = self.core.republish();
            self.execute(orders).await;
            let asks = self.core.asks();
            let this = &self;
            let answers = futures::future::join_all(asks.into_iter().map(|ask| async move {
                let status = this.status(&ask).await;
                (ask, status)
            }))
            .await;
            let orders = self.core.round(self.now_ms(), answers);
            self.execute(orders).await;
        }
        self.requests
    }

    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// Executes the core's orders in order; a publication's result may
    /// bring more.
    async fn execute(&mut self, orders: Vec<Order>) {
        let mut queue = VecDeque::from(orders);
        while let Some(order) = queue.pop_front() {
            match order {
                Order::Tell {
                    node,
                    shard,
                    control,
                } => self.nodes.control(&node, shard, control),
                Order::Publish {
                    shard,
                    leader,
                    generation,
                    ended_at,
                } => {
                    let result = self
                        .meta
                        .update_group(shard, &leader, generation, ended_at)
                        .await
                        .map_err(|e| e.to_string());
                    queue.extend(self.core.published(shard, result));
                }
                Order::RecordSeal { shard, generation } => {
                    let result = self
                        .meta
                        .seal_group(shard, generation)
                        .await
                        .map_err(|e| e.to_string());
                    queue.extend(self.core.published(shard, result));
                }
                Order::TransferEnded { ticket, result } => {
                    if let Some(reply) = self.waiting.remove(&ticket) {
                        let _ = reply.send(result);
                    }
                }
                Order::ChangeMembers { shard, change } => {
                    let result = self.commit_members(shard, &change).await;
                    let now = self.now_ms();
                    let result = result.as_deref().map_err(Clone::clone);
                    queue.extend(self.core.members_changed(now, shard, &change, result));
                }
                Order::MembersEnded { ticket, result } => {
                    if let Some(reply) = self.members_waiting.remove(&ticket) {
                        let _ = reply.send(result);
                    }
                }
            }
        }
    }

    /// Commits one membership step and reads the map back (the core
    /// needs it). Whatever the metadata plane answered, the map, read
    /// linearizably, says whether the step is in: a commit that went
    /// unanswered may have happened, and a step sent again after one is
    /// refused though it is in.
    async fn commit_members(
        &self,
        shard: ShardId,
        change: &MemberChange,
    ) -> Result<Arc<ShardMap>, StepFailed> {
        let command = MetaCommand::ChangeMembers {
            shard,
            change: change.clone(),
        };
        let failed = match self.meta.write(command).await {
            Ok(MetaReply::Refused(why)) | Err(MetaError::Refused(why)) => {
                Some(StepFailed::Refused(why))
            }
            Ok(_) => None,
            Err(e @ MetaError::Unavailable(_)) => Some(StepFailed::Unanswered(e.to_string())),
        };
        for attempt in 0..MAP_READ_BACK_ATTEMPTS {
            if attempt > 0 {
                tokio::time::sleep(Duration::from_millis(MAP_READ_BACK_PAUSE_MS)).await;
            }
            match self.meta.map_linearizable().await {
                Ok(map) if failed.is_none() || change.shows_in(&map, shard) => return Ok(map),
                Ok(_) => return Err(failed.expect("a failure")),
                Err(e) => {
                    tracing::warn!(%shard, ?change, error = %e, "reading the map back after a membership step")
                }
            }
        }
        // Sent again next round.
        let why = "the map could not be read back after a membership step";
        tracing::error!(%shard, ?change, "{why}");
        Err(StepFailed::Unanswered(why.to_string()))
    }

    async fn status(&self, ask: &Ask) -> Option<GroupStatus> {
        let request = Request::Read {
            shard: ask.shard,
            query: Query::Status,
        };
        match self
            .endpoint
            .call_node_within(&ask.node, request, ask.timeout_ms)
            .await
        {
            Ok(Response::Read {
                result: QueryResult::Status(status),
                ..
            }) => Some(status),
            _ => None,
        }
    }
}

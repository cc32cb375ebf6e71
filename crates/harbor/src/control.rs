//! The control loop: the runtime of `harbor_meta::ControlCore`, which makes
//! every decision. Each round it asks every replica for its status (all at
//! once, each within its timeout), hands the answers to the core, and
//! executes its orders: publish a leader through the metadata plane, tell
//! replicas, answer transfers. `harbor dev` runs one in process; in a
//! deployment it runs on whichever voter leads the metadata plane. The
//! simulator runs the same core.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use harbor_gateway::endpoint::Endpoint;
use harbor_gateway::AdminError;
use harbor_meta::{Ask, ControlConfig, ControlCore, Metadata, Order};
pub use harbor_meta::{TransferDone, TransferFailed};
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

pub struct ControlLoop {
    core: ControlCore,
    endpoint: Arc<Endpoint>,
    meta: Arc<dyn Metadata>,
    nodes: Arc<dyn Replicas>,
    started: Instant,
    requests: mpsc::Receiver<TransferRequest>,
    /// Callers of transfers under way, by ticket.
    waiting: BTreeMap<u64, oneshot::Sender<Result<TransferDone, TransferFailed>>>,
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
        requests: mpsc::Receiver<TransferRequest>,
    ) -> ControlLoop {
        ControlLoop {
            core: ControlCore::new(map, ControlConfig::new(lease_ms)),
            endpoint,
            meta,
            nodes,
            started: Instant::now(),
            requests,
            waiting: BTreeMap::new(),
            next_ticket: 0,
        }
    }

    /// Runs until `stop`; hands back the transfer requests' receiver (a
    /// metadata process gives it to its next term's loop).
    pub async fn run(mut self, mut stop: watch::Receiver<bool>) -> mpsc::Receiver<TransferRequest> {
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
                self.waiting.insert(ticket, request.reply);
                let orders = self
                    .core
                    .transfer(self.now_ms(), request.shard, &request.to, ticket);
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
                // Membership changes are driven in the simulator only so
                // far: nothing here asks for one, and a change found under
                // way in the map is refused until the runtime commits them.
                Order::ChangeMembers { shard, change } => {
                    let why = "this runtime does not commit membership changes yet".to_string();
                    tracing::error!(%shard, ?change, "{why}");
                    let now = self.now_ms();
                    queue.extend(self.core.members_changed(now, shard, &change, Err(why)));
                }
                Order::MembersEnded { .. } => {}
            }
        }
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

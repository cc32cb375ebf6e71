use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use harbor_meta::Metadata;
use harbor_types::{Generation, NodeId, Region, ShardId};
use harbor_wire::{Body, Envelope, ErrorCode, ErrorKind, NodeError, Request, Response};
use harbor_wire::{Control, Sink, Transport};
use tokio::sync::oneshot;

use crate::admin::Admin;

/// How often a waiting request checks whether its group's leader moved.
const ROUTE_CHECK_INTERVAL: Duration = Duration::from_millis(50);
/// Leaders one request follows before it gives up.
const ROUTE_ATTEMPTS_MAX: usize = 32;
/// How long a request refused with `leadership_changed` waits for the map
/// to name the next leader before it asks the same one again.
const LEADERSHIP_WAIT_MAX: Duration = Duration::from_millis(200);
/// A leader silent for this long makes a waiting request refresh the map
/// (every `ROUTE_CHECK_INTERVAL` from then on).
const SILENT_LEADER: Duration = Duration::from_millis(300);
/// An unanswered request is sent again after this, then after twice as
/// long, and so on: TCP loses what was written to a connection whose peer
/// died. The copy keeps the request's id, so whichever answer comes first
/// is taken, and a slow link (a WAN round trip over a second) still gets
/// its answers.
const RESEND_AFTER: Duration = Duration::from_millis(1_000);
/// How long a request first waits before asking again a node that the map
/// names leader but that has not heard it yet (doubling on each refusal).
const NEWS_WAIT: Duration = Duration::from_millis(10);

/// Limits of one gateway.
#[derive(Clone, Debug)]
pub struct GatewayConfig {
    /// How long a request waits for its leader. Past it the outcome of a
    /// write is unknown: the client looks its token up or resolves it.
    pub request_timeout_ms: u64,
    /// Requests waiting for a node at once; more are refused (503).
    pub inflight_requests_max: usize,
    /// The largest request body.
    pub body_bytes_max: usize,
    /// The largest body of `POST /v1/reservations:batch`.
    pub batch_body_bytes_max: usize,
    /// How long a local read waits for the replica in this region (beyond
    /// a causal read's own wait) before it asks the leader.
    pub local_read_timeout_ms: u64,
    /// A local replica that did not answer a read is skipped this long, so
    /// a crashed one does not cost every read `local_read_timeout_ms`.
    pub silent_replica_skip_ms: u64,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig {
            request_timeout_ms: 5_000,
            inflight_requests_max: 100_000,
            body_bytes_max: 64 * 1024,
            batch_body_bytes_max: 4 << 20,
            local_read_timeout_ms: 500,
            silent_replica_skip_ms: 5_000,
        }
    }
}

/// A region's gateway: an endpoint on the transport plus the routing state.
pub struct Gateway {
    pub(crate) me: NodeId,
    pub(crate) region: Region,
    pub(crate) meta: Arc<dyn Metadata>,
    pub(crate) config: GatewayConfig,
    transport: Arc<dyn Transport>,
    pending: Mutex<HashMap<u64, oneshot::Sender<Response>>>,
    next_id: AtomicU64,
    admin: OnceLock<Arc<dyn Admin>>,
    pub(crate) metrics: crate::metrics::Metrics,
    /// Turns local reads take among a group's replicas in this region.
    pub(crate) local_turn: AtomicU64,
    /// Local replicas that did not answer a read, skipped until then.
    pub(crate) silent_replicas: Mutex<HashMap<NodeId, std::time::Instant>>,
}

impl Gateway {
    /// A gateway sending through `transport`; connect [`Gateway::sink`] to
    /// it for answers to arrive.
    pub fn start(
        me: NodeId,
        region: Region,
        meta: Arc<dyn Metadata>,
        transport: Arc<dyn Transport>,
        config: GatewayConfig,
    ) -> Arc<Gateway> {
        Arc::new(Gateway {
            me,
            region,
            meta,
            config,
            transport,
            pending: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            admin: OnceLock::new(),
            metrics: crate::metrics::Metrics::default(),
            local_turn: AtomicU64::new(0),
            silent_replicas: Mutex::new(HashMap::new()),
        })
    }

    /// Where the transport delivers this gateway's envelopes: an answer
    /// completes its waiting request on the sender's thread. A late answer
    /// after a timeout finds no one waiting and is dropped.
    pub fn sink(self: &Arc<Self>) -> Sink {
        let gateway = Arc::downgrade(self);
        Arc::new(move |envelope| {
            let Some(gateway) = gateway.upgrade() else {
                return false;
            };
            let Body::Response { id, response } = envelope.body else {
                return false;
            };
            let waiter = gateway.pending.lock().unwrap().remove(&id);
            if let Some(tx) = waiter {
                let _ = tx.send(*response);
            }
            true
        })
    }

    pub fn region(&self) -> &Region {
        &self.region
    }

    /// Connects the admin API to the control plane (once).
    pub fn set_admin(&self, admin: Arc<dyn Admin>) {
        if self.admin.set(admin).is_err() {
            panic!("gateway {}: admin hooks set twice", self.me);
        }
    }

    pub(crate) fn admin(&self) -> Option<&Arc<dyn Admin>> {
        self.admin.get()
    }

    /// The current leader of `shard` per the shard map.
    pub(crate) fn leader_of(&self, shard: ShardId) -> Option<NodeId> {
        self.meta.map().groups.get(&shard).map(|g| g.leader.clone())
    }

    /// The generation the shard map names for `shard`.
    fn generation_of(&self, shard: ShardId) -> Option<Generation> {
        self.meta.map().groups.get(&shard).map(|g| g.generation)
    }

    pub(crate) fn region_of(&self, node: &NodeId) -> Option<Region> {
        self.meta.map().region_of(node).cloned()
    }

    /// Sends `request` to its group's leader and waits for the answer,
    /// following the leader: on a not-leader answer with a hint, or when the
    /// shard map names a new leader while it waits, it sends the request
    /// again to the new one, and a copy to the same one when it has not
    /// answered within `RESEND_AFTER` (lost on a dead connection). A
    /// `leadership_changed`, `stale_route` or hintless `not_leader`
    /// refusal (a transfer or a failover under way) waits for the map to
    /// move, then sends again. That is safe for every request: reservations
    /// are deduplicated by their token, and confirm, release, resolve and
    /// issuer upserts are idempotent. An old leader whose generation was
    /// sealed can no longer commit anything.
    pub async fn call(&self, request: Request) -> Result<Response, NodeError> {
        let shard = request.shard();
        let is_write = matches!(request, Request::Write { .. });
        let deadline =
            tokio::time::Instant::now() + Duration::from_millis(self.config.request_timeout_ms);
        let Some(mut leader) = self.leader_of(shard) else {
            return Err(NodeError::new(
                ErrorKind::UnknownShard,
                format!("{shard} is not in the shard map"),
            ));
        };
        let mut news_wait = NEWS_WAIT;
        for _attempt in 0..ROUTE_ATTEMPTS_MAX {
            let route = self.generation_of(shard);
            let (id, mut rx) = self.send(&leader, request.clone(), route)?;
            let sent = tokio::time::Instant::now();
            let mut resend_at = sent + RESEND_AFTER;
            let mut resend_every = RESEND_AFTER;
            let answer = loop {
                tokio::select! {
                    answer = &mut rx => break answer.ok(),
                    _ = tokio::time::sleep(ROUTE_CHECK_INTERVAL) => {
                        if sent.elapsed() >= SILENT_LEADER {
                            // The leader may be gone: has the map moved?
                            let _ = self.meta.refresh().await;
                        }
                        let moved = self.leader_of(shard).filter(|l| *l != leader);
                        if moved.is_some() || tokio::time::Instant::now() >= deadline {
                            self.pending.lock().unwrap().remove(&id);
                            break None;
                        }
                        // A request sent on a connection that died (the peer
                        // restarted) is lost: send a copy (same id, same
                        // token).
                        if tokio::time::Instant::now() >= resend_at {
                            self.transmit(&leader, id, request.clone(), route);
                            resend_every *= 2;
                            resend_at = tokio::time::Instant::now() + resend_every;
                        }
                    }
                }
            };
            if tokio::time::Instant::now() >= deadline && answer.is_none() {
                break;
            }
            match answer {
                Some(Response::Error(NodeError {
                    kind: ErrorKind::NotLeader { hint: Some(hint) },
                    ..
                })) if hint != leader => {
                    leader = hint;
                }
                Some(Response::Error(e))
                    if matches!(
                        e.kind,
                        ErrorKind::NotLeader { .. }
                            | ErrorKind::LeadershipChanged { .. }
                            | ErrorKind::StaleRoute { .. }
                    ) =>
                {
                    // Leadership is moving (a transfer or failover): wait for
                    // the map to name the next leader, then send again. A
                    // node the map already names as leader has not heard the
                    // news yet: ask it again shortly. A stale route means
                    // our copy of the map trails the replica's: refresh it
                    // and send to whoever it names.
                    let wait = if e.code() == ErrorCode::NotLeader {
                        news_wait = (news_wait * 2).min(LEADERSHIP_WAIT_MAX);
                        news_wait / 2
                    } else {
                        e.retry_after_ms()
                            .map_or(LEADERSHIP_WAIT_MAX, Duration::from_millis)
                            .min(LEADERSHIP_WAIT_MAX)
                    };
                    if e.code() == ErrorCode::StaleRoute {
                        let _ = self.meta.refresh().await;
                    }
                    let until = (tokio::time::Instant::now() + wait).min(deadline);
                    while self.leader_of(shard).as_ref() == Some(&leader)
                        && self.generation_of(shard) == route
                        && tokio::time::Instant::now() < until
                    {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    if tokio::time::Instant::now() >= deadline {
                        return Ok(Response::Error(e));
                    }
                    match self.leader_of(shard) {
                        Some(next) => leader = next,
                        None => return Ok(Response::Error(e)),
                    }
                }
                Some(response) => return Ok(response),
                None => match self.leader_of(shard) {
                    Some(next) => leader = next,
                    None => break,
                },
            }
        }
        Err(NodeError::new(
            ErrorKind::Timeout {
                outcome_unknown: is_write,
            },
            format!(
                "no answer for {shard} within {} ms",
                self.config.request_timeout_ms
            ),
        ))
    }

    /// Registers a waiter and sends one request to one node.
    fn send(
        &self,
        node: &NodeId,
        request: Request,
        route: Option<Generation>,
    ) -> Result<(u64, oneshot::Receiver<Response>), NodeError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        {
            let mut pending = self.pending.lock().unwrap();
            if pending.len() >= self.config.inflight_requests_max {
                return Err(NodeError::new(
                    ErrorKind::Overloaded {
                        retry_after_ms: None,
                    },
                    format!(
                        "gateway {} has {} requests in flight",
                        self.me,
                        pending.len()
                    ),
                ));
            }
            pending.insert(id, tx);
        }
        self.transmit(node, id, request, route);
        Ok((id, rx))
    }

    fn transmit(&self, node: &NodeId, id: u64, request: Request, route: Option<Generation>) {
        self.transport.send(Envelope {
            from: self.me.clone(),
            to: node.clone(),
            body: Body::Request { id, request, route },
        });
    }

    /// Sends a control-plane order to one replica (no answer).
    pub fn send_control(&self, node: &NodeId, shard: ShardId, control: Control) {
        self.transport.send(Envelope {
            from: self.me.clone(),
            to: node.clone(),
            body: Body::Control { shard, control },
        });
    }

    /// One request to one node, waiting at most `timeout_ms`.
    pub async fn call_node_within(
        &self,
        node: &NodeId,
        request: Request,
        timeout_ms: u64,
    ) -> Result<Response, NodeError> {
        let is_write = matches!(request, Request::Write { .. });
        let (id, rx) = self.send(node, request, None)?;
        match tokio::time::timeout(Duration::from_millis(timeout_ms), rx).await {
            Ok(Ok(response)) => Ok(response),
            Ok(Err(_)) | Err(_) => {
                self.pending.lock().unwrap().remove(&id);
                Err(NodeError::new(
                    ErrorKind::Timeout {
                        outcome_unknown: is_write,
                    },
                    format!("no answer from {node} within {timeout_ms} ms"),
                ))
            }
        }
    }
}

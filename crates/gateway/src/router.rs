use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use harbor_meta::MetaStore;
use harbor_node::wire::{Body, Envelope, ErrorCode, NodeError, Request, Response};
use harbor_node::{Inbox, Transport};
use harbor_types::{NodeId, Region, ShardId};
use tokio::sync::oneshot;

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
}

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig {
            request_timeout_ms: 5_000,
            inflight_requests_max: 100_000,
            body_bytes_max: 64 * 1024,
        }
    }
}

/// A region's gateway: an endpoint on the transport plus the routing state.
pub struct Gateway {
    pub(crate) me: NodeId,
    pub(crate) region: Region,
    pub(crate) meta: Arc<MetaStore>,
    pub(crate) config: GatewayConfig,
    transport: Arc<dyn Transport>,
    pending: Mutex<HashMap<u64, oneshot::Sender<Response>>>,
    next_id: AtomicU64,
}

impl Gateway {
    /// Starts the gateway's receive loop on the current tokio runtime.
    pub fn start(
        me: NodeId,
        region: Region,
        meta: Arc<MetaStore>,
        transport: Arc<dyn Transport>,
        inbox: Inbox,
        config: GatewayConfig,
    ) -> Arc<Gateway> {
        let gateway = Arc::new(Gateway {
            me,
            region,
            meta,
            config,
            transport,
            pending: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
        });
        tokio::spawn(receive(Arc::downgrade(&gateway), inbox));
        gateway
    }

    pub fn region(&self) -> &Region {
        &self.region
    }

    /// The current leader of `shard` per the shard map.
    pub(crate) fn leader_of(&self, shard: ShardId) -> Option<NodeId> {
        self.meta.map().groups.get(&shard).map(|g| g.leader.clone())
    }

    pub(crate) fn region_of(&self, node: &NodeId) -> Option<Region> {
        self.meta.map().region_of(node).cloned()
    }

    /// Sends `request` to its group's leader and waits for the answer. A
    /// not-leader answer with a hint is retried once at the hinted node:
    /// requests carry client tokens, so a retry is never a second write.
    pub async fn call(&self, request: Request) -> Result<Response, NodeError> {
        let shard = request.shard();
        let Some(leader) = self.leader_of(shard) else {
            return Err(node_error(
                ErrorCode::UnknownShard,
                format!("{shard} is not in the shard map"),
                false,
            ));
        };
        let response = self.call_node(&leader, request.clone()).await?;
        if let Response::Error(e) = &response {
            if e.code == ErrorCode::NotLeader {
                if let Some(hint) = e.leader_hint.clone().filter(|h| *h != leader) {
                    return self.call_node(&hint, request).await;
                }
            }
        }
        Ok(response)
    }

    /// One request to one node, bounded by the request timeout.
    pub async fn call_node(&self, node: &NodeId, request: Request) -> Result<Response, NodeError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        {
            let mut pending = self.pending.lock().unwrap();
            if pending.len() >= self.config.inflight_requests_max {
                return Err(node_error(
                    ErrorCode::Overloaded,
                    format!(
                        "gateway {} has {} requests in flight",
                        self.me,
                        pending.len()
                    ),
                    false,
                ));
            }
            pending.insert(id, tx);
        }
        let is_write = matches!(request, Request::Write { .. });
        self.transport.send(Envelope {
            from: self.me.clone(),
            to: node.clone(),
            body: Body::Request { id, request },
        });
        let timeout = Duration::from_millis(self.config.request_timeout_ms);
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(response)) => Ok(response),
            Ok(Err(_)) | Err(_) => {
                self.pending.lock().unwrap().remove(&id);
                Err(node_error(
                    ErrorCode::Timeout,
                    format!(
                        "no answer from {node} within {} ms",
                        self.config.request_timeout_ms
                    ),
                    is_write,
                ))
            }
        }
    }
}

pub(crate) fn node_error(code: ErrorCode, message: String, outcome_unknown: bool) -> NodeError {
    NodeError {
        code,
        message,
        retryable: true,
        outcome_unknown,
        leader_hint: None,
        retry_after_ms: None,
    }
}

async fn receive(gateway: std::sync::Weak<Gateway>, mut inbox: Inbox) {
    while let Some(envelope) = inbox.recv().await {
        let Some(gateway) = gateway.upgrade() else {
            return;
        };
        if let Body::Response { id, response } = envelope.body {
            // A late answer after a timeout finds no one waiting: dropped.
            if let Some(tx) = gateway.pending.lock().unwrap().remove(&id) {
                let _ = tx.send(*response);
            }
        }
    }
}

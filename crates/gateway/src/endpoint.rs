//! An endpoint on the transport that sends requests to nodes and waits for
//! their answers: a gateway routes through one, and the control loop has
//! its own (status requests and orders to replicas), without a gateway.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use harbor_types::{NodeId, ShardId};
use harbor_wire::{Body, Control, Envelope, ErrorKind, NodeError, Request, Response, Route};
use harbor_wire::{Sink, Transport};
use tokio::sync::oneshot;

pub struct Endpoint {
    me: NodeId,
    transport: Arc<dyn Transport>,
    pending: Mutex<HashMap<u64, oneshot::Sender<Response>>>,
    next_id: AtomicU64,
    /// Requests waiting for an answer at once; more are refused.
    inflight_max: usize,
}

impl Endpoint {
    /// An endpoint sending through `transport`; connect [`Endpoint::sink`]
    /// to it for answers to arrive.
    pub fn new(me: NodeId, transport: Arc<dyn Transport>, inflight_max: usize) -> Arc<Endpoint> {
        assert!(
            inflight_max > 0,
            "an endpoint must allow a request in flight"
        );
        Arc::new(Endpoint {
            me,
            transport,
            pending: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            inflight_max,
        })
    }

    /// Where the transport delivers this endpoint's envelopes: an answer
    /// completes its waiting request on the sender's thread. A late answer
    /// after a timeout finds no one waiting and is dropped.
    pub fn sink(self: &Arc<Self>) -> Sink {
        let endpoint = Arc::downgrade(self);
        Arc::new(move |envelope| {
            let Some(endpoint) = endpoint.upgrade() else {
                return false;
            };
            let Body::Response { id, response } = envelope.body else {
                return false;
            };
            let waiter = endpoint.pending.lock().unwrap().remove(&id);
            if let Some(tx) = waiter {
                let _ = tx.send(*response);
            }
            true
        })
    }

    /// Registers a waiter and sends one request to one node.
    pub(crate) fn send(
        &self,
        node: &NodeId,
        request: Request,
        route: Option<Route>,
    ) -> Result<(u64, oneshot::Receiver<Response>), NodeError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        {
            let mut pending = self.pending.lock().unwrap();
            if pending.len() >= self.inflight_max {
                return Err(NodeError::new(
                    ErrorKind::Overloaded {
                        retry_after_ms: None,
                    },
                    format!("{} has {} requests in flight", self.me, pending.len()),
                ));
            }
            pending.insert(id, tx);
        }
        self.transmit(node, id, request, route);
        Ok((id, rx))
    }

    /// Sends request `id` (again) without registering a waiter.
    pub(crate) fn transmit(&self, node: &NodeId, id: u64, request: Request, route: Option<Route>) {
        self.transport.send(Envelope {
            from: self.me.clone(),
            to: node.clone(),
            body: Body::Request { id, request, route },
        });
    }

    /// Stops waiting for request `id`.
    pub(crate) fn forget(&self, id: u64) {
        self.pending.lock().unwrap().remove(&id);
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
                self.forget(id);
                let message = format!("no answer from {node} within {timeout_ms} ms");
                Err(match is_write {
                    true => NodeError::in_doubt(ErrorKind::Timeout, message),
                    false => NodeError::new(ErrorKind::Timeout, message),
                })
            }
        }
    }
}

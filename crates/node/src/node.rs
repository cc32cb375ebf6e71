use std::collections::HashMap;
use std::sync::Arc;
use std::thread::JoinHandle;

use harbor_replication::Member;
use harbor_types::{NodeId, Region, ShardId};

use crate::config::NodeConfig;
use crate::driver::{error, Control, Driver, DriverStartError, ReplicaInput};
use crate::queue::{self, TrySendError};
use crate::transport::{Inbox, Transport};
use crate::wire::{Body, Envelope, ErrorCode, Response};

#[derive(Debug, thiserror::Error)]
pub enum NodeStartError {
    #[error("node {node}: {source}")]
    Replica {
        node: NodeId,
        source: DriverStartError,
    },
    #[error("node {node}: cannot start a thread: {source}")]
    Thread {
        node: NodeId,
        source: std::io::Error,
    },
}

struct ReplicaHandle {
    tx: queue::Sender<ReplicaInput>,
    thread: JoinHandle<()>,
}

/// A host for replicas of many groups. Envelopes arriving in its inbox are
/// dispatched by shard to the replica threads.
pub struct Node {
    id: NodeId,
    region: Region,
    replicas: Arc<HashMap<ShardId, queue::Sender<ReplicaInput>>>,
    threads: Vec<JoinHandle<()>>,
    dispatcher: Option<JoinHandle<()>>,
}

impl Node {
    /// Opens every replica's WAL (recovering its state) and starts serving
    /// `inbox`. Replicas wait as followers until told their role.
    pub fn start(
        id: NodeId,
        region: Region,
        groups: Vec<(ShardId, Vec<Member>)>,
        config: NodeConfig,
        transport: Arc<dyn Transport>,
        inbox: Inbox,
    ) -> Result<Node, NodeStartError> {
        let mut handles: HashMap<ShardId, ReplicaHandle> = HashMap::new();
        for (shard, members) in groups {
            let driver = Driver::open(
                id.clone(),
                shard,
                members,
                config.clone(),
                transport.clone(),
            )
            .map_err(|source| NodeStartError::Replica {
                node: id.clone(),
                source,
            })?;
            let (tx, rx) = queue::bounded(config.replica_inbox_capacity);
            let thread = std::thread::Builder::new()
                .name(format!("{id}/shard{}", shard.0))
                .spawn(move || driver.run(rx))
                .map_err(|source| NodeStartError::Thread {
                    node: id.clone(),
                    source,
                })?;
            handles.insert(shard, ReplicaHandle { tx, thread });
        }
        let mut threads = Vec::new();
        let mut senders = HashMap::new();
        for (shard, handle) in handles {
            senders.insert(shard, handle.tx);
            threads.push(handle.thread);
        }
        let replicas = Arc::new(senders);
        let dispatcher = {
            let replicas = replicas.clone();
            let id = id.clone();
            std::thread::Builder::new()
                .name(format!("{id}/dispatch"))
                .spawn(move || dispatch(id, inbox, replicas, transport))
                .map_err(|source| NodeStartError::Thread {
                    node: NodeId::new("dispatcher").unwrap(),
                    source,
                })?
        };
        Ok(Node {
            id,
            region,
            replicas,
            threads,
            dispatcher: Some(dispatcher),
        })
    }

    pub fn id(&self) -> &NodeId {
        &self.id
    }

    pub fn region(&self) -> &Region {
        &self.region
    }

    pub fn shards(&self) -> Vec<ShardId> {
        let mut shards: Vec<ShardId> = self.replicas.keys().copied().collect();
        shards.sort();
        shards
    }

    /// Tells one replica its role. Blocks while its queue is full: control
    /// orders are never dropped.
    pub fn control(&self, shard: ShardId, control: Control) {
        if let Some(tx) = self.replicas.get(&shard) {
            let _ = tx.force_send(ReplicaInput::Control(control));
        }
    }

    /// Stops every replica after its current batch (acknowledged writes are
    /// already durable) and waits for the threads. The dispatcher ends when
    /// its inbox closes, i.e. when the transport forgets this node.
    pub fn shutdown(mut self) {
        for tx in self.replicas.values() {
            let _ = tx.force_send(ReplicaInput::Control(Control::Shutdown));
        }
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
        // The dispatcher holds senders to the (now finished) replicas; it
        // exits when the inbox closes. Do not wait for it here.
        self.dispatcher.take();
    }
}

fn dispatch(
    me: NodeId,
    mut inbox: Inbox,
    replicas: Arc<HashMap<ShardId, queue::Sender<ReplicaInput>>>,
    transport: Arc<dyn Transport>,
) {
    while let Some(envelope) = inbox.blocking_recv() {
        if let Body::Control { shard, control } = envelope.body {
            match (control, replicas.get(&shard)) {
                (Control::Shutdown, _) => {
                    tracing::warn!(from = %envelope.from, "a shutdown order from the network; ignored");
                }
                (control, Some(tx)) => {
                    let _ = tx.force_send(ReplicaInput::Control(control));
                }
                (_, None) => {}
            }
            continue;
        }
        let shard = match &envelope.body {
            Body::Replication(message) => message.shard(),
            Body::Request { request, .. } => request.shard(),
            Body::Response { .. } | Body::Control { .. } => continue,
        };
        let request_id = match &envelope.body {
            Body::Request { id, .. } => Some(*id),
            _ => None,
        };
        let reply_to = envelope.from.clone();
        let refusal = match replicas.get(&shard) {
            None => Some(error(
                ErrorCode::UnknownShard,
                format!("{me} hosts no replica of {shard}"),
                true,
                false,
            )),
            Some(tx) => match tx.try_send(ReplicaInput::Envelope(envelope)) {
                Ok(()) => None,
                Err(TrySendError::Full) => Some(error(
                    ErrorCode::Overloaded,
                    format!("the replica of {shard} on {me} has a full queue"),
                    true,
                    false,
                )),
                Err(TrySendError::Disconnected) => Some(error(
                    ErrorCode::ReplicaFailed,
                    format!("the replica of {shard} on {me} is not running"),
                    true,
                    false,
                )),
            },
        };
        if let (Some(e), Some(id)) = (refusal, request_id) {
            transport.send(Envelope {
                from: me.clone(),
                to: reply_to,
                body: Body::Response {
                    id,
                    response: Box::new(Response::Error(e)),
                },
            });
        }
    }
}

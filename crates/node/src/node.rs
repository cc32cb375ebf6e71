use std::collections::HashMap;
use std::sync::Arc;
use std::thread::JoinHandle;

use harbor_types::{NodeId, Region, ShardId};

use crate::config::{NodeConfig, NodeConfigError, ReplicaPlan};
use harbor_wire::{Body, Control, Envelope, ErrorKind, NodeError, Response, Sink, Transport};

use crate::driver::{Driver, DriverStartError, ReplicaInput};
use crate::queue::{self, TrySendError};

#[derive(Debug, thiserror::Error)]
pub enum NodeStartError {
    #[error("node {node}: {source}")]
    Config {
        node: NodeId,
        source: NodeConfigError,
    },
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

/// A host for replicas of many groups, each on a thread of its own.
/// Envelopes reach a replica's queue through the node's [`Node::sink`], on
/// the sender's thread.
pub struct Node {
    id: NodeId,
    region: Region,
    replicas: Arc<HashMap<ShardId, queue::Sender<ReplicaInput>>>,
    transport: Arc<dyn Transport>,
    threads: Vec<JoinHandle<()>>,
}

impl Node {
    /// Opens every replica's WAL (recovering its state) and starts its
    /// thread. Replicas wait as followers until told their role; connect
    /// [`Node::sink`] to the transport for them to hear anything.
    pub fn start(
        id: NodeId,
        region: Region,
        groups: Vec<ReplicaPlan>,
        config: NodeConfig,
        transport: Arc<dyn Transport>,
    ) -> Result<Node, NodeStartError> {
        config.validate().map_err(|source| NodeStartError::Config {
            node: id.clone(),
            source,
        })?;
        let mut handles: HashMap<ShardId, ReplicaHandle> = HashMap::new();
        for plan in groups {
            let shard = plan.shard;
            let driver = Driver::open(id.clone(), plan, config.clone(), transport.clone())
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
        Ok(Node {
            id,
            region,
            replicas: Arc::new(senders),
            transport,
            threads,
        })
    }

    /// Where the transport delivers this node's envelopes: each goes to its
    /// shard's replica queue (or is refused at once, if a request).
    pub fn sink(&self) -> Sink {
        let (me, replicas, transport) = (
            self.id.clone(),
            self.replicas.clone(),
            self.transport.clone(),
        );
        Arc::new(move |envelope| deliver(&me, &replicas, transport.as_ref(), envelope))
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

    /// Tells one replica its role. Never blocks and never drops: a control
    /// order is queued even past the replica's queue bound (they are few).
    pub fn control(&self, shard: ShardId, control: Control) {
        if let Some(tx) = self.replicas.get(&shard) {
            let _ = tx.force_send(ReplicaInput::Control(control));
        }
    }

    /// Stops every replica after its current batch (acknowledged writes are
    /// already durable) and waits for the threads. Disconnect the sink
    /// first: what it delivers afterwards is refused or dropped.
    pub fn shutdown(self) {
        for tx in self.replicas.values() {
            let _ = tx.force_send(ReplicaInput::Control(Control::Shutdown));
        }
        for thread in self.threads {
            let _ = thread.join();
        }
    }
}

/// Puts one envelope into its replica's queue; returns false when it was
/// dropped. A request that cannot be queued is answered with an error at
/// once, so its sender does not wait out a timeout.
fn deliver(
    me: &NodeId,
    replicas: &HashMap<ShardId, queue::Sender<ReplicaInput>>,
    transport: &dyn Transport,
    envelope: Envelope,
) -> bool {
    if let Body::Control { shard, control } = envelope.body {
        match (control, replicas.get(&shard)) {
            (Control::Shutdown, _) => {
                tracing::warn!(from = %envelope.from, "a shutdown order from the network; ignored");
                return false;
            }
            (control, Some(tx)) => return tx.force_send(ReplicaInput::Control(control)).is_ok(),
            (_, None) => return false,
        }
    }
    let shard = match &envelope.body {
        Body::Replication(message) => message.shard(),
        Body::Request { request, .. } => request.shard(),
        Body::Response { .. } | Body::Control { .. } => return false,
    };
    let request_id = match &envelope.body {
        Body::Request { id, .. } => Some(*id),
        _ => None,
    };
    let reply_to = envelope.from.clone();
    let refusal = match replicas.get(&shard) {
        None => NodeError::new(
            ErrorKind::UnknownShard,
            format!("{me} hosts no replica of {shard}"),
        ),
        Some(tx) => match tx.try_send(ReplicaInput::Envelope(envelope)) {
            Ok(()) => return true,
            Err(TrySendError::Full) => NodeError::new(
                ErrorKind::Overloaded {
                    retry_after_ms: None,
                },
                format!("the replica of {shard} on {me} has a full queue"),
            ),
            Err(TrySendError::Disconnected) => NodeError::new(
                ErrorKind::ReplicaFailed,
                format!("the replica of {shard} on {me} is not running"),
            ),
        },
    };
    if let Some(id) = request_id {
        transport.send(Envelope {
            from: me.clone(),
            to: reply_to,
            body: Body::Response {
                id,
                response: Box::new(Response::Error(refusal)),
            },
        });
    }
    false
}

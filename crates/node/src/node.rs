use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::thread::JoinHandle;

use harbor_types::{NodeId, Region, ShardId};

use crate::config::{NodeConfig, NodeConfigError, ReplicaPlan};
use harbor_wire::{Body, Control, Envelope, ErrorKind, NodeError, Response, Sink, Transport};

use crate::driver::{Driver, DriverStartError, ReplicaInput, Stopped};
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
    #[error("the node has stopped")]
    Stopped,
}

/// What the node's runtime does when a group it hosts no replica of names
/// it a member (see [`Node::on_membership`]).
pub type OnMembership = Arc<dyn Fn(ShardId) + Send + Sync>;

/// A host for replicas of many groups, each on a thread of its own.
/// Envelopes reach a replica's queue through the node's [`Node::sink`], on
/// the sender's thread.
///
/// Replicas come and go with their group's membership: a replica that a
/// newer membership leaves out stops and deletes its data; a membership
/// that names this node for a group it does not host goes to the
/// runtime's [`OnMembership`] hook, which checks it against the metadata
/// plane and opens an empty replica ([`Hosting::open`]).
pub struct Node {
    host: Arc<Host>,
}

struct Host {
    id: NodeId,
    region: Region,
    /// For replicas opened after the start: never a new group's.
    config: NodeConfig,
    transport: Arc<dyn Transport>,
    replicas: RwLock<HashMap<ShardId, queue::Sender<ReplicaInput>>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    /// Held while a replica opens: two orders naming the node must not
    /// open one WAL twice.
    opening: Mutex<()>,
    /// Set (under `opening`) when the node stops: nothing opens after.
    stopping: AtomicBool,
    /// Per group, the newest membership epoch seen that leaves this node
    /// out: a plan no newer (read before the removal) does not open.
    removed_at: Mutex<HashMap<ShardId, u64>>,
    on_membership: RwLock<Option<OnMembership>>,
}

/// Opens replicas on a running node; holds no node alive.
#[derive(Clone)]
pub struct Hosting(Weak<Host>);

impl Hosting {
    /// Opens `plan`'s replica (its WAL as it finds it: empty, for a
    /// replica new here) unless the node hosts it already, or has heard
    /// of a membership newer than the plan's that leaves it out. Blocks
    /// on IO.
    pub fn open(&self, plan: ReplicaPlan) -> Result<(), NodeStartError> {
        let Some(host) = self.0.upgrade() else {
            return Err(NodeStartError::Stopped);
        };
        let removed_at = host.removed_at.lock().unwrap().get(&plan.shard).copied();
        if removed_at.is_some_and(|epoch| plan.members_epoch <= epoch) {
            tracing::info!(shard = %plan.shard, node = %host.id, "not opening: a newer membership left this node out");
            return Ok(());
        }
        let config = host.config.clone();
        host.open(plan, config)
    }

    pub fn hosts(&self, shard: ShardId) -> bool {
        self.0
            .upgrade()
            .is_some_and(|h| h.replicas.read().unwrap().contains_key(&shard))
    }
}

impl Node {
    /// Opens every replica's WAL (recovering its state) and starts its
    /// thread. Replicas wait as followers until told their role; connect
    /// [`Node::sink`] to the transport for them to hear anything.
    ///
    /// `groups` are every group that names this node (from a linearizable
    /// read of the map): the directory of any other replica found in the
    /// data directory belongs to a group that removed this node while it
    /// was down, and is deleted.
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
        let mut later = config.clone();
        later.groups_are_new = false;
        let host = Arc::new(Host {
            id,
            region,
            config: later,
            transport,
            replicas: RwLock::new(HashMap::new()),
            threads: Mutex::new(Vec::new()),
            opening: Mutex::new(()),
            stopping: AtomicBool::new(false),
            removed_at: Mutex::new(HashMap::new()),
            on_membership: RwLock::new(None),
        });
        let named: BTreeSet<ShardId> = groups.iter().map(|p| p.shard).collect();
        host.delete_leftovers(&named);
        for plan in groups {
            if let Err(e) = host.open(plan, config.clone()) {
                Node { host }.shutdown();
                return Err(e);
            }
        }
        Ok(Node { host })
    }

    /// Where the transport delivers this node's envelopes: each goes to its
    /// shard's replica queue (or is refused at once, if a request).
    pub fn sink(&self) -> Sink {
        let host = self.host.clone();
        Arc::new(move |envelope| host.deliver(envelope))
    }

    /// Sets what happens when a membership names this node for a group it
    /// does not host (nothing, until set).
    pub fn on_membership(&self, hook: OnMembership) {
        *self.host.on_membership.write().unwrap() = Some(hook);
    }

    /// A handle that opens replicas here (for the [`OnMembership`] hook).
    pub fn hosting(&self) -> Hosting {
        Hosting(Arc::downgrade(&self.host))
    }

    pub fn id(&self) -> &NodeId {
        &self.host.id
    }

    pub fn region(&self) -> &Region {
        &self.host.region
    }

    pub fn shards(&self) -> Vec<ShardId> {
        let replicas = self.host.replicas.read().unwrap();
        let mut shards: Vec<ShardId> = replicas.keys().copied().collect();
        shards.sort();
        shards
    }

    /// Tells one replica its role. Never blocks and never drops: a control
    /// order is queued even past the replica's queue bound (they are few).
    pub fn control(&self, shard: ShardId, control: Control) {
        self.host.control(shard, control);
    }

    /// Stops every replica after its current batch (acknowledged writes are
    /// already durable) and waits for the threads. Disconnect the sink
    /// first: what it delivers afterwards is refused or dropped.
    pub fn shutdown(self) {
        *self.host.on_membership.write().unwrap() = None;
        {
            let _opening = self.host.opening.lock().unwrap();
            self.host.stopping.store(true, Ordering::SeqCst);
        }
        let senders: Vec<_> = self
            .host
            .replicas
            .read()
            .unwrap()
            .values()
            .cloned()
            .collect();
        for tx in senders {
            let _ = tx.force_send(ReplicaInput::Control(Control::Shutdown));
        }
        let threads = std::mem::take(&mut *self.host.threads.lock().unwrap());
        for thread in threads {
            let _ = thread.join();
        }
    }
}

impl Host {
    fn open(self: &Arc<Self>, plan: ReplicaPlan, config: NodeConfig) -> Result<(), NodeStartError> {
        let _opening = self.opening.lock().unwrap();
        if self.stopping.load(Ordering::SeqCst) {
            return Err(NodeStartError::Stopped);
        }
        let shard = plan.shard;
        if self.replicas.read().unwrap().contains_key(&shard) {
            return Ok(());
        }
        let epoch = plan.members_epoch;
        let id = self.id.clone();
        let dir = config.replica_dir(shard);
        let capacity = config.replica_inbox_capacity;
        let driver =
            Driver::open(id.clone(), plan, config, self.transport.clone()).map_err(|source| {
                NodeStartError::Replica {
                    node: id.clone(),
                    source,
                }
            })?;
        let (tx, rx) = queue::bounded(capacity);
        let host = Arc::downgrade(self);
        let transport = self.transport.clone();
        let thread = std::thread::Builder::new()
            .name(format!("{id}/shard{}", shard.0))
            .spawn(move || {
                if driver.run(&rx) != Stopped::Removed {
                    return;
                }
                // Its data out of the way first (a rename: a crash leaves
                // it whole or gone), then its place: the replica of a
                // group that adds this node again opens only once the
                // place is free, on a new directory.
                let tombstone = tombstone(&dir);
                if let Err(e) = std::fs::rename(&dir, &tombstone).and_then(|()| sync_parent(&dir)) {
                    tracing::error!(%shard, node = %id, error = %e, dir = %dir.display(), "removed from its group, but its data could not be moved aside; deleting it in place");
                    if let Err(e) = std::fs::remove_dir_all(&dir) {
                        // Its place stays taken: a replica added again
                        // must not open this data as its own.
                        tracing::error!(%shard, node = %id, error = %e, "cannot delete a removed replica's data; the group cannot be given this node again until it restarts");
                        return;
                    }
                }
                if let Some(host) = host.upgrade() {
                    host.replicas.write().unwrap().remove(&shard);
                }
                // What was queued for it is refused, not left to time out.
                while let Some(input) = rx.try_recv() {
                    refuse_if_request(&id, shard, transport.as_ref(), input);
                }
                match std::fs::remove_dir_all(&tombstone) {
                    Ok(()) => tracing::info!(%shard, node = %id, "removed from its group: data deleted"),
                    Err(e) => tracing::error!(%shard, node = %id, error = %e, dir = %tombstone.display(), "removed from its group, but its data could not be deleted"),
                }
            })
            .map_err(|source| NodeStartError::Thread {
                node: self.id.clone(),
                source,
            })?;
        // A removal that arrived while it opened had no queue to go to:
        // it is told now. (`control` records a removal and looks for the
        // queue under the same lock, so none falls between the two.)
        let removed_at = self.removed_at.lock().unwrap();
        if let Some(&removed) = removed_at.get(&shard).filter(|r| **r >= epoch) {
            let removal = Control::Members {
                epoch: removed,
                members: Vec::new(),
            };
            let _ = tx.force_send(ReplicaInput::Control(removal));
        }
        self.replicas.write().unwrap().insert(shard, tx);
        drop(removed_at);
        let mut threads = self.threads.lock().unwrap();
        threads.retain(|t| !t.is_finished());
        threads.push(thread);
        Ok(())
    }

    /// Deletes replica directories of groups not in `named`.
    fn delete_leftovers(&self, named: &BTreeSet<ShardId>) {
        let Ok(entries) = std::fs::read_dir(&self.config.data_dir) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            if name.to_str().is_some_and(|n| n.contains(TOMBSTONE)) {
                // A removal that a crash cut short.
                if let Err(e) = std::fs::remove_dir_all(entry.path()) {
                    tracing::error!(node = %self.id, error = %e, dir = %entry.path().display(), "cannot delete a removed replica's data");
                }
                continue;
            }
            let Some(shard) = (name.to_str())
                .and_then(|n| n.strip_prefix("shard-"))
                .and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            if named.contains(&ShardId(shard)) {
                continue;
            }
            let dir = entry.path();
            match std::fs::remove_dir_all(&dir) {
                Ok(()) => {
                    tracing::info!(shard = %ShardId(shard), node = %self.id, "a group removed this node while it was down: its replica's data deleted")
                }
                Err(e) => {
                    tracing::error!(shard = %ShardId(shard), node = %self.id, error = %e, "cannot delete the data of a replica no group counts")
                }
            }
        }
    }

    /// Queues a control order; returns false when it went nowhere.
    fn control(&self, shard: ShardId, control: Control) -> bool {
        let mut removal = None;
        if let Control::Members { epoch, members } = &control {
            if !members.iter().any(|m| m.node == self.id) {
                let mut removed_at = self.removed_at.lock().unwrap();
                let at = removed_at.entry(shard).or_default();
                *at = (*at).max(*epoch);
                removal = Some(removed_at);
            }
        }
        let tx = self.replicas.read().unwrap().get(&shard).cloned();
        drop(removal);
        match (control, tx) {
            (control, Some(tx)) => tx.force_send(ReplicaInput::Control(control)).is_ok(),
            (Control::Members { members, .. }, None)
                if members.iter().any(|m| m.node == self.id) =>
            {
                let hook = self.on_membership.read().unwrap().clone();
                match hook {
                    Some(hook) => {
                        hook(shard);
                        true
                    }
                    None => false,
                }
            }
            (_, None) => false,
        }
    }

    /// Puts one envelope into its replica's queue; returns false when it
    /// was dropped. A request that cannot be queued is answered with an
    /// error at once, so its sender does not wait out a timeout.
    fn deliver(&self, envelope: Envelope) -> bool {
        let me = &self.id;
        if let Body::Control { shard, control } = envelope.body {
            if let Control::Shutdown = control {
                tracing::warn!(from = %envelope.from, "a shutdown order from the network; ignored");
                return false;
            }
            return self.control(shard, control);
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
        let replicas = self.replicas.read().unwrap();
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
        drop(replicas);
        if let Some(id) = request_id {
            self.transport.send(Envelope {
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
}

/// Marks a removed replica's directory while its data is deleted.
const TOMBSTONE: &str = ".removed.";

fn tombstone(dir: &Path) -> std::path::PathBuf {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let mut name = dir.file_name().unwrap_or_default().to_os_string();
    name.push(format!("{TOMBSTONE}{nanos}"));
    dir.with_file_name(name)
}

/// Makes a rename in `path`'s directory durable.
fn sync_parent(path: &Path) -> std::io::Result<()> {
    match path.parent() {
        Some(parent) => std::fs::File::open(parent)?.sync_all(),
        None => Ok(()),
    }
}

/// Answers a request queued for a replica that is gone.
fn refuse_if_request(me: &NodeId, shard: ShardId, transport: &dyn Transport, input: ReplicaInput) {
    let ReplicaInput::Envelope(Envelope {
        from,
        body: Body::Request { id, .. },
        ..
    }) = input
    else {
        return;
    };
    let e = NodeError::new(
        ErrorKind::UnknownShard,
        format!("{me} no longer hosts a replica of {shard}"),
    );
    transport.send(Envelope {
        from: me.clone(),
        to: from,
        body: Body::Response {
            id,
            response: Box::new(Response::Error(e)),
        },
    });
}

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use harbor_types::{NodeId, Region};
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::{Sink, Transport};
use harbor_wire::Envelope;

use harbor_types::limits::LINK_QUEUE_MAX;

/// Faults between regions, changed at run time (dev mode, tests).
#[derive(Clone, Debug, Default)]
pub struct LinkFaults {
    /// One-way delay between different regions.
    pub wan_delay_ms: u64,
    /// Extra one-way delay per ordered region pair.
    pub extra_delay_ms: HashMap<(Region, Region), u64>,
    /// Ordered region pairs whose envelopes are dropped.
    pub partitioned: HashSet<(Region, Region)>,
}

/// The sending end of one directed link's delay line.
type DelayLine = mpsc::Sender<(Instant, Envelope)>;

struct Endpoint {
    /// `None`: near every region (see [`InProcNetwork::attach_near_all`]).
    region: Option<Region>,
    sink: Sink,
}

/// Every endpoint in one process, connected by channels. Envelopes between
/// regions pass through a per-link delay line, which keeps them in order.
#[derive(Clone)]
pub struct InProcNetwork {
    inner: Arc<Inner>,
}

struct Inner {
    endpoints: RwLock<HashMap<NodeId, Endpoint>>,
    links: Mutex<HashMap<(NodeId, NodeId), DelayLine>>,
    faults: RwLock<LinkFaults>,
    /// Paused endpoints and the envelopes held for them, like a stopped
    /// process's socket buffers: delivered in order on resume.
    paused: Mutex<HashMap<NodeId, Vec<Envelope>>>,
    /// Whether `paused` is non-empty: every send checks it without a lock.
    any_paused: AtomicBool,
    runtime: tokio::runtime::Handle,
    dropped: AtomicU64,
}

impl InProcNetwork {
    /// Needs a tokio runtime for the delay lines.
    pub fn new(runtime: tokio::runtime::Handle, wan_delay_ms: u64) -> InProcNetwork {
        InProcNetwork {
            inner: Arc::new(Inner {
                endpoints: RwLock::new(HashMap::new()),
                links: Mutex::new(HashMap::new()),
                faults: RwLock::new(LinkFaults {
                    wan_delay_ms,
                    ..LinkFaults::default()
                }),
                paused: Mutex::new(HashMap::new()),
                any_paused: AtomicBool::new(false),
                runtime,
                dropped: AtomicU64::new(0),
            }),
        }
    }

    /// Adds an endpoint: envelopes to `node` go to `sink`.
    pub fn attach(&self, node: NodeId, region: Region, sink: Sink) {
        self.add(node, Some(region), sink)
    }

    /// Adds an endpoint that is near every region: no WAN delay and no
    /// region fault applies to its traffic (pauses still do). The dev
    /// cluster's control plane stands for a metadata plane with a voter in
    /// every region, so a slow or cut WAN does not blind it to one region.
    pub fn attach_near_all(&self, node: NodeId, sink: Sink) {
        self.add(node, None, sink)
    }

    fn add(&self, node: NodeId, region: Option<Region>, sink: Sink) {
        let previous = self
            .inner
            .endpoints
            .write()
            .unwrap()
            .insert(node.clone(), Endpoint { region, sink });
        assert!(previous.is_none(), "endpoint {node} registered twice");
    }

    /// Removes an endpoint: envelopes to it are dropped from now on. Its
    /// delay lines go too (they hold its sink), and a later `attach` of the
    /// same name starts clean.
    pub fn unregister(&self, node: &NodeId) {
        self.inner.endpoints.write().unwrap().remove(node);
        self.forget_pause(node);
        self.inner
            .links
            .lock()
            .unwrap()
            .retain(|(from, to), _| from != node && to != node);
    }

    pub fn faults(&self) -> LinkFaults {
        self.inner.faults.read().unwrap().clone()
    }

    pub fn set_faults(&self, faults: LinkFaults) {
        *self.inner.faults.write().unwrap() = faults;
    }

    /// Pauses an endpoint as SIGSTOP would look from outside: what it sends
    /// is lost (a stopped process sends nothing), what is sent to it waits
    /// until [`InProcNetwork::resume`]. Its threads and clock keep running,
    /// so a paused leader's lease runs out on its own clock.
    pub fn pause(&self, node: &NodeId) {
        let mut paused = self.inner.paused.lock().unwrap();
        paused.entry(node.clone()).or_default();
        self.inner.any_paused.store(true, Ordering::Release);
    }

    /// Delivers what was held for a paused endpoint, in order.
    pub fn resume(&self, node: &NodeId) {
        let held = self.forget_pause(node);
        for envelope in held.unwrap_or_default() {
            self.send(envelope);
        }
    }

    fn forget_pause(&self, node: &NodeId) -> Option<Vec<Envelope>> {
        let mut paused = self.inner.paused.lock().unwrap();
        let held = paused.remove(node);
        self.inner
            .any_paused
            .store(!paused.is_empty(), Ordering::Release);
        held
    }

    pub fn is_paused(&self, node: &NodeId) -> bool {
        self.inner.paused.lock().unwrap().contains_key(node)
    }

    /// Envelopes dropped so far (full queues, partitions, unknown endpoints).
    pub fn dropped(&self) -> u64 {
        self.inner.dropped.load(Ordering::Relaxed)
    }

    pub fn transport(&self) -> Arc<dyn Transport> {
        Arc::new(self.clone())
    }

    fn drop_one(&self) {
        self.inner.dropped.fetch_add(1, Ordering::Relaxed);
    }
}

impl Transport for InProcNetwork {
    fn send(&self, envelope: Envelope) {
        if self.inner.any_paused.load(Ordering::Acquire) {
            let mut paused = self.inner.paused.lock().unwrap();
            if paused.contains_key(&envelope.from) {
                drop(paused);
                self.drop_one();
                return;
            }
            if let Some(held) = paused.get_mut(&envelope.to) {
                if held.len() < LINK_QUEUE_MAX {
                    held.push(envelope);
                } else {
                    drop(paused);
                    self.drop_one();
                }
                return;
            }
        }
        let (from_region, to_region, sink) = {
            let endpoints = self.inner.endpoints.read().unwrap();
            let (Some(from), Some(to)) =
                (endpoints.get(&envelope.from), endpoints.get(&envelope.to))
            else {
                drop(endpoints);
                self.drop_one();
                return;
            };
            (from.region.clone(), to.region.clone(), to.sink.clone())
        };
        // No lock is held from here on: a sink may send (a node refusing a
        // request answers at once).
        let (Some(from_region), Some(to_region)) = (from_region, to_region) else {
            if !sink(envelope) {
                self.drop_one();
            }
            return;
        };
        let delay_ms = {
            let faults = self.inner.faults.read().unwrap();
            if faults
                .partitioned
                .contains(&(from_region.clone(), to_region.clone()))
            {
                drop(faults);
                self.drop_one();
                return;
            }
            let pair = (from_region.clone(), to_region.clone());
            let extra = faults.extra_delay_ms.get(&pair).copied().unwrap_or(0);
            let wan = if from_region == to_region {
                0
            } else {
                faults.wan_delay_ms
            };
            wan + extra
        };
        if delay_ms == 0 {
            if !sink(envelope) {
                self.drop_one();
            }
            return;
        }
        let deliver_at = Instant::now() + Duration::from_millis(delay_ms);
        let key = (envelope.from.clone(), envelope.to.clone());
        let link = {
            let mut links = self.inner.links.lock().unwrap();
            links
                .entry(key)
                .or_insert_with(|| spawn_delay_line(&self.inner.runtime, sink, self.clone()))
                .clone()
        };
        if link.try_send((deliver_at, envelope)).is_err() {
            self.drop_one();
        }
    }
}

/// One task per directed link: holds each envelope until its delivery time,
/// in send order.
fn spawn_delay_line(
    runtime: &tokio::runtime::Handle,
    sink: Sink,
    network: InProcNetwork,
) -> DelayLine {
    let (link_tx, mut link_rx) = mpsc::channel::<(Instant, Envelope)>(LINK_QUEUE_MAX);
    runtime.spawn(async move {
        while let Some((deliver_at, envelope)) = link_rx.recv().await {
            tokio::time::sleep_until(deliver_at).await;
            if !sink(envelope) {
                network.drop_one();
            }
        }
    });
    link_tx
}

//! `harbor dev`: the whole cluster in one process. Two regions, three nodes
//! each, sixteen groups, one gateway per region, and an in-process network
//! that delays traffic between regions like a WAN.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use harbor_gateway::endpoint::Endpoint;
use harbor_gateway::{Gateway, GatewayConfig};
use harbor_meta::{MetaCommand, MetaReply, Metadata, ShardMap, Topology};

use crate::data_dir::{DataDir, DataKind};
use harbor_meta_raft::{MetaConfig, MetaNode};
use harbor_node::{InProcNetwork, Node, NodeConfig};
use harbor_types::{NodeId, Region, ShardId};
use harbor_wire::Control;
use harbor_wire::{Query, QueryResult, Request, Response};

use crate::control::{
    members_answer, transfer_answer, ControlLoop, ControlRequest, MembersGoal, MembersRequest,
    Replicas, TransferRequest,
};
use futures::future::BoxFuture;
use harbor_gateway::{Admin, AdminError, Fault};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

#[derive(Clone, Debug)]
pub struct DevOptions {
    pub data_dir: PathBuf,
    pub bind: IpAddr,
    /// The first region's gateway listens here, the next on `port + 1`. 0
    /// picks free ports (tests).
    pub port: u16,
    pub wan_delay_ms: u64,
    pub gateway: GatewayConfig,
    /// Applied to every node's config (tests shorten limits with it).
    pub tune_node: fn(&mut NodeConfig),
    /// The cluster's shape when the data directory is new (a reused one
    /// keeps the shape it was created with).
    pub topology: Topology,
}

impl DevOptions {
    pub fn new(data_dir: PathBuf) -> DevOptions {
        DevOptions {
            data_dir,
            bind: IpAddr::V4(Ipv4Addr::LOCALHOST),
            port: 7400,
            wan_delay_ms: 35,
            gateway: GatewayConfig::default(),
            tune_node: |_| {},
            topology: Topology::dev(),
        }
    }
}

pub struct GatewayHandle {
    pub region: Region,
    pub addr: SocketAddr,
    pub gateway: Arc<Gateway>,
    server: JoinHandle<()>,
}

impl GatewayHandle {
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

pub struct DevCluster {
    /// The metadata plane as gateways see it.
    pub meta: Arc<dyn Metadata>,
    /// Its single Raft voter, serving `/meta/*` and `/raft/*` on loopback.
    pub meta_node: Arc<MetaNode>,
    meta_server: JoinHandle<()>,
    pub network: InProcNetwork,
    pub map: Arc<ShardMap>,
    pub gateways: Vec<GatewayHandle>,
    pub nodes: Arc<NodeSet>,
    stop: watch::Sender<bool>,
    control: JoinHandle<()>,
    /// The lock on `data_dir`, released when the cluster is dropped.
    _data_dir: DataDir,
}

/// The cluster's nodes, each running or stopped, restartable on its data
/// directory (dev faults and failover tests use it).
pub struct NodeSet {
    running: Mutex<BTreeMap<NodeId, Node>>,
    network: InProcNetwork,
    map: Arc<ShardMap>,
    meta: Arc<dyn Metadata>,
    data_dir: PathBuf,
    tune_node: fn(&mut NodeConfig),
    /// Until every node first started: the data directory was new, so the
    /// groups are being created. After that, a node that starts empty lost
    /// its data.
    groups_are_new: std::sync::atomic::AtomicBool,
}

impl NodeSet {
    /// Starts `node` on its data directory (recovering its replicas).
    pub async fn start(&self, node: &NodeId) -> anyhow::Result<()> {
        if self.is_running(node) {
            return Ok(());
        }
        let region = self
            .map
            .region_of(node)
            .with_context(|| format!("no node {node} in the map"))?
            .clone();
        // Read linearizably: a replica that finds its disk empty starts at
        // its group's fence as the metadata plane holds it now.
        let map = self
            .meta
            .map_linearizable()
            .await
            .context("reading the shard map")?;
        let groups = crate::hosting::replica_plans(&map, node);
        let mut config = NodeConfig::new(self.data_dir.join("nodes").join(node.as_str()));
        config.groups_are_new = self
            .groups_are_new
            .load(std::sync::atomic::Ordering::Relaxed);
        (self.tune_node)(&mut config);
        let (id, transport, at) = (node.clone(), self.network.transport(), region.clone());
        let started =
            tokio::task::spawn_blocking(move || Node::start(id, at, groups, config, transport))
                .await??;
        started.on_membership(crate::hosting::open_when_named(
            node.clone(),
            self.meta.clone(),
            started.hosting(),
        ));
        self.network.attach(node.clone(), region, started.sink());
        self.running.lock().unwrap().insert(node.clone(), started);
        Ok(())
    }

    /// Stops `node` as a crash would look from outside: it vanishes from the
    /// network at once. Its replicas finish their current batch, so what it
    /// acknowledged is on disk (the SIGKILL test covers a harder crash).
    pub async fn stop(&self, node: &NodeId) {
        self.network.unregister(node);
        let taken = self.running.lock().unwrap().remove(node);
        if let Some(taken) = taken {
            let _ = tokio::task::spawn_blocking(move || taken.shutdown()).await;
        }
    }

    pub fn is_running(&self, node: &NodeId) -> bool {
        self.running.lock().unwrap().contains_key(node)
    }

    async fn stop_all(&self) {
        let names: Vec<NodeId> = self.running.lock().unwrap().keys().cloned().collect();
        for name in names {
            self.stop(&name).await;
        }
    }
}

impl Replicas for NodeSet {
    /// In process: straight into the replica's queue.
    fn control(&self, node: &NodeId, shard: ShardId, control: Control) {
        if let Some(n) = self.running.lock().unwrap().get(node) {
            n.control(shard, control);
        }
    }
}

impl DevCluster {
    /// Starts every node (recovering from `data_dir`), names the leaders of
    /// a new generation, opens the gateways, starts the control loop, and
    /// waits until every group's leader is ready.
    pub async fn start(options: DevOptions) -> anyhow::Result<DevCluster> {
        let data_dir = DataDir::open(&options.data_dir, DataKind::Dev)?;
        let (meta_node, meta_server) = start_meta_voter(&options).await?;
        let meta: Arc<dyn Metadata> = meta_node.clone();
        let laid_out = meta_node
            .write(MetaCommand::Bootstrap(options.topology.clone()))
            .await
            .context("bootstrapping the metadata")?;
        if let MetaReply::Refused(reason) = laid_out {
            anyhow::bail!("{}: {reason}", options.data_dir.display());
        }
        meta_node
            .write(MetaCommand::BeginEpoch)
            .await
            .context("starting a new epoch in the metadata")?;
        let map = meta.map();
        let network = InProcNetwork::new(tokio::runtime::Handle::current(), options.wan_delay_ms);
        let transport = network.transport();
        let nodes = Arc::new(NodeSet {
            running: Mutex::new(BTreeMap::new()),
            network: network.clone(),
            map: map.clone(),
            meta: meta.clone(),
            data_dir: options.data_dir.clone(),
            tune_node: options.tune_node,
            groups_are_new: (!any_replica_state(&options.data_dir.join("nodes"))).into(),
        });
        for info in &map.nodes {
            nodes.start(&info.node).await?;
        }
        nodes
            .groups_are_new
            .store(false, std::sync::atomic::Ordering::Relaxed);
        for group in map.groups.values() {
            for member in &group.members {
                let control = if *member == group.leader {
                    Control::Lead(group.generation)
                } else {
                    Control::Follow(group.generation, group.leader.clone())
                };
                nodes.control(member, group.shard, control);
            }
        }

        let (stop, stopped) = watch::channel(false);
        let (requests, control_requests) = mpsc::channel(64);
        let admin: Arc<dyn Admin> = Arc::new(DevAdmin {
            requests,
            nodes: nodes.clone(),
            network: network.clone(),
        });
        let mut gateways = Vec::new();
        for (i, region) in map.regions().into_iter().enumerate() {
            let id = NodeId::new(format!("gateway-{region}")).unwrap();
            let mut config = options.gateway.clone();
            config.projection_dir = Some(options.data_dir.join("gateways").join(region.as_str()));
            let gateway = Gateway::start(
                id.clone(),
                region.clone(),
                meta.clone(),
                transport.clone(),
                config,
            )?;
            network.attach(id, region.clone(), gateway.sink());
            gateway.set_admin(admin.clone());
            let port = if options.port == 0 {
                0
            } else {
                options.port + i as u16
            };
            let listener = tokio::net::TcpListener::bind((options.bind, port))
                .await
                .with_context(|| {
                    format!("binding the {region} gateway to {}:{port}", options.bind)
                })?;
            let addr = listener.local_addr()?;
            gateway.run_projection();
            gateway.recover_moves();
            gateway.start_rebalancer();
            let app = harbor_gateway::routes(gateway.clone());
            let mut stopped = stopped.clone();
            let server = tokio::spawn(async move {
                let shutdown = async move {
                    let _ = stopped.wait_for(|s| *s).await;
                };
                if let Err(e) = axum::serve(listener, app)
                    .with_graceful_shutdown(shutdown)
                    .await
                {
                    tracing::error!(error = %e, "gateway server failed");
                }
            });
            gateways.push(GatewayHandle {
                region,
                addr,
                gateway,
                server,
            });
        }
        // The control plane stands for a metadata plane with a voter in
        // each region: near every region, untouched by WAN faults.
        let control_id = NodeId::new("control-plane").unwrap();
        let control_endpoint = Endpoint::new(
            control_id.clone(),
            transport.clone(),
            options.gateway.inflight_requests_max,
        );
        network.attach_near_all(control_id, control_endpoint.sink());
        let lease_ms = {
            let mut probe = NodeConfig::new(PathBuf::new());
            (options.tune_node)(&mut probe);
            probe.lease_ms
        };
        let control_map = meta
            .map_linearizable()
            .await
            .context("reading the map for the control loop")?;
        let control_loop = ControlLoop::new(
            control_endpoint,
            meta.clone(),
            &control_map,
            nodes.clone(),
            lease_ms,
            control_requests,
        );
        let stop_control = stopped.clone();
        let control = tokio::spawn(async move {
            control_loop.run(stop_control).await;
        });
        let cluster = DevCluster {
            meta,
            meta_node,
            meta_server,
            network,
            map,
            gateways,
            nodes,
            stop,
            control,
            _data_dir: data_dir,
        };
        cluster.wait_ready(Duration::from_secs(30)).await?;
        Ok(cluster)
    }

    /// Waits until every group's leader has committed its first entry.
    pub async fn wait_ready(&self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        let gateway = &self.gateways[0].gateway;
        loop {
            let mut waiting = 0;
            for shard in self.meta.map().groups.keys() {
                let ready = matches!(
                    gateway.call(Request::Read { shard: *shard, query: Query::Status }).await,
                    Ok(Response::Read { result: QueryResult::Status(s), .. }) if s.ready
                );
                if !ready {
                    waiting += 1;
                }
            }
            if waiting == 0 {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("{waiting} groups have no ready leader after {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn url(&self, region: &str) -> String {
        self.gateways
            .iter()
            .find(|g| g.region.as_str() == region)
            .map(|g| g.url())
            .unwrap_or_else(|| panic!("no gateway in {region}"))
    }

    /// Stops the gateways and the control loop, then every replica after
    /// its current batch.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        for gateway in self.gateways {
            let _ = gateway.server.await;
        }
        let _ = self.control.await;
        self.nodes.stop_all().await;
        self.meta_node.shutdown().await;
        self.meta_server.abort();
    }
}

/// Whether any replica under `nodes` ever wrote durable state (a hard
/// state or a WAL segment). If none did, the groups are new, even when the
/// data directory is not (a start interrupted before any group led).
fn any_replica_state(nodes: &std::path::Path) -> bool {
    let Ok(node_dirs) = std::fs::read_dir(nodes) else {
        return false;
    };
    node_dirs
        .filter_map(Result::ok)
        .filter_map(|node| std::fs::read_dir(node.path()).ok())
        .flatten()
        .filter_map(Result::ok)
        .filter_map(|replica| std::fs::read_dir(replica.path()).ok())
        .flatten()
        .filter_map(Result::ok)
        .any(|file| {
            let name = file.file_name();
            let name = name.to_string_lossy();
            name == harbor_wal::HARD_STATE_NAME || name.ends_with(".seg")
        })
}

/// The embedded metadata plane: one Raft voter on `data_dir/metadata`,
/// listening on loopback (`port + 2`, or any free port for tests).
async fn start_meta_voter(options: &DevOptions) -> anyhow::Result<(Arc<MetaNode>, JoinHandle<()>)> {
    if options
        .data_dir
        .join("meta")
        .join("shard-map.json")
        .exists()
    {
        bail!(
            "{} was written by an older Harbor (file-based metadata); start with a fresh --data-dir",
            options.data_dir.display()
        );
    }
    let port = if options.port == 0 {
        0
    } else {
        options.port + 2
    };
    let listener = tokio::net::TcpListener::bind((options.bind, port))
        .await
        .with_context(|| format!("binding the metadata voter to {}:{port}", options.bind))?;
    let addr = listener.local_addr()?.to_string();
    let mut config = MetaConfig::new(1, options.data_dir.join("metadata"));
    // One voter in one process: it elects itself as soon as it may.
    config.heartbeat_ms = 50;
    config.election_timeout_ms = (150, 300);
    let node = MetaNode::start(&config)
        .await
        .with_context(|| format!("opening the metadata in {}", config.dir.display()))?;
    let app = node.router();
    let server = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "metadata voter server failed");
        }
    });
    node.initialize(&BTreeMap::from([(1, addr)])).await?;
    Ok((node, server))
}

fn gone() -> AdminError {
    AdminError::Unavailable {
        code: harbor_api::ErrorCode::Unavailable,
        message: "the control loop is shutting down".into(),
    }
}

/// The admin hooks of `harbor dev`: transfers and membership changes go to
/// the control loop, faults act on the in-process nodes and network.
struct DevAdmin {
    requests: mpsc::Sender<ControlRequest>,
    nodes: Arc<NodeSet>,
    network: InProcNetwork,
}

impl Admin for DevAdmin {
    fn transfer_leader(
        &self,
        shard: ShardId,
        to: NodeId,
    ) -> BoxFuture<'_, Result<harbor_api::Transfer, AdminError>> {
        Box::pin(async move {
            let (reply, answer) = oneshot::channel();
            let request = ControlRequest::Transfer(TransferRequest { shard, to, reply });
            self.requests.send(request).await.map_err(|_| gone())?;
            transfer_answer(answer.await.map_err(|_| gone())?)
        })
    }

    fn change_members(
        &self,
        shard: ShardId,
        goal: MembersGoal,
    ) -> BoxFuture<'_, Result<harbor_api::MembersChanged, AdminError>> {
        Box::pin(async move {
            let (reply, answer) = oneshot::channel();
            let request = ControlRequest::Members(MembersRequest { shard, goal, reply });
            self.requests.send(request).await.map_err(|_| gone())?;
            members_answer(answer.await.map_err(|_| gone())?)
        })
    }

    fn fault(&self, fault: Fault) -> BoxFuture<'_, Result<harbor_api::FaultDone, AdminError>> {
        Box::pin(async move {
            let start_failed = |node: &NodeId, e: anyhow::Error| AdminError::Failed {
                code: harbor_api::ErrorCode::RestartFailed,
                message: format!("{node} did not start: {e:#}"),
            };
            let changed = match &fault {
                Fault::Crash(node) => {
                    let was = self.nodes.is_running(node);
                    self.nodes.stop(node).await;
                    was
                }
                Fault::Restart(node) => {
                    self.nodes.stop(node).await;
                    self.nodes
                        .start(node)
                        .await
                        .map_err(|e| start_failed(node, e))?;
                    true
                }
                Fault::Pause(node) => {
                    let was = self.network.is_paused(node);
                    if self.nodes.is_running(node) {
                        self.network.pause(node);
                    }
                    !was && self.network.is_paused(node)
                }
                Fault::Resume(node) => {
                    let was = self.network.is_paused(node);
                    self.network.resume(node);
                    was
                }
                Fault::Partition(a, b) | Fault::Heal(a, b) => {
                    let mut faults = self.network.faults();
                    let pairs = [(a.clone(), b.clone()), (b.clone(), a.clone())];
                    let mut changed = false;
                    for pair in pairs {
                        changed |= if matches!(fault, Fault::Partition(..)) {
                            faults.partitioned.insert(pair)
                        } else {
                            faults.partitioned.remove(&pair)
                        };
                    }
                    self.network.set_faults(faults);
                    changed
                }
                Fault::Delay(a, b, ms) => {
                    let mut faults = self.network.faults();
                    for pair in [(a.clone(), b.clone()), (b.clone(), a.clone())] {
                        if *ms == 0 {
                            faults.extra_delay_ms.remove(&pair);
                        } else {
                            faults.extra_delay_ms.insert(pair, *ms);
                        }
                    }
                    self.network.set_faults(faults);
                    true
                }
            };
            tracing::warn!(?fault, changed, "fault injected");
            Ok(harbor_api::FaultDone {
                fault: fault.to_json(),
                changed,
            })
        })
    }
}

//! A real deployment: `harbor meta --config FILE` runs one metadata voter
//! (and, while it leads, the control loop); `harbor node --config FILE` runs
//! one node's replicas and, if the cluster file says so, its region's HTTP
//! gateway. Every process reads the same cluster file for the topology and
//! the address of every endpoint (`deploy/` has a two-region example on
//! loopback).

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use harbor_gateway::endpoint::Endpoint;
use harbor_gateway::{Gateway, GatewayConfig};
use harbor_meta::{MetaCommand, MetaReply, Metadata, Topology};
use harbor_meta_raft::{MetaConfig, MetaNode, RemoteMeta};
use harbor_node::{LateSink, Node, NodeConfig, TcpTransport, Transport};
use harbor_types::{limits, NodeId, Region};
use serde::Deserialize;
use tokio::sync::{mpsc, watch};

use crate::control::{
    members_answer, transfer_answer, ControlLoop, ControlRequest, MembersDone, MembersFailed,
    MembersGoal, MembersRequest, OverTheWire, TransferDone, TransferFailed, TransferRequest,
};
use crate::data_dir::{DataDir, DataKind};
use axum::extract::State;
use axum::routing::post;
use axum::{Json, Router};
use futures::future::BoxFuture;
use harbor_gateway::{Admin, AdminError};
use harbor_types::ShardId;
use serde::Serialize;
use tokio::sync::oneshot;

/// The cluster file: shared by every process.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterFile {
    pub topology: Topology,
    pub meta: MetaSection,
    /// Transport address of each node (`REGION-N`, as the topology names
    /// them).
    pub nodes: BTreeMap<String, SocketAddr>,
    /// One HTTP gateway per region, hosted by one of its nodes.
    pub gateways: BTreeMap<String, GatewaySection>,
    /// Limits every process must agree on (all optional).
    #[serde(default)]
    pub limits: LimitsSection,
    /// Timings every process must agree on (all optional).
    #[serde(default)]
    pub timings: TimingsSection,
}

/// `[timings]`: the deployment's tunables. Defaults are in
/// `harbor_types::limits`; the rules between them are checked when the
/// file is read.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TimingsSection {
    /// Writes are refused while a remote copy is further behind than this.
    pub rpo_budget_ms: u64,
    /// A leader's lease; the control plane waits it out (plus a margin)
    /// before naming the next leader.
    pub lease_ms: u64,
    pub heartbeat_interval_ms: u64,
    pub retransmit_timeout_ms: u64,
    /// An idle leader orders a no-op after this long, so change feeds'
    /// resolved marks advance.
    pub resolved_tick_ms: u64,
    /// How long a gateway waits for a group's leader.
    pub request_timeout_ms: u64,
    /// How often a gateway saves its projection to its process's data
    /// directory (when rows changed).
    pub projection_save_ms: u64,
    /// How often a gateway's rebalancer (where `rebalance = true`) looks at
    /// its region's loads.
    pub rebalance_interval_ms: u64,
    /// How long a bucket the rebalancer moved stays where it went.
    pub rebalance_cooldown_ms: u64,
    /// Groups below this many writes per second are not rebalanced.
    pub rebalance_writes_per_s_min: u64,
    /// A bucket is hot at this share (percent) of its group's writes.
    pub rebalance_hot_share_percent: u64,
}

impl Default for TimingsSection {
    fn default() -> TimingsSection {
        TimingsSection {
            rpo_budget_ms: limits::RPO_BUDGET_MS,
            lease_ms: limits::LEASE_MS,
            heartbeat_interval_ms: limits::HEARTBEAT_INTERVAL_MS,
            retransmit_timeout_ms: limits::RETRANSMIT_TIMEOUT_MS,
            resolved_tick_ms: limits::RESOLVED_TICK_MS,
            request_timeout_ms: limits::REQUEST_TIMEOUT_MS,
            projection_save_ms: limits::PROJECTION_SAVE_MS,
            rebalance_interval_ms: limits::REBALANCE_INTERVAL_MS,
            rebalance_cooldown_ms: limits::REBALANCE_COOLDOWN_MS,
            rebalance_writes_per_s_min: limits::REBALANCE_WRITES_PER_S_MIN,
            rebalance_hot_share_percent: limits::REBALANCE_HOT_SHARE_PERCENT,
        }
    }
}

impl TimingsSection {
    fn apply(&self, config: &mut NodeConfig) {
        config.rpo_budget_ms = self.rpo_budget_ms;
        config.lease_ms = self.lease_ms;
        config.heartbeat_interval_ms = self.heartbeat_interval_ms;
        config.retransmit_timeout_ms = self.retransmit_timeout_ms;
        config.resolved_tick_ms = self.resolved_tick_ms;
    }

    fn gateway(&self) -> GatewayConfig {
        let mut config = GatewayConfig::default();
        config.call.request_timeout_ms = self.request_timeout_ms;
        config.projection_save_ms = self.projection_save_ms;
        config.rebalance_interval_ms = self.rebalance_interval_ms;
        config.rebalance_cooldown_ms = self.rebalance_cooldown_ms;
        config.rebalance_limits.writes_per_s_min = self.rebalance_writes_per_s_min;
        config.rebalance_limits.hot_share_percent = self.rebalance_hot_share_percent;
        config
    }
}

/// `[limits]`: sizes that bound messages between processes and what a
/// lagging replica is sent. Defaults suit production; tests shrink them.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsSection {
    /// The largest TCP frame sent or accepted.
    pub frame_bytes_max: usize,
    /// Bytes of a snapshot in one message.
    pub snapshot_chunk_bytes_max: usize,
    /// Payload bytes in one append message.
    pub append_bytes_max: usize,
    /// Entries a replica applies between state-machine snapshots.
    pub snapshot_interval_entries: u64,
    /// Entries a leader keeps in memory for lagging followers.
    pub retained_entries_max: u64,
    /// Changes each replica keeps for change feeds (estimated bytes).
    pub changes_retained_bytes: usize,
    /// Changes older than this (before the newest entry applied) go,
    /// whatever their size.
    pub changes_retained_ms: u64,
}

impl Default for LimitsSection {
    fn default() -> LimitsSection {
        let node = NodeConfig::new(PathBuf::new());
        LimitsSection {
            frame_bytes_max: limits::FRAME_BYTES_MAX,
            snapshot_chunk_bytes_max: node.snapshot_chunk_bytes_max,
            append_bytes_max: node.append_bytes_max,
            snapshot_interval_entries: node.snapshot_interval_entries,
            retained_entries_max: node.retained_entries_max,
            changes_retained_bytes: node.changes_retained_bytes,
            changes_retained_ms: node.changes_retained_ms,
        }
    }
}

impl LimitsSection {
    fn apply(&self, config: &mut NodeConfig) {
        config.snapshot_chunk_bytes_max = self.snapshot_chunk_bytes_max;
        config.append_bytes_max = self.append_bytes_max;
        config.snapshot_interval_entries = self.snapshot_interval_entries;
        config.retained_entries_max = self.retained_entries_max;
        config.changes_retained_bytes = self.changes_retained_bytes;
        config.changes_retained_ms = self.changes_retained_ms;
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetaSection {
    pub voters: Vec<VoterSection>,
}

/// One metadata voter.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VoterSection {
    pub id: u64,
    /// Raft traffic and `/meta/*`.
    pub http: SocketAddr,
    /// The transport address of its control loop (which runs while it
    /// leads the metadata plane).
    pub control: SocketAddr,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewaySection {
    /// The node whose process serves it.
    pub host: String,
    pub http: SocketAddr,
    pub transport: SocketAddr,
    /// Whether this gateway moves its region's hot buckets on its own (the
    /// rebalancer).
    #[serde(default)]
    pub rebalance: bool,
}

/// `harbor meta --config FILE`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetaFile {
    /// The cluster file, relative to this file.
    pub cluster: PathBuf,
    pub id: u64,
    /// Relative paths are relative to the working directory.
    pub data_dir: PathBuf,
}

/// `harbor node --config FILE`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeFile {
    pub cluster: PathBuf,
    pub name: String,
    pub data_dir: PathBuf,
}

fn read_toml<T: serde::de::DeserializeOwned>(path: &Path) -> anyhow::Result<T> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

fn read_cluster(config: &Path, cluster: &Path) -> anyhow::Result<ClusterFile> {
    let path = config.parent().unwrap_or(Path::new(".")).join(cluster);
    let file: ClusterFile = read_toml(&path)?;
    file.topology
        .validate()
        .map_err(|e| anyhow::anyhow!("{}: topology: {e}", path.display()))?;
    let map = harbor_meta::ShardMap::from_topology(&file.topology);
    for info in &map.nodes {
        if !file.nodes.contains_key(info.node.as_str()) {
            bail!("{}: no address for node {}", path.display(), info.node);
        }
    }
    for region in &file.topology.regions {
        if !file.gateways.contains_key(region.as_str()) {
            bail!("{}: no gateway for region {region}", path.display());
        }
    }
    let limits = &file.limits;
    harbor_node::transport::messages_fit_frames(
        limits.frame_bytes_max,
        limits.append_bytes_max,
        limits::ENTRY_BYTES_MAX,
        limits.snapshot_chunk_bytes_max,
    )
    .map_err(|e| anyhow::anyhow!("{}: [limits]: {e}", path.display()))?;
    for (name, value) in [
        (
            "snapshot_chunk_bytes_max",
            limits.snapshot_chunk_bytes_max as u64,
        ),
        ("append_bytes_max", limits.append_bytes_max as u64),
        (
            "snapshot_interval_entries",
            limits.snapshot_interval_entries,
        ),
        ("retained_entries_max", limits.retained_entries_max),
        (
            "changes_retained_bytes",
            limits.changes_retained_bytes as u64,
        ),
        ("changes_retained_ms", limits.changes_retained_ms),
    ] {
        if value == 0 {
            bail!(
                "{}: [limits]: {name} must be greater than zero",
                path.display()
            );
        }
    }
    let mut node = NodeConfig::new(PathBuf::new());
    file.limits.apply(&mut node);
    file.timings.apply(&mut node);
    node.validate()
        .map_err(|e| anyhow::anyhow!("{}: [limits] and [timings]: {e}", path.display()))?;
    file.timings
        .gateway()
        .validate()
        .map_err(|e| anyhow::anyhow!("{}: [timings]: {e}", path.display()))?;
    let mut ids: Vec<u64> = file.meta.voters.iter().map(|v| v.id).collect();
    ids.sort_unstable();
    ids.dedup();
    if ids.is_empty() || ids.len() != file.meta.voters.len() {
        bail!(
            "{}: [[meta.voters]] needs voters with distinct ids",
            path.display()
        );
    }
    Ok(file)
}

impl ClusterFile {
    /// Every transport endpoint's address: nodes, gateways, control loops.
    fn peers(&self) -> HashMap<NodeId, SocketAddr> {
        let mut peers = HashMap::new();
        for (name, addr) in &self.nodes {
            peers.insert(NodeId::new(name).unwrap(), *addr);
        }
        for (region, g) in &self.gateways {
            peers.insert(gateway_id(region), g.transport);
        }
        for voter in &self.meta.voters {
            peers.insert(control_id(voter.id), voter.control);
        }
        peers
    }

    fn voter_addrs(&self) -> Vec<String> {
        self.meta
            .voters
            .iter()
            .map(|v| v.http.to_string())
            .collect()
    }

    fn voter(&self, id: u64) -> Option<&VoterSection> {
        self.meta.voters.iter().find(|v| v.id == id)
    }
}

fn gateway_id(region: &str) -> NodeId {
    NodeId::new(format!("gateway-{region}")).unwrap()
}

fn control_id(voter: u64) -> NodeId {
    NodeId::new(format!("control-{voter}")).unwrap()
}

/// Runs one metadata voter until `stop` fires.
pub async fn run_meta(config_path: &Path, mut stop: watch::Receiver<bool>) -> anyhow::Result<()> {
    let file: MetaFile = read_toml(config_path)?;
    let cluster = read_cluster(config_path, &file.cluster)?;
    let Some(voter) = cluster.voter(file.id).cloned() else {
        bail!(
            "voter {} is not in the cluster file's [[meta.voters]]",
            file.id
        );
    };
    let _data_dir = DataDir::open(&file.data_dir, DataKind::Meta)?;
    let addr = voter.http;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding voter {} to {addr}", file.id))?;
    let node = MetaNode::start(&MetaConfig::new(file.id, file.data_dir.clone()))
        .await
        .with_context(|| format!("opening the metadata in {}", file.data_dir.display()))?;
    // Planned transfers and membership changes reach the control loop
    // through `/admin/transfer` and `/admin/members`.
    let (to_control, mut requests) = mpsc::channel(64);
    let admin = Router::new()
        .route("/admin/transfer", post(transfer))
        .route("/admin/members", post(members))
        .with_state(VoterState {
            node: node.clone(),
            requests: to_control,
        });
    let app = node.router().merge(admin);
    let server = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "metadata voter server failed");
        }
    });
    let voters: BTreeMap<u64, String> = cluster
        .meta
        .voters
        .iter()
        .map(|v| (v.id, v.http.to_string()))
        .collect();
    // One voter creates the cluster; the others join when it reaches them.
    if Some(&file.id) == voters.keys().next() {
        node.initialize(&voters).await?;
    }
    // Lay the cluster out (only the first bootstrap counts). The verdict on
    // a cluster file whose topology changed since comes from the committed
    // state, whichever voter applied the first bootstrap and however far
    // this one's own copy has got.
    loop {
        match node
            .write(MetaCommand::Bootstrap(cluster.topology.clone()))
            .await
        {
            Ok(MetaReply::Refused(reason)) => bail!("{}: {reason}", file.cluster.display()),
            Ok(_) => break,
            Err(e) => {
                tracing::warn!(error = %e, "waiting for a metadata quorum to bootstrap");
                if *stop.borrow() {
                    return Ok(());
                }
            }
        }
    }
    eprintln!(
        "metadata voter {} serving on {addr}; data in {}",
        file.id,
        file.data_dir.display()
    );

    // The control endpoint: status requests and orders to nodes.
    let me = control_id(file.id);
    let control_addr = voter.control;
    let control_listener = tokio::net::TcpListener::bind(control_addr)
        .await
        .with_context(|| format!("binding the control endpoint to {control_addr}"))?;
    let sink = LateSink::new();
    let transport: Arc<dyn Transport> = TcpTransport::start_with_frame_limit(
        me.clone(),
        control_listener,
        cluster.peers(),
        sink.sink(),
        cluster.limits.frame_bytes_max,
    );
    let meta: Arc<dyn Metadata> = node.clone();
    let endpoint = Endpoint::new(
        me,
        transport,
        cluster.timings.gateway().inflight_requests_max,
    );
    sink.connect(endpoint.sink());
    let lease_ms = cluster.timings.lease_ms;

    // The control loop runs on the metadata leader only, afresh each time
    // this voter becomes leader.
    loop {
        if *stop.borrow() {
            break;
        }
        if node.leader() != Some(node.id) {
            tokio::select! {
                _ = stop.changed() => {}
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            }
            continue;
        }
        tracing::info!(
            voter = node.id,
            "leading the metadata plane: control loop starts"
        );
        let (lose, lost) = watch::channel(false);
        let watcher = {
            let (node, mut stop) = (node.clone(), stop.clone());
            tokio::spawn(async move {
                loop {
                    if node.leader() != Some(node.id) || *stop.borrow() {
                        let _ = lose.send(true);
                        return;
                    }
                    tokio::select! {
                        _ = stop.changed() => {}
                        _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                    }
                }
            })
        };
        let map = match meta.map_linearizable().await {
            Ok(map) => map,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the map as the metadata leader; trying again");
                watcher.abort();
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        let control = ControlLoop::new(
            endpoint.clone(),
            meta.clone(),
            &map,
            Arc::new(OverTheWire(endpoint.clone())),
            lease_ms,
            requests,
        );
        requests = control.run(lost).await;
        let _ = watcher.await;
        tracing::info!(voter = node.id, "control loop stopped");
    }
    node.shutdown().await;
    server.abort();
    Ok(())
}

#[derive(Clone)]
struct VoterState {
    node: Arc<MetaNode>,
    requests: mpsc::Sender<ControlRequest>,
}

/// `POST /admin/transfer` on a voter: `{"shard", "to"}`.
#[derive(Serialize, Deserialize)]
struct TransferAsk {
    shard: ShardId,
    to: NodeId,
}

/// `POST /admin/members` on a voter: `{"shard", "goal"}`.
#[derive(Serialize, Deserialize)]
struct MembersAskBody {
    shard: ShardId,
    goal: MembersGoal,
}

/// A voter's answer to an admin request.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum VoterAnswer<T> {
    Finished(T),
    /// This voter does not lead the metadata plane: ask another.
    NotLeader,
}

impl VoterState {
    /// Hands a request to this voter's control loop (if it leads the
    /// metadata plane) and waits for its answer.
    async fn ask<T>(
        &self,
        request: impl FnOnce(oneshot::Sender<T>) -> ControlRequest,
    ) -> Json<VoterAnswer<T>> {
        if self.node.leader() != Some(self.node.id) {
            return Json(VoterAnswer::NotLeader);
        }
        let (reply, answer) = oneshot::channel();
        if self.requests.send(request(reply)).await.is_err() {
            return Json(VoterAnswer::NotLeader);
        }
        Json(match answer.await {
            Ok(result) => VoterAnswer::Finished(result),
            // The control loop stopped (leadership lost) before answering.
            Err(_) => VoterAnswer::NotLeader,
        })
    }
}

async fn transfer(
    State(state): State<VoterState>,
    Json(ask): Json<TransferAsk>,
) -> Json<VoterAnswer<Result<TransferDone, TransferFailed>>> {
    state
        .ask(|reply| {
            ControlRequest::Transfer(TransferRequest {
                shard: ask.shard,
                to: ask.to,
                reply,
            })
        })
        .await
}

async fn members(
    State(state): State<VoterState>,
    Json(ask): Json<MembersAskBody>,
) -> Json<VoterAnswer<Result<MembersDone, MembersFailed>>> {
    state
        .ask(|reply| {
            ControlRequest::Members(MembersRequest {
                shard: ask.shard,
                goal: ask.goal,
                reply,
            })
        })
        .await
}

/// The admin hooks of a node's gateway: transfers and membership changes
/// go to the metadata leader's control loop; faults exist only in
/// `harbor dev`.
struct RemoteAdmin {
    voters: Vec<String>,
    client: reqwest::Client,
}

impl RemoteAdmin {
    /// Asks each voter in turn until the metadata leader answers: a voter
    /// that leads gets `takes` to finish; the others are asked for 10 s
    /// (from when a leader that held the request let go of it, at most
    /// three times).
    async fn ask<A: Serialize, T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        ask: &A,
        takes: Duration,
    ) -> Result<T, AdminError> {
        let mut deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let mut extended = 0;
        loop {
            for voter in &self.voters {
                let url = format!("http://{voter}{path}");
                let request = self.client.post(&url).json(ask).timeout(takes);
                let asked = tokio::time::Instant::now();
                let Ok(response) = request.send().await else {
                    continue;
                };
                match response.json::<VoterAnswer<T>>().await {
                    Ok(VoterAnswer::Finished(result)) => return Ok(result),
                    // A voter that held the request a while lost its
                    // leadership: the next leader's loop takes the change
                    // over, and a membership change asked again waits for
                    // it, so the others get 10 s more.
                    Ok(VoterAnswer::NotLeader)
                        if asked.elapsed() > Duration::from_secs(1) && extended < 3 =>
                    {
                        extended += 1;
                        deadline = tokio::time::Instant::now() + Duration::from_secs(10);
                    }
                    Ok(VoterAnswer::NotLeader) => {}
                    Err(_) => {}
                }
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(AdminError::Unavailable {
                    code: harbor_api::ErrorCode::Unavailable,
                    message: "no metadata leader took the request".into(),
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Admin for RemoteAdmin {
    fn transfer_leader(
        &self,
        shard: ShardId,
        to: NodeId,
    ) -> BoxFuture<'_, Result<harbor_api::Transfer, AdminError>> {
        Box::pin(async move {
            let ask = TransferAsk { shard, to };
            // It answers when it is done (at most ~1 s of drain).
            let result = self
                .ask("/admin/transfer", &ask, Duration::from_secs(15))
                .await?;
            transfer_answer(result)
        })
    }

    fn change_members(
        &self,
        shard: ShardId,
        goal: MembersGoal,
    ) -> BoxFuture<'_, Result<harbor_api::MembersChanged, AdminError>> {
        Box::pin(async move {
            let ask = MembersAskBody { shard, goal };
            // An addition waits for the new replica to catch up.
            let takes = Duration::from_millis(limits::MEMBER_CATCH_UP_MS + 30_000);
            let result = self.ask("/admin/members", &ask, takes).await?;
            members_answer(result)
        })
    }
}

/// Runs one node (and its region's gateway, if it hosts it) until `stop`.
pub async fn run_node(config_path: &Path, mut stop: watch::Receiver<bool>) -> anyhow::Result<()> {
    let file: NodeFile = read_toml(config_path)?;
    let cluster = read_cluster(config_path, &file.cluster)?;
    let name = NodeId::new(&file.name).map_err(|e| anyhow::anyhow!("name: {e}"))?;
    let Some(addr) = cluster.nodes.get(&file.name).copied() else {
        bail!("node {name} is not in the cluster file's [nodes]");
    };
    let _data_dir = DataDir::open(&file.data_dir, DataKind::Node)?;
    let meta = RemoteMeta::connect(cluster.voter_addrs(), Duration::from_secs(60))
        .await
        .context("reaching the metadata plane")?;
    meta.refresh_every(Duration::from_secs(1));
    let meta: Arc<dyn Metadata> = meta;
    // Read linearizably: a replica that finds its disk empty starts at its
    // group's fence as the metadata plane holds it now.
    // The metadata plane may be electing a leader while nodes start.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let map = loop {
        match meta.map_linearizable().await {
            Ok(map) => break map,
            Err(e) if tokio::time::Instant::now() < deadline => {
                tracing::warn!(error = %e, "waiting for the metadata leader to read the shard map");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => {
                return Err(anyhow::anyhow!(e))
                    .context("reading the shard map from the metadata leader")
            }
        }
    };
    let region = map
        .region_of(&name)
        .with_context(|| format!("node {name} is not in the shard map"))?
        .clone();
    let groups = crate::hosting::replica_plans(&map, &name);
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding node {name} to {addr}"))?;
    let sink = LateSink::new();
    let transport: Arc<dyn Transport> = TcpTransport::start_with_frame_limit(
        name.clone(),
        listener,
        cluster.peers(),
        sink.sink(),
        cluster.limits.frame_bytes_max,
    );
    let mut config = NodeConfig::new(file.data_dir.clone());
    cluster.limits.apply(&mut config);
    cluster.timings.apply(&mut config);
    // An empty replica always starts recovering here: a node cannot tell a
    // new group from one whose data it lost. The control plane starts a group whose members
    // are all empty as a new one (`Action::StartNewGroup`).
    config.groups_are_new = false;
    let node = {
        let (name, region) = (name.clone(), region.clone());
        tokio::task::spawn_blocking(move || Node::start(name, region, groups, config, transport))
            .await??
    };
    node.on_membership(crate::hosting::open_when_named(
        name.clone(),
        meta.clone(),
        node.hosting(),
    ));
    sink.connect(node.sink());
    eprintln!(
        "node {name} ({region}) serving on {addr} with {} replicas; data in {}",
        node.shards().len(),
        file.data_dir.display()
    );

    let mut server = None;
    if let Some(g) = cluster
        .gateways
        .get(region.as_str())
        .filter(|g| g.host == file.name)
    {
        let id = gateway_id(region.as_str());
        let listener = tokio::net::TcpListener::bind(g.transport)
            .await
            .with_context(|| format!("binding the gateway transport to {}", g.transport))?;
        let sink = LateSink::new();
        let transport: Arc<dyn Transport> = TcpTransport::start_with_frame_limit(
            id.clone(),
            listener,
            cluster.peers(),
            sink.sink(),
            cluster.limits.frame_bytes_max,
        );
        let mut config = cluster.timings.gateway();
        config.projection_dir = Some(file.data_dir.join("projection"));
        config.rebalance = g.rebalance;
        let gateway = Gateway::start(
            id,
            Region::new(region.as_str()).unwrap(),
            meta.clone(),
            transport,
            config,
        )?;
        sink.connect(gateway.sink());
        gateway.set_admin(Arc::new(RemoteAdmin {
            voters: cluster.voter_addrs(),
            client: reqwest::Client::builder()
                .connect_timeout(Duration::from_secs(2))
                .build()
                .expect("an HTTP client"),
        }));
        let http = tokio::net::TcpListener::bind(g.http)
            .await
            .with_context(|| format!("binding the {region} gateway to {}", g.http))?;
        gateway.run_projection();
        gateway.recover_moves();
        gateway.start_rebalancer();
        let app = harbor_gateway::routes(gateway);
        let mut stopped = stop.clone();
        server = Some(tokio::spawn(async move {
            let shutdown = async move {
                let _ = stopped.wait_for(|s| *s).await;
            };
            if let Err(e) = axum::serve(http, app)
                .with_graceful_shutdown(shutdown)
                .await
            {
                tracing::error!(error = %e, "gateway server failed");
            }
        }));
        eprintln!("{region} gateway on http://{}", g.http);
    }
    let _ = stop.wait_for(|s| *s).await;
    if let Some(server) = server {
        let _ = server.await;
    }
    tokio::task::spawn_blocking(move || node.shutdown()).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The repository's example cluster file, with `extra` appended.
    fn read_with(extra: &str) -> anyhow::Result<ClusterFile> {
        let example = include_str!("../../../deploy/cluster.toml");
        let dir = tempfile::tempdir()?;
        std::fs::write(
            dir.path().join("cluster.toml"),
            format!("{example}\n{extra}"),
        )?;
        read_cluster(&dir.path().join("node.toml"), Path::new("cluster.toml"))
    }

    #[test]
    fn timings_are_read_and_their_rules_checked() {
        let file = read_with("").unwrap();
        assert_eq!(file.timings.lease_ms, limits::LEASE_MS);
        let file = read_with("[timings]\nlease_ms = 3000\nrpo_budget_ms = 2000\n").unwrap();
        assert_eq!(
            (file.timings.lease_ms, file.timings.rpo_budget_ms),
            (3_000, 2_000)
        );

        // Small limits, as tests use, fit the rules.
        let small = "[limits]\nframe_bytes_max = 2097152\nsnapshot_chunk_bytes_max = 65536\n\
                     append_bytes_max = 262144\nsnapshot_interval_entries = 500\n\
                     retained_entries_max = 100\n";
        read_with(small).unwrap();
        let e = read_with("[timings]\nlease_ms = 500\n").unwrap_err();
        assert!(
            e.to_string()
                .contains("lease_ms must be longer than retransmit_timeout_ms"),
            "{e}"
        );
        let e = read_with("[timings]\nrequest_timeout_ms = 400\n").unwrap_err();
        assert!(e.to_string().contains("local_read_timeout_ms"), "{e}");
        let e = read_with("[timings]\nlease_ms = 0\n").unwrap_err();
        assert!(e.to_string().contains("lease_ms"), "{e}");
        let e = read_with("[timings]\nleas_ms = 3000\n").unwrap_err();
        assert!(format!("{e:#}").contains("unknown field"), "{e:#}");
    }
}

use std::collections::{BTreeMap, BTreeSet};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Mutex};

use harbor_checker::{Call as HistoryCall, ErrorReply, FinalLine, HistoryRecorder, Reply};
use harbor_gateway::call::{Call, CallLimits, MapEntry, Step};
use harbor_meta::{
    ControlConfig, ControlCore, DirectoryEntry, FailoverConfig, MetaCommand, MetaFuture, MetaReply,
    Metadata, Order, ShardMap,
};
use harbor_node::driver::{Driver, ReplicaInput};
use harbor_node::NodeConfig;
use harbor_replication::{Member, Role};
use harbor_reservation::{Command, Outcome, TokenOutcome, TokenView};
use harbor_types::sim::Bugs;
use harbor_types::{
    Amount, CommitToken, Generation, IssuerId, MonoMs, NodeId, Now, Region, ReservationId,
    ReservationToken, ShardId, WallMs,
};
use harbor_wal::MemStorage;
use harbor_wire::Control;
use harbor_wire::Transport;
use harbor_wire::{Body, Envelope, Freshness, Query, QueryResult, Request, Response};
use serde_json::{json, Value};

use harbor_types::limits::{
    CONTROL_INTERVAL_MS, STATUS_TIMEOUT_MS, SUSPECT_TIMEOUT_MS, TRANSFER_INTERVAL_MS,
};

use crate::rng::Rng;
use crate::swarm::Swarm;

/// One run's shape. Every field has a default sized for CI sweeps.
#[derive(Clone, Debug)]
pub struct SimOptions {
    pub seed: u64,
    pub bugs: Bugs,
    /// Inject faults during the safety phase.
    pub faults: bool,
    /// Simulated length of the safety phase.
    pub safety_ms: u64,
    /// The liveness phase must converge within this much simulated time.
    pub liveness_ms_max: u64,
    pub clients: usize,
    /// How long a client waits before it calls an operation unknown.
    pub client_timeout_ms: u64,
    /// Draw this seed's topology, limits and timings (swarm testing);
    /// otherwise every seed runs the fixed shape of [`Swarm::fixed`].
    pub swarm: bool,
}

impl SimOptions {
    pub fn new(seed: u64) -> SimOptions {
        SimOptions {
            seed,
            bugs: Bugs::none(),
            faults: true,
            safety_ms: 8_000,
            liveness_ms_max: 30_000,
            clients: 10,
            client_timeout_ms: 1_000,
            swarm: true,
        }
    }
}

#[derive(Clone, Debug, Default)]
pub struct SimStats {
    pub ops: u64,
    pub ok: u64,
    pub fail: u64,
    pub info: u64,
    pub delivered: u64,
    pub dropped: u64,
    pub crashes: u64,
    pub fsync_failures: u64,
    pub failovers: u64,
    /// Planned leader transfers that named their target.
    pub transfers: u64,
    pub transfers_abandoned: u64,
    /// Control orders delivered after newer ones (a deposed control loop).
    pub stale_orders: u64,
    /// Batches of reserves answered with their outcomes.
    pub batches: u64,
    pub partitions: u64,
    pub pauses: u64,
    pub isolations: u64,
    /// Wall-clock steps of a node by a second or more.
    pub wall_steps: u64,
    /// Nodes whose disks were replaced (they restart empty).
    pub disks_replaced: u64,
    pub simulated_ms: u64,
}

pub struct SimOutcome {
    pub seed: u64,
    /// The history, JSON lines (docs/history-format.md).
    pub history: String,
    /// Everything the checker and the simulator's own checks found.
    pub violations: Vec<String>,
    pub stats: SimStats,
    /// Coverage probes this run hit, and how often (every probe listed).
    pub probes: Vec<(&'static str, u64)>,
}

/// Runs one seed to the end and checks it. A panic inside the cluster (a
/// failed assertion) is reported as a violation, with the history so far.
pub fn run(options: SimOptions) -> SimOutcome {
    let seed = options.seed;
    // Whatever ran on this thread before is not this run's.
    let _ = harbor_types::sim::take_probe_hits();
    let mut world = match catch_unwind(AssertUnwindSafe(|| World::new(options))) {
        Ok(world) => world,
        Err(panic) => {
            let text = panic_text(panic.as_ref());
            return SimOutcome {
                seed,
                history: String::new(),
                violations: vec![format!("the simulator could not build its world: {text}")],
                stats: SimStats::default(),
                probes: harbor_types::sim::take_probe_hits(),
            };
        }
    };
    let result = catch_unwind(AssertUnwindSafe(|| world.run()));
    let mut violations = Vec::new();
    if let Err(panic) = result {
        let text = panic_text(panic.as_ref());
        violations.push(format!("assertion failed inside the cluster: {text}"));
    }
    violations.extend(world.violations.iter().cloned());
    let history = world.recorder.to_jsonl();
    match harbor_checker::History::parse(&history) {
        Ok(parsed) => {
            let report = harbor_checker::check(&parsed);
            violations.extend(report.violations.iter().map(|v| v.to_string()));
        }
        Err(e) => violations.push(format!("the history does not parse: {e}")),
    }
    world.stats.simulated_ms = world.now;
    SimOutcome {
        seed,
        history,
        violations,
        stats: world.stats.clone(),
        probes: harbor_types::sim::take_probe_hits(),
    }
}

fn panic_text(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "unknown panic".into())
}

/// Envelopes sent by drivers during one step.
#[derive(Default)]
struct Outbox(Mutex<Vec<Envelope>>);

impl Transport for Outbox {
    fn send(&self, envelope: Envelope) {
        self.0.lock().unwrap().push(envelope);
    }
}

#[derive(Debug)]
enum Event {
    Deliver(Envelope),
    Tick(NodeId),
    ClientStep(usize),
    ClientTimeout(usize, u64),
    /// A client's gateway call asked to be woken (client, operation, when).
    ClientWake(usize, u64, MonoMs),
    Fault,
    Restart(NodeId),
    CrashRestart(NodeId),
    /// Crash now, restart after this many ms.
    CrashFor(NodeId, u64),
    Heal(Region, Region),
    /// The control plane looks at every group.
    Control,
    Liveness,
}

struct SimNode {
    region: Region,
    up: bool,
    paused_until: u64,
    /// The node's monotonic clock reads simulated time plus this (a new
    /// origin at every start, like a new process). Never steps.
    mono_origin_ms: u64,
    /// Wall-clock drift, within `CLOCK_SKEW_MS_MAX`.
    skew_ms: i64,
    /// Wall-clock steps (an operator, NTP, a resumed VM), by seconds, in
    /// either direction; the monotonic clock does not see them.
    wall_step_ms: i64,
    replicas: BTreeMap<ShardId, Driver<MemStorage>>,
    disks: BTreeMap<ShardId, MemStorage>,
}

struct Group {
    home: Region,
    members: Vec<NodeId>,
    /// The leader and generation the metadata plane publishes (what
    /// gateways route by).
    published: (NodeId, Generation),
    /// Earlier publications with when they were made, newest last (a few):
    /// a gateway's copy of the map may trail the metadata leader's.
    history: Vec<(u64, NodeId, Generation)>,
}

impl Group {
    fn leader(&self) -> &NodeId {
        &self.published.0
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Op {
    Register,
    Reserve,
    Confirm,
    Release,
    Resolve,
    TokenLookup,
    ReadIssuer,
    /// Several reserves in one `Command::Batch`; each is recorded as an
    /// operation of its own sub-client.
    ReserveBatch,
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::Register => "register_issuer",
            Op::Reserve => "reserve",
            Op::Confirm => "confirm",
            Op::Release => "release",
            Op::Resolve => "resolve",
            Op::TokenLookup => "token_lookup",
            Op::ReadIssuer => "read_issuer",
            Op::ReserveBatch => "reserve",
        }
    }
}

struct Inflight {
    op_id: u64,
    request_id: u64,
    op: Op,
    token: Option<(ReservationToken, IssuerId)>,
    /// A read other than strong: what it asked for. It went to a replica
    /// in the client's region; if that one refuses, the strong read here
    /// goes to the leader (as a gateway does).
    read: Option<LocalRead>,
    /// A batch: its reserves, each its own operation (`op_id` is the first).
    batch: Vec<BatchItem>,
    /// The gateway's call that carries the request to the leader (the
    /// shipped state machine), once the request goes there.
    call: Option<GatewayCall>,
}

/// A request on its way to its group's leader, as the gateway sends it.
struct GatewayCall {
    call: Call,
    request: Request,
    /// Where the current attempt went (a resend goes there again).
    to: NodeId,
    route: Option<Generation>,
    /// The wake-up the call asked for last; older ones are stale.
    wake_at: Option<MonoMs>,
}

/// One reserve of a batch, recorded under a sub-client of its own
/// (`client-3.b1`) so the history keeps one operation per client in flight.
struct BatchItem {
    /// The op the recorder gave it, under its sub-client.
    op_id: u64,
    used: TokenUse,
}

#[derive(Clone)]
struct LocalRead {
    max_staleness_ms: Option<u64>,
    /// The tokens the client named (its session, or causal dependencies).
    named: Vec<CommitToken>,
    /// Taken when it is sent.
    fallback: Option<Request>,
}

#[derive(Clone)]
struct TokenUse {
    token: ReservationToken,
    issuer: IssuerId,
    amount: u64,
    hold_ttl_ms: Option<u64>,
}

struct Client {
    id: NodeId,
    region: Region,
    inflight: Option<Inflight>,
    used: Vec<TokenUse>,
    held: Vec<ReservationId>,
    mine: Vec<ReservationId>,
    /// Tokens whose outcome the client does not know.
    unknown: Vec<(ReservationToken, IssuerId)>,
    next_token: u64,
    /// The client's (gateway's) cached shard map, leader and generation per
    /// group: refreshed every few seconds, and at once on a `stale_route`
    /// answer; a not-leader hint moves the leader. A stale cache sends
    /// requests to an old leader, which must then refuse or fence them.
    leaders: BTreeMap<ShardId, (NodeId, Generation)>,
    /// The entry each group had in the cache before the last refresh that
    /// changed it: some strong reads go there, as from a gateway whose map
    /// is older still. An old leader must refuse them once it could be
    /// replaced (its lease), or they are stale.
    previous_leaders: BTreeMap<ShardId, (NodeId, Generation)>,
    map_refresh_at: u64,
    /// The gateway's copy of the issuer directory, pulled with the map.
    directory: BTreeMap<IssuerId, DirectoryEntry>,
    inflight_shard: Option<ShardId>,
    /// The newest commit token the client saw per shard: from its own
    /// writes and from what its reads showed (a gateway session).
    session: BTreeMap<ShardId, CommitToken>,
}

struct World {
    options: SimOptions,
    rng: Rng,
    now: u64,
    seq: u64,
    queue: BTreeMap<(u64, u64), Event>,
    nodes: BTreeMap<NodeId, SimNode>,
    groups: BTreeMap<ShardId, Group>,
    /// The control loop's decisions, as shipped (`harbor_meta::ControlCore`).
    control: ControlCore,
    /// The newest orders it sent, newest last.
    recent_orders: Vec<(NodeId, ShardId, Control)>,
    /// Issuers whose registration was acknowledged: clients use these.
    issuers: Vec<(IssuerId, ShardId, u64)>,
    /// The metadata plane's issuer directory (what it committed).
    directory: BTreeMap<IssuerId, DirectoryEntry>,
    /// Buckets and groups (fixed: nothing moves yet).
    placement: Arc<ShardMap>,
    /// Issuers are being registered before the clients start.
    setting_up: bool,
    clients: Vec<Client>,
    outbox: Arc<Outbox>,
    /// Numbers operations and asserts the history's invariants as it is
    /// written (a broken history is a simulator bug: it panics, and the
    /// run reports it).
    recorder: HistoryRecorder,
    next_request: u64,
    partitions: BTreeSet<(Region, Region)>,
    /// Nodes cut off from the other nodes (not from clients) until a time.
    isolated: BTreeMap<NodeId, u64>,
    leaders_seen: BTreeSet<(ShardId, Generation, NodeId)>,
    safety: bool,
    finished: bool,
    violations: Vec<String>,
    stats: SimStats,
    node_config: NodeConfig,
    /// This seed's shape: topology, limits, timings, delays.
    swarm: Swarm,
    /// The gateways' call timings: the gateway's own, with this seed's
    /// timeout and resend interval.
    call_limits: CallLimits,
    /// `HARBOR_SIM_TRACE=1`: print faults and control-plane decisions.
    tracing: bool,
}

const TICK_MS: u64 = 10;
/// How far a gateway's copy of the shard map may trail the metadata leader.
const MAP_LAG_MS_MAX: u64 = 400;
/// Control orders remembered, to replay as a deposed control loop's.
const RECENT_ORDERS_MAX: usize = 32;
/// Issuers the metadata places in one run (4 at the start, the rest
/// registered while the clients run).
const ISSUERS_MAX: usize = 12;
/// A client gives up this long after its gateway's call would have: the
/// call's own timeout decides, as an HTTP client's would outlast it.
const CLIENT_GRACE_MS: u64 = 500;
/// How long a planned transfer may pause a group's writes.
const DRAIN_MS: u64 = 500;
const CLOCK_SKEW_MS_MAX: i64 = 50;
/// Waited after sealing beyond the lease. Leases run on monotonic clocks,
/// which neither skew nor steps touch; the margin is the same as a
/// deployment's order of magnitude, so the sweep keeps it honest.
const LEASE_MARGIN_MS: u64 = 2 * CLOCK_SKEW_MS_MAX as u64 + 100;

impl World {
    fn new(options: SimOptions) -> World {
        let mut rng = Rng::new(options.seed);
        let swarm = match options.swarm {
            true => Swarm::draw(&mut rng),
            false => Swarm::fixed(),
        };
        let map = ShardMap::from_topology(&swarm.topology);
        let mut node_config = NodeConfig::new(std::path::PathBuf::from("/sim"));
        node_config.bugs = options.bugs;
        node_config.sync_acks = swarm.sync_acks;
        node_config.batch_inputs_max = swarm.batch_inputs_max;
        node_config.snapshot_interval_entries = swarm.snapshot_interval_entries;
        node_config.retained_entries_max = swarm.retained_entries_max;
        // Small chunks, so every snapshot sent streams in several and the
        // network's losses meet resumption.
        node_config.snapshot_chunk_bytes_max = 512;
        node_config.heartbeat_interval_ms = swarm.heartbeat_interval_ms;
        node_config.tick_interval_ms = node_config
            .tick_interval_ms
            .min(swarm.heartbeat_interval_ms);
        node_config.retransmit_timeout_ms = swarm.retransmit_timeout_ms;
        node_config.lease_ms = swarm.lease_ms;
        // Small segments and preallocation, so crashes meet rolls and zero
        // tails, and the simulated disk's copies stay cheap.
        node_config.wal.segment_size_bytes = 64 << 10;
        node_config.wal.preallocate_bytes = 4 << 10;
        node_config
            .validate()
            .expect("the simulator's node config keeps the limits' rules");
        let outbox = Arc::new(Outbox::default());
        let mut nodes = BTreeMap::new();
        for info in &map.nodes {
            nodes.insert(
                info.node.clone(),
                SimNode {
                    region: info.region.clone(),
                    up: true,
                    paused_until: 0,
                    mono_origin_ms: 1 + rng.range(0, 1_000_000),
                    skew_ms: 0,
                    wall_step_ms: 0,
                    replicas: BTreeMap::new(),
                    disks: BTreeMap::new(),
                },
            );
        }
        // Every group starts at generation 1, led by the map's leader.
        let mut map = map;
        for g in map.groups.values_mut() {
            g.generation = Generation(1);
        }
        let mut groups = BTreeMap::new();
        for g in map.groups.values() {
            groups.insert(
                g.shard,
                Group {
                    home: g.home_region.clone(),
                    members: g.members.clone(),
                    published: (g.leader.clone(), g.generation),
                    history: Vec::new(),
                },
            );
        }
        let control = ControlCore::new(&map, control_config(&swarm));
        let regions = map.regions();
        let mut issuers = Vec::new();
        let mut directory = BTreeMap::new();
        for i in 0..4 {
            let issuer = IssuerId::new(format!("ISS-{i}")).unwrap();
            let region = &regions[i % regions.len()];
            let bucket = map.place_issuer(&issuer, region).unwrap();
            let limit = rng.range(8, 30);
            issuers.push((issuer.clone(), map.shard_of_bucket(bucket), limit));
            let entry = DirectoryEntry {
                issuer_id: issuer.clone(),
                home_region: region.clone(),
                bucket,
            };
            directory.insert(issuer, entry);
        }
        let clients = (0..options.clients)
            .map(|i| Client {
                id: NodeId::new(format!("client-{i}")).unwrap(),
                region: regions[i % regions.len()].clone(),
                inflight: None,
                used: Vec::new(),
                held: Vec::new(),
                mine: Vec::new(),
                unknown: Vec::new(),
                next_token: 0,
                leaders: BTreeMap::new(),
                previous_leaders: BTreeMap::new(),
                map_refresh_at: 0,
                directory: BTreeMap::new(),
                inflight_shard: None,
                session: BTreeMap::new(),
            })
            .collect();
        let mut world = World {
            options,
            rng,
            now: 0,
            seq: 0,
            queue: BTreeMap::new(),
            nodes,
            groups,
            control,
            recent_orders: Vec::new(),
            issuers,
            directory,
            placement: Arc::new(map.clone()),
            setting_up: true,
            clients,
            outbox,
            recorder: HistoryRecorder::new(),
            next_request: 1,
            partitions: BTreeSet::new(),
            isolated: BTreeMap::new(),
            leaders_seen: BTreeSet::new(),
            safety: true,
            finished: false,
            violations: Vec::new(),
            stats: SimStats::default(),
            node_config,
            swarm,
            call_limits: CallLimits::default(),
            tracing: std::env::var_os("HARBOR_SIM_TRACE").is_some(),
        };
        world.call_limits = CallLimits {
            request_timeout_ms: world.options.client_timeout_ms,
            resend_after_ms: world.swarm.resend_after_ms,
            ..CallLimits::default()
        };
        for i in 0..world.clients.len() {
            world.refresh_client_map(i);
        }
        let names: Vec<NodeId> = world.nodes.keys().cloned().collect();
        // The groups are new now; an empty disk later is a lost one.
        world.node_config.groups_are_new = true;
        for node in &names {
            for shard in world.shards_of(node) {
                let disk = MemStorage::new();
                world.nodes.get_mut(node).unwrap().disks.insert(shard, disk);
            }
            world.open_replicas(node);
        }
        world.node_config.groups_are_new = false;
        world
    }

    fn shards_of(&self, node: &NodeId) -> Vec<ShardId> {
        self.groups
            .iter()
            .filter(|(_, g)| g.members.contains(node))
            .map(|(s, _)| *s)
            .collect()
    }

    fn region_of(&self, endpoint: &NodeId) -> Region {
        if let Some(node) = self.nodes.get(endpoint) {
            return node.region.clone();
        }
        self.clients
            .iter()
            .find(|c| c.id == *endpoint)
            .map(|c| c.region.clone())
            .expect("every endpoint is a node or a client")
    }

    fn schedule(&mut self, at: u64, event: Event) {
        self.seq += 1;
        self.queue.insert((at, self.seq), event);
    }

    /// Records an invoke; returns its op id. Values are built as the
    /// history format's JSON and typed here, once.
    fn invoke(&mut self, client: &str, f: &str, value: Value) -> u64 {
        let call: HistoryCall = serde_json::from_value(json!({"f": f, "value": value}))
            .unwrap_or_else(|e| panic!("the simulator built an invalid {f} call: {e}"));
        self.recorder.invoke(self.now, client, call)
    }

    /// Records a completion: `ok`, `fail` (definite) or `info` (unknown).
    fn completed(&mut self, kind: &str, op: u64, f: &str, value: Value) {
        match kind {
            "ok" => {
                let reply: Reply = serde_json::from_value(json!({"f": f, "value": value}))
                    .unwrap_or_else(|e| panic!("the simulator built an invalid {f} reply: {e}"));
                self.recorder.ok(self.now, op, reply);
            }
            "fail" => {
                let error: ErrorReply = serde_json::from_value(value)
                    .unwrap_or_else(|e| panic!("the simulator built an invalid {f} failure: {e}"));
                self.recorder.fail(self.now, op, error);
            }
            _ => {
                let error = value["error"].as_str().unwrap_or("unknown").to_string();
                self.recorder.info(self.now, op, &error);
            }
        }
    }

    // ----- The run ------------------------------------------------------------

    fn run(&mut self) {
        let names: Vec<NodeId> = self.nodes.keys().cloned().collect();
        for node in &names {
            self.schedule(0, Event::Tick(node.clone()));
        }
        self.bootstrap();
        self.schedule(CONTROL_INTERVAL_MS, Event::Control);
        self.setup_issuers();
        self.setting_up = false;
        for i in 0..self.clients.len() {
            self.schedule(self.now + 1, Event::ClientStep(i));
        }
        if self.options.faults {
            self.schedule(self.now + 200, Event::Fault);
        }
        let liveness_at = self.now + self.options.safety_ms;
        self.schedule(liveness_at, Event::Liveness);
        let deadline = liveness_at + self.options.liveness_ms_max;
        while let Some(((at, _), event)) = self.queue.pop_first() {
            self.now = at;
            if self.now > deadline {
                self.violations.push(format!(
                    "liveness: the cluster did not converge within {} ms after faults healed: {}",
                    self.options.liveness_ms_max,
                    self.convergence_gap().unwrap_or_default()
                ));
                return;
            }
            self.step(event);
            if !self.safety && self.quiet() && self.convergence_gap().is_none() {
                self.finish();
                return;
            }
        }
    }

    fn trace(&self, what: impl FnOnce() -> String) {
        if self.tracing {
            eprintln!("{:>6} ms  {}", self.now, what());
        }
    }

    fn step(&mut self, event: Event) {
        if !matches!(
            event,
            Event::Deliver(_)
                | Event::Tick(_)
                | Event::ClientStep(_)
                | Event::ClientTimeout(..)
                | Event::ClientWake(..)
        ) {
            self.trace(|| format!("{event:?}"));
        }
        match event {
            Event::Deliver(envelope) => self.deliver(envelope),
            Event::Tick(node) => self.tick(node),
            Event::ClientStep(i) => self.client_step(i),
            Event::ClientTimeout(i, op_id) => self.client_timeout(i, op_id),
            Event::ClientWake(i, op_id, at) => self.client_wake(i, op_id, at),
            Event::Fault => self.fault(),
            Event::Restart(node) => self.restart(&node),
            Event::CrashRestart(node) => {
                self.crash(&node);
                let at = self.now + self.rng.range(50, 500);
                self.schedule(at, Event::Restart(node));
            }
            Event::CrashFor(node, down_ms) => {
                if self.safety {
                    self.crash(&node);
                    self.schedule(self.now + down_ms, Event::Restart(node));
                }
            }
            Event::Heal(a, b) => {
                self.partitions.remove(&(a, b));
            }
            Event::Control => self.control(),
            Event::Liveness => self.start_liveness(),
        }
    }

    /// Registers the issuers before any fault but message loss, through the
    /// same request path as every other write; a registration that times
    /// out is sent again (an upsert is idempotent), as a client would.
    fn setup_issuers(&mut self) {
        const TRIES_MAX: usize = 10;
        let issuers = self.issuers.clone();
        for (issuer, shard, limit) in issuers {
            let group = &self.groups[&shard];
            let command = Command::UpsertIssuer {
                issuer_id: issuer.clone(),
                home_region: group.home.clone(),
                limit: Amount(limit),
            };
            let value = json!({"issuer_id": issuer, "home_region": group.home, "limit": limit});
            let ok_before = self.stats.ok;
            for _try in 0..TRIES_MAX {
                let request = Request::Write {
                    shard,
                    command: command.clone(),
                };
                self.client_send(0, Op::Register, shard, request, value.clone(), None);
                // Run the world until the registration answers.
                while self.clients[0].inflight.is_some() {
                    let Some(((at, _), event)) = self.queue.pop_first() else {
                        panic!("setup stalled");
                    };
                    self.now = at;
                    self.step(event);
                }
                if self.stats.ok > ok_before {
                    break;
                }
            }
            // A registration that never succeeds is a broken simulator, and
            // every later operation would fail with it.
            assert_eq!(self.stats.ok, ok_before + 1, "registering {issuer} failed");
        }
    }

    fn quiet(&self) -> bool {
        self.clients
            .iter()
            .all(|c| c.inflight.is_none() && c.unknown.is_empty())
    }

    /// What still differs between replicas, or None once every group's
    /// replicas have applied the same prefix under a ready leader.
    fn convergence_gap(&self) -> Option<String> {
        for (shard, group) in &self.groups {
            let leader = &self.nodes[group.leader()];
            let Some(driver) = leader.replicas.get(shard).filter(|_| leader.up) else {
                return Some(format!("{shard}: leader {} is down", group.leader()));
            };
            if !driver.group().is_ready() {
                return Some(format!(
                    "{shard}: {} is not leading, or has not applied its generation's first entry",
                    group.leader()
                ));
            }
            let commit = driver.group().replica().commit_index();
            for member in &group.members {
                let node = &self.nodes[member];
                let Some(replica) = node.replicas.get(shard).filter(|_| node.up) else {
                    return Some(format!("{shard}: {member} is down"));
                };
                if replica.group().applied_index() != commit
                    || replica.group().replica().commit_index() != commit
                {
                    return Some(format!(
                        "{shard}: {member} applied {} of {commit}",
                        replica.group().applied_index()
                    ));
                }
            }
        }
        None
    }

    fn start_liveness(&mut self) {
        self.safety = false;
        self.partitions.clear();
        self.isolated.clear();
        let names: Vec<NodeId> = self.nodes.keys().cloned().collect();
        for name in names {
            let node = self.nodes.get_mut(&name).unwrap();
            node.paused_until = 0;
            node.skew_ms = 0;
            node.wall_step_ms = 0;
            let failed = node
                .replicas
                .values()
                .any(|r| r.group().failure().is_some());
            if !node.up {
                self.restart(&name);
            } else if failed {
                self.crash(&name);
                self.restart(&name);
            }
        }
        for i in 0..self.clients.len() {
            self.schedule(self.now + 1, Event::ClientStep(i));
        }
    }

    /// The end: every replica's state machine checks its invariants, replicas
    /// of a group hold identical state, and each issuer's final state goes
    /// into the history.
    fn finish(&mut self) {
        for (shard, group) in &self.groups {
            let mut reference: Option<(NodeId, Vec<u8>)> = None;
            for member in &group.members {
                let replica = &self.nodes[member].replicas[shard];
                replica.group().machine().check_invariants();
                let bytes = replica.group().machine().snapshot();
                match &reference {
                    None => reference = Some((member.clone(), bytes)),
                    Some((first, expected)) if *expected != bytes => {
                        self.violations.push(format!(
                            "replicas diverge: {shard} on {member} differs from {first} at the same applied index"
                        ));
                    }
                    Some(_) => {}
                }
            }
        }
        // Every issuer the metadata placed, registered or not (a
        // registration whose outcome was unknown may have committed).
        let placed: Vec<(IssuerId, ShardId)> = self
            .directory
            .values()
            .map(|e| {
                (
                    e.issuer_id.clone(),
                    self.placement.shard_of_bucket(e.bucket),
                )
            })
            .collect();
        for (issuer, shard) in placed {
            let leader = self.groups[&shard].leader().clone();
            let machine = self.nodes[&leader].replicas[&shard].group().machine();
            let Some(view) = machine.issuer(&issuer) else {
                continue;
            };
            let mut reservations = Vec::new();
            for seq in 1.. {
                let Some(r) = machine.reservation(&ReservationId::new(issuer.clone(), seq)) else {
                    break;
                };
                reservations.push(json!({
                    "reservation_id": r.reservation_id, "token": r.reservation_token,
                    "amount": r.amount, "status": r.status,
                }));
            }
            let mut tokens = BTreeMap::new();
            for client in &self.clients {
                for used in client.used.iter().filter(|u| u.issuer == issuer) {
                    if let Some(view) = machine.token(&issuer, &used.token) {
                        tokens.insert(used.token.to_string(), token_json(&view));
                    }
                }
            }
            let tokens: Vec<Value> = tokens
                .into_iter()
                .map(|(token, mut v)| {
                    v["token"] = json!(token);
                    v
                })
                .collect();
            let line = json!({
                "time_ms": self.now, "issuer_id": issuer, "shard": shard.0,
                "limit": view.limit, "reserved": view.reserved,
                "reservations": reservations, "tokens": tokens,
            });
            let line: FinalLine = serde_json::from_value(line)
                .unwrap_or_else(|e| panic!("the simulator built an invalid final line: {e}"));
            self.recorder.final_state(line);
        }
        self.finished = true;
    }

    // ----- Nodes and the network ------------------------------------------------

    /// The node's two clocks: monotonic (simulated time from the node's
    /// own origin) and wall (simulated time plus drift and steps).
    fn node_now(&self, node: &NodeId) -> Now {
        let n = &self.nodes[node];
        let wall = (self.now as i64 + n.skew_ms + n.wall_step_ms).max(0) as u64;
        Now::new(
            MonoMs::from_millis(self.now + n.mono_origin_ms),
            WallMs::from_millis(wall),
        )
    }

    fn open_replicas(&mut self, name: &NodeId) {
        let shards = self.shards_of(name);
        for shard in shards {
            let group = &self.groups[&shard];
            let members: Vec<Member> = group
                .members
                .iter()
                .map(|m| Member {
                    node: m.clone(),
                    local: self.nodes[m].region == group.home,
                })
                .collect();
            let disk = self.nodes[name].disks[&shard].clone();
            let transport: Arc<dyn Transport> = self.outbox.clone();
            let driver = match Driver::open_on(
                name.clone(),
                shard,
                members,
                self.node_config.clone(),
                disk,
                transport,
                self.node_now(name),
            ) {
                Ok(driver) => driver,
                Err(e) => {
                    panic!("{name} cannot recover {shard} after a crash: {e}");
                }
            };
            self.nodes
                .get_mut(name)
                .unwrap()
                .replicas
                .insert(shard, driver);
        }
    }

    /// Runs `f` on one replica at the node's clock, then sends what it sent.
    fn drive(
        &mut self,
        name: &NodeId,
        shard: ShardId,
        f: impl FnOnce(&mut Driver<MemStorage>, Now),
    ) {
        let now = self.node_now(name);
        let Some(driver) = self.nodes.get_mut(name).unwrap().replicas.get_mut(&shard) else {
            return;
        };
        f(driver, now);
        driver.finish_batch(now);
        let leading = driver
            .group()
            .replica()
            .is_leader()
            .then(|| driver.group().replica().generation());
        if let Some(generation) = leading {
            if self.leaders_seen.insert((shard, generation, name.clone())) {
                self.recorder
                    .leader(self.now, shard, generation, name.clone());
            }
        }
        self.pump();
    }

    fn pump(&mut self) {
        let sent = std::mem::take(&mut *self.outbox.0.lock().unwrap());
        for envelope in sent {
            self.send(envelope);
        }
    }

    fn send(&mut self, envelope: Envelope) {
        let from = self.region_of(&envelope.from);
        let to = self.region_of(&envelope.to);
        if self.safety && self.options.faults {
            let between_nodes =
                self.nodes.contains_key(&envelope.from) && self.nodes.contains_key(&envelope.to);
            let cut = |n: &NodeId| self.isolated.get(n).is_some_and(|until| *until > self.now);
            let isolated = between_nodes && (cut(&envelope.from) || cut(&envelope.to));
            if isolated
                || self.partitions.contains(&(from.clone(), to.clone()))
                || self.rng.chance(2)
            {
                self.stats.dropped += 1;
                return;
            }
        }
        let base = if from == to {
            self.swarm.local_delay_ms
        } else {
            self.swarm.wan_delay_ms
        };
        let jitter = if self.options.faults {
            self.rng.range(0, 8)
        } else {
            0
        };
        let replication = matches!(envelope.body, Body::Replication(_));
        if replication && self.safety && self.options.faults && self.rng.chance(1) {
            // A duplicate, sometimes a ghost that arrives seconds later,
            // after generations may have changed. Only replication traffic:
            // client requests travel at most once (one TCP frame, never
            // replayed), as on the real transports.
            let late = if self.rng.chance(30) { 3_000 } else { 30 };
            let again = self.now + base + self.rng.range(0, late);
            self.schedule(again, Event::Deliver(envelope.clone()));
        }
        self.schedule(self.now + base + jitter, Event::Deliver(envelope));
    }

    fn deliver(&mut self, envelope: Envelope) {
        if let Some(i) = self.clients.iter().position(|c| c.id == envelope.to) {
            self.stats.delivered += 1;
            return self.client_response(i, envelope);
        }
        let name = envelope.to.clone();
        let node = &self.nodes[&name];
        if !node.up {
            self.stats.dropped += 1;
            return;
        }
        if node.paused_until > self.now {
            let at = node.paused_until;
            self.schedule(at, Event::Deliver(envelope));
            return;
        }
        let shard = match &envelope.body {
            Body::Replication(m) => m.shard(),
            Body::Request { request, .. } => request.shard(),
            Body::Response { .. } | Body::Control { .. } => return,
        };
        self.stats.delivered += 1;
        self.drive(&name, shard, |driver, now| {
            driver.handle(now, ReplicaInput::Envelope(envelope));
        });
    }

    fn tick(&mut self, name: NodeId) {
        let node = &self.nodes[&name];
        if !self.safety
            && node.up
            && node
                .replicas
                .values()
                .any(|r| r.group().failure().is_some())
        {
            // Faults have healed: the operator restarts a replica that
            // stopped on a storage failure.
            self.trace(|| format!("operator restarts {name} (a replica failed)"));
            self.crash(&name);
            self.restart(&name);
        }
        let node = &self.nodes[&name];
        if node.up && node.paused_until <= self.now {
            let shards: Vec<ShardId> = self.nodes[&name].replicas.keys().copied().collect();
            for shard in shards {
                self.drive(&name, shard, |driver, now| driver.tick(now));
            }
        }
        self.schedule(self.now + TICK_MS, Event::Tick(name));
    }

    // ----- The control plane's part --------------------------------------------

    /// At start, as `harbor dev` does: every member hears the published
    /// leader of generation 1 directly.
    fn bootstrap(&mut self) {
        let shards: Vec<ShardId> = self.groups.keys().copied().collect();
        for shard in shards {
            let group = &self.groups[&shard];
            let (leader, generation) = group.published.clone();
            for member in group.members.clone() {
                let control = if member == leader {
                    Control::Lead(generation)
                } else {
                    Control::Follow(generation, leader.clone())
                };
                self.tell(&member, shard, control);
            }
        }
    }

    /// An order from the control plane; one the node cannot hear now (down,
    /// cut off, paused) is lost, and sent again when the replica reports a
    /// stale role.
    fn tell(&mut self, member: &NodeId, shard: ShardId, control: Control) {
        if self.unreachable(member) || self.nodes[member].paused_until > self.now {
            self.trace(|| format!("lost order to {member}: {shard} {control:?}"));
            return;
        }
        self.trace(|| format!("tell {member}: {shard} {control:?}"));
        self.recent_orders
            .push((member.clone(), shard, control.clone()));
        if self.recent_orders.len() > RECENT_ORDERS_MAX {
            self.recent_orders.remove(0);
        }
        self.drive(member, shard, |d, now| {
            d.handle(now, ReplicaInput::Control(control))
        });
    }

    fn crash(&mut self, name: &NodeId) {
        let seed = self.rng.next_u64();
        let torn = self.rng.chance(50);
        let node = self.nodes.get_mut(name).unwrap();
        if !node.up {
            return;
        }
        node.up = false;
        node.replicas.clear();
        for (i, disk) in node.disks.values().enumerate() {
            disk.crash(seed.wrapping_add(i as u64), torn);
        }
        self.stats.crashes += 1;
    }

    fn restart(&mut self, name: &NodeId) {
        if self.nodes[name].up {
            return;
        }
        // A new process: its monotonic clock has a new origin. Its
        // replicas hear their roles from the control loop's next round.
        let origin = 1 + self.rng.range(0, 1_000_000);
        self.nodes.get_mut(name).unwrap().mono_origin_ms = origin;
        self.open_replicas(name);
        let node = self.nodes.get_mut(name).unwrap();
        node.up = true;
        node.paused_until = 0;
        if self.safety && self.options.faults && self.rng.chance(30) {
            // A deposed control loop (the metadata plane changed leaders)
            // reconnects and delivers what it had queued for this node.
            let stale: Vec<(ShardId, Control)> = self
                .recent_orders
                .iter()
                .filter(|(node, _, _)| node == name)
                .map(|(_, shard, control)| (*shard, control.clone()))
                .collect();
            if let Some((shard, control)) = stale.last().cloned() {
                self.stale_order(name, shard, control);
            }
        }
    }

    /// An order that is no longer current reaches a replica.
    fn stale_order(&mut self, name: &NodeId, shard: ShardId, control: Control) {
        self.trace(|| format!("stale order to {name}: {shard} {control:?}"));
        self.stats.stale_orders += 1;
        self.drive(name, shard, |d, now| {
            d.handle(now, ReplicaInput::Control(control))
        });
    }

    /// The control plane cannot reach `node`: it is down, or cut off.
    fn unreachable(&self, node: &NodeId) -> bool {
        let n = &self.nodes[node];
        !n.up
            || self
                .isolated
                .get(node)
                .is_some_and(|until| *until > self.now)
    }

    /// A round of the control loop, as shipped: every replica the control
    /// plane can reach answers its status (the same `GroupCore::status` a
    /// status request gets), the core decides, and its orders are carried
    /// out.
    fn control(&mut self) {
        let orders = self.control.republish();
        self.execute(orders);
        let answers = self
            .control
            .asks()
            .into_iter()
            .map(|ask| {
                let node = &self.nodes[&ask.node];
                let status = if self.unreachable(&ask.node) || node.paused_until > self.now {
                    None
                } else {
                    let now = self.node_now(&ask.node);
                    node.replicas
                        .get(&ask.shard)
                        .and_then(|r| r.group().status(now).ok())
                };
                (ask, status)
            })
            .collect();
        let orders = self.control.round(self.now, answers);
        self.execute(orders);
        self.schedule(self.now + self.control.interval_ms(), Event::Control);
    }

    /// Carries out the control core's orders. The metadata plane sometimes
    /// refuses a publication (it is changing leaders), which the core
    /// retries every round.
    fn execute(&mut self, orders: Vec<Order>) {
        let mut queue = std::collections::VecDeque::from(orders);
        while let Some(order) = queue.pop_front() {
            match order {
                Order::Tell {
                    node,
                    shard,
                    control,
                } => self.tell(&node, shard, control),
                Order::Publish {
                    shard,
                    leader,
                    generation,
                    ended_at: _,
                } => {
                    let result = if self.safety && self.options.faults && self.rng.chance(5) {
                        self.trace(|| format!("publishing {shard} {generation} failed"));
                        Err("the metadata plane is electing a leader".to_string())
                    } else {
                        self.trace(|| format!("publish {shard} {generation} led by {leader}"));
                        let now = self.now;
                        let group = self.groups.get_mut(&shard).unwrap();
                        let (old_leader, old_generation) =
                            std::mem::replace(&mut group.published, (leader, generation));
                        group.history.push((now, old_leader, old_generation));
                        if group.history.len() > 4 {
                            group.history.remove(0);
                        }
                        Ok(())
                    };
                    queue.extend(self.control.published(shard, result));
                }
                Order::TransferEnded { result, .. } => {
                    self.trace(|| format!("transfer ended: {result:?}"));
                }
            }
        }
        let stats = self.control.stats();
        self.stats.failovers = stats.failovers;
        self.stats.transfers = stats.transfers;
        self.stats.transfers_abandoned = stats.transfers_abandoned;
    }

    // ----- Faults -----------------------------------------------------------------

    /// Whether some replica lost its state and has not caught up yet.
    fn any_recovering(&self) -> bool {
        self.nodes
            .values()
            .flat_map(|n| n.replicas.values())
            .any(|r| r.group().replica().is_recovering())
    }

    fn step_wall_clock(&mut self, name: &NodeId, step_ms: i64) {
        self.trace(|| format!("wall clock of {name} steps {step_ms} ms"));
        self.nodes.get_mut(name).unwrap().wall_step_ms += step_ms;
        self.stats.wall_steps += 1;
    }

    fn fault(&mut self) {
        if !self.safety {
            return;
        }
        let names: Vec<NodeId> = self.nodes.keys().cloned().collect();
        let down = self.nodes.values().filter(|n| !n.up).count();
        let roll = self.rng.range(0, 99);
        let name = self.rng.pick(&names).clone();
        self.trace(|| format!("fault roll {roll} on {name}"));
        match roll {
            0..=19 if down < 2 => {
                self.crash(&name);
                let at = self.now + self.rng.range(200, 2_500);
                self.schedule(at, Event::Restart(name));
            }
            // A node may host no replica (a spare in its region).
            20..=27 if self.nodes[&name].up && !self.nodes[&name].disks.is_empty() => {
                let shards: Vec<ShardId> = self.nodes[&name].disks.keys().copied().collect();
                let shard = *self.rng.pick(&shards);
                self.nodes[&name].disks[&shard].fail_next_sync();
                self.stats.fsync_failures += 1;
                let at = self.now + self.rng.range(300, 1_500);
                self.schedule(at, Event::CrashRestart(name));
            }
            28..=44 => {
                let regions: Vec<Region> = self
                    .nodes
                    .values()
                    .map(|n| n.region.clone())
                    .collect::<BTreeSet<_>>()
                    .into_iter()
                    .collect();
                let a = self.rng.pick(&regions).clone();
                let others: Vec<Region> = regions.into_iter().filter(|r| *r != a).collect();
                let b = self.rng.pick(&others).clone();
                self.partitions.insert((a.clone(), b.clone()));
                let heal = self.now + self.rng.range(200, 2_000);
                self.schedule(heal, Event::Heal(a.clone(), b.clone()));
                if self.rng.chance(50) {
                    self.partitions.insert((b.clone(), a.clone()));
                    self.schedule(heal, Event::Heal(b, a));
                }
                self.stats.partitions += 1;
            }
            45..=56 => {
                let until = self.now + self.rng.range(100, 1_500);
                let node = self.nodes.get_mut(&name).unwrap();
                node.paused_until = node.paused_until.max(until);
                self.stats.pauses += 1;
            }
            57..=76 => {
                // A node, usually a leader, loses its links to the other
                // nodes but still talks to clients; half the time it then
                // dies for long enough that its group fails over.
                let leaders: Vec<NodeId> =
                    self.groups.values().map(|g| g.leader().clone()).collect();
                let name = if self.rng.chance(70) {
                    self.rng.pick(&leaders).clone()
                } else {
                    name
                };
                let until = self.now + self.rng.range(200, 4_000);
                self.isolated.insert(name.clone(), until);
                self.stats.isolations += 1;
                if self.rng.chance(70) {
                    // Cut off, its wall clock steps back (a VM resumed
                    // from an old snapshot of its clock): its lease, on the
                    // monotonic clock, must still run out.
                    let step = self.rng.range(1_000, 5_000) as i64;
                    self.step_wall_clock(&name, -step);
                }
                if self.rng.chance(50) && down < 2 {
                    let down_ms = self.rng.range(1_500, 3_000);
                    self.schedule(until, Event::CrashFor(name, down_ms));
                }
            }
            95..=98 if down == 0 && !self.any_recovering() => {
                // The node's disks are replaced: it comes back with nothing,
                // recovering, and must never lead or answer for what it
                // acknowledged before until it has caught up. One at a time:
                // two lost copies of a group are beyond what it tolerates.
                self.trace(|| format!("disks of {name} replaced"));
                self.crash(&name);
                let shards: Vec<ShardId> = self.nodes[&name].disks.keys().copied().collect();
                for shard in shards {
                    let node = self.nodes.get_mut(&name).unwrap();
                    node.disks.insert(shard, MemStorage::new());
                }
                self.stats.disks_replaced += 1;
                let at = self.now + self.rng.range(200, 1_500);
                self.schedule(at, Event::Restart(name));
            }
            87..=94 => {
                // A planned leader transfer to another home-region replica.
                let shards: Vec<ShardId> = self.groups.keys().copied().collect();
                let shard = *self.rng.pick(&shards);
                let group = &self.groups[&shard];
                let targets: Vec<NodeId> = group
                    .members
                    .iter()
                    .filter(|m| self.nodes[*m].region == group.home && *m != group.leader())
                    .cloned()
                    .collect();
                let to = self.rng.pick(&targets).clone();
                self.trace(|| format!("transfer {shard} to {to}?"));
                let orders = self.control.transfer(self.now, shard, &to, 0);
                self.execute(orders);
            }
            77..=81 => {
                let skew =
                    self.rng.range(0, 2 * CLOCK_SKEW_MS_MAX as u64) as i64 - CLOCK_SKEW_MS_MAX;
                self.nodes.get_mut(&name).unwrap().skew_ms = skew;
            }
            82..=86 => {
                let step = self.rng.range(1_000, 5_000) as i64;
                let step = if self.rng.chance(50) { step } else { -step };
                self.step_wall_clock(&name, step);
            }
            99 if !self.recent_orders.is_empty() => {
                // A deposed control loop's order arrives late.
                let (node, shard, control) = self.rng.pick(&self.recent_orders).clone();
                if self.nodes[&node].up {
                    self.stale_order(&node, shard, control);
                }
            }
            _ => {}
        }
        let next = self.now + self.rng.range(150, 700);
        self.schedule(next, Event::Fault);
    }

    // ----- Clients ------------------------------------------------------------

    fn client_send(
        &mut self,
        i: usize,
        op: Op,
        shard: ShardId,
        request: Request,
        value: Value,
        token: Option<(ReservationToken, IssuerId)>,
    ) {
        self.client_send_to(i, op, shard, request, value, token, None);
    }

    /// Starts an operation: to the leader the client's map names, or, for
    /// a local read, to the given replica (without a route).
    #[allow(clippy::too_many_arguments)]
    fn client_send_to(
        &mut self,
        i: usize,
        op: Op,
        shard: ShardId,
        request: Request,
        value: Value,
        token: Option<(ReservationToken, IssuerId)>,
        local: Option<(NodeId, LocalRead)>,
    ) {
        let client = self.clients[i].id.to_string();
        let op_id = self.invoke(&client, op.name(), value);
        self.stats.ops += 1;
        self.clients[i].inflight_shard = Some(shard);
        let (replica, read) = local.unzip();
        let request_id = self.next_request;
        self.clients[i].inflight = Some(Inflight {
            op_id,
            request_id,
            op,
            token,
            read,
            batch: Vec::new(),
            call: None,
        });
        // The gateway finds the issuer of a read or a reserve in its
        // directory first; one it cannot find is refused with a 404.
        if let Some(issuer) = looked_up_issuer(&request) {
            if self.find(i, issuer).is_none() {
                return self.complete(i, "fail", json!({"error": "unknown_issuer"}));
            }
        }
        match replica {
            Some(replica) => self.send_request(i, replica, request, None),
            None => self.send_to_leader(i, shard, request),
        }
        let at = self.now + self.options.client_timeout_ms + CLIENT_GRACE_MS;
        self.schedule(at, Event::ClientTimeout(i, op_id));
    }

    /// Hands the in-flight operation's request to the gateway's call,
    /// which takes it to the leader. Some strong reads start from the map
    /// entry the client's gateway had before its last refresh, as from a
    /// gateway whose map is older still: an old leader must refuse them
    /// once it could be replaced (its lease), or they are stale.
    fn send_to_leader(&mut self, i: usize, shard: ShardId, request: Request) {
        let stale = matches!(request, Request::Read { .. }) && self.rng.chance(20);
        let client = &self.clients[i];
        let cached = stale
            .then(|| client.previous_leaders.get(&shard))
            .flatten()
            .or_else(|| client.leaders.get(&shard))
            .cloned();
        let entry = cached.map(|(leader, generation)| MapEntry { leader, generation });
        let is_write = matches!(request, Request::Write { .. });
        let now = self.client_clock();
        match Call::start(now, shard, is_write, entry, self.call_limits) {
            Ok((call, steps)) => {
                let to = call.leader().clone();
                let inflight = self.clients[i]
                    .inflight
                    .as_mut()
                    .expect("an operation in flight");
                inflight.call = Some(GatewayCall {
                    call,
                    request,
                    to,
                    route: None,
                    wake_at: None,
                });
                self.run_call(i, steps);
            }
            Err(refusal) => self.answered(i, Response::Error(refusal)),
        }
    }

    /// Executes a gateway call's steps, as `Gateway::call` does.
    fn run_call(&mut self, i: usize, steps: Vec<Step>) {
        for step in steps {
            let Some(inflight) = self.clients[i].inflight.as_mut() else {
                return;
            };
            let op_id = inflight.op_id;
            let call = inflight.call.as_mut().expect("a call in flight");
            match step {
                Step::Send { to, route } => {
                    call.to = to.clone();
                    call.route = route;
                    let request = call.request.clone();
                    self.send_request(i, to, request, route);
                }
                Step::Resend => {
                    let (to, id) = (call.to.clone(), inflight.request_id);
                    let body = Body::Request {
                        id,
                        request: call.request.clone(),
                        route: call.route,
                    };
                    let from = self.clients[i].id.clone();
                    self.send(Envelope { from, to, body });
                }
                Step::RefreshMap => {
                    self.refresh_client_map(i);
                    return self.feed_call(i, |call, now, entry| call.on_timer(now, entry));
                }
                Step::WakeAt(at) => {
                    call.wake_at = Some(at);
                    let delay = at.since(self.client_clock());
                    self.schedule(self.now + delay, Event::ClientWake(i, op_id, at));
                }
                Step::Done(result) => {
                    let response = (*result).unwrap_or_else(Response::Error);
                    return self.answered(i, response);
                }
            }
        }
    }

    fn client_wake(&mut self, i: usize, op_id: u64, at: MonoMs) {
        let Some(inflight) = self.clients[i].inflight.as_ref() else {
            return;
        };
        let current = inflight
            .call
            .as_ref()
            .is_some_and(|c| c.wake_at == Some(at));
        if inflight.op_id != op_id || !current {
            return; // a wake-up the call no longer asks for
        }
        self.feed_call(i, |call, now, entry| call.on_timer(now, entry));
    }

    /// Gives the client's call one input (with the time and what the
    /// client's map says now) and executes the steps it answers.
    fn feed_call(
        &mut self,
        i: usize,
        input: impl FnOnce(&mut Call, MonoMs, Option<&MapEntry>) -> Vec<Step>,
    ) {
        let entry = self.client_entry(i);
        let now = self.client_clock();
        let inflight = self.clients[i]
            .inflight
            .as_mut()
            .expect("an operation in flight");
        let call = &mut inflight.call.as_mut().expect("a call in flight").call;
        let steps = input(call, now, entry.as_ref());
        self.run_call(i, steps);
    }

    /// The clients' monotonic clock (gateways do not skew or step here).
    fn client_clock(&self) -> MonoMs {
        MonoMs::from_millis(self.now + 1)
    }

    /// The client's gateway's map entry for the group in flight.
    fn client_entry(&self, i: usize) -> Option<MapEntry> {
        let shard = self.clients[i].inflight_shard?;
        let (leader, generation) = self.clients[i].leaders.get(&shard)?.clone();
        Some(MapEntry { leader, generation })
    }

    /// The client's gateway's directory lookup, by the shipped rule
    /// (`harbor_meta`'s `find`): its copy, else the metadata leader,
    /// linearizably. With the `directory-from-copy` bug, the "leader"
    /// answers from the copy, as a gateway that trusted its copy's miss.
    fn find(&self, i: usize, issuer: &IssuerId) -> Option<ShardId> {
        let copy = self.clients[i].directory.get(issuer).cloned();
        let leader = match self.options.bugs.directory_from_copy {
            true => copy.clone(),
            false => self.directory.get(issuer).cloned(),
        };
        let meta = SimDirectory {
            map: self.placement.clone(),
            copy,
            leader,
        };
        let meta: &dyn Metadata = &meta;
        let lookup = std::pin::pin!(meta.find(issuer));
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        let std::task::Poll::Ready(found) = std::future::Future::poll(lookup, &mut cx) else {
            unreachable!("the simulated metadata answers at once");
        };
        let entry = found.expect("the simulated metadata is always available")?;
        Some(self.placement.shard_of_bucket(entry.bucket))
    }

    /// The client's gateway pulls the published shard map and directory.
    /// Under faults the gateway's copy may trail the metadata leader by up
    /// to `MAP_LAG_MS_MAX` (it read a lagging voter), never going back from
    /// what it had.
    fn refresh_client_map(&mut self, i: usize) {
        let lag = match self.safety && self.options.faults {
            true => self.rng.range(0, MAP_LAG_MS_MAX),
            false => 0,
        };
        let as_of = self.now.saturating_sub(lag);
        let leaders = self
            .groups
            .iter()
            .map(|(s, g)| {
                // The newest publication made by `as_of`: the current one,
                // unless a later one replaced it after `as_of`.
                let mut entry = g.published.clone();
                for (replaced_at, leader, generation) in g.history.iter().rev() {
                    if *replaced_at > as_of {
                        entry = (leader.clone(), *generation);
                    }
                }
                let had = self.clients[i].leaders.get(s);
                let entry = match had {
                    Some(had) if had.1 > entry.1 => had.clone(),
                    _ => entry,
                };
                (*s, entry)
            })
            .collect();
        let client = &mut self.clients[i];
        client.directory = self.directory.clone();
        let before = std::mem::replace(&mut client.leaders, leaders);
        for (shard, old) in before {
            if client.leaders.get(&shard) != Some(&old) {
                client.previous_leaders.insert(shard, old);
            }
        }
    }

    /// Sends the in-flight operation's request (a new attempt has a new id).
    fn send_request(&mut self, i: usize, to: NodeId, request: Request, route: Option<Generation>) {
        let request_id = self.next_request;
        self.next_request += 1;
        let inflight = self.clients[i]
            .inflight
            .as_mut()
            .expect("an operation in flight");
        inflight.request_id = request_id;
        let envelope = Envelope {
            from: self.clients[i].id.clone(),
            to,
            body: Body::Request {
                id: request_id,
                request,
                route,
            },
        };
        self.send(envelope);
    }

    /// Sends 2 to 4 reserves on one group as one `Command::Batch`, some of
    /// them replays of earlier tokens.
    fn reserve_batch(&mut self, i: usize) {
        let shard = self.rng.pick(&self.issuers).1;
        let on_shard: Vec<IssuerId> = self
            .issuers
            .iter()
            .filter(|(_, s, _)| *s == shard)
            .map(|(issuer, _, _)| issuer.clone())
            .collect();
        let count = self.rng.range(2, 4);
        let mut items = Vec::new();
        for k in 0..count {
            let replays: Vec<TokenUse> = self.clients[i]
                .used
                .iter()
                .filter(|u| on_shard.contains(&u.issuer))
                .cloned()
                .collect();
            let used = if !replays.is_empty() && self.rng.chance(20) {
                self.rng.pick(&replays).clone()
            } else {
                let n = self.clients[i].next_token;
                self.clients[i].next_token += 1;
                let used = TokenUse {
                    token: ReservationToken::new(format!("{}-t{n}", self.clients[i].id)).unwrap(),
                    issuer: self.rng.pick(&on_shard).clone(),
                    amount: self.rng.range(1, 6),
                    hold_ttl_ms: self.rng.chance(30).then(|| self.rng.range(100, 3_000)),
                };
                self.clients[i].used.push(used.clone());
                used
            };
            let client = format!("{}.b{k}", self.clients[i].id);
            let value = json!({"token": used.token, "issuer_id": used.issuer, "amount": used.amount,
                               "hold_ttl_ms": used.hold_ttl_ms});
            let op_id = self.invoke(&client, "reserve", value);
            self.stats.ops += 1;
            items.push(BatchItem { op_id, used });
        }
        let commands = items
            .iter()
            .map(|item| Command::Reserve {
                token: item.used.token.clone(),
                issuer_id: item.used.issuer.clone(),
                amount: Amount(item.used.amount),
                desk: "desk".into(),
                trader: "trader".into(),
                hold_ttl_ms: item.used.hold_ttl_ms,
            })
            .collect();
        let op_id = items[0].op_id;
        self.clients[i].inflight_shard = Some(shard);
        self.clients[i].inflight = Some(Inflight {
            op_id,
            request_id: 0,
            op: Op::ReserveBatch,
            token: None,
            read: None,
            batch: items,
            call: None,
        });
        let command = Command::Batch(commands);
        self.send_to_leader(i, shard, Request::Write { shard, command });
        let at = self.now + self.options.client_timeout_ms + CLIENT_GRACE_MS;
        self.schedule(at, Event::ClientTimeout(i, op_id));
    }

    /// Ends a batch: one completion per reserve (`None`: the batch's own
    /// `kind` and `value`, for all of them).
    fn complete_batch(
        &mut self,
        i: usize,
        kind: &str,
        value: Value,
        outcomes: Option<Vec<Outcome>>,
        commit_token: Option<CommitToken>,
    ) {
        let inflight = self.clients[i].inflight.take().expect("a batch in flight");
        let outcomes: Vec<Option<Outcome>> = match outcomes {
            Some(outcomes) => outcomes.into_iter().map(Some).collect(),
            None => inflight.batch.iter().map(|_| None).collect(),
        };
        if let Some(token) = commit_token {
            raise(&mut self.clients[i].session, token);
        }
        for (item, outcome) in inflight.batch.iter().zip(outcomes) {
            let (kind, value) = match outcome {
                None => (kind, value.clone()),
                Some(Outcome::Reservation {
                    reservation,
                    replayed,
                }) => {
                    self.track(i, &reservation);
                    (
                        "ok",
                        json!({"reservation_id": reservation.reservation_id, "status": reservation.status,
                                  "commit_token": commit_token, "replayed": replayed}),
                    )
                }
                Some(Outcome::Rejected(r)) => (
                    "fail",
                    json!({"error": r.code(), "commit_token": commit_token}),
                ),
                Some(other) => ("info", json!({"error": format!("unexpected {other:?}")})),
            };
            match kind {
                "ok" => self.stats.ok += 1,
                "fail" => self.stats.fail += 1,
                _ => {
                    self.stats.info += 1;
                    let token = (item.used.token.clone(), item.used.issuer.clone());
                    self.clients[i].unknown.push(token);
                }
            }
            self.completed(kind, item.op_id, "reserve", value);
        }
        let at = self.now + self.rng.range(1, 20);
        self.schedule(at, Event::ClientStep(i));
    }

    /// Keeps the client's lists of its held and confirmed reservations.
    fn track(&mut self, i: usize, reservation: &harbor_reservation::ReservationView) {
        let client = &mut self.clients[i];
        let id = reservation.reservation_id.clone();
        client.held.retain(|h| *h != id);
        client.mine.retain(|h| *h != id);
        match reservation.status {
            harbor_reservation::Status::Held => {
                client.held.push(id.clone());
                client.mine.push(id);
            }
            harbor_reservation::Status::Confirmed => client.mine.push(id),
            _ => {}
        }
    }

    fn complete(&mut self, i: usize, kind: &str, value: Value) {
        if self.clients[i]
            .inflight
            .as_ref()
            .is_some_and(|f| f.op == Op::ReserveBatch)
        {
            return self.complete_batch(i, kind, value, None, None);
        }
        let client = &mut self.clients[i];
        let inflight = client.inflight.take().expect("an operation in flight");
        match kind {
            "ok" => self.stats.ok += 1,
            "fail" => self.stats.fail += 1,
            _ => self.stats.info += 1,
        }
        if kind == "info" {
            if let Some(token) = inflight.token.clone() {
                if matches!(inflight.op, Op::Reserve | Op::Resolve) {
                    self.clients[i].unknown.push(token);
                }
            }
        }
        self.completed(kind, inflight.op_id, inflight.op.name(), value);
        if !self.setting_up {
            let at = self.now + self.rng.range(1, 20);
            self.schedule(at, Event::ClientStep(i));
        }
    }

    fn client_timeout(&mut self, i: usize, op_id: u64) {
        if self.clients[i]
            .inflight
            .as_ref()
            .is_some_and(|f| f.op_id == op_id)
        {
            self.complete(i, "info", json!({"error": "timeout"}));
        }
    }

    fn client_step(&mut self, i: usize) {
        if self.clients[i].inflight.is_some() {
            return;
        }
        if self.clients[i].map_refresh_at <= self.now || !self.safety {
            self.refresh_client_map(i);
            self.clients[i].map_refresh_at = self.now + self.rng.range(2_000, 5_000);
        }
        if let Some((token, issuer)) = self.clients[i].unknown.pop() {
            // An unknown outcome: ask, and make it final.
            let shard = self.shard_of(&issuer);
            let value = json!({"token": token, "issuer_id": issuer});
            let command = Command::ResolveToken {
                issuer_id: issuer.clone(),
                token: token.clone(),
            };
            return self.client_send(
                i,
                Op::Resolve,
                shard,
                Request::Write { shard, command },
                value,
                Some((token, issuer)),
            );
        }
        if !self.safety {
            return;
        }
        let roll = self.rng.range(0, 99);
        let client = &self.clients[i];
        match roll {
            0..=41 => self.new_reservation(i),
            42..=49 => self.reserve_batch(i),
            50..=59 if !client.used.is_empty() => {
                let used = self.rng.pick(&self.clients[i].used).clone();
                self.reserve(i, used);
            }
            60..=69 if !client.held.is_empty() => {
                let id = self.rng.pick(&self.clients[i].held).clone();
                self.transition(i, id, Op::Confirm);
            }
            70..=77 if !client.mine.is_empty() => {
                let id = self.rng.pick(&self.clients[i].mine).clone();
                self.transition(i, id, Op::Release);
            }
            78..=92 => self.read_issuer(i),
            93..=94 if self.directory.len() < ISSUERS_MAX => self.register_issuer(i),
            _ if !client.used.is_empty() => {
                let used = self.rng.pick(&self.clients[i].used).clone();
                let shard = self.shard_of(&used.issuer);
                let value = json!({"token": used.token, "issuer_id": used.issuer});
                let request = Request::Read {
                    shard,
                    query: Query::Token(used.issuer.clone(), used.token.clone()),
                };
                self.client_send(i, Op::TokenLookup, shard, request, value, None);
            }
            _ => self.new_reservation(i),
        }
    }

    /// A read of an issuer in one of the four modes. The non-strong ones go
    /// to a replica in the client's region with what it needs to be fresh
    /// enough, as a gateway sends them.
    fn read_issuer(&mut self, i: usize) {
        let (issuer, shard, _) = self.rng.pick(&self.issuers).clone();
        let strong = Request::Read {
            shard,
            query: Query::Issuer(issuer.clone()),
        };
        let session = self.clients[i].session.get(&shard).copied();
        let (consistency, need) = match self.rng.range(0, 99) {
            0..=29 => {
                let value = json!({"issuer_id": issuer, "consistency": "strong"});
                return self.client_send(i, Op::ReadIssuer, shard, strong, value, None);
            }
            30..=59 => (
                "session",
                Freshness {
                    applied_at_least: session.map(|t| t.index),
                    max_staleness_ms: None,
                    wait_ms: 0,
                },
            ),
            60..=84 => (
                "bounded",
                Freshness {
                    applied_at_least: None,
                    max_staleness_ms: Some(*self.rng.pick(&[300, 1_000, 2_000])),
                    wait_ms: 0,
                },
            ),
            _ => (
                "causal",
                Freshness {
                    applied_at_least: session.map(|t| t.index),
                    max_staleness_ms: None,
                    wait_ms: 200,
                },
            ),
        };
        let named: Vec<CommitToken> = need.applied_at_least.and(session).into_iter().collect();
        let value = json!({"issuer_id": issuer, "consistency": consistency,
                           "max_staleness_ms": need.max_staleness_ms});
        let local: Vec<NodeId> = self.groups[&shard]
            .members
            .iter()
            .filter(|m| self.nodes[*m].region == self.clients[i].region)
            .cloned()
            .collect();
        let Some(replica) = (!local.is_empty()).then(|| self.rng.pick(&local).clone()) else {
            return self.client_send(i, Op::ReadIssuer, shard, strong, value, None);
        };
        let read = LocalRead {
            max_staleness_ms: need.max_staleness_ms,
            named,
            fallback: Some(strong),
        };
        let request = Request::LocalRead {
            shard,
            query: Query::Issuer(issuer),
            need,
        };
        self.client_send_to(
            i,
            Op::ReadIssuer,
            shard,
            request,
            value,
            None,
            Some((replica, read)),
        );
    }

    /// Registers a new issuer through this client's gateway, as `PUT
    /// /v1/issuers/{id}` does: the metadata plane places it (committed
    /// before it answers), then its group records it. Other clients read
    /// and reserve on it once that is acknowledged, through gateways whose
    /// directory copies may not have it yet.
    fn register_issuer(&mut self, i: usize) {
        let issuer = IssuerId::new(format!("ISS-{}", self.directory.len())).unwrap();
        let regions = self.placement.regions();
        let region = self.rng.pick(&regions).clone();
        let bucket = self.placement.place_issuer(&issuer, &region).unwrap();
        let entry = DirectoryEntry {
            issuer_id: issuer.clone(),
            home_region: region.clone(),
            bucket,
        };
        self.directory.insert(issuer.clone(), entry);
        let shard = self.placement.shard_of_bucket(bucket);
        let limit = self.rng.range(8, 30);
        let command = Command::UpsertIssuer {
            issuer_id: issuer.clone(),
            home_region: region.clone(),
            limit: Amount(limit),
        };
        let value = json!({"issuer_id": issuer, "home_region": region, "limit": limit});
        let request = Request::Write { shard, command };
        self.client_send(i, Op::Register, shard, request, value, None);
    }

    fn shard_of_placed(&self, issuer: &IssuerId) -> ShardId {
        self.placement
            .shard_of_bucket(self.directory[issuer].bucket)
    }

    fn shard_of(&self, issuer: &IssuerId) -> ShardId {
        self.issuers.iter().find(|(i, _, _)| i == issuer).unwrap().1
    }

    fn new_reservation(&mut self, i: usize) {
        let n = self.clients[i].next_token;
        self.clients[i].next_token += 1;
        let token = ReservationToken::new(format!("{}-t{n}", self.clients[i].id)).unwrap();
        let issuer = self.rng.pick(&self.issuers).0.clone();
        let amount = self.rng.range(1, 6);
        let hold_ttl_ms = self.rng.chance(30).then(|| self.rng.range(100, 3_000));
        let used = TokenUse {
            token,
            issuer,
            amount,
            hold_ttl_ms,
        };
        self.clients[i].used.push(used.clone());
        self.reserve(i, used);
    }

    fn reserve(&mut self, i: usize, used: TokenUse) {
        let shard = self.shard_of(&used.issuer);
        let value = json!({"token": used.token, "issuer_id": used.issuer, "amount": used.amount,
                           "hold_ttl_ms": used.hold_ttl_ms});
        let command = Command::Reserve {
            token: used.token.clone(),
            issuer_id: used.issuer.clone(),
            amount: Amount(used.amount),
            desk: "desk".into(),
            trader: "trader".into(),
            hold_ttl_ms: used.hold_ttl_ms,
        };
        let token = Some((used.token, used.issuer));
        self.client_send(
            i,
            Op::Reserve,
            shard,
            Request::Write { shard, command },
            value,
            token,
        );
    }

    fn transition(&mut self, i: usize, id: ReservationId, op: Op) {
        let shard = self.shard_of(id.issuer());
        let value = json!({"reservation_id": id});
        let command = match op {
            Op::Confirm => Command::Confirm { reservation_id: id },
            _ => Command::Release { reservation_id: id },
        };
        self.client_send(i, op, shard, Request::Write { shard, command }, value, None);
    }

    fn client_response(&mut self, i: usize, envelope: Envelope) {
        let Body::Response { id, response } = envelope.body else {
            return;
        };
        let Some(inflight) = &self.clients[i].inflight else {
            return; // a late answer after a timeout
        };
        if inflight.request_id != id {
            return;
        }
        if inflight.call.is_some() {
            let response = *response;
            return self.feed_call(i, |call, now, entry| call.on_answer(now, response, entry));
        }
        // A local read's answer (it went to one replica, without a call).
        let refused = match &*response {
            Response::Error(_) => true,
            // Not found at a replica may mean "not yet": the leader decides.
            Response::Read { result, .. } => !matches!(result, QueryResult::Issuer(Some(_))),
            Response::Applied { .. } => false,
        };
        if refused {
            let inflight = self.clients[i].inflight.as_mut().unwrap();
            if let Some(fallback) = inflight.read.as_mut().and_then(|r| r.fallback.take()) {
                // The local replica could not serve the read: ask the leader.
                let shard = self.clients[i].inflight_shard.expect("a shard in flight");
                return self.send_to_leader(i, shard, fallback);
            }
        }
        self.answered(i, *response);
    }

    /// The operation in flight got its answer (from its call, or from the
    /// replica a local read went to).
    fn answered(&mut self, i: usize, response: Response) {
        let inflight = self.clients[i]
            .inflight
            .as_ref()
            .expect("an operation in flight");
        let (op, read) = (inflight.op, inflight.read.clone());
        match response {
            Response::Error(e) => {
                let kind = if e.outcome_unknown { "info" } else { "fail" };
                self.complete(i, kind, json!({"error": e.code().as_str()}));
            }
            Response::Applied {
                outcome,
                commit_token,
                ..
            } => match outcome {
                Outcome::Reservation {
                    reservation,
                    replayed,
                } => {
                    raise(&mut self.clients[i].session, commit_token);
                    self.track(i, &reservation);
                    let value = json!({"reservation_id": reservation.reservation_id, "status": reservation.status,
                                       "commit_token": commit_token, "replayed": replayed});
                    self.complete(i, "ok", value);
                }
                Outcome::Batch(outcomes) if op == Op::ReserveBatch => {
                    self.stats.batches += 1;
                    self.complete_batch(i, "ok", Value::Null, Some(outcomes), Some(commit_token));
                }
                Outcome::Rejected(r) => {
                    self.complete(
                        i,
                        "fail",
                        json!({"error": r.code(), "commit_token": commit_token}),
                    );
                }
                Outcome::Token(view) => {
                    raise(&mut self.clients[i].session, commit_token);
                    let mut value = token_json(&view);
                    value["commit_token"] = json!(commit_token);
                    if let TokenOutcome::Committed { reservation_id, .. } = &view.outcome {
                        self.clients[i].mine.push(reservation_id.clone());
                    }
                    self.complete(i, "ok", value);
                }
                Outcome::Issuer { issuer, .. } => {
                    if !self.issuers.iter().any(|(id, ..)| *id == issuer.issuer_id) {
                        // Registered: every client may use it from now on,
                        // whatever its gateway's copy of the directory says.
                        let shard = self.shard_of_placed(&issuer.issuer_id);
                        self.issuers.push((issuer.issuer_id, shard, issuer.limit.0));
                    }
                    raise(&mut self.clients[i].session, commit_token);
                    self.complete(i, "ok", json!({"commit_token": commit_token}));
                }
                other => {
                    self.complete(i, "info", json!({"error": format!("unexpected {other:?}")}));
                }
            },
            Response::Read { result, served } => match (op, result) {
                (Op::ReadIssuer, QueryResult::Issuer(Some(view))) => {
                    let stale = match read.as_ref().and_then(|r| r.max_staleness_ms) {
                        Some(budget) => served.staleness_ms.is_none_or(|s| s > budget),
                        None => false,
                    };
                    let served_by = match served.role {
                        Role::Leader => "leader",
                        Role::Follower => "follower",
                    };
                    let named = read.map(|r| r.named).unwrap_or_default();
                    if let Some(applied) = served.applied {
                        raise(&mut self.clients[i].session, applied);
                    }
                    let value = json!({"limit": view.limit, "reserved": view.reserved,
                                       "applied": served.applied, "stale": stale,
                                       "staleness_ms": served.staleness_ms,
                                       "served_by": served_by, "session": named,
                                       "node": served.node});
                    self.complete(i, "ok", value);
                }
                (Op::TokenLookup, QueryResult::Token(view)) => {
                    let value = match view {
                        Some(view) => token_json(&view),
                        None => json!({"status": "unknown"}),
                    };
                    self.complete(i, "ok", value);
                }
                (Op::ReadIssuer, QueryResult::Issuer(None)) => {
                    self.complete(i, "fail", json!({"error": "unknown_issuer"}));
                }
                (_, other) => {
                    self.complete(i, "fail", json!({"error": format!("unexpected {other:?}")}));
                }
            },
        }
    }
}

/// The issuer a gateway looks up in its directory before it routes a
/// request: reads of an issuer and reserves.
fn looked_up_issuer(request: &Request) -> Option<&IssuerId> {
    match request {
        Request::Read {
            query: Query::Issuer(issuer),
            ..
        }
        | Request::LocalRead {
            query: Query::Issuer(issuer),
            ..
        } => Some(issuer),
        Request::Write {
            command: Command::Reserve { issuer_id, .. },
            ..
        } => Some(issuer_id),
        _ => None,
    }
}

/// One gateway's view of the metadata plane for one lookup: its copy, and
/// what the metadata leader answers linearizably now.
struct SimDirectory {
    map: Arc<ShardMap>,
    copy: Option<DirectoryEntry>,
    leader: Option<DirectoryEntry>,
}

impl Metadata for SimDirectory {
    fn map(&self) -> Arc<ShardMap> {
        self.map.clone()
    }

    fn lookup(&self, _issuer: &IssuerId) -> Option<DirectoryEntry> {
        self.copy.clone()
    }

    fn write(&self, command: MetaCommand) -> MetaFuture<'_, MetaReply> {
        unreachable!("the simulator commits metadata itself, not through a lookup: {command:?}")
    }

    fn refresh(&self) -> MetaFuture<'_, ()> {
        Box::pin(async { Ok(()) })
    }

    fn lookup_linearizable<'a>(
        &'a self,
        _issuer: &'a IssuerId,
    ) -> MetaFuture<'a, Option<DirectoryEntry>> {
        let entry = self.leader.clone();
        Box::pin(async move { Ok(entry) })
    }
}

fn raise(session: &mut BTreeMap<ShardId, CommitToken>, token: CommitToken) {
    let newest = session.entry(token.shard).or_insert(token);
    if token > *newest {
        *newest = token;
    }
}

fn control_config(swarm: &Swarm) -> ControlConfig {
    ControlConfig {
        failover: FailoverConfig {
            unreachable_after_ms: swarm.unreachable_after_ms,
            lease_ms: swarm.lease_ms,
            lease_margin_ms: LEASE_MARGIN_MS,
            drain_ms: DRAIN_MS,
        },
        interval_ms: CONTROL_INTERVAL_MS,
        transfer_interval_ms: TRANSFER_INTERVAL_MS,
        // Statuses answer at once here; the timeouts only name suspects.
        status_timeout_ms: STATUS_TIMEOUT_MS,
        suspect_timeout_ms: SUSPECT_TIMEOUT_MS,
    }
}

fn token_json(view: &TokenView) -> Value {
    match &view.outcome {
        TokenOutcome::Committed {
            reservation_id,
            commit_token,
        } => {
            json!({"status": "committed", "reservation_id": reservation_id, "commit_token": commit_token})
        }
        TokenOutcome::Rejected { code, commit_token } => {
            json!({"status": "rejected", "reason": code, "commit_token": commit_token})
        }
        TokenOutcome::Abandoned { commit_token } => {
            json!({"status": "abandoned", "commit_token": commit_token})
        }
    }
}

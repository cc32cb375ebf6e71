use std::collections::{BTreeMap, BTreeSet};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Mutex};

use harbor_checker::{
    Call as HistoryCall, Consistency as HistoryConsistency, ErrorReply, FinalLine,
    FinalReservation, FinalToken, HistoryRecorder, LookupStatus, OpResult, Reply,
    ReservationStatus, ServedBy, TokenStatus,
};
use harbor_gateway::call::{Call, CallLimits, MapEntry, Step};
use harbor_gateway::local::{Local, LocalReplicas};
use harbor_gateway::reads::{freshness, judge_local, Consistency, LocalAnswer};
use harbor_meta::{
    ControlConfig, ControlCore, DirectoryEntry, MetaCommand, MetaFuture, MetaReply, Metadata,
    Order, ShardMap,
};
use harbor_node::driver::{Driver, ReplicaInput};
use harbor_node::{NodeConfig, ReplicaPlan};
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
use harbor_wire::{Body, Envelope, Query, QueryResult, Request, Response};

use harbor_types::limits::{self, CONTROL_INTERVAL_MS};

use crate::rng::Rng;
use crate::swarm::Swarm;

mod buckets;
mod checks;
mod clients;
mod control;
mod faults;
mod feeds;
mod learners;
mod network;
mod projections;

use control::control_config;

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
    /// Change-feed consumer crashes (it resumes from its checkpoint).
    pub feed_restarts: u64,
    /// Feed positions a replica no longer kept (a new feed session).
    pub feed_expired: u64,
    /// Groups the feed scanned because their log no longer reached back
    /// to the beginning.
    pub feed_scans: u64,
    /// Resolved marks the feed sent.
    pub feed_resolved: u64,
    /// Projection crashes (it is rebuilt from a scan of every group).
    pub projection_rebuilds: u64,
    pub projection_reloads: u64,
    pub projection_searches_checked: u64,
    /// Groups the projection scanned again after its position expired.
    pub projection_rescans: u64,
    /// Scan pages refused for standing before their scan's first page.
    pub projection_stale_scan_pages: u64,
    /// Batches of reserves answered with their outcomes.
    pub batches: u64,
    pub partitions: u64,
    pub pauses: u64,
    pub isolations: u64,
    /// Wall-clock steps of a node by a second or more.
    pub wall_steps: u64,
    /// Nodes whose disks were replaced (they restart empty).
    pub disks_replaced: u64,
    /// Buckets the operator sealed (and later unsealed).
    pub bucket_seals: u64,
    /// Bucket moves that ended done, and aborted.
    pub moves_done: u64,
    pub moves_aborted: u64,
    /// Membership changes the operator asked for, and those that ended
    /// done.
    pub member_changes: u64,
    pub member_changes_done: u64,
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
    /// An envelope, and the life of the node that sent it (0 for a client).
    Deliver(Envelope, u64),
    Tick(NodeId),
    ClientStep(usize),
    ClientTimeout(usize, u64),
    /// The replica a local read went to did not answer in time (client,
    /// request id): the gateway skips it for a while and asks the leader.
    LocalReadTimeout(usize, u64),
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
    /// The change-feed consumer asks for more.
    FeedPoll,
    ProjectionPoll,
    /// The operator seals or unseals a bucket.
    OperatorStep,
    /// The operator's call asked to be woken.
    OperatorWake(MonoMs),
    /// The operator's move asked to be woken.
    OperatorTimer(MonoMs),
    Liveness,
}

struct SimNode {
    region: Region,
    up: bool,
    paused_until: u64,
    /// The node's monotonic clock reads simulated time plus this (a new
    /// origin at every start, like a new process). Never steps.
    mono_origin_ms: u64,
    /// Counts the node's processes: a message from an earlier one is not
    /// delivered once a later one runs.
    life: u64,
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
    /// The newest generation a seal was recorded at (`GroupInfo::sealed`).
    sealed: Generation,
    /// Earlier publications with when they were made, newest last (a few):
    /// a gateway's copy of the map may trail the metadata leader's.
    history: Vec<(u64, NodeId, Generation)>,
    /// Replicas being added (see `learners.rs`): sent the log, counted
    /// for nothing, not asked in failover.
    learners: Vec<NodeId>,
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
    route: Option<harbor_wire::Route>,
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
    /// The replica asked.
    replica: NodeId,
    /// The read's guarantee, as the gateway plans and judges it.
    consistency: Consistency,
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
    /// The bucket the request in flight is for: its call follows it.
    inflight_bucket: Option<harbor_types::BucketId>,
    /// The gateway's copy of the bucket table (bucket → group), which
    /// trails the metadata plane's for a while after a move.
    placement: Arc<ShardMap>,
    /// The newest commit token the client saw per shard: from its own
    /// writes and from what its reads showed (a gateway session).
    session: BTreeMap<ShardId, CommitToken>,
}

struct World {
    options: SimOptions,
    rng: Rng,
    /// The metadata plane's own faults (a membership step unanswered):
    /// a stream of their own, so they leave every other draw of a seed
    /// as it was.
    meta_rng: Rng,
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
    /// Buckets and groups as the metadata plane holds them (moves change
    /// which group holds a bucket).
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
    /// Each region's gateway: which local replica its next local read
    /// goes to (the gateway's own rule, on simulated time).
    local_replicas: BTreeMap<Region, LocalReplicas<u64>>,
    /// `HARBOR_SIM_TRACE=1`: print faults and control-plane decisions.
    tracing: bool,
    /// The change-feed consumer (taken out while it runs).
    feed: Option<feeds::SimFeed>,
    /// The projection (taken out while it runs).
    projection: Option<projections::SimProjection>,
    operator: buckets::SimOperator,
    /// Each group's number of members as created (membership changes
    /// grow a group past it and shrink it back).
    created_members: BTreeMap<ShardId, usize>,
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
        node_config.changes_retained_bytes = swarm.changes_retained_bytes;
        node_config.changes_retained_ms = swarm.changes_retained_ms;
        node_config.resolved_tick_ms = swarm.resolved_tick_ms;
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
                    life: 1,
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
                    sealed: g.generation,
                    history: Vec::new(),
                    learners: Vec::new(),
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
                inflight_bucket: None,
                placement: Arc::new(map.clone()),
                session: BTreeMap::new(),
            })
            .collect();
        let meta_rng = Rng::new(options.seed ^ 0x6d65_7461);
        let mut world = World {
            options,
            rng,
            meta_rng,
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
            local_replicas: BTreeMap::new(),
            tracing: std::env::var_os("HARBOR_SIM_TRACE").is_some(),
            feed: None,
            projection: None,
            operator: buckets::SimOperator::new(map.regions()[0].clone()),
            created_members: (map.groups.values())
                .map(|g| (g.shard, g.members.len()))
                .collect(),
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
            .filter(|(_, g)| g.members.contains(node) || g.learners.contains(node))
            .map(|(s, _)| *s)
            .collect()
    }

    fn region_of(&self, endpoint: &NodeId) -> Region {
        if let Some(node) = self.nodes.get(endpoint) {
            return node.region.clone();
        }
        if *endpoint == self.operator.id {
            return self.operator.region.clone();
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

    /// Records an invoke; returns its op id.
    fn invoke(&mut self, client: &str, call: HistoryCall) -> u64 {
        self.recorder.invoke(self.now, client, call)
    }

    /// Records a completion: `ok`, `fail` (definite) or `info` (unknown).
    fn completed(&mut self, op: u64, result: OpResult) {
        match result {
            OpResult::Ok(reply) => self.recorder.ok(self.now, op, reply),
            OpResult::Fail(error) => self.recorder.fail(self.now, op, error),
            OpResult::Info(error) => self.recorder.info(self.now, op, &error.error),
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
        self.start_feed();
        self.start_projection();
        for i in 0..self.clients.len() {
            self.schedule(self.now + 1, Event::ClientStep(i));
        }
        if self.options.faults {
            self.schedule(self.now + 200, Event::Fault);
        }
        self.schedule(self.now + 100, Event::OperatorStep);
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
            Event::Deliver(..)
                | Event::Tick(_)
                | Event::ClientStep(_)
                | Event::ClientTimeout(..)
                | Event::LocalReadTimeout(..)
                | Event::ClientWake(..)
        ) {
            self.trace(|| format!("{event:?}"));
        }
        match event {
            Event::Deliver(envelope, life) => self.deliver(envelope, life),
            Event::Tick(node) => self.tick(node),
            Event::ClientStep(i) => self.client_step(i),
            Event::ClientTimeout(i, op_id) => self.client_timeout(i, op_id),
            Event::LocalReadTimeout(i, request_id) => self.local_read_timeout(i, request_id),
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
            Event::FeedPoll => self.feed_poll(),
            Event::ProjectionPoll => self.projection_poll(),
            Event::OperatorStep => self.operator_step(),
            Event::OperatorWake(at) => self.operator_wake(at),
            Event::OperatorTimer(at) => self.operator_timer(at),
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
            let call = HistoryCall::RegisterIssuer {
                issuer_id: issuer.clone(),
                home_region: group.home.clone(),
                limit: Amount(limit),
            };
            let ok_before = self.stats.ok;
            for _try in 0..TRIES_MAX {
                let request = Request::Write {
                    shard,
                    command: command.clone(),
                };
                self.client_send(0, Op::Register, shard, request, call.clone(), None);
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
}

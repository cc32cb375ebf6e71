use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use harbor_meta::Metadata;
use harbor_types::limits;
use harbor_types::{BucketId, MonoMs, NodeId, Region, ShardId};
use harbor_wire::{NodeError, Request, Response, Route};
use harbor_wire::{Sink, Transport};
use tokio::sync::oneshot;

use crate::admin::Admin;
use crate::call::{Call, CallLimits, MapEntry, Step};
use crate::endpoint::Endpoint;
use crate::local::LocalReplicas;

/// Limits of one gateway.
#[derive(Clone, Debug)]
pub struct GatewayConfig {
    /// How a request follows its group's leader, and how long it waits
    /// (`request_timeout_ms`: past it the outcome of a write is unknown).
    pub call: CallLimits,
    /// Requests waiting for a node at once; more are refused (503).
    pub inflight_requests_max: usize,
    /// The largest request body.
    pub body_bytes_max: usize,
    /// The largest body of `POST /v1/reservations:batch`.
    pub batch_body_bytes_max: usize,
    /// How long a local read waits for the replica in this region (beyond
    /// a causal read's own wait) before it asks the leader.
    pub local_read_timeout_ms: u64,
    /// A local replica that did not answer a read is skipped this long, so
    /// a crashed one does not cost every read `local_read_timeout_ms`.
    pub silent_replica_skip_ms: u64,
    /// How often the projection asks each group for more when its last
    /// round brought nothing.
    pub projection_poll_ms: u64,
    /// Whether this gateway keeps a projection (search, reports); without
    /// one those endpoints answer 503.
    pub projections: bool,
    /// Where the projection is saved (and loaded from at start); `None`
    /// keeps it in memory only, built by scanning every group at start.
    pub projection_dir: Option<std::path::PathBuf>,
    /// How often the projection is saved, when rows changed.
    pub projection_save_ms: u64,
    /// Whether this gateway moves hot buckets of its region's groups on
    /// its own (see `crate::rebalancer`); off unless turned on.
    pub rebalance: bool,
    /// How often the rebalancer looks at the loads.
    pub rebalance_interval_ms: u64,
    /// How long a bucket the rebalancer moved stays where it went.
    pub rebalance_cooldown_ms: u64,
    /// When a bucket is hot enough to move.
    pub rebalance_limits: crate::rebalancer::RebalanceLimits,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig {
            call: CallLimits::default(),
            inflight_requests_max: limits::INFLIGHT_REQUESTS_MAX,
            body_bytes_max: limits::BODY_BYTES_MAX,
            batch_body_bytes_max: limits::BATCH_BODY_BYTES_MAX,
            local_read_timeout_ms: limits::LOCAL_READ_TIMEOUT_MS,
            silent_replica_skip_ms: limits::SILENT_REPLICA_SKIP_MS,
            projection_poll_ms: limits::PROJECTION_POLL_MS,
            projections: true,
            projection_dir: None,
            projection_save_ms: limits::PROJECTION_SAVE_MS,
            rebalance: false,
            rebalance_interval_ms: limits::REBALANCE_INTERVAL_MS,
            rebalance_cooldown_ms: limits::REBALANCE_COOLDOWN_MS,
            rebalance_limits: crate::rebalancer::RebalanceLimits::default(),
        }
    }
}

impl GatewayConfig {
    /// Checks the limits at start-up; a gateway with a config that breaks
    /// one refuses to start, saying which.
    pub fn validate(&self) -> Result<(), GatewayConfigError> {
        self.call
            .validate()
            .map_err(|rule| GatewayConfigError { rule })?;
        let rules = [
            ("inflight_requests_max > 0", self.inflight_requests_max > 0),
            (
                "0 < body_bytes_max <= batch_body_bytes_max",
                self.body_bytes_max > 0 && self.body_bytes_max <= self.batch_body_bytes_max,
            ),
            (
                "local_read_timeout_ms < call.request_timeout_ms",
                self.local_read_timeout_ms < self.call.request_timeout_ms,
            ),
            ("projection_poll_ms > 0", self.projection_poll_ms > 0),
            ("projection_save_ms > 0", self.projection_save_ms > 0),
            (
                "rebalance_interval_ms >= LOAD_WINDOW_MS",
                self.rebalance_interval_ms >= limits::LOAD_WINDOW_MS,
            ),
            (
                "0 < rebalance_hot_share_percent <= 100",
                (1..=100).contains(&self.rebalance_limits.hot_share_percent),
            ),
        ];
        match rules.iter().find(|(_, holds)| !holds) {
            Some((rule, _)) => Err(GatewayConfigError { rule }),
            None => Ok(()),
        }
    }
}

/// A gateway config that breaks a limit's rule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the gateway's limits must keep {rule}")]
pub struct GatewayConfigError {
    pub rule: &'static str,
}

/// A region's gateway: an endpoint on the transport plus the routing state.
pub struct Gateway {
    pub(crate) me: NodeId,
    pub(crate) region: Region,
    pub(crate) meta: Arc<dyn Metadata>,
    pub(crate) config: GatewayConfig,
    endpoint: Arc<Endpoint>,
    admin: OnceLock<Arc<dyn Admin>>,
    pub(crate) metrics: crate::metrics::Metrics,
    /// Which local replica the next local read goes to.
    pub(crate) local_replicas: Mutex<LocalReplicas<std::time::Instant>>,
    /// The origin of this gateway's monotonic clock.
    started: tokio::time::Instant,
    /// This region's projection (fed once [`Gateway::run_projection`] ran).
    pub(crate) projections: crate::projection_view::Projections,
    /// The bucket moves this gateway drives now.
    pub(crate) driving: crate::moves_http::Driving,
    pub(crate) rebalancer: crate::hot::Rebalancer,
}

impl Gateway {
    /// A gateway sending through `transport`; connect [`Gateway::sink`] to
    /// it for answers to arrive. Refused when `config` breaks a rule.
    pub fn start(
        me: NodeId,
        region: Region,
        meta: Arc<dyn Metadata>,
        transport: Arc<dyn Transport>,
        config: GatewayConfig,
    ) -> Result<Arc<Gateway>, GatewayConfigError> {
        config.validate()?;
        let endpoint = Endpoint::new(me.clone(), transport, config.inflight_requests_max);
        let projections = crate::projection_view::Projections::new(
            meta.map().groups.keys().copied(),
            config.projection_dir.clone(),
        );
        Ok(Arc::new(Gateway {
            me,
            region,
            config,
            endpoint,
            admin: OnceLock::new(),
            metrics: crate::metrics::Metrics::default(),
            local_replicas: Mutex::new(LocalReplicas::default()),
            started: tokio::time::Instant::now(),
            projections,
            driving: crate::moves_http::Driving::default(),
            rebalancer: crate::hot::Rebalancer::default(),
            meta,
        }))
    }

    /// Where the transport delivers this gateway's envelopes: an answer
    /// completes its waiting request on the sender's thread. A late answer
    /// after a timeout finds no one waiting and is dropped.
    pub fn sink(&self) -> Sink {
        self.endpoint.sink()
    }

    pub fn region(&self) -> &Region {
        &self.region
    }

    /// Connects the admin API to the control plane (once).
    pub fn set_admin(&self, admin: Arc<dyn Admin>) {
        if self.admin.set(admin).is_err() {
            panic!("gateway {}: admin hooks set twice", self.me);
        }
    }

    pub(crate) fn admin(&self) -> Option<&Arc<dyn Admin>> {
        self.admin.get()
    }

    pub(crate) fn region_of(&self, node: &NodeId) -> Option<Region> {
        self.meta.map().region_of(node).cloned()
    }

    /// Sends `request` to its group's leader and waits for the answer,
    /// following the leader as [`crate::call`] decides (the simulator runs
    /// the same state machine): this only executes its steps.
    pub async fn call(&self, request: Request) -> Result<Response, NodeError> {
        self.call_for(request, None).await
    }

    /// [`Gateway::call`] for a request about one bucket: it follows the
    /// bucket if it moves to another group while the call lasts.
    pub async fn call_for(
        &self,
        mut request: Request,
        bucket: Option<BucketId>,
    ) -> Result<Response, NodeError> {
        let shard = request.shard();
        let is_write = matches!(request, Request::Write { .. });
        let entry = self.entry_for(shard, bucket);
        let (mut call, mut steps) = Call::start(
            self.clock(),
            shard,
            bucket,
            is_write,
            entry,
            self.config.call,
        )?;
        // The current attempt: its id, its answer, where it went.
        let mut current: Option<(u64, oneshot::Receiver<Response>, NodeId, Option<Route>)> = None;
        let mut wake = tokio::time::Instant::now();
        loop {
            let mut refreshed = false;
            for step in steps.drain(..) {
                match step {
                    Step::Send { to, shard, route } => {
                        if let Some((id, ..)) = current.take() {
                            self.endpoint.forget(id);
                        }
                        request.set_shard(shard);
                        match self.endpoint.send(&to, request.clone(), route) {
                            Ok((id, rx)) => current = Some((id, rx, to, route)),
                            Err(refusal) => {
                                // Ends the call (the steps after it are moot).
                                let steps = call.on_send_refused(refusal);
                                let Some(Step::Done(result)) = steps.into_iter().next() else {
                                    unreachable!("a refused send ends the call");
                                };
                                return *result;
                            }
                        }
                    }
                    Step::Resend => {
                        let (id, _, to, route) = current.as_ref().expect("an attempt to resend");
                        self.endpoint.transmit(to, *id, request.clone(), *route);
                    }
                    Step::RefreshMap => {
                        let _ = self.meta.refresh().await;
                        refreshed = true;
                    }
                    Step::WakeAt(at) => wake = self.instant_of(at),
                    Step::Done(result) => {
                        if let Some((id, ..)) = current.take() {
                            self.endpoint.forget(id);
                        }
                        return *result;
                    }
                }
            }
            if refreshed {
                steps = call.on_timer(self.clock(), self.entry_for(shard, bucket).as_ref());
                continue;
            }
            // `Some(answer)`: the attempt's waiter fired (`None` inside:
            // it was dropped, as good as no answer).
            let answered = match current.as_mut() {
                Some((_, rx, ..)) => {
                    tokio::select! {
                        answer = rx => Some(answer.ok()),
                        _ = tokio::time::sleep_until(wake) => None,
                    }
                }
                None => {
                    tokio::time::sleep_until(wake).await;
                    None
                }
            };
            let entry = self.entry_for(shard, bucket);
            steps = match answered {
                Some(answer) => {
                    current = None; // its waiter is used up
                    match answer {
                        Some(response) => call.on_answer(self.clock(), response, entry.as_ref()),
                        None => call.on_timer(self.clock(), entry.as_ref()),
                    }
                }
                None => call.on_timer(self.clock(), entry.as_ref()),
            };
        }
    }

    /// The shard map's entry for `bucket`'s group if the call is for a
    /// bucket, else for `shard`, as this gateway's copy has it.
    fn entry_for(&self, shard: ShardId, bucket: Option<BucketId>) -> Option<MapEntry> {
        let map = self.meta.map();
        let shard = match bucket {
            Some(bucket) => *map.buckets.get(bucket.0 as usize)?,
            None => shard,
        };
        map.groups.get(&shard).map(|g| MapEntry {
            shard,
            leader: g.leader.clone(),
            generation: g.generation,
            map_version: map.map_version,
        })
    }

    /// This gateway's monotonic clock, as a [`Call`] reads it.
    pub(crate) fn clock(&self) -> MonoMs {
        let elapsed = self.started.elapsed().as_millis();
        MonoMs::from_millis(u64::try_from(elapsed).unwrap_or(u64::MAX - 1) + 1)
    }

    pub(crate) fn instant_of(&self, at: MonoMs) -> tokio::time::Instant {
        self.started + Duration::from_millis(at.as_millis() - 1)
    }

    /// Where this gateway's requests to single nodes go (local reads,
    /// status requests).
    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }
}

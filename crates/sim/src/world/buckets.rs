//! The operator: moves buckets between the groups of a region (the
//! gateway's own `Mover`, its steps sent through the gateway's `Call`),
//! or seals a bucket for a while and unseals it (a cutover that aborted).
//! Clients writing to the bucket meanwhile get `moved`, wait and try
//! again, through gateways whose bucket tables may trail the move. Every
//! seal, unseal and acquisition the groups report is written as a
//! `bucket` history line at the end, with every issuer of the bucket, for
//! the checker's `one_owner_per_bucket`.

use harbor_checker::{BucketEvent, BucketLine};
use harbor_gateway::mover::{MoveLimits, MoveStep, Mover};
use harbor_gateway::rebalancer::{self, GroupLoad};
use harbor_meta::MetaState;
use harbor_types::BucketId;
use harbor_wire::Route;

use super::*;

pub(super) struct SimOperator {
    pub(super) id: NodeId,
    /// Where it sends from (the network's delays).
    pub(super) region: Region,
    task: Option<Task>,
    call: Option<OperatorCall>,
    /// What the groups answered, for the history.
    events: Vec<(ShardId, BucketId, BucketEvent, CommitToken)>,
}

struct Task {
    shard: ShardId,
    bucket: BucketId,
    phase: Phase,
    /// A move, driven by the gateway's core; `None`: a seal and unseal.
    mover: Option<Mover>,
    /// The source's seal was seen (an unseal answer then opens it again).
    seal_seen: bool,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Phase {
    Sealing,
    /// Sealed; unseal once the simulated time passes `until`.
    Sealed {
        until: u64,
    },
    Unsealing,
}

struct OperatorCall {
    call: Call,
    request: Request,
    to: NodeId,
    route: Option<Route>,
    request_id: u64,
    wake_at: Option<MonoMs>,
}

impl SimOperator {
    pub(super) fn new(region: Region) -> SimOperator {
        SimOperator {
            id: NodeId::new("operator").unwrap(),
            region,
            task: None,
            call: None,
            events: Vec::new(),
        }
    }

    /// Nothing is sealed and nothing is asked.
    pub(super) fn idle(&self) -> bool {
        self.task.is_none()
    }
}

impl World {
    pub(super) fn operator_step(&mut self) {
        let next = self.now + self.rng.range(50, 400);
        self.schedule(next, Event::OperatorStep);
        self.learner_step();
        if self.operator.call.is_some() {
            return;
        }
        let Some(task) = &self.operator.task else {
            if !self.safety || !self.rng.chance(30) || self.directory.is_empty() {
                return;
            }
            let entries: Vec<DirectoryEntry> = self.directory.values().cloned().collect();
            let entry = self.rng.pick(&entries).clone();
            let shard = self.placement.shard_of_bucket(entry.bucket);
            let home = self.groups[&shard].home.clone();
            let targets: Vec<ShardId> = self
                .groups
                .iter()
                .filter(|(s, g)| **s != shard && g.home == home)
                .map(|(s, _)| *s)
                .collect();
            if targets.is_empty() || self.rng.chance(25) {
                self.operator.task = Some(Task {
                    shard,
                    bucket: entry.bucket,
                    phase: Phase::Sealing,
                    mover: None,
                    seal_seen: false,
                });
                return self.operator_send();
            }
            if self.rng.chance(40) {
                if let Some(plan) = self.rebalancer_plan(&home) {
                    harbor_types::sim::probe("rebalancer.moved_a_hot_bucket");
                    self.trace(|| format!("the rebalancer plans: {}", plan.reason));
                    return self.begin_move(plan.bucket, plan.from, plan.to);
                }
            }
            let to = *self.rng.pick(&targets);
            return self.begin_move(entry.bucket, shard, to);
        };
        if task.mover.is_some() {
            return; // the move drives itself
        }
        match task.phase {
            // The last attempt failed: try again (both are idempotent).
            Phase::Sealing | Phase::Unsealing => self.operator_send(),
            Phase::Sealed { until } if until <= self.now || !self.safety => {
                self.operator.task.as_mut().unwrap().phase = Phase::Unsealing;
                self.operator_send();
            }
            Phase::Sealed { .. } => {}
        }
    }

    /// Sends the task's command to its group's leader, as published.
    fn operator_send(&mut self) {
        let task = self.operator.task.as_ref().expect("a task");
        if task.mover.is_some() {
            unreachable!("a move sends its own steps");
        }
        let command = match task.phase {
            Phase::Sealing => Command::SealBucket {
                bucket: task.bucket,
                // Issuers registered by `UpsertIssuer` learn their bucket
                // from the seal.
                issuers: self
                    .directory
                    .values()
                    .filter(|e| e.bucket == task.bucket)
                    .map(|e| e.issuer_id.clone())
                    .collect(),
            },
            Phase::Unsealing => Command::UnsealBucket {
                bucket: task.bucket,
            },
            Phase::Sealed { .. } => unreachable!("nothing to send while sealed"),
        };
        let shard = task.shard;
        self.operator_request(Request::Write { shard, command });
    }

    /// Sends one request to its group's leader through a gateway call.
    fn operator_request(&mut self, request: Request) {
        let shard = request.shard();
        let entry = self.operator_entry(shard);
        let is_write = matches!(request, Request::Write { .. });
        match Call::start(
            self.client_clock(),
            shard,
            None,
            is_write,
            Some(entry),
            self.call_limits,
        ) {
            Ok((call, steps)) => {
                self.operator.call = Some(OperatorCall {
                    to: call.leader().clone(),
                    call,
                    request,
                    route: None,
                    request_id: 0,
                    wake_at: None,
                });
                self.operator_run(steps);
            }
            Err(_) => self.operator.call = None,
        }
    }

    /// The metadata leader's entry for the group (the operator reads it
    /// fresh).
    fn operator_entry(&self, shard: ShardId) -> MapEntry {
        let (leader, generation) = self.groups[&shard].published.clone();
        MapEntry {
            shard,
            leader,
            generation,
            map_version: 1,
        }
    }

    fn operator_run(&mut self, steps: Vec<Step>) {
        for step in steps {
            let Some(call) = self.operator.call.as_mut() else {
                return;
            };
            match step {
                Step::Send { to, route, .. } => {
                    let request_id = self.next_request;
                    self.next_request += 1;
                    call.to = to.clone();
                    call.route = route;
                    call.request_id = request_id;
                    let body = Body::Request {
                        id: request_id,
                        request: call.request.clone(),
                        route,
                    };
                    let from = self.operator.id.clone();
                    self.send(Envelope { from, to, body });
                }
                Step::Resend => {
                    let body = Body::Request {
                        id: call.request_id,
                        request: call.request.clone(),
                        route: call.route,
                    };
                    let (from, to) = (self.operator.id.clone(), call.to.clone());
                    self.send(Envelope { from, to, body });
                }
                Step::RefreshMap => {
                    return self.operator_feed(|call, now, e| call.on_timer(now, e))
                }
                Step::WakeAt(at) => {
                    call.wake_at = Some(at);
                    let delay = at.since(self.client_clock());
                    self.schedule(self.now + delay, Event::OperatorWake(at));
                }
                Step::Done(result) => {
                    self.operator.call = None;
                    return self.operator_answered(*result);
                }
            }
        }
    }

    fn operator_feed(
        &mut self,
        input: impl FnOnce(&mut Call, MonoMs, Option<&MapEntry>) -> Vec<Step>,
    ) {
        let Some(shard) = self.operator.call.as_ref().map(|c| c.request.shard()) else {
            return;
        };
        let entry = self.operator_entry(shard);
        let now = self.client_clock();
        let call = self.operator.call.as_mut().expect("a call");
        let steps = input(&mut call.call, now, Some(&entry));
        self.operator_run(steps);
    }

    pub(super) fn operator_wake(&mut self, at: MonoMs) {
        if self
            .operator
            .call
            .as_ref()
            .is_some_and(|c| c.wake_at == Some(at))
        {
            self.operator_feed(|call, now, entry| call.on_timer(now, entry));
        }
    }

    pub(super) fn operator_response(&mut self, envelope: Envelope) {
        let Body::Response { id, response } = envelope.body else {
            return;
        };
        if self
            .operator
            .call
            .as_ref()
            .is_some_and(|c| c.request_id == id)
        {
            self.operator_feed(|call, now, entry| call.on_answer(now, *response, entry));
        }
    }

    /// A definite answer moves the task on; anything else is tried again
    /// at the next step.
    fn operator_answered(&mut self, result: Result<Response, harbor_wire::NodeError>) {
        if self
            .operator
            .task
            .as_ref()
            .is_some_and(|t| t.mover.is_some())
        {
            return self.move_answered(result);
        }
        let Ok(Response::Applied {
            outcome: Outcome::Bucket { record, .. },
            ..
        }) = result
        else {
            return;
        };
        let (sealed_at, opened_at) = (record.sealed_at, record.opened_at);
        let task = self.operator.task.as_mut().expect("a task");
        let (shard, bucket) = (task.shard, task.bucket);
        match (task.phase, sealed_at, opened_at) {
            (Phase::Sealing, Some(at), _) => {
                self.stats.bucket_seals += 1;
                self.operator
                    .events
                    .push((shard, bucket, BucketEvent::Sealed, at));
                let until = self.now + self.rng.range(20, 1_500);
                self.operator.task.as_mut().unwrap().phase = Phase::Sealed { until };
                self.trace(|| format!("operator sealed {bucket} of {shard} at {at}"));
            }
            (Phase::Unsealing, None, Some(at)) => {
                self.operator
                    .events
                    .push((shard, bucket, BucketEvent::Opened, at));
                self.operator.task = None;
                self.trace(|| format!("operator unsealed {bucket} of {shard} at {at}"));
            }
            (_, sealed_at, opened_at) => self.violations.push(format!(
                "{shard} answered a bucket command for {bucket} with sealed at {sealed_at:?}, \
                 opened at {opened_at:?}"
            )),
        }
    }

    /// The bucket lines, with every issuer placed in each bucket.
    pub(super) fn record_buckets(&mut self) {
        for (shard, bucket, event, at) in std::mem::take(&mut self.operator.events) {
            let issuers = self
                .directory
                .values()
                .filter(|e| e.bucket == bucket)
                .map(|e| e.issuer_id.clone())
                .collect();
            self.recorder.bucket(BucketLine {
                time_ms: self.now,
                bucket,
                shard,
                issuers,
                event,
                at,
            });
        }
    }
}

impl World {
    /// The move the gateway's rebalancer would make among `home`'s groups,
    /// from the loads their leaders report now (the simulator's load is
    /// light, so any load counts).
    fn rebalancer_plan(&self, home: &Region) -> Option<rebalancer::Plan> {
        let loads: Vec<GroupLoad> = (self.groups.iter())
            .filter(|(_, g)| g.home == *home)
            .filter_map(|(shard, _)| {
                let leader = (self.nodes.values())
                    .filter(|n| n.up)
                    .filter_map(|n| n.replicas.get(shard))
                    .map(|d| d.group())
                    .filter(|g| g.replica().is_leader())
                    .max_by_key(|g| g.replica().generation())?;
                Some(GroupLoad {
                    shard: *shard,
                    home_region: home.clone(),
                    report: leader.load_report(1),
                })
            })
            .collect();
        let limits = rebalancer::RebalanceLimits {
            writes_per_s_min: 1,
            ..rebalancer::RebalanceLimits::default()
        };
        let plan = rebalancer::plan(&loads, &BTreeSet::new(), &BTreeSet::new(), limits)?;
        // A leader that has not heard of a move yet may report a bucket
        // the map gave away: only what the map says it owns moves.
        (self.placement.shard_of_bucket(plan.bucket) == plan.from).then_some(plan)
    }

    /// Begins moving `bucket` from `from` to `to` in the metadata plane,
    /// then drives it.
    fn begin_move(&mut self, bucket: BucketId, from: ShardId, to: ShardId) {
        let begin = MetaCommand::BeginMove {
            bucket,
            to,
            at_ms: self.now,
        };
        let record = match self.meta_move(begin) {
            Ok(record) => record,
            Err(reason) => {
                self.violations
                    .push(format!("the operator could not begin a move: {reason}"));
                return;
            }
        };
        // Issuers registered by `UpsertIssuer` learn their bucket first.
        let untagged = self
            .directory
            .values()
            .filter(|e| e.bucket == bucket)
            .map(|e| e.issuer_id.clone())
            .collect();
        let limits = move_limits();
        let (mover, step) = Mover::start(self.client_clock(), record, untagged, limits);
        self.trace(|| format!("operator moves {bucket} from {from} to {to}"));
        self.operator.task = Some(Task {
            shard: from,
            bucket,
            phase: Phase::Sealing,
            mover: Some(mover),
            seal_seen: false,
        });
        self.move_step(step);
    }

    /// Applies a move command to the metadata plane (the simulator's is
    /// its map, committed at once).
    fn meta_move(&mut self, command: MetaCommand) -> Result<harbor_meta::BucketMove, String> {
        let mut state = MetaState {
            map: Some((*self.placement).clone()),
            ..MetaState::default()
        };
        let reply = state.apply(&command);
        self.placement = Arc::new(state.map.expect("a map"));
        match reply {
            MetaReply::Move(record) => Ok(record),
            other => Err(format!("{other:?}")),
        }
    }

    fn move_step(&mut self, mut step: MoveStep) {
        loop {
            step = match step {
                MoveStep::Write { shard, command } => {
                    return self.operator_request(Request::Write { shard, command })
                }
                MoveStep::Read { shard, query } => {
                    return self.operator_request(Request::Read { shard, query })
                }
                MoveStep::Meta(command) => {
                    let answer = self
                        .meta_move(command)
                        .map_err(harbor_meta::MetaError::Refused);
                    let now = self.client_clock();
                    let mover = self.mover();
                    mover.on_meta(now, answer)
                }
                MoveStep::WakeAt(at) => {
                    let delay = at.since(self.client_clock());
                    return self.schedule(self.now + delay.max(1), Event::OperatorTimer(at));
                }
                MoveStep::Done(result) => return self.move_done(*result),
            };
        }
    }

    fn mover(&mut self) -> &mut Mover {
        self.operator
            .task
            .as_mut()
            .and_then(|t| t.mover.as_mut())
            .expect("a move under way")
    }

    pub(super) fn operator_timer(&mut self, _at: MonoMs) {
        if self
            .operator
            .task
            .as_ref()
            .is_some_and(|t| t.mover.is_some())
            && self.operator.call.is_none()
        {
            let now = self.client_clock();
            let step = self.mover().on_timer(now);
            self.move_step(step);
        }
    }

    /// A move's write or read answered: what the groups said of the bucket
    /// goes to the history, then the mover goes on.
    fn move_answered(&mut self, result: Result<Response, harbor_wire::NodeError>) {
        let (bucket, from, to, id) = {
            let record = self.mover().record();
            (record.bucket, record.from, record.to, record.id)
        };
        if let Ok(Response::Applied {
            outcome: Outcome::Bucket { record, .. },
            commit_token,
            ..
        }) = &result
        {
            let task = self.operator.task.as_mut().expect("a task");
            let mut events = Vec::new();
            if commit_token.shard == from {
                if let Some(at) = record.sealed_at {
                    task.seal_seen = true;
                    events.push((from, BucketEvent::Sealed, at));
                } else if let (Some(at), true) = (record.opened_at, task.seal_seen) {
                    events.push((from, BucketEvent::Opened, at));
                }
            }
            if commit_token.shard == to && record.acquired_by == Some(id) {
                if let Some(at) = record.opened_at {
                    events.push((to, BucketEvent::Opened, at));
                }
            }
            for (shard, event, at) in events {
                let line = (shard, bucket, event, at);
                if !self.operator.events.contains(&line) {
                    self.operator.events.push(line);
                }
            }
        }
        let now = self.client_clock();
        let answer = result.map_err(|e| e.to_string());
        let step = self.mover().on_response(now, answer);
        self.move_step(step);
    }

    fn move_done(
        &mut self,
        result: Result<harbor_meta::BucketMove, harbor_gateway::mover::MoveFailure>,
    ) {
        let task = self.operator.task.take().expect("a task");
        let record = task.mover.as_ref().expect("a move").record().clone();
        if let Err(failure) = &result {
            if failure.reason.contains("not consistent") {
                // The target refused the rows it staged: the copy missed a
                // change (or the tallies that check it are wrong).
                self.violations.push(format!(
                    "move {} of {}: {}",
                    record.id, record.bucket, failure.reason
                ));
            }
        }
        match result {
            Ok(done) => {
                self.stats.moves_done += 1;
                self.trace(|| format!("move {} done: {:?}", done.id, done.progress));
            }
            Err(failure) if failure.aborted => {
                self.stats.moves_aborted += 1;
                self.trace(|| format!("move {} aborted: {}", record.id, failure.reason));
            }
            Err(failure) => {
                // Stuck part-way: recover it (abort, or finish if acquired).
                self.trace(|| format!("move {} stuck: {}", record.id, failure.reason));
                let current = self
                    .placement
                    .moves
                    .get(&record.bucket)
                    .cloned()
                    .unwrap_or(record);
                let (mover, step) = Mover::recover(self.client_clock(), current, move_limits());
                self.operator.task = Some(Task {
                    mover: Some(mover),
                    ..task
                });
                self.move_step(step);
            }
        }
    }
}

/// Small pages and short budgets, so moves meet faults mid-copy and some
/// time out and abort.
fn move_limits() -> MoveLimits {
    MoveLimits {
        chunk_rows: 3,
        final_pass_rows: 2,
        passes_max: 4,
        copy_timeout_ms: 3_000,
        cutover_timeout_ms: 1_500,
        retry_ms: 50,
    }
}

//! The operator: seals a bucket of a group for a while, then unseals it
//! (a move's cutover that aborted), through the gateway's own `Call`.
//! Clients writing to the bucket meanwhile get `moved`, wait and try
//! again. Every seal and unseal the groups report is written as a
//! `bucket` history line at the end, with every issuer of the bucket, for
//! the checker's `one_owner_per_bucket`.

use harbor_checker::{BucketEvent, BucketLine};
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
            self.operator.task = Some(Task {
                shard,
                bucket: entry.bucket,
                phase: Phase::Sealing,
            });
            return self.operator_send();
        };
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
        let request = Request::Write { shard, command };
        let entry = self.operator_entry(shard);
        match Call::start(
            self.client_clock(),
            shard,
            None,
            true,
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

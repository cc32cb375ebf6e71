//! Clients: each records its operations and sends them through its
//! gateway's own `Call`, map copy and directory rule.

use harbor_wire::Route;

use super::*;

impl World {
    pub(super) fn client_send(
        &mut self,
        i: usize,
        op: Op,
        shard: ShardId,
        request: Request,
        call: HistoryCall,
        token: Option<(ReservationToken, IssuerId)>,
    ) {
        self.client_send_to(i, op, shard, request, call, token, None);
    }

    /// Starts an operation: to the leader the client's map names, or, for
    /// a local read, to the given replica (without a route).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn client_send_to(
        &mut self,
        i: usize,
        op: Op,
        shard: ShardId,
        request: Request,
        call: HistoryCall,
        token: Option<(ReservationToken, IssuerId)>,
        local: Option<(NodeId, LocalRead)>,
    ) {
        let client = self.clients[i].id.to_string();
        let op_id = self.invoke(&client, call);
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
                return self.complete(i, OpResult::Fail(ErrorReply::new("unknown_issuer")));
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
    pub(super) fn send_to_leader(&mut self, i: usize, shard: ShardId, request: Request) {
        let stale = matches!(request, Request::Read { .. }) && self.rng.chance(20);
        let client = &self.clients[i];
        let cached = stale
            .then(|| client.previous_leaders.get(&shard))
            .flatten()
            .or_else(|| client.leaders.get(&shard))
            .cloned();
        let entry = cached.map(|(leader, generation)| MapEntry {
            shard,
            leader,
            generation,
            map_version: 1,
        });
        let is_write = matches!(request, Request::Write { .. });
        let bucket = request_issuer(&request)
            .and_then(|issuer| self.directory.get(issuer))
            .map(|entry| entry.bucket);
        self.clients[i].inflight_bucket = bucket;
        // The group the gateway's copy names for the bucket.
        let entry = match bucket {
            Some(b) => {
                let shard = self.clients[i].placement.shard_of_bucket(b);
                self.clients[i]
                    .leaders
                    .get(&shard)
                    .cloned()
                    .map(|(leader, generation)| MapEntry {
                        shard,
                        leader,
                        generation,
                        map_version: 1,
                    })
                    .or(entry)
            }
            None => entry,
        };
        let now = self.client_clock();
        match Call::start(now, shard, bucket, is_write, entry, self.call_limits) {
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
    pub(super) fn run_call(&mut self, i: usize, steps: Vec<Step>) {
        for step in steps {
            let Some(inflight) = self.clients[i].inflight.as_mut() else {
                return;
            };
            let op_id = inflight.op_id;
            let call = inflight.call.as_mut().expect("a call in flight");
            match step {
                Step::Send { to, shard, route } => {
                    call.to = to.clone();
                    call.route = route;
                    call.request.set_shard(shard);
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

    pub(super) fn client_wake(&mut self, i: usize, op_id: u64, at: MonoMs) {
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
    pub(super) fn feed_call(
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
    pub(super) fn client_clock(&self) -> MonoMs {
        MonoMs::from_millis(self.now + 1)
    }

    /// The client's gateway's map entry for the group in flight.
    pub(super) fn client_entry(&self, i: usize) -> Option<MapEntry> {
        let client = &self.clients[i];
        let shard = match client.inflight_bucket {
            Some(bucket) => client.placement.shard_of_bucket(bucket),
            None => client.inflight_shard?,
        };
        let (leader, generation) = self.clients[i].leaders.get(&shard)?.clone();
        Some(MapEntry {
            shard,
            leader,
            generation,
            map_version: 1,
        })
    }

    /// The client's gateway's directory lookup, by the shipped rule
    /// (`harbor_meta`'s `find`): its copy, else the metadata leader,
    /// linearizably. With the `directory-from-copy` bug, the "leader"
    /// answers from the copy, as a gateway that trusted its copy's miss.
    pub(super) fn find(&self, i: usize, issuer: &IssuerId) -> Option<ShardId> {
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
        // By the gateway's copy of the bucket table (it may trail a move).
        Some(self.clients[i].placement.shard_of_bucket(entry.bucket))
    }

    /// The client's gateway pulls the published shard map and directory.
    /// Under faults the gateway's copy may trail the metadata leader by up
    /// to `MAP_LAG_MS_MAX` (it read a lagging voter), never going back from
    /// what it had.
    pub(super) fn refresh_client_map(&mut self, i: usize) {
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
        // The bucket table trails too: now and then a refresh brings the
        // copy the gateway had (a move it has not heard of yet).
        let stale = lag > 0 && self.rng.chance(30);
        let client = &mut self.clients[i];
        if !stale {
            client.placement = self.placement.clone();
        }
        client.directory = self.directory.clone();
        let before = std::mem::replace(&mut client.leaders, leaders);
        for (shard, old) in before {
            if client.leaders.get(&shard) != Some(&old) {
                client.previous_leaders.insert(shard, old);
            }
        }
    }

    /// Sends the in-flight operation's request (a new attempt has a new id).
    pub(super) fn send_request(
        &mut self,
        i: usize,
        to: NodeId,
        request: Request,
        route: Option<Route>,
    ) {
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
    pub(super) fn reserve_batch(&mut self, i: usize) {
        // One group's issuers, by the gateway's copy of the bucket table.
        let first = self.rng.pick(&self.issuers).0.clone();
        let placed = |w: &World, issuer: &IssuerId| {
            w.clients[i]
                .placement
                .shard_of_bucket(w.directory[issuer].bucket)
        };
        let shard = placed(self, &first);
        let on_shard: Vec<IssuerId> = self
            .issuers
            .iter()
            .filter(|(issuer, _, _)| placed(self, issuer) == shard)
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
            let op_id = self.invoke(&client, reserve_call(&used));
            self.stats.ops += 1;
            items.push(BatchItem { op_id, used });
        }
        // With each item's bucket, as the gateway sends a batch (a plain
        // `Batch` cannot say which bucket an issuer that moved here after
        // the sender's map was taken is in).
        let commands: Vec<(harbor_types::BucketId, Command)> = items
            .iter()
            .map(|item| {
                let bucket = self.directory[&item.used.issuer].bucket;
                (bucket, reserve_command(&item.used))
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
        let command = Command::BucketBatch(commands);
        self.send_to_leader(i, shard, Request::Write { shard, command });
        let at = self.now + self.options.client_timeout_ms + CLIENT_GRACE_MS;
        self.schedule(at, Event::ClientTimeout(i, op_id));
    }

    /// Ends a batch: one completion per reserve, from the batch entry's
    /// outcomes and commit token, or `Err`: the same result for all.
    pub(super) fn complete_batch(
        &mut self,
        i: usize,
        outcomes: Result<(Vec<Outcome>, CommitToken), OpResult>,
    ) {
        let inflight = self.clients[i].inflight.take().expect("a batch in flight");
        let results: Vec<OpResult> = match outcomes {
            Err(all) => inflight.batch.iter().map(|_| all.clone()).collect(),
            Ok((outcomes, commit_token)) => {
                raise(&mut self.clients[i].session, commit_token);
                outcomes
                    .into_iter()
                    .map(|outcome| match outcome {
                        Outcome::Reservation {
                            reservation,
                            replayed,
                        } => {
                            self.track(i, &reservation);
                            OpResult::Ok(Reply::Reserve {
                                reservation_id: reservation.reservation_id,
                                status: status(reservation.status),
                                commit_token,
                                replayed,
                            })
                        }
                        Outcome::Rejected(r) => OpResult::Fail(ErrorReply {
                            error: r.code().to_string(),
                            commit_token: Some(commit_token),
                        }),
                        other => unexpected(&other),
                    })
                    .collect()
            }
        };
        for (item, result) in inflight.batch.iter().zip(results) {
            match result {
                OpResult::Ok(_) => self.stats.ok += 1,
                OpResult::Fail(_) => self.stats.fail += 1,
                OpResult::Info(_) => {
                    self.stats.info += 1;
                    let token = (item.used.token.clone(), item.used.issuer.clone());
                    self.clients[i].unknown.push(token);
                }
            }
            self.completed(item.op_id, result);
        }
        let at = self.now + self.rng.range(1, 20);
        self.schedule(at, Event::ClientStep(i));
    }

    /// Keeps the client's lists of its held and confirmed reservations.
    pub(super) fn track(&mut self, i: usize, reservation: &harbor_reservation::ReservationView) {
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

    pub(super) fn complete(&mut self, i: usize, result: OpResult) {
        if self.clients[i]
            .inflight
            .as_ref()
            .is_some_and(|f| f.op == Op::ReserveBatch)
        {
            return self.complete_batch(i, Err(result));
        }
        let client = &mut self.clients[i];
        let inflight = client.inflight.take().expect("an operation in flight");
        match result {
            OpResult::Ok(_) => self.stats.ok += 1,
            OpResult::Fail(_) => self.stats.fail += 1,
            OpResult::Info(_) => self.stats.info += 1,
        }
        if matches!(result, OpResult::Info(_)) {
            if let Some(token) = inflight.token.clone() {
                if matches!(inflight.op, Op::Reserve | Op::Resolve) {
                    self.clients[i].unknown.push(token);
                }
            }
        }
        self.completed(inflight.op_id, result);
        if !self.setting_up {
            let at = self.now + self.rng.range(1, 20);
            self.schedule(at, Event::ClientStep(i));
        }
    }

    pub(super) fn client_timeout(&mut self, i: usize, op_id: u64) {
        if self.clients[i]
            .inflight
            .as_ref()
            .is_some_and(|f| f.op_id == op_id)
        {
            self.complete(i, OpResult::Info(ErrorReply::new("timeout")));
        }
    }

    pub(super) fn client_step(&mut self, i: usize) {
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
            let call = HistoryCall::Resolve {
                token: token.clone(),
                issuer_id: issuer.clone(),
            };
            let command = Command::ResolveToken {
                issuer_id: issuer.clone(),
                token: token.clone(),
            };
            return self.client_send(
                i,
                Op::Resolve,
                shard,
                Request::Write { shard, command },
                call,
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
                let call = HistoryCall::TokenLookup {
                    token: used.token.clone(),
                    issuer_id: used.issuer.clone(),
                };
                let request = Request::Read {
                    shard,
                    query: Query::Token(used.issuer.clone(), used.token.clone()),
                };
                self.client_send(i, Op::TokenLookup, shard, request, call, None);
            }
            _ => self.new_reservation(i),
        }
    }

    /// A read of an issuer in one of the four modes. The non-strong ones go
    /// to a replica in the client's region with what it needs to be fresh
    /// enough, as a gateway sends them.
    pub(super) fn read_issuer(&mut self, i: usize) {
        let issuer = self.rng.pick(&self.issuers).0.clone();
        let shard = self.shard_of(&issuer);
        let strong = Request::Read {
            shard,
            query: Query::Issuer(issuer.clone()),
        };
        let session = self.clients[i].session.get(&shard).copied();
        let consistency = match self.rng.range(0, 99) {
            0..=29 => Consistency::Strong,
            30..=59 => Consistency::Session,
            60..=84 => Consistency::Bounded {
                max_staleness_ms: *self.rng.pick(&[300, 1_000, 2_000]),
                allow_stale: false,
            },
            _ => Consistency::Causal { wait_ms: 200 },
        };
        // What the gateway asks of a local replica (its dependencies are
        // the session here).
        let Some(need) = freshness(consistency, session, session) else {
            let call = HistoryCall::ReadIssuer {
                issuer_id: issuer,
                consistency: HistoryConsistency::Strong,
                max_staleness_ms: None,
            };
            return self.client_send(i, Op::ReadIssuer, shard, strong, call, None);
        };
        let named: Vec<CommitToken> = need.applied_at_least.and(session).into_iter().collect();
        let call = HistoryCall::ReadIssuer {
            issuer_id: issuer.clone(),
            consistency: match consistency {
                Consistency::Strong => HistoryConsistency::Strong,
                Consistency::Session => HistoryConsistency::Session,
                Consistency::Bounded { .. } => HistoryConsistency::Bounded,
                Consistency::Causal { .. } => HistoryConsistency::Causal,
            },
            max_staleness_ms: need.max_staleness_ms,
        };
        let local: Vec<NodeId> = self.groups[&shard]
            .members
            .iter()
            .filter(|m| self.nodes[*m].region == self.clients[i].region)
            .cloned()
            .collect();
        let region = self.clients[i].region.clone();
        let picked = self
            .local_replicas
            .entry(region)
            .or_default()
            .pick(self.now, &local);
        let Local::Replica(replica) = picked else {
            // None in the region, or none answered lately: the leader.
            return self.client_send(i, Op::ReadIssuer, shard, strong, call, None);
        };
        let timeout_at = self.now + need.wait_ms + limits::LOCAL_READ_TIMEOUT_MS;
        let read = LocalRead {
            replica: replica.clone(),
            consistency,
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
            call,
            None,
            Some((replica, read)),
        );
        if let Some(inflight) = &self.clients[i].inflight {
            let request_id = inflight.request_id;
            self.schedule(timeout_at, Event::LocalReadTimeout(i, request_id));
        }
    }

    /// A local read's replica did not answer within the gateway's timeout:
    /// skip it for a while and ask the leader, as `Gateway::read_as` does.
    pub(super) fn local_read_timeout(&mut self, i: usize, request_id: u64) {
        let Some(inflight) = self.clients[i].inflight.as_mut() else {
            return;
        };
        if inflight.request_id != request_id || inflight.call.is_some() {
            return; // answered, or already with the leader
        }
        let Some(read) = inflight.read.as_mut() else {
            return;
        };
        let Some(fallback) = read.fallback.take() else {
            return;
        };
        let replica = read.replica.clone();
        let region = self.clients[i].region.clone();
        let until = self.now + limits::SILENT_REPLICA_SKIP_MS;
        self.local_replicas
            .entry(region)
            .or_default()
            .silent(replica, until);
        let shard = self.clients[i].inflight_shard.expect("a shard in flight");
        self.send_to_leader(i, shard, fallback);
    }

    /// Registers a new issuer through this client's gateway, as `PUT
    /// /v1/issuers/{id}` does: the metadata plane places it (committed
    /// before it answers), then its group records it. Other clients read
    /// and reserve on it once that is acknowledged, through gateways whose
    /// directory copies may not have it yet.
    pub(super) fn register_issuer(&mut self, i: usize) {
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
        // (The issuers registered at the start use `UpsertIssuer`, as
        // before buckets were recorded: a seal names them.)
        let command = Command::PlaceIssuer {
            issuer_id: issuer.clone(),
            home_region: region.clone(),
            limit: Amount(limit),
            bucket,
        };
        let call = HistoryCall::RegisterIssuer {
            issuer_id: issuer,
            home_region: region,
            limit: Amount(limit),
        };
        let request = Request::Write { shard, command };
        self.client_send(i, Op::Register, shard, request, call, None);
    }

    pub(super) fn shard_of_placed(&self, issuer: &IssuerId) -> ShardId {
        self.placement
            .shard_of_bucket(self.directory[issuer].bucket)
    }

    /// The issuer's group now (its bucket may have moved).
    pub(super) fn shard_of(&self, issuer: &IssuerId) -> ShardId {
        self.shard_of_placed(issuer)
    }

    pub(super) fn new_reservation(&mut self, i: usize) {
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

    pub(super) fn reserve(&mut self, i: usize, used: TokenUse) {
        let shard = self.shard_of(&used.issuer);
        let call = reserve_call(&used);
        let command = reserve_command(&used);
        let token = Some((used.token, used.issuer));
        self.client_send(
            i,
            Op::Reserve,
            shard,
            Request::Write { shard, command },
            call,
            token,
        );
    }

    pub(super) fn transition(&mut self, i: usize, id: ReservationId, op: Op) {
        let shard = self.shard_of(id.issuer());
        let (call, command) = match op {
            Op::Confirm => (
                HistoryCall::Confirm {
                    reservation_id: id.clone(),
                },
                Command::Confirm { reservation_id: id },
            ),
            _ => (
                HistoryCall::Release {
                    reservation_id: id.clone(),
                },
                Command::Release { reservation_id: id },
            ),
        };
        self.client_send(i, op, shard, Request::Write { shard, command }, call, None);
    }

    pub(super) fn client_response(&mut self, i: usize, envelope: Envelope) {
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
        // A local read's answer (it went to one replica, without a call),
        // judged by the gateway's rule.
        let consistency = self.clients[i]
            .inflight
            .as_ref()
            .and_then(|f| f.read.as_ref())
            .map(|r| r.consistency);
        let refused =
            consistency.is_some_and(|c| judge_local(c, &response) == LocalAnswer::AskLeader);
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
    pub(super) fn answered(&mut self, i: usize, response: Response) {
        let inflight = self.clients[i]
            .inflight
            .as_ref()
            .expect("an operation in flight");
        let (op, read) = (inflight.op, inflight.read.clone());
        let result = match response {
            Response::Error(e) => {
                let error = ErrorReply::new(e.code().as_str());
                if e.outcome_unknown {
                    OpResult::Info(error)
                } else {
                    OpResult::Fail(error)
                }
            }
            Response::Applied {
                outcome,
                commit_token,
                ..
            } => match (op, outcome) {
                (
                    Op::Reserve | Op::Confirm | Op::Release,
                    Outcome::Reservation {
                        reservation,
                        replayed,
                    },
                ) => {
                    raise(&mut self.clients[i].session, commit_token);
                    self.track(i, &reservation);
                    let status = status(reservation.status);
                    OpResult::Ok(match op {
                        Op::Reserve => Reply::Reserve {
                            reservation_id: reservation.reservation_id,
                            status,
                            commit_token,
                            replayed,
                        },
                        Op::Confirm => Reply::Confirm {
                            status,
                            commit_token,
                        },
                        _ => Reply::Release {
                            status,
                            commit_token,
                        },
                    })
                }
                (Op::ReserveBatch, Outcome::Batch(outcomes)) => {
                    self.stats.batches += 1;
                    return self.complete_batch(i, Ok((outcomes, commit_token)));
                }
                (_, Outcome::Rejected(r)) => OpResult::Fail(ErrorReply {
                    error: r.code().to_string(),
                    commit_token: Some(commit_token),
                }),
                (Op::Resolve, Outcome::Token(view)) => {
                    raise(&mut self.clients[i].session, commit_token);
                    let (status, reservation_id) = token_outcome(&view);
                    if let Some(id) = &reservation_id {
                        self.clients[i].mine.push(id.clone());
                    }
                    OpResult::Ok(Reply::Resolve {
                        status,
                        reservation_id,
                        commit_token: Some(commit_token),
                    })
                }
                (Op::Register, Outcome::Issuer { issuer, .. }) => {
                    if !self.issuers.iter().any(|(id, ..)| *id == issuer.issuer_id) {
                        // Registered: every client may use it from now on,
                        // whatever its gateway's copy of the directory says.
                        let shard = self.shard_of_placed(&issuer.issuer_id);
                        self.issuers.push((issuer.issuer_id, shard, issuer.limit.0));
                    }
                    raise(&mut self.clients[i].session, commit_token);
                    OpResult::Ok(Reply::RegisterIssuer { commit_token })
                }
                (_, other) => unexpected(&other),
            },
            Response::Read { result, served } => match (op, result) {
                (Op::ReadIssuer, QueryResult::Issuer(Some(view))) => {
                    let stale = match read.as_ref().map(|r| r.consistency) {
                        Some(Consistency::Bounded {
                            max_staleness_ms, ..
                        }) => served.staleness_ms.is_none_or(|s| s > max_staleness_ms),
                        _ => false,
                    };
                    let served_by = match served.role {
                        Role::Leader => ServedBy::Leader,
                        Role::Follower => ServedBy::Follower,
                    };
                    let named = read.map(|r| r.named).unwrap_or_default();
                    if let Some(applied) = served.applied {
                        raise(&mut self.clients[i].session, applied);
                    }
                    OpResult::Ok(Reply::ReadIssuer {
                        limit: view.limit,
                        reserved: view.reserved,
                        applied: served
                            .applied
                            .expect("a replica that knows an issuer has applied an entry"),
                        stale,
                        staleness_ms: served.staleness_ms,
                        served_by,
                        session: named,
                    })
                }
                (Op::TokenLookup, QueryResult::Token(view)) => {
                    let (status, reservation_id) = match view {
                        Some(view) => {
                            let (status, reservation_id) = token_outcome(&view);
                            let status = match status {
                                TokenStatus::Committed => LookupStatus::Committed,
                                TokenStatus::Rejected => LookupStatus::Rejected,
                                TokenStatus::Abandoned => LookupStatus::Abandoned,
                            };
                            (status, reservation_id)
                        }
                        None => (LookupStatus::Unknown, None),
                    };
                    OpResult::Ok(Reply::TokenLookup {
                        status,
                        reservation_id,
                    })
                }
                (Op::ReadIssuer, QueryResult::Issuer(None)) => {
                    OpResult::Fail(ErrorReply::new("unknown_issuer"))
                }
                (_, other) => OpResult::Fail(ErrorReply::new(format!("unexpected {other:?}"))),
            },
        };
        self.complete(i, result);
    }
}

/// The issuer a request is about, whose bucket a gateway routes it by
/// (a batch goes without: it may span buckets).
pub(super) fn request_issuer(request: &Request) -> Option<&IssuerId> {
    match request {
        Request::Write { command, .. } => command.issuer(),
        Request::Read { query, .. } | Request::LocalRead { query, .. } => match query {
            Query::Issuer(issuer) | Query::OpenReservations(issuer) | Query::Token(issuer, _) => {
                Some(issuer)
            }
            Query::Reservation(id) => Some(id.issuer()),
            _ => None,
        },
    }
}

/// The issuer a gateway looks up in its directory before it routes a
/// request: reads of an issuer and reserves.
pub(super) fn looked_up_issuer(request: &Request) -> Option<&IssuerId> {
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
            command:
                Command::Reserve { issuer_id, .. } | Command::ReserveForCustomer { issuer_id, .. },
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

    fn map_linearizable(&self) -> MetaFuture<'_, Arc<ShardMap>> {
        unreachable!("a gateway never asks for the map linearizably")
    }
}

pub(super) fn raise(session: &mut BTreeMap<ShardId, CommitToken>, token: CommitToken) {
    let newest = session.entry(token.shard).or_insert(token);
    if token > *newest {
        *newest = token;
    }
}
/// A token's recorded outcome, as the history names it.
pub(super) fn token_outcome(view: &TokenView) -> (TokenStatus, Option<ReservationId>) {
    match &view.outcome {
        TokenOutcome::Committed { reservation_id, .. } => {
            (TokenStatus::Committed, Some(reservation_id.clone()))
        }
        TokenOutcome::Rejected { .. } => (TokenStatus::Rejected, None),
        TokenOutcome::Abandoned { .. } => (TokenStatus::Abandoned, None),
    }
}

pub(super) fn status(status: harbor_reservation::Status) -> ReservationStatus {
    match status {
        harbor_reservation::Status::Held => ReservationStatus::Held,
        harbor_reservation::Status::Confirmed => ReservationStatus::Confirmed,
        harbor_reservation::Status::Released => ReservationStatus::Released,
        harbor_reservation::Status::Expired => ReservationStatus::Expired,
    }
}

fn reserve_call(used: &TokenUse) -> HistoryCall {
    HistoryCall::Reserve {
        token: used.token.clone(),
        issuer_id: used.issuer.clone(),
        amount: Amount(used.amount),
        hold_ttl_ms: used.hold_ttl_ms,
    }
}

/// An answer the operation cannot have: recorded as unknown.
fn unexpected(outcome: &Outcome) -> OpResult {
    OpResult::Info(ErrorReply::new(format!("unexpected {outcome:?}")))
}

/// The command a token's use sends. A third of the tokens reserve for a
/// customer (one of five), decided by the token so a retry sends the same.
fn reserve_command(used: &TokenUse) -> Command {
    let hash = used
        .token
        .as_str()
        .bytes()
        .fold(0u64, |h, b| h.wrapping_mul(31).wrapping_add(u64::from(b)));
    let (token, issuer_id, amount) = (used.token.clone(), used.issuer.clone(), Amount(used.amount));
    let (desk, trader, hold_ttl_ms) = ("desk".to_string(), "trader".to_string(), used.hold_ttl_ms);
    if hash % 3 == 0 {
        Command::ReserveForCustomer {
            token,
            issuer_id,
            amount,
            desk,
            trader,
            hold_ttl_ms,
            customer_id: format!("cust-{}", hash % 5),
        }
    } else {
        Command::Reserve {
            token,
            issuer_id,
            amount,
            desk,
            trader,
            hold_ttl_ms,
        }
    }
}

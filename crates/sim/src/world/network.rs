//! Nodes and the simulated network: each node's clocks, its replicas
//! (the node's own drivers on simulated disks), and message delivery with
//! delays, drops, duplicates and partitions.

use super::*;

impl World {
    /// The node's two clocks: monotonic (simulated time from the node's
    /// own origin) and wall (simulated time plus drift and steps).
    pub(super) fn node_now(&self, node: &NodeId) -> Now {
        let n = &self.nodes[node];
        let wall = (self.now as i64 + n.skew_ms + n.wall_step_ms).max(0) as u64;
        Now::new(
            MonoMs::from_millis(self.now + n.mono_origin_ms),
            WallMs::from_millis(wall),
        )
    }

    pub(super) fn open_replicas(&mut self, name: &NodeId) {
        for shard in self.shards_of(name) {
            self.open_replica(name, shard);
        }
    }

    /// The group's members as the metadata plane publishes them: its
    /// voters, then the learners being added.
    pub(super) fn members_of(&self, shard: ShardId) -> Vec<Member> {
        self.placement.replica_members(shard)
    }

    pub(super) fn open_replica(&mut self, name: &NodeId, shard: ShardId) {
        let group = &self.groups[&shard];
        // The simulator's metadata is linearizable by construction.
        let plan = ReplicaPlan {
            shard,
            members: self.members_of(shard),
            fence: group.published.1.max(group.sealed),
            fence_is_led: group.sealed <= group.published.1,
            members_epoch: self.placement.groups[&shard].members_epoch,
        };
        // A replica added while its node was down finds no disk: empty.
        let host = self.nodes.get_mut(name).unwrap();
        let disk = host.disks.entry(shard).or_default().clone();
        let transport: Arc<dyn Transport> = self.outbox.clone();
        let driver = match Driver::open_on(
            name.clone(),
            plan,
            self.node_config.clone(),
            disk,
            transport,
            self.node_now(name),
        ) {
            Ok(driver) => driver,
            Err(e) => panic!("{name} cannot recover {shard} after a crash: {e}"),
        };
        let node = self.nodes.get_mut(name).unwrap();
        node.replicas.insert(shard, driver);
    }

    /// Runs `f` on one replica at the node's clock, then sends what it sent.
    pub(super) fn drive(
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
        if driver.group().removed() {
            self.pump();
            self.close_removed(name, shard);
            return;
        }
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

    pub(super) fn pump(&mut self) {
        let sent = std::mem::take(&mut *self.outbox.0.lock().unwrap());
        for envelope in sent {
            self.send(envelope);
        }
    }

    pub(super) fn send(&mut self, envelope: Envelope) {
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
        let life = self.nodes.get(&envelope.from).map_or(0, |n| n.life);
        let replication = matches!(envelope.body, Body::Replication(_));
        if replication && self.safety && self.options.faults && self.rng.chance(1) {
            // A duplicate, sometimes a ghost that arrives seconds later,
            // after generations may have changed. Only replication traffic:
            // client requests travel at most once (one TCP frame, never
            // replayed), as on the real transports.
            let late = if self.rng.chance(30) { 3_000 } else { 30 };
            let again = self.now + base + self.rng.range(0, late);
            self.schedule(again, Event::Deliver(envelope.clone(), life));
        }
        self.schedule(self.now + base + jitter, Event::Deliver(envelope, life));
    }

    /// `life`: the sender's process when it sent. A process's messages
    /// never arrive after its successor started: TCP delivers a dead
    /// process's frames at once or not at all (the late duplicates above
    /// come from a process that still runs).
    pub(super) fn deliver(&mut self, envelope: Envelope, life: u64) {
        if self
            .nodes
            .get(&envelope.from)
            .is_some_and(|sender| sender.life != life)
        {
            self.stats.dropped += 1;
            return;
        }
        if let Some(i) = self.clients.iter().position(|c| c.id == envelope.to) {
            self.stats.delivered += 1;
            return self.client_response(i, envelope);
        }
        if envelope.to == self.operator.id {
            self.stats.delivered += 1;
            return self.operator_response(envelope);
        }
        let name = envelope.to.clone();
        let node = &self.nodes[&name];
        if !node.up {
            self.stats.dropped += 1;
            return;
        }
        if node.paused_until > self.now {
            let at = node.paused_until;
            self.schedule(at, Event::Deliver(envelope, life));
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

    pub(super) fn tick(&mut self, name: NodeId) {
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
}

//! Faults: crashes and restarts, lost disks, pauses, isolations,
//! partitions, fsync failures, clock steps, transfers and stale orders.

use super::*;

impl World {
    pub(super) fn crash(&mut self, name: &NodeId) {
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

    pub(super) fn restart(&mut self, name: &NodeId) {
        if self.nodes[name].up {
            return;
        }
        // A new process: its monotonic clock has a new origin. Its
        // replicas hear their roles from the control loop's next round.
        let origin = 1 + self.rng.range(0, 1_000_000);
        let node = self.nodes.get_mut(name).unwrap();
        node.mono_origin_ms = origin;
        node.life += 1;
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
    pub(super) fn stale_order(&mut self, name: &NodeId, shard: ShardId, control: Control) {
        self.trace(|| format!("stale order to {name}: {shard} {control:?}"));
        self.stats.stale_orders += 1;
        self.drive(name, shard, |d, now| {
            d.handle(now, ReplicaInput::Control(control))
        });
    }

    /// Whether some replica lost its state and has not caught up yet.
    pub(super) fn any_recovering(&self) -> bool {
        self.nodes
            .values()
            .flat_map(|n| n.replicas.values())
            .any(|r| r.group().replica().is_recovering())
    }

    pub(super) fn step_wall_clock(&mut self, name: &NodeId, step_ms: i64) {
        self.trace(|| format!("wall clock of {name} steps {step_ms} ms"));
        self.nodes.get_mut(name).unwrap().wall_step_ms += step_ms;
        self.stats.wall_steps += 1;
    }

    pub(super) fn fault(&mut self) {
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
}

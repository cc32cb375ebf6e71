//! The control plane: the shipped `ControlCore`, fed each replica's
//! status every round, and its orders carried out.

use super::*;

impl World {
    /// At start, as `harbor dev` does: every member hears the published
    /// leader of generation 1 directly.
    pub(super) fn bootstrap(&mut self) {
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
    pub(super) fn tell(&mut self, member: &NodeId, shard: ShardId, control: Control) {
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
        self.host_members(member, shard, &control);
        self.drive(member, shard, |d, now| {
            d.handle(now, ReplicaInput::Control(control))
        });
    }

    /// The control plane cannot reach `node`: it is down, or cut off.
    pub(super) fn unreachable(&self, node: &NodeId) -> bool {
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
    pub(super) fn control(&mut self) {
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
    pub(super) fn execute(&mut self, orders: Vec<Order>) {
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
                Order::RecordSeal { shard, generation } => {
                    let result = if self.safety && self.options.faults && self.rng.chance(5) {
                        // A write that timed out may have committed all
                        // the same.
                        if self.rng.chance(50) {
                            let group = self.groups.get_mut(&shard).unwrap();
                            group.sealed = group.sealed.max(generation);
                        }
                        self.trace(|| {
                            format!("recording the seal of {shard} at {generation} failed")
                        });
                        Err("the metadata plane is electing a leader".to_string())
                    } else {
                        self.trace(|| format!("seal {shard} at {generation} recorded"));
                        let group = self.groups.get_mut(&shard).unwrap();
                        group.sealed = group.sealed.max(generation);
                        Ok(())
                    };
                    queue.extend(self.control.published(shard, result));
                }
                Order::TransferEnded { result, .. } => {
                    self.trace(|| format!("transfer ended: {result:?}"));
                }
                Order::ChangeMembers { shard, change } => {
                    queue.extend(self.commit_members(shard, change));
                }
                Order::MembersEnded { result, .. } => {
                    self.trace(|| format!("membership change ended: {result:?}"));
                    self.stats.member_changes_done += u64::from(result.is_ok());
                }
            }
        }
        let stats = self.control.stats();
        self.stats.failovers = stats.failovers;
        self.stats.transfers = stats.transfers;
        self.stats.transfers_abandoned = stats.transfers_abandoned;
    }
}

/// The shipped defaults, with this seed's timings and the simulator's
/// shorter drain and clock-skew margin.
pub(super) fn control_config(swarm: &Swarm) -> ControlConfig {
    let mut config = ControlConfig::new(swarm.lease_ms);
    config.failover.unreachable_after_ms = swarm.unreachable_after_ms;
    config.failover.lease_margin_ms = LEASE_MARGIN_MS;
    config.failover.drain_ms = DRAIN_MS;
    config.sync_acks = swarm.sync_acks;
    // Short, so some additions under faults time out and are undone.
    config.member_catch_up_ms = 3_000;
    config
}

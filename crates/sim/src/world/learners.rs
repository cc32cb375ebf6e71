//! Membership changes under faults: the operator asks the control core
//! (`ControlCore::change_members`, as shipped) to add a replica on a node
//! that holds none of a group, or to remove one, and the core drives it:
//! each step committed in the metadata plane (the simulator's map), the
//! group's replicas told the membership (`Control::Members`), a node named
//! opening an empty replica and a replica its group removed closing and
//! dropping its data, as a node's runtime does. With the bug switch `learner-acks-count` a
//! leader counts a learner's acks towards commits, and a failover that
//! asks only the voters loses an acknowledged write.

use harbor_meta::{MemberChange, MembersGoal, MetaState, StepFailed};

use super::*;

impl World {
    pub(super) fn learner_step(&mut self) {
        if !self.safety || !self.rng.chance(8) {
            return;
        }
        let shards: Vec<ShardId> = self.groups.keys().copied().collect();
        let shard = *self.rng.pick(&shards);
        let group = &self.groups[&shard];
        let others: Vec<NodeId> = (self.nodes.iter())
            .filter(|(n, node)| node.up && !group.members.contains(n))
            .map(|(n, _)| n.clone())
            .collect();
        // Around the size it was created with: one more, or one fewer.
        let created = self.created_members[&shard];
        let grow = match group.members.len() {
            n if n < created => true,
            n if n > created => false,
            _ => self.rng.chance(50),
        };
        let goal = if grow && !others.is_empty() {
            MembersGoal::Add(self.rng.pick(&others).clone())
        } else {
            MembersGoal::Remove(self.rng.pick(&group.members).clone())
        };
        self.trace(|| format!("operator asks {shard}: {goal:?}"));
        self.stats.member_changes += 1;
        let orders = self.control.change_members(self.now, shard, goal, 0);
        self.execute(orders);
    }

    /// The metadata plane commits a membership step (the simulator's is
    /// its map, committed at once), and the core hears how it went as the
    /// control loop tells it: a refused step that the map shows (a copy of
    /// one that committed unanswered) is taken as done; with faults, a
    /// step may go unanswered, whether it committed or not.
    pub(super) fn commit_members(&mut self, shard: ShardId, change: MemberChange) -> Vec<Order> {
        let unanswered = self.options.faults && self.meta_rng.chance(5);
        let applies = !unanswered || self.meta_rng.chance(50);
        let reply = match applies {
            true => {
                let mut state = MetaState {
                    map: Some((*self.placement).clone()),
                    ..MetaState::default()
                };
                let reply = state.apply(&MetaCommand::ChangeMembers {
                    shard,
                    change: change.clone(),
                });
                self.placement = Arc::new(state.map.expect("a map"));
                Some(reply)
            }
            false => None,
        };
        if let Some(MetaReply::Map { .. }) = reply {
            let g = &self.placement.groups[&shard];
            let group = self.groups.get_mut(&shard).unwrap();
            group.members = g.members.clone();
            group.learners = g.learners.clone();
            self.trace(|| format!("{shard} membership: {change:?}"));
        }
        let result = match reply {
            _ if unanswered => {
                self.trace(|| format!("{shard} membership step unanswered: {change:?}"));
                Err(StepFailed::Unanswered(
                    "the metadata plane did not answer".into(),
                ))
            }
            Some(MetaReply::Map { .. }) => Ok(&*self.placement),
            _ if change.shows_in(&self.placement, shard) => Ok(&*self.placement),
            other => Err(StepFailed::Refused(format!("{other:?}"))),
        };
        self.control
            .members_changed(self.now, shard, &change, result)
    }

    /// A node's runtime on a membership order for a group it hosts no
    /// replica of: when the order names it and the metadata plane agrees
    /// (the runtime reads the map linearizably), it opens an empty one.
    /// Closing is the replica's own call (`drive`: `GroupCore::removed`).
    pub(super) fn host_members(&mut self, node: &NodeId, shard: ShardId, control: &Control) {
        let Control::Members { members, .. } = control else {
            return;
        };
        let named = members.iter().any(|m| m.node == *node)
            && self.members_of(shard).iter().any(|m| m.node == *node);
        if named && !self.nodes[node].replicas.contains_key(&shard) {
            self.trace(|| format!("{node} opens an empty replica of {shard}"));
            let host = self.nodes.get_mut(node).unwrap();
            host.disks.insert(shard, MemStorage::new());
            // Empty, and not a new group: it starts recovering at the fence.
            self.open_replica(node, shard);
        }
    }

    /// A replica its group removed closes, and its data goes.
    pub(super) fn close_removed(&mut self, node: &NodeId, shard: ShardId) {
        self.trace(|| format!("{node} closes its replica of {shard}: removed"));
        let host = self.nodes.get_mut(node).unwrap();
        host.replicas.remove(&shard);
        host.disks.remove(&shard);
    }
}

//! Replicas added to a running group and removed again, as learners: a
//! node that holds no copy of a group gets an empty replica of it, every
//! replica of the group it can reach is told the new membership
//! (`Control::Members`, a newer epoch each time; one that misses it is not
//! told again, as the control loop does not yet), the leader sends the learner its log (a
//! snapshot in chunks, then entries) and counts its acks for nothing; a
//! while later the learner is removed and its replica and disk dropped.
//! The control loop does not know of learners, so the learner is told the
//! published leader here whenever a newer one appears. With the bug switch
//! `learner-acks-count` a leader counts a learner's acks towards commits,
//! and a failover that asks only the voters loses an acknowledged write.

use harbor_meta::{MemberChange, MetaState};

use super::*;

/// How long a learner stays, in simulated ms, at least and at most.
const LEARNER_STAY_MS: (u64, u64) = (500, 6_000);

impl World {
    pub(super) fn learner_step(&mut self) {
        let shards: Vec<ShardId> = self.groups.keys().copied().collect();
        for shard in shards {
            let learners = self.groups[&shard].learners.clone();
            for (node, until) in learners {
                if !self.safety || until <= self.now {
                    self.remove_learner(shard, &node);
                } else {
                    self.tell_learner_the_leader(shard, &node);
                }
            }
        }
        if self.safety && self.rng.chance(10) {
            self.add_learner();
        }
    }

    /// An empty replica of a group on an up node that holds none of it.
    fn add_learner(&mut self) {
        let shards: Vec<ShardId> = self.groups.keys().copied().collect();
        let shard = *self.rng.pick(&shards);
        let group = &self.groups[&shard];
        if !group.learners.is_empty() {
            return;
        }
        let candidates: Vec<NodeId> = (self.nodes.iter())
            .filter(|(n, node)| node.up && !group.members.contains(n))
            .map(|(n, _)| n.clone())
            .collect();
        if candidates.is_empty() {
            return;
        }
        let node = self.rng.pick(&candidates).clone();
        if let Err(e) = self.change_members(shard, MemberChange::AddLearner(node.clone())) {
            return self
                .violations
                .push(format!("adding {node} to {shard}: {e}"));
        }
        let until = self.now + self.rng.range(LEARNER_STAY_MS.0, LEARNER_STAY_MS.1);
        let learner = self.nodes.get_mut(&node).unwrap();
        learner.disks.insert(shard, MemStorage::new());
        let group = self.groups.get_mut(&shard).unwrap();
        group.learners.push((node.clone(), until));
        self.trace(|| format!("{node} joins {shard} as a learner"));
        // Empty, and not a new group: it starts recovering at the fence.
        self.open_replica(&node, shard);
        self.tell_members(shard);
        self.tell_learner_the_leader(shard, &node);
    }

    fn remove_learner(&mut self, shard: ShardId, node: &NodeId) {
        if let Err(e) = self.change_members(shard, MemberChange::Remove(node.clone())) {
            self.violations
                .push(format!("removing {node} from {shard}: {e}"));
        }
        let group = self.groups.get_mut(&shard).unwrap();
        group.learners.retain(|(n, _)| n != node);
        self.trace(|| format!("{node} leaves {shard}"));
        self.tell_members(shard);
        let gone = self.nodes.get_mut(node).unwrap();
        gone.replicas.remove(&shard);
        gone.disks.remove(&shard);
    }

    /// The metadata plane commits a membership change (the simulator's
    /// is its map, committed at once).
    fn change_members(&mut self, shard: ShardId, change: MemberChange) -> Result<(), String> {
        let mut state = MetaState {
            map: Some((*self.placement).clone()),
            ..MetaState::default()
        };
        let reply = state.apply(&MetaCommand::ChangeMembers { shard, change });
        self.placement = Arc::new(state.map.expect("a map"));
        match reply {
            MetaReply::Map { .. } => Ok(()),
            other => Err(format!("{other:?}")),
        }
    }

    /// Every replica of the group hears the membership the map holds now.
    fn tell_members(&mut self, shard: ShardId) {
        let epoch = self.placement.groups[&shard].members_epoch;
        let members = self.members_of(shard);
        for member in &members {
            let control = Control::Members {
                epoch,
                members: members.clone(),
            };
            self.tell(&member.node, shard, control);
        }
    }

    /// What the control loop tells every member it publishes a leader for.
    fn tell_learner_the_leader(&mut self, shard: ShardId, node: &NodeId) {
        let (leader, generation) = self.groups[&shard].published.clone();
        let knows = (self.nodes[node].replicas.get(&shard))
            .is_some_and(|d| d.group().replica().generation() >= generation);
        if !knows {
            self.tell(node, shard, Control::Follow(generation, leader));
        }
    }
}

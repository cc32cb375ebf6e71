//! Membership changes of a group, as the metadata plane commits them
//! (DESIGN.md section 4: committed here before a replica counts towards
//! anything). One change at a time per group, in steps that keep every
//! acknowledged write findable by a failover:
//!
//! - **Adding** a replica: it joins as a *learner* (sent the log, counted
//!   for nothing, never asked in failover), catches up by snapshot and
//!   log, then is *promoted*: from that commit on failover asks it, and
//!   only after that does its group's leader count its acks.
//! - **Removing** a voter: it is first *leaving* (still asked in failover,
//!   but the leader stops counting its acks); once every entry committed
//!   with its acks is on the voters that stay, it is *removed*. A learner
//!   is removed at once (nothing ever counted on it).
//!
//! The leader of a group cannot leave (transfer its leadership first), and
//! a group keeps a leader and at least one voting follower in its home
//! region (the commit rule, for `sync_acks = 1`, the default).
//!
//! Learners are never named leader: the failover planner chooses among
//! `members` only. A leaving member may be (it can hold the only copy of
//! an entry committed with its acks before it began leaving); its removal
//! then waits for a transfer away from it.
//!
//! These are the rules the metadata plane can check alone. When a learner
//! has caught up, and when a leaving member's acks are covered, depends on
//! what the replicas report: the control loop's driver (not built yet)
//! must check that before it commits `Promote` or `Remove`, and the
//! failover planner must learn of each change.

use harbor_replication::Member;
use harbor_types::{NodeId, ShardId};
use serde::{Deserialize, Serialize};

use crate::placement::{GroupInfo, ShardMap};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MemberChange {
    /// A node joins the group as a learner.
    AddLearner(NodeId),
    /// A learner becomes a voter (the caller checked that it caught up).
    Promote(NodeId),
    /// A voter stops counting, on its way out.
    BeginLeave(NodeId),
    /// A leaving member votes again (its removal was given up).
    Stay(NodeId),
    /// A leaving member (once the caller checked that the voters that stay
    /// hold every entry it acknowledged), or a learner, is gone.
    Remove(NodeId),
}

impl MemberChange {
    pub fn node(&self) -> &NodeId {
        match self {
            MemberChange::AddLearner(n)
            | MemberChange::Promote(n)
            | MemberChange::BeginLeave(n)
            | MemberChange::Stay(n)
            | MemberChange::Remove(n) => n,
        }
    }
}

impl MemberChange {
    /// Whether `map` shows this change made to `shard`: what a caller
    /// whose commit went unanswered (it may have committed all the same)
    /// reads back, linearizably, to know.
    pub fn shows_in(&self, map: &ShardMap, shard: ShardId) -> bool {
        let Some(group) = map.groups.get(&shard) else {
            return false;
        };
        let node = self.node();
        let (member, learner, leaving) = (
            group.members.contains(node),
            group.learners.contains(node),
            group.leaving.contains(node),
        );
        match self {
            MemberChange::AddLearner(_) => learner,
            MemberChange::Promote(_) => member && !learner,
            MemberChange::BeginLeave(_) => leaving,
            MemberChange::Stay(_) => member && !leaving,
            MemberChange::Remove(_) => !member && !learner,
        }
    }
}

impl GroupInfo {
    /// A membership change is under way: a learner or a leaving member.
    pub fn changing_members(&self) -> bool {
        !self.learners.is_empty() || !self.leaving.is_empty()
    }
}

impl ShardMap {
    /// Every replica of `shard` as its replicas must count them: voters,
    /// leaving members and learners (the last two counted for nothing).
    pub fn replica_members(&self, shard: ShardId) -> Vec<Member> {
        let Some(group) = self.groups.get(&shard) else {
            return Vec::new();
        };
        let local = |n: &NodeId| self.region_of(n) == Some(&group.home_region);
        let members = (group.members.iter())
            .map(|n| Member {
                node: n.clone(),
                local: local(n),
                voter: !group.leaving.contains(n),
            })
            .chain((group.learners.iter()).map(|n| Member {
                node: n.clone(),
                local: local(n),
                voter: false,
            }));
        members.collect()
    }

    /// Applies one membership change to `shard`, or says why not (nothing
    /// changes then).
    pub fn change_members(&mut self, shard: ShardId, change: &MemberChange) -> Result<(), String> {
        let node = change.node().clone();
        let Some(region) = self.region_of(&node).cloned() else {
            return Err(format!("no node {node} in the cluster"));
        };
        let Some(group) = self.groups.get_mut(&shard) else {
            return Err(format!("no group {shard}"));
        };
        let local = region == group.home_region;
        match change {
            MemberChange::AddLearner(_) => {
                if group.members.contains(&node) || group.learners.contains(&node) {
                    return Err(format!("{node} holds a replica of {shard} already"));
                }
                if group.changing_members() {
                    return Err(format!("{shard} is in another membership change"));
                }
                group.learners.push(node);
            }
            MemberChange::Promote(_) => {
                if !group.learners.contains(&node) {
                    return Err(format!("{node} is not a learner of {shard}"));
                }
                group.learners.retain(|n| *n != node);
                // Home-region replicas first.
                let at = match local {
                    true => (group.members.iter())
                        .rposition(|n| self_region(&self.nodes, n) == Some(&group.home_region))
                        .map_or(0, |i| i + 1),
                    false => group.members.len(),
                };
                group.members.insert(at, node);
            }
            MemberChange::BeginLeave(_) => {
                if !group.members.contains(&node) {
                    return Err(format!("{node} is not a member of {shard}"));
                }
                if group.leader == node {
                    return Err(format!(
                        "{node} leads {shard}: transfer its leadership first"
                    ));
                }
                if group.changing_members() {
                    return Err(format!("{shard} is in another membership change"));
                }
                let local_voters_left = (group.members.iter())
                    .filter(|n| **n != node)
                    .filter(|n| self_region(&self.nodes, n) == Some(&group.home_region))
                    .count();
                if local && local_voters_left < 2 {
                    return Err(format!(
                        "{shard} would keep {local_voters_left} voter(s) in {}: a leader and a \
                         follower there are needed to commit; add a replica first",
                        group.home_region
                    ));
                }
                group.leaving.push(node);
            }
            MemberChange::Stay(_) => {
                if !group.leaving.contains(&node) {
                    return Err(format!("{node} is not leaving {shard}"));
                }
                group.leaving.retain(|n| *n != node);
            }
            MemberChange::Remove(_) => {
                if group.leader == node {
                    return Err(format!(
                        "{node} leads {shard}: transfer its leadership first"
                    ));
                }
                if group.learners.contains(&node) {
                    group.learners.retain(|n| *n != node);
                } else if group.leaving.contains(&node) {
                    group.leaving.retain(|n| *n != node);
                    group.members.retain(|n| *n != node);
                } else if group.members.contains(&node) {
                    return Err(format!(
                        "{node} votes in {shard}: it must be leaving before it is removed"
                    ));
                } else {
                    return Err(format!("{node} holds no replica of {shard}"));
                }
            }
        }
        group.members_epoch += 1;
        self.map_version += 1;
        Ok(())
    }
}

/// The region of `node` (a free function: the group is borrowed mutably).
fn self_region<'a>(
    nodes: &'a [crate::placement::NodeInfo],
    node: &NodeId,
) -> Option<&'a harbor_types::Region> {
    nodes.iter().find(|n| n.node == *node).map(|n| &n.region)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::placement::Topology;

    fn n(name: &str) -> NodeId {
        NodeId::new(name).unwrap()
    }

    /// madrid and newyork with 4 nodes each; groups of 3 local replicas
    /// and 1 remote.
    fn map() -> ShardMap {
        ShardMap::from_topology(&Topology {
            nodes_per_region: 4,
            ..Topology::dev()
        })
    }

    #[test]
    fn a_replica_joins_as_a_learner_and_counts_once_promoted() {
        let mut map = map();
        let shard = ShardId(0);
        let group = map.groups[&shard].clone();
        let spare = (map.nodes.iter())
            .find(|i| i.region == group.home_region && !group.members.contains(&i.node))
            .unwrap()
            .node
            .clone();
        let version = map.map_version;
        let add = MemberChange::AddLearner(spare.clone());
        assert!(!add.shows_in(&map, shard));
        map.change_members(shard, &add).unwrap();
        assert!(add.shows_in(&map, shard), "read back after no answer");
        let members = map.replica_members(shard);
        let learner = members.iter().find(|m| m.node == spare).unwrap();
        assert!(learner.local && !learner.voter);
        assert!(
            !map.groups[&shard].members.contains(&spare),
            "failover would ask it"
        );
        assert_eq!(map.map_version, version + 1);
        // One change at a time.
        let other = group.members[1].clone();
        assert!(map
            .change_members(shard, &MemberChange::BeginLeave(other.clone()))
            .is_err());
        let promote = MemberChange::Promote(spare.clone());
        assert!(!promote.shows_in(&map, shard));
        map.change_members(shard, &promote).unwrap();
        assert!(promote.shows_in(&map, shard));
        let g = &map.groups[&shard];
        assert_eq!(g.members.len(), 5);
        assert_eq!(g.members[3], spare, "home-region replicas first");
        assert!(map.replica_members(shard).iter().all(|m| m.voter));
        assert_eq!(map.groups[&shard].members_epoch, 2);
    }

    #[test]
    fn a_voter_leaves_in_two_steps_and_the_commit_rule_and_leader_stay() {
        let mut map = map();
        let shard = ShardId(0);
        let group = map.groups[&shard].clone();
        let (leader, follower, other) = (
            group.members[0].clone(),
            group.members[1].clone(),
            group.members[2].clone(),
        );
        let refused = |map: &mut ShardMap, change: MemberChange| {
            let before = map.clone();
            let result = map.change_members(shard, &change);
            assert_eq!(*map, before, "{change:?} changed the map");
            result.unwrap_err()
        };
        assert!(refused(&mut map, MemberChange::BeginLeave(leader.clone())).contains("leads"));
        assert!(refused(&mut map, MemberChange::Remove(follower.clone())).contains("leaving"));
        assert!(refused(&mut map, MemberChange::AddLearner(follower.clone())).contains("already"));
        assert!(refused(&mut map, MemberChange::Promote(follower.clone())).contains("learner"));
        assert!(refused(&mut map, MemberChange::AddLearner(n("tokyo-1"))).contains("no node"));

        map.change_members(shard, &MemberChange::BeginLeave(follower.clone()))
            .unwrap();
        let counted = map.replica_members(shard);
        let leaving = counted.iter().find(|m| m.node == follower).unwrap();
        assert!(!leaving.voter, "a leaving member's acks still count");
        assert!(
            map.groups[&shard].members.contains(&follower),
            "failover no longer asks it"
        );
        map.change_members(shard, &MemberChange::Remove(follower.clone()))
            .unwrap();
        assert!(!map.groups[&shard].members.contains(&follower));
        // Two home-region voters left: the leader and one follower stay.
        assert!(refused(&mut map, MemberChange::BeginLeave(other)).contains("needed to commit"));
        // A remote copy may go.
        let remote = map.groups[&shard].members.last().unwrap().clone();
        map.change_members(shard, &MemberChange::BeginLeave(remote.clone()))
            .unwrap();
        map.change_members(shard, &MemberChange::Remove(remote))
            .unwrap();
        assert_eq!(map.groups[&shard].members.len(), 2);
    }
}

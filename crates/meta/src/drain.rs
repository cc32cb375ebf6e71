//! Draining a node: every replica it holds goes elsewhere, one group at a
//! time, with the steps an operator would take by hand (and which are
//! safe on their own): a group it leads first hands its leadership to
//! another home-region voter; then a node of the same region that holds
//! no replica of the group gets one (the fewest replicas first), and the
//! drained node's replica is removed. Where no node can take one, the
//! replica is only removed, which the membership rules refuse if the group
//! would break its commit rule. Pure: it plans the next step from the map.

use harbor_types::{NodeId, ShardId};
use serde::{Deserialize, Serialize};

use crate::placement::ShardMap;

/// The next step of draining a node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DrainStep {
    /// The node leads `shard`: its leadership goes to `to` first.
    Transfer { shard: ShardId, to: NodeId },
    /// The node's replica of `shard` goes, once `with` (when there is one)
    /// holds a replica in its place.
    Replace {
        shard: ShardId,
        with: Option<NodeId>,
    },
}

/// The next step of draining `node`, `None` once it holds no replica.
/// `usable` says which nodes may take a replica or lead (the caller's
/// view of their health).
pub fn next_drain_step(
    map: &ShardMap,
    node: &NodeId,
    usable: impl Fn(&NodeId) -> bool,
) -> Result<Option<DrainStep>, String> {
    let Some(region) = map.region_of(node) else {
        return Err(format!("no node {node} in the cluster"));
    };
    let Some(group) = map.groups_of(node).into_iter().next() else {
        return Ok(None);
    };
    let shard = group.shard;
    if group.leader == *node {
        let to = (group.members.iter())
            .filter(|n| *n != node && !group.leaving.contains(n) && usable(n))
            .find(|n| map.region_of(n) == Some(&group.home_region));
        return match to {
            Some(to) => Ok(Some(DrainStep::Transfer {
                shard,
                to: to.clone(),
            })),
            None => Err(format!(
                "{node} leads {shard} and no other voter of its home region can take over"
            )),
        };
    }
    // A learner being added there is only removed, and so is a replica
    // already leaving (a drain asked again after it stopped half way).
    let with = match group.learners.contains(node) || group.leaving.contains(node) {
        true => None,
        false => (map.nodes.iter())
            .map(|i| &i.node)
            .filter(|n| map.region_of(n) == Some(region) && *n != node && usable(n))
            .filter(|n| !group.members.contains(n) && !group.learners.contains(n))
            .min_by_key(|n| (map.groups_of(n).len(), (*n).clone()))
            .cloned(),
    };
    Ok(Some(DrainStep::Replace { shard, with }))
}

#[cfg(test)]
mod tests {
    use harbor_types::{Generation, Region};

    use super::*;
    use crate::membership::MemberChange;
    use crate::placement::Topology;

    fn n(name: &str) -> NodeId {
        NodeId::new(name).unwrap()
    }

    /// Carries a drain out on the map alone, as the runtime would (each
    /// step through the control plane).
    fn drain(map: &mut ShardMap, node: &NodeId) -> Vec<DrainStep> {
        let mut steps = Vec::new();
        while let Some(step) = next_drain_step(map, node, |_| true).unwrap() {
            match &step {
                DrainStep::Transfer { shard, to } => {
                    let g = map.groups.get_mut(shard).unwrap();
                    g.leader = to.clone();
                    g.generation = Generation(g.generation.0 + 1);
                }
                DrainStep::Replace { shard, with } => {
                    if let Some(with) = with {
                        for change in [
                            MemberChange::AddLearner(with.clone()),
                            MemberChange::Promote(with.clone()),
                        ] {
                            map.change_members(*shard, &change).unwrap();
                        }
                    }
                    for change in [
                        MemberChange::BeginLeave(node.clone()),
                        MemberChange::Remove(node.clone()),
                    ] {
                        map.change_members(*shard, &change).unwrap();
                    }
                }
            }
            steps.push(step);
            assert!(steps.len() < 100, "a drain that does not end: {steps:?}");
        }
        steps
    }

    #[test]
    fn a_drained_node_hands_over_leadership_and_every_replica_keeps_its_region() {
        let mut map = ShardMap::from_topology(&Topology {
            nodes_per_region: 4,
            ..Topology::dev()
        });
        let node = n("madrid-1");
        let before = map.clone();
        let led = before.groups.values().filter(|g| g.leader == node).count();
        let held = before.groups_of(&node).len();
        assert!(led > 0 && held > led);
        let steps = drain(&mut map, &node);
        let transfers = (steps.iter())
            .filter(|s| matches!(s, DrainStep::Transfer { .. }))
            .count();
        assert_eq!((transfers, steps.len()), (led, led + held));
        assert!(map.groups_of(&node).is_empty());
        for (shard, g) in &map.groups {
            let was = &before.groups[shard];
            assert_eq!(g.members.len(), was.members.len(), "{shard}");
            fn in_region(m: &ShardMap, g: &crate::placement::GroupInfo, r: &Region) -> usize {
                (g.members.iter())
                    .filter(|n| m.region_of(n) == Some(r))
                    .count()
            }
            for r in map.regions() {
                assert_eq!(in_region(&map, g, &r), in_region(&before, was, &r));
            }
        }
    }

    #[test]
    fn with_no_spare_node_a_replica_is_only_removed_and_an_unknown_node_is_refused() {
        let map = ShardMap::from_topology(&Topology::dev());
        let follower = (map.groups.values())
            .find_map(|g| {
                (g.members.iter())
                    .find(|m| **m != g.leader && map.region_of(m) == Some(&g.home_region))
            })
            .unwrap()
            .clone();
        let mut map = map;
        // It leads none of its groups.
        for g in map.groups.values_mut() {
            if g.leader == follower {
                let other = g.members.iter().find(|m| **m != follower).unwrap().clone();
                g.leader = other;
            }
        }
        let step = next_drain_step(&map, &follower, |_| true).unwrap().unwrap();
        assert!(
            matches!(step, DrainStep::Replace { with: None, .. }),
            "{step:?}"
        );
        // With a spare node, a replica already leaving (a drain asked again
        // after it stopped) is only removed; one that is not gets a
        // replacement.
        let mut map = ShardMap::from_topology(&Topology {
            nodes_per_region: 4,
            ..Topology::dev()
        });
        let g = map.groups.values().next().unwrap().clone();
        let follower = g.members[1].clone();
        let step = next_drain_step(&map, &follower, |_| true).unwrap().unwrap();
        assert!(
            matches!(step, DrainStep::Replace { with: Some(_), .. }),
            "{step:?}"
        );
        map.change_members(g.shard, &MemberChange::BeginLeave(follower.clone()))
            .unwrap();
        let step = next_drain_step(&map, &follower, |_| true).unwrap().unwrap();
        assert!(
            matches!(step, DrainStep::Replace { with: None, .. }),
            "{step:?}"
        );
        assert!(next_drain_step(&map, &n("nobody-1"), |_| true).is_err());
        // A leader with no other usable home voter cannot be drained.
        let g = map.groups.values().next().unwrap().clone();
        let refused = next_drain_step(&map, &g.leader, |n| *n == g.leader);
        assert!(refused.is_err(), "{refused:?}");
    }
}

//! Which local replica serves a read: a pure rule the gateway and the
//! simulator share.

use std::collections::BTreeMap;

use harbor_types::NodeId;

/// Which replica in the gateway's region a local read goes to: the group's
/// replicas there in turn, skipping for a while one that did not answer, so
/// a crashed replica does not cost every read the local-read timeout. Pure
/// (time is a parameter): the gateway keeps one, the simulator one per
/// region's gateway.
#[derive(Debug)]
pub struct LocalReplicas<T> {
    turn: usize,
    silent_until: BTreeMap<NodeId, T>,
}

impl<T> Default for LocalReplicas<T> {
    fn default() -> Self {
        LocalReplicas {
            turn: 0,
            silent_until: BTreeMap::new(),
        }
    }
}

impl<T: Ord + Copy> LocalReplicas<T> {
    /// The next of `here` (the group's replicas in this region) to ask.
    pub fn pick(&mut self, now: T, here: &[NodeId]) -> Local {
        if here.is_empty() {
            return Local::None;
        }
        self.silent_until.retain(|_, until| *until > now);
        let answering: Vec<&NodeId> = here
            .iter()
            .filter(|n| !self.silent_until.contains_key(*n))
            .collect();
        if answering.is_empty() {
            return Local::Silent;
        }
        self.turn = self.turn.wrapping_add(1);
        Local::Replica(answering[self.turn % answering.len()].clone())
    }

    /// `node` did not answer a local read: skip it until `until`.
    pub fn silent(&mut self, node: NodeId, until: T) {
        self.silent_until.insert(node, until);
    }
}

/// Where a local read can go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Local {
    Replica(NodeId),
    /// The group has replicas in this region, but none answered lately:
    /// the leader serves the read (`fallback: true`).
    Silent,
    /// The group has no replica in this region: the leader serves its reads.
    None,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nodes(names: &[&str]) -> Vec<NodeId> {
        names.iter().map(|n| NodeId::new(*n).unwrap()).collect()
    }

    #[test]
    fn replicas_take_turns_and_a_silent_one_is_skipped_for_a_while() {
        let here = nodes(&["m1", "m2"]);
        let mut local = LocalReplicas::<u64>::default();
        assert_eq!(local.pick(0, &[]), Local::None);
        let first = local.pick(0, &here);
        let second = local.pick(0, &here);
        assert_ne!(first, second, "two replicas take turns");
        local.silent(here[0].clone(), 100);
        for now in [0, 50, 99] {
            assert_eq!(local.pick(now, &here), Local::Replica(here[1].clone()));
        }
        local.silent(here[1].clone(), 200);
        assert_eq!(local.pick(99, &here), Local::Silent);
        // m1's skip is over at 100; m2's at 200.
        assert_eq!(local.pick(100, &here), Local::Replica(here[0].clone()));
        let both: Vec<Local> = (0..2).map(|_| local.pick(200, &here)).collect();
        assert!(both.contains(&Local::Replica(here[1].clone())));
    }
}

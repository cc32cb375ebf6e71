//! Promise (DESIGN.md §4, §6, §11): generations fence leadership. At most
//! one node leads a shard in a given generation, and a node never goes back
//! to leading a shard at an older generation than one it already led.

use crate::{History, Property, Verdict, Violation};
use harbor_types::{Generation, NodeId, ShardId};
use std::collections::HashMap;

pub struct OneLeaderPerGeneration;

impl Property for OneLeaderPerGeneration {
    fn name(&self) -> &'static str {
        "one_leader_per_generation"
    }

    fn promise(&self) -> &'static str {
        "one leader per shard per generation, and a node's generations never go back"
    }

    fn verdict(&self, h: &History) -> Verdict {
        let mut verdict = Verdict::default();
        // (shard, generation) → (node, line); (node, shard) → (generation, line).
        let mut leader_of: HashMap<(ShardId, Generation), (&NodeId, usize)> = HashMap::new();
        let mut newest_of: HashMap<(&NodeId, ShardId), (Generation, usize)> = HashMap::new();
        for leader in h.leaders() {
            verdict.items_checked += 1;
            let (line, l) = (leader.line, &leader.value);
            let first = *leader_of
                .entry((l.shard, l.generation))
                .or_insert((&l.node, line));
            if first.0 != &l.node {
                let detail = format!(
                    "{} {} led by {} (line {}) and by {} (line {line})",
                    l.shard, l.generation, first.0, first.1, l.node
                );
                verdict
                    .violations
                    .push(Violation::new(self, detail, vec![]));
            }
            let newest = newest_of
                .entry((&l.node, l.shard))
                .or_insert((l.generation, line));
            if l.generation < newest.0 {
                let detail = format!(
                    "{} leads {} at {} (line {line}) after leading it at {} (line {})",
                    l.node, l.shard, l.generation, newest.0, newest.1
                );
                verdict
                    .violations
                    .push(Violation::new(self, detail, vec![]));
            } else {
                *newest = (l.generation, line);
            }
        }
        verdict
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::Script;

    fn script() -> Script {
        let mut s = Script::new();
        s.leader(1, 1, "madrid-1");
        s.leader(2, 1, "madrid-2");
        s.leader(1, 2, "madrid-2");
        s.leader(1, 3, "madrid-1");
        // A node may announce the same generation again, e.g. after a restart.
        s.leader(1, 3, "madrid-1");
        s
    }

    #[test]
    fn one_leader_per_generation_passes() {
        let verdict = OneLeaderPerGeneration.verdict(&script().history());
        assert_eq!(verdict.violations, vec![]);
        assert_eq!(verdict.items_checked, 5);
    }

    #[test]
    fn two_leaders_in_one_generation_are_caught() {
        let mut s = script();
        s.leader(1, 2, "paris-1");
        let violations = OneLeaderPerGeneration.check(&s.history());
        assert_eq!(violations.len(), 1, "{violations:?}");
        assert_eq!(
            violations[0].detail,
            "shard1 g2 led by madrid-2 (line 3) and by paris-1 (line 6)"
        );
    }

    #[test]
    fn a_node_going_back_a_generation_is_caught() {
        let mut s = script();
        s.leader(1, 1, "madrid-1");
        let violations = OneLeaderPerGeneration.check(&s.history());
        assert_eq!(violations.len(), 1, "{violations:?}");
        assert!(violations[0]
            .detail
            .contains("at g1 (line 6) after leading it at g3"));
    }
}

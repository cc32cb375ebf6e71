//! Leadership decisions for one group, as a pure state machine (DESIGN.md
//! section 6). The control plane feeds it what it can observe of the
//! group's replicas; it answers with what to tell them. The simulator and
//! the embedded cluster drive the same code.
//!
//! 1. The leader stops answering. After `unreachable_after_ms` the planner
//!    seals its generation N: every reachable replica adopts N+1 without a
//!    leader and refuses appends of N.
//! 2. Once every home-region replica but the old leader answers, sealed at
//!    N+1, the one with the longest log (by last generation, then index)
//!    leads N+1. The replicas asked intersect every commit quorum (the old
//!    leader plus one local follower), so the choice holds every
//!    acknowledged write. The new leader takes writes at once: the sealed
//!    followers no longer ack the old one, so it cannot commit.
//! 3. The new leader serves no strong read until the old leader's lease
//!    must have run out: `lease_ms` plus a drift margin after the last seal
//!    (the old leader's lease rests on acks sent before its followers were
//!    sealed). Two leaders never serve strong reads at once.

use harbor_types::{Generation, LogIndex, NodeId, ShardId};

#[derive(Clone, Copy, Debug)]
pub struct FailoverConfig {
    /// How long the leader must be unreachable before its generation is
    /// sealed.
    pub unreachable_after_ms: u64,
    /// The replicas' lease (`lease_ms` of the replication core).
    pub lease_ms: u64,
    /// Extra wait for clock drift between the old leader and the planner.
    pub lease_margin_ms: u64,
}

impl FailoverConfig {
    /// Checks what the safety argument needs: the lease must run out before
    /// the next leader is named.
    pub fn validate(&self) -> Result<(), String> {
        if self.unreachable_after_ms == 0 || self.lease_ms == 0 {
            return Err("unreachable_after_ms and lease_ms must be positive".into());
        }
        Ok(())
    }
}

/// What the planner knows of one replica right now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Observation {
    pub node: NodeId,
    /// It answered the control plane.
    pub reachable: bool,
    /// It is running (not stopped after a storage failure).
    pub healthy: bool,
    pub generation: Generation,
    pub leading: bool,
    pub last_index: LogIndex,
    pub last_generation: Generation,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Phase {
    Active,
    /// Generation sealed at `since_ms`; `replacing` is the unreachable leader.
    Sealed {
        replacing: NodeId,
        since_ms: u64,
    },
}

/// What to tell the replicas.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    None,
    /// Adopt `generation` and wait for a leader.
    Seal {
        generation: Generation,
        nodes: Vec<NodeId>,
    },
    /// `leader` leads `generation`; everyone else follows it. The leader
    /// serves no strong read for `reads_after_ms` from now.
    Lead {
        generation: Generation,
        leader: NodeId,
        reads_after_ms: u64,
    },
}

/// What a replica that missed news must be told (see
/// [`GroupLeadership::catch_up`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CatchUp {
    Nothing,
    /// Seal the current generation (a failover is under way).
    Seal(Generation),
    /// The named leader has not heard it leads the current generation.
    Lead(Generation),
    /// Follow the current leader at the current generation.
    Follow(Generation, NodeId),
    /// The named leader reports it is not leading its generation: it
    /// restarted (or was fenced) and must lead a fresh one, never continue a
    /// generation it may have half-written. Call
    /// [`GroupLeadership::leader_restarted`].
    NewGeneration,
}

/// One group's leadership as the control plane sees it.
#[derive(Clone, Debug)]
pub struct GroupLeadership {
    pub shard: ShardId,
    pub generation: Generation,
    pub leader: NodeId,
    /// `(node, in the home region)`.
    pub members: Vec<(NodeId, bool)>,
    pub phase: Phase,
    unreachable_since_ms: Option<u64>,
    /// When the last seal of the current generation went out; strong reads
    /// under it wait until `lease_ms + margin` after it.
    last_seal_ms: Option<u64>,
}

impl GroupLeadership {
    pub fn new(
        shard: ShardId,
        generation: Generation,
        leader: NodeId,
        members: Vec<(NodeId, bool)>,
    ) -> GroupLeadership {
        assert!(
            members.iter().any(|(n, local)| *n == leader && *local),
            "{shard}: leader {leader} must be a home-region member"
        );
        GroupLeadership {
            shard,
            generation,
            leader,
            members,
            phase: Phase::Active,
            unreachable_since_ms: None,
            last_seal_ms: None,
        }
    }

    /// How long the leader must still hold back strong reads at `now_ms`.
    pub fn reads_wait_ms(&self, config: &FailoverConfig, now_ms: u64) -> u64 {
        match self.last_seal_ms {
            None => 0,
            Some(seal) => (seal + config.lease_ms + config.lease_margin_ms).saturating_sub(now_ms),
        }
    }

    pub fn is_active(&self) -> bool {
        self.phase == Phase::Active
    }

    /// The leader restarted (it is reachable again, with an empty memory): it
    /// leads a new generation, so it never continues one it may have
    /// half-written. Ignored while a failover is under way.
    pub fn leader_restarted(&mut self) -> Action {
        if !self.is_active() {
            return Action::None;
        }
        self.generation = self.generation.next();
        self.unreachable_since_ms = None;
        self.last_seal_ms = None;
        Action::Lead {
            generation: self.generation,
            leader: self.leader.clone(),
            // The old incarnation is gone, and its lease with it.
            reads_after_ms: 0,
        }
    }

    /// What `node`, reporting `generation`, whether it leads, and the leader
    /// it follows, must be told so it agrees with the plan. The one rule both
    /// the simulator and the embedded control loop apply to replicas that
    /// were away when news went out.
    pub fn catch_up(
        &self,
        node: &NodeId,
        generation: Generation,
        leading: bool,
        follows: Option<&NodeId>,
    ) -> CatchUp {
        if !self.is_active() {
            return if generation < self.generation {
                CatchUp::Seal(self.generation)
            } else {
                CatchUp::Nothing
            };
        }
        if *node == self.leader {
            if generation < self.generation {
                CatchUp::Lead(self.generation)
            } else if !leading {
                CatchUp::NewGeneration
            } else {
                CatchUp::Nothing
            }
        } else if generation < self.generation || follows != Some(&self.leader) {
            CatchUp::Follow(self.generation, self.leader.clone())
        } else {
            CatchUp::Nothing
        }
    }

    /// One look at the group. `observations` holds what each member
    /// answered; a member missing from it is unreachable.
    pub fn observe(
        &mut self,
        config: &FailoverConfig,
        now_ms: u64,
        observations: &[Observation],
    ) -> Action {
        let seen = |node: &NodeId| observations.iter().find(|o| o.node == *node && o.reachable);
        match self.phase.clone() {
            Phase::Active => {
                if seen(&self.leader).is_some() {
                    self.unreachable_since_ms = None;
                    return Action::None;
                }
                let since = *self.unreachable_since_ms.get_or_insert(now_ms);
                if now_ms.saturating_sub(since) < config.unreachable_after_ms {
                    return Action::None;
                }
                self.generation = self.generation.next();
                self.phase = Phase::Sealed {
                    replacing: self.leader.clone(),
                    since_ms: now_ms,
                };
                self.unreachable_since_ms = None;
                self.last_seal_ms = Some(now_ms);
                self.seal_reachable(now_ms, observations)
            }
            Phase::Sealed { replacing, .. } => {
                let candidates: Vec<&NodeId> = self
                    .members
                    .iter()
                    .filter(|(n, local)| *local && *n != replacing)
                    .map(|(n, _)| n)
                    .collect();
                let ready: Vec<&Observation> = candidates
                    .iter()
                    .filter_map(|n| seen(n))
                    .filter(|o| o.healthy && o.generation == self.generation)
                    .collect();
                if candidates.is_empty() || ready.len() < candidates.len() {
                    return self.seal_reachable(now_ms, observations);
                }
                let best = ready
                    .iter()
                    .max_by_key(|o| (o.last_generation, o.last_index))
                    .expect("candidates are not empty");
                self.leader = best.node.clone();
                self.phase = Phase::Active;
                Action::Lead {
                    generation: self.generation,
                    leader: self.leader.clone(),
                    reads_after_ms: self.reads_wait_ms(config, now_ms),
                }
            }
        }
    }

    /// Seal the reachable members still on an older generation.
    fn seal_reachable(&mut self, now_ms: u64, observations: &[Observation]) -> Action {
        let nodes: Vec<NodeId> = observations
            .iter()
            .filter(|o| o.reachable && o.generation < self.generation)
            .filter(|o| self.members.iter().any(|(n, _)| *n == o.node))
            .map(|o| o.node.clone())
            .collect();
        if nodes.is_empty() {
            return Action::None;
        }
        self.last_seal_ms = Some(now_ms);
        Action::Seal {
            generation: self.generation,
            nodes,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(name: &str) -> NodeId {
        NodeId::new(name).unwrap()
    }

    fn config() -> FailoverConfig {
        FailoverConfig {
            unreachable_after_ms: 1_000,
            lease_ms: 500,
            lease_margin_ms: 200,
        }
    }

    fn group() -> GroupLeadership {
        GroupLeadership::new(
            ShardId(0),
            Generation(1),
            n("a1"),
            vec![
                (n("a1"), true),
                (n("a2"), true),
                (n("a3"), true),
                (n("b1"), false),
            ],
        )
    }

    fn obs(node: &str, generation: u64, last: (u64, u64)) -> Observation {
        Observation {
            node: n(node),
            reachable: true,
            healthy: true,
            generation: Generation(generation),
            leading: false,
            last_index: LogIndex(last.1),
            last_generation: Generation(last.0),
        }
    }

    #[test]
    fn a_reachable_leader_is_left_alone() {
        let mut g = group();
        let all = [
            obs("a1", 1, (1, 9)),
            obs("a2", 1, (1, 9)),
            obs("a3", 1, (1, 9)),
        ];
        for t in (0..5_000).step_by(100) {
            assert_eq!(g.observe(&config(), t, &all), Action::None);
        }
        assert_eq!(g.generation, Generation(1));
    }

    #[test]
    fn an_unreachable_leader_is_sealed_then_replaced_by_the_longest_log_after_its_lease() {
        let mut g = group();
        let followers = |generation| {
            vec![
                obs("a2", generation, (1, 7)),
                obs("a3", generation, (1, 9)),
                obs("b1", generation, (1, 12)),
            ]
        };
        assert_eq!(g.observe(&config(), 0, &followers(1)), Action::None);
        assert_eq!(g.observe(&config(), 999, &followers(1)), Action::None);
        let sealed = g.observe(&config(), 1_000, &followers(1));
        assert_eq!(
            sealed,
            Action::Seal {
                generation: Generation(2),
                nodes: vec![n("a2"), n("a3"), n("b1")]
            }
        );
        // Writes move at once; strong reads wait until the old lease (500)
        // and its margin (200) after the seal have passed.
        // The remote replica has the longest log but cannot lead: it is not
        // in the home region and never counted towards a commit.
        let led = g.observe(&config(), 1_100, &followers(2));
        assert_eq!(
            led,
            Action::Lead {
                generation: Generation(2),
                leader: n("a3"),
                reads_after_ms: 600,
            }
        );
        assert_eq!(g.reads_wait_ms(&config(), 1_700), 0);
        assert!(g.is_active());
    }

    #[test]
    fn no_leader_is_named_until_every_other_local_replica_answers() {
        let mut g = group();
        let only_a2 = [obs("a2", 1, (1, 7))];
        g.observe(&config(), 0, &only_a2);
        g.observe(&config(), 1_000, &only_a2);
        let only_a2 = [obs("a2", 2, (1, 7))];
        // a3 (which may hold the only copy of an acknowledged write) is
        // silent: wait, however long it takes.
        for t in (1_700..10_000).step_by(100) {
            assert_eq!(g.observe(&config(), t, &only_a2), Action::None);
        }
        // a3 answers on the old generation: it is sealed first.
        let both = [obs("a2", 2, (1, 7)), obs("a3", 1, (1, 9))];
        assert_eq!(
            g.observe(&config(), 10_000, &both),
            Action::Seal {
                generation: Generation(2),
                nodes: vec![n("a3")]
            }
        );
        let both = [obs("a2", 2, (1, 7)), obs("a3", 2, (1, 9))];
        // The late seal restarts the read wait: a3 may have acked the old
        // leader until just now.
        assert_eq!(
            g.observe(&config(), 10_100, &both),
            Action::Lead {
                generation: Generation(2),
                leader: n("a3"),
                reads_after_ms: 600,
            }
        );
    }

    #[test]
    fn a_leader_back_in_time_cancels_the_countdown() {
        let mut g = group();
        let followers = [obs("a2", 1, (1, 7)), obs("a3", 1, (1, 9))];
        g.observe(&config(), 0, &followers);
        let mut with_leader = followers.to_vec();
        with_leader.push(obs("a1", 1, (1, 9)));
        assert_eq!(g.observe(&config(), 900, &with_leader), Action::None);
        assert_eq!(g.observe(&config(), 1_500, &followers), Action::None);
        assert_eq!(g.generation, Generation(1));
    }

    #[test]
    fn replicas_that_missed_news_are_told_the_plan() {
        let g = group();
        let (a1, a2) = (n("a1"), n("a2"));
        assert_eq!(
            g.catch_up(&a1, Generation(1), true, Some(&a1)),
            CatchUp::Nothing
        );
        assert_eq!(
            g.catch_up(&a1, Generation(0), false, None),
            CatchUp::Lead(Generation(1))
        );
        // At its generation but not leading: never continue it.
        assert_eq!(
            g.catch_up(&a1, Generation(1), false, None),
            CatchUp::NewGeneration
        );
        assert_eq!(
            g.catch_up(&a2, Generation(1), false, Some(&a1)),
            CatchUp::Nothing
        );
        assert_eq!(
            g.catch_up(&a2, Generation(1), false, None),
            CatchUp::Follow(Generation(1), a1.clone())
        );
        let mut sealing = group();
        sealing.observe(&config(), 0, &[obs("a2", 1, (1, 1))]);
        sealing.observe(&config(), 1_000, &[obs("a2", 1, (1, 1))]);
        assert_eq!(
            sealing.catch_up(&a1, Generation(1), true, Some(&a1)),
            CatchUp::Seal(Generation(2))
        );
        assert_eq!(
            sealing.catch_up(&a2, Generation(2), false, None),
            CatchUp::Nothing
        );
    }

    #[test]
    fn a_restarted_leader_leads_a_new_generation() {
        let mut g = group();
        assert_eq!(
            g.leader_restarted(),
            Action::Lead {
                generation: Generation(2),
                leader: n("a1"),
                reads_after_ms: 0,
            }
        );
    }
}

//! Leadership decisions for one group, as a pure state machine (DESIGN.md
//! section 6). The control plane feeds it what it can observe of the
//! group's replicas; it answers with what to tell them. The simulator and
//! the embedded cluster drive the same code.
//!
//! Failover:
//! 1. The leader stops answering. After `unreachable_after_ms` the planner
//!    seals its generation N: every reachable replica adopts N+1 without a
//!    leader and refuses appends of N.
//! 2. Once every home-region replica but the old leader answers, sealed at
//!    N+1, the one with the longest log (by last generation, then index) is
//!    chosen. The replicas asked intersect every commit quorum (the old
//!    leader plus one local follower), so the choice holds every
//!    acknowledged write.
//! 3. It is named leader of N+1 only once the old leader's lease has run
//!    out. That lease rests on acks from local followers, and each sealed
//!    follower reports how long ago it last acked anyone: the lease ends at
//!    most `lease_ms` after the newest of those acks, plus a margin for
//!    clock drift. (An old leader that itself answers sealed holds no lease:
//!    no wait.) So two leaders never serve at once, and a strong read on
//!    the old leader can never miss a write of the new one.
//!
//! Planned transfer to a local replica T:
//! 1. The leader stops taking writes for `drain_ms` (it keeps replicating).
//! 2. Once T's log equals the leader's, N is sealed everywhere as above; the
//!    leader answers sealed, so no lease wait. T, holding the longest log, is
//!    named. If T does not catch up within `drain_ms` the transfer is given
//!    up and the leader resumes writes by itself.

use harbor_types::{Generation, LogIndex, NodeId, ShardId};

#[derive(Clone, Copy, Debug)]
pub struct FailoverConfig {
    /// How long the leader must be unreachable before its generation is
    /// sealed.
    pub unreachable_after_ms: u64,
    /// The replicas' lease (`lease_ms` of the replication core).
    pub lease_ms: u64,
    /// Extra wait for clock drift between the old leader and its followers.
    pub lease_margin_ms: u64,
    /// How long a planned transfer may pause writes waiting for its target
    /// to catch up.
    pub drain_ms: u64,
}

impl FailoverConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.unreachable_after_ms == 0 || self.lease_ms == 0 || self.drain_ms == 0 {
            return Err("unreachable_after_ms, lease_ms and drain_ms must be positive".into());
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
    /// Time since it last acknowledged a leader's append (or started).
    pub acked_ms_ago: u64,
    /// It lost its durable state and has not caught up: its log says
    /// nothing about what it acknowledged before, so it is neither asked
    /// nor chosen, and as a leader it is replaced.
    pub recovering: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Phase {
    Active,
    /// A planned transfer: the leader drains until `to` has its whole log.
    Draining {
        to: NodeId,
        since_ms: u64,
    },
    /// Generation sealed at `since_ms`; `replacing` is the leader being
    /// replaced, `prefer` the transfer target (if any).
    Sealed {
        replacing: NodeId,
        prefer: Option<NodeId>,
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
    /// `leader` leads `generation`; everyone else follows it. `ended_at` is
    /// where the previous generation's log ends: the new leader's last
    /// entry, which every replica's log is cut back to (`None` when
    /// unknown: a restarted leader).
    Lead {
        generation: Generation,
        leader: NodeId,
        ended_at: Option<LogIndex>,
    },
    /// The leader takes no writes for `for_ms` (a planned transfer).
    Drain {
        leader: NodeId,
        for_ms: u64,
    },
    /// A planned transfer was given up: the target did not catch up in
    /// time. The leader resumes writes when its drain runs out.
    TransferAbandoned {
        to: NodeId,
    },
    /// Every member answered, sealed, that it is recovering with an empty
    /// log: the group holds nothing anywhere (a new deployment, or every
    /// copy lost), so `leader` starts it anew at `generation` rather than
    /// the group waiting forever for data nobody has.
    StartNewGroup {
        generation: Generation,
        leader: NodeId,
    },
}

/// Why a planned transfer cannot start.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TransferError {
    #[error("{node} is not a home-region replica of {shard}")]
    NotALocalMember { shard: ShardId, node: NodeId },
    #[error("{node} already leads {shard}")]
    AlreadyLeader { shard: ShardId, node: NodeId },
    #[error("{shard} is changing leaders already")]
    Busy { shard: ShardId },
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
        }
    }

    pub fn is_active(&self) -> bool {
        self.phase == Phase::Active
    }

    fn is_local(&self, node: &NodeId) -> bool {
        self.members.iter().any(|(n, local)| n == node && *local)
    }

    /// The leader restarted (it is reachable again, with an empty memory): it
    /// leads a new generation, so it never continues one it may have
    /// half-written. Its old incarnation, and its lease, are gone. Ignored
    /// while a failover or transfer is under way.
    pub fn leader_restarted(&mut self) -> Action {
        if !self.is_active() {
            return Action::None;
        }
        self.generation = self.generation.next();
        self.unreachable_since_ms = None;
        Action::Lead {
            generation: self.generation,
            leader: self.leader.clone(),
            ended_at: None,
        }
    }

    /// Starts a planned transfer of leadership to `to`.
    pub fn transfer(
        &mut self,
        config: &FailoverConfig,
        now_ms: u64,
        to: &NodeId,
    ) -> Result<Action, TransferError> {
        if !self.is_local(to) {
            return Err(TransferError::NotALocalMember {
                shard: self.shard,
                node: to.clone(),
            });
        }
        if *to == self.leader {
            return Err(TransferError::AlreadyLeader {
                shard: self.shard,
                node: to.clone(),
            });
        }
        if !self.is_active() {
            return Err(TransferError::Busy { shard: self.shard });
        }
        self.phase = Phase::Draining {
            to: to.clone(),
            since_ms: now_ms,
        };
        Ok(Action::Drain {
            leader: self.leader.clone(),
            for_ms: config.drain_ms,
        })
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
        recovering: bool,
    ) -> CatchUp {
        if let Phase::Sealed { .. } = self.phase {
            return if generation < self.generation {
                CatchUp::Seal(self.generation)
            } else {
                CatchUp::Nothing
            };
        }
        // Active, or draining (the generation is still the leader's).
        if *node == self.leader {
            if recovering {
                // It cannot lead: `observe` replaces it.
                CatchUp::Nothing
            } else if generation < self.generation {
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
                if seen(&self.leader).is_some_and(|o| !o.recovering) {
                    self.unreachable_since_ms = None;
                    return Action::None;
                }
                let since = *self.unreachable_since_ms.get_or_insert(now_ms);
                if now_ms.saturating_sub(since) < config.unreachable_after_ms {
                    return Action::None;
                }
                self.seal(now_ms, None, observations)
            }
            Phase::Draining { to, since_ms } => {
                let (Some(leader), Some(target)) = (seen(&self.leader), seen(&to)) else {
                    // Either side vanished: give up; a failover, if one is
                    // needed, starts from the active phase.
                    self.phase = Phase::Active;
                    return Action::TransferAbandoned { to };
                };
                let caught_up = target.generation == self.generation
                    && (target.last_generation, target.last_index)
                        == (leader.last_generation, leader.last_index);
                if caught_up {
                    return self.seal(now_ms, Some(to), observations);
                }
                if now_ms.saturating_sub(since_ms) >= config.drain_ms {
                    self.phase = Phase::Active;
                    return Action::TransferAbandoned { to };
                }
                Action::None
            }
            Phase::Sealed {
                replacing, prefer, ..
            } => {
                let sealed = |o: &&Observation| o.healthy && o.generation == self.generation;
                let empty =
                    |o: &&Observation| o.recovering && o.last_index == LogIndex::ZERO && !o.leading;
                let all_empty = self
                    .members
                    .iter()
                    .all(|(n, _)| seen(n).filter(sealed).filter(empty).is_some());
                if all_empty {
                    let leader = if self.is_local(&replacing) {
                        replacing.clone()
                    } else {
                        self.members
                            .iter()
                            .find(|(_, local)| *local)
                            .map(|(n, _)| n.clone())
                            .expect("a group has a home-region member")
                    };
                    self.leader = leader.clone();
                    self.phase = Phase::Active;
                    self.unreachable_since_ms = None;
                    return Action::StartNewGroup {
                        generation: self.generation,
                        leader,
                    };
                }
                // A replica that lost its state answers for nothing.
                let whole = |o: &&Observation| !o.recovering;
                // The replicas asked must intersect every commit quorum (the
                // old leader plus local followers): every local replica but
                // the old leader, or the old leader itself.
                let required = self
                    .members
                    .iter()
                    .filter(|(n, local)| *local && *n != replacing)
                    .count();
                let answered = self
                    .members
                    .iter()
                    .filter(|(n, local)| *local && *n != replacing)
                    .filter_map(|(n, _)| seen(n))
                    .filter(sealed)
                    .filter(whole)
                    .count();
                let old_leader = seen(&replacing).filter(sealed).filter(|o| !o.leading);
                let old_leader_whole = old_leader.is_some_and(|o| !o.recovering);
                if required == 0 || (answered < required && !old_leader_whole) {
                    // Waiting (a replica that lost its state cannot stand in
                    // for what it acknowledged): never past a possibly
                    // committed entry.
                    return self.seal_reachable(observations);
                }
                let candidates: Vec<&Observation> = self
                    .members
                    .iter()
                    .filter(|(_, local)| *local)
                    .filter_map(|(n, _)| seen(n))
                    .filter(sealed)
                    .filter(whole)
                    .collect();
                if candidates.is_empty() {
                    return self.seal_reachable(observations);
                }
                if old_leader.is_none() {
                    // Its lease rests on acks of the followers now sealed.
                    let newest_ack = candidates
                        .iter()
                        .filter(|o| o.node != replacing)
                        .map(|o| now_ms.saturating_sub(o.acked_ms_ago))
                        .max()
                        .unwrap_or(now_ms);
                    if now_ms < newest_ack + config.lease_ms + config.lease_margin_ms {
                        return self.seal_reachable(observations);
                    }
                }
                let longest = candidates
                    .iter()
                    .map(|o| (o.last_generation, o.last_index))
                    .max()
                    .expect("candidates are not empty");
                let best = candidates
                    .iter()
                    .filter(|o| (o.last_generation, o.last_index) == longest)
                    .max_by_key(|o| Some(&o.node) == prefer.as_ref())
                    .expect("the longest log belongs to someone");
                self.leader = best.node.clone();
                self.phase = Phase::Active;
                self.unreachable_since_ms = None;
                Action::Lead {
                    generation: self.generation,
                    leader: self.leader.clone(),
                    ended_at: Some(best.last_index),
                }
            }
        }
    }

    /// Seals the current generation: the next one starts without a leader.
    fn seal(
        &mut self,
        now_ms: u64,
        prefer: Option<NodeId>,
        observations: &[Observation],
    ) -> Action {
        self.generation = self.generation.next();
        self.phase = Phase::Sealed {
            replacing: self.leader.clone(),
            prefer,
            since_ms: now_ms,
        };
        self.unreachable_since_ms = None;
        self.seal_reachable(observations)
    }

    /// Seal the reachable members still on an older generation.
    fn seal_reachable(&mut self, observations: &[Observation]) -> Action {
        let nodes: Vec<NodeId> = observations
            .iter()
            .filter(|o| o.reachable && o.generation < self.generation)
            .filter(|o| self.members.iter().any(|(n, _)| *n == o.node))
            .map(|o| o.node.clone())
            .collect();
        if nodes.is_empty() {
            return Action::None;
        }
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
            drain_ms: 300,
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
            acked_ms_ago: 0,
            recovering: false,
        }
    }

    fn recovering(mut o: Observation) -> Observation {
        o.recovering = true;
        o
    }

    /// `obs` of a replica that last acked a leader `ago` ms before.
    fn acked(mut o: Observation, ago: u64) -> Observation {
        o.acked_ms_ago = ago;
        o
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
    fn an_unreachable_leader_is_replaced_by_the_longest_log_once_its_lease_is_over() {
        let mut g = group();
        let followers = |generation, ago| {
            vec![
                acked(obs("a2", generation, (1, 7)), ago),
                acked(obs("a3", generation, (1, 9)), ago),
                acked(obs("b1", generation, (1, 12)), ago),
            ]
        };
        assert_eq!(g.observe(&config(), 0, &followers(1, 0)), Action::None);
        assert_eq!(g.observe(&config(), 999, &followers(1, 0)), Action::None);
        let sealed = g.observe(&config(), 1_000, &followers(1, 0));
        assert_eq!(
            sealed,
            Action::Seal {
                generation: Generation(2),
                nodes: vec![n("a2"), n("a3"), n("b1")]
            }
        );
        // The followers last acked the old leader at 1_000 (their reports
        // say so): its lease (500) and the drift margin (200) run to 1_700.
        for t in (1_100..1_700).step_by(100) {
            assert_eq!(
                g.observe(&config(), t, &followers(2, t - 1_000)),
                Action::None,
                "named a leader at {t}, inside the old lease"
            );
        }
        // The remote replica has the longest log but cannot lead: it is not
        // in the home region and never counted towards a commit.
        assert_eq!(
            g.observe(&config(), 1_700, &followers(2, 700)),
            Action::Lead {
                generation: Generation(2),
                leader: n("a3"),
                ended_at: Some(LogIndex(9)),
            }
        );
        assert!(g.is_active());
    }

    /// Every member empty and recovering (a deployment's first start, or
    /// every copy lost): the group starts anew rather than wait forever.
    /// One member with a log, or one that did not answer, and it waits.
    #[test]
    fn a_group_whose_members_are_all_empty_starts_anew() {
        let mut g = group();
        let empty = |generation| {
            vec![
                recovering(obs("a1", generation, (0, 0))),
                recovering(obs("a2", generation, (0, 0))),
                recovering(obs("a3", generation, (0, 0))),
                recovering(obs("b1", generation, (0, 0))),
            ]
        };
        g.observe(&config(), 0, &empty(1));
        assert!(matches!(
            g.observe(&config(), 1_000, &empty(1)),
            Action::Seal { .. }
        ));
        let mut one_missing = empty(2);
        one_missing.pop();
        assert_eq!(g.observe(&config(), 1_100, &one_missing), Action::None);
        let mut one_with_data = empty(2);
        one_with_data[3] = recovering(obs("b1", 2, (1, 5)));
        assert_eq!(g.observe(&config(), 1_200, &one_with_data), Action::None);
        assert_eq!(
            g.observe(&config(), 1_300, &empty(2)),
            Action::StartNewGroup {
                generation: Generation(2),
                leader: n("a1"),
            }
        );
        assert!(g.is_active());
    }

    /// A follower that lost its state answers for nothing: with the leader
    /// gone, the planner waits rather than promote past an entry only the
    /// old leader and that follower's earlier life may have held; once the
    /// old leader answers (sealed), it proceeds without the lease wait and
    /// never chooses the recovering replica.
    #[test]
    fn a_recovering_follower_blocks_a_failover_until_the_old_leader_answers() {
        let mut g = group();
        let followers = |generation| {
            vec![
                recovering(obs("a2", generation, (0, 0))),
                acked(obs("a3", generation, (1, 9)), 5_000),
            ]
        };
        g.observe(&config(), 0, &followers(1));
        assert!(matches!(
            g.observe(&config(), 1_000, &followers(1)),
            Action::Seal { .. }
        ));
        for t in [2_000, 10_000, 60_000] {
            assert_eq!(
                g.observe(&config(), t, &followers(2)),
                Action::None,
                "promoted past a possibly committed entry at {t}"
            );
        }
        let mut back = followers(2);
        back.push(obs("a1", 2, (1, 11)));
        assert_eq!(
            g.observe(&config(), 60_100, &back),
            Action::Lead {
                generation: Generation(2),
                leader: n("a1"),
                ended_at: Some(LogIndex(11)),
            }
        );
    }

    /// A leader that reports it lost its state is replaced like an
    /// unreachable one, and never told to lead again meanwhile.
    #[test]
    fn a_recovering_leader_is_replaced() {
        let mut g = group();
        assert_eq!(
            g.catch_up(&n("a1"), Generation(1), false, None, true),
            CatchUp::Nothing
        );
        let seen = |generation| {
            vec![
                recovering(obs("a1", generation, (0, 0))),
                acked(obs("a2", generation, (1, 7)), 5_000),
                acked(obs("a3", generation, (1, 9)), 5_000),
            ]
        };
        g.observe(&config(), 0, &seen(1));
        assert!(matches!(
            g.observe(&config(), 1_000, &seen(1)),
            Action::Seal { .. }
        ));
        assert_eq!(
            g.observe(&config(), 1_100, &seen(2)),
            Action::Lead {
                generation: Generation(2),
                leader: n("a3"),
                ended_at: Some(LogIndex(9)),
            }
        );
    }

    #[test]
    fn the_lease_wait_counts_from_the_newest_follower_ack() {
        let mut g = group();
        g.observe(&config(), 0, &[obs("a2", 1, (1, 7)), obs("a3", 1, (1, 9))]);
        g.observe(
            &config(),
            1_000,
            &[obs("a2", 1, (1, 7)), obs("a3", 1, (1, 9))],
        );
        // a2 stopped acking long ago; a3 acked 100 ms ago.
        let sealed = [
            acked(obs("a2", 2, (1, 7)), 5_000),
            acked(obs("a3", 2, (1, 9)), 100),
        ];
        assert_eq!(g.observe(&config(), 1_100, &sealed), Action::None);
        let later = [
            acked(obs("a2", 2, (1, 7)), 5_600),
            acked(obs("a3", 2, (1, 9)), 700),
        ];
        assert!(matches!(
            g.observe(&config(), 1_700, &later),
            Action::Lead { .. }
        ));
    }

    #[test]
    fn no_leader_is_named_until_every_other_local_replica_answers() {
        let mut g = group();
        let only_a2 = [obs("a2", 1, (1, 7))];
        g.observe(&config(), 0, &only_a2);
        g.observe(&config(), 1_000, &only_a2);
        let only_a2 = [acked(obs("a2", 2, (1, 7)), 9_000)];
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
        // a3 may have acked the old leader until just before its seal.
        let both = [
            acked(obs("a2", 2, (1, 7)), 9_100),
            acked(obs("a3", 2, (1, 9)), 100),
        ];
        assert_eq!(g.observe(&config(), 10_100, &both), Action::None);
        let both = [
            acked(obs("a2", 2, (1, 7)), 9_700),
            acked(obs("a3", 2, (1, 9)), 700),
        ];
        assert_eq!(
            g.observe(&config(), 10_700, &both),
            Action::Lead {
                generation: Generation(2),
                leader: n("a3"),
                ended_at: Some(LogIndex(9)),
            }
        );
    }

    #[test]
    fn a_planned_transfer_drains_waits_for_the_target_and_needs_no_lease_wait() {
        let mut g = group();
        assert_eq!(
            g.transfer(&config(), 0, &n("a2")),
            Ok(Action::Drain {
                leader: n("a1"),
                for_ms: 300
            })
        );
        assert_eq!(
            g.transfer(&config(), 0, &n("a3")),
            Err(TransferError::Busy { shard: ShardId(0) })
        );
        let mut leader = obs("a1", 1, (1, 9));
        leader.leading = true;
        let behind = [leader.clone(), obs("a2", 1, (1, 8)), obs("a3", 1, (1, 9))];
        assert_eq!(g.observe(&config(), 10, &behind), Action::None);
        let caught_up = [leader, obs("a2", 1, (1, 9)), obs("a3", 1, (1, 9))];
        assert_eq!(
            g.observe(&config(), 20, &caught_up),
            Action::Seal {
                generation: Generation(2),
                nodes: vec![n("a1"), n("a2"), n("a3")]
            }
        );
        // Everyone sealed, the old leader included: its lease is gone, and
        // of the equally long logs the target's wins.
        let sealed = [
            obs("a1", 2, (1, 9)),
            obs("a2", 2, (1, 9)),
            obs("a3", 2, (1, 9)),
        ];
        assert_eq!(
            g.observe(&config(), 30, &sealed),
            Action::Lead {
                generation: Generation(2),
                leader: n("a2"),
                ended_at: Some(LogIndex(9)),
            }
        );
    }

    #[test]
    fn a_transfer_whose_target_lags_is_abandoned_and_bad_targets_refused() {
        let mut g = group();
        assert_eq!(
            g.transfer(&config(), 0, &n("b1")),
            Err(TransferError::NotALocalMember {
                shard: ShardId(0),
                node: n("b1")
            })
        );
        assert_eq!(
            g.transfer(&config(), 0, &n("a1")),
            Err(TransferError::AlreadyLeader {
                shard: ShardId(0),
                node: n("a1")
            })
        );
        g.transfer(&config(), 0, &n("a2")).unwrap();
        let behind = [obs("a1", 1, (1, 9)), obs("a2", 1, (1, 3))];
        assert_eq!(g.observe(&config(), 100, &behind), Action::None);
        assert_eq!(
            g.observe(&config(), 300, &behind),
            Action::TransferAbandoned { to: n("a2") }
        );
        assert!(g.is_active());
        assert_eq!(g.generation, Generation(1));
        assert_eq!(g.leader, n("a1"));
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
            g.catch_up(&a1, Generation(1), true, Some(&a1), false),
            CatchUp::Nothing
        );
        assert_eq!(
            g.catch_up(&a1, Generation(0), false, None, false),
            CatchUp::Lead(Generation(1))
        );
        // At its generation but not leading: never continue it.
        assert_eq!(
            g.catch_up(&a1, Generation(1), false, None, false),
            CatchUp::NewGeneration
        );
        assert_eq!(
            g.catch_up(&a2, Generation(1), false, Some(&a1), false),
            CatchUp::Nothing
        );
        assert_eq!(
            g.catch_up(&a2, Generation(1), false, None, false),
            CatchUp::Follow(Generation(1), a1.clone())
        );
        let mut sealing = group();
        sealing.observe(&config(), 0, &[obs("a2", 1, (1, 1))]);
        sealing.observe(&config(), 1_000, &[obs("a2", 1, (1, 1))]);
        assert_eq!(
            sealing.catch_up(&a1, Generation(1), true, Some(&a1), false),
            CatchUp::Seal(Generation(2))
        );
        assert_eq!(
            sealing.catch_up(&a2, Generation(2), false, None, false),
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
                ended_at: None,
            }
        );
    }
}

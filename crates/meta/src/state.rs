//! The metadata plane's state machine, pure: the shard map and the issuer
//! directory, changed only by [`MetaCommand`]s applied in log order. The
//! Raft metadata plane (`harbor-meta-raft`) replicates these commands and
//! applies them on every voter; the simulator applies them directly.

use std::collections::BTreeMap;

use harbor_types::{BucketId, Generation, IssuerId, LogIndex, NodeId, Region, ShardId};
use serde::{Deserialize, Serialize};

use crate::placement::{
    BucketMove, GenerationEnd, MovePhase, MoveProgress, ShardMap, Topology, GENERATION_ENDS_KEPT,
    RECENT_MOVES_KEPT,
};

/// Where an issuer lives.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirectoryEntry {
    pub issuer_id: IssuerId,
    pub home_region: Region,
    pub bucket: BucketId,
}

/// Expected refusals of the issuer directory.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum DirectoryError {
    #[error("issuer {issuer_id} is homed in {existing}, not {requested}; moving an issuer is not supported yet")]
    HomeRegionMismatch {
        issuer_id: IssuerId,
        existing: Region,
        requested: Region,
    },
    #[error("region {region} is not part of this cluster")]
    UnknownRegion { region: Region },
}

/// A change to the metadata.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MetaCommand {
    /// Lays the cluster out from a topology. Only the first one counts: a
    /// cluster is created once.
    Bootstrap(Topology),
    /// A new generation for every group with the same leader (the embedded
    /// cluster restarted as a whole).
    BeginEpoch,
    /// A group's new leader and generation (failover, transfer, restart).
    UpdateGroup {
        shard: ShardId,
        leader: NodeId,
        generation: Generation,
        /// Where the published generation's log ended, when known.
        #[serde(default)]
        ended_at: Option<LogIndex>,
    },
    /// The control plane is about to seal a group's replicas at
    /// `generation` (a failover or transfer is under way): recorded before
    /// any replica is told, so the group's fence covers every generation a
    /// replica may hear of. Refused when older than the published
    /// generation; sealing at one already recorded changes nothing.
    SealGroup {
        shard: ShardId,
        generation: Generation,
    },
    /// Places a new issuer, or finds where it is.
    Assign {
        issuer_id: IssuerId,
        home_region: Region,
    },
    /// Begins moving `bucket` to group `to` (of the same home region).
    /// Refused while the bucket, its group or `to` is in another move.
    BeginMove {
        bucket: BucketId,
        to: ShardId,
        at_ms: u64,
    },
    /// Records how far a move got.
    UpdateMove {
        id: u64,
        phase: MovePhase,
        progress: MoveProgress,
    },
    /// The target acquired the bucket: the map names it from now on.
    CommitMove { id: u64 },
    /// The move is over: done, or aborted with a reason (refused once
    /// committed).
    EndMove {
        id: u64,
        aborted: Option<String>,
        progress: MoveProgress,
        at_ms: u64,
    },
    /// One step of a membership change of a group (`membership.rs`).
    ChangeMembers {
        shard: ShardId,
        change: crate::membership::MemberChange,
    },
}

/// What applying a command answered.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MetaReply {
    /// The map after the change.
    Map { map_version: u64 },
    /// The issuer's entry and whether this command created it, or why not.
    Assigned(Result<(DirectoryEntry, bool), DirectoryError>),
    /// The command does not fit the state (an older generation, an unknown
    /// group or leader, no cluster yet). Nothing changed.
    Refused(String),
    /// A move as it stands after the command.
    Move(BucketMove),
}

/// Everything the metadata plane holds.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetaState {
    /// `None` until bootstrapped.
    pub map: Option<ShardMap>,
    /// The topology the cluster was created with (`None` before the
    /// bootstrap, and in states written before it was kept).
    #[serde(default)]
    pub topology: Option<Topology>,
    pub directory: BTreeMap<IssuerId, DirectoryEntry>,
}

impl MetaState {
    /// Applies one command. Deterministic: every replica of the metadata
    /// log computes the same state and the same reply.
    pub fn apply(&mut self, command: &MetaCommand) -> MetaReply {
        if let MetaCommand::Bootstrap(topology) = command {
            return self.bootstrap(topology);
        }
        let Some(map) = self.map.as_mut() else {
            return MetaReply::Refused("the cluster is not bootstrapped yet".into());
        };
        match command {
            MetaCommand::Bootstrap(_) => unreachable!("handled above"),
            MetaCommand::BeginEpoch => {
                for group in map.groups.values_mut() {
                    group.generation = group.fence().next();
                    group.sealed = group.generation;
                }
                map.map_version += 1;
            }
            MetaCommand::UpdateGroup {
                shard,
                leader,
                generation,
                ended_at,
            } => {
                let Some(group) = map.groups.get_mut(shard) else {
                    return MetaReply::Refused(format!("no group {shard}"));
                };
                if !group.members.contains(leader) {
                    return MetaReply::Refused(format!("{leader} is not a member of {shard}"));
                }
                if *generation < group.generation {
                    return MetaReply::Refused(format!(
                        "{shard}: generation {generation} is older than the published {}",
                        group.generation
                    ));
                }
                // A generation has one leader: two control loops (one of
                // them deposed) that chose different leaders for the same
                // generation must not both be published.
                if *generation == group.generation && *leader != group.leader {
                    return MetaReply::Refused(format!(
                        "{shard}: generation {generation} is led by {} already",
                        group.leader
                    ));
                }
                if let (Some(last_index), true) = (ended_at, *generation > group.generation) {
                    group.ended.push(GenerationEnd {
                        generation: group.generation,
                        last_index: *last_index,
                    });
                    let excess = group.ended.len().saturating_sub(GENERATION_ENDS_KEPT);
                    group.ended.drain(..excess);
                }
                group.leader = leader.clone();
                group.generation = *generation;
                group.sealed = group.sealed.max(*generation);
                map.map_version += 1;
            }
            MetaCommand::SealGroup { shard, generation } => {
                let Some(group) = map.groups.get_mut(shard) else {
                    return MetaReply::Refused(format!("no group {shard}"));
                };
                if *generation < group.generation {
                    return MetaReply::Refused(format!(
                        "{shard}: cannot seal at {generation}: generation {} is published",
                        group.generation
                    ));
                }
                if *generation > group.sealed {
                    group.sealed = *generation;
                    map.map_version += 1;
                }
            }
            MetaCommand::Assign {
                issuer_id,
                home_region,
            } => {
                if let Some(existing) = self.directory.get(issuer_id) {
                    if existing.home_region != *home_region {
                        return MetaReply::Assigned(Err(DirectoryError::HomeRegionMismatch {
                            issuer_id: issuer_id.clone(),
                            existing: existing.home_region.clone(),
                            requested: home_region.clone(),
                        }));
                    }
                    return MetaReply::Assigned(Ok((existing.clone(), false)));
                }
                let Some(bucket) = map.place_issuer(issuer_id, home_region) else {
                    return MetaReply::Assigned(Err(DirectoryError::UnknownRegion {
                        region: home_region.clone(),
                    }));
                };
                let entry = DirectoryEntry {
                    issuer_id: issuer_id.clone(),
                    home_region: home_region.clone(),
                    bucket,
                };
                self.directory.insert(issuer_id.clone(), entry.clone());
                return MetaReply::Assigned(Ok((entry, true)));
            }
            MetaCommand::BeginMove { bucket, to, at_ms } => {
                return match map.begin_move(*bucket, *to, *at_ms) {
                    Ok(record) => MetaReply::Move(record),
                    Err(reason) => MetaReply::Refused(reason),
                };
            }
            MetaCommand::UpdateMove {
                id,
                phase,
                progress,
            } => {
                let Some(record) = map.moves.values_mut().find(|m| m.id == *id) else {
                    return MetaReply::Refused(format!("no move {id} under way"));
                };
                record.phase = record.phase.max(*phase);
                record.progress = *progress;
                let record = record.clone();
                map.map_version += 1;
                return MetaReply::Move(record);
            }
            MetaCommand::ChangeMembers { shard, change } => {
                if let Err(reason) = map.change_members(*shard, change) {
                    return MetaReply::Refused(reason);
                }
            }
            MetaCommand::CommitMove { id } => {
                let Some(record) = map.moves.values_mut().find(|m| m.id == *id) else {
                    return MetaReply::Refused(format!("no move {id} under way"));
                };
                record.phase = record.phase.max(MovePhase::Committed);
                let record = record.clone();
                map.buckets[record.bucket.0 as usize] = record.to;
                map.map_version += 1;
                return MetaReply::Move(record);
            }
            MetaCommand::EndMove {
                id,
                aborted,
                progress,
                at_ms,
            } => {
                let Some(bucket) = map.moves.values().find(|m| m.id == *id).map(|m| m.bucket)
                else {
                    return match map.recent_moves.iter().find(|m| m.id == *id) {
                        Some(ended) => MetaReply::Move(ended.clone()),
                        None => MetaReply::Refused(format!("no move {id}")),
                    };
                };
                let mut record = map.moves.remove(&bucket).expect("found above");
                if aborted.is_some() && record.phase >= MovePhase::Committed {
                    map.moves.insert(bucket, record);
                    return MetaReply::Refused(format!("move {id} is committed: it cannot abort"));
                }
                record.phase = match aborted {
                    Some(_) => MovePhase::Aborted,
                    None => MovePhase::Done,
                };
                record.reason = aborted.clone();
                record.progress = *progress;
                record.ended_ms = Some(*at_ms);
                map.recent_moves.push(record.clone());
                let excess = map.recent_moves.len().saturating_sub(RECENT_MOVES_KEPT);
                map.recent_moves.drain(..excess);
                map.map_version += 1;
                return MetaReply::Move(record);
            }
        }
        self.map_reply()
    }

    /// The first bootstrap lays the cluster out; a later one is answered
    /// by the same committed state, so every voter and every start, in any
    /// order, reaches the same verdict on a changed topology (the start of
    /// a voter used to compare against a copy that had not yet applied the
    /// first bootstrap).
    fn bootstrap(&mut self, topology: &Topology) -> MetaReply {
        let Some(map) = &self.map else {
            if let Err(e) = topology.validate() {
                return MetaReply::Refused(format!("invalid topology: {e}"));
            }
            self.map = Some(ShardMap::from_topology(topology));
            self.topology = Some(topology.clone());
            return self.map_reply();
        };
        let same = match &self.topology {
            Some(created) => created == topology,
            // A state written before the topology was kept: compare the
            // shape of what it laid out.
            None => {
                let expected = ShardMap::from_topology(topology);
                map.nodes == expected.nodes
                    && map.groups.len() == expected.groups.len()
                    && map.buckets.len() == expected.buckets.len()
            }
        };
        if !same {
            return MetaReply::Refused(format!(
                "the topology differs from the one this cluster was created with \
                 ({} nodes, {} groups, {} buckets); changing the topology is not supported",
                map.nodes.len(),
                map.groups.len(),
                map.buckets.len()
            ));
        }
        self.map_reply()
    }

    fn map_reply(&self) -> MetaReply {
        MetaReply::Map {
            map_version: self.map.as_ref().map_or(0, |m| m.map_version),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_change_the_map_and_directory_deterministically() {
        let mut state = MetaState::default();
        let madrid = Region::new("madrid").unwrap();
        let issuer = IssuerId::new("MUNI-1").unwrap();
        let assign = MetaCommand::Assign {
            issuer_id: issuer.clone(),
            home_region: madrid.clone(),
        };
        assert!(matches!(state.apply(&assign), MetaReply::Refused(_)));
        assert_eq!(
            state.apply(&MetaCommand::Bootstrap(Topology::dev())),
            MetaReply::Map { map_version: 1 }
        );
        // A second bootstrap changes nothing; with another topology it is
        // refused.
        assert_eq!(
            state.apply(&MetaCommand::Bootstrap(Topology::dev())),
            MetaReply::Map { map_version: 1 }
        );
        let mut other = Topology::dev();
        other.groups_per_region = 1;
        assert!(matches!(
            state.apply(&MetaCommand::Bootstrap(other)),
            MetaReply::Refused(reason) if reason.contains("topology differs")
        ));
        assert_eq!(state.map.as_ref().unwrap().groups.len(), 16);

        let MetaReply::Assigned(Ok((entry, true))) = state.apply(&assign) else {
            panic!("not assigned");
        };
        assert_eq!(
            state.apply(&assign),
            MetaReply::Assigned(Ok((entry, false)))
        );
        let elsewhere = MetaCommand::Assign {
            issuer_id: issuer,
            home_region: Region::new("newyork").unwrap(),
        };
        assert!(matches!(
            state.apply(&elsewhere),
            MetaReply::Assigned(Err(DirectoryError::HomeRegionMismatch { .. }))
        ));

        state.apply(&MetaCommand::BeginEpoch);
        let map = state.map.clone().unwrap();
        let group = &map.groups[&ShardId(0)];
        assert_eq!(group.generation, Generation(1));
        let next = group.members[1].clone();
        let update = |generation| MetaCommand::UpdateGroup {
            shard: ShardId(0),
            leader: next.clone(),
            generation: Generation(generation),
            ended_at: Some(LogIndex(40)),
        };
        assert_eq!(state.apply(&update(2)), MetaReply::Map { map_version: 3 });
        assert_eq!(
            state.map.as_ref().unwrap().groups[&ShardId(0)].ended,
            vec![GenerationEnd {
                generation: Generation(1),
                last_index: LogIndex(40)
            }]
        );
        assert!(matches!(state.apply(&update(1)), MetaReply::Refused(_)));
        let stranger = MetaCommand::UpdateGroup {
            shard: ShardId(0),
            leader: NodeId::new("tokyo-1").unwrap(),
            generation: Generation(9),
            ended_at: None,
        };
        assert!(matches!(state.apply(&stranger), MetaReply::Refused(_)));
        // A generation has one leader.
        let other = MetaCommand::UpdateGroup {
            shard: ShardId(0),
            leader: group.members[0].clone(),
            generation: Generation(2),
            ended_at: None,
        };
        assert!(matches!(state.apply(&other), MetaReply::Refused(_)));
        assert_eq!(state.map.as_ref().unwrap().map_version, 3);

        // A seal is recorded ahead of the published generation, and the
        // fence is the newer of the two.
        let seal = |generation| MetaCommand::SealGroup {
            shard: ShardId(0),
            generation: Generation(generation),
        };
        assert!(matches!(state.apply(&seal(1)), MetaReply::Refused(_)));
        assert_eq!(state.apply(&seal(3)), MetaReply::Map { map_version: 4 });
        assert_eq!(state.apply(&seal(3)), MetaReply::Map { map_version: 4 });
        let sealed = &state.map.as_ref().unwrap().groups[&ShardId(0)];
        assert_eq!(
            (sealed.generation, sealed.fence()),
            (Generation(2), Generation(3))
        );

        // The same commands give the same state.
        let mut replay = MetaState::default();
        for command in [
            MetaCommand::Bootstrap(Topology::dev()),
            assign.clone(),
            MetaCommand::BeginEpoch,
            update(2),
            seal(3),
        ] {
            replay.apply(&command);
        }
        assert_eq!(replay, state);
    }
}

use std::collections::BTreeMap;

use harbor_types::{BucketId, Generation, IssuerId, LogIndex, NodeId, Region, ShardId};
use serde::{Deserialize, Serialize};

/// Logical buckets in a cluster (`BUCKETS_DEFAULT`) are fixed for the life
/// of a cluster: buckets move between groups, their number never changes.
/// The map keeps `GENERATION_ENDS_KEPT` generation ends per group.
pub use harbor_types::limits::{BUCKETS_DEFAULT, GENERATION_ENDS_KEPT};

/// The shape of a cluster to create: regions, nodes, groups.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Topology {
    pub regions: Vec<Region>,
    pub nodes_per_region: usize,
    pub groups_per_region: usize,
    /// Replicas of a group in its home region (leader included).
    pub local_replicas: usize,
    /// Replicas of a group in each other region (asynchronous).
    pub remote_replicas: usize,
    pub buckets: u32,
}

impl Topology {
    /// `harbor dev`: madrid and newyork, 3 nodes each, 16 groups, each with 3
    /// local replicas and 1 remote.
    pub fn dev() -> Topology {
        Topology {
            regions: vec![
                Region::new("madrid").unwrap(),
                Region::new("newyork").unwrap(),
            ],
            nodes_per_region: 3,
            groups_per_region: 8,
            local_replicas: 3,
            remote_replicas: 1,
            buckets: BUCKETS_DEFAULT,
        }
    }

    pub fn validate(&self) -> Result<(), String> {
        if self.regions.is_empty() {
            return Err("at least one region is needed".into());
        }
        if self.local_replicas == 0 || self.local_replicas > self.nodes_per_region {
            return Err(format!(
                "local_replicas = {} must be between 1 and nodes_per_region = {}",
                self.local_replicas, self.nodes_per_region
            ));
        }
        if self.regions.len() > 1 && self.remote_replicas > self.nodes_per_region {
            return Err("remote_replicas is larger than a region".into());
        }
        let groups = self.groups_per_region * self.regions.len();
        if groups == 0 || self.buckets < groups as u32 {
            return Err(format!(
                "{} buckets cannot cover {groups} groups",
                self.buckets
            ));
        }
        Ok(())
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    pub node: NodeId,
    pub region: Region,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupInfo {
    pub shard: ShardId,
    pub home_region: Region,
    /// Home-region replicas first, leader among them.
    pub members: Vec<NodeId>,
    pub leader: NodeId,
    pub generation: Generation,
    /// The newest generation the control plane sealed replicas at, recorded
    /// before any replica is told (a seal names the next generation before
    /// its leader is chosen, so it may be ahead of `generation`).
    #[serde(default)]
    pub sealed: Generation,
    /// Where recent generations' logs ended (newest last, at most
    /// `GENERATION_ENDS_KEPT`): a returning replica's entries past its
    /// generation's end were never committed.
    #[serde(default)]
    pub ended: Vec<GenerationEnd>,
    /// Replicas being added: sent the log, counted for nothing, not in
    /// `members` (see `membership.rs`).
    #[serde(default)]
    pub learners: Vec<NodeId>,
    /// Members on their way out: still in `members` and asked in failover,
    /// but their acks count for nothing.
    #[serde(default)]
    pub leaving: Vec<NodeId>,
    /// Bumped on every membership change; replicas ignore an older one.
    #[serde(default)]
    pub members_epoch: u64,
}

impl GroupInfo {
    /// The oldest generation any replica of the group may still be told
    /// about: every order the control plane sends names a generation it
    /// recorded here first. A replica that lost its disk starts at this
    /// generation, so a late order naming an older one (a deposed control
    /// loop's, one a connection queued across its restart) is refused.
    pub fn fence(&self) -> Generation {
        self.generation.max(self.sealed)
    }

    /// Whether the fence generation has a published leader: then a
    /// replica that lost its disk must not lead it either (if it led it,
    /// its followers hold entries of it that it lost).
    pub fn fence_is_led(&self) -> bool {
        self.sealed <= self.generation
    }
}

/// Generation `generation` of a group ended with the entry at `last_index`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GenerationEnd {
    pub generation: Generation,
    pub last_index: LogIndex,
}

/// Bucket → group, group → members, leader and generation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardMap {
    /// Bumped on every change; routers compare it to refresh.
    pub map_version: u64,
    pub nodes: Vec<NodeInfo>,
    pub groups: BTreeMap<ShardId, GroupInfo>,
    /// Index = bucket id.
    pub buckets: Vec<ShardId>,
    /// Buckets moving now, by bucket (DESIGN.md §9).
    #[serde(default)]
    pub moves: BTreeMap<BucketId, BucketMove>,
    /// Moves that ended, newest last (at most `RECENT_MOVES_KEPT`).
    #[serde(default)]
    pub recent_moves: Vec<BucketMove>,
    /// The id of the last move begun.
    #[serde(default)]
    pub last_move_id: u64,
}

/// Moves a map remembers after they end.
pub const RECENT_MOVES_KEPT: usize = 32;

/// A bucket on its way from one group to another. Its state lives here,
/// not in the memory of whatever drives it: the groups' logs decide each
/// step, and this record says how far it got.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BucketMove {
    pub id: u64,
    pub bucket: BucketId,
    pub from: ShardId,
    pub to: ShardId,
    /// When it began, on the clock of whoever began it (ms since the Unix
    /// epoch).
    pub started_ms: u64,
    pub phase: MovePhase,
    pub progress: MoveProgress,
    /// Why it aborted.
    #[serde(default)]
    pub reason: Option<String>,
    #[serde(default)]
    pub ended_ms: Option<u64>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MovePhase {
    /// Copying the bucket's rows, then what changed since, to the target.
    Copying,
    /// The source sealed the bucket: its last changes are copied, then the
    /// target acquires it.
    Sealed,
    /// The target acquired it and the map names the target.
    Committed,
    Done,
    Aborted,
}

impl MovePhase {
    pub fn as_str(self) -> &'static str {
        match self {
            MovePhase::Copying => "copying",
            MovePhase::Sealed => "sealed",
            MovePhase::Committed => "committed",
            MovePhase::Done => "done",
            MovePhase::Aborted => "aborted",
        }
    }
}

/// What a move copied, and the write pause of its cutover.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MoveProgress {
    pub copied_rows: u64,
    #[serde(default)]
    pub copied_reservations: u64,
    pub copied_bytes: u64,
    /// Copy passes (a full one, then passes over what changed since).
    pub passes: u32,
    /// From the seal's answer to the map naming the target: the longest a
    /// write to the bucket could wait on the move.
    pub pause_ms: Option<u64>,
}

impl ShardMap {
    /// The map before the cluster is bootstrapped: no nodes, no groups.
    pub fn empty() -> ShardMap {
        ShardMap {
            map_version: 0,
            nodes: Vec::new(),
            groups: BTreeMap::new(),
            buckets: Vec::new(),
            moves: BTreeMap::new(),
            recent_moves: Vec::new(),
            last_move_id: 0,
        }
    }

    /// Lays a topology out: groups are homed round-robin over regions,
    /// replicas and leaders are spread over each region's nodes, and buckets
    /// are dealt to groups round-robin.
    pub fn from_topology(topology: &Topology) -> ShardMap {
        topology.validate().expect("valid topology");
        let mut nodes = Vec::new();
        let mut by_region: BTreeMap<&Region, Vec<NodeId>> = BTreeMap::new();
        for region in &topology.regions {
            for i in 1..=topology.nodes_per_region {
                let node = NodeId::new(format!("{region}-{i}")).unwrap();
                nodes.push(NodeInfo {
                    node: node.clone(),
                    region: region.clone(),
                });
                by_region.entry(region).or_default().push(node);
            }
        }
        let mut groups = BTreeMap::new();
        let group_count = topology.groups_per_region * topology.regions.len();
        for g in 0..group_count {
            let home = &topology.regions[g / topology.groups_per_region];
            let k = g % topology.groups_per_region;
            let local = &by_region[home];
            let mut members: Vec<NodeId> = (0..topology.local_replicas)
                .map(|i| local[(k + i) % local.len()].clone())
                .collect();
            for region in topology.regions.iter().filter(|r| *r != home) {
                let remote = &by_region[region];
                members.extend(
                    (0..topology.remote_replicas).map(|i| remote[(k + i) % remote.len()].clone()),
                );
            }
            let shard = ShardId(g as u32);
            groups.insert(
                shard,
                GroupInfo {
                    shard,
                    home_region: home.clone(),
                    leader: members[0].clone(),
                    members,
                    generation: Generation::ZERO,
                    sealed: Generation::ZERO,
                    ended: Vec::new(),
                    learners: Vec::new(),
                    leaving: Vec::new(),
                    members_epoch: 0,
                },
            );
        }
        let buckets = (0..topology.buckets)
            .map(|b| ShardId(b % group_count as u32))
            .collect();
        ShardMap {
            map_version: 1,
            nodes,
            groups,
            buckets,
            moves: BTreeMap::new(),
            recent_moves: Vec::new(),
            last_move_id: 0,
        }
    }

    pub fn region_of(&self, node: &NodeId) -> Option<&Region> {
        self.nodes
            .iter()
            .find(|n| n.node == *node)
            .map(|n| &n.region)
    }

    pub fn regions(&self) -> Vec<Region> {
        let mut regions: Vec<Region> = self.nodes.iter().map(|n| n.region.clone()).collect();
        regions.sort();
        regions.dedup();
        regions
    }

    pub fn shard_of_bucket(&self, bucket: BucketId) -> ShardId {
        self.buckets[bucket.0 as usize]
    }

    /// The buckets whose group is homed in `region`, in bucket order.
    pub fn buckets_homed_in(&self, region: &Region) -> Vec<BucketId> {
        self.buckets
            .iter()
            .enumerate()
            .filter(|(_, shard)| self.groups[shard].home_region == *region)
            .map(|(b, _)| BucketId(b as u32))
            .collect()
    }

    /// The bucket for a new issuer: chosen among the buckets homed in its
    /// home region by a stable hash of its id, so the choice is the same on
    /// every router and in every release.
    pub fn place_issuer(&self, issuer: &IssuerId, home_region: &Region) -> Option<BucketId> {
        let candidates = self.buckets_homed_in(home_region);
        if candidates.is_empty() {
            return None;
        }
        let slot = fnv1a64(issuer.as_str().as_bytes()) % candidates.len() as u64;
        Some(candidates[slot as usize])
    }

    /// Records a move of `bucket` to `to`, or says why it cannot begin.
    pub fn begin_move(
        &mut self,
        bucket: BucketId,
        to: ShardId,
        at_ms: u64,
    ) -> Result<BucketMove, String> {
        let Some(&from) = self.buckets.get(bucket.0 as usize) else {
            return Err(format!(
                "{bucket} does not exist: this cluster has buckets 0 to {}",
                self.buckets.len().saturating_sub(1)
            ));
        };
        let Some(target) = self.groups.get(&to) else {
            return Err(format!("{to} is not a group of this cluster"));
        };
        if from == to {
            return Err(format!("{bucket} is in {to} already"));
        }
        let source = &self.groups[&from];
        if source.home_region != target.home_region {
            return Err(format!(
                "{bucket} is homed in {} ({from}); {to} is homed in {}: a bucket moves within its home region",
                source.home_region, target.home_region
            ));
        }
        if let Some(other) = self.moves.get(&bucket) {
            return Err(format!("{bucket} is in move {} already", other.id));
        }
        if let Some(busy) = self
            .moves
            .values()
            .find(|m| [m.from, m.to].iter().any(|g| *g == from || *g == to))
        {
            return Err(format!(
                "move {} of {} involves {} or {}: one move per group at a time",
                busy.id, busy.bucket, from, to
            ));
        }
        self.last_move_id += 1;
        let record = BucketMove {
            id: self.last_move_id,
            bucket,
            from,
            to,
            started_ms: at_ms,
            phase: MovePhase::Copying,
            progress: MoveProgress::default(),
            reason: None,
            ended_ms: None,
        };
        self.moves.insert(bucket, record.clone());
        self.map_version += 1;
        Ok(record)
    }

    /// The move with this id, under way or recently ended.
    pub fn find_move(&self, id: u64) -> Option<&BucketMove> {
        self.moves
            .values()
            .find(|m| m.id == id)
            .or_else(|| self.recent_moves.iter().find(|m| m.id == id))
    }

    /// The groups `node` holds a replica of (as a member or a learner).
    pub fn groups_of(&self, node: &NodeId) -> Vec<&GroupInfo> {
        self.groups
            .values()
            .filter(|g| g.members.contains(node) || g.learners.contains(node))
            .collect()
    }
}

/// FNV-1a: tiny, stable across platforms and Rust releases (unlike
/// `DefaultHasher`), good enough to spread ids over buckets.
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        hash ^= *b as u64;
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dev_topology_has_the_documented_shape() {
        let map = ShardMap::from_topology(&Topology::dev());
        assert_eq!(map.nodes.len(), 6);
        assert_eq!(map.groups.len(), 16);
        assert_eq!(map.buckets.len(), 2048);
        let madrid = Region::new("madrid").unwrap();
        for group in map.groups.values() {
            assert_eq!(group.members.len(), 4, "{group:?}");
            let local = group
                .members
                .iter()
                .filter(|n| map.region_of(n) == Some(&group.home_region))
                .count();
            assert_eq!(local, 3);
            assert_eq!(map.region_of(&group.leader), Some(&group.home_region));
        }
        let homed_in_madrid = map
            .groups
            .values()
            .filter(|g| g.home_region == madrid)
            .count();
        assert_eq!(homed_in_madrid, 8);
        // Leaders are spread over the region's nodes.
        let mut leaders: Vec<_> = map.groups.values().map(|g| g.leader.clone()).collect();
        leaders.sort();
        leaders.dedup();
        assert_eq!(leaders.len(), 6);
    }

    #[test]
    fn issuers_land_in_their_home_region_and_spread() {
        let map = ShardMap::from_topology(&Topology::dev());
        let newyork = Region::new("newyork").unwrap();
        let mut shards = std::collections::BTreeSet::new();
        for i in 0..200 {
            let issuer = IssuerId::new(format!("ISS-{i}")).unwrap();
            let bucket = map.place_issuer(&issuer, &newyork).unwrap();
            let shard = map.shard_of_bucket(bucket);
            assert_eq!(map.groups[&shard].home_region, newyork);
            assert_eq!(map.place_issuer(&issuer, &newyork), Some(bucket), "stable");
            shards.insert(shard);
        }
        assert_eq!(
            shards.len(),
            8,
            "200 issuers should touch every New York group"
        );
        assert_eq!(
            map.place_issuer(&IssuerId::new("X").unwrap(), &Region::new("tokyo").unwrap()),
            None
        );
    }
}

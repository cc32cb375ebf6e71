//! Which replicas a node hosts: those the metadata plane names it a member
//! of. At start, every group of the map (read linearizably); while it
//! runs, a membership that names it for a group it does not host opens an
//! empty replica (which catches up from the leader), once the metadata
//! plane confirms it. `harbor dev` and `harbor node` share this.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use harbor_meta::{Metadata, ShardMap};
use harbor_node::{Hosting, OnMembership, ReplicaPlan};
use harbor_types::{NodeId, ShardId};

/// The replicas `node` runs, as `map` describes their groups.
pub fn replica_plans(map: &ShardMap, node: &NodeId) -> Vec<ReplicaPlan> {
    map.groups_of(node)
        .into_iter()
        .filter_map(|g| replica_plan(map, g.shard, node))
        .collect()
}

/// `node`'s replica of `shard`, if `map` names it a member (voter,
/// leaving or learner).
pub fn replica_plan(map: &ShardMap, shard: ShardId, node: &NodeId) -> Option<ReplicaPlan> {
    let g = map.groups.get(&shard)?;
    let members = map.replica_members(shard);
    members
        .iter()
        .any(|m| m.node == *node)
        .then(|| ReplicaPlan {
            shard,
            members,
            fence: g.fence(),
            fence_is_led: g.fence_is_led(),
            members_epoch: g.members_epoch,
        })
}

/// The hook a node's runtime gives it (`Node::on_membership`): the order
/// that named the node may be stale (it was removed since), so the map is
/// read linearizably first, and the replica opens only if it names the
/// node still; it starts at its group's fence as that read holds it. One
/// open per group at a time: the orders the control plane repeats while
/// it waits for the replica are dropped meanwhile. Call within a tokio
/// runtime.
pub fn open_when_named(node: NodeId, meta: Arc<dyn Metadata>, hosting: Hosting) -> OnMembership {
    let runtime = tokio::runtime::Handle::current();
    let opening: Arc<Mutex<BTreeSet<ShardId>>> = Arc::default();
    Arc::new(move |shard| {
        if hosting.hosts(shard) || !opening.lock().unwrap().insert(shard) {
            return;
        }
        let (node, meta, hosting) = (node.clone(), meta.clone(), hosting.clone());
        let opening = opening.clone();
        runtime.spawn(async move {
            open(&node, meta.as_ref(), hosting, shard).await;
            opening.lock().unwrap().remove(&shard);
        });
    })
}

/// Reads the map and opens the replica of `shard` if the map names `node`.
async fn open(node: &NodeId, meta: &dyn Metadata, hosting: Hosting, shard: ShardId) {
    let map = match meta.map_linearizable().await {
        Ok(map) => map,
        Err(e) => {
            // The control plane tells it again while the change
            // waits for this replica.
            tracing::warn!(%shard, %node, error = %e, "named a member, but the map cannot be read; not opening yet");
            return;
        }
    };
    let Some(plan) = replica_plan(&map, shard, node) else {
        tracing::info!(%shard, %node, "named a member by an order the map no longer holds; not opening");
        return;
    };
    let epoch = plan.members_epoch;
    match tokio::task::spawn_blocking(move || hosting.open(plan)).await {
        Ok(Ok(())) => {
            tracing::info!(%shard, %node, epoch, "opened a replica for a group that added this node")
        }
        Ok(Err(e)) => {
            tracing::error!(%shard, %node, error = %e, "cannot open a replica for a group that added this node")
        }
        Err(e) => tracing::error!(%shard, %node, error = %e, "opening a replica panicked"),
    }
}

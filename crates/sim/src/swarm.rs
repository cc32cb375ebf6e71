//! One seed's shape of the world: its topology, limits, timings and
//! delays. Swarm testing (TigerBeetle's VOPR `options_swarm`): every seed
//! draws its own, so a sweep covers many clusters, not one; a seed still
//! names one run forever.

use harbor_meta::Topology;
use harbor_types::Region;

use crate::rng::Rng;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Swarm {
    pub topology: Topology,
    /// Local followers that must hold an entry before it commits.
    pub sync_acks: usize,
    /// Inputs a replica takes in one batch (one fsync).
    pub batch_inputs_max: usize,
    pub snapshot_interval_entries: u64,
    pub retained_entries_max: u64,
    pub heartbeat_interval_ms: u64,
    pub retransmit_timeout_ms: u64,
    pub lease_ms: u64,
    /// How long the control plane waits for a silent leader before it
    /// seals its generation.
    pub unreachable_after_ms: u64,
    /// One-way delays within a region and between regions.
    pub local_delay_ms: u64,
    pub wan_delay_ms: u64,
    /// The gateways' resend interval.
    pub resend_after_ms: u64,
    /// Changes each replica keeps for change feeds (small ones make the
    /// feed's positions expire).
    pub changes_retained_bytes: usize,
    /// And for how long (short ones expire positions by age).
    pub changes_retained_ms: u64,
    /// How long an idle leader waits before its no-op: longer than a
    /// remote replica takes to apply one, or the cluster is never quiet
    /// for the liveness check.
    pub resolved_tick_ms: u64,
}

const REGIONS: [&str; 3] = ["madrid", "newyork", "tokyo"];

impl Swarm {
    /// The shape every seed had before swarm testing: two regions of three
    /// nodes, one group each, three local replicas and one remote.
    pub fn fixed() -> Swarm {
        Swarm {
            topology: Topology {
                groups_per_region: 1,
                buckets: 16,
                ..Topology::dev()
            },
            sync_acks: 1,
            batch_inputs_max: harbor_types::limits::BATCH_INPUTS_MAX,
            snapshot_interval_entries: 200,
            retained_entries_max: harbor_types::limits::RETAINED_ENTRIES_MAX,
            heartbeat_interval_ms: harbor_types::limits::HEARTBEAT_INTERVAL_MS,
            retransmit_timeout_ms: 250,
            lease_ms: 500,
            unreachable_after_ms: 1_000,
            local_delay_ms: 1,
            wan_delay_ms: 35,
            resend_after_ms: 1_000,
            changes_retained_bytes: harbor_types::limits::CHANGES_RETAINED_BYTES,
            changes_retained_ms: harbor_types::limits::CHANGES_RETAINED_MS,
            resolved_tick_ms: harbor_types::limits::RESOLVED_TICK_MS,
        }
    }

    /// A shape drawn from `rng`: 2–3 regions, 2–5 local replicas, 0–2
    /// remote ones per other region, 1–2 groups per region (mostly 2), `sync_acks`
    /// from 1 to all local followers (at most 2), small and large batches,
    /// snapshot intervals and retained logs (so lagging followers get
    /// snapshots), and timings that keep the limits' rules; change budgets
    /// small enough to evict.
    pub fn draw(rng: &mut Rng) -> Swarm {
        let regions = rng.range(2, 3) as usize;
        let local_replicas = rng.range(2, 5) as usize;
        let remote_replicas = rng.range(0, 2) as usize;
        let nodes_per_region = local_replicas.max(remote_replicas) + rng.range(0, 1) as usize;
        // Bound the replicas per run: the sweep's cost grows with them. Two
        // groups in a region let buckets move between them.
        let groups_per_region = if regions * (local_replicas + remote_replicas) > 8 {
            1 + usize::from(rng.chance(30))
        } else {
            1 + usize::from(rng.chance(75))
        };
        let topology = Topology {
            regions: REGIONS[..regions]
                .iter()
                .map(|r| Region::new(*r).expect("a valid region"))
                .collect(),
            nodes_per_region,
            groups_per_region,
            local_replicas,
            remote_replicas,
            buckets: 16,
        };
        assert_eq!(topology.validate(), Ok(()), "{topology:?}");
        let heartbeat_interval_ms = *rng.pick(&[30, 50, 100]);
        let retransmit_timeout_ms = heartbeat_interval_ms * rng.range(2, 5);
        let lease_ms = retransmit_timeout_ms + rng.range(100, 400);
        Swarm {
            sync_acks: rng.range(1, (local_replicas as u64 - 1).min(2)) as usize,
            batch_inputs_max: *rng.pick(&[1, 4, 64, harbor_types::limits::BATCH_INPUTS_MAX]),
            snapshot_interval_entries: *rng.pick(&[50, 200, 1_000]),
            retained_entries_max: *rng.pick(&[64, 1_000, 1_000_000]),
            heartbeat_interval_ms,
            retransmit_timeout_ms,
            lease_ms,
            unreachable_after_ms: lease_ms + rng.range(200, 700),
            local_delay_ms: rng.range(1, 3),
            wan_delay_ms: rng.range(15, 80),
            resend_after_ms: rng.range(100, 1_000),
            // Drawn after the rest, so the shapes above stay what they
            // were for every seed.
            changes_retained_bytes: *rng.pick(&[4 << 10, 64 << 10, 16 << 20]),
            resolved_tick_ms: *rng.pick(&[300, 500, 1_000]),
            changes_retained_ms: *rng.pick(&[
                3_000,
                30_000,
                harbor_types::limits::CHANGES_RETAINED_MS,
            ]),
            topology,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_drawn_shape_is_a_valid_cluster() {
        let mut rng = Rng::new(7);
        let mut shapes = std::collections::BTreeSet::new();
        for _ in 0..1_000 {
            let swarm = Swarm::draw(&mut rng);
            let t = &swarm.topology;
            assert!(swarm.sync_acks >= 1 && swarm.sync_acks < t.local_replicas);
            assert!(swarm.heartbeat_interval_ms < swarm.retransmit_timeout_ms);
            assert!(swarm.retransmit_timeout_ms < swarm.lease_ms);
            assert!(swarm.lease_ms < swarm.unreachable_after_ms);
            shapes.insert((t.regions.len(), t.local_replicas, t.remote_replicas));
        }
        // Every combination of regions, local and remote replicas comes up.
        assert_eq!(shapes.len(), 2 * 4 * 3, "{shapes:?}");
    }
}

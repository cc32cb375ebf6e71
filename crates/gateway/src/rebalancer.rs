//! Which bucket to move, if any, given the load each group's leader
//! reports (pure: the gateway's rebalancer task and the simulator both ask
//! it). A group is worth rebalancing when one bucket takes a
//! disproportionate share of its writes and moving that bucket to the
//! least-loaded group of the same home region lowers the busier of the
//! two: a group that is nothing but one hot bucket stays as it is (moving
//! it would only move the heat). At most one move per group at a time, and
//! a bucket that moved is left alone for a cool-down.

use std::collections::BTreeSet;

use harbor_types::limits;
use harbor_types::{BucketId, Region, ShardId};
use harbor_wire::LoadReport;

/// One group's load, as its leader reported it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupLoad {
    pub shard: ShardId,
    pub home_region: Region,
    pub report: LoadReport,
}

impl GroupLoad {
    /// Writes per second over the report's window.
    pub fn writes_per_s(&self) -> u64 {
        per_s(self.report.total.writes, self.report.window_ms)
    }
}

/// Writes per second of `count` writes over `window_ms`.
pub fn per_s(count: u64, window_ms: u64) -> u64 {
    count.saturating_mul(1000) / window_ms.max(1)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RebalanceLimits {
    /// Groups below this many writes per second are left alone.
    pub writes_per_s_min: u64,
    /// A bucket is hot at this share (percent) of its group's writes.
    pub hot_share_percent: u64,
}

impl Default for RebalanceLimits {
    fn default() -> Self {
        RebalanceLimits {
            writes_per_s_min: limits::REBALANCE_WRITES_PER_S_MIN,
            hot_share_percent: limits::REBALANCE_HOT_SHARE_PERCENT,
        }
    }
}

/// A move the rebalancer asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    pub bucket: BucketId,
    pub from: ShardId,
    pub to: ShardId,
    /// Why, for the log and the answer.
    pub reason: String,
}

/// The move that helps most, if one does: the busiest group (of those not
/// moving anything) whose hottest bucket is hot and not cooling down, to
/// the least-loaded group of its home region, when that lowers the busier
/// of the two. `busy`: groups in a move now; `cooling`: buckets moved too
/// recently.
pub fn plan(
    loads: &[GroupLoad],
    busy: &BTreeSet<ShardId>,
    cooling: &BTreeSet<BucketId>,
    limits: RebalanceLimits,
) -> Option<Plan> {
    let mut sources: Vec<&GroupLoad> = loads
        .iter()
        .filter(|g| !busy.contains(&g.shard))
        .filter(|g| g.writes_per_s() >= limits.writes_per_s_min)
        .collect();
    sources.sort_by_key(|g| (std::cmp::Reverse(g.writes_per_s()), g.shard));
    for source in sources {
        let total = source.report.total.writes;
        let Some((bucket, counts)) = source.report.buckets.first() else {
            continue;
        };
        let hot =
            counts.writes.saturating_mul(100) >= total.saturating_mul(limits.hot_share_percent);
        if !hot || cooling.contains(bucket) {
            continue;
        }
        let target = loads
            .iter()
            .filter(|g| g.home_region == source.home_region && g.shard != source.shard)
            .filter(|g| !busy.contains(&g.shard))
            .min_by_key(|g| (g.writes_per_s(), g.shard));
        let Some(target) = target else { continue };
        let bucket_rate = per_s(counts.writes, source.report.window_ms);
        let (source_rate, target_rate) = (source.writes_per_s(), target.writes_per_s());
        // After the move the busier of the two must be less busy than the
        // source is now.
        if target_rate + bucket_rate >= source_rate {
            continue;
        }
        return Some(Plan {
            bucket: *bucket,
            from: source.shard,
            to: target.shard,
            reason: format!(
                "{bucket} takes {bucket_rate} of {source_rate} writes/s in {}; {} takes {target_rate}",
                source.shard, target.shard
            ),
        });
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use harbor_wire::LoadCounts;

    fn group(shard: u32, region: &str, total: u64, buckets: &[(u32, u64)]) -> GroupLoad {
        let counts = |writes| LoadCounts {
            writes,
            bytes: writes * 100,
            reads: 0,
        };
        GroupLoad {
            shard: ShardId(shard),
            home_region: Region::new(region).unwrap(),
            report: LoadReport {
                window_ms: 10_000,
                total: counts(total),
                buckets: buckets
                    .iter()
                    .map(|(b, w)| (BucketId(*b), counts(*w)))
                    .collect(),
            },
        }
    }

    #[test]
    fn moves_a_hot_bucket_to_the_least_loaded_group_of_its_region() {
        let loads = vec![
            group(0, "newyork", 30_000, &[(7, 20_000), (8, 10_000)]),
            group(1, "newyork", 5_000, &[(9, 5_000)]),
            group(2, "newyork", 1_000, &[(10, 1_000)]),
            group(3, "madrid", 0, &[]),
        ];
        let (idle, cool) = (BTreeSet::new(), BTreeSet::new());
        let plan = plan(&loads, &idle, &cool, RebalanceLimits::default()).unwrap();
        assert_eq!(
            (plan.bucket, plan.from, plan.to),
            (BucketId(7), ShardId(0), ShardId(2))
        );
    }

    #[test]
    fn leaves_alone_what_would_only_move_the_heat_or_is_busy_cool_or_quiet() {
        let (none, cool) = (BTreeSet::new(), BTreeSet::new());
        let limits = RebalanceLimits::default();
        // One bucket is the whole group: moving it moves the heat.
        let alone = vec![
            group(0, "newyork", 30_000, &[(7, 30_000)]),
            group(1, "newyork", 0, &[]),
        ];
        assert_eq!(plan(&alone, &none, &cool, limits), None);
        // No bucket takes half the writes.
        let spread = vec![
            group(
                0,
                "newyork",
                30_000,
                &[(7, 10_000), (8, 10_000), (9, 10_000)],
            ),
            group(1, "newyork", 0, &[]),
        ];
        assert_eq!(plan(&spread, &none, &cool, limits), None);
        // Hot, but the group is quiet, or moving, or the bucket cools down,
        // or the only other group is in another region.
        let hot = vec![
            group(0, "newyork", 300, &[(7, 200), (8, 100)]),
            group(1, "newyork", 0, &[]),
        ];
        assert_eq!(plan(&hot, &none, &cool, limits), None);
        let hot = vec![
            group(0, "newyork", 30_000, &[(7, 20_000), (8, 10_000)]),
            group(1, "newyork", 0, &[]),
        ];
        assert!(plan(&hot, &none, &cool, limits).is_some());
        let moving: BTreeSet<ShardId> = [ShardId(1)].into();
        assert_eq!(plan(&hot, &moving, &cool, limits), None);
        let cooling: BTreeSet<BucketId> = [BucketId(7)].into();
        assert_eq!(plan(&hot, &none, &cooling, limits), None);
        let elsewhere = vec![
            group(0, "newyork", 30_000, &[(7, 20_000), (8, 10_000)]),
            group(1, "madrid", 0, &[]),
        ];
        assert_eq!(plan(&elsewhere, &none, &cool, limits), None);
    }
}

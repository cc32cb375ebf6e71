//! What a leader's buckets cost it: writes, their bytes and clients' reads
//! per bucket, counted as the leader orders them over a sliding window (the
//! last complete window and the current one: 10 to 30 s, longer windows
//! after a quiet spell), for hot-bucket detection and the rebalancer. Memory is bounded: at most `LOAD_BUCKETS_TRACKED_MAX`
//! buckets per window; others count in the group's total alone.

use std::collections::BTreeMap;

use harbor_types::limits::{LOAD_BUCKETS_TRACKED_MAX, LOAD_REPORT_BUCKETS_MAX, LOAD_WINDOW_MS};
use harbor_types::{BucketId, MonoMs};
use harbor_wire::{LoadCounts, LoadReport};

#[derive(Clone, Debug, Default)]
struct Window {
    /// `None` until the first count.
    started: Option<MonoMs>,
    total: LoadCounts,
    buckets: BTreeMap<BucketId, LoadCounts>,
}

#[derive(Clone, Debug, Default)]
pub(crate) struct BucketLoad {
    current: Window,
    previous: Option<Window>,
}

impl BucketLoad {
    /// Counts what one request cost `bucket` (`None`: the group's total).
    pub(crate) fn count(&mut self, now: MonoMs, bucket: Option<BucketId>, counts: LoadCounts) {
        self.roll(now);
        let window = &mut self.current;
        window.total.add(counts);
        let Some(bucket) = bucket else { return };
        let tracked = window.buckets.len() < LOAD_BUCKETS_TRACKED_MAX;
        if let Some(entry) = window.buckets.get_mut(&bucket) {
            entry.add(counts);
        } else if tracked {
            window.buckets.insert(bucket, counts);
        }
    }

    /// The load since the previous window began (or the current one, if
    /// there is none), with the `top` hottest buckets. Windows that would
    /// have rolled by `now` count as they would then. A bucket the group no
    /// longer takes writes for (`owned` says no: it sealed or released it)
    /// counts nowhere, not even in the total: the load that left with a
    /// moved bucket must not make the group look busier than it is.
    pub(crate) fn report(
        &self,
        now: MonoMs,
        top: u32,
        owned: impl Fn(BucketId) -> bool,
    ) -> LoadReport {
        let windows: Vec<&Window> = match self.current.started {
            None => vec![],
            Some(started) => match now.as_millis().saturating_sub(started.as_millis()) {
                age if age < LOAD_WINDOW_MS => {
                    self.previous.iter().chain([&self.current]).collect()
                }
                age if age < 2 * LOAD_WINDOW_MS => vec![&self.current],
                _ => vec![],
            },
        };
        let mut total = LoadCounts::default();
        let mut buckets: BTreeMap<BucketId, LoadCounts> = BTreeMap::new();
        for window in &windows {
            total.add(window.total);
            for (bucket, counts) in &window.buckets {
                match owned(*bucket) {
                    true => buckets.entry(*bucket).or_default().add(*counts),
                    false => total.sub(*counts),
                }
            }
        }
        let started = windows.first().and_then(|w| w.started).unwrap_or(now);
        let mut buckets: Vec<(BucketId, LoadCounts)> = buckets.into_iter().collect();
        buckets.sort_by(|(a, x), (b, y)| (y.writes, y.bytes, a).cmp(&(x.writes, x.bytes, b)));
        buckets.truncate(top.min(LOAD_REPORT_BUCKETS_MAX) as usize);
        LoadReport {
            // At least a whole window: a leader that began counting a
            // moment ago reports a rate over the window (under-reporting
            // for its first seconds) rather than a burst as a rate.
            window_ms: (now.as_millis())
                .saturating_sub(started.as_millis())
                .max(LOAD_WINDOW_MS),
            total,
            buckets,
        }
    }

    /// Starts a new window once the current one is `LOAD_WINDOW_MS` old
    /// (or after a clock that went back, which a monotonic clock does not).
    fn roll(&mut self, now: MonoMs) {
        let Some(started) = self.current.started else {
            self.current.started = Some(now);
            return;
        };
        let age = now.as_millis().saturating_sub(started.as_millis());
        if age < LOAD_WINDOW_MS {
            return;
        }
        let fresh = Window {
            started: Some(now),
            ..Window::default()
        };
        let done = std::mem::replace(&mut self.current, fresh);
        // A window with nothing after it for a whole window is stale.
        self.previous = (age < 2 * LOAD_WINDOW_MS).then_some(done);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn writes(n: u64) -> LoadCounts {
        LoadCounts {
            writes: n,
            bytes: n * 10,
            reads: 0,
        }
    }

    #[test]
    fn reports_the_hottest_buckets_over_two_windows_and_forgets_older_ones() {
        let mut load = BucketLoad::default();
        let at = MonoMs::from_millis;
        load.count(at(1), Some(BucketId(7)), writes(5));
        load.count(at(2), Some(BucketId(3)), writes(9));
        load.count(at(3), None, writes(1));
        let report = load.report(at(1_001), 10, |_| true);
        assert_eq!(
            report.window_ms, LOAD_WINDOW_MS,
            "never shorter than a window"
        );
        assert_eq!(report.total.writes, 15);
        assert_eq!(report.buckets[0], (BucketId(3), writes(9)));
        assert_eq!(report.buckets[1], (BucketId(7), writes(5)));
        // A bucket that left counts nowhere.
        let report = load.report(at(1_001), 10, |b| b != BucketId(3));
        assert_eq!(report.total.writes, 6);
        assert_eq!(report.buckets, vec![(BucketId(7), writes(5))]);
        // The next window adds to the previous one.
        load.count(at(LOAD_WINDOW_MS + 5), Some(BucketId(7)), writes(10));
        let report = load.report(at(LOAD_WINDOW_MS + 6), 1, |_| true);
        assert_eq!(report.buckets, vec![(BucketId(7), writes(15))]);
        assert_eq!(report.window_ms, LOAD_WINDOW_MS + 5);
        // Two windows on, the first one is gone; after a silence, all.
        let report = load.report(at(2 * LOAD_WINDOW_MS + 10), 10, |_| true);
        assert_eq!(report.total.writes, 10);
        let report = load.report(at(10 * LOAD_WINDOW_MS), 10, |_| true);
        assert_eq!(report.total, LoadCounts::default());
    }

    #[test]
    fn tracks_a_bounded_number_of_buckets() {
        let mut load = BucketLoad::default();
        for b in 0..(LOAD_BUCKETS_TRACKED_MAX as u32 + 10) {
            load.count(MonoMs::from_millis(1), Some(BucketId(b)), writes(1));
        }
        assert_eq!(load.current.buckets.len(), LOAD_BUCKETS_TRACKED_MAX);
        let report = load.report(MonoMs::from_millis(2), u32::MAX, |_| true);
        assert_eq!(report.total.writes, LOAD_BUCKETS_TRACKED_MAX as u64 + 10);
        assert_eq!(report.buckets.len(), LOAD_REPORT_BUCKETS_MAX as usize);
    }
}

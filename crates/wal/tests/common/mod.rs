//! Helpers shared by the WAL integration tests, and the crash oracle.
#![allow(dead_code)]

use harbor_types::{Generation, LogIndex};
use harbor_wal::{HardState, Record, Recovered, Snapshot, WalOptions};
use std::collections::BTreeMap;

/// A record whose payload length and bytes depend on (index, generation), so
/// a record recovered at the wrong place or from the wrong generation shows.
pub fn record(index: u64, generation: u64) -> Record {
    let len = ((index * 7 + generation * 3) % 41) as usize;
    let payload = (0..len)
        .map(|i| (index as u8).wrapping_mul(31) ^ (generation as u8) ^ i as u8)
        .collect();
    Record {
        index: LogIndex(index),
        generation: Generation(generation),
        payload,
    }
}

pub fn records(indexes: std::ops::RangeInclusive<u64>, generation: u64) -> Vec<Record> {
    indexes.map(|index| record(index, generation)).collect()
}

pub fn snapshot(last_index: u64, last_generation: u64) -> Snapshot {
    Snapshot {
        last_index: LogIndex(last_index),
        last_generation: Generation(last_generation),
        data: format!("state through {last_index}").into_bytes(),
        history: format!("changes through {last_index}").into_bytes(),
    }
}

/// Segments of a few records each, so every workload rolls often.
pub fn tiny_segments() -> WalOptions {
    WalOptions {
        segment_size_bytes: 160,
        ..WalOptions::default()
    }
}

pub fn indexes(records: &[Record]) -> Vec<u64> {
    records.iter().map(|r| r.index.0).collect()
}

/// What recovery after a crash may and must return, given the operations a
/// workload attempted and the ones that completed. Guards the WAL's promise:
/// everything a completed sync covered survives unless a later truncation or
/// snapshot removed it, and nothing is invented.
#[derive(Default)]
pub struct Oracle {
    /// Every version ever handed to `append` at each index, even by a call that failed.
    appended: BTreeMap<u64, Vec<Record>>,
    /// The log as the WAL holds it after the last completed call.
    log: BTreeMap<u64, Record>,
    /// Records that must survive a crash.
    must: BTreeMap<u64, Record>,
    snapshots: Vec<Snapshot>,
    /// Index of the last completed snapshot install.
    snapshot_min: u64,
    hard_generations: Vec<u64>,
    hard_min: u64,
}

impl Oracle {
    pub fn append_attempt(&mut self, records: &[Record]) {
        for r in records {
            self.appended.entry(r.index.0).or_default().push(r.clone());
        }
    }

    pub fn append_ok(&mut self, records: &[Record]) {
        for r in records {
            self.log.insert(r.index.0, r.clone());
        }
    }

    pub fn sync_ok(&mut self) {
        self.must = self.log.clone();
    }

    /// Called before the call: a failed truncation may have cut anything >= from.
    pub fn truncate_attempt(&mut self, from: u64) {
        self.must.retain(|&i, _| i < from);
        self.log.retain(|&i, _| i < from);
    }

    pub fn snapshot_attempt(&mut self, snapshot: &Snapshot) {
        self.snapshots.push(snapshot.clone());
    }

    pub fn snapshot_ok(&mut self, snapshot: &Snapshot) {
        let last = snapshot.last_index.0;
        self.snapshot_min = last;
        self.must.retain(|&i, _| i > last);
        self.log.retain(|&i, _| i > last);
    }

    pub fn hard_state_attempt(&mut self, hs: &HardState) {
        self.hard_generations.push(hs.generation.0);
    }

    pub fn hard_state_ok(&mut self, hs: &HardState) {
        self.hard_min = hs.generation.0;
    }

    /// The log the WAL holds, for comparing after a clean reopen.
    pub fn log(&self) -> Vec<Record> {
        self.log.values().cloned().collect()
    }

    /// After a successful open everything recovered is durable: it becomes
    /// the new baseline for later crashes.
    pub fn reset_to(&mut self, recovered: &Recovered) {
        self.log = recovered
            .records
            .iter()
            .map(|r| (r.index.0, r.clone()))
            .collect();
        self.must = self.log.clone();
        self.snapshot_min = recovered.snapshot.as_ref().map_or(0, |s| s.last_index.0);
        self.hard_min = recovered.hard_state.generation.0;
    }

    pub fn check(&self, recovered: &Recovered, context: &str) {
        let snapshot_index = match &recovered.snapshot {
            None => 0,
            Some(s) => {
                assert!(
                    self.snapshots.contains(s),
                    "{context}: invented snapshot at {}",
                    s.last_index
                );
                s.last_index.0
            }
        };
        assert!(
            snapshot_index >= self.snapshot_min,
            "{context}: snapshot {snapshot_index} older than the installed {}",
            self.snapshot_min
        );
        let hard = recovered.hard_state.generation.0;
        assert!(
            hard >= self.hard_min,
            "{context}: hard state {hard} < set {}",
            self.hard_min
        );
        assert!(
            hard == 0 || self.hard_generations.contains(&hard),
            "{context}: invented hard state {hard}"
        );

        let mut generation_prev = recovered
            .snapshot
            .as_ref()
            .map_or(0, |s| s.last_generation.0);
        for (i, r) in recovered.records.iter().enumerate() {
            let expected = snapshot_index + 1 + i as u64;
            assert_eq!(
                r.index.0, expected,
                "{context}: recovered log not contiguous"
            );
            let versions = self.appended.get(&r.index.0).map_or(&[][..], |v| &v[..]);
            assert!(
                versions.contains(r),
                "{context}: record {} was never appended",
                r.index
            );
            // Every truncation in the workloads is followed by a newer
            // generation, so a mix of an old suffix with new records shows here.
            assert!(
                r.generation.0 >= generation_prev,
                "{context}: generation drops to {} at {}",
                r.generation,
                r.index
            );
            generation_prev = r.generation.0;
        }
        for (index, r) in self.must.range(snapshot_index + 1..) {
            let got = recovered.records.get((index - snapshot_index - 1) as usize);
            assert_eq!(
                got,
                Some(r),
                "{context}: synced record {index} lost or changed"
            );
        }
    }
}

//! Power loss at every storage operation of a scripted workload, and random
//! operation sequences against a model, both checked by the crash oracle.

mod common;

use common::{record, records, snapshot, Oracle};
use harbor_types::{Generation, LogIndex};
use harbor_wal::{HardState, MemStorage, Record, Snapshot, Wal, WalError, WalOptions};
use proptest::prelude::*;

/// Runs one WAL call and tells the oracle what was attempted and what completed.
struct Driver<'a> {
    wal: Wal<MemStorage>,
    oracle: &'a mut Oracle,
}

impl Driver<'_> {
    fn append(&mut self, batch: &[Record]) -> Result<(), WalError> {
        self.oracle.append_attempt(batch);
        self.wal.append(batch)?;
        self.oracle.append_ok(batch);
        Ok(())
    }

    fn sync(&mut self) -> Result<(), WalError> {
        self.wal.sync()?;
        self.oracle.sync_ok();
        Ok(())
    }

    fn truncate_from(&mut self, from: u64) -> Result<(), WalError> {
        self.oracle.truncate_attempt(from);
        self.wal.truncate_from(LogIndex(from))
    }

    fn install_snapshot(&mut self, snap: &Snapshot) -> Result<(), WalError> {
        self.oracle.snapshot_attempt(snap);
        self.wal.install_snapshot(snap)?;
        self.oracle.snapshot_ok(snap);
        Ok(())
    }

    fn set_hard_state(&mut self, generation: u64) -> Result<(), WalError> {
        let hs = HardState {
            generation: Generation(generation),
            led: false,
            recovering: false,
        };
        self.oracle.hard_state_attempt(&hs);
        self.wal.set_hard_state(&hs)?;
        self.oracle.hard_state_ok(&hs);
        Ok(())
    }
}

/// Touches every crash-relevant path: rolling, group commit, truncation with
/// and without a following sync, snapshots inside and beyond the log.
fn workload(disk: &MemStorage, opts: &WalOptions, oracle: &mut Oracle) -> Result<(), WalError> {
    let (wal, _) = Wal::open(disk.clone(), opts.clone())?;
    let mut d = Driver { wal, oracle };
    d.append(&records(1..=6, 1))?;
    d.sync()?;
    d.append(&records(7..=9, 1))?;
    d.append(&records(10..=12, 1))?;
    d.sync()?;
    d.set_hard_state(2)?;
    d.truncate_from(8)?;
    d.append(&records(8..=10, 2))?;
    d.sync()?;
    d.install_snapshot(&snapshot(5, 1))?;
    d.append(&records(11..=16, 2))?;
    d.sync()?;
    d.truncate_from(14)?;
    d.append(&records(14..=15, 3))?;
    d.set_hard_state(3)?;
    d.install_snapshot(&snapshot(20, 3))?;
    d.append(&records(21..=23, 3))?;
    d.sync()?;
    d.truncate_from(22)?;
    d.sync()?;
    d.append(&records(22..=30, 4))?;
    d.install_snapshot(&snapshot(25, 4))?;
    d.sync()?;
    Ok(())
}

#[test]
fn crash_at_every_storage_operation_loses_nothing_synced() {
    // Tiny segments roll all the time; larger ones keep truncations and
    // unsynced tails inside one file.
    for segment_size_bytes in [160, 1024, 64 << 10] {
        let opts = WalOptions {
            segment_size_bytes,
            ..WalOptions::default()
        };
        crash_at_every_storage_operation(&opts);
    }
}

fn crash_at_every_storage_operation(opts: &WalOptions) {
    let total = {
        let disk = MemStorage::new();
        workload(&disk, opts, &mut Oracle::default()).expect("fault-free workload");
        disk.ops_count()
    };
    assert!(total > 50, "workload made only {total} storage operations");
    for k in 0..=total {
        for seed in 0..6u64 {
            let torn = seed % 2 == 1;
            let context = format!(
                "segments of {} bytes, crash after op {k}/{total}, seed {seed}, torn {torn}",
                opts.segment_size_bytes
            );
            let disk = MemStorage::new();
            disk.fail_writes_after(k);
            let mut oracle = Oracle::default();
            let result = workload(&disk, opts, &mut oracle);
            assert_eq!(result.is_ok(), k >= total, "{context}: {result:?}");
            disk.crash(k * 1000 + seed, torn);

            let (mut wal, recovered) = Wal::open(disk.clone(), opts.clone())
                .unwrap_or_else(|e| panic!("{context}: recovery failed: {e}"));
            oracle.check(&recovered, &context);

            // The recovered WAL works: a new record lands after its end.
            let next = record(wal.last_index().0 + 1, wal.last_generation().0 + 1);
            wal.append(std::slice::from_ref(&next)).unwrap();
            wal.sync().unwrap();
            drop(wal);
            let (_, again) = Wal::open(disk.clone(), opts.clone()).unwrap();
            assert_eq!(again.records.last(), Some(&next), "{context}");
            assert_eq!(
                again.records.len(),
                recovered.records.len() + 1,
                "{context}"
            );
        }
    }
}

/// One step of a random history.
#[derive(Clone, Debug)]
enum Op {
    Append { count: u64, generation_bump: bool },
    Sync,
    Truncate { back: u64 },
    Snapshot { back: u64, beyond: u64 },
    HardState,
    Read { from_back: u64, len: u64 },
    Reopen,
    Crash { seed: u64, torn: bool },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (1..6u64, any::<bool>()).prop_map(|(count, bump)| Op::Append { count, generation_bump: bump }),
        3 => Just(Op::Sync),
        1 => (0..8u64).prop_map(|back| Op::Truncate { back }),
        1 => (0..10u64, 0..3u64).prop_map(|(back, beyond)| Op::Snapshot { back, beyond }),
        1 => Just(Op::HardState),
        1 => (0..12u64, 0..6u64).prop_map(|(from_back, len)| Op::Read { from_back, len }),
        1 => Just(Op::Reopen),
        1 => (any::<u64>(), any::<bool>()).prop_map(|(seed, torn)| Op::Crash { seed, torn }),
    ]
}

proptest! {
    // 256 cases by default; PROPTEST_CASES=20000 for a deeper sweep.
    /// The WAL against a model log: clean reopens return exactly the model,
    /// crashes satisfy the oracle, reads agree with what was appended.
    #[test]
    fn random_histories_match_the_model(
        segment_size_bytes in 64..2048u64,
        ops in prop::collection::vec(op(), 1..60),
    ) {
        let opts = WalOptions { segment_size_bytes, ..WalOptions::default() };
        let disk = MemStorage::new();
        let mut oracle = Oracle::default();
        let (mut wal, _) = Wal::open(disk.clone(), opts.clone()).unwrap();
        let mut generation = 1;
        let mut hard = 0;
        for op in ops {
            match op {
                Op::Append { count, generation_bump } => {
                    if generation_bump {
                        generation += 1;
                    }
                    let first = wal.last_index().0 + 1;
                    let batch = records(first..=first + count - 1, generation);
                    oracle.append_attempt(&batch);
                    wal.append(&batch).unwrap();
                    oracle.append_ok(&batch);
                }
                Op::Sync => {
                    wal.sync().unwrap();
                    oracle.sync_ok();
                }
                Op::Truncate { back } => {
                    let from = wal.last_index().0.saturating_sub(back).max(wal.first_index().0);
                    oracle.truncate_attempt(from);
                    wal.truncate_from(LogIndex(from)).unwrap();
                    // A truncation means a newer leader: later records carry a newer generation.
                    generation += 1;
                }
                Op::Snapshot { back, beyond } => {
                    let last = (wal.last_index().0 + beyond).saturating_sub(back);
                    if last <= wal.snapshot_index().0 {
                        continue;
                    }
                    let snap_generation = if last <= wal.last_index().0 {
                        wal.read(LogIndex(last), LogIndex(last)).unwrap()[0].generation.0
                    } else {
                        generation += 1;
                        generation
                    };
                    let snap = snapshot(last, snap_generation);
                    oracle.snapshot_attempt(&snap);
                    wal.install_snapshot(&snap).unwrap();
                    oracle.snapshot_ok(&snap);
                    prop_assert_eq!(wal.first_index(), LogIndex(last + 1));
                }
                Op::HardState => {
                    hard += 1;
                    let hs = HardState { generation: Generation(hard), led: false, recovering: false };
                    oracle.hard_state_attempt(&hs);
                    wal.set_hard_state(&hs).unwrap();
                    oracle.hard_state_ok(&hs);
                }
                Op::Read { from_back, len } => {
                    let from = wal.last_index().0.saturating_sub(from_back).max(wal.first_index().0);
                    let to = (from + len).min(wal.last_index().0);
                    let got = wal.read(LogIndex(from), LogIndex(to)).unwrap();
                    let want: Vec<Record> = oracle.log().into_iter()
                        .filter(|r| r.index.0 >= from && r.index.0 <= to)
                        .collect();
                    prop_assert_eq!(got, want);
                }
                Op::Reopen => {
                    drop(wal);
                    let (reopened, recovered) = Wal::open(disk.clone(), opts.clone()).unwrap();
                    wal = reopened;
                    prop_assert_eq!(&recovered.records, &oracle.log());
                    prop_assert_eq!(recovered.torn_tail_bytes_cut, 0);
                    oracle.check(&recovered, "clean reopen");
                    oracle.reset_to(&recovered);
                }
                Op::Crash { seed, torn } => {
                    drop(wal);
                    disk.crash(seed, torn);
                    let (reopened, recovered) = Wal::open(disk.clone(), opts.clone()).unwrap();
                    wal = reopened;
                    oracle.check(&recovered, &format!("crash seed {seed} torn {torn}"));
                    oracle.reset_to(&recovered);
                    generation = generation.max(wal.last_generation().0);
                    hard = hard.max(recovered.hard_state.generation.0);
                }
            }
            prop_assert!(wal.last_index() >= wal.snapshot_index());
        }
    }
}

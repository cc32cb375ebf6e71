//! Behaviour of the WAL on the simulated and the real disk.

mod common;

use common::{indexes, record, records, snapshot, tiny_segments, Oracle};
use harbor_types::{Generation, LogIndex};
use harbor_wal::{
    segment_name, FileStorage, HardState, MemStorage, Storage, Wal, WalError, WalOptions,
    RECORD_HEADER_BYTES,
};

fn open_mem(disk: &MemStorage) -> (Wal<MemStorage>, harbor_wal::Recovered) {
    Wal::open(disk.clone(), tiny_segments()).expect("open")
}

fn segment_names(storage: &impl Storage) -> Vec<String> {
    let mut names: Vec<String> = storage
        .list()
        .unwrap()
        .into_iter()
        .filter(|n| n.ends_with(".seg"))
        .collect();
    names.sort();
    names
}

#[test]
fn empty_storage_opens_as_an_empty_log() {
    let (wal, recovered) = open_mem(&MemStorage::new());
    assert_eq!(recovered.snapshot, None);
    assert!(recovered.records.is_empty());
    assert_eq!(recovered.hard_state, HardState::default());
    assert_eq!(recovered.torn_tail_bytes_cut, 0);
    assert_eq!(
        (wal.first_index(), wal.last_index()),
        (LogIndex(1), LogIndex(0))
    );
    assert_eq!(wal.last_generation(), Generation::ZERO);
    assert_eq!(wal.segment_count(), 0);
}

#[test]
fn round_trip_across_many_segments_on_both_disks() {
    let dir = tempfile::tempdir().unwrap();
    let written = records(1..=200, 1);
    for storage in [0, 1] {
        let (mut wal, _) = if storage == 0 {
            let (w, r) = Wal::open(MemStorage::new(), tiny_segments()).unwrap();
            (Box::new(w) as Box<dyn WalLike>, r)
        } else {
            let disk = FileStorage::new(dir.path()).unwrap();
            let (w, r) = Wal::open(disk, tiny_segments()).unwrap();
            (Box::new(w) as Box<dyn WalLike>, r)
        };
        for chunk in written.chunks(7) {
            wal.append(chunk).unwrap();
        }
        wal.sync().unwrap();
        assert!(
            wal.segment_count() > 20,
            "only {} segments",
            wal.segment_count()
        );
        assert_eq!(wal.read(LogIndex(1), LogIndex(200)).unwrap(), written);
        assert_eq!(
            wal.read(LogIndex(57), LogIndex(61)).unwrap(),
            written[56..61]
        );
    }
    // Reopen the real directory.
    let (wal, recovered) =
        Wal::open(FileStorage::new(dir.path()).unwrap(), tiny_segments()).unwrap();
    assert_eq!(recovered.records, written);
    assert_eq!(recovered.torn_tail_bytes_cut, 0);
    assert_eq!(wal.last_index(), LogIndex(200));
    assert_eq!(wal.last_generation(), Generation(1));
}

/// Lets one test body drive the WAL over either disk.
trait WalLike {
    fn append(&mut self, records: &[harbor_wal::Record]) -> Result<(), WalError>;
    fn sync(&mut self) -> Result<(), WalError>;
    fn read(&self, from: LogIndex, to: LogIndex) -> Result<Vec<harbor_wal::Record>, WalError>;
    fn segment_count(&self) -> usize;
}

impl<S: Storage> WalLike for Wal<S> {
    fn append(&mut self, records: &[harbor_wal::Record]) -> Result<(), WalError> {
        Wal::append(self, records)
    }
    fn sync(&mut self) -> Result<(), WalError> {
        Wal::sync(self)
    }
    fn read(&self, from: LogIndex, to: LogIndex) -> Result<Vec<harbor_wal::Record>, WalError> {
        Wal::read(self, from, to)
    }
    fn segment_count(&self) -> usize {
        Wal::segment_count(self)
    }
}

#[test]
fn unsynced_appends_are_lost_cleanly_in_a_crash_without_tearing() {
    let disk = MemStorage::new();
    let (mut wal, _) = open_mem(&disk);
    wal.append(&records(1..=3, 1)).unwrap();
    wal.sync().unwrap();
    wal.append(&records(4..=4, 1)).unwrap();
    drop(wal);
    disk.crash(7, false);
    let (wal, recovered) = open_mem(&disk);
    assert_eq!(recovered.records, records(1..=3, 1));
    assert_eq!(wal.last_index(), LogIndex(3));
}

#[test]
fn torn_tail_is_cut_and_a_prefix_of_the_unsynced_records_may_survive() {
    let mut cut_seen = 0;
    let mut prefix_lengths = std::collections::BTreeSet::new();
    // One big segment, so no roll makes part of the unsynced tail durable.
    let open = |disk: &MemStorage| Wal::open(disk.clone(), WalOptions::default()).unwrap();
    for seed in 0..300 {
        let disk = MemStorage::new();
        let (mut wal, _) = open(&disk);
        let synced = records(1..=10, 1);
        let unsynced = records(11..=16, 2);
        wal.append(&synced).unwrap();
        wal.sync().unwrap();
        wal.append(&unsynced).unwrap();
        drop(wal);
        disk.crash(seed, true);

        let (mut wal, recovered) = open(&disk);
        let got = &recovered.records;
        assert_eq!(got[..10], synced[..], "seed {seed}: synced records lost");
        assert_eq!(
            got[10..],
            unsynced[..got.len() - 10],
            "seed {seed}: not a prefix"
        );
        if recovered.torn_tail_bytes_cut > 0 {
            cut_seen += 1;
        }
        prefix_lengths.insert(got.len() - 10);
        // The recovered log takes new appends where it ends.
        let next = record(got.len() as u64 + 1, 3);
        wal.append(std::slice::from_ref(&next)).unwrap();
        wal.sync().unwrap();
        drop(wal);
        let (_, again) = open(&disk);
        assert_eq!(again.records.last(), Some(&next), "seed {seed}");
        assert_eq!(again.torn_tail_bytes_cut, 0, "seed {seed}: cut twice");
    }
    assert!(cut_seen > 50, "only {cut_seen} seeds tore a record");
    assert!(
        prefix_lengths.len() > 3,
        "prefixes seen: {prefix_lengths:?}"
    );
}

#[test]
fn zero_filled_tail_on_a_real_file_is_cut() {
    let dir = tempfile::tempdir().unwrap();
    let (mut wal, _) =
        Wal::open(FileStorage::new(dir.path()).unwrap(), WalOptions::default()).unwrap();
    wal.append(&records(1..=5, 1)).unwrap();
    wal.sync().unwrap();
    drop(wal);
    let name = segment_name(LogIndex(1));
    let path = dir.path().join(&name);
    let preallocated = std::fs::metadata(&path).unwrap().len();
    let mut disk = FileStorage::new(dir.path()).unwrap();
    disk.append(&name, &[0; 4096]).unwrap();
    let (mut wal, recovered) = Wal::open(disk, WalOptions::default()).unwrap();
    assert_eq!(recovered.records, records(1..=5, 1));
    assert_eq!(
        recovered.torn_tail_bytes_cut, 0,
        "zeros are not a torn write"
    );
    let end = std::fs::metadata(&path).unwrap().len();
    assert_eq!(recovered.zero_tail_bytes_cut, preallocated + 4096 - end);
    // The log goes on where its records end, not after the zeros.
    wal.append(&records(6..=6, 1)).unwrap();
    wal.sync().unwrap();
    drop(wal);
    let (_, again) =
        Wal::open(FileStorage::new(dir.path()).unwrap(), WalOptions::default()).unwrap();
    assert_eq!(again.records, records(1..=6, 1));
    assert_eq!(again.torn_tail_bytes_cut, 0);
}

#[test]
fn appends_go_into_preallocated_zeros_and_a_finished_segment_is_cut_to_its_end() {
    let dir = tempfile::tempdir().unwrap();
    let opts = WalOptions {
        segment_size_bytes: 4096,
        preallocate_bytes: 1024,
        ..WalOptions::default()
    };
    let (mut wal, _) = Wal::open(FileStorage::new(dir.path()).unwrap(), opts.clone()).unwrap();
    let first = segment_name(LogIndex(1));
    wal.append(&records(1..=1, 1)).unwrap();
    wal.sync().unwrap();
    let size = |name: &str| std::fs::metadata(dir.path().join(name)).unwrap().len();
    let one = size(&first);
    assert!(
        one > wal.size_bytes(),
        "zeros ahead of the end: {one} bytes"
    );
    // Enough records to roll: every finished segment holds no zeros.
    for i in 2..=200 {
        wal.append(&records(i..=i, 1)).unwrap();
    }
    wal.sync().unwrap();
    assert!(wal.segment_count() > 2);
    let names = segment_names(&FileStorage::new(dir.path()).unwrap());
    let first_of = |name: &str| -> u64 { name[4..24].parse().unwrap() };
    for pair in names.windows(2) {
        let frames: u64 = (first_of(&pair[0])..first_of(&pair[1]))
            .map(|i| (RECORD_HEADER_BYTES + record(i, 1).payload.len()) as u64)
            .sum();
        assert_eq!(
            size(&pair[0]),
            frames,
            "{} holds zeros past its end",
            pair[0]
        );
    }
    let last = names.last().unwrap().clone();
    drop(wal);
    let (_, recovered) = Wal::open(FileStorage::new(dir.path()).unwrap(), opts).unwrap();
    assert_eq!(recovered.records, records(1..=200, 1));
    assert_eq!(recovered.torn_tail_bytes_cut, 0);
    assert!(
        recovered.zero_tail_bytes_cut > 0,
        "{last} had no zeros ahead"
    );
}

/// Byte offset of record `index` in a segment whose first record is `first`.
fn offset_in_segment(storage: &impl Storage, name: &str, first: u64, index: u64) -> u64 {
    let bytes = storage.read(name).unwrap();
    let mut at = 0;
    for _ in first..index {
        let len = u32::from_le_bytes(bytes[at + 4..at + 8].try_into().unwrap()) as usize;
        at += RECORD_HEADER_BYTES + len;
    }
    at as u64
}

#[test]
fn corrupt_record_followed_by_valid_ones_refuses_to_open() {
    // A flipped payload byte, a flipped length byte, a flipped crc byte.
    for field_offset in [RECORD_HEADER_BYTES as u64, 5, 1] {
        let disk = MemStorage::new();
        let (mut wal, _) = Wal::open(disk.clone(), WalOptions::default()).unwrap();
        wal.append(&records(1..=10, 1)).unwrap();
        wal.sync().unwrap();
        drop(wal);
        let name = segment_name(LogIndex(1));
        let at = offset_in_segment(&disk, &name, 1, 4);
        disk.corrupt_byte(&name, at + field_offset);
        match Wal::open(disk.clone(), WalOptions::default()) {
            Err(WalError::Corrupt { file, offset, .. }) => {
                assert_eq!(file, name);
                assert_eq!(offset, at, "field offset {field_offset}");
            }
            Err(other) => panic!("field offset {field_offset}: unexpected error {other}"),
            Ok((_, recovered)) => panic!(
                "field offset {field_offset}: opened with {:?}",
                indexes(&recovered.records)
            ),
        }
    }
}

/// Records another release wrote (whole, checksums valid, a format version
/// this binary does not know) are neither a torn tail nor damage: the WAL
/// refuses to open and changes nothing. Every record, as a wholesale
/// upgrade or downgrade would leave them, and only the last one, which a
/// torn-tail rule would otherwise cut.
#[test]
fn records_of_an_unknown_format_version_refuse_to_open_and_change_nothing() {
    for only_last in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let (mut wal, _) =
            Wal::open(FileStorage::new(dir.path()).unwrap(), WalOptions::default()).unwrap();
        wal.append(&records(1..=10, 1)).unwrap();
        wal.sync().unwrap();
        drop(wal);
        let path = dir.path().join(segment_name(LogIndex(1)));
        let mut bytes = std::fs::read(&path).unwrap();
        let mut at = 0;
        for index in 1..=10 {
            let len = u32::from_le_bytes(bytes[at + 4..at + 8].try_into().unwrap()) as usize;
            let end = at + RECORD_HEADER_BYTES + len;
            if !only_last || index == 10 {
                bytes[at + 9] = 2; // the format version
                let crc = crc32c::crc32c(&bytes[at + 4..end]);
                bytes[at..at + 4].copy_from_slice(&crc.to_le_bytes());
            }
            at = end;
        }
        std::fs::write(&path, &bytes).unwrap();
        match Wal::open(FileStorage::new(dir.path()).unwrap(), WalOptions::default()) {
            Err(WalError::UnsupportedFormat { version: 2, .. }) => {}
            Err(other) => panic!("only_last={only_last}: unexpected error {other}"),
            Ok((_, recovered)) => panic!(
                "only_last={only_last}: opened with {:?} (torn tail cut: {} bytes)",
                indexes(&recovered.records),
                recovered.torn_tail_bytes_cut
            ),
        }
        assert_eq!(
            std::fs::read(&path).unwrap(),
            bytes,
            "the segment was changed"
        );
    }
}

/// A torn frame followed by a whole record of another version is not a
/// torn tail: something whole comes after it.
#[test]
fn a_torn_frame_followed_by_another_versions_record_is_corruption() {
    let dir = tempfile::tempdir().unwrap();
    let (mut wal, _) =
        Wal::open(FileStorage::new(dir.path()).unwrap(), WalOptions::default()).unwrap();
    wal.append(&records(1..=3, 1)).unwrap();
    wal.sync().unwrap();
    drop(wal);
    let path = dir.path().join(segment_name(LogIndex(1)));
    let mut bytes = std::fs::read(&path).unwrap();
    let frame_end = |bytes: &[u8], at: usize| {
        let len = u32::from_le_bytes(bytes[at + 4..at + 8].try_into().unwrap()) as usize;
        at + RECORD_HEADER_BYTES + len
    };
    let second = frame_end(&bytes, 0);
    let third = frame_end(&bytes, second);
    let end = frame_end(&bytes, third);
    bytes[third + 9] = 7;
    let crc = crc32c::crc32c(&bytes[third + 4..end]);
    bytes[third..third + 4].copy_from_slice(&crc.to_le_bytes());
    bytes.truncate(end);
    bytes[second + RECORD_HEADER_BYTES] ^= 0xFF; // record 2 no longer checks out
    std::fs::write(&path, &bytes).unwrap();
    assert!(matches!(
        Wal::open(FileStorage::new(dir.path()).unwrap(), WalOptions::default()),
        Err(WalError::Corrupt { offset, .. }) if offset == second as u64
    ));
}

#[test]
fn corrupt_tail_of_a_non_last_segment_refuses_to_open() {
    let disk = MemStorage::new();
    let (mut wal, _) = open_mem(&disk);
    wal.append(&records(1..=30, 1)).unwrap();
    wal.sync().unwrap();
    drop(wal);
    let first = segment_names(&disk)[0].clone();
    let len = disk.read(&first).unwrap().len() as u64;
    disk.corrupt_byte(&first, len - 1);
    assert!(matches!(
        Wal::open(disk.clone(), tiny_segments()),
        Err(WalError::Corrupt { file, .. }) if file == first
    ));
}

#[test]
fn corrupt_middle_record_on_a_real_file_refuses_to_open() {
    let dir = tempfile::tempdir().unwrap();
    let (mut wal, _) =
        Wal::open(FileStorage::new(dir.path()).unwrap(), WalOptions::default()).unwrap();
    wal.append(&records(1..=10, 1)).unwrap();
    wal.sync().unwrap();
    drop(wal);
    let path = dir.path().join(segment_name(LogIndex(1)));
    let mut bytes = std::fs::read(&path).unwrap();
    let at = offset_in_segment(
        &FileStorage::new(dir.path()).unwrap(),
        &segment_name(LogIndex(1)),
        1,
        5,
    );
    bytes[at as usize + RECORD_HEADER_BYTES] ^= 0x01;
    std::fs::write(&path, &bytes).unwrap();
    let result = Wal::open(FileStorage::new(dir.path()).unwrap(), WalOptions::default());
    assert!(
        matches!(result, Err(WalError::Corrupt { offset, .. }) if offset == at),
        "{:?}",
        result.err()
    );
}

#[test]
fn missing_middle_segment_refuses_to_open() {
    let disk = MemStorage::new();
    let (mut wal, _) = open_mem(&disk);
    wal.append(&records(1..=30, 1)).unwrap();
    wal.sync().unwrap();
    drop(wal);
    let mut handle = disk.clone();
    handle.remove(&segment_names(&disk)[2]).unwrap();
    assert!(matches!(
        Wal::open(disk.clone(), tiny_segments()),
        Err(WalError::Corrupt { .. })
    ));
}

#[test]
fn failed_fsync_poisons_the_wal() {
    let disk = MemStorage::new();
    let (mut wal, _) = open_mem(&disk);
    wal.append(&records(1..=3, 1)).unwrap();
    disk.fail_next_sync();
    assert!(matches!(wal.sync(), Err(WalError::Io { op: "sync", .. })));
    // No call may pretend the lost fsync worked.
    assert!(matches!(wal.sync(), Err(WalError::Poisoned)));
    assert!(matches!(
        wal.append(&records(4..=4, 1)),
        Err(WalError::Poisoned)
    ));
    assert!(matches!(
        wal.truncate_from(LogIndex(2)),
        Err(WalError::Poisoned)
    ));
    assert!(matches!(
        wal.install_snapshot(&snapshot(2, 1)),
        Err(WalError::Poisoned)
    ));
    assert!(matches!(
        wal.set_hard_state(&HardState {
            generation: Generation(1),
            led: false,
            recovering: false,
        }),
        Err(WalError::Poisoned)
    ));
    assert!(matches!(
        wal.read(LogIndex(1), LogIndex(1)),
        Err(WalError::Poisoned)
    ));
    drop(wal);
    // The failed fsync persisted nothing: after power loss the records are gone.
    disk.crash(1, false);
    let (_, recovered) = open_mem(&disk);
    assert!(recovered.records.is_empty());
}

#[test]
fn failed_write_poisons_the_wal() {
    let disk = MemStorage::new();
    let (mut wal, _) = open_mem(&disk);
    disk.fail_writes_after(0);
    assert!(matches!(
        wal.append(&records(1..=3, 1)),
        Err(WalError::Io { .. })
    ));
    assert!(matches!(wal.sync(), Err(WalError::Poisoned)));
}

#[test]
fn truncate_then_append_a_newer_generation_survives_reopen() {
    let disk = MemStorage::new();
    let (mut wal, _) = open_mem(&disk);
    wal.append(&records(1..=20, 1)).unwrap();
    wal.sync().unwrap();
    let segments_before = wal.segment_count();
    wal.truncate_from(LogIndex(8)).unwrap();
    assert_eq!(wal.last_index(), LogIndex(7));
    assert_eq!(wal.last_generation(), Generation(1));
    assert!(wal.segment_count() < segments_before);
    wal.append(&records(8..=12, 2)).unwrap();
    wal.sync().unwrap();
    assert_eq!(
        wal.read(LogIndex(6), LogIndex(9)).unwrap(),
        [records(6..=7, 1), records(8..=9, 2)].concat()
    );
    // Beyond the end: nothing to do.
    wal.truncate_from(LogIndex(13)).unwrap();
    assert_eq!(wal.last_index(), LogIndex(12));
    drop(wal);
    let (wal, recovered) = open_mem(&disk);
    assert_eq!(
        recovered.records,
        [records(1..=7, 1), records(8..=12, 2)].concat()
    );
    assert_eq!(wal.last_generation(), Generation(2));
}

#[test]
fn truncate_everything_then_start_over() {
    let disk = MemStorage::new();
    let (mut wal, _) = open_mem(&disk);
    wal.append(&records(1..=9, 1)).unwrap();
    wal.truncate_from(LogIndex(1)).unwrap();
    assert_eq!(wal.segment_count(), 0);
    assert_eq!(
        (wal.last_index(), wal.last_generation()),
        (LogIndex(0), Generation(0))
    );
    wal.append(&records(1..=2, 2)).unwrap();
    wal.sync().unwrap();
    drop(wal);
    assert_eq!(open_mem(&disk).1.records, records(1..=2, 2));
}

#[test]
#[should_panic(expected = "does not continue the log")]
fn append_with_a_gap_is_a_bug() {
    let (mut wal, _) = open_mem(&MemStorage::new());
    wal.append(&records(1..=3, 1)).unwrap();
    let _ = wal.append(&records(5..=5, 1));
}

#[test]
#[should_panic(expected = "below the log's")]
fn append_with_an_older_generation_is_a_bug() {
    let (mut wal, _) = open_mem(&MemStorage::new());
    wal.append(&records(1..=3, 2)).unwrap();
    let _ = wal.append(&records(4..=4, 1));
}

#[test]
fn oversized_record_is_refused_before_anything_is_written() {
    let disk = MemStorage::new();
    let opts = WalOptions {
        record_size_bytes_max: 16,
        ..WalOptions::default()
    };
    let (mut wal, _) = Wal::open(disk.clone(), opts).unwrap();
    let mut batch = records(1..=2, 1);
    batch[1].payload = vec![0; 17];
    let result = wal.append(&batch);
    assert!(matches!(
        result,
        Err(WalError::RecordTooLarge {
            index: LogIndex(2),
            size_bytes: 17,
            size_bytes_max: 16
        })
    ));
    assert_eq!(wal.last_index(), LogIndex(0));
    wal.append(&batch[..1]).unwrap();
}

#[test]
fn invalid_options_are_a_typed_error() {
    for opts in [
        WalOptions {
            segment_size_bytes: 1,
            ..WalOptions::default()
        },
        WalOptions {
            record_size_bytes_max: 0,
            ..WalOptions::default()
        },
        WalOptions {
            record_size_bytes_max: u32::MAX,
            ..WalOptions::default()
        },
    ] {
        assert!(matches!(
            Wal::open(MemStorage::new(), opts),
            Err(WalError::InvalidOptions { .. })
        ));
    }
}

#[test]
fn snapshot_drops_old_segments_and_keeps_later_records() {
    let disk = MemStorage::new();
    let (mut wal, _) = open_mem(&disk);
    wal.append(&records(1..=40, 1)).unwrap();
    wal.sync().unwrap();
    let segments_before = wal.segment_count();
    let size_before = wal.size_bytes();
    wal.install_snapshot(&snapshot(30, 1)).unwrap();
    assert!(
        wal.segment_count() < segments_before,
        "{} segments",
        wal.segment_count()
    );
    assert!(wal.size_bytes() < size_before);
    assert_eq!(
        (wal.first_index(), wal.last_index()),
        (LogIndex(31), LogIndex(40))
    );
    assert!(matches!(
        wal.read(LogIndex(30), LogIndex(31)),
        Err(WalError::Compacted { .. })
    ));
    assert_eq!(
        wal.read(LogIndex(31), LogIndex(40)).unwrap(),
        records(31..=40, 1)
    );
    wal.append(&records(41..=42, 1)).unwrap();
    wal.sync().unwrap();
    drop(wal);

    let (wal, recovered) = open_mem(&disk);
    assert_eq!(recovered.snapshot, Some(snapshot(30, 1)));
    assert_eq!(recovered.records, records(31..=42, 1));
    assert_eq!(wal.first_index(), LogIndex(31));
    let snapshots = disk
        .list()
        .unwrap()
        .into_iter()
        .filter(|n| n.ends_with(".snap"))
        .count();
    assert_eq!(snapshots, 1);
}

#[test]
fn newer_snapshot_replaces_the_older_file() {
    let disk = MemStorage::new();
    let (mut wal, _) = open_mem(&disk);
    wal.append(&records(1..=20, 1)).unwrap();
    wal.install_snapshot(&snapshot(5, 1)).unwrap();
    wal.install_snapshot(&snapshot(15, 1)).unwrap();
    let snapshots: Vec<String> = disk
        .list()
        .unwrap()
        .into_iter()
        .filter(|n| n.ends_with(".snap"))
        .collect();
    assert_eq!(snapshots, [harbor_wal::snapshot_name(LogIndex(15))]);
    drop(wal);
    let (_, recovered) = open_mem(&disk);
    assert_eq!(recovered.snapshot, Some(snapshot(15, 1)));
    assert_eq!(recovered.records, records(16..=20, 1));
}

#[test]
fn snapshot_beyond_the_end_discards_the_log() {
    let disk = MemStorage::new();
    let (mut wal, _) = open_mem(&disk);
    wal.append(&records(1..=12, 1)).unwrap();
    wal.sync().unwrap();
    wal.install_snapshot(&snapshot(50, 3)).unwrap();
    assert_eq!(wal.segment_count(), 0);
    assert_eq!(
        (wal.first_index(), wal.last_index()),
        (LogIndex(51), LogIndex(50))
    );
    assert_eq!(wal.last_generation(), Generation(3));
    wal.append(&records(51..=53, 3)).unwrap();
    wal.sync().unwrap();
    drop(wal);
    let (wal, recovered) = open_mem(&disk);
    assert_eq!(recovered.snapshot, Some(snapshot(50, 3)));
    assert_eq!(recovered.records, records(51..=53, 3));
    assert_eq!(wal.last_index(), LogIndex(53));
}

#[test]
fn hard_state_is_durable_when_set() {
    let disk = MemStorage::new();
    let (mut wal, _) = open_mem(&disk);
    wal.set_hard_state(&HardState {
        generation: Generation(4),
        led: false,
        recovering: false,
    })
    .unwrap();
    wal.set_hard_state(&HardState {
        generation: Generation(6),
        led: false,
        recovering: false,
    })
    .unwrap();
    drop(wal);
    disk.crash(3, true);
    let (wal, recovered) = open_mem(&disk);
    assert_eq!(recovered.hard_state.generation, Generation(6));
    assert_eq!(wal.hard_state().generation, Generation(6));
}

#[test]
fn leftover_temp_files_are_removed_at_open() {
    let disk = MemStorage::new();
    let mut handle = disk.clone();
    handle.create("hardstate.tmp").unwrap();
    handle.append("hardstate.tmp", b"half").unwrap();
    let (_, recovered) = open_mem(&disk);
    assert_eq!(recovered.hard_state, HardState::default());
    assert!(!disk.list().unwrap().contains(&"hardstate.tmp".to_string()));
}

#[test]
fn corrupt_hard_state_or_snapshot_refuses_to_open() {
    let disk = MemStorage::new();
    let (mut wal, _) = open_mem(&disk);
    wal.append(&records(1..=5, 1)).unwrap();
    wal.install_snapshot(&snapshot(3, 1)).unwrap();
    wal.set_hard_state(&HardState {
        generation: Generation(1),
        led: false,
        recovering: false,
    })
    .unwrap();
    drop(wal);
    for name in [
        harbor_wal::HARD_STATE_NAME.to_string(),
        harbor_wal::snapshot_name(LogIndex(3)),
    ] {
        let copy = MemStorage::new();
        let mut writer = copy.clone();
        for file in disk.list().unwrap() {
            writer.create(&file).unwrap();
            writer.append(&file, &disk.read(&file).unwrap()).unwrap();
        }
        copy.corrupt_byte(&name, 9);
        assert!(
            matches!(Wal::open(copy, tiny_segments()), Err(WalError::Corrupt { ref file, .. }) if *file == name),
            "{name}"
        );
    }
}

#[test]
fn reopen_without_crash_sees_everything_written() {
    let disk = MemStorage::new();
    let mut oracle = Oracle::default();
    let (mut wal, _) = open_mem(&disk);
    let batch = records(1..=17, 1);
    oracle.append_attempt(&batch);
    wal.append(&batch).unwrap();
    oracle.append_ok(&batch);
    drop(wal);
    let (_, recovered) = open_mem(&disk);
    assert_eq!(recovered.records, oracle.log());
}

//! The WAL proper: appends, group-commit syncs, suffix truncation, snapshots
//! and recovery, over any [`Storage`].
//!
//! Crash-safety rests on four orderings, each marked where it is done:
//! 1. A segment is fsynced, and the directory too, before the next segment is
//!    created, so only the last segment can ever have a torn tail.
//! 2. A suffix truncation is made durable before new records can be written
//!    over the cut, so old and new bytes never mix in one file.
//! 3. Removing several segments syncs the directory after each removal (from
//!    the end) or treats the removed ones as dead at recovery (from the front),
//!    so a partly applied removal never leaves a gap.
//! 4. A snapshot and the hard state are written to a temp file, fsynced,
//!    renamed, and the directory fsynced: recovery sees the old or the new one.
//!
//! The active segment is preallocated with zeros ahead of its end
//! ([`WalOptions::preallocate_bytes`]), so a group commit's fsync writes
//! data into blocks the file already has instead of also committing a new
//! file size. A finished segment is cut to its end before it is synced for
//! the last time (ordering 1 keeps only the last segment with a zero tail),
//! and recovery cuts the zeros past the last record of the last one.

use crate::format::{self, FileKind, HARD_STATE_NAME, TEMP_SUFFIX};
use crate::{
    FileStorage, HardState, Record, Recovered, Snapshot, Storage, WalError, WalOptions,
    SNAPSHOT_SIZE_BYTES_MAX,
};
use harbor_types::{Generation, LogIndex};
use std::collections::BTreeSet;
use std::io;

/// One segment file.
struct Segment {
    name: String,
    first_index: LogIndex,
    /// `offsets[i]` is the byte offset of the record with index `first_index + i`.
    offsets: Vec<u64>,
    size_bytes: u64,
    /// The file's size: `size_bytes` plus preallocated zeros.
    file_bytes: u64,
}

impl Segment {
    fn new(first_index: LogIndex) -> Segment {
        Segment {
            name: format::segment_name(first_index),
            first_index,
            offsets: Vec::new(),
            size_bytes: 0,
            file_bytes: 0,
        }
    }

    /// The index of the last record, or `first_index - 1` when empty.
    fn last_index(&self) -> LogIndex {
        LogIndex(self.first_index.0 + self.offsets.len() as u64 - 1)
    }

    fn offset_of(&self, index: LogIndex) -> u64 {
        assert!(
            index >= self.first_index && index <= self.last_index(),
            "index {index} outside segment {} [{}, {}]",
            self.name,
            self.first_index,
            self.last_index()
        );
        self.offsets[(index.0 - self.first_index.0) as usize]
    }

    /// The byte just past the record at `index`.
    fn end_of(&self, index: LogIndex) -> u64 {
        if index == self.last_index() {
            self.size_bytes
        } else {
            self.offset_of(index.next())
        }
    }
}

/// The write-ahead log of one replica. See the crate docs for its promises.
pub struct Wal<S: Storage = FileStorage> {
    storage: S,
    opts: WalOptions,
    /// Ordered; each continues the previous one; only the last is appended to.
    /// The first may start at or below `snapshot_index` (its early records are dead).
    segments: Vec<Segment>,
    /// Every index <= this is covered by the durable snapshot (0: none).
    snapshot_index: LogIndex,
    snapshot_generation: Generation,
    /// >= `snapshot_index`; equal when the log holds no live record.
    last_index: LogIndex,
    last_generation: Generation,
    hard_state: HardState,
    /// Files written or cut since their last fsync.
    files_unsynced: BTreeSet<String>,
    /// A create or remove happened since the last directory fsync.
    dir_unsynced: bool,
    /// Set by any failed write or fsync: what reached the disk is unknown.
    poisoned: bool,
}

fn io_error(op: &'static str, file: &str) -> impl FnOnce(io::Error) -> WalError {
    let file = file.to_string();
    move |source| WalError::Io { op, file, source }
}

fn corrupt(file: &str, offset: u64, reason: impl Into<String>) -> WalError {
    WalError::Corrupt {
        file: file.to_string(),
        offset,
        reason: reason.into(),
    }
}

/// What scanning one segment file found.
struct Scan {
    segment: Segment,
    generation_last: Generation,
    torn_tail_bytes_cut: u64,
    zero_tail_bytes_cut: u64,
}

/// Validates every frame of one segment, appends its records above
/// `snapshot_index` to `records`, and cuts a torn tail if this is the last
/// segment. Any other damage is `Corrupt`.
fn scan_segment<S: Storage>(
    storage: &mut S,
    first: LogIndex,
    last_segment: bool,
    snapshot_index: LogIndex,
    mut generation_prev: Generation,
    records: &mut Vec<Record>,
) -> Result<Scan, WalError> {
    let mut segment = Segment::new(first);
    let name = segment.name.clone();
    let bytes = storage.read(&name).map_err(io_error("read", &name))?;
    let mut torn_tail_bytes_cut = 0;
    let mut zero_tail_bytes_cut = 0;
    let mut offset = 0;
    while offset < bytes.len() {
        let frame = match format::decode_record(&bytes[offset..]) {
            Ok(frame) => frame,
            // Written whole by another release: neither a torn tail to cut
            // nor damage, and nothing this binary may read or change.
            Err(format::FrameError::Unsupported { kind, version }) => {
                return Err(WalError::UnsupportedFormat {
                    file: name,
                    offset: offset as u64,
                    kind,
                    version,
                });
            }
            Err(format::FrameError::Invalid(reason)) => {
                if !last_segment || format::find_valid_frame(&bytes[offset + 1..]).is_some() {
                    return Err(corrupt(&name, offset as u64, reason));
                }
                // Nothing valid after it, so nothing after it was ever
                // acknowledged: preallocated zeros (the usual case), or a
                // write the crash tore.
                let tail = (bytes.len() - offset) as u64;
                if bytes[offset..].iter().all(|b| *b == 0) {
                    zero_tail_bytes_cut = tail;
                } else {
                    torn_tail_bytes_cut = tail;
                    tracing::warn!(
                        file = %name, offset, bytes = tail, %reason,
                        "cutting torn tail of the WAL"
                    );
                }
                storage
                    .set_len(&name, offset as u64)
                    .map_err(io_error("set_len", &name))?;
                break;
            }
        };
        let expected = segment.last_index().next();
        if frame.index != expected {
            let reason = format!("record index {} where {expected} was expected", frame.index);
            return Err(corrupt(&name, offset as u64, reason));
        }
        if frame.generation < generation_prev {
            let reason = format!(
                "record {} has generation {} after generation {generation_prev}",
                frame.index, frame.generation
            );
            return Err(corrupt(&name, offset as u64, reason));
        }
        generation_prev = frame.generation;
        if frame.index > snapshot_index {
            records.push(frame.to_record());
        }
        segment.offsets.push(offset as u64);
        offset += frame.frame_bytes;
    }
    segment.size_bytes = offset as u64;
    segment.file_bytes = offset as u64;
    Ok(Scan {
        segment,
        generation_last: generation_prev,
        torn_tail_bytes_cut,
        zero_tail_bytes_cut,
    })
}

impl<S: Storage> Wal<S> {
    /// Recovers the WAL in `storage` (empty storage is an empty log), cutting a
    /// torn tail and making everything it returns durable.
    pub fn open(mut storage: S, opts: WalOptions) -> Result<(Wal<S>, Recovered), WalError> {
        opts.validate()?;
        let mut segment_files = Vec::new();
        let mut snapshot_files = Vec::new();
        let mut hard_state_found = false;
        for name in storage.list().map_err(io_error("list", "."))? {
            match format::parse_file_name(&name) {
                FileKind::Segment(first) => segment_files.push((first, name)),
                FileKind::Snapshot(last) => snapshot_files.push((last, name)),
                FileKind::HardState => hard_state_found = true,
                // A rename that never happened: the old file is still the truth.
                FileKind::Temp => storage.remove(&name).map_err(io_error("remove", &name))?,
                FileKind::Other => {}
            }
        }

        let hard_state = if hard_state_found {
            let bytes = storage
                .read(HARD_STATE_NAME)
                .map_err(io_error("read", HARD_STATE_NAME))?;
            format::decode_hard_state(&bytes)
                .map_err(|reason| corrupt(HARD_STATE_NAME, 0, reason))?
        } else {
            HardState::default()
        };

        snapshot_files.sort();
        let snapshot = match snapshot_files.pop() {
            None => None,
            Some((last, name)) => {
                let bytes = storage.read(&name).map_err(io_error("read", &name))?;
                let snapshot = format::decode_snapshot(&bytes).map_err(|r| corrupt(&name, 0, r))?;
                if snapshot.last_index != last {
                    let reason = format!("holds last index {}", snapshot.last_index);
                    return Err(corrupt(&name, 0, reason));
                }
                Some(snapshot)
            }
        };
        // Older snapshots whose removal a crash interrupted.
        for (_, name) in &snapshot_files {
            storage.remove(name).map_err(io_error("remove", name))?;
        }
        let snapshot_index = snapshot.as_ref().map_or(LogIndex::ZERO, |s| s.last_index);
        let snapshot_generation = snapshot
            .as_ref()
            .map_or(Generation::ZERO, |s| s.last_generation);

        // A segment whose successor starts at or before snapshot_index + 1 holds
        // only compacted records: a snapshot install that crashed midway left it.
        segment_files.sort();
        let dead = (0..segment_files.len())
            .take_while(|&i| {
                i + 1 < segment_files.len() && segment_files[i + 1].0 <= snapshot_index.next()
            })
            .count();
        for (_, name) in segment_files.drain(..dead) {
            storage.remove(&name).map_err(io_error("remove", &name))?;
        }
        if let Some((first, name)) = segment_files.first() {
            let resume = snapshot_index.next();
            if *first > resume {
                let reason =
                    format!("log starts at {first}, but the snapshot ends at {snapshot_index}");
                return Err(corrupt(name, 0, reason));
            }
        }

        let mut segments: Vec<Segment> = Vec::new();
        let mut records = Vec::new();
        let mut torn_tail_bytes_cut = 0;
        let mut zero_tail_bytes_cut = 0;
        let mut generation_prev = Generation::ZERO;
        let segment_count = segment_files.len();
        for (position, (first, name)) in segment_files.into_iter().enumerate() {
            if let Some(prev) = segments.last() {
                if first != prev.last_index().next() {
                    let reason = format!(
                        "starts at {first}, but {} ends at {}",
                        prev.name,
                        prev.last_index()
                    );
                    return Err(corrupt(&name, 0, reason));
                }
            }
            if first == LogIndex::ZERO {
                return Err(corrupt(&name, 0, "a segment cannot start at index 0"));
            }
            let last_segment = position + 1 == segment_count;
            let scan = scan_segment(
                &mut storage,
                first,
                last_segment,
                snapshot_index,
                generation_prev,
                &mut records,
            )?;
            torn_tail_bytes_cut += scan.torn_tail_bytes_cut;
            zero_tail_bytes_cut += scan.zero_tail_bytes_cut;
            generation_prev = scan.generation_last;
            segments.push(scan.segment);
        }

        // A log that ends before the snapshot is wholly replaced by it (the
        // snapshot was beyond the log's end; its removal was interrupted).
        if segments
            .last()
            .is_some_and(|s| s.last_index() < snapshot_index)
        {
            assert!(
                records.is_empty(),
                "records above a snapshot beyond the log end"
            );
            for segment in segments.drain(..) {
                storage
                    .remove(&segment.name)
                    .map_err(io_error("remove", &segment.name))?;
            }
        }
        // What we return must be durable even if the previous process died
        // before its fsync (its writes may still sit in the page cache).
        for segment in &segments {
            storage
                .sync(&segment.name)
                .map_err(io_error("sync", &segment.name))?;
        }
        storage.sync_dir().map_err(io_error("sync_dir", "."))?;

        let (last_index, last_generation) = match records.last() {
            Some(record) => (record.index, record.generation),
            None => (snapshot_index, snapshot_generation),
        };
        for (i, record) in records.iter().enumerate() {
            assert_eq!(
                record.index.0,
                snapshot_index.0 + 1 + i as u64,
                "recovered log has a gap"
            );
        }
        let wal = Wal {
            storage,
            opts,
            segments,
            snapshot_index,
            snapshot_generation,
            last_index,
            last_generation,
            hard_state,
            files_unsynced: BTreeSet::new(),
            dir_unsynced: false,
            poisoned: false,
        };
        wal.assert_invariants();
        let recovered = Recovered {
            snapshot,
            records,
            hard_state,
            torn_tail_bytes_cut,
            zero_tail_bytes_cut,
        };
        Ok((wal, recovered))
    }

    /// Buffered append, not durable until [`Wal::sync`]. The records must
    /// continue the log (first index == `last_index() + 1`, then consecutive)
    /// with non-decreasing generations: anything else is a caller bug and panics.
    pub fn append(&mut self, records: &[Record]) -> Result<(), WalError> {
        self.check_poisoned()?;
        let mut index_prev = self.last_index;
        let mut generation_prev = self.last_generation;
        for record in records {
            assert_eq!(
                record.index,
                index_prev.next(),
                "append of record {} does not continue the log ending at {index_prev}",
                record.index
            );
            assert!(
                record.generation >= generation_prev,
                "record {} has generation {} below the log's {generation_prev}",
                record.index,
                record.generation
            );
            if record.payload.len() > self.opts.record_size_bytes_max as usize {
                return Err(WalError::RecordTooLarge {
                    index: record.index,
                    size_bytes: record.payload.len(),
                    size_bytes_max: self.opts.record_size_bytes_max,
                });
            }
            index_prev = record.index;
            generation_prev = record.generation;
        }

        // Frames for the active segment collect here and go out in one write.
        let mut buffer = Vec::new();
        for record in records {
            let frame_bytes = format::frame_bytes(record.payload.len()) as u64;
            let roll = match self.segments.last() {
                None => true,
                Some(active) => {
                    active.size_bytes > 0
                        && active.size_bytes + frame_bytes > self.opts.segment_size_bytes
                }
            };
            if roll {
                self.flush(&mut buffer)?;
                self.roll(record.index)?;
            }
            let active = self.segments.last_mut().expect("rolled above");
            assert_eq!(active.last_index().next(), record.index);
            active.offsets.push(active.size_bytes);
            active.size_bytes += frame_bytes;
            format::encode_record(&mut buffer, record);
        }
        self.flush(&mut buffer)?;
        if let Some(last) = records.last() {
            self.last_index = last.index;
            self.last_generation = last.generation;
        }
        self.assert_invariants();
        Ok(())
    }

    /// Writes the buffered frames to the active segment, first zero-filling
    /// `preallocate_bytes` ahead of them when they would pass the zeros.
    fn flush(&mut self, buffer: &mut Vec<u8>) -> Result<(), WalError> {
        if buffer.is_empty() {
            return Ok(());
        }
        let active = self.segments.last().expect("a buffer implies a segment");
        let name = active.name.clone();
        // `size_bytes` already counts the buffered frames.
        let end = active.size_bytes;
        let target = (end + self.opts.preallocate_bytes).min(self.opts.segment_size_bytes);
        if end > active.file_bytes && target > end {
            let result = self.storage.preallocate(&name, target);
            self.check_io("preallocate", &name, result)?;
            self.segments.last_mut().expect("checked above").file_bytes = target;
        }
        let result = self.storage.append(&name, buffer);
        self.check_io("append", &name, result)?;
        let active = self.segments.last_mut().expect("checked above");
        active.file_bytes = active.file_bytes.max(end);
        self.files_unsynced.insert(name);
        buffer.clear();
        Ok(())
    }

    /// Starts a new segment whose first record will be `first_index`.
    fn roll(&mut self, first_index: LogIndex) -> Result<(), WalError> {
        // Ordering 1: the finished segment, and its directory entry, are
        // durable before its successor exists, so a torn tail can only ever be
        // in the last segment and a lost segment can only be the last one.
        if let Some(active) = self.segments.last() {
            let name = active.name.clone();
            if active.file_bytes > active.size_bytes {
                let end = active.size_bytes;
                let result = self.storage.set_len(&name, end);
                self.check_io("set_len", &name, result)?;
                self.segments.last_mut().expect("checked above").file_bytes = end;
            }
            self.sync_file(&name)?;
            if self.dir_unsynced {
                self.sync_dir()?;
            }
        }
        let segment = Segment::new(first_index);
        let result = self.storage.create(&segment.name);
        self.check_io("create", &segment.name, result)?;
        self.files_unsynced.insert(segment.name.clone());
        self.dir_unsynced = true;
        self.segments.push(segment);
        Ok(())
    }

    /// Group commit: makes everything appended or truncated since the last
    /// sync durable. After a failed sync the WAL is poisoned: never retry an
    /// fsync as if the failed one had not lost data.
    pub fn sync(&mut self) -> Result<(), WalError> {
        self.check_poisoned()?;
        for name in std::mem::take(&mut self.files_unsynced) {
            self.sync_file(&name)?;
        }
        if self.dir_unsynced {
            self.sync_dir()?;
        }
        Ok(())
    }

    fn sync_file(&mut self, name: &str) -> Result<(), WalError> {
        let result = self.storage.sync(name);
        self.check_io("sync", name, result)?;
        self.files_unsynced.remove(name);
        Ok(())
    }

    fn sync_dir(&mut self) -> Result<(), WalError> {
        let result = self.storage.sync_dir();
        self.check_io("sync_dir", ".", result)?;
        self.dir_unsynced = false;
        Ok(())
    }

    fn remove_file(&mut self, name: &str) -> Result<(), WalError> {
        let result = self.storage.remove(name);
        self.check_io("remove", name, result)?;
        self.files_unsynced.remove(name);
        self.dir_unsynced = true;
        Ok(())
    }

    /// Removes every record with index >= `from` (a follower discarding a
    /// conflicting suffix). Durable when it returns (it need not wait for the
    /// next sync). `from` beyond the end is a no-op; `from` inside the
    /// snapshot is a caller bug.
    pub fn truncate_from(&mut self, from: LogIndex) -> Result<(), WalError> {
        self.check_poisoned()?;
        assert!(
            from > self.snapshot_index,
            "truncate_from({from}) reaches into the snapshot ending at {}",
            self.snapshot_index
        );
        if from > self.last_index {
            return Ok(());
        }
        // Read the new last generation before changing anything.
        let keep_last = from.prev();
        let generation_new = if keep_last == self.snapshot_index {
            self.snapshot_generation
        } else {
            self.read(keep_last, keep_last)?[0].generation
        };
        // Ordering 3: whole segments go from the end, each removal durable
        // before the next, so a crash leaves a contiguous log.
        while self.segments.last().is_some_and(|s| s.first_index >= from) {
            let segment = self.segments.pop().expect("checked above");
            self.remove_file(&segment.name)?;
            self.sync_dir()?;
        }
        if let Some(active) = self.segments.last_mut() {
            if active.last_index() >= from {
                let cut = active.offset_of(from);
                active
                    .offsets
                    .truncate((from.0 - active.first_index.0) as usize);
                active.size_bytes = cut;
                active.file_bytes = cut;
                let name = active.name.clone();
                let result = self.storage.set_len(&name, cut);
                self.check_io("set_len", &name, result)?;
                // Ordering 2: the cut is durable before new records are written
                // where the old ones were, so a crash can never leave a file
                // holding new bytes followed by resurrected old ones.
                self.sync_file(&name)?;
            }
        }
        self.last_index = keep_last;
        self.last_generation = generation_new;
        self.assert_invariants();
        Ok(())
    }

    /// Persists the snapshot atomically, then drops the segments it makes
    /// dead. Records after `last_index` stay; a snapshot beyond the log's end
    /// (a follower installing its leader's) discards the whole log, and the
    /// next append must be `last_index + 1`. Durable when it returns.
    pub fn install_snapshot(&mut self, snapshot: &Snapshot) -> Result<(), WalError> {
        self.check_poisoned()?;
        assert!(
            snapshot.last_index > self.snapshot_index,
            "snapshot at {} is not newer than the installed one at {}",
            snapshot.last_index,
            self.snapshot_index
        );
        let size_bytes = (snapshot.data.len() + snapshot.history.len()) as u64;
        if size_bytes > SNAPSHOT_SIZE_BYTES_MAX {
            return Err(WalError::SnapshotTooLarge {
                size_bytes,
                size_bytes_max: SNAPSHOT_SIZE_BYTES_MAX,
            });
        }
        let name = format::snapshot_name(snapshot.last_index);
        self.write_atomically(&name, &format::encode_snapshot(snapshot))?;

        let beyond_end = snapshot.last_index >= self.last_index;
        let snapshot_old = format::snapshot_name(self.snapshot_index);
        let snapshot_old_exists = self.snapshot_index > LogIndex::ZERO;
        self.snapshot_index = snapshot.last_index;
        self.snapshot_generation = snapshot.last_generation;
        // From the front, only segments whose successor begins at or before
        // last_index + 1; recovery treats any of them that survive a crash
        // the same way (ordering 3), so one directory fsync at the end is enough.
        let dead = if beyond_end {
            self.segments.len()
        } else {
            (0..self.segments.len())
                .take_while(|&i| {
                    i + 1 < self.segments.len()
                        && self.segments[i + 1].first_index <= snapshot.last_index.next()
                })
                .count()
        };
        for segment in self.segments.drain(..dead).collect::<Vec<_>>() {
            self.remove_file(&segment.name)?;
        }
        if snapshot_old_exists {
            self.remove_file(&snapshot_old)?;
        }
        if self.dir_unsynced {
            self.sync_dir()?;
        }
        if beyond_end {
            self.last_index = snapshot.last_index;
            self.last_generation = snapshot.last_generation;
        }
        self.assert_invariants();
        Ok(())
    }

    /// Persists the hard state; durable when it returns.
    pub fn set_hard_state(&mut self, hard_state: &HardState) -> Result<(), WalError> {
        self.check_poisoned()?;
        assert!(
            hard_state.generation >= self.hard_state.generation,
            "hard state generation {} below the stored {}",
            hard_state.generation,
            self.hard_state.generation
        );
        self.write_atomically(HARD_STATE_NAME, &format::encode_hard_state(hard_state))?;
        self.hard_state = *hard_state;
        Ok(())
    }

    /// Ordering 4: temp file, fsync, rename, directory fsync. A crash leaves
    /// the old file or the new one, never a partial one.
    fn write_atomically(&mut self, name: &str, bytes: &[u8]) -> Result<(), WalError> {
        let temp = format!("{name}{TEMP_SUFFIX}");
        let result = self.storage.create(&temp);
        self.check_io("create", &temp, result)?;
        let result = self.storage.append(&temp, bytes);
        self.check_io("append", &temp, result)?;
        self.sync_file(&temp)?;
        let result = self.storage.rename(&temp, name);
        self.check_io("rename", name, result)?;
        self.sync_dir()
    }

    /// The first live index: one past the snapshot (1 for a fresh log).
    pub fn first_index(&self) -> LogIndex {
        self.snapshot_index.next()
    }

    /// The last index in the log; the snapshot's when no record follows it; 0 when empty.
    pub fn last_index(&self) -> LogIndex {
        self.last_index
    }

    /// Generation of the record at `last_index()` (or of the snapshot).
    pub fn last_generation(&self) -> Generation {
        self.last_generation
    }

    /// Index covered by the installed snapshot (0: none).
    pub fn snapshot_index(&self) -> LogIndex {
        self.snapshot_index
    }

    /// The hard state last set (or recovered).
    pub fn hard_state(&self) -> HardState {
        self.hard_state
    }

    /// Reads records in `[from, to]` back from the segment files (a leader
    /// catching up a follower). Empty when `from > to`; `Compacted` when
    /// `from` is covered by the snapshot; `to` past the end is a caller bug.
    pub fn read(&self, from: LogIndex, to: LogIndex) -> Result<Vec<Record>, WalError> {
        self.check_poisoned()?;
        if from > to {
            return Ok(Vec::new());
        }
        if from <= self.snapshot_index {
            return Err(WalError::Compacted {
                from,
                first_index: self.first_index(),
            });
        }
        assert!(
            to <= self.last_index,
            "read to {to} past the last index {}",
            self.last_index
        );
        let mut out = Vec::with_capacity((to.0 - from.0 + 1) as usize);
        for segment in &self.segments {
            if segment.offsets.is_empty() || segment.last_index() < from || segment.first_index > to
            {
                continue;
            }
            let first = from.max(segment.first_index);
            let last = to.min(segment.last_index());
            let start = segment.offset_of(first);
            let len = usize::try_from(segment.end_of(last) - start).expect("range fits usize");
            let bytes = self
                .storage
                .read_at(&segment.name, start, len)
                .map_err(io_error("read", &segment.name))?;
            let mut at = 0;
            let mut expected = first;
            while at < bytes.len() {
                let offset = start + at as u64;
                let frame = format::decode_record(&bytes[at..])
                    .map_err(|reason| corrupt(&segment.name, offset, reason.to_string()))?;
                if frame.index != expected {
                    let reason =
                        format!("record index {} where {expected} was expected", frame.index);
                    return Err(corrupt(&segment.name, offset, reason));
                }
                out.push(frame.to_record());
                at += frame.frame_bytes;
                expected = expected.next();
            }
            assert_eq!(expected, last.next(), "segment {} read short", segment.name);
        }
        assert_eq!(
            out.len() as u64,
            to.0 - from.0 + 1,
            "read [{from}, {to}] came back short"
        );
        Ok(out)
    }

    /// Segment files currently holding the log.
    pub fn segment_count(&self) -> usize {
        self.segments.len()
    }

    /// Bytes in segment files (snapshot and hard state not included).
    pub fn size_bytes(&self) -> u64 {
        self.segments.iter().map(|s| s.size_bytes).sum()
    }

    fn check_poisoned(&self) -> Result<(), WalError> {
        if self.poisoned {
            return Err(WalError::Poisoned);
        }
        Ok(())
    }

    /// Any failed mutation poisons the WAL: the disk state is unknown.
    fn check_io<T>(
        &mut self,
        op: &'static str,
        file: &str,
        result: io::Result<T>,
    ) -> Result<T, WalError> {
        result.map_err(|source| {
            self.poisoned = true;
            tracing::error!(op, file, error = %source, "WAL IO failed; the WAL is poisoned");
            io_error(op, file)(source)
        })
    }

    fn assert_invariants(&self) {
        assert!(
            self.last_index >= self.snapshot_index,
            "last {} below snapshot {}",
            self.last_index,
            self.snapshot_index
        );
        if self.last_index == self.snapshot_index {
            assert_eq!(
                self.last_generation, self.snapshot_generation,
                "empty log after snapshot {}",
                self.snapshot_index
            );
        }
        for pair in self.segments.windows(2) {
            assert_eq!(
                pair[1].first_index,
                pair[0].last_index().next(),
                "segment {} does not continue {}",
                pair[1].name,
                pair[0].name
            );
            assert!(
                !pair[0].offsets.is_empty(),
                "non-last segment {} is empty",
                pair[0].name
            );
        }
        if let Some(first) = self.segments.first() {
            assert!(
                first.first_index <= self.snapshot_index.next(),
                "first segment {} leaves a gap",
                first.name
            );
        }
        if let Some(last) = self.segments.last() {
            assert_eq!(
                last.last_index(),
                self.last_index,
                "segments end at {} but the log at {}",
                last.last_index(),
                self.last_index
            );
        }
    }
}

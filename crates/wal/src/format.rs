//! The on-disk format: record frames, snapshot files, the hard-state file and
//! file names. Pure byte functions, so both directions are unit-tested without
//! a disk, and every check on the write side has its twin on the read side.
//!
//! All integers are little-endian. A record frame is
//!
//! ```text
//! 0   u32  crc32c of bytes [4, end): everything after this field
//! 4   u32  payload length in bytes
//! 8   u8   kind (1 = log entry)
//! 9   u8   format version (1)
//! 10  [u8;2] reserved, zero
//! 12  u32  reserved, zero
//! 16  u64  log index (> 0)
//! 24  u64  generation
//! 32  ..   payload
//! ```
//!
//! The checksum comes first so that it also covers the length: a flipped
//! length bit is caught by the checksum rather than silently re-framing the
//! rest of the segment.

use crate::{HardState, Record, Snapshot, RECORD_SIZE_BYTES_LIMIT, SNAPSHOT_SIZE_BYTES_MAX};
use harbor_types::{Generation, LogIndex};

/// Bytes of a record frame before its payload.
pub const RECORD_HEADER_BYTES: usize = 32;
const RECORD_KIND_ENTRY: u8 = 1;
const FORMAT_VERSION: u8 = 1;

/// Bytes of the first snapshot format before its data: crc, magic, index,
/// generation, length. Still read.
const SNAPSHOT_V1_HEADER_BYTES: usize = 32;
const SNAPSHOT_V1_MAGIC: [u8; 4] = *b"HSNP";
/// Bytes of a snapshot file before its data: crc, magic, index, generation,
/// data length, history length; the history follows the data.
const SNAPSHOT_HEADER_BYTES: usize = 40;
const SNAPSHOT_MAGIC: [u8; 4] = *b"HSN2";
/// Bytes of the first hard-state format: crc, magic, generation. Still read.
const HARD_STATE_V1_BYTES: usize = 16;
const HARD_STATE_V1_MAGIC: [u8; 4] = *b"HHST";
/// Bytes of the hard-state file: crc, magic, generation, flags.
const HARD_STATE_BYTES: usize = 24;
const HARD_STATE_MAGIC: [u8; 4] = *b"HHS2";
/// Flags of the hard state; any other bit set is a format this binary does
/// not know.
const HARD_STATE_FLAG_RECOVERING: u64 = 1;
const HARD_STATE_FLAG_LED: u64 = 2;

/// The file holding the [`HardState`].
pub const HARD_STATE_NAME: &str = "hardstate";
/// Suffix of a file being written before its atomic rename; leftovers are
/// deleted at open because the rename never happened.
pub const TEMP_SUFFIX: &str = ".tmp";

/// The size of the frame that holds a payload of `payload_bytes`.
pub fn frame_bytes(payload_bytes: usize) -> usize {
    RECORD_HEADER_BYTES + payload_bytes
}

/// Appends the frame of `record` to `out`.
pub fn encode_record(out: &mut Vec<u8>, record: &Record) {
    assert!(record.index > LogIndex::ZERO, "record index must be > 0");
    let payload_bytes = u32::try_from(record.payload.len()).expect("payload length fits u32");
    assert!(
        payload_bytes <= RECORD_SIZE_BYTES_LIMIT,
        "payload of {payload_bytes} bytes exceeds the format limit {RECORD_SIZE_BYTES_LIMIT}"
    );
    let start = out.len();
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(&payload_bytes.to_le_bytes());
    out.extend_from_slice(&[RECORD_KIND_ENTRY, FORMAT_VERSION, 0, 0, 0, 0, 0, 0]);
    out.extend_from_slice(&record.index.0.to_le_bytes());
    out.extend_from_slice(&record.generation.0.to_le_bytes());
    out.extend_from_slice(&record.payload);
    let crc = crc32c::crc32c(&out[start + 4..]);
    out[start..start + 4].copy_from_slice(&crc.to_le_bytes());
    assert_eq!(out.len() - start, frame_bytes(record.payload.len()));
}

/// A frame that passed every check, borrowing its payload from the buffer.
#[derive(Debug, PartialEq, Eq)]
pub struct Frame<'a> {
    pub index: LogIndex,
    pub generation: Generation,
    pub payload: &'a [u8],
    pub frame_bytes: usize,
}

impl Frame<'_> {
    pub fn to_record(&self) -> Record {
        Record {
            index: self.index,
            generation: self.generation,
            payload: self.payload.to_vec(),
        }
    }
}

fn u32_at(buf: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(buf[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_at(buf: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(buf[at..at + 8].try_into().expect("8 bytes"))
}

/// Why the bytes at an offset are not a record this binary can use.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FrameError {
    /// Not a whole, checksummed frame: torn, zero-filled or damaged (the
    /// caller tells which by what follows).
    Invalid(String),
    /// A whole frame whose checksum holds, of a kind or format version this
    /// binary does not know: written by another release. Never a torn tail.
    Unsupported { kind: u8, version: u8 },
}

impl std::fmt::Display for FrameError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FrameError::Invalid(reason) => f.write_str(reason),
            FrameError::Unsupported { kind, version } => write!(
                f,
                "a record of kind {kind}, format version {version}; this binary reads kind \
                 {RECORD_KIND_ENTRY}, version {FORMAT_VERSION}"
            ),
        }
    }
}

/// The frame length and checksum checks shared by every format version
/// (they come first in the frame, so they are what every release agrees
/// on): `Some(total frame bytes)` when a whole frame with a valid checksum
/// starts at `buf[0]`. Kind 0 is never written, so preallocated zeros are
/// never a frame.
fn checked_frame_bytes(buf: &[u8]) -> Result<usize, String> {
    if buf.len() < RECORD_HEADER_BYTES {
        return Err(format!(
            "{} bytes left, a header needs {RECORD_HEADER_BYTES}",
            buf.len()
        ));
    }
    if buf[8] == 0 {
        return Err("kind 0: not a record (zeros)".to_string());
    }
    let payload_bytes = u32_at(buf, 4);
    if payload_bytes > RECORD_SIZE_BYTES_LIMIT {
        return Err(format!(
            "payload length {payload_bytes} exceeds the format limit {RECORD_SIZE_BYTES_LIMIT}"
        ));
    }
    let total = frame_bytes(payload_bytes as usize);
    if buf.len() < total {
        return Err(format!(
            "frame of {total} bytes runs past the end ({} bytes left)",
            buf.len()
        ));
    }
    let crc_stored = u32_at(buf, 0);
    let crc_actual = crc32c::crc32c(&buf[4..total]);
    if crc_stored != crc_actual {
        return Err(format!(
            "checksum {crc_stored:#010x} != computed {crc_actual:#010x}"
        ));
    }
    Ok(total)
}

/// Decodes the frame at the start of `buf`.
pub fn decode_record(buf: &[u8]) -> Result<Frame<'_>, FrameError> {
    let total = checked_frame_bytes(buf).map_err(FrameError::Invalid)?;
    let (kind, version) = (buf[8], buf[9]);
    if kind != RECORD_KIND_ENTRY || version != FORMAT_VERSION {
        return Err(FrameError::Unsupported { kind, version });
    }
    // The checksum holds, so nonzero reserved bytes were written on purpose
    // by a release that gave them a meaning this one does not know.
    if buf[10..16] != [0; 6] {
        return Err(FrameError::Unsupported { kind, version });
    }
    let index = LogIndex(u64_at(buf, 16));
    if index == LogIndex::ZERO {
        return Err(FrameError::Invalid("record index 0".to_string()));
    }
    Ok(Frame {
        index,
        generation: Generation(u64_at(buf, 24)),
        payload: &buf[RECORD_HEADER_BYTES..total],
        frame_bytes: total,
    })
}

/// The offset of the first whole frame with a valid checksum, of any kind
/// or version, that starts anywhere in `buf`. Used after a bad frame to
/// tell a torn tail (nothing valid follows) from damage in the middle of
/// acknowledged data, or a record another release wrote (something does).
pub fn find_valid_frame(buf: &[u8]) -> Option<usize> {
    let last_start = buf.len().checked_sub(RECORD_HEADER_BYTES)?;
    // The kind byte and the length reject almost every offset before the
    // crc runs.
    (0..=last_start).find(|&at| checked_frame_bytes(&buf[at..]).is_ok())
}

pub fn encode_snapshot(snapshot: &Snapshot) -> Vec<u8> {
    let data_bytes = (snapshot.data.len() + snapshot.history.len()) as u64;
    assert!(
        data_bytes <= SNAPSHOT_SIZE_BYTES_MAX,
        "snapshot of {data_bytes} bytes exceeds {SNAPSHOT_SIZE_BYTES_MAX}"
    );
    let mut out = Vec::with_capacity(SNAPSHOT_HEADER_BYTES + data_bytes as usize);
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(&SNAPSHOT_MAGIC);
    out.extend_from_slice(&snapshot.last_index.0.to_le_bytes());
    out.extend_from_slice(&snapshot.last_generation.0.to_le_bytes());
    out.extend_from_slice(&(snapshot.data.len() as u64).to_le_bytes());
    out.extend_from_slice(&(snapshot.history.len() as u64).to_le_bytes());
    out.extend_from_slice(&snapshot.data);
    out.extend_from_slice(&snapshot.history);
    let crc = crc32c::crc32c(&out[4..]);
    out[0..4].copy_from_slice(&crc.to_le_bytes());
    assert_eq!(out.len(), SNAPSHOT_HEADER_BYTES + data_bytes as usize);
    out
}

pub fn decode_snapshot(buf: &[u8]) -> Result<Snapshot, String> {
    if buf.len() < SNAPSHOT_V1_HEADER_BYTES {
        return Err(format!(
            "snapshot file of {} bytes has no header",
            buf.len()
        ));
    }
    let crc_stored = u32_at(buf, 0);
    let crc_actual = crc32c::crc32c(&buf[4..]);
    if crc_stored != crc_actual {
        return Err(format!(
            "snapshot checksum {crc_stored:#010x} != computed {crc_actual:#010x}"
        ));
    }
    let (header_bytes, data_bytes, history_bytes) = match buf[4..8].try_into().unwrap() {
        SNAPSHOT_V1_MAGIC => (SNAPSHOT_V1_HEADER_BYTES, u64_at(buf, 24), 0),
        SNAPSHOT_MAGIC if buf.len() >= SNAPSHOT_HEADER_BYTES => {
            (SNAPSHOT_HEADER_BYTES, u64_at(buf, 24), u64_at(buf, 32))
        }
        magic => return Err(format!("bad snapshot magic {magic:?}")),
    };
    let held = (buf.len() - header_bytes) as u64;
    if data_bytes.checked_add(history_bytes) != Some(held) || held > SNAPSHOT_SIZE_BYTES_MAX {
        return Err(format!(
            "snapshot says {data_bytes} data and {history_bytes} history bytes, file holds {held}"
        ));
    }
    let history_at = header_bytes + data_bytes as usize;
    Ok(Snapshot {
        last_index: LogIndex(u64_at(buf, 8)),
        last_generation: Generation(u64_at(buf, 16)),
        data: buf[header_bytes..history_at].to_vec(),
        history: buf[history_at..].to_vec(),
    })
}

pub fn encode_hard_state(hard_state: &HardState) -> Vec<u8> {
    let mut out = Vec::with_capacity(HARD_STATE_BYTES);
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(&HARD_STATE_MAGIC);
    out.extend_from_slice(&hard_state.generation.0.to_le_bytes());
    let mut flags = 0;
    if hard_state.recovering {
        flags |= HARD_STATE_FLAG_RECOVERING;
    }
    if hard_state.led {
        flags |= HARD_STATE_FLAG_LED;
    }
    out.extend_from_slice(&flags.to_le_bytes());
    let crc = crc32c::crc32c(&out[4..]);
    out[0..4].copy_from_slice(&crc.to_le_bytes());
    assert_eq!(out.len(), HARD_STATE_BYTES);
    out
}

pub fn decode_hard_state(buf: &[u8]) -> Result<HardState, String> {
    if buf.len() != HARD_STATE_BYTES && buf.len() != HARD_STATE_V1_BYTES {
        return Err(format!(
            "hard state is {} bytes, expected {HARD_STATE_BYTES} (or {HARD_STATE_V1_BYTES})",
            buf.len()
        ));
    }
    let crc_stored = u32_at(buf, 0);
    let crc_actual = crc32c::crc32c(&buf[4..]);
    if crc_stored != crc_actual {
        return Err(format!(
            "hard state checksum {crc_stored:#010x} != computed {crc_actual:#010x}"
        ));
    }
    let generation = Generation(u64_at(buf, 8));
    if buf.len() == HARD_STATE_V1_BYTES {
        if buf[4..8] != HARD_STATE_V1_MAGIC {
            return Err(format!("bad hard state magic {:?}", &buf[4..8]));
        }
        return Ok(HardState {
            generation,
            ..HardState::default()
        });
    }
    if buf[4..8] != HARD_STATE_MAGIC {
        return Err(format!("bad hard state magic {:?}", &buf[4..8]));
    }
    let flags = u64_at(buf, 16);
    if flags & !(HARD_STATE_FLAG_RECOVERING | HARD_STATE_FLAG_LED) != 0 {
        return Err(format!("unknown hard state flags {flags:#x}"));
    }
    Ok(HardState {
        generation,
        led: flags & HARD_STATE_FLAG_LED != 0,
        recovering: flags & HARD_STATE_FLAG_RECOVERING != 0,
    })
}

/// `wal-{first_index:020}.seg`: zero-padded so names sort like indexes.
pub fn segment_name(first_index: LogIndex) -> String {
    format!("wal-{:020}.seg", first_index.0)
}

/// `snapshot-{last_index:020}.snap`.
pub fn snapshot_name(last_index: LogIndex) -> String {
    format!("snapshot-{:020}.snap", last_index.0)
}

/// What a file in the WAL directory is, judged by its name alone.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FileKind {
    Segment(LogIndex),
    Snapshot(LogIndex),
    HardState,
    Temp,
    /// Not ours (an editor backup, `lost+found`): left alone.
    Other,
}

fn parse_padded_index(text: &str) -> Option<LogIndex> {
    if text.len() != 20 || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok().map(LogIndex)
}

pub fn parse_file_name(name: &str) -> FileKind {
    if name.ends_with(TEMP_SUFFIX) {
        return FileKind::Temp;
    }
    if name == HARD_STATE_NAME {
        return FileKind::HardState;
    }
    if let Some(index) = name
        .strip_prefix("wal-")
        .and_then(|rest| rest.strip_suffix(".seg"))
        .and_then(parse_padded_index)
    {
        return FileKind::Segment(index);
    }
    if let Some(index) = name
        .strip_prefix("snapshot-")
        .and_then(|rest| rest.strip_suffix(".snap"))
        .and_then(parse_padded_index)
    {
        return FileKind::Snapshot(index);
    }
    FileKind::Other
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(index: u64, generation: u64, payload: &[u8]) -> Record {
        Record {
            index: LogIndex(index),
            generation: Generation(generation),
            payload: payload.to_vec(),
        }
    }

    #[test]
    fn record_round_trips_and_every_single_byte_flip_is_caught() {
        let mut buf = Vec::new();
        encode_record(&mut buf, &record(7, 3, b"hello"));
        let frame = decode_record(&buf).unwrap();
        assert_eq!(frame.to_record(), record(7, 3, b"hello"));
        assert_eq!(frame.frame_bytes, buf.len());
        for at in 0..buf.len() {
            let mut bad = buf.clone();
            bad[at] ^= 0x40;
            assert!(decode_record(&bad).is_err(), "flip at {at} went unnoticed");
        }
    }

    #[test]
    fn truncated_and_zero_filled_frames_are_rejected() {
        let mut buf = Vec::new();
        encode_record(&mut buf, &record(1, 1, b"abc"));
        for len in 0..buf.len() {
            assert!(
                decode_record(&buf[..len]).is_err(),
                "prefix of {len} bytes accepted"
            );
        }
        assert!(decode_record(&[0; 64]).is_err());
        assert_eq!(find_valid_frame(&[0; 256]), None);
    }

    /// A record whose checksum holds but whose version (or kind, or
    /// reserved bytes) this binary does not know is another release's,
    /// never damage: and a scan after a torn frame still sees it.
    #[test]
    fn a_record_of_another_format_version_is_unsupported_not_invalid() {
        let mut buf = Vec::new();
        encode_record(&mut buf, &record(3, 1, b"future"));
        for (at, value) in [(9, FORMAT_VERSION + 1), (8, RECORD_KIND_ENTRY + 1), (12, 1)] {
            let mut other = buf.clone();
            other[at] = value;
            let crc = crc32c::crc32c(&other[4..]);
            other[0..4].copy_from_slice(&crc.to_le_bytes());
            assert!(
                matches!(decode_record(&other), Err(FrameError::Unsupported { .. })),
                "byte {at} = {value}: {:?}",
                decode_record(&other)
            );
            let mut after_garbage = vec![0xAB; 5];
            after_garbage.extend_from_slice(&other);
            assert_eq!(find_valid_frame(&after_garbage), Some(5));
        }
    }

    #[test]
    fn find_valid_frame_sees_a_frame_after_garbage() {
        let mut buf = vec![0xAB; 13];
        encode_record(&mut buf, &record(2, 1, b"xyz"));
        assert_eq!(find_valid_frame(&buf), Some(13));
        assert_eq!(find_valid_frame(&buf[14..]), None);
    }

    #[test]
    fn snapshot_and_hard_state_round_trip_and_reject_flips() {
        let snapshot = Snapshot {
            last_index: LogIndex(9),
            last_generation: Generation(2),
            data: b"state".to_vec(),
            history: b"changes".to_vec(),
        };
        let buf = encode_snapshot(&snapshot);
        assert_eq!(decode_snapshot(&buf).unwrap(), snapshot);
        for at in 0..buf.len() {
            let mut bad = buf.clone();
            bad[at] ^= 1;
            assert!(
                decode_snapshot(&bad).is_err(),
                "snapshot flip at {at} unnoticed"
            );
        }
        assert!(decode_snapshot(&buf[..buf.len() - 1]).is_err());

        // The first format (no history) is still read.
        let mut v1 = Vec::new();
        v1.extend_from_slice(&[0; 4]);
        v1.extend_from_slice(b"HSNP");
        v1.extend_from_slice(&9u64.to_le_bytes());
        v1.extend_from_slice(&2u64.to_le_bytes());
        v1.extend_from_slice(&5u64.to_le_bytes());
        v1.extend_from_slice(b"state");
        let crc = crc32c::crc32c(&v1[4..]);
        v1[0..4].copy_from_slice(&crc.to_le_bytes());
        let read = decode_snapshot(&v1).unwrap();
        assert_eq!((read.data, read.history), (b"state".to_vec(), Vec::new()));

        for (led, recovering) in [(false, true), (true, false), (true, true)] {
            let hard_state = HardState {
                generation: Generation(5),
                led,
                recovering,
            };
            let buf = encode_hard_state(&hard_state);
            assert_eq!(decode_hard_state(&buf).unwrap(), hard_state);
        }
        let hard_state = HardState {
            generation: Generation(5),
            led: false,
            recovering: true,
        };
        let buf = encode_hard_state(&hard_state);
        for at in 0..buf.len() {
            let mut bad = buf.clone();
            bad[at] ^= 1;
            assert!(
                decode_hard_state(&bad).is_err(),
                "hard state flip at {at} unnoticed"
            );
        }
    }

    #[test]
    fn file_names_parse_back() {
        assert_eq!(segment_name(LogIndex(42)), "wal-00000000000000000042.seg");
        assert_eq!(
            parse_file_name(&segment_name(LogIndex(42))),
            FileKind::Segment(LogIndex(42))
        );
        assert_eq!(
            parse_file_name(&snapshot_name(LogIndex(u64::MAX))),
            FileKind::Snapshot(LogIndex(u64::MAX))
        );
        assert_eq!(parse_file_name("hardstate"), FileKind::HardState);
        assert_eq!(parse_file_name("hardstate.tmp"), FileKind::Temp);
        assert_eq!(parse_file_name("wal-42.seg"), FileKind::Other);
        assert_eq!(
            parse_file_name("wal-0000000000000000004x.seg"),
            FileKind::Other
        );
        assert_eq!(parse_file_name("notes.txt"), FileKind::Other);
    }
}

//! A process's claim on its data directory (`harbor dev`, a node, a
//! metadata voter): an exclusive lock, so two processes never write the
//! same WALs, and a format marker, so a binary never reads (or "repairs")
//! data written in a format it does not know.
//!
//! The directory holds two files of ours besides the data:
//! - `HARBOR_FORMAT`: `format = N` and `kind = "dev" | "node" | "meta"`,
//!   written once, atomically, when the directory is first used;
//! - `LOCK`: held with an exclusive advisory lock (`flock`) for the life
//!   of the process, and naming the holder's pid for the error message.
//!
//! Every refusal happens before anything in the directory is read as data
//! or changed, and says what to do.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

/// The data format this binary writes and reads. Bump it with any change
/// to what is on disk that an older binary would misread.
pub const DATA_FORMAT: u32 = 1;
pub const FORMAT_FILE: &str = "HARBOR_FORMAT";
pub const LOCK_FILE: &str = "LOCK";

/// What a data directory holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DataKind {
    /// `harbor dev`: every node and the metadata voter of the embedded cluster.
    Dev,
    /// `harbor node`: one node's replicas.
    Node,
    /// `harbor meta`: one metadata voter.
    Meta,
}

impl DataKind {
    pub fn as_str(self) -> &'static str {
        match self {
            DataKind::Dev => "dev",
            DataKind::Node => "node",
            DataKind::Meta => "meta",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DataDirError {
    #[error("{dir}: cannot {op}: {source}")]
    Io {
        dir: PathBuf,
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{dir} is in use by another Harbor process{holder}; stop it first \
         (two processes must never write the same data)"
    )]
    InUse { dir: PathBuf, holder: String },
    #[error(
        "{dir} holds data of format {found}; this binary reads format {DATA_FORMAT} \
         (use the Harbor release that wrote it); nothing was changed"
    )]
    UnknownFormat { dir: PathBuf, found: String },
    #[error("{dir} is a {found} data directory, not a {expected} one; nothing was changed")]
    WrongKind {
        dir: PathBuf,
        found: String,
        expected: &'static str,
    },
    #[error(
        "{dir} is not empty but has no {FORMAT_FILE} file and is not laid out as a Harbor \
         data directory of this kind; use an empty directory (nothing was changed)"
    )]
    Unmarked { dir: PathBuf },
}

/// Held for as long as the process uses the directory; dropping it
/// releases the lock (so does the process's death, however it dies).
#[derive(Debug)]
pub struct DataDir {
    _lock: File,
}

impl DataDir {
    /// Claims `path` for `kind`, creating and marking it when it is new or
    /// empty.
    pub fn open(path: &Path, kind: DataKind) -> Result<DataDir, DataDirError> {
        let io = |op| {
            let dir = path.to_path_buf();
            move |source| DataDirError::Io { dir, op, source }
        };
        // A directory of another format or kind is refused before the lock
        // file is created in it.
        let marked = read_marker(path, kind)?;
        fs::create_dir_all(path).map_err(io("create the directory"))?;
        let lock_path = path.join(LOCK_FILE);
        let mut lock = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&lock_path)
            .map_err(io("open its LOCK file"))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => {
                let holder = fs::read_to_string(&lock_path)
                    .ok()
                    .map(|pid| pid.trim().to_string())
                    .filter(|pid| !pid.is_empty())
                    .map(|pid| format!(" (pid {pid})"))
                    .unwrap_or_default();
                return Err(DataDirError::InUse {
                    dir: path.to_path_buf(),
                    holder,
                });
            }
            Err(fs::TryLockError::Error(source)) => {
                return Err(io("lock its LOCK file")(source));
            }
        }
        lock.set_len(0).map_err(io("write its LOCK file"))?;
        writeln!(lock, "{}", std::process::id()).map_err(io("write its LOCK file"))?;
        if !marked {
            // Under the lock now: nobody else can be marking it.
            if read_marker(path, kind)? {
                return Ok(DataDir { _lock: lock });
            }
            let names: Vec<String> = fs::read_dir(path)
                .map_err(io("list the directory"))?
                .filter_map(Result::ok)
                .map(|entry| entry.file_name().to_string_lossy().into_owned())
                .filter(|name| name != LOCK_FILE)
                .collect();
            if !names.is_empty() && written_before_markers(kind, &names) {
                // Format 1 is what Harbor wrote before it marked its
                // directories: adopt it rather than make an operator
                // start over.
                tracing::warn!(
                    dir = %path.display(), kind = kind.as_str(),
                    "adopting a data directory written before data directories carried a format marker"
                );
            } else if !names.is_empty() {
                // Leave it as it was found: the lock file goes too.
                drop(lock);
                let _ = fs::remove_file(&lock_path);
                return Err(DataDirError::Unmarked {
                    dir: path.to_path_buf(),
                });
            }
            write_marker(path, kind).map_err(io("write its format file"))?;
        }
        Ok(DataDir { _lock: lock })
    }
}

/// Whether a directory without a marker holds exactly what Harbor wrote
/// there before markers existed (the same format, 1): `nodes/` and
/// `metadata/` for `harbor dev`, `shard-N/` replica directories for a node,
/// the Raft log files for a voter. Anything else is not adopted.
fn written_before_markers(kind: DataKind, names: &[String]) -> bool {
    let known = |name: &str| match kind {
        DataKind::Dev => name == "nodes" || name == "metadata",
        DataKind::Node => name
            .strip_prefix("shard-")
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit())),
        DataKind::Meta => matches!(
            name,
            "raft-log.jsonl" | "vote.json" | "purged.json" | "committed.json" | "snapshot.json"
        ),
    };
    names.iter().all(|name| known(name))
}

/// `Ok(true)` when `path` carries a marker of this format and kind,
/// `Ok(false)` when it has none (or does not exist).
fn read_marker(path: &Path, kind: DataKind) -> Result<bool, DataDirError> {
    let file = path.join(FORMAT_FILE);
    let text = match fs::read_to_string(&file) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(source) => {
            return Err(DataDirError::Io {
                dir: path.to_path_buf(),
                op: "read its format file",
                source,
            })
        }
    };
    #[derive(serde::Deserialize)]
    struct Marker {
        format: toml::Value,
        kind: Option<String>,
    }
    let unknown = |found: String| DataDirError::UnknownFormat {
        dir: path.to_path_buf(),
        found,
    };
    let marker: Marker = toml::from_str(&text)
        .map_err(|_| unknown(format!("unreadable ({FORMAT_FILE}: {:?})", text.trim())))?;
    if marker.format.as_integer() != Some(i64::from(DATA_FORMAT)) {
        return Err(unknown(marker.format.to_string()));
    }
    let found = marker.kind.unwrap_or_default();
    if found != kind.as_str() {
        return Err(DataDirError::WrongKind {
            dir: path.to_path_buf(),
            found,
            expected: kind.as_str(),
        });
    }
    Ok(true)
}

/// Written to a temp file, synced, renamed, and the directory synced: a
/// crash leaves the marker whole or absent.
fn write_marker(path: &Path, kind: DataKind) -> std::io::Result<()> {
    let text = format!(
        "# A Harbor data directory. Written once; do not edit.\nformat = {DATA_FORMAT}\nkind = \"{}\"\n",
        kind.as_str()
    );
    harbor_types::durable_file::replace(&path.join(FORMAT_FILE), &[text.as_bytes()])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_directory_is_marked_and_locked_and_reopens_after_release() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data");
        let held = DataDir::open(&path, DataKind::Node).unwrap();
        assert!(path.join(FORMAT_FILE).exists());
        let second = DataDir::open(&path, DataKind::Node).unwrap_err();
        assert!(matches!(second, DataDirError::InUse { .. }), "{second}");
        assert!(second.to_string().contains(&std::process::id().to_string()));
        drop(held);
        DataDir::open(&path, DataKind::Node).unwrap();
    }

    /// What Harbor wrote before markers existed is format 1: adopted.
    #[test]
    fn a_directory_written_before_markers_is_adopted() {
        let dir = tempfile::tempdir().unwrap();
        let node = dir.path().join("node");
        fs::create_dir_all(node.join("shard-3")).unwrap();
        fs::write(node.join("shard-3").join("hardstate"), b"x").unwrap();
        DataDir::open(&node, DataKind::Node).unwrap();
        assert!(node.join(FORMAT_FILE).exists());
        let dev = dir.path().join("dev");
        fs::create_dir_all(dev.join("nodes")).unwrap();
        fs::create_dir_all(dev.join("metadata")).unwrap();
        DataDir::open(&dev, DataKind::Dev).unwrap();
        // A node directory is not a dev one.
        let other = dir.path().join("other");
        fs::create_dir_all(other.join("shard-1")).unwrap();
        assert!(matches!(
            DataDir::open(&other, DataKind::Dev),
            Err(DataDirError::Unmarked { .. })
        ));
    }

    #[test]
    fn another_format_kind_or_unmarked_data_is_refused_and_left_as_it_was() {
        let dir = tempfile::tempdir().unwrap();
        type Expected = fn(&DataDirError) -> bool;
        let cases: [(&str, Option<&str>, Expected); 4] = [
            ("newer", Some("format = 2\nkind = \"node\"\n"), |e| {
                matches!(e, DataDirError::UnknownFormat { .. })
            }),
            ("garbled", Some("\u{0}\u{1}binary"), |e| {
                matches!(e, DataDirError::UnknownFormat { .. })
            }),
            ("meta", Some("format = 1\nkind = \"meta\"\n"), |e| {
                matches!(e, DataDirError::WrongKind { .. })
            }),
            ("unmarked", None, |e| {
                matches!(e, DataDirError::Unmarked { .. })
            }),
        ];
        for (name, marker, expected) in cases {
            let path = dir.path().join(name);
            fs::create_dir_all(path.join("shard3")).unwrap();
            fs::write(path.join("shard3").join("wal-1.seg"), b"data").unwrap();
            if let Some(marker) = marker {
                fs::write(path.join(FORMAT_FILE), marker).unwrap();
            }
            let listing = |p: &Path| {
                let mut names: Vec<_> = fs::read_dir(p)
                    .unwrap()
                    .map(|e| e.unwrap().file_name())
                    .collect();
                names.sort();
                names
            };
            let before = listing(&path);
            let error = DataDir::open(&path, DataKind::Node).unwrap_err();
            assert!(expected(&error), "{name}: {error}");
            assert!(error.to_string().contains("nothing was changed"), "{error}");
            assert_eq!(listing(&path), before, "{name}: the directory changed");
        }
    }
}

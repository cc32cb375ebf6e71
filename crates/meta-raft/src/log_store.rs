//! The Raft log of the metadata plane, on local disk. Metadata changes are
//! rare (a failover, a new issuer), so the log is kept whole in memory and
//! on disk as JSON lines: an append is a write and an fsync; a truncation
//! or a purge (rare) rewrites the file atomically. The vote, the purge point
//! and the committed position are small files written atomically.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::ops::RangeBounds;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use openraft::storage::{LogFlushed, RaftLogStorage};
use openraft::{
    Entry, LogId, LogState, OptionalSend, RaftLogId, RaftLogReader, StorageError, StorageIOError,
    Vote,
};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::types::{NodeId, TypeConfig};

const LOG_FILE: &str = "raft-log.jsonl";
const VOTE_FILE: &str = "vote.json";
const PURGED_FILE: &str = "purged.json";
const COMMITTED_FILE: &str = "committed.json";

/// Cloned handles share one log (the reader Raft asks for is a clone).
#[derive(Clone)]
pub struct LogStore {
    inner: Arc<Mutex<Inner>>,
}

struct Inner {
    dir: PathBuf,
    file: File,
    entries: BTreeMap<u64, Entry<TypeConfig>>,
    purged: Option<LogId<NodeId>>,
    vote: Option<Vote<NodeId>>,
    committed: Option<LogId<NodeId>>,
}

type Result<T> = std::result::Result<T, StorageError<NodeId>>;

fn write_err(e: impl std::error::Error + 'static) -> StorageError<NodeId> {
    StorageIOError::write_logs(&e).into()
}

impl LogStore {
    /// Opens (or creates) the log in `dir`. A last line without its newline
    /// was never acknowledged: it is cut. Any other unreadable line is
    /// corruption and refuses the start.
    pub fn open(dir: &Path) -> io::Result<LogStore> {
        fs::create_dir_all(dir)?;
        let path = dir.join(LOG_FILE);
        let mut entries = BTreeMap::new();
        match fs::read(&path) {
            Ok(bytes) => {
                let complete = bytes
                    .iter()
                    .rposition(|b| *b == b'\n')
                    .map_or(0, |end| end + 1);
                if complete < bytes.len() {
                    let file = OpenOptions::new().write(true).open(&path)?;
                    file.set_len(complete as u64)?;
                    file.sync_all()?;
                }
                for (n, line) in bytes[..complete].split(|b| *b == b'\n').enumerate() {
                    if line.is_empty() {
                        continue;
                    }
                    let entry: Entry<TypeConfig> = serde_json::from_slice(line).map_err(|e| {
                        io::Error::new(
                            io::ErrorKind::InvalidData,
                            format!("{} line {}: {e}", path.display(), n + 1),
                        )
                    })?;
                    entries.insert(entry.get_log_id().index, entry);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let file = OpenOptions::new().create(true).append(true).open(&path)?;
        tracing::info!(
            dir = %dir.display(),
            entries = entries.len(),
            first = ?entries.keys().next(),
            last = ?entries.keys().next_back(),
            "recovered the metadata log"
        );
        Ok(LogStore {
            inner: Arc::new(Mutex::new(Inner {
                dir: dir.to_path_buf(),
                file,
                entries,
                purged: read_json(&dir.join(PURGED_FILE))?,
                vote: read_json(&dir.join(VOTE_FILE))?,
                committed: read_json(&dir.join(COMMITTED_FILE))?,
            })),
        })
    }
}

impl Inner {
    /// Rewrites the log file from memory: temp file, fsync, rename.
    fn rewrite(&mut self) -> io::Result<()> {
        let mut bytes = Vec::new();
        for entry in self.entries.values() {
            serde_json::to_writer(&mut bytes, entry)?;
            bytes.push(b'\n');
        }
        write_atomically(&self.dir, LOG_FILE, &bytes)?;
        self.file = OpenOptions::new()
            .append(true)
            .open(self.dir.join(LOG_FILE))?;
        Ok(())
    }
}

pub(crate) fn read_json<T: DeserializeOwned>(path: &Path) -> io::Result<Option<T>> {
    match fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{}: {e}", path.display()),
            )
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

pub(crate) fn write_json<T: Serialize>(dir: &Path, name: &str, value: &T) -> io::Result<()> {
    write_atomically(dir, name, &serde_json::to_vec(value)?)
}

/// temp file, fsync, rename, fsync the directory.
pub(crate) fn write_atomically(dir: &Path, name: &str, bytes: &[u8]) -> io::Result<()> {
    harbor_types::durable_file::replace(&dir.join(name), &[bytes])
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<TypeConfig>>> {
        let inner = self.inner.lock().unwrap();
        Ok(inner.entries.range(range).map(|(_, e)| e.clone()).collect())
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>> {
        let inner = self.inner.lock().unwrap();
        let last = inner
            .entries
            .values()
            .next_back()
            .map(|e| *e.get_log_id())
            .or(inner.purged);
        Ok(LogState {
            last_purged_log_id: inner.purged,
            last_log_id: last,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<()> {
        let mut inner = self.inner.lock().unwrap();
        write_json(&inner.dir, VOTE_FILE, vote)
            .map_err(|e| StorageError::from(StorageIOError::write_vote(&e)))?;
        inner.vote = Some(*vote);
        Ok(())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>> {
        Ok(self.inner.lock().unwrap().vote)
    }

    async fn save_committed(&mut self, committed: Option<LogId<NodeId>>) -> Result<()> {
        let mut inner = self.inner.lock().unwrap();
        write_json(&inner.dir, COMMITTED_FILE, &committed).map_err(write_err)?;
        inner.committed = committed;
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<NodeId>>> {
        Ok(self.inner.lock().unwrap().committed)
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> Result<()>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut inner = self.inner.lock().unwrap();
        let mut bytes = Vec::new();
        let entries: Vec<Entry<TypeConfig>> = entries.into_iter().collect();
        for entry in &entries {
            serde_json::to_writer(&mut bytes, entry).map_err(write_err)?;
            bytes.push(b'\n');
        }
        let written = inner
            .file
            .write_all(&bytes)
            .and_then(|()| inner.file.sync_data());
        if let Err(e) = written {
            // The file may hold part of the batch now: never acknowledge it.
            let message = e.to_string();
            callback.log_io_completed(Err(e));
            return Err(write_err(io::Error::other(message)));
        }
        for entry in entries {
            inner.entries.insert(entry.get_log_id().index, entry);
        }
        callback.log_io_completed(Ok(()));
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> Result<()> {
        let mut inner = self.inner.lock().unwrap();
        inner.entries.retain(|index, _| *index < log_id.index);
        inner.rewrite().map_err(write_err)
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> Result<()> {
        let mut inner = self.inner.lock().unwrap();
        // The purge point first: a crash between the two leaves entries the
        // purge point already covers, which is harmless.
        write_json(&inner.dir, PURGED_FILE, &log_id).map_err(write_err)?;
        inner.purged = Some(log_id);
        inner.entries.retain(|index, _| *index > log_id.index);
        inner.rewrite().map_err(write_err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::{CommittedLeaderId, EntryPayload};

    fn entry(index: u64) -> Entry<TypeConfig> {
        Entry {
            log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
            payload: EntryPayload::Normal(harbor_meta::MetaCommand::BeginEpoch),
        }
    }

    #[tokio::test]
    async fn a_torn_last_line_is_cut_and_a_bad_middle_line_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(LOG_FILE);
        let mut bytes = Vec::new();
        for index in 1..=2 {
            serde_json::to_writer(&mut bytes, &entry(index)).unwrap();
            bytes.push(b'\n');
        }
        let whole = bytes.len();
        bytes.extend_from_slice(b"{\"log_id\":{\"lea");
        fs::write(&path, &bytes).unwrap();
        let mut log = LogStore::open(dir.path()).unwrap();
        let state = log.get_log_state().await.unwrap();
        assert_eq!(state.last_log_id.map(|l| l.index), Some(2));
        assert_eq!(fs::metadata(&path).unwrap().len(), whole as u64);
        drop(log);

        let mut corrupt = b"garbage\n".to_vec();
        corrupt.extend(fs::read(&path).unwrap());
        fs::write(&path, corrupt).unwrap();
        let err = LogStore::open(dir.path())
            .err()
            .expect("corruption refused");
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    }
}

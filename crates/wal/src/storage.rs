//! The disk as the WAL sees it: one flat directory of named files and only
//! the operations the WAL needs, so the simulator can substitute a disk that
//! loses unsynced writes ([`crate::MemStorage`]).

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// A flat directory of named files.
///
/// Durability contract, the one POSIX gives: file contents written by
/// `append`/`set_len` survive a crash only after `sync(name)` returned Ok, and a
/// `create`/`rename`/`remove` survives only after `sync_dir` returned Ok.
/// Until then a crash may keep any prefix of the unsynced bytes and any subset
/// of the unsynced directory operations.
pub trait Storage {
    /// Names of every file in the directory, in no particular order.
    fn list(&self) -> io::Result<Vec<String>>;
    /// The whole content of a file.
    fn read(&self, name: &str) -> io::Result<Vec<u8>>;
    /// Exactly `len` bytes from `offset`.
    fn read_at(&self, name: &str, offset: u64, len: usize) -> io::Result<Vec<u8>>;
    /// Creates an empty file, replacing any file of that name.
    fn create(&mut self, name: &str) -> io::Result<()>;
    /// Appends bytes at the end of an existing file.
    fn append(&mut self, name: &str, data: &[u8]) -> io::Result<()>;
    /// Cuts (or zero-extends) a file to `len_bytes`.
    fn set_len(&mut self, name: &str, len_bytes: u64) -> io::Result<()>;
    /// Makes a file's content durable (fsync).
    fn sync(&mut self, name: &str) -> io::Result<()>;
    /// Atomically renames a file, replacing `to` if it exists.
    fn rename(&mut self, from: &str, to: &str) -> io::Result<()>;
    fn remove(&mut self, name: &str) -> io::Result<()>;
    /// Makes every earlier create, rename and remove durable (fsync of the directory).
    fn sync_dir(&mut self) -> io::Result<()>;
}

/// Names are flat: a path separator would escape the directory.
pub(crate) fn assert_flat_name(name: &str) {
    assert!(
        !name.is_empty() && name != "." && name != ".." && !name.contains('/'),
        "storage file name {name:?} is not a flat file name"
    );
}

/// Open append handles kept at most; clean ones are dropped past this.
const FILE_HANDLES_MAX: usize = 16;

struct Handle {
    file: File,
    /// Written since its last successful fsync. A dirty handle is never
    /// dropped: after a failed writeback Linux reports the error only to
    /// descriptors that were open when it happened, so a fresh descriptor's
    /// fsync could wrongly succeed.
    dirty: bool,
}

/// Real files in one directory, with real fsyncs.
pub struct FileStorage {
    dir: PathBuf,
    handles: HashMap<String, Handle>,
}

impl FileStorage {
    /// Opens (creating if missing) the directory that holds the WAL.
    pub fn new(dir: impl Into<PathBuf>) -> io::Result<FileStorage> {
        let dir = dir.into();
        fs::create_dir_all(&dir)?;
        Ok(FileStorage {
            dir,
            handles: HashMap::new(),
        })
    }

    /// The directory this storage lives in.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn path(&self, name: &str) -> PathBuf {
        assert_flat_name(name);
        self.dir.join(name)
    }

    fn handle(&mut self, name: &str) -> io::Result<&mut Handle> {
        if !self.handles.contains_key(name) {
            if self.handles.len() >= FILE_HANDLES_MAX {
                self.handles.retain(|_, handle| handle.dirty);
            }
            let file = OpenOptions::new().append(true).open(self.path(name))?;
            self.handles
                .insert(name.to_string(), Handle { file, dirty: false });
        }
        Ok(self.handles.get_mut(name).expect("inserted above"))
    }
}

impl Storage for FileStorage {
    fn list(&self) -> io::Result<Vec<String>> {
        let mut names = Vec::new();
        for entry in fs::read_dir(&self.dir)? {
            let entry = entry?;
            if !entry.file_type()?.is_file() {
                continue;
            }
            if let Ok(name) = entry.file_name().into_string() {
                names.push(name);
            }
        }
        Ok(names)
    }

    fn read(&self, name: &str) -> io::Result<Vec<u8>> {
        fs::read(self.path(name))
    }

    fn read_at(&self, name: &str, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        let mut file = File::open(self.path(name))?;
        file.seek(SeekFrom::Start(offset))?;
        let mut buf = vec![0; len];
        file.read_exact(&mut buf)?;
        Ok(buf)
    }

    fn create(&mut self, name: &str) -> io::Result<()> {
        self.handles.remove(name);
        // O_APPEND so that writes after a set_len land at the new end, not at
        // a stale file position (which would leave a hole).
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.path(name))?;
        file.set_len(0)?;
        if self.handles.len() >= FILE_HANDLES_MAX {
            self.handles.retain(|_, handle| handle.dirty);
        }
        self.handles
            .insert(name.to_string(), Handle { file, dirty: true });
        Ok(())
    }

    fn append(&mut self, name: &str, data: &[u8]) -> io::Result<()> {
        let handle = self.handle(name)?;
        handle.dirty = true;
        handle.file.write_all(data)
    }

    fn set_len(&mut self, name: &str, len_bytes: u64) -> io::Result<()> {
        let handle = self.handle(name)?;
        handle.dirty = true;
        handle.file.set_len(len_bytes)
    }

    fn sync(&mut self, name: &str) -> io::Result<()> {
        let handle = self.handle(name)?;
        handle.file.sync_data()?;
        handle.dirty = false;
        Ok(())
    }

    fn rename(&mut self, from: &str, to: &str) -> io::Result<()> {
        fs::rename(self.path(from), self.path(to))?;
        self.handles.remove(to);
        if let Some(handle) = self.handles.remove(from) {
            self.handles.insert(to.to_string(), handle);
        }
        Ok(())
    }

    fn remove(&mut self, name: &str) -> io::Result<()> {
        self.handles.remove(name);
        fs::remove_file(self.path(name))
    }

    fn sync_dir(&mut self) -> io::Result<()> {
        File::open(&self.dir)?.sync_all()
    }
}

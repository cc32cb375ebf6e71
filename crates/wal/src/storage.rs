//! The disk as the WAL sees it: one flat directory of named files and only
//! the operations the WAL needs, so the simulator can substitute a disk that
//! loses unsynced writes ([`crate::MemStorage`]).

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// A flat directory of named files.
///
/// Durability contract, the one POSIX gives: file contents written by
/// `append`/`set_len`/`preallocate` survive a crash only after `sync(name)`
/// returned Ok, and a `create`/`rename`/`remove` survives only after
/// `sync_dir` returned Ok. Until then a crash may keep any prefix of the
/// unsynced bytes and any subset of the unsynced directory operations.
///
/// A file has an end (where the next `append` writes) and, past it, may have
/// zeros that [`Storage::preallocate`] put there; reads see them, and so
/// does a reopen after a crash, which cannot tell where the end was.
pub trait Storage {
    /// Names of every file in the directory, in no particular order.
    fn list(&self) -> io::Result<Vec<String>>;
    /// The whole content of a file.
    fn read(&self, name: &str) -> io::Result<Vec<u8>>;
    /// Exactly `len` bytes from `offset`.
    fn read_at(&self, name: &str, offset: u64, len: usize) -> io::Result<Vec<u8>>;
    /// Creates an empty file, replacing any file of that name.
    fn create(&mut self, name: &str) -> io::Result<()>;
    /// Writes bytes at the end of an existing file (over preallocated zeros).
    fn append(&mut self, name: &str, data: &[u8]) -> io::Result<()>;
    /// Cuts (or zero-extends) a file to `len_bytes`, preallocated zeros
    /// included; the end is then `len_bytes`.
    fn set_len(&mut self, name: &str, len_bytes: u64) -> io::Result<()>;
    /// Writes zeros past the end so the file is at least `len_bytes` long,
    /// without moving the end. Appends then overwrite blocks the file
    /// already has, and their fsync need not commit a new file size (on
    /// ext4, about a third of the cost of an fsync that grows the file).
    fn preallocate(&mut self, name: &str, len_bytes: u64) -> io::Result<()>;
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
    /// Where the next append writes.
    end: u64,
    /// The file's size: `end` plus preallocated zeros. A handle with zeros
    /// past its end is never dropped either: only it knows where the end is.
    size: u64,
}

impl Handle {
    fn droppable(&self) -> bool {
        !self.dirty && self.size == self.end
    }
}

/// Zeros written per call while preallocating.
static ZEROS: [u8; 64 << 10] = [0; 64 << 10];

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
                self.handles.retain(|_, handle| !handle.droppable());
            }
            let file = OpenOptions::new().write(true).open(self.path(name))?;
            // Opened afresh, a file's end is its size: zeros past the end of
            // an earlier life are data to whoever opens it (recovery cuts them).
            let size = file.metadata()?.len();
            self.handles.insert(
                name.to_string(),
                Handle {
                    file,
                    dirty: false,
                    end: size,
                    size,
                },
            );
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
        let file = OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .open(self.path(name))?;
        if self.handles.len() >= FILE_HANDLES_MAX {
            self.handles.retain(|_, handle| !handle.droppable());
        }
        self.handles.insert(
            name.to_string(),
            Handle {
                file,
                dirty: true,
                end: 0,
                size: 0,
            },
        );
        Ok(())
    }

    fn append(&mut self, name: &str, data: &[u8]) -> io::Result<()> {
        let handle = self.handle(name)?;
        handle.dirty = true;
        // Positional writes at our own end: a failed write leaves `end`
        // where it was, and the next one overwrites whatever it left.
        handle.file.write_all_at(data, handle.end)?;
        handle.end += data.len() as u64;
        handle.size = handle.size.max(handle.end);
        Ok(())
    }

    fn set_len(&mut self, name: &str, len_bytes: u64) -> io::Result<()> {
        let handle = self.handle(name)?;
        handle.dirty = true;
        handle.file.set_len(len_bytes)?;
        handle.end = len_bytes;
        handle.size = len_bytes;
        Ok(())
    }

    fn preallocate(&mut self, name: &str, len_bytes: u64) -> io::Result<()> {
        let handle = self.handle(name)?;
        while handle.size < len_bytes {
            let n = (len_bytes - handle.size).min(ZEROS.len() as u64) as usize;
            handle.dirty = true;
            handle.file.write_all_at(&ZEROS[..n], handle.size)?;
            handle.size += n as u64;
        }
        Ok(())
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

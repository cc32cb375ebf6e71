//! A simulated disk that remembers what is durable and what is only in the
//! page cache, so a test can pull the plug and see what a real power loss
//! could leave behind. Deterministic from a seed.

use crate::storage::{assert_flat_name, Storage};
use std::collections::{BTreeMap, HashMap};
use std::io;
use std::sync::{Arc, Mutex, MutexGuard};

/// Bytes at the end of a torn write that may be garbled: one small sector's worth.
const TORN_GARBLE_BYTES_MAX: usize = 16;

/// A cloneable handle to one simulated disk; every clone sees the same files,
/// so a test keeps a handle after the `Wal` that used it is dropped.
#[derive(Clone, Default)]
pub struct MemStorage {
    disk: Arc<Mutex<MemDisk>>,
}

#[derive(Default)]
struct MemDisk {
    inodes: HashMap<u64, Inode>,
    inode_next: u64,
    /// The directory as reads see it.
    names: BTreeMap<String, u64>,
    /// The directory as it was at the last successful `sync_dir`.
    names_durable: BTreeMap<String, u64>,
    /// Directory operations since the last `sync_dir`, oldest first.
    dir_ops_unsynced: Vec<DirOp>,
    /// Mutating operations (writes, directory changes, syncs) that succeeded.
    ops_count: u64,
    /// When set, how many more mutating operations succeed before all fail.
    ops_left: Option<u64>,
    sync_fail_next: bool,
}

#[derive(Clone, Default)]
struct Inode {
    /// What reads see, preallocated zeros included.
    current: Vec<u8>,
    /// What was there at the last successful sync of this file.
    durable: Vec<u8>,
    /// Where the next append writes (`current` may go on with zeros).
    end: usize,
}

enum DirOp {
    Link { name: String, inode: u64 },
    Unlink { name: String },
    Rename { from: String, to: String },
}

/// splitmix64: tiny, good enough for fault choices, and needs no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..bound` (`bound` > 0); the modulo bias is irrelevant here.
    fn below(&mut self, bound: usize) -> usize {
        assert!(bound > 0, "below(0)");
        (self.next() % bound as u64) as usize
    }

    fn coin(&mut self) -> bool {
        self.next() & 1 == 1
    }
}

fn not_found(name: &str) -> io::Error {
    io::Error::new(io::ErrorKind::NotFound, format!("no file {name:?}"))
}

impl MemDisk {
    /// The fault point every mutating operation passes through.
    fn begin_op(&mut self) -> io::Result<()> {
        if let Some(left) = self.ops_left {
            if left == 0 {
                return Err(io::Error::other("simulated disk failure"));
            }
            self.ops_left = Some(left - 1);
        }
        self.ops_count += 1;
        Ok(())
    }

    fn inode(&self, name: &str) -> io::Result<&Inode> {
        let inode = self.names.get(name).ok_or_else(|| not_found(name))?;
        Ok(&self.inodes[inode])
    }

    fn inode_mut(&mut self, name: &str) -> io::Result<&mut Inode> {
        let inode = self.names.get(name).ok_or_else(|| not_found(name))?;
        Ok(self.inodes.get_mut(inode).expect("linked inode exists"))
    }
}

/// What of one file survives power loss. Without `torn`: exactly what was
/// synced. With `torn`: the unsynced change reached the disk only in part. New
/// bytes up to a random point overwrote the old ones, the last few of them may
/// be garbage, and the file size is the old or the new one (a new size whose
/// data never arrived reads as zeros).
fn crash_content(inode: &Inode, rng: &mut Rng, torn: bool) -> Vec<u8> {
    let (durable, current) = (&inode.durable, &inode.current);
    if !torn || current == durable {
        return durable.clone();
    }
    let common = durable
        .iter()
        .zip(current)
        .take_while(|(old, new)| old == new)
        .count();
    // Bytes past the last change (preallocated zeros both have) are not
    // part of the write: a torn write stops somewhere in what changed.
    let changed_end = (common..current.len())
        .rev()
        .find(|&i| durable.get(i) != Some(&current[i]))
        .map_or(current.len(), |i| i + 1);
    let written = common + rng.below(changed_end - common + 1);
    let mut out = current[..written].to_vec();
    if durable.len() > written {
        out.extend_from_slice(&durable[written..]);
    }
    if written > common && rng.coin() {
        let window = (written - common).min(TORN_GARBLE_BYTES_MAX);
        for _ in 0..=rng.below(window) {
            let at = written - 1 - rng.below(window);
            out[at] ^= (rng.next() as u8) | 1;
        }
    }
    let size = if rng.coin() {
        current.len()
    } else {
        durable.len().max(written)
    };
    out.resize(size, 0);
    out
}

impl MemStorage {
    /// An empty disk.
    pub fn new() -> MemStorage {
        MemStorage::default()
    }

    fn disk(&self) -> MutexGuard<'_, MemDisk> {
        self.disk.lock().expect("MemStorage mutex poisoned")
    }

    /// Makes the next `sync` or `sync_dir` fail, persisting nothing.
    pub fn fail_next_sync(&self) {
        self.disk().sync_fail_next = true;
    }

    /// After `n` more mutating operations (append, set_len, preallocate,
    /// create, rename, remove, sync, sync_dir) every mutating operation fails: the disk died.
    pub fn fail_writes_after(&self, n: u64) {
        self.disk().ops_left = Some(n);
    }

    /// Mutating operations that have succeeded so far: the fault points a
    /// crash test can stop at.
    pub fn ops_count(&self) -> u64 {
        self.disk().ops_count
    }

    /// Power loss: unsynced bytes are lost (with `torn`, a random prefix of
    /// each unsynced tail may survive, possibly ending in garbage or zeros),
    /// and each unsynced directory operation survives or not by a coin flip.
    /// Clears injected faults: the disk comes back up.
    pub fn crash(&self, rng_seed: u64, torn: bool) {
        let mut rng = Rng(rng_seed);
        let mut disk = self.disk();
        let mut names = disk.names_durable.clone();
        for op in std::mem::take(&mut disk.dir_ops_unsynced) {
            if !rng.coin() {
                continue;
            }
            match op {
                DirOp::Link { name, inode } => {
                    names.insert(name, inode);
                }
                DirOp::Unlink { name } => {
                    names.remove(&name);
                }
                DirOp::Rename { from, to } => {
                    if let Some(inode) = names.remove(&from) {
                        names.insert(to, inode);
                    }
                }
            }
        }
        let mut inodes = HashMap::new();
        for inode in names.values() {
            if !inodes.contains_key(inode) {
                let content = crash_content(&disk.inodes[inode], &mut rng, torn);
                // After a crash nobody knows where the end was: it is the size.
                inodes.insert(
                    *inode,
                    Inode {
                        end: content.len(),
                        current: content.clone(),
                        durable: content,
                    },
                );
            }
        }
        disk.inodes = inodes;
        disk.names = names.clone();
        disk.names_durable = names;
        disk.ops_left = None;
        disk.sync_fail_next = false;
    }

    /// Bit rot: flips every bit of one byte, durably.
    pub fn corrupt_byte(&self, name: &str, offset: u64) {
        let mut disk = self.disk();
        let inode = disk.inode_mut(name).expect("corrupt_byte: no such file");
        let at = usize::try_from(offset).expect("offset fits usize");
        assert!(
            at < inode.current.len(),
            "corrupt_byte: offset {at} past the end {}",
            inode.current.len()
        );
        inode.current[at] ^= 0xFF;
        if at < inode.durable.len() {
            inode.durable[at] ^= 0xFF;
        }
    }
}

impl Storage for MemStorage {
    fn list(&self) -> io::Result<Vec<String>> {
        Ok(self.disk().names.keys().cloned().collect())
    }

    fn read(&self, name: &str) -> io::Result<Vec<u8>> {
        Ok(self.disk().inode(name)?.current.clone())
    }

    fn read_at(&self, name: &str, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        let disk = self.disk();
        let current = &disk.inode(name)?.current;
        let start = usize::try_from(offset).map_err(io::Error::other)?;
        match start.checked_add(len) {
            Some(end) if end <= current.len() => Ok(current[start..end].to_vec()),
            _ => Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "read of {len} bytes at {start} past the end {}",
                    current.len()
                ),
            )),
        }
    }

    fn create(&mut self, name: &str) -> io::Result<()> {
        assert_flat_name(name);
        let mut disk = self.disk();
        disk.begin_op()?;
        let inode = disk.inode_next;
        disk.inode_next += 1;
        disk.inodes.insert(inode, Inode::default());
        disk.names.insert(name.to_string(), inode);
        disk.dir_ops_unsynced.push(DirOp::Link {
            name: name.to_string(),
            inode,
        });
        Ok(())
    }

    fn append(&mut self, name: &str, data: &[u8]) -> io::Result<()> {
        let mut disk = self.disk();
        disk.begin_op()?;
        let inode = disk.inode_mut(name)?;
        let (start, end) = (inode.end, inode.end + data.len());
        if inode.current.len() < end {
            inode.current.resize(end, 0);
        }
        inode.current[start..end].copy_from_slice(data);
        inode.end = end;
        Ok(())
    }

    fn set_len(&mut self, name: &str, len_bytes: u64) -> io::Result<()> {
        let mut disk = self.disk();
        disk.begin_op()?;
        let len = usize::try_from(len_bytes).map_err(io::Error::other)?;
        let inode = disk.inode_mut(name)?;
        inode.current.resize(len, 0);
        inode.end = len;
        Ok(())
    }

    fn preallocate(&mut self, name: &str, len_bytes: u64) -> io::Result<()> {
        let mut disk = self.disk();
        disk.begin_op()?;
        let len = usize::try_from(len_bytes).map_err(io::Error::other)?;
        let inode = disk.inode_mut(name)?;
        if inode.current.len() < len {
            inode.current.resize(len, 0);
        }
        Ok(())
    }

    fn sync(&mut self, name: &str) -> io::Result<()> {
        let mut disk = self.disk();
        disk.begin_op()?;
        if std::mem::take(&mut disk.sync_fail_next) {
            return Err(io::Error::other("simulated fsync failure"));
        }
        let inode = disk.inode_mut(name)?;
        inode.durable = inode.current.clone();
        Ok(())
    }

    fn rename(&mut self, from: &str, to: &str) -> io::Result<()> {
        assert_flat_name(to);
        let mut disk = self.disk();
        disk.begin_op()?;
        let inode = disk.names.remove(from).ok_or_else(|| not_found(from))?;
        disk.names.insert(to.to_string(), inode);
        disk.dir_ops_unsynced.push(DirOp::Rename {
            from: from.to_string(),
            to: to.to_string(),
        });
        Ok(())
    }

    fn remove(&mut self, name: &str) -> io::Result<()> {
        let mut disk = self.disk();
        disk.begin_op()?;
        disk.names.remove(name).ok_or_else(|| not_found(name))?;
        disk.dir_ops_unsynced.push(DirOp::Unlink {
            name: name.to_string(),
        });
        Ok(())
    }

    fn sync_dir(&mut self) -> io::Result<()> {
        let mut disk = self.disk();
        disk.begin_op()?;
        if std::mem::take(&mut disk.sync_fail_next) {
            return Err(io::Error::other("simulated fsync failure"));
        }
        disk.names_durable = disk.names.clone();
        disk.dir_ops_unsynced.clear();
        // No crash can bring back an unlinked inode any more: free it.
        let MemDisk { inodes, names, .. } = &mut *disk;
        inodes.retain(|inode, _| names.values().any(|linked| linked == inode));
        Ok(())
    }
}

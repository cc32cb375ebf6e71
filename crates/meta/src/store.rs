use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use harbor_types::{BucketId, Generation, IssuerId, NodeId, Region, ShardId};
use serde::{Deserialize, Serialize};

use crate::placement::{ShardMap, Topology};
use crate::state::{MetaCommand, MetaReply, MetaState};

const MAP_FILE: &str = "shard-map.json";
const DIRECTORY_FILE: &str = "directory.jsonl";

#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    #[error("metadata {op} failed on {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("metadata file {path} is corrupt: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    #[error("metadata change refused: {0}")]
    Refused(String),
}

/// Expected refusals of the issuer directory.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum DirectoryError {
    #[error("issuer {issuer_id} is homed in {existing}, not {requested}; moving an issuer is not supported yet")]
    HomeRegionMismatch {
        issuer_id: IssuerId,
        existing: Region,
        requested: Region,
    },
    #[error("region {region} is not part of this cluster")]
    UnknownRegion { region: Region },
}

/// Where an issuer lives.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirectoryEntry {
    pub issuer_id: IssuerId,
    pub home_region: Region,
    pub bucket: BucketId,
}

/// The embedded metadata store: the [`MetaState`] of one voter, kept durable
/// on local disk with fsync (the shard map as one file, the issuer directory
/// as an append-only file).
pub struct MetaStore {
    dir: PathBuf,
    /// Writers hold its write lock for the whole change, disk included.
    state: RwLock<MetaState>,
    /// The map readers see: swapped whole after each change.
    map: RwLock<Arc<ShardMap>>,
    directory_file: Mutex<File>,
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> MetaError + 'a {
    move |source| MetaError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

impl MetaStore {
    /// Opens the store in `dir`, creating the cluster from `topology` on
    /// first start.
    pub fn open(dir: &Path, topology: &Topology) -> Result<MetaStore, MetaError> {
        fs::create_dir_all(dir).map_err(io_err("create_dir", dir))?;
        let map_path = dir.join(MAP_FILE);
        let map = if map_path.exists() {
            let bytes = fs::read(&map_path).map_err(io_err("read", &map_path))?;
            serde_json::from_slice(&bytes).map_err(|e| MetaError::Corrupt {
                path: map_path.clone(),
                reason: e.to_string(),
            })?
        } else {
            let mut state = MetaState::default();
            state.apply(&MetaCommand::Bootstrap(topology.clone()));
            let map = state.map.expect("bootstrapped");
            write_atomically(dir, MAP_FILE, &serde_json::to_vec_pretty(&map).unwrap())?;
            map
        };
        let dir_path = dir.join(DIRECTORY_FILE);
        let directory = load_directory(&dir_path)?;
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&dir_path)
            .map_err(io_err("open", &dir_path))?;
        Ok(MetaStore {
            dir: dir.to_path_buf(),
            map: RwLock::new(Arc::new(map.clone())),
            state: RwLock::new(MetaState {
                map: Some(map),
                directory,
            }),
            directory_file: Mutex::new(file),
        })
    }

    pub fn map(&self) -> Arc<ShardMap> {
        self.map.read().unwrap().clone()
    }

    /// Applies a map change and makes it durable before anyone sees it.
    fn change_map(&self, command: MetaCommand) -> Result<Arc<ShardMap>, MetaError> {
        let mut state = self.state.write().unwrap();
        let mut next = state.clone();
        if let MetaReply::Refused(reason) = next.apply(&command) {
            return Err(MetaError::Refused(reason));
        }
        let map = next.map.clone().expect("bootstrapped");
        write_atomically(
            &self.dir,
            MAP_FILE,
            &serde_json::to_vec_pretty(&map).unwrap(),
        )?;
        *state = next;
        let map = Arc::new(map);
        *self.map.write().unwrap() = map.clone();
        Ok(map)
    }

    /// Starts a new epoch: every group gets the next generation with the same
    /// leader. Called when the embedded cluster starts, so a restarted leader
    /// never continues a generation it may have half-written.
    pub fn begin_epoch(&self) -> Result<Arc<ShardMap>, MetaError> {
        self.change_map(MetaCommand::BeginEpoch)
    }

    /// Publishes a group's new leader and generation (a failover, a transfer
    /// or a restarted leader), durably, with a new map version.
    pub fn update_group(
        &self,
        shard: ShardId,
        leader: &NodeId,
        generation: Generation,
    ) -> Result<Arc<ShardMap>, MetaError> {
        self.change_map(MetaCommand::UpdateGroup {
            shard,
            leader: leader.clone(),
            generation,
        })
    }

    pub fn lookup(&self, issuer: &IssuerId) -> Option<DirectoryEntry> {
        self.state.read().unwrap().directory.get(issuer).cloned()
    }

    pub fn shard_of(&self, issuer: &IssuerId) -> Option<ShardId> {
        let entry = self.lookup(issuer)?;
        Some(self.map().shard_of_bucket(entry.bucket))
    }

    /// Places a new issuer (durably) or returns its existing entry. `created`
    /// tells which.
    pub fn assign(
        &self,
        issuer: &IssuerId,
        home_region: &Region,
    ) -> Result<Result<(DirectoryEntry, bool), DirectoryError>, MetaError> {
        let command = MetaCommand::Assign {
            issuer_id: issuer.clone(),
            home_region: home_region.clone(),
        };
        if let Some(existing) = self.lookup(issuer) {
            // The common case, without the write lock.
            if existing.home_region == *home_region {
                return Ok(Ok((existing, false)));
            }
        }
        let mut state = self.state.write().unwrap();
        let mut next = state.clone();
        let (entry, created) = match next.apply(&command) {
            MetaReply::Assigned(Ok(assigned)) => assigned,
            MetaReply::Assigned(Err(e)) => return Ok(Err(e)),
            other => unreachable!("assign answered {other:?}"),
        };
        if created {
            let path = self.dir.join(DIRECTORY_FILE);
            let mut line = serde_json::to_vec(&entry).unwrap();
            line.push(b'\n');
            let mut file = self.directory_file.lock().unwrap();
            file.write_all(&line).map_err(io_err("append", &path))?;
            file.sync_data().map_err(io_err("fsync", &path))?;
            *state = next;
        }
        Ok(Ok((entry, created)))
    }

    pub fn issuer_count(&self) -> usize {
        self.state.read().unwrap().directory.len()
    }
}

/// One JSON object per line. A last line without its newline was never
/// acknowledged (the append or its fsync did not finish): it is ignored. Any
/// other unreadable line is corruption.
fn load_directory(path: &Path) -> Result<BTreeMap<IssuerId, DirectoryEntry>, MetaError> {
    let mut directory = BTreeMap::new();
    let bytes = match fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(directory),
        Err(e) => return Err(io_err("read", path)(e)),
    };
    let complete = match bytes.iter().rposition(|b| *b == b'\n') {
        Some(end) => &bytes[..=end],
        None => &bytes[..0],
    };
    if complete.len() < bytes.len() {
        // Cut the torn line so later appends start on a clean line.
        let file = OpenOptions::new()
            .write(true)
            .open(path)
            .map_err(io_err("open", path))?;
        file.set_len(complete.len() as u64)
            .map_err(io_err("truncate", path))?;
        file.sync_all().map_err(io_err("fsync", path))?;
    }
    for (n, line) in complete.split(|b| *b == b'\n').enumerate() {
        if line.is_empty() {
            continue;
        }
        let entry: DirectoryEntry =
            serde_json::from_slice(line).map_err(|e| MetaError::Corrupt {
                path: path.to_path_buf(),
                reason: format!("line {}: {e}", n + 1),
            })?;
        directory.insert(entry.issuer_id.clone(), entry);
    }
    Ok(directory)
}

/// temp file, fsync, rename, fsync the directory.
fn write_atomically(dir: &Path, name: &str, bytes: &[u8]) -> Result<(), MetaError> {
    let tmp = dir.join(format!("{name}.tmp"));
    let dst = dir.join(name);
    let mut file = File::create(&tmp).map_err(io_err("create", &tmp))?;
    file.write_all(bytes).map_err(io_err("write", &tmp))?;
    file.sync_all().map_err(io_err("fsync", &tmp))?;
    fs::rename(&tmp, &dst).map_err(io_err("rename", &dst))?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("fsync", dir))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn map_and_directory_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let newyork = Region::new("newyork").unwrap();
        let issuer = IssuerId::new("MUNI-77").unwrap();
        let entry = {
            let store = MetaStore::open(dir.path(), &Topology::dev()).unwrap();
            let map = store.begin_epoch().unwrap();
            assert!(map.groups.values().all(|g| g.generation == Generation(1)));
            let (entry, created) = store.assign(&issuer, &newyork).unwrap().unwrap();
            assert!(created);
            let (again, created) = store.assign(&issuer, &newyork).unwrap().unwrap();
            assert!(!created);
            assert_eq!(again, entry);
            entry
        };
        let store = MetaStore::open(dir.path(), &Topology::dev()).unwrap();
        assert_eq!(store.lookup(&issuer), Some(entry));
        let map = store.begin_epoch().unwrap();
        assert!(map.groups.values().all(|g| g.generation == Generation(2)));
    }

    #[test]
    fn a_second_home_region_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = MetaStore::open(dir.path(), &Topology::dev()).unwrap();
        let issuer = IssuerId::new("MUNI-77").unwrap();
        store
            .assign(&issuer, &Region::new("newyork").unwrap())
            .unwrap()
            .unwrap();
        let err = store
            .assign(&issuer, &Region::new("madrid").unwrap())
            .unwrap()
            .unwrap_err();
        assert!(matches!(err, DirectoryError::HomeRegionMismatch { .. }));
        let err = store
            .assign(&IssuerId::new("X").unwrap(), &Region::new("tokyo").unwrap())
            .unwrap()
            .unwrap_err();
        assert!(matches!(err, DirectoryError::UnknownRegion { .. }));
    }

    #[test]
    fn a_torn_directory_line_is_ignored_and_a_bad_middle_line_refused() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = MetaStore::open(dir.path(), &Topology::dev()).unwrap();
            store
                .assign(
                    &IssuerId::new("A").unwrap(),
                    &Region::new("madrid").unwrap(),
                )
                .unwrap()
                .unwrap();
        }
        let path = dir.path().join(DIRECTORY_FILE);
        let mut bytes = fs::read(&path).unwrap();
        bytes.extend_from_slice(b"{\"issuer_id\":\"B\",\"ho");
        fs::write(&path, &bytes).unwrap();
        let store = MetaStore::open(dir.path(), &Topology::dev()).unwrap();
        assert_eq!(store.issuer_count(), 1);
        drop(store);
        let mut bytes = b"garbage\n".to_vec();
        bytes.extend(fs::read(&path).unwrap());
        fs::write(&path, &bytes).unwrap();
        assert!(matches!(
            MetaStore::open(dir.path(), &Topology::dev()),
            Err(MetaError::Corrupt { .. })
        ));
    }
}

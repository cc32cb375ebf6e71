//! The metadata state machine under Raft: [`MetaState`] plus what Raft needs
//! to know of it (the last applied entry and membership). Snapshots are the
//! whole state as JSON, kept on disk; after a restart Raft replays the log
//! from the snapshot on.

use std::io::{self, Cursor};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use harbor_meta::{MetaReply, MetaState, ShardMap};
use openraft::storage::RaftStateMachine;
use openraft::{
    BasicNode, Entry, EntryPayload, LogId, OptionalSend, RaftSnapshotBuilder, Snapshot,
    SnapshotMeta, StorageError, StorageIOError, StoredMembership,
};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::log_store::{read_json, write_json};
use crate::types::{NodeId, TypeConfig};

const SNAPSHOT_FILE: &str = "snapshot.json";

/// The applied state, as readers see it.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Applied {
    pub last_applied: Option<LogId<NodeId>>,
    pub membership: StoredMembership<NodeId, BasicNode>,
    pub state: MetaState,
}

#[derive(Serialize, Deserialize)]
struct StoredSnapshot {
    meta: SnapshotMeta<NodeId, BasicNode>,
    data: Vec<u8>,
}

#[derive(Clone)]
pub struct StateMachine {
    dir: PathBuf,
    applied: Arc<RwLock<Applied>>,
    /// The applied shard map, shared whole with readers (routing reads it
    /// on every request) and swapped when its version changes.
    map: Arc<RwLock<Arc<ShardMap>>>,
    /// Tells readers (gateways, the control loop) that the state changed.
    changes: watch::Sender<u64>,
    snapshot: Arc<RwLock<Option<StoredSnapshot>>>,
}

type Result<T> = std::result::Result<T, StorageError<NodeId>>;

impl StateMachine {
    pub fn open(dir: &Path) -> io::Result<(StateMachine, watch::Receiver<u64>)> {
        std::fs::create_dir_all(dir)?;
        let stored: Option<StoredSnapshot> = read_json(&dir.join(SNAPSHOT_FILE))?;
        let applied = match &stored {
            Some(s) => serde_json::from_slice(&s.data).map_err(|e| {
                io::Error::new(io::ErrorKind::InvalidData, format!("snapshot: {e}"))
            })?,
            None => Applied::default(),
        };
        let (changes, seen) = watch::channel(0);
        let map = Arc::new(applied.state.map.clone().unwrap_or_else(ShardMap::empty));
        Ok((
            StateMachine {
                dir: dir.to_path_buf(),
                map: Arc::new(RwLock::new(map)),
                applied: Arc::new(RwLock::new(applied)),
                changes,
                snapshot: Arc::new(RwLock::new(stored)),
            },
            seen,
        ))
    }

    pub fn applied(&self) -> Arc<RwLock<Applied>> {
        self.applied.clone()
    }

    pub fn map(&self) -> Arc<RwLock<Arc<ShardMap>>> {
        self.map.clone()
    }

    /// Publishes the applied map to readers when its version moved.
    fn publish_map(&self, state: &MetaState) {
        if let Some(map) = &state.map {
            let mut shared = self.map.write().unwrap();
            if shared.map_version != map.map_version {
                *shared = Arc::new(map.clone());
            }
        }
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>> {
        let applied = self.applied.read().unwrap().clone();
        let data = serde_json::to_vec(&applied)
            .map_err(|e| StorageError::from(StorageIOError::write_snapshot(None, &e)))?;
        let snapshot_id = match applied.last_applied {
            Some(id) => format!("{}-{}-{}", id.leader_id, id.index, data.len()),
            None => format!("empty-{}", data.len()),
        };
        let meta = SnapshotMeta {
            last_log_id: applied.last_applied,
            last_membership: applied.membership.clone(),
            snapshot_id,
        };
        let stored = StoredSnapshot {
            meta: meta.clone(),
            data: data.clone(),
        };
        write_json(&self.dir, SNAPSHOT_FILE, &stored).map_err(|e| {
            StorageError::from(StorageIOError::write_snapshot(Some(meta.signature()), &e))
        })?;
        *self.snapshot.write().unwrap() = Some(stored);
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = StateMachine;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId<NodeId>>, StoredMembership<NodeId, BasicNode>)> {
        let applied = self.applied.read().unwrap();
        Ok((applied.last_applied, applied.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<MetaReply>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut replies = Vec::new();
        {
            let mut applied = self.applied.write().unwrap();
            for entry in entries {
                applied.last_applied = Some(entry.log_id);
                let reply = match entry.payload {
                    EntryPayload::Normal(command) => applied.state.apply(&command),
                    EntryPayload::Membership(membership) => {
                        applied.membership = StoredMembership::new(Some(entry.log_id), membership);
                        MetaReply::Map {
                            map_version: map_version(&applied.state),
                        }
                    }
                    EntryPayload::Blank => MetaReply::Map {
                        map_version: map_version(&applied.state),
                    },
                };
                replies.push(reply);
            }
            self.publish_map(&applied.state);
        }
        self.changes.send_modify(|n| *n += 1);
        Ok(replies)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, BasicNode>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<()> {
        let data = snapshot.into_inner();
        let applied: Applied = serde_json::from_slice(&data).map_err(|e| {
            StorageError::from(StorageIOError::read_snapshot(Some(meta.signature()), &e))
        })?;
        let stored = StoredSnapshot {
            meta: meta.clone(),
            data,
        };
        write_json(&self.dir, SNAPSHOT_FILE, &stored).map_err(|e| {
            StorageError::from(StorageIOError::write_snapshot(Some(meta.signature()), &e))
        })?;
        *self.snapshot.write().unwrap() = Some(stored);
        self.publish_map(&applied.state);
        *self.applied.write().unwrap() = applied;
        self.changes.send_modify(|n| *n += 1);
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>> {
        Ok(self.snapshot.read().unwrap().as_ref().map(|s| Snapshot {
            meta: s.meta.clone(),
            snapshot: Box::new(Cursor::new(s.data.clone())),
        }))
    }
}

fn map_version(state: &MetaState) -> u64 {
    state.map.as_ref().map_or(0, |m| m.map_version)
}

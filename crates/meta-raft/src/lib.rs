//! The metadata plane on Raft (openraft): one voter inside `harbor dev`,
//! three in a deployment (one per region plus a tiebreaker). Each voter
//! applies the same [`MetaCommand`]s to a [`MetaState`] (`harbor-meta`), so
//! the shard map, the generations and the issuer directory are the same on
//! every voter and survive restarts.
//!
//! A voter serves Raft traffic and metadata requests over HTTP
//! ([`MetaNode::router`]): `/raft/{append,vote,snapshot}` between voters,
//! `POST /meta/write` (a command; followers name the leader) and
//! `GET /meta/state` (the applied state and who leads).

mod log_store;
mod network;
mod remote;
mod state_machine;
mod types;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use axum::extract::{Query, State};
use axum::routing::{get, post};
use axum::{Json, Router};
use harbor_meta::{
    DirectoryEntry, MetaCommand, MetaError, MetaFuture, MetaReply, MetaState, Metadata, ShardMap,
};
use harbor_types::IssuerId;
use openraft::error::{InstallSnapshotError, RaftError};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::{BasicNode, Config};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

pub use log_store::LogStore;
pub use network::HttpNetwork;
pub use remote::RemoteMeta;
pub use state_machine::{Applied, StateMachine};
pub use types::{NodeId, Raft, TypeConfig};

/// One voter's settings.
#[derive(Clone, Debug)]
pub struct MetaConfig {
    pub id: NodeId,
    /// Where its log, vote and snapshots live.
    pub dir: PathBuf,
    /// How often the leader heartbeats.
    pub heartbeat_ms: u64,
    /// A follower that hears no leader for a random time in this range
    /// starts an election. Must exceed a cross-region round trip by far.
    pub election_timeout_ms: (u64, u64),
    /// How long [`MetaNode::write`] keeps trying (leader elections included).
    pub write_timeout_ms: u64,
}

impl MetaConfig {
    pub fn new(id: NodeId, dir: PathBuf) -> MetaConfig {
        MetaConfig {
            id,
            dir,
            heartbeat_ms: 250,
            election_timeout_ms: (1_000, 2_000),
            write_timeout_ms: 10_000,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MetaRaftError {
    #[error("metadata storage in {dir}: {source}")]
    Storage {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error("raft: {0}")]
    Raft(String),
    #[error("no metadata leader accepted the write within {0} ms")]
    NoLeader(u64),
}

/// The answer of `POST /meta/write`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WriteAnswer {
    Applied(MetaReply),
    /// Not the leader; ask this address (when known).
    NotLeader {
        leader_addr: Option<String>,
    },
    Failed(String),
}

/// The answer of `GET /meta/lookup?issuer_id=`: linearizable, from the
/// metadata leader.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LookupAnswer {
    Found(DirectoryEntry),
    Absent,
    /// Not the leader; ask this address (when known).
    NotLeader {
        leader_addr: Option<String>,
    },
    Failed(String),
}

/// The answer of `GET /meta/map`: the shard map, linearizable, from the
/// metadata leader.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MapAnswer {
    Map(ShardMap),
    /// Not the leader; ask this address (when known).
    NotLeader {
        leader_addr: Option<String>,
    },
    Failed(String),
}

#[derive(Debug, Serialize, Deserialize)]
pub struct LookupQuery {
    pub issuer_id: IssuerId,
}

/// The answer of `GET /meta/state`.
#[derive(Debug, Serialize, Deserialize)]
pub struct StateAnswer {
    pub id: NodeId,
    pub leader: Option<NodeId>,
    pub applied_index: Option<u64>,
    pub state: MetaState,
}

/// One metadata voter.
pub struct MetaNode {
    pub id: NodeId,
    raft: Raft,
    applied: Arc<RwLock<Applied>>,
    map: Arc<RwLock<Arc<ShardMap>>>,
    changes: watch::Receiver<u64>,
    client: reqwest::Client,
    write_timeout_ms: u64,
}

impl MetaNode {
    /// Opens the voter's storage (recovering it) and starts Raft. A new
    /// cluster also needs [`MetaNode::initialize`] once.
    pub async fn start(config: &MetaConfig) -> Result<Arc<MetaNode>, MetaRaftError> {
        let storage_err = |source| MetaRaftError::Storage {
            dir: config.dir.clone(),
            source,
        };
        let started = std::time::Instant::now();
        let log = LogStore::open(&config.dir).map_err(storage_err)?;
        let (machine, changes) = StateMachine::open(&config.dir).map_err(storage_err)?;
        let applied = machine.applied();
        tracing::info!(
            voter = config.id,
            snapshot_applied = ?applied.read().unwrap().last_applied.map(|l| l.index),
            ms = started.elapsed().as_millis() as u64,
            "recovered the metadata state"
        );
        let map = machine.map();
        let raft_config = Config {
            cluster_name: "harbor-meta".into(),
            heartbeat_interval: config.heartbeat_ms,
            election_timeout_min: config.election_timeout_ms.0,
            election_timeout_max: config.election_timeout_ms.1,
            ..Config::default()
        }
        .validate()
        .map_err(|e| MetaRaftError::Raft(e.to_string()))?;
        let raft = Raft::new(
            config.id,
            Arc::new(raft_config),
            HttpNetwork::new(),
            log,
            machine,
        )
        .await
        .map_err(|e| MetaRaftError::Raft(e.to_string()))?;
        Ok(Arc::new(MetaNode {
            id: config.id,
            raft,
            applied,
            map,
            changes,
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(5))
                .build()
                .expect("an HTTP client"),
            write_timeout_ms: config.write_timeout_ms,
        }))
    }

    /// Makes a new cluster of these voters (id → HTTP address). Harmless on
    /// a cluster that already exists.
    pub async fn initialize(&self, voters: &BTreeMap<NodeId, String>) -> Result<(), MetaRaftError> {
        // Asking openraft on a voter with a log logs an error: skip it.
        if self
            .raft
            .is_initialized()
            .await
            .map_err(|e| MetaRaftError::Raft(e.to_string()))?
        {
            return Ok(());
        }
        let members: BTreeMap<NodeId, BasicNode> = voters
            .iter()
            .map(|(id, addr)| (*id, BasicNode { addr: addr.clone() }))
            .collect();
        match self.raft.initialize(members).await {
            Ok(()) => Ok(()),
            Err(RaftError::APIError(openraft::error::InitializeError::NotAllowed(_))) => Ok(()),
            Err(e) => Err(MetaRaftError::Raft(e.to_string())),
        }
    }

    /// Commits `command` through the leader (this voter or the one it
    /// names), retrying across elections until `write_timeout_ms`.
    pub async fn write(&self, command: MetaCommand) -> Result<MetaReply, MetaRaftError> {
        let deadline = tokio::time::Instant::now() + Duration::from_millis(self.write_timeout_ms);
        loop {
            let answer = match self.write_here(command.clone()).await {
                WriteAnswer::NotLeader {
                    leader_addr: Some(addr),
                } => self.write_at(&addr, &command).await,
                other => other,
            };
            match answer {
                WriteAnswer::Applied(reply) => return Ok(reply),
                WriteAnswer::Failed(e) => return Err(MetaRaftError::Raft(e)),
                WriteAnswer::NotLeader { .. } => {}
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(MetaRaftError::NoLeader(self.write_timeout_ms));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn write_here(&self, command: MetaCommand) -> WriteAnswer {
        match self.raft.client_write(command).await {
            Ok(response) => WriteAnswer::Applied(response.data),
            Err(e) => match e.forward_to_leader() {
                Some(forward) => WriteAnswer::NotLeader {
                    leader_addr: forward.leader_node.as_ref().map(|n| n.addr.clone()),
                },
                None => WriteAnswer::Failed(e.to_string()),
            },
        }
    }

    async fn write_at(&self, addr: &str, command: &MetaCommand) -> WriteAnswer {
        let url = format!("http://{addr}/meta/write");
        match self.client.post(&url).json(command).send().await {
            Ok(response) => response
                .json()
                .await
                .unwrap_or(WriteAnswer::NotLeader { leader_addr: None }),
            // The leader may have just died: an election names the next.
            Err(_) => WriteAnswer::NotLeader { leader_addr: None },
        }
    }

    /// On the leader: confirms leadership with a quorum, waits until
    /// everything committed before is applied, then reads the entry.
    async fn lookup_here(&self, issuer: &IssuerId) -> LookupAnswer {
        match self.raft.ensure_linearizable().await {
            Ok(_) => match Metadata::lookup(self, issuer) {
                Some(entry) => LookupAnswer::Found(entry),
                None => LookupAnswer::Absent,
            },
            Err(e) => match e.forward_to_leader() {
                Some(forward) => LookupAnswer::NotLeader {
                    leader_addr: forward.leader_node.as_ref().map(|n| n.addr.clone()),
                },
                None => LookupAnswer::Failed(e.to_string()),
            },
        }
    }

    /// On the leader: the map once everything committed before is applied.
    async fn map_here(&self) -> MapAnswer {
        match self.raft.ensure_linearizable().await {
            Ok(_) => MapAnswer::Map((*Metadata::map(self)).clone()),
            Err(e) => match e.forward_to_leader() {
                Some(forward) => MapAnswer::NotLeader {
                    leader_addr: forward.leader_node.as_ref().map(|n| n.addr.clone()),
                },
                None => MapAnswer::Failed(e.to_string()),
            },
        }
    }

    /// A linearizable read of the map through the leader (this voter or
    /// the one it names), retrying across elections until
    /// `write_timeout_ms`.
    pub async fn map_linearizable(&self) -> Result<ShardMap, MetaRaftError> {
        let deadline = tokio::time::Instant::now() + Duration::from_millis(self.write_timeout_ms);
        loop {
            let answer = match self.map_here().await {
                MapAnswer::NotLeader {
                    leader_addr: Some(addr),
                } => {
                    let url = format!("http://{addr}/meta/map");
                    match self.client.get(&url).send().await {
                        Ok(response) => response
                            .json()
                            .await
                            .unwrap_or(MapAnswer::NotLeader { leader_addr: None }),
                        Err(_) => MapAnswer::NotLeader { leader_addr: None },
                    }
                }
                other => other,
            };
            // A failure (no quorum for a moment) is tried again until the
            // deadline, like a missing leader.
            let failed = match answer {
                MapAnswer::Map(map) => return Ok(map),
                MapAnswer::Failed(e) => Some(e),
                MapAnswer::NotLeader { .. } => None,
            };
            if tokio::time::Instant::now() >= deadline {
                return Err(match failed {
                    Some(e) => MetaRaftError::Raft(e),
                    None => MetaRaftError::NoLeader(self.write_timeout_ms),
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn lookup_at(&self, addr: &str, issuer: &IssuerId) -> LookupAnswer {
        let url = format!("http://{addr}/meta/lookup");
        let query = LookupQuery {
            issuer_id: issuer.clone(),
        };
        match self.client.get(&url).query(&query).send().await {
            Ok(response) => response
                .json()
                .await
                .unwrap_or(LookupAnswer::NotLeader { leader_addr: None }),
            Err(_) => LookupAnswer::NotLeader { leader_addr: None },
        }
    }

    /// A linearizable lookup through the leader (this voter or the one it
    /// names), retrying across elections until `write_timeout_ms`.
    pub async fn lookup_linearizable(
        &self,
        issuer: &IssuerId,
    ) -> Result<Option<DirectoryEntry>, MetaRaftError> {
        let deadline = tokio::time::Instant::now() + Duration::from_millis(self.write_timeout_ms);
        loop {
            let answer = match self.lookup_here(issuer).await {
                LookupAnswer::NotLeader {
                    leader_addr: Some(addr),
                } => self.lookup_at(&addr, issuer).await,
                other => other,
            };
            match answer {
                LookupAnswer::Found(entry) => return Ok(Some(entry)),
                LookupAnswer::Absent => return Ok(None),
                LookupAnswer::Failed(e) => return Err(MetaRaftError::Raft(e)),
                LookupAnswer::NotLeader { .. } => {}
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(MetaRaftError::NoLeader(self.write_timeout_ms));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The state this voter has applied (a follower's may trail the leader's
    /// by a heartbeat).
    pub fn state(&self) -> MetaState {
        self.applied.read().unwrap().state.clone()
    }

    /// Changes whenever this voter applies something.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.changes.clone()
    }

    pub fn leader(&self) -> Option<NodeId> {
        self.raft.metrics().borrow().current_leader
    }

    /// Waits until this voter has applied a state `done` accepts.
    pub async fn wait_until(
        &self,
        timeout: Duration,
        done: impl Fn(&MetaState) -> bool,
    ) -> Result<MetaState, MetaState> {
        let mut changes = self.changes();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let state = self.state();
            if done(&state) {
                return Ok(state);
            }
            if tokio::time::timeout_at(deadline, changes.changed())
                .await
                .is_err()
            {
                return Err(state);
            }
        }
    }

    pub async fn shutdown(&self) {
        let _ = self.raft.shutdown().await;
    }

    /// The voter's HTTP routes (Raft traffic and metadata requests).
    pub fn router(self: &Arc<Self>) -> Router {
        Router::new()
            .route("/raft/append", post(append))
            .route("/raft/vote", post(vote))
            .route("/raft/snapshot", post(snapshot))
            .route("/meta/write", post(write))
            .route("/meta/state", get(state))
            .route("/meta/lookup", get(lookup))
            .route("/meta/map", get(map))
            .with_state(self.clone())
    }
}

/// A voter serves its own process (the embedded cluster, a metadata
/// process's control loop) from its applied state.
impl Metadata for MetaNode {
    fn map(&self) -> Arc<ShardMap> {
        self.map.read().unwrap().clone()
    }

    fn lookup(&self, issuer: &IssuerId) -> Option<DirectoryEntry> {
        self.applied
            .read()
            .unwrap()
            .state
            .directory
            .get(issuer)
            .cloned()
    }

    fn write(&self, command: MetaCommand) -> MetaFuture<'_, MetaReply> {
        Box::pin(async move {
            MetaNode::write(self, command)
                .await
                .map_err(|e| MetaError::Unavailable(e.to_string()))
        })
    }

    fn lookup_linearizable<'a>(
        &'a self,
        issuer: &'a IssuerId,
    ) -> MetaFuture<'a, Option<DirectoryEntry>> {
        Box::pin(async move {
            MetaNode::lookup_linearizable(self, issuer)
                .await
                .map_err(|e| MetaError::Unavailable(e.to_string()))
        })
    }

    fn map_linearizable(&self) -> MetaFuture<'_, Arc<ShardMap>> {
        Box::pin(async move {
            MetaNode::map_linearizable(self)
                .await
                .map(Arc::new)
                .map_err(|e| MetaError::Unavailable(e.to_string()))
        })
    }

    /// On the leader: confirms leadership and waits until everything
    /// committed is applied. A follower's copy trails by a heartbeat at
    /// most; stale-route answers repair the rest.
    fn refresh(&self) -> MetaFuture<'_, ()> {
        Box::pin(async move {
            if self.leader() == Some(self.id) {
                self.raft
                    .ensure_linearizable()
                    .await
                    .map_err(|e| MetaError::Unavailable(e.to_string()))?;
            }
            Ok(())
        })
    }
}

type Node = State<Arc<MetaNode>>;

/// Answered by the leader only, so what it says is linearizable.
async fn lookup(State(node): Node, Query(query): Query<LookupQuery>) -> Json<LookupAnswer> {
    Json(node.lookup_here(&query.issuer_id).await)
}

/// Answered by the leader only, so what it says is linearizable.
async fn map(State(node): Node) -> Json<MapAnswer> {
    Json(node.map_here().await)
}

async fn append(
    State(node): Node,
    Json(rpc): Json<AppendEntriesRequest<TypeConfig>>,
) -> Json<Result<AppendEntriesResponse<NodeId>, RaftError<NodeId>>> {
    Json(node.raft.append_entries(rpc).await)
}

async fn vote(
    State(node): Node,
    Json(rpc): Json<VoteRequest<NodeId>>,
) -> Json<Result<VoteResponse<NodeId>, RaftError<NodeId>>> {
    Json(node.raft.vote(rpc).await)
}

async fn snapshot(
    State(node): Node,
    Json(rpc): Json<InstallSnapshotRequest<TypeConfig>>,
) -> Json<Result<InstallSnapshotResponse<NodeId>, RaftError<NodeId, InstallSnapshotError>>> {
    Json(node.raft.install_snapshot(rpc).await)
}

async fn write(State(node): Node, Json(command): Json<MetaCommand>) -> Json<WriteAnswer> {
    Json(node.write_here(command).await)
}

async fn state(State(node): Node) -> Json<StateAnswer> {
    let applied = node.applied.read().unwrap().clone();
    Json(StateAnswer {
        id: node.id,
        leader: node.leader(),
        applied_index: applied.last_applied.map(|l| l.index),
        state: applied.state,
    })
}

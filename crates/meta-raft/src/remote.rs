//! The metadata plane seen from another process (a node's gateway, a
//! tool): a local copy of the state, refreshed from the voters
//! periodically and on demand (stale route, unknown issuer); writes go to
//! the metadata leader over HTTP.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use harbor_meta::{
    DirectoryEntry, MetaCommand, MetaError, MetaFuture, MetaReply, Metadata, ShardMap,
};
use harbor_types::IssuerId;

use crate::{LookupAnswer, LookupQuery, MapAnswer, StateAnswer, WriteAnswer};

pub struct RemoteMeta {
    voters: Vec<String>,
    client: reqwest::Client,
    map: RwLock<Arc<ShardMap>>,
    directory: RwLock<BTreeMap<IssuerId, DirectoryEntry>>,
    /// The voter that last accepted a write.
    leader: Mutex<Option<String>>,
    write_timeout: Duration,
    /// One refresh at a time; callers that arrive meanwhile share it.
    refreshing: tokio::sync::Mutex<()>,
    /// When the last pull finished: refreshes closer together than
    /// `REFRESH_GAP` share it.
    last_pull: Mutex<Option<tokio::time::Instant>>,
}

/// Refreshes asked for within this of the last one are answered by it.
const REFRESH_GAP: Duration = Duration::from_millis(100);

impl RemoteMeta {
    /// The voter that last took a write first, then every voter.
    fn voters_leader_first(&self) -> Vec<String> {
        let mut order: Vec<String> = self.leader.lock().unwrap().iter().cloned().collect();
        order.extend(self.voters.iter().cloned());
        order
    }

    /// Connects to the voters (HTTP addresses) and waits until they serve a
    /// bootstrapped map.
    pub async fn connect(
        voters: Vec<String>,
        timeout: Duration,
    ) -> Result<Arc<RemoteMeta>, MetaError> {
        let remote = Arc::new(RemoteMeta {
            voters,
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(5))
                .build()
                .expect("an HTTP client"),
            map: RwLock::new(Arc::new(ShardMap::empty())),
            directory: RwLock::new(BTreeMap::new()),
            leader: Mutex::new(None),
            write_timeout: Duration::from_secs(10),
            refreshing: tokio::sync::Mutex::new(()),
            last_pull: Mutex::new(None),
        });
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let ready = remote.pull().await.is_ok() && !remote.map().groups.is_empty();
            if ready {
                return Ok(remote);
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(MetaError::Unavailable(format!(
                    "no bootstrapped metadata from {:?} within {timeout:?}",
                    remote.voters
                )));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Refreshes the copy every `interval` until the process ends.
    pub fn refresh_every(self: &Arc<Self>, interval: Duration) {
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(interval).await;
                let Some(remote) = weak.upgrade() else { return };
                let _ = remote.pull().await;
            }
        });
    }

    /// Asks every voter for its state and keeps the freshest.
    async fn pull(&self) -> Result<(), MetaError> {
        let _one = self.refreshing.lock().await;
        *self.last_pull.lock().unwrap() = Some(tokio::time::Instant::now());
        let asks = self.voters.iter().map(|addr| async move {
            let url = format!("http://{addr}/meta/state");
            let answer: Option<StateAnswer> = match self.client.get(&url).send().await {
                Ok(response) => response.json().await.ok(),
                Err(_) => None,
            };
            answer
        });
        let best = futures::future::join_all(asks)
            .await
            .into_iter()
            .flatten()
            .max_by_key(|a| a.applied_index);
        let Some(best) = best else {
            return Err(MetaError::Unavailable(format!(
                "no metadata voter answered ({:?})",
                self.voters
            )));
        };
        if let Some(map) = best.state.map {
            let mut current = self.map.write().unwrap();
            if map.map_version >= current.map_version {
                *current = Arc::new(map);
            }
        }
        // Entries are never removed or changed once placed: merging keeps
        // what a linearizable lookup found even if this voter trails.
        self.directory.write().unwrap().extend(best.state.directory);
        Ok(())
    }

    async fn lookup_at(&self, addr: &str, issuer: &IssuerId) -> Option<LookupAnswer> {
        let url = format!("http://{addr}/meta/lookup");
        let query = LookupQuery {
            issuer_id: issuer.clone(),
        };
        let response = self.client.get(&url).query(&query).send().await.ok()?;
        response.json().await.ok()
    }

    async fn map_at(&self, addr: &str) -> Option<MapAnswer> {
        let url = format!("http://{addr}/meta/map");
        let response = self.client.get(&url).send().await.ok()?;
        response.json().await.ok()
    }

    async fn write_to(&self, addr: &str, command: &MetaCommand) -> Option<WriteAnswer> {
        let url = format!("http://{addr}/meta/write");
        let response = self.client.post(&url).json(command).send().await.ok()?;
        response.json().await.ok()
    }
}

impl Metadata for RemoteMeta {
    fn map(&self) -> Arc<ShardMap> {
        self.map.read().unwrap().clone()
    }

    fn lookup(&self, issuer: &IssuerId) -> Option<DirectoryEntry> {
        self.directory.read().unwrap().get(issuer).cloned()
    }

    fn write(&self, command: MetaCommand) -> MetaFuture<'_, MetaReply> {
        Box::pin(async move {
            let deadline = tokio::time::Instant::now() + self.write_timeout;
            loop {
                for addr in self.voters_leader_first() {
                    match self.write_to(&addr, &command).await {
                        Some(WriteAnswer::Applied(reply)) => {
                            *self.leader.lock().unwrap() = Some(addr);
                            // The writer reads its own write from here on.
                            let _ = self.pull().await;
                            return Ok(reply);
                        }
                        Some(WriteAnswer::Failed(e)) => return Err(MetaError::Unavailable(e)),
                        Some(WriteAnswer::NotLeader { .. }) | None => {}
                    }
                }
                if tokio::time::Instant::now() >= deadline {
                    return Err(MetaError::Unavailable(format!(
                        "no metadata leader among {:?} took the write",
                        self.voters
                    )));
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    }

    /// Asked of the metadata leader every time (never answered by a pull
    /// that may have begun before the caller asked); a found entry joins
    /// the local copy.
    fn lookup_linearizable<'a>(
        &'a self,
        issuer: &'a IssuerId,
    ) -> MetaFuture<'a, Option<DirectoryEntry>> {
        Box::pin(async move {
            let deadline = tokio::time::Instant::now() + self.write_timeout;
            loop {
                for addr in self.voters_leader_first() {
                    let answer = match self.lookup_at(&addr, issuer).await {
                        Some(LookupAnswer::NotLeader {
                            leader_addr: Some(leader),
                        }) => self.lookup_at(&leader, issuer).await.map(|a| (leader, a)),
                        other => other.map(|a| (addr, a)),
                    };
                    match answer {
                        Some((addr, LookupAnswer::Found(entry))) => {
                            *self.leader.lock().unwrap() = Some(addr);
                            self.directory
                                .write()
                                .unwrap()
                                .insert(issuer.clone(), entry.clone());
                            return Ok(Some(entry));
                        }
                        Some((addr, LookupAnswer::Absent)) => {
                            *self.leader.lock().unwrap() = Some(addr);
                            return Ok(None);
                        }
                        Some((_, LookupAnswer::Failed(e))) => {
                            return Err(MetaError::Unavailable(e))
                        }
                        Some((_, LookupAnswer::NotLeader { .. })) | None => {}
                    }
                }
                if tokio::time::Instant::now() >= deadline {
                    return Err(MetaError::Unavailable(format!(
                        "no metadata leader among {:?} answered a lookup",
                        self.voters
                    )));
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    }

    /// Asked of the metadata leader every time; a newer map than the local
    /// copy replaces it.
    fn map_linearizable(&self) -> MetaFuture<'_, Arc<ShardMap>> {
        Box::pin(async move {
            let deadline = tokio::time::Instant::now() + self.write_timeout;
            loop {
                for addr in self.voters_leader_first() {
                    let answer = match self.map_at(&addr).await {
                        Some(MapAnswer::NotLeader {
                            leader_addr: Some(leader),
                        }) => self.map_at(&leader).await.map(|a| (leader, a)),
                        other => other.map(|a| (addr, a)),
                    };
                    match answer {
                        Some((addr, MapAnswer::Map(map))) => {
                            *self.leader.lock().unwrap() = Some(addr);
                            let map = Arc::new(map);
                            let mut current = self.map.write().unwrap();
                            if map.map_version >= current.map_version {
                                *current = map.clone();
                            }
                            return Ok(map);
                        }
                        // No quorum for a moment: tried again until the
                        // deadline.
                        Some((_, MapAnswer::Failed(e))) => {
                            tracing::debug!(error = %e, "the metadata leader could not read the map");
                        }
                        Some((_, MapAnswer::NotLeader { .. })) | None => {}
                    }
                }
                if tokio::time::Instant::now() >= deadline {
                    return Err(MetaError::Unavailable(format!(
                        "no metadata leader among {:?} answered for the map",
                        self.voters
                    )));
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    }

    /// Coalesced: under load many requests ask at once (a leader moved),
    /// and one pull answers them all.
    fn refresh(&self) -> MetaFuture<'_, ()> {
        Box::pin(async move {
            let recent = self
                .last_pull
                .lock()
                .unwrap()
                .is_some_and(|t| t.elapsed() < REFRESH_GAP);
            if recent {
                return Ok(());
            }
            match self.refreshing.try_lock() {
                Ok(guard) => {
                    drop(guard);
                    self.pull().await
                }
                Err(_) => {
                    // A pull is under way: its answer is ours.
                    let _ = self.refreshing.lock().await;
                    Ok(())
                }
            }
        })
    }
}

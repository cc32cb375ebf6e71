//! How gateways and the control plane reach the metadata plane: reads come
//! from a local copy (cheap; it may trail the metadata leader by a moment,
//! which stale-route answers repair), writes are committed by the metadata
//! plane before they return.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use harbor_types::{Generation, IssuerId, LogIndex, NodeId, Region, ShardId};

use crate::placement::{BucketMove, ShardMap};
use crate::state::{DirectoryEntry, DirectoryError, MetaCommand, MetaReply};

#[derive(Debug, Clone, thiserror::Error)]
pub enum MetaError {
    /// The metadata plane could not commit or answer (no leader, no quorum,
    /// unreachable). Retryable.
    #[error("the metadata plane is unavailable: {0}")]
    Unavailable(String),
    /// The change does not fit the metadata (an older generation, ...).
    #[error("metadata change refused: {0}")]
    Refused(String),
}

pub type MetaFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, MetaError>> + Send + 'a>>;

pub trait Metadata: Send + Sync {
    /// The local copy of the shard map.
    fn map(&self) -> Arc<ShardMap>;
    /// The local copy of an issuer's directory entry.
    fn lookup(&self, issuer: &IssuerId) -> Option<DirectoryEntry>;
    /// Commits a change through the metadata plane.
    fn write(&self, command: MetaCommand) -> MetaFuture<'_, MetaReply>;
    /// Brings the local copy up to date with the metadata plane (after a
    /// stale route or a silent leader). Best effort: it may be answered by
    /// a pull that began before the caller asked.
    fn refresh(&self) -> MetaFuture<'_, ()>;
    /// An issuer's entry as the metadata plane holds it now: linearizable
    /// (through the Raft leader's read index), so an entry committed before
    /// the call began is always seen. What answers "this issuer does not
    /// exist" must ask this, never the local copy.
    fn lookup_linearizable<'a>(
        &'a self,
        issuer: &'a IssuerId,
    ) -> MetaFuture<'a, Option<DirectoryEntry>>;
    /// The shard map as the metadata plane holds it now: linearizable, so
    /// everything committed before the call began is in it. What a replica
    /// that lost its disk starts from (its group's fence) must come from
    /// here, never from a copy that may trail.
    fn map_linearizable(&self) -> MetaFuture<'_, Arc<ShardMap>>;
}

impl dyn Metadata {
    pub fn shard_of(&self, issuer: &IssuerId) -> Option<ShardId> {
        let entry = self.lookup(issuer)?;
        Some(self.map().shard_of_bucket(entry.bucket))
    }

    /// An issuer's entry: from the local copy when it has it (an entry
    /// never changes once placed), else from the metadata plane itself,
    /// linearizably (the issuer may have been created through another
    /// gateway a moment ago). `None` means it did not exist when asked.
    pub async fn find(&self, issuer: &IssuerId) -> Result<Option<DirectoryEntry>, MetaError> {
        if let Some(entry) = self.lookup(issuer) {
            return Ok(Some(entry));
        }
        self.lookup_linearizable(issuer).await
    }

    /// Places a new issuer or returns its existing entry (`created` tells
    /// which).
    pub async fn assign(
        &self,
        issuer: &IssuerId,
        home_region: &Region,
    ) -> Result<Result<(DirectoryEntry, bool), DirectoryError>, MetaError> {
        if let Some(existing) = self.lookup(issuer) {
            if existing.home_region == *home_region {
                return Ok(Ok((existing, false)));
            }
        }
        let command = MetaCommand::Assign {
            issuer_id: issuer.clone(),
            home_region: home_region.clone(),
        };
        match self.write(command).await? {
            MetaReply::Assigned(result) => Ok(result),
            MetaReply::Refused(reason) => Err(MetaError::Refused(reason)),
            other => Err(MetaError::Unavailable(format!("assign answered {other:?}"))),
        }
    }

    /// Commits a move command; its answer is the move as it stands.
    pub async fn move_command(&self, command: MetaCommand) -> Result<BucketMove, MetaError> {
        match self.write(command).await? {
            MetaReply::Move(record) => Ok(record),
            MetaReply::Refused(reason) => Err(MetaError::Refused(reason)),
            other => Err(MetaError::Unavailable(format!(
                "a move command answered {other:?}"
            ))),
        }
    }

    /// Records that a group's replicas are about to be sealed at
    /// `generation` (see `MetaCommand::SealGroup`).
    pub async fn seal_group(
        &self,
        shard: ShardId,
        generation: Generation,
    ) -> Result<(), MetaError> {
        match self
            .write(MetaCommand::SealGroup { shard, generation })
            .await?
        {
            MetaReply::Refused(reason) => Err(MetaError::Refused(reason)),
            _ => Ok(()),
        }
    }

    /// Publishes a group's new leader and generation, and where the
    /// previous generation ended (when known).
    pub async fn update_group(
        &self,
        shard: ShardId,
        leader: &NodeId,
        generation: Generation,
        ended_at: Option<LogIndex>,
    ) -> Result<(), MetaError> {
        let command = MetaCommand::UpdateGroup {
            shard,
            leader: leader.clone(),
            generation,
            ended_at,
        };
        match self.write(command).await? {
            MetaReply::Refused(reason) => Err(MetaError::Refused(reason)),
            _ => Ok(()),
        }
    }
}

//! Refusals from a node (or from the gateway's router on a node's behalf).
//!
//! A refusal is typed: what a caller branches on (the leader to try, when
//! to come back) is a field of its kind. Whether a write may still commit
//! is not a property of the kind but of what happened before the refusal
//! (any refusal that follows an attempt in doubt leaves the write in
//! doubt), so it sits beside the kind. Its flat code is an [`ErrorCode`]
//! of the API's one list, the machine-readable `error` HTTP answers carry.

pub use harbor_api::ErrorCode;
use harbor_types::{BucketId, NodeId};
use serde::{Deserialize, Serialize};

/// A refusal: what happened, as data, and a message for humans.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{}: {message}", .kind.code())]
pub struct NodeError {
    pub kind: ErrorKind,
    pub message: String,
    /// The write may or may not commit: look its token up (or resolve
    /// it) before giving up. Set by [`NodeError::in_doubt`].
    pub outcome_unknown: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorKind {
    /// This replica does not lead the group (at the sender's generation);
    /// `hint` names the leader it knows of, if that is news to the sender.
    NotLeader { hint: Option<NodeId> },
    /// The sender's map names an older generation than this replica's: it
    /// must refresh its map and resend.
    StaleRoute { hint: Option<NodeId> },
    /// The node hosts no replica of the group.
    UnknownShard,
    /// The remote copy is further behind than the RPO budget.
    RpoBudgetExceeded { retry_after_ms: u64 },
    /// A queue is full.
    Overloaded { retry_after_ms: Option<u64> },
    /// The group's leadership is changing: a write that was in flight may
    /// or may not commit (in doubt); a planned transfer refuses new writes
    /// until `retry_after_ms`.
    LeadershipChanged { retry_after_ms: Option<u64> },
    /// The replica stopped (a storage failure).
    ReplicaFailed,
    /// The request can never fit; not retryable.
    TooLarge,
    /// No answer in time.
    Timeout,
    /// The group cannot serve this now (no lease, no first commit yet).
    Unavailable,
    /// A local read the replica cannot serve fresh enough; ask the leader.
    ReplicaBehind,
    /// The request's bucket is sealed in this group (it is moving): the
    /// request changed nothing; send it to the bucket's owner once the
    /// map names the next one.
    Moved { bucket: BucketId },
}

impl NodeError {
    /// A refusal of a request that was not taken: a write refused so did
    /// not and will not commit.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> NodeError {
        NodeError {
            kind,
            message: message.into(),
            outcome_unknown: false,
        }
    }

    /// A refusal after which a write may or may not commit.
    pub fn in_doubt(kind: ErrorKind, message: impl Into<String>) -> NodeError {
        NodeError {
            outcome_unknown: true,
            ..NodeError::new(kind, message)
        }
    }

    pub fn code(&self) -> ErrorCode {
        self.kind.code()
    }

    /// Whether the same request may be tried again (with the same token).
    pub fn retryable(&self) -> bool {
        !matches!(self.kind, ErrorKind::TooLarge)
    }

    /// The leader the refusing replica knows of, if any.
    pub fn leader_hint(&self) -> Option<&NodeId> {
        match &self.kind {
            ErrorKind::NotLeader { hint } | ErrorKind::StaleRoute { hint } => hint.as_ref(),
            _ => None,
        }
    }

    /// When to try again, where the refusal says.
    pub fn retry_after_ms(&self) -> Option<u64> {
        match self.kind {
            ErrorKind::RpoBudgetExceeded { retry_after_ms } => Some(retry_after_ms),
            ErrorKind::Overloaded { retry_after_ms }
            | ErrorKind::LeadershipChanged { retry_after_ms, .. } => retry_after_ms,
            _ => None,
        }
    }
}

impl ErrorKind {
    pub fn code(&self) -> ErrorCode {
        match self {
            ErrorKind::NotLeader { .. } => ErrorCode::NotLeader,
            ErrorKind::StaleRoute { .. } => ErrorCode::StaleRoute,
            ErrorKind::UnknownShard => ErrorCode::UnknownShard,
            ErrorKind::RpoBudgetExceeded { .. } => ErrorCode::RpoBudgetExceeded,
            ErrorKind::Overloaded { .. } => ErrorCode::Overloaded,
            ErrorKind::LeadershipChanged { .. } => ErrorCode::LeadershipChanged,
            ErrorKind::ReplicaFailed => ErrorCode::ReplicaFailed,
            ErrorKind::TooLarge => ErrorCode::TooLarge,
            ErrorKind::Timeout => ErrorCode::Timeout,
            ErrorKind::Unavailable => ErrorCode::Unavailable,
            ErrorKind::ReplicaBehind => ErrorCode::ReplicaBehind,
            ErrorKind::Moved { .. } => ErrorCode::Moved,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_a_caller_branches_on_comes_from_the_kind() {
        let hint = NodeId::new("madrid-1").unwrap();
        let e = NodeError::new(
            ErrorKind::NotLeader {
                hint: Some(hint.clone()),
            },
            "not the leader",
        );
        assert_eq!(e.code(), ErrorCode::NotLeader);
        assert_eq!(e.leader_hint(), Some(&hint));
        assert!(e.retryable() && !e.outcome_unknown);
        assert_eq!(e.to_string(), "not_leader: not the leader");

        let e = NodeError::new(ErrorKind::TooLarge, "too large");
        assert!(!e.retryable());
        let e = NodeError::in_doubt(ErrorKind::Timeout, "no answer");
        assert!(e.outcome_unknown && e.retryable());
        let e = NodeError::new(
            ErrorKind::RpoBudgetExceeded {
                retry_after_ms: 1_000,
            },
            "behind",
        );
        assert_eq!(e.retry_after_ms(), Some(1_000));
        assert_eq!(e.leader_hint(), None);
    }

    #[test]
    fn a_refusal_survives_the_wire() {
        let e = NodeError::in_doubt(
            ErrorKind::LeadershipChanged {
                retry_after_ms: Some(20),
            },
            "changed",
        );
        let bytes = postcard::to_allocvec(&e).unwrap();
        let back: NodeError = postcard::from_bytes(&bytes).unwrap();
        assert_eq!(back, e);
    }
}

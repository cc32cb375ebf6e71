//! What `/v1/admin` speaks of: the [`Admin`] hooks of whoever runs the
//! control plane (planned leader transfers, and in dev mode faults on
//! demand), the faults themselves, and the cluster view's shape. The
//! handlers are in `cluster`.

use futures::future::BoxFuture;
use harbor_api::ErrorCode;
use harbor_meta::MembersGoal;

use harbor_types::{NodeId, Region, ShardId};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::error::ApiError;

/// What the control plane's runner offers the admin API.
pub trait Admin: Send + Sync {
    /// Moves `shard`'s leadership to `to`; answers when it is done.
    fn transfer_leader(
        &self,
        shard: ShardId,
        to: NodeId,
    ) -> BoxFuture<'_, Result<harbor_api::Transfer, AdminError>>;
    /// Adds a replica of `shard` on a node, or removes one; answers when
    /// it is done.
    fn change_members(
        &self,
        shard: ShardId,
        goal: MembersGoal,
    ) -> BoxFuture<'_, Result<harbor_api::MembersChanged, AdminError>>;
    /// Injects a fault. Only `harbor dev` implements it.
    fn fault(&self, fault: Fault) -> BoxFuture<'_, Result<harbor_api::FaultDone, AdminError>> {
        let _ = fault;
        Box::pin(async { Err(AdminError::FaultsDisabled) })
    }
}

/// Why the control plane did not do what it was asked: domain errors, which
/// the HTTP layer maps to status codes (`ApiError::admin`). `code` is the
/// machine-readable `error` of the answer.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AdminError {
    /// The request does not fit the cluster as it is (a transfer to the
    /// leader itself, to a replica outside the home region, ...).
    #[error("{message}")]
    Refused { code: ErrorCode, message: String },
    /// The control plane could not do it now (no metadata leader, a
    /// transfer abandoned, shutting down); asking again may work.
    #[error("{message}")]
    Unavailable { code: ErrorCode, message: String },
    /// Faults on demand exist only in `harbor dev`.
    #[error("faults on demand exist only in `harbor dev`")]
    FaultsDisabled,
    /// It failed where it should not have (a node did not restart).
    #[error("{message}")]
    Failed { code: ErrorCode, message: String },
}

/// A fault on demand (`POST /v1/admin/faults`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fault {
    /// The node vanishes: its replicas stop, the network forgets it.
    Crash(NodeId),
    /// Starts a crashed node again on its data (or crashes and restarts a
    /// running one).
    Restart(NodeId),
    /// The node stops answering (like SIGSTOP): what is sent to it waits.
    Pause(NodeId),
    Resume(NodeId),
    /// Traffic between two regions is dropped, both ways.
    Partition(Region, Region),
    Heal(Region, Region),
    /// Extra one-way delay between two regions, both ways (0 removes it).
    Delay(Region, Region, u64),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct FaultBody {
    kind: String,
    #[serde(default)]
    node: Option<String>,
    #[serde(default)]
    regions: Option<Vec<String>>,
    #[serde(default)]
    ms: Option<u64>,
}

/// The longest extra delay a fault may add.
const FAULT_DELAY_MS_MAX: u64 = 60_000;

impl Fault {
    /// The fault in the shape it was asked for.
    pub fn to_json(&self) -> Value {
        match self {
            Fault::Crash(n) => json!({"kind": "crash", "node": n}),
            Fault::Restart(n) => json!({"kind": "restart", "node": n}),
            Fault::Pause(n) => json!({"kind": "pause", "node": n}),
            Fault::Resume(n) => json!({"kind": "resume", "node": n}),
            Fault::Partition(a, b) => json!({"kind": "partition", "regions": [a, b]}),
            Fault::Heal(a, b) => json!({"kind": "heal", "regions": [a, b]}),
            Fault::Delay(a, b, ms) => json!({"kind": "delay", "regions": [a, b], "ms": ms}),
        }
    }

    pub(crate) fn parse(body: FaultBody) -> Result<Fault, ApiError> {
        let invalid = |field: &'static str, message: String| {
            ApiError::unprocessable(ErrorCode::InvalidField, message).with("field", field)
        };
        let node = || -> Result<NodeId, ApiError> {
            let text = body.node.as_deref().ok_or_else(|| {
                invalid("node", format!("a {:?} fault needs \"node\"", body.kind))
            })?;
            NodeId::new(text).map_err(|e| invalid("node", format!("node: {e}")))
        };
        let regions = || -> Result<(Region, Region), ApiError> {
            let list = body.regions.as_deref().unwrap_or_default();
            let [a, b] = list else {
                return Err(invalid(
                    "regions",
                    format!("a {:?} fault needs \"regions\": [A, B]", body.kind),
                ));
            };
            let parse = |r: &str| Region::new(r).map_err(|e| invalid("regions", format!("{e}")));
            let (a, b) = (parse(a)?, parse(b)?);
            if a == b {
                return Err(invalid("regions", "the two regions must differ".into()));
            }
            Ok((a, b))
        };
        let fault = match body.kind.as_str() {
            "crash" => Fault::Crash(node()?),
            "restart" => Fault::Restart(node()?),
            "pause" => Fault::Pause(node()?),
            "resume" => Fault::Resume(node()?),
            "partition" => {
                let (a, b) = regions()?;
                Fault::Partition(a, b)
            }
            "heal" => {
                let (a, b) = regions()?;
                Fault::Heal(a, b)
            }
            "delay" => {
                let (a, b) = regions()?;
                let ms = body
                    .ms
                    .ok_or_else(|| invalid("ms", "a \"delay\" fault needs \"ms\"".into()))?;
                if ms > FAULT_DELAY_MS_MAX {
                    return Err(invalid(
                        "ms",
                        format!("ms must be at most {FAULT_DELAY_MS_MAX}"),
                    ));
                }
                Fault::Delay(a, b, ms)
            }
            other => {
                return Err(invalid(
                    "kind",
                    format!(
                        "unknown fault kind {other:?}; expected crash, restart, pause, resume, \
                         partition, heal or delay"
                    ),
                ))
            }
        };
        let (wants_node, wants_regions, wants_ms) = match fault {
            Fault::Crash(_) | Fault::Restart(_) | Fault::Pause(_) | Fault::Resume(_) => {
                (true, false, false)
            }
            Fault::Partition(..) | Fault::Heal(..) => (false, true, false),
            Fault::Delay(..) => (false, true, true),
        };
        for (present, wanted, field) in [
            (body.node.is_some(), wants_node, "node"),
            (body.regions.is_some(), wants_regions, "regions"),
            (body.ms.is_some(), wants_ms, "ms"),
        ] {
            if present && !wanted {
                return Err(invalid(
                    field,
                    format!("a {:?} fault takes no {field:?}", body.kind),
                ));
            }
        }
        Ok(fault)
    }
}

// ----- The cluster view ---------------------------------------------------------

/// The cluster view's shape is the API's (`harbor-api`).
pub use harbor_api::{ClusterView, FollowerView, GroupView, NodeView, ReplicaView};

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<Fault, ApiError> {
        Fault::parse(serde_json::from_str(json).unwrap())
    }

    #[test]
    fn faults_parse_strictly() {
        assert_eq!(
            parse(r#"{"kind":"crash","node":"madrid-1"}"#).unwrap(),
            Fault::Crash(NodeId::new("madrid-1").unwrap())
        );
        assert!(matches!(
            parse(r#"{"kind":"delay","regions":["madrid","newyork"],"ms":200}"#).unwrap(),
            Fault::Delay(_, _, 200)
        ));
        for bad in [
            r#"{"kind":"explode","node":"madrid-1"}"#,
            r#"{"kind":"crash"}"#,
            r#"{"kind":"crash","node":"madrid-1","ms":3}"#,
            r#"{"kind":"partition","regions":["madrid"]}"#,
            r#"{"kind":"partition","regions":["madrid","madrid"]}"#,
            r#"{"kind":"delay","regions":["madrid","newyork"]}"#,
            r#"{"kind":"delay","regions":["madrid","newyork"],"ms":600000}"#,
        ] {
            let e = parse(bad).unwrap_err();
            assert_eq!(e.code, ErrorCode::InvalidField, "{bad}");
        }
    }
}

//! `/v1/admin`: the cluster as the control plane sees it, planned leader
//! transfers, and (in dev mode only) faults on demand. The gateway answers
//! the cluster view itself; transfers and faults go to the [`Admin`] hooks
//! of whoever runs the control plane.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response as HttpResponse};
use futures::future::BoxFuture;
use harbor_meta::GenerationEnd;
use harbor_replication::Role;
use harbor_types::{Generation, LogIndex, NodeId, Region, ShardId};
use harbor_wire::{GroupStatus, Query, QueryResult, Request, Response};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::api::parse_json;
use crate::error::ApiError;
use crate::router::Gateway;

/// A replica that does not answer within this is shown as unreachable.
const STATUS_TIMEOUT_MS: u64 = 300;

/// What the control plane's runner offers the admin API.
pub trait Admin: Send + Sync {
    /// Moves `shard`'s leadership to `to`; answers when it is done.
    fn transfer_leader(&self, shard: ShardId, to: NodeId)
        -> BoxFuture<'_, Result<Value, ApiError>>;
    /// Injects a fault. Only `harbor dev` implements it.
    fn fault(&self, fault: Fault) -> BoxFuture<'_, Result<Value, ApiError>> {
        let _ = fault;
        Box::pin(async {
            Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "faults_disabled",
                "faults on demand exist only in `harbor dev`",
            ))
        })
    }
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
struct FaultBody {
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

    fn parse(body: FaultBody) -> Result<Fault, ApiError> {
        let invalid = |field: &'static str, message: String| {
            ApiError::unprocessable("invalid_field", message).with("field", field)
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

/// `GET /v1/admin/cluster`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ClusterView {
    pub map_version: u64,
    pub regions: Vec<Region>,
    pub nodes: Vec<NodeView>,
    pub groups: Vec<GroupView>,
    /// The gateway that assembled the view, and how long it took.
    pub gateway: NodeId,
    pub gathered_ms: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NodeView {
    pub node: NodeId,
    pub region: Region,
    /// `up` when every replica on it answered, `degraded` when some did,
    /// `unreachable` when none did.
    pub health: String,
    pub replicas: usize,
    pub replicas_answering: usize,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct GroupView {
    pub shard: ShardId,
    pub home_region: Region,
    pub leader: NodeId,
    pub generation: Generation,
    pub members: Vec<NodeId>,
    /// Where recent generations' logs ended (newest last).
    pub generation_ends: Vec<GenerationEnd>,
    /// The named leader answered as leader of the published generation and
    /// committed its first entry.
    pub leader_ready: bool,
    pub commit_index: Option<LogIndex>,
    /// Each follower as the leader sees it (empty when the leader does not
    /// answer).
    pub followers: Vec<FollowerView>,
    /// Each member as it sees itself.
    pub replicas: Vec<ReplicaView>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ReplicaView {
    pub node: NodeId,
    pub region: Region,
    /// `leader`, `follower`, or `unknown` when it did not answer.
    pub role: String,
    pub answering: bool,
    pub applied: Option<harbor_types::CommitToken>,
    /// How old its state may be (see `Served::staleness_ms`); `None` when
    /// it knows no bound or did not answer.
    pub staleness_ms: Option<u64>,
    /// It lost its durable state (a replaced disk) and has not caught up:
    /// it will not lead, and a failover does not count on it.
    #[serde(default)]
    pub recovering: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FollowerView {
    pub node: NodeId,
    pub local: bool,
    pub lag_entries: u64,
    pub lag_ms: u64,
}

impl Gateway {
    /// Asks every replica of every group for its status, all at once.
    pub async fn cluster_view(&self) -> ClusterView {
        let started = std::time::Instant::now();
        // An admin view is worth a fresh copy of the map (a gateway's copy
        // may trail the metadata plane by its refresh interval).
        if let Err(e) = self.meta.refresh().await {
            tracing::warn!(error = %e, "cluster view from a possibly stale map");
        }
        let map = self.meta.map();
        let asks: Vec<(ShardId, NodeId)> = map
            .groups
            .values()
            .flat_map(|g| g.members.iter().map(move |m| (g.shard, m.clone())))
            .collect();
        let answers: Vec<(ShardId, NodeId, Option<GroupStatus>)> =
            futures::future::join_all(asks.into_iter().map(|(shard, node)| async move {
                let request = Request::Read {
                    shard,
                    query: Query::Status,
                };
                let status = match self
                    .call_node_within(&node, request, STATUS_TIMEOUT_MS)
                    .await
                {
                    Ok(Response::Read {
                        result: QueryResult::Status(status),
                        ..
                    }) => Some(status),
                    _ => None,
                };
                (shard, node, status)
            }))
            .await;
        let nodes = map
            .nodes
            .iter()
            .map(|info| {
                let mine: Vec<_> = answers.iter().filter(|(_, n, _)| *n == info.node).collect();
                let answering = mine.iter().filter(|(_, _, s)| s.is_some()).count();
                let health = match answering {
                    0 => "unreachable",
                    n if n == mine.len() => "up",
                    _ => "degraded",
                };
                NodeView {
                    node: info.node.clone(),
                    region: info.region.clone(),
                    health: health.into(),
                    replicas: mine.len(),
                    replicas_answering: answering,
                }
            })
            .collect();
        let groups = map
            .groups
            .values()
            .map(|g| {
                let leader = answers.iter().find_map(|(shard, node, status)| {
                    status.as_ref().filter(|s| {
                        *shard == g.shard
                            && *node == g.leader
                            && s.replica.role == Role::Leader
                            && s.replica.generation == g.generation
                    })
                });
                GroupView {
                    shard: g.shard,
                    home_region: g.home_region.clone(),
                    leader: g.leader.clone(),
                    generation: g.generation,
                    members: g.members.clone(),
                    generation_ends: g.ended.clone(),
                    leader_ready: leader.is_some_and(|s| s.ready),
                    commit_index: leader.map(|s| s.replica.commit_index),
                    followers: leader
                        .map(|s| {
                            s.replica
                                .followers
                                .iter()
                                .map(|f| FollowerView {
                                    node: f.node.clone(),
                                    local: f.local,
                                    lag_entries: f.lag_entries,
                                    lag_ms: f.lag_ms,
                                })
                                .collect()
                        })
                        .unwrap_or_default(),
                    replicas: g
                        .members
                        .iter()
                        .map(|member| {
                            let status = answers.iter().find_map(|(shard, node, status)| {
                                status
                                    .as_ref()
                                    .filter(|_| *shard == g.shard && node == member)
                            });
                            ReplicaView {
                                node: member.clone(),
                                region: map.region_of(member).cloned().unwrap_or_else(|| {
                                    Region::new("unknown").expect("a valid region name")
                                }),
                                role: match status.map(|s| s.replica.role) {
                                    Some(Role::Leader) => "leader",
                                    Some(Role::Follower) => "follower",
                                    None => "unknown",
                                }
                                .into(),
                                answering: status.is_some(),
                                applied: status.and_then(|s| s.applied),
                                staleness_ms: status.and_then(|s| s.staleness_ms),
                                recovering: status.is_some_and(|s| s.replica.recovering),
                            }
                        })
                        .collect(),
                }
            })
            .collect();
        ClusterView {
            map_version: map.map_version,
            regions: map.regions(),
            nodes,
            groups,
            gateway: self.me.clone(),
            gathered_ms: started.elapsed().as_millis() as u64,
        }
    }
}

// ----- Handlers -----------------------------------------------------------------

type Gw = State<Arc<Gateway>>;

pub(crate) async fn cluster(State(gw): Gw) -> HttpResponse {
    (StatusCode::OK, axum::Json(gw.cluster_view().await)).into_response()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TransferBody {
    to: String,
}

/// `{group}` is `3` or `shard3`.
fn parse_group(gw: &Gateway, text: &str) -> Result<ShardId, ApiError> {
    let digits = text.strip_prefix("shard").unwrap_or(text);
    let shard = digits
        .parse::<u32>()
        .ok()
        .filter(|_| !digits.starts_with('+'))
        .map(ShardId)
        .ok_or_else(|| {
            ApiError::bad_request(
                "invalid_group",
                format!("group must be a shard number like 3 or shard3, not {text:?}"),
            )
        })?;
    if !gw.meta.map().groups.contains_key(&shard) {
        return Err(
            ApiError::not_found("unknown_group", format!("no group {shard}")).with("shard", shard),
        );
    }
    Ok(shard)
}

pub(crate) async fn transfer_leader(
    State(gw): Gw,
    Path(group): Path<String>,
    body: Bytes,
) -> HttpResponse {
    let result = async {
        let shard = parse_group(&gw, &group)?;
        let body: TransferBody = parse_json(&body)?;
        let to = NodeId::new(&body.to).map_err(|e| {
            ApiError::unprocessable("invalid_field", format!("to: {e}")).with("field", "to")
        })?;
        if gw.meta.map().region_of(&to).is_none() {
            return Err(
                ApiError::not_found("unknown_node", format!("no node {to}")).with("node", &to)
            );
        }
        let admin = gw.admin().ok_or_else(no_control_plane)?;
        admin.transfer_leader(shard, to).await
    }
    .await;
    answer(&gw, result)
}

pub(crate) async fn fault(State(gw): Gw, body: Bytes) -> HttpResponse {
    let result = async {
        let Some(admin) = gw.admin() else {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "faults_disabled",
                "faults on demand exist only in `harbor dev`",
            ));
        };
        let fault = Fault::parse(parse_json(&body)?)?;
        let map = gw.meta.map();
        match &fault {
            Fault::Crash(n) | Fault::Restart(n) | Fault::Pause(n) | Fault::Resume(n) => {
                if map.region_of(n).is_none() {
                    return Err(
                        ApiError::not_found("unknown_node", format!("no node {n}")).with("node", n)
                    );
                }
            }
            Fault::Partition(a, b) | Fault::Heal(a, b) | Fault::Delay(a, b, _) => {
                let regions = map.regions();
                for r in [a, b] {
                    if !regions.contains(r) {
                        return Err(ApiError::not_found(
                            "unknown_region",
                            format!("region {r} is not part of this cluster"),
                        )
                        .with("region", r));
                    }
                }
            }
        }
        admin.fault(fault).await
    }
    .await;
    answer(&gw, result)
}

fn no_control_plane() -> ApiError {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "unavailable",
        "this gateway has no control plane to ask",
    )
}

fn answer(gw: &Gateway, result: Result<Value, ApiError>) -> HttpResponse {
    match result {
        Ok(mut body) => {
            if let Value::Object(map) = &mut body {
                map.insert("node".into(), json!(gw.me));
                map.insert("served_by".into(), json!("control_plane"));
            }
            (StatusCode::OK, axum::Json(body)).into_response()
        }
        Err(e) => gw.stamp_error(e).into_response(),
    }
}

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
            assert_eq!(e.code, "invalid_field", "{bad}");
        }
    }
}

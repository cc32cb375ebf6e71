//! `/v1/admin` and `/metrics`: the cluster view the gateway gathers itself
//! (every replica's status, all at once), planned leader transfers and
//! faults handed to the [`Admin`] hooks, and the metrics scrape.

use harbor_api::ErrorCode;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response as HttpResponse};
use harbor_meta::MembersGoal;
use harbor_replication::Role;
use harbor_types::{NodeId, ShardId};
use harbor_wire::{GroupStatus, Query, QueryResult, Request, Response};
use serde_json::{json, Map, Value};

use crate::admin::{
    AdminError, ClusterView, Fault, FollowerView, GroupView, NodeView, ReplicaView,
};
use crate::api::object;
use crate::body::parse_json;
use crate::error::ApiError;
use crate::router::Gateway;

use harbor_types::limits::ADMIN_STATUS_TIMEOUT_MS as STATUS_TIMEOUT_MS;

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
                    .endpoint()
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
                    node: info.node.to_string(),
                    region: info.region.to_string(),
                    health: health.into(),
                    replicas: mine.len() as u64,
                    replicas_answering: answering as u64,
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
                    shard: g.shard.0,
                    home_region: g.home_region.to_string(),
                    leader: g.leader.to_string(),
                    generation: g.generation.0,
                    members: g.members.iter().map(|m| m.to_string()).collect(),
                    learners: g.learners.iter().map(|m| m.to_string()).collect(),
                    leaving: g.leaving.iter().map(|m| m.to_string()).collect(),
                    members_epoch: g.members_epoch,
                    generation_ends: g
                        .ended
                        .iter()
                        .map(|e| harbor_api::GenerationEnd {
                            generation: e.generation.0,
                            last_index: e.last_index.0,
                        })
                        .collect(),
                    leader_ready: leader.is_some_and(|s| s.ready),
                    commit_index: leader.map(|s| s.replica.commit_index.0),
                    followers: leader
                        .map(|s| {
                            s.replica
                                .followers
                                .iter()
                                .map(|f| FollowerView {
                                    node: f.node.to_string(),
                                    local: f.local,
                                    voter: f.voter,
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
                                node: member.to_string(),
                                region: map
                                    .region_of(member)
                                    .map_or_else(|| "unknown".to_string(), |r| r.to_string()),
                                role: match status.map(|s| s.replica.role) {
                                    Some(Role::Leader) => "leader",
                                    Some(Role::Follower) => "follower",
                                    None => "unknown",
                                }
                                .into(),
                                answering: status.is_some(),
                                applied: status
                                    .and_then(|s| s.applied)
                                    .map(harbor_api::CommitToken::from),
                                staleness_ms: status.and_then(|s| s.staleness_ms),
                                recovering: status.is_some_and(|s| s.replica.recovering),
                                changes_retained_bytes: status
                                    .map_or(0, |s| s.changes_retained_bytes),
                            }
                        })
                        .collect(),
                }
            })
            .collect();
        ClusterView {
            map_version: map.map_version,
            regions: map.regions().iter().map(|r| r.to_string()).collect(),
            nodes,
            groups,
            gateway: self.me.to_string(),
            gathered_ms: started.elapsed().as_millis() as u64,
        }
    }
}

// ----- Handlers -----------------------------------------------------------------

type Gw = State<Arc<Gateway>>;

pub(crate) async fn cluster(State(gw): Gw) -> HttpResponse {
    (StatusCode::OK, axum::Json(gw.cluster_view().await)).into_response()
}

/// `{group}` is `3` or `shard3`.
pub(crate) fn parse_group(gw: &Gateway, text: &str) -> Result<ShardId, ApiError> {
    let digits = text.strip_prefix("shard").unwrap_or(text);
    let shard = digits
        .parse::<u32>()
        .ok()
        .filter(|_| !digits.starts_with('+'))
        .map(ShardId)
        .ok_or_else(|| {
            ApiError::bad_request(
                ErrorCode::InvalidGroup,
                format!("group must be a shard number like 3 or shard3, not {text:?}"),
            )
        })?;
    if !gw.meta.map().groups.contains_key(&shard) {
        return Err(
            ApiError::not_found(ErrorCode::UnknownGroup, format!("no group {shard}"))
                .with("shard", shard),
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
        let body: harbor_api::TransferLeader = parse_json(&body)?;
        let to = known_node(&gw, "to", &body.to)?;
        let admin = gw.admin().ok_or_else(no_control_plane)?;
        admin
            .transfer_leader(shard, to)
            .await
            .map(object)
            .map_err(|e| admin_error(&e))
    }
    .await;
    answer(&gw, result)
}

/// A node named in a body's `field`: 422 if not a name, 404 if not in the
/// map.
fn known_node(gw: &Gateway, field: &'static str, text: &str) -> Result<NodeId, ApiError> {
    let node = NodeId::new(text).map_err(|e| {
        ApiError::unprocessable(ErrorCode::InvalidField, format!("{field}: {e}"))
            .with("field", field)
    })?;
    if gw.meta.map().region_of(&node).is_none() {
        return Err(
            ApiError::not_found(ErrorCode::UnknownNode, format!("no node {node}"))
                .with("node", &node),
        );
    }
    Ok(node)
}

pub(crate) async fn change_members(
    State(gw): Gw,
    Path(group): Path<String>,
    body: Bytes,
) -> HttpResponse {
    let result = async {
        let shard = parse_group(&gw, &group)?;
        let body: harbor_api::ChangeMembers = parse_json(&body)?;
        let goal = match (&body.add, &body.remove) {
            (Some(n), None) => MembersGoal::Add(known_node(&gw, "add", n)?),
            (None, Some(n)) => MembersGoal::Remove(known_node(&gw, "remove", n)?),
            _ => {
                return Err(ApiError::unprocessable(
                    ErrorCode::InvalidRequest,
                    "give exactly one of \"add\" and \"remove\", a node's name".to_string(),
                ))
            }
        };
        let admin = gw.admin().ok_or_else(no_control_plane)?;
        admin
            .change_members(shard, goal)
            .await
            .map(object)
            .map_err(|e| admin_error(&e))
    }
    .await;
    answer(&gw, result)
}

pub(crate) async fn fault(State(gw): Gw, body: Bytes) -> HttpResponse {
    let result = async {
        let Some(admin) = gw.admin() else {
            return Err(admin_error(&AdminError::FaultsDisabled));
        };
        let fault = Fault::parse(parse_json(&body)?)?;
        let map = gw.meta.map();
        match &fault {
            Fault::Crash(n) | Fault::Restart(n) | Fault::Pause(n) | Fault::Resume(n) => {
                if map.region_of(n).is_none() {
                    return Err(ApiError::not_found(
                        ErrorCode::UnknownNode,
                        format!("no node {n}"),
                    )
                    .with("node", n));
                }
            }
            Fault::Partition(a, b) | Fault::Heal(a, b) | Fault::Delay(a, b, _) => {
                let regions = map.regions();
                for r in [a, b] {
                    if !regions.contains(r) {
                        return Err(ApiError::not_found(
                            ErrorCode::UnknownRegion,
                            format!("region {r} is not part of this cluster"),
                        )
                        .with("region", r));
                    }
                }
            }
        }
        admin
            .fault(fault)
            .await
            .map(object)
            .map_err(|e| admin_error(&e))
    }
    .await;
    answer(&gw, result)
}

/// The control plane's refusal of an admin request, as an HTTP answer.
pub(crate) fn admin_error(e: &AdminError) -> ApiError {
    let (status, code) = match e {
        AdminError::Refused { code, .. } => (StatusCode::CONFLICT, *code),
        AdminError::Unavailable { code, .. } => (StatusCode::SERVICE_UNAVAILABLE, *code),
        AdminError::FaultsDisabled => (StatusCode::FORBIDDEN, ErrorCode::FaultsDisabled),
        AdminError::Failed { code, .. } => (StatusCode::INTERNAL_SERVER_ERROR, *code),
    };
    let mut error = ApiError::new(status, code, e.to_string());
    error.retryable = matches!(e, AdminError::Unavailable { .. });
    error
}

pub(crate) fn no_control_plane() -> ApiError {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        ErrorCode::Unavailable,
        "this gateway has no control plane to ask",
    )
}

pub(crate) fn answer(gw: &Gateway, result: Result<Map<String, Value>, ApiError>) -> HttpResponse {
    match result {
        Ok(mut body) => {
            body.insert("node".into(), json!(gw.me));
            body.insert("served_by".into(), json!("control_plane"));
            (StatusCode::OK, axum::Json(body)).into_response()
        }
        Err(e) => gw.stamp_error(e).into_response(),
    }
}

pub(crate) async fn metrics(State(gw): Gw) -> HttpResponse {
    let view = gw.cluster_view().await;
    // The projection's lag as of this scrape, so a stalled projection
    // shows a growing lag (-1 while it has no watermark).
    if gw.projections.running() {
        let lag = gw
            .projections
            .read(|p| p.watermark())
            .map_or(-1, |w| crate::projections::lag_ms(w) as i64);
        gw.metrics.projection_lag(lag);
    }
    gw.metrics.render(&view)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_control_planes_refusals_map_to_status_codes() {
        let cases = [
            (
                AdminError::Refused {
                    code: harbor_api::ErrorCode::TransferRefused,
                    message: "already the leader".into(),
                },
                StatusCode::CONFLICT,
                false,
            ),
            (
                AdminError::Unavailable {
                    code: harbor_api::ErrorCode::TransferAbandoned,
                    message: "the target fell behind".into(),
                },
                StatusCode::SERVICE_UNAVAILABLE,
                true,
            ),
            (AdminError::FaultsDisabled, StatusCode::FORBIDDEN, false),
            (
                AdminError::Failed {
                    code: harbor_api::ErrorCode::RestartFailed,
                    message: "no disk".into(),
                },
                StatusCode::INTERNAL_SERVER_ERROR,
                false,
            ),
        ];
        for (admin, status, retryable) in cases {
            let e = admin_error(&admin);
            assert_eq!((e.status, e.retryable), (status, retryable), "{admin:?}");
            assert_eq!(e.message, admin.to_string());
        }
        assert_eq!(
            admin_error(&AdminError::FaultsDisabled).code,
            ErrorCode::FaultsDisabled
        );
    }
}

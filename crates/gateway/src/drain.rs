//! `POST /v1/admin/nodes/{node}/drain`: takes every replica off a node,
//! one step at a time (`harbor_meta::next_drain_step` plans each from the
//! map, read linearizably): a leadership it holds is transferred, then a
//! node of its region that holds none of the group gets a replica, and
//! the drained node's replica is removed. Each step goes through the
//! control plane like the admin call of its own, and is logged; the answer
//! lists them all. A drain that stops half way leaves every group whole
//! (each step is); asking again goes on from where it stopped.

use std::collections::BTreeSet;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::Response as HttpResponse;
use harbor_api::ErrorCode;
use harbor_meta::{next_drain_step, DrainStep, MembersGoal};
use harbor_types::NodeId;
use serde_json::{json, Map, Value};

use crate::body::parse_json;
use crate::cluster::{admin_error, answer, no_control_plane};
use crate::error::ApiError;
use crate::router::Gateway;

type Gw = State<std::sync::Arc<Gateway>>;

pub(crate) async fn drain_node(
    State(gw): Gw,
    Path(node): Path<String>,
    body: Bytes,
) -> HttpResponse {
    let result = drain(&gw, &node, &body).await;
    answer(&gw, result)
}

async fn drain(gw: &Gateway, node: &str, body: &Bytes) -> Result<Map<String, Value>, ApiError> {
    let started = Instant::now();
    if !body.is_empty() {
        // No fields are defined; an empty object is fine.
        let _: harbor_api::Empty = parse_json(body)?;
    }
    let node = NodeId::new(node).map_err(|e| {
        ApiError::bad_request(ErrorCode::InvalidField, format!("node: {e}")).with("field", "node")
    })?;
    if gw.meta.map().region_of(&node).is_none() {
        return Err(
            ApiError::not_found(ErrorCode::UnknownNode, format!("no node {node}"))
                .with("node", &node),
        );
    }
    let admin = gw.admin().ok_or_else(no_control_plane)?;
    // Nodes none of whose replicas answer take nothing (a node with no
    // replica yet cannot be told from a healthy one: it may).
    let unreachable: BTreeSet<String> = (gw.cluster_view().await.nodes.into_iter())
        .filter(|n| n.replicas > 0 && n.replicas_answering == 0)
        .map(|n| n.node)
        .collect();
    let usable = |n: &NodeId| !unreachable.contains(n.as_str());
    let mut steps: Vec<Value> = Vec::new();
    let failed = |steps: &Vec<Value>, e: ApiError| e.with("steps", steps);
    // Each group takes at most a transfer and a replacement; a bound in
    // case the map does not show a step's effect.
    let mut budget = 2 * gw.meta.map().groups.len() + 4;
    loop {
        let map = gw.meta.map_linearizable().await.map_err(|e| {
            failed(
                &steps,
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    ErrorCode::MetadataUnavailable,
                    format!("reading the map: {e}"),
                ),
            )
        })?;
        let step = next_drain_step(&map, &node, usable).map_err(|why| {
            failed(
                &steps,
                ApiError::new(StatusCode::CONFLICT, ErrorCode::MembersRefused, why),
            )
        })?;
        let Some(step) = step else { break };
        if budget == 0 {
            return Err(failed(
                &steps,
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    ErrorCode::Internal,
                    format!("the drain of {node} does not end; its last step was {step:?}"),
                ),
            ));
        }
        budget -= 1;
        let at = Instant::now();
        match step {
            DrainStep::Transfer { shard, to } => {
                tracing::info!(%node, %shard, %to, "drain: transferring the leadership");
                let done = admin.transfer_leader(shard, to.clone()).await;
                let done = done.map_err(|e| failed(&steps, admin_error(&e)))?;
                steps.push(json!({"shard": shard, "action": "transfer", "to": to, "pause_ms": done.pause_ms, "took_ms": at.elapsed().as_millis() as u64}));
            }
            DrainStep::Replace { shard, with } => {
                if let Some(with) = with {
                    tracing::info!(%node, %shard, %with, "drain: adding a replica in its place");
                    let added = admin
                        .change_members(shard, MembersGoal::Add(with.clone()))
                        .await;
                    let added = added.map_err(|e| failed(&steps, admin_error(&e)))?;
                    steps.push(json!({"shard": shard, "action": "add", "node": with, "took_ms": added.took_ms}));
                }
                tracing::info!(%node, %shard, "drain: removing its replica");
                let removed = admin
                    .change_members(shard, MembersGoal::Remove(node.clone()))
                    .await;
                let removed = removed.map_err(|e| failed(&steps, admin_error(&e)))?;
                steps.push(json!({"shard": shard, "action": "remove", "node": node, "took_ms": removed.took_ms}));
            }
        }
    }
    tracing::info!(%node, steps = steps.len(), "drain: done");
    let mut body = Map::new();
    body.insert("drained".into(), json!(node));
    body.insert("steps".into(), json!(steps));
    body.insert(
        "took_ms".into(),
        json!(started.elapsed().as_millis() as u64),
    );
    Ok(body)
}

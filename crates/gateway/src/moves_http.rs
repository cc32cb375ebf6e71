//! Bucket moves over HTTP: `POST /v1/admin/buckets/{bucket}/move` runs
//! one (the [`crate::mover::Mover`] core, its steps sent through this
//! gateway's calls and its metadata client) and answers when it is over;
//! `GET /v1/admin/moves` lists the moves under way, with their progress,
//! and the recent ones. A gateway that starts finishes the moves of its
//! region that were left under way (their driver stopped).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::Response as HttpResponse;
use harbor_api::ErrorCode;
use harbor_meta::{BucketMove, MetaCommand, MoveProgress};
use harbor_types::{BucketId, IssuerId, ShardId};
use harbor_wire::{Query, QueryResult, Request, Response};
use serde::Deserialize;
use serde_json::{json, Map, Value};

use crate::body::parse_json;
use crate::cluster::{answer, parse_group};
use crate::error::ApiError;
use crate::mover::{MoveFailure, MoveLimits, MoveStep, Mover};
use crate::router::Gateway;

type Gw = State<Arc<Gateway>>;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MoveBody {
    to: String,
}

/// Moves this gateway drives now: their live phase and progress.
#[derive(Default)]
pub(crate) struct Driving(std::sync::Mutex<BTreeMap<u64, (&'static str, MoveProgress)>>);

pub(crate) async fn move_bucket(
    State(gw): Gw,
    Path(bucket): Path<String>,
    body: Bytes,
) -> HttpResponse {
    let result = async {
        let bucket = parse_bucket(&gw, &bucket)?;
        let body: MoveBody = parse_json(&body)?;
        let to = parse_group(&gw, &body.to)?;
        gw.run_move(bucket, to).await
    }
    .await;
    answer(&gw, result)
}

impl Gateway {
    /// Begins a move of `bucket` to `to` in the metadata plane and drives
    /// it to its end in a task of its own; the answer of
    /// `POST /v1/admin/buckets/{bucket}/move`.
    pub(crate) async fn run_move(
        self: &Arc<Self>,
        bucket: BucketId,
        to: ShardId,
    ) -> Result<Map<String, Value>, ApiError> {
        let gw = self;
        let record = gw
            .meta
            .move_command(MetaCommand::BeginMove {
                bucket,
                to,
                at_ms: wall_ms(),
            })
            .await
            .map_err(|e| match e {
                harbor_meta::MetaError::Refused(reason) => {
                    ApiError::new(StatusCode::CONFLICT, ErrorCode::MoveRefused, reason)
                        .with("bucket", bucket.0)
                }
                other => ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    ErrorCode::MetadataUnavailable,
                    other.to_string(),
                ),
            })?;
        let untagged = match gw.untagged_issuers(record.from, bucket).await {
            Ok(untagged) => untagged,
            Err(reason) => {
                let _ = gw
                    .meta
                    .move_command(MetaCommand::EndMove {
                        id: record.id,
                        aborted: Some(reason.clone()),
                        progress: record.progress,
                        at_ms: wall_ms(),
                    })
                    .await;
                return Err(ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    ErrorCode::MoveAborted,
                    format!("the move of {bucket} aborted before it began: {reason}"),
                )
                .with("bucket", bucket.0)
                .with("aborted", true)
                .with("reason", reason));
            }
        };
        let started = std::time::Instant::now();
        // Its own task: a client that hangs up does not stop a move half
        // way (its bucket sealed).
        let driver = gw.clone();
        let ended = tokio::spawn(async move { driver.drive_move(record, untagged, false).await })
            .await
            .unwrap_or_else(|e| {
                Err(MoveFailure {
                    reason: format!("its driver failed: {e}"),
                    aborted: false,
                })
            });
        let took_ms = started.elapsed().as_millis() as u64;
        match ended {
            Ok(record) => Ok(move_answer(gw, &record, took_ms)),
            Err(failure) => Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                ErrorCode::MoveAborted,
                format!("the move of {bucket} aborted: {}", failure.reason),
            )
            .with("bucket", bucket.0)
            .with("aborted", failure.aborted)
            .with("reason", failure.reason)),
        }
    }
}

pub(crate) async fn list_moves(State(gw): Gw) -> HttpResponse {
    let map = gw.meta.map();
    let live = gw.driving.0.lock().unwrap().clone();
    let under_way: Vec<Value> = map
        .moves
        .values()
        .map(|m| {
            let mut line = move_line(m);
            if let Some((phase, progress)) = live.get(&m.id) {
                line.insert("step".into(), json!(phase));
                line.insert("progress".into(), json!(progress));
                line.insert("driven_here".into(), json!(true));
            }
            Value::Object(line)
        })
        .collect();
    let recent: Vec<Value> = map
        .recent_moves
        .iter()
        .rev()
        .map(|m| Value::Object(move_line(m)))
        .collect();
    let mut body = Map::new();
    body.insert("moves".into(), json!(under_way));
    body.insert("recent".into(), json!(recent));
    body.insert("map_version".into(), json!(map.map_version));
    answer(&gw, Ok(body))
}

fn move_line(m: &BucketMove) -> Map<String, Value> {
    let mut line = Map::new();
    line.insert("id".into(), json!(m.id));
    line.insert("bucket".into(), json!(m.bucket.0));
    line.insert("from".into(), json!(m.from.to_string()));
    line.insert("to".into(), json!(m.to.to_string()));
    line.insert("phase".into(), json!(m.phase.as_str()));
    line.insert("started_ms".into(), json!(m.started_ms));
    line.insert("ended_ms".into(), json!(m.ended_ms));
    line.insert("progress".into(), json!(m.progress));
    if let Some(reason) = &m.reason {
        line.insert("reason".into(), json!(reason));
    }
    line
}

fn move_answer(gw: &Gateway, record: &BucketMove, took_ms: u64) -> Map<String, Value> {
    let mut body = Map::new();
    body.insert("move_id".into(), json!(record.id));
    body.insert("bucket".into(), json!(record.bucket.0));
    body.insert("from".into(), json!(record.from.to_string()));
    body.insert("to".into(), json!(record.to.to_string()));
    body.insert("map_version".into(), json!(gw.meta.map().map_version));
    body.insert("pause_ms".into(), json!(record.progress.pause_ms));
    body.insert("copied_bytes".into(), json!(record.progress.copied_bytes));
    body.insert(
        "copied_reservations".into(),
        json!(record.progress.copied_reservations),
    );
    body.insert("copied_rows".into(), json!(record.progress.copied_rows));
    body.insert("passes".into(), json!(record.progress.passes));
    body.insert("took_ms".into(), json!(took_ms));
    body
}

/// `{bucket}` is a bucket number of this cluster.
fn parse_bucket(gw: &Gateway, text: &str) -> Result<BucketId, ApiError> {
    let count = gw.meta.map().buckets.len();
    let bucket = text
        .parse::<u32>()
        .ok()
        .filter(|_| !text.starts_with('+'))
        .ok_or_else(|| {
            ApiError::bad_request(
                ErrorCode::InvalidField,
                format!("bucket must be a number like 173, not {text:?}"),
            )
            .with("field", "bucket")
        })?;
    if bucket as usize >= count {
        return Err(ApiError::not_found(
            ErrorCode::UnknownBucket,
            format!(
                "no bucket {bucket}: this cluster has buckets 0 to {}",
                count.saturating_sub(1)
            ),
        ));
    }
    Ok(BucketId(bucket))
}

pub(crate) fn wall_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Gateway {
    /// Issuers the source group holds without their bucket (registered
    /// before buckets were recorded) that the directory places in
    /// `bucket`: the seal names them so the move takes them along.
    async fn untagged_issuers(
        &self,
        from: ShardId,
        bucket: BucketId,
    ) -> Result<Vec<IssuerId>, String> {
        let max = harbor_types::limits::CHANGES_PAGE_MAX as u32;
        let mut found = Vec::new();
        let mut after = None;
        loop {
            let query = Query::UntaggedIssuers { after, max };
            let request = Request::Read { shard: from, query };
            let ids = match self.call(request).await {
                Ok(Response::Read {
                    result: QueryResult::Issuers(ids),
                    ..
                }) => ids,
                other => return Err(format!("{from} did not list its issuers: {other:?}")),
            };
            for id in &ids {
                let entry = self
                    .meta
                    .find(id)
                    .await
                    .map_err(|e| format!("the directory did not answer for {id}: {e}"))?;
                if entry.is_some_and(|e| e.bucket == bucket) {
                    found.push(id.clone());
                }
            }
            if ids.len() < max as usize {
                return Ok(found);
            }
            after = ids.last().cloned();
        }
    }

    /// Runs a move to its end, one step at a time.
    pub(crate) async fn drive_move(
        &self,
        record: BucketMove,
        untagged: Vec<IssuerId>,
        recover: bool,
    ) -> Result<BucketMove, MoveFailure> {
        let id = record.id;
        let limits = MoveLimits::default();
        let now = self.clock();
        let (mut mover, mut step) = if recover {
            Mover::recover(now, record, limits)
        } else {
            Mover::start(now, record, untagged, limits)
        };
        let started = tokio::time::Instant::now();
        tracing::info!(id, bucket = %mover.record().bucket, from = %mover.record().from,
            to = %mover.record().to, recover, "move begins");
        loop {
            self.driving
                .0
                .lock()
                .unwrap()
                .insert(id, (mover.phase(), mover.progress()));
            let step_started = tokio::time::Instant::now();
            let (phase, what) = (mover.phase(), mover.step_name());
            step = match step {
                MoveStep::Write { shard, command } => {
                    let answer = self.call(Request::Write { shard, command }).await;
                    mover.on_response(self.clock(), answer.map_err(|e| e.to_string()))
                }
                MoveStep::Read { shard, query } => {
                    let answer = self.call(Request::Read { shard, query }).await;
                    mover.on_response(self.clock(), answer.map_err(|e| e.to_string()))
                }
                MoveStep::Meta(command) => {
                    let command = match command {
                        MetaCommand::EndMove {
                            id,
                            aborted,
                            progress,
                            ..
                        } => MetaCommand::EndMove {
                            id,
                            aborted,
                            progress,
                            at_ms: wall_ms(),
                        },
                        other => other,
                    };
                    let answer = self.meta.move_command(command).await;
                    mover.on_meta(self.clock(), answer)
                }
                MoveStep::WakeAt(at) => {
                    tokio::time::sleep_until(self.instant_of(at)).await;
                    mover.on_timer(self.clock())
                }
                MoveStep::Done(result) => {
                    self.driving.0.lock().unwrap().remove(&id);
                    let took = started.elapsed().as_millis();
                    match &*result {
                        Ok(record) => {
                            tracing::info!(id, took_ms = took, pause_ms = ?record.progress.pause_ms,
                            rows = record.progress.copied_rows, "move done")
                        }
                        Err(failure) => {
                            tracing::warn!(id, took_ms = took, reason = %failure.reason,
                            aborted = failure.aborted, "move failed")
                        }
                    }
                    return *result;
                }
            };
            let step_us = step_started.elapsed().as_micros() as u64;
            tracing::debug!(id, phase, what, step_us, "move step");
        }
    }

    /// Finishes (or aborts) the moves of this gateway's region left under
    /// way by a driver that stopped. Called once at start.
    pub fn recover_moves(self: &Arc<Self>) {
        let gw = self.clone();
        tokio::spawn(async move {
            // The map may trail at start: let it settle.
            tokio::time::sleep(Duration::from_millis(500)).await;
            let map = gw.meta.map();
            let mine: Vec<BucketMove> = map
                .moves
                .values()
                .filter(|m| {
                    map.groups
                        .get(&m.from)
                        .is_some_and(|g| g.home_region == gw.region)
                })
                .cloned()
                .collect();
            for record in mine {
                if gw.driving.0.lock().unwrap().contains_key(&record.id) {
                    continue;
                }
                let _ = gw.drive_move(record, Vec::new(), true).await;
            }
        });
    }
}

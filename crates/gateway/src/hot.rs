//! Hot buckets: `GET /v1/admin/buckets/hot?top=N` asks every group's
//! leader for its load (writes, their bytes and reads per bucket over the
//! last 10 to 30 s) and answers the hottest buckets of the cluster and each
//! group's load. The rebalancer (off unless the gateway's config turns it
//! on) looks at the loads of its region's groups every
//! `rebalance_interval_ms` and moves the bucket the pure
//! [`crate::rebalancer::plan`] picks, one move at a time.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Query as QueryParams, State};
use axum::response::Response as HttpResponse;
use harbor_api::ErrorCode;
use harbor_meta::MovePhase;
use harbor_types::limits::{LOAD_REPORT_BUCKETS_MAX, LOAD_WINDOW_MS};
use harbor_types::{BucketId, ShardId};
use harbor_wire::{LoadCounts, Query, QueryResult, Request, Response};
use serde::Deserialize;
use serde_json::{json, Map, Value};

use crate::cluster::answer;
use crate::error::ApiError;
use crate::rebalancer::{per_s, plan, GroupLoad};
use crate::router::Gateway;

type Gw = State<Arc<Gateway>>;

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct HotParams {
    #[serde(default)]
    top: Option<String>,
}

/// What the rebalancer did last (which buckets and groups cool down is
/// read from the map's recent moves, so it survives a restart and counts
/// moves made by hand).
#[derive(Default)]
pub(crate) struct Rebalancer {
    last: Mutex<Option<Value>>,
}

/// One bucket's load, as the answer shows it.
fn bucket_line(bucket: BucketId, counts: LoadCounts, group: &GroupLoad) -> Value {
    let window_ms = group.report.window_ms;
    let total = group.report.total.writes.max(1);
    json!({
        "bucket": bucket.0,
        "shard": group.shard.to_string(),
        "home_region": group.home_region.as_str(),
        "writes_per_s": per_s(counts.writes, window_ms),
        "bytes_per_s": per_s(counts.bytes, window_ms),
        "reads_per_s": per_s(counts.reads, window_ms),
        "share_of_group_writes_percent": counts.writes * 100 / total,
    })
}

pub(crate) async fn hot_buckets(
    State(gw): Gw,
    params: Result<QueryParams<HotParams>, axum::extract::rejection::QueryRejection>,
) -> HttpResponse {
    let result = async {
        let params = params
            .map(|QueryParams(p)| p)
            .map_err(|e| ApiError::bad_request(ErrorCode::InvalidQuery, e.body_text()))?;
        let top = match params.top.as_deref() {
            None => 10,
            Some(text) => text
                .parse::<u32>()
                .ok()
                .filter(|n| (1..=LOAD_REPORT_BUCKETS_MAX).contains(n))
                .ok_or_else(|| {
                    ApiError::bad_request(
                        ErrorCode::InvalidField,
                        format!("top must be within 1..={LOAD_REPORT_BUCKETS_MAX}, not {text:?}"),
                    )
                    .with("field", "top")
                })?,
        };
        let shards: Vec<ShardId> = gw.meta.map().groups.keys().copied().collect();
        let loads = gw.group_loads(&shards, top).await;
        let mut hottest: Vec<(u64, Value)> = Vec::new();
        let mut groups = Vec::new();
        for (shard, load) in loads {
            match load {
                Ok(group) => {
                    let mut buckets = Vec::new();
                    for (bucket, counts) in &group.report.buckets {
                        let line = bucket_line(*bucket, *counts, &group);
                        let rate = per_s(counts.writes, group.report.window_ms);
                        hottest.push((rate, line.clone()));
                        buckets.push(line);
                    }
                    let total = group.report.total;
                    let window_ms = group.report.window_ms;
                    groups.push(json!({
                        "shard": shard.to_string(),
                        "home_region": group.home_region.as_str(),
                        "window_ms": window_ms,
                        "writes_per_s": per_s(total.writes, window_ms),
                        "bytes_per_s": per_s(total.bytes, window_ms),
                        "reads_per_s": per_s(total.reads, window_ms),
                        "buckets": buckets,
                    }));
                }
                Err(reason) => groups.push(json!({"shard": shard.to_string(), "error": reason})),
            }
        }
        hottest.sort_by(|(a, _), (b, _)| b.cmp(a));
        hottest.truncate(top as usize);
        let mut body = Map::new();
        body.insert("top".into(), json!(top));
        let hottest: Vec<Value> = hottest.into_iter().map(|(_, line)| line).collect();
        body.insert("buckets".into(), json!(hottest));
        body.insert("groups".into(), json!(groups));
        let last = gw.rebalancer.last.lock().unwrap().clone();
        body.insert(
            "rebalancer".into(),
            json!({"enabled": gw.config.rebalance, "last": last}),
        );
        Ok(body)
    }
    .await;
    answer(&gw, result)
}

impl Gateway {
    /// Each group's load as its leader reports it, or why it did not.
    pub(crate) async fn group_loads(
        &self,
        shards: &[ShardId],
        top: u32,
    ) -> Vec<(ShardId, Result<GroupLoad, String>)> {
        let asks = shards.iter().map(|shard| async move {
            let request = Request::Read {
                shard: *shard,
                query: Query::BucketLoad { top },
            };
            let load = match self.call(request).await {
                Ok(Response::Read {
                    result: QueryResult::BucketLoad(report),
                    ..
                }) => {
                    let home_region = self
                        .meta
                        .map()
                        .groups
                        .get(shard)
                        .map(|g| g.home_region.clone());
                    home_region
                        .map(|home_region| GroupLoad {
                            shard: *shard,
                            home_region,
                            report,
                        })
                        .ok_or_else(|| format!("{shard} left the map"))
                }
                Ok(Response::Error(e)) | Err(e) => Err(e.to_string()),
                Ok(other) => Err(format!("an unexpected answer: {other:?}")),
            };
            (*shard, load)
        });
        futures::future::join_all(asks).await
    }

    /// Starts the rebalancer of this gateway's region if the config asks
    /// for it. Called once at start.
    pub fn start_rebalancer(self: &Arc<Self>) {
        if !self.config.rebalance {
            return;
        }
        let gw = self.clone();
        tokio::spawn(async move {
            let every = Duration::from_millis(gw.config.rebalance_interval_ms);
            loop {
                tokio::time::sleep(every).await;
                gw.rebalance_once().await;
            }
        });
    }

    /// One look at the region's loads, and the move they call for.
    async fn rebalance_once(self: &Arc<Self>) {
        let map = self.meta.map();
        let shards: Vec<ShardId> = (map.groups.values())
            .filter(|g| g.home_region == self.region)
            .map(|g| g.shard)
            .collect();
        // Groups in a move are busy, and so are those a move ended in
        // within two load windows (the target's counts start at the move,
        // so it looks lighter than it is until then); a moved bucket stays
        // where it went for the cool-down.
        let now_ms = crate::moves_http::wall_ms();
        let ago = |m: &harbor_meta::BucketMove| now_ms.saturating_sub(m.ended_ms.unwrap_or(now_ms));
        let recent = map
            .recent_moves
            .iter()
            .filter(|m| m.phase == MovePhase::Done);
        let busy: BTreeSet<ShardId> = (map.moves.values())
            .chain(recent.clone().filter(|m| ago(m) < 2 * LOAD_WINDOW_MS))
            .flat_map(|m| [m.from, m.to])
            .collect();
        let cooling: BTreeSet<BucketId> = recent
            .filter(|m| ago(m) < self.config.rebalance_cooldown_ms)
            .map(|m| m.bucket)
            .collect();
        let loads: Vec<GroupLoad> = (self.group_loads(&shards, 1).await.into_iter())
            .filter_map(|(_, load)| load.ok())
            .collect();
        let Some(plan) = plan(&loads, &busy, &cooling, self.config.rebalance_limits) else {
            return;
        };
        // A leader that has not heard of a move yet may report a bucket
        // the map gave away: only what the map says it owns moves.
        if self.meta.map().shard_of_bucket(plan.bucket) != plan.from {
            return;
        }
        tracing::info!(bucket = %plan.bucket, from = %plan.from, to = %plan.to,
            reason = %plan.reason, "the rebalancer moves a hot bucket");
        let outcome = match self.run_move(plan.bucket, plan.to).await {
            Ok(answer) => Value::Object(answer),
            Err(e) => json!({"error": e.code.as_str(), "message": e.message}),
        };
        *self.rebalancer.last.lock().unwrap() = Some(json!({
            "bucket": plan.bucket.0, "from": plan.from.to_string(), "to": plan.to.to_string(),
            "reason": plan.reason, "outcome": outcome,
        }));
    }
}

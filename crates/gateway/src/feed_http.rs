//! `GET /v1/changefeed?from=beginning|now|CURSOR[&shards=0,3][&resolved_ms=N][&follow=true|false]`:
//! the change streams of a gateway's groups as one NDJSON feed, read from
//! replicas in the gateway's region where it can (the leader otherwise).
//! The rules are [`Feed`]'s; this is its IO.

use std::collections::{BTreeMap, BTreeSet};
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Query as QueryParams, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response as HttpResponse};
use futures::channel::mpsc;
use futures::SinkExt;
use harbor_api::{ChangeKey, ChangeLine, ChangeSource, ErrorCode, FeedLine, HlcTime, ResolvedLine};
use harbor_reservation::Event;
use harbor_types::limits::{
    CHANGEFEED_POLL_MS, CHANGEFEED_RESOLVED_MS_DEFAULT, CHANGEFEED_RESOLVED_MS_MAX,
    CHANGEFEED_RESOLVED_MS_MIN, CHANGES_PAGE_MAX, LOCAL_READ_TIMEOUT_MS,
};

/// Pages of one group a following feed takes per round: a group written
/// faster than pages come back cannot hold the others (or memory) up.
const PAGES_PER_ROUND: usize = 4;
/// How long a feed that ends (`follow=false`) waits for every group to
/// hand over what it had committed.
const FEED_TO_END_MS_MAX: Duration = Duration::from_secs(10);
use harbor_types::{NodeId, ShardId, Timestamp};
use harbor_wire::{
    Change, ChangePosition, ChangesPage, Freshness, Query, QueryResult, Request, Response,
};
use serde::Deserialize;
use serde_json::json;

use crate::error::ApiError;
use crate::local::Local;
use crate::router::Gateway;
use harbor_cdc::feed::{Expired, Feed, FeedCursor, Next, Place, Sent, SnapshotRow};

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct FeedParams {
    #[serde(default)]
    from: Option<String>,
    #[serde(default)]
    shards: Option<String>,
    #[serde(default)]
    resolved_ms: Option<u64>,
    #[serde(default)]
    follow: Option<bool>,
}

type FeedQuery = Result<QueryParams<FeedParams>, axum::extract::rejection::QueryRejection>;

pub(crate) async fn changefeed(State(gw): State<Arc<Gateway>>, params: FeedQuery) -> HttpResponse {
    match start(&gw, params).await {
        Ok(response) => response,
        Err(e) => e.into_response(),
    }
}

async fn start(gw: &Arc<Gateway>, params: FeedQuery) -> Result<HttpResponse, ApiError> {
    let params = params
        .map(|QueryParams(p)| p)
        .map_err(|e| ApiError::bad_request(ErrorCode::InvalidQuery, e.body_text()))?;
    let resolved_ms = params.resolved_ms.unwrap_or(CHANGEFEED_RESOLVED_MS_DEFAULT);
    if !(CHANGEFEED_RESOLVED_MS_MIN..=CHANGEFEED_RESOLVED_MS_MAX).contains(&resolved_ms) {
        return Err(ApiError::bad_request(
            ErrorCode::InvalidQuery,
            format!(
                "resolved_ms must be within {CHANGEFEED_RESOLVED_MS_MIN}..={CHANGEFEED_RESOLVED_MS_MAX}, got {resolved_ms}"
            ),
        )
        .with("field", "resolved_ms"));
    }
    let follow = params.follow.unwrap_or(true);
    let map = gw.meta.map();
    let all: BTreeSet<ShardId> = map.groups.keys().copied().collect();
    let shards = match &params.shards {
        None => all.clone(),
        Some(text) => parse_shards(text, &all)?,
    };
    let from = params.from.as_deref().unwrap_or("now");
    let cursor = match from {
        "beginning" => FeedCursor::at(shards.iter().copied(), ChangePosition::START),
        "now" => {
            let mut positions = BTreeMap::new();
            for shard in &shards {
                positions.insert(*shard, Place::At(gw.applied_position(*shard).await?));
            }
            FeedCursor(positions)
        }
        text => {
            let cursor = FeedCursor::parse(text).map_err(|message| {
                ApiError::bad_request(ErrorCode::InvalidCursor, message).with("field", "from")
            })?;
            let named: BTreeSet<ShardId> = cursor.0.keys().copied().collect();
            if params.shards.is_some() && named != shards {
                return Err(ApiError::bad_request(
                    ErrorCode::InvalidCursor,
                    "the cursor follows other shards than `shards` names; leave `shards` out to resume",
                )
                .with("field", "shards"));
            }
            if let Some(unknown) = named.difference(&all).next() {
                return Err(ApiError::bad_request(
                    ErrorCode::InvalidCursor,
                    format!("the cursor names {unknown}, which this cluster does not have"),
                )
                .with("field", "from"));
            }
            cursor
        }
    };
    // A feed that ends sends what every group's leader had applied when
    // the request arrived.
    let mut until = BTreeMap::new();
    if !follow {
        for shard in cursor.0.keys() {
            until.insert(*shard, gw.applied_position(*shard).await?);
        }
    }
    let start = cursor.clone();
    let mut feed = Feed::new(cursor);
    // One page of each group before the answer's status: a position that
    // expired is a 410, not a line. Nothing was sent yet, so the cursor to
    // continue from is the one asked for, with the expired group moved.
    let mut first = Vec::new();
    if let Err(expired) = gw.poll(&mut feed, &mut first, !follow, 1).await {
        return Err(expired_error(&start, expired));
    }
    let (mut tx, rx) = mpsc::channel::<Result<Bytes, Infallible>>(16);
    let gw = gw.clone();
    tokio::spawn(async move {
        let _open = OpenFeed::new(gw.clone());
        let poll = Duration::from_millis(CHANGEFEED_POLL_MS);
        let resolved_every = Duration::from_millis(resolved_ms);
        let deadline = tokio::time::Instant::now() + FEED_TO_END_MS_MAX;
        let mut lines = first;
        let mut next_resolved = tokio::time::Instant::now();
        loop {
            // The client went away: the feed ends.
            if tx.is_closed() {
                return;
            }
            // Done once every group's changes reached where its leader
            // stood, and every group promised a mark for the last line (a
            // group just scanned has not yet).
            let done = !follow
                && until.iter().all(|(shard, end)| feed.reached(*shard, *end))
                && feed.promised().is_some();
            if done {
                lines.extend(feed.resolved_now().map(|sent| gw.line(&sent)));
            } else if tokio::time::Instant::now() >= next_resolved {
                lines.extend(feed.resolved().map(|sent| gw.line(&sent)));
                next_resolved = tokio::time::Instant::now() + resolved_every;
            }
            if !done && !follow && tokio::time::Instant::now() >= deadline {
                let mut e = ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    ErrorCode::Unavailable,
                    "a group did not answer with everything it had committed when the feed began; \
                     continue from the last line's cursor",
                );
                e.retryable = true;
                lines.push(FeedLine::Error(e.body()));
            }
            if !lines.is_empty() {
                let count = gw.count(&lines);
                if tx.send(Ok(ndjson(&mut lines))).await.is_err() {
                    return;
                }
                count.sent(&gw);
            }
            if done || (!follow && tokio::time::Instant::now() >= deadline) {
                return;
            }
            tokio::time::sleep(poll).await;
            if let Err(expired) = gw
                .poll(&mut feed, &mut lines, !follow, PAGES_PER_ROUND)
                .await
            {
                lines.push(FeedLine::Error(
                    expired_error(feed.cursor(), expired).body(),
                ));
                let _ = tx.send(Ok(ndjson(&mut lines))).await;
                return;
            }
        }
    });
    Ok((
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        Body::from_stream(rx),
    )
        .into_response())
}

/// Lines' worth of feed metrics, counted once they are sent.
struct Counted {
    changes: u64,
    resolved_wall_ms: Option<u64>,
}

impl Counted {
    fn sent(self, gw: &Gateway) {
        gw.metrics.feed_sent(self.changes);
        if let Some(wall_ms) = self.resolved_wall_ms {
            let now_ms = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as i64);
            gw.metrics.feed_resolved(now_ms - wall_ms as i64);
        }
    }
}

/// Counts a feed as open while it lives.
struct OpenFeed(Arc<Gateway>);

impl OpenFeed {
    fn new(gw: Arc<Gateway>) -> OpenFeed {
        gw.metrics.feed_opened();
        OpenFeed(gw)
    }
}

impl Drop for OpenFeed {
    fn drop(&mut self) {
        self.0.metrics.feed_closed();
    }
}

/// The lines as NDJSON, emptying `lines`.
fn ndjson(lines: &mut Vec<FeedLine>) -> Bytes {
    let mut text = String::new();
    for line in lines.drain(..) {
        text.push_str(&serde_json::to_string(&line).expect("lines serialize"));
        text.push('\n');
    }
    Bytes::from(text)
}

fn parse_shards(text: &str, all: &BTreeSet<ShardId>) -> Result<BTreeSet<ShardId>, ApiError> {
    let mut shards = BTreeSet::new();
    for part in text.split(',') {
        let shard = part
            .trim()
            .parse::<u32>()
            .ok()
            .map(ShardId)
            .filter(|s| all.contains(s))
            .ok_or_else(|| {
                ApiError::bad_request(
                    ErrorCode::InvalidQuery,
                    format!(
                        "shards: {part:?} is not a group of this cluster (0..{})",
                        all.len()
                    ),
                )
                .with("field", "shards")
            })?;
        shards.insert(shard);
    }
    Ok(shards)
}

fn expired_error(sent: &FeedCursor, expired: Expired) -> ApiError {
    let mut oldest = sent.clone();
    oldest.0.insert(expired.shard, Place::At(expired.oldest));
    ApiError::new(
        StatusCode::GONE,
        ErrorCode::CursorExpired,
        format!(
            "{} no longer keeps the changes at this cursor (a replica restarted, or the \
             retention budget evicted them); continue from oldest_cursor, knowing changes \
             between were not delivered, or start again from=beginning (which sends the \
             group's current rows first) or from=now",
            expired.shard
        ),
    )
    .with("oldest_cursor", oldest.encode())
    .with("shard", expired.shard.0)
}

impl Gateway {
    /// One round: every group's new changes, page after page, as lines.
    /// `leader_first`: ask the leader before a local replica (a feed that
    /// ends wants everything committed when it began).
    async fn poll(
        &self,
        feed: &mut Feed,
        lines: &mut Vec<FeedLine>,
        leader_first: bool,
        pages_max: usize,
    ) -> Result<(), Expired> {
        for shard in feed.shards() {
            for _ in 0..pages_max {
                let more = match feed.next(shard) {
                    Next::Changes(after) => {
                        let Some(page) = self.changes_after(shard, after, leader_first).await
                        else {
                            break;
                        };
                        let full = page.changes.len() >= CHANGES_PAGE_MAX;
                        match feed.take(shard, page) {
                            Ok(sent) => lines.extend(sent.iter().map(|s| self.line(s))),
                            // From the beginning on a log that no longer
                            // reaches back: the group's rows instead.
                            Err(_) if feed.scan_from_the_beginning(shard) => continue,
                            Err(expired) => return Err(expired),
                        }
                        full
                    }
                    Next::Scan(after) => {
                        // The first page from the leader: later than any
                        // replica's oldest kept change, so the changes after
                        // it are still there.
                        let floor = feed.scan_floor(shard);
                        let leader_first = leader_first || floor.is_none();
                        let Some(page) = self.scan_page(shard, after, floor, leader_first).await
                        else {
                            break;
                        };
                        let more = page.rows.next.is_some();
                        let at_time = page.at_time;
                        match feed.take_scan(shard, page) {
                            Ok(sent) => {
                                lines.extend(sent.iter().map(|s| self.snapshot_line(s, at_time)))
                            }
                            Err(_) => break, // a replica behind the scan: ask again later
                        }
                        more
                    }
                };
                if !more {
                    break;
                }
            }
        }
        Ok(())
    }

    /// Where change streams and scans of `shard` are read, in order: a
    /// replica in this region, then the leader, then the others
    /// (`leader_first`: the leader before all), each once.
    pub(crate) fn stream_replicas(&self, shard: ShardId, leader_first: bool) -> Vec<NodeId> {
        let map = self.meta.map();
        let Some(group) = map.groups.get(&shard) else {
            return Vec::new();
        };
        let mut order: Vec<NodeId> = Vec::new();
        if leader_first {
            order.push(group.leader.clone());
        }
        if let Local::Replica(node) = self.local_replica(shard) {
            order.push(node);
        }
        order.push(group.leader.clone());
        order.extend(group.members.iter().cloned());
        let mut seen = BTreeSet::new();
        order.retain(|node| seen.insert(node.clone()));
        order
    }

    /// A page of `shard`'s changes after `after`, from the first replica
    /// that has it: one in this region, then the leader, then the others.
    /// `None` when none answered (the feed waits; its resolved mark does
    /// not move past this group).
    pub(crate) async fn changes_after(
        &self,
        shard: ShardId,
        after: ChangePosition,
        leader_first: bool,
    ) -> Option<ChangesPage> {
        let map = self.meta.map();
        let group = map.groups.get(&shard)?;
        // Expired only if no replica that answered has it and the leader
        // (or every replica) answered: one restarted replica and a slow
        // leader do not end a feed.
        let mut expired: Option<ChangesPage> = None;
        let mut leader_answered = false;
        let mut silent = false;
        for node in self.stream_replicas(shard, leader_first) {
            let request = Request::LocalRead {
                shard,
                query: Query::Changes {
                    after,
                    max: CHANGES_PAGE_MAX as u32,
                },
                need: Freshness::default(),
            };
            let answer = self
                .endpoint()
                .call_node_within(&node, request, LOCAL_READ_TIMEOUT_MS)
                .await;
            let Ok(Response::Read {
                result: QueryResult::Changes(page),
                ..
            }) = answer
            else {
                silent = true;
                continue;
            };
            if page.expired.is_none() {
                return Some(page);
            }
            leader_answered |= node == group.leader;
            let older = |e: &ChangesPage| e.expired < page.expired;
            if !expired.as_ref().is_some_and(older) {
                expired = Some(page);
            }
        }
        expired.filter(|_| leader_answered || !silent)
    }

    /// Where `shard`'s stream stands now: after what its leader applied
    /// (a replica that says it leads, the map refreshed once if not).
    async fn applied_position(&self, shard: ShardId) -> Result<ChangePosition, ApiError> {
        for attempt in 0..2 {
            if attempt > 0 {
                let _ = self.meta.refresh().await;
            }
            let leader = self.meta.map().groups[&shard].leader.clone();
            let request = Request::Read {
                shard,
                query: Query::Status,
            };
            let answer = self
                .endpoint()
                .call_node_within(&leader, request, LOCAL_READ_TIMEOUT_MS)
                .await;
            if let Ok(Response::Read {
                result: QueryResult::Status(status),
                ..
            }) = answer
            {
                if status.ready {
                    let applied = status.applied.map(|a| a.index).unwrap_or_default();
                    return Ok(ChangePosition::entry_end(applied));
                }
            }
        }
        let mut e = ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::Unavailable,
            format!("{shard}: no leader said where its log stands; try again"),
        )
        .with("shard", shard.0);
        e.retryable = true;
        Err(e)
    }

    /// What `lines` will add to the feed metrics once sent.
    fn count(&self, lines: &[FeedLine]) -> Counted {
        Counted {
            changes: lines
                .iter()
                .filter(|l| matches!(l, FeedLine::Change(_)))
                .count() as u64,
            resolved_wall_ms: lines.iter().rev().find_map(|l| match l {
                FeedLine::Resolved(r) => Some(r.resolved.wall_ms),
                _ => None,
            }),
        }
    }

    fn line(&self, sent: &Sent) -> FeedLine {
        match sent {
            Sent::Change {
                shard,
                change,
                cursor,
            } => {
                let region = self.home_region_of(*shard);
                FeedLine::Change(change_line(change, region, cursor.encode()))
            }
            Sent::Resolved { resolved, cursor } => FeedLine::Resolved(ResolvedLine {
                cursor: cursor.encode(),
                resolved: hlc(*resolved),
            }),
            Sent::Snapshot { .. } => self.snapshot_line(sent, None),
        }
    }

    /// The home region of `shard`'s group, as a feed line's `source.region`
    /// (empty for a group the map does not name).
    fn home_region_of(&self, shard: ShardId) -> String {
        self.meta
            .map()
            .groups
            .get(&shard)
            .map(|g| g.home_region.to_string())
            .unwrap_or_default()
    }

    /// A row of an initial scan: `op: "snapshot"`, at the position (and
    /// time, `at_time`) of the state it shows.
    fn snapshot_line(&self, sent: &Sent, at_time: Option<Timestamp>) -> FeedLine {
        let Sent::Snapshot {
            shard,
            row,
            at,
            cursor,
        } = sent
        else {
            return self.line(sent);
        };
        let region = self.home_region_of(*shard);
        let (generation, issuer_id, reservation_id, token, after) = match row.as_ref() {
            SnapshotRow::Issuer(i) => (
                i.updated.map_or(0, |u| u.generation.0),
                i.issuer_id.to_string(),
                None,
                None,
                json!({"issuer_id": i.issuer_id.to_string(), "home_region": i.home_region.to_string(),
                       "limit": i.limit.0, "reserved": i.reserved.0}),
            ),
            SnapshotRow::Reservation(r) => (
                r.updated.generation.0,
                r.issuer_id.to_string(),
                Some(r.reservation_id.to_string()),
                Some(r.reservation_token.to_string()),
                reservation_after(r),
            ),
        };
        FeedLine::Change(ChangeLine {
            cursor: cursor.encode(),
            op: "snapshot".to_string(),
            source: ChangeSource {
                shard: shard.0,
                generation,
                index: at.index.0,
                sub: at.sub,
                region,
                hlc: hlc(at_time.unwrap_or(Timestamp::ZERO)),
            },
            key: ChangeKey {
                issuer_id,
                reservation_id,
            },
            reservation_token: token,
            before: None,
            after: Some(after),
        })
    }
}

fn hlc(at: Timestamp) -> HlcTime {
    HlcTime {
        wall_ms: at.wall_ms,
        logical: at.logical,
    }
}

/// A reservation as a feed line's `after` shows it.
fn reservation_after(reservation: &harbor_reservation::ReservationView) -> serde_json::Value {
    let row = crate::api::reservation_answer(reservation, None);
    json!({
        "reservation_id": row.reservation_id,
        "issuer_id": row.issuer_id,
        "reservation_token": row.reservation_token,
        "amount": row.amount,
        "desk": row.desk,
        "trader": row.trader,
        "status": row.status,
        "expires_at_ms": row.expires_at_ms,
        "customer_id": row.customer_id,
    })
}

/// A change in the Debezium envelope's shape.
pub fn change_line(change: &Change, region: String, cursor: String) -> ChangeLine {
    let event = &change.event;
    let position = event.position();
    let (op, issuer_id, reservation_id, token, before, after) = match event {
        Event::IssuerRegistered {
            issuer_id,
            home_region,
            limit,
            ..
        } => (
            "issuer_registered",
            issuer_id.to_string(),
            None,
            None,
            None,
            Some(
                json!({"issuer_id": issuer_id.to_string(), "home_region": home_region.to_string(), "limit": limit.0}),
            ),
        ),
        Event::LimitChanged {
            issuer_id,
            limit_before,
            limit,
            ..
        } => (
            "limit_changed",
            issuer_id.to_string(),
            None,
            None,
            Some(json!({"limit": limit_before.0})),
            Some(json!({"limit": limit.0})),
        ),
        Event::ReservationRejected {
            issuer_id,
            token,
            code,
            requested,
            remaining,
            ..
        } => (
            "reservation_rejected",
            issuer_id.to_string(),
            None,
            Some(token.to_string()),
            None,
            Some(json!({"error": code, "requested": requested.0, "remaining": remaining.0})),
        ),
        Event::TokenAbandoned {
            issuer_id, token, ..
        } => (
            "token_abandoned",
            issuer_id.to_string(),
            None,
            Some(token.to_string()),
            None,
            Some(json!({"status": "abandoned"})),
        ),
        // A bucket's move: its issuers' rows now change in the group that
        // acquired it (the key names no single issuer).
        Event::BucketAcquired {
            bucket,
            from,
            epoch,
            issuers,
            ..
        } => (
            "bucket_acquired",
            String::new(),
            None,
            None,
            None,
            Some(json!({"bucket": bucket.0, "from": from.0, "epoch": epoch,
                "issuers": issuers.iter().map(|i| i.to_string()).collect::<Vec<_>>()})),
        ),
        Event::BucketReleased {
            bucket,
            to,
            issuers,
            ..
        } => (
            "bucket_released",
            String::new(),
            None,
            None,
            None,
            Some(json!({"bucket": bucket.0, "to": to.0,
                "issuers": issuers.iter().map(|i| i.to_string()).collect::<Vec<_>>()})),
        ),
        Event::ReservationCreated { reservation, .. }
        | Event::ReservationConfirmed { reservation, .. }
        | Event::ReservationReleased { reservation, .. }
        | Event::ReservationExpired { reservation, .. } => {
            let op = match event {
                Event::ReservationCreated { .. } => "reservation_created",
                Event::ReservationConfirmed { .. } => "reservation_confirmed",
                Event::ReservationReleased { .. } => "reservation_released",
                _ => "reservation_expired",
            };
            let before = match event {
                Event::ReservationConfirmed { .. } => Some(json!({"status": "held"})),
                _ => None,
            };
            let after = reservation_after(reservation);
            (
                op,
                reservation.issuer_id.to_string(),
                Some(reservation.reservation_id.to_string()),
                Some(reservation.reservation_token.to_string()),
                before,
                Some(after),
            )
        }
    };
    ChangeLine {
        cursor,
        op: op.to_string(),
        source: ChangeSource {
            shard: position.shard.0,
            generation: position.generation.0,
            index: position.index.0,
            sub: change.sub,
            region,
            hlc: hlc(event.at()),
        },
        key: ChangeKey {
            issuer_id,
            reservation_id,
        },
        reservation_token: token,
        before,
        after,
    }
}

//! `POST /v1/reservations:batch`: many reservations in one request, each
//! with its own token and its own outcome. The gateway checks every item,
//! groups the valid ones by group, and orders each group's share as
//! [`Command::BucketBatch`] entries (one log entry and one answer for up to
//! `ENTRY_COMMANDS_MAX` reservations); a rejected or invalid item never
//! fails the others. An entry refused because one of its buckets is
//! moving is placed again by the refreshed map and sent again.

use harbor_api::ErrorCode;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::response::Response as HttpResponse;
use harbor_api::{BatchAnswer, BatchItem, BatchOutcome};
use harbor_reservation::{Command, Outcome, BATCH_COMMANDS_MAX};
use harbor_types::{BucketId, ShardId};

use crate::api::{reservation_answer, reserve_command, respond, unexpected_outcome, Place};
use crate::body::JsonBody;
use crate::error::ApiError;
use crate::reads::{Session, SESSION_HEADER};
use crate::router::Gateway;

/// A group's share of a batch larger than `ENTRY_COMMANDS_MAX` becomes
/// several entries, sent at once (the leader still makes them durable with
/// one fsync), each under the entry size limit (asserted in `limits`).
use harbor_types::limits::ENTRY_COMMANDS_MAX;

pub(crate) async fn reserve_batch(
    State(gw): State<Arc<Gateway>>,
    headers: HeaderMap,
    body: Result<JsonBody<harbor_api::ReserveBatch>, ApiError>,
) -> HttpResponse {
    respond(&gw, run(&gw, &headers, body).await)
}

async fn run(
    gw: &Gateway,
    headers: &HeaderMap,
    body: Result<JsonBody<harbor_api::ReserveBatch>, ApiError>,
) -> Result<HttpResponse, ApiError> {
    let mut session = Session::from_headers(headers)?;
    let JsonBody(body) = body?;
    let items = body.reservations;
    if items.is_empty() || items.len() > BATCH_COMMANDS_MAX {
        return Err(ApiError::unprocessable(
            ErrorCode::InvalidBatch,
            format!(
                "a batch holds 1 to {BATCH_COMMANDS_MAX} reservations, got {}",
                items.len()
            ),
        ));
    }
    let mut results: Vec<Option<BatchItem>> = vec![None; items.len()];
    // The items to write, with their issuer's bucket; the directory is
    // asked once per issuer.
    let mut pending: Vec<(usize, BucketId, Command)> = Vec::new();
    let mut bucket_of: HashMap<String, Result<BucketId, ApiError>> = HashMap::new();
    for (i, item) in items.iter().enumerate() {
        let checked = reserve_command(item);
        let placed = match checked {
            Err(e) => Err(e),
            Ok((command, issuer)) => {
                if !bucket_of.contains_key(issuer.as_str()) {
                    let found = match gw.directory(&issuer).await {
                        Ok((entry, _)) => Ok(entry.bucket),
                        // The metadata plane is down: nothing can be placed.
                        Err(e) if e.code == ErrorCode::MetadataUnavailable => return Err(e),
                        Err(e) => Err(e),
                    };
                    bucket_of.insert(issuer.to_string(), found);
                }
                bucket_of[issuer.as_str()]
                    .clone()
                    .map(|bucket| (bucket, command))
            }
        };
        match placed {
            Ok((bucket, command)) => pending.push((i, bucket, command)),
            Err(e) => results[i] = Some(failed(e)),
        }
    }
    // A group refuses a whole entry one of whose buckets it sealed (a
    // move): those items are placed again by the refreshed map and sent
    // again, as a single request's call follows its bucket.
    let deadline = tokio::time::Instant::now()
        + std::time::Duration::from_millis(gw.config.call.request_timeout_ms);
    let mut wait_ms = gw.config.call.news_wait_ms;
    while !pending.is_empty() {
        let map = gw.meta.map();
        let mut by_shard: BTreeMap<ShardId, Vec<(usize, BucketId, Command)>> = BTreeMap::new();
        for (i, bucket, command) in pending.drain(..) {
            let shard = map.shard_of_bucket(bucket);
            by_shard
                .entry(shard)
                .or_default()
                .push((i, bucket, command));
        }
        let writes = by_shard.into_iter().flat_map(|(shard, mut commands)| {
            // Split by moving, not cloning: the commands carry their strings.
            let mut chunks = Vec::new();
            while commands.len() > ENTRY_COMMANDS_MAX {
                let rest = commands.split_off(ENTRY_COMMANDS_MAX);
                chunks.push(std::mem::replace(&mut commands, rest));
            }
            chunks.push(commands);
            chunks.into_iter().map(move |chunk| async move {
                let commands = chunk.iter().map(|(_, b, c)| (*b, c.clone())).collect();
                let written = gw
                    .write(Place::group(shard), Command::BucketBatch(commands))
                    .await;
                (chunk, written)
            })
        });
        for (chunk, written) in futures::future::join_all(writes).await {
            let applied = match written {
                Ok(applied) => applied,
                Err(e) if e.code == ErrorCode::Moved && tokio::time::Instant::now() < deadline => {
                    pending.extend(chunk);
                    continue;
                }
                Err(e) => {
                    for (i, ..) in chunk {
                        results[i] = Some(failed(e.clone()));
                    }
                    continue;
                }
            };
            session.include(applied.commit_token);
            let Outcome::Batch(outcomes) = &applied.outcome else {
                let e = unexpected_outcome(&applied.outcome);
                for (i, ..) in chunk {
                    results[i] = Some(failed(e.clone()));
                }
                continue;
            };
            for ((i, ..), outcome) in chunk.into_iter().zip(outcomes) {
                let at = harbor_api::CommitToken::from(applied.commit_token);
                results[i] = Some(match outcome {
                    Outcome::Reservation {
                        reservation,
                        replayed,
                    } => BatchItem {
                        ok: true,
                        outcome: BatchOutcome::Reserved(Box::new(harbor_api::Reservation {
                            replayed: *replayed,
                            commit_token: Some(at),
                            ..reservation_answer(reservation, None)
                        })),
                    },
                    Outcome::Rejected(rejection) => {
                        failed(ApiError::rejection(rejection).with("commit_token", at))
                    }
                    other => failed(unexpected_outcome(other)),
                });
            }
        }
        if !pending.is_empty() {
            let _ = gw.meta.refresh().await;
            tokio::time::sleep(std::time::Duration::from_millis(wait_ms)).await;
            wait_ms = (wait_ms * 2).min(gw.config.call.leadership_wait_ms_max);
        }
    }
    let results: Vec<BatchItem> = results
        .into_iter()
        .zip(&items)
        .map(|(result, item)| {
            let mut result = result.expect("every item has a result");
            if let BatchOutcome::Refused { error, .. } = &mut result.outcome {
                error
                    .details
                    .entry("reservation_token")
                    .or_insert(item.reservation_token.clone().into());
            }
            result
        })
        .collect();
    let reserved = results.iter().filter(|r| r.ok).count() as u64;
    let answer = BatchAnswer {
        count: results.len() as u64,
        reserved,
        failed: results.len() as u64 - reserved,
        results,
        gateway_region: Some(gw.region.to_string()),
        session: Some(session.to_string()),
    };
    let mut response = (StatusCode::OK, axum::Json(answer)).into_response();
    response
        .headers_mut()
        .insert(SESSION_HEADER, session.header_value());
    Ok(response)
}

/// One item's failure: the error answer it would have had alone, and that
/// answer's HTTP status.
fn failed(e: ApiError) -> BatchItem {
    BatchItem {
        ok: false,
        outcome: BatchOutcome::Refused {
            http_status: e.status.as_u16(),
            error: e.body(),
        },
    }
}

//! The projection's HTTP answers: `GET /v1/search/reservations` and
//! `GET /v1/reports/exposure`, each saying how complete it is
//! (`served_by: projection`, `region`, `watermark`, `lag_ms`, `stale`),
//! and `POST /v1/admin/projections/{name}/rebuild`.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, Query as QueryParams, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response as HttpResponse};
use axum::Json;
use harbor_api::{
    CustomerAnswer, ErrorCode, ExposureLine, ExposureReport, HlcTime, ProjectionServed,
    ProjectionStatus, SearchAnswer,
};
use harbor_cdc::projection::{GroupBy, Search, SearchCursor};
use harbor_reservation::{Status, FIELD_LEN_MAX};
use harbor_types::limits::{
    PROJECTION_WAIT_MS_DEFAULT, PROJECTION_WAIT_MS_MAX, PROJECTION_WAIT_TOKENS_MAX,
    REPORT_MAX_LAG_MS_DEFAULT, SEARCH_LIMIT_DEFAULT, SEARCH_LIMIT_MAX, SEARCH_MAX_LAG_MS_DEFAULT,
};
use harbor_types::{Amount, CommitToken, IssuerId, Timestamp};
use serde::Deserialize;
use serde_json::json;

use crate::api::reservation_answer;
use crate::error::ApiError;
use crate::projections::lag_ms;
use crate::router::Gateway;

/// The name `harbor projection rebuild` and the metrics give the one
/// projection a gateway keeps (search and reports read it).
pub const PROJECTION_NAME: &str = "reservations";

type Params<T> = Result<QueryParams<T>, axum::extract::rejection::QueryRejection>;

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct SearchParams {
    issuer_id: Option<String>,
    desk: Option<String>,
    trader: Option<String>,
    status: Option<String>,
    customer_id: Option<String>,
    q: Option<String>,
    min_amount: Option<String>,
    max_amount: Option<String>,
    created_after_ms: Option<String>,
    created_before_ms: Option<String>,
    limit: Option<String>,
    cursor: Option<String>,
    min_as_of: Option<String>,
    wait_ms: Option<String>,
    max_lag_ms: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct CustomerParams {
    after: Option<String>,
    wait_ms: Option<String>,
    limit: Option<String>,
    cursor: Option<String>,
    max_lag_ms: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct ReportParams {
    group_by: Option<String>,
    min_as_of: Option<String>,
    wait_ms: Option<String>,
    max_lag_ms: Option<String>,
}

pub(crate) async fn search(
    State(gw): State<Arc<Gateway>>,
    params: Params<SearchParams>,
) -> HttpResponse {
    match run_search(&gw, params).await {
        Ok(answer) => Json(answer).into_response(),
        Err(e) => e.into_response(),
    }
}

pub(crate) async fn customer(
    State(gw): State<Arc<Gateway>>,
    Path(customer_id): Path<String>,
    params: Params<CustomerParams>,
) -> HttpResponse {
    match run_customer(&gw, customer_id, params).await {
        Ok(answer) => Json(answer).into_response(),
        Err(e) => e.into_response(),
    }
}

pub(crate) async fn exposure(
    State(gw): State<Arc<Gateway>>,
    params: Params<ReportParams>,
) -> HttpResponse {
    match run_exposure(&gw, params).await {
        Ok(answer) => Json(answer).into_response(),
        Err(e) => e.into_response(),
    }
}

pub(crate) async fn projections(State(gw): State<Arc<Gateway>>) -> HttpResponse {
    if let Err(e) = running(&gw) {
        return e.into_response();
    }
    Json(json!({ "projections": [status(&gw)] })).into_response()
}

/// Where this gateway's projection stands.
pub(crate) fn status(gw: &Gateway) -> ProjectionStatus {
    let saved = *gw
        .projections
        .saved
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    gw.projections.read(|p| {
        let (reservations, issuers) = p.size();
        let applied = p.applied();
        let watermark = p.watermark();
        ProjectionStatus {
            projection: PROJECTION_NAME.to_string(),
            region: gw.region.to_string(),
            watermark: watermark.map(|w| HlcTime {
                wall_ms: w.wall_ms,
                logical: w.logical,
            }),
            lag_ms: watermark.map(lag_ms),
            groups: p.shards().len() as u64,
            groups_scanning: p.groups_scanning() as u64,
            reservations: reservations as u64,
            issuers: issuers as u64,
            changes_applied: applied.changes,
            rows_scanned: applied.scanned_rows,
            scans: applied.scans,
            loaded_from_save: gw
                .projections
                .loaded
                .load(std::sync::atomic::Ordering::Relaxed),
            saved_bytes: saved.map(|s| s.bytes),
            saved_reservations: saved.map(|s| s.reservations),
            saved_ago_ms: saved.map(|s| s.at.elapsed().as_millis() as u64),
        }
    })
}

pub(crate) async fn rebuild(
    State(gw): State<Arc<Gateway>>,
    Path(name): Path<String>,
) -> HttpResponse {
    if name != PROJECTION_NAME {
        return ApiError::new(
            StatusCode::NOT_FOUND,
            ErrorCode::NotFound,
            format!("no projection {name:?}; this gateway keeps {PROJECTION_NAME:?}"),
        )
        .with("projections", [PROJECTION_NAME])
        .into_response();
    }
    if let Err(e) = running(&gw) {
        return e.into_response();
    }
    gw.projections.rebuild();
    Json(status(&gw)).into_response()
}

async fn run_search(gw: &Gateway, params: Params<SearchParams>) -> Result<SearchAnswer, ApiError> {
    let p = params
        .map(|QueryParams(p)| p)
        .map_err(|e| ApiError::bad_request(ErrorCode::InvalidQuery, e.body_text()))?;
    let limit = number("limit", p.limit.as_deref(), 1, SEARCH_LIMIT_MAX as u64)?
        .map_or(SEARCH_LIMIT_DEFAULT, |n| n as usize);
    let status = match p.status.as_deref() {
        None => None,
        Some(text) => Some(parse_status(text)?),
    };
    let issuer_id = match p.issuer_id {
        None => None,
        Some(text) => Some(IssuerId::new(text).map_err(|e| {
            ApiError::bad_request(ErrorCode::InvalidQuery, format!("issuer_id: {e}"))
                .with("field", "issuer_id")
        })?),
    };
    let before = cursor(p.cursor.as_deref())?;
    let search = Search {
        issuer_id,
        desk: p.desk,
        trader: p.trader,
        status,
        customer_id: p.customer_id,
        text: p.q.filter(|q| !q.trim().is_empty()),
        min_amount: number("min_amount", p.min_amount.as_deref(), 0, u64::MAX)?.map(Amount),
        max_amount: number("max_amount", p.max_amount.as_deref(), 0, u64::MAX)?.map(Amount),
        created_after_ms: number(
            "created_after_ms",
            p.created_after_ms.as_deref(),
            0,
            u64::MAX,
        )?,
        created_before_ms: number(
            "created_before_ms",
            p.created_before_ms.as_deref(),
            0,
            u64::MAX,
        )?,
        before,
        limit,
    };
    if let (Some(min), Some(max)) = (search.min_amount, search.max_amount) {
        if min > max {
            return Err(ApiError::bad_request(
                ErrorCode::InvalidQuery,
                format!("min_amount {min} is over max_amount {max}"),
            )
            .with("field", "min_amount"));
        }
    }
    if let (Some(after), Some(before)) = (search.created_after_ms, search.created_before_ms) {
        if after >= before {
            return Err(ApiError::bad_request(
                ErrorCode::InvalidQuery,
                format!("created_after_ms {after} is not before created_before_ms {before}"),
            )
            .with("field", "created_after_ms"));
        }
    }
    if let Some(customer_id) = &search.customer_id {
        check_customer(customer_id)?;
    }
    let max_lag_ms = number("max_lag_ms", p.max_lag_ms.as_deref(), 0, u64::MAX)?
        .unwrap_or(SEARCH_MAX_LAG_MS_DEFAULT);
    let wait = wait_params("min_as_of", p.min_as_of.as_deref(), p.wait_ms.as_deref())?;
    running(gw)?;
    let (page, watermark) =
        read_including(gw, &wait, |view| (view.search(&search), view.watermark())).await?;
    Ok(SearchAnswer {
        reservations: page
            .rows
            .iter()
            .map(|r| reservation_answer(r, None))
            .collect(),
        next_cursor: page.next.map(|c| c.encode()),
        served: served(gw, watermark, max_lag_ms),
    })
}

/// A customer's reservations across every issuer and group, once the
/// projection holds every commit token the caller names in `after` (what
/// it has seen: a customer never sees an effect without its cause).
async fn run_customer(
    gw: &Gateway,
    customer_id: String,
    params: Params<CustomerParams>,
) -> Result<CustomerAnswer, ApiError> {
    let p = params
        .map(|QueryParams(p)| p)
        .map_err(|e| ApiError::bad_request(ErrorCode::InvalidQuery, e.body_text()))?;
    check_customer(&customer_id)?;
    let limit = number("limit", p.limit.as_deref(), 1, SEARCH_LIMIT_MAX as u64)?
        .map_or(SEARCH_LIMIT_DEFAULT, |n| n as usize);
    let before = cursor(p.cursor.as_deref())?;
    let max_lag_ms = number("max_lag_ms", p.max_lag_ms.as_deref(), 0, u64::MAX)?
        .unwrap_or(SEARCH_MAX_LAG_MS_DEFAULT);
    let wait = wait_params("after", p.after.as_deref(), p.wait_ms.as_deref())?;
    running(gw)?;
    let search = Search {
        customer_id: Some(customer_id.clone()),
        before,
        limit,
        ..Search::default()
    };
    let (page, watermark) =
        read_including(gw, &wait, |view| (view.search(&search), view.watermark())).await?;
    Ok(CustomerAnswer {
        customer_id,
        reservations: page
            .rows
            .iter()
            .map(|r| reservation_answer(r, None))
            .collect(),
        next_cursor: page.next.map(|c| c.encode()),
        served: served(gw, watermark, max_lag_ms),
    })
}

fn check_customer(customer_id: &str) -> Result<(), ApiError> {
    if customer_id.is_empty()
        || customer_id.len() > FIELD_LEN_MAX
        || customer_id.chars().any(char::is_control)
    {
        return Err(ApiError::bad_request(
            ErrorCode::InvalidQuery,
            format!("customer_id must be 1 to {FIELD_LEN_MAX} bytes without control characters"),
        )
        .with("field", "customer_id"));
    }
    Ok(())
}

fn cursor(text: Option<&str>) -> Result<Option<SearchCursor>, ApiError> {
    let Some(text) = text else {
        return Ok(None);
    };
    SearchCursor::parse(text).map(Some).ok_or_else(|| {
        ApiError::bad_request(
            ErrorCode::InvalidCursor,
            format!("{text:?} is not a cursor of this search (send back a next_cursor)"),
        )
        .with("field", "cursor")
    })
}

async fn run_exposure(
    gw: &Gateway,
    params: Params<ReportParams>,
) -> Result<ExposureReport, ApiError> {
    let p = params
        .map(|QueryParams(p)| p)
        .map_err(|e| ApiError::bad_request(ErrorCode::InvalidQuery, e.body_text()))?;
    let text = p.group_by.as_deref().unwrap_or("desk");
    let group_by = GroupBy::parse(text).ok_or_else(|| {
        ApiError::bad_request(
            ErrorCode::InvalidQuery,
            format!("group_by must be desk, home_region or issuer, got {text:?}"),
        )
        .with("field", "group_by")
    })?;
    let max_lag_ms = number("max_lag_ms", p.max_lag_ms.as_deref(), 0, u64::MAX)?
        .unwrap_or(REPORT_MAX_LAG_MS_DEFAULT);
    let wait = wait_params("min_as_of", p.min_as_of.as_deref(), p.wait_ms.as_deref())?;
    running(gw)?;
    let (lines, watermark) = read_including(gw, &wait, |view| {
        (view.exposure(group_by), view.watermark())
    })
    .await?;
    Ok(ExposureReport {
        group_by: text.to_string(),
        lines: lines
            .into_iter()
            .map(|l| ExposureLine {
                key: l.key,
                reserved: l.reserved,
                held: l.held,
                confirmed: l.confirmed,
                held_count: l.held_count,
                confirmed_count: l.confirmed_count,
                limit: l.limit,
            })
            .collect(),
        served: served(gw, watermark, max_lag_ms),
    })
}

/// The commit tokens a read waits for, and for how long.
struct Wait {
    field: &'static str,
    tokens: Vec<CommitToken>,
    wait: Duration,
}

fn wait_params(
    field: &'static str,
    tokens_text: Option<&str>,
    wait_ms: Option<&str>,
) -> Result<Wait, ApiError> {
    let mut tokens = Vec::new();
    for text in tokens_text
        .unwrap_or("")
        .split(',')
        .filter(|t| !t.trim().is_empty())
    {
        let token: CommitToken = text.trim().parse().map_err(|e| {
            ApiError::bad_request(
                ErrorCode::InvalidQuery,
                format!("{field}: {text:?} is not a commit token ({e})"),
            )
            .with("field", field)
        })?;
        tokens.push(token);
    }
    if tokens.len() > PROJECTION_WAIT_TOKENS_MAX {
        return Err(ApiError::bad_request(
            ErrorCode::InvalidQuery,
            format!(
                "{field} names {} commit tokens; at most {PROJECTION_WAIT_TOKENS_MAX}",
                tokens.len()
            ),
        )
        .with("field", field));
    }
    let wait_ms = number("wait_ms", wait_ms, 0, PROJECTION_WAIT_MS_MAX)?
        .unwrap_or(PROJECTION_WAIT_MS_DEFAULT);
    Ok(Wait {
        field,
        tokens,
        wait: Duration::from_millis(wait_ms),
    })
}

/// Reads the projection with `f` once it includes every token of `wait`;
/// past its bound, `409 not_yet_visible` naming the ones still missing.
async fn read_including<T>(
    gw: &Gateway,
    wait: &Wait,
    f: impl Fn(&harbor_cdc::projection::Projection) -> T,
) -> Result<T, ApiError> {
    let shards = gw.projections.read(|p| p.shards());
    if let Some(unknown) = wait.tokens.iter().find(|t| !shards.contains(&t.shard)) {
        return Err(ApiError::bad_request(
            ErrorCode::InvalidQuery,
            format!(
                "{}: {unknown} names a group this cluster does not have",
                wait.field
            ),
        )
        .with("field", wait.field));
    }
    let missing = match gw
        .projections
        .read_including(&wait.tokens, wait.wait, f)
        .await
    {
        Ok(answer) => return Ok(answer),
        Err(missing) => missing,
    };
    let mut e = ApiError::new(
        StatusCode::CONFLICT,
        ErrorCode::NotYetVisible,
        format!(
            "the {} projection did not include {} of the commit tokens within {} ms; try again",
            gw.region,
            missing.len(),
            wait.wait.as_millis()
        ),
    )
    .with(
        "missing",
        missing.iter().map(|t| t.to_string()).collect::<Vec<_>>(),
    )
    .with("region", gw.region.to_string());
    e.retryable = true;
    Err(e)
}

fn running(gw: &Gateway) -> Result<(), ApiError> {
    if gw.projections.running() {
        return Ok(());
    }
    Err(ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        ErrorCode::Unavailable,
        "this gateway does not run projections",
    ))
}

fn served(gw: &Gateway, watermark: Option<Timestamp>, max_lag_ms: u64) -> ProjectionServed {
    let lag_ms = watermark.map(lag_ms);
    ProjectionServed {
        served_by: "projection".to_string(),
        region: gw.region.to_string(),
        watermark: watermark.map(|w| HlcTime {
            wall_ms: w.wall_ms,
            logical: w.logical,
        }),
        lag_ms,
        stale: lag_ms.is_none_or(|lag| lag > max_lag_ms),
        max_lag_ms,
    }
}

fn parse_status(text: &str) -> Result<Status, ApiError> {
    match text {
        "held" => Ok(Status::Held),
        "confirmed" => Ok(Status::Confirmed),
        "released" => Ok(Status::Released),
        "expired" => Ok(Status::Expired),
        other => Err(ApiError::bad_request(
            ErrorCode::InvalidQuery,
            format!("status must be held, confirmed, released or expired, got {other:?}"),
        )
        .with("field", "status")),
    }
}

/// An optional whole number within `min..=max`.
fn number(
    field: &'static str,
    text: Option<&str>,
    min: u64,
    max: u64,
) -> Result<Option<u64>, ApiError> {
    let Some(text) = text else {
        return Ok(None);
    };
    match text.parse::<u64>() {
        Ok(n) if (min..=max).contains(&n) => Ok(Some(n)),
        _ => Err(ApiError::bad_request(
            ErrorCode::InvalidQuery,
            format!("{field} must be a whole number within {min}..={max}, got {text:?}"),
        )
        .with("field", field)),
    }
}

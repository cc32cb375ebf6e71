//! The `/v1` HTTP API. Handlers validate everything before anything is sent
//! to a node: bad input gets a 4xx with a machine-readable code and changes
//! nothing.

use harbor_api::ErrorCode;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, Query as QueryParams, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response as HttpResponse};
use axum::Json;
use harbor_api as api;
use harbor_meta::{DirectoryEntry, DirectoryError, MetaError};
use harbor_replication::Role;
use harbor_reservation::{
    Command, IssuerView, Outcome, Rejection, ReservationView, Status, TokenOutcome, TokenView,
    HOLD_TTL_MS_MAX,
};
use harbor_types::{
    Amount, BucketId, IdError, IssuerId, Region, ReservationId, ReservationToken, ShardId,
    AMOUNT_MAX, ID_LEN_MAX,
};
use harbor_wire::{Query, QueryResult, Request, Response, Served};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use crate::body::{parse_json, JsonBody};
use crate::error::ApiError;
use crate::reads::{ReadAnswer, ReadParams, ReadPlan, Session, SESSION_HEADER};
use crate::router::Gateway;

type Gw = State<Arc<Gateway>>;
type ApiResult = Result<HttpResponse, ApiError>;

// ----- Request bodies ---------------------------------------------------------
//
// The bodies are `harbor-api`'s types (shared with `harbor-client`); here
// each field is checked and turned into a command.

/// Checks every field of a reserve; the command to order and its issuer.
pub(crate) fn reserve_command(body: &api::Reserve) -> Result<(Command, IssuerId), ApiError> {
    let token = token(&body.reservation_token)?;
    let issuer = issuer_id(&body.issuer_id)?;
    let amount = amount("amount", body.amount, 1)?;
    let desk = label("desk", &body.desk)?;
    let trader = label("trader", &body.trader)?;
    if let Some(ttl) = body.hold_ttl_ms {
        if ttl == 0 || ttl > HOLD_TTL_MS_MAX {
            return Err(ApiError::unprocessable(
                ErrorCode::InvalidField,
                format!("hold_ttl_ms must be from 1 to {HOLD_TTL_MS_MAX}, or null for a confirmed reservation"),
            )
            .with("field", "hold_ttl_ms"));
        }
    }
    let command = match &body.customer_id {
        None => Command::Reserve {
            token,
            issuer_id: issuer.clone(),
            amount,
            desk,
            trader,
            hold_ttl_ms: body.hold_ttl_ms,
        },
        Some(customer_id) => Command::ReserveForCustomer {
            token,
            issuer_id: issuer.clone(),
            amount,
            desk,
            trader,
            hold_ttl_ms: body.hold_ttl_ms,
            customer_id: label("customer_id", customer_id)?,
        },
    };
    Ok((command, issuer))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct TokenParams {
    #[serde(default)]
    issuer_id: Option<String>,
    #[serde(default)]
    consistency: Option<String>,
}

fn query_params<T: DeserializeOwned + Default>(
    params: Result<QueryParams<T>, axum::extract::rejection::QueryRejection>,
) -> Result<T, ApiError> {
    params
        .map(|QueryParams(p)| p)
        .map_err(|e| ApiError::bad_request(ErrorCode::InvalidQuery, e.body_text()))
}

/// Token lookups decide what a client does after a timeout: they are
/// always answered by the leader.
fn check_token_consistency(consistency: Option<&str>) -> Result<(), ApiError> {
    match consistency {
        None | Some("strong") => Ok(()),
        Some(other) => Err(ApiError::bad_request(
            ErrorCode::InvalidConsistency,
            format!("token lookups are always strong, got consistency={other:?}"),
        )
        .with("supported", ["strong"])),
    }
}

// ----- Validation -------------------------------------------------------------

fn invalid(field: &'static str, e: IdError) -> ApiError {
    ApiError::unprocessable(ErrorCode::InvalidField, e.to_string()).with("field", field)
}

fn issuer_id(text: &str) -> Result<IssuerId, ApiError> {
    IssuerId::new(text).map_err(|e| invalid("issuer_id", e))
}

fn reservation_id(text: &str) -> Result<ReservationId, ApiError> {
    ReservationId::parse(text).map_err(|_| {
        ApiError::unprocessable(
            ErrorCode::InvalidField,
            format!("reservation_id must look like ISSUER:r17, got {text:?}"),
        )
        .with("field", "reservation_id")
    })
}

fn token(text: &str) -> Result<ReservationToken, ApiError> {
    ReservationToken::new(text).map_err(|e| invalid("reservation_token", e))
}

fn amount(field: &'static str, value: u64, min: u64) -> Result<Amount, ApiError> {
    if value < min || value > AMOUNT_MAX {
        return Err(ApiError::unprocessable(
            ErrorCode::InvalidAmount,
            format!(
                "{field} must be an integer from {min} to {AMOUNT_MAX} (minor units), got {value}"
            ),
        )
        .with("field", field));
    }
    Ok(Amount(value))
}

fn label(field: &'static str, value: &str) -> Result<String, ApiError> {
    let ok =
        !value.is_empty() && value.len() <= ID_LEN_MAX && value.chars().all(|c| !c.is_control());
    if !ok {
        return Err(ApiError::unprocessable(
            ErrorCode::InvalidField,
            format!("{field} must be 1 to {ID_LEN_MAX} bytes of printable text"),
        )
        .with("field", field));
    }
    Ok(value.to_string())
}

// ----- Routing helpers ----------------------------------------------------------

/// Where a request goes: a group, and the bucket it is for when it is
/// for one (the call follows the bucket if it moves).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Place {
    pub shard: ShardId,
    pub bucket: Option<BucketId>,
}

impl Place {
    /// A request about a group as a whole (token lookups everywhere).
    pub fn group(shard: ShardId) -> Place {
        Place {
            shard,
            bucket: None,
        }
    }
}

impl Gateway {
    pub(crate) async fn directory(
        &self,
        issuer: &IssuerId,
    ) -> Result<(DirectoryEntry, Place), ApiError> {
        let entry = self.meta.find(issuer).await.map_err(metadata_unavailable)?;
        let entry = entry.ok_or_else(|| {
            ApiError::not_found(ErrorCode::UnknownIssuer, format!("unknown issuer {issuer}"))
                .with("issuer_id", issuer)
        })?;
        Ok((entry.clone(), self.place(&entry)))
    }

    /// Where an issuer's requests go, by this gateway's map.
    pub(crate) fn place(&self, entry: &DirectoryEntry) -> Place {
        Place {
            shard: self.meta.map().shard_of_bucket(entry.bucket),
            bucket: Some(entry.bucket),
        }
    }

    /// Fields every answer carries: who served it, from where, how fresh.
    pub(crate) fn served(&self, served: &Served) -> api::Served {
        let region = self
            .region_of(&served.node)
            .map(|r| r.to_string())
            .unwrap_or_default();
        let served_by = match served.role {
            Role::Leader => "leader",
            Role::Follower => "follower",
        };
        api::Served {
            served_by: served_by.to_string(),
            region,
            node: served.node.to_string(),
            applied: served.applied.map(api::CommitToken::from),
            staleness_ms: served.staleness_ms,
            shard: Some(served.shard.0),
            generation: Some(served.generation.0),
            gateway_region: Some(self.region.to_string()),
            ..api::Served::default()
        }
    }

    /// A rejection decided by the leader: the leader's stamp, the entry that
    /// recorded it, the issuer's headroom after it, and the session raised
    /// by that entry.
    fn rejected(&self, rejection: &Rejection, applied: &Applied, mut session: Session) -> ApiError {
        let mut e = ApiError::rejection(rejection).with("commit_token", applied.commit_token);
        if let Some(issuer) = &applied.issuer {
            e = e.with("remaining", issuer.remaining);
        }
        e.details.extend(object(self.served(&applied.served)));
        session.include(applied.commit_token);
        e.with("session", session.to_string())
    }

    /// Error answers carry the same "who answered" fields.
    pub(crate) fn stamp_error(&self, mut e: ApiError) -> ApiError {
        for (key, value) in [
            ("region", json!(self.region)),
            ("node", json!(self.me)),
            ("served_by", json!("gateway")),
        ] {
            e.details.entry(key).or_insert(value);
        }
        e
    }

    pub(crate) async fn write(&self, place: Place, command: Command) -> Result<Applied, ApiError> {
        let request = Request::Write {
            shard: place.shard,
            command,
        };
        match self.call_for(request, place.bucket).await {
            Ok(Response::Applied {
                outcome,
                issuer,
                commit_token,
                served,
            }) => Ok(Applied {
                outcome,
                issuer,
                commit_token,
                served,
            }),
            Ok(Response::Error(e)) => Err(ApiError::node(&e)),
            Ok(other) => Err(unexpected(other)),
            Err(e) => Err(ApiError::node(&e)),
        }
    }

    pub(crate) async fn read(
        &self,
        place: Place,
        query: Query,
    ) -> Result<(QueryResult, Served), ApiError> {
        let request = Request::Read {
            shard: place.shard,
            query,
        };
        match self.call_for(request, place.bucket).await {
            Ok(Response::Read { result, served }) => Ok((result, served)),
            Ok(Response::Error(e)) => Err(ApiError::node(&e)),
            Ok(other) => Err(unexpected(other)),
            Err(e) => Err(ApiError::node(&e)),
        }
    }
}

pub(crate) struct Applied {
    pub outcome: Outcome,
    pub issuer: Option<IssuerView>,
    pub commit_token: harbor_types::CommitToken,
    pub served: Served,
}

fn metadata_unavailable(e: MetaError) -> ApiError {
    tracing::warn!(error = %e, "metadata plane did not answer");
    let mut error = ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        ErrorCode::MetadataUnavailable,
        e.to_string(),
    );
    error.retryable = true;
    error
}

pub(crate) fn unexpected(response: Response) -> ApiError {
    tracing::error!(?response, "node answered with the wrong kind of response");
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        ErrorCode::Internal,
        "the node answered with the wrong kind of response",
    )
}

pub(crate) fn object(value: impl serde::Serialize) -> Map<String, Value> {
    match serde_json::to_value(value).expect("views serialize") {
        Value::Object(map) => map,
        other => panic!("expected a JSON object, got {other}"),
    }
}

/// A handler's answer: its reply, or its error stamped with who answered.
pub(crate) fn respond(gw: &Gateway, result: ApiResult) -> HttpResponse {
    result.unwrap_or_else(|e| gw.stamp_error(e).into_response())
}

pub(crate) fn reply(status: StatusCode, body: Map<String, Value>) -> HttpResponse {
    (status, Json(Value::Object(body))).into_response()
}

/// A typed answer; with the session (already in its `served` fields) in
/// the `Harbor-Session` header too.
fn answer(status: StatusCode, body: &impl Serialize, session: Option<&Session>) -> HttpResponse {
    let mut response = (status, Json(body)).into_response();
    if let Some(session) = session {
        response
            .headers_mut()
            .insert(SESSION_HEADER, session.header_value());
    }
    response
}

/// A committed write's stamp, in the session raised by its entry.
fn write_stamp(gw: &Gateway, applied: &Applied, session: &mut Session) -> api::Served {
    session.include(applied.commit_token);
    api::Served {
        session: Some(session.to_string()),
        ..gw.served(&applied.served)
    }
}

fn issuer_answer(issuer: &IssuerView, entry: &DirectoryEntry) -> api::Issuer {
    api::Issuer {
        issuer_id: issuer.issuer_id.to_string(),
        home_region: issuer.home_region.to_string(),
        limit: issuer.limit.0,
        reserved: issuer.reserved.0,
        remaining: issuer.remaining.0,
        reservations_open: issuer.reservations_open,
        bucket: Some(entry.bucket.0),
        updated: issuer.updated.map(api::CommitToken::from),
        created: false,
        changed: false,
        commit_token: None,
        served: api::Served::default(),
    }
}

/// A reservation, with its issuer's headroom when the write returned it.
pub(crate) fn reservation_answer(
    reservation: &ReservationView,
    issuer: Option<&IssuerView>,
) -> api::Reservation {
    let status = match reservation.status {
        Status::Held => api::ReservationStatus::Held,
        Status::Confirmed => api::ReservationStatus::Confirmed,
        Status::Released => api::ReservationStatus::Released,
        Status::Expired => api::ReservationStatus::Expired,
    };
    api::Reservation {
        reservation_id: reservation.reservation_id.to_string(),
        issuer_id: reservation.issuer_id.to_string(),
        reservation_token: reservation.reservation_token.to_string(),
        amount: reservation.amount.0,
        desk: reservation.desk.clone(),
        trader: reservation.trader.clone(),
        status,
        expires_at_ms: reservation.expires_at_ms,
        created: Some(api::CommitToken::from(reservation.created)),
        created_at: Some(api::HlcTime {
            wall_ms: reservation.created_at.wall_ms,
            logical: reservation.created_at.logical,
        }),
        updated: Some(api::CommitToken::from(reservation.updated)),
        customer_id: reservation.customer_id.clone(),
        replayed: false,
        commit_token: None,
        remaining: issuer.map(|i| i.remaining.0),
        reserved: issuer.map(|i| i.reserved.0),
        limit: issuer.map(|i| i.limit.0),
        served: api::Served::default(),
    }
}

fn token_answer(
    view: Option<&TokenView>,
    issuer: Option<&IssuerId>,
    token: &ReservationToken,
) -> api::TokenStatus {
    let mut answer = api::TokenStatus {
        reservation_token: token.to_string(),
        issuer_id: view.map(|v| &v.issuer_id).or(issuer).map(|i| i.to_string()),
        status: api::TokenState::Unknown,
        reservation_id: None,
        reason: None,
        commit_token: None,
        resolved_at: None,
        served: api::Served::default(),
    };
    match view.map(|v| &v.outcome) {
        None => {}
        Some(TokenOutcome::Committed {
            reservation_id,
            commit_token: at,
        }) => {
            answer.status = api::TokenState::Committed;
            answer.reservation_id = Some(reservation_id.to_string());
            answer.commit_token = Some(api::CommitToken::from(*at));
        }
        Some(TokenOutcome::Rejected {
            code,
            commit_token: at,
        }) => {
            answer.status = api::TokenState::Rejected;
            answer.reason = Some(code.clone());
            answer.commit_token = Some(api::CommitToken::from(*at));
        }
        Some(TokenOutcome::Abandoned { commit_token: at }) => {
            answer.status = api::TokenState::Abandoned;
            answer.commit_token = Some(api::CommitToken::from(*at));
        }
    }
    answer
}

// ----- Handlers -----------------------------------------------------------------

pub(crate) async fn not_found(State(gw): Gw) -> HttpResponse {
    gw.stamp_error(ApiError::not_found(
        ErrorCode::NotFound,
        "no such endpoint; see the README for the API",
    ))
    .into_response()
}

pub(crate) async fn health(State(gw): Gw) -> HttpResponse {
    let map = gw.meta.map();
    let checks = map.groups.keys().map(|shard| {
        let gw = gw.clone();
        let shard = *shard;
        async move {
            let ready = match gw
                .call(Request::Read {
                    shard,
                    query: Query::Status,
                })
                .await
            {
                Ok(Response::Read {
                    result: QueryResult::Status(status),
                    ..
                }) => status.ready,
                _ => false,
            };
            (shard, ready)
        }
    });
    let results = futures::future::join_all(checks).await;
    let not_ready: Vec<u32> = results
        .iter()
        .filter(|(_, r)| !r)
        .map(|(s, _)| s.0)
        .collect();
    let ready = not_ready.is_empty();
    let health = api::Health {
        status: if ready { "ok" } else { "starting" }.to_string(),
        groups: results.len() as u64,
        groups_not_ready: not_ready,
        map_version: map.map_version,
        region: gw.region.to_string(),
        node: gw.me.to_string(),
    };
    let mut body = object(&health);
    body.insert("served_by".into(), json!("gateway"));
    if ready {
        return reply(StatusCode::OK, body);
    }
    let error = ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        ErrorCode::Unavailable,
        format!(
            "{} groups have no ready leader yet",
            health.groups_not_ready.len()
        ),
    );
    body.extend(object(
        ApiError {
            retryable: true,
            ..error
        }
        .body(),
    ));
    reply(StatusCode::SERVICE_UNAVAILABLE, body)
}

pub(crate) async fn put_issuer(
    State(gw): Gw,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Result<JsonBody<api::PutIssuer>, ApiError>,
) -> HttpResponse {
    respond(&gw, put_issuer_inner(&gw, id, &headers, body).await)
}

async fn put_issuer_inner(
    gw: &Gateway,
    id: String,
    headers: &HeaderMap,
    body: Result<JsonBody<api::PutIssuer>, ApiError>,
) -> ApiResult {
    let issuer = issuer_id(&id)?;
    let session = Session::from_headers(headers)?;
    let JsonBody(body) = body?;
    let region = Region::new(&body.home_region).map_err(|e| invalid("home_region", e))?;
    let limit = amount("limit", body.limit, 0)?;
    let (entry, _) = match gw.meta.assign(&issuer, &region).await {
        Ok(Ok(placed)) => placed,
        Ok(Err(DirectoryError::HomeRegionMismatch { existing, .. })) => {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                ErrorCode::HomeRegionMismatch,
                format!(
                    "issuer {issuer} is homed in {existing}; moving an issuer is not supported yet"
                ),
            )
            .with("home_region", existing))
        }
        Ok(Err(DirectoryError::UnknownRegion { region })) => {
            return Err(ApiError::unprocessable(
                ErrorCode::UnknownRegion,
                format!("region {region} is not part of this cluster"),
            )
            .with("regions", gw.meta.map().regions()))
        }
        Err(e) => return Err(metadata_unavailable(e)),
    };
    let command = Command::PlaceIssuer {
        issuer_id: issuer,
        home_region: region,
        limit,
        bucket: entry.bucket,
    };
    let applied = gw.write(gw.place(&entry), command).await?;
    match &applied.outcome {
        Outcome::Issuer {
            issuer,
            created,
            changed,
        } => {
            let mut session = session;
            let body = api::Issuer {
                created: *created,
                changed: *changed,
                commit_token: Some(api::CommitToken::from(applied.commit_token)),
                served: write_stamp(gw, &applied, &mut session),
                ..issuer_answer(issuer, &entry)
            };
            let status = if *created {
                StatusCode::CREATED
            } else {
                StatusCode::OK
            };
            Ok(answer(status, &body, Some(&session)))
        }
        Outcome::Rejected(r) => Err(gw.rejected(r, &applied, session)),
        other => Err(unexpected_outcome(other)),
    }
}

pub(crate) fn unexpected_outcome(outcome: &Outcome) -> ApiError {
    tracing::error!(?outcome, "unexpected outcome");
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        ErrorCode::Internal,
        "unexpected outcome",
    )
}

type ReadQuery = Result<QueryParams<ReadParams>, axum::extract::rejection::QueryRejection>;

/// What every read endpoint does first: check the read mode against the
/// parameters and the session, find the issuer's group, and read it.
async fn read_of_issuer(
    gw: &Gateway,
    headers: &HeaderMap,
    params: ReadQuery,
    issuer: &IssuerId,
    query: Query,
) -> Result<(ReadAnswer, DirectoryEntry), ApiError> {
    let plan = ReadPlan::new(query_params(params)?, headers)?;
    let (entry, place) = gw.directory(issuer).await?;
    let answer = gw.read_as(place, query, &plan).await?;
    Ok((answer, entry))
}

pub(crate) async fn get_issuer(
    State(gw): Gw,
    Path(id): Path<String>,
    headers: HeaderMap,
    params: ReadQuery,
) -> HttpResponse {
    let run = async {
        let issuer = issuer_id(&id)?;
        let query = Query::Issuer(issuer.clone());
        let (answer, entry) = read_of_issuer(&gw, &headers, params, &issuer, query).await?;
        let QueryResult::Issuer(Some(view)) = &answer.result else {
            return Err(ApiError::not_found(
                ErrorCode::UnknownIssuer,
                format!("unknown issuer {issuer}"),
            ));
        };
        let body = api::Issuer {
            served: answer.served(&gw),
            ..issuer_answer(view, &entry)
        };
        Ok(self::answer(StatusCode::OK, &body, Some(&answer.session)))
    };
    respond(&gw, run.await)
}

pub(crate) async fn open_reservations(
    State(gw): Gw,
    Path(id): Path<String>,
    headers: HeaderMap,
    params: ReadQuery,
) -> HttpResponse {
    let run = async {
        let issuer = issuer_id(&id)?;
        let query = Query::OpenReservations(issuer.clone());
        let (answer, _) = read_of_issuer(&gw, &headers, params, &issuer, query).await?;
        let QueryResult::OpenReservations(Some(list)) = &answer.result else {
            return Err(ApiError::not_found(
                ErrorCode::UnknownIssuer,
                format!("unknown issuer {issuer}"),
            ));
        };
        let body = api::OpenReservations {
            issuer_id: issuer.to_string(),
            count: list.len() as u64,
            reservations: list.iter().map(|r| reservation_answer(r, None)).collect(),
            served: answer.served(&gw),
        };
        Ok(self::answer(StatusCode::OK, &body, Some(&answer.session)))
    };
    respond(&gw, run.await)
}

pub(crate) async fn reserve(
    State(gw): Gw,
    headers: HeaderMap,
    body: Result<JsonBody<api::Reserve>, ApiError>,
) -> HttpResponse {
    let run = async {
        let session = Session::from_headers(&headers)?;
        let JsonBody(body) = body?;
        let (command, issuer) = reserve_command(&body)?;
        let (_, place) = gw.directory(&issuer).await?;
        let applied = gw.write(place, command).await?;
        reservation_reply(&gw, applied, StatusCode::CREATED, session)
            .map_err(|e| e.with("reservation_token", &body.reservation_token))
    };
    respond(&gw, run.await)
}

fn reservation_reply(
    gw: &Gateway,
    applied: Applied,
    status: StatusCode,
    session: Session,
) -> ApiResult {
    match &applied.outcome {
        Outcome::Reservation {
            reservation,
            replayed,
        } => {
            let mut session = session;
            let body = api::Reservation {
                replayed: *replayed,
                commit_token: Some(api::CommitToken::from(applied.commit_token)),
                served: write_stamp(gw, &applied, &mut session),
                ..reservation_answer(reservation, applied.issuer.as_ref())
            };
            Ok(answer(status, &body, Some(&session)))
        }
        Outcome::Rejected(r) => Err(gw.rejected(r, &applied, session)),
        other => Err(unexpected_outcome(other)),
    }
}

pub(crate) async fn get_reservation(
    State(gw): Gw,
    Path(id): Path<String>,
    headers: HeaderMap,
    params: ReadQuery,
) -> HttpResponse {
    let run = async {
        let id = reservation_id(&id)?;
        let query = Query::Reservation(id.clone());
        let (answer, _) = read_of_issuer(&gw, &headers, params, id.issuer(), query).await?;
        let QueryResult::Reservation(Some(view)) = &answer.result else {
            return Err(ApiError::not_found(
                ErrorCode::UnknownReservation,
                format!("unknown reservation {id}"),
            ));
        };
        let body = api::Reservation {
            served: answer.served(&gw),
            ..reservation_answer(view, None)
        };
        Ok(self::answer(StatusCode::OK, &body, Some(&answer.session)))
    };
    respond(&gw, run.await)
}

pub(crate) async fn confirm(
    State(gw): Gw,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> HttpResponse {
    transition(gw, id, &headers, body, true).await
}

pub(crate) async fn release(
    State(gw): Gw,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> HttpResponse {
    transition(gw, id, &headers, body, false).await
}

async fn transition(
    gw: Arc<Gateway>,
    id: String,
    headers: &HeaderMap,
    body: Bytes,
    confirm: bool,
) -> HttpResponse {
    let run = async {
        let reservation_id = reservation_id(&id)?;
        let session = Session::from_headers(headers)?;
        if !body.is_empty() {
            // No fields are defined; an empty object is fine, anything else is refused.
            let _: api::Empty = parse_json(&body)?;
        }
        let (_, place) = gw.directory(reservation_id.issuer()).await?;
        let command = if confirm {
            Command::Confirm { reservation_id }
        } else {
            Command::Release { reservation_id }
        };
        let applied = gw.write(place, command).await?;
        reservation_reply(&gw, applied, StatusCode::OK, session)
    };
    respond(&gw, run.await)
}

pub(crate) async fn get_token(
    State(gw): Gw,
    Path(text): Path<String>,
    params: Result<QueryParams<TokenParams>, axum::extract::rejection::QueryRejection>,
) -> HttpResponse {
    let run = async {
        let token = token(&text)?;
        let params = query_params(params)?;
        check_token_consistency(params.consistency.as_deref())?;
        match params.issuer_id {
            Some(issuer) => {
                let issuer = issuer_id(&issuer)?;
                let (_, place) = gw.directory(&issuer).await?;
                let (result, served) = gw
                    .read(place, Query::Token(issuer.clone(), token.clone()))
                    .await?;
                let QueryResult::Token(view) = result else {
                    return Err(ApiError::new(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        ErrorCode::Internal,
                        "wrong result",
                    ));
                };
                let body = api::TokenStatus {
                    served: gw.served(&served),
                    ..token_answer(view.as_ref(), Some(&issuer), &token)
                };
                Ok(answer(StatusCode::OK, &body, None))
            }
            None => token_everywhere(&gw, token).await,
        }
    };
    respond(&gw, run.await)
}

/// A token lookup without its issuer asks every group's leader. Slower, but
/// a client that lost everything but its token can still learn the outcome.
async fn token_everywhere(gw: &Gateway, token: ReservationToken) -> ApiResult {
    let map = gw.meta.map();
    let asks = map
        .groups
        .keys()
        .map(|shard| gw.read(Place::group(*shard), Query::TokenAnyIssuer(token.clone())));
    let mut found: Vec<(TokenView, Served)> = Vec::new();
    let mut last_served = None;
    for result in futures::future::join_all(asks).await {
        let (result, served) = result?;
        if let QueryResult::Tokens(views) = result {
            found.extend(views.into_iter().map(|v| (v, served.clone())));
        }
        last_served = Some(served);
    }
    match found.len() {
        0 => {
            let mut body = token_answer(None, None, &token);
            if let Some(served) = last_served {
                body.served = gw.served(&served);
            }
            body.served.served_by = "leaders".to_string();
            Ok(answer(StatusCode::OK, &body, None))
        }
        1 => {
            let (view, served) = &found[0];
            let body = api::TokenStatus {
                served: gw.served(served),
                ..token_answer(Some(view), None, &token)
            };
            Ok(answer(StatusCode::OK, &body, None))
        }
        _ => Err(ApiError::new(
            StatusCode::CONFLICT,
            ErrorCode::AmbiguousToken,
            format!(
                "token {token} was used with {} issuers; pass ?issuer_id=",
                found.len()
            ),
        )
        .with(
            "issuers",
            found
                .iter()
                .map(|(v, _)| v.issuer_id.clone())
                .collect::<Vec<_>>(),
        )),
    }
}

pub(crate) async fn resolve_token(
    State(gw): Gw,
    Path(text): Path<String>,
    params: Result<QueryParams<TokenParams>, axum::extract::rejection::QueryRejection>,
    headers: HeaderMap,
    body: Bytes,
) -> HttpResponse {
    let run = async {
        let token = token(&text)?;
        let session = Session::from_headers(&headers)?;
        let params = query_params(params)?;
        let body: api::ResolveToken = if body.is_empty() {
            api::ResolveToken::default()
        } else {
            parse_json(&body)?
        };
        let issuer = match (params.issuer_id, body.issuer_id) {
            (Some(a), Some(b)) if a != b => {
                return Err(ApiError::unprocessable(
                    ErrorCode::InvalidRequest,
                    "issuer_id in the query and in the body differ",
                ))
            }
            (Some(a), _) | (None, Some(a)) => issuer_id(&a)?,
            (None, None) => {
                return Err(ApiError::unprocessable(
                    ErrorCode::IssuerRequired,
                    "resolve needs the issuer the token was used with: ?issuer_id=... or {\"issuer_id\": ...}",
                ))
            }
        };
        let (_, place) = gw.directory(&issuer).await?;
        let applied = gw
            .write(
                place,
                Command::ResolveToken {
                    issuer_id: issuer.clone(),
                    token: token.clone(),
                },
            )
            .await?;
        match &applied.outcome {
            Outcome::Token(view) => {
                let mut session = session;
                let body = api::TokenStatus {
                    resolved_at: Some(api::CommitToken::from(applied.commit_token)),
                    served: write_stamp(&gw, &applied, &mut session),
                    ..token_answer(Some(view), Some(&issuer), &token)
                };
                Ok(answer(StatusCode::OK, &body, Some(&session)))
            }
            Outcome::Rejected(r) => Err(gw.rejected(r, &applied, session)),
            other => Err(unexpected_outcome(other)),
        }
    };
    respond(&gw, run.await)
}

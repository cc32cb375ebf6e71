//! The `/v1` HTTP API. Handlers validate everything before anything is sent
//! to a node: bad input gets a 4xx with a machine-readable code and changes
//! nothing.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, Query as QueryParams, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response as HttpResponse};
use axum::Json;
use harbor_meta::{DirectoryEntry, DirectoryError, MetaError};
use harbor_replication::Role;
use harbor_reservation::{
    Command, IssuerView, Outcome, Rejection, ReservationView, TokenOutcome, TokenView,
    HOLD_TTL_MS_MAX,
};
use harbor_types::{
    Amount, IdError, IssuerId, Region, ReservationId, ReservationToken, ShardId, AMOUNT_MAX,
    ID_LEN_MAX,
};
use harbor_wire::{Query, QueryResult, Request, Response, Served};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Map, Value};

use crate::body::{parse_json, JsonBody};
use crate::error::ApiError;
use crate::reads::{ReadAnswer, ReadParams, ReadPlan, Session, SESSION_HEADER};
use crate::router::Gateway;

type Gw = State<Arc<Gateway>>;
type ApiResult = Result<HttpResponse, ApiError>;

// ----- Request bodies ---------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct PutIssuerBody {
    home_region: String,
    limit: u64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ReserveBody {
    pub reservation_token: String,
    pub issuer_id: String,
    amount: u64,
    desk: String,
    trader: String,
    #[serde(default)]
    hold_ttl_ms: Option<u64>,
}

impl ReserveBody {
    /// Checks every field; the command to order and its issuer.
    pub(crate) fn command(&self) -> Result<(Command, IssuerId), ApiError> {
        let token = token(&self.reservation_token)?;
        let issuer = issuer_id(&self.issuer_id)?;
        let amount = amount("amount", self.amount, 1)?;
        let desk = label("desk", &self.desk)?;
        let trader = label("trader", &self.trader)?;
        if let Some(ttl) = self.hold_ttl_ms {
            if ttl == 0 || ttl > HOLD_TTL_MS_MAX {
                return Err(ApiError::unprocessable(
                    "invalid_field",
                    format!("hold_ttl_ms must be from 1 to {HOLD_TTL_MS_MAX}, or null for a confirmed reservation"),
                )
                .with("field", "hold_ttl_ms"));
            }
        }
        let command = Command::Reserve {
            token,
            issuer_id: issuer.clone(),
            amount,
            desk,
            trader,
            hold_ttl_ms: self.hold_ttl_ms,
        };
        Ok((command, issuer))
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ResolveBody {
    #[serde(default)]
    issuer_id: Option<String>,
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
        .map_err(|e| ApiError::bad_request("invalid_query", e.body_text()))
}

/// Token lookups decide what a client does after a timeout: they are
/// always answered by the leader.
fn check_token_consistency(consistency: Option<&str>) -> Result<(), ApiError> {
    match consistency {
        None | Some("strong") => Ok(()),
        Some(other) => Err(ApiError::bad_request(
            "invalid_consistency",
            format!("token lookups are always strong, got consistency={other:?}"),
        )
        .with("supported", ["strong"])),
    }
}

// ----- Validation -------------------------------------------------------------

fn invalid(field: &'static str, e: IdError) -> ApiError {
    ApiError::unprocessable("invalid_field", e.to_string()).with("field", field)
}

fn issuer_id(text: &str) -> Result<IssuerId, ApiError> {
    IssuerId::new(text).map_err(|e| invalid("issuer_id", e))
}

fn reservation_id(text: &str) -> Result<ReservationId, ApiError> {
    ReservationId::parse(text).map_err(|_| {
        ApiError::unprocessable(
            "invalid_field",
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
            "invalid_amount",
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
            "invalid_field",
            format!("{field} must be 1 to {ID_LEN_MAX} bytes of printable text"),
        )
        .with("field", field));
    }
    Ok(value.to_string())
}

// ----- Routing helpers ----------------------------------------------------------

impl Gateway {
    pub(crate) async fn directory(
        &self,
        issuer: &IssuerId,
    ) -> Result<(DirectoryEntry, ShardId), ApiError> {
        let entry = self.meta.find(issuer).await.map_err(metadata_unavailable)?;
        let entry = entry.ok_or_else(|| {
            ApiError::not_found("unknown_issuer", format!("unknown issuer {issuer}"))
                .with("issuer_id", issuer)
        })?;
        let shard = self.meta.map().shard_of_bucket(entry.bucket);
        Ok((entry, shard))
    }

    /// Fields every answer carries: who served it, from where, how fresh.
    pub(crate) fn stamp(&self, body: &mut Map<String, Value>, served: &Served) {
        let region = self
            .region_of(&served.node)
            .map(|r| r.to_string())
            .unwrap_or_default();
        let served_by = match served.role {
            Role::Leader => "leader",
            Role::Follower => "follower",
        };
        body.insert("region".into(), json!(region));
        body.insert("node".into(), json!(served.node));
        body.insert("served_by".into(), json!(served_by));
        body.insert("gateway_region".into(), json!(self.region));
        body.insert("shard".into(), json!(served.shard.0));
        body.insert("generation".into(), json!(served.generation.0));
        body.insert("applied".into(), json!(served.applied));
        body.insert("staleness_ms".into(), json!(served.staleness_ms));
        body.insert("stale".into(), json!(false));
    }

    /// A rejection decided by the leader: the leader's stamp, the entry that
    /// recorded it, the issuer's headroom after it, and the session raised
    /// by that entry.
    fn rejected(&self, rejection: &Rejection, applied: &Applied, mut session: Session) -> ApiError {
        let mut e = ApiError::rejection(rejection).with("commit_token", applied.commit_token);
        if let Some(issuer) = &applied.issuer {
            e = e.with("remaining", issuer.remaining);
        }
        self.stamp(&mut e.details, &applied.served);
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

    pub(crate) async fn write(
        &self,
        shard: ShardId,
        command: Command,
    ) -> Result<Applied, ApiError> {
        match self.call(Request::Write { shard, command }).await {
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
        shard: ShardId,
        query: Query,
    ) -> Result<(QueryResult, Served), ApiError> {
        match self.call(Request::Read { shard, query }).await {
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
        "metadata_unavailable",
        e.to_string(),
    );
    error.retryable = true;
    error
}

pub(crate) fn unexpected(response: Response) -> ApiError {
    tracing::error!(?response, "node answered with the wrong kind of response");
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal",
        "the node answered with the wrong kind of response",
    )
}

fn object(value: impl serde::Serialize) -> Map<String, Value> {
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

/// An answer that carries the caller's session, raised by what it showed:
/// in the body and in the `Harbor-Session` header, to send next time.
pub(crate) fn reply_in_session(
    status: StatusCode,
    mut body: Map<String, Value>,
    session: &Session,
) -> HttpResponse {
    body.insert("session".into(), json!(session.to_string()));
    let mut response = reply(status, body);
    response
        .headers_mut()
        .insert(SESSION_HEADER, session.header_value());
    response
}

/// A committed write's answer: stamped, in the session raised by its entry.
fn write_reply(
    gw: &Gateway,
    status: StatusCode,
    mut body: Map<String, Value>,
    applied: &Applied,
    mut session: Session,
) -> HttpResponse {
    gw.stamp(&mut body, &applied.served);
    session.include(applied.commit_token);
    reply_in_session(status, body, &session)
}

/// A read's answer: stamped with how it was served, in the raised session.
fn read_reply(gw: &Gateway, answer: &ReadAnswer, mut body: Map<String, Value>) -> HttpResponse {
    answer.stamp(gw, &mut body);
    reply_in_session(StatusCode::OK, body, &answer.session)
}

fn issuer_body(issuer: &IssuerView, entry: &DirectoryEntry) -> Map<String, Value> {
    let mut body = object(issuer);
    body.insert("bucket".into(), json!(entry.bucket.0));
    body
}

pub(crate) fn reservation_body(
    reservation: &ReservationView,
    issuer: Option<&IssuerView>,
) -> Map<String, Value> {
    let mut body = object(reservation);
    if let Some(issuer) = issuer {
        body.insert("remaining".into(), json!(issuer.remaining));
        body.insert("reserved".into(), json!(issuer.reserved));
        body.insert("limit".into(), json!(issuer.limit));
    }
    body
}

fn token_body(
    view: Option<&TokenView>,
    issuer: Option<&IssuerId>,
    token: &ReservationToken,
) -> Map<String, Value> {
    let mut body = Map::new();
    body.insert("reservation_token".into(), json!(token));
    body.insert(
        "issuer_id".into(),
        json!(view.map(|v| &v.issuer_id).or(issuer)),
    );
    match view.map(|v| &v.outcome) {
        None => {
            body.insert("status".into(), json!("unknown"));
        }
        Some(TokenOutcome::Committed {
            reservation_id,
            commit_token,
        }) => {
            body.insert("status".into(), json!("committed"));
            body.insert("reservation_id".into(), json!(reservation_id));
            body.insert("commit_token".into(), json!(commit_token));
        }
        Some(TokenOutcome::Rejected { code, commit_token }) => {
            body.insert("status".into(), json!("rejected"));
            body.insert("reason".into(), json!(code));
            body.insert("commit_token".into(), json!(commit_token));
        }
        Some(TokenOutcome::Abandoned { commit_token }) => {
            body.insert("status".into(), json!("abandoned"));
            body.insert("commit_token".into(), json!(commit_token));
        }
    }
    body
}

// ----- Handlers -----------------------------------------------------------------

pub(crate) async fn not_found(State(gw): Gw) -> HttpResponse {
    gw.stamp_error(ApiError::not_found(
        "not_found",
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
    let mut body = Map::new();
    body.insert("groups".into(), json!(results.len()));
    body.insert("groups_not_ready".into(), json!(not_ready));
    body.insert("region".into(), json!(gw.region));
    body.insert("node".into(), json!(gw.me));
    body.insert("served_by".into(), json!("gateway"));
    body.insert("map_version".into(), json!(map.map_version));
    if not_ready.is_empty() {
        body.insert("status".into(), json!("ok"));
        reply(StatusCode::OK, body)
    } else {
        body.insert("status".into(), json!("starting"));
        body.insert("error".into(), json!("unavailable"));
        body.insert("retryable".into(), json!(true));
        body.insert(
            "message".into(),
            json!(format!(
                "{} groups have no ready leader yet",
                not_ready.len()
            )),
        );
        reply(StatusCode::SERVICE_UNAVAILABLE, body)
    }
}

pub(crate) async fn put_issuer(
    State(gw): Gw,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Result<JsonBody<PutIssuerBody>, ApiError>,
) -> HttpResponse {
    respond(&gw, put_issuer_inner(&gw, id, &headers, body).await)
}

async fn put_issuer_inner(
    gw: &Gateway,
    id: String,
    headers: &HeaderMap,
    body: Result<JsonBody<PutIssuerBody>, ApiError>,
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
                "home_region_mismatch",
                format!(
                    "issuer {issuer} is homed in {existing}; moving an issuer is not supported yet"
                ),
            )
            .with("home_region", existing))
        }
        Ok(Err(DirectoryError::UnknownRegion { region })) => {
            return Err(ApiError::unprocessable(
                "unknown_region",
                format!("region {region} is not part of this cluster"),
            )
            .with("regions", gw.meta.map().regions()))
        }
        Err(e) => return Err(metadata_unavailable(e)),
    };
    let shard = gw.meta.map().shard_of_bucket(entry.bucket);
    let command = Command::UpsertIssuer {
        issuer_id: issuer,
        home_region: region,
        limit,
    };
    let applied = gw.write(shard, command).await?;
    match &applied.outcome {
        Outcome::Issuer {
            issuer,
            created,
            changed,
        } => {
            let mut body = issuer_body(issuer, &entry);
            body.insert("created".into(), json!(created));
            body.insert("changed".into(), json!(changed));
            body.insert("commit_token".into(), json!(applied.commit_token));
            let status = if *created {
                StatusCode::CREATED
            } else {
                StatusCode::OK
            };
            Ok(write_reply(gw, status, body, &applied, session))
        }
        Outcome::Rejected(r) => Err(gw.rejected(r, &applied, session)),
        other => Err(unexpected_outcome(other)),
    }
}

pub(crate) fn unexpected_outcome(outcome: &Outcome) -> ApiError {
    tracing::error!(?outcome, "unexpected outcome");
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal",
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
    let (entry, shard) = gw.directory(issuer).await?;
    let answer = gw.read_as(shard, query, &plan).await?;
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
                "unknown_issuer",
                format!("unknown issuer {issuer}"),
            ));
        };
        Ok(read_reply(&gw, &answer, issuer_body(view, &entry)))
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
                "unknown_issuer",
                format!("unknown issuer {issuer}"),
            ));
        };
        let mut body = Map::new();
        body.insert("issuer_id".into(), json!(issuer));
        body.insert("count".into(), json!(list.len()));
        body.insert("reservations".into(), json!(list));
        Ok(read_reply(&gw, &answer, body))
    };
    respond(&gw, run.await)
}

pub(crate) async fn reserve(
    State(gw): Gw,
    headers: HeaderMap,
    body: Result<JsonBody<ReserveBody>, ApiError>,
) -> HttpResponse {
    let run = async {
        let session = Session::from_headers(&headers)?;
        let JsonBody(body) = body?;
        let (command, issuer) = body.command()?;
        let (_, shard) = gw.directory(&issuer).await?;
        let applied = gw.write(shard, command).await?;
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
            let mut body = reservation_body(reservation, applied.issuer.as_ref());
            body.insert("replayed".into(), json!(replayed));
            body.insert("commit_token".into(), json!(applied.commit_token));
            Ok(write_reply(gw, status, body, &applied, session))
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
                "unknown_reservation",
                format!("unknown reservation {id}"),
            ));
        };
        Ok(read_reply(&gw, &answer, reservation_body(view, None)))
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
            let _: EmptyBody = parse_json(&body)?;
        }
        let (_, shard) = gw.directory(reservation_id.issuer()).await?;
        let command = if confirm {
            Command::Confirm { reservation_id }
        } else {
            Command::Release { reservation_id }
        };
        let applied = gw.write(shard, command).await?;
        reservation_reply(&gw, applied, StatusCode::OK, session)
    };
    respond(&gw, run.await)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EmptyBody {}

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
                let (_, shard) = gw.directory(&issuer).await?;
                let (result, served) = gw
                    .read(shard, Query::Token(issuer.clone(), token.clone()))
                    .await?;
                let QueryResult::Token(view) = result else {
                    return Err(ApiError::new(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "internal",
                        "wrong result",
                    ));
                };
                let mut body = token_body(view.as_ref(), Some(&issuer), &token);
                gw.stamp(&mut body, &served);
                Ok(reply(StatusCode::OK, body))
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
        .map(|shard| gw.read(*shard, Query::TokenAnyIssuer(token.clone())));
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
            let mut body = token_body(None, None, &token);
            if let Some(served) = last_served {
                gw.stamp(&mut body, &served);
            }
            body.insert("served_by".into(), json!("leaders"));
            Ok(reply(StatusCode::OK, body))
        }
        1 => {
            let (view, served) = &found[0];
            let mut body = token_body(Some(view), None, &token);
            gw.stamp(&mut body, served);
            Ok(reply(StatusCode::OK, body))
        }
        _ => Err(ApiError::new(
            StatusCode::CONFLICT,
            "ambiguous_token",
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
        let body: ResolveBody = if body.is_empty() {
            ResolveBody::default()
        } else {
            parse_json(&body)?
        };
        let issuer = match (params.issuer_id, body.issuer_id) {
            (Some(a), Some(b)) if a != b => {
                return Err(ApiError::unprocessable(
                    "invalid_request",
                    "issuer_id in the query and in the body differ",
                ))
            }
            (Some(a), _) | (None, Some(a)) => issuer_id(&a)?,
            (None, None) => {
                return Err(ApiError::unprocessable(
                    "issuer_required",
                    "resolve needs the issuer the token was used with: ?issuer_id=... or {\"issuer_id\": ...}",
                ))
            }
        };
        let (_, shard) = gw.directory(&issuer).await?;
        let applied = gw
            .write(
                shard,
                Command::ResolveToken {
                    issuer_id: issuer.clone(),
                    token: token.clone(),
                },
            )
            .await?;
        match &applied.outcome {
            Outcome::Token(view) => {
                let mut body = token_body(Some(view), Some(&issuer), &token);
                body.insert("resolved_at".into(), json!(applied.commit_token));
                Ok(write_reply(&gw, StatusCode::OK, body, &applied, session))
            }
            Outcome::Rejected(r) => Err(gw.rejected(r, &applied, session)),
            other => Err(unexpected_outcome(other)),
        }
    };
    respond(&gw, run.await)
}

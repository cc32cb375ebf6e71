//! The client: one retry loop under every call, the session, failover
//! between gateways, and the reserve path that always ends with a definite
//! outcome when it can.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use reqwest::header::{HeaderMap, RETRY_AFTER};
use reqwest::{Method, StatusCode, Url};
use serde::de::DeserializeOwned;
use serde_json::{json, Map, Value};

use harbor_api::{ClusterView, ErrorCode};

use crate::error::{ApiError, Error};

use crate::model::{
    Consistency, Health, Issuer, OpenReservations, Reservation, ReserveRequest, TokenState,
    TokenStatus, Transfer,
};
use crate::session::Session;
use crate::token::{
    check_amount, check_id, check_label, check_reservation_id, new_reservation_token, random_bytes,
    HOLD_TTL_MS_MAX, ID_LEN_MAX, TOKEN_LEN_MAX,
};

/// The header that carries the session both ways.
pub const SESSION_HEADER: &str = "Harbor-Session";

/// After failing over, the client tries its first (preferred) gateway again
/// once this long has passed: it is usually the nearest one.
const PREFERRED_RECHECK: Duration = Duration::from_secs(30);
/// Less time than this left is not worth an attempt.
const ATTEMPT_MIN: Duration = Duration::from_millis(10);

/// Time limits of calls. `Copy`, so a per-call override is a cheap clone.
#[derive(Clone, Copy, Debug)]
struct Timing {
    deadline: Duration,
    attempt_timeout: Duration,
    backoff_initial: Duration,
    backoff_max: Duration,
    resolve_time: Duration,
}

/// Configures a [`Client`]; made by [`Client::builder`].
#[derive(Clone, Debug)]
pub struct ClientBuilder {
    urls: Vec<String>,
    timing: Timing,
    connect_timeout: Duration,
}

impl ClientBuilder {
    /// How long a call may take in all, retries included (default 10 s).
    pub fn deadline(mut self, deadline: Duration) -> ClientBuilder {
        self.timing.deadline = deadline;
        self
    }

    /// How long one attempt waits for its answer (default 6 s: a little
    /// more than the gateway's own 5 s request timeout, so the gateway's
    /// `timeout` answer usually comes first). An attempt never outlives the
    /// call's deadline.
    pub fn attempt_timeout(mut self, timeout: Duration) -> ClientBuilder {
        self.timing.attempt_timeout = timeout;
        self
    }

    /// How long a TCP connect may take before the client tries the next
    /// gateway (default 1 s).
    pub fn connect_timeout(mut self, timeout: Duration) -> ClientBuilder {
        self.connect_timeout = timeout;
        self
    }

    /// The wait before the first retry and the most any retry waits; waits
    /// double in between, with jitter (defaults 50 ms and 1 s). A
    /// `Retry-After` from the gateway is waited out in full.
    pub fn backoff(mut self, initial: Duration, max: Duration) -> ClientBuilder {
        self.timing.backoff_initial = initial;
        self.timing.backoff_max = max;
        self
    }

    /// The end of a reserve's deadline kept for resolving its token when
    /// retries could not tell whether it reserved (default 3 s, at most half
    /// the deadline).
    pub fn resolve_time(mut self, time: Duration) -> ClientBuilder {
        self.timing.resolve_time = time;
        self
    }

    /// Checks the settings and the gateway URLs.
    pub fn build(self) -> Result<Client, Error> {
        if self.urls.is_empty() {
            return Err(Error::InvalidInput("no gateway URL given".into()));
        }
        let urls = self
            .urls
            .iter()
            .map(|text| gateway_url(text))
            .collect::<Result<Vec<Url>, Error>>()?;
        let t = self.timing;
        for (what, d) in [
            ("deadline", t.deadline),
            ("attempt_timeout", t.attempt_timeout),
            ("connect_timeout", self.connect_timeout),
            ("backoff (initial)", t.backoff_initial),
        ] {
            if d.is_zero() {
                return Err(Error::InvalidInput(format!("{what} must be above zero")));
            }
        }
        if t.backoff_max < t.backoff_initial {
            return Err(Error::InvalidInput(
                "the longest backoff must not be shorter than the first".into(),
            ));
        }
        let http = reqwest::Client::builder()
            .connect_timeout(self.connect_timeout)
            .build()
            .map_err(|e| Error::Transport {
                url: String::new(),
                message: describe(&e),
            })?;
        Ok(Client {
            shared: Arc::new(Shared {
                http,
                urls,
                route: Mutex::new(Route {
                    current: 0,
                    since: Instant::now(),
                }),
            }),
            session: Arc::default(),
            timing: t,
        })
    }
}

/// A gateway base URL: plain `http` (the gateway serves no TLS), a host, no
/// query, fragment or credentials. A path prefix (a proxy's) is kept.
fn gateway_url(text: &str) -> Result<Url, Error> {
    let bad = |why: &str| Error::InvalidInput(format!("gateway URL {text:?}: {why}"));
    let url = Url::parse(text).map_err(|e| bad(&e.to_string()))?;
    if url.scheme() != "http" {
        return Err(bad("only http:// URLs are supported"));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(bad("it has no host"));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(bad("it must not have a query or a fragment"));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(bad("credentials in the URL are not supported"));
    }
    Ok(url)
}

/// A client of Harbor's gateways. Cheap to clone: clones share the
/// connection pool, the failover state and the session.
#[derive(Clone, Debug)]
pub struct Client {
    shared: Arc<Shared>,
    session: Arc<Mutex<Session>>,
    timing: Timing,
}

#[derive(Debug)]
struct Shared {
    http: reqwest::Client,
    urls: Vec<Url>,
    route: Mutex<Route>,
}

/// Which gateway requests go to now, and since when.
#[derive(Debug)]
struct Route {
    current: usize,
    since: Instant,
}

impl Shared {
    fn pick(&self) -> usize {
        let mut route = lock(&self.route);
        if route.current != 0 && route.since.elapsed() >= PREFERRED_RECHECK {
            route.current = 0;
            route.since = Instant::now();
        }
        route.current
    }

    /// Moves on from a gateway that could not be reached, unless another
    /// request already did.
    fn failed(&self, index: usize) {
        let mut route = lock(&self.route);
        if route.current == index {
            route.current = (index + 1) % self.urls.len();
            route.since = Instant::now();
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Nothing panics while holding these locks; a poisoned one still holds
    // consistent data.
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// One HTTP request of the API.
struct Call {
    method: Method,
    path: Vec<String>,
    query: Vec<(&'static str, String)>,
    body: Option<Value>,
    /// A write: an attempt that got no answer may have taken effect.
    write: bool,
    /// Whether retryable refusals are retried (transport failures are).
    retry_refusals: bool,
}

impl Call {
    fn new(method: Method, write: bool, path: &[&str]) -> Call {
        Call {
            method,
            path: std::iter::once("v1")
                .chain(path.iter().copied())
                .map(String::from)
                .collect(),
            query: Vec::new(),
            body: None,
            write,
            retry_refusals: true,
        }
    }

    fn read(path: &[&str], consistency: &Consistency) -> Call {
        let mut call = Call::new(Method::GET, false, path);
        call.query = consistency.query();
        call
    }
}

enum Attempt {
    Answer {
        status: StatusCode,
        headers: HeaderMap,
        body: Vec<u8>,
    },
    /// No answer. `sent`: the request may have reached the gateway (the
    /// connection broke or the attempt timed out), so a write may have taken
    /// effect; otherwise the gateway could not be reached and nothing was
    /// sent.
    NoAnswer { sent: bool, message: String },
}

/// Why `execute` stopped without a success.
enum Failure {
    /// A definite answer.
    Final(Error),
    /// Time ran out. `uncertain`: some attempt of a write may have taken
    /// effect.
    OutOfTime {
        uncertain: bool,
        last: Option<Error>,
    },
}

impl Client {
    /// A builder for a client of these gateways; the first is preferred and
    /// the others are tried in turn when it cannot be reached.
    pub fn builder<I>(urls: I) -> ClientBuilder
    where
        I: IntoIterator,
        I::Item: Into<String>,
    {
        ClientBuilder {
            urls: urls.into_iter().map(Into::into).collect(),
            timing: Timing {
                deadline: Duration::from_secs(10),
                attempt_timeout: Duration::from_secs(6),
                backoff_initial: Duration::from_millis(50),
                backoff_max: Duration::from_secs(1),
                resolve_time: Duration::from_secs(3),
            },
            connect_timeout: Duration::from_secs(1),
        }
    }

    /// This client with another deadline for its calls (sharing everything
    /// else, the session included): `client.with_deadline(d).reserve(..)`.
    pub fn with_deadline(&self, deadline: Duration) -> Client {
        let mut client = self.clone();
        client.timing.deadline = deadline.max(ATTEMPT_MIN);
        client
    }

    /// The deadline of this client's calls.
    pub fn deadline(&self) -> Duration {
        self.timing.deadline
    }

    /// This client with a session of its own, empty (sharing the
    /// connections): for one end user among many in a server, say.
    pub fn with_new_session(&self) -> Client {
        let mut client = self.clone();
        client.session = Arc::default();
        client
    }

    /// The session as the `Harbor-Session` header value
    /// (`shard3@g2:99,shard15@g1:2`; empty before the first answer). Store
    /// it to restore it in another process.
    pub fn session(&self) -> String {
        lock(&self.session).header()
    }

    /// Forgets the session (for every clone sharing it): the next reads
    /// promise nothing about earlier writes. The way out of an
    /// `invalid_session` refusal, which the client does not take by itself
    /// since it drops read-your-writes.
    pub fn reset_session(&self) {
        *lock(&self.session) = Session::default();
    }

    /// Replaces the session with a stored one.
    pub fn restore_session(&self, header: &str) -> Result<(), Error> {
        *lock(&self.session) = parse_session(header)?;
        Ok(())
    }

    /// Adds another client's session (its writes become this one's
    /// dependencies: later session reads see them too).
    pub fn merge_session(&self, header: &str) -> Result<(), Error> {
        let other = parse_session(header)?;
        lock(&self.session).merge(&other);
        Ok(())
    }

    // ----- The API ---------------------------------------------------------------

    /// Registers an issuer (`created: true`) or sets its limit. Retried on
    /// any failure: setting the same limit twice is harmless.
    pub async fn put_issuer(
        &self,
        issuer_id: &str,
        home_region: &str,
        limit: u64,
    ) -> Result<Issuer, Error> {
        check_id("issuer_id", issuer_id, ID_LEN_MAX)?;
        check_id("home_region", home_region, ID_LEN_MAX)?;
        check_amount("limit", limit, 0)?;
        let mut call = Call::new(Method::PUT, true, &["issuers", issuer_id]);
        call.body = Some(to_json(&harbor_api::PutIssuer {
            home_region: home_region.to_string(),
            limit,
        }));
        self.run(call).await
    }

    pub async fn get_issuer(
        &self,
        issuer_id: &str,
        consistency: Consistency,
    ) -> Result<Issuer, Error> {
        check_id("issuer_id", issuer_id, ID_LEN_MAX)?;
        self.run(Call::read(&["issuers", issuer_id], &consistency))
            .await
    }

    /// The issuer's held and confirmed reservations.
    pub async fn open_reservations(
        &self,
        issuer_id: &str,
        consistency: Consistency,
    ) -> Result<OpenReservations, Error> {
        check_id("issuer_id", issuer_id, ID_LEN_MAX)?;
        let path = ["issuers", issuer_id, "open-reservations"];
        self.run(Call::read(&path, &consistency)).await
    }

    /// Reserves, at most once whatever happens on the way. Every attempt
    /// carries the same token. When an attempt gets no answer (timeout,
    /// lost connection) or an `outcome_unknown` one, the reserve is sent
    /// again with that token until the last [`ClientBuilder::resolve_time`]
    /// of the deadline; if it is still unknown then, the client resolves the
    /// token and answers with the outcome: the reservation (with `replayed:
    /// true`), [`Error::Rejected`] or [`Error::Abandoned`]. Only when that
    /// fails too does it answer [`Error::DeadlineExceeded`] with
    /// `outcome_unknown: true` and the token.
    pub async fn reserve(&self, request: ReserveRequest) -> Result<Reservation, Error> {
        let issuer_id = request.issuer_id.clone();
        let (token, body) = reserve_body(request)?;
        let end = Instant::now() + self.timing.deadline;
        let resolve_time = self.timing.resolve_time.min(self.timing.deadline / 2);
        let mut call = Call::new(Method::POST, true, &["reservations"]);
        call.body = Some(to_json(&body));
        let last = match self.execute(&call, end - resolve_time).await {
            Ok(value) => return parse(value),
            Err(Failure::Final(e))
                if e.api().and_then(ApiError::error_code) == Some(ErrorCode::TokenAbandoned) =>
            {
                return Err(Error::Abandoned {
                    reservation_token: token,
                })
            }
            Err(Failure::Final(e)) => return Err(e),
            Err(Failure::OutOfTime {
                uncertain: false,
                last,
            }) => return Err(self.deadline_exceeded(false, Some(token), None, last)),
            Err(Failure::OutOfTime {
                uncertain: true,
                last,
            }) => last,
        };
        self.settle(token, &issuer_id, end, last).await
    }

    /// A reserve still unsure at the end of its retries: resolving the token
    /// makes its outcome final, so the caller gets a definite answer.
    async fn settle(
        &self,
        token: String,
        issuer_id: &str,
        end: Instant,
        last: Option<Error>,
    ) -> Result<Reservation, Error> {
        let status: TokenStatus = match self.execute(&resolve_call(&token, issuer_id), end).await {
            Ok(value) => parse(value)?,
            Err(Failure::Final(e)) => {
                return Err(self.deadline_exceeded(true, Some(token), None, Some(e)))
            }
            Err(Failure::OutOfTime { last: again, .. }) => {
                return Err(self.deadline_exceeded(true, Some(token), None, again.or(last)))
            }
        };
        match status.status {
            TokenState::Committed => {
                let Some(id) = status.reservation_id else {
                    return Err(Error::Protocol(
                        "a committed token without its reservation_id".into(),
                    ));
                };
                let read = Call::read(&["reservations", &id], &Consistency::Strong);
                match self.execute(&read, end).await {
                    Ok(value) => {
                        let mut reservation: Reservation = parse(value)?;
                        reservation.replayed = true;
                        Ok(reservation)
                    }
                    // It did reserve: say so even though the read failed.
                    Err(Failure::Final(e)) => {
                        Err(self.deadline_exceeded(false, Some(token), Some(id), Some(e)))
                    }
                    Err(Failure::OutOfTime { last, .. }) => {
                        Err(self.deadline_exceeded(false, Some(token), Some(id), last))
                    }
                }
            }
            TokenState::Rejected => {
                let reason = status.reason.unwrap_or_else(|| "rejected".into());
                let mut details = Map::new();
                details.insert("reservation_token".into(), json!(token));
                details.insert("issuer_id".into(), json!(issuer_id));
                details.insert("commit_token".into(), json!(status.commit_token));
                Err(Error::Rejected(ApiError {
                    status: StatusCode::CONFLICT.as_u16(),
                    message: format!(
                        "reservation token {token} was rejected ({reason}); learned by resolving the token"
                    ),
                    code: reason,
                    retryable: false,
                    outcome_unknown: false,
                    retry_after: None,
                    details,
                }))
            }
            TokenState::Abandoned => Err(Error::Abandoned {
                reservation_token: token,
            }),
            TokenState::Unknown => Err(Error::Protocol(
                "resolve answered that the token's outcome is still unknown".into(),
            )),
        }
    }

    /// Many reservations in one request (`POST /v1/reservations:batch`, at
    /// most 8,190), each with its own token (generated when absent) and
    /// its own outcome, in order: one refusal never fails the others. The
    /// whole batch is sent again, same tokens, when an attempt gets no
    /// answer, so no item can reserve twice. An item answered with
    /// `outcome_unknown` (its group did not answer in time) is reported as
    /// such: send it again with [`Client::reserve`] and its token, which
    /// resolves it if need be.
    pub async fn reserve_batch(
        &self,
        requests: Vec<ReserveRequest>,
    ) -> Result<Vec<BatchResult>, Error> {
        if requests.is_empty() || requests.len() > BATCH_MAX {
            return Err(Error::InvalidInput(format!(
                "a batch holds 1 to {BATCH_MAX} reservations, got {}",
                requests.len()
            )));
        }
        let reservations = requests
            .into_iter()
            .map(|r| reserve_body(r).map(|(_, body)| body))
            .collect::<Result<Vec<_>, Error>>()?;
        let mut call = Call::new(Method::POST, true, &["reservations:batch"]);
        call.body = Some(to_json(&harbor_api::ReserveBatch { reservations }));
        let answer: harbor_api::BatchAnswer = self.run(call).await?;
        let results = answer.results.into_iter().map(|item| match item.outcome {
            harbor_api::BatchOutcome::Reserved(reservation) => BatchResult::Reserved(reservation),
            harbor_api::BatchOutcome::Refused { http_status, error } => {
                let status = StatusCode::from_u16(http_status).unwrap_or(StatusCode::CONFLICT);
                BatchResult::Refused(error_of(status, error, None))
            }
        });
        Ok(results.collect())
    }

    /// Confirms a hold. Retried on any failure, since confirming a confirmed
    /// reservation answers it again (`replayed: true`). If the deadline
    /// passes while unsure, the error says `outcome_unknown`: calling
    /// confirm again is safe and tells.
    pub async fn confirm(&self, reservation_id: &str) -> Result<Reservation, Error> {
        check_reservation_id(reservation_id)?;
        let path = ["reservations", reservation_id, "confirm"];
        self.run(Call::new(Method::POST, true, &path)).await
    }

    /// Releases a held or confirmed reservation. Retried like
    /// [`Client::confirm`]: releasing a released reservation answers it again
    /// (`replayed: true`).
    pub async fn release(&self, reservation_id: &str) -> Result<Reservation, Error> {
        check_reservation_id(reservation_id)?;
        let path = ["reservations", reservation_id, "release"];
        self.run(Call::new(Method::POST, true, &path)).await
    }

    pub async fn get_reservation(
        &self,
        reservation_id: &str,
        consistency: Consistency,
    ) -> Result<Reservation, Error> {
        check_reservation_id(reservation_id)?;
        self.run(Call::read(&["reservations", reservation_id], &consistency))
            .await
    }

    /// A token's durable outcome, `unknown` included, from the leader (token
    /// lookups are always strong). Without the issuer the gateway asks
    /// every group (slower).
    pub async fn token_status(
        &self,
        reservation_token: &str,
        issuer_id: Option<&str>,
    ) -> Result<TokenStatus, Error> {
        check_id("reservation_token", reservation_token, TOKEN_LEN_MAX)?;
        let mut call = Call::new(
            Method::GET,
            false,
            &["reservation-tokens", reservation_token],
        );
        if let Some(issuer_id) = issuer_id {
            check_id("issuer_id", issuer_id, ID_LEN_MAX)?;
            call.query.push(("issuer_id", issuer_id.to_string()));
        }
        self.run(call).await
    }

    /// Makes a token's outcome final: `committed`, `rejected`, or
    /// `abandoned` (a request with it can then never reserve).
    pub async fn resolve_token(
        &self,
        reservation_token: &str,
        issuer_id: &str,
    ) -> Result<TokenStatus, Error> {
        check_id("reservation_token", reservation_token, TOKEN_LEN_MAX)?;
        check_id("issuer_id", issuer_id, ID_LEN_MAX)?;
        self.run(resolve_call(reservation_token, issuer_id)).await
    }

    /// `GET /v1/health`, retried while the cluster is starting (503).
    pub async fn health(&self) -> Result<Health, Error> {
        self.run(Call::new(Method::GET, false, &["health"])).await
    }

    /// `GET /v1/admin/cluster`: nodes, groups, leaders, generations, lag and
    /// staleness.
    pub async fn cluster(&self) -> Result<ClusterView, Error> {
        self.run(Call::new(Method::GET, false, &["admin", "cluster"]))
            .await
    }

    /// Moves `group`'s leadership to `to` (a replica in its home region);
    /// answers once done. Not retried when refused (`transfer_refused`,
    /// `transfer_abandoned`): the old leader keeps leading.
    pub async fn transfer_leader(&self, group: u32, to: &str) -> Result<Transfer, Error> {
        check_id("to", to, ID_LEN_MAX)?;
        let group = group.to_string();
        let path = ["admin", "groups", group.as_str(), "transfer-leader"];
        let mut call = Call::new(Method::POST, false, &path);
        call.body = Some(to_json(&harbor_api::TransferLeader { to: to.to_string() }));
        // An abandoned transfer is retryable on the wire, but trying again
        // at once would only drain the group again: the caller decides.
        call.retry_refusals = false;
        self.run(call).await
    }

    // ----- The retry loop ----------------------------------------------------------

    async fn run<T: DeserializeOwned>(&self, call: Call) -> Result<T, Error> {
        match self
            .execute(&call, Instant::now() + self.timing.deadline)
            .await
        {
            Ok(value) => parse(value),
            Err(Failure::Final(e)) => Err(e),
            Err(Failure::OutOfTime { uncertain, last }) => {
                Err(self.deadline_exceeded(uncertain, None, None, last))
            }
        }
    }

    fn deadline_exceeded(
        &self,
        outcome_unknown: bool,
        reservation_token: Option<String>,
        reservation_id: Option<String>,
        last: Option<Error>,
    ) -> Error {
        Error::DeadlineExceeded {
            deadline: self.timing.deadline,
            outcome_unknown,
            reservation_token,
            reservation_id,
            last_error: last.map(Box::new),
        }
    }

    /// Sends `call` until it gets a definite answer or `stop_at` nears.
    /// Every call the client makes is safe to repeat (reads; writes that
    /// are idempotent or carry their token), so what decides a retry is
    /// only whether the answer could change: retryable refusals, unknown
    /// outcomes and transport failures are retried, everything else is
    /// final at once.
    async fn execute(&self, call: &Call, stop_at: Instant) -> Result<Value, Failure> {
        let gateways = self.shared.urls.len();
        let mut backoff = self.timing.backoff_initial;
        let mut uncertain = false;
        let mut last = None;
        // Gateways to try right away after a transport failure before
        // backing off: a dead gateway should cost a connect, not a backoff.
        let mut untried = gateways - 1;
        loop {
            let left = stop_at.saturating_duration_since(Instant::now());
            if left < ATTEMPT_MIN {
                return Err(Failure::OutOfTime { uncertain, last });
            }
            let index = self.shared.pick();
            let base = &self.shared.urls[index];
            let attempt = self
                .attempt(base, call, left.min(self.timing.attempt_timeout))
                .await;
            let wait = match attempt {
                Attempt::Answer {
                    status,
                    headers,
                    body,
                } => {
                    let value = serde_json::from_slice::<Value>(&body).ok();
                    self.learn(&headers, value.as_ref());
                    if status.is_success() {
                        return value.ok_or_else(|| {
                            Failure::Final(Error::Protocol(format!(
                                "{status} with a body that is not JSON"
                            )))
                        });
                    }
                    let error = api_error(status, &headers, value, &body);
                    uncertain |= call.write && error.outcome_unknown;
                    if !call.retry_refusals || !should_retry(&error) {
                        return Err(Failure::Final(classify(error)));
                    }
                    let wait = jitter(backoff).max(error.retry_after.unwrap_or_default());
                    last = Some(Error::Api(error));
                    wait
                }
                Attempt::NoAnswer { sent, message } => {
                    uncertain |= call.write && sent;
                    last = Some(Error::Transport {
                        url: base.to_string(),
                        message,
                    });
                    // A gateway that does not answer may be down or hung:
                    // the next one is as good a place for the same request.
                    self.shared.failed(index);
                    if untried > 0 {
                        untried -= 1;
                        continue;
                    }
                    jitter(backoff)
                }
            };
            if Instant::now() + wait + ATTEMPT_MIN > stop_at {
                return Err(Failure::OutOfTime { uncertain, last });
            }
            tokio::time::sleep(wait).await;
            backoff = (backoff * 2).min(self.timing.backoff_max);
            untried = gateways - 1;
        }
    }
}

impl Client {
    async fn attempt(&self, base: &Url, call: &Call, timeout: Duration) -> Attempt {
        let mut url = base.clone();
        url.path_segments_mut()
            .expect("http URLs have a path")
            .pop_if_empty()
            .extend(&call.path);
        if !call.query.is_empty() {
            url.query_pairs_mut()
                .extend_pairs(call.query.iter().map(|(k, v)| (*k, v.as_str())));
        }
        let mut request = self.shared.http.request(call.method.clone(), url);
        // Read per attempt: a retry carries what other calls learned since.
        let session = self.session();
        if !session.is_empty() {
            request = request.header(SESSION_HEADER, session);
        }
        if let Some(body) = &call.body {
            request = request.json(body);
        }
        let exchange = async {
            let response = request.send().await?;
            let status = response.status();
            let headers = response.headers().clone();
            let body = response.bytes().await?;
            Ok::<_, reqwest::Error>((status, headers, body.to_vec()))
        };
        match tokio::time::timeout(timeout, exchange).await {
            Ok(Ok((status, headers, body))) => Attempt::Answer {
                status,
                headers,
                body,
            },
            Ok(Err(e)) => Attempt::NoAnswer {
                sent: !e.is_connect(),
                message: describe(&e),
            },
            Err(_) => Attempt::NoAnswer {
                sent: true,
                message: format!("no answer within {timeout:?}"),
            },
        }
    }

    /// Merges what an answer (success or error) says about the session: the
    /// header, the body's `session`, and the positions it shows (a write's
    /// `commit_token`, a read's `applied`), so the session is right even
    /// with a gateway that does not send it.
    fn learn(&self, headers: &HeaderMap, body: Option<&Value>) {
        let mut session = lock(&self.session);
        for value in headers.get_all(SESSION_HEADER) {
            if let Ok(text) = value.to_str() {
                session.merge_text(text);
            }
        }
        if let Some(body) = body {
            for field in ["session", "commit_token", "applied"] {
                if let Some(text) = body.get(field).and_then(Value::as_str) {
                    session.merge_text(text);
                }
            }
        }
    }
}

/// The most reservations one batch request carries (the gateway's limit).
pub const BATCH_MAX: usize = 8_190;

/// One item of [`Client::reserve_batch`].
#[derive(Clone, Debug)]
pub enum BatchResult {
    Reserved(Box<Reservation>),
    /// Refused (a rejection such as `insufficient_exposure`, an invalid
    /// field) or unsure (`outcome_unknown`: its group did not answer).
    Refused(ApiError),
}

/// A reserve request's token (generated if absent) and checked body.
fn reserve_body(request: ReserveRequest) -> Result<(String, harbor_api::Reserve), Error> {
    check_id("issuer_id", &request.issuer_id, ID_LEN_MAX)?;
    check_amount("amount", request.amount, 1)?;
    check_label("desk", &request.desk)?;
    check_label("trader", &request.trader)?;
    if let Some(customer_id) = &request.customer_id {
        check_label("customer_id", customer_id)?;
    }
    let token = match request.reservation_token {
        Some(token) => token,
        None => new_reservation_token(),
    };
    check_id("reservation_token", &token, TOKEN_LEN_MAX)?;
    let hold_ttl_ms = match request.hold_ttl {
        None => None,
        Some(ttl) => {
            let ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX);
            if ms == 0 || ms > HOLD_TTL_MS_MAX {
                return Err(Error::InvalidInput(format!(
                    "a hold lasts from 1 ms to {HOLD_TTL_MS_MAX} ms, got {ttl:?}"
                )));
            }
            Some(ms)
        }
    };
    let body = harbor_api::Reserve {
        reservation_token: token.clone(),
        issuer_id: request.issuer_id,
        amount: request.amount,
        desk: request.desk,
        trader: request.trader,
        hold_ttl_ms,
        customer_id: request.customer_id,
    };
    Ok((token, body))
}

/// A request body as JSON (the API's types always serialize).
fn to_json(body: &impl serde::Serialize) -> Value {
    serde_json::to_value(body).expect("request bodies serialize")
}

fn resolve_call(token: &str, issuer_id: &str) -> Call {
    let mut call = Call::new(
        Method::POST,
        true,
        &["reservation-tokens", token, "resolve"],
    );
    call.query.push(("issuer_id", issuer_id.to_string()));
    call
}

fn parse_session(header: &str) -> Result<Session, Error> {
    Session::parse(header).map_err(|e| Error::InvalidInput(format!("session: {e}")))
}

fn parse<T: DeserializeOwned>(value: Value) -> Result<T, Error> {
    serde_json::from_value(value).map_err(|e| Error::Protocol(e.to_string()))
}

/// An error answer as the client sees it. A body not in the gateway's
/// format (a proxy's page, a gateway that died mid-answer) is still an
/// answer: a 502, 503 or 504 of that kind may be retried and leaves a
/// write's outcome unknown.
/// An error answer's body as the client's error.
fn error_of(
    status: StatusCode,
    body: harbor_api::ErrorBody,
    retry_after: Option<Duration>,
) -> ApiError {
    let mut details = body.details;
    let outcome_unknown = details.remove("outcome_unknown").and_then(|v| v.as_bool());
    ApiError {
        status: status.as_u16(),
        code: body.error,
        message: body.message,
        retryable: body.retryable,
        outcome_unknown: outcome_unknown.unwrap_or(false),
        retry_after,
        details,
    }
}

fn api_error(
    status: StatusCode,
    headers: &HeaderMap,
    value: Option<Value>,
    raw: &[u8],
) -> ApiError {
    let retry_after = headers
        .get(RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|s| s.trim().parse::<u64>().ok())
        .map(Duration::from_secs);
    match value {
        Some(value @ Value::Object(_)) if value.get("error").is_some_and(Value::is_string) => {
            match serde_json::from_value(value) {
                Ok(body) => error_of(status, body, retry_after),
                Err(e) => ApiError {
                    status: status.as_u16(),
                    code: "invalid_error_body".to_string(),
                    message: e.to_string(),
                    retryable: false,
                    outcome_unknown: false,
                    retry_after,
                    details: Map::new(),
                },
            }
        }
        _ => {
            let gateway_trouble = matches!(status.as_u16(), 502..=504);
            let text = String::from_utf8_lossy(raw);
            ApiError {
                status: status.as_u16(),
                code: format!("http_{}", status.as_u16()),
                message: text.chars().take(200).collect(),
                retryable: gateway_trouble,
                outcome_unknown: gateway_trouble,
                retry_after,
                details: Map::new(),
            }
        }
    }
}

/// Whether the same request may get another answer. Routing refusals are
/// retried even if not marked retryable: the gateway normally follows them
/// itself, and one that reaches the client only means the map was moving.
fn should_retry(error: &ApiError) -> bool {
    error.retryable
        || error.outcome_unknown
        || matches!(
            error.code.as_str(),
            "not_leader" | "stale_route" | "leadership_changed"
        )
}

/// A final refusal: a 409 is the cluster deciding against the request on
/// the data's state; anything else is an API error.
fn classify(error: ApiError) -> Error {
    if error.status == StatusCode::CONFLICT.as_u16() {
        Error::Rejected(error)
    } else {
        Error::Api(error)
    }
}

/// Between half and all of `wait`, so clients refused together do not come
/// back together.
fn jitter(wait: Duration) -> Duration {
    let half = wait / 2;
    let spread = u64::try_from(half.as_nanos()).unwrap_or(u64::MAX);
    let random = u64::from_le_bytes(random_bytes());
    half + Duration::from_nanos(random % spread.saturating_add(1))
}

/// An error and its causes: reqwest's own text alone ("error sending
/// request") does not say what went wrong.
fn describe(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gateway_urls_are_checked_at_build_time() {
        for bad in [
            "127.0.0.1:7400",
            "https://127.0.0.1:7400",
            "http://",
            "http://h:1/?x=1",
            "http://u:p@h:1",
            "not a url",
        ] {
            let e = Client::builder([bad]).build().unwrap_err();
            assert!(matches!(e, Error::InvalidInput(_)), "{bad}: {e}");
        }
        assert!(Client::builder(Vec::<String>::new()).build().is_err());
        assert!(
            Client::builder(["http://127.0.0.1:7400", "http://localhost:7401/harbor/"])
                .build()
                .is_ok()
        );
        let e = Client::builder(["http://h:1"])
            .deadline(Duration::ZERO)
            .build()
            .unwrap_err();
        assert!(e.to_string().contains("deadline"), "{e}");
    }

    #[test]
    fn error_answers_are_parsed() {
        let mut headers = HeaderMap::new();
        headers.insert(RETRY_AFTER, "2".parse().unwrap());
        let body = json!({"error": "rpo_budget_exceeded", "message": "m", "retryable": true,
                          "outcome_unknown": false, "region": "madrid"});
        let e = api_error(StatusCode::SERVICE_UNAVAILABLE, &headers, Some(body), b"");
        assert_eq!(e.code, "rpo_budget_exceeded");
        assert_eq!(e.retry_after, Some(Duration::from_secs(2)));
        assert!(e.retryable && !e.outcome_unknown && should_retry(&e));
        assert_eq!(e.details.get("region"), Some(&json!("madrid")));
        let e = api_error(StatusCode::BAD_GATEWAY, &HeaderMap::new(), None, b"<html>");
        assert!(e.retryable && e.outcome_unknown);
    }

    #[test]
    fn jitter_stays_within_half_and_all() {
        for _ in 0..100 {
            let d = jitter(Duration::from_millis(100));
            assert!(d >= Duration::from_millis(50) && d <= Duration::from_millis(100));
        }
    }
}

//! The client against a fake gateway: an axum server on 127.0.0.1:0 that
//! records every request and answers from a script, so each test can stage
//! the slow, refused and unsure answers a real cluster gives under faults.

use std::collections::HashSet;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Router;
use harbor_client::{Client, Consistency, Error, ReservationStatus, ReserveRequest, TOKEN_LEN_MAX};
use serde_json::{json, Value};

/// One request as the fake gateway saw it.
#[derive(Clone, Debug)]
struct Seen {
    method: Method,
    path: String,
    query: String,
    session: Option<String>,
    body: Value,
}

impl Seen {
    fn token(&self) -> &str {
        self.body["reservation_token"].as_str().unwrap_or("")
    }
}

struct Reply {
    status: u16,
    body: Value,
    headers: Vec<(&'static str, String)>,
    delay: Duration,
}

impl Reply {
    fn ok(status: u16, body: Value) -> Reply {
        Reply {
            status,
            body,
            headers: Vec::new(),
            delay: Duration::ZERO,
        }
    }

    fn error(status: u16, code: &str, retryable: bool, outcome_unknown: bool) -> Reply {
        Reply::ok(
            status,
            json!({"error": code, "message": format!("fake {code}"), "retryable": retryable,
                   "outcome_unknown": outcome_unknown, "served_by": "gateway"}),
        )
    }

    fn header(mut self, name: &'static str, value: &str) -> Reply {
        self.headers.push((name, value.to_string()));
        self
    }

    fn after(mut self, delay: Duration) -> Reply {
        self.delay = delay;
        self
    }
}

type Script = dyn Fn(&Seen, usize) -> Reply + Send + Sync;

#[derive(Clone)]
struct Fake {
    seen: Arc<Mutex<Vec<Seen>>>,
    script: Arc<Script>,
}

impl Fake {
    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

async fn handle(
    State(fake): State<Fake>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let seen = Seen {
        method,
        path: uri.path().to_string(),
        query: uri.query().unwrap_or("").to_string(),
        session: headers
            .get("harbor-session")
            .map(|v| v.to_str().unwrap().to_string()),
        body: serde_json::from_slice(&body).unwrap_or(Value::Null),
    };
    let n = {
        let mut log = fake.seen.lock().unwrap();
        log.push(seen.clone());
        log.len() - 1
    };
    let reply = (fake.script)(&seen, n);
    tokio::time::sleep(reply.delay).await;
    let mut response = (
        StatusCode::from_u16(reply.status).unwrap(),
        axum::Json(reply.body),
    )
        .into_response();
    for (name, value) in reply.headers {
        response.headers_mut().insert(name, value.parse().unwrap());
    }
    response
}

/// Starts a fake gateway on the test's runtime (it stops with the test).
async fn fake(script: impl Fn(&Seen, usize) -> Reply + Send + Sync + 'static) -> (String, Fake) {
    let fake = Fake {
        seen: Arc::default(),
        script: Arc::new(script),
    };
    let router = Router::new().fallback(handle).with_state(fake.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    (url, fake)
}

/// Every test is bounded, whatever the client does.
async fn bounded<T>(test: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(15), test)
        .await
        .expect("the test ran past 15 s")
}

fn issuer(session: Option<&str>) -> Value {
    let mut body = json!({"issuer_id": "MUNI-77", "home_region": "newyork", "limit": 1000,
                          "reserved": 0, "remaining": 1000, "reservations_open": 0,
                          "region": "newyork", "node": "newyork-2", "served_by": "follower",
                          "consistency": "session", "applied": null, "staleness_ms": 12,
                          "stale": false, "fallback": false});
    if let Some(session) = session {
        body["session"] = json!(session);
    }
    body
}

fn reservation(id: &str, token: &str, replayed: bool) -> Value {
    json!({"reservation_id": id, "issuer_id": "MUNI-77", "reservation_token": token,
           "amount": 600, "desk": "madrid-rates", "trader": "t-17", "status": "confirmed",
           "expires_at_ms": null, "created": "shard15@g1:3", "updated": "shard15@g1:3",
           "replayed": replayed, "commit_token": "shard15@g1:3", "remaining": 400,
           "region": "newyork", "node": "newyork-2", "served_by": "leader"})
}

fn reserve_request() -> ReserveRequest {
    ReserveRequest::new("MUNI-77", 600, "madrid-rates", "t-17")
}

fn fast(url: &str) -> harbor_client::ClientBuilder {
    Client::builder([url.to_string()]).backoff(Duration::from_millis(10), Duration::from_millis(50))
}

#[test]
fn a_client_is_cheap_to_share() {
    fn shareable<T: Clone + Send + Sync + 'static>() {}
    shareable::<Client>();
}

#[tokio::test]
async fn the_session_keeps_the_newest_token_per_shard_and_is_sent_on_every_request() {
    bounded(async {
        let (url, fake) = fake(|_, n| match n {
            0 => Reply::ok(200, issuer(Some("shard3@g2:99")))
                .header("harbor-session", "shard3@g2:99"),
            // An older token of shard 3 must not replace the newer one.
            1 => {
                Reply::ok(200, issuer(None)).header("harbor-session", "shard15@g1:2,shard3@g1:500")
            }
            // Only in the body this time.
            2 => Reply::ok(200, issuer(Some("shard3@g2:100"))),
            _ => Reply::ok(200, issuer(None)),
        })
        .await;
        let client = fast(&url).build().unwrap();
        assert_eq!(client.session(), "");
        for _ in 0..4 {
            let issuer = client
                .get_issuer("MUNI-77", Consistency::Default)
                .await
                .unwrap();
            assert_eq!(issuer.served.served_by, "follower");
            assert_eq!(issuer.served.staleness_ms, Some(12));
        }
        let sent: Vec<Option<String>> = fake.seen().into_iter().map(|s| s.session).collect();
        assert_eq!(
            sent,
            [
                None,
                Some("shard3@g2:99".to_string()),
                Some("shard3@g2:99,shard15@g1:2".to_string()),
                Some("shard3@g2:100,shard15@g1:2".to_string()),
            ]
        );
        assert_eq!(client.session(), "shard3@g2:100,shard15@g1:2");

        // Clones share the session; a client with a new session does not.
        let clone = client.clone();
        let other = client.with_new_session();
        assert_eq!(clone.session(), client.session());
        assert_eq!(other.session(), "");
        other
            .get_issuer("MUNI-77", Consistency::Strong)
            .await
            .unwrap();
        assert_eq!(fake.seen()[4].session, None);
        assert_eq!(fake.seen()[4].query, "consistency=strong");

        // A saved session comes back as it was; a reset one is not sent.
        let saved = client.session();
        client.reset_session();
        client
            .get_issuer("MUNI-77", Consistency::Session)
            .await
            .unwrap();
        assert_eq!(fake.seen()[5].session, None);
        assert_eq!(fake.seen()[5].query, "consistency=session");
        client.restore_session(&saved).unwrap();
        client
            .get_issuer("MUNI-77", Consistency::Default)
            .await
            .unwrap();
        assert_eq!(fake.seen()[6].session.as_deref(), Some(saved.as_str()));
        assert!(matches!(
            client.restore_session("shard3@g2"),
            Err(Error::InvalidInput(_))
        ));
        client.merge_session("shard7@g1:1").unwrap();
        assert_eq!(client.session(), "shard3@g2:100,shard7@g1:1,shard15@g1:2");
    })
    .await
}

#[tokio::test]
async fn writes_add_their_commit_token_to_the_session_even_without_the_header() {
    bounded(async {
        let (url, _) =
            fake(|seen, _| Reply::ok(201, reservation("MUNI-77:r1", seen.token(), false))).await;
        let client = fast(&url).build().unwrap();
        client.reserve(reserve_request()).await.unwrap();
        assert_eq!(client.session(), "shard15@g1:3");
    })
    .await
}

#[tokio::test]
async fn generated_tokens_are_valid_and_unique() {
    let mut tokens = HashSet::new();
    for _ in 0..10_000 {
        let token = harbor_client::new_reservation_token();
        assert!(!token.is_empty() && token.len() <= TOKEN_LEN_MAX, "{token}");
        assert!(
            token
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.')),
            "{token}"
        );
        assert!(tokens.insert(token), "a token repeated");
    }
    bounded(async {
        let (url, fake) = fake(|seen, n| {
            Reply::ok(
                201,
                reservation(&format!("MUNI-77:r{}", n + 1), seen.token(), false),
            )
        })
        .await;
        let client = fast(&url).build().unwrap();
        let a = client.reserve(reserve_request()).await.unwrap();
        let b = client.reserve(reserve_request()).await.unwrap();
        let given = client
            .reserve(reserve_request().token("my-token.1"))
            .await
            .unwrap();
        let seen = fake.seen();
        assert_ne!(seen[0].token(), seen[1].token());
        assert_eq!(a.reservation_token, seen[0].token());
        assert_eq!(b.reservation_token, seen[1].token());
        assert_eq!(given.reservation_token, "my-token.1");
        // Bad input is refused before anything is sent.
        for bad in [
            reserve_request().token("has space"),
            reserve_request().token("x".repeat(TOKEN_LEN_MAX + 1)),
            ReserveRequest::new("MUNI-77", 0, "d", "t"),
            ReserveRequest::new("MUNI/77", 1, "d", "t"),
            reserve_request().hold(Duration::ZERO),
        ] {
            let e = client.reserve(bad).await.unwrap_err();
            assert!(matches!(e, Error::InvalidInput(_)), "{e}");
        }
        assert_eq!(fake.seen().len(), 3);
    })
    .await
}

#[tokio::test]
async fn a_reserve_whose_attempt_times_out_is_sent_again_with_the_same_token() {
    bounded(async {
        let (url, fake) = fake(|seen, n| match n {
            // The first attempt gets its answer too late.
            0 => Reply::ok(201, reservation("MUNI-77:r1", seen.token(), false))
                .after(Duration::from_millis(800)),
            _ => Reply::ok(201, reservation("MUNI-77:r1", seen.token(), true)),
        })
        .await;
        let client = fast(&url)
            .attempt_timeout(Duration::from_millis(200))
            .deadline(Duration::from_secs(5))
            .build()
            .unwrap();
        let r = client.reserve(reserve_request()).await.unwrap();
        assert!(r.replayed);
        assert_eq!(r.status, ReservationStatus::Confirmed);
        let seen = fake.seen();
        assert_eq!(seen.len(), 2, "{seen:?}");
        assert!(seen.iter().all(|s| s.path == "/v1/reservations"));
        assert_eq!(seen[0].token(), seen[1].token());
        assert_eq!(seen[1].body, seen[0].body, "the retry is the same request");
    })
    .await
}

#[tokio::test]
async fn a_reserve_that_stays_unsure_is_resolved_to_a_definite_outcome() {
    bounded(async {
        for outcome in ["committed", "rejected", "abandoned"] {
            let (url, fake) = fake(move |seen, _| {
                if seen.path == "/v1/reservations" {
                    // Sometimes a timeout answer, sometimes no answer at all.
                    return if outcome == "abandoned" {
                        Reply::error(504, "timeout", true, true).after(Duration::from_secs(5))
                    } else {
                        Reply::error(504, "timeout", true, true)
                    };
                }
                if seen.path.ends_with("/resolve") {
                    let token = seen.path.split('/').nth(3).unwrap();
                    let mut body = json!({"reservation_token": token, "issuer_id": "MUNI-77",
                                          "status": outcome, "commit_token": "shard15@g1:9"});
                    match outcome {
                        "committed" => body["reservation_id"] = json!("MUNI-77:r9"),
                        "rejected" => body["reason"] = json!("insufficient_exposure"),
                        _ => {}
                    }
                    return Reply::ok(200, body);
                }
                if seen.path == "/v1/reservations/MUNI-77:r9" {
                    return Reply::ok(200, reservation("MUNI-77:r9", "whatever", false));
                }
                Reply::error(404, "not_found", false, false)
            })
            .await;
            let client = fast(&url)
                .deadline(Duration::from_millis(1_200))
                .attempt_timeout(Duration::from_millis(200))
                .resolve_time(Duration::from_millis(500))
                .build()
                .unwrap();
            let start = Instant::now();
            let result = client.reserve(reserve_request()).await;
            assert!(start.elapsed() < Duration::from_millis(1_600), "{outcome}");
            let seen = fake.seen();
            let reserves: Vec<&Seen> = seen
                .iter()
                .filter(|s| s.path == "/v1/reservations")
                .collect();
            assert!(reserves.len() >= 2, "{outcome}: {seen:?}");
            let token = reserves[0].token();
            assert!(reserves.iter().all(|s| s.token() == token), "{outcome}");
            let resolve = seen.iter().find(|s| s.path.ends_with("/resolve")).unwrap();
            assert_eq!(
                resolve.path,
                format!("/v1/reservation-tokens/{token}/resolve")
            );
            assert_eq!(resolve.query, "issuer_id=MUNI-77");
            assert_eq!(resolve.method, Method::POST);
            match (outcome, result) {
                ("committed", Ok(r)) => {
                    assert_eq!(r.reservation_id, "MUNI-77:r9");
                    assert!(r.replayed);
                    let read = seen.last().unwrap();
                    assert_eq!(read.method, Method::GET);
                    assert_eq!(read.query, "consistency=strong");
                }
                ("rejected", Err(Error::Rejected(e))) => {
                    assert_eq!(e.code, "insufficient_exposure");
                    assert_eq!(e.details["reservation_token"], json!(token));
                }
                ("abandoned", Err(Error::Abandoned { reservation_token })) => {
                    assert_eq!(reservation_token, token);
                }
                (outcome, other) => panic!("{outcome}: {other:?}"),
            }
        }
    })
    .await
}

#[tokio::test]
async fn retryable_refusals_are_retried_honoring_retry_after() {
    bounded(async {
        let (url, fake) = fake(|seen, n| match n {
            0 => Reply::error(503, "rpo_budget_exceeded", true, false).header("retry-after", "1"),
            // Not marked retryable, but a routing refusal: retried too.
            1 => Reply::error(503, "stale_route", false, false),
            _ => Reply::ok(201, reservation("MUNI-77:r1", seen.token(), false)),
        })
        .await;
        let client = fast(&url).deadline(Duration::from_secs(5)).build().unwrap();
        let start = Instant::now();
        client.reserve(reserve_request()).await.unwrap();
        let elapsed = start.elapsed();
        assert!(
            elapsed >= Duration::from_secs(1),
            "Retry-After not honored: {elapsed:?}"
        );
        assert!(elapsed < Duration::from_secs(3), "{elapsed:?}");
        let seen = fake.seen();
        assert_eq!(seen.len(), 3);
        assert!(seen.iter().all(|s| s.token() == seen[0].token()));

        // A Retry-After past the deadline is not waited for: the call ends
        // at once, and says why.
        let (url, fake) = self::fake(|_, _| {
            Reply::error(503, "overloaded", true, false).header("retry-after", "30")
        })
        .await;
        let client = fast(&url).deadline(Duration::from_secs(2)).build().unwrap();
        let start = Instant::now();
        let e = client
            .get_issuer("MUNI-77", Consistency::Default)
            .await
            .unwrap_err();
        assert!(start.elapsed() < Duration::from_millis(500));
        assert_eq!(fake.seen().len(), 1);
        match e {
            Error::DeadlineExceeded {
                outcome_unknown: false,
                last_error: Some(last),
                ..
            } => assert_eq!(last.code(), Some("overloaded")),
            other => panic!("{other:?}"),
        }
    })
    .await
}

#[tokio::test]
async fn final_refusals_return_at_once_and_are_not_retried() {
    bounded(async {
        let (url, fake) = fake(|seen, _| {
            if seen.body["desk"] == "bad" {
                let mut reply = Reply::error(422, "invalid_field", false, false);
                reply.body["field"] = json!("desk");
                reply
            } else {
                let mut reply = Reply::error(409, "insufficient_exposure", false, false);
                reply.body["remaining"] = json!(400);
                reply.body["requested"] = json!(600);
                reply.body["commit_token"] = json!("shard15@g1:4");
                reply
            }
        })
        .await;
        let client = fast(&url).build().unwrap();
        let start = Instant::now();
        let e = client
            .reserve(ReserveRequest::new("MUNI-77", 600, "bad", "t-17"))
            .await
            .unwrap_err();
        assert!(start.elapsed() < Duration::from_millis(500));
        match &e {
            Error::Api(api) => {
                assert_eq!(api.status, 422);
                assert_eq!(api.code, "invalid_field");
                assert_eq!(api.field(), Some("desk"));
                assert!(!api.retryable);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(fake.seen().len(), 1, "a 422 was retried");

        let e = client.reserve(reserve_request()).await.unwrap_err();
        match &e {
            Error::Rejected(api) => {
                assert_eq!(api.status, 409);
                assert_eq!(api.remaining(), Some(400));
                assert_eq!(api.requested(), Some(600));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(fake.seen().len(), 2, "a 409 was retried");
        // The rejection is a committed entry: the session holds it.
        assert_eq!(client.session(), "shard15@g1:4");
    })
    .await
}

#[tokio::test]
async fn a_gateway_that_refuses_connections_is_left_for_the_next() {
    bounded(async {
        let (live, fake) = fake(|_, _| Reply::ok(200, issuer(None))).await;
        let client = Client::builder([refusing_url(), live])
            .deadline(Duration::from_secs(3))
            .build()
            .unwrap();
        let start = Instant::now();
        for _ in 0..3 {
            client
                .get_issuer("MUNI-77", Consistency::Default)
                .await
                .unwrap();
        }
        // No backoff: a refused connect moves on at once.
        assert!(
            start.elapsed() < Duration::from_millis(500),
            "{:?}",
            start.elapsed()
        );
        assert_eq!(fake.seen().len(), 3);
        // A refused connect sent nothing, so a write there is not unsure.
        let (url, _) =
            self::fake(|seen, _| Reply::ok(201, reservation("MUNI-77:r1", seen.token(), false)))
                .await;
        let refused_first = Client::builder([refusing_url(), url]).build().unwrap();
        assert!(
            !refused_first
                .reserve(reserve_request())
                .await
                .unwrap()
                .replayed
        );
    })
    .await
}

/// A port nobody listens on: connections to it are refused.
fn refusing_url() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    format!("http://{}", listener.local_addr().unwrap())
}

#[tokio::test]
async fn the_deadline_is_honored() {
    bounded(async {
        let (url, fake) =
            fake(|_, _| Reply::error(504, "timeout", true, true).after(Duration::from_secs(10)))
                .await;
        let client = fast(&url)
            .deadline(Duration::from_millis(500))
            .build()
            .unwrap();

        let start = Instant::now();
        let e = client
            .get_issuer("MUNI-77", Consistency::Default)
            .await
            .unwrap_err();
        let elapsed = start.elapsed();
        assert!(
            elapsed >= Duration::from_millis(450) && elapsed < Duration::from_millis(900),
            "{elapsed:?}"
        );
        assert!(
            matches!(
                e,
                Error::DeadlineExceeded {
                    outcome_unknown: false,
                    ..
                }
            ),
            "{e:?}"
        );

        // Per call, and a write whose attempts got no answer says so.
        let start = Instant::now();
        let e = client
            .with_deadline(Duration::from_millis(300))
            .confirm("MUNI-77:r1")
            .await
            .unwrap_err();
        let elapsed = start.elapsed();
        assert!(elapsed < Duration::from_millis(700), "{elapsed:?}");
        assert!(e.outcome_unknown(), "{e:?}");

        // A reserve whose resolve gets no answer either: unknown, with its token.
        let start = Instant::now();
        let e = client.reserve(reserve_request()).await.unwrap_err();
        let elapsed = start.elapsed();
        assert!(elapsed < Duration::from_millis(900), "{elapsed:?}");
        match e {
            Error::DeadlineExceeded {
                outcome_unknown: true,
                reservation_token: Some(token),
                ..
            } => {
                let seen = fake.seen();
                assert_eq!(seen.iter().filter(|s| s.token() == token).count(), 1);
                assert!(seen
                    .last()
                    .unwrap()
                    .path
                    .ends_with(&format!("{token}/resolve")));
            }
            other => panic!("{other:?}"),
        }
    })
    .await
}

//! Read modes end to end on the dev cluster (two regions, a 35 ms WAN):
//! session reads see the caller's writes, bounded reads are served nearby
//! when fresh and by the leader (or flagged) when not, causal reads wait for
//! their dependencies, and the typed client keeps the session by itself.

mod common;

use std::time::Duration;

use common::{start_dev, Api};
use harbor_client::{Client, Consistency, ReserveRequest};
use reqwest::Method;
use serde_json::{json, Value};

/// One HTTP call with an optional session header; the answer, its status,
/// and the session header it sent back.
async fn call(
    http: &reqwest::Client,
    method: Method,
    url: &str,
    session: Option<&str>,
    body: Option<Value>,
) -> (u16, Value, Option<String>) {
    let mut request = http.request(method, url);
    if let Some(session) = session {
        request = request.header("Harbor-Session", session);
    }
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request
        .send()
        .await
        .unwrap_or_else(|e| panic!("{url}: {e}"));
    let status = response.status().as_u16();
    let header = response
        .headers()
        .get("harbor-session")
        .map(|v| v.to_str().unwrap().to_string());
    let body = response.json().await.unwrap();
    (status, body, header)
}

fn reserve_body(token: &str, issuer: &str, amount: u64) -> Value {
    json!({"reservation_token": token, "issuer_id": issuer, "amount": amount,
           "desk": "madrid-rates", "trader": "t-17"})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_madrid_trader_always_sees_her_new_york_reservation() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = start_dev(dir.path()).await;
    let madrid = cluster.url("madrid");
    let api = Api::new();
    let http = api.client.clone();
    let created = api
        .put_issuer(&madrid, "MUNI-77", "newyork", 1_000_000)
        .await;
    assert_eq!(created.status, 201, "{}", created.body);

    let rounds = 60;
    let mut by_follower = 0;
    let mut session: Option<String> = None;
    let mut last_applied: Option<(u64, u64)> = None;
    for n in 0..rounds {
        let url = format!("{madrid}/v1/reservations");
        let body = reserve_body(&format!("trader-{n}"), "MUNI-77", 1);
        let (status, written, header) =
            call(&http, Method::POST, &url, session.as_deref(), Some(body)).await;
        assert_eq!(status, 201, "{written}");
        assert_eq!(written["region"], "newyork", "{written}");
        let header = header.expect("a write answer carries the session header");
        assert_eq!(written["session"], header.as_str());
        assert!(header.contains(written["commit_token"].as_str().unwrap()));
        let id = written["reservation_id"].as_str().unwrap().to_string();

        // The dashboard refresh, right after, through Madrid.
        let url = format!("{madrid}/v1/issuers/MUNI-77/open-reservations?consistency=session");
        let (status, read, header) = call(&http, Method::GET, &url, Some(&header), None).await;
        assert_eq!(status, 200, "{read}");
        let ids: Vec<&str> = read["reservations"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["reservation_id"].as_str().unwrap())
            .collect();
        assert!(
            ids.contains(&id.as_str()),
            "round {n}: {id} missing from {read}"
        );
        assert_eq!(read["consistency"], "session");
        assert_eq!(read["stale"], false);
        if read["served_by"] == "follower" {
            by_follower += 1;
            assert_eq!(read["region"], "madrid", "{read}");
            assert_eq!(read["fallback"], false);
        } else {
            assert_eq!(read["fallback"], true, "{read}");
        }
        // Monotonic: what the session saw never goes back.
        let applied = read["applied"].as_str().unwrap();
        let (g, i) = applied.split_once('@').unwrap().1.split_once(':').unwrap();
        let position = (g[1..].parse().unwrap(), i.parse().unwrap());
        assert!(last_applied.is_none_or(|p| p <= position), "{applied}");
        last_applied = Some(position);
        session = header;
    }
    println!("session reads through Madrid: {by_follower}/{rounds} served by a Madrid follower");
    assert!(by_follower > 0, "no session read was served in Madrid");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bounded_reads_are_local_when_fresh_and_honest_when_not() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = start_dev(dir.path()).await;
    let madrid = cluster.url("madrid");
    let api = Api::new();
    let http = api.client.clone();
    let created = api.put_issuer(&madrid, "MUNI-77", "newyork", 1_000).await;
    assert_eq!(created.status, 201, "{}", created.body);
    let bounded = |query: &str| format!("{madrid}/v1/issuers/MUNI-77?consistency=bounded{query}");

    // At rest, the Madrid follower is well within 2 s.
    let mut local = None;
    for _ in 0..50 {
        let (status, read, _) = call(&http, Method::GET, &bounded(""), None, None).await;
        assert_eq!(status, 200, "{read}");
        if read["served_by"] == "follower" {
            local = Some(read);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let local = local.expect("a fresh Madrid follower serves bounded reads");
    assert_eq!(local["region"], "madrid");
    assert_eq!(local["stale"], false);
    assert!(local["staleness_ms"].as_u64().unwrap() <= 2_000, "{local}");

    // Replication to Madrid now takes 1.2 s longer: a 500 ms budget is out
    // of reach for the follower.
    let faults = format!("{madrid}/v1/admin/faults");
    let delay = api
        .post(
            faults.clone(),
            json!({"kind": "delay", "regions": ["madrid", "newyork"], "ms": 1200}),
        )
        .await;
    assert_eq!(delay.status, 200, "{}", delay.body);
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let (status, read, _) = call(
        &http,
        Method::GET,
        &bounded("&max_staleness_ms=500"),
        None,
        None,
    )
    .await;
    assert_eq!(status, 200, "{read}");
    assert_eq!(read["served_by"], "leader", "{read}");
    assert_eq!(read["region"], "newyork");
    assert_eq!(read["fallback"], true);
    assert_eq!(read["stale"], false);
    // Allowed to be stale: the follower answers and says so.
    let (status, read, _) = call(
        &http,
        Method::GET,
        &bounded("&max_staleness_ms=500&allow_stale=true"),
        None,
        None,
    )
    .await;
    assert_eq!(status, 200, "{read}");
    assert_eq!(read["served_by"], "follower", "{read}");
    assert_eq!(read["stale"], true, "{read}");
    assert!(read["staleness_ms"].as_u64().unwrap() > 500, "{read}");

    // Healed: local again.
    let heal = api
        .post(
            faults.clone(),
            json!({"kind": "delay", "regions": ["madrid", "newyork"], "ms": 0}),
        )
        .await;
    assert_eq!(heal.status, 200, "{}", heal.body);
    let mut local_again = false;
    for _ in 0..100 {
        let (_, read, _) = call(
            &http,
            Method::GET,
            &bounded("&max_staleness_ms=500"),
            None,
            None,
        )
        .await;
        if read["served_by"] == "follower" && read["stale"] == false {
            local_again = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        local_again,
        "the follower never caught up after the delay ended"
    );

    // The Madrid replica crashes: bounded reads go to the leader.
    let follower = local["node"].as_str().unwrap();
    let crash = api
        .post(faults.clone(), json!({"kind": "crash", "node": follower}))
        .await;
    assert_eq!(crash.status, 200, "{}", crash.body);
    for _ in 0..5 {
        let (status, read, _) = call(&http, Method::GET, &bounded(""), None, None).await;
        assert_eq!(status, 200, "{read}");
        assert_eq!(read["served_by"], "leader", "{read}");
        assert_eq!(read["fallback"], true, "{read}");
    }
    let restart = api
        .post(faults, json!({"kind": "restart", "node": follower}))
        .await;
    assert_eq!(restart.status, 200, "{}", restart.body);

    // The metrics saw both kinds.
    let metrics = http
        .get(format!("{madrid}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for expected in [
        r#"harbor_reads_total{consistency="bounded",served_by="follower"}"#,
        r#"harbor_reads_total{consistency="bounded",served_by="fallback"}"#,
        r#"harbor_stale_reads_total{consistency="bounded",served_by="follower"} 1"#,
        "harbor_replica_staleness_ms{",
        "harbor_follower_lag_ms{",
    ] {
        assert!(
            metrics.contains(expected),
            "{expected} missing from:\n{metrics}"
        );
    }
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn causal_reads_wait_for_their_dependencies_and_bad_reads_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = start_dev(dir.path()).await;
    let (madrid, newyork) = (cluster.url("madrid"), cluster.url("newyork"));
    let api = Api::new();
    let http = api.client.clone();
    let created = api.put_issuer(&newyork, "MUNI-77", "newyork", 1_000).await;
    assert_eq!(created.status, 201, "{}", created.body);

    // A New York desk writes; a Madrid view names that write as its cause.
    for n in 0..20 {
        let url = format!("{newyork}/v1/reservations");
        let body = reserve_body(&format!("cause-{n}"), "MUNI-77", 1);
        let (status, written, _) = call(&http, Method::POST, &url, None, Some(body)).await;
        assert_eq!(status, 201, "{written}");
        let cause = written["commit_token"].as_str().unwrap();
        let id = written["reservation_id"].as_str().unwrap();
        let url =
            format!("{madrid}/v1/reservations/{id}?consistency=causal&after={cause}&wait_ms=1000");
        let (status, read, _) = call(&http, Method::GET, &url, None, None).await;
        assert_eq!(status, 200, "round {n}: {read}");
        assert_eq!(read["consistency"], "causal");
        assert_eq!(read["served_by"], "follower", "the follower waited: {read}");
        assert_eq!(read["region"], "madrid");
    }

    let issuer = format!("{madrid}/v1/issuers/MUNI-77");
    for (url, session, status, code) in [
        (issuer.clone(), Some("shard1@g1"), 400, "invalid_session"),
        (
            format!("{issuer}?consistency=eventual"),
            None,
            400,
            "invalid_consistency",
        ),
        (
            format!("{issuer}?consistency=strong&max_staleness_ms=5"),
            None,
            400,
            "invalid_query",
        ),
        (
            format!("{issuer}?consistency=session&wait_ms=5"),
            None,
            400,
            "invalid_query",
        ),
        (
            format!("{issuer}?consistency=causal&wait_ms=99999"),
            None,
            400,
            "invalid_query",
        ),
        (
            format!("{issuer}?consistency=causal&after=nope"),
            None,
            400,
            "invalid_session",
        ),
        (
            format!("{issuer}?max_staleness_ms=-1"),
            None,
            400,
            "invalid_query",
        ),
    ] {
        let (got, body, _) = call(&http, Method::GET, &url, session, None).await;
        assert_eq!(
            (got, body["error"].as_str().unwrap()),
            (status, code),
            "{url}: {body}"
        );
    }
    // A write with a garbled session is refused before anything is sent.
    let url = format!("{madrid}/v1/reservations");
    let body = reserve_body("garbled", "MUNI-77", 1);
    let (status, refused, _) = call(&http, Method::POST, &url, Some("x"), Some(body)).await;
    assert_eq!(
        (status, refused["error"].as_str()),
        (400, Some("invalid_session"))
    );
    let token = api.token(&newyork, "garbled", "MUNI-77").await;
    assert_eq!(token.body["status"], "unknown", "{}", token.body);
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_keeps_the_session_across_regions() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = start_dev(dir.path()).await;
    let madrid = Client::builder([cluster.url("madrid")])
        .deadline(Duration::from_secs(10))
        .build()
        .unwrap();
    madrid
        .put_issuer("MUNI-77", "newyork", 10_000)
        .await
        .unwrap();
    for n in 0..20 {
        let reserved = madrid
            .reserve(ReserveRequest::new("MUNI-77", 1, "madrid-rates", "t-17"))
            .await
            .unwrap();
        let open = madrid
            .open_reservations("MUNI-77", Consistency::Session)
            .await
            .unwrap();
        assert!(
            open.reservations
                .iter()
                .any(|r| r.reservation_id == reserved.reservation_id),
            "round {n}: {} missing",
            reserved.reservation_id
        );
    }
    // A second client with its own session through New York sees the
    // first one's writes once it names them (causal).
    let newyork = Client::builder([cluster.url("newyork")]).build().unwrap();
    let after: Vec<_> = madrid
        .session()
        .split(',')
        .map(|t| t.parse().unwrap())
        .collect();
    let issuer = newyork
        .get_issuer("MUNI-77", Consistency::causal(after))
        .await
        .unwrap();
    assert_eq!(issuer.reserved, 20);

    // The admin side: health, the cluster view, a planned transfer.
    assert_eq!(newyork.health().await.unwrap().status, "ok");
    let view = newyork.cluster().await.unwrap();
    let shard = issuer.served.shard.expect("reads name their shard");
    let group = view.groups.iter().find(|g| g.shard == shard).unwrap();
    let leader = group.leader.as_str();
    let target = group
        .members
        .iter()
        .map(String::as_str)
        .find(|m| *m != leader && m.starts_with("newyork"))
        .unwrap();
    let moved = newyork.transfer_leader(shard, target).await.unwrap();
    assert_eq!((moved.from.as_str(), moved.to.as_str()), (leader, target));
    let refused = newyork
        .transfer_leader(shard, "madrid-1")
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Some("transfer_refused"), "{refused}");
    cluster.shutdown().await;
}

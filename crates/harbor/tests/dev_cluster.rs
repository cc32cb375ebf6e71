//! The embedded dev cluster, end to end over HTTP: two regions, a 35 ms WAN,
//! real WALs with fsync on a temporary directory.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use common::{Api, Reply};
use harbor::dev::{DevCluster, DevOptions};
use serde_json::{json, Value};

async fn start(dir: &std::path::Path) -> DevCluster {
    let mut options = DevOptions::new(dir.to_path_buf());
    options.port = 0;
    DevCluster::start(options)
        .await
        .expect("dev cluster starts")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_desks_race_for_one_limit_and_a_timed_out_client_resolves() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = start(dir.path()).await;
    let (madrid, newyork) = (cluster.url("madrid"), cluster.url("newyork"));
    let api = Api::new();

    let health = api.get(format!("{madrid}/v1/health")).await;
    assert_eq!(health.status, 200, "{}", health.body);

    let created = api.put_issuer(&madrid, "MUNI-77", "newyork", 1000).await;
    assert_eq!(created.status, 201, "{}", created.body);
    assert_eq!(created.body["remaining"], 1000);
    let again = api.put_issuer(&newyork, "MUNI-77", "newyork", 1000).await;
    assert_eq!(again.status, 200, "{}", again.body);
    assert_eq!(again.body["changed"], false);
    let moved = api.put_issuer(&newyork, "MUNI-77", "madrid", 1000).await;
    assert_eq!((moved.status, moved.code()), (409, "home_region_mismatch"));

    // Both desks at the same moment, through their own gateways.
    let (a, b) = tokio::join!(
        api.reserve(&madrid, "tok-madrid", "MUNI-77", 600, "madrid-rates"),
        api.reserve(&newyork, "tok-newyork", "MUNI-77", 600, "newyork-rates"),
    );
    let mut statuses = [a.status, b.status];
    statuses.sort();
    assert_eq!(statuses, [201, 409], "a: {} b: {}", a.body, b.body);
    let (won, lost) = if a.status == 201 { (&a, &b) } else { (&b, &a) };
    assert_eq!(won.body["status"], "confirmed");
    assert_eq!(won.body["remaining"], 400);
    assert_eq!(won.body["region"], "newyork", "served by the home leader");
    assert_eq!(won.body["served_by"], "leader");
    let commit_token = won.body["commit_token"].as_str().unwrap();
    assert!(commit_token.starts_with("shard"), "{commit_token}");
    assert_eq!(lost.code(), "insufficient_exposure");
    assert_eq!(lost.body["remaining"], 400);
    assert_eq!(lost.body["retryable"], false);

    // The rejection is the token's durable outcome: retrying it, even after
    // headroom frees up, gives the same answer.
    let lost_token = if a.status == 409 {
        "tok-madrid"
    } else {
        "tok-newyork"
    };
    let lost_desk = if a.status == 409 {
        "madrid-rates"
    } else {
        "newyork-rates"
    };
    let reservation_id = won.body["reservation_id"].as_str().unwrap().to_string();
    let released = api
        .post(
            format!("{madrid}/v1/reservations/{reservation_id}/release"),
            json!({}),
        )
        .await;
    assert_eq!(released.status, 200, "{}", released.body);
    assert_eq!(released.body["status"], "released");
    assert_eq!(released.body["remaining"], 1000);
    let retry = api
        .reserve(&madrid, lost_token, "MUNI-77", 600, lost_desk)
        .await;
    assert_eq!(
        (retry.status, retry.code()),
        (409, "insufficient_exposure"),
        "{}",
        retry.body
    );
    let looked_up = api.token(&madrid, lost_token, "MUNI-77").await;
    assert_eq!(looked_up.body["status"], "rejected", "{}", looked_up.body);
    assert_eq!(looked_up.body["reason"], "insufficient_exposure");

    // The same token with another payload is refused.
    let mismatch = api
        .reserve(&madrid, lost_token, "MUNI-77", 5, lost_desk)
        .await;
    assert_eq!(
        (mismatch.status, mismatch.code()),
        (422, "token_payload_mismatch")
    );

    // A client that timed out: its token is unknown, so it resolves it; a
    // late copy of its request can then never commit.
    let unknown = api.token(&madrid, "tok-timeout", "MUNI-77").await;
    assert_eq!(unknown.body["status"], "unknown", "{}", unknown.body);
    let resolved = api
        .post(
            format!("{madrid}/v1/reservation-tokens/tok-timeout/resolve"),
            json!({"issuer_id": "MUNI-77"}),
        )
        .await;
    assert_eq!(resolved.status, 200, "{}", resolved.body);
    assert_eq!(resolved.body["status"], "abandoned");
    let late = api
        .reserve(&newyork, "tok-timeout", "MUNI-77", 10, "madrid-rates")
        .await;
    assert_eq!(
        (late.status, late.code()),
        (409, "token_abandoned"),
        "{}",
        late.body
    );

    // A committed token resolves to its reservation; lookup without the
    // issuer asks every group.
    let committed = api
        .reserve(&madrid, "tok-ok", "MUNI-77", 10, "madrid-rates")
        .await;
    assert_eq!(committed.status, 201);
    let everywhere = api
        .get(format!("{newyork}/v1/reservation-tokens/tok-ok"))
        .await;
    assert_eq!(
        everywhere.body["status"], "committed",
        "{}",
        everywhere.body
    );
    assert_eq!(
        everywhere.body["reservation_id"],
        committed.body["reservation_id"]
    );
    let replay = api
        .reserve(&newyork, "tok-ok", "MUNI-77", 10, "madrid-rates")
        .await;
    assert_eq!(replay.status, 201);
    assert_eq!(replay.body["replayed"], true);
    assert_eq!(
        replay.body["reservation_id"],
        committed.body["reservation_id"]
    );

    let open = api
        .get(format!(
            "{madrid}/v1/issuers/MUNI-77/open-reservations?consistency=strong"
        ))
        .await;
    assert_eq!(open.status, 200, "{}", open.body);
    assert_eq!(open.body["count"], 1);
    assert_eq!(open.body["reservations"][0]["reservation_token"], "tok-ok");

    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn holds_confirm_and_expire() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = start(dir.path()).await;
    let madrid = cluster.url("madrid");
    let api = Api::new();
    assert_eq!(
        api.put_issuer(&madrid, "CABIN-9", "madrid", 1).await.status,
        201
    );

    let hold = |token: &'static str, ttl: u64| {
        let api = &api;
        let madrid = madrid.clone();
        async move {
            api.post(
                format!("{madrid}/v1/reservations"),
                json!({"reservation_token": token, "issuer_id": "CABIN-9", "amount": 1,
                       "desk": "d", "trader": "t", "hold_ttl_ms": ttl}),
            )
            .await
        }
    };
    let held = hold("h1", 60_000).await;
    assert_eq!(held.status, 201, "{}", held.body);
    assert_eq!(held.body["status"], "held");
    assert_eq!(held.body["remaining"], 0);
    let id = held.body["reservation_id"].as_str().unwrap().to_string();
    let confirmed = api
        .post(format!("{madrid}/v1/reservations/{id}/confirm"), json!({}))
        .await;
    assert_eq!(confirmed.status, 200, "{}", confirmed.body);
    assert_eq!(confirmed.body["status"], "confirmed");
    let released = api
        .post(format!("{madrid}/v1/reservations/{id}/release"), json!({}))
        .await;
    assert_eq!(released.body["status"], "released");
    let again = api
        .post(format!("{madrid}/v1/reservations/{id}/confirm"), json!({}))
        .await;
    assert_eq!((again.status, again.code()), (409, "invalid_transition"));

    // A short hold expires on its own and frees the cabin.
    let short = hold("h2", 150).await;
    assert_eq!(short.status, 201, "{}", short.body);
    let short_id = short.body["reservation_id"].as_str().unwrap().to_string();
    let mut expired = false;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let r = api
            .get(format!("{madrid}/v1/reservations/{short_id}"))
            .await;
        if r.body["status"] == "expired" {
            expired = true;
            break;
        }
    }
    assert!(expired, "hold never expired");
    assert_eq!(api.issuer(&madrid, "CABIN-9").await.body["remaining"], 1);
    let late = api
        .post(
            format!("{madrid}/v1/reservations/{short_id}/confirm"),
            json!({}),
        )
        .await;
    assert_eq!(late.status, 409, "{}", late.body);
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_a_clear_error_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = start(dir.path()).await;
    let madrid = cluster.url("madrid");
    let api = Api::new();
    assert_eq!(
        api.put_issuer(&madrid, "ISS-1", "madrid", 100).await.status,
        201
    );
    let raw = |body: &'static str| {
        let client = api.client.clone();
        let url = format!("{madrid}/v1/reservations");
        async move {
            let response = client
                .post(url)
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await
                .unwrap();
            let status = response.status().as_u16();
            let body: Value = response.json().await.unwrap();
            Reply { status, body }
        }
    };
    let cases: Vec<(Reply, u16, &str)> = vec![
        (raw("{not json").await, 400, "invalid_json"),
        (
            raw(r#"{"reservation_token":"t","issuer_id":"ISS-1","amount":5,"desk":"d","trader":"t","extra":1}"#).await,
            422,
            "invalid_request",
        ),
        (
            raw(r#"{"reservation_token":"t","issuer_id":"ISS-1","amount":-5,"desk":"d","trader":"t"}"#).await,
            422,
            "invalid_request",
        ),
        (
            raw(r#"{"reservation_token":"t","issuer_id":"ISS-1","amount":1.5,"desk":"d","trader":"t"}"#).await,
            422,
            "invalid_request",
        ),
        (api.reserve(&madrid, "t", "ISS-1", 0, "d").await, 422, "invalid_amount"),
        (api.reserve(&madrid, "t", "NOPE", 5, "d").await, 404, "unknown_issuer"),
        (api.reserve(&madrid, "bad token!", "ISS-1", 5, "d").await, 422, "invalid_field"),
        (api.reserve(&madrid, "t", "ISS-1", 5, "").await, 422, "invalid_field"),
        (api.put_issuer(&madrid, "ISS-2", "tokyo", 5).await, 422, "unknown_region"),
        (api.get(format!("{madrid}/v1/issuers/ISS-1?consistency=eventual")).await, 400, "invalid_consistency"),
        (api.get(format!("{madrid}/v1/reservations/garbage")).await, 422, "invalid_field"),
        (api.get(format!("{madrid}/v1/reservations/ISS-1:r99")).await, 404, "unknown_reservation"),
        (api.get(format!("{madrid}/v1/nowhere")).await, 404, "not_found"),
        (
            api.post(format!("{madrid}/v1/reservation-tokens/t/resolve"), json!({})).await,
            422,
            "issuer_required",
        ),
    ];
    for (i, (reply, status, code)) in cases.iter().enumerate() {
        assert_eq!(
            (reply.status, reply.code()),
            (*status, *code),
            "case {i}: {}",
            reply.body
        );
        assert!(
            reply.body["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "case {i}"
        );
        assert!(reply.body["retryable"].is_boolean(), "case {i}");
        assert!(reply.body["region"].is_string(), "case {i}: {}", reply.body);
    }
    let big = format!(
        r#"{{"reservation_token":"t","issuer_id":"ISS-1","amount":5,"desk":"{}","trader":"t"}}"#,
        "x".repeat(100_000)
    );
    let response = api
        .client
        .post(format!("{madrid}/v1/reservations"))
        .header("content-type", "application/json")
        .body(big)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 413);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"], "body_too_large");

    let issuer = api.issuer(&madrid, "ISS-1").await;
    assert_eq!(
        issuer.body["reserved"], 0,
        "bad input changed state: {}",
        issuer.body
    );
    assert_eq!(
        api.token(&madrid, "t", "ISS-1").await.body["status"],
        "unknown"
    );
    assert_eq!(api.issuer(&madrid, "ISS-2").await.status, 404);
    cluster.shutdown().await;
}

/// 16 clients across both gateways hammer 3 tight issuers, retrying tokens;
/// afterwards every issuer's books balance and no token has two reservations.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_clients_never_oversell_or_duplicate() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = start(dir.path()).await;
    let urls = [cluster.url("madrid"), cluster.url("newyork")];
    let api = Arc::new(Api::new());
    let issuers = [
        ("HOT-1", "madrid", 50u64),
        ("HOT-2", "newyork", 70),
        ("HOT-3", "newyork", 30),
    ];
    for (issuer, home, limit) in issuers {
        assert_eq!(
            api.put_issuer(&urls[0], issuer, home, limit).await.status,
            201
        );
    }
    let mut clients = Vec::new();
    for c in 0..16u64 {
        let api = api.clone();
        let url = urls[(c % 2) as usize].clone();
        clients.push(tokio::spawn(async move {
            let mut tokens: Vec<(String, &'static str)> = Vec::new();
            for i in 0..25u64 {
                let (issuer, _, _) = issuers[((c + i) % 3) as usize];
                let token = format!("c{c}-{i}");
                let amount = 1 + (c * 7 + i * 3) % 9;
                let first = api.reserve(&url, &token, issuer, amount, "desk").await;
                assert!([201, 409].contains(&first.status), "{}", first.body);
                // Retry the same token, as a client that lost the answer would.
                if i % 4 == 0 {
                    let retry = api.reserve(&url, &token, issuer, amount, "desk").await;
                    assert_eq!(
                        retry.status, first.status,
                        "{} vs {}",
                        first.body, retry.body
                    );
                    assert_eq!(retry.body["reservation_id"], first.body["reservation_id"]);
                }
                // Release some to keep headroom moving.
                if first.status == 201 && i % 5 == 0 {
                    let id = first.body["reservation_id"].as_str().unwrap();
                    let r = api
                        .post(format!("{url}/v1/reservations/{id}/release"), json!({}))
                        .await;
                    assert_eq!(r.status, 200, "{}", r.body);
                }
                tokens.push((token, issuer));
            }
            tokens
        }));
    }
    let mut all_tokens = Vec::new();
    for client in clients {
        all_tokens.extend(client.await.unwrap());
    }
    let mut reservation_of_token = BTreeMap::new();
    for (token, issuer) in &all_tokens {
        let reply = api.token(&urls[1], token, issuer).await;
        let status = reply.body["status"].as_str().unwrap().to_string();
        assert!(
            status == "committed" || status == "rejected",
            "{}",
            reply.body
        );
        if status == "committed" {
            reservation_of_token.insert(
                token.clone(),
                reply.body["reservation_id"].as_str().unwrap().to_string(),
            );
        }
    }
    let distinct: BTreeSet<&String> = reservation_of_token.values().collect();
    assert_eq!(
        distinct.len(),
        reservation_of_token.len(),
        "two tokens share a reservation"
    );
    for (issuer, _, limit) in issuers {
        let view = api.issuer(&urls[0], issuer).await.body;
        let open = api
            .get(format!(
                "{}/v1/issuers/{issuer}/open-reservations?consistency=strong",
                urls[0]
            ))
            .await
            .body;
        let list = open["reservations"].as_array().unwrap();
        let sum: u64 = list.iter().map(|r| r["amount"].as_u64().unwrap()).sum();
        assert_eq!(view["reserved"].as_u64().unwrap(), sum, "{issuer}: {view}");
        assert!(sum <= limit, "{issuer} oversold: {sum} > {limit}");
        let mut seen = BTreeSet::new();
        for r in list {
            let token = r["reservation_token"].as_str().unwrap();
            assert!(
                seen.insert(token.to_string()),
                "token {token} has two open reservations"
            );
            assert_eq!(
                reservation_of_token.get(token).map(String::as_str),
                r["reservation_id"].as_str()
            );
        }
    }
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_cluster_recovers_every_acknowledged_write() {
    let dir = tempfile::tempdir().unwrap();
    let mut acknowledged = Vec::new();
    {
        let cluster = start(dir.path()).await;
        let madrid = cluster.url("madrid");
        let api = Api::new();
        for i in 0..8 {
            let home = if i % 2 == 0 { "madrid" } else { "newyork" };
            assert_eq!(
                api.put_issuer(&madrid, &format!("R-{i}"), home, 1_000)
                    .await
                    .status,
                201
            );
        }
        for i in 0..40 {
            let issuer = format!("R-{}", i % 8);
            let r = api
                .reserve(&madrid, &format!("k{i}"), &issuer, 7, "d")
                .await;
            assert_eq!(r.status, 201, "{}", r.body);
            acknowledged.push((format!("k{i}"), issuer, r.body["reservation_id"].clone()));
        }
        cluster.shutdown().await;
    }
    let cluster = start(dir.path()).await;
    let newyork = cluster.url("newyork");
    let api = Api::new();
    for (token, issuer, id) in &acknowledged {
        let reply = api.token(&newyork, token, issuer).await;
        assert_eq!(reply.body["status"], "committed", "{}", reply.body);
        assert_eq!(&reply.body["reservation_id"], id);
    }
    for i in 0..8 {
        let view = api.issuer(&newyork, &format!("R-{i}")).await.body;
        assert_eq!(view["reserved"], 35, "{view}");
        assert!(
            view["generation"].as_u64().unwrap() >= 2,
            "a restart starts a new generation"
        );
    }
    cluster.shutdown().await;
}

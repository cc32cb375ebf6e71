//! `POST /v1/reservations:batch` on the dev cluster: every item has its own
//! outcome, bad items never fail the others, and the typed client drives it.

mod common;

use common::{start_dev, Api};
use harbor_client::{BatchResult, Client, ReserveRequest};
use serde_json::{json, Value};

fn item(token: &str, issuer: &str, amount: u64) -> Value {
    json!({"reservation_token": token, "issuer_id": issuer, "amount": amount,
           "desk": "rates", "trader": "t-1"})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_item_of_a_batch_has_its_own_outcome() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = start_dev(dir.path()).await;
    let madrid = cluster.url("madrid");
    let api = Api::new();
    // Two issuers in different regions, so the batch spans two groups.
    assert_eq!(
        api.put_issuer(&madrid, "B-MAD", "madrid", 100).await.status,
        201
    );
    assert_eq!(
        api.put_issuer(&madrid, "B-NY", "newyork", 100).await.status,
        201
    );
    let url = format!("{madrid}/v1/reservations:batch");
    let mut bad_field = item("b-bad", "B-MAD", 1);
    bad_field["desk"] = json!("");
    let batch = json!({"reservations": [
        item("b-1", "B-MAD", 60),
        item("b-2", "B-MAD", 60),          // over the limit after b-1
        item("b-3", "B-NY", 30),
        item("b-1", "B-MAD", 60),          // the same token: the first outcome
        bad_field,
        item("b-4", "NOBODY", 1),
        item("b-5", "B-NY", 70),
    ]});
    let reply = api.post(url.clone(), batch.clone()).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    let results = reply.body["results"].as_array().unwrap();
    let summary: Vec<(bool, &str)> = results
        .iter()
        .map(|r| {
            let ok = r["ok"] == true;
            let what = if ok {
                r["status"].as_str()
            } else {
                r["error"].as_str()
            };
            (ok, what.unwrap())
        })
        .collect();
    assert_eq!(
        summary,
        vec![
            (true, "confirmed"),
            (false, "insufficient_exposure"),
            (true, "confirmed"),
            (true, "confirmed"),
            (false, "invalid_field"),
            (false, "unknown_issuer"),
            (true, "confirmed"),
        ],
        "{}",
        reply.body
    );
    assert_eq!(results[3]["replayed"], true);
    assert_eq!(results[3]["reservation_id"], results[0]["reservation_id"]);
    assert_eq!(results[1]["http_status"], 409);
    assert_eq!(results[4]["reservation_token"], "b-bad");
    assert_eq!(
        (
            reply.body["reserved"].as_u64(),
            reply.body["failed"].as_u64()
        ),
        (Some(4), Some(3))
    );
    // The session covers both groups.
    let session = reply.body["session"].as_str().unwrap();
    assert_eq!(session.split(',').count(), 2, "{session}");
    // Sent again (a client that lost the answer): nothing reserves twice.
    let again = api.post(url.clone(), batch).await;
    assert_eq!(again.status, 200, "{}", again.body);
    assert!(again.body["results"][0]["replayed"] == true);
    let view = api.issuer(&madrid, "B-MAD").await;
    assert_eq!(view.body["reserved"], 60, "{}", view.body);
    let view = api.issuer(&madrid, "B-NY").await;
    assert_eq!(view.body["reserved"], 100, "{}", view.body);

    // A batch that is not one: refused whole, nothing changes.
    for (body, status, code) in [
        (json!({"reservations": []}), 422, "invalid_batch"),
        (
            json!({"reservations": [item("x", "B-MAD", 1)], "extra": 1}),
            422,
            "invalid_request",
        ),
        (json!([item("x", "B-MAD", 1)]), 422, "invalid_request"),
    ] {
        let reply = api.post(url.clone(), body).await;
        assert_eq!(
            (reply.status, reply.code()),
            (status, code),
            "{}",
            reply.body
        );
    }
    let too_many: Vec<Value> = (0..8_191)
        .map(|n| item(&format!("m-{n}"), "B-MAD", 1))
        .collect();
    let reply = api
        .post(url.clone(), json!({"reservations": too_many}))
        .await;
    assert_eq!(
        (reply.status, reply.code()),
        (422, "invalid_batch"),
        "{}",
        reply.body
    );
    assert_eq!(
        api.token(&madrid, "x", "B-MAD").await.body["status"],
        "unknown"
    );
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_sends_big_batches() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = start_dev(dir.path()).await;
    let client = Client::builder([cluster.url("madrid")]).build().unwrap();
    for n in 0..4 {
        client
            .put_issuer(&format!("BIG-{n}"), "madrid", 3_000)
            .await
            .unwrap();
    }
    // 8,000 reservations over four issuers, more than one log entry per
    // group: each issuer gets 2,000 requests of 2 against a limit of 3,000,
    // so 1,500 of them fit.
    let requests: Vec<ReserveRequest> = (0..8_000)
        .map(|n| ReserveRequest::new(format!("BIG-{}", n % 4), 2, "rates", "t-1"))
        .collect();
    let results = client.reserve_batch(requests).await.unwrap();
    assert_eq!(results.len(), 8_000);
    let reserved = results
        .iter()
        .filter(|r| matches!(r, BatchResult::Reserved(_)))
        .count();
    let refused: Vec<&str> = results
        .iter()
        .filter_map(|r| match r {
            BatchResult::Refused(e) => Some(e.code.as_str()),
            BatchResult::Reserved(_) => None,
        })
        .collect();
    assert_eq!(reserved, 6_000);
    assert!(
        refused.iter().all(|c| *c == "insufficient_exposure"),
        "{refused:?}"
    );
    let issuer = client
        .get_issuer("BIG-0", harbor_client::Consistency::Session)
        .await
        .unwrap();
    assert_eq!(issuer.reserved, 3_000);
    cluster.shutdown().await;
}

//! The projections end to end on the dev cluster: a reservation written
//! through one region's gateway is found by the other region's search
//! once it includes the write's commit token (`min_as_of`), the exposure
//! report sums what is open, every answer says how fresh it is, and bad
//! parameters are refused.

mod common;

use common::{start_dev, Api};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn search_and_reports_answer_from_the_projection_and_say_how_fresh() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = start_dev(dir.path()).await;
    let (madrid, newyork) = (cluster.url("madrid"), cluster.url("newyork"));
    let api = Api::new();
    assert_eq!(
        api.put_issuer(&madrid, "MUNI-77", "newyork", 1_000)
            .await
            .status,
        201
    );
    assert_eq!(
        api.put_issuer(&madrid, "BONO-5", "madrid", 500)
            .await
            .status,
        201
    );
    let first = api
        .reserve(&newyork, "tok-ny-1", "MUNI-77", 600, "newyork-rates")
        .await;
    assert_eq!(first.status, 201, "{:?}", first.body);
    let second = api
        .reserve(&newyork, "tok-ny-2", "BONO-5", 70, "madrid-rates")
        .await;
    assert_eq!(second.status, 201, "{:?}", second.body);
    let tokens = format!(
        "{},{}",
        first.body["commit_token"].as_str().unwrap(),
        second.body["commit_token"].as_str().unwrap()
    );

    // Madrid's search, right after New York's acknowledgements.
    let found = api
        .get(format!(
            "{madrid}/v1/search/reservations?q=rates&min_as_of={tokens}"
        ))
        .await;
    assert_eq!(found.status, 200, "{:?}", found.body);
    let body = &found.body;
    assert_eq!(body["served_by"], "projection");
    assert_eq!(body["region"], "madrid");
    assert!(body["watermark"]["wall_ms"].as_u64().is_some(), "{body}");
    assert!(body["lag_ms"].as_u64().is_some(), "{body}");
    assert_eq!(body["max_lag_ms"], 2_000);
    let ids: Vec<&str> = body["reservations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["reservation_token"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["tok-ny-2", "tok-ny-1"], "newest first: {body}");

    // Filters and paging.
    let page = api
        .get(format!(
            "{madrid}/v1/search/reservations?limit=1&min_amount=100"
        ))
        .await;
    assert_eq!(
        page.body["reservations"][0]["reservation_token"],
        "tok-ny-1"
    );
    assert_eq!(page.body["next_cursor"], serde_json::Value::Null);
    let page = api
        .get(format!(
            "{newyork}/v1/search/reservations?limit=1&min_as_of={tokens}"
        ))
        .await;
    assert_eq!(page.body["region"], "newyork");
    let next = page.body["next_cursor"].as_str().unwrap().to_string();
    let rest = api
        .get(format!(
            "{newyork}/v1/search/reservations?limit=1&cursor={next}"
        ))
        .await;
    assert_eq!(
        rest.body["reservations"][0]["reservation_token"],
        "tok-ny-1"
    );
    let by_issuer = api
        .get(format!(
            "{madrid}/v1/search/reservations?issuer_id=BONO-5&status=confirmed"
        ))
        .await;
    assert_eq!(by_issuer.body["reservations"].as_array().unwrap().len(), 1);

    // The exposure report.
    let report = api
        .get(format!(
            "{madrid}/v1/reports/exposure?group_by=home_region&min_as_of={tokens}"
        ))
        .await;
    assert_eq!(report.status, 200, "{:?}", report.body);
    assert_eq!(report.body["served_by"], "projection");
    let lines = report.body["lines"].as_array().unwrap();
    let line = |key: &str| lines.iter().find(|l| l["key"] == key).unwrap().clone();
    assert_eq!(line("newyork")["reserved"], 600);
    assert_eq!(line("madrid")["confirmed"], 70);
    let by_issuer = api
        .get(format!("{madrid}/v1/reports/exposure?group_by=issuer"))
        .await;
    let muni = by_issuer.body["lines"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["key"] == "MUNI-77")
        .unwrap()
        .clone();
    assert_eq!(muni["limit"], 1_000);

    // A token the projection cannot include yet: 409, retryable, named.
    let future = "shard0@g1:999999999";
    let late = api
        .get(format!(
            "{madrid}/v1/search/reservations?min_as_of={future}&wait_ms=50"
        ))
        .await;
    assert_eq!(late.status, 409, "{:?}", late.body);
    assert_eq!(late.code(), "not_yet_visible");
    assert_eq!(late.body["retryable"], true);
    assert_eq!(late.body["missing"][0], future);

    // Bad input changes nothing and says why.
    for (query, field) in [
        ("limit=0", "limit"),
        ("limit=100000", "limit"),
        ("status=pending", "status"),
        ("min_amount=-3", "min_amount"),
        ("cursor=nope", "cursor"),
        ("min_as_of=shard0", "min_as_of"),
        ("min_as_of=shard999@g1:1", "min_as_of"),
        ("wait_ms=999999", "wait_ms"),
        ("min_amount=10&max_amount=5", "min_amount"),
        (
            "created_after_ms=10&created_before_ms=10",
            "created_after_ms",
        ),
        ("customer_id=", "customer_id"),
    ] {
        let bad = api
            .get(format!("{madrid}/v1/search/reservations?{query}"))
            .await;
        assert_eq!(bad.status, 400, "{query}: {:?}", bad.body);
        assert_eq!(bad.body["field"], field, "{query}: {:?}", bad.body);
    }
    let bad = api
        .get(format!("{madrid}/v1/search/reservations?colour=red"))
        .await;
    assert_eq!(bad.code(), "invalid_query");
    let bad = api
        .get(format!("{madrid}/v1/reports/exposure?group_by=trader"))
        .await;
    assert_eq!(bad.status, 400);
    assert_eq!(bad.body["field"], "group_by");

    // The customer view: a customer's reservations across issuers and
    // regions, once the projection holds what the caller has seen.
    let mut seen = Vec::new();
    for (token, issuer) in [("tok-c-1", "MUNI-77"), ("tok-c-2", "BONO-5")] {
        let body = serde_json::json!({"reservation_token": token, "issuer_id": issuer, "amount": 5,
            "desk": "retail", "trader": "t-1", "customer_id": "cust-42"});
        let made = api.post(format!("{madrid}/v1/reservations"), body).await;
        assert_eq!(made.status, 201, "{:?}", made.body);
        assert_eq!(made.body["customer_id"], "cust-42");
        seen.push(made.body["commit_token"].as_str().unwrap().to_string());
    }
    let view = api
        .get(format!(
            "{newyork}/v1/customers/cust-42/reservations?after={}",
            seen.join(",")
        ))
        .await;
    assert_eq!(view.status, 200, "{:?}", view.body);
    assert_eq!(view.body["customer_id"], "cust-42");
    assert_eq!(view.body["served_by"], "projection");
    let shown: Vec<&str> = view.body["reservations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["reservation_token"].as_str().unwrap())
        .collect();
    assert_eq!(shown, ["tok-c-2", "tok-c-1"]);
    let none = api
        .get(format!("{newyork}/v1/customers/cust-0/reservations"))
        .await;
    assert_eq!(none.body["reservations"].as_array().unwrap().len(), 0);
    let late = api
        .get(format!(
            "{newyork}/v1/customers/cust-42/reservations?after={future}&wait_ms=20"
        ))
        .await;
    assert_eq!(late.code(), "not_yet_visible");
    let bad = api
        .get(format!(
            "{newyork}/v1/customers/cust-42/reservations?after=yesterday"
        ))
        .await;
    assert_eq!(bad.status, 400);
    assert_eq!(bad.body["field"], "after");
    let by_customer = api
        .get(format!(
            "{madrid}/v1/search/reservations?customer_id=cust-42&min_as_of={}",
            seen.join(",")
        ))
        .await;
    assert_eq!(
        by_customer.body["reservations"].as_array().unwrap().len(),
        2
    );

    // A rebuild: the projection starts over from a scan of every group,
    // and finds the same rows.
    let rebuilt = api
        .post(
            format!("{madrid}/v1/admin/projections/reservations/rebuild"),
            serde_json::json!({}),
        )
        .await;
    assert_eq!(rebuilt.status, 200, "{:?}", rebuilt.body);
    let unknown = api
        .post(
            format!("{madrid}/v1/admin/projections/nope/rebuild"),
            serde_json::json!({}),
        )
        .await;
    assert_eq!(unknown.status, 404);
    let again = api
        .get(format!(
            "{madrid}/v1/search/reservations?q=rates&min_as_of={tokens}"
        ))
        .await;
    assert_eq!(again.status, 200, "{:?}", again.body);
    assert_eq!(again.body["reservations"].as_array().unwrap().len(), 2);
    let view = api
        .get(format!(
            "{madrid}/v1/customers/cust-42/reservations?after={}",
            seen.join(",")
        ))
        .await;
    assert_eq!(
        view.body["reservations"].as_array().unwrap().len(),
        2,
        "customer ids survive a scan"
    );
    drop(cluster);
}

/// With room for only a few changes per replica, the projection falls
/// behind what the replicas keep: it scans those groups again and still
/// holds every reservation, once, with its latest state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_whose_changes_were_evicted_is_scanned_again() {
    let dir = tempfile::tempdir().unwrap();
    let mut options = harbor::dev::DevOptions::new(dir.path().to_path_buf());
    options.port = 0;
    options.tune_node = |config| config.changes_retained_bytes = 4 << 10;
    let cluster = harbor::dev::DevCluster::start(options).await.unwrap();
    cluster
        .wait_ready(std::time::Duration::from_secs(30))
        .await
        .unwrap();
    let madrid = cluster.url("madrid");
    let api = Api::new();
    assert_eq!(
        api.put_issuer(&madrid, "MUNI-1", "madrid", 1_000_000)
            .await
            .status,
        201
    );
    let scans = |status: &serde_json::Value| status["projections"][0]["scans"].as_u64().unwrap();
    let groups = api.get(format!("{madrid}/v1/admin/projections")).await.body["projections"][0]
        ["groups"]
        .as_u64()
        .unwrap();
    // Batches of 50 in a burst: each evicts the one before from the
    // replicas' changes before the projection's next round.
    let mut written = 0;
    let mut last = String::new();
    for round in 0..40 {
        let items: Vec<serde_json::Value> = (0..50)
            .map(|i| {
                serde_json::json!({"reservation_token": format!("tok-{round}-{i}"), "issuer_id": "MUNI-1",
                    "amount": 1, "desk": "d", "trader": "t"})
            })
            .collect();
        let batch = api
            .post(
                format!("{madrid}/v1/reservations:batch"),
                serde_json::json!({ "reservations": items }),
            )
            .await;
        assert_eq!(batch.body["reserved"], 50, "{:?}", batch.body);
        written += 50;
        last = batch.body["results"][49]["commit_token"]
            .as_str()
            .unwrap()
            .to_string();
    }
    let report = api
        .get(format!(
            "{madrid}/v1/reports/exposure?group_by=issuer&min_as_of={last}&wait_ms=10000"
        ))
        .await;
    assert_eq!(report.status, 200, "{:?}", report.body);
    let line = &report.body["lines"][0];
    assert_eq!(line["key"], "MUNI-1");
    assert_eq!(
        (line["confirmed_count"].as_u64(), line["reserved"].as_u64()),
        (Some(written), Some(written))
    );
    let status = api.get(format!("{madrid}/v1/admin/projections")).await.body;
    assert!(
        scans(&status) > groups,
        "no group was scanned again: {status}"
    );
    assert_eq!(status["projections"][0]["reservations"], written);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_gateway_goes_on_from_its_saved_projection() {
    let dir = tempfile::tempdir().unwrap();
    let options = || {
        let mut options = harbor::dev::DevOptions::new(dir.path().to_path_buf());
        options.port = 0;
        options.gateway.projection_save_ms = 100;
        options
    };
    let wait = std::time::Duration::from_secs(30);
    let cluster = harbor::dev::DevCluster::start(options()).await.unwrap();
    cluster.wait_ready(wait).await.unwrap();
    let madrid = cluster.url("madrid");
    let api = Api::new();
    assert_eq!(
        api.put_issuer(&madrid, "MUNI-3", "madrid", 1_000)
            .await
            .status,
        201
    );
    let first = api.reserve(&madrid, "tok-a", "MUNI-3", 10, "rates").await;
    let token = first.body["commit_token"].as_str().unwrap().to_string();
    let found = api
        .get(format!(
            "{madrid}/v1/search/reservations?issuer_id=MUNI-3&min_as_of={token}"
        ))
        .await;
    assert_eq!(found.body["reservations"].as_array().unwrap().len(), 1);
    // Saves come every 100 ms while rows change: wait for one that holds
    // the reservation, then stop everything.
    let deadline = std::time::Instant::now() + wait;
    loop {
        let status = api.get(format!("{madrid}/v1/admin/projections")).await.body;
        if status["projections"][0]["saved_reservations"] == 1 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never saved: {status}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    cluster.shutdown().await;

    let cluster = harbor::dev::DevCluster::start(options()).await.unwrap();
    cluster.wait_ready(wait).await.unwrap();
    let madrid = cluster.url("madrid");
    // The save is loaded in the background, at once.
    let deadline = std::time::Instant::now() + wait;
    let status = loop {
        let status = api.get(format!("{madrid}/v1/admin/projections")).await.body;
        if status["projections"][0]["loaded_from_save"] == true {
            break status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never loaded: {status}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    assert_eq!(status["projections"][0]["reservations"], 1, "{status}");
    // It goes on from there: a new write is found, and no group was
    // scanned to get there.
    let second = api.reserve(&madrid, "tok-b", "MUNI-3", 20, "rates").await;
    let token = second.body["commit_token"].as_str().unwrap().to_string();
    let found = api
        .get(format!(
            "{madrid}/v1/search/reservations?issuer_id=MUNI-3&min_as_of={token}&wait_ms=10000"
        ))
        .await;
    assert_eq!(found.status, 200, "{:?}", found.body);
    assert_eq!(found.body["reservations"].as_array().unwrap().len(), 2);
    let status = api.get(format!("{madrid}/v1/admin/projections")).await.body;
    assert_eq!(status["projections"][0]["scans"], 0, "{status}");
    cluster.shutdown().await;
}

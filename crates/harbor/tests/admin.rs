//! The admin API of the embedded cluster: the cluster view, planned leader
//! transfers under load, and faults on demand (a paused leader that comes
//! back after its group moved on can neither commit nor serve strong reads).

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{check_acknowledged, Api, Load};
use harbor::dev::{DevCluster, DevOptions};
use harbor_reservation::Command;
use harbor_types::{Amount, IssuerId, NodeId, ReservationToken};
use harbor_wire::{Query, Request, Response};
use serde_json::{json, Value};

async fn start() -> (tempfile::TempDir, DevCluster, Arc<Api>) {
    let dir = tempfile::tempdir().unwrap();
    let mut options = DevOptions::new(dir.path().to_path_buf());
    options.port = 0;
    let cluster = DevCluster::start(options).await.unwrap();
    (dir, cluster, Arc::new(Api::new()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cluster_view_shows_every_group_and_refuses_bad_admin_input() {
    let (_dir, cluster, api) = start().await;
    let url = cluster.url("madrid");
    let view = api.get(format!("{url}/v1/admin/cluster")).await;
    assert_eq!(view.status, 200, "{}", view.body);
    let body = &view.body;
    assert!(body["map_version"].as_u64().unwrap() >= 1);
    assert_eq!(body["regions"], json!(["madrid", "newyork"]));
    let nodes = body["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), 6);
    assert!(nodes.iter().all(|n| n["health"] == "up"), "{body}");
    let groups = body["groups"].as_array().unwrap();
    assert_eq!(groups.len(), 16);
    for g in groups {
        assert_eq!(g["leader_ready"], true, "{g}");
        assert_eq!(g["members"].as_array().unwrap().len(), 4, "{g}");
        let followers = g["followers"].as_array().unwrap();
        assert_eq!(followers.len(), 3, "{g}");
        assert!(followers
            .iter()
            .all(|f| f["lag_entries"].is_u64() && f["lag_ms"].is_u64()));
        for field in ["shard", "home_region", "leader", "generation"] {
            assert!(!g[field].is_null(), "{field} missing in {g}");
        }
    }
    // `harbor status` prints the same view as tables.
    let parsed: harbor_gateway::ClusterView = serde_json::from_value(body.clone()).unwrap();
    let table = harbor::status::render(&parsed);
    assert!(table.contains("madrid-1       madrid     up"), "{table}");
    assert_eq!(table.lines().filter(|l| l.starts_with("shard")).count(), 16);
    // The issuer names its shard.
    api.put_issuer(&url, "ADM-1", "madrid", 100).await;
    let issuer = api.issuer(&url, "ADM-1").await;
    assert!(issuer.body["shard"].is_u64(), "{}", issuer.body);

    // Bad input: a clear error, nothing changes.
    let group0 = &groups[0];
    let shard = group0["shard"].as_u64().unwrap();
    let remote = group0["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m.as_str().unwrap().to_string())
        .find(|m| !m.starts_with(group0["home_region"].as_str().unwrap()))
        .unwrap();
    let transfer = |group: String| format!("{url}/v1/admin/groups/{group}/transfer-leader");
    for (target, body, status, code) in [
        (
            transfer(shard.to_string()),
            json!({"to": remote}),
            409,
            "transfer_refused",
        ),
        (
            transfer(format!("shard{shard}")),
            json!({"to": group0["leader"]}),
            409,
            "transfer_refused",
        ),
        (
            transfer("99".into()),
            json!({"to": "madrid-1"}),
            404,
            "unknown_group",
        ),
        (
            transfer("x".into()),
            json!({"to": "madrid-1"}),
            400,
            "invalid_group",
        ),
        (
            transfer(shard.to_string()),
            json!({"to": "nowhere-9"}),
            404,
            "unknown_node",
        ),
        (
            transfer(shard.to_string()),
            json!({"target": "madrid-1"}),
            422,
            "invalid_request",
        ),
        (
            format!("{url}/v1/admin/faults"),
            json!({"kind": "melt", "node": "madrid-1"}),
            422,
            "invalid_field",
        ),
        (
            format!("{url}/v1/admin/faults"),
            json!({"kind": "crash", "node": "tokyo-1"}),
            404,
            "unknown_node",
        ),
        (
            format!("{url}/v1/admin/faults"),
            json!({"kind": "partition", "regions": ["madrid", "tokyo"]}),
            404,
            "unknown_region",
        ),
    ] {
        let reply = api.post(target.clone(), body.clone()).await;
        assert_eq!(reply.status, status, "{target} {body}: {}", reply.body);
        assert_eq!(reply.code(), code, "{target} {body}: {}", reply.body);
    }
    let after = api.get(format!("{url}/v1/admin/cluster")).await.body;
    assert_eq!(
        after["map_version"], body["map_version"],
        "bad input changed the map"
    );
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_planned_transfer_under_load_loses_nothing_and_pauses_writes_briefly() {
    let (_dir, cluster, api) = start().await;
    let url = cluster.url("madrid");
    assert_eq!(
        api.put_issuer(&url, "TR-1", "madrid", 1_000_000)
            .await
            .status,
        201
    );
    let shard = cluster
        .meta
        .shard_of(&IssuerId::new("TR-1").unwrap())
        .unwrap();
    let group = cluster.meta.map().groups[&shard].clone();
    let target = group
        .members
        .iter()
        .find(|m| {
            **m != group.leader && cluster.meta.map().region_of(m) == Some(&group.home_region)
        })
        .unwrap()
        .clone();

    let load = Load::start(
        &api,
        std::slice::from_ref(&url),
        "TR-1",
        "tr",
        Duration::from_secs(3),
    );
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let moved = api
        .post(
            format!("{url}/v1/admin/groups/{}/transfer-leader", shard.0),
            json!({"to": target}),
        )
        .await;
    assert_eq!(moved.status, 200, "{}", moved.body);
    assert_eq!(moved.body["to"], json!(target));
    assert_eq!(moved.body["from"], json!(group.leader));
    assert_eq!(
        moved.body["generation"].as_u64().unwrap(),
        group.generation.0 + 1
    );
    let writes = load.finish().await;
    assert!(
        writes.iter().all(|w| w.status == 201),
        "a write failed during the transfer: {:?}",
        writes.iter().find(|w| w.status != 201)
    );
    // The write pause: the longest wait of one write.
    let pause = writes.iter().map(|w| w.answered - w.sent).max().unwrap();
    println!(
        "{shard}: {} -> {target}; {} writes, longest single write {pause:?}; control plane saw a pause of {} ms",
        group.leader,
        writes.len(),
        moved.body["pause_ms"]
    );
    assert_eq!(cluster.meta.map().groups[&shard].leader, target);

    // Every write is there once.
    let open = check_acknowledged(&api, &url, "TR-1", &writes).await;
    assert_eq!(open, writes.len());
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_leader_that_returns_can_neither_commit_nor_serve_strong_reads() {
    let (_dir, cluster, api) = start().await;
    let url = cluster.url("madrid");
    assert_eq!(
        api.put_issuer(&url, "PA-1", "madrid", 1_000).await.status,
        201
    );
    let issuer = IssuerId::new("PA-1").unwrap();
    let shard = cluster.meta.shard_of(&issuer).unwrap();
    let old = cluster.meta.map().groups[&shard].clone();
    let paused = api
        .post(
            format!("{url}/v1/admin/faults"),
            json!({"kind": "pause", "node": old.leader}),
        )
        .await;
    assert_eq!(paused.status, 200, "{}", paused.body);
    assert_eq!(paused.body["changed"], true);

    // While it is paused, a write and a strong read reach it directly (as
    // from a client with an old route); they wait in its "socket".
    let gateway = cluster.gateways[0].gateway.clone();
    let token = ReservationToken::new("pa-stale-write").unwrap();
    let stale_write = {
        let (gateway, leader, token, issuer) = (
            gateway.clone(),
            old.leader.clone(),
            token.clone(),
            issuer.clone(),
        );
        tokio::spawn(async move {
            let command = Command::Reserve {
                token,
                issuer_id: issuer,
                amount: Amount(1),
                desk: "desk".into(),
                trader: "t".into(),
                hold_ttl_ms: None,
            };
            gateway
                .endpoint()
                .call_node_within(&leader, Request::Write { shard, command }, 20_000)
                .await
        })
    };
    let stale_read = {
        let (gateway, leader, issuer) = (gateway.clone(), old.leader.clone(), issuer.clone());
        tokio::spawn(async move {
            gateway
                .endpoint()
                .call_node_within(
                    &leader,
                    Request::Read {
                        shard,
                        query: Query::Issuer(issuer),
                    },
                    20_000,
                )
                .await
        })
    };

    // The group moves on: a new leader, a newer generation, writes flow.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let group = &cluster.meta.map().groups[&shard];
        if group.leader != old.leader {
            assert!(group.generation > old.generation);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no failover from a paused leader"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let fresh = api.reserve(&url, "pa-fresh", "PA-1", 5, "desk").await;
    assert_eq!(fresh.status, 201, "{}", fresh.body);

    let resumed = api
        .post(
            format!("{url}/v1/admin/faults"),
            json!({"kind": "resume", "node": old.leader}),
        )
        .await;
    assert_eq!(resumed.status, 200, "{}", resumed.body);
    let write = stale_write.await.unwrap();
    assert!(
        matches!(write, Ok(Response::Error(_))),
        "the old leader answered a write: {write:?}"
    );
    let read = stale_read.await.unwrap();
    assert!(
        matches!(read, Ok(Response::Error(_))),
        "the old leader served a strong read: {read:?}"
    );
    // The refused write never committed anywhere; the fresh one did.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let lookup = api.token(&url, "pa-stale-write", "PA-1").await;
    assert_eq!(lookup.body["status"], "unknown", "{}", lookup.body);
    let view = api.issuer(&url, "PA-1").await.body;
    assert_eq!(view["reserved"], 5, "{view}");

    // The old leader follows again; a crash and restart by fault works too.
    let node = NodeId::new(old.leader.as_str()).unwrap();
    for kind in ["crash", "restart"] {
        let reply = api
            .post(
                format!("{url}/v1/admin/faults"),
                json!({"kind": kind, "node": node}),
            )
            .await;
        assert_eq!(reply.status, 200, "{kind}: {}", reply.body);
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while api.get(format!("{url}/v1/health")).await.status != 200 {
        assert!(Instant::now() < deadline, "not healthy after the restart");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitions_and_delays_between_regions_are_applied_and_healed() {
    let (_dir, cluster, api) = start().await;
    let madrid = cluster.url("madrid");
    assert_eq!(
        api.put_issuer(&madrid, "PT-1", "madrid", 1_000)
            .await
            .status,
        201
    );
    let faults = format!("{madrid}/v1/admin/faults");
    let regions = json!(["madrid", "newyork"]);
    let delayed = api
        .post(
            faults.clone(),
            json!({"kind": "delay", "regions": regions, "ms": 200}),
        )
        .await;
    assert_eq!(delayed.status, 200, "{}", delayed.body);
    // From newyork's gateway a madrid issuer costs two extra delays now.
    let newyork = cluster.url("newyork");
    let t = Instant::now();
    assert_eq!(api.issuer(&newyork, "PT-1").await.status, 200);
    assert!(
        t.elapsed() >= Duration::from_millis(400),
        "{:?}",
        t.elapsed()
    );
    api.post(
        faults.clone(),
        json!({"kind": "delay", "regions": regions, "ms": 0}),
    )
    .await;
    let cut = api
        .post(
            faults.clone(),
            json!({"kind": "partition", "regions": regions}),
        )
        .await;
    assert_eq!(cut.status, 200, "{}", cut.body);
    // Madrid's own writes go on (the remote copy is asynchronous).
    assert_eq!(
        api.reserve(&madrid, "pt-1", "PT-1", 1, "desk").await.status,
        201
    );
    let healed = api
        .post(faults.clone(), json!({"kind": "heal", "regions": regions}))
        .await;
    assert_eq!(healed.status, 200, "{}", healed.body);
    assert_eq!(healed.body["changed"], true);
    assert_eq!(api.issuer(&newyork, "PT-1").await.status, 200);
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bucket_moves_over_http_and_the_hot_bucket_list_follows_it() {
    let (_dir, cluster, api) = start().await;
    let url = cluster.url("madrid");
    api.put_issuer(&url, "HOT-1", "madrid", 1_000_000).await;
    for i in 0..30 {
        let reply = api
            .reserve(&url, &format!("hot-{i}"), "HOT-1", 1, "d")
            .await;
        assert_eq!(reply.status, 201, "{}", reply.body);
    }
    let issuer = api.issuer(&url, "HOT-1").await.body;
    let (bucket, from) = (
        issuer["bucket"].as_u64().unwrap(),
        issuer["shard"].as_u64().unwrap(),
    );

    // The leader counted the writes against the issuer's bucket.
    let hot = api.get(format!("{url}/v1/admin/buckets/hot?top=3")).await;
    assert_eq!(hot.status, 200, "{}", hot.body);
    let hottest = &hot.body["buckets"][0];
    assert_eq!(hottest["bucket"], json!(bucket), "{}", hot.body);
    assert_eq!(hottest["shard"], json!(format!("shard{from}")));
    assert_eq!(hottest["share_of_group_writes_percent"], json!(100));
    let hottest_rate = hottest["writes_per_s"].as_u64();
    assert!(hottest_rate > Some(0), "{hottest}");
    assert_eq!(hot.body["groups"].as_array().unwrap().len(), 16);
    assert_eq!(hot.body["rebalancer"]["enabled"], json!(false));
    for (query, code) in [
        ("top=0", "invalid_field"),
        ("top=101", "invalid_field"),
        ("top=x", "invalid_field"),
        ("hottest=3", "invalid_query"),
    ] {
        let reply = api.get(format!("{url}/v1/admin/buckets/hot?{query}")).await;
        assert_eq!(
            (reply.status, reply.code()),
            (400, code),
            "{query}: {}",
            reply.body
        );
    }

    // Bad moves change nothing.
    let view = api.get(format!("{url}/v1/admin/cluster")).await.body;
    let group_in = |region: &str| {
        (view["groups"].as_array().unwrap().iter())
            .filter(|g| g["home_region"] == region)
            .map(|g| g["shard"].as_u64().unwrap())
            .find(|s| *s != from)
            .unwrap()
    };
    let (to, elsewhere) = (group_in("madrid"), group_in("newyork"));
    let move_to = |bucket: String, to: Value| {
        let (api, url) = (api.clone(), url.clone());
        async move {
            api.post(
                format!("{url}/v1/admin/buckets/{bucket}/move"),
                json!({"to": to}),
            )
            .await
        }
    };
    for (b, target, status, code) in [
        (
            bucket.to_string(),
            json!(format!("shard{from}")),
            409,
            "move_refused",
        ),
        (
            bucket.to_string(),
            json!(format!("shard{elsewhere}")),
            409,
            "move_refused",
        ),
        (bucket.to_string(), json!("shard99"), 404, "unknown_group"),
        (
            "99999".to_string(),
            json!(format!("shard{to}")),
            404,
            "unknown_bucket",
        ),
        (
            "x".to_string(),
            json!(format!("shard{to}")),
            400,
            "invalid_field",
        ),
    ] {
        let reply = move_to(b.clone(), target.clone()).await;
        assert_eq!(
            (reply.status, reply.code()),
            (status, code),
            "{b} {target}: {}",
            reply.body
        );
    }

    // The move, then the issuer answers from its new group, its tokens
    // replay there, and the source no longer counts the bucket.
    let moved = move_to(bucket.to_string(), json!(format!("shard{to}"))).await;
    assert_eq!(moved.status, 200, "{}", moved.body);
    assert_eq!(moved.body["from"], json!(format!("shard{from}")));
    assert_eq!(
        moved.body["copied_reservations"],
        json!(30),
        "{}",
        moved.body
    );
    let issuer = api.issuer(&url, "HOT-1").await.body;
    assert_eq!(issuer["shard"], json!(to), "{issuer}");
    assert_eq!(issuer["reserved"], json!(30), "{issuer}");
    let again = api.reserve(&url, "hot-0", "HOT-1", 1, "d").await;
    assert_eq!(again.status, 201, "{}", again.body);
    assert_eq!(again.body["replayed"], json!(true), "{}", again.body);
    let moves = api.get(format!("{url}/v1/admin/moves")).await;
    assert!(
        moves
            .body
            .to_string()
            .contains(&format!("\"bucket\":{bucket}")),
        "{}",
        moves.body
    );
    let hot = api
        .get(format!("{url}/v1/admin/buckets/hot?top=100"))
        .await
        .body;
    let source = (hot["groups"].as_array().unwrap().iter())
        .find(|g| g["shard"] == json!(format!("shard{from}")))
        .unwrap();
    // (The move's own seal and release count as the source's writes.)
    assert_eq!(source["buckets"], json!([]), "{source}");
    assert!(source["writes_per_s"].as_u64() < hottest_rate, "{source}");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_loses_a_replica_and_gains_one_over_http_under_load() {
    let (dir, cluster, api) = start().await;
    let url = cluster.url("madrid");
    api.put_issuer(&url, "MEM-1", "madrid", 1_000_000).await;
    let shard = cluster
        .meta
        .shard_of(&IssuerId::new("MEM-1").unwrap())
        .unwrap();
    let map = cluster.meta.map();
    let group = map.groups[&shard].clone();
    let home = |n: &NodeId| map.region_of(n) == Some(&group.home_region);
    let followers: Vec<NodeId> = (group.members.iter())
        .filter(|n| **n != group.leader && home(n))
        .cloned()
        .collect();
    let spare_remote = (map.nodes.iter())
        .find(|i| !home(&i.node) && !group.members.contains(&i.node))
        .unwrap()
        .node
        .clone();
    let members_url = format!("{url}/v1/admin/groups/{}/members", shard.0);
    let ask = |body: Value| {
        let (api, members_url) = (api.clone(), members_url.clone());
        async move { api.post(members_url, body).await }
    };

    // Bad asks change nothing.
    for (body, status, code) in [
        (json!({}), 422, "invalid_request"),
        (
            json!({"add": followers[0], "remove": followers[1]}),
            422,
            "invalid_request",
        ),
        (json!({"add": 7}), 422, "invalid_request"),
        (
            json!({"add": "madrid-1", "to": "x"}),
            422,
            "invalid_request",
        ),
        (json!({"add": "nobody-9"}), 404, "unknown_node"),
        (json!({"add": followers[0]}), 409, "members_refused"),
        (json!({"remove": group.leader}), 409, "members_refused"),
        (json!({"remove": spare_remote}), 409, "members_refused"),
    ] {
        let reply = ask(body.clone()).await;
        assert_eq!(
            (reply.status, reply.code()),
            (status, code),
            "{body}: {}",
            reply.body
        );
    }
    assert_eq!(cluster.meta.map().groups[&shard].members, group.members);

    let load = Load::start(
        &api,
        &[url.clone(), cluster.url("newyork")],
        "MEM-1",
        "mem",
        Duration::from_secs(10),
    );
    // A follower leaves; its data goes.
    let gone = &followers[0];
    let removed = ask(json!({"remove": gone})).await;
    assert_eq!(removed.status, 200, "{}", removed.body);
    assert_eq!(removed.body["removed"], json!(gone));
    assert_eq!(removed.body["members"].as_array().unwrap().len(), 3);
    let data = dir
        .path()
        .join("nodes")
        .join(gone.as_str())
        .join(format!("shard-{}", shard.0));
    let deadline = Instant::now() + Duration::from_secs(10);
    while data.exists() {
        assert!(
            Instant::now() < deadline,
            "{} is still there",
            data.display()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The leader and one follower remain at home: neither may leave.
    let refused = ask(json!({"remove": followers[1]})).await;
    assert_eq!(refused.code(), "members_refused", "{}", refused.body);

    // It comes back empty, catches up, and votes.
    let added = ask(json!({"add": gone})).await;
    assert_eq!(added.status, 200, "{}", added.body);
    assert_eq!(added.body["added"], json!(gone));
    assert_eq!(added.body["members"].as_array().unwrap().len(), 4);
    assert!(data.exists());
    // A second remote copy, then removed again.
    let added = ask(json!({"add": spare_remote})).await;
    assert_eq!(added.status, 200, "{}", added.body);
    assert_eq!(added.body["members"].as_array().unwrap().len(), 5);
    let removed = ask(json!({"remove": spare_remote})).await;
    assert_eq!(removed.status, 200, "{}", removed.body);
    let writes = load.finish().await;
    println!(
        "{shard}: membership changes under {} writes; longest single write {:?}",
        writes.len(),
        writes.iter().map(|w| w.answered - w.sent).max().unwrap()
    );
    assert!(
        writes.iter().all(|w| w.status == 201),
        "a write failed during the membership changes: {:?}",
        writes.iter().find(|w| w.status != 201)
    );

    // The replica that came back counts: with the other follower down,
    // a write commits on the leader and it.
    let view = api.get(format!("{url}/v1/admin/cluster")).await.body;
    let g = (view["groups"].as_array().unwrap().iter())
        .find(|g| g["shard"] == json!(shard.0))
        .unwrap()
        .clone();
    assert_eq!(g["members"].as_array().unwrap().len(), 4, "{g}");
    let crash = api
        .post(
            format!("{url}/v1/admin/faults"),
            json!({"kind": "crash", "node": followers[1]}),
        )
        .await;
    assert_eq!(crash.status, 200, "{}", crash.body);
    let reply = api.reserve(&url, "mem-after", "MEM-1", 1, "desk").await;
    assert_eq!(reply.status, 201, "{}", reply.body);
    let open = check_acknowledged(&api, &url, "MEM-1", &writes).await;
    assert_eq!(open, writes.len() + 1);
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drained_node_holds_no_replica_and_nothing_is_lost() {
    let (dir, cluster, api) = start().await;
    let url = cluster.url("madrid");
    let node = NodeId::new("madrid-1").unwrap();
    for (path, body, status, code) in [
        ("nobody-1", json!({}), 404, "unknown_node"),
        (
            "madrid-1",
            json!({"to": "madrid-2"}),
            422,
            "invalid_request",
        ),
    ] {
        let reply = api
            .post(format!("{url}/v1/admin/nodes/{path}/drain"), body)
            .await;
        assert_eq!(
            (reply.status, reply.code()),
            (status, code),
            "{}",
            reply.body
        );
    }
    api.put_issuer(&url, "DR-1", "madrid", 1_000_000).await;
    let held = cluster.meta.map().groups_of(&node).len();
    let led = (cluster.meta.map().groups.values())
        .filter(|g| g.leader == node)
        .count();
    let load = Load::start(
        &api,
        &[url.clone(), cluster.url("newyork")],
        "DR-1",
        "dr",
        Duration::from_secs(4),
    );
    // A drain answers when every step is done: longer than a write.
    let drained = api
        .post_within(
            format!("{url}/v1/admin/nodes/madrid-1/drain"),
            json!({}),
            Duration::from_secs(300),
        )
        .await;
    assert_eq!(drained.status, 200, "{}", drained.body);
    let steps = drained.body["steps"].as_array().unwrap();
    let count = |action: &str| steps.iter().filter(|s| s["action"] == action).count();
    assert_eq!(
        (count("transfer"), count("remove")),
        (led, held),
        "{}",
        drained.body
    );
    let writes = load.finish().await;
    assert!(
        writes.iter().all(|w| w.status == 201),
        "a write failed during the drain: {:?}",
        writes.iter().find(|w| w.status != 201)
    );
    println!(
        "drained {node} in {} ms ({} steps) under {} writes",
        drained.body["took_ms"],
        steps.len(),
        writes.len()
    );
    assert!(cluster.meta.map().groups_of(&node).is_empty());
    // Its replicas' data is gone.
    let data = dir.path().join("nodes").join(node.as_str());
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left: Vec<_> = std::fs::read_dir(&data)
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("shard-"))
            .map(|e| e.file_name())
            .collect();
        if left.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "left on {node}: {left:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Draining it again has nothing to do.
    let again = api
        .post(format!("{url}/v1/admin/nodes/madrid-1/drain"), json!({}))
        .await;
    assert_eq!(again.status, 200, "{}", again.body);
    assert_eq!(again.body["steps"], json!([]));
    check_acknowledged(&api, &url, "DR-1", &writes).await;
    cluster.shutdown().await;
}

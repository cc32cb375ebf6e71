//! Automatic leader failover in the embedded cluster: the leader of an
//! issuer's group stops under load; the control loop seals its generation
//! and, once the old lease is over, names the local replica with the
//! longest log; writes resume; the old
//! leader comes back as a follower; nothing acknowledged is lost and no
//! token has two reservations.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::Api;
use harbor::dev::{DevCluster, DevOptions};
use harbor_types::IssuerId;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_leader_fails_over_and_loses_no_acknowledged_write() {
    let dir = tempfile::tempdir().unwrap();
    let mut options = DevOptions::new(dir.path().to_path_buf());
    options.port = 0;
    let cluster = DevCluster::start(options).await.unwrap();
    let urls = [cluster.url("madrid"), cluster.url("newyork")];
    let api = Arc::new(Api::new());
    assert_eq!(
        api.put_issuer(&urls[0], "FO-1", "madrid", 1_000_000)
            .await
            .status,
        201
    );
    let shard = cluster
        .meta
        .shard_of(&IssuerId::new("FO-1").unwrap())
        .unwrap();
    let old_leader = cluster.meta.map().groups[&shard].leader.clone();
    let old_generation = cluster.meta.map().groups[&shard].generation;

    let start = Instant::now();
    // (token, sent at, answered at, status, reservation id)
    let log = Arc::new(Mutex::new(Vec::new()));
    let mut writers = Vec::new();
    for w in 0..4 {
        let (api, log, url) = (api.clone(), log.clone(), urls[w % 2].clone());
        writers.push(tokio::spawn(async move {
            let mut i = 0;
            while start.elapsed() < Duration::from_secs(5) {
                let token = format!("fo-{w}-{i}");
                i += 1;
                let sent = start.elapsed();
                let r = api.reserve(&url, &token, "FO-1", 1, "desk").await;
                let id = r.body["reservation_id"].as_str().map(String::from);
                log.lock()
                    .unwrap()
                    .push((token, sent, start.elapsed(), r.status, id));
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let stopped_at = start.elapsed();
    cluster.nodes.stop(&old_leader).await;
    for writer in writers {
        writer.await.unwrap();
    }

    let log = log.lock().unwrap().clone();
    let acked: Vec<_> = log.iter().filter(|e| e.3 == 201).collect();
    let first_after = acked
        .iter()
        .filter(|e| e.1 > stopped_at)
        .map(|e| e.2)
        .min()
        .expect("writes never resumed after the leader stopped");
    let resumed_after = first_after - stopped_at;
    println!(
        "leader {old_leader} of {shard} stopped at {stopped_at:?}; first write sent after it was acknowledged {resumed_after:?} later; {} acknowledged in all",
        acked.len()
    );
    // A liveness bound, not a benchmark: failover waits out the old lease
    // (2 s + 250 ms margin) plus a control round; the issue note has the
    // measurements.
    assert!(resumed_after < Duration::from_secs(10), "{resumed_after:?}");
    let map = cluster.meta.map();
    let group = &map.groups[&shard];
    assert_ne!(group.leader, old_leader, "the leader did not move");
    assert!(group.generation > old_generation);
    println!(
        "{shard}: {old_leader} at {old_generation} -> {} at {}",
        group.leader, group.generation
    );
    assert_eq!(
        map.region_of(&group.leader),
        map.region_of(&old_leader),
        "failover stays in the home region"
    );

    // The old leader comes back and catches up as a follower.
    cluster.nodes.start(&old_leader).await.unwrap();
    // The old leader comes back and catches up as a follower; every group
    // is healthy again.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let health = api.get(format!("{}/v1/health", urls[0])).await;
        if health.status == 200 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not healthy after the restart: {}",
            health.body
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Every acknowledged reservation is there under its token (asked through
    // the issuer's home-region gateway, many at a time).
    use futures::StreamExt;
    let lookups = futures::stream::iter(acked.iter().map(|(token, _, _, _, id)| {
        let (api, url) = (api.clone(), urls[0].clone());
        async move {
            (
                token.clone(),
                id.clone(),
                api.token(&url, token, "FO-1").await,
            )
        }
    }))
    .buffer_unordered(32)
    .collect::<Vec<_>>()
    .await;
    for (token, id, reply) in lookups {
        assert_eq!(reply.body["status"], "committed", "{token}: {}", reply.body);
        assert_eq!(
            reply.body["reservation_id"].as_str(),
            id.as_deref(),
            "{token}"
        );
    }
    let view = api.issuer(&urls[0], "FO-1").await.body;
    let open = api
        .get(format!("{}/v1/issuers/FO-1/open-reservations", urls[0]))
        .await
        .body;
    let list = open["reservations"].as_array().unwrap();
    assert_eq!(
        view["reserved"].as_u64().unwrap(),
        list.len() as u64,
        "{view}"
    );
    let mut tokens: Vec<&str> = list
        .iter()
        .map(|r| r["reservation_token"].as_str().unwrap())
        .collect();
    tokens.sort();
    let before = tokens.len();
    tokens.dedup();
    assert_eq!(before, tokens.len(), "a token has two reservations");
    assert!(list.len() >= acked.len());
    cluster.shutdown().await;
}

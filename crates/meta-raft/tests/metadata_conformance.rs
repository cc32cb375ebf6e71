//! One suite for every `Metadata`: a voter (`MetaNode`, what the control
//! loop runs on) and a gateway's remote copy (`RemoteMeta`) must keep the
//! same contract, or the gateway is tested against something it does not
//! run on. Each case takes two handles on one metadata plane: what one
//! commits, the other must see as the contract says.
//!
//! The contract: writes are committed before they return; an issuer's
//! entry never changes once placed, and one placed through any handle is
//! found at once through any other (`find`, linearizable on a miss); a
//! refused change changes nothing; `refresh` brings the local copy's map up
//! to what was committed before it was called.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use harbor_meta::{DirectoryError, MetaCommand, MetaError, Metadata, Topology};
use harbor_meta_raft::{MetaConfig, MetaNode, NodeId, RemoteMeta};
use harbor_types::{Generation, IssuerId, Region};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

async fn voters(dir: &Path) -> (Vec<Arc<MetaNode>>, Vec<JoinHandle<()>>, Vec<String>) {
    let mut listeners = Vec::new();
    let mut addrs = BTreeMap::new();
    for id in 1..=3u64 {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        addrs.insert(id, listener.local_addr().unwrap().to_string());
        listeners.push(listener);
    }
    let (mut nodes, mut servers) = (Vec::new(), Vec::new());
    for (id, listener) in (1..=3u64).zip(listeners) {
        let mut config = MetaConfig::new(id as NodeId, dir.join(format!("voter-{id}")));
        config.heartbeat_ms = 50;
        config.election_timeout_ms = (300, 600);
        let node = MetaNode::start(&config).await.unwrap();
        let app = node.router();
        servers.push(tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        }));
        nodes.push(node);
    }
    nodes[0].initialize(&addrs).await.unwrap();
    nodes[0]
        .write(MetaCommand::Bootstrap(Topology::dev()))
        .await
        .unwrap();
    (nodes, servers, addrs.into_values().collect())
}

/// The suite, on two handles; `tag` keeps each run's issuers apart.
async fn conformance(tag: &str, one: Arc<dyn Metadata>, other: Arc<dyn Metadata>) {
    let madrid = Region::new("madrid").unwrap();
    let newyork = Region::new("newyork").unwrap();

    // A bootstrapped map.
    one.refresh().await.unwrap();
    let map = one.map();
    assert!(!map.groups.is_empty(), "{tag}: no groups");
    assert!(map.regions().contains(&madrid), "{tag}");

    // Placing an issuer: created once, the same entry through any handle.
    let issuer = IssuerId::new(format!("{tag}-1")).unwrap();
    let (entry, created) = one.assign(&issuer, &madrid).await.unwrap().unwrap();
    assert!(created, "{tag}");
    assert_eq!(entry.home_region, madrid, "{tag}");
    assert_eq!(
        other.find(&issuer).await.unwrap(),
        Some(entry.clone()),
        "{tag}"
    );
    let (again, created) = other.assign(&issuer, &madrid).await.unwrap().unwrap();
    assert_eq!((again, created), (entry.clone(), false), "{tag}");

    // Refusals change nothing.
    let moved = other.assign(&issuer, &newyork).await.unwrap();
    assert!(
        matches!(moved, Err(DirectoryError::HomeRegionMismatch { .. })),
        "{tag}: {moved:?}"
    );
    let nowhere = Region::new("atlantis").unwrap();
    let fresh = IssuerId::new(format!("{tag}-2")).unwrap();
    let unknown = one.assign(&fresh, &nowhere).await.unwrap();
    assert!(
        matches!(unknown, Err(DirectoryError::UnknownRegion { .. })),
        "{tag}: {unknown:?}"
    );
    assert_eq!(other.find(&fresh).await.unwrap(), None, "{tag}");
    assert_eq!(one.find(&issuer).await.unwrap(), Some(entry), "{tag}");

    // A group's new generation: an older one is refused; the newer one is
    // in both copies' maps once they refresh.
    let group = map.groups.values().next().unwrap().clone();
    let newer = Generation(group.generation.0 + 1);
    let leader = group.members[1].clone();
    one.update_group(group.shard, &leader, newer, None)
        .await
        .unwrap();
    let older = other
        .update_group(group.shard, &group.leader, group.generation, None)
        .await;
    assert!(
        matches!(older, Err(MetaError::Refused(_))),
        "{tag}: {older:?}"
    );
    for handle in [&one, &other] {
        handle.refresh().await.unwrap();
        let now = &handle.map().groups[&group.shard];
        assert_eq!((&now.leader, now.generation), (&leader, newer), "{tag}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn voters_and_remote_copies_keep_one_contract() {
    let dir = tempfile::tempdir().unwrap();
    let (nodes, servers, addrs) = voters(dir.path()).await;
    let leader = nodes[0].leader().unwrap();
    let follower = nodes.iter().find(|n| n.id != leader).unwrap().clone();
    let leading = nodes.iter().find(|n| n.id == leader).unwrap().clone();
    conformance("VOTERS", leading, follower).await;

    let connect = || RemoteMeta::connect(addrs.clone(), Duration::from_secs(10));
    let (one, other): (Arc<dyn Metadata>, Arc<dyn Metadata>) =
        (connect().await.unwrap(), connect().await.unwrap());
    conformance("REMOTE", one, other).await;

    for node in nodes {
        node.shutdown().await;
    }
    for server in servers {
        server.abort();
    }
}

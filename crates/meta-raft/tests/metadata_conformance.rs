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

use std::sync::Arc;
use std::time::Duration;

use harbor_meta::{DirectoryError, MetaCommand, MetaError, Metadata, Topology};
use harbor_meta_raft::RemoteMeta;
use harbor_types::{Generation, IssuerId, Region};

mod common;
use common::three_voters;

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
    let (voters, addrs) = three_voters(dir.path()).await;
    voters[&1]
        .node
        .write(MetaCommand::Bootstrap(Topology::dev()))
        .await
        .unwrap();
    let leader = voters[&1].node.leader().unwrap();
    let follower = voters.keys().find(|id| **id != leader).unwrap();
    conformance(
        "VOTERS",
        voters[&leader].node.clone(),
        voters[follower].node.clone(),
    )
    .await;

    let addrs: Vec<String> = addrs.into_values().collect();
    let connect = || RemoteMeta::connect(addrs.clone(), Duration::from_secs(10));
    let (one, other): (Arc<dyn Metadata>, Arc<dyn Metadata>) =
        (connect().await.unwrap(), connect().await.unwrap());
    conformance("REMOTE", one, other).await;

    for (_, voter) in voters {
        voter.stop().await;
    }
}

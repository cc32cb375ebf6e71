//! Metadata voters on loopback HTTP: three voters agree on the map and the
//! directory, survive losing their leader, and recover everything when they
//! restart on their data directories (one voter and all three).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use harbor_meta::{MetaCommand, MetaReply, MetaState, Metadata, Topology};
use harbor_meta_raft::RemoteMeta;
use harbor_types::{Generation, IssuerId, Region, ShardId};
use tokio::net::TcpListener;

mod common;
use common::{three_voters, Voter};

async fn listen(addr: &str) -> TcpListener {
    // The port was just released by a stopped voter: retry briefly.
    for _ in 0..50 {
        if let Ok(listener) = TcpListener::bind(addr).await {
            return listener;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("cannot bind {addr}");
}

fn assign(issuer: &str) -> MetaCommand {
    MetaCommand::Assign {
        issuer_id: IssuerId::new(issuer).unwrap(),
        home_region: Region::new("madrid").unwrap(),
    }
}

fn has_issuers(n: usize) -> impl Fn(&MetaState) -> bool {
    move |s| s.directory.len() == n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_voters_agree_survive_their_leader_and_recover_after_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let (mut voters, addrs) = three_voters(dir.path()).await;
    let reply = voters[&2]
        .node
        .write(MetaCommand::Bootstrap(Topology::dev()))
        .await
        .unwrap();
    assert_eq!(reply, MetaReply::Map { map_version: 1 });
    for i in 0..20 {
        let via = 1 + (i % 3) as u64;
        let reply = voters[&via]
            .node
            .write(assign(&format!("ISS-{i}")))
            .await
            .unwrap();
        assert!(
            matches!(reply, MetaReply::Assigned(Ok((_, true)))),
            "{reply:?}"
        );
    }
    let leader_state = {
        let any = &voters[&1].node;
        any.wait_until(Duration::from_secs(5), has_issuers(20))
            .await
            .unwrap()
    };
    for voter in voters.values() {
        let state = voter
            .node
            .wait_until(Duration::from_secs(5), has_issuers(20))
            .await
            .expect("a voter did not catch up");
        assert_eq!(state, leader_state, "voters disagree");
    }

    // The leader dies; the other two elect one and go on.
    let leader = voters[&1].node.leader().expect("a leader");
    let addr = addrs[&leader].clone();
    voters.remove(&leader).unwrap().stop().await;
    let survivor = voters.keys().next().copied().unwrap();
    let update = MetaCommand::UpdateGroup {
        shard: ShardId(0),
        leader: leader_state.map.as_ref().unwrap().groups[&ShardId(0)].members[1].clone(),
        generation: Generation(5),
        ended_at: Some(harbor_types::LogIndex(7)),
    };
    let reply = voters[&survivor].node.write(update).await.unwrap();
    assert_eq!(reply, MetaReply::Map { map_version: 2 });
    voters[&survivor]
        .node
        .write(assign("AFTER-FAILOVER"))
        .await
        .unwrap();

    // It comes back on its directory and catches up.
    let back = Voter::start(leader, dir.path(), listen(&addr).await).await;
    let state = back
        .node
        .wait_until(Duration::from_secs(10), has_issuers(21))
        .await
        .expect("the restarted voter did not catch up");
    assert_eq!(
        state.map.as_ref().unwrap().groups[&ShardId(0)].generation,
        Generation(5)
    );
    voters.insert(leader, back);

    // Every voter restarts: the map, the generations and the directory
    // survive.
    let before = voters[&survivor].node.state();
    for (_, voter) in std::mem::take(&mut voters) {
        voter.stop().await;
    }
    for (id, addr) in &addrs {
        voters.insert(*id, Voter::start(*id, dir.path(), listen(addr).await).await);
    }
    for voter in voters.values() {
        let state = voter
            .node
            .wait_until(Duration::from_secs(10), has_issuers(21))
            .await
            .expect("a restarted voter lost the directory");
        assert_eq!(state, before);
    }
    // And they still take writes.
    voters[&1]
        .node
        .write(assign("AFTER-RESTART"))
        .await
        .unwrap();
    for (_, voter) in voters {
        voter.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_voter_recovers_its_state() {
    let dir = tempfile::tempdir().unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let voter = Voter::start(1, dir.path(), listener).await;
    voter
        .node
        .initialize(&BTreeMap::from([(1, addr.clone())]))
        .await
        .unwrap();
    voter
        .node
        .write(MetaCommand::Bootstrap(Topology::dev()))
        .await
        .unwrap();
    voter.node.write(MetaCommand::BeginEpoch).await.unwrap();
    voter.node.write(assign("ONE")).await.unwrap();
    let before = voter.node.state();
    voter.stop().await;
    let voter = Voter::start(1, dir.path(), listen(&addr).await).await;
    let state = voter
        .node
        .wait_until(Duration::from_secs(10), has_issuers(1))
        .await
        .expect("the voter lost its state");
    assert_eq!(state, before);
    // Initializing again is harmless.
    voter
        .node
        .initialize(&BTreeMap::from([(1, addr)]))
        .await
        .unwrap();
    voter.stop().await;
}

/// An issuer placed through one gateway's copy of the metadata is found at
/// once through another's, and through a follower voter: a directory miss
/// asks the Raft leader (read index), never a copy that may predate the
/// write. The other copy pulls just before each write, so a refresh that
/// reuses a recent pull (as the miss path once did) would answer "unknown".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_issuer_placed_through_one_copy_is_found_at_once_through_any_other() {
    let dir = tempfile::tempdir().unwrap();
    let (voters, addrs) = three_voters(dir.path()).await;
    voters[&1]
        .node
        .write(MetaCommand::Bootstrap(Topology::dev()))
        .await
        .unwrap();
    let voter_addrs: Vec<String> = addrs.values().cloned().collect();
    let connect = || RemoteMeta::connect(voter_addrs.clone(), Duration::from_secs(10));
    let writer: Arc<dyn Metadata> = connect().await.unwrap();
    let reader: Arc<dyn Metadata> = connect().await.unwrap();
    let madrid = Region::new("madrid").unwrap();
    for i in 0..20 {
        let issuer = IssuerId::new(format!("LIN-{i}")).unwrap();
        reader.refresh().await.unwrap();
        let (entry, created) = writer.assign(&issuer, &madrid).await.unwrap().unwrap();
        assert!(created);
        let found = reader.find(&issuer).await.unwrap();
        assert_eq!(
            found.as_ref(),
            Some(&entry),
            "{issuer} unknown right after its placement"
        );
        // A follower voter answers through its leader too.
        let leader = voters[&1].node.leader().unwrap();
        let follower = voters.keys().find(|id| **id != leader).unwrap();
        let follower: Arc<dyn Metadata> = voters[follower].node.clone();
        let next = IssuerId::new(format!("LIN-F-{i}")).unwrap();
        let (entry, _) = writer.assign(&next, &madrid).await.unwrap().unwrap();
        assert_eq!(follower.find(&next).await.unwrap(), Some(entry));
    }
    let never = IssuerId::new("NEVER-PLACED").unwrap();
    assert_eq!(reader.find(&never).await.unwrap(), None);
    for (_, voter) in voters {
        voter.stop().await;
    }
}

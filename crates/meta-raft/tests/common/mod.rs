//! Test helpers shared by the metadata plane's tests: voters on loopback.

#![allow(dead_code)] // each test file uses its own share

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use harbor_meta_raft::{MetaConfig, MetaNode, NodeId};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

pub struct Voter {
    pub node: Arc<MetaNode>,
    server: JoinHandle<()>,
}

impl Voter {
    pub async fn start(id: NodeId, dir: &Path, listener: TcpListener) -> Voter {
        let mut config = MetaConfig::new(id, dir.join(format!("voter-{id}")));
        // Short timeouts: loopback, and a test that waits for elections.
        config.heartbeat_ms = 50;
        config.election_timeout_ms = (300, 600);
        let node = MetaNode::start(&config).await.unwrap();
        let app = node.router();
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Voter { node, server }
    }

    /// As a crash looks from outside: Raft stops, the address goes dark.
    pub async fn stop(self) {
        self.node.shutdown().await;
        self.server.abort();
        let _ = self.server.await;
    }
}

/// Three voters on free loopback ports, initialized as one cluster; their
/// HTTP addresses by id.
pub async fn three_voters(dir: &Path) -> (BTreeMap<NodeId, Voter>, BTreeMap<NodeId, String>) {
    let mut listeners = Vec::new();
    let mut addrs = BTreeMap::new();
    for id in 1..=3u64 {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        addrs.insert(id, listener.local_addr().unwrap().to_string());
        listeners.push(listener);
    }
    let mut voters: BTreeMap<NodeId, Voter> = BTreeMap::new();
    for (id, listener) in (1..=3u64).zip(listeners) {
        voters.insert(id, Voter::start(id, dir, listener).await);
    }
    voters[&1].node.initialize(&addrs).await.unwrap();
    (voters, addrs)
}

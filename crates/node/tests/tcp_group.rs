//! One replica group over real TCP sockets on loopback: three nodes, each
//! with its own listener, and a client endpoint that writes through the
//! leader. Proves the TCP transport carries both replication and requests.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use harbor_node::{Node, NodeConfig, TcpTransport};
use harbor_replication::Member;
use harbor_reservation::{Command, Outcome};
use harbor_types::{Amount, Generation, IssuerId, NodeId, Region, ReservationToken, ShardId};
use harbor_wire::{Body, Envelope, ErrorCode, Query, Request, Response, Route};
use harbor_wire::{Control, Transport};
use tokio::net::TcpListener;

fn id(name: &str) -> NodeId {
    NodeId::new(name).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_replicates_and_answers_over_tcp() {
    let dir = tempfile::tempdir().unwrap();
    let names = ["a1", "a2", "b1", "client"];
    let mut listeners = Vec::new();
    let mut peers: HashMap<NodeId, SocketAddr> = HashMap::new();
    for name in names {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        peers.insert(id(name), listener.local_addr().unwrap());
        listeners.push(listener);
    }
    let members = vec![
        Member {
            node: id("a1"),
            local: true,
            voter: true,
        },
        Member {
            node: id("a2"),
            local: true,
            voter: true,
        },
        Member {
            node: id("b1"),
            local: false,
            voter: true,
        },
    ];
    let shard = ShardId(0);
    let mut nodes = Vec::new();
    let mut client = None;
    for (name, listener) in names.into_iter().zip(listeners) {
        if name == "client" {
            let (sink, rx) = harbor_node::inbox(1024);
            let transport = TcpTransport::start(id(name), listener, peers.clone(), sink);
            client = Some((transport, rx));
            continue;
        }
        let late = harbor_node::LateSink::new();
        let transport = TcpTransport::start(id(name), listener, peers.clone(), late.sink());
        let mut config = NodeConfig::new(dir.path().join(name));
        config.groups_are_new = true;
        let transport: Arc<dyn Transport> = transport;
        let region = Region::new(if name.starts_with('a') {
            "east"
        } else {
            "west"
        })
        .unwrap();
        let node = tokio::task::spawn_blocking({
            let members = members.clone();
            let plan = harbor_node::ReplicaPlan {
                shard,
                members,
                fence: Generation::ZERO,
                fence_is_led: false,
                members_epoch: 0,
            };
            move || Node::start(id(name), region, vec![plan], config, transport)
        })
        .await
        .unwrap()
        .unwrap();
        late.connect(node.sink());
        nodes.push(node);
    }
    for node in &nodes {
        let control = if node.id() == &id("a1") {
            Control::Lead(Generation(1))
        } else {
            Control::Follow(Generation(1), id("a1"))
        };
        node.control(shard, control);
    }
    let (client, mut inbox) = client.unwrap();
    let issuer = IssuerId::new("TCP-1").unwrap();
    let commands = vec![
        Command::UpsertIssuer {
            issuer_id: issuer.clone(),
            home_region: Region::new("east").unwrap(),
            limit: Amount(10),
        },
        Command::Reserve {
            token: ReservationToken::new("t1").unwrap(),
            issuer_id: issuer.clone(),
            amount: Amount(7),
            desk: "d".into(),
            trader: "t".into(),
            hold_ttl_ms: None,
        },
        Command::Reserve {
            token: ReservationToken::new("t2").unwrap(),
            issuer_id: issuer.clone(),
            amount: Amount(7),
            desk: "d".into(),
            trader: "t".into(),
            hold_ttl_ms: None,
        },
    ];
    let mut outcomes = Vec::new();
    for (n, command) in commands.into_iter().enumerate() {
        client.send(Envelope {
            from: id("client"),
            to: id("a1"),
            body: Body::Request {
                id: n as u64,
                request: Request::Write { shard, command },
                route: Some(Route::at(Generation(1))),
            },
        });
        let envelope = tokio::time::timeout(Duration::from_secs(10), inbox.recv())
            .await
            .expect("an answer over TCP")
            .unwrap();
        let Body::Response { id: got, response } = envelope.body else {
            panic!("expected a response");
        };
        assert_eq!(got, n as u64);
        let Response::Applied {
            outcome,
            commit_token,
            ..
        } = *response
        else {
            panic!("expected an applied write, got {response:?}");
        };
        assert_eq!(commit_token.generation, Generation(1));
        outcomes.push(outcome);
    }
    assert!(matches!(outcomes[0], Outcome::Issuer { created: true, .. }));
    assert!(matches!(outcomes[1], Outcome::Reservation { .. }));
    assert!(matches!(&outcomes[2], Outcome::Rejected(r) if r.code() == "insufficient_exposure"));

    // A sender whose map is older than the replica is told to refresh; one
    // whose map is newer finds the replica has not heard the news: neither
    // write is proposed.
    for (n, (route, code)) in [
        (Generation(0), ErrorCode::StaleRoute),
        (Generation(2), ErrorCode::NotLeader),
    ]
    .into_iter()
    .enumerate()
    {
        let request_id = 100 + n as u64;
        client.send(Envelope {
            from: id("client"),
            to: id("a1"),
            body: Body::Request {
                id: request_id,
                request: Request::Read {
                    shard,
                    query: Query::Issuer(issuer.clone()),
                },
                route: Some(Route::at(route)),
            },
        });
        let envelope = tokio::time::timeout(Duration::from_secs(10), inbox.recv())
            .await
            .expect("an answer over TCP")
            .unwrap();
        let Body::Response { id: got, response } = envelope.body else {
            panic!("expected a response");
        };
        assert_eq!(got, request_id);
        match *response {
            Response::Error(e) => assert_eq!(e.code(), code, "{e}"),
            other => panic!("route {route} was served: {other:?}"),
        }
    }

    for node in nodes {
        tokio::task::spawn_blocking(move || node.shutdown())
            .await
            .unwrap();
    }
}

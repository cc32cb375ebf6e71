//! One suite for every `Transport`: what `harbor dev` runs on (the
//! in-process network) must behave like what a deployment runs on (TCP), or
//! tests on the one prove nothing about the other. Each case runs against
//! both, on loopback only.
//!
//! The contract: sending never blocks; what arrives on one link arrives in
//! send order; an envelope is delivered whole or dropped (and counted),
//! never in part; dropping one (too large, no such endpoint, a full inbox)
//! never harms the link for the envelopes after it. Where the two differ by
//! design, the case says so: TCP drops frames over its limit, the
//! in-process network has no frame; only the in-process network pauses.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use harbor_node::{inbox, InProcNetwork, Inbox, TcpTransport};
use harbor_reservation::Command;
use harbor_types::{Amount, IssuerId, NodeId, Region, ReservationToken, ShardId};
use harbor_wire::{Body, Envelope, Request, Transport};

/// The frame limit the TCP case runs with (small, so "too large" is cheap).
const FRAME_BYTES_MAX: usize = 64 << 10;

fn id(name: &str) -> NodeId {
    NodeId::new(name).unwrap()
}

/// Endpoints `a` and `c` in region east, `b` in west; each has a transport
/// handle to send with, an inbox, and a count of what its transport dropped.
struct World {
    kind: &'static str,
    send: HashMap<NodeId, Arc<dyn Transport>>,
    inboxes: HashMap<NodeId, Inbox>,
    dropped: Box<dyn Fn() -> u64 + Send>,
    /// The in-process network, to pause endpoints.
    network: Option<InProcNetwork>,
}

const ENDPOINTS: [(&str, &str); 3] = [("a", "east"), ("b", "west"), ("c", "east")];

async fn in_process(inbox_capacity: usize) -> World {
    let network = InProcNetwork::new(tokio::runtime::Handle::current(), 5);
    let mut inboxes = HashMap::new();
    let mut send = HashMap::new();
    for (name, region) in ENDPOINTS {
        let (sink, rx) = inbox(inbox_capacity);
        network.attach(id(name), Region::new(region).unwrap(), sink);
        inboxes.insert(id(name), rx);
        send.insert(id(name), network.transport());
    }
    let counted = network.clone();
    World {
        kind: "in-process",
        send,
        inboxes,
        dropped: Box::new(move || counted.dropped()),
        network: Some(network),
    }
}

async fn tcp(inbox_capacity: usize) -> World {
    let mut listeners = Vec::new();
    let mut peers: HashMap<NodeId, SocketAddr> = HashMap::new();
    for (name, _) in ENDPOINTS {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        peers.insert(id(name), listener.local_addr().unwrap());
        listeners.push(listener);
    }
    let mut inboxes = HashMap::new();
    let mut send = HashMap::new();
    let mut transports = Vec::new();
    for ((name, _), listener) in ENDPOINTS.into_iter().zip(listeners) {
        let (sink, rx) = inbox(inbox_capacity);
        let transport = TcpTransport::start_with_frame_limit(
            id(name),
            listener,
            peers.clone(),
            sink,
            FRAME_BYTES_MAX,
        );
        inboxes.insert(id(name), rx);
        send.insert(id(name), transport.clone() as Arc<dyn Transport>);
        transports.push(transport);
    }
    World {
        kind: "tcp",
        send,
        inboxes,
        dropped: Box::new(move || transports.iter().map(|t| t.dropped()).sum()),
        network: None,
    }
}

/// A request envelope numbered `n`, about `padding` bytes larger than bare.
fn envelope(from: &str, to: &str, n: u64, padding: usize) -> Envelope {
    let command = Command::Reserve {
        token: ReservationToken::new(format!("t{n}")).unwrap(),
        issuer_id: IssuerId::new("ISS").unwrap(),
        amount: Amount(1),
        desk: "d".repeat(padding),
        trader: "t".into(),
        hold_ttl_ms: None,
    };
    Envelope {
        from: id(from),
        to: id(to),
        body: Body::Request {
            id: n,
            request: Request::Write {
                shard: ShardId(0),
                command,
            },
            route: None,
        },
    }
}

fn number(envelope: &Envelope) -> u64 {
    match envelope.body {
        Body::Request { id, .. } => id,
        _ => panic!("not a request: {envelope:?}"),
    }
}

impl World {
    fn send(&self, from: &str, to: &str, n: u64, padding: usize) {
        self.send[&id(from)].send(envelope(from, to, n, padding));
    }

    /// What `to` receives until nothing more arrives for a while.
    async fn drain(&mut self, to: &str) -> Vec<u64> {
        let rx = self.inboxes.get_mut(&id(to)).unwrap();
        let mut got = Vec::new();
        while let Ok(Some(envelope)) =
            tokio::time::timeout(Duration::from_millis(500), rx.recv()).await
        {
            got.push(number(&envelope));
        }
        got
    }
}

async fn both(inbox_capacity: usize) -> [World; 2] {
    [in_process(inbox_capacity).await, tcp(inbox_capacity).await]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_delivers_everything_in_send_order() {
    for mut w in both(10_000).await {
        for n in 0..2_000 {
            // Sizes vary, so frames and delay-line entries differ.
            w.send("a", "b", n, (n as usize * 37) % 3_000);
            w.send("a", "c", n, 10);
        }
        let to_b = w.drain("b").await;
        let to_c = w.drain("c").await;
        assert_eq!(to_b, (0..2_000).collect::<Vec<_>>(), "{}: a to b", w.kind);
        assert_eq!(to_c, (0..2_000).collect::<Vec<_>>(), "{}: a to c", w.kind);
        assert_eq!((w.dropped)(), 0, "{}", w.kind);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_envelope_arrives_whole_or_not_at_all_and_the_link_survives() {
    for mut w in both(1_000).await {
        w.send("a", "b", 1, 10);
        w.send("a", "b", 2, 2 * FRAME_BYTES_MAX);
        w.send("a", "b", 3, 10);
        let got = w.drain("b").await;
        match w.kind {
            // Over the frame limit: dropped, counted, and the connection
            // carries on.
            "tcp" => {
                assert_eq!(got, vec![1, 3]);
                assert_eq!((w.dropped)(), 1);
            }
            // No frames: delivered whole.
            _ => {
                assert_eq!(got, vec![1, 2, 3]);
                assert_eq!((w.dropped)(), 0);
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_destination_is_dropped_without_blocking() {
    for mut w in both(1_000).await {
        for n in 0..100 {
            w.send("a", "nowhere", n, 10);
        }
        w.send("a", "b", 7, 10);
        assert_eq!(w.drain("b").await, vec![7], "{}", w.kind);
        if w.kind == "in-process" {
            assert_eq!((w.dropped)(), 100);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_that_does_not_read_never_blocks_the_sender() {
    // The receiver's inbox holds 16: the rest is dropped, sending returns
    // at once, and what is delivered keeps its order.
    for mut w in both(16).await {
        for n in 0..5_000 {
            w.send("a", "b", n, 100);
        }
        let got = w.drain("b").await;
        assert!(
            !got.is_empty() && got.len() <= 5_000,
            "{}: {}",
            w.kind,
            got.len()
        );
        assert!(
            got.windows(2).all(|p| p[0] < p[1]),
            "{}: out of order",
            w.kind
        );
        assert_eq!(got[0], 0, "{}", w.kind);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_endpoint_gets_what_was_sent_to_it_in_order_when_resumed() {
    // Only the in-process network pauses (`harbor dev`'s pause fault): what
    // is sent to a paused endpoint waits, what it sends is lost.
    let mut w = in_process(1_000).await;
    let network = w.network.clone().unwrap();
    network.pause(&id("b"));
    for n in 0..50 {
        w.send("a", "b", n, 10);
    }
    w.send("b", "a", 99, 10);
    assert_eq!(w.drain("b").await, Vec::<u64>::new());
    network.resume(&id("b"));
    assert_eq!(w.drain("b").await, (0..50).collect::<Vec<_>>());
    assert_eq!(w.drain("a").await, Vec::<u64>::new());
}

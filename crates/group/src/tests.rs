//! The group core's rules, stepped by hand: a leader and one synchronous
//! follower, with the test playing disk and network.

use harbor_replication::{Config as CoreConfig, Member};
use harbor_reservation::Command;
use harbor_types::sim::Bugs;
use harbor_types::{Amount, Generation, IssuerId, LogIndex, NodeId, Now, Region, ShardId};
use harbor_wal::{HardState, Recovered as Found};
use harbor_wire::{
    Body, Control, Envelope, ErrorCode, ErrorKind, Freshness, Query, Request, Response,
};

use crate::{GroupCore, Input, Ready, Unsynced, Write};

const SHARD: ShardId = ShardId(7);

fn node(name: &str) -> NodeId {
    NodeId::new(name).unwrap()
}

fn settings() -> crate::Settings {
    crate::Settings {
        snapshot_interval_entries: 1_000,
        local_reads_waiting_max: 4,
        changes_retained_bytes: 1 << 20,
        changes_retained_ms: 60_000,
        resolved_tick_ms: 500,
        bugs: Bugs::none(),
    }
}

fn replica(me: &str) -> GroupCore {
    start(me, true, (Generation::ZERO, false))
}

/// A replica that finds its disk empty: of a new group, or one that lost
/// its state (then it starts at `fence`).
fn start(me: &str, groups_are_new: bool, fence: (Generation, bool)) -> GroupCore {
    let members = vec![
        Member {
            node: node("a"),
            local: true,
            voter: true,
        },
        Member {
            node: node("b"),
            local: true,
            voter: true,
        },
    ];
    let mut config = CoreConfig::new(SHARD, node(me));
    config.sync_acks = 1;
    GroupCore::recover(
        node(me),
        members,
        config,
        settings(),
        Found {
            snapshot: None,
            records: Vec::new(),
            hard_state: HardState {
                generation: Generation::ZERO,
                led: false,
                recovering: false,
            },
            torn_tail_bytes_cut: 0,
            zero_tail_bytes_cut: 0,
        },
        groups_are_new,
        fence,
        1,
        Now::both(1),
    )
    .unwrap()
}

fn upsert(issuer: &str) -> Request {
    Request::Write {
        shard: SHARD,
        command: Command::UpsertIssuer {
            issuer_id: IssuerId::new(issuer).unwrap(),
            home_region: Region::new("madrid").unwrap(),
            limit: Amount(100),
        },
    }
}

fn request(id: u64, request: Request, route: Option<Generation>) -> Input {
    Input::Request {
        from: node("client"),
        id,
        request,
        route: route.map(harbor_wire::Route::at),
    }
}

/// A leader `a` and a follower `b` of generation 1, the leader's first
/// entry committed and applied on both.
struct Pair {
    a: GroupCore,
    b: GroupCore,
    now: u64,
    /// Replies to the client, in the order they left.
    replies: Vec<(u64, Response)>,
}

impl Pair {
    fn new() -> Pair {
        let mut pair = Pair {
            a: replica("a"),
            b: replica("b"),
            now: 1,
            replies: Vec::new(),
        };
        let g = Generation(1);
        pair.step_a(Input::Control(Control::Lead(g)));
        pair.step_b(Input::Control(Control::Follow(g, node("a"))));
        pair.settle();
        assert!(pair.a.is_ready());
        pair
    }

    fn now(&self) -> Now {
        Now::both(self.now)
    }

    fn step_a(&mut self, input: Input) {
        self.a.step(self.now(), input);
    }

    fn step_b(&mut self, input: Input) {
        self.b.step(self.now(), input);
    }

    /// One round on one replica: its writes, a sync when `sync` (else the
    /// token is kept for later), its replies collected. Returns the peer
    /// messages it sent and the token of a sync still to come.
    fn round(&mut self, on_a: bool, sync: bool) -> (Vec<Envelope>, Option<Unsynced>) {
        let now = self.now();
        let core = if on_a { &mut self.a } else { &mut self.b };
        let Ready {
            writes: _,
            sync: mut token,
            messages,
        } = core.ready();
        if sync {
            if let Some(token) = token.take() {
                core.step(now, Input::Synced(token));
            }
        }
        let mut peers = Vec::new();
        for envelope in messages {
            match envelope.body {
                Body::Response { id, response } => self.replies.push((id, *response)),
                _ => peers.push(envelope),
            }
        }
        (peers, token)
    }

    fn deliver(&mut self, envelopes: Vec<Envelope>) {
        for envelope in envelopes {
            let Body::Replication(message) = envelope.body else {
                panic!("unexpected {envelope:?}");
            };
            let input = Input::Peer {
                from: envelope.from,
                message,
            };
            if envelope.to == node("a") {
                self.step_a(input);
            } else {
                self.step_b(input);
            }
        }
    }

    /// Rounds on both, every disk syncing, until nothing moves.
    fn settle(&mut self) {
        for _ in 0..20 {
            let (from_a, _) = self.round(true, true);
            let (from_b, _) = self.round(false, true);
            if from_a.is_empty() && from_b.is_empty() {
                // One more pass for what the last syncs led to.
                let ((x, _), (y, _)) = (self.round(true, true), self.round(false, true));
                if x.is_empty() && y.is_empty() {
                    return;
                }
                self.deliver(x);
                self.deliver(y);
                continue;
            }
            self.deliver(from_a);
            self.deliver(from_b);
        }
        panic!("the pair did not settle");
    }

    fn error_of(&self, id: u64) -> ErrorCode {
        match self.replies.iter().find(|(i, _)| *i == id) {
            Some((_, Response::Error(e))) => e.code(),
            other => panic!("request {id}: expected an error, got {other:?}"),
        }
    }
}

#[test]
fn a_write_is_answered_only_once_durable_on_the_leader_and_a_follower() {
    let mut p = Pair::new();
    p.step_a(request(1, upsert("acme"), Some(Generation(1))));
    // The leader writes the entry and streams it; its fsync is still
    // running: no answer.
    let (to_b, a_sync) = p.round(true, false);
    assert!(a_sync.is_some() && p.replies.is_empty());
    p.deliver(to_b);
    // The follower holds it but has not synced: no acknowledgement.
    let (acks, b_sync) = p.round(false, false);
    assert!(b_sync.is_some());
    assert!(acks.is_empty(), "a follower acknowledged before its sync");
    // The leader's copy is durable now; still no answer on it alone.
    p.step_a(Input::Synced(a_sync.unwrap()));
    let _ = p.round(true, true);
    assert!(p.replies.is_empty(), "answered on the leader's copy alone");
    // The follower's fsync returns; its ack commits the entry.
    p.step_b(Input::Synced(b_sync.unwrap()));
    p.settle();
    match &p.replies[..] {
        [(1, Response::Applied { commit_token, .. })] => {
            assert!(commit_token.index > LogIndex(1))
        }
        other => panic!("expected the write's answer, got {other:?}"),
    }
}

#[test]
fn a_sync_only_counts_with_the_token_of_the_ready_it_synced() {
    let mut a = replica("a");
    a.step(Now::both(1), Input::Control(Control::Lead(Generation(1))));
    let ready = a.ready();
    assert!(ready
        .writes
        .iter()
        .any(|w| matches!(w, Write::Append { .. })));
    let token = ready.sync.expect("an append asks for a sync");
    assert_eq!(a.replica().durable_index(), LogIndex::ZERO);
    a.step(Now::both(2), Input::Synced(token));
    assert_eq!(a.replica().durable_index(), LogIndex(1));
}

#[test]
fn requests_routed_at_another_generation_are_refused_with_the_right_hint() {
    let mut p = Pair::new();
    p.step_a(request(1, upsert("acme"), Some(Generation(0))));
    p.step_a(request(2, upsert("acme"), Some(Generation(2))));
    p.step_b(request(3, upsert("acme"), Some(Generation(1))));
    p.settle();
    assert_eq!(p.error_of(1), ErrorCode::StaleRoute);
    assert_eq!(p.error_of(2), ErrorCode::NotLeader);
    assert_eq!(p.error_of(3), ErrorCode::NotLeader);
    let hint = |id| match p.replies.iter().find(|(i, _)| *i == id) {
        Some((_, Response::Error(e))) => match &e.kind {
            ErrorKind::NotLeader { hint } | ErrorKind::StaleRoute { hint } => hint.clone(),
            other => panic!("no hint in {other:?}"),
        },
        _ => unreachable!(),
    };
    // The follower knows the leader; the leader, behind the sender's map,
    // knows nothing newer.
    assert_eq!(hint(3), Some(node("a")));
    assert_eq!(hint(2), None);
}

#[test]
fn a_new_leader_serves_no_strong_read_before_its_first_entry_applies() {
    let mut a = replica("a");
    a.step(Now::both(1), Input::Control(Control::Lead(Generation(1))));
    let read = Request::Read {
        shard: SHARD,
        query: Query::Issuer(IssuerId::new("acme").unwrap()),
    };
    a.step(Now::both(1), request(1, read, Some(Generation(1))));
    let replies = a.ready().messages;
    let Some(Body::Response { response, .. }) = replies
        .into_iter()
        .map(|e| e.body)
        .find(|b| matches!(b, Body::Response { .. }))
    else {
        panic!("no answer");
    };
    let Response::Error(e) = *response else {
        panic!("served a strong read from a new leader: {response:?}");
    };
    assert_eq!(e.code(), ErrorCode::Unavailable);
}

#[test]
fn a_local_read_waits_for_its_entry_then_is_refused_when_its_wait_runs_out() {
    let mut p = Pair::new();
    let read = Request::LocalRead {
        shard: SHARD,
        query: Query::Issuer(IssuerId::new("acme").unwrap()),
        need: Freshness {
            applied_at_least: Some(LogIndex(50)),
            max_staleness_ms: None,
            wait_ms: 100,
        },
    };
    p.step_b(request(1, read, None));
    p.settle();
    assert!(
        p.replies.is_empty(),
        "answered before the entry or the wait"
    );
    assert!(p.b.wants_ticks(), "a waiting read needs the clock");
    p.now += 100;
    p.step_b(Input::Tick);
    p.settle();
    assert_eq!(p.error_of(1), ErrorCode::ReplicaBehind);
}

#[test]
fn a_storage_failure_answers_every_waiting_write_in_doubt_and_stops_the_replica() {
    let mut p = Pair::new();
    p.step_a(request(1, upsert("acme"), Some(Generation(1))));
    let _ = p.round(true, false);
    p.step_a(Input::StorageFailed("disk gone".into()));
    let _ = p.round(true, true);
    match &p.replies[..] {
        [(1, Response::Error(e))] => {
            assert_eq!(e.code(), ErrorCode::ReplicaFailed);
            assert!(e.outcome_unknown, "the write may have committed");
        }
        other => panic!("expected an in-doubt refusal, got {other:?}"),
    }
    assert_eq!(p.a.failure(), Some("disk gone"));
    p.step_a(request(2, upsert("acme"), Some(Generation(1))));
    let _ = p.round(true, true);
    assert_eq!(p.error_of(2), ErrorCode::ReplicaFailed);
    assert!(p.a.ready().is_empty(), "a stopped replica writes nothing");
}

#[test]
fn control_orders_older_than_the_replica_change_nothing() {
    let mut p = Pair::new();
    // Late orders of generation 1's own making, and older ones: a deposed
    // control loop's, or a slow connection's.
    p.step_a(Input::Control(Control::Seal(Generation(1))));
    p.step_a(Input::Control(Control::Lead(Generation(1))));
    p.step_a(Input::Control(Control::LeadNewGroup(Generation(1))));
    p.step_b(Input::Control(Control::Follow(Generation(0), node("b"))));
    p.step_b(Input::Control(Control::Follow(Generation(1), node("b"))));
    p.step_b(Input::Control(Control::Lead(Generation(1))));
    p.settle();
    assert!(p.a.is_ready(), "the leader kept its barrier and its role");
    assert_eq!(p.b.replica().leader(), Some(&node("a")));
    // It still takes writes.
    p.step_a(request(1, upsert("acme"), Some(Generation(1))));
    p.settle();
    assert!(matches!(p.replies[..], [(1, Response::Applied { .. })]));
}

#[test]
fn a_replica_that_lost_its_disk_starts_at_the_fence_and_refuses_older_orders() {
    let mut b = start("b", false, (Generation(3), false));
    // It says so durably before anything else, generation included.
    let ready = b.ready();
    assert!(
        matches!(&ready.writes[..], [Write::HardState(h)] if h.recovering && h.generation == Generation(3)),
        "{:?}",
        ready.writes
    );
    assert!(b.replica().is_recovering());
    assert_eq!(b.replica().generation(), Generation(3));
    // A deposed control loop's order, or one queued across the restart,
    // names an older generation and its deposed leader: refused.
    b.step(
        Now::both(2),
        Input::Control(Control::Follow(Generation(2), node("a"))),
    );
    b.step(
        Now::both(2),
        Input::Control(Control::LeadNewGroup(Generation(1))),
    );
    assert_eq!(b.replica().leader(), None);
    assert_eq!(b.replica().generation(), Generation(3));
    // The current one is taken.
    b.step(
        Now::both(3),
        Input::Control(Control::Follow(Generation(3), node("a"))),
    );
    assert_eq!(b.replica().leader(), Some(&node("a")));
    assert!(
        b.replica().is_recovering(),
        "it catches up before it counts"
    );
}

#[test]
fn a_replica_that_lost_its_disk_never_leads_a_generation_that_has_a_leader() {
    // Generation 3 has a published leader, perhaps this replica in its
    // earlier life: its followers hold entries of 3 this one lost.
    let mut b = start("b", false, (Generation(3), true));
    let _ = b.ready();
    b.step(
        Now::both(2),
        Input::Control(Control::LeadNewGroup(Generation(3))),
    );
    b.step(Now::both(2), Input::Control(Control::Lead(Generation(3))));
    assert!(!b.replica().is_leader());
    assert!(
        b.replica().is_recovering(),
        "it did not start its group anew"
    );
    // A sealed generation without a leader yet may still start a group
    // whose every copy is gone.
    let mut c = start("b", false, (Generation(4), false));
    let _ = c.ready();
    c.step(
        Now::both(2),
        Input::Control(Control::LeadNewGroup(Generation(4))),
    );
    assert!(c.replica().is_leader());
}

#[test]
fn a_sealed_bucket_is_refused_as_moved_before_and_after_ordering() {
    use harbor_types::BucketId;
    let mut p = Pair::new();
    let bucket = BucketId(9);
    let place = |limit| Request::Write {
        shard: SHARD,
        command: Command::PlaceIssuer {
            issuer_id: IssuerId::new("acme").unwrap(),
            home_region: Region::new("madrid").unwrap(),
            limit: Amount(limit),
            bucket,
        },
    };
    let routed = |generation| {
        Some(harbor_wire::Route {
            generation: Generation(generation),
            map_version: 3,
            bucket: Some(bucket),
        })
    };
    let seal = Request::Write {
        shard: SHARD,
        command: Command::SealBucket {
            bucket,
            issuers: vec![],
        },
    };
    let send = |p: &mut Pair, id, request, route| {
        p.step_a(Input::Request {
            from: node("client"),
            id,
            request,
            route,
        })
    };
    send(&mut p, 1, place(10), routed(1));
    // Ordered before the seal is applied: refused by the entry's apply.
    send(
        &mut p,
        2,
        seal,
        routed(1).map(|r| harbor_wire::Route { bucket: None, ..r }),
    );
    send(&mut p, 3, place(20), routed(1));
    p.settle();
    assert!(matches!(
        p.replies.iter().find(|(i, _)| *i == 1),
        Some((_, Response::Applied { .. }))
    ));
    assert_eq!(p.error_of(3), ErrorCode::Moved);
    // Once applied, a routed write is refused before it costs an entry.
    let applied = p.a.applied_index();
    send(&mut p, 4, place(30), routed(1));
    p.settle();
    assert_eq!(p.error_of(4), ErrorCode::Moved);
    assert_eq!(p.a.applied_index(), applied);
    match p.replies.iter().find(|(i, _)| *i == 4) {
        Some((_, Response::Error(e))) => {
            assert_eq!(e.kind, ErrorKind::Moved { bucket });
            assert!(!e.outcome_unknown);
        }
        other => panic!("{other:?}"),
    }
}

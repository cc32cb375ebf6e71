//! Property tests over random logs: a few issuers with small limits, tokens
//! from a small pool (so replays and payload mismatches are common), and
//! confirms, releases, expiries and resolves while time moves on.

use crate::tests::{issuer, position, token};
use crate::*;
use harbor_types::{
    Amount, BucketId, CommitToken, Generation, IssuerId, Region, ReservationId, ReservationToken,
    Timestamp,
};
use proptest::prelude::*;
use std::collections::BTreeMap;

/// `i0`..`i2` are registered at the start of every log; `i3` never is, so
/// unknown-issuer paths run too.
fn issuer_ids() -> impl Strategy<Value = IssuerId> {
    prop_oneof![9 => 0..3u8, 1 => Just(3u8)].prop_map(|n| issuer(&format!("i{n}")))
}

fn upsert(n: u8, limit: u64, moved: bool) -> Command {
    let home = if (n == 2) != moved { "nyc" } else { "madrid" };
    Command::UpsertIssuer {
        issuer_id: issuer(&format!("i{n}")),
        home_region: Region::new(home).unwrap(),
        limit: Amount(limit),
    }
}

/// `i0` and `i2` are in bucket 0, `i1` in bucket 1.
fn bucket_of(n: u8) -> BucketId {
    BucketId(u32::from(n % 2))
}

fn command() -> impl Strategy<Value = Command> {
    let upserts = (0..3u8, 0..60u64, prop::bool::weighted(0.2))
        .prop_map(|(n, limit, moved)| upsert(n, limit, moved));
    let place = (0..3u8, 0..60u64).prop_map(|(n, limit)| match upsert(n, limit, false) {
        Command::UpsertIssuer {
            issuer_id,
            home_region,
            limit,
        } => Command::PlaceIssuer {
            issuer_id,
            home_region,
            limit,
            bucket: bucket_of(n),
        },
        _ => unreachable!(),
    });
    // A seal names the bucket's issuers (or not: those placed know it).
    let seal = (0..2u32, any::<bool>()).prop_map(|(b, named)| Command::SealBucket {
        bucket: BucketId(b),
        issuers: (0..3u8)
            .filter(|n| named && bucket_of(*n) == BucketId(b))
            .map(|n| issuer(&format!("i{n}")))
            .collect(),
    });
    let ttl = prop_oneof![
        6 => Just(None),
        1 => Just(Some(0)),
        12 => (1..300u64).prop_map(Some),
    ];
    let desk = prop_oneof![8 => Just("rates"), 3 => Just("fx"), 1 => Just("")];
    let reserve = (
        0..6u8,
        issuer_ids(),
        0..25u64,
        desk,
        prop::sample::select(vec!["ana", "bo"]),
        ttl,
    )
        .prop_map(
            |(t, issuer_id, amount, desk, trader, hold_ttl_ms)| Command::Reserve {
                token: token(&format!("t{t}")),
                issuer_id,
                amount: Amount(amount),
                desk: desk.into(),
                trader: trader.into(),
                hold_ttl_ms,
            },
        );
    let reservation_id =
        || (issuer_ids(), 1..5u64).prop_map(|(issuer_id, seq)| ReservationId::new(issuer_id, seq));
    prop_oneof![
        2 => upserts,
        8 => reserve,
        5 => reservation_id().prop_map(|reservation_id| Command::Confirm { reservation_id }),
        2 => reservation_id().prop_map(|reservation_id| Command::Release { reservation_id }),
        2 => Just(Command::ExpireHolds),
        1 => (issuer_ids(), 0..6u8).prop_map(|(issuer_id, t)| Command::ResolveToken {
            issuer_id,
            token: token(&format!("t{t}")),
        }),
        1 => Just(Command::Noop),
        1 => place,
        1 => seal,
        1 => (0..2u32).prop_map(|b| Command::UnsealBucket { bucket: BucketId(b) }),
    ]
}

/// One log entry, and which earlier entry it re-sends if it is a replay.
#[derive(Clone, Debug)]
struct Entry {
    ctx: ApplyContext,
    cmd: Command,
    replay_of: Option<usize>,
}

/// A random log: `i0`..`i2` registered, then steps. A step is a fresh
/// command or (selector `Some`) a re-send of an earlier `Reserve`; before each
/// step time advances by 0..40 ms, and now and then a new generation starts.
fn log() -> impl Strategy<Value = Vec<Entry>> {
    let step = (
        command(),
        prop::option::weighted(0.15, any::<prop::sample::Index>()),
        0..40u64,
        prop::bool::weighted(0.05),
    );
    let limits = prop::collection::vec(5..60u64, 3);
    (limits, prop::collection::vec(step, 1..120)).prop_map(|(limits, steps)| {
        let registrations = (0u8..)
            .zip(limits)
            .map(|(n, limit)| (upsert(n, limit, false), None, 0, false));
        let mut entries: Vec<Entry> = Vec::new();
        let (mut generation, mut now_ms) = (1, 1_000);
        for (index, step) in (1u64..).zip(registrations.chain(steps)) {
            let (cmd, replay, advance_ms, new_generation) = step;
            now_ms += advance_ms;
            generation += u64::from(new_generation);
            let reserves: Vec<usize> = (0..entries.len())
                .filter(|&k| matches!(entries[k].cmd, Command::Reserve { .. }))
                .collect();
            let replay_of = replay
                .filter(|_| !reserves.is_empty())
                .map(|i| reserves[i.index(reserves.len())]);
            let cmd = replay_of.map_or(cmd, |k| entries[k].cmd.clone());
            let ctx = ApplyContext {
                position: CommitToken {
                    generation: Generation(generation),
                    ..position(index)
                },
                at: Timestamp::from_wall_ms(now_ms),
            };
            entries.push(Entry {
                ctx,
                cmd,
                replay_of,
            });
        }
        entries
    })
}

/// Apply every entry of `log`, checking invariants after each entry.
fn run(machine: &mut StateMachine, log: &[Entry]) -> Vec<Applied> {
    log.iter()
        .map(|entry| {
            let applied = machine.apply(&entry.ctx, &entry.cmd);
            machine.check_invariants();
            applied
        })
        .collect()
}

/// Replaying a reserve changes nothing and returns the original outcome.
fn check_replay(before: &StateMachine, after: &StateMachine, original: &Applied, replay: &Applied) {
    if let Outcome::Rejected(Rejection::UnknownIssuer { .. } | Rejection::Moved { .. }) =
        original.outcome
    {
        return; // the issuer may have been registered since: a fresh request
    }
    let mut unchanged = after.clone();
    unchanged.applied = before.applied;
    unchanged.applied_at = before.applied_at;
    assert_eq!(
        unchanged.snapshot(),
        before.snapshot(),
        "replay changed state"
    );
    assert_eq!(replay.events, [], "replay emitted events");
    match (&original.outcome, &replay.outcome) {
        (
            Outcome::Reservation {
                reservation: first, ..
            },
            Outcome::Reservation {
                reservation: now,
                replayed: true,
            },
        ) => {
            assert_eq!(first.reservation_id, now.reservation_id);
            assert_eq!(Some(now), after.reservation(&now.reservation_id).as_ref());
        }
        // Its bucket was sealed since: refused whole, as checked above.
        (_, Outcome::Rejected(Rejection::Moved { .. })) => {}
        (Outcome::Rejected(first), Outcome::Rejected(now)) => assert_eq!(first, now),
        (first, now) => panic!("original {first:?}, replay {now:?}"),
    }
}

proptest! {
    /// Properties 1, 2 and 4: invariants after every apply (reserved within
    /// limit and equal to the open amounts), replays change nothing, and
    /// tokens and reservations map one to one.
    #[test]
    fn random_logs_keep_every_invariant(log in log()) {
        let mut machine = StateMachine::new();
        let mut outcomes: Vec<Applied> = Vec::new();
        let mut owners: BTreeMap<(IssuerId, ReservationToken), ReservationId> = BTreeMap::new();
        for entry in &log {
            let before = machine.clone();
            let applied = machine.apply(&entry.ctx, &entry.cmd);
            machine.check_invariants();
            if let Some(k) = entry.replay_of {
                check_replay(&before, &machine, &outcomes[k], &applied);
            }
            // Nothing of a sealed bucket changes, and what is refused as
            // moved changes nothing.
            for event in &applied.events {
                let Some(issuer) = event.issuer() else { continue };
                let sealed = before
                    .bucket_of(issuer)
                    .is_some_and(|b| before.bucket(b).sealed_at.is_some());
                prop_assert!(!sealed, "{:?} changed {} of a sealed bucket", entry.cmd, issuer);
            }
            if let Outcome::Rejected(Rejection::Moved { .. }) = applied.outcome {
                let mut unchanged = machine.clone();
                unchanged.applied = before.applied;
                unchanged.applied_at = before.applied_at;
                prop_assert_eq!(unchanged.snapshot(), before.snapshot());
            }
            for event in &applied.events {
                if let Event::ReservationCreated { reservation: r, .. } = event {
                    let key = (r.issuer_id.clone(), r.reservation_token.clone());
                    let previous = owners.insert(key, r.reservation_id.clone());
                    prop_assert_eq!(previous, None, "token {} committed twice", r.reservation_token);
                }
            }
            outcomes.push(applied);
        }
        for ((issuer_id, tok), id) in &owners {
            let outcome = machine.token(issuer_id, tok).map(|view| view.outcome);
            let is_owner = matches!(
                outcome,
                Some(TokenOutcome::Committed { ref reservation_id, .. }) if reservation_id == id
            );
            prop_assert!(is_owner, "token {} -> {:?}, created {}", tok, outcome, id);
            prop_assert_eq!(&machine.reservation(id).unwrap().reservation_token, tok);
        }
        for issuer_id in machine.issuers() {
            let view = machine.issuer(issuer_id).unwrap();
            let open = machine.open_reservations(issuer_id).unwrap();
            let sum: u64 = open.iter().map(|r| r.amount.0).sum();
            prop_assert!(view.reserved <= view.limit);
            prop_assert_eq!(view.reserved.0, sum);
            prop_assert_eq!(view.reservations_open, open.len() as u64);
        }
    }

    /// Property 3: the same log gives the same outcomes, events and snapshot
    /// bytes on every replica, and a snapshot taken anywhere then restored
    /// continues exactly as if it had never been taken.
    #[test]
    fn replicas_and_restored_snapshots_agree(log in log(), cut in any::<prop::sample::Index>()) {
        let mut first = StateMachine::new();
        let mut second = StateMachine::new();
        let outcomes = run(&mut first, &log);
        prop_assert_eq!(&outcomes, &run(&mut second, &log));
        prop_assert_eq!(first.snapshot(), second.snapshot());

        let cut = cut.index(log.len() + 1);
        let mut head = StateMachine::new();
        run(&mut head, &log[..cut]);
        let mut restored = StateMachine::restore(&head.snapshot()).unwrap();
        prop_assert_eq!(&restored, &head);
        prop_assert_eq!(restored.next_hold_expiry_ms(), head.next_hold_expiry_ms());
        let tail = run(&mut restored, &log[cut..]);
        prop_assert_eq!(&tail[..], &outcomes[cut..]);
        prop_assert_eq!(restored.snapshot(), first.snapshot());
    }

    /// Snapshot bytes come from disk: damaged ones give an error or a
    /// consistent machine, never a panic.
    #[test]
    fn damaged_snapshots_never_panic(
        log in log(),
        flips in prop::collection::vec((any::<prop::sample::Index>(), 1..=255u8), 1..4),
        keep in any::<prop::sample::Index>(),
    ) {
        let mut machine = StateMachine::new();
        run(&mut machine, &log);
        let mut bytes = machine.snapshot();
        for (at, mask) in flips {
            let at = at.index(bytes.len());
            bytes[at] ^= mask;
        }
        bytes.truncate(keep.index(bytes.len()) + 1);
        if let Ok(restored) = StateMachine::restore(&bytes) {
            restored.check_invariants();
        }
    }
}

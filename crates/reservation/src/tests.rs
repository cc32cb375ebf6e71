//! Unit tests: one per rule of the state machine.

use crate::*;
use harbor_types::{
    Amount, CommitToken, Generation, IssuerId, LogIndex, Region, ReservationId, ReservationToken,
    ShardId, Timestamp, AMOUNT_MAX,
};

pub(crate) fn position(index: u64) -> CommitToken {
    CommitToken {
        shard: ShardId(1),
        generation: Generation(1),
        index: LogIndex(index),
    }
}

pub(crate) fn issuer(id: &str) -> IssuerId {
    IssuerId::new(id).unwrap()
}

pub(crate) fn token(id: &str) -> ReservationToken {
    ReservationToken::new(id).unwrap()
}

fn upsert(id: &str, region: &str, limit: u64) -> Command {
    Command::UpsertIssuer {
        issuer_id: issuer(id),
        home_region: Region::new(region).unwrap(),
        limit: Amount(limit),
    }
}

fn reserve(tok: &str, id: &str, amount: u64, hold_ttl_ms: Option<u64>) -> Command {
    Command::Reserve {
        token: token(tok),
        issuer_id: issuer(id),
        amount: Amount(amount),
        desk: "rates".into(),
        trader: "ana".into(),
        hold_ttl_ms,
    }
}

fn rid(text: &str) -> ReservationId {
    ReservationId::parse(text).unwrap()
}

/// A machine plus the log position and entry time of the next entry.
struct Log {
    sm: StateMachine,
    index: u64,
    now_ms: u64,
    shard: ShardId,
}

impl Log {
    /// A log with issuer `A` (limit 100, madrid) registered at t = 1000 ms.
    fn with_issuer() -> Log {
        let mut log = Log {
            sm: StateMachine::new(),
            index: 0,
            now_ms: 1_000,
            shard: ShardId(1),
        };
        log.apply(upsert("A", "madrid", 100));
        log
    }

    fn apply(&mut self, cmd: Command) -> Applied {
        self.index += 1;
        let ctx = ApplyContext {
            position: CommitToken {
                shard: self.shard,
                ..position(self.index)
            },
            at: Timestamp::from_wall_ms(self.now_ms),
        };
        let applied = self.sm.apply(&ctx, &cmd);
        self.sm.check_invariants();
        assert_eq!(self.sm.applied(), Some(ctx.position));
        applied
    }

    fn reserved(&self) -> u64 {
        self.sm.issuer(&issuer("A")).unwrap().reserved.0
    }
}

fn rejected(applied: &Applied) -> &Rejection {
    match &applied.outcome {
        Outcome::Rejected(rejection) => rejection,
        other => panic!("expected a rejection, got {other:?}"),
    }
}

fn reservation(applied: &Applied) -> (&ReservationView, bool) {
    match &applied.outcome {
        Outcome::Reservation {
            reservation,
            replayed,
        } => (reservation, *replayed),
        other => panic!("expected a reservation, got {other:?}"),
    }
}

fn event_names(applied: &Applied) -> Vec<&'static str> {
    let name = |e: &Event| match e {
        Event::IssuerRegistered { .. } => "issuer_registered",
        Event::LimitChanged { .. } => "limit_changed",
        Event::ReservationCreated { .. } => "reservation_created",
        Event::ReservationRejected { .. } => "reservation_rejected",
        Event::ReservationConfirmed { .. } => "reservation_confirmed",
        Event::ReservationReleased { .. } => "reservation_released",
        Event::ReservationExpired { .. } => "reservation_expired",
        Event::TokenAbandoned { .. } => "token_abandoned",
        Event::BucketAcquired { .. } => "bucket_acquired",
        Event::BucketReleased { .. } => "bucket_released",
    };
    applied.events.iter().map(name).collect()
}

#[test]
fn upsert_creates_an_issuer_then_changes_its_limit() {
    let mut log = Log::with_issuer();
    let view = log.sm.issuer(&issuer("A")).unwrap();
    assert_eq!(
        (view.limit, view.reserved, view.remaining),
        (Amount(100), Amount(0), Amount(100))
    );
    assert_eq!(view.updated, Some(position(1)));

    let applied = log.apply(upsert("A", "madrid", 150));
    assert_eq!(event_names(&applied), ["limit_changed"]);
    let Outcome::Issuer {
        issuer: view,
        created,
        changed,
    } = applied.outcome
    else {
        panic!("{:?}", applied.outcome)
    };
    assert_eq!((created, changed, view.limit), (false, true, Amount(150)));

    let applied = log.apply(upsert("A", "madrid", 150));
    assert!(applied.events.is_empty());
    assert!(matches!(
        applied.outcome,
        Outcome::Issuer {
            created: false,
            changed: false,
            ..
        }
    ));
    assert_eq!(log.sm.issuers().collect::<Vec<_>>(), [&issuer("A")]);
}

#[test]
fn upsert_refuses_another_region_a_limit_below_reserved_and_a_huge_limit() {
    let mut log = Log::with_issuer();
    log.apply(reserve("t1", "A", 60, None));
    let mut before = log.sm.clone();
    let cases = [
        (upsert("A", "nyc", 100), "home_region_mismatch"),
        (upsert("A", "madrid", 59), "limit_below_reserved"),
        (upsert("A", "madrid", AMOUNT_MAX + 1), "invalid_amount"),
    ];
    for (cmd, code) in cases {
        let applied = log.apply(cmd);
        assert_eq!(rejected(&applied).code(), code);
        assert!(applied.events.is_empty());
    }
    before.applied = log.sm.applied();
    assert_eq!(before, log.sm, "rejections changed state");
    // Lowering the limit to exactly `reserved` is allowed.
    assert!(matches!(
        log.apply(upsert("A", "madrid", 60)).outcome,
        Outcome::Issuer { .. }
    ));
}

#[test]
fn reserve_with_ttl_holds_and_counts_exposure() {
    let mut log = Log::with_issuer();
    let applied = log.apply(reserve("t1", "A", 30, Some(500)));
    assert_eq!(event_names(&applied), ["reservation_created"]);
    let (view, replayed) = reservation(&applied);
    assert!(!replayed);
    assert_eq!(view.reservation_id.to_string(), "A:r1");
    assert_eq!(
        (view.status, view.expires_at_ms),
        (Status::Held, Some(1_500))
    );
    assert_eq!((view.created, view.updated), (position(2), position(2)));
    assert_eq!(log.reserved(), 30);
    assert_eq!(log.sm.next_hold_expiry_ms(), Some(1_500));
    let token_view = log.sm.token(&issuer("A"), &token("t1")).unwrap();
    assert_eq!(
        token_view.outcome,
        TokenOutcome::Committed {
            reservation_id: rid("A:r1"),
            commit_token: position(2)
        }
    );
    let second = log.apply(reserve("t2", "A", 5, Some(100)));
    assert_eq!(reservation(&second).0.reservation_id.to_string(), "A:r2");
    assert_eq!(log.sm.next_hold_expiry_ms(), Some(1_100));
}

#[test]
fn reserve_without_ttl_is_confirmed_at_once() {
    let mut log = Log::with_issuer();
    let applied = log.apply(reserve("t1", "A", 100, None));
    let (view, _) = reservation(&applied);
    assert_eq!((view.status, view.expires_at_ms), (Status::Confirmed, None));
    assert_eq!(log.reserved(), 100);
    assert_eq!(log.sm.next_hold_expiry_ms(), None);
    assert_eq!(log.sm.open_reservations(&issuer("A")).unwrap().len(), 1);
}

#[test]
fn reserve_over_remaining_is_rejected_and_the_rejection_is_the_token_outcome() {
    let mut log = Log::with_issuer();
    log.apply(reserve("t1", "A", 70, None));
    let applied = log.apply(reserve("t2", "A", 31, None));
    let rejection = rejected(&applied).clone();
    assert_eq!(
        rejection,
        Rejection::InsufficientExposure {
            issuer_id: issuer("A"),
            requested: Amount(31),
            remaining: Amount(30)
        }
    );
    assert!(rejection.is_token_outcome());
    assert_eq!(event_names(&applied), ["reservation_rejected"]);
    assert_eq!(log.reserved(), 70);
    let outcome = log.sm.token(&issuer("A"), &token("t2")).unwrap().outcome;
    assert_eq!(
        outcome,
        TokenOutcome::Rejected {
            code: "insufficient_exposure".into(),
            commit_token: position(3)
        }
    );

    // Headroom frees up, yet the token stays rejected: it was decided once.
    log.apply(Command::Release {
        reservation_id: rid("A:r1"),
    });
    let replay = log.apply(reserve("t2", "A", 31, None));
    assert_eq!(rejected(&replay), &rejection);
    assert!(replay.events.is_empty());
    assert_eq!(log.reserved(), 0);
}

#[test]
fn reserve_replay_returns_the_original_reservation_and_changes_nothing() {
    let mut log = Log::with_issuer();
    let first = log.apply(reserve("t1", "A", 10, Some(500)));
    log.apply(Command::Confirm {
        reservation_id: rid("A:r1"),
    });
    let mut before = log.sm.clone();
    let replay = log.apply(reserve("t1", "A", 10, Some(500)));
    let (view, replayed) = reservation(&replay);
    assert!(replayed);
    assert_eq!(view.reservation_id, reservation(&first).0.reservation_id);
    assert_eq!(
        view.status,
        Status::Confirmed,
        "a replay shows the current view"
    );
    assert!(replay.events.is_empty());
    before.applied = log.sm.applied;
    assert_eq!(before.snapshot(), log.sm.snapshot());
}

#[test]
fn reserve_with_a_used_token_and_another_payload_is_a_mismatch() {
    let mut log = Log::with_issuer();
    log.apply(reserve("t1", "A", 10, Some(500)));
    log.apply(reserve("t2", "A", 1_000, None)); // rejected
    let different = [
        reserve("t1", "A", 11, Some(500)),
        reserve("t1", "A", 10, Some(501)),
        reserve("t1", "A", 10, None),
        Command::Reserve {
            token: token("t1"),
            issuer_id: issuer("A"),
            amount: Amount(10),
            desk: "fx".into(),
            trader: "ana".into(),
            hold_ttl_ms: Some(500),
        },
        reserve("t2", "A", 999, None),
    ];
    for cmd in different {
        let applied = log.apply(cmd);
        assert_eq!(rejected(&applied).code(), "token_payload_mismatch");
        assert!(!rejected(&applied).is_token_outcome());
        assert!(applied.events.is_empty());
    }
    assert_eq!(log.reserved(), 10);
    assert!(matches!(
        log.sm.token(&issuer("A"), &token("t2")).unwrap().outcome,
        TokenOutcome::Rejected { .. }
    ));
}

#[test]
fn tokens_are_scoped_per_issuer() {
    let mut log = Log::with_issuer();
    log.apply(upsert("B", "nyc", 5));
    let a = log.apply(reserve("same", "A", 10, None));
    let b = log.apply(reserve("same", "B", 5, None));
    assert_eq!(reservation(&a).0.reservation_id.to_string(), "A:r1");
    assert_eq!(reservation(&b).0.reservation_id.to_string(), "B:r1");
    assert!(!reservation(&b).1);
}

#[test]
fn reserve_for_an_unknown_issuer_records_nothing() {
    let mut log = Log::with_issuer();
    let applied = log.apply(reserve("t1", "Z", 10, None));
    assert_eq!(
        rejected(&applied),
        &Rejection::UnknownIssuer {
            issuer_id: issuer("Z")
        }
    );
    assert_eq!(log.sm.token(&issuer("Z"), &token("t1")), None);
    assert_eq!(log.sm.open_reservations(&issuer("Z")), None);
}

#[test]
fn reserve_validates_every_field_before_anything_else() {
    let mut log = Log::with_issuer();
    let with = |amount: u64, desk: &str, trader: &str, ttl: Option<u64>| Command::Reserve {
        token: token("t1"),
        issuer_id: issuer("Z"), // unknown: validation must answer first
        amount: Amount(amount),
        desk: desk.into(),
        trader: trader.into(),
        hold_ttl_ms: ttl,
    };
    let long = "x".repeat(FIELD_LEN_MAX + 1);
    let cases = [
        (with(0, "d", "t", None), "invalid_amount"),
        (with(AMOUNT_MAX + 1, "d", "t", None), "invalid_amount"),
        (with(1, "", "t", None), "invalid_field"),
        (with(1, &long, "t", None), "invalid_field"),
        (with(1, "d", "", None), "invalid_field"),
        (with(1, "d", "a\nb", None), "invalid_field"),
        (with(1, "d", "t", Some(0)), "invalid_field"),
        (
            with(1, "d", "t", Some(HOLD_TTL_MS_MAX + 1)),
            "invalid_field",
        ),
        (
            with(
                1,
                &"x".repeat(FIELD_LEN_MAX),
                "Zoë Ñ",
                Some(HOLD_TTL_MS_MAX),
            ),
            "unknown_issuer",
        ),
    ];
    for (cmd, code) in cases {
        let applied = log.apply(cmd.clone());
        assert_eq!(rejected(&applied).code(), code, "{cmd:?}");
        assert!(applied.events.is_empty());
    }
}

#[test]
fn confirm_turns_a_live_hold_into_a_confirmed_reservation_once() {
    let mut log = Log::with_issuer();
    log.apply(reserve("t1", "A", 10, Some(500)));
    log.now_ms = 1_499;
    let applied = log.apply(Command::Confirm {
        reservation_id: rid("A:r1"),
    });
    assert_eq!(event_names(&applied), ["reservation_confirmed"]);
    let (view, replayed) = reservation(&applied);
    assert_eq!(
        (view.status, view.expires_at_ms, replayed),
        (Status::Confirmed, None, false)
    );
    assert_eq!(log.sm.next_hold_expiry_ms(), None);
    assert_eq!(log.reserved(), 10);

    log.now_ms = 9_000;
    let again = log.apply(Command::Confirm {
        reservation_id: rid("A:r1"),
    });
    assert!(again.events.is_empty());
    assert_eq!(reservation(&again).0.status, Status::Confirmed);
    assert!(reservation(&again).1);
    assert!(log.apply(Command::ExpireHolds).events.is_empty());
}

#[test]
fn confirm_at_or_after_expiry_expires_the_hold_and_says_so() {
    let mut log = Log::with_issuer();
    log.apply(reserve("t1", "A", 10, Some(500)));
    log.now_ms = 1_500;
    let applied = log.apply(Command::Confirm {
        reservation_id: rid("A:r1"),
    });
    assert_eq!(
        rejected(&applied),
        &Rejection::HoldExpired {
            reservation_id: rid("A:r1"),
            expires_at_ms: 1_500
        }
    );
    assert_eq!(event_names(&applied), ["reservation_expired"]);
    assert_eq!(
        log.sm.reservation(&rid("A:r1")).unwrap().status,
        Status::Expired
    );
    assert_eq!((log.reserved(), log.sm.next_hold_expiry_ms()), (0, None));

    let again = log.apply(Command::Confirm {
        reservation_id: rid("A:r1"),
    });
    assert_eq!(
        rejected(&again),
        &Rejection::InvalidTransition {
            reservation_id: rid("A:r1"),
            from: Status::Expired,
            action: "confirm".to_string()
        }
    );
}

#[test]
fn confirm_or_release_of_closed_or_unknown_reservations_is_refused() {
    let mut log = Log::with_issuer();
    log.apply(reserve("t1", "A", 10, Some(500)));
    log.apply(Command::Release {
        reservation_id: rid("A:r1"),
    });
    let applied = log.apply(Command::Confirm {
        reservation_id: rid("A:r1"),
    });
    assert_eq!(rejected(&applied).code(), "invalid_transition");
    for id in ["A:r2", "Z:r1"] {
        for cmd in [
            Command::Confirm {
                reservation_id: rid(id),
            },
            Command::Release {
                reservation_id: rid(id),
            },
        ] {
            let applied = log.apply(cmd);
            assert_eq!(
                rejected(&applied),
                &Rejection::UnknownReservation {
                    reservation_id: rid(id)
                }
            );
        }
    }
}

#[test]
fn release_frees_held_and_confirmed_amounts_and_repeats_idempotently() {
    let mut log = Log::with_issuer();
    log.apply(reserve("t1", "A", 10, Some(500)));
    log.apply(reserve("t2", "A", 20, None));
    assert_eq!(log.reserved(), 30);
    for (id, left) in [("A:r1", 20), ("A:r2", 0)] {
        let applied = log.apply(Command::Release {
            reservation_id: rid(id),
        });
        assert_eq!(event_names(&applied), ["reservation_released"]);
        assert_eq!(reservation(&applied).0.status, Status::Released);
        assert_eq!(log.reserved(), left);
    }
    assert_eq!(log.sm.next_hold_expiry_ms(), None);
    assert_eq!(log.sm.open_reservations(&issuer("A")).unwrap(), []);
    let again = log.apply(Command::Release {
        reservation_id: rid("A:r1"),
    });
    assert!(again.events.is_empty());
    assert!(reservation(&again).1);
}

#[test]
fn release_of_an_expired_hold_is_an_invalid_transition() {
    let mut log = Log::with_issuer();
    log.apply(reserve("t1", "A", 10, Some(500)));
    log.now_ms = 2_000;
    log.apply(Command::ExpireHolds);
    let applied = log.apply(Command::Release {
        reservation_id: rid("A:r1"),
    });
    assert_eq!(
        rejected(&applied),
        &Rejection::InvalidTransition {
            reservation_id: rid("A:r1"),
            from: Status::Expired,
            action: "release".to_string()
        }
    );
}

#[test]
fn expire_holds_expires_exactly_the_due_holds() {
    let mut log = Log::with_issuer();
    log.apply(reserve("t1", "A", 1, Some(300))); // due 1300
    log.apply(reserve("t2", "A", 2, Some(100))); // due 1100
    log.apply(reserve("t3", "A", 4, Some(200))); // due 1200
    log.apply(reserve("t4", "A", 8, None));
    assert_eq!(log.sm.next_hold_expiry_ms(), Some(1_100));
    log.now_ms = 1_200;
    let applied = log.apply(Command::ExpireHolds);
    assert_eq!(applied.outcome, Outcome::Expired { count: 2 });
    let expired: Vec<String> = applied
        .events
        .iter()
        .map(|e| match e {
            Event::ReservationExpired { reservation, .. } => reservation.reservation_id.to_string(),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(expired, ["A:r2", "A:r3"], "expired in expiry order");
    assert_eq!(log.reserved(), 9);
    assert_eq!(log.sm.next_hold_expiry_ms(), Some(1_300));
    let open: Vec<String> = log
        .sm
        .open_reservations(&issuer("A"))
        .unwrap()
        .iter()
        .map(|r| r.reservation_id.to_string())
        .collect();
    assert_eq!(open, ["A:r1", "A:r4"]);
    assert_eq!(log.sm.issuer(&issuer("A")).unwrap().reservations_open, 2);
    assert_eq!(
        log.apply(Command::ExpireHolds).outcome,
        Outcome::Expired { count: 0 }
    );
}

#[test]
fn resolving_an_absent_token_abandons_it_for_good() {
    let mut log = Log::with_issuer();
    let applied = log.apply(Command::ResolveToken {
        issuer_id: issuer("A"),
        token: token("t1"),
    });
    assert_eq!(event_names(&applied), ["token_abandoned"]);
    let abandoned = TokenOutcome::Abandoned {
        commit_token: position(2),
    };
    assert!(matches!(&applied.outcome, Outcome::Token(view) if view.outcome == abandoned));

    let late = log.apply(reserve("t1", "A", 10, None));
    assert_eq!(
        rejected(&late),
        &Rejection::TokenAbandoned { token: token("t1") }
    );
    assert_eq!(log.reserved(), 0);
    let again = log.apply(Command::ResolveToken {
        issuer_id: issuer("A"),
        token: token("t1"),
    });
    assert!(again.events.is_empty());
    assert!(matches!(&again.outcome, Outcome::Token(view) if view.outcome == abandoned));
}

#[test]
fn resolving_a_decided_token_returns_its_outcome_unchanged() {
    let mut log = Log::with_issuer();
    log.apply(reserve("t1", "A", 10, None));
    let applied = log.apply(Command::ResolveToken {
        issuer_id: issuer("A"),
        token: token("t1"),
    });
    assert!(applied.events.is_empty());
    let committed = TokenOutcome::Committed {
        reservation_id: rid("A:r1"),
        commit_token: position(2),
    };
    assert!(matches!(&applied.outcome, Outcome::Token(view) if view.outcome == committed));
    let unknown = log.apply(Command::ResolveToken {
        issuer_id: issuer("Z"),
        token: token("t1"),
    });
    assert_eq!(rejected(&unknown).code(), "unknown_issuer");
}

#[test]
fn noop_only_advances_the_position() {
    let mut log = Log::with_issuer();
    let applied = log.apply(Command::Noop);
    assert_eq!((applied.outcome, applied.events), (Outcome::Noop, vec![]));
    assert_eq!(log.sm.applied(), Some(position(2)));
}

#[test]
#[should_panic(expected = "positions must strictly increase")]
fn applying_an_old_position_is_a_bug() {
    let mut log = Log::with_issuer();
    log.index = 0;
    log.apply(Command::Noop);
}

#[test]
#[should_panic(expected = "reserved 11 but held + confirmed sum to 10")]
fn check_invariants_catches_a_broken_reserved_total() {
    let mut log = Log::with_issuer();
    log.apply(reserve("t1", "A", 10, None));
    log.sm.issuers.get_mut(&issuer("A")).unwrap().reserved = Amount(11);
    log.sm.check_invariants();
}

#[test]
#[should_panic(expected = "committed as r2")]
fn check_invariants_catches_a_token_pointing_elsewhere() {
    let mut log = Log::with_issuer();
    log.apply(reserve("t1", "A", 10, None));
    log.apply(reserve("t2", "A", 10, None));
    let a = log.sm.issuers.get_mut(&issuer("A")).unwrap();
    a.reservations.get_mut(&2).unwrap().token = token("t1");
    log.sm.check_invariants();
}

#[test]
fn customer_ids_are_kept_replayed_and_survive_a_snapshot() {
    let mut log = Log::with_issuer();
    let for_customer = |token: &str, amount: u64, customer: &str| Command::ReserveForCustomer {
        token: ReservationToken::new(token).unwrap(),
        issuer_id: issuer("A"),
        amount: Amount(amount),
        desk: "d".into(),
        trader: "t".into(),
        hold_ttl_ms: None,
        customer_id: customer.into(),
    };
    let made = log.apply(for_customer("t1", 10, "cust-9"));
    let Outcome::Reservation { reservation, .. } = &made.outcome else {
        panic!("{made:?}")
    };
    assert_eq!(reservation.customer_id.as_deref(), Some("cust-9"));
    // The customer is part of the token's payload.
    let other = log.apply(for_customer("t1", 10, "cust-8"));
    assert!(
        matches!(
            other.outcome,
            Outcome::Rejected(Rejection::TokenPayloadMismatch { .. })
        ),
        "{other:?}"
    );
    let refused = log.apply(for_customer("t2", 1_000, "cust-7"));
    assert!(matches!(refused.outcome, Outcome::Rejected(_)));
    let empty = log.apply(for_customer("t3", 1, ""));
    assert!(
        matches!(
            empty.outcome,
            Outcome::Rejected(Rejection::InvalidField { .. })
        ),
        "{empty:?}"
    );
    let restored = StateMachine::restore(&log.sm.snapshot()).unwrap();
    assert_eq!(restored, log.sm);
    let replay = {
        let mut log = Log {
            sm: restored,
            ..log
        };
        log.apply(for_customer("t2", 1_000, "cust-6")).outcome
    };
    assert!(
        matches!(
            replay,
            Outcome::Rejected(Rejection::TokenPayloadMismatch { .. })
        ),
        "the rejected token kept its customer: {replay:?}"
    );
}

#[test]
fn snapshot_round_trips_and_corrupt_snapshots_are_errors() {
    let mut log = Log::with_issuer();
    log.apply(reserve("t1", "A", 10, Some(500)));
    log.apply(reserve("t2", "A", 1_000, None));
    let bytes = log.sm.snapshot();
    let restored = StateMachine::restore(&bytes).unwrap();
    assert_eq!(restored, log.sm, "indexes rebuilt too");
    assert_eq!(restored.next_hold_expiry_ms(), Some(1_500));
    assert!(restored.applied_at().is_some());
    assert_eq!(restored.applied_at(), log.sm.applied_at());
    // Formats 3 (no buckets), 2 (no customer ids) and 1 (the state
    // alone) still read.
    let nothing = postcard::to_stdvec(&(Vec::<()>::new(), Vec::<()>::new()))
        .unwrap()
        .len();
    let no_buckets = nothing + 1; // three empty lists
    let mut format_3 = bytes[..bytes.len() - no_buckets].to_vec();
    format_3[0] = 3;
    assert_eq!(StateMachine::restore(&format_3).unwrap(), log.sm);
    let mut format_2 = format_3[..format_3.len() - nothing].to_vec();
    format_2[0] = 2;
    assert_eq!(StateMachine::restore(&format_2).unwrap(), log.sm);
    let at_len = postcard::to_stdvec(&log.sm.applied_at()).unwrap().len();
    let mut format_1 = format_2[..format_2.len() - at_len].to_vec();
    format_1[0] = 1;
    let old = StateMachine::restore(&format_1).unwrap();
    assert_eq!((old.applied(), old.applied_at()), (log.sm.applied(), None));

    let mut other_format = bytes.clone();
    other_format[0] = SNAPSHOT_FORMAT + 1;
    let mut trailing = bytes.clone();
    trailing.push(0);
    let mut over_limit = log.sm.clone();
    over_limit.issuers.get_mut(&issuer("A")).unwrap().reserved = Amount(101);
    let cases: [(&[u8], &str); 5] = [
        (&[], "empty"),
        (&other_format, "format"),
        (&bytes[..bytes.len() / 2], "decode"),
        (&trailing, "after its end"),
        (&over_limit.snapshot(), "over limit"),
    ];
    for (bytes, expected) in cases {
        let err = StateMachine::restore(bytes).unwrap_err().to_string();
        assert!(err.contains(expected), "{err:?} lacks {expected:?}");
    }
}

#[test]
fn rejection_codes_are_stable() {
    let id = rid("A:r1");
    let cases = [
        (
            Rejection::TokenAbandoned { token: token("t") },
            "token_abandoned",
        ),
        (
            Rejection::HomeRegionMismatch {
                issuer_id: issuer("A"),
                home_region: Region::new("x").unwrap(),
            },
            "home_region_mismatch",
        ),
        (
            Rejection::LimitBelowReserved {
                issuer_id: issuer("A"),
                limit: Amount(1),
                reserved: Amount(2),
            },
            "limit_below_reserved",
        ),
        (
            Rejection::HoldExpired {
                reservation_id: id.clone(),
                expires_at_ms: 5,
            },
            "hold_expired",
        ),
        (
            Rejection::InvalidTransition {
                reservation_id: id,
                from: Status::Released,
                action: "confirm".to_string(),
            },
            "invalid_transition",
        ),
    ];
    for (rejection, code) in cases {
        assert_eq!(rejection.code(), code);
        assert!(!rejection.is_token_outcome());
    }
    let err = Rejection::InvalidTransition {
        reservation_id: rid("A:r1"),
        from: Status::Released,
        action: "confirm".to_string(),
    };
    assert_eq!(
        err.to_string(),
        "cannot confirm reservation A:r1: it is released"
    );
}

#[test]
fn commands_round_trip_through_postcard() {
    let cmd = reserve("t1", "A", 10, Some(500));
    let bytes = postcard::to_stdvec(&cmd).unwrap();
    assert_eq!(postcard::from_bytes::<Command>(&bytes).unwrap(), cmd);
}

#[test]
fn a_batch_applies_each_command_on_its_own_in_order() {
    let mut log = Log::with_issuer();
    let applied = log.apply(Command::Batch(vec![
        reserve("b1", "A", 60, None),
        // Over the limit after b1: refused, and the batch goes on.
        reserve("b2", "A", 50, None),
        reserve("b3", "A", 40, None),
        // The same token again in the same batch: the first outcome.
        reserve("b1", "A", 60, None),
        reserve("b4", "NOPE", 1, None),
        Command::Noop,
    ]));
    let Outcome::Batch(outcomes) = applied.outcome else {
        panic!("{:?}", applied.outcome)
    };
    assert_eq!(outcomes.len(), 6);
    assert!(matches!(
        &outcomes[0],
        Outcome::Reservation {
            replayed: false,
            ..
        }
    ));
    assert!(matches!(
        &outcomes[1],
        Outcome::Rejected(Rejection::InsufficientExposure { .. })
    ));
    assert!(matches!(
        &outcomes[2],
        Outcome::Reservation {
            replayed: false,
            ..
        }
    ));
    assert!(matches!(
        &outcomes[3],
        Outcome::Reservation { replayed: true, .. }
    ));
    assert!(matches!(
        &outcomes[4],
        Outcome::Rejected(Rejection::UnknownIssuer { .. })
    ));
    assert!(matches!(
        &outcomes[5],
        Outcome::Rejected(Rejection::InvalidField { .. })
    ));
    assert_eq!(log.reserved(), 100);
    // Every change of the entry is at its one position.
    assert!(applied.events.iter().all(|e| e.position() == position(2)));
    // The rejected token's outcome is durable, as outside a batch.
    let view = log.sm.token(&issuer("A"), &token("b2")).unwrap();
    assert!(matches!(view.outcome, TokenOutcome::Rejected { .. }));
}

#[test]
fn the_largest_client_command_fits_command_bytes_max() {
    // Every text field at its longest, every number at its largest: the
    // bound `harbor_types::limits` sizes a batch entry with.
    let issuer_id = IssuerId::new("I".repeat(harbor_types::ID_LEN_MAX)).unwrap();
    let token = ReservationToken::new("t".repeat(harbor_types::TOKEN_LEN_MAX)).unwrap();
    let field = "f".repeat(FIELD_LEN_MAX);
    let commands = [
        Command::Reserve {
            token: token.clone(),
            issuer_id: issuer_id.clone(),
            amount: Amount(AMOUNT_MAX),
            desk: field.clone(),
            trader: field,
            hold_ttl_ms: Some(HOLD_TTL_MS_MAX),
        },
        Command::Confirm {
            reservation_id: ReservationId::new(issuer_id.clone(), u64::MAX),
        },
        Command::ResolveToken { issuer_id, token },
    ];
    for command in commands {
        let bytes = postcard::to_allocvec(&command).unwrap().len();
        assert!(
            bytes <= harbor_types::limits::COMMAND_BYTES_MAX,
            "{bytes} bytes: {command:?}"
        );
    }
}

fn place(id: &str, limit: u64, bucket: u32) -> Command {
    Command::PlaceIssuer {
        issuer_id: issuer(id),
        home_region: Region::new("madrid").unwrap(),
        limit: Amount(limit),
        bucket: harbor_types::BucketId(bucket),
    }
}

#[test]
fn a_sealed_bucket_refuses_every_write_until_unsealed_and_its_holds_wait() {
    use harbor_types::BucketId;
    let mut log = Log::with_issuer(); // A: registered before buckets were recorded
    log.apply(place("B", 100, 7));
    log.apply(reserve("b1", "B", 10, Some(200)));
    log.apply(reserve("a1", "A", 10, Some(200)));
    // The seal names A (its group does not know A's bucket yet).
    let sealed = log.apply(Command::SealBucket {
        bucket: BucketId(7),
        issuers: vec![issuer("A")],
    });
    let Outcome::Bucket {
        record:
            BucketRecord {
                sealed_at: Some(at),
                opened_at: None,
                ..
            },
        issuers: 2,
        ..
    } = sealed.outcome
    else {
        panic!("{:?}", sealed.outcome)
    };
    assert_eq!(at, position(5));
    assert_eq!(log.sm.bucket_of(&issuer("A")), Some(BucketId(7)));
    let before = log.sm.snapshot();
    log.now_ms += 1_000; // both holds are due
    for cmd in [
        reserve("b2", "B", 1, None),
        reserve("b1", "B", 10, Some(200)), // even a replay
        Command::Confirm {
            reservation_id: rid("B:r1"),
        },
        Command::Release {
            reservation_id: rid("A:r1"),
        },
        Command::ResolveToken {
            issuer_id: issuer("A"),
            token: token("zz"),
        },
        place("B", 50, 7),
        upsert("A", "madrid", 50),
        place("C", 10, 7), // a new issuer of the bucket
        Command::Batch(vec![
            reserve("x", "NOPE", 1, None),
            reserve("b3", "B", 1, None),
        ]),
    ] {
        let applied = log.apply(cmd.clone());
        assert_eq!(
            applied.outcome,
            Outcome::Rejected(Rejection::Moved {
                bucket: BucketId(7)
            }),
            "{cmd:?}"
        );
        assert_eq!(applied.events, []);
    }
    // Time does not expire a sealed bucket's holds either.
    assert_eq!(log.sm.next_hold_expiry_ms(), None);
    let expired = log.apply(Command::ExpireHolds);
    assert_eq!(expired.outcome, Outcome::Expired { count: 0 });
    let mut unchanged = log.sm.clone();
    unchanged.applied = StateMachine::restore(&before).unwrap().applied;
    unchanged.applied_at = StateMachine::restore(&before).unwrap().applied_at;
    assert_eq!(unchanged.snapshot(), before);
    // Sealing again changes nothing; a snapshot keeps the seal.
    let again = log.apply(Command::SealBucket {
        bucket: BucketId(7),
        issuers: vec![],
    });
    assert!(
        matches!(again.outcome, Outcome::Bucket { record, .. } if record.sealed_at == Some(at))
    );
    let restored = StateMachine::restore(&log.sm.snapshot()).unwrap();
    assert_eq!(restored, log.sm);
    // Unsealed: writes are taken again and the due holds expire.
    let opened = log.apply(Command::UnsealBucket {
        bucket: BucketId(7),
    });
    let opened_at = position(log.index);
    assert!(matches!(
        opened.outcome,
        Outcome::Bucket { record, .. }
            if record.sealed_at.is_none() && record.opened_at == Some(opened_at)
    ));
    assert_eq!(log.sm.bucket(BucketId(7)).opened_at, Some(opened_at));
    assert_eq!(
        log.apply(Command::ExpireHolds).outcome,
        Outcome::Expired { count: 2 }
    );
    assert!(matches!(
        log.apply(reserve("b2", "B", 1, None)).outcome,
        Outcome::Reservation { .. }
    ));
}

/// Copies every page of `bucket` from `from` (rows written after `since`)
/// into `to` as move 1's imports; returns the position of the first page.
fn copy_bucket(
    from: &StateMachine,
    to: &mut Log,
    bucket: harbor_types::BucketId,
    since: Option<CommitToken>,
) -> Option<CommitToken> {
    let mut after = None;
    let mut first = None;
    loop {
        let page = from.export(bucket, since, after.as_ref(), 2);
        first = first.or(page.at);
        let applied = to.apply(Command::ImportBucket {
            bucket,
            move_id: 1,
            from: ShardId(1),
            rows: page.rows,
        });
        assert!(
            matches!(applied.outcome, Outcome::Bucket { .. }),
            "{applied:?}"
        );
        after = page.next;
        if after.is_none() {
            return first;
        }
    }
}

#[test]
fn a_bucket_moves_whole_and_is_written_only_where_it_is() {
    use harbor_types::BucketId;
    let b = BucketId(3);
    let mut a = Log::with_issuer(); // A stays; B moves
    a.apply(place("B", 100, 3));
    a.apply(Command::ReserveForCustomer {
        token: token("b1"),
        issuer_id: issuer("B"),
        amount: Amount(10),
        desk: "rates".into(),
        trader: "ana".into(),
        hold_ttl_ms: Some(5_000),
        customer_id: "cust-1".into(),
    });
    a.apply(reserve("b2", "B", 95, None)); // rejected: a token outcome
    a.apply(reserve("b3", "B", 20, None));
    // The target: another group, with positions of its own.
    let mut b_log = Log {
        sm: StateMachine::new(),
        index: 100,
        now_ms: 1_000,
        shard: ShardId(2),
    };
    b_log.apply(Command::Noop);
    let since = copy_bucket(&a.sm, &mut b_log, b, None);
    // Staged rows are out of sight.
    assert_eq!(b_log.sm.issuer(&issuer("B")), None);
    assert!(!b_log.sm.takes_writes(b) && !b_log.sm.serves_reads(b));
    // The source goes on: a confirm after the copy; then it seals.
    a.apply(Command::Confirm {
        reservation_id: rid("B:r1"),
    });
    a.apply(Command::SealBucket {
        bucket: b,
        issuers: vec![],
    });
    let delta = a.sm.export(b, since, None, 100);
    assert_eq!(
        (
            delta.rows.issuers.len(),
            delta.rows.reservations.len(),
            delta.rows.tokens.len()
        ),
        (0, 1, 0),
        "only what changed since the copy (a confirm changes its reservation): {delta:?}"
    );
    assert!(delta.record.sealed_at.is_some());
    copy_bucket(&a.sm, &mut b_log, b, since);
    let acquired = b_log.apply(Command::AcquireBucket {
        bucket: b,
        move_id: 1,
        epoch: 1,
    });
    assert!(
        matches!(acquired.events.as_slice(), [Event::BucketAcquired { issuers, epoch: 1, .. }] if issuers == &[issuer("B")]),
        "{acquired:?}"
    );
    // The target holds what the source held, token outcomes included.
    assert_eq!(b_log.sm.issuer(&issuer("B")), a.sm.issuer(&issuer("B")));
    for id in ["B:r1", "B:r2"] {
        assert_eq!(b_log.sm.reservation(&rid(id)), a.sm.reservation(&rid(id)));
    }
    for t in ["b1", "b2", "b3"] {
        assert_eq!(
            b_log.sm.token(&issuer("B"), &token(t)),
            a.sm.token(&issuer("B"), &token(t))
        );
    }
    assert_eq!(b_log.sm.epoch_of(&issuer("B")), 1);
    // The same token is a replay in its new group; an abort after the
    // acquisition changes nothing.
    let replay = b_log.apply(reserve("b3", "B", 20, None));
    assert!(matches!(
        replay.outcome,
        Outcome::Reservation { replayed: true, .. }
    ));
    b_log.apply(Command::AbortImport {
        bucket: b,
        move_id: 1,
    });
    assert!(b_log.sm.takes_writes(b));
    let restored = StateMachine::restore(&b_log.sm.snapshot()).unwrap();
    assert_eq!(restored, b_log.sm);
    // The source lets the bucket go: its rows stay, refused to everyone
    // (for change consumers' scans); the other issuer is served as ever.
    let released = a.apply(Command::ReleaseBucket {
        bucket: b,
        to: ShardId(2),
    });
    assert!(matches!(
        released.events.as_slice(),
        [Event::BucketReleased { .. }]
    ));
    assert!(!a.sm.serves_issuer(&issuer("B")));
    assert!(a.sm.serves_issuer(&issuer("A")));
    assert!(matches!(
        a.apply(reserve("b9", "B", 1, None)).outcome,
        Outcome::Rejected(Rejection::Moved { .. })
    ));
    // The bucket can come back: the acquisition replaces the kept rows.
    let page = b_log.sm.export(b, None, None, 100);
    a.apply(Command::ImportBucket {
        bucket: b,
        move_id: 2,
        from: ShardId(2),
        rows: page.rows,
    });
    let back = a.apply(Command::AcquireBucket {
        bucket: b,
        move_id: 2,
        epoch: 2,
    });
    assert!(
        matches!(back.outcome, Outcome::Bucket { record, .. } if record.acquired_by == Some(2)),
        "{back:?}"
    );
    assert_eq!(a.sm.issuer(&issuer("B")), b_log.sm.issuer(&issuer("B")));
    assert_eq!(a.sm.epoch_of(&issuer("B")), 2);
    a.apply(Command::SealBucket {
        bucket: b,
        issuers: vec![],
    });
    a.apply(Command::ReleaseBucket {
        bucket: b,
        to: ShardId(2),
    });
    assert!(!a.sm.serves_reads(b) && !a.sm.takes_writes(b));
    let unseal = a.apply(Command::UnsealBucket { bucket: b });
    assert!(matches!(unseal.outcome, Outcome::Bucket { record, .. } if record.sealed_at.is_some()));
}

#[test]
fn an_aborted_import_cannot_be_acquired_and_an_inconsistent_one_is_refused() {
    use harbor_types::BucketId;
    let b = BucketId(3);
    let mut a = Log::with_issuer();
    a.apply(place("B", 100, 3));
    a.apply(reserve("b1", "B", 10, None));
    let mut target = Log {
        sm: StateMachine::new(),
        index: 0,
        now_ms: 1_000,
        shard: ShardId(2),
    };
    target.apply(Command::Noop);
    let page = a.sm.export(b, None, None, 100);
    let import = |move_id| Command::ImportBucket {
        bucket: b,
        move_id,
        from: ShardId(1),
        rows: page.rows.clone(),
    };
    target.apply(import(1));
    // Another move cannot stage over it.
    assert!(matches!(
        target.apply(import(2)).outcome,
        Outcome::Rejected(_)
    ));
    target.apply(Command::AbortImport {
        bucket: b,
        move_id: 1,
    });
    // After its abort, the move cannot stage again (a second driver).
    assert!(matches!(
        target.apply(import(1)).outcome,
        Outcome::Rejected(_)
    ));
    let late = target.apply(Command::AcquireBucket {
        bucket: b,
        move_id: 1,
        epoch: 1,
    });
    assert!(matches!(late.outcome, Outcome::Rejected(_)), "{late:?}");
    assert_eq!(target.sm.issuer(&issuer("B")), None);
    // Rows that do not add up (a missed change) are refused.
    let mut broken = page.rows.clone();
    broken.issuers[0].reserved = Amount(11);
    target.apply(Command::ImportBucket {
        bucket: b,
        move_id: 3,
        from: ShardId(1),
        rows: broken,
    });
    let refused = target.apply(Command::AcquireBucket {
        bucket: b,
        move_id: 3,
        epoch: 1,
    });
    assert!(
        matches!(refused.outcome, Outcome::Rejected(_)),
        "{refused:?}"
    );
    assert_eq!(target.sm.issuer(&issuer("B")), None);
    let restored = StateMachine::restore(&target.sm.snapshot()).unwrap();
    assert_eq!(restored, target.sm);
    // A reservation whose token names another is refused too, and a later
    // pass that brings the right row mends it (the tallies follow rows
    // that are replaced).
    target.apply(Command::AbortImport {
        bucket: b,
        move_id: 3,
    });
    let mut crossed = page.rows.clone();
    crossed.reservations[0].token = token("other");
    target.apply(Command::ImportBucket {
        bucket: b,
        move_id: 4,
        from: ShardId(1),
        rows: crossed,
    });
    let acquire = Command::AcquireBucket {
        bucket: b,
        move_id: 4,
        epoch: 1,
    };
    let refused = target.apply(acquire.clone());
    assert!(
        matches!(&refused.outcome, Outcome::Rejected(r) if r.to_string().contains("carried")),
        "{refused:?}"
    );
    target.apply(Command::ImportBucket {
        bucket: b,
        move_id: 4,
        from: ShardId(1),
        rows: page.rows.clone(),
    });
    let acquired = target.apply(acquire);
    assert!(
        matches!(acquired.outcome, Outcome::Bucket { record, .. } if record.acquired_by == Some(4)),
        "{acquired:?}"
    );
    assert_eq!(target.sm.issuer(&issuer("B")), a.sm.issuer(&issuer("B")));
}

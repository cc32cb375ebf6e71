//! Promise (DESIGN.md §1, §2): a definite failure is definite. A reserve
//! refused with `insufficient_exposure` ends `rejected` (the rejection is the
//! token's durable outcome) and one refused with `token_abandoned` ends
//! `abandoned` — neither ever commits later. A failed confirm or release did
//! not change the reservation: if it ends in that status, some other
//! operation that may have happened explains it.
//!
//! Timeouts are unknown, not failed: `info` operations and operations
//! without a completion impose nothing here.

use crate::format::{Call, ReservationStatus, TokenStatus};
use crate::{History, Op, Property, Verdict, Violation};
use harbor_types::ReservationId;

pub struct FailedMeansNotApplied;

/// Reserve errors that name the token's durable outcome.
const DECISIVE_ERRORS: [(&str, TokenStatus); 2] = [
    ("insufficient_exposure", TokenStatus::Rejected),
    ("token_abandoned", TokenStatus::Abandoned),
];

impl Property for FailedMeansNotApplied {
    fn name(&self) -> &'static str {
        "failed_means_not_applied"
    }

    fn promise(&self) -> &'static str {
        "an operation answered with a definite failure never takes effect"
    }

    fn verdict(&self, h: &History) -> Verdict {
        let mut verdict = Verdict::default();
        for op in h.ops() {
            let Some(error) = op.failed() else { continue };
            verdict.items_checked += 1;
            let issuer = op.call.issuer();
            let fin = h.final_of(issuer);
            let detail = match &op.call {
                Call::Reserve { token, .. } => {
                    let decisive = DECISIVE_ERRORS.iter().find(|(e, _)| *e == error.error);
                    let Some((_, expected)) = decisive else {
                        continue;
                    };
                    if h.is_lost(issuer, token) {
                        continue;
                    }
                    let outcome = fin.and_then(|f| f.token(token));
                    if outcome.map(|t| t.status) == Some(*expected) {
                        continue;
                    }
                    format!(
                        "reserve of token {token} of {issuer} failed with {}, \
                         final outcome {outcome:?} (want {expected:?})",
                        error.error
                    )
                }
                Call::Confirm { reservation_id: id } | Call::Release { reservation_id: id } => {
                    let became = match op.call {
                        Call::Confirm { .. } => ReservationStatus::Confirmed,
                        _ => ReservationStatus::Released,
                    };
                    let status = fin.and_then(|f| f.reservation(id)).map(|r| r.status);
                    if status != Some(became) || explained(h, op, id, became) {
                        continue;
                    }
                    format!(
                        "{} of {id} failed with {}, yet {id} ended {became:?} \
                         and no other operation explains it",
                        op.call.function(),
                        error.error
                    )
                }
                _ => continue,
            };
            verdict
                .violations
                .push(Violation::new(self, detail, vec![op.id]));
        }
        verdict
    }
}

/// Whether an operation other than `failed` may have moved `id` to `status`:
/// another confirm or release of it, or (for `confirmed`) a reserve of its
/// token that asked to be confirmed at once.
fn explained(h: &History, failed: &Op, id: &ReservationId, status: ReservationStatus) -> bool {
    let token = h
        .final_of(id.issuer())
        .and_then(|f| f.reservation(id))
        .map(|r| &r.token);
    h.ops().iter().any(|o| {
        let cause = match &o.call {
            Call::Confirm { reservation_id } => {
                status == ReservationStatus::Confirmed && reservation_id == id
            }
            Call::Release { reservation_id } => {
                status == ReservationStatus::Released && reservation_id == id
            }
            Call::Reserve {
                token: t,
                issuer_id,
                hold_ttl_ms: None,
                ..
            } => {
                status == ReservationStatus::Confirmed
                    && issuer_id == id.issuer()
                    && Some(t) == token
            }
            _ => false,
        };
        cause && o.id != failed.id && o.may_have_happened()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::*;
    use crate::ReservationStatus::{Confirmed, Held, Released};
    use crate::TokenStatus::{Abandoned, Committed, Rejected};

    fn script() -> Script {
        let mut s = Script::new();
        s.ok("c1", register("A", 100), registered("shard1@g1:1"));
        s.ok(
            "c1",
            reserve("A", "t1", 80),
            reserved("A:r1", Confirmed, "shard1@g1:2"),
        );
        s.fail("c2", reserve("A", "t2", 50), "insufficient_exposure");
        s.ok(
            "c1",
            hold("A", "t3", 20),
            reserved("A:r2", Held, "shard1@g1:4"),
        );
        // A confirm of a confirmed reservation may be refused; that is fine.
        s.fail("c1", confirm("A:r1"), "not_held");
        s.fail("c2", release("A:r9"), "unknown_reservation");
        s
    }

    #[test]
    fn definite_failures_that_stayed_failed_pass() {
        let mut s = script();
        s.final_state(final_line(
            "A",
            100,
            &[("A:r1", "t1", 80, Confirmed), ("A:r2", "t3", 20, Held)],
            &[("t2", Rejected)],
        ));
        let verdict = FailedMeansNotApplied.verdict(&s.history());
        assert_eq!(verdict.violations, vec![]);
        assert_eq!(verdict.items_checked, 3);
    }

    #[test]
    fn a_rejected_reserve_that_committed_is_caught() {
        let mut s = script();
        s.final_state(final_line(
            "A",
            200,
            &[
                ("A:r1", "t1", 80, Confirmed),
                ("A:r2", "t3", 20, Held),
                ("A:r3", "t2", 50, Confirmed),
            ],
            &[],
        ));
        let violations = FailedMeansNotApplied.check(&s.history());
        assert_eq!(violations.len(), 1, "{violations:?}");
        assert_eq!(violations[0].ops, vec![3]);
        assert!(
            violations[0].detail.contains("Committed"),
            "{}",
            violations[0]
        );
    }

    #[test]
    fn an_abandoned_token_that_committed_is_caught() {
        let mut s = script();
        s.fail("c2", reserve("A", "t4", 1), "token_abandoned");
        s.final_state(final_line(
            "A",
            100,
            &[("A:r1", "t1", 80, Confirmed), ("A:r2", "t3", 20, Held)],
            &[("t2", Rejected), ("t4", Committed)],
        ));
        let violations = FailedMeansNotApplied.check(&s.history());
        assert_eq!(violations.len(), 1, "{violations:?}");
        assert!(violations[0].detail.contains("token_abandoned"));
    }

    #[test]
    fn a_failed_release_that_released_is_caught() {
        let mut s = script();
        let bad = s.fail("c1", release("A:r2"), "not_leader");
        s.final_state(final_line(
            "A",
            100,
            &[("A:r1", "t1", 80, Confirmed), ("A:r2", "t3", 20, Released)],
            &[("t2", Rejected)],
        ));
        let violations = FailedMeansNotApplied.check(&s.history());
        assert_eq!(violations.len(), 1, "{violations:?}");
        assert_eq!(violations[0].ops, vec![bad]);
    }

    /// A timed-out reserve may or may not have applied: both endings pass.
    #[test]
    fn an_info_reserve_is_unknown_whether_it_committed_or_not() {
        for committed in [true, false] {
            let mut s = script();
            s.info("c3", reserve("A", "t5", 5));
            s.info("c3", release("A:r2"));
            let mut reservations = vec![("A:r1", "t1", 80, Confirmed), ("A:r2", "t3", 20, Held)];
            let mut tokens = vec![("t2", Rejected)];
            if committed {
                reservations[1].3 = Released;
                reservations.push(("A:r3", "t5", 5, Confirmed));
            } else {
                tokens.push(("t5", Abandoned));
            }
            s.final_state(final_line("A", 100, &reservations, &tokens));
            let h = s.history();
            assert_eq!(
                FailedMeansNotApplied.check(&h),
                vec![],
                "committed: {committed}"
            );
            assert!(crate::check(&h).is_ok(), "{}", crate::check(&h));
        }
    }
}

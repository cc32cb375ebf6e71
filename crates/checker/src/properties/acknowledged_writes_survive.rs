//! Promise (DESIGN.md §1, §3, §11): every acknowledged write survives. An
//! `ok` answer is never taken back: the converged final state contains every
//! acknowledged issuer, reservation (with its token committed to it, and its
//! amount) and status change, unless a regional failover reported the token
//! `lost_in_failover`.
//!
//! Only `ok` operations are examined; `info` and missing completions are
//! unknown and promise nothing.

use crate::format::{Call, FinalLine, Reply, ReservationStatus, TokenStatus};
use crate::{History, Op, Property, Verdict, Violation};
use harbor_types::ReservationId;

pub struct AcknowledgedWritesSurvive;

impl Property for AcknowledgedWritesSurvive {
    fn name(&self) -> &'static str {
        "acknowledged_writes_survive"
    }

    fn promise(&self) -> &'static str {
        "an acknowledged write is never lost (unless reported lost_in_failover)"
    }

    fn verdict(&self, h: &History) -> Verdict {
        let mut verdict = Verdict::default();
        for op in h.ops() {
            let Some(reply) = op.ok() else { continue };
            if reply.commit_token().is_none() {
                continue; // a read
            }
            verdict.items_checked += 1;
            let issuer = op.call.issuer();
            let lost = match &op.call {
                Call::Reserve { token, .. } | Call::Resolve { token, .. } => {
                    h.is_lost(issuer, token)
                }
                _ => false,
            };
            if lost {
                continue;
            }
            let Some(fin) = h.final_of(issuer) else {
                let detail = format!(
                    "acknowledged {} of {issuer} but the issuer has no final state",
                    op.call.function()
                );
                verdict
                    .violations
                    .push(Violation::new(self, detail, vec![op.id]));
                continue;
            };
            if let Some(detail) = self.missing(h, fin, op, reply) {
                verdict
                    .violations
                    .push(Violation::new(self, detail, vec![op.id]));
            }
        }
        verdict
    }
}

impl AcknowledgedWritesSurvive {
    /// What of the acknowledged write `op` the final state lacks, if anything.
    fn missing(&self, h: &History, fin: &FinalLine, op: &Op, reply: &Reply) -> Option<String> {
        match (&op.call, reply) {
            (
                Call::Reserve { token, amount, .. },
                Reply::Reserve {
                    reservation_id,
                    status,
                    ..
                },
            ) => {
                let outcome = fin.token(token);
                let committed_here = outcome.is_some_and(|t| {
                    t.status == TokenStatus::Committed
                        && t.reservation_id.as_ref() == Some(reservation_id)
                });
                if !committed_here {
                    return Some(format!(
                        "reserve of token {token} acknowledged as {reservation_id}, \
                         but the final token outcome is {outcome:?}"
                    ));
                }
                let Some(r) = fin.reservation(reservation_id) else {
                    return Some(format!(
                        "reserve acknowledged as {reservation_id}, missing from the final state"
                    ));
                };
                if r.amount != *amount {
                    return Some(format!(
                        "reserve of {amount} acknowledged as {reservation_id}, final amount {}",
                        r.amount
                    ));
                }
                if *status == ReservationStatus::Confirmed {
                    return still_confirmed(h, fin, reservation_id, "reserve");
                }
                None
            }
            (Call::Confirm { reservation_id }, _) => {
                still_confirmed(h, fin, reservation_id, "confirm")
            }
            (Call::Release { reservation_id }, _) => {
                let status = fin.reservation(reservation_id).map(|r| r.status);
                (status != Some(ReservationStatus::Released)).then(|| {
                    format!("release of {reservation_id} acknowledged, final status {status:?}")
                })
            }
            (Call::Resolve { token, .. }, Reply::Resolve { status, .. }) => {
                let outcome = fin.token(token).map(|t| t.status);
                (outcome != Some(*status)).then(|| {
                    format!(
                        "resolve of token {token} acknowledged as {status:?}, \
                         final outcome {outcome:?}"
                    )
                })
            }
            // An acknowledged registration only needs the final line.
            _ => None,
        }
    }
}

/// An acknowledged confirmation survives as `confirmed`, or as `released`
/// when some release of the reservation may have happened (ok, info or no
/// completion).
fn still_confirmed(h: &History, fin: &FinalLine, id: &ReservationId, what: &str) -> Option<String> {
    let status = fin.reservation(id).map(|r| r.status);
    match status {
        Some(ReservationStatus::Confirmed) => None,
        Some(ReservationStatus::Released) => {
            let released = h.ops().iter().any(|o| {
                matches!(&o.call, Call::Release { reservation_id } if reservation_id == id)
                    && o.may_have_happened()
            });
            (!released).then(|| {
                format!(
                    "{what} of {id} acknowledged confirmed, final status released by no release"
                )
            })
        }
        _ => Some(format!(
            "{what} of {id} acknowledged confirmed, final status {status:?}"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::*;
    use crate::ReservationStatus::{Confirmed, Held, Released};

    /// Two clients; a replay after a timeout; a hold confirmed; a confirmed
    /// reservation released by a release whose answer timed out.
    fn script() -> Script {
        let mut s = Script::new();
        s.ok("c1", register("A", 100), registered("shard1@g1:1"));
        s.ok(
            "c1",
            reserve("A", "t1", 10),
            reserved("A:r1", Confirmed, "shard1@g1:2"),
        );
        s.info("c2", reserve("A", "t2", 20));
        s.ok(
            "c2",
            reserve("A", "t2", 20),
            replayed("A:r2", "shard1@g1:3"),
        );
        s.ok(
            "c1",
            hold("A", "t3", 30),
            reserved("A:r3", Held, "shard1@g1:4"),
        );
        s.ok("c1", confirm("A:r3"), confirmed("shard1@g1:5"));
        s.info("c2", release("A:r1"));
        s
    }

    fn final_a() -> FinalLine {
        final_line(
            "A",
            100,
            &[
                ("A:r1", "t1", 10, Released),
                ("A:r2", "t2", 20, Confirmed),
                ("A:r3", "t3", 30, Confirmed),
            ],
            &[],
        )
    }

    #[test]
    fn everything_acknowledged_is_in_the_final_state() {
        let mut s = script();
        s.final_state(final_a());
        let verdict = AcknowledgedWritesSurvive.verdict(&s.history());
        assert_eq!(verdict.violations, vec![]);
        assert_eq!(verdict.items_checked, 5);
    }

    #[test]
    fn a_lost_reservation_is_caught() {
        let mut s = script();
        let mut lost = final_a();
        lost.reservations.remove(1);
        lost.tokens.remove(1);
        s.final_state(lost);
        let violations = AcknowledgedWritesSurvive.check(&s.history());
        assert_eq!(violations.len(), 1, "{violations:?}");
        assert!(
            violations[0].detail.contains("token t2"),
            "{}",
            violations[0]
        );
        assert_eq!(violations[0].ops, vec![4]);
    }

    #[test]
    fn a_reservation_reported_lost_in_failover_is_exempt() {
        let mut s = script();
        let mut lost = final_a();
        lost.reservations.remove(1);
        lost.tokens.remove(1);
        s.final_state(lost);
        s.lost("A", "t2", "shard1@g1:3");
        assert_eq!(AcknowledgedWritesSurvive.check(&s.history()), vec![]);
    }

    #[test]
    fn an_undone_confirmation_is_caught() {
        let mut s = script();
        let mut undone = final_a();
        undone.reservations[2].status = Held;
        s.final_state(undone);
        let violations = AcknowledgedWritesSurvive.check(&s.history());
        assert_eq!(violations.len(), 1, "{violations:?}");
        assert!(violations[0].detail.contains("confirm of A:r3"));
    }

    #[test]
    fn a_release_nobody_asked_for_is_caught() {
        let mut s = script();
        let mut released = final_a();
        released.reservations[2].status = Released;
        s.final_state(released);
        let violations = AcknowledgedWritesSurvive.check(&s.history());
        assert_eq!(violations.len(), 1, "{violations:?}");
        assert!(violations[0].detail.contains("released by no release"));
    }

    #[test]
    fn an_undone_release_is_caught() {
        let mut s = script();
        s.ok("c2", release("A:r2"), released("shard1@g1:7"));
        s.final_state(final_a());
        let violations = AcknowledgedWritesSurvive.check(&s.history());
        assert_eq!(violations.len(), 1, "{violations:?}");
        assert!(violations[0].detail.contains("release of A:r2"));
    }

    #[test]
    fn an_issuer_without_final_state_is_caught() {
        let mut s = script();
        s.ok("c1", register("B", 5), registered("shard2@g1:1"));
        s.final_state(final_a());
        let violations = AcknowledgedWritesSurvive.check(&s.history());
        assert_eq!(violations.len(), 1, "{violations:?}");
        assert!(violations[0]
            .detail
            .contains("of B but the issuer has no final state"));
    }
}

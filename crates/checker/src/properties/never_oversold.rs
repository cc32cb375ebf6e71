//! Promise (DESIGN.md §1, §2): an issuer is never oversold. In the converged
//! final state `reserved <= limit` and `reserved` is exactly the sum of the
//! held and confirmed amounts; no read ever answered `reserved > limit`.

use crate::format::Reply;
use crate::{History, Property, Verdict, Violation};

pub struct NeverOversold;

impl Property for NeverOversold {
    fn name(&self) -> &'static str {
        "never_oversold"
    }

    fn promise(&self) -> &'static str {
        "an issuer's reserved amount (held + confirmed) never exceeds its limit"
    }

    fn verdict(&self, h: &History) -> Verdict {
        let mut verdict = Verdict::default();
        for fin in h.finals() {
            verdict.items_checked += 1;
            let f = &fin.value;
            let at = format!("final line {} of {}", fin.line, f.issuer_id);
            if f.reserved > f.limit {
                let detail = format!("{at}: reserved {} > limit {}", f.reserved, f.limit);
                verdict
                    .violations
                    .push(Violation::new(self, detail, vec![]));
            }
            let mut open = f.reservations.iter().filter(|r| r.status.is_open());
            let sum = open.try_fold(0u64, |sum, r| sum.checked_add(r.amount.0));
            if sum != Some(f.reserved.0) {
                let sum = sum.map_or("overflow".to_string(), |s| s.to_string());
                let detail = format!(
                    "{at}: reserved {} but held + confirmed reservations sum to {sum}",
                    f.reserved
                );
                verdict
                    .violations
                    .push(Violation::new(self, detail, vec![]));
            }
        }
        for op in h.ops() {
            let Some(Reply::ReadIssuer {
                limit, reserved, ..
            }) = op.ok()
            else {
                continue;
            };
            verdict.items_checked += 1;
            if reserved > limit {
                let detail = format!(
                    "read of {} answered reserved {reserved} > limit {limit}",
                    op.call.issuer()
                );
                verdict
                    .violations
                    .push(Violation::new(self, detail, vec![op.id]));
            }
        }
        verdict
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::*;
    use crate::Consistency::Strong;
    use crate::ReservationStatus::{Confirmed, Held, Released};
    use harbor_types::Amount;

    fn script() -> Script {
        let mut s = Script::new();
        s.ok("c1", register("A", 100), registered("shard1@g1:1"));
        s.ok(
            "c1",
            reserve("A", "t1", 60),
            reserved("A:r1", Confirmed, "shard1@g1:2"),
        );
        s.fail("c2", reserve("A", "t2", 50), "insufficient_exposure");
        s.ok(
            "c2",
            hold("A", "t3", 40),
            reserved("A:r2", Held, "shard1@g1:4"),
        );
        s.ok("c1", read("A", Strong), answer("shard1@g1:4", 100));
        s
    }

    fn final_a() -> crate::FinalLine {
        final_line(
            "A",
            100,
            &[
                ("A:r1", "t1", 60, Confirmed),
                ("A:r2", "t3", 40, Held),
                ("A:r3", "t4", 90, Released),
            ],
            &[],
        )
    }

    #[test]
    fn a_full_but_not_oversold_issuer_passes() {
        let mut s = script();
        s.final_state(final_a());
        let verdict = NeverOversold.verdict(&s.history());
        assert_eq!(verdict.violations, vec![]);
        assert_eq!(verdict.items_checked, 2);
    }

    #[test]
    fn an_oversold_final_state_is_caught() {
        let mut s = script();
        let mut oversold = final_a();
        // The rejected reserve was applied anyway.
        oversold.reservations[2].status = Confirmed;
        oversold.reserved = Amount(190);
        s.final_state(oversold);
        let violations = NeverOversold.check(&s.history());
        assert_eq!(violations.len(), 1, "{violations:?}");
        assert!(violations[0].detail.contains("reserved 190 > limit 100"));
    }

    #[test]
    fn a_reserved_total_that_disagrees_with_the_reservations_is_caught() {
        let mut s = script();
        let mut wrong = final_a();
        wrong.reserved = Amount(60);
        s.final_state(wrong);
        let violations = NeverOversold.check(&s.history());
        assert_eq!(violations.len(), 1, "{violations:?}");
        assert!(violations[0].detail.contains("sum to 100"));
    }

    #[test]
    fn an_oversold_read_is_caught() {
        let mut s = script();
        let bad = s.ok("c1", read("A", Strong), answer("shard1@g1:5", 101));
        let violations = NeverOversold.check(&s.history());
        assert_eq!(violations.len(), 1, "{violations:?}");
        assert_eq!(violations[0].ops, vec![bad]);
    }
}

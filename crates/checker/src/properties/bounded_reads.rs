//! Promise (DESIGN.md §1, §7): bounded reads are within their staleness
//! budget or say they are not. A `bounded` read answered with `stale: false`
//! is at most `max_staleness_ms` behind (default
//! [`BOUNDED_STALENESS_MS_DEFAULT`]); a `stale: true` answer is allowed — the
//! caller was told — and only counted.

use crate::format::{Call, Consistency, Reply};
use crate::{History, Property, Verdict, Violation};

/// The staleness budget of a bounded read that names none (DESIGN.md §1).
pub const BOUNDED_STALENESS_MS_DEFAULT: u64 = 2_000;

pub struct BoundedReads;

impl Property for BoundedReads {
    fn name(&self) -> &'static str {
        "bounded_reads"
    }

    fn promise(&self) -> &'static str {
        "a bounded read is within its staleness budget or is flagged stale"
    }

    fn verdict(&self, h: &History) -> Verdict {
        let mut verdict = Verdict::default();
        for op in h.ops() {
            let (
                Call::ReadIssuer {
                    issuer_id,
                    consistency: Consistency::Bounded,
                    max_staleness_ms,
                },
                Some(Reply::ReadIssuer {
                    stale,
                    staleness_ms,
                    served_by,
                    ..
                }),
            ) = (&op.call, op.ok())
            else {
                continue;
            };
            verdict.items_checked += 1;
            let budget_ms = max_staleness_ms.unwrap_or(BOUNDED_STALENESS_MS_DEFAULT);
            if !stale && *staleness_ms > budget_ms {
                let detail = format!(
                    "bounded read of {issuer_id} served by {served_by:?} is {staleness_ms} ms \
                     stale, over its {budget_ms} ms budget, and not flagged stale"
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

    fn bounded(max_staleness_ms: Option<u64>) -> Call {
        Call::ReadIssuer {
            issuer_id: issuer("A"),
            consistency: Consistency::Bounded,
            max_staleness_ms,
        }
    }

    fn lagging(staleness_ms: u64, flagged: bool) -> Reply {
        let mut reply = answer("shard1@g1:3", 0);
        if let Reply::ReadIssuer {
            stale,
            staleness_ms: lag,
            ..
        } = &mut reply
        {
            *stale = flagged;
            *lag = staleness_ms;
        }
        reply
    }

    #[test]
    fn reads_within_budget_or_flagged_pass() {
        let mut s = Script::new();
        s.ok("c1", bounded(None), lagging(2_000, false));
        s.ok("c1", bounded(Some(500)), lagging(400, false));
        s.ok("c1", bounded(Some(500)), lagging(9_000, true));
        s.info("c1", bounded(Some(500)));
        let verdict = BoundedReads.verdict(&s.history());
        assert_eq!(verdict.violations, vec![]);
        assert_eq!(verdict.items_checked, 3);
    }

    #[test]
    fn an_unflagged_read_over_budget_is_caught() {
        let mut s = Script::new();
        let over_default = s.ok("c1", bounded(None), lagging(2_001, false));
        let over_own = s.ok("c1", bounded(Some(500)), lagging(501, false));
        let violations = BoundedReads.check(&s.history());
        assert_eq!(violations.len(), 2, "{violations:?}");
        assert_eq!(violations[0].ops, vec![over_default]);
        assert_eq!(violations[1].ops, vec![over_own]);
        assert!(violations[1]
            .detail
            .contains("501 ms stale, over its 500 ms budget"));
    }
}

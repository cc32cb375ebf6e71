//! Promise (DESIGN.md §1, §7): bounded reads are within their staleness
//! budget or say they are not. A `bounded` read answered with `stale: false`
//! - says it is at most `max_staleness_ms` behind (default
//!   [`BOUNDED_STALENESS_MS_DEFAULT`]), and
//! - is: its `applied` position includes every write on its shard that was
//!   acknowledged more than the budget (plus [`CLOCK_UNCERTAINTY_MS`])
//!   before the read was invoked.
//!
//! A `stale: true` answer is allowed — the caller was told — and only
//! counted.

use super::{includes, Seen, Timeline};
use crate::format::{Call, Consistency, Reply};
use crate::{History, Property, Verdict, Violation};

/// The staleness budget of a bounded read that names none (DESIGN.md §1).
pub const BOUNDED_STALENESS_MS_DEFAULT: u64 = harbor_types::limits::STALENESS_MS_DEFAULT;

/// Staleness is measured on the serving replica's clock against the
/// leader's: the two may disagree by the clock-skew bound Harbor assumes
/// (the failover's lease margin), so a write acknowledged within that much
/// of the budget's edge may or may not be included.
pub const CLOCK_UNCERTAINTY_MS: u64 = harbor_types::limits::LEASE_MARGIN_MS;

pub struct BoundedReads;

impl Property for BoundedReads {
    fn name(&self) -> &'static str {
        "bounded_reads"
    }

    fn promise(&self) -> &'static str {
        "a bounded read is within its staleness budget or is flagged stale"
    }

    fn verdict(&self, h: &History) -> Verdict {
        // Acknowledged writes, by completion time, per shard.
        let writes = Timeline::new(
            h.ops()
                .iter()
                .filter_map(|op| {
                    let token = op.ok().and_then(Reply::commit_token)?;
                    Some((op.completed_ms()?, Seen { token, op: op.id }))
                })
                .collect(),
        );
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
                    applied,
                    ..
                }),
            ) = (&op.call, op.ok())
            else {
                continue;
            };
            verdict.items_checked += 1;
            if *stale {
                continue;
            }
            let budget_ms = max_staleness_ms.unwrap_or(BOUNDED_STALENESS_MS_DEFAULT);
            if staleness_ms.is_none_or(|s| s > budget_ms) {
                let age =
                    staleness_ms.map_or("of unknown staleness".into(), |s| format!("{s} ms stale"));
                let detail = format!(
                    "bounded read of {issuer_id} served by {served_by:?} is {age}, \
                     over its {budget_ms} ms budget, and not flagged stale"
                );
                verdict
                    .violations
                    .push(Violation::new(self, detail, vec![op.id]));
                continue;
            }
            let edge_ms = op
                .invoked
                .time_ms
                .saturating_sub(budget_ms + CLOCK_UNCERTAINTY_MS);
            if let Some(missed) = writes.newest_before(applied.shard, edge_ms) {
                if includes(*applied, missed.token) == Some(false) {
                    let detail = format!(
                        "bounded read of {issuer_id} invoked at {} ms, served by {served_by:?}, \
                         applied {applied} and said it was {} ms stale, but misses write op {} \
                         at {} acknowledged before {edge_ms} ms",
                        op.invoked.time_ms,
                        staleness_ms.unwrap_or_default(),
                        missed.op,
                        missed.token
                    );
                    verdict
                        .violations
                        .push(Violation::new(self, detail, vec![missed.op, op.id]));
                }
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
            *lag = Some(staleness_ms);
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

    #[test]
    fn a_read_that_claims_freshness_but_misses_an_old_write_is_caught() {
        let mut s = Script::new();
        s.ok("c1", register("A", 100), registered("shard1@g1:1"));
        let write = s.ok(
            "c1",
            reserve("A", "t1", 10),
            reserved("A:r1", crate::ReservationStatus::Confirmed, "shard1@g1:5"),
        );
        // Within the budget and the clock uncertainty: may miss it.
        s.ok("c2", bounded(Some(500)), lagging(100, false));
        s.advance(1_000);
        let missed = s.ok("c2", bounded(Some(500)), lagging(100, false));
        // Flagged stale: allowed to miss anything.
        s.ok("c2", bounded(Some(500)), lagging(100, true));
        let violations = BoundedReads.check(&s.history());
        assert_eq!(violations.len(), 1, "{violations:?}");
        assert_eq!(violations[0].ops, vec![write, missed]);
        assert!(violations[0].detail.contains("misses write op"));
    }
}

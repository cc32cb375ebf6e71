//! Promise (DESIGN.md §7, §11): strong reads are linearizable for their
//! shard. Observable part, for a log-ordered shard: a strong read reflects
//! (its `applied` position is at or after) every write on its issuer that was
//! acknowledged before the read was invoked, and every strong read of the
//! issuer that completed before it was invoked — in particular one client's
//! strong reads never go backwards.
//!
//! The same holds for the issuer itself: a strong read that answers
//! `unknown_issuer` after the issuer's registration was acknowledged
//! (through any gateway) missed that registration, whether the gateway's
//! directory or the leader's state answered.
//!
//! "Before" is strict in `time_ms`: events in the same millisecond are
//! concurrent. Positions on different shards are not compared.

use super::{includes, Seen, Timeline};
use crate::format::{Call, Consistency, Reply};
use crate::{History, Op, Property, Verdict, Violation};
use harbor_types::{CommitToken, IssuerId, ShardId};
use std::collections::HashMap;

pub struct StrongReadsNotStale;

fn strong_applied(op: &Op) -> Option<CommitToken> {
    match (&op.call, op.ok()?) {
        (
            Call::ReadIssuer {
                consistency: Consistency::Strong,
                ..
            },
            Reply::ReadIssuer { applied, .. },
        ) => Some(*applied),
        _ => None,
    }
}

impl Property for StrongReadsNotStale {
    fn name(&self) -> &'static str {
        "strong_reads_not_stale"
    }

    fn promise(&self) -> &'static str {
        "a strong read reflects every write and strong read that completed before it began"
    }

    fn verdict(&self, h: &History) -> Verdict {
        // Per issuer: (completion time, token) of acknowledged writes and of
        // strong reads.
        let mut writes: HashMap<&IssuerId, Vec<(u64, Seen)>> = HashMap::new();
        let mut reads: HashMap<&IssuerId, Vec<(u64, Seen)>> = HashMap::new();
        for op in h.ops() {
            let Some(completed_ms) = op.completed_ms() else {
                continue;
            };
            let issuer = op.call.issuer();
            if let Some(token) = op.ok().and_then(Reply::commit_token) {
                let seen = Seen { token, op: op.id };
                writes.entry(issuer).or_default().push((completed_ms, seen));
            }
            if let Some(token) = strong_applied(op) {
                let seen = Seen { token, op: op.id };
                reads.entry(issuer).or_default().push((completed_ms, seen));
            }
        }
        let writes: HashMap<_, _> = writes
            .into_iter()
            .map(|(k, v)| (k, Timeline::new(v)))
            .collect();
        let reads: HashMap<_, _> = reads
            .into_iter()
            .map(|(k, v)| (k, Timeline::new(v)))
            .collect();

        let mut verdict = Verdict::default();
        self.unknown_after_registration(h, &mut verdict);
        let mut last_by_client: HashMap<(&str, &IssuerId, ShardId), Seen> = HashMap::new();
        for op in h.ops() {
            let Some(applied) = strong_applied(op) else {
                continue;
            };
            verdict.items_checked += 1;
            let issuer = op.call.issuer();
            let (shard, invoked_ms) = (applied.shard, op.invoked.time_ms);
            let key = (op.client.as_str(), issuer, shard);
            let candidates = [
                (
                    "write",
                    writes
                        .get(issuer)
                        .and_then(|t| t.newest_before(shard, invoked_ms)),
                ),
                (
                    "strong read",
                    reads
                        .get(issuer)
                        .and_then(|t| t.newest_before(shard, invoked_ms)),
                ),
                (
                    "earlier strong read by the same client",
                    last_by_client.get(&key).copied(),
                ),
            ];
            let missed = candidates
                .into_iter()
                .filter_map(|(what, seen)| Some((what, seen?)))
                .filter(|(_, seen)| includes(applied, seen.token) == Some(false))
                .reduce(|a, b| if b.1.token > a.1.token { b } else { a });
            if let Some((what, seen)) = missed {
                let detail = format!(
                    "strong read of {issuer} invoked at {invoked_ms} ms by {} applied {applied}, \
                     behind {what} op {} at {}",
                    op.client, seen.op, seen.token
                );
                verdict
                    .violations
                    .push(Violation::new(self, detail, vec![seen.op, op.id]));
            }
            let this = Seen {
                token: applied,
                op: op.id,
            };
            let last = last_by_client.entry(key).or_insert(this);
            if applied > last.token {
                *last = this;
            }
        }
        verdict
    }
}

impl StrongReadsNotStale {
    /// Strong reads answered `unknown_issuer` although a registration of
    /// the issuer was acknowledged before they were invoked.
    fn unknown_after_registration(&self, h: &History, verdict: &mut Verdict) {
        // Per issuer: the first acknowledged registration (time, op).
        let mut registered: HashMap<&IssuerId, (u64, u64)> = HashMap::new();
        for op in h.ops() {
            if !matches!(op.call, Call::RegisterIssuer { .. }) || op.ok().is_none() {
                continue;
            }
            let at = op.completed_ms().expect("an acknowledged op completed");
            let first = registered.entry(op.call.issuer()).or_insert((at, op.id));
            if at < first.0 {
                *first = (at, op.id);
            }
        }
        for op in h.ops() {
            let strong = matches!(
                op.call,
                Call::ReadIssuer {
                    consistency: Consistency::Strong,
                    ..
                }
            );
            if !strong || op.failed().is_none_or(|e| e.error != "unknown_issuer") {
                continue;
            }
            verdict.items_checked += 1;
            let issuer = op.call.issuer();
            let invoked_ms = op.invoked.time_ms;
            if let Some(&(at, registration)) = registered.get(issuer).filter(|r| r.0 < invoked_ms) {
                let detail = format!(
                    "strong read of {issuer} invoked at {invoked_ms} ms by {} answered \
                     unknown_issuer, yet its registration op {registration} was acknowledged \
                     at {at} ms",
                    op.client
                );
                verdict
                    .violations
                    .push(Violation::new(self, detail, vec![registration, op.id]));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::*;
    use crate::Consistency::Strong;
    use crate::ReservationStatus::Confirmed;

    fn script() -> Script {
        let mut s = Script::new();
        s.ok("c1", register("A", 100), registered("shard1@g1:1"));
        s.ok(
            "c1",
            reserve("A", "t1", 10),
            reserved("A:r1", Confirmed, "shard1@g1:2"),
        );
        s.ok("c2", read("A", Strong), answer("shard1@g1:2", 10));
        // A new leader; its first write is at generation 2.
        s.leader(1, 2, "paris-1");
        s.ok(
            "c1",
            reserve("A", "t2", 10),
            reserved("A:r2", Confirmed, "shard1@g2:1"),
        );
        s.ok("c2", read("A", Strong), answer("shard1@g2:1", 20));
        s
    }

    #[test]
    fn strong_reads_that_see_every_earlier_write_pass() {
        let mut s = script();
        // Concurrent with a write: may or may not see it.
        let w = s.invoke("c1", reserve("A", "t3", 10));
        s.ok("c2", read("A", Strong), answer("shard1@g2:1", 20));
        s.complete(w, reserved("A:r3", Confirmed, "shard1@g2:2"));
        s.ok("c3", read("A", Strong), answer("shard1@g2:2", 30));
        let verdict = StrongReadsNotStale.verdict(&s.history());
        assert_eq!(verdict.violations, vec![]);
        assert_eq!(verdict.items_checked, 4);
    }

    #[test]
    fn a_strong_read_missing_an_acknowledged_write_is_caught() {
        let mut s = script();
        // Served by the deposed leader of generation 1.
        let stale = s.ok("c3", read("A", Strong), answer("shard1@g1:2", 10));
        let violations = StrongReadsNotStale.check(&s.history());
        assert_eq!(violations.len(), 1, "{violations:?}");
        assert_eq!(violations[0].ops, vec![4, stale]);
        assert!(violations[0]
            .detail
            .contains("behind write op 4 at shard1@g2:1"));
    }

    #[test]
    fn an_unknown_issuer_after_its_registration_is_caught() {
        let mut s = Script::new();
        // Concurrent with the registration: may say it does not exist.
        let r = s.invoke("c1", register("N", 100));
        s.fail("c2", read("N", Strong), "unknown_issuer");
        s.complete(r, registered("shard1@g1:1"));
        // Not strong: may lag.
        s.fail(
            "c3",
            read("N", crate::Consistency::Session),
            "unknown_issuer",
        );
        assert_eq!(StrongReadsNotStale.check(&s.history()), vec![]);
        // Strong, after the registration was acknowledged: missed it.
        let late = s.fail("c2", read("N", Strong), "unknown_issuer");
        let violations = StrongReadsNotStale.check(&s.history());
        assert_eq!(violations.len(), 1, "{violations:?}");
        assert_eq!(violations[0].ops, vec![r, late]);
        assert!(violations[0].detail.contains("unknown_issuer"));
    }

    #[test]
    fn a_strong_read_behind_an_earlier_strong_read_is_caught() {
        // No writes of B in the history: only the reads order these.
        let mut s = Script::new();
        s.ok("c1", read("B", Strong), answer("shard1@g1:7", 0));
        let back = s.ok("c2", read("B", Strong), answer("shard1@g1:6", 0));
        let violations = StrongReadsNotStale.check(&s.history());
        assert_eq!(violations.len(), 1, "{violations:?}");
        assert_eq!(violations[0].ops, vec![1, back]);
        assert!(violations[0].detail.contains("behind strong read op 1"));
    }

    #[test]
    fn one_clients_strong_reads_never_go_backwards_even_within_a_millisecond() {
        let mut s = Script::new();
        let first = s.rec.invoke(10, "c1", read("B", Strong));
        s.rec.ok(10, first, answer("shard1@g1:7", 0));
        let second = s.rec.invoke(10, "c1", read("B", Strong));
        s.rec.ok(10, second, answer("shard1@g1:6", 0));
        let violations = StrongReadsNotStale.check(&s.history());
        assert_eq!(violations.len(), 1, "{violations:?}");
        assert!(violations[0].detail.contains("same client"));
    }
}

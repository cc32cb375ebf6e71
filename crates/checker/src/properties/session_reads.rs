//! Promise (DESIGN.md §1, §7): session reads are read-your-writes and
//! monotonic; causal reads never show an effect without its cause.
//!
//! - A `session` read's `applied` position includes every commit token the
//!   client got from its own acknowledged writes on that shard before it
//!   invoked the read, and is never behind the client's earlier session reads
//!   of that shard.
//! - A `session` or `causal` read's `applied` includes every token the client
//!   named in the read (`session` in the answer).
//!
//! Positions on different shards are not compared.

use super::{includes, Seen};
use crate::format::{Call, Consistency, Reply};
use crate::{History, Property, Verdict, Violation};
use harbor_types::{CommitToken, ShardId};
use std::collections::HashMap;

pub struct SessionReads;

/// What one client has seen so far, per shard.
#[derive(Default)]
struct Session {
    newest_write: HashMap<ShardId, Seen>,
    newest_read: HashMap<ShardId, Seen>,
}

fn raise(newest: &mut HashMap<ShardId, Seen>, seen: Seen) {
    let entry = newest.entry(seen.token.shard).or_insert(seen);
    if seen.token > entry.token {
        *entry = seen;
    }
}

impl Property for SessionReads {
    fn name(&self) -> &'static str {
        "session_reads"
    }

    fn promise(&self) -> &'static str {
        "session reads see the session's own writes and never go backwards; \
         causal reads include their dependencies"
    }

    fn verdict(&self, h: &History) -> Verdict {
        let mut verdict = Verdict::default();
        let mut sessions: HashMap<&str, Session> = HashMap::new();
        // A client has one operation in flight, so invoke order is its order.
        for op in h.ops() {
            let Some(reply) = op.ok() else { continue };
            let session = sessions.entry(op.client.as_str()).or_default();
            if let Some(token) = reply.commit_token() {
                raise(&mut session.newest_write, Seen { token, op: op.id });
            }
            let (
                Call::ReadIssuer {
                    issuer_id,
                    consistency: consistency @ (Consistency::Session | Consistency::Causal),
                    ..
                },
                Reply::ReadIssuer {
                    applied,
                    session: named,
                    ..
                },
            ) = (&op.call, reply)
            else {
                continue;
            };
            verdict.items_checked += 1;
            let applied = *applied;
            let shard = applied.shard;
            // (what the read should include, its token, the op it came from)
            let mut should_include: Vec<(String, CommitToken, Option<u64>)> = named
                .iter()
                .map(|token| ("a token it named".to_string(), *token, None))
                .collect();
            if *consistency == Consistency::Session {
                for (what, newest) in [
                    ("its own write", &session.newest_write),
                    ("its earlier session read", &session.newest_read),
                ] {
                    if let Some(seen) = newest.get(&shard) {
                        let what = format!("{what} op {}", seen.op);
                        should_include.push((what, seen.token, Some(seen.op)));
                    }
                }
                let this = Seen {
                    token: applied,
                    op: op.id,
                };
                raise(&mut session.newest_read, this);
            }
            for (what, token, cause) in should_include {
                if includes(applied, token) != Some(false) {
                    continue;
                }
                let detail = format!(
                    "{consistency:?} read of {issuer_id} by {} applied {applied}, behind {what} at {token}",
                    op.client
                );
                let ops = cause.into_iter().chain([op.id]).collect();
                verdict.violations.push(Violation::new(self, detail, ops));
            }
        }
        verdict
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::*;
    use crate::Consistency::{Causal, Session};
    use crate::ReservationStatus::Confirmed;
    use crate::ServedBy;

    fn follower(applied: &str, named: &[&str]) -> Reply {
        let mut reply = answer(applied, 10);
        if let Reply::ReadIssuer {
            served_by, session, ..
        } = &mut reply
        {
            *served_by = ServedBy::Follower;
            *session = named.iter().map(|t| ct(t)).collect();
        }
        reply
    }

    fn script() -> Script {
        let mut s = Script::new();
        s.ok("c1", register("A", 100), registered("shard1@g1:1"));
        s.ok(
            "c1",
            reserve("A", "t1", 10),
            reserved("A:r1", Confirmed, "shard1@g1:5"),
        );
        s.ok(
            "c1",
            read("A", Session),
            follower("shard1@g1:5", &["shard1@g1:5"]),
        );
        // Another client's session knows nothing of c1's write.
        s.ok("c2", read("A", Session), follower("shard1@g1:3", &[]));
        s.ok(
            "c2",
            read("A", Causal),
            follower("shard1@g1:4", &["shard1@g1:4"]),
        );
        s
    }

    #[test]
    fn reads_that_include_the_session_pass() {
        let s = script();
        let verdict = SessionReads.verdict(&s.history());
        assert_eq!(verdict.violations, vec![]);
        assert_eq!(verdict.items_checked, 3);
    }

    #[test]
    fn a_read_missing_the_clients_own_write_is_caught() {
        let mut s = script();
        let stale = s.ok("c1", read("A", Session), follower("shard1@g1:4", &[]));
        let violations = SessionReads.check(&s.history());
        // Behind both its own write and its earlier read.
        assert_eq!(violations.len(), 2, "{violations:?}");
        assert_eq!(violations[0].ops, vec![2, stale]);
        assert!(violations[0].detail.contains("own write op 2"));
        assert!(violations[1].detail.contains("earlier session read op 3"));
    }

    #[test]
    fn a_session_read_going_backwards_is_caught() {
        let mut s = script();
        s.ok("c2", read("A", Session), follower("shard1@g1:2", &[]));
        let violations = SessionReads.check(&s.history());
        assert_eq!(violations.len(), 1, "{violations:?}");
        assert!(violations[0].detail.contains("earlier session read op 4"));
    }

    #[test]
    fn a_causal_read_missing_a_dependency_is_caught() {
        let mut s = script();
        s.ok(
            "c3",
            read("A", Causal),
            follower("shard1@g1:4", &["shard1@g1:5"]),
        );
        let violations = SessionReads.check(&s.history());
        assert_eq!(violations.len(), 1, "{violations:?}");
        assert!(violations[0]
            .detail
            .contains("a token it named at shard1@g1:5"));
    }
}

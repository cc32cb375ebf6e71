//! Promise (DESIGN.md §9): at no instant do two groups take a bucket's
//! writes. A group that sealed a bucket applies no write to it from the
//! seal on, until it opens it again (an unseal); a group that acquired a
//! moved bucket applied none before the entry that opened it. Checked on
//! every write the history shows applied (an `ok` write, or a definite
//! rejection recorded at a commit token) against the `bucket` lines of
//! the group it was applied in.

use crate::format::{BucketEvent, Reply};
use crate::{History, Property, Verdict, Violation};
use harbor_types::{IssuerId, LogIndex, ShardId};
use std::collections::HashMap;

pub struct OneOwnerPerBucket;

/// A group's events for one issuer's bucket: (index, event, history line).
type Events = Vec<(LogIndex, BucketEvent, usize)>;

impl Property for OneOwnerPerBucket {
    fn name(&self) -> &'static str {
        "one_owner_per_bucket"
    }

    fn promise(&self) -> &'static str {
        "a group applies no write to a bucket between sealing it and opening it again, \
         nor before it acquires it"
    }

    fn verdict(&self, h: &History) -> Verdict {
        let mut verdict = Verdict::default();
        // (group, issuer) → its bucket's events there, by index.
        let mut events: HashMap<(ShardId, &IssuerId), Events> = HashMap::new();
        for line in h.buckets() {
            let b = &line.value;
            for issuer in &b.issuers {
                events
                    .entry((b.shard, issuer))
                    .or_default()
                    .push((b.at.index, b.event, line.line));
            }
        }
        if events.is_empty() {
            return verdict;
        }
        for list in events.values_mut() {
            list.sort_by_key(|(index, _, line)| (*index, *line));
        }
        for op in h.ops() {
            let at = match op.ok() {
                // A replay's token is the original write's.
                Some(Reply::Reserve { replayed: true, .. }) => None,
                Some(reply) => reply.commit_token(),
                None => op.failed().and_then(|e| e.commit_token),
            };
            let Some(at) = at else { continue };
            let issuer = op.call.issuer();
            let Some(list) = events.get(&(at.shard, issuer)) else {
                continue;
            };
            verdict.items_checked += 1;
            // The last event before the write decides; before the first,
            // the group took the writes if its first event is a seal.
            let before = list.iter().rev().find(|(index, ..)| *index < at.index);
            let taken = match before {
                Some((_, event, _)) => *event == BucketEvent::Opened,
                None => list[0].1 == BucketEvent::Sealed,
            };
            if !taken {
                let why = match before {
                    Some((index, _, line)) => format!("sealed at {index} (line {line})"),
                    None => format!("opened only at {} (line {})", list[0].0, list[0].2),
                };
                let detail = format!(
                    "{} of {issuer} applied at {at}, where its bucket was {why}",
                    op.call.function()
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
    use crate::format::{BucketLine, ReservationStatus};
    use crate::testkit::*;
    use harbor_types::BucketId;

    fn line(shard: u32, event: BucketEvent, at: &str) -> BucketLine {
        BucketLine {
            time_ms: 0,
            bucket: BucketId(7),
            shard: ShardId(shard),
            issuers: vec![issuer("A")],
            event,
            at: ct(at),
        }
    }

    fn script(late_write: &str) -> crate::testkit::Script {
        let mut s = Script::new();
        s.ok("c1", register("A", 100), registered("shard1@g1:1"));
        s.ok(
            "c1",
            reserve("A", "t1", 5),
            reserved("A:r1", ReservationStatus::Confirmed, "shard1@g1:4"),
        );
        s.ok("c1", confirm("A:r1"), confirmed(late_write));
        // Sealed at 5 and opened at 9 in shard 1; acquired at 3 in shard 2.
        s.bucket(line(1, BucketEvent::Sealed, "shard1@g1:5"));
        s.bucket(line(1, BucketEvent::Opened, "shard1@g1:9"));
        s.bucket(line(2, BucketEvent::Opened, "shard2@g1:3"));
        s
    }

    #[test]
    fn writes_outside_a_seal_pass() {
        let verdict = OneOwnerPerBucket.verdict(&script("shard1@g1:10").history());
        assert_eq!(verdict.violations, vec![]);
        assert_eq!(verdict.items_checked, 3);
        let verdict = OneOwnerPerBucket.verdict(&script("shard2@g1:4").history());
        assert_eq!(verdict.violations, vec![]);
    }

    #[test]
    fn a_write_after_the_seal_or_before_the_acquisition_is_caught() {
        for late in ["shard1@g1:7", "shard2@g1:2"] {
            let verdict = OneOwnerPerBucket.verdict(&script(late).history());
            assert_eq!(verdict.violations.len(), 1, "{late}");
            assert!(
                verdict.violations[0]
                    .to_string()
                    .contains("one_owner_per_bucket"),
                "{:?}",
                verdict.violations
            );
        }
    }
}

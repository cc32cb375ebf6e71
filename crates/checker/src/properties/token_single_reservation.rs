//! Promise (DESIGN.md §1, §2): a reservation token is decided once — it never
//! yields two reservations, whether through a first reserve, a replay, a
//! resolve, a token lookup or the final state — and a reservation belongs to
//! exactly one token.

use crate::format::{Call, Reply};
use crate::{History, Property, Verdict, Violation};
use harbor_types::{IssuerId, ReservationId, ReservationToken};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

pub struct TokenSingleReservation;

/// Tokens are scoped per issuer.
type TokenKey = (IssuerId, ReservationToken);

/// Where a token → reservation pairing was seen.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Source {
    Op(u64),
    FinalLine(usize),
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Op(op) => write!(f, "op {op}"),
            Source::FinalLine(line) => write!(f, "final line {line}"),
        }
    }
}

#[derive(Default)]
struct Sightings {
    by_token: BTreeMap<TokenKey, BTreeMap<ReservationId, BTreeSet<Source>>>,
    by_reservation: BTreeMap<ReservationId, BTreeMap<TokenKey, BTreeSet<Source>>>,
}

impl Sightings {
    fn add(&mut self, issuer: &IssuerId, token: &ReservationToken, id: &ReservationId, s: Source) {
        let key = (issuer.clone(), token.clone());
        let ids = self.by_token.entry(key.clone()).or_default();
        ids.entry(id.clone()).or_default().insert(s);
        let keys = self.by_reservation.entry(id.clone()).or_default();
        keys.entry(key).or_default().insert(s);
    }
}

/// "A:r1 (op 3, final line 9); A:r2 (op 7)" and the op ids named.
fn describe<'a>(seen: impl Iterator<Item = (String, &'a BTreeSet<Source>)>) -> (String, Vec<u64>) {
    let mut ops = Vec::new();
    let mut parts = Vec::new();
    for (what, sources) in seen {
        let names: Vec<String> = sources.iter().map(Source::to_string).collect();
        parts.push(format!("{what} ({})", names.join(", ")));
        ops.extend(sources.iter().filter_map(|s| match s {
            Source::Op(op) => Some(*op),
            Source::FinalLine(_) => None,
        }));
    }
    (parts.join("; "), ops)
}

fn token_name((issuer, token): &TokenKey) -> String {
    format!("token {token} of {issuer}")
}

impl Property for TokenSingleReservation {
    fn name(&self) -> &'static str {
        "token_single_reservation"
    }

    fn promise(&self) -> &'static str {
        "a reservation token never yields two reservations, and a reservation has one token"
    }

    fn verdict(&self, h: &History) -> Verdict {
        let mut seen = Sightings::default();
        for op in h.ops() {
            let Some(reply) = op.ok() else { continue };
            let (token, id) = match (&op.call, reply) {
                (Call::Reserve { token, .. }, Reply::Reserve { reservation_id, .. }) => {
                    (token, reservation_id)
                }
                (
                    Call::Resolve { token, .. } | Call::TokenLookup { token, .. },
                    Reply::Resolve {
                        reservation_id: Some(id),
                        ..
                    }
                    | Reply::TokenLookup {
                        reservation_id: Some(id),
                        ..
                    },
                ) => (token, id),
                _ => continue,
            };
            seen.add(op.call.issuer(), token, id, Source::Op(op.id));
        }
        for fin in h.finals() {
            let source = Source::FinalLine(fin.line);
            let issuer = &fin.value.issuer_id;
            for t in &fin.value.tokens {
                if let Some(id) = &t.reservation_id {
                    seen.add(issuer, &t.token, id, source);
                }
            }
            for r in &fin.value.reservations {
                seen.add(issuer, &r.token, &r.reservation_id, source);
            }
        }

        let mut violations = Vec::new();
        for (key, ids) in seen.by_token.iter().filter(|(_, ids)| ids.len() > 1) {
            let (list, ops) = describe(ids.iter().map(|(id, s)| (id.to_string(), s)));
            let detail = format!(
                "{} yielded {} reservations: {list}",
                token_name(key),
                ids.len()
            );
            violations.push(Violation::new(self, detail, ops));
        }
        for (id, keys) in seen.by_reservation.iter().filter(|(_, k)| k.len() > 1) {
            let (list, ops) = describe(keys.iter().map(|(k, s)| (token_name(k), s)));
            let detail = format!(
                "reservation {id} is claimed by {} tokens: {list}",
                keys.len()
            );
            violations.push(Violation::new(self, detail, ops));
        }
        Verdict {
            items_checked: seen.by_token.len(),
            violations,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::*;
    use crate::ReservationStatus::Confirmed;
    use crate::{LookupStatus, TokenStatus};

    /// Reserve, replay after a timeout, look up, resolve: one reservation.
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
            "c2",
            Call::TokenLookup {
                token: token("t2"),
                issuer_id: issuer("A"),
            },
            Reply::TokenLookup {
                status: LookupStatus::Committed,
                reservation_id: Some(rid("A:r2")),
            },
        );
        s
    }

    fn resolved(id: &str) -> Reply {
        Reply::Resolve {
            status: TokenStatus::Committed,
            reservation_id: Some(rid(id)),
            commit_token: None,
        }
    }

    #[test]
    fn one_reservation_per_token_passes() {
        let mut s = script();
        s.ok("c2", resolve("A", "t2"), resolved("A:r2"));
        s.final_state(final_line(
            "A",
            100,
            &[("A:r1", "t1", 10, Confirmed), ("A:r2", "t2", 20, Confirmed)],
            &[],
        ));
        let verdict = TokenSingleReservation.verdict(&s.history());
        assert_eq!(verdict.violations, vec![]);
        assert_eq!(verdict.items_checked, 2);
    }

    #[test]
    fn a_token_resolving_to_a_second_reservation_is_caught() {
        let mut s = script();
        let bad = s.ok("c2", resolve("A", "t2"), resolved("A:r3"));
        let violations = TokenSingleReservation.check(&s.history());
        assert_eq!(violations.len(), 1, "{violations:?}");
        assert!(violations[0].detail.contains("A:r2") && violations[0].detail.contains("A:r3"));
        assert!(violations[0].ops.contains(&bad));
    }

    #[test]
    fn a_duplicate_reservation_in_the_final_state_is_caught() {
        let mut s = script();
        // The replay after the timeout applied the reserve a second time.
        s.final_state(final_line(
            "A",
            100,
            &[
                ("A:r1", "t1", 10, Confirmed),
                ("A:r2", "t2", 20, Confirmed),
                ("A:r3", "t2", 20, Confirmed),
            ],
            &[],
        ));
        let violations = TokenSingleReservation.check(&s.history());
        assert_eq!(violations.len(), 1, "{violations:?}");
        assert!(violations[0].detail.contains("token t2 of A yielded 2"));
    }

    #[test]
    fn a_reservation_claimed_by_two_tokens_is_caught() {
        let mut s = script();
        s.ok(
            "c3",
            reserve("A", "t3", 5),
            reserved("A:r1", Confirmed, "shard1@g1:4"),
        );
        let violations = TokenSingleReservation.check(&s.history());
        assert_eq!(violations.len(), 1, "{violations:?}");
        assert!(violations[0]
            .detail
            .contains("reservation A:r1 is claimed by 2 tokens"));
    }
}

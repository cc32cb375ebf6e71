//! A realistic mixed history — four clients, two issuers on two shards, a
//! leader change, a replay after a timeout, an outcome-unknown confirm, a
//! replayed rejection, session, causal, bounded and strong reads, a client
//! that crashed mid-operation, a bucket sealed and opened again — passes every property; small edits that break
//! one promise are caught by that property.

use harbor_checker::{all_properties, check, History, HistoryLine};

const MIXED: &str = include_str!("data/mixed.jsonl");

#[test]
fn the_mixed_history_keeps_every_promise() {
    let h = History::parse(MIXED).unwrap();
    assert_eq!(h.ops().len(), 23);
    let report = check(&h);
    assert!(report.is_ok(), "{report}");
    let names: Vec<&str> = all_properties().iter().map(|p| p.name()).collect();
    let checked: Vec<&str> = report.checked.iter().map(|(name, _)| *name).collect();
    assert_eq!(checked, names);
    for (name, items) in &report.checked {
        assert!(*items > 0, "{name} examined nothing:\n{report}");
    }
}

#[test]
fn the_mixed_history_round_trips_through_history_lines() {
    let lines: Vec<HistoryLine> = MIXED
        .lines()
        .map(|l| HistoryLine::from_json(l).unwrap())
        .collect();
    let rewritten: Vec<String> = lines.iter().map(HistoryLine::to_json).collect();
    let again = History::parse(&rewritten.join("\n")).unwrap();
    let direct = History::from_lines(lines).unwrap();
    assert_eq!(again.ops(), History::parse(MIXED).unwrap().ops());
    assert_eq!(again.ops(), direct.ops());
}

/// Replaces one exact piece of the fixture, which must occur once.
fn broken(from: &str, to: &str) -> History {
    assert_eq!(MIXED.matches(from).count(), 1, "{from}");
    History::parse(&MIXED.replace(from, to)).unwrap()
}

fn violated(h: &History) -> Vec<&'static str> {
    check(h).violations.iter().map(|v| v.property).collect()
}

#[test]
fn breaking_the_mixed_history_on_purpose_is_caught() {
    // The last strong read is served by a deposed leader.
    let stale_strong = broken(
        r#""reserved":600,"applied":"shard3@g2:8""#,
        r#""reserved":600,"applied":"shard3@g1:4""#,
    );
    assert_eq!(violated(&stale_strong), ["strong_reads_not_stale"]);

    // The converged state lost c2's confirmation.
    let lost_confirm = broken(
        r#""amount":500,"status":"confirmed""#,
        r#""amount":500,"status":"expired""#,
    );
    assert!(violated(&lost_confirm).contains(&"acknowledged_writes_survive"));

    // A follower answered a session read without c2's own write.
    let no_ryw = broken(
        r#""applied":"shard3@g1:3","stale":false,"staleness_ms":30"#,
        r#""applied":"shard3@g1:2","stale":false,"staleness_ms":30"#,
    );
    assert!(violated(&no_ryw).contains(&"session_reads"));

    // A bounded read 800 ms behind claims to be fresh under a 500 ms budget.
    let over_budget = broken(
        r#""consistency":"bounded"}"#,
        r#""consistency":"bounded","max_staleness_ms":500}"#,
    );
    assert_eq!(violated(&over_budget), ["bounded_reads"]);

    // CABIN-12's group took a write while its bucket was sealed.
    let after_seal = broken(
        r#""event":"sealed","at":"shard5@g1:4""#,
        r#""event":"sealed","at":"shard5@g1:2""#,
    );
    assert_eq!(violated(&after_seal), ["one_owner_per_bucket"]);
}

//! The seeded sweep CI runs, and the proof that the checker catches each
//! protocol bug the simulator can switch on.

use harbor_sim::{run, SimOptions};
use harbor_types::sim::Bugs;

/// Seeds in the CI sweep; `HARBOR_SIM_SEEDS` changes it (long sweeps use the
/// `harbor verify sim --seeds N` command instead).
fn sweep_seeds() -> u64 {
    std::env::var("HARBOR_SIM_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(500)
}

#[test]
fn the_same_seed_gives_the_same_history() {
    let a = run(SimOptions::new(42));
    let b = run(SimOptions::new(42));
    assert_eq!(a.history, b.history);
    assert!(a.stats.ops > 50, "too little happened: {:?}", a.stats);
    assert!(
        a.stats.ok > a.stats.ops / 4,
        "most operations failed: {:?}",
        a.stats
    );
}

#[test]
fn a_seeded_sweep_under_faults_finds_no_violation() {
    let seeds = sweep_seeds();
    let mut totals = harbor_sim::SimStats::default();
    let mut probes = std::collections::HashMap::new();
    for seed in 1..=seeds {
        let outcome = run(SimOptions::new(seed));
        assert!(
            outcome.violations.is_empty(),
            "seed {seed}: {:#?}\nreplay: cargo run --release -- verify sim --seed {seed} --history-dir /tmp",
            outcome.violations
        );
        totals.ops += outcome.stats.ops;
        for (name, hits) in outcome.probes {
            *probes.entry(name).or_insert(0u64) += hits;
        }
        totals.ok += outcome.stats.ok;
        totals.info += outcome.stats.info;
        totals.crashes += outcome.stats.crashes;
        totals.failovers += outcome.stats.failovers;
        totals.partitions += outcome.stats.partitions;
        totals.fsync_failures += outcome.stats.fsync_failures;
        totals.batches += outcome.stats.batches;
    }
    // The sweep must actually exercise the faults it claims to, and many
    // operations must still succeed (a broken client path fails them all,
    // which no safety property notices; many reserves are refused for
    // exposure by design).
    assert!(totals.ok > totals.ops / 4, "{totals:?}");
    assert!(totals.crashes > seeds / 2, "{totals:?}");
    assert!(totals.failovers > 0, "{totals:?}");
    assert!(totals.partitions > seeds, "{totals:?}");
    assert!(totals.fsync_failures > 0, "{totals:?}");
    assert!(totals.batches > seeds, "{totals:?}");
    assert!(
        totals.info > 0,
        "no operation ever had an unknown outcome: {totals:?}"
    );
    // The rare branches must have run: every coverage probe, counted per
    // run and summed here.
    let missed: Vec<&str> = harbor_types::sim::PROBES
        .iter()
        .filter(|p| probes.get(*p).copied().unwrap_or(0) == 0)
        .copied()
        .collect();
    assert!(missed.is_empty(), "probes that never ran: {missed:?}");
    println!("{seeds} seeds, 0 violations: {totals:?}");
}

fn caught_within(bug: &str, seeds: u64) -> Option<(u64, Vec<String>)> {
    let bugs = Bugs::named(bug).unwrap();
    (1..=seeds).find_map(|seed| {
        let mut options = SimOptions::new(seed);
        options.bugs = bugs;
        let outcome = run(options);
        (!outcome.violations.is_empty()).then_some((seed, outcome.violations))
    })
}

#[test]
fn every_protocol_bug_is_caught() {
    let seeds = sweep_seeds();
    for bug in Bugs::NAMES {
        let found = caught_within(bug, seeds);
        assert!(found.is_some(), "bug {bug} was not caught in {seeds} seeds");
        let (seed, violations) = found.unwrap();
        println!("{bug}: caught at seed {seed}: {}", violations[0]);
    }
}

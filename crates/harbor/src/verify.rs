//! `harbor verify`: the simulator's seed sweep and the history checker.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context};
use harbor_sim::{run, SimOptions};
use harbor_types::sim::{Bugs, PROBES};

/// Returns whether every seed was clean.
pub fn sim(
    seeds: Option<u64>,
    seed: Option<u64>,
    bug: Option<String>,
    history_dir: Option<PathBuf>,
    safety_ms: u64,
) -> anyhow::Result<bool> {
    let bugs = match &bug {
        Some(name) => Bugs::named(name).map_err(anyhow::Error::msg)?,
        None => Bugs::none(),
    };
    let (first, count) = match (seed, seeds) {
        (Some(s), None) => (s, 1),
        (s, Some(n)) => (s.unwrap_or(1), n),
        (None, None) => bail!("say how many seeds (--seeds N) or which one (--seed S)"),
    };
    if count == 0 {
        bail!("--seeds must be at least 1");
    }
    if let Some(dir) = &history_dir {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    // A failed assertion inside the cluster is a finding, not a crash of
    // this command: keep its message for the report, not on the terminal.
    std::panic::set_hook(Box::new(|_| {}));
    let started = Instant::now();
    let mut last_progress = Instant::now();
    let mut failing = Vec::new();
    let mut ops = 0;
    let mut probes: std::collections::HashMap<&str, u64> = std::collections::HashMap::new();
    for (n, seed) in (first..first + count).enumerate() {
        let mut options = SimOptions::new(seed);
        options.bugs = bugs;
        options.safety_ms = safety_ms;
        let outcome = run(options);
        ops += outcome.stats.ops;
        for (name, hits) in &outcome.probes {
            *probes.entry(name).or_default() += hits;
        }
        if count == 1 {
            println!("seed {seed}: {:?}", outcome.stats);
            if let Some(dir) = &history_dir {
                let path = dir.join(format!("seed-{seed}.jsonl"));
                std::fs::write(&path, &outcome.history)?;
                println!("  history: {}", path.display());
            }
        }
        if !outcome.violations.is_empty() {
            println!(
                "seed {seed}: {} violation(s); {} ops, {} crashes, {} failovers, {} transfers, {} partitions, {} fsync failures",
                outcome.violations.len(),
                outcome.stats.ops,
                outcome.stats.crashes,
                outcome.stats.failovers,
                outcome.stats.transfers,
                outcome.stats.partitions,
                outcome.stats.fsync_failures
            );
            for v in outcome.violations.iter().take(5) {
                println!("  - {v}");
            }
            if let (Some(dir), true) = (&history_dir, count > 1) {
                let path = dir.join(format!("seed-{seed}.jsonl"));
                std::fs::write(&path, &outcome.history)?;
                println!("  history: {}", path.display());
            }
            println!(
                "  replay: harbor verify sim --seed {seed}{}",
                bug.as_ref()
                    .map(|b| format!(" --bug {b}"))
                    .unwrap_or_default()
            );
            failing.push(seed);
        }
        let done = n as u64 + 1;
        if last_progress.elapsed().as_secs() >= 2 || done == count {
            last_progress = Instant::now();
            eprintln!(
                "[{done}/{count}] seeds, {} failing, {ops} client ops, {:.1} seeds/s",
                failing.len(),
                done as f64 / started.elapsed().as_secs_f64()
            );
        }
    }
    let _ = std::panic::take_hook();
    let hits: Vec<(&str, u64)> = PROBES.iter().map(|p| (*p, probes[p])).collect();
    let missed: Vec<&str> = hits
        .iter()
        .filter(|(_, h)| *h == 0)
        .map(|(n, _)| *n)
        .collect();
    println!(
        "coverage probes hit: {}/{}",
        hits.len() - missed.len(),
        hits.len()
    );
    for (name, hits) in &hits {
        println!("  {hits:>8}  {name}");
    }
    println!("{count} seeds, {} violations", failing.len());
    Ok(failing.is_empty())
}

pub fn check(path: &Path) -> anyhow::Result<bool> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let history = harbor_checker::History::parse(&text).map_err(|e| anyhow::anyhow!("{e}"))?;
    let report = harbor_checker::check(&history);
    for violation in &report.violations {
        println!("- {violation}");
    }
    println!("{} violations", report.violations.len());
    Ok(report.violations.is_empty())
}

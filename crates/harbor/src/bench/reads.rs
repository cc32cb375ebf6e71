//! `harbor bench reads` measures what follower reads buy a remote region: bounded
//! reads issued through the reader gateway (a region that is not the
//! issuers' home) against strong reads of the same issuers, which cross the
//! WAN to the leader; once at rest and once while writers load the home
//! region. It reports the share of bounded reads served by a local replica
//! and the latency of each kind.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use hdrhistogram::Histogram;
use serde::Serialize;
use serde_json::{json, Value};

use super::{micros, BenchCluster, Latency};

/// What `harbor bench reads` does.
#[derive(Clone, Debug)]
pub struct ReadsOptions {
    /// The gateway reads go through; `None`: start a dev cluster and use
    /// its `madrid` gateway.
    pub reader: Option<String>,
    /// A gateway in the issuers' home region, for the writers.
    pub writer: Option<String>,
    pub home_region: String,
    pub issuers: usize,
    /// Concurrent readers of each kind (bounded and strong).
    pub readers: usize,
    /// Concurrent writers in the loaded phase.
    pub writers: usize,
    pub phase_secs: u64,
    pub max_staleness_ms: u64,
    pub json: Option<PathBuf>,
}

#[derive(Serialize)]
struct PhaseReport {
    phase: &'static str,
    seconds: f64,
    bounded_reads: u64,
    /// Served by a replica in the reader's region (`fallback: false`).
    bounded_local: u64,
    bounded_local_share: f64,
    bounded_fallback: u64,
    bounded_stale: u64,
    bounded_local_latency: Latency,
    bounded_fallback_latency: Latency,
    strong_cross_region_latency: Latency,
    writes: u64,
    writes_per_sec: f64,
    write_latency: Latency,
    errors: u64,
}

/// Everything one phase recorded.
struct Recorder {
    bounded_local: Histogram<u64>,
    bounded_fallback: Histogram<u64>,
    strong: Histogram<u64>,
    writes: Histogram<u64>,
    stale: u64,
    errors: u64,
}

impl Recorder {
    fn new() -> Recorder {
        let h = super::histogram;
        Recorder {
            bounded_local: h(),
            bounded_fallback: h(),
            strong: h(),
            writes: h(),
            stale: 0,
            errors: 0,
        }
    }
}

pub async fn reads(options: ReadsOptions) -> anyhow::Result<()> {
    let mut dev = None;
    let (reader, writer) = match (&options.reader, &options.writer) {
        (Some(r), Some(w)) => (
            r.trim_end_matches('/').to_string(),
            w.trim_end_matches('/').to_string(),
        ),
        (None, None) => {
            let started = BenchCluster::start(|_| {}).await?;
            let urls = (
                started.cluster.url("madrid"),
                started.cluster.url(&options.home_region),
            );
            dev = Some(started);
            urls
        }
        _ => bail!("give both --reader and --writer, or neither (a dev cluster is started)"),
    };
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .pool_max_idle_per_host(256)
        .build()?;
    let issuers: Vec<String> = (0..options.issuers)
        .map(|i| format!("BENCH-{}-{i}", options.home_region.to_uppercase()))
        .collect();
    super::register_issuers(&http, &writer, &issuers, &options.home_region).await?;
    let mut reports = Vec::new();
    for (phase, writers) in [("at rest", 0), ("under load", options.writers)] {
        let report = phase_run(&http, &options, &reader, &writer, &issuers, phase, writers).await;
        print_phase(&report, &options);
        reports.push(report);
    }
    if let Some(path) = &options.json {
        let doc = json!({
            "command": std::env::args().collect::<Vec<_>>().join(" "),
            "reader": reader, "writer": writer, "home_region": options.home_region,
            "issuers": options.issuers, "readers": options.readers, "writers": options.writers,
            "max_staleness_ms": options.max_staleness_ms,
            "phases": reports,
        });
        std::fs::write(path, serde_json::to_string_pretty(&doc)? + "\n")
            .with_context(|| format!("writing {}", path.display()))?;
        eprintln!("results written to {}", path.display());
    }
    if let Some(dev) = dev {
        dev.stop().await;
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
async fn phase_run(
    http: &reqwest::Client,
    options: &ReadsOptions,
    reader: &str,
    writer: &str,
    issuers: &[String],
    phase: &'static str,
    writers: usize,
) -> PhaseReport {
    let recorder = Arc::new(Mutex::new(Recorder::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    let started = Instant::now();
    for n in 0..options.readers * 2 {
        let strong = n % 2 == 1;
        let url = if strong {
            format!("{reader}/v1/issuers/{{}}?consistency=strong")
        } else {
            format!(
                "{reader}/v1/issuers/{{}}?consistency=bounded&max_staleness_ms={}",
                options.max_staleness_ms
            )
        };
        let (http, recorder, stop, done) =
            (http.clone(), recorder.clone(), stop.clone(), done.clone());
        let issuers = issuers.to_vec();
        tasks.push(tokio::spawn(async move {
            let mut i = n;
            while !stop.load(Ordering::Relaxed) {
                i = (i + 7) % issuers.len();
                let t = Instant::now();
                let answer = get_json(&http, &url.replace("{}", &issuers[i])).await;
                let took = micros(t.elapsed());
                let mut r = recorder.lock().unwrap();
                match answer {
                    Some(_) if strong => {
                        let _ = r.strong.record(took);
                    }
                    Some(body) => {
                        if body["stale"] == true {
                            r.stale += 1;
                        }
                        let _ = if body["fallback"] == true {
                            r.bounded_fallback.record(took)
                        } else {
                            r.bounded_local.record(took)
                        };
                    }
                    None => r.errors += 1,
                }
                done.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    for n in 0..writers {
        let (http, recorder, stop, done) =
            (http.clone(), recorder.clone(), stop.clone(), done.clone());
        let issuers = issuers.to_vec();
        let url = format!("{writer}/v1/reservations");
        let run = std::process::id();
        tasks.push(tokio::spawn(async move {
            let mut k = 0u64;
            while !stop.load(Ordering::Relaxed) {
                k += 1;
                let issuer = &issuers[(n + k as usize * 13) % issuers.len()];
                let body = json!({"reservation_token": format!("bench-{run}-{n}-{k}"),
                                  "issuer_id": issuer, "amount": 1, "desk": "bench", "trader": "bench"});
                let t = Instant::now();
                let ok = http
                    .post(&url)
                    .json(&body)
                    .send()
                    .await
                    .is_ok_and(|a| a.status().is_success());
                let took = micros(t.elapsed());
                let mut r = recorder.lock().unwrap();
                if ok {
                    let _ = r.writes.record(took);
                } else {
                    r.errors += 1;
                }
                done.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    let length = Duration::from_secs(options.phase_secs);
    while started.elapsed() < length {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let r = recorder.lock().unwrap();
        let bounded = r.bounded_local.len() + r.bounded_fallback.len();
        eprintln!(
            "[{phase} {:>3.0}s/{}s] {} ops; bounded reads {} ({} local), strong reads {}, writes {}, errors {}",
            started.elapsed().as_secs_f64(),
            options.phase_secs,
            done.load(Ordering::Relaxed),
            bounded,
            r.bounded_local.len(),
            r.strong.len(),
            r.writes.len(),
            r.errors
        );
    }
    stop.store(true, Ordering::Relaxed);
    for task in tasks {
        let _ = task.await;
    }
    let seconds = started.elapsed().as_secs_f64();
    let r = recorder.lock().unwrap();
    let bounded = r.bounded_local.len() + r.bounded_fallback.len();
    PhaseReport {
        phase,
        seconds,
        bounded_reads: bounded,
        bounded_local: r.bounded_local.len(),
        bounded_local_share: r.bounded_local.len() as f64 / bounded.max(1) as f64,
        bounded_fallback: r.bounded_fallback.len(),
        bounded_stale: r.stale,
        bounded_local_latency: Latency::of(&r.bounded_local),
        bounded_fallback_latency: Latency::of(&r.bounded_fallback),
        strong_cross_region_latency: Latency::of(&r.strong),
        writes: r.writes.len(),
        writes_per_sec: r.writes.len() as f64 / seconds,
        write_latency: Latency::of(&r.writes),
        errors: r.errors,
    }
}

async fn get_json(http: &reqwest::Client, url: &str) -> Option<Value> {
    let answer = http.get(url).send().await.ok()?;
    if !answer.status().is_success() {
        return None;
    }
    answer.json().await.ok()
}

fn print_phase(report: &PhaseReport, options: &ReadsOptions) {
    println!(
        "\n{} ({:.0} s, {} readers of each kind, {} writers in {})",
        report.phase,
        report.seconds,
        options.readers,
        if report.phase == "at rest" {
            0
        } else {
            options.writers
        },
        options.home_region
    );
    println!(
        "  bounded reads (max_staleness_ms={}): {} — {:.1}% served locally, {} by the leader, {} flagged stale",
        options.max_staleness_ms,
        report.bounded_reads,
        100.0 * report.bounded_local_share,
        report.bounded_fallback,
        report.bounded_stale
    );
    println!(
        "  {:<34} {:>8} {:>9} {:>9} {:>9} {:>9}",
        "latency (ms)", "count", "p50", "p99", "p99.9", "max"
    );
    for (name, l) in [
        ("bounded, local replica", &report.bounded_local_latency),
        (
            "bounded, fell back to the leader",
            &report.bounded_fallback_latency,
        ),
        (
            "strong, cross-region leader",
            &report.strong_cross_region_latency,
        ),
        ("writes (home region)", &report.write_latency),
    ] {
        if l.count > 0 {
            println!(
                "  {:<34} {:>8} {:>9.2} {:>9.2} {:>9.2} {:>9.2}",
                name, l.count, l.p50_ms, l.p99_ms, l.p999_ms, l.max_ms
            );
        }
    }
    if report.writes > 0 {
        println!("  writes: {:.0}/s", report.writes_per_sec);
    }
    if report.errors > 0 {
        println!("  errors: {}", report.errors);
    }
}

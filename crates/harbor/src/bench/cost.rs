//! `harbor bench cost`: what reservations cost in memory and on disk, and
//! how restart time grows with the log.
//!
//! Loads reservations through the batch API, in steps, into a dev cluster it
//! starts (a leader and one synchronous follower per group, as
//! `bench/compare` runs Harbor). After each step it measures the process's
//! resident memory and the bytes on disk, then restarts every node (stop,
//! then start until every group's leader is ready) and checks that the
//! restarted cluster holds exactly the reservations it acknowledged.
//!
//! Everything runs in this one process, so memory and disk count every
//! replica of every group: divide by the replicas per group for one copy.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use harbor_wire::{Query, QueryResult, Request, Response};
use serde::Serialize;
use serde_json::{json, Value};

use super::workload::register_issuers;
use super::BenchCluster;

/// The flags of `harbor bench cost`.
#[derive(Clone, Debug, clap::Args)]
pub struct CostOptions {
    /// Reservations loaded in all.
    #[arg(long, default_value_t = 1_000_000)]
    pub reservations: u64,
    /// Measure and restart after each of this many equal steps.
    #[arg(long, default_value_t = 4)]
    pub steps: u64,
    #[arg(long, default_value_t = 1000)]
    pub issuers: usize,
    /// Reservations per batch request.
    #[arg(long, default_value_t = 1000)]
    pub batch: usize,
    /// Batch requests in flight.
    #[arg(long, default_value_t = 8)]
    pub clients: usize,
    #[arg(long, default_value_t = 8)]
    pub groups_per_region: usize,
    /// Also write the results as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// The replicas of each group: the leader and one synchronous follower.
const REPLICAS_PER_GROUP: u64 = 2;

#[derive(Clone, Copy, Default, Serialize)]
struct Disk {
    /// Records in WAL segments.
    wal_bytes: u64,
    /// Zeros written ahead of each active segment's end (the WAL's
    /// `preallocate_bytes`, per replica): room, not data.
    preallocated_bytes: u64,
    snapshot_bytes: u64,
    /// The metadata plane's Raft log and state, hard states, anything else.
    other_bytes: u64,
}

impl Disk {
    /// Bytes of data, preallocated zeros left out.
    fn total(&self) -> u64 {
        self.wal_bytes + self.snapshot_bytes + self.other_bytes
    }
}

#[derive(Serialize)]
struct Step {
    /// Acknowledged so far.
    reservations: u64,
    load_seconds: f64,
    /// Entries in every group's log (leaders), snapshotted or not.
    log_entries: u64,
    rss_bytes: u64,
    disk: Disk,
    stop_seconds: f64,
    /// Until every group's leader is ready again.
    restart_seconds: f64,
    rss_after_restart_bytes: u64,
}

#[derive(Serialize)]
struct Report {
    command: String,
    issuers: usize,
    groups: usize,
    replicas_per_group: u64,
    batch: usize,
    baseline_rss_bytes: u64,
    baseline_disk: Disk,
    steps: Vec<Step>,
    /// Whole process (every replica), per million reservations.
    rss_bytes_per_million: f64,
    disk_bytes_per_million: f64,
    errors: BTreeMap<String, u64>,
}

pub async fn cost(options: CostOptions) -> anyhow::Result<()> {
    if options.reservations == 0 || options.steps == 0 || options.issuers == 0 {
        bail!("--reservations, --steps and --issuers must be at least 1");
    }
    if options.clients == 0 || options.batch == 0 {
        bail!("--clients and --batch must be at least 1");
    }
    if options.batch > harbor_reservation::BATCH_COMMANDS_MAX {
        bail!(
            "--batch is at most {}",
            harbor_reservation::BATCH_COMMANDS_MAX
        );
    }
    if !(1..=64).contains(&options.groups_per_region) {
        bail!("--groups-per-region must be 1 to 64");
    }
    if rss_bytes().is_none() {
        bail!("resident memory is read from /proc/self/status, which this system lacks");
    }
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()?;
    let bench = BenchCluster::start(|dev| {
        dev.wan_delay_ms = 0;
        dev.topology.local_replicas = REPLICAS_PER_GROUP as usize;
        dev.topology.remote_replicas = 0;
        dev.topology.groups_per_region = options.groups_per_region;
    })
    .await?;
    // Restarts replace the cluster; a failed one has removed its data.
    let mut slot = Some(bench);
    let result = measure(&mut slot, &http, &options).await;
    if let Some(bench) = slot {
        bench.stop().await;
    }
    let report = result?;
    print_report(&report);
    if let Some(path) = &options.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)? + "\n")
            .with_context(|| format!("writing {}", path.display()))?;
        eprintln!("results written to {}", path.display());
    }
    Ok(())
}

async fn measure(
    slot: &mut Option<BenchCluster>,
    http: &reqwest::Client,
    options: &CostOptions,
) -> anyhow::Result<Report> {
    let mut bench = slot.as_ref().expect("a running cluster");
    let region = bench.cluster.gateways[0].region.to_string();
    let issuers: Vec<String> = (0..options.issuers)
        .map(|i| format!("C-{}-{i}", region.to_uppercase()))
        .collect();
    register_issuers(http, &bench.cluster.gateways[0].url(), &region, &issuers).await?;
    let groups = bench.cluster.map.groups.len();
    let baseline_rss_bytes = rss_bytes().unwrap_or(0);
    let baseline_disk = disk(bench.dir())?;
    let run = format!("{:x}", std::process::id());
    let mut steps = Vec::new();
    let mut errors = BTreeMap::new();
    let mut acknowledged = 0;
    for step in 0..options.steps {
        let from = options.reservations * step / options.steps;
        let goal = options.reservations * (step + 1) / options.steps;
        let url = bench.cluster.gateways[0].url();
        let started = Instant::now();
        eprintln!(
            "step {} of {}: loading to {goal} reservations ...",
            step + 1,
            options.steps
        );
        let loaded = load(http, &url, &issuers, &run, from, goal, options, &mut errors).await?;
        acknowledged += loaded;
        let load_seconds = started.elapsed().as_secs_f64();
        let log_entries = log_entries(bench).await?;
        let rss = rss_bytes().unwrap_or(0);
        let on_disk = disk(bench.dir())?;
        eprintln!(
            "  {acknowledged} reservations in {load_seconds:.1} s; {log_entries} log entries; RSS {:.0} MiB; disk {:.0} MiB; restarting ...",
            mib(rss),
            mib(on_disk.total())
        );
        let (restarted, restart) = slot.take().expect("a running cluster").restart().await?;
        bench = slot.insert(restarted);
        let held = held(http, &bench.cluster.gateways[0].url(), &issuers).await?;
        if held != acknowledged {
            bail!("after the restart the issuers hold {held} reservations; {acknowledged} were acknowledged");
        }
        eprintln!(
            "  stopped in {:.2} s, ready again in {:.2} s, holding all {held}",
            restart.stop.as_secs_f64(),
            restart.start.as_secs_f64()
        );
        steps.push(Step {
            reservations: acknowledged,
            load_seconds,
            log_entries,
            rss_bytes: rss,
            disk: on_disk,
            stop_seconds: restart.stop.as_secs_f64(),
            restart_seconds: restart.start.as_secs_f64(),
            rss_after_restart_bytes: rss_bytes().unwrap_or(0),
        });
    }
    let last = steps.last().expect("at least one step");
    let per_million = |now: u64, then: u64| {
        now.saturating_sub(then) as f64 * 1e6 / last.reservations.max(1) as f64
    };
    Ok(Report {
        command: std::env::args().collect::<Vec<_>>().join(" "),
        issuers: options.issuers,
        groups,
        replicas_per_group: REPLICAS_PER_GROUP,
        batch: options.batch,
        baseline_rss_bytes,
        baseline_disk,
        rss_bytes_per_million: per_million(last.rss_bytes, baseline_rss_bytes),
        disk_bytes_per_million: per_million(last.disk.total(), baseline_disk.total()),
        steps,
        errors,
    })
}

/// Sends reservations numbered `from..goal` (one per issuer in turn, each
/// of amount 1) as batches from `options.clients` tasks; returns how many
/// were acknowledged. Refused items are counted in `errors`; a request that
/// fails as a whole stops the benchmark, since its items may or may not
/// have committed and the restart check could not tell.
#[allow(clippy::too_many_arguments)]
async fn load(
    http: &reqwest::Client,
    url: &str,
    issuers: &[String],
    run: &str,
    from: u64,
    goal: u64,
    options: &CostOptions,
    errors: &mut BTreeMap<String, u64>,
) -> anyhow::Result<u64> {
    let next = Arc::new(AtomicU64::new(from));
    let done = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let issuers = Arc::new(issuers.to_vec());
    let ticker = {
        let (done, stop) = (done.clone(), stop.clone());
        tokio::spawn(async move {
            let mut last = 0;
            while !stop.load(Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let now = done.load(Ordering::Relaxed);
                eprintln!("  {} reservations/s, {now} this step", now - last);
                last = now;
            }
        })
    };
    let mut tasks = Vec::new();
    for _ in 0..options.clients {
        let (http, url, issuers, run) = (
            http.clone(),
            url.to_string(),
            issuers.clone(),
            run.to_string(),
        );
        let (next, done, batch) = (next.clone(), done.clone(), options.batch as u64);
        tasks.push(tokio::spawn(async move {
            let mut reserved = 0;
            let mut errors: BTreeMap<String, u64> = BTreeMap::new();
            loop {
                let start = next.fetch_add(batch, Ordering::Relaxed);
                if start >= goal {
                    return Ok::<_, anyhow::Error>((reserved, errors));
                }
                let items: Vec<Value> = (start..goal.min(start + batch))
                    .map(|seq| {
                        json!({
                            "reservation_token": format!("cost-{run}-{seq}"),
                            "issuer_id": issuers[(seq % issuers.len() as u64) as usize],
                            "amount": 1,
                            "desk": "bench",
                            "trader": "bench",
                        })
                    })
                    .collect();
                let answer = http
                    .post(format!("{url}/v1/reservations:batch"))
                    .json(&json!({ "reservations": items }))
                    .send()
                    .await
                    .context("a batch request failed")?;
                let status = answer.status();
                let body: Value = answer.json().await.context("a batch answer")?;
                if !status.is_success() {
                    bail!("a batch request was refused: {status} {body}");
                }
                let ok = body["reserved"].as_u64().unwrap_or(0);
                for item in body["results"].as_array().into_iter().flatten() {
                    if item["ok"] != true {
                        let code = item["error"].as_str().unwrap_or("unknown");
                        *errors.entry(code.to_string()).or_default() += 1;
                    }
                }
                reserved += ok;
                done.fetch_add(ok, Ordering::Relaxed);
            }
        }));
    }
    let mut loaded = 0;
    let mut failure = None;
    for task in tasks {
        match task.await? {
            Ok((reserved, mine)) => {
                loaded += reserved;
                for (code, n) in mine {
                    *errors.entry(code).or_default() += n;
                }
            }
            Err(e) => failure = Some(e),
        }
    }
    stop.store(true, Ordering::Relaxed);
    let _ = ticker.await;
    match failure {
        Some(e) => Err(e),
        None => Ok(loaded),
    }
}

/// Entries in the logs of every group's leader.
async fn log_entries(bench: &BenchCluster) -> anyhow::Result<u64> {
    let gateway = &bench.cluster.gateways[0].gateway;
    let mut entries = 0;
    for shard in bench.cluster.map.groups.keys() {
        match gateway
            .call(Request::Read {
                shard: *shard,
                query: Query::Status,
            })
            .await
        {
            Ok(Response::Read {
                result: QueryResult::Status(status),
                ..
            }) => entries += status.replica.last_index.0,
            other => bail!("the status of {shard}: {other:?}"),
        }
    }
    Ok(entries)
}

/// The sum of the issuers' reserved amounts: with amount 1 each, the number
/// of reservations the cluster holds. Strong reads, from the leaders.
async fn held(http: &reqwest::Client, url: &str, issuers: &[String]) -> anyhow::Result<u64> {
    let reading = issuers.chunks(64).map(|chunk| async move {
        let mut sum = 0;
        for issuer in chunk {
            let answer = http
                .get(format!("{url}/v1/issuers/{issuer}?consistency=strong"))
                .send()
                .await?;
            let status = answer.status();
            let body: Value = answer.json().await?;
            if !status.is_success() {
                bail!("reading {issuer}: {status} {body}");
            }
            sum += body["reserved"].as_u64().unwrap_or(0);
        }
        Ok(sum)
    });
    let mut held = 0;
    for sum in futures::future::join_all(reading).await {
        held += sum?;
    }
    Ok(held)
}

/// Zero bytes counted as the last record's rather than as preallocated room
/// (a payload may end in zeros): the count is off by at most this much per
/// segment.
const RECORD_TAIL_ZEROS_MAX: usize = 32;

/// Bytes of every file under `dir`, by kind.
fn disk(dir: &Path) -> anyhow::Result<Disk> {
    let mut disk = Disk::default();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in
            std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))?
        {
            let entry = entry?;
            let meta = entry.metadata()?;
            if meta.is_dir() {
                pending.push(entry.path());
                continue;
            }
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.starts_with("wal-") && name.ends_with(".seg") {
                // Zeros past the last non-zero byte are preallocated room,
                // but for the few the last record itself may end with.
                let bytes = std::fs::read(entry.path())?;
                let data = bytes.iter().rposition(|b| *b != 0).map_or(0, |i| i + 1);
                let zeros = (bytes.len() - data).saturating_sub(RECORD_TAIL_ZEROS_MAX) as u64;
                disk.wal_bytes += meta.len() - zeros;
                disk.preallocated_bytes += zeros;
            } else if name.starts_with("snapshot-") {
                disk.snapshot_bytes += meta.len();
            } else {
                disk.other_bytes += meta.len();
            }
        }
    }
    Ok(disk)
}

/// This process's resident memory (Linux).
fn rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

fn print_report(report: &Report) {
    println!(
        "\n{} issuers, {} groups of {} replicas (all in this process), batches of {}",
        report.issuers, report.groups, report.replicas_per_group, report.batch
    );
    println!(
        "  baseline: RSS {:.0} MiB, disk {:.1} MiB",
        mib(report.baseline_rss_bytes),
        mib(report.baseline_disk.total())
    );
    println!(
        "  {:>12} {:>11} {:>8} {:>9} {:>9} {:>9} {:>9} {:>8} {:>10}",
        "reservations",
        "log entries",
        "RSS MiB",
        "WAL MiB",
        "snap MiB",
        "data MiB",
        "zeros MiB",
        "stop s",
        "restart s"
    );
    for s in &report.steps {
        println!(
            "  {:>12} {:>11} {:>8.0} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>8.2} {:>10.2}",
            s.reservations,
            s.log_entries,
            mib(s.rss_bytes),
            mib(s.disk.wal_bytes),
            mib(s.disk.snapshot_bytes),
            mib(s.disk.total()),
            mib(s.disk.preallocated_bytes),
            s.stop_seconds,
            s.restart_seconds
        );
    }
    let copies = report.replicas_per_group as f64;
    println!(
        "  per million reservations: memory {:.0} MiB ({:.0} MiB per copy), disk {:.0} MiB ({:.0} MiB per copy)",
        mib(report.rss_bytes_per_million as u64),
        mib(report.rss_bytes_per_million as u64) / copies,
        mib(report.disk_bytes_per_million as u64),
        mib(report.disk_bytes_per_million as u64) / copies,
    );
    super::print_errors("refused items", &report.errors);
}

//! `harbor bench moves`: the write pause of a bucket move under a steady
//! write load on the bucket being moved. Writers reserve against one hot
//! issuer (each write retried with its own token until it has a definite
//! answer, as a client does); meanwhile the bucket moves back and forth
//! between two groups of its home region, one move after another. Per move
//! it reports the pause the move itself measured (seal to the acquisition
//! the map names) and the longest any write that overlapped the move
//! waited, next to what writes wait when nothing moves; the copy
//! throughput; and every error a client saw. Afterwards every acknowledged
//! token must be committed and the issuer's reserved amount must be the
//! sum of the acknowledged writes.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use hdrhistogram::Histogram;
use serde_json::{json, Value};

use super::{histogram, micros, BenchCluster, Latency};

/// The flags of `harbor bench moves`.
#[derive(Clone, Debug, clap::Args)]
pub struct MovesOptions {
    /// A gateway of the issuer's home region. Without it a dev cluster is
    /// started (and stopped at the end).
    #[arg(long)]
    pub url: Option<String>,
    #[arg(long, default_value = "newyork")]
    pub home_region: String,
    /// Moves, one after another, alternating between the two groups.
    #[arg(long, default_value_t = 10)]
    pub moves: usize,
    /// Writers reserving against the hot issuer, one request in flight
    /// each.
    #[arg(long, default_value_t = 8)]
    pub writers: usize,
    /// Reservations loaded into the bucket before the first move (each
    /// move copies them all).
    #[arg(long, default_value_t = 10_000)]
    pub preload: usize,
    /// Time between one move's end and the next one's start (ms).
    #[arg(long, default_value_t = 500)]
    pub gap_ms: u64,
    /// Also write the results as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// One write, from its first send to its definite answer.
struct Write {
    token: String,
    started: Instant,
    ended: Instant,
    /// Refusals and transport errors before the answer, by code.
    errors: Vec<String>,
    acked: bool,
}

/// One move, as its answer told it.
struct Move {
    started: Instant,
    ended: Instant,
    pause_ms: u64,
    took_ms: u64,
    copied_rows: u64,
    copied_bytes: u64,
}

/// A definite answer's deadline: a write still without one after this is
/// an error of the run.
const WRITE_DEADLINE: Duration = Duration::from_secs(30);

/// How long a writer waits before resending (the gateway already waited
/// out what it could: a retryable refusal is rare).
const RETRY_MS: u64 = 20;

pub async fn moves(options: MovesOptions) -> anyhow::Result<()> {
    let mut dev = None;
    let base = match &options.url {
        Some(url) => url.trim_end_matches('/').to_string(),
        None => {
            let started = BenchCluster::start(|_| {}).await?;
            let url = started.cluster.url(&options.home_region);
            dev = Some(started);
            url
        }
    };
    let result = run(&options, &base).await;
    if let Some(dev) = dev {
        dev.stop().await;
    }
    result
}

async fn run(options: &MovesOptions, base: &str) -> anyhow::Result<()> {
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(256)
        .timeout(Duration::from_secs(300))
        .build()?;
    let run_id = std::process::id();
    let issuer = format!("MOVE-HOT-{run_id}");
    super::register_issuers(
        &http,
        base,
        std::slice::from_ref(&issuer),
        &options.home_region,
    )
    .await?;
    let info: Value = get_json(&http, &format!("{base}/v1/issuers/{issuer}")).await?;
    let bucket = info["bucket"]
        .as_u64()
        .context("the issuer has no bucket")?;
    let home = info["shard"].as_u64().context("the issuer has no shard")?;
    let cluster: harbor_api::ClusterView =
        serde_json::from_value(get_json(&http, &format!("{base}/v1/admin/cluster")).await?)?;
    let Some(other) = cluster
        .groups
        .iter()
        .find(|g| g.home_region == options.home_region && u64::from(g.shard) != home)
        .map(|g| u64::from(g.shard))
    else {
        bail!(
            "{} has a single group: nothing to move to",
            options.home_region
        );
    };

    let preloaded = preload(&http, base, &issuer, options.preload, run_id).await?;
    eprintln!(
        "bucket {bucket} of {issuer} ({preloaded} reservations) moves {} times between shard{home} and shard{other} under {} writers ...",
        options.moves, options.writers
    );

    let stop = Arc::new(AtomicBool::new(false));
    let writes: Arc<Mutex<Vec<Write>>> = Arc::default();
    let mut writers = Vec::new();
    for w in 0..options.writers {
        let (http, base, issuer) = (http.clone(), base.to_string(), issuer.clone());
        let (stop, writes) = (stop.clone(), writes.clone());
        writers.push(tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let token = format!("mv-{run_id}-{w}-{n}");
                let write = reserve(&http, &base, &issuer, token).await;
                writes.lock().unwrap().push(write);
            }
        }));
    }

    // Writes before the first move show what a write waits when nothing
    // moves (they are counted with the others between moves).
    tokio::time::sleep(Duration::from_millis(options.gap_ms.max(1000))).await;
    let mut moves = Vec::new();
    let mut failed = Vec::new();
    let mut busy: Vec<(Instant, Instant)> = Vec::new();
    let (mut from, mut to) = (home, other);
    for i in 0..options.moves {
        let started = Instant::now();
        let answer = http
            .post(format!("{base}/v1/admin/buckets/{bucket}/move"))
            .json(&json!({ "to": format!("shard{to}") }))
            .send()
            .await;
        let (status, body) = match answer {
            Ok(answer) => (
                answer.status().to_string(),
                answer.json().await.unwrap_or(Value::Null),
            ),
            Err(e) => (format!("no answer ({e})"), Value::Null),
        };
        let ended = Instant::now();
        let field = |name: &str| body[name].as_u64();
        // A move that failed may have sealed the bucket for a while: the
        // writes that overlapped it do not count as quiet.
        busy.push((started, ended));
        let Some(pause_ms) = field("pause_ms").filter(|_| status.starts_with("200")) else {
            eprintln!("move {} (shard{from} -> shard{to}): {status} {body}", i + 1);
            failed.push(format!("{status} {body}"));
            tokio::time::sleep(Duration::from_millis(options.gap_ms)).await;
            continue;
        };
        {
            let field = |name: &str| field(name).unwrap_or(0);
            let m = Move {
                started,
                ended,
                pause_ms,
                took_ms: field("took_ms"),
                copied_rows: field("copied_rows"),
                copied_bytes: field("copied_bytes"),
            };
            eprintln!(
                "move {}: shard{from} -> shard{to} in {} ms, pause {} ms, {} rows copied",
                i + 1,
                m.took_ms,
                m.pause_ms,
                m.copied_rows
            );
            moves.push(m);
            (from, to) = (to, from);
        }
        tokio::time::sleep(Duration::from_millis(options.gap_ms)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for writer in writers {
        writer.await?;
    }
    let writes = std::mem::take(&mut *writes.lock().unwrap());
    let report = Report::of(&moves, &busy, &writes);
    report.print(options, bucket, &failed);

    eprintln!("checking every acknowledged token and the issuer's reserved amount ...");
    let (uncommitted, reserved) = check(&http, base, &issuer, &writes).await?;
    let expected = preloaded + report.acked;
    println!(
        "afterwards: {} acknowledged tokens checked, {uncommitted} not committed; reserved {reserved}, expected {expected}",
        report.acked
    );
    if let Some(path) = &options.json {
        let doc = report.json(options, bucket, &failed, uncommitted, reserved, expected);
        std::fs::write(path, serde_json::to_string_pretty(&doc)? + "\n")
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if !failed.is_empty() || report.unanswered > 0 || uncommitted > 0 || reserved != expected {
        bail!(
            "{} moves failed, {} writes had no definite answer, {uncommitted} acknowledged tokens are not committed, reserved {reserved} against {expected} acknowledged",
            failed.len(),
            report.unanswered
        );
    }
    Ok(())
}

/// Loads `count` reservations of amount 1 into the issuer through the
/// batch API; returns how many were acknowledged.
async fn preload(
    http: &reqwest::Client,
    base: &str,
    issuer: &str,
    count: usize,
    run_id: u32,
) -> anyhow::Result<u64> {
    const BATCH: usize = 1000;
    let mut acked = 0u64;
    let mut n = 0usize;
    while n < count {
        let items: Vec<Value> = (n..count.min(n + BATCH))
            .map(|i| {
                json!({"reservation_token": format!("pre-{run_id}-{i}"), "issuer_id": issuer,
                       "amount": 1, "desk": "bench", "trader": "moves"})
            })
            .collect();
        n += items.len();
        let answer = http
            .post(format!("{base}/v1/reservations:batch"))
            .json(&json!({ "reservations": items }))
            .send()
            .await
            .context("preloading")?;
        let status = answer.status();
        let body: harbor_api::BatchAnswer = answer
            .json()
            .await
            .with_context(|| format!("a preload batch answered {status}"))?;
        if body.failed > 0 {
            bail!("{} reservations of a preload batch failed", body.failed);
        }
        acked += body.reserved;
    }
    Ok(acked)
}

/// Reserves 1 with `token`, resending the same token after a retryable
/// refusal or a transport error until the answer is definite.
async fn reserve(http: &reqwest::Client, base: &str, issuer: &str, token: String) -> Write {
    let started = Instant::now();
    let body = json!({"reservation_token": token, "issuer_id": issuer, "amount": 1,
                      "desk": "bench", "trader": "moves"});
    let mut errors = Vec::new();
    loop {
        let left = WRITE_DEADLINE.saturating_sub(started.elapsed());
        let answer = http
            .post(format!("{base}/v1/reservations"))
            .timeout(left.max(Duration::from_millis(1)))
            .json(&body)
            .send()
            .await;
        let definite = match answer {
            Ok(answer) if answer.status().is_success() => Some(true),
            Ok(answer) => {
                let status = answer.status();
                let body: Value = answer.json().await.unwrap_or(Value::Null);
                let code = body["error"].as_str().unwrap_or("no_code").to_string();
                let retryable = body["retryable"]
                    .as_bool()
                    .unwrap_or(status.is_server_error());
                errors.push(code);
                (!retryable).then_some(false)
            }
            Err(e) => {
                errors.push(format!("transport: {e}"));
                None
            }
        };
        if let Some(acked) = definite {
            return Write {
                token,
                started,
                ended: Instant::now(),
                errors,
                acked,
            };
        }
        if started.elapsed() > WRITE_DEADLINE {
            errors.push("no_definite_answer".into());
            return Write {
                token,
                started,
                ended: Instant::now(),
                errors,
                acked: false,
            };
        }
        tokio::time::sleep(Duration::from_millis(RETRY_MS)).await;
    }
}

/// Counts the acknowledged tokens the cluster does not have as committed,
/// and reads the issuer's reserved amount (strongly).
async fn check(
    http: &reqwest::Client,
    base: &str,
    issuer: &str,
    writes: &[Write],
) -> anyhow::Result<(u64, u64)> {
    let tokens: Vec<String> = writes
        .iter()
        .filter(|w| w.acked)
        .map(|w| w.token.clone())
        .collect();
    let mut uncommitted = 0u64;
    for chunk in tokens.chunks(64) {
        let asks = chunk.iter().map(|token| {
            let url = format!("{base}/v1/reservation-tokens/{token}?issuer_id={issuer}");
            let http = http.clone();
            async move { get_json(&http, &url).await }
        });
        for answer in futures::future::join_all(asks).await {
            if answer?["status"] != "committed" {
                uncommitted += 1;
            }
        }
    }
    let url = format!("{base}/v1/issuers/{issuer}?consistency=strong");
    let info = get_json(http, &url).await?;
    let reserved = info["reserved"].as_u64().context("no reserved amount")?;
    Ok((uncommitted, reserved))
}

async fn get_json(http: &reqwest::Client, url: &str) -> anyhow::Result<Value> {
    let answer = http
        .get(url)
        .send()
        .await
        .with_context(|| format!("asking {url}"))?;
    let status = answer.status();
    let body: Value = answer
        .json()
        .await
        .with_context(|| format!("reading {url}"))?;
    if !status.is_success() {
        bail!("{url} answered {status}: {body}");
    }
    Ok(body)
}

/// What the run measured.
struct Report {
    /// The pause each move reported (seal to the acquisition named).
    pause: Histogram<u64>,
    /// Per move, the longest wait of a write that overlapped it.
    longest_wait: Histogram<u64>,
    /// Writes that overlapped no move.
    quiet: Histogram<u64>,
    /// All writes.
    all: Histogram<u64>,
    acked: u64,
    /// Writes still without a definite answer at their deadline.
    unanswered: u64,
    /// Every refusal or transport error a writer saw, by code.
    errors: BTreeMap<String, u64>,
    copied_rows: u64,
    copied_bytes: u64,
    moving_ms: u64,
    wrote_for: Duration,
}

impl Report {
    /// `busy`: when every move, done or failed, was under way.
    fn of(moves: &[Move], busy: &[(Instant, Instant)], writes: &[Write]) -> Report {
        let mut report = Report {
            pause: histogram(),
            longest_wait: histogram(),
            quiet: histogram(),
            all: histogram(),
            acked: 0,
            unanswered: 0,
            errors: BTreeMap::new(),
            copied_rows: 0,
            copied_bytes: 0,
            moving_ms: 0,
            wrote_for: Duration::ZERO,
        };
        for m in moves {
            let _ = report.pause.record((m.pause_ms * 1000).max(1));
            let overlapping = writes
                .iter()
                .filter(|w| w.started < m.ended && w.ended > m.started);
            let longest = overlapping.map(|w| w.ended - w.started).max();
            let _ = report
                .longest_wait
                .record(micros(longest.unwrap_or(Duration::ZERO)));
            report.copied_rows += m.copied_rows;
            report.copied_bytes += m.copied_bytes;
            report.moving_ms += m.took_ms;
        }
        for w in writes {
            let waited = micros(w.ended - w.started);
            let _ = report.all.record(waited);
            let quiet = !busy
                .iter()
                .any(|(started, ended)| w.started < *ended && w.ended > *started);
            if quiet {
                let _ = report.quiet.record(waited);
            }
            report.acked += u64::from(w.acked);
            for code in &w.errors {
                *report.errors.entry(code.clone()).or_default() += 1;
            }
            if w.errors.last().is_some_and(|c| c == "no_definite_answer") {
                report.unanswered += 1;
            }
        }
        let first = writes.iter().map(|w| w.started).min();
        let last = writes.iter().map(|w| w.ended).max();
        if let (Some(first), Some(last)) = (first, last) {
            report.wrote_for = last - first;
        }
        report
    }

    fn print(&self, options: &MovesOptions, bucket: u64, failed: &[String]) {
        let (pause, wait, quiet) = (
            Latency::of(&self.pause),
            Latency::of(&self.longest_wait),
            Latency::of(&self.quiet),
        );
        let secs = self.wrote_for.as_secs_f64().max(0.001);
        println!(
            "bucket {bucket}: {} moves done, {} failed; {} writes acknowledged in {secs:.1} s ({:.0}/s) by {} writers",
            pause.count,
            failed.len(),
            self.acked,
            self.acked as f64 / secs,
            options.writers
        );
        println!(
            "  write pause per move (as the move measured it): p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
            pause.p50_ms, pause.p99_ms, pause.max_ms
        );
        println!(
            "  longest wait of a write overlapping a move: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms (writes overlapping no move: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms)",
            wait.p50_ms, wait.p99_ms, wait.max_ms, quiet.p50_ms, quiet.p99_ms, quiet.max_ms
        );
        println!(
            "  copied {} rows, {} bytes in {} ms of moves: {:.0} rows/s, {:.1} MB/s",
            self.copied_rows,
            self.copied_bytes,
            self.moving_ms,
            self.copied_rows as f64 * 1000.0 / self.moving_ms.max(1) as f64,
            self.copied_bytes as f64 / 1000.0 / self.moving_ms.max(1) as f64,
        );
        super::print_errors("errors seen by writers", &self.errors);
    }

    fn json(
        &self,
        options: &MovesOptions,
        bucket: u64,
        failed: &[String],
        uncommitted: u64,
        reserved: u64,
        expected: u64,
    ) -> Value {
        json!({
            "command": std::env::args().collect::<Vec<_>>().join(" "),
            "home_region": options.home_region, "bucket": bucket,
            "moves": self.pause.len(), "moves_failed": failed,
            "writers": options.writers, "preload": options.preload, "gap_ms": options.gap_ms,
            "writes_acknowledged": self.acked, "writes_unanswered": self.unanswered,
            "seconds": self.wrote_for.as_secs_f64(),
            "pause": Latency::of(&self.pause),
            "longest_wait_per_move": Latency::of(&self.longest_wait),
            "writes_overlapping_no_move": Latency::of(&self.quiet),
            "all_writes": Latency::of(&self.all),
            "copied_rows": self.copied_rows, "copied_bytes": self.copied_bytes,
            "moving_ms": self.moving_ms, "errors": self.errors,
            "uncommitted_acknowledged": uncommitted, "reserved": reserved,
            "reserved_expected": expected,
        })
    }
}

//! `harbor bench`: a reservation workload against any Harbor cluster.
//!
//! Closed loop (`--clients N`, each waits for its answer before the next
//! request) or open loop (`--rate R` requests per second whatever the
//! answers do; latency counts from when a request was due, so a slow
//! server cannot hide its queueing: no coordinated omission). Knobs: the
//! number of issuers and the share of traffic on a few hot ones, amounts,
//! holds later confirmed or released, reads by consistency mode, writes
//! through another region's gateway, and `--batch K` reservations per
//! request (`POST /v1/reservations:batch`).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use hdrhistogram::Histogram;
use serde::Serialize;
use serde_json::{json, Value};

use super::{histogram, micros, BenchCluster, Latency};

/// The workload. Every field is a `harbor bench` flag.
#[derive(Clone, Debug)]
pub struct WorkloadOptions {
    /// Gateways; none starts a dev cluster (WAN delay `wan_delay_ms`).
    pub urls: Vec<String>,
    pub wan_delay_ms: u64,
    /// The shape of the dev cluster started without `urls`.
    pub topology: harbor_meta::Topology,
    /// Where the issuers live (default: the first gateway's region).
    pub home_region: Option<String>,
    pub issuers: usize,
    /// Issuers that take `hot_share` percent of the traffic.
    pub hot: usize,
    pub hot_share: u64,
    /// Amounts are uniform in 1..=amount_max.
    pub amount_max: u64,
    pub clients: usize,
    /// Open loop: requests per second in all (0: closed loop).
    pub rate: u64,
    /// Reservations per request (1: `POST /v1/reservations`).
    pub batch: usize,
    /// Percent of operations that are reads, and their mode.
    pub reads: u64,
    pub read_consistency: String,
    /// Percent of reservations that are holds; each is confirmed (or, for
    /// `release_share` percent of them, released) by the next operation.
    pub holds: u64,
    pub release_share: u64,
    /// Percent of writes sent through a gateway outside the home region.
    pub cross_region: u64,
    pub seconds: u64,
    pub warmup_seconds: u64,
    pub seed: u64,
    pub json: Option<PathBuf>,
}

#[derive(Serialize)]
struct Report {
    command: String,
    gateways: Vec<String>,
    home_region: String,
    clients: usize,
    rate: u64,
    batch: usize,
    issuers: usize,
    hot: usize,
    hot_share: u64,
    seconds: f64,
    /// Reservations confirmed or held per second (batches count each).
    reservations_per_sec: f64,
    requests_per_sec: f64,
    operations: BTreeMap<&'static str, Latency>,
    errors: BTreeMap<String, u64>,
}

#[derive(Default)]
struct Tally {
    latency: BTreeMap<&'static str, Histogram<u64>>,
    reservations: u64,
    requests: u64,
    errors: BTreeMap<String, u64>,
}

impl Tally {
    fn record(&mut self, op: &'static str, took_us: u64) {
        let h = self.latency.entry(op).or_insert_with(histogram);
        let _ = h.record(took_us);
    }

    fn merge(&mut self, other: Tally) {
        for (op, h) in other.latency {
            let mine = self.latency.entry(op).or_insert_with(histogram);
            let _ = mine.add(&h);
        }
        self.reservations += other.reservations;
        self.requests += other.requests;
        for (code, n) in other.errors {
            *self.errors.entry(code).or_default() += n;
        }
    }
}

/// A tiny seeded generator (xorshift*): each client's choices are
/// reproducible from `--seed` and its number.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    fn percent(&mut self, p: u64) -> bool {
        self.below(100) < p
    }
}

/// What the clients share.
struct Plan {
    options: WorkloadOptions,
    http: reqwest::Client,
    home: Vec<String>,
    away: Vec<String>,
    issuers: Vec<String>,
    run: String,
}

impl Plan {
    fn issuer(&self, rng: &mut Rng) -> &str {
        let o = &self.options;
        let hot = o.hot.min(self.issuers.len());
        let i = if hot > 0 && rng.percent(o.hot_share) {
            rng.below(hot as u64)
        } else {
            rng.below(self.issuers.len() as u64)
        };
        &self.issuers[i as usize]
    }

    fn gateway(&self, rng: &mut Rng, write: bool) -> &str {
        let away = write && !self.away.is_empty() && rng.percent(self.options.cross_region);
        let list = if away { &self.away } else { &self.home };
        &list[rng.below(list.len() as u64) as usize]
    }
}

/// One client's state between operations.
struct Client {
    n: usize,
    rng: Rng,
    next_token: u64,
    /// A hold to confirm or release next.
    hold: Option<String>,
}

pub async fn run(options: WorkloadOptions) -> anyhow::Result<()> {
    if options.clients == 0 || options.batch == 0 || options.issuers == 0 {
        bail!("--clients, --batch and --issuers must be at least 1");
    }
    if options.batch > harbor_reservation::BATCH_COMMANDS_MAX {
        bail!(
            "--batch is at most {}",
            harbor_reservation::BATCH_COMMANDS_MAX
        );
    }
    for (name, p) in [
        ("--hot-share", options.hot_share),
        ("--reads", options.reads),
        ("--holds", options.holds),
        ("--release-share", options.release_share),
        ("--cross-region", options.cross_region),
    ] {
        if p > 100 {
            bail!("{name} is a percentage, 0 to 100");
        }
    }
    if !matches!(
        options.read_consistency.as_str(),
        "strong" | "session" | "bounded" | "causal"
    ) {
        bail!("--read-consistency must be strong, session, bounded or causal");
    }
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .pool_max_idle_per_host(4096)
        .build()?;
    let mut dev = None;
    let urls = if options.urls.is_empty() {
        let started = BenchCluster::start(|dev| {
            dev.wan_delay_ms = options.wan_delay_ms;
            dev.topology = options.topology.clone();
        })
        .await?;
        let urls = started.cluster.gateways.iter().map(|g| g.url()).collect();
        dev = Some(started);
        urls
    } else {
        options
            .urls
            .iter()
            .map(|u| u.trim_end_matches('/').to_string())
            .collect::<Vec<_>>()
    };
    // Each gateway's region, from its health answer.
    let mut regions = Vec::new();
    for url in &urls {
        let health: Value = http
            .get(format!("{url}/v1/health"))
            .send()
            .await
            .with_context(|| format!("{url} does not answer"))?
            .json()
            .await?;
        let region = health["region"].as_str().unwrap_or_default().to_string();
        regions.push(region);
    }
    let home_region = options.home_region.clone().unwrap_or(regions[0].clone());
    let (home, away): (Vec<_>, Vec<_>) = urls
        .iter()
        .zip(&regions)
        .partition(|(_, r)| **r == home_region);
    let home: Vec<String> = home.into_iter().map(|(u, _)| u.clone()).collect();
    let away: Vec<String> = away.into_iter().map(|(u, _)| u.clone()).collect();
    if home.is_empty() {
        bail!("no gateway given is in region {home_region}");
    }
    let run = format!(
        "{:x}",
        std::process::id() as u64 ^ options.seed.rotate_left(17)
    );
    let issuers: Vec<String> = (0..options.issuers)
        .map(|i| format!("B-{}-{i}", home_region.to_uppercase()))
        .collect();
    register_issuers(&http, &home[0], &home_region, &issuers).await?;
    let plan = Arc::new(Plan {
        options: options.clone(),
        http,
        home,
        away,
        issuers,
        run,
    });
    let report = measure(plan.clone(), home_region).await;
    print_report(&report, &options);
    if let Some(path) = &options.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)? + "\n")
            .with_context(|| format!("writing {}", path.display()))?;
        eprintln!("results written to {}", path.display());
    }
    if let Some(dev) = dev {
        dev.stop().await;
    }
    Ok(())
}

/// Creates (or updates) `issuers` homed in `region` through `url`, each
/// with the largest limit, 64 at a time.
pub(crate) async fn register_issuers(
    http: &reqwest::Client,
    url: &str,
    region: &str,
    issuers: &[String],
) -> anyhow::Result<()> {
    eprintln!(
        "registering {} issuers homed in {region} ...",
        issuers.len()
    );
    let registering = issuers.chunks(64).map(|chunk| async move {
        for issuer in chunk {
            let answer = http
                .put(format!("{url}/v1/issuers/{issuer}"))
                .json(&json!({"home_region": region, "limit": harbor_types::AMOUNT_MAX}))
                .send()
                .await?;
            if !answer.status().is_success() {
                bail!(
                    "registering {issuer}: {} {}",
                    answer.status(),
                    answer.text().await?
                );
            }
        }
        Ok(())
    });
    for result in futures::future::join_all(registering).await {
        result?;
    }
    Ok(())
}

/// Runs the clients through warm-up and the measured window.
async fn measure(plan: Arc<Plan>, home_region: String) -> Report {
    let o = &plan.options;
    let stop = Arc::new(AtomicBool::new(false));
    let measuring = Arc::new(AtomicBool::new(o.warmup_seconds == 0));
    let progress = Arc::new(AtomicU64::new(0));
    let tally = Arc::new(Mutex::new(Tally::default()));
    // Open loop: a ticket per due request; clients take them in turn.
    let (tickets_tx, tickets_rx) = async_channel(o.rate > 0, o.clients);
    let mut tasks = Vec::new();
    for n in 0..o.clients {
        let (plan, stop, measuring, progress, tally) = (
            plan.clone(),
            stop.clone(),
            measuring.clone(),
            progress.clone(),
            tally.clone(),
        );
        let tickets = tickets_rx.clone();
        tasks.push(tokio::spawn(async move {
            let mut client = Client {
                n,
                rng: Rng::new(plan.options.seed ^ (n as u64 + 1)),
                next_token: 0,
                hold: None,
            };
            let mut mine = Tally::default();
            while !stop.load(Ordering::Relaxed) {
                let due = match &tickets {
                    Some(rx) => match rx.lock().await.recv().await {
                        Some(due) => due,
                        None => break,
                    },
                    None => Instant::now(),
                };
                let counted = measuring.load(Ordering::Relaxed);
                step(&plan, &mut client, due, counted, &mut mine).await;
                progress.fetch_add(1, Ordering::Relaxed);
            }
            tally.lock().unwrap().merge(mine);
        }));
    }
    if let Some(tx) = tickets_tx {
        let rate = o.rate;
        let stop = stop.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            let mut sent = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let due = started + Duration::from_secs_f64(sent as f64 / rate as f64);
                tokio::time::sleep_until(due.into()).await;
                // A full queue means the clients are all busy: the request
                // still counts from when it was due.
                if tx.send(due).await.is_err() {
                    break;
                }
                sent += 1;
            }
        });
    }
    let warmup = Duration::from_secs(o.warmup_seconds);
    let length = Duration::from_secs(o.seconds);
    let started = Instant::now();
    let mut measured_from = if warmup.is_zero() {
        Some(started)
    } else {
        None
    };
    let mut last = 0;
    while measured_from.is_none_or(|t| t.elapsed() < length) {
        tokio::time::sleep(Duration::from_secs(1)).await;
        if measured_from.is_none() && started.elapsed() >= warmup {
            measuring.store(true, Ordering::Relaxed);
            measured_from = Some(Instant::now());
        }
        let done = progress.load(Ordering::Relaxed);
        let phase = match measured_from {
            Some(t) => format!("{:>3.0}s/{}s", t.elapsed().as_secs_f64(), o.seconds),
            None => "warm-up".to_string(),
        };
        eprintln!(
            "[{phase}] {} requests/s, {done} requests so far",
            done - last
        );
        last = done;
    }
    stop.store(true, Ordering::Relaxed);
    let seconds = measured_from.map_or(0.0, |t| t.elapsed().as_secs_f64());
    for task in tasks {
        let _ = task.await;
    }
    let tally = std::mem::take(&mut *tally.lock().unwrap());
    Report {
        command: std::env::args().collect::<Vec<_>>().join(" "),
        gateways: plan.home.iter().chain(&plan.away).cloned().collect(),
        home_region,
        clients: o.clients,
        rate: o.rate,
        batch: o.batch,
        issuers: o.issuers,
        hot: o.hot,
        hot_share: o.hot_share,
        seconds,
        reservations_per_sec: tally.reservations as f64 / seconds.max(f64::EPSILON),
        requests_per_sec: tally.requests as f64 / seconds.max(f64::EPSILON),
        operations: tally
            .latency
            .iter()
            .map(|(op, h)| (*op, Latency::of(h)))
            .collect(),
        errors: tally.errors,
    }
}

type Tickets = Arc<tokio::sync::Mutex<tokio::sync::mpsc::Receiver<Instant>>>;

/// The open loop's ticket queue (`None` in a closed loop).
fn async_channel(
    open: bool,
    clients: usize,
) -> (Option<tokio::sync::mpsc::Sender<Instant>>, Option<Tickets>) {
    if !open {
        return (None, None);
    }
    let (tx, rx) = tokio::sync::mpsc::channel(clients * 64);
    (Some(tx), Some(Arc::new(tokio::sync::Mutex::new(rx))))
}

/// One operation of one client: a read, the confirm or release of its last
/// hold, or a reservation (a batch of them with `--batch`).
async fn step(plan: &Plan, client: &mut Client, due: Instant, counted: bool, tally: &mut Tally) {
    let o = &plan.options;
    let http = &plan.http;
    let (op, request, reservations) = if let Some(id) = client.hold.take() {
        let release = client.rng.percent(o.release_share);
        let verb = if release { "release" } else { "confirm" };
        let url = format!(
            "{}/v1/reservations/{id}/{verb}",
            plan.gateway(&mut client.rng, true)
        );
        (verb, http.post(url).json(&json!({})), 0)
    } else if client.rng.percent(o.reads) {
        let issuer = plan.issuer(&mut client.rng).to_string();
        let url = format!(
            "{}/v1/issuers/{issuer}?consistency={}",
            plan.gateway(&mut client.rng, false),
            o.read_consistency
        );
        ("read", http.get(url), 0)
    } else if o.batch > 1 {
        let items: Vec<Value> = (0..o.batch)
            .map(|_| reservation(plan, client, false))
            .collect();
        let url = format!(
            "{}/v1/reservations:batch",
            plan.gateway(&mut client.rng, true)
        );
        let body = json!({ "reservations": items });
        ("reserve_batch", http.post(url).json(&body), o.batch as u64)
    } else {
        let hold = client.rng.percent(o.holds);
        let body = reservation(plan, client, hold);
        let url = format!("{}/v1/reservations", plan.gateway(&mut client.rng, true));
        let op = if hold { "hold" } else { "reserve" };
        (op, http.post(url).json(&body), 1)
    };
    let answer = request.send().await;
    let took = micros(due.elapsed());
    let body: Option<(u16, Value)> = match answer {
        Ok(a) => {
            let status = a.status().as_u16();
            a.json().await.ok().map(|v| (status, v))
        }
        Err(_) => None,
    };
    let mut errors: Vec<String> = Vec::new();
    let mut reserved = 0;
    match &body {
        None => errors.push("transport".into()),
        Some((status, v)) if *status >= 300 => {
            errors.push(v["error"].as_str().unwrap_or("http").to_string())
        }
        Some((_, v)) if op == "reserve_batch" => {
            reserved = v["reserved"].as_u64().unwrap_or(0);
            for item in v["results"].as_array().into_iter().flatten() {
                if item["ok"] != true {
                    errors.push(item["error"].as_str().unwrap_or("unknown").to_string());
                }
            }
        }
        Some((_, v)) => {
            reserved = reservations;
            if op == "hold" {
                client.hold = v["reservation_id"].as_str().map(str::to_string);
            }
        }
    }
    if counted {
        tally.requests += 1;
        tally.reservations += reserved;
        tally.record(op, took);
        for code in errors {
            *tally.errors.entry(code).or_default() += 1;
        }
    }
}

/// One reservation's body, with a fresh token.
fn reservation(plan: &Plan, client: &mut Client, hold: bool) -> Value {
    client.next_token += 1;
    let token = format!("bench-{}-{}-{}", plan.run, client.n, client.next_token);
    let issuer = plan.issuer(&mut client.rng);
    let amount = 1 + client.rng.below(plan.options.amount_max);
    let mut body = json!({"reservation_token": token, "issuer_id": issuer, "amount": amount,
                          "desk": "bench", "trader": "bench"});
    if hold {
        body["hold_ttl_ms"] = json!(60_000);
    }
    body
}

fn print_report(report: &Report, options: &WorkloadOptions) {
    let mode = if options.rate > 0 {
        format!(
            "open loop at {}/s, up to {} in flight",
            options.rate, options.clients
        )
    } else {
        format!("closed loop, {} clients", options.clients)
    };
    println!(
        "\n{mode}; {} issuers ({} hot taking {}%); batch {}; {:.0} s measured",
        report.issuers, report.hot, report.hot_share, report.batch, report.seconds
    );
    println!(
        "  {:.0} reservations/s, {:.0} requests/s",
        report.reservations_per_sec, report.requests_per_sec
    );
    println!(
        "  {:<14} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}",
        "latency (ms)", "count", "p50", "p90", "p99", "p99.9", "max"
    );
    for (op, l) in &report.operations {
        println!(
            "  {:<14} {:>9} {:>9.2} {:>9.2} {:>9.2} {:>9.2} {:>9.2}",
            op, l.count, l.p50_ms, l.p90_ms, l.p99_ms, l.p999_ms, l.max_ms
        );
    }
    super::print_errors("errors", &report.errors);
}

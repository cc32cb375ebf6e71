//! `harbor bench`: workloads against a running cluster (or a dev cluster it
//! starts), measured with HdrHistogram and reported as a table and JSON.

pub mod cdc;
pub mod cost;
pub mod moves;
pub mod reads;
pub mod workload;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::dev::{DevCluster, DevOptions};

/// A dev cluster a benchmark starts for itself in a temporary directory,
/// removed when it stops.
pub(crate) struct BenchCluster {
    pub cluster: DevCluster,
    options: DevOptions,
}

impl BenchCluster {
    pub(crate) async fn start(shape: impl FnOnce(&mut DevOptions)) -> anyhow::Result<BenchCluster> {
        let dir = std::env::temp_dir().join(format!("harbor-bench-{}", std::process::id()));
        let mut options = DevOptions::new(dir.clone());
        options.port = 0;
        shape(&mut options);
        options
            .topology
            .validate()
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        eprintln!(
            "starting a dev cluster in {} (WAN delay {} ms) ...",
            dir.display(),
            options.wan_delay_ms
        );
        let cluster = DevCluster::start(options.clone()).await?;
        cluster.wait_ready(Duration::from_secs(60)).await?;
        Ok(BenchCluster { cluster, options })
    }

    /// Where the cluster keeps its data.
    pub(crate) fn dir(&self) -> &Path {
        &self.options.data_dir
    }

    /// Stops every node and starts the cluster again on the same data, as
    /// after a power cut that waited for the last batch; returns how long
    /// the stop and the start (until every group's leader is ready) took.
    pub(crate) async fn restart(self) -> anyhow::Result<(BenchCluster, Restart)> {
        let BenchCluster { cluster, options } = self;
        let started = Instant::now();
        cluster.shutdown().await;
        let stop = started.elapsed();
        let started = Instant::now();
        let cluster = match DevCluster::start(options.clone()).await {
            Ok(cluster) => cluster,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&options.data_dir);
                return Err(e.context("restarting the dev cluster"));
            }
        };
        let restart = Restart {
            stop,
            start: started.elapsed(),
        };
        Ok((BenchCluster { cluster, options }, restart))
    }

    pub(crate) async fn stop(self) {
        self.cluster.shutdown().await;
        let _ = std::fs::remove_dir_all(&self.options.data_dir);
    }
}

/// How long a [`BenchCluster::restart`] took.
pub(crate) struct Restart {
    pub stop: Duration,
    /// Until every group's leader is ready (recovered, elected, caught up).
    pub start: Duration,
}

/// Registers `issuers` homed in `home_region` through `gateway`, with
/// limits no benchmark reaches.
pub(crate) async fn register_issuers(
    http: &reqwest::Client,
    gateway: &str,
    issuers: &[String],
    home_region: &str,
) -> anyhow::Result<()> {
    use anyhow::Context;
    eprintln!(
        "registering {} issuers homed in {home_region} ...",
        issuers.len()
    );
    for issuer in issuers {
        let answer = http
            .put(format!("{gateway}/v1/issuers/{issuer}"))
            .json(&serde_json::json!({"home_region": home_region, "limit": 9_000_000_000_000u64}))
            .send()
            .await
            .with_context(|| format!("registering {issuer} through {gateway}"))?;
        if !answer.status().is_success() {
            anyhow::bail!(
                "registering {issuer}: {} {}",
                answer.status(),
                answer.text().await?
            );
        }
    }
    Ok(())
}

/// Counts by error code on one line, or "no errors".
pub(crate) fn print_errors(label: &str, errors: &BTreeMap<String, u64>) {
    if errors.is_empty() {
        println!("  no errors");
        return;
    }
    let list: Vec<String> = errors
        .iter()
        .map(|(code, n)| format!("{code} {n}"))
        .collect();
    println!("  {label}: {}", list.join(", "));
}

/// The largest latency recorded, in microseconds (longer ones count as it).
const LATENCY_US_MAX: u64 = 60_000_000;

pub(crate) fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, LATENCY_US_MAX, 3).expect("valid bounds")
}

pub(crate) fn micros(d: Duration) -> u64 {
    (d.as_micros() as u64).clamp(1, LATENCY_US_MAX)
}

#[derive(Serialize)]
pub(crate) struct Latency {
    pub count: u64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
}

impl Latency {
    pub(crate) fn of(h: &Histogram<u64>) -> Latency {
        let ms = |us: u64| us as f64 / 1000.0;
        Latency {
            count: h.len(),
            p50_ms: ms(h.value_at_quantile(0.50)),
            p90_ms: ms(h.value_at_quantile(0.90)),
            p99_ms: ms(h.value_at_quantile(0.99)),
            p999_ms: ms(h.value_at_quantile(0.999)),
            max_ms: ms(h.max()),
        }
    }
}

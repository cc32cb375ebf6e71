//! `harbor bench`: workloads against a running cluster (or a dev cluster it
//! starts), measured with HdrHistogram and reported as a table and JSON.

pub mod reads;
pub mod workload;

use std::path::PathBuf;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::dev::{DevCluster, DevOptions};

/// A dev cluster a benchmark starts for itself in a temporary directory,
/// removed when it stops.
pub(crate) struct BenchCluster {
    pub cluster: DevCluster,
    dir: PathBuf,
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
        let cluster = DevCluster::start(options).await?;
        cluster.wait_ready(Duration::from_secs(60)).await?;
        Ok(BenchCluster { cluster, dir })
    }

    pub(crate) async fn stop(self) {
        self.cluster.shutdown().await;
        let _ = std::fs::remove_dir_all(self.dir);
    }
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

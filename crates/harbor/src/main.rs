use std::path::PathBuf;

use clap::{Parser, Subcommand};
use harbor::dev::{DevCluster, DevOptions};
use tracing_subscriber::EnvFilter;

/// Harbor: a geo-distributed reservation database.
#[derive(Parser)]
#[command(name = "harbor", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the whole cluster in one process: regions madrid and newyork,
    /// 3 nodes each, 16 replica groups, one HTTP gateway per region.
    Dev {
        /// Where WALs, snapshots and metadata live. Reusing it recovers
        /// every acknowledged write.
        #[arg(long, default_value = "harbor-data")]
        data_dir: PathBuf,
        /// The madrid gateway's port; newyork listens on the next one.
        #[arg(long, default_value_t = 7400)]
        port: u16,
        /// One-way delay between regions, in milliseconds.
        #[arg(long, default_value_t = 35)]
        wan_delay_ms: u64,
    },
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_env("HARBOR_LOG")
                .unwrap_or_else(|_| EnvFilter::new("warn,harbor=info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    match cli.command {
        Command::Dev {
            data_dir,
            port,
            wan_delay_ms,
        } => runtime.block_on(dev(data_dir, port, wan_delay_ms)),
    }
}

async fn dev(data_dir: PathBuf, port: u16, wan_delay_ms: u64) -> anyhow::Result<()> {
    let mut options = DevOptions::new(data_dir.clone());
    options.port = port;
    options.wan_delay_ms = wan_delay_ms;
    eprintln!(
        "starting the Harbor dev cluster in {} ...",
        data_dir.display()
    );
    let started = std::time::Instant::now();
    let cluster = DevCluster::start(options).await?;
    let madrid = cluster.url("madrid");
    println!(
        "Harbor dev cluster ready in {} ms: regions madrid + newyork, {} nodes, {} replica groups, WAN delay {} ms, data in {}",
        started.elapsed().as_millis(),
        cluster.map.nodes.len(),
        cluster.map.groups.len(),
        wan_delay_ms,
        data_dir.display()
    );
    for gateway in &cluster.gateways {
        println!("  {:<8} gateway  {}", gateway.region, gateway.url());
    }
    println!("Try:");
    println!(
        "  curl -s -X PUT {madrid}/v1/issuers/MUNI-77 -H 'content-type: application/json' -d '{{\"home_region\": \"newyork\", \"limit\": 1000}}'"
    );
    println!(
        "  curl -s -X POST {madrid}/v1/reservations -H 'content-type: application/json' -d '{{\"reservation_token\": \"tok-77\", \"issuer_id\": \"MUNI-77\", \"amount\": 600, \"desk\": \"madrid-rates\", \"trader\": \"t-17\"}}'"
    );
    println!("Ctrl-C stops the cluster; starting again with the same --data-dir recovers every acknowledged write.");
    wait_for_signal().await;
    eprintln!("stopping ...");
    cluster.shutdown().await;
    eprintln!("stopped cleanly");
    Ok(())
}

async fn wait_for_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing a SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

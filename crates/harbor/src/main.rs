use std::path::PathBuf;

use clap::{Parser, Subcommand};
use harbor::dev::{DevCluster, DevOptions};
use tracing_subscriber::EnvFilter;

mod verify;

/// glibc's malloc took a tenth of the CPU under load (`bench/README.md`);
/// mimalloc's thread-local free lists suit many threads allocating small
/// messages that another thread frees.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
        /// Let each region's gateway move hot buckets between its groups
        /// on its own (the rebalancer; off by default).
        #[arg(long)]
        rebalance: bool,
    },
    /// Run one metadata voter of a deployment (and, while it leads, the
    /// control loop). See deploy/ for example configs.
    Meta {
        #[arg(long)]
        config: PathBuf,
    },
    /// Run one node of a deployment (and its region's gateway if the
    /// cluster file puts it there).
    Node {
        #[arg(long)]
        config: PathBuf,
    },
    /// Show a running cluster: nodes and their health, groups with their
    /// leader, generation and followers' lag.
    Status {
        /// Any gateway of the cluster.
        #[arg(long, default_value = "http://127.0.0.1:7400")]
        url: String,
        /// Print the raw JSON of GET /v1/admin/cluster instead.
        #[arg(long)]
        json: bool,
    },
    /// Move a bucket to another group of its home region, under live
    /// traffic (a copy, then a short cutover); prints its progress.
    Move {
        #[command(subcommand)]
        what: MoveWhat,
    },
    /// Add a replica of a group on a node, or remove one, under live
    /// traffic; prints progress and the group's voters afterwards.
    Members {
        #[command(subcommand)]
        action: MembersAction,
    },
    /// Take every replica off a node (`harbor drain madrid-1`): a group it
    /// leads hands its leadership over, a node of its region that holds
    /// none of the group takes its replica (when there is one), and its
    /// own is removed; prints progress and every step.
    Drain {
        node: String,
        /// Any gateway of the cluster.
        #[arg(long, default_value = "http://127.0.0.1:7400")]
        url: String,
    },
    /// Manage a gateway's projection (search and reports read it).
    Projection {
        #[command(subcommand)]
        action: ProjectionAction,
    },
    /// Run a change feed into NATS JetStream: one message per change (its
    /// position as Nats-Msg-Id), resolved marks on their own subject, a
    /// durable checkpoint it resumes from after a crash.
    Changefeed {
        /// Any gateway (repeat for several; tried in turn).
        #[arg(long = "url", default_value = "http://127.0.0.1:7400")]
        urls: Vec<String>,
        /// Where to deliver: nats://HOST:PORT (JetStream must be enabled),
        /// or an http:// URL that takes batches of lines by POST.
        #[arg(long)]
        sink: String,
        /// The JetStream stream, created over SUBJECT.> if missing.
        #[arg(long, default_value = "HARBOR")]
        stream: String,
        /// Changes go to SUBJECT.changes.SHARD, resolved marks to
        /// SUBJECT.resolved.
        #[arg(long, default_value = "harbor")]
        subject: String,
        /// The cursor file it resumes from.
        #[arg(long, default_value = "harbor-changefeed.cursor")]
        checkpoint: PathBuf,
        /// Where to start without a checkpoint: beginning or now.
        #[arg(long, default_value = "beginning")]
        from: String,
        /// Only these groups (`0,3`), without a checkpoint.
        #[arg(long)]
        shards: Option<String>,
        /// JetStream drops a change published again within this window (a
        /// restart's replay) as a duplicate.
        #[arg(long, default_value_t = 120)]
        duplicate_window_s: u64,
    },
    /// Prove Harbor's promises: deterministic simulation, history checking.
    Verify {
        #[command(subcommand)]
        what: Verify,
    },
    /// Measure a reservation workload against a cluster (or a dev cluster
    /// it starts); `harbor bench reads` measures follower reads instead.
    #[command(args_conflicts_with_subcommands = true)]
    Bench {
        #[command(subcommand)]
        what: Option<Bench>,
        #[command(flatten)]
        workload: Box<WorkloadArgs>,
    },
}

#[derive(Subcommand)]
enum MembersAction {
    /// `harbor members add shard3 madrid-4`
    Add {
        /// The group: `shard3` or `3`.
        group: String,
        node: String,
        /// Any gateway of the cluster.
        #[arg(long, default_value = "http://127.0.0.1:7400")]
        url: String,
    },
    /// `harbor members remove shard3 madrid-2`
    Remove {
        group: String,
        node: String,
        #[arg(long, default_value = "http://127.0.0.1:7400")]
        url: String,
    },
}

#[derive(Subcommand)]
enum MoveWhat {
    /// `harbor move bucket 173 --to shard5`
    Bucket {
        bucket: u32,
        /// The group to move it to: `shard5` or `5`.
        #[arg(long)]
        to: String,
        /// Any gateway of the cluster.
        #[arg(long, default_value = "http://127.0.0.1:7400")]
        url: String,
    },
}

#[derive(clap::Args)]
struct WorkloadArgs {
    /// A gateway to send to (repeat for several). None: start a dev cluster.
    #[arg(long = "url")]
    urls: Vec<String>,
    /// One-way WAN delay of the dev cluster started without --url.
    #[arg(long, default_value_t = 35)]
    wan_delay_ms: u64,
    /// The started dev cluster's replicas per group in the home region
    /// (2 = the leader and one synchronous follower).
    #[arg(long, default_value_t = 3)]
    local_replicas: usize,
    /// ... and in the other region (asynchronous).
    #[arg(long, default_value_t = 1)]
    remote_replicas: usize,
    /// ... and its groups per region.
    #[arg(long, default_value_t = 8)]
    groups_per_region: usize,
    /// The issuers' home region (default: the first gateway's).
    #[arg(long)]
    home_region: Option<String>,
    #[arg(long, default_value_t = 1000)]
    issuers: usize,
    /// Issuers that take --hot-share percent of the traffic.
    #[arg(long, default_value_t = 0)]
    hot: usize,
    #[arg(long, default_value_t = 100)]
    hot_share: u64,
    /// Amounts are uniform in 1..=N.
    #[arg(long, default_value_t = 100)]
    amount_max: u64,
    /// Concurrent clients (closed loop), or the most requests in flight
    /// with --rate.
    #[arg(long, default_value_t = 64)]
    clients: usize,
    /// Open loop: requests per second in all, latency counted from when
    /// each was due. 0: closed loop.
    #[arg(long, default_value_t = 0)]
    rate: u64,
    /// Reservations per request, through POST /v1/reservations:batch.
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Percent of operations that are reads of an issuer.
    #[arg(long, default_value_t = 0)]
    reads: u64,
    /// The reads' consistency: strong, session, bounded or causal.
    #[arg(long, default_value = "bounded")]
    read_consistency: String,
    /// Percent of reservations that are holds (each then confirmed or released).
    #[arg(long, default_value_t = 0)]
    holds: u64,
    /// Percent of holds released rather than confirmed.
    #[arg(long, default_value_t = 20)]
    release_share: u64,
    /// Percent of writes sent through a gateway outside the home region.
    #[arg(long, default_value_t = 0)]
    cross_region: u64,
    #[arg(long, default_value_t = 20)]
    seconds: u64,
    #[arg(long, default_value_t = 3)]
    warmup_seconds: u64,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Also write the results as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Bench {
    /// Memory and disk per million reservations, and restart time as the
    /// log grows: loads reservations through the batch API in steps into a
    /// dev cluster it starts (a leader and one synchronous follower per
    /// group), measuring and restarting it after each step.
    Cost(harbor::bench::cost::CostOptions),
    /// The write pause of bucket moves under a steady write load on the
    /// bucket being moved: moves a hot issuer's bucket back and forth
    /// between two groups of its home region while writers reserve against
    /// it; reports each move's pause, the longest a write waited, the copy
    /// throughput and every error a writer saw, then checks that every
    /// acknowledged write is there.
    Moves(harbor::bench::moves::MovesOptions),
    /// Bounded reads through a gateway outside the issuers' home region
    /// (share served by a local replica, latency) against strong reads that
    /// cross the WAN to the leader; at rest, then under write load.
    Reads {
        /// The gateway reads go through. Without --reader and --writer a
        /// dev cluster is started (reads through madrid).
        #[arg(long)]
        reader: Option<String>,
        /// A gateway in the issuers' home region (the writers use it).
        #[arg(long)]
        writer: Option<String>,
        #[arg(long, default_value = "newyork")]
        home_region: String,
        #[arg(long, default_value_t = 100)]
        issuers: usize,
        /// Concurrent readers of each kind (bounded and strong).
        #[arg(long, default_value_t = 4)]
        readers: usize,
        /// Concurrent writers during the loaded phase.
        #[arg(long, default_value_t = 16)]
        writers: usize,
        /// Length of each phase.
        #[arg(long, default_value_t = 20)]
        seconds: u64,
        #[arg(long, default_value_t = 2000)]
        max_staleness_ms: u64,
        /// Also write the results as JSON here.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// How soon an acknowledged write shows on the other region's change
    /// feed, and whether the feed keeps up with the write rate.
    Cdc {
        /// The gateway the feed is read from. Without --reader and
        /// --writer a dev cluster is started (the feed read in newyork).
        #[arg(long)]
        reader: Option<String>,
        /// A gateway in the issuers' home region (the writers use it).
        #[arg(long)]
        writer: Option<String>,
        #[arg(long, default_value = "madrid")]
        home_region: String,
        #[arg(long, default_value_t = 1000)]
        issuers: usize,
        #[arg(long, default_value_t = 16)]
        writers: usize,
        /// Reservations per request (the batch API).
        #[arg(long, default_value_t = 20)]
        batch: usize,
        #[arg(long, default_value_t = 20)]
        seconds: u64,
        /// Also write the results as JSON here.
        #[arg(long)]
        json: Option<PathBuf>,
        /// Start the dev cluster's gateways without projections, to
        /// measure what they cost (no search is probed).
        #[arg(long)]
        without_projections: bool,
        /// How often the dev cluster's gateways save their projections
        /// (ms).
        #[arg(long, default_value_t = harbor_types::limits::PROJECTION_SAVE_MS)]
        projection_save_ms: u64,
    },
}

#[derive(Subcommand)]
enum ProjectionAction {
    /// Drop the projection and rebuild it from the log (a scan of every
    /// group's state, then its changes), printing progress until it is
    /// complete again.
    Rebuild {
        /// The projection: `reservations` (search and reports).
        name: String,
        /// The gateway whose projection is rebuilt (each region has its own).
        #[arg(long, default_value = "http://127.0.0.1:7400")]
        url: String,
        /// Give up following after this long (the rebuild goes on).
        #[arg(long, default_value_t = 600)]
        timeout_s: u64,
    },
}

#[derive(Subcommand)]
enum Verify {
    /// Run the whole cluster in simulation, one seed at a time, with faults,
    /// and check every history. Exits non-zero on any violation.
    Sim {
        /// How many seeds to run (starting at --seed, or 1).
        #[arg(long)]
        seeds: Option<u64>,
        /// The first seed; alone, runs just that seed (to replay a failure).
        #[arg(long)]
        seed: Option<u64>,
        /// Switch on a protocol bug the checker must catch:
        /// commit-without-follower-ack, accept-old-generation, apply-token-twice,
        /// strong-read-without-lease, follower-ignores-session, lease-on-wall-clock,
        /// directory-from-copy, resolved-from-lease, feed-skips-change,
        /// projection-watermark-early, projection-includes-by-index,
        /// changes-history-drops-newest, source-accepts-after-seal,
        /// learner-acks-count.
        #[arg(long)]
        bug: Option<String>,
        /// Write the history of every failing seed here.
        #[arg(long)]
        history_dir: Option<PathBuf>,
        /// Simulated milliseconds of the fault phase per seed.
        #[arg(long, default_value_t = 8000)]
        safety_ms: u64,
    },
    /// Check a history (JSON lines, see docs/history-format.md).
    Check { history: PathBuf },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // A simulation runs thousands of clusters: their logs are noise unless
    // asked for with HARBOR_LOG.
    let default_filter = match cli.command {
        Command::Verify { .. } => "off",
        Command::Bench { .. } => "error",
        Command::Dev { .. } => "warn,harbor=info",
        Command::Status { .. }
        | Command::Projection { .. }
        | Command::Move { .. }
        | Command::Members { .. }
        | Command::Drain { .. } => "warn",
        Command::Changefeed { .. } => "warn",
        Command::Meta { .. } | Command::Node { .. } => "warn,harbor=info",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_env("HARBOR_LOG")
                .unwrap_or_else(|_| EnvFilter::new(default_filter)),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    match cli.command {
        Command::Dev {
            data_dir,
            port,
            wan_delay_ms,
            rebalance,
        } => runtime.block_on(dev(data_dir, port, wan_delay_ms, rebalance)),
        Command::Status { url, json } => runtime.block_on(harbor::status::status(&url, json)),
        Command::Move {
            what: MoveWhat::Bucket { bucket, to, url },
        } => runtime.block_on(harbor::moves::move_bucket(&url, bucket, &to)),
        Command::Members { action } => {
            let (group, node, url, add) = match action {
                MembersAction::Add { group, node, url } => (group, node, url, true),
                MembersAction::Remove { group, node, url } => (group, node, url, false),
            };
            runtime.block_on(harbor::members::change(&url, &group, &node, add))
        }
        Command::Drain { node, url } => runtime.block_on(harbor::members::drain(&url, &node)),
        Command::Projection {
            action:
                ProjectionAction::Rebuild {
                    name,
                    url,
                    timeout_s,
                },
        } => runtime.block_on(harbor::projection::rebuild(
            &url,
            &name,
            std::time::Duration::from_secs(timeout_s),
        )),
        Command::Changefeed {
            urls,
            sink,
            stream,
            subject,
            checkpoint,
            from,
            shards,
            duplicate_window_s,
        } => {
            let target = if sink.starts_with("nats://") {
                harbor::sink::SinkTarget::Nats {
                    url: sink,
                    stream,
                    subject_prefix: subject,
                    duplicate_window: std::time::Duration::from_secs(duplicate_window_s),
                }
            } else if sink.starts_with("http://") || sink.starts_with("https://") {
                harbor::sink::SinkTarget::Webhook { url: sink }
            } else {
                anyhow::bail!("--sink {sink:?}: nats://HOST:PORT or an http:// URL");
            };
            if from != "beginning" && from != "now" {
                anyhow::bail!("--from {from:?}: beginning or now (a checkpoint holds the cursor)");
            }
            let options = harbor::sink::SinkOptions {
                urls,
                target,
                checkpoint,
                from,
                shards,
            };
            runtime.block_on(until_signal(|stop| {
                harbor::sink::run_sink_command(options, stop)
            }))
        }
        Command::Meta { config } => runtime.block_on(until_signal(|stop| async move {
            harbor::cluster::run_meta(&config, stop).await
        })),
        Command::Node { config } => runtime.block_on(until_signal(|stop| async move {
            harbor::cluster::run_node(&config, stop).await
        })),
        Command::Bench {
            what: None,
            workload: w,
        } => runtime.block_on(harbor::bench::workload::run(
            harbor::bench::workload::WorkloadOptions {
                urls: w.urls,
                wan_delay_ms: w.wan_delay_ms,
                topology: harbor_meta::Topology {
                    local_replicas: w.local_replicas,
                    remote_replicas: w.remote_replicas,
                    groups_per_region: w.groups_per_region,
                    ..harbor_meta::Topology::dev()
                },
                home_region: w.home_region,
                issuers: w.issuers,
                hot: w.hot,
                hot_share: w.hot_share,
                amount_max: w.amount_max,
                clients: w.clients,
                rate: w.rate,
                batch: w.batch,
                reads: w.reads,
                read_consistency: w.read_consistency,
                holds: w.holds,
                release_share: w.release_share,
                cross_region: w.cross_region,
                seconds: w.seconds,
                warmup_seconds: w.warmup_seconds,
                seed: w.seed,
                json: w.json,
            },
        )),
        Command::Bench {
            what: Some(Bench::Cost(options)),
            ..
        } => runtime.block_on(harbor::bench::cost::cost(options)),
        Command::Bench {
            what: Some(Bench::Moves(options)),
            ..
        } => runtime.block_on(harbor::bench::moves::moves(options)),
        Command::Bench {
            what:
                Some(Bench::Reads {
                    reader,
                    writer,
                    home_region,
                    issuers,
                    readers,
                    writers,
                    seconds,
                    max_staleness_ms,
                    json,
                }),
            ..
        } => runtime.block_on(harbor::bench::reads::reads(
            harbor::bench::reads::ReadsOptions {
                reader,
                writer,
                home_region,
                issuers,
                readers,
                writers,
                phase_secs: seconds,
                max_staleness_ms,
                json,
            },
        )),
        Command::Bench {
            what:
                Some(Bench::Cdc {
                    reader,
                    writer,
                    home_region,
                    issuers,
                    writers,
                    batch,
                    seconds,
                    json,
                    without_projections,
                    projection_save_ms,
                }),
            ..
        } => runtime.block_on(harbor::bench::cdc::cdc(harbor::bench::cdc::CdcOptions {
            reader,
            writer,
            home_region,
            issuers,
            writers,
            batch,
            seconds,
            json,
            without_projections,
            projection_save_ms,
        })),
        Command::Verify { what } => {
            drop(runtime);
            let clean = match what {
                Verify::Sim {
                    seeds,
                    seed,
                    bug,
                    history_dir,
                    safety_ms,
                } => verify::sim(seeds, seed, bug, history_dir, safety_ms)?,
                Verify::Check { history } => verify::check(&history)?,
            };
            if !clean {
                std::process::exit(1);
            }
            Ok(())
        }
    }
}

async fn dev(
    data_dir: PathBuf,
    port: u16,
    wan_delay_ms: u64,
    rebalance: bool,
) -> anyhow::Result<()> {
    let mut options = DevOptions::new(data_dir.clone());
    options.port = port;
    options.wan_delay_ms = wan_delay_ms;
    options.gateway.rebalance = rebalance;
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

/// Runs `serve` until SIGINT or SIGTERM, then lets it stop cleanly.
async fn until_signal<F, Fut>(serve: F) -> anyhow::Result<()>
where
    F: FnOnce(tokio::sync::watch::Receiver<bool>) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let serving = serve(stopped);
    tokio::pin!(serving);
    tokio::select! {
        result = &mut serving => return result,
        _ = wait_for_signal() => {}
    }
    eprintln!("stopping ...");
    let _ = stop.send(true);
    serving.await
}

async fn wait_for_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing a SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

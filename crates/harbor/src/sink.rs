//! `harbor changefeed`: a change feed into NATS JetStream, or a webhook.
//!
//! It reads `GET /v1/changefeed` from a gateway and delivers its lines in
//! batches: to NATS, one message per change on `PREFIX.changes.SHARD` (the
//! change line as JSON) with the change's position as `Nats-Msg-Id`, and
//! each resolved line on `PREFIX.resolved`; to a webhook, one `POST` per
//! batch. After each delivered batch (at every resolved line, and at least
//! once a second) it checkpoints the cursor of the batch's last line (a
//! file, replaced atomically and synced), and it starts from there again
//! after a crash or a failed delivery: the lines between the checkpoint and
//! the failure are delivered again. JetStream drops them as duplicates of
//! the same `Nats-Msg-Id` within the stream's duplicate window (two minutes
//! by default, `--duplicate-window-s`); a webhook receiver drops them by
//! their `source` position. Nothing is lost.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use async_nats::jetstream;
use async_nats::HeaderMap;
use harbor_api::{ErrorBody, FeedLine};
use tokio::sync::watch;

/// Where the sink delivers.
#[derive(Clone, Debug)]
pub enum SinkTarget {
    /// JetStream on this server (`nats://HOST:PORT`): the stream is created
    /// over `PREFIX.>` if missing; JetStream drops a change published again
    /// within `duplicate_window` (same `Nats-Msg-Id`).
    Nats {
        url: String,
        stream: String,
        subject_prefix: String,
        duplicate_window: Duration,
    },
    /// `POST` batches of feed lines (`{"lines": [...]}`) to this URL; a
    /// batch is delivered once it is answered 2xx. A batch that fails is
    /// sent again from the checkpoint, so the receiver sees every change at
    /// least once and drops repeats by their `source` position.
    Webhook { url: String },
}

/// Where the sink reads from, where it writes, where it keeps its place.
#[derive(Clone, Debug)]
pub struct SinkOptions {
    /// Gateways to read the feed from, tried in turn.
    pub urls: Vec<String>,
    pub target: SinkTarget,
    /// The cursor file: where the sink resumes.
    pub checkpoint: PathBuf,
    /// Where a sink without a checkpoint starts: `beginning` or `now`.
    pub from: String,
    /// The groups to follow (`0,3`); all when `None`.
    pub shards: Option<String>,
}

/// What the sink did so far (shared, for progress lines and tests).
#[derive(Debug, Default)]
pub struct SinkStats {
    /// Changes delivered (for NATS: stored by JetStream).
    pub published: AtomicU64,
    /// Changes JetStream dropped as already stored (a restart's replay).
    pub duplicates: AtomicU64,
    pub resolved: AtomicU64,
    /// The newest resolved time delivered (wall ms).
    pub resolved_wall_ms: AtomicU64,
    pub checkpoints: AtomicU64,
}

/// Lines delivered at once: at every resolved mark, and at least this
/// often or this many.
const BATCH_LINES_MAX: usize = 1_000;
const BATCH_AGE_MAX: Duration = Duration::from_secs(1);

/// Runs until `stop` fires (then delivers what it holds, checkpoints and
/// returns), or fails: a cursor the cluster no longer keeps, a sink that
/// cannot be set up. A gateway or a delivery that fails is tried again
/// from the checkpoint.
pub async fn run_sink(
    options: SinkOptions,
    stats: Arc<SinkStats>,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let http = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(5))
        .build()
        .expect("an HTTP client");
    let sink = Sink::open(&options.target, &http).await?;
    let mut attempt = 0usize;
    loop {
        if *stop.borrow() {
            return Ok(());
        }
        let url = &options.urls[attempt % options.urls.len()];
        attempt += 1;
        match follow(&options, &sink, &http, url, &stats, &mut stop).await {
            Ok(()) => return Ok(()),
            Err(Failure::Fatal(e)) => return Err(e),
            Err(Failure::Retry(e)) => {
                tracing::warn!(%url, error = %e, "the feed or the delivery broke; resuming from the checkpoint");
                tokio::select! {
                    _ = stop.wait_for(|s| *s) => return Ok(()),
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                }
            }
        }
    }
}

enum Failure {
    /// Give up: nothing the sink can do fixes it.
    Fatal(anyhow::Error),
    /// Try again from the checkpoint (another gateway, a new connection).
    Retry(anyhow::Error),
}

/// A target, connected.
enum Sink {
    Nats {
        js: Box<jetstream::Context>,
        prefix: String,
    },
    Webhook {
        http: reqwest::Client,
        url: String,
    },
}

impl Sink {
    async fn open(target: &SinkTarget, http: &reqwest::Client) -> anyhow::Result<Sink> {
        match target {
            SinkTarget::Nats {
                url,
                stream,
                subject_prefix,
                duplicate_window,
            } => {
                let client = async_nats::connect(url)
                    .await
                    .with_context(|| format!("connecting to NATS at {url}"))?;
                let js = jetstream::new(client);
                js.get_or_create_stream(jetstream::stream::Config {
                    name: stream.clone(),
                    subjects: vec![format!("{subject_prefix}.>")],
                    duplicate_window: *duplicate_window,
                    ..Default::default()
                })
                .await
                .map_err(|e| anyhow::anyhow!("creating the JetStream stream {stream}: {e}"))?;
                Ok(Sink::Nats {
                    js: Box::new(js),
                    prefix: subject_prefix.clone(),
                })
            }
            SinkTarget::Webhook { url } => Ok(Sink::Webhook {
                http: http.clone(),
                url: url.clone(),
            }),
        }
    }

    /// Delivers `lines`, all or (an error) not known to be.
    async fn deliver(&self, lines: &[FeedLine], stats: &SinkStats) -> anyhow::Result<()> {
        match self {
            Sink::Nats { js, prefix } => {
                let mut acks = Vec::with_capacity(lines.len());
                for line in lines {
                    let (subject, id, payload) = match line {
                        FeedLine::Change(c) => (
                            format!("{prefix}.changes.{}", c.source.shard),
                            message_id(c),
                            serde_json::to_vec(c).expect("a change encodes"),
                        ),
                        FeedLine::Resolved(r) => (
                            format!("{prefix}.resolved"),
                            format!("resolved-{}-{}", r.resolved.wall_ms, r.resolved.logical),
                            serde_json::to_vec(r).expect("a mark encodes"),
                        ),
                        FeedLine::Error(_) => continue,
                    };
                    let mut headers = HeaderMap::new();
                    headers.insert("Nats-Msg-Id", id.as_str());
                    let ack = js
                        .publish_with_headers(subject, headers, payload.into())
                        .await
                        .map_err(|e| anyhow::anyhow!("publishing to NATS: {e}"))?;
                    acks.push((matches!(line, FeedLine::Change(_)), ack));
                }
                for (change, ack) in acks {
                    let ack = ack
                        .await
                        .map_err(|e| anyhow::anyhow!("NATS did not store a message: {e}"))?;
                    match (change, ack.duplicate) {
                        (true, false) => stats.published.fetch_add(1, Ordering::Relaxed),
                        (true, true) => stats.duplicates.fetch_add(1, Ordering::Relaxed),
                        (false, _) => 0,
                    };
                }
            }
            Sink::Webhook { http, url } => {
                let answer = http
                    .post(url)
                    .timeout(Duration::from_secs(10))
                    .json(&serde_json::json!({ "lines": lines }))
                    .send()
                    .await
                    .with_context(|| format!("posting to {url}"))?;
                if !answer.status().is_success() {
                    bail!("{url} answered {}", answer.status());
                }
                let changes = lines
                    .iter()
                    .filter(|l| matches!(l, FeedLine::Change(_)))
                    .count();
                stats.published.fetch_add(changes as u64, Ordering::Relaxed);
            }
        }
        Ok(())
    }
}

/// One connection to one gateway's feed, from the checkpoint: lines are
/// delivered in batches, each followed by a checkpoint at its last line.
async fn follow(
    options: &SinkOptions,
    sink: &Sink,
    http: &reqwest::Client,
    url: &str,
    stats: &SinkStats,
    stop: &mut watch::Receiver<bool>,
) -> Result<(), Failure> {
    let fatal = |e: anyhow::Error| Failure::Fatal(e);
    let retry = |e: anyhow::Error| Failure::Retry(e);
    let checkpoint = read_checkpoint(&options.checkpoint).map_err(fatal)?;
    let mut query = vec![("resolved_ms", "200".to_string())];
    match &checkpoint {
        Some(cursor) => query.push(("from", cursor.clone())),
        None => {
            query.push(("from", options.from.clone()));
            if let Some(shards) = &options.shards {
                query.push(("shards", shards.clone()));
            }
        }
    }
    let mut response = http
        .get(format!("{url}/v1/changefeed"))
        .query(&query)
        .send()
        .await
        .map_err(|e| retry(e.into()))?;
    let status = response.status();
    if !status.is_success() {
        let body: Option<ErrorBody> = response.json().await.ok();
        let message = format!("{url} answered {status}: {body:?}");
        // A cursor the cluster no longer keeps, or parameters it refuses:
        // starting over elsewhere would skip changes or repeat the refusal.
        if status.as_u16() == 410 || status.is_client_error() {
            return Err(fatal(anyhow::anyhow!(message)));
        }
        return Err(retry(anyhow::anyhow!(message)));
    }
    let mut text = String::new();
    let mut batch: Vec<FeedLine> = Vec::new();
    let mut batch_started = Instant::now();
    loop {
        let chunk = tokio::select! {
            _ = stop.wait_for(|s| *s) => None,
            chunk = tokio::time::timeout(BATCH_AGE_MAX, response.chunk()) => Some(chunk),
        };
        let mut flush = false;
        match chunk {
            // Stopping: deliver what is held, checkpoint, done.
            None => {
                return flush_batch(options, sink, &mut batch, stats)
                    .await
                    .map_err(retry);
            }
            // Nothing for a while: deliver what is held.
            Some(Err(_elapsed)) => flush = true,
            Some(Ok(chunk)) => {
                let Some(chunk) = chunk.map_err(|e| retry(e.into()))? else {
                    return Err(retry(anyhow::anyhow!("{url} ended the feed")));
                };
                text.push_str(&String::from_utf8_lossy(&chunk));
            }
        }
        while let Some(end) = text.find('\n') {
            let raw: String = text.drain(..=end).collect();
            let line: FeedLine = serde_json::from_str(raw.trim_end()).map_err(|e| {
                fatal(anyhow::anyhow!(
                    "{url} sent a line that is not a feed line: {e}"
                ))
            })?;
            match line {
                FeedLine::Error(e) => {
                    flush_batch(options, sink, &mut batch, stats)
                        .await
                        .map_err(retry)?;
                    return Err(fatal(anyhow::anyhow!(
                        "the feed stopped: {} {}",
                        e.error,
                        e.message
                    )));
                }
                line => {
                    flush |= matches!(line, FeedLine::Resolved(_));
                    if batch.is_empty() {
                        batch_started = Instant::now();
                    }
                    batch.push(line);
                }
            }
        }
        if flush || batch.len() >= BATCH_LINES_MAX || batch_started.elapsed() >= BATCH_AGE_MAX {
            flush_batch(options, sink, &mut batch, stats)
                .await
                .map_err(retry)?;
        }
    }
}

/// Delivers the batch, then checkpoints its last line's cursor.
async fn flush_batch(
    options: &SinkOptions,
    sink: &Sink,
    batch: &mut Vec<FeedLine>,
    stats: &SinkStats,
) -> anyhow::Result<()> {
    let Some(cursor) = batch.iter().rev().find_map(|l| match l {
        FeedLine::Change(c) => Some(c.cursor.clone()),
        FeedLine::Resolved(r) => Some(r.cursor.clone()),
        FeedLine::Error(_) => None,
    }) else {
        return Ok(());
    };
    sink.deliver(batch, stats).await?;
    for line in batch.iter() {
        if let FeedLine::Resolved(r) = line {
            stats.resolved.fetch_add(1, Ordering::Relaxed);
            stats
                .resolved_wall_ms
                .store(r.resolved.wall_ms, Ordering::Relaxed);
        }
    }
    batch.clear();
    write_checkpoint(&options.checkpoint, &cursor, stats)
}

fn read_checkpoint(path: &Path) -> anyhow::Result<Option<String>> {
    match std::fs::read_to_string(path) {
        Ok(text) if text.trim().is_empty() => Ok(None),
        Ok(text) => Ok(Some(text.trim().to_string())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading the checkpoint {}", path.display())),
    }
}

/// Replaces the checkpoint durably: a synced temporary file renamed over it,
/// then the directory synced. A failure is fatal: a sink that cannot keep
/// its place must not go on.
fn write_checkpoint(path: &Path, cursor: &str, stats: &SinkStats) -> anyhow::Result<()> {
    harbor_types::durable_file::replace(path, &[cursor.as_bytes(), b"\n"])
        .with_context(|| format!("writing the checkpoint {}", path.display()))?;
    stats.checkpoints.fetch_add(1, Ordering::Relaxed);
    Ok(())
}

/// `harbor changefeed`: the sink with a progress line every second, until
/// `stop` (then it checkpoints what JetStream acknowledged).
pub async fn run_sink_command(
    options: SinkOptions,
    stop: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    if options.urls.is_empty() {
        bail!("--url: name at least one gateway");
    }
    let stats = Arc::new(SinkStats::default());
    let progress = {
        let stats = stats.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let now_ms = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis() as u64);
                let resolved = stats.resolved_wall_ms.load(Ordering::Relaxed);
                let lag = if resolved == 0 {
                    "none yet".to_string()
                } else {
                    format!("{} ms behind", now_ms.saturating_sub(resolved))
                };
                eprintln!(
                    "[{:>4} s] {} changes published, {} duplicates dropped by JetStream, resolved {lag}, {} checkpoints",
                    started.elapsed().as_secs(),
                    stats.published.load(Ordering::Relaxed),
                    stats.duplicates.load(Ordering::Relaxed),
                    stats.checkpoints.load(Ordering::Relaxed),
                );
            }
        })
    };
    let result = run_sink(options, stats, stop).await;
    progress.abort();
    result
}

/// A change line's `Nats-Msg-Id`: its position; a snapshot row's, its
/// group, the position of the state it shows and its key (the rows of one
/// scan page share a position).
fn message_id(c: &harbor_api::ChangeLine) -> String {
    let source = &c.source;
    if c.op == "snapshot" {
        format!(
            "{}-s{}-{}-{}",
            source.shard,
            source.index,
            c.key.issuer_id,
            c.key.reservation_id.as_deref().unwrap_or("")
        )
    } else {
        format!("{}-{}-{}", source.shard, source.index, source.sub)
    }
}

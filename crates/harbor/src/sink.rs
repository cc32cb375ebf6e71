//! `harbor changefeed`: a change feed into NATS JetStream.
//!
//! It reads `GET /v1/changefeed` from a gateway and publishes one message
//! per change on `PREFIX.changes.SHARD` (the change line as JSON), with the
//! change's position as `Nats-Msg-Id`, and each resolved line on
//! `PREFIX.resolved`. It checkpoints the cursor of the last line whose
//! publication JetStream acknowledged (a file, replaced atomically and
//! synced), at every resolved line and at least once a second, and starts
//! from it again after a crash: the changes between the checkpoint and the
//! crash are published again, and JetStream drops them as duplicates of the
//! same `Nats-Msg-Id` within the stream's duplicate window. So nothing is
//! lost, and nothing is stored twice as long as the sink comes back within
//! that window (two minutes by default, `--duplicate-window-s`).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use async_nats::jetstream;
use async_nats::HeaderMap;
use harbor_api::{ErrorBody, FeedLine};
use tokio::sync::watch;

/// Where the sink reads from, where it writes, where it keeps its place.
#[derive(Clone, Debug)]
pub struct SinkOptions {
    /// Gateways to read the feed from, tried in turn.
    pub urls: Vec<String>,
    /// The NATS server, such as `nats://127.0.0.1:4222`.
    pub nats: String,
    /// The JetStream stream (created if missing, over `PREFIX.>`).
    pub stream: String,
    pub subject_prefix: String,
    /// The cursor file: where the sink resumes.
    pub checkpoint: PathBuf,
    /// Where a sink without a checkpoint starts: `beginning` or `now`.
    pub from: String,
    /// The groups to follow (`0,3`); all when `None`.
    pub shards: Option<String>,
    pub duplicate_window: Duration,
}

/// What the sink did so far (shared, for progress lines and tests).
#[derive(Debug, Default)]
pub struct SinkStats {
    /// Changes JetStream stored.
    pub published: AtomicU64,
    /// Changes JetStream dropped as already stored (a restart's replay).
    pub duplicates: AtomicU64,
    pub resolved: AtomicU64,
    /// The newest resolved time published (wall ms).
    pub resolved_wall_ms: AtomicU64,
    pub checkpoints: AtomicU64,
}

/// Runs until `stop` fires (then checkpoints and returns), or fails: a
/// cursor the cluster no longer keeps, NATS gone. A gateway that stops
/// answering is left for the next one.
pub async fn run_sink(
    options: SinkOptions,
    stats: Arc<SinkStats>,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let client = async_nats::connect(&options.nats)
        .await
        .with_context(|| format!("connecting to NATS at {}", options.nats))?;
    let js = jetstream::new(client);
    js.get_or_create_stream(jetstream::stream::Config {
        name: options.stream.clone(),
        subjects: vec![format!("{}.>", options.subject_prefix)],
        duplicate_window: options.duplicate_window,
        ..Default::default()
    })
    .await
    .map_err(|e| anyhow::anyhow!("creating the JetStream stream {}: {e}", options.stream))?;
    let http = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(5))
        .build()
        .expect("an HTTP client");
    let mut attempt = 0usize;
    loop {
        if *stop.borrow() {
            return Ok(());
        }
        let url = &options.urls[attempt % options.urls.len()];
        attempt += 1;
        match follow(&options, &js, &http, url, &stats, &mut stop).await {
            Ok(()) => return Ok(()),
            Err(Failure::Fatal(e)) => return Err(e),
            Err(Failure::Retry(e)) => {
                tracing::warn!(%url, error = %e, "the feed broke; resuming from the checkpoint");
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

/// One connection to one gateway's feed, from the checkpoint.
async fn follow(
    options: &SinkOptions,
    js: &jetstream::Context,
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
    // Acknowledgements of what was published since the last checkpoint,
    // and the cursor to write once they are all in.
    let mut pending = Vec::new();
    let mut cursor: Option<String> = None;
    let mut checkpointed_at = Instant::now();
    loop {
        let chunk = tokio::select! {
            _ = stop.wait_for(|s| *s) => None,
            chunk = response.chunk() => Some(chunk),
        };
        let Some(chunk) = chunk else {
            settle(&mut pending, stats).await.map_err(retry)?;
            if let Some(cursor) = cursor.take() {
                write_checkpoint(&options.checkpoint, &cursor, stats).map_err(fatal)?;
            }
            return Ok(());
        };
        let Some(chunk) = chunk.map_err(|e| retry(e.into()))? else {
            return Err(retry(anyhow::anyhow!("{url} ended the feed")));
        };
        text.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(end) = text.find('\n') {
            let raw: String = text.drain(..=end).collect();
            let line: FeedLine = serde_json::from_str(raw.trim_end()).map_err(|e| {
                fatal(anyhow::anyhow!(
                    "{url} sent a line that is not a feed line: {e}"
                ))
            })?;
            match line {
                FeedLine::Change(change) => {
                    let subject =
                        format!("{}.changes.{}", options.subject_prefix, change.source.shard);
                    let id = format!(
                        "{}-{}-{}",
                        change.source.shard, change.source.index, change.source.sub
                    );
                    let mut headers = HeaderMap::new();
                    headers.insert("Nats-Msg-Id", id.as_str());
                    let payload = serde_json::to_vec(&change).expect("a change encodes");
                    let ack = js
                        .publish_with_headers(subject, headers, payload.into())
                        .await
                        .map_err(|e| retry(anyhow::anyhow!("publishing to NATS: {e}")))?;
                    pending.push(ack);
                    cursor = Some(change.cursor);
                }
                FeedLine::Resolved(resolved) => {
                    let subject = format!("{}.resolved", options.subject_prefix);
                    let mut headers = HeaderMap::new();
                    let id = format!(
                        "resolved-{}-{}",
                        resolved.resolved.wall_ms, resolved.resolved.logical
                    );
                    headers.insert("Nats-Msg-Id", id.as_str());
                    let payload = serde_json::to_vec(&resolved).expect("a mark encodes");
                    let ack = js
                        .publish_with_headers(subject, headers, payload.into())
                        .await
                        .map_err(|e| retry(anyhow::anyhow!("publishing to NATS: {e}")))?;
                    ack.await.map_err(|e| {
                        retry(anyhow::anyhow!("NATS did not store a resolved mark: {e}"))
                    })?;
                    settle(&mut pending, stats).await.map_err(retry)?;
                    stats.resolved.fetch_add(1, Ordering::Relaxed);
                    stats
                        .resolved_wall_ms
                        .store(resolved.resolved.wall_ms, Ordering::Relaxed);
                    write_checkpoint(&options.checkpoint, &resolved.cursor, stats)
                        .map_err(fatal)?;
                    cursor = None;
                    checkpointed_at = Instant::now();
                }
                FeedLine::Error(e) => {
                    settle(&mut pending, stats).await.map_err(retry)?;
                    if let Some(cursor) = cursor.take() {
                        write_checkpoint(&options.checkpoint, &cursor, stats).map_err(fatal)?;
                    }
                    return Err(fatal(anyhow::anyhow!(
                        "the feed stopped: {} {}",
                        e.error,
                        e.message
                    )));
                }
            }
        }
        if checkpointed_at.elapsed() >= Duration::from_secs(1) || pending.len() >= 4_096 {
            settle(&mut pending, stats).await.map_err(retry)?;
            if let Some(cursor) = cursor.take() {
                write_checkpoint(&options.checkpoint, &cursor, stats).map_err(fatal)?;
            }
            checkpointed_at = Instant::now();
        }
    }
}

/// Waits for JetStream to acknowledge every pending publication.
async fn settle(
    pending: &mut Vec<jetstream::context::PublishAckFuture>,
    stats: &SinkStats,
) -> anyhow::Result<()> {
    for ack in pending.drain(..) {
        let ack = ack
            .await
            .map_err(|e| anyhow::anyhow!("NATS did not store a change: {e}"))?;
        if ack.duplicate {
            stats.duplicates.fetch_add(1, Ordering::Relaxed);
        } else {
            stats.published.fetch_add(1, Ordering::Relaxed);
        }
    }
    Ok(())
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
/// then the directory synced.
fn write_checkpoint(path: &Path, cursor: &str, stats: &SinkStats) -> anyhow::Result<()> {
    use std::io::Write;
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let temp = path.with_extension("tmp");
    let write = || -> std::io::Result<()> {
        let mut file = std::fs::File::create(&temp)?;
        file.write_all(cursor.as_bytes())?;
        file.write_all(b"\n")?;
        file.sync_all()?;
        std::fs::rename(&temp, path)?;
        std::fs::File::open(dir)?.sync_all()
    };
    write().with_context(|| format!("writing the checkpoint {}", path.display()))?;
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

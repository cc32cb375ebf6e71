use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use harbor_types::NodeId;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_util::codec::{FramedRead, FramedWrite, LengthDelimitedCodec};

use super::{Sink, Transport};
use harbor_wire::Envelope;

use harbor_types::limits::{
    APPEND_ENTRIES_MAX, ENTRY_OVERHEAD_BYTES_MAX, FRAME_BYTES_MAX, FRAME_OVERHEAD_BYTES_MAX,
    PEER_QUEUE_MAX,
};

/// Whether every message a replica with these limits sends fits a frame of
/// `frame_bytes_max` (an append carries up to `append_bytes_max`, or one
/// entry of up to `entry_bytes_max`; a snapshot chunk `chunk_bytes_max`).
pub fn messages_fit_frames(
    frame_bytes_max: usize,
    append_bytes_max: usize,
    entry_bytes_max: usize,
    chunk_bytes_max: usize,
) -> Result<(), String> {
    // An append stops at its byte limit but carries at least one entry;
    // each of its entries adds its position and time.
    let entries_overhead = APPEND_ENTRIES_MAX * ENTRY_OVERHEAD_BYTES_MAX;
    let append = append_bytes_max.max(entry_bytes_max) + entries_overhead;
    let largest = append.max(chunk_bytes_max);
    if largest + FRAME_OVERHEAD_BYTES_MAX > frame_bytes_max {
        return Err(format!(
            "frame_bytes_max = {frame_bytes_max} cannot carry a message of {largest} bytes \
             (append_bytes_max {append_bytes_max}, entry_bytes_max {entry_bytes_max}, \
             snapshot_chunk_bytes_max {chunk_bytes_max}) plus {FRAME_OVERHEAD_BYTES_MAX} of overhead"
        ));
    }
    Ok(())
}
const RECONNECT_DELAY_MAX: Duration = Duration::from_secs(1);

/// Envelopes as length-delimited postcard frames over TCP, one outbound
/// connection per peer (reconnecting with backoff), any number inbound.
pub struct TcpTransport {
    me: NodeId,
    peers: HashMap<NodeId, SocketAddr>,
    local: Sink,
    outbound: Mutex<HashMap<NodeId, mpsc::Sender<Envelope>>>,
    runtime: tokio::runtime::Handle,
    dropped: Arc<AtomicU64>,
    frame_bytes_max: usize,
}

fn codec(frame_bytes_max: usize) -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder()
        .max_frame_length(frame_bytes_max)
        .new_codec()
}

impl TcpTransport {
    /// Listens on `listener`, delivering what arrives (and what this
    /// endpoint sends itself) to `local`, on the connection's task.
    pub fn start(
        me: NodeId,
        listener: TcpListener,
        peers: HashMap<NodeId, SocketAddr>,
        local: Sink,
    ) -> Arc<TcpTransport> {
        TcpTransport::start_with_frame_limit(me, listener, peers, local, FRAME_BYTES_MAX)
    }

    /// As [`TcpTransport::start`], with frames of at most `frame_bytes_max`
    /// bytes either way (larger ones are dropped and counted).
    pub fn start_with_frame_limit(
        me: NodeId,
        listener: TcpListener,
        peers: HashMap<NodeId, SocketAddr>,
        local: Sink,
        frame_bytes_max: usize,
    ) -> Arc<TcpTransport> {
        let runtime = tokio::runtime::Handle::current();
        let dropped = Arc::new(AtomicU64::new(0));
        let inbound = local.clone();
        let accept_dropped = dropped.clone();
        runtime.spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let _ = stream.set_nodelay(true);
                tokio::spawn(read_frames(
                    stream,
                    inbound.clone(),
                    accept_dropped.clone(),
                    frame_bytes_max,
                ));
            }
        });
        Arc::new(TcpTransport {
            me,
            peers,
            local,
            outbound: Mutex::new(HashMap::new()),
            runtime,
            dropped,
            frame_bytes_max,
        })
    }

    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

async fn read_frames(
    stream: TcpStream,
    local: Sink,
    dropped: Arc<AtomicU64>,
    frame_bytes_max: usize,
) {
    let mut frames = FramedRead::new(stream, codec(frame_bytes_max));
    while let Some(frame) = frames.next().await {
        let Ok(frame) = frame else {
            return; // Oversized or broken frame: drop the connection.
        };
        match postcard::from_bytes::<Envelope>(&frame) {
            Ok(envelope) => {
                if !local(envelope) {
                    dropped.fetch_add(1, Ordering::Relaxed);
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "undecodable frame; closing connection");
                return;
            }
        }
    }
}

async fn write_frames(
    addr: SocketAddr,
    mut queue: mpsc::Receiver<Envelope>,
    frame_bytes_max: usize,
    dropped: Arc<AtomicU64>,
) {
    let mut backoff = Duration::from_millis(10);
    let mut pending: Option<Envelope> = None;
    loop {
        let stream = match TcpStream::connect(addr).await {
            Ok(stream) => stream,
            Err(_) => {
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(RECONNECT_DELAY_MAX);
                continue;
            }
        };
        backoff = Duration::from_millis(10);
        let _ = stream.set_nodelay(true);
        let mut sink = FramedWrite::new(stream, codec(frame_bytes_max));
        loop {
            let envelope = match pending.take() {
                Some(envelope) => envelope,
                None => match queue.recv().await {
                    Some(envelope) => envelope,
                    None => return,
                },
            };
            let bytes = postcard::to_allocvec(&envelope).expect("envelopes serialize");
            if bytes.len() > frame_bytes_max {
                tracing::error!(bytes = bytes.len(), "envelope over the frame limit dropped");
                dropped.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            if sink.send(bytes::Bytes::from(bytes)).await.is_err() {
                // Connection broke: the envelope may or may not have arrived;
                // the protocol above tolerates both. Reconnect.
                break;
            }
        }
    }
}

impl Transport for TcpTransport {
    fn send(&self, envelope: Envelope) {
        if envelope.to == self.me {
            if !(self.local)(envelope) {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
            return;
        }
        let Some(addr) = self.peers.get(&envelope.to).copied() else {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let queue = {
            let mut outbound = self.outbound.lock().unwrap();
            outbound
                .entry(envelope.to.clone())
                .or_insert_with(|| {
                    let (tx, rx) = mpsc::channel(PEER_QUEUE_MAX);
                    self.runtime.spawn(write_frames(
                        addr,
                        rx,
                        self.frame_bytes_max,
                        self.dropped.clone(),
                    ));
                    tx
                })
                .clone()
        };
        if queue.try_send(envelope).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

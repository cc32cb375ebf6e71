//! Moving envelopes between endpoints (nodes and gateways).
//!
//! Sending never blocks and may drop: replication retransmits, and a client
//! request that is lost times out with an unknown outcome, which the token
//! protocol turns into a definite one. Every queue is bounded, except that
//! a control order to a replica is queued past its bound rather than
//! dropped (they are few: one per role change).
//!
//! An endpoint receives through a [`Sink`] the transport calls on the
//! sender's thread: a node's puts the envelope straight into its replica's
//! queue, a gateway's completes the waiting request. No thread sits between
//! the network and the replicas, so a write wakes only the threads that do
//! its work.

mod inproc;
mod tcp;

use std::sync::{Arc, OnceLock};

pub use inproc::{InProcNetwork, LinkFaults};
pub use tcp::{messages_fit_frames, TcpTransport};

use harbor_wire::Envelope;
pub use harbor_wire::{Sink, Transport};

/// What an [`inbox`] sink takes, in order.
pub type Inbox = tokio::sync::mpsc::Receiver<Envelope>;

/// A sink into a bounded queue (`capacity` envelopes; more are dropped), for
/// endpoints that read their envelopes as a stream (tests, tools).
pub fn inbox(capacity: usize) -> (Sink, Inbox) {
    let (tx, rx) = tokio::sync::mpsc::channel(capacity);
    (Arc::new(move |envelope| tx.try_send(envelope).is_ok()), rx)
}

/// A sink for an endpoint that needs its transport before it exists (a node
/// over TCP): it drops everything until [`LateSink::connect`].
#[derive(Clone, Default)]
pub struct LateSink {
    slot: Arc<OnceLock<Sink>>,
}

impl LateSink {
    pub fn new() -> LateSink {
        LateSink::default()
    }

    pub fn sink(&self) -> Sink {
        let slot = self.slot.clone();
        Arc::new(move |envelope| slot.get().is_some_and(|sink| sink(envelope)))
    }

    /// Connects the endpoint; only the first call counts.
    pub fn connect(&self, sink: Sink) {
        let _ = self.slot.set(sink);
    }
}

//! Moving envelopes between endpoints (nodes and gateways).
//!
//! Sending never blocks and may drop: replication retransmits, and a client
//! request that is lost times out with an unknown outcome, which the token
//! protocol turns into a definite one. Every queue is bounded.

mod inproc;
mod tcp;

pub use inproc::{InProcNetwork, LinkFaults};
pub use tcp::{TcpTransport, FRAME_BYTES_MAX};

use crate::wire::Envelope;

/// Where a node or gateway receives its envelopes.
pub type Inbox = tokio::sync::mpsc::Receiver<Envelope>;

pub trait Transport: Send + Sync + 'static {
    /// Best effort delivery of `envelope` to `envelope.to`.
    fn send(&self, envelope: Envelope);
}

//! The transport contract: how an endpoint hands an envelope to the
//! network, and how the network hands one to an endpoint. The node crate
//! implements it in-process and over TCP; the simulator with its own
//! network.

use std::sync::Arc;

use crate::envelope::Envelope;

pub trait Transport: Send + Sync + 'static {
    /// Best effort delivery of `envelope` to `envelope.to`: never blocks,
    /// may drop (replication retransmits; a lost request times out with an
    /// unknown outcome, which the token protocol turns into a definite one).
    fn send(&self, envelope: Envelope);
}

/// Where one endpoint's envelopes go. Called on the sender's thread (a
/// replica thread, a tokio worker): it must not block or take a lock the
/// sender may hold, and it returns false when it dropped the envelope.
pub type Sink = Arc<dyn Fn(Envelope) -> bool + Send + Sync>;

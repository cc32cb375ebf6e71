//! One replica of one group, as a pure state machine.
//!
//! [`GroupCore`] holds the replication core, the reservation state machine
//! and every rule between them and the clients: which requests this replica
//! takes (stale routes, not the leader), what a strong read needs (a lease
//! and the new leader's first entry applied), how stale a follower is, local
//! reads that wait for an entry, hold-expiry proposals and the clients
//! waiting for their entries to apply.
//!
//! The runtime (the node's driver thread, or the simulator) owns the disk
//! and the network, and loops:
//!
//! 1. [`GroupCore::step`] with each input and the time it was read;
//! 2. [`GroupCore::ready`] → a [`Ready`]: storage writes in order, whether
//!    they need an fsync, and envelopes to send (peer messages and client
//!    replies);
//! 3. execute the writes in order (hard state and snapshots are durable
//!    when written, appended records once synced), then send the envelopes,
//!    then fsync if asked and hand the [`Unsynced`] token back as
//!    [`Input::Synced`]; when a write fails, send nothing, and when a write
//!    or the fsync fails, step [`Input::StorageFailed`].
//!
//! Ordering rules the types carry:
//! - A client learns of a write only once its entry is applied, and an
//!   entry applies only once committed, which needs it durable here
//!   (asserted where the reply is made).
//! - Durability is reported only with the token of the `Ready` whose writes
//!   were synced; the core cannot be told of a sync it did not ask for.
//! - A `Ready`'s messages go out after its writes, and before their fsync:
//!   some vouch for a write that is durable when done (a follower
//!   acknowledges an installed snapshot in the same `Ready` that installs
//!   it), none for appended records, whose acknowledgements wait for the
//!   sync report and come out of a later `Ready`. So a leader's appends
//!   reach its followers while it syncs its own copy (Raft thesis §10.2.1).
//!
//! No IO, no clock, no thread: given the same inputs and times, a
//! `GroupCore` does the same thing, which is what lets the simulator run it
//! exactly as it ships.

mod changes;
mod group;
mod load;
mod requests;
#[cfg(test)]
mod tests;

pub use crate::group::{GroupCore, Input, Ready, RecoverError, Settings, Unsynced, Write};

//! A whole Harbor cluster in one thread, from one `u64` seed.
//!
//! The simulator runs the real replica drivers (replication core, reservation
//! state machine, WAL) on simulated disks, connects them with a simulated
//! network (delay, loss, duplication, reordering, one-way partitions), gives
//! every node a drifting clock, and drives a workload of clients in both
//! regions that records every operation to a history. A safety phase injects
//! faults (crashes with torn writes, failing fsyncs, pauses, partitions); a
//! liveness phase heals everything and must converge. The history is then
//! checked by `harbor-checker`.
//!
//! Until the control plane exists, the simulator plays its part: it names
//! leaders, starts a new generation when a leader restarts, and fails a
//! crashed leader over to the local replica with the longest log once every
//! other local replica has answered (the set asked intersects every commit
//! quorum).

mod rng;
mod world;

pub use rng::Rng;
pub use world::{run, SimOptions, SimOutcome, SimStats};

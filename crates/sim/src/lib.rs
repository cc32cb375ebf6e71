//! A whole Harbor cluster in one thread, from one `u64` seed.
//!
//! The simulator runs the real replica drivers (replication core, reservation
//! state machine, WAL) on simulated disks, connects them with a simulated
//! network (delay, loss, duplication, reordering, one-way partitions), gives
//! every node a drifting and stepping wall clock beside its monotonic one,
//! and drives a workload of clients in every region that records every
//! operation to a history. A safety phase injects
//! faults (crashes with torn writes, failing fsyncs, pauses, partitions); a
//! liveness phase heals everything and must converge. The history is then
//! checked by `harbor-checker`.
//!
//! Each seed draws its own cluster ([`Swarm`]): regions, replicas,
//! `sync_acks`, batch sizes, snapshot interval, retained log, timings and
//! delays. Clients send through the gateway's own routing state machine
//! (`harbor_gateway::call`) and find issuers by the gateway's directory
//! rule. The simulator still plays the control loop with its own copy of
//! `harbor dev`'s (publish, tell, seal, refresh) around the same failover
//! planner (`harbor_meta::failover`): it names leaders, starts a new
//! generation when a leader restarts, fails a silent leader over once its
//! lease ran out, and runs planned transfers.

mod rng;
mod swarm;
mod world;

pub use rng::Rng;
pub use swarm::Swarm;
pub use world::{run, SimOptions, SimOutcome, SimStats};

//! The node runtime: one process-level host for replicas of many groups.
//!
//! Each replica runs on its own thread ([`driver`]), which owns the group
//! core (`harbor-group`: replication core, reservation state machine and
//! every client rule) and the WAL, and executes what the core asks with
//! real IO: a batch of inputs becomes one WAL write and one fsync (group
//! commit). [`transport`] moves envelopes between
//! nodes and gateways, in-process or over TCP. What the envelopes carry is
//! the `harbor-wire` crate's.

pub mod config;
pub mod driver;
pub mod node;
pub mod queue;
pub mod transport;

pub use config::{NodeConfig, NodeConfigError, ReplicaPlan};
pub use node::{Hosting, Node, NodeStartError, OnMembership};
pub use transport::{
    inbox, InProcNetwork, Inbox, LateSink, LinkFaults, Sink, TcpTransport, Transport,
};

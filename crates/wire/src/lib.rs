//! The contracts between Harbor's processes, shared by the node runtime,
//! the gateway, the control plane and the simulator: envelopes and what
//! they carry ([`envelope`]), typed refusals ([`error`]) and the transport
//! trait ([`transport`]). Plain data: no threads, no runtime, no IO.

pub mod changes;
pub mod envelope;
pub mod error;
pub mod load;
pub mod transport;

pub use changes::{Change, ChangePosition, ChangesPage, ScanPage};
pub use envelope::{
    Body, Control, Envelope, Freshness, GroupStatus, Query, QueryResult, Request, Response, Route,
    Served,
};
pub use error::{ErrorCode, ErrorKind, NodeError};
pub use load::{LoadCounts, LoadReport};
pub use transport::{Sink, Transport};

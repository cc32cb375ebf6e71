//! The HTTP gateway of one region.
//!
//! Any gateway accepts any request: it validates the input (bad input is
//! refused here and changes nothing), finds the issuer's bucket in the
//! directory and the bucket's group in the shard map, and sends the request
//! over the transport to the group's leader, wherever it is; reads that
//! allow it go to a replica in the gateway's own region (see [`reads`]).
//! Every answer says which node served it, at which commit position, and
//! how fresh it is.

pub mod admin;
mod api;
mod batch;
mod body;
pub mod call;
mod cluster;
mod drain;
pub mod endpoint;
mod error;
mod feed_http;
mod hot;
pub mod local;
mod metrics;
pub mod mover;
mod moves_http;
mod projection_http;
mod projection_view;
mod projections;
pub mod reads;
pub mod rebalancer;
mod router;
mod routes;

pub use admin::{Admin, AdminError, ClusterView, Fault};
pub use error::ApiError;
pub use reads::{Consistency, Session, SESSION_HEADER};
pub use router::{Gateway, GatewayConfig, GatewayConfigError};
pub use routes::routes;

//! The HTTP gateway of one region.
//!
//! Any gateway accepts any request: it validates the input (bad input is
//! refused here and changes nothing), finds the issuer's bucket in the
//! directory and the bucket's group in the shard map, and sends the request
//! over the transport to the group's leader, wherever it is. The answer says
//! which node served it and at which commit position.

pub mod admin;
mod api;
mod error;
mod router;

pub use admin::{Admin, ClusterView, Fault};
pub use api::routes;
pub use error::ApiError;
pub use router::{Gateway, GatewayConfig};

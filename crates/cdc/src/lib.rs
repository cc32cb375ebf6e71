//! The committed log as a product (DESIGN.md section 8), without IO.
//!
//! - [`feed`]: where a change feed stands in each group's change stream
//!   (its cursor) and when it may promise a resolved mark. The HTTP feed,
//!   the sinks and the simulator drive the same [`feed::Feed`].
//! - [`projection`]: a derived view of every group's stream (compliance
//!   search, exposure report, customer view), applied exactly once by
//!   position, started from a scan of each group's state, and complete up
//!   to a watermark it publishes.

pub mod feed;
pub mod projection;

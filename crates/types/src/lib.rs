//! Shared vocabulary of every Harbor plane: identifiers, log positions,
//! commit tokens, the two clocks, hybrid-logical timestamps and money amounts.
//!
//! Every default limit and timing is in [`limits`]; small files that must be
//! replaced whole are written with [`durable_file::replace`].
//!
//! Every id and position is a newtype so a core's public API never takes a
//! bare `u64` or `String` whose meaning the reader has to guess.

mod clock;
pub mod durable_file;
mod hlc;
mod ids;
pub mod limits;
mod position;
pub mod sim;

pub use clock::{MonoMs, Now, WallMs};
pub use hlc::{Hlc, Timestamp};
pub use ids::{
    Amount, BucketId, IdError, IssuerId, NodeId, Region, ReservationId, ReservationToken,
    AMOUNT_MAX, ID_LEN_MAX, TOKEN_LEN_MAX,
};
pub use position::{CommitToken, Generation, LogIndex, ParseCommitTokenError, ShardId};

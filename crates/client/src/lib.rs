//! A typed async client for Harbor's gateway HTTP API.
//!
//! - **Sessions.** Every answer carries the client's session (per shard, the
//!   newest commit token it has seen); the client merges it and sends it on
//!   every request as `Harbor-Session`, so [`Consistency::Session`] reads see
//!   this client's own writes even when a nearby follower serves them.
//!   Clones of a [`Client`] share one session.
//! - **Writes that never happen twice.** A reserve carries a token
//!   (generated unless the caller gives one). Every retry sends the same
//!   token, and a reserve still unsure near its deadline resolves the token,
//!   so it ends with the reservation, a rejection or [`Error::Abandoned`];
//!   "maybe" ([`Error::DeadlineExceeded`] with `outcome_unknown`) only when
//!   even the resolve could not get through in time. Confirm, release and
//!   issuer writes are idempotent and simply retried.
//! - **Retries and failover.** Retryable refusals (`503` with
//!   `retryable: true`, routing refusals) are retried with backoff,
//!   honoring `Retry-After`, within the call's deadline. A gateway that
//!   cannot be reached is left for the next URL given to the builder.
//!   Anything else is answered at once as a typed [`Error`].
//!
//! ```no_run
//! use std::time::Duration;
//!
//! use harbor_client::{Client, Consistency, Error, ErrorCode, ReserveRequest};
//!
//! # async fn example() -> Result<(), Error> {
//! let client = Client::builder(["http://127.0.0.1:7400", "http://127.0.0.1:7401"])
//!     .deadline(Duration::from_secs(5))
//!     .build()?;
//! client.put_issuer("MUNI-77", "newyork", 1_000).await?;
//!
//! let held = client
//!     .reserve(ReserveRequest::new("MUNI-77", 600, "madrid-rates", "t-17"))
//!     .await?;
//! println!("{} is {:?}; {:?} left", held.reservation_id, held.status, held.remaining);
//!
//! // Sees the reserve above (the session carries its commit token), even
//! // when a follower in this region serves the read.
//! let issuer = client.get_issuer("MUNI-77", Consistency::Session).await?;
//! assert!(issuer.reserved >= 600);
//! println!("served by a {} in {}", issuer.served.served_by, issuer.served.region);
//!
//! match client
//!     .reserve(ReserveRequest::new("MUNI-77", 600, "madrid-rates", "t-18"))
//!     .await
//! {
//!     Ok(r) => println!("reserved {}", r.reservation_id),
//!     Err(Error::Rejected(e)) if e.error_code() == Some(ErrorCode::InsufficientExposure) => {
//!         println!("refused: only {:?} left", e.remaining())
//!     }
//!     Err(e) => return Err(e),
//! }
//! # Ok(())
//! # }
//! ```

mod client;
mod error;
mod model;
mod session;
mod token;

pub use client::{BatchResult, Client, ClientBuilder, BATCH_MAX, SESSION_HEADER};
pub use error::{ApiError, Error};
/// The HTTP API's types, which the answers above come from.
pub use harbor_api as api;
pub use harbor_api::{ClusterView, ErrorCode};
pub use model::{
    CommitToken, Consistency, Health, HlcTime, Issuer, OpenReservations, ParseCommitTokenError,
    Reservation, ReservationStatus, ReserveRequest, Served, TokenState, TokenStatus, Transfer,
};
pub use token::{new_reservation_token, AMOUNT_MAX, HOLD_TTL_MS_MAX, ID_LEN_MAX, TOKEN_LEN_MAX};

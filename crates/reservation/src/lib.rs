//! The reservation state machine of one replica group: issuers with limits,
//! reservations (held, confirmed, released, expired) and the durable outcome
//! of every reservation token.
//!
//! It is a pure deterministic core. Every replica applies the group's
//! committed [`Command`]s in log order with [`StateMachine::apply`]; the
//! entry's position and leader-assigned time come in an [`ApplyContext`], so
//! there is no clock, IO or randomness inside, and all maps are ordered.
//! Equal logs give byte-identical [`StateMachine::snapshot`]s.
//!
//! The promises kept here (DESIGN.md §1, §2):
//! - an issuer's `reserved` (held + confirmed) never exceeds its `limit`;
//! - a reservation token is decided once: its outcome (committed, rejected
//!   for insufficient exposure, or abandoned) is written by the same entry
//!   that made the decision, a replay with the same payload gets the
//!   original outcome back, and a different payload is refused;
//! - every change is reported as an [`Event`], the outbox for CDC.
//!
//! Tokens are scoped per issuer: the issuer is the unit of placement, so the
//! exposure decision and its token outcome live in one bucket and are written
//! by one entry; a global token table would make every reserve span shards.
//!
//! Token records are kept forever for now; a later change adds retention.

mod command;
mod machine;
mod moves;
mod outcome;
mod rows;

pub use command::{ApplyContext, Command, BATCH_COMMANDS_MAX, FIELD_LEN_MAX, HOLD_TTL_MS_MAX};
pub use machine::{BucketRecord, ScanKey, ScanRows, SnapshotError, StateMachine, SNAPSHOT_FORMAT};
pub use moves::{ExportKey, ExportPage, ExportPart};
pub use outcome::{
    Applied, Event, IssuerView, Outcome, Rejection, ReservationView, Status, TokenOutcome,
    TokenView,
};
pub use rows::{BucketRows, IssuerRow, ReservationRow, TokenRow, TokenRowOutcome};

#[cfg(test)]
mod prop_tests;
#[cfg(test)]
mod tests;

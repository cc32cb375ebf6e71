use harbor_types::{
    Amount, BucketId, CommitToken, IssuerId, Region, ReservationId, ReservationToken, ShardId,
    Timestamp,
};
use serde::{Deserialize, Serialize};

/// The longest hold a client may ask for (7 days: longer exposure is a
/// confirmed reservation, not a hold), and the most commands one
/// [`Command::Batch`] carries (TigerBeetle takes up to 8,190 events per
/// request; so do we). Both are defined with every other limit.
pub use harbor_types::limits::{BATCH_COMMANDS_MAX, HOLD_TTL_MS_MAX};
/// The longest `desk` or `trader` accepted, in bytes.
pub const FIELD_LEN_MAX: usize = harbor_types::ID_LEN_MAX;

/// One command of a group's replicated log, encoded with postcard.
///
/// Commands carry raw client input: the state machine validates it when it
/// applies the entry and answers bad input with a [`crate::Rejection`], so a
/// malformed command can never wedge a replica.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// Register an issuer, or change the limit of an existing one.
    UpsertIssuer {
        issuer_id: IssuerId,
        home_region: Region,
        limit: Amount,
    },
    /// Reserve `amount` against the issuer's limit. With `hold_ttl_ms` the
    /// reservation is a hold that expires unless confirmed; without it the
    /// reservation is confirmed at once.
    Reserve {
        token: ReservationToken,
        issuer_id: IssuerId,
        amount: Amount,
        desk: String,
        trader: String,
        hold_ttl_ms: Option<u64>,
    },
    Confirm {
        reservation_id: ReservationId,
    },
    Release {
        reservation_id: ReservationId,
    },
    /// Expire every hold whose `expires_at_ms <= at.wall_ms` of this entry.
    /// The leader proposes it when [`crate::StateMachine::next_hold_expiry_ms`]
    /// has passed.
    ExpireHolds,
    /// Make a token's outcome final: report the existing one, or commit
    /// "abandoned" so a late request with that token can never commit.
    ResolveToken {
        issuer_id: IssuerId,
        token: ReservationToken,
    },
    /// A new leader's first entry.
    Noop,
    /// Several client commands in one log entry, applied in order, each
    /// with its own outcome: one rejection does not fail the others. Only
    /// reserve, confirm, release and resolve commands may be batched.
    Batch(Vec<Command>),
    /// [`Command::Reserve`] for a customer (seed 004's customer view). A
    /// variant of its own, after the others, so logs written before it
    /// still decode.
    ReserveForCustomer {
        token: ReservationToken,
        issuer_id: IssuerId,
        amount: Amount,
        desk: String,
        trader: String,
        hold_ttl_ms: Option<u64>,
        customer_id: String,
    },
    /// [`Command::UpsertIssuer`] naming the bucket the metadata plane
    /// placed the issuer in, so the group knows which of its issuers a
    /// bucket's seal covers. What gateways send; an issuer registered by
    /// an `UpsertIssuer` (before buckets were recorded) gets its bucket
    /// from its next `PlaceIssuer` or from a seal that names it.
    PlaceIssuer {
        issuer_id: IssuerId,
        home_region: Region,
        limit: Amount,
        bucket: BucketId,
    },
    /// From this entry on, every write to an issuer of `bucket` is refused
    /// as [`crate::Rejection::Moved`] (and changes nothing), and its holds
    /// do not expire here: the bucket is leaving this group (a move's
    /// cutover). `issuers` are issuers of the bucket the group may not
    /// know the bucket of (registered by `UpsertIssuer`); they are tagged
    /// with it. Sealing a sealed bucket changes nothing.
    SealBucket {
        bucket: BucketId,
        issuers: Vec<IssuerId>,
    },
    /// Takes writes for `bucket` again (a move that aborted before its
    /// target took the bucket over).
    UnsealBucket {
        bucket: BucketId,
    },
    /// Stages rows of `bucket`, copied from group `from` by move
    /// `move_id`, out of sight until acquired. Upserts: a row copied again
    /// replaces the staged one.
    ImportBucket {
        bucket: BucketId,
        move_id: u64,
        from: ShardId,
        rows: crate::BucketRows,
    },
    /// The rows move `move_id` staged become this group's, and so do the
    /// bucket's writes from this entry on; `epoch` counts the bucket's
    /// moves. Refused if the staged rows are not consistent.
    AcquireBucket {
        bucket: BucketId,
        move_id: u64,
        epoch: u64,
    },
    /// Drops what move `move_id` staged, unless it was acquired already.
    AbortImport {
        bucket: BucketId,
        move_id: u64,
    },
    /// The rows of sealed `bucket` leave this group: group `to` acquired
    /// them.
    ReleaseBucket {
        bucket: BucketId,
        to: ShardId,
    },
    /// Issuers registered before buckets were recorded learn theirs (from
    /// the metadata directory), so a move of the bucket takes them along.
    TagIssuers {
        bucket: BucketId,
        issuers: Vec<IssuerId>,
    },
    /// [`Command::Batch`] with each command's bucket, as the sender's
    /// directory places it: a group that let the bucket go refuses the
    /// whole entry as moved, even for an issuer it never held (one
    /// registered in the bucket's next group).
    BucketBatch(Vec<(BucketId, Command)>),
}

impl Command {
    /// Whether this is one of a bucket move's own steps (not a client's
    /// write to the bucket).
    pub fn moves_a_bucket(&self) -> bool {
        matches!(
            self,
            Command::SealBucket { .. }
                | Command::UnsealBucket { .. }
                | Command::ImportBucket { .. }
                | Command::AcquireBucket { .. }
                | Command::ReleaseBucket { .. }
                | Command::AbortImport { .. }
                | Command::TagIssuers { .. }
        )
    }

    /// Whether a client may put this command in a [`Command::Batch`].
    pub fn batchable(&self) -> bool {
        matches!(
            self,
            Command::Reserve { .. }
                | Command::ReserveForCustomer { .. }
                | Command::Confirm { .. }
                | Command::Release { .. }
                | Command::ResolveToken { .. }
        )
    }

    /// The issuer the command writes to, if one.
    pub fn issuer(&self) -> Option<&IssuerId> {
        match self {
            Command::UpsertIssuer { issuer_id, .. }
            | Command::PlaceIssuer { issuer_id, .. }
            | Command::Reserve { issuer_id, .. }
            | Command::ReserveForCustomer { issuer_id, .. }
            | Command::ResolveToken { issuer_id, .. } => Some(issuer_id),
            Command::Confirm { reservation_id } | Command::Release { reservation_id } => {
                Some(reservation_id.issuer())
            }
            Command::ExpireHolds
            | Command::Noop
            | Command::Batch(_)
            | Command::SealBucket { .. }
            | Command::UnsealBucket { .. }
            | Command::ImportBucket { .. }
            | Command::AcquireBucket { .. }
            | Command::AbortImport { .. }
            | Command::ReleaseBucket { .. }
            | Command::TagIssuers { .. }
            | Command::BucketBatch(_) => None,
        }
    }
}

/// Where and when an entry sits in the log.
///
/// `at` is the HLC time the leader assigned when it proposed the entry. Hold
/// expiry reads only `at.wall_ms`, never a local clock, so every replica
/// expires the same holds at the same entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ApplyContext {
    pub position: CommitToken,
    pub at: Timestamp,
}

//! The rows a group holds (issuers, their reservations, the outcome of
//! every token) and the copies of them a bucket move carries from one
//! group to another.

use std::collections::{BTreeMap, BTreeSet};

use harbor_types::{
    Amount, BucketId, CommitToken, IssuerId, Region, ReservationId, ReservationToken, ShardId,
    Timestamp,
};
use serde::{Deserialize, Serialize};

use crate::outcome::Status;

/// The request a token was first decided with. Kept verbatim rather than
/// hashed: a hash collision would turn a 409 into a silently wrong replay.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct ReserveRequest {
    pub(crate) amount: Amount,
    pub(crate) desk: String,
    pub(crate) trader: String,
    pub(crate) hold_ttl_ms: Option<u64>,
    /// Encoded after the state (see [`crate::SNAPSHOT_FORMAT`]).
    #[serde(skip)]
    pub(crate) customer_id: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Reservation {
    pub(crate) token: ReservationToken,
    pub(crate) amount: Amount,
    pub(crate) desk: String,
    pub(crate) trader: String,
    /// As requested; also the committed token's payload fingerprint.
    pub(crate) hold_ttl_ms: Option<u64>,
    pub(crate) status: Status,
    /// `Some` exactly while `status == Held`: `created_at.wall_ms + hold_ttl_ms`.
    pub(crate) expires_at_ms: Option<u64>,
    pub(crate) created: CommitToken,
    pub(crate) created_at: Timestamp,
    pub(crate) updated: CommitToken,
    /// Encoded after the state (see [`crate::SNAPSHOT_FORMAT`]).
    #[serde(skip)]
    pub(crate) customer_id: Option<String>,
}

impl Reservation {
    pub(crate) fn request(&self) -> ReserveRequest {
        ReserveRequest {
            amount: self.amount,
            desk: self.desk.clone(),
            trader: self.trader.clone(),
            hold_ttl_ms: self.hold_ttl_ms,
            customer_id: self.customer_id.clone(),
        }
    }
}

/// A token's durable outcome. A committed token's payload is its
/// reservation's, so only rejections keep their request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum TokenRecord {
    Committed {
        seq: u64,
        commit_token: CommitToken,
    },
    /// Rejected for insufficient exposure; `remaining` as it was then.
    Rejected {
        request: ReserveRequest,
        remaining: Amount,
        commit_token: CommitToken,
    },
    /// Resolved before any request arrived, so it has no payload.
    Abandoned {
        commit_token: CommitToken,
    },
}

impl TokenRecord {
    /// The entry that decided the token.
    pub(crate) fn commit_token(&self) -> CommitToken {
        match self {
            TokenRecord::Committed { commit_token, .. }
            | TokenRecord::Rejected { commit_token, .. }
            | TokenRecord::Abandoned { commit_token } => *commit_token,
        }
    }
}

/// One issuer and every row that belongs to it. Tokens are scoped per issuer
/// because the issuer is the unit of placement: the exposure decision and
/// its token outcome must be written by the same entry in the same bucket,
/// and a global token table would span shards.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Issuer {
    pub(crate) home_region: Region,
    pub(crate) limit: Amount,
    /// Sum of held and confirmed amounts; `<= limit`.
    pub(crate) reserved: Amount,
    /// The seq of the next reservation; reservation ids are `{issuer}:r{seq}`.
    pub(crate) next_seq: u64,
    pub(crate) updated: CommitToken,
    /// Every reservation ever made, closed ones included, by seq.
    pub(crate) reservations: BTreeMap<u64, Reservation>,
    /// Every token ever decided. Kept forever for now; retention is a later
    /// feature, and until then memory grows with the number of requests.
    pub(crate) tokens: BTreeMap<ReservationToken, TokenRecord>,
    /// Index: seqs of held and confirmed reservations. Rebuilt on restore.
    #[serde(skip)]
    pub(crate) open: BTreeSet<u64>,
    /// The bucket the metadata plane placed the issuer in; `None` for an
    /// issuer registered before buckets were recorded, until a
    /// `PlaceIssuer` or a seal names it. Encoded after the state (see
    /// [`crate::SNAPSHOT_FORMAT`]).
    #[serde(skip)]
    pub(crate) bucket: Option<BucketId>,
}

impl Issuer {
    pub(crate) fn remaining(&self) -> Amount {
        self.limit
            .checked_sub(self.reserved)
            .unwrap_or_else(|| panic!("reserved {} exceeds limit {}", self.reserved, self.limit))
    }
}

/// One issuer's own row, as a move copies it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IssuerRow {
    pub issuer_id: IssuerId,
    pub home_region: Region,
    pub limit: Amount,
    pub reserved: Amount,
    pub next_seq: u64,
    pub updated: CommitToken,
}

/// One reservation, whole.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReservationRow {
    pub issuer_id: IssuerId,
    pub seq: u64,
    pub token: ReservationToken,
    pub amount: Amount,
    pub desk: String,
    pub trader: String,
    pub hold_ttl_ms: Option<u64>,
    pub status: Status,
    pub expires_at_ms: Option<u64>,
    pub created: CommitToken,
    pub created_at: Timestamp,
    pub updated: CommitToken,
    pub customer_id: Option<String>,
}

/// One token's outcome, with the request a rejection kept.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRow {
    pub issuer_id: IssuerId,
    pub token: ReservationToken,
    pub outcome: TokenRowOutcome,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum TokenRowOutcome {
    Committed {
        seq: u64,
        commit_token: CommitToken,
    },
    Rejected {
        amount: Amount,
        desk: String,
        trader: String,
        hold_ttl_ms: Option<u64>,
        customer_id: Option<String>,
        remaining: Amount,
        commit_token: CommitToken,
    },
    Abandoned {
        commit_token: CommitToken,
    },
}

/// Rows of one bucket: a page of an export, one entry of an import.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BucketRows {
    pub issuers: Vec<IssuerRow>,
    pub reservations: Vec<ReservationRow>,
    pub tokens: Vec<TokenRow>,
}

impl BucketRows {
    pub fn len(&self) -> usize {
        self.issuers.len() + self.reservations.len() + self.tokens.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Their encoded size, as an import entry carries them.
    pub fn encoded_bytes(&self) -> u64 {
        postcard::to_allocvec(self).map_or(0, |b| b.len() as u64)
    }
}

/// Rows a move staged here, out of sight until the bucket is acquired.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Staged {
    pub(crate) move_id: u64,
    pub(crate) from: ShardId,
    pub(crate) issuers: BTreeMap<IssuerId, Issuer>,
    /// What each issuer's staged rows add up to, kept as they arrive: the
    /// acquisition (inside the write pause) checks these instead of
    /// reading every row.
    pub(crate) tallies: BTreeMap<IssuerId, Tally>,
    /// The staged holds, for the expiry index once acquired.
    pub(crate) holds: BTreeSet<(u64, ReservationId)>,
}

/// One staged issuer's rows, summed up.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Tally {
    /// The amounts of its held and confirmed reservations.
    pub(crate) open_amount: u128,
    /// Its committed tokens.
    pub(crate) committed: usize,
    /// Its committed tokens whose reservation carries them (token and
    /// position): a consistent copy has as many as reservations.
    pub(crate) matched: usize,
    /// Why each row that fails its checks fails (a row a later pass
    /// replaces is checked again).
    pub(crate) broken: BTreeMap<crate::ExportPart, String>,
    /// Its own row arrived (a copy always starts an issuer with it).
    pub(crate) has_issuer_row: bool,
}

/// A staged import, encoded after the state in snapshot format 4.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct StagedOut {
    pub(crate) bucket: BucketId,
    pub(crate) move_id: u64,
    pub(crate) from: ShardId,
    pub(crate) rows: BucketRows,
}

pub(crate) fn reservation_row(issuer_id: &IssuerId, seq: u64, r: &Reservation) -> ReservationRow {
    ReservationRow {
        issuer_id: issuer_id.clone(),
        seq,
        token: r.token.clone(),
        amount: r.amount,
        desk: r.desk.clone(),
        trader: r.trader.clone(),
        hold_ttl_ms: r.hold_ttl_ms,
        status: r.status,
        expires_at_ms: r.expires_at_ms,
        created: r.created,
        created_at: r.created_at,
        updated: r.updated,
        customer_id: r.customer_id.clone(),
    }
}

pub(crate) fn reservation_of(row: &ReservationRow) -> Reservation {
    Reservation {
        token: row.token.clone(),
        amount: row.amount,
        desk: row.desk.clone(),
        trader: row.trader.clone(),
        hold_ttl_ms: row.hold_ttl_ms,
        status: row.status,
        expires_at_ms: row.expires_at_ms,
        created: row.created,
        created_at: row.created_at,
        updated: row.updated,
        customer_id: row.customer_id.clone(),
    }
}

pub(crate) fn token_row(
    issuer_id: &IssuerId,
    token: &ReservationToken,
    record: &TokenRecord,
) -> TokenRow {
    let outcome = match record {
        TokenRecord::Committed { seq, commit_token } => TokenRowOutcome::Committed {
            seq: *seq,
            commit_token: *commit_token,
        },
        TokenRecord::Rejected {
            request,
            remaining,
            commit_token,
        } => TokenRowOutcome::Rejected {
            amount: request.amount,
            desk: request.desk.clone(),
            trader: request.trader.clone(),
            hold_ttl_ms: request.hold_ttl_ms,
            customer_id: request.customer_id.clone(),
            remaining: *remaining,
            commit_token: *commit_token,
        },
        TokenRecord::Abandoned { commit_token } => TokenRowOutcome::Abandoned {
            commit_token: *commit_token,
        },
    };
    TokenRow {
        issuer_id: issuer_id.clone(),
        token: token.clone(),
        outcome,
    }
}

pub(crate) fn token_record_of(outcome: &TokenRowOutcome) -> TokenRecord {
    match outcome {
        TokenRowOutcome::Committed { seq, commit_token } => TokenRecord::Committed {
            seq: *seq,
            commit_token: *commit_token,
        },
        TokenRowOutcome::Rejected {
            amount,
            desk,
            trader,
            hold_ttl_ms,
            customer_id,
            remaining,
            commit_token,
        } => TokenRecord::Rejected {
            request: ReserveRequest {
                amount: *amount,
                desk: desk.clone(),
                trader: trader.clone(),
                hold_ttl_ms: *hold_ttl_ms,
                customer_id: customer_id.clone(),
            },
            remaining: *remaining,
            commit_token: *commit_token,
        },
        TokenRowOutcome::Abandoned { commit_token } => TokenRecord::Abandoned {
            commit_token: *commit_token,
        },
    }
}

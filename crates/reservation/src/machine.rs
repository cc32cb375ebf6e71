use crate::command::{ApplyContext, Command, FIELD_LEN_MAX, HOLD_TTL_MS_MAX};
use crate::outcome::{
    Applied, Event, IssuerView, Outcome, Rejection, ReservationView, Status, TokenOutcome,
    TokenView,
};
use crate::rows::{Issuer, Reservation, ReserveRequest, Staged, StagedOut, TokenRecord};
use harbor_types::sim::{probe, Bugs};
use harbor_types::{
    Amount, BucketId, CommitToken, IssuerId, Region, ReservationId, ReservationToken, ShardId,
    Timestamp, AMOUNT_MAX,
};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

/// Returns an error made of the message unless the condition holds (the
/// invariant checks must not panic: they also judge decoded snapshots).
macro_rules! ensure {
    ($cond:expr, $($fmt:tt)+) => {
        if !$cond {
            return Err(format!($($fmt)+));
        }
    };
}

/// The first byte of every snapshot. Bump it when the encoding changes.
/// 4: the state, the time of the last applied entry, the customer ids,
/// then the buckets. Formats 1 (the state alone), 2 (no customer ids) and
/// 3 (no buckets) are still read.
pub const SNAPSHOT_FORMAT: u8 = 4;

/// Customer ids, encoded after the state in format 3 (formats 1 and 2 have
/// none): a reservation's, and a rejected token's request's.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Customers {
    reservations: Vec<(IssuerId, u64, String)>,
    rejections: Vec<(IssuerId, ReservationToken, String)>,
}

/// Buckets, encoded after the customer ids in format 4: each issuer's
/// bucket (those that have one) and the buckets whose writes this group
/// stopped or started taking.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Buckets {
    issuers: Vec<(IssuerId, BucketId)>,
    records: Vec<(BucketId, BucketRecord)>,
    staged: Vec<StagedOut>,
}

/// Where a group stands with a bucket whose writes it stopped or started
/// taking (a bucket it never sealed has none: it takes its writes).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BucketRecord {
    /// The entry that sealed it: writes to it are refused from there on.
    /// `None` while the group takes them.
    pub sealed_at: Option<CommitToken>,
    /// The entry from which the group last took its writes again (an
    /// unseal, or the acquisition of the bucket from another group);
    /// `None` if it took them all along.
    pub opened_at: Option<CommitToken>,
    /// Its rows left for this group after the seal: the bucket is gone.
    pub released_to: Option<ShardId>,
    /// How many moves brought the bucket here (0: it never moved).
    pub epoch: u64,
    /// The move whose acquisition brought it here.
    pub acquired_by: Option<u64>,
    /// The newest move whose import was aborted here: its rows (and any
    /// older move's) are refused from then on, so a move cannot go on
    /// after its abort (a driver that did not hear of it).
    pub aborted_up_to: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("snapshot is empty")]
    Empty,
    #[error("snapshot format {found} is not supported; expected {expected}")]
    UnsupportedFormat { found: u8, expected: u8 },
    #[error("snapshot does not decode: {0}")]
    Decode(#[from] postcard::Error),
    #[error("snapshot has {count} bytes after its end")]
    TrailingBytes { count: usize },
    #[error("snapshot decodes to an inconsistent state: {reason}")]
    Inconsistent { reason: String },
}

/// Where a scan of a group's state stands: after an issuer's row (`seq`
/// 0) or after one of its reservations.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ScanKey {
    pub issuer_id: IssuerId,
    pub seq: u64,
}

impl ScanKey {
    pub fn issuer(issuer_id: IssuerId) -> ScanKey {
        ScanKey { issuer_id, seq: 0 }
    }
}

/// A page of [`StateMachine::scan`]. `next` is where the following page
/// starts; `None` once the state is read to its end.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScanRows {
    pub issuers: Vec<IssuerView>,
    pub reservations: Vec<ReservationView>,
    pub next: Option<ScanKey>,
    /// The epoch of each issuer in the page whose bucket moved here (see
    /// [`StateMachine::epoch_of`]); the others' is 0.
    #[serde(default)]
    pub epochs: Vec<(IssuerId, u64)>,
}

/// The reservation state machine of one replica group. Every replica applies
/// the same committed entries in log order and so holds the same state:
/// apply is a pure function of (state, entry), with no clock, randomness or
/// hash-order iteration. Serial apply in log order is what makes the
/// exposure check safe without locks.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateMachine {
    pub(crate) applied: Option<CommitToken>,
    pub(crate) issuers: BTreeMap<IssuerId, Issuer>,
    /// The time of the last applied entry: a replica restored from a
    /// snapshot orders its own entries after it. Encoded after the state
    /// (see [`SNAPSHOT_FORMAT`]).
    #[serde(skip)]
    pub(crate) applied_at: Option<Timestamp>,
    /// Index: `(expires_at_ms, id)` of every held reservation, so the next
    /// expiry and each `ExpireHolds` cost O(log n) per hold. Rebuilt on restore.
    #[serde(skip)]
    pub(crate) holds_by_expiry: BTreeSet<(u64, ReservationId)>,
    /// Index: the issuers placed in each bucket. Rebuilt on restore.
    #[serde(skip)]
    pub(crate) by_bucket: BTreeMap<BucketId, BTreeSet<IssuerId>>,
    /// Buckets sealed here (writes to their issuers are refused as
    /// moved) or unsealed since. Encoded after the state.
    #[serde(skip)]
    pub(crate) buckets: BTreeMap<BucketId, BucketRecord>,
    /// Rows moves staged here, by bucket. Encoded after the state.
    #[serde(skip)]
    pub(crate) staged: BTreeMap<BucketId, Staged>,
    /// The holds of sealed buckets' issuers, out of `holds_by_expiry`: a
    /// sealed bucket's holds expire in its next owner, or here again once
    /// it is unsealed. Rebuilt on restore.
    #[serde(skip)]
    pub(crate) sealed_holds: BTreeSet<(u64, ReservationId)>,
    /// Simulator-only protocol bugs; never set outside it.
    #[serde(skip)]
    bugs: Bugs,
}

fn check_amount(field: &'static str, value: Amount, min: Amount) -> Result<(), Rejection> {
    if value < min || value.0 > AMOUNT_MAX {
        return Err(Rejection::InvalidAmount {
            field: field.to_string(),
            value,
            min,
            max: Amount(AMOUNT_MAX),
        });
    }
    Ok(())
}

fn check_text(field: &'static str, value: &str) -> Result<(), Rejection> {
    let reason = if value.is_empty() {
        "must not be empty".to_string()
    } else if value.len() > FIELD_LEN_MAX {
        format!(
            "is {} bytes long; at most {FIELD_LEN_MAX} are allowed",
            value.len()
        )
    } else if value.chars().any(char::is_control) {
        "must not contain control characters".to_string()
    } else {
        return Ok(());
    };
    Err(Rejection::InvalidField {
        field: field.to_string(),
        reason,
    })
}

fn check_hold_ttl(hold_ttl_ms: Option<u64>) -> Result<(), Rejection> {
    match hold_ttl_ms {
        Some(ttl) if ttl == 0 || ttl > HOLD_TTL_MS_MAX => Err(Rejection::InvalidField {
            field: "hold_ttl_ms".to_string(),
            reason: format!("must be within 1..={HOLD_TTL_MS_MAX}, got {ttl}"),
        }),
        _ => Ok(()),
    }
}

fn issuer_view(issuer_id: &IssuerId, issuer: &Issuer) -> IssuerView {
    IssuerView {
        issuer_id: issuer_id.clone(),
        home_region: issuer.home_region.clone(),
        limit: issuer.limit,
        reserved: issuer.reserved,
        remaining: issuer.remaining(),
        reservations_open: u64::try_from(issuer.open.len()).expect("open count fits u64"),
        updated: Some(issuer.updated),
    }
}

fn reservation_view(issuer_id: &IssuerId, seq: u64, r: &Reservation) -> ReservationView {
    ReservationView {
        reservation_id: ReservationId::new(issuer_id.clone(), seq),
        issuer_id: issuer_id.clone(),
        reservation_token: r.token.clone(),
        amount: r.amount,
        desk: r.desk.clone(),
        trader: r.trader.clone(),
        status: r.status,
        expires_at_ms: r.expires_at_ms,
        created: r.created,
        created_at: r.created_at,
        updated: r.updated,
        customer_id: r.customer_id.clone(),
    }
}

fn token_view(issuer_id: &IssuerId, token: &ReservationToken, record: &TokenRecord) -> TokenView {
    let outcome = match record {
        TokenRecord::Committed { seq, commit_token } => TokenOutcome::Committed {
            reservation_id: ReservationId::new(issuer_id.clone(), *seq),
            commit_token: *commit_token,
        },
        TokenRecord::Rejected { commit_token, .. } => TokenOutcome::Rejected {
            code: "insufficient_exposure".to_string(),
            commit_token: *commit_token,
        },
        TokenRecord::Abandoned { commit_token } => TokenOutcome::Abandoned {
            commit_token: *commit_token,
        },
    };
    TokenView {
        issuer_id: issuer_id.clone(),
        token: token.clone(),
        outcome,
    }
}

/// Close an open reservation (`to` is released or expired): free its amount
/// and drop it from the indexes. Returns the amount freed.
fn close(
    issuer: &mut Issuer,
    holds_by_expiry: &mut BTreeSet<(u64, ReservationId)>,
    id: &ReservationId,
    to: Status,
    position: CommitToken,
) -> Amount {
    assert!(
        matches!(to, Status::Released | Status::Expired),
        "close to {to}"
    );
    let r = issuer
        .reservations
        .get_mut(&id.seq())
        .expect("closing a known reservation");
    assert!(r.status.is_open(), "closing {id} which is {}", r.status);
    if let Some(expires_at_ms) = r.expires_at_ms.take() {
        assert_eq!(
            r.status,
            Status::Held,
            "{id} has an expiry but is {}",
            r.status
        );
        let removed = holds_by_expiry.remove(&(expires_at_ms, id.clone()));
        assert!(
            removed,
            "hold {id} missing from the expiry index at {expires_at_ms}"
        );
    }
    r.status = to;
    r.updated = position;
    assert!(
        issuer.open.remove(&id.seq()),
        "{id} missing from the open index"
    );
    issuer.reserved = issuer.reserved.checked_sub(r.amount).unwrap_or_else(|| {
        panic!(
            "freeing {} of {id} but only {} reserved",
            r.amount, issuer.reserved
        )
    });
    issuer.updated = position;
    r.amount
}

impl StateMachine {
    pub fn new() -> StateMachine {
        StateMachine::default()
    }

    /// Switches simulator bugs on or off (see [`harbor_types::sim::Bugs`]).
    pub fn set_bugs(&mut self, bugs: Bugs) {
        self.bugs = bugs;
    }

    /// Apply one committed entry. Deterministic. Bad command content is
    /// answered with [`Outcome::Rejected`]; only a broken internal invariant
    /// (or positions out of order, a bug in the caller) panics.
    pub fn apply(&mut self, ctx: &ApplyContext, cmd: &Command) -> Applied {
        if let Some(prev) = self.applied {
            assert_eq!(
                prev.shard, ctx.position.shard,
                "entry of another shard applied"
            );
            assert!(
                ctx.position.index > prev.index,
                "positions must strictly increase: {} after {prev}",
                ctx.position
            );
            assert!(
                ctx.position.generation >= prev.generation,
                "generation went backwards: {} after {prev}",
                ctx.position
            );
        }
        self.applied = Some(ctx.position);
        self.applied_at = Some(ctx.at);
        let mut events = Vec::new();
        if let Some(bucket) = self.moved(cmd) {
            probe("reservation.write_refused_for_sealed_bucket");
            return Applied {
                outcome: Outcome::Rejected(Rejection::Moved { bucket }),
                events,
            };
        }
        let outcome = match cmd {
            Command::Batch(_) | Command::BucketBatch(_) => Outcome::Batch(
                batched(cmd)
                    .into_iter()
                    .map(|cmd| match cmd.batchable() {
                        true => self.apply_one(ctx, &mut events, cmd),
                        false => Outcome::Rejected(Rejection::InvalidField {
                            field: "batch".into(),
                            reason:
                                "only reserve, confirm, release and resolve commands may be batched"
                                    .into(),
                        }),
                    })
                    .collect(),
            ),
            cmd => self.apply_one(ctx, &mut events, cmd),
        };
        assert!(
            events.iter().all(|e| e.position() == ctx.position),
            "event positions differ from entry {}",
            ctx.position
        );
        Applied { outcome, events }
    }

    /// The sealed bucket a command (or any command of a batch) writes to:
    /// the whole entry is refused and changes nothing, so the request can
    /// go to the bucket's next owner as it is.
    fn moved(&self, cmd: &Command) -> Option<BucketId> {
        let nothing_moves = self.buckets.is_empty() && self.staged.is_empty();
        if nothing_moves || self.bugs.source_accepts_after_seal {
            return None;
        }
        let sealed = |bucket: Option<BucketId>| bucket.filter(|b| !self.takes_writes(*b));
        // An issuer only staged here is the bucket's that moves in.
        let bucket_of = |id: &IssuerId| {
            self.bucket_of(id).or_else(|| {
                self.staged
                    .iter()
                    .find(|(_, s)| s.issuers.contains_key(id))
                    .map(|(b, _)| *b)
            })
        };
        match cmd {
            Command::Batch(commands) => commands.iter().find_map(|cmd| self.moved(cmd)),
            Command::BucketBatch(commands) => commands
                .iter()
                .find_map(|(bucket, cmd)| sealed(Some(*bucket)).or_else(|| self.moved(cmd))),
            Command::PlaceIssuer {
                issuer_id, bucket, ..
            } => sealed(Some(*bucket)).or_else(|| sealed(bucket_of(issuer_id))),
            cmd => sealed(cmd.issuer().and_then(bucket_of)),
        }
    }

    /// One command of an entry (a batch applies several, in order).
    fn apply_one(&mut self, ctx: &ApplyContext, events: &mut Vec<Event>, cmd: &Command) -> Outcome {
        let result = match cmd {
            Command::UpsertIssuer {
                issuer_id,
                home_region,
                limit,
            } => self.upsert_issuer(ctx, events, issuer_id, home_region, *limit, None),
            Command::PlaceIssuer {
                issuer_id,
                home_region,
                limit,
                bucket,
            } => self.upsert_issuer(ctx, events, issuer_id, home_region, *limit, Some(*bucket)),
            Command::SealBucket { bucket, issuers } => Ok(self.seal_bucket(ctx, *bucket, issuers)),
            Command::UnsealBucket { bucket } => Ok(self.unseal_bucket(ctx, *bucket)),
            Command::ImportBucket {
                bucket,
                move_id,
                from,
                rows,
            } => self.import_bucket(*bucket, *move_id, *from, rows),
            Command::AcquireBucket {
                bucket,
                move_id,
                epoch,
            } => self.acquire_bucket(ctx, events, *bucket, *move_id, *epoch),
            Command::AbortImport { bucket, move_id } => Ok(self.abort_import(*bucket, *move_id)),
            Command::ReleaseBucket { bucket, to } => self.release_bucket(ctx, events, *bucket, *to),
            Command::TagIssuers { bucket, issuers } => Ok(self.tag_issuers(*bucket, issuers)),
            Command::Reserve {
                token,
                issuer_id,
                amount,
                desk,
                trader,
                hold_ttl_ms,
            } => {
                let request = ReserveRequest {
                    amount: *amount,
                    desk: desk.clone(),
                    trader: trader.clone(),
                    hold_ttl_ms: *hold_ttl_ms,
                    customer_id: None,
                };
                self.reserve(ctx, events, issuer_id, token, request)
            }
            Command::ReserveForCustomer {
                token,
                issuer_id,
                amount,
                desk,
                trader,
                hold_ttl_ms,
                customer_id,
            } => {
                let request = ReserveRequest {
                    amount: *amount,
                    desk: desk.clone(),
                    trader: trader.clone(),
                    hold_ttl_ms: *hold_ttl_ms,
                    customer_id: Some(customer_id.clone()),
                };
                self.reserve(ctx, events, issuer_id, token, request)
            }
            Command::Confirm { reservation_id } => self.confirm(ctx, events, reservation_id),
            Command::Release { reservation_id } => self.release(ctx, events, reservation_id),
            Command::ExpireHolds => Ok(self.expire_holds(ctx, events)),
            Command::ResolveToken { issuer_id, token } => {
                self.resolve_token(ctx, events, issuer_id, token)
            }
            Command::Noop => Ok(Outcome::Noop),
            Command::Batch(_) | Command::BucketBatch(_) => {
                unreachable!("a batch is applied by apply")
            }
        };
        result.unwrap_or_else(Outcome::Rejected)
    }

    fn upsert_issuer(
        &mut self,
        ctx: &ApplyContext,
        events: &mut Vec<Event>,
        issuer_id: &IssuerId,
        home_region: &Region,
        limit: Amount,
        bucket: Option<BucketId>,
    ) -> Result<Outcome, Rejection> {
        check_amount("limit", limit, Amount::ZERO)?;
        let Some(issuer) = self.issuers.get_mut(issuer_id) else {
            let issuer = Issuer {
                home_region: home_region.clone(),
                limit,
                reserved: Amount::ZERO,
                next_seq: 1,
                updated: ctx.position,
                reservations: BTreeMap::new(),
                tokens: BTreeMap::new(),
                open: BTreeSet::new(),
                bucket: None,
            };
            let view = issuer_view(issuer_id, &issuer);
            self.issuers.insert(issuer_id.clone(), issuer);
            if let Some(bucket) = bucket {
                self.place(issuer_id, bucket);
            }
            events.push(Event::IssuerRegistered {
                position: ctx.position,
                at: ctx.at,
                issuer_id: issuer_id.clone(),
                home_region: home_region.clone(),
                limit,
            });
            return Ok(Outcome::Issuer {
                issuer: view,
                created: true,
                changed: true,
            });
        };
        if issuer.home_region != *home_region {
            return Err(Rejection::HomeRegionMismatch {
                issuer_id: issuer_id.clone(),
                home_region: issuer.home_region.clone(),
            });
        }
        // `bucket` is not recorded for an issuer that exists: one
        // registered before buckets were recorded learns its bucket only
        // from a move's `TagIssuers` (or a seal naming it), before the move
        // copies anything; tagged later, a move's passes over what changed
        // would not see its rows.
        let limit_before = issuer.limit;
        if limit != limit_before {
            if limit < issuer.reserved {
                return Err(Rejection::LimitBelowReserved {
                    issuer_id: issuer_id.clone(),
                    limit,
                    reserved: issuer.reserved,
                });
            }
            issuer.limit = limit;
            issuer.updated = ctx.position;
            events.push(Event::LimitChanged {
                position: ctx.position,
                at: ctx.at,
                issuer_id: issuer_id.clone(),
                limit_before,
                limit,
            });
        }
        Ok(Outcome::Issuer {
            issuer: issuer_view(issuer_id, issuer),
            created: false,
            changed: limit != limit_before,
        })
    }

    fn reserve(
        &mut self,
        ctx: &ApplyContext,
        events: &mut Vec<Event>,
        issuer_id: &IssuerId,
        token: &ReservationToken,
        request: ReserveRequest,
    ) -> Result<Outcome, Rejection> {
        check_amount("amount", request.amount, Amount(1))?;
        check_text("desk", &request.desk)?;
        check_text("trader", &request.trader)?;
        if let Some(customer_id) = &request.customer_id {
            check_text("customer_id", customer_id)?;
        }
        check_hold_ttl(request.hold_ttl_ms)?;
        let issuer = self
            .issuers
            .get_mut(issuer_id)
            .ok_or_else(|| Rejection::UnknownIssuer {
                issuer_id: issuer_id.clone(),
            })?;
        if let Some(record) = issuer.tokens.get(token) {
            if !self.bugs.apply_token_twice {
                return replay(issuer_id, issuer, token, record, &request);
            }
        }

        let remaining = issuer.remaining();
        if request.amount > remaining {
            issuer.tokens.insert(
                token.clone(),
                TokenRecord::Rejected {
                    request: request.clone(),
                    remaining,
                    commit_token: ctx.position,
                },
            );
            let rejection = Rejection::InsufficientExposure {
                issuer_id: issuer_id.clone(),
                requested: request.amount,
                remaining,
            };
            events.push(Event::ReservationRejected {
                position: ctx.position,
                at: ctx.at,
                issuer_id: issuer_id.clone(),
                token: token.clone(),
                code: rejection.code().to_string(),
                requested: request.amount,
                remaining,
            });
            return Err(rejection);
        }

        let seq = issuer.next_seq;
        issuer.next_seq = seq.checked_add(1).expect("reservation seq overflow");
        let id = ReservationId::new(issuer_id.clone(), seq);
        let (status, expires_at_ms) = match request.hold_ttl_ms {
            Some(ttl) => {
                let expires_at_ms =
                    ctx.at.wall_ms.checked_add(ttl).unwrap_or_else(|| {
                        panic!("entry time {} + hold ttl {ttl} overflows", ctx.at)
                    });
                assert!(
                    self.holds_by_expiry.insert((expires_at_ms, id.clone())),
                    "new hold {id} already in the expiry index"
                );
                (Status::Held, Some(expires_at_ms))
            }
            None => (Status::Confirmed, None),
        };
        issuer.reserved = issuer
            .reserved
            .checked_add(request.amount)
            .unwrap_or_else(|| {
                panic!(
                    "reserved {} + {} overflows",
                    issuer.reserved, request.amount
                )
            });
        assert!(
            issuer.reserved <= issuer.limit,
            "reserved {} over limit {} after {id}",
            issuer.reserved,
            issuer.limit
        );
        issuer.updated = ctx.position;
        let reservation = Reservation {
            token: token.clone(),
            amount: request.amount,
            desk: request.desk,
            trader: request.trader,
            hold_ttl_ms: request.hold_ttl_ms,
            status,
            expires_at_ms,
            created: ctx.position,
            created_at: ctx.at,
            updated: ctx.position,
            customer_id: request.customer_id,
        };
        let view = reservation_view(issuer_id, seq, &reservation);
        assert!(
            issuer.reservations.insert(seq, reservation).is_none(),
            "{id} reused"
        );
        assert!(issuer.open.insert(seq), "{id} already open");
        let committed = TokenRecord::Committed {
            seq,
            commit_token: ctx.position,
        };
        assert!(
            issuer.tokens.insert(token.clone(), committed).is_none(),
            "token {token} reused"
        );
        events.push(Event::ReservationCreated {
            position: ctx.position,
            at: ctx.at,
            reservation: view.clone(),
        });
        Ok(Outcome::Reservation {
            reservation: view,
            replayed: false,
        })
    }

    fn confirm(
        &mut self,
        ctx: &ApplyContext,
        events: &mut Vec<Event>,
        id: &ReservationId,
    ) -> Result<Outcome, Rejection> {
        let issuer = issuer_of(&mut self.issuers, id)?;
        let r = issuer.reservations.get_mut(&id.seq()).expect("looked up");
        match r.status {
            Status::Confirmed => {
                return Ok(Outcome::Reservation {
                    reservation: reservation_view(id.issuer(), id.seq(), r),
                    replayed: true,
                })
            }
            from @ (Status::Released | Status::Expired) => {
                return Err(Rejection::InvalidTransition {
                    reservation_id: id.clone(),
                    from,
                    action: "confirm".to_string(),
                })
            }
            Status::Held => {}
        }
        let expires_at_ms = r.expires_at_ms.expect("a hold has an expiry");
        if ctx.at.wall_ms >= expires_at_ms {
            // Due but not yet swept: expire it in this entry so the answer and
            // the state agree.
            close(
                issuer,
                &mut self.holds_by_expiry,
                id,
                Status::Expired,
                ctx.position,
            );
            events.push(Event::ReservationExpired {
                position: ctx.position,
                at: ctx.at,
                reservation: reservation_view(
                    id.issuer(),
                    id.seq(),
                    &issuer.reservations[&id.seq()],
                ),
            });
            probe("reservation.hold_expired_at_confirm");
            return Err(Rejection::HoldExpired {
                reservation_id: id.clone(),
                expires_at_ms,
            });
        }
        let removed = self.holds_by_expiry.remove(&(expires_at_ms, id.clone()));
        assert!(
            removed,
            "hold {id} missing from the expiry index at {expires_at_ms}"
        );
        r.status = Status::Confirmed;
        r.expires_at_ms = None;
        r.updated = ctx.position;
        let reservation = reservation_view(id.issuer(), id.seq(), r);
        events.push(Event::ReservationConfirmed {
            position: ctx.position,
            at: ctx.at,
            reservation: reservation.clone(),
        });
        Ok(Outcome::Reservation {
            reservation,
            replayed: false,
        })
    }

    /// Releasing a hold that is due but not yet swept releases it: the entry
    /// order decides, and either way its amount is freed.
    fn release(
        &mut self,
        ctx: &ApplyContext,
        events: &mut Vec<Event>,
        id: &ReservationId,
    ) -> Result<Outcome, Rejection> {
        let issuer = issuer_of(&mut self.issuers, id)?;
        let status = issuer.reservations[&id.seq()].status;
        let replayed = match status {
            Status::Released => true,
            Status::Expired => {
                return Err(Rejection::InvalidTransition {
                    reservation_id: id.clone(),
                    from: status,
                    action: "release".to_string(),
                })
            }
            Status::Held | Status::Confirmed => {
                close(
                    issuer,
                    &mut self.holds_by_expiry,
                    id,
                    Status::Released,
                    ctx.position,
                );
                events.push(Event::ReservationReleased {
                    position: ctx.position,
                    at: ctx.at,
                    reservation: reservation_view(
                        id.issuer(),
                        id.seq(),
                        &issuer.reservations[&id.seq()],
                    ),
                });
                false
            }
        };
        Ok(Outcome::Reservation {
            reservation: reservation_view(id.issuer(), id.seq(), &issuer.reservations[&id.seq()]),
            replayed,
        })
    }

    /// Expires every due hold. Complete rather than bounded: a partial sweep
    /// would still be deterministic, but would leave due holds counting
    /// against the limit for an unknown number of entries.
    fn expire_holds(&mut self, ctx: &ApplyContext, events: &mut Vec<Event>) -> Outcome {
        let mut count: u64 = 0;
        while let Some((expires_at_ms, id)) = self.holds_by_expiry.first().cloned() {
            if expires_at_ms > ctx.at.wall_ms {
                break;
            }
            let issuer = self
                .issuers
                .get_mut(id.issuer())
                .expect("hold of a known issuer");
            close(
                issuer,
                &mut self.holds_by_expiry,
                &id,
                Status::Expired,
                ctx.position,
            );
            events.push(Event::ReservationExpired {
                position: ctx.position,
                at: ctx.at,
                reservation: reservation_view(
                    id.issuer(),
                    id.seq(),
                    &issuer.reservations[&id.seq()],
                ),
            });
            count = count.checked_add(1).expect("expired count overflow");
        }
        Outcome::Expired { count }
    }

    fn resolve_token(
        &mut self,
        ctx: &ApplyContext,
        events: &mut Vec<Event>,
        issuer_id: &IssuerId,
        token: &ReservationToken,
    ) -> Result<Outcome, Rejection> {
        let issuer = self
            .issuers
            .get_mut(issuer_id)
            .ok_or_else(|| Rejection::UnknownIssuer {
                issuer_id: issuer_id.clone(),
            })?;
        let record = issuer.tokens.entry(token.clone()).or_insert_with(|| {
            events.push(Event::TokenAbandoned {
                position: ctx.position,
                at: ctx.at,
                issuer_id: issuer_id.clone(),
                token: token.clone(),
            });
            TokenRecord::Abandoned {
                commit_token: ctx.position,
            }
        });
        Ok(Outcome::Token(token_view(issuer_id, token, record)))
    }

    fn seal_bucket(
        &mut self,
        ctx: &ApplyContext,
        bucket: BucketId,
        untagged: &[IssuerId],
    ) -> Outcome {
        self.tag(bucket, untagged);
        let record = self.buckets.entry(bucket).or_default();
        record.sealed_at.get_or_insert(ctx.position);
        // Its holds leave the expiry index (those of issuers it just named
        // too, when it was sealed already): nothing of a sealed bucket
        // changes here, not even by time.
        self.park_holds(bucket);
        self.bucket_outcome(bucket)
    }

    /// Moves a bucket's holds out of the expiry index (it is sealed).
    fn park_holds(&mut self, bucket: BucketId) {
        let holds: Vec<_> = self
            .holds_by_expiry
            .iter()
            .filter(|(_, id)| self.bucket_of(id.issuer()) == Some(bucket))
            .cloned()
            .collect();
        for hold in holds {
            self.holds_by_expiry.remove(&hold);
            self.sealed_holds.insert(hold);
        }
    }

    /// Puts a bucket's holds back in the expiry index (it is unsealed).
    fn unpark_holds(&mut self, bucket: BucketId) {
        let holds: Vec<_> = self
            .sealed_holds
            .iter()
            .filter(|(_, id)| self.bucket_of(id.issuer()) == Some(bucket))
            .cloned()
            .collect();
        for hold in holds {
            self.sealed_holds.remove(&hold);
            self.holds_by_expiry.insert(hold);
        }
    }

    fn tag(&mut self, bucket: BucketId, untagged: &[IssuerId]) {
        for issuer_id in untagged {
            self.place(issuer_id, bucket);
        }
    }

    /// Places an issuer that has no bucket yet in `bucket`.
    pub(crate) fn place(&mut self, issuer_id: &IssuerId, bucket: BucketId) {
        let unplaced = |i: &&mut Issuer| i.bucket.is_none();
        if let Some(issuer) = self.issuers.get_mut(issuer_id).filter(unplaced) {
            issuer.bucket = Some(bucket);
            let ids = self.by_bucket.entry(bucket).or_default();
            ids.insert(issuer_id.clone());
        }
    }

    /// The issuers placed in `bucket`, by id.
    pub(crate) fn bucket_issuers(&self, bucket: BucketId) -> impl Iterator<Item = &IssuerId> {
        self.by_bucket.get(&bucket).into_iter().flatten()
    }

    /// Tags issuers with their bucket; a sealed bucket's seal covers them
    /// at once (as if they had been named by it).
    fn tag_issuers(&mut self, bucket: BucketId, untagged: &[IssuerId]) -> Outcome {
        self.tag(bucket, untagged);
        if self.is_sealed(bucket) {
            self.park_holds(bucket);
        }
        self.bucket_outcome(bucket)
    }

    /// Issuers that do not know their bucket (registered before buckets
    /// were recorded), at most `max`.
    pub fn untagged_issuers(&self, after: Option<&IssuerId>, max: usize) -> Vec<IssuerId> {
        let from = match after {
            Some(id) => std::ops::Bound::Excluded(id),
            None => std::ops::Bound::Unbounded,
        };
        self.issuers
            .range::<IssuerId, _>((from, std::ops::Bound::Unbounded))
            .filter(|(_, i)| i.bucket.is_none())
            .map(|(id, _)| id.clone())
            .take(max)
            .collect()
    }

    fn unseal_bucket(&mut self, ctx: &ApplyContext, bucket: BucketId) -> Outcome {
        // A released bucket is gone: it cannot be unsealed.
        let sealed = |r: &&mut BucketRecord| r.sealed_at.is_some() && r.released_to.is_none();
        if let Some(record) = self.buckets.get_mut(&bucket).filter(sealed) {
            record.sealed_at = None;
            record.opened_at = Some(ctx.position);
            self.unpark_holds(bucket);
        }
        self.bucket_outcome(bucket)
    }

    pub(crate) fn bucket_outcome(&self, bucket: BucketId) -> Outcome {
        let held = self.bucket_issuers(bucket).count();
        let staged = self.staged.get(&bucket).map_or(0, |s| s.issuers.len());
        Outcome::Bucket {
            bucket,
            record: self.bucket(bucket),
            issuers: (held + staged) as u64,
        }
    }

    /// Where this group stands with `bucket`.
    pub fn bucket(&self, bucket: BucketId) -> BucketRecord {
        self.buckets.get(&bucket).copied().unwrap_or_default()
    }

    fn is_sealed(&self, bucket: BucketId) -> bool {
        self.buckets
            .get(&bucket)
            .is_some_and(|r| r.sealed_at.is_some())
    }

    /// Whether this group takes writes to `bucket`: not sealed here (nor
    /// released), and not a bucket moving in.
    pub fn takes_writes(&self, bucket: BucketId) -> bool {
        !self.is_sealed(bucket) && !self.staged.contains_key(&bucket)
    }

    /// Whether this group serves reads of `bucket`: it takes its writes.
    /// A sealed bucket's newest state may be another group's already (the
    /// target acquires it before the source hears of it), so its reads
    /// wait for the move like its writes.
    pub fn serves_reads(&self, bucket: BucketId) -> bool {
        self.takes_writes(bucket)
    }

    /// Whether this group serves reads of an issuer's rows (see
    /// [`StateMachine::serves_reads`]).
    pub fn serves_issuer(&self, issuer: &IssuerId) -> bool {
        self.bucket_of(issuer).is_none_or(|b| self.serves_reads(b))
    }

    /// The bucket an issuer is placed in, as this group knows it.
    pub fn bucket_of(&self, issuer: &IssuerId) -> Option<BucketId> {
        self.issuers.get(issuer).and_then(|i| i.bucket)
    }

    /// The position of the last applied entry.
    pub fn applied(&self) -> Option<CommitToken> {
        self.applied
    }

    /// The time of the last applied entry (`None` from a snapshot of
    /// format 1).
    pub fn applied_at(&self) -> Option<Timestamp> {
        self.applied_at
    }

    pub fn issuer(&self, id: &IssuerId) -> Option<IssuerView> {
        self.issuers.get(id).map(|issuer| issuer_view(id, issuer))
    }

    pub fn issuers(&self) -> impl Iterator<Item = &IssuerId> {
        self.issuers.keys()
    }

    pub fn reservation(&self, id: &ReservationId) -> Option<ReservationView> {
        let r = self.issuers.get(id.issuer())?.reservations.get(&id.seq())?;
        Some(reservation_view(id.issuer(), id.seq(), r))
    }

    /// Held and confirmed reservations of an issuer, by id; `None` if the
    /// issuer is unknown.
    pub fn open_reservations(&self, id: &IssuerId) -> Option<Vec<ReservationView>> {
        let issuer = self.issuers.get(id)?;
        let views = issuer
            .open
            .iter()
            .map(|seq| reservation_view(id, *seq, &issuer.reservations[seq]))
            .collect();
        Some(views)
    }

    pub fn token(&self, issuer: &IssuerId, token: &ReservationToken) -> Option<TokenView> {
        let record = self.issuers.get(issuer)?.tokens.get(token)?;
        Some(token_view(issuer, token, record))
    }

    /// The earliest `expires_at_ms` of any held reservation: the leader
    /// proposes `ExpireHolds` once its clock has passed it.
    pub fn next_hold_expiry_ms(&self) -> Option<u64> {
        self.holds_by_expiry
            .first()
            .map(|(expires_at_ms, _)| *expires_at_ms)
    }

    /// A page of the whole state, issuer by issuer (each issuer's row, then
    /// its reservations by seq), after `after` and at most `max` rows: what
    /// a change feed's initial scan and a projection's rebuild read.
    pub fn scan(&self, after: Option<&ScanKey>, max: usize) -> ScanRows {
        let mut rows = self.scan_rows(after, max);
        if !self.buckets.is_empty() {
            let ids: BTreeSet<&IssuerId> = rows
                .issuers
                .iter()
                .map(|i| &i.issuer_id)
                .chain(rows.reservations.iter().map(|r| &r.issuer_id))
                .collect();
            rows.epochs = ids
                .into_iter()
                .map(|id| (id.clone(), self.epoch_of(id)))
                .filter(|(_, epoch)| *epoch > 0)
                .collect();
        }
        rows
    }

    fn scan_rows(&self, after: Option<&ScanKey>, max: usize) -> ScanRows {
        let mut rows = ScanRows::default();
        let mut taken = 0;
        let issuers = match after {
            Some(key) => self.issuers.range::<IssuerId, _>((
                std::ops::Bound::Included(&key.issuer_id),
                std::ops::Bound::Unbounded,
            )),
            None => self.issuers.range::<IssuerId, _>(..),
        };
        for (issuer_id, issuer) in issuers {
            let from = match after {
                Some(key) if key.issuer_id == *issuer_id => key.seq,
                _ => {
                    if taken == max {
                        break;
                    }
                    rows.issuers.push(issuer_view(issuer_id, issuer));
                    taken += 1;
                    rows.next = Some(ScanKey::issuer(issuer_id.clone()));
                    0
                }
            };
            for (seq, r) in issuer.reservations.range(from + 1..) {
                if taken == max {
                    return rows;
                }
                rows.reservations.push(reservation_view(issuer_id, *seq, r));
                taken += 1;
                rows.next = Some(ScanKey {
                    issuer_id: issuer_id.clone(),
                    seq: *seq,
                });
            }
        }
        if taken < max {
            rows.next = None;
        }
        rows
    }

    /// Encode the whole state: a format byte, then postcard. Deterministic:
    /// equal states give equal bytes.
    pub fn snapshot(&self) -> Vec<u8> {
        let mut bytes = vec![SNAPSHOT_FORMAT];
        let body = postcard::to_stdvec(self).expect("state machine encodes");
        bytes.extend_from_slice(&body);
        let at = postcard::to_stdvec(&self.applied_at).expect("a time encodes");
        bytes.extend_from_slice(&at);
        let customers = postcard::to_stdvec(&self.customers()).expect("customer ids encode");
        bytes.extend_from_slice(&customers);
        let buckets = Buckets {
            issuers: self
                .issuers
                .iter()
                .filter_map(|(id, issuer)| Some((id.clone(), issuer.bucket?)))
                .collect(),
            records: self.buckets.iter().map(|(b, r)| (*b, *r)).collect(),
            staged: self.staged_out(),
        };
        let buckets = postcard::to_stdvec(&buckets).expect("buckets encode");
        bytes.extend_from_slice(&buckets);
        bytes
    }

    /// Every customer id the state holds, in order (format 3's trailer).
    fn customers(&self) -> Customers {
        let mut customers = Customers::default();
        for (issuer_id, issuer) in &self.issuers {
            for (seq, r) in &issuer.reservations {
                if let Some(customer_id) = &r.customer_id {
                    customers
                        .reservations
                        .push((issuer_id.clone(), *seq, customer_id.clone()));
                }
            }
            for (token, record) in &issuer.tokens {
                if let TokenRecord::Rejected { request, .. } = record {
                    if let Some(customer_id) = &request.customer_id {
                        customers.rejections.push((
                            issuer_id.clone(),
                            token.clone(),
                            customer_id.clone(),
                        ));
                    }
                }
            }
        }
        customers
    }

    /// Decode a snapshot, rebuild the indexes and check every invariant, so
    /// corrupt bytes give an error rather than a replica that panics later.
    pub fn restore(bytes: &[u8]) -> Result<StateMachine, SnapshotError> {
        let (&format, body) = bytes.split_first().ok_or(SnapshotError::Empty)?;
        if !(1..=SNAPSHOT_FORMAT).contains(&format) {
            return Err(SnapshotError::UnsupportedFormat {
                found: format,
                expected: SNAPSHOT_FORMAT,
            });
        }
        let (mut machine, mut rest): (StateMachine, _) = postcard::take_from_bytes(body)?;
        if format >= 2 {
            let (at, after): (Option<Timestamp>, _) = postcard::take_from_bytes(rest)?;
            machine.applied_at = at;
            rest = after;
        }
        if format >= 3 {
            let (customers, after): (Customers, _) = postcard::take_from_bytes(rest)?;
            rest = after;
            for (issuer_id, seq, customer_id) in customers.reservations {
                let r = machine
                    .issuers
                    .get_mut(&issuer_id)
                    .and_then(|i| i.reservations.get_mut(&seq))
                    .ok_or_else(|| SnapshotError::Inconsistent {
                        reason: format!("customer of {issuer_id}:r{seq}, which is not there"),
                    })?;
                r.customer_id = Some(customer_id);
            }
            for (issuer_id, token, customer_id) in customers.rejections {
                let record = machine
                    .issuers
                    .get_mut(&issuer_id)
                    .and_then(|i| i.tokens.get_mut(&token));
                let Some(TokenRecord::Rejected { request, .. }) = record else {
                    return Err(SnapshotError::Inconsistent {
                        reason: format!(
                            "customer of rejected token {token} of {issuer_id}, which is not there"
                        ),
                    });
                };
                request.customer_id = Some(customer_id);
            }
        }
        if format >= 4 {
            let (buckets, after): (Buckets, _) = postcard::take_from_bytes(rest)?;
            rest = after;
            for (issuer_id, bucket) in buckets.issuers {
                if !machine.issuers.contains_key(&issuer_id) {
                    return Err(SnapshotError::Inconsistent {
                        reason: format!("{bucket} of issuer {issuer_id}, which is not there"),
                    });
                }
                machine.place(&issuer_id, bucket);
            }
            machine.buckets = buckets.records.into_iter().collect();
            for staged in buckets.staged {
                let rows = &staged.rows;
                machine
                    .import_bucket(staged.bucket, staged.move_id, staged.from, rows)
                    .map_err(|e| SnapshotError::Inconsistent {
                        reason: format!("staged rows of {}: {e}", staged.bucket),
                    })?;
            }
        }
        if !rest.is_empty() {
            return Err(SnapshotError::TrailingBytes { count: rest.len() });
        }
        for (issuer_id, issuer) in &mut machine.issuers {
            for (seq, r) in &issuer.reservations {
                if r.status.is_open() {
                    issuer.open.insert(*seq);
                }
                // Seq 0 is corrupt: leave it to verify() rather than panic here.
                if let Some(expires_at_ms) = r.expires_at_ms.filter(|_| *seq > 0) {
                    let id = ReservationId::new(issuer_id.clone(), *seq);
                    let sealed = issuer
                        .bucket
                        .and_then(|b| machine.buckets.get(&b))
                        .is_some_and(|r| r.sealed_at.is_some());
                    match sealed {
                        true => machine.sealed_holds.insert((expires_at_ms, id)),
                        false => machine.holds_by_expiry.insert((expires_at_ms, id)),
                    };
                }
            }
        }
        machine
            .verify()
            .map_err(|reason| SnapshotError::Inconsistent { reason })?;
        Ok(machine)
    }

    /// Panic if any invariant is broken. O(state); for tests, the simulator
    /// and after restore, not for every apply.
    pub fn check_invariants(&self) {
        if let Err(reason) = self.verify() {
            panic!("reservation state machine invariant broken: {reason}");
        }
    }

    /// Every invariant of the state, as an error naming the first broken one
    /// with its values. Must not panic, whatever the state: it also judges
    /// decoded snapshots.
    pub(crate) fn verify(&self) -> Result<(), String> {
        let mut holds: usize = 0;
        let mut placed: usize = 0;
        for (issuer_id, issuer) in &self.issuers {
            holds += self.verify_issuer(issuer_id, issuer)?;
            if let Some(bucket) = issuer.bucket {
                placed += 1;
                ensure!(
                    self.by_bucket
                        .get(&bucket)
                        .is_some_and(|ids| ids.contains(issuer_id)),
                    "{issuer_id}: placed in {bucket} but missing from its index"
                );
            }
        }
        // What a move staged sums up to what its rows say (the tallies an
        // acquisition trusts are kept as rows arrive and are replaced).
        for staged in self.staged_out() {
            let mut again = Staged::new(staged.move_id, staged.from);
            again.add(staged.bucket, &staged.rows);
            ensure!(
                self.staged.get(&staged.bucket) == Some(&again),
                "the staging of {} does not sum up to its rows",
                staged.bucket
            );
        }
        let indexed: usize = self.by_bucket.values().map(BTreeSet::len).sum();
        ensure!(
            self.by_bucket.values().all(|ids| !ids.is_empty()),
            "a bucket's index holds no issuer"
        );
        ensure!(
            placed == indexed,
            "{placed} issuers are placed in buckets but the index holds {indexed}"
        );
        ensure!(
            holds == self.holds_by_expiry.len() + self.sealed_holds.len(),
            "{holds} holds but the expiry indexes have {} and {} (sealed)",
            self.holds_by_expiry.len(),
            self.sealed_holds.len()
        );
        for (bucket, record) in &self.buckets {
            ensure!(
                record
                    .sealed_at
                    .into_iter()
                    .chain(record.opened_at)
                    .all(|p| self.at_or_before_applied(p)),
                "{bucket}: {record:?} after applied {:?}",
                self.applied
            );
        }
        Ok(())
    }

    /// Whether a position is at or before the last applied entry. A
    /// position of another group came with a moved bucket's rows: it is
    /// before anything this group applied since.
    fn at_or_before_applied(&self, p: CommitToken) -> bool {
        self.applied.is_some_and(|a| p.shard != a.shard || p <= a)
    }

    /// The invariants of one issuer's rows; returns how many holds it has.
    fn verify_issuer(&self, issuer_id: &IssuerId, issuer: &Issuer) -> Result<usize, String> {
        let at_or_before_applied = |p| self.at_or_before_applied(p);
        let mut holds: usize = 0;
        ensure!(
            issuer.limit.0 <= AMOUNT_MAX,
            "{issuer_id}: limit {} over AMOUNT_MAX",
            issuer.limit
        );
        ensure!(
            issuer.reserved <= issuer.limit,
            "{issuer_id}: reserved {} over limit {}",
            issuer.reserved,
            issuer.limit
        );
        ensure!(issuer.next_seq >= 1, "{issuer_id}: next_seq is 0");
        ensure!(
            at_or_before_applied(issuer.updated),
            "{issuer_id}: updated {} after applied {:?}",
            issuer.updated,
            self.applied
        );
        let mut open_sum = Amount::ZERO;
        let mut open_count: usize = 0;
        for (&seq, r) in &issuer.reservations {
            // Formatted only when a check fails: this loop runs over every
            // row of a bucket a move acquires, inside the write pause.
            let id = RowId(issuer_id, seq);
            ensure!(
                seq >= 1 && seq < issuer.next_seq,
                "{id}: seq outside 1..{}",
                issuer.next_seq
            );
            check_row(&id, r)?;
            ensure!(
                at_or_before_applied(r.updated),
                "{id}: updated {} after applied {:?}",
                r.updated,
                self.applied
            );
            if let Some(expires_at_ms) = r.expires_at_ms {
                let key = (expires_at_ms, ReservationId::new(issuer_id.clone(), seq));
                let index = match issuer.bucket.filter(|b| self.is_sealed(*b)) {
                    Some(_) => &self.sealed_holds,
                    None => &self.holds_by_expiry,
                };
                ensure!(
                    index.contains(&key),
                    "{id}: hold missing from the expiry index of its bucket's state"
                );
                holds += 1;
            }
            ensure!(
                r.status.is_open() == issuer.open.contains(&seq),
                "{id}: {} but open index says {}",
                r.status,
                issuer.open.contains(&seq)
            );
            if r.status.is_open() {
                open_count += 1;
                open_sum = open_sum
                    .checked_add(r.amount)
                    .ok_or_else(|| format!("{issuer_id}: open amounts overflow at {id}"))?;
            }
        }
        ensure!(
            open_sum == issuer.reserved,
            "{issuer_id}: reserved {} but held + confirmed sum to {open_sum}",
            issuer.reserved
        );
        ensure!(
            open_count == issuer.open.len(),
            "{issuer_id}: {open_count} open reservations, open index has {}",
            issuer.open.len()
        );
        // Each committed token names a reservation that carries it, so
        // distinct tokens name distinct reservations; as many committed
        // tokens as reservations then means every reservation's token
        // names it (without a lookup by token per reservation, which made
        // this the cost of a move's acquisition).
        let mut committed: usize = 0;
        for (token, record) in &issuer.tokens {
            match record {
                TokenRecord::Committed { seq, commit_token } => {
                    let owner = issuer.reservations.get(seq).map(|r| (&r.token, r.created));
                    ensure!(
                        owner == Some((token, *commit_token)),
                        "{issuer_id}: token {token} committed as r{seq} at {commit_token}, \
                         but r{seq} is {owner:?}"
                    );
                    committed += 1;
                }
                TokenRecord::Rejected {
                    request,
                    remaining,
                    commit_token,
                } => {
                    ensure!(
                        request.amount > *remaining && at_or_before_applied(*commit_token),
                        "{issuer_id}: token {token} rejected {} with {remaining} remaining at \
                         {commit_token}",
                        request.amount
                    );
                }
                TokenRecord::Abandoned { commit_token } => {
                    ensure!(
                        at_or_before_applied(*commit_token),
                        "{issuer_id}: token {token} abandoned at {commit_token} after applied"
                    );
                }
            }
        }
        ensure!(
            committed == issuer.reservations.len(),
            "{issuer_id}: {committed} committed tokens for {} reservations (a reservation's \
             token does not name it)",
            issuer.reservations.len()
        );
        Ok(holds)
    }
}

/// The checks of one reservation on its own: a valid request, positions
/// in order, an expiry exactly while held.
pub(crate) fn check_row(id: &RowId, r: &Reservation) -> Result<(), String> {
    let valid = check_amount("amount", r.amount, Amount(1))
        .and_then(|()| check_text("desk", &r.desk))
        .and_then(|()| check_text("trader", &r.trader))
        .and_then(|()| match &r.customer_id {
            Some(customer_id) => check_text("customer_id", customer_id),
            None => Ok(()),
        })
        .and_then(|()| check_hold_ttl(r.hold_ttl_ms));
    ensure!(valid.is_ok(), "{id}: invalid request: {valid:?}");
    ensure!(
        r.created.shard != r.updated.shard || r.created <= r.updated,
        "{id}: created {} after updated {}",
        r.created,
        r.updated
    );
    match (r.status, r.expires_at_ms, r.hold_ttl_ms) {
        (Status::Held, Some(expires_at_ms), Some(ttl)) => ensure!(
            r.created_at.wall_ms.checked_add(ttl) == Some(expires_at_ms),
            "{id}: expires at {expires_at_ms}, created at {} with ttl {ttl}",
            r.created_at
        ),
        (Status::Held, expires_at_ms, ttl) => {
            return Err(format!(
                "{id}: held with expiry {expires_at_ms:?}, ttl {ttl:?}"
            ))
        }
        (status, Some(expires_at_ms), _) => {
            return Err(format!("{id}: {status} with expiry {expires_at_ms}"))
        }
        (_, None, _) => {}
    }
    Ok(())
}

/// A reservation's id as a message names it.
pub(crate) struct RowId<'a>(pub(crate) &'a IssuerId, pub(crate) u64);

impl std::fmt::Display for RowId<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:r{}", self.0, self.1)
    }
}

/// The commands of a batch, in order.
fn batched(cmd: &Command) -> Vec<&Command> {
    match cmd {
        Command::Batch(commands) => commands.iter().collect(),
        Command::BucketBatch(commands) => commands.iter().map(|(_, cmd)| cmd).collect(),
        cmd => vec![cmd],
    }
}

/// The issuer of a reservation that exists.
fn issuer_of<'a>(
    issuers: &'a mut BTreeMap<IssuerId, Issuer>,
    id: &ReservationId,
) -> Result<&'a mut Issuer, Rejection> {
    match issuers.get_mut(id.issuer()) {
        Some(issuer) if issuer.reservations.contains_key(&id.seq()) => Ok(issuer),
        _ => Err(Rejection::UnknownReservation {
            reservation_id: id.clone(),
        }),
    }
}

/// The answer to a reserve whose token was already decided: the original
/// outcome, never a new decision.
fn replay(
    issuer_id: &IssuerId,
    issuer: &Issuer,
    token: &ReservationToken,
    record: &TokenRecord,
    request: &ReserveRequest,
) -> Result<Outcome, Rejection> {
    let mismatch = || Rejection::TokenPayloadMismatch {
        token: token.clone(),
    };
    match record {
        TokenRecord::Abandoned { .. } => Err(Rejection::TokenAbandoned {
            token: token.clone(),
        }),
        TokenRecord::Committed { seq, .. } => {
            let r = &issuer.reservations[seq];
            if r.request() != *request {
                return Err(mismatch());
            }
            Ok(Outcome::Reservation {
                reservation: reservation_view(issuer_id, *seq, r),
                replayed: true,
            })
        }
        TokenRecord::Rejected {
            request: original,
            remaining,
            ..
        } => {
            if original != request {
                return Err(mismatch());
            }
            Err(Rejection::InsufficientExposure {
                issuer_id: issuer_id.clone(),
                requested: original.amount,
                remaining: *remaining,
            })
        }
    }
}

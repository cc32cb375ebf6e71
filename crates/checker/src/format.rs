//! The history file format: one JSON object per line, tagged by `"type"`.
//! `docs/history-format.md` is the reference; these types are the format,
//! used both to write a history (the simulator, the fault harness) and to
//! read it back, so producer and checker can never disagree on a field name.
//!
//! Unknown fields are ignored so a producer may add debugging context.

use harbor_types::{
    Amount, BucketId, CommitToken, Generation, IssuerId, NodeId, Region, ReservationId,
    ReservationToken, ShardId,
};
use serde::{Deserialize, Serialize};
use std::fmt;

/// One line of a history file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum HistoryLine {
    /// A client started an operation.
    Invoke(InvokeLine),
    /// The operation happened.
    Ok(OkLine),
    /// The operation definitely did not happen (a definite rejection).
    Fail(ErrorLine),
    /// The outcome is unknown (timeout, lost connection, `outcome_unknown`).
    Info(ErrorLine),
    /// A node started acting as leader of a shard at a generation.
    Leader(LeaderLine),
    /// The converged end state of one issuer, read from its leader.
    Final(FinalLine),
    /// An acknowledged write reported lost by a regional failover.
    LostInFailover(LostLine),
    /// A group stopped or started taking a bucket's writes.
    Bucket(BucketLine),
    /// Free-form context for humans; the checker ignores it.
    Note(serde_json::Map<String, serde_json::Value>),
}

/// Every `type` a line may have, for error messages.
pub const LINE_TYPES: [&str; 9] = [
    "invoke",
    "ok",
    "fail",
    "info",
    "leader",
    "final",
    "lost_in_failover",
    "bucket",
    "note",
];

impl HistoryLine {
    /// The line as one line of JSON, without the trailing newline.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("history lines are plain data and always serialize")
    }

    pub fn from_json(text: &str) -> Result<HistoryLine, serde_json::Error> {
        serde_json::from_str(text)
    }

    /// The observer's clock, for the lines that carry it.
    pub fn time_ms(&self) -> Option<u64> {
        match self {
            HistoryLine::Invoke(l) => Some(l.time_ms),
            HistoryLine::Ok(l) => Some(l.time_ms),
            HistoryLine::Fail(l) | HistoryLine::Info(l) => Some(l.time_ms),
            HistoryLine::Leader(l) => Some(l.time_ms),
            HistoryLine::Final(l) => Some(l.time_ms),
            HistoryLine::Bucket(l) => Some(l.time_ms),
            HistoryLine::LostInFailover(_) | HistoryLine::Note(_) => None,
        }
    }
}

/// `{"type":"invoke","op":17,"client":"c3","time_ms":1234,"f":"reserve","value":{..}}`
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InvokeLine {
    /// Unique per operation; the completion repeats it.
    pub op: u64,
    pub client: String,
    pub time_ms: u64,
    #[serde(flatten)]
    pub call: Call,
}

/// `{"type":"ok","op":17,"client":"c3","time_ms":1290,"f":"reserve","value":{..}}`
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OkLine {
    pub op: u64,
    pub client: String,
    pub time_ms: u64,
    #[serde(flatten)]
    pub reply: Reply,
}

/// A `fail` or `info` completion: `{"op","client","time_ms","f","value":{"error"}}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorLine {
    pub op: u64,
    pub client: String,
    pub time_ms: u64,
    pub f: Function,
    pub value: ErrorReply,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorReply {
    /// The error code, e.g. `insufficient_exposure` or `timeout`.
    pub error: String,
    /// Where a rejection was recorded, when it was.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commit_token: Option<CommitToken>,
}

impl ErrorReply {
    pub fn new(error: impl Into<String>) -> ErrorReply {
        ErrorReply {
            error: error.into(),
            commit_token: None,
        }
    }
}

/// The operations a client can invoke.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Function {
    RegisterIssuer,
    Reserve,
    Confirm,
    Release,
    Resolve,
    TokenLookup,
    ReadIssuer,
}

impl Function {
    pub fn as_str(self) -> &'static str {
        match self {
            Function::RegisterIssuer => "register_issuer",
            Function::Reserve => "reserve",
            Function::Confirm => "confirm",
            Function::Release => "release",
            Function::Resolve => "resolve",
            Function::TokenLookup => "token_lookup",
            Function::ReadIssuer => "read_issuer",
        }
    }
}

impl fmt::Display for Function {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a client asked for: the `f` and `value` of an invoke line.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "f", content = "value", rename_all = "snake_case")]
pub enum Call {
    RegisterIssuer {
        issuer_id: IssuerId,
        home_region: Region,
        limit: Amount,
    },
    Reserve {
        token: ReservationToken,
        issuer_id: IssuerId,
        amount: Amount,
        /// `null`: confirmed at once; otherwise held for this long.
        hold_ttl_ms: Option<u64>,
    },
    Confirm {
        reservation_id: ReservationId,
    },
    Release {
        reservation_id: ReservationId,
    },
    Resolve {
        token: ReservationToken,
        issuer_id: IssuerId,
    },
    TokenLookup {
        token: ReservationToken,
        issuer_id: IssuerId,
    },
    ReadIssuer {
        issuer_id: IssuerId,
        consistency: Consistency,
        /// Only for `bounded`; absent means the default budget.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        max_staleness_ms: Option<u64>,
    },
}

impl Call {
    pub fn function(&self) -> Function {
        match self {
            Call::RegisterIssuer { .. } => Function::RegisterIssuer,
            Call::Reserve { .. } => Function::Reserve,
            Call::Confirm { .. } => Function::Confirm,
            Call::Release { .. } => Function::Release,
            Call::Resolve { .. } => Function::Resolve,
            Call::TokenLookup { .. } => Function::TokenLookup,
            Call::ReadIssuer { .. } => Function::ReadIssuer,
        }
    }

    /// The issuer the operation is about; a reservation id names its issuer.
    pub fn issuer(&self) -> &IssuerId {
        match self {
            Call::RegisterIssuer { issuer_id, .. }
            | Call::Reserve { issuer_id, .. }
            | Call::Resolve { issuer_id, .. }
            | Call::TokenLookup { issuer_id, .. }
            | Call::ReadIssuer { issuer_id, .. } => issuer_id,
            Call::Confirm { reservation_id } | Call::Release { reservation_id } => {
                reservation_id.issuer()
            }
        }
    }
}

/// The value of an `ok` completion, tagged by the same `f` as the call.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "f", content = "value", rename_all = "snake_case")]
pub enum Reply {
    RegisterIssuer {
        commit_token: CommitToken,
    },
    Reserve {
        reservation_id: ReservationId,
        status: ReservationStatus,
        commit_token: CommitToken,
        /// The token was already decided; this is the original outcome.
        #[serde(default)]
        replayed: bool,
    },
    Confirm {
        status: ReservationStatus,
        commit_token: CommitToken,
    },
    Release {
        status: ReservationStatus,
        commit_token: CommitToken,
    },
    Resolve {
        status: TokenStatus,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reservation_id: Option<ReservationId>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        commit_token: Option<CommitToken>,
    },
    TokenLookup {
        status: LookupStatus,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reservation_id: Option<ReservationId>,
    },
    ReadIssuer {
        limit: Amount,
        reserved: Amount,
        /// The shard position the answer reflects.
        applied: CommitToken,
        stale: bool,
        /// How far behind the answer may be; `null` when the replica knew
        /// no bound (only allowed with `stale: true`).
        staleness_ms: Option<u64>,
        served_by: ServedBy,
        /// The commit tokens the client sent with the read.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        session: Vec<CommitToken>,
    },
}

impl Reply {
    pub fn function(&self) -> Function {
        match self {
            Reply::RegisterIssuer { .. } => Function::RegisterIssuer,
            Reply::Reserve { .. } => Function::Reserve,
            Reply::Confirm { .. } => Function::Confirm,
            Reply::Release { .. } => Function::Release,
            Reply::Resolve { .. } => Function::Resolve,
            Reply::TokenLookup { .. } => Function::TokenLookup,
            Reply::ReadIssuer { .. } => Function::ReadIssuer,
        }
    }

    /// Where the write this reply acknowledges committed; `None` for reads.
    pub fn commit_token(&self) -> Option<CommitToken> {
        match self {
            Reply::RegisterIssuer { commit_token }
            | Reply::Reserve { commit_token, .. }
            | Reply::Confirm { commit_token, .. }
            | Reply::Release { commit_token, .. } => Some(*commit_token),
            Reply::Resolve { commit_token, .. } => *commit_token,
            Reply::TokenLookup { .. } | Reply::ReadIssuer { .. } => None,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReservationStatus {
    Held,
    Confirmed,
    Released,
    Expired,
}

impl ReservationStatus {
    /// Whether a reservation in this status counts against the limit.
    pub fn is_open(self) -> bool {
        matches!(self, ReservationStatus::Held | ReservationStatus::Confirmed)
    }
}

/// The durable outcome of a reservation token.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TokenStatus {
    Committed,
    Rejected,
    Abandoned,
}

/// A token lookup's answer: an outcome, or `unknown` when the token is absent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LookupStatus {
    Committed,
    Rejected,
    Abandoned,
    Unknown,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Consistency {
    Strong,
    Session,
    Bounded,
    Causal,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ServedBy {
    Leader,
    Follower,
}

/// `{"type":"leader","time_ms","shard","generation","node"}`
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaderLine {
    pub time_ms: u64,
    pub shard: ShardId,
    pub generation: Generation,
    pub node: NodeId,
}

/// The converged end state of one issuer. At most one per issuer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FinalLine {
    pub time_ms: u64,
    pub issuer_id: IssuerId,
    pub shard: ShardId,
    pub limit: Amount,
    /// Must equal the sum of the held and confirmed amounts.
    pub reserved: Amount,
    /// Every reservation of the issuer, closed ones included.
    pub reservations: Vec<FinalReservation>,
    /// Every token outcome the issuer recorded.
    pub tokens: Vec<FinalToken>,
}

impl FinalLine {
    pub fn token(&self, token: &ReservationToken) -> Option<&FinalToken> {
        self.tokens.iter().find(|t| &t.token == token)
    }

    pub fn reservation(&self, id: &ReservationId) -> Option<&FinalReservation> {
        self.reservations.iter().find(|r| &r.reservation_id == id)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FinalReservation {
    pub reservation_id: ReservationId,
    pub token: ReservationToken,
    pub amount: Amount,
    pub status: ReservationStatus,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FinalToken {
    pub token: ReservationToken,
    pub status: TokenStatus,
    /// Present when `status` is `committed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reservation_id: Option<ReservationId>,
}

/// `{"type":"lost_in_failover","token","issuer_id","commit_token"}`: the
/// write named by the token was acknowledged but did not survive a regional
/// failover (within the RPO). Such writes are exempt from survival checks.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LostLine {
    pub token: ReservationToken,
    pub issuer_id: IssuerId,
    pub commit_token: CommitToken,
}

/// `{"type":"bucket","time_ms","bucket","shard","issuers","event","at"}`:
/// the entry `at` of group `shard` sealed `bucket` (its writes are refused
/// from there on) or opened it (its writes are taken from there on: an
/// unseal, or the acquisition of a moved bucket). `issuers` are the
/// bucket's issuers. A group with no line for a bucket takes its writes
/// all along; one whose first line opens it took none before.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BucketLine {
    pub time_ms: u64,
    pub bucket: BucketId,
    pub shard: ShardId,
    pub issuers: Vec<IssuerId>,
    pub event: BucketEvent,
    pub at: CommitToken,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BucketEvent {
    Sealed,
    Opened,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::*;

    fn one_of_each_kind() -> Vec<HistoryLine> {
        let invoke = |op, call| {
            HistoryLine::Invoke(InvokeLine {
                op,
                client: "c1".into(),
                time_ms: 10,
                call,
            })
        };
        let ok = |op, reply| {
            HistoryLine::Ok(OkLine {
                op,
                client: "c1".into(),
                time_ms: 20,
                reply,
            })
        };
        let error = ErrorLine {
            op: 3,
            client: "c2".into(),
            time_ms: 30,
            f: Function::Reserve,
            value: ErrorReply {
                error: "insufficient_exposure".into(),
                commit_token: Some(ct("shard3@g2:99")),
            },
        };
        let mut note = serde_json::Map::new();
        note.insert("text".into(), "partition madrid|paris".into());
        vec![
            invoke(1, register("A", 100)),
            invoke(2, hold("A", "t1", 5)),
            invoke(3, confirm("A:r1")),
            invoke(4, release("A:r1")),
            invoke(5, resolve("A", "t1")),
            invoke(
                6,
                Call::TokenLookup {
                    token: token("t1"),
                    issuer_id: issuer("A"),
                },
            ),
            invoke(
                7,
                Call::ReadIssuer {
                    issuer_id: issuer("A"),
                    consistency: Consistency::Bounded,
                    max_staleness_ms: Some(500),
                },
            ),
            ok(1, registered("shard3@g2:1")),
            ok(2, replayed("A:r1", "shard3@g2:2")),
            ok(3, confirmed("shard3@g2:3")),
            ok(4, released("shard3@g2:4")),
            ok(
                5,
                Reply::Resolve {
                    status: TokenStatus::Committed,
                    reservation_id: Some(rid("A:r1")),
                    commit_token: Some(ct("shard3@g2:2")),
                },
            ),
            ok(
                6,
                Reply::TokenLookup {
                    status: LookupStatus::Unknown,
                    reservation_id: None,
                },
            ),
            ok(7, answer("shard3@g2:4", 5)),
            HistoryLine::Fail(error.clone()),
            HistoryLine::Info(ErrorLine {
                value: ErrorReply::new("timeout"),
                ..error
            }),
            HistoryLine::Leader(LeaderLine {
                time_ms: 40,
                shard: ShardId(3),
                generation: Generation(2),
                node: NodeId::new("madrid-1").unwrap(),
            }),
            HistoryLine::Final(final_line(
                "A",
                100,
                &[("A:r1", "t1", 5, ReservationStatus::Released)],
                &[("t2", TokenStatus::Abandoned)],
            )),
            HistoryLine::LostInFailover(LostLine {
                token: token("t9"),
                issuer_id: issuer("A"),
                commit_token: ct("shard3@g2:98"),
            }),
            HistoryLine::Note(note),
        ]
    }

    #[test]
    fn every_line_kind_round_trips_through_json() {
        for line in one_of_each_kind() {
            let json = line.to_json();
            assert!(!json.contains('\n'), "{json}");
            let back = HistoryLine::from_json(&json).unwrap_or_else(|e| panic!("{json}: {e}"));
            assert_eq!(back, line, "{json}");
        }
    }

    #[test]
    fn lines_read_as_documented() {
        let line = HistoryLine::from_json(
            r#"{"type":"invoke","op":17,"client":"c3","f":"reserve","time_ms":1234,
                "value":{"token":"t1","issuer_id":"A","amount":5,"hold_ttl_ms":null}}"#,
        )
        .unwrap();
        assert_eq!(
            line,
            HistoryLine::Invoke(InvokeLine {
                op: 17,
                client: "c3".into(),
                time_ms: 1234,
                call: reserve("A", "t1", 5),
            })
        );
        let json = r#"{"type":"ok","op":17,"client":"c3","f":"read_issuer","time_ms":1290,
            "value":{"limit":100,"reserved":5,"applied":"shard3@g2:99","stale":false,
                     "staleness_ms":0,"served_by":"leader","session":["shard3@g2:98"]}}"#;
        let HistoryLine::Ok(ok) = HistoryLine::from_json(json).unwrap() else {
            panic!("not an ok line")
        };
        assert_eq!(ok.reply.commit_token(), None);
        let Reply::ReadIssuer {
            applied, session, ..
        } = ok.reply
        else {
            panic!("not a read")
        };
        assert_eq!(
            (applied, session),
            (ct("shard3@g2:99"), vec![ct("shard3@g2:98")])
        );
    }
}

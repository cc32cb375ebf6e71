//! What goes over the wire: request options and the answers' shapes.
//!
//! Answers tolerate fields they do not know (the gateway adds fields over
//! time) and default the ones an older gateway does not send yet.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A commit position: `shard15@g1:3` is entry 3 of shard 15's generation 1.
/// Of two tokens of one shard, the higher `(generation, index)` is newer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CommitToken {
    pub shard: u32,
    pub generation: u64,
    pub index: u64,
}

impl CommitToken {
    /// Whether `self` is a later position of the same shard than `other`.
    pub fn is_newer_than(&self, other: &CommitToken) -> bool {
        self.shard == other.shard && (self.generation, self.index) > (other.generation, other.index)
    }
}

impl fmt::Display for CommitToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "shard{}@g{}:{}", self.shard, self.generation, self.index)
    }
}

/// A string that is not a commit token.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("a commit token looks like shard15@g1:3, got {0:?}")]
pub struct ParseCommitTokenError(pub String);

impl FromStr for CommitToken {
    type Err = ParseCommitTokenError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let err = || ParseCommitTokenError(text.to_string());
        // Digits only: `parse` alone would also take a leading '+'.
        let number = |s: &str| -> Result<u64, ParseCommitTokenError> {
            if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
                return Err(err());
            }
            s.parse().map_err(|_| err())
        };
        let rest = text.strip_prefix("shard").ok_or_else(err)?;
        let (shard, rest) = rest.split_once("@g").ok_or_else(err)?;
        let (generation, index) = rest.split_once(':').ok_or_else(err)?;
        Ok(CommitToken {
            shard: u32::try_from(number(shard)?).map_err(|_| err())?,
            generation: number(generation)?,
            index: number(index)?,
        })
    }
}

impl Serialize for CommitToken {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for CommitToken {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// How fresh a read must be.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Consistency {
    /// Sends no `consistency` parameter: the gateway reads with `session`
    /// when the client has a session (it does after its first answer), else
    /// with `bounded`.
    #[default]
    Default,
    /// Served by the group's leader under its lease: never stale.
    Strong,
    /// Sees at least everything this client wrote or read before (its
    /// session), possibly from a nearby follower.
    Session,
    /// A nearby replica whose state is at most `max_staleness` old (the
    /// gateway's bound when `None`). With `allow_stale`, a replica that
    /// cannot promise the bound answers anyway and says `stale: true`
    /// instead of handing the read to the leader.
    Bounded {
        max_staleness: Option<Duration>,
        allow_stale: Option<bool>,
    },
    /// Sees at least the writes named by `after` (commit tokens from other
    /// clients, say), waiting up to `wait` for a replica to apply them.
    Causal {
        after: Vec<CommitToken>,
        wait: Option<Duration>,
    },
}

impl Consistency {
    /// Bounded staleness with the given bound.
    pub fn bounded(max_staleness: Duration) -> Consistency {
        Consistency::Bounded {
            max_staleness: Some(max_staleness),
            allow_stale: None,
        }
    }

    /// Causal: at least the writes named by these tokens.
    pub fn causal(after: impl IntoIterator<Item = CommitToken>) -> Consistency {
        Consistency::Causal {
            after: after.into_iter().collect(),
            wait: None,
        }
    }

    /// The query parameters of this mode.
    pub(crate) fn query(&self) -> Vec<(&'static str, String)> {
        let ms = |d: &Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX).to_string();
        let mut q = Vec::new();
        match self {
            Consistency::Default => {}
            Consistency::Strong => q.push(("consistency", "strong".into())),
            Consistency::Session => q.push(("consistency", "session".into())),
            Consistency::Bounded {
                max_staleness,
                allow_stale,
            } => {
                q.push(("consistency", "bounded".into()));
                if let Some(d) = max_staleness {
                    q.push(("max_staleness_ms", ms(d)));
                }
                if let Some(allow) = allow_stale {
                    q.push(("allow_stale", allow.to_string()));
                }
            }
            Consistency::Causal { after, wait } => {
                q.push(("consistency", "causal".into()));
                if !after.is_empty() {
                    let tokens: Vec<String> = after.iter().map(|t| t.to_string()).collect();
                    q.push(("after", tokens.join(",")));
                }
                if let Some(d) = wait {
                    q.push(("wait_ms", ms(d)));
                }
            }
        }
        q
    }
}

/// A reservation to make. Without a token the client generates one; either
/// way every retry of the call sends the same token, so it reserves at most
/// once.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReserveRequest {
    pub issuer_id: String,
    pub amount: u64,
    pub desk: String,
    pub trader: String,
    /// `Some`: a hold that expires unless confirmed; `None`: confirmed at once.
    pub hold_ttl: Option<Duration>,
    /// The idempotency token; generated by [`crate::Client::reserve`] if `None`.
    pub reservation_token: Option<String>,
}

impl ReserveRequest {
    /// A confirmed reservation with a generated token.
    pub fn new(
        issuer_id: impl Into<String>,
        amount: u64,
        desk: impl Into<String>,
        trader: impl Into<String>,
    ) -> ReserveRequest {
        ReserveRequest {
            issuer_id: issuer_id.into(),
            amount,
            desk: desk.into(),
            trader: trader.into(),
            hold_ttl: None,
            reservation_token: None,
        }
    }

    /// Make it a hold that expires after `ttl` unless confirmed.
    pub fn hold(mut self, ttl: Duration) -> ReserveRequest {
        self.hold_ttl = Some(ttl);
        self
    }

    /// Use this token (one the caller stored before sending, to look it up
    /// after a crash) instead of a generated one.
    pub fn token(mut self, token: impl Into<String>) -> ReserveRequest {
        self.reservation_token = Some(token.into());
        self
    }
}

/// How and where an answer was produced. Every answer carries these fields;
/// the consistency ones (`consistency`, `fallback`, `staleness_ms`,
/// `stale`) are those of reads.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Served {
    /// The mode the read was served with (`strong`, `session`, ...).
    pub consistency: Option<String>,
    /// `leader` or `follower` (`gateway` on answers the gateway gave itself).
    pub served_by: String,
    /// A nearby replica could not serve the read, so the leader did.
    pub fallback: bool,
    /// The region and node of the replica that answered.
    pub region: String,
    pub node: String,
    /// The newest entry applied to the state shown.
    pub applied: Option<CommitToken>,
    /// How old the state may be; `None` when the replica knows no bound.
    pub staleness_ms: Option<u64>,
    /// The replica could not promise the requested bound (bounded reads
    /// with `allow_stale`).
    pub stale: bool,
    pub shard: Option<u32>,
    pub generation: Option<u64>,
    /// The region of the gateway the client talked to.
    pub gateway_region: Option<String>,
}

/// An issuer and its exposure.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Issuer {
    pub issuer_id: String,
    pub home_region: String,
    pub limit: u64,
    /// Held plus confirmed amounts.
    pub reserved: u64,
    pub remaining: u64,
    #[serde(default)]
    pub reservations_open: u64,
    #[serde(default)]
    pub bucket: Option<u32>,
    /// The last entry that changed `limit` or `reserved`.
    #[serde(default)]
    pub updated: Option<CommitToken>,
    /// Writes only: this call registered the issuer. A retried call whose
    /// first attempt registered it answers `false`.
    #[serde(default)]
    pub created: bool,
    /// Writes only: this call changed the limit.
    #[serde(default)]
    pub changed: bool,
    /// Writes only: the entry that recorded the write.
    #[serde(default)]
    pub commit_token: Option<CommitToken>,
    #[serde(flatten)]
    pub served: Served,
}

/// The life cycle of a reservation: `held` → `confirmed` | `released` |
/// `expired`, `confirmed` → `released`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReservationStatus {
    Held,
    Confirmed,
    Released,
    Expired,
    /// A status this client does not know yet.
    #[serde(other)]
    Other,
}

/// A reservation, as a write made it or a read found it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reservation {
    /// `ISSUER:rN`.
    pub reservation_id: String,
    pub issuer_id: String,
    pub reservation_token: String,
    pub amount: u64,
    #[serde(default)]
    pub desk: String,
    #[serde(default)]
    pub trader: String,
    pub status: ReservationStatus,
    /// Set exactly while the reservation is held.
    #[serde(default)]
    pub expires_at_ms: Option<u64>,
    /// The entry that created the reservation.
    #[serde(default)]
    pub created: Option<CommitToken>,
    /// The last entry that changed it.
    #[serde(default)]
    pub updated: Option<CommitToken>,
    /// Writes: an earlier attempt (or request) with this token or
    /// transition had already done it; this answer repeats its outcome.
    #[serde(default)]
    pub replayed: bool,
    /// Writes: the entry that recorded the answer.
    #[serde(default)]
    pub commit_token: Option<CommitToken>,
    /// Writes: the issuer's headroom after the write.
    #[serde(default)]
    pub remaining: Option<u64>,
    #[serde(default)]
    pub reserved: Option<u64>,
    #[serde(default)]
    pub limit: Option<u64>,
    #[serde(flatten)]
    pub served: Served,
}

/// An issuer's held and confirmed reservations.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpenReservations {
    pub issuer_id: String,
    #[serde(default)]
    pub count: u64,
    pub reservations: Vec<Reservation>,
    #[serde(flatten)]
    pub served: Served,
}

/// `GET /v1/health`: whether every group has a ready leader. A cluster
/// still starting answers 503, which the client returns as
/// [`crate::Error::Api`] (code `unavailable`) once its retries run out.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Health {
    pub status: String,
    pub groups: u64,
    #[serde(default)]
    pub groups_not_ready: Vec<u32>,
    pub map_version: u64,
    pub region: String,
    pub node: String,
}

/// A finished planned leader transfer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Transfer {
    pub from: String,
    pub to: String,
    pub generation: u64,
    /// How long the group took no writes.
    pub pause_ms: u64,
}

/// The durable outcome of a reservation token.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TokenState {
    /// Nothing is recorded for it yet: a request with it may still commit.
    Unknown,
    /// It reserved `reservation_id`.
    Committed,
    /// It was refused for `reason` (an error code such as
    /// `insufficient_exposure`); it never reserves.
    Rejected,
    /// It was resolved before any request with it committed; it never
    /// reserves.
    Abandoned,
}

/// A token lookup's or resolve's answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenStatus {
    pub reservation_token: String,
    #[serde(default)]
    pub issuer_id: Option<String>,
    pub status: TokenState,
    #[serde(default)]
    pub reservation_id: Option<String>,
    #[serde(default)]
    pub reason: Option<String>,
    /// The entry that recorded the outcome.
    #[serde(default)]
    pub commit_token: Option<CommitToken>,
    /// Resolve only: the entry of the resolve itself.
    #[serde(default)]
    pub resolved_at: Option<CommitToken>,
    #[serde(flatten)]
    pub served: Served,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commit_tokens_parse_print_and_order() {
        let t: CommitToken = "shard15@g1:3".parse().unwrap();
        assert_eq!(
            t,
            CommitToken {
                shard: 15,
                generation: 1,
                index: 3
            }
        );
        assert_eq!(t.to_string(), "shard15@g1:3");
        let later_gen: CommitToken = "shard15@g2:1".parse().unwrap();
        assert!(later_gen.is_newer_than(&t));
        assert!(!t.is_newer_than(&later_gen));
        let other_shard: CommitToken = "shard3@g9:9".parse().unwrap();
        assert!(!other_shard.is_newer_than(&t));
        for bad in [
            "",
            "shard",
            "shard1@g2",
            "shard1@g:3",
            "shard+1@g2:3",
            "s1@g2:3",
            "shard1@g2:3x",
        ] {
            assert!(bad.parse::<CommitToken>().is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn consistency_becomes_query_parameters() {
        assert!(Consistency::Default.query().is_empty());
        let q = Consistency::Bounded {
            max_staleness: Some(Duration::from_millis(250)),
            allow_stale: Some(true),
        }
        .query();
        assert_eq!(
            q,
            [
                ("consistency", "bounded".to_string()),
                ("max_staleness_ms", "250".to_string()),
                ("allow_stale", "true".to_string())
            ]
        );
        let q = Consistency::Causal {
            after: vec![
                "shard3@g2:99".parse().unwrap(),
                "shard15@g1:2".parse().unwrap(),
            ],
            wait: Some(Duration::from_millis(40)),
        }
        .query();
        assert_eq!(q[1], ("after", "shard3@g2:99,shard15@g1:2".to_string()));
        assert_eq!(q[2], ("wait_ms", "40".to_string()));
    }

    #[test]
    fn answers_tolerate_unknown_and_missing_fields() {
        let body = serde_json::json!({
            "reservation_id": "MUNI-77:r1", "issuer_id": "MUNI-77", "reservation_token": "t1",
            "amount": 600, "desk": "d", "trader": "t", "status": "confirmed",
            "expires_at_ms": null, "created": "shard15@g1:3", "updated": "shard15@g1:3",
            "created_at": {"wall_ms": 1, "logical": 0}, "replayed": false,
            "commit_token": "shard15@g1:3", "remaining": 400, "region": "newyork",
            "node": "newyork-2", "served_by": "leader", "applied": "shard15@g1:3",
            "staleness_ms": 0, "stale": false, "something_new": [1, 2]
        });
        let r: Reservation = serde_json::from_value(body).unwrap();
        assert_eq!(r.status, ReservationStatus::Confirmed);
        assert_eq!(r.remaining, Some(400));
        assert_eq!(r.served.node, "newyork-2");
        assert_eq!(r.served.staleness_ms, Some(0));
        assert!(!r.served.fallback);
        let s: TokenStatus = serde_json::from_value(serde_json::json!({
            "reservation_token": "t", "status": "abandoned", "commit_token": "shard1@g1:5"
        }))
        .unwrap();
        assert_eq!(s.status, TokenState::Abandoned);
    }
}

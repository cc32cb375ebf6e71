use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// A replica group. Every bucket belongs to exactly one group at a time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ShardId(pub u32);

impl fmt::Display for ShardId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "shard{}", self.0)
    }
}

/// The control plane's leader epoch of one group. Only the metadata plane
/// mints generations; every append, ack and routed request carries one, and a
/// replica refuses anything older than the newest it has seen.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct Generation(pub u64);

impl Generation {
    pub const ZERO: Generation = Generation(0);

    pub fn next(self) -> Generation {
        Generation(self.0.checked_add(1).expect("generation overflow"))
    }
}

impl fmt::Display for Generation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "g{}", self.0)
    }
}

/// A position in one group's replicated log. Index 0 is "before the first
/// entry"; the first entry has index 1.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct LogIndex(pub u64);

impl LogIndex {
    pub const ZERO: LogIndex = LogIndex(0);

    pub fn next(self) -> LogIndex {
        LogIndex(self.0.checked_add(1).expect("log index overflow"))
    }

    /// The index before this one; `ZERO` stays `ZERO`.
    pub fn prev(self) -> LogIndex {
        LogIndex(self.0.saturating_sub(1))
    }

    pub fn distance_to(self, later: LogIndex) -> u64 {
        later.0.saturating_sub(self.0)
    }
}

impl fmt::Display for LogIndex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Where a write committed: `shard184@g3:982441`. Handed to clients with every
/// write so they can later ask for a read that includes it (session reads) or
/// name it as a dependency (causal reads).
///
/// In human-readable formats (JSON) it is its text form; in binary formats
/// (the WAL, the wire) a compact tuple.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct CommitToken {
    pub shard: ShardId,
    pub generation: Generation,
    pub index: LogIndex,
}

// The text form is the HTTP API's (`harbor_api::CommitToken`), written
// there once.
impl fmt::Display for CommitToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        harbor_api::CommitToken::from(*self).fmt(f)
    }
}

impl From<CommitToken> for harbor_api::CommitToken {
    fn from(t: CommitToken) -> Self {
        harbor_api::CommitToken {
            shard: t.shard.0,
            generation: t.generation.0,
            index: t.index.0,
        }
    }
}

impl From<harbor_api::CommitToken> for CommitToken {
    fn from(t: harbor_api::CommitToken) -> Self {
        CommitToken {
            shard: ShardId(t.shard),
            generation: Generation(t.generation),
            index: LogIndex(t.index),
        }
    }
}

impl Serialize for CommitToken {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            s.collect_str(self)
        } else {
            (self.shard.0, self.generation.0, self.index.0).serialize(s)
        }
    }
}

impl<'de> Deserialize<'de> for CommitToken {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        if d.is_human_readable() {
            let text = String::deserialize(d)?;
            text.parse().map_err(serde::de::Error::custom)
        } else {
            let (shard, generation, index) = <(u32, u64, u64)>::deserialize(d)?;
            Ok(CommitToken {
                shard: ShardId(shard),
                generation: Generation(generation),
                index: LogIndex(index),
            })
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("commit token must look like shard184@g3:982441, got {0:?}")]
pub struct ParseCommitTokenError(pub String);

impl FromStr for CommitToken {
    type Err = ParseCommitTokenError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        text.parse::<harbor_api::CommitToken>()
            .map(CommitToken::from)
            .map_err(|_| ParseCommitTokenError(text.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commit_token_round_trips_through_text() {
        let token = CommitToken {
            shard: ShardId(184),
            generation: Generation(3),
            index: LogIndex(982441),
        };
        assert_eq!(token.to_string(), "shard184@g3:982441");
        assert_eq!("shard184@g3:982441".parse::<CommitToken>(), Ok(token));
    }

    #[test]
    fn commit_token_rejects_garbage() {
        for bad in [
            "",
            "shard",
            "shard1@g2",
            "shard1@g2:",
            "shard-1@g2:3",
            "shard1@g+2:3",
            "x1@g2:3",
            "shard99999999999@g1:1",
        ] {
            assert!(bad.parse::<CommitToken>().is_err(), "{bad:?} parsed");
        }
    }
}

#[cfg(test)]
mod serde_tests {
    use super::*;

    #[test]
    fn commit_token_is_text_in_json_and_a_tuple_in_postcard() {
        let token = CommitToken {
            shard: ShardId(3),
            generation: Generation(2),
            index: LogIndex(99),
        };
        let json = serde_json::to_string(&token).unwrap();
        assert_eq!(json, "\"shard3@g2:99\"");
        assert_eq!(serde_json::from_str::<CommitToken>(&json).unwrap(), token);
        let bytes = postcard::to_allocvec(&token).unwrap();
        assert!(bytes.len() <= 4, "{bytes:?}");
        assert_eq!(postcard::from_bytes::<CommitToken>(&bytes).unwrap(), token);
    }
}

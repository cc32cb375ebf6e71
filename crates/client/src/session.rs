//! The client's session: per shard, the newest commit token it has seen.
//! Sent as `Harbor-Session` on every request, it lets a replica tell whether
//! it has applied everything this client wrote or read.

use std::collections::BTreeMap;

use crate::model::{CommitToken, ParseCommitTokenError};

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Session {
    /// Shard → (generation, index): at most one token per shard.
    newest: BTreeMap<u32, (u64, u64)>,
}

impl Session {
    /// Parses a header value strictly (a session the caller restores).
    pub(crate) fn parse(text: &str) -> Result<Session, ParseCommitTokenError> {
        let mut session = Session::default();
        for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            session.observe(part.parse()?);
        }
        Ok(session)
    }

    /// Merges a server's header value or body field. Leniently: a token this
    /// client cannot parse is skipped rather than failing an answer that
    /// otherwise succeeded (the server's own copy of the session is the
    /// authority; ours only has to be no older).
    pub(crate) fn merge_text(&mut self, text: &str) {
        for part in text.split(',') {
            if let Ok(token) = part.trim().parse() {
                self.observe(token);
            }
        }
    }

    /// Keeps `token` if it is newer than what the session holds for its shard.
    pub(crate) fn observe(&mut self, token: CommitToken) {
        let position = (token.generation, token.index);
        let slot = self.newest.entry(token.shard).or_insert(position);
        if position > *slot {
            *slot = position;
        }
    }

    pub(crate) fn merge(&mut self, other: &Session) {
        for (&shard, &(generation, index)) in &other.newest {
            self.observe(CommitToken {
                shard,
                generation,
                index,
            });
        }
    }

    /// The header value: `shard3@g2:99,shard15@g1:2` (shards in order).
    pub(crate) fn header(&self) -> String {
        let tokens: Vec<String> = self
            .newest
            .iter()
            .map(|(&shard, &(generation, index))| {
                CommitToken {
                    shard,
                    generation,
                    index,
                }
                .to_string()
            })
            .collect();
        tokens.join(",")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_newest_token_per_shard() {
        let mut s = Session::parse("shard15@g1:2,shard3@g2:99").unwrap();
        assert_eq!(s.header(), "shard3@g2:99,shard15@g1:2");
        // An older generation loses even with a higher index.
        s.merge_text("shard3@g1:500");
        // A newer index in the same generation wins, so does a newer generation.
        s.merge_text("shard15@g1:7, shard3@g3:1");
        assert_eq!(s.header(), "shard3@g3:1,shard15@g1:7");
        s.merge(&Session::parse("shard3@g2:1000,shard4@g1:1").unwrap());
        assert_eq!(s.header(), "shard3@g3:1,shard4@g1:1,shard15@g1:7");
    }

    #[test]
    fn restoring_is_strict_and_merging_is_lenient() {
        assert!(Session::parse("shard3@g2:99,nonsense").is_err());
        assert_eq!(Session::parse(" ").unwrap(), Session::default());
        let mut s = Session::default();
        s.merge_text("nonsense,shard3@g2:99,");
        assert_eq!(s.header(), "shard3@g2:99");
    }

    #[test]
    fn duplicate_shards_in_one_value_collapse_to_the_newest() {
        let s = Session::parse("shard3@g2:99,shard3@g2:100,shard3@g1:200").unwrap();
        assert_eq!(s.header(), "shard3@g2:100");
    }
}

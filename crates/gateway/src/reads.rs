//! Read modes (DESIGN.md §7) and sessions.
//!
//! Every read names its guarantee. `strong` asks the group's leader, which
//! answers only under a lease. The others ask a replica in the gateway's
//! own region, which answers only if it is fresh enough for the caller
//! (it has applied the caller's session or dependencies, or its closed
//! timestamp is within the staleness budget) and otherwise refuses, so the
//! gateway asks the leader instead (`fallback: true`). Every answer says
//! who served it, how old it may be, and the session to send next time.

use std::collections::BTreeMap;
use std::fmt;
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, HeaderValue};
use harbor_api::ErrorCode;
use harbor_replication::Role;
use harbor_types::{CommitToken, NodeId, ShardId};
use harbor_wire::{Freshness, Query, QueryResult, Request, Response, Served};
use serde::Deserialize;

use crate::api::Place;
use crate::error::ApiError;
use crate::local::Local;
use crate::router::Gateway;

/// The request and response header carrying a session's commit tokens.
pub const SESSION_HEADER: &str = "harbor-session";
// A session header carries at most SESSION_TOKENS_MAX tokens (one per
// shard); a bounded read's budget defaults to STALENESS_MS_DEFAULT
// (DESIGN.md §1); a causal read waits CAUSAL_WAIT_MS_DEFAULT at a local
// replica unless it names a `wait_ms`, at most CAUSAL_WAIT_MS_MAX.
use harbor_types::limits::{
    CAUSAL_WAIT_MS_DEFAULT, CAUSAL_WAIT_MS_MAX, SESSION_TOKENS_MAX, STALENESS_MS_DEFAULT,
};

/// The newest commit token a caller has seen per shard. Sent back with
/// every answer; a replica serves a session read only once it has applied
/// the session's token for its shard.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Session(BTreeMap<ShardId, CommitToken>);

impl Session {
    /// Parses `Harbor-Session: shard3@g2:99,shard15@g1:2` (absent: empty).
    pub fn from_headers(headers: &HeaderMap) -> Result<Session, ApiError> {
        let Some(value) = headers.get(SESSION_HEADER) else {
            return Ok(Session::default());
        };
        let text = value.to_str().map_err(|_| {
            invalid_session("the Harbor-Session header is not ASCII text".to_string())
        })?;
        Session::parse(text)
    }

    pub fn parse(text: &str) -> Result<Session, ApiError> {
        let mut session = Session::default();
        for (n, part) in text
            .split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .enumerate()
        {
            if n >= SESSION_TOKENS_MAX {
                return Err(invalid_session(format!(
                    "a session carries at most {SESSION_TOKENS_MAX} commit tokens"
                )));
            }
            let token: CommitToken = part.parse().map_err(|e| invalid_session(format!("{e}")))?;
            session.include(token);
        }
        Ok(session)
    }

    /// Raises the session to include `token`.
    pub fn include(&mut self, token: CommitToken) {
        let newest = self.0.entry(token.shard).or_insert(token);
        if token > *newest {
            *newest = token;
        }
    }

    pub fn get(&self, shard: ShardId) -> Option<CommitToken> {
        self.0.get(&shard).copied()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn header_value(&self) -> HeaderValue {
        HeaderValue::from_str(&self.to_string()).expect("commit tokens are ASCII")
    }
}

impl fmt::Display for Session {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (n, token) in self.0.values().enumerate() {
            if n > 0 {
                f.write_str(",")?;
            }
            write!(f, "{token}")?;
        }
        Ok(())
    }
}

fn invalid_session(message: String) -> ApiError {
    ApiError::bad_request(
        ErrorCode::InvalidSession,
        format!("{message}; send the session value from an earlier answer, like shard3@g2:99,shard15@g1:2"),
    )
}

/// A read's guarantee.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Consistency {
    Strong,
    Session,
    Bounded {
        max_staleness_ms: u64,
        allow_stale: bool,
    },
    Causal {
        wait_ms: u64,
    },
}

impl Consistency {
    pub fn name(&self) -> &'static str {
        match self {
            Consistency::Strong => "strong",
            Consistency::Session => "session",
            Consistency::Bounded { .. } => "bounded",
            Consistency::Causal { .. } => "causal",
        }
    }
}

/// Query parameters of the read endpoints.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct ReadParams {
    #[serde(default)]
    consistency: Option<String>,
    #[serde(default)]
    max_staleness_ms: Option<u64>,
    #[serde(default)]
    allow_stale: Option<bool>,
    #[serde(default)]
    wait_ms: Option<u64>,
    /// Causal dependencies: commit tokens, comma-separated.
    #[serde(default)]
    after: Option<String>,
}

/// A read's guarantee and what the caller has seen: everything needed to
/// pick who serves it.
pub(crate) struct ReadPlan {
    pub consistency: Consistency,
    pub session: Session,
    /// For causal reads: the session plus the named dependencies.
    needs: Session,
}

impl ReadPlan {
    /// Checks the parameters against the mode: a parameter that does not
    /// apply to the mode is refused, not ignored. Without `consistency`, a
    /// caller with a session reads `session`, others `bounded`.
    pub(crate) fn new(params: ReadParams, headers: &HeaderMap) -> Result<ReadPlan, ApiError> {
        let session = Session::from_headers(headers)?;
        let name = match params.consistency.as_deref() {
            Some(name) => name,
            None if session.is_empty() => "bounded",
            None => "session",
        };
        let only_for = |param: &str, present: bool, mode: &str| {
            if present && name != mode {
                Err(ApiError::bad_request(
                    ErrorCode::InvalidQuery,
                    format!("{param} applies to consistency={mode} only, not {name}"),
                ))
            } else {
                Ok(())
            }
        };
        only_for(
            "max_staleness_ms",
            params.max_staleness_ms.is_some(),
            "bounded",
        )?;
        only_for("allow_stale", params.allow_stale.is_some(), "bounded")?;
        only_for("wait_ms", params.wait_ms.is_some(), "causal")?;
        only_for("after", params.after.is_some(), "causal")?;
        let mut needs = session.clone();
        let consistency = match name {
            "strong" => Consistency::Strong,
            "session" => Consistency::Session,
            "bounded" => Consistency::Bounded {
                max_staleness_ms: params.max_staleness_ms.unwrap_or(STALENESS_MS_DEFAULT),
                allow_stale: params.allow_stale.unwrap_or(false),
            },
            "causal" => {
                let wait_ms = params.wait_ms.unwrap_or(CAUSAL_WAIT_MS_DEFAULT);
                if wait_ms > CAUSAL_WAIT_MS_MAX {
                    return Err(ApiError::bad_request(
                        ErrorCode::InvalidQuery,
                        format!("wait_ms must be at most {CAUSAL_WAIT_MS_MAX}, got {wait_ms}"),
                    ));
                }
                if let Some(after) = &params.after {
                    let named = Session::parse(after).map_err(|mut e| {
                        e.message = format!("after={after:?}: {}", e.message);
                        e
                    })?;
                    for token in named.0.into_values() {
                        needs.include(token);
                    }
                }
                Consistency::Causal { wait_ms }
            }
            other => {
                return Err(ApiError::bad_request(
                    ErrorCode::InvalidConsistency,
                    format!("consistency={other:?} is not a read mode"),
                )
                .with("supported", ["strong", "session", "bounded", "causal"]))
            }
        };
        Ok(ReadPlan {
            consistency,
            session,
            needs,
        })
    }
}

/// An answer to a read, with how it was served.
pub(crate) struct ReadAnswer {
    pub result: QueryResult,
    served: Served,
    consistency: Consistency,
    /// A local replica could not serve it; the leader did.
    fallback: bool,
    stale: bool,
    /// The caller's session raised by what this answer showed.
    pub session: Session,
}

impl ReadAnswer {
    /// The fields every read answer carries.
    pub(crate) fn served(&self, gw: &Gateway) -> harbor_api::Served {
        harbor_api::Served {
            consistency: Some(self.consistency.name().to_string()),
            fallback: self.fallback,
            stale: self.stale,
            session: Some(self.session.to_string()),
            ..gw.served(&self.served)
        }
    }
}

impl Gateway {
    /// Serves a read of `place` per `plan`; see the module comment.
    pub(crate) async fn read_as(
        &self,
        place: Place,
        query: Query,
        plan: &ReadPlan,
    ) -> Result<ReadAnswer, ApiError> {
        let shard = place.shard;
        let need = freshness(
            plan.consistency,
            plan.session.get(shard),
            plan.needs.get(shard),
        );
        let local = match need {
            Some(_) => self.local_replica(shard),
            None => Local::None,
        };
        let mut fallback = matches!(local, Local::Silent);
        if let (Some(need), Local::Replica(node)) = (need, local) {
            let wait_ms = need.wait_ms;
            let request = Request::LocalRead {
                shard,
                query: query.clone(),
                need,
            };
            match self
                .endpoint()
                .call_node_within(&node, request, wait_ms + self.config.local_read_timeout_ms)
                .await
            {
                Ok(response) => match (judge_local(plan.consistency, &response), response) {
                    (LocalAnswer::Serve { stale }, Response::Read { result, served }) => {
                        return Ok(self.answered(plan, result, served, false, stale));
                    }
                    (_, Response::Error(e)) if e.code() == ErrorCode::ReplicaBehind => {
                        tracing::debug!(%shard, %node, reason = %e.message, "local read goes to the leader");
                    }
                    (_, Response::Read { .. }) => {
                        tracing::debug!(%shard, %node, "local replica does not know it; asking the leader");
                    }
                    (_, other) => {
                        tracing::warn!(%shard, %node, ?other, "odd answer to a local read")
                    }
                },
                Err(e) => {
                    tracing::debug!(%shard, %node, error = %e, "local replica did not answer");
                    let until =
                        Instant::now() + Duration::from_millis(self.config.silent_replica_skip_ms);
                    self.local_replicas.lock().unwrap().silent(node, until);
                }
            }
            fallback = true;
        }
        let (result, served) = self.read(place, query).await?;
        Ok(self.answered(plan, result, served, fallback, false))
    }

    fn answered(
        &self,
        plan: &ReadPlan,
        result: QueryResult,
        served: Served,
        fallback: bool,
        stale: bool,
    ) -> ReadAnswer {
        let mut session = plan.session.clone();
        if let Some(applied) = served.applied {
            session.include(applied);
        }
        let served_by = match served.role {
            Role::Leader => "leader",
            Role::Follower => "follower",
        };
        self.metrics
            .read(plan.consistency.name(), served_by, fallback, stale);
        ReadAnswer {
            result,
            served,
            consistency: plan.consistency,
            fallback,
            stale,
            session,
        }
    }

    /// A replica of `shard` in this gateway's region, taken in turn,
    /// skipping ones that recently did not answer.
    pub(crate) fn local_replica(&self, shard: ShardId) -> Local {
        let map = self.meta.map();
        let Some(group) = map.groups.get(&shard) else {
            return Local::None;
        };
        let here: Vec<NodeId> = group
            .members
            .iter()
            .filter(|n| map.region_of(n) == Some(&self.region))
            .cloned()
            .collect();
        self.local_replicas
            .lock()
            .unwrap()
            .pick(Instant::now(), &here)
    }
}

/// What a read of a shard asks of a local replica, per its guarantee
/// (`None`: strong, only the leader serves it). `session` is the caller's
/// newest commit token for the shard; `needs` adds a causal read's
/// dependencies. The simulator's clients plan their reads with it too.
pub fn freshness(
    consistency: Consistency,
    session: Option<CommitToken>,
    needs: Option<CommitToken>,
) -> Option<Freshness> {
    match consistency {
        Consistency::Strong => None,
        Consistency::Session => Some(Freshness {
            applied_at_least: session.map(|t| t.index),
            max_staleness_ms: None,
            wait_ms: 0,
        }),
        Consistency::Bounded {
            max_staleness_ms,
            allow_stale,
        } => Some(Freshness {
            applied_at_least: None,
            max_staleness_ms: (!allow_stale).then_some(max_staleness_ms),
            wait_ms: 0,
        }),
        Consistency::Causal { wait_ms } => Some(Freshness {
            applied_at_least: needs.map(|t| t.index),
            max_staleness_ms: None,
            wait_ms,
        }),
    }
}

/// What a gateway does with a local replica's answer to a read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LocalAnswer {
    /// Answer with it; `stale`: over a bounded read's budget (served
    /// anyway because the caller allowed stale answers).
    Serve { stale: bool },
    /// Ask the leader: the replica was not fresh enough, or does not know
    /// the thing (which may only mean "not yet"), or answered oddly.
    AskLeader,
}

pub fn judge_local(consistency: Consistency, response: &Response) -> LocalAnswer {
    match response {
        Response::Read { result, .. } if is_absent(result) => LocalAnswer::AskLeader,
        Response::Read { served, .. } => {
            let stale = match consistency {
                Consistency::Bounded {
                    max_staleness_ms, ..
                } => served.staleness_ms.is_none_or(|s| s > max_staleness_ms),
                _ => false,
            };
            LocalAnswer::Serve { stale }
        }
        _ => LocalAnswer::AskLeader,
    }
}

fn is_absent(result: &QueryResult) -> bool {
    matches!(
        result,
        QueryResult::Issuer(None)
            | QueryResult::Reservation(None)
            | QueryResult::OpenReservations(None)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(session: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(SESSION_HEADER, HeaderValue::from_str(session).unwrap());
        h
    }

    /// Just enough query parsing for the tests (axum does it for real).
    fn params(q: &str) -> ReadParams {
        let mut p = ReadParams::default();
        for pair in q.split('&').filter(|s| !s.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap();
            match k {
                "consistency" => p.consistency = Some(v.into()),
                "max_staleness_ms" => p.max_staleness_ms = Some(v.parse().unwrap()),
                "allow_stale" => p.allow_stale = Some(v.parse().unwrap()),
                "wait_ms" => p.wait_ms = Some(v.parse().unwrap()),
                "after" => p.after = Some(v.into()),
                _ => panic!("{k}"),
            }
        }
        p
    }

    #[test]
    fn a_session_keeps_the_newest_token_per_shard() {
        let s = Session::parse("shard3@g2:99, shard1@g1:5,shard3@g1:120,shard3@g2:100").unwrap();
        assert_eq!(s.to_string(), "shard1@g1:5,shard3@g2:100");
        assert_eq!(Session::parse("").unwrap(), Session::default());
        for bad in ["shard3", "shard3@g2:99,x", "shard3@g2:-1"] {
            let e = Session::parse(bad).unwrap_err();
            assert_eq!(e.code, ErrorCode::InvalidSession, "{bad}");
        }
    }

    #[test]
    fn the_default_mode_depends_on_the_session() {
        let plan = ReadPlan::new(params(""), &HeaderMap::new()).unwrap();
        assert_eq!(
            plan.consistency,
            Consistency::Bounded {
                max_staleness_ms: STALENESS_MS_DEFAULT,
                allow_stale: false
            }
        );
        let plan = ReadPlan::new(params(""), &headers("shard1@g1:5")).unwrap();
        assert_eq!(plan.consistency, Consistency::Session);
    }

    #[test]
    fn parameters_that_do_not_fit_the_mode_are_refused() {
        let h = HeaderMap::new();
        for (q, code) in [
            ("consistency=strong&max_staleness_ms=5", "invalid_query"),
            ("consistency=session&wait_ms=5", "invalid_query"),
            ("consistency=bounded&after=shard1@g1:1", "invalid_query"),
            ("consistency=causal&allow_stale=true", "invalid_query"),
            ("consistency=causal&wait_ms=10001", "invalid_query"),
            ("consistency=causal&after=nope", "invalid_session"),
            ("consistency=eventual", "invalid_consistency"),
        ] {
            let e = ReadPlan::new(params(q), &h).err().unwrap();
            assert_eq!(e.code.as_str(), code, "{q}");
        }
        let plan = ReadPlan::new(
            params("consistency=causal&wait_ms=50&after=shard2@g1:7"),
            &headers("shard2@g1:3,shard4@g1:1"),
        )
        .unwrap();
        assert_eq!(plan.consistency, Consistency::Causal { wait_ms: 50 });
        assert_eq!(plan.needs.to_string(), "shard2@g1:7,shard4@g1:1");
        assert_eq!(plan.session.to_string(), "shard2@g1:3,shard4@g1:1");
    }
}

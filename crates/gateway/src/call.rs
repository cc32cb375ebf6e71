//! One request's way to its group's leader, as a pure state machine: no
//! clock, no IO, no runtime. The gateway's async [`Gateway::call`] and the
//! simulator's clients drive this same code, so the rules a client's
//! outcome depends on (which node to try next, when to send a copy, when a
//! write's outcome becomes unknown) are simulated as they ship.
//!
//! A [`Call`] follows the leader: on a not-leader answer with a hint, or
//! when the shard map names a new leader while it waits, it sends the
//! request again to the new one (a new attempt, a new request id), and a
//! copy to the same one when it has not answered within `resend_after_ms`
//! (lost on a dead connection; the copy keeps the id). A
//! `leadership_changed`, `stale_route` or hintless `not_leader` refusal (a
//! transfer or a failover under way) waits for the map to move, then sends
//! again. That is safe for every request: reservations are deduplicated by
//! their token, and confirm, release, resolve and issuer upserts are
//! idempotent. An old leader whose generation was sealed can no longer
//! commit anything.
//!
//! A call for a bucket follows the bucket too: a `moved` refusal (the
//! bucket is sealed in the group asked: it is moving) changed nothing, so
//! the call refreshes the map and sends the same request to the group the
//! map names for the bucket, or to the same one again after a growing
//! wait if the map has not moved yet (a move's cutover, or one that
//! aborted and unsealed). The client never sees `moved` unless the move
//! outlasts the call.
//!
//! A write is in doubt once one of its attempts may have been taken (it
//! went unanswered, was refused in doubt, or was sent twice, so that a
//! refusal may answer the copy): from then on no refusal that ends the
//! call is definite, since that attempt may still commit.
//!
//! [`Gateway::call`]: crate::Gateway::call

use harbor_types::limits;
use harbor_types::sim::probe;
use harbor_types::{BucketId, Generation, MonoMs, NodeId, ShardId};
use harbor_wire::{ErrorCode, ErrorKind, NodeError, Response, Route};

/// The timings of a call. Defaults are in `harbor_types::limits`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CallLimits {
    /// How long a request waits for its leader. Past it the outcome of a
    /// write is unknown: the client looks its token up or resolves it.
    pub request_timeout_ms: u64,
    /// How often a waiting request checks whether its group's leader moved.
    pub route_check_interval_ms: u64,
    /// Leaders one request tries before it gives up.
    pub route_attempts_max: u32,
    /// How long a request refused by a leadership change waits for the map
    /// to name the next leader before it asks the same one again.
    pub leadership_wait_ms_max: u64,
    /// A leader silent for this long makes a waiting request refresh the
    /// map (every `route_check_interval_ms` from then on).
    pub silent_leader_ms: u64,
    /// An unanswered request is sent again after this, then after twice as
    /// long, and so on: TCP loses what was written to a connection whose
    /// peer died. A slow link (a WAN round trip over a second) still gets
    /// its answers, since the copy keeps the request's id.
    pub resend_after_ms: u64,
    /// How long a request first waits before asking again a node that the
    /// map names leader but that has not heard it yet (doubling on each
    /// refusal, up to `leadership_wait_ms_max`).
    pub news_wait_ms: u64,
    /// How often a refused request looks at the map while it waits for it
    /// to move.
    pub map_poll_ms: u64,
}

impl Default for CallLimits {
    fn default() -> Self {
        CallLimits {
            request_timeout_ms: limits::REQUEST_TIMEOUT_MS,
            route_check_interval_ms: limits::ROUTE_CHECK_INTERVAL_MS,
            route_attempts_max: limits::ROUTE_ATTEMPTS_MAX,
            leadership_wait_ms_max: limits::LEADERSHIP_WAIT_MS_MAX,
            silent_leader_ms: limits::SILENT_LEADER_MS,
            resend_after_ms: limits::RESEND_AFTER_MS,
            news_wait_ms: limits::NEWS_WAIT_MS,
            map_poll_ms: limits::MAP_POLL_MS,
        }
    }
}

/// The caller's shard-map entry for the call's group (for a call for a
/// bucket, the group the map names for the bucket), as it holds it now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MapEntry {
    pub shard: ShardId,
    pub leader: NodeId,
    pub generation: Generation,
    pub map_version: u64,
}

/// What the caller does next, in order.
#[derive(Clone, Debug)]
pub enum Step {
    /// Send the request to `to` as a new attempt, under a new request id
    /// (answers to earlier ids are stale: drop them), for group `shard`
    /// (a bucket's request may go to another group than it started for).
    /// `route` is what the caller's map says of it.
    Send {
        to: NodeId,
        shard: ShardId,
        route: Option<Route>,
    },
    /// Send the current attempt again, with the same id, to the same node.
    Resend,
    /// Bring the shard-map copy up to date, then call [`Call::on_timer`]
    /// with what it says now.
    RefreshMap,
    /// Call [`Call::on_timer`] at this time, unless an answer comes first
    /// ([`Call::on_answer`]). Replaces any earlier wake-up.
    WakeAt(MonoMs),
    /// The call is over: the answer the client gets, or a refusal (boxed:
    /// answers are large and come once per call).
    Done(Box<Result<Response, NodeError>>),
}

#[derive(Clone, Debug)]
enum Phase {
    /// The current attempt is out; its answer has not come.
    Waiting {
        sent_at: MonoMs,
        resend_at: MonoMs,
        resend_every_ms: u64,
        /// The map is refreshed at most once per check interval.
        refresh_at: MonoMs,
    },
    /// Refused by a leadership change: waiting for the map to move.
    Backoff {
        until: MonoMs,
        refusal: NodeError,
    },
    Done,
}

/// One request on its way to its group's leader.
#[derive(Clone, Debug)]
pub struct Call {
    /// The group of the current attempt.
    shard: ShardId,
    /// The bucket the request is for, if one: the call follows it.
    bucket: Option<BucketId>,
    is_write: bool,
    limits: CallLimits,
    deadline: MonoMs,
    /// Where the current attempt went.
    leader: NodeId,
    /// The generation the map named when the current attempt went.
    route: Option<Generation>,
    attempts: u32,
    news_wait_ms: u64,
    /// How long the next `moved` refusal waits for the map to move.
    moved_wait_ms: u64,
    /// A write one of whose attempts may have been taken.
    in_doubt: bool,
    phase: Phase,
}

impl CallLimits {
    /// Checks the timings against each other (a config breaking one would
    /// never resend, or never look at the map).
    pub fn validate(&self) -> Result<(), &'static str> {
        let rules = [
            ("request_timeout_ms > 0", self.request_timeout_ms > 0),
            ("route_attempts_max > 0", self.route_attempts_max > 0),
            ("map_poll_ms > 0", self.map_poll_ms > 0),
            (
                "0 < route_check_interval_ms < request_timeout_ms",
                self.route_check_interval_ms > 0
                    && self.route_check_interval_ms < self.request_timeout_ms,
            ),
            ("resend_after_ms > 0", self.resend_after_ms > 0),
            (
                "news_wait_ms <= leadership_wait_ms_max",
                self.news_wait_ms <= self.leadership_wait_ms_max,
            ),
        ];
        match rules.iter().find(|(_, holds)| !holds) {
            Some((rule, _)) => Err(rule),
            None => Ok(()),
        }
    }
}

impl Call {
    /// Starts a call at `now`, to the leader `entry` names; refused when
    /// the group is not in the map. With a `bucket`, every entry the
    /// caller passes is the one of the group its map names for it.
    pub fn start(
        now: MonoMs,
        shard: ShardId,
        bucket: Option<BucketId>,
        is_write: bool,
        entry: Option<MapEntry>,
        limits: CallLimits,
    ) -> Result<(Call, Vec<Step>), NodeError> {
        assert_eq!(limits.validate(), Ok(()), "{shard}: call limits");
        let Some(entry) = entry else {
            return Err(NodeError::new(
                ErrorKind::UnknownShard,
                format!("{shard} is not in the shard map"),
            ));
        };
        let mut call = Call {
            shard,
            bucket,
            is_write,
            limits,
            deadline: now.plus(limits.request_timeout_ms),
            leader: entry.leader.clone(),
            route: None,
            attempts: 0,
            news_wait_ms: limits.news_wait_ms,
            moved_wait_ms: limits.news_wait_ms,
            in_doubt: false,
            phase: Phase::Done,
        };
        let steps = call.attempt(now, Some(&entry));
        assert!(matches!(call.phase, Phase::Waiting { .. }));
        Ok((call, steps))
    }

    pub fn is_done(&self) -> bool {
        matches!(self.phase, Phase::Done)
    }

    /// The node the current attempt went to.
    pub fn leader(&self) -> &NodeId {
        &self.leader
    }

    /// The answer to the current attempt (the caller drops answers to
    /// earlier ones). No step: keep waiting as before.
    pub fn on_answer(
        &mut self,
        now: MonoMs,
        response: Response,
        entry: Option<&MapEntry>,
    ) -> Vec<Step> {
        if !matches!(self.phase, Phase::Waiting { .. }) {
            return Vec::new(); // a duplicate after the call moved on
        }
        let refusal = match response {
            Response::Error(refusal) => refusal,
            answer => return self.finish(Ok(answer)),
        };
        self.in_doubt |= self.is_write && refusal.outcome_unknown;
        match &refusal.kind {
            // Routes carry the generation and a map names the one leader of
            // its generation, so a replica at the route's generation that
            // knows another leader is rare (a request sent with no map
            // entry); the simulator never sees it.
            ErrorKind::NotLeader { hint: Some(hint) } if *hint != self.leader => {
                self.leader = hint.clone();
                self.attempt(now, entry)
            }
            ErrorKind::NotLeader { .. }
            | ErrorKind::LeadershipChanged { .. }
            | ErrorKind::StaleRoute { .. } => {
                // Leadership is moving (a transfer or failover): wait for
                // the map to name the next leader, then send again. A node
                // the map already names as leader has not heard the news
                // yet: ask it again shortly. A stale route means our copy
                // of the map trails the replica's: refresh it and send to
                // whoever it names.
                let wait_ms = if refusal.code() == ErrorCode::NotLeader {
                    self.news_wait_ms =
                        (self.news_wait_ms * 2).min(self.limits.leadership_wait_ms_max);
                    self.news_wait_ms / 2
                } else {
                    refusal
                        .retry_after_ms()
                        .unwrap_or(self.limits.leadership_wait_ms_max)
                        .min(self.limits.leadership_wait_ms_max)
                };
                let refresh = refusal.code() == ErrorCode::StaleRoute;
                self.phase = Phase::Backoff {
                    until: now.plus(wait_ms).min(self.deadline),
                    refusal,
                };
                if refresh {
                    vec![Step::RefreshMap]
                } else {
                    self.on_timer(now, entry)
                }
            }
            // Nothing changed: wait for the map to name the bucket's next
            // group (or for the seal to lift), asking the map at once.
            ErrorKind::Moved { .. } if self.bucket.is_some() => {
                probe("gateway.call_waited_for_a_moved_bucket");
                let wait_ms = self.moved_wait_ms;
                self.moved_wait_ms = (wait_ms * 2).min(self.limits.leadership_wait_ms_max);
                self.phase = Phase::Backoff {
                    until: now.plus(wait_ms).min(self.deadline),
                    refusal,
                };
                vec![Step::RefreshMap]
            }
            _ => self.finish(Ok(Response::Error(refusal))),
        }
    }

    /// The caller could not send the attempt (its own queue is full): the
    /// call ends with that refusal, in doubt if an earlier attempt was.
    pub fn on_send_refused(&mut self, refusal: NodeError) -> Vec<Step> {
        if self.is_done() {
            return Vec::new();
        }
        self.finish(Err(refusal))
    }

    /// Time passed, or the map may have moved: `entry` is what the
    /// caller's copy says now. Safe to call at any moment.
    pub fn on_timer(&mut self, now: MonoMs, entry: Option<&MapEntry>) -> Vec<Step> {
        match self.phase.clone() {
            Phase::Done => Vec::new(),
            Phase::Waiting {
                sent_at,
                resend_at,
                resend_every_ms,
                refresh_at,
            } => {
                let check_ms = self.limits.route_check_interval_ms;
                if now.since(sent_at) >= self.limits.silent_leader_ms && now >= refresh_at {
                    // The leader may be gone: has the map moved?
                    if let Phase::Waiting { refresh_at, .. } = &mut self.phase {
                        *refresh_at = now.plus(check_ms);
                    }
                    return vec![Step::RefreshMap];
                }
                let moved = entry.is_some_and(|e| e.leader != self.leader || e.shard != self.shard);
                if moved {
                    probe("gateway.call_followed_the_map");
                }
                if moved || now >= self.deadline {
                    return self.unanswered(now, entry);
                }
                let mut steps = Vec::new();
                if now >= resend_at {
                    probe("gateway.call_resent");
                    // Two copies are out under one id: a definite refusal
                    // may answer the copy while the first one is taken.
                    self.in_doubt |= self.is_write;
                    steps.push(Step::Resend);
                    let every = resend_every_ms.saturating_mul(2);
                    if let Phase::Waiting {
                        resend_at,
                        resend_every_ms,
                        ..
                    } = &mut self.phase
                    {
                        *resend_every_ms = every;
                        *resend_at = now.plus(every);
                    }
                }
                steps.push(Step::WakeAt(now.plus(check_ms).min(self.deadline)));
                steps
            }
            Phase::Backoff { until, refusal } => {
                let moved = entry.is_none_or(|e| e.leader != self.leader || e.shard != self.shard)
                    || entry.map(|e| e.generation) != self.route;
                if !moved && now < until {
                    return vec![Step::WakeAt(now.plus(self.limits.map_poll_ms).min(until))];
                }
                match entry {
                    Some(next) if now < self.deadline => {
                        self.leader = next.leader.clone();
                        self.attempt(now, Some(next))
                    }
                    _ => self.finish(Ok(Response::Error(refusal))),
                }
            }
        }
    }

    /// The current attempt got no answer (the map moved, or time is up).
    fn unanswered(&mut self, now: MonoMs, entry: Option<&MapEntry>) -> Vec<Step> {
        self.in_doubt |= self.is_write;
        match entry {
            Some(next) if now < self.deadline => {
                self.leader = next.leader.clone();
                self.attempt(now, Some(next))
            }
            _ => self.time_out(),
        }
    }

    /// Sends the request to `self.leader` as a new attempt.
    fn attempt(&mut self, now: MonoMs, entry: Option<&MapEntry>) -> Vec<Step> {
        if self.attempts == self.limits.route_attempts_max {
            // Out of attempts while a bucket moves: its refusal is the
            // answer (nothing is out, so nothing new is in doubt).
            if let Phase::Backoff { refusal, .. } = &self.phase {
                if refusal.code() == ErrorCode::Moved {
                    let refusal = refusal.clone();
                    return self.finish(Ok(Response::Error(refusal)));
                }
            }
            return self.time_out();
        }
        self.attempts += 1;
        self.route = entry.map(|e| e.generation);
        if let Some(entry) = entry {
            self.shard = entry.shard;
        }
        self.phase = Phase::Waiting {
            sent_at: now,
            resend_at: now.plus(self.limits.resend_after_ms),
            resend_every_ms: self.limits.resend_after_ms,
            refresh_at: now,
        };
        let wake = now
            .plus(self.limits.route_check_interval_ms)
            .min(self.deadline);
        let route = entry.map(|e| Route {
            generation: e.generation,
            map_version: e.map_version,
            bucket: self.bucket,
        });
        vec![
            Step::Send {
                to: self.leader.clone(),
                shard: self.shard,
                route,
            },
            Step::WakeAt(wake),
        ]
    }

    fn time_out(&mut self) -> Vec<Step> {
        // The attempt out now may have been taken.
        self.in_doubt |= self.is_write;
        let refusal = NodeError::new(
            ErrorKind::Timeout,
            format!(
                "no answer for {} within {} ms",
                self.shard, self.limits.request_timeout_ms
            ),
        );
        self.finish(Err(refusal))
    }

    /// Ends the call. A refusal of a write in doubt says so, whatever the
    /// last node answered: an earlier attempt may still commit.
    fn finish(&mut self, mut result: Result<Response, NodeError>) -> Vec<Step> {
        assert!(!self.is_done(), "{}: a call finished twice", self.shard);
        assert!(!self.in_doubt || self.is_write);
        self.phase = Phase::Done;
        if let Err(refusal) | Ok(Response::Error(refusal)) = &mut result {
            if self.in_doubt && !refusal.outcome_unknown {
                probe("gateway.call_refusal_after_an_attempt_in_doubt");
                refusal.outcome_unknown = true;
                refusal
                    .message
                    .push_str("; an earlier attempt may still commit");
            }
        }
        vec![Step::Done(Box::new(result))]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use harbor_replication::Role;
    use harbor_reservation::Outcome;
    use harbor_types::CommitToken;
    use harbor_wire::Served;

    const SHARD: ShardId = ShardId(3);

    fn node(name: &str) -> NodeId {
        NodeId::new(name).unwrap()
    }

    fn at(ms: u64) -> MonoMs {
        MonoMs::from_millis(ms)
    }

    fn entry(leader: &str, generation: u64) -> MapEntry {
        MapEntry {
            shard: SHARD,
            leader: node(leader),
            generation: Generation(generation),
            map_version: 1,
        }
    }

    fn applied(by: &str) -> Response {
        let token = CommitToken {
            shard: SHARD,
            generation: Generation(1),
            index: harbor_types::LogIndex(7),
        };
        Response::Applied {
            outcome: Outcome::Noop,
            issuer: None,
            commit_token: token,
            served: Served {
                node: node(by),
                shard: SHARD,
                generation: Generation(1),
                applied: Some(token),
                role: Role::Leader,
                staleness_ms: Some(0),
            },
        }
    }

    fn refusal(kind: ErrorKind) -> Response {
        Response::Error(NodeError::new(kind, "refused"))
    }

    fn sent_to(steps: &[Step]) -> Vec<(NodeId, Option<Generation>)> {
        steps
            .iter()
            .filter_map(|s| match s {
                Step::Send { to, route, .. } => Some((to.clone(), route.map(|r| r.generation))),
                _ => None,
            })
            .collect()
    }

    fn wake(steps: &[Step]) -> Option<MonoMs> {
        steps.iter().find_map(|s| match s {
            Step::WakeAt(at) => Some(*at),
            _ => None,
        })
    }

    fn done(steps: &[Step]) -> Option<&Result<Response, NodeError>> {
        steps.iter().find_map(|s| match s {
            Step::Done(result) => Some(&**result),
            _ => None,
        })
    }

    fn start(is_write: bool, e: MapEntry) -> (Call, Vec<Step>) {
        Call::start(at(1), SHARD, None, is_write, Some(e), CallLimits::default()).unwrap()
    }

    #[test]
    fn a_moved_bucket_is_followed_to_the_group_the_map_names_next() {
        let bucket = BucketId(173);
        let first = entry("ny-1", 4);
        let (mut call, steps) = Call::start(
            at(1),
            SHARD,
            Some(bucket),
            true,
            Some(first.clone()),
            CallLimits::default(),
        )
        .unwrap();
        let Some(Step::Send {
            route: Some(route),
            shard,
            ..
        }) = steps.first()
        else {
            panic!("{steps:?}");
        };
        assert_eq!(
            (route.bucket, route.map_version, *shard),
            (Some(bucket), 1, SHARD)
        );
        // Sealed: nothing changed, so the map is asked and, while it has
        // not moved, the same group is asked again after a wait.
        let steps = call.on_answer(at(5), refusal(ErrorKind::Moved { bucket }), Some(&first));
        assert!(matches!(steps.as_slice(), [Step::RefreshMap]), "{steps:?}");
        let steps = call.on_timer(at(6), Some(&first));
        assert!(
            sent_to(&steps).is_empty() && wake(&steps).is_some(),
            "{steps:?}"
        );
        let steps = call.on_timer(at(16), Some(&first));
        assert_eq!(sent_to(&steps), vec![(node("ny-1"), Some(Generation(4)))]);
        let steps = call.on_answer(at(17), refusal(ErrorKind::Moved { bucket }), Some(&first));
        assert!(matches!(steps.as_slice(), [Step::RefreshMap]));
        // The map names the bucket's new group: the same request goes there.
        let next = MapEntry {
            shard: ShardId(5),
            leader: node("ny-2"),
            generation: Generation(2),
            map_version: 2,
        };
        let steps = call.on_timer(at(18), Some(&next));
        let Some(Step::Send {
            to,
            shard,
            route: Some(route),
        }) = steps.first()
        else {
            panic!("{steps:?}");
        };
        assert_eq!(
            (to, *shard, route.map_version),
            (&node("ny-2"), ShardId(5), 2)
        );
        let steps = call.on_answer(at(20), applied("ny-2"), Some(&next));
        assert!(matches!(done(&steps), Some(Ok(Response::Applied { .. }))));

        // A moved refusal is definite, and without a bucket it ends the call.
        let (mut call, _) = start(true, entry("ny-1", 4));
        let steps = call.on_answer(at(5), refusal(ErrorKind::Moved { bucket }), Some(&first));
        let Some(Ok(Response::Error(e))) = done(&steps) else {
            panic!("{steps:?}");
        };
        assert!(e.code() == ErrorCode::Moved && !e.outcome_unknown);
    }

    #[test]
    fn an_answer_from_the_leader_ends_the_call() {
        let (mut call, steps) = start(true, entry("ny-1", 4));
        assert_eq!(sent_to(&steps), vec![(node("ny-1"), Some(Generation(4)))]);
        assert_eq!(wake(&steps), Some(at(51)));
        let steps = call.on_answer(at(9), applied("ny-1"), Some(&entry("ny-1", 4)));
        assert!(matches!(done(&steps), Some(Ok(Response::Applied { .. }))));
        assert!(call.is_done());
        // A duplicate of the answer changes nothing.
        assert!(call.on_answer(at(10), applied("ny-1"), None).is_empty());
    }

    #[test]
    fn a_group_missing_from_the_map_is_refused_at_once() {
        let e = Call::start(at(1), SHARD, None, true, None, CallLimits::default()).unwrap_err();
        assert_eq!(e.code(), ErrorCode::UnknownShard);
    }

    #[test]
    fn a_hint_is_followed_at_once_with_a_new_attempt() {
        let (mut call, _) = start(true, entry("ny-1", 4));
        let hint = ErrorKind::NotLeader {
            hint: Some(node("ny-2")),
        };
        let steps = call.on_answer(at(5), refusal(hint), Some(&entry("ny-1", 4)));
        assert_eq!(sent_to(&steps), vec![(node("ny-2"), Some(Generation(4)))]);
        assert_eq!(call.leader(), &node("ny-2"));
    }

    #[test]
    fn a_map_that_moves_while_waiting_sends_to_the_new_leader() {
        let (mut call, _) = start(true, entry("ny-1", 4));
        let steps = call.on_timer(at(51), Some(&entry("ny-1", 4)));
        assert!(sent_to(&steps).is_empty());
        assert_eq!(wake(&steps), Some(at(101)));
        let steps = call.on_timer(at(101), Some(&entry("ny-3", 5)));
        assert_eq!(sent_to(&steps), vec![(node("ny-3"), Some(Generation(5)))]);
    }

    #[test]
    fn a_silent_leader_makes_the_call_refresh_the_map_and_send_copies() {
        let limits = CallLimits::default();
        let (mut call, _) = start(true, entry("ny-1", 4));
        let same = entry("ny-1", 4);
        // Not yet silent: no refresh.
        let steps = call.on_timer(at(251), Some(&same));
        assert!(!steps.iter().any(|s| matches!(s, Step::RefreshMap)));
        // Silent: refresh once per check interval, then look again.
        let steps = call.on_timer(at(301), Some(&same));
        assert!(matches!(steps[..], [Step::RefreshMap]));
        let steps = call.on_timer(at(301), Some(&same));
        assert!(!steps.iter().any(|s| matches!(s, Step::RefreshMap)));
        // A copy (same id) after resend_after_ms, then after twice that.
        let first = 1 + limits.resend_after_ms;
        let steps = call.on_timer(at(first), Some(&same));
        assert!(steps.iter().any(|s| matches!(s, Step::RefreshMap)));
        let steps = call.on_timer(at(first), Some(&same));
        assert!(steps.iter().any(|s| matches!(s, Step::Resend)));
        assert!(sent_to(&steps).is_empty());
        let steps = call.on_timer(at(first + 1_000), Some(&same));
        assert!(matches!(steps[..], [Step::RefreshMap]));
        let steps = call.on_timer(at(first + 1_000), Some(&same));
        assert!(!steps.iter().any(|s| matches!(s, Step::Resend)));
        let steps = call.on_timer(at(first + 2_000), Some(&same));
        assert!(matches!(steps[..], [Step::RefreshMap]));
        let steps = call.on_timer(at(first + 2_000), Some(&same));
        assert!(steps.iter().any(|s| matches!(s, Step::Resend)));
    }

    #[test]
    fn past_the_deadline_a_write_is_unknown_and_a_read_is_not() {
        for is_write in [true, false] {
            let (mut call, _) = start(is_write, entry("ny-1", 4));
            let deadline = 1 + CallLimits::default().request_timeout_ms;
            let mut steps = call.on_timer(at(deadline), Some(&entry("ny-1", 4)));
            if matches!(steps[..], [Step::RefreshMap]) {
                steps = call.on_timer(at(deadline), Some(&entry("ny-1", 4)));
            }
            let Some(Err(e)) = done(&steps) else {
                panic!("expected a timeout, got {steps:?}");
            };
            assert_eq!(e.code(), ErrorCode::Timeout);
            assert_eq!(e.outcome_unknown, is_write);
        }
    }

    #[test]
    fn a_stale_route_refreshes_the_map_and_goes_where_it_points() {
        let (mut call, _) = start(true, entry("ny-1", 4));
        let stale = ErrorKind::StaleRoute {
            hint: Some(node("ny-2")),
        };
        let steps = call.on_answer(at(5), refusal(stale), Some(&entry("ny-1", 4)));
        assert!(matches!(steps[..], [Step::RefreshMap]));
        let steps = call.on_timer(at(6), Some(&entry("ny-2", 5)));
        assert_eq!(sent_to(&steps), vec![(node("ny-2"), Some(Generation(5)))]);
    }

    #[test]
    fn a_leadership_change_waits_for_the_map_then_asks_again() {
        let (mut call, _) = start(true, entry("ny-1", 4));
        let same = entry("ny-1", 4);
        let changed = ErrorKind::LeadershipChanged {
            retry_after_ms: Some(100),
        };
        let steps = call.on_answer(at(5), refusal(changed), Some(&same));
        assert!(sent_to(&steps).is_empty());
        assert_eq!(wake(&steps), Some(at(10)));
        // The map does not move: the same leader is asked again after the
        // refusal's retry_after_ms.
        let steps = call.on_timer(at(50), Some(&same));
        assert!(sent_to(&steps).is_empty());
        let steps = call.on_timer(at(105), Some(&same));
        assert_eq!(sent_to(&steps), vec![(node("ny-1"), Some(Generation(4)))]);
    }

    #[test]
    fn a_hintless_not_leader_backs_off_longer_each_time() {
        let (mut call, _) = start(true, entry("ny-1", 4));
        let same = entry("ny-1", 4);
        let mut waits = Vec::new();
        let mut now = 5;
        for _ in 0..6 {
            let steps = call.on_answer(
                at(now),
                refusal(ErrorKind::NotLeader { hint: None }),
                Some(&same),
            );
            assert!(sent_to(&steps).is_empty());
            // Poll until the call sends again.
            let started = now;
            loop {
                now += 1;
                let steps = call.on_timer(at(now), Some(&same));
                if !sent_to(&steps).is_empty() {
                    break;
                }
            }
            waits.push(now - started);
        }
        assert_eq!(waits, vec![10, 20, 40, 80, 100, 100]);
    }

    #[test]
    fn a_call_gives_up_after_its_attempts() {
        let limits = CallLimits {
            route_attempts_max: 3,
            ..CallLimits::default()
        };
        let (mut call, _) =
            Call::start(at(1), SHARD, None, true, Some(entry("ny-1", 4)), limits).unwrap();
        let mut sends = 1;
        for (i, next) in ["ny-2", "ny-3", "ny-1"].iter().enumerate() {
            let hint = ErrorKind::NotLeader {
                hint: Some(node(next)),
            };
            let steps = call.on_answer(at(2 + i as u64), refusal(hint), None);
            sends += sent_to(&steps).len();
            if let Some(result) = done(&steps) {
                assert_eq!(result.as_ref().unwrap_err().code(), ErrorCode::Timeout);
                assert_eq!(sends, 3);
                return;
            }
        }
        panic!("the call did not give up");
    }

    #[test]
    fn other_refusals_end_the_call_as_they_are() {
        let (mut call, _) = start(true, entry("ny-1", 4));
        let steps = call.on_answer(
            at(5),
            refusal(ErrorKind::RpoBudgetExceeded {
                retry_after_ms: 1_000,
            }),
            Some(&entry("ny-1", 4)),
        );
        let Some(Ok(Response::Error(e))) = done(&steps) else {
            panic!("expected the refusal, got {steps:?}");
        };
        assert_eq!(e.code(), ErrorCode::RpoBudgetExceeded);
    }

    #[test]
    fn a_refusal_after_an_attempt_in_doubt_is_not_definite() {
        // The first attempt goes unanswered (the map moves on), so the
        // first leader may still commit the write: the second leader's
        // definite refusal cannot be the call's answer.
        let (mut call, _) = start(true, entry("ny-1", 4));
        let steps = call.on_timer(at(51), Some(&entry("ny-2", 5)));
        assert_eq!(sent_to(&steps), vec![(node("ny-2"), Some(Generation(5)))]);
        let steps = call.on_answer(at(60), refusal(ErrorKind::ReplicaFailed), None);
        let Some(Ok(Response::Error(e))) = done(&steps) else {
            panic!("expected the refusal, got {steps:?}");
        };
        assert_eq!(e.code(), ErrorCode::ReplicaFailed);
        assert!(e.outcome_unknown, "{e}");

        // A refusal in doubt that is retried leaves the write in doubt too.
        let (mut call, _) = start(true, entry("ny-1", 4));
        let changed = NodeError::in_doubt(
            ErrorKind::LeadershipChanged {
                retry_after_ms: None,
            },
            "changed",
        );
        call.on_answer(at(5), Response::Error(changed), Some(&entry("ny-1", 4)));
        let steps = call.on_timer(at(6), Some(&entry("ny-2", 5)));
        assert_eq!(sent_to(&steps).len(), 1);
        let budget = ErrorKind::RpoBudgetExceeded {
            retry_after_ms: 100,
        };
        let steps = call.on_answer(at(9), refusal(budget), None);
        let Some(Ok(Response::Error(e))) = done(&steps) else {
            panic!("expected the refusal, got {steps:?}");
        };
        assert!(e.outcome_unknown, "{e}");

        // A read is never in doubt: it changes nothing.
        let (mut call, _) = start(false, entry("ny-1", 4));
        call.on_timer(at(51), Some(&entry("ny-2", 5)));
        let steps = call.on_answer(at(60), refusal(ErrorKind::Unavailable), None);
        let Some(Ok(Response::Error(e))) = done(&steps) else {
            panic!("expected the refusal, got {steps:?}");
        };
        assert!(!e.outcome_unknown);
    }

    #[test]
    fn a_refusal_after_a_copy_was_sent_is_not_definite() {
        // The copy may reach the leader after it was drained and be
        // refused, while the first copy was taken and commits.
        let (mut call, _) = start(true, entry("ny-1", 4));
        let same = entry("ny-1", 4);
        let resend_at = 1 + CallLimits::default().resend_after_ms;
        let mut steps = call.on_timer(at(resend_at), Some(&same));
        if matches!(steps[..], [Step::RefreshMap]) {
            steps = call.on_timer(at(resend_at), Some(&same));
        }
        assert!(steps.iter().any(|s| matches!(s, Step::Resend)));
        let steps = call.on_answer(at(resend_at + 5), refusal(ErrorKind::Unavailable), None);
        let Some(Ok(Response::Error(e))) = done(&steps) else {
            panic!("expected the refusal, got {steps:?}");
        };
        assert!(e.outcome_unknown, "{e}");
    }

    #[test]
    fn a_send_refused_after_an_attempt_in_doubt_is_in_doubt() {
        let (mut call, _) = start(true, entry("ny-1", 4));
        call.on_timer(at(51), Some(&entry("ny-2", 5)));
        let full = NodeError::new(
            ErrorKind::Overloaded {
                retry_after_ms: None,
            },
            "full",
        );
        let steps = call.on_send_refused(full);
        let Some(Err(e)) = done(&steps) else {
            panic!("expected the refusal, got {steps:?}");
        };
        assert!(e.outcome_unknown && call.is_done());
    }
}

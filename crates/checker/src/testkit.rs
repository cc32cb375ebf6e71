//! Short constructors for hand-made histories in unit tests.

use crate::format::{
    Call, Consistency, ErrorReply, FinalLine, FinalReservation, FinalToken, LostLine, Reply,
    ReservationStatus, ServedBy, TokenStatus,
};
use crate::{History, HistoryRecorder};
use harbor_types::{
    Amount, CommitToken, Generation, IssuerId, NodeId, Region, ReservationId, ReservationToken,
    ShardId,
};

pub fn ct(text: &str) -> CommitToken {
    text.parse().unwrap()
}

pub fn issuer(text: &str) -> IssuerId {
    IssuerId::new(text).unwrap()
}

pub fn token(text: &str) -> ReservationToken {
    ReservationToken::new(text).unwrap()
}

pub fn rid(text: &str) -> ReservationId {
    ReservationId::parse(text).unwrap()
}

pub fn register(issuer_id: &str, limit: u64) -> Call {
    Call::RegisterIssuer {
        issuer_id: issuer(issuer_id),
        home_region: Region::new("madrid").unwrap(),
        limit: Amount(limit),
    }
}

/// A reserve confirmed at once.
pub fn reserve(issuer_id: &str, token_text: &str, amount: u64) -> Call {
    Call::Reserve {
        token: token(token_text),
        issuer_id: issuer(issuer_id),
        amount: Amount(amount),
        hold_ttl_ms: None,
    }
}

pub fn hold(issuer_id: &str, token_text: &str, amount: u64) -> Call {
    Call::Reserve {
        token: token(token_text),
        issuer_id: issuer(issuer_id),
        amount: Amount(amount),
        hold_ttl_ms: Some(30_000),
    }
}

pub fn confirm(id: &str) -> Call {
    Call::Confirm {
        reservation_id: rid(id),
    }
}

pub fn release(id: &str) -> Call {
    Call::Release {
        reservation_id: rid(id),
    }
}

pub fn resolve(issuer_id: &str, token_text: &str) -> Call {
    Call::Resolve {
        token: token(token_text),
        issuer_id: issuer(issuer_id),
    }
}

pub fn read(issuer_id: &str, consistency: Consistency) -> Call {
    Call::ReadIssuer {
        issuer_id: issuer(issuer_id),
        consistency,
        max_staleness_ms: None,
    }
}

pub fn registered(token: &str) -> Reply {
    Reply::RegisterIssuer {
        commit_token: ct(token),
    }
}

pub fn reserved(id: &str, status: ReservationStatus, token: &str) -> Reply {
    Reply::Reserve {
        reservation_id: rid(id),
        status,
        commit_token: ct(token),
        replayed: false,
    }
}

pub fn replayed(id: &str, token: &str) -> Reply {
    Reply::Reserve {
        reservation_id: rid(id),
        status: ReservationStatus::Confirmed,
        commit_token: ct(token),
        replayed: true,
    }
}

pub fn confirmed(token: &str) -> Reply {
    Reply::Confirm {
        status: ReservationStatus::Confirmed,
        commit_token: ct(token),
    }
}

pub fn released(token: &str) -> Reply {
    Reply::Release {
        status: ReservationStatus::Released,
        commit_token: ct(token),
    }
}

/// A fresh leader answer of a read at `applied`.
pub fn answer(applied: &str, reserved: u64) -> Reply {
    Reply::ReadIssuer {
        limit: Amount(100),
        reserved: Amount(reserved),
        applied: ct(applied),
        stale: false,
        staleness_ms: Some(0),
        served_by: ServedBy::Leader,
        session: Vec::new(),
    }
}

/// A final line whose `reserved` is consistent with `reservations`, every
/// reservation's token `committed`, plus `other_tokens`.
pub fn final_line(
    issuer_id: &str,
    limit: u64,
    reservations: &[(&str, &str, u64, ReservationStatus)],
    other_tokens: &[(&str, TokenStatus)],
) -> FinalLine {
    let reservations: Vec<FinalReservation> = reservations
        .iter()
        .map(|(id, token_text, amount, status)| FinalReservation {
            reservation_id: rid(id),
            token: token(token_text),
            amount: Amount(*amount),
            status: *status,
        })
        .collect();
    let mut tokens: Vec<FinalToken> = reservations
        .iter()
        .map(|r| FinalToken {
            token: r.token.clone(),
            status: TokenStatus::Committed,
            reservation_id: Some(r.reservation_id.clone()),
        })
        .collect();
    tokens.extend(other_tokens.iter().map(|(token_text, status)| FinalToken {
        token: token(token_text),
        status: *status,
        reservation_id: None,
    }));
    let reserved = reservations
        .iter()
        .filter(|r| r.status.is_open())
        .map(|r| r.amount.0)
        .sum();
    FinalLine {
        time_ms: 0,
        issuer_id: issuer(issuer_id),
        shard: ShardId(1),
        limit: Amount(limit),
        reserved: Amount(reserved),
        reservations,
        tokens,
    }
}

/// A history under construction; every operation takes 5 ms and starts 5 ms
/// after the previous event, so "completed before invoked" is strict.
#[derive(Default)]
pub struct Script {
    pub rec: HistoryRecorder,
    now_ms: u64,
}

impl Script {
    pub fn new() -> Script {
        Script::default()
    }

    fn tick(&mut self) -> u64 {
        self.now_ms += 5;
        self.now_ms
    }

    /// Lets `ms` pass before the next event.
    pub fn advance(&mut self, ms: u64) {
        self.now_ms += ms;
    }

    pub fn invoke(&mut self, client: &str, call: Call) -> u64 {
        let now = self.tick();
        self.rec.invoke(now, client, call)
    }

    pub fn complete(&mut self, op: u64, reply: Reply) {
        let now = self.tick();
        self.rec.ok(now, op, reply);
    }

    pub fn ok(&mut self, client: &str, call: Call, reply: Reply) -> u64 {
        let op = self.invoke(client, call);
        self.complete(op, reply);
        op
    }

    pub fn fail(&mut self, client: &str, call: Call, error: &str) -> u64 {
        let op = self.invoke(client, call);
        let now = self.tick();
        self.rec.fail(now, op, ErrorReply::new(error));
        op
    }

    /// An operation that timed out.
    pub fn info(&mut self, client: &str, call: Call) -> u64 {
        let op = self.invoke(client, call);
        let now = self.tick();
        self.rec.info(now, op, "timeout");
        op
    }

    pub fn leader(&mut self, shard: u32, generation: u64, node: &str) {
        let now = self.tick();
        let node = NodeId::new(node).unwrap();
        self.rec
            .leader(now, ShardId(shard), Generation(generation), node);
    }

    pub fn final_state(&mut self, mut line: FinalLine) {
        line.time_ms = self.tick();
        self.rec.final_state(line);
    }

    pub fn lost(&mut self, issuer_id: &str, token_text: &str, commit_token: &str) {
        self.rec.lost_in_failover(LostLine {
            token: token(token_text),
            issuer_id: issuer(issuer_id),
            commit_token: ct(commit_token),
        });
    }

    pub fn bucket(&mut self, mut line: crate::format::BucketLine) {
        line.time_ms = self.tick();
        self.rec.bucket(line);
    }

    pub fn history(&self) -> History {
        self.rec.to_history().unwrap()
    }
}

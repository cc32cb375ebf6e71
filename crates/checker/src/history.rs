//! A parsed history: operations with their invoke and completion paired, and
//! the non-client lines (leaders, final states, failover losses) beside them.

use crate::format::{
    BucketLine, Call, ErrorReply, FinalLine, Function, HistoryLine, LeaderLine, LostLine, Reply,
    LINE_TYPES,
};
use harbor_types::{IssuerId, ReservationToken};
use std::collections::{BTreeMap, HashMap};
use std::io::BufRead;

/// Why a history could not be read. Line numbers count from 1.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HistoryError {
    #[error("line {line}: cannot read the history: {message}")]
    Read { line: usize, message: String },
    #[error("line {line}: no \"type\" field")]
    MissingType { line: usize },
    #[error("line {line}: unknown line type {found:?}; expected one of {LINE_TYPES:?}")]
    UnknownType { line: usize, found: String },
    #[error("line {line}: malformed line at column {column}: {message}")]
    Malformed {
        line: usize,
        column: usize,
        message: String,
    },
    #[error(
        "line {line}: time_ms {time_ms} is earlier than {previous_ms} on line {previous_line}"
    )]
    TimeWentBackwards {
        line: usize,
        time_ms: u64,
        previous_ms: u64,
        previous_line: usize,
    },
    #[error("line {line}: op {op} was already invoked on line {first_line}")]
    DuplicateInvoke {
        line: usize,
        op: u64,
        first_line: usize,
    },
    #[error("line {line}: completion of op {op}, which was never invoked")]
    CompletionWithoutInvoke { line: usize, op: u64 },
    #[error("line {line}: op {op} was already completed on line {first_line}")]
    CompletedTwice {
        line: usize,
        op: u64,
        first_line: usize,
    },
    #[error(
        "line {line}: op {op} was invoked by client {invoked:?} but completed by {completed:?}"
    )]
    ClientMismatch {
        line: usize,
        op: u64,
        invoked: String,
        completed: String,
    },
    #[error("line {line}: op {op} was invoked as {invoked} but completed as {completed}")]
    FunctionMismatch {
        line: usize,
        op: u64,
        invoked: Function,
        completed: Function,
    },
    #[error(
        "line {line}: client {client:?} invoked op {op} while its op {in_flight} is in flight"
    )]
    ClientBusy {
        line: usize,
        client: String,
        op: u64,
        in_flight: u64,
    },
    #[error(
        "line {line}: a second final line for issuer {issuer}; the first is line {first_line}"
    )]
    DuplicateFinal {
        line: usize,
        issuer: IssuerId,
        first_line: usize,
    },
}

/// When and where something was recorded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Moment {
    pub time_ms: u64,
    pub line: usize,
}

impl Moment {
    pub fn new(time_ms: u64, line: usize) -> Moment {
        Moment { time_ms, line }
    }
}

/// A history line other than an operation, with its line number.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AtLine<T> {
    pub line: usize,
    pub value: T,
}

/// One client operation: its invocation and, if it arrived, its completion.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Op {
    pub id: u64,
    pub client: String,
    pub call: Call,
    pub invoked: Moment,
    /// `None`: the client never learned the outcome (crashed) — unknown.
    pub completion: Option<Completion>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Completion {
    pub at: Moment,
    pub result: OpResult,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OpResult {
    /// It happened.
    Ok(Reply),
    /// It definitely did not happen.
    Fail(ErrorReply),
    /// It may or may not have happened.
    Info(ErrorReply),
}

impl Op {
    /// The reply, if the operation is known to have happened.
    pub fn ok(&self) -> Option<&Reply> {
        match &self.completion {
            Some(Completion {
                result: OpResult::Ok(reply),
                ..
            }) => Some(reply),
            _ => None,
        }
    }

    /// The error, if the operation definitely did not happen. Timeouts and
    /// missing completions are unknown, not failed: they return `None`.
    pub fn failed(&self) -> Option<&ErrorReply> {
        match &self.completion {
            Some(Completion {
                result: OpResult::Fail(error),
                ..
            }) => Some(error),
            _ => None,
        }
    }

    /// Whether the operation may have taken effect (ok, info or pending).
    pub fn may_have_happened(&self) -> bool {
        self.failed().is_none()
    }

    pub fn completed_ms(&self) -> Option<u64> {
        self.completion.as_ref().map(|c| c.at.time_ms)
    }
}

/// A parsed, validated history. Invariants: op ids are unique, every
/// completion follows its own invoke by the same client with the same `f`, a
/// client has at most one operation in flight, `time_ms` never decreases in
/// file order, and there is at most one final line per issuer.
#[derive(Clone, Debug, Default)]
pub struct History {
    ops: Vec<Op>,
    by_id: HashMap<u64, usize>,
    leaders: Vec<AtLine<LeaderLine>>,
    finals: BTreeMap<IssuerId, AtLine<FinalLine>>,
    lost: Vec<AtLine<LostLine>>,
    buckets: Vec<AtLine<BucketLine>>,
}

impl History {
    /// Parses JSON lines; blank lines are skipped.
    pub fn parse(text: &str) -> Result<History, HistoryError> {
        let mut builder = Builder::default();
        for (i, text) in text.lines().enumerate() {
            builder.push_text(i + 1, text)?;
        }
        Ok(builder.history)
    }

    pub fn from_reader(reader: impl BufRead) -> Result<History, HistoryError> {
        let mut builder = Builder::default();
        for (i, text) in reader.lines().enumerate() {
            let text = text.map_err(|e| HistoryError::Read {
                line: i + 1,
                message: e.to_string(),
            })?;
            builder.push_text(i + 1, &text)?;
        }
        Ok(builder.history)
    }

    /// Validates lines produced in memory; line `i` of the iterator is line
    /// number `i + 1`.
    pub fn from_lines(
        lines: impl IntoIterator<Item = HistoryLine>,
    ) -> Result<History, HistoryError> {
        let mut builder = Builder::default();
        for (i, line) in lines.into_iter().enumerate() {
            builder.push(i + 1, line)?;
        }
        Ok(builder.history)
    }

    /// Every operation, in invoke order.
    pub fn ops(&self) -> &[Op] {
        &self.ops
    }

    pub fn op(&self, id: u64) -> Option<&Op> {
        self.by_id.get(&id).map(|&i| &self.ops[i])
    }

    /// Leader lines in file order.
    pub fn leaders(&self) -> &[AtLine<LeaderLine>] {
        &self.leaders
    }

    /// Final lines by issuer.
    pub fn finals(&self) -> impl Iterator<Item = &AtLine<FinalLine>> {
        self.finals.values()
    }

    pub fn final_of(&self, issuer: &IssuerId) -> Option<&FinalLine> {
        self.finals.get(issuer).map(|f| &f.value)
    }

    pub fn lost_in_failover(&self) -> &[AtLine<LostLine>] {
        &self.lost
    }

    /// Bucket lines in file order.
    pub fn buckets(&self) -> &[AtLine<BucketLine>] {
        &self.buckets
    }

    /// Whether a failover reported this token's write lost.
    pub fn is_lost(&self, issuer: &IssuerId, token: &ReservationToken) -> bool {
        self.lost
            .iter()
            .any(|l| &l.value.issuer_id == issuer && &l.value.token == token)
    }
}

#[derive(Default)]
struct Builder {
    history: History,
    /// Client → its op in flight.
    in_flight: HashMap<String, u64>,
    /// The newest `(time_ms, line)` seen.
    last_time: Option<(u64, usize)>,
}

impl Builder {
    fn push_text(&mut self, line: usize, text: &str) -> Result<(), HistoryError> {
        if text.trim().is_empty() {
            return Ok(());
        }
        match HistoryLine::from_json(text) {
            Ok(parsed) => self.push(line, parsed),
            Err(error) => Err(classify(line, text, error)),
        }
    }

    fn push(&mut self, line: usize, parsed: HistoryLine) -> Result<(), HistoryError> {
        if let Some(time_ms) = parsed.time_ms() {
            if let Some((previous_ms, previous_line)) = self.last_time {
                if time_ms < previous_ms {
                    return Err(HistoryError::TimeWentBackwards {
                        line,
                        time_ms,
                        previous_ms,
                        previous_line,
                    });
                }
            }
            self.last_time = Some((time_ms, line));
        }
        let h = &mut self.history;
        match parsed {
            HistoryLine::Invoke(invoke) => {
                if let Some(&i) = h.by_id.get(&invoke.op) {
                    return Err(HistoryError::DuplicateInvoke {
                        line,
                        op: invoke.op,
                        first_line: h.ops[i].invoked.line,
                    });
                }
                if let Some(&in_flight) = self.in_flight.get(&invoke.client) {
                    return Err(HistoryError::ClientBusy {
                        line,
                        client: invoke.client,
                        op: invoke.op,
                        in_flight,
                    });
                }
                self.in_flight.insert(invoke.client.clone(), invoke.op);
                h.by_id.insert(invoke.op, h.ops.len());
                h.ops.push(Op {
                    id: invoke.op,
                    client: invoke.client,
                    call: invoke.call,
                    invoked: Moment::new(invoke.time_ms, line),
                    completion: None,
                });
            }
            HistoryLine::Ok(l) => {
                let at = Moment::new(l.time_ms, line);
                self.complete(
                    l.op,
                    &l.client,
                    l.reply.function(),
                    at,
                    OpResult::Ok(l.reply),
                )?;
            }
            HistoryLine::Fail(l) => {
                let at = Moment::new(l.time_ms, line);
                self.complete(l.op, &l.client, l.f, at, OpResult::Fail(l.value))?;
            }
            HistoryLine::Info(l) => {
                let at = Moment::new(l.time_ms, line);
                self.complete(l.op, &l.client, l.f, at, OpResult::Info(l.value))?;
            }
            HistoryLine::Leader(value) => h.leaders.push(AtLine { line, value }),
            HistoryLine::Final(value) => {
                if let Some(first) = h.finals.get(&value.issuer_id) {
                    return Err(HistoryError::DuplicateFinal {
                        line,
                        issuer: value.issuer_id,
                        first_line: first.line,
                    });
                }
                h.finals
                    .insert(value.issuer_id.clone(), AtLine { line, value });
            }
            HistoryLine::LostInFailover(value) => h.lost.push(AtLine { line, value }),
            HistoryLine::Bucket(value) => h.buckets.push(AtLine { line, value }),
            HistoryLine::Note(_) => {}
        }
        Ok(())
    }

    fn complete(
        &mut self,
        op: u64,
        client: &str,
        f: Function,
        at: Moment,
        result: OpResult,
    ) -> Result<(), HistoryError> {
        let line = at.line;
        let i = *self
            .history
            .by_id
            .get(&op)
            .ok_or(HistoryError::CompletionWithoutInvoke { line, op })?;
        let invoked = &mut self.history.ops[i];
        if let Some(first) = &invoked.completion {
            return Err(HistoryError::CompletedTwice {
                line,
                op,
                first_line: first.at.line,
            });
        }
        if invoked.client != client {
            return Err(HistoryError::ClientMismatch {
                line,
                op,
                invoked: invoked.client.clone(),
                completed: client.to_string(),
            });
        }
        if invoked.call.function() != f {
            return Err(HistoryError::FunctionMismatch {
                line,
                op,
                invoked: invoked.call.function(),
                completed: f,
            });
        }
        invoked.completion = Some(Completion { at, result });
        let removed = self.in_flight.remove(client);
        assert_eq!(
            removed,
            Some(op),
            "client {client} had another op in flight"
        );
        Ok(())
    }
}

/// Turns a serde error into the most specific typed error.
fn classify(line: usize, text: &str, error: serde_json::Error) -> HistoryError {
    // serde_json appends "at line 1 column N", which would read as a line
    // of the history; keep the column only.
    let message = error.to_string();
    let message = message
        .rsplit_once(" at line ")
        .map_or(&*message, |(m, _)| m);
    let malformed = HistoryError::Malformed {
        line,
        column: error.column(),
        message: message.to_string(),
    };
    let Ok(serde_json::Value::Object(object)) = serde_json::from_str(text) else {
        return malformed;
    };
    match object.get("type") {
        None => HistoryError::MissingType { line },
        Some(serde_json::Value::String(found)) if !LINE_TYPES.contains(&found.as_str()) => {
            HistoryError::UnknownType {
                line,
                found: found.clone(),
            }
        }
        Some(serde_json::Value::String(_)) => malformed,
        Some(other) => HistoryError::UnknownType {
            line,
            found: other.to_string(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const REGISTER: &str =
        r#""f":"register_issuer","value":{"issuer_id":"A","home_region":"madrid","limit":10}"#;
    const REGISTERED: &str = r#""f":"register_issuer","value":{"commit_token":"shard1@g1:1"}"#;

    fn invoke(op: u64, client: &str, time_ms: u64) -> String {
        format!(
            r#"{{"type":"invoke","op":{op},"client":"{client}","time_ms":{time_ms},{REGISTER}}}"#
        )
    }

    fn ok(op: u64, client: &str, time_ms: u64) -> String {
        format!(r#"{{"type":"ok","op":{op},"client":"{client}","time_ms":{time_ms},{REGISTERED}}}"#)
    }

    fn parse(lines: &[String]) -> Result<History, HistoryError> {
        History::parse(&lines.join("\n"))
    }

    #[test]
    fn pairs_invocations_with_completions() {
        let info = r#"{"type":"info","op":2,"client":"c2","f":"register_issuer","time_ms":9,"value":{"error":"timeout"}}"#;
        let text = [
            invoke(1, "c1", 1),
            invoke(2, "c2", 2),
            String::new(),
            r#"{"type":"note","anything":[1,2]}"#.into(),
            invoke(3, "c3", 3),
            ok(1, "c1", 5),
            info.into(),
        ]
        .join("\n");
        let h = History::parse(&text).unwrap();
        let reader = History::from_reader(std::io::Cursor::new(text.as_bytes())).unwrap();
        assert_eq!(reader.ops(), h.ops());
        assert_eq!(h.ops().len(), 3);
        let op1 = h.op(1).unwrap();
        assert_eq!(
            op1.invoked,
            Moment {
                time_ms: 1,
                line: 1
            }
        );
        assert_eq!(
            op1.completion.as_ref().unwrap().at,
            Moment {
                time_ms: 5,
                line: 6
            }
        );
        assert!(op1.ok().is_some());
        let op2 = h.op(2).unwrap();
        assert!(op2.ok().is_none() && op2.failed().is_none() && op2.may_have_happened());
        assert_eq!(h.op(3).unwrap().completion, None);
    }

    #[test]
    fn malformed_lines_are_reported_with_their_line_number() {
        type Expect = fn(&HistoryError) -> bool;
        let cases: [(&str, Expect); 5] = [
            ("{not json", |e| {
                matches!(e, HistoryError::Malformed { line: 2, .. })
            }),
            (r#"{"op":1}"#, |e| {
                matches!(e, HistoryError::MissingType { line: 2 })
            }),
            (
                r#"{"type":"teleport"}"#,
                |e| matches!(e, HistoryError::UnknownType { line: 2, found } if found == "teleport"),
            ),
            (
                r#"{"type":"invoke","op":2,"client":"c2","time_ms":1,"f":"fly","value":{}}"#,
                |e| matches!(e, HistoryError::Malformed { line: 2, .. }),
            ),
            (
                r#"{"type":"leader","time_ms":1,"shard":1,"generation":1,"node":"a b"}"#,
                |e| matches!(e, HistoryError::Malformed { line: 2, .. }),
            ),
        ];
        for (bad, expected) in cases {
            let err = parse(&[invoke(1, "c1", 0), bad.into()]).unwrap_err();
            assert!(expected(&err), "{bad}: {err}");
            let text = err.to_string();
            assert!(
                text.starts_with("line 2: ") && !text.contains("line 1"),
                "{text}"
            );
        }
    }

    #[test]
    fn unpaired_and_double_completions_are_errors() {
        let err = parse(&[ok(1, "c1", 0)]).unwrap_err();
        assert_eq!(
            err,
            HistoryError::CompletionWithoutInvoke { line: 1, op: 1 }
        );

        let err = parse(&[invoke(1, "c1", 0), ok(1, "c1", 1), ok(1, "c1", 2)]).unwrap_err();
        assert_eq!(
            err,
            HistoryError::CompletedTwice {
                line: 3,
                op: 1,
                first_line: 2
            }
        );

        let err = parse(&[invoke(1, "c1", 0), invoke(1, "c2", 1)]).unwrap_err();
        assert_eq!(
            err,
            HistoryError::DuplicateInvoke {
                line: 2,
                op: 1,
                first_line: 1
            }
        );

        let err = parse(&[invoke(1, "c1", 0), ok(1, "c2", 1)]).unwrap_err();
        assert!(
            matches!(err, HistoryError::ClientMismatch { line: 2, .. }),
            "{err}"
        );

        let err = parse(&[invoke(1, "c1", 0), invoke(2, "c1", 1)]).unwrap_err();
        assert!(
            matches!(
                err,
                HistoryError::ClientBusy {
                    line: 2,
                    in_flight: 1,
                    ..
                }
            ),
            "{err}"
        );

        let wrong_f = r#"{"type":"fail","op":1,"client":"c1","f":"reserve","time_ms":1,"value":{"error":"x"}}"#;
        let err = parse(&[invoke(1, "c1", 0), wrong_f.into()]).unwrap_err();
        assert!(
            matches!(err, HistoryError::FunctionMismatch { line: 2, .. }),
            "{err}"
        );
    }

    #[test]
    fn time_must_not_go_backwards() {
        let err = parse(&[invoke(1, "c1", 5), ok(1, "c1", 4)]).unwrap_err();
        assert_eq!(
            err,
            HistoryError::TimeWentBackwards {
                line: 2,
                time_ms: 4,
                previous_ms: 5,
                previous_line: 1
            }
        );
    }

    #[test]
    fn one_final_line_per_issuer() {
        let fin = r#"{"type":"final","time_ms":1,"issuer_id":"A","shard":1,"limit":10,"reserved":0,"reservations":[],"tokens":[]}"#;
        let err = parse(&[fin.into(), fin.into()]).unwrap_err();
        assert!(
            matches!(
                err,
                HistoryError::DuplicateFinal {
                    line: 2,
                    first_line: 1,
                    ..
                }
            ),
            "{err}"
        );
    }
}

//! Writing a history: the simulator and the checker's tests record what
//! their clients did through a [`HistoryRecorder`], which numbers
//! operations and asserts the file invariants on the write side (a broken
//! history is a bug in the producer, so it panics; the simulator reports
//! the panic as a violation of its run).

use crate::format::{
    BucketLine, Call, ErrorLine, ErrorReply, FinalLine, Function, HistoryLine, InvokeLine,
    LeaderLine, LostLine, OkLine, Reply,
};
use crate::history::{History, HistoryError};
use harbor_types::{Generation, NodeId, ShardId};
use std::collections::HashMap;

/// Collects history lines in memory. Take them out with
/// [`HistoryRecorder::drain_lines`] to stream them to a file as you go, or
/// keep them all and call [`HistoryRecorder::to_jsonl`] at the end.
#[derive(Debug, Default)]
pub struct HistoryRecorder {
    lines: Vec<HistoryLine>,
    next_op: u64,
    /// Op → (client, function) for every operation not yet completed.
    in_flight: HashMap<u64, (String, Function)>,
    /// Client → its op in flight.
    busy: HashMap<String, u64>,
    last_time_ms: u64,
}

impl HistoryRecorder {
    pub fn new() -> HistoryRecorder {
        HistoryRecorder::default()
    }

    /// Records that `client` invoked `call`; returns the new op id (1, 2, ...).
    pub fn invoke(&mut self, time_ms: u64, client: &str, call: Call) -> u64 {
        if let Some(op) = self.busy.get(client) {
            panic!("client {client} invoked {call:?} while op {op} is in flight");
        }
        self.next_op += 1;
        let op = self.next_op;
        self.busy.insert(client.to_string(), op);
        self.in_flight
            .insert(op, (client.to_string(), call.function()));
        self.push(HistoryLine::Invoke(InvokeLine {
            op,
            client: client.to_string(),
            time_ms,
            call,
        }));
        op
    }

    /// The operation happened; `reply` must be for the same function.
    pub fn ok(&mut self, time_ms: u64, op: u64, reply: Reply) {
        let client = self.finish(op, reply.function());
        self.push(HistoryLine::Ok(OkLine {
            op,
            client,
            time_ms,
            reply,
        }));
    }

    /// The operation definitely did not happen.
    pub fn fail(&mut self, time_ms: u64, op: u64, error: ErrorReply) {
        let (_, f) = self.in_flight_op(op);
        let client = self.finish(op, f);
        self.push(HistoryLine::Fail(ErrorLine {
            op,
            client,
            time_ms,
            f,
            value: error,
        }));
    }

    /// The outcome is unknown (timeout, lost connection, `outcome_unknown`).
    pub fn info(&mut self, time_ms: u64, op: u64, error: &str) {
        let (_, f) = self.in_flight_op(op);
        let client = self.finish(op, f);
        self.push(HistoryLine::Info(ErrorLine {
            op,
            client,
            time_ms,
            f,
            value: ErrorReply::new(error),
        }));
    }

    pub fn leader(&mut self, time_ms: u64, shard: ShardId, generation: Generation, node: NodeId) {
        self.push(HistoryLine::Leader(LeaderLine {
            time_ms,
            shard,
            generation,
            node,
        }));
    }

    pub fn final_state(&mut self, line: FinalLine) {
        self.push(HistoryLine::Final(line));
    }

    pub fn lost_in_failover(&mut self, line: LostLine) {
        self.push(HistoryLine::LostInFailover(line));
    }

    pub fn bucket(&mut self, line: BucketLine) {
        self.push(HistoryLine::Bucket(line));
    }

    /// A line for humans reading the history, e.g. "partition madrid|paris".
    pub fn note(&mut self, time_ms: u64, text: &str) {
        let mut map = serde_json::Map::new();
        map.insert("time_ms".into(), time_ms.into());
        map.insert("text".into(), text.into());
        self.push(HistoryLine::Note(map));
    }

    /// Lines recorded so far and not yet drained.
    pub fn lines(&self) -> &[HistoryLine] {
        &self.lines
    }

    /// Takes the lines recorded so far, for streaming them out.
    pub fn drain_lines(&mut self) -> Vec<HistoryLine> {
        std::mem::take(&mut self.lines)
    }

    /// The undrained lines as JSON lines, each ending in a newline.
    pub fn to_jsonl(&self) -> String {
        let mut out = String::new();
        for line in &self.lines {
            out.push_str(&line.to_json());
            out.push('\n');
        }
        out
    }

    /// The undrained lines as a checked [`History`].
    pub fn to_history(&self) -> Result<History, HistoryError> {
        History::from_lines(self.lines.iter().cloned())
    }

    fn push(&mut self, line: HistoryLine) {
        if let Some(time_ms) = line.time_ms() {
            assert!(
                time_ms >= self.last_time_ms,
                "history time went backwards: {time_ms} < {}",
                self.last_time_ms
            );
            self.last_time_ms = time_ms;
        }
        self.lines.push(line);
    }

    fn in_flight_op(&self, op: u64) -> (String, Function) {
        match self.in_flight.get(&op) {
            Some(entry) => entry.clone(),
            None => panic!("op {op} is not in flight"),
        }
    }

    fn finish(&mut self, op: u64, f: Function) -> String {
        let (client, invoked) = self.in_flight_op(op);
        assert_eq!(
            invoked, f,
            "op {op} was invoked as {invoked}, completed as {f}"
        );
        self.in_flight.remove(&op);
        self.busy.remove(&client);
        client
    }
}

//! Golden transcripts of the replication core (etcd raft's `testdata/`):
//! each file in `testdata/` is a script of inputs, each followed by the exact
//! effects the replicas produced, indented. The test replays every script
//! and compares the effects with the file; a change of behaviour shows up as
//! a diff to review. `HARBOR_REWRITE_TRANSCRIPTS=1 cargo test -p
//! harbor-replication --test transcripts` rewrites the files with what the
//! code does now.
//!
//! Commands (one per line; `#` starts a comment):
//! - `config key=value ...` before `start`: `sync_acks`, `lease_ms`,
//!   `retained_entries_max`, `snapshot_chunk_bytes_max`,
//!   `heartbeat_interval_ms`, `retransmit_timeout_ms`, `rpo_budget_ms`
//! - `start l1 l2 r1:remote ...` the members (local unless `:remote`)
//! - `elect NODE GEN` NODE leads generation GEN, every other one follows it
//! - `lead NODE GEN`, `follow NODE GEN LEADER`: one control order to one
//!   replica
//! - `wipe NODE` NODE restarts on an empty disk (it lost its state)
//! - `seal NODE GEN`, `compact NODE INDEX`
//! - `snapshot NODE TO BYTES` NODE answers `SnapshotNeeded` for TO with a
//!   snapshot of BYTES bytes at its compaction point
//! - `propose NODE TEXT` a proposal, then the end of the runtime's batch
//!   (`flush`); an empty TEXT is not allowed
//! - `persist NODE` what NODE wrote is durable (an fsync)
//! - `deliver [from=NODE] [to=NODE] [drop]` every message in flight that
//!   matches, in order (or drops them)
//! - `tick MS` time passes on both clocks; every replica ticks
//! - `status NODE` commit, durable and last index, role, lease

use std::collections::{BTreeMap, VecDeque};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use harbor_replication::{Config, Effect, Member, Message, Recovered, Replica, Role};
use harbor_types::{Generation, LogIndex, MonoMs, NodeId, Now, ShardId, WallMs};

struct Script {
    config: Vec<(String, u64)>,
    now_ms: u64,
    replicas: BTreeMap<NodeId, Replica>,
    /// How each replica was started, to start it again.
    configs: BTreeMap<NodeId, (Config, Vec<Member>)>,
    network: VecDeque<(NodeId, NodeId, Message)>,
    /// The newest entry each replica wrote (durable at its next `persist`).
    written: BTreeMap<NodeId, (LogIndex, Generation)>,
}

fn node(name: &str) -> NodeId {
    NodeId::new(name).unwrap()
}

fn number(text: &str) -> u64 {
    text.trim_start_matches('g')
        .parse()
        .unwrap_or_else(|_| panic!("not a number: {text}"))
}

impl Script {
    fn new() -> Script {
        Script {
            config: Vec::new(),
            now_ms: 1_000,
            replicas: BTreeMap::new(),
            configs: BTreeMap::new(),
            network: VecDeque::new(),
            written: BTreeMap::new(),
        }
    }

    fn now(&self) -> Now {
        Now::new(
            MonoMs::from_millis(self.now_ms),
            WallMs::from_millis(self.now_ms),
        )
    }

    fn replica(&mut self, name: &str) -> &mut Replica {
        self.replicas
            .get_mut(&node(name))
            .unwrap_or_else(|| panic!("no replica {name}"))
    }

    /// Runs one command; returns what it printed.
    fn run(&mut self, line: &str) -> String {
        let words: Vec<&str> = line.split_whitespace().collect();
        let mut out = String::new();
        let now = self.now();
        match words[..] {
            ["config", ref pairs @ ..] => {
                for pair in pairs {
                    let (key, value) = pair.split_once('=').expect("key=value");
                    self.config.push((key.to_string(), number(value)));
                }
            }
            ["start", ref names @ ..] => {
                let members: Vec<Member> = names
                    .iter()
                    .map(|n| match n.strip_suffix(":remote") {
                        Some(n) => Member {
                            node: node(n),
                            local: false,
                            voter: true,
                        },
                        None => Member {
                            node: node(n),
                            local: true,
                            voter: true,
                        },
                    })
                    .collect();
                for m in &members {
                    let mut config = Config::new(ShardId(7), m.node.clone());
                    for (key, value) in &self.config {
                        match key.as_str() {
                            "sync_acks" => config.sync_acks = *value as usize,
                            "lease_ms" => config.lease_ms = *value,
                            "retained_entries_max" => config.retained_entries_max = *value,
                            "snapshot_chunk_bytes_max" => {
                                config.snapshot_chunk_bytes_max = *value as usize
                            }
                            "heartbeat_interval_ms" => config.heartbeat_interval_ms = *value,
                            "retransmit_timeout_ms" => config.retransmit_timeout_ms = *value,
                            "rpo_budget_ms" => config.rpo_budget_ms = *value,
                            other => panic!("unknown config key {other}"),
                        }
                    }
                    config.validate(&members).expect("a valid config");
                    let replica =
                        Replica::new(config.clone(), members.clone(), Recovered::default(), now);
                    self.replicas.insert(m.node.clone(), replica);
                    self.configs
                        .insert(m.node.clone(), (config, members.clone()));
                }
            }
            ["elect", leader, generation] => {
                let generation = Generation(number(generation));
                for (name, replica) in self.replicas.iter_mut() {
                    if name.as_str() == leader {
                        replica.become_leader(now, generation);
                    } else {
                        replica.become_follower(generation, node(leader));
                    }
                }
            }
            ["lead", name, generation] => {
                self.replica(name)
                    .become_leader(now, Generation(number(generation)));
            }
            ["follow", name, generation, leader] => {
                self.replica(name)
                    .become_follower(Generation(number(generation)), node(leader));
            }
            ["wipe", name] => {
                let (config, members) = self.configs[&node(name)].clone();
                let recovered = Recovered {
                    recovering: true,
                    life_salt: 1,
                    ..Recovered::default()
                };
                self.written.remove(&node(name));
                let replica = Replica::new(config, members, recovered, now);
                self.replicas.insert(node(name), replica);
            }
            ["seal", name, generation] => {
                self.replica(name).seal(Generation(number(generation)));
            }
            ["compact", name, index] => {
                self.replica(name).compact(LogIndex(number(index)));
            }
            ["snapshot", name, to, bytes] => {
                // The runtime answers `SnapshotNeeded` with the state at the
                // compaction point (here, `bytes` bytes of it).
                let replica = self.replica(name);
                let meta = replica.compacted();
                let data = vec![b's'; number(bytes) as usize];
                replica.send_snapshot(now, &node(to), meta, data);
            }
            ["propose", name, text] => {
                let replica = self.replica(name);
                match replica.propose(now, text.as_bytes().to_vec()) {
                    Ok(index) => writeln!(out, "index {}", index.0).unwrap(),
                    Err(e) => writeln!(out, "refused: {e}").unwrap(),
                }
                replica.flush(now);
            }
            ["persist", name] => {
                if let Some((index, generation)) = self.written.remove(&node(name)) {
                    self.replica(name).persisted(now, index, generation);
                }
            }
            ["deliver", ref filters @ ..] => {
                let matches = |from: &NodeId, to: &NodeId| {
                    filters.iter().all(|f| match f.split_once('=') {
                        Some(("from", n)) => from.as_str() == n,
                        Some(("to", n)) => to.as_str() == n,
                        _ => *f == "drop",
                    })
                };
                let drop = filters.contains(&"drop");
                let (taken, kept): (Vec<_>, Vec<_>) = self
                    .network
                    .drain(..)
                    .partition(|(from, to, _)| matches(from, to));
                self.network = kept.into();
                for (from, to, message) in taken {
                    if drop {
                        writeln!(out, "dropped {from} -> {to}: {}", show(&message)).unwrap();
                    } else {
                        self.replica(to.as_str()).receive(now, &from, message);
                    }
                }
                for replica in self.replicas.values_mut() {
                    replica.flush(now);
                }
            }
            ["tick", ms] => {
                self.now_ms += number(ms);
                let now = self.now();
                for replica in self.replicas.values_mut() {
                    replica.tick(now);
                }
            }
            ["status", name] => {
                let r = self.replica(name);
                let role = match r.role() {
                    Role::Leader => "leader",
                    Role::Follower => "follower",
                };
                writeln!(
                    out,
                    "{role} {} commit={} durable={} last={} lease={}",
                    r.generation(),
                    r.commit_index().0,
                    r.durable_index().0,
                    r.last_index().0,
                    r.has_lease(now)
                )
                .unwrap();
            }
            _ => panic!("unknown command: {line}"),
        }
        self.collect(&mut out);
        out
    }

    /// Drains every replica's effects (in name order), prints them and
    /// carries them out as a runtime would: sends go on the network,
    /// writes wait for `persist`.
    fn collect(&mut self, out: &mut String) {
        for (name, replica) in self.replicas.iter_mut() {
            for effect in replica.drain_effects() {
                let text = match effect {
                    Effect::PersistGeneration { generation, led } => {
                        let led = if led { " led" } else { "" };
                        format!("PersistGeneration {generation}{led}")
                    }
                    Effect::Persist {
                        truncate_from,
                        entries,
                    } => {
                        let last = entries.last().expect("a write has entries");
                        self.written
                            .insert(name.clone(), (last.index, last.generation));
                        let cut = truncate_from
                            .map(|i| format!(" truncate_from={}", i.0))
                            .unwrap_or_default();
                        format!("Persist{cut} {}", entries_text(&entries))
                    }
                    Effect::Send { to, message } => {
                        let text = format!("Send {to}: {}", show(&message));
                        self.network.push_back((name.clone(), to, message));
                        text
                    }
                    Effect::Commit { upto } => format!("Commit upto={}", upto.0),
                    Effect::SnapshotNeeded { to } => format!("SnapshotNeeded for {to}"),
                    Effect::PersistSnapshot { meta, data } => format!(
                        "PersistSnapshot {}/{} ({} bytes)",
                        meta.last_index.0,
                        meta.last_generation,
                        data.len()
                    ),
                    Effect::SteppedDown { generation } => format!("SteppedDown to {generation}"),
                    Effect::CaughtUp => "CaughtUp".to_string(),
                };
                writeln!(out, "{name}: {text}").unwrap();
            }
        }
    }
}

fn entries_text(entries: &[harbor_replication::Entry]) -> String {
    let items: Vec<String> = entries
        .iter()
        .map(|e| match e.is_barrier() {
            true => format!("{}/{} barrier", e.index.0, e.generation),
            false => format!(
                "{}/{} {:?}",
                e.index.0,
                e.generation,
                String::from_utf8_lossy(&e.payload)
            ),
        })
        .collect();
    format!("[{}]", items.join(", "))
}

/// A message, without its clock readings and lives (they change with any
/// tuning of time and say nothing about the protocol's decisions).
fn show(message: &Message) -> String {
    match message {
        Message::Append(m) => format!(
            "Append {} prev={}/{} entries={} commit={} last={}",
            m.generation,
            m.prev_index.0,
            m.prev_generation,
            entries_text(&m.entries),
            m.commit_index.0,
            m.leader_last_index.0
        ),
        Message::AppendAck(m) => format!(
            "AppendAck {} {} match={} hint={}{}",
            m.generation,
            if m.success { "ok" } else { "rejected" },
            m.match_index.0,
            m.hint.0,
            if m.recovering { " recovering" } else { "" }
        ),
        Message::InstallSnapshot(m) => format!(
            "InstallSnapshot {} snapshot={}/{} bytes {}..{} of {} commit={}",
            m.generation,
            m.meta.last_index.0,
            m.meta.last_generation,
            m.offset,
            m.offset + m.data.len() as u64,
            m.total_bytes,
            m.commit_index.0
        ),
        Message::SnapshotAck(m) => format!(
            "SnapshotAck {} snapshot={} received={}",
            m.generation, m.last_index.0, m.received_bytes
        ),
    }
}

/// Replays one file; returns it as the code writes it now.
fn replay(text: &str) -> String {
    let mut script = Script::new();
    let mut out = String::new();
    for line in text.lines() {
        if line.starts_with("  ") {
            continue; // the previous run's output
        }
        out.push_str(line);
        out.push('\n');
        let command = line.trim();
        if command.is_empty() || command.starts_with('#') {
            continue;
        }
        for printed in script.run(command).lines() {
            out.push_str("  ");
            out.push_str(printed);
            out.push('\n');
        }
    }
    out
}

fn testdata() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "txt"))
        .collect();
    files.sort();
    files
}

#[test]
fn every_transcript_replays_exactly() {
    let rewrite = std::env::var_os("HARBOR_REWRITE_TRANSCRIPTS").is_some();
    let files = testdata();
    assert!(files.len() >= 3, "transcripts missing: {files:?}");
    let mut stale = Vec::new();
    for path in files {
        let expected = std::fs::read_to_string(&path).unwrap();
        let actual = replay(&expected);
        if actual == expected {
            continue;
        }
        if rewrite {
            std::fs::write(&path, &actual).unwrap();
            continue;
        }
        let first = expected
            .lines()
            .zip(actual.lines())
            .position(|(e, a)| e != a)
            .unwrap_or(expected.lines().count().min(actual.lines().count()));
        let show = |text: &str| -> String {
            text.lines()
                .skip(first.saturating_sub(3))
                .take(12)
                .collect::<Vec<_>>()
                .join("\n")
        };
        stale.push(format!(
            "{} differs from line {}:\n--- expected\n{}\n--- actual\n{}",
            path.display(),
            first + 1,
            show(&expected),
            show(&actual)
        ));
    }
    assert!(
        stale.is_empty(),
        "{}\n(review, then HARBOR_REWRITE_TRANSCRIPTS=1 to accept)",
        stale.join("\n\n")
    );
}

#[test]
fn a_replay_is_deterministic() {
    for path in testdata() {
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(replay(&text), replay(&text), "{}", path.display());
    }
}

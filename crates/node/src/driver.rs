//! One replica's thread: runs a [`GroupCore`] with real time and real IO.
//!
//! Every rule lives in the group core (`harbor-group`); the driver only
//! executes: it takes a batch of inputs (up to `batch_inputs_max`) and
//! steps the core with each at the time it read, then drains the core's
//! `Ready` until it is empty: WAL writes (appends buffered), envelopes
//! sent, one fsync if the `Ready` appended, the sync reported back. A batch
//! of inputs becomes one WAL write and one fsync (group commit).

use std::sync::mpsc::RecvTimeoutError;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use harbor_group::{GroupCore, Input, Ready, Settings, Write};
use harbor_types::{MonoMs, NodeId, Now, ShardId, WallMs};
use harbor_wal::{FileStorage, Storage, Wal, WalError};

use harbor_wire::{Body, Control, Envelope, Transport};

use crate::config::{NodeConfig, ReplicaPlan};

pub enum ReplicaInput {
    Envelope(Envelope),
    Control(Control),
}

/// Both clocks, read now: the monotonic one from `Instant` (since the
/// first reading in this process, starting at 1), the wall one from
/// `SystemTime` (a wall clock set before 1970 reads as the epoch).
pub fn read_clocks() -> Now {
    static ORIGIN: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    let origin = *ORIGIN.get_or_init(Instant::now);
    let mono = u64::try_from(origin.elapsed().as_millis()).unwrap_or(u64::MAX - 1) + 1;
    let wall = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    Now::new(MonoMs::from_millis(mono), WallMs::from_millis(wall))
}

/// One replica: a [`GroupCore`] and the WAL it writes. The node runs it on
/// a thread with [`Driver::run`]; the simulator calls [`Driver::handle`],
/// [`Driver::tick`] and [`Driver::finish_batch`] itself, on a simulated
/// disk.
pub struct Driver<S: Storage = FileStorage> {
    shard: ShardId,
    config: NodeConfig,
    group: GroupCore,
    wal: Wal<S>,
    transport: Arc<dyn Transport>,
}

#[derive(Debug, thiserror::Error)]
pub enum DriverStartError {
    #[error("WAL of {shard}: {source}")]
    Wal { shard: ShardId, source: WalError },
    #[error("{shard}: {what}")]
    Recovery { shard: ShardId, what: String },
}

/// Why a replica's loop returned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stopped {
    /// Asked to (the node stops): its data stays.
    Shutdown,
    /// Its group removed it: its data may go.
    Removed,
}

impl Driver<FileStorage> {
    /// Opens (or creates) the replica's WAL in `data_dir/shard-{id}` and
    /// rebuilds its state.
    pub fn open(
        me: NodeId,
        plan: ReplicaPlan,
        config: NodeConfig,
        transport: Arc<dyn Transport>,
    ) -> Result<Driver, DriverStartError> {
        let shard = plan.shard;
        let dir = config.replica_dir(shard);
        let storage = FileStorage::new(&dir).map_err(|source| DriverStartError::Wal {
            shard,
            source: WalError::Io {
                op: "create_dir",
                file: dir.display().to_string(),
                source,
            },
        })?;
        Driver::open_on(me, plan, config, storage, transport, read_clocks())
    }
}

impl<S: Storage> Driver<S> {
    /// Opens the replica on `storage` and rebuilds its state from it.
    pub fn open_on(
        me: NodeId,
        plan: ReplicaPlan,
        config: NodeConfig,
        storage: S,
        transport: Arc<dyn Transport>,
        now: Now,
    ) -> Result<Driver<S>, DriverStartError> {
        let started = Instant::now();
        let ReplicaPlan {
            shard,
            members,
            fence,
            fence_is_led,
            members_epoch,
        } = plan;
        let (wal, found) = Wal::open(storage, config.wal.clone())
            .map_err(|source| DriverStartError::Wal { shard, source })?;
        if found.torn_tail_bytes_cut > 0 {
            harbor_types::sim::probe("wal.torn_tail_cut_at_recovery");
            tracing::warn!(%shard, node = %me, bytes = found.torn_tail_bytes_cut, "cut a torn WAL tail");
        }
        let (zero_tail_bytes, torn_tail_bytes) =
            (found.zero_tail_bytes_cut, found.torn_tail_bytes_cut);
        let settings = Settings {
            snapshot_interval_entries: config.snapshot_interval_entries,
            local_reads_waiting_max: config.local_reads_waiting_max,
            changes_retained_bytes: config.changes_retained_bytes,
            changes_retained_ms: config.changes_retained_ms,
            resolved_tick_ms: config.resolved_tick_ms,
            bugs: config.bugs,
        };
        let mut group = GroupCore::recover(
            me.clone(),
            members,
            config.core_config(shard, me.clone()),
            settings,
            found,
            config.groups_are_new,
            (fence, fence_is_led),
            u64::from(std::process::id()).rotate_left(17),
            now,
        )
        .map_err(|e| DriverStartError::Recovery {
            shard,
            what: e.to_string(),
        })?;
        group.opened_at_members_epoch(members_epoch);
        let core = group.replica();
        tracing::info!(
            %shard, node = %me,
            snapshot_index = %core.compacted().last_index,
            last_index = %core.last_index(),
            generation = %core.generation(),
            recovering = core.is_recovering(),
            zero_tail_bytes,
            torn_tail_bytes,
            ms = started.elapsed().as_millis() as u64,
            "recovered the replica"
        );
        let mut driver = Driver {
            shard,
            config,
            group,
            wal,
            transport,
        };
        // What recovery decided must be durable before any input (a
        // replica that lost its state says so first).
        driver.finish_batch(now);
        if let Some(why) = driver.group.failure() {
            return Err(DriverStartError::Recovery {
                shard,
                what: why.to_string(),
            });
        }
        Ok(driver)
    }

    /// The replica's loop; returns on `Control::Shutdown`, when every
    /// sender is gone, or once the group no longer counts this replica.
    pub fn run(mut self, inbox: &crate::queue::Receiver<ReplicaInput>) -> Stopped {
        let tick = Duration::from_millis(self.config.tick_interval_ms);
        // Followers have no timers of their own: they wake for messages, and
        // rarely otherwise, which keeps an idle process idle.
        let follower_wait = Duration::from_millis(harbor_types::limits::FOLLOWER_WAIT_MS);
        let mut last_tick = MonoMs::ZERO;
        loop {
            let wait = if self.group.wants_ticks() {
                tick
            } else {
                follower_wait
            };
            let first = match inbox.recv_timeout(wait) {
                Ok(input) => Some(input),
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) => return Stopped::Shutdown,
            };
            let now = read_clocks();
            let mut batch = 0;
            let mut next = first;
            while let Some(input) = next {
                if let ReplicaInput::Control(Control::Shutdown) = input {
                    self.finish_batch(now);
                    return Stopped::Shutdown;
                }
                self.handle(now, input);
                batch += 1;
                if self.group.removed() {
                    // What is queued behind it is refused by the node.
                    break;
                }
                next = if batch < self.config.batch_inputs_max {
                    inbox.try_recv()
                } else {
                    None
                };
            }
            if now.mono.since(last_tick) >= self.config.tick_interval_ms {
                last_tick = now.mono;
                self.tick(now);
            }
            self.finish_batch(now);
            if self.group.removed() {
                return Stopped::Removed;
            }
        }
    }

    /// Timers: heartbeats, retransmissions, hold expiry.
    pub fn tick(&mut self, now: Now) {
        self.group.step(now, Input::Tick);
    }

    /// The replica's state, for the simulator's checks.
    pub fn group(&self) -> &GroupCore {
        &self.group
    }

    /// Steps the core with one input. Call [`Driver::finish_batch`] after a
    /// batch of them.
    pub fn handle(&mut self, now: Now, input: ReplicaInput) {
        let input = match input {
            ReplicaInput::Control(control) => Input::Control(control),
            ReplicaInput::Envelope(envelope) => match envelope.body {
                Body::Replication(message) => Input::Peer {
                    from: envelope.from,
                    message,
                },
                Body::Request { id, request, route } => Input::Request {
                    from: envelope.from,
                    id,
                    request,
                    route,
                },
                Body::Response { .. } => {
                    tracing::warn!(shard = %self.shard, "replica got a response; dropped");
                    return;
                }
                // The node's dispatcher turns these into `ReplicaInput::Control`;
                // a shutdown from the network is refused there.
                Body::Control { control, .. } => Input::Control(control),
            },
        };
        self.group.step(now, input);
    }

    /// Executes what the inputs led to, until the core is quiet: one fsync
    /// per round of appends.
    pub fn finish_batch(&mut self, now: Now) {
        for _round in 0..8 {
            let ready = self.group.ready();
            if ready.is_empty() {
                break;
            }
            self.execute(now, ready);
        }
    }

    fn execute(&mut self, now: Now, ready: Ready) {
        let Ready {
            writes,
            sync,
            messages,
        } = ready;
        // Only appended records wait for the fsync (hard state and snapshots
        // are durable when written), and no message vouches for them: acks
        // of appended entries come out of a later `Ready`, after `Synced`.
        // So the messages leave before the fsync, and a leader's appends
        // reach its followers while it syncs its own copy.
        if let Err(e) = writes.into_iter().try_for_each(|w| self.write(w)) {
            // Nothing of this `Ready` leaves: a message may vouch for a
            // write that failed (a snapshot's acknowledgement does).
            return self.group.step(now, Input::StorageFailed(e.to_string()));
        }
        for envelope in messages {
            self.transport.send(envelope);
        }
        if let Some(token) = sync {
            match self.wal.sync() {
                Ok(()) => self.group.step(now, Input::Synced(token)),
                Err(e) => self.group.step(now, Input::StorageFailed(e.to_string())),
            }
        }
    }

    fn write(&mut self, write: Write) -> Result<(), WalError> {
        match write {
            Write::HardState(hard_state) => self.wal.set_hard_state(&hard_state),
            Write::Append {
                truncate_from,
                records,
            } => {
                if let Some(from) = truncate_from {
                    self.wal.truncate_from(from)?;
                }
                self.wal.append(&records)
            }
            Write::Snapshot {
                snapshot,
                replaces_log,
            } => {
                self.wal.install_snapshot(&snapshot)?;
                if replaces_log && self.wal.last_index() > snapshot.last_index {
                    self.wal.truncate_from(snapshot.last_index.next())?;
                }
                Ok(())
            }
        }
    }
}

//! Every default limit and timing of the replication core, the node, the
//! gateway and the control loop, written once, with the relations between
//! them asserted at compile time (TigerBeetle's `constants.zig`). The configs of each plane (the replication core's
//! `Config`, `NodeConfig`, `GatewayConfig` and its `CallLimits`, the
//! control loop) take their defaults from here; a deployment overrides
//! the tunable ones in its cluster file, and each config's `validate`
//! checks the same relations again at start-up, on the values it runs
//! with.
//!
//! Names put the unit last: `lease_ms`, `frame_bytes_max`. Kept elsewhere,
//! on purpose: the WAL's record and segment sizes in `harbor-wal` (asserted
//! there, and against `ENTRY_BYTES_MAX` in `harbor-node`), the input sizes
//! of ids next to the ids (`ID_LEN_MAX`, `TOKEN_LEN_MAX`), `harbor-client`'s
//! own (it depends on no other Harbor crate), the Raft timings of
//! `harbor-meta-raft`, and the simulator's own timings (its control round,
//! drain and clock skew; the node config each seed draws passes the same
//! `validate`).

// ----- Messages and entries ----------------------------------------------------

/// The largest TCP frame sent or accepted: a full append plus headroom. A
/// snapshot never needs one of its own size: it goes in chunks.
pub const FRAME_BYTES_MAX: usize = 64 << 20;
/// Bytes a frame may need beyond the data it carries (ids, positions, the
/// envelope): generous, since postcard adds a few bytes per field.
pub const FRAME_OVERHEAD_BYTES_MAX: usize = 64 << 10;
/// Payload bytes in one append message (one entry is always sent, so an
/// append may carry up to one entry more).
pub const APPEND_BYTES_MAX: usize = 4 << 20;
/// Entries in one append message.
pub const APPEND_ENTRIES_MAX: usize = 4_096;
/// The largest payload of one log entry.
pub const ENTRY_BYTES_MAX: usize = 1 << 20;
/// Bytes of a snapshot in one message.
pub const SNAPSHOT_CHUNK_BYTES_MAX: usize = 1 << 20;
/// What one entry adds to an append beyond its payload (index, generation,
/// timestamp, length; postcard varints).
pub const ENTRY_OVERHEAD_BYTES_MAX: usize = 64;
/// The largest encoding of one client command (a reserve with every text
/// field at its longest is about 350 bytes; a test in `harbor-reservation`
/// keeps this true).
pub const COMMAND_BYTES_MAX: usize = 512;
/// Client commands the gateway puts in one log entry of a batch.
pub const ENTRY_COMMANDS_MAX: usize = 1_024;
/// Items in one `POST /v1/reservations:batch` (split into entries of
/// `ENTRY_COMMANDS_MAX`).
pub const BATCH_COMMANDS_MAX: usize = 8_190;
/// The longest hold a reservation may ask for: one week.
pub const HOLD_TTL_MS_MAX: u64 = 7 * 24 * 60 * 60 * 1000;

const _: () = assert!(
    APPEND_BYTES_MAX + APPEND_ENTRIES_MAX * ENTRY_OVERHEAD_BYTES_MAX + FRAME_OVERHEAD_BYTES_MAX
        <= FRAME_BYTES_MAX
);
const _: () = assert!(SNAPSHOT_CHUNK_BYTES_MAX + FRAME_OVERHEAD_BYTES_MAX <= FRAME_BYTES_MAX);
const _: () = assert!(ENTRY_COMMANDS_MAX * COMMAND_BYTES_MAX <= ENTRY_BYTES_MAX);
const _: () = assert!(ENTRY_COMMANDS_MAX <= BATCH_COMMANDS_MAX);

// ----- Replication -----------------------------------------------------------

/// Local followers that must hold an entry durably before it commits.
pub const SYNC_ACKS: usize = 1;
/// Entries sent to one follower and not yet acknowledged.
pub const INFLIGHT_ENTRIES_MAX: u64 = 65_536;
/// Proposals accepted but not yet committed; beyond, writes are refused.
pub const UNCOMMITTED_ENTRIES_MAX: u64 = 65_536;
/// Entries a leader keeps in memory for lagging followers beyond its
/// snapshot; a follower further behind is sent a snapshot.
pub const RETAINED_ENTRIES_MAX: u64 = 1_000_000;
/// Applied entries between state-machine snapshots.
pub const SNAPSHOT_INTERVAL_ENTRIES: u64 = 100_000;
/// Closed timestamps a follower keeps until their entries commit there.
pub const CLOSED_PENDING_MAX: usize = 64;
/// Earlier lives (incarnations) of a follower a leader remembers, so a
/// stale ack from one of them is never taken for news.
pub const RETIRED_LIVES_MAX: usize = 4;
/// Runs of appended entries a leader remembers per follower to measure
/// lag in time.
pub const APPEND_MARKS_MAX: usize = 16_384;

const _: () = assert!(APPEND_ENTRIES_MAX as u64 <= INFLIGHT_ENTRIES_MAX);

// ----- Timings of a replica ------------------------------------------------------

/// A leader sends at least one message per follower this often.
pub const HEARTBEAT_INTERVAL_MS: u64 = 100;
/// Entries sent but unacknowledged for this long are sent again.
pub const RETRANSMIT_TIMEOUT_MS: u64 = 500;
/// A leader serves strong reads only while its local followers
/// acknowledged an append it sent less than this long ago.
pub const LEASE_MS: u64 = 2_000;
/// Writes are refused while a remote copy is further behind than this:
/// it bounds what a regional failover can lose.
pub const RPO_BUDGET_MS: u64 = 5_000;
/// How long a replica thread waits for input before it ticks.
pub const TICK_INTERVAL_MS: u64 = 25;
/// How long an idle follower's thread sleeps between looks at its inbox.
pub const FOLLOWER_WAIT_MS: u64 = 500;

const _: () = assert!(TICK_INTERVAL_MS <= HEARTBEAT_INTERVAL_MS);
const _: () = assert!(HEARTBEAT_INTERVAL_MS < RETRANSMIT_TIMEOUT_MS);
// A lease outlives a lost append's retransmission.
const _: () = assert!(RETRANSMIT_TIMEOUT_MS < LEASE_MS);
// One lost message does not trip the RPO gate.
const _: () = assert!(RETRANSMIT_TIMEOUT_MS < RPO_BUDGET_MS);

// ----- Queues of a node ------------------------------------------------------------

/// Inputs queued for one replica before new ones are refused.
pub const REPLICA_INBOX_CAPACITY: usize = 65_536;
/// Inputs one replica takes in one batch (one fsync).
pub const BATCH_INPUTS_MAX: usize = 8_192;
/// Local reads a replica holds at once while they wait for what they need.
pub const LOCAL_READS_WAITING_MAX: usize = 4_096;
/// Envelopes queued for one TCP peer before new ones are dropped.
pub const PEER_QUEUE_MAX: usize = 65_536;
/// Envelopes queued on one in-process link (a WAN delay line).
pub const LINK_QUEUE_MAX: usize = 65_536;

const _: () = assert!(BATCH_INPUTS_MAX <= REPLICA_INBOX_CAPACITY);

// ----- Change feed -------------------------------------------------------------------

/// Changes one replica keeps in memory for change feeds, by their estimated
/// size; the oldest go first, and a cursor older than what is kept is
/// refused as expired (never a silent gap).
pub const CHANGES_RETAINED_BYTES: usize = 16 << 20;
/// Changes whose entry is older than this, counted back from the newest
/// entry applied, go too, whatever their size: a day, so a consumer down
/// overnight resumes where it stopped.
pub const CHANGES_RETAINED_MS: u64 = 24 * 60 * 60 * 1_000;
/// An idle leader proposes a no-op after this long, so the resolved time
/// change feeds promise keeps advancing (each costs one small entry).
pub const RESOLVED_TICK_MS: u64 = 1_000;
/// Changes one answer to a feed carries at most.
pub const CHANGES_PAGE_MAX: usize = 2_048;
/// How often a feed asks each group for what is new.
pub const CHANGEFEED_POLL_MS: u64 = 20;
/// A feed's resolved lines, when the client names no interval.
pub const CHANGEFEED_RESOLVED_MS_DEFAULT: u64 = 1_000;
pub const CHANGEFEED_RESOLVED_MS_MIN: u64 = 10;
pub const CHANGEFEED_RESOLVED_MS_MAX: u64 = 60_000;

// ----- Projections -------------------------------------------------------------------

/// How often a gateway's projection asks each group for what is new when
/// the last round brought nothing.
pub const PROJECTION_POLL_MS: u64 = 50;
/// How often a gateway saves its projection to its data directory (when
/// rows changed): after a restart it goes on from its last save instead of
/// scanning every group again. Each save writes the whole projection.
pub const PROJECTION_SAVE_MS: u64 = 10_000;
/// The lag over which a search answer says `stale` (seed 004's cabin
/// search: bounded staleness, 2 s), unless the request names its own.
pub const SEARCH_MAX_LAG_MS_DEFAULT: u64 = 2_000;
/// The same for reports (dashboards are refreshed, not raced).
pub const REPORT_MAX_LAG_MS_DEFAULT: u64 = 5_000;
/// How long a projection read waits for the commit tokens it names
/// (`min_as_of`, `after`), unless the request names its own `wait_ms`.
pub const PROJECTION_WAIT_MS_DEFAULT: u64 = 5_000;
pub const PROJECTION_WAIT_MS_MAX: u64 = 30_000;
/// Commit tokens one projection read may wait for.
pub const PROJECTION_WAIT_TOKENS_MAX: usize = 64;
/// Rows of a search page.
pub const SEARCH_LIMIT_DEFAULT: usize = 50;
pub const SEARCH_LIMIT_MAX: usize = 1_000;

// ----- The control loop --------------------------------------------------------------

/// How often the control loop looks at every group.
pub const CONTROL_INTERVAL_MS: u64 = 100;
/// ... and while a planned transfer is under way.
pub const TRANSFER_INTERVAL_MS: u64 = 5;
/// How long a planned transfer may pause a group's writes waiting for its
/// target to catch up before it is given up.
pub const DRAIN_MS: u64 = 1_000;
/// A replica that does not answer a status request within this is
/// unreachable for this round.
pub const STATUS_TIMEOUT_MS: u64 = 250;
/// ... or within this, on a node that missed the previous round.
pub const SUSPECT_TIMEOUT_MS: u64 = 40;
/// How long a leader may stay unreachable before its generation is sealed.
pub const UNREACHABLE_AFTER_MS: u64 = 500;
/// Waited beyond the lease after sealing, for clock rate differences
/// between an old leader and the control plane.
pub const LEASE_MARGIN_MS: u64 = 250;

const _: () = assert!(TRANSFER_INTERVAL_MS < CONTROL_INTERVAL_MS);
const _: () = assert!(SUSPECT_TIMEOUT_MS < STATUS_TIMEOUT_MS);
// One slow round does not make a leader unreachable.
const _: () = assert!(CONTROL_INTERVAL_MS + STATUS_TIMEOUT_MS <= UNREACHABLE_AFTER_MS);
// A planned transfer's pause is shorter than a failover would be.
const _: () = assert!(DRAIN_MS < UNREACHABLE_AFTER_MS + LEASE_MS + LEASE_MARGIN_MS);

// ----- The metadata plane ------------------------------------------------------

/// Logical buckets in a cluster, fixed for its life.
pub const BUCKETS_DEFAULT: u32 = 2_048;
/// Generation ends the shard map keeps per group.
pub const GENERATION_ENDS_KEPT: usize = 8;

// ----- The gateway -----------------------------------------------------------------

/// How long a request waits for its leader; past it a write's outcome is
/// unknown.
pub const REQUEST_TIMEOUT_MS: u64 = 5_000;
/// How often a waiting request checks whether its group's leader moved.
pub const ROUTE_CHECK_INTERVAL_MS: u64 = 50;
/// Leaders one request tries before it gives up.
pub const ROUTE_ATTEMPTS_MAX: u32 = 32;
/// How long a refused request waits for the map to name the next leader.
pub const LEADERSHIP_WAIT_MS_MAX: u64 = 200;
/// A leader silent this long makes a waiting request refresh the map.
pub const SILENT_LEADER_MS: u64 = 300;
/// An unanswered request is sent again (same id) after this, then twice
/// as long, and so on.
pub const RESEND_AFTER_MS: u64 = 1_000;
/// How long a request first waits before asking again a leader that has
/// not heard the news yet.
pub const NEWS_WAIT_MS: u64 = 10;
/// How often a refused request looks at the map while it waits for it.
pub const MAP_POLL_MS: u64 = 5;
/// Requests waiting for a node at once, per gateway.
pub const INFLIGHT_REQUESTS_MAX: usize = 100_000;
/// The largest request body.
pub const BODY_BYTES_MAX: usize = 64 << 10;
/// The largest body of `POST /v1/reservations:batch`.
pub const BATCH_BODY_BYTES_MAX: usize = 4 << 20;
/// How long a local read waits for the replica in the gateway's region
/// (beyond a causal read's own wait) before it asks the leader.
pub const LOCAL_READ_TIMEOUT_MS: u64 = 500;
/// A local replica that did not answer a read is skipped this long.
pub const SILENT_REPLICA_SKIP_MS: u64 = 5_000;
/// A replica that does not answer the admin view within this is shown as
/// unreachable.
pub const ADMIN_STATUS_TIMEOUT_MS: u64 = 300;
/// Shards a session header may name.
pub const SESSION_TOKENS_MAX: usize = 4_096;
/// A bounded read's budget when the caller names none.
pub const STALENESS_MS_DEFAULT: u64 = 2_000;
/// How long a causal read waits for its dependencies, by default and at most.
pub const CAUSAL_WAIT_MS_DEFAULT: u64 = 1_000;
pub const CAUSAL_WAIT_MS_MAX: u64 = 10_000;

const _: () = assert!(MAP_POLL_MS < ROUTE_CHECK_INTERVAL_MS);
const _: () = assert!(NEWS_WAIT_MS <= LEADERSHIP_WAIT_MS_MAX);
const _: () = assert!(ROUTE_CHECK_INTERVAL_MS < SILENT_LEADER_MS);
const _: () = assert!(SILENT_LEADER_MS < RESEND_AFTER_MS);
// A write waiting through an automatic failover (detection, lease, margin)
// is answered rather than left unknown.
const _: () = assert!(UNREACHABLE_AFTER_MS + LEASE_MS + LEASE_MARGIN_MS < REQUEST_TIMEOUT_MS);
const _: () = assert!(BODY_BYTES_MAX <= BATCH_BODY_BYTES_MAX);
const _: () = assert!(CAUSAL_WAIT_MS_DEFAULT <= CAUSAL_WAIT_MS_MAX);

// ----- Bucket moves ------------------------------------------------------------

/// Rows per page a move copies, and so per import entry (a row is smaller
/// than a client command, so a page fits an entry twice over).
pub const MOVE_CHUNK_ROWS: u32 = 512;
/// A copy pass that moved at most this many rows is the last before the
/// seal: the write pause is the time to copy what the final pass finds.
pub const MOVE_FINAL_PASS_ROWS: u64 = 64;
/// Copy passes before the seal, at most (a bucket written faster than it
/// copies is sealed anyway after these).
pub const MOVE_PASSES_MAX: u32 = 8;
/// A move not sealed within this aborts.
pub const MOVE_COPY_TIMEOUT_MS: u64 = 60_000;
/// A sealed move not acquired within this aborts: the longest a bucket's
/// writes can wait on a move.
pub const MOVE_CUTOVER_TIMEOUT_MS: u64 = 3_000;
/// A move's failed step is tried again after this.
pub const MOVE_RETRY_MS: u64 = 50;

const _: () = assert!(MOVE_CHUNK_ROWS as usize * COMMAND_BYTES_MAX * 2 <= ENTRY_BYTES_MAX);
const _: () = assert!(MOVE_CUTOVER_TIMEOUT_MS < REQUEST_TIMEOUT_MS);

// ----- Membership changes -----------------------------------------------------

/// How long a replica being added may take to catch up before the change
/// is given up (and how long a leaving member that leads is waited for).
pub const MEMBER_CATCH_UP_MS: u64 = 120_000;

// ----- Hot buckets -------------------------------------------------------------

/// A leader counts its buckets' load over windows this long (it reports the
/// last complete window and the current one).
pub const LOAD_WINDOW_MS: u64 = 10_000;
/// Buckets a leader counts separately in a window, at most (a map has
/// `BUCKETS_DEFAULT` of them; more could come only from a sender naming buckets
/// that do not exist, and are counted in the group's total alone).
pub const LOAD_BUCKETS_TRACKED_MAX: usize = 4_096;
/// Buckets one load report names, at most.
pub const LOAD_REPORT_BUCKETS_MAX: u32 = 100;
/// The rebalancer looks at the loads this often.
pub const REBALANCE_INTERVAL_MS: u64 = 15_000;
/// A group is not rebalanced below this many writes per second.
pub const REBALANCE_WRITES_PER_S_MIN: u64 = 50;
/// A bucket is hot when it takes at least this share (percent) of its
/// group's writes.
pub const REBALANCE_HOT_SHARE_PERCENT: u64 = 50;
/// A bucket the rebalancer moved is left where it is for this long.
pub const REBALANCE_COOLDOWN_MS: u64 = 300_000;

const _: () = assert!(REBALANCE_INTERVAL_MS >= LOAD_WINDOW_MS);
const _: () = assert!(REBALANCE_HOT_SHARE_PERCENT > 0 && REBALANCE_HOT_SHARE_PERCENT <= 100);

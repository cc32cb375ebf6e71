//! Hooks that exist for the simulator: protocol-breaking bug switches and
//! coverage probes.
//!
//! Both are compiled into every build, as FoundationDB's BUGGIFY and
//! CODE_PROBE are, but only the simulator turns a bug switch on: no
//! configuration file, flag or API of a running Harbor can. A probe costs a
//! thread-local increment and marks a rare branch so a seed sweep can show
//! it ran; each simulated run reports its own hits.

use std::cell::Cell;

/// Protocol bugs the simulator can switch on to prove the checker catches
/// them. Each is off by default.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Bugs {
    /// The leader commits an entry once it alone holds it durably.
    pub commit_without_follower_ack: bool,
    /// A follower accepts appends from an older generation.
    pub accept_old_generation: bool,
    /// The state machine ignores a token it has already seen and reserves again.
    pub apply_token_twice: bool,
    /// A leader serves strong reads without a valid lease.
    pub strong_read_without_lease: bool,
    /// A replica serves a session or causal read without having applied
    /// the entries the caller named.
    pub follower_ignores_session: bool,
    /// A leader measures its lease on the wall clock instead of the
    /// monotonic one, so a backward step stretches it.
    pub lease_on_wall_clock: bool,
    /// A gateway takes its directory copy's miss for "no such issuer"
    /// instead of asking the metadata leader.
    pub directory_from_copy: bool,
    /// A replica's change-feed answer promises its lease's "now" (what a
    /// strong read may serve) instead of a time its committed log covers.
    pub resolved_from_lease: bool,
    /// A replica's change-feed answer leaves out the first change after
    /// the asked position.
    pub feed_skips_change: bool,
    /// A projection's watermark is the newest of its groups' resolved
    /// marks instead of the oldest.
    pub projection_watermark_early: bool,
    /// A projection counts a commit token as included once its tail
    /// reached the token's entry, before every change of that entry.
    pub projection_includes_by_index: bool,
    /// A replica leaves its newest kept change out of the change history
    /// it writes with a snapshot, so a restart restores a gap.
    pub changes_history_drops_newest: bool,
    /// A group's state machine goes on applying writes to a bucket it
    /// sealed (the source of a move keeps accepting after the seal).
    pub source_accepts_after_seal: bool,
    /// A leader counts a learner's acks towards commits (as if the replica
    /// being added were a local voter already).
    pub learner_acks_count: bool,
}

impl Bugs {
    /// The names `harbor verify sim --bug NAME` accepts.
    pub const NAMES: [&'static str; 14] = [
        "commit-without-follower-ack",
        "accept-old-generation",
        "apply-token-twice",
        "strong-read-without-lease",
        "follower-ignores-session",
        "lease-on-wall-clock",
        "directory-from-copy",
        "resolved-from-lease",
        "feed-skips-change",
        "projection-watermark-early",
        "projection-includes-by-index",
        "changes-history-drops-newest",
        "source-accepts-after-seal",
        "learner-acks-count",
    ];

    pub fn none() -> Bugs {
        Bugs::default()
    }

    /// The set with one named bug switched on.
    pub fn named(name: &str) -> Result<Bugs, String> {
        let mut bugs = Bugs::default();
        match name {
            "commit-without-follower-ack" => bugs.commit_without_follower_ack = true,
            "accept-old-generation" => bugs.accept_old_generation = true,
            "apply-token-twice" => bugs.apply_token_twice = true,
            "strong-read-without-lease" => bugs.strong_read_without_lease = true,
            "follower-ignores-session" => bugs.follower_ignores_session = true,
            "lease-on-wall-clock" => bugs.lease_on_wall_clock = true,
            "directory-from-copy" => bugs.directory_from_copy = true,
            "resolved-from-lease" => bugs.resolved_from_lease = true,
            "feed-skips-change" => bugs.feed_skips_change = true,
            "projection-watermark-early" => bugs.projection_watermark_early = true,
            "projection-includes-by-index" => bugs.projection_includes_by_index = true,
            "changes-history-drops-newest" => bugs.changes_history_drops_newest = true,
            "source-accepts-after-seal" => bugs.source_accepts_after_seal = true,
            "learner-acks-count" => bugs.learner_acks_count = true,
            other => {
                return Err(format!(
                    "unknown bug {other:?}; known: {}",
                    Bugs::NAMES.join(", ")
                ))
            }
        }
        Ok(bugs)
    }
}

/// Every coverage probe in the code base, so a sweep can report the ones it
/// never hit.
pub const PROBES: [&str; 48] = [
    "node.follower_served_read",
    "node.local_read_behind_session",
    "node.local_read_too_stale",
    "replication.sealed_for_failover",
    "node.stale_route_refused",
    "replication.leader_drained_for_transfer",
    "node.strong_read_refused_without_lease",
    "replication.follower_truncates_suffix",
    "replication.follower_rejects_old_generation",
    "replication.leader_fenced_by_newer_generation",
    "replication.retransmit_after_silence",
    "replication.snapshot_sent_to_lagging_follower",
    "replication.rpo_gate_refused_write",
    "replication.append_gap_rejected",
    "wal.torn_tail_cut_at_recovery",
    "node.wal_failure_stops_replica",
    "reservation.hold_expired_at_confirm",
    "node.replica_started_without_its_state",
    "node.lost_replica_starts_at_the_fence",
    "node.idle_leader_ticked",
    "changes.position_expired",
    "changes.evicted_for_budget",
    "changes.evicted_for_age",
    "changes.restored_from_snapshot",
    "projection.loaded_from_a_save",
    "node.recovering_replica_refused_to_lead",
    "node.stale_control_order_ignored",
    "replication.recovering_replica_caught_up",
    "replication.recovering_replica_ignores_untold_generation",
    "replication.follower_came_back_with_another_log",
    "replication.snapshot_installed_from_chunks",
    "replication.snapshot_resumed",
    "replication.snapshot_chunk_of_another_snapshot_ignored",
    "replication.snapshot_ack_went_backwards",
    "replication.rejection_covered_by_the_snapshot_in_flight",
    "gateway.call_resent",
    "gateway.call_followed_the_map",
    "gateway.call_refusal_after_an_attempt_in_doubt",
    "projection.rescanned_after_expiry",
    "projection.stale_scan_page_refused",
    "feed.scanned_from_the_beginning",
    "reservation.write_refused_for_sealed_bucket",
    "node.sealed_bucket_refused_at_admission",
    "gateway.call_waited_for_a_moved_bucket",
    "projection.rescanned_after_a_move",
    "rebalancer.moved_a_hot_bucket",
    "replication.leader_sends_to_a_new_member",
    "group.replica_removed_from_its_group",
];

thread_local! {
    /// Hits per probe on this thread. A simulated run happens on one
    /// thread, so it counts its own hits, whatever runs beside it.
    static HITS: [Cell<u64>; PROBES.len()] = const { [const { Cell::new(0) }; PROBES.len()] };
}

/// Marks that a rare branch ran. `name` must be listed in [`PROBES`].
pub fn probe(name: &'static str) {
    match PROBES.iter().position(|p| *p == name) {
        Some(i) => HITS.with(|hits| hits[i].set(hits[i].get() + 1)),
        None => debug_assert!(false, "probe {name:?} is not listed in PROBES"),
    }
}

/// Hits per probe on this thread since the last call, which starts the
/// count afresh: the simulator takes them before and after each run.
pub fn take_probe_hits() -> Vec<(&'static str, u64)> {
    HITS.with(|hits| {
        PROBES
            .iter()
            .zip(hits.iter())
            .map(|(name, hits)| (*name, hits.take()))
            .collect()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bug_names_round_trip() {
        for name in Bugs::NAMES {
            assert_ne!(Bugs::named(name).unwrap(), Bugs::none(), "{name}");
        }
        assert!(Bugs::named("nope").is_err());
    }

    #[test]
    fn probes_count_hits_per_thread_until_taken() {
        let _ = take_probe_hits();
        probe("wal.torn_tail_cut_at_recovery");
        probe("wal.torn_tail_cut_at_recovery");
        std::thread::spawn(|| probe("wal.torn_tail_cut_at_recovery"))
            .join()
            .unwrap();
        let hits = take_probe_hits();
        assert_eq!(hits.len(), PROBES.len());
        let torn = |hits: &[(&str, u64)]| {
            hits.iter()
                .find(|(n, _)| *n == "wal.torn_tail_cut_at_recovery")
                .unwrap()
                .1
        };
        assert_eq!(torn(&hits), 2);
        assert_eq!(torn(&take_probe_hits()), 0);
    }
}

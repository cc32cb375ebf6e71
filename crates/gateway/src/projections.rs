//! The gateway's projection: [`harbor_cdc::projection::Projection`] fed
//! from the groups' change streams, read from the replicas of the
//! gateway's own region where it can (no WAN hop for a reader), so every
//! region has its own. The rules are the core's; this is its IO.
//!
//! It lives in memory and is saved to the gateway's data directory every
//! `projection_save_ms` when rows changed; at start it goes on from its last
//! save, or, without one, is built from a scan of every group (what
//! `harbor projection rebuild` asks for again, dropping the save). A group
//! whose stream expired is scanned again. Its state is `projection_view`'s.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Duration;

use harbor_cdc::projection::{Next, Projection};
use harbor_reservation::ScanKey;
use harbor_types::limits::{CHANGES_PAGE_MAX, LOCAL_READ_TIMEOUT_MS};
use harbor_types::sim::Bugs;
use harbor_types::{ShardId, Timestamp};
use harbor_wire::{ChangePosition, Freshness, Query, QueryResult, Request, Response, ScanPage};

use crate::router::Gateway;

/// Pages of one group a round takes at most: a busy group cannot hold
/// the others up.
const PAGES_PER_ROUND: usize = 4;

/// How far apart quiet rounds get, in polls.
const IDLE_POLLS_MAX: u32 = 4;

/// What a round of the projection found.
enum Round {
    /// A group had more than a round takes: go again at once.
    Busy,
    /// Something moved: the next round after one poll.
    Moved,
    /// Nothing moved: back off.
    Quiet,
}

impl Gateway {
    /// Starts feeding this gateway's projection (once); it stops when the
    /// gateway is dropped.
    pub fn run_projection(self: &Arc<Self>) {
        if !self.config.projections || self.projections.running.swap(true, Ordering::Relaxed) {
            return;
        }
        let gw = Arc::downgrade(self);
        let poll = Duration::from_millis(self.config.projection_poll_ms);
        let save_every = Duration::from_millis(self.config.projection_save_ms);
        tokio::spawn(async move {
            // Rounds that bring nothing back off, up to IDLE_POLLS_MAX
            // polls apart: an idle cluster costs little, and the first
            // write after a quiet spell waits at most that long.
            let mut idle = poll;
            let mut saved = (tokio::time::Instant::now(), None);
            if let Some(gateway) = Weak::upgrade(&gw) {
                gateway.projections.load_save().await;
            }
            loop {
                let Some(gateway) = Weak::upgrade(&gw) else {
                    return;
                };
                let round = gateway.projection_round().await;
                if saved.0.elapsed() >= save_every {
                    saved = (
                        tokio::time::Instant::now(),
                        gateway.save_projection(saved.1),
                    );
                }
                drop(gateway);
                match round {
                    Round::Busy => continue,
                    Round::Moved => idle = poll,
                    Round::Quiet => idle = (idle * 2).min(poll * IDLE_POLLS_MAX),
                }
                tokio::time::sleep(idle).await;
            }
        });
    }

    /// Saves the projection if rows changed since the save that stood at
    /// `last` edits (a position moved by no-ops alone is not worth a save:
    /// going on from an older one is as good) and no save is still being
    /// written; the edits the save holds. The bytes are encoded off the
    /// async threads, under the view's read lock (readers go on); the file
    /// is written and synced by the same blocking task, so rounds go on.
    fn save_projection(self: &Arc<Self>, last: Option<u64>) -> Option<u64> {
        let file = self.projections.file.clone()?;
        let edits = self.projections.edits.load(Ordering::Relaxed);
        if last == Some(edits) || self.projections.saving.swap(true, Ordering::AcqRel) {
            return last;
        }
        let epoch = self.projections.disk_epoch();
        let gateway = self.clone();
        tokio::task::spawn_blocking(move || {
            let projections = &gateway.projections;
            let started = std::time::Instant::now();
            let (bytes, rows) = projections.read(|p| (p.save(), p.size().0 as u64));
            let taken_ms = started.elapsed().as_millis() as u64;
            let size = bytes.len() as u64;
            match projections.write_save(&file, epoch, &bytes) {
                Ok(true) => {
                    tracing::debug!(
                        bytes = size,
                        taken_ms,
                        written_ms = started.elapsed().as_millis() as u64 - taken_ms,
                        "projection saved"
                    );
                    gateway.metrics.projection_saved(size);
                    *projections.saved.lock().unwrap_or_else(|e| e.into_inner()) =
                        Some(crate::projection_view::Saved {
                            at: std::time::Instant::now(),
                            bytes: size,
                            reservations: rows,
                        });
                }
                Ok(false) => {} // a rebuild dropped what it would have saved
                Err(e) => {
                    tracing::warn!(error = %e, "cannot save the projection; a restart would go on from an older save or scan every group");
                }
            }
            projections.saving.store(false, Ordering::Release);
        });
        Some(edits)
    }

    /// One round over every group.
    async fn projection_round(&self) -> Round {
        if self.projections.rebuild.swap(false, Ordering::Relaxed) {
            if let Err(e) = self.projections.drop_save() {
                tracing::warn!(error = %e, "cannot drop the saved projection; a restart before the next save may load it");
            }
            self.projections
                .write(|p| *p = Projection::new(p.shards(), Bugs::none()));
            self.projections.loaded.store(false, Ordering::Relaxed);
            self.projections.edited();
            self.projections.moved.send_modify(|n| *n += 1);
        }
        let before = self.projections.read(|p| (p.positions(), p.watermark()));
        let mut busy = false;
        for shard in self.projections.read(|p| p.shards()) {
            for page in 0..PAGES_PER_ROUND {
                let more = match self.projections.read(|p| p.next(shard)) {
                    Next::Scan(after) => self.projection_scan(shard, after).await,
                    Next::Changes(after) => self.projection_changes(shard, after).await,
                };
                if !more {
                    break;
                }
                busy |= page + 1 == PAGES_PER_ROUND;
            }
        }
        let after = self.projections.read(|p| (p.positions(), p.watermark()));
        if after == before {
            return Round::Quiet;
        }
        self.projections.moved.send_modify(|n| *n += 1);
        if busy {
            Round::Busy
        } else {
            Round::Moved
        }
    }

    /// Takes a scan page of `shard`; whether to ask again at once.
    async fn projection_scan(&self, shard: ShardId, after: Option<ScanKey>) -> bool {
        let floor = self.projections.read(|p| p.scan_floor(shard));
        let Some(page) = self.scan_page(shard, after, floor, false).await else {
            return false;
        };
        let rows = (page.rows.issuers.len() + page.rows.reservations.len()) as u64;
        let taken = self.projections.write(|p| p.take_scan(shard, page));
        match taken {
            Ok(()) => {
                self.projections.edited();
                self.metrics.projection_scanned(rows);
                true
            }
            Err(stale) => {
                tracing::debug!("projection: {stale:?}; asking again");
                false
            }
        }
    }

    /// Takes a page of `shard`'s changes; whether to ask again at once.
    async fn projection_changes(&self, shard: ShardId, after: ChangePosition) -> bool {
        let Some(page) = self.changes_after(shard, after, false).await else {
            return false;
        };

        let count = page.changes.len();
        let taken = self
            .projections
            .write(|view| match view.take_changes(shard, page) {
                Ok(()) => Ok(()),
                Err(expired) => {
                    view.rescan(expired);
                    Err(expired)
                }
            });
        if taken.is_err() {
            tracing::info!(
                "projection: {shard} no longer keeps the changes after {after:?}; scanning it again"
            );
            self.metrics.projection_rescanned();
            return true;
        }
        if count > 0 {
            self.projections.edited();
        }
        self.metrics.projection_applied(count as u64);
        count >= CHANGES_PAGE_MAX
    }

    /// A page of `shard`'s state after `after`, standing at `floor` or
    /// later, from a replica in this region, else the leader, else any
    /// other (`leader_first`: the leader before the local replica). A
    /// replica behind the floor (the scan's first page, or what the
    /// replicas still keep) is passed over, so a lagging local replica
    /// cannot hold a scan up.
    pub(crate) async fn scan_page(
        &self,
        shard: ShardId,
        after: Option<ScanKey>,
        floor: Option<ChangePosition>,
        leader_first: bool,
    ) -> Option<ScanPage> {
        for node in self.stream_replicas(shard, leader_first) {
            let request = Request::LocalRead {
                shard,
                query: Query::Scan {
                    after: after.clone(),
                    max: CHANGES_PAGE_MAX as u32,
                },
                need: Freshness::default(),
            };
            let answer = self
                .endpoint()
                .call_node_within(&node, request, LOCAL_READ_TIMEOUT_MS)
                .await;
            if let Ok(Response::Read {
                result: QueryResult::Scan(page),
                ..
            }) = answer
            {
                if floor.is_none_or(|floor| page.at >= floor) {
                    return Some(page);
                }
            }
        }
        None
    }
}

/// Now minus `at`, in ms (0 for a time ahead of this clock).
pub(crate) fn lag_ms(at: Timestamp) -> u64 {
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    now_ms.saturating_sub(at.wall_ms)
}

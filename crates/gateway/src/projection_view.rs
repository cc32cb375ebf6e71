//! A region's projection as the gateway holds it: the view, behind a
//! lock only the feeding task (`projections`) writes, and what readers
//! waiting for commit tokens are woken by.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use harbor_cdc::projection::Projection;
use harbor_types::sim::Bugs;
use harbor_types::{CommitToken, ShardId};
use tokio::sync::watch;

/// The projection and what waits on it.
pub(crate) struct Projections {
    /// Written only by the feeding task, between its requests: a page is
    /// always taken by the projection that asked for it.
    pub(crate) view: Mutex<Projection>,
    /// Bumped whenever a round moved the projection: readers waiting for
    /// commit tokens look again.
    pub(crate) moved: watch::Sender<u64>,
    pub(crate) running: AtomicBool,
    /// A rebuild was asked for; the feeding task does it before its next
    /// round.
    pub(crate) rebuild: AtomicBool,
}

impl Projections {
    pub(crate) fn new(shards: impl IntoIterator<Item = ShardId>) -> Projections {
        Projections {
            view: Mutex::new(Projection::new(shards, Bugs::none())),
            moved: watch::channel(0).0,
            running: AtomicBool::new(false),
            rebuild: AtomicBool::new(false),
        }
    }

    pub(crate) fn running(&self) -> bool {
        self.running.load(Ordering::Relaxed)
    }

    /// Reads the projection.
    pub(crate) fn read<T>(&self, f: impl FnOnce(&Projection) -> T) -> T {
        // Nothing panics while holding the lock; a poisoned one still
        // holds a whole projection.
        f(&self.view.lock().unwrap_or_else(|e| e.into_inner()))
    }

    pub(crate) fn write<T>(&self, f: impl FnOnce(&mut Projection) -> T) -> T {
        f(&mut self.view.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Asks for the projection to be dropped and built again from a scan
    /// of every group (the feeding task does it before its next round).
    /// Readers then see an empty view (watermark `null`) until it is.
    pub(crate) fn rebuild(&self) {
        self.rebuild.store(true, Ordering::Relaxed);
    }

    /// Reads the projection with `f` once it includes every token, in the
    /// same look (a rebuild in between cannot slip an answer without
    /// them), waiting up to `wait`; the tokens it still lacks otherwise.
    pub(crate) async fn read_including<T>(
        &self,
        tokens: &[CommitToken],
        wait: Duration,
        f: impl Fn(&Projection) -> T,
    ) -> Result<T, Vec<CommitToken>> {
        let deadline = tokio::time::Instant::now() + wait;
        let mut moved = self.moved.subscribe();
        loop {
            let answer = self.read(|p| {
                let missing: Vec<CommitToken> =
                    tokens.iter().filter(|t| !p.includes(t)).copied().collect();
                if missing.is_empty() {
                    Ok(f(p))
                } else {
                    Err(missing)
                }
            });
            match answer {
                Ok(answer) => return Ok(answer),
                Err(missing) => match tokio::time::timeout_at(deadline, moved.changed()).await {
                    Ok(Ok(())) => continue,
                    _ => return Err(missing),
                },
            }
        }
    }
}

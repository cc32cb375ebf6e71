//! A region's projection as the gateway holds it: the view, behind a
//! lock only the feeding task (`projections`) writes, what readers
//! waiting for commit tokens are woken by, and the file it is saved to.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, RwLock};
use std::time::Duration;

use harbor_cdc::projection::Projection;
use harbor_types::sim::Bugs;
use harbor_types::{CommitToken, ShardId};
use tokio::sync::watch;

/// The projection and what waits on it.
pub(crate) struct Projections {
    /// Written only by the feeding task, between its requests: a page is
    /// always taken by the projection that asked for it. Readers (and the
    /// feeding task taking a save) share it.
    pub(crate) view: RwLock<Projection>,
    /// Bumped whenever a round moved the projection: readers waiting for
    /// commit tokens look again.
    pub(crate) moved: watch::Sender<u64>,
    pub(crate) running: AtomicBool,
    /// A rebuild was asked for; the feeding task does it before its next
    /// round.
    pub(crate) rebuild: AtomicBool,
    /// The file the projection is saved to, if any.
    pub(crate) file: Option<PathBuf>,
    /// It was loaded from that file at start.
    pub(crate) loaded: AtomicBool,
    /// The last save since start.
    pub(crate) saved: Mutex<Option<Saved>>,
    /// Bumped whenever rows or issuers may have changed (pages applied,
    /// scans, a rebuild, a load): a save is made only when it moved.
    pub(crate) edits: AtomicU64,
    /// A save is being written.
    pub(crate) saving: AtomicBool,
    /// Rebuilds so far, held while the file is written or dropped: a save
    /// taken before a rebuild is never written after it.
    disk: Mutex<u64>,
}

/// A save that was written.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Saved {
    pub(crate) at: std::time::Instant,
    pub(crate) bytes: u64,
    pub(crate) reservations: u64,
}

/// The projection's file in its directory.
const FILE_NAME: &str = "reservations.projection";

impl Projections {
    /// An empty projection, saved in `dir` if given: the feeding task
    /// first loads the save there (`load_save`) if there is one.
    pub(crate) fn new(
        shards: impl IntoIterator<Item = ShardId>,
        dir: Option<PathBuf>,
    ) -> Projections {
        Projections {
            loaded: AtomicBool::new(false),
            view: RwLock::new(Projection::new(shards, Bugs::none())),
            moved: watch::channel(0).0,
            running: AtomicBool::new(false),
            rebuild: AtomicBool::new(false),
            file: dir.map(|dir| dir.join(FILE_NAME)),
            saved: Mutex::new(None),
            edits: AtomicU64::new(0),
            saving: AtomicBool::new(false),
            disk: Mutex::new(0),
        }
    }

    /// Replaces the (empty) projection with the saved one, if there is one
    /// this build can go on from. Loading costs about the rows' count in
    /// microseconds, so it runs off the async threads, while readers see
    /// the empty projection (no watermark), as during a rebuild.
    pub(crate) async fn load_save(&self) {
        let Some(file) = self.file.clone() else {
            return;
        };
        let shards = self.read(|p| p.shards());
        let loaded = tokio::task::spawn_blocking(move || load(&file, &shards)).await;
        match loaded {
            Ok(Some(projection)) => {
                self.write(|p| *p = projection);
                self.loaded.store(true, Ordering::Relaxed);
                self.edited();
                self.moved.send_modify(|n| *n += 1);
            }
            Ok(None) => {}
            Err(e) => {
                tracing::error!(error = %e, "loading the saved projection failed; building it anew")
            }
        }
    }

    /// Rows or issuers may have changed: the next save is worth making.
    pub(crate) fn edited(&self) {
        self.edits.fetch_add(1, Ordering::Relaxed);
    }

    /// What a save taken now must find when it is written.
    pub(crate) fn disk_epoch(&self) -> u64 {
        *self.disk.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Writes a save taken at `epoch`, unless a rebuild came since
    /// (`Ok(false)`).
    pub(crate) fn write_save(
        &self,
        file: &Path,
        epoch: u64,
        bytes: &[u8],
    ) -> std::io::Result<bool> {
        let disk = self.disk.lock().unwrap_or_else(|e| e.into_inner());
        if *disk != epoch {
            return Ok(false);
        }
        save(file, bytes)?;
        Ok(true)
    }

    /// Deletes the save (a rebuild): a restart must not bring back what
    /// was dropped, and a save taken before cannot be written after.
    pub(crate) fn drop_save(&self) -> std::io::Result<()> {
        let mut disk = self.disk.lock().unwrap_or_else(|e| e.into_inner());
        *disk += 1;
        match &self.file {
            Some(file) => remove(file),
            None => Ok(()),
        }
    }

    pub(crate) fn running(&self) -> bool {
        self.running.load(Ordering::Relaxed)
    }

    /// Reads the projection.
    pub(crate) fn read<T>(&self, f: impl FnOnce(&Projection) -> T) -> T {
        // Nothing panics while holding the lock; a poisoned one still
        // holds a whole projection.
        f(&self.view.read().unwrap_or_else(|e| e.into_inner()))
    }

    pub(crate) fn write<T>(&self, f: impl FnOnce(&mut Projection) -> T) -> T {
        f(&mut self.view.write().unwrap_or_else(|e| e.into_inner()))
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

/// A save file: this magic, the crc32c of the rest, then
/// [`Projection::save`]'s bytes. The checksum keeps damaged bytes that
/// still decode (a position too far ahead would skip changes silently)
/// from being loaded.
const MAGIC: &[u8; 4] = b"HPJ1";

fn load(file: &Path, shards: &[ShardId]) -> Option<Projection> {
    let bytes = match std::fs::read(file) {
        Ok(bytes) => match unframe(&bytes) {
            Some(bytes) => bytes.to_vec(),
            None => {
                tracing::warn!(file = %file.display(), "the saved projection is damaged (checksum); building it anew");
                return None;
            }
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => {
            tracing::warn!(file = %file.display(), error = %e, "cannot read the saved projection; building it anew");
            return None;
        }
    };
    match Projection::load(&bytes, shards.iter().copied(), Bugs::none()) {
        Ok(projection) => {
            tracing::info!(
                file = %file.display(), bytes = bytes.len(), rows = projection.size().0,
                "projection loaded from its last save; it goes on from there"
            );
            Some(projection)
        }
        Err(why) => {
            tracing::warn!(file = %file.display(), %why, "the saved projection cannot be used; building it anew");
            None
        }
    }
}

fn unframe(bytes: &[u8]) -> Option<&[u8]> {
    let rest = bytes.strip_prefix(MAGIC)?;
    let (crc, payload) = rest.split_first_chunk::<4>()?;
    (u32::from_le_bytes(*crc) == crc32c::crc32c(payload)).then_some(payload)
}

/// Writes `bytes` framed (magic, checksum) to `file`, whole or not at all.
fn save(file: &Path, bytes: &[u8]) -> std::io::Result<()> {
    if let Some(dir) = file.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let crc = crc32c::crc32c(bytes).to_le_bytes();
    harbor_types::durable_file::replace(file, &[MAGIC, &crc, bytes])
}

/// Deletes the save, durably.
fn remove(file: &Path) -> std::io::Result<()> {
    match std::fs::remove_file(file) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
        Ok(()) => match file.parent() {
            Some(dir) => std::fs::File::open(dir)?.sync_all(),
            None => Ok(()),
        },
    }
}

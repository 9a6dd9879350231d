//! Keeping the store usable across storage faults: every write runs
//! through [`Store::write`], which records its outcome in [`StoreHealth`];
//! an I/O error
//! makes the store close its redb handle and open the file again.
//!
//! redb latches an I/O error: a handle that saw one answers every later
//! write with `PreviousIo` until it is closed. So the open database sits in
//! a [`Slot`] that a reopen empties and refills, writers take it through
//! `Store::writer_db` and readers through [`Store::reader_db`] (each
//! waiting while a reopen is under way, readers only as long as they may
//! block; only a writer ever reopens), and each
//! [`Reader`](super::Reader) carries a token that lets a reopen wait for its
//! read transaction. This file deliberately knows nothing of tables or of
//! what a write does; it opens the file the way `open.rs` does.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use redb::{Database, ReadableDatabase, WriteTransaction};

use super::open::{builder, check_format, classify, unusable};
use super::{Result, Store, StoreError, StoreHealth};
use crate::domain::Timestamp;

/// How long a writer, or a reader that may block, waits for a reopen in
/// progress before it gives up with [`StoreError::Unavailable`].
pub(super) const REOPEN_WAIT: Duration = Duration::from_secs(5);
/// After a failed reopen, the next writer tries again, at most this often.
const REOPEN_RETRY: Duration = Duration::from_secs(1);
/// How long a reopen lets the read transactions of the old handle finish
/// (a lookup takes microseconds; a long snapshot stream is cut short).
const READERS_WAIT: Duration = Duration::from_secs(1);
/// How long a reopen waits for the last users of the old handle (a writer
/// about to fail) before it goes on without it.
const CLOSE_WAIT: Duration = Duration::from_secs(10);

/// The open database, swapped for a fresh one after an I/O error.
#[derive(Default)]
pub(super) struct Slot {
    db: Option<Arc<Database>>,
    /// Held by every [`Reader`](super::Reader) of `db`: a reopen waits for
    /// them briefly.
    readers: Arc<()>,
    reopening: bool,
    /// Counts the databases this slot has held: a writer that failed on
    /// generation `g` reopens only if the slot still holds `g`.
    generation: u64,
    last_attempt: Option<Instant>,
    /// Why the last reopen failed.
    last_error: Option<String>,
    /// Readers waiting in [`Store::reader_db`] for a handle.
    readers_waiting: usize,
}

/// What a user of the slot gets: the database, the token its readers
/// hold while their transaction is open, and which database of the slot
/// it is.
pub(super) struct Handle {
    pub(super) db: Arc<Database>,
    pub(super) token: Arc<()>,
    pub(super) generation: u64,
}

impl Slot {
    fn handle(&self) -> Option<Handle> {
        self.db.as_ref().map(|db| Handle {
            db: db.clone(),
            token: self.readers.clone(),
            generation: self.generation,
        })
    }

    fn unavailable(&self) -> StoreError {
        StoreError::Unavailable(match &self.last_error {
            Some(e) => format!("it could not be reopened after an I/O error: {e}"),
            None => "it is being reopened after an I/O error".into(),
        })
    }

    /// A slot holding a freshly opened database.
    pub(super) fn holding(db: Database) -> Slot {
        Slot {
            db: Some(Arc::new(db)),
            ..Slot::default()
        }
    }
}

/// Locks ignoring poison: every critical section here leaves its data whole.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Store {
    /// Whether writes succeed, and what failed.
    pub fn health(&self) -> StoreHealth {
        lock(&self.health).clone()
    }

    /// The open database for a writer, the token its readers hold and its
    /// generation. While a reopen is under way this waits for it (at most
    /// [`REOPEN_WAIT`]); after a failed one the writer tries again, at most
    /// every [`REOPEN_RETRY`]. Only writers reopen: readers use
    /// [`Store::reader_db`].
    fn writer_db(&self) -> Result<Handle> {
        let deadline = Instant::now() + REOPEN_WAIT;
        let mut slot = lock(&self.slot);
        loop {
            if let Some(handle) = slot.handle() {
                return Ok(handle);
            }
            if !slot.reopening {
                let due = slot
                    .last_attempt
                    .is_none_or(|t| t.elapsed() >= REOPEN_RETRY);
                if due {
                    drop(slot);
                    self.reopen(None);
                    slot = lock(&self.slot);
                    if let Some(handle) = slot.handle() {
                        return Ok(handle);
                    }
                }
                break;
            }
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            slot = self
                .reopened
                .wait_timeout(slot, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        Err(slot.unavailable())
    }

    /// The open database for a reader. A reader never reopens the file
    /// (the writer whose I/O error poisoned the handle does, or the next
    /// writer after a failed reopen): while there is no handle it waits at
    /// most `wait` for one (zero: not at all, for callers that must not
    /// block), then gives up with [`StoreError::Unavailable`].
    pub(super) fn reader_db(&self, wait: Duration) -> Result<Handle> {
        let deadline = Instant::now() + wait;
        let mut slot = lock(&self.slot);
        let mut counted = false;
        let got = loop {
            if let Some(handle) = slot.handle() {
                break Ok(handle);
            }
            let now = Instant::now();
            if now >= deadline {
                break Err(slot.unavailable());
            }
            if !counted {
                counted = true;
                slot.readers_waiting += 1;
            }
            slot = self
                .reopened
                .wait_timeout(slot, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        };
        if counted {
            slot.readers_waiting -= 1;
        }
        got
    }

    /// After a reader met a handle of generation `seen` poisoned by an I/O
    /// error (`PreviousIo`): waits at most `wait` for a writer to put a
    /// newer handle in the slot. True when there is one to retry on.
    pub(super) fn wait_for_newer(&self, seen: u64, wait: Duration) -> bool {
        let deadline = Instant::now() + wait;
        let mut slot = lock(&self.slot);
        loop {
            if slot.generation != seen && slot.db.is_some() {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            slot = self
                .reopened
                .wait_timeout(slot, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Closes the redb handle and opens the file again: after an I/O error
    /// redb refuses every further write of the handle (`PreviousIo`) until
    /// it is closed. New readers wait meanwhile (see [`Store::reader_db`]); read
    /// transactions of the old handle get [`READERS_WAIT`] to finish and
    /// fail after it. A reopen on a still-full disk normally succeeds
    /// (redb repairs what the failed write left without growing the file),
    /// so reads go on; the writer's next retry fails again until there is
    /// space.
    fn reopen(&self, failed: Option<u64>) {
        let Some((path, options)) = &self.file else {
            return; // in memory: nothing to reopen
        };
        let old = {
            let mut slot = lock(&self.slot);
            // Under way, or done already by another writer that failed on
            // the same handle.
            if slot.reopening || failed.is_some_and(|g| g != slot.generation) {
                return;
            }
            slot.reopening = true;
            (slot.db.take(), std::mem::take(&mut slot.readers))
        };
        if let (Some(mut old), readers) = old {
            let deadline = Instant::now() + READERS_WAIT;
            while Arc::strong_count(&readers) > 1 && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(1));
            }
            // Others hold the handle only to begin a transaction, and a
            // writer of the old handle fails at once: wait for them.
            let deadline = Instant::now() + CLOSE_WAIT;
            loop {
                match Arc::try_unwrap(old) {
                    Ok(db) => {
                        if let Err(e) = db.close() {
                            tracing::debug!(error = %e, "closing the failed store handle");
                        }
                        break;
                    }
                    Err(shared) if Instant::now() < deadline => {
                        old = shared;
                        std::thread::sleep(Duration::from_millis(1));
                    }
                    Err(_) => break, // closes when its last user drops it
                }
            }
        }
        let opened = builder(options)
            .open(path)
            .map_err(|e| classify(path, e))
            .and_then(|db| match check_format(&db.begin_read()?, path)? {
                Some(_) => Ok(db),
                None => Err(unusable(path, "it has no emis-edge tables any more")),
            });
        let mut slot = lock(&self.slot);
        slot.reopening = false;
        slot.last_attempt = Some(Instant::now());
        match opened {
            Ok(db) => {
                slot.db = Some(Arc::new(db));
                slot.generation += 1;
                slot.last_error = None;
                lock(&self.health).reopens += 1;
                tracing::warn!(path = %path.display(), "store reopened after an I/O error");
            }
            Err(e) => {
                tracing::error!(path = %path.display(), error = %e, "store could not be reopened; will try again");
                slot.last_error = Some(e.to_string());
            }
        }
        drop(slot);
        self.reopened.notify_all();
    }

    /// Runs `f` with the database to itself (a compaction): fails with
    /// [`StoreError::Busy`], changing nothing, while a reader or another
    /// user holds the handle. Others wait meanwhile as during a reopen.
    pub(super) fn with_exclusive_db<T>(
        &self,
        f: impl FnOnce(&mut Database) -> Result<T>,
    ) -> Result<T> {
        let db = {
            let mut slot = lock(&self.slot);
            if slot.reopening {
                return Err(StoreError::Busy("the store is being reopened".into()));
            }
            let Some(db) = slot.db.take() else {
                return Err(StoreError::Unavailable("the store is not open".into()));
            };
            if Arc::strong_count(&slot.readers) > 1 {
                slot.db = Some(db);
                return Err(StoreError::Busy("a read transaction is open".into()));
            }
            slot.reopening = true;
            db
        };
        let (result, db) = match Arc::try_unwrap(db) {
            Ok(mut db) => (f(&mut db), Arc::new(db)),
            Err(shared) => (
                Err(StoreError::Busy("another user holds the store".into())),
                shared,
            ),
        };
        let mut slot = lock(&self.slot);
        slot.db = Some(db);
        slot.reopening = false;
        drop(slot);
        self.reopened.notify_all();
        result
    }

    pub(super) fn begin_write(&self) -> Result<WriteTransaction> {
        Ok(self.writer_db()?.db.begin_write()?)
    }

    /// Runs one write transaction (`attempt`) and records its outcome in
    /// [`StoreHealth`]: a success clears the error only if `wrote` says it
    /// wrote (a dry run proves nothing); an I/O error reopens the file.
    ///
    /// redb has one writer at a time, so a writer may begin on a handle
    /// that the previous writer's I/O error has just poisoned: it fails with
    /// `PreviousIo` without having reached the disk. It then runs once more
    /// on the reopened handle, so that the outcome and the error recorded
    /// (a full disk, say) are its own, not a symptom of another's.
    pub(super) fn write<T>(
        &self,
        now: Timestamp,
        wrote: impl Fn(&T) -> bool,
        mut attempt: impl FnMut() -> Result<T>,
    ) -> Result<T> {
        let mut generation = self.generation();
        let mut result = attempt();
        if matches!(result, Err(StoreError::Db(redb::Error::PreviousIo))) {
            self.reopen(Some(generation));
            generation = self.generation();
            result = attempt();
        }
        match &result {
            Ok(value) if wrote(value) => {
                let mut health = lock(&self.health);
                if let Some(error) = health.error.take() {
                    health.failing_since = None;
                    tracing::info!(%error, "store writable again");
                }
            }
            Ok(_) => {}
            Err(e) => {
                let mut health = lock(&self.health);
                health.write_failures += 1;
                health.error = Some(e.to_string());
                health.failing_since.get_or_insert(now);
            }
        }
        if result.as_ref().is_err_and(StoreError::needs_reopen) {
            self.reopen(Some(generation));
        }
        result
    }

    fn generation(&self) -> u64 {
        lock(&self.slot).generation
    }
}

/// The store looking as it does while a writer reopens the file, until
/// dropped: no handle, a reopen under way (see [`Store::hold_reopen`]).
#[cfg(feature = "fault-injection")]
pub struct HeldReopen<'a> {
    store: &'a Store,
    db: Option<Arc<Database>>,
}

#[cfg(feature = "fault-injection")]
impl Store {
    /// Fault injection for tests: the store behaves as while a writer
    /// reopens it after an I/O error (readers find no handle and wait or
    /// fail fast; writers wait) until the returned guard is dropped, which
    /// puts the same handle back.
    pub fn hold_reopen(&self) -> HeldReopen<'_> {
        let mut slot = lock(&self.slot);
        assert!(!slot.reopening, "a reopen is under way already");
        slot.reopening = true;
        HeldReopen {
            store: self,
            db: slot.db.take(),
        }
    }
}

#[cfg(feature = "fault-injection")]
impl HeldReopen<'_> {
    /// How many readers are waiting for the handle meanwhile.
    pub fn readers_waiting(&self) -> usize {
        lock(&self.store.slot).readers_waiting
    }
}

#[cfg(feature = "fault-injection")]
impl Drop for HeldReopen<'_> {
    fn drop(&mut self) {
        let mut slot = lock(&self.store.slot);
        slot.db = self.db.take();
        slot.reopening = false;
        drop(slot);
        self.store.reopened.notify_all();
    }
}

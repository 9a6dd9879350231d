//! The replica on disk: one redb file, read and written only through here.
//!
//! The interface is narrow on purpose: changes get in only through the
//! writers — [`Store::apply_batch`] (data, dead letters, counters and
//! consumed offsets in ONE write transaction: the delivery guarantee of
//! contract §2), the reconciles of snapshots, and
//! [`Store::apply_feed_page`] (a parent's feed page with its cursor) — each
//! of which gives every change it applies a position in the change log in
//! the same transaction; and a [`Reader`] (one read transaction) is the
//! only way data gets out, so every HTTP answer, feed pages included, is a
//! consistent view.
//!
//! Values begin with a one-byte value format: records, change-log entries
//! and teacher documents have compact hand-written encodings (`codec.rs`),
//! the rest is bincode (see `docs/ARCHITECTURE.md` for why), and the `meta` table records the store
//! format version: a file written by a newer release is refused untouched,
//! and so is a file that is empty, truncated, damaged or another program's.
//!
//! Storage faults: a failed write changes nothing (the transaction is not
//! committed), is recorded in [`StoreHealth`], and, when it was an I/O error
//! (a full disk), makes the store close and reopen its redb file — redb
//! refuses every later write of a handle that saw one — so that reads go on
//! and the writer's next retry can succeed once space is back.
//!
//! This file holds the vocabulary every caller sees: the [`Store`] handle,
//! its errors, its options and health, and the values that go in and come
//! out of more than one path. The work lives in one file per concern, each
//! readable alone:
//!
//! - `schema.rs`: the tables, the value codec and the format version;
//! - `open.rs`: opening, refusing, creating and upgrading a file;
//! - `reopen.rs`: write outcomes, [`StoreHealth`], and reopening after an
//!   I/O error;
//! - `write.rs`: the writers (batches, feed pages, reconciles, purges,
//!   document rendering), each one write transaction;
//! - `tables.rs`: the convergence rule on the tables (`WriteTables`);
//! - `read.rs`: the [`Reader`] and the teacher-detail assembly;
//! - `feed.rs`: the change log (positions of applied changes by school)
//!   and the pages of the change feed read from it;
//! - `codec.rs`: the compact encodings of records, change-log entries and
//!   compressed teacher documents;
//! - `bulk.rs`: the bulk load of an empty store (an import);
//! - `space.rs`: where the file's bytes go, and compaction.
//!
//! The test-only fault injection (`Store::fail_next_commit`,
//! `StoreError::InjectedFault`) exists only with the `fault-injection`
//! cargo feature, which only the tests enable: a release build has none of
//! it.

use std::path::PathBuf;
#[cfg(feature = "fault-injection")]
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use redb::Database;
use serde::{Deserialize, Serialize};

use crate::domain::Timestamp;

mod bulk;
mod codec;
mod feed;
mod open;
mod read;
mod reopen;
mod schema;
mod space;
mod tables;
mod write;

pub use bulk::{BulkLoad, Repeated};
pub use feed::{ChangesPage, FeedError, FeedInfo, FeedItem, FeedState};
pub use read::{Page, Reader, StateRow, StoreStats};
#[cfg(feature = "fault-injection")]
pub use reopen::HeldReopen;
pub use schema::{counter, FORMAT_VERSION};
pub use space::{allocated_bytes, CompactReport, StoreSpace, TableSpace, SPACE_EVERY};
pub use write::{ApplyReport, Batch, Drift, ReconcileReport};

/// Dead letters keep at most this much of the raw payload.
pub const DEAD_LETTER_MAX_RAW: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open the store {path}: {source}. {hint}")]
    Open {
        path: PathBuf,
        source: redb::DatabaseError,
        hint: &'static str,
    },
    #[error(
        "the store {path} has format version {found}, but this release understands only up to \
         {supported}; it was written by a newer emis-edge. Run that release, or move the file \
         aside and rebuild the replica with `emis-edge import` or a resync. The file was not \
         changed."
    )]
    NewerFormat {
        path: PathBuf,
        found: u32,
        supported: u32,
    },
    #[error(
        "{path} is a redb file but not an emis-edge store (it has no format version). The file \
         was not changed. Move it aside, then run `emis-edge import` or let resync refill it."
    )]
    Foreign { path: PathBuf },
    /// The file is empty, cut short, damaged, or not a redb file at all.
    #[error(
        "the store {path} cannot be used: {reason}. The file was not changed. Move it aside \
         (e.g. `mv {path} {path}.damaged`), then run `emis-edge import` or let resync refill it."
    )]
    Unusable { path: PathBuf, reason: String },
    /// The store is being reopened after an I/O error, or could not be.
    #[error("the store is not available: {0}")]
    Unavailable(String),
    /// An operation that needs the store to itself (a compaction) found it
    /// in use; nothing was changed.
    #[error("the store is busy: {0}")]
    Busy(String),
    #[error("store data is corrupt: {0}")]
    Corrupt(String),
    /// Change `index` of a batch cannot be applied however often it is
    /// tried (what is stored for its entity does not decode). Nothing of
    /// the batch was written, and the store is not degraded by it: the
    /// caller quarantines that change and applies the rest. Foreign
    /// changes are numbered after the batch's `changes`: index
    /// `changes.len() + i` is `foreign[i]`.
    #[error("change {index} of the batch cannot be applied: {reason}")]
    Refused { index: usize, reason: String },
    #[error("store I/O failed: {0}")]
    Db(#[from] redb::Error),
    /// A bulk load's temporary files (its sorted runs) could not be
    /// written or read back; the store was not changed.
    #[error("{0}")]
    TempFile(String),
    /// The failure [`Store::fail_next_commit`] asks for.
    #[cfg(feature = "fault-injection")]
    #[error("injected fault before commit (test hook)")]
    InjectedFault,
}

macro_rules! from_redb {
    ($($t:ty),*) => {$(
        impl From<$t> for StoreError {
            fn from(e: $t) -> Self {
                StoreError::Db(e.into())
            }
        }
    )*};
}
from_redb!(
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

impl StoreError {
    /// An I/O failure after which redb refuses the handle
    /// (`PreviousIo`) until it is closed and opened again.
    fn needs_reopen(&self) -> bool {
        matches!(
            self,
            StoreError::Db(
                redb::Error::Io(_)
                    | redb::Error::Backend(_)
                    | redb::Error::PreviousIo
                    | redb::Error::DatabaseClosed
            )
        )
    }
}

impl StoreError {
    /// The handle was poisoned by an I/O error (`PreviousIo`), or closed
    /// for a reopen: a writer reopens the file, and a reader retries on
    /// the new handle.
    fn is_poisoned(&self) -> bool {
        matches!(
            self,
            StoreError::Db(redb::Error::PreviousIo | redb::Error::DatabaseClosed)
        )
    }

    /// A moment of the store, not a fault of the request: it is being
    /// reopened after an I/O error, or a reader met the handle that error
    /// poisoned. HTTP answers `503` with `Retry-After`.
    pub fn is_transient(&self) -> bool {
        matches!(self, StoreError::Unavailable(_)) || self.is_poisoned()
    }
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// A consumed position: the next offset to read in one topic partition.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionOffset {
    pub topic: String,
    pub partition: i32,
    pub next_offset: i64,
}

/// An event the node could not use, kept for the operator.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadLetter {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    /// The payload, cut to [`DEAD_LETTER_MAX_RAW`] bytes.
    pub raw: Vec<u8>,
    /// The payload's full length.
    pub raw_len: usize,
    pub reason: String,
    pub at: Timestamp,
}

impl DeadLetter {
    pub fn new(
        topic: &str,
        partition: i32,
        offset: i64,
        raw: &[u8],
        reason: String,
        at: Timestamp,
    ) -> DeadLetter {
        DeadLetter {
            topic: topic.to_owned(),
            partition,
            offset,
            raw: raw[..raw.len().min(DEAD_LETTER_MAX_RAW)].to_vec(),
            raw_len: raw.len(),
            reason,
            at,
        }
    }
}

/// Something the node remembers across restarts (kept in `meta`): when it
/// happened (the node's clock), whether it went well, and what it was.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Note {
    pub at: Timestamp,
    pub ok: bool,
    pub detail: String,
}

/// Dead letters kept at most, by default (`store.dead_letter_max_count`).
pub const DEAD_LETTER_MAX_COUNT: u64 = 100_000;

/// Options for opening a store.
#[derive(Clone, Debug)]
pub struct StoreOptions {
    /// redb page cache in bytes.
    pub cache_bytes: usize,
    /// Dead letters kept at most: a batch that adds some drops the oldest
    /// beyond this, in the same transaction.
    pub dead_letter_max_count: u64,
    /// Rows an import collects in memory for a bulk load at most
    /// ([`BULK_LOAD_MAX_ROWS`] by default): past that they are sorted into
    /// a temporary file beside the store and merged at the end.
    pub bulk_load_max_rows: u64,
}

/// More than a province of the generator's size (a province is ~6.5
/// million rows, ~1.1 GiB of peak memory while it is bulk loaded): a
/// province is loaded in memory, a national file spills sorted runs.
pub const BULK_LOAD_MAX_ROWS: u64 = 8_000_000;

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            cache_bytes: 64 * 1024 * 1024,
            dead_letter_max_count: DEAD_LETTER_MAX_COUNT,
            bulk_load_max_rows: BULK_LOAD_MAX_ROWS,
        }
    }
}

/// Whether the store can be written, for status, readiness and metrics.
/// Kept in memory: a restart starts healthy.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StoreHealth {
    /// The error of the last write, `None` once a write succeeds again.
    pub error: Option<String>,
    /// The `now` of the first write of the current run of failures.
    pub failing_since: Option<Timestamp>,
    /// Failed writes since the store was opened.
    pub write_failures: u64,
    /// Times the redb file was closed and opened again after an I/O error.
    pub reopens: u64,
}

impl StoreHealth {
    /// The last write failed: the node serves what it has but takes
    /// nothing new in.
    pub fn degraded(&self) -> bool {
        self.error.is_some()
    }
}

/// Commits a slow [`Store::subscribe_commits`] receiver may fall behind
/// before it is told it lagged.
pub const COMMITS_KEPT: usize = 1024;

/// A committed write that gave out change-log positions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Commit {
    /// The last position it gave out.
    pub seq: u64,
    /// The schools whose feed it changed (an entity's school, and its
    /// previous one when it moved), sorted.
    schools: Vec<u128>,
}

impl Commit {
    /// Whether it changed the feed of one of `schools`.
    pub fn touches(&self, schools: &[uuid::Uuid]) -> bool {
        schools
            .iter()
            .any(|s| self.schools.binary_search(&s.as_u128()).is_ok())
    }
}

pub struct Store {
    slot: Mutex<reopen::Slot>,
    /// Signalled when a reopen ends.
    reopened: Condvar,
    /// The file and its options, to reopen it (`None`: in memory).
    file: Option<(PathBuf, StoreOptions)>,
    health: Mutex<StoreHealth>,
    /// The last measurement of where the file's bytes go.
    space: space::SpaceCache,
    /// The last change-log position committed (see [`Store::subscribe`]).
    committed: tokio::sync::watch::Sender<u64>,
    /// [`StoreOptions::dead_letter_max_count`].
    dead_letter_max_count: u64,
    /// [`StoreOptions::bulk_load_max_rows`].
    bulk_load_max_rows: u64,
    /// Every commit that gave out positions, with its schools (see
    /// [`Store::subscribe_commits`]).
    commits: tokio::sync::broadcast::Sender<Arc<Commit>>,
    #[cfg(feature = "fault-injection")]
    fail_next_commit: AtomicBool,
}

impl Store {
    /// The handle of a checked, initialised database whose change log
    /// stands at `head`.
    fn new(db: Database, file: Option<(PathBuf, StoreOptions)>, head: u64) -> Store {
        Store {
            slot: Mutex::new(reopen::Slot::holding(db)),
            reopened: Condvar::new(),
            dead_letter_max_count: file
                .as_ref()
                .map_or(DEAD_LETTER_MAX_COUNT, |(_, o)| o.dead_letter_max_count),
            bulk_load_max_rows: file
                .as_ref()
                .map_or(BULK_LOAD_MAX_ROWS, |(_, o)| o.bulk_load_max_rows),
            file,
            health: Mutex::new(StoreHealth::default()),
            space: Default::default(),
            committed: tokio::sync::watch::channel(head).0,
            commits: tokio::sync::broadcast::channel(COMMITS_KEPT).0,
            #[cfg(feature = "fault-injection")]
            fail_next_commit: AtomicBool::new(false),
        }
    }

    /// The last change-log position committed, updated after every
    /// committed write that gave out positions: a long-poll waits on it
    /// (`changed()`) instead of polling the store.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.committed.subscribe()
    }

    /// Every later commit that gave out positions, with the schools whose
    /// feed it changed: a long-poll of some schools reads the store again
    /// only after a commit of one of them, instead of after every commit
    /// (with a thousand held long-polls and tens of commits a second, a
    /// read each was the parent's main cost). A receiver more than
    /// [`COMMITS_KEPT`] commits behind gets `Lagged` and must read.
    pub fn subscribe_commits(&self) -> tokio::sync::broadcast::Receiver<Arc<Commit>> {
        self.commits.subscribe()
    }

    /// Tells subscribers that positions up to `seq` are committed, changing
    /// the feed of `schools`.
    fn committed(&self, seq: u64, schools: Vec<u128>) {
        self.committed.send_if_modified(|last| {
            let newer = seq > *last;
            if newer {
                *last = seq;
            }
            newer
        });
        // Every commit, also one announced after a later one: its schools
        // are its own.
        if !schools.is_empty() {
            let _ = self.commits.send(Arc::new(Commit { seq, schools }));
        }
    }

    /// Fault injection for tests: the next [`Store::apply_batch`] or
    /// [`Store::apply_feed_page`] writes everything, then fails with
    /// [`StoreError::InjectedFault`] instead of committing.
    #[cfg(feature = "fault-injection")]
    pub fn fail_next_commit(&self) {
        self.fail_next_commit.store(true, Ordering::SeqCst);
    }

    /// Takes the fault [`Store::fail_next_commit`] asked for, if any: the
    /// caller drops its transaction, which aborts it.
    #[cfg(feature = "fault-injection")]
    fn injected_fault(&self) -> Result<()> {
        if self.fail_next_commit.swap(false, Ordering::SeqCst) {
            return Err(StoreError::InjectedFault);
        }
        Ok(())
    }
}

//! The replica on disk: one redb file, read and written only through here.
//!
//! The interface is narrow on purpose: [`Store::apply_batch`] is the only way
//! changes get in (data, dead letters, counters and consumed offsets in ONE
//! write transaction — the delivery guarantee of contract §2), and a
//! [`Reader`] (one read transaction) is the only way data gets out, so every
//! HTTP answer is a consistent view.
//!
//! Values are a one-byte value format followed by bincode (see
//! `docs/ARCHITECTURE.md` for why), and the `meta` table records the store
//! format version: a file written by a newer release is refused untouched,
//! and so is a file that is empty, truncated, damaged or another program's.
//!
//! Storage faults: a failed write changes nothing (the transaction is not
//! committed), is recorded in [`StoreHealth`], and, when it was an I/O error
//! (a full disk), makes the store close and reopen its redb file — redb
//! refuses every later write of a handle that saw one — so that reads go on
//! and the writer's next retry can succeed once space is back.

use std::collections::BTreeMap;
use std::ops::{Bound, ControlFlow};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use redb::{
    Database, ReadOnlyTable, ReadTransaction, ReadableDatabase, ReadableTable,
    ReadableTableMetadata, Table, TableDefinition, WriteTransaction,
};
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use uuid::Uuid;

use crate::domain::{
    assemble_teacher_detail, Change, Class, ClassLookup, Entity, EntityKind, OrderKey, Record,
    SyncSource, Teacher, TeacherDetail, Timestamp, Tombstone,
};

/// The layout of tables and keys. Bump it (and add a migration in
/// [`Store::open`]) when a release changes them.
pub const FORMAT_VERSION: u32 = 2;
/// First byte of every encoded value: how the rest is encoded.
const VALUE_FORMAT: u8 = 1;
/// Dead letters keep at most this much of the raw payload.
pub const DEAD_LETTER_MAX_RAW: usize = 64 * 1024;

type Id = u128;
const CLASSES: TableDefinition<Id, &[u8]> = TableDefinition::new("classes");
const TEACHERS: TableDefinition<Id, &[u8]> = TableDefinition::new("teachers");
const ASSIGNMENTS: TableDefinition<Id, &[u8]> = TableDefinition::new("assignments");
/// (entity kind code, id) → tombstone.
const TOMBSTONES: TableDefinition<(u8, Id), &[u8]> = TableDefinition::new("tombstones");
/// Secondary indexes: (owner, entity id) → ().
const CLASS_BY_SCHOOL: TableDefinition<(Id, Id), ()> = TableDefinition::new("class_by_school");
const TEACHER_BY_SCHOOL: TableDefinition<(Id, Id), ()> = TableDefinition::new("teacher_by_school");
const ASSIGNMENT_BY_SCHOOL: TableDefinition<(Id, Id), ()> =
    TableDefinition::new("assignment_by_school");
/// (teacher, assignment) → the assignment's record, a copy of its value in
/// `assignments`: the teacher-detail hot path reads a teacher's assignments
/// with one range scan instead of one look-up each.
const ASSIGNMENT_BY_TEACHER: TableDefinition<(Id, Id), &[u8]> =
    TableDefinition::new("assignment_by_teacher");
/// (class, assignment) → the assignment's teacher: whose documents a change
/// of the class invalidates.
const ASSIGNMENT_BY_CLASS: TableDefinition<(Id, Id), Id> =
    TableDefinition::new("assignment_by_class");
/// teacher → the rendered teacher-detail document (JSON), so that a lookup
/// is one read. A change to the teacher, one of its assignments or one of
/// their classes removes the document and queues the teacher in
/// `pending_docs` in the same transaction; [`Store::materialize`] renders
/// it again. Until then a read assembles the document from the records, so
/// answers never lag behind the data.
const TEACHER_DOCS: TableDefinition<Id, &[u8]> = TableDefinition::new("teacher_docs");
/// teacher → (): documents to render.
const PENDING_DOCS: TableDefinition<Id, ()> = TableDefinition::new("pending_docs");
/// (topic, partition) → next offset to consume.
const OFFSETS: TableDefinition<(&str, i32), i64> = TableDefinition::new("offsets");
/// sequence number → dead letter.
const DEAD_LETTERS: TableDefinition<u64, &[u8]> = TableDefinition::new("dead_letters");
/// counter name → value; written in the same transaction as the data.
const COUNTERS: TableDefinition<&str, u64> = TableDefinition::new("counters");
/// name → value: `format_version`, `watermark`, …
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");

const META_FORMAT: &str = "format_version";
/// The latest source timestamp this store has seen (event or snapshot):
/// the `asOf` of snapshots it serves.
const META_WATERMARK: &str = "watermark";

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
    #[error("store data is corrupt: {0}")]
    Corrupt(String),
    #[error("store I/O failed: {0}")]
    Db(#[from] redb::Error),
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

/// Everything one write transaction commits.
#[derive(Clone, Debug, Default)]
pub struct Batch {
    /// Valid changes of served schools, each with its order key.
    pub changes: Vec<(OrderKey, Change)>,
    pub dead_letters: Vec<DeadLetter>,
    /// Events skipped because their school is not served.
    pub skipped: u64,
    /// Positions consumed up to and including this batch.
    pub offsets: Vec<PartitionOffset>,
    /// The topic of each change (same order), and of each skipped event:
    /// for per-topic metrics only; not stored.
    pub change_topics: Vec<String>,
    pub skipped_topics: Vec<String>,
}

/// What a batch did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ApplyReport {
    pub applied: u64,
    pub stale: u64,
    pub dead_lettered: u64,
    pub skipped: u64,
    /// For each change of the batch, in order: whether it was applied.
    pub outcomes: Vec<bool>,
}

/// Persistent counters, in the store so that they survive restarts and
/// move exactly with the data.
pub mod counter {
    pub const APPLIED: &str = "events_applied";
    pub const STALE: &str = "events_stale";
    pub const SKIPPED: &str = "events_skipped";
    pub const DEAD_LETTERED: &str = "events_dead_lettered";
    pub const TOMBSTONES_PURGED: &str = "tombstones_purged";
    pub const RESYNC_APPLIED: &str = "resync_applied";
    pub const RESYNC_DELETED: &str = "resync_deleted";
}

/// Entity counts and counters, for status and metrics.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StoreStats {
    pub classes: u64,
    pub teachers: u64,
    pub assignments: u64,
    pub tombstones: u64,
    pub dead_letters: u64,
    /// Teacher documents queued for rendering (see [`Store::materialize`]).
    pub pending_documents: u64,
    pub counters: BTreeMap<String, u64>,
}

/// One page of a school's classes or teachers, ordered by id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Page {
    pub items: Vec<Record<Entity>>,
    /// The id to pass as `after` for the next page, if there is one.
    pub next: Option<Uuid>,
}

/// How a school's local state compared with a snapshot, per entity kind.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Drift {
    /// In the snapshot, not live here (absent, or deleted by an older change).
    pub missing: u64,
    /// Live here, absent from the snapshot, not newer than its `asOf`.
    pub extra: u64,
    /// Here in an older version than the snapshot's.
    pub older: u64,
    /// Here in a newer version (or deleted later, or created after `asOf`).
    pub newer: u64,
    /// The same version.
    pub same: u64,
}

/// What reconciling one school did (or, on a dry run, would do).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ReconcileReport {
    pub school_id: Uuid,
    pub records: u64,
    /// Entities changed by the snapshot's records.
    pub applied: u64,
    /// Local entities deleted because the snapshot no longer has them.
    pub deleted: u64,
    pub drift: BTreeMap<&'static str, Drift>,
    pub dry_run: bool,
}

/// Options for opening a store.
#[derive(Clone, Debug)]
pub struct StoreOptions {
    /// redb page cache in bytes.
    pub cache_bytes: usize,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            cache_bytes: 64 * 1024 * 1024,
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

/// How long a reader waits for a reopen in progress before it gives up
/// with [`StoreError::Unavailable`].
const REOPEN_WAIT: Duration = Duration::from_secs(5);
/// After a failed reopen, the next reader or writer tries again, at most
/// this often.
const REOPEN_RETRY: Duration = Duration::from_secs(1);
/// How long a reopen lets the read transactions of the old handle finish
/// (a lookup takes microseconds; a long snapshot stream is cut short).
const READERS_WAIT: Duration = Duration::from_secs(1);
/// How long a reopen waits for the last users of the old handle (a writer
/// about to fail) before it goes on without it.
const CLOSE_WAIT: Duration = Duration::from_secs(10);

/// The open database, swapped for a fresh one after an I/O error.
#[derive(Default)]
struct Slot {
    db: Option<Arc<Database>>,
    /// Held by every [`Reader`] of `db`: a reopen waits for them briefly.
    readers: Arc<()>,
    reopening: bool,
    last_attempt: Option<Instant>,
    /// Why the last reopen failed.
    last_error: Option<String>,
}

pub struct Store {
    slot: Mutex<Slot>,
    /// Signalled when a reopen ends.
    reopened: Condvar,
    /// The file and its options, to reopen it (`None`: in memory).
    file: Option<(PathBuf, StoreOptions)>,
    health: Mutex<StoreHealth>,
    fail_next_commit: AtomicBool,
}

/// Locks ignoring poison: every critical section here leaves its data whole.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    let mut out = vec![VALUE_FORMAT];
    bincode::serde::encode_into_std_write(value, &mut out, bincode::config::standard())
        .expect("encoding into a Vec cannot fail");
    out
}

fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T> {
    match bytes.split_first() {
        Some((&VALUE_FORMAT, rest)) => {
            bincode::serde::decode_from_slice(rest, bincode::config::standard())
                .map(|(v, _)| v)
                .map_err(|e| StoreError::Corrupt(e.to_string()))
        }
        Some((other, _)) => Err(StoreError::Corrupt(format!("unknown value format {other}"))),
        None => Err(StoreError::Corrupt("empty value".into())),
    }
}

fn entity_table(kind: EntityKind) -> TableDefinition<'static, Id, &'static [u8]> {
    match kind {
        EntityKind::Class => CLASSES,
        EntityKind::Teacher => TEACHERS,
        EntityKind::Assignment => ASSIGNMENTS,
    }
}

/// The by-school indexes, by entity kind code − 1.
const INDEXES: [TableDefinition<(Id, Id), ()>; 3] =
    [CLASS_BY_SCHOOL, TEACHER_BY_SCHOOL, ASSIGNMENT_BY_SCHOOL];

/// The by-school index of a kind.
fn school_index(kind: EntityKind) -> TableDefinition<'static, (Id, Id), ()> {
    INDEXES[kind.code() as usize - 1]
}

fn open_error(path: &Path, source: redb::DatabaseError) -> StoreError {
    let hint = match &source {
        redb::DatabaseError::DatabaseAlreadyOpen => {
            "Another process has it open: is `emis-edge serve` running? Use the CLI against \
             the running node, or stop it first."
        }
        redb::DatabaseError::UpgradeRequired(_) => {
            "It was written by an incompatible redb version."
        }
        _ => {
            "If the file is damaged or not an emis-edge store, move it aside, then rebuild the \
             replica with `emis-edge import` or a resync; it was not changed."
        }
    };
    StoreError::Open {
        path: path.to_owned(),
        source,
        hint,
    }
}

/// The first bytes of every redb file.
const REDB_MAGIC: &[u8] = b"redb\x1a\x0a\xa9\x0d\x0a";

fn unusable(path: &Path, reason: impl Into<String>) -> StoreError {
    StoreError::Unusable {
        path: path.to_owned(),
        reason: reason.into(),
    }
}

/// Refuses, from its size and first bytes alone, a file that cannot be a
/// store: empty (a store is never empty: it is created whole under another
/// name, see [`Store::create`]), or not a redb file. Reads only.
fn precheck(path: &Path) -> Result<()> {
    use std::io::Read;
    let meta = std::fs::metadata(path).map_err(|e| open_error(path, e.into()))?;
    if meta.is_dir() {
        return Err(unusable(path, "it is a directory, not a file"));
    }
    if meta.len() == 0 {
        return Err(unusable(
            path,
            "it is empty (0 bytes); a store file is never empty",
        ));
    }
    let mut head = Vec::with_capacity(16);
    std::fs::File::open(path)
        .and_then(|f| f.take(16).read_to_end(&mut head))
        .map_err(|e| open_error(path, e.into()))?;
    if REDB_MAGIC.starts_with(&head) && head.len() < REDB_MAGIC.len() {
        return Err(unusable(
            path,
            format!(
                "it is truncated ({} bytes, not even a redb header)",
                head.len()
            ),
        ));
    }
    if !head.starts_with(REDB_MAGIC) {
        let what = if head.starts_with(b"SQLite format 3\0") {
            "an SQLite database".to_owned()
        } else if head.starts_with(b"\x89PNG") {
            "a PNG image".to_owned()
        } else if head.starts_with(b"\x1f\x8b") {
            "gzip-compressed".to_owned()
        } else if head.starts_with(b"PK\x03\x04") {
            "a zip archive".to_owned()
        } else if head.first() == Some(&b'{') {
            "JSON text, perhaps an `emis-edge export` file (load those with `emis-edge import`)"
                .to_owned()
        } else {
            let hex: Vec<String> = head.iter().take(8).map(|b| format!("{b:02x}")).collect();
            format!("unknown, starting with bytes {}", hex.join(" "))
        };
        return Err(unusable(path, format!("it is not a redb file: {what}")));
    }
    Ok(())
}

/// Turns what redb says of a file it cannot open into a refusal that says
/// what is wrong with the file, where it is the file's fault.
fn classify(path: &Path, e: redb::DatabaseError) -> StoreError {
    use redb::{DatabaseError, StorageError};
    match &e {
        DatabaseError::Storage(StorageError::Corrupted(msg)) => {
            unusable(path, format!("it is truncated or damaged ({msg})"))
        }
        DatabaseError::Storage(StorageError::Io(io))
            if io.kind() == std::io::ErrorKind::UnexpectedEof =>
        {
            unusable(path, format!("it is truncated ({io})"))
        }
        DatabaseError::Storage(StorageError::Io(io))
            if io.kind() == std::io::ErrorKind::InvalidData =>
        {
            unusable(path, format!("it is not a usable redb file ({io})"))
        }
        _ => open_error(path, e),
    }
}

fn builder(options: &StoreOptions) -> redb::Builder {
    let mut builder = Database::builder();
    builder.set_cache_size(options.cache_bytes);
    builder
}

/// Opens an existing store file for writing, refusing a file it must not
/// use before anything opens it writable: the size and first bytes, then
/// the format through a read-only handle (opening for writing may touch
/// the file; a refused file stays byte-for-byte as it was). A file that
/// needs crash recovery cannot be opened read-only; redb repairs it on the
/// writable open (refusing a truncated one before it writes anything) and
/// the format check runs after it.
fn open_existing(path: &Path, options: &StoreOptions) -> Result<Database> {
    precheck(path)?;
    let builder = builder(options);
    match builder.open_read_only(path) {
        Ok(ro) => {
            check_format(&ro.begin_read()?, path)?;
        }
        Err(redb::DatabaseError::RepairAborted) => {} // needs recovery: below
        Err(e) => return Err(classify(path, e)),
    }
    builder.open(path).map_err(|e| classify(path, e))
}

/// Makes `tmp`, a complete new store, visible as `path`, unless a store
/// appeared there meanwhile (then returns false and removes `tmp`).
fn publish(tmp: &Path, path: &Path) -> std::io::Result<bool> {
    match std::fs::hard_link(tmp, path) {
        Ok(()) => std::fs::remove_file(tmp)?,
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            let _ = std::fs::remove_file(tmp);
            return Ok(false);
        }
        // A file system without hard links.
        Err(_) if !path.exists() => std::fs::rename(tmp, path)?,
        Err(_) => {
            let _ = std::fs::remove_file(tmp);
            return Ok(false);
        }
    }
    // The new name must survive a power loss like the data written to it.
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(true)
}

impl Store {
    /// Opens the store at `path`, creating it (and a fresh format version)
    /// when the file does not exist. A file of a newer format, a redb file
    /// of another program, and a file that is empty, truncated, damaged or
    /// not a redb file are refused without being written.
    pub fn open(path: &Path, options: &StoreOptions) -> Result<Store> {
        if !path.exists() {
            return Self::create(path, options);
        }
        let db = open_existing(path, options)?;
        Self::init(db, path, Some(options))
    }

    /// Creates a new store whole under a temporary name and only then gives
    /// it its name, so that `path` never holds a half-created store (a
    /// crash while creating leaves no file, not an empty one, which is why
    /// an empty file is refused as damaged rather than taken as new).
    fn create(path: &Path, options: &StoreOptions) -> Result<Store> {
        let mut name = path.file_name().unwrap_or_default().to_owned();
        name.push(".new");
        let tmp = path.with_file_name(name);
        let _ = std::fs::remove_file(&tmp); // left by a crash while creating
        let created = builder(options)
            .create(&tmp)
            .map_err(|e| open_error(path, e))
            .and_then(|db| Self::init(db, path, Some(options)));
        let store = match created {
            Ok(store) => store,
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                return Err(e);
            }
        };
        match publish(&tmp, path) {
            Ok(true) => Ok(store),
            // Another process created it first: use (or be refused) that one.
            Ok(false) => {
                drop(store);
                Self::open(path, options)
            }
            Err(e) => Err(open_error(path, e.into())),
        }
    }

    /// A store held in memory by redb's in-memory backend: the same engine
    /// and code paths, nothing on disk. For tests that need many stores.
    pub fn open_in_memory() -> Result<Store> {
        let db = Database::builder()
            .create_with_backend(redb::backends::InMemoryBackend::new())
            .map_err(|e| open_error(Path::new(":memory:"), e))?;
        Self::init(db, Path::new(":memory:"), None)
    }

    fn init(db: Database, path: &Path, options: Option<&StoreOptions>) -> Result<Store> {
        let found = check_format(&db.begin_read()?, path)?;
        match found {
            Some(FORMAT_VERSION) => {}
            Some(1) => migrate_from_1(&db, path)?,
            Some(other) => {
                return Err(StoreError::Corrupt(format!(
                    "unknown store format version {other}"
                )))
            }
            None => {
                let txn = db.begin_write()?;
                {
                    txn.open_table(META)?
                        .insert(META_FORMAT, FORMAT_VERSION.to_le_bytes().as_slice())?;
                    // Create every table so readers never meet a missing one.
                    txn.open_table(CLASSES)?;
                    txn.open_table(TEACHERS)?;
                    txn.open_table(ASSIGNMENTS)?;
                    txn.open_table(TOMBSTONES)?;
                    for index in INDEXES {
                        txn.open_table(index)?;
                    }
                    txn.open_table(ASSIGNMENT_BY_TEACHER)?;
                    txn.open_table(ASSIGNMENT_BY_CLASS)?;
                    txn.open_table(TEACHER_DOCS)?;
                    txn.open_table(PENDING_DOCS)?;
                    txn.open_table(OFFSETS)?;
                    txn.open_table(DEAD_LETTERS)?;
                    txn.open_table(COUNTERS)?;
                }
                txn.commit()?;
            }
        }
        Ok(Store {
            slot: Mutex::new(Slot {
                db: Some(Arc::new(db)),
                ..Slot::default()
            }),
            reopened: Condvar::new(),
            file: options.map(|o| (path.to_owned(), o.clone())),
            health: Mutex::new(StoreHealth::default()),
            fail_next_commit: AtomicBool::new(false),
        })
    }

    /// Fault injection for tests: the next [`Store::apply_batch`] writes
    /// everything, then fails instead of committing.
    pub fn fail_next_commit(&self) {
        self.fail_next_commit.store(true, Ordering::SeqCst);
    }

    /// Whether writes succeed, and what failed.
    pub fn health(&self) -> StoreHealth {
        lock(&self.health).clone()
    }

    /// The open database, and the token its readers hold. While a reopen
    /// is under way this waits for it (at most [`REOPEN_WAIT`]); after a
    /// failed one it tries again, at most every [`REOPEN_RETRY`].
    fn db(&self) -> Result<(Arc<Database>, Arc<()>)> {
        let deadline = Instant::now() + REOPEN_WAIT;
        let mut slot = lock(&self.slot);
        loop {
            if let Some(db) = &slot.db {
                return Ok((db.clone(), slot.readers.clone()));
            }
            if !slot.reopening {
                let due = slot
                    .last_attempt
                    .is_none_or(|t| t.elapsed() >= REOPEN_RETRY);
                if due {
                    drop(slot);
                    self.reopen();
                    slot = lock(&self.slot);
                    if let Some(db) = &slot.db {
                        return Ok((db.clone(), slot.readers.clone()));
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
        Err(StoreError::Unavailable(match &slot.last_error {
            Some(e) => format!("it could not be reopened after an I/O error: {e}"),
            None => "it is being reopened after an I/O error".into(),
        }))
    }

    /// Closes the redb handle and opens the file again: after an I/O error
    /// redb refuses every further write of the handle (`PreviousIo`) until
    /// it is closed. New readers wait meanwhile (see [`Store::db`]); read
    /// transactions of the old handle get [`READERS_WAIT`] to finish and
    /// fail after it. A reopen on a still-full disk normally succeeds
    /// (redb repairs what the failed write left without growing the file),
    /// so reads go on; the writer's next retry fails again until there is
    /// space.
    fn reopen(&self) {
        let Some((path, options)) = &self.file else {
            return; // in memory: nothing to reopen
        };
        let old = {
            let mut slot = lock(&self.slot);
            if slot.reopening {
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

    fn begin_write(&self) -> Result<WriteTransaction> {
        Ok(self.db()?.0.begin_write()?)
    }

    /// Records the outcome of a write in [`StoreHealth`] (a success clears
    /// the error only if it `wrote`: a dry run proves nothing), and reopens
    /// the file after an I/O error. The failed transaction is gone by now.
    fn settle<T>(&self, now: Timestamp, result: Result<T>, wrote: bool) -> Result<T> {
        match &result {
            Ok(_) if wrote => {
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
            self.reopen();
        }
        result
    }

    /// One consistent view of the store.
    pub fn read(&self) -> Result<Reader> {
        let (db, token) = self.db()?;
        Ok(Reader {
            txn: db.begin_read()?,
            _token: token,
        })
    }

    /// Applies a batch — changes by the convergence rule, dead letters,
    /// counters and consumed offsets — in ONE write transaction: after a
    /// crash either all of it is there or none of it.
    pub fn apply_batch(
        &self,
        batch: &Batch,
        now: Timestamp,
        source: SyncSource,
    ) -> Result<ApplyReport> {
        let result = self.apply_batch_txn(batch, now, source);
        self.settle(now, result, true)
    }

    fn apply_batch_txn(
        &self,
        batch: &Batch,
        now: Timestamp,
        source: SyncSource,
    ) -> Result<ApplyReport> {
        let txn = self.begin_write()?;
        let mut report = ApplyReport {
            skipped: batch.skipped,
            ..ApplyReport::default()
        };
        let mut watermark = None;
        {
            let mut tables = WriteTables::open(&txn)?;
            for (key, change) in &batch.changes {
                let applied = tables.apply(key, change, now, source)?;
                report.outcomes.push(applied);
                if applied {
                    report.applied += 1;
                } else {
                    report.stale += 1;
                }
                watermark = watermark.max(Some(key.timestamp));
            }
        }
        {
            let mut dead = txn.open_table(DEAD_LETTERS)?;
            let first = dead.last()?.map_or(0, |(k, _)| k.value() + 1);
            for (seq, letter) in (first..).zip(&batch.dead_letters) {
                dead.insert(seq, encode(letter).as_slice())?;
                report.dead_lettered += 1;
            }
        }
        {
            let mut offsets = txn.open_table(OFFSETS)?;
            for o in &batch.offsets {
                offsets.insert((o.topic.as_str(), o.partition), o.next_offset)?;
            }
        }
        add_counters(
            &txn,
            &[
                (counter::APPLIED, report.applied),
                (counter::STALE, report.stale),
                (counter::DEAD_LETTERED, report.dead_lettered),
                (counter::SKIPPED, report.skipped),
            ],
        )?;
        if let Some(w) = watermark {
            raise_watermark(&txn, w)?;
        }
        if self.fail_next_commit.swap(false, Ordering::SeqCst) {
            return Err(StoreError::InjectedFault); // dropping `txn` aborts it
        }
        txn.commit()?;
        Ok(report)
    }

    /// Reconciles one school with its complete snapshot (contract §3) in
    /// ONE write transaction: every record is applied by the convergence
    /// rule; every live local entity of the school that the snapshot lacks
    /// and whose timestamp is not after `asOf` is deleted; newer ones stay.
    /// With `dry_run` the same work is done and then rolled back, so the
    /// report is exactly what a real run would change.
    pub fn reconcile(
        &self,
        snapshot: &crate::domain::SchoolSnapshot,
        now: Timestamp,
        source: SyncSource,
        dry_run: bool,
    ) -> Result<ReconcileReport> {
        let mut reports =
            self.reconcile_many(std::slice::from_ref(snapshot), now, source, dry_run)?;
        Ok(reports.pop().expect("one report per snapshot"))
    }

    /// [`Store::reconcile`] for several validated schools in one write
    /// transaction (each school still all or nothing): an import writes far
    /// fewer pages this way than with a transaction per school.
    pub fn reconcile_many(
        &self,
        snapshots: &[crate::domain::SchoolSnapshot],
        now: Timestamp,
        source: SyncSource,
        dry_run: bool,
    ) -> Result<Vec<ReconcileReport>> {
        let result = self.reconcile_many_txn(snapshots, now, source, dry_run);
        self.settle(now, result, !dry_run)
    }

    fn reconcile_many_txn(
        &self,
        snapshots: &[crate::domain::SchoolSnapshot],
        now: Timestamp,
        source: SyncSource,
        dry_run: bool,
    ) -> Result<Vec<ReconcileReport>> {
        let txn = self.begin_write()?;
        let reports = WriteTables::open(&txn)?.reconcile(snapshots, now, source, dry_run)?;
        if dry_run {
            txn.abort()?;
            return Ok(reports);
        }
        let (applied, deleted) = reports
            .iter()
            .fold((0, 0), |(a, d), r| (a + r.applied, d + r.deleted));
        add_counters(
            &txn,
            &[
                (counter::RESYNC_APPLIED, applied),
                (counter::RESYNC_DELETED, deleted),
            ],
        )?;
        if let Some(as_of) = snapshots.iter().map(|s| s.as_of).max() {
            raise_watermark(&txn, as_of)?;
        }
        txn.commit()?;
        Ok(reports)
    }

    /// Removes tombstones older than `retention_nanos` at `now`; returns how
    /// many went.
    pub fn purge_tombstones(&self, now: Timestamp, retention_nanos: i64) -> Result<u64> {
        let result = self.purge_tombstones_txn(now, retention_nanos);
        self.settle(now, result, true)
    }

    fn purge_tombstones_txn(&self, now: Timestamp, retention_nanos: i64) -> Result<u64> {
        let txn = self.begin_write()?;
        let mut purged = 0u64;
        let mut classes = Vec::new();
        {
            let mut table = txn.open_table(TOMBSTONES)?;
            let mut corrupt = None;
            table.retain(|(kind, id), v| match decode::<Tombstone>(v) {
                Ok(t) if t.expired(now, retention_nanos) => {
                    purged += 1;
                    if kind == EntityKind::Class.code() {
                        classes.push(id);
                    }
                    false
                }
                Ok(_) => true,
                Err(e) => {
                    corrupt = Some(e);
                    true
                }
            })?;
            if let Some(e) = corrupt {
                return Err(e);
            }
        }
        // A class without a tombstone is "not replicated" again: its
        // assignments reappear in their teachers' documents.
        let mut tables = WriteTables::open(&txn)?;
        for class in classes {
            tables.invalidate_class(class)?;
        }
        drop(tables);
        add_counters(&txn, &[(counter::TOMBSTONES_PURGED, purged)])?;
        txn.commit()?;
        Ok(purged)
    }
}

impl Store {
    /// Renders up to `limit` queued teacher documents in one write
    /// transaction; returns how many it took from the queue (0: none
    /// left). The node's `docs` worker calls it after every change.
    pub fn materialize(&self, limit: usize, now: Timestamp) -> Result<usize> {
        let result = self.materialize_txn(limit);
        // Only a rendering that wrote proves the store writable again.
        let wrote = result.as_ref().is_ok_and(|n| *n > 0);
        self.settle(now, result, wrote)
    }

    fn materialize_txn(&self, limit: usize) -> Result<usize> {
        let txn = self.begin_write()?;
        let n = {
            let mut pending = txn.open_table(PENDING_DOCS)?;
            let ids = pending
                .iter()?
                .take(limit)
                .map(|e| e.map(|(k, _)| k.value()))
                .collect::<Result<Vec<Id>, _>>()?;
            let teachers = txn.open_table(TEACHERS)?;
            let by_teacher = txn.open_table(ASSIGNMENT_BY_TEACHER)?;
            let classes = txn.open_table(CLASSES)?;
            let tombstones = txn.open_table(TOMBSTONES)?;
            let mut docs = txn.open_table(TEACHER_DOCS)?;
            for &id in &ids {
                pending.remove(id)?;
                if let Some(detail) = assemble(&teachers, &by_teacher, &classes, &tombstones, id)? {
                    docs.insert(id, crate::domain::detail::render(&detail).as_slice())?;
                }
            }
            ids.len()
        };
        if n == 0 {
            txn.abort()?;
        } else {
            txn.commit()?;
        }
        Ok(n)
    }
}

/// Format 1 → 2: the class → assignments index and the rendered teacher
/// documents are new. Builds the index and queues every teacher, in one
/// transaction.
fn migrate_from_1(db: &Database, path: &Path) -> Result<()> {
    tracing::info!(path = %path.display(), "upgrading the store from format 1 to 2");
    let txn = db.begin_write()?;
    {
        let assignments = txn.open_table(ASSIGNMENTS)?;
        let mut by_class = txn.open_table(ASSIGNMENT_BY_CLASS)?;
        for entry in assignments.iter()? {
            let (id, value) = entry?;
            if let Entity::Assignment(a) = decode::<Record<Entity>>(value.value())?.data {
                by_class.insert((a.class_id.as_u128(), id.value()), a.teacher_id.as_u128())?;
            }
        }
        let teachers = txn.open_table(TEACHERS)?;
        let mut pending = txn.open_table(PENDING_DOCS)?;
        for entry in teachers.iter()? {
            pending.insert(entry?.0.value(), ())?;
        }
        txn.open_table(TEACHER_DOCS)?;
        txn.open_table(META)?
            .insert(META_FORMAT, FORMAT_VERSION.to_le_bytes().as_slice())?;
    }
    txn.commit()?;
    Ok(())
}

/// Assembles one teacher's detail from the records (in a read or a write
/// transaction).
fn assemble(
    teachers: &impl ReadableTable<Id, &'static [u8]>,
    by_teacher: &impl ReadableTable<(Id, Id), &'static [u8]>,
    classes: &impl ReadableTable<Id, &'static [u8]>,
    tombstones: &impl ReadableTable<(u8, Id), &'static [u8]>,
    id: Id,
) -> Result<Option<TeacherDetail>> {
    let teacher = teachers
        .get(id)?
        .map(|v| decode::<Record<Entity>>(v.value()))
        .transpose()?
        .and_then(|r| {
            narrow(r, |e| match e {
                Entity::Teacher(t) => Some(t),
                _ => None,
            })
        });
    let Some(teacher) = teacher else {
        return Ok(None);
    };
    let mut found = Vec::new();
    for entry in by_teacher.range((id, 0)..=(id, Id::MAX))? {
        let (key, value) = entry?;
        let record: Record<Entity> = decode(value.value())?;
        let Some(assignment) = narrow(record, |e| match e {
            Entity::Assignment(a) => Some(a),
            _ => None,
        }) else {
            return Err(StoreError::Corrupt(format!(
                "assignment index entry {:?} holds another kind",
                key.value()
            )));
        };
        let class_id = assignment.data.class_id.as_u128();
        let class = match classes.get(class_id)? {
            Some(v) => narrow(decode(v.value())?, |e| match e {
                Entity::Class(c) => Some(c),
                _ => None,
            })
            .map_or(ClassLookup::Unknown, ClassLookup::Live),
            None => {
                if tombstones
                    .get((EntityKind::Class.code(), class_id))?
                    .is_some()
                {
                    ClassLookup::Deleted
                } else {
                    ClassLookup::Unknown
                }
            }
        };
        found.push((assignment, class));
    }
    Ok(Some(assemble_teacher_detail(teacher, found)))
}

/// The store format version of a file, `None` for a new (empty) redb file.
/// Refuses files of a newer format and redb files of other programs.
fn check_format(txn: &ReadTransaction, path: &Path) -> Result<Option<u32>> {
    let found = match txn.open_table(META) {
        Ok(meta) => match meta.get(META_FORMAT)? {
            Some(v) => read_u32(v.value())?,
            None => return Err(StoreError::Foreign { path: path.into() }),
        },
        Err(redb::TableError::TableDoesNotExist(_)) => {
            if txn.list_tables()?.next().is_some() {
                return Err(StoreError::Foreign { path: path.into() });
            }
            return Ok(None);
        }
        Err(e) => return Err(e.into()),
    };
    if found > FORMAT_VERSION {
        return Err(StoreError::NewerFormat {
            path: path.into(),
            found,
            supported: FORMAT_VERSION,
        });
    }
    Ok(Some(found))
}

fn read_u32(bytes: &[u8]) -> Result<u32> {
    bytes
        .try_into()
        .map(u32::from_le_bytes)
        .map_err(|_| StoreError::Corrupt("format version is not 4 bytes".into()))
}

fn add_counters(txn: &WriteTransaction, deltas: &[(&str, u64)]) -> Result<()> {
    let mut table = txn.open_table(COUNTERS)?;
    for &(name, delta) in deltas {
        if delta > 0 {
            let old = table.get(name)?.map_or(0, |v| v.value());
            table.insert(name, old + delta)?;
        }
    }
    Ok(())
}

fn raise_watermark(txn: &WriteTransaction, t: Timestamp) -> Result<()> {
    let mut meta = txn.open_table(META)?;
    let old = meta
        .get(META_WATERMARK)?
        .and_then(|v| v.value().try_into().ok().map(i64::from_le_bytes));
    if old.is_none_or(|old| t > old) {
        meta.insert(META_WATERMARK, t.to_le_bytes().as_slice())?;
    }
    Ok(())
}

/// What is stored for one entity, as [`WriteTables::prior`] finds it.
struct Prior {
    live: Option<Record<Entity>>,
    key: Option<OrderKey>,
}

/// The tables a write transaction changes, opened once per batch.
struct WriteTables<'t> {
    entities: [Table<'t, Id, &'static [u8]>; 3],
    tombstones: Table<'t, (u8, Id), &'static [u8]>,
    by_school: Vec<Table<'t, (Id, Id), ()>>,
    by_teacher: Table<'t, (Id, Id), &'static [u8]>,
    by_class: Table<'t, (Id, Id), Id>,
    docs: Table<'t, Id, &'static [u8]>,
    pending: Table<'t, Id, ()>,
    /// Teachers whose document this transaction already invalidated.
    invalidated: std::collections::HashSet<Id>,
}

impl<'t> WriteTables<'t> {
    fn open(txn: &'t WriteTransaction) -> Result<Self> {
        Ok(WriteTables {
            entities: [
                txn.open_table(CLASSES)?,
                txn.open_table(TEACHERS)?,
                txn.open_table(ASSIGNMENTS)?,
            ],
            tombstones: txn.open_table(TOMBSTONES)?,
            by_school: INDEXES
                .iter()
                .map(|d| txn.open_table(*d))
                .collect::<Result<_, _>>()?,
            by_teacher: txn.open_table(ASSIGNMENT_BY_TEACHER)?,
            by_class: txn.open_table(ASSIGNMENT_BY_CLASS)?,
            docs: txn.open_table(TEACHER_DOCS)?,
            pending: txn.open_table(PENDING_DOCS)?,
            invalidated: Default::default(),
        })
    }

    /// The teacher's rendered document is out of date: drop it and queue
    /// the teacher for [`Store::materialize`].
    fn invalidate(&mut self, teacher: Id) -> Result<()> {
        if self.invalidated.insert(teacher) {
            self.docs.remove(teacher)?;
            self.pending.insert(teacher, ())?;
        }
        Ok(())
    }

    /// A class changed (or lost its tombstone): every teacher with an
    /// assignment to it shows it.
    fn invalidate_class(&mut self, class: Id) -> Result<()> {
        let teachers = self
            .by_class
            .range((class, 0)..=(class, Id::MAX))?
            .map(|e| e.map(|(_, teacher)| teacher.value()))
            .collect::<Result<Vec<Id>, _>>()?;
        for t in teachers {
            self.invalidate(t)?;
        }
        Ok(())
    }

    /// Reconciles schools inside an open write transaction: first every
    /// record of every school in key order (neighbouring inserts share
    /// B-tree pages), then per school the deletion of what its snapshot
    /// lacks.
    fn reconcile(
        &mut self,
        snapshots: &[crate::domain::SchoolSnapshot],
        now: Timestamp,
        source: SyncSource,
        dry_run: bool,
    ) -> Result<Vec<ReconcileReport>> {
        let mut reports: Vec<ReconcileReport> = snapshots
            .iter()
            .map(|s| ReconcileReport {
                school_id: s.school_id,
                records: s.records.len() as u64,
                applied: 0,
                deleted: 0,
                drift: EntityKind::ALL
                    .iter()
                    .map(|k| (k.as_str(), Drift::default()))
                    .collect(),
                dry_run,
            })
            .collect();
        let mut seen = vec![std::collections::HashSet::new(); snapshots.len()];
        let mut order: Vec<(usize, &(OrderKey, Entity))> = snapshots
            .iter()
            .enumerate()
            .flat_map(|(i, s)| s.records.iter().map(move |r| (i, r)))
            .collect();
        order.sort_unstable_by_key(|(_, (_, e))| (e.kind(), e.id()));
        for (i, (key, entity)) in order {
            let (kind, id) = (entity.kind(), entity.id().as_u128());
            seen[i].insert((kind, id));
            let report = &mut reports[i];
            let drift = report.drift.get_mut(kind.as_str()).expect("every kind");
            let prior = self.prior(kind, id)?;
            match (prior.key, prior.live.is_some()) {
                (None, _) => drift.missing += 1,
                // A snapshot without eventIds (central's) describes the same
                // version as the event applied here when all else is equal.
                (Some(k), true)
                    if key.event_id.is_nil()
                        && (k.version, k.timestamp, k.delete)
                            == (key.version, key.timestamp, key.delete) =>
                {
                    drift.same += 1
                }
                (Some(k), live) => match k.cmp(key) {
                    std::cmp::Ordering::Less if live => drift.older += 1,
                    std::cmp::Ordering::Less => drift.missing += 1,
                    std::cmp::Ordering::Greater => drift.newer += 1,
                    std::cmp::Ordering::Equal => drift.same += 1,
                },
            }
            if self.apply_over(prior, key, &Change::Upsert(entity.clone()), now, source)? {
                report.applied += 1;
            }
        }
        for ((snapshot, report), seen) in snapshots.iter().zip(&mut reports).zip(&seen) {
            self.delete_absent(snapshot, seen, report, now, source)?;
        }
        Ok(reports)
    }

    /// Deletes the school's live entities that its snapshot lacks, unless
    /// they are newer than the snapshot's `asOf`.
    fn delete_absent(
        &mut self,
        snapshot: &crate::domain::SchoolSnapshot,
        seen: &std::collections::HashSet<(EntityKind, Id)>,
        report: &mut ReconcileReport,
        now: Timestamp,
        source: SyncSource,
    ) -> Result<()> {
        let school = snapshot.school_id;
        let s = school.as_u128();
        for kind in EntityKind::ALL {
            let local: Vec<Id> = {
                let index = &self.by_school[kind.code() as usize - 1];
                let mut ids = Vec::new();
                for entry in index.range((s, 0)..=(s, Id::MAX))? {
                    let id = entry?.0.value().1;
                    if !seen.contains(&(kind, id)) {
                        ids.push(id);
                    }
                }
                ids
            };
            for id in local {
                let prior = self.prior(kind, id)?;
                let Some(live) = &prior.live else {
                    continue;
                };
                let drift = report.drift.get_mut(kind.as_str()).expect("every kind");
                if live.key.timestamp > snapshot.as_of {
                    drift.newer += 1;
                    continue;
                }
                drift.extra += 1;
                // Outranks the live record (same version, a time not before
                // it, a delete); a later change outranks it.
                let key = OrderKey {
                    version: live.key.version,
                    timestamp: snapshot.as_of,
                    delete: true,
                    event_id: Uuid::nil(),
                };
                let change = Change::Delete {
                    kind,
                    id: Uuid::from_u128(id),
                    school_id: school,
                };
                if self.apply_over(prior, &key, &change, now, source)? {
                    report.deleted += 1;
                }
            }
        }
        Ok(())
    }

    /// What is stored for an entity: its live record, and the order key the
    /// convergence rule compares against (the live record's, else its
    /// tombstone's).
    fn prior(&self, kind: EntityKind, id: Id) -> Result<Prior> {
        let entities = &self.entities[kind.code() as usize - 1];
        let live: Option<Record<Entity>> =
            entities.get(id)?.map(|v| decode(v.value())).transpose()?;
        let key = match &live {
            Some(r) => Some(r.key),
            None => {
                let tomb = self.tombstones.get((kind.code(), id))?;
                tomb.map(|v| decode::<Tombstone>(v.value()))
                    .transpose()?
                    .map(|t| t.key)
            }
        };
        Ok(Prior { live, key })
    }

    /// Applies one change if the convergence rule lets it; returns whether
    /// it did.
    fn apply(
        &mut self,
        key: &OrderKey,
        change: &Change,
        now: Timestamp,
        source: SyncSource,
    ) -> Result<bool> {
        let prior = self.prior(change.kind(), change.id().as_u128())?;
        self.apply_over(prior, key, change, now, source)
    }

    /// [`WriteTables::apply`] with what is stored already looked up.
    fn apply_over(
        &mut self,
        Prior {
            live,
            key: stored_key,
        }: Prior,
        key: &OrderKey,
        change: &Change,
        now: Timestamp,
        source: SyncSource,
    ) -> Result<bool> {
        let kind = change.kind();
        let id = change.id().as_u128();
        let entities = &mut self.entities[kind.code() as usize - 1];
        if !key.supersedes(stored_key.as_ref()) {
            return Ok(false);
        }
        // The teachers (old and new) whose documents an assignment change
        // touches.
        let mut stale_docs: Vec<Id> = Vec::new();
        if let Some(old) = &live {
            self.by_school[kind.code() as usize - 1]
                .remove((old.data.school_id().as_u128(), id))?;
            if let Entity::Assignment(a) = &old.data {
                self.by_teacher.remove((a.teacher_id.as_u128(), id))?;
                self.by_class.remove((a.class_id.as_u128(), id))?;
                stale_docs.push(a.teacher_id.as_u128());
            }
        }
        match change {
            Change::Upsert(entity) => {
                let record = Record {
                    data: entity.clone(),
                    key: *key,
                    last_synced_at: now,
                    source,
                };
                let value = encode(&record);
                entities.insert(id, value.as_slice())?;
                if live.is_none() {
                    self.tombstones.remove((kind.code(), id))?;
                }
                self.by_school[kind.code() as usize - 1]
                    .insert((entity.school_id().as_u128(), id), ())?;
                if let Entity::Assignment(a) = entity {
                    self.by_teacher
                        .insert((a.teacher_id.as_u128(), id), value.as_slice())?;
                    self.by_class
                        .insert((a.class_id.as_u128(), id), a.teacher_id.as_u128())?;
                    stale_docs.push(a.teacher_id.as_u128());
                }
            }
            Change::Delete { school_id, .. } => {
                if live.is_some() {
                    entities.remove(id)?;
                }
                let tomb = Tombstone {
                    key: *key,
                    school_id: *school_id,
                    deleted_at: now,
                };
                self.tombstones
                    .insert((kind.code(), id), encode(&tomb).as_slice())?;
            }
        }
        match kind {
            EntityKind::Teacher => self.invalidate(id)?,
            EntityKind::Class => self.invalidate_class(id)?,
            EntityKind::Assignment => {
                for teacher in stale_docs {
                    self.invalidate(teacher)?;
                }
            }
        }
        Ok(true)
    }
}

/// One entity's state as the convergence rule sees it: kind, id, the live
/// data (`None` for a tombstone) and the stored order key.
pub type StateRow = (EntityKind, Uuid, Option<Entity>, OrderKey);

/// One read transaction: every answer it gives is from the same moment.
pub struct Reader {
    txn: ReadTransaction,
    /// Tells a reopen that this transaction of the handle is still in use.
    _token: Arc<()>,
}

fn narrow<T>(record: Record<Entity>, f: impl FnOnce(Entity) -> Option<T>) -> Option<Record<T>> {
    Some(Record {
        data: f(record.data)?,
        key: record.key,
        last_synced_at: record.last_synced_at,
        source: record.source,
    })
}

fn get_entity(table: &ReadOnlyTable<Id, &[u8]>, id: Id) -> Result<Option<Record<Entity>>> {
    table.get(id)?.map(|v| decode(v.value())).transpose()
}

impl Reader {
    fn table(&self, kind: EntityKind) -> Result<ReadOnlyTable<Id, &'static [u8]>> {
        Ok(self.txn.open_table(entity_table(kind))?)
    }

    /// A live entity of any kind.
    pub fn entity(&self, kind: EntityKind, id: Uuid) -> Result<Option<Record<Entity>>> {
        get_entity(&self.table(kind)?, id.as_u128())
    }

    pub fn class(&self, id: Uuid) -> Result<Option<Record<Class>>> {
        Ok(self.entity(EntityKind::Class, id)?.and_then(|r| {
            narrow(r, |e| match e {
                Entity::Class(c) => Some(c),
                _ => None,
            })
        }))
    }

    pub fn teacher(&self, id: Uuid) -> Result<Option<Record<Teacher>>> {
        Ok(self.entity(EntityKind::Teacher, id)?.and_then(|r| {
            narrow(r, |e| match e {
                Entity::Teacher(t) => Some(t),
                _ => None,
            })
        }))
    }

    /// The stored tombstone of an entity, if it is deleted.
    pub fn tombstone(&self, kind: EntityKind, id: Uuid) -> Result<Option<Tombstone>> {
        let table = self.txn.open_table(TOMBSTONES)?;
        let v = table.get((kind.code(), id.as_u128()))?;
        v.map(|v| decode(v.value())).transpose()
    }

    /// The teacher with its live assignments and their classes, assembled
    /// from the records.
    pub fn teacher_detail(&self, id: Uuid) -> Result<Option<TeacherDetail>> {
        assemble(
            &self.txn.open_table(TEACHERS)?,
            &self.txn.open_table(ASSIGNMENT_BY_TEACHER)?,
            &self.txn.open_table(CLASSES)?,
            &self.txn.open_table(TOMBSTONES)?,
            id.as_u128(),
        )
    }

    /// The teacher-detail document (JSON): the rendered one when it is up
    /// to date (one look-up), else rendered now from the records — the
    /// same bytes either way.
    pub fn teacher_detail_body(&self, id: Uuid) -> Result<Option<Vec<u8>>> {
        if let Some(doc) = self.txn.open_table(TEACHER_DOCS)?.get(id.as_u128())? {
            return Ok(Some(doc.value().to_vec()));
        }
        Ok(self
            .teacher_detail(id)?
            .map(|d| crate::domain::detail::render(&d)))
    }

    /// How many teacher documents wait to be rendered.
    pub fn pending_docs(&self) -> Result<u64> {
        Ok(self.txn.open_table(PENDING_DOCS)?.len()?)
    }

    /// A page of a school's classes or teachers, ordered by id, starting
    /// after `after`.
    pub fn page(
        &self,
        kind: EntityKind,
        school: Uuid,
        after: Option<Uuid>,
        limit: usize,
    ) -> Result<Page> {
        let index = self.txn.open_table(school_index(kind))?;
        let entities = self.table(kind)?;
        let s = school.as_u128();
        let start = match after {
            Some(a) => Bound::Excluded((s, a.as_u128())),
            None => Bound::Included((s, 0)),
        };
        let mut items = Vec::with_capacity(limit.min(1024));
        let mut next = None;
        for entry in index.range((start, Bound::Included((s, Id::MAX))))? {
            let (key, _) = entry?;
            let id = key.value().1;
            if items.len() == limit {
                next = items.last().map(|r: &Record<Entity>| r.data.id());
                break;
            }
            let record = get_entity(&entities, id)?.ok_or_else(|| {
                StoreError::Corrupt(format!(
                    "index entry for missing {} {}",
                    kind.as_str(),
                    Uuid::from_u128(id)
                ))
            })?;
            items.push(record);
        }
        Ok(Page { items, next })
    }

    /// Calls `f` with every live record of a school — classes, then
    /// teachers, then assignments — until it breaks. Memory stays flat
    /// however large the school is.
    pub fn for_each_in_school(
        &self,
        school: Uuid,
        mut f: impl FnMut(EntityKind, &Record<Entity>) -> ControlFlow<()>,
    ) -> Result<()> {
        let s = school.as_u128();
        for kind in EntityKind::ALL {
            let index = self.txn.open_table(school_index(kind))?;
            let entities = self.table(kind)?;
            for entry in index.range((s, 0)..=(s, Id::MAX))? {
                let id = entry?.0.value().1;
                if let Some(record) = get_entity(&entities, id)? {
                    if f(kind, &record).is_break() {
                        return Ok(());
                    }
                }
            }
        }
        Ok(())
    }

    /// Writes a school's snapshot (contract §3) line by line into `sink`:
    /// every live record, then the `end` line with the count and, as
    /// `asOf`, the store's watermark (the Unix epoch when it never saw a
    /// change, so that a reader deletes nothing on the strength of it).
    /// Returns the record count, or `None` when `sink` broke off.
    pub fn write_snapshot(
        &self,
        school: Uuid,
        mut sink: impl FnMut(&[u8]) -> ControlFlow<()>,
    ) -> Result<Option<u64>> {
        let mut count = 0u64;
        let mut broke = false;
        self.for_each_in_school(school, |_, record| {
            count += 1;
            let flow = sink(&crate::domain::snapshot::record_line(record));
            broke = flow.is_break();
            flow
        })?;
        if broke {
            return Ok(None);
        }
        let as_of = self.watermark()?.unwrap_or(0);
        match sink(&crate::domain::snapshot::end_line(school, count, as_of)) {
            ControlFlow::Continue(()) => Ok(Some(count)),
            ControlFlow::Break(()) => Ok(None),
        }
    }

    /// The oldest `lastSyncedAt` of each school's live records: how long the
    /// least recently refreshed data of the school has gone unchanged here.
    pub fn oldest_synced(&self, schools: &[Uuid]) -> Result<Vec<(Uuid, Timestamp)>> {
        let mut out = Vec::new();
        for &school in schools {
            let mut oldest: Option<Timestamp> = None;
            self.for_each_in_school(school, |_, r| {
                oldest = Some(oldest.map_or(r.last_synced_at, |o| o.min(r.last_synced_at)));
                ControlFlow::Continue(())
            })?;
            if let Some(t) = oldest {
                out.push((school, t));
            }
        }
        Ok(out)
    }

    /// Every school with a live class, teacher or assignment here.
    pub fn schools(&self) -> Result<Vec<Uuid>> {
        let mut out = std::collections::BTreeSet::new();
        for kind in EntityKind::ALL {
            let index = self.txn.open_table(school_index(kind))?;
            let mut from = 0u128;
            loop {
                let next = index.range((from, 0)..)?.next().transpose()?;
                let Some((key, _)) = next else { break };
                let school = key.value().0;
                out.insert(Uuid::from_u128(school));
                match school.checked_add(1) {
                    Some(n) => from = n,
                    None => break,
                }
            }
        }
        Ok(out.into_iter().collect())
    }

    /// The latest source timestamp the store has seen, if any.
    pub fn watermark(&self) -> Result<Option<Timestamp>> {
        let meta = self.txn.open_table(META)?;
        let v = meta.get(META_WATERMARK)?;
        Ok(v.and_then(|v| v.value().try_into().ok().map(i64::from_le_bytes)))
    }

    pub fn offsets(&self) -> Result<Vec<PartitionOffset>> {
        let table = self.txn.open_table(OFFSETS)?;
        let mut out = Vec::new();
        for entry in table.iter()? {
            let (k, v) = entry?;
            let (topic, partition) = k.value();
            out.push(PartitionOffset {
                topic: topic.to_owned(),
                partition,
                next_offset: v.value(),
            });
        }
        Ok(out)
    }

    /// The newest dead letters first, at most `limit`.
    pub fn dead_letters(&self, limit: usize) -> Result<Vec<DeadLetter>> {
        let table = self.txn.open_table(DEAD_LETTERS)?;
        let mut out = Vec::new();
        for entry in table.iter()?.rev().take(limit) {
            out.push(decode(entry?.1.value())?);
        }
        Ok(out)
    }

    /// Whether the replica holds any entity (live or deleted).
    pub fn has_data(&self) -> Result<bool> {
        for kind in EntityKind::ALL {
            if !self.table(kind)?.is_empty()? {
                return Ok(true);
            }
        }
        Ok(!self.txn.open_table(TOMBSTONES)?.is_empty()?)
    }

    pub fn stats(&self) -> Result<StoreStats> {
        let counters = self.txn.open_table(COUNTERS)?;
        let mut map = BTreeMap::new();
        for entry in counters.iter()? {
            let (k, v) = entry?;
            map.insert(k.value().to_owned(), v.value());
        }
        Ok(StoreStats {
            classes: self.table(EntityKind::Class)?.len()?,
            teachers: self.table(EntityKind::Teacher)?.len()?,
            assignments: self.table(EntityKind::Assignment)?.len()?,
            tombstones: self.txn.open_table(TOMBSTONES)?.len()?,
            dead_letters: self.txn.open_table(DEAD_LETTERS)?.len()?,
            pending_documents: self.pending_docs()?,
            counters: map,
        })
    }

    /// Every live entity and tombstone with its key: the replica's state as
    /// the convergence rule sees it (for tests and drift audits).
    pub fn dump(&self) -> Result<Vec<StateRow>> {
        let mut out = Vec::new();
        for kind in EntityKind::ALL {
            for entry in self.table(kind)?.iter()? {
                let (k, v) = entry?;
                let r: Record<Entity> = decode(v.value())?;
                out.push((kind, Uuid::from_u128(k.value()), Some(r.data), r.key));
            }
        }
        for entry in self.txn.open_table(TOMBSTONES)?.iter()? {
            let (k, v) = entry?;
            let (code, id) = k.value();
            let t: Tombstone = decode(v.value())?;
            let kind = EntityKind::from_code(code)
                .ok_or_else(|| StoreError::Corrupt(format!("unknown entity kind code {code}")))?;
            out.push((kind, Uuid::from_u128(id), None, t.key));
        }
        out.sort_by_key(|(kind, id, _, _)| (*kind, *id));
        Ok(out)
    }
}

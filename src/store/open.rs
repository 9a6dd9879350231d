//! Getting a [`Store`] from a path: refusing a file it must not use before
//! anything writes to it, creating a new store whole under another name,
//! checking the format version and upgrading an older format in place.
//!
//! Every refusal says what is wrong with the file and what to do, and
//! leaves the file byte-for-byte as it was. It deliberately does not deal
//! with a store that is already open: reopening after an I/O error is
//! `reopen.rs` (which uses [`builder`], [`classify`] and [`check_format`]
//! from here, so that both open a file the same way).

use std::path::Path;

use redb::{Database, ReadTransaction, ReadableDatabase, ReadableTable};

use super::schema::{
    create_tables, decode_doc, decode_format_version, decode_record, encode_doc, meta_u64,
    write_format_version, write_store_id, ASSIGNMENTS, ASSIGNMENT_BY_CLASS, ASSIGNMENT_BY_TEACHER,
    ASSIGNMENT_BY_TEACHER_V3, FORMAT_VERSION, META, META_FEED_SEQ, META_FORMAT, PENDING_DOCS,
    TEACHERS, TEACHER_DOCS,
};
use super::{Result, Store, StoreError, StoreOptions};
use crate::domain::Entity;

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

pub(super) fn unusable(path: &Path, reason: impl Into<String>) -> StoreError {
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
pub(super) fn classify(path: &Path, e: redb::DatabaseError) -> StoreError {
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

pub(super) fn builder(options: &StoreOptions) -> redb::Builder {
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
            Some(1) => {
                migrate_from_1(&db, path)?;
                migrate_from_2(&db, path)?;
                migrate_from_3(&db, path)?;
            }
            Some(2) => {
                migrate_from_2(&db, path)?;
                migrate_from_3(&db, path)?;
            }
            Some(3) => migrate_from_3(&db, path)?,
            Some(other) => {
                return Err(StoreError::Corrupt(format!(
                    "unknown store format version {other}"
                )))
            }
            None => {
                let txn = db.begin_write()?;
                write_format_version(&txn, FORMAT_VERSION)?;
                write_store_id(&txn)?;
                create_tables(&txn)?;
                txn.commit()?;
            }
        }
        let head = meta_u64(&db.begin_read()?.open_table(META)?, META_FEED_SEQ)?;
        Ok(Store::new(
            db,
            options.map(|o| (path.to_owned(), o.clone())),
            head,
        ))
    }
}

/// Format 3 → 4: the by-teacher index holds keys only (it held a copy of
/// every assignment record), stored documents are compressed, and new
/// records take the compact encoding (`codec.rs`). Rebuilds the index from
/// `assignments` and compresses every stored document, in one transaction;
/// records stay as they are (both encodings read) until they change. The
/// index and documents shrink to about a fifth, but the pages they held
/// are free only inside the file: a node compacts at start when the free
/// share is above `store.compact_at_free_share`.
///
/// A value that no longer decodes does not stop the upgrade (a running
/// node serves such a store too): a damaged assignment stays out of the
/// index, a damaged document is queued to be rendered again.
fn migrate_from_3(db: &Database, path: &Path) -> Result<()> {
    tracing::info!(path = %path.display(), "upgrading the store from format 3 to 4");
    let txn = db.begin_write()?;
    txn.delete_table(ASSIGNMENT_BY_TEACHER_V3)?;
    {
        let assignments = txn.open_table(ASSIGNMENTS)?;
        let mut by_teacher = txn.open_table(ASSIGNMENT_BY_TEACHER)?;
        for entry in assignments.iter()? {
            let (id, value) = entry?;
            match decode_record(id.value(), value.value()) {
                Ok(record) => {
                    if let Entity::Assignment(a) = record.data {
                        by_teacher.insert((a.teacher_id.as_u128(), id.value()), ())?;
                    }
                }
                // As a running node treats it: the store stays usable, a
                // change to that record is refused (a dead letter), and
                // resync replaces it. Here it stays out of the index.
                Err(StoreError::Corrupt(reason)) => tracing::warn!(
                    path = %path.display(),
                    assignment = %uuid::Uuid::from_u128(id.value()),
                    %reason,
                    "a stored assignment does not decode: left out of the by-teacher index"
                ),
                Err(e) => return Err(e),
            }
        }
        // Rewritten in chunks: a table cannot be written while it is read.
        let mut docs = txn.open_table(TEACHER_DOCS)?;
        let mut pending = txn.open_table(PENDING_DOCS)?;
        let mut after: Option<u128> = None;
        loop {
            // `None`: a document that does not decode, rendered again.
            let chunk: Vec<(u128, Option<Vec<u8>>)> = {
                let range = match after {
                    None => docs.range::<u128>(..)?,
                    Some(a) => {
                        docs.range((std::ops::Bound::Excluded(a), std::ops::Bound::Unbounded))?
                    }
                };
                range
                    .take(10_000)
                    .map(|e| {
                        let (k, v) = e?;
                        Ok((
                            k.value(),
                            match decode_doc(v.value()) {
                                Ok(json) => Some(encode_doc(&json)),
                                Err(StoreError::Corrupt(_)) => None,
                                Err(e) => return Err(e),
                            },
                        ))
                    })
                    .collect::<Result<_>>()?
            };
            let Some(&(last, _)) = chunk.last() else {
                break;
            };
            for (teacher, doc) in chunk {
                match doc {
                    Some(doc) => {
                        docs.insert(teacher, doc.as_slice())?;
                    }
                    None => {
                        tracing::warn!(
                            path = %path.display(),
                            teacher = %uuid::Uuid::from_u128(teacher),
                            "a stored teacher document does not decode: rendered again"
                        );
                        docs.remove(teacher)?;
                        pending.insert(teacher, ())?;
                    }
                }
            }
            after = Some(last);
        }
    }
    write_format_version(&txn, 4)?;
    txn.commit()?;
    Ok(())
}

/// Format 2 → 3: the change log and the store's identity are new. Gives
/// every live entity and every tombstone a position (see
/// [`build_log`](super::feed::build_log)) and the store an id, in one
/// transaction.
fn migrate_from_2(db: &Database, path: &Path) -> Result<()> {
    tracing::info!(path = %path.display(), "upgrading the store from format 2 to 3");
    let txn = db.begin_write()?;
    create_tables(&txn)?;
    let head = super::feed::build_log(&txn)?;
    write_store_id(&txn)?;
    write_format_version(&txn, 3)?;
    txn.commit()?;
    tracing::info!(entries = head, "change log built");
    Ok(())
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
            if let Entity::Assignment(a) = decode_record(id.value(), value.value())?.data {
                by_class.insert((a.class_id.as_u128(), id.value()), a.teacher_id.as_u128())?;
            }
        }
        let teachers = txn.open_table(TEACHERS)?;
        let mut pending = txn.open_table(PENDING_DOCS)?;
        for entry in teachers.iter()? {
            pending.insert(entry?.0.value(), ())?;
        }
        txn.open_table(TEACHER_DOCS)?;
        write_format_version(&txn, 2)?;
    }
    txn.commit()?;
    Ok(())
}

/// The store format version of a file, `None` for a new (empty) redb file.
/// Refuses files of a newer format and redb files of other programs.
pub(super) fn check_format(txn: &ReadTransaction, path: &Path) -> Result<Option<u32>> {
    let found = match txn.open_table(META) {
        Ok(meta) => match meta.get(META_FORMAT)? {
            Some(v) => decode_format_version(v.value())?,
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

//! The layout of a store file: its tables and their keys, the value codec,
//! the format version, and the names kept in `meta` and `counters`.
//!
//! Everything that decides what the bytes on disk look like is here, so
//! that a change of layout is one diff in one file (plus a migration in
//! `open.rs` and a bump of [`FORMAT_VERSION`]). It deliberately holds no
//! logic of its own: it opens no file, applies no change and answers no
//! query.

use redb::{ReadableTable, TableDefinition, WriteTransaction};
use serde::{de::DeserializeOwned, Serialize};

pub(super) use super::codec::{
    decode_doc, decode_entries, decode_record, encode_doc, encode_entries, encode_record,
    record_school_synced,
};
use super::{Result, StoreError};
use crate::domain::{EntityKind, Timestamp};

/// The layout of tables and keys. Bump it (and add a migration in
/// `open.rs`) when a release changes them.
pub const FORMAT_VERSION: u32 = 4;
/// First byte of every encoded value: how the rest is encoded.
const VALUE_FORMAT: u8 = 1;

pub(super) type Id = u128;
pub(super) const CLASSES: TableDefinition<Id, &[u8]> = TableDefinition::new("classes");
pub(super) const TEACHERS: TableDefinition<Id, &[u8]> = TableDefinition::new("teachers");
pub(super) const ASSIGNMENTS: TableDefinition<Id, &[u8]> = TableDefinition::new("assignments");
/// (entity kind code, id) → tombstone.
pub(super) const TOMBSTONES: TableDefinition<(u8, Id), &[u8]> = TableDefinition::new("tombstones");
/// Secondary indexes: (owner, entity id) → ().
const CLASS_BY_SCHOOL: TableDefinition<(Id, Id), ()> = TableDefinition::new("class_by_school");
const TEACHER_BY_SCHOOL: TableDefinition<(Id, Id), ()> = TableDefinition::new("teacher_by_school");
const ASSIGNMENT_BY_SCHOOL: TableDefinition<(Id, Id), ()> =
    TableDefinition::new("assignment_by_school");
/// (teacher, assignment) → (): a teacher's assignments, one range scan.
/// Format 3 kept a copy of each assignment's record here (a sixth of the
/// file); documents are stored rendered, so only their rendering and a
/// lookup of a queued teacher read the assignments, one look-up each.
pub(super) const ASSIGNMENT_BY_TEACHER: TableDefinition<(Id, Id), ()> =
    TableDefinition::new("assignment_by_teacher");
/// The same table as format 3 defined it, for the upgrade.
pub(super) const ASSIGNMENT_BY_TEACHER_V3: TableDefinition<(Id, Id), &[u8]> =
    TableDefinition::new("assignment_by_teacher");
/// (class, assignment) → the assignment's teacher: whose documents a change
/// of the class invalidates.
pub(super) const ASSIGNMENT_BY_CLASS: TableDefinition<(Id, Id), Id> =
    TableDefinition::new("assignment_by_class");
/// teacher → the rendered teacher-detail document (JSON compressed, see
/// `codec.rs`), so that a lookup is one read. A change to the teacher, one of its assignments or one of
/// their classes removes the document and queues the teacher in
/// `pending_docs` in the same transaction; `Store::materialize` renders
/// it again. Until then a read assembles the document from the records, so
/// answers never lag behind the data.
pub(super) const TEACHER_DOCS: TableDefinition<Id, &[u8]> = TableDefinition::new("teacher_docs");
/// teacher → (): documents to render.
pub(super) const PENDING_DOCS: TableDefinition<Id, ()> = TableDefinition::new("pending_docs");
/// (topic, partition) → next offset to consume.
pub(super) const OFFSETS: TableDefinition<(&str, i32), i64> = TableDefinition::new("offsets");
/// sequence number → dead letter.
pub(super) const DEAD_LETTERS: TableDefinition<u64, &[u8]> = TableDefinition::new("dead_letters");
/// The change log (contract §6): (school, position) → (entity kind code,
/// id). Every applied change takes the next position of the store's
/// sequence (`meta` `feed_seq`) in its write transaction, and is entered
/// under the entity's school and, if that changed, its previous one; its
/// older entries under those schools go. So "changes of schools S after
/// position p" is one range scan per school, and the log holds each entity
/// about once (plus one entry per school it has left), not its history.
pub(super) const FEED_LOG: TableDefinition<(Id, u64), (u8, Id)> = TableDefinition::new("feed_log");
/// (entity kind code, id) → the entity's entries in `feed_log`, as an
/// encoded `Vec<(school, position)>`, so that a change finds the entries
/// it replaces and a tombstone purge the ones it drops.
pub(super) const FEED_ENTRIES: TableDefinition<(u8, Id), &[u8]> =
    TableDefinition::new("feed_entries");
/// counter name → value; written in the same transaction as the data.
pub(super) const COUNTERS: TableDefinition<&str, u64> = TableDefinition::new("counters");
/// name → value: `format_version`, `watermark`, …
pub(super) const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");

pub(super) const META_FORMAT: &str = "format_version";
/// The latest source timestamp this store has seen (event or snapshot):
/// the `asOf` of snapshots it serves.
pub(super) const META_WATERMARK: &str = "watermark";
/// The store's identity: 16 random bytes, made with the store (or by the
/// upgrade to format 3). A feed cursor carries it, so that a cursor of
/// another store (the parent was rebuilt) is recognised.
pub(super) const META_STORE_ID: &str = "store_id";
/// The last position the change log gave out (u64 LE; absent: 0).
pub(super) const META_FEED_SEQ: &str = "feed_seq";
/// The change log is complete above this position (u64 LE; absent: 0):
/// the highest position a tombstone purge dropped.
pub(super) const META_FEED_FLOOR: &str = "feed_floor";
/// The parent's cursor up to which this node applied its feed (text).
pub(super) const META_UPSTREAM_CURSOR: &str = "upstream_cursor";
/// The last resync run's outcome (an encoded `Note`), so that a restart
/// does not forget it. Added without a format change: an older release
/// ignores the key, a store without it has had no resync recorded.
pub(super) const META_LAST_RESYNC: &str = "last_resync";
/// The last time a stored offset fell outside its partition (an encoded
/// `Note`); how often is the counter `offset_out_of_range`.
pub(super) const META_OFFSET_OUT_OF_RANGE: &str = "offset_out_of_range";

/// Persistent counters, in the store so that they survive restarts and
/// move exactly with the data.
pub mod counter {
    pub const APPLIED: &str = "events_applied";
    pub const STALE: &str = "events_stale";
    /// Events of schools not served that removed nothing here.
    pub const SKIPPED: &str = "events_skipped";
    /// Events of schools not served that removed an entity held here (the
    /// transfer rule).
    pub const TRANSFERRED_OUT: &str = "events_transferred_out";
    pub const DEAD_LETTERED: &str = "events_dead_lettered";
    pub const TOMBSTONES_PURGED: &str = "tombstones_purged";
    pub const RESYNC_APPLIED: &str = "resync_applied";
    pub const RESYNC_DELETED: &str = "resync_deleted";
    /// Lines of a parent's change feed, by what they did here.
    pub const FEED_APPLIED: &str = "feed_applied";
    pub const FEED_STALE: &str = "feed_stale";
    pub const FEED_SKIPPED: &str = "feed_skipped";
    pub const FEED_TRANSFERRED_OUT: &str = "feed_transferred_out";
    /// Partitions found reading outside what Kafka still holds (events
    /// lost to retention, or a recreated topic).
    pub const OFFSET_OUT_OF_RANGE: &str = "offset_out_of_range";
    /// Dead letters dropped by their retention (count or age).
    pub const DEAD_LETTERS_DROPPED: &str = "dead_letters_dropped";
}

pub(super) fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    let mut out = vec![VALUE_FORMAT];
    bincode::serde::encode_into_std_write(value, &mut out, bincode::config::standard())
        .expect("encoding into a Vec cannot fail");
    out
}

pub(super) fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T> {
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

pub(super) fn entity_table(kind: EntityKind) -> TableDefinition<'static, Id, &'static [u8]> {
    match kind {
        EntityKind::Class => CLASSES,
        EntityKind::Teacher => TEACHERS,
        EntityKind::Assignment => ASSIGNMENTS,
    }
}

/// The by-school indexes, by [`kind_slot`].
pub(super) const INDEXES: [TableDefinition<(Id, Id), ()>; 3] =
    [CLASS_BY_SCHOOL, TEACHER_BY_SCHOOL, ASSIGNMENT_BY_SCHOOL];

/// The by-school index of a kind.
pub(super) fn school_index(kind: EntityKind) -> TableDefinition<'static, (Id, Id), ()> {
    INDEXES[kind_slot(kind)]
}

/// Where a kind's table sits in per-kind arrays ([`INDEXES`],
/// `WriteTables::entities`).
pub(super) fn kind_slot(kind: EntityKind) -> usize {
    kind.code() as usize - 1
}

/// Creates every table but `meta`, so that readers never meet a missing one.
pub(super) fn create_tables(txn: &WriteTransaction) -> Result<()> {
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
    txn.open_table(FEED_LOG)?;
    txn.open_table(FEED_ENTRIES)?;
    Ok(())
}

/// Records that the file has the layout of format `version`.
pub(super) fn write_format_version(txn: &WriteTransaction, version: u32) -> Result<()> {
    txn.open_table(META)?
        .insert(META_FORMAT, version.to_le_bytes().as_slice())?;
    Ok(())
}

/// Gives a new (or newly upgraded) store its identity.
pub(super) fn write_store_id(txn: &WriteTransaction) -> Result<()> {
    txn.open_table(META)?
        .insert(META_STORE_ID, uuid::Uuid::new_v4().as_bytes().as_slice())?;
    Ok(())
}

/// A u64 kept in `meta` (absent: 0).
pub(super) fn meta_u64(
    meta: &impl ReadableTable<&'static str, &'static [u8]>,
    name: &str,
) -> Result<u64> {
    match meta.get(name)? {
        None => Ok(0),
        Some(v) => v
            .value()
            .try_into()
            .map(u64::from_le_bytes)
            .map_err(|_| StoreError::Corrupt(format!("meta {name} is not 8 bytes"))),
    }
}

/// A stored format version.
pub(super) fn decode_format_version(bytes: &[u8]) -> Result<u32> {
    bytes
        .try_into()
        .map(u32::from_le_bytes)
        .map_err(|_| StoreError::Corrupt("format version is not 4 bytes".into()))
}

/// The stored watermark; `None` when it is not 8 bytes.
pub(super) fn decode_watermark(bytes: &[u8]) -> Option<Timestamp> {
    bytes.try_into().ok().map(i64::from_le_bytes)
}

//! The change log behind the change feed (contract §6): positions given
//! to applied changes, indexed by school, read back as pages of entity
//! states after a cursor.
//!
//! Writing: [`LogWriter`] is opened by every writer that applies changes
//! (through `WriteTables`); each applied change takes the next position of
//! the store's sequence and is entered under the entity's school and its
//! previous school, replacing its older entries there, in the writer's
//! transaction. A tombstone purge drops the purged entities' entries and
//! raises the floor. Reading: [`Reader::changes`] merges the per-school
//! range scans in position order and looks up each entity's current state.
//! This file decides nothing about when a change applies (that is the
//! convergence rule in `tables.rs`) and nothing about HTTP.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashSet};
use std::ops::Bound;

use redb::{ReadableTable, Table, WriteTransaction};
use uuid::Uuid;

use super::read::Reader;
use super::schema::{
    decode, decode_entries, decode_record, encode_entries, entity_table, meta_u64, Id,
    FEED_ENTRIES, FEED_LOG, META, META_FEED_FLOOR, META_FEED_SEQ, META_STORE_ID,
    META_UPSTREAM_CURSOR, TOMBSTONES,
};
use super::{Result, StoreError};
use crate::domain::feed::delete_line;
use crate::domain::snapshot::record_line;
use crate::domain::{Cursor, Entity, EntityKind, OrderKey, Record, Tombstone};

/// Why a page of the feed cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum FeedError {
    /// The cursor cannot continue here (another store, or changes after it
    /// were purged): the client must start again from a snapshot (`409`).
    #[error("the cursor has expired: {why}")]
    Expired { why: String },
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<redb::StorageError> for FeedError {
    fn from(e: redb::StorageError) -> Self {
        FeedError::Store(e.into())
    }
}

impl From<redb::TableError> for FeedError {
    fn from(e: redb::TableError) -> Self {
        FeedError::Store(e.into())
    }
}

/// An entity's state as the feed shows it: the line it is sent as.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FeedState {
    /// Live here: sent as a snapshot record line.
    Live(Record<Entity>),
    /// Deleted here (a tombstone): sent as a delete line.
    Deleted {
        kind: EntityKind,
        id: Uuid,
        school_id: Uuid,
        key: OrderKey,
    },
}

/// One entity in a page of the feed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FeedItem {
    /// Its position in this store's log (its latest change).
    pub seq: u64,
    pub state: FeedState,
}

impl FeedItem {
    pub fn kind(&self) -> EntityKind {
        match &self.state {
            FeedState::Live(r) => r.data.kind(),
            FeedState::Deleted { kind, .. } => *kind,
        }
    }

    pub fn id(&self) -> Uuid {
        match &self.state {
            FeedState::Live(r) => r.data.id(),
            FeedState::Deleted { id, .. } => *id,
        }
    }

    /// The school the entity is in now (or was deleted in, or moved to).
    pub fn school_id(&self) -> Uuid {
        match &self.state {
            FeedState::Live(r) => r.data.school_id(),
            FeedState::Deleted { school_id, .. } => *school_id,
        }
    }

    /// Its change line (contract §6), newline included.
    pub fn line(&self) -> Vec<u8> {
        match &self.state {
            FeedState::Live(record) => record_line(record),
            FeedState::Deleted {
                kind,
                id,
                school_id,
                key,
            } => delete_line(*kind, *id, *school_id, key),
        }
    }
}

/// One page of the feed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChangesPage {
    /// Entities in position order, each at most once.
    pub items: Vec<FeedItem>,
    /// Where the next page starts. With `more`, after the last entry this
    /// page read; without, the head of the log when the page was read
    /// (changes of other schools are skipped over, and nothing later is
    /// missed: a later change takes a higher position).
    pub next: Cursor,
    /// Whether entries of the schools follow (the page is full).
    pub more: bool,
}

/// Where the log stands, for status and tests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FeedInfo {
    pub store_id: Uuid,
    /// The last position given out (0: none yet).
    pub head: u64,
    /// The log is complete above this position.
    pub floor: u64,
}

/// The change-log tables of one write transaction.
pub(super) struct LogWriter<'t> {
    log: Table<'t, (Id, u64), (u8, Id)>,
    entries: Table<'t, (u8, Id), &'static [u8]>,
    /// The last position given out.
    seq: u64,
    /// … when the transaction began.
    began: u64,
    /// The schools whose feed this transaction changed (with repeats).
    touched: Vec<Id>,
}

impl<'t> LogWriter<'t> {
    pub(super) fn open(txn: &'t WriteTransaction) -> Result<Self> {
        let seq = meta_u64(&txn.open_table(META)?, META_FEED_SEQ)?;
        Ok(LogWriter {
            log: txn.open_table(FEED_LOG)?,
            entries: txn.open_table(FEED_ENTRIES)?,
            seq,
            began: seq,
            touched: Vec::new(),
        })
    }

    fn entries_of(&self, kind: EntityKind, id: Id) -> Result<Vec<(Id, u64)>> {
        self.entries
            .get((kind.code(), id))?
            .map_or(Ok(Vec::new()), |v| decode_entries(v.value()))
    }

    /// Enters a change of the entity at the next position under each of
    /// `schools` (its school now and, if different, before), dropping its
    /// older entries under them.
    pub(super) fn record(&mut self, kind: EntityKind, id: Id, schools: &[Id]) -> Result<()> {
        self.seq += 1;
        let seq = self.seq;
        let mut entries = self.entries_of(kind, id)?;
        for &school in schools {
            match entries.iter_mut().find(|(s, _)| *s == school) {
                Some((_, at)) if *at == seq => continue, // named twice
                Some((_, at)) => {
                    self.log.remove((school, *at))?;
                    *at = seq;
                }
                None => entries.push((school, seq)),
            }
            self.log.insert((school, seq), (kind.code(), id))?;
        }
        self.entries
            .insert((kind.code(), id), encode_entries(&entries).as_slice())?;
        self.touched.extend_from_slice(schools);
        Ok(())
    }

    /// Drops every entry of an entity (its tombstone was purged); returns
    /// the highest position dropped.
    pub(super) fn forget(&mut self, kind: EntityKind, id: Id) -> Result<Option<u64>> {
        let entries = self.entries_of(kind, id)?;
        self.entries.remove((kind.code(), id))?;
        for &(school, at) in &entries {
            self.log.remove((school, at))?;
        }
        Ok(entries.iter().map(|&(_, at)| at).max())
    }

    /// The last position given out, if this transaction gave any.
    pub(super) fn advanced(&self) -> Option<u64> {
        (self.seq > self.began).then_some(self.seq)
    }

    /// The schools whose feed this transaction changed, sorted, once each.
    pub(super) fn take_touched(&mut self) -> Vec<Id> {
        let mut schools = std::mem::take(&mut self.touched);
        schools.sort_unstable();
        schools.dedup();
        schools
    }
}

/// Stores the last position given out (after the [`LogWriter`] is closed).
pub(super) fn write_seq(txn: &WriteTransaction, seq: u64) -> Result<()> {
    txn.open_table(META)?
        .insert(META_FEED_SEQ, seq.to_le_bytes().as_slice())?;
    Ok(())
}

/// Raises the floor to `floor` (never lowers it).
pub(super) fn raise_floor(txn: &WriteTransaction, floor: u64) -> Result<()> {
    let mut meta = txn.open_table(META)?;
    if floor > meta_u64(&meta, META_FEED_FLOOR)? {
        meta.insert(META_FEED_FLOOR, floor.to_le_bytes().as_slice())?;
    }
    Ok(())
}

/// Stores the parent's cursor a page of its feed was applied up to.
pub(super) fn write_upstream_cursor(txn: &WriteTransaction, cursor: &Cursor) -> Result<()> {
    txn.open_table(META)?
        .insert(META_UPSTREAM_CURSOR, cursor.to_string().as_bytes())?;
    Ok(())
}

/// Builds the log of a store that has none (the upgrade to format 3):
/// every live entity, then every tombstone, each kind in id order, takes
/// the next position under its school.
/// Streams the tables: memory stays flat however large the store is.
pub(super) fn build_log(txn: &WriteTransaction) -> Result<u64> {
    let mut log = LogWriter::open(txn)?;
    for kind in EntityKind::ALL {
        for entry in txn.open_table(entity_table(kind))?.iter()? {
            let (id, value) = entry?;
            let record = decode_record(id.value(), value.value())?;
            log.record(kind, id.value(), &[record.data.school_id().as_u128()])?;
        }
    }
    for entry in txn.open_table(TOMBSTONES)?.iter()? {
        let (key, value) = entry?;
        let (code, id) = key.value();
        let kind = EntityKind::from_code(code)
            .ok_or_else(|| StoreError::Corrupt(format!("unknown entity kind code {code}")))?;
        let tomb: Tombstone = decode(value.value())?;
        log.record(kind, id, &[tomb.school_id.as_u128()])?;
    }
    let head = log.seq;
    drop(log);
    write_seq(txn, head)?;
    Ok(head)
}

impl Reader {
    /// This store's identity.
    pub fn store_id(&self) -> Result<Uuid> {
        let meta = self.txn.open_table(META)?;
        let v = meta
            .get(META_STORE_ID)?
            .ok_or_else(|| StoreError::Corrupt("the store has no id".into()))?;
        Uuid::from_slice(v.value()).map_err(|_| StoreError::Corrupt("bad store id".into()))
    }

    /// Where the change log stands in this read transaction.
    pub fn feed_info(&self) -> Result<FeedInfo> {
        let meta = self.txn.open_table(META)?;
        Ok(FeedInfo {
            store_id: self.store_id()?,
            head: meta_u64(&meta, META_FEED_SEQ)?,
            floor: meta_u64(&meta, META_FEED_FLOOR)?,
        })
    }

    /// The feed position of this read transaction: a client that holds
    /// everything this transaction shows (a snapshot's records) continues
    /// the feed from it (contract §3, the end line's `cursor`).
    pub fn feed_cursor(&self) -> Result<Cursor> {
        let info = self.feed_info()?;
        Ok(Cursor::at(info.store_id, info.head))
    }

    /// The parent's cursor up to which this node applied its feed.
    pub fn upstream_cursor(&self) -> Result<Option<Cursor>> {
        let meta = self.txn.open_table(META)?;
        let Some(v) = meta.get(META_UPSTREAM_CURSOR)? else {
            return Ok(None);
        };
        let text = std::str::from_utf8(v.value())
            .map_err(|_| StoreError::Corrupt("upstream cursor is not text".into()))?;
        text.parse()
            .map(Some)
            .map_err(|e| StoreError::Corrupt(format!("upstream cursor {text:?}: {e}")))
    }

    /// Whether a client at `cursor` can continue from it here.
    fn check(info: &FeedInfo, cursor: &Cursor) -> Result<(), FeedError> {
        let why = if cursor.store != info.store_id {
            format!(
                "it is from another store ({}), not this one ({}): the serving node's store \
                 was rebuilt or replaced",
                cursor.store.simple(),
                info.store_id.simple()
            )
        } else if cursor.seq > info.head || cursor.horizon > info.head {
            format!(
                "it is ahead of this store's change log (at {}): the store was restored from \
                 an older copy",
                info.head
            )
        } else if cursor.horizon < info.floor {
            format!(
                "changes up to position {} were dropped with purged tombstones, and the \
                 cursor is at {}",
                info.floor, cursor.horizon
            )
        } else {
            return Ok(());
        };
        Err(FeedError::Expired { why })
    }

    /// The changes of `schools` after `after` (from the beginning of the
    /// log without one), at most `limit` entities (at least one), in
    /// position order, each with its current state and at most once; an
    /// entity that left one of the schools appears with its new school or
    /// as a delete. Fails with [`FeedError::Expired`] when `after` cannot
    /// continue here.
    pub fn changes(
        &self,
        schools: &[Uuid],
        after: Option<&Cursor>,
        limit: usize,
    ) -> Result<ChangesPage, FeedError> {
        let info = self.feed_info()?;
        // A client reading from the beginning never held an entity deleted
        // before it began: its horizon is the head when it began.
        let (from, horizon) = match after {
            None => (0, info.head),
            Some(c) => {
                Self::check(&info, c)?;
                (c.seq, c.horizon)
            }
        };
        let log = self.txn.open_table(FEED_LOG)?;
        let mut schools: Vec<Id> = schools.iter().map(|s| s.as_u128()).collect();
        schools.sort_unstable();
        schools.dedup();
        let mut scans = Vec::with_capacity(schools.len());
        // (position, scan, kind code, id), smallest position first.
        let mut heap = BinaryHeap::with_capacity(schools.len());
        for (i, &s) in schools.iter().enumerate() {
            let mut scan =
                log.range((Bound::Excluded((s, from)), Bound::Included((s, u64::MAX))))?;
            if let Some(entry) = scan.next() {
                let (k, v) = entry?;
                let (code, id) = v.value();
                heap.push(Reverse((k.value().1, i, code, id)));
            }
            scans.push(scan);
        }
        let tables = [
            self.txn.open_table(entity_table(EntityKind::Class))?,
            self.txn.open_table(entity_table(EntityKind::Teacher))?,
            self.txn.open_table(entity_table(EntityKind::Assignment))?,
        ];
        let tombstones = self.txn.open_table(TOMBSTONES)?;
        let limit = limit.max(1);
        let mut items: Vec<FeedItem> = Vec::with_capacity(limit.min(1024));
        let mut seen: HashSet<(u8, Id)> = HashSet::new();
        let mut last = from;
        let mut more = false;
        while let Some(&Reverse((seq, i, code, id))) = heap.peek() {
            let duplicate = seen.contains(&(code, id));
            if items.len() == limit && !duplicate {
                more = true;
                break;
            }
            heap.pop();
            if let Some(entry) = scans[i].next() {
                let (k, v) = entry?;
                let (code, id) = v.value();
                heap.push(Reverse((k.value().1, i, code, id)));
            }
            last = seq;
            if duplicate {
                continue;
            }
            seen.insert((code, id));
            let kind = EntityKind::from_code(code)
                .ok_or_else(|| StoreError::Corrupt(format!("unknown entity kind code {code}")))?;
            let slot = super::schema::kind_slot(kind);
            let state = if let Some(v) = tables[slot].get(id)? {
                FeedState::Live(decode_record(id, v.value())?)
            } else if let Some(v) = tombstones.get((code, id))? {
                let t: Tombstone = decode(v.value())?;
                FeedState::Deleted {
                    kind,
                    id: Uuid::from_u128(id),
                    school_id: t.school_id,
                    key: t.key,
                }
            } else {
                return Err(StoreError::Corrupt(format!(
                    "change log entry {seq} for {} {} which is neither live nor deleted",
                    kind.as_str(),
                    Uuid::from_u128(id)
                ))
                .into());
            };
            items.push(FeedItem { seq, state });
        }
        let next = if more {
            Cursor {
                store: info.store_id,
                seq: last,
                horizon: horizon.max(last),
            }
        } else {
            Cursor::at(info.store_id, info.head)
        };
        Ok(ChangesPage { items, next, more })
    }
}

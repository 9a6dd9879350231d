//! The only way data gets out of the store: a [`Reader`], one read
//! transaction, so that every answer it gives is from the same moment.
//!
//! It also holds the assembly of a teacher's detail from the records
//! ([`assemble`]), which `write.rs` uses too when it renders the stored
//! documents, so that a served document and a rendered one are the same
//! bytes. This file deliberately changes nothing: a `Reader` cannot write,
//! and it knows nothing of reopening beyond holding its token.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::{Bound, ControlFlow};
use std::sync::Arc;
use std::time::Duration;

use redb::{
    ReadOnlyTable, ReadTransaction, ReadableDatabase, ReadableTable, ReadableTableMetadata,
};
use serde::Serialize;
use uuid::Uuid;

use super::reopen::REOPEN_WAIT;
use super::schema::{
    decode, decode_doc, decode_record, decode_watermark, entity_table, record_school_synced,
    school_index, Id, ASSIGNMENTS, ASSIGNMENT_BY_TEACHER, CLASSES, COUNTERS, DEAD_LETTERS, META,
    META_LAST_RESYNC, META_OFFSET_OUT_OF_RANGE, META_WATERMARK, OFFSETS, PENDING_DOCS, TEACHERS,
    TEACHER_DOCS, TOMBSTONES,
};
use super::{DeadLetter, Note, PartitionOffset, Result, Store, StoreError};
use crate::domain::{
    assemble_teacher_detail, Class, ClassLookup, Entity, EntityKind, OrderKey, Record,
    SchoolFilter, Teacher, TeacherDetail, Timestamp, Tombstone,
};

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

/// One entity's state as the convergence rule sees it: kind, id, the live
/// data (`None` for a tombstone) and the stored order key.
pub type StateRow = (EntityKind, Uuid, Option<Entity>, OrderKey);

/// One read transaction: every answer it gives is from the same moment.
pub struct Reader {
    pub(super) txn: ReadTransaction,
    /// Tells a reopen that this transaction of the handle is still in use.
    _token: Arc<()>,
    /// Which database of the store's slot it reads.
    generation: u64,
}

impl Store {
    /// The schools a resync run or an export covers: those `given`, else
    /// those `filter` serves, else (serving all) every school the store
    /// knows (see [`SchoolFilter::schools_to_sync`]).
    pub fn schools_to_sync(&self, filter: &SchoolFilter, given: Vec<Uuid>) -> Result<Vec<Uuid>> {
        filter.schools_to_sync(given, || self.read()?.schools())
    }

    /// One consistent view of the store, for a caller that may block
    /// (a worker, the command line, a request on the blocking pool): while
    /// the store is being reopened it waits (at most `REOPEN_WAIT`), and a
    /// handle that a writer's I/O error just poisoned is given up for the
    /// reopened one, once. It never reopens the file itself.
    pub fn read(&self) -> Result<Reader> {
        self.read_within(REOPEN_WAIT)
    }

    /// [`Store::read`] for a caller that must not block (an async task):
    /// [`StoreError::Unavailable`] at once while the store is being
    /// reopened, and the poisoned handle's error as it is
    /// ([`StoreError::is_transient`] tells both apart from real faults).
    pub fn try_read(&self) -> Result<Reader> {
        self.read_within(Duration::ZERO)
    }

    /// Runs `f` on one read transaction, waiting at most `wait` for a
    /// reopen under way (as [`Store::read`] does). When the handle turns out
    /// poisoned while `f` reads (`PreviousIo`: a writer's I/O error; that
    /// writer reopens the file), it waits at most `wait` for the reopened
    /// handle and runs `f` once more on a new transaction; if none comes,
    /// [`StoreError::Unavailable`]. For a caller that may block.
    pub fn read_with<T>(&self, wait: Duration, f: impl Fn(&Reader) -> Result<T>) -> Result<T> {
        let reader = self.read_within(wait)?;
        match f(&reader) {
            Err(e) if e.is_poisoned() => {
                let seen = reader.generation;
                drop(reader); // the reopen waits for open transactions
                if !self.wait_for_newer(seen, wait) {
                    return Err(StoreError::Unavailable(format!(
                        "a read met an I/O error of the store ({e}) and it was not reopened in time"
                    )));
                }
                f(&self.read_within(wait)?)
            }
            other => other,
        }
    }

    /// [`Store::read`], waiting at most `wait` (for a reopen under way, and
    /// for a poisoned handle's reopen).
    pub fn read_within(&self, wait: Duration) -> Result<Reader> {
        let handle = self.reader_db(wait)?;
        match handle.db.begin_read() {
            Ok(txn) => Ok(Reader {
                txn,
                _token: handle.token,
                generation: handle.generation,
            }),
            Err(e) => {
                let e = StoreError::from(e);
                if wait.is_zero() || !e.is_poisoned() {
                    return Err(e);
                }
                let seen = handle.generation;
                drop(handle);
                if !self.wait_for_newer(seen, wait) {
                    return Err(StoreError::Unavailable(format!(
                        "the store met an I/O error ({e}) and was not reopened in time"
                    )));
                }
                let handle = self.reader_db(wait)?;
                Ok(Reader {
                    txn: handle.db.begin_read()?,
                    _token: handle.token,
                    generation: handle.generation,
                })
            }
        }
    }
}

/// The record of one kind of entity, if `f` finds that kind in it.
pub(super) fn narrow<T>(
    record: Record<Entity>,
    f: impl FnOnce(Entity) -> Option<T>,
) -> Option<Record<T>> {
    Some(Record {
        data: f(record.data)?,
        key: record.key,
        last_synced_at: record.last_synced_at,
        source: record.source,
    })
}

fn get_entity(table: &ReadOnlyTable<Id, &[u8]>, id: Id) -> Result<Option<Record<Entity>>> {
    table
        .get(id)?
        .map(|v| decode_record(id, v.value()))
        .transpose()
}

/// The tables a teacher's detail is assembled from: teachers, the
/// by-teacher index, assignments, classes, tombstones.
pub(super) type DetailTables<'a, T, B, A, C, S> = (&'a T, &'a B, &'a A, &'a C, &'a S);

/// Assembles one teacher's detail from the records (in a read or a write
/// transaction).
pub(super) fn assemble<T, B, A, C, S>(
    (teachers, by_teacher, assignments, classes, tombstones): DetailTables<'_, T, B, A, C, S>,
    id: Id,
) -> Result<Option<TeacherDetail>>
where
    T: ReadableTable<Id, &'static [u8]>,
    B: ReadableTable<(Id, Id), ()>,
    A: ReadableTable<Id, &'static [u8]>,
    C: ReadableTable<Id, &'static [u8]>,
    S: ReadableTable<(u8, Id), &'static [u8]>,
{
    let teacher = teachers
        .get(id)?
        .map(|v| decode_record(id, v.value()))
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
        let assignment_id = entry?.0.value().1;
        let record = assignments
            .get(assignment_id)?
            .map(|v| decode_record(assignment_id, v.value()))
            .transpose()?;
        let Some(assignment) = record.and_then(|r| {
            narrow(r, |e| match e {
                Entity::Assignment(a) => Some(a),
                _ => None,
            })
        }) else {
            return Err(StoreError::Corrupt(format!(
                "assignment index entry ({}, {}) without its assignment",
                Uuid::from_u128(id),
                Uuid::from_u128(assignment_id)
            )));
        };
        let class_id = assignment.data.class_id.as_u128();
        let class = match classes.get(class_id)? {
            Some(v) => narrow(decode_record(class_id, v.value())?, |e| match e {
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
            (
                &self.txn.open_table(TEACHERS)?,
                &self.txn.open_table(ASSIGNMENT_BY_TEACHER)?,
                &self.txn.open_table(ASSIGNMENTS)?,
                &self.txn.open_table(CLASSES)?,
                &self.txn.open_table(TOMBSTONES)?,
            ),
            id.as_u128(),
        )
    }

    /// The teacher-detail document (JSON): the rendered one when it is up
    /// to date (one look-up), else rendered now from the records — the
    /// same bytes either way.
    pub fn teacher_detail_body(&self, id: Uuid) -> Result<Option<Vec<u8>>> {
        if let Some(doc) = self.txn.open_table(TEACHER_DOCS)?.get(id.as_u128())? {
            return decode_doc(doc.value()).map(Some);
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
    /// every live record, then the `end` line with the count, as `asOf`
    /// the store's watermark (the Unix epoch when it never saw a change, so
    /// that a reader deletes nothing on the strength of it) and as `cursor`
    /// the change-feed position of this read transaction.
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
        let cursor = self.feed_cursor()?;
        match sink(&crate::domain::snapshot::end_line_at(
            school, count, as_of, &cursor,
        )) {
            ControlFlow::Continue(()) => Ok(Some(count)),
            ControlFlow::Break(()) => Ok(None),
        }
    }

    /// The oldest `lastSyncedAt` of each school's live records: how long the
    /// least recently refreshed data of the school has gone unchanged here.
    ///
    /// One pass over each entity table in key order, reading only each
    /// record's head: every page is read once. (Looking the records up
    /// school by school through the school indexes read the whole store
    /// at random, a page-cache miss and a page buffer per record, which
    /// cost seconds of CPU at province scale and churned redb's cache.)
    pub fn oldest_synced(&self, schools: &[Uuid]) -> Result<Vec<(Uuid, Timestamp)>> {
        let mut oldest: std::collections::HashMap<Uuid, Option<Timestamp>> =
            schools.iter().map(|&s| (s, None)).collect();
        for kind in EntityKind::ALL {
            for entry in self.table(kind)?.iter()? {
                let (id, value) = entry?;
                let (school, synced) = record_school_synced(id.value(), value.value())?;
                if let Some(t) = oldest.get_mut(&school) {
                    *t = Some(t.map_or(synced, |t| t.min(synced)));
                }
            }
        }
        Ok(schools
            .iter()
            .filter_map(|s| oldest[s].map(|t| (*s, t)))
            .collect())
    }

    /// Live classes, teachers and assignments of a school, counted from the
    /// school indexes (keys only, no record is read): a walk over the
    /// school's share of the index, so callers bound how many schools they
    /// ask for per request.
    pub fn school_counts(&self, school: Uuid) -> Result<[u64; 3]> {
        let s = school.as_u128();
        let mut out = [0; 3];
        for (slot, kind) in EntityKind::ALL.into_iter().enumerate() {
            let index = self.txn.open_table(school_index(kind))?;
            let mut n = 0u64;
            for entry in index.range((s, 0)..=(s, Id::MAX))? {
                entry?;
                n += 1;
            }
            out[slot] = n;
        }
        Ok(out)
    }

    /// Every school with a live class, teacher or assignment here.
    pub fn schools(&self) -> Result<Vec<Uuid>> {
        let mut out = BTreeSet::new();
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
        Ok(v.and_then(|v| decode_watermark(v.value())))
    }

    /// The last resync run's outcome, if one was recorded.
    pub fn last_resync(&self) -> Result<Option<Note>> {
        self.note(META_LAST_RESYNC)
    }

    /// The last time a stored offset fell outside its partition, if ever.
    pub fn offset_out_of_range(&self) -> Result<Option<Note>> {
        self.note(META_OFFSET_OUT_OF_RANGE)
    }

    fn note(&self, key: &str) -> Result<Option<Note>> {
        let meta = self.txn.open_table(META)?;
        let v = meta.get(key)?;
        v.map(|v| decode(v.value())).transpose()
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
                let r = decode_record(k.value(), v.value())?;
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

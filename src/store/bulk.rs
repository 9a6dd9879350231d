//! Loading snapshots into an empty store in bulk: what `import` does on a
//! new node, much faster and into a much smaller file than reconciling
//! school by school.
//!
//! When the store holds no entity, reconciling has nothing to compare
//! with: every record is new, nothing is deleted, and each lookup of what
//! is stored finds nothing. [`BulkLoad`] therefore skips the lookups and
//! collects each table's rows in memory, encoded; [`BulkLoad::finish`]
//! sorts them, writes every table in key order, renders every teacher's
//! document from the rows, and commits once. The result is the same store,
//! row for row, as [`Store::reconcile_many`] would make from the same
//! batches — the same change-log positions, counters and watermark — which
//! a test checks (`tests/it/resync.rs`).
//!
//! Why in key order. redb splits a full leaf in half when a key lands in
//! the middle of it, so random keys leave leaves about two thirds full;
//! a key greater than every key in the table instead starts a new leaf
//! and leaves the full one packed. Written in ascending key order, every
//! table's leaves are full: the file is a third smaller than with random
//! inserts, and sequential writes are what a B-tree writes fastest.
//!
//! An entity that comes twice (two schools' snapshots list it, the file
//! holds a school twice) needs the convergence rule: [`BulkLoad::add`]
//! refuses that batch, taking nothing of it, and the caller finishes the
//! bulk load and reconciles the rest normally.

use std::collections::{HashMap, HashSet};

use redb::{Key, Table, TableDefinition, Value, WriteTransaction};

use super::feed::write_seq;
use super::schema::{
    counter, decode_record, encode_doc, encode_entries, encode_record, kind_slot, meta_u64, Id,
    ASSIGNMENT_BY_CLASS, ASSIGNMENT_BY_TEACHER, FEED_ENTRIES, FEED_LOG, INDEXES, META,
    META_FEED_SEQ, TEACHER_DOCS,
};
use super::write::{add_counters, raise_watermark, ReconcileReport};
use super::{Result, Store, StoreError};
use crate::domain::{
    assemble_teacher_detail, ClassLookup, Entity, EntityKind, Record, SchoolSnapshot, SyncSource,
    Timestamp,
};

/// Rows of one table: key, value.
type Rows<K, V> = Vec<(K, V)>;

/// An empty store being filled; see the module documentation.
pub struct BulkLoad<'s> {
    store: &'s Store,
    now: Timestamp,
    source: SyncSource,
    /// The last change-log position given out.
    seq: u64,
    /// … when the bulk load began: the store's must still be this when it
    /// is written, or something else wrote meanwhile.
    began: u64,
    entities: [Rows<Id, Vec<u8>>; 3],
    by_school: [Rows<(Id, Id), ()>; 3],
    by_teacher: Rows<(Id, Id), ()>,
    by_class: Rows<(Id, Id), Id>,
    log: Rows<(Id, u64), (u8, Id)>,
    entries: Rows<(u8, Id), Vec<u8>>,
    seen: HashSet<(u8, Id)>,
    applied: u64,
    watermark: Option<Timestamp>,
}

/// [`BulkLoad::add`] refused a batch: an entity in it was added before,
/// or comes twice in it. Nothing of the batch was taken.
#[derive(Debug)]
pub struct Repeated {
    pub kind: EntityKind,
    pub id: uuid::Uuid,
}

impl Store {
    /// A bulk load of this store, if it holds no entity and no tombstone
    /// (see [`BulkLoad`]); `None` otherwise.
    pub fn bulk_load(&self, now: Timestamp, source: SyncSource) -> Result<Option<BulkLoad<'_>>> {
        let reader = self.read()?;
        if reader.has_data()? {
            return Ok(None);
        }
        let seq = meta_u64(&reader.txn.open_table(META)?, META_FEED_SEQ)?;
        Ok(Some(BulkLoad {
            store: self,
            now,
            source,
            seq,
            began: seq,
            entities: Default::default(),
            by_school: Default::default(),
            by_teacher: Vec::new(),
            by_class: Vec::new(),
            log: Vec::new(),
            entries: Vec::new(),
            seen: HashSet::new(),
            applied: 0,
            watermark: None,
        }))
    }
}

impl BulkLoad<'_> {
    /// Takes a batch of validated schools, as [`Store::reconcile_many`]
    /// would apply them in one transaction (records in (kind, id) order,
    /// which decides their change-log positions), and returns the same
    /// reports. Refuses the whole batch if an entity repeats.
    pub fn add(&mut self, snapshots: &[SchoolSnapshot]) -> Result<Vec<ReconcileReport>, Repeated> {
        let mut order: Vec<(usize, &Entity, &crate::domain::OrderKey)> = snapshots
            .iter()
            .enumerate()
            .flat_map(|(i, s)| s.records.iter().map(move |(k, e)| (i, e, k)))
            .collect();
        order.sort_unstable_by_key(|(_, e, _)| (e.kind(), e.id()));
        for pair in order.windows(2) {
            if (pair[0].1.kind(), pair[0].1.id()) == (pair[1].1.kind(), pair[1].1.id()) {
                return Err(Repeated {
                    kind: pair[0].1.kind(),
                    id: pair[0].1.id(),
                });
            }
        }
        if let Some((_, e, _)) = order
            .iter()
            .find(|(_, e, _)| self.seen.contains(&(e.kind().code(), e.id().as_u128())))
        {
            return Err(Repeated {
                kind: e.kind(),
                id: e.id(),
            });
        }
        let mut reports: Vec<ReconcileReport> = snapshots
            .iter()
            .map(|s| ReconcileReport::start(s, false))
            .collect();
        for (i, entity, key) in order {
            let (kind, id) = (entity.kind(), entity.id().as_u128());
            self.seen.insert((kind.code(), id));
            let report = &mut reports[i];
            report.applied += 1;
            report
                .drift
                .get_mut(kind.as_str())
                .expect("every kind")
                .missing += 1;
            let record = Record {
                data: entity.clone(),
                key: *key,
                last_synced_at: self.now,
                source: self.source,
            };
            let slot = kind_slot(kind);
            self.entities[slot].push((id, encode_record(&record)));
            let school = entity.school_id().as_u128();
            self.by_school[slot].push(((school, id), ()));
            if let Entity::Assignment(a) = entity {
                let teacher = a.teacher_id.as_u128();
                self.by_teacher.push(((teacher, id), ()));
                self.by_class.push(((a.class_id.as_u128(), id), teacher));
            }
            // As `LogWriter::record` enters a first change.
            self.seq += 1;
            self.log.push(((school, self.seq), (kind.code(), id)));
            self.entries
                .push(((kind.code(), id), encode_entries(&[(school, self.seq)])));
        }
        self.applied += reports.iter().map(|r| r.applied).sum::<u64>();
        self.watermark = self.watermark.max(snapshots.iter().map(|s| s.as_of).max());
        Ok(reports)
    }

    /// Records added so far.
    pub fn len(&self) -> u64 {
        self.applied
    }

    /// Whether nothing was added.
    pub fn is_empty(&self) -> bool {
        self.applied == 0
    }

    /// Writes everything added, every teacher's document rendered, in one
    /// write transaction; `progress` is told the rows written so far of
    /// `total` (what [`BulkLoad::rows`] said).
    ///
    /// Fails with [`StoreError::Busy`], writing nothing, if the store took
    /// changes since the bulk load began (a running node's ingest, say):
    /// written over them, the rows would undo newer data and reuse
    /// change-log positions. An import again then reconciles.
    pub fn finish(self, mut progress: impl FnMut(u64)) -> Result<()> {
        let store = self.store;
        let now = self.now;
        let applied = self.applied;
        let written = store.write(
            now,
            move |&w| w && applied > 0,
            move || self.write_all(&mut progress),
        )?;
        if !written && applied > 0 {
            return Err(StoreError::Busy(
                "the store took changes while the import read the file, so its bulk load was not \
                 written (it would have undone them); run the import again: it then reconciles \
                 school by school"
                    .into(),
            ));
        }
        Ok(())
    }

    /// How many rows [`BulkLoad::finish`] writes (documents not counted).
    pub fn rows(&self) -> u64 {
        let n = self.entities.iter().map(Vec::len).sum::<usize>()
            + self.by_school.iter().map(Vec::len).sum::<usize>()
            + self.by_teacher.len()
            + self.by_class.len()
            + self.log.len()
            + self.entries.len();
        n as u64
    }

    /// Whether it holds [`StoreOptions::bulk_load_max_rows`](super::StoreOptions)
    /// rows or more: the caller should finish it and go on the normal way.
    pub fn is_full(&self) -> bool {
        self.rows() >= self.store.bulk_load_max_rows
    }

    /// False when the store changed since the bulk load began (nothing
    /// written).
    fn write_all(&self, progress: &mut dyn FnMut(u64)) -> Result<bool> {
        if self.applied == 0 {
            return Ok(false);
        }
        let txn = self.store.begin_write()?;
        if meta_u64(&txn.open_table(META)?, META_FEED_SEQ)? != self.began {
            return Ok(false); // dropping `txn` aborts it
        }
        let mut written = 0u64;
        let docs = self.render_documents()?;
        for (slot, kind) in EntityKind::ALL.into_iter().enumerate() {
            let mut rows: Vec<(Id, &[u8])> = self.entities[slot]
                .iter()
                .map(|(k, v)| (*k, v.as_slice()))
                .collect();
            rows.sort_unstable_by_key(|r| r.0);
            insert_sorted(
                &txn,
                super::schema::entity_table(kind),
                &rows,
                &mut written,
                progress,
            )?;
            let mut rows = self.by_school[slot].clone();
            rows.sort_unstable_by_key(|r| r.0);
            insert_sorted(&txn, INDEXES[slot], &rows, &mut written, progress)?;
        }
        let mut rows = self.by_teacher.clone();
        rows.sort_unstable_by_key(|r| r.0);
        insert_sorted(&txn, ASSIGNMENT_BY_TEACHER, &rows, &mut written, progress)?;
        let mut rows = self.by_class.clone();
        rows.sort_unstable_by_key(|r| r.0);
        insert_sorted(&txn, ASSIGNMENT_BY_CLASS, &rows, &mut written, progress)?;
        let mut rows = self.log.clone();
        rows.sort_unstable_by_key(|r| r.0);
        insert_sorted(&txn, FEED_LOG, &rows, &mut written, progress)?;
        let mut rows: Vec<((u8, Id), &[u8])> = self
            .entries
            .iter()
            .map(|(k, v)| (*k, v.as_slice()))
            .collect();
        rows.sort_unstable_by_key(|r| r.0);
        insert_sorted(&txn, FEED_ENTRIES, &rows, &mut written, progress)?;
        let rows: Vec<(Id, &[u8])> = docs.iter().map(|(k, v)| (*k, v.as_slice())).collect();
        insert_sorted(&txn, TEACHER_DOCS, &rows, &mut written, progress)?;
        write_seq(&txn, self.seq)?;
        add_counters(&txn, &[(counter::RESYNC_APPLIED, self.applied)])?;
        if let Some(w) = self.watermark {
            raise_watermark(&txn, w)?;
        }
        let mut schools: Vec<Id> = self.log.iter().map(|((school, _), _)| *school).collect();
        schools.sort_unstable();
        schools.dedup();
        txn.commit()?;
        self.store.committed(self.seq, schools);
        Ok(true)
    }

    /// Every teacher's document, in teacher order, rendered from the rows
    /// as `assemble` renders it from the tables (there are no tombstones:
    /// a class not loaded is unknown, not deleted).
    fn render_documents(&self) -> Result<Vec<(Id, Vec<u8>)>> {
        let slot = |k| kind_slot(k);
        let classes: HashMap<Id, &[u8]> = self.entities[slot(EntityKind::Class)]
            .iter()
            .map(|(k, v)| (*k, v.as_slice()))
            .collect();
        let assignments: HashMap<Id, &[u8]> = self.entities[slot(EntityKind::Assignment)]
            .iter()
            .map(|(k, v)| (*k, v.as_slice()))
            .collect();
        let mut by_teacher: Vec<(Id, Id)> = self.by_teacher.iter().map(|(k, ())| *k).collect();
        by_teacher.sort_unstable();
        let mut teachers: Vec<(Id, &[u8])> = self.entities[slot(EntityKind::Teacher)]
            .iter()
            .map(|(k, v)| (*k, v.as_slice()))
            .collect();
        teachers.sort_unstable_by_key(|t| t.0);
        let render = |part: &[(Id, &[u8])]| -> Result<Vec<(Id, Vec<u8>)>> {
            let mut out = Vec::with_capacity(part.len());
            for &(id, value) in part {
                let teacher = match decode_record(id, value)? {
                    Record {
                        data: Entity::Teacher(t),
                        key,
                        last_synced_at,
                        source,
                    } => Record {
                        data: t,
                        key,
                        last_synced_at,
                        source,
                    },
                    _ => continue,
                };
                let from = by_teacher.partition_point(|&(t, _)| t < id);
                let mut found = Vec::new();
                for &(_, assignment_id) in by_teacher[from..].iter().take_while(|(t, _)| *t == id) {
                    let record = decode_record(assignment_id, assignments[&assignment_id])?;
                    let Entity::Assignment(a) = record.data else {
                        continue;
                    };
                    let class_id = a.class_id.as_u128();
                    let class = match classes.get(&class_id) {
                        Some(v) => match decode_record(class_id, v)? {
                            Record {
                                data: Entity::Class(c),
                                key,
                                last_synced_at,
                                source,
                            } => ClassLookup::Live(Record {
                                data: c,
                                key,
                                last_synced_at,
                                source,
                            }),
                            _ => ClassLookup::Unknown,
                        },
                        None => ClassLookup::Unknown,
                    };
                    let assignment = Record {
                        data: a,
                        key: record.key,
                        last_synced_at: record.last_synced_at,
                        source: record.source,
                    };
                    found.push((assignment, class));
                }
                let detail = assemble_teacher_detail(teacher, found);
                out.push((id, encode_doc(&crate::domain::detail::render(&detail))));
            }
            Ok(out)
        };
        // Two cores' worth: rendering and compressing is most of the CPU
        // time of a bulk load.
        let (first, second) = teachers.split_at(teachers.len() / 2);
        let (a, b) = std::thread::scope(|s| {
            let other = s.spawn(|| render(second));
            let mine = render(first);
            (mine, other.join().expect("rendering documents panicked"))
        });
        let mut docs = a?;
        docs.extend(b?);
        Ok(docs)
    }
}

/// Inserts rows sorted by key into an empty table, in that order (see the
/// module documentation).
fn insert_sorted<K, V>(
    txn: &WriteTransaction,
    def: TableDefinition<K, V>,
    rows: &[(K::SelfType<'_>, V::SelfType<'_>)],
    written: &mut u64,
    progress: &mut dyn FnMut(u64),
) -> Result<()>
where
    K: Key + 'static,
    V: Value + 'static,
    for<'a> K::SelfType<'a>: Copy,
    for<'a> V::SelfType<'a>: Copy,
{
    let mut table: Table<K, V> = txn.open_table(def)?;
    for (k, v) in rows {
        table.insert(*k, *v)?;
        *written += 1;
        if written.is_multiple_of(100_000) {
            progress(*written);
        }
    }
    progress(*written);
    Ok(())
}

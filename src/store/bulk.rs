//! Loading snapshots into an empty store in bulk: what `import` does on a
//! new node, much faster and into a much smaller file than reconciling
//! school by school.
//!
//! When the store holds no entity, reconciling has nothing to compare
//! with: every record is new, nothing is deleted, and each lookup of what
//! is stored finds nothing. [`BulkLoad`] therefore skips the lookups and
//! collects each table's rows, encoded; [`BulkLoad::finish`] writes every
//! table in key order, renders every teacher's document on the way, and
//! commits once. The result is the same store, row for row, as
//! [`Store::reconcile_many`] would make from the same batches — the same
//! change-log positions, counters and watermark — which a test checks
//! (`tests/it/resync.rs`).
//!
//! Why in key order. redb splits a full leaf in half when a key lands in
//! the middle of it, so random keys leave leaves about two thirds full;
//! a key greater than every key in the table instead starts a new leaf
//! and leaves the full one packed. Written in ascending key order, every
//! table's leaves are full: the file is a third smaller than with random
//! inserts, and sequential writes are what a B-tree writes fastest.
//!
//! Memory stays bounded by an external sort. Rows are held in memory up to
//! [`StoreOptions::bulk_load_max_rows`](super::StoreOptions) (a province
//! fits); past that every table's rows are sorted and spilled as a run to
//! an unnamed temporary file beside the store, by a thread of its own while
//! the import reads on, and `finish` merges the runs.
//! Only the classes stay in memory throughout (a twelfth of the records),
//! because every document needs its teacher's classes; a teacher's
//! assignments come in the same key order as the teachers, from a copy of
//! their records keyed by (teacher, assignment). Two threads write, each
//! half of the tables; one of them renders the documents.
//!
//! An entity that comes twice (two schools' snapshots list it, the file
//! holds a school twice) needs the convergence rule: [`BulkLoad::add`]
//! refuses that batch, taking nothing of it, and the caller finishes the
//! bulk load and reconciles the rest normally.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::fs::File;
use std::io::{BufReader, BufWriter, Seek, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bincode::{Decode, Encode};
use redb::{Key, Table, Value};
use rustc_hash::{FxHashMap as HashMap, FxHashSet as HashSet};

use super::feed::write_seq;
use super::read::narrow;
use super::schema::{
    counter, decode_record, encode_doc, encode_entries, encode_record, kind_slot, meta_u64, Id,
    ASSIGNMENTS, ASSIGNMENT_BY_CLASS, ASSIGNMENT_BY_TEACHER, CLASSES, FEED_ENTRIES, FEED_LOG,
    INDEXES, META, META_FEED_SEQ, TEACHERS, TEACHER_DOCS,
};
use super::write::{add_counters, raise_watermark, ReconcileReport};
use super::{Result, Store, StoreError};
use crate::domain::{
    assemble_teacher_detail, ClassLookup, Entity, EntityKind, Record, SchoolSnapshot, SyncSource,
    Timestamp,
};

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
    /// Where runs are spilled: the store's directory (the temporary
    /// directory for a store in memory).
    spill_dir: PathBuf,
    classes: HashMap<Id, Vec<u8>>,
    teachers: Sorter<Id, Vec<u8>>,
    assignments: Sorter<Id, Vec<u8>>,
    by_school: [Sorter<(Id, Id), ()>; 3],
    /// (teacher, assignment) → the assignment's record: the by-teacher
    /// index, and what documents are rendered from.
    by_teacher: Sorter<(Id, Id), Vec<u8>>,
    by_class: Sorter<(Id, Id), Id>,
    log: Sorter<(Id, u64), (u8, Id)>,
    /// (kind, id) → (school, change-log position), encoded when written.
    entries: Sorter<(u8, Id), (Id, u64)>,
    schools: HashSet<Id>,
    /// What was added, as fingerprints of (kind, id) ([`fingerprint`]).
    seen: HashSet<u64>,
    /// The thread writing the runs handed over last, if any.
    spilling: Option<std::thread::JoinHandle<std::io::Result<()>>>,
    applied: u64,
    watermark: Option<Timestamp>,
}

/// An entity added to a bulk load, as 64 bits: a quarter of the memory
/// of its (kind, id), and of the cache misses while the set of them grows
/// (12 million at national scale). Two entities may share one: an entity
/// then seems to come twice, and the bulk load ends early, the rest being
/// reconciled, which gives the same store. At national scale that is
/// about one import in 250,000 (12 M² / 2⁶⁵).
fn fingerprint(kind: EntityKind, id: Id) -> u64 {
    xxhash_rust::xxh3::xxh3_64_with_seed(&id.to_le_bytes(), u64::from(kind.code()))
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
        let spill_dir = match &self.file {
            Some((path, _)) => match path.parent() {
                Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
                _ => PathBuf::from("."),
            },
            None => std::env::temp_dir(),
        };
        Ok(Some(BulkLoad {
            store: self,
            now,
            source,
            seq,
            began: seq,
            spill_dir,
            classes: HashMap::default(),
            teachers: Sorter::default(),
            assignments: Sorter::default(),
            by_school: Default::default(),
            by_teacher: Sorter::default(),
            by_class: Sorter::default(),
            log: Sorter::default(),
            entries: Sorter::default(),
            schools: HashSet::default(),
            seen: HashSet::default(),
            spilling: None,
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
            .find(|(_, e, _)| self.seen.contains(&fingerprint(e.kind(), e.id().as_u128())))
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
            self.seen.insert(fingerprint(kind, id));
            let report = &mut reports[i];
            report.applied += 1;
            report
                .drift
                .get_mut(kind.as_str())
                .expect("every kind")
                .missing += 1;
            let record = encode_record(&Record {
                data: entity,
                key: *key,
                last_synced_at: self.now,
                source: self.source,
            });
            let school = entity.school_id().as_u128();
            self.by_school[kind_slot(kind)].push((school, id), ());
            match entity {
                Entity::Class(_) => {
                    self.classes.insert(id, record);
                }
                Entity::Teacher(_) => self.teachers.push(id, record),
                Entity::Assignment(a) => {
                    let teacher = a.teacher_id.as_u128();
                    self.by_teacher.push((teacher, id), record.clone());
                    self.by_class.push((a.class_id.as_u128(), id), teacher);
                    self.assignments.push(id, record);
                }
            }
            // As `LogWriter::record` enters a first change.
            self.seq += 1;
            self.log.push((school, self.seq), (kind.code(), id));
            self.entries.push((kind.code(), id), (school, self.seq));
            self.schools.insert(school);
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

    /// Once the rows held in memory reach
    /// [`StoreOptions::bulk_load_max_rows`](super::StoreOptions), hands
    /// every table's to a thread that sorts them and writes them to a
    /// temporary file, while the import goes on reading; true if it did.
    /// The runs handed over before are waited for first, so at most one
    /// set is being written: memory holds the rows of the limit twice, those
    /// being collected and those being written (which a thread writes
    /// faster than the file is read; their memory is kept for the next set).
    pub fn spill_if_full(&mut self) -> Result<bool> {
        if self.sorters().map(|s| s.in_memory()).sum::<u64>() < self.store.bulk_load_max_rows {
            return Ok(false);
        }
        self.spilled()?;
        let dir = self.spill_dir.clone();
        let spill = |e| spill_error(&dir, e);
        let mut jobs = Vec::new();
        jobs.extend(self.teachers.spill(&dir).map_err(spill)?);
        jobs.extend(self.assignments.spill(&dir).map_err(spill)?);
        for s in &mut self.by_school {
            jobs.extend(s.spill(&dir).map_err(spill)?);
        }
        jobs.extend(self.by_teacher.spill(&dir).map_err(spill)?);
        jobs.extend(self.by_class.spill(&dir).map_err(spill)?);
        jobs.extend(self.log.spill(&dir).map_err(spill)?);
        jobs.extend(self.entries.spill(&dir).map_err(spill)?);
        let spilling = std::thread::Builder::new()
            .name("import-sort".into())
            .spawn(move || jobs.into_iter().try_for_each(|job| job()))
            .map_err(spill)?;
        self.spilling = Some(spilling);
        Ok(true)
    }

    /// Waits until the runs handed over last are written.
    fn spilled(&mut self) -> Result<()> {
        match self.spilling.take() {
            Some(spilling) => spilling
                .join()
                .expect("sorting the import's rows panicked")
                .map_err(|e| spill_error(&self.spill_dir, e)),
            None => Ok(()),
        }
    }

    /// The row counts of every table but the classes and the documents.
    fn sorters(&self) -> impl Iterator<Item = &dyn Rows> {
        [
            &self.teachers as &dyn Rows,
            &self.assignments,
            &self.by_teacher,
            &self.by_class,
            &self.log,
            &self.entries,
        ]
        .into_iter()
        .chain(self.by_school.iter().map(|s| s as &dyn Rows))
    }

    /// Writes everything added, every teacher's document rendered, in one
    /// write transaction; `progress` is told the rows written so far of
    /// `total` (what [`BulkLoad::rows`] said).
    ///
    /// Fails with [`StoreError::Busy`], writing nothing, if the store took
    /// changes since the bulk load began (a running node's ingest, say):
    /// written over them, the rows would undo newer data and reuse
    /// change-log positions. An import again then reconciles.
    pub fn finish(mut self, mut progress: impl FnMut(u64)) -> Result<()> {
        self.spilled()?;
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
        self.classes.len() as u64 + self.sorters().map(|s| s.len()).sum::<u64>()
    }

    /// False when the store changed since the bulk load began (nothing
    /// written). Can run again after a failure: the runs are read from
    /// their start each time.
    fn write_all(&mut self, progress: &mut dyn FnMut(u64)) -> Result<bool> {
        if self.applied == 0 {
            return Ok(false);
        }
        let txn = self.store.begin_write()?;
        if meta_u64(&txn.open_table(META)?, META_FEED_SEQ)? != self.began {
            return Ok(false); // dropping `txn` aborts it
        }
        let dir = self.spill_dir.clone();
        let read = |e| read_error(&dir, e);
        let BulkLoad {
            classes,
            teachers,
            assignments,
            by_school,
            by_teacher,
            by_class,
            log,
            entries,
            ..
        } = self;
        let classes = &*classes;
        let total = AtomicU64::new(0);
        // Two threads write, each its own tables (redb takes the tables of
        // one write transaction from several threads): rendering the
        // documents is a third of the work, so the tables are split in two
        // halves of about the same cost.
        std::thread::scope(|scope| {
            let other = {
                let by_class_table = txn.open_table(ASSIGNMENT_BY_CLASS)?;
                let tables: TeacherTables = (
                    txn.open_table(TEACHERS)?,
                    txn.open_table(ASSIGNMENT_BY_TEACHER)?,
                    txn.open_table(TEACHER_DOCS)?,
                );
                let total = &total;
                scope.spawn(move || {
                    let mut w = Written::new(total, None);
                    let rows = by_class.sorted().map_err(read)?;
                    w.insert(by_class_table, rows, read, |t, (k, v)| {
                        t.insert(k, v).map(drop)
                    })?;
                    write_teachers(tables, teachers, by_teacher, classes, &mut w, read)?;
                    w.flush();
                    Ok::<_, StoreError>(())
                })
            };
            let mut w = Written::new(&total, Some(progress));
            let mine = (|w: &mut Written| {
                let mut classes: Vec<(&Id, &Vec<u8>)> = classes.iter().collect();
                classes.sort_unstable_by_key(|c| *c.0);
                let classes = classes.into_iter().map(Ok::<_, std::io::Error>);
                w.insert(txn.open_table(CLASSES)?, classes, read, |t, (k, v)| {
                    t.insert(k, v.as_slice()).map(drop)
                })?;
                let rows = assignments.sorted().map_err(read)?;
                w.insert(txn.open_table(ASSIGNMENTS)?, rows, read, |t, (k, v)| {
                    t.insert(k, v.as_slice()).map(drop)
                })?;
                for (slot, rows) in by_school.iter_mut().enumerate() {
                    let rows = rows.sorted().map_err(read)?;
                    w.insert(txn.open_table(INDEXES[slot])?, rows, read, |t, (k, ())| {
                        t.insert(k, ()).map(drop)
                    })?;
                }
                let rows = log.sorted().map_err(read)?;
                w.insert(txn.open_table(FEED_LOG)?, rows, read, |t, (k, v)| {
                    t.insert(k, v).map(drop)
                })?;
                let rows = entries.sorted().map_err(read)?;
                w.insert(txn.open_table(FEED_ENTRIES)?, rows, read, |t, (k, v)| {
                    t.insert(k, encode_entries(&[v]).as_slice()).map(drop)
                })?;
                w.flush();
                Ok::<_, StoreError>(())
            })(&mut w);
            let theirs = other.join().expect("writing the teachers' tables panicked");
            mine?;
            theirs?;
            // Every row now, whichever thread wrote last.
            w.report(total.load(Ordering::Relaxed));
            Ok::<_, StoreError>(())
        })?;
        write_seq(&txn, self.seq)?;
        add_counters(&txn, &[(counter::RESYNC_APPLIED, self.applied)])?;
        if let Some(w) = self.watermark {
            raise_watermark(&txn, w)?;
        }
        let mut schools: Vec<Id> = self.schools.iter().copied().collect();
        schools.sort_unstable();
        txn.commit()?;
        self.store.committed(self.seq, schools);
        Ok(true)
    }
}

/// The teachers' tables a bulk load writes together: the teachers, the
/// by-teacher index and the documents.
type TeacherTables<'t> = (
    Table<'t, Id, &'static [u8]>,
    Table<'t, (Id, Id), ()>,
    Table<'t, Id, &'static [u8]>,
);

/// Writes the teachers, the by-teacher index and every teacher's document,
/// rendered from the rows as `assemble` renders it from the tables (there
/// are no tombstones: a class not loaded is unknown, not deleted), in one
/// pass over the teachers and the assignments keyed by (teacher,
/// assignment), both in teacher order.
fn write_teachers(
    (mut teachers_table, mut index, mut docs): TeacherTables<'_>,
    teachers: &mut Sorter<Id, Vec<u8>>,
    by_teacher: &mut Sorter<(Id, Id), Vec<u8>>,
    classes: &HashMap<Id, Vec<u8>>,
    w: &mut Written,
    read: impl Fn(std::io::Error) -> StoreError,
) -> Result<()> {
    let mut teachers = teachers.sorted().map_err(&read)?;
    let mut assignments = by_teacher.sorted().map_err(&read)?.peekable();
    while let Some((id, record)) = teachers.next().transpose().map_err(&read)? {
        teachers_table.insert(id, record.as_slice())?;
        w.count();
        let mut own = Vec::new();
        // An error is taken too, to fail at once.
        while let Some(row) = assignments.next_if(|row| !row.as_ref().is_ok_and(|r| r.0 .0 > id)) {
            let ((teacher, assignment), record) = row.map_err(&read)?;
            index.insert((teacher, assignment), ())?;
            w.count();
            if teacher == id {
                own.push((assignment, record));
            }
        }
        if let Some(doc) = render_one(id, &record, &own, classes)? {
            docs.insert(id, doc.as_slice())?;
        }
    }
    for row in assignments {
        let ((teacher, assignment), _) = row.map_err(&read)?;
        index.insert((teacher, assignment), ())?;
        w.count();
    }
    Ok(())
}

/// One teacher's document, encoded; `None` if `teacher` is not a teacher's
/// record.
fn render_one(
    id: Id,
    teacher: &[u8],
    assignments: &[(Id, Vec<u8>)],
    classes: &HashMap<Id, Vec<u8>>,
) -> Result<Option<Vec<u8>>> {
    let teacher = narrow(decode_record(id, teacher)?, |e| match e {
        Entity::Teacher(t) => Some(t),
        _ => None,
    });
    let Some(teacher) = teacher else {
        return Ok(None);
    };
    let mut found = Vec::with_capacity(assignments.len());
    for (assignment_id, value) in assignments {
        let assignment = narrow(decode_record(*assignment_id, value)?, |e| match e {
            Entity::Assignment(a) => Some(a),
            _ => None,
        });
        let Some(assignment) = assignment else {
            continue;
        };
        let class_id = assignment.data.class_id.as_u128();
        let class = match classes.get(&class_id) {
            Some(v) => narrow(decode_record(class_id, v)?, |e| match e {
                Entity::Class(c) => Some(c),
                _ => None,
            })
            .map_or(ClassLookup::Unknown, ClassLookup::Live),
            None => ClassLookup::Unknown,
        };
        found.push((assignment, class));
    }
    let detail = assemble_teacher_detail(teacher, found);
    Ok(Some(encode_doc(&crate::domain::detail::render(&detail))))
}

/// One writing thread's count of the rows written (documents not
/// counted), added to the bulk load's `total` in steps; the thread that
/// has the import's progress tells it every 100,000 rows.
struct Written<'a> {
    rows: u64,
    total: &'a AtomicU64,
    progress: Option<&'a mut dyn FnMut(u64)>,
    reported: u64,
}

impl<'a> Written<'a> {
    /// Rows counted before they are added to the total.
    const STEP: u64 = 4096;

    fn new(total: &'a AtomicU64, progress: Option<&'a mut dyn FnMut(u64)>) -> Written<'a> {
        Written {
            rows: 0,
            total,
            progress,
            reported: 0,
        }
    }

    fn count(&mut self) {
        self.rows += 1;
        if self.rows == Self::STEP {
            self.flush();
        }
    }

    fn flush(&mut self) {
        let total = self.total.fetch_add(self.rows, Ordering::Relaxed) + self.rows;
        self.rows = 0;
        if total / 100_000 > self.reported / 100_000 {
            self.report(total);
        }
    }

    fn report(&mut self, total: u64) {
        if let Some(progress) = &mut self.progress {
            progress(total);
            self.reported = total;
        }
    }

    /// Inserts rows sorted by key into an empty table, in that order (see
    /// the module documentation).
    fn insert<K, V, T>(
        &mut self,
        mut table: Table<K, V>,
        rows: impl Iterator<Item = std::io::Result<T>>,
        read: impl Fn(std::io::Error) -> StoreError,
        mut put: impl FnMut(&mut Table<K, V>, T) -> std::result::Result<(), redb::StorageError>,
    ) -> Result<()>
    where
        K: Key + 'static,
        V: Value + 'static,
    {
        for row in rows {
            put(&mut table, row.map_err(&read)?)?;
            self.count();
        }
        Ok(())
    }
}

fn spill_error(dir: &std::path::Path, e: std::io::Error) -> StoreError {
    StoreError::TempFile(format!(
        "cannot write the import's sorted rows to a temporary file in {}: {e}",
        dir.display()
    ))
}

fn read_error(dir: &std::path::Path, e: std::io::Error) -> StoreError {
    StoreError::TempFile(format!(
        "cannot read the import's sorted rows back from a temporary file in {}: {e}",
        dir.display()
    ))
}

/// What [`BulkLoad`] counts of a table's rows.
trait Rows {
    /// Rows added.
    fn len(&self) -> u64;
    /// … of which held in memory.
    fn in_memory(&self) -> u64;
}

/// The rows of one table, sorted by key when they are read: held in
/// memory until [`Sorter::spill`] writes them to a temporary file as a
/// sorted run; [`Sorter::sorted`] merges the runs and what is in memory.
struct Sorter<K, V> {
    rows: Vec<(K, V)>,
    /// The memory of the run written last, emptied, for the next one: a
    /// fresh vector would grow by doubling, copying its rows each time and
    /// touching new pages (in which the kernel zeroes every one).
    spare: Arc<Mutex<Vec<(K, V)>>>,
    /// Each sorted, with its number of rows.
    runs: Vec<(File, u64)>,
    spilled: u64,
}

impl<K, V> Default for Sorter<K, V> {
    fn default() -> Self {
        Sorter {
            rows: Vec::new(),
            spare: Arc::default(),
            runs: Vec::new(),
            spilled: 0,
        }
    }
}

impl<K, V> Rows for Sorter<K, V> {
    fn len(&self) -> u64 {
        self.spilled + self.rows.len() as u64
    }

    fn in_memory(&self) -> u64 {
        self.rows.len() as u64
    }
}

/// Fixed-width integers: faster to write and read than varints, and no
/// longer for the random 128-bit ids that most of a run's keys are.
const RUN_CONFIG: bincode::config::Configuration<
    bincode::config::LittleEndian,
    bincode::config::Fixint,
> = bincode::config::standard().with_fixed_int_encoding();

/// Sorts a run's rows and writes them to its file.
type SpillJob = Box<dyn FnOnce() -> std::io::Result<()> + Send>;

impl<K, V> Sorter<K, V>
where
    K: Ord + Copy + Encode + Decode<()> + Send + 'static,
    V: Clone + Encode + Decode<()> + Send + 'static,
{
    fn push(&mut self, key: K, value: V) {
        self.rows.push((key, value));
    }

    /// Takes the rows in memory as a run: creates an unnamed temporary file
    /// in `dir` (gone when it is closed, also after a crash) and returns
    /// what sorts them and writes them to it.
    fn spill(&mut self, dir: &std::path::Path) -> std::io::Result<Option<SpillJob>> {
        if self.rows.is_empty() {
            return Ok(None);
        }
        let file = tempfile::tempfile_in(dir)?;
        // The same open file: the merge reads it once the job is done.
        let writer = file.try_clone()?;
        // The run written before is done (see `BulkLoad::spill_if_full`).
        let spare = std::mem::take(&mut *self.spare.lock().expect("no run panics"));
        let mut rows = std::mem::replace(&mut self.rows, spare);
        let n = rows.len();
        self.rows.reserve(n);
        self.runs.push((file, n as u64));
        self.spilled += n as u64;
        let spare = Arc::clone(&self.spare);
        Ok(Some(Box::new(move || {
            rows.sort_unstable_by_key(|r| r.0);
            let mut out = BufWriter::with_capacity(1 << 20, writer);
            for row in &rows {
                bincode::encode_into_std_write(row, &mut out, RUN_CONFIG)
                    .map_err(std::io::Error::other)?;
            }
            out.flush()?;
            rows.clear();
            *spare.lock().expect("no run panics") = rows;
            Ok(())
        })))
    }

    /// Every row, in key order.
    fn sorted(&mut self) -> std::io::Result<Merge<'_, K, V>> {
        drop(std::mem::take(
            &mut *self.spare.lock().expect("no run panics"),
        ));
        self.rows.sort_unstable_by_key(|r| r.0);
        let mut runs = Vec::with_capacity(self.runs.len());
        for (file, n) in &self.runs {
            let mut file = file.try_clone()?;
            file.rewind()?;
            runs.push((BufReader::with_capacity(1 << 16, file), *n));
        }
        let mut merge = Merge {
            memory: self.rows.iter(),
            runs,
            heads: Vec::new(),
            heap: BinaryHeap::new(),
        };
        for source in 0..=merge.runs.len() {
            let head = merge.read(source)?;
            if let Some((key, _)) = &head {
                merge.heap.push(Reverse((*key, source)));
            }
            merge.heads.push(head);
        }
        Ok(merge)
    }
}

/// A k-way merge of sorted rows: those in memory (source 0) and each
/// spilled run (source 1 + its index).
struct Merge<'a, K, V> {
    memory: std::slice::Iter<'a, (K, V)>,
    runs: Vec<(BufReader<File>, u64)>,
    heads: Vec<Option<(K, V)>>,
    heap: BinaryHeap<Reverse<(K, usize)>>,
}

impl<K, V> Merge<'_, K, V>
where
    K: Ord + Copy + Decode<()>,
    V: Clone + Decode<()>,
{
    fn read(&mut self, source: usize) -> std::io::Result<Option<(K, V)>> {
        if source == 0 {
            return Ok(self.memory.next().cloned());
        }
        let (file, left) = &mut self.runs[source - 1];
        if *left == 0 {
            return Ok(None);
        }
        *left -= 1;
        bincode::decode_from_std_read(file, RUN_CONFIG)
            .map(Some)
            .map_err(std::io::Error::other)
    }
}

impl<K, V> Iterator for Merge<'_, K, V>
where
    K: Ord + Copy + Decode<()>,
    V: Clone + Decode<()>,
{
    type Item = std::io::Result<(K, V)>;

    fn next(&mut self) -> Option<Self::Item> {
        let Reverse((_, source)) = self.heap.pop()?;
        let row = self.heads[source]
            .take()
            .expect("a head for every key in the heap");
        match self.read(source) {
            Ok(head) => {
                if let Some((key, _)) = &head {
                    self.heap.push(Reverse((*key, source)));
                }
                self.heads[source] = head;
                Some(Ok(row))
            }
            Err(e) => Some(Err(e)),
        }
    }
}

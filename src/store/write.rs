//! The store's writers — batches, reconciles, tombstone purges and the
//! rendering of teacher documents — and the convergence rule applied to
//! its tables.
//!
//! Each public writer ([`Store::apply_batch`], [`Store::reconcile`],
//! [`Store::reconcile_many`], [`Store::purge_tombstones`],
//! [`Store::materialize`]) runs one write transaction and hands its outcome
//! to `Store::write` (`reopen.rs`), so that a failed write is recorded and
//! an I/O error reopens the file. [`WriteTables`] is the one place that
//! applies a change to an entity — the convergence rule, tombstones, the
//! secondary indexes and the invalidation of rendered teacher documents —
//! for events and snapshots alike. This file deliberately answers no
//! queries (that is the `Reader`), decides no encoding (`schema.rs`) and
//! does not create or upgrade files (`open.rs`).

use std::collections::{BTreeMap, HashSet};

use redb::{ReadableTable, Table, WriteTransaction};
use serde::Serialize;
use uuid::Uuid;

use super::feed::{raise_floor, write_seq, write_upstream_cursor, LogWriter};
use super::read::assemble;
use super::schema::{
    counter, decode, decode_watermark, encode, kind_slot, Id, ASSIGNMENTS, ASSIGNMENT_BY_CLASS,
    ASSIGNMENT_BY_TEACHER, CLASSES, COUNTERS, DEAD_LETTERS, INDEXES, META, META_WATERMARK, OFFSETS,
    PENDING_DOCS, TEACHERS, TEACHER_DOCS, TOMBSTONES,
};
use super::{DeadLetter, PartitionOffset, Result, Store, StoreError};
use crate::domain::{
    Change, Cursor, Entity, EntityKind, OrderKey, Record, SchoolFilter, SchoolSnapshot, SyncSource,
    Timestamp, Tombstone,
};

/// Everything one write transaction commits.
#[derive(Clone, Debug, Default)]
pub struct Batch {
    /// Valid changes of served schools, each with its order key.
    pub changes: Vec<(OrderKey, Change)>,
    /// Valid changes of schools the node does not serve. Each one removes
    /// the entity here if the node holds it and the change is newer (the
    /// transfer rule, contract §2); the others are skipped. Applied after
    /// `changes`, so that an older create and its transfer out in one batch
    /// end in the transfer whatever their order.
    pub foreign: Vec<(OrderKey, Change)>,
    pub dead_letters: Vec<DeadLetter>,
    /// Positions consumed up to and including this batch.
    pub offsets: Vec<PartitionOffset>,
    /// The topic of each change and of each foreign change (same order):
    /// for per-topic metrics only; not stored.
    pub change_topics: Vec<String>,
    pub foreign_topics: Vec<String>,
}

/// What a batch did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ApplyReport {
    pub applied: u64,
    pub stale: u64,
    pub dead_lettered: u64,
    /// Changes of schools not served that removed nothing.
    pub skipped: u64,
    /// Changes of schools not served that removed an entity held here.
    pub transferred_out: u64,
    /// For each change of the batch, in order: whether it was applied.
    pub outcomes: Vec<bool>,
    /// For each foreign change, in order: whether it removed an entity.
    pub foreign_outcomes: Vec<bool>,
}

/// What a change of a school the node does not serve did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Foreign {
    /// The node held the entity: it is removed here.
    TransferredOut,
    /// The node held a tombstone of it: the tombstone took the change's key.
    Recorded,
    /// Nothing here is older: skipped.
    Skipped,
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

impl Store {
    /// Applies a batch — changes by the convergence rule, dead letters,
    /// counters and consumed offsets — in ONE write transaction: after a
    /// crash either all of it is there or none of it.
    pub fn apply_batch(
        &self,
        batch: &Batch,
        now: Timestamp,
        source: SyncSource,
    ) -> Result<ApplyReport> {
        self.write(now, |_| true, || self.apply_batch_txn(batch, now, source))
    }

    fn apply_batch_txn(
        &self,
        batch: &Batch,
        now: Timestamp,
        source: SyncSource,
    ) -> Result<ApplyReport> {
        let txn = self.begin_write()?;
        let mut report = ApplyReport::default();
        let mut watermark = None;
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
        for (key, change) in &batch.foreign {
            let outcome = tables.apply_foreign(key, change, now, source)?;
            report.count_foreign(outcome);
            if outcome != Foreign::Skipped {
                watermark = watermark.max(Some(key.timestamp));
            }
        }
        let (seq, schools) = tables.close(&txn)?;
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
                (counter::TRANSFERRED_OUT, report.transferred_out),
            ],
        )?;
        if let Some(w) = watermark {
            raise_watermark(&txn, w)?;
        }
        #[cfg(feature = "fault-injection")]
        self.injected_fault()?; // dropping `txn` aborts it
        txn.commit()?;
        self.committed(seq, schools);
        Ok(report)
    }

    /// Applies one page of a parent's change feed (contract §6) with the
    /// parent's `cursor` after it in ONE write transaction, like a Kafka
    /// batch with its offsets: after a crash either both are there or
    /// neither. Lines go through the convergence rule and take positions in
    /// this store's change log, so this node's own followers see them.
    /// A line of a school `filter` does not serve (an entity that left the
    /// follower's schools) goes by the transfer rule, as a [`Batch`]'s
    /// `foreign` changes do, after the other lines. `outcomes` says, per
    /// line, whether it changed anything here.
    pub fn apply_feed_page(
        &self,
        lines: &[(OrderKey, Change)],
        cursor: &Cursor,
        filter: &SchoolFilter,
        now: Timestamp,
    ) -> Result<ApplyReport> {
        self.write(
            now,
            |_| true,
            || self.apply_feed_page_txn(lines, cursor, filter, now),
        )
    }

    fn apply_feed_page_txn(
        &self,
        lines: &[(OrderKey, Change)],
        cursor: &Cursor,
        filter: &SchoolFilter,
        now: Timestamp,
    ) -> Result<ApplyReport> {
        let txn = self.begin_write()?;
        let mut report = ApplyReport::default();
        let mut watermark = None;
        let mut tables = WriteTables::open(&txn)?;
        report.outcomes = vec![false; lines.len()];
        let (served, foreign): (Vec<_>, Vec<_>) = lines
            .iter()
            .enumerate()
            .partition(|(_, (_, change))| filter.serves(change.school_id()));
        for (i, (key, change)) in served {
            let applied = tables.apply(key, change, now, SyncSource::Upstream)?;
            report.outcomes[i] = applied;
            if applied {
                report.applied += 1;
            } else {
                report.stale += 1;
            }
            watermark = watermark.max(Some(key.timestamp));
        }
        for (i, (key, change)) in foreign {
            let outcome = tables.apply_foreign(key, change, now, SyncSource::Upstream)?;
            report.count_foreign(outcome);
            report.outcomes[i] = outcome != Foreign::Skipped;
            if outcome != Foreign::Skipped {
                watermark = watermark.max(Some(key.timestamp));
            }
        }
        let (seq, schools) = tables.close(&txn)?;
        write_upstream_cursor(&txn, cursor)?;
        add_counters(
            &txn,
            &[
                (counter::FEED_APPLIED, report.applied),
                (counter::FEED_STALE, report.stale),
                (counter::FEED_SKIPPED, report.skipped),
                (counter::FEED_TRANSFERRED_OUT, report.transferred_out),
            ],
        )?;
        if let Some(w) = watermark {
            raise_watermark(&txn, w)?;
        }
        #[cfg(feature = "fault-injection")]
        self.injected_fault()?;
        txn.commit()?;
        self.committed(seq, schools);
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
        snapshot: &SchoolSnapshot,
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
        snapshots: &[SchoolSnapshot],
        now: Timestamp,
        source: SyncSource,
        dry_run: bool,
    ) -> Result<Vec<ReconcileReport>> {
        self.write(
            now,
            |_| !dry_run,
            || self.reconcile_many_txn(snapshots, now, source, dry_run, None),
        )
    }

    /// [`Store::reconcile_many`] for a follower starting again from its
    /// parent's snapshots (a first start, or an expired cursor: contract
    /// §6): the schools are reconciled and `cursor` becomes the stored
    /// upstream cursor in ONE write transaction, so that a crash leaves
    /// either the old state and cursor or both new. With snapshots read at
    /// different moments, pass the earliest of their cursors: the feed
    /// then repeats what a later snapshot already had, which the
    /// convergence rule ignores.
    pub fn reconcile_upstream(
        &self,
        snapshots: &[SchoolSnapshot],
        cursor: &Cursor,
        now: Timestamp,
    ) -> Result<Vec<ReconcileReport>> {
        self.write(
            now,
            |_| true,
            || self.reconcile_many_txn(snapshots, now, SyncSource::Upstream, false, Some(cursor)),
        )
    }

    fn reconcile_many_txn(
        &self,
        snapshots: &[SchoolSnapshot],
        now: Timestamp,
        source: SyncSource,
        dry_run: bool,
        upstream: Option<&Cursor>,
    ) -> Result<Vec<ReconcileReport>> {
        let txn = self.begin_write()?;
        let mut tables = WriteTables::open(&txn)?;
        let reports = tables.reconcile(snapshots, now, source, dry_run)?;
        if dry_run {
            drop(tables);
            txn.abort()?;
            return Ok(reports);
        }
        let (seq, schools) = tables.close(&txn)?;
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
        if let Some(cursor) = upstream {
            write_upstream_cursor(&txn, cursor)?;
        }
        txn.commit()?;
        self.committed(seq, schools);
        Ok(reports)
    }

    /// Removes tombstones older than `retention_nanos` at `now`, and their
    /// entries in the change log, whose floor rises past them (a feed
    /// cursor below it has expired); returns how many went.
    pub fn purge_tombstones(&self, now: Timestamp, retention_nanos: i64) -> Result<u64> {
        self.write(
            now,
            |_| true,
            || self.purge_tombstones_txn(now, retention_nanos),
        )
    }

    fn purge_tombstones_txn(&self, now: Timestamp, retention_nanos: i64) -> Result<u64> {
        let txn = self.begin_write()?;
        let mut purged = 0u64;
        let mut classes = Vec::new();
        let mut gone = Vec::new();
        {
            let mut table = txn.open_table(TOMBSTONES)?;
            let mut corrupt = None;
            table.retain(|(kind, id), v| match decode::<Tombstone>(v) {
                Ok(t) if t.expired(now, retention_nanos) => {
                    purged += 1;
                    if kind == EntityKind::Class.code() {
                        classes.push(id);
                    }
                    gone.push((kind, id));
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
        let mut floor = None;
        for (code, id) in gone {
            let kind = EntityKind::from_code(code)
                .ok_or_else(|| StoreError::Corrupt(format!("unknown entity kind code {code}")))?;
            floor = floor.max(tables.log.forget(kind, id)?);
        }
        drop(tables);
        if let Some(floor) = floor {
            raise_floor(&txn, floor)?;
        }
        add_counters(&txn, &[(counter::TOMBSTONES_PURGED, purged)])?;
        txn.commit()?;
        Ok(purged)
    }

    /// Renders up to `limit` queued teacher documents in one write
    /// transaction; returns how many it took from the queue (0: none
    /// left). The node's `docs` worker calls it after every change.
    pub fn materialize(&self, limit: usize, now: Timestamp) -> Result<usize> {
        // Only a rendering that wrote proves the store writable again.
        self.write(now, |n| *n > 0, || self.materialize_txn(limit))
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

impl ApplyReport {
    fn count_foreign(&mut self, outcome: Foreign) {
        let out = outcome == Foreign::TransferredOut;
        self.foreign_outcomes.push(out);
        if out {
            self.transferred_out += 1;
        } else {
            self.skipped += 1;
        }
    }
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
        .and_then(|v| decode_watermark(v.value()));
    if old.is_none_or(|old| t > old) {
        meta.insert(META_WATERMARK, t.to_le_bytes().as_slice())?;
    }
    Ok(())
}

/// What is stored for one entity, as [`WriteTables::prior`] finds it.
struct Prior {
    live: Option<Record<Entity>>,
    key: Option<OrderKey>,
    /// The school of the live record, else of the tombstone.
    school: Option<Id>,
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
    /// The change log: every applied change takes a position.
    log: LogWriter<'t>,
    /// Teachers whose document this transaction already invalidated.
    invalidated: HashSet<Id>,
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
            log: LogWriter::open(txn)?,
            invalidated: Default::default(),
        })
    }

    /// Closes the tables and stores how far the change log got; returns
    /// the last position given out and the schools whose feed changed (to
    /// announce after the commit, [`Store::committed`]).
    fn close(mut self, txn: &WriteTransaction) -> Result<(u64, Vec<Id>)> {
        let advanced = self.log.advanced();
        let schools = self.log.take_touched();
        drop(self);
        if let Some(seq) = advanced {
            write_seq(txn, seq)?;
        }
        Ok((advanced.unwrap_or(0), schools))
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
        snapshots: &[SchoolSnapshot],
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
        let mut seen = vec![HashSet::new(); snapshots.len()];
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
        snapshot: &SchoolSnapshot,
        seen: &HashSet<(EntityKind, Id)>,
        report: &mut ReconcileReport,
        now: Timestamp,
        source: SyncSource,
    ) -> Result<()> {
        let school = snapshot.school_id;
        let s = school.as_u128();
        for kind in EntityKind::ALL {
            let local: Vec<Id> = {
                let index = &self.by_school[kind_slot(kind)];
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
        let entities = &self.entities[kind_slot(kind)];
        let live: Option<Record<Entity>> =
            entities.get(id)?.map(|v| decode(v.value())).transpose()?;
        let (key, school) = match &live {
            Some(r) => (Some(r.key), Some(r.data.school_id().as_u128())),
            None => {
                let tomb = self.tombstones.get((kind.code(), id))?;
                tomb.map(|v| decode::<Tombstone>(v.value()))
                    .transpose()?
                    .map(|t| (t.key, t.school_id.as_u128()))
                    .unzip()
            }
        };
        Ok(Prior { live, key, school })
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

    /// The transfer rule (contract §2) for a change of a school the node
    /// does not serve: if it is newer than what is stored, an entity held
    /// here is removed, as by a delete with the change's key (kept as it
    /// is, so the same upsert again is a duplicate and no older event
    /// brings the entity back), and a tombstone here takes the key; the
    /// tombstone names the change's school, the one the entity moved to.
    /// An entity the node never held stays unknown: the change is skipped.
    fn apply_foreign(
        &mut self,
        key: &OrderKey,
        change: &Change,
        now: Timestamp,
        source: SyncSource,
    ) -> Result<Foreign> {
        let (kind, id) = (change.kind(), change.id());
        let prior = self.prior(kind, id.as_u128())?;
        if prior.key.is_none() || !key.supersedes(prior.key.as_ref()) {
            return Ok(Foreign::Skipped);
        }
        let held = prior.live.is_some();
        let gone = Change::Delete {
            kind,
            id,
            school_id: change.school_id(),
        };
        self.apply_over(prior, key, &gone, now, source)?;
        Ok(if held {
            Foreign::TransferredOut
        } else {
            Foreign::Recorded
        })
    }

    /// [`WriteTables::apply`] with what is stored already looked up.
    fn apply_over(
        &mut self,
        Prior {
            live,
            key: stored_key,
            school: prior_school,
        }: Prior,
        key: &OrderKey,
        change: &Change,
        now: Timestamp,
        source: SyncSource,
    ) -> Result<bool> {
        let kind = change.kind();
        let id = change.id().as_u128();
        let entities = &mut self.entities[kind_slot(kind)];
        if !key.supersedes(stored_key.as_ref()) {
            return Ok(false);
        }
        // The teachers (old and new) whose documents an assignment change
        // touches.
        let mut stale_docs: Vec<Id> = Vec::new();
        if let Some(old) = &live {
            self.by_school[kind_slot(kind)].remove((old.data.school_id().as_u128(), id))?;
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
                self.by_school[kind_slot(kind)].insert((entity.school_id().as_u128(), id), ())?;
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
        // Followers of the school it left learn of it too.
        let school = change.school_id().as_u128();
        match prior_school.filter(|&p| p != school) {
            Some(previous) => self.log.record(kind, id, &[school, previous])?,
            None => self.log.record(kind, id, &[school])?,
        }
        Ok(true)
    }
}

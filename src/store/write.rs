//! The store's writers — batches, feed pages, reconciles, tombstone and
//! dead-letter purges, the rendering of teacher documents — each one write
//! transaction.
//!
//! Each public writer ([`Store::apply_batch`], [`Store::apply_feed_page`],
//! [`Store::reconcile`], [`Store::reconcile_many`],
//! [`Store::purge_tombstones`], [`Store::materialize`]) hands its outcome
//! to `Store::write` (`reopen.rs`), so that a failed write is recorded and
//! an I/O error reopens the file. Changes reach entities only through
//! `WriteTables` (`tables.rs`), the convergence rule. This file
//! deliberately answers no queries (that is the `Reader`), decides no
//! encoding (`schema.rs`) and does not create or upgrade files (`open.rs`).

use std::collections::BTreeMap;

use redb::{ReadableTable, ReadableTableMetadata, Table, WriteTransaction};
use serde::Serialize;
use uuid::Uuid;

use super::feed::{raise_floor, write_upstream_cursor};
use super::read::assemble;
use super::schema::{
    counter, decode, decode_watermark, encode, encode_doc, Id, ASSIGNMENTS, ASSIGNMENT_BY_TEACHER,
    CLASSES, COUNTERS, DEAD_LETTERS, META, META_LAST_RESYNC, META_OFFSET_OUT_OF_RANGE,
    META_WATERMARK, OFFSETS, PENDING_DOCS, TEACHERS, TEACHER_DOCS, TOMBSTONES,
};
use super::tables::{Foreign, WriteTables};
use super::{DeadLetter, Note, PartitionOffset, Result, Store, StoreError};
use crate::domain::{
    Change, Cursor, EntityKind, OrderKey, SchoolFilter, SchoolSnapshot, SyncSource, Timestamp,
    Tombstone,
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

impl ReconcileReport {
    /// The report of `snapshot` before anything of it is applied.
    pub(super) fn start(snapshot: &SchoolSnapshot, dry_run: bool) -> Self {
        ReconcileReport {
            school_id: snapshot.school_id,
            records: snapshot.records.len() as u64,
            applied: 0,
            deleted: 0,
            drift: EntityKind::ALL
                .iter()
                .map(|k| (k.as_str(), Drift::default()))
                .collect(),
            dry_run,
        }
    }
}

impl Store {
    /// Applies a batch — changes by the convergence rule, dead letters,
    /// counters and consumed offsets — in ONE write transaction: after a
    /// crash either all of it is there or none of it.
    ///
    /// A change that can never be applied — what is stored for its entity
    /// does not decode, so every retry would fail the same way — fails the
    /// batch with [`StoreError::Refused`] naming it, writes nothing, and
    /// leaves the store's health alone (the store is not failing; that
    /// record is): the caller takes the change out (a dead letter) and
    /// applies the rest. Any other failure (I/O, a full disk) is the
    /// store's, recorded in its health, and the same batch may succeed
    /// when tried again.
    pub fn apply_batch(
        &self,
        batch: &Batch,
        now: Timestamp,
        source: SyncSource,
    ) -> Result<ApplyReport> {
        self.write(
            now,
            |r: &Result<ApplyReport>| r.is_ok(),
            || self.apply_batch_txn(batch, now, source),
        )?
    }

    /// The outer result is the store's (recorded in its health), the
    /// inner one a refused change (not recorded).
    fn apply_batch_txn(
        &self,
        batch: &Batch,
        now: Timestamp,
        source: SyncSource,
    ) -> Result<Result<ApplyReport>> {
        let txn = self.begin_write()?;
        let mut report = ApplyReport::default();
        let mut tables = WriteTables::open(&txn)?;
        report.outcomes = match tables.apply_in_key_order(&batch.changes, now, source) {
            Ok(outcomes) => outcomes,
            // Dropping `txn` aborts it: nothing of the batch stays.
            Err((index, StoreError::Corrupt(reason))) => {
                let change = &batch.changes[index].1;
                return Ok(Err(StoreError::Refused {
                    index,
                    reason: format!(
                        "what is stored for {} {} is corrupt ({reason})",
                        change.kind().as_str(),
                        change.id()
                    ),
                }));
            }
            Err((_, e)) => return Err(e),
        };
        report.applied = report.outcomes.iter().filter(|a| **a).count() as u64;
        report.stale = batch.changes.len() as u64 - report.applied;
        let mut watermark = batch.changes.iter().map(|(key, _)| key.timestamp).max();
        for (i, (key, change)) in batch.foreign.iter().enumerate() {
            let outcome = match tables.apply_foreign(key, change, now, source) {
                Ok(outcome) => outcome,
                Err(StoreError::Corrupt(reason)) => {
                    return Ok(Err(StoreError::Refused {
                        index: batch.changes.len() + i,
                        reason: format!(
                            "what is stored for {} {} is corrupt ({reason})",
                            change.kind().as_str(),
                            change.id()
                        ),
                    }))
                }
                Err(e) => return Err(e),
            };
            report.count_foreign(outcome);
            if outcome != Foreign::Skipped {
                watermark = watermark.max(Some(key.timestamp));
            }
        }
        let (seq, schools) = tables.close(&txn)?;
        let mut dropped = 0;
        {
            let mut dead = txn.open_table(DEAD_LETTERS)?;
            let first = dead.last()?.map_or(0, |(k, _)| k.value() + 1);
            for (seq, letter) in (first..).zip(&batch.dead_letters) {
                dead.insert(seq, encode(letter).as_slice())?;
                report.dead_lettered += 1;
            }
            if !batch.dead_letters.is_empty() {
                dropped = drop_dead_letters_beyond(&mut dead, self.dead_letter_max_count)?;
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
                (counter::DEAD_LETTERS_DROPPED, dropped),
            ],
        )?;
        if let Some(w) = watermark {
            raise_watermark(&txn, w)?;
        }
        #[cfg(feature = "fault-injection")]
        self.injected_fault()?; // dropping `txn` aborts it
        txn.commit()?;
        self.committed(seq, schools);
        Ok(Ok(report))
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
            let assignments = txn.open_table(ASSIGNMENTS)?;
            let classes = txn.open_table(CLASSES)?;
            let tombstones = txn.open_table(TOMBSTONES)?;
            let mut docs = txn.open_table(TEACHER_DOCS)?;
            for &id in &ids {
                pending.remove(id)?;
                let tables = (&teachers, &by_teacher, &assignments, &classes, &tombstones);
                if let Some(detail) = assemble(tables, id)? {
                    docs.insert(
                        id,
                        encode_doc(&crate::domain::detail::render(&detail)).as_slice(),
                    )?;
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

/// What the node remembers across restarts (`meta`), beside the data.
impl Store {
    /// Remembers the last resync run's outcome (status `lastResync`).
    pub fn record_resync(&self, note: &Note) -> Result<()> {
        self.write(
            note.at,
            |_| true,
            || self.note_txn(META_LAST_RESYNC, note, None),
        )
    }

    /// Remembers that a stored offset fell outside its partition (status
    /// `kafka.offsetOutOfRange`) and counts it (`offset_out_of_range`).
    pub fn record_offset_out_of_range(&self, note: &Note) -> Result<()> {
        self.write(
            note.at,
            |_| true,
            || {
                self.note_txn(
                    META_OFFSET_OUT_OF_RANGE,
                    note,
                    Some(counter::OFFSET_OUT_OF_RANGE),
                )
            },
        )
    }

    fn note_txn(&self, key: &str, note: &Note, count: Option<&str>) -> Result<()> {
        let txn = self.begin_write()?;
        txn.open_table(META)?.insert(key, encode(note).as_slice())?;
        if let Some(name) = count {
            add_counters(&txn, &[(name, 1)])?;
        }
        txn.commit()?;
        Ok(())
    }
}

/// Dead-letter retention: the store keeps at most
/// [`StoreOptions::dead_letter_max_count`](super::StoreOptions) of them
/// (enforced by every batch that adds some) and none older than the
/// retention the purge worker passes; the oldest go first, counted in
/// `dead_letters_dropped`.
impl Store {
    /// Drops dead letters stored more than `retention_nanos` before `now`
    /// (the node's clock when they were stored), and the oldest beyond the
    /// count limit; returns how many went.
    pub fn purge_dead_letters(&self, now: Timestamp, retention_nanos: i64) -> Result<u64> {
        self.write(
            now,
            |n| *n > 0,
            || self.purge_dead_letters_txn(now, retention_nanos),
        )
    }

    fn purge_dead_letters_txn(&self, now: Timestamp, retention_nanos: i64) -> Result<u64> {
        let txn = self.begin_write()?;
        let dropped = {
            let mut dead = txn.open_table(DEAD_LETTERS)?;
            let mut dropped = drop_dead_letters_beyond(&mut dead, self.dead_letter_max_count)?;
            loop {
                // In sequence order, which is the order they were stored in.
                let oldest = match dead.first()? {
                    Some((seq, letter)) => (seq.value(), decode::<DeadLetter>(letter.value())),
                    None => break,
                };
                match oldest {
                    (seq, Ok(letter)) if now.saturating_sub(letter.at) > retention_nanos => {
                        dead.remove(seq)?;
                        dropped += 1;
                    }
                    // Young enough (and so is every later one), or not
                    // readable: the count limit still bounds it.
                    _ => break,
                }
            }
            dropped
        };
        if dropped == 0 {
            txn.abort()?;
            return Ok(0);
        }
        add_counters(&txn, &[(counter::DEAD_LETTERS_DROPPED, dropped)])?;
        txn.commit()?;
        Ok(dropped)
    }
}

/// Drops the oldest dead letters beyond `keep`; returns how many.
fn drop_dead_letters_beyond(dead: &mut Table<u64, &'static [u8]>, keep: u64) -> Result<u64> {
    let excess = dead.len()?.saturating_sub(keep);
    for _ in 0..excess {
        dead.pop_first()?;
    }
    Ok(excess)
}

pub(super) fn add_counters(txn: &WriteTransaction, deltas: &[(&str, u64)]) -> Result<()> {
    let mut table = txn.open_table(COUNTERS)?;
    for &(name, delta) in deltas {
        if delta > 0 {
            let old = table.get(name)?.map_or(0, |v| v.value());
            table.insert(name, old + delta)?;
        }
    }
    Ok(())
}

pub(super) fn raise_watermark(txn: &WriteTransaction, t: Timestamp) -> Result<()> {
    let mut meta = txn.open_table(META)?;
    let old = meta
        .get(META_WATERMARK)?
        .and_then(|v| decode_watermark(v.value()));
    if old.is_none_or(|old| t > old) {
        meta.insert(META_WATERMARK, t.to_le_bytes().as_slice())?;
    }
    Ok(())
}

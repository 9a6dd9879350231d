//! The convergence rule applied to the store's tables: [`WriteTables`] is
//! the one place a change is applied to an entity — order keys,
//! tombstones, the transfer rule, the secondary indexes, the change log and
//! the invalidation of rendered teacher documents — for events, snapshot
//! records and feed lines alike. The writers of `write.rs` open it once per
//! transaction; it commits nothing itself.

use std::collections::HashSet;

use redb::{ReadableTable, Table, WriteTransaction};
use uuid::Uuid;

use super::feed::{write_seq, LogWriter};
use super::schema::*;
use super::write::ReconcileReport;
use super::{Result, StoreError};
use crate::domain::*;

/// What a change of a school the node does not serve did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Foreign {
    /// The node held the entity: it is removed here.
    TransferredOut,
    /// The node held a tombstone of it: the tombstone took the change's key.
    Recorded,
    /// Nothing here is older: skipped.
    Skipped,
}

/// What is stored for one entity, as [`WriteTables::prior`] finds it.
pub(super) struct Prior {
    live: Option<Record<Entity>>,
    key: Option<OrderKey>,
    /// The school of the live record, else of the tombstone.
    school: Option<Id>,
}

/// The tables a write transaction changes, opened once per batch.
pub(super) struct WriteTables<'t> {
    entities: [Table<'t, Id, &'static [u8]>; 3],
    tombstones: Table<'t, (u8, Id), &'static [u8]>,
    by_school: Vec<Table<'t, (Id, Id), ()>>,
    by_teacher: Table<'t, (Id, Id), ()>,
    by_class: Table<'t, (Id, Id), Id>,
    docs: Table<'t, Id, &'static [u8]>,
    pending: Table<'t, Id, ()>,
    /// The change log: every applied change takes a position.
    pub(super) log: LogWriter<'t>,
    /// Teachers whose document this transaction already invalidated.
    invalidated: HashSet<Id>,
    /// While [`WriteTables::apply_in_key_order`] runs: the change-log
    /// entries held back until the batch is through.
    deferred: Option<Deferred>,
}

/// Change-log entries held back while a batch is applied in key order.
#[derive(Default)]
struct Deferred {
    /// The batch index of the change in hand.
    current: usize,
    /// (batch index, kind, id, school, school it left)
    entries: Vec<(usize, EntityKind, Id, Id, Option<Id>)>,
}

impl<'t> WriteTables<'t> {
    pub(super) fn open(txn: &'t WriteTransaction) -> Result<Self> {
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
            deferred: None,
        })
    }

    /// Closes the tables and stores how far the change log got; returns
    /// the last position given out (to announce after the commit).
    pub(super) fn close(mut self, txn: &WriteTransaction) -> Result<(u64, Vec<Id>)> {
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
    pub(super) fn invalidate(&mut self, teacher: Id) -> Result<()> {
        if self.invalidated.insert(teacher) {
            self.docs.remove(teacher)?;
            self.pending.insert(teacher, ())?;
        }
        Ok(())
    }

    /// A class changed (or lost its tombstone): every teacher with an
    /// assignment to it shows it.
    pub(super) fn invalidate_class(&mut self, class: Id) -> Result<()> {
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

    /// Applies a batch's changes in key order (kind, then id; stable, so an
    /// entity's own changes keep their order): neighbouring changes share
    /// B-tree pages. The change log still takes them in the batch's order,
    /// so the feed lists them as they arrived. Returns, per change in the
    /// batch's order, whether it was applied; an error names its change.
    pub(super) fn apply_in_key_order(
        &mut self,
        changes: &[(OrderKey, Change)],
        now: Timestamp,
        source: SyncSource,
    ) -> std::result::Result<Vec<bool>, (usize, StoreError)> {
        let mut order: Vec<usize> = (0..changes.len()).collect();
        order.sort_by_key(|&i| (changes[i].1.kind(), changes[i].1.id()));
        let mut applied = vec![false; changes.len()];
        self.deferred = Some(Deferred::default());
        for i in order {
            if let Some(deferred) = &mut self.deferred {
                deferred.current = i;
            }
            let (key, change) = &changes[i];
            applied[i] = self.apply(key, change, now, source).map_err(|e| (i, e))?;
        }
        let mut held = self.deferred.take().unwrap_or_default().entries;
        held.sort_unstable_by_key(|entry| entry.0); // one entry per change
        for (i, kind, id, school, previous) in held {
            self.enter(kind, id, school, previous).map_err(|e| (i, e))?;
        }
        Ok(applied)
    }

    /// Enters a change in the change log (also under the school it left,
    /// so that that school's followers learn of it), or holds it back
    /// while a batch is applied in key order.
    fn enter(&mut self, kind: EntityKind, id: Id, school: Id, previous: Option<Id>) -> Result<()> {
        if let Some(deferred) = &mut self.deferred {
            deferred
                .entries
                .push((deferred.current, kind, id, school, previous));
            return Ok(());
        }
        match previous {
            Some(previous) => self.log.record(kind, id, &[school, previous]),
            None => self.log.record(kind, id, &[school]),
        }
    }

    /// Reconciles schools inside an open write transaction: first every
    /// record of every school in key order (neighbouring inserts share
    /// B-tree pages), then per school the deletion of what its snapshot
    /// lacks.
    pub(super) fn reconcile(
        &mut self,
        snapshots: &[SchoolSnapshot],
        now: Timestamp,
        source: SyncSource,
        dry_run: bool,
    ) -> Result<Vec<ReconcileReport>> {
        let mut reports: Vec<ReconcileReport> = snapshots
            .iter()
            .map(|s| ReconcileReport::start(s, dry_run))
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
    pub(super) fn delete_absent(
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
    pub(super) fn prior(&self, kind: EntityKind, id: Id) -> Result<Prior> {
        let entities = &self.entities[kind_slot(kind)];
        let live: Option<Record<Entity>> = entities
            .get(id)?
            .map(|v| decode_record(id, v.value()))
            .transpose()?;
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
    pub(super) fn apply(
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
    pub(super) fn apply_foreign(
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
    pub(super) fn apply_over(
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
        // The index entries of the old and the new version: an update that
        // keeps an entry (the same school, teacher or class: most updates)
        // leaves it alone instead of removing and inserting it again.
        let old_keys = live.as_ref().map(|old| IndexKeys::of(&old.data, id));
        let new_keys = match change {
            Change::Upsert(entity) => Some(IndexKeys::of(entity, id)),
            Change::Delete { .. } => None,
        };
        if let Some(old) = &old_keys {
            let new = new_keys.as_ref();
            if new.map(|n| n.school) != Some(old.school) {
                self.by_school[kind_slot(kind)].remove(old.school)?;
            }
            if let Some((teacher, class)) = old.assignment {
                let new = new.and_then(|n| n.assignment);
                if new.map(|n| n.0) != Some(teacher) {
                    self.by_teacher.remove(teacher)?;
                }
                if new != Some((teacher, class)) {
                    self.by_class.remove(class)?;
                }
                stale_docs.push(teacher.0);
            }
        }
        match change {
            Change::Upsert(entity) => {
                let record = Record {
                    data: entity,
                    key: *key,
                    last_synced_at: now,
                    source,
                };
                entities.insert(id, encode_record(&record).as_slice())?;
                if live.is_none() {
                    self.tombstones.remove((kind.code(), id))?;
                }
                let new = new_keys.expect("an upsert's index entries");
                let old = old_keys.as_ref();
                if old.map(|o| o.school) != Some(new.school) {
                    self.by_school[kind_slot(kind)].insert(new.school, ())?;
                }
                if let Some((teacher, class)) = new.assignment {
                    let old = old.and_then(|o| o.assignment);
                    if old.map(|o| o.0) != Some(teacher) {
                        self.by_teacher.insert(teacher, ())?;
                    }
                    if old != Some((teacher, class)) {
                        self.by_class.insert(class, teacher.0)?;
                    }
                    stale_docs.push(teacher.0);
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
        let school = change.school_id().as_u128();
        self.enter(kind, id, school, prior_school.filter(|&p| p != school))?;
        Ok(true)
    }
}

/// The keys of an entity's entries in the by-school index and, for an
/// assignment, the by-teacher and by-class indexes (the latter's value is
/// the teacher: `(class, id)` with `teacher.0`).
struct IndexKeys {
    school: (Id, Id),
    /// (teacher, id), (class, id).
    assignment: Option<((Id, Id), (Id, Id))>,
}

impl IndexKeys {
    fn of(entity: &Entity, id: Id) -> IndexKeys {
        IndexKeys {
            school: (entity.school_id().as_u128(), id),
            assignment: match entity {
                Entity::Assignment(a) => {
                    Some(((a.teacher_id.as_u128(), id), (a.class_id.as_u128(), id)))
                }
                _ => None,
            },
        }
    }
}

//! The store's promises: one transaction per batch, the format-version
//! guard, and the convergence rule's edge cases on a real file.

use emis_edge::domain::{EntityKind, EventType, SyncSource};
use emis_edge::store::{Batch, DeadLetter, Store, StoreError, StoreOptions};
use redb::{ReadableDatabase, ReadableTable, TableDefinition};
use serde_json::json;

use crate::support::*;

fn open(dir: &tempfile::TempDir) -> Store {
    Store::open(&dir.path().join("s.redb"), &StoreOptions::default()).unwrap()
}

fn class_event(t: EventType, n: u128, ts: i64, version: Option<u64>, name: &str) -> Vec<u8> {
    let env = envelope(
        t,
        id(9000 + ts as u128 + version.unwrap_or(0) as u128 * 7),
        T0 + ts * SEC,
        version,
        school(1),
    );
    let body = if t.is_delete() {
        json!({"classId": id(n)})
    } else {
        class_fields(id(n), name)
    };
    merge(env, body).to_string().into_bytes()
}

fn apply_raw(store: &Store, items: &[(EventType, Vec<u8>)]) -> emis_edge::store::ApplyReport {
    let changes = items
        .iter()
        .map(|(t, raw)| {
            let e = emis_edge::domain::Event::parse(*t, raw).unwrap();
            (e.key, e.change)
        })
        .collect();
    store
        .apply_batch(&batch(changes), T0, SyncSource::Kafka)
        .unwrap()
}

#[test]
fn a_failed_batch_leaves_neither_its_data_nor_its_offsets() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir);
    let b = Batch {
        offsets: offsets("emis.class.created", 0, 42),
        dead_letters: vec![DeadLetter::new(
            "emis.class.created",
            0,
            40,
            b"{",
            "not valid JSON".into(),
            T0,
        )],
        ..batch(vec![parse(
            EventType::ClassCreated,
            &merge(
                envelope(EventType::ClassCreated, id(1), T0, None, school(1)),
                class_fields(id(7), "Lớp 10A1"),
            ),
        )])
    };
    store.fail_next_commit();
    assert!(matches!(
        store.apply_batch(&b, T0, SyncSource::Kafka),
        Err(StoreError::InjectedFault)
    ));
    let check_empty = |store: &Store| {
        let r = store.read().unwrap();
        assert!(
            r.class(id(7)).unwrap().is_none(),
            "data of the failed batch is visible"
        );
        assert!(
            r.offsets().unwrap().is_empty(),
            "offsets of the failed batch were kept"
        );
        assert!(r.dead_letters(10).unwrap().is_empty());
        assert!(r.stats().unwrap().counters.is_empty());
    };
    check_empty(&store);
    drop(store);
    let store = open(&dir);
    check_empty(&store);

    // The retry applies it exactly once, and it survives a reopen.
    let report = store.apply_batch(&b, T0, SyncSource::Kafka).unwrap();
    assert_eq!((report.applied, report.dead_lettered), (1, 1));
    drop(store);
    let store = open(&dir);
    let r = store.read().unwrap();
    assert_eq!(r.class(id(7)).unwrap().unwrap().data.class_name, "Lớp 10A1");
    assert_eq!(r.offsets().unwrap()[0].next_offset, 42);
    assert_eq!(r.stats().unwrap().counters["events_applied"], 1);
}

#[test]
fn a_store_of_a_newer_format_is_refused_and_left_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.redb");
    drop(open(&dir));
    {
        let db = redb::Database::open(&path).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let meta: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
            let mut t = txn.open_table(meta).unwrap();
            t.insert("format_version", 99u32.to_le_bytes().as_slice())
                .unwrap();
        }
        txn.commit().unwrap();
    }
    let before = std::fs::read(&path).unwrap();
    let err = Store::open(&path, &StoreOptions::default())
        .err()
        .expect("must refuse");
    let text = err.to_string();
    assert!(
        matches!(err, StoreError::NewerFormat { found: 99, .. }),
        "{text}"
    );
    assert!(
        text.contains("format version 99") && text.contains("not changed"),
        "{text}"
    );
    assert_eq!(
        std::fs::read(&path).unwrap(),
        before,
        "the file was rewritten"
    );
}

#[test]
fn a_redb_file_of_another_program_is_refused_and_left_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.redb");
    {
        let db = redb::Database::create(&path).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let other: TableDefinition<u64, u64> = TableDefinition::new("something_else");
            txn.open_table(other).unwrap().insert(1, 2).unwrap();
        }
        txn.commit().unwrap();
    }
    let before = std::fs::read(&path).unwrap();
    let err = Store::open(&path, &StoreOptions::default())
        .err()
        .expect("must refuse");
    assert!(matches!(err, StoreError::Foreign { .. }), "{err}");
    assert_eq!(std::fs::read(&path).unwrap(), before);
    let _ = redb::Database::open(&path).unwrap().begin_read().unwrap();
}

#[test]
fn an_update_before_its_create_keeps_the_update() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir);
    let update = class_event(EventType::ClassUpdated, 5, 2, Some(2), "Lớp 10A1 (mới)");
    let create = class_event(EventType::ClassCreated, 5, 1, Some(1), "Lớp 10A1");
    let r1 = apply_raw(&store, &[(EventType::ClassUpdated, update)]);
    let r2 = apply_raw(&store, &[(EventType::ClassCreated, create)]);
    assert_eq!((r1.applied, r2.applied, r2.stale), (1, 0, 1));
    let class = store.read().unwrap().class(id(5)).unwrap().unwrap();
    assert_eq!(class.data.class_name, "Lớp 10A1 (mới)");
}

#[test]
fn a_late_older_update_cannot_bring_a_deleted_entity_back_but_a_newer_create_can() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir);
    apply_raw(
        &store,
        &[(
            EventType::ClassCreated,
            class_event(EventType::ClassCreated, 5, 1, None, "A"),
        )],
    );
    apply_raw(
        &store,
        &[(
            EventType::ClassDeleted,
            class_event(EventType::ClassDeleted, 5, 3, None, ""),
        )],
    );
    let late = apply_raw(
        &store,
        &[(
            EventType::ClassUpdated,
            class_event(EventType::ClassUpdated, 5, 2, None, "B"),
        )],
    );
    assert_eq!(late.stale, 1);
    let r = store.read().unwrap();
    assert!(r.class(id(5)).unwrap().is_none());
    assert!(r.tombstone(EntityKind::Class, id(5)).unwrap().is_some());
    assert_eq!(
        r.page(EntityKind::Class, school(1), None, 10)
            .unwrap()
            .items
            .len(),
        0
    );
    drop(r);
    apply_raw(
        &store,
        &[(
            EventType::ClassCreated,
            class_event(EventType::ClassCreated, 5, 4, None, "C"),
        )],
    );
    let r = store.read().unwrap();
    assert_eq!(r.class(id(5)).unwrap().unwrap().data.class_name, "C");
    assert!(r.tombstone(EntityKind::Class, id(5)).unwrap().is_none());
}

#[test]
fn the_same_event_three_times_applies_once() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir);
    let e = class_event(EventType::ClassCreated, 5, 1, Some(1), "A");
    let report = apply_raw(
        &store,
        &[
            (EventType::ClassCreated, e.clone()),
            (EventType::ClassCreated, e.clone()),
            (EventType::ClassCreated, e),
        ],
    );
    assert_eq!((report.applied, report.stale), (1, 2));
}

#[test]
fn moving_a_class_to_another_school_moves_it_in_the_school_lists() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir);
    let created = parse(
        EventType::ClassCreated,
        &merge(
            envelope(EventType::ClassCreated, id(1), T0, Some(1), school(1)),
            class_fields(id(5), "A"),
        ),
    );
    let moved = parse(
        EventType::ClassUpdated,
        &merge(
            envelope(EventType::ClassUpdated, id(2), T0, Some(2), school(2)),
            class_fields(id(5), "A"),
        ),
    );
    store
        .apply_batch(&batch(vec![created, moved]), T0, SyncSource::Kafka)
        .unwrap();
    let r = store.read().unwrap();
    assert!(r
        .page(EntityKind::Class, school(1), None, 10)
        .unwrap()
        .items
        .is_empty());
    assert_eq!(
        r.page(EntityKind::Class, school(2), None, 10)
            .unwrap()
            .items
            .len(),
        1
    );
}

#[test]
fn tombstones_are_purged_after_retention_only() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir);
    let delete = parse(
        EventType::TeacherDeleted,
        &merge(
            envelope(EventType::TeacherDeleted, id(1), T0, None, school(1)),
            json!({"teacherId": id(3)}),
        ),
    );
    store
        .apply_batch(&batch(vec![delete]), T0, SyncSource::Kafka)
        .unwrap();
    let day = 86_400 * SEC;
    assert_eq!(store.purge_tombstones(T0 + 29 * day, 30 * day).unwrap(), 0);
    assert_eq!(store.purge_tombstones(T0 + 31 * day, 30 * day).unwrap(), 1);
    assert!(store
        .read()
        .unwrap()
        .tombstone(EntityKind::Teacher, id(3))
        .unwrap()
        .is_none());
}

fn teacher_doc(store: &Store, teacher: uuid::Uuid) -> serde_json::Value {
    let body = store.read().unwrap().teacher_detail_body(teacher).unwrap();
    serde_json::from_slice(&body.expect("teacher known")).unwrap()
}

#[test]
fn a_class_rename_shows_in_its_teachers_documents_before_and_after_rendering() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir);
    let t = |e: EventType, ts: i64, body: serde_json::Value| {
        parse(
            e,
            &merge(
                envelope(
                    e,
                    id(7000 + ts as u128),
                    T0 + ts * SEC,
                    Some(ts as u64),
                    school(1),
                ),
                body,
            ),
        )
    };
    store
        .apply_batch(
            &batch(vec![
                t(
                    EventType::TeacherCreated,
                    1,
                    teacher_fields(id(1), "Lê Thị Lan"),
                ),
                t(EventType::ClassCreated, 2, class_fields(id(2), "Lớp 10A1")),
                t(
                    EventType::AssignmentCreated,
                    3,
                    assignment_fields(id(3), id(1), id(2), "homeroom"),
                ),
            ]),
            T0,
            SyncSource::Kafka,
        )
        .unwrap();
    assert_eq!(store.read().unwrap().pending_docs().unwrap(), 1);
    assert_eq!(store.materialize(100, T0).unwrap(), 1);
    assert_eq!(store.read().unwrap().pending_docs().unwrap(), 0);
    assert_eq!(
        teacher_doc(&store, id(1))["classAssignments"][0]["className"],
        "Lớp 10A1"
    );

    // The class changes: the teacher's stored document is dropped at once.
    store
        .apply_batch(
            &batch(vec![t(
                EventType::ClassUpdated,
                4,
                class_fields(id(2), "Lớp 10A9"),
            )]),
            T0,
            SyncSource::Kafka,
        )
        .unwrap();
    assert_eq!(
        teacher_doc(&store, id(1))["classAssignments"][0]["className"],
        "Lớp 10A9"
    );
    store.materialize(100, T0).unwrap();
    assert_eq!(
        teacher_doc(&store, id(1))["classAssignments"][0]["className"],
        "Lớp 10A9"
    );

    // Deleted, the class takes the assignment out of the document.
    store
        .apply_batch(
            &batch(vec![t(
                EventType::ClassDeleted,
                5,
                json!({"classId": id(2)}),
            )]),
            T0,
            SyncSource::Kafka,
        )
        .unwrap();
    store.materialize(100, T0).unwrap();
    assert_eq!(teacher_doc(&store, id(1))["classAssignments"], json!([]));
}

#[test]
fn a_format_1_store_is_upgraded_in_place_and_keeps_its_data() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.redb");
    {
        let store = open(&dir);
        store
            .apply_batch(
                &batch(vec![
                    parse(
                        EventType::TeacherCreated,
                        &merge(
                            envelope(EventType::TeacherCreated, id(90), T0, Some(1), school(1)),
                            teacher_fields(id(1), "Phạm Văn Nam"),
                        ),
                    ),
                    parse(
                        EventType::ClassCreated,
                        &merge(
                            envelope(EventType::ClassCreated, id(91), T0, Some(1), school(1)),
                            class_fields(id(2), "Lớp 6A1"),
                        ),
                    ),
                    parse(
                        EventType::AssignmentCreated,
                        &merge(
                            envelope(EventType::AssignmentCreated, id(92), T0, Some(1), school(1)),
                            assignment_fields(id(3), id(1), id(2), "subject"),
                        ),
                    ),
                ]),
                T0,
                SyncSource::Kafka,
            )
            .unwrap();
    }
    // Turn it into what release 1 wrote: no class index, no documents.
    {
        let db = redb::Database::open(&path).unwrap();
        let txn = db.begin_write().unwrap();
        for name in [
            "assignment_by_class",
            "teacher_docs",
            "pending_docs",
            "feed_log",
            "feed_entries",
        ] {
            txn.delete_table(TableDefinition::<u128, ()>::new(name))
                .unwrap();
        }
        let mut meta = txn
            .open_table(TableDefinition::<&str, &[u8]>::new("meta"))
            .unwrap();
        for key in ["store_id", "feed_seq", "feed_floor"] {
            meta.remove(key).unwrap();
        }
        meta.insert("format_version", 1u32.to_le_bytes().as_slice())
            .unwrap();
        drop(meta);
        txn.commit().unwrap();
    }
    let store = open(&dir);
    assert_eq!(
        store.read().unwrap().pending_docs().unwrap(),
        1,
        "every teacher queued"
    );
    // Upgraded through format 2 to the change log: every entity is in it.
    let feed = store
        .read()
        .unwrap()
        .changes(&[school(1)], None, 100)
        .unwrap();
    assert_eq!(feed.items.len(), 3);
    assert_eq!(
        teacher_doc(&store, id(1))["classAssignments"][0]["className"],
        "Lớp 6A1"
    );
    store.materialize(100, T0).unwrap();
    // The rebuilt class index carries a class change to the document.
    store
        .apply_batch(
            &batch(vec![parse(
                EventType::ClassUpdated,
                &merge(
                    envelope(EventType::ClassUpdated, id(93), T0, Some(2), school(1)),
                    class_fields(id(2), "Lớp 6A2"),
                ),
            )]),
            T0,
            SyncSource::Kafka,
        )
        .unwrap();
    store.materialize(100, T0).unwrap();
    assert_eq!(
        teacher_doc(&store, id(1))["classAssignments"][0]["className"],
        "Lớp 6A2"
    );
    drop(store);
    let db = redb::Database::open(&path).unwrap();
    let meta = db
        .begin_read()
        .unwrap()
        .open_table(TableDefinition::<&str, &[u8]>::new("meta"))
        .unwrap();
    assert_eq!(
        meta.get("format_version").unwrap().unwrap().value(),
        emis_edge::store::FORMAT_VERSION.to_le_bytes()
    );
}

/// Every answer a store gives about the generator's tiny province: state,
/// teacher documents, the change feed and the snapshots.
fn answers(store: &Store, p: &emis_edge::gen::Province) -> serde_json::Value {
    let r = store.read().unwrap();
    let dump = format!("{:?}", r.dump().unwrap());
    let mut docs = Vec::new();
    for s in 0..p.spec.schools {
        for t in 0..p.spec.teachers_per_school {
            let body = r.teacher_detail_body(p.teacher_id(s, t)).unwrap().unwrap();
            docs.push(String::from_utf8(body).unwrap());
        }
    }
    let feed = r.changes(&p.school_ids(), None, 1_000_000).unwrap();
    let feed: Vec<String> = feed
        .items
        .iter()
        .map(|i| format!("{} {}", i.seq, String::from_utf8(i.line()).unwrap()))
        .collect();
    let mut snapshots = Vec::new();
    for s in p.school_ids() {
        r.write_snapshot(s, |line| {
            snapshots.push(String::from_utf8(line.to_vec()).unwrap());
            std::ops::ControlFlow::Continue(())
        })
        .unwrap();
    }
    json!({ "dump": dump, "docs": docs, "feed": feed, "snapshots": snapshots })
}

/// A store of the generator's tiny province with one class deleted and
/// every document rendered.
fn tiny_province(store: &Store) -> emis_edge::gen::Province {
    let p = emis_edge::gen::Province::new(emis_edge::gen::Spec::scale("tiny", 1).unwrap());
    let mut changes = Vec::new();
    for s in 0..p.spec.schools {
        for e in p.school(s) {
            changes.push((p.initial_key(&e), emis_edge::domain::Change::Upsert(e)));
        }
    }
    store
        .apply_batch(&batch(changes), T0, SyncSource::Kafka)
        .unwrap();
    let class = p.class_id(0, 0);
    store
        .apply_batch(
            &batch(vec![parse(
                EventType::ClassDeleted,
                &merge(
                    envelope(EventType::ClassDeleted, id(77), T0, Some(9), p.school_id(0)),
                    json!({ "classId": class }),
                ),
            )]),
            T0,
            SyncSource::Kafka,
        )
        .unwrap();
    while store.materialize(1000, T0).unwrap() > 0 {}
    p
}

#[test]
fn a_format_3_store_is_upgraded_in_place_and_keeps_every_answer() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.redb");
    let (p, before) = {
        let store = open(&dir);
        let p = tiny_province(&store);
        let before = answers(&store, &p);
        (p, before)
    };
    // Turn it into what format 3 wrote: records in bincode (value format
    // 1), a copy of every assignment record in the by-teacher index, plain
    // JSON documents.
    {
        let db = redb::Database::open(&path).unwrap();
        let txn = db.begin_write().unwrap();
        let bincode = |r: &emis_edge::domain::Record<emis_edge::domain::Entity>| {
            let mut v = vec![1u8];
            v.extend(bincode::serde::encode_to_vec(r, bincode::config::standard()).unwrap());
            v
        };
        let store_answers = before["docs"].as_array().unwrap().clone();
        txn.delete_table(TableDefinition::<(u128, u128), ()>::new(
            "assignment_by_teacher",
        ))
        .unwrap();
        {
            let mut by_teacher = txn
                .open_table(TableDefinition::<(u128, u128), &[u8]>::new(
                    "assignment_by_teacher",
                ))
                .unwrap();
            let mut docs = txn
                .open_table(TableDefinition::<u128, &[u8]>::new("teacher_docs"))
                .unwrap();
            let mut n = 0;
            for s in 0..p.spec.schools {
                for t in 0..p.spec.teachers_per_school {
                    let doc = store_answers[n].as_str().unwrap();
                    docs.insert(p.teacher_id(s, t).as_u128(), doc.as_bytes())
                        .unwrap();
                    n += 1;
                }
            }
            for s in 0..p.spec.schools {
                for e in p.school(s) {
                    let mut record = p.record(e.clone());
                    record.last_synced_at = T0;
                    record.source = SyncSource::Kafka;
                    let table = match e.kind() {
                        EntityKind::Class => "classes",
                        EntityKind::Teacher => "teachers",
                        EntityKind::Assignment => "assignments",
                    };
                    let mut entities = txn
                        .open_table(TableDefinition::<u128, &[u8]>::new(table))
                        .unwrap();
                    if entities.get(e.id().as_u128()).unwrap().is_none() {
                        continue; // deleted
                    }
                    entities
                        .insert(e.id().as_u128(), bincode(&record).as_slice())
                        .unwrap();
                    if let emis_edge::domain::Entity::Assignment(a) = &e {
                        by_teacher
                            .insert(
                                (a.teacher_id.as_u128(), a.assignment_id.as_u128()),
                                bincode(&record).as_slice(),
                            )
                            .unwrap();
                    }
                }
            }
            let mut meta = txn
                .open_table(TableDefinition::<&str, &[u8]>::new("meta"))
                .unwrap();
            meta.insert("format_version", 3u32.to_le_bytes().as_slice())
                .unwrap();
        }
        txn.commit().unwrap();
    }
    let store = open(&dir);
    assert_eq!(
        answers(&store, &p),
        before,
        "the same answers after the upgrade"
    );
    // Changes go on as before: a class rename reaches its teachers.
    let class = p.class_id(0, 1);
    let mut renamed = p.class(0, 1);
    renamed.class_name = "Lớp 12Z9".into();
    let mut fields = serde_json::to_value(&renamed).unwrap();
    fields["classId"] = json!(class);
    store
        .apply_batch(
            &batch(vec![parse(
                EventType::ClassUpdated,
                &merge(
                    envelope(EventType::ClassUpdated, id(78), T0, Some(9), p.school_id(0)),
                    fields,
                ),
            )]),
            T0,
            SyncSource::Kafka,
        )
        .unwrap();
    while store.materialize(1000, T0).unwrap() > 0 {}
    let shown = (0..p.spec.teachers_per_school)
        .map(|t| teacher_doc(&store, p.teacher_id(0, t)).to_string())
        .filter(|d| d.contains("Lớp 12Z9"))
        .count();
    assert!(
        shown > 0,
        "the renamed class shows in its teachers' documents"
    );
    drop(store);
    let db = redb::Database::open(&path).unwrap();
    let txn = db.begin_read().unwrap();
    assert_eq!(
        txn.open_table(TableDefinition::<&str, &[u8]>::new("meta"))
            .unwrap()
            .get("format_version")
            .unwrap()
            .unwrap()
            .value(),
        emis_edge::store::FORMAT_VERSION.to_le_bytes()
    );
    // The index holds keys only, and documents are compressed.
    txn.open_table(TableDefinition::<(u128, u128), ()>::new(
        "assignment_by_teacher",
    ))
    .unwrap();
    let docs = txn
        .open_table(TableDefinition::<u128, &[u8]>::new("teacher_docs"))
        .unwrap();
    let doc = docs.get(p.teacher_id(1, 0).as_u128()).unwrap().unwrap();
    assert_ne!(doc.value()[0], b'{', "stored compressed, not as JSON");
}

#[test]
fn compaction_gives_freed_pages_back_and_keeps_every_answer() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.redb");
    let store = open(&dir);
    let p = tiny_province(&store);
    // Churn: every class renamed a few times frees the pages of every
    // version before and of the documents rendered for it.
    for round in 0..4u64 {
        let mut changes = Vec::new();
        for s in 0..p.spec.schools {
            for c in 0..p.spec.classes_per_school {
                let mut class = p.class(s, c);
                class.class_name = format!("{} ({round})", class.class_name);
                let mut fields = serde_json::to_value(&class).unwrap();
                fields["classId"] = json!(class.class_id);
                let env = envelope(
                    EventType::ClassUpdated,
                    id(100_000 + u128::from(round) * 10_000 + u128::from(s * 1000 + c)),
                    T0,
                    Some(10 + round),
                    p.school_id(s),
                );
                changes.push(parse(EventType::ClassUpdated, &merge(env, fields)));
            }
        }
        store
            .apply_batch(&batch(changes), T0, SyncSource::Kafka)
            .unwrap();
        while store.materialize(1000, T0).unwrap() > 0 {}
    }
    let before = answers(&store, &p);
    let measured = store.measure_space(T0).unwrap();
    assert!(measured.free_share.unwrap() > 0.0, "{measured:?}");
    assert!(measured.live_bytes > 0);
    let teachers = measured
        .tables
        .iter()
        .find(|t| t.name == "teachers")
        .unwrap();
    assert_eq!(
        teachers.entries,
        u64::from(p.spec.schools * p.spec.teachers_per_school)
    );

    // Not while a read transaction is open: nothing changes.
    let reader = store.read().unwrap();
    assert!(matches!(store.compact(T0), Err(StoreError::Busy(_))));
    drop(reader);

    let report = store.compact(T0).unwrap();
    let (b, a) = (
        report.before.file_allocated.unwrap(),
        report.after.file_allocated.unwrap(),
    );
    assert!(a < b, "{b} → {a}");
    assert_eq!(a, emis_edge::store::allocated_bytes(&path).unwrap());
    assert!(report.after.free_share.unwrap() < report.before.free_share.unwrap());
    assert_eq!(
        answers(&store, &p),
        before,
        "the same answers after compaction"
    );
    // And it goes on working.
    store
        .apply_batch(
            &batch(vec![parse(
                EventType::ClassDeleted,
                &merge(
                    envelope(
                        EventType::ClassDeleted,
                        id(78),
                        T0,
                        Some(99),
                        p.school_id(1),
                    ),
                    json!({ "classId": p.class_id(1, 0) }),
                ),
            )]),
            T0,
            SyncSource::Kafka,
        )
        .unwrap();
    assert!(store
        .read()
        .unwrap()
        .class(p.class_id(1, 0))
        .unwrap()
        .is_none());
    let after_delete = answers(&store, &p);
    drop(store);
    assert_eq!(
        answers(&open(&dir), &p),
        after_delete,
        "and after reopening"
    );
}

/// Dead letters have a retention: at most `dead_letter_max_count` are kept
/// (a batch that adds some drops the oldest beyond it, in its own
/// transaction), and the purge drops those older than the retention;
/// oldest first, every drop counted in `dead_letters_dropped`.
#[test]
fn dead_letters_are_kept_up_to_a_count_and_an_age_oldest_dropped_first() {
    let dir = tempfile::tempdir().unwrap();
    let options = StoreOptions {
        dead_letter_max_count: 3,
        ..StoreOptions::default()
    };
    let store = Store::open(&dir.path().join("s.redb"), &options).unwrap();
    let letters = |first: i64, n: i64, at: i64| Batch {
        dead_letters: (first..first + n)
            .map(|o| {
                DeadLetter::new(
                    "emis.class.created",
                    0,
                    o,
                    b"{",
                    "not valid JSON".into(),
                    at,
                )
            })
            .collect(),
        offsets: offsets("emis.class.created", 0, first + n),
        ..Batch::default()
    };
    let kept = |store: &Store| -> Vec<i64> {
        let r = store.read().unwrap();
        let mut offsets: Vec<i64> = r
            .dead_letters(100)
            .unwrap()
            .iter()
            .map(|d| d.offset)
            .collect();
        offsets.sort_unstable();
        offsets
    };
    let dropped = |store: &Store| {
        store
            .read()
            .unwrap()
            .stats()
            .unwrap()
            .counters
            .get("dead_letters_dropped")
            .copied()
    };
    // Two at T0, then four an hour later: only the newest three stay.
    store
        .apply_batch(&letters(0, 2, T0), T0, SyncSource::Kafka)
        .unwrap();
    assert_eq!((kept(&store), dropped(&store)), (vec![0, 1], None));
    let hour = 3600 * SEC;
    store
        .apply_batch(&letters(2, 4, T0 + hour), T0 + hour, SyncSource::Kafka)
        .unwrap();
    assert_eq!(kept(&store), vec![3, 4, 5]);
    assert_eq!(store.read().unwrap().stats().unwrap().dead_letters, 3);
    assert_eq!(dropped(&store), Some(3));
    // Five more in one batch: the limit holds within a batch too.
    store
        .apply_batch(
            &letters(6, 5, T0 + 2 * hour),
            T0 + 2 * hour,
            SyncSource::Kafka,
        )
        .unwrap();
    assert_eq!(kept(&store), vec![8, 9, 10]);
    assert_eq!(dropped(&store), Some(8));
    // By age: those stored more than a day before the purge go.
    store
        .apply_batch(
            &letters(11, 1, T0 + 30 * hour),
            T0 + 30 * hour,
            SyncSource::Kafka,
        )
        .unwrap();
    assert_eq!(kept(&store), vec![9, 10, 11]);
    let day = 24 * hour;
    assert_eq!(store.purge_dead_letters(T0 + 26 * hour, day).unwrap(), 0);
    assert_eq!(
        store.purge_dead_letters(T0 + 26 * hour + 1, day).unwrap(),
        2
    );
    assert_eq!(kept(&store), vec![11]);
    assert_eq!(dropped(&store), Some(11));
    // Nothing to drop: nothing written.
    assert_eq!(store.purge_dead_letters(T0 + 27 * hour, day).unwrap(), 0);
    drop(store);
    // A lowered limit takes effect at the next purge, whatever their age.
    let options = StoreOptions {
        dead_letter_max_count: 1,
        ..StoreOptions::default()
    };
    let store = Store::open(&dir.path().join("s.redb"), &options).unwrap();
    store
        .apply_batch(
            &letters(12, 2, T0 + 31 * hour),
            T0 + 31 * hour,
            SyncSource::Kafka,
        )
        .unwrap();
    assert_eq!(kept(&store), vec![13]);
    assert_eq!(dropped(&store), Some(13));
}

/// A format 3 store holding a record and a document that no longer decode
/// still opens and upgrades, as a running node keeps serving such a store:
/// the damaged document is rendered again (the same answer), and a change
/// to the damaged assignment is refused naming it, not the whole upgrade.
#[test]
fn a_format_3_store_with_damaged_values_still_upgrades() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.redb");
    let (p, before) = {
        let store = open(&dir);
        let p = tiny_province(&store);
        let before = answers(&store, &p);
        (p, before)
    };
    let damaged = p.assignment(0, 0, 0);
    let teacher = p.teacher_id(1, 0);
    {
        let db = redb::Database::open(&path).unwrap();
        let txn = db.begin_write().unwrap();
        txn.delete_table(TableDefinition::<(u128, u128), ()>::new(
            "assignment_by_teacher",
        ))
        .unwrap();
        txn.open_table(TableDefinition::<(u128, u128), &[u8]>::new(
            "assignment_by_teacher",
        ))
        .unwrap();
        txn.open_table(TableDefinition::<u128, &[u8]>::new("assignments"))
            .unwrap()
            .insert(damaged.assignment_id.as_u128(), b"\x7fdamaged".as_slice())
            .unwrap();
        txn.open_table(TableDefinition::<u128, &[u8]>::new("teacher_docs"))
            .unwrap()
            .insert(teacher.as_u128(), b"\x7fdamaged".as_slice())
            .unwrap();
        txn.open_table(TableDefinition::<&str, &[u8]>::new("meta"))
            .unwrap()
            .insert("format_version", 3u32.to_le_bytes().as_slice())
            .unwrap();
        txn.commit().unwrap();
    }
    let store = open(&dir);
    {
        let r = store.read().unwrap();
        assert_eq!(r.pending_docs().unwrap(), 1, "the damaged document queued");
        let body = r.teacher_detail_body(teacher).unwrap().unwrap();
        let n = p.spec.teachers_per_school as usize; // teacher (1, 0)
        assert_eq!(
            String::from_utf8(body).unwrap(),
            before["docs"][n].as_str().unwrap()
        );
    }
    while store.materialize(1000, T0).unwrap() > 0 {}
    assert_eq!(store.read().unwrap().pending_docs().unwrap(), 0);
    let mut changed = damaged.clone();
    changed.subject = Some("Hoá học".into());
    let key = p.initial_key(&emis_edge::domain::Entity::Assignment(damaged.clone()));
    let refused = store.apply_batch(
        &batch(vec![(
            emis_edge::domain::OrderKey {
                version: key.version.map(|v| v + 1),
                ..key
            },
            emis_edge::domain::Change::Upsert(emis_edge::domain::Entity::Assignment(changed)),
        )]),
        T0,
        SyncSource::Kafka,
    );
    assert!(
        matches!(refused, Err(StoreError::Refused { index: 0, .. })),
        "{refused:?}"
    );
}

/// The freshness walk (`oldest_synced`, behind the per-school gauge of
/// `/metrics`) reads each table once in key order; it must give what
/// looking at every school's records one by one gives: the oldest
/// `lastSyncedAt` per listed school, none for a school without records,
/// and nothing of a school not asked for.
#[test]
fn the_freshness_walk_finds_each_schools_oldest_record() {
    let p = emis_edge::gen::Province::new(emis_edge::gen::Spec::scale("tiny", 1).unwrap());
    let store = Store::open_in_memory().unwrap();
    // School s synced at T0 + s hours; then one teacher and one assignment
    // of school 1 again, later: its oldest record is still of T0 + 1 h.
    for s in 0..p.spec.schools {
        let changes = p
            .school(s)
            .into_iter()
            .map(|e| (p.initial_key(&e), emis_edge::domain::Change::Upsert(e)))
            .collect();
        let now = T0 + i64::from(s) * 3600 * SEC;
        store
            .apply_batch(&batch(changes), now, SyncSource::Kafka)
            .unwrap();
    }
    let again: Vec<_> = p
        .school(1)
        .into_iter()
        .filter(|e| matches!(e.kind(), EntityKind::Teacher | EntityKind::Assignment))
        .take(2)
        .map(|e| {
            let mut key = p.initial_key(&e);
            key.version = key.version.map(|v| v + 1);
            key.timestamp += SEC;
            (key, emis_edge::domain::Change::Upsert(e))
        })
        .collect();
    store
        .apply_batch(&batch(again), T0 + 9 * 3600 * SEC, SyncSource::Kafka)
        .unwrap();

    let absent = uuid::Uuid::from_u128(424242);
    let asked = vec![p.school_id(2), absent, p.school_id(1)];
    let r = store.read().unwrap();
    let walked = r.oldest_synced(&asked).unwrap();
    let mut one_by_one = Vec::new();
    for &s in &asked {
        let mut oldest: Option<i64> = None;
        r.for_each_in_school(s, |_, record| {
            oldest = Some(oldest.map_or(record.last_synced_at, |o| o.min(record.last_synced_at)));
            std::ops::ControlFlow::Continue(())
        })
        .unwrap();
        one_by_one.extend(oldest.map(|t| (s, t)));
    }
    assert_eq!(walked, one_by_one);
    assert_eq!(
        walked,
        vec![
            (p.school_id(2), T0 + 2 * 3600 * SEC),
            (p.school_id(1), T0 + 3600 * SEC)
        ]
    );
}

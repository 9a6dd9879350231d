//! The store's promises: one transaction per batch, the format-version
//! guard, and the convergence rule's edge cases on a real file.

use emis_edge::domain::{EntityKind, EventType, SyncSource};
use emis_edge::store::{Batch, DeadLetter, Store, StoreError, StoreOptions};
use redb::{ReadableDatabase, TableDefinition};
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

//! The change log behind the change feed (contract §6), at the store's
//! interface: positions of applied changes, pages after a cursor, expiry,
//! the commit notification, a follower applying pages, and the upgrade of
//! a format-2 store.

use std::collections::BTreeSet;

use emis_edge::domain::{
    Change, Cursor, EntityKind, EventType, FeedLine, OrderKey, SchoolFilter, SchoolSnapshot,
    SyncSource,
};
use emis_edge::store::{ChangesPage, FeedError, FeedItem, FeedState, Store, StoreOptions};
use redb::{ReadableDatabase, TableDefinition};
use serde_json::{json, Value};
use uuid::Uuid;

use crate::support::*;

/// An event of entity `n` of `kind` at `T0 + ts` s, version `ts`, in
/// `school_n`; `n` also makes the event id.
fn ev(t: EventType, n: u128, ts: i64, school_n: u128) -> (OrderKey, Change) {
    let entity = id(n);
    let body = match (t.kind(), t.is_delete()) {
        (kind, true) => json!({ kind.id_field(): entity }),
        (EntityKind::Class, false) => class_fields(entity, &format!("Lớp {ts}")),
        (EntityKind::Teacher, false) => teacher_fields(entity, &format!("Giáo viên {ts}")),
        (EntityKind::Assignment, false) => assignment_fields(entity, id(900), id(901), "subject"),
    };
    parse(
        t,
        &merge(
            envelope(
                t,
                id(10_000 + n * 100 + ts as u128),
                T0 + ts * SEC,
                Some(ts as u64),
                school(school_n),
            ),
            body,
        ),
    )
}

fn apply(store: &Store, changes: Vec<(OrderKey, Change)>) {
    store
        .apply_batch(&batch(changes), T0, SyncSource::Kafka)
        .unwrap();
}

fn page(store: &Store, schools: &[u128], after: Option<&Cursor>, limit: usize) -> ChangesPage {
    let schools: Vec<Uuid> = schools.iter().map(|&s| school(s)).collect();
    store
        .read()
        .unwrap()
        .changes(&schools, after, limit)
        .unwrap()
}

/// (kind, id, deleted) of each item, in order.
fn ids(items: &[FeedItem]) -> Vec<(EntityKind, Uuid, bool)> {
    items
        .iter()
        .map(|i| {
            (
                i.kind(),
                i.id(),
                matches!(i.state, FeedState::Deleted { .. }),
            )
        })
        .collect()
}

/// Reads the whole feed of `schools` in pages of `limit`, checking that
/// every page but the last is full and says `more`.
fn read_all(
    store: &Store,
    schools: &[u128],
    after: Option<&Cursor>,
    limit: usize,
) -> (Vec<FeedItem>, Cursor) {
    let mut cursor = after.copied();
    let mut out = Vec::new();
    for _ in 0..10_000 {
        let p = page(store, schools, cursor.as_ref(), limit);
        if p.more {
            assert_eq!(p.items.len(), limit, "a page with more is full");
        }
        out.extend(p.items);
        cursor = Some(p.next);
        if !p.more {
            return (out, p.next);
        }
    }
    panic!("the feed never ends");
}

fn expired(store: &Store, schools: &[u128], after: &Cursor) -> String {
    let schools: Vec<Uuid> = schools.iter().map(|&s| school(s)).collect();
    match store.read().unwrap().changes(&schools, Some(after), 10) {
        Err(FeedError::Expired { why }) => why,
        other => panic!("expected an expired cursor, got {other:?}"),
    }
}

#[test]
fn an_entity_changed_three_times_appears_once_at_its_latest_position() {
    let store = Store::open_in_memory().unwrap();
    apply(&store, vec![ev(EventType::TeacherCreated, 1, 1, 1)]);
    apply(&store, vec![ev(EventType::ClassCreated, 2, 1, 1)]);
    apply(&store, vec![ev(EventType::TeacherUpdated, 1, 2, 1)]);
    apply(&store, vec![ev(EventType::TeacherUpdated, 1, 3, 1)]);
    // A stale event and a duplicate change nothing and take no position.
    apply(
        &store,
        vec![
            ev(EventType::TeacherUpdated, 1, 2, 1),
            ev(EventType::TeacherUpdated, 1, 3, 1),
        ],
    );
    let p = page(&store, &[1], None, 100);
    assert!(!p.more);
    assert_eq!(
        ids(&p.items),
        [
            (EntityKind::Class, id(2), false),
            (EntityKind::Teacher, id(1), false)
        ]
    );
    assert_eq!(p.items[1].seq, 4, "the teacher's latest change");
    let FeedState::Live(teacher) = &p.items[1].state else {
        unreachable!()
    };
    assert_eq!(teacher.key.version, Some(3), "its current state");
    assert_eq!(p.next.seq, 4, "the head");
    assert_eq!(store.read().unwrap().feed_info().unwrap().head, 4);
    // The same position again is an empty page that stays where it is.
    let again = page(&store, &[1], Some(&p.next), 100);
    assert!(again.items.is_empty() && !again.more);
    assert_eq!(again.next, p.next);
}

#[test]
fn deletes_appear_as_delete_lines_with_the_deletes_key() {
    let store = Store::open_in_memory().unwrap();
    apply(
        &store,
        vec![
            ev(EventType::ClassCreated, 1, 1, 1),
            ev(EventType::ClassCreated, 2, 1, 1),
        ],
    );
    let before = store.read().unwrap().feed_cursor().unwrap();
    let delete = ev(EventType::ClassDeleted, 1, 2, 1);
    apply(&store, vec![delete.clone()]);
    let p = page(&store, &[1], Some(&before), 100);
    assert_eq!(ids(&p.items), [(EntityKind::Class, id(1), true)]);
    let line = p.items[0].line();
    let text = String::from_utf8_lossy(&line).into_owned();
    let v: Value = serde_json::from_slice(&line).unwrap();
    assert_eq!(v["deleted"], true, "{text}");
    assert_eq!(v["classId"], id(1).to_string(), "{text}");
    assert_eq!(v["schoolId"], school(1).to_string(), "{text}");
    assert_eq!(v["version"], 2, "{text}");
    assert_eq!(
        FeedLine::parse(line.trim_ascii_end()).unwrap(),
        FeedLine::Change {
            key: delete.0,
            change: delete.1
        },
        "a follower reads back the delete with its key"
    );
    // From the beginning the class is there once, deleted.
    let all = page(&store, &[1], None, 100);
    assert_eq!(
        ids(&all.items),
        [
            (EntityKind::Class, id(2), false),
            (EntityKind::Class, id(1), true)
        ]
    );
}

#[test]
fn pages_split_the_feed_without_gaps_or_duplicates_across_schools() {
    let store = Store::open_in_memory().unwrap();
    let mut changes = Vec::new();
    for n in 1..=40u128 {
        let t = [EventType::ClassCreated, EventType::TeacherCreated][n as usize % 2];
        changes.push(ev(t, n, 1, n % 4 + 1));
    }
    apply(&store, changes);
    // Updates and deletes move some to the end of the log.
    apply(
        &store,
        vec![
            ev(EventType::ClassUpdated, 4, 2, 1),
            ev(EventType::TeacherDeleted, 7, 2, 4),
            ev(EventType::ClassDeleted, 10, 2, 3),
        ],
    );
    let schools = [1, 2, 3];
    let (whole, end) = read_all(&store, &schools, None, 10_000);
    let expected: BTreeSet<Uuid> = (1..=40u128).filter(|n| n % 4 + 1 != 4).map(id).collect();
    assert_eq!(
        whole.iter().map(|i| i.id()).collect::<BTreeSet<_>>(),
        expected
    );
    assert_eq!(whole.len(), expected.len(), "an entity twice");
    assert!(
        whole.windows(2).all(|w| w[0].seq < w[1].seq),
        "position order"
    );
    for limit in [1, 2, 3, 7, 29] {
        let (paged, next) = read_all(&store, &schools, None, limit);
        assert_eq!(ids(&paged), ids(&whole), "pages of {limit}");
        assert_eq!(next, end);
    }
    // A change between two pages is in a later page, once.
    let first = page(&store, &schools, None, 5);
    assert!(first.more);
    let moved = first.items[0].id();
    assert_eq!(moved, id(1));
    apply(&store, vec![ev(EventType::TeacherUpdated, 1, 3, 2)]);
    let (rest, _) = read_all(&store, &schools, Some(&first.next), 4);
    assert_eq!(rest.iter().filter(|i| i.id() == moved).count(), 1);
    assert_eq!(rest.last().unwrap().id(), moved, "at its new position");
    assert_eq!(first.items.len() + rest.len(), whole.len() + 1);
}

#[test]
fn a_cursor_of_another_store_or_ahead_of_the_log_has_expired() {
    let a = Store::open_in_memory().unwrap();
    let b = Store::open_in_memory().unwrap();
    apply(&a, vec![ev(EventType::ClassCreated, 1, 1, 1)]);
    apply(&b, vec![ev(EventType::ClassCreated, 1, 1, 1)]);
    let of_a = a.read().unwrap().feed_cursor().unwrap();
    let of_b = b.read().unwrap().feed_cursor().unwrap();
    assert_ne!(of_a.store, of_b.store, "each store has its own id");
    assert_eq!(of_a.seq, of_b.seq);
    assert!(expired(&b, &[1], &of_a).contains("another store"));
    let ahead = Cursor::at(of_b.store, of_b.seq + 1);
    assert!(expired(&b, &[1], &ahead).contains("ahead"));
    assert!(page(&b, &[1], Some(&of_b), 10).items.is_empty());
}

#[test]
fn the_store_id_survives_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.redb");
    let store = Store::open(&path, &StoreOptions::default()).unwrap();
    apply(&store, vec![ev(EventType::ClassCreated, 1, 1, 1)]);
    let cursor = store.read().unwrap().feed_cursor().unwrap();
    drop(store);
    let store = Store::open(&path, &StoreOptions::default()).unwrap();
    assert_eq!(store.read().unwrap().feed_cursor().unwrap(), cursor);
    assert!(page(&store, &[1], Some(&cursor), 10).items.is_empty());
    assert_eq!(*store.subscribe().borrow(), cursor.seq);
}

#[test]
fn a_cursor_below_the_floor_after_a_purge_has_expired_and_one_above_has_not() {
    let day = 86_400 * SEC;
    let store = Store::open_in_memory().unwrap();
    apply(
        &store,
        vec![
            ev(EventType::ClassCreated, 1, 1, 1),
            ev(EventType::ClassCreated, 2, 1, 1),
            ev(EventType::ClassCreated, 3, 1, 2),
        ],
    );
    let before_delete = store.read().unwrap().feed_cursor().unwrap();
    store
        .apply_batch(
            &batch(vec![ev(EventType::ClassDeleted, 2, 2, 1)]),
            T0 + day,
            SyncSource::Kafka,
        )
        .unwrap();
    let after_delete = store.read().unwrap().feed_cursor().unwrap();
    // Another school's change after the delete.
    apply(&store, vec![ev(EventType::ClassUpdated, 3, 2, 2)]);
    let quiet = page(&store, &[1], Some(&after_delete), 10);
    assert!(quiet.items.is_empty());
    assert_eq!(quiet.next.seq, 5, "an empty page moves to the head");

    assert_eq!(store.purge_tombstones(T0 + 40 * day, 30 * day).unwrap(), 1);
    let info = store.read().unwrap().feed_info().unwrap();
    assert_eq!(info.floor, after_delete.seq, "the purged delete's position");
    let why = expired(&store, &[1], &before_delete);
    assert!(why.contains("purged"), "{why}");
    // Past the purged delete: nothing was lost.
    assert!(page(&store, &[1], Some(&after_delete), 10).items.is_empty());
    assert!(page(&store, &[1], Some(&quiet.next), 10).items.is_empty());
    // The purged entity is gone from the feed.
    let (all, _) = read_all(&store, &[1, 2], None, 10);
    assert_eq!(
        ids(&all),
        [
            (EntityKind::Class, id(1), false),
            (EntityKind::Class, id(3), false)
        ]
    );
}

#[test]
fn reading_from_the_beginning_in_small_pages_crosses_the_floor() {
    let day = 86_400 * SEC;
    let store = Store::open_in_memory().unwrap();
    let creates = (1..=6)
        .map(|n| ev(EventType::TeacherCreated, n, 1, 1))
        .collect();
    apply(&store, creates);
    store
        .apply_batch(
            &batch(vec![ev(EventType::TeacherDeleted, 3, 2, 1)]),
            T0 + day,
            SyncSource::Kafka,
        )
        .unwrap();
    store.purge_tombstones(T0 + 40 * day, 30 * day).unwrap();
    let floor = store.read().unwrap().feed_info().unwrap().floor;
    assert_eq!(floor, 7);
    // The first pages end below the floor, but a reader from the beginning
    // never held what was deleted before it began.
    let (items, next) = read_all(&store, &[1], None, 2);
    assert_eq!(items.len(), 5);
    assert_eq!(next.seq, 7);
    // A reader that began before the delete and is below the floor has
    // expired, even if it read from the beginning.
    let fresh = Store::open_in_memory().unwrap();
    apply(
        &fresh,
        (1..=6)
            .map(|n| ev(EventType::TeacherCreated, n, 1, 1))
            .collect(),
    );
    let first = page(&fresh, &[1], None, 2);
    assert!(first.more && first.next.horizon == 6);
    fresh
        .apply_batch(
            &batch(vec![ev(EventType::TeacherDeleted, 1, 2, 1)]),
            T0 + day,
            SyncSource::Kafka,
        )
        .unwrap();
    fresh.purge_tombstones(T0 + 40 * day, 30 * day).unwrap();
    let why = expired(&fresh, &[1], &first.next);
    assert!(why.contains("purged"), "{why}");
}

#[test]
fn the_commit_notification_fires_on_a_commit_that_gave_positions() {
    let store = Store::open_in_memory().unwrap();
    let mut rx = store.subscribe();
    assert_eq!(*rx.borrow_and_update(), 0);
    apply(&store, vec![ev(EventType::TeacherCreated, 1, 1, 1)]);
    assert!(rx.has_changed().unwrap(), "a commit with a change notifies");
    assert_eq!(*rx.borrow_and_update(), 1);
    // Nothing applied (a duplicate), a dry run, a rendering: no position.
    apply(&store, vec![ev(EventType::TeacherCreated, 1, 1, 1)]);
    let snapshot = SchoolSnapshot {
        school_id: school(1),
        records: vec![],
        as_of: T0 + 10 * SEC,
        cursor: None,
    };
    store
        .reconcile(&snapshot, T0, SyncSource::Resync, true)
        .unwrap();
    store.materialize(10, T0).unwrap();
    assert!(!rx.has_changed().unwrap(), "nothing new was committed");
    assert_eq!(store.read().unwrap().feed_info().unwrap().head, 1);
    // A reconcile that deletes takes a position and notifies.
    let report = store
        .reconcile(&snapshot, T0, SyncSource::Resync, false)
        .unwrap();
    assert_eq!(report.deleted, 1);
    assert!(rx.has_changed().unwrap());
    assert_eq!(*rx.borrow_and_update(), 2);
    let p = page(&store, &[1], None, 10);
    assert_eq!(ids(&p.items), [(EntityKind::Teacher, id(1), true)]);
}

#[tokio::test]
async fn a_waiter_wakes_on_the_commit() {
    let store = std::sync::Arc::new(Store::open_in_memory().unwrap());
    let mut rx = store.subscribe();
    rx.borrow_and_update();
    let writer = store.clone();
    let waiting = tokio::spawn(async move {
        rx.changed().await.unwrap();
        *rx.borrow()
    });
    tokio::task::spawn_blocking(move || apply(&writer, vec![ev(EventType::ClassCreated, 1, 1, 1)]))
        .await
        .unwrap();
    let seen = tokio::time::timeout(std::time::Duration::from_secs(10), waiting)
        .await
        .expect("the waiter was not woken")
        .unwrap();
    assert_eq!(seen, 1);
}

#[test]
fn a_commit_is_announced_with_the_schools_whose_feed_it_changed() {
    let store = Store::open_in_memory().unwrap();
    let mut rx = store.subscribe_commits();
    let schools = |ns: &[u128]| ns.iter().map(|&n| school(n)).collect::<Vec<_>>();
    apply(
        &store,
        vec![
            ev(EventType::TeacherCreated, 1, 1, 1),
            ev(EventType::ClassCreated, 2, 1, 3),
        ],
    );
    let commit = rx.try_recv().expect("a commit with changes is announced");
    assert_eq!(commit.seq, 2);
    assert!(commit.touches(&schools(&[1])) && commit.touches(&schools(&[3])));
    assert!(commit.touches(&schools(&[2, 3])));
    assert!(!commit.touches(&schools(&[2])), "school 2 did not change");
    assert!(!commit.touches(&[]));
    // A transfer changes the feed of the school it left too.
    apply(&store, vec![ev(EventType::TeacherUpdated, 1, 2, 2)]);
    let commit = rx.try_recv().unwrap();
    assert!(commit.touches(&schools(&[1])) && commit.touches(&schools(&[2])));
    assert!(!commit.touches(&schools(&[3])));
    // A commit that gave no position (a duplicate, a rendering) is not.
    apply(&store, vec![ev(EventType::TeacherUpdated, 1, 2, 2)]);
    store.materialize(10, T0).unwrap();
    assert!(rx.try_recv().is_err(), "nothing new was committed");
    // A follower's page announces its schools as well.
    let follower = Store::open_in_memory().unwrap();
    let mut rx = follower.subscribe_commits();
    let p = page(&store, &[2], None, 10);
    follower
        .apply_feed_page(
            &wire(&p),
            &p.next,
            &SchoolFilter::Only([school(2)].into()),
            T0,
        )
        .unwrap();
    let commit = rx.try_recv().unwrap();
    assert!(commit.touches(&schools(&[2])) && !commit.touches(&schools(&[1])));
}

/// The lines of a page as a follower parses them from the wire.
fn wire(p: &ChangesPage) -> Vec<(OrderKey, Change)> {
    p.items
        .iter()
        .map(
            |i| match FeedLine::parse(i.line().trim_ascii_end()).unwrap() {
                FeedLine::Change { key, change } => (key, change),
                other => panic!("not a change line: {other:?}"),
            },
        )
        .collect()
}

#[test]
fn a_follower_applies_pages_with_their_cursor_and_feeds_its_own_followers() {
    let parent = Store::open_in_memory().unwrap();
    apply(
        &parent,
        vec![
            ev(EventType::ClassCreated, 1, 1, 1),
            ev(EventType::TeacherCreated, 2, 1, 1),
            ev(EventType::ClassCreated, 3, 1, 2),
            ev(EventType::TeacherCreated, 4, 1, 1),
        ],
    );
    apply(&parent, vec![ev(EventType::TeacherDeleted, 4, 2, 1)]);
    let follower = Store::open_in_memory().unwrap();
    let mine = SchoolFilter::Only([school(1)].into());
    assert_eq!(follower.read().unwrap().upstream_cursor().unwrap(), None);
    let mut after = None;
    loop {
        let p = page(&parent, &[1], after.as_ref(), 2);
        follower
            .apply_feed_page(&wire(&p), &p.next, &mine, T0)
            .unwrap();
        after = Some(p.next);
        if !p.more {
            break;
        }
    }
    let stored = follower.read().unwrap().upstream_cursor().unwrap();
    assert_eq!(stored, after);
    let state = |s: &Store| {
        s.read()
            .unwrap()
            .dump()
            .unwrap()
            .into_iter()
            .filter(|(kind, id_, _, _)| (*kind, *id_) != (EntityKind::Class, id(3)))
            .collect::<Vec<_>>()
    };
    assert_eq!(state(&follower), state(&parent));
    // The follower's own log: a grandchild sees the same entities.
    let grandchild = page(&follower, &[1], None, 100);
    let parents = page(&parent, &[1], None, 100);
    assert_eq!(ids(&grandchild.items), ids(&parents.items));
    let FeedState::Live(r) = &grandchild.items[0].state else {
        unreachable!()
    };
    assert_eq!(r.source, SyncSource::Upstream);

    // A page whose commit fails leaves neither its lines nor its cursor.
    apply(&parent, vec![ev(EventType::ClassUpdated, 1, 5, 1)]);
    let p = page(&parent, &[1], after.as_ref(), 100);
    follower.fail_next_commit();
    assert!(follower
        .apply_feed_page(&wire(&p), &p.next, &mine, T0)
        .is_err());
    let r = follower.read().unwrap();
    assert_eq!(r.upstream_cursor().unwrap(), after);
    assert_eq!(r.class(id(1)).unwrap().unwrap().key.version, Some(1));
}

#[test]
fn a_format_2_store_is_upgraded_and_its_feed_lists_every_entity() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.redb");
    {
        let store = Store::open(&path, &StoreOptions::default()).unwrap();
        apply(
            &store,
            vec![
                ev(EventType::ClassCreated, 1, 1, 1),
                ev(EventType::TeacherCreated, 2, 1, 1),
                ev(EventType::AssignmentCreated, 3, 1, 2),
                ev(EventType::TeacherCreated, 4, 1, 2),
            ],
        );
        apply(&store, vec![ev(EventType::TeacherDeleted, 4, 2, 2)]);
    }
    // Turn it into what format 2 wrote: no change log, no store id.
    {
        let db = redb::Database::open(&path).unwrap();
        let txn = db.begin_write().unwrap();
        txn.delete_table(TableDefinition::<(u128, u64), (u8, u128)>::new("feed_log"))
            .unwrap();
        txn.delete_table(TableDefinition::<(u8, u128), &[u8]>::new("feed_entries"))
            .unwrap();
        {
            let mut meta = txn
                .open_table(TableDefinition::<&str, &[u8]>::new("meta"))
                .unwrap();
            for key in ["store_id", "feed_seq", "feed_floor"] {
                meta.remove(key).unwrap();
            }
            meta.insert("format_version", 2u32.to_le_bytes().as_slice())
                .unwrap();
        }
        txn.commit().unwrap();
    }
    let store = Store::open(&path, &StoreOptions::default()).unwrap();
    let r = store.read().unwrap();
    let info = r.feed_info().unwrap();
    assert_eq!(
        info.head, 4,
        "every live entity and tombstone got a position"
    );
    let p = r.changes(&[school(1), school(2)], None, 100).unwrap();
    let listed: BTreeSet<_> = ids(&p.items).into_iter().collect();
    let expected: BTreeSet<_> = [
        (EntityKind::Class, id(1), false),
        (EntityKind::Teacher, id(2), false),
        (EntityKind::Assignment, id(3), false),
        (EntityKind::Teacher, id(4), true),
    ]
    .into();
    assert_eq!(listed, expected);
    drop(r);
    // It goes on from there.
    apply(&store, vec![ev(EventType::ClassUpdated, 1, 3, 1)]);
    let p = page(&store, &[1], Some(&Cursor::at(info.store_id, 4)), 10);
    assert_eq!(ids(&p.items), [(EntityKind::Class, id(1), false)]);
    assert_eq!(p.items[0].seq, 5);
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

/// A school's snapshot as a follower downloads and validates it.
fn snapshot_of(store: &Store, school_n: u128) -> SchoolSnapshot {
    let mut reader = emis_edge::domain::SnapshotReader::new();
    let mut done = None;
    store
        .read()
        .unwrap()
        .write_snapshot(school(school_n), |line| {
            if let Some(s) = reader.feed(line.trim_ascii_end()) {
                done = Some(s.unwrap());
            }
            std::ops::ControlFlow::Continue(())
        })
        .unwrap();
    done.expect("a complete snapshot")
}

#[test]
fn a_follower_whose_cursor_expired_starts_again_from_a_snapshot_and_its_cursor() {
    let parent = Store::open_in_memory().unwrap();
    let creates: Vec<_> = (1..=3)
        .map(|n| ev(EventType::TeacherCreated, n, 1, 1))
        .collect();
    apply(&parent, creates.clone());
    let follower = Store::open_in_memory().unwrap();
    let mine = SchoolFilter::Only([school(1)].into());
    let p = page(&parent, &[1], None, 100);
    follower
        .apply_feed_page(&wire(&p), &p.next, &mine, T0)
        .unwrap();

    // The parent is rebuilt (a new store) and holds a different state:
    // teacher 1 is gone (a delete it got meanwhile), teacher 4 is new.
    let rebuilt = Store::open_in_memory().unwrap();
    apply(&rebuilt, creates);
    apply(
        &rebuilt,
        vec![
            ev(EventType::TeacherDeleted, 1, 2, 1),
            ev(EventType::TeacherCreated, 4, 2, 1),
        ],
    );
    let after = follower.read().unwrap().upstream_cursor().unwrap().unwrap();
    assert!(expired(&rebuilt, &[1], &after).contains("another store"));
    let snapshot = snapshot_of(&rebuilt, 1);
    let cursor = snapshot.cursor.expect("a node's snapshot has a cursor");
    let reports = follower
        .reconcile_upstream(std::slice::from_ref(&snapshot), &cursor, T0)
        .unwrap();
    assert_eq!((reports[0].applied, reports[0].deleted), (1, 1));
    assert_eq!(
        follower.read().unwrap().upstream_cursor().unwrap(),
        Some(cursor)
    );
    // It continues from the snapshot's cursor.
    apply(&rebuilt, vec![ev(EventType::TeacherUpdated, 2, 3, 1)]);
    let p = page(&rebuilt, &[1], Some(&cursor), 100);
    assert_eq!(ids(&p.items), [(EntityKind::Teacher, id(2), false)]);
    follower
        .apply_feed_page(&wire(&p), &p.next, &mine, T0)
        .unwrap();
    let live = |s: &Store| {
        s.read()
            .unwrap()
            .dump()
            .unwrap()
            .into_iter()
            .filter(|row| row.2.is_some())
            .collect::<Vec<_>>()
    };
    assert_eq!(live(&follower), live(&rebuilt));
}

//! Transfers (contract §2, "Filtering and transfers") at the store's
//! interface: an entity that moves to a school the node does not serve
//! leaves it, for Kafka batches, snapshots and feed pages alike, and the
//! change feed tells the followers of the school it left.

use emis_edge::domain::{
    Change, EntityKind, EventType, FeedLine, OrderKey, SchoolFilter, SchoolSnapshot, SyncSource,
};
use emis_edge::store::{Batch, ChangesPage, FeedState, Store};
use serde_json::Value;
use uuid::Uuid;

use crate::support::*;

/// Teacher `n` in `school_n`, version `v`, at `T0 + v` s; `tag` makes a
/// distinct event id for the same version.
fn teacher(t: EventType, n: u128, v: u64, school_n: u128, tag: u128) -> (OrderKey, Change) {
    let body = if t.is_delete() {
        serde_json::json!({ "teacherId": id(n) })
    } else {
        teacher_fields(id(n), &format!("Giáo viên v{v}"))
    };
    parse(
        t,
        &merge(
            envelope(
                t,
                id(70_000 + n * 1000 + u128::from(v) * 10 + tag),
                T0 + v as i64 * SEC,
                Some(v),
                school(school_n),
            ),
            body,
        ),
    )
}

/// One Kafka batch as ingest builds it for a node serving `served`.
fn kafka(store: &Store, served: &[u128], events: Vec<(OrderKey, Change)>) -> (u64, u64, u64) {
    let filter = only(served);
    let (changes, foreign) = events
        .into_iter()
        .partition(|(_, c)| filter.serves(c.school_id()));
    let r = store
        .apply_batch(
            &Batch {
                changes,
                foreign,
                ..Batch::default()
            },
            T0,
            SyncSource::Kafka,
        )
        .unwrap();
    (r.applied, r.transferred_out, r.skipped)
}

fn only(served: &[u128]) -> SchoolFilter {
    SchoolFilter::Only(served.iter().map(|&s| school(s)).collect())
}

fn teacher_list(store: &Store, school_n: u128) -> Vec<Uuid> {
    store
        .read()
        .unwrap()
        .page(EntityKind::Teacher, school(school_n), None, 100)
        .unwrap()
        .items
        .iter()
        .map(|r| r.data.id())
        .collect()
}

fn snapshot_ids(store: &Store, school_n: u128) -> Vec<String> {
    let mut lines = Vec::new();
    store
        .read()
        .unwrap()
        .write_snapshot(school(school_n), |l| {
            lines.push(String::from_utf8_lossy(l).into_owned());
            std::ops::ControlFlow::Continue(())
        })
        .unwrap();
    lines
}

fn feed(store: &Store, schools: &[u128]) -> ChangesPage {
    let schools: Vec<Uuid> = schools.iter().map(|&s| school(s)).collect();
    store.read().unwrap().changes(&schools, None, 100).unwrap()
}

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
fn a_transfer_out_removes_the_entity_with_the_upserts_key_and_a_transfer_back_brings_it_in() {
    let store = Store::open_in_memory().unwrap();
    let served = [1];
    kafka(
        &store,
        &served,
        vec![teacher(EventType::TeacherCreated, 1, 1, 1, 0)],
    );
    assert_eq!(teacher_list(&store, 1), [id(1)]);

    let out = teacher(EventType::TeacherUpdated, 1, 3, 2, 0);
    assert_eq!(kafka(&store, &served, vec![out.clone()]), (0, 1, 0));
    let r = store.read().unwrap();
    assert!(r.teacher(id(1)).unwrap().is_none(), "still served by id");
    assert!(r.teacher_detail_body(id(1)).unwrap().is_none());
    let tomb = r.tombstone(EntityKind::Teacher, id(1)).unwrap().unwrap();
    assert_eq!(tomb.key, out.0, "the upsert's key, as it is");
    assert_eq!(tomb.school_id, school(2), "the school it moved to");
    drop(r);
    assert!(teacher_list(&store, 1).is_empty());
    assert_eq!(snapshot_ids(&store, 1).len(), 1, "only the end line");

    // The same upsert again is a duplicate; older events cannot bring it
    // back, from either school.
    assert_eq!(kafka(&store, &served, vec![out]), (0, 0, 1));
    assert_eq!(
        kafka(
            &store,
            &served,
            vec![
                teacher(EventType::TeacherUpdated, 1, 2, 1, 0),
                teacher(EventType::TeacherUpdated, 1, 2, 2, 1),
            ]
        ),
        (0, 0, 1)
    );
    assert!(teacher_list(&store, 1).is_empty());

    // A later transfer back in brings it in.
    assert_eq!(
        kafka(
            &store,
            &served,
            vec![teacher(EventType::TeacherUpdated, 1, 4, 1, 0)]
        ),
        (1, 0, 0)
    );
    assert_eq!(teacher_list(&store, 1), [id(1)]);
    let counters = store.read().unwrap().stats().unwrap().counters;
    assert_eq!(counters["events_transferred_out"], 1);
    assert_eq!(counters["events_skipped"], 2);
}

#[test]
fn an_entity_never_held_is_only_skipped_and_a_tombstone_takes_a_newer_key() {
    let store = Store::open_in_memory().unwrap();
    assert_eq!(
        kafka(
            &store,
            &[1],
            vec![teacher(EventType::TeacherCreated, 1, 1, 2, 0)]
        ),
        (0, 0, 1)
    );
    let r = store.read().unwrap();
    assert!(!r.has_data().unwrap(), "nothing stored for another school");
    assert_eq!(r.feed_info().unwrap().head, 0, "no position");
    drop(r);

    // Deleted here, then moved elsewhere: the tombstone keeps up, so an
    // update older than the move cannot bring it back.
    kafka(
        &store,
        &[1],
        vec![
            teacher(EventType::TeacherCreated, 2, 1, 1, 0),
            teacher(EventType::TeacherDeleted, 2, 2, 1, 0),
        ],
    );
    let moved = teacher(EventType::TeacherUpdated, 2, 5, 3, 0);
    assert_eq!(kafka(&store, &[1], vec![moved.clone()]), (0, 0, 1));
    let tomb = store
        .read()
        .unwrap()
        .tombstone(EntityKind::Teacher, id(2))
        .unwrap()
        .unwrap();
    assert_eq!((tomb.key, tomb.school_id), (moved.0, school(3)));
    assert_eq!(
        kafka(
            &store,
            &[1],
            vec![teacher(EventType::TeacherUpdated, 2, 4, 1, 0)]
        ),
        (0, 0, 0),
        "stale"
    );
    assert!(teacher_list(&store, 1).is_empty());
}

#[test]
fn a_create_and_its_transfer_out_in_one_batch_end_in_the_transfer_in_either_order() {
    for reversed in [false, true] {
        let store = Store::open_in_memory().unwrap();
        let mut events = vec![
            teacher(EventType::TeacherCreated, 1, 1, 1, 0),
            teacher(EventType::TeacherUpdated, 1, 2, 2, 0),
        ];
        if reversed {
            events.reverse();
        }
        assert_eq!(
            kafka(&store, &[1], events),
            (1, 1, 0),
            "reversed: {reversed}"
        );
        assert!(teacher_list(&store, 1).is_empty());
    }
}

#[test]
fn a_delete_naming_another_school_removes_an_entity_held_here() {
    // It moved there (an event this node has not seen, or never will) and
    // was deleted: it is gone, whatever school it was in here.
    let store = Store::open_in_memory().unwrap();
    kafka(
        &store,
        &[1],
        vec![teacher(EventType::TeacherCreated, 1, 1, 1, 0)],
    );
    assert_eq!(
        kafka(
            &store,
            &[1],
            vec![teacher(EventType::TeacherDeleted, 1, 3, 2, 0)]
        ),
        (0, 1, 0)
    );
    assert!(teacher_list(&store, 1).is_empty());
    // The move arriving late is older: nothing changes.
    assert_eq!(
        kafka(
            &store,
            &[1],
            vec![teacher(EventType::TeacherUpdated, 1, 2, 2, 0)]
        ),
        (0, 0, 1)
    );
}

#[test]
fn a_transfer_is_in_the_old_schools_feed_and_followers_of_it_remove_the_entity() {
    // A parent serving every school: the teacher moves from school 1 to 2.
    let parent = Store::open_in_memory().unwrap();
    kafka(
        &parent,
        &[1, 2],
        vec![
            teacher(EventType::TeacherCreated, 1, 1, 1, 0),
            teacher(EventType::TeacherCreated, 2, 1, 1, 0),
        ],
    );
    let follower = Store::open_in_memory().unwrap();
    let page = feed(&parent, &[1]);
    follower
        .apply_feed_page(&wire(&page), &page.next, &only(&[1]), T0)
        .unwrap();
    let grandchild = Store::open_in_memory().unwrap();
    let page = feed(&follower, &[1]);
    grandchild
        .apply_feed_page(&wire(&page), &page.next, &only(&[1]), T0)
        .unwrap();
    assert_eq!(teacher_list(&grandchild, 1), [id(1), id(2)]);

    let moved = teacher(EventType::TeacherUpdated, 1, 2, 2, 0);
    kafka(&parent, &[1, 2], vec![moved.clone()]);
    assert_eq!(teacher_list(&parent, 2), [id(1)]);
    // School 1's feed shows the teacher with its new school.
    let after = follower.read().unwrap().upstream_cursor().unwrap().unwrap();
    let page = parent
        .read()
        .unwrap()
        .changes(&[school(1)], Some(&after), 100)
        .unwrap();
    assert_eq!(page.items.len(), 1);
    let FeedState::Live(r) = &page.items[0].state else {
        panic!("expected the live teacher, got {:?}", page.items[0])
    };
    assert_eq!(r.data.school_id(), school(2));
    let report = follower
        .apply_feed_page(&wire(&page), &page.next, &only(&[1]), T0)
        .unwrap();
    assert_eq!(report.transferred_out, 1);
    assert_eq!(teacher_list(&follower, 1), [id(2)]);
    let tomb = follower
        .read()
        .unwrap()
        .tombstone(EntityKind::Teacher, id(1))
        .unwrap()
        .unwrap();
    assert_eq!(tomb.key, moved.0, "the upsert's key down the chain");

    // The follower does not serve school 2: its school 1 feed sends a
    // delete marked as a transfer, and the grandchild converges.
    let after = grandchild.read().unwrap().upstream_cursor().unwrap();
    let page = follower
        .read()
        .unwrap()
        .changes(&[school(1)], after.as_ref(), 100)
        .unwrap();
    assert_eq!(page.items.len(), 1);
    let line: Value = serde_json::from_slice(&page.items[0].line()).unwrap();
    assert_eq!(line["deleted"], true);
    assert_eq!(line["transferred"], true);
    assert_eq!(line["schoolId"], school(2).to_string());
    grandchild
        .apply_feed_page(&wire(&page), &page.next, &only(&[1]), T0)
        .unwrap();
    assert_eq!(teacher_list(&grandchild, 1), [id(2)]);
    assert_eq!(
        grandchild
            .read()
            .unwrap()
            .tombstone(EntityKind::Teacher, id(1))
            .unwrap()
            .unwrap()
            .key,
        moved.0
    );
    // The same upsert reaching the grandchild later is a duplicate; an
    // upsert with an equal version and time but a greater event id is not,
    // as at the parent.
    let rival = teacher(EventType::TeacherUpdated, 1, 2, 1, 9);
    assert!(rival.0 > moved.0);
    for store in [&parent, &follower, &grandchild] {
        kafka(store, &[1], vec![moved.clone(), rival.clone()]);
        assert_eq!(teacher_list(store, 1), [id(1), id(2)]);
    }
}

fn snapshot(school_n: u128, records: Vec<(OrderKey, Change)>, as_of: i64) -> SchoolSnapshot {
    SchoolSnapshot {
        school_id: school(school_n),
        records: records
            .into_iter()
            .map(|(k, c)| match c {
                Change::Upsert(e) => (OrderKey { delete: false, ..k }, e),
                other => panic!("{other:?}"),
            })
            .collect(),
        as_of,
        cursor: None,
    }
}

#[test]
fn a_snapshot_line_moves_an_entity_between_served_schools() {
    let store = Store::open_in_memory().unwrap();
    kafka(
        &store,
        &[1, 2],
        vec![teacher(EventType::TeacherCreated, 1, 1, 1, 0)],
    );
    let before = store.read().unwrap().feed_cursor().unwrap();
    let moved = teacher(EventType::TeacherUpdated, 1, 2, 2, 0);
    let report = store
        .reconcile(
            &snapshot(2, vec![moved], T0 + 10 * SEC),
            T0,
            SyncSource::Resync,
            false,
        )
        .unwrap();
    assert_eq!((report.applied, report.deleted), (1, 0));
    assert!(teacher_list(&store, 1).is_empty());
    assert_eq!(teacher_list(&store, 2), [id(1)]);
    // Followers of school 1 learn that it left.
    let page = store
        .read()
        .unwrap()
        .changes(&[school(1)], Some(&before), 10)
        .unwrap();
    assert_eq!(page.items.len(), 1);
    assert_eq!(page.items[0].school_id(), school(2));
    // School 1's own snapshot, without it, deletes nothing more.
    let report = store
        .reconcile(
            &snapshot(1, vec![], T0 + 10 * SEC),
            T0,
            SyncSource::Resync,
            false,
        )
        .unwrap();
    assert_eq!(report.deleted, 0);
    assert_eq!(teacher_list(&store, 2), [id(1)]);
}

#[test]
fn an_entity_absent_from_its_schools_snapshot_because_it_moved_away_is_removed() {
    let store = Store::open_in_memory().unwrap();
    kafka(
        &store,
        &[1],
        vec![
            teacher(EventType::TeacherCreated, 1, 1, 1, 0),
            teacher(EventType::TeacherCreated, 2, 1, 1, 0),
        ],
    );
    let keep = teacher(EventType::TeacherCreated, 2, 1, 1, 0);
    // Teacher 1 moved to school 3 (not served) at T0 + 5 s; school 1's
    // snapshot at T0 + 10 s no longer has it.
    let report = store
        .reconcile(
            &snapshot(1, vec![keep], T0 + 10 * SEC),
            T0,
            SyncSource::Resync,
            false,
        )
        .unwrap();
    assert_eq!(report.deleted, 1);
    assert_eq!(teacher_list(&store, 1), [id(2)]);
    let page = feed(&store, &[1]);
    let gone = page.items.iter().find(|i| i.id() == id(1)).unwrap();
    assert!(matches!(gone.state, FeedState::Deleted { .. }));
    // The move's own event arriving afterwards removes nothing more: it is
    // skipped, and the tombstone takes its (greater) key and new school.
    let moved = teacher(EventType::TeacherUpdated, 1, 5, 3, 0);
    assert_eq!(kafka(&store, &[1], vec![moved.clone()]), (0, 0, 1));
    assert_eq!(teacher_list(&store, 1), [id(2)]);
    let tomb = store
        .read()
        .unwrap()
        .tombstone(EntityKind::Teacher, id(1))
        .unwrap()
        .unwrap();
    assert_eq!((tomb.key, tomb.school_id), (moved.0, school(3)));
}

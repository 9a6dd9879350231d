//! The follower's guarantee as a property (contract §6): whatever the
//! parent's changes (updates, deletes, transfers between schools, purges
//! that expire the follower's cursor), whenever the follower asks and with
//! whatever page size, however often it crashes — between pages, or in the
//! middle of applying one — once caught up it holds exactly the parent's
//! live entities of its schools and nothing of the others.
//!
//! Like the contract's own purge rule, it assumes that no change arrives
//! later than the tombstone retention: a change after a purge is newer
//! than every change before it. (Without that, a parent that purged a
//! tombstone takes an older change back in, which a follower still
//! holding the tombstone rightly refuses — as a single node would have.)
//!
//! It drives the code the node runs, without HTTP to stay fast: the
//! parent renders pages with the feed route's `render_page`, the follower
//! validates them with `follower::parse_page` and applies them with their
//! cursor in one transaction; an expired cursor is answered by reconciling
//! from the parent's snapshots and their `start_cursor`.

use std::path::Path;

use emis_edge::api::feed::render_page;
use emis_edge::domain::{EventType, SchoolFilter, SchoolSnapshot, SnapshotReader, SyncSource};
use emis_edge::follower::{parse_page, start_cursor};
use emis_edge::store::{FeedError, StateRow, Store, StoreOptions};
use proptest::prelude::*;
use uuid::Uuid;

use crate::support::*;

/// The follower's schools; the parent serves 1, 2 and 3.
const MINE: [u128; 2] = [1, 2];
const HOUR: i64 = 3600 * SEC;

#[derive(Clone, Debug)]
enum Op {
    /// A change at the parent.
    Change {
        t: EventType,
        n: u128,
        ts: i64,
        school: u128,
    },
    /// The follower asks for a page of at most `limit` lines.
    Poll { limit: usize },
    /// The follower's process dies between two pages.
    Crash,
    /// It dies while applying a page: the page's transaction never commits.
    CrashMidPage { limit: usize },
    /// The parent purges every tombstone (the follower's cursor may expire).
    Purge,
}

fn op() -> impl Strategy<Value = Op> {
    use EventType::*;
    let change = (
        prop::sample::select(vec![
            TeacherCreated,
            TeacherUpdated,
            TeacherDeleted,
            ClassCreated,
            ClassUpdated,
            ClassDeleted,
        ]),
        1..=5u128,
        1..=12i64,
        1..=3u128,
    )
        .prop_map(|(t, n, ts, school)| Op::Change { t, n, ts, school });
    prop_oneof![
        5 => change,
        3 => (1..=4usize).prop_map(|limit| Op::Poll { limit }),
        1 => Just(Op::Crash),
        1 => (1..=4usize).prop_map(|limit| Op::CrashMidPage { limit }),
        1 => Just(Op::Purge),
    ]
}

fn schools() -> Vec<Uuid> {
    MINE.iter().map(|s| school(*s)).collect()
}

fn snapshot(parent: &Store, s: Uuid) -> SchoolSnapshot {
    let mut reader = SnapshotReader::new();
    let mut done = None;
    parent
        .read()
        .unwrap()
        .write_snapshot(s, |line| {
            if let Some(r) = reader.feed(line.trim_ascii_end()) {
                done = Some(r.unwrap());
            }
            std::ops::ControlFlow::Continue(())
        })
        .unwrap();
    done.unwrap()
}

/// One request of the follower; `crash` makes its commit fail. Returns
/// whether more pages wait.
fn poll(parent: &Store, follower: &Store, limit: usize, crash: bool) -> bool {
    let after = follower.read().unwrap().upstream_cursor().unwrap();
    let page = render_page(&parent.read().unwrap(), &schools(), after.as_ref(), limit);
    match page {
        Ok(page) => {
            let page = parse_page(
                &page.body,
                after.as_ref(),
                emis_edge::domain::FutureSkew::DEFAULT,
            )
            .unwrap();
            if crash {
                follower.fail_next_commit();
            }
            let filter = SchoolFilter::Only(schools().into_iter().collect());
            let applied = follower.apply_feed_page(&page.lines, &page.cursor, &filter, T0);
            assert_eq!(applied.is_err(), crash, "{applied:?}");
            page.more
        }
        Err(FeedError::Expired { .. }) => {
            // 409: start again from the snapshots.
            let snapshots: Vec<_> = schools().into_iter().map(|s| snapshot(parent, s)).collect();
            let cursor = start_cursor(&snapshots).unwrap();
            follower
                .reconcile_upstream(&snapshots, &cursor, T0)
                .unwrap();
            true
        }
        Err(e) => panic!("{e}"),
    }
}

fn open(path: &Path) -> Store {
    Store::open(path, &StoreOptions::default()).unwrap()
}

/// Live entities, optionally only those of `only`.
fn live(store: &Store, only: Option<&[Uuid]>) -> Vec<StateRow> {
    store
        .read()
        .unwrap()
        .dump()
        .unwrap()
        .into_iter()
        .filter(|(_, _, e, _)| {
            e.as_ref()
                .is_some_and(|e| only.is_none_or(|o| o.contains(&e.school_id())))
        })
        .collect()
}

fn check(ops: Vec<Op>) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("follower.redb");
    let parent = Store::open_in_memory().unwrap();
    let mut follower = Some(open(&path));
    // Changes after a purge are stamped after every earlier one.
    let (mut base, mut latest) = (0, 0);
    for op in ops {
        let f = follower.as_ref().unwrap();
        match op {
            Op::Change { t, n, ts, school } => {
                let n = if t.kind() == emis_edge::domain::EntityKind::Class {
                    n + 10
                } else {
                    n
                };
                let ts = base + ts;
                latest = latest.max(ts);
                parent
                    .apply_batch(
                        &batch(vec![change(t, n, ts, school)]),
                        T0,
                        SyncSource::Kafka,
                    )
                    .unwrap();
            }
            Op::Poll { limit } => {
                poll(&parent, f, limit, false);
            }
            Op::Crash => {
                drop(follower.take());
                follower = Some(open(&path));
            }
            Op::CrashMidPage { limit } => {
                poll(&parent, f, limit, true);
                drop(follower.take());
                follower = Some(open(&path));
            }
            Op::Purge => {
                base = latest;
                parent
                    .purge_tombstones(T0 + 400 * 24 * HOUR, 30 * 24 * HOUR)
                    .unwrap();
            }
        }
    }
    let f = follower.unwrap();
    let mut caught_up = false;
    for _ in 0..1000 {
        if !poll(&parent, &f, 3, false) {
            caught_up = true;
            break;
        }
    }
    prop_assert!(caught_up, "the follower never caught up");
    let mine = schools();
    prop_assert_eq!(live(&f, None), live(&parent, Some(&mine)));
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn a_crashing_follower_polling_at_random_holds_exactly_its_schools_once_caught_up(
        ops in prop::collection::vec(op(), 1..60)
    ) {
        check(ops)?;
    }
}

/// The property catches a follower that applied lines without their
/// cursor (here: a page applied twice after a crash is harmless, but one
/// skipped is not): skipping a page's lines while storing its cursor
/// loses changes for good.
#[test]
fn the_property_fails_for_a_follower_that_skips_a_page() {
    use EventType::*;
    let dir = tempfile::tempdir().unwrap();
    let parent = Store::open_in_memory().unwrap();
    let f = open(&dir.path().join("f.redb"));
    parent
        .apply_batch(
            &batch(vec![change(TeacherCreated, 1, 1, 1)]),
            T0,
            SyncSource::Kafka,
        )
        .unwrap();
    let page = render_page(&parent.read().unwrap(), &schools(), None, 10).unwrap();
    let page = parse_page(&page.body, None, emis_edge::domain::FutureSkew::DEFAULT).unwrap();
    let filter = SchoolFilter::Only(schools().into_iter().collect());
    // The cursor without the lines.
    f.apply_feed_page(&[], &page.cursor, &filter, T0).unwrap();
    while poll(&parent, &f, 3, false) {}
    assert_ne!(live(&f, None), live(&parent, Some(&schools())));
}

//! Resync, drift audit, export and import (contract §3), with real HTTP
//! servers: another emis-edge node as "central", or a small axum server
//! serving prepared (broken) snapshots.

use std::time::Duration;

use axum::routing::get;
use emis_edge::domain::EventType;
use emis_edge::resync;
use serde_json::{json, Value};

use crate::support::*;

fn ev(
    t: EventType,
    n: u128,
    ts: i64,
    school_n: u128,
    body: Value,
) -> (emis_edge::domain::OrderKey, emis_edge::domain::Change) {
    parse(
        t,
        &merge(
            envelope(
                t,
                id(60_000 + n),
                T0 + ts * SEC,
                Some(ts as u64),
                school(school_n),
            ),
            body,
        ),
    )
}

/// Central (node A) holds school 1: classes 1 and 2, teacher 1 with an
/// assignment to class 2, and class 9 of school 2. Its watermark (`asOf`)
/// is T0 + 5 s.
async fn central() -> TestNode {
    let a = TestNode::start(|_| {}).await;
    a.apply(vec![
        ev(
            EventType::ClassCreated,
            1,
            1,
            1,
            class_fields(id(1), "Lớp 10A1"),
        ),
        ev(
            EventType::ClassCreated,
            2,
            2,
            1,
            class_fields(id(2), "Lớp 10A2"),
        ),
        ev(
            EventType::TeacherCreated,
            3,
            3,
            1,
            teacher_fields(id(11), "Nguyễn Thị Hương"),
        ),
        ev(
            EventType::AssignmentCreated,
            4,
            4,
            1,
            assignment_fields(id(21), id(11), id(2), "homeroom"),
        ),
        ev(
            EventType::ClassCreated,
            5,
            5,
            2,
            class_fields(id(9), "Lớp khác"),
        ),
    ]);
    a
}

/// The snapshot file of `central()`'s two schools, as `emis-edge export`
/// writes it.
async fn central_file() -> Vec<u8> {
    let a = central().await;
    let schools = a.node.state.store.read().unwrap().schools().unwrap();
    let mut file = Vec::new();
    resync::export(&a.node.state.store, &schools, &mut file, |_| {}).unwrap();
    file
}

/// Node B serves school 1 and resyncs from `url`. It got class 1, lost
/// class 2, the teacher and the assignment, still has class 3 (deleted at
/// central, time ≤ asOf) and has class 4, created after central's asOf.
async fn edge(url: String) -> TestNode {
    // Seeded before start: an empty store would resync at once.
    TestNode::start_seeded(
        vec![
            ev(
                EventType::ClassCreated,
                1,
                1,
                1,
                class_fields(id(1), "Lớp 10A1"),
            ),
            ev(
                EventType::ClassCreated,
                6,
                1,
                1,
                class_fields(id(3), "Lớp đã xoá"),
            ),
            ev(
                EventType::ClassCreated,
                7,
                9,
                1,
                class_fields(id(4), "Lớp mới"),
            ),
        ],
        |c| {
            c.schools.all = false;
            c.schools.ids = vec![school(1)];
            c.resync.central_url = Some(url);
            c.resync.timeout_secs = 1;
        },
    )
    .await
}

fn dump(node: &TestNode) -> Vec<String> {
    let r = node.node.state.store.read().unwrap();
    r.dump()
        .unwrap()
        .into_iter()
        .map(|row| format!("{row:?}"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dry_run_reports_the_planted_drift_and_changes_nothing() {
    let a = central().await;
    let b = edge(a.url("")).await;
    let before = dump(&b);
    let report = resync::run_for_node(&b.node.state, None, true)
        .await
        .unwrap();
    assert!(report.ok(), "{report:?}");
    let r = report.schools[0].report.as_ref().unwrap();
    let class = r.drift["class"];
    assert_eq!(
        (
            class.missing,
            class.extra,
            class.newer,
            class.same,
            class.older
        ),
        (1, 1, 1, 1, 0),
        "{r:?}"
    );
    assert_eq!(r.drift["teacher"].missing, 1);
    assert_eq!(r.drift["assignment"].missing, 1);
    assert_eq!(dump(&b), before, "a dry run changed the store");
    let (_, status) = b.get_json("/api/sync/status").await;
    assert!(status["lastResync"].is_null(), "a dry run is not a resync");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resync_repairs_lost_events_removes_deleted_entities_and_keeps_newer_ones() {
    let a = central().await;
    let b = edge(a.url("")).await;
    let report = resync::run_for_node(&b.node.state, None, false)
        .await
        .unwrap();
    assert!(report.ok(), "{report:?}");
    assert_eq!(
        b.get(&format!("/api/classes/{}", id(2))).await.0,
        200,
        "lost class not repaired"
    );
    assert_eq!(
        b.get(&format!("/api/classes/{}", id(3))).await.0,
        404,
        "class deleted at central kept"
    );
    assert_eq!(
        b.get(&format!("/api/classes/{}", id(4))).await.0,
        200,
        "newer local class removed"
    );
    assert_eq!(
        b.get(&format!("/api/classes/{}", id(9))).await.0,
        404,
        "another school's class copied"
    );
    // The teacher detail now equals central's.
    let path = format!("/api/teachers/{}", id(11));
    let (status, from_b) = b.get_json(&path).await;
    assert_eq!(status, 200);
    let (_, from_a) = a.get_json(&path).await;
    assert_eq!(without_sync_times(from_b), without_sync_times(from_a));
    let (_, status) = b.get_json("/api/sync/status").await;
    assert_eq!(status["lastResync"]["result"], "ok");
    // The status page's figures: the school changed now, with what it holds
    // after the repair (classes 1, 2 and 4; the teacher; the assignment),
    // and this minute's changes are the run's.
    let resynced_at = rfc3339(b.clock.now_value());
    let first = report.schools[0].report.as_ref().unwrap();
    assert_eq!(status["schoolCount"], 1);
    assert_eq!(
        status["schools"],
        json!([{"schoolId": school(1), "lastChangeAt": resynced_at,
                "classes": 3, "teachers": 1, "assignments": 1}])
    );
    let per_minute = status["appliedPerMinute"].as_array().unwrap();
    assert_eq!(per_minute.len(), 60);
    assert_eq!(per_minute[59], first.applied + first.deleted);
    let (_, class) = b.get_json(&format!("/api/classes/{}", id(2))).await;
    assert_eq!(class["syncSource"], "resync");
    // A second run changes nothing, and so is no change of the school.
    b.clock.set(b.clock.now_value() + 120 * SEC);
    let again = resync::run_for_node(&b.node.state, None, false)
        .await
        .unwrap();
    let r = again.schools[0].report.as_ref().unwrap();
    assert_eq!((r.applied, r.deleted), (0, 0), "{r:?}");
    let (_, status) = b.get_json("/api/sync/status").await;
    assert_eq!(status["schools"][0]["lastChangeAt"], resynced_at);
    assert_eq!(
        status["appliedPerMinute"][57],
        first.applied + first.deleted
    );
    assert_eq!(status["appliedPerMinute"][59], 0);
}

/// Serves `body` (and `status`) as every snapshot, after `delay`.
async fn fake_central(status: u16, body: String, delay: Duration) -> String {
    let app = axum::Router::new().route(
        "/api/schools/{id}/snapshot",
        get(move || {
            let body = body.clone();
            async move {
                tokio::time::sleep(delay).await;
                (axum::http::StatusCode::from_u16(status).unwrap(), body)
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    format!("http://{addr}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_slow_or_failing_central_changes_nothing_and_is_reported() {
    let a = central().await;
    let (_, _, good) = a.get(&format!("/api/schools/{}/snapshot", school(1))).await;
    let good = String::from_utf8(good).unwrap();
    let lines: Vec<&str> = good.lines().collect();
    let without_end = lines[..lines.len() - 1].join("\n") + "\n";
    let wrong_count = good.replace("\"count\":4", "\"count\":5");
    assert_ne!(wrong_count, good);
    let bad_line = good.replacen("Lớp 10A2", &"x".repeat(300), 1);
    // Contract §2 "Time": a record stamped beyond ingest.max_future_skew
    // after the snapshot's asOf (T0 + 5 s) fails the school whole.
    let stamp = |secs: i64| format!("\"timestamp\":\"{}\"", rfc3339(T0 + secs * SEC));
    assert!(good.contains(&stamp(2)), "{good}");
    let from_the_future = good.replacen(&stamp(2), &stamp(5 + 3600 + 1), 1);
    for (name, status, body, delay, expect) in [
        (
            "no end line",
            200,
            without_end,
            Duration::ZERO,
            "without an end line",
        ),
        (
            "wrong count",
            200,
            wrong_count,
            Duration::ZERO,
            "end line says 5 records, 4 were read",
        ),
        (
            "bad line",
            200,
            bad_line,
            Duration::ZERO,
            "line 2: field `className`",
        ),
        (
            "a record from the future",
            200,
            from_the_future,
            Duration::ZERO,
            "line 2: field `timestamp`: 2025-10-26T11:00:06Z lies more than 1h \
             (ingest.max_future_skew) after the end line's asOf 2025-10-26T10:00:05Z",
        ),
        (
            "server error",
            500,
            "oops".to_string(),
            Duration::ZERO,
            "500",
        ),
        (
            "too slow",
            200,
            good.clone(),
            Duration::from_secs(3),
            "timed out",
        ),
    ] {
        let url = fake_central(status, body, delay).await;
        let b = edge(url).await;
        let before = dump(&b);
        let report = resync::run_for_node(&b.node.state, None, false)
            .await
            .unwrap();
        assert!(!report.ok(), "{name}: accepted");
        let error = report.schools[0].error.clone().unwrap();
        assert!(
            error.contains(expect),
            "{name}: {error:?} does not say {expect:?}"
        );
        assert_eq!(dump(&b), before, "{name}: the store changed");
        // Reads go on; status shows the failure.
        assert_eq!(b.get(&format!("/api/classes/{}", id(1))).await.0, 200);
        let (_, status) = b.get_json("/api/sync/status").await;
        assert_eq!(status["lastResync"]["result"], "failed", "{name}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_node_resyncs_at_start_and_becomes_ready() {
    let a = central().await;
    let b = TestNode::start(|c| {
        c.schools.all = false;
        c.schools.ids = vec![school(1)];
        c.resync.central_url = Some(a.url(""));
    })
    .await;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while b.get("/health/ready").await.0 != 200 {
        assert!(std::time::Instant::now() < deadline, "never became ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(b.get(&format!("/api/teachers/{}", id(11))).await.0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_then_import_into_an_empty_node_gives_identical_answers() {
    let a = central().await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("province.ndjson");
    let schools = a.node.state.store.read().unwrap().schools().unwrap();
    assert_eq!(schools, {
        let mut s = vec![school(1), school(2)];
        s.sort();
        s
    });
    {
        let mut out = std::fs::File::create(&file).unwrap();
        let n = resync::export(&a.node.state.store, &schools, &mut out, |_| {}).unwrap();
        assert_eq!(n, 7, "5 records and 2 end lines");
    }
    let b = TestNode::start(|_| {}).await;
    let input = std::io::BufReader::new(std::fs::File::open(&file).unwrap());
    let outcomes = resync::import(
        &b.node.state.store,
        &emis_edge::config::SchoolFilter::All,
        emis_edge::domain::FutureSkew::DEFAULT,
        input,
        T0,
        |_| {},
    )
    .unwrap();
    assert!(outcomes.iter().all(|o| o.error.is_none()), "{outcomes:?}");
    for path in [
        format!("/api/teachers/{}", id(11)),
        format!("/api/classes/{}", id(9)),
        format!("/api/schools/{}/classes", school(1)),
    ] {
        let (sa, va) = a.get_json(&path).await;
        let (sb, vb) = b.get_json(&path).await;
        assert_eq!((sa, sb), (200, 200), "{path}");
        let strip = |v: Value| {
            let mut s = without_sync_times(v).to_string();
            s = s.replace("\"syncSource\":\"import\"", "\"syncSource\":\"kafka\"");
            s
        };
        assert_eq!(strip(va), strip(vb), "{path}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_import_file_changes_nothing_for_the_damaged_schools_and_names_the_line() {
    let bytes = central_file().await;
    let text = String::from_utf8(bytes).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    // The first school intact, the second cut short before its end line.
    let first_end = lines
        .iter()
        .position(|l| l.contains("\"kind\":\"end\""))
        .unwrap();
    let mut damaged = lines[..=first_end].join("\n") + "\n";
    damaged.push_str(&lines[first_end + 1..lines.len() - 1].join("\n"));
    damaged.push('\n');
    let b = TestNode::start(|_| {}).await;
    let outcomes = resync::import(
        &b.node.state.store,
        &emis_edge::config::SchoolFilter::All,
        emis_edge::domain::FutureSkew::DEFAULT,
        damaged.as_bytes(),
        T0,
        |_| {},
    )
    .unwrap();
    assert_eq!(outcomes.len(), 2, "{outcomes:?}");
    assert!(outcomes[0].error.is_none());
    let error = outcomes[1].error.as_ref().unwrap();
    assert!(
        error.contains("truncated") && error.contains(&format!("line {}", lines.len() - 1)),
        "{error}"
    );
    let imported_school = outcomes[0].school_id;
    let r = b.node.state.store.read().unwrap();
    assert_eq!(
        r.schools().unwrap(),
        vec![imported_school],
        "the damaged school was partly imported"
    );

    // A corrupt line in the middle: that school is rejected, naming the line.
    let corrupt = text.replacen("\"kind\":\"teacher\"", "\"kind\":\"principal\"", 1);
    let c = TestNode::start(|_| {}).await;
    let outcomes = resync::import(
        &c.node.state.store,
        &emis_edge::config::SchoolFilter::All,
        emis_edge::domain::FutureSkew::DEFAULT,
        corrupt.as_bytes(),
        T0,
        |_| {},
    )
    .unwrap();
    let bad = outcomes
        .iter()
        .find(|o| o.error.is_some())
        .expect("one school rejected");
    assert!(
        bad.error.as_ref().unwrap().contains("field `kind`"),
        "{bad:?}"
    );
    assert_eq!(bad.school_id, school(1));
    assert_eq!(c.get(&format!("/api/classes/{}", id(1))).await.0, 404);
    assert_eq!(
        c.get(&format!("/api/classes/{}", id(9))).await.0,
        200,
        "the intact school was not imported"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_resync_route_runs_a_dry_run_and_rejects_a_bad_school_id() {
    let a = central().await;
    let b = edge(a.url("")).await;
    let r = b
        .http
        .post(b.url("/api/admin/resync?dryRun=true"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let doc: Value = r.json().await.unwrap();
    assert_eq!(
        doc["schools"][0]["report"]["drift"]["class"]["missing"], 1,
        "{doc:#}"
    );
    let r = b
        .http
        .post(b.url("/api/admin/resync?school=nope"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_without_event_ids_counts_the_versions_applied_here_as_the_same() {
    let a = central().await;
    let (_, _, body) = a.get(&format!("/api/schools/{}/snapshot", school(1))).await;
    // Central's snapshots carry no eventId; emis-edge's do. Strip them.
    let stripped: String = String::from_utf8(body)
        .unwrap()
        .lines()
        .map(|l| {
            let mut v: Value = serde_json::from_str(l).unwrap();
            v.as_object_mut().unwrap().remove("eventId");
            v.to_string() + "\n"
        })
        .collect();
    let b = edge(fake_central(200, stripped, Duration::ZERO).await).await;
    let report = resync::run_for_node(&b.node.state, None, true)
        .await
        .unwrap();
    let r = report.schools[0].report.as_ref().unwrap();
    assert_eq!(r.drift["class"].same, 1, "{r:?}");
    assert_eq!(
        r.drift["class"].newer, 1,
        "only the class created after asOf: {r:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_school_node_resyncs_from_a_provincial_node_that_requires_a_token() {
    use std::os::unix::fs::PermissionsExt;
    let secrets = tempfile::tempdir().unwrap();
    let token = secrets.path().join("token");
    std::fs::write(&token, "province-token-0123456789\n").unwrap();
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600)).unwrap();
    let province = TestNode::start(|c| c.http.token_file = Some(token.clone())).await;
    province.apply(vec![ev(
        EventType::ClassCreated,
        1,
        1,
        1,
        class_fields(id(1), "Lớp 10A1"),
    )]);
    let without = edge(province.url("")).await;
    let report = resync::run_for_node(&without.node.state, None, false)
        .await
        .unwrap();
    assert!(
        report.schools[0].error.as_deref().unwrap().contains("401"),
        "{report:?}"
    );
    let with = TestNode::start_seeded(vec![], |c| {
        c.schools.all = false;
        c.schools.ids = vec![school(1)];
        c.resync.central_url = Some(province.url(""));
        c.resync.token_file = Some(token.clone());
    })
    .await;
    let report = resync::run_for_node(&with.node.state, None, false)
        .await
        .unwrap();
    assert!(report.ok(), "{report:?}");
    assert_eq!(with.get(&format!("/api/classes/{}", id(1))).await.0, 200);
}

/// A file that is not a snapshot (a line longer than any snapshot line)
/// sent to a running node is the client's error: `400` naming the line,
/// not a `500`, and the node imports the next file as usual.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_import_of_an_over_long_line_through_the_node_is_a_400() {
    let file = central_file().await;
    let b = TestNode::start(|_| {}).await;
    let mut not_a_snapshot = vec![b'x'; emis_edge::domain::snapshot::MAX_LINE_BYTES + 1];
    not_a_snapshot.push(b'\n');
    let r = import_through(&b, not_a_snapshot).await;
    assert_eq!(r.status().as_u16(), 400);
    assert_eq!(r.headers()["content-type"], "application/problem+json");
    let v: Value = r.json().await.unwrap();
    assert!(
        v["detail"]
            .as_str()
            .unwrap()
            .starts_with("line 1 is longer than 1048576 bytes"),
        "{v}"
    );
    assert_eq!(import_through(&b, file).await.status().as_u16(), 200);
    assert_eq!(
        b.node.state.store.read().unwrap().schools().unwrap().len(),
        2
    );
}

/// `POST /api/admin/import` of `file` to `node`.
async fn import_through(node: &TestNode, file: Vec<u8>) -> reqwest::Response {
    node.http
        .post(node.url("/api/admin/import"))
        .body(file)
        .send()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_import_beyond_the_body_size_limit_gets_a_clean_413_and_changes_nothing() {
    let file = central_file().await;
    assert!(file.len() > 1000);
    let b = TestNode::start(|c| c.http.max_import_bytes = 1000).await;
    let declared = b.http.post(b.url("/api/admin/import")).body(file.clone());
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
        file.chunks(300).map(|c| Ok(c.to_vec())).collect();
    let streamed = b
        .http
        .post(b.url("/api/admin/import"))
        .body(reqwest::Body::wrap_stream(futures::stream::iter(chunks)));
    for (how, request) in [("with Content-Length", declared), ("streamed", streamed)] {
        let r = request.send().await.unwrap();
        assert_eq!(r.status().as_u16(), 413, "{how}");
        assert_eq!(
            r.headers()["content-type"],
            "application/problem+json",
            "{how}"
        );
        let v: Value = r.json().await.unwrap();
        assert!(
            v["detail"]
                .as_str()
                .unwrap()
                .contains("http.max_import_bytes"),
            "{how}: {v}"
        );
    }
    assert!(b
        .node
        .state
        .store
        .read()
        .unwrap()
        .schools()
        .unwrap()
        .is_empty());
    // Within the limit the same file imports.
    let c = TestNode::start(|_| {}).await;
    assert_eq!(import_through(&c, file).await.status().as_u16(), 200);
    assert_eq!(
        c.node.state.store.read().unwrap().schools().unwrap().len(),
        2
    );
    // The import is the schools' last change, and this minute's changes.
    let (_, status) = c.get_json("/api/sync/status").await;
    let now = rfc3339(c.clock.now_value());
    let changed: Vec<&Value> = status["schools"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| &s["lastChangeAt"])
        .collect();
    assert_eq!(changed, [&json!(now), &json!(now)], "{status:#}");
    assert_eq!(status["appliedPerMinute"][59], 5, "{status:#}");
}

/// Imports `file` as the normal path does, school batches reconciled
/// (what an import into a store that holds data does).
fn import_reconciling(store: &emis_edge::store::Store, file: &[u8]) {
    let mut reader = emis_edge::domain::SnapshotReader::new();
    let mut pending = Vec::new();
    let mut records = 0;
    for line in file.split(|b| *b == b'\n') {
        if let Some(snapshot) = reader.feed(line) {
            let snapshot = snapshot.unwrap();
            records += snapshot.records.len();
            pending.push(snapshot);
            if records >= resync::IMPORT_BATCH_RECORDS {
                store
                    .reconcile_many(&pending, T0, emis_edge::domain::SyncSource::Import, false)
                    .unwrap();
                pending.clear();
                records = 0;
            }
        }
    }
    store
        .reconcile_many(&pending, T0, emis_edge::domain::SyncSource::Import, false)
        .unwrap();
    while store.materialize(1000, T0).unwrap() > 0 {}
}

/// Everything a store answers: state, counters, watermark, the change log,
/// every teacher document, every snapshot (its cursor names the store, so
/// only its position is kept).
fn everything(store: &emis_edge::store::Store, p: &emis_edge::gen::Province) -> Value {
    let r = store.read().unwrap();
    let mut docs = Vec::new();
    for s in 0..p.spec.schools {
        for t in 0..p.spec.teachers_per_school {
            let body = r.teacher_detail_body(p.teacher_id(s, t)).unwrap().unwrap();
            docs.push(String::from_utf8(body).unwrap());
        }
    }
    let feed: Vec<String> = r
        .changes(&p.school_ids(), None, usize::MAX)
        .unwrap()
        .items
        .iter()
        .map(|i| format!("{} {}", i.seq, String::from_utf8(i.line()).unwrap()))
        .collect();
    let mut snapshots = Vec::new();
    for s in r.schools().unwrap() {
        r.write_snapshot(s, |line| {
            let mut v: Value = serde_json::from_slice(line).unwrap();
            if let Some(c) = v.get("cursor").and_then(Value::as_str) {
                v["cursor"] = json!(c.split('.').skip(1).collect::<Vec<_>>().join("."));
            }
            snapshots.push(v);
            std::ops::ControlFlow::Continue(())
        })
        .unwrap();
    }
    let stats = r.stats().unwrap();
    json!({
        "dump": format!("{:?}", r.dump().unwrap()),
        "stats": serde_json::to_value(&stats).unwrap(),
        "watermark": r.watermark().unwrap(),
        "head": r.feed_info().unwrap().head,
        "docs": docs,
        "feed": feed,
        "snapshots": snapshots,
    })
}

/// The generator's tiny data set of `seed` (3 schools), as a snapshot file.
fn tiny_file(seed: u64) -> (emis_edge::gen::Province, Vec<u8>) {
    let p = emis_edge::gen::Province::new(emis_edge::gen::Spec::scale("tiny", seed).unwrap());
    let mut file = Vec::new();
    p.write_snapshot(&mut file, |_| {}).unwrap();
    (p, file)
}

/// The schools of a snapshot file, parsed.
fn schools_of(file: &[u8]) -> Vec<emis_edge::domain::SchoolSnapshot> {
    let mut reader = emis_edge::domain::SnapshotReader::new();
    file.split(|b| *b == b'\n')
        .filter_map(|line| reader.feed(line))
        .map(Result::unwrap)
        .collect()
}

/// A store file at `path` whose bulk loads spill past `max_rows` rows.
fn store_bulk_loading(path: &std::path::Path, max_rows: u64) -> emis_edge::store::Store {
    let options = emis_edge::store::StoreOptions {
        bulk_load_max_rows: max_rows,
        ..Default::default()
    };
    emis_edge::store::Store::open(path, &options).unwrap()
}

/// Both stores answer everything alike (and hold a real change log).
fn assert_same_store(
    bulk: &emis_edge::store::Store,
    normal: &emis_edge::store::Store,
    p: &emis_edge::gen::Province,
) {
    let (a, b) = (everything(bulk, p), everything(normal, p));
    assert!(a["feed"].as_array().unwrap().len() > 100);
    assert_eq!(a, b);
}

#[test]
fn an_import_into_an_empty_store_gives_the_same_store_as_reconciling() {
    let (p, file) = tiny_file(1);
    // The same file with its first school again at the end: an entity that
    // comes twice ends the bulk load.
    let first_end = file
        .split(|b| *b == b'\n')
        .position(|l| l.windows(12).any(|w| w == b"\"kind\":\"end\""))
        .unwrap();
    let first: Vec<&[u8]> = file.split(|b| *b == b'\n').take(first_end + 1).collect();
    let mut twice = file.clone();
    twice.extend(first.join(&b'\n'));
    twice.push(b'\n');
    // A bulk load past `bulk_load_max_rows` rows in memory sorts them into
    // a temporary file and merges it at the end: the same store again.
    let dir = tempfile::tempdir().unwrap();
    let full = emis_edge::store::StoreOptions {
        bulk_load_max_rows: 1,
        ..Default::default()
    };
    for (file, repeats, options) in [
        (file.clone(), false, None),
        (twice, true, None),
        (file, false, Some(full)),
    ] {
        let bulk = match options {
            None => emis_edge::store::Store::open_in_memory().unwrap(),
            Some(o) => emis_edge::store::Store::open(&dir.path().join("s.redb"), &o).unwrap(),
        };
        assert!(bulk
            .bulk_load(T0, emis_edge::domain::SyncSource::Import)
            .unwrap()
            .is_some());
        let mut reconciled = false;
        let outcomes = resync::import(
            &bulk,
            &emis_edge::config::SchoolFilter::All,
            emis_edge::domain::FutureSkew::DEFAULT,
            file.as_slice(),
            T0,
            |p| reconciled |= p == resync::ImportProgress::Reconciling,
        )
        .unwrap();
        assert!(outcomes.iter().all(|o| o.error.is_none()), "{outcomes:?}");
        // `emis-edge import` measures the tables for a compaction only then.
        assert_eq!(reconciled, repeats, "told whether anything was reconciled");
        if !repeats {
            assert_eq!(
                bulk.read().unwrap().pending_docs().unwrap(),
                0,
                "every document rendered"
            );
        }
        // As `emis-edge import` does after the rest was reconciled.
        while bulk.materialize(1000, T0).unwrap() > 0 {}
        assert!(
            bulk.bulk_load(T0, emis_edge::domain::SyncSource::Import)
                .unwrap()
                .is_none(),
            "no bulk load into a store that holds data"
        );
        let normal = emis_edge::store::Store::open_in_memory().unwrap();
        import_reconciling(&normal, &file);
        assert_same_store(&bulk, &normal, &p);
    }
}

/// A bulk load that spills sorted runs to temporary files (each school
/// here: `bulk_load_max_rows` is 1), with the last school's rows still in
/// memory, merges them into the same store as reconciling the same
/// batches, every document rendered, and leaves no file behind.
#[test]
fn a_bulk_load_merges_its_spilled_runs_into_the_same_store() {
    let (p, file) = tiny_file(1);
    let schools = schools_of(&file);
    assert_eq!(schools.len(), 3);
    let dir = tempfile::tempdir().unwrap();
    let bulk = store_bulk_loading(&dir.path().join("s.redb"), 1);
    let mut load = bulk
        .bulk_load(T0, emis_edge::domain::SyncSource::Import)
        .unwrap()
        .unwrap();
    for (i, school) in schools.iter().enumerate() {
        load.add(std::slice::from_ref(school)).unwrap();
        if i + 1 < schools.len() {
            assert!(load.spill_if_full().unwrap(), "school {i} spilled");
        }
    }
    let rows = load.rows();
    let mut told = 0;
    load.finish(|n| told = n).unwrap();
    assert_eq!(told, rows, "progress ends at every row written");
    assert_eq!(bulk.read().unwrap().pending_docs().unwrap(), 0);
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left, ["s.redb"], "no temporary file left beside the store");
    let normal = emis_edge::store::Store::open_in_memory().unwrap();
    for school in &schools {
        normal
            .reconcile_many(
                std::slice::from_ref(school),
                T0,
                emis_edge::domain::SyncSource::Import,
                false,
            )
            .unwrap();
    }
    while normal.materialize(1000, T0).unwrap() > 0 {}
    assert_same_store(&bulk, &normal, &p);
}

/// When the sorted runs cannot be written (here the store's directory is
/// gone; a full disk is the same), the import fails naming the directory,
/// and the store stays empty.
#[test]
fn a_bulk_load_that_cannot_spill_fails_naming_the_directory() {
    let (_, file) = tiny_file(1);
    let dir = tempfile::tempdir().unwrap();
    let gone = dir.path().join("gone");
    std::fs::create_dir(&gone).unwrap();
    let store = store_bulk_loading(&gone.join("s.redb"), 1);
    std::fs::remove_dir_all(&gone).unwrap();
    let error = resync::import(
        &store,
        &emis_edge::config::SchoolFilter::All,
        emis_edge::domain::FutureSkew::DEFAULT,
        file.as_slice(),
        T0,
        |_| {},
    )
    .unwrap_err()
    .to_string();
    assert!(error.contains("temporary file"), "{error}");
    assert!(error.contains(&gone.display().to_string()), "{error}");
    let r = store.read().unwrap();
    assert_eq!(r.stats().unwrap().teachers, 0, "nothing written");
}

/// A bulk load is not written over changes the store took while it was
/// collected (a running node's ingest during an import into its empty
/// store): it fails saying to import again, writing nothing, and the
/// change stays.
#[test]
fn a_bulk_load_is_not_written_over_changes_made_meanwhile() {
    let (_, file) = tiny_file(1);
    let schools = schools_of(&file);
    let store = emis_edge::store::Store::open_in_memory().unwrap();
    let mut bulk = store
        .bulk_load(T0, emis_edge::domain::SyncSource::Import)
        .unwrap()
        .unwrap();
    bulk.add(&schools).unwrap();
    // Meanwhile a change of another school is applied.
    store
        .apply_batch(
            &batch(vec![change(EventType::TeacherCreated, 7, 1, 900)]),
            T0,
            emis_edge::domain::SyncSource::Kafka,
        )
        .unwrap();
    let err = bulk.finish(|_| {}).unwrap_err().to_string();
    assert!(err.contains("run the import again"), "{err}");
    let r = store.read().unwrap();
    assert_eq!(r.schools().unwrap(), vec![school(900)], "only the change");
    assert!(r.teacher_detail_body(id(7)).unwrap().is_some());
    assert_eq!(store.health().error, None, "the store is not degraded");
}

/// Contract §2 "Time" for files: a school whose record is stamped more
/// than `ingest.max_future_skew` after its end line's `asOf` is refused
/// whole, naming the line and the bound; the file's other school imports.
/// With a larger skew configured the same file imports whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_import_refuses_a_school_with_a_record_stamped_beyond_the_skew_after_its_as_of() {
    let bytes = central_file().await;
    let text = String::from_utf8(bytes).unwrap();
    // Teacher 11 of school 1, at T0 + 3 s; its school's asOf is T0 + 5 s.
    let stamp = |secs: i64| format!("\"timestamp\":\"{}\"", rfc3339(T0 + secs * SEC));
    assert_eq!(text.matches(&stamp(3)).count(), 1, "{text}");
    let late = text.replace(&stamp(3), &stamp(5 + 2 * 3600));
    let line = late
        .lines()
        .position(|l| l.contains(&stamp(5 + 2 * 3600)))
        .unwrap()
        + 1;
    let b = TestNode::start(|_| {}).await;
    let outcomes = resync::import(
        &b.node.state.store,
        &emis_edge::config::SchoolFilter::All,
        emis_edge::domain::FutureSkew::DEFAULT,
        late.as_bytes(),
        T0,
        |_| {},
    )
    .unwrap();
    let failed: Vec<_> = outcomes.iter().filter(|o| o.error.is_some()).collect();
    assert_eq!(failed.len(), 1, "{outcomes:?}");
    assert_eq!(failed[0].school_id, school(1));
    assert_eq!(
        failed[0].error.as_deref().unwrap(),
        format!(
            "line {line}: field `timestamp`: 2025-10-26T12:00:05Z lies more than 1h \
             (ingest.max_future_skew) after the end line's asOf 2025-10-26T10:00:05Z: \
             refused as implausible"
        )
    );
    let r = b.node.state.store.read().unwrap();
    assert_eq!(
        r.schools().unwrap(),
        vec![school(2)],
        "school 1 partly imported"
    );
    assert_eq!(r.watermark().unwrap(), Some(T0 + 5 * SEC));
    drop(r);

    let c = TestNode::start(|_| {}).await;
    let lenient = emis_edge::domain::FutureSkew::from_duration(Duration::from_secs(3 * 3600));
    let outcomes = resync::import(
        &c.node.state.store,
        &emis_edge::config::SchoolFilter::All,
        lenient,
        late.as_bytes(),
        T0,
        |_| {},
    )
    .unwrap();
    assert!(outcomes.iter().all(|o| o.error.is_none()), "{outcomes:?}");
}

/// A 1 GiB line, made as it is read (never held whole), after a valid
/// school: how many bytes the import read.
struct HugeLine {
    prefix: std::io::Cursor<Vec<u8>>,
    left: u64,
    read: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl std::io::Read for HugeLine {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = match std::io::Read::read(&mut self.prefix, buf)? {
            0 => {
                let n = buf.len().min(self.left as usize);
                buf[..n].fill(b'x');
                self.left -= n as u64;
                n
            }
            n => n,
        };
        self.read
            .fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
        Ok(n)
    }
}

/// Import lines are read with a length cap (the snapshot download's, 1
/// MiB): a file whose third line is 1 GiB fails as soon as the cap is
/// passed, naming the line, having read about 1 MiB of it; nothing of the
/// 1 GiB is held in memory.
#[test]
fn an_import_with_a_huge_line_fails_fast_naming_it_in_bounded_memory() {
    let store = emis_edge::store::Store::open_in_memory().unwrap();
    let record = ev(
        EventType::ClassCreated,
        1,
        1,
        1,
        class_fields(id(1), "Lớp 10A1"),
    );
    let mut school_one = Vec::new();
    {
        store
            .apply_batch(
                &batch(vec![record]),
                T0,
                emis_edge::domain::SyncSource::Kafka,
            )
            .unwrap();
        resync::export(&store, &[school(1)], &mut school_one, |_| {}).unwrap();
    }
    assert_eq!(school_one.iter().filter(|b| **b == b'\n').count(), 2);
    let read = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let input = HugeLine {
        prefix: std::io::Cursor::new(school_one.clone()),
        left: 1 << 30,
        read: read.clone(),
    };
    let empty = emis_edge::store::Store::open_in_memory().unwrap();
    let error = resync::import(
        &empty,
        &emis_edge::config::SchoolFilter::All,
        emis_edge::domain::FutureSkew::DEFAULT,
        std::io::BufReader::with_capacity(64 * 1024, input),
        T0,
        |_| {},
    )
    .expect_err("a 1 GiB line is no snapshot line");
    assert!(
        error
            .to_string()
            .starts_with("line 3 is longer than 1048576 bytes"),
        "{error:#}"
    );
    let read = read.load(std::sync::atomic::Ordering::Relaxed);
    assert!(
        read <= school_one.len() as u64 + (1 << 20) + 64 * 1024,
        "{read} bytes read of a 1 GiB line"
    );
    // A line of exactly the cap is read (and refused as a line, not as a
    // file); a last line without a newline is read too.
    let mut exact = vec![b' '; emis_edge::domain::snapshot::MAX_LINE_BYTES];
    exact.push(b'\n');
    exact.extend_from_slice(&school_one[..school_one.len() - 1]);
    let outcomes = resync::import(
        &empty,
        &emis_edge::config::SchoolFilter::All,
        emis_edge::domain::FutureSkew::DEFAULT,
        exact.as_slice(),
        T0,
        |_| {},
    )
    .unwrap();
    assert!(outcomes.iter().all(|o| o.error.is_none()), "{outcomes:?}");
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(32))]

    /// The bulk load's claim, for any data set, any batching of its
    /// schools and any point at which rows spill to sorted runs: the store
    /// it writes is the one reconciling the same batches makes.
    #[test]
    fn any_batching_and_any_spill_point_give_the_store_reconciling_gives(
        seed in 1u64..1_000,
        cuts in proptest::collection::vec(proptest::bool::ANY, 3),
        max_rows in 1u64..600,
    ) {
        let (p, file) = tiny_file(seed);
        let schools = schools_of(&file);
        // Cut the schools into batches where `cuts` says (cycling).
        let mut batches: Vec<Vec<_>> = vec![Vec::new()];
        for (i, school) in schools.into_iter().enumerate() {
            if cuts[i % cuts.len()] && !batches.last().unwrap().is_empty() {
                batches.push(Vec::new());
            }
            batches.last_mut().unwrap().push(school);
        }
        let dir = tempfile::tempdir().unwrap();
        let bulk = store_bulk_loading(&dir.path().join("s.redb"), max_rows);
        let mut load = bulk
            .bulk_load(T0, emis_edge::domain::SyncSource::Import)
            .unwrap()
            .unwrap();
        let normal = emis_edge::store::Store::open_in_memory().unwrap();
        for batch in &batches {
            let a = load.add(batch).unwrap();
            load.spill_if_full().unwrap();
            let b = normal
                .reconcile_many(batch, T0, emis_edge::domain::SyncSource::Import, false)
                .unwrap();
            proptest::prop_assert_eq!(format!("{a:?}"), format!("{b:?}"));
        }
        load.finish(|_| {}).unwrap();
        while normal.materialize(1000, T0).unwrap() > 0 {}
        proptest::prop_assert_eq!(bulk.read().unwrap().pending_docs().unwrap(), 0);
        proptest::prop_assert_eq!(everything(&bulk, &p), everything(&normal, &p));
    }
}

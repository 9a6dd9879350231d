//! Tiered replication (contract §6): school nodes following a parent's
//! change feed over real HTTP — convergence to exactly their schools'
//! answers, the long-poll, starting again after `409`, status, metrics and
//! configuration.

use std::time::{Duration, Instant};

use emis_edge::config::Config;
use emis_edge::domain::{Cursor, EventType};
use serde_json::{json, Value};

use crate::kafka::{counter, event, handled, promtool_check, wait_status, Kafka};
use crate::support::*;

/// A node that follows `parent` for `schools`, holding each request up to
/// `wait` seconds.
pub async fn follower(parent: &TestNode, schools: &[u128], wait: u64) -> TestNode {
    let url = format!("http://{}", parent.node.addr);
    TestNode::start(|c| follow(c, url, schools, wait)).await
}

pub fn follow(c: &mut Config, url: String, schools: &[u128], wait: u64) {
    c.upstream.url = Some(url);
    c.upstream.wait_secs = wait;
    c.upstream.read_timeout_secs = 5;
    c.schools.ids = schools.iter().map(|n| school(*n)).collect();
}

/// Removes what differs between nodes by design: when and how each node
/// got an entity.
pub fn normalized(mut v: Value) -> Value {
    fn strip(v: &mut Value) {
        match v {
            Value::Object(m) => {
                m.remove("lastSyncedAt");
                m.remove("syncSource");
                m.values_mut().for_each(strip);
            }
            Value::Array(a) => a.iter_mut().for_each(strip),
            _ => {}
        }
    }
    strip(&mut v);
    v
}

/// What a user of `node` sees of `schools` — their class and teacher
/// lists, their snapshot records — and of every teacher and class among
/// `teachers` and `classes` by id. With `restrict`, an entity of another
/// school is shown as the 404 a follower of `schools` answers.
async fn view(
    node: &TestNode,
    schools: &[u128],
    teachers: &[u128],
    classes: &[u128],
    restrict: bool,
) -> Value {
    let mut out = serde_json::Map::new();
    for s in schools {
        let (_, classes) = node
            .get_json(&format!("/api/schools/{}/classes?limit=1000", school(*s)))
            .await;
        let (_, teachers) = node
            .get_json(&format!("/api/schools/{}/teachers?limit=1000", school(*s)))
            .await;
        let (status, _, body) = node
            .get(&format!("/api/schools/{}/snapshot", school(*s)))
            .await;
        assert_eq!(status, 200);
        let mut records = ndjson(&body);
        let end = records.pop().expect("an end line");
        assert_eq!(end["kind"], "end");
        out.insert(
            format!("school {s}"),
            json!({
                "classes": classes["items"],
                "teachers": teachers["items"],
                "snapshot": records,
                "count": end["count"],
            }),
        );
    }
    let served: Vec<String> = schools.iter().map(|s| school(*s).to_string()).collect();
    for (path, ids) in [("teachers", teachers), ("classes", classes)] {
        for n in ids {
            let (status, body) = node.get_json(&format!("/api/{path}/{}", id(*n))).await;
            let foreign = body["schoolId"]
                .as_str()
                .is_some_and(|s| !served.iter().any(|x| x == s));
            let answer = if status == 200 && !(restrict && foreign) {
                body
            } else {
                json!(404)
            };
            out.insert(format!("{path}/{n}"), answer);
        }
    }
    normalized(Value::Object(out))
}

/// Waits until `follower` answers for `schools` what `parent` answers,
/// then asserts it (with the difference shown).
async fn converges(
    parent: &TestNode,
    follower: &TestNode,
    schools: &[u128],
    teachers: &[u128],
    classes: &[u128],
) {
    let expected = view(parent, schools, teachers, classes, true).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let got = view(follower, schools, teachers, classes, false).await;
        if got == expected {
            break;
        }
        if Instant::now() > deadline {
            let (_, status) = follower.get_json("/api/sync/status").await;
            assert_eq!(
                serde_json::to_string_pretty(&got).unwrap(),
                serde_json::to_string_pretty(&expected).unwrap(),
                "the follower of {schools:?} did not converge; its status: {status:#}"
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The schools of the live entities a node stores.
fn stored_schools(node: &TestNode) -> std::collections::BTreeSet<uuid::Uuid> {
    node.node
        .state
        .store
        .read()
        .unwrap()
        .dump()
        .unwrap()
        .into_iter()
        .filter_map(|(_, _, entity, _)| entity.map(|e| e.school_id()))
        .collect()
}

fn metric(text: &str, line: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(line))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{line} not in\n{text}"))
}

const TEACHERS: [u128; 6] = [201, 202, 203, 204, 205, 206];
const CLASSES: [u128; 5] = [101, 102, 103, 104, 105];

/// A parent fed by Kafka serves schools 1–4; follower A follows school 1,
/// follower B schools 2 and 3. Creates, then updates, deletes, transfers
/// between and out of their schools, events out of order and repeated:
/// each follower answers for its schools exactly what the parent answers,
/// and stores nothing of another school.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_followers_converge_to_exactly_their_schools_of_a_kafka_fed_parent() {
    use EventType::*;
    let kafka = Kafka::start(1);
    let parent = TestNode::start(|c| {
        kafka.configure(c);
        c.schools.all = true;
    })
    .await;
    let a = follower(&parent, &[1], 30).await;
    let b = follower(&parent, &[2, 3], 30).await;
    let sent = std::cell::Cell::new(0u64);
    let send = |t: EventType, events: Vec<Value>| {
        sent.set(sent.get() + events.len() as u64);
        kafka.send(t, &events);
    };
    let class = |n: u128, k: u128, ts: i64, s: u128, name: &str| {
        event(
            ClassCreated,
            n,
            ts,
            Some(ts as u64),
            s,
            class_fields(id(k), name),
        )
    };
    let teacher = |t: EventType, n: u128, k: u128, ts: i64, s: u128, name: &str| {
        event(t, n, ts, Some(ts as u64), s, teacher_fields(id(k), name))
    };
    let assign = |t: EventType, n: u128, k: u128, tk: u128, ck: u128, ts: i64, s: u128| {
        event(
            t,
            n,
            ts,
            Some(ts as u64),
            s,
            assignment_fields(id(k), id(tk), id(ck), "homeroom"),
        )
    };
    send(
        ClassCreated,
        vec![
            class(1, 101, 1, 1, "Lớp 10A1"),
            class(2, 102, 1, 1, "Lớp 10A2"),
            class(3, 103, 1, 2, "Lớp 6A"),
            class(4, 104, 1, 3, "Lớp 9C"),
        ],
    );
    send(
        TeacherCreated,
        vec![
            teacher(TeacherCreated, 5, 201, 1, 1, "Nguyễn Thị Hương"),
            teacher(TeacherCreated, 6, 202, 1, 1, "Trần Văn Nam"),
            teacher(TeacherCreated, 7, 203, 1, 1, "Lê Thị Lan"),
            teacher(TeacherCreated, 8, 204, 1, 2, "Phạm Minh Đức"),
            teacher(TeacherCreated, 9, 205, 1, 3, "Hoàng Văn Bình"),
        ],
    );
    send(
        AssignmentCreated,
        vec![
            assign(AssignmentCreated, 10, 301, 201, 101, 1, 1),
            assign(AssignmentCreated, 11, 302, 202, 102, 1, 1),
            assign(AssignmentCreated, 12, 303, 204, 103, 1, 2),
        ],
    );
    let total = sent.get();
    wait_status(&parent, "the creates", |v| handled(v) == total).await;
    converges(&parent, &a, &[1], &TEACHERS, &CLASSES).await;
    converges(&parent, &b, &[2, 3], &TEACHERS, &CLASSES).await;

    // Updates, deletes, transfers, out of order and twice.
    send(
        TeacherUpdated,
        vec![
            teacher(TeacherUpdated, 20, 201, 2, 1, "Nguyễn Thị Hương (Toán)"),
            // Transferred from school 1 to 2: out of A, into B.
            teacher(TeacherUpdated, 21, 203, 2, 2, "Lê Thị Lan"),
            // Transferred from school 3 to 4, which nobody follows: out of B.
            teacher(TeacherUpdated, 22, 205, 2, 4, "Hoàng Văn Bình"),
            // An update before its create (another topic).
            teacher(TeacherUpdated, 23, 206, 3, 2, "Đỗ Thu Hà (mới)"),
            // A newer update, then an older one late.
            teacher(TeacherUpdated, 24, 202, 4, 1, "Trần Văn Nam (v4)"),
            teacher(TeacherUpdated, 25, 202, 3, 1, "Trần Văn Nam (v3, muộn)"),
        ],
    );
    send(
        TeacherCreated,
        vec![
            teacher(TeacherCreated, 26, 206, 1, 2, "Đỗ Thu Hà"),
            // The first create again.
            teacher(TeacherCreated, 5, 201, 1, 1, "Nguyễn Thị Hương"),
        ],
    );
    send(
        ClassUpdated,
        vec![
            // Re-attached from school 3 to 1: into A, out of B.
            event(
                ClassUpdated,
                27,
                2,
                Some(2),
                1,
                class_fields(id(104), "Lớp 9C"),
            ),
            // Created by its update only.
            event(
                ClassUpdated,
                28,
                2,
                Some(2),
                2,
                class_fields(id(105), "Lớp 7B"),
            ),
        ],
    );
    send(
        ClassDeleted,
        vec![event(
            ClassDeleted,
            29,
            3,
            Some(3),
            1,
            json!({"classId": id(102)}),
        )],
    );
    send(
        AssignmentDeleted,
        vec![event(
            AssignmentDeleted,
            30,
            3,
            Some(3),
            2,
            json!({"assignmentId": id(303)}),
        )],
    );
    // An update older than the delete: stays deleted.
    send(
        AssignmentUpdated,
        vec![assign(AssignmentUpdated, 31, 303, 204, 103, 2, 2)],
    );
    let total = sent.get();
    wait_status(&parent, "the changes", |v| handled(v) == total).await;
    converges(&parent, &a, &[1], &TEACHERS, &CLASSES).await;
    converges(&parent, &b, &[2, 3], &TEACHERS, &CLASSES).await;
    // What moved is where it belongs.
    let (_, moved) = b.get_json(&format!("/api/teachers/{}", id(203))).await;
    assert_eq!(moved["schoolId"], school(2).to_string());
    assert_eq!(a.get(&format!("/api/teachers/{}", id(203))).await.0, 404);
    assert_eq!(b.get(&format!("/api/teachers/{}", id(205))).await.0, 404);
    let (_, class) = a.get_json(&format!("/api/classes/{}", id(104))).await;
    assert_eq!(class["schoolId"], school(1).to_string());
    assert_eq!(class["syncSource"], "upstream");
    assert_eq!(stored_schools(&a), [school(1)].into());
    assert_eq!(stored_schools(&b), [school(2)].into(), "school 3 emptied");

    let v = wait_status(&a, "caught up", |v| v["upstream"]["caughtUp"] == true).await;
    let u = &v["upstream"];
    assert_eq!(u["url"], format!("http://{}", parent.node.addr));
    assert_eq!(u["connected"], true);
    assert!(u["lastError"].is_null(), "{v:#}");
    assert!(u["lastPageAt"].is_string(), "{v:#}");
    let cursor: Cursor = u["cursor"].as_str().unwrap().parse().unwrap();
    let parents = parent
        .node
        .state
        .store
        .read()
        .unwrap()
        .feed_cursor()
        .unwrap();
    assert_eq!(cursor.store, parents.store);
    assert_eq!(v["stale"], false);
    assert_eq!(v["kafka"]["configured"], false);
    assert_eq!(a.get("/health/ready").await.0, 200);
    assert!(counter(&v, "feed_transferred_out") >= 1, "{v:#}");

    let (_, _, body) = a.get("/metrics").await;
    let text = String::from_utf8(body).unwrap();
    promtool_check(&text);
    assert_eq!(metric(&text, "emis_edge_upstream_connected "), 1.0);
    assert_eq!(metric(&text, "emis_edge_upstream_caught_up "), 1.0);
    assert!(metric(&text, "emis_edge_upstream_pages_total ") >= 2.0);
    assert!(metric(&text, "emis_edge_upstream_lines_total ") >= 9.0);
    assert!(metric(&text, "emis_edge_upstream_bytes_total ") > 1000.0);
    assert!(metric(&text, "emis_edge_upstream_seconds_since_last_page ") >= 0.0);
    assert!(
        metric(
            &text,
            "emis_edge_upstream_changes_total{outcome=\"transferred_out\"}"
        ) >= 1.0
    );
    // The parent holds the followers' long-polls.
    let (_, _, body) = parent.get("/metrics").await;
    let text = String::from_utf8(body).unwrap();
    promtool_check(&text);
    for f in [a, b] {
        f.node.stop().await.unwrap();
    }
    parent.node.stop().await.unwrap();
}

/// A change committed while the follower's request waits at the parent
/// reaches the follower at once, not when the 30 s wait runs out; a
/// change of another school does not end the wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_reaches_a_waiting_follower_without_waiting_for_the_wait() {
    use EventType::*;
    let parent = TestNode::start(|c| c.schools.all = true).await;
    parent.apply(vec![change(TeacherCreated, 1, 1, 1)]);
    let f = follower(&parent, &[1], 30).await;
    wait_status(&f, "caught up", |v| v["upstream"]["caughtUp"] == true).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while parent.node.state.metrics.feed_long_polls.get() != 1 {
        assert!(
            Instant::now() < deadline,
            "the follower's request is not held"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let m = &f.node.state.metrics;
    let (pages, lines) = (m.upstream_pages.get(), m.upstream_lines.get());
    let mut committed = f.node.state.store.subscribe();
    committed.borrow_and_update();
    parent.apply(vec![change(TeacherCreated, 2, 2, 2)]);
    let started = Instant::now();
    parent.apply(vec![change(TeacherUpdated, 1, 3, 1)]);
    tokio::time::timeout(Duration::from_secs(25), committed.changed())
        .await
        .expect("the change did not reach the follower before the wait ran out")
        .unwrap();
    let took = started.elapsed();
    assert!(took < Duration::from_secs(5), "it took {took:?}");
    let (_, t) = f.get_json(&format!("/api/teachers/{}", id(1))).await;
    assert_eq!(t["fullName"], "Giáo viên 1-3");
    // Counted just after the commit.
    let deadline = Instant::now() + Duration::from_secs(10);
    while m.upstream_lines.get() == lines {
        assert!(Instant::now() < deadline, "the page was never counted");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert_eq!(
        (m.upstream_pages.get(), m.upstream_lines.get()),
        (pages + 1, lines + 1),
        "one page: the other school's change did not answer the wait"
    );
    assert_eq!(f.get(&format!("/api/teachers/{}", id(2))).await.0, 404);
}

/// The parent is rebuilt: stopped, and started on the same address with
/// a new store from an export of the old one plus later changes. The
/// follower's cursor is of another store (409): it reconciles from the
/// new parent's snapshots and converges.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parent_rebuilt_from_an_import_makes_the_follower_reconcile_and_converge() {
    use EventType::*;
    let old = TestNode::start(|c| c.schools.all = true).await;
    old.apply(vec![
        change(TeacherCreated, 201, 1, 1),
        change(TeacherCreated, 202, 1, 1),
        change(ClassCreated, 101, 1, 1),
        change(TeacherCreated, 203, 1, 2),
    ]);
    let f = follower(&old, &[1], 1).await;
    converges(&old, &f, &[1], &[201, 202, 203], &[101]).await;
    let old_store = old.node.state.store.read().unwrap().store_id().unwrap();

    let mut file = Vec::new();
    emis_edge::resync::export(
        &old.node.state.store,
        &[school(1), school(2)],
        &mut file,
        |_| {},
    )
    .unwrap();
    let addr = old.node.addr;
    old.node.stop().await.unwrap();
    let new = TestNode::start(|c| {
        c.schools.all = true;
        c.http.listen = addr;
    })
    .await;
    emis_edge::resync::import(
        &new.node.state.store,
        &emis_edge::domain::SchoolFilter::All,
        emis_edge::domain::FutureSkew::DEFAULT,
        file.as_slice(),
        new.clock.now_value(),
        |_| {},
    )
    .unwrap();
    // Meanwhile teacher 202 was deleted and 204 hired.
    new.apply(vec![
        change(TeacherDeleted, 202, 2, 1),
        change(TeacherCreated, 204, 2, 1),
    ]);
    converges(&new, &f, &[1], &[201, 202, 203, 204], &[101]).await;
    let v = wait_status(&f, "a cursor of the new store", |v| {
        v["upstream"]["cursor"]
            .as_str()
            .is_some_and(|c| !c.starts_with(&old_store.simple().to_string()))
    })
    .await;
    assert!(v["upstream"]["lastError"].is_null(), "{v:#}");
    let (_, _, body) = f.get("/metrics").await;
    let text = String::from_utf8(body).unwrap();
    assert!(
        metric(
            &text,
            "emis_edge_upstream_errors_total{reason=\"cursor_expired\"}"
        ) >= 1.0
    );
}

/// The parent purged tombstones past the cursor of a follower that was
/// offline: the follower reconciles from snapshots, and a delete it never
/// saw as a line reaches it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parent_purged_past_the_cursor_makes_the_follower_reconcile_and_converge() {
    use EventType::*;
    let parent = TestNode::start(|c| c.schools.all = true).await;
    parent.apply(vec![
        change(TeacherCreated, 201, 1, 1),
        change(TeacherCreated, 202, 1, 1),
    ]);
    let f = follower(&parent, &[1], 1).await;
    converges(&parent, &f, &[1], &[201, 202], &[]).await;
    let config = (*f.node.state.config).clone();
    let TestNode { node, dir, .. } = f;
    node.stop().await.unwrap();

    parent.apply(vec![
        change(TeacherDeleted, 201, 2, 1),
        change(TeacherUpdated, 202, 3, 1),
    ]);
    let retention = 30 * 86_400 * SEC;
    let purged = parent
        .node
        .state
        .store
        .purge_tombstones(parent.clock.now_value() + retention + SEC, retention)
        .unwrap();
    assert_eq!(purged, 1);

    let f = TestNode::start_in(dir, |c| *c = config).await;
    converges(&parent, &f, &[1], &[201, 202], &[]).await;
    assert_eq!(f.get(&format!("/api/teachers/{}", id(201))).await.0, 404);
    let (_, _, body) = f.get("/metrics").await;
    let text = String::from_utf8(body).unwrap();
    assert!(
        metric(
            &text,
            "emis_edge_upstream_errors_total{reason=\"cursor_expired\"}"
        ) >= 1.0
    );
    let v = wait_status(&f, "caught up", |v| v["upstream"]["caughtUp"] == true).await;
    assert!(v["upstream"]["lastError"].is_null(), "{v:#}");
}

/// A follower whose parent is down keeps answering, says so in status
/// and metrics, and catches up once the parent is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_serves_while_its_parent_is_down_and_catches_up_after() {
    use EventType::*;
    let parent = TestNode::start(|c| c.schools.all = true).await;
    parent.apply(vec![change(TeacherCreated, 201, 1, 1)]);
    let f = follower(&parent, &[1], 1).await;
    converges(&parent, &f, &[1], &[201], &[]).await;
    let addr = parent.node.addr;
    let TestNode { node, dir, .. } = parent;
    let config = (*node.state.config).clone();
    node.stop().await.unwrap();
    let v = wait_status(&f, "the parent gone", |v| {
        v["upstream"]["connected"] == false
    })
    .await;
    assert!(
        v["upstream"]["lastError"]
            .as_str()
            .is_some_and(|e| e.contains("cannot reach the parent")),
        "{v:#}"
    );
    assert_eq!(f.get(&format!("/api/teachers/{}", id(201))).await.0, 200);
    assert_eq!(f.get("/health/ready").await.0, 200);

    let parent = TestNode::start_in(dir, |c| {
        *c = config;
        c.http.listen = addr;
    })
    .await;
    parent.apply(vec![change(TeacherUpdated, 201, 2, 1)]);
    converges(&parent, &f, &[1], &[201], &[]).await;
    wait_status(&f, "connected again", |v| {
        v["upstream"]["connected"] == true && v["upstream"]["lastError"].is_null()
    })
    .await;
}

/// An empty follower is not ready until its first page with `more:
/// false`; `status`, the admin resync (from the parent) and export work
/// on a follower.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_bootstraps_in_pages_and_resync_and_export_use_the_parent() {
    use EventType::*;
    let parent = TestNode::start(|c| c.schools.all = true).await;
    parent.apply(
        (1..=30)
            .map(|n| change(TeacherCreated, 200 + n, 1, 1))
            .collect(),
    );
    let url = format!("http://{}", parent.node.addr);
    let f = TestNode::start(|c| {
        follow(c, url, &[1], 1);
        c.upstream.limit = 7;
    })
    .await;
    let teachers: Vec<u128> = (201..=230).collect();
    converges(&parent, &f, &[1], &teachers, &[]).await;
    assert_eq!(f.get("/health/ready").await.0, 200);
    assert!(f.node.state.metrics.upstream_pages.get() >= 5, "pages of 7");

    let r = f
        .http
        .post(f.url("/api/admin/resync?dryRun=true"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let report: Value = r.json().await.unwrap();
    let drift = &report["schools"][0]["report"]["drift"]["teacher"];
    assert_eq!(drift["same"], 30, "{report:#}");
    let mut file = Vec::new();
    let lines =
        emis_edge::resync::export(&f.node.state.store, &[school(1)], &mut file, |_| {}).unwrap();
    assert_eq!(lines, 31);
}

#[test]
fn check_config_refuses_a_follower_with_kafka_or_without_schools() {
    use std::process::Command;
    let dir = tempfile::tempdir().unwrap();
    let run = |text: &str| {
        let path = dir.path().join("edge.toml");
        std::fs::write(&path, text).unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_emis-edge"))
            .args(["check-config", "--config", path.to_str().unwrap()])
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let ids = "[schools]\nids = [\"5b0f0000-0000-4000-8000-000000000001\"]\n";
    let up = "[upstream]\nurl = \"https://province-01.example.vn:8080\"\n";
    let (code, err) = run(&format!("{up}{ids}[kafka]\nbrokers = \"kafka-1:9092\"\n"));
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("config key `upstream.url`") && err.contains("kafka.brokers"),
        "{err}"
    );
    let (code, err) = run(up);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("config key `schools.ids`"), "{err}");
    let (code, err) = run(&format!("{up}[schools]\nall = true\n"));
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("config key `schools.ids`"), "{err}");
    let (code, err) = run(&format!("{ids}[upstream]\nurl = \"ftp://x\"\n"));
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("config key `upstream.url`"), "{err}");
    let (code, err) = run(&format!("{ids}{up}wait_secs = 61\n"));
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("config key `upstream.wait_secs`"), "{err}");
    // A token file others can read is refused like the other token files.
    let token = dir.path().join("upstream.token");
    std::fs::write(&token, "upstream-token-0123456789\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (code, err) = run(&format!("{ids}{up}token_file = \"{}\"\n", token.display()));
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("config key `upstream.token_file`"), "{err}");
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o640)).unwrap();
    let (code, err) = run(&format!("{ids}{up}token_file = \"{}\"\n", token.display()));
    assert_eq!(code, Some(0), "{err}");
}

/// `emis-edge status` on a school node prints its parent: connected,
/// caught up, the cursor.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_command_shows_the_parent_of_a_school_node() {
    let parent = TestNode::start(|c| c.schools.all = true).await;
    parent.apply(vec![change(EventType::TeacherCreated, 201, 1, 1)]);
    let f = follower(&parent, &[1], 1).await;
    let v = wait_status(&f, "caught up", |v| v["upstream"]["caughtUp"] == true).await;
    let cursor = v["upstream"]["cursor"].as_str().unwrap().to_owned();
    let mut config = (*f.node.state.config).clone();
    config.http.listen = f.node.addr;
    let path = f.dir.path().join("edge.toml");
    std::fs::write(&path, config.to_redacted_toml()).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_emis-edge"))
        .args(["status", "--config", path.to_str().unwrap()])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = format!(
        "upstream       http://{} connected, caught up",
        parent.node.addr
    );
    assert!(text.contains(&line), "{text}");
    assert!(text.contains(&format!("cursor {cursor}")), "{text}");
    assert!(text.contains("kafka          not configured"), "{text}");
}

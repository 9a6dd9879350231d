//! The HTTP API over a real listener on port 0 (contract §4).

use std::collections::BTreeSet;

use emis_edge::domain::{EventType, SnapshotLine};
use emis_edge::store::{Batch, DeadLetter};
use serde_json::{json, Value};

use crate::support::*;

const TEACHER: u128 = 1;

/// A teacher with four assignments: two live classes (out of name order),
/// one deleted class, one class not replicated.
fn seed(node: &TestNode) {
    let s = school(1);
    let ev = |t: EventType, n: u128, body: Value| {
        parse(t, &merge(envelope(t, id(5000 + n), T0, Some(1), s), body))
    };
    node.apply(vec![
        ev(
            EventType::TeacherCreated,
            1,
            merge(
                teacher_fields(id(TEACHER), "Nguyễn Thị Hương"),
                json!({"email": null}),
            ),
        ),
        ev(EventType::ClassCreated, 2, class_fields(id(11), "Lớp 10A2")),
        ev(EventType::ClassCreated, 3, class_fields(id(12), "Lớp 10A1")),
        ev(EventType::ClassCreated, 4, class_fields(id(13), "Lớp 11B1")),
        ev(
            EventType::AssignmentCreated,
            5,
            assignment_fields(id(21), id(TEACHER), id(11), "subject"),
        ),
        ev(
            EventType::AssignmentCreated,
            6,
            assignment_fields(id(22), id(TEACHER), id(12), "homeroom"),
        ),
        ev(
            EventType::AssignmentCreated,
            7,
            assignment_fields(id(23), id(TEACHER), id(13), "subject"),
        ),
        ev(
            EventType::AssignmentCreated,
            8,
            assignment_fields(id(24), id(TEACHER), id(14), "subject"),
        ),
    ]);
    let delete = EventType::ClassDeleted;
    node.apply(vec![parse(
        delete,
        &merge(
            envelope(delete, id(5009), T0 + SEC, Some(2), s),
            json!({"classId": id(13)}),
        ),
    )]);
}

async fn problem(node: &TestNode, path: &str, status: u16) -> Value {
    let (got, ct, body) = node.get(path).await;
    assert_eq!(got, status, "{path}: {}", String::from_utf8_lossy(&body));
    assert_eq!(ct, "application/problem+json", "{path}");
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["status"], status);
    assert!(
        v["type"].is_string() && v["title"].is_string() && v["detail"].is_string(),
        "{v}"
    );
    v
}

#[tokio::test]
async fn teacher_detail_assembles_sorts_and_keeps_vietnamese_text_byte_for_byte() {
    let node = TestNode::start(|_| {}).await;
    seed(&node);
    let (status, ct, body) = node.get(&format!("/api/teachers/{}", id(TEACHER))).await;
    assert_eq!(status, 200);
    assert_eq!(ct, "application/json");
    let text = std::str::from_utf8(&body).unwrap();
    for s in ["Nguyễn Thị Hương", "Lớp 10A1", "Khối 10", "Toán"] {
        assert!(text.contains(s), "{s} not in {text}");
    }
    let v: Value = serde_json::from_slice(&body).unwrap();
    let synced = rfc3339(T0 + 3600 * SEC);
    assert_eq!(v["teacherId"], json!(id(TEACHER)));
    assert_eq!(v["schoolId"], json!(school(1)));
    assert_eq!(v["fullName"], "Nguyễn Thị Hương");
    assert_eq!(v["email"], Value::Null);
    assert_eq!(v["phone"], Value::Null);
    assert_eq!(v["subjects"], json!(["Toán", "Vật lý"]));
    assert_eq!(v["status"], "active");
    assert_eq!(v["lastSyncedAt"], synced.as_str());
    let a = v["classAssignments"].as_array().unwrap();
    let classes: Vec<&Value> = a.iter().map(|x| &x["classId"]).collect();
    // Lớp 10A1, Lớp 10A2, then the class not replicated; the deleted one is left out.
    assert_eq!(classes, [&json!(id(12)), &json!(id(11)), &json!(id(14))]);
    assert_eq!(
        a[0],
        json!({"assignmentId": id(22), "classId": id(12), "className": "Lớp 10A1",
               "grade": "Khối 10", "academicYear": "2024-2025", "totalStudents": 45,
               "schoolId": school(1), "subject": "Toán", "role": "homeroom",
               "lastSyncedAt": synced})
    );
    assert_eq!(a[2]["className"], Value::Null);
    assert_eq!(a[2]["grade"], Value::Null);
    assert_eq!(a[2]["totalStudents"], Value::Null);
}

#[tokio::test]
async fn entities_by_id_and_their_errors() {
    let node = TestNode::start(|_| {}).await;
    seed(&node);
    let (status, v) = node.get_json(&format!("/api/classes/{}", id(12))).await;
    assert_eq!(status, 200);
    assert_eq!(
        v,
        json!({"classId": id(12), "className": "Lớp 10A1", "grade": "Khối 10",
               "academicYear": "2024-2025", "totalStudents": 45, "schoolId": school(1),
               "homeroomTeacherId": null, "lastSyncedAt": rfc3339(T0 + 3600 * SEC),
               "syncSource": "kafka"})
    );
    problem(&node, &format!("/api/classes/{}", id(13)), 404).await; // deleted
    problem(&node, &format!("/api/classes/{}", id(99)), 404).await; // unknown
    problem(&node, &format!("/api/teachers/{}", id(99)), 404).await;
    let bad = problem(&node, "/api/teachers/not-a-uuid", 400).await;
    assert!(bad["detail"].as_str().unwrap().contains("not-a-uuid"));
    problem(&node, "/api/classes/123", 400).await;
    problem(&node, "/api/no/such/route", 404).await;
    let r = node
        .http
        .post(node.url("/api/sync/status"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 405);
    assert_eq!(r.headers()["content-type"], "application/problem+json");
}

#[tokio::test]
async fn school_lists_page_without_duplicates_or_gaps() {
    let node = TestNode::start(|_| {}).await;
    let s = school(2);
    let mut changes = Vec::new();
    for n in 0..25u128 {
        let t = EventType::ClassCreated;
        changes.push(parse(
            t,
            &merge(
                envelope(t, id(7000 + n), T0, None, s),
                class_fields(id(300 + n * 7 % 25), &format!("Lớp {n}")),
            ),
        ));
        let t = EventType::TeacherCreated;
        changes.push(parse(
            t,
            &merge(
                envelope(t, id(8000 + n), T0, None, s),
                teacher_fields(id(400 + n), "Trần Văn Nam"),
            ),
        ));
    }
    // Another school's class must not show up.
    let t = EventType::ClassCreated;
    changes.push(parse(
        t,
        &merge(
            envelope(t, id(7999), T0, None, school(3)),
            class_fields(id(999), "X"),
        ),
    ));
    node.apply(changes);

    for (route, field) in [("classes", "classId"), ("teachers", "teacherId")] {
        let mut seen = Vec::new();
        let mut path = format!("/api/schools/{s}/{route}?limit=10");
        let mut pages = 0;
        loop {
            let (status, v) = node.get_json(&path).await;
            assert_eq!(status, 200, "{path}");
            pages += 1;
            for item in v["items"].as_array().unwrap() {
                assert_eq!(item["schoolId"], json!(s));
                seen.push(item[field].as_str().unwrap().to_owned());
            }
            match &v["next"] {
                Value::Null => break,
                Value::String(next) => {
                    path = format!("/api/schools/{s}/{route}?limit=10&after={next}")
                }
                other => panic!("next is {other}"),
            }
        }
        assert_eq!(pages, 3, "{route}");
        assert_eq!(seen.len(), 25, "{route}: {seen:?}");
        let unique: BTreeSet<_> = seen.iter().cloned().collect();
        assert_eq!(unique.len(), 25, "{route} has duplicates");
        let mut sorted = seen.clone();
        sorted.sort();
        assert_eq!(sorted, seen, "{route} not ordered by id");
    }
    let (_, v) = node.get_json(&format!("/api/schools/{s}/classes")).await;
    assert_eq!(v["items"].as_array().unwrap().len(), 25);
    assert_eq!(v["next"], Value::Null);
    for bad in ["limit=0", "limit=1001", "limit=abc", "after=xyz"] {
        problem(&node, &format!("/api/schools/{s}/classes?{bad}"), 400).await;
    }
    problem(&node, "/api/schools/nope/teachers", 400).await;
}

#[tokio::test]
async fn snapshot_streams_every_record_and_an_end_line_with_the_count() {
    let node = TestNode::start(|c| {
        c.schools.all = false;
        c.schools.ids = vec![school(1)];
    })
    .await;
    seed(&node);
    let (status, ct, body) = node
        .get(&format!("/api/schools/{}/snapshot", school(1)))
        .await;
    assert_eq!(status, 200);
    assert_eq!(ct, "application/x-ndjson");
    let lines: Vec<SnapshotLine> = body
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .map(|l| SnapshotLine::parse(l).unwrap())
        .collect();
    // 1 teacher, 2 live classes, 4 assignments (the deleted class's too).
    assert_eq!(lines.len(), 8);
    match lines.last().unwrap() {
        SnapshotLine::End {
            school_id,
            count,
            as_of,
            cursor,
        } => {
            assert_eq!((*school_id, *count), (school(1), 7));
            assert_eq!(*as_of, T0 + SEC);
            // Where a follower continues the change feed (contract §3).
            let here = node.node.state.store.read().unwrap().feed_cursor().unwrap();
            assert_eq!(*cursor, Some(here));
            assert!(here.seq > 0, "the seeded changes have positions");
        }
        other => panic!("last line is {other:?}"),
    }
    problem(&node, &format!("/api/schools/{}/snapshot", school(2)), 404).await;
}

#[tokio::test]
async fn status_dead_letters_health_and_metrics_report_the_store() {
    let node = TestNode::start(|_| {}).await;
    assert_eq!(node.get("/health/live").await.0, 200);
    problem(&node, "/health/ready", 503).await;
    seed(&node);
    node.node
        .state
        .store
        .apply_batch(
            &Batch {
                dead_letters: vec![DeadLetter::new(
                    "emis.class.created",
                    2,
                    17,
                    b"{oops",
                    "not valid JSON: x".into(),
                    T0,
                )],
                offsets: offsets("emis.class.created", 2, 18),
                ..Batch::default()
            },
            T0,
            emis_edge::domain::SyncSource::Kafka,
        )
        .unwrap();
    assert_eq!(node.get("/health/ready").await.0, 200);

    let (status, v) = node.get_json("/api/sync/status").await;
    assert_eq!(status, 200);
    assert_eq!(v["nodeId"], "edge-01");
    assert_eq!(v["servedSchools"], "all");
    assert_eq!(v["deadLetterCount"], 1);
    assert_eq!(v["lastEventTime"], rfc3339(T0 + SEC).as_str());
    assert_eq!(
        v["stale"], true,
        "no broker and no resync: the node cannot vouch for freshness"
    );
    assert_eq!(v["partitions"][0]["topic"], "emis.class.created");
    assert_eq!(v["partitions"][0]["offset"], 18);
    assert_eq!(v["entities"]["classes"], 2);
    assert_eq!(v["entities"]["tombstones"], 1);

    let (status, v) = node.get_json("/api/sync/dead-letters?limit=5").await;
    assert_eq!(status, 200);
    let d = &v["items"][0];
    assert_eq!(
        (d["partition"].clone(), d["offset"].clone()),
        (json!(2), json!(17))
    );
    assert_eq!(d["raw"], "{oops");
    assert_eq!(d["reason"], "not valid JSON: x");
    problem(&node, "/api/sync/dead-letters?limit=-1", 400).await;

    let (status, _, body) = node.get("/metrics").await;
    assert_eq!(status, 200);
    let text = String::from_utf8(body).unwrap();
    for line in [
        "emis_edge_entities{kind=\"class\"} 2",
        "emis_edge_entities{kind=\"assignment\"} 4",
        "emis_edge_events_total{outcome=\"applied\"} 9",
        "emis_edge_dead_letters 1",
        "emis_edge_ready 1",
    ] {
        assert!(
            text.lines().any(|l| l.starts_with(line)),
            "{line} not in\n{text}"
        );
    }
}

fn token_file(dir: &std::path::Path, mode: u32) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join("api-tokens");
    std::fs::write(&path, "# one token per line\nschool-app-token-0123456789\n").unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
    path
}

#[tokio::test]
async fn with_a_token_file_the_api_needs_a_bearer_token_and_health_does_not() {
    let secrets = tempfile::tempdir().unwrap();
    let path = token_file(secrets.path(), 0o640);
    let node = TestNode::start(|c| c.http.token_file = Some(path)).await;
    seed(&node);
    let teacher = format!("/api/teachers/{}", id(TEACHER));
    let r = node.http.get(node.url(&teacher)).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 401);
    assert_eq!(r.headers()["www-authenticate"], "Bearer");
    assert_eq!(r.headers()["content-type"], "application/problem+json");
    let wrong = node
        .http
        .get(node.url(&teacher))
        .bearer_auth("school-app-token-0123456780")
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status().as_u16(), 401);
    let right = node
        .http
        .get(node.url(&teacher))
        .bearer_auth("school-app-token-0123456789")
        .send()
        .await
        .unwrap();
    assert_eq!(right.status().as_u16(), 200);
    for open in ["/health/live", "/health/ready", "/metrics"] {
        assert_eq!(node.get(open).await.0, 200, "{open}");
    }
    assert_eq!(node.get("/api/sync/status").await.0, 401);
}

#[tokio::test]
async fn a_world_readable_token_file_refuses_to_start() {
    let secrets = tempfile::tempdir().unwrap();
    let path = token_file(secrets.path(), 0o644);
    let dir = tempfile::tempdir().unwrap();
    let mut config = emis_edge::config::Config::default();
    config.node.data_dir = dir.path().to_owned();
    config.http.listen = "127.0.0.1:0".parse().unwrap();
    config.http.token_file = Some(path);
    config.schools.all = true;
    let clock = emis_edge::clock::ManualClock::new(T0);
    let err = emis_edge::node::start(config, clock)
        .await
        .err()
        .expect("must refuse");
    let text = format!("{err:#}");
    assert!(
        text.contains("readable by others") && text.contains("chmod 0640"),
        "{text}"
    );
}

#[tokio::test]
async fn health_and_metrics_can_move_to_their_own_listener() {
    let node = TestNode::start(|c| c.http.ops_listen = Some("127.0.0.1:0".parse().unwrap())).await;
    let ops = node.node.ops_addr.expect("ops listener bound");
    assert_ne!(ops, node.node.addr);
    assert_eq!(
        node.get("/health/live").await.0,
        404,
        "still on the API port"
    );
    assert_eq!(node.get("/metrics").await.0, 404);
    for path in ["/health/live", "/metrics"] {
        let r = node
            .http
            .get(format!("http://{ops}{path}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 200, "{path}");
    }
    let r = node
        .http
        .get(format!("http://{ops}/api/sync/status"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 404, "the API is not on the ops port");
    assert_eq!(node.get("/api/sync/status").await.0, 200);
}

/// `GET /health/live` on a plain blocking socket from a thread of its own,
/// so the probe does not depend on the node's runtime having a free
/// thread: the status code, or `None` when no answer came within `bound`.
fn probe_live(addr: std::net::SocketAddr, bound: std::time::Duration) -> Option<u16> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect_timeout(&addr, bound).ok()?;
    stream.set_read_timeout(Some(bound)).unwrap();
    stream
        .write_all(b"GET /health/live HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut got = [0u8; 12];
    stream.read_exact(&mut got).ok()?;
    std::str::from_utf8(&got[9..12]).ok()?.parse().ok()
}

/// Polls `done` until it holds, failing after `limit` with `what`. It
/// blocks the test's own thread, which is none of the runtime's: it works
/// also while every thread of the runtime is stuck.
fn until(what: &str, limit: std::time::Duration, mut done: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + limit;
    while !done() {
        assert!(std::time::Instant::now() < deadline, "timed out: {what}");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

/// Lookups that find the store being reopened (after an I/O error) wait
/// on the blocking pool, not on the async threads: with more of them
/// waiting than the runtime has threads, `/health/live` (the systemd
/// watchdog's probe) still answers at once, and the lookups are answered
/// once the store is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_live_answers_while_lookups_wait_for_a_store_reopen() {
    let node = TestNode::start(|_| {}).await;
    seed(&node);
    let store = node.node.state.store.clone();
    let held = store.hold_reopen();
    const LOOKUPS: usize = 8;
    let lookups: Vec<_> = (0..LOOKUPS)
        .map(|_| {
            let request = node
                .http
                .get(node.url(&format!("/api/teachers/{}", id(TEACHER))))
                .send();
            tokio::spawn(async move {
                let r = request.await.unwrap();
                (r.status().as_u16(), r.json::<Value>().await.unwrap())
            })
        })
        .collect();
    // At least as many lookups waiting for the handle as the runtime has
    // threads (on an async thread, they would hold every one).
    until(
        "the lookups waiting for the reopen",
        std::time::Duration::from_secs(10),
        || held.readers_waiting() >= 2,
    );
    let bound = std::time::Duration::from_secs(2);
    let live = probe_live(node.node.addr, bound);
    assert_eq!(
        live,
        Some(200),
        "/health/live must answer within {bound:?} while lookups wait for the store"
    );
    drop(held);
    for lookup in lookups {
        let (status, detail) = lookup.await.unwrap();
        assert_eq!(status, 200, "{detail}");
        assert_eq!(detail["fullName"], "Nguyễn Thị Hương");
    }
}

/// A store that stays unavailable is a `503` with `Retry-After`, never a
/// `500`, and a lookup does not wait for it on an async thread.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lookups_while_the_store_stays_unavailable_are_503_with_retry_after() {
    let node = TestNode::start(|_| {}).await;
    seed(&node);
    let store = node.node.state.store.clone();
    let _held = store.hold_reopen();
    let requests = [
        format!("/api/teachers/{}", id(TEACHER)),
        format!("/api/classes/{}", id(11)),
        format!("/api/schools/{}/classes", school(1)),
        format!("/api/schools/{}/snapshot", school(1)),
        "/api/sync/dead-letters".to_owned(),
    ]
    .map(|path| {
        let request = tokio::spawn(node.http.get(node.url(&path)).send());
        (path, request)
    });
    for (path, request) in requests {
        let r = request.await.unwrap().unwrap();
        assert_eq!(r.status().as_u16(), 503, "{path}");
        assert_eq!(r.headers()["retry-after"], "1", "{path}");
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["type"], "urn:emis-edge:problem:store-unavailable", "{v}");
    }
}

fn freshness(text: &str) -> Vec<(String, f64)> {
    text.lines()
        .filter(|l| l.starts_with("emis_edge_school_oldest_synced_timestamp_seconds{"))
        .map(|l| {
            let (name, value) = l.rsplit_once(' ').unwrap();
            (name.to_owned(), value.parse().unwrap())
        })
        .collect()
}

/// Per-school freshness needs a walk over every record: the `freshness`
/// worker does it, and a scrape only reads what it last computed. Records
/// changed after the worker ran do not show until it runs again — a
/// scrape that walked the records would show them.
#[tokio::test]
async fn school_freshness_comes_from_the_worker_not_from_a_scrape() {
    let s = school(1);
    let ev = |t: EventType, n: u128, ts: i64, body: Value| {
        parse(t, &merge(envelope(t, id(5000 + n), ts, Some(1), s), body))
    };
    // Synced at T0 + 1 h (the test clock) before the node starts.
    let node = TestNode::start_seeded(
        vec![
            ev(
                EventType::TeacherCreated,
                1,
                T0,
                teacher_fields(id(TEACHER), "Nguyễn Thị Hương"),
            ),
            ev(
                EventType::ClassCreated,
                2,
                T0,
                class_fields(id(11), "Lớp 10A1"),
            ),
        ],
        |_| {},
    )
    .await;
    let synced = (T0 + 3600 * SEC) as f64 / 1e9;
    let worker_ran = || async {
        let (_, v) = node.get_json("/api/sync/status").await;
        v["workers"]
            .as_array()
            .unwrap()
            .iter()
            .any(|w| w["name"] == "freshness" && w["steps"].as_u64() >= Some(1))
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !worker_ran().await {
        assert!(
            std::time::Instant::now() < deadline,
            "the freshness worker never ran"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    // Every record of the school is synced again, an hour later.
    node.clock.set(T0 + 7200 * SEC);
    node.apply(vec![
        ev(
            EventType::TeacherUpdated,
            3,
            T0 + SEC,
            teacher_fields(id(TEACHER), "Nguyễn Thị Hương"),
        ),
        ev(
            EventType::ClassUpdated,
            4,
            T0 + SEC,
            class_fields(id(11), "Lớp 10A1"),
        ),
    ]);
    for _ in 0..3 {
        let (status, _, body) = node.get("/metrics").await;
        assert_eq!(status, 200);
        let text = String::from_utf8(body).unwrap();
        assert_eq!(
            freshness(&text),
            vec![(
                format!("emis_edge_school_oldest_synced_timestamp_seconds{{school=\"{s}\"}}"),
                synced
            )],
            "a scrape shows the worker's result, it does not walk the records"
        );
    }
}

/// The admin rule alone, for peers a test cannot connect from: with a
/// token file the token decides for every peer, loopback too; without
/// one only this host gets in.
#[test]
fn admin_access_needs_the_token_from_every_peer_or_else_this_host() {
    use emis_edge::api::admin::{admin_access, AdminAccess::*};
    use std::net::IpAddr;
    let ip = |s: &str| s.parse::<IpAddr>().unwrap();
    let (any, lo) = (ip("0.0.0.0"), ip("127.0.0.1"));
    // A token file: loopback (a reverse proxy on this host) is no proof.
    for peer in ["127.0.0.1", "::1", "10.1.2.3", "192.168.1.5"] {
        assert_eq!(
            admin_access(true, false, ip(peer), any),
            NeedsToken,
            "{peer}"
        );
        assert_eq!(admin_access(true, true, ip(peer), any), Granted, "{peer}");
    }
    // No token file: loopback and this host's own listen address only.
    for peer in ["127.0.0.1", "127.0.0.2", "::1", "::ffff:127.0.0.1"] {
        assert_eq!(admin_access(false, false, ip(peer), any), Granted, "{peer}");
    }
    for (peer, listen) in [
        ("10.1.2.3", any),
        ("10.1.2.3", lo),
        ("192.168.1.6", ip("192.168.1.5")),
        ("2001:db8::2", ip("::")),
    ] {
        assert_eq!(
            admin_access(false, false, ip(peer), listen),
            Forbidden,
            "{peer} → {listen}"
        );
        // A token is no way around it when the node has none configured.
        assert_eq!(admin_access(false, true, ip(peer), listen), Forbidden);
    }
    assert_eq!(
        admin_access(false, false, ip("192.168.1.5"), ip("192.168.1.5")),
        Granted,
        "the command line on a node bound to one of the host's addresses"
    );
}

/// Runs the command line against `node`, with `env` on top.
async fn cli(node: &TestNode, args: &[&str], env: &[(&str, String)]) -> (i32, String, String) {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_emis-edge"));
    cmd.args(args)
        .env_remove("RUST_LOG")
        .env("EMIS_EDGE__HTTP__LISTEN", node.node.addr.to_string());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// With `http.token_file` set, a request from loopback without the token
/// is refused on every admin route (a reverse proxy on the same host
/// would otherwise make every client an admin), and the command line,
/// which reads the token from the same file, still works through the
/// node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_token_file_admin_routes_need_it_from_loopback_too_and_the_cli_sends_it() {
    let secrets = tempfile::tempdir().unwrap();
    let path = token_file(secrets.path(), 0o600);
    let node = TestNode::start(|c| c.http.token_file = Some(path.clone())).await;
    seed(&node);
    let token = "school-app-token-0123456789";
    for (method, route) in [
        (reqwest::Method::GET, "/api/admin/schools"),
        (reqwest::Method::POST, "/api/admin/resync"),
        (reqwest::Method::POST, "/api/admin/import"),
    ] {
        let r = node
            .http
            .request(method.clone(), node.url(route))
            .body("")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 401, "{route} without a token");
        assert_eq!(r.headers()["www-authenticate"], "Bearer");
        let r = node
            .http
            .request(method, node.url(route))
            .bearer_auth("school-app-token-0123456780")
            .body("")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 401, "{route} with a wrong token");
    }
    let r = node
        .http
        .get(node.url("/api/admin/schools"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);

    // The command line reads http.token_file and goes through the node.
    let env = [(
        "EMIS_EDGE__HTTP__TOKEN_FILE",
        path.to_str().unwrap().to_owned(),
    )];
    let (code, out, err) = cli(&node, &["status", "--config", "/dev/null", "--json"], &env).await;
    assert_eq!(code, 0, "{err}");
    let doc: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(doc["entities"]["classes"], 2);
    let file = secrets.path().join("usb.ndjson");
    let file = file.to_str().unwrap();
    let (code, _, err) = cli(
        &node,
        &["export", "--config", "/dev/null", "--out", file],
        &env,
    )
    .await;
    assert_eq!(code, 0, "{err}");
    let exported = std::fs::read_to_string(file).unwrap();
    assert!(exported.contains("Nguyễn Thị Hương"), "{exported}");
    // Import a school the node did not have, through the node.
    let lines = [
        merge(
            json!({"kind": "teacher", "schoolId": school(2), "version": 1,
                   "timestamp": rfc3339(T0)}),
            teacher_fields(id(900), "Nguyễn Thị Hương"),
        ),
        json!({"kind": "end", "schoolId": school(2), "count": 1, "asOf": rfc3339(T0)}),
    ];
    let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
    std::fs::write(file, text).unwrap();
    let (code, out, err) = cli(&node, &["import", "--config", "/dev/null", file], &env).await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("  ok  records"), "{out}");
    let (status, page) = node
        .get_json_with(&format!("/api/schools/{}/teachers", school(2)), token)
        .await;
    assert_eq!(status, 200);
    assert_eq!(page["items"][0]["fullName"], "Nguyễn Thị Hương");

    // Without the token file the command line is refused, and says why.
    let (code, _, err) = cli(&node, &["import", "--config", "/dev/null", file], &[]).await;
    assert_eq!(code, 1);
    assert!(err.contains("401"), "{err}");
}

async fn get_with(node: &TestNode, path: &str, headers: &[(&str, &str)]) -> reqwest::Response {
    let mut request = node.http.get(node.url(path));
    for (k, v) in headers {
        request = request.header(*k, *v);
    }
    request.send().await.unwrap()
}

fn gunzip(bytes: &[u8]) -> Vec<u8> {
    use std::io::Read;
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(bytes)
        .read_to_end(&mut out)
        .unwrap();
    out
}

/// A teacher or class a client holds already costs a `304` without a
/// body; any change of what the answer shows (for a teacher: also an
/// assignment of it) gives a new tag. Answers say how long they may be
/// reused: not without asking again.
#[tokio::test]
async fn lookups_carry_an_etag_and_answer_304_to_a_client_that_holds_them() {
    let node = TestNode::start(|_| {}).await;
    seed(&node);
    for path in [
        format!("/api/teachers/{}", id(TEACHER)),
        format!("/api/classes/{}", id(12)),
    ] {
        let r = get_with(&node, &path, &[]).await;
        assert_eq!(r.status().as_u16(), 200);
        assert_eq!(r.headers()["cache-control"], "no-cache", "{path}");
        let etag = r.headers()["etag"].to_str().unwrap().to_owned();
        assert!(etag.starts_with('"') && etag.ends_with('"'), "{etag}");
        let body = r.bytes().await.unwrap();
        for held in [
            etag.clone(),
            format!("W/{etag}"),
            format!("\"x\", {etag}"),
            "*".into(),
        ] {
            let r = get_with(&node, &path, &[("if-none-match", &held)]).await;
            assert_eq!(r.status().as_u16(), 304, "{path} {held}");
            assert_eq!(r.headers()["etag"], etag.as_str());
            assert_eq!(r.headers()["cache-control"], "no-cache");
            assert!(r.bytes().await.unwrap().is_empty());
        }
        let r = get_with(&node, &path, &[("if-none-match", "\"other\"")]).await;
        assert_eq!(r.status().as_u16(), 200);
        assert_eq!(r.bytes().await.unwrap(), body);
    }

    // The teacher's document changes when one of its classes does: the
    // teacher's own record (and order key) stays the same.
    let teacher = format!("/api/teachers/{}", id(TEACHER));
    let class = format!("/api/classes/{}", id(12));
    let before: Vec<String> = {
        let mut tags = Vec::new();
        for path in [&teacher, &class] {
            let r = get_with(&node, path, &[]).await;
            tags.push(r.headers()["etag"].to_str().unwrap().to_owned());
        }
        tags
    };
    let t = EventType::ClassUpdated;
    node.apply(vec![parse(
        t,
        &merge(
            envelope(t, id(5100), T0 + 2 * SEC, Some(2), school(1)),
            class_fields(id(12), "Lớp 10A1 (chuyên Toán)"),
        ),
    )]);
    for (path, old) in [&teacher, &class].into_iter().zip(&before) {
        let r = get_with(&node, path, &[("if-none-match", old)]).await;
        assert_eq!(r.status().as_u16(), 200, "{path}: a changed answer");
        assert_ne!(r.headers()["etag"].to_str().unwrap(), old);
        let v: Value = r.json().await.unwrap();
        assert!(v.to_string().contains("Lớp 10A1 (chuyên Toán)"), "{v}");
    }
    // Errors are not tagged.
    let r = get_with(&node, &format!("/api/teachers/{}", id(999)), &[]).await;
    assert_eq!(r.status().as_u16(), 404);
    assert!(r.headers().get("etag").is_none());
}

/// Lists and the snapshot are gzip-compressed for clients that accept it,
/// and the same bytes once decompressed; a lookup is not compressed.
#[tokio::test]
async fn lists_and_snapshots_are_gzipped_for_clients_that_accept_it() {
    let node = TestNode::start(|_| {}).await;
    seed(&node);
    let gzip = [("accept-encoding", "gzip")];
    for path in [
        format!("/api/schools/{}/classes", school(1)),
        format!("/api/schools/{}/teachers", school(1)),
        format!("/api/schools/{}/snapshot", school(1)),
    ] {
        let plain = get_with(&node, &path, &[]).await;
        assert_eq!(plain.status().as_u16(), 200);
        assert!(plain.headers().get("content-encoding").is_none(), "{path}");
        let plain = plain.bytes().await.unwrap();
        let zipped = get_with(&node, &path, &gzip).await;
        assert_eq!(zipped.status().as_u16(), 200);
        assert_eq!(zipped.headers()["content-encoding"], "gzip", "{path}");
        assert_eq!(zipped.headers()["vary"], "accept-encoding", "{path}");
        let zipped = zipped.bytes().await.unwrap();
        assert_ne!(zipped, plain);
        assert_eq!(
            String::from_utf8(gunzip(&zipped)).unwrap(),
            String::from_utf8(plain.to_vec()).unwrap(),
            "{path}"
        );
    }
    let r = get_with(&node, &format!("/api/schools/{}/classes", school(1)), &[]).await;
    assert_eq!(r.headers()["cache-control"], "no-cache");
    let r = get_with(&node, &format!("/api/schools/{}/snapshot", school(1)), &[]).await;
    assert_eq!(r.headers()["cache-control"], "no-store");
    let r = get_with(&node, &format!("/api/teachers/{}", id(TEACHER)), &gzip).await;
    assert!(r.headers().get("content-encoding").is_none());
}

/// `http.request_timeout_secs`: a request to an API route that takes
/// longer is answered `408` with a problem document, and counted under its
/// route and status. (A test-only route that never answers, served behind
/// the same layers as the read routes by `api::router_with`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_past_the_time_limit_is_answered_408_with_a_problem() {
    use axum::routing::get;
    let mut config = emis_edge::config::Config::default();
    config.http.request_timeout_secs = 1;
    let node = emis_edge::state::NodeState::new(
        std::sync::Arc::new(emis_edge::store::Store::open_in_memory().unwrap()),
        config.clone(),
        emis_edge::clock::ManualClock::new(T0),
    );
    let state = emis_edge::api::ApiState::new(node, Vec::new(), Default::default());
    let stalled = axum::Router::new().route(
        "/api/test/stalled",
        get(std::future::pending::<&'static str>),
    );
    let app = emis_edge::api::router_with(state, stalled);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    let server = tokio::spawn(emis_edge::server::serve(
        listener,
        app,
        emis_edge::server::Limits::of(&config.http),
        stop.clone(),
    ));
    let http = reqwest::Client::new();
    let started = std::time::Instant::now();
    let response = http
        .get(format!("http://{addr}/api/test/stalled"))
        .timeout(std::time::Duration::from_secs(30))
        .send()
        .await
        .expect("the node answers, within the time limit");
    assert_eq!(response.status().as_u16(), 408);
    assert!(started.elapsed() >= std::time::Duration::from_secs(1));
    assert_eq!(
        response.headers()["content-type"],
        "application/problem+json"
    );
    let problem: Value = response.json().await.unwrap();
    assert_eq!(problem["status"], 408);
    assert_eq!(
        problem["detail"],
        "the request took longer than http.request_timeout_secs"
    );
    let metrics = http
        .get(format!("http://{addr}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.lines().any(|l| l.starts_with(
            "emis_edge_http_request_duration_seconds_count{route=\"/api/test/stalled\",status=\"408\"} 1"
        )),
        "{metrics}"
    );
    stop.cancel();
    server.await.unwrap().unwrap();
}

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
        } => {
            assert_eq!((*school_id, *count), (school(1), 7));
            assert_eq!(*as_of, T0 + SEC);
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
    let state = emis_edge::api::ApiState::new(node, Vec::new());
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

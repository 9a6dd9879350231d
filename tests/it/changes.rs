//! `GET /api/changes` (contract §6) over a real listener: pages and their
//! page line, parameter problems, expired cursors, gzip, tokens, and the
//! long-poll — woken by a commit of its schools, bounded on its own, not
//! behind the read routes' limits, ended by a stop.

use std::time::{Duration, Instant};

use emis_edge::domain::{Cursor, EventType, FeedLine};
use serde_json::Value;
use uuid::Uuid;

use crate::support::*;

fn feed(schools: &[u128], extra: &str) -> String {
    let mut path = "/api/changes?".to_owned();
    for s in schools {
        path.push_str(&format!("school={}&", school(*s)));
    }
    path.push_str(extra);
    path
}

/// The page line of a page, and its change lines.
fn split(body: &[u8]) -> (Vec<Value>, Value) {
    let mut lines = ndjson(body);
    let page = lines.pop().expect("a page line");
    assert_eq!(page["kind"], "page", "the last line is the page line");
    (lines, page)
}

async fn problem(node: &TestNode, path: &str, status: u16) -> Value {
    let (got, ct, body) = node.get(path).await;
    assert_eq!(got, status, "{path}: {}", String::from_utf8_lossy(&body));
    assert_eq!(ct, "application/problem+json", "{path}");
    serde_json::from_slice(&body).unwrap()
}

/// Waits until the node holds `n` long-polls (an observable event, so a
/// test knows its request is waiting before it commits).
async fn holding(node: &TestNode, n: i64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while node.node.state.metrics.feed_long_polls.get() != n {
        assert!(Instant::now() < deadline, "never held {n} long-polls");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn pages_are_ndjson_closed_by_a_page_line_and_continue_from_its_cursor() {
    let node = TestNode::start(|c| c.schools.all = true).await;
    use EventType::*;
    node.apply(vec![
        change(TeacherCreated, 1, 1, 1),
        change(ClassCreated, 2, 2, 1),
        change(ClassCreated, 3, 3, 2),
        change(TeacherCreated, 4, 4, 1),
    ]);
    node.apply(vec![change(TeacherDeleted, 4, 5, 1)]);

    let (status, ct, body) = node.get(&feed(&[1], "limit=2")).await;
    assert_eq!((status, ct.as_str()), (200, "application/x-ndjson"));
    let (lines, page) = split(&body);
    assert_eq!(lines.len(), 2);
    assert_eq!(
        (page["count"].as_u64(), page["more"].as_bool()),
        (Some(2), Some(true))
    );
    assert_eq!(page["asOf"], rfc3339(T0 + 5 * SEC), "the store's watermark");
    assert_eq!(lines[0]["teacherId"], id(1).to_string());
    assert_eq!(lines[0]["fullName"], "Giáo viên 1-1");
    assert_eq!(lines[1]["classId"], id(2).to_string());
    // Every line parses as a follower reads it.
    for raw in body.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
        FeedLine::parse(raw).unwrap();
    }

    let cursor = page["cursor"].as_str().unwrap();
    let (_, _, body) = node.get(&feed(&[1], &format!("after={cursor}"))).await;
    let (lines, page) = split(&body);
    assert_eq!(lines.len(), 1, "school 2's class is not in school 1's feed");
    let delete = &lines[0];
    assert_eq!(delete["kind"], "teacher");
    assert_eq!(delete["deleted"], true);
    assert_eq!(delete["teacherId"], id(4).to_string());
    assert_eq!(delete["schoolId"], school(1).to_string());
    assert_eq!(
        (delete["version"].as_u64(), delete["timestamp"].as_str()),
        (Some(5), Some(rfc3339(T0 + 5 * SEC).as_str()))
    );
    assert_eq!(page["more"], false);
    // Nothing new: an empty page at once (wait defaults to 0), the same
    // cursor.
    let after_all = page["cursor"].as_str().unwrap().to_owned();
    let (_, _, body) = node.get(&feed(&[1], &format!("after={after_all}"))).await;
    let (lines, page) = split(&body);
    assert!(lines.is_empty());
    assert_eq!(
        (page["count"].as_u64(), page["cursor"].as_str()),
        (Some(0), Some(after_all.as_str()))
    );
    // Both schools, from the beginning: every entity once.
    let (_, _, body) = node.get(&feed(&[1, 2, 1], "")).await;
    let (lines, _) = split(&body);
    assert_eq!(lines.len(), 4);
}

#[tokio::test]
async fn bad_parameters_are_400_an_unserved_school_404_and_an_old_cursor_409() {
    let node = TestNode::start(|c| c.schools.ids = vec![school(1)]).await;
    node.apply(vec![change(EventType::TeacherCreated, 1, 1, 1)]);
    for (path, names) in [
        ("/api/changes".to_owned(), "school is required"),
        (feed(&[], "school=nope"), "school \"nope\""),
        (feed(&[1], "limit=0"), "limit"),
        (feed(&[1], "limit=10001"), "limit"),
        (feed(&[1], "wait=61"), "wait"),
        (feed(&[1], "wait=soon"), "wait"),
        (feed(&[1], "after=abc"), "after \"abc\""),
        (
            feed(&[1], "limit=5&limit=6"),
            "limit is given more than once",
        ),
    ] {
        let p = problem(&node, &path, 400).await;
        assert!(p["detail"].as_str().unwrap().contains(names), "{path}: {p}");
    }
    let p = problem(&node, &feed(&[1, 2], ""), 404).await;
    assert!(
        p["detail"]
            .as_str()
            .unwrap()
            .contains(&school(2).to_string()),
        "{p}"
    );

    let elsewhere = Cursor::at(Uuid::from_u128(7), 1);
    let p = problem(&node, &feed(&[1], &format!("after={elsewhere}")), 409).await;
    assert!(
        p["type"].as_str().unwrap().ends_with("cursor-expired"),
        "{p}"
    );
    assert!(
        p["detail"].as_str().unwrap().contains("another store"),
        "{p}"
    );
    // Purged past the cursor: expired too.
    let here = node.node.state.store.read().unwrap().feed_cursor().unwrap();
    node.apply(vec![change(EventType::TeacherDeleted, 1, 2, 1)]);
    let year = 365 * 86_400 * SEC;
    node.node
        .state
        .store
        .purge_tombstones(T0 + year, 30 * 86_400 * SEC)
        .unwrap();
    let p = problem(&node, &feed(&[1], &format!("after={here}")), 409).await;
    assert!(
        p["type"].as_str().unwrap().ends_with("cursor-expired"),
        "{p}"
    );
}

#[tokio::test]
async fn the_feed_and_the_snapshot_are_gzipped_for_clients_that_accept_it() {
    let node = TestNode::start(|c| c.schools.all = true).await;
    node.apply(
        (1..=50)
            .map(|n| change(EventType::TeacherCreated, n, 1, 1))
            .collect(),
    );
    for path in [
        feed(&[1], ""),
        format!("/api/schools/{}/snapshot", school(1)),
    ] {
        let plain = node.get(&path).await.2;
        let r = node
            .http
            .get(node.url(&path))
            .header("accept-encoding", "gzip")
            .send()
            .await
            .unwrap();
        assert_eq!(r.headers()["content-encoding"], "gzip", "{path}");
        assert_eq!(r.headers()["content-type"], "application/x-ndjson");
        let packed = r.bytes().await.unwrap();
        assert!(
            packed.len() * 3 < plain.len(),
            "{path}: {} of {}",
            packed.len(),
            plain.len()
        );
        // The snapshot's end line carries the cursor of its read, the
        // feed's page line the head: equal here, nothing changed between.
        assert_eq!(gunzip(&packed), plain, "{path}");
    }
}

#[tokio::test]
async fn with_a_token_file_the_feed_needs_the_token() {
    use std::os::unix::fs::PermissionsExt;
    let secrets = tempfile::tempdir().unwrap();
    let path = secrets.path().join("tokens");
    std::fs::write(&path, "follower-token-0123456789\n").unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    let node = TestNode::start(|c| {
        c.schools.all = true;
        c.http.token_file = Some(path);
    })
    .await;
    assert_eq!(node.get(&feed(&[1], "")).await.0, 401);
    let r = node
        .http
        .get(node.url(&feed(&[1], "")))
        .bearer_auth("follower-token-0123456789")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
}

/// The read routes allow one request at a time for one second here; a
/// long-poll is neither queued behind them nor cut off by their timeout,
/// and a lookup is answered while it waits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_poll_waits_outside_the_read_limits_and_lookups_go_on() {
    let node = TestNode::start(|c| {
        c.schools.all = true;
        c.http.max_concurrent_requests = 1;
        c.http.request_timeout_secs = 1;
    })
    .await;
    node.apply(vec![change(EventType::TeacherCreated, 1, 1, 1)]);
    let url = node.url(&feed(&[2], "wait=3"));
    let client = node.http.clone();
    let started = Instant::now();
    let poll = tokio::spawn(async move {
        let r = client.get(url).send().await.unwrap();
        (
            r.status().as_u16(),
            r.bytes().await.unwrap(),
            started.elapsed(),
        )
    });
    holding(&node, 1).await;
    let (status, _, _) = node.get(&format!("/api/teachers/{}", id(1))).await;
    assert_eq!(status, 200, "a lookup while the long-poll waits");
    let (status, body, took) = poll.await.unwrap();
    assert_eq!(status, 200, "not 408: {}", String::from_utf8_lossy(&body));
    let (lines, page) = split(&body);
    assert!(lines.is_empty());
    assert_eq!(page["count"], 0);
    assert!(
        took >= Duration::from_millis(2900),
        "held for wait: {took:?}"
    );
    assert_eq!(node.node.state.metrics.feed_long_polls.get(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_of_its_schools_answers_a_long_poll_at_once_others_do_not() {
    let node = TestNode::start(|c| c.schools.all = true).await;
    node.apply(vec![change(EventType::TeacherCreated, 1, 1, 1)]);
    let (_, _, body) = node.get(&feed(&[1], "")).await;
    let cursor = split(&body).1["cursor"].as_str().unwrap().to_owned();
    let url = node.url(&feed(&[1], &format!("after={cursor}&wait=30")));
    let client = node.http.clone();
    let poll = tokio::spawn(async move {
        let r = client.get(url).send().await.unwrap();
        (r.bytes().await.unwrap(), Instant::now())
    });
    holding(&node, 1).await;
    // Another school's change wakes the wait, which reads nothing for
    // school 1 and goes on waiting.
    node.apply(vec![change(EventType::TeacherCreated, 2, 2, 2)]);
    let committed = Instant::now();
    node.apply(vec![change(EventType::TeacherUpdated, 1, 3, 1)]);
    let (body, answered) = poll.await.unwrap();
    let (lines, page) = split(&body);
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert_eq!(lines[0]["fullName"], "Giáo viên 1-3");
    assert_eq!(page["more"], false);
    let took = answered - committed;
    assert!(
        took < Duration::from_secs(5),
        "answered {took:?} after the commit, not at wait's end"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_polls_past_their_bound_get_503_and_a_stop_ends_the_held_ones() {
    let node = TestNode::start(|c| {
        c.schools.all = true;
        c.http.max_long_polls = Some(1);
    })
    .await;
    let url = node.url(&feed(&[1], "wait=60"));
    let client = node.http.clone();
    let first = tokio::spawn(async move {
        let r = client.get(url).send().await.unwrap();
        (r.status().as_u16(), r.bytes().await.unwrap())
    });
    holding(&node, 1).await;
    let r = node
        .http
        .get(node.url(&feed(&[1], "wait=60")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 503);
    assert_eq!(r.headers()["retry-after"], "5");
    // Without wait it is answered as usual.
    assert_eq!(node.get(&feed(&[1], "")).await.0, 200);
    assert_eq!(node.node.state.metrics.feed_long_polls_refused.get(), 1);

    let stopping = Instant::now();
    node.node.stop().await.unwrap();
    let (status, body) = first.await.unwrap();
    assert_eq!(status, 200);
    assert_eq!(split(&body).1["count"], 0);
    assert!(
        stopping.elapsed() < Duration::from_secs(10),
        "{:?}",
        stopping.elapsed()
    );
}

#[tokio::test]
async fn a_request_naming_many_schools_is_served() {
    let node = TestNode::start(|c| c.schools.all = true).await;
    node.apply(vec![change(EventType::TeacherCreated, 1, 1, 1)]);
    let many: Vec<u128> = (1..=500).collect();
    let path = feed(&many, "");
    assert!(path.len() > 8 * 1024, "longer than other routes accept");
    let (status, _, body) = node.get(&path).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    assert_eq!(split(&body).0.len(), 1);
}

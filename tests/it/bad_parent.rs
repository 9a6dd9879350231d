//! Bad upstream input (contract §6): a parent
//! that misbehaves on purpose — a page cut short, a count that differs,
//! malformed JSON, a cursor that goes backwards, HTML, a body that hangs,
//! a line stamped beyond the skew. Nothing of such a page is applied, the
//! reason is in status, the follower retries with backoff and keeps
//! serving, and it takes the good page once the parent answers one. A
//! line of another school only ever removes what the follower holds.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{RawQuery, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use emis_edge::domain::feed::page_line;
use emis_edge::domain::snapshot::record_line;
use emis_edge::domain::{
    Cursor, Entity, OrderKey, Record, SyncSource, Teacher, TeacherStatus, Timestamp,
};
use uuid::Uuid;

use crate::follower::follow;
use crate::kafka::{counter, wait_status};
use crate::support::*;

const STORE: Uuid = Uuid::from_u128(0x00aa_0000_0000_0000_0000_0000_0000_00aa);
/// The parent's watermark: the `asOf` of its pages.
const AS_OF: Timestamp = T0 + 10 * SEC;
const HOUR: i64 = 3600 * SEC;

/// What the test parent answers to a request after the first page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// Nothing new: holds the request for its wait, then an empty page.
    Quiet,
    /// The second page, as it should be.
    Good,
    /// A page whose last line is missing.
    CutShort,
    /// The page line counts two lines; one is there.
    WrongCount,
    /// A change line that is not JSON.
    Malformed,
    /// A cursor before the one asked after.
    Backwards,
    /// An HTML error page with status 200 (a captive portal, a proxy).
    Html,
    /// The headers and one line, then nothing.
    Hang,
    /// A line stamped two hours after the page's `asOf`.
    FutureTimestamp,
    /// Lines of school 9: teacher 1 (held here) moved there, teacher 3
    /// (never held here) there too.
    OtherSchool,
}

struct Parent {
    mode: Mutex<Mode>,
    /// Requests after the first page.
    asked: AtomicUsize,
}

fn teacher(n: u128, school_n: u128, ts: Timestamp) -> Vec<u8> {
    record_line(&Record {
        data: Entity::Teacher(Teacher {
            teacher_id: id(n),
            school_id: school(school_n),
            full_name: format!("Giáo viên {n}"),
            employee_code: None,
            email: None,
            phone: None,
            subjects: vec!["Toán".into()],
            status: TeacherStatus::Active,
        }),
        key: OrderKey {
            version: Some(ts as u64),
            timestamp: ts,
            delete: false,
            event_id: Uuid::nil(),
        },
        last_synced_at: 0,
        source: SyncSource::Kafka,
    })
}

fn page(lines: &[Vec<u8>], seq: u64, count: usize) -> Vec<u8> {
    let mut out = lines.concat();
    out.extend(page_line(
        &Cursor::at(STORE, seq),
        count as u64,
        false,
        AS_OF,
    ));
    out
}

fn ndjson_response(body: Vec<u8>) -> Response {
    ([(header::CONTENT_TYPE, "application/x-ndjson")], body).into_response()
}

async fn changes(State(p): State<Arc<Parent>>, RawQuery(q): RawQuery) -> Response {
    let q = q.unwrap_or_default();
    let after = form_urlencoded::parse(q.as_bytes())
        .find(|(k, _)| k == "after")
        .map(|(_, v)| v.into_owned());
    let wait: u64 = form_urlencoded::parse(q.as_bytes())
        .find(|(k, _)| k == "wait")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    let first = Cursor::at(STORE, 1).to_string();
    let second = Cursor::at(STORE, 2).to_string();
    let teacher2 = teacher(2, 1, T0 + 2 * SEC);
    match after.as_deref() {
        None => return ndjson_response(page(&[teacher(1, 1, T0 + SEC)], 1, 1)),
        Some(a) if a == second => {
            tokio::time::sleep(Duration::from_secs(wait)).await;
            return ndjson_response(page(&[], 2, 0));
        }
        Some(a) if a == first => {}
        Some(other) => panic!("asked after {other}"),
    }
    p.asked.fetch_add(1, Ordering::SeqCst);
    let mode = *p.mode.lock().unwrap();
    match mode {
        Mode::Quiet => {
            tokio::time::sleep(Duration::from_secs(wait)).await;
            ndjson_response(page(&[], 1, 0))
        }
        Mode::Good => ndjson_response(page(&[teacher2], 2, 1)),
        Mode::CutShort => ndjson_response(teacher2),
        Mode::WrongCount => ndjson_response(page(&[teacher2], 2, 2)),
        Mode::Malformed => ndjson_response(page(
            &[teacher2, b"{\"kind\":\"teacher\",\"teacherId\":\n".to_vec()],
            2,
            2,
        )),
        Mode::Backwards => {
            let mut body = teacher2;
            body.extend(page_line(&Cursor::at(STORE, 0), 1, false, AS_OF));
            ndjson_response(body)
        }
        Mode::Html => (
            [(header::CONTENT_TYPE, "text/html")],
            "<html><body><h1>502 Bad Gateway</h1></body></html>\n",
        )
            .into_response(),
        Mode::Hang => {
            let first =
                futures::stream::iter([Ok::<_, std::io::Error>(bytes::Bytes::from(teacher2))]);
            (
                [(header::CONTENT_TYPE, "application/x-ndjson")],
                Body::from_stream(futures::StreamExt::chain(first, futures::stream::pending())),
            )
                .into_response()
        }
        Mode::FutureTimestamp => ndjson_response(page(&[teacher(2, 1, AS_OF + 2 * HOUR)], 2, 1)),
        Mode::OtherSchool => ndjson_response(page(
            &[teacher(1, 9, T0 + 3 * SEC), teacher(3, 9, T0 + 3 * SEC)],
            2,
            2,
        )),
    }
}

/// A test parent on port 0 in `mode`, and a follower of its school 1
/// that has applied its first page (teacher 1).
async fn setup(mode: Mode) -> (Arc<Parent>, TestNode) {
    let parent = Arc::new(Parent {
        mode: Mutex::new(Mode::Quiet),
        asked: AtomicUsize::new(0),
    });
    let app = axum::Router::new()
        .route("/api/changes", get(changes))
        .with_state(parent.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let node = TestNode::start(|c| {
        follow(c, url, &[1], 1);
        c.upstream.read_timeout_secs = 1;
    })
    .await;
    let first = Cursor::at(STORE, 1).to_string();
    wait_status(&node, "the first page", |v| {
        v["upstream"]["cursor"] == first.as_str()
    })
    .await;
    *parent.mode.lock().unwrap() = mode;
    (parent, node)
}

/// The parent answers badly in `mode`: the follower applies nothing of
/// it, says `reason` in status (`upstream.lastError`) and metrics, asks
/// again (backoff), keeps serving, and takes the good page afterwards.
async fn refused(mode: Mode, says: &str, reason: &str) {
    let (parent, node) = setup(mode).await;
    let asked = parent.asked.load(Ordering::SeqCst);
    let v = wait_status(&node, says, |v| {
        v["upstream"]["lastError"]
            .as_str()
            .is_some_and(|e| e.contains(says))
    })
    .await;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while parent.asked.load(Ordering::SeqCst) < asked + 2 {
        assert!(std::time::Instant::now() < deadline, "no retry");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Nothing of the page: neither its line nor its cursor.
    assert_eq!(node.get(&format!("/api/teachers/{}", id(2))).await.0, 404);
    let stored = node
        .node
        .state
        .store
        .read()
        .unwrap()
        .upstream_cursor()
        .unwrap();
    assert_eq!(stored, Some(Cursor::at(STORE, 1)), "{v:#}");
    assert_eq!(counter(&v, "feed_applied"), 1, "{v:#}");
    // Still serving what it has, still ready.
    assert_eq!(node.get(&format!("/api/teachers/{}", id(1))).await.0, 200);
    assert_eq!(node.get("/health/ready").await.0, 200);
    let (_, _, body) = node.get("/metrics").await;
    let text = String::from_utf8(body).unwrap();
    let line = format!("emis_edge_upstream_errors_total{{reason=\"{reason}\"}} ");
    assert!(
        text.lines()
            .any(|l| l.starts_with(&line) && !l.ends_with(" 0")),
        "{line} in\n{text}"
    );
    let workers = v["workers"].as_array().unwrap();
    let upstream = workers.iter().find(|w| w["name"] == "upstream").unwrap();
    assert!(upstream["errors"].as_u64().unwrap() >= 1, "{v:#}");

    *parent.mode.lock().unwrap() = Mode::Good;
    wait_status(&node, "the good page", |v| {
        v["upstream"]["cursor"] == Cursor::at(STORE, 2).to_string().as_str()
            && v["upstream"]["lastError"].is_null()
    })
    .await;
    assert_eq!(node.get(&format!("/api/teachers/{}", id(2))).await.0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_cut_short_is_refused_whole() {
    refused(Mode::CutShort, "cut short", "truncated").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_whose_count_differs_is_refused_whole() {
    refused(
        Mode::WrongCount,
        "says 2 change lines, 1 were read",
        "count",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_with_malformed_json_is_refused_whole() {
    refused(Mode::Malformed, "line 2: not valid JSON", "malformed").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cursor_that_goes_backwards_is_refused() {
    refused(Mode::Backwards, "goes back", "cursor").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_html_answer_is_refused() {
    refused(Mode::Html, "Content-Type \"text/html\"", "content_type").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parent_that_hangs_mid_body_is_given_up_on() {
    refused(Mode::Hang, "sent nothing for 1s", "timeout").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_line_stamped_beyond_the_skew_of_the_pages_as_of_fails_the_page() {
    refused(
        Mode::FutureTimestamp,
        "(ingest.max_future_skew) after the page's asOf",
        "future_timestamp",
    )
    .await;
}

/// Transfer rule (contract §2): a line naming a school the follower does
/// not serve removes the entity it holds and stores nothing of one it
/// does not hold; the page is applied, not refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lines_of_another_school_only_remove_what_the_follower_holds() {
    let (_parent, node) = setup(Mode::OtherSchool).await;
    let v = wait_status(&node, "the page applied", |v| {
        v["upstream"]["cursor"] == Cursor::at(STORE, 2).to_string().as_str()
    })
    .await;
    assert!(v["upstream"]["lastError"].is_null(), "{v:#}");
    assert_eq!(counter(&v, "feed_transferred_out"), 1, "{v:#}");
    assert_eq!(counter(&v, "feed_skipped"), 1, "{v:#}");
    assert_eq!(node.get(&format!("/api/teachers/{}", id(1))).await.0, 404);
    assert_eq!(node.get(&format!("/api/teachers/{}", id(3))).await.0, 404);
    let r = node.node.state.store.read().unwrap();
    let live: Vec<_> = r
        .dump()
        .unwrap()
        .into_iter()
        .filter(|(_, _, e, _)| e.is_some())
        .collect();
    assert!(live.is_empty(), "nothing of school 9 stored: {live:?}");
    assert_eq!(v["entities"]["teachers"], 0);
}

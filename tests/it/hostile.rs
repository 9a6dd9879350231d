//! Hostile input (issue #6, parts 4 and 5): what clients and producers that
//! misbehave — by mistake or on purpose — get from the node, and that the
//! node keeps serving everyone else meanwhile. HTTP over raw TCP sockets to
//! a real listener; Kafka through librdkafka's mock cluster. No assertion
//! depends on how fast the machine is: time limits only stop a hung test.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use emis_edge::config::Config;
use emis_edge::domain::event::MAX_EVENT_BYTES;
use emis_edge::domain::EventType;
use emis_edge::store::DEAD_LETTER_MAX_RAW;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{BaseProducer, BaseRecord, DefaultProducerContext, Producer};
use rdkafka::ClientConfig;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::kafka::{counter, event, handled, wait_status};
use crate::support::*;

/// Generous: only there so that a broken node fails the test instead of
/// hanging it.
const PATIENCE: Duration = Duration::from_secs(30);

// ---- raw HTTP ----------------------------------------------------------------

/// What came back on a connection.
#[derive(Debug)]
struct Reply {
    /// `None`: the node closed (or reset) the connection without answering.
    status: Option<u16>,
    content_type: String,
    body: Vec<u8>,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&self.body)))
    }
}

/// Sends `request` as is and reads until the node closes the connection.
/// A reset counts as a close: the node may reset a connection whose
/// request it did not read to the end.
async fn raw(addr: SocketAddr, request: &[u8]) -> Reply {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let _ = stream.write_all(request).await;
    let mut got = Vec::new();
    let read = tokio::time::timeout(PATIENCE, async {
        let mut buf = [0u8; 16 * 1024];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    assert!(read.is_ok(), "the node neither answered nor closed");
    parse_reply(&got)
}

fn parse_reply(got: &[u8]) -> Reply {
    let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") else {
        return Reply {
            status: None,
            content_type: String::new(),
            body: Vec::new(),
        };
    };
    let head = String::from_utf8_lossy(&got[..end]).into_owned();
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("a status line");
    let content_type = header(&head, "content-type").unwrap_or_default();
    Reply {
        status: Some(status),
        content_type,
        body: got[end + 4..].to_vec(),
    }
}

fn header(head: &str, name: &str) -> Option<String> {
    head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case(name).then(|| v.trim().to_owned())
    })
}

fn get(target: &str) -> Vec<u8> {
    format!("GET {target} HTTP/1.1\r\nHost: edge\r\nConnection: close\r\n\r\n").into_bytes()
}

/// One request on a kept-alive connection; reads exactly its response.
async fn keep_alive_get(stream: &mut TcpStream, target: &str) -> u16 {
    keep_alive_fetch(stream, target).await.status.unwrap()
}

/// [`keep_alive_get`], with the whole answer.
async fn keep_alive_fetch(stream: &mut TcpStream, target: &str) -> Reply {
    let request = format!("GET {target} HTTP/1.1\r\nHost: edge\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    tokio::time::timeout(PATIENCE, async {
        loop {
            if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&got[..end]).into_owned();
                let length: usize = header(&head, "content-length")
                    .expect("a sized answer")
                    .parse()
                    .unwrap();
                if got.len() >= end + 4 + length {
                    return parse_reply(&got);
                }
            }
            let n = stream.read(&mut buf).await.unwrap();
            assert!(n > 0, "the node closed a kept-alive connection");
            got.extend_from_slice(&buf[..n]);
        }
    })
    .await
    .expect("no answer on the kept-alive connection")
}

/// Whether the node closes `stream` (EOF or reset) before `PATIENCE`,
/// reading and discarding whatever it sends.
async fn closed_by_node(stream: &mut TcpStream) -> bool {
    let mut buf = [0u8; 1024];
    tokio::time::timeout(PATIENCE, async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .is_ok()
}

const TEACHER: u128 = 1;

/// A node whose store holds one teacher with one class.
async fn node_with_a_teacher(configure: impl FnOnce(&mut Config)) -> TestNode {
    let node = TestNode::start(configure).await;
    let s = school(1);
    let ev = |t: EventType, n: u128, body: Value| {
        parse(t, &merge(envelope(t, id(9000 + n), T0, Some(1), s), body))
    };
    node.apply(vec![
        ev(
            EventType::TeacherCreated,
            1,
            teacher_fields(id(TEACHER), "Nguyễn Thị Hương"),
        ),
        ev(EventType::ClassCreated, 2, class_fields(id(11), "Lớp 10A1")),
        ev(
            EventType::AssignmentCreated,
            3,
            assignment_fields(id(21), id(TEACHER), id(11), "homeroom"),
        ),
    ]);
    node
}

fn teacher_path() -> String {
    format!("/api/teachers/{}", id(TEACHER))
}

fn assert_problem(reply: &Reply, status: u16, mentions: &str) -> Value {
    assert_eq!(reply.status, Some(status), "{reply:?}");
    assert_eq!(reply.content_type, "application/problem+json");
    let v = reply.json();
    assert_eq!(v["status"], status);
    let detail = v["detail"].as_str().unwrap();
    assert!(detail.contains(mentions), "{detail:?} lacks {mentions:?}");
    assert!(detail.len() < 300, "the problem echoes too much: {detail}");
    v
}

// ---- HTTP --------------------------------------------------------------------

#[tokio::test]
async fn oversized_and_malformed_request_targets_get_clean_client_errors() {
    let node = node_with_a_teacher(|_| {}).await;
    let addr = node.node.addr;

    // A path segment long enough to be absurd but within the URI limit:
    // 400 naming the parameter, without echoing all of it back.
    let long_id = "a".repeat(4000);
    let r = raw(addr, &get(&format!("/api/teachers/{long_id}"))).await;
    assert_problem(&r, 400, "teacherId");

    // Over MAX_URI_BYTES: 414, for a path and for a query string alike.
    let r = raw(addr, &get(&format!("/api/teachers/{}", "a".repeat(10_000)))).await;
    assert_problem(&r, 414, "at most 8192");
    let query = "x=1&".repeat(3000);
    let r = raw(
        addr,
        &get(&format!("/api/schools/{}/classes?{query}", school(1))),
    )
    .await;
    assert_problem(&r, 414, "at most 8192");
    // A long query of unknown parameters within the limit is ignored.
    let query = "x=1&".repeat(1500);
    let r = raw(
        addr,
        &get(&format!("/api/schools/{}/classes?{query}", school(1))),
    )
    .await;
    assert_eq!(r.status, Some(200), "{r:?}");

    // A request line over the header limit: hyper refuses it with 431
    // before any routing (or resets the connection it did not read whole).
    let r = raw(addr, &get(&format!("/api/teachers/{}", "a".repeat(40_000)))).await;
    assert!(matches!(r.status, Some(431) | None), "{r:?}");

    // Percent-encoded bytes that are not UTF-8: 400 naming the parameter.
    let r = raw(addr, &get("/api/teachers/%FF%FE%00")).await;
    assert_problem(&r, 400, "teacherId is not valid UTF-8");
    let r = raw(addr, &get("/api/schools/%C3%28/classes")).await;
    assert_problem(&r, 400, "schoolId is not valid UTF-8");
    let r = raw(addr, &get(&format!("/api/classes/%ED%A0%80{}", id(11)))).await;
    assert_problem(&r, 400, "classId is not valid UTF-8");
    // In the query string they decode to U+FFFD, which is no UUID or number.
    let r = raw(
        addr,
        &get(&format!("/api/schools/{}/teachers?after=%FF", school(1))),
    )
    .await;
    assert_problem(&r, 400, "after");
    let r = raw(addr, &get("/api/sync/dead-letters?limit=%FF%FF")).await;
    assert_problem(&r, 400, "limit");
    // Raw (not percent-encoded) bytes above 0x7F in the request line are
    // not a valid URI: 400.
    let mut request = b"GET /api/teachers/\xff\xfe HTTP/1.1\r\nHost: edge\r\n".to_vec();
    request.extend_from_slice(b"Connection: close\r\n\r\n");
    let r = raw(addr, &request).await;
    assert_eq!(r.status, Some(400), "{r:?}");

    // The node still answers, and a well-formed request still works.
    let r = raw(addr, &get(&teacher_path())).await;
    assert_eq!(r.status, Some(200));
    assert_eq!(r.json()["fullName"], "Nguyễn Thị Hương");
    node.node.stop().await.unwrap();
}

#[tokio::test]
async fn huge_or_too_many_headers_are_refused_with_431() {
    let node = node_with_a_teacher(|_| {}).await;
    let addr = node.node.addr;
    let path = teacher_path();

    let huge = format!(
        "GET {path} HTTP/1.1\r\nHost: edge\r\nX-Huge: {}\r\nConnection: close\r\n\r\n",
        "a".repeat(64 * 1024)
    );
    let r = raw(addr, huge.as_bytes()).await;
    assert!(matches!(r.status, Some(431) | None), "{r:?}");

    // A bearer token of 40 KiB: refused before the token check reads it.
    let token = format!(
        "GET {path} HTTP/1.1\r\nHost: edge\r\nAuthorization: Bearer {}\r\nConnection: close\r\n\r\n",
        "t".repeat(40 * 1024)
    );
    let r = raw(addr, token.as_bytes()).await;
    assert!(matches!(r.status, Some(431) | None), "{r:?}");

    let mut many = format!("GET {path} HTTP/1.1\r\nHost: edge\r\n");
    for n in 0..200 {
        many.push_str(&format!("X-H{n}: v\r\n"));
    }
    many.push_str("Connection: close\r\n\r\n");
    let r = raw(addr, many.as_bytes()).await;
    assert_eq!(r.status, Some(431), "{r:?}");

    // Within the limits, the same request is answered.
    let fine = format!(
        "GET {path} HTTP/1.1\r\nHost: edge\r\nX-Big: {}\r\nConnection: close\r\n\r\n",
        "a".repeat(8 * 1024)
    );
    assert_eq!(raw(addr, fine.as_bytes()).await.status, Some(200));
    node.node.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_clients_are_cut_off_while_others_are_served() {
    let node = node_with_a_teacher(|c| c.http.header_read_timeout_secs = 2).await;
    let addr = node.node.addr;
    let path = teacher_path();

    // Ten clients that send their request head one byte a second, and two
    // that connect and send nothing at all.
    let mut slow = Vec::new();
    for n in 0..12 {
        let head = format!(
            "GET {path} HTTP/1.1\r\nHost: edge\r\nX-Slow: {}",
            "z".repeat(1000)
        );
        slow.push(tokio::spawn(async move {
            let mut stream = TcpStream::connect(addr).await.unwrap();
            let opened = Instant::now();
            let silent = n >= 10;
            let mut bytes = head.into_bytes().into_iter();
            let closed = tokio::time::timeout(PATIENCE, async {
                let mut buf = [0u8; 256];
                loop {
                    tokio::select! {
                        r = stream.read(&mut buf) => match r {
                            Ok(0) | Err(_) => return true,
                            Ok(_) => return false, // an answer: not expected
                        },
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {
                            if !silent {
                                let b = bytes.next().unwrap();
                                if stream.write_all(&[b]).await.is_err() {
                                    return true;
                                }
                            }
                        }
                    }
                }
            })
            .await;
            (closed, opened.elapsed())
        }));
    }
    // Meanwhile, everyone else is served.
    for _ in 0..10 {
        let r = raw(addr, &get(&path)).await;
        assert_eq!(r.status, Some(200));
        assert_eq!(r.json()["classAssignments"][0]["className"], "Lớp 10A1");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for task in slow {
        let (closed, open_for) = task.await.unwrap();
        assert_eq!(
            closed,
            Ok(true),
            "a slow client was answered or never cut off"
        );
        assert!(
            open_for >= Duration::from_secs(1),
            "cut off before the header read timeout: {open_for:?}"
        );
    }
    let r = raw(addr, &get(&path)).await;
    assert_eq!(r.status, Some(200));
    node.node.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn beyond_the_connection_limit_clients_wait_and_existing_ones_are_served() {
    let node = node_with_a_teacher(|c| {
        c.http.max_connections = 4;
        // Long enough that nothing is cut off by time during the test.
        c.http.header_read_timeout_secs = 120;
    })
    .await;
    let addr = node.node.addr;
    let path = teacher_path();

    // A kept-alive client, served before the limit is reached.
    let mut kept = TcpStream::connect(addr).await.unwrap();
    assert_eq!(keep_alive_get(&mut kept, &path).await, 200);
    // Three clients that connect and send nothing: the limit is reached.
    let mut idle = Vec::new();
    for _ in 0..3 {
        idle.push(TcpStream::connect(addr).await.unwrap());
    }
    // A fifth client connects (the kernel queues it) and sends its request.
    let (sent, request_sent) = tokio::sync::oneshot::channel();
    let waiting = tokio::spawn(async move {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream.write_all(&get(&teacher_path())).await.unwrap();
        sent.send(()).unwrap();
        let mut got = Vec::new();
        let _ = stream.read_to_end(&mut got).await;
        parse_reply(&got)
    });
    request_sent.await.unwrap();
    // The kept-alive client goes on being served, health checks included:
    // six round trips after the fifth client's request is in, which a node
    // without the limit would have answered long before they end. The
    // requests the node answered are counted per route: the kept-alive
    // client's alone.
    for _ in 0..5 {
        assert_eq!(keep_alive_get(&mut kept, &path).await, 200);
    }
    assert_eq!(keep_alive_get(&mut kept, "/health/live").await, 200);
    assert!(!waiting.is_finished(), "served beyond http.max_connections");
    let metrics = keep_alive_fetch(&mut kept, "/metrics").await;
    let text = String::from_utf8_lossy(&metrics.body).into_owned();
    let served = text.lines().find(|l| {
        l.starts_with(
            "emis_edge_http_request_duration_seconds_count{route=\"/api/teachers/{teacherId}\"",
        )
    });
    assert_eq!(
        served.and_then(|l| l.rsplit(' ').next()),
        Some("6"),
        "only the kept-alive client's requests were answered: {served:?}"
    );
    // One connection closes: the waiting client gets its slot and answer.
    drop(idle.pop());
    let r = tokio::time::timeout(PATIENCE, waiting)
        .await
        .expect("the waiting client was never served")
        .unwrap();
    assert_eq!(r.status, Some(200));
    assert_eq!(keep_alive_get(&mut kept, &path).await, 200);
    drop(idle);
    node.node.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopping_does_not_wait_for_clients_still_sending_their_request_head() {
    let node = node_with_a_teacher(|c| c.http.header_read_timeout_secs = 600).await;
    let addr = node.node.addr;
    let mut half = TcpStream::connect(addr).await.unwrap();
    half.write_all(b"GET /api/teachers/").await.unwrap();
    let mut kept = TcpStream::connect(addr).await.unwrap();
    assert_eq!(keep_alive_get(&mut kept, &teacher_path()).await, 200);
    // Within SHUTDOWN_DEADLINE, or stop() reports an error.
    node.node.stop().await.unwrap();
    assert!(closed_by_node(&mut half).await);
    assert!(closed_by_node(&mut kept).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_client_that_stops_reading_is_cut_off_and_others_are_served() {
    let node = node_with_a_teacher(|c| c.http.request_timeout_secs = 1).await;
    // About 9 MB of snapshot: more than the socket buffers and the node's
    // chunk queue hold between them.
    let t = EventType::ClassCreated;
    let name = "L".repeat(150);
    let changes = (0..20_000u128)
        .map(|n| {
            parse(
                t,
                &merge(
                    envelope(t, id(20_000 + n), T0, Some(1), school(1)),
                    class_fields(id(100_000 + n), &name),
                ),
            )
        })
        .collect();
    node.apply(changes);
    let path = format!("/api/schools/{}/snapshot", school(1));

    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut stalling = socket.connect(node.node.addr).await.unwrap();
    stalling.write_all(&get(&path)).await.unwrap();
    let mut first = [0u8; 1024];
    let n = stalling.read(&mut first).await.unwrap();
    assert!(first[..n].starts_with(b"HTTP/1.1 200"));
    // The client stops reading, far longer than the 1 s the node allows;
    // others are served meanwhile.
    for _ in 0..10 {
        assert_eq!(
            raw(node.node.addr, &get(&teacher_path())).await.status,
            Some(200)
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // What it then reads is a download broken off before the `end` line.
    let mut rest = first[..n].to_vec();
    let mut clean_end = false;
    tokio::time::timeout(PATIENCE, async {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match stalling.read(&mut buf).await {
                Ok(0) => break,
                Err(_) => return,
                Ok(n) => rest.extend_from_slice(&buf[..n]),
            }
        }
        clean_end = rest.ends_with(b"\r\n0\r\n\r\n");
    })
    .await
    .expect("the node neither sent the rest nor closed");
    assert!(!clean_end, "the chunked body was closed as if complete");
    let text = String::from_utf8_lossy(&rest);
    assert!(
        !text.contains(r#""kind":"end""#),
        "the whole snapshot was sent"
    );
    // A client that reads gets all of it.
    let (status, _, body) = node.get(&path).await;
    assert_eq!(status, 200);
    let last = body
        .trim_ascii_end()
        .rsplit(|b| *b == b'\n')
        .next()
        .unwrap();
    let end: Value = serde_json::from_slice(last).unwrap();
    assert_eq!(
        (end["kind"].as_str(), end["count"].as_u64()),
        (Some("end"), Some(20_003))
    );
    node.node.stop().await.unwrap();
}

#[test]
fn connection_limits_are_validated_and_name_the_key() {
    for (key, value) in [
        ("EMIS_EDGE__HTTP__MAX_CONNECTIONS", "0"),
        ("EMIS_EDGE__HTTP__MAX_CONNECTIONS", "100001"),
        ("EMIS_EDGE__HTTP__HEADER_READ_TIMEOUT_SECS", "0"),
        ("EMIS_EDGE__HTTP__HEADER_READ_TIMEOUT_SECS", "3601"),
    ] {
        let err = Config::load(None, vec![(key.to_owned(), value.to_owned())]).unwrap_err();
        let want = key
            .trim_start_matches("EMIS_EDGE__")
            .to_ascii_lowercase()
            .replace("__", ".");
        assert_eq!(err.key, want, "{err}");
    }
    let example = Config::load(
        Some(std::path::Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/config/edge.example.toml"
        ))),
        Vec::new(),
    )
    .unwrap();
    let defaults = Config::default();
    assert_eq!(example.http.max_connections, 1024);
    assert_eq!(example.http.header_read_timeout_secs, 10);
    assert_eq!(
        (
            defaults.http.max_connections,
            defaults.http.header_read_timeout_secs
        ),
        (1024, 10)
    );
}

// ---- Kafka -------------------------------------------------------------------

/// A one-broker mock cluster with every default topic (`emis.class.created`
/// with `partitions` partitions, the others with one) and a producer allowed
/// to send values well over the node's 1 MiB cap.
///
/// The mock keeps at most 5 MiB per partition and silently drops the
/// oldest messages beyond that (like retention), so the tests spread large
/// values over partitions.
struct Broker {
    cluster: MockCluster<'static, DefaultProducerContext>,
    producer: BaseProducer,
}

const TOPIC: &str = "emis.class.created";

impl Broker {
    fn start(partitions: i32) -> Broker {
        let cluster = MockCluster::new(1).unwrap();
        for t in EventType::ALL {
            let n = if t.name() == TOPIC { partitions } else { 1 };
            cluster.create_topic(t.name(), n, 1).unwrap();
        }
        let producer = ClientConfig::new()
            .set("bootstrap.servers", cluster.bootstrap_servers())
            .set("linger.ms", "0")
            .set("message.max.bytes", "8000000")
            .create()
            .unwrap();
        Broker { cluster, producer }
    }

    fn configure(&self, c: &mut Config) {
        c.kafka.brokers = self.cluster.bootstrap_servers();
        c.kafka.batch_max_wait_ms = 5;
    }

    /// Produces each value (`None`: a null value, a tombstone) to its
    /// partition of [`TOPIC`], in order.
    fn send(&self, values: &[(i32, Option<Vec<u8>>)]) {
        for (partition, v) in values {
            let mut record = BaseRecord::<(), [u8]>::to(TOPIC).partition(*partition);
            if let Some(v) = v {
                record = record.payload(v);
            }
            self.producer.send(record).map_err(|(e, _)| e).unwrap();
            self.producer.poll(Duration::ZERO);
        }
        self.producer.flush(Duration::from_secs(60)).unwrap();
    }
}

/// A valid `emis.class.created` event for class `n`.
fn good_class(n: u128) -> Value {
    event(
        EventType::ClassCreated,
        n,
        1,
        Some(1),
        1,
        class_fields(id(100 + n), "Lớp 10A1"),
    )
}

/// `good_class(n)` padded with an unknown field to exactly `len` bytes.
fn padded_class(n: u128, len: usize) -> Vec<u8> {
    let mut v = good_class(n);
    v["padding"] = json!("");
    let base = v.to_string().len();
    v["padding"] = json!("p".repeat(len - base));
    let bytes = v.to_string().into_bytes();
    assert_eq!(bytes.len(), len);
    bytes
}

/// `good_class(n)` whose `grade` is an array of `len` zeros.
fn long_array(n: u128, len: usize) -> Vec<u8> {
    let mut v = good_class(n);
    v["grade"] = json!(vec![0u8; len]);
    v.to_string().into_bytes()
}

/// The next offset stored for `partition` of [`TOPIC`].
fn offset(status: &Value, partition: i32) -> Value {
    status["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["topic"] == TOPIC && p["partition"] == partition)
        .map_or(Value::Null, |p| p["offset"].clone())
}

/// The resident and peak resident memory of a process, in KiB.
fn memory_kib(pid: &str) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("{name} not in /proc/{pid}/status"))
    };
    (field("VmRSS:"), field("VmHWM:"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_values_are_dead_lettered_with_a_reason_and_never_read_twice() {
    let broker = Broker::start(2);
    let node = TestNode::start(|c| broker.configure(c)).await;

    let good = good_class(0).to_string();
    assert!(good.contains(&format!("\"eventId\":\"{}\"", id(50_000))));
    let duplicate = format!("{{\"eventId\":\"{}\",{}", id(50_999), &good[1..]);
    let nested = format!(
        r#"{{"eventId":"{}","deep":{}0{}}}"#,
        id(50_000),
        "[".repeat(100_000),
        "]".repeat(100_000)
    );
    let mut bad_utf8 = good.clone().into_bytes();
    let at = bad_utf8.windows(3).position(|w| w == b"L\xe1\xbb").unwrap();
    bad_utf8[at + 1] = 0xff; // "Lớp" becomes "L\xff\xbb\x9bp"
    let mut wrong_type = good_class(0);
    wrong_type["className"] = json!(42);
    // As long an array as fits under the cap (a digit and a comma per
    // element), in a field that wants a string; and one of a million
    // elements, which cannot fit.
    let half_million = long_array(0, 500_000);
    assert!(half_million.len() <= MAX_EVENT_BYTES);

    // (partition, value, the start of its dead-letter reason or None:
    // applied). Good events around the bad ones on each partition.
    type Case = (i32, Option<Vec<u8>>, Option<&'static str>);
    let cases: Vec<Case> = vec![
        (0, Some(good_class(1).to_string().into_bytes()), None),
        (0, Some(padded_class(2, MAX_EVENT_BYTES)), None),
        (
            0,
            Some(padded_class(3, MAX_EVENT_BYTES + 1)),
            Some("payload of 1048577 bytes exceeds the limit of 1048576 bytes"),
        ),
        (
            0,
            Some(nested.into_bytes()),
            Some("not valid JSON: recursion limit exceeded"),
        ),
        (
            0,
            Some(duplicate.into_bytes()),
            Some("field `eventId` appears more than once"),
        ),
        (0, Some(bad_utf8), Some("not valid JSON: invalid unicode")),
        (
            0,
            Some(vec![0u8; 4096]),
            Some("not valid JSON: expected value at line 1 column 1"),
        ),
        (
            0,
            Some(Vec::new()),
            Some("empty value (expected a JSON object)"),
        ),
        (0, None, Some("null value (a Kafka tombstone")),
        (
            0,
            Some(wrong_type.to_string().into_bytes()),
            Some("field `className`: expected a string, got a number"),
        ),
        (0, Some(good_class(4).to_string().into_bytes()), None),
        (1, Some(good_class(5).to_string().into_bytes()), None),
        (
            1,
            Some(half_million),
            Some("field `grade`: expected a string, got an array"),
        ),
        (1, Some(long_array(0, 1_000_000)), Some("payload of 2000")),
        (1, Some(good_class(6).to_string().into_bytes()), None),
    ];
    let values: Vec<_> = cases.iter().map(|(p, v, _)| (*p, v.clone())).collect();
    broker.send(&values);
    let total = cases.len() as u64;
    let bad = cases.iter().filter(|(_, _, r)| r.is_some()).count() as u64;
    let on = |p: i32| cases.iter().filter(|c| c.0 == p).count();

    let v = wait_status(&node, "every hostile value handled", |v| {
        handled(v) == total
    })
    .await;
    assert_eq!(counter(&v, "events_applied"), total - bad, "{v:#}");
    assert_eq!(counter(&v, "events_dead_lettered"), bad, "{v:#}");
    assert_eq!(v["deadLetterCount"], bad);
    for p in [0, 1] {
        assert_eq!(
            offset(&v, p),
            on(p),
            "partition {p}: the offset moved past all"
        );
    }
    for n in [1, 2, 4, 5, 6] {
        let (status, class) = node
            .get_json(&format!("/api/classes/{}", id(100 + n)))
            .await;
        assert_eq!((status, &class["className"]), (200, &json!("Lớp 10A1")));
    }
    assert_eq!(node.get("/health/ready").await.0, 200);

    let (status, list) = node.get_json("/api/sync/dead-letters?limit=1000").await;
    assert_eq!(status, 200);
    assert_eq!(list["truncated"], false);
    let items = list["items"].as_array().unwrap();
    assert_eq!(items.len() as u64, bad);
    let mut offsets = [0u64; 2];
    for (partition, value, reason) in &cases {
        let offset = offsets[*partition as usize];
        offsets[*partition as usize] += 1;
        let Some(reason) = reason else { continue };
        let d = items
            .iter()
            .find(|d| d["partition"] == *partition && d["offset"] == offset)
            .unwrap_or_else(|| panic!("no dead letter for {partition}/{offset}"));
        assert_eq!(d["topic"], TOPIC);
        let got = d["reason"].as_str().unwrap();
        assert!(
            got.starts_with(reason),
            "{partition}/{offset}: {got:?} is not {reason:?}"
        );
        assert!(
            got.len() < 300,
            "{partition}/{offset}: reason too long: {got}"
        );
        let len = value.as_ref().map_or(0, Vec::len);
        assert_eq!(d["rawLength"], len, "{partition}/{offset}");
        assert_eq!(
            d["rawTruncated"],
            len > DEAD_LETTER_MAX_RAW,
            "{partition}/{offset}"
        );
        // Lossy UTF-8: at most 3 bytes of text per stored byte.
        assert!(d["raw"].as_str().unwrap().len() <= 3 * DEAD_LETTER_MAX_RAW);
    }

    // After a restart nothing is read again: a new event on each partition
    // comes after every old one, and only those two are counted.
    let node = node.restart().await;
    broker.send(&[
        (0, Some(good_class(7).to_string().into_bytes())),
        (1, Some(good_class(8).to_string().into_bytes())),
    ]);
    let v = wait_status(&node, "the events after the restart", |v| {
        counter(v, "events_applied") == total - bad + 2
    })
    .await;
    assert_eq!(counter(&v, "events_dead_lettered"), bad, "{v:#}");
    assert_eq!(
        counter(&v, "events_stale"),
        0,
        "re-read after restart: {v:#}"
    );
    assert_eq!(handled(&v), total + 2, "{v:#}");
    assert_eq!(node.get("/health/ready").await.0, 200);
    node.node.stop().await.unwrap();
}

/// The node as its own process (so that its memory is its own), consuming
/// a flood of large bad values.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_large_bad_values_keeps_batches_and_memory_bounded() {
    const PARTITIONS: i32 = 32;
    let broker = Broker::start(PARTITIONS);
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("edge.toml");
    let child = serve_on_a_free_port(
        |port| {
            std::fs::write(
                &config,
                format!(
                    "[node]\nid = \"flood\"\ndata_dir = {:?}\n[http]\nlisten = \"127.0.0.1:{port}\"\n\
                     [schools]\nall = true\n[kafka]\nbrokers = {:?}\nbatch_max_messages = 100000\n\
                     batch_max_wait_ms = 1000\n",
                    dir.path().join("data"),
                    broker.cluster.bootstrap_servers(),
                ),
            )
            .unwrap();
            let mut serve = std::process::Command::new(env!("CARGO_BIN_EXE_emis-edge"));
            serve
                .args(["serve", "--config", config.to_str().unwrap()])
                .env("RUST_LOG", "error")
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null());
            serve
        },
        "flood",
    );
    let (pid, port) = (child.child.id().to_string(), child.port);
    let http = reqwest::Client::new();
    let base = format!("http://127.0.0.1:{port}");
    let status = || async {
        let r = http
            .get(format!("{base}/api/sync/status"))
            .send()
            .await
            .ok()?;
        r.json::<Value>().await.ok()
    };
    let (before, _) = memory_kib(&pid);

    // 600 values just over what a dead letter keeps (not JSON), and eight
    // of each expensive kind: over the cap, nested half a million deep, an
    // array of 500,000 elements.
    let mut values: Vec<Option<Vec<u8>>> = (0..600)
        .map(|_| Some(vec![b'x'; DEAD_LETTER_MAX_RAW + 1]))
        .collect();
    for n in 0..8u128 {
        values.push(Some(padded_class(200 + n, MAX_EVENT_BYTES + 1)));
        let depth = MAX_EVENT_BYTES / 2 - 8;
        values.push(Some(
            format!(r#"{{"a":{}{}}}"#, "[".repeat(depth), "]".repeat(depth)).into_bytes(),
        ));
        values.push(Some(long_array(300 + n, 500_000)));
    }
    let total = values.len() as u64;
    let spread: Vec<_> = values
        .into_iter()
        .enumerate()
        .map(|(n, v)| (n as i32 % PARTITIONS, v))
        .collect();
    broker.send(&spread);
    drop(spread);

    let deadline = Instant::now() + Duration::from_secs(120);
    let v = loop {
        if let Some(v) = status().await {
            if handled(&v) == total {
                break v;
            }
        }
        assert!(Instant::now() < deadline, "not every value was handled");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(counter(&v, "events_dead_lettered"), total, "{v:#}");
    let (_, peak) = memory_kib(&pid);

    // Batches close at the dead-letter budget: at most 256 letters of
    // 64 KiB (16 MiB) each, so no batch is over the 256 bucket.
    let metrics = http
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let batches = metric(&metrics, "emis_edge_batch_size_messages_count");
    assert!(batches >= 3.0, "{batches} batches for {total} messages");
    assert_eq!(
        metric(
            &metrics,
            "emis_edge_batch_size_messages_bucket{le=\"256.0\"}"
        ),
        batches,
        "a batch held more than 256 messages"
    );
    // The list of dead letters stops at its byte budget.
    let list: Value = http
        .get(format!("{base}/api/sync/dead-letters?limit=1000"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(list["truncated"], true);
    let listed = list["items"].as_array().unwrap().len();
    assert!((1..=64).contains(&listed), "{listed} items listed");

    // ~63 MB of hostile input: librdkafka may queue up to 64 MiB of it, one
    // batch holds up to 16 MiB of dead letters, parsing one value costs a
    // few tens of MiB at most. Peak memory grows by far less than 256 MiB.
    let grown_mib = peak.saturating_sub(before) / 1024;
    eprintln!("node memory: {before} KiB before, peak {peak} KiB ({grown_mib} MiB more)");
    assert!(grown_mib < 256, "peak memory grew by {grown_mib} MiB");

    // And the stream goes on.
    broker.send(&[(0, Some(good_class(7).to_string().into_bytes()))]);
    let deadline = Instant::now() + PATIENCE;
    while status()
        .await
        .is_none_or(|v| counter(&v, "events_applied") != 1)
    {
        assert!(
            Instant::now() < deadline,
            "the event after the flood was not applied"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(child);
}

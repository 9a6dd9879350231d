//! Shared test helpers: event payloads as the central services send them,
//! a node on port 0 with a controllable clock, and an HTTP client.

#![allow(dead_code)]

use std::sync::Arc;

use emis_edge::clock::ManualClock;
use emis_edge::config::Config;
use emis_edge::domain::{Change, Event, EventType, OrderKey};
use emis_edge::node::{self, RunningNode};
use emis_edge::store::{Batch, PartitionOffset};
use serde_json::{json, Value};
use uuid::Uuid;

/// 2025-10-26T10:00:00Z, the contract example's time, in nanoseconds.
pub const T0: i64 = 1_761_472_800_000_000_000;
pub const SEC: i64 = 1_000_000_000;

pub fn id(n: u128) -> Uuid {
    Uuid::from_u128(0x0e15_0000_0000_4000_8000_0000_0000_0000 | n)
}

pub fn school(n: u128) -> Uuid {
    Uuid::from_u128(0x5c00_0000_0000_4000_8000_0000_0000_0000 | n)
}

pub fn rfc3339(t: i64) -> String {
    emis_edge::domain::format_timestamp(t)
}

/// The common fields of an event.
pub fn envelope(
    t: EventType,
    event_id: Uuid,
    ts: i64,
    version: Option<u64>,
    school: Uuid,
) -> Value {
    let mut v = json!({
        "eventId": event_id,
        "eventType": t.name(),
        "timestamp": rfc3339(ts),
        "schoolId": school,
    });
    if let Some(version) = version {
        v["version"] = json!(version);
    }
    v
}

pub fn merge(mut a: Value, b: Value) -> Value {
    for (k, v) in b.as_object().unwrap() {
        a[k] = v.clone();
    }
    a
}

pub fn class_fields(class: Uuid, name: &str) -> Value {
    json!({"classId": class, "className": name, "grade": "Khối 10",
           "academicYear": "2024-2025", "totalStudents": 45})
}

pub fn teacher_fields(teacher: Uuid, name: &str) -> Value {
    json!({"teacherId": teacher, "fullName": name, "employeeCode": "GV-001",
           "subjects": ["Toán", "Vật lý"], "status": "active"})
}

pub fn assignment_fields(assignment: Uuid, teacher: Uuid, class: Uuid, role: &str) -> Value {
    json!({"assignmentId": assignment, "teacherId": teacher, "classId": class,
           "subject": "Toán", "role": role, "academicYear": "2024-2025"})
}

/// Parses a payload exactly as the ingest path does.
pub fn parse(t: EventType, payload: &Value) -> (OrderKey, Change) {
    let e = Event::parse(t, payload.to_string().as_bytes()).expect("valid test event");
    (e.key, e.change)
}

pub fn batch(changes: Vec<(OrderKey, Change)>) -> Batch {
    Batch {
        changes,
        ..Batch::default()
    }
}

pub fn offsets(topic: &str, partition: i32, next: i64) -> Vec<PartitionOffset> {
    vec![PartitionOffset {
        topic: topic.into(),
        partition,
        next_offset: next,
    }]
}

/// A node on 127.0.0.1:0 with its store in a temporary directory and a
/// manual clock set to `T0 + 1 h`.
pub struct TestNode {
    pub node: RunningNode,
    pub clock: Arc<ManualClock>,
    pub dir: tempfile::TempDir,
    pub http: reqwest::Client,
}

impl TestNode {
    pub async fn start(configure: impl FnOnce(&mut Config)) -> TestNode {
        Self::start_in(tempfile::tempdir().unwrap(), configure).await
    }

    /// Stops the node (as SIGTERM would) and starts a new one on the same
    /// store and configuration.
    pub async fn restart(self) -> TestNode {
        let config = (*self.node.state.config).clone();
        let now = self.clock.now_value();
        self.node.stop().await.unwrap();
        let node = node::start(config, self.clock.clone()).await.unwrap();
        self.clock.set(now);
        TestNode { node, ..self }
    }

    /// Starts a node whose store already holds `changes` (applied before
    /// the node's workers start, e.g. before a resync-when-empty).
    pub async fn start_seeded(
        changes: Vec<(OrderKey, Change)>,
        configure: impl FnOnce(&mut Config),
    ) -> TestNode {
        let dir = tempfile::tempdir().unwrap();
        let store = emis_edge::store::Store::open(
            &dir.path().join(emis_edge::config::STORE_FILE),
            &Default::default(),
        )
        .unwrap();
        store
            .apply_batch(
                &batch(changes),
                T0 + 3600 * SEC,
                emis_edge::domain::SyncSource::Kafka,
            )
            .unwrap();
        drop(store);
        Self::start_in(dir, configure).await
    }

    /// The node serves every school (`schools.all = true`) unless
    /// `configure` lists `schools.ids`: then it serves exactly those.
    pub async fn start_in(dir: tempfile::TempDir, configure: impl FnOnce(&mut Config)) -> TestNode {
        let mut config = Config::default();
        config.node.data_dir = dir.path().to_owned();
        config.http.listen = "127.0.0.1:0".parse().unwrap();
        config.schools.all = true;
        configure(&mut config);
        if !config.schools.ids.is_empty() {
            config.schools.all = false;
        }
        config.validate().unwrap();
        let clock = ManualClock::new(T0 + 3600 * SEC);
        let node = node::start(config, clock.clone()).await.unwrap();
        TestNode {
            node,
            clock,
            dir,
            http: reqwest::Client::new(),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.node.addr, path)
    }

    pub fn apply(&self, changes: Vec<(OrderKey, Change)>) {
        self.node
            .state
            .store
            .apply_batch(
                &batch(changes),
                self.clock.now_value(),
                emis_edge::domain::SyncSource::Kafka,
            )
            .unwrap();
    }

    /// GET → (status, content type, body bytes).
    pub async fn get(&self, path: &str) -> (u16, String, Vec<u8>) {
        let r = self.http.get(self.url(path)).send().await.unwrap();
        let status = r.status().as_u16();
        let ct = r
            .headers()
            .get("content-type")
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default();
        (status, ct, r.bytes().await.unwrap().to_vec())
    }

    /// GET with a bearer token → (status, JSON body).
    pub async fn get_json_with(&self, path: &str, token: &str) -> (u16, Value) {
        let r = self
            .http
            .get(self.url(path))
            .bearer_auth(token)
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.json().await.unwrap())
    }

    pub async fn get_json(&self, path: &str) -> (u16, Value) {
        let (status, _, body) = self.get(path).await;
        (status, serde_json::from_slice(&body).unwrap())
    }
}

pub trait NowValue {
    fn now_value(&self) -> i64;
}

impl NowValue for ManualClock {
    fn now_value(&self) -> i64 {
        emis_edge::clock::Clock::now(self)
    }
}

/// Removes every `lastSyncedAt` (the node's apply time) from a JSON value.
pub fn without_sync_times(mut v: Value) -> Value {
    fn strip(v: &mut Value) {
        match v {
            Value::Object(m) => {
                m.remove("lastSyncedAt");
                m.values_mut().for_each(strip);
            }
            Value::Array(a) => a.iter_mut().for_each(strip),
            _ => {}
        }
    }
    strip(&mut v);
    v
}

/// A loopback port bound and not listening for as long as this lives: a
/// client's connection is refused at once, and no other process (another
/// test's node, say) can take the port meanwhile, as it could a port only
/// probed free. For commands that must find no node at `http.listen`.
pub struct ReservedPort {
    _socket: tokio::net::TcpSocket,
    pub port: u16,
}

impl ReservedPort {
    pub fn new() -> ReservedPort {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let port = socket.local_addr().unwrap().port();
        ReservedPort {
            _socket: socket,
            port,
        }
    }

    /// `127.0.0.1:<port>`, for `http.listen`.
    pub fn listen(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

/// The `emis-edge` binary serving, on a loopback port it found free: the
/// child and its port.
pub struct Served {
    pub child: std::process::Child,
    pub port: u16,
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `emis-edge serve` (the command `serve` builds for a port) on a
/// free loopback port and waits until that port answers `GET
/// /api/sync/status` as node `node_id`. A port probed free can be taken by
/// another process before the node binds it; the node then exits at once
/// (`cannot listen on http.listen`), and another port is tried. The answer
/// must come from this node, not from whatever else listens there.
pub fn serve_on_a_free_port(serve: impl Fn(u16) -> std::process::Command, node_id: &str) -> Served {
    use std::time::{Duration, Instant};
    let mut exits = Vec::new();
    for _ in 0..5 {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut served = Served {
            child: serve(port).spawn().unwrap(),
            port,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = served.child.try_wait().unwrap() {
                exits.push(format!("port {port}: exited with {status}"));
                break;
            }
            if status_of(port).is_some_and(|doc| doc.contains(&format!("\"nodeId\":\"{node_id}\"")))
            {
                return served;
            }
            assert!(
                Instant::now() < deadline,
                "emis-edge did not answer on port {port} within 60 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    panic!("emis-edge serve did not start: {exits:?}");
}

/// The body of `GET /api/sync/status` on a loopback port, if a server
/// answers there (a blocking, minimal HTTP/1.1 client).
pub fn status_of(port: u16) -> Option<String> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .ok()?;
    stream
        .write_all(b"GET /api/sync/status HTTP/1.1\r\nHost: edge\r\nConnection: close\r\n\r\n")
        .ok()?;
    let mut got = Vec::new();
    stream.read_to_end(&mut got).ok()?;
    let text = String::from_utf8_lossy(&got);
    let (head, body) = text.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.1 200").then(|| body.to_owned())
}

/// A tool a test needs is missing: the test fails, with how to install the
/// tool, unless the developer opted out with `<skip_var>=1` (never in CI,
/// `CI` set), when it says it skipped and the caller returns. A test that
/// passes without checking anything proves nothing.
#[track_caller]
pub fn missing_tool(tool: &str, skip_var: &str, install: &str) {
    let opted_out = std::env::var(skip_var).is_ok_and(|v| v == "1");
    let ci = std::env::var_os("CI").is_some();
    assert!(
        opted_out && !ci,
        "{tool} is needed for this test: {install}. On a developer's machine \
         {skip_var}=1 skips it; in CI (CI set) nothing is skipped"
    );
    eprintln!("SKIPPED: {tool} is missing and {skip_var}=1");
}

/// A change of entity `n` of `t`'s kind at `T0 + ts` s with version `ts`,
/// in `school_n`, as the ingest path parses it; `n` and `ts` make the
/// event id. Upserts carry a name that says when they were made.
pub fn change(t: EventType, n: u128, ts: i64, school_n: u128) -> (OrderKey, Change) {
    use emis_edge::domain::EntityKind;
    let entity = id(n);
    let body = match (t.kind(), t.is_delete()) {
        (kind, true) => json!({ kind.id_field(): entity }),
        (EntityKind::Class, false) => class_fields(entity, &format!("Lớp {n}-{ts}")),
        (EntityKind::Teacher, false) => teacher_fields(entity, &format!("Giáo viên {n}-{ts}")),
        (EntityKind::Assignment, false) => assignment_fields(entity, id(900), id(901), "subject"),
    };
    parse(
        t,
        &merge(
            envelope(
                t,
                id(20_000 + n * 1000 + ts as u128),
                T0 + ts * SEC,
                Some(ts as u64),
                school(school_n),
            ),
            body,
        ),
    )
}

/// The lines of an NDJSON body, each parsed as JSON.
pub fn ndjson(body: &[u8]) -> Vec<Value> {
    body.split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .map(|l| serde_json::from_slice(l).unwrap())
        .collect()
}

/// gunzip.
pub fn gunzip(bytes: &[u8]) -> Vec<u8> {
    use std::io::Read;
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(bytes)
        .read_to_end(&mut out)
        .unwrap();
    out
}

/// The value of an unlabelled metric in a `/metrics` text.
pub fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find(|l| l.split(' ').next() == Some(name))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{name} not in\n{text}"))
}

/// The node's `/metrics` text.
pub async fn metrics(node: &TestNode) -> String {
    let (status, _, body) = node.get("/metrics").await;
    assert_eq!(status, 200);
    String::from_utf8(body).unwrap()
}

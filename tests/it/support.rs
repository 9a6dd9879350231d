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
    /// `configure` says otherwise: a test that sets `schools.ids` also
    /// sets `schools.all = false`.
    pub async fn start_in(dir: tempfile::TempDir, configure: impl FnOnce(&mut Config)) -> TestNode {
        let mut config = Config::default();
        config.node.data_dir = dir.path().to_owned();
        config.http.listen = "127.0.0.1:0".parse().unwrap();
        config.schools.all = true;
        configure(&mut config);
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

/// A loopback port nothing listens on (yet).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

//! Ingestion over the Kafka protocol: librdkafka's in-process mock cluster
//! listens on loopback TCP, the node consumes from it like from a real
//! broker (contract §2).

use std::time::{Duration, Instant};

use emis_edge::config::Config;
use emis_edge::domain::EventType;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{BaseProducer, BaseRecord, DefaultProducerContext, Producer};
use rdkafka::ClientConfig;
use serde_json::{json, Value};

use crate::support::*;

pub struct Kafka {
    pub cluster: MockCluster<'static, DefaultProducerContext>,
    producer: BaseProducer,
}

impl Kafka {
    /// A one-broker cluster with every default topic, `partitions` each.
    pub fn start(partitions: i32) -> Kafka {
        let cluster = MockCluster::new(1).unwrap();
        for t in EventType::ALL {
            cluster.create_topic(t.name(), partitions, 1).unwrap();
        }
        let producer = ClientConfig::new()
            .set("bootstrap.servers", cluster.bootstrap_servers())
            .set("linger.ms", "0")
            .create()
            .unwrap();
        Kafka { cluster, producer }
    }

    pub fn configure(&self, c: &mut Config) {
        c.kafka.brokers = self.cluster.bootstrap_servers();
        c.kafka.batch_max_wait_ms = 5;
    }

    /// Produces raw payloads to one partition of a topic and waits for acks.
    pub fn send_raw(&self, topic: &str, partition: i32, payloads: &[Vec<u8>]) {
        for p in payloads {
            self.producer
                .send(
                    BaseRecord::<(), [u8]>::to(topic)
                        .partition(partition)
                        .payload(p),
                )
                .map_err(|(e, _)| e)
                .unwrap();
        }
        self.producer.flush(Duration::from_secs(10)).unwrap();
    }

    /// Produces events to partition 0 of their topic, each record stamped
    /// `record_ms` (ms since the epoch) as its producer's clock would.
    pub fn send_stamped(&self, t: EventType, events: &[Value], record_ms: i64) {
        for e in events {
            let payload = e.to_string();
            self.producer
                .send(
                    BaseRecord::<(), str>::to(t.name())
                        .partition(0)
                        .payload(&payload)
                        .timestamp(record_ms),
                )
                .map_err(|(e, _)| e)
                .unwrap();
        }
        self.producer.flush(Duration::from_secs(10)).unwrap();
    }

    /// The earliest and the next offset of a partition, as the broker
    /// reports them now.
    pub fn watermarks(&self, topic: &str, partition: i32) -> (i64, i64) {
        let consumer: rdkafka::consumer::BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", self.cluster.bootstrap_servers())
            .create()
            .unwrap();
        rdkafka::consumer::Consumer::fetch_watermarks(
            &consumer,
            topic,
            partition,
            Duration::from_secs(10),
        )
        .unwrap()
    }

    pub fn send(&self, t: EventType, events: &[Value]) {
        let raw: Vec<Vec<u8>> = events.iter().map(|e| e.to_string().into_bytes()).collect();
        self.send_raw(t.name(), 0, &raw);
    }
}

pub fn event(
    t: EventType,
    n: u128,
    ts: i64,
    version: Option<u64>,
    school_n: u128,
    body: Value,
) -> Value {
    merge(
        envelope(t, id(50_000 + n), T0 + ts * SEC, version, school(school_n)),
        body,
    )
}

/// Polls the status until `done` holds, or fails after 30 s.
pub async fn wait_status(node: &TestNode, what: &str, done: impl Fn(&Value) -> bool) -> Value {
    wait_status_within(node, what, Duration::from_secs(30), done).await
}

/// Polls the status until `done` holds, or fails after `limit`.
pub async fn wait_status_within(
    node: &TestNode,
    what: &str,
    limit: Duration,
    done: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + limit;
    loop {
        let (_, v) = node.get_json("/api/sync/status").await;
        if done(&v) {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}; status: {v:#}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub fn counter(v: &Value, name: &str) -> u64 {
    v["counters"][name].as_u64().unwrap_or(0)
}

pub fn handled(v: &Value) -> u64 {
    [
        "events_applied",
        "events_stale",
        "events_skipped",
        "events_transferred_out",
        "events_dead_lettered",
    ]
    .iter()
    .map(|n| counter(v, n))
    .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn produced_events_reach_the_api_and_order_duplicates_and_schools_are_handled() {
    let kafka = Kafka::start(1);
    let node = TestNode::start(|c| {
        kafka.configure(c);
        c.schools.all = false;
        c.schools.ids = vec![school(1)];
    })
    .await;
    use EventType::*;
    // An update that arrives before its create (different topics).
    kafka.send(
        ClassUpdated,
        &[event(
            ClassUpdated,
            1,
            2,
            Some(2),
            1,
            class_fields(id(11), "Lớp 10A1"),
        )],
    );
    kafka.send(
        ClassCreated,
        &[event(
            ClassCreated,
            2,
            1,
            Some(1),
            1,
            class_fields(id(11), "Lớp cũ"),
        )],
    );
    // A delete followed by a late, older update.
    kafka.send(
        ClassCreated,
        &[event(
            ClassCreated,
            3,
            1,
            None,
            1,
            class_fields(id(12), "Lớp 10A2"),
        )],
    );
    kafka.send(
        ClassDeleted,
        &[event(
            ClassDeleted,
            4,
            5,
            None,
            1,
            json!({"classId": id(12)}),
        )],
    );
    kafka.send(
        ClassUpdated,
        &[event(
            ClassUpdated,
            5,
            3,
            None,
            1,
            class_fields(id(12), "Lớp ma"),
        )],
    );
    // The same event three times.
    let teacher = event(
        TeacherCreated,
        6,
        1,
        Some(1),
        1,
        teacher_fields(id(1), "Nguyễn Thị Hương"),
    );
    kafka.send(TeacherCreated, &[teacher.clone(), teacher.clone(), teacher]);
    kafka.send(
        AssignmentCreated,
        &[event(
            AssignmentCreated,
            7,
            1,
            Some(1),
            1,
            assignment_fields(id(21), id(1), id(11), "homeroom"),
        )],
    );
    // Another school's events: skipped, counted.
    kafka.send(
        TeacherCreated,
        &[event(
            TeacherCreated,
            8,
            1,
            None,
            2,
            teacher_fields(id(2), "Trần Văn Nam"),
        )],
    );
    kafka.send(
        ClassCreated,
        &[event(
            ClassCreated,
            9,
            1,
            None,
            2,
            class_fields(id(13), "Lớp X"),
        )],
    );

    let v = wait_status(&node, "11 events handled", |v| handled(v) == 11).await;
    // Topics are consumed in no fixed order relative to each other, so how
    // many events were stale depends on arrival; the final state does not.
    assert_eq!(counter(&v, "events_skipped"), 2, "{v:#}");
    assert!(
        counter(&v, "events_stale") >= 3,
        "older create, late update, two duplicates: {v:#}"
    );
    let e = &v["entities"];
    assert_eq!(
        (e["classes"].as_u64(), e["teachers"].as_u64()),
        (Some(1), Some(1)),
        "{v:#}"
    );
    assert_eq!(
        (e["assignments"].as_u64(), e["tombstones"].as_u64()),
        (Some(1), Some(1)),
        "{v:#}"
    );

    let (status, detail) = node.get_json(&format!("/api/teachers/{}", id(1))).await;
    assert_eq!(status, 200);
    assert_eq!(detail["fullName"], "Nguyễn Thị Hương");
    assert_eq!(detail["classAssignments"][0]["className"], "Lớp 10A1");
    assert_eq!(
        node.get(&format!("/api/classes/{}", id(12))).await.0,
        404,
        "deleted class came back"
    );
    assert_eq!(
        node.get(&format!("/api/teachers/{}", id(2))).await.0,
        404,
        "other school replicated"
    );
    assert_eq!(node.get("/health/ready").await.0, 200);
    // Once the broker's statistics report every partition's end, the lag
    // is a number, and 0: the node has read everything.
    let v = wait_status(&node, "every high watermark at its offset", |v| {
        v["partitions"].as_array().unwrap().iter().all(|p| {
            p["highWatermark"].is_i64() && p["highWatermark"] == p["offset"].as_i64().unwrap_or(0)
        })
    })
    .await;
    let partitions = v["partitions"].as_array().unwrap();
    assert_eq!(partitions.len(), 9, "{v:#}");
    assert!(partitions.iter().all(|p| p["lag"] == 0), "{v:#}");
    assert_eq!(
        partitions
            .iter()
            .find(|p| p["topic"] == "emis.teacher.created")
            .unwrap()["highWatermark"],
        4,
        "three copies of a teacher and another school's: {v:#}"
    );

    // The metrics moved with the events, and the exposition is valid. The
    // node's clock moves on 5 s from when it received them.
    node.clock.set(node.clock.now_value() + 5 * SEC);
    let (_, _, body) = node.get("/metrics").await;
    let text = String::from_utf8(body).unwrap();
    let value = |prefix: &str| -> f64 {
        text.lines()
            .find(|l| l.starts_with(prefix))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{prefix} not in\n{text}"))
    };
    assert_eq!(
        value("emis_edge_sync_latency_seconds_count"),
        9.0,
        "valid events of served schools"
    );
    assert!(value("emis_edge_http_request_duration_seconds_count{route=\"/api/sync/status\",status=\"200\"}") >= 1.0);
    assert_eq!(
        value("emis_edge_partition_seconds_since_last_event{topic=\"emis.class.created\",partition=\"0\"}"),
        5.0
    );
    assert!(value("emis_edge_store_file_bytes") > 0.0);
    assert_eq!(value("emis_edge_events_total{outcome=\"skipped\"}"), 2.0);
    // Per-school freshness comes from a worker, which computes it at the
    // first change of a node that started empty: wait for it to appear.
    let synced = (T0 + 3600 * SEC) as f64 / 1e9; // the test clock
    let gauge = format!(
        "emis_edge_school_oldest_synced_timestamp_seconds{{school=\"{}\"}} ",
        school(1)
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let freshness = loop {
        let (_, _, body) = node.get("/metrics").await;
        let text = String::from_utf8(body).unwrap();
        if let Some(line) = text.lines().find(|l| l.starts_with(&gauge)) {
            break line.rsplit(' ').next().unwrap().parse::<f64>().unwrap();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{gauge} never appeared:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(freshness, synced);
    assert_eq!(
        value("emis_edge_topic_events_total{topic=\"emis.teacher.created\",outcome=\"skipped\"}"),
        1.0
    );
    let teacher_applied =
        value("emis_edge_topic_events_total{topic=\"emis.teacher.created\",outcome=\"applied\"}");
    let teacher_stale =
        value("emis_edge_topic_events_total{topic=\"emis.teacher.created\",outcome=\"stale\"}");
    assert_eq!(
        (teacher_applied, teacher_stale),
        (1.0, 2.0),
        "the same teacher three times"
    );
    assert!(value("emis_edge_batch_size_messages_count") >= 1.0);
    assert!(value("emis_edge_batch_commit_duration_seconds_count") >= 1.0);
    promtool_check(&text);
    node.node.stop().await.unwrap();
}

/// Contract §2, "Filtering and transfers": a teacher moved to a school
/// the node does not serve leaves it everywhere; older events cannot bring
/// it back; a later move back in brings it in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_teacher_transferred_to_an_unserved_school_leaves_the_node() {
    use EventType::*;
    let kafka = Kafka::start(1);
    let node = TestNode::start(|c| {
        kafka.configure(c);
        c.schools.ids = vec![school(1)];
    })
    .await;
    let teacher = |n: u128, version: u64, school_n: u128, name: &str| {
        event(
            TeacherUpdated,
            n,
            version as i64,
            Some(version),
            school_n,
            teacher_fields(id(1), name),
        )
    };
    kafka.send(
        TeacherCreated,
        &[event(
            TeacherCreated,
            1,
            1,
            Some(1),
            1,
            teacher_fields(id(1), "Nguyễn Thị Hương"),
        )],
    );
    kafka.send(
        ClassCreated,
        &[event(
            ClassCreated,
            2,
            1,
            Some(1),
            1,
            class_fields(id(11), "Lớp 10A1"),
        )],
    );
    kafka.send(
        AssignmentCreated,
        &[event(
            AssignmentCreated,
            3,
            1,
            Some(1),
            1,
            assignment_fields(id(21), id(1), id(11), "homeroom"),
        )],
    );
    wait_status(&node, "3 events handled", |v| handled(v) == 3).await;
    let detail = format!("/api/teachers/{}", id(1));
    let list = format!("/api/schools/{}/teachers", school(1));
    let snapshot = format!("/api/schools/{}/snapshot", school(1));
    assert_eq!(node.get(&detail).await.0, 200);
    let before = node.node.state.store.read().unwrap().feed_cursor().unwrap();

    // Transferred to school 2, which this node does not serve.
    kafka.send(TeacherUpdated, &[teacher(4, 3, 2, "Nguyễn Thị Hương")]);
    let v = wait_status(&node, "the transfer", |v| handled(v) == 4).await;
    assert_eq!(counter(&v, "events_transferred_out"), 1, "{v:#}");
    assert_eq!(counter(&v, "events_skipped"), 0, "{v:#}");
    assert_eq!(node.get(&detail).await.0, 404, "still served by id");
    let (_, teachers) = node.get_json(&list).await;
    assert_eq!(
        teachers["items"],
        json!([]),
        "still in the old school's list"
    );
    let (_, _, body) = node.get(&snapshot).await;
    let text = String::from_utf8(body).unwrap();
    assert!(
        !text.contains("\"kind\":\"teacher\""),
        "still in the snapshot:\n{text}"
    );
    assert!(text.contains("\"count\":2"), "{text}");
    // The old school's change feed says where it went.
    let page = node
        .node
        .state
        .store
        .read()
        .unwrap()
        .changes(&[school(1)], Some(&before), 10)
        .unwrap();
    assert_eq!(page.items.len(), 1);
    assert_eq!(
        (page.items[0].id(), page.items[0].school_id()),
        (id(1), school(2))
    );

    // Older events afterwards, from either school, do not bring it back;
    // the same transfer again is a duplicate.
    kafka.send(
        TeacherUpdated,
        &[
            teacher(5, 2, 1, "Bản cũ"),
            teacher(6, 2, 2, "Bản cũ"),
            teacher(4, 3, 2, "Nguyễn Thị Hương"),
        ],
    );
    let v = wait_status(&node, "the late events", |v| handled(v) == 7).await;
    assert_eq!(counter(&v, "events_transferred_out"), 1, "{v:#}");
    assert_eq!(counter(&v, "events_skipped"), 2, "{v:#}");
    assert_eq!(
        node.get(&detail).await.0,
        404,
        "an older event brought it back"
    );

    // Transferred back in later: here again.
    kafka.send(TeacherUpdated, &[teacher(7, 4, 1, "Nguyễn Thị Hương")]);
    wait_status(&node, "the transfer back", |v| handled(v) == 8).await;
    let (status, back) = node.get_json(&detail).await;
    assert_eq!(status, 200);
    assert_eq!(back["schoolId"], school(1).to_string());
    assert_eq!(back["classAssignments"][0]["className"], "Lớp 10A1");

    let (_, _, body) = node.get("/metrics").await;
    let text = String::from_utf8(body).unwrap();
    let value = |line: &str| -> f64 {
        text.lines()
            .find(|l| l.starts_with(line))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{line} not in\n{text}"))
    };
    assert_eq!(
        value("emis_edge_events_total{outcome=\"transferred_out\"}"),
        1.0
    );
    assert_eq!(value("emis_edge_events_total{outcome=\"skipped\"}"), 2.0);
    assert_eq!(
        value("emis_edge_topic_events_total{topic=\"emis.teacher.updated\",outcome=\"transferred_out\"}"),
        1.0
    );
    assert_eq!(
        value("emis_edge_topic_events_total{topic=\"emis.teacher.updated\",outcome=\"skipped\"}"),
        2.0
    );
    promtool_check(&text);
    node.node.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_events_are_dead_lettered_and_later_valid_ones_still_apply() {
    let kafka = Kafka::start(1);
    let node = TestNode::start(|c| kafka.configure(c)).await;
    let good = |n: u128, class: u128| {
        event(
            EventType::ClassCreated,
            n,
            1,
            None,
            1,
            class_fields(id(class), "Lớp 10A1"),
        )
    };
    let mut missing = good(1, 1);
    missing.as_object_mut().unwrap().remove("className");
    let mut bad_uuid = good(2, 1);
    bad_uuid["classId"] = json!("lop-10a1");
    let mut too_long = good(3, 1);
    too_long["className"] = json!("L".repeat(201));
    let mut unknown = good(4, 1);
    unknown["eventType"] = json!("emis.class.renamed");
    let mut mismatch = good(5, 1);
    mismatch["eventType"] = json!("emis.class.updated");
    let payloads: Vec<Vec<u8>> = [
        b"{not json".to_vec(),
        missing.to_string().into_bytes(),
        bad_uuid.to_string().into_bytes(),
        too_long.to_string().into_bytes(),
        unknown.to_string().into_bytes(),
        mismatch.to_string().into_bytes(),
        good(6, 42).to_string().into_bytes(),
    ]
    .into();
    kafka.send_raw("emis.class.created", 0, &payloads);

    wait_status(&node, "7 events handled", |v| handled(v) == 7).await;
    assert_eq!(
        node.get(&format!("/api/classes/{}", id(42))).await.0,
        200,
        "valid event after bad ones lost"
    );
    let (_, v) = node.get_json("/api/sync/dead-letters").await;
    let items = v["items"].as_array().unwrap();
    assert_eq!(items.len(), 6);
    let mut reasons: Vec<(i64, String)> = items
        .iter()
        .map(|d| {
            (
                d["offset"].as_i64().unwrap(),
                d["reason"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    reasons.sort();
    let expect = [
        "not valid JSON",
        "missing required field `className`",
        "field `classId`: not a UUID",
        "field `className`: 201 characters",
        "unknown eventType `emis.class.renamed`",
        "eventType `emis.class.updated` does not match",
    ];
    for ((offset, reason), (n, want)) in reasons.iter().zip(expect.iter().enumerate()) {
        assert_eq!(*offset, n as i64);
        assert!(
            reason.starts_with(want),
            "offset {offset}: {reason:?} is not {want:?}"
        );
    }
    assert_eq!(items.last().unwrap()["topic"], "emis.class.created");
    let (_, status) = node.get_json("/api/sync/status").await;
    assert_eq!(status["deadLetterCount"], 6);
    node.node.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_answer_while_the_broker_is_down_and_ingestion_resumes_when_it_returns() {
    let kafka = Kafka::start(1);
    let node = TestNode::start(|c| {
        kafka.configure(c);
        c.kafka.stale_after_secs = 5;
    })
    .await;
    let t = EventType::TeacherCreated;
    kafka.send(
        t,
        &[event(
            t,
            1,
            1,
            None,
            1,
            teacher_fields(id(1), "Nguyễn Thị Hương"),
        )],
    );
    wait_status(&node, "the first event", |v| {
        counter(v, "events_applied") == 1
    })
    .await;
    wait_status(&node, "connected", |v| {
        v["kafka"]["connected"] == true && v["stale"] == false
    })
    .await;

    kafka.cluster.broker_down(1).unwrap();
    wait_status(&node, "disconnected", |v| v["kafka"]["connected"] == false).await;
    node.clock.set(node.clock.now_value() + 10 * SEC);
    for _ in 0..5 {
        assert_eq!(node.get(&format!("/api/teachers/{}", id(1))).await.0, 200);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let v = wait_status(&node, "stale", |v| v["stale"] == true).await;
    assert!(v["lastEventTime"].is_string());

    kafka.cluster.broker_up(1).unwrap();
    kafka.send(
        t,
        &[event(
            t,
            2,
            2,
            None,
            1,
            teacher_fields(id(2), "Trần Văn Nam"),
        )],
    );
    wait_status(&node, "the event produced after the outage", |v| {
        counter(v, "events_applied") == 2
    })
    .await;
    wait_status(&node, "fresh again", |v| v["stale"] == false).await;
    assert_eq!(node.get(&format!("/api/teachers/{}", id(2))).await.0, 200);
    node.node.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_resumes_from_stored_offsets_and_applies_nothing_twice() {
    let kafka = Kafka::start(3);
    let node = TestNode::start(|c| kafka.configure(c)).await;
    let t = EventType::ClassCreated;
    for p in 0..3 {
        let batch: Vec<Vec<u8>> = (0..20u128)
            .map(|n| {
                event(
                    t,
                    p * 100 + n,
                    1,
                    Some(1),
                    1,
                    class_fields(id(p * 100 + n), "Lớp 1A1"),
                )
                .to_string()
                .into_bytes()
            })
            .collect();
        kafka.send_raw(t.name(), p as i32, &batch);
    }
    wait_status(&node, "60 events", |v| counter(v, "events_applied") == 60).await;
    let node = node.restart().await;
    let more: Vec<Vec<u8>> = (0..10u128)
        .map(|n| {
            event(
                t,
                900 + n,
                1,
                Some(1),
                1,
                class_fields(id(900 + n), "Lớp 2A1"),
            )
            .to_string()
            .into_bytes()
        })
        .collect();
    kafka.send_raw(t.name(), 1, &more);
    // Every partition read to its end: anything read twice would have been
    // counted (as stale) in the same transaction as the offsets by then.
    let offsets = |v: &Value| -> i64 {
        v["partitions"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|p| p["topic"] == t.name())
            .map(|p| p["offset"].as_i64().unwrap_or(0))
            .sum()
    };
    let v = wait_status(&node, "70 events, every offset at the end", |v| {
        counter(v, "events_applied") == 70 && offsets(v) == 70
    })
    .await;
    assert_eq!(handled(&v), 70, "events were read twice: {v:#}");
    assert_eq!(counter(&v, "events_stale"), 0, "{v:#}");
    assert_eq!(v["entities"]["classes"], 70);
    node.node.stop().await.unwrap();
}

#[test]
fn the_kafka_client_is_built_with_tls_and_sasl_scram() {
    // The settings of the contract's example (SASL_SSL) must be accepted by
    // librdkafka, or a node configured that way would never read an event.
    let consumer: Result<rdkafka::consumer::BaseConsumer, _> = ClientConfig::new()
        .set("bootstrap.servers", "127.0.0.1:1")
        .set("group.id", "t")
        .set("security.protocol", "SASL_SSL")
        .set("sasl.mechanism", "SCRAM-SHA-512")
        .set("sasl.username", "edge")
        .set("sasl.password", "secret")
        .create();
    assert!(consumer.is_ok(), "{:?}", consumer.err());
}

/// `promtool check metrics` (Debian package prometheus) accepts the text.
pub fn promtool_check(text: &str) {
    use std::io::Write;
    let mut child = match std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
    {
        Ok(c) => c,
        Err(_) => {
            let install = "apt-get install prometheus (it checks the metrics exposition)";
            return missing_tool("promtool", "EMIS_EDGE_SKIP_PROMTOOL", install);
        }
    };
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A topic deleted and created again (or a broker rebuilt) holds fewer
/// messages than the node has read: the node reads it from the start
/// rather than wait for offsets that will only be reached by other events,
/// and asks for a resync.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recreated_topic_is_read_from_its_start_and_a_resync_is_requested() {
    use EventType::*;
    let old = Kafka::start(1);
    let node = TestNode::start(|c| old.configure(c)).await;
    let classes: Vec<Value> = (0..5)
        .map(|n| {
            event(
                ClassCreated,
                n,
                1,
                Some(1),
                1,
                class_fields(id(7000 + n), "Lớp 6A1"),
            )
        })
        .collect();
    old.send(ClassCreated, &classes);
    wait_status(&node, "the first five classes", |v| {
        counter(v, "events_applied") == 5
    })
    .await;
    let TestNode { node, dir, .. } = node;
    node.stop().await.unwrap();

    let new = Kafka::start(1);
    new.send(
        ClassCreated,
        &[event(
            ClassCreated,
            99,
            2,
            Some(1),
            1,
            class_fields(id(7099), "Lớp 6A2"),
        )],
    );
    let node = TestNode::start_in(dir, |c| new.configure(c)).await;
    let status = wait_status(&node, "the recreated topic's class", |v| {
        counter(v, "events_applied") == 6
    })
    .await;
    let (code, class) = node.get_json(&format!("/api/classes/{}", id(7099))).await;
    assert_eq!(code, 200, "{class}");
    let out_of_range = status["kafka"]["offsetOutOfRange"].to_string();
    assert!(out_of_range.contains("> latest"), "{status:#}");
}

/// Contract §2 "Time": an event stamped more than `ingest.max_future_skew`
/// (1 h) after its Kafka record's own timestamp is dead-lettered with a
/// reason naming the field and the bound. It wins no conflict, and neither
/// the watermark (`lastEventTime`) nor the `asOf` this node serves moves
/// past what was accepted. The node's own clock plays no part: it stands at
/// T0 + 1 h, the records say T0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_stamped_beyond_the_skew_after_its_record_is_dead_lettered() {
    use EventType::*;
    let kafka = Kafka::start(1);
    let node = TestNode::start(|c| kafka.configure(c)).await;
    let record_ms = T0 / 1_000_000;
    const MIN: i64 = 60;
    let at = |n: u128, t: EventType, secs: i64, body: Value| {
        merge(
            envelope(t, id(70_000 + n), T0 + secs * SEC, None, school(1)),
            body,
        )
    };
    let year_2200 = 7_258_118_400 * SEC - T0; // 2200-01-01T00:00:00Z, from T0
    kafka.send_stamped(
        TeacherCreated,
        &[
            at(
                1,
                TeacherCreated,
                10 * MIN,
                teacher_fields(id(1), "Nguyễn Thị Hương"),
            ),
            // Just beyond the bound, and just within it.
            at(
                2,
                TeacherCreated,
                60 * MIN + 1,
                teacher_fields(id(2), "Trần Văn Nam"),
            ),
            at(
                3,
                TeacherCreated,
                59 * MIN,
                teacher_fields(id(3), "Lê Thị Lan"),
            ),
        ],
        record_ms,
    );
    kafka.send_stamped(
        TeacherUpdated,
        &[
            // Would win every later update for good.
            at(
                4,
                TeacherUpdated,
                year_2200 / SEC,
                teacher_fields(id(1), "Kẻ mạo danh"),
            ),
            at(
                5,
                TeacherUpdated,
                20 * MIN,
                teacher_fields(id(1), "Nguyễn Thị Hương Giang"),
            ),
        ],
        record_ms,
    );
    let v = wait_status(&node, "5 events handled", |v| handled(v) == 5).await;
    assert_eq!(counter(&v, "events_applied"), 3, "{v:#}");
    assert_eq!(counter(&v, "events_dead_lettered"), 2, "{v:#}");
    assert_eq!(
        v["lastEventTime"],
        rfc3339(T0 + 59 * MIN * SEC),
        "the watermark moved past what was accepted: {v:#}"
    );
    let (_, detail) = node.get_json(&format!("/api/teachers/{}", id(1))).await;
    assert_eq!(detail["fullName"], "Nguyễn Thị Hương Giang", "{detail}");
    assert_eq!(node.get(&format!("/api/teachers/{}", id(2))).await.0, 404);
    assert_eq!(node.get(&format!("/api/teachers/{}", id(3))).await.0, 200);

    let (_, letters) = node.get_json("/api/sync/dead-letters").await;
    let mut reasons: Vec<String> = letters["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["reason"].as_str().unwrap().to_owned())
        .collect();
    reasons.sort();
    assert_eq!(
        reasons,
        [
            "field `timestamp`: 2025-10-26T11:00:01Z lies more than 1h (ingest.max_future_skew) \
             after the Kafka record's timestamp 2025-10-26T10:00:00Z: refused as implausible",
            "field `timestamp`: 2200-01-01T00:00:00Z lies more than 1h (ingest.max_future_skew) \
             after the Kafka record's timestamp 2025-10-26T10:00:00Z: refused as implausible",
        ]
    );
    // The snapshot this node serves is as of the newest accepted change.
    let (_, _, body) = node
        .get(&format!("/api/schools/{}/snapshot", school(1)))
        .await;
    let body = String::from_utf8(body).unwrap();
    let end: Value = serde_json::from_str(body.lines().last().unwrap()).unwrap();
    assert_eq!(end["asOf"], rfc3339(T0 + 59 * MIN * SEC), "{body}");
    node.node.stop().await.unwrap();
}

/// Waits until `done` holds of the node's state, or fails after 30 s.
pub async fn wait_for(what: &str, done: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Events lost from Kafka while the node runs: the head of a partition is
/// deleted (librdkafka's mock cluster keeps 5 MiB per partition and
/// deletes the oldest beyond) while the node is not fetching it, as one far
/// behind its broker would not have. librdkafka reports the position
/// outside the log (`auto.offset.reset=error`) instead of moving it
/// silently; the node counts it, requests a resync (which runs), reads on
/// from the earliest offset, and status and metrics say so, also after a
/// restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_whose_head_is_deleted_while_the_node_runs_is_counted_resynced_and_remembered()
{
    use std::sync::atomic::Ordering::SeqCst;
    use EventType::*;
    let class = |n: u128, ts: i64| {
        event(
            ClassCreated,
            n,
            ts,
            Some(1),
            1,
            class_fields(id(8000 + n), "Lớp 6A1"),
        )
    };
    let central = TestNode::start(|_| {}).await;
    central.apply(vec![parse(ClassCreated, &class(1, 1))]);
    let kafka = Kafka::start(1);
    // Not empty, so the resync schedule waits a day: a resync that runs is
    // the one the lost events asked for.
    let node = TestNode::start_seeded(vec![parse(ClassCreated, &class(1, 1))], |c| {
        kafka.configure(c);
        c.resync.central_url = Some(central.url(""));
    })
    .await;
    kafka.send(ClassCreated, &[class(2, 1)]);
    // The seed counts as one.
    wait_status(&node, "the first event", |v| {
        counter(v, "events_applied") == 2
    })
    .await;
    let faults = &node.node.state.faults;
    faults.pause_ingest.store(true, SeqCst);
    wait_for("ingest to pause", || faults.ingest_paused.load(SeqCst)).await;

    // 10 MiB of valid events: the mock deletes the oldest 5 MiB, and with
    // them offset 1, where the node stands.
    let padding = "x".repeat(60 * 1024);
    let big: Vec<Vec<u8>> = (0..160u128)
        .map(|n| {
            let mut e = class(100 + n, 2);
            e["padding"] = json!(padding);
            e.to_string().into_bytes()
        })
        .collect();
    kafka.send_raw(ClassCreated.name(), 0, &big);
    let (low, high) = kafka.watermarks(ClassCreated.name(), 0);
    assert!(low > 1, "the mock kept the head: {low}..{high}");
    faults.pause_ingest.store(false, SeqCst);

    let v = wait_status(&node, "the loss recorded, the rest read, a resync", |v| {
        v["kafka"]["offsetOutOfRange"].is_object()
            && v["lastResync"]["result"] == "ok"
            && v["partitions"]
                .as_array()
                .unwrap()
                .iter()
                .any(|p| p["topic"] == ClassCreated.name() && p["offset"] == high)
    })
    .await;
    let detail = format!("emis.class.created/0: stored 1 < earliest {low}");
    assert_eq!(v["kafka"]["offsetOutOfRange"]["detail"], detail, "{v:#}");
    assert_eq!(counter(&v, "offset_out_of_range"), 1, "{v:#}");
    // The events still in the log were read from its earliest offset.
    assert_eq!(
        counter(&v, "events_applied"),
        2 + (high - low) as u64,
        "{v:#}"
    );
    let (_, _, body) = node.get("/metrics").await;
    let text = String::from_utf8(body).unwrap();
    assert!(
        text.lines()
            .any(|l| l == "emis_edge_offset_out_of_range_total 1"),
        "{text}"
    );
    promtool_check(&text);

    // A restart forgets neither.
    let resync_at = v["lastResync"]["at"].clone();
    let node = node.restart().await;
    let (_, v) = node.get_json("/api/sync/status").await;
    assert_eq!(v["kafka"]["offsetOutOfRange"]["detail"], detail, "{v:#}");
    assert_eq!(v["lastResync"]["result"], "ok", "{v:#}");
    assert_eq!(v["lastResync"]["at"], resync_at, "{v:#}");
    assert_eq!(counter(&v, "offset_out_of_range"), 1, "{v:#}");
    node.node.stop().await.unwrap();
}

/// Dead letters are bounded (`store.dead_letter_max_count`): a node fed
/// nothing but bad records keeps the newest ones, drops the oldest, and
/// counts the drops in status and metrics.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_beyond_the_configured_count_drop_the_oldest_and_are_counted() {
    let kafka = Kafka::start(1);
    let node = TestNode::start(|c| {
        kafka.configure(c);
        c.store.dead_letter_max_count = 3;
    })
    .await;
    let bad: Vec<Vec<u8>> = (0..5)
        .map(|n| format!("not json {n}").into_bytes())
        .collect();
    kafka.send_raw("emis.class.created", 0, &bad);
    let v = wait_status(&node, "5 dead letters", |v| {
        counter(v, "events_dead_lettered") == 5
    })
    .await;
    assert_eq!(v["deadLetterCount"], 3, "{v:#}");
    assert_eq!(counter(&v, "dead_letters_dropped"), 2, "{v:#}");
    let (_, list) = node.get_json("/api/sync/dead-letters").await;
    let offsets: Vec<i64> = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["offset"].as_i64().unwrap())
        .collect();
    assert_eq!(offsets, [4, 3, 2], "the newest kept, newest first");
    let (_, _, body) = node.get("/metrics").await;
    let text = String::from_utf8(body).unwrap();
    for line in [
        "emis_edge_dead_letters_dropped_total 2",
        "emis_edge_dead_letters 3.0",
    ] {
        assert!(text.lines().any(|l| l == line), "{line} not in\n{text}");
    }
    node.node.stop().await.unwrap();
}

/// The node's metrics once its batches add up to `messages`: a batch is
/// counted just after its commit, so status may show its events first.
async fn batch_metrics(node: &TestNode, messages: u64) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let text = metrics(node).await;
        if metric(&text, "emis_edge_batch_size_messages_sum") == messages as f64 {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for batches of {messages} messages:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A node that comes back to a backlog reads it in whole batches, however
/// short `batch_max_wait_ms` is: each transaction then rewrites a B-tree
/// page once for many changes, and catch-up runs at full speed. Cutting
/// batches at the wait would commit 1,500 events in dozens of tiny
/// transactions here (parsing 500 events takes longer than 1 ms).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_is_applied_in_full_batches_whatever_the_wait() {
    let kafka = Kafka::start(1);
    let t = EventType::ClassCreated;
    let backlog: Vec<Vec<u8>> = (0..1_500u128)
        .map(|n| {
            event(t, n, 1, Some(1), 1, class_fields(id(n), "Lớp 1A1"))
                .to_string()
                .into_bytes()
        })
        .collect();
    kafka.send_raw(t.name(), 0, &backlog);
    let node = TestNode::start(|c| {
        kafka.configure(c);
        c.kafka.batch_max_messages = 500;
        c.kafka.batch_max_wait_ms = 1;
    })
    .await;
    wait_status(&node, "the backlog", |v| {
        counter(v, "events_applied") == 1_500
    })
    .await;
    // Three batches of 500; one or two more when the client's queue ran
    // dry between two fetches of the broker.
    let text = batch_metrics(&node, 1_500).await;
    let batches = metric(&text, "emis_edge_batch_size_messages_count");
    assert!(
        (3.0..=5.0).contains(&batches),
        "the backlog took {batches} batches, not three of 500:\n{text}"
    );
    assert_eq!(metric(&text, "emis_edge_batch_size_messages_sum"), 1_500.0);
    // A live stream still closes its batch after the wait: one more event
    // is applied on its own.
    kafka.send(
        t,
        &[event(
            t,
            9_000,
            1,
            Some(1),
            1,
            class_fields(id(9_000), "Lớp 2A1"),
        )],
    );
    wait_status(&node, "the live event", |v| {
        counter(v, "events_applied") == 1_501
    })
    .await;
    let text = batch_metrics(&node, 1_501).await;
    assert_eq!(
        metric(&text, "emis_edge_batch_size_messages_count"),
        batches + 1.0
    );
    node.node.stop().await.unwrap();
}

//! End to end against real processes: the tansu broker (a Kafka-compatible
//! server, over TCP, started by `test_support::Tansu`; mind its known faults
//! documented there) and the `emis-edge` binary killed with SIGKILL.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use emis_edge::domain::EventType;
use rand::{Rng, SeedableRng};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::ClientConfig;
use serde_json::{json, Value};
use test_support::{Options, Tansu};

use crate::kafka::{counter, event, handled, wait_status, Kafka};
use crate::support::*;

/// The test broker's topics are the contract's nine.
#[test]
fn the_test_broker_creates_the_nine_contract_topics() {
    let names: Vec<_> = EventType::ALL.iter().map(|t| t.name()).collect();
    let mut topics = test_support::TOPICS.to_vec();
    let mut expected = names.clone();
    topics.sort_unstable();
    expected.sort_unstable();
    assert_eq!(topics, expected);
}

/// A broker that cannot start (here: a binary that exits at once) fails
/// the start with the reason, instead of hanging the test.
#[test]
fn a_test_broker_that_exits_at_once_is_reported() {
    let err = Tansu::start(std::path::Path::new("false"), &Options::default())
        .err()
        .expect("`false` is no broker");
    assert!(err.to_string().starts_with("tansu exited"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn against_tansu_multi_partition_topics_converge_to_the_right_answers() {
    // No node restarts here, so tansu's fetch-inside-a-batch fault (see
    // test_support) cannot bite: any batching is fine.
    let Some(tansu) = Tansu::for_test(3) else {
        return;
    };
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", tansu.brokers())
        .create()
        .unwrap();
    let send = |t: EventType, partition: i32, v: &Value| {
        producer
            .send(
                BaseRecord::<(), [u8]>::to(t.name())
                    .partition(partition)
                    .payload(v.to_string().as_bytes()),
            )
            .map_err(|(e, _)| e)
            .unwrap();
    };
    use EventType::*;
    let mut total = 0;
    for n in 0..30u128 {
        let p = (n % 3) as i32;
        // Update (v2) before create (v1), across topics and partitions.
        send(
            ClassUpdated,
            p,
            &event(
                ClassUpdated,
                n * 10,
                2,
                Some(2),
                1,
                class_fields(id(100 + n), &format!("Lớp {n}A1")),
            ),
        );
        send(
            ClassCreated,
            (p + 1) % 3,
            &event(
                ClassCreated,
                n * 10 + 1,
                1,
                Some(1),
                1,
                class_fields(id(100 + n), "cũ"),
            ),
        );
        let teacher = event(
            TeacherCreated,
            n * 10 + 2,
            1,
            None,
            1,
            teacher_fields(id(200 + n), "Nguyễn Thị Hương"),
        );
        send(TeacherCreated, p, &teacher);
        send(TeacherCreated, p, &teacher); // duplicate
        send(
            AssignmentCreated,
            p,
            &event(
                AssignmentCreated,
                n * 10 + 3,
                1,
                None,
                1,
                assignment_fields(id(300 + n), id(200 + n), id(100 + n), "homeroom"),
            ),
        );
        total += 5;
    }
    for n in 0..10u128 {
        send(
            ClassDeleted,
            (n % 3) as i32,
            &event(
                ClassDeleted,
                900 + n,
                5,
                Some(3),
                1,
                json!({"classId": id(100 + n)}),
            ),
        );
        send(
            TeacherCreated,
            2,
            &event(
                TeacherCreated,
                950 + n,
                1,
                None,
                2,
                teacher_fields(id(700 + n), "Trần Văn Nam"),
            ),
        );
        total += 2;
    }
    producer
        .send(
            BaseRecord::<(), [u8]>::to(TeacherUpdated.name())
                .partition(1)
                .payload(b"not json".as_slice()),
        )
        .map_err(|(e, _)| e)
        .unwrap();
    total += 1;
    producer.flush(Duration::from_secs(10)).unwrap();

    let node = TestNode::start(|c| {
        c.kafka.brokers = tansu.brokers().to_owned();
        c.kafka.batch_max_wait_ms = 5;
        c.schools.all = false;
        c.schools.ids = vec![school(1)];
    })
    .await;
    let v = wait_status(&node, "every event handled", |v| handled(v) == total).await;
    assert_eq!(counter(&v, "events_skipped"), 10);
    assert_eq!(counter(&v, "events_dead_lettered"), 1);
    assert_eq!(v["entities"]["classes"], 20, "{v:#}");
    assert_eq!(v["entities"]["teachers"], 30);
    assert_eq!(v["entities"]["tombstones"], 10);
    // Offsets are stored for the 16 partitions that received messages:
    // class.created/updated, teacher.created, assignment.created and
    // class.deleted on all 3, teacher.updated on 1.
    // The other 11 are listed too, with no offset and no lag.
    let partitions = v["partitions"].as_array().unwrap();
    assert_eq!(partitions.len(), 27, "{v:#}");
    assert_eq!(
        partitions.iter().filter(|p| p["offset"].is_i64()).count(),
        16,
        "{v:#}"
    );
    assert!(partitions.iter().all(|p| p["lag"] == 0), "{v:#}");
    assert_eq!(node.get("/health/ready").await.0, 200);
    // Teacher 15: class 115 is live, named by its v2 update.
    let (status, d) = node.get_json(&format!("/api/teachers/{}", id(215))).await;
    assert_eq!(status, 200);
    assert_eq!(d["classAssignments"][0]["className"], "Lớp 15A1");
    // Teacher 5: its class was deleted, so the assignment is left out.
    let (_, d) = node.get_json(&format!("/api/teachers/{}", id(205))).await;
    assert_eq!(d["classAssignments"], json!([]));
    node.node.stop().await.unwrap();
}

/// The kill schedule's seed: `EMIS_EDGE_CRASH_SEED`, else a fixed one, so
/// that a run can be repeated exactly (the seed is printed).
const CRASH_SEED: u64 = 20_251_026;

/// `kill -9` at moments picked by a seeded random schedule while events
/// stream in: after the last restart every event is applied exactly once
/// and the stored offsets match the data (contract §2, "Delivery
/// guarantee"). Each of the six kills lands while events stream in: the
/// schedule picks, per round, how many events must be applied first and
/// how long after that to wait, so it does not depend on how fast this
/// machine happens to be.
///
/// The test broker is librdkafka's mock cluster, which keeps at most 5 MiB
/// (and 100,000 messages) per partition and deletes the oldest beyond: a
/// node more than that behind would lose events through the test's setup,
/// not through a fault of its own. So the events are spread over enough
/// partitions to stay far below (100,000 events of ~330 bytes over 12
/// partitions: under 3 MiB each), and the test checks, once all are
/// produced, that no partition lost its head.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_random_moments_loses_nothing_and_doubles_nothing() {
    const EVENTS: u128 = 100_000;
    const PARTITIONS: i32 = 12;
    const ROUNDS: usize = 6;
    let kafka = Kafka::start(PARTITIONS);
    let dir = tempfile::tempdir().unwrap();
    let brokers = kafka.cluster.bootstrap_servers();
    let data_dir = dir.path().to_str().unwrap().to_owned();
    let spawn = || {
        serve_on_a_free_port(
            |port| {
                let mut cmd = Command::new(env!("CARGO_BIN_EXE_emis-edge"));
                cmd.args(["serve", "--config", "/dev/null"])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .env("EMIS_EDGE__NODE__DATA_DIR", &data_dir)
                    .env("EMIS_EDGE__HTTP__LISTEN", format!("127.0.0.1:{port}"))
                    .env("EMIS_EDGE__KAFKA__BROKERS", &brokers)
                    .env("RUST_LOG", "warn")
                    .env("EMIS_EDGE__NODE__ID", "crash-test")
                    .env("EMIS_EDGE__SCHOOLS__ALL", "true")
                    // A restarted node catches up in batches sized by their
                    // time, up to 100,000: one could take it from a round's
                    // target to the end of the stream before the kill.
                    .env("EMIS_EDGE__KAFKA__BATCH_MAX_MESSAGES", "10000");
                cmd
            },
            "crash-test",
        )
    };

    // Stream the events in from another thread while the node is killed.
    let servers = kafka.cluster.bootstrap_servers();
    let producer_thread = std::thread::spawn(move || {
        let producer: BaseProducer = ClientConfig::new()
            .set("bootstrap.servers", servers)
            .set("linger.ms", "5")
            .create()
            .unwrap();
        let t = EventType::ClassCreated;
        for n in 0..EVENTS {
            let v = event(
                t,
                n,
                1,
                Some(1),
                1,
                class_fields(id(1_000_000 + n), "Lớp 10A1"),
            );
            let payload = v.to_string();
            loop {
                match producer.send(
                    BaseRecord::<(), str>::to(t.name())
                        .partition((n % PARTITIONS as u128) as i32)
                        .payload(&payload),
                ) {
                    Ok(()) => break,
                    Err((_, _)) => producer.poll(Duration::from_millis(10)),
                }
            }
            if n % 5_000 == 0 {
                producer.flush(Duration::from_secs(30)).unwrap();
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        producer.flush(Duration::from_secs(30)).unwrap();
    });

    let seed: u64 = std::env::var("EMIS_EDGE_CRASH_SEED")
        .ok()
        .map(|s| s.parse().expect("EMIS_EDGE_CRASH_SEED is a number"))
        .unwrap_or(CRASH_SEED);
    eprintln!("kill schedule seed {seed} (EMIS_EDGE_CRASH_SEED={seed} repeats it)");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    // Per round: events applied before the kill (rising, all below 80 %
    // of the stream), then a pause of 0-100 ms, so that it falls anywhere
    // in a batch's read-apply-commit cycle (and far from the end).
    let mut targets: Vec<u64> = (0..ROUNDS)
        .map(|_| rng.gen_range(1..EVENTS as u64 * 8 / 10))
        .collect();
    targets.sort_unstable();
    let http = reqwest::Client::new();
    let applied_at = |port: u16| {
        let http = http.clone();
        async move {
            let url = format!("http://127.0.0.1:{port}/api/sync/status");
            let v: Value = http.get(url).send().await.ok()?.json().await.ok()?;
            Some(counter(&v, "events_applied"))
        }
    };
    let mut killed_mid_stream = 0;
    for (round, target) in targets.into_iter().enumerate() {
        let pause = Duration::from_millis(rng.gen_range(0..100));
        let mut node = spawn();
        let deadline = Instant::now() + Duration::from_secs(120);
        while applied_at(node.port).await.is_none_or(|n| n < target) {
            assert!(
                Instant::now() < deadline,
                "round {round}: {target} events not applied within 120 s"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::time::sleep(pause).await;
        let seen = applied_at(node.port).await.unwrap_or(0);
        // SIGKILL: no shutdown code runs.
        node.child.kill().unwrap();
        node.child.wait().unwrap();
        eprintln!(
            "round {round}: killed {pause:?} after {target} events, with at least {seen} applied"
        );
        if seen < EVENTS as u64 {
            killed_mid_stream += 1;
        }
    }
    assert_eq!(
        killed_mid_stream, ROUNDS,
        "a kill did not land while events streamed in"
    );
    producer_thread.join().unwrap();
    // Every event is still in the broker: a test setup that overflowed the
    // mock's per-partition limit fails here, not as lost events below.
    let topic = EventType::ClassCreated.name();
    let mut produced = 0;
    for partition in 0..PARTITIONS {
        let (low, high) = kafka.watermarks(topic, partition);
        assert_eq!(
            low, 0,
            "the mock cluster deleted the head of {topic}/{partition} (its low watermark is \
             {low} of {high}): the test produced more than librdkafka's mock keeps per \
             partition (5 MiB, 100,000 messages); spread the events over more partitions"
        );
        produced += high;
    }
    assert_eq!(produced, EVENTS as i64);

    let node = spawn();
    let url = format!("http://127.0.0.1:{}/api/sync/status", node.port);
    let deadline = Instant::now() + Duration::from_secs(240);
    let v = loop {
        let v: Value = http.get(&url).send().await.unwrap().json().await.unwrap();
        if handled(&v) >= EVENTS as u64 || Instant::now() > deadline {
            break v;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(
        v["nodeId"], "crash-test",
        "another process answers on the port"
    );
    assert_eq!(counter(&v, "events_applied"), EVENTS as u64, "{v:#}");
    assert_eq!(
        counter(&v, "events_stale"),
        0,
        "an event was applied twice: {v:#}"
    );
    assert_eq!(v["entities"]["classes"], EVENTS as u64);
    let offsets: i64 = v["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["offset"].as_i64().unwrap_or(0))
        .sum();
    assert_eq!(
        offsets, EVENTS as i64,
        "stored offsets do not match the data"
    );
}

/// `emis-edge serve` for a node with its configuration in the
/// environment, listening on `port`, logging warnings only.
fn node_command(dir: &std::path::Path, port: u16, id: &str, env: &[(&str, String)]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_emis-edge"));
    cmd.args(["serve", "--config", "/dev/null"])
        .env("EMIS_EDGE__NODE__DATA_DIR", dir)
        .env("EMIS_EDGE__HTTP__LISTEN", format!("127.0.0.1:{port}"))
        .env("EMIS_EDGE__NODE__ID", id)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd
}

/// Contract §6 end to end with binaries: tansu → a provincial node
/// process consuming Kafka → two school node processes following it over
/// HTTP, each with its own school. Each school node answers for its
/// school what the provincial node answers, also after an update and a
/// transfer between their schools, and nothing of the other school.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tansu_feeds_a_provincial_node_that_two_school_node_processes_follow() {
    use EventType::*;
    let Some(tansu) = Tansu::for_test(1) else {
        return;
    };
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", tansu.brokers())
        .create()
        .unwrap();
    let send = |t: EventType, v: &Value| {
        producer
            .send(BaseRecord::<(), [u8]>::to(t.name()).payload(v.to_string().as_bytes()))
            .map_err(|(e, _)| e)
            .unwrap();
    };
    let teachers: Vec<u128> = (1..=6).collect();
    for n in &teachers {
        let s = if *n <= 3 { 1 } else { 2 };
        send(
            TeacherCreated,
            &event(
                TeacherCreated,
                *n,
                1,
                Some(1),
                s,
                teacher_fields(id(*n), "Nguyễn Thị Hương"),
            ),
        );
        send(
            ClassCreated,
            &event(
                ClassCreated,
                100 + n,
                1,
                Some(1),
                s,
                class_fields(id(100 + n), "Lớp 10A1"),
            ),
        );
        send(
            AssignmentCreated,
            &event(
                AssignmentCreated,
                200 + n,
                1,
                Some(1),
                s,
                assignment_fields(id(200 + n), id(*n), id(100 + n), "homeroom"),
            ),
        );
    }
    // A school nobody follows.
    send(
        TeacherCreated,
        &event(
            TeacherCreated,
            7,
            1,
            Some(1),
            3,
            teacher_fields(id(7), "Trần Văn Nam"),
        ),
    );
    producer.flush(Duration::from_secs(10)).unwrap();

    let dirs: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let province_env = [
        ("EMIS_EDGE__KAFKA__BROKERS", tansu.brokers().to_string()),
        ("EMIS_EDGE__KAFKA__BATCH_MAX_WAIT_MS", "5".into()),
        ("EMIS_EDGE__SCHOOLS__ALL", "true".into()),
    ];
    let province = serve_on_a_free_port(
        |port| node_command(dirs[0].path(), port, "province", &province_env),
        "province",
    );
    let parent_url = format!("http://127.0.0.1:{}", province.port);
    let schools = |n: u128| {
        vec![
            ("EMIS_EDGE__UPSTREAM__URL", parent_url.clone()),
            ("EMIS_EDGE__UPSTREAM__WAIT_SECS", "5".into()),
            ("EMIS_EDGE__SCHOOLS__IDS", format!("[\"{}\"]", school(n))),
        ]
    };
    let school1 = serve_on_a_free_port(
        |port| node_command(dirs[1].path(), port, "school-1", &schools(1)),
        "school-1",
    );
    let school2 = serve_on_a_free_port(
        |port| node_command(dirs[2].path(), port, "school-2", &schools(2)),
        "school-2",
    );
    let ports = [province.port, school1.port, school2.port];
    let http = reqwest::Client::new();
    let get = |port: u16, path: String| {
        let http = http.clone();
        async move {
            let r = http
                .get(format!("http://127.0.0.1:{port}{path}"))
                .send()
                .await
                .unwrap();
            let status = r.status().as_u16();
            let body: Value = r.json().await.unwrap_or(Value::Null);
            (status, body)
        }
    };
    // What school node `port` (following `mine`) must answer, and does.
    let views = |port: u16, mine: u128, restrict: bool| {
        let get = &get;
        let teachers = &teachers;
        async move {
            let mut out = Vec::new();
            for n in teachers.iter().chain(&[7]) {
                let (status, mut body) = get(port, format!("/api/teachers/{}", id(*n))).await;
                if status != 200 || (restrict && body["schoolId"] != school(mine).to_string()) {
                    out.push(json!(404));
                    continue;
                }
                strip_sync(&mut body);
                out.push(body);
            }
            let (_, mut list) = get(
                port,
                format!("/api/schools/{}/classes?limit=1000", school(mine)),
            )
            .await;
            strip_sync(&mut list);
            out.push(list);
            out
        }
    };
    let parent_port = ports[0];
    let converge = |mine: u128, port: u16| {
        let views = &views;
        async move {
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                let expected = views(parent_port, mine, true).await;
                let got = views(port, mine, false).await;
                if got == expected {
                    return;
                }
                assert!(
                    Instant::now() < deadline,
                    "school node of school {mine} did not converge:\n{got:#?}\nexpected\n{expected:#?}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    let status = format!("http://127.0.0.1:{}/api/sync/status", ports[0]);
    let wait_handled = |n: u64| {
        let http = http.clone();
        let status = status.clone();
        async move {
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                let v: Value = http
                    .get(&status)
                    .send()
                    .await
                    .unwrap()
                    .json()
                    .await
                    .unwrap();
                if handled(&v) >= n {
                    return;
                }
                assert!(Instant::now() < deadline, "the provincial node: {v:#}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    wait_handled(19).await;
    converge(1, ports[1]).await;
    converge(2, ports[2]).await;

    // An update, and teacher 3 (with no assignment left) moved to school 2.
    send(
        AssignmentDeleted,
        &event(
            AssignmentDeleted,
            300,
            2,
            Some(2),
            1,
            json!({"assignmentId": id(203)}),
        ),
    );
    send(
        TeacherUpdated,
        &event(
            TeacherUpdated,
            301,
            2,
            Some(2),
            1,
            teacher_fields(id(1), "Nguyễn Thị Hương (Toán)"),
        ),
    );
    send(
        TeacherUpdated,
        &event(
            TeacherUpdated,
            302,
            3,
            Some(3),
            2,
            teacher_fields(id(3), "Lê Thị Lan"),
        ),
    );
    producer.flush(Duration::from_secs(10)).unwrap();
    wait_handled(22).await;
    converge(1, ports[1]).await;
    converge(2, ports[2]).await;
    let (_, t) = get(ports[2], format!("/api/teachers/{}", id(3))).await;
    assert_eq!(t["schoolId"], school(2).to_string());
    assert_eq!(
        get(ports[1], format!("/api/teachers/{}", id(3))).await.0,
        404
    );
    for port in &ports[1..] {
        let (_, v) = get(*port, "/api/sync/status".into()).await;
        assert_eq!(v["upstream"]["connected"], true, "{v:#}");
        assert_eq!(v["stale"], false, "{v:#}");
        assert!(v["entities"]["teachers"].as_u64().unwrap() <= 4, "{v:#}");
    }
}

/// Removes what differs between nodes by design.
fn strip_sync(v: &mut Value) {
    match v {
        Value::Object(m) => {
            m.remove("lastSyncedAt");
            m.remove("syncSource");
            m.values_mut().for_each(strip_sync);
        }
        Value::Array(a) => a.iter_mut().for_each(strip_sync),
        _ => {}
    }
}

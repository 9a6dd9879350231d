//! Ingest throughput and event-to-visible latency against a real broker.
//!
//! Run: `cargo bench --bench ingest` with `tansu` on PATH or in
//! `~/.cargo/bin` (or `EMIS_EDGE_TANSU=/path/to/tansu`);
//! `cargo bench --bench ingest -- --broker-only` only starts the broker and
//! creates the topics. It starts tansu with in-memory storage on a free
//! loopback port (`test_support::Tansu`; the node is never restarted here,
//! so tansu's fetch-inside-a-batch fault does not apply), then:
//!
//! 1. produces `EMIS_BENCH_EVENTS` (default 300,000) events — teachers,
//!    classes and assignments of realistic size, over 3 partitions per topic —
//!    *before* the node starts; times a bare consumer reading them all (the
//!    same-run ceiling), then starts a node on an empty durable store and
//!    times until every event is applied (sustained ingest rate), with the
//!    node's batches (count, mean size), the peak resident memory of the
//!    process while it caught up and the bytes it wrote to disk;
//!    `EMIS_BENCH_CACHE_MB` sets `store.cache_mb`, `EMIS_BENCH_BATCH`
//!    `kafka.batch_max_messages`;
//! 2. produces class updates at 1,000 events/s for 10 s and measures, for
//!    each, the time from handing it to the producer until
//!    `GET /api/classes/{id}` shows it over HTTP.
//!
//! It allocates with mimalloc, as the `emis-edge` binary does.

use std::sync::Arc;
use std::time::{Duration, Instant};

use emis_edge::clock::SystemClock;
use emis_edge::config::Config;
use emis_edge::domain::EventType;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::ClientConfig;
use serde_json::json;
use test_support::{Options, Tansu};
use uuid::Uuid;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn uid(kind: u64, n: u64) -> Uuid {
    let mixed = (n as u128).wrapping_mul(0x9E37_79B9_7F4A_7C15_F39C_C060_5CED_C835)
        ^ ((kind as u128) << 120);
    Uuid::from_u128(mixed)
}

fn envelope(t: EventType, n: u64, version: u64) -> serde_json::Value {
    json!({
        "eventId": uid(9, n),
        "eventType": t.name(),
        "timestamp": "2025-10-26T10:00:00Z",
        "version": version,
        "schoolId": uid(4, n / 3000),
    })
}

fn payload(n: u64, version: u64) -> (EventType, Vec<u8>) {
    let mut v;
    let t = match n % 12 {
        0 => {
            v = envelope(EventType::TeacherCreated, n, version);
            v["teacherId"] = json!(uid(1, n));
            v["fullName"] = json!("Nguyễn Thị Hương");
            v["employeeCode"] = json!(format!("GV-{n:08}"));
            v["email"] = json!(format!("giaovien.{n}@truong.edu.vn"));
            v["phone"] = json!("0912345678");
            v["subjects"] = json!(["Toán", "Vật lý"]);
            EventType::TeacherCreated
        }
        1 => {
            v = envelope(EventType::ClassCreated, n, version);
            v["classId"] = json!(uid(2, n));
            v["className"] = json!("Lớp 10A1");
            v["grade"] = json!("Khối 10");
            v["academicYear"] = json!("2024-2025");
            v["totalStudents"] = json!(45);
            v["homeroomTeacherId"] = json!(uid(1, n - 1));
            EventType::ClassCreated
        }
        _ => {
            v = envelope(EventType::AssignmentCreated, n, version);
            v["assignmentId"] = json!(uid(3, n));
            v["teacherId"] = json!(uid(1, n - n % 12));
            v["classId"] = json!(uid(2, n - n % 12 + 1));
            v["subject"] = json!("Toán");
            v["role"] = json!("subject");
            v["academicYear"] = json!("2024-2025");
            EventType::AssignmentCreated
        }
    };
    (t, v.to_string().into_bytes())
}

fn producer(brokers: &str, linger_ms: &str) -> BaseProducer {
    ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("linger.ms", linger_ms)
        .set("queue.buffering.max.messages", "1000000")
        .create()
        .unwrap()
}

fn send(p: &BaseProducer, t: EventType, partition: i32, raw: &[u8]) {
    loop {
        match p.send(
            BaseRecord::<(), [u8]>::to(t.name())
                .partition(partition)
                .payload(raw),
        ) {
            Ok(()) => return,
            Err(_) => {
                p.poll(Duration::from_millis(5));
            }
        }
    }
}

/// The bytes this process has caused to be written to storage
/// (`write_bytes` of `/proc/self/io`).
fn written_bytes() -> u64 {
    let io = std::fs::read_to_string("/proc/self/io").unwrap();
    io.lines()
        .find_map(|l| l.strip_prefix("write_bytes: "))
        .and_then(|v| v.parse().ok())
        .expect("write_bytes in /proc/self/io")
}

/// This process's resident memory (`VmRSS`), in KiB.
fn resident_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/self/status")
}

/// The ceiling of step 1: a bare consumer (the node's fetch wait, no
/// group, every partition from its start) that only counts the backlog.
fn bare_consume(brokers: &str, events: u64) -> Duration {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::{Offset, TopicPartitionList};
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "bench-bare")
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", "25")
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    for t in EventType::ALL {
        for p in 0..3 {
            tpl.add_partition_offset(t.name(), p, Offset::Beginning)
                .unwrap();
        }
    }
    c.assign(&tpl).unwrap();
    let started = Instant::now();
    let mut n = 0;
    while n < events {
        if let Some(m) = c.poll(Duration::from_millis(100)) {
            m.unwrap();
            n += 1;
        }
        assert!(
            started.elapsed() < Duration::from_secs(600),
            "bare consumer stalled at {n}"
        );
    }
    started.elapsed()
}

fn applied(node: &emis_edge::node::RunningNode) -> u64 {
    let stats = node.state.store.read().unwrap().stats().unwrap();
    ["events_applied", "events_stale"]
        .iter()
        .map(|k| stats.counters.get(*k).copied().unwrap_or(0))
        .sum()
}

fn main() {
    if std::env::args().any(|a| a == "--list" || a == "--test") {
        return; // `cargo test --benches` / `--list`: nothing to run quickly
    }
    let events: u64 = std::env::var("EMIS_BENCH_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300_000);
    let bin = Tansu::binary().expect("tansu on PATH, in ~/.cargo/bin or EMIS_EDGE_TANSU");
    let tansu = Tansu::start(&bin, &Options::default()).unwrap();
    let brokers = tansu.brokers().to_owned();
    eprintln!("tansu on {brokers}: the nine topics, 3 partitions each");
    if std::env::args().any(|a| a == "--broker-only") {
        return; // the startup path alone: tansu started, topics created
    }
    let rt = tokio::runtime::Runtime::new().unwrap();

    // 1. Sustained ingest from a backlog.
    let p = producer(&brokers, "20");
    let started = Instant::now();
    for n in 0..events {
        let (t, raw) = payload(n, 1);
        send(&p, t, (n % 3) as i32, &raw);
    }
    p.flush(Duration::from_secs(120)).unwrap();
    let produce = started.elapsed();
    eprintln!(
        "produced {events} events in {produce:.2?} ({:.0}/s)",
        events as f64 / produce.as_secs_f64()
    );

    let bare = bare_consume(&brokers, events);
    eprintln!(
        "a bare consumer read them in {bare:.2?} ({:.0}/s)",
        events as f64 / bare.as_secs_f64()
    );

    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::default();
    config.node.data_dir = dir.path().to_owned();
    config.http.listen = "127.0.0.1:0".parse().unwrap();
    config.kafka.brokers = brokers.clone();
    config.schools.all = true;
    if let Some(mb) = std::env::var("EMIS_BENCH_CACHE_MB")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        config.store.cache_mb = mb;
    }
    if let Some(n) = std::env::var("EMIS_BENCH_BATCH")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        config.kafka.batch_max_messages = n;
    }
    let written = written_bytes();
    let resident_before = resident_kib();
    for (key, var) in [("fetch.wait.max.ms", "EMIS_BENCH_FETCH_WAIT_MS")] {
        if let Ok(v) = std::env::var(var) {
            config.kafka.properties.insert(key.into(), v);
        }
    }
    let node = rt
        .block_on(emis_edge::node::start(config, Arc::new(SystemClock)))
        .unwrap();
    let started = Instant::now();
    let mut first = None;
    let mut resident_peak = resident_before;
    loop {
        resident_peak = resident_peak.max(resident_kib());
        let n = applied(&node);
        if n > 0 && first.is_none() {
            first = Some((Instant::now(), n));
        }
        if n >= events {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
        assert!(
            started.elapsed() < Duration::from_secs(600),
            "ingest stalled at {n}"
        );
    }
    let took = started.elapsed();
    let (first_at, first_n) = first.expect("something was applied");
    eprintln!(
        "ingested {events} events into a durable store in {took:.2?}: {:.0} events/s overall \
         (node start and partition assignment included), {:.0} events/s after the first commit",
        events as f64 / took.as_secs_f64(),
        (events - first_n) as f64 / first_at.elapsed().as_secs_f64()
    );
    eprintln!(
        "ingest / bare consumer: {:.2}",
        bare.as_secs_f64() / took.as_secs_f64()
    );
    eprintln!(
        "resident memory: {} MiB before the node started, at most {} MiB while it caught up",
        resident_before / 1024,
        resident_peak / 1024
    );
    let written = written_bytes() - written;
    // The last batch is counted in /metrics just after its commit.
    let (batches, messages) = loop {
        let metrics = rt
            .block_on(async {
                reqwest::get(format!("http://{}/metrics", node.addr))
                    .await?
                    .text()
                    .await
            })
            .unwrap();
        let metric = |name: &str| -> f64 {
            metrics
                .lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("{name} in /metrics"))
        };
        let messages = metric("emis_edge_batch_size_messages_sum");
        if messages >= events as f64 {
            break (metric("emis_edge_batch_size_messages_count"), messages);
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    eprintln!(
        "{batches} batches of {:.0} messages on average",
        messages / batches
    );
    eprintln!(
        "written to disk while ingesting: {:.0} MiB ({:.0} bytes/event)",
        written as f64 / (1 << 20) as f64,
        written as f64 / events as f64
    );

    // 2. Event-to-visible latency at 1,000 events/s.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(Uuid, Instant)>();
    let brokers2 = brokers.clone();
    let producer_thread = std::thread::spawn(move || {
        let p = producer(&brokers2, "0");
        let start = Instant::now();
        for i in 0..10_000u64 {
            let due = start + Duration::from_micros(i * 1000);
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            let n = 12 * (events + i) + 1; // a class event
            let (t, raw) = payload(n, 2);
            let sent = Instant::now();
            send(&p, t, (i % 3) as i32, &raw);
            p.poll(Duration::ZERO);
            tx.send((uid(2, n), sent)).unwrap();
        }
        p.flush(Duration::from_secs(30)).unwrap();
    });
    let addr = node.addr;
    let mut latencies = rt.block_on(async move {
        let http = reqwest::Client::new();
        let mut out = Vec::new();
        while let Some((id, sent)) = rx.recv().await {
            let url = format!("http://{addr}/api/classes/{id}");
            loop {
                let r = http.get(&url).send().await.unwrap();
                if r.status().is_success() {
                    out.push(sent.elapsed());
                    break;
                }
                tokio::time::sleep(Duration::from_micros(200)).await;
            }
        }
        out
    });
    producer_thread.join().unwrap();
    latencies.sort();
    let q = |f: f64| latencies[((latencies.len() as f64 * f) as usize).min(latencies.len() - 1)];
    eprintln!(
        "event-to-visible over HTTP at 1000 events/s, {} events: p50 {:.1?}  p90 {:.1?}  p99 {:.1?}  max {:.1?}",
        latencies.len(),
        q(0.5),
        q(0.9),
        q(0.99),
        latencies.last().unwrap()
    );
    rt.block_on(node.stop()).unwrap();
}

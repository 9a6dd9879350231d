//! Faults of the disk under the store (issue #6): a disk that fills up
//! while the node runs (a real, size-limited tmpfs), and a store file that
//! is damaged or another program's at start. The node keeps answering,
//! loses and doubles nothing, and tells the operator what happened. And
//! faults that are not the disk's: a stored record that no longer decodes
//! (one event is quarantined, not the stream), and a worker that dies (the
//! node stops and fails, so that systemd restarts it).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use emis_edge::domain::{EventType, SyncSource};
use emis_edge::store::{Store, StoreError, StoreOptions};
use serde_json::{json, Value};

use crate::kafka::{counter, event, handled, promtool_check, wait_status_within, Kafka};
use crate::support::*;

const BIN: &str = env!("CARGO_BIN_EXE_emis-edge");

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.starts_with(b"0\n"))
}

fn sh(script: &str) -> Result<(), String> {
    let out = Command::new("sh").arg("-c").arg(script).output().unwrap();
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "`{script}` failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// A tmpfs of a given size, mounted on a fresh directory and unmounted
/// (lazily, so also after a failed test) when dropped.
struct Tmpfs {
    path: PathBuf,
    _dir: tempfile::TempDir,
}

impl Tmpfs {
    /// Mounting needs root: CI runs as root and must run the test; without
    /// root (or where mounting is not allowed) the test fails, unless the
    /// developer opted out with `EMIS_EDGE_SKIP_TMPFS=1`.
    fn mount(size: &str) -> Option<Tmpfs> {
        let skip = "EMIS_EDGE_SKIP_TMPFS";
        if !is_root() {
            let why = "run the tests as root: the disk-full test mounts a small tmpfs";
            missing_tool("root", skip, why);
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data");
        std::fs::create_dir(&path).unwrap();
        if let Err(e) = sh(&format!(
            "mount -t tmpfs -o size={size},mode=0755 emis-edge-test {}",
            path.display()
        )) {
            missing_tool("a tmpfs mount", skip, &e);
            return None;
        }
        Some(Tmpfs { path, _dir: dir })
    }

    fn resize(&self, size: &str) {
        sh(&format!(
            "mount -o remount,size={size} {}",
            self.path.display()
        ))
        .unwrap();
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = sh(&format!("umount -l {}", self.path.display()));
    }
}

/// A teacher as large as the contract allows (64 subjects of 100
/// characters): about 7 KB an event, 9 KB stored.
fn big_teacher(n: u128) -> Value {
    let subjects: Vec<String> = (0..64)
        .map(|i| format!("{i:02} {}", "Toán".repeat(24)))
        .collect();
    let mut fields = teacher_fields(id(n), &format!("Giáo viên {n}"));
    fields["subjects"] = json!(subjects);
    fields
}

fn offset_of(v: &Value, topic: &str) -> i64 {
    v["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["topic"] == topic)
        .map(|p| p["offset"].as_i64().unwrap_or(0))
        .sum()
}

/// Runs the CLI against the node (or the store) named by `env`.
async fn cli(args: &[&str], env: Vec<(String, String)>) -> (i32, String, String) {
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        let out = Command::new(BIN)
            .args(&args)
            .envs(env)
            .env_remove("RUST_LOG")
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_stops_intake_not_reads_and_the_node_recovers_by_itself() {
    // A fresh store is 72 KiB; 2 MiB hold about 200 of the big teachers,
    // so the node fills the disk part way through the second wave.
    let Some(disk) = Tmpfs::mount("2m") else {
        return;
    };
    const SMALL: u128 = 20;
    const BIG: u128 = 400;
    let topic = EventType::TeacherCreated;
    let kafka = Kafka::start(1);
    let data_dir = disk.path.clone();
    let node = TestNode::start(|c| {
        kafka.configure(c);
        c.node.data_dir = data_dir;
        c.kafka.batch_max_messages = 20;
    })
    .await;

    // Teachers stored while there is space.
    let small: Vec<Value> = (0..SMALL)
        .map(|n| {
            event(
                topic,
                n,
                1,
                Some(1),
                1,
                teacher_fields(id(n), "Nguyễn Thị Hương"),
            )
        })
        .collect();
    kafka.send(topic, &small);
    let limit = Duration::from_secs(60);
    wait_status_within(&node, "the small teachers", limit, |v| {
        counter(v, "events_applied") == SMALL as u64
    })
    .await;
    assert_eq!(node.get("/health/ready").await.0, 200);

    // Lookups all the while the writes fail and the store is reopened:
    // a reader that meets the handle a writer's I/O error poisoned waits
    // for the writer's reopen and reads again; never a 500.
    let reading = tokio_util::sync::CancellationToken::new();
    let reader = {
        let (http, url, reading) = (
            node.http.clone(),
            node.url(&format!("/api/teachers/{}", id(0))),
            reading.clone(),
        );
        tokio::spawn(async move {
            let mut seen = std::collections::BTreeMap::<u16, u64>::new();
            while !reading.is_cancelled() {
                let r = http.get(&url).send().await.unwrap();
                let status = r.status().as_u16();
                let body = r.text().await.unwrap();
                assert!(
                    status == 200 || status == 503,
                    "a lookup while the disk is full: {status} {body}"
                );
                *seen.entry(status).or_default() += 1;
            }
            seen
        })
    };

    // More than the disk holds.
    let big: Vec<Vec<u8>> = (SMALL..SMALL + BIG)
        .map(|n| {
            event(topic, n, 1, Some(1), 1, big_teacher(n))
                .to_string()
                .into_bytes()
        })
        .collect();
    kafka.send_raw(topic.name(), 0, &big);
    // The same batch failing again and again: the disk is full for good.
    let v = wait_status_within(&node, "store writes failing", limit, |v| {
        v["store"]["degraded"] == true && v["store"]["writeFailures"].as_u64() >= Some(3)
    })
    .await;
    let error = v["storeError"].as_str().unwrap();
    assert!(error.contains("No space left on device"), "{v:#}");
    assert_eq!(v["store"]["error"], v["storeError"]);
    assert!(v["store"]["failingSince"].is_string(), "{v:#}");
    assert!(v["store"]["reopens"].as_u64() >= Some(1), "{v:#}");
    // Nothing of a failed batch is kept: the stored offset is exactly where
    // the committed data ends.
    let applied = counter(&v, "events_applied");
    assert!(
        applied > SMALL as u64 && applied < (SMALL + BIG) as u64,
        "{v:#}"
    );
    assert_eq!(handled(&v), applied);
    assert_eq!(offset_of(&v, topic.name()), applied as i64, "{v:#}");
    assert_eq!(v["entities"]["teachers"], applied);

    // Reads go on; readiness says no, and why.
    for n in 0..SMALL {
        let (status, detail) = node.get_json(&format!("/api/teachers/{}", id(n))).await;
        assert_eq!(status, 200, "{detail}");
        assert_eq!(detail["fullName"], "Nguyễn Thị Hương");
    }
    let (status, detail) = node.get_json(&format!("/api/teachers/{}", id(SMALL))).await;
    assert_eq!(
        (status, &detail["subjects"][63]),
        (200, &json!(format!("63 {}", "Toán".repeat(24))))
    );
    let (status, problem) = node.get_json("/health/ready").await;
    assert_eq!(status, 503);
    assert!(
        problem["detail"]
            .as_str()
            .unwrap()
            .contains("store cannot be written"),
        "{problem}"
    );
    let text = metrics(&node).await;
    assert_eq!(metric(&text, "emis_edge_store_degraded"), 1.0);
    assert!(metric(&text, "emis_edge_store_write_failures_total") >= 3.0);
    assert!(metric(&text, "emis_edge_store_reopens_total") >= 1.0);
    assert_eq!(metric(&text, "emis_edge_ready"), 0.0);
    promtool_check(&text);

    // The command line shows it too.
    let env = vec![(
        "EMIS_EDGE__HTTP__LISTEN".to_owned(),
        node.node.addr.to_string(),
    )];
    let (code, out, err) = cli(&["status", "--config", "/dev/null", "--json"], env.clone()).await;
    assert_eq!(code, 0, "{err}");
    let doc: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(doc["store"]["degraded"], true, "{doc:#}");
    let (code, out, err) = cli(&["status", "--config", "/dev/null"], env).await;
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("STORE ERROR") && out.contains("No space left on device"),
        "{out}"
    );

    // An import meanwhile fails cleanly (and changes nothing).
    let mut file = Vec::new();
    for n in 0..100u128 {
        let line = merge(
            json!({"kind": "teacher", "schoolId": school(3), "version": 1,
                   "timestamp": rfc3339(T0)}),
            big_teacher(10_000 + n),
        );
        file.extend(line.to_string().into_bytes());
        file.push(b'\n');
    }
    file.extend(
        json!({"kind": "end", "schoolId": school(3), "count": 100, "asOf": rfc3339(T0)})
            .to_string()
            .into_bytes(),
    );
    let r = node
        .http
        .post(node.url("/api/admin/import"))
        .body(file)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 500);
    let problem: Value = r.json().await.unwrap();
    assert_eq!(problem["type"], "urn:emis-edge:problem:import-failed");
    assert!(
        problem["detail"]
            .as_str()
            .unwrap()
            .contains("No space left on device"),
        "{problem}"
    );

    reading.cancel();
    let seen = reader.await.unwrap();
    eprintln!("lookups while the disk was full, by status: {seen:?}");
    assert!(seen.get(&200).copied().unwrap_or(0) > 0, "{seen:?}");

    // Space is back: the node resumes by itself, with nothing lost or doubled.
    disk.resize("64m");
    let v = wait_status_within(
        &node,
        "every event applied",
        Duration::from_secs(120),
        |v| handled(v) == (SMALL + BIG) as u64 && v["store"]["degraded"] == false,
    )
    .await;
    assert_eq!(counter(&v, "events_applied"), (SMALL + BIG) as u64, "{v:#}");
    assert_eq!(
        counter(&v, "events_stale"),
        0,
        "an event was applied twice: {v:#}"
    );
    assert_eq!(v["entities"]["teachers"], (SMALL + BIG) as u64, "{v:#}");
    assert_eq!(offset_of(&v, topic.name()), (SMALL + BIG) as i64, "{v:#}");
    assert_eq!(
        counter(&v, "resync_applied"),
        0,
        "the failed import left data"
    );
    assert!(
        v["storeError"].is_null() && v["store"]["failingSince"].is_null(),
        "{v:#}"
    );
    assert!(v["store"]["writeFailures"].as_u64() >= Some(4), "{v:#}");
    assert_eq!(node.get("/health/ready").await.0, 200);
    assert_eq!(
        node.get(&format!("/api/teachers/{}", id(SMALL + BIG - 1)))
            .await
            .0,
        200
    );
    let text = metrics(&node).await;
    assert_eq!(metric(&text, "emis_edge_store_degraded"), 0.0);
    assert_eq!(metric(&text, "emis_edge_ready"), 1.0);
    node.node.stop().await.unwrap();
}

#[test]
fn a_failed_write_marks_the_store_degraded_until_a_write_succeeds() {
    let store = Store::open_in_memory().unwrap();
    assert!(!store.health().degraded());
    let change = parse(
        EventType::ClassCreated,
        &merge(
            envelope(EventType::ClassCreated, id(1), T0, None, school(1)),
            class_fields(id(7), "Lớp 10A1"),
        ),
    );
    store.fail_next_commit();
    let failed = store.apply_batch(&batch(vec![change.clone()]), T0, SyncSource::Kafka);
    assert!(matches!(failed, Err(StoreError::InjectedFault)));
    let health = store.health();
    assert!(health.degraded());
    assert_eq!(health.failing_since, Some(T0));
    assert_eq!(health.write_failures, 1);
    assert!(health.error.unwrap().contains("injected"));
    store
        .apply_batch(&batch(vec![change]), T0 + SEC, SyncSource::Kafka)
        .unwrap();
    let health = store.health();
    assert!(!health.degraded() && health.failing_since.is_none());
    assert_eq!(
        health.write_failures, 1,
        "failures are counted, not forgotten"
    );
}

// ---- corrupt or foreign store files at start ------------------------------

/// A real store with some data: what the damaged files are made from.
fn store_bytes() -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.redb");
    let store = Store::open(&path, &StoreOptions::default()).unwrap();
    let changes = (0..2000u128)
        .map(|n| {
            let t = EventType::ClassCreated;
            let env = envelope(t, id(40_000 + n), T0, Some(1), school(1));
            parse(t, &merge(env, class_fields(id(n), "Lớp 10A1")))
        })
        .collect();
    store
        .apply_batch(&batch(changes), T0, SyncSource::Kafka)
        .unwrap();
    drop(store);
    std::fs::read(path).unwrap()
}

/// Runs the binary with a deadline: a `serve` that wrongly starts is
/// killed and reported instead of hanging the test.
fn run(args: &[&str], data_dir: &Path) -> (i32, String) {
    // Nothing answers there: the commands open the store themselves.
    let nobody = ReservedPort::new();
    let mut child = Command::new(BIN)
        .args(args)
        .env_remove("RUST_LOG")
        .env("EMIS_EDGE__NODE__DATA_DIR", data_dir)
        .env("EMIS_EDGE__SCHOOLS__ALL", "true")
        .env("EMIS_EDGE__HTTP__LISTEN", nobody.listen())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let code = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status.code().unwrap_or(-1);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("{args:?} did not exit on a damaged store");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    (code, stderr)
}

#[test]
fn a_damaged_or_foreign_store_file_is_refused_unchanged_with_what_to_do() {
    let good = store_bytes();
    let mut random = vec![0u8; 64 * 1024];
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for b in &mut random {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    let mut sqlite = b"SQLite format 3\0".to_vec();
    sqlite.resize(8192, 0);
    let mut png = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR".to_vec();
    png.resize(3000, 7);
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("truncated", good[..good.len() / 2].to_vec(), "truncated"),
        ("cut inside its header", good[..100].to_vec(), "truncated"),
        ("random bytes", random, "not a redb file"),
        (
            "an SQLite database",
            sqlite,
            "not a redb file: an SQLite database",
        ),
        ("a PNG image", png, "not a redb file: a PNG image"),
        ("zero-length", Vec::new(), "empty (0 bytes)"),
        (
            "text",
            b"this is not a redb file at all, it is a text file".to_vec(),
            "not a redb file: unknown, starting with bytes 74 68 69 73",
        ),
        (
            "export file",
            b"{\"kind\":\"end\"}\n".to_vec(),
            "perhaps an `emis-edge export` file",
        ),
    ];
    let out_dir = tempfile::tempdir().unwrap();
    let out = out_dir.path().join("export.ndjson");
    let snapshot = out_dir.path().join("import.ndjson");
    std::fs::write(&snapshot, "").unwrap();
    for (what, bytes, reason) in cases {
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().join(emis_edge::config::STORE_FILE);
        std::fs::write(&store, &bytes).unwrap();
        for args in [
            vec!["serve", "--config", "/dev/null"],
            vec!["status", "--config", "/dev/null"],
            vec![
                "export",
                "--config",
                "/dev/null",
                "--out",
                out.to_str().unwrap(),
            ],
            vec![
                "import",
                "--config",
                "/dev/null",
                snapshot.to_str().unwrap(),
            ],
        ] {
            let (code, stderr) = run(&args, dir.path());
            let cmd = args[0];
            assert_eq!(code, 1, "{cmd} on a {what} store: {stderr}");
            for needle in [
                store.to_str().unwrap(),
                reason,
                "was not changed",
                "Move it aside",
                "`emis-edge import`",
                "resync",
            ] {
                assert!(
                    stderr.contains(needle),
                    "{cmd} on a {what} store: {needle:?} missing from: {stderr}"
                );
            }
            assert!(
                std::fs::read(&store).unwrap() == bytes,
                "{cmd} changed the {what} store file"
            );
            let files: Vec<_> = std::fs::read_dir(dir.path())
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect();
            assert_eq!(files.len(), 1, "{cmd} on a {what} store left {files:?}");
        }
    }
}

#[test]
fn a_new_store_appears_whole_and_a_crashed_one_is_repaired_not_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(emis_edge::config::STORE_FILE);
    // What a crash while creating the store leaves behind.
    std::fs::write(dir.path().join("emis-edge.redb.new"), b"half a store").unwrap();
    let store = Store::open(&path, &StoreOptions::default()).unwrap();
    let files: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(files, vec![std::ffi::OsString::from("emis-edge.redb")]);
    let change = parse(
        EventType::ClassCreated,
        &merge(
            envelope(EventType::ClassCreated, id(1), T0, None, school(1)),
            class_fields(id(7), "Lớp 10A1"),
        ),
    );
    store
        .apply_batch(&batch(vec![change]), T0, SyncSource::Kafka)
        .unwrap();
    // The file as a power loss would leave it: written by a node that is
    // still running (not closed cleanly). It must be repaired, not refused.
    let crashed = dir.path().join("crashed.redb");
    std::fs::copy(&path, &crashed).unwrap();
    drop(store);
    let store = Store::open(&crashed, &StoreOptions::default()).unwrap();
    let r = store.read().unwrap();
    assert_eq!(r.class(id(7)).unwrap().unwrap().data.class_name, "Lớp 10A1");
}

// ---- faults that are not the disk's ----------------------------------------

/// A data directory whose store holds class 2 damaged (an unknown value
/// format): what is stored for it does not decode.
fn a_store_with_class_2_damaged() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(emis_edge::config::STORE_FILE);
    drop(Store::open(&path, &StoreOptions::default()).unwrap());
    let db = redb::Database::open(&path).unwrap();
    let txn = db.begin_write().unwrap();
    {
        let classes: redb::TableDefinition<u128, &[u8]> = redb::TableDefinition::new("classes");
        let mut table = txn.open_table(classes).unwrap();
        table
            .insert(id(2).as_u128(), b"\x7fdamaged".as_slice())
            .unwrap();
    }
    txn.commit().unwrap();
    dir
}

/// A change the store can never apply (what it holds for that entity does
/// not decode, so every retry fails the same way) is quarantined as a dead
/// letter with its reason, and the partition moves on: the events around it
/// are applied, the offsets pass it, and the store is not reported failing.
/// Before, the whole batch was retried forever as "store cannot be written".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_the_store_cannot_apply_is_dead_lettered_and_the_partition_moves_on() {
    let dir = a_store_with_class_2_damaged();
    let kafka = Kafka::start(1);
    let node = TestNode::start_in(dir, |c| kafka.configure(c)).await;
    let t = EventType::ClassCreated;
    let class = |n: u128| event(t, n, 1, Some(1), 1, class_fields(id(n), "Lớp 10A1"));
    kafka.send(t, &[class(1), class(2), class(3)]);
    let v = wait_status_within(&node, "3 events handled", Duration::from_secs(30), |v| {
        handled(v) == 3
    })
    .await;
    assert_eq!(counter(&v, "events_applied"), 2, "{v:#}");
    assert_eq!(counter(&v, "events_dead_lettered"), 1, "{v:#}");
    assert_eq!(offset_of(&v, t.name()), 3, "{v:#}");
    assert_eq!(v["store"]["degraded"], false, "{v:#}");
    assert_eq!(v["store"]["writeFailures"], 0, "{v:#}");
    assert_eq!(node.get("/health/ready").await.0, 200);
    for n in [1, 3] {
        assert_eq!(node.get(&format!("/api/classes/{}", id(n))).await.0, 200);
    }
    let (_, letters) = node.get_json("/api/sync/dead-letters").await;
    let letter = &letters["items"][0];
    assert_eq!(letter["offset"], 1, "{letters:#}");
    assert_eq!(letter["topic"], t.name());
    let reason = letter["reason"].as_str().unwrap();
    assert!(
        reason.starts_with(&format!(
            "the store cannot apply this change: what is stored for class {} is corrupt",
            id(2)
        )),
        "{reason}"
    );
    // The payload is the event, as parsed.
    let raw: Value = serde_json::from_str(letter["raw"].as_str().unwrap()).unwrap();
    assert_eq!(raw["classId"], json!(id(2)), "{raw}");
    // The stream goes on.
    kafka.send(t, &[class(4)]);
    wait_status_within(&node, "the next event", Duration::from_secs(30), |v| {
        counter(v, "events_applied") == 3
    })
    .await;
    node.node.stop().await.unwrap();
}

/// The same for a change of a school the node does not serve (a transfer
/// out): what is stored for the entity does not decode, so it is
/// quarantined too, and the partition moves on instead of stalling.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transfer_the_store_cannot_apply_is_dead_lettered_and_the_partition_moves_on() {
    let dir = a_store_with_class_2_damaged();
    let kafka = Kafka::start(1);
    let node = TestNode::start_in(dir, |c| {
        kafka.configure(c);
        c.schools.ids = vec![school(1)];
    })
    .await;
    let t = EventType::ClassCreated;
    let class = |n: u128, school_n: u128| {
        event(t, n, 1, Some(1), school_n, class_fields(id(n), "Lớp 10A1"))
    };
    // Class 2 moves to school 9, which this node does not serve.
    kafka.send(t, &[class(1, 1), class(2, 9), class(3, 1)]);
    let v = wait_status_within(&node, "3 events handled", Duration::from_secs(30), |v| {
        counter(v, "events_applied") == 2 && counter(v, "events_dead_lettered") == 1
    })
    .await;
    assert_eq!(offset_of(&v, t.name()), 3, "{v:#}");
    assert_eq!(v["store"]["degraded"], false, "{v:#}");
    assert_eq!(v["store"]["writeFailures"], 0, "{v:#}");
    let (_, letters) = node.get_json("/api/sync/dead-letters").await;
    let letter = &letters["items"][0];
    assert_eq!(letter["offset"], 1, "{letters:#}");
    let reason = letter["reason"].as_str().unwrap();
    assert!(
        reason.starts_with(&format!(
            "the store cannot apply this change: what is stored for class {} is corrupt",
            id(2)
        )),
        "{reason}"
    );
    node.node.stop().await.unwrap();
}

/// A dead worker does not look healthy: an ingest step that panics (a
/// test hook) makes the worker `dead` in status and metrics, readiness
/// says why, and the node, run as `serve` runs it, stops and fails; the
/// binary then exits 1 and systemd, whose unit restarts on failure,
/// starts it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_ingest_step_stops_the_node_with_an_error_for_systemd_to_restart() {
    let kafka = Kafka::start(1);
    let node = TestNode::start(|c| kafka.configure(c)).await;
    wait_status_within(&node, "caught up", Duration::from_secs(30), |v| {
        v["caughtUp"] == true
    })
    .await;
    assert_eq!(node.get("/health/ready").await.0, 200);
    node.node
        .state
        .faults
        .panic_ingest
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let v = wait_status_within(&node, "a dead worker", Duration::from_secs(30), |v| {
        v["workers"]
            .as_array()
            .unwrap()
            .iter()
            .any(|w| w["name"] == "ingest" && w["state"] == "dead")
    })
    .await;
    let ingest = v["workers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["name"] == "ingest")
        .unwrap();
    assert_eq!(
        ingest["lastError"],
        "panicked: injected panic in the ingest step (test hook)"
    );
    let (status, problem) = node.get_json("/health/ready").await;
    assert_eq!(status, 503);
    assert!(
        problem["detail"]
            .as_str()
            .unwrap()
            .starts_with("the ingest worker died (panicked: injected panic"),
        "{problem}"
    );
    let text = metrics(&node).await;
    assert_eq!(
        metric(&text, "emis_edge_worker_dead{worker=\"ingest\"}"),
        1.0
    );
    assert_eq!(metric(&text, "emis_edge_ready"), 0.0);

    // As `serve` runs it: no shutdown signal, yet it ends, with an error.
    let TestNode { node, .. } = node;
    let ended = tokio::time::timeout(
        Duration::from_secs(30),
        emis_edge::node::run(node, std::future::pending()),
    )
    .await
    .expect("a node with a dead worker kept running");
    let error = format!("{:#}", ended.expect_err("a dead worker is a failure"));
    assert!(
        error.starts_with(
            "exiting so that the service manager restarts the node: the ingest worker died"
        ),
        "{error}"
    );
    // The unit restarts it on a failure exit, but not on a configuration
    // error (exit 2), which a restart would not fix.
    let unit = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/packaging/systemd/emis-edge.service"
    ))
    .unwrap();
    let lines: Vec<&str> = unit.lines().map(str::trim).collect();
    for setting in ["Restart=on-failure", "RestartPreventExitStatus=2"] {
        assert!(lines.contains(&setting), "{setting} missing from the unit");
    }
}

//! The newcomer's path: `emis-edge demo` on a machine with nothing
//! installed, and `emis-edge gen`, the data generator the load scripts and
//! benchmarks use — its snapshot file imports, its events replicate.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use emis_edge::gen::{Province, Spec};
use serde_json::Value;

use crate::follower::normalized;
use crate::kafka::Kafka;
use crate::support::TestNode;

const BIN: &str = env!("CARGO_BIN_EXE_emis-edge");

async fn get_json(url: &str) -> (u16, Value) {
    let r = reqwest::get(url).await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

/// The demo process, killed if the test fails before it stops it.
struct Demo(std::process::Child);

impl Drop for Demo {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_demo_serves_a_generated_province_and_its_trickle_moves_the_status() {
    let mut child = Demo(
        Command::new(BIN)
            .args(["demo", "--scale", "tiny", "--listen", "127.0.0.1:0"])
            .args(["--rate", "200", "--malformed-per-mille", "100"])
            .env_remove("RUST_LOG")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    // The banner names the data and gives curl commands with real ids.
    let mut lines = BufReader::new(child.0.stdout.take().unwrap()).lines();
    let mut banner = String::new();
    let mut teacher_url = None;
    let mut config_path = None;
    for line in lines.by_ref() {
        let line = line.unwrap();
        banner.push_str(&line);
        banner.push('\n');
        let words: Vec<&str> = line.split_whitespace().collect();
        if line.contains("/api/teachers/") && teacher_url.is_none() {
            teacher_url = words.last().map(|w| w.to_string());
        }
        if line.contains("status --config") {
            config_path = words.last().map(|w| w.to_string());
        }
        if line.contains("Ctrl-C stops the demo") {
            break;
        }
    }
    assert!(banner.contains("DEMO"), "{banner}");
    assert!(banner.contains("not for production"), "{banner}");
    let teacher_url = teacher_url.expect("a teacher curl command");
    let base = teacher_url.split("/api/").next().unwrap().to_owned();

    let (status, detail) = get_json(&teacher_url).await;
    assert_eq!(status, 200, "{detail}");
    let name = detail["fullName"].as_str().unwrap();
    assert!(banner.contains(name), "the banner names the teacher");
    let assignments = detail["classAssignments"].as_array().unwrap();
    assert!((8..=12).contains(&assignments.len()), "{detail}");
    assert!(assignments.iter().any(|a| a["role"] == "homeroom"));
    assert!(assignments.iter().all(|a| a["className"].is_string()));

    // Malformed events reach the dead-letter list with their reasons.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (_, dl) = get_json(&format!("{base}/api/sync/dead-letters")).await;
        if dl["items"].as_array().is_some_and(|a| !a.is_empty()) {
            assert!(dl["items"][0]["reason"].as_str().is_some(), "{dl}");
            break;
        }
        assert!(Instant::now() < deadline, "no dead letter: {dl}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The operator's command works against the demo node.
    let config_path = config_path.expect("a status command");
    let out = Command::new(BIN)
        .args(["status", "--config", &config_path])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");

    // Ctrl-C: a clean stop, the temporary store removed.
    let store_dir = std::path::Path::new(&config_path)
        .parent()
        .unwrap()
        .to_owned();
    assert!(store_dir.exists());
    let kill = Command::new("kill")
        .args(["-INT", &child.0.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let status = child.0.wait().unwrap();
    assert!(status.success(), "{status:?}");
    assert!(!store_dir.exists(), "the demo's temporary store is removed");
}

#[test]
fn gen_is_deterministic_per_seed() {
    let dir = tempfile::tempdir().unwrap();
    let run = |seed: &str, name: &str| {
        let path = dir.path().join(name);
        let out = Command::new(BIN)
            .args(["gen", "--scale", "tiny", "--seed", seed, "--out"])
            .arg(&path)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        std::fs::read(path).unwrap()
    };
    let (a, b, c) = (run("7", "a"), run("7", "b"), run("8", "c"));
    assert_eq!(a, b, "same seed, same bytes");
    assert_ne!(a, c);
    let text = String::from_utf8(a).unwrap();
    assert!(text.contains("\"className\":\"Lớp 10A1\""));
    assert!(text.contains("\"grade\":\"Khối 12\""));
    assert!(text.contains("\"academicYear\":\"2024-2025\""));

    let out = Command::new(BIN).args(["gen"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "nothing to do is bad usage");
}

#[test]
fn generated_names_are_vietnamese_in_nfc() {
    use unicode_normalization::UnicodeNormalization;
    let p = Province::new(Spec::scale("demo", 1).unwrap());
    let mut diacritics = 0;
    for t in 0..p.spec.teachers_per_school {
        let name = p.teacher(4, t).full_name;
        assert_eq!(name.nfc().collect::<String>(), name, "NFC: {name}");
        diacritics += usize::from(!name.is_ascii());
    }
    assert!(diacritics > 30, "most names carry diacritics");
    let class = p.class(5, 0).class_name;
    assert_eq!(class.nfc().collect::<String>(), class);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_generated_snapshot_imports_and_generated_events_replicate_alike() {
    let dir = tempfile::tempdir().unwrap();
    let (file, ids) = (dir.path().join("p.ndjson"), dir.path().join("ids"));
    let out = Command::new(BIN)
        .args(["gen", "--scale", "tiny", "--seed", "3", "--out"])
        .arg(&file)
        .arg("--teacher-ids")
        .arg(&ids)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let ids = std::fs::read_to_string(&ids).unwrap();
    let ids: Vec<&str> = ids.lines().collect();
    assert_eq!(ids.len(), 36);

    // Offline import into one store.
    let imported = tempfile::tempdir().unwrap();
    let config = imported.path().join("edge.toml");
    std::fs::write(
        &config,
        format!(
            "[node]\ndata_dir = {:?}\n[schools]\nall = true\n",
            imported.path()
        ),
    )
    .unwrap();
    let out = Command::new(BIN)
        .args(["import", "--config"])
        .arg(&config)
        .arg(&file)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let from_file = TestNode::start_in(imported, |c| c.schools.all = true).await;
    let (_, status) = from_file.get_json("/api/sync/status").await;
    assert_eq!(
        status["store"]["pendingDocuments"], 0,
        "an offline import renders every teacher document"
    );

    // The same seed's events, published over Kafka, into another.
    let kafka = Kafka::start(2);
    let out = Command::new(BIN)
        .args(["gen", "--scale", "tiny", "--seed", "3", "--brokers"])
        .arg(kafka.cluster.bootstrap_servers())
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let from_kafka = TestNode::start(|c| {
        kafka.configure(c);
        c.schools.all = true;
    })
    .await;

    for id in ids {
        let path = format!("/api/teachers/{id}");
        let (status, a) = from_file.get_json(&path).await;
        assert_eq!(status, 200);
        let a = crate::support::without_sync_times(a);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let (status, b) = from_kafka.get_json(&path).await;
            let b = crate::support::without_sync_times(b);
            if status == 200 && b == a {
                break;
            }
            assert!(Instant::now() < deadline, "{b}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    // The node's worker renders what Kafka brought.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, status) = from_kafka.get_json("/api/sync/status").await;
        if status["store"]["pendingDocuments"] == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "{status}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[test]
fn the_demo_never_touches_an_existing_store() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join(emis_edge::config::STORE_FILE);
    std::fs::write(&store, b"a real node's store").unwrap();
    let out = Command::new(BIN)
        .args(["demo", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("already holds a store"));
    assert_eq!(std::fs::read(&store).unwrap(), b"a real node's store");
}

/// `demo --followers N`: school nodes follow the demo's provincial node,
/// and the banner's curl for the first one gets the provincial node's
/// answer.
#[tokio::test(flavor = "multi_thread")]
async fn the_demo_starts_school_nodes_that_follow_the_provincial_node() {
    let mut child = Demo(
        Command::new(BIN)
            .args(["demo", "--scale", "tiny", "--listen", "127.0.0.1:0"])
            .args(["--rate", "0", "--followers", "2"])
            .env_remove("RUST_LOG")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let mut lines = BufReader::new(child.0.stdout.take().unwrap()).lines();
    let (mut province_url, mut school_url, mut in_followers) = (None, None, false);
    let mut banner = String::new();
    for line in lines.by_ref() {
        let line = line.unwrap();
        banner.push_str(&line);
        banner.push('\n');
        let last = line.split_whitespace().last().map(str::to_owned);
        in_followers |= line.contains("school node(s) follow");
        if line.contains("/api/teachers/") && line.contains("curl") {
            if in_followers {
                school_url = school_url.or(last);
            } else {
                province_url = province_url.or(last);
            }
        }
        if line.contains("Ctrl-C stops the demo") {
            break;
        }
    }
    assert!(banner.contains("2 school node(s)"), "{banner}");
    let (province_url, school_url) = (province_url.unwrap(), school_url.unwrap());
    assert_ne!(province_url, school_url);
    let (status, at_school) = get_json(&school_url).await;
    assert_eq!(status, 200, "{at_school}");
    let (_, at_province) = get_json(&province_url).await;
    assert_eq!(normalized(at_school.clone()), normalized(at_province));
    let status_url = school_url.split("/api/").next().unwrap().to_owned() + "/api/sync/status";
    let (_, status) = get_json(&status_url).await;
    assert_eq!(status["upstream"]["caughtUp"], true, "{status:#}");

    let kill = Command::new("kill")
        .args(["-INT", &child.0.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let status = child.0.wait().unwrap();
    assert!(status.success(), "{status:?}");
}

//! Fuzzing (docs/HARDENING.md#fuzzing): the cargo-fuzz targets of
//! `tests/fuzz` (the event decoder, the snapshot line parser, the
//! configuration parser) each run for 60 s on a copy of their seed corpus,
//! with bounded input sizes and memory; a crash, a panic, an out-of-memory
//! or a hang fails the test. Three minutes of fuzzing do not belong in
//! every `cargo test`: the runs are `#[ignore]`d and have their own step,
//! after the tests, in the README's test command and CI (`cargo test --test
//! it fuzz:: -- --ignored`). `EMIS_EDGE_FUZZ_SECS` changes the time per
//! target. Without `cargo fuzz` they fail, unless `EMIS_EDGE_SKIP_FUZZ=1`
//! skips them on purpose (never in CI, `CI` set).
//!
//! The seed corpus, `tests/fuzz/seeds/<target>/`, is what `write_seeds`
//! writes: the contract's examples, the example configuration, and events
//! and snapshot lines of the benchmarks' generator.
//! `the_seed_corpus_is_what_write_seeds_writes` fails when the committed
//! corpus differs (after a change of a wire format, the configuration or
//! the generator); `EMIS_EDGE_WRITE_SEEDS=1` makes that test write it
//! instead, to commit. A seed named `ok-…` must be accepted and one named
//! `bad-…` rejected, which `seeds_are_accepted_or_rejected_as_named`
//! checks.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, PoisonError};

use emis_edge::config::Config;
use emis_edge::domain::snapshot::{end_line, record_line};
use emis_edge::domain::{
    format_timestamp, Entity, Event, EventType, OrderKey, Record, SnapshotReader, SyncSource,
};
use serde_json::{json, Value};
use uuid::Uuid;

/// Entities for the seeds, from the project's generator (`emis_edge::gen`),
/// addressed by number as the seeds were first written.
mod generator {
    use emis_edge::domain::{Entity, OrderKey};
    use emis_edge::gen::{Province, Spec};
    use uuid::Uuid;

    pub const T0: i64 = emis_edge::gen::T_BASE;

    fn province() -> Province {
        Province::new(Spec::scale("tiny", 1).expect("a named scale"))
    }

    pub fn uid(kind: u64, n: u64) -> Uuid {
        let mixed = (n as u128).wrapping_mul(0x9E37_79B9_7F4A_7C15_F39C_C060_5CED_C835)
            ^ ((kind as u128) << 120);
        Uuid::from_u128(mixed)
    }

    pub fn school_of(n: u64) -> Uuid {
        uid(4, n / 1000)
    }

    pub fn key(n: u64) -> OrderKey {
        OrderKey {
            version: Some(1),
            timestamp: T0,
            delete: false,
            event_id: uid(9, n),
        }
    }

    pub fn teacher(n: u64) -> Entity {
        Entity::Teacher(province().teacher((n % 3) as u32, (n % 12) as u32))
    }

    pub fn class(n: u64) -> Entity {
        Entity::Class(province().class((n % 3) as u32, (n % 12) as u32))
    }

    pub fn assignment(n: u64, _teachers: u64) -> Entity {
        let p = province();
        let (school, teacher) = ((n % 3) as u32, ((n / 8) % 12) as u32);
        let k = (n % u64::from(p.assignment_count(school, teacher))) as u32;
        Entity::Assignment(p.assignment(school, teacher, k))
    }

    /// One school of the generator's province: its id and, for teacher
    /// `n` (of 12), the teacher, its homeroom class and its first three
    /// assignments, all of that school.
    pub fn school_id(school: u32) -> Uuid {
        province().school_id(school)
    }

    pub fn of_school(school: u32, n: u32) -> Vec<Entity> {
        let p = province();
        let mut entities = vec![
            Entity::Teacher(p.teacher(school, n % 12)),
            Entity::Class(p.class(school, n % 12)),
        ];
        for k in 0..3 {
            entities.push(Entity::Assignment(p.assignment(school, n % 12, k)));
        }
        entities
    }
}

/// One fuzz target and the limits of its runs.
struct Target {
    name: &'static str,
    /// libFuzzer's `-max_len`: the largest input it builds. Above the
    /// largest valid input (every contract field at its limit, a few dozen
    /// snapshot lines, the commented example configuration), far below
    /// anything that could exhaust memory.
    max_len: usize,
}

const EVENT: Target = Target {
    name: "event",
    max_len: 4096,
};
const SNAPSHOT_LINE: Target = Target {
    name: "snapshot_line",
    max_len: 16384,
};
const CONFIG: Target = Target {
    name: "config",
    max_len: 16384,
};

/// libFuzzer's `-rss_limit_mb`: a run whose memory grows past this is an
/// out-of-memory crash. The targets peak at about 80 MiB.
const RSS_LIMIT_MB: u32 = 512;
/// libFuzzer's `-timeout`: one input taking longer is a crash (a hang).
const TIMEOUT_SECS: u32 = 10;
/// The pinned cargo-fuzz, as `.ci/run` installs it.
const CARGO_FUZZ: &str = "cargo install cargo-fuzz --version 0.13.2 --locked";

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz")
}

fn seeds(target: &str) -> PathBuf {
    fuzz_dir().join("seeds").join(target)
}

#[test]
#[ignore = "fuzzing, 60 s: run by `cargo test --test it fuzz:: -- --ignored`"]
fn event_decoder_survives_fuzzing() {
    fuzz(&EVENT);
}

#[test]
#[ignore = "fuzzing, 60 s: run by `cargo test --test it fuzz:: -- --ignored`"]
fn snapshot_line_parser_survives_fuzzing() {
    fuzz(&SNAPSHOT_LINE);
}

#[test]
#[ignore = "fuzzing, 60 s: run by `cargo test --test it fuzz:: -- --ignored`"]
fn config_parser_survives_fuzzing() {
    fuzz(&CONFIG);
}

/// The runs take a core each: one at a time, so the other tests keep the
/// other core.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn fuzz(target: &Target) {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(PoisonError::into_inner);
    if std::env::var("EMIS_EDGE_SKIP_FUZZ").is_ok_and(|v| v == "1") {
        assert!(
            std::env::var_os("CI").is_none(),
            "EMIS_EDGE_SKIP_FUZZ=1 is for local runs, not CI"
        );
        eprintln!("SKIPPED: EMIS_EDGE_SKIP_FUZZ=1");
        return;
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let has_cargo_fuzz = Command::new(&cargo)
        .args(["fuzz", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !has_cargo_fuzz {
        return crate::support::missing_tool("cargo-fuzz", "EMIS_EDGE_SKIP_FUZZ", CARGO_FUZZ);
    }
    let secs: u64 = std::env::var("EMIS_EDGE_FUZZ_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);

    // libFuzzer adds what it finds to the first corpus directory: a copy,
    // so that the committed seeds stay as they are.
    let work = tempfile::tempdir().unwrap();
    let corpus = work.path().join("corpus");
    let artifacts = work.path().join("artifacts");
    std::fs::create_dir(&corpus).unwrap();
    std::fs::create_dir(&artifacts).unwrap();
    for seed in std::fs::read_dir(seeds(target.name)).unwrap() {
        let seed = seed.unwrap().path();
        std::fs::copy(&seed, corpus.join(seed.file_name().unwrap())).unwrap();
    }
    // `--sanitizer none` builds on a stable toolchain in about half the time
    // of AddressSanitizer (nightly or RUSTC_BOOTSTRAP=1) and runs 5 to 50
    // times faster; ASan found nothing more in this safe code
    // (docs/HARDENING.md#fuzzing). Optimised with debug assertions, as
    // cargo-fuzz builds by default.
    let mut run = Command::new(&cargo);
    // Without the variables `cargo test` sets for this test: build scripts
    // (ring's) that watch them would rebuild when the same targets are
    // built from a shell, and the other way round.
    for (name, _) in std::env::vars_os() {
        let name = name.to_string_lossy();
        let set_by_cargo_test = ["CARGO_PKG_", "CARGO_MANIFEST_", "CARGO_BIN_"]
            .iter()
            .any(|p| name.starts_with(p))
            || [
                "CARGO_CRATE_NAME",
                "CARGO_PRIMARY_PACKAGE",
                "CARGO_TARGET_TMPDIR",
                "CARGO_RUSTC_CURRENT_DIR",
                "OUT_DIR",
            ]
            .contains(&&*name);
        if set_by_cargo_test {
            run.env_remove(&*name);
        }
    }
    let out = run
        .args(["fuzz", "run", target.name, "--fuzz-dir"])
        .arg(fuzz_dir())
        .args(["--sanitizer", "none"])
        .arg(&corpus)
        .arg("--")
        .arg(format!("-max_total_time={secs}"))
        .arg(format!("-max_len={}", target.max_len))
        .arg(format!("-rss_limit_mb={RSS_LIMIT_MB}"))
        .arg(format!("-timeout={TIMEOUT_SECS}"))
        .arg(format!("-artifact_prefix={}/", artifacts.display()))
        .arg("-print_final_stats=1")
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    let found: Vec<_> = std::fs::read_dir(&artifacts)
        .unwrap()
        .map(|a| a.unwrap().path())
        .collect();
    if !out.status.success() || !found.is_empty() {
        // Keep what it found where a developer can replay it:
        // `cargo fuzz run <target> --fuzz-dir tests/fuzz --sanitizer none <file>`.
        let keep = fuzz_dir().join("artifacts").join(target.name);
        std::fs::create_dir_all(&keep).unwrap();
        let kept: Vec<_> = found
            .iter()
            .map(|a| {
                let to = keep.join(a.file_name().unwrap());
                std::fs::copy(a, &to).unwrap();
                to.display().to_string()
            })
            .collect();
        // The end of libFuzzer's output: the crash, its input, its stack.
        let lines: Vec<_> = log.lines().collect();
        let end = lines[lines.len().saturating_sub(120)..].join("\n");
        panic!(
            "fuzz target `{}` failed ({}); inputs kept: {kept:?}\n…\n{end}",
            target.name, out.status
        );
    }
    let stats: Vec<_> = log
        .lines()
        .filter(|l| l.contains("DONE") || l.starts_with("stat::"))
        .collect();
    eprintln!(
        "fuzz target `{}`, {secs} s:\n{}",
        target.name,
        stats.join("\n")
    );
    assert!(!stats.is_empty(), "no final statistics:\n{log}");
}

// ---------------------------------------------------------------------------
// The seed corpus.

fn event_seed(t: EventType, payload: &[u8]) -> Vec<u8> {
    // The target reads the topic from the first byte: `b'0' + index`.
    let index = EventType::ALL.iter().position(|x| *x == t).unwrap() as u8;
    let mut seed = vec![b'0' + index];
    seed.extend_from_slice(payload);
    seed
}

#[test]
fn seeds_are_accepted_or_rejected_as_named() {
    let mut checked = 0;
    for (target, accepted) in [
        ("event", event_accepted as fn(&[u8]) -> Result<(), String>),
        ("snapshot_line", snapshot_accepted),
        ("config", config_accepted),
    ] {
        let mut files = 0;
        for seed in std::fs::read_dir(seeds(target)).unwrap() {
            let seed = seed.unwrap().path();
            let name = seed.file_name().unwrap().to_string_lossy().into_owned();
            let data = std::fs::read(&seed).unwrap();
            let outcome = accepted(&data);
            if name.starts_with("ok-") {
                assert!(outcome.is_ok(), "{target}/{name}: {outcome:?}");
            } else {
                assert!(name.starts_with("bad-"), "{target}/{name}: ok- or bad-?");
                assert!(outcome.is_err(), "{target}/{name} is accepted");
            }
            files += 1;
        }
        assert!(files >= 10, "{target}: only {files} seeds");
        checked += files;
    }
    eprintln!("{checked} seeds checked");
}

fn event_accepted(data: &[u8]) -> Result<(), String> {
    let (selector, raw) = data.split_first().ok_or("empty")?;
    let t = EventType::ALL[usize::from(selector.wrapping_sub(b'0')) % 9];
    Event::parse(t, raw).map(drop).map_err(|e| e.to_string())
}

fn snapshot_accepted(data: &[u8]) -> Result<(), String> {
    let mut reader = SnapshotReader::new();
    let mut schools = 0;
    for line in data.split(|b| *b == b'\n') {
        match reader.feed(line) {
            Some(Ok(_)) => schools += 1,
            Some(Err(e)) => return Err(e.to_string()),
            None => {}
        }
    }
    match reader.finish() {
        Some(e) => Err(e.to_string()),
        None if schools == 0 => Err("no school".into()),
        None => Ok(()),
    }
}

fn config_accepted(data: &[u8]) -> Result<(), String> {
    let text = std::str::from_utf8(data).map_err(|e| e.to_string())?;
    Config::from_toml_str(text)
        .map(drop)
        .map_err(|e| e.to_string())
}

/// The committed corpus is what [`write_seeds`] writes: a change of a wire
/// format, the configuration or the generator shows here, and
/// `EMIS_EDGE_WRITE_SEEDS=1` makes this test rewrite `tests/fuzz/seeds/`
/// (then commit the result).
#[test]
fn the_seed_corpus_is_what_write_seeds_writes() {
    if std::env::var("EMIS_EDGE_WRITE_SEEDS").is_ok_and(|v| v == "1") {
        return write_seeds();
    }
    for (target, files) in all_seeds() {
        let mut committed = Seeds::new();
        for seed in std::fs::read_dir(seeds(target)).unwrap() {
            let seed = seed.unwrap().path();
            let name = seed.file_name().unwrap().to_string_lossy().into_owned();
            committed.insert(name, std::fs::read(&seed).unwrap());
        }
        let differ: Vec<&String> = files
            .keys()
            .chain(committed.keys())
            .filter(|name| files.get(*name) != committed.get(*name))
            .collect();
        assert!(
            differ.is_empty(),
            "tests/fuzz/seeds/{target} is not what write_seeds writes: {differ:?}. Rewrite it \
             with `EMIS_EDGE_WRITE_SEEDS=1 cargo test --test it \
             fuzz::the_seed_corpus_is_what_write_seeds_writes` and commit it"
        );
    }
}

fn all_seeds() -> [(&'static str, Seeds); 3] {
    [
        ("event", event_seeds()),
        ("snapshot_line", snapshot_seeds()),
        ("config", config_seeds()),
    ]
}

/// Rewrites `tests/fuzz/seeds/`.
fn write_seeds() {
    for (target, files) in all_seeds() {
        let dir = seeds(target);
        if dir.exists() {
            std::fs::remove_dir_all(&dir).unwrap();
        }
        std::fs::create_dir_all(&dir).unwrap();
        for (name, data) in &files {
            std::fs::write(dir.join(name), data).unwrap();
        }
        eprintln!("{}: {} seeds", dir.display(), files.len());
    }
}

type Seeds = BTreeMap<String, Vec<u8>>;

fn school() -> Uuid {
    generator::school_of(1000)
}

/// The contract's example event (§2), as printed: its ids are elided.
const CONTRACT_EVENT: &str = r#"{"eventId":"6f1c…","eventType":"emis.class.created","timestamp":"2025-10-26T10:00:00Z",
 "classId":"…","className":"Lớp 10A1","grade":"Khối 10","academicYear":"2024-2025",
 "totalStudents":45,"schoolId":"…","homeroomTeacherId":"…"}"#;

/// The payload of an event of type `t` about `entity`, as a central
/// service publishes it.
fn payload(t: EventType, entity: &Entity, key: &OrderKey, time: &str) -> Value {
    let mut v = if t.is_delete() {
        json!({ entity.kind().id_field(): entity.id(), "schoolId": entity.school_id() })
    } else {
        match entity {
            Entity::Class(c) => serde_json::to_value(c),
            Entity::Teacher(x) => serde_json::to_value(x),
            Entity::Assignment(a) => serde_json::to_value(a),
        }
        .unwrap()
    };
    v["eventId"] = json!(key.event_id);
    v["eventType"] = json!(t.name());
    v["timestamp"] = json!(time);
    if let Some(version) = key.version {
        v["version"] = json!(version);
    }
    v
}

fn event_seeds() -> Seeds {
    use generator::{assignment, class, key, teacher, T0};
    let mut s = Seeds::new();
    let mut add = |name: String, t: EventType, payload: &[u8]| {
        s.insert(name, event_seed(t, payload));
    };
    add(
        "bad-contract-example".into(),
        EventType::ClassCreated,
        CONTRACT_EVENT.as_bytes(),
    );
    let filled = CONTRACT_EVENT
        .replace("6f1c…", &generator::uid(9, 1).to_string())
        .replace(
            r#""schoolId":"…""#,
            &format!(r#""schoolId":"{}""#, school()),
        )
        .replace(
            r#""classId":"…""#,
            &format!(r#""classId":"{}""#, generator::uid(2, 1)),
        )
        .replace("…", &generator::uid(1, 1).to_string());
    add(
        "ok-contract-example".into(),
        EventType::ClassCreated,
        filled.as_bytes(),
    );

    // Every event type, about entities of the benchmarks' generator, with
    // and without a version, in the time formats producers use.
    let times = [
        format_timestamp(T0),
        "2025-10-26T17:00:00.123456789+07:00".to_owned(),
        "2025-10-26T10:00:00.5-00:00".to_owned(),
    ];
    for (i, n) in [1000u64, 1047, 2234].into_iter().enumerate() {
        for t in EventType::ALL {
            let entity = match t.kind() {
                emis_edge::domain::EntityKind::Class => class(n),
                emis_edge::domain::EntityKind::Teacher => teacher(n),
                emis_edge::domain::EntityKind::Assignment => assignment(n * 10 + 1, 100_000),
            };
            let mut k = key(n);
            k.version = (i != 1).then_some(n + 1);
            let name = format!("ok-{}-{n}", t.name().trim_start_matches("emis."));
            add(
                name,
                t,
                payload(t, &entity, &k, &times[i]).to_string().as_bytes(),
            );
        }
    }

    // Edge cases that are valid, and the ways the central services (or a
    // broken producer) get it wrong.
    let k = key(1007);
    let base = |t: EventType| payload(t, &teacher(1007), &k, &format_timestamp(T0));
    let with = |t: EventType, field: &str, value: Value| {
        let mut v = base(t);
        v[field] = value;
        v.to_string()
    };
    let tc = EventType::TeacherCreated;
    let cases: Vec<(&str, EventType, String)> = vec![
        ("ok-teacher-nulls", tc, {
            let mut v = base(tc);
            for f in [
                "employeeCode",
                "email",
                "phone",
                "subjects",
                "status",
                "version",
            ] {
                v[f] = Value::Null;
            }
            v.to_string()
        }),
        ("ok-teacher-unknown-fields", tc, {
            let mut v = base(tc);
            v["futureField"] = json!({"a": [1, 2.5, "Đà Nẵng", null, {"b": true}]});
            v.to_string()
        }),
        ("ok-teacher-uuid-forms", tc, {
            let mut v = base(tc);
            v["teacherId"] = json!(generator::uid(1, 1007).urn().to_string());
            v["schoolId"] = json!(generator::uid(4, 1).braced().to_string());
            v["eventId"] = json!(k.event_id.simple().to_string().to_uppercase());
            v.to_string()
        }),
        ("ok-teacher-escapes", tc, {
            // "Nguyễn Thị Hương 😀 " before the name, in JSON escapes.
            base(tc).to_string().replacen(
                r#""fullName":""#,
                r#""fullName":"Nguy\u1ec5n Th\u1ecb H\u01b0\u01a1ng \ud83d\ude00 "#,
                1,
            )
        }),
        ("ok-teacher-nested-unknown", tc, {
            let deep = format!("{}{}", "[".repeat(120), "]".repeat(120));
            base(tc)
                .to_string()
                .replacen('{', &format!(r#"{{"deep":{deep},"#), 1)
        }),
        ("bad-teacher-too-deep", tc, {
            let deep = format!("{}{}", "[".repeat(130), "]".repeat(130));
            base(tc)
                .to_string()
                .replacen('{', &format!(r#"{{"deep":{deep},"#), 1)
        }),
        (
            "ok-teacher-latest-time",
            tc,
            with(tc, "timestamp", json!("2262-04-11T23:47:16.854775807Z")),
        ),
        (
            "ok-teacher-earliest-time",
            tc,
            with(tc, "timestamp", json!("1677-09-21T00:12:43.145224192Z")),
        ),
        // The ends of the range: what ingest computes with the timestamp
        // (the skew check, the sync latency) must not overflow.
        (
            "ok-teacher-deleted-earliest-time",
            EventType::TeacherDeleted,
            {
                let mut v = payload(
                    EventType::TeacherDeleted,
                    &teacher(1007),
                    &k,
                    "1677-09-21T00:12:43.145224192Z",
                );
                v["version"] = json!(u64::MAX);
                v.to_string()
            },
        ),
        ("ok-class-updated-latest-time", EventType::ClassUpdated, {
            payload(
                EventType::ClassUpdated,
                &class(1007),
                &k,
                "2262-04-11T23:47:16.854775807Z",
            )
            .to_string()
        }),
        (
            "bad-teacher-after-2262",
            tc,
            with(tc, "timestamp", json!("2262-04-11T23:47:16.854775808Z")),
        ),
        (
            "ok-teacher-leap-second",
            tc,
            with(tc, "timestamp", json!("2016-12-31T23:59:60.5Z")),
        ),
        (
            "bad-teacher-local-time",
            tc,
            with(tc, "timestamp", json!("26/10/2025 10:00")),
        ),
        (
            "bad-teacher-name-201-chars",
            tc,
            with(tc, "fullName", json!("ễ".repeat(201))),
        ),
        (
            "ok-teacher-name-200-chars",
            tc,
            with(tc, "fullName", json!("ễ".repeat(200))),
        ),
        (
            "bad-teacher-65-subjects",
            tc,
            with(tc, "subjects", json!(vec!["Toán"; 65])),
        ),
        (
            "bad-teacher-status",
            tc,
            with(tc, "status", json!("nghỉ hưu")),
        ),
        (
            "bad-teacher-version-negative",
            tc,
            with(tc, "version", json!(-1)),
        ),
        (
            "bad-teacher-version-fraction",
            tc,
            with(tc, "version", json!(1.5)),
        ),
        (
            "ok-teacher-version-max",
            tc,
            with(tc, "version", json!(u64::MAX)),
        ),
        (
            "bad-teacher-school-not-uuid",
            tc,
            with(tc, "schoolId", json!("THPT Chu Văn An")),
        ),
        (
            "bad-teacher-on-update-topic",
            EventType::TeacherUpdated,
            base(tc).to_string(),
        ),
        (
            "bad-teacher-unknown-type",
            tc,
            with(tc, "eventType", json!("emis.teacher.moved")),
        ),
        ("bad-teacher-not-json", tc, {
            let v = base(tc).to_string();
            v[..v.len() / 2].to_owned()
        }),
        ("bad-teacher-array", tc, format!("[{}]", base(tc))),
        ("bad-class-students-above-u32", EventType::ClassCreated, {
            let mut v = payload(
                EventType::ClassCreated,
                &class(1007),
                &k,
                "2025-10-26T10:00:00Z",
            );
            v["totalStudents"] = json!(u64::from(u32::MAX) + 1);
            v.to_string()
        }),
        ("bad-assignment-role", EventType::AssignmentCreated, {
            let mut v = payload(
                EventType::AssignmentCreated,
                &assignment(10_071, 100_000),
                &k,
                "2025-10-26T10:00:00Z",
            );
            v["role"] = json!("hiệu trưởng");
            v.to_string()
        }),
        (
            "bad-assignment-delete-without-id",
            EventType::AssignmentDeleted,
            {
                let mut v = payload(
                    EventType::AssignmentDeleted,
                    &assignment(10_071, 100_000),
                    &k,
                    "2025-10-26T10:00:00Z",
                );
                v.as_object_mut().unwrap().remove("assignmentId");
                v.to_string()
            },
        ),
    ];
    for (name, t, text) in cases {
        add(name.into(), t, text.as_bytes());
    }
    // Not UTF-8: "Lê" in Latin-1 (0xEA) inside the JSON.
    let text = base(tc).to_string();
    let at = text.find(r#""fullName":""#).unwrap() + r#""fullName":""#.len();
    let mut latin1 = text.into_bytes();
    latin1.splice(at..at, [b'L', 0xEA, b' ']);
    add("bad-teacher-latin1".into(), tc, &latin1);
    s
}

fn snapshot_seeds() -> Seeds {
    use generator::{key, of_school, school_id, T0};
    let record = |n: u64, data: Entity| {
        record_line(&Record {
            data,
            key: key(n),
            last_synced_at: T0,
            source: SyncSource::Resync,
        })
    };
    // A school of the generator: teachers, their classes and assignments.
    let school_lines = |school: u32, teachers: u32| {
        let mut lines = Vec::new();
        let mut count = 0;
        for n in 0..teachers {
            for (k, entity) in of_school(school, n).into_iter().enumerate() {
                let n = u64::from(school) * 1000 + u64::from(n) * 10 + k as u64;
                lines.extend(record(n, entity));
                count += 1;
            }
        }
        (lines, count)
    };
    let mut s = Seeds::new();
    let school_a = school_id(1);
    let school_b = school_id(2);

    // Contract §3: a record of each kind, then the end line, without the
    // eventId emis-edge adds.
    let contract = [
        json!({"kind":"class","classId":generator::uid(2, 1),"className":"Lớp 10A1",
               "grade":"Khối 10","academicYear":"2024-2025","totalStudents":45,
               "schoolId":school_a,"homeroomTeacherId":generator::uid(1, 1),
               "version":3,"timestamp":"2025-10-26T10:00:00Z"}),
        json!({"kind":"teacher","teacherId":generator::uid(1, 1),"fullName":"Nguyễn Thị Hương",
               "employeeCode":"GV-0001","email":null,"phone":null,"subjects":["Toán"],
               "status":"active","schoolId":school_a,"version":null,
               "timestamp":"2025-10-26T17:00:00+07:00"}),
        json!({"kind":"assignment","assignmentId":generator::uid(3, 1),
               "teacherId":generator::uid(1, 1),"classId":generator::uid(2, 1),
               "subject":"Toán","role":"homeroom","academicYear":"2024-2025",
               "schoolId":school_a,"version":1,"timestamp":"2025-10-26T10:00:00.25Z"}),
        json!({"kind":"end","schoolId":school_a,"count":3,"asOf":"2025-10-26T12:00:00Z"}),
    ];
    let contract: String = contract.iter().map(|v| format!("{v}\n")).collect();
    s.insert("ok-contract-shape".into(), contract.clone().into_bytes());
    s.insert(
        "ok-contract-shape-crlf".into(),
        contract.replace('\n', "\r\n\r\n").into_bytes(),
    );

    let (a, a_count) = school_lines(1, 2);
    let (b, b_count) = school_lines(2, 1);
    let end_a = end_line(school_a, a_count, T0);
    let end_b = end_line(school_b, b_count, T0 + 1);
    let cat = |parts: &[&[u8]]| parts.concat();
    s.insert("ok-school".into(), cat(&[&a, &end_a]));
    s.insert("ok-two-schools".into(), cat(&[&a, &end_a, &b, &end_b]));
    s.insert("ok-empty-school".into(), end_line(school_b, 0, T0));
    s.insert(
        "ok-no-final-newline".into(),
        cat(&[&b, end_b.trim_ascii_end()]),
    );
    s.insert("bad-truncated".into(), a.clone());
    s.insert(
        "bad-truncated-mid-line".into(),
        cat(&[&a, &end_a, &b[..b.len() / 2]]),
    );
    s.insert(
        "bad-count".into(),
        cat(&[&a, &end_line(school_a, a_count + 1, T0)]),
    );
    s.insert(
        "bad-record-of-another-school".into(),
        cat(&[&a, &b, &end_line(school_a, a_count + b_count, T0)]),
    );
    let lines: Vec<&[u8]> = a.split_inclusive(|b| *b == b'\n').collect();
    s.insert(
        "bad-line-then-a-good-school".into(),
        cat(&[
            lines[0],
            b"{\"kind\":\"principal\",\"schoolId\":\"",
            school_a.to_string().as_bytes(),
            b"\"}\n",
            &lines[1..].concat(),
            &end_a,
            &b,
            &end_b,
        ]),
    );
    s.insert(
        "bad-end-without-count".into(),
        format!(
            "{}\n",
            json!({"kind":"end","schoolId":school_a,"asOf":"2025-10-26T12:00:00Z"})
        )
        .into_bytes(),
    );
    s.insert(
        "bad-end-count-negative".into(),
        format!(
            "{}\n",
            json!({"kind":"end","schoolId":school_a,"count":-1,"asOf":"2025-10-26T12:00:00Z"})
        )
        .into_bytes(),
    );
    s.insert(
        "bad-not-json".into(),
        b"kind=end schoolId=5b0f1a2e count=0\n".to_vec(),
    );
    s
}

fn config_seeds() -> Seeds {
    let example_path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/edge.example.toml");
    let example = std::fs::read_to_string(example_path).unwrap();
    let compact: String = example
        .lines()
        .filter(|l| !l.trim_start().starts_with('#') && !l.trim().is_empty())
        .map(|l| format!("{l}\n"))
        .collect();
    // Contract §5, as printed: its school ids are elided.
    let contract = r#"[node]
id = "edge-hanoi-01"            # also the default Kafka group id: emis-edge-<id>
data_dir = "/var/lib/emis-edge" # holds the redb file

[http]
listen = "127.0.0.1:8080"

[kafka]
brokers = "kafka-1:9092,kafka-2:9092"
[kafka.properties]               # passed to librdkafka as is (SASL, TLS, …)
"security.protocol" = "SASL_SSL"

[schools]
ids = ["5b0f…", "9c2e…"]        # or: all = true

[resync]
central_url = "https://emis.example.vn"   # serves GET /api/schools/{id}/snapshot
interval_secs = 86400
"#;
    let filled = contract
        .replace("5b0f…", "5b0f1a2e-3c4d-4e5f-8a9b-0c1d2e3f4a5b")
        .replace("9c2e…", "9c2e7d41-6b8a-4f3e-9d2c-1a0b3c4d5e6f");
    let mut s = Seeds::new();
    let mut add = |name: &str, text: &str| {
        s.insert(name.into(), text.as_bytes().to_vec());
    };
    add("ok-edge.example.toml", &example);
    add("ok-edge.compact.toml", &compact);
    add("bad-contract-example.toml", contract);
    add("ok-contract-example.toml", &filled);
    add("ok-empty.toml", "");
    add(
        "ok-province.toml",
        r#"[node]
id = "edge-tinh.thanh-hoa_01"
data_dir = "/srv/emis/Thanh Hóa"
[http]
listen = "[::]:8443"
ops_listen = "127.0.0.1:9100"
token_file = "/etc/emis-edge/api-tokens"
request_timeout_secs = 5
max_concurrent_requests = 100000
max_import_bytes = 0
[kafka]
brokers = " kafka-1.sgd.thanhhoa.edu.vn:9093 , [fd00::1]:9093 ,"
group_id = "emis-edge-tinh"
batch_max_messages = 1
batch_max_wait_ms = 1000
stale_after_secs = 1
[kafka.topics]
class_created = "thanhhoa.lop.tao"
[kafka.properties]
"security.protocol" = "SASL_SSL"
"sasl.mechanism" = "SCRAM-SHA-512"
"sasl.username" = "edge-thanh-hoa"
"sasl.password" = "mật-khẩu-bí-mật"
"ssl.key.password" = "khóa"
[schools]
all = true
[resync]
central_url = "http://10.0.0.5:8080/trung-tâm/"
interval_secs = 60
timeout_secs = 1
dry_run = true
token_file = "/etc/emis-edge/central-token"
[store]
tombstone_retention = "6weeks 3days 1h 30m 15s 250ms"
cache_mb = 65536
[log]
level = "emis_edge=debug,tower_http[request]=trace,warn"
"#,
    );
    add(
        "ok-log-level-with-spaces.toml",
        "[log]\nlevel = \"info, emis_edge=debug ,  tower_http=warn \"\n",
    );
    add(
        "ok-env-style-values.toml",
        "node.id = \"2024\"\nschools.ids = []\nstore.tombstone_retention = \"720h\"\n",
    );
    for (name, text) in [
        (
            "bad-unknown-key.toml",
            "[node]\nid = \"edge-01\"\nname = \"Trường THPT Chu Văn An\"\n",
        ),
        ("bad-unknown-section.toml", "[trường]\nid = 1\n"),
        ("bad-node-id.toml", "[node]\nid = \"trường-hà-nội\"\n"),
        (
            "bad-both-all-and-ids.toml",
            "[schools]\nall = true\nids = [\"5b0f1a2e-3c4d-4e5f-8a9b-0c1d2e3f4a5b\"]\n",
        ),
        (
            "bad-school-id.toml",
            "[schools]\nids = [\"THPT Chu Văn An\"]\n",
        ),
        (
            "bad-interval-type.toml",
            "[resync]\ninterval_secs = \"hằng ngày\"\n",
        ),
        ("bad-interval-short.toml", "[resync]\ninterval_secs = 59\n"),
        (
            "bad-central-url-scheme.toml",
            "[resync]\ncentral_url = \"ftp://emis.example.vn\"\n",
        ),
        (
            "bad-central-url.toml",
            "[resync]\ncentral_url = \"emis.example.vn\"\n",
        ),
        (
            "bad-duplicate-topic.toml",
            "[kafka.topics]\nclass_updated = \"emis.class.created\"\n",
        ),
        (
            "bad-empty-topic.toml",
            "[kafka.topics]\nteacher_deleted = \"\"\n",
        ),
        (
            "bad-broker-port.toml",
            "[kafka]\nbrokers = \"kafka-1:9092,kafka-2\"\n",
        ),
        (
            "bad-retention-short.toml",
            "[store]\ntombstone_retention = \"59m\"\n",
        ),
        (
            "bad-retention-unit.toml",
            "[store]\ntombstone_retention = \"30 ngày\"\n",
        ),
        ("bad-cache.toml", "[store]\ncache_mb = 0\n"),
        (
            "bad-dead-letter-max-count.toml",
            "[store]\ndead_letter_max_count = 0\n",
        ),
        (
            "bad-dead-letter-retention.toml",
            "[store]\ndead_letter_retention = \"59m\"\n",
        ),
        (
            "bad-max-future-skew.toml",
            "[ingest]\nmax_future_skew = \"một giờ\"\n",
        ),
        (
            "bad-log-level.toml",
            "[log]\nlevel = \"emis_edge=rất nhiều\"\n",
        ),
        (
            "bad-log-level-space-before-vietnamese.toml",
            "[log]\nlevel = \"emis_edgi,  06h ề[\"\n",
        ),
        (
            "bad-ops-listen-same.toml",
            "[http]\nlisten = \"0.0.0.0:8080\"\nops_listen = \"0.0.0.0:8080\"\n",
        ),
        ("bad-listen.toml", "[http]\nlisten = \"localhost:8080\"\n"),
        ("bad-not-toml.toml", "[node\nid = edge-01\n"),
        ("bad-empty-table-name.toml", "['']\n"),
        ("bad-duplicate-key.toml", "[node]\nid = \"a\"\nid = \"b\"\n"),
    ] {
        add(name, text);
    }
    s
}

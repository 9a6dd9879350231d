//! The binary as an operator runs it: configuration layering, exit codes,
//! messages that name the key, and `status` with and without a running node.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use emis_edge::config::Config;

use crate::support::{missing_tool, serve_on_a_free_port, ReservedPort};

const BIN: &str = env!("CARGO_BIN_EXE_emis-edge");

fn example() -> &'static Path {
    Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/config/edge.example.toml"
    ))
}

fn run(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let mut cmd = Command::new(BIN);
    cmd.args(args).env_remove("RUST_LOG");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn write(dir: &tempfile::TempDir, text: &str) -> String {
    let p = dir.path().join("edge.toml");
    std::fs::write(&p, text).unwrap();
    p.to_str().unwrap().to_owned()
}

#[test]
fn the_example_config_is_valid_and_sets_what_an_operator_sets() {
    let c = Config::load(Some(example()), Vec::new()).unwrap();
    assert_eq!(c.node.id, "edge-hanoi-01");
    assert_eq!(c.kafka.brokers, "kafka-1:9092,kafka-2:9092");
    assert_eq!(c.schools.ids.len(), 2);
    assert_eq!(c.group_id(), "emis-edge-edge-hanoi-01");
    let (code, stdout, _) = run(
        &["check-config", "--config", example().to_str().unwrap()],
        &[],
    );
    assert_eq!(code, 0);
    assert!(stdout.contains("edge-hanoi-01"));
}

#[test]
fn environment_overrides_the_file_which_overrides_defaults() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(
        &dir,
        "[node]\nid = \"from-file\"\n[kafka]\nbrokers = \"a:1\"\n",
    );
    let env = vec![
        ("EMIS_EDGE__KAFKA__BROKERS".to_owned(), "b:2,c:3".to_owned()),
        (
            "EMIS_EDGE__KAFKA__BATCH_MAX_MESSAGES".to_owned(),
            "10".to_owned(),
        ),
        (
            "EMIS_EDGE__SCHOOLS__IDS".to_owned(),
            "[\"5b0f0000-0000-4000-8000-000000000001\"]".to_owned(),
        ),
        (
            "EMIS_EDGE__KAFKA__PROPERTIES__SASL.PASSWORD".to_owned(),
            "hunter2".to_owned(),
        ),
        ("UNRELATED".to_owned(), "x".to_owned()),
    ];
    let c = Config::load(Some(Path::new(&file)), env).unwrap();
    assert_eq!(c.node.id, "from-file");
    assert_eq!(c.kafka.brokers, "b:2,c:3");
    assert_eq!(c.kafka.batch_max_messages, 10);
    assert_eq!(c.schools.ids.len(), 1);
    assert_eq!(c.kafka.properties["sasl.password"], "hunter2");
    assert_eq!(c.http.listen.to_string(), "127.0.0.1:8080", "default kept");
    let shown = c.to_redacted_toml();
    assert!(
        !shown.contains("hunter2") && shown.contains("<redacted>"),
        "{shown}"
    );
}

#[test]
fn an_invalid_config_exits_2_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    for (text, env, key) in [
        ("[http]\nlisten = \"nope\"\n", None, "http.listen"),
        ("[http]\nlistn = \"127.0.0.1:1\"\n", None, "http.listn"),
        (
            "[schools]\nall = true\nids = [\"5b0f0000-0000-4000-8000-000000000001\"]\n",
            None,
            "schools.all",
        ),
        ("[schools]\nids = [\"not-a-uuid\"]\n", None, "schools.ids"),
        ("[kafka]\nbrokers = \"kafka-1\"\n", None, "kafka.brokers"),
        (
            "[resync]\ncentral_url = \"ftp://x\"\n",
            None,
            "resync.central_url",
        ),
        (
            "[store]\ntombstone_retention = \"soon\"\n",
            None,
            "store.tombstone_retention",
        ),
        (
            "",
            Some(("EMIS_EDGE__KAFKA__BATCH_MAX_MESSAGES", "many")),
            "kafka.batch_max_messages",
        ),
    ] {
        let file = write(&dir, text);
        let env: Vec<(&str, &str)> = env.into_iter().collect();
        let (code, _, stderr) = run(&["check-config", "--config", &file], &env);
        assert_eq!(code, 2, "{text}: {stderr}");
        assert!(
            stderr.contains(&format!("config key `{key}")),
            "{key} not named in: {stderr}"
        );
    }
    let (code, _, stderr) = run(&["check-config", "--config", "/nonexistent/edge.toml"], &[]);
    assert_eq!(code, 2);
    assert!(stderr.contains("/nonexistent/edge.toml"), "{stderr}");
    let (code, _, _) = run(&["serve", "--no-such-flag"], &[]);
    assert_eq!(code, 2);
}

/// A school node must not quietly become a national one: without
/// `schools.ids` and without `schools.all = true`, `serve` and
/// `check-config` refuse the configuration (exit 2, naming the key)
/// instead of serving, and storing, every school.
#[test]
fn an_empty_school_list_without_schools_all_is_refused_by_serve_and_check_config() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let data_dir = data_dir.to_str().unwrap();
    let env = [
        ("EMIS_EDGE__NODE__DATA_DIR", data_dir),
        // Port 0: a `serve` that wrongly starts binds somewhere harmless.
        ("EMIS_EDGE__HTTP__LISTEN", "127.0.0.1:0"),
    ];
    for text in ["", "[schools]\nids = []\n", "[schools]\nall = false\n"] {
        let file = write(&dir, text);
        let (code, _, stderr) = run(&["check-config", "--config", &file], &env);
        assert_eq!(code, 2, "check-config accepted {text:?}: {stderr}");
        assert!(stderr.contains("config key `schools.ids`"), "{stderr}");
        assert!(stderr.contains("schools.all = true"), "{stderr}");
        // `serve` exits at once with the same message; one that starts
        // instead is killed and reported.
        let mut serve = Command::new(BIN);
        serve
            .args(["serve", "--config", &file])
            .env_remove("RUST_LOG")
            .envs(env)
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = serve.spawn().unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        let code = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status.code();
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("serve started with {text:?} instead of refusing it");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let mut stderr = String::new();
        std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
        assert_eq!(code, Some(2), "serve with {text:?}: {stderr}");
        assert!(stderr.contains("config key `schools.ids`"), "{stderr}");
    }
    assert!(
        !Path::new(data_dir).exists(),
        "serve created a store before refusing"
    );
    // Serving everything is said explicitly; a list is the other way.
    for text in [
        "[schools]\nall = true\n",
        "[schools]\nids = [\"5b0f0000-0000-4000-8000-000000000001\"]\n",
    ] {
        let file = write(&dir, text);
        let (code, _, stderr) = run(&["check-config", "--config", &file], &env);
        assert_eq!(code, 0, "{text:?}: {stderr}");
    }
    // The environment can say it too.
    let file = write(&dir, "");
    let (code, _, stderr) = run(
        &["check-config", "--config", &file],
        &[("EMIS_EDGE__SCHOOLS__ALL", "true")],
    );
    assert_eq!(code, 0, "{stderr}");
}

#[test]
fn help_explains_configuration_and_exit_codes() {
    let (code, stdout, _) = run(&["--help"], &[]);
    assert_eq!(code, 0);
    for s in [
        "serve",
        "check-config",
        "status",
        "EMIS_EDGE__",
        "Exit codes",
    ] {
        assert!(stdout.contains(s), "{s} missing from --help:\n{stdout}");
    }
}

#[test]
fn status_asks_the_running_node_else_reads_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().to_str().unwrap().to_owned();
    let env = |listen: &str| {
        [
            ("EMIS_EDGE__NODE__DATA_DIR", data_dir.clone()),
            ("EMIS_EDGE__HTTP__LISTEN", listen.to_owned()),
            ("EMIS_EDGE__NODE__ID", "edge-test-07".to_owned()),
            ("EMIS_EDGE__SCHOOLS__ALL", "true".to_owned()),
        ]
    };
    let run_with = |args: &[&str], listen: &str| {
        let env = env(listen);
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        run(args, &env)
    };
    // Nothing can answer at a reserved port.
    let nobody = ReservedPort::new();
    let (code, _, stderr) = run_with(&["status", "--config", "/dev/null"], &nobody.listen());
    assert_eq!(code, 1, "no node, no store: {stderr}");

    let mut served = serve_on_a_free_port(
        |port| {
            let mut serve = Command::new(BIN);
            serve
                .args(["serve", "--config", "/dev/null"])
                .stderr(Stdio::null())
                .envs(env(&format!("127.0.0.1:{port}")));
            serve
        },
        "edge-test-07",
    );
    let listen = format!("127.0.0.1:{}", served.port);
    let (code, stdout, stderr) = run_with(&["status", "--config", "/dev/null"], &listen);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout.contains("running node") && stdout.contains("edge-test-07"),
        "{stdout}"
    );
    let (code, json_out, _) = run_with(&["status", "--config", "/dev/null", "--json"], &listen);
    assert_eq!(code, 0);
    let doc: serde_json::Value = serde_json::from_str(&json_out).unwrap();
    assert_eq!(doc["nodeId"], "edge-test-07");
    // Resident memory stays what the node allocates: no transparent huge
    // pages, which the kernel would fill with zeroes in the background.
    let proc_status =
        std::fs::read_to_string(format!("/proc/{}/status", served.child.id())).unwrap();
    assert!(
        proc_status.lines().any(|l| l == "THP_enabled:\t0"),
        "the node runs with transparent huge pages: {proc_status}"
    );

    // SIGTERM: a clean stop with exit code 0.
    assert!(Command::new("kill")
        .arg(served.child.id().to_string())
        .status()
        .unwrap()
        .success());
    let status = served.child.wait().unwrap();
    assert_eq!(status.code(), Some(0), "serve did not stop cleanly");

    let (code, stdout, stderr) = run_with(&["status", "--config", "/dev/null"], &nobody.listen());
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout.contains("node not running") && stdout.contains("edge-test-07"),
        "{stdout}"
    );
}

#[test]
fn export_and_import_move_a_replica_by_file_all_or_nothing_per_school() {
    use crate::support::*;
    use emis_edge::domain::{EventType, SyncSource};
    let (a, b, c) = (
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    );
    {
        let store = emis_edge::store::Store::open(
            &a.path().join(emis_edge::config::STORE_FILE),
            &Default::default(),
        )
        .unwrap();
        let mut changes = Vec::new();
        for n in 0..30u128 {
            let t = EventType::ClassCreated;
            let env = envelope(t, id(40_000 + n), T0, Some(1), school(1 + n % 2));
            changes.push(parse(t, &merge(env, class_fields(id(n), "Lớp 10A1"))));
        }
        store
            .apply_batch(&batch(changes), T0, SyncSource::Kafka)
            .unwrap();
    }
    let nobody = ReservedPort::new(); // no node answers there
    let listen = nobody.listen();
    let env_for = |dir: &tempfile::TempDir| {
        vec![
            (
                "EMIS_EDGE__NODE__DATA_DIR".to_owned(),
                dir.path().to_str().unwrap().to_owned(),
            ),
            ("EMIS_EDGE__HTTP__LISTEN".to_owned(), listen.clone()),
            ("EMIS_EDGE__SCHOOLS__ALL".to_owned(), "true".to_owned()),
        ]
    };
    let run_in = |dir: &tempfile::TempDir, args: &[&str]| {
        let env = env_for(dir);
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        run(args, &env)
    };
    let file = a.path().join("usb.ndjson");
    let file = file.to_str().unwrap();
    let (code, _, stderr) = run_in(&a, &["export", "--config", "/dev/null", "--out", file]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stderr.contains("wrote 32 lines"), "{stderr}");

    let (code, stdout, stderr) = run_in(&b, &["import", "--config", "/dev/null", file]);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(stdout.matches("  ok  records 15").count(), 2, "{stdout}");
    // Into an empty store: written in key order, nothing left to compact.
    assert!(stderr.contains("nothing to compact"), "{stderr}");
    let (_, json_out, _) = run_in(&b, &["status", "--config", "/dev/null", "--json"]);
    let doc: serde_json::Value = serde_json::from_str(&json_out).unwrap();
    assert_eq!(doc["entities"]["classes"], 30);

    // Cut before the second school's end line: the first school imports,
    // the second changes nothing, and the exit code says so.
    let text = std::fs::read_to_string(file).unwrap();
    let cut = &text[..text.trim_end().rfind('\n').unwrap() + 1];
    let cut_file = c.path().join("cut.ndjson");
    std::fs::write(&cut_file, cut).unwrap();
    let (code, stdout, _) = run_in(
        &c,
        &[
            "import",
            "--config",
            "/dev/null",
            cut_file.to_str().unwrap(),
        ],
    );
    assert_eq!(code, 1, "{stdout}");
    assert!(
        stdout.contains("FAILED") && stdout.contains("truncated"),
        "{stdout}"
    );
    let (_, json_out, _) = run_in(&c, &["status", "--config", "/dev/null", "--json"]);
    let doc: serde_json::Value = serde_json::from_str(&json_out).unwrap();
    assert_eq!(doc["entities"]["classes"], 15);
}

#[test]
fn under_systemd_the_node_reports_ready_status_and_stopping() {
    use std::os::unix::net::UnixDatagram;
    let dir = tempfile::tempdir().unwrap();
    let socket_path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    // Port 0: nothing here connects to the node's API.
    let listen = "127.0.0.1:0";
    let mut child = Command::new(BIN)
        .args(["serve", "--config", "/dev/null"])
        .env("EMIS_EDGE__NODE__DATA_DIR", dir.path())
        .env("EMIS_EDGE__HTTP__LISTEN", listen)
        .env("EMIS_EDGE__SCHOOLS__ALL", "true")
        .env("NOTIFY_SOCKET", &socket_path)
        .env("WATCHDOG_USEC", "2000000")
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut received = String::new();
    let mut buf = [0u8; 4096];
    while !(received.contains("READY=1") && received.contains("WATCHDOG=1")) {
        let n = socket
            .recv(&mut buf)
            .expect("no notification from the node");
        received.push_str(&String::from_utf8_lossy(&buf[..n]));
        received.push('\n');
    }
    assert!(
        received.contains("STATUS=not ready (no data yet); kafka not configured"),
        "{received}"
    );
    assert!(Command::new("kill")
        .arg(child.id().to_string())
        .status()
        .unwrap()
        .success());
    loop {
        let n = socket.recv(&mut buf).expect("no STOPPING=1");
        if String::from_utf8_lossy(&buf[..n]).contains("STOPPING=1") {
            break;
        }
    }
    assert_eq!(child.wait().unwrap().code(), Some(0));
}

#[test]
fn the_systemd_unit_verifies_and_its_exposure_is_ok() {
    let unit = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/packaging/systemd/emis-edge.service"
    ))
    .unwrap();
    assert!(unit.contains("Type=notify") && unit.contains("WatchdogSec="));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("emis-edge.service");
    std::fs::write(&path, unit.replace("/usr/bin/emis-edge", BIN)).unwrap();
    let verify = Command::new("systemd-analyze")
        .args(["verify"])
        .arg(&path)
        .env("SYSTEMD_LOG_LEVEL", "notice")
        .output()
        .expect("systemd-analyze (Debian package systemd) is needed");
    assert!(
        verify.status.success() && verify.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&verify.stderr)
    );
    let security = Command::new("systemd-analyze")
        .args(["security", "--offline=true", "--no-pager"])
        .arg(&path)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&security.stdout).into_owned()
        + &String::from_utf8_lossy(&security.stderr);
    let score: f64 = text
        .split("Overall exposure level for emis-edge.service:")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no exposure score in:\n{text}"));
    assert!(score <= 2.0, "exposure {score} > 2.0:\n{text}");
}

#[test]
fn the_prometheus_alert_rules_are_valid() {
    let rules = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/packaging/prometheus/emis-edge.rules.yml"
    );
    let out = match Command::new("promtool")
        .args(["check", "rules", rules])
        .output()
    {
        Ok(out) => out,
        Err(_) => {
            let install = "apt-get install prometheus (it checks the alert rules)";
            return missing_tool("promtool", "EMIS_EDGE_SKIP_PROMTOOL", install);
        }
    };
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("10 rules found"),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_debian_package_holds_the_binary_unit_config_and_maintainer_scripts() {
    // `cargo deb` packages the binary this test run built (dev profile,
    // unstripped, fast compression): the same metadata as a release build.
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let has_cargo_deb = Command::new(&cargo)
        .args(["deb", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !has_cargo_deb {
        let install = "cargo install cargo-deb --version 3.8.0 --locked";
        return missing_tool("cargo-deb", "EMIS_EDGE_SKIP_CARGO_DEB", install);
    }
    let out_dir = tempfile::tempdir().unwrap();
    let built = Command::new(&cargo)
        .args([
            "deb",
            "--profile",
            "dev",
            "--no-build",
            "--no-strip",
            "--fast",
            "-o",
        ])
        .arg(out_dir.path())
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    assert!(
        built.status.success(),
        "{}",
        String::from_utf8_lossy(&built.stderr)
    );
    let deb = std::fs::read_dir(out_dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .expect("a .deb");
    let listing = Command::new("dpkg-deb")
        .arg("-c")
        .arg(&deb)
        .output()
        .unwrap();
    let files = String::from_utf8_lossy(&listing.stdout);
    for (path, mode) in [
        ("./usr/bin/emis-edge", "-rwxr-xr-x"),
        ("./etc/emis-edge/edge.toml", "-rw-r-----"),
        ("./usr/lib/systemd/system/emis-edge.service", "-rw-r--r--"),
        (
            "./usr/share/emis-edge/prometheus/emis-edge.rules.yml",
            "-rw-r--r--",
        ),
        ("./usr/share/emis-edge/grafana/emis-edge.json", "-rw-r--r--"),
        ("./usr/share/doc/emis-edge/OPERATIONS.md", "-rw-r--r--"),
        ("./usr/share/man/man1/emis-edge.1.gz", "-rw-r--r--"),
        ("./usr/share/man/man1/emis-edge-serve.1.gz", "-rw-r--r--"),
        (
            "./usr/share/bash-completion/completions/emis-edge",
            "-rw-r--r--",
        ),
        (
            "./usr/share/zsh/vendor-completions/_emis-edge",
            "-rw-r--r--",
        ),
        (
            "./usr/share/fish/vendor_completions.d/emis-edge.fish",
            "-rw-r--r--",
        ),
        ("./usr/share/doc/emis-edge/openapi.json", "-rw-r--r--"),
    ] {
        assert!(
            files
                .lines()
                .any(|l| l.starts_with(mode) && l.ends_with(path)),
            "{path} ({mode}) missing from:\n{files}"
        );
    }
    let control = dir_with(&deb, "--ctrl-tarfile");
    for part in ["./conffiles", "./postinst", "./postrm"] {
        assert!(control.contains(part), "{part} missing: {control}");
    }
    let info = Command::new("dpkg-deb")
        .arg("-f")
        .arg(&deb)
        .arg("Depends")
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&info.stdout).contains("adduser"));
    let conffiles = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "dpkg-deb --ctrl-tarfile {} | tar -xO ./conffiles",
            deb.display()
        ))
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&conffiles.stdout).trim(),
        "/etc/emis-edge/edge.toml"
    );
    let postinst = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "dpkg-deb --ctrl-tarfile {} | tar -xO ./postinst",
            deb.display()
        ))
        .output()
        .unwrap();
    let postinst = String::from_utf8_lossy(&postinst.stdout);
    assert!(
        postinst.contains("adduser --system") && postinst.contains("deb-systemd-helper"),
        "{postinst}"
    );

    // In CI (a throwaway machine, as root): install it as a user would, and
    // check what the maintainer scripts did; then purge it.
    let root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.starts_with(b"0\n"));
    if std::env::var_os("CI").is_none() || !root {
        eprintln!("not installing the package outside CI");
        return;
    }
    let sh = |script: &str| {
        let out = Command::new("sh")
            .arg("-c")
            .arg(script)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        (out.status.success(), text)
    };
    let (ok, log) = sh(&format!("apt-get install -y {}", deb.display()));
    assert!(ok, "apt install failed:\n{log}");
    let checks = [
        ("id -u emis-edge", ""),
        ("stat -c '%U:%G %a' /var/lib/emis-edge", "emis-edge:emis-edge 750"),
        ("stat -c '%U:%G %a' /etc/emis-edge/edge.toml", "root:emis-edge 640"),
        (
            "test -L /etc/systemd/system/multi-user.target.wants/emis-edge.service && echo enabled",
            "enabled",
        ),
        (
            "su -s /bin/sh emis-edge -c 'emis-edge check-config --config /etc/emis-edge/edge.toml' >/dev/null && echo valid",
            "valid",
        ),
    ];
    let mut failures = Vec::new();
    for (script, expect) in checks {
        let (ok, out) = sh(script);
        if !ok || !out.contains(expect) {
            failures.push(format!("{script}: {out}"));
        }
    }
    let (purged, log) = sh("apt-get purge -y emis-edge");
    assert!(failures.is_empty(), "after apt install: {failures:#?}");
    assert!(purged, "purge failed:\n{log}");
}

fn dir_with(deb: &Path, flag: &str) -> String {
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!("dpkg-deb {flag} {} | tar -t", deb.display()))
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn compact_refuses_while_the_node_runs_and_shrinks_a_stopped_nodes_store() {
    use crate::support::*;
    use emis_edge::domain::{EventType, SyncSource};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(emis_edge::config::STORE_FILE);
    {
        // A store with freed pages: classes created, then renamed twice.
        let store = emis_edge::store::Store::open(&path, &Default::default()).unwrap();
        for round in 0..3u64 {
            let mut changes = Vec::new();
            for n in 0..3000u128 {
                let t = EventType::ClassCreated;
                let env = envelope(
                    t,
                    id(40_000 + n + 10_000 * u128::from(round)),
                    T0,
                    Some(round + 1),
                    school(1),
                );
                changes.push(parse(
                    t,
                    &merge(env, class_fields(id(n), &format!("Lớp {round}A{n}"))),
                ));
            }
            store
                .apply_batch(&batch(changes), T0, SyncSource::Kafka)
                .unwrap();
        }
    }
    let data_dir = dir.path().to_str().unwrap().to_owned();
    let env_for = |listen: String| {
        [
            ("EMIS_EDGE__NODE__DATA_DIR", data_dir.clone()),
            ("EMIS_EDGE__HTTP__LISTEN", listen),
            ("EMIS_EDGE__NODE__ID", "edge-test-compact".to_owned()),
            ("EMIS_EDGE__SCHOOLS__ALL", "true".to_owned()),
            // The node must not compact by itself at start here.
            ("EMIS_EDGE__STORE__COMPACT_AT_FREE_SHARE", "1.0".to_owned()),
        ]
    };
    let mut served = serve_on_a_free_port(
        |port| {
            let mut serve = Command::new(BIN);
            serve
                .args(["serve", "--config", "/dev/null"])
                .stderr(Stdio::null())
                .envs(env_for(format!("127.0.0.1:{port}")));
            serve
        },
        "edge-test-compact",
    );
    let env = env_for(format!("127.0.0.1:{}", served.port));
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let env = env.as_slice();
    let before = std::fs::read(&path).unwrap();
    let (code, _, stderr) = run(&["compact", "--config", "/dev/null"], env);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("stop it first"), "{stderr}");
    assert!(Command::new("kill")
        .arg(served.child.id().to_string())
        .status()
        .unwrap()
        .success());
    assert_eq!(served.child.wait().unwrap().code(), Some(0));
    assert!(
        std::fs::metadata(&path).unwrap().len() as usize >= before.len(),
        "the refused compaction changed nothing"
    );

    let (code, stdout, stderr) = run(&["compact", "--config", "/dev/null"], env);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout.contains("before") && stdout.contains("after"),
        "{stdout}"
    );
    let after = std::fs::metadata(&path).unwrap().len() as usize;
    assert!(after < before.len(), "{} → {after}", before.len());
    let (code, json_out, _) = run(&["status", "--config", "/dev/null", "--json"], env);
    assert_eq!(code, 0);
    let doc: serde_json::Value = serde_json::from_str(&json_out).unwrap();
    assert_eq!(doc["entities"]["classes"], 3000, "every class kept");
    let (code, tables, _) = run(&["status", "--config", "/dev/null", "--tables"], env);
    assert_eq!(code, 0);
    assert!(
        tables.contains("classes") && tables.contains("free share"),
        "{tables}"
    );
}

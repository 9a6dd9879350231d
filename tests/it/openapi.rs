//! The OpenAPI description (`GET /api/openapi.json`, `docs/openapi.json`):
//! generated from the code, the same as the committed file, valid, and
//! describing exactly the routes the node answers.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;

use emis_edge::api::openapi::openapi_json_text;
use serde_json::Value;

use crate::support::*;

fn committed() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/openapi.json")
}

/// docs/openapi.json is written here from the code; the test fails when
/// it had to change it, so a stale committed file fails CI (run the test
/// again and commit the file).
#[test]
fn docs_openapi_json_is_the_generated_description() {
    let generated = openapi_json_text();
    let path = committed();
    let before = std::fs::read_to_string(&path).unwrap_or_default();
    if before != generated {
        std::fs::write(&path, &generated).unwrap();
        panic!(
            "{} was out of date and has been rewritten from the code: review and commit it",
            path.display()
        );
    }
}

/// `openapi-spec-validator` (pip) accepts the document as OpenAPI 3.1.
/// Missing, the test fails unless EMIS_EDGE_SKIP_OPENAPI_VALIDATOR=1.
#[test]
fn the_description_passes_openapi_spec_validator() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("openapi.json");
    std::fs::write(&file, openapi_json_text()).unwrap();
    // The script pip installs, else the module (a script directory that is
    // not on PATH).
    let run = |cmd: &str, args: &[&str]| {
        std::process::Command::new(cmd)
            .args(args)
            .arg(&file)
            .output()
            .ok()
            .filter(|o| {
                o.status.success()
                    || !String::from_utf8_lossy(&o.stderr).contains("No module named")
            })
    };
    let out = match run("openapi-spec-validator", &[])
        .or_else(|| run("python3", &["-m", "openapi_spec_validator"]))
        .ok_or("neither `openapi-spec-validator` nor `python3 -m openapi_spec_validator` runs")
    {
        Ok(out) => out,
        Err(e) => {
            if std::env::var("EMIS_EDGE_SKIP_OPENAPI_VALIDATOR").as_deref() == Ok("1") {
                eprintln!("SKIPPED: openapi-spec-validator not found ({e}); EMIS_EDGE_SKIP_OPENAPI_VALIDATOR=1");
                return;
            }
            panic!(
                "openapi-spec-validator not found ({e}): `pip install openapi-spec-validator`, \
                 or set EMIS_EDGE_SKIP_OPENAPI_VALIDATOR=1 to skip this check"
            );
        }
    };
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "the validator refused it:\n{text}");
    assert!(text.contains("OK"), "{text}");
}

fn spec() -> Value {
    serde_json::from_str(&openapi_json_text()).unwrap()
}

/// The paths the router answers, from its own description of itself
/// (axum's `Debug` lists every route's path), less the fallbacks.
fn router_paths(router: &axum::Router) -> BTreeSet<String> {
    let text = format!("{router:?}");
    let start = text.find("paths: {").expect("axum's Debug lists the paths");
    let end = start + text[start..].find("\"}").unwrap() + 1;
    text[start..end]
        .split('"')
        .skip(1)
        .step_by(2)
        .filter(|p| !p.contains("__private__axum"))
        .map(str::to_owned)
        .collect()
}

fn node_state(
    configure: impl FnOnce(&mut emis_edge::config::Config),
) -> (tempfile::TempDir, emis_edge::api::ApiState) {
    let dir = tempfile::tempdir().unwrap();
    let store =
        emis_edge::store::Store::open(&dir.path().join("s.redb"), &Default::default()).unwrap();
    let mut config = emis_edge::config::Config::default();
    configure(&mut config);
    let node = emis_edge::state::NodeState::new(
        Arc::new(store),
        config,
        emis_edge::clock::ManualClock::new(T0),
    );
    (
        dir,
        emis_edge::api::ApiState::new(node, Vec::new(), Default::default()),
    )
}

/// Every route the node answers has its description, and every described
/// path is answered: a route added without one, or a description left
/// behind, fails here.
#[test]
fn the_router_answers_exactly_the_described_paths() {
    let described: BTreeSet<String> = spec()["paths"]
        .as_object()
        .unwrap()
        .keys()
        .cloned()
        .collect();
    let (_dir, state) = node_state(|_| {});
    let answered = router_paths(&emis_edge::api::router(state.clone()));
    assert_eq!(answered, described);
    // The check sees a route added without a description.
    let extra = axum::Router::new().route("/api/undescribed", axum::routing::get(|| async { "" }));
    let answered = router_paths(&emis_edge::api::router_with(state, extra));
    assert_eq!(
        answered.difference(&described).collect::<Vec<_>>(),
        vec!["/api/undescribed"]
    );
    // Contract §4 routes are all there (and §6's once the feed exists).
    for path in [
        "/api/teachers/{teacherId}",
        "/api/classes/{classId}",
        "/api/schools/{schoolId}/classes",
        "/api/schools/{schoolId}/teachers",
        "/api/schools/{schoolId}/snapshot",
        "/api/sync/status",
        "/api/sync/dead-letters",
        "/health/live",
        "/health/ready",
        "/metrics",
        "/api/openapi.json",
    ] {
        assert!(described.contains(path), "{path} is not described");
    }
    // With health and metrics on their own listener, the two routers
    // together answer the same set.
    let (_dir, state) = node_state(|c| c.http.ops_listen = Some("127.0.0.1:0".parse().unwrap()));
    let mut split = router_paths(&emis_edge::api::router(state.clone()));
    let ops = router_paths(&emis_edge::api::ops_router(state));
    assert!(split.is_disjoint(&ops), "{split:?} {ops:?}");
    split.extend(ops);
    assert_eq!(split, described);
}

/// The examples an app developer reads are Vietnamese school data.
#[test]
fn the_examples_use_vietnamese_school_data() {
    let text = openapi_json_text();
    for word in [
        "Nguyễn Thị Hương",
        "Lớp 10A1",
        "Khối 10",
        "2024-2025",
        "Toán",
    ] {
        assert!(text.contains(word), "no example with {word}");
    }
    let spec = spec();
    assert_eq!(spec["openapi"], "3.1.0");
    let teacher = &spec["components"]["schemas"]["TeacherDetail"];
    assert!(teacher.is_object(), "{teacher:#}");
}

/// The node serves the same document, without a token, also when the API
/// needs one.
#[tokio::test]
async fn the_node_serves_its_description() {
    let secrets = tempfile::tempdir().unwrap();
    let path = secrets.path().join("api-tokens");
    std::fs::write(&path, "school-app-token-0123456789\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    let node = TestNode::start(|c| c.http.token_file = Some(path)).await;
    let (status, ct, body) = node.get("/api/openapi.json").await;
    assert_eq!(status, 200);
    assert_eq!(ct, "application/json");
    assert_eq!(String::from_utf8(body).unwrap(), openapi_json_text());
}

//! The Grafana dashboard (`packaging/grafana/emis-edge.json`): importable
//! as it is (a datasource input, a uid, a recent schema), and every metric
//! its queries select exists in what a real node exposes at `/metrics` —
//! a node fed over Kafka, with a dead letter and a resync behind it, so that
//! every family has samples.

use std::collections::{HashMap, HashSet};

use emis_edge::domain::EventType;
use serde_json::{json, Value};

use crate::kafka::{event, handled, wait_status, Kafka};
use crate::support::*;

fn dashboard() -> Value {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/packaging/grafana/emis-edge.json"
    );
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).expect("the dashboard is JSON")
}

/// The metric names a PromQL expression selects: identifiers outside label
/// matchers, ranges and strings that are neither functions, keywords nor
/// the label lists of `by (…)` and the like. Grafana's `$variables` are not
/// metrics either.
fn metric_names(expr: &str) -> Vec<String> {
    const LABEL_LISTS: &[&str] = &[
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
    ];
    // Aggregations may put `by (…)` between their name and their
    // parenthesis.
    const KEYWORDS: &[&str] = &[
        "bool",
        "and",
        "or",
        "unless",
        "offset",
        "inf",
        "nan",
        "sum",
        "min",
        "max",
        "avg",
        "group",
        "stddev",
        "stdvar",
        "count",
        "count_values",
        "bottomk",
        "topk",
        "quantile",
        "limitk",
        "limit_ratio",
    ];
    let c: Vec<char> = expr.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    // Index just past the bracket that closes the one at `i`, skipping
    // quoted strings.
    let close = |mut i: usize, open: char, shut: char| {
        let mut depth = 0;
        while i < c.len() {
            match c[i] {
                '"' | '\'' | '`' => {
                    let q = c[i];
                    i += 1;
                    while i < c.len() && c[i] != q {
                        i += if c[i] == '\\' { 2 } else { 1 };
                    }
                }
                ch if ch == open => depth += 1,
                ch if ch == shut => {
                    depth -= 1;
                    if depth == 0 {
                        return i + 1;
                    }
                }
                _ => {}
            }
            i += 1;
        }
        c.len()
    };
    let word = |i: usize| {
        let mut j = i;
        while j < c.len() && (c[j].is_ascii_alphanumeric() || c[j] == '_' || c[j] == ':') {
            j += 1;
        }
        j
    };
    while i < c.len() {
        match c[i] {
            '{' => i = close(i, '{', '}'),
            '[' => i = close(i, '[', ']'),
            '"' | '\'' | '`' => {
                let q = c[i];
                i += 1;
                while i < c.len() && c[i] != q {
                    i += if c[i] == '\\' { 2 } else { 1 };
                }
                i += 1;
            }
            // A variable, a number or a duration.
            '$' => i = word(i + 1),
            ch if ch.is_ascii_digit() || ch == '.' => {
                while i < c.len() && (c[i].is_ascii_alphanumeric() || c[i] == '.') {
                    i += 1;
                }
            }
            ch if ch.is_ascii_alphabetic() || ch == '_' || ch == ':' => {
                let end = word(i);
                let name: String = c[i..end].iter().collect();
                let mut next = end;
                while next < c.len() && c[next].is_whitespace() {
                    next += 1;
                }
                let call = c.get(next) == Some(&'(');
                i = end;
                if call && LABEL_LISTS.contains(&name.as_str()) {
                    i = close(next, '(', ')');
                } else if !call && !KEYWORDS.contains(&name.to_ascii_lowercase().as_str()) {
                    out.push(name);
                }
            }
            _ => i += 1,
        }
    }
    out
}

#[test]
fn the_promql_reader_finds_metrics_and_nothing_else() {
    assert_eq!(
        metric_names(
            r#"histogram_quantile(0.99, sum by (le, route) (rate(a_bucket{instance=~"$instance", x="}by(y)"}[$__rate_interval])))
               / on (instance) group_left (kind) b_total offset 5m > bool 1e3 and time() - c"#
        ),
        ["a_bucket", "b_total", "c"]
    );
}

/// Every PromQL query of the dashboard (panel targets, nested panels of
/// rows) with where it is, and the metrics of its variable queries.
fn queries(d: &Value) -> Vec<(String, String)> {
    fn walk(panels: &Value, out: &mut Vec<(String, String)>) {
        for p in panels.as_array().into_iter().flatten() {
            for t in p["targets"].as_array().into_iter().flatten() {
                let expr = t["expr"].as_str().expect("every target has an expr");
                let title = p["title"].as_str().unwrap_or("?");
                out.push((format!("panel {title:?}"), expr.to_owned()));
            }
            walk(&p["panels"], out);
        }
    }
    let mut out = Vec::new();
    walk(&d["panels"], &mut out);
    for v in d["templating"]["list"].as_array().into_iter().flatten() {
        if v["type"] == "query" {
            let q = v["query"]
                .as_str()
                .or_else(|| v["query"]["query"].as_str())
                .unwrap();
            // label_values(metric, label): the metric (a selector) counts.
            let selector = q
                .strip_prefix("label_values(")
                .and_then(|rest| rest.rsplit_once(','))
                .map_or(q, |(metric, _)| metric);
            let name = v["name"].as_str().unwrap_or("?");
            out.push((format!("variable {name:?}"), selector.to_owned()));
        }
    }
    out
}

/// Sample names and `# TYPE` families of a Prometheus text exposition.
fn exposed(text: &str) -> (HashSet<String>, HashMap<String, String>) {
    let mut samples = HashSet::new();
    let mut families = HashMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap();
            families.insert(name.to_owned(), kind.to_owned());
        } else if !line.starts_with('#') && !line.is_empty() {
            let end = line.find(['{', ' ']).unwrap_or(line.len());
            samples.insert(line[..end].to_owned());
        }
    }
    (samples, families)
}

#[test]
fn the_dashboard_imports_as_it_is() {
    let d = dashboard();
    assert_eq!(d["title"], "emis-edge");
    assert!(d["uid"].as_str().is_some_and(|u| !u.is_empty()));
    assert!(d["schemaVersion"].as_u64().unwrap() >= 36);
    assert!(d["id"].is_null(), "an exported dashboard has no id");
    let inputs = d["__inputs"].as_array().unwrap();
    assert!(
        inputs
            .iter()
            .any(|i| i["name"] == "DS_PROMETHEUS" && i["pluginId"] == "prometheus"),
        "{inputs:?}"
    );
    // Every query goes to the datasource chosen at import, and panel ids
    // are unique.
    let ds = json!({"type": "prometheus", "uid": "${DS_PROMETHEUS}"});
    let mut ids = HashSet::new();
    let mut panels = 0;
    for p in d["panels"].as_array().unwrap() {
        assert!(
            ids.insert(p["id"].as_u64().unwrap()),
            "id {} twice",
            p["id"]
        );
        assert!(p["gridPos"]["w"].as_u64().unwrap() <= 24);
        if p["type"] == "row" {
            continue;
        }
        panels += 1;
        assert_eq!(p["datasource"], ds, "{}", p["title"]);
        let targets = p["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "{} queries nothing", p["title"]);
        for t in targets {
            assert_eq!(t["datasource"], ds, "{}", p["title"]);
            assert!(t["refId"].is_string());
        }
    }
    assert!(panels >= 20, "{panels} panels");
    for v in d["templating"]["list"].as_array().unwrap() {
        if v["type"] == "query" {
            assert_eq!(v["datasource"], ds);
        }
    }
}

/// Prometheus's own parser (`promtool check rules`, package prometheus)
/// accepts every query, with Grafana's variables replaced by what Grafana
/// puts there.
#[test]
fn every_query_of_the_dashboard_is_valid_promql() {
    let rules: Vec<Value> = queries(&dashboard())
        .into_iter()
        .enumerate()
        .map(|(n, (_, expr))| {
            let expr = expr
                .replace("$__rate_interval", "1m")
                .replace("$__interval", "1m")
                .replace("$instance", ".*");
            json!({"record": format!("emis_edge:dashboard_query_{n}"), "expr": expr})
        })
        .collect();
    let count = rules.len();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("dashboard.rules.json");
    // A rules file is YAML, and JSON is YAML.
    std::fs::write(
        &file,
        json!({"groups": [{"name": "dashboard", "rules": rules}]}).to_string(),
    )
    .unwrap();
    let out = match std::process::Command::new("promtool")
        .args(["check", "rules"])
        .arg(&file)
        .output()
    {
        Ok(out) => out,
        Err(_) => {
            assert!(
                std::env::var_os("EMIS_EDGE_SKIP_PROMTOOL").is_some_and(|v| v == "1"),
                "promtool is needed to check the dashboard's queries (apt-get install \
                 prometheus), or set EMIS_EDGE_SKIP_PROMTOOL=1"
            );
            return;
        }
    };
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains(&format!("{count} rules found")),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_the_dashboard_queries_exists_on_a_real_node() {
    // A central node to resync from, and the node under test fed over Kafka.
    let central = TestNode::start(|_| {}).await;
    central.apply(vec![parse(
        EventType::ClassCreated,
        &merge(
            envelope(EventType::ClassCreated, id(900), T0, Some(1), school(1)),
            class_fields(id(1), "Lớp 10A1"),
        ),
    )]);
    let kafka = Kafka::start(1);
    let node = TestNode::start(|c| {
        kafka.configure(c);
        c.schools.ids = vec![school(1)];
        c.resync.central_url = Some(central.url(""));
    })
    .await;
    kafka.send(
        EventType::TeacherCreated,
        &[event(
            EventType::TeacherCreated,
            1,
            1,
            Some(1),
            1,
            teacher_fields(id(11), "Nguyễn Thị Hương"),
        )],
    );
    kafka.send_raw("emis.class.created", 0, &[b"{not json".to_vec()]);
    wait_status(&node, "2 events handled", |v| handled(v) == 2).await;
    let resync = node
        .http
        .post(node.url("/api/admin/resync"))
        .send()
        .await
        .unwrap();
    assert_eq!(resync.status(), 200, "{}", resync.text().await.unwrap());
    assert_eq!(node.get("/api/teachers/not-a-uuid").await.0, 400);

    let (status, _, body) = node.get("/metrics").await;
    assert_eq!(status, 200);
    let text = String::from_utf8(body).unwrap();
    let (samples, families) = exposed(&text);

    let d = dashboard();
    let mut missing = Vec::new();
    let mut used = HashSet::new();
    for (place, expr) in queries(&d) {
        let names = metric_names(&expr);
        assert!(!names.is_empty(), "{place}: no metric in {expr:?}");
        for name in names {
            // A histogram's or counter's series map to their family.
            let family = ["_bucket", "_sum", "_count", "_total"]
                .iter()
                .find_map(|s| name.strip_suffix(s))
                .filter(|f| families.contains_key(*f))
                .unwrap_or(&name)
                .to_owned();
            if !(samples.contains(&name) || families.contains_key(&name)) {
                missing.push(format!("{place}: {name} in {expr:?}"));
            }
            used.insert(family);
        }
    }
    assert!(
        missing.is_empty(),
        "the dashboard queries metrics the node does not expose:\n{}\n\n/metrics:\n{text}",
        missing.join("\n")
    );
    // What the dashboard is for: each area has its panels.
    for family in [
        "emis_edge_events",
        "emis_edge_topic_events",
        "emis_edge_partition_lag",
        "emis_edge_sync_latency_seconds",
        "emis_edge_last_event_timestamp_seconds",
        "emis_edge_school_oldest_synced_timestamp_seconds",
        "emis_edge_dead_letters",
        "emis_edge_resync_schools",
        "emis_edge_resync_drift",
        "emis_edge_store_file_bytes",
        "emis_edge_http_request_duration_seconds",
        "emis_edge_worker_dead",
        "emis_edge_worker_errors",
        "emis_edge_ready",
        "emis_edge_kafka_connected",
    ] {
        // Counters are `_total` series of a family named without it in
        // OpenMetrics; the classic text names the family with it.
        let with_total = format!("{family}_total");
        assert!(
            used.contains(family) || used.contains(&with_total),
            "no panel shows {family}"
        );
    }
    node.node.stop().await.unwrap();
    central.node.stop().await.unwrap();
}

//! The status page (`GET /`) in a real browser: Debian's Chromium, headless,
//! loads it from a running node fed over the Kafka protocol, runs its script
//! and dumps the DOM it rendered; the tests read that DOM as a person reads
//! the page. Without Chromium these tests fail, unless
//! `EMIS_EDGE_SKIP_CHROMIUM=1` (`EMIS_EDGE_CHROMIUM` names another binary).

use emis_edge::domain::EventType;
use serde_json::json;

use crate::kafka::{event, handled, wait_status, Kafka};
use crate::support::*;

const NODE_ID: &str = "edge-thu-duc-01";
const TOKEN: &str = "school-it-token-0123456789";

/// The DOM Chromium rendered for `url` after the page's script ran (5 s of
/// virtual time: the first answers are drawn, timers do not hold it up), or
/// `None` when Chromium is missing and the opt-out is set.
async fn rendered(url: &str) -> Option<String> {
    let binary = std::env::var("EMIS_EDGE_CHROMIUM").unwrap_or_else(|_| "chromium".into());
    if std::process::Command::new(&binary)
        .arg("--version")
        .output()
        .is_err()
    {
        assert!(
            std::env::var_os("EMIS_EDGE_SKIP_CHROMIUM").is_some_and(|v| v == "1"),
            "the status page tests need Chromium (apt-get install chromium), or set \
             EMIS_EDGE_SKIP_CHROMIUM=1 to skip them"
        );
        eprintln!("chromium not installed: the status page is not checked in a browser");
        return None;
    }
    let profile = tempfile::tempdir().unwrap();
    let url = url.to_owned();
    let out = tokio::task::spawn_blocking(move || {
        // `timeout` bounds a browser that hangs; it never paces the test.
        std::process::Command::new("timeout")
            .arg("120")
            .arg(&binary)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--virtual-time-budget=5000",
                "--dump-dom",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg(&url)
            // Times on the page are in the browser's zone: make it known.
            .env("TZ", "UTC")
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let dom = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success() && dom.contains("</html>"),
        "chromium failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Some(dom)
}

/// The text a person sees in `html`: tags dropped, entities decoded,
/// whitespace collapsed.
fn text(html: &str) -> String {
    let mut out = String::new();
    let mut in_tag = false;
    for c in html.chars() {
        match c {
            '<' => {
                in_tag = true;
                out.push(' ');
            }
            '>' if in_tag => in_tag = false,
            c if !in_tag => out.push(c),
            _ => {}
        }
    }
    let out = out
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&#39;", "'")
        .replace("&nbsp;", " ")
        .replace("&amp;", "&");
    out.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The HTML of the page's section with this id.
fn section<'a>(dom: &'a str, id: &str) -> &'a str {
    let start = dom
        .find(&format!("id=\"{id}\""))
        .unwrap_or_else(|| panic!("no section {id} on the page:\n{dom}"));
    let end = dom[start..].find("</section>").unwrap() + start;
    &dom[start..end]
}

/// The visible text of each table row of a section.
fn rows(dom: &str, id: &str) -> Vec<String> {
    section(dom, id)
        .split("<tr")
        .skip(1)
        .map(|row| text(&format!("<tr{row}")))
        .collect()
}

/// A node serving schools 1 and 2, fed over Kafka: school 1 changes at
/// 11:00:00 (UTC), school 2 five minutes later; one malformed event (a
/// class without its name, carrying markup) is dead-lettered.
async fn node_with_data(
    configure: impl FnOnce(&mut emis_edge::config::Config),
) -> (Kafka, TestNode) {
    let kafka = Kafka::start(1);
    let node = TestNode::start(|c| {
        kafka.configure(c);
        c.node.id = NODE_ID.into();
        c.schools.ids = vec![school(1), school(2)];
        configure(c);
    })
    .await;
    use EventType::*;
    kafka.send(
        ClassCreated,
        &[
            event(
                ClassCreated,
                1,
                1,
                Some(1),
                1,
                class_fields(id(1), "Lớp 10A1"),
            ),
            event(
                ClassCreated,
                2,
                1,
                Some(1),
                1,
                class_fields(id(2), "Lớp 10A2"),
            ),
        ],
    );
    kafka.send(
        TeacherCreated,
        &[event(
            TeacherCreated,
            3,
            1,
            Some(1),
            1,
            teacher_fields(id(11), "Nguyễn Thị Hương"),
        )],
    );
    let mut bad = event(
        ClassCreated,
        4,
        1,
        None,
        1,
        json!({"classId": id(3), "note": "<img src=x onerror=\"document.title='pwned'\">"}),
    );
    bad.as_object_mut().unwrap().remove("className");
    kafka.send(ClassCreated, &[bad]);
    wait_until(&node, 4).await;
    node.clock.set(node.clock.now_value() + 300 * SEC);
    kafka.send(
        ClassCreated,
        &[event(
            ClassCreated,
            5,
            2,
            Some(1),
            2,
            class_fields(id(4), "Lớp 6A"),
        )],
    );
    wait_until(&node, 5).await;
    (kafka, node)
}

/// Waits until the node handled `n` events (the status read with the
/// token, which a node without tokens ignores).
async fn wait_until(node: &TestNode, n: u64) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let v: serde_json::Value = node
            .http
            .get(node.url("/api/sync/status"))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if handled(&v) >= n {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {n} events; status: {v:#}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_shows_the_node_its_schools_freshness_and_dead_letters() {
    let (_kafka, node) = node_with_data(|_| {}).await;
    // The high watermarks come from the Kafka client's statistics, once a
    // second, not with the events: wait for the one that counts the last.
    wait_status(&node, "the high watermark of emis.class.created [0]", |v| {
        v["partitions"].as_array().is_some_and(|ps| {
            ps.iter().any(|p| {
                p["topic"] == "emis.class.created" && p["partition"] == 0 && p["highWatermark"] == 4
            })
        })
    })
    .await;
    // What the node sends: self-contained HTML that may load nothing from
    // elsewhere.
    let r = node.http.get(node.url("/")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "text/html; charset=utf-8");
    let csp = r.headers()["content-security-policy"].to_str().unwrap();
    assert!(csp.contains("default-src 'none'") && csp.contains("connect-src 'self'"));
    let html = r.text().await.unwrap();
    for external in ["<link", "src=\"http", "@import", "url(http"] {
        assert!(!html.contains(external), "the page loads {external}…");
    }

    let Some(dom) = rendered(&node.url("/")).await else {
        return;
    };
    let page = text(&dom);
    assert!(page.contains(&format!("Nút / Node: {NODE_ID}")), "{page}");
    assert!(
        page.contains("Kafka") && page.contains("Đã kết nối / Connected"),
        "{page}"
    );

    // Per school: its last change (node clock, shown in the browser's
    // zone) and its entities; the school changed least recently first.
    let schools = rows(&dom, "schools");
    let (s1, s2) = (school(1).to_string(), school(2).to_string());
    let first = schools
        .iter()
        .position(|r| r.contains(&s1))
        .expect("school 1 listed");
    let second = schools
        .iter()
        .position(|r| r.contains(&s2))
        .expect("school 2 listed");
    assert!(first < second, "{schools:#?}");
    assert!(
        schools[first].contains("2025-10-26 11:00:00"),
        "school 1's last change: {}",
        schools[first]
    );
    // Two classes, one teacher, no assignment.
    assert!(schools[first].ends_with(" 2 1 0"), "{}", schools[first]);
    assert!(
        schools[second].contains("2025-10-26 11:05:00") && schools[second].ends_with(" 1 0 0"),
        "{}",
        schools[second]
    );

    // The dead letter: its reason, where it came from, and its payload as
    // text — the markup it carries is not markup on the page.
    let letters = rows(&dom, "dead-letters");
    assert_eq!(letters.len(), 2, "{letters:#?}");
    assert!(
        letters[1].contains("missing required field `className`")
            && letters[1].contains("emis.class.created [0] @2"),
        "{}",
        letters[1]
    );
    assert!(letters[1].contains("<img src=x onerror="), "{}", letters[1]);
    assert!(!dom.contains("<img"), "a payload became markup");
    assert!(!dom.contains("<title>pwned"), "a payload ran");

    // Lag per partition, the workers, the store file, and the sparkline of
    // the changes applied this minute (4 valid events).
    let partitions = rows(&dom, "partitions");
    assert!(
        partitions
            .iter()
            .any(|r| r.starts_with("emis.class.created 0 4 4 0")),
        "{partitions:#?}"
    );
    assert!(rows(&dom, "workers")
        .iter()
        .any(|r| r.starts_with("ingest ")));
    assert!(text(section(&dom, "store")).contains("Kích thước tệp / File size"));
    let activity = section(&dom, "activity");
    assert!(activity.contains("<polyline"), "{activity}");
    assert!(
        text(activity).contains("60 phút qua / last 60 min: 4 thay đổi / changes"),
        "{}",
        text(activity)
    );
    node.node.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_an_api_token_the_page_asks_for_it_and_then_shows_the_node() {
    let secrets = tempfile::tempdir().unwrap();
    let tokens = secrets.path().join("api-tokens");
    std::fs::write(&tokens, format!("{TOKEN}\n")).unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&tokens, std::fs::Permissions::from_mode(0o640)).unwrap();
    }
    let (_kafka, node) = node_with_data(|c| c.http.token_file = Some(tokens)).await;
    // The page itself holds no data and needs no token; what it reads does.
    assert_eq!(node.get("/").await.0, 200);
    assert_eq!(node.get("/api/sync/status").await.0, 401);

    let Some(dom) = rendered(&node.url("/")).await else {
        return;
    };
    let page = text(&dom);
    assert!(page.contains("Cần mã truy cập / Token required"), "{page}");
    assert!(dom.contains("type=\"password\""), "no token field");
    assert!(
        !page.contains(NODE_ID),
        "data shown without a token: {page}"
    );

    // A wrong token is refused, and said so.
    let Some(dom) = rendered(&node.url("/#token=not-the-token")).await else {
        return;
    };
    let page = text(&dom);
    assert!(
        page.contains("Mã không đúng. / The token was refused."),
        "{page}"
    );
    assert!(!page.contains(NODE_ID), "{page}");

    // The right one (handed over in the address, as a script would): the
    // node's state, and the token gone from the address bar.
    let Some(dom) = rendered(&node.url(&format!("/#token={TOKEN}"))).await else {
        return;
    };
    let page = text(&dom);
    assert!(page.contains(&format!("Nút / Node: {NODE_ID}")), "{page}");
    assert!(
        rows(&dom, "schools")
            .iter()
            .any(|r| r.contains(&school(1).to_string()) && r.contains("2025-10-26 11:00:00")),
        "{page}"
    );
    assert!(
        page.contains("missing required field `className`"),
        "{page}"
    );
    assert!(!dom.contains(TOKEN), "the token stays in the page");
    node.node.stop().await.unwrap();
}

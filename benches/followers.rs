//! The client side of the tiered-replication load test
//! (`benches/load/tree.sh`): what the shell cannot do precisely.
//!
//! ```text
//! followers schools   --count N [--stride K] [--scale S] [--seed N]
//! followers latency   --brokers B --followers FILE --rate R --secs S [--parent URL] [--linger-ms N]
//! followers hold      --url PARENT --count N --secs S [--wait W] [--stride K] [--out FILE]
//! followers bootstrap --bin EMIS_EDGE --config FILE --url FOLLOWER --school ID --teachers N
//! ```
//!
//! - `schools` prints the ids of N schools of the generator's data set
//!   (every K-th school), one a line.
//! - `latency` publishes the generator's trickle (`emis_edge::gen::Trickle`,
//!   as `emis-edge gen --trickle` does) at R changes/s to the broker for S
//!   seconds and measures, for every change of a followed school, the time
//!   from handing it to the producer until the follower's HTTP routes
//!   answer it: each follower's own change feed (`GET /api/changes`, held
//!   as a long-poll at the follower, so no polling interval is added) says
//!   the change is committed there, then the lookup route
//!   (`GET /api/teachers/{id}`, `GET /api/classes/{id}`) is asked and must
//!   show it; the latency is taken when that answer arrives (for an
//!   assignment, when the feed answers). FILE: `SCHOOL_ID PORT` per line.
//!   With `--parent`, one long-poll at the parent for the same schools
//!   gives the parent's own share.
//! - `hold` keeps N long-polls (`wait` W, `Accept-Encoding: gzip`, one
//!   school each: schools 0, K, 2K, …) at a parent for S seconds, as N
//!   idle school nodes would, asking again as soon as one is answered
//!   (after `Retry-After` on a 503), and counts the answers.
//! - `bootstrap` starts `EMIS_EDGE serve --config FILE` on an empty store
//!   and times, from the spawn, `/health/ready` 200 and then the school's
//!   answers (its teacher list holds N teachers and the first one's
//!   detail answers); then stops it with SIGTERM.
//!
//! Results are printed as `key=value` lines for the script.
//!
//! Build: `cargo bench --no-run --bench followers`; `cargo bench --bench
//! followers -- …` also runs it.

use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use emis_edge::clock::Clock;
use emis_edge::gen::{Province, Publisher, Spec, Trickle};

fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn num<T: std::str::FromStr>(name: &str, default: T) -> T {
    arg(name).map_or(default, |v| {
        v.parse()
            .unwrap_or_else(|_| panic!("{name} {v:?} is not a number"))
    })
}

fn need(name: &str) -> String {
    arg(name).unwrap_or_else(|| panic!("{name} is required"))
}

fn province() -> Province {
    let scale = arg("--scale").unwrap_or_else(|| "province".into());
    Province::new(
        Spec::scale(&scale, num("--seed", 1)).expect("--scale: tiny, demo, province or national"),
    )
}

fn main() {
    let mode = std::env::args().nth(1).unwrap_or_default();
    if std::env::args().any(|a| a == "--list" || a == "--test") || mode.starts_with("--") {
        return; // `cargo test --benches` / `--list` / plain `cargo bench`: nothing to run
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    match mode.as_str() {
        "schools" => schools(),
        "latency" => rt.block_on(latency()),
        "hold" => rt.block_on(hold()),
        "bootstrap" => rt.block_on(bootstrap()),
        other => panic!("unknown mode {other:?}: schools, latency, hold or bootstrap"),
    }
}

fn schools() {
    let p = province();
    let stride: u32 = num("--stride", 1);
    for i in 0..num::<u32>("--count", 1) {
        println!("{}", p.school_id((i * stride) % p.spec.schools));
    }
}

/// The change lines and the page line of one feed answer.
struct FeedAnswer {
    /// (kind, id, version) of each change line.
    lines: Vec<(String, String, u64)>,
    cursor: String,
    more: bool,
}

fn parse_feed(body: &[u8]) -> Result<FeedAnswer, String> {
    let mut lines = Vec::new();
    for raw in body.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
        let v: serde_json::Value =
            serde_json::from_slice(raw).map_err(|e| format!("bad line: {e}"))?;
        let kind = v["kind"].as_str().unwrap_or_default().to_owned();
        if kind == "page" {
            return Ok(FeedAnswer {
                lines,
                cursor: v["cursor"].as_str().unwrap_or_default().to_owned(),
                more: v["more"].as_bool().unwrap_or(false),
            });
        }
        let id = v[format!("{kind}Id")]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        lines.push((kind, id, v["version"].as_u64().unwrap_or(0)));
    }
    Err("no page line".into())
}

/// One feed request; the body decoded.
async fn feed(
    client: &reqwest::Client,
    base: &str,
    schools: &[String],
    after: Option<&str>,
    wait: u64,
    gzip: bool,
) -> Result<(u16, Vec<u8>, Option<u64>), String> {
    let query = {
        let mut q = form_urlencoded::Serializer::new(String::new());
        for s in schools {
            q.append_pair("school", s);
        }
        if let Some(a) = after {
            q.append_pair("after", a);
        }
        q.append_pair("limit", "10000");
        q.append_pair("wait", &wait.to_string());
        q.finish()
    };
    let mut request = client.get(format!("{base}/api/changes?{query}"));
    if gzip {
        request = request.header("accept-encoding", "gzip");
    }
    let response = request.send().await.map_err(|e| format!("send: {e}"))?;
    let status = response.status().as_u16();
    let retry = response
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok()?.parse().ok());
    let zipped = response
        .headers()
        .get("content-encoding")
        .is_some_and(|v| v == "gzip");
    let raw = response.bytes().await.map_err(|e| format!("body: {e}"))?;
    let body = if zipped {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(&raw[..])
            .read_to_end(&mut out)
            .map_err(|e| format!("gzip: {e}"))?;
        out
    } else {
        raw.to_vec()
    };
    Ok((status, body, retry))
}

/// Reads a school set's feed to its end; the cursor of the head.
async fn head(client: &reqwest::Client, base: &str, schools: &[String]) -> String {
    let mut after: Option<String> = None;
    loop {
        let (status, body, _) = feed(client, base, schools, after.as_deref(), 0, false)
            .await
            .unwrap_or_else(|e| panic!("{base}: {e}"));
        assert_eq!(status, 200, "{base}: {}", String::from_utf8_lossy(&body));
        let page = parse_feed(&body).unwrap();
        after = Some(page.cursor);
        if !page.more {
            return after.unwrap();
        }
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn summary(name: &str, mut ms: Vec<f64>) {
    ms.sort_by(|a, b| a.total_cmp(b));
    println!(
        "{name}_n={} {name}_p50_ms={:.1} {name}_p90_ms={:.1} {name}_p99_ms={:.1} {name}_max_ms={:.1}",
        ms.len(),
        percentile(&ms, 50.0),
        percentile(&ms, 90.0),
        percentile(&ms, 99.0),
        ms.last().copied().unwrap_or(f64::NAN)
    );
}

/// (entity id, version) → when it was handed to the producer.
type Pending = Arc<Mutex<HashMap<(String, u64), Instant>>>;

async fn latency() {
    let brokers = need("--brokers");
    let rate: f64 = num("--rate", 100.0);
    let secs: f64 = num("--secs", 30.0);
    let linger = arg("--linger-ms").unwrap_or_else(|| "0".into());
    let followers: Vec<(String, String)> = std::fs::read_to_string(need("--followers"))
        .unwrap()
        .lines()
        .filter_map(|l| {
            let mut parts = l.split_whitespace();
            Some((parts.next()?.to_owned(), parts.next()?.to_owned()))
        })
        .collect();
    let followed: std::collections::HashSet<String> =
        followers.iter().map(|(s, _)| s.clone()).collect();
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(4)
        .build()
        .unwrap();

    // Every watcher starts at its follower's head before anything is sent.
    let mut heads = Vec::new();
    for (school, port) in &followers {
        let base = format!("http://127.0.0.1:{port}");
        heads.push(head(&client, &base, std::slice::from_ref(school)).await);
    }
    let parent = arg("--parent");
    let parent_head = match &parent {
        Some(p) if !followers.is_empty() => {
            // A page that says no `more` ends at the store's head, which
            // is where the parent's long-poll for all the schools starts.
            let first = followers[0].0.clone();
            Some(head(&client, p, &[first]).await)
        }
        _ => None,
    };

    let pending: Pending = Arc::default();
    let parent_pending: Pending = Arc::default();
    let seen_max: Arc<Mutex<HashMap<String, u64>>> = Arc::default();
    let latencies: Arc<Mutex<Vec<f64>>> = Arc::default();
    let by_kind: Arc<Mutex<BTreeMap<String, Vec<f64>>>> = Arc::default();
    let parent_latencies: Arc<Mutex<Vec<f64>>> = Arc::default();
    let errors = Arc::new(Mutex::new(Vec::<String>::new()));
    let done = tokio_util::sync::CancellationToken::new();

    let mut watchers = Vec::new();
    for ((school, port), cursor) in followers.iter().zip(heads) {
        let base = format!("http://127.0.0.1:{port}");
        let (client, school) = (client.clone(), school.clone());
        let (pending, seen_max, latencies, by_kind, errors, done) = (
            pending.clone(),
            seen_max.clone(),
            latencies.clone(),
            by_kind.clone(),
            errors.clone(),
            done.clone(),
        );
        watchers.push(tokio::spawn(async move {
            let mut cursor = cursor;
            let schools = [school];
            loop {
                let answer = tokio::select! {
                    _ = done.cancelled() => return,
                    a = feed(&client, &base, &schools, Some(&cursor), 10, false) => a,
                };
                let arrived = Instant::now();
                let page = match answer {
                    Ok((200, body, _)) => parse_feed(&body),
                    Ok((status, body, _)) => Err(format!(
                        "{status}: {}",
                        String::from_utf8_lossy(&body[..body.len().min(200)])
                    )),
                    Err(e) => Err(e),
                };
                let page = match page {
                    Ok(p) => p,
                    Err(e) => {
                        errors.lock().unwrap().push(format!("{base}: {e}"));
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                cursor = page.cursor;
                for (kind, id, version) in page.lines {
                    {
                        let mut seen = seen_max.lock().unwrap();
                        let v = seen.entry(id.clone()).or_default();
                        *v = (*v).max(version);
                    }
                    let Some(sent) = pending.lock().unwrap().remove(&(id.clone(), version)) else {
                        continue;
                    };
                    let visible = match kind.as_str() {
                        "teacher" | "class" => {
                            let route = if kind == "teacher" {
                                "teachers"
                            } else {
                                "classes"
                            };
                            let url = format!("{base}/api/{route}/{id}");
                            match client.get(&url).send().await {
                                Ok(r) if r.status().is_success() => {
                                    let _ = r.bytes().await;
                                    Instant::now()
                                }
                                Ok(r) => {
                                    errors
                                        .lock()
                                        .unwrap()
                                        .push(format!("{url}: {}", r.status()));
                                    continue;
                                }
                                Err(e) => {
                                    errors.lock().unwrap().push(format!("{url}: {e}"));
                                    continue;
                                }
                            }
                        }
                        _ => arrived,
                    };
                    let ms = visible.duration_since(sent).as_secs_f64() * 1e3;
                    latencies.lock().unwrap().push(ms);
                    by_kind.lock().unwrap().entry(kind).or_default().push(ms);
                }
            }
        }));
    }
    if let (Some(base), Some(cursor)) = (parent.clone(), parent_head) {
        let (client, parent_pending, parent_latencies, done) = (
            client.clone(),
            parent_pending.clone(),
            parent_latencies.clone(),
            done.clone(),
        );
        let schools: Vec<String> = followed.iter().cloned().collect();
        watchers.push(tokio::spawn(async move {
            let mut cursor = cursor;
            loop {
                let answer = tokio::select! {
                    _ = done.cancelled() => return,
                    a = feed(&client, &base, &schools, Some(&cursor), 10, false) => a,
                };
                let arrived = Instant::now();
                let Ok((200, body, _)) = answer else {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                };
                let Ok(page) = parse_feed(&body) else {
                    continue;
                };
                cursor = page.cursor;
                for (_, id, version) in page.lines {
                    if let Some(sent) = parent_pending.lock().unwrap().remove(&(id, version)) {
                        parent_latencies
                            .lock()
                            .unwrap()
                            .push(arrived.duration_since(sent).as_secs_f64() * 1e3);
                    }
                }
            }
        }));
    }

    // The producer: the generator's trickle at `rate`, on its own thread.
    let (pending2, parent_pending2, followed2) =
        (pending.clone(), parent_pending.clone(), followed.clone());
    let with_parent = parent.is_some();
    let producer = std::thread::spawn(move || {
        let props = BTreeMap::from([("linger.ms".to_owned(), linger)]);
        let publisher = Publisher::connect(&brokers, &props).unwrap();
        let now = emis_edge::clock::SystemClock.now();
        let mut trickle = Trickle::new(province(), now, 0);
        eprintln!("publishing");
        let start = Instant::now();
        let (mut sent, mut tracked) = (0u64, 0u64);
        while start.elapsed().as_secs_f64() < secs {
            let due = (start.elapsed().as_secs_f64() * rate) as u64;
            while sent < due {
                let m = trickle.next_message();
                let v: serde_json::Value = serde_json::from_slice(&m.value).unwrap();
                let school = v["schoolId"].as_str().unwrap_or_default();
                if followed2.contains(school) {
                    let key = (m.key.clone(), v["version"].as_u64().unwrap());
                    let at = Instant::now();
                    pending2.lock().unwrap().insert(key.clone(), at);
                    if with_parent {
                        parent_pending2.lock().unwrap().insert(key, at);
                    }
                    tracked += 1;
                }
                publisher.send(&m).unwrap();
                sent += 1;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        publisher.flush(Duration::from_secs(30)).unwrap();
        (sent, tracked, start.elapsed())
    });
    let (sent, tracked, took) = tokio::task::spawn_blocking(move || producer.join().unwrap())
        .await
        .unwrap();
    // Give the last changes time to arrive, then stop the watchers.
    let grace = Instant::now();
    while !pending.lock().unwrap().is_empty() && grace.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    done.cancel();
    for w in watchers {
        let _ = w.await;
    }
    let left = std::mem::take(&mut *pending.lock().unwrap());
    let seen = seen_max.lock().unwrap();
    // A change not answered itself but followed by a newer version of the
    // same entity was superseded before the follower read it (the feed
    // shows each entity once, at its latest state); any other is lost.
    let superseded = left
        .keys()
        .filter(|(id, v)| seen.get(id).is_some_and(|max| max > v))
        .count();
    let lost = left.len() - superseded;
    println!(
        "sent={sent} rate={:.1} tracked={tracked} superseded={superseded} lost={lost} errors={}",
        sent as f64 / took.as_secs_f64(),
        errors.lock().unwrap().len()
    );
    for e in errors.lock().unwrap().iter().take(5) {
        eprintln!("error: {e}");
    }
    summary("follower", std::mem::take(&mut *latencies.lock().unwrap()));
    for (kind, ms) in std::mem::take(&mut *by_kind.lock().unwrap()) {
        summary(&format!("follower_{kind}"), ms);
    }
    if with_parent {
        summary(
            "parent",
            std::mem::take(&mut *parent_latencies.lock().unwrap()),
        );
    }
}

async fn hold() {
    let base = need("--url");
    let count: u32 = num("--count", 1000);
    let secs: u64 = num("--secs", 30);
    let wait: u64 = num("--wait", 30);
    let stride: u32 = num("--stride", 1);
    let p = province();
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(count as usize + 16)
        .build()
        .unwrap();
    let first = p.school_id(0).to_string();
    let cursor = head(&client, &base, &[first]).await;
    #[derive(Default)]
    struct Counts {
        changes: u64,
        empty: u64,
        refused: u64,
        other: u64,
        failed: u64,
    }
    let counts = Arc::new(Mutex::new(Counts::default()));
    let held = Arc::new(std::sync::atomic::AtomicI64::new(0));
    let peak = Arc::new(std::sync::atomic::AtomicI64::new(0));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    let mut tasks = Vec::new();
    for i in 0..count {
        let school = p.school_id((i * stride) % p.spec.schools).to_string();
        let (client, base, counts, held, peak) = (
            client.clone(),
            base.clone(),
            counts.clone(),
            held.clone(),
            peak.clone(),
        );
        let mut cursor = cursor.clone();
        tasks.push(tokio::spawn(async move {
            let schools = [school];
            loop {
                use std::sync::atomic::Ordering::SeqCst;
                let now = held.fetch_add(1, SeqCst) + 1;
                peak.fetch_max(now, SeqCst);
                let answer = tokio::select! {
                    _ = tokio::time::sleep_until(deadline) => { held.fetch_sub(1, SeqCst); return }
                    a = feed(&client, &base, &schools, Some(&cursor), wait, true) => a,
                };
                held.fetch_sub(1, SeqCst);
                let mut pause = Duration::ZERO;
                {
                    let mut c = counts.lock().unwrap();
                    match answer {
                        Ok((200, body, _)) => match parse_feed(&body) {
                            Ok(page) => {
                                if page.lines.is_empty() {
                                    c.empty += 1;
                                } else {
                                    c.changes += 1;
                                }
                                cursor = page.cursor;
                            }
                            Err(_) => c.other += 1,
                        },
                        Ok((503, _, retry)) => {
                            c.refused += 1;
                            pause = Duration::from_secs(retry.unwrap_or(5));
                        }
                        Ok(_) => {
                            c.other += 1;
                            pause = Duration::from_secs(1);
                        }
                        Err(_) => {
                            c.failed += 1;
                            pause = Duration::from_secs(1);
                        }
                    }
                }
                if !pause.is_zero() {
                    tokio::select! {
                        _ = tokio::time::sleep_until(deadline) => return,
                        _ = tokio::time::sleep(pause) => {}
                    }
                }
            }
        }));
    }
    // How many are held at the parent, sampled once a second from its
    // metrics (the gauge emis_edge_feed_long_polls).
    let mut parent_held = Vec::new();
    while tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_secs(1)).await;
        if let Ok(r) = client.get(format!("{base}/metrics")).send().await {
            let text = r.text().await.unwrap_or_default();
            if let Some(v) = text
                .lines()
                .find(|l| l.starts_with("emis_edge_feed_long_polls "))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
            {
                parent_held.push(v as u64);
            }
        }
    }
    for t in tasks {
        let _ = t.await;
    }
    let c = counts.lock().unwrap();
    parent_held.sort_unstable();
    println!(
        "long_polls={count} answered_with_changes={} answered_empty={} refused_503={} other_status={} failed={} parent_held_min={} parent_held_max={}",
        c.changes,
        c.empty,
        c.refused,
        c.other,
        c.failed,
        parent_held.first().copied().unwrap_or(0),
        parent_held.last().copied().unwrap_or(0),
    );
}

async fn bootstrap() {
    let bin = need("--bin");
    let config = need("--config");
    let base = need("--url");
    let school = need("--school");
    let teachers: usize = num("--teachers", 100);
    let client = reqwest::Client::new();
    let start = Instant::now();
    let mut child = std::process::Command::new(&bin)
        .args(["serve", "--config", &config])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let limit = Duration::from_secs(30);
    let mut ready = None;
    let mut answers = None;
    while start.elapsed() < limit {
        if ready.is_none() {
            if let Ok(r) = client.get(format!("{base}/health/ready")).send().await {
                if r.status() == 200 {
                    ready = Some(start.elapsed());
                }
            }
        }
        if ready.is_some() {
            let list = client
                .get(format!("{base}/api/schools/{school}/teachers?limit=1000"))
                .send()
                .await;
            if let Ok(r) = list {
                if r.status() == 200 {
                    let v: serde_json::Value = r.json().await.unwrap_or_default();
                    let items = v["items"].as_array().cloned().unwrap_or_default();
                    if items.len() == teachers {
                        let id = items[0]["teacherId"]
                            .as_str()
                            .unwrap_or_default()
                            .to_owned();
                        let detail = client
                            .get(format!("{base}/api/teachers/{id}"))
                            .send()
                            .await
                            .map(|r| r.status().as_u16())
                            .ok();
                        if detail == Some(200) {
                            answers = Some(start.elapsed());
                            break;
                        }
                    }
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = child.wait();
    let ms = |d: Option<Duration>| {
        d.map_or("timeout".into(), |d| {
            format!("{:.0}", d.as_secs_f64() * 1e3)
        })
    };
    println!("ready_ms={} answers_ms={}", ms(ready), ms(answers));
}

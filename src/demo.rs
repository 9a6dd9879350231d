//! `emis-edge demo`: the whole product on a laptop with nothing installed.
//!
//! Why it exists: a newcomer should see a node replicate a province and
//! answer teacher lookups within a minute, without a Kafka cluster or a
//! central server. The demo starts librdkafka's in-process mock cluster on
//! loopback, publishes a generated province through it over the Kafka
//! protocol, runs the *real* node (the same `node::start` as `serve`)
//! against it, prints `curl` commands with real ids, and keeps publishing a
//! trickle of updates, deletes and a few malformed events so that the
//! status, the metrics and the dead-letter list move. With `--followers N`
//! it also starts N school nodes (in-process, each on its own port with its
//! own temporary store) that follow the provincial node's change feed for
//! one school each, as the deployment tree does (contract §6). Nothing
//! here is used by `serve`.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use rdkafka::mocking::MockCluster;

use crate::clock::{Clock, SystemClock};
use crate::config::Config;
use crate::domain::EventType;
use crate::gen::{Message, Province, Publisher, Spec, Trickle};

/// What `emis-edge demo` was asked for.
#[derive(Clone, Debug)]
pub struct Options {
    pub spec: Spec,
    /// Where the store lives; a fresh temporary directory (removed at the
    /// end) when `None`.
    pub data_dir: Option<PathBuf>,
    pub listen: SocketAddr,
    /// Changes published per second after the initial load.
    pub rate: u32,
    /// Of every thousand trickled events, how many are malformed.
    pub malformed_per_mille: u32,
    /// School nodes following the provincial node, one school each.
    pub followers: u32,
}

/// Runs the demo until `shutdown` resolves.
pub async fn run(options: Options, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let (dir, temporary) = match &options.data_dir {
        Some(d) => {
            // The demo's broker is new every time; a store that has consumed
            // another run's topics (or a real node's store!) must not be
            // mixed with it.
            let store = d.join(crate::config::STORE_FILE);
            if store.exists() {
                anyhow::bail!(
                    "{} already holds a store; the demo needs an empty --data-dir (it never \
                     touches an existing store)",
                    d.display()
                );
            }
            (d.clone(), false)
        }
        None => (
            std::env::temp_dir().join(format!("emis-edge-demo-{}", std::process::id())),
            true,
        ),
    };
    let result = run_in(&options, dir.clone(), shutdown).await;
    if temporary {
        let _ = std::fs::remove_dir_all(&dir);
    }
    result
}

async fn run_in(
    options: &Options,
    dir: PathBuf,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let cluster = MockCluster::new(1).context("cannot start the in-process Kafka cluster")?;
    for t in EventType::ALL {
        cluster
            .create_topic(t.name(), 3, 1)
            .with_context(|| format!("cannot create topic {}", t.name()))?;
    }
    let brokers = cluster.bootstrap_servers();
    let province = Province::new(options.spec.clone());
    let publisher = Publisher::connect(&brokers, &Default::default())?;

    tracing::info!(
        brokers = %brokers,
        schools = province.spec.schools,
        teachers = province.spec.teachers(),
        classes = province.spec.classes(),
        "DEMO: publishing a generated province to the in-process Kafka cluster"
    );
    let p = province.clone();
    let publisher = tokio::task::spawn_blocking(move || -> anyhow::Result<(Publisher, u64)> {
        let mut sent = 0u64;
        for s in 0..p.spec.schools {
            for entity in p.school(s) {
                publisher.send(&Message::of(&p.created_event(entity)))?;
                sent += 1;
            }
        }
        publisher.flush(Duration::from_secs(60))?;
        Ok((publisher, sent))
    })
    .await??;
    let (publisher, sent) = publisher;
    tracing::info!(events = sent, "DEMO: province published");

    let mut config = Config::default();
    config.node.id = "demo".into();
    config.node.data_dir = dir.clone();
    config.http.listen = options.listen;
    config.kafka.brokers = brokers.clone();
    config.schools.all = true;
    config.validate().map_err(|e| anyhow::anyhow!("{e}"))?;
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let node = crate::node::start(config.clone(), clock.clone()).await?;

    // The configuration of this demo node, so that the other commands
    // (`status`, `export`, …) can talk to it.
    let mut shown = config.clone();
    shown.http.listen = node.addr;
    let config_path = dir.join("demo.toml");
    std::fs::write(&config_path, shown.to_redacted_toml())
        .with_context(|| format!("cannot write {}", config_path.display()))?;

    // A worker that dies ends the demo as it ends `serve`.
    let workers = node.state.workers.clone();
    let watched = workers.clone();
    let shutdown = async move {
        tokio::select! {
            _ = shutdown => {}
            _ = watched.death() => {}
        }
    };
    let mut shutdown = std::pin::pin!(shutdown);
    let loaded = tokio::select! {
        _ = &mut shutdown => false,
        loaded = wait_for_first_sync(&node.state) => loaded,
    };
    let mut followers = Vec::new();
    let mut started = Ok(());
    if loaded {
        started = start_followers(
            options,
            &province,
            node.addr,
            &dir,
            clock.clone(),
            &mut followers,
        )
        .await;
    }
    if loaded && started.is_ok() {
        let first = followers.first().map(|f| (f.addr, followers.len()));
        print_hints(&province, node.addr, &config_path, first);
        trickle(options, province, &publisher, clock.as_ref(), shutdown).await;
    }
    tracing::info!("DEMO: stopping");
    for follower in followers {
        if let Err(e) = follower.stop().await {
            tracing::warn!(error = %format!("{e:#}"), "DEMO: a school node did not stop cleanly");
        }
    }
    node.stop().await?;
    started?;
    if let Some((name, why)) = workers.dead() {
        anyhow::bail!("the {name} worker died ({why})");
    }
    drop(publisher);
    drop(cluster);
    Ok(())
}

/// Starts `options.followers` school nodes, the i-th following school i
/// of the provincial node at `parent`, and waits until each has caught
/// up. Their stores live under `dir/school-<i>`.
async fn start_followers(
    options: &Options,
    province: &Province,
    parent: SocketAddr,
    dir: &std::path::Path,
    clock: Arc<dyn Clock>,
    followers: &mut Vec<crate::node::RunningNode>,
) -> anyhow::Result<()> {
    let count = options.followers.min(province.spec.schools);
    if count < options.followers {
        tracing::warn!(
            followers = count,
            "DEMO: one school node per school; the province has only that many schools"
        );
    }
    for i in 0..count {
        let mut config = Config::default();
        config.node.id = format!("demo-school-{i}");
        config.node.data_dir = dir.join(format!("school-{i}"));
        config.http.listen = SocketAddr::from(([127, 0, 0, 1], 0));
        config.upstream.url = Some(format!("http://{}", crate::config::reachable(parent)));
        config.schools.ids = vec![province.school_id(i)];
        config.validate().map_err(|e| anyhow::anyhow!("{e}"))?;
        followers.push(crate::node::start(config, clock.clone()).await?);
    }
    for f in followers.iter() {
        wait_for_first_sync(&f.state).await;
    }
    if count > 0 {
        tracing::info!(
            followers = count,
            "DEMO: school nodes follow the provincial node"
        );
    }
    Ok(())
}

async fn wait_for_first_sync(state: &crate::state::NodeState) -> bool {
    loop {
        if state.sync.get().first_sync_done {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn trickle(
    options: &Options,
    province: Province,
    publisher: &Publisher,
    clock: &dyn Clock,
    shutdown: impl Future<Output = ()>,
) {
    if options.rate == 0 {
        shutdown.await;
        return;
    }
    let mut trickle = Trickle::new(province, clock.now(), options.malformed_per_mille);
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let per_tick = options.rate.div_ceil(10);
    let mut shutdown = std::pin::pin!(shutdown);
    let (mut sent, mut malformed) = (0u64, 0u64);
    let mut report = tokio::time::interval(Duration::from_secs(30));
    report.tick().await;
    loop {
        tokio::select! {
            _ = &mut shutdown => return,
            _ = report.tick() => tracing::info!(
                sent, malformed, "DEMO: trickle of changes published so far"
            ),
            _ = tick.tick() => {
                for _ in 0..per_tick {
                    let m = trickle.next_message();
                    malformed += u64::from(m.malformed);
                    sent += 1;
                    if let Err(e) = publisher.send(&m) {
                        tracing::warn!(error = %e, "DEMO: cannot publish");
                    }
                }
            }
        }
    }
}

fn print_follower_hints(province: &Province, addr: SocketAddr, count: usize) {
    let base = format!("http://{}", crate::config::reachable(addr));
    let teacher = province.teacher(0, 0);
    println!(
        "\n{count} school node(s) follow the provincial node's change feed, one school each.\n\
         The first serves school {} on {base}:\n",
        province.school_id(0)
    );
    println!(
        "  curl -s {base}/api/teachers/{}\n      # {}: the same answer, from the school node",
        teacher.teacher_id, teacher.full_name
    );
    println!("  curl -s {base}/api/sync/status\n      # its `upstream`: cursor, caught up");
}

/// The banner; `follower` is the first school node and how many there are.
fn print_hints(
    province: &Province,
    addr: SocketAddr,
    config: &std::path::Path,
    follower: Option<(SocketAddr, usize)>,
) {
    let base = format!("http://{}", crate::config::reachable(addr));
    let teacher = province.teacher(0, 0);
    let school = province.school_id(0);
    let class = province.class_id(0, 0);
    let exe = std::env::args()
        .next()
        .unwrap_or_else(|| "emis-edge".into());
    let curl = [
        (
            format!("curl -s {base}/api/teachers/{}", teacher.teacher_id),
            format!("{}: detail with classes", teacher.full_name),
        ),
        (
            format!("curl -s {base}/api/classes/{class}"),
            "one class".into(),
        ),
        (
            format!("curl -s '{base}/api/schools/{school}/teachers?limit=5'"),
            "a school's teachers, paged".into(),
        ),
        (
            format!("curl -s {base}/api/sync/status"),
            "lag, last event, staleness".into(),
        ),
        (
            format!("curl -s {base}/api/sync/dead-letters"),
            "the malformed events, with reasons".into(),
        ),
        (
            format!("curl -s {base}/metrics | grep emis_edge_events"),
            "counters by outcome".into(),
        ),
        (
            format!("curl -si {base}/api/teachers/00000000-0000-4000-8000-000000000000"),
            "a 404 problem+json".into(),
        ),
        (
            format!("{exe} status --config {}", config.display()),
            "the operator's view".into(),
        ),
    ];
    let rule = "=".repeat(78);
    println!("\n{rule}\n emis-edge DEMO: generated data, not for production\n{rule}");
    println!(
        "The node replicated {} schools ({} teachers, {} classes) from an in-process\n\
         Kafka cluster and serves them on {base}.\n\n\
         Open {base}/ in a browser: the node's status page. Or try:\n",
        province.spec.schools,
        province.spec.teachers(),
        province.spec.classes(),
    );
    for (command, what) in curl {
        println!("  {command}\n      # {what}");
    }
    if let Some((addr, count)) = follower {
        print_follower_hints(province, addr, count);
    }
    println!("\nUpdates, deletes and a few malformed events keep arriving. Ctrl-C stops the demo.\n{rule}");
}

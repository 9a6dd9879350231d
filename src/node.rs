//! Startup and teardown of a running node, in a fixed order with a deadline.
//!
//! Start: token files → data directory → store (format check) → HTTP
//! listeners (API, and `http.ops_listen` if set) → workers (tombstone
//! purge, ingest, resync, systemd supervision) → serving.
//! HTTP is served by [`crate::server`] (connection limit, header read
//! timeout). Stop (the injected `shutdown` future resolves): workers first
//! (each finishes its in-flight transaction), then HTTP drains, all within
//! [`SHUTDOWN_DEADLINE`]; the store closes when the last handle drops.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::api::{self, AppState};
use crate::clock::Clock;
use crate::config::Config;
use crate::ingest;
use crate::status::SyncState;
use crate::store::{Store, StoreOptions};

pub const SHUTDOWN_DEADLINE: Duration = Duration::from_secs(10);
/// How often expired tombstones are purged.
const PURGE_EVERY: Duration = Duration::from_secs(3600);

/// A node that has started: its address, its state, and how to stop it.
pub struct RunningNode {
    pub addr: SocketAddr,
    /// Where `/health/*` and `/metrics` answer when `http.ops_listen` is set.
    pub ops_addr: Option<SocketAddr>,
    pub state: AppState,
    stop: CancellationToken,
    http_stop: CancellationToken,
    tasks: JoinSet<()>,
    http: tokio::task::JoinHandle<std::io::Result<()>>,
}

/// Opens the store and binds the listener; errors here are the operator's
/// to fix (exit code 1).
pub async fn start(config: Config, clock: Arc<dyn Clock>) -> anyhow::Result<RunningNode> {
    let dir = &config.node.data_dir;
    std::fs::create_dir_all(dir)
        .with_context(|| format!("cannot create node.data_dir {}", dir.display()))?;
    let path = config.store_path();
    let options = StoreOptions {
        cache_bytes: config.store.cache_mb * 1024 * 1024,
    };
    let tokens = Arc::new(config.load_tokens()?);
    let store = Arc::new(Store::open(&path, &options)?);
    tracing::info!(path = %path.display(), "store open");

    let state = AppState::new(crate::api::Shared {
        store,
        sync: Arc::new(SyncState::new(!config.kafka.brokers.trim().is_empty())),
        config: Arc::new(config),
        clock,
        resync_wanted: Arc::new(tokio::sync::Notify::new()),
        ingest_heartbeat: Arc::new(crate::systemd::Heartbeat::default()),
        tokens,
        metrics: Arc::new(crate::metrics::Metrics::default()),
    });
    let listener = tokio::net::TcpListener::bind(state.config.http.listen)
        .await
        .with_context(|| format!("cannot listen on http.listen {}", state.config.http.listen))?;
    let addr = listener.local_addr()?;
    let ops = match state.config.http.ops_listen {
        Some(ops_addr) => Some(
            tokio::net::TcpListener::bind(ops_addr)
                .await
                .with_context(|| format!("cannot listen on http.ops_listen {ops_addr}"))?,
        ),
        None => None,
    };
    let ops_addr = ops.as_ref().map(|l| l.local_addr()).transpose()?;

    let stop = CancellationToken::new();
    let mut tasks = JoinSet::new();
    tasks.spawn(purge_tombstones(state.clone(), stop.clone()));
    tasks.spawn(render_docs(state.clone(), stop.clone()));
    if state.config.kafka.brokers.trim().is_empty() {
        tracing::warn!(
            "kafka.brokers is empty: no events will be consumed; serving the store as it is"
        );
    } else {
        let (ingest_state, ingest_stop) = (state.clone(), stop.clone());
        tasks.spawn(async move {
            let worker =
                tokio::task::spawn_blocking(move || ingest::run(ingest_state, ingest_stop));
            if let Err(e) = worker.await {
                tracing::error!(error = %e, "ingest worker panicked");
            }
        });
    }
    if state.config.resync.central_url.is_some() {
        tasks.spawn(crate::resync::worker(state.clone(), stop.clone()));
    }
    if let crate::config::SchoolFilter::All = state.config.school_filter() {
        if !state.config.schools.all {
            tracing::warn!("schools.ids is empty: serving every school (set schools.ids, or schools.all = true to silence this)");
        }
    }

    let app = api::router(state.clone());
    let ops_app = api::ops_router(state.clone());
    let limits = crate::server::Limits::of(&state.config.http);
    let http_stop = CancellationToken::new();
    let (main_stop, ops_stop) = (http_stop.clone(), http_stop.clone());
    let http = tokio::spawn(async move {
        let main = crate::server::serve(listener, app, limits, main_stop);
        match ops {
            None => main.await,
            Some(ops) => {
                let ops = crate::server::serve(ops, ops_app, limits, ops_stop);
                tokio::try_join!(main, ops).map(|_| ())
            }
        }
    });
    // The watchdog probes /health/live wherever it is served.
    tasks.spawn(crate::systemd::supervise(
        state.clone(),
        ops_addr.unwrap_or(addr),
        stop.clone(),
    ));
    if let Some(ops_addr) = ops_addr {
        tracing::info!(%ops_addr, "health and metrics listening");
    }
    tracing::info!(%addr, node = %state.config.node.id, "listening");
    Ok(RunningNode {
        addr,
        ops_addr,
        state,
        stop,
        http_stop,
        tasks,
        http,
    })
}

impl RunningNode {
    /// Stops workers, then HTTP, within [`SHUTDOWN_DEADLINE`].
    pub async fn stop(mut self) -> anyhow::Result<()> {
        crate::systemd::stopping();
        self.stop.cancel(); // workers first: ingest commits its in-flight batch
        let ordered = async {
            while let Some(r) = self.tasks.join_next().await {
                if let Err(e) = r {
                    tracing::error!(error = %e, "worker ended abnormally");
                }
            }
            self.http_stop.cancel();
            (&mut self.http).await
        };
        match tokio::time::timeout(SHUTDOWN_DEADLINE, ordered).await {
            Ok(Ok(Ok(()))) => {
                tracing::info!("stopped");
                Ok(())
            }
            Ok(Ok(Err(e))) => Err(e).context("HTTP server failed"),
            Ok(Err(e)) => Err(e).context("HTTP task failed"),
            Err(_) => {
                self.tasks.abort_all();
                self.http_stop.cancel();
                self.http.abort();
                anyhow::bail!("shutdown exceeded {SHUTDOWN_DEADLINE:?}; remaining tasks aborted")
            }
        }
    }
}

/// A node dropped without [`RunningNode::stop`] (a panicking test, say)
/// still tells its workers to end, so no thread outlives it.
impl Drop for RunningNode {
    fn drop(&mut self) {
        self.stop.cancel();
        self.http_stop.cancel();
    }
}

/// Runs a node until `shutdown` resolves.
pub async fn serve(
    config: Config,
    clock: Arc<dyn Clock>,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let node = start(config, clock).await?;
    shutdown.await;
    tracing::info!("shutting down");
    node.stop().await
}

/// The address a client on this machine reaches a listener at: a wildcard
/// listen address is reached over loopback.
pub fn reachable(mut addr: SocketAddr) -> SocketAddr {
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr {
            SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    addr
}

/// Resolves on SIGTERM (systemd stop) or SIGINT (Ctrl-C).
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing a SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

/// Worker: renders the teacher documents that changes queued (see
/// `Store::materialize`), in chunks, so that a lookup is one read. Reads
/// never wait for it: a queued teacher's document is rendered on the fly.
/// While the consumer is far behind (catching up after an outage), it
/// waits: redb has one writer at a time, and catching up comes first.
async fn render_docs(state: AppState, stop: CancellationToken) {
    // Small: redb has one writer, and a chunk holds it for ~50 µs a
    // document, so a large one would delay the next batch of events.
    const CHUNK: usize = 250;
    const DEFER_WHILE_BEHIND: i64 = 10_000;
    let mut idle = Duration::ZERO;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(idle) => {}
        }
        if kafka_backlog(&state) > DEFER_WHILE_BEHIND {
            idle = Duration::from_millis(500);
            continue;
        }
        let (store, now) = (state.store.clone(), state.clock.now());
        match tokio::task::spawn_blocking(move || store.materialize(CHUNK, now)).await {
            // More may wait: go on after letting other writers in.
            Ok(Ok(n)) if n == CHUNK => idle = Duration::from_millis(5),
            Ok(Ok(_)) => idle = Duration::from_millis(200),
            Ok(Err(e)) => {
                tracing::error!(error = %e, "rendering teacher documents failed");
                idle = Duration::from_secs(5);
            }
            Err(e) => {
                tracing::error!(error = %e, "rendering teacher documents: task failed");
                idle = Duration::from_secs(5);
            }
        }
    }
}

/// Messages the consumer is behind the high watermarks last seen, over all
/// partitions (0 when unknown).
fn kafka_backlog(state: &AppState) -> i64 {
    let sync = state.sync.get();
    if sync.high_watermarks.is_empty() {
        return 0;
    }
    let Ok(offsets) = state.store.read().and_then(|r| r.offsets()) else {
        return 0;
    };
    offsets
        .iter()
        .filter_map(|o| sync.lag(&o.topic, o.partition, o.next_offset))
        .sum()
}

/// Worker: purges tombstones past `store.tombstone_retention`, hourly.
async fn purge_tombstones(state: AppState, stop: CancellationToken) {
    let retention =
        i64::try_from(state.config.store.tombstone_retention.as_nanos()).unwrap_or(i64::MAX);
    let mut tick = tokio::time::interval(PURGE_EVERY);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let store = state.store.clone();
        let now = state.clock.now();
        match tokio::task::spawn_blocking(move || store.purge_tombstones(now, retention)).await {
            Ok(Ok(0)) => {}
            Ok(Ok(n)) => tracing::info!(purged = n, "expired tombstones purged"),
            Ok(Err(e)) => tracing::error!(error = %e, "tombstone purge failed"),
            Err(e) => tracing::error!(error = %e, "tombstone purge task failed"),
        }
    }
}

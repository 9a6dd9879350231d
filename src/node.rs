//! The composition root: builds a running node from its configuration and
//! takes it apart again, each in a fixed order with a deadline. Nothing
//! imports this module but the command line and the demo.
//!
//! Start ([`start`]): token files → data directory → store (format check,
//! migration) → [`NodeState`] → HTTP listeners bound (`http.listen`, and
//! `http.ops_listen` if set; a conflict on either fails the start before
//! any worker runs) → workers (document renderer, tombstone purge, school
//! freshness, ingest when `kafka.brokers` is set, the follower when
//! `upstream.url` is set, the resync schedule when `resync.central_url` is
//! set) → HTTP served → systemd supervisor (`READY=1`).
//!
//! Stop ([`RunningNode::stop`], when the injected `shutdown` future
//! resolves, or a worker dies): workers are told to stop and each ends
//! its step (ingest commits its in-flight batch; the follower drops a
//! request in flight and commits a page it is applying; a scheduled resync
//! run drops its downloads, while a school already being reconciled
//! commits whole), held change-feed requests answer at once, then HTTP
//! drains, all within [`SHUTDOWN_DEADLINE`]; the store closes when the
//! last handle drops.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::api::{self, ApiState};
use crate::clock::Clock;
use crate::config::Config;
use crate::state::NodeState;
use crate::store::{Store, StoreOptions};
use crate::worker::{self, Worker};

pub const SHUTDOWN_DEADLINE: Duration = Duration::from_secs(10);

/// A node that has started: its address, its state, and how to stop it.
pub struct RunningNode {
    pub addr: SocketAddr,
    /// Where `/health/*` and `/metrics` answer when `http.ops_listen` is set.
    pub ops_addr: Option<SocketAddr>,
    pub state: NodeState,
    stop: CancellationToken,
    http_stop: CancellationToken,
    tasks: JoinSet<()>,
    http: tokio::task::JoinHandle<std::io::Result<()>>,
}

/// Opens the store and binds the listeners, then starts the workers and
/// serves; errors here are the operator's to fix (exit code 1).
pub async fn start(config: Config, clock: Arc<dyn Clock>) -> anyhow::Result<RunningNode> {
    config.validate_serving()?;
    let tokens = config.load_tokens()?;
    let dir = &config.node.data_dir;
    std::fs::create_dir_all(dir)
        .with_context(|| format!("cannot create node.data_dir {}", dir.display()))?;
    let path = config.store_path();
    let options = StoreOptions {
        cache_bytes: config.store.cache_mb * 1024 * 1024,
        dead_letter_max_count: config.store.dead_letter_max_count,
        ..StoreOptions::default()
    };
    let store = Arc::new(Store::open(&path, &options)?);
    tracing::info!(path = %path.display(), "store open");
    compact_if_free(&store, &config, clock.now())?;
    let state = NodeState::new(store, config, clock);
    let config = state.config.clone();

    let listener = tokio::net::TcpListener::bind(config.http.listen)
        .await
        .with_context(|| format!("cannot listen on http.listen {}", config.http.listen))?;
    let addr = listener.local_addr()?;
    let ops = match config.http.ops_listen {
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
    spawn(
        &mut tasks,
        &state,
        &stop,
        crate::maintenance::Renderer::new(state.clone()),
    );
    spawn(
        &mut tasks,
        &state,
        &stop,
        crate::maintenance::Purger::new(state.clone()),
    );
    spawn(
        &mut tasks,
        &state,
        &stop,
        crate::maintenance::SpaceMeter::new(state.clone()),
    );
    spawn(
        &mut tasks,
        &state,
        &stop,
        crate::maintenance::Freshness::new(state.clone()),
    );
    if config.upstream.url.is_some() {
        spawn(
            &mut tasks,
            &state,
            &stop,
            crate::follower::Follower::new(state.clone())?,
        );
    } else if config.kafka.brokers.trim().is_empty() {
        tracing::warn!(
            "kafka.brokers is empty: no events will be consumed; serving the store as it is"
        );
    } else {
        spawn(
            &mut tasks,
            &state,
            &stop,
            crate::ingest::Ingest::new(state.clone()),
        );
    }
    if config.resync.central_url.is_some() {
        spawn(
            &mut tasks,
            &state,
            &stop,
            crate::resync::Scheduler::new(state.clone()),
        );
    }

    // The watchdog probes /health/live wherever it is served.
    let supervisor = crate::systemd::Supervisor::new(state.clone(), ops_addr.unwrap_or(addr))?;
    let api_state = ApiState::new(state.clone(), tokens, stop.clone());
    let app = api::router(api_state.clone());
    let ops_app = api::ops_router(api_state);
    let limits = crate::server::Limits::of(&config.http);
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
    spawn(&mut tasks, &state, &stop, supervisor);
    if let Some(ops_addr) = ops_addr {
        tracing::info!(%ops_addr, "health and metrics listening");
    }
    tracing::info!(%addr, node = %config.node.id, "listening");
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

/// Runs `worker` as a task of the node until `stop`.
/// Compacts the store before anything uses it when at least
/// `store.compact_at_free_share` of the file is free (a compaction needs
/// the store to itself). The measurement reads every page once; it is kept
/// for status and metrics.
fn compact_if_free(
    store: &Store,
    config: &Config,
    now: crate::domain::Timestamp,
) -> anyhow::Result<()> {
    let threshold = config.store.compact_at_free_share;
    if threshold >= 1.0 {
        return Ok(());
    }
    let space = store.measure_space(now)?;
    let Some(free) = space.free_share else {
        return Ok(());
    };
    if free < threshold {
        return Ok(());
    }
    let started = std::time::Instant::now();
    let report = store
        .compact(now)
        .context("compacting the store at start")?;
    tracing::info!(
        before_bytes = report.before.file_allocated,
        after_bytes = report.after.file_allocated,
        free_share_before = free,
        ms = started.elapsed().as_millis() as u64,
        "store compacted at start (store.compact_at_free_share)"
    );
    Ok(())
}

fn spawn<W: Worker>(
    tasks: &mut JoinSet<()>,
    state: &NodeState,
    stop: &CancellationToken,
    worker: W,
) {
    tasks.spawn(worker::run(worker, state.workers.clone(), stop.clone()));
}

impl RunningNode {
    /// Resolves when a worker has died; the node should then stop and the
    /// process exit non-zero.
    pub async fn died(&self) -> anyhow::Error {
        self.state.workers.death().await;
        let (name, why) = self
            .state
            .workers
            .dead()
            .unwrap_or(("unknown", String::new()));
        anyhow::anyhow!("the {name} worker died ({why})")
    }

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

/// Runs a node until `shutdown` resolves, or until a worker dies: then it
/// stops the rest and fails, so that the process exits non-zero and
/// systemd restarts it (`Restart=on-failure`).
pub async fn serve(
    config: Config,
    clock: Arc<dyn Clock>,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    run(start(config, clock).await?, shutdown).await
}

/// [`serve`] for a node already started.
pub async fn run(node: RunningNode, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let died = tokio::select! {
        _ = shutdown => None,
        e = node.died() => Some(e),
    };
    match died {
        None => {
            tracing::info!("shutting down");
            node.stop().await
        }
        Some(e) => {
            tracing::error!(error = %e, "stopping because a worker died");
            if let Err(stop) = node.stop().await {
                tracing::error!(error = %format!("{stop:#}"), "stop after a worker died");
            }
            Err(e.context("exiting so that the service manager restarts the node"))
        }
    }
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

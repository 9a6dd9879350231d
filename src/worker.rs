//! The one shape of every background job — Kafka ingest, the resync
//! schedule, document rendering, tombstone purge, systemd supervision — in
//! the spirit of garage's `Worker`: a [`Worker`] says what one step is and
//! how to wait for more work; [`run`] is the only loop. It steps, waits,
//! backs off on consecutive errors with one policy ([`Backoff`]), keeps a
//! [`WorkerStatus`] that status, metrics, readiness and the systemd
//! watchdog read, and ends when told to stop.
//!
//! A step that panics kills its worker: the status says `dead` with the
//! panic's message, readiness turns false, and [`Workers::death`] resolves,
//! on which the node stops and exits non-zero so that systemd restarts it
//! (a worker struct after a panic is in no state to be trusted again).
//!
//! What a worker does lives in its own module; this one knows nothing of
//! Kafka, HTTP or the store.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use futures::FutureExt;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::clock::Clock;
use crate::domain::{format_timestamp, Timestamp};

/// What the runner does after a successful step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Next {
    /// More work may be waiting: step again at once.
    Busy,
    /// Nothing to do: wait in [`Worker::wait_for_work`].
    Idle,
    /// Step again after this long (a worker pacing itself).
    After(Duration),
}

/// A background job, driven by [`run`].
pub trait Worker: Send + 'static {
    /// Short and stable: status, metrics labels and logs use it.
    fn name(&self) -> &'static str;

    /// Bounds of the pause after consecutive failed steps.
    fn backoff(&self) -> Backoff {
        Backoff::DEFAULT
    }

    /// Whether the systemd watchdog should hold a step that runs too long
    /// against the node (a wedged loop). Only for workers whose steps are
    /// short by design.
    fn watched(&self) -> bool {
        false
    }

    /// One unit of work. It ends soon after `stop` fires, finishing (not
    /// abandoning) a transaction in flight. An error is counted and the
    /// runner backs off before the next step.
    fn step(
        &mut self,
        stop: &CancellationToken,
    ) -> impl Future<Output = anyhow::Result<Next>> + Send;

    /// After [`Next::Idle`]: resolves when there may be work again. The
    /// runner also stops waiting when the node stops.
    fn wait_for_work(&mut self) -> impl Future<Output = ()> + Send {
        tokio::time::sleep(Duration::from_secs(1))
    }
}

/// The one backoff policy: after `n` consecutive failures, `min · 2ⁿ⁻¹`,
/// capped at `max`; the runner adds ±10 % jitter so that many nodes
/// failing together do not retry together.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backoff {
    pub min: Duration,
    pub max: Duration,
}

impl Backoff {
    /// Reaching a broker or a disk: from 200 ms up to 30 s.
    pub const DEFAULT: Backoff = Backoff {
        min: Duration::from_millis(200),
        max: Duration::from_secs(30),
    };

    /// The pause after the `failures`-th consecutive failure (1 = first).
    pub fn delay(&self, failures: u32) -> Duration {
        let doublings = failures.saturating_sub(1).min(30);
        self.min
            .saturating_mul(1u32 << doublings)
            .min(self.max)
            .max(self.min.min(self.max))
    }

    fn jittered(&self, failures: u32) -> Duration {
        use rand::Rng;
        self.delay(failures)
            .mul_f64(rand::thread_rng().gen_range(0.9..1.1))
    }
}

/// Where a worker is, as status shows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub enum WorkerState {
    /// Registered, first step not taken yet.
    Starting,
    /// In a step.
    Busy,
    /// Waiting for work, or pacing itself.
    Idle,
    /// Waiting after a failed step.
    BackingOff,
    /// Ended because the node stops.
    Stopped,
    /// A step panicked; the node exits.
    Dead,
}

impl std::fmt::Display for WorkerState {
    /// As the status document spells it.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            WorkerState::Starting => "starting",
            WorkerState::Busy => "busy",
            WorkerState::Idle => "idle",
            WorkerState::BackingOff => "backingOff",
            WorkerState::Stopped => "stopped",
            WorkerState::Dead => "dead",
        })
    }
}

/// One worker in the status document (`workers` of `GET /api/sync/status`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct WorkerReport {
    pub name: String,
    pub state: WorkerState,
    /// Steps taken since start.
    pub steps: u64,
    /// Failed steps in a row; 0 after a step succeeds.
    pub consecutive_errors: u32,
    /// Failed steps since start.
    pub errors: u64,
    /// The last failure's message, kept after a later success.
    pub last_error: Option<String>,
    pub last_error_at: Option<String>,
}

#[derive(Debug)]
struct Inner {
    state: WorkerState,
    steps: u64,
    consecutive_errors: u32,
    errors: u64,
    last_error: Option<(Timestamp, String)>,
}

/// A worker's live status, written by [`run`] and read by everyone else.
pub struct WorkerStatus {
    name: &'static str,
    watched: bool,
    inner: Mutex<Inner>,
    /// When the current step began (ms since process start; 0: none).
    step_began: AtomicU64,
    clock: Arc<dyn Clock>,
}

impl std::fmt::Debug for WorkerStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.report().fmt(f)
    }
}

fn epoch() -> Instant {
    static START: OnceLock<Instant> = OnceLock::new();
    *START.get_or_init(Instant::now)
}

fn since_epoch_ms() -> u64 {
    u64::try_from(epoch().elapsed().as_millis())
        .unwrap_or(u64::MAX)
        .max(1)
}

impl WorkerStatus {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn name(&self) -> &'static str {
        self.name
    }

    pub fn state(&self) -> WorkerState {
        self.lock().state
    }

    fn set(&self, state: WorkerState) {
        self.lock().state = state;
    }

    fn begin_step(&self) {
        self.step_began.store(since_epoch_ms(), Ordering::Relaxed);
        let mut inner = self.lock();
        inner.state = WorkerState::Busy;
        inner.steps += 1;
    }

    fn end_step(&self) {
        self.step_began.store(0, Ordering::Relaxed);
    }

    fn succeeded(&self) {
        self.end_step();
        self.lock().consecutive_errors = 0;
    }

    /// Records a failure; returns the consecutive failures so far.
    fn failed(&self, error: String) -> u32 {
        self.end_step();
        let now = self.clock.now();
        let mut inner = self.lock();
        inner.consecutive_errors = inner.consecutive_errors.saturating_add(1);
        inner.errors += 1;
        inner.last_error = Some((now, error));
        inner.state = WorkerState::BackingOff;
        inner.consecutive_errors
    }

    fn died(&self, reason: String) {
        self.end_step();
        let now = self.clock.now();
        let mut inner = self.lock();
        inner.state = WorkerState::Dead;
        inner.errors += 1;
        inner.last_error = Some((now, reason));
    }

    /// How long the step in progress has run, for a watched worker.
    fn step_age(&self) -> Option<Duration> {
        if !self.watched {
            return None;
        }
        match self.step_began.load(Ordering::Relaxed) {
            0 => None,
            ms => Some(epoch().elapsed().saturating_sub(Duration::from_millis(ms))),
        }
    }

    pub fn report(&self) -> WorkerReport {
        let inner = self.lock();
        WorkerReport {
            name: self.name.to_owned(),
            state: inner.state,
            steps: inner.steps,
            consecutive_errors: inner.consecutive_errors,
            errors: inner.errors,
            last_error: inner.last_error.as_ref().map(|(_, e)| e.clone()),
            last_error_at: inner.last_error.as_ref().map(|(t, _)| format_timestamp(*t)),
        }
    }
}

/// Every worker of a node, in start order.
pub struct Workers {
    clock: Arc<dyn Clock>,
    list: Mutex<Vec<Arc<WorkerStatus>>>,
    /// Cancelled when a worker dies.
    death: CancellationToken,
}

impl std::fmt::Debug for Workers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.reports()).finish()
    }
}

impl Workers {
    pub fn new(clock: Arc<dyn Clock>) -> Workers {
        Workers {
            clock,
            list: Mutex::new(Vec::new()),
            death: CancellationToken::new(),
        }
    }

    fn list(&self) -> MutexGuard<'_, Vec<Arc<WorkerStatus>>> {
        self.list.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn register(&self, name: &'static str, watched: bool) -> Arc<WorkerStatus> {
        let status = Arc::new(WorkerStatus {
            name,
            watched,
            inner: Mutex::new(Inner {
                state: WorkerState::Starting,
                steps: 0,
                consecutive_errors: 0,
                errors: 0,
                last_error: None,
            }),
            step_began: AtomicU64::new(0),
            clock: self.clock.clone(),
        });
        self.list().push(status.clone());
        status
    }

    pub fn reports(&self) -> Vec<WorkerReport> {
        self.list().iter().map(|w| w.report()).collect()
    }

    /// The first dead worker and why it died.
    pub fn dead(&self) -> Option<(&'static str, String)> {
        self.list().iter().find_map(|w| {
            let inner = w.lock();
            (inner.state == WorkerState::Dead).then(|| {
                let why = inner.last_error.as_ref().map(|(_, e)| e.clone());
                (w.name, why.unwrap_or_default())
            })
        })
    }

    /// Watched workers whose current step has run longer than `limit`.
    pub fn wedged(&self, limit: Duration) -> Vec<&'static str> {
        self.list()
            .iter()
            .filter(|w| w.step_age().is_some_and(|age| age >= limit))
            .map(|w| w.name)
            .collect()
    }

    /// Resolves once a worker has died.
    pub async fn death(&self) {
        self.death.cancelled().await;
    }
}

/// Drives `worker` until `stop` fires (or it panics), keeping its status
/// in `workers`. Spawn it as a task.
pub async fn run<W: Worker>(mut worker: W, workers: Arc<Workers>, stop: CancellationToken) {
    let name = worker.name();
    let status = workers.register(name, worker.watched());
    let backoff = worker.backoff();
    let die = |panic: Box<dyn std::any::Any + Send>| {
        let reason = panic_message(&*panic);
        tracing::error!(worker = name, %reason, "worker panicked; the node stops");
        status.died(format!("panicked: {reason}"));
        workers.death.cancel();
    };
    while !stop.is_cancelled() {
        status.begin_step();
        let next = match AssertUnwindSafe(worker.step(&stop)).catch_unwind().await {
            Ok(Ok(next)) => {
                status.succeeded();
                next
            }
            Ok(Err(e)) => {
                let error = format!("{e:#}");
                let failures = status.failed(error.clone());
                let pause = backoff.jittered(failures);
                tracing::warn!(worker = name, %error, failures, retry_in = ?pause, "worker step failed");
                Next::After(pause)
            }
            Err(panic) => return die(panic),
        };
        match next {
            Next::Busy => tokio::task::yield_now().await,
            Next::Idle => {
                status.set(WorkerState::Idle);
                tokio::select! {
                    _ = stop.cancelled() => break,
                    waited = AssertUnwindSafe(worker.wait_for_work()).catch_unwind() => {
                        if let Err(panic) = waited {
                            return die(panic);
                        }
                    }
                }
            }
            Next::After(pause) => {
                if status.state() == WorkerState::Busy {
                    status.set(WorkerState::Idle);
                }
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep(pause) => {}
                }
            }
        }
    }
    status.set(WorkerState::Stopped);
    tracing::debug!(worker = name, "worker stopped");
}

/// Runs blocking work of a step on tokio's blocking pool; a panic there
/// goes on as a panic of the step (so the worker is reported dead).
pub async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    match tokio::task::spawn_blocking(f).await {
        Ok(value) => value,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(e) => panic!("blocking task cancelled: {e}"),
    }
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "a panic without a message".to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;

    #[test]
    fn backoff_doubles_from_its_minimum_up_to_its_maximum() {
        let b = Backoff::DEFAULT;
        let seen: Vec<Duration> = (1..=10).map(|n| b.delay(n)).collect();
        assert_eq!(seen[..3], [200, 400, 800].map(Duration::from_millis));
        assert_eq!(seen[8], Duration::from_secs(30), "capped: {seen:?}");
        assert_eq!(b.delay(u32::MAX), Duration::from_secs(30));
    }

    struct Flaky {
        steps: u32,
    }

    impl Worker for Flaky {
        fn name(&self) -> &'static str {
            "flaky"
        }
        fn backoff(&self) -> Backoff {
            Backoff {
                min: Duration::from_millis(1),
                max: Duration::from_millis(2),
            }
        }
        async fn step(&mut self, _stop: &CancellationToken) -> anyhow::Result<Next> {
            self.steps += 1;
            match self.steps {
                1 | 2 => anyhow::bail!("disk full"),
                3 => Ok(Next::Busy),
                _ => panic!("step {} went wrong", self.steps),
            }
        }
    }

    #[tokio::test]
    async fn errors_are_counted_and_a_panic_kills_the_worker_visibly() {
        let workers = Arc::new(Workers::new(ManualClock::new(0)));
        let stop = CancellationToken::new();
        run(Flaky { steps: 0 }, workers.clone(), stop).await;
        // The death was announced.
        workers.death().await;
        let report = &workers.reports()[0];
        assert_eq!(report.state, WorkerState::Dead);
        assert_eq!(report.steps, 4);
        assert_eq!(report.errors, 3, "two failures and the panic");
        assert_eq!(report.consecutive_errors, 0, "the third step succeeded");
        assert_eq!(
            report.last_error.as_deref(),
            Some("panicked: step 4 went wrong")
        );
        assert_eq!(workers.dead().map(|(n, _)| n), Some("flaky"));
    }

    struct Forever;

    impl Worker for Forever {
        fn name(&self) -> &'static str {
            "forever"
        }
        async fn step(&mut self, _stop: &CancellationToken) -> anyhow::Result<Next> {
            Ok(Next::Idle)
        }
        fn wait_for_work(&mut self) -> impl Future<Output = ()> + Send {
            std::future::pending()
        }
    }

    #[tokio::test]
    async fn an_idle_worker_stops_when_told() {
        let workers = Arc::new(Workers::new(ManualClock::new(0)));
        let stop = CancellationToken::new();
        let task = tokio::spawn(run(Forever, workers.clone(), stop.clone()));
        stop.cancel();
        task.await.expect("the runner ends");
        assert_eq!(workers.reports()[0].state, WorkerState::Stopped);
        assert!(workers.dead().is_none());
    }
}

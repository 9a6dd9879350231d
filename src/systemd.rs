//! systemd integration for `Type=notify` units: `READY=1` once the node
//! serves, `STATUS=` lines with what an operator needs first, `WATCHDOG=1`
//! only while both the ingest loop and the HTTP server are alive (a wedged
//! loop gets the service restarted), `STOPPING=1` on shutdown. Outside
//! systemd (no `NOTIFY_SOCKET`) every call does nothing.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use sd_notify::NotifyState;
use tokio_util::sync::CancellationToken;

use crate::api::AppState;

fn epoch() -> Instant {
    static START: OnceLock<Instant> = OnceLock::new();
    *START.get_or_init(Instant::now)
}

/// When a worker loop last went round (milliseconds since process start).
#[derive(Debug, Default)]
pub struct Heartbeat(AtomicU64);

impl Heartbeat {
    pub fn beat(&self) {
        let ms = epoch().elapsed().as_millis() as u64;
        self.0.store(ms.max(1), Ordering::Relaxed);
    }

    /// The loop has ended (or never ran): nothing to watch.
    pub fn retire(&self) {
        self.0.store(0, Ordering::Relaxed);
    }

    /// Time since the last beat; `None` before the first or once retired.
    pub fn age(&self) -> Option<Duration> {
        match self.0.load(Ordering::Relaxed) {
            0 => None,
            ms => Some(epoch().elapsed().saturating_sub(Duration::from_millis(ms))),
        }
    }
}

fn notify(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::debug!(error = %e, "sd_notify failed");
    }
}

pub fn stopping() {
    notify(&[NotifyState::Stopping]);
}

/// The one-line summary systemd shows in `systemctl status`.
fn status_line(state: &AppState) -> String {
    let sync = state.sync.get();
    let lag: i64 = state
        .store
        .read()
        .and_then(|r| r.offsets())
        .map(|offsets| {
            offsets
                .iter()
                .filter_map(|o| sync.lag(&o.topic, o.partition, o.next_offset))
                .sum()
        })
        .unwrap_or(0);
    let ready = crate::api::is_ready(state).unwrap_or(false);
    format!(
        "{}; kafka {}; lag {lag}; last event {}",
        if ready {
            "ready"
        } else if state.store.health().degraded() {
            "not ready (store cannot be written)"
        } else {
            "not ready (no data yet)"
        },
        match (sync.kafka_configured, sync.kafka_connected) {
            (false, _) => "not configured",
            (true, true) => "connected",
            (true, false) => "NOT CONNECTED",
        },
        sync.last_event_received_at
            .map(crate::domain::format_timestamp)
            .unwrap_or_else(|| "-".into())
    )
}

/// Worker: tells systemd the node is up, then keeps its status and
/// watchdog fed until `stop`. `addr` is where the HTTP server listens.
pub async fn supervise(state: AppState, addr: SocketAddr, stop: CancellationToken) {
    // The service is up once the store is open and HTTP answers; whether it
    // has data yet is /health/ready's business and shows in STATUS=.
    notify(&[NotifyState::Ready]);
    let watchdog = sd_notify::watchdog_enabled();
    let period = watchdog.map_or(Duration::from_secs(5), |w| {
        (w / 2).min(Duration::from_secs(5))
    });
    let addr = crate::node::reachable(addr);
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()
        .expect("a plain HTTP client builds");
    let live_url = format!("http://{addr}/health/live");
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(period) => {}
        }
        let line = status_line(&state);
        notify(&[NotifyState::Status(&line)]);
        let Some(limit) = watchdog else { continue };
        // A loop that never started or has ended (no Kafka, a consumer that
        // could not be created) has nothing to watch.
        let ingest_ok = state.ingest_heartbeat.age().is_none_or(|age| age < limit);
        let http_ok = client
            .get(&live_url)
            .send()
            .await
            .is_ok_and(|r| r.status().is_success());
        if ingest_ok && http_ok {
            notify(&[NotifyState::Watchdog]);
        } else {
            tracing::error!(
                ingest_ok,
                http_ok,
                "a loop is wedged; withholding the watchdog ping"
            );
        }
    }
}

//! systemd integration for `Type=notify` units: `READY=1` once the node
//! serves, `STATUS=` lines with what an operator needs first, `WATCHDOG=1`
//! only while every watched worker is making progress and the HTTP server
//! answers (a wedged loop gets the service restarted), `STOPPING=1` on
//! shutdown. Outside systemd (no `NOTIFY_SOCKET`) every call does nothing.

use std::net::SocketAddr;
use std::time::Duration;

use sd_notify::NotifyState;
use tokio_util::sync::CancellationToken;

use crate::state::NodeState;
use crate::worker::{Next, Worker};

fn notify(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::debug!(error = %e, "sd_notify failed");
    }
}

pub fn stopping() {
    notify(&[NotifyState::Stopping]);
}

/// The one-line summary systemd shows in `systemctl status`.
fn status_line(state: &NodeState) -> String {
    let sync = state.sync.get();
    let readiness = state.readiness();
    format!(
        "{}; kafka {}; lag {}; last event {}",
        match readiness {
            Ok(Ok(())) => "ready".to_owned(),
            Ok(Err(why)) => format!("not ready ({})", why.short()),
            Err(_) => "not ready (store cannot be read)".to_owned(),
        },
        match (sync.kafka_configured, sync.kafka_connected) {
            (false, _) => "not configured",
            (true, true) => "connected",
            (true, false) => "NOT CONNECTED",
        },
        state.kafka_backlog(),
        sync.last_event_received_at
            .map(crate::domain::format_timestamp)
            .unwrap_or_else(|| "-".into())
    )
}

/// The worker that tells systemd the node is up, then keeps its status and
/// watchdog fed. `addr` is where `/health/live` answers.
pub struct Supervisor {
    state: NodeState,
    live_url: String,
    client: reqwest::Client,
    watchdog: Option<Duration>,
    period: Duration,
    announced: bool,
}

impl Supervisor {
    pub fn new(state: NodeState, addr: SocketAddr) -> anyhow::Result<Supervisor> {
        let watchdog = sd_notify::watchdog_enabled();
        Ok(Supervisor {
            state,
            live_url: format!("http://{}/health/live", crate::config::reachable(addr)),
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(2))
                .build()?,
            period: watchdog.map_or(Duration::from_secs(5), |w| {
                (w / 2).min(Duration::from_secs(5))
            }),
            watchdog,
            announced: false,
        })
    }
}

impl Worker for Supervisor {
    fn name(&self) -> &'static str {
        "systemd"
    }

    async fn step(&mut self, _stop: &CancellationToken) -> anyhow::Result<Next> {
        if !self.announced {
            // The service is up once the store is open and HTTP answers;
            // whether it has data yet is /health/ready's business and shows
            // in STATUS=.
            notify(&[NotifyState::Ready]);
            self.announced = true;
            return Ok(Next::After(self.period));
        }
        let line = status_line(&self.state);
        notify(&[NotifyState::Status(&line)]);
        let Some(limit) = self.watchdog else {
            return Ok(Next::After(self.period));
        };
        let wedged = self.state.workers.wedged(limit);
        let http_ok = self
            .client
            .get(&self.live_url)
            .send()
            .await
            .is_ok_and(|r| r.status().is_success());
        if wedged.is_empty() && http_ok {
            notify(&[NotifyState::Watchdog]);
        } else {
            tracing::error!(
                ?wedged,
                http_ok,
                "a loop is wedged; withholding the watchdog ping"
            );
        }
        Ok(Next::After(self.period))
    }
}

//! What operators' tools poll: `/health/live`, `/health/ready` and
//! `/metrics` (served on the API listener, or alone on `http.ops_listen`),
//! and the Prometheus exposition of the node's state behind `/metrics`.
//! The instruments recorded as things happen are `crate::metrics`; the
//! gauges here are read at scrape time from the store, the sync state and
//! the worker registry, so they cannot drift from what status reports.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use super::problem::Problem;
use super::ApiState;
use crate::metrics::{labels, Labels};
use crate::state::NodeState;
use crate::store::counter;
use crate::worker::WorkerState;

pub(super) fn routes(state: &ApiState) -> Router<ApiState> {
    let registry = Arc::new(registry(state.node().clone()));
    Router::new()
        .route("/health/live", get(|| async { "ok\n" }))
        .route("/health/ready", get(ready))
        .route(
            "/metrics",
            get(move |headers: axum::http::HeaderMap| async move {
                let text = render(&registry);
                let openmetrics = headers
                    .get(header::ACCEPT)
                    .and_then(|v| v.to_str().ok())
                    .is_some_and(|v| v.contains("application/openmetrics-text"));
                if openmetrics {
                    (
                        [(
                            header::CONTENT_TYPE,
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        text,
                    )
                } else {
                    (
                        [(
                            header::CONTENT_TYPE,
                            "text/plain; version=0.0.4; charset=utf-8",
                        )],
                        to_prometheus_text(&text),
                    )
                }
            }),
        )
}

async fn ready(State(s): State<ApiState>) -> Result<Response, Problem> {
    match s.readiness()? {
        Ok(()) => Ok("ready\n".into_response()),
        Err(why) => Err(Problem::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "not-ready",
            "Not ready",
            why.to_string(),
        )),
    }
}
/// The registry `/metrics` renders: the recorded instruments and the
/// scrape-time collector.
pub fn registry(state: NodeState) -> Registry {
    let mut registry = Registry::with_prefix("emis_edge");
    let m = &state.metrics;
    registry.register(
        "http_request_duration_seconds",
        "HTTP request duration by route template and status",
        m.http.clone(),
    );
    registry.register(
        "sync_latency_seconds",
        "From an event's timestamp to its commit in the local store",
        m.sync_latency.clone(),
    );
    registry.register(
        "topic_events",
        "Events handled since start, by topic and outcome",
        m.topic_events.clone(),
    );
    registry.register(
        "batch_size_messages",
        "Messages per committed ingest batch",
        m.batch_size.clone(),
    );
    registry.register(
        "batch_commit_duration_seconds",
        "Duration of an ingest batch's store commit",
        m.commit_duration.clone(),
    );
    registry.register(
        "resync_schools",
        "Schools resynced, by outcome",
        m.resync_schools.clone(),
    );
    registry.register(
        "resync_duration_seconds",
        "Duration of resync runs",
        m.resync_duration.clone(),
    );
    registry.register(
        "resync_drift",
        "Drift found by resync runs, by entity kind and category",
        m.resync_drift.clone(),
    );
    registry.register_collector(Box::new(NodeCollector {
        state,
        freshness: std::sync::Mutex::new(None),
    }));
    registry
}

/// The classic Prometheus text format (0.0.4) of an OpenMetrics
/// exposition, for clients that do not ask for OpenMetrics (curl,
/// promtool): counter families are named with their `_total` suffix, and
/// the `# UNIT` and `# EOF` lines go.
pub fn to_prometheus_text(openmetrics: &str) -> String {
    let mut counters = std::collections::HashSet::new();
    for line in openmetrics.lines() {
        if let Some(name) = line
            .strip_prefix("# TYPE ")
            .and_then(|rest| rest.strip_suffix(" counter"))
        {
            counters.insert(name.to_owned());
        }
    }
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|prefix| {
            let rest = line.strip_prefix(prefix)?;
            let (name, tail) = rest.split_once(' ')?;
            counters
                .contains(name)
                .then(|| format!("{prefix}{name}_total {tail}"))
        });
        out.push_str(renamed.as_deref().unwrap_or(line));
        out.push('\n');
    }
    out
}

pub fn render(registry: &Registry) -> String {
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, registry)
        .expect("writing to a String cannot fail");
    out
}

/// How long a computed per-school freshness is reused: computing it walks
/// every served school's records.
const FRESHNESS_TTL: std::time::Duration = std::time::Duration::from_secs(300);

type Freshness = Vec<(uuid::Uuid, crate::domain::Timestamp)>;

struct NodeCollector {
    state: NodeState,
    freshness: std::sync::Mutex<Option<(std::time::Instant, Freshness)>>,
}

impl NodeCollector {
    fn freshness(&self) -> Freshness {
        let mut cached = self.freshness.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((at, value)) = cached.as_ref() {
            if at.elapsed() < FRESHNESS_TTL {
                return value.clone();
            }
        }
        let s = &self.state;
        let value = s
            .schools_to_sync(Vec::new())
            .and_then(|schools| s.store.read()?.oldest_synced(&schools))
            .unwrap_or_else(|e| {
                tracing::error!(error = %format!("{e:#}"), "metrics: freshness not computed");
                Vec::new()
            });
        // Nothing to report yet is not worth caching.
        if !value.is_empty() {
            *cached = Some((std::time::Instant::now(), value.clone()));
        }
        value
    }
}

impl std::fmt::Debug for NodeCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NodeCollector")
    }
}

/// One gauge family; a single value without labels is written bare.
fn gauge(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    values: Vec<(Labels, f64)>,
) -> std::fmt::Result {
    let mut metric = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
    if let [(labels, value)] = values.as_slice() {
        if labels.is_empty() {
            return ConstGauge::new(*value).encode(metric);
        }
    }
    for (labels, value) in &values {
        ConstGauge::new(*value).encode(metric.encode_family(labels)?)?;
    }
    Ok(())
}

fn bare(value: f64) -> Vec<(Labels, f64)> {
    vec![(Vec::new(), value)]
}

impl Collector for NodeCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        let s = &self.state;
        // First what holds also when the store cannot be read.
        let health = s.store.health();
        gauge(
            &mut encoder,
            "store_degraded",
            "1 while the store cannot be written (the last write failed)",
            bare(f64::from(u8::from(health.degraded()))),
        )?;
        ConstCounter::new(health.write_failures).encode(encoder.encode_descriptor(
            "store_write_failures",
            "Store writes that failed since start (nothing of them was committed)",
            None,
            MetricType::Counter,
        )?)?;
        ConstCounter::new(health.reopens).encode(encoder.encode_descriptor(
            "store_reopens",
            "Times the store file was closed and opened again after an I/O error, since start",
            None,
            MetricType::Counter,
        )?)?;
        let ready = matches!(s.readiness(), Ok(Ok(())));
        gauge(
            &mut encoder,
            "ready",
            "1 when /health/ready answers 200",
            bare(f64::from(u8::from(ready))),
        )?;
        let workers = s.workers.reports();
        let per_worker = |f: &dyn Fn(&crate::worker::WorkerReport) -> f64| {
            workers
                .iter()
                .map(|w| (labels(&[("worker", &w.name)]), f(w)))
                .collect()
        };
        gauge(
            &mut encoder,
            "worker_dead",
            "1 when a background worker has died (the node then exits and systemd restarts it)",
            per_worker(&|w| f64::from(u8::from(w.state == WorkerState::Dead))),
        )?;
        gauge(
            &mut encoder,
            "worker_consecutive_errors",
            "Failed steps in a row of a background worker (0: its last step succeeded)",
            per_worker(&|w| f64::from(w.consecutive_errors)),
        )?;
        let mut errors = encoder.encode_descriptor(
            "worker_errors",
            "Failed steps of a background worker since start",
            None,
            MetricType::Counter,
        )?;
        for w in &workers {
            ConstCounter::new(w.errors)
                .encode(errors.encode_family(&labels(&[("worker", &w.name)]))?)?;
        }
        let state = s.sync.get();
        gauge(
            &mut encoder,
            "kafka_connected",
            "1 when the last contact with the broker succeeded",
            bare(f64::from(u8::from(state.kafka_connected))),
        )?;
        let (stats, watermark, offsets) = match s
            .store
            .read()
            .and_then(|r| Ok((r.stats()?, r.watermark()?, r.offsets()?)))
        {
            Ok(v) => v,
            Err(e) => {
                tracing::error!(error = %e, "metrics: store read failed");
                return Ok(());
            }
        };

        let mut events = encoder.encode_descriptor(
            "events",
            "Kafka events handled, by outcome (persisted: survives restarts)",
            None,
            MetricType::Counter,
        )?;
        for (outcome, name) in [
            ("applied", counter::APPLIED),
            ("stale", counter::STALE),
            ("skipped", counter::SKIPPED),
            ("dead_lettered", counter::DEAD_LETTERED),
        ] {
            let n = stats.counters.get(name).copied().unwrap_or(0);
            let labels = vec![("outcome".to_string(), outcome.to_string())];
            ConstCounter::new(n).encode(events.encode_family(&labels)?)?;
        }
        let stored = |name: &str| stats.counters.get(name).copied().unwrap_or(0);
        ConstCounter::new(stored(counter::DEAD_LETTERS_DROPPED)).encode(
            encoder.encode_descriptor(
                "dead_letters_dropped",
                "Dead letters dropped by their retention (store.dead_letter_max_count, \
                 store.dead_letter_retention), oldest first (persisted)",
                None,
                MetricType::Counter,
            )?,
        )?;
        ConstCounter::new(stored(counter::OFFSET_OUT_OF_RANGE)).encode(
            encoder.encode_descriptor(
                "offset_out_of_range",
                "Partitions found reading outside what Kafka still holds (events lost to \
                 retention, or the topic recreated); each requested a resync (persisted)",
                None,
                MetricType::Counter,
            )?,
        )?;

        gauge(
            &mut encoder,
            "store_pending_documents",
            "Teacher documents waiting to be rendered after a change (their lookups assemble them meanwhile)",
            bare(stats.pending_documents as f64),
        )?;
        gauge(
            &mut encoder,
            "entities",
            "Live entities in the local store",
            vec![
                (labels(&[("kind", "class")]), stats.classes as f64),
                (labels(&[("kind", "teacher")]), stats.teachers as f64),
                (labels(&[("kind", "assignment")]), stats.assignments as f64),
            ],
        )?;
        gauge(
            &mut encoder,
            "tombstones",
            "Tombstones kept",
            bare(stats.tombstones as f64),
        )?;
        gauge(
            &mut encoder,
            "dead_letters",
            "Dead-lettered events kept in the store",
            bare(stats.dead_letters as f64),
        )?;
        if let Some(w) = watermark {
            gauge(
                &mut encoder,
                "last_event_timestamp_seconds",
                "Source timestamp of the newest event or snapshot record seen",
                bare(w as f64 / 1e9),
            )?;
        }
        let partition =
            |topic: &str, p: i32| labels(&[("topic", topic), ("partition", &p.to_string())]);
        let lags = offsets
            .iter()
            .filter_map(|o| {
                let lag = state.lag(&o.topic, o.partition, o.next_offset)?;
                Some((partition(&o.topic, o.partition), lag as f64))
            })
            .collect();
        gauge(
            &mut encoder,
            "partition_lag",
            "Messages behind the high watermark",
            lags,
        )?;
        let now = s.clock.now();
        let since = state
            .partition_last_event
            .iter()
            .map(|((t, p), at)| {
                let seconds = crate::domain::seconds_between(*at, now);
                (partition(t, *p), seconds)
            })
            .collect();
        gauge(
            &mut encoder,
            "partition_seconds_since_last_event",
            "Seconds since this node last received an event of the partition",
            since,
        )?;
        let fresh = self
            .freshness()
            .iter()
            .map(|(school, t)| (labels(&[("school", &school.to_string())]), *t as f64 / 1e9))
            .collect();
        gauge(
            &mut encoder,
            "school_oldest_synced_timestamp_seconds",
            "Oldest lastSyncedAt among a served school's live records (refreshed every 5 minutes)",
            fresh,
        )?;
        if let Ok(meta) = std::fs::metadata(s.config.store_path()) {
            gauge(
                &mut encoder,
                "store_file_bytes",
                "Size of the redb file",
                bare(meta.len() as f64),
            )?;
        }
        Ok(())
    }
}

//! What operators' tools poll: `/health/live`, `/health/ready` and
//! `/metrics` (served on the API listener, or alone on `http.ops_listen`),
//! and the Prometheus exposition of the node's state behind `/metrics`.
//! The instruments recorded as things happen are `crate::metrics`; the
//! gauges here are read at scrape time from the store (counts, offsets and
//! the watermark: a few look-ups, never a walk over records), the sync
//! state and the worker registry, so they cannot drift from what status
//! reports. Per-school freshness needs a walk: the `freshness` worker does
//! it and the scrape reads its last result. A scrape runs on the blocking
//! pool.

use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::problem::{Problem, ProblemDocument};
use super::ApiState;
use crate::metrics::{labels, Labels};
use crate::state::NodeState;
use crate::store::counter;
use crate::worker::WorkerState;

pub(super) fn routes() -> OpenApiRouter<ApiState> {
    OpenApiRouter::new()
        .routes(routes!(live))
        .routes(routes!(ready))
        .routes(routes!(metrics))
}

#[utoipa::path(
    get,
    path = "/health/live",
    tag = "operations",
    summary = "Liveness: 200 while the process runs",
    responses((status = 200, description = "The process runs", body = String, content_type = "text/plain", example = "ok\n")),
)]
async fn live() -> &'static str {
    "ok\n"
}

#[utoipa::path(
    get,
    path = "/metrics",
    tag = "operations",
    summary = "Prometheus metrics",
    description = "The Prometheus text format (0.0.4), or OpenMetrics 1.0 for a client whose `Accept` asks for `application/openmetrics-text`.",
    responses((status = 200, description = "The exposition", body = String, content_type = "text/plain; version=0.0.4; charset=utf-8")),
)]
async fn metrics(State(s): State<ApiState>, headers: HeaderMap) -> Result<Response, Problem> {
    // The collector reads the store: off the async threads.
    let state = s.clone();
    let text = super::blocking(move || render(state.registry())).await?;
    let openmetrics = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("application/openmetrics-text"));
    Ok(if openmetrics {
        (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            text,
        )
            .into_response()
    } else {
        (
            [(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            to_prometheus_text(&text),
        )
            .into_response()
    })
}

#[utoipa::path(
    get,
    path = "/health/ready",
    tag = "operations",
    summary = "Readiness: 200 once the store is open and the node has data or has finished its first sync",
    responses(
        (status = 200, description = "Ready", body = String, content_type = "text/plain", example = "ready\n"),
        (status = 503, description = "Not ready; `detail` says why", body = ProblemDocument, content_type = "application/problem+json"),
    ),
)]
async fn ready(State(s): State<ApiState>) -> Result<Response, Problem> {
    let node = s.node().clone();
    match super::blocking(move || node.readiness()).await?? {
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
    registry.register(
        "feed_long_polls",
        "Change-feed requests held waiting for a change now",
        m.feed_long_polls.clone(),
    );
    registry.register(
        "feed_long_polls_refused",
        "Change-feed requests answered 503 because http.max_long_polls were held already",
        m.feed_long_polls_refused.clone(),
    );
    registry.register(
        "upstream_pages",
        "Pages of the parent's change feed applied",
        m.upstream_pages.clone(),
    );
    registry.register(
        "upstream_lines",
        "Change lines in the parent's pages applied",
        m.upstream_lines.clone(),
    );
    registry.register(
        "upstream_bytes",
        "Bytes received from the parent's change feed and snapshots (compressed, as sent)",
        m.upstream_bytes.clone(),
    );
    registry.register(
        "upstream_errors",
        "Failed requests to the parent, by reason",
        m.upstream_errors.clone(),
    );
    registry.register_collector(Box::new(NodeCollector { state }));
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

struct NodeCollector {
    state: NodeState,
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
        if let Some(u) = &state.upstream {
            gauge(
                &mut encoder,
                "upstream_connected",
                "1 when the last request to the parent (upstream.url) was answered with a page",
                bare(f64::from(u8::from(u.connected))),
            )?;
            gauge(
                &mut encoder,
                "upstream_caught_up",
                "1 when the last page applied from the parent was the end of its feed for now",
                bare(f64::from(u8::from(u.caught_up))),
            )?;
            if let Some(at) = u.last_page_at {
                gauge(
                    &mut encoder,
                    "upstream_seconds_since_last_page",
                    "Seconds since the last page from the parent was applied",
                    bare(s.clock.now().saturating_sub(at).max(0) as f64 / 1e9),
                )?;
            }
        }
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
            ("transferred_out", counter::TRANSFERRED_OUT),
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

        if state.upstream.is_some() {
            let mut changes = encoder.encode_descriptor(
                "upstream_changes",
                "Change lines of the parent's feed, by outcome (persisted: survives restarts)",
                None,
                MetricType::Counter,
            )?;
            for (outcome, name) in [
                ("applied", counter::FEED_APPLIED),
                ("stale", counter::FEED_STALE),
                ("skipped", counter::FEED_SKIPPED),
                ("transferred_out", counter::FEED_TRANSFERRED_OUT),
            ] {
                let n = stats.counters.get(name).copied().unwrap_or(0);
                ConstCounter::new(n)
                    .encode(changes.encode_family(&labels(&[("outcome", outcome)]))?)?;
            }
        }
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
        // As the freshness worker last computed it: a scrape never walks
        // the records.
        let fresh = s
            .metrics
            .school_freshness
            .get()
            .iter()
            .map(|(school, t)| (labels(&[("school", &school.to_string())]), *t as f64 / 1e9))
            .collect();
        gauge(
            &mut encoder,
            "school_oldest_synced_timestamp_seconds",
            "Oldest lastSyncedAt among a served school's live records (computed every 5 minutes)",
            fresh,
        )?;
        if let Some(allocated) = crate::store::allocated_bytes(&s.config.store_path()) {
            gauge(
                &mut encoder,
                "store_file_bytes",
                "Disk space the redb file takes (allocated blocks; the file is sparse)",
                bare(allocated as f64),
            )?;
        }
        #[cfg(feature = "cache-metrics")]
        if let Some(bytes) = s.store.cache_bytes() {
            gauge(
                &mut encoder,
                "store_cache_bytes",
                "Bytes redb's page cache and write buffer hold (bounded by store.cache_mb)",
                bare(bytes as f64),
            )?;
        }
        // As last measured by the `space` worker: a walk of every page is
        // not for a scrape.
        if let Some(space) = s.store.space() {
            gauge(
                &mut encoder,
                "store_live_bytes",
                "Keys and values the store's tables hold (as last measured)",
                bare(space.live_bytes as f64),
            )?;
            if let Some(free) = space.free_share {
                gauge(
                    &mut encoder,
                    "store_free_ratio",
                    "Share of the store file no table uses: what a compaction gives back (as last measured)",
                    bare(free),
                )?;
            }
        }
        Ok(())
    }
}

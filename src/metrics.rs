//! The instruments recorded as things happen — request durations, sync
//! latency, per-topic outcomes, batch sizes, resync outcomes, the change
//! feed's long-polls and a follower's pages — in
//! [`Metrics`], which every worker and the HTTP layer share through
//! `NodeState`, and what a worker computes for a scrape to read
//! ([`SchoolFreshness`]). What is read at scrape time (gauges from the store, the
//! sync state and the workers) and the exposition itself are
//! `api::ops`.

use std::sync::{Arc, Mutex};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use uuid::Uuid;

use crate::domain::Timestamp;

pub type Labels = Vec<(String, String)>;
type HistogramFamily = Family<Labels, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    // 100 µs … ~105 s
    Histogram::new(exponential_buckets(0.0001, 4.0, 11))
}

/// Metrics recorded as things happen (the rest are read at scrape time).
#[derive(Debug)]
pub struct Metrics {
    /// HTTP request duration by route template and status.
    pub http: HistogramFamily,
    /// Event `timestamp` → applied here, seconds: the key freshness signal.
    pub sync_latency: Histogram,
    /// Events handled by the ingest loop, by topic and outcome (`applied`,
    /// `stale`, `skipped`, `transferred_out`, `dead_lettered`), since this
    /// process started.
    pub topic_events: Family<Labels, Counter>,
    /// Messages per committed ingest batch.
    pub batch_size: Histogram,
    /// Duration of an ingest batch's store commit.
    pub commit_duration: Histogram,
    /// Resync outcomes per school (`ok`, `failed`).
    pub resync_schools: Family<Labels, Counter>,
    pub resync_duration: Histogram,
    /// Drift found by resync runs, by entity kind and category.
    pub resync_drift: Family<Labels, Counter>,
    /// Per-school freshness, as the `freshness` worker last computed it.
    pub school_freshness: SchoolFreshness,
    /// Change-feed requests held waiting now (as a parent).
    pub feed_long_polls: Gauge,
    /// Change-feed requests refused because `http.max_long_polls` were
    /// held already.
    pub feed_long_polls_refused: Counter,
    /// Pages of the parent's feed applied (as a follower).
    pub upstream_pages: Counter,
    /// Change lines in them.
    pub upstream_lines: Counter,
    /// Bytes received from the parent (as sent: compressed when it was).
    pub upstream_bytes: Counter,
    /// Failed requests to the parent, by reason.
    pub upstream_errors: Family<Labels, Counter>,
}

/// The oldest `lastSyncedAt` among each served school's live records, as
/// last computed (a walk over every record: a background worker does it,
/// never a scrape, which only reads this copy).
#[derive(Debug, Default)]
pub struct SchoolFreshness(Mutex<Arc<Vec<(Uuid, Timestamp)>>>);

impl SchoolFreshness {
    pub fn set(&self, value: Vec<(Uuid, Timestamp)>) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = Arc::new(value);
    }

    /// The last computed value (empty before the first computation).
    pub fn get(&self) -> Arc<Vec<(Uuid, Timestamp)>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            http: Family::new_with_constructor(latency_histogram),
            sync_latency: latency_histogram(),
            topic_events: Family::default(),
            // 1 … 262,144: the largest batch (100,000) falls in a bucket
            batch_size: Histogram::new(exponential_buckets(1.0, 4.0, 10)),
            commit_duration: latency_histogram(),
            resync_schools: Family::default(),
            resync_duration: latency_histogram(),
            resync_drift: Family::default(),
            school_freshness: SchoolFreshness::default(),
            feed_long_polls: Gauge::default(),
            feed_long_polls_refused: Counter::default(),
            upstream_pages: Counter::default(),
            upstream_lines: Counter::default(),
            upstream_bytes: Counter::default(),
            upstream_errors: Family::default(),
        }
    }
}

pub fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

//! The shared state of a running node, below the workers and the HTTP
//! layer: the store handle, the run-time sync state, the configuration,
//! the clock, the recorded metrics, the recent activity, the resync trigger
//! and the worker registry, in [`NodeState`] — and the two things everybody derives from
//! them: [`NodeState::readiness`] and the status document
//! ([`NodeState::status`]).
//!
//! It holds no HTTP state (tokens, limits: `api`) and starts nothing
//! (`node` does).

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::clock::Clock;
use crate::config::{Config, SchoolFilter};
use crate::domain::format_timestamp;
use crate::metrics::Metrics;
use crate::status::{
    Activity, EntityCounts, KafkaStatus, OffsetOutOfRange, PartitionStatus, ResyncOutcome,
    ResyncStatus, SchoolFreshness, ServedSchools, StoreStatus, SyncState, SyncStatus,
    UpstreamStatus, STATUS_SCHOOLS_MAX,
};
use crate::store::{Note, Store, StoreError};
use crate::worker::Workers;

/// What the workers and the HTTP layer share: one allocation, so handing
/// it to a task or a request is one reference count.
#[derive(Clone)]
pub struct NodeState(Arc<Parts>);

/// The parts of [`NodeState`].
pub struct Parts {
    pub store: Arc<Store>,
    pub sync: Arc<SyncState>,
    pub config: Arc<Config>,
    pub clock: Arc<dyn Clock>,
    pub metrics: Arc<Metrics>,
    /// Changes applied recently, per minute and per school (in memory).
    pub activity: Arc<Activity>,
    /// Signalled when the event stream cannot repair the replica by itself
    /// (offset out of range); the resync worker listens.
    pub resync_wanted: Arc<tokio::sync::Notify>,
    pub workers: Arc<Workers>,
    /// Test hooks into the workers (the `fault-injection` feature only).
    #[cfg(feature = "fault-injection")]
    pub faults: Faults,
}

/// Test hooks into the workers, with the `fault-injection` cargo feature
/// only (tests and benches; a release build has none of this).
#[cfg(feature = "fault-injection")]
#[derive(Debug, Default)]
pub struct Faults {
    /// The ingest worker's next step panics.
    pub panic_ingest: std::sync::atomic::AtomicBool,
    /// While set, the ingest worker has librdkafka stop fetching (pause
    /// every assigned partition), as a node far behind its broker would
    /// not fetch; cleared, it resumes.
    pub pause_ingest: std::sync::atomic::AtomicBool,
    /// Set by the ingest worker once it has paused (cleared once resumed).
    pub ingest_paused: std::sync::atomic::AtomicBool,
}

impl std::ops::Deref for NodeState {
    type Target = Parts;

    fn deref(&self) -> &Parts {
        &self.0
    }
}

/// Why a node should not receive traffic (yet).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NotReady {
    /// The last store write failed (the error).
    StoreUnwritable(String),
    /// A worker died (its name, why); the node is stopping.
    WorkerDied(&'static str, String),
    /// The store is empty and no sync has finished.
    NoData,
}

impl NotReady {
    /// A few words, for systemd's `STATUS=` line.
    pub fn short(&self) -> &'static str {
        match self {
            NotReady::StoreUnwritable(_) => "store cannot be written",
            NotReady::WorkerDied(..) => "a worker died",
            NotReady::NoData => "no data yet",
        }
    }
}

impl std::fmt::Display for NotReady {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NotReady::StoreUnwritable(e) => write!(
                f,
                "the store cannot be written ({e}); the node retries by itself and answers reads \
                 from what it holds meanwhile"
            ),
            NotReady::WorkerDied(name, why) => {
                write!(f, "the {name} worker died ({why}); the node is stopping")
            }
            NotReady::NoData => {
                f.write_str("the store is empty and the first sync has not finished")
            }
        }
    }
}

impl NodeState {
    /// The state of a node with `store` open and `config` loaded; no worker
    /// yet.
    /// What the store remembers of earlier runs (the last resync, the last
    /// offset out of range) is status from the start.
    pub fn new(store: Arc<Store>, config: Config, clock: Arc<dyn Clock>) -> NodeState {
        let sync = SyncState::new(
            !config.kafka.brokers.trim().is_empty(),
            config.upstream.url.is_some(),
        );
        match store
            .read()
            .and_then(|r| Ok((r.last_resync()?, r.offset_out_of_range()?)))
        {
            Ok((resync, out_of_range)) => sync.update(|s| {
                s.last_resync = resync.map(|n| ResyncOutcome {
                    at: n.at,
                    ok: n.ok,
                    detail: n.detail,
                });
                s.offset_out_of_range = out_of_range.map(|n| (n.at, n.detail));
            }),
            Err(e) => {
                tracing::warn!(error = %e, "the last resync and offset out of range not read")
            }
        }
        NodeState(Arc::new(Parts {
            store,
            sync: Arc::new(sync),
            config: Arc::new(config),
            workers: Arc::new(Workers::new(clock.clone())),
            clock,
            metrics: Arc::new(Metrics::default()),
            activity: Arc::new(Activity::default()),
            resync_wanted: Arc::new(tokio::sync::Notify::new()),
            #[cfg(feature = "fault-injection")]
            faults: Faults::default(),
        }))
    }

    /// Records a resync run's outcome in status and, so that a restart
    /// does not forget it, in the store. Blocking (a store write).
    pub fn record_resync(&self, outcome: ResyncOutcome) {
        let note = Note {
            at: outcome.at,
            ok: outcome.ok,
            detail: outcome.detail.clone(),
        };
        self.sync.update(|s| {
            if outcome.ok {
                s.first_sync_done = true;
            }
            s.last_resync = Some(outcome);
        });
        if let Err(e) = self.store.record_resync(&note) {
            tracing::warn!(error = %e, "the resync outcome is not stored; status shows it until a restart");
        }
    }

    /// Records a partition read outside what Kafka holds: in status, in the
    /// store (counted, kept across restarts), and asks for a resync, the
    /// only repair for events lost from the log. Blocking (a store write).
    pub fn record_offset_out_of_range(&self, detail: String) {
        let at = self.clock.now();
        let note = Note {
            at,
            ok: false,
            detail: detail.clone(),
        };
        self.sync
            .update(|s| s.offset_out_of_range = Some((at, detail)));
        if let Err(e) = self.store.record_offset_out_of_range(&note) {
            tracing::warn!(error = %e, "the offset out of range is not stored; status shows it until a restart");
        }
        self.resync_wanted.notify_one();
    }

    /// Ready: the store is open (it is, or there would be no state), its
    /// last write succeeded (a node that cannot take changes in falls
    /// behind: traffic is better sent to a healthy one, although this one
    /// still answers reads), no worker has died, and the store holds data
    /// or the first sync has finished.
    pub fn readiness(&self) -> Result<Result<(), NotReady>, StoreError> {
        if let Some(e) = self.store.health().error {
            return Ok(Err(NotReady::StoreUnwritable(e)));
        }
        if let Some((worker, why)) = self.workers.dead() {
            return Ok(Err(NotReady::WorkerDied(worker, why)));
        }
        if !(self.sync.get().first_sync_done || self.store.read()?.has_data()?) {
            return Ok(Err(NotReady::NoData));
        }
        Ok(Ok(()))
    }

    /// The schools a resync run or an export covers (see
    /// `Store::schools_to_sync`).
    pub fn schools_to_sync(&self, given: Vec<uuid::Uuid>) -> Result<Vec<uuid::Uuid>, StoreError> {
        self.store
            .schools_to_sync(&self.config.school_filter(), given)
    }

    /// Messages the consumer is behind the high watermarks last seen, over
    /// all partitions (0 when unknown).
    pub fn kafka_backlog(&self) -> i64 {
        let sync = self.sync.get();
        if sync.high_watermarks.is_empty() {
            return 0;
        }
        // Workers ask this from async code: never wait for a reopen.
        let Ok(offsets) = self.store.try_read().and_then(|r| r.offsets()) else {
            return 0;
        };
        offsets
            .iter()
            .filter_map(|o| sync.lag(&o.topic, o.partition, o.next_offset))
            .fold(0, i64::saturating_add)
    }

    /// The status document, from one store read transaction.
    pub fn status(&self) -> Result<SyncStatus, StoreError> {
        let config = &self.config;
        let reader = self.store.read()?;
        let stats = reader.stats()?;
        let state = self.sync.get();
        let health = self.store.health();
        let space = self.store.space();
        // Every partition known from the store (consumed) or the broker
        // (high watermark seen); one never read yet shows no offset and its
        // whole length as lag.
        let mut positions: BTreeMap<(String, i32), Option<i64>> = reader
            .offsets()?
            .into_iter()
            .map(|o| ((o.topic, o.partition), Some(o.next_offset)))
            .collect();
        for key in state.high_watermarks.keys() {
            positions.entry(key.clone()).or_insert(None);
        }
        let partitions = positions
            .into_iter()
            .map(|((topic, partition), offset)| {
                let key = (topic, partition);
                PartitionStatus {
                    offset,
                    high_watermark: state.high_watermarks.get(&key).copied(),
                    lag: state.lag(&key.0, partition, offset.unwrap_or(0)),
                    last_event_received_at: state
                        .partition_last_event
                        .get(&key)
                        .map(|t| format_timestamp(*t)),
                    topic: key.0,
                    partition,
                }
            })
            .collect();
        let secs = |s: u64| {
            i64::try_from(s)
                .unwrap_or(i64::MAX)
                .saturating_mul(1_000_000_000)
        };
        let now = self.clock.now();
        let stale = state.is_stale(
            now,
            secs(config.kafka.stale_after_secs),
            secs(config.upstream.stale_after_secs),
            secs(config.resync.interval_secs.saturating_mul(2)),
        );
        let (school_count, schools) = self.school_freshness(&reader)?;
        let upstream = match (&config.upstream.url, &state.upstream) {
            (Some(url), Some(run)) => Some(UpstreamStatus {
                url: url.clone(),
                connected: run.connected,
                cursor: reader.upstream_cursor()?.map(|c| c.to_string()),
                last_page_at: run.last_page_at.map(format_timestamp),
                caught_up: run.caught_up,
                last_error: run.last_error.clone(),
            }),
            _ => None,
        };
        Ok(SyncStatus {
            node_id: config.node.id.clone(),
            generated_at: Some(format_timestamp(now)),
            served_schools: match config.school_filter() {
                SchoolFilter::All => ServedSchools::All,
                SchoolFilter::Only(ids) => ServedSchools::Only(ids.into_iter().collect()),
            },
            kafka: KafkaStatus {
                configured: state.kafka_configured,
                connected: state.kafka_connected,
                last_error: state.kafka_error.clone(),
                group_id: config.group_id(),
                offset_out_of_range: state.offset_out_of_range.as_ref().map(|(at, what)| {
                    OffsetOutOfRange {
                        at: format_timestamp(*at),
                        detail: what.clone(),
                    }
                }),
            },
            store_error: health.error.clone(),
            store: StoreStatus {
                degraded: health.degraded(),
                error: health.error.clone(),
                failing_since: health.failing_since.map(format_timestamp),
                write_failures: health.write_failures,
                reopens: health.reopens,
                pending_documents: stats.pending_documents,
                file_bytes: crate::store::allocated_bytes(&config.store_path()),
                file_len: std::fs::metadata(config.store_path()).ok().map(|m| m.len()),
                live_bytes: space.as_ref().map(|s| s.live_bytes),
                free_share: space.as_ref().and_then(|s| s.free_share),
                space_measured_at: space.as_ref().map(|s| format_timestamp(s.measured_at)),
                tables: space.as_ref().map(|s| s.tables.clone()),
            },
            caught_up: state.first_sync_done,
            partitions,
            last_event_time: reader.watermark()?.map(format_timestamp),
            last_event_received_at: state.last_event_received_at.map(format_timestamp),
            last_resync: state.last_resync.as_ref().map(|r| ResyncStatus {
                at: format_timestamp(r.at),
                result: if r.ok { "ok" } else { "failed" }.into(),
                detail: r.detail.clone(),
            }),
            dead_letter_count: stats.dead_letters,
            stale,
            entities: EntityCounts {
                classes: stats.classes,
                teachers: stats.teachers,
                assignments: stats.assignments,
                tombstones: stats.tombstones,
            },
            counters: stats.counters,
            workers: self.workers.reports(),
            school_count,
            schools,
            applied_per_minute: self.activity.per_minute(now),
            upstream,
        })
    }

    /// How many schools the node serves (serving all: holds data of), and
    /// the freshness of the [`STATUS_SCHOOLS_MAX`] changed least recently.
    /// Cheap enough per request: the schools come from the configuration or
    /// one seek per school in the indexes, the last changes from memory, and
    /// only the listed schools' index keys are counted.
    fn school_freshness(
        &self,
        reader: &crate::store::Reader,
    ) -> Result<(u64, Vec<SchoolFreshness>), StoreError> {
        let schools: Vec<uuid::Uuid> = match self.config.school_filter() {
            SchoolFilter::All => reader.schools()?,
            SchoolFilter::Only(ids) => ids.into_iter().collect(),
        };
        let last = self.activity.last_changes();
        let mut ordered: Vec<_> = schools
            .iter()
            .map(|school| (last.get(school).copied(), *school))
            .collect();
        // `None` (no change since start) sorts first, then the oldest.
        ordered.sort_unstable();
        ordered.truncate(STATUS_SCHOOLS_MAX);
        let listed = ordered
            .into_iter()
            .map(|(at, school_id)| {
                let [classes, teachers, assignments] = reader.school_counts(school_id)?;
                Ok(SchoolFreshness {
                    school_id,
                    last_change_at: at.map(format_timestamp),
                    classes,
                    teachers,
                    assignments,
                })
            })
            .collect::<Result<_, StoreError>>()?;
        Ok((schools.len() as u64, listed))
    }
}

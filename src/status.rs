//! What the node knows about its own synchronisation: the run-time
//! [`SyncState`] beyond what the store holds (broker reachability, high
//! watermarks, the first sync, the last resync, a follower's contact with
//! its parent), written by the workers;
//! and [`SyncStatus`], the typed document of `GET /api/sync/status` that
//! `emis-edge status` deserializes too, so a renamed field breaks the
//! build, not the CLI. (Whether the store can be written is the store's
//! own `StoreHealth`; the document is assembled in `state`.) [`Activity`]
//! remembers, in memory, what the workers applied recently: changes per
//! minute and each school's last change, for the status page.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::domain::Timestamp;
use crate::worker::WorkerReport;

/// The outcome of one resync run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResyncOutcome {
    pub at: Timestamp,
    pub ok: bool,
    pub detail: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SyncSnapshot {
    /// Whether `kafka.brokers` is set at all.
    pub kafka_configured: bool,
    /// Whether the last contact with the broker succeeded.
    pub kafka_connected: bool,
    pub kafka_error: Option<String>,
    /// When the broker was last reached (node clock).
    pub kafka_contact_at: Option<Timestamp>,
    /// (topic, partition) → high watermark last seen.
    pub high_watermarks: BTreeMap<(String, i32), i64>,
    /// When an event was last received (node clock).
    pub last_event_received_at: Option<Timestamp>,
    /// The same per (topic, partition).
    pub partition_last_event: BTreeMap<(String, i32), Timestamp>,
    /// The first catch-up (to the high watermarks seen at start) or the
    /// first resync finished.
    pub first_sync_done: bool,
    /// Also kept in the store (`NodeState::record_resync`), and read back
    /// at start.
    pub last_resync: Option<ResyncOutcome>,
    /// When and where consumption last fell off the retained log; also kept
    /// in the store (`NodeState::record_offset_out_of_range`).
    pub offset_out_of_range: Option<(Timestamp, String)>,
    /// A follower's contact with its parent; `None` unless `upstream.url`
    /// is set.
    pub upstream: Option<UpstreamRun>,
}

/// What a follower knows of its parent at run time (its cursor is in the
/// store).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UpstreamRun {
    /// The last request to the parent was answered with a page.
    pub connected: bool,
    /// When the last page was applied (node clock).
    pub last_page_at: Option<Timestamp>,
    /// The last page applied said nothing more followed (`more: false`).
    pub caught_up: bool,
    /// Why the last request failed, until one succeeds again.
    pub last_error: Option<String>,
}

/// Shared, lock-protected run-time status. Critical sections are tiny.
#[derive(Debug, Default)]
pub struct SyncState(Mutex<SyncSnapshot>);

impl SyncState {
    /// The state of a node that consumes Kafka (`kafka_configured`), or
    /// follows a parent (`upstream_configured`), or neither.
    pub fn new(kafka_configured: bool, upstream_configured: bool) -> SyncState {
        SyncState(Mutex::new(SyncSnapshot {
            kafka_configured,
            upstream: upstream_configured.then(UpstreamRun::default),
            ..SyncSnapshot::default()
        }))
    }

    /// Changes a follower's run-time state (nothing when it is none).
    pub fn update_upstream(&self, f: impl FnOnce(&mut UpstreamRun)) {
        self.update(|s| {
            if let Some(u) = s.upstream.as_mut() {
                f(u);
            }
        })
    }

    pub fn update(&self, f: impl FnOnce(&mut SyncSnapshot)) {
        f(&mut self.0.lock().unwrap_or_else(|p| p.into_inner()))
    }

    pub fn get(&self) -> SyncSnapshot {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl SyncSnapshot {
    /// Messages a partition is behind the high watermark last seen, for a
    /// consumer whose next offset is `next` (`None`: watermark unknown).
    pub fn lag(&self, topic: &str, partition: i32, next: i64) -> Option<i64> {
        let hw = self.high_watermarks.get(&(topic.to_owned(), partition))?;
        Some(hw.saturating_sub(next).max(0))
    }

    /// Whether the node cannot currently vouch that its data is fresh: the
    /// broker has not been reached for `stale_after`; a follower has had
    /// no page from its parent for `upstream_stale_after`; or there is
    /// neither and no successful resync within `resync_window`.
    pub fn is_stale(
        &self,
        now: Timestamp,
        stale_after: i64,
        upstream_stale_after: i64,
        resync_window: i64,
    ) -> bool {
        let recent =
            |t: Option<Timestamp>, window: i64| t.is_some_and(|t| now.saturating_sub(t) <= window);
        if let Some(upstream) = &self.upstream {
            !recent(upstream.last_page_at, upstream_stale_after)
        } else if self.kafka_configured {
            !(self.kafka_connected || recent(self.kafka_contact_at, stale_after))
        } else {
            let resynced = self.last_resync.as_ref().filter(|r| r.ok).map(|r| r.at);
            !recent(resynced, resync_window)
        }
    }
}

/// Minutes of applied-change counts [`Activity`] keeps (and the status
/// document shows): the last hour.
pub const ACTIVITY_MINUTES: usize = 60;

const MINUTE: i64 = 60 * 1_000_000_000;

/// What the node applied recently, in memory only (a restart starts it
/// empty): changes per minute of the node's clock over the last
/// [`ACTIVITY_MINUTES`], and when a change of each school was last applied.
/// Kept apart from [`SyncState`], which is copied whole on every read, while
/// this holds an entry per school (a provincial node: about 1,000).
///
/// Why here and not from the store: the store keeps no per-school times or
/// counts, and deriving them means reading every record of a school. The
/// writers (ingest, resync, import) know what they applied, so they say it
/// here once per batch or school.
#[derive(Debug, Default)]
pub struct Activity(Mutex<ActivityInner>);

#[derive(Debug, Default)]
struct ActivityInner {
    /// (minute since the epoch, changes applied in it), oldest first, at
    /// most [`ACTIVITY_MINUTES`] entries; minutes with none are absent.
    minutes: VecDeque<(i64, u64)>,
    /// School → when this node last applied a change of it (node clock).
    last_change: HashMap<Uuid, Timestamp>,
}

impl Activity {
    fn lock(&self) -> std::sync::MutexGuard<'_, ActivityInner> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records changes applied at `now`: `n` for each `(school, n)`; a
    /// school with `n == 0` changed nothing and is not recorded.
    pub fn record(&self, now: Timestamp, applied: impl IntoIterator<Item = (Uuid, u64)>) {
        let minute = now.div_euclid(MINUTE);
        let mut inner = self.lock();
        let mut total = 0u64;
        for (school, n) in applied {
            if n > 0 {
                total += n;
                inner.last_change.insert(school, now);
            }
        }
        if total == 0 {
            return;
        }
        match inner.minutes.back_mut() {
            Some((m, count)) if *m == minute => *count += total,
            // A clock set back lands in an earlier minute: it is counted in
            // the newest one rather than reorder the ring.
            Some((m, count)) if *m > minute => *count += total,
            _ => inner.minutes.push_back((minute, total)),
        }
        while inner.minutes.len() > ACTIVITY_MINUTES {
            inner.minutes.pop_front();
        }
    }

    /// Changes applied in each of the last [`ACTIVITY_MINUTES`] minutes up
    /// to `now`'s, oldest first (the last entry is the current minute, still
    /// counting).
    pub fn per_minute(&self, now: Timestamp) -> Vec<u64> {
        let current = now.div_euclid(MINUTE);
        let first = current - (ACTIVITY_MINUTES as i64 - 1);
        let mut out = vec![0; ACTIVITY_MINUTES];
        for &(minute, count) in &self.lock().minutes {
            // A minute after `now` (the clock was set back) counts as now.
            if minute >= first {
                out[(minute.min(current) - first) as usize] += count;
            }
        }
        out
    }

    /// When a change of each school was last applied here, since start.
    pub fn last_changes(&self) -> HashMap<Uuid, Timestamp> {
        self.lock().last_change.clone()
    }
}

/// The sync status document (`GET /api/sync/status`, `emis-edge status`).
/// Times are RFC 3339 strings; absent ones are `null`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SyncStatus {
    #[schema(example = "edge-hanoi-01")]
    pub node_id: String,
    /// When the node made this document (its own clock): the time the
    /// others compare with, whatever the reader's clock says.
    #[serde(default)]
    pub generated_at: Option<String>,
    pub served_schools: ServedSchools,
    pub kafka: KafkaStatus,
    /// The store's last write error (also in `store.error`), while writes fail.
    pub store_error: Option<String>,
    pub store: StoreStatus,
    /// The first catch-up, resync or import has finished.
    pub caught_up: bool,
    pub partitions: Vec<PartitionStatus>,
    /// Source timestamp of the newest change applied (the store watermark).
    pub last_event_time: Option<String>,
    /// When this node last received an event (its own clock).
    pub last_event_received_at: Option<String>,
    pub last_resync: Option<ResyncStatus>,
    pub dead_letter_count: u64,
    /// The node cannot vouch that its data is fresh.
    pub stale: bool,
    pub entities: EntityCounts,
    /// The store's persisted counters (`events_applied`, …).
    pub counters: BTreeMap<String, u64>,
    /// The node's background workers; empty when read from a stopped node's store.
    #[serde(default)]
    pub workers: Vec<WorkerReport>,
    /// How many schools the node serves (`schools.ids`), or, serving all,
    /// how many the store holds data of.
    #[serde(default)]
    pub school_count: u64,
    /// Per-school freshness of at most [`STATUS_SCHOOLS_MAX`] of them, those
    /// changed least recently first (no change since start first), then by
    /// id: the ones to look at on a node serving many.
    #[serde(default)]
    pub schools: Vec<SchoolFreshness>,
    /// Changes applied (events, resync and import records) in each of the
    /// last 60 minutes of the node's clock, oldest first, the current
    /// minute last; since start (all zero when read from a stopped node's
    /// store).
    #[serde(default)]
    pub applied_per_minute: Vec<u64>,
    /// A follower's parent (contract §6); `null` unless `upstream.url` is set.
    #[serde(default)]
    pub upstream: Option<UpstreamStatus>,
}

/// The most schools the status document lists (their entity counts are
/// read per request).
pub const STATUS_SCHOOLS_MAX: usize = 50;

/// One school in the status document.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SchoolFreshness {
    pub school_id: Uuid,
    /// When this node last applied a change of the school (its own clock),
    /// since it started; `null`: none since start.
    pub last_change_at: Option<String>,
    /// Live entities of the school here.
    pub classes: u64,
    pub teachers: u64,
    pub assignments: u64,
}

/// A follower's view of its parent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct UpstreamStatus {
    pub url: String,
    /// The last request was answered with a page.
    pub connected: bool,
    /// The parent's cursor the applied pages reach (stored with them).
    pub cursor: Option<String>,
    /// When the last page was applied.
    pub last_page_at: Option<String>,
    /// The last page applied was the end of the feed for now; `false`:
    /// behind (more pages are waiting, or no page came yet).
    pub caught_up: bool,
    /// Why the last request failed, until one succeeds again.
    pub last_error: Option<String>,
}

/// `"all"`, or the list of served school ids.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ServedSchools {
    All,
    Only(Vec<Uuid>),
}

/// `"all"`, or an array of school ids (serialized by hand above).
impl utoipa::PartialSchema for ServedSchools {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        serde_json::from_value(serde_json::json!({
            "description": "`\"all\"`, or the ids of the schools this node serves",
            "oneOf": [
                {"type": "string", "enum": ["all"]},
                {"type": "array", "items": {"type": "string", "format": "uuid"}}
            ]
        }))
        .expect("a valid schema")
    }
}

impl utoipa::ToSchema for ServedSchools {}

impl Serialize for ServedSchools {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            ServedSchools::All => s.serialize_str("all"),
            ServedSchools::Only(ids) => ids.serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for ServedSchools {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Word(String),
            Ids(Vec<Uuid>),
        }
        match Raw::deserialize(d)? {
            Raw::Word(w) if w == "all" => Ok(ServedSchools::All),
            Raw::Word(w) => Err(serde::de::Error::custom(format!(
                "servedSchools: expected \"all\" or a list of ids, got {w:?}"
            ))),
            Raw::Ids(ids) => Ok(ServedSchools::Only(ids)),
        }
    }
}

impl std::fmt::Display for ServedSchools {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ServedSchools::All => f.write_str("all"),
            ServedSchools::Only(ids) => {
                let ids: Vec<String> = ids.iter().map(Uuid::to_string).collect();
                write!(f, "{}", ids.join(", "))
            }
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct KafkaStatus {
    /// `kafka.brokers` is set.
    pub configured: bool,
    /// The last contact with the broker succeeded.
    pub connected: bool,
    pub last_error: Option<String>,
    pub group_id: String,
    /// When and where consumption last fell off the retained log.
    pub offset_out_of_range: Option<OffsetOutOfRange>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct OffsetOutOfRange {
    pub at: String,
    pub detail: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct StoreStatus {
    /// The last write failed: reads answer, nothing new comes in.
    pub degraded: bool,
    pub error: Option<String>,
    pub failing_since: Option<String>,
    pub write_failures: u64,
    pub reopens: u64,
    pub pending_documents: u64,
    /// What the store file takes on disk, in allocated blocks (`null`
    /// when it cannot be read). It grows with the data and does not shrink
    /// when data is deleted: redb reuses the free pages inside it, and a
    /// compaction gives them back.
    #[serde(default)]
    pub file_bytes: Option<u64>,
    /// The file's length; larger than `fileBytes` while redb has grown it
    /// by regions it has not written yet (the file is sparse).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file_len: Option<u64>,
    /// The keys and values the tables hold: the data itself, without the
    /// B-tree overhead and free pages (absent until first measured; see
    /// `emis-edge status --tables`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub live_bytes: Option<u64>,
    /// The share of the file no table uses (0.0–1.0): free pages a
    /// compaction would give back (absent until first measured).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub free_share: Option<f64>,
    /// When the space was last measured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub space_measured_at: Option<String>,
    /// Where the bytes go, per table, largest first, as last measured
    /// (`emis-edge status --tables` prints them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tables: Option<Vec<crate::store::TableSpace>>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct PartitionStatus {
    pub topic: String,
    pub partition: i32,
    /// The next offset to read; `null` before the first read.
    pub offset: Option<i64>,
    pub high_watermark: Option<i64>,
    pub lag: Option<i64>,
    pub last_event_received_at: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ResyncStatus {
    pub at: String,
    /// `ok` or `failed`.
    #[schema(example = "ok")]
    pub result: String,
    pub detail: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct EntityCounts {
    pub classes: u64,
    pub teachers: u64,
    pub assignments: u64,
    pub tombstones: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_without_broker_or_resync_is_stale() {
        let s = SyncSnapshot::default();
        assert!(s.is_stale(100, 10, 10, 10));
        let s = SyncSnapshot {
            last_resync: Some(ResyncOutcome {
                at: 95,
                ok: true,
                detail: String::new(),
            }),
            ..s
        };
        assert!(!s.is_stale(100, 10, 10, 10));
        assert!(s.is_stale(106, 10, 10, 10));
    }

    #[test]
    fn activity_counts_changes_per_minute_over_the_last_hour() {
        let a = Activity::default();
        let school = Uuid::from_u128(7);
        let other = Uuid::from_u128(8);
        let t = 1_000 * MINUTE;
        a.record(t, [(school, 3), (other, 0)]);
        a.record(t + MINUTE / 2, [(school, 2)]);
        a.record(t + 2 * MINUTE, [(other, 4)]);
        let per = a.per_minute(t + 2 * MINUTE);
        assert_eq!(per.len(), ACTIVITY_MINUTES);
        assert_eq!(&per[ACTIVITY_MINUTES - 3..], &[5, 0, 4]);
        assert_eq!(per.iter().sum::<u64>(), 9);
        let last = a.last_changes();
        assert_eq!(last[&school], t + MINUTE / 2);
        assert_eq!(last[&other], t + 2 * MINUTE);
        // An hour later the first minute has left the window.
        let per = a.per_minute(t + 60 * MINUTE);
        assert_eq!(per.iter().sum::<u64>(), 4);
        // Nothing applied: nothing recorded.
        a.record(t + 61 * MINUTE, [(school, 0)]);
        assert_eq!(a.last_changes()[&school], t + MINUTE / 2);
        // The ring never holds more than an hour of minutes.
        for m in 0..200 {
            a.record(t + (100 + m) * MINUTE, [(school, 1)]);
        }
        assert_eq!(a.lock().minutes.len(), ACTIVITY_MINUTES);
        assert_eq!(a.per_minute(t + 299 * MINUTE), vec![1; ACTIVITY_MINUTES]);
    }

    /// Saturating: a contact "in 1677" seen "in 2262" (a clock set to the
    /// ends of the range) overflows a plain subtraction in debug builds.
    #[test]
    fn staleness_and_lag_saturate_at_the_ends_of_the_range() {
        let s = SyncSnapshot {
            kafka_configured: true,
            kafka_contact_at: Some(i64::MIN),
            high_watermarks: [(("t".to_owned(), 0), i64::MAX)].into(),
            ..SyncSnapshot::default()
        };
        assert!(s.is_stale(i64::MAX, 10, 0, 0));
        assert_eq!(s.lag("t", 0, i64::MIN), Some(i64::MAX));
        assert_eq!(s.lag("t", 0, i64::MAX), Some(0));
    }

    #[test]
    fn a_lost_broker_makes_the_node_stale_after_the_threshold() {
        let s = SyncSnapshot {
            kafka_configured: true,
            kafka_connected: false,
            kafka_contact_at: Some(50),
            ..SyncSnapshot::default()
        };
        assert!(!s.is_stale(60, 10, 0, 0));
        assert!(s.is_stale(61, 10, 0, 0));
    }

    #[test]
    fn a_follower_is_stale_once_no_page_came_for_the_bound() {
        let s = SyncSnapshot {
            upstream: Some(UpstreamRun::default()),
            ..SyncSnapshot::default()
        };
        assert!(s.is_stale(100, 1000, 10, 1000), "no page yet");
        let s = SyncSnapshot {
            upstream: Some(UpstreamRun {
                last_page_at: Some(50),
                ..UpstreamRun::default()
            }),
            ..s
        };
        assert!(!s.is_stale(60, 0, 10, 0));
        assert!(s.is_stale(61, 1000, 10, 1000));
    }
}

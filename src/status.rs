//! What the node knows about its own synchronisation: the run-time
//! [`SyncState`] beyond what the store holds (broker reachability, high
//! watermarks, the first sync, the last resync), written by the workers;
//! and [`SyncStatus`], the typed document of `GET /api/sync/status` that
//! `emis-edge status` deserializes too, so a renamed field breaks the
//! build, not the CLI. (Whether the store can be written is the store's
//! own `StoreHealth`; the document is assembled in `state`.)

use std::collections::BTreeMap;
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
}

/// Shared, lock-protected run-time status. Critical sections are tiny.
#[derive(Debug, Default)]
pub struct SyncState(Mutex<SyncSnapshot>);

impl SyncState {
    pub fn new(kafka_configured: bool) -> SyncState {
        SyncState(Mutex::new(SyncSnapshot {
            kafka_configured,
            ..SyncSnapshot::default()
        }))
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
    /// broker has not been reached for `stale_after`, or there is no broker
    /// and no successful resync within `resync_window`.
    pub fn is_stale(&self, now: Timestamp, stale_after: i64, resync_window: i64) -> bool {
        let recent =
            |t: Option<Timestamp>, window: i64| t.is_some_and(|t| now.saturating_sub(t) <= window);
        if self.kafka_configured {
            !(self.kafka_connected || recent(self.kafka_contact_at, stale_after))
        } else {
            let resynced = self.last_resync.as_ref().filter(|r| r.ok).map(|r| r.at);
            !recent(resynced, resync_window)
        }
    }
}

/// The sync status document (`GET /api/sync/status`, `emis-edge status`).
/// Times are RFC 3339 strings; absent ones are `null`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SyncStatus {
    pub node_id: String,
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
}

/// `"all"`, or the list of served school ids.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ServedSchools {
    All,
    Only(Vec<Uuid>),
}

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

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
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

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OffsetOutOfRange {
    pub at: String,
    pub detail: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StoreStatus {
    /// The last write failed: reads answer, nothing new comes in.
    pub degraded: bool,
    pub error: Option<String>,
    pub failing_since: Option<String>,
    pub write_failures: u64,
    pub reopens: u64,
    pub pending_documents: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
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

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ResyncStatus {
    pub at: String,
    /// `ok` or `failed`.
    pub result: String,
    pub detail: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
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
        assert!(s.is_stale(100, 10, 10));
        let s = SyncSnapshot {
            last_resync: Some(ResyncOutcome {
                at: 95,
                ok: true,
                detail: String::new(),
            }),
            ..s
        };
        assert!(!s.is_stale(100, 10, 10));
        assert!(s.is_stale(106, 10, 10));
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
        assert!(s.is_stale(i64::MAX, 10, 0));
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
        assert!(!s.is_stale(60, 10, 0));
        assert!(s.is_stale(61, 10, 0));
    }
}

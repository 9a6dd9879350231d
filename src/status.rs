//! What the node knows about its own synchronisation at run time, beyond
//! what the store holds: broker reachability, high watermarks, readiness,
//! the last resync. Written by the workers, read by the API and metrics.
//! (Whether the store can be written is the store's own `StoreHealth`.)

use std::collections::BTreeMap;
use std::sync::Mutex;

use crate::domain::Timestamp;

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
    pub last_resync: Option<ResyncOutcome>,
    /// When and where consumption last fell off the retained log.
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
        Some((hw - next).max(0))
    }

    /// Whether the node cannot currently vouch that its data is fresh: the
    /// broker has not been reached for `stale_after`, or there is no broker
    /// and no successful resync within `resync_window`.
    pub fn is_stale(&self, now: Timestamp, stale_after: i64, resync_window: i64) -> bool {
        let recent = |t: Option<Timestamp>, window: i64| t.is_some_and(|t| now - t <= window);
        if self.kafka_configured {
            !(self.kafka_connected || recent(self.kafka_contact_at, stale_after))
        } else {
            let resynced = self.last_resync.as_ref().filter(|r| r.ok).map(|r| r.at);
            !recent(resynced, resync_window)
        }
    }
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

//! How far a source timestamp is trusted (contract §2, "Time").
//!
//! The order key ranks changes by their source `timestamp`, and the store's
//! watermark (the `asOf` of every snapshot a node serves) is the newest
//! one accepted. So one change stamped in the year 2200 would win every
//! conflict for good, and make a node that resyncs from this one delete
//! whatever is missing from a snapshot "as of 2200". A change stamped more
//! than [`FutureSkew`] after a clock its source cannot fake is therefore
//! refused: the Kafka record's own timestamp for an event (set by the
//! producer or the broker, not the school server), the `asOf` of the end
//! line for a snapshot line (and of the page line for a feed line). The
//! node's own clock decides none of this: a school server's clock may be
//! wrong by days.
//!
//! Pure arithmetic on [`Timestamp`]s, saturating everywhere: a timestamp
//! may be anywhere in 1677–2262, and the bound of one near the end of that
//! range must not overflow.

use std::time::Duration;

use super::entity::{format_timestamp, Timestamp};
use super::event::EventError;

/// How far after its reference clock a source timestamp may lie
/// (`ingest.max_future_skew`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FutureSkew {
    nanos: i64,
}

impl FutureSkew {
    /// The contract's default, one hour.
    pub const DEFAULT: FutureSkew = FutureSkew {
        nanos: 3600 * 1_000_000_000,
    };

    /// The skew of a configured duration (saturating at ~292 years).
    pub fn from_duration(d: Duration) -> FutureSkew {
        FutureSkew {
            nanos: i64::try_from(d.as_nanos()).unwrap_or(i64::MAX),
        }
    }

    pub fn as_duration(self) -> Duration {
        Duration::from_nanos(self.nanos.max(0).unsigned_abs())
    }

    /// The latest timestamp accepted against `reference`.
    pub fn latest(self, reference: Timestamp) -> Timestamp {
        reference.saturating_add(self.nanos)
    }

    /// Refuses `value`, the source timestamp of `field`, when it lies more
    /// than the skew after `reference`, which `reference_name` names (e.g.
    /// "the Kafka record's timestamp"). The reason names the field, the
    /// value, the bound and the configuration key.
    pub fn check(
        self,
        field: &'static str,
        value: Timestamp,
        reference: Timestamp,
        reference_name: &str,
    ) -> Result<(), EventError> {
        if value <= self.latest(reference) {
            return Ok(());
        }
        Err(EventError::Invalid {
            field,
            reason: format!(
                "{} lies more than {} (ingest.max_future_skew) after {reference_name} {}: \
                 refused as implausible",
                format_timestamp(value),
                humantime_serde::re::humantime::format_duration(self.as_duration()),
                format_timestamp(reference),
            ),
        })
    }
}

/// Seconds from `earlier` to `later`, 0 when `later` is not after it
/// (sync latency, time since an event). Saturating: timestamps at the ends
/// of the range (1677, 2262) would overflow a plain subtraction.
pub fn seconds_between(earlier: Timestamp, later: Timestamp) -> f64 {
    later.saturating_sub(earlier).max(0) as f64 / 1e9
}

impl Default for FutureSkew {
    fn default() -> Self {
        FutureSkew::DEFAULT
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Timestamp = 1_761_472_800_000_000_000; // 2025-10-26T10:00:00Z
    const HOUR: i64 = 3600 * 1_000_000_000;

    #[test]
    fn up_to_the_skew_after_the_reference_is_accepted_and_beyond_it_refused() {
        let skew = FutureSkew::DEFAULT;
        assert_eq!(skew.check("timestamp", T + HOUR, T, "the record"), Ok(()));
        assert_eq!(skew.check("timestamp", T - 400 * HOUR, T, "x"), Ok(()));
        let e = skew
            .check("timestamp", T + HOUR + 1, T, "the Kafka record's timestamp")
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "field `timestamp`: 2025-10-26T11:00:00.000000001Z lies more than 1h \
             (ingest.max_future_skew) after the Kafka record's timestamp \
             2025-10-26T10:00:00Z: refused as implausible"
        );
    }

    #[test]
    fn seconds_between_saturates_and_is_never_negative() {
        assert_eq!(seconds_between(T, T + 2_500_000_000), 2.5);
        assert_eq!(seconds_between(T, T - HOUR), 0.0);
        // 1677 to 2262: a plain subtraction overflows (a panic in debug).
        assert_eq!(seconds_between(i64::MIN, i64::MAX), i64::MAX as f64 / 1e9);
        assert_eq!(seconds_between(i64::MAX, i64::MIN), 0.0);
    }

    #[test]
    fn the_bound_saturates_at_the_ends_of_the_timestamp_range() {
        let skew = FutureSkew::from_duration(Duration::MAX);
        assert_eq!(skew.latest(i64::MAX - 1), i64::MAX);
        assert_eq!(skew.check("timestamp", i64::MAX, i64::MAX, "x"), Ok(()));
        let skew = FutureSkew::DEFAULT;
        assert_eq!(skew.latest(i64::MIN), i64::MIN + HOUR);
        assert!(skew.check("timestamp", i64::MAX, i64::MIN, "x").is_err());
        assert_eq!(skew.check("timestamp", i64::MIN, i64::MAX, "x"), Ok(()));
    }
}

//! The Kafka event decoder, `Event::parse(topic's event type, record value)`.
//!
//! The first input byte picks the topic (`(byte - b'0') % 9`, so the seeds
//! start with a readable digit: `0` is `emis.class.created`, `8`
//! `emis.assignment.deleted`); the rest is the record value. Properties:
//! no panic; an error renders as text (the dead-letter reason); a parsed
//! event matches its topic and, written back as a payload, parses to the
//! same event; the arithmetic ingest does with its timestamp (the
//! `ingest.max_future_skew` check against the record's timestamp, the sync
//! latency) cannot overflow for any timestamp of the range, 1677 to 2262,
//! against any reference.

#![no_main]

use emis_edge::domain::{
    format_timestamp, seconds_between, Change, Entity, Event, EventType, FutureSkew,
};
use libfuzzer_sys::fuzz_target;
use serde_json::{json, Value};

/// Above the largest payload worth mutating (every contract field at its
/// limit is under 4 KiB); `-max_len` is set lower still.
const MAX_INPUT: usize = 64 * 1024;

fuzz_target!(|data: &[u8]| {
    let Some((&selector, raw)) = data.split_first() else {
        return;
    };
    if raw.len() > MAX_INPUT {
        return;
    }
    let expected = EventType::ALL[usize::from(selector.wrapping_sub(b'0')) % 9];
    let event = match Event::parse(expected, raw) {
        Ok(event) => event,
        Err(e) => {
            assert!(!e.to_string().is_empty());
            return;
        }
    };
    assert_eq!(event.event_type, expected);
    assert_eq!(event.key.delete, expected.is_delete());
    assert_eq!(event.change.kind(), expected.kind());
    assert_eq!(
        matches!(event.change, Change::Delete { .. }),
        expected.is_delete()
    );

    let t = event.key.timestamp;
    for reference in [i64::MIN, -1, 0, t, i64::MAX] {
        let skew = FutureSkew::DEFAULT;
        let checked = skew.check("timestamp", t, reference, "the record's timestamp");
        assert_eq!(checked.is_ok(), t <= skew.latest(reference));
        for s in [seconds_between(t, reference), seconds_between(reference, t)] {
            assert!(s.is_finite() && s >= 0.0);
        }
    }

    let again = payload(&event).to_string();
    match Event::parse(expected, again.as_bytes()) {
        Ok(reparsed) => assert_eq!(reparsed, event, "re-parsed from {again}"),
        Err(e) => panic!("{again} does not parse again: {e}"),
    }
});

/// The event as a central service would publish it.
fn payload(event: &Event) -> Value {
    let mut v = match &event.change {
        Change::Upsert(Entity::Class(c)) => serde_json::to_value(c),
        Change::Upsert(Entity::Teacher(t)) => serde_json::to_value(t),
        Change::Upsert(Entity::Assignment(a)) => serde_json::to_value(a),
        Change::Delete {
            kind,
            id,
            school_id,
        } => Ok(json!({ kind.id_field(): id, "schoolId": school_id })),
    }
    .expect("entities serialize");
    v["eventId"] = json!(event.key.event_id);
    v["eventType"] = json!(event.event_type.name());
    v["timestamp"] = json!(format_timestamp(event.key.timestamp));
    if let Some(version) = event.key.version {
        v["version"] = json!(version);
    }
    v
}

//! The snapshot wire format (contract §3): NDJSON record lines closed by an
//! `end` line. Used by the snapshot route, resync, export and import.

use serde::Serialize;
use uuid::Uuid;

use super::entity::{format_timestamp, Entity, EntityKind, OrderKey, Record, Timestamp};
use super::event::{parse_object, EventError, Fields};
use super::feed::{Cursor, CursorError};
use super::time::FutureSkew;

/// The longest snapshot line read (a record or an end line), whether it
/// comes from a download or a file: a Kafka event's payload limit, so that
/// reading one line never holds more than that.
pub const MAX_LINE_BYTES: usize = super::event::MAX_EVENT_BYTES;

/// One parsed line of a snapshot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SnapshotLine {
    /// A live entity with its order key. Snapshots carry no `eventId`
    /// unless the producing node knew it (emis-edge writes it as an extra
    /// field); without one the nil UUID takes its place in the key, so an
    /// equal-version event already applied locally is not overwritten.
    Record { key: OrderKey, entity: Entity },
    End {
        school_id: Uuid,
        count: u64,
        as_of: Timestamp,
        /// The serving node's change-feed position at the snapshot's read
        /// transaction (contract §3); a central service has none.
        cursor: Option<Cursor>,
    },
}

impl SnapshotLine {
    pub fn parse(raw: &[u8]) -> Result<SnapshotLine, EventError> {
        let map = parse_object(raw)?;
        let f = Fields(&map);
        let kind = f.string("kind", 1, 20)?;
        let school_id = f.uuid("schoolId")?;
        if kind == "end" {
            return Ok(SnapshotLine::End {
                school_id,
                count: f.u64("count")?,
                as_of: f.timestamp("asOf")?,
                cursor: f
                    .0
                    .get("cursor")
                    .filter(|v| !v.is_null())
                    .map(|_| {
                        f.string("cursor", 1, 100)?
                            .parse()
                            .map_err(|e: CursorError| EventError::Invalid {
                                field: "cursor",
                                reason: e.to_string(),
                            })
                    })
                    .transpose()?,
            });
        }
        let kind = EntityKind::ALL
            .into_iter()
            .find(|k| k.as_str() == kind)
            .ok_or_else(|| EventError::Invalid {
                field: "kind",
                reason: format!(
                    "{kind:?} is not one of \"class\", \"teacher\", \"assignment\", \"end\""
                ),
            })?;
        let (key, entity) = parse_record(&f, kind, school_id)?;
        Ok(SnapshotLine::Record { key, entity })
    }
}

/// The entity and order key of a record line (snapshot and feed alike).
pub(crate) fn parse_record(
    f: &Fields,
    kind: EntityKind,
    school_id: Uuid,
) -> Result<(OrderKey, Entity), EventError> {
    let key = OrderKey {
        version: f.opt_u64("version")?,
        timestamp: f.timestamp("timestamp")?,
        delete: false,
        event_id: f.opt_uuid("eventId")?.unwrap_or(Uuid::nil()),
    };
    Ok((key, f.entity(kind, school_id)?))
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct RecordLine<'a, T> {
    kind: &'static str,
    #[serde(flatten)]
    data: &'a T,
    version: Option<u64>,
    timestamp: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    event_id: Option<Uuid>,
}

/// One record line, newline included.
pub fn record_line(record: &Record<Entity>) -> Vec<u8> {
    match &record.data {
        Entity::Class(c) => line_of(EntityKind::Class, c, record),
        Entity::Teacher(t) => line_of(EntityKind::Teacher, t, record),
        Entity::Assignment(a) => line_of(EntityKind::Assignment, a, record),
    }
}

fn line_of<T: Serialize>(kind: EntityKind, data: &T, record: &Record<Entity>) -> Vec<u8> {
    let line = RecordLine {
        kind: kind.as_str(),
        data,
        version: record.key.version,
        timestamp: format_timestamp(record.key.timestamp),
        event_id: Some(record.key.event_id).filter(|id| !id.is_nil()),
    };
    let mut out = serde_json::to_vec(&line).expect("entities always serialize");
    out.push(b'\n');
    out
}

/// The closing line of a source without a change feed (a central
/// service's, the generator's), newline included.
pub fn end_line(school_id: Uuid, count: u64, as_of: Timestamp) -> Vec<u8> {
    end_line_with(school_id, count, as_of, None)
}

/// The closing line with the serving node's change-feed position at the
/// snapshot (contract §3), newline included.
pub fn end_line_at(school_id: Uuid, count: u64, as_of: Timestamp, cursor: &Cursor) -> Vec<u8> {
    end_line_with(school_id, count, as_of, Some(cursor))
}

fn end_line_with(
    school_id: Uuid,
    count: u64,
    as_of: Timestamp,
    cursor: Option<&Cursor>,
) -> Vec<u8> {
    let mut line = serde_json::json!({
        "kind": "end",
        "schoolId": school_id,
        "count": count,
        "asOf": format_timestamp(as_of),
    });
    if let Some(cursor) = cursor {
        line["cursor"] = cursor.to_string().into();
    }
    let mut out = serde_json::to_vec(&line).expect("end line always serializes");
    out.push(b'\n');
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{Class, SyncSource};

    #[test]
    fn a_record_line_parses_back_to_the_same_entity_and_key() {
        let record = Record {
            data: Entity::Class(Class {
                class_id: Uuid::from_u128(1),
                school_id: Uuid::from_u128(2),
                class_name: "Lớp 10A1".into(),
                grade: Some("Khối 10".into()),
                academic_year: None,
                total_students: Some(45),
                homeroom_teacher_id: None,
            }),
            key: OrderKey {
                version: Some(7),
                timestamp: 1_761_472_800_123_000_000,
                delete: false,
                event_id: Uuid::from_u128(9),
            },
            last_synced_at: 0,
            source: SyncSource::Kafka,
        };
        let line = record_line(&record);
        assert_eq!(line.last(), Some(&b'\n'));
        let parsed = SnapshotLine::parse(&line[..line.len() - 1]).unwrap();
        assert_eq!(
            parsed,
            SnapshotLine::Record {
                key: record.key,
                entity: record.data
            }
        );
    }

    #[test]
    fn the_end_line_round_trips_with_or_without_a_cursor() {
        let cursor = Cursor::at(Uuid::from_u128(77), 12);
        for cursor in [None, Some(cursor)] {
            let line = end_line_with(
                Uuid::from_u128(2),
                3,
                1_761_472_800_000_000_000,
                cursor.as_ref(),
            );
            assert_eq!(
                SnapshotLine::parse(line.trim_ascii_end()).unwrap(),
                SnapshotLine::End {
                    school_id: Uuid::from_u128(2),
                    count: 3,
                    as_of: 1_761_472_800_000_000_000,
                    cursor,
                }
            );
        }
        let bad = br#"{"kind":"end","schoolId":"00000000-0000-0000-0000-000000000002","count":0,"asOf":"2025-10-26T10:00:00Z","cursor":"nope"}"#;
        assert!(
            SnapshotLine::parse(bad).is_err(),
            "a malformed cursor is refused"
        );
    }
}

/// One school's complete, validated snapshot, ready to reconcile.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SchoolSnapshot {
    pub school_id: Uuid,
    pub records: Vec<(OrderKey, Entity)>,
    pub as_of: Timestamp,
    /// The source's change-feed position at the snapshot, if it has a feed.
    pub cursor: Option<Cursor>,
}

/// Why a school's snapshot was rejected; `line` is 1-based.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {reason}")]
pub struct SnapshotError {
    pub line: u64,
    /// The school whose snapshot this line belongs to, when known.
    pub school: Option<Uuid>,
    pub reason: String,
}

/// Reads a stream of snapshot lines (one school or several concatenated),
/// handing back each school's snapshot once its `end` line validates it.
/// A school with a bad line, a record of another school, a wrong count, or
/// a record stamped more than the [`FutureSkew`] after the end line's
/// `asOf` (contract §2, "Time") is rejected whole; reading goes on with the
/// next school. Pure: the caller feeds lines from HTTP, a file or a test.
#[derive(Debug, Default)]
pub struct SnapshotReader {
    line: u64,
    records: Vec<(OrderKey, Entity)>,
    /// The newest record timestamp of the school being read, and its line.
    newest: Option<(Timestamp, u64)>,
    first_error: Option<SnapshotError>,
    max_future_skew: FutureSkew,
}

impl SnapshotReader {
    /// A reader that refuses records more than [`FutureSkew::DEFAULT`]
    /// after their end line's `asOf`.
    pub fn new() -> Self {
        Self::default()
    }

    /// A reader that refuses records more than `max_future_skew` after
    /// their end line's `asOf` (`ingest.max_future_skew`).
    pub fn with_max_future_skew(max_future_skew: FutureSkew) -> Self {
        SnapshotReader {
            max_future_skew,
            ..Self::default()
        }
    }

    /// Lines fed so far.
    pub fn lines(&self) -> u64 {
        self.line
    }

    /// Feeds one line (without its newline). Returns a school's outcome when
    /// the line closes one.
    pub fn feed(&mut self, raw: &[u8]) -> Option<Result<SchoolSnapshot, SnapshotError>> {
        self.line += 1;
        let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
        if raw.iter().all(u8::is_ascii_whitespace) {
            return None;
        }
        let line = self.line;
        match SnapshotLine::parse(raw) {
            Ok(SnapshotLine::Record { key, entity }) => {
                if self.first_error.is_none() {
                    if self.newest.is_none_or(|(t, _)| key.timestamp > t) {
                        self.newest = Some((key.timestamp, line));
                    }
                    self.records.push((key, entity));
                }
                None
            }
            Ok(SnapshotLine::End {
                school_id,
                count,
                as_of,
                cursor,
            }) => {
                let records = std::mem::take(&mut self.records);
                let newest = self.newest.take();
                if let Some(mut e) = self.first_error.take() {
                    e.school = Some(school_id);
                    return Some(Err(e));
                }
                let fail = |reason: String| {
                    Some(Err(SnapshotError {
                        line,
                        school: Some(school_id),
                        reason,
                    }))
                };
                if records.len() as u64 != count {
                    return fail(format!(
                        "end line says {count} records, {} were read",
                        records.len()
                    ));
                }
                if let Some((_, e)) = records.iter().find(|(_, e)| e.school_id() != school_id) {
                    return fail(format!(
                        "{} {} belongs to school {}, not {school_id}",
                        e.kind().as_str(),
                        e.id(),
                        e.school_id()
                    ));
                }
                if let Some((newest, at)) = newest {
                    let checked = self.max_future_skew.check(
                        "timestamp",
                        newest,
                        as_of,
                        "the end line's asOf",
                    );
                    if let Err(e) = checked {
                        return Some(Err(SnapshotError {
                            line: at,
                            school: Some(school_id),
                            reason: e.to_string(),
                        }));
                    }
                }
                Some(Ok(SchoolSnapshot {
                    school_id,
                    records,
                    as_of,
                    cursor,
                }))
            }
            Err(e) => {
                if self.first_error.is_none() {
                    self.first_error = Some(SnapshotError {
                        line,
                        school: None,
                        reason: e.to_string(),
                    });
                }
                None
            }
        }
    }

    /// At the end of input: records (or a bad line) with no `end` line
    /// after them mean the input was cut short.
    pub fn finish(self) -> Option<SnapshotError> {
        if let Some(e) = self.first_error {
            return Some(SnapshotError {
                reason: format!("{}; and the input ends without an end line", e.reason),
                ..e
            });
        }
        (!self.records.is_empty()).then(|| SnapshotError {
            line: self.line,
            school: self.records.first().map(|(_, e)| e.school_id()),
            reason: format!(
                "input ends after {} records without an end line (truncated)",
                self.records.len()
            ),
        })
    }
}

#[cfg(test)]
mod reader_tests {
    use super::*;
    use crate::domain::{Class, SyncSource};

    const AS_OF: Timestamp = 1_761_472_800_000_000_000; // 2025-10-26T10:00:00Z
    const HOUR: i64 = 3600 * 1_000_000_000;

    fn class_line(n: u128, timestamp: Timestamp) -> Vec<u8> {
        let line = record_line(&Record {
            data: Entity::Class(Class {
                class_id: Uuid::from_u128(n),
                school_id: Uuid::from_u128(2),
                class_name: "Lớp 10A1".into(),
                grade: None,
                academic_year: None,
                total_students: None,
                homeroom_teacher_id: None,
            }),
            key: OrderKey {
                version: Some(1),
                timestamp,
                delete: false,
                event_id: Uuid::from_u128(n),
            },
            last_synced_at: 0,
            source: SyncSource::Kafka,
        });
        line[..line.len() - 1].to_vec()
    }

    fn read(
        reader: &mut SnapshotReader,
        times: &[Timestamp],
    ) -> Result<SchoolSnapshot, SnapshotError> {
        for (n, t) in times.iter().enumerate() {
            assert!(reader.feed(&class_line(n as u128 + 1, *t)).is_none());
        }
        let end = end_line(Uuid::from_u128(2), times.len() as u64, AS_OF);
        reader
            .feed(end.trim_ascii_end())
            .expect("an end line closes")
    }

    /// Contract §2 "Time": a record stamped more than the skew after its
    /// end line's `asOf` fails the school whole, naming its line; the next
    /// school is read as usual.
    #[test]
    fn a_record_beyond_the_skew_after_as_of_fails_its_school_whole() {
        let mut reader = SnapshotReader::new();
        let ok = read(&mut reader, &[AS_OF - HOUR, AS_OF + HOUR]).unwrap();
        assert_eq!(ok.records.len(), 2);
        let e = read(&mut reader, &[AS_OF, AS_OF + HOUR + 1, AS_OF - 1]).unwrap_err();
        assert_eq!(e.line, 5, "{e}");
        assert_eq!(e.school, Some(Uuid::from_u128(2)));
        assert!(
            e.reason.starts_with("field `timestamp`: 2025-10-26T11:00:00.000000001Z lies more than 1h (ingest.max_future_skew) after the end line's asOf 2025-10-26T10:00:00Z"),
            "{e}"
        );
        // The year 2200.
        let e = read(&mut reader, &[7_258_118_400_000_000_000]).unwrap_err();
        assert!(e.reason.contains("2200-01-01T00:00:00Z"), "{e}");
        assert!(read(&mut reader, &[AS_OF]).is_ok());
        assert!(reader.finish().is_none());

        let mut strict = SnapshotReader::with_max_future_skew(FutureSkew::from_duration(
            std::time::Duration::from_secs(60),
        ));
        assert!(read(&mut strict, &[AS_OF + 60_000_000_000]).is_ok());
        let e = read(&mut strict, &[AS_OF + 60_000_000_001]).unwrap_err();
        assert!(e.reason.contains("more than 1m (ingest"), "{e}");
    }
}

//! The change-feed wire format (contract §6): the cursor, change lines
//! (a snapshot record line, or a delete line) and the closing page line.
//! Used by the feed route, the follower, and the snapshot end line's
//! `cursor` (§3).

use std::fmt;
use std::str::FromStr;

use serde::Serialize;
use uuid::Uuid;

use super::entity::{format_timestamp, Change, EntityKind, OrderKey, Timestamp};
use super::event::{parse_object, EventError, Fields};
use super::snapshot::parse_record;

/// A position in one store's change log. Opaque text to clients:
/// `<store id, 32 hex digits>.<sequence>`, or
/// `<store id>.<sequence>.<horizon>` while a client pages through the log
/// from its beginning.
///
/// `seq` is where the next page starts (after it). `horizon` is the
/// position up to which the client's state is known to be complete, for
/// the expiry check: the cursor stays valid while every change log entry
/// the store dropped (tombstone purge) is at or below it. It equals `seq`
/// except while a client reads the log from its beginning: then it is the
/// head of the log when that reading began, since the entities deleted
/// before it were never part of the client's state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Cursor {
    pub store: Uuid,
    pub seq: u64,
    pub horizon: u64,
}

impl Cursor {
    /// The cursor of a client whose state is complete at `seq`.
    pub fn at(store: Uuid, seq: u64) -> Cursor {
        Cursor {
            store,
            seq,
            horizon: seq,
        }
    }
}

impl fmt::Display for Cursor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.store.simple(), self.seq)?;
        if self.horizon > self.seq {
            write!(f, ".{}", self.horizon)?;
        }
        Ok(())
    }
}

impl Serialize for Cursor {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// Why a text is not a cursor (a malformed `after` parameter: 400).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("not a cursor: {0}")]
pub struct CursorError(&'static str);

/// A sequence number as written: decimal digits, no sign, no leading zero.
fn parse_seq(s: &str) -> Result<u64, CursorError> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(CursorError("a position is not a decimal number"));
    }
    if s.len() > 1 && s.starts_with('0') {
        return Err(CursorError("a position has a leading zero"));
    }
    s.parse()
        .map_err(|_| CursorError("a position is too large"))
}

impl FromStr for Cursor {
    type Err = CursorError;

    /// Accepts exactly what [`Cursor`]'s `Display` writes, nothing else.
    fn from_str(s: &str) -> Result<Cursor, CursorError> {
        if s.len() > 80 {
            return Err(CursorError("too long"));
        }
        let mut parts = s.split('.');
        let store = parts.next().unwrap_or_default();
        if store.len() != 32
            || !store
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err(CursorError(
                "it does not start with a store id (32 lower-case hex digits)",
            ));
        }
        let store = Uuid::try_parse(store).map_err(|_| CursorError("bad store id"))?;
        let seq = parse_seq(parts.next().ok_or(CursorError("no position"))?)?;
        let horizon = match parts.next() {
            None => seq,
            Some(h) => {
                let h = parse_seq(h)?;
                if h <= seq {
                    return Err(CursorError("the horizon is not after the position"));
                }
                h
            }
        };
        if parts.next().is_some() {
            return Err(CursorError("too many parts"));
        }
        Ok(Cursor {
            store,
            seq,
            horizon,
        })
    }
}

/// One parsed line of a change-feed page.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FeedLine {
    /// A record line (an upsert) or a delete line, with the entity's order
    /// key. A delete line marked `"transferred":true` stands for an upsert
    /// that moved the entity to `schoolId`, a school the parent does not
    /// serve: its key is that upsert's (not a delete's), and the follower
    /// applies it by the transfer rule like the upsert itself.
    Change { key: OrderKey, change: Change },
    /// The last line of a page.
    Page {
        cursor: Cursor,
        count: u64,
        more: bool,
        as_of: Timestamp,
    },
}

impl FeedLine {
    pub fn parse(raw: &[u8]) -> Result<FeedLine, EventError> {
        let map = parse_object(raw)?;
        let f = Fields(&map);
        let kind = f.string("kind", 1, 20)?;
        if kind == "page" {
            let cursor = f.string("cursor", 1, 100)?;
            return Ok(FeedLine::Page {
                cursor: cursor
                    .parse()
                    .map_err(|e: CursorError| EventError::Invalid {
                        field: "cursor",
                        reason: e.to_string(),
                    })?,
                count: f.u64("count")?,
                more: f.bool("more")?,
                as_of: f.timestamp("asOf")?,
            });
        }
        let kind = EntityKind::ALL
            .into_iter()
            .find(|k| k.as_str() == kind)
            .ok_or_else(|| EventError::Invalid {
                field: "kind",
                reason: format!(
                    "{kind:?} is not one of \"class\", \"teacher\", \"assignment\", \"page\""
                ),
            })?;
        let school_id = f.uuid("schoolId")?;
        if !f.opt_bool("deleted")?.unwrap_or(false) {
            let (key, entity) = parse_record(&f, kind, school_id)?;
            return Ok(FeedLine::Change {
                key,
                change: Change::Upsert(entity),
            });
        }
        let transferred = f.opt_bool("transferred")?.unwrap_or(false);
        Ok(FeedLine::Change {
            key: OrderKey {
                version: f.opt_u64("version")?,
                timestamp: f.timestamp("timestamp")?,
                delete: !transferred,
                event_id: f.opt_uuid("eventId")?.unwrap_or(Uuid::nil()),
            },
            change: Change::Delete {
                kind,
                id: f.uuid(kind.id_field())?,
                school_id,
            },
        })
    }
}

/// A delete line (contract §6), newline included: the entity is gone from
/// the serving node, with the key of the change that removed it (see
/// [`FeedLine::Change`] for `transferred`).
pub fn delete_line(kind: EntityKind, id: Uuid, school_id: Uuid, key: &OrderKey) -> Vec<u8> {
    let mut map = serde_json::Map::new();
    map.insert("kind".into(), kind.as_str().into());
    map.insert("deleted".into(), true.into());
    map.insert(kind.id_field().into(), id.to_string().into());
    map.insert("schoolId".into(), school_id.to_string().into());
    map.insert("version".into(), key.version.into());
    map.insert("timestamp".into(), format_timestamp(key.timestamp).into());
    if !key.event_id.is_nil() {
        map.insert("eventId".into(), key.event_id.to_string().into());
    }
    if !key.delete {
        map.insert("transferred".into(), true.into());
    }
    let mut out = serde_json::to_vec(&map).expect("a JSON map always serializes");
    out.push(b'\n');
    out
}

/// The closing line of a page, newline included.
pub fn page_line(cursor: &Cursor, count: u64, more: bool, as_of: Timestamp) -> Vec<u8> {
    let mut out = serde_json::to_vec(&serde_json::json!({
        "kind": "page",
        "cursor": cursor.to_string(),
        "count": count,
        "more": more,
        "asOf": format_timestamp(as_of),
    }))
    .expect("page line always serializes");
    out.push(b'\n');
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::snapshot::record_line;
    use crate::domain::{Entity, Record, SyncSource, Teacher, TeacherStatus};

    const STORE: Uuid = Uuid::from_u128(0x0123_4567_89ab_cdef_0123_4567_89ab_cdef);

    #[test]
    fn a_cursor_round_trips_through_its_text() {
        for c in [
            Cursor::at(STORE, 0),
            Cursor::at(STORE, u64::MAX),
            Cursor {
                store: STORE,
                seq: 5,
                horizon: 9,
            },
        ] {
            let text = c.to_string();
            assert_eq!(text.parse::<Cursor>(), Ok(c), "{text}");
        }
        assert_eq!(
            Cursor::at(STORE, 42).to_string(),
            "0123456789abcdef0123456789abcdef.42"
        );
    }

    #[test]
    fn only_the_canonical_text_is_a_cursor() {
        let hex = "0123456789abcdef0123456789abcdef";
        for bad in [
            String::new(),
            hex.to_owned(),
            format!("{hex}."),
            format!("{hex}.-1"),
            format!("{hex}.+1"),
            format!("{hex}.01"),
            format!("{hex}.1.1"),
            format!("{hex}.2.1"),
            format!("{hex}.1.2.3"),
            format!("{hex}.18446744073709551616"),
            format!("{}.1", hex.to_uppercase()),
            "0123456789abcdef-0123456789abcdef.1".to_owned(),
            "01234567-89ab-cdef-0123-456789abcdef.1".to_owned(),
            format!("{hex}.1 "),
            format!("{hex}.1\n"),
            format!("{hex}.١"),
        ] {
            assert!(bad.parse::<Cursor>().is_err(), "{bad:?} was accepted");
        }
    }

    fn key(delete: bool) -> OrderKey {
        OrderKey {
            version: Some(3),
            timestamp: 1_761_472_800_123_000_000,
            delete,
            event_id: Uuid::from_u128(9),
        }
    }

    #[test]
    fn change_lines_parse_back_to_their_change_and_key() {
        let teacher = Entity::Teacher(Teacher {
            teacher_id: Uuid::from_u128(1),
            school_id: Uuid::from_u128(2),
            full_name: "Nguyễn Thị Hương".into(),
            employee_code: None,
            email: None,
            phone: None,
            subjects: vec!["Toán".into()],
            status: TeacherStatus::Active,
        });
        let record = Record {
            data: teacher.clone(),
            key: key(false),
            last_synced_at: 0,
            source: SyncSource::Kafka,
        };
        let line = record_line(&record);
        assert_eq!(
            FeedLine::parse(line.trim_ascii_end()).unwrap(),
            FeedLine::Change {
                key: key(false),
                change: Change::Upsert(teacher)
            }
        );
        for delete in [true, false] {
            let line = delete_line(
                EntityKind::Teacher,
                Uuid::from_u128(1),
                Uuid::from_u128(3),
                &key(delete),
            );
            assert_eq!(
                FeedLine::parse(line.trim_ascii_end()).unwrap(),
                FeedLine::Change {
                    key: key(delete),
                    change: Change::Delete {
                        kind: EntityKind::Teacher,
                        id: Uuid::from_u128(1),
                        school_id: Uuid::from_u128(3)
                    }
                },
                "{}",
                String::from_utf8_lossy(&line)
            );
        }
    }

    #[test]
    fn the_page_line_round_trips_and_a_bad_cursor_in_it_is_refused() {
        let cursor = Cursor {
            store: STORE,
            seq: 7,
            horizon: 12,
        };
        let line = page_line(&cursor, 3, true, 1_761_472_800_000_000_000);
        assert_eq!(
            FeedLine::parse(line.trim_ascii_end()).unwrap(),
            FeedLine::Page {
                cursor,
                count: 3,
                more: true,
                as_of: 1_761_472_800_000_000_000
            }
        );
        let bad = br#"{"kind":"page","cursor":"x.1","count":0,"more":false,"asOf":"2025-10-26T10:00:00Z"}"#;
        assert!(matches!(
            FeedLine::parse(bad),
            Err(EventError::Invalid {
                field: "cursor",
                ..
            })
        ));
    }
}

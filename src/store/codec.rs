//! The compact encodings of format 4: entity records and teacher
//! documents. Part of the layout `schema.rs` describes; kept apart because
//! it is the one place that writes bytes by hand.
//!
//! A record (value format [`RECORD_FORMAT`]) leaves out what its key
//! already says (the entity's id) and writes ids as 16 raw bytes, times as
//! 8, an order key's nil `eventId` (every snapshot record's) as one flag
//! bit, and strings and counts with a LEB128 length: an assignment takes
//! ~100 bytes instead of ~150 with bincode through serde. Records of
//! format 3 (value format 1, bincode) still decode, so a store upgraded in
//! place needs no rewrite of its records.
//!
//! A teacher document (value format [`DOC_FORMAT`]) is its JSON compressed
//! with zstd and a dictionary trained on documents of the generator's
//! demo data set (seed 2; see `docs/PERFORMANCE.md` for how to train it
//! again): field names, the shape of dates, ids and Vietnamese names are in
//! the dictionary, so a 3.7 KB document takes ~0.65 KB. A stored document
//! of format 3 (plain JSON) is still served as it is.

use std::cell::RefCell;
use std::sync::LazyLock;

use uuid::Uuid;

use super::{Result, StoreError};
use crate::domain::{
    Assignment, Class, Entity, OrderKey, Record, Role, SyncSource, Teacher, TeacherStatus,
    Timestamp,
};

/// First byte of a record value in this encoding (bincode ones start
/// with 1).
pub(super) const RECORD_FORMAT: u8 = 2;
/// First byte of an entity's change-log entries in this encoding.
pub(super) const ENTRIES_FORMAT: u8 = 4;
/// First byte of a stored document: zstd with [`DICTIONARY`].
pub(super) const DOC_FORMAT: u8 = 3;
/// The zstd level documents are compressed at: with the dictionary,
/// higher levels gain nothing on documents this small (measured: level 1
/// 639 bytes, level 3 645, level 6 668 on average), and 1 is the fastest.
const DOC_LEVEL: i32 = 1;

/// The dictionary documents are compressed with. Changing it is a format
/// change: documents compressed with the old one must be rewritten.
static DICTIONARY: &[u8] = include_bytes!("documents.dict");

static ENCODER_DICT: LazyLock<zstd::dict::EncoderDictionary<'static>> =
    LazyLock::new(|| zstd::dict::EncoderDictionary::copy(DICTIONARY, DOC_LEVEL));
static DECODER_DICT: LazyLock<zstd::dict::DecoderDictionary<'static>> =
    LazyLock::new(|| zstd::dict::DecoderDictionary::copy(DICTIONARY));

thread_local! {
    // Contexts are reused: making one per document costs more than
    // decompressing it.
    static COMPRESSOR: RefCell<Option<zstd::bulk::Compressor<'static>>> = const { RefCell::new(None) };
    static DECOMPRESSOR: RefCell<Option<zstd::bulk::Decompressor<'static>>> = const { RefCell::new(None) };
}

fn corrupt(what: impl Into<String>) -> StoreError {
    StoreError::Corrupt(what.into())
}

/// A rendered teacher document as stored.
pub(super) fn encode_doc(json: &[u8]) -> Vec<u8> {
    COMPRESSOR.with(|c| {
        let mut c = c.borrow_mut();
        let c = c.get_or_insert_with(|| {
            let mut c = zstd::bulk::Compressor::with_prepared_dictionary(&ENCODER_DICT)
                .expect("a zstd context");
            // The dictionary is fixed by the format: its id, and a checksum
            // redb's page checksums already give, are 8 bytes of nothing.
            let _ = c.include_dictid(false);
            let _ = c.include_checksum(false);
            let _ = c.include_contentsize(true);
            c
        });
        let frame = c
            .compress(json)
            .expect("compressing a document in memory cannot fail");
        let mut out = Vec::with_capacity(1 + frame.len());
        out.push(DOC_FORMAT);
        out.extend_from_slice(&frame);
        out
    })
}

/// The JSON of a stored document.
pub(super) fn decode_doc(stored: &[u8]) -> Result<Vec<u8>> {
    match stored.split_first() {
        Some((&DOC_FORMAT, frame)) => {
            let size = zstd::zstd_safe::get_frame_content_size(frame)
                .ok()
                .flatten()
                .ok_or_else(|| corrupt("stored document without its size"))?;
            DECOMPRESSOR.with(|d| {
                let mut d = d.borrow_mut();
                let d = d.get_or_insert_with(|| {
                    zstd::bulk::Decompressor::with_prepared_dictionary(&DECODER_DICT)
                        .expect("a zstd context")
                });
                d.decompress(frame, size as usize)
                    .map_err(|e| corrupt(format!("stored document: {e}")))
            })
        }
        // Format 3 kept documents as plain JSON.
        Some((b'{', _)) => Ok(stored.to_vec()),
        Some((other, _)) => Err(corrupt(format!("unknown document format {other}"))),
        None => Err(corrupt("empty stored document")),
    }
}

// ---- change-log entries ---------------------------------------------------

/// An entity's entries in the change log, (school, position) each: 16 raw
/// bytes and a LEB128 position (bincode took 17 and up to 9).
pub(super) fn encode_entries(entries: &[(u128, u64)]) -> Vec<u8> {
    let mut out = Vec::with_capacity(2 + entries.len() * 20);
    out.push(ENTRIES_FORMAT);
    put_varint(&mut out, entries.len() as u64);
    for &(school, seq) in entries {
        out.extend_from_slice(&school.to_be_bytes());
        put_varint(&mut out, seq);
    }
    out
}

/// Reads what [`encode_entries`] wrote, or format 3's bincode.
pub(super) fn decode_entries(bytes: &[u8]) -> Result<Vec<(u128, u64)>> {
    match bytes.split_first() {
        Some((&ENTRIES_FORMAT, rest)) => {
            let mut r = Bytes(rest);
            let n = r.varint()?;
            let mut out = Vec::with_capacity(n.min(64) as usize);
            for _ in 0..n {
                let school = u128::from_be_bytes(r.take(16)?.try_into().expect("16 bytes"));
                out.push((school, r.varint()?));
            }
            if !r.0.is_empty() {
                return Err(corrupt("trailing bytes after change-log entries"));
            }
            Ok(out)
        }
        _ => super::schema::decode(bytes),
    }
}

// ---- records ------------------------------------------------------------

const KIND_CLASS: u8 = 1;
const KIND_TEACHER: u8 = 2;
const KIND_ASSIGNMENT: u8 = 3;

const KEY_VERSION: u8 = 1;
const KEY_DELETE: u8 = 2;
const KEY_EVENT_ID: u8 = 4;

fn put_varint(out: &mut Vec<u8>, mut n: u64) {
    while n >= 0x80 {
        out.push((n as u8) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

fn put_uuid(out: &mut Vec<u8>, id: Uuid) {
    out.extend_from_slice(id.as_bytes());
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    put_varint(out, s.len() as u64);
    out.extend_from_slice(s.as_bytes());
}

/// An optional string: its length + 1, 0 for none.
fn put_opt_str(out: &mut Vec<u8>, s: Option<&str>) {
    match s {
        None => out.push(0),
        Some(s) => {
            put_varint(out, s.len() as u64 + 1);
            out.extend_from_slice(s.as_bytes());
        }
    }
}

fn put_key(out: &mut Vec<u8>, key: &OrderKey) {
    let mut flags = 0;
    if key.version.is_some() {
        flags |= KEY_VERSION;
    }
    if key.delete {
        flags |= KEY_DELETE;
    }
    if !key.event_id.is_nil() {
        flags |= KEY_EVENT_ID;
    }
    out.push(flags);
    if let Some(v) = key.version {
        put_varint(out, v);
    }
    out.extend_from_slice(&key.timestamp.to_le_bytes());
    if !key.event_id.is_nil() {
        put_uuid(out, key.event_id);
    }
}

fn source_code(source: SyncSource) -> u8 {
    match source {
        SyncSource::Kafka => 1,
        SyncSource::Resync => 2,
        SyncSource::Import => 3,
        SyncSource::Upstream => 4,
    }
}

/// A live record as stored in its entity table (the id is the key). The
/// entity may be borrowed: writers encode what they were handed, with no
/// copy of its strings.
pub(super) fn encode_record<E: std::borrow::Borrow<Entity>>(record: &Record<E>) -> Vec<u8> {
    let data: &Entity = record.data.borrow();
    let mut out = Vec::with_capacity(128);
    out.push(RECORD_FORMAT);
    out.push(match data {
        Entity::Class(_) => KIND_CLASS,
        Entity::Teacher(_) => KIND_TEACHER,
        Entity::Assignment(_) => KIND_ASSIGNMENT,
    });
    put_key(&mut out, &record.key);
    out.extend_from_slice(&record.last_synced_at.to_le_bytes());
    out.push(source_code(record.source));
    match data {
        Entity::Class(c) => {
            put_uuid(&mut out, c.school_id);
            put_str(&mut out, &c.class_name);
            put_opt_str(&mut out, c.grade.as_deref());
            put_opt_str(&mut out, c.academic_year.as_deref());
            put_varint(&mut out, c.total_students.map_or(0, |n| u64::from(n) + 1));
            match c.homeroom_teacher_id {
                None => out.push(0),
                Some(t) => {
                    out.push(1);
                    put_uuid(&mut out, t);
                }
            }
        }
        Entity::Teacher(t) => {
            put_uuid(&mut out, t.school_id);
            put_str(&mut out, &t.full_name);
            put_opt_str(&mut out, t.employee_code.as_deref());
            put_opt_str(&mut out, t.email.as_deref());
            put_opt_str(&mut out, t.phone.as_deref());
            put_varint(&mut out, t.subjects.len() as u64);
            for s in &t.subjects {
                put_str(&mut out, s);
            }
            out.push(match t.status {
                TeacherStatus::Active => 1,
                TeacherStatus::Inactive => 2,
            });
        }
        Entity::Assignment(a) => {
            put_uuid(&mut out, a.teacher_id);
            put_uuid(&mut out, a.class_id);
            put_uuid(&mut out, a.school_id);
            put_opt_str(&mut out, a.subject.as_deref());
            out.push(match a.role {
                Role::Homeroom => 1,
                Role::Subject => 2,
            });
            put_opt_str(&mut out, a.academic_year.as_deref());
        }
    }
    out
}

/// Reads what [`encode_record`] wrote.
struct Bytes<'a>(&'a [u8]);

impl<'a> Bytes<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if self.0.len() < n {
            return Err(corrupt("record cut short"));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn byte(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }

    fn varint(&mut self) -> Result<u64> {
        let mut n = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.byte()?;
            n |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(n);
            }
        }
        Err(corrupt("record varint too long"))
    }

    fn uuid(&mut self) -> Result<Uuid> {
        Ok(Uuid::from_bytes(
            self.take(16)?.try_into().expect("16 bytes"),
        ))
    }

    fn i64(&mut self) -> Result<i64> {
        Ok(i64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }

    fn string(&mut self, len: u64) -> Result<String> {
        let bytes = self.take(usize::try_from(len).map_err(|_| corrupt("record string"))?)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| corrupt("record string is not UTF-8"))
    }

    fn str(&mut self) -> Result<String> {
        let len = self.varint()?;
        self.string(len)
    }

    fn opt_str(&mut self) -> Result<Option<String>> {
        match self.varint()? {
            0 => Ok(None),
            n => self.string(n - 1).map(Some),
        }
    }

    fn key(&mut self) -> Result<OrderKey> {
        let flags = self.byte()?;
        let version = if flags & KEY_VERSION != 0 {
            Some(self.varint()?)
        } else {
            None
        };
        let timestamp = self.i64()?;
        let event_id = if flags & KEY_EVENT_ID != 0 {
            self.uuid()?
        } else {
            Uuid::nil()
        };
        Ok(OrderKey {
            version,
            timestamp,
            delete: flags & KEY_DELETE != 0,
            event_id,
        })
    }

    /// What every record starts with (after the format byte): its kind,
    /// order key, `lastSyncedAt` and source.
    fn head(&mut self) -> Result<(u8, OrderKey, Timestamp, SyncSource)> {
        let kind = self.byte()?;
        let key = self.key()?;
        let last_synced_at: Timestamp = self.i64()?;
        let source = match self.byte()? {
            1 => SyncSource::Kafka,
            2 => SyncSource::Resync,
            3 => SyncSource::Import,
            4 => SyncSource::Upstream,
            other => return Err(corrupt(format!("unknown sync source {other}"))),
        };
        Ok((kind, key, last_synced_at, source))
    }
}

/// The school and `lastSyncedAt` of a stored record, read from its head
/// without decoding the rest (no allocation): what the freshness walk
/// needs of every record.
pub(super) fn record_school_synced(id: u128, bytes: &[u8]) -> Result<(Uuid, Timestamp)> {
    if bytes.first() != Some(&RECORD_FORMAT) {
        let r = decode_record(id, bytes)?;
        return Ok((r.data.school_id(), r.last_synced_at));
    }
    let mut r = Bytes(&bytes[1..]);
    let (kind, _, last_synced_at, _) = r.head()?;
    match kind {
        KIND_CLASS | KIND_TEACHER => {}
        // The teacher and the class come first.
        KIND_ASSIGNMENT => {
            r.take(32)?;
        }
        other => return Err(corrupt(format!("unknown record kind {other}"))),
    }
    Ok((r.uuid()?, last_synced_at))
}

/// A stored record of entity `id`, in this encoding or format 3's.
pub(super) fn decode_record(id: u128, bytes: &[u8]) -> Result<Record<Entity>> {
    match bytes.first() {
        Some(&RECORD_FORMAT) => decode_compact(Uuid::from_u128(id), &bytes[1..]),
        _ => super::schema::decode(bytes),
    }
}

fn decode_compact(id: Uuid, bytes: &[u8]) -> Result<Record<Entity>> {
    let mut r = Bytes(bytes);
    let (kind, key, last_synced_at, source) = r.head()?;
    let data = match kind {
        KIND_CLASS => Entity::Class(Class {
            class_id: id,
            school_id: r.uuid()?,
            class_name: r.str()?,
            grade: r.opt_str()?,
            academic_year: r.opt_str()?,
            total_students: match r.varint()? {
                0 => None,
                n => Some(u32::try_from(n - 1).map_err(|_| corrupt("totalStudents"))?),
            },
            homeroom_teacher_id: match r.byte()? {
                0 => None,
                _ => Some(r.uuid()?),
            },
        }),
        KIND_TEACHER => Entity::Teacher(Teacher {
            teacher_id: id,
            school_id: r.uuid()?,
            full_name: r.str()?,
            employee_code: r.opt_str()?,
            email: r.opt_str()?,
            phone: r.opt_str()?,
            subjects: {
                let n = r.varint()?;
                let mut subjects = Vec::with_capacity(n.min(64) as usize);
                for _ in 0..n {
                    subjects.push(r.str()?);
                }
                subjects
            },
            status: match r.byte()? {
                1 => TeacherStatus::Active,
                2 => TeacherStatus::Inactive,
                other => return Err(corrupt(format!("unknown teacher status {other}"))),
            },
        }),
        KIND_ASSIGNMENT => Entity::Assignment(Assignment {
            assignment_id: id,
            teacher_id: r.uuid()?,
            class_id: r.uuid()?,
            school_id: r.uuid()?,
            subject: r.opt_str()?,
            role: match r.byte()? {
                1 => Role::Homeroom,
                2 => Role::Subject,
                other => return Err(corrupt(format!("unknown role {other}"))),
            },
            academic_year: r.opt_str()?,
        }),
        other => return Err(corrupt(format!("unknown record kind {other}"))),
    };
    if !r.0.is_empty() {
        return Err(corrupt("trailing bytes after a record"));
    }
    Ok(Record {
        data,
        key,
        last_synced_at,
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(version: Option<u64>, event: u128, delete: bool) -> OrderKey {
        OrderKey {
            version,
            timestamp: -5,
            delete,
            event_id: Uuid::from_u128(event),
        }
    }

    fn roundtrip(record: Record<Entity>) {
        let id = record.data.id().as_u128();
        let bytes = encode_record(&record);
        assert_eq!(decode_record(id, &bytes).unwrap(), record);
        // Format 3's encoding still reads.
        assert_eq!(
            decode_record(id, &super::super::schema::encode(&record)).unwrap(),
            record
        );
    }

    #[test]
    fn records_roundtrip_in_both_encodings() {
        let u = Uuid::from_u128;
        roundtrip(Record {
            data: Entity::Class(Class {
                class_id: u(1),
                school_id: u(2),
                class_name: "Lớp 10A1".into(),
                grade: Some("Khối 10".into()),
                academic_year: None,
                total_students: Some(0),
                homeroom_teacher_id: Some(u(3)),
            }),
            key: key(Some(300), 0, false),
            last_synced_at: i64::MAX,
            source: SyncSource::Upstream,
        });
        roundtrip(Record {
            data: Entity::Teacher(Teacher {
                teacher_id: u(4),
                school_id: u(2),
                full_name: String::new(),
                employee_code: Some(String::new()),
                email: None,
                phone: Some("0912".into()),
                subjects: vec!["Toán".into(), "Vật lý".into()],
                status: TeacherStatus::Inactive,
            }),
            key: key(None, u128::MAX, true),
            last_synced_at: 0,
            source: SyncSource::Kafka,
        });
        roundtrip(Record {
            data: Entity::Assignment(Assignment {
                assignment_id: u(5),
                teacher_id: u(4),
                class_id: u(1),
                school_id: u(2),
                subject: None,
                role: Role::Homeroom,
                academic_year: Some("2024-2025".into()),
            }),
            key: key(Some(u64::MAX), 7, false),
            last_synced_at: -1,
            source: SyncSource::Import,
        });
    }

    #[test]
    fn a_damaged_record_is_an_error_not_a_panic() {
        let record = Record {
            data: Entity::Assignment(Assignment {
                assignment_id: Uuid::from_u128(5),
                teacher_id: Uuid::from_u128(4),
                class_id: Uuid::from_u128(1),
                school_id: Uuid::from_u128(2),
                subject: Some("Toán".into()),
                role: Role::Subject,
                academic_year: None,
            }),
            key: key(None, 9, false),
            last_synced_at: 1,
            source: SyncSource::Resync,
        };
        let bytes = encode_record(&record);
        for cut in 1..bytes.len() {
            assert!(decode_record(5, &bytes[..cut]).is_err(), "cut at {cut}");
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(decode_record(5, &longer).is_err());
    }

    #[test]
    fn change_log_entries_roundtrip_in_both_encodings() {
        let entries = vec![(u128::MAX, 0), (7, u64::MAX), (0, 300)];
        assert_eq!(decode_entries(&encode_entries(&entries)).unwrap(), entries);
        assert_eq!(
            decode_entries(&super::super::schema::encode(&entries)).unwrap(),
            entries
        );
        assert_eq!(decode_entries(&encode_entries(&[])).unwrap(), vec![]);
        let bytes = encode_entries(&entries);
        assert!(decode_entries(&bytes[..bytes.len() - 1]).is_err());
    }

    #[test]
    fn documents_roundtrip_and_shrink() {
        let json = r#"{"teacherId":"c32b3548-82bd-4cf8-bb55-e3eec4c63b32","schoolId":"a8ea21c5-933e-43b4-8e3c-4070b44a5270","fullName":"Phạm Ngọc Dung","classAssignments":[]}"#.as_bytes();
        let stored = encode_doc(json);
        assert_eq!(stored[0], DOC_FORMAT);
        assert!(stored.len() < json.len());
        assert_eq!(decode_doc(&stored).unwrap(), json);
        // Format 3 stored plain JSON.
        assert_eq!(decode_doc(json).unwrap(), json);
        assert!(decode_doc(&stored[..stored.len() - 3]).is_err());
    }
}

//! Kafka event payloads (contract §2): parsing and validation.
//!
//! [`Event::parse`] turns the raw bytes of one record into a typed change or
//! an [`EventError`] naming the field and the reason — the text an operator
//! reads in the dead-letter list. Unknown extra fields are ignored.

use serde_json::{Map, Value};
use uuid::Uuid;

use super::entity::{
    Assignment, Change, Class, Entity, EntityKind, OrderKey, Role, Teacher, TeacherStatus,
    Timestamp,
};

/// Payloads above this size are dead-lettered without being parsed.
pub const MAX_EVENT_BYTES: usize = 1024 * 1024;
/// At most this many `subjects` per teacher.
pub const MAX_SUBJECTS: usize = 64;

/// The nine event types; each has its own topic (contract §2).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum EventType {
    ClassCreated,
    ClassUpdated,
    ClassDeleted,
    TeacherCreated,
    TeacherUpdated,
    TeacherDeleted,
    AssignmentCreated,
    AssignmentUpdated,
    AssignmentDeleted,
}

impl EventType {
    pub const ALL: [EventType; 9] = [
        EventType::ClassCreated,
        EventType::ClassUpdated,
        EventType::ClassDeleted,
        EventType::TeacherCreated,
        EventType::TeacherUpdated,
        EventType::TeacherDeleted,
        EventType::AssignmentCreated,
        EventType::AssignmentUpdated,
        EventType::AssignmentDeleted,
    ];

    /// The `eventType` value, which is also the topic's default name.
    pub fn name(self) -> &'static str {
        match self {
            EventType::ClassCreated => "emis.class.created",
            EventType::ClassUpdated => "emis.class.updated",
            EventType::ClassDeleted => "emis.class.deleted",
            EventType::TeacherCreated => "emis.teacher.created",
            EventType::TeacherUpdated => "emis.teacher.updated",
            EventType::TeacherDeleted => "emis.teacher.deleted",
            EventType::AssignmentCreated => "emis.assignment.created",
            EventType::AssignmentUpdated => "emis.assignment.updated",
            EventType::AssignmentDeleted => "emis.assignment.deleted",
        }
    }

    pub fn from_name(name: &str) -> Option<EventType> {
        Self::ALL.into_iter().find(|t| t.name() == name)
    }

    pub fn kind(self) -> EntityKind {
        use EventType::*;
        match self {
            ClassCreated | ClassUpdated | ClassDeleted => EntityKind::Class,
            TeacherCreated | TeacherUpdated | TeacherDeleted => EntityKind::Teacher,
            AssignmentCreated | AssignmentUpdated | AssignmentDeleted => EntityKind::Assignment,
        }
    }

    pub fn is_delete(self) -> bool {
        use EventType::*;
        matches!(self, ClassDeleted | TeacherDeleted | AssignmentDeleted)
    }
}

/// Why an event (or a snapshot line) was rejected.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum EventError {
    #[error("payload of {0} bytes exceeds the limit of {MAX_EVENT_BYTES} bytes")]
    TooLarge(usize),
    #[error("empty value (expected a JSON object)")]
    Empty,
    #[error("not valid JSON: {0}")]
    NotJson(String),
    #[error("field `{0}` appears more than once")]
    DuplicateField(String),
    #[error("not a JSON object")]
    NotObject,
    #[error("missing required field `{0}`")]
    Missing(&'static str),
    #[error("field `{field}`: {reason}")]
    Invalid { field: &'static str, reason: String },
    #[error("unknown eventType `{0}`")]
    UnknownEventType(String),
    #[error("eventType `{found}` does not match topic's event type `{expected}`")]
    TypeMismatch {
        found: String,
        expected: &'static str,
    },
}

/// A valid event: the change it asks for and its position in the entity's
/// history.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    pub event_type: EventType,
    pub key: OrderKey,
    pub change: Change,
}

impl Event {
    /// Parse and validate one record value read from the topic of `expected`.
    pub fn parse(expected: EventType, raw: &[u8]) -> Result<Event, EventError> {
        let map = parse_object(raw)?;
        let f = Fields(&map);
        let type_name = f.string("eventType", 1, 100)?;
        let event_type = EventType::from_name(&type_name)
            .ok_or_else(|| EventError::UnknownEventType(type_name.clone()))?;
        if event_type != expected {
            return Err(EventError::TypeMismatch {
                found: type_name,
                expected: expected.name(),
            });
        }
        let event_id = f.uuid("eventId")?;
        let timestamp = f.timestamp("timestamp")?;
        let version = f.opt_u64("version")?;
        let school_id = f.uuid("schoolId")?;
        let kind = event_type.kind();
        let change = if event_type.is_delete() {
            Change::Delete {
                kind,
                id: f.uuid(kind.id_field())?,
                school_id,
            }
        } else {
            Change::Upsert(f.entity(kind, school_id)?)
        };
        Ok(Event {
            event_type,
            key: OrderKey {
                version,
                timestamp,
                delete: event_type.is_delete(),
                event_id,
            },
            change,
        })
    }
}

impl Event {
    /// The payload the central services would publish for this event: the
    /// inverse of [`Event::parse`], optional fields that are absent left out.
    /// The generator and the demo publish through it.
    pub fn to_json(&self) -> Vec<u8> {
        let mut map = match &self.change {
            Change::Upsert(entity) => {
                let value = match entity {
                    Entity::Class(c) => serde_json::to_value(c),
                    Entity::Teacher(t) => serde_json::to_value(t),
                    Entity::Assignment(a) => serde_json::to_value(a),
                };
                match value.expect("entities always serialize") {
                    Value::Object(mut m) => {
                        m.retain(|_, v| !v.is_null());
                        m
                    }
                    _ => unreachable!("entities serialize as objects"),
                }
            }
            Change::Delete {
                kind,
                id,
                school_id,
            } => {
                let mut m = Map::new();
                m.insert(kind.id_field().into(), Value::String(id.to_string()));
                m.insert("schoolId".into(), Value::String(school_id.to_string()));
                m
            }
        };
        map.insert(
            "eventId".into(),
            Value::String(self.key.event_id.to_string()),
        );
        map.insert(
            "eventType".into(),
            Value::String(self.event_type.name().into()),
        );
        map.insert(
            "timestamp".into(),
            Value::String(super::entity::format_timestamp(self.key.timestamp)),
        );
        if let Some(v) = self.key.version {
            map.insert("version".into(), Value::from(v));
        }
        serde_json::to_vec(&map).expect("a JSON map always serializes")
    }
}

pub(crate) fn parse_object(raw: &[u8]) -> Result<Map<String, Value>, EventError> {
    if raw.len() > MAX_EVENT_BYTES {
        return Err(EventError::TooLarge(raw.len()));
    }
    if raw.is_empty() {
        return Err(EventError::Empty);
    }
    // serde_json refuses nesting deeper than 128 (a syntax error), so a
    // deeply nested value costs neither stack nor much memory.
    match serde_json::from_slice::<TopLevel>(raw) {
        Ok(TopLevel::Object(map)) => Ok(map),
        Ok(TopLevel::Duplicate(field)) => Err(EventError::DuplicateField(clip(&field))),
        // A data error can only be the top-level visitor's "not an object".
        Err(e) if e.is_data() => Err(EventError::NotObject),
        Err(e) => Err(EventError::NotJson(e.to_string())),
    }
}

/// The top-level JSON object of an event or snapshot line. A field that
/// appears twice is refused: serde_json would silently keep the last one,
/// and another reader of the same record may keep the first, so the
/// record does not say one thing. (Nested objects are not checked: the
/// fields the node reads are all at the top level.)
enum TopLevel {
    Object(Map<String, Value>),
    Duplicate(String),
}

impl<'de> serde::Deserialize<'de> for TopLevel {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_map(TopLevelVisitor)
    }
}

struct TopLevelVisitor;

impl<'de> serde::de::Visitor<'de> for TopLevelVisitor {
    type Value = TopLevel;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut access: A) -> Result<TopLevel, A::Error> {
        use serde::de::IgnoredAny;
        let mut map = Map::new();
        while let Some(key) = access.next_key::<String>()? {
            if map.contains_key(&key) {
                // Read the rest, so that bad syntax further on still wins.
                access.next_value::<IgnoredAny>()?;
                while access.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                return Ok(TopLevel::Duplicate(key));
            }
            let value = access.next_value::<Value>()?;
            map.insert(key, value);
        }
        Ok(TopLevel::Object(map))
    }
}

/// Typed access to the fields of one JSON object, with contract limits.
/// `null` counts as absent for optional fields.
pub(crate) struct Fields<'a>(pub(crate) &'a Map<String, Value>);

fn invalid(field: &'static str, reason: impl Into<String>) -> EventError {
    EventError::Invalid {
        field,
        reason: reason.into(),
    }
}

impl Fields<'_> {
    fn get(&self, field: &'static str) -> Option<&Value> {
        self.0.get(field).filter(|v| !v.is_null())
    }

    fn required(&self, field: &'static str) -> Result<&Value, EventError> {
        self.get(field).ok_or(EventError::Missing(field))
    }

    fn str_of<'v>(field: &'static str, v: &'v Value) -> Result<&'v str, EventError> {
        v.as_str()
            .ok_or_else(|| invalid(field, format!("expected a string, got {}", type_name(v))))
    }

    fn checked(field: &'static str, s: &str, min: usize, max: usize) -> Result<String, EventError> {
        let n = s.chars().count();
        if n < min {
            return Err(invalid(field, "must not be empty"));
        }
        if n > max {
            return Err(invalid(
                field,
                format!("{n} characters, at most {max} allowed"),
            ));
        }
        Ok(s.to_owned())
    }

    pub(crate) fn string(
        &self,
        field: &'static str,
        min: usize,
        max: usize,
    ) -> Result<String, EventError> {
        Self::checked(field, Self::str_of(field, self.required(field)?)?, min, max)
    }

    fn opt_string(&self, field: &'static str, max: usize) -> Result<Option<String>, EventError> {
        self.get(field)
            .map(|v| Self::checked(field, Self::str_of(field, v)?, 0, max))
            .transpose()
    }

    fn uuid_of(field: &'static str, v: &Value) -> Result<Uuid, EventError> {
        let s = Self::str_of(field, v)?;
        Uuid::try_parse(s).map_err(|_| invalid(field, format!("not a UUID: {:?}", clip(s))))
    }

    pub(crate) fn uuid(&self, field: &'static str) -> Result<Uuid, EventError> {
        Self::uuid_of(field, self.required(field)?)
    }

    pub(crate) fn opt_uuid(&self, field: &'static str) -> Result<Option<Uuid>, EventError> {
        self.get(field).map(|v| Self::uuid_of(field, v)).transpose()
    }

    pub(crate) fn opt_u64(&self, field: &'static str) -> Result<Option<u64>, EventError> {
        self.get(field)
            .map(|v| {
                v.as_u64().ok_or_else(|| {
                    invalid(
                        field,
                        format!("expected an integer ≥ 0, got {}", clip(&v.to_string())),
                    )
                })
            })
            .transpose()
    }

    pub(crate) fn opt_bool(&self, field: &'static str) -> Result<Option<bool>, EventError> {
        self.get(field)
            .map(|v| {
                v.as_bool().ok_or_else(|| {
                    invalid(field, format!("expected a boolean, got {}", type_name(v)))
                })
            })
            .transpose()
    }

    pub(crate) fn bool(&self, field: &'static str) -> Result<bool, EventError> {
        self.opt_bool(field)?.ok_or(EventError::Missing(field))
    }

    pub(crate) fn u64(&self, field: &'static str) -> Result<u64, EventError> {
        self.required(field)?;
        Ok(self.opt_u64(field)?.unwrap_or_default())
    }

    fn opt_u32(&self, field: &'static str) -> Result<Option<u32>, EventError> {
        self.opt_u64(field)?
            .map(|n| u32::try_from(n).map_err(|_| invalid(field, format!("{n} is too large"))))
            .transpose()
    }

    pub(crate) fn timestamp(&self, field: &'static str) -> Result<Timestamp, EventError> {
        let s = Self::str_of(field, self.required(field)?)?;
        chrono::DateTime::parse_from_rfc3339(s)
            .ok()
            .and_then(|t| t.timestamp_nanos_opt())
            .ok_or_else(|| invalid(field, format!("not an RFC 3339 date-time: {:?}", clip(s))))
    }

    fn subjects(&self, field: &'static str) -> Result<Vec<String>, EventError> {
        let Some(v) = self.get(field) else {
            return Ok(Vec::new());
        };
        let items = v
            .as_array()
            .ok_or_else(|| invalid(field, format!("expected an array, got {}", type_name(v))))?;
        if items.len() > MAX_SUBJECTS {
            return Err(invalid(
                field,
                format!("{} items, at most {MAX_SUBJECTS} allowed", items.len()),
            ));
        }
        items
            .iter()
            .map(|v| Self::checked(field, Self::str_of(field, v)?, 0, 100))
            .collect()
    }

    fn choice<T: Copy>(
        &self,
        field: &'static str,
        options: &[(&str, T)],
        default: Option<T>,
    ) -> Result<T, EventError> {
        let Some(v) = self.get(field) else {
            return default.ok_or(EventError::Missing(field));
        };
        let s = Self::str_of(field, v)?;
        options
            .iter()
            .find(|(name, _)| *name == s)
            .map(|(_, t)| *t)
            .ok_or_else(|| {
                let names: Vec<_> = options.iter().map(|(n, _)| format!("{n:?}")).collect();
                invalid(
                    field,
                    format!("{:?} is not one of {}", clip(s), names.join(", ")),
                )
            })
    }

    /// The upsert fields of one entity (events and snapshot lines alike).
    pub(crate) fn entity(&self, kind: EntityKind, school_id: Uuid) -> Result<Entity, EventError> {
        Ok(match kind {
            EntityKind::Class => Entity::Class(Class {
                class_id: self.uuid("classId")?,
                school_id,
                class_name: self.string("className", 1, 200)?,
                grade: self.opt_string("grade", 50)?,
                academic_year: self.opt_string("academicYear", 20)?,
                total_students: self.opt_u32("totalStudents")?,
                homeroom_teacher_id: self.opt_uuid("homeroomTeacherId")?,
            }),
            EntityKind::Teacher => Entity::Teacher(Teacher {
                teacher_id: self.uuid("teacherId")?,
                school_id,
                full_name: self.string("fullName", 1, 200)?,
                employee_code: self.opt_string("employeeCode", 50)?,
                email: self.opt_string("email", 254)?,
                phone: self.opt_string("phone", 32)?,
                subjects: self.subjects("subjects")?,
                status: self.choice(
                    "status",
                    &[
                        ("active", TeacherStatus::Active),
                        ("inactive", TeacherStatus::Inactive),
                    ],
                    Some(TeacherStatus::Active),
                )?,
            }),
            EntityKind::Assignment => Entity::Assignment(Assignment {
                assignment_id: self.uuid("assignmentId")?,
                teacher_id: self.uuid("teacherId")?,
                class_id: self.uuid("classId")?,
                school_id,
                subject: self.opt_string("subject", 100)?,
                role: self.choice(
                    "role",
                    &[("homeroom", Role::Homeroom), ("subject", Role::Subject)],
                    None,
                )?,
                academic_year: self.opt_string("academicYear", 20)?,
            }),
        })
    }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Keeps error texts short when a field holds something huge.
fn clip(s: &str) -> String {
    const MAX: usize = 80;
    match s.char_indices().nth(MAX) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SCHOOL: &str = "5b0f1a2e-0000-4000-8000-000000000001";
    const CLASS: &str = "c1a55000-0000-4000-8000-000000000001";

    fn class_created(extra: &str) -> String {
        format!(
            r#"{{"eventId":"6f1c0000-0000-4000-8000-000000000001","eventType":"emis.class.created",
            "timestamp":"2025-10-26T10:00:00Z","classId":"{CLASS}","className":"Lớp 10A1",
            "grade":"Khối 10","academicYear":"2024-2025","totalStudents":45,
            "schoolId":"{SCHOOL}"{extra}}}"#
        )
    }

    #[test]
    fn parses_the_contract_example_with_vietnamese_text() {
        let e = Event::parse(EventType::ClassCreated, class_created("").as_bytes()).unwrap();
        let Change::Upsert(Entity::Class(c)) = e.change else {
            panic!("not a class upsert")
        };
        assert_eq!(c.class_name, "Lớp 10A1");
        assert_eq!(c.grade.as_deref(), Some("Khối 10"));
        assert_eq!(c.total_students, Some(45));
        assert_eq!(e.key.version, None);
        assert_eq!(e.key.timestamp, 1_761_472_800_000_000_000);
    }

    #[test]
    fn ignores_unknown_fields() {
        let raw = class_created(r#","futureField":{"a":[1,2]}"#);
        assert!(Event::parse(EventType::ClassCreated, raw.as_bytes()).is_ok());
    }

    fn reason(raw: &str) -> String {
        Event::parse(EventType::ClassCreated, raw.as_bytes())
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn errors_name_the_field_and_the_reason() {
        assert!(reason("{not json").starts_with("not valid JSON"));
        assert_eq!(reason("[1]"), "not a JSON object");
        assert_eq!(
            reason(&class_created("").replace(r#""className":"Lớp 10A1","#, "")),
            "missing required field `className`"
        );
        assert_eq!(
            reason(&class_created("").replace(CLASS, "not-a-uuid")),
            r#"field `classId`: not a UUID: "not-a-uuid""#
        );
        assert_eq!(
            reason(&class_created("").replace("Khối 10", &"x".repeat(51))),
            "field `grade`: 51 characters, at most 50 allowed"
        );
        assert_eq!(
            reason(&class_created("").replace("45", "\"45\"")),
            "field `totalStudents`: expected an integer ≥ 0, got \"45\""
        );
        assert_eq!(
            reason(&class_created("").replace("emis.class.created", "emis.class.moved")),
            "unknown eventType `emis.class.moved`"
        );
        assert_eq!(
            reason(&class_created("").replace("emis.class.created", "emis.class.updated")),
            "eventType `emis.class.updated` does not match topic's event type `emis.class.created`"
        );
        assert_eq!(
            reason(&class_created(r#","version":-1"#)),
            "field `version`: expected an integer ≥ 0, got -1"
        );
    }

    #[test]
    fn a_delete_needs_only_the_id() {
        let raw = format!(
            r#"{{"eventId":"6f1c0000-0000-4000-8000-000000000002","eventType":"emis.class.deleted",
            "timestamp":"2025-10-26T11:00:00+07:00","version":4,"classId":"{CLASS}","schoolId":"{SCHOOL}"}}"#
        );
        let e = Event::parse(EventType::ClassDeleted, raw.as_bytes()).unwrap();
        assert!(e.key.delete);
        assert_eq!(e.key.version, Some(4));
        assert!(matches!(
            e.change,
            Change::Delete {
                kind: EntityKind::Class,
                ..
            }
        ));
    }

    #[test]
    fn assignment_role_is_required_and_checked() {
        let base = format!(
            r#"{{"eventId":"6f1c0000-0000-4000-8000-000000000003","eventType":"emis.assignment.created",
            "timestamp":"2025-10-26T10:00:00Z","assignmentId":"{CLASS}","teacherId":"{CLASS}",
            "classId":"{CLASS}","schoolId":"{SCHOOL}""#
        );
        let err = |raw: String| {
            Event::parse(EventType::AssignmentCreated, raw.as_bytes())
                .unwrap_err()
                .to_string()
        };
        assert_eq!(err(format!("{base}}}")), "missing required field `role`");
        assert_eq!(
            err(format!(r#"{base},"role":"principal"}}"#)),
            r#"field `role`: "principal" is not one of "homeroom", "subject""#
        );
    }

    #[test]
    fn hostile_values_get_a_clear_reason() {
        assert_eq!(reason(""), "empty value (expected a JSON object)");
        let dup = class_created("").replacen(
            r#"{"eventId":"6f1c0000-0000-4000-8000-000000000001","#,
            r#"{"eventId":"6f1c0000-0000-4000-8000-000000000001","eventId":"6f1c0000-0000-4000-8000-000000000009","#,
            1,
        );
        assert_eq!(reason(&dup), "field `eventId` appears more than once");
        // A syntax error after the duplicate still counts as bad JSON.
        assert!(reason(&format!("{dup}x")).starts_with("not valid JSON"));
        // Duplicates inside an ignored nested object are no concern.
        assert!(Event::parse(
            EventType::ClassCreated,
            class_created(r#","extra":{"a":1,"a":2}"#).as_bytes()
        )
        .is_ok());
        let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        assert_eq!(reason(&deep), "not a JSON object");
        let deep_object = format!(
            r#"{{"a":{}1{}}}"#,
            r#"{"a":"#.repeat(100_000),
            "}".repeat(100_000)
        );
        assert!(reason(&deep_object).starts_with("not valid JSON: recursion limit exceeded"));
        let bad_utf8 = Event::parse(EventType::ClassCreated, b"{\"className\":\"L\xff\xfe\"}")
            .unwrap_err()
            .to_string();
        assert!(bad_utf8.starts_with("not valid JSON"), "{bad_utf8}");
        let nul = Event::parse(EventType::ClassCreated, &[0u8; 64])
            .unwrap_err()
            .to_string();
        assert!(nul.starts_with("not valid JSON"), "{nul}");
        assert_eq!(reason("42"), "not a JSON object");
        assert_eq!(reason("null"), "not a JSON object");
    }

    #[test]
    fn oversized_payloads_are_refused_before_parsing() {
        let raw = vec![b' '; MAX_EVENT_BYTES + 1];
        assert_eq!(
            Event::parse(EventType::ClassCreated, &raw),
            Err(EventError::TooLarge(MAX_EVENT_BYTES + 1))
        );
    }
}

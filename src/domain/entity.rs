//! Entities, order keys and the convergence rule.
//!
//! The rule (contract §2, "Ordering and idempotency") decides whether an
//! incoming change replaces what is stored. It must make the final state
//! independent of arrival order and of duplicates, so [`OrderKey`] is a
//! *total* order: see its documentation for how ties are broken.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Nanoseconds since the Unix epoch, UTC. Enough for years 1677–2262.
pub type Timestamp = i64;

/// RFC 3339 in UTC, with as many fraction digits as the value needs.
pub fn format_timestamp(t: Timestamp) -> String {
    chrono::DateTime::from_timestamp_nanos(t).to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)
}

/// The three replicated entity kinds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum EntityKind {
    Class,
    Teacher,
    Assignment,
}

impl EntityKind {
    pub const ALL: [EntityKind; 3] = [
        EntityKind::Class,
        EntityKind::Teacher,
        EntityKind::Assignment,
    ];

    /// The lower-case name used in snapshots (`"kind":"class"`) and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            EntityKind::Class => "class",
            EntityKind::Teacher => "teacher",
            EntityKind::Assignment => "assignment",
        }
    }

    /// The JSON field that carries this kind's id.
    pub fn id_field(self) -> &'static str {
        match self {
            EntityKind::Class => "classId",
            EntityKind::Teacher => "teacherId",
            EntityKind::Assignment => "assignmentId",
        }
    }

    pub fn code(self) -> u8 {
        match self {
            EntityKind::Class => 1,
            EntityKind::Teacher => 2,
            EntityKind::Assignment => 3,
        }
    }

    pub fn from_code(code: u8) -> Option<EntityKind> {
        Self::ALL.into_iter().find(|k| k.code() == code)
    }
}

/// Where this node got the current version of a record from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum SyncSource {
    Kafka,
    Resync,
    Import,
    /// A parent node's change feed (contract §6).
    Upstream,
}

impl SyncSource {
    pub fn as_str(self) -> &'static str {
        match self {
            SyncSource::Kafka => "kafka",
            SyncSource::Resync => "resync",
            SyncSource::Import => "import",
            SyncSource::Upstream => "upstream",
        }
    }
}

/// The position of a change in its entity's history.
///
/// The contract says: with `version` on both sides the greater version is
/// newer, otherwise the later `timestamp`. Taken literally that is not a
/// total order once versioned and unversioned events of one entity mix
/// (A(v1,t3) < C(v2,t1) by version, C < B(t2) by time, B < A by time), and
/// equal keys of *different* events would let arrival order pick the winner.
/// Both break the convergence invariant, so the key compares
/// lexicographically:
///
/// 1. a versioned change outranks an unversioned one (producers add
///    versions, they do not drop them); between versioned changes the
///    greater `version` wins — exactly the contract's rule;
/// 2. then the later `timestamp` — the contract's rule for unversioned ones;
/// 3. then a delete outranks an upsert with the same version and timestamp;
/// 4. then the greater `eventId`, an arbitrary but deterministic tie-break.
///
/// Equal keys mean the same event delivered again: ignored as a duplicate.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct OrderKey {
    pub version: Option<u64>,
    pub timestamp: Timestamp,
    pub delete: bool,
    pub event_id: Uuid,
}

impl OrderKey {
    fn rank(&self) -> (bool, u64, Timestamp, bool, Uuid) {
        (
            self.version.is_some(),
            self.version.unwrap_or(0),
            self.timestamp,
            self.delete,
            self.event_id,
        )
    }

    /// The convergence rule: may a change with this key replace what is
    /// stored under `stored` (a live record's or a tombstone's key)?
    pub fn supersedes(&self, stored: Option<&OrderKey>) -> bool {
        stored.is_none_or(|s| self > s)
    }
}

impl Ord for OrderKey {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.rank().cmp(&other.rank())
    }
}

impl PartialOrd for OrderKey {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Class {
    pub class_id: Uuid,
    pub school_id: Uuid,
    #[schema(example = "Lớp 10A1")]
    pub class_name: String,
    #[schema(example = "Khối 10")]
    pub grade: Option<String>,
    #[schema(example = "2024-2025")]
    pub academic_year: Option<String>,
    #[schema(example = 45)]
    pub total_students: Option<u32>,
    pub homeroom_teacher_id: Option<Uuid>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum TeacherStatus {
    Active,
    Inactive,
}

impl TeacherStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            TeacherStatus::Active => "active",
            TeacherStatus::Inactive => "inactive",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Teacher {
    pub teacher_id: Uuid,
    pub school_id: Uuid,
    #[schema(example = "Nguyễn Thị Hương")]
    pub full_name: String,
    #[schema(example = "GV-001")]
    pub employee_code: Option<String>,
    #[schema(example = "huong.nt@thpt-chuvanan.edu.vn")]
    pub email: Option<String>,
    pub phone: Option<String>,
    #[schema(example = json!(["Toán", "Vật lý"]))]
    pub subjects: Vec<String>,
    pub status: TeacherStatus,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Homeroom,
    Subject,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Homeroom => "homeroom",
            Role::Subject => "subject",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Assignment {
    pub assignment_id: Uuid,
    pub teacher_id: Uuid,
    pub class_id: Uuid,
    /// The class's school (contract §2).
    pub school_id: Uuid,
    pub subject: Option<String>,
    pub role: Role,
    pub academic_year: Option<String>,
}

/// One entity's full state, as an upsert carries it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Entity {
    Class(Class),
    Teacher(Teacher),
    Assignment(Assignment),
}

impl Entity {
    pub fn kind(&self) -> EntityKind {
        match self {
            Entity::Class(_) => EntityKind::Class,
            Entity::Teacher(_) => EntityKind::Teacher,
            Entity::Assignment(_) => EntityKind::Assignment,
        }
    }

    pub fn id(&self) -> Uuid {
        match self {
            Entity::Class(c) => c.class_id,
            Entity::Teacher(t) => t.teacher_id,
            Entity::Assignment(a) => a.assignment_id,
        }
    }

    pub fn school_id(&self) -> Uuid {
        match self {
            Entity::Class(c) => c.school_id,
            Entity::Teacher(t) => t.school_id,
            Entity::Assignment(a) => a.school_id,
        }
    }
}

/// What a valid event (or snapshot line) asks the store to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    Upsert(Entity),
    Delete {
        kind: EntityKind,
        id: Uuid,
        school_id: Uuid,
    },
}

impl Change {
    pub fn kind(&self) -> EntityKind {
        match self {
            Change::Upsert(e) => e.kind(),
            Change::Delete { kind, .. } => *kind,
        }
    }

    pub fn id(&self) -> Uuid {
        match self {
            Change::Upsert(e) => e.id(),
            Change::Delete { id, .. } => *id,
        }
    }

    pub fn school_id(&self) -> Uuid {
        match self {
            Change::Upsert(e) => e.school_id(),
            Change::Delete { school_id, .. } => *school_id,
        }
    }
}

/// A live entity as stored: the data plus what the rule and the API need.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record<T> {
    pub data: T,
    pub key: OrderKey,
    /// When this node applied the change (its clock, passed in).
    pub last_synced_at: Timestamp,
    pub source: SyncSource,
}

/// What a delete leaves behind, so that a late, older upsert cannot bring
/// the entity back.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tombstone {
    pub key: OrderKey,
    pub school_id: Uuid,
    /// When this node applied the delete; tombstones are purged
    /// `tombstone_retention` after it.
    pub deleted_at: Timestamp,
}

impl Tombstone {
    /// Whether the tombstone has outlived its retention at `now`.
    pub fn expired(&self, now: Timestamp, retention_nanos: i64) -> bool {
        now.saturating_sub(self.deleted_at) > retention_nanos
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(version: Option<u64>, timestamp: i64, delete: bool, id: u128) -> OrderKey {
        OrderKey {
            version,
            timestamp,
            delete,
            event_id: Uuid::from_u128(id),
        }
    }

    #[test]
    fn greater_version_wins_even_with_older_timestamp() {
        assert!(key(Some(2), 1, false, 1).supersedes(Some(&key(Some(1), 9, false, 2))));
        assert!(!key(Some(1), 9, false, 1).supersedes(Some(&key(Some(2), 1, false, 2))));
    }

    #[test]
    fn without_versions_the_later_timestamp_wins() {
        assert!(key(None, 5, false, 1).supersedes(Some(&key(None, 4, true, 9))));
        assert!(!key(None, 4, true, 9).supersedes(Some(&key(None, 5, false, 1))));
    }

    #[test]
    fn the_same_event_twice_is_not_newer() {
        let k = key(Some(3), 7, false, 5);
        assert!(!k.supersedes(Some(&k)));
        assert!(k.supersedes(None));
    }

    #[test]
    fn a_delete_wins_a_full_tie_with_an_upsert() {
        assert!(key(Some(3), 7, true, 1).supersedes(Some(&key(Some(3), 7, false, 9))));
    }

    #[test]
    fn mixed_versioned_and_unversioned_keys_are_transitive() {
        // The cycle the literal contract rule would produce.
        let a = key(Some(1), 3, false, 1);
        let b = key(None, 2, false, 2);
        let c = key(Some(2), 1, false, 3);
        let mut v = [a, b, c];
        v.sort();
        assert_eq!(v, [b, a, c]);
    }

    #[test]
    fn tombstones_expire_after_retention_only() {
        let t = Tombstone {
            key: key(None, 0, true, 1),
            school_id: Uuid::nil(),
            deleted_at: 100,
        };
        assert!(!t.expired(150, 50));
        assert!(t.expired(151, 50));
    }
}

//! A deterministic generator of realistic Vietnamese EMIS data.
//!
//! Why it exists: the demo, the load scripts, the benchmarks and tests all
//! need a province that looks like a real one — Vietnamese names with
//! diacritics, `Lớp 10A1`-style classes in `Khối` 1–12, homeroom teachers,
//! 8–12 assignments per teacher — at a chosen scale, and the same one every
//! time for a given seed. Every entity is a pure function of (seed, school,
//! index), so any part of a national data set can be produced without
//! producing the rest, and two runs with one seed agree byte for byte.
//!
//! [`Trickle`] produces the stream of changes that follows: updates with
//! increasing versions, deletes and re-creates, and optionally malformed
//! events, so that status, metrics and dead letters move. [`Publisher`]
//! sends events to a broker; the data itself does no I/O beyond writing to
//! a sink it is handed ([`Province::write_snapshot`]).

use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use uuid::Uuid;

use crate::domain::{
    Assignment, Change, Class, Entity, EntityKind, Event, EventType, OrderKey, Record, Role,
    SyncSource, Teacher, TeacherStatus, Timestamp,
};

/// 2024-08-15T00:00:00Z: the data of a new school year, as first published.
pub const T_BASE: Timestamp = 1_723_680_000_000_000_000;
pub const ACADEMIC_YEAR: &str = "2024-2025";

/// The shape of a generated data set.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Spec {
    pub seed: u64,
    pub schools: u32,
    pub classes_per_school: u32,
    pub teachers_per_school: u32,
}

impl Spec {
    /// The named scales: `demo` (1,000 teachers), `province` (100,000
    /// teachers, 100,000 classes, about 1,000,000 assignments) and `national`
    /// (ten times that).
    pub const SCALES: [&'static str; 4] = ["tiny", "demo", "province", "national"];

    pub fn scale(name: &str, seed: u64) -> Option<Spec> {
        let (schools, classes, teachers) = match name {
            "tiny" => (3, 12, 12),
            "demo" => (25, 36, 40),
            "province" => (1_000, 100, 100),
            "national" => (10_000, 100, 100),
            _ => return None,
        };
        Some(Spec {
            seed,
            schools,
            classes_per_school: classes,
            teachers_per_school: teachers,
        })
    }

    pub fn teachers(&self) -> u64 {
        u64::from(self.schools) * u64::from(self.teachers_per_school)
    }

    pub fn classes(&self) -> u64 {
        u64::from(self.schools) * u64::from(self.classes_per_school)
    }
}

const FAMILY: [(&str, u32); 14] = [
    ("Nguyễn", 38),
    ("Trần", 11),
    ("Lê", 10),
    ("Phạm", 7),
    ("Hoàng", 5),
    ("Huỳnh", 4),
    ("Phan", 4),
    ("Vũ", 4),
    ("Võ", 4),
    ("Đặng", 2),
    ("Bùi", 2),
    ("Đỗ", 2),
    ("Hồ", 2),
    ("Ngô", 2),
];
const MIDDLE_F: [&str; 6] = ["Thị", "Ngọc", "Thu", "Thanh", "Minh", "Thị Thu"];
const MIDDLE_M: [&str; 6] = ["Văn", "Hữu", "Đức", "Minh", "Quang", "Công"];
const GIVEN_F: [&str; 16] = [
    "Hương", "Lan", "Mai", "Thảo", "Hà", "Linh", "Trang", "Hằng", "Ngân", "Yến", "Phương", "Dung",
    "Huyền", "Nhung", "Loan", "Thủy",
];
const GIVEN_M: [&str; 16] = [
    "Nam", "Hùng", "Tuấn", "Dũng", "Minh", "Hải", "Sơn", "Long", "Quân", "Đạt", "Thắng", "Phúc",
    "Khánh", "Cường", "Trung", "Việt",
];
const SUBJECTS_PRIMARY: [&str; 8] = [
    "Tiếng Việt",
    "Toán",
    "Tiếng Anh",
    "Đạo đức",
    "Tự nhiên và Xã hội",
    "Âm nhạc",
    "Mỹ thuật",
    "Giáo dục thể chất",
];
const SUBJECTS_SECONDARY: [&str; 14] = [
    "Toán",
    "Ngữ văn",
    "Tiếng Anh",
    "Vật lí",
    "Hóa học",
    "Sinh học",
    "Lịch sử",
    "Địa lí",
    "Tin học",
    "Công nghệ",
    "Giáo dục công dân",
    "Giáo dục thể chất",
    "Âm nhạc",
    "Mỹ thuật",
];

/// What a school teaches: primary (Khối 1–5), lower secondary (6–9) or
/// upper secondary (10–12).
fn grades_of(school: u32) -> (u32, u32) {
    match school % 3 {
        0 => (1, 5),
        1 => (6, 4),
        _ => (10, 3),
    }
}

fn subjects_of(school: u32) -> &'static [&'static str] {
    if school.is_multiple_of(3) {
        &SUBJECTS_PRIMARY
    } else {
        &SUBJECTS_SECONDARY
    }
}

/// splitmix64: a well-mixed 64-bit hash of (seed, stream, index).
fn mix(seed: u64, stream: u64, n: u64) -> u64 {
    let mut z =
        seed ^ stream.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ n.wrapping_mul(0xD1B5_4A32_D192_ED03);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

const S_SCHOOL: u64 = 1;
const S_CLASS: u64 = 2;
const S_TEACHER: u64 = 3;
const S_ASSIGNMENT: u64 = 4;
const S_EVENT: u64 = 5;
const S_ATTR: u64 = 6;

/// A deterministic data set; every accessor is a pure function of the spec.
#[derive(Clone, Debug)]
pub struct Province {
    pub spec: Spec,
}

impl Province {
    pub fn new(spec: Spec) -> Province {
        Province { spec }
    }

    fn uid(&self, stream: u64, n: u64) -> Uuid {
        let hi = mix(self.spec.seed, stream, n);
        let lo = mix(self.spec.seed, stream | 0x100, n);
        let mut bytes = [0u8; 16];
        bytes[..8].copy_from_slice(&hi.to_be_bytes());
        bytes[8..].copy_from_slice(&lo.to_be_bytes());
        uuid::Builder::from_random_bytes(bytes).into_uuid()
    }

    fn attr(&self, stream: u64, n: u64) -> u64 {
        mix(self.spec.seed, S_ATTR << 8 | stream, n)
    }

    fn global(&self, school: u32, n: u32, per_school: u32) -> u64 {
        u64::from(school) * u64::from(per_school) + u64::from(n)
    }

    pub fn school_id(&self, school: u32) -> Uuid {
        self.uid(S_SCHOOL, u64::from(school))
    }

    pub fn school_ids(&self) -> Vec<Uuid> {
        (0..self.spec.schools).map(|s| self.school_id(s)).collect()
    }

    pub fn class_id(&self, school: u32, class: u32) -> Uuid {
        self.uid(
            S_CLASS,
            self.global(school, class, self.spec.classes_per_school),
        )
    }

    pub fn teacher_id(&self, school: u32, teacher: u32) -> Uuid {
        self.uid(
            S_TEACHER,
            self.global(school, teacher, self.spec.teachers_per_school),
        )
    }

    /// The class of `school` numbered `class`: grades of the school's level
    /// in turn, sections `A1`, `A2`, … within a grade. Class `c` has teacher
    /// `c` as homeroom teacher when the school has that many teachers.
    pub fn class(&self, school: u32, class: u32) -> Class {
        let (first, count) = grades_of(school);
        let grade = first + class % count;
        let section = 1 + class / count;
        let g = self.global(school, class, self.spec.classes_per_school);
        Class {
            class_id: self.class_id(school, class),
            school_id: self.school_id(school),
            class_name: format!("Lớp {grade}A{section}"),
            grade: Some(format!("Khối {grade}")),
            academic_year: Some(ACADEMIC_YEAR.into()),
            total_students: Some(28 + (self.attr(1, g) % 18) as u32),
            homeroom_teacher_id: (class < self.spec.teachers_per_school)
                .then(|| self.teacher_id(school, class)),
        }
    }

    pub fn teacher(&self, school: u32, teacher: u32) -> Teacher {
        let g = self.global(school, teacher, self.spec.teachers_per_school);
        let h = self.attr(2, g);
        let female = h % 10 < 7; // most Vietnamese teachers are women
        let total: u32 = FAMILY.iter().map(|f| f.1).sum();
        let mut pick = ((h >> 8) % u64::from(total)) as u32;
        let family = FAMILY
            .iter()
            .find(|(_, w)| {
                if pick < *w {
                    true
                } else {
                    pick -= w;
                    false
                }
            })
            .map(|f| f.0)
            .unwrap_or(FAMILY[0].0);
        let (middle, given) = if female {
            (
                MIDDLE_F[(h >> 24) as usize % 6],
                GIVEN_F[(h >> 32) as usize % 16],
            )
        } else {
            (
                MIDDLE_M[(h >> 24) as usize % 6],
                GIVEN_M[(h >> 32) as usize % 16],
            )
        };
        let subjects = subjects_of(school);
        let first = (h >> 40) as usize % subjects.len();
        let mut taught = vec![subjects[first].to_owned()];
        if (h >> 48).is_multiple_of(3) {
            taught.push(subjects[(first + 1) % subjects.len()].to_owned());
        }
        Teacher {
            teacher_id: self.teacher_id(school, teacher),
            school_id: self.school_id(school),
            full_name: format!("{family} {middle} {given}"),
            employee_code: Some(format!("GV{school:05}{teacher:04}")),
            email: Some(format!("gv{teacher:04}.t{school:05}@moet.edu.vn")),
            phone: Some(format!("09{:08}", self.attr(3, g) % 100_000_000)),
            subjects: taught,
            status: if (h >> 56).is_multiple_of(50) {
                TeacherStatus::Inactive
            } else {
                TeacherStatus::Active
            },
        }
    }

    /// How many assignments teacher `teacher` of `school` has: 8 to 12.
    pub fn assignment_count(&self, school: u32, teacher: u32) -> u32 {
        let g = self.global(school, teacher, self.spec.teachers_per_school);
        8 + (self.attr(4, g) % 5) as u32
    }

    /// The teacher's `k`-th assignment: the first is the homeroom of the
    /// class with the teacher's number (if the school has it), the others
    /// teach the teacher's subjects to distinct classes of the same school.
    pub fn assignment(&self, school: u32, teacher: u32, k: u32) -> Assignment {
        let cps = self.spec.classes_per_school.max(1);
        let stride = (cps / 12).max(1);
        let class = (teacher + k * stride) % cps;
        let homeroom = k == 0 && teacher < cps;
        let t = self.teacher(school, teacher);
        let g = self.global(school, teacher, self.spec.teachers_per_school);
        Assignment {
            assignment_id: self.uid(S_ASSIGNMENT, g * 16 + u64::from(k)),
            teacher_id: t.teacher_id,
            class_id: self.class_id(school, class),
            school_id: self.school_id(school),
            subject: Some(t.subjects[k as usize % t.subjects.len()].clone()),
            role: if homeroom {
                Role::Homeroom
            } else {
                Role::Subject
            },
            academic_year: Some(ACADEMIC_YEAR.into()),
        }
    }

    /// Every entity of one school: classes, then teachers, then assignments.
    pub fn school(&self, school: u32) -> Vec<Entity> {
        let s = &self.spec;
        let mut out =
            Vec::with_capacity((s.classes_per_school + s.teachers_per_school * 11) as usize);
        out.extend((0..s.classes_per_school).map(|c| Entity::Class(self.class(school, c))));
        out.extend((0..s.teachers_per_school).map(|t| Entity::Teacher(self.teacher(school, t))));
        for t in 0..s.teachers_per_school {
            for k in 0..self.assignment_count(school, t) {
                out.push(Entity::Assignment(self.assignment(school, t, k)));
            }
        }
        out
    }

    /// The order key of an entity's first publication (version 1).
    pub fn initial_key(&self, entity: &Entity) -> OrderKey {
        OrderKey {
            version: Some(1),
            timestamp: T_BASE,
            delete: false,
            event_id: self.event_id(entity.id().as_u128() as u64),
        }
    }

    fn event_id(&self, n: u64) -> Uuid {
        self.uid(S_EVENT, n)
    }

    /// The `created` event of an entity, as first published.
    pub fn created_event(&self, entity: Entity) -> Event {
        Event {
            event_type: event_type(entity.kind(), Effect::Created),
            key: self.initial_key(&entity),
            change: Change::Upsert(entity),
        }
    }

    /// Writes every school's snapshot (contract §3) to `out`: its records,
    /// then its `end` line; `on_school` hears how many schools are done.
    /// Returns how many records were written.
    pub fn write_snapshot(
        &self,
        out: &mut impl std::io::Write,
        mut on_school: impl FnMut(u32),
    ) -> std::io::Result<u64> {
        let mut records = 0u64;
        for s in 0..self.spec.schools {
            let entities = self.school(s);
            let count = entities.len() as u64;
            for e in entities {
                out.write_all(&crate::domain::snapshot::record_line(&self.record(e)))?;
            }
            out.write_all(&crate::domain::snapshot::end_line(
                self.school_id(s),
                count,
                T_BASE,
            ))?;
            records += count;
            on_school(s + 1);
        }
        Ok(records)
    }

    /// The snapshot record of an entity (contract §3).
    pub fn record(&self, entity: Entity) -> Record<Entity> {
        Record {
            key: self.initial_key(&entity),
            data: entity,
            last_synced_at: T_BASE,
            source: SyncSource::Import,
        }
    }
}

/// What an event does to its entity.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Effect {
    Created,
    Updated,
    Deleted,
}

pub fn event_type(kind: EntityKind, effect: Effect) -> EventType {
    use EventType::*;
    match (kind, effect) {
        (EntityKind::Class, Effect::Created) => ClassCreated,
        (EntityKind::Class, Effect::Updated) => ClassUpdated,
        (EntityKind::Class, Effect::Deleted) => ClassDeleted,
        (EntityKind::Teacher, Effect::Created) => TeacherCreated,
        (EntityKind::Teacher, Effect::Updated) => TeacherUpdated,
        (EntityKind::Teacher, Effect::Deleted) => TeacherDeleted,
        (EntityKind::Assignment, Effect::Created) => AssignmentCreated,
        (EntityKind::Assignment, Effect::Updated) => AssignmentUpdated,
        (EntityKind::Assignment, Effect::Deleted) => AssignmentDeleted,
    }
}

/// One message as it goes on the wire: topic's event type, key, value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    pub event_type: EventType,
    pub key: String,
    pub value: Vec<u8>,
    /// Whether the value is deliberately malformed.
    pub malformed: bool,
}

impl Message {
    pub fn of(event: &Event) -> Message {
        Message {
            event_type: event.event_type,
            key: event.change.id().to_string(),
            value: event.to_json(),
            malformed: false,
        }
    }
}

/// The stream of changes after the first publication: teacher and class
/// updates, assignments deleted and re-created, and — with
/// `malformed_per_mille` > 0 — malformed events for the dead-letter list.
/// Versions only grow, so every change wins over what it replaces.
pub struct Trickle {
    province: Province,
    rng: StdRng,
    version: u64,
    timestamp: Timestamp,
    malformed_per_mille: u32,
    /// An assignment deleted by the previous step, re-created next.
    deleted: Option<Assignment>,
}

impl Trickle {
    /// `start` is the timestamp of the first change (e.g. now).
    pub fn new(province: Province, start: Timestamp, malformed_per_mille: u32) -> Trickle {
        let seed = province.spec.seed;
        Trickle {
            province,
            rng: StdRng::seed_from_u64(seed ^ 0x7121_c41e),
            // Microseconds since the epoch: a later run's changes outrank an
            // earlier run's at up to a million changes per second.
            version: (start / 1_000).max(1) as u64,
            timestamp: start,
            malformed_per_mille,
            deleted: None,
        }
    }

    fn next_key(&mut self, delete: bool) -> OrderKey {
        self.version += 1;
        // 1 µs apart: at any rate up to a million changes a second the
        // timestamps stay behind the clock of the publisher, which stamps
        // the Kafka records, so the node never refuses them as stamped in
        // the future (`ingest.max_future_skew`).
        self.timestamp += 1_000;
        let n = self.version;
        OrderKey {
            version: Some(self.version),
            timestamp: self.timestamp,
            delete,
            event_id: self.province.event_id(n << 32 | 0xffff_ffff),
        }
    }

    pub fn next_message(&mut self) -> Message {
        if let Some(a) = self.deleted.take() {
            let key = self.next_key(false);
            return Message::of(&Event {
                event_type: EventType::AssignmentCreated,
                key,
                change: Change::Upsert(Entity::Assignment(a)),
            });
        }
        let s = &self.province.spec;
        let school = self.rng.gen_range(0..s.schools);
        let roll = self.rng.gen_range(0..1000);
        if roll < self.malformed_per_mille {
            return self.malformed(school);
        }
        let (tps, cps) = (s.teachers_per_school, s.classes_per_school);
        match roll % 10 {
            0..=5 => {
                let mut t = self.province.teacher(school, self.rng.gen_range(0..tps));
                t.phone = Some(format!("09{:08}", self.rng.gen_range(0..100_000_000u32)));
                let key = self.next_key(false);
                Message::of(&Event {
                    event_type: EventType::TeacherUpdated,
                    key,
                    change: Change::Upsert(Entity::Teacher(t)),
                })
            }
            6..=8 => {
                let mut c = self.province.class(school, self.rng.gen_range(0..cps));
                c.total_students = Some(self.rng.gen_range(25..=48));
                let key = self.next_key(false);
                Message::of(&Event {
                    event_type: EventType::ClassUpdated,
                    key,
                    change: Change::Upsert(Entity::Class(c)),
                })
            }
            _ => {
                let t = self.rng.gen_range(0..tps);
                let k = self
                    .rng
                    .gen_range(0..self.province.assignment_count(school, t));
                let a = self.province.assignment(school, t, k);
                let key = self.next_key(true);
                let event = Event {
                    event_type: EventType::AssignmentDeleted,
                    key,
                    change: Change::Delete {
                        kind: EntityKind::Assignment,
                        id: a.assignment_id,
                        school_id: a.school_id,
                    },
                };
                self.deleted = Some(a);
                Message::of(&event)
            }
        }
    }

    fn malformed(&mut self, school: u32) -> Message {
        let teacher = self.province.teacher(school, 0);
        let key = self.next_key(false);
        let good = Event {
            event_type: EventType::TeacherUpdated,
            key,
            change: Change::Upsert(Entity::Teacher(teacher.clone())),
        };
        let mut value: serde_json::Value =
            serde_json::from_slice(&good.to_json()).expect("own JSON");
        let event_type = match self.rng.gen_range(0..4) {
            0 => {
                value.as_object_mut().unwrap().remove("fullName");
                EventType::TeacherUpdated
            }
            1 => {
                value["teacherId"] = "GV-không-phải-UUID".into();
                EventType::TeacherUpdated
            }
            2 => {
                // Published on the wrong topic.
                EventType::ClassUpdated
            }
            _ => {
                return Message {
                    event_type: EventType::TeacherUpdated,
                    key: teacher.teacher_id.to_string(),
                    value: b"{\"eventId\": \"truncated".to_vec(),
                    malformed: true,
                }
            }
        };
        Message {
            event_type,
            key: teacher.teacher_id.to_string(),
            value: serde_json::to_vec(&value).expect("JSON"),
            malformed: true,
        }
    }
}

/// Sends messages to a broker's contract topics (their default names).
pub struct Publisher {
    producer: rdkafka::producer::ThreadedProducer<rdkafka::producer::DefaultProducerContext>,
}

impl Publisher {
    pub fn connect(
        brokers: &str,
        properties: &std::collections::BTreeMap<String, String>,
    ) -> anyhow::Result<Publisher> {
        let mut config = rdkafka::ClientConfig::new();
        config
            .set("bootstrap.servers", brokers)
            .set("linger.ms", "20")
            .set("queue.buffering.max.messages", "500000")
            .set("compression.type", "lz4");
        for (k, v) in properties {
            config.set(k, v);
        }
        Ok(Publisher {
            producer: config.create()?,
        })
    }

    /// Queues one message, waiting while the local queue is full.
    pub fn send(&self, m: &Message) -> anyhow::Result<()> {
        use rdkafka::producer::BaseRecord;
        let mut record = BaseRecord::to(m.event_type.name())
            .key(m.key.as_str())
            .payload(m.value.as_slice());
        loop {
            match self.producer.send(record) {
                Ok(()) => return Ok(()),
                Err((
                    rdkafka::error::KafkaError::MessageProduction(
                        rdkafka::types::RDKafkaErrorCode::QueueFull,
                    ),
                    r,
                )) => {
                    record = r;
                    self.producer.poll(Duration::from_millis(10));
                }
                Err((e, _)) => return Err(e.into()),
            }
        }
    }

    /// Waits until every queued message is acknowledged by the broker.
    pub fn flush(&self, timeout: Duration) -> anyhow::Result<()> {
        use rdkafka::producer::Producer;
        self.producer.flush(timeout)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny(seed: u64) -> Province {
        Province::new(Spec::scale("tiny", seed).unwrap())
    }

    #[test]
    fn same_seed_same_data_other_seed_other_ids() {
        let (a, b, c) = (tiny(7), tiny(7), tiny(8));
        assert_eq!(a.school(1), b.school(1));
        assert_ne!(a.school_id(1), c.school_id(1));
        assert_eq!(a.school_id(1).get_version_num(), 4);
    }

    #[test]
    fn every_generated_event_parses_back_to_itself() {
        let p = tiny(1);
        for s in 0..p.spec.schools {
            for e in p.school(s) {
                let event = p.created_event(e);
                let parsed = Event::parse(event.event_type, &event.to_json()).unwrap();
                assert_eq!(parsed, event);
            }
        }
        let mut trickle = Trickle::new(p, T_BASE, 0);
        for _ in 0..200 {
            let m = trickle.next_message();
            assert!(Event::parse(m.event_type, &m.value).is_ok());
        }
    }

    #[test]
    fn malformed_messages_are_rejected_by_the_parser() {
        let mut trickle = Trickle::new(tiny(1), T_BASE, 1000);
        for _ in 0..50 {
            let m = trickle.next_message();
            assert!(m.malformed);
            assert!(Event::parse(m.event_type, &m.value).is_err());
        }
    }

    #[test]
    fn schools_have_homerooms_and_eight_to_twelve_assignments_per_teacher() {
        let p = tiny(3);
        for t in 0..p.spec.teachers_per_school {
            let n = p.assignment_count(2, t);
            assert!((8..=12).contains(&n));
            let classes: std::collections::HashSet<_> =
                (0..n).map(|k| p.assignment(2, t, k).class_id).collect();
            assert_eq!(classes.len() as u32, n, "distinct classes per teacher");
            let first = p.assignment(2, t, 0);
            assert_eq!(first.role, Role::Homeroom);
            let class = p.class(2, t);
            assert_eq!(class.class_id, first.class_id);
            assert_eq!(class.homeroom_teacher_id, Some(first.teacher_id));
        }
        // School 2 is an upper secondary school: Khối 10–12.
        assert_eq!(p.class(2, 0).class_name, "Lớp 10A1");
        assert_eq!(p.class(2, 4).class_name, "Lớp 11A2");
        assert_eq!(p.class(0, 0).grade.as_deref(), Some("Khối 1"));
    }
}

//! A deterministic province of realistic Vietnamese EMIS data for the
//! benchmarks: 1,000 teachers and 1,000 classes per school, 10 assignments
//! per teacher to classes of the teacher's own school.

#![allow(dead_code)]

use emis_edge::domain::{Assignment, Class, Entity, OrderKey, Role, Teacher, TeacherStatus};
use uuid::Uuid;

pub const ASSIGNMENTS_PER_TEACHER: u64 = 10;
pub const T0: i64 = 1_761_472_800_000_000_000;
pub const FAMILY: [&str; 8] = [
    "Nguyễn", "Trần", "Lê", "Phạm", "Hoàng", "Huỳnh", "Phan", "Vũ",
];
pub const MIDDLE: [&str; 6] = ["Thị", "Văn", "Hữu", "Minh", "Ngọc", "Đức"];
pub const GIVEN: [&str; 8] = ["Hương", "Nam", "Lan", "Hùng", "Mai", "Tuấn", "Thảo", "Dũng"];
pub const SUBJECTS: [&str; 8] = [
    "Toán",
    "Ngữ văn",
    "Tiếng Anh",
    "Vật lý",
    "Hóa học",
    "Sinh học",
    "Lịch sử",
    "Địa lý",
];

pub fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

pub fn uid(kind: u64, n: u64) -> Uuid {
    // Deterministic, spread across the key space like random v4 ids.
    let mixed = (n as u128).wrapping_mul(0x9E37_79B9_7F4A_7C15_F39C_C060_5CED_C835)
        ^ ((kind as u128) << 120);
    Uuid::from_u128(mixed)
}

pub fn key(n: u64) -> OrderKey {
    OrderKey {
        version: Some(1),
        timestamp: T0,
        delete: false,
        event_id: uid(9, n),
    }
}

pub fn school_of(n: u64) -> Uuid {
    uid(4, n / 1000) // 1,000 teachers and classes per school
}

pub fn teacher(n: u64) -> Entity {
    let name = format!(
        "{} {} {}",
        FAMILY[n as usize % 8],
        MIDDLE[(n / 8) as usize % 6],
        GIVEN[(n / 48) as usize % 8]
    );
    Entity::Teacher(Teacher {
        teacher_id: uid(1, n),
        school_id: school_of(n),
        full_name: name,
        employee_code: Some(format!("GV-{n:08}")),
        email: Some(format!("giaovien.{n}@truong.edu.vn")),
        phone: Some(format!("09{n:08}")),
        subjects: vec![
            SUBJECTS[n as usize % 8].into(),
            SUBJECTS[(n as usize + 3) % 8].into(),
        ],
        status: TeacherStatus::Active,
    })
}

pub fn class(n: u64) -> Entity {
    let grade = 1 + n % 12;
    Entity::Class(Class {
        class_id: uid(2, n),
        school_id: school_of(n),
        class_name: format!("Lớp {grade}A{}", 1 + (n / 12) % 9),
        grade: Some(format!("Khối {grade}")),
        academic_year: Some("2024-2025".into()),
        total_students: Some(30 + (n % 16) as u32),
        homeroom_teacher_id: Some(uid(1, n)),
    })
}

pub fn assignment(n: u64, teachers: u64) -> Entity {
    let t = n / ASSIGNMENTS_PER_TEACHER;
    // Classes of the teacher's own school.
    let school_base = (t / 1000) * 1000;
    let c = (school_base + (t * 7 + n % ASSIGNMENTS_PER_TEACHER * 13) % 1000).min(teachers - 1);
    Entity::Assignment(Assignment {
        assignment_id: uid(3, n),
        teacher_id: uid(1, t),
        class_id: uid(2, c),
        school_id: school_of(c),
        subject: Some(SUBJECTS[n as usize % 8].into()),
        role: if n.is_multiple_of(ASSIGNMENTS_PER_TEACHER) {
            Role::Homeroom
        } else {
            Role::Subject
        },
        academic_year: Some("2024-2025".into()),
    })
}

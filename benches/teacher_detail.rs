//! Teacher detail assembled from the store at province scale: 100,000
//! teachers, 100,000 classes, 1,000,000 assignments (10 per teacher).
//!
//! Run: `cargo bench --bench teacher_detail`. Besides criterion's estimate
//! it prints p50/p90/p99 over 200,000 single lookups of random real ids,
//! the store's size on disk, and how long building it took. Scale down with
//! `EMIS_BENCH_TEACHERS=10000`; set the redb cache with
//! `EMIS_BENCH_CACHE_MB` (default: the node's default, 64).

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use emis_edge::api::teacher_detail_json;
use emis_edge::domain::{
    Assignment, Change, Class, Entity, OrderKey, Role, SyncSource, Teacher, TeacherStatus,
};
use emis_edge::store::{Batch, Store, StoreOptions};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use uuid::Uuid;

const ASSIGNMENTS_PER_TEACHER: u64 = 10;
const T0: i64 = 1_761_472_800_000_000_000;
const FAMILY: [&str; 8] = [
    "Nguyễn", "Trần", "Lê", "Phạm", "Hoàng", "Huỳnh", "Phan", "Vũ",
];
const MIDDLE: [&str; 6] = ["Thị", "Văn", "Hữu", "Minh", "Ngọc", "Đức"];
const GIVEN: [&str; 8] = ["Hương", "Nam", "Lan", "Hùng", "Mai", "Tuấn", "Thảo", "Dũng"];
const SUBJECTS: [&str; 8] = [
    "Toán",
    "Ngữ văn",
    "Tiếng Anh",
    "Vật lý",
    "Hóa học",
    "Sinh học",
    "Lịch sử",
    "Địa lý",
];

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn uid(kind: u64, n: u64) -> Uuid {
    // Deterministic, spread across the key space like random v4 ids.
    let mixed = (n as u128).wrapping_mul(0x9E37_79B9_7F4A_7C15_F39C_C060_5CED_C835)
        ^ ((kind as u128) << 120);
    Uuid::from_u128(mixed)
}

fn key(n: u64) -> OrderKey {
    OrderKey {
        version: Some(1),
        timestamp: T0,
        delete: false,
        event_id: uid(9, n),
    }
}

fn school_of(n: u64) -> Uuid {
    uid(4, n / 1000) // 1,000 teachers and classes per school
}

fn teacher(n: u64) -> Entity {
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

fn class(n: u64) -> Entity {
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

fn assignment(n: u64, teachers: u64) -> Entity {
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

fn build(dir: &std::path::Path, teachers: u64, cache_mb: usize) -> Store {
    let store = Store::open(
        &dir.join("bench.redb"),
        &StoreOptions {
            cache_bytes: cache_mb << 20,
        },
    )
    .unwrap();
    let started = Instant::now();
    let total = teachers * (2 + ASSIGNMENTS_PER_TEACHER);
    let mut changes = Vec::with_capacity(50_000);
    let flush = |changes: &mut Vec<(OrderKey, Change)>| {
        let batch = Batch {
            changes: std::mem::take(changes),
            ..Batch::default()
        };
        store.apply_batch(&batch, T0, SyncSource::Import).unwrap();
    };
    for n in 0..total {
        let entity = if n < teachers {
            teacher(n)
        } else if n < 2 * teachers {
            class(n - teachers)
        } else {
            assignment(n - 2 * teachers, teachers)
        };
        changes.push((key(n), Change::Upsert(entity)));
        if changes.len() == 50_000 {
            flush(&mut changes);
        }
    }
    flush(&mut changes);
    let size = std::fs::metadata(dir.join("bench.redb")).unwrap().len();
    eprintln!(
        "built {total} records ({teachers} teachers, {teachers} classes, {} assignments) in {:.1?}; store file {:.0} MiB",
        teachers * ASSIGNMENTS_PER_TEACHER,
        started.elapsed(),
        size as f64 / (1 << 20) as f64
    );
    store
}

fn percentiles(store: &Store, teachers: u64) {
    let mut rng = StdRng::seed_from_u64(7);
    let mut samples = Vec::with_capacity(200_000);
    for _ in 0..200_000 {
        let id = uid(1, rng.gen_range(0..teachers));
        let t = Instant::now();
        let detail = store.read().unwrap().teacher_detail(id).unwrap().unwrap();
        samples.push(t.elapsed());
        assert_eq!(detail.assignments.len(), ASSIGNMENTS_PER_TEACHER as usize);
        black_box(detail);
    }
    samples.sort();
    let p = |q: f64| samples[((samples.len() as f64 * q) as usize).min(samples.len() - 1)];
    eprintln!(
        "teacher detail, one read transaction each, 200000 random lookups: p50 {:?}  p90 {:?}  p99 {:?}  max {:?}",
        p(0.50),
        p(0.90),
        p(0.99),
        samples.last().unwrap()
    );
}

fn bench(c: &mut Criterion) {
    let teachers = env_usize("EMIS_BENCH_TEACHERS", 100_000) as u64;
    let cache_mb = env_usize("EMIS_BENCH_CACHE_MB", 64);
    let dir = tempfile::tempdir().unwrap();
    let store = build(dir.path(), teachers, cache_mb);
    // Warm up the caches the way a running node's would be.
    percentiles(&store, teachers);
    percentiles(&store, teachers);

    let mut rng = StdRng::seed_from_u64(1);
    let mut group = c.benchmark_group("province");
    group.measurement_time(Duration::from_secs(10));
    group.bench_function("teacher_detail", |b| {
        b.iter(|| {
            let id = uid(1, rng.gen_range(0..teachers));
            black_box(store.read().unwrap().teacher_detail(id).unwrap())
        })
    });
    group.bench_function("teacher_detail_json", |b| {
        b.iter(|| {
            let id = uid(1, rng.gen_range(0..teachers));
            let detail = store.read().unwrap().teacher_detail(id).unwrap().unwrap();
            black_box(serde_json::to_vec(&teacher_detail_json(&detail)).unwrap())
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);

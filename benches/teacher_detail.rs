//! Teacher detail assembled from the store at province scale: 100,000
//! teachers, 100,000 classes, 1,000,000 assignments (10 per teacher).
//!
//! Run: `cargo bench --bench teacher_detail`. Besides criterion's estimate
//! it prints p50/p90/p99 over 200,000 single lookups of random real ids,
//! the store's size on disk, and how long building it took. Scale down with
//! `EMIS_BENCH_TEACHERS=10000`; set the redb cache with
//! `EMIS_BENCH_CACHE_MB` (default: the node's default, 64).

mod common;

use std::hint::black_box;

use common::*;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use emis_edge::api::teacher_detail_body;
use emis_edge::domain::{Change, OrderKey, SyncSource};
use emis_edge::store::{Batch, Store, StoreOptions};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

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
            black_box(teacher_detail_body(&detail))
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);

//! Teacher detail from the store at province scale: the generator's
//! province (`emis_edge::gen`, 1,000 schools: 100,000 teachers, 100,000
//! classes, ~1,000,000 assignments).
//!
//! Run: `cargo bench --bench teacher_detail`. It builds the store through
//! `Store::apply_batch`, renders every teacher's document
//! (`Store::materialize`, as the node's worker does), then prints p50/p90/p99
//! over 200,000 lookups of random real ids of what the API serves
//! (`Reader::teacher_detail_body`: the stored document) and of the fallback
//! (assembling from the records and rendering, as while a document is
//! queued), followed by criterion's estimates of both. Scale down with
//! `EMIS_BENCH_SCALE=demo`; set the redb cache with `EMIS_BENCH_CACHE_MB`
//! (default: the node's default, 64).

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use emis_edge::domain::{Change, SyncSource};
use emis_edge::gen::{Province, Spec, T_BASE};
use emis_edge::store::{Batch, Store, StoreOptions};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use uuid::Uuid;

fn build(dir: &std::path::Path, p: &Province, cache_mb: usize) -> Store {
    let store = Store::open(
        &dir.join("bench.redb"),
        &StoreOptions {
            cache_bytes: cache_mb << 20,
            ..Default::default()
        },
    )
    .unwrap();
    let started = Instant::now();
    let mut records = 0u64;
    let mut changes = Vec::with_capacity(60_000);
    for s in 0..p.spec.schools {
        for e in p.school(s) {
            changes.push((p.initial_key(&e), Change::Upsert(e)));
        }
        if changes.len() >= 50_000 || s + 1 == p.spec.schools {
            records += changes.len() as u64;
            let batch = Batch {
                changes: std::mem::take(&mut changes),
                ..Batch::default()
            };
            store
                .apply_batch(&batch, T_BASE, SyncSource::Import)
                .unwrap();
        }
    }
    let built = started.elapsed();
    while store.materialize(10_000, T_BASE).unwrap() > 0 {}
    let size = std::fs::metadata(dir.join("bench.redb")).unwrap().len();
    eprintln!(
        "built {records} records ({} teachers, {} classes) in {built:.1?}, documents rendered in {:.1?}; store file {:.0} MiB",
        p.spec.teachers(),
        p.spec.classes(),
        started.elapsed() - built,
        size as f64 / (1 << 20) as f64
    );
    store
}

fn random_teacher(p: &Province, rng: &mut StdRng) -> Uuid {
    p.teacher_id(
        rng.gen_range(0..p.spec.schools),
        rng.gen_range(0..p.spec.teachers_per_school),
    )
}

fn percentiles(what: &str, store: &Store, p: &Province, f: impl Fn(&Store, Uuid) -> usize) {
    let mut rng = StdRng::seed_from_u64(7);
    let mut samples = Vec::with_capacity(200_000);
    for _ in 0..200_000 {
        let id = random_teacher(p, &mut rng);
        let t = Instant::now();
        let n = f(store, id);
        samples.push(t.elapsed());
        assert!(n > 0);
    }
    samples.sort();
    let q = |q: f64| samples[((samples.len() as f64 * q) as usize).min(samples.len() - 1)];
    eprintln!(
        "{what}, 200000 random lookups: p50 {:?}  p90 {:?}  p99 {:?}  max {:?}",
        q(0.50),
        q(0.90),
        q(0.99),
        samples.last().unwrap()
    );
}

fn served(store: &Store, id: Uuid) -> usize {
    let body = store.read().unwrap().teacher_detail_body(id).unwrap();
    black_box(body.unwrap()).len()
}

fn assembled(store: &Store, id: Uuid) -> usize {
    let detail = store.read().unwrap().teacher_detail(id).unwrap().unwrap();
    black_box(emis_edge::domain::detail::render(&detail)).len()
}

fn bench(c: &mut Criterion) {
    let scale = std::env::var("EMIS_BENCH_SCALE").unwrap_or_else(|_| "province".into());
    let cache_mb = std::env::var("EMIS_BENCH_CACHE_MB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(64);
    let p = Province::new(Spec::scale(&scale, 1).expect("EMIS_BENCH_SCALE: tiny, demo, province"));
    let dir = tempfile::tempdir().unwrap();
    let store = build(dir.path(), &p, cache_mb);
    // Warm up the caches the way a running node's would be.
    for _ in 0..2 {
        percentiles(
            "stored document (what GET /api/teachers/{id} serves)",
            &store,
            &p,
            served,
        );
    }
    percentiles("assembled + rendered (while queued)", &store, &p, assembled);

    let mut rng = StdRng::seed_from_u64(1);
    let mut group = c.benchmark_group(scale.as_str());
    group.measurement_time(Duration::from_secs(10));
    group.bench_function("teacher_detail_body", |b| {
        b.iter(|| served(&store, random_teacher(&p, &mut rng)))
    });
    group.bench_function("teacher_detail_assembled_rendered", |b| {
        b.iter(|| assembled(&store, random_teacher(&p, &mut rng)))
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);

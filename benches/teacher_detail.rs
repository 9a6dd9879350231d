//! Teacher detail from the store at province scale: the generator's
//! province (`emis_edge::gen`, 1,000 schools: 100,000 teachers, 100,000
//! classes, ~1,000,000 assignments).
//!
//! Run: `cargo bench --bench teacher_detail`. It builds the store as
//! `emis-edge import` does (a bulk load, documents rendered, compacted),
//! and in the same run a bare redb file holding every document as plain
//! JSON (the baseline: one `get` of the bytes), then prints p50/p90/p99
//! over 200,000 lookups of random real ids of what the API serves
//! (`Reader::teacher_detail_body`: the stored document, decompressed), of
//! the baseline, and of the fallback (assembling from the records and
//! rendering, as while a document is queued), followed by criterion's
//! estimates. Scale down with
//! `EMIS_BENCH_SCALE=demo`; set the redb cache with `EMIS_BENCH_CACHE_MB`
//! (default: the node's default, 64).

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use emis_edge::domain::{SchoolSnapshot, SyncSource};
use emis_edge::gen::{Province, Spec, T_BASE};
use emis_edge::store::{Store, StoreOptions};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use redb::{Database, ReadableDatabase, TableDefinition};
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
    // As `emis-edge import` fills an empty store: a bulk load in batches
    // of validated schools, documents rendered, then compacted.
    let mut bulk = store
        .bulk_load(T_BASE, SyncSource::Import)
        .unwrap()
        .expect("an empty store");
    let mut batch = Vec::new();
    let mut in_batch = 0;
    for s in 0..p.spec.schools {
        let records: Vec<_> = p
            .school(s)
            .into_iter()
            .map(|e| (p.initial_key(&e), e))
            .collect();
        in_batch += records.len();
        batch.push(SchoolSnapshot {
            school_id: p.school_id(s),
            records,
            as_of: T_BASE,
            cursor: None,
        });
        if in_batch >= emis_edge::resync::IMPORT_BATCH_RECORDS || s + 1 == p.spec.schools {
            bulk.add(&batch).unwrap();
            batch.clear();
            in_batch = 0;
        }
    }
    let records = bulk.len();
    bulk.finish(|_| {}).unwrap();
    store.compact(T_BASE).unwrap();
    let space = store.measure_space(T_BASE).unwrap();
    eprintln!(
        "built {records} records ({} teachers, {} classes) with their documents in {:.1?}; store file {:.0} MiB allocated",
        p.spec.teachers(),
        p.spec.classes(),
        started.elapsed(),
        space.file_allocated.unwrap_or(0) as f64 / (1 << 20) as f64
    );
    store
}

/// The baseline in the same run: every teacher's document as plain JSON in
/// a bare redb table (what format 3 stored), written in key order.
fn build_raw(dir: &std::path::Path, p: &Province, store: &Store, cache_mb: usize) -> Database {
    let db = Database::builder()
        .set_cache_size(cache_mb << 20)
        .create(dir.join("raw.redb"))
        .unwrap();
    let mut docs = Vec::new();
    let r = store.read().unwrap();
    for s in 0..p.spec.schools {
        for t in 0..p.spec.teachers_per_school {
            let id = p.teacher_id(s, t);
            docs.push((id.as_u128(), r.teacher_detail_body(id).unwrap().unwrap()));
        }
    }
    docs.sort_unstable_by_key(|d| d.0);
    let txn = db.begin_write().unwrap();
    {
        let mut table = txn.open_table(RAW).unwrap();
        for (id, doc) in &docs {
            table.insert(*id, doc.as_slice()).unwrap();
        }
    }
    txn.commit().unwrap();
    eprintln!(
        "raw redb baseline: {} plain JSON documents, file {:.0} MiB allocated",
        docs.len(),
        emis_edge::store::allocated_bytes(&dir.join("raw.redb")).unwrap_or(0) as f64
            / (1 << 20) as f64
    );
    db
}

const RAW: TableDefinition<u128, &[u8]> = TableDefinition::new("teacher_docs");

fn raw_lookup(db: &Database, id: Uuid) -> usize {
    let txn = db.begin_read().unwrap();
    let table = txn.open_table(RAW).unwrap();
    let doc = table.get(id.as_u128()).unwrap().unwrap().value().to_vec();
    black_box(doc).len()
}

fn random_teacher(p: &Province, rng: &mut StdRng) -> Uuid {
    p.teacher_id(
        rng.gen_range(0..p.spec.schools),
        rng.gen_range(0..p.spec.teachers_per_school),
    )
}

fn percentiles<S>(what: &str, store: &S, p: &Province, f: impl Fn(&S, Uuid) -> usize) {
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
    let raw = build_raw(dir.path(), &p, &store, cache_mb);
    // Warm up the caches the way a running node's would be; alternate, so
    // that both see the same machine.
    for _ in 0..2 {
        percentiles(
            "stored document (what GET /api/teachers/{id} serves)",
            &store,
            &p,
            served,
        );
        percentiles(
            "raw redb baseline (plain JSON, one get)",
            &raw,
            &p,
            raw_lookup,
        );
    }
    percentiles("assembled + rendered (while queued)", &store, &p, assembled);

    let mut rng = StdRng::seed_from_u64(1);
    let mut group = c.benchmark_group(scale.as_str());
    group.measurement_time(Duration::from_secs(10));
    group.bench_function("teacher_detail_body", |b| {
        b.iter(|| served(&store, random_teacher(&p, &mut rng)))
    });
    group.bench_function("raw_redb_plain_json", |b| {
        b.iter(|| raw_lookup(&raw, random_teacher(&p, &mut rng)))
    });
    group.bench_function("teacher_detail_assembled_rendered", |b| {
        b.iter(|| assembled(&store, random_teacher(&p, &mut rng)))
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);

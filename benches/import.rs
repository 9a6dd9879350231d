//! Import of a province-scale snapshot file into an empty store, and the
//! snapshot serving rate (export) from it, with peak memory.
//!
//! Run: `cargo bench --bench import`. The file is the generator's province
//! (`emis_edge::gen`: 1,000 schools, 100,000 teachers, 100,000 classes,
//! ~1,000,000 assignments; `EMIS_BENCH_SCALE=demo` for a small one),
//! written first in the snapshot format, then imported through the same
//! code as `emis-edge import` (into an empty store: the bulk load, which
//! renders every teacher document itself), then compacted (`emis-edge
//! import` skips that when under 2 % of the file is free, as after a bulk
//! load; the bench compacts anyway to show what is left to give back).
//! `EMIS_BENCH_SCALE=national` for ten times the data. It allocates with
//! mimalloc, as the `emis-edge` binary does.

use std::io::{BufReader, BufWriter, Write};
use std::time::Instant;

use emis_edge::gen::{Province, Spec, T_BASE};
use emis_edge::store::{Store, StoreOptions};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn peak_rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kb: f64 = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    kb / 1024.0
}

fn main() {
    if std::env::args().any(|a| a == "--list" || a == "--test") {
        return;
    }
    let scale = std::env::var("EMIS_BENCH_SCALE").unwrap_or_else(|_| "province".into());
    let cache_mb = std::env::var("EMIS_BENCH_CACHE_MB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(64usize);
    let p = Province::new(
        Spec::scale(&scale, 1).expect("EMIS_BENCH_SCALE: tiny, demo, province, national"),
    );
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("province.ndjson");
    let started = Instant::now();
    let lines = {
        let mut out = BufWriter::with_capacity(1 << 20, std::fs::File::create(&file).unwrap());
        let records = p.write_snapshot(&mut out, |_| {}).unwrap();
        out.flush().unwrap();
        records + u64::from(p.spec.schools)
    };
    let size = std::fs::metadata(&file).unwrap().len();
    eprintln!(
        "generated {lines} lines, {:.0} MiB, in {:.1?}",
        size as f64 / (1 << 20) as f64,
        started.elapsed()
    );

    let store = Store::open(
        &dir.path().join("s.redb"),
        &StoreOptions {
            cache_bytes: cache_mb << 20,
            ..Default::default()
        },
    )
    .unwrap();
    let rss_before = peak_rss_mib();
    let started = Instant::now();
    let mut read = None;
    let input = BufReader::with_capacity(1 << 20, std::fs::File::open(&file).unwrap());
    let outcomes = emis_edge::resync::import(
        &store,
        &emis_edge::config::SchoolFilter::All,
        emis_edge::domain::FutureSkew::DEFAULT,
        input,
        T_BASE,
        |p| {
            if matches!(p, emis_edge::resync::ImportProgress::Written { .. }) && read.is_none() {
                read = Some(started.elapsed());
            }
        },
    )
    .unwrap();
    let took = started.elapsed();
    if let Some(read) = read {
        eprintln!(
            "read and sorted the file in {read:.2?}, then wrote the store in {:.2?}",
            took - read
        );
    }
    assert!(outcomes.iter().all(|o| o.error.is_none()));
    let records = lines - outcomes.len() as u64;
    eprintln!(
        "imported {records} records ({} schools) into an empty durable store in {took:.2?}: {:.0} records/s; store file {:.0} MiB allocated; peak RSS {:.0} MiB (before import {:.0} MiB)",
        outcomes.len(),
        records as f64 / took.as_secs_f64(),
        emis_edge::store::allocated_bytes(&dir.path().join("s.redb")).unwrap_or(0) as f64
            / (1 << 20) as f64,
        peak_rss_mib(),
        rss_before
    );

    let started = Instant::now();
    let mut documents = 0;
    loop {
        let n = store.materialize(10_000, T_BASE).unwrap();
        if n == 0 {
            break;
        }
        documents += n;
    }
    eprintln!(
        "rendered {documents} teacher documents left queued in {:.2?} (a bulk load renders them itself)",
        started.elapsed(),
    );
    let started = Instant::now();
    let report = store.compact(T_BASE).unwrap();
    let mib = |n: Option<u64>| n.unwrap_or(0) as f64 / (1 << 20) as f64;
    eprintln!(
        "compacted in {:.2?}: {:.0} → {:.0} MiB allocated ({:.0} MiB long); {:.0} MiB of data; snapshot file {:.0} MiB: {:.3}×",
        started.elapsed(),
        mib(report.before.file_allocated),
        mib(report.after.file_allocated),
        mib(report.after.file_len),
        mib(Some(report.after.live_bytes)),
        mib(Some(size)),
        report.after.file_allocated.unwrap_or(0) as f64 / size as f64,
    );

    let school = p.school_id(0);
    let started = Instant::now();
    let mut sink = std::io::sink();
    let n = emis_edge::resync::export(&store, &[school], &mut sink, |_| {}).unwrap();
    let t1 = started.elapsed();
    let schools = p.school_ids();
    let started = Instant::now();
    let all = emis_edge::resync::export(&store, &schools, &mut sink, |_| {}).unwrap();
    let t2 = started.elapsed();
    eprintln!(
        "snapshot of one school: {n} lines in {t1:.1?} ({:.0} lines/s); whole province: {all} lines in {t2:.2?} ({:.0} lines/s); peak RSS {:.0} MiB",
        n as f64 / t1.as_secs_f64(),
        all as f64 / t2.as_secs_f64(),
        peak_rss_mib()
    );
}

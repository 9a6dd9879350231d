//! Applying the soak's mix of changes (`emis-edge gen --trickle`: teacher
//! and class updates, assignment deletes and re-creates) to a province
//! store, in durable batches: what a change costs once the store is far
//! larger than the page cache, in node CPU per change.
//!
//! Run: `cargo bench --bench updates` (`EMIS_BENCH_EVENTS`, default
//! 300,000; `EMIS_BENCH_BATCH`, default 1,000 changes a batch). It imports
//! the generator's province (seed 1) into an empty store first.

use std::time::Instant;

use emis_edge::domain::{Event, SyncSource};
use emis_edge::gen::{Province, Spec, Trickle, T_BASE};
use emis_edge::store::{Batch, Store, StoreOptions};

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// This process's CPU time (user + system), in seconds.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap()
        .split_whitespace()
        .collect();
    (fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap()) / 100.0
}

fn main() {
    if std::env::args().any(|a| a == "--list" || a == "--test") {
        return;
    }
    let events = env("EMIS_BENCH_EVENTS", 300_000);
    let batch = env("EMIS_BENCH_BATCH", 1_000);
    let spec = || Spec::scale("province", 1).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("s.redb"), &StoreOptions::default()).unwrap();
    let mut file = Vec::new();
    Province::new(spec())
        .write_snapshot(&mut file, |_| {})
        .unwrap();
    emis_edge::resync::import(
        &store,
        &emis_edge::config::SchoolFilter::All,
        emis_edge::domain::FutureSkew::DEFAULT,
        file.as_slice(),
        T_BASE,
        |_| {},
    )
    .unwrap();
    drop(file);
    let mut trickle = Trickle::new(Province::new(spec()), T_BASE + 1_000_000_000, 0);
    let changes: Vec<_> = (0..events)
        .map(|_| {
            let m = trickle.next_message();
            let e = Event::parse(m.event_type, &m.value).unwrap();
            (e.key, e.change)
        })
        .collect();
    let (started, cpu) = (Instant::now(), cpu_seconds());
    for chunk in changes.chunks(batch) {
        let b = Batch {
            changes: chunk.to_vec(),
            ..Batch::default()
        };
        store
            .apply_batch(&b, T_BASE + 2_000_000_000, SyncSource::Kafka)
            .unwrap();
    }
    let (wall, cpu) = (started.elapsed().as_secs_f64(), cpu_seconds() - cpu);
    println!(
        "{events} changes of the soak's mix in durable batches of {batch} into a province \
         store: {:.0} changes/s, {:.1} µs of CPU per change",
        events as f64 / wall,
        cpu * 1e6 / events as f64
    );
}

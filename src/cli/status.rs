//! `status`: the sync status document (`crate::status::SyncStatus`) — from
//! the running node's `/api/sync/status` if there is one, else computed from
//! the store file — printed as JSON or as a human summary, most urgent
//! first.

use std::sync::Arc;

use anyhow::Context;

use crate::clock::{Clock, SystemClock};
use crate::config::Config;
use crate::state::NodeState;
use crate::status::{StoreStatus, SyncStatus};

use super::{ask_node, local_addr, open_store, runtime, Ask};

pub(super) fn status(config: &Config, as_json: bool, tables: bool) -> anyhow::Result<()> {
    let runtime = runtime()?;
    let from_node = runtime.block_on(ask_node(
        config,
        Ask::Read,
        reqwest::Method::GET,
        "/api/sync/status",
        None,
    ))?;
    let (doc, source) = match from_node {
        Some(doc) => (
            serde_json::from_value::<SyncStatus>(doc)
                .context("the running node's status document is not what this release reads")?,
            format!("running node at {}", local_addr(config)),
        ),
        None => {
            let path = config.store_path();
            anyhow::ensure!(
                path.exists(),
                "no node answers at {} and there is no store at {}",
                local_addr(config),
                path.display()
            );
            let state = NodeState::new(open_store(config)?, config.clone(), Arc::new(SystemClock));
            if tables {
                // Walks every page: only on request.
                state.store.measure_space(SystemClock.now())?;
            }
            (
                state.status()?,
                format!("store file {} (node not running)", path.display()),
            )
        }
    };
    if as_json {
        println!("{}", serde_json::to_string_pretty(&doc)?);
    } else {
        print!("{}", render_status(&doc, &source));
        if tables {
            print!("{}", render_tables(&doc.store));
        }
    }
    Ok(())
}

/// The human summary of a status document, most urgent first.
fn render_status(doc: &SyncStatus, source: &str) -> String {
    use std::fmt::Write;
    let or_dash = |v: Option<&str>| v.unwrap_or("-").to_owned();
    let num = |v: Option<i64>| v.map_or_else(|| "-".to_owned(), |n| n.to_string());
    let mut out = String::new();
    let _ = writeln!(out, "node           {} (from {source})", doc.node_id);
    let _ = writeln!(
        out,
        "stale          {}",
        if doc.stale { "YES" } else { "no" }
    );
    let kafka = &doc.kafka;
    let _ = writeln!(
        out,
        "kafka          {}{}",
        match (kafka.configured, kafka.connected) {
            (false, _) => "not configured",
            (true, true) => "connected",
            (true, false) => "NOT CONNECTED",
        },
        kafka
            .last_error
            .as_ref()
            .map(|e| format!(" — {e}"))
            .unwrap_or_default()
    );
    if let Some(u) = &doc.upstream {
        let _ = writeln!(
            out,
            "upstream       {} {}, {}{}",
            u.url,
            if u.connected {
                "connected"
            } else {
                "NOT CONNECTED"
            },
            if u.caught_up { "caught up" } else { "BEHIND" },
            u.last_error
                .as_ref()
                .map(|e| format!(" — {e}"))
                .unwrap_or_default()
        );
        let _ = writeln!(
            out,
            "               cursor {}, last page {}",
            or_dash(u.cursor.as_deref()),
            or_dash(u.last_page_at.as_deref())
        );
    }
    if let Some(e) = &doc.store_error {
        let _ = writeln!(
            out,
            "STORE ERROR    {e} (failing since {}, {} failed writes; reads still answer, the node \
             retries by itself)",
            or_dash(doc.store.failing_since.as_deref()),
            doc.store.write_failures
        );
    }
    if let Some(oor) = &kafka.offset_out_of_range {
        let _ = writeln!(
            out,
            "EVENTS LOST    {} {} (a resync repairs this)",
            oor.at, oor.detail
        );
    }
    for w in &doc.workers {
        let error = or_dash(w.last_error.as_deref());
        if w.state == crate::worker::WorkerState::Dead {
            let _ = writeln!(out, "WORKER DEAD    {}: {error}", w.name);
        } else if w.consecutive_errors > 0 {
            let _ = writeln!(
                out,
                "WORKER         {} {}: {error} ({} failures in a row)",
                w.name, w.state, w.consecutive_errors
            );
        }
    }
    let _ = writeln!(
        out,
        "caught up      {}",
        if doc.caught_up { "yes" } else { "no" }
    );
    let _ = writeln!(
        out,
        "last event     {}",
        or_dash(doc.last_event_time.as_deref())
    );
    let _ = writeln!(
        out,
        "last resync    {}",
        match &doc.last_resync {
            None => "-".to_owned(),
            Some(r) => format!("{} {} {}", r.at, r.result, r.detail),
        }
    );
    let _ = writeln!(out, "dead letters   {}", doc.dead_letter_count);
    let e = &doc.entities;
    let _ = writeln!(
        out,
        "entities       classes {}, teachers {}, assignments {}, tombstones {}",
        e.classes, e.teachers, e.assignments, e.tombstones
    );
    let _ = writeln!(out, "schools        {}", doc.served_schools);
    if doc.partitions.is_empty() {
        let _ = writeln!(out, "partitions     none consumed yet");
    } else {
        let _ = writeln!(
            out,
            "\n{:<32} {:>9} {:>12} {:>14} {:>8}",
            "TOPIC", "PARTITION", "OFFSET", "HIGH-WATERMARK", "LAG"
        );
        for p in &doc.partitions {
            let _ = writeln!(
                out,
                "{:<32} {:>9} {:>12} {:>14} {:>8}",
                p.topic,
                p.partition,
                num(p.offset),
                num(p.high_watermark),
                num(p.lag)
            );
        }
    }
    out
}

fn mib(n: u64) -> String {
    format!("{:.1}", n as f64 / f64::from(1 << 20))
}

/// Where the store file's bytes go, per table (`status --tables`).
fn render_tables(store: &StoreStatus) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let Some(tables) = &store.tables else {
        let _ = writeln!(
            out,
            "\nstore space   not measured yet (the node measures it a minute after start, \
             then every {} minutes)",
            crate::store::SPACE_EVERY.as_secs() / 60
        );
        return out;
    };
    let _ = writeln!(
        out,
        "\n{:<22} {:>10} {:>10} {:>10} {:>10} {:>10} {:>8} {:>7}",
        "TABLE (MiB)", "ENTRIES", "PAGES", "STORED", "OVERHEAD", "UNUSED", "LEAVES", "BRANCH"
    );
    let mut sum = [0u64; 4];
    for t in tables {
        let _ = writeln!(
            out,
            "{:<22} {:>10} {:>10} {:>10} {:>10} {:>10} {:>8} {:>7}",
            t.name,
            t.entries,
            mib(t.page_bytes()),
            mib(t.stored_bytes),
            mib(t.metadata_bytes),
            mib(t.fragmented_bytes),
            t.leaf_pages,
            t.branch_pages
        );
        for (s, v) in sum.iter_mut().zip([
            t.page_bytes(),
            t.stored_bytes,
            t.metadata_bytes,
            t.fragmented_bytes,
        ]) {
            *s += v;
        }
    }
    let _ = writeln!(
        out,
        "{:<22} {:>10} {:>10} {:>10} {:>10} {:>10}",
        "all tables",
        "",
        mib(sum[0]),
        mib(sum[1]),
        mib(sum[2]),
        mib(sum[3])
    );
    let or_dash = |v: Option<u64>| v.map_or_else(|| "-".to_owned(), mib);
    let _ = writeln!(
        out,
        "file           {} MiB allocated, {} MiB long; free share {}{}",
        or_dash(store.file_bytes),
        or_dash(store.file_len),
        store
            .free_share
            .map_or_else(|| "-".to_owned(), |f| format!("{:.1} %", 100.0 * f)),
        store
            .space_measured_at
            .as_ref()
            .map(|t| format!(" (measured {t})"))
            .unwrap_or_default()
    );
    out
}

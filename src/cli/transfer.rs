//! `export` and `import`: snapshots (NDJSON, contract §3) out of and into a
//! store, e.g. over a USB stick. Each goes through the running node if
//! there is one (its snapshot and admin routes), else works on the store
//! file with `crate::resync`.

use std::path::Path;

use futures::StreamExt;
use std::time::Duration;

use crate::clock::{Clock, SystemClock};
use crate::config::Config;
use crate::resync::ImportProgress;
use crate::store::Store;

use super::{
    ask_node, create, local_addr, node_client, open_store, print_outcomes, progress, runtime, Ask,
};

pub(super) fn export(
    config: &Config,
    schools: Vec<uuid::Uuid>,
    out: &Path,
) -> anyhow::Result<bool> {
    let rt = runtime()?;
    let mut writer = std::io::BufWriter::with_capacity(1 << 20, create(out)?);
    let mut tick = progress(None, "records exported");
    let schools_doc = rt.block_on(ask_node(
        config,
        Ask::Admin,
        reqwest::Method::GET,
        "/api/admin/schools",
        None,
    ))?;
    let total = match schools_doc {
        Some(doc) => {
            // Through the running node: its public snapshot route, per school.
            let schools: Vec<uuid::Uuid> = if schools.is_empty() {
                serde_json::from_value(doc["schools"].clone())?
            } else {
                schools
            };
            rt.block_on(async {
                let client = node_client(config, Some(Duration::from_secs(3600)))?;
                let mut lines = 0u64;
                for school in schools {
                    let url = format!(
                        "http://{}/api/schools/{school}/snapshot",
                        local_addr(config)
                    );
                    let r = client.get(&url).send().await?.error_for_status()?;
                    let mut body = r.bytes_stream();
                    use futures::StreamExt;
                    use std::io::Write;
                    while let Some(chunk) = body.next().await {
                        let chunk = chunk?;
                        lines += chunk.iter().filter(|b| **b == b'\n').count() as u64;
                        writer.write_all(&chunk)?;
                        tick(lines);
                    }
                }
                std::io::Write::flush(&mut writer)?;
                anyhow::Ok(lines)
            })?
        }
        None => {
            let store = open_store(config)?;
            let schools = store.schools_to_sync(&config.school_filter(), schools)?;
            crate::resync::export(&store, &schools, &mut writer, tick)?
        }
    };
    eprintln!("emis-edge: wrote {total} lines to {}", out.display());
    Ok(true)
}

pub(super) fn import(config: &Config, file: &Path) -> anyhow::Result<bool> {
    let size = std::fs::metadata(file)
        .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", file.display()))?
        .len();
    let rt = runtime()?;
    let via_node = rt.block_on(async {
        // A node refuses an upload it does not authorise without reading
        // the body, which can reset the connection before the refusal is
        // read: a cheap admin request first makes the refusal (401, 403)
        // what the operator sees.
        let probe = ask_node(
            config,
            Ask::Admin,
            reqwest::Method::GET,
            "/api/admin/schools",
            None,
        );
        if probe.await?.is_none() {
            return Ok(None);
        }
        let f = tokio::fs::File::open(file).await?;
        // The bar shows what was sent; the node logs how far it got.
        let mut tick = progress(Some(size), "bytes sent to the node");
        let mut sent = 0u64;
        let stream = tokio_util::io::ReaderStream::with_capacity(f, 1 << 20).map(move |chunk| {
            if let Ok(chunk) = &chunk {
                sent += chunk.len() as u64;
                tick(sent);
            }
            chunk
        });
        ask_node(
            config,
            Ask::Admin,
            reqwest::Method::POST,
            "/api/admin/import",
            Some(reqwest::Body::wrap_stream(stream)),
        )
        .await
    })?;
    let doc = match via_node {
        Some(doc) => doc,
        None => {
            let store = open_store(config)?;
            let mut tick = progress(Some(size), "bytes imported");
            let f = std::fs::File::open(file)?;
            let counted = CountingReader {
                inner: f,
                read: 0,
                tick: &mut tick,
            };
            let mut writing: Option<Box<dyn FnMut(u64)>> = None;
            let was_empty = !store.read()?.has_data()?;
            let mut reconciled = false;
            let outcomes = crate::resync::import(
                &store,
                &config.school_filter(),
                config.max_future_skew(),
                std::io::BufReader::with_capacity(1 << 20, counted),
                SystemClock.now(),
                |p| match p {
                    ImportProgress::Written { rows, of } => writing.get_or_insert_with(|| {
                        Box::new(progress(Some(of), "rows written (empty store: bulk load)"))
                    })(rows),
                    ImportProgress::Reconciling => reconciled = true,
                    ImportProgress::Read(_) => {}
                },
            )?;
            drop(writing);
            render_documents(&store)?;
            if was_empty && !reconciled {
                eprintln!(
                    "emis-edge: store {:.0} MiB on disk, every table written in key order: \
                     nothing to compact",
                    crate::store::allocated_bytes(&config.store_path()).unwrap_or(0) as f64
                        / f64::from(1 << 20)
                );
            } else {
                compact(&store)?;
            }
            serde_json::json!({ "schools": outcomes })
        }
    };
    Ok(print_outcomes(&doc))
}

/// Renders every queued teacher document, so that a node started on this
/// store serves each lookup with one read from the first request.
fn render_documents(store: &Store) -> anyhow::Result<()> {
    let pending = store.read()?.pending_docs()?;
    if pending == 0 {
        return Ok(());
    }
    let mut tick = progress(Some(pending), "teacher documents rendered");
    let mut done = 0u64;
    loop {
        let n = store.materialize(10_000, SystemClock.now())?;
        if n == 0 {
            return Ok(());
        }
        done += n as u64;
        tick(done);
    }
}

/// Gives the free pages an import left back to the file system: the node
/// then starts on a file no larger than its data. One measurement (a walk
/// of the tables, 3.7 s at national scale) tells whether there are any,
/// and the compaction, which reads the file twice more, runs only then.
/// After an import that was all bulk load (into an empty store, no entity
/// twice) there are none, each table having been written in key order, and
/// `import` does not call this.
///
/// What counts is the disk the file takes beyond its tables' pages, not
/// `free_share`: that is measured against the file's length, which also
/// counts the regions redb has reserved and not yet written. Right after a
/// province's bulk load the file was 544 MiB long and 443 MiB on disk (a
/// free share of 18 %), and a compaction that gave nothing back made the
/// import take 7-9 s longer.
fn compact(store: &Store) -> anyhow::Result<()> {
    let mib = |n: Option<u64>| n.unwrap_or(0) as f64 / f64::from(1 << 20);
    let space = store.measure_space(SystemClock.now())?;
    let allocated = space.file_allocated.unwrap_or(0);
    let free_on_disk = allocated.saturating_sub(space.table_bytes);
    if free_on_disk < NOTHING_TO_COMPACT_BYTES
        || (free_on_disk as f64) < NOTHING_TO_COMPACT * allocated as f64
    {
        eprintln!(
            "emis-edge: store {:.0} MiB on disk ({:.0} MiB of data), nothing to compact",
            mib(space.file_allocated),
            mib(Some(space.live_bytes))
        );
        return Ok(());
    }
    let report = store.compact(SystemClock.now())?;
    eprintln!(
        "emis-edge: store compacted: {:.0} MiB → {:.0} MiB on disk ({:.0} MiB of data)",
        mib(report.before.file_allocated),
        mib(report.after.file_allocated),
        mib(Some(report.after.live_bytes))
    );
    Ok(())
}

/// Disk taken beyond the tables' pages, as a share of the file's, below
/// which a compaction after an import is not worth it …
const NOTHING_TO_COMPACT: f64 = 0.02;
/// … and in bytes: a small store's file is mostly redb's own bookkeeping,
/// which no compaction gives back.
const NOTHING_TO_COMPACT_BYTES: u64 = 1 << 20;

/// Reports the bytes read so far to `tick`: the progress of an import.
struct CountingReader<'a, R, F: FnMut(u64)> {
    inner: R,
    read: u64,
    tick: &'a mut F,
}

impl<R: std::io::Read, F: FnMut(u64)> std::io::Read for CountingReader<'_, R, F> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.read += n as u64;
        (self.tick)(self.read);
        Ok(n)
    }
}

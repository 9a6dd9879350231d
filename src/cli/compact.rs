//! `compact`: gives the store file's free pages back to the file system,
//! on a stopped node (a compaction needs the store to itself; a running
//! node compacts at start when the free share is at least
//! `store.compact_at_free_share`).

use std::time::Duration;

use crate::clock::{Clock, SystemClock};
use crate::config::Config;
use crate::store::StoreSpace;

use super::{local_addr, open_store};

pub(super) fn compact(config: &Config) -> anyhow::Result<bool> {
    let addr = local_addr(config);
    if std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_ok() {
        anyhow::bail!(
            "a node answers at {addr} (http.listen): stop it first (`systemctl stop emis-edge`); \
             a compaction needs the store to itself. A running node compacts by itself at start \
             when the free share is at least store.compact_at_free_share"
        );
    }
    let path = config.store_path();
    anyhow::ensure!(path.exists(), "there is no store at {}", path.display());
    let store = open_store(config)?;
    let report = store.compact(SystemClock.now())?;
    let mib = |n: Option<u64>| n.unwrap_or(0) as f64 / f64::from(1 << 20);
    let line = |s: &StoreSpace| {
        format!(
            "{:.1} MiB on disk, {:.1} MiB long, free share {:.1} %",
            mib(s.file_allocated),
            mib(s.file_len),
            100.0 * s.free_share.unwrap_or(0.0)
        )
    };
    println!("before  {}", line(&report.before));
    println!("after   {}", line(&report.after));
    println!(
        "data    {:.1} MiB in {} tables",
        mib(Some(report.after.live_bytes)),
        report.after.tables.len()
    );
    Ok(true)
}

//! Where the bytes of the store file go, and giving free space back.
//!
//! [`Store::measure_space`] walks every table's B-tree in one read
//! transaction (redb's `TableStats`: the bytes of keys and values, the
//! B-tree's own overhead, the unused part of its pages) and compares the
//! pages the tables use with the file: what the tables do not use is free
//! — pages redb freed and reuses for later writes, or regions it grew the
//! file by and has not filled. A walk reads every page of the file, so it
//! runs off the request path (the node's `space` worker, an import, a
//! compaction, `emis-edge status` on a stopped node) and its result is
//! kept ([`Store::space`]) for status and metrics to read for free.
//!
//! [`Store::compact`] hands the free pages back to the file system
//! (redb's `Database::compact`: moves pages towards the start of the file
//! and truncates it). It needs the store to itself, so it runs only where
//! nothing else uses it: at start before anything is served, after an
//! offline import, and in `emis-edge compact` on a stopped node.

use std::path::Path;
use std::sync::{Arc, Mutex};

use redb::ReadableTableMetadata;
use serde::{Deserialize, Serialize};

use super::{Result, Store, StoreError};
use crate::domain::Timestamp;

/// How often the node measures the space (the `space` worker).
pub const SPACE_EVERY: std::time::Duration = std::time::Duration::from_secs(15 * 60);

/// One table's share of the file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct TableSpace {
    pub name: String,
    pub entries: u64,
    /// Keys and values as stored: the data itself.
    pub stored_bytes: u64,
    /// The B-tree's own bytes: keys in branch pages, offsets and headers.
    pub metadata_bytes: u64,
    /// The unused part of the table's pages.
    pub fragmented_bytes: u64,
    pub leaf_pages: u64,
    pub branch_pages: u64,
}

impl TableSpace {
    /// The bytes of the table's pages.
    pub fn page_bytes(&self) -> u64 {
        self.stored_bytes + self.metadata_bytes + self.fragmented_bytes
    }
}

/// Where the bytes of the store file go.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StoreSpace {
    /// Every table, largest first.
    pub tables: Vec<TableSpace>,
    /// The file's length (`None` in memory). redb files are sparse: the
    /// length counts regions it has not written yet.
    pub file_len: Option<u64>,
    /// The blocks the file occupies on disk (`None` in memory).
    pub file_allocated: Option<u64>,
    /// The tables' keys and values: the data.
    pub live_bytes: u64,
    /// The bytes of the tables' pages (data, B-tree overhead, unused part
    /// of the pages).
    pub table_bytes: u64,
    /// The share of the file (by length) that no table uses: free pages
    /// and unfilled regions, what a compaction can give back (minus redb's
    /// own bookkeeping). 0.0–1.0; `None` in memory.
    pub free_share: Option<f64>,
    /// When it was measured.
    pub measured_at: Timestamp,
}

/// The file's length and allocated bytes.
fn file_sizes(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.len(), meta.blocks() * 512))
}

/// The allocated (not apparent) size of a file: what it takes on disk.
pub fn allocated_bytes(path: &Path) -> Option<u64> {
    file_sizes(path).map(|(_, allocated)| allocated)
}

/// What [`Store::compact`] did.
#[derive(Clone, Debug, PartialEq)]
pub struct CompactReport {
    pub before: StoreSpace,
    pub after: StoreSpace,
}

/// The last measurement, for readers that must not walk the file.
#[derive(Default)]
pub(super) struct SpaceCache(Mutex<Option<Arc<StoreSpace>>>);

impl Store {
    /// Measures where the bytes of the file go: every table's B-tree is
    /// walked (every page read), so this costs about a read of the whole
    /// file; the result is also kept for [`Store::space`].
    pub fn measure_space(&self, now: Timestamp) -> Result<StoreSpace> {
        let reader = self.read()?;
        let mut tables = Vec::new();
        for handle in reader.txn.list_tables()? {
            let name = redb::TableHandle::name(&handle).to_owned();
            let table = reader.txn.open_untyped_table(handle)?;
            let stats = table.stats()?;
            tables.push(TableSpace {
                name,
                entries: table.len()?,
                stored_bytes: stats.stored_bytes(),
                metadata_bytes: stats.metadata_bytes(),
                fragmented_bytes: stats.fragmented_bytes(),
                leaf_pages: stats.leaf_pages(),
                branch_pages: stats.branch_pages(),
            });
        }
        drop(reader);
        tables.sort_by(|a, b| {
            b.page_bytes()
                .cmp(&a.page_bytes())
                .then(a.name.cmp(&b.name))
        });
        let live_bytes = tables.iter().map(|t| t.stored_bytes).sum();
        let table_bytes = tables.iter().map(TableSpace::page_bytes).sum();
        let sizes = self.file.as_ref().and_then(|(path, _)| file_sizes(path));
        let space = StoreSpace {
            tables,
            file_len: sizes.map(|s| s.0),
            file_allocated: sizes.map(|s| s.1),
            live_bytes,
            table_bytes,
            measured_at: now,
            free_share: sizes.map(|(len, _)| {
                if len == 0 {
                    0.0
                } else {
                    (1.0 - table_bytes as f64 / len as f64).clamp(0.0, 1.0)
                }
            }),
        };
        *self.space.0.lock().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(space.clone()));
        Ok(space)
    }

    /// The bytes redb's page cache and write buffer hold now (bounded by
    /// `store.cache_mb`), in a build with the `cache-metrics` feature;
    /// `None` while the store is being reopened.
    #[cfg(feature = "cache-metrics")]
    pub fn cache_bytes(&self) -> Option<u64> {
        use redb::ReadableDatabase;
        let handle = self.reader_db(std::time::Duration::ZERO).ok()?;
        Some(handle.db.cache_stats().used_bytes() as u64)
    }

    /// The last [`Store::measure_space`], if any: free to read.
    pub fn space(&self) -> Option<Arc<StoreSpace>> {
        self.space
            .0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Gives the file's free pages back to the file system (redb's
    /// `Database::compact`, repeated while it finds more to do), and
    /// measures the space before and after. It needs the store to itself:
    /// with a read transaction or another user of the handle alive it
    /// fails with [`StoreError::Busy`] and changes nothing.
    pub fn compact(&self, now: Timestamp) -> Result<CompactReport> {
        let before = self.measure_space(now)?;
        self.with_exclusive_db(|db| {
            while db.compact().map_err(|e| match e {
                redb::CompactionError::TransactionInProgress
                | redb::CompactionError::EphemeralSavepointExists
                | redb::CompactionError::PersistentSavepointExists => {
                    StoreError::Busy(format!("cannot compact while the store is in use ({e})"))
                }
                other => StoreError::Db(other.into()),
            })? {}
            Ok(())
        })?;
        let after = self.measure_space(now)?;
        Ok(CompactReport { before, after })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_bytes_add_up() {
        let t = TableSpace {
            name: "t".into(),
            entries: 1,
            stored_bytes: 10,
            metadata_bytes: 20,
            fragmented_bytes: 4066,
            leaf_pages: 1,
            branch_pages: 0,
        };
        assert_eq!(t.page_bytes(), 4096);
    }
}

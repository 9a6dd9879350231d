//! Store upkeep that no change waits for, as four workers: rendering the
//! teacher documents that changes queued (so that a lookup is one read),
//! purging tombstones past `store.tombstone_retention` and dead letters
//! past `store.dead_letter_retention`, computing the per-school freshness
//! that `/metrics` shows, and measuring where the store file's bytes go
//! (for status and metrics).
//!
//! None is on the path of a change or a read: a queued teacher's
//! document is assembled on the fly by a lookup meanwhile, a tombstone
//! kept longer harms nothing but space, and a scrape reads the freshness
//! last computed.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::state::NodeState;
use crate::worker::{blocking, Backoff, Next, Worker};

/// Renders queued teacher documents (`Store::materialize`) in chunks.
/// While the consumer is far behind (catching up after an outage), it
/// waits: redb has one writer at a time, and catching up comes first.
pub struct Renderer {
    state: NodeState,
}

impl Renderer {
    /// Small: redb has one writer, and a chunk holds it for ~50 µs a
    /// document, so a large one would delay the next batch of events.
    const CHUNK: usize = 250;
    /// Kafka messages behind beyond which rendering waits.
    const DEFER_WHILE_BEHIND: i64 = 10_000;

    pub fn new(state: NodeState) -> Renderer {
        Renderer { state }
    }
}

impl Worker for Renderer {
    fn name(&self) -> &'static str {
        "documents"
    }

    /// Slower than the default: a failing write reopens the store file,
    /// and nothing waits for documents (lookups assemble them meanwhile),
    /// so rendering gives way to the ingest worker's retries.
    fn backoff(&self) -> Backoff {
        Backoff {
            min: Duration::from_secs(5),
            max: Duration::from_secs(60),
        }
    }

    async fn step(&mut self, _stop: &CancellationToken) -> anyhow::Result<Next> {
        if self.state.kafka_backlog() > Self::DEFER_WHILE_BEHIND {
            return Ok(Next::After(Duration::from_millis(500)));
        }
        let (store, now) = (self.state.store.clone(), self.state.clock.now());
        let rendered = blocking(move || store.materialize(Self::CHUNK, now)).await?;
        Ok(if rendered == Self::CHUNK {
            // More may wait: go on after letting other writers in.
            Next::After(Duration::from_millis(5))
        } else {
            Next::After(Duration::from_millis(200))
        })
    }
}

/// Purges tombstones past `store.tombstone_retention` and dead letters past
/// `store.dead_letter_retention` (or beyond `store.dead_letter_max_count`,
/// after that limit was lowered), hourly.
pub struct Purger {
    state: NodeState,
}

impl Purger {
    const EVERY: Duration = Duration::from_secs(3600);

    pub fn new(state: NodeState) -> Purger {
        Purger { state }
    }
}

impl Worker for Purger {
    fn name(&self) -> &'static str {
        "purge"
    }

    async fn step(&mut self, _stop: &CancellationToken) -> anyhow::Result<Next> {
        let nanos = |d: Duration| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX);
        let config = &self.state.config.store;
        let tombstones = nanos(config.tombstone_retention);
        let letters = nanos(config.dead_letter_retention);
        let (store, now) = (self.state.store.clone(), self.state.clock.now());
        let (purged, dropped) = blocking(move || {
            anyhow::Ok((
                store.purge_tombstones(now, tombstones)?,
                store.purge_dead_letters(now, letters)?,
            ))
        })
        .await?;
        if purged > 0 {
            tracing::info!(purged, "expired tombstones purged");
        }
        if dropped > 0 {
            tracing::info!(dropped, "dead letters past their retention dropped");
        }
        Ok(Next::After(Self::EVERY))
    }
}

/// Measures where the store file's bytes go (`Store::measure_space`: a
/// walk of every table, about a read of the whole file) every
/// [`crate::store::SPACE_EVERY`] (a minute after start if the start did
/// not measure it), so that status and
/// `/metrics` show file size, live bytes and free share without walking
/// the file themselves.
pub struct SpaceMeter {
    state: NodeState,
    first: bool,
}

impl SpaceMeter {
    /// Not at once: a node starting catches up first.
    const FIRST_AFTER: Duration = Duration::from_secs(60);

    pub fn new(state: NodeState) -> SpaceMeter {
        SpaceMeter { state, first: true }
    }
}

impl Worker for SpaceMeter {
    fn name(&self) -> &'static str {
        "space"
    }

    async fn step(&mut self, _stop: &CancellationToken) -> anyhow::Result<Next> {
        if std::mem::take(&mut self.first) {
            // Measured at start already when the node considered compacting.
            return Ok(Next::After(match self.state.store.space() {
                Some(_) => crate::store::SPACE_EVERY,
                None => Self::FIRST_AFTER,
            }));
        }
        let (store, now) = (self.state.store.clone(), self.state.clock.now());
        let space = blocking(move || store.measure_space(now)).await?;
        tracing::debug!(
            live_bytes = space.live_bytes,
            file_allocated = ?space.file_allocated,
            free_share = ?space.free_share,
            "store space measured"
        );
        Ok(Next::After(crate::store::SPACE_EVERY))
    }
}

/// Computes each served school's oldest `lastSyncedAt`
/// (`emis_edge_school_oldest_synced_timestamp_seconds`) every
/// [`Freshness::EVERY`] (and, while there is no data, at the first
/// commit): a walk over every live record, done here on the blocking pool
/// so that a scrape only reads the last result.
pub struct Freshness {
    state: NodeState,
    /// Commits of the store: a node that had no data yet computes again
    /// at its first change instead of at the next period.
    commits: tokio::sync::watch::Receiver<u64>,
}

impl Freshness {
    pub const EVERY: Duration = Duration::from_secs(300);
    /// How long it waits for a store being reopened.
    const STORE_WAIT: Duration = Duration::from_secs(5);

    pub fn new(state: NodeState) -> Freshness {
        let commits = state.store.subscribe();
        Freshness { state, commits }
    }
}

impl Worker for Freshness {
    fn name(&self) -> &'static str {
        "freshness"
    }

    async fn step(&mut self, _stop: &CancellationToken) -> anyhow::Result<Next> {
        self.commits.borrow_and_update();
        let state = self.state.clone();
        let value = blocking(move || {
            let schools = state.schools_to_sync(Vec::new())?;
            state
                .store
                .read_with(Self::STORE_WAIT, |r| r.oldest_synced(&schools))
        })
        .await?;
        let empty = value.is_empty();
        self.state.metrics.school_freshness.set(value);
        Ok(if empty {
            Next::Idle
        } else {
            Next::After(Self::EVERY)
        })
    }

    /// With nothing computed yet (no data): the first commit, or the
    /// period, whichever comes first.
    async fn wait_for_work(&mut self) {
        tokio::select! {
            _ = self.commits.changed() => {}
            _ = tokio::time::sleep(Self::EVERY) => {}
        }
    }
}

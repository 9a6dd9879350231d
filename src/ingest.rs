//! Kafka ingestion: one worker thread that reads every partition of every
//! configured topic and applies what it reads in batches, each batch with
//! its consumed offsets in ONE store transaction (contract §2, "Delivery
//! guarantee").
//!
//! Partitions are assigned manually (every node needs every partition; a
//! consumer group would split them between nodes sharing a group id) and
//! positioned at the offsets stored in redb — the store, not Kafka, is the
//! source of truth for where to resume. Offsets are committed to Kafka only
//! afterwards and only so that standard tooling shows the node's lag.
//!
//! An event stamped more than `ingest.max_future_skew` after its Kafka
//! record's own timestamp is dead-lettered (contract §2, "Time"): the
//! record's timestamp is set by the producer or the broker, never by this
//! server, whose clock may be wrong by days.
//!
//! The worker never stops on bad input (dead letters) or on an unreachable
//! broker (librdkafka reconnects; status reports it). A failing store write
//! fails the step: the worker backs off and applies the same batch again,
//! never advancing the offsets past what was committed.
//!
//! librdkafka's consumer blocks, so each step runs on tokio's blocking
//! pool, taking the consumer along and handing it back.
//!
//! One piece on purpose (a little over the usual size): positioning,
//! out-of-range handling, batching and dead-lettering share the one
//! consumer and the offsets map, and split apart they would pass both
//! around.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::statistics::Statistics;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tokio_util::sync::CancellationToken;

use crate::config::SchoolFilter;
use crate::domain::{format_timestamp, Event, EventType, FutureSkew, SyncSource, Timestamp};
use crate::state::NodeState;
use crate::store::{Batch, DeadLetter, PartitionOffset, StoreError};
use crate::worker::{Next, Worker};

/// How often partition metadata is re-read to pick up new partitions and
/// topics created after start.
const METADATA_REFRESH: Duration = Duration::from_secs(60);
/// The poll timeout while idle: the longest the worker takes to notice a stop.
const IDLE_POLL: Duration = Duration::from_millis(100);
/// A batch closes early once its dead letters hold this many bytes of raw
/// payload, so a flood of large bad records (each kept up to
/// `DEAD_LETTER_MAX_RAW`) cannot make one batch, and its transaction, huge.
pub const BATCH_MAX_DEAD_LETTER_BYTES: usize = 16 * 1024 * 1024;
/// A batch takes as many messages as the last one's cost per message says
/// can be applied in this time (up to `kafka.batch_max_messages`): a stop
/// waits for the batch in hand, and the document worker, a resync or an
/// import wait for its write, so a catching-up node on a slow disk or a
/// large store keeps its batches short, and one on a fast disk makes them
/// big.
const BATCH_APPLY_BUDGET: Duration = Duration::from_secs(2);
/// The first batch after start, before any apply was timed.
const FIRST_BATCH: usize = 10_000;
/// No budget makes a batch smaller than this.
const MIN_BATCH: usize = 1_000;

/// Receives librdkafka's statistics and errors and turns them into the
/// node's sync status.
struct IngestContext {
    state: NodeState,
}

impl ClientContext for IngestContext {
    fn stats(&self, stats: Statistics) {
        let now = self.state.clock.now();
        let up = stats
            .brokers
            .values()
            .any(|b| b.nodeid >= 0 && b.state == "UP");
        let mut hw = Vec::new();
        for (topic, t) in &stats.topics {
            for (partition, p) in &t.partitions {
                if *partition >= 0 && p.hi_offset >= 0 {
                    hw.push(((topic.clone(), *partition), p.hi_offset));
                }
            }
        }
        self.state.sync.update(|s| {
            s.kafka_connected = up;
            if up {
                s.kafka_contact_at = Some(now);
                s.kafka_error = None;
            }
            s.high_watermarks.extend(hw);
        });
    }

    fn error(&self, error: KafkaError, reason: &str) {
        tracing::warn!(%error, reason, "kafka client error");
        let text = format!("{error}: {reason}");
        self.state.sync.update(|s| {
            if matches!(
                error.rdkafka_error_code(),
                Some(rdkafka::types::RDKafkaErrorCode::AllBrokersDown)
            ) {
                s.kafka_connected = false;
            }
            s.kafka_error = Some(text);
        });
    }
}

impl ConsumerContext for IngestContext {}

type IngestConsumer = BaseConsumer<IngestContext>;

/// What [`Reader::handle`] needs of one polled Kafka record.
struct Record<'m> {
    topic: &'m str,
    partition: i32,
    offset: i64,
    payload: Option<&'m [u8]>,
    /// The record's own timestamp (producer or broker), ms since the epoch.
    timestamp_ms: Option<i64>,
}

/// The Kafka ingest worker (see the module header).
pub struct Ingest {
    state: NodeState,
    /// The consumer and what goes with it; `None` until created, and while
    /// a step has it on the blocking pool.
    consumer: Option<Box<Reader>>,
}

impl Ingest {
    pub fn new(state: NodeState) -> Ingest {
        Ingest {
            state,
            consumer: None,
        }
    }
}

impl Worker for Ingest {
    fn name(&self) -> &'static str {
        "ingest"
    }

    fn watched(&self) -> bool {
        true
    }

    async fn step(&mut self, stop: &CancellationToken) -> anyhow::Result<Next> {
        let mut consumer = match self.consumer.take() {
            Some(c) => c,
            None => Box::new(Reader::create(self.state.clone())?),
        };
        let stop = stop.clone();
        let (consumer, result) = crate::worker::blocking(move || {
            let result = consumer.step(&stop);
            (consumer, result)
        })
        .await;
        self.consumer = Some(consumer);
        result
    }
}

/// The consumer, the partitions it reads and the batch in flight.
struct Reader {
    state: NodeState,
    consumer: IngestConsumer,
    topics: HashMap<String, EventType>,
    filter: SchoolFilter,
    max_future_skew: FutureSkew,
    /// Partitions being read: (topic, partition) → next offset.
    assigned: BTreeMap<(String, i32), i64>,
    /// The high watermarks seen at start; readiness waits for them.
    catch_up: Option<BTreeMap<(String, i32), i64>>,
    /// When partition metadata was last read.
    refreshed: Option<Instant>,
    /// A batch whose commit failed: applied again before anything new is read.
    pending: Option<Batch>,
    /// The partition and offset of each change of the batch in flight (in
    /// `Batch::changes` order), for the dead letter of a change the store
    /// refuses.
    origins: Vec<(i32, i64)>,
    /// … and of each foreign change (in `Batch::foreign` order).
    foreign_origins: Vec<(i32, i64)>,
    /// librdkafka reported a partition's position outside its log and
    /// stopped fetching it: every partition is checked and assigned again
    /// once the batch in hand is committed.
    reposition: bool,
    /// The test hook `Faults::pause_ingest` has paused fetching.
    #[cfg(feature = "fault-injection")]
    paused: bool,
    limit: BatchLimit,
    max_wait: Duration,
}

/// How many messages the next batch may take (see [`BATCH_APPLY_BUDGET`]).
#[derive(Debug)]
struct BatchLimit {
    /// `kafka.batch_max_messages`.
    max: usize,
    next: usize,
}

impl BatchLimit {
    fn new(max: usize) -> BatchLimit {
        BatchLimit {
            max,
            next: max.min(FIRST_BATCH),
        }
    }

    /// A batch of `messages` took `took` to apply. A small batch's fixed
    /// cost (the commit's wait for the disk) makes its cost per message an
    /// overestimate, so the limit grows over a few batches, never past
    /// what the last one's cost allows.
    fn observe(&mut self, messages: usize, took: Duration) {
        if messages == 0 {
            return;
        }
        let fits = BATCH_APPLY_BUDGET.as_nanos() * messages as u128 / took.as_nanos().max(1);
        let fits = usize::try_from(fits).unwrap_or(usize::MAX);
        self.next = fits.clamp(MIN_BATCH.min(self.max), self.max);
    }
}

impl Reader {
    fn create(state: NodeState) -> anyhow::Result<Reader> {
        let config = state.config.clone();
        let mut client = ClientConfig::new();
        client
            .set("bootstrap.servers", config.kafka.brokers.trim())
            .set("group.id", config.group_id())
            .set("client.id", format!("emis-edge-{}", config.node.id))
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            // A position outside the log is reported, not silently moved
            // (`earliest` would skip the lost events with no trace): the
            // worker counts it, records it, requests a resync and moves
            // the partition itself (`Reader::reposition`).
            .set("auto.offset.reset", "error")
            .set("enable.partition.eof", "false")
            .set("statistics.interval.ms", "1000")
            .set("topic.metadata.refresh.interval.ms", "60000")
            .set("reconnect.backoff.max.ms", "10000")
            // A broker may hold a fetch this long before answering (tansu
            // always does); it bounds event-to-visible latency at low rates.
            // 25 ms costs ~40 tiny idle requests/s per broker. Override in
            // [kafka.properties].
            .set("fetch.wait.max.ms", "25");
        for (k, v) in &config.kafka.properties {
            client.set(k, v);
        }
        // Bad [kafka.properties] end up here: the step fails, status shows
        // why, and reads go on.
        let consumer: IngestConsumer = client
            .create_with_context(IngestContext {
                state: state.clone(),
            })
            .map_err(|e| {
                let text = format!("consumer not created: {e}");
                state.sync.update(|s| s.kafka_error = Some(text.clone()));
                anyhow::anyhow!(text)
            })?;
        let topics = config
            .kafka
            .topics
            .all()
            .into_iter()
            .map(|(t, name)| (name.to_owned(), t))
            .collect();
        Ok(Reader {
            filter: config.school_filter(),
            max_future_skew: config.max_future_skew(),
            limit: BatchLimit::new(config.kafka.batch_max_messages),
            max_wait: Duration::from_millis(config.kafka.batch_max_wait_ms),
            state,
            consumer,
            topics,
            assigned: BTreeMap::new(),
            catch_up: None,
            refreshed: None,
            pending: None,
            origins: Vec::new(),
            foreign_origins: Vec::new(),
            reposition: false,
            #[cfg(feature = "fault-injection")]
            paused: false,
        })
    }

    /// One round: (re)read partition metadata when due, collect a batch (or
    /// take the one whose commit failed) and commit it.
    fn step(&mut self, stop: &CancellationToken) -> anyhow::Result<Next> {
        #[cfg(feature = "fault-injection")]
        self.injected_faults()?;
        match self.refreshed {
            None => {
                if let Err(e) = self.assign() {
                    self.state.sync.update(|s| {
                        s.kafka_connected = false;
                        s.kafka_error = Some(e.to_string());
                    });
                    return Err(e.context("broker unreachable; serving the store as it is"));
                }
                self.refreshed = Some(Instant::now());
            }
            Some(at) if at.elapsed() >= METADATA_REFRESH => {
                self.refreshed = Some(Instant::now());
                if let Err(e) = self.assign() {
                    tracing::debug!(error = %e, "metadata refresh failed");
                }
            }
            Some(_) => {}
        }
        let batch = match self.pending.take() {
            Some(batch) => batch,
            None => self.collect(stop),
        };
        if !batch.offsets.is_empty() {
            self.apply(batch)?;
        }
        if self.reposition {
            self.reposition()?;
            self.reposition = false;
        }
        self.check_caught_up();
        Ok(Next::Busy)
    }

    /// The test hooks of `NodeState::faults`.
    #[cfg(feature = "fault-injection")]
    fn injected_faults(&mut self) -> anyhow::Result<()> {
        use std::sync::atomic::Ordering::SeqCst;
        let faults = &self.state.faults;
        if faults.panic_ingest.swap(false, SeqCst) {
            panic!("injected panic in the ingest step (test hook)");
        }
        let pause = faults.pause_ingest.load(SeqCst);
        if pause != self.paused && self.refreshed.is_some() {
            let assignment = self.consumer.assignment()?;
            if pause {
                self.consumer.pause(&assignment)?;
            } else {
                self.consumer.resume(&assignment)?;
            }
            self.paused = pause;
            faults.ingest_paused.store(pause, SeqCst);
        }
        Ok(())
    }

    /// After librdkafka reported a position outside a partition's log
    /// (`auto.offset.reset=error`; it then stops fetching that partition):
    /// each assigned partition's position is checked against the broker's
    /// watermarks. One below the earliest offset lost events to retention
    /// while the node ran; one above the latest belongs to a recreated
    /// topic. Either is recorded (`out_of_range`: counted, kept in the
    /// store, a resync requested) and read from its earliest offset. Every
    /// partition is then assigned again at its position, so that none
    /// stays stopped. Runs after the batch in hand is committed, so the
    /// positions are the stored ones.
    fn reposition(&mut self) -> anyhow::Result<()> {
        let timeout = Duration::from_secs(5);
        let mut tpl = TopicPartitionList::new();
        let positions: Vec<((String, i32), i64)> =
            self.assigned.iter().map(|(k, &v)| (k.clone(), v)).collect();
        let mut moved = Vec::new();
        for ((topic, partition), next) in positions {
            let (low, high) = self.consumer.fetch_watermarks(&topic, partition, timeout)?;
            let offset = if next < low {
                self.out_of_range(
                    &topic,
                    partition,
                    format!("stored {next} < earliest {low}"),
                    "events were lost to retention while the node ran",
                );
                low
            } else if next > high {
                self.out_of_range(
                    &topic,
                    partition,
                    format!("stored {next} > latest {high}"),
                    "the topic was recreated or truncated",
                );
                low
            } else {
                next
            };
            if offset != next {
                moved.push(((topic.clone(), partition), offset));
            }
            tpl.add_partition_offset(&topic, partition, Offset::Offset(offset))?;
        }
        self.consumer.incremental_unassign(&tpl)?;
        self.consumer.incremental_assign(&tpl)?;
        self.assigned.extend(moved);
        tracing::info!(
            partitions = tpl.count(),
            "partitions assigned again after a position outside the log"
        );
        Ok(())
    }

    /// Assigns every partition of every configured topic not yet assigned,
    /// at the offset stored in redb, else the earliest.
    fn assign(&mut self) -> anyhow::Result<()> {
        let stored: HashMap<(String, i32), i64> = self
            .state
            .store
            .read()?
            .offsets()?
            .into_iter()
            .map(|o| ((o.topic, o.partition), o.next_offset))
            .collect();
        let timeout = Duration::from_secs(5);
        let mut added = TopicPartitionList::new();
        let mut targets = BTreeMap::new();
        let metadata = self.consumer.fetch_metadata(None, timeout)?;
        let mut topics: Vec<&String> = self.topics.keys().collect();
        topics.sort();
        let first = self.catch_up.is_none();
        let mut new_partitions = Vec::new();
        for topic in topics {
            let Some(t) = metadata.topics().iter().find(|t| t.name() == topic) else {
                if first {
                    tracing::warn!(
                        topic,
                        "topic does not exist yet; will look again every minute"
                    );
                }
                continue;
            };
            if let Some(err) = t.error() {
                if first {
                    tracing::warn!(topic, error = ?err, "topic not available yet; will look again every minute");
                }
                continue;
            }
            for p in t.partitions() {
                let key = (topic.clone(), p.id());
                if self.assigned.contains_key(&key) {
                    continue; // only new partitions cost a round trip
                }
                let (low, high) = self.consumer.fetch_watermarks(topic, p.id(), timeout)?;
                targets.insert(key.clone(), high);
                let offset = match stored.get(&key) {
                    Some(&next) if next < low => {
                        self.out_of_range(
                            topic,
                            p.id(),
                            format!("stored {next} < earliest {low}"),
                            "events were lost to retention",
                        );
                        Offset::Beginning
                    }
                    // The partition holds fewer messages than this node has
                    // already read: the topic was deleted and created again
                    // (or the log truncated). Its messages are new ones.
                    Some(&next) if next > high => {
                        self.out_of_range(
                            topic,
                            p.id(),
                            format!("stored {next} > latest {high}"),
                            "the topic was recreated or truncated",
                        );
                        Offset::Beginning
                    }
                    Some(&next) => Offset::Offset(next),
                    None => Offset::Beginning,
                };
                added.add_partition_offset(topic, p.id(), offset)?;
                let start = stored
                    .get(&key)
                    .copied()
                    .filter(|&next| next <= high)
                    .unwrap_or(low)
                    .max(low);
                new_partitions.push((key, start));
            }
        }
        if added.count() > 0 {
            self.consumer.incremental_assign(&added)?;
            // Recorded only once assigned: a failure above retries them all.
            self.assigned.extend(new_partitions);
            tracing::info!(
                added = added.count(),
                partitions = self.assigned.len(),
                "partitions assigned"
            );
        }
        if self.catch_up.is_none() {
            self.catch_up = Some(targets.clone());
        }
        self.state.sync.update(|s| {
            s.kafka_connected = true;
            s.kafka_contact_at = Some(self.state.clock.now());
            s.kafka_error = None;
            s.high_watermarks.extend(targets);
        });
        self.check_caught_up();
        Ok(())
    }

    /// The stored offset is outside what the partition holds: the node was
    /// away longer than the topic keeps messages, or the topic was
    /// recreated. What was in between is gone from Kafka and only a resync
    /// can repair it.
    fn out_of_range(&self, topic: &str, partition: i32, offsets: String, why: &str) {
        tracing::warn!(
            topic,
            partition,
            offsets = %offsets,
            "offset out of range: {why}; reading from the earliest and requesting a resync"
        );
        self.state
            .record_offset_out_of_range(format!("{topic}/{partition}: {offsets}"));
    }

    /// Polls until the batch is full (its [`BatchLimit`]), a stop, or
    /// `max_wait` after its first message, once no more messages are
    /// waiting in the client's queue.
    /// While the node is behind, messages are always waiting, so a backlog
    /// is read in full batches: a bigger transaction rewrites each B-tree
    /// page it touches once for more changes (catch-up ingest 1.5–1.8× faster
    /// than with batches cut at `max_wait`); a live stream still closes
    /// its batch after `max_wait`.
    fn collect(&mut self, stop: &CancellationToken) -> Batch {
        let mut batch = Batch::default();
        self.origins.clear();
        self.foreign_origins.clear();
        let mut next: BTreeMap<(String, i32), i64> = BTreeMap::new();
        let mut count = 0;
        let mut deadline: Option<Instant> = None;
        let mut dead_bytes = 0;
        let now = self.state.clock.now();
        while count < self.limit.next && !stop.is_cancelled() {
            let timeout =
                deadline.map_or(IDLE_POLL, |d| d.saturating_duration_since(Instant::now()));
            match self.consumer.poll(timeout) {
                Some(Ok(m)) => {
                    count += 1;
                    deadline.get_or_insert_with(|| Instant::now() + self.max_wait);
                    let topic = m.topic();
                    let (partition, offset) = (m.partition(), m.offset());
                    next.insert((topic.to_owned(), partition), offset + 1);
                    let (letters, changes, foreign) = (
                        batch.dead_letters.len(),
                        batch.changes.len(),
                        batch.foreign.len(),
                    );
                    let record = Record {
                        topic,
                        partition,
                        offset,
                        payload: m.payload(),
                        timestamp_ms: m.timestamp().to_millis(),
                    };
                    self.handle(record, now, &mut batch);
                    if batch.changes.len() > changes {
                        self.origins.push((partition, offset));
                    }
                    if batch.foreign.len() > foreign {
                        self.foreign_origins.push((partition, offset));
                    }
                    dead_bytes += batch.dead_letters[letters..]
                        .iter()
                        .map(|d| d.raw.len())
                        .sum::<usize>();
                }
                // A position outside a log: commit what was read, then
                // look at the positions.
                Some(Err(e)) if self.poll_error(&e) => {
                    self.reposition = true;
                    break;
                }
                // Hand back so the caller can check for a stop, refresh.
                Some(Err(_)) if deadline.is_none() => break,
                Some(Err(_)) => {}
                None if deadline.is_some_and(|d| Instant::now() < d) => {}
                // Full time for this batch and nothing more waiting, or
                // nothing arrived while idle.
                None => break,
            }
            if dead_bytes >= BATCH_MAX_DEAD_LETTER_BYTES {
                break;
            }
        }
        batch.offsets = next
            .into_iter()
            .map(|((topic, partition), next_offset)| PartitionOffset {
                topic,
                partition,
                next_offset,
            })
            .collect();
        batch
    }

    /// Logs a consumer error; true when it says a position fell outside a
    /// partition's log, which [`Reader::reposition`] handles.
    fn poll_error(&self, e: &KafkaError) -> bool {
        use rdkafka::types::RDKafkaErrorCode::{AutoOffsetReset, OffsetOutOfRange};
        tracing::warn!(error = %e, "poll error");
        matches!(
            e.rdkafka_error_code(),
            Some(AutoOffsetReset | OffsetOutOfRange)
        )
    }

    /// Decodes one record into the batch: a change, a change of a school
    /// not served (the store removes what it moved away, or skips it) or a
    /// dead letter.
    fn handle(&self, record: Record<'_>, now: Timestamp, batch: &mut Batch) {
        let Record {
            topic,
            partition,
            offset,
            payload,
            timestamp_ms,
        } = record;
        let raw = payload.unwrap_or_default();
        let parsed = match (self.topics.get(topic), payload) {
            (None, _) => Err(format!("topic {topic} is not configured")),
            (Some(_), None) => Err("null value (a Kafka tombstone; expected a JSON object)".into()),
            (Some(&t), Some(raw)) => Event::parse(t, raw)
                .map_err(|e| e.to_string())
                .and_then(|e| self.plausible(&e, timestamp_ms).map(|()| e)),
        };
        match parsed {
            Ok(e) if self.filter.serves(e.change.school_id()) => {
                batch.changes.push((e.key, e.change));
                batch.change_topics.push(topic.to_owned());
            }
            Ok(e) => {
                batch.foreign.push((e.key, e.change));
                batch.foreign_topics.push(topic.to_owned());
            }
            Err(reason) => {
                tracing::warn!(topic, partition, offset, %reason, "event dead-lettered");
                batch
                    .dead_letters
                    .push(DeadLetter::new(topic, partition, offset, raw, reason, now));
            }
        }
    }

    /// Contract §2 "Time": the event's `timestamp` may lie at most
    /// `ingest.max_future_skew` after its record's own timestamp. A record
    /// without one (message format v0, Kafka before 0.10) cannot vouch for
    /// the event, so it is refused too: accepting it unchecked is exactly
    /// how one bad timestamp wins forever, and every Kafka since 0.10
    /// stamps its records, so this refuses nothing on a current cluster and
    /// says plainly why on an old one.
    fn plausible(&self, event: &Event, record_ms: Option<i64>) -> Result<(), String> {
        let stamped = event.key.timestamp;
        let Some(ms) = record_ms else {
            return Err(format!(
                "field `timestamp`: {} cannot be checked against ingest.max_future_skew: the \
                 Kafka record carries no timestamp of its own",
                format_timestamp(stamped)
            ));
        };
        self.max_future_skew
            .check(
                "timestamp",
                stamped,
                ms.saturating_mul(1_000_000),
                "the Kafka record's timestamp",
            )
            .map_err(|e| e.to_string())
    }

    /// Commits the batch. When the store fails, the batch is kept for the
    /// next step (the store records the failure — status `store`,
    /// readiness, metrics — and has reopened its file if it was an I/O
    /// error) and the offsets do not move. A change the store can never
    /// apply is taken out as a dead letter and the rest committed at once.
    fn apply(&mut self, mut batch: Batch) -> anyhow::Result<()> {
        let now = self.state.clock.now();
        let started = Instant::now();
        let report = loop {
            match self.state.store.apply_batch(&batch, now, SyncSource::Kafka) {
                Ok(report) => break report,
                Err(StoreError::Refused { index, reason }) => {
                    self.quarantine(&mut batch, index, reason, now)
                }
                Err(e) => {
                    self.pending = Some(batch);
                    return Err(
                        anyhow::Error::from(e).context("store write failed; offsets not advanced")
                    );
                }
            }
        };
        tracing::debug!(
            applied = report.applied,
            stale = report.stale,
            "batch applied"
        );
        self.record(&batch, &report, started.elapsed());
        self.state.activity.record(
            now,
            batch
                .changes
                .iter()
                .zip(&report.outcomes)
                .filter(|(_, applied)| **applied)
                .map(|((_, change), _)| (change.school_id(), 1)),
        );
        let committed = self.state.clock.now();
        for (key, _) in &batch.changes {
            let seconds = crate::domain::seconds_between(key.timestamp, committed);
            self.state.metrics.sync_latency.observe(seconds);
        }
        self.state.sync.update(|s| {
            s.last_event_received_at = Some(now);
            for o in &batch.offsets {
                s.partition_last_event
                    .insert((o.topic.clone(), o.partition), now);
            }
        });
        let mut tpl = TopicPartitionList::new();
        for o in &batch.offsets {
            self.assigned
                .insert((o.topic.clone(), o.partition), o.next_offset);
            if let Err(e) =
                tpl.add_partition_offset(&o.topic, o.partition, Offset::Offset(o.next_offset))
            {
                tracing::debug!(error = %e, "offset not committable");
            }
        }
        if let Err(e) = self.consumer.commit(&tpl, CommitMode::Async) {
            tracing::debug!(error = %e, "offset commit to Kafka failed (lag display only)");
        }
        Ok(())
    }

    /// Takes change `index` out of the batch as a dead letter: the store
    /// can never apply it (`StoreError::Refused`: what it holds for that
    /// entity does not decode), and retrying the batch would stop its
    /// partitions for good. Its payload is the event as parsed, written
    /// again (the original bytes are not kept past parsing).
    fn quarantine(&mut self, batch: &mut Batch, index: usize, reason: String, now: Timestamp) {
        let ((key, change), topic, (partition, offset)) =
            match index.checked_sub(batch.changes.len()) {
                None => (
                    batch.changes.remove(index),
                    batch.change_topics.remove(index),
                    self.origins.remove(index),
                ),
                Some(i) => (
                    batch.foreign.remove(i),
                    batch.foreign_topics.remove(i),
                    self.foreign_origins.remove(i),
                ),
            };
        let raw = self
            .topics
            .get(&topic)
            .map_or_else(Vec::new, |&event_type| {
                Event {
                    event_type,
                    key,
                    change,
                }
                .to_json()
            });
        let reason = format!(
            "the store cannot apply this change: {reason}; the payload shown is the event as \
             parsed"
        );
        tracing::error!(topic, partition, offset, %reason, "event dead-lettered");
        batch.dead_letters.push(DeadLetter::new(
            &topic, partition, offset, &raw, reason, now,
        ));
    }

    /// Per-topic outcomes, batch size and commit time, for /metrics; the
    /// commit time also sizes the next batch.
    fn record(&mut self, batch: &Batch, report: &crate::store::ApplyReport, took: Duration) {
        let m = &self.state.metrics;
        m.commit_duration.observe(took.as_secs_f64());
        let messages = batch.changes.len() + batch.dead_letters.len() + batch.foreign.len();
        m.batch_size.observe(messages as f64);
        self.limit.observe(messages, took);
        let count = |topic: &str, outcome: &str| {
            m.topic_events
                .get_or_create(&crate::metrics::labels(&[
                    ("topic", topic),
                    ("outcome", outcome),
                ]))
                .inc();
        };
        for (topic, applied) in batch.change_topics.iter().zip(&report.outcomes) {
            count(topic, if *applied { "applied" } else { "stale" });
        }
        for (topic, out) in batch.foreign_topics.iter().zip(&report.foreign_outcomes) {
            count(topic, if *out { "transferred_out" } else { "skipped" });
        }
        for d in &batch.dead_letters {
            count(&d.topic, "dead_lettered");
        }
    }

    /// Marks the first sync done once every partition reached the high
    /// watermark seen at start.
    fn check_caught_up(&mut self) {
        let Some(targets) = &self.catch_up else {
            return;
        };
        if self.state.sync.get().first_sync_done {
            return;
        }
        let done = targets
            .iter()
            .all(|(k, &high)| self.assigned.get(k).is_some_and(|&next| next >= high));
        if done {
            tracing::info!("caught up with the high watermarks seen at start");
            self.state.sync.update(|s| s.first_sync_done = true);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_takes_what_the_last_one_says_fits_in_the_budget() {
        let mut limit = BatchLimit::new(100_000);
        assert_eq!(limit.next, FIRST_BATCH, "the first batch is untimed");
        // A live batch: 20 messages, 10 ms (mostly the disk's wait).
        limit.observe(20, Duration::from_millis(10));
        assert_eq!(limit.next, 4_000);
        // A backlog on a fast disk: the cost per message falls as batches grow.
        limit.observe(4_000, Duration::from_millis(60));
        assert_eq!(limit.next, 100_000, "never past kafka.batch_max_messages");
        // The store outgrew its cache: 100,000 took 8 s.
        limit.observe(100_000, Duration::from_secs(8));
        assert_eq!(limit.next, 25_000);
        // A very slow disk.
        limit.observe(25_000, Duration::from_secs(120));
        assert_eq!(limit.next, MIN_BATCH);
        // Nothing collected says nothing.
        limit.observe(0, Duration::from_secs(1));
        assert_eq!(limit.next, MIN_BATCH);
    }

    #[test]
    fn a_small_configured_batch_is_kept() {
        let mut limit = BatchLimit::new(500);
        assert_eq!(limit.next, 500);
        limit.observe(500, Duration::from_secs(30));
        assert_eq!(limit.next, 500, "the floor is never above the maximum");
        limit.observe(500, Duration::ZERO);
        assert_eq!(limit.next, 500);
    }
}

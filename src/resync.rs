//! Resync: repairs the replica from snapshots (contract §3), whatever an
//! event stream lost — and the offline import of snapshot files.
//!
//! A school's snapshot is streamed from `{resync.central_url}` (central, or
//! a provincial emis-edge node: every node serves the route), validated line
//! by line, and only once complete reconciled in one write transaction: all
//! or nothing per school. One worker schedules runs: every
//! `resync.interval_secs` with jitter, at start when the store is empty,
//! and when ingestion signals lost events (offset out of range).

use std::io::BufRead;
use std::ops::ControlFlow;
use std::time::Duration;

use futures::StreamExt;
use rand::Rng;
use serde::Serialize;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::config::{Config, SchoolFilter};
use crate::domain::snapshot::MAX_LINE_BYTES;
use crate::domain::{
    format_timestamp, FutureSkew, SchoolSnapshot, SnapshotReader, SyncSource, Timestamp,
};
use crate::state::NodeState;
use crate::status::ResyncOutcome;
use crate::store::{ReconcileReport, Store};
use crate::worker::{Backoff, Next, Worker};

/// At most this many schools are fetched at once.
pub const CONCURRENT_SCHOOLS: usize = 4;
/// An import commits validated schools together up to this many records.
pub const IMPORT_BATCH_RECORDS: usize = 500_000;
/// … and into an empty store hands them to the bulk load this many at a
/// time, which commits nothing until the end: small batches keep the
/// parser, at most [`PARSED_AHEAD`] schools ahead, parsing while they are
/// added. At 500,000 the two took turns, each waiting for the other.
pub const BULK_BATCH_RECORDS: usize = 50_000;
/// Schools the parsing thread of an import may be ahead of the writer.
const PARSED_AHEAD: usize = 64;
/// Retry after a failed run: from this, doubling, up to the interval.
const RETRY_MIN: Duration = Duration::from_secs(60);

/// One school's outcome in a run.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SchoolOutcome {
    pub school_id: Uuid,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub report: Option<ReconcileReport>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// A whole run.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RunReport {
    pub started_at: String,
    pub duration_ms: u128,
    pub dry_run: bool,
    pub schools: Vec<SchoolOutcome>,
}

impl RunReport {
    pub fn ok(&self) -> bool {
        self.schools.iter().all(|s| s.error.is_none())
    }

    pub fn summary(&self) -> String {
        let failed: Vec<String> = self
            .schools
            .iter()
            .filter_map(|s| s.error.as_ref().map(|e| format!("{}: {e}", s.school_id)))
            .collect();
        let (applied, deleted) = self
            .schools
            .iter()
            .filter_map(|s| s.report.as_ref())
            .fold((0, 0), |(a, d), r| (a + r.applied, d + r.deleted));
        let mut text = format!(
            "{} schools, {} failed, {applied} entities changed, {deleted} deleted",
            self.schools.len(),
            failed.len()
        );
        if !failed.is_empty() {
            text.push_str(" — ");
            text.push_str(&failed.join("; "));
        }
        text
    }
}

/// The client for `resync.central_url`, sending `resync.token_file`'s token.
pub fn http_client(config: &Config) -> anyhow::Result<reqwest::Client> {
    client_with(
        config.resync_token()?,
        Some(Duration::from_secs(config.resync.timeout_secs)),
    )
}

/// The client for a follower's parent (`upstream.url`), sending
/// `upstream.token_file`'s token. It has no overall time limit (a
/// long-poll is held by design); callers bound each wait themselves.
pub fn upstream_client(config: &Config) -> anyhow::Result<reqwest::Client> {
    client_with(config.upstream_token()?, None)
}

/// Where a resync reads snapshots from, with the client for it:
/// `resync.central_url`, else a follower's parent (`upstream.url`, which
/// serves the snapshot route too); `None` when neither is set.
pub fn source(config: &Config) -> anyhow::Result<Option<(String, reqwest::Client)>> {
    let timeout = Some(Duration::from_secs(config.resync.timeout_secs));
    Ok(match (&config.resync.central_url, &config.upstream.url) {
        (Some(url), _) => Some((url.clone(), http_client(config)?)),
        (None, Some(url)) => Some((url.clone(), client_with(config.upstream_token()?, timeout)?)),
        (None, None) => None,
    })
}

fn client_with(
    token: Option<String>,
    timeout: Option<Duration>,
) -> anyhow::Result<reqwest::Client> {
    let mut headers = reqwest::header::HeaderMap::new();
    if let Some(token) = token {
        let mut value = reqwest::header::HeaderValue::from_str(&format!("Bearer {token}"))?;
        value.set_sensitive(true);
        headers.insert(reqwest::header::AUTHORIZATION, value);
    }
    let mut builder = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(10))
        .default_headers(headers);
    if let Some(timeout) = timeout {
        builder = builder.timeout(timeout);
    }
    Ok(builder.build()?)
}

/// Fetches and validates one school's snapshot; nothing is applied. A
/// record stamped more than `max_future_skew` after the snapshot's `asOf`
/// fails it (contract §2, "Time").
pub async fn fetch(
    client: &reqwest::Client,
    base: &str,
    school: Uuid,
    max_future_skew: FutureSkew,
) -> anyhow::Result<SchoolSnapshot> {
    fetch_counted(client, base, school, max_future_skew, |_| {}).await
}

/// [`fetch`], telling `received` the size of each chunk of the answer as
/// it came over the network (compressed, when it was). The answer is
/// asked for gzip-compressed (contract §6); a server that does not
/// compress is read as is.
pub async fn fetch_counted(
    client: &reqwest::Client,
    base: &str,
    school: Uuid,
    max_future_skew: FutureSkew,
    mut received: impl FnMut(usize),
) -> anyhow::Result<SchoolSnapshot> {
    let url = format!(
        "{}/api/schools/{school}/snapshot",
        base.trim_end_matches('/')
    );
    let response = client
        .get(&url)
        .header(reqwest::header::ACCEPT_ENCODING, "gzip")
        .send()
        .await?;
    anyhow::ensure!(
        response.status().is_success(),
        "{url} answered {}",
        response.status()
    );
    let mut decoder =
        Decoder::for_response(&response).map_err(|e| anyhow::anyhow!("{url}: {e}"))?;
    let mut reader = SnapshotReader::with_max_future_skew(max_future_skew);
    let mut found: Option<Result<SchoolSnapshot, _>> = None;
    let mut pending = Vec::new();
    let mut body = response.bytes_stream();
    let mut take_lines = |pending: &mut Vec<u8>| -> anyhow::Result<()> {
        while let Some(pos) = pending.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = pending.drain(..=pos).collect();
            if let Some(result) = reader.feed(&line[..line.len() - 1]) {
                anyhow::ensure!(found.is_none(), "{url}: more than one school in the answer");
                found = Some(result);
            }
        }
        anyhow::ensure!(
            pending.len() <= MAX_LINE_BYTES,
            "{url}: line {} is longer than {MAX_LINE_BYTES} bytes",
            reader.lines() + 1
        );
        Ok(())
    };
    while let Some(chunk) = body.next().await {
        let chunk = chunk?;
        received(chunk.len());
        decoder
            .push(&chunk, &mut pending)
            .map_err(|e| anyhow::anyhow!("{url}: {e}"))?;
        take_lines(&mut pending)?;
    }
    decoder
        .finish(&mut pending)
        .map_err(|e| anyhow::anyhow!("{url}: {e}"))?;
    take_lines(&mut pending)?;
    if !pending.is_empty() {
        if let Some(result) = reader.feed(&pending) {
            found = Some(result);
        }
    }
    if let Some(e) = reader.finish() {
        anyhow::bail!("{url}: snapshot rejected: {e}");
    }
    let snapshot = found
        .ok_or_else(|| anyhow::anyhow!("{url}: empty answer (no end line)"))?
        .map_err(|e| anyhow::anyhow!("{url}: snapshot rejected: {e}"))?;
    anyhow::ensure!(
        snapshot.school_id == school,
        "{url}: snapshot of school {}",
        snapshot.school_id
    );
    Ok(snapshot)
}

/// Decodes an HTTP answer's body as it arrives: gunzips it when the
/// server sent it gzip-compressed (`Content-Encoding: gzip`), else passes
/// it through.
pub struct Decoder(Option<flate2::write::GzDecoder<Vec<u8>>>);

impl Decoder {
    /// The decoder for `response`'s `Content-Encoding`; another encoding
    /// than gzip or none is an error.
    pub fn for_response(response: &reqwest::Response) -> Result<Decoder, String> {
        match response
            .headers()
            .get(reqwest::header::CONTENT_ENCODING)
            .map(|v| v.to_str().unwrap_or("?").trim().to_ascii_lowercase())
            .as_deref()
        {
            None | Some("identity") => Ok(Decoder(None)),
            Some("gzip") => Ok(Decoder::gzip()),
            Some(other) => Err(format!(
                "the answer is encoded as {other:?}, which this node does not read"
            )),
        }
    }

    /// A decoder of a gzip stream.
    pub fn gzip() -> Decoder {
        Decoder(Some(flate2::write::GzDecoder::new(Vec::new())))
    }

    /// Appends what `chunk` decodes to onto `out`.
    pub fn push(&mut self, chunk: &[u8], out: &mut Vec<u8>) -> Result<(), String> {
        use std::io::Write;
        match &mut self.0 {
            None => out.extend_from_slice(chunk),
            Some(gz) => {
                gz.write_all(chunk)
                    .map_err(|e| format!("the gzip stream is damaged: {e}"))?;
                out.append(gz.get_mut());
            }
        }
        Ok(())
    }

    /// At the end of the body: appends the rest; fails if a gzip stream
    /// was cut short.
    pub fn finish(self, out: &mut Vec<u8>) -> Result<(), String> {
        if let Some(gz) = self.0 {
            let rest = gz
                .finish()
                .map_err(|e| format!("the gzip stream ends early: {e}"))?;
            out.extend_from_slice(&rest);
        }
        Ok(())
    }
}

/// One resync run over `schools` from `base`, at most
/// [`CONCURRENT_SCHOOLS`] at a time. A failed school does not stop the
/// others.
pub async fn run(
    store: &std::sync::Arc<Store>,
    client: &reqwest::Client,
    base: &str,
    schools: Vec<Uuid>,
    max_future_skew: FutureSkew,
    now: impl Fn() -> Timestamp,
    dry_run: bool,
) -> RunReport {
    let started = std::time::Instant::now();
    let started_at = format_timestamp(now());
    let now = &now;
    let outcomes = futures::stream::iter(schools)
        .map(|school| async move {
            let result = match fetch(client, base, school, max_future_skew).await {
                Ok(snapshot) => {
                    let store = store.clone();
                    let t = now();
                    tokio::task::spawn_blocking(move || {
                        store.reconcile(&snapshot, t, SyncSource::Resync, dry_run)
                    })
                    .await
                    .map_err(anyhow::Error::from)
                    .and_then(|r| r.map_err(anyhow::Error::from))
                }
                Err(e) => Err(e),
            };
            match result {
                Ok(report) => SchoolOutcome {
                    school_id: school,
                    report: Some(report),
                    error: None,
                },
                Err(e) => SchoolOutcome {
                    school_id: school,
                    report: None,
                    error: Some(format!("{e:#}")),
                },
            }
        })
        .buffer_unordered(CONCURRENT_SCHOOLS)
        .collect::<Vec<_>>()
        .await;
    let mut schools = outcomes;
    schools.sort_by_key(|s| s.school_id);
    RunReport {
        started_at,
        duration_ms: started.elapsed().as_millis(),
        dry_run,
        schools,
    }
}

/// Runs a resync for the node and records it in status and the log.
pub async fn run_for_node(
    state: &NodeState,
    only: Option<Vec<Uuid>>,
    dry_run: bool,
) -> anyhow::Result<RunReport> {
    let (base, client) = source(&state.config)?
        .ok_or_else(|| anyhow::anyhow!("resync.central_url is not set (nor upstream.url)"))?;
    let schools = state.schools_to_sync(only.unwrap_or_default())?;
    anyhow::ensure!(
        !schools.is_empty(),
        "no school to resync: with schools.all the node resyncs the schools its store knows, \
         and it knows none yet; import a file or set schools.ids"
    );
    let clock = state.clock.clone();
    let report = run(
        &state.store,
        &client,
        &base,
        schools,
        state.config.max_future_skew(),
        || clock.now(),
        dry_run,
    )
    .await;
    for s in &report.schools {
        match (&s.report, &s.error) {
            (Some(r), _) => tracing::info!(
                school = %s.school_id, applied = r.applied, deleted = r.deleted, dry_run,
                drift = %serde_json::to_string(&r.drift).unwrap_or_default(), "school resynced"
            ),
            (_, Some(e)) => {
                tracing::warn!(school = %s.school_id, error = %e, "school resync failed")
            }
            _ => {}
        }
    }
    let m = &state.metrics;
    m.resync_duration
        .observe(report.duration_ms as f64 / 1000.0);
    for school in &report.schools {
        let outcome = if school.error.is_none() {
            "ok"
        } else {
            "failed"
        };
        m.resync_schools
            .get_or_create(&crate::metrics::labels(&[("outcome", outcome)]))
            .inc();
        for (kind, d) in school.report.iter().flat_map(|r| r.drift.iter()) {
            for (category, n) in [
                ("missing", d.missing),
                ("extra", d.extra),
                ("older", d.older),
                ("newer", d.newer),
            ] {
                m.resync_drift
                    .get_or_create(&crate::metrics::labels(&[
                        ("kind", kind),
                        ("category", category),
                    ]))
                    .inc_by(n);
            }
        }
    }
    if !dry_run {
        state
            .activity
            .record(state.clock.now(), changed_schools(&report.schools));
        let ok = report.ok();
        let outcome = ResyncOutcome {
            at: state.clock.now(),
            ok,
            detail: report.summary(),
        };
        record(state, outcome).await;
    }
    tracing::info!(dry_run, summary = %report.summary(), ms = report.duration_ms, "resync run finished");
    Ok(report)
}

/// Changes a resync or import applied per school (records applied and
/// entities deleted), for `NodeState::activity`.
pub fn changed_schools(outcomes: &[SchoolOutcome]) -> impl Iterator<Item = (Uuid, u64)> + '_ {
    outcomes
        .iter()
        .filter_map(|o| o.report.as_ref())
        .map(|r| (r.school_id, r.applied + r.deleted))
}

/// Records a run's outcome in status and in the store (a restart shows it),
/// on the blocking pool: the store write may wait for the writer.
async fn record(state: &NodeState, outcome: ResyncOutcome) {
    let state = state.clone();
    if let Err(e) = tokio::task::spawn_blocking(move || state.record_resync(outcome)).await {
        tracing::error!(error = %e, "recording the resync outcome failed");
    }
}

/// The worker that schedules resync runs: every `resync.interval_secs`
/// (±10 %), at once when the store is empty, and when ingestion asks
/// (`NodeState::resync_wanted`: events lost to retention). A failed run
/// is retried with the worker backoff, from a minute up to the interval.
pub struct Scheduler {
    state: NodeState,
    interval: Duration,
    /// When the next run is due; `None`: now.
    due: Option<tokio::time::Instant>,
}

impl Scheduler {
    pub fn new(state: NodeState) -> Scheduler {
        let interval = Duration::from_secs(state.config.resync.interval_secs);
        let empty = state
            .store
            .read()
            .and_then(|r| r.has_data())
            .map(|d| !d)
            .unwrap_or(false);
        let due = (!empty).then(|| tokio::time::Instant::now() + jittered(interval));
        Scheduler {
            state,
            interval,
            due,
        }
    }
}

fn jittered(d: Duration) -> Duration {
    d.mul_f64(rand::thread_rng().gen_range(0.9..1.1))
}

impl Worker for Scheduler {
    fn name(&self) -> &'static str {
        "resync"
    }

    fn backoff(&self) -> Backoff {
        Backoff {
            min: RETRY_MIN,
            max: self.interval.max(RETRY_MIN),
        }
    }

    async fn step(&mut self, stop: &CancellationToken) -> anyhow::Result<Next> {
        if self.due.is_some() {
            return Ok(Next::Idle);
        }
        let state = &self.state;
        let outcome = tokio::select! {
            // The download is dropped; nothing half-applied.
            _ = stop.cancelled() => return Ok(Next::Idle),
            outcome = run_for_node(state, None, state.config.resync.dry_run) => outcome,
        };
        match outcome {
            Ok(report) if report.ok() => {
                self.due = Some(tokio::time::Instant::now() + jittered(self.interval));
                Ok(Next::Idle)
            }
            Ok(report) => anyhow::bail!("resync incomplete: {}", report.summary()),
            Err(e) => {
                let outcome = ResyncOutcome {
                    at: state.clock.now(),
                    ok: false,
                    detail: format!("{e:#}"),
                };
                record(state, outcome).await;
                Err(e.context("resync not possible"))
            }
        }
    }

    async fn wait_for_work(&mut self) {
        if let Some(due) = self.due {
            tokio::select! {
                _ = tokio::time::sleep_until(due) => {}
                _ = self.state.resync_wanted.notified() => tracing::info!("resync requested by ingestion"),
            }
        }
        self.due = None;
    }
}

/// How far an [`import`] got.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImportProgress {
    /// Lines of the file read (and validated) so far.
    Read(u64),
    /// Into an empty store, once the file is read: rows written so far of
    /// all (a bulk load writes everything at the end).
    Written { rows: u64, of: u64 },
    /// A batch of schools is reconciled with what the store holds: the
    /// store was not empty, or an entity came twice and ended the bulk load.
    Reconciling,
}

/// Imports a snapshot file (several schools concatenated) into the store:
/// all or nothing per school; a bad school (a bad line, a wrong count, a
/// record stamped more than `max_future_skew` after its `asOf`) is rejected
/// before any of it is written. Into an empty store it is a bulk load
/// (`Store::bulk_load`): every validated school is collected and written at
/// the end in key order, documents rendered, in one transaction — the same
/// store as the normal path, faster and smaller. Past
/// `StoreOptions::bulk_load_max_rows` rows in memory they are sorted into
/// temporary files beside the store and merged at the end, so memory stays
/// bounded for a national file. An entity that comes twice ends the bulk
/// load there and the rest goes the normal way.
/// Otherwise validated schools are reconciled together, up to
/// [`IMPORT_BATCH_RECORDS`] records a transaction, which writes far fewer
/// pages than one transaction per school. `progress` is told how far it
/// got.
///
/// A line longer than [`MAX_LINE_BYTES`] stops the import with an error
/// naming it, after reading at most that much of it: a file that is not a
/// snapshot (one 1 GiB line, say) fails fast, in bounded memory. Schools
/// committed before stay; the ones read since the last commit do not (in a
/// bulk load, that is all of them: it commits once, at the end).
pub fn import(
    store: &Store,
    filter: &SchoolFilter,
    max_future_skew: FutureSkew,
    input: impl BufRead + Send,
    now: Timestamp,
    mut progress: impl FnMut(ImportProgress),
) -> anyhow::Result<Vec<SchoolOutcome>> {
    // The file is read and parsed on a thread of its own while this one
    // writes: parsing JSON is a third of an import's work.
    let (tx, rx) = std::sync::mpsc::sync_channel::<Parsed>(PARSED_AHEAD);
    std::thread::scope(|scope| {
        let reader = scope.spawn(move || parse_schools(input, max_future_skew, tx));
        let result = import_parsed(store, filter, &rx, now, &mut progress);
        // On an error here the parser stops at its next send.
        drop(rx);
        let parsed = reader.join().expect("the snapshot parser panicked");
        let outcomes = result?;
        parsed?;
        Ok(outcomes)
    })
}

/// What the parsing thread of [`import`] hands over.
enum Parsed {
    School(Result<SchoolSnapshot, crate::domain::SnapshotError>),
    Lines(u64),
    /// The input ended (with a school left unfinished, if any).
    End(Option<crate::domain::SnapshotError>, u64),
}

fn parse_schools(
    mut input: impl BufRead,
    max_future_skew: FutureSkew,
    tx: std::sync::mpsc::SyncSender<Parsed>,
) -> anyhow::Result<()> {
    let mut reader = SnapshotReader::with_max_future_skew(max_future_skew);
    let mut line = Vec::new();
    while read_line(&mut input, &mut line, reader.lines() + 1)? {
        if let Some(result) = reader.feed(&line) {
            if tx.send(Parsed::School(result)).is_err() {
                return Ok(()); // the writer gave up
            }
        }
        if reader.lines().is_multiple_of(10_000) && tx.send(Parsed::Lines(reader.lines())).is_err()
        {
            return Ok(());
        }
    }
    let lines = reader.lines();
    let _ = tx.send(Parsed::End(reader.finish(), lines));
    Ok(())
}

fn import_parsed(
    store: &Store,
    filter: &SchoolFilter,
    parsed: &std::sync::mpsc::Receiver<Parsed>,
    now: Timestamp,
    progress: &mut dyn FnMut(ImportProgress),
) -> anyhow::Result<Vec<SchoolOutcome>> {
    let mut outcomes = Vec::new();
    let mut pending: Vec<SchoolSnapshot> = Vec::new();
    let mut pending_records = 0;
    let mut bulk = store.bulk_load(now, SyncSource::Import)?;
    let batch_for = |bulk: &Option<_>| match bulk {
        Some(_) => BULK_BATCH_RECORDS,
        None => IMPORT_BATCH_RECORDS,
    };
    let mut batch = batch_for(&bulk);
    // Every batch: the bulk load takes it, or (not empty, or an entity
    // came twice) it is reconciled; returns the size of the next batch.
    let mut flush = |pending: &mut Vec<SchoolSnapshot>,
                     outcomes: &mut Vec<SchoolOutcome>,
                     progress: &mut dyn FnMut(ImportProgress)|
     -> anyhow::Result<usize> {
        let reports = match bulk.as_mut().map(|b| b.add(pending)) {
            Some(Ok(reports)) => {
                let b = bulk.as_mut().expect("bulk load");
                if b.spill_if_full()? {
                    tracing::info!(
                        rows = b.rows(),
                        "the rows read so far are being sorted into temporary files beside \
                         the store (memory stays bounded); they are merged into the store at \
                         the end"
                    );
                }
                reports
            }
            Some(Err(repeated)) => {
                tracing::info!(
                    kind = repeated.kind.as_str(), id = %repeated.id,
                    "an entity comes twice in the file: the rest is reconciled school by school"
                );
                finish_bulk(bulk.take().expect("bulk load"), progress)?;
                progress(ImportProgress::Reconciling);
                store.reconcile_many(pending, now, SyncSource::Import, false)?
            }
            None => {
                if !pending.is_empty() {
                    progress(ImportProgress::Reconciling);
                }
                store.reconcile_many(pending, now, SyncSource::Import, false)?
            }
        };
        outcomes.extend(pending.drain(..).zip(reports).map(|(s, r)| SchoolOutcome {
            school_id: s.school_id,
            report: Some(r),
            error: None,
        }));
        Ok(batch_for(&bulk))
    };
    let mut unfinished = None;
    // Ends without `End` only if the parser failed (it says why).
    for item in parsed {
        match item {
            Parsed::School(Ok(snapshot)) if !filter.serves(snapshot.school_id) => {
                outcomes.push(SchoolOutcome {
                    school_id: snapshot.school_id,
                    report: None,
                    error: Some("not a school this node serves (schools.ids): skipped".into()),
                })
            }
            Parsed::School(Ok(snapshot)) => {
                pending_records += snapshot.records.len();
                pending.push(snapshot);
                if pending_records >= batch {
                    batch = flush(&mut pending, &mut outcomes, progress)?;
                    pending_records = 0;
                }
            }
            Parsed::School(Err(e)) => outcomes.push(SchoolOutcome {
                school_id: e.school.unwrap_or(Uuid::nil()),
                report: None,
                error: Some(e.to_string()),
            }),
            Parsed::Lines(n) => progress(ImportProgress::Read(n)),
            Parsed::End(e, lines) => {
                progress(ImportProgress::Read(lines));
                unfinished = Some(e);
            }
        }
    }
    let Some(unfinished) = unfinished else {
        // The parser stopped on a read error: `import` reports it; what
        // was read is not written.
        return Ok(outcomes);
    };
    flush(&mut pending, &mut outcomes, progress)?;
    if let Some(bulk) = bulk {
        finish_bulk(bulk, progress)?;
    }
    if let Some(e) = unfinished {
        outcomes.push(SchoolOutcome {
            school_id: e.school.unwrap_or(Uuid::nil()),
            report: None,
            error: Some(e.to_string()),
        });
    }
    Ok(outcomes)
}

fn finish_bulk(
    bulk: crate::store::BulkLoad<'_>,
    progress: &mut dyn FnMut(ImportProgress),
) -> anyhow::Result<()> {
    let of = bulk.rows();
    bulk.finish(|rows| progress(ImportProgress::Written { rows, of }))?;
    Ok(())
}

/// Reads the next line of `input` into `line`, without its `\n`, reading at
/// most [`MAX_LINE_BYTES`] of it; false at the end of the input. A longer
/// line (line `number`) is an error.
fn read_line<R: BufRead>(input: &mut R, line: &mut Vec<u8>, number: u64) -> anyhow::Result<bool> {
    line.clear();
    let cap = MAX_LINE_BYTES as u64 + 1;
    if std::io::Read::take(&mut *input, cap).read_until(b'\n', line)? == 0 {
        return Ok(false);
    }
    if line.last() == Some(&b'\n') {
        line.pop();
    } else if line.len() > MAX_LINE_BYTES {
        return Err(LineTooLong { number }.into());
    }
    Ok(true)
}

/// An import met a line longer than [`MAX_LINE_BYTES`]: the input, not the
/// node, is at fault (an import through the node answers `400`).
#[derive(Debug, thiserror::Error)]
#[error(
    "line {number} is longer than {MAX_LINE_BYTES} bytes (the most a snapshot line may \
     hold): not a snapshot file? The import stopped there; nothing after it was read"
)]
pub struct LineTooLong {
    pub number: u64,
}

/// Writes the snapshots of `schools` to `out`, concatenated; returns the
/// number of lines (records and end lines). `progress` is told the lines
/// written so far.
pub fn export(
    store: &Store,
    schools: &[Uuid],
    out: &mut impl std::io::Write,
    mut progress: impl FnMut(u64),
) -> anyhow::Result<u64> {
    let reader = store.read()?;
    let mut total = 0u64;
    let mut failed = None;
    for school in schools {
        reader.write_snapshot(*school, |line| {
            if let Err(e) = out.write_all(line) {
                failed = Some(e);
                return ControlFlow::Break(());
            }
            total += 1;
            if total.is_multiple_of(10_000) {
                progress(total);
            }
            ControlFlow::Continue(())
        })?;
        if let Some(e) = failed.take() {
            return Err(e.into());
        }
    }
    out.flush()?;
    progress(total);
    Ok(total)
}

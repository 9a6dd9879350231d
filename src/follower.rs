//! The follower (contract §6): a node with `upstream.url` follows its
//! parent's change feed for its `schools.ids`, over one HTTP(S) connection
//! whatever the number of its schools, and applies each page with the
//! parent's cursor in ONE store write transaction — exactly like a Kafka
//! batch with its offsets, so after a crash it resumes where its committed
//! data ends.
//!
//! One step is one request: a long-poll of `upstream.wait_secs` while the
//! follower is caught up, an immediate one while pages say `more`. Each
//! answer is validated whole before anything of it is applied ([`parse_page`]:
//! the page line present and last, its count, every line a change line,
//! timestamps within `ingest.max_future_skew` of the page's `asOf`, a
//! cursor that does not go backwards; the content type, the encoding and
//! the time the parent takes, here). A bad answer fails the step: nothing
//! of it is applied, the reason goes to status (`upstream.lastError`),
//! metrics and the log, and the worker backs off and asks again; reads go
//! on meanwhile.
//!
//! Lines of a school the follower does not serve (an entity that left one
//! of its schools) only ever remove an entity held here, by the transfer
//! rule, or are skipped (`Store::apply_feed_page`): a parent cannot make a
//! follower store another school's data.
//!
//! Starting points: an empty store with no cursor reads the feed from its
//! beginning; a store with data but no cursor (imported, or moved from
//! Kafka) and a `409 cursor-expired` answer reconcile every school from
//! the parent's snapshots (`resync::fetch_counted`) and continue from the
//! smallest of their cursors, in one transaction (`Store::reconcile_upstream`).

use std::time::Duration;

use futures::StreamExt;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::config::SchoolFilter;
use crate::domain::{
    Change, Cursor, EventError, FeedLine, FutureSkew, OrderKey, SchoolSnapshot, Timestamp,
};
use crate::state::NodeState;
use crate::worker::{Backoff, Next, Worker};

/// The largest answer read from a parent (decoded): a page of 10,000 of
/// the largest plausible entities fits many times over.
pub const MAX_PAGE_BYTES: usize = 256 << 20;
/// Snapshots fetched at once when starting again from them.
const CONCURRENT_SNAPSHOTS: usize = 4;

/// A page of the parent's feed, validated whole.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Page {
    /// The change lines, in order.
    pub lines: Vec<(OrderKey, Change)>,
    /// Where the next page starts; stored with the page.
    pub cursor: Cursor,
    pub more: bool,
    /// The parent's watermark when it read the page.
    pub as_of: Timestamp,
}

/// Why an answer is not a page to apply. Nothing of it is applied.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PageError {
    #[error("the answer is cut short after {lines} lines (no page line)")]
    Truncated { lines: usize },
    #[error("line {line} follows the page line")]
    AfterPageLine { line: usize },
    #[error("the page line says {said} change lines, {read} were read")]
    Count { said: u64, read: usize },
    #[error("line {line}: {reason}")]
    Malformed { line: usize, reason: String },
    #[error("the page's cursor {got} goes back from {after}")]
    CursorBackwards { after: Cursor, got: Cursor },
    #[error(
        "the page's cursor {got} is of another store than {after} (the parent should have \
         answered 409)"
    )]
    CursorOfAnotherStore { after: Cursor, got: Cursor },
    #[error("line {line}: {reason}")]
    FutureTimestamp { line: usize, reason: String },
}

impl PageError {
    /// The `reason` label of `emis_edge_upstream_errors_total`.
    pub fn reason(&self) -> &'static str {
        match self {
            PageError::Truncated { .. } | PageError::AfterPageLine { .. } => "truncated",
            PageError::Count { .. } => "count",
            PageError::Malformed { .. } => "malformed",
            PageError::CursorBackwards { .. } | PageError::CursorOfAnotherStore { .. } => "cursor",
            PageError::FutureTimestamp { .. } => "future_timestamp",
        }
    }
}

/// Validates a whole answer of `GET /api/changes` asked `after` (its
/// decoded body): change lines, then one page line, last; the count it
/// says; every change line's timestamp within `skew` of the page's
/// `asOf` (contract §2, "Time"); a cursor of the same store, not before
/// `after`, and past it when the page says `more`. Blank lines are
/// ignored; the last line may lack its newline.
pub fn parse_page(
    body: &[u8],
    after: Option<&Cursor>,
    skew: FutureSkew,
) -> Result<Page, PageError> {
    let mut lines = Vec::new();
    let mut page = None;
    let mut numbered = 0usize;
    let ends_with_newline = body.last() == Some(&b'\n');
    let mut raw_lines = body.split(|b| *b == b'\n').peekable();
    while let Some(raw) = raw_lines.next() {
        numbered += 1;
        let last = raw_lines.peek().is_none();
        let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
        if raw.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        if page.is_some() {
            return Err(PageError::AfterPageLine { line: numbered });
        }
        match FeedLine::parse(raw) {
            Ok(FeedLine::Change { key, change }) => lines.push((numbered, key, change)),
            Ok(FeedLine::Page {
                cursor,
                count,
                more,
                as_of,
            }) => page = Some((cursor, count, more, as_of)),
            // A last line without its newline that does not parse: the
            // answer stopped in the middle of it.
            Err(EventError::NotJson(_)) if last && !ends_with_newline => {
                return Err(PageError::Truncated {
                    lines: numbered - 1,
                })
            }
            Err(e) => {
                return Err(PageError::Malformed {
                    line: numbered,
                    reason: e.to_string(),
                })
            }
        }
    }
    let Some((cursor, count, more, as_of)) = page else {
        return Err(PageError::Truncated { lines: lines.len() });
    };
    if count != lines.len() as u64 {
        return Err(PageError::Count {
            said: count,
            read: lines.len(),
        });
    }
    if let Some(after) = after {
        if cursor.store != after.store {
            return Err(PageError::CursorOfAnotherStore {
                after: *after,
                got: cursor,
            });
        }
        if cursor.seq < after.seq || (more && cursor.seq == after.seq) {
            return Err(PageError::CursorBackwards {
                after: *after,
                got: cursor,
            });
        }
    }
    for (line, key, _) in &lines {
        skew.check("timestamp", key.timestamp, as_of, "the page's asOf")
            .map_err(|e| PageError::FutureTimestamp {
                line: *line,
                reason: e.to_string(),
            })?;
    }
    Ok(Page {
        lines: lines.into_iter().map(|(_, k, c)| (k, c)).collect(),
        cursor,
        more,
        as_of,
    })
}

/// Why a step with the parent failed.
#[derive(Debug, thiserror::Error)]
enum StepError {
    #[error("cannot reach the parent: {0}")]
    Connect(String),
    #[error("{0}")]
    Timeout(String),
    #[error("the parent answered {status}: {detail}")]
    Status { status: u16, detail: String },
    #[error("the parent's answer is not a change-feed page: Content-Type {0:?}")]
    ContentType(String),
    #[error("the parent's answer is unreadable: {0}")]
    Body(String),
    #[error("page rejected, nothing of it applied: {0}")]
    Page(#[from] PageError),
    #[error("starting again from the parent's snapshots failed: {0}")]
    Snapshot(String),
    #[error("the store cannot be written: {0}")]
    Store(String),
}

impl StepError {
    fn reason(&self) -> &'static str {
        match self {
            StepError::Connect(_) => "connect",
            StepError::Timeout(_) => "timeout",
            StepError::Status { status: 404, .. } => "not_served",
            StepError::Status {
                status: 401 | 403, ..
            } => "unauthorized",
            StepError::Status { status: 503, .. } => "unavailable",
            StepError::Status { .. } => "status",
            StepError::ContentType(_) => "content_type",
            StepError::Body(_) => "body",
            StepError::Page(e) => e.reason(),
            StepError::Snapshot(_) => "snapshot",
            StepError::Store(_) => "store",
        }
    }
}

/// What the parent answered.
enum Answer {
    Page(Page),
    /// `409 cursor-expired`, with its detail.
    Expired(String),
}

/// The follower worker (named `upstream`).
pub struct Follower {
    state: NodeState,
    client: reqwest::Client,
    base: String,
    schools: Vec<Uuid>,
    filter: SchoolFilter,
    /// The stored cursor, once read: `Some(None)` means none yet.
    cursor: Option<Option<Cursor>>,
    /// The last page said more: ask again at once, without waiting.
    more: bool,
}

impl Follower {
    /// The follower of `upstream.url`; fails when its token file cannot be
    /// read. Call only with `upstream.url` set.
    pub fn new(state: NodeState) -> anyhow::Result<Follower> {
        let config = state.config.clone();
        let base = config
            .upstream
            .url
            .clone()
            .ok_or_else(|| anyhow::anyhow!("upstream.url is not set"))?;
        let mut schools = config.schools.ids.clone();
        schools.sort_unstable();
        schools.dedup();
        Ok(Follower {
            client: crate::resync::upstream_client(&config)?,
            base: base.trim_end_matches('/').to_owned(),
            filter: SchoolFilter::Only(schools.iter().copied().collect()),
            schools,
            state,
            cursor: None,
            more: false,
        })
    }

    fn skew(&self) -> FutureSkew {
        self.state.config.max_future_skew()
    }

    fn read_timeout(&self) -> Duration {
        Duration::from_secs(self.state.config.upstream.read_timeout_secs)
    }

    /// The request for the page after `after`, held up to `wait` seconds.
    fn url(&self, after: Option<&Cursor>, wait: u64) -> String {
        let mut query = form_urlencoded::Serializer::new(String::new());
        for school in &self.schools {
            query.append_pair("school", &school.to_string());
        }
        if let Some(after) = after {
            query.append_pair("after", &after.to_string());
        }
        query.append_pair("limit", &self.state.config.upstream.limit.to_string());
        query.append_pair("wait", &wait.to_string());
        format!("{}/api/changes?{}", self.base, query.finish())
    }

    /// Asks the parent for the page after `after` and reads its answer
    /// whole, within `wait` + `upstream.read_timeout_secs` for the head
    /// and `read_timeout_secs` between two reads of the body.
    async fn ask(&self, after: Option<&Cursor>, wait: u64) -> Result<Answer, StepError> {
        let url = self.url(after, wait);
        let read_timeout = self.read_timeout();
        let head = Duration::from_secs(wait) + read_timeout;
        let response = tokio::time::timeout(
            head,
            self.client
                .get(&url)
                .header(reqwest::header::ACCEPT_ENCODING, "gzip")
                .send(),
        )
        .await
        .map_err(|_| {
            StepError::Timeout(format!(
                "the parent did not answer within {}s (wait {wait}s + upstream.read_timeout_secs)",
                head.as_secs()
            ))
        })?
        .map_err(|e| StepError::Connect(causes(&e)))?;
        let status = response.status();
        let content_type = response
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .unwrap_or_default();
        let body = self.body(response, read_timeout).await?;
        if status == reqwest::StatusCode::CONFLICT {
            let problem: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
            let kind = problem["type"].as_str().unwrap_or_default();
            if kind.ends_with("cursor-expired") {
                return Ok(Answer::Expired(
                    problem["detail"].as_str().unwrap_or_default().to_owned(),
                ));
            }
        }
        if !status.is_success() {
            let detail = serde_json::from_slice::<serde_json::Value>(&body)
                .ok()
                .and_then(|p| p["detail"].as_str().map(str::to_owned))
                .unwrap_or_else(|| snippet(&body));
            return Err(StepError::Status {
                status: status.as_u16(),
                detail,
            });
        }
        let mime = content_type
            .split(';')
            .next()
            .unwrap_or_default()
            .trim()
            .to_ascii_lowercase();
        if mime != "application/x-ndjson" {
            return Err(StepError::ContentType(content_type));
        }
        Ok(Answer::Page(parse_page(&body, after, self.skew())?))
    }

    /// Reads and decodes a whole body, counting the bytes received.
    async fn body(
        &self,
        response: reqwest::Response,
        read_timeout: Duration,
    ) -> Result<Vec<u8>, StepError> {
        let mut decoder =
            crate::resync::Decoder::for_response(&response).map_err(StepError::Body)?;
        let mut stream = response.bytes_stream();
        let mut body = Vec::new();
        loop {
            let chunk = tokio::time::timeout(read_timeout, stream.next())
                .await
                .map_err(|_| {
                    StepError::Timeout(format!(
                        "the parent sent nothing for {}s in the middle of its answer \
                         (upstream.read_timeout_secs)",
                        read_timeout.as_secs()
                    ))
                })?;
            let Some(chunk) = chunk else { break };
            let chunk = chunk.map_err(|e| StepError::Body(causes(&e)))?;
            self.state.metrics.upstream_bytes.inc_by(chunk.len() as u64);
            decoder.push(&chunk, &mut body).map_err(StepError::Body)?;
            if body.len() > MAX_PAGE_BYTES {
                return Err(StepError::Body(format!(
                    "the answer is larger than {MAX_PAGE_BYTES} bytes"
                )));
            }
        }
        decoder.finish(&mut body).map_err(StepError::Body)?;
        Ok(body)
    }

    /// Applies a validated page with its cursor in one transaction.
    async fn apply(&mut self, page: Page) -> Result<(), StepError> {
        let unchanged = page.lines.is_empty() && self.cursor == Some(Some(page.cursor));
        let count = page.lines.len();
        let now = self.state.clock.now();
        if !unchanged {
            let store = self.state.store.clone();
            let filter = self.filter.clone();
            let (lines, cursor) = (page.lines, page.cursor);
            crate::worker::blocking(move || store.apply_feed_page(&lines, &cursor, &filter, now))
                .await
                .map_err(|e| StepError::Store(e.to_string()))?;
        }
        let m = &self.state.metrics;
        m.upstream_pages.inc();
        m.upstream_lines.inc_by(count as u64);
        self.cursor = Some(Some(page.cursor));
        self.more = page.more;
        let caught_up = !page.more;
        self.state.sync.update(|s| {
            if caught_up {
                s.first_sync_done = true;
            }
            if count > 0 {
                s.last_event_received_at = Some(now);
            }
            if let Some(u) = s.upstream.as_mut() {
                u.connected = true;
                u.last_page_at = Some(now);
                u.caught_up = caught_up;
                u.last_error = None;
            }
        });
        tracing::debug!(lines = count, cursor = %page.cursor, more = page.more, "upstream page applied");
        Ok(())
    }

    /// Reconciles every school from the parent's snapshots and stores the
    /// smallest of their cursors, in one transaction.
    async fn start_from_snapshots(&mut self, why: &str) -> Result<(), StepError> {
        tracing::info!(
            reason = why,
            schools = self.schools.len(),
            "upstream: reconciling from the parent's snapshots"
        );
        let timeout = Duration::from_secs(self.state.config.resync.timeout_secs);
        let metrics = self.state.metrics.clone();
        let skew = self.skew();
        let (client, base) = (&self.client, self.base.as_str());
        let fetched: Vec<anyhow::Result<SchoolSnapshot>> =
            futures::stream::iter(self.schools.clone())
                .map(|school| {
                    let metrics = metrics.clone();
                    async move {
                        let fetch =
                            crate::resync::fetch_counted(client, base, school, skew, move |n| {
                                metrics.upstream_bytes.inc_by(n as u64);
                            });
                        let snapshot =
                            tokio::time::timeout(timeout, fetch).await.map_err(|_| {
                                anyhow::anyhow!(
                                    "school {school}: no complete snapshot within \
                                     resync.timeout_secs"
                                )
                            })??;
                        Ok(snapshot)
                    }
                })
                .buffer_unordered(CONCURRENT_SNAPSHOTS)
                .collect()
                .await;
        let snapshots = fetched
            .into_iter()
            .collect::<anyhow::Result<Vec<_>>>()
            .map_err(|e| StepError::Snapshot(format!("{e:#}")))?;
        let cursor = start_cursor(&snapshots).map_err(StepError::Snapshot)?;
        let store = self.state.store.clone();
        let now = self.state.clock.now();
        let reports =
            crate::worker::blocking(move || store.reconcile_upstream(&snapshots, &cursor, now))
                .await
                .map_err(|e| StepError::Store(e.to_string()))?;
        let (applied, deleted) = reports
            .iter()
            .fold((0, 0), |(a, d), r| (a + r.applied, d + r.deleted));
        tracing::info!(applied, deleted, %cursor, "upstream: reconciled from snapshots; following the feed from their cursor");
        self.cursor = Some(Some(cursor));
        self.more = true;
        self.state.sync.update_upstream(|u| {
            u.connected = true;
            u.last_error = None;
        });
        Ok(())
    }

    /// The stored cursor, and whether the store holds data.
    async fn stored(&self) -> Result<(Option<Cursor>, bool), StepError> {
        let store = self.state.store.clone();
        crate::worker::blocking(move || {
            let reader = store.read()?;
            Ok::<_, crate::store::StoreError>((reader.upstream_cursor()?, reader.has_data()?))
        })
        .await
        .map_err(|e| StepError::Store(e.to_string()))
    }

    async fn try_step(&mut self, stop: &CancellationToken) -> Result<Next, StepError> {
        let cursor = match self.cursor {
            Some(cursor) => cursor,
            None => {
                let (cursor, has_data) = self.stored().await?;
                if cursor.is_none() && has_data {
                    tokio::select! {
                        _ = stop.cancelled() => return Ok(Next::Idle),
                        done = self.start_from_snapshots(
                            "the store holds data but no position in the parent's feed"
                        ) => done?,
                    }
                    return Ok(Next::Busy);
                }
                self.cursor = Some(cursor);
                cursor
            }
        };
        let wait = if self.more {
            0
        } else {
            self.state.config.upstream.wait_secs
        };
        let answer = tokio::select! {
            // The request is dropped; nothing of it was applied.
            _ = stop.cancelled() => return Ok(Next::Idle),
            answer = self.ask(cursor.as_ref(), wait) => answer?,
        };
        match answer {
            Answer::Page(page) => self.apply(page).await?,
            Answer::Expired(why) => {
                tracing::warn!(%why, "upstream: the parent no longer continues this node's cursor");
                self.state
                    .metrics
                    .upstream_errors
                    .get_or_create(&crate::metrics::labels(&[("reason", "cursor_expired")]))
                    .inc();
                tokio::select! {
                    _ = stop.cancelled() => return Ok(Next::Idle),
                    done = self.start_from_snapshots(&why) => done?,
                }
            }
        }
        Ok(Next::Busy)
    }
}

/// An error with its causes (reqwest's own text names only the URL).
fn causes(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// The start of a body that is not a problem document, for the error.
fn snippet(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(&body[..body.len().min(120)]);
    let text = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if body.len() > 120 {
        format!("{text}…")
    } else {
        text
    }
}

/// Where the feed continues after reconciling `snapshots`: the smallest of
/// their cursors (the feed then repeats what a later snapshot already had,
/// which the convergence rule ignores). All must come from one store.
pub fn start_cursor(snapshots: &[SchoolSnapshot]) -> Result<Cursor, String> {
    let mut cursors = snapshots.iter().map(|s| {
        s.cursor.ok_or_else(|| {
            format!(
                "the snapshot of school {} has no cursor: the parent serves no change feed",
                s.school_id
            )
        })
    });
    let first = cursors
        .next()
        .ok_or_else(|| "no school to reconcile".to_owned())??;
    let mut seq = first.seq;
    for cursor in cursors {
        let cursor = cursor?;
        if cursor.store != first.store {
            return Err(
                "the snapshots come from different stores (the parent was rebuilt meanwhile)"
                    .into(),
            );
        }
        seq = seq.min(cursor.seq);
    }
    Ok(Cursor::at(first.store, seq))
}

impl Worker for Follower {
    fn name(&self) -> &'static str {
        "upstream"
    }

    /// From one second up to a minute: a parent that 25,000 school nodes
    /// follow must not be hammered when it comes back.
    fn backoff(&self) -> Backoff {
        Backoff {
            min: Duration::from_secs(1),
            max: Duration::from_secs(60),
        }
    }

    async fn step(&mut self, stop: &CancellationToken) -> anyhow::Result<Next> {
        match self.try_step(stop).await {
            Ok(next) => Ok(next),
            Err(e) => {
                let reason = e.reason();
                let text = e.to_string();
                self.state
                    .metrics
                    .upstream_errors
                    .get_or_create(&crate::metrics::labels(&[("reason", reason)]))
                    .inc();
                self.state.sync.update_upstream(|u| {
                    u.connected = !matches!(
                        e,
                        StepError::Connect(_) | StepError::Timeout(_) | StepError::Status { .. }
                    ) && u.connected;
                    u.last_error = Some(text.clone());
                });
                tracing::warn!(reason, error = %text, url = %self.base, "upstream request failed");
                Err(anyhow::anyhow!(text))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::feed::page_line;

    const STORE: Uuid = Uuid::from_u128(0x0123_4567_89ab_cdef_0123_4567_89ab_cdef);
    const T: Timestamp = 1_761_472_800_000_000_000;
    const HOUR: i64 = 3_600_000_000_000;

    fn delete(n: u128, ts: Timestamp) -> Vec<u8> {
        crate::domain::feed::delete_line(
            crate::domain::EntityKind::Teacher,
            Uuid::from_u128(n),
            Uuid::from_u128(77),
            &OrderKey {
                version: Some(1),
                timestamp: ts,
                delete: true,
                event_id: Uuid::nil(),
            },
        )
    }

    fn body(lines: &[Vec<u8>], seq: u64, count: u64, more: bool, as_of: Timestamp) -> Vec<u8> {
        let mut out: Vec<u8> = lines.concat();
        out.extend(page_line(&Cursor::at(STORE, seq), count, more, as_of));
        out
    }

    #[test]
    fn a_whole_page_parses_and_every_fault_rejects_it() {
        let ok = body(&[delete(1, T), delete(2, T)], 9, 2, false, T);
        let page = parse_page(&ok, Some(&Cursor::at(STORE, 3)), FutureSkew::DEFAULT).unwrap();
        assert_eq!(
            (page.lines.len(), page.cursor.seq, page.more),
            (2, 9, false)
        );
        // Without its final newline it is still whole.
        assert!(parse_page(&ok[..ok.len() - 1], None, FutureSkew::DEFAULT).is_ok());

        let reason = |b: &[u8], after: Option<Cursor>| {
            parse_page(b, after.as_ref(), FutureSkew::DEFAULT)
                .unwrap_err()
                .reason()
        };
        let cut = ok.len() - 20;
        assert_eq!(reason(&ok[..cut], None), "truncated");
        let no_page: Vec<u8> = [delete(1, T), delete(2, T)].concat();
        assert_eq!(reason(&no_page, None), "truncated");
        assert_eq!(reason(b"", None), "truncated");
        let mut after_page = ok.clone();
        after_page.extend(delete(3, T));
        assert_eq!(reason(&after_page, None), "truncated");
        assert_eq!(
            reason(&body(&[delete(1, T)], 9, 2, false, T), None),
            "count"
        );
        let mut bad = b"{\"kind\":\"teacher\",\n".to_vec();
        bad.extend(body(&[], 9, 0, false, T));
        assert_eq!(reason(&bad, None), "malformed");
        let html = b"<html><body>Bad gateway</body></html>\n";
        assert_eq!(reason(html, None), "malformed");
        assert_eq!(
            reason(&ok, Some(Cursor::at(STORE, 10))),
            "cursor",
            "backwards"
        );
        assert_eq!(
            reason(&body(&[], 9, 0, true, T), Some(Cursor::at(STORE, 9))),
            "cursor",
            "more without progress"
        );
        assert_eq!(
            reason(&ok, Some(Cursor::at(Uuid::from_u128(5), 1))),
            "cursor",
            "another store"
        );
        let future = body(&[delete(1, T + HOUR + 1)], 9, 1, false, T);
        assert_eq!(reason(&future, None), "future_timestamp");
        let within = body(&[delete(1, T + HOUR)], 9, 1, false, T);
        assert!(parse_page(&within, None, FutureSkew::DEFAULT).is_ok());
    }

    #[test]
    fn the_start_cursor_is_the_smallest_of_one_store() {
        let snap = |seq: u64, store: Uuid| SchoolSnapshot {
            school_id: Uuid::from_u128(seq.into()),
            records: Vec::new(),
            as_of: T,
            cursor: Some(Cursor::at(store, seq)),
        };
        assert_eq!(
            start_cursor(&[snap(7, STORE), snap(4, STORE), snap(9, STORE)]),
            Ok(Cursor::at(STORE, 4))
        );
        assert!(start_cursor(&[snap(7, STORE), snap(4, Uuid::from_u128(1))]).is_err());
        let central = SchoolSnapshot {
            cursor: None,
            ..snap(1, STORE)
        };
        assert!(start_cursor(&[central]).unwrap_err().contains("no cursor"));
        assert!(start_cursor(&[]).is_err());
    }

    #[test]
    fn a_cut_gzip_stream_is_an_error_and_a_whole_one_decodes() {
        use std::io::Write;
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), Default::default());
        gz.write_all(&body(&[delete(1, T)], 9, 1, false, T))
            .unwrap();
        let packed = gz.finish().unwrap();
        let decode = |bytes: &[u8]| {
            let mut d = crate::resync::Decoder::gzip();
            let mut out = Vec::new();
            d.push(bytes, &mut out)?;
            d.finish(&mut out)?;
            Ok::<_, String>(out)
        };
        assert!(parse_page(&decode(&packed).unwrap(), None, FutureSkew::DEFAULT).is_ok());
        assert!(decode(&packed[..packed.len() - 4]).is_err());
    }
}

//! `GET /api/changes` (contract §6): a page of the change log of some
//! schools after a cursor, as NDJSON closed by a page line, held open up
//! to `wait` seconds while nothing newer exists.
//!
//! A held request waits on the store's commit notifications
//! (`Store::subscribe_commits`) and reads again after a commit that changed
//! one of its schools, so such a change reaches the follower as soon as it
//! is committed; there is no polling loop, and a commit of other schools
//! costs a held request a set look-up, not a read. Held requests are not behind the read
//! routes' concurrency limit and request timeout (a follower would hold a
//! slot for up to a minute, and its wait is not slowness): they have their
//! own bound, `http.max_long_polls`, past which a request that would wait
//! is answered `503` at once, and they end early when the node stops.
//!
//! The page is read, rendered and compressed on the blocking pool, from
//! one read transaction: its lines, its cursor and its `asOf` (the store's
//! watermark) are from the same moment.

use std::io::Write;
use std::time::Duration;

use axum::extract::{RawQuery, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use tokio::sync::broadcast::error::RecvError;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use super::problem::{clip, parse_id, Problem, ProblemDocument};
use super::ApiState;
use crate::domain::feed::page_line;
use crate::domain::Cursor;
use crate::store::{FeedError, Reader};

/// At most this many `school` parameters (contract §6).
pub const MAX_SCHOOLS: usize = 1000;
/// Change lines per page when `limit` is absent, and its upper bound.
pub const DEFAULT_LIMIT: usize = 1000;
pub const MAX_LIMIT: usize = 10_000;
/// The longest `wait`, seconds.
pub const MAX_WAIT_SECS: u64 = 60;
/// How long a client whose long-poll was refused should wait.
const RETRY_AFTER_SECS: u64 = 5;

/// The route, with its OpenAPI description. It compresses its own pages
/// (on the blocking pool, with the read), so no compression layer.
pub(super) fn routes() -> OpenApiRouter<ApiState> {
    OpenApiRouter::new().routes(routes!(changes))
}

/// The parameters of one request.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Params {
    schools: Vec<Uuid>,
    after: Option<Cursor>,
    limit: usize,
    wait: Duration,
}

fn parse_params(query: Option<&str>) -> Result<Params, Problem> {
    let mut schools = Vec::new();
    let (mut after, mut limit, mut wait) = (None, None, None);
    for (name, value) in form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
        let once = |slot: &mut Option<String>| {
            if slot.replace(value.to_string()).is_some() {
                return Err(Problem::bad_request(format!(
                    "{name} is given more than once"
                )));
            }
            Ok(())
        };
        match name.as_ref() {
            "school" => {
                if schools.len() == MAX_SCHOOLS {
                    return Err(Problem::bad_request(format!(
                        "school is given more than {MAX_SCHOOLS} times"
                    )));
                }
                schools.push(parse_id("school", &value)?);
            }
            "after" => once(&mut after)?,
            "limit" => once(&mut limit)?,
            "wait" => once(&mut wait)?,
            _ => {} // unknown parameters are ignored, as on the other routes
        }
    }
    if schools.is_empty() {
        return Err(Problem::bad_request(
            "school is required (one to 1000 school ids, the parameter repeated)".into(),
        ));
    }
    schools.sort_unstable();
    schools.dedup();
    let after = match after.as_deref() {
        None | Some("") => None,
        Some(raw) => Some(raw.parse::<Cursor>().map_err(|e| {
            Problem::bad_request(format!(
                "after {:?} is not a cursor of this feed ({e}); pass the cursor of a page or \
                 snapshot end line as is",
                clip(raw)
            ))
        })?),
    };
    let number = |name: &str, raw: Option<String>, max: u64, min: u64, default: u64| match raw {
        None => Ok(default),
        Some(raw) => raw
            .parse::<u64>()
            .ok()
            .filter(|n| (min..=max).contains(n))
            .ok_or_else(|| {
                Problem::bad_request(format!(
                    "{name} {:?} must be an integer from {min} to {max}",
                    clip(&raw)
                ))
            }),
    };
    let limit = number("limit", limit, MAX_LIMIT as u64, 1, DEFAULT_LIMIT as u64)? as usize;
    let wait = Duration::from_secs(number("wait", wait, MAX_WAIT_SECS, 0, 0)?);
    Ok(Params {
        schools,
        after,
        limit,
        wait,
    })
}

/// One page as it goes out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RenderedPage {
    /// The NDJSON body: change lines, then the page line.
    pub body: Vec<u8>,
    /// Change lines in it.
    pub count: usize,
    pub more: bool,
    pub cursor: Cursor,
}

/// Reads one page of the feed of `schools` after `after` from `reader`
/// and renders it (contract §6): the change lines, then the page line
/// with the cursor of the next page and, as `asOf`, the store's watermark
/// in this same read transaction (the Unix epoch when it never saw a
/// change).
pub fn render_page(
    reader: &Reader,
    schools: &[Uuid],
    after: Option<&Cursor>,
    limit: usize,
) -> Result<RenderedPage, FeedError> {
    let page = reader.changes(schools, after, limit)?;
    let as_of = reader.watermark()?.unwrap_or(0);
    let mut body = Vec::with_capacity(page.items.len() * 320 + 160);
    for item in &page.items {
        body.extend_from_slice(&item.line());
    }
    let count = page.items.len();
    body.extend_from_slice(&page_line(&page.next, count as u64, page.more, as_of));
    Ok(RenderedPage {
        body,
        count,
        more: page.more,
        cursor: page.next,
    })
}

/// Whether the client takes a gzip-compressed answer (`Accept-Encoding`
/// names `gzip` or `*` without `q=0`).
pub(super) fn accepts_gzip(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT_ENCODING)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|coding| {
            let mut parts = coding.split(';').map(str::trim);
            let name = parts.next().unwrap_or_default();
            let refused = parts.any(|p| {
                p.strip_prefix("q=")
                    .and_then(|q| q.trim().parse::<f32>().ok())
                    .is_some_and(|q| q <= 0.0)
            });
            (name.eq_ignore_ascii_case("gzip") || name == "*") && !refused
        })
}

/// gzip of a whole body.
fn gzip(body: &[u8]) -> Vec<u8> {
    let mut encoder =
        flate2::write::GzEncoder::new(Vec::with_capacity(body.len() / 4), Default::default());
    encoder
        .write_all(body)
        .and_then(|()| encoder.finish())
        .expect("compressing into memory cannot fail")
}

/// A page read on the blocking pool, compressed there when asked.
struct Ready {
    page: RenderedPage,
    gzipped: Option<Vec<u8>>,
}

async fn read(
    s: &ApiState,
    params: &Params,
    after: Option<Cursor>,
    gzip_it: bool,
) -> Result<Ready, Problem> {
    let store = s.store.clone();
    let schools = params.schools.clone();
    let limit = params.limit;
    let read = tokio::task::spawn_blocking(move || {
        let reader = store.read()?;
        let page = render_page(&reader, &schools, after.as_ref(), limit)?;
        let gzipped = gzip_it.then(|| gzip(&page.body));
        Ok::<_, FeedError>(Ready { page, gzipped })
    })
    .await;
    match read {
        Ok(Ok(ready)) => Ok(ready),
        Ok(Err(FeedError::Expired { why })) => Err(Problem::new(
            StatusCode::CONFLICT,
            "cursor-expired",
            "Cursor expired",
            format!(
                "{why}; reconcile each school from GET /api/schools/{{schoolId}}/snapshot and \
                 continue from the cursor of its end line"
            ),
        )),
        Ok(Err(FeedError::Store(e))) => Err(e.into()),
        Err(e) => {
            tracing::error!(error = %e, "change feed page read failed");
            Err(Problem::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "store-error",
                "Store error",
                "the local store could not be read; see the node's log".into(),
            ))
        }
    }
}

fn respond(ready: Ready) -> Response {
    let mut response = match ready.gzipped {
        Some(body) => (
            [
                (header::CONTENT_TYPE, "application/x-ndjson"),
                (header::CONTENT_ENCODING, "gzip"),
            ],
            body,
        )
            .into_response(),
        None => (
            [(header::CONTENT_TYPE, "application/x-ndjson")],
            ready.page.body,
        )
            .into_response(),
    };
    let headers = response.headers_mut();
    headers.insert(header::VARY, HeaderValue::from_static("accept-encoding"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

#[utoipa::path(
    get,
    path = "/api/changes",
    tag = "replication",
    summary = "The change feed of some schools after a cursor (NDJSON), held open up to `wait` seconds",
    description = "Contract §6. Change lines (a snapshot record line, or a delete line `{\"kind\",\"deleted\":true,\"<kind>Id\",\"schoolId\",\"version\",\"timestamp\"}`), each entity once at its latest change, then one page line `{\"kind\":\"page\",\"cursor\",\"count\",\"more\",\"asOf\"}`. A page without its page line, or whose count differs, must be rejected whole. gzip-compressed for clients that accept it.",
    params(
        ("school" = Vec<Uuid>, Query, description = "1–1000 school ids (repeat the parameter)"),
        ("after" = Option<String>, Query, description = "An opaque cursor from an earlier page or a snapshot end line; absent: from the beginning"),
        ("limit" = Option<u32>, Query, description = "Change lines per page, 1–10000 (default 1000)"),
        ("wait" = Option<u32>, Query, description = "0–60 s (default 0): with nothing newer than `after`, hold the request until a change of one of the schools commits, or the wait ends (an empty page)")
    ),
    responses(
        (status = 200, description = "A page", body = String, content_type = "application/x-ndjson", example = json!("{\"kind\":\"teacher\",\"teacherId\":\"7e000000-0000-4000-8000-000000000007\",\"schoolId\":\"5c000000-0000-4000-8000-000000000001\",\"fullName\":\"Nguyễn Thị Hương\",\"employeeCode\":null,\"email\":null,\"phone\":null,\"subjects\":[\"Toán\"],\"status\":\"active\",\"version\":3,\"timestamp\":\"2025-10-26T10:00:00Z\"}\n{\"kind\":\"page\",\"cursor\":\"6602a1b0c3d4e5f60718293a4b5c6d7e.42\",\"count\":1,\"more\":false,\"asOf\":\"2025-10-26T10:00:00Z\"}\n")),
        (status = 400, description = "A malformed parameter", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 401, description = "`http.token_file` is set and the request has no valid bearer token", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 404, description = "A school this node does not serve (`detail` names it)", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 409, description = "`type` ends in `cursor-expired`: the cursor belongs to another store or is older than what this node keeps; reconcile from the snapshot route and continue from its `cursor`", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 503, description = "`http.max_long_polls` requests are held already, or the store is being reopened; try again after `Retry-After`", body = ProblemDocument, content_type = "application/problem+json")
    ),
    security((), ("bearer" = []))
)]
async fn changes(
    State(s): State<ApiState>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Result<Response, Problem> {
    let params = parse_params(query.as_deref())?;
    let filter = s.config.school_filter();
    if let Some(school) = params.schools.iter().find(|id| !filter.serves(**id)) {
        return Err(Problem::not_found(format!(
            "school {school} is not served by this node"
        )));
    }
    let gzip_it = accepts_gzip(&headers);
    // Subscribed before the first read: a commit after that read wakes
    // the wait below, none slips between the two.
    let mut commits = s.store.subscribe_commits();
    let mut ready = read(&s, &params, params.after, gzip_it).await?;
    if ready.page.count > 0 || ready.page.more || params.wait.is_zero() {
        return Ok(respond(ready));
    }
    let Ok(_slot) = s.long_polls().clone().try_acquire_owned() else {
        s.metrics.feed_long_polls_refused.inc();
        let mut response = Problem::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "too-many-long-polls",
            "Too many long-polls",
            format!(
                "this node holds http.max_long_polls ({}) change-feed requests already; retry \
                 later, or ask without wait",
                s.config.max_long_polls()
            ),
        )
        .into_response();
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECS));
        return Ok(response);
    };
    let _held = Held::enter(&s);
    let deadline = tokio::time::Instant::now() + params.wait;
    loop {
        tokio::select! {
            commit = commits.recv() => match commit {
                // A commit of other schools: nothing to read, wait on.
                Ok(commit) if !commit.touches(&params.schools) => continue,
                // One of ours, or commits missed: read.
                Ok(_) | Err(RecvError::Lagged(_)) => {}
                Err(RecvError::Closed) => break, // the store is gone: the node stops
            },
            _ = tokio::time::sleep_until(deadline) => break,
            _ = s.stopping().cancelled() => break,
        }
        // Only positions after the empty page's cursor can be new for
        // these schools; a commit whose change the first read already had
        // reads an empty page again, and the wait goes on.
        ready = read(&s, &params, Some(ready.page.cursor), gzip_it).await?;
        if ready.page.count > 0 || ready.page.more {
            break;
        }
    }
    Ok(respond(ready))
}

/// Counts a held long-poll in the gauge until dropped.
struct Held(ApiState);

impl Held {
    fn enter(s: &ApiState) -> Held {
        s.metrics.feed_long_polls.inc();
        Held(s.clone())
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.0.metrics.feed_long_polls.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(s: &str) -> Result<Params, String> {
        parse_params(Some(s)).map_err(|p| format!("{p:?}"))
    }

    const A: &str = "5c000000-0000-4000-8000-000000000001";
    const B: &str = "5c000000-0000-4000-8000-000000000002";

    #[test]
    fn parameters_parse_with_their_defaults_and_bounds() {
        let p = q(&format!("school={B}&school={A}&school={A}")).unwrap();
        assert_eq!(p.schools.len(), 2, "sorted and deduplicated");
        assert_eq!((p.after, p.limit, p.wait), (None, 1000, Duration::ZERO));
        let p = q(&format!("school={A}&limit=10000&wait=60&after=")).unwrap();
        assert_eq!((p.limit, p.wait.as_secs()), (10_000, 60));
        let cursor = "0123456789abcdef0123456789abcdef.42";
        assert_eq!(
            q(&format!("school={A}&after={cursor}")).unwrap().after,
            Some(cursor.parse().unwrap())
        );
        for (query, names) in [
            (String::new(), "school is required"),
            ("school=x".to_owned(), "school \\\"x\\\" is not a UUID"),
            (format!("school={A}&limit=0"), "limit \\\"0\\\""),
            (format!("school={A}&limit=10001"), "limit"),
            (format!("school={A}&wait=61"), "wait \\\"61\\\""),
            (format!("school={A}&wait=-1"), "wait"),
            (format!("school={A}&after=nope"), "after \\\"nope\\\""),
            (
                format!("school={A}&limit=1&limit=2"),
                "limit is given more than once",
            ),
            (
                format!("school={A}&{}", format!("school={B}&").repeat(1000)),
                "more than 1000",
            ),
        ] {
            let e = q(&query).unwrap_err();
            assert!(e.contains(names), "{query:.80}: {e}");
        }
    }

    #[test]
    fn gzip_is_taken_when_named_without_q_zero() {
        let h = |v: &str| {
            let mut m = HeaderMap::new();
            m.insert(header::ACCEPT_ENCODING, v.parse().unwrap());
            accepts_gzip(&m)
        };
        assert!(h("gzip"));
        assert!(h("br, GZIP;q=0.5"));
        assert!(h("*"));
        assert!(!h("gzip;q=0"));
        assert!(!h("identity"));
        assert!(!accepts_gzip(&HeaderMap::new()));
    }
}

//! The HTTP API (contract §4): routes, JSON response shapes and
//! problem+json errors. The only module that knows HTTP.
//!
//! Every handler answers from one store read transaction; none makes a
//! network call.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{ConnectInfo, Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use bytes::Bytes;
use futures::StreamExt;
use serde::Serialize;
use serde_json::json;
use uuid::Uuid;

use crate::clock::Clock;
use crate::config::{Config, SchoolFilter};
use crate::domain::{format_timestamp, Entity, EntityKind, Record, TeacherDetail};
use crate::status::SyncState;
use crate::store::{Store, StoreError};

/// What every handler can reach: one shared allocation, so that handing it
/// to a handler or a layer per request is one reference count, not one per
/// field.
#[derive(Clone)]
pub struct AppState(Arc<Shared>);

impl AppState {
    pub fn new(shared: Shared) -> AppState {
        AppState(Arc::new(shared))
    }
}

impl std::ops::Deref for AppState {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.0
    }
}

/// The parts of [`AppState`].
pub struct Shared {
    pub store: Arc<Store>,
    pub sync: Arc<SyncState>,
    pub config: Arc<Config>,
    pub clock: Arc<dyn Clock>,
    /// Signalled when the event stream cannot repair the replica by itself
    /// (offset out of range); the resync worker listens.
    pub resync_wanted: Arc<tokio::sync::Notify>,
    /// Fed by every round of the ingest loop; the systemd watchdog checks it.
    pub ingest_heartbeat: Arc<crate::systemd::Heartbeat>,
    /// Bearer tokens accepted on `/api/*` (none: no authentication).
    pub tokens: Arc<Vec<String>>,
    pub metrics: Arc<crate::metrics::Metrics>,
}

/// Page size when `limit` is absent, and its upper bound.
pub const DEFAULT_LIMIT: usize = 100;
pub const MAX_LIMIT: usize = 1000;
/// The longest request target (path and query) answered; a longer one gets
/// `414`. (A request head over `server::MAX_HEADER_BYTES` is refused by
/// hyper with `431` before it gets here.)
pub const MAX_URI_BYTES: usize = 8 * 1024;
/// `GET /api/sync/dead-letters` lists dead letters, newest first, until
/// their raw payloads add up to this much; `truncated` then says so.
pub const DEAD_LETTERS_MAX_RAW_BYTES: usize = 4 * 1024 * 1024;

pub fn router(state: AppState) -> Router {
    router_with(state, Router::new())
}

/// [`router`] with `extra` routes among the `/api` read routes, behind the
/// same layers (token, time and concurrency limits, metrics): the load
/// scripts' static-body baseline (`benches/static_http.rs`) uses it to be
/// served exactly as the teacher route is.
pub fn router_with(state: AppState, extra: Router<AppState>) -> Router {
    let timeout = Duration::from_secs(state.config.http.request_timeout_secs);
    let limits = tower::ServiceBuilder::new()
        .layer(axum::error_handling::HandleErrorLayer::new(
            |e: tower::BoxError| async move {
                if e.is::<tower::timeout::error::Elapsed>() {
                    Problem::new(
                        StatusCode::REQUEST_TIMEOUT,
                        "timeout",
                        "Request timeout",
                        "the request took longer than http.request_timeout_secs".into(),
                    )
                } else {
                    Problem::new(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "unavailable",
                        "Unavailable",
                        e.to_string(),
                    )
                }
            },
        ))
        .layer(tower::timeout::TimeoutLayer::new(timeout))
        // Only reads queue behind the limit: health checks (the systemd
        // watchdog's probe) and metrics never wait behind API traffic.
        .layer(tower::limit::GlobalConcurrencyLimitLayer::new(
            state.config.http.max_concurrent_requests,
        ));
    // Reads: bearer token when http.token_file is set, and a time limit.
    let api = Router::new()
        .route("/api/teachers/{teacher_id}", get(teacher_detail))
        .route("/api/classes/{class_id}", get(class))
        .route("/api/schools/{school_id}/classes", get(school_classes))
        .route("/api/schools/{school_id}/teachers", get(school_teachers))
        .route("/api/schools/{school_id}/snapshot", get(snapshot))
        .route("/api/sync/status", get(sync_status))
        .route("/api/sync/dead-letters", get(dead_letters))
        .merge(extra);
    // Without tokens configured, no per-request token check at all.
    let api = if state.tokens.is_empty() {
        api
    } else {
        api.route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            require_token,
        ))
    };
    let api = api.layer(limits);
    // Admin: loopback or token (checked in each handler); an import may
    // stream for minutes, so no time limit.
    let admin = Router::new()
        .route("/api/admin/resync", axum::routing::post(admin_resync))
        .route("/api/admin/import", axum::routing::post(admin_import))
        .route("/api/admin/schools", get(admin_schools));
    let main = Router::new().merge(api).merge(admin);
    let main = if state.config.http.ops_listen.is_none() {
        main.merge(ops_routes(&state))
    } else {
        main
    };
    finish(main, state)
}

/// `/health/*` and `/metrics` alone, for `http.ops_listen`.
pub fn ops_router(state: AppState) -> Router {
    let routes = ops_routes(&state);
    finish(routes, state)
}

fn ops_routes(state: &AppState) -> Router<AppState> {
    let registry = Arc::new(crate::metrics::registry(state.clone()));
    Router::new()
        .route("/health/live", get(|| async { "ok\n" }))
        .route("/health/ready", get(ready))
        .route(
            "/metrics",
            get(move |headers: axum::http::HeaderMap| async move {
                let text = crate::metrics::render(&registry);
                let openmetrics = headers
                    .get(header::ACCEPT)
                    .and_then(|v| v.to_str().ok())
                    .is_some_and(|v| v.contains("application/openmetrics-text"));
                if openmetrics {
                    (
                        [(
                            header::CONTENT_TYPE,
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        text,
                    )
                } else {
                    (
                        [(
                            header::CONTENT_TYPE,
                            "text/plain; version=0.0.4; charset=utf-8",
                        )],
                        crate::metrics::to_prometheus_text(&text),
                    )
                }
            }),
        )
}

/// Fallbacks and request metrics, for every router.
fn finish(router: Router<AppState>, state: AppState) -> Router {
    router
        .fallback(|| async { Problem::not_found("no such route") })
        .method_not_allowed_fallback(|| async {
            Problem::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method-not-allowed",
                "Method not allowed",
                "this route does not answer that method".into(),
            )
        })
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            record_request,
        ))
        .layer(axum::middleware::from_fn(limit_uri))
        .with_state(state)
}

/// Refuses request targets over [`MAX_URI_BYTES`] before routing.
async fn limit_uri(request: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let len = request
        .uri()
        .path_and_query()
        .map_or(0, |p| p.as_str().len());
    if len > MAX_URI_BYTES {
        return Problem::new(
            StatusCode::URI_TOO_LONG,
            "uri-too-long",
            "URI too long",
            format!("the request target is {len} bytes; at most {MAX_URI_BYTES} are accepted"),
        )
        .into_response();
    }
    next.run(request).await
}

/// Records each request's duration by route template and status.
async fn record_request(
    State(s): State<AppState>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let route = request
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let started = std::time::Instant::now();
    let response = next.run(request).await;
    let labels = vec![
        ("route".to_owned(), route),
        ("status".to_owned(), response.status().as_u16().to_string()),
    ];
    s.metrics
        .http
        .get_or_create(&labels)
        .observe(started.elapsed().as_secs_f64());
    response
}

/// Whether the request carries one of the configured bearer tokens
/// (compared in constant time).
fn has_token(state: &AppState, headers: &axum::http::HeaderMap) -> bool {
    use subtle::ConstantTimeEq;
    let Some(given) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
    else {
        return false;
    };
    state.tokens.iter().fold(false, |found, t| {
        found | bool::from(t.as_bytes().ct_eq(given.trim().as_bytes()))
    })
}

fn unauthorized() -> Response {
    let mut response = Problem::new(
        StatusCode::UNAUTHORIZED,
        "unauthorized",
        "Unauthorized",
        "this node requires `Authorization: Bearer <token>` (http.token_file)".into(),
    )
    .into_response();
    response.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        axum::http::HeaderValue::from_static("Bearer"),
    );
    response
}

async fn require_token(
    State(s): State<AppState>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if s.tokens.is_empty() || has_token(&s, request.headers()) {
        next.run(request).await
    } else {
        unauthorized()
    }
}

/// An RFC 9457 problem document.
#[derive(Debug)]
pub struct Problem {
    status: StatusCode,
    kind: &'static str,
    title: &'static str,
    detail: String,
}

impl Problem {
    fn new(status: StatusCode, kind: &'static str, title: &'static str, detail: String) -> Self {
        Problem {
            status,
            kind,
            title,
            detail,
        }
    }

    fn bad_request(detail: String) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "bad-request",
            "Bad request",
            detail,
        )
    }

    fn not_found(detail: impl Into<String>) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "not-found",
            "Not found",
            detail.into(),
        )
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let body = json!({
            "type": format!("urn:emis-edge:problem:{}", self.kind),
            "title": self.title,
            "status": self.status.as_u16(),
            "detail": self.detail,
        });
        (
            self.status,
            [(header::CONTENT_TYPE, "application/problem+json")],
            body.to_string(),
        )
            .into_response()
    }
}

impl From<StoreError> for Problem {
    fn from(e: StoreError) -> Self {
        tracing::error!(error = %e, "store read failed");
        if let StoreError::Unavailable(why) = e {
            // Reopening after an I/O error: a moment, not a fault of the request.
            return Problem::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "store-unavailable",
                "Store unavailable",
                format!("the local store is not available ({why}); try again shortly"),
            );
        }
        Problem::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "store-error",
            "Store error",
            "the local store could not be read; see the node's log".into(),
        )
    }
}

impl From<QueryRejection> for Problem {
    fn from(e: QueryRejection) -> Self {
        Problem::bad_request(e.body_text())
    }
}

fn parse_id(name: &str, raw: &str) -> Result<Uuid, Problem> {
    Uuid::try_parse(raw)
        .map_err(|_| Problem::bad_request(format!("{name} {:?} is not a UUID", clip(raw))))
}

/// At most the first 80 characters of a value echoed in a problem, so a
/// huge parameter is not sent back whole.
fn clip(s: &str) -> String {
    const MAX: usize = 80;
    match s.char_indices().nth(MAX) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_owned(),
    }
}

/// The id in the path, or a 400 that names the parameter as the contract
/// does (`teacherId`, not the route's placeholder).
fn path_id(name: &str, path: Result<Path<String>, PathRejection>) -> Result<Uuid, Problem> {
    use axum::extract::path::ErrorKind;
    let raw = match path {
        Ok(Path(raw)) => raw,
        Err(PathRejection::FailedToDeserializePathParams(e))
            if matches!(e.kind(), ErrorKind::InvalidUtf8InPathParam { .. }) =>
        {
            return Err(Problem::bad_request(format!(
                "{name} is not valid UTF-8 once percent-decoded"
            )));
        }
        Err(e) => return Err(Problem::bad_request(format!("{name}: {}", e.body_text()))),
    };
    parse_id(name, &raw)
}

fn limit_param(params: &HashMap<String, String>) -> Result<usize, Problem> {
    match params.get("limit") {
        None => Ok(DEFAULT_LIMIT),
        Some(raw) => raw
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=MAX_LIMIT).contains(n))
            .ok_or_else(|| {
                Problem::bad_request(format!(
                    "limit {:?} must be an integer from 1 to {MAX_LIMIT}",
                    clip(raw)
                ))
            }),
    }
}

// ---- response shapes -------------------------------------------------------

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct EntityDto<'a, T> {
    #[serde(flatten)]
    data: &'a T,
    last_synced_at: String,
    sync_source: &'static str,
}

fn entity_dto<'a, T>(record: &Record<Entity>, data: &'a T) -> EntityDto<'a, T> {
    EntityDto {
        data,
        last_synced_at: format_timestamp(record.last_synced_at),
        sync_source: record.source.as_str(),
    }
}

/// The teacher-detail answer (contract §4) as JSON bytes.
pub fn teacher_detail_body(detail: &TeacherDetail) -> Vec<u8> {
    crate::domain::detail::render(detail)
}

/// The same answer as a JSON value, for comparing answers in tests.
pub fn teacher_detail_json(detail: &TeacherDetail) -> serde_json::Value {
    serde_json::from_slice(&teacher_detail_body(detail)).expect("rendered JSON parses")
}

/// A class or teacher as listed and served by id.
pub fn entity_json(record: &Record<Entity>) -> serde_json::Value {
    let value = match &record.data {
        Entity::Class(c) => serde_json::to_value(entity_dto(record, c)),
        Entity::Teacher(t) => serde_json::to_value(entity_dto(record, t)),
        Entity::Assignment(a) => serde_json::to_value(entity_dto(record, a)),
    };
    value.expect("entities always serialize")
}

// ---- handlers -------------------------------------------------------------

async fn teacher_detail(
    State(s): State<AppState>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Response, Problem> {
    let id = path_id("teacherId", path)?;
    let body = s.store.read()?.teacher_detail_body(id)?;
    let body = body.ok_or_else(|| Problem::not_found(format!("teacher {id} is not known here")))?;
    Ok(([(header::CONTENT_TYPE, "application/json")], body).into_response())
}

async fn class(
    State(s): State<AppState>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Response, Problem> {
    let id = path_id("classId", path)?;
    let record = s.store.read()?.entity(EntityKind::Class, id)?;
    let record =
        record.ok_or_else(|| Problem::not_found(format!("class {id} is not known here")))?;
    Ok(Json(entity_json(&record)).into_response())
}

async fn list(
    s: AppState,
    kind: EntityKind,
    path: Result<Path<String>, PathRejection>,
    query: Result<Query<HashMap<String, String>>, QueryRejection>,
) -> Result<Response, Problem> {
    let school = path_id("schoolId", path)?;
    let Query(params) = query?;
    let limit = limit_param(&params)?;
    let after = params
        .get("after")
        .map(|raw| parse_id("after", raw))
        .transpose()?;
    let page = s.store.read()?.page(kind, school, after, limit)?;
    Ok(Json(json!({
        "items": page.items.iter().map(entity_json).collect::<Vec<_>>(),
        "next": page.next,
    }))
    .into_response())
}

async fn school_classes(
    State(s): State<AppState>,
    path: Result<Path<String>, PathRejection>,
    query: Result<Query<HashMap<String, String>>, QueryRejection>,
) -> Result<Response, Problem> {
    list(s, EntityKind::Class, path, query).await
}

async fn school_teachers(
    State(s): State<AppState>,
    path: Result<Path<String>, PathRejection>,
    query: Result<Query<HashMap<String, String>>, QueryRejection>,
) -> Result<Response, Problem> {
    list(s, EntityKind::Teacher, path, query).await
}

/// Streams a school's snapshot from one read transaction; memory stays flat.
/// If the store fails midway the body is cut short, so the reader sees no
/// `end` line and rejects the snapshot whole (contract §3).
async fn snapshot(
    State(s): State<AppState>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Response, Problem> {
    let school = path_id("schoolId", path)?;
    if !s.config.school_filter().serves(school) {
        return Err(Problem::not_found(format!(
            "school {school} is not served by this node"
        )));
    }
    let reader = s.store.read()?;
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(8);
    // A client that takes no data for this long is cut off, so that it does
    // not hold the read transaction, a blocking thread and the buffered
    // chunks for ever.
    let stall = Duration::from_secs(s.config.http.request_timeout_secs);
    let stalled = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let runtime = tokio::runtime::Handle::current();
    let flag = stalled.clone();
    tokio::task::spawn_blocking(move || {
        const CHUNK: usize = 64 * 1024;
        // Whether the chunk was taken; false when the client hung up or stalled.
        let send = |item: Result<Bytes, std::io::Error>| match runtime
            .block_on(tokio::time::timeout(stall, tx.send(item)))
        {
            Ok(sent) => sent.is_ok(),
            Err(_) => {
                tracing::warn!(%school, "snapshot client took no data for http.request_timeout_secs; cut off");
                flag.store(true, std::sync::atomic::Ordering::Release);
                false
            }
        };
        let mut buf = Vec::with_capacity(CHUNK * 2);
        let written = reader.write_snapshot(school, |line| {
            buf.extend_from_slice(line);
            if buf.len() >= CHUNK {
                let chunk = Bytes::from(std::mem::replace(&mut buf, Vec::with_capacity(CHUNK * 2)));
                if !send(Ok(chunk)) {
                    return ControlFlow::Break(());
                }
            }
            ControlFlow::Continue(())
        });
        match written {
            Ok(Some(_)) => {
                send(Ok(Bytes::from(buf)));
            }
            Ok(None) => {}
            Err(e) => {
                tracing::error!(error = %e, %school, "snapshot aborted");
                send(Err(std::io::Error::other(e.to_string())));
            }
        }
    });
    // After a stall the body ends in an error, so the connection is cut
    // without the closing chunk: the client sees a broken download, not a
    // complete one (and without an `end` line it is rejected anyway).
    let cut_off = futures::stream::once(async move {
        stalled.load(std::sync::atomic::Ordering::Acquire).then(|| {
            Err(std::io::Error::other(
                "the client took no data for too long",
            ))
        })
    })
    .filter_map(std::future::ready);
    Ok((
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(rx).chain(cut_off)),
    )
        .into_response())
}

/// The sync status document of `GET /api/sync/status`; `emis-edge status`
/// builds the same document from the store when no node runs.
pub fn status_json(
    store: &Store,
    sync: &SyncState,
    config: &Config,
    now: i64,
) -> Result<serde_json::Value, StoreError> {
    let reader = store.read()?;
    let stats = reader.stats()?;
    let state = sync.get();
    let health = store.health();
    // Every partition known from the store (consumed) or the broker (high
    // watermark seen); one never read yet shows no offset and its whole
    // length as lag.
    let mut positions: std::collections::BTreeMap<(String, i32), Option<i64>> = reader
        .offsets()?
        .into_iter()
        .map(|o| ((o.topic, o.partition), Some(o.next_offset)))
        .collect();
    for key in state.high_watermarks.keys() {
        positions.entry(key.clone()).or_insert(None);
    }
    let partitions: Vec<_> = positions
        .into_iter()
        .map(|((topic, partition), offset)| {
            let hw = state
                .high_watermarks
                .get(&(topic.clone(), partition))
                .copied();
            json!({
                "topic": topic,
                "partition": partition,
                "offset": offset,
                "highWatermark": hw,
                "lag": state.lag(&topic, partition, offset.unwrap_or(0)),
                "lastEventReceivedAt": state
                    .partition_last_event
                    .get(&(topic.clone(), partition))
                    .map(|t| format_timestamp(*t)),
            })
        })
        .collect();
    let served = match config.school_filter() {
        SchoolFilter::All => json!("all"),
        SchoolFilter::Only(ids) => json!(ids),
    };
    let secs = |s: u64| {
        i64::try_from(s)
            .unwrap_or(i64::MAX)
            .saturating_mul(1_000_000_000)
    };
    let stale = state.is_stale(
        now,
        secs(config.kafka.stale_after_secs),
        secs(config.resync.interval_secs.saturating_mul(2)),
    );
    Ok(json!({
        "nodeId": config.node.id,
        "servedSchools": served,
        "kafka": {
            "configured": state.kafka_configured,
            "connected": state.kafka_connected,
            "lastError": state.kafka_error,
            "groupId": config.group_id(),
            "offsetOutOfRange": state.offset_out_of_range.as_ref().map(|(at, what)| json!({
                "at": format_timestamp(*at),
                "detail": what,
            })),
        },
        "storeError": health.error,
        "store": {
            "degraded": health.degraded(),
            "error": health.error,
            "failingSince": health.failing_since.map(format_timestamp),
            "writeFailures": health.write_failures,
            "reopens": health.reopens,
            "pendingDocuments": stats.pending_documents,
        },
        "caughtUp": state.first_sync_done,
        "partitions": partitions,
        "lastEventTime": reader.watermark()?.map(format_timestamp),
        "lastEventReceivedAt": state.last_event_received_at.map(format_timestamp),
        "lastResync": state.last_resync.as_ref().map(|r| json!({
            "at": format_timestamp(r.at),
            "result": if r.ok { "ok" } else { "failed" },
            "detail": r.detail,
        })),
        "deadLetterCount": stats.dead_letters,
        "stale": stale,
        "entities": {
            "classes": stats.classes,
            "teachers": stats.teachers,
            "assignments": stats.assignments,
            "tombstones": stats.tombstones,
        },
        "counters": stats.counters,
    }))
}

async fn sync_status(State(s): State<AppState>) -> Result<Response, Problem> {
    let doc = status_json(&s.store, &s.sync, &s.config, s.clock.now())?;
    Ok(Json(doc).into_response())
}

async fn dead_letters(
    State(s): State<AppState>,
    query: Result<Query<HashMap<String, String>>, QueryRejection>,
) -> Result<Response, Problem> {
    let Query(params) = query?;
    let limit = limit_param(&params)?;
    let letters = s.store.read()?.dead_letters(limit)?;
    // Stored payloads are up to 64 KiB each, and binary ones grow up to six
    // times as JSON text: the list stops at a budget of raw bytes.
    let mut budget = DEAD_LETTERS_MAX_RAW_BYTES;
    let mut items = Vec::new();
    for d in &letters {
        if d.raw.len() > budget && !items.is_empty() {
            break;
        }
        budget = budget.saturating_sub(d.raw.len());
        items.push(json!({
            "topic": d.topic,
            "partition": d.partition,
            "offset": d.offset,
            "reason": d.reason,
            "at": format_timestamp(d.at),
            "raw": String::from_utf8_lossy(&d.raw),
            "rawLength": d.raw_len,
            "rawTruncated": d.raw.len() < d.raw_len,
        }));
    }
    let truncated = items.len() < letters.len();
    Ok(Json(json!({ "items": items, "truncated": truncated })).into_response())
}

// ---- admin (loopback only) -----------------------------------------------

/// The CLI acts through these while `serve` holds the store (contract §5).
/// Loopback, this host itself when `http.listen` is one of its own
/// addresses (the CLI then connects from that address), or a valid token.
fn loopback_only(
    s: &AppState,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: &axum::http::HeaderMap,
) -> Result<(), Problem> {
    match peer.ip() {
        ip if ip.is_loopback() || ip == s.config.http.listen.ip() => Ok(()),
        _ if has_token(s, headers) => Ok(()),
        _ => Err(Problem::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "Forbidden",
            "admin routes answer loopback clients, this host, or a valid bearer token".into(),
        )),
    }
}

fn school_params(params: &HashMap<String, String>) -> Result<Option<Vec<Uuid>>, Problem> {
    params
        .get("school")
        .map(|raw| raw.split(',').map(|s| parse_id("school", s)).collect())
        .transpose()
}

async fn admin_resync(
    State(s): State<AppState>,
    peer: ConnectInfo<SocketAddr>,
    headers: axum::http::HeaderMap,
    query: Result<Query<HashMap<String, String>>, QueryRejection>,
) -> Result<Response, Problem> {
    loopback_only(&s, peer, &headers)?;
    let Query(params) = query?;
    let dry_run = params
        .get("dryRun")
        .is_some_and(|v| v == "true" || v == "1");
    let schools = school_params(&params)?;
    let report = crate::resync::run_for_node(&s, schools, dry_run)
        .await
        .map_err(|e| {
            Problem::new(
                StatusCode::CONFLICT,
                "resync-unavailable",
                "Resync unavailable",
                format!("{e:#}"),
            )
        })?;
    Ok(Json(report).into_response())
}

async fn admin_schools(
    State(s): State<AppState>,
    peer: ConnectInfo<SocketAddr>,
    headers: axum::http::HeaderMap,
) -> Result<Response, Problem> {
    loopback_only(&s, peer, &headers)?;
    let schools = crate::resync::schools_to_sync(&s.store, &s.config, Vec::new()).map_err(|e| {
        tracing::error!(error = %e, "listing schools failed");
        Problem::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "store-error",
            "Store error",
            format!("{e:#}"),
        )
    })?;
    Ok(Json(json!({ "schools": schools })).into_response())
}

#[derive(Debug, thiserror::Error)]
#[error("request body exceeds http.max_import_bytes")]
struct BodyTooLarge;

fn too_large(limit: u64) -> Problem {
    Problem::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "too-large",
        "Payload too large",
        format!(
            "the import exceeds http.max_import_bytes ({limit} bytes): schools already committed stay, \
             the rest was not imported; raise the limit, or import with the node stopped"
        ),
    )
}

/// Imports an NDJSON snapshot file streamed in the request body.
async fn admin_import(
    State(s): State<AppState>,
    peer: ConnectInfo<SocketAddr>,
    headers: axum::http::HeaderMap,
    body: Body,
) -> Result<Response, Problem> {
    loopback_only(&s, peer, &headers)?;
    let limit = s.config.http.max_import_bytes;
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(too_large(limit));
    }
    let mut received = 0u64;
    let stream = body.into_data_stream().map(move |r| {
        let chunk = r.map_err(std::io::Error::other)?;
        received += chunk.len() as u64;
        if received > limit {
            return Err(std::io::Error::other(BodyTooLarge));
        }
        Ok(chunk)
    });
    let reader = tokio_util::io::SyncIoBridge::new(tokio_util::io::StreamReader::new(stream));
    let store = s.store.clone();
    let filter = s.config.school_filter();
    let now = s.clock.now();
    let outcomes = tokio::task::spawn_blocking(move || {
        crate::resync::import(
            &store,
            &filter,
            std::io::BufReader::with_capacity(1 << 20, reader),
            now,
            |_| {},
        )
    })
    .await
    .map_err(|e| {
        Problem::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "import-failed",
            "Import failed",
            e.to_string(),
        )
    })?
    .map_err(|e| {
        let over = e
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .is_some_and(|inner| inner.is::<BodyTooLarge>());
        if over {
            return too_large(limit);
        }
        Problem::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "import-failed",
            "Import failed",
            format!("{e:#}"),
        )
    })?;
    if outcomes.iter().any(|o| o.report.is_some()) {
        s.sync.update(|st| st.first_sync_done = true);
    }
    Ok(Json(json!({ "schools": outcomes })).into_response())
}

/// Whether the node should receive traffic: the store is open (it is, or
/// we would not be serving), its last write succeeded (a node that cannot
/// take changes in falls behind: traffic is better sent to a healthy one,
/// although this one still answers reads), and it holds data or finished
/// its first sync.
pub fn is_ready(s: &AppState) -> Result<bool, StoreError> {
    Ok(!s.store.health().degraded()
        && (s.sync.get().first_sync_done || s.store.read()?.has_data()?))
}

async fn ready(State(s): State<AppState>) -> Result<Response, Problem> {
    if is_ready(&s)? {
        return Ok("ready\n".into_response());
    }
    let detail = match s.store.health().error {
        Some(e) => format!(
            "the store cannot be written ({e}); the node retries by itself and answers reads \
             from what it holds meanwhile"
        ),
        None => "the store is empty and the first sync has not finished".into(),
    };
    Err(Problem::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "not-ready",
        "Not ready",
        detail,
    ))
}

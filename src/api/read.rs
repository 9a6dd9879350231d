//! The read routes of contract §4: teacher detail, class, the school
//! lists, the school snapshot (§3), sync status and dead letters, and the
//! JSON shapes they answer with. Each answers from one store read
//! transaction.

use std::collections::HashMap;
use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use bytes::Bytes;
use futures::StreamExt;
use serde::Serialize;
use utoipa_axum::router::{OpenApiRouter, UtoipaMethodRouter};
use utoipa_axum::routes;
use uuid::Uuid;

use super::problem::{limit_param, parse_id, path_id, Problem, ProblemDocument};
use super::ApiState;
use crate::domain::detail::TeacherDetailDto;
use crate::domain::{
    format_timestamp, Assignment, Class, Entity, EntityKind, Record, Teacher, TeacherDetail,
};
use crate::status::SyncStatus;

/// `GET /api/sync/dead-letters` lists dead letters, newest first, until
/// their raw payloads add up to this much; `truncated` then says so.
pub const DEAD_LETTERS_MAX_RAW_BYTES: usize = 4 * 1024 * 1024;

/// The read routes, before the layers `api::router_with` puts around them.
/// Each comes with its OpenAPI description (`#[utoipa::path]` on the
/// handler): a route is added to the router and the spec in one call.
pub(super) fn routes() -> OpenApiRouter<ApiState> {
    OpenApiRouter::new()
        .routes(routes!(teacher_detail))
        .routes(routes!(class))
        .routes(gzipped(routes!(school_classes)))
        .routes(gzipped(routes!(school_teachers)))
        .routes(gzipped(routes!(snapshot)))
        .routes(routes!(sync_status))
        .routes(routes!(dead_letters))
}

/// gzip for a route with large answers (lists, snapshot, change feed),
/// for clients that send `Accept-Encoding: gzip`. Lookups stay
/// uncompressed: a 4 KB document costs more to compress than to send on
/// the networks the node serves.
pub(super) fn gzipped(
    (schemas, paths, method_router): UtoipaMethodRouter<ApiState>,
) -> UtoipaMethodRouter<ApiState> {
    let gzip = tower_http::compression::CompressionLayer::new();
    (schemas, paths, method_router.layer(gzip))
}

/// When this node last changed an entity, and from where.
#[derive(Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Synced {
    /// When this node last changed the entity (RFC 3339, its own clock).
    #[schema(example = "2025-10-26T10:00:01.25Z")]
    last_synced_at: String,
    /// How the current version got here.
    #[schema(value_type = String, example = "kafka", pattern = "^(kafka|resync|import)$")]
    sync_source: &'static str,
}

fn synced(record: &Record<Entity>) -> Synced {
    Synced {
        last_synced_at: format_timestamp(record.last_synced_at),
        sync_source: record.source.as_str(),
    }
}

/// A class as served by id and in lists (contract §4).
#[derive(Serialize, utoipa::ToSchema)]
pub struct ClassAnswer<'a> {
    #[serde(flatten)]
    class: &'a Class,
    #[serde(flatten)]
    synced: Synced,
}

/// A teacher as listed (without assignments: those are in the detail).
#[derive(Serialize, utoipa::ToSchema)]
pub struct TeacherAnswer<'a> {
    #[serde(flatten)]
    teacher: &'a Teacher,
    #[serde(flatten)]
    synced: Synced,
}

#[derive(Serialize)]
struct AssignmentAnswer<'a> {
    #[serde(flatten)]
    assignment: &'a Assignment,
    #[serde(flatten)]
    synced: Synced,
}

/// A page of a school's classes, ordered by `classId`.
#[derive(Serialize, utoipa::ToSchema)]
pub struct ClassPage<'a> {
    items: Vec<ClassAnswer<'a>>,
    /// The `after` of the next page; `null` on the last one.
    next: Option<Uuid>,
}

/// A page of a school's teachers, ordered by `teacherId`.
#[derive(Serialize, utoipa::ToSchema)]
pub struct TeacherPage<'a> {
    items: Vec<TeacherAnswer<'a>>,
    /// The `after` of the next page; `null` on the last one.
    next: Option<Uuid>,
}

/// One dead-lettered event.
#[derive(Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeadLetterItem {
    #[schema(example = "emis.teacher.created")]
    topic: String,
    partition: i32,
    offset: i64,
    /// Why it could not be used.
    #[schema(example = "field `fullName`: must be 1 to 200 characters")]
    reason: String,
    /// When it was dead-lettered (RFC 3339).
    at: String,
    /// The payload (invalid UTF-8 replaced), cut to 64 KiB.
    raw: String,
    raw_length: usize,
    raw_truncated: bool,
}

/// Dead letters, newest first.
#[derive(Serialize, utoipa::ToSchema)]
pub struct DeadLetterList {
    items: Vec<DeadLetterItem>,
    /// The list stopped at its size budget: more exist.
    truncated: bool,
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
        Entity::Class(class) => serde_json::to_value(ClassAnswer {
            class,
            synced: synced(record),
        }),
        Entity::Teacher(teacher) => serde_json::to_value(TeacherAnswer {
            teacher,
            synced: synced(record),
        }),
        Entity::Assignment(assignment) => serde_json::to_value(AssignmentAnswer {
            assignment,
            synced: synced(record),
        }),
    };
    value.expect("entities always serialize")
}

/// `Cache-Control` of lookups and lists. An answer is as fresh as this
/// node's replica at the moment it is read, and a change may arrive at any
/// moment after: a cache may keep it but must ask again before each reuse,
/// which costs a `304` without a body when nothing changed (`ETag`).
pub const CACHE_CONTROL: &str = "no-cache";

/// The teacher document's entity tag: a hash of its bytes. A change of the
/// teacher, of any of its assignments or of their classes changes the
/// document, while the teacher's own order key covers only the first.
pub fn teacher_etag(body: &[u8]) -> String {
    format!("\"t{:016x}\"", xxhash_rust::xxh3::xxh3_64(body))
}

/// An entity's tag: its order key (contract §2), which names the change
/// that produced the stored state, and when it was applied here.
pub fn entity_etag(record: &Record<Entity>) -> String {
    let k = &record.key;
    format!(
        "\"{}.{}.{}.{}.{}\"",
        k.version.map_or_else(|| "u".to_owned(), |v| v.to_string()),
        k.timestamp,
        k.event_id.simple(),
        if k.delete { "d" } else { "u" },
        record.last_synced_at
    )
}

/// The request's `If-None-Match` values, without copying the other
/// headers (the `HeaderMap` extractor clones them all).
pub struct IfNoneMatch(Vec<HeaderValue>);

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for IfNoneMatch {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        _state: &S,
    ) -> Result<Self, Self::Rejection> {
        Ok(IfNoneMatch(
            parts
                .headers
                .get_all(header::IF_NONE_MATCH)
                .iter()
                .cloned()
                .collect(),
        ))
    }
}

impl IfNoneMatch {
    /// Whether it names `etag` (weak comparison, RFC 9110 §13.1.2), or is
    /// `*`.
    fn matches(&self, etag: &str) -> bool {
        let strip = |t: &str| t.trim().trim_start_matches("W/").to_owned();
        self.0
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim() == "*" || strip(t) == strip(etag))
    }
}

/// A lookup's answer with its `ETag` and `Cache-Control`, or `304 Not
/// Modified` when the client holds it already.
fn tagged(held: &IfNoneMatch, etag: String, answer: impl FnOnce() -> Response) -> Response {
    let mut response = if held.matches(&etag) {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        answer()
    };
    let h = response.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&etag) {
        h.insert(header::ETAG, v);
    }
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static(CACHE_CONTROL),
    );
    response
}

#[utoipa::path(
    get,
    path = "/api/teachers/{teacherId}",
    tag = "lookups",
    summary = "A teacher with its class assignments",
    params(
        ("teacherId" = Uuid, Path, description = "The teacher's id"),
        ("If-None-Match" = Option<String>, Header, description = "An `ETag` of an earlier answer: `304` if it is still current")
    ),
    responses(
        (status = 200, description = "The teacher-detail document", body = TeacherDetailDto, headers(("ETag" = String, description = "The answer's entity tag; send it back in `If-None-Match`"), ("Cache-Control" = String, description = "`no-cache`: reuse only after asking again"))),
        (status = 304, description = "The answer the client holds is current"),
        (status = 400, description = "A malformed id or parameter", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 401, description = "`http.token_file` is set and the request has no valid bearer token", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 404, description = "Unknown or deleted teacher", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 503, description = "The store is being reopened after an I/O error; try again after `Retry-After`", body = ProblemDocument, content_type = "application/problem+json")
    ),
    security((), ("bearer" = []))
)]
async fn teacher_detail(
    State(s): State<ApiState>,
    held: IfNoneMatch,
    path: Result<Path<String>, PathRejection>,
) -> Result<Response, Problem> {
    let id = path_id("teacherId", path)?;
    let body = s.read(move |r| r.teacher_detail_body(id)).await?;
    let body = body.ok_or_else(|| Problem::not_found(format!("teacher {id} is not known here")))?;
    let etag = teacher_etag(&body);
    Ok(tagged(&held, etag, || {
        ([(header::CONTENT_TYPE, "application/json")], body).into_response()
    }))
}

#[utoipa::path(
    get,
    path = "/api/classes/{classId}",
    tag = "lookups",
    summary = "A class",
    params(
        ("classId" = Uuid, Path, description = "The class's id"),
        ("If-None-Match" = Option<String>, Header, description = "An `ETag` of an earlier answer: `304` if it is still current")
    ),
    responses(
        (status = 200, description = "The class", body = ClassAnswer, headers(("ETag" = String, description = "The answer's entity tag; send it back in `If-None-Match`"), ("Cache-Control" = String, description = "`no-cache`: reuse only after asking again"))),
        (status = 304, description = "The answer the client holds is current"),
        (status = 400, description = "A malformed id or parameter", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 401, description = "`http.token_file` is set and the request has no valid bearer token", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 404, description = "Unknown or deleted class", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 503, description = "The store is being reopened after an I/O error; try again after `Retry-After`", body = ProblemDocument, content_type = "application/problem+json")
    ),
    security((), ("bearer" = []))
)]
async fn class(
    State(s): State<ApiState>,
    held: IfNoneMatch,
    path: Result<Path<String>, PathRejection>,
) -> Result<Response, Problem> {
    let id = path_id("classId", path)?;
    let record = s.read(move |r| r.entity(EntityKind::Class, id)).await?;
    let record =
        record.ok_or_else(|| Problem::not_found(format!("class {id} is not known here")))?;
    Ok(tagged(&held, entity_etag(&record), || {
        Json(entity_json(&record)).into_response()
    }))
}

async fn list(
    s: ApiState,
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
    let page = s.read(move |r| r.page(kind, school, after, limit)).await?;
    let next = page.next;
    let body = match kind {
        EntityKind::Class => Json(ClassPage {
            items: page
                .items
                .iter()
                .filter_map(|r| match &r.data {
                    Entity::Class(class) => Some(ClassAnswer {
                        class,
                        synced: synced(r),
                    }),
                    _ => None,
                })
                .collect(),
            next,
        })
        .into_response(),
        _ => Json(TeacherPage {
            items: page
                .items
                .iter()
                .filter_map(|r| match &r.data {
                    Entity::Teacher(teacher) => Some(TeacherAnswer {
                        teacher,
                        synced: synced(r),
                    }),
                    _ => None,
                })
                .collect(),
            next,
        })
        .into_response(),
    };
    Ok(([(header::CACHE_CONTROL, CACHE_CONTROL)], body).into_response())
}

#[utoipa::path(
    get,
    path = "/api/schools/{schoolId}/classes",
    tag = "lists",
    summary = "A page of a school's classes",
    params(
        ("schoolId" = Uuid, Path, description = "The school's id"),
        ("limit" = Option<usize>, Query, minimum = 1, maximum = 1000, description = "Classes per page (default 100)"),
        ("after" = Option<Uuid>, Query, description = "The `next` of the previous page")
    ),
    responses(
        (status = 200, description = "Classes ordered by `classId`; gzip-compressed for clients that accept it", body = ClassPage),
        (status = 400, description = "A malformed id or parameter", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 401, description = "`http.token_file` is set and the request has no valid bearer token", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 503, description = "The store is being reopened after an I/O error; try again after `Retry-After`", body = ProblemDocument, content_type = "application/problem+json")
    ),
    security((), ("bearer" = []))
)]
async fn school_classes(
    State(s): State<ApiState>,
    path: Result<Path<String>, PathRejection>,
    query: Result<Query<HashMap<String, String>>, QueryRejection>,
) -> Result<Response, Problem> {
    list(s, EntityKind::Class, path, query).await
}

#[utoipa::path(
    get,
    path = "/api/schools/{schoolId}/teachers",
    tag = "lists",
    summary = "A page of a school's teachers",
    params(
        ("schoolId" = Uuid, Path, description = "The school's id"),
        ("limit" = Option<usize>, Query, minimum = 1, maximum = 1000, description = "Teachers per page (default 100)"),
        ("after" = Option<Uuid>, Query, description = "The `next` of the previous page")
    ),
    responses(
        (status = 200, description = "Teachers ordered by `teacherId`; gzip-compressed for clients that accept it", body = TeacherPage),
        (status = 400, description = "A malformed id or parameter", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 401, description = "`http.token_file` is set and the request has no valid bearer token", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 503, description = "The store is being reopened after an I/O error; try again after `Retry-After`", body = ProblemDocument, content_type = "application/problem+json")
    ),
    security((), ("bearer" = []))
)]
async fn school_teachers(
    State(s): State<ApiState>,
    path: Result<Path<String>, PathRejection>,
    query: Result<Query<HashMap<String, String>>, QueryRejection>,
) -> Result<Response, Problem> {
    list(s, EntityKind::Teacher, path, query).await
}

/// Streams a school's snapshot from one read transaction; memory stays flat.
/// If the store fails midway the body is cut short, so the reader sees no
/// `end` line and rejects the snapshot whole (contract §3).
#[utoipa::path(
    get,
    path = "/api/schools/{schoolId}/snapshot",
    tag = "replication",
    summary = "A school's snapshot (NDJSON)",
    params(
        ("schoolId" = Uuid, Path, description = "A school this node serves")
    ),
    responses(
        (status = 200, description = "One JSON object per line: every live record (`kind` class, teacher or assignment, with its order key), then `{\"kind\":\"end\",\"schoolId\",\"count\",\"asOf\"}`. A snapshot without its end line, or whose count differs, must be rejected whole. gzip-compressed for clients that accept it.", body = String, content_type = "application/x-ndjson", example = json!("{\"kind\":\"class\",\"classId\":\"0e150000-0000-4000-8000-00000000000c\",\"schoolId\":\"5c000000-0000-4000-8000-000000000001\",\"className\":\"Lớp 10A1\",\"grade\":\"Khối 10\",\"academicYear\":\"2024-2025\",\"totalStudents\":45,\"homeroomTeacherId\":null,\"version\":1,\"timestamp\":\"2025-10-26T10:00:00Z\"}\n{\"kind\":\"end\",\"schoolId\":\"5c000000-0000-4000-8000-000000000001\",\"count\":1,\"asOf\":\"2025-10-26T10:00:00Z\"}\n")),
        (status = 400, description = "A malformed id or parameter", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 401, description = "`http.token_file` is set and the request has no valid bearer token", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 404, description = "A school this node does not serve", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 503, description = "The store is being reopened after an I/O error; try again after `Retry-After`", body = ProblemDocument, content_type = "application/problem+json")
    ),
    security((), ("bearer" = []))
)]
async fn snapshot(
    State(s): State<ApiState>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Response, Problem> {
    let school = path_id("schoolId", path)?;
    if !s.config.school_filter().serves(school) {
        return Err(Problem::not_found(format!(
            "school {school} is not served by this node"
        )));
    }
    let reader = s.reader().await?;
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
        [
            (header::CONTENT_TYPE, "application/x-ndjson"),
            // A snapshot is a copy to apply, not an answer to reuse.
            (header::CACHE_CONTROL, "no-store"),
        ],
        Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(rx).chain(cut_off)),
    )
        .into_response())
}

#[utoipa::path(
    get,
    path = "/api/sync/status",
    tag = "sync",
    summary = "The node's sync status",
    responses(
        (status = 200, description = "Offsets, lag, last event, last resync, dead letters, staleness, workers", body = SyncStatus),
        (status = 401, description = "`http.token_file` is set and the request has no valid bearer token", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 503, description = "The store is being reopened after an I/O error; try again after `Retry-After`", body = ProblemDocument, content_type = "application/problem+json")
    ),
    security((), ("bearer" = []))
)]
async fn sync_status(State(s): State<ApiState>) -> Result<Response, Problem> {
    let node = s.node().clone();
    Ok(Json(super::blocking(move || node.status()).await??).into_response())
}

#[utoipa::path(
    get,
    path = "/api/sync/dead-letters",
    tag = "sync",
    summary = "Dead-lettered events, newest first",
    params(
        ("limit" = Option<usize>, Query, minimum = 1, maximum = 1000, description = "At most this many (default 100)")
    ),
    responses(
        (status = 200, description = "Dead letters until their payloads add up to 4 MiB", body = DeadLetterList),
        (status = 400, description = "A malformed id or parameter", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 401, description = "`http.token_file` is set and the request has no valid bearer token", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 503, description = "The store is being reopened after an I/O error; try again after `Retry-After`", body = ProblemDocument, content_type = "application/problem+json")
    ),
    security((), ("bearer" = []))
)]
async fn dead_letters(
    State(s): State<ApiState>,
    query: Result<Query<HashMap<String, String>>, QueryRejection>,
) -> Result<Response, Problem> {
    let Query(params) = query?;
    let limit = limit_param(&params)?;
    let letters = s.read(move |r| r.dead_letters(limit)).await?;
    // Stored payloads are up to 64 KiB each, and binary ones grow up to six
    // times as JSON text: the list stops at a budget of raw bytes.
    let mut budget = DEAD_LETTERS_MAX_RAW_BYTES;
    let mut items = Vec::new();
    for d in &letters {
        if d.raw.len() > budget && !items.is_empty() {
            break;
        }
        budget = budget.saturating_sub(d.raw.len());
        items.push(DeadLetterItem {
            topic: d.topic.clone(),
            partition: d.partition,
            offset: d.offset,
            reason: d.reason.clone(),
            at: format_timestamp(d.at),
            raw: String::from_utf8_lossy(&d.raw).into_owned(),
            raw_length: d.raw_len,
            raw_truncated: d.raw.len() < d.raw_len,
        });
    }
    let truncated = items.len() < letters.len();
    Ok(Json(DeadLetterList { items, truncated }).into_response())
}

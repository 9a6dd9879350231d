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
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use bytes::Bytes;
use futures::StreamExt;
use serde::Serialize;
use serde_json::json;

use super::problem::{limit_param, parse_id, path_id, Problem};
use super::ApiState;
use crate::domain::{format_timestamp, Entity, EntityKind, Record, TeacherDetail};

/// `GET /api/sync/dead-letters` lists dead letters, newest first, until
/// their raw payloads add up to this much; `truncated` then says so.
pub const DEAD_LETTERS_MAX_RAW_BYTES: usize = 4 * 1024 * 1024;

/// The read routes, before the layers `api::router_with` puts around them.
pub(super) fn routes() -> Router<ApiState> {
    Router::new()
        .route("/api/teachers/{teacher_id}", get(teacher_detail))
        .route("/api/classes/{class_id}", get(class))
        .route("/api/schools/{school_id}/classes", get(school_classes))
        .route("/api/schools/{school_id}/teachers", get(school_teachers))
        .route("/api/schools/{school_id}/snapshot", get(snapshot))
        .route("/api/sync/status", get(sync_status))
        .route("/api/sync/dead-letters", get(dead_letters))
}

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

async fn teacher_detail(
    State(s): State<ApiState>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Response, Problem> {
    let id = path_id("teacherId", path)?;
    let body = s.store.read()?.teacher_detail_body(id)?;
    let body = body.ok_or_else(|| Problem::not_found(format!("teacher {id} is not known here")))?;
    Ok(([(header::CONTENT_TYPE, "application/json")], body).into_response())
}

async fn class(
    State(s): State<ApiState>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Response, Problem> {
    let id = path_id("classId", path)?;
    let record = s.store.read()?.entity(EntityKind::Class, id)?;
    let record =
        record.ok_or_else(|| Problem::not_found(format!("class {id} is not known here")))?;
    Ok(Json(entity_json(&record)).into_response())
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
    let page = s.store.read()?.page(kind, school, after, limit)?;
    Ok(Json(json!({
        "items": page.items.iter().map(entity_json).collect::<Vec<_>>(),
        "next": page.next,
    }))
    .into_response())
}

async fn school_classes(
    State(s): State<ApiState>,
    path: Result<Path<String>, PathRejection>,
    query: Result<Query<HashMap<String, String>>, QueryRejection>,
) -> Result<Response, Problem> {
    list(s, EntityKind::Class, path, query).await
}

async fn school_teachers(
    State(s): State<ApiState>,
    path: Result<Path<String>, PathRejection>,
    query: Result<Query<HashMap<String, String>>, QueryRejection>,
) -> Result<Response, Problem> {
    list(s, EntityKind::Teacher, path, query).await
}

/// Streams a school's snapshot from one read transaction; memory stays flat.
/// If the store fails midway the body is cut short, so the reader sees no
/// `end` line and rejects the snapshot whole (contract §3). Compressed
/// with gzip, chunk by chunk, for a client that accepts it (contract §6).
async fn snapshot(
    State(s): State<ApiState>,
    path: Result<Path<String>, PathRejection>,
    headers: axum::http::HeaderMap,
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
    let gzip = super::feed::accepts_gzip(&headers);
    tokio::task::spawn_blocking(move || {
        const CHUNK: usize = 64 * 1024;
        let mut encoder = gzip
            .then(|| flate2::write::GzEncoder::new(Vec::with_capacity(CHUNK), Default::default()));
        // The bytes to send for `plain` (compressed, when asked).
        let mut pack = |plain: Vec<u8>, last: bool| -> Bytes {
            use std::io::Write;
            let Some(gz) = encoder.as_mut() else {
                return Bytes::from(plain);
            };
            gz.write_all(&plain)
                .expect("compressing into memory cannot fail");
            if last {
                let gz = encoder.take().expect("present");
                return Bytes::from(gz.finish().expect("compressing into memory cannot fail"));
            }
            Bytes::from(std::mem::take(gz.get_mut()))
        };
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
                let chunk = pack(
                    std::mem::replace(&mut buf, Vec::with_capacity(CHUNK * 2)),
                    false,
                );
                if !chunk.is_empty() && !send(Ok(chunk)) {
                    return ControlFlow::Break(());
                }
            }
            ControlFlow::Continue(())
        });
        match written {
            Ok(Some(_)) => {
                send(Ok(pack(buf, true)));
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
    let mut response = (
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(rx).chain(cut_off)),
    )
        .into_response();
    let h = response.headers_mut();
    h.insert(
        header::VARY,
        axum::http::HeaderValue::from_static("accept-encoding"),
    );
    if gzip {
        h.insert(
            header::CONTENT_ENCODING,
            axum::http::HeaderValue::from_static("gzip"),
        );
    }
    Ok(response)
}

async fn sync_status(State(s): State<ApiState>) -> Result<Response, Problem> {
    Ok(Json(s.status()?).into_response())
}

async fn dead_letters(
    State(s): State<ApiState>,
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

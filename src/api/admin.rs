//! Admin routes (`/api/admin/*`): what the CLI does through a running
//! node, since redb lets one process open the store (contract §5) — a
//! resync run, an import streamed in the request body, the list of
//! schools. They answer loopback, this host, or a valid bearer token.

use std::collections::HashMap;
use std::net::SocketAddr;

use axum::body::Body;
use axum::extract::rejection::QueryRejection;
use axum::extract::{ConnectInfo, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::StreamExt;
use serde_json::json;
use uuid::Uuid;

use super::problem::{parse_id, Problem};
use super::{has_token, ApiState};

pub(super) fn routes() -> Router<ApiState> {
    Router::new()
        .route("/api/admin/resync", post(admin_resync))
        .route("/api/admin/import", post(admin_import))
        .route("/api/admin/schools", get(admin_schools))
}

/// The CLI acts through these while `serve` holds the store (contract §5).
/// Loopback, this host itself when `http.listen` is one of its own
/// addresses (the CLI then connects from that address), or a valid token.
fn loopback_only(
    s: &ApiState,
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
    State(s): State<ApiState>,
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
    let report = crate::resync::run_for_node(s.node(), schools, dry_run)
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
    State(s): State<ApiState>,
    peer: ConnectInfo<SocketAddr>,
    headers: axum::http::HeaderMap,
) -> Result<Response, Problem> {
    loopback_only(&s, peer, &headers)?;
    let schools = s.schools_to_sync(Vec::new()).map_err(|e| {
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
    State(s): State<ApiState>,
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
    let skew = s.config.max_future_skew();
    let now = s.clock.now();
    let outcomes = tokio::task::spawn_blocking(move || {
        crate::resync::import(
            &store,
            &filter,
            skew,
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

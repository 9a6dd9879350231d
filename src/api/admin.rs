//! Admin routes (`/api/admin/*`): what the CLI does through a running
//! node, since redb lets one process open the store (contract §5) — a
//! resync run, an import streamed in the request body, the list of
//! schools. With `http.token_file` set they need a valid bearer token
//! from every peer; without one they answer only this host
//! ([`admin_access`]).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};

use axum::body::Body;
use axum::extract::rejection::QueryRejection;
use axum::extract::{ConnectInfo, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::StreamExt;
use serde_json::json;
use uuid::Uuid;

use super::problem::{parse_id, Problem, ProblemDocument};
use super::{has_token, unauthorized, ApiState};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

/// The admin routes, before [`admin_only`] is put in front of them.
pub(super) fn routes() -> OpenApiRouter<ApiState> {
    OpenApiRouter::new()
        .routes(routes!(admin_resync))
        .routes(routes!(admin_import))
        .routes(routes!(admin_schools))
}

/// The schools a resync run or an export covers.
#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct AdminSchools {
    schools: Vec<Uuid>,
}

/// Who may use an admin route: a resync run, an import or the school list
/// are the operator's, not an app's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AdminAccess {
    Granted,
    /// `401`: `http.token_file` is set and the request has no valid token.
    NeedsToken,
    /// `403`: no token file, and the peer is not this host.
    Forbidden,
}

/// The admin access rule. With `http.token_file` set (`tokens_configured`)
/// the token is required from every peer, loopback too: a reverse proxy
/// on this host connects from loopback, so the peer address says nothing
/// about who the client is. Without a token file only this host is
/// admitted: a loopback peer, or the host's own `http.listen` address
/// (the command line connects from it when `http.listen` is a specific
/// address); docs/OPERATIONS.md says not to put a proxy in front of such
/// a node.
pub fn admin_access(
    tokens_configured: bool,
    token_valid: bool,
    peer: IpAddr,
    listen: IpAddr,
) -> AdminAccess {
    if tokens_configured {
        return if token_valid {
            AdminAccess::Granted
        } else {
            AdminAccess::NeedsToken
        };
    }
    let peer = peer.to_canonical();
    if peer.is_loopback() || (!listen.is_unspecified() && peer == listen.to_canonical()) {
        AdminAccess::Granted
    } else {
        AdminAccess::Forbidden
    }
}

/// The gate in front of every admin route ([`admin_access`]).
pub(super) async fn admin_only(
    State(s): State<ApiState>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let peer = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|ConnectInfo(peer)| peer.ip());
    let Some(peer) = peer else {
        // Every connection of the server loop carries its peer.
        return Problem::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "Forbidden",
            "the client's address is unknown".into(),
        )
        .into_response();
    };
    let access = admin_access(
        !s.tokens().is_empty(),
        has_token(&s, request.headers()),
        peer,
        s.config.http.listen.ip(),
    );
    match access {
        AdminAccess::Granted => next.run(request).await,
        AdminAccess::NeedsToken => unauthorized(),
        AdminAccess::Forbidden => Problem::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "Forbidden",
            "admin routes answer only this host when the node has no http.token_file".into(),
        )
        .into_response(),
    }
}

fn school_params(params: &HashMap<String, String>) -> Result<Option<Vec<Uuid>>, Problem> {
    params
        .get("school")
        .map(|raw| raw.split(',').map(|s| parse_id("school", s)).collect())
        .transpose()
}

#[utoipa::path(
    post,
    path = "/api/admin/resync",
    tag = "admin",
    summary = "Run one resync now (`emis-edge resync`)",
    params(
        ("school" = Option<String>, Query, description = "Comma-separated school ids; default: every served school"),
        ("dryRun" = Option<bool>, Query, description = "Change nothing; report the drift"),
    ),
    responses(
        (status = 200, description = "The run's report, per school", body = Object),
        (status = 400, description = "A malformed school id", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 401, description = "`http.token_file` is set and the request has no valid bearer token", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 403, description = "No `http.token_file`, and the client is not on this host", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 409, description = "No `resync.central_url`, or a run is under way", body = ProblemDocument, content_type = "application/problem+json"),
    ),
    security((), ("bearer" = []))
)]
async fn admin_resync(
    State(s): State<ApiState>,
    query: Result<Query<HashMap<String, String>>, QueryRejection>,
) -> Result<Response, Problem> {
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

#[utoipa::path(
    get,
    path = "/api/admin/schools",
    tag = "admin",
    summary = "The schools a resync or an export covers",
    responses(
        (status = 200, description = "School ids", body = AdminSchools),
        (status = 401, description = "`http.token_file` is set and the request has no valid bearer token", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 403, description = "No `http.token_file`, and the client is not on this host", body = ProblemDocument, content_type = "application/problem+json"),
    ),
    security((), ("bearer" = []))
)]
async fn admin_schools(State(s): State<ApiState>) -> Result<Response, Problem> {
    let node = s.node().clone();
    let schools = super::blocking(move || node.schools_to_sync(Vec::new())).await?;
    let schools = schools?;
    Ok(Json(AdminSchools { schools }).into_response())
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

/// How often an import through the node logs how far it got.
const IMPORT_PROGRESS_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// Imports an NDJSON snapshot file streamed in the request body.
#[utoipa::path(
    post,
    path = "/api/admin/import",
    tag = "admin",
    summary = "Import a snapshot file (`emis-edge import`), all or nothing per school",
    request_body(content = String, content_type = "application/x-ndjson", description = "Snapshot lines of one or more schools (contract §3), at most `http.max_import_bytes`"),
    responses(
        (status = 200, description = "The outcome per school", body = Object),
        (status = 400, description = "A line longer than a snapshot line may be (not a snapshot file); schools committed before it stay", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 401, description = "`http.token_file` is set and the request has no valid bearer token", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 403, description = "No `http.token_file`, and the client is not on this host", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 413, description = "The body exceeds `http.max_import_bytes`", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 500, description = "The import failed (e.g. the disk is full); nothing of a failed school is kept", body = ProblemDocument, content_type = "application/problem+json"),
    ),
    security((), ("bearer" = []))
)]
async fn admin_import(
    State(s): State<ApiState>,
    headers: axum::http::HeaderMap,
    body: Body,
) -> Result<Response, Problem> {
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
        // Periodic progress lines in the node's log.
        let mut last = std::time::Instant::now();
        crate::resync::import(
            &store,
            &filter,
            skew,
            std::io::BufReader::with_capacity(1 << 20, reader),
            now,
            |p| {
                if last.elapsed() >= IMPORT_PROGRESS_EVERY {
                    last = std::time::Instant::now();
                    match p {
                        crate::resync::ImportProgress::Read(lines) => {
                            tracing::info!(lines, "import: lines read")
                        }
                        crate::resync::ImportProgress::Written { rows, of } => {
                            tracing::info!(rows, of, "import: rows written")
                        }
                        crate::resync::ImportProgress::Reconciling => {}
                    }
                }
            },
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
        if e.downcast_ref::<crate::resync::LineTooLong>().is_some() {
            return Problem::bad_request(format!("{e:#}"));
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
    s.activity
        .record(now, crate::resync::changed_schools(&outcomes));
    Ok(Json(json!({ "schools": outcomes })).into_response())
}

//! Errors as RFC 9457 problem documents (`application/problem+json`,
//! contract §4), and the parameter parsers whose failures become `400`s
//! that name the parameter as the contract does.

use std::collections::HashMap;

use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::Path;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use uuid::Uuid;

use crate::store::StoreError;

/// Page size when `limit` is absent, and its upper bound.
pub const DEFAULT_LIMIT: usize = 100;
pub const MAX_LIMIT: usize = 1000;

/// An RFC 9457 problem document.
#[derive(Debug)]
pub struct Problem {
    status: StatusCode,
    kind: &'static str,
    title: &'static str,
    detail: String,
    /// Seconds for a `Retry-After` header (a `503` that will pass).
    retry_after: Option<u32>,
}

impl Problem {
    pub fn new(
        status: StatusCode,
        kind: &'static str,
        title: &'static str,
        detail: String,
    ) -> Self {
        Problem {
            status,
            kind,
            title,
            detail,
            retry_after: None,
        }
    }

    /// `503 store-unavailable` with `Retry-After`: the store is being
    /// reopened after an I/O error, a moment and not a fault of the
    /// request.
    pub fn store_unavailable(detail: String) -> Self {
        Problem {
            retry_after: Some(1),
            ..Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "store-unavailable",
                "Store unavailable",
                detail,
            )
        }
    }

    pub fn bad_request(detail: String) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "bad-request",
            "Bad request",
            detail,
        )
    }

    pub fn not_found(detail: impl Into<String>) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "not-found",
            "Not found",
            detail.into(),
        )
    }
}

/// An error (RFC 9457 problem details, `application/problem+json`).
#[derive(serde::Serialize, utoipa::ToSchema)]
#[schema(as = Problem)]
pub struct ProblemDocument {
    /// `urn:emis-edge:problem:` and a short name.
    #[serde(rename = "type")]
    #[schema(example = "urn:emis-edge:problem:not-found")]
    kind: String,
    #[schema(example = "Not found")]
    title: &'static str,
    #[schema(example = 404)]
    status: u16,
    #[schema(example = "teacher 0e150000-0000-4000-8000-000000000001 is not known here")]
    detail: String,
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let body = serde_json::to_value(ProblemDocument {
            kind: format!("urn:emis-edge:problem:{}", self.kind),
            title: self.title,
            status: self.status.as_u16(),
            detail: self.detail,
        })
        .expect("a problem always serializes");
        let mut response = (
            self.status,
            [(header::CONTENT_TYPE, "application/problem+json")],
            body.to_string(),
        )
            .into_response();
        if let Some(secs) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, secs.into());
        }
        response
    }
}

impl From<StoreError> for Problem {
    fn from(e: StoreError) -> Self {
        if e.is_transient() {
            // Reopening after an I/O error: a moment, not a fault of the request.
            tracing::warn!(error = %e, "store read deferred: the store is being reopened");
            let why = match e {
                StoreError::Unavailable(why) => why,
                other => other.to_string(),
            };
            return Problem::store_unavailable(format!(
                "the local store is not available ({why}); try again shortly"
            ));
        }
        tracing::error!(error = %e, "store read failed");
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

pub fn parse_id(name: &str, raw: &str) -> Result<Uuid, Problem> {
    Uuid::try_parse(raw)
        .map_err(|_| Problem::bad_request(format!("{name} {:?} is not a UUID", clip(raw))))
}

/// At most the first 80 characters of a value echoed in a problem, so a
/// huge parameter is not sent back whole.
pub fn clip(s: &str) -> String {
    const MAX: usize = 80;
    match s.char_indices().nth(MAX) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_owned(),
    }
}

/// The id in the path, or a 400 that names the parameter as the contract
/// does (`teacherId`, not the route's placeholder).
pub fn path_id(name: &str, path: Result<Path<String>, PathRejection>) -> Result<Uuid, Problem> {
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

pub fn limit_param(params: &HashMap<String, String>) -> Result<usize, Problem> {
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

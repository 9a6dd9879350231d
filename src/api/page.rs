//! The status page, `GET /`: one self-contained HTML file
//! (`page.html` beside this file, embedded at build time) for the people who
//! look after a node with a browser and no Prometheus. It carries no data:
//! its script reads `/api/sync/status` and `/api/sync/dead-letters` and
//! draws them, every few seconds. So the page itself is served without a
//! token, and with `http.token_file` set it asks for one when those routes
//! answer 401 (kept in the tab's sessionStorage), rather than being moved to
//! the ops listener, where the `/api` routes it reads are not.

use axum::http::header;
use axum::response::{IntoResponse, Response};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::ApiState;

const PAGE: &str = include_str!("page.html");

/// Its own inline script and style, data only from this node, nothing
/// loaded from elsewhere, no framing: what the page needs and no more. (The
/// script puts every value in as text, never as markup: dead letters hold
/// whatever a producer sent.)
const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'unsafe-inline'; \
     style-src 'unsafe-inline'; connect-src 'self'; img-src 'self' data:; base-uri 'none'; \
     form-action 'none'; frame-ancestors 'none'";

pub(super) fn routes() -> OpenApiRouter<ApiState> {
    OpenApiRouter::new().routes(routes!(page))
}

#[utoipa::path(
    get,
    path = "/",
    tag = "operations",
    summary = "The status page, for a person with a browser",
    description = "One self-contained HTML page (no external assets) that draws `/api/sync/status` and `/api/sync/dead-letters` and refreshes itself; with `http.token_file` set it asks for the token.",
    responses((status = 200, description = "The page", body = String, content_type = "text/html; charset=utf-8")),
)]
async fn page() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
            (header::CONTENT_SECURITY_POLICY, CONTENT_SECURITY_POLICY),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::REFERRER_POLICY, "no-referrer"),
        ],
        PAGE,
    )
        .into_response()
}

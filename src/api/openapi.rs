//! The API's OpenAPI 3.1 description, generated from the code: every route
//! is registered together with its `#[utoipa::path]` description
//! (`utoipa_axum::routes!`), and the bodies' schemas come from the types
//! that serialize them, so the document cannot drift from what the node
//! answers. Served at `GET /api/openapi.json`; `docs/openapi.json` is the
//! same document, rewritten by a test that fails when it was out of date.
//!
//! A new route comes with its description in one line where its module
//! lists its routes, e.g. for the change feed in `read::routes`:
//! `.routes(gzipped(routes!(changes)))` with `#[utoipa::path(get, path =
//! "/api/changes", …)]` on the handler.

use std::sync::LazyLock;

use axum::http::header;
use axum::response::IntoResponse;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::ApiState;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "emis-edge",
        description = "An EMIS edge node: a local replica of its schools' classes, teachers and \
                       teacher-class assignments, answering from that replica alone. Errors are \
                       `application/problem+json`. With `http.token_file` set, `/api/*` needs \
                       `Authorization: Bearer <token>` (admin routes from every client); \
                       `/health/*`, `/metrics` and this document never do.",
        license(name = "MIT OR Apache-2.0", identifier = "MIT OR Apache-2.0"),
    ),
    tags(
        (name = "lookups", description = "A teacher or a class by id"),
        (name = "lists", description = "A school's classes or teachers, page by page"),
        (name = "replication", description = "What another node or a resync copies"),
        (name = "sync", description = "How the replica keeps up"),
        (name = "admin", description = "What the command line does through a running node"),
        (name = "operations", description = "Health checks, metrics and this description"),
    ),
    modifiers(&Bearer),
)]
struct ApiDoc;

/// The `bearer` security scheme the routes name (`http.token_file`).
struct Bearer;

impl Modify for Bearer {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "One of the tokens of the node's `http.token_file`; required only when \
                         that is set",
                    ))
                    .build(),
            ),
        );
    }
}

/// `GET /api/openapi.json`, open like the health checks.
pub(super) fn routes() -> OpenApiRouter<ApiState> {
    OpenApiRouter::new().routes(routes!(openapi_json))
}

/// The whole description: every route of every router.
pub fn openapi() -> utoipa::openapi::OpenApi {
    let mut doc = ApiDoc::openapi();
    for part in [
        super::read::routes(),
        super::feed::routes(),
        super::admin::routes(),
        super::ops::routes(),
        super::page::routes(),
        routes(),
    ] {
        doc.merge(part.into_openapi());
    }
    doc
}

/// [`openapi`] as pretty JSON with a final newline, as served and as
/// `docs/openapi.json` holds it.
pub fn openapi_json_text() -> String {
    let mut text = openapi()
        .to_pretty_json()
        .expect("the description serializes");
    text.push('\n');
    text
}

static TEXT: LazyLock<String> = LazyLock::new(openapi_json_text);

#[utoipa::path(
    get,
    path = "/api/openapi.json",
    tag = "operations",
    summary = "This description (OpenAPI 3.1)",
    responses((status = 200, description = "The OpenAPI document", body = Object, content_type = "application/json")),
)]
async fn openapi_json() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], TEXT.as_str())
}

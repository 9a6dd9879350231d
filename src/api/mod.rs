//! The HTTP API (contract §4): which routes exist, behind which layers
//! (`guard`: bearer token, time and concurrency limits, request metrics),
//! and the HTTP-only state they need on top of [`NodeState`] (the accepted
//! tokens, the metrics registry, the long-poll slots, the stop signal).
//! The routes themselves are in [`read`] (lookups, lists, snapshot, status,
//! dead letters), [`feed`] (the change feed, contract §6), [`admin`] (what
//! the CLI does through a running node), [`ops`] (health and metrics) and
//! [`page`] (the status page), each with its OpenAPI description
//! ([`openapi`]); errors are
//! problem+json ([`problem`]). The connection loop underneath is
//! `crate::server`.
//!
//! Handlers answer from the local store only; none makes a network call
//! (the admin resync route starts a resync run, which does), and none
//! blocks an async thread (`ApiState::read`, `blocking`).

use std::sync::Arc;
use std::time::Duration;

use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Router;
use prometheus_client::metrics::histogram::Histogram;
use tokio_util::sync::CancellationToken;

use crate::state::NodeState;
use crate::store::Reader;

pub mod admin;
pub mod feed;
mod guard;
pub mod openapi;
pub mod ops;
pub mod page;
pub mod problem;
pub mod read;

pub use problem::Problem;
pub use read::{entity_json, teacher_detail_body, teacher_detail_json};

/// What every handler can reach: the node's state and the HTTP layer's
/// own, in one shared allocation, so that handing it to a handler or a
/// layer per request is one reference count.
#[derive(Clone)]
pub struct ApiState(Arc<ApiParts>);

struct ApiParts {
    node: NodeState,
    /// Bearer tokens accepted on `/api/*` (none: no authentication).
    tokens: Vec<String>,
    /// What `/metrics` renders.
    registry: prometheus_client::registry::Registry,
    /// Slots of change-feed requests held waiting (`http.max_long_polls`).
    long_polls: Arc<tokio::sync::Semaphore>,
    /// Fires when the node stops: held long-polls answer at once.
    stopping: CancellationToken,
    /// The request-duration histograms by route template and status,
    /// handles into `Metrics::http`: a request finds its own without
    /// building a label set (two `String`s and a `Vec`) per request.
    http_histograms: std::sync::RwLock<RequestHistograms>,
}

/// Route template → (status, histogram) pairs (a route answers few
/// statuses).
type RequestHistograms = std::collections::HashMap<Box<str>, Vec<(u16, Histogram)>>;

impl ApiState {
    /// The HTTP state of a node whose held requests end when `stopping`
    /// fires.
    pub fn new(node: NodeState, tokens: Vec<String>, stopping: CancellationToken) -> ApiState {
        let registry = ops::registry(node.clone());
        let long_polls = Arc::new(tokio::sync::Semaphore::new(node.config.max_long_polls()));
        ApiState(Arc::new(ApiParts {
            node,
            tokens,
            registry,
            long_polls,
            stopping,
            http_histograms: Default::default(),
        }))
    }

    fn long_polls(&self) -> &Arc<tokio::sync::Semaphore> {
        &self.0.long_polls
    }

    fn stopping(&self) -> &CancellationToken {
        &self.0.stopping
    }

    fn registry(&self) -> &prometheus_client::registry::Registry {
        &self.0.registry
    }

    pub fn node(&self) -> &NodeState {
        &self.0.node
    }

    fn tokens(&self) -> &[String] {
        &self.0.tokens
    }

    /// The duration histogram of requests to `route` answered `status`.
    fn request_histogram(&self, route: &str, status: u16) -> Histogram {
        let cached = self.0.http_histograms.read().ok().and_then(|h| {
            h.get(route)
                .and_then(|s| s.iter().find(|(c, _)| *c == status))
                .map(|(_, h)| h.clone())
        });
        if let Some(h) = cached {
            return h;
        }
        let labels = vec![
            ("route".to_owned(), route.to_owned()),
            ("status".to_owned(), status.to_string()),
        ];
        let h = self.metrics.http.get_or_create(&labels).clone();
        if let Ok(mut cache) = self.0.http_histograms.write() {
            let statuses = cache.entry(route.into()).or_default();
            if !statuses.iter().any(|(c, _)| *c == status) {
                statuses.push((status, h.clone()));
            }
        }
        h
    }
}

impl ApiState {
    /// Runs `f` on one read transaction of the store without blocking this
    /// async thread for long. The fast path reads here: a lookup is a few
    /// microseconds of redb reads from its page cache, cheaper than a hop
    /// to the blocking pool (see docs/PERFORMANCE.md). Only when the store
    /// is being reopened, or the handle turns out poisoned by a writer's
    /// I/O error, the read moves to the blocking pool, where it waits for
    /// the writer's reopen and runs once more
    /// ([`Store::read_with`](crate::store::Store::read_with)); a
    /// store that does not come back in time is `503` with `Retry-After`,
    /// never `500`. A reader never reopens the file itself.
    pub(crate) async fn read<T, F>(&self, f: F) -> Result<T, Problem>
    where
        F: Fn(&Reader) -> crate::store::Result<T> + Send + 'static,
        T: Send + 'static,
    {
        match self.store.try_read().and_then(|r| f(&r)) {
            Err(e) if e.is_transient() => {}
            done => return done.map_err(Problem::from),
        }
        let store = self.store.clone();
        blocking(move || store.read_with(STORE_WAIT, f))
            .await?
            .map_err(Problem::from)
    }

    /// A read transaction to hand to blocking work (a snapshot stream):
    /// at once when the store is open, else from the blocking pool once the
    /// reopen is done.
    pub(crate) async fn reader(&self) -> Result<Reader, Problem> {
        match self.store.try_read() {
            Err(e) if e.is_transient() => {}
            done => return done.map_err(Problem::from),
        }
        let store = self.store.clone();
        blocking(move || store.read_within(STORE_WAIT))
            .await?
            .map_err(Problem::from)
    }
}

/// How long a request waits (on the blocking pool) for the store to be
/// reopened before it is answered `503` with `Retry-After`: a reopen on a
/// full disk takes about a second.
pub const STORE_WAIT: Duration = Duration::from_secs(2);

/// Runs work that may block (store reads that wait for a reopen, status
/// documents, readiness, the metrics scrape) on tokio's blocking pool, so
/// that `/health/live` and every other request keep their async threads.
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, Problem> {
    tokio::task::spawn_blocking(f).await.map_err(|e| {
        tracing::error!(error = %e, "blocking request work failed");
        Problem::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "Internal error",
            "the request failed; see the node's log".into(),
        )
    })
}

impl std::ops::Deref for ApiState {
    type Target = NodeState;

    fn deref(&self) -> &NodeState {
        &self.0.node
    }
}

/// The longest request target (path and query) answered; a longer one gets
/// `414`. (A request head over `server::MAX_HEADER_BYTES` is refused by
/// hyper with `431` before it gets here.)
pub const MAX_URI_BYTES: usize = 8 * 1024;
/// … except on the change feed, whose `school` parameter repeats: there
/// the request head's own limit is the only one.
pub const MAX_FEED_URI_BYTES: usize = crate::server::MAX_HEADER_BYTES;

pub fn router(state: ApiState) -> Router {
    router_with(state, Router::new())
}

/// [`router`] with `extra` routes among the `/api` read routes, behind the
/// same layers (token, time and concurrency limits, metrics): the load
/// scripts' static-body baseline (`benches/static_http.rs`) uses it to be
/// served exactly as the teacher route is.
pub fn router_with(state: ApiState, extra: Router<ApiState>) -> Router {
    // Reads: the bearer token when http.token_file is set, the time and
    // concurrency limits. Only reads queue behind the limit: health checks
    // (the systemd watchdog's probe) and metrics never wait behind API
    // traffic.
    let api = read::routes()
        .split_for_parts()
        .0
        .merge(extra)
        .layer(guard::GuardLayer(guard::ReadLimits::new(state.clone())));
    // The feed's token check; without tokens configured, none at all.
    let with_token = |routes: Router<ApiState>| {
        if state.tokens().is_empty() {
            routes
        } else {
            routes.route_layer(axum::middleware::from_fn_with_state(
                state.clone(),
                require_token,
            ))
        }
    };
    // The change feed: the same tokens, but neither the time limit nor the
    // concurrency limit of the reads (a held long-poll is neither slow nor
    // busy); it has its own bound (`api::feed`).
    let feed = with_token(feed::routes().split_for_parts().0);
    let (admin, _) = admin::routes()
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            admin::admin_only,
        ))
        .split_for_parts();
    let (description, _) = openapi::routes().split_for_parts();
    let main = Router::new()
        .merge(api)
        .merge(feed)
        .merge(admin)
        .merge(description)
        .merge(page::routes().split_for_parts().0);
    let main = if state.config.http.ops_listen.is_none() {
        main.merge(ops::routes().split_for_parts().0)
    } else {
        main
    };
    finish(main, state)
}

/// `/health/*` and `/metrics` alone, for `http.ops_listen`.
pub fn ops_router(state: ApiState) -> Router {
    let (routes, _) = ops::routes().split_for_parts();
    finish(routes, state)
}

/// Fallbacks, the request-target limit and request metrics, for every
/// router.
fn finish(router: Router<ApiState>, state: ApiState) -> Router {
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
        .layer(guard::GuardLayer(guard::Edge(state.clone())))
        .with_state(state)
}

/// Whether the request carries one of the configured bearer tokens
/// (compared in constant time).
fn has_token(state: &ApiState, headers: &axum::http::HeaderMap) -> bool {
    use subtle::ConstantTimeEq;
    let Some(given) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
    else {
        return false;
    };
    state.tokens().iter().fold(false, |found, t| {
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
    axum::extract::State(s): axum::extract::State<ApiState>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if s.tokens().is_empty() || has_token(&s, request.headers()) {
        next.run(request).await
    } else {
        unauthorized()
    }
}

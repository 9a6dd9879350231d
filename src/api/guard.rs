//! The layers requests pass on their way to a handler, written out as
//! plain tower services: [`Edge`] on every route (the request-target limit
//! and the request metrics) and [`ReadLimits`] on the `/api` reads (bearer
//! token, concurrency and time limits), each a [`Guard`] around the route.
//! axum's `from_fn` middlewares and tower's stacked limit layers did the
//! same in about 2 µs per request (in-process, `docs/PERFORMANCE.md`):
//! each of them boxes and clones the rest of the chain; these box one
//! future per layer.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::extract::{MatchedPath, Request};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use tokio::sync::Semaphore;
use tower::{Layer, Service};

use super::{ApiState, Problem, MAX_FEED_URI_BYTES, MAX_URI_BYTES};

type Answer = Pin<Box<dyn Future<Output = Result<Response, Infallible>> + Send>>;

/// What a layer does with a request, given the service behind it.
pub(super) trait Guard: Clone + Send + Sync + 'static {
    fn handle<S>(&self, inner: S, request: Request) -> Answer
    where
        S: Service<Request, Response = Response, Error = Infallible> + Send + 'static,
        S::Future: Send + 'static;
}

/// The layer that puts each route behind the guard `G`.
#[derive(Clone)]
pub(super) struct GuardLayer<G>(pub(super) G);

impl<S, G: Guard> Layer<S> for GuardLayer<G> {
    type Service = Guarded<S, G>;

    fn layer(&self, inner: S) -> Self::Service {
        Guarded {
            inner,
            guard: self.0.clone(),
        }
    }
}

/// A route's service behind the guard `G`.
#[derive(Clone)]
pub(super) struct Guarded<S, G> {
    inner: S,
    guard: G,
}

impl<S, G> Service<Request> for Guarded<S, G>
where
    S: Service<Request, Response = Response, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send + 'static,
    G: Guard,
{
    type Response = Response;
    type Error = Infallible;
    type Future = Answer;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request) -> Answer {
        // The service that was polled ready is the one to call (tower's
        // contract): take it, and leave a fresh clone in its place.
        let fresh = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, fresh);
        self.guard.handle(inner, request)
    }
}

/// On every route and fallback: refuses request targets over
/// [`MAX_URI_BYTES`] (the change feed: [`MAX_FEED_URI_BYTES`]) with `414`,
/// and records each routed request's duration by route template and
/// status.
#[derive(Clone)]
pub(super) struct Edge(pub(super) ApiState);

impl Guard for Edge {
    fn handle<S>(&self, mut inner: S, request: Request) -> Answer
    where
        S: Service<Request, Response = Response, Error = Infallible> + Send + 'static,
        S::Future: Send + 'static,
    {
        let len = request
            .uri()
            .path_and_query()
            .map_or(0, |p| p.as_str().len());
        let max = if request.uri().path() == "/api/changes" {
            MAX_FEED_URI_BYTES
        } else {
            MAX_URI_BYTES
        };
        if len > max {
            let refused = Problem::new(
                StatusCode::URI_TOO_LONG,
                "uri-too-long",
                "URI too long",
                format!("the request target is {len} bytes; at most {max} are accepted"),
            );
            return Box::pin(std::future::ready(Ok(refused.into_response())));
        }
        // Fallbacks (no route matched) are not timed: their paths are the
        // clients' to choose, and a label per path would grow unbounded.
        let Some(route) = request.extensions().get::<MatchedPath>().cloned() else {
            return Box::pin(inner.call(request));
        };
        let state = self.0.clone();
        let started = Instant::now();
        let answer = inner.call(request);
        Box::pin(async move {
            let Ok(response) = answer.await;
            state
                .request_histogram(route.as_str(), response.status().as_u16())
                .observe(started.elapsed().as_secs_f64());
            Ok(response)
        })
    }
}

/// On the `/api` read routes: the bearer token (when `http.token_file`
/// is set), then at most `http.max_concurrent_requests` handlers at once
/// (further requests wait their turn), each answered within
/// `http.request_timeout_secs` of its turn or `408`. Health checks,
/// metrics and the change feed never wait behind these limits.
#[derive(Clone)]
pub(super) struct ReadLimits {
    state: ApiState,
    permits: Arc<Semaphore>,
    timeout: Duration,
}

impl ReadLimits {
    pub(super) fn new(state: ApiState) -> ReadLimits {
        let http = &state.config.http;
        ReadLimits {
            permits: Arc::new(Semaphore::new(http.max_concurrent_requests)),
            timeout: Duration::from_secs(http.request_timeout_secs),
            state,
        }
    }
}

impl Guard for ReadLimits {
    fn handle<S>(&self, mut inner: S, request: Request) -> Answer
    where
        S: Service<Request, Response = Response, Error = Infallible> + Send + 'static,
        S::Future: Send + 'static,
    {
        if !self.state.tokens().is_empty() && !super::has_token(&self.state, request.headers()) {
            return Box::pin(std::future::ready(Ok(super::unauthorized())));
        }
        let permits = self.permits.clone();
        let timeout = self.timeout;
        Box::pin(async move {
            // Waiting for a slot does not count towards the time limit.
            let _permit = match permits.try_acquire() {
                Ok(permit) => permit,
                Err(_) => permits.acquire().await.expect("never closed"),
            };
            match tokio::time::timeout(timeout, inner.call(request)).await {
                Ok(answer) => answer,
                Err(_) => Ok(Problem::new(
                    StatusCode::REQUEST_TIMEOUT,
                    "timeout",
                    "Request timeout",
                    "the request took longer than http.request_timeout_secs".into(),
                )
                .into_response()),
            }
        })
    }
}

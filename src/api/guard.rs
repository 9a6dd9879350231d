//! The layers requests pass on their way to a handler, written out as two
//! plain tower services: [`Edge`] on every route (the request-target limit
//! and the request metrics) and [`ReadLimits`] on the `/api` reads (bearer
//! token, concurrency and time limits). axum's `from_fn` middlewares and
//! tower's stacked limit layers did the same in about 2 µs per request
//! (in-process, `docs/PERFORMANCE.md`): each of them boxes and clones the
//! rest of the chain; these box one future per layer.

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

/// The service that was polled ready is the one to call (tower's
/// contract): take it, and leave a fresh clone in its place.
fn take<S: Clone>(inner: &mut S) -> S {
    let fresh = inner.clone();
    std::mem::replace(inner, fresh)
}

/// On every route and fallback: refuses request targets over
/// [`MAX_URI_BYTES`] (the change feed: [`MAX_FEED_URI_BYTES`]) with `414`,
/// and records each routed request's duration by route template and
/// status.
#[derive(Clone)]
pub(super) struct Edge(pub(super) ApiState);

impl<S> Layer<S> for Edge {
    type Service = EdgeService<S>;

    fn layer(&self, inner: S) -> EdgeService<S> {
        EdgeService {
            inner,
            state: self.0.clone(),
        }
    }
}

#[derive(Clone)]
pub(super) struct EdgeService<S> {
    inner: S,
    state: ApiState,
}

impl<S> Service<Request> for EdgeService<S>
where
    S: Service<Request, Response = Response, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = Response;
    type Error = Infallible;
    type Future = Answer;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request) -> Answer {
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
            return Box::pin(take(&mut self.inner).call(request));
        };
        let state = self.state.clone();
        let started = Instant::now();
        let answer = take(&mut self.inner).call(request);
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

impl<S> Layer<S> for ReadLimits {
    type Service = Limited<S>;

    fn layer(&self, inner: S) -> Limited<S> {
        Limited {
            inner,
            limits: self.clone(),
        }
    }
}

#[derive(Clone)]
pub(super) struct Limited<S> {
    inner: S,
    limits: ReadLimits,
}

impl<S> Service<Request> for Limited<S>
where
    S: Service<Request, Response = Response, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = Response;
    type Error = Infallible;
    type Future = Answer;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request) -> Answer {
        let limits = &self.limits;
        if !limits.state.tokens().is_empty() && !super::has_token(&limits.state, request.headers())
        {
            return Box::pin(std::future::ready(Ok(super::unauthorized())));
        }
        let permits = limits.permits.clone();
        let timeout = limits.timeout;
        let mut inner = take(&mut self.inner);
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

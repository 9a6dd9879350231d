//! The HTTP server loop: accepts connections and drives each with hyper's
//! HTTP/1.1 connection, with the limits that keep hostile clients from
//! exhausting the node (`axum::serve` exposes none of them):
//!
//! - at most `http.max_connections` connections at once per listener; the
//!   loop stops accepting while that many are open, so further clients wait
//!   in the kernel's accept queue, and existing connections go on being
//!   served;
//! - a connection must send a whole request head (request line and
//!   headers) within `http.header_read_timeout_secs`, or it is closed
//!   (slowloris); hyper counts the time spent idle between keep-alive
//!   requests the same way, so idle connections free their slot too;
//! - a request head larger than [`MAX_HEADER_BYTES`] is answered `431` by
//!   hyper and the connection closed, so each connection buffers little.
//!
//! Graceful shutdown: when `stop` fires the listener is closed; connections
//! with a request in progress (handler running or response body still
//! being written) finish it and close, all others (idle, or still sending
//! a request head) close at once. `serve` returns when every connection has
//! ended.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::Router;
use bytes::Bytes;
use hyper::body::{Frame, Incoming, SizeHint};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

/// The largest request head (request line and headers) accepted; larger
/// ones are answered `431 Request Header Fields Too Large`.
pub const MAX_HEADER_BYTES: usize = 32 * 1024;

/// Limits of one listener.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub max_connections: usize,
    pub header_read_timeout: Duration,
}

impl Limits {
    pub fn of(config: &crate::config::HttpConfig) -> Limits {
        Limits {
            max_connections: config.max_connections,
            header_read_timeout: Duration::from_secs(config.header_read_timeout_secs),
        }
    }
}

/// Serves `app` on `listener` until `stop` fires and every connection has
/// ended. Handlers see the peer address as `ConnectInfo<SocketAddr>`.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: Limits,
    stop: CancellationToken,
) -> std::io::Result<()> {
    let local = listener.local_addr()?;
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_header_size(MAX_HEADER_BYTES);
    let mut saturated = false;
    loop {
        // A slot first, then accept: while every slot is taken, new clients
        // wait in the accept queue instead of costing memory here.
        let slot = match slots.clone().try_acquire_owned() {
            Ok(slot) => {
                if std::mem::take(&mut saturated) {
                    tracing::info!(%local, "below http.max_connections again; accepting");
                }
                slot
            }
            Err(_) => {
                if !saturated {
                    saturated = true;
                    tracing::warn!(
                        %local,
                        max_connections = limits.max_connections,
                        "http.max_connections reached: new connections wait until one closes"
                    );
                }
                tokio::select! {
                    slot = slots.clone().acquire_owned() => slot.expect("the semaphore is never closed"),
                    _ = stop.cancelled() => break,
                }
            }
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    accept_error(e).await;
                    continue;
                }
            },
            _ = stop.cancelled() => break,
        };
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(error = %e, %peer, "cannot set TCP_NODELAY");
        }
        tokio::spawn(connection(
            http.clone(),
            stream,
            peer,
            app.clone(),
            stop.clone(),
            slot,
        ));
    }
    drop(listener); // clients still in the accept queue are refused
                    // Every connection holds a slot until it ends.
    let all = u32::try_from(limits.max_connections).expect("at most 100000 connections");
    let _ = slots.acquire_many(all).await;
    Ok(())
}

/// Drives one connection until it ends (or, at shutdown, until its request
/// in progress is answered).
async fn connection(
    http: hyper::server::conn::http1::Builder,
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    app: Router,
    stop: CancellationToken,
    _slot: tokio::sync::OwnedSemaphorePermit,
) {
    let busy = Arc::new(AtomicUsize::new(0));
    let in_progress = busy.clone();
    let service = hyper::service::service_fn(move |mut request: hyper::Request<Incoming>| {
        let guard = Busy::enter(&in_progress);
        request.extensions_mut().insert(ConnectInfo(peer));
        let app = app.clone();
        async move {
            let response = app
                .oneshot(request.map(Body::new))
                .await
                .unwrap_or_else(|never: Infallible| match never {});
            // The request stays in progress until its body is written.
            Ok::<_, Infallible>(response.map(|body| Tracked { body, _busy: guard }))
        }
    });
    let conn = http.serve_connection(TokioIo::new(stream), service);
    tokio::pin!(conn);
    let result = tokio::select! {
        result = conn.as_mut() => result,
        _ = stop.cancelled() => {
            if busy.load(Ordering::Acquire) == 0 {
                return; // idle, or still sending its request head: close now
            }
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = result {
        if e.is_timeout() {
            tracing::debug!(%peer, "connection closed: no complete request head within http.header_read_timeout_secs");
        } else {
            tracing::debug!(%peer, error = %e, "connection ended with an error");
        }
    }
}

/// Counts a connection's requests in progress while alive.
struct Busy(Arc<AtomicUsize>);

impl Busy {
    fn enter(count: &Arc<AtomicUsize>) -> Busy {
        count.fetch_add(1, Ordering::AcqRel);
        Busy(count.clone())
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A response body that keeps its request counted as in progress until
/// hyper has written it (or dropped it).
struct Tracked {
    body: Body,
    _busy: Busy,
}

impl hyper::body::Body for Tracked {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// Accept errors: a connection that failed before we took it is nobody's
/// concern; running out of file descriptors or memory is, so log it and
/// wait a moment for connections to close instead of spinning.
async fn accept_error(e: std::io::Error) {
    use std::io::ErrorKind::*;
    if matches!(
        e.kind(),
        ConnectionRefused | ConnectionAborted | ConnectionReset
    ) {
        return;
    }
    tracing::error!(error = %e, "accepting a connection failed; retrying in 1 s");
    tokio::time::sleep(Duration::from_secs(1)).await;
}

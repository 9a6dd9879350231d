//! The ceiling the load scripts compare the teacher route with: the node's
//! own HTTP stack — `api::router_with` (the `/api` layers: time and
//! concurrency limits, metrics, URI limit) served by `server::serve` with
//! the default connection limits, on a multi-threaded tokio runtime —
//! answering `GET /api/static` with a constant JSON body of a given size
//! instead of a store lookup. The store behind it is an empty in-memory one.
//!
//! With `--plain` it is the ceiling itself instead: plain axum
//! (`axum::serve`, one route, no layers, the default tokio runtime) answering
//! the same body — what the issue's "teacher route vs plain axum" compares
//! with.
//!
//! Run: `cargo bench --bench static_http -- --bytes 3200 --listen 127.0.0.1:8090 [--plain]`
//! (`benches/load/run.sh` starts both next to the node and measures all
//! three, interleaved, in one run).

use std::net::SocketAddr;
use std::sync::Arc;

use axum::routing::get;
use axum::Router;
use emis_edge::api::ApiState;
use emis_edge::config::Config;

/// The node's allocator (see `src/main.rs`), so that only the route differs.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn main() {
    if std::env::args().any(|a| a == "--list" || a == "--test") {
        return; // `cargo test --benches` / `--list`: nothing to run quickly
    }
    let bytes: usize = arg("--bytes").map_or(3200, |b| b.parse().expect("--bytes N"));
    let listen: SocketAddr = arg("--listen")
        .unwrap_or_else(|| "127.0.0.1:8090".into())
        .parse()
        .expect("--listen ADDR");
    // A JSON object of exactly `bytes` bytes.
    let pad = bytes.saturating_sub(r#"{"pad":""}"#.len());
    let body = bytes::Bytes::from(format!(r#"{{"pad":"{}"}}"#, "x".repeat(pad)));
    if std::env::args().any(|a| a == "--plain") {
        return plain(listen, body);
    }
    let config = Config::default();
    let node = emis_edge::state::NodeState::new(
        Arc::new(emis_edge::store::Store::open_in_memory().unwrap()),
        config.clone(),
        Arc::new(emis_edge::clock::SystemClock),
    );
    let state = ApiState::new(node, Vec::new(), Default::default());
    let extra = Router::new().route(
        "/api/static",
        get(move || {
            let body = body.clone();
            async move {
                (
                    [(axum::http::header::CONTENT_TYPE, "application/json")],
                    body,
                )
            }
        }),
    );
    let app = emis_edge::api::router_with(state, extra);
    let limits = emis_edge::server::Limits::of(&config.http);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let listener = tokio::net::TcpListener::bind(listen).await.unwrap();
        eprintln!("static_http: {bytes} bytes on http://{listen}/api/static");
        emis_edge::server::serve(
            listener,
            app,
            limits,
            tokio_util::sync::CancellationToken::new(),
        )
        .await
        .unwrap();
    });
}

/// Plain axum: `axum::serve`, one route, no layers.
fn plain(listen: SocketAddr, body: bytes::Bytes) {
    let bytes = body.len();
    let app = Router::new().route(
        "/api/static",
        get(move || {
            let body = body.clone();
            async move {
                (
                    [(axum::http::header::CONTENT_TYPE, "application/json")],
                    body,
                )
            }
        }),
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let listener = tokio::net::TcpListener::bind(listen).await.unwrap();
        eprintln!("static_http --plain: {bytes} bytes on http://{listen}/api/static");
        axum::serve(listener, app).await.unwrap();
    });
}

//! The ceiling the load scripts compare the teacher route with: the node's
//! HTTP stack (axum on a multi-threaded tokio runtime, with the same tower
//! time and concurrency limits as the node's `/api` routes) answering a
//! static JSON body of a given size, with no store behind it.
//!
//! Run: `cargo bench --bench static_http -- --bytes 3200 --listen 127.0.0.1:8090`
//! (`benches/load/run.sh` starts it next to the node and measures both in
//! one run). `GET /static` answers the body.

use std::net::SocketAddr;
use std::time::Duration;

use axum::routing::get;
use axum::Router;

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
    let defaults = emis_edge::config::Config::default();
    // A JSON object of exactly `bytes` bytes.
    let pad = bytes.saturating_sub(r#"{"pad":""}"#.len());
    let body = bytes::Bytes::from(format!(r#"{{"pad":"{}"}}"#, "x".repeat(pad)));
    let app = Router::new()
        .route(
            "/static",
            get(move || {
                let body = body.clone();
                async move {
                    (
                        [(axum::http::header::CONTENT_TYPE, "application/json")],
                        body,
                    )
                }
            }),
        )
        .layer(
            tower::ServiceBuilder::new()
                .layer(axum::error_handling::HandleErrorLayer::new(
                    |_: tower::BoxError| async { axum::http::StatusCode::SERVICE_UNAVAILABLE },
                ))
                .layer(tower::timeout::TimeoutLayer::new(Duration::from_secs(
                    defaults.http.request_timeout_secs,
                )))
                .layer(tower::limit::GlobalConcurrencyLimitLayer::new(
                    defaults.http.max_concurrent_requests,
                )),
        );
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let listener = tokio::net::TcpListener::bind(listen).await.unwrap();
        eprintln!("static_http: {bytes} bytes on http://{listen}/static");
        axum::serve(listener, app).await.unwrap();
    });
}

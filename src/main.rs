//! The `emis-edge` binary: everything lives in the library; see `cli`.

/// mimalloc instead of glibc's allocator: a long-running node with several
/// threads (HTTP workers, the consumer, blocking store work) kept growing
/// glibc's per-thread arenas in the soak test; mimalloc returns memory and
/// is faster on the per-request allocations.
#[cfg(not(feature = "dhat-heap"))]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// A heap-profiling build (`--features dhat-heap`): every allocation is
/// recorded with its call stack.
#[cfg(feature = "dhat-heap")]
#[global_allocator]
static ALLOCATOR: dhat::Alloc = dhat::Alloc;

fn main() -> std::process::ExitCode {
    // Written when the command returns (after `serve`: on SIGTERM).
    #[cfg(feature = "dhat-heap")]
    let _profiler = dhat::Profiler::builder()
        .file_name(
            std::env::var_os("EMIS_EDGE_DHAT_FILE").unwrap_or_else(|| "dhat-heap.json".into()),
        )
        .build();
    emis_edge::cli::run()
}

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
    // No transparent huge pages for this process. mimalloc asks for them
    // on its arenas (madvise), and the kernel's khugepaged then fills a
    // partly used 2 MiB range with zeroed pages to make a huge one: a node
    // that has just gone quiet grew by 60-90 MiB of resident memory in two
    // minutes, without allocating (docs/PERFORMANCE.md, "Soak").
    if let Err(e) = rustix::thread::disable_transparent_huge_pages(true) {
        eprintln!("emis-edge: transparent huge pages stay enabled ({e})");
    }
    // Written when the command returns (after `serve`: on SIGTERM).
    #[cfg(feature = "dhat-heap")]
    let _profiler = dhat::Profiler::builder()
        .file_name(
            std::env::var_os("EMIS_EDGE_DHAT_FILE").unwrap_or_else(|| "dhat-heap.json".into()),
        )
        .build();
    emis_edge::cli::run()
}

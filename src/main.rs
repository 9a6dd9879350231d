//! The `emis-edge` binary: everything lives in the library; see `cli`.

/// mimalloc instead of glibc's allocator: a long-running node with several
/// threads (HTTP workers, the consumer, blocking store work) kept growing
/// glibc's per-thread arenas in the soak test; mimalloc returns memory and
/// is faster on the per-request allocations.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    emis_edge::cli::run()
}

//! The `emis-edge` binary: everything lives in the library; see `cli`.

fn main() -> std::process::ExitCode {
    emis_edge::cli::run()
}

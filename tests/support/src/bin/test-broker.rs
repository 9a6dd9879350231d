//! `test-broker`: the test broker for scripts. Starts tansu with in-memory
//! storage on 127.0.0.1, creates the nine EMIS topics, prints the bootstrap
//! address (`127.0.0.1:PORT`) as one line on stdout once they exist, and
//! stays in the foreground until SIGTERM or SIGINT, then stops tansu. Used
//! by `benches/load/lib.sh`; see the `test_support` crate for tansu's known
//! faults.

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use test_support::{Options, Tansu};
use tokio::signal::unix::{signal, SignalKind};

const USAGE: &str = "\
usage: test-broker [--port PORT] [--partitions N]
       test-broker --which

Starts tansu (EMIS_EDGE_TANSU, else tansu on PATH or in ~/.cargo/bin) with
in-memory storage on 127.0.0.1:PORT (default: a free port), creates the nine
EMIS topics with N partitions each (default 3), prints 127.0.0.1:PORT on
stdout and runs until SIGTERM or SIGINT. tansu's own log goes to stderr.
--which prints the tansu binary it would run (exit 2 when there is none).

tansu 0.6.0 has two known faults: a fetch from an offset inside a record
batch starts at the next batch, and the latest offset it reports is the last
batch's base + 1. Whoever restarts a node against it must produce one record
per batch (batch.num.messages=1). See docs/HARDENING.md.";

fn main() -> ExitCode {
    let mut options = Options {
        show_logs: true,
        ..Options::default()
    };
    let mut which = false;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        if arg == "-h" || arg == "--help" {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        if arg == "--which" {
            which = true;
            continue;
        }
        let value = args.next();
        match (arg.as_str(), value.as_deref().map(str::parse::<u16>)) {
            ("--port", Some(Ok(p))) if p > 0 => options.port = Some(p),
            ("--partitions", Some(Ok(n))) if n > 0 => options.partitions = i32::from(n),
            _ => {
                eprintln!("test-broker: bad argument {arg:?}\n\n{USAGE}");
                return ExitCode::from(2);
            }
        }
    }
    let Some(bin) = Tansu::binary() else {
        eprintln!(
            "test-broker: tansu not found (cargo install tansu --locked --features dynostore, \
             or EMIS_EDGE_TANSU=/path/to/tansu)"
        );
        return ExitCode::from(2);
    };
    if which {
        println!("{}", bin.display());
        return ExitCode::SUCCESS;
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("test-broker: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(&bin, &options)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("test-broker: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(bin: &std::path::Path, options: &Options) -> Result<(), String> {
    // Signals first, so that a stop during startup still stops tansu.
    let mut term = signal(SignalKind::terminate()).map_err(|e| e.to_string())?;
    let mut int = signal(SignalKind::interrupt()).map_err(|e| e.to_string())?;
    let mut tansu = Tansu::start(bin, options).map_err(|e| e.to_string())?;
    let mut out = std::io::stdout();
    writeln!(out, "{}", tansu.brokers())
        .and_then(|()| out.flush())
        .map_err(|e| e.to_string())?;
    let mut check = tokio::time::interval(Duration::from_millis(500));
    loop {
        tokio::select! {
            _ = term.recv() => return Ok(()),
            _ = int.recv() => return Ok(()),
            _ = check.tick() => {
                if let Some(status) = tansu.exited() {
                    return Err(format!("tansu exited ({status})"));
                }
            }
        }
    }
}

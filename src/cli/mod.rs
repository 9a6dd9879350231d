//! The command line (contract §5): parses arguments, loads configuration,
//! sets up logging, and maps every outcome to an exit code —
//! 0 success, 2 bad usage or invalid config, 1 runtime failure.
//!
//! This file holds what every subcommand shares: the clap definitions (so
//! the whole command surface and its `--help` text read in one place), the
//! dispatch in [`run`], configuration loading, logging, the exit-code
//! helpers, asking the running node over HTTP (redb lets one process hold
//! the store, so a command first tries the node and only then opens the
//! file), opening the store, the progress display and the per-school outcome
//! lines. Each subcommand's own work lives in a file of its own: `serve`
//! (with `check-config`), `status`, `resync`, `transfer` (`export` and
//! `import`) and `gen`; `demo` only hands its options to `crate::demo`, so
//! its dispatch stays here.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};

use crate::config::{Config, ConfigError, DEFAULT_CONFIG_PATH};
use crate::store::{Store, StoreOptions};

mod compact;
mod gen;
mod resync;
mod serve;
mod status;
mod transfer;

#[derive(Parser, Debug)]
#[command(
    name = "emis-edge",
    version,
    about = "EMIS edge node: a local replica of its schools' classes, teachers and assignments",
    long_about = "EMIS edge node.\n\nSubscribes to the EMIS change events (Kafka) of the schools it serves, keeps a \
                  local replica in one redb file under node.data_dir, and answers teacher-detail \
                  lookups over HTTP from that file alone — also while Kafka or the WAN is down.\n\n\
                  Configuration: built-in defaults, then the TOML file, then environment variables \
                  EMIS_EDGE__SECTION__KEY (e.g. EMIS_EDGE__KAFKA__BROKERS). See \
                  config/edge.example.toml for every key.\n\n\
                  Exit codes: 0 success, 2 bad usage or invalid configuration, 1 runtime failure."
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the node: consume events, keep the store, serve HTTP, until SIGTERM/SIGINT.
    Serve {
        /// Configuration file. Without it, /etc/emis-edge/edge.toml is read if it
        /// exists, else the built-in defaults apply.
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Validate a configuration file (with environment overrides) and print the
    /// effective configuration, secrets redacted. Exit 0 if valid, 2 if not.
    CheckConfig {
        /// The configuration file to check.
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Print the sync status: per-partition lag, last event, last resync, dead
    /// letters, staleness. Asks the running node over HTTP (http.listen); when
    /// none runs, reads the store file directly.
    Status {
        /// Configuration file (default as for `serve`).
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// Print the status document as JSON instead of a summary.
        #[arg(long)]
        json: bool,
        /// Also print where the store file's bytes go, per table: entries,
        /// stored bytes, B-tree overhead, unused page space, pages; and the
        /// file's allocated size and free share. On a stopped node this
        /// reads the whole file.
        #[arg(long)]
        tables: bool,
    },
    /// Run one resync now: fetch each served school's snapshot from
    /// resync.central_url and reconcile (all or nothing per school). Through
    /// the running node if there is one, else on the store directly.
    Resync {
        /// Configuration file.
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        /// Only this school (repeatable); default: every served school.
        #[arg(long = "school", value_name = "ID")]
        schools: Vec<uuid::Uuid>,
        /// Change nothing; report per school and entity kind what is missing,
        /// extra, older or newer locally (drift audit).
        #[arg(long)]
        dry_run: bool,
    },
    /// Write schools' snapshots (NDJSON, the snapshot format) to a file, e.g.
    /// for a USB stick. Through the running node if there is one.
    Export {
        /// Configuration file.
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        /// A school to export (repeatable); default: every served school.
        #[arg(long = "school", value_name = "ID")]
        schools: Vec<uuid::Uuid>,
        /// The file to write.
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
    /// DEMO: run a node against an in-process Kafka cluster fed with a
    /// generated province; prints curl commands with real ids and keeps
    /// publishing changes (and a few malformed events) until Ctrl-C. Needs
    /// nothing installed; not for production.
    Demo {
        /// Data-set size: tiny, demo (1,000 teachers), province (100,000
        /// teachers, 1.1 M events), national.
        #[arg(long, default_value = "demo", value_parser = clap::builder::PossibleValuesParser::new(crate::gen::Spec::SCALES))]
        scale: String,
        /// Seed of the generator; the same seed gives the same ids.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Where the demo node answers HTTP (port 0: any free port).
        #[arg(long, default_value = "127.0.0.1:8080", value_name = "ADDR")]
        listen: std::net::SocketAddr,
        /// Keep the store in this directory after the demo (it must not
        /// hold a store yet; default: a temporary directory removed at the
        /// end).
        #[arg(long, value_name = "DIR")]
        data_dir: Option<PathBuf>,
        /// Changes published per second after the initial load (0: none).
        #[arg(long, default_value_t = 20, value_name = "PER_SEC")]
        rate: u32,
        /// Of every thousand changes published, how many are malformed.
        #[arg(long, default_value_t = 20, value_name = "N")]
        malformed_per_mille: u32,
        /// Also start N school nodes (in-process, each on its own port and
        /// temporary store) that follow this provincial node's change feed,
        /// one school each.
        #[arg(long, default_value_t = 0, value_name = "N")]
        followers: u32,
    },
    /// Generate realistic Vietnamese EMIS data, deterministically from a seed:
    /// a snapshot file for `import` (--out), every entity's `created` event
    /// published to a broker (--brokers), then optionally a steady trickle of
    /// changes (--trickle), and the teacher ids for load scripts
    /// (--teacher-ids). For tests, benchmarks and load tests.
    Gen(GenArgs),
    /// Give the store file's free pages back to the file system (redb's
    /// compaction), on a stopped node: exit 1 if a node answers at
    /// http.listen. Prints the file's size before and after. A running node
    /// compacts by itself at start when the free share is at least
    /// store.compact_at_free_share; an offline import compacts when done.
    Compact {
        /// Configuration file.
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Load a snapshot file (from `export` or central) into the store: all or
    /// nothing per school; a truncated or corrupt school changes nothing and
    /// its line is named. Through the running node if there is one.
    Import {
        /// Configuration file.
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        /// The snapshot file to import.
        #[arg(value_name = "FILE")]
        file: PathBuf,
    },
}

/// The options of `gen`, in a struct of their own: too many to pass one by
/// one.
#[derive(clap::Args, Debug)]
struct GenArgs {
    /// Data-set size: tiny (3 schools), demo (25 schools, 1,000
    /// teachers), province (1,000 schools: 100,000 teachers and classes,
    /// ~1 M assignments), national (10,000 schools).
    #[arg(long, default_value = "demo", value_parser = clap::builder::PossibleValuesParser::new(crate::gen::Spec::SCALES))]
    scale: String,
    /// Seed of the generator; the same seed gives the same data.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Override the scale's number of schools.
    #[arg(long, value_name = "N")]
    schools: Option<u32>,
    /// Override the scale's classes per school.
    #[arg(long, value_name = "N")]
    classes_per_school: Option<u32>,
    /// Override the scale's teachers per school.
    #[arg(long, value_name = "N")]
    teachers_per_school: Option<u32>,
    /// Write a snapshot file (contract §3) of every school.
    #[arg(long, value_name = "FILE")]
    out: Option<PathBuf>,
    /// Write every teacher id, one per line.
    #[arg(long, value_name = "FILE")]
    teacher_ids: Option<PathBuf>,
    /// Publish to these Kafka brokers (the contract's default topics).
    #[arg(long, value_name = "HOST:PORT,…")]
    brokers: Option<String>,
    /// With --brokers: do not publish the data set, only the trickle.
    #[arg(long)]
    skip_initial: bool,
    /// With --brokers: then publish this many changes per second.
    #[arg(long, default_value_t = 0, value_name = "PER_SEC")]
    trickle: u32,
    /// Stop the trickle after this many seconds (default: at Ctrl-C).
    #[arg(long, value_name = "SECS")]
    duration_secs: Option<u64>,
    /// Of every thousand trickled changes, how many are malformed.
    #[arg(long, default_value_t = 0, value_name = "N")]
    malformed_per_mille: u32,
}

/// The entry point of the binary.
pub fn run() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve { config } => serve::serve(config.as_deref()),
        Command::CheckConfig { config } => serve::check_config(&config),
        Command::Status {
            config,
            json,
            tables,
        } => {
            let config = match load(config.as_deref()) {
                Ok(c) => c,
                Err(code) => return code,
            };
            match status::status(&config, json, tables) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail(&e),
            }
        }
        Command::Resync {
            config,
            schools,
            dry_run,
        } => with_config(&config, |c| resync::resync(c, schools, dry_run)),
        Command::Export {
            config,
            schools,
            out,
        } => with_config(&config, |c| transfer::export(c, schools, &out)),
        Command::Import { config, file } => with_config(&config, |c| transfer::import(c, &file)),
        Command::Compact { config } => with_config(&config, compact::compact),
        Command::Demo {
            scale,
            seed,
            listen,
            data_dir,
            rate,
            malformed_per_mille,
            followers,
        } => {
            init_logging(&Config::default());
            let options = crate::demo::Options {
                spec: crate::gen::Spec::scale(&scale, seed).expect("clap checked the scale"),
                data_dir,
                listen,
                rate,
                malformed_per_mille,
                followers,
            };
            let result = tokio::runtime::Runtime::new()
                .map_err(anyhow::Error::new)
                .and_then(|rt| {
                    rt.block_on(crate::demo::run(options, crate::node::shutdown_signal()))
                });
            match result {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail(&e),
            }
        }
        Command::Gen(args) => gen::gen(args),
    }
}

fn fail(e: &anyhow::Error) -> ExitCode {
    eprintln!("emis-edge: {e:#}");
    ExitCode::from(1)
}

fn config_error(e: &ConfigError) -> ExitCode {
    eprintln!("emis-edge: invalid configuration: {e}");
    ExitCode::from(2)
}

/// `--config FILE`, else the default path if it exists, else defaults.
fn load(explicit: Option<&Path>) -> Result<Config, ExitCode> {
    let default = Path::new(DEFAULT_CONFIG_PATH);
    let file = explicit.or(default.exists().then_some(default));
    Config::load(file, std::env::vars()).map_err(|e| config_error(&e))
}

/// Runs a command that needs `--config FILE`: exit 2 if the configuration
/// is invalid, 1 if the command fails or reports a failed school.
fn with_config(path: &Path, f: impl FnOnce(&Config) -> anyhow::Result<bool>) -> ExitCode {
    let config = match Config::load(Some(path), std::env::vars()) {
        Ok(c) => c,
        Err(e) => return config_error(&e),
    };
    match f(&config) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => fail(&e),
    }
}

/// journald adds its own timestamps and does not render colours: under
/// systemd (JOURNAL_STREAM is set) log plain lines without them.
fn init_logging(config: &Config) {
    let filter = std::env::var("RUST_LOG")
        .ok()
        .and_then(|spec| crate::config::log_filter(&spec).ok())
        .unwrap_or_else(|| {
            crate::config::log_filter(&config.log.level).expect("log.level is validated")
        });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false);
    if std::env::var_os("JOURNAL_STREAM").is_some() {
        builder.with_ansi(false).without_time().init();
    } else {
        use std::io::IsTerminal;
        builder.with_ansi(std::io::stderr().is_terminal()).init();
    }
}

/// The runtime of a one-shot command (the node's own is multi-threaded).
fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

fn create(path: &Path) -> anyhow::Result<std::fs::File> {
    std::fs::File::create(path)
        .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", path.display()))
}

/// Opens the store when no node runs (the node holds it otherwise).
fn open_store(config: &Config) -> anyhow::Result<Arc<Store>> {
    let path = config.store_path();
    std::fs::create_dir_all(&config.node.data_dir)?;
    let options = StoreOptions {
        cache_bytes: config.store.cache_mb << 20,
        dead_letter_max_count: config.store.dead_letter_max_count,
        ..StoreOptions::default()
    };
    Ok(Arc::new(Store::open(&path, &options)?))
}

/// The address a local client reaches the node at: a wildcard listen
/// address is reached over loopback.
fn local_addr(config: &Config) -> std::net::SocketAddr {
    crate::config::reachable(config.http.listen)
}

/// A client that sends the node's first API token (`http.token_file`),
/// when it has any: read routes need it then, and admin routes need it
/// from every peer, loopback too.
fn node_client(config: &Config, timeout: Option<Duration>) -> anyhow::Result<reqwest::Client> {
    let mut headers = reqwest::header::HeaderMap::new();
    if let Some(token) = config.load_tokens()?.into_iter().next() {
        let mut value = reqwest::header::HeaderValue::from_str(&format!("Bearer {token}"))?;
        value.set_sensitive(true);
        headers.insert(reqwest::header::AUTHORIZATION, value);
    }
    let mut builder = reqwest::Client::builder().default_headers(headers);
    if let Some(timeout) = timeout {
        builder = builder.timeout(timeout);
    }
    Ok(builder.build()?)
}

/// How the CLI reaches the running node.
enum Ask {
    /// A read route (`/api/…`): sends the node's token, short timeout.
    Read,
    /// An admin route: sends the node's token too (with `http.token_file`
    /// set the node asks it of every peer); may run for long.
    Admin,
}

/// Asks the running node at `http.listen`; `Ok(None)` when none listens
/// there, so the caller opens the store itself.
async fn ask_node(
    config: &Config,
    ask: Ask,
    method: reqwest::Method,
    path: &str,
    body: Option<reqwest::Body>,
) -> anyhow::Result<Option<serde_json::Value>> {
    let url = format!("http://{}{path}", local_addr(config));
    let client = match ask {
        Ask::Read => node_client(config, Some(Duration::from_secs(5)))?,
        Ask::Admin => node_client(config, None)?,
    };
    let mut request = client.request(method, &url);
    if let Some(body) = body {
        request = request.body(body);
    }
    match request.send().await {
        Ok(r) => {
            let status = r.status();
            let doc: serde_json::Value = r
                .json()
                .await
                .map_err(|e| anyhow::anyhow!("{url}: {status}: {e}"))?;
            anyhow::ensure!(status.is_success(), "{url}: {status}: {}", doc["detail"]);
            Ok(Some(doc))
        }
        Err(e) if e.is_connect() => Ok(None),
        Err(e) => Err(anyhow::anyhow!("asking {url}: {e}")),
    }
}

/// A progress bar on a terminal; plain log lines every so often otherwise.
fn progress(len: Option<u64>, what: &'static str) -> impl FnMut(u64) + Clone {
    use std::io::IsTerminal;
    let bar = if std::io::stderr().is_terminal() {
        let bar = match len {
            Some(n) => indicatif::ProgressBar::new(n),
            None => indicatif::ProgressBar::new_spinner(),
        };
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{msg} {wide_bar} {human_pos}/{human_len} {per_sec} ETA {eta}",
            )
            .expect("valid template"),
        );
        bar.set_message(what);
        Some(bar)
    } else {
        None
    };
    let mut last_logged = 0u64;
    let step = len.map_or(100_000, |l| (l / 10).max(1));
    move |n: u64| match &bar {
        Some(bar) => bar.set_position(n),
        None => {
            if n >= last_logged + step || n < last_logged {
                last_logged = n;
                eprintln!("emis-edge: {what}: {n}");
            }
        }
    }
}

/// One line per school of a resync or import report: `ok` with its counts
/// and one drift line per entity kind, or `FAILED` with the error. False if
/// any school failed.
fn print_outcomes(doc: &serde_json::Value) -> bool {
    let mut ok = true;
    for s in doc["schools"].as_array().into_iter().flatten() {
        match s["error"].as_str() {
            Some(e) => {
                ok = false;
                println!("{}  FAILED  {e}", s["schoolId"].as_str().unwrap_or("?"));
            }
            None => {
                let r = &s["report"];
                println!(
                    "{}  ok  records {}, changed {}, deleted {}{}",
                    s["schoolId"].as_str().unwrap_or("?"),
                    r["records"],
                    r["applied"],
                    r["deleted"],
                    if r["dryRun"] == true {
                        " (dry run: nothing changed)"
                    } else {
                        ""
                    }
                );
                for (kind, d) in r["drift"].as_object().into_iter().flatten() {
                    println!(
                        "    {kind:<10} missing {:>6}  extra {:>6}  older {:>6}  newer {:>6}  same {:>6}",
                        d["missing"], d["extra"], d["older"], d["newer"], d["same"]
                    );
                }
            }
        }
    }
    ok
}

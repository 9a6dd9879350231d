//! The command line (contract §5): parses arguments, loads configuration,
//! sets up logging, and maps every outcome to an exit code —
//! 0 success, 2 bad usage or invalid config, 1 runtime failure.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};

use crate::clock::{Clock, SystemClock};
use crate::config::{Config, ConfigError, DEFAULT_CONFIG_PATH};
use crate::status::SyncState;
use crate::store::{Store, StoreOptions};

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
    },
}

/// The entry point of the binary.
pub fn run() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve { config } => {
            let config = match load(config.as_deref()) {
                Ok(c) => c,
                Err(code) => return code,
            };
            init_logging(&config);
            let runtime = match tokio::runtime::Runtime::new() {
                Ok(rt) => rt,
                Err(e) => return fail(&anyhow::Error::new(e).context("cannot start the runtime")),
            };
            let clock: Arc<dyn Clock> = Arc::new(SystemClock);
            match runtime.block_on(crate::node::serve(
                config,
                clock,
                crate::node::shutdown_signal(),
            )) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{e:#}");
                    fail(&e)
                }
            }
        }
        Command::CheckConfig { config } => match Config::load(Some(&config), std::env::vars()) {
            Ok(c) => {
                print!("{}", c.to_redacted_toml());
                eprintln!("{}: valid", config.display());
                ExitCode::SUCCESS
            }
            Err(e) => config_error(&e),
        },
        Command::Status { config, json } => {
            let config = match load(config.as_deref()) {
                Ok(c) => c,
                Err(code) => return code,
            };
            match status(&config, json) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail(&e),
            }
        }
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

/// journald adds its own timestamps and does not render colours: under
/// systemd (JOURNAL_STREAM is set) log plain lines without them.
fn init_logging(config: &Config) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&config.log.level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false);
    if std::env::var_os("JOURNAL_STREAM").is_some() {
        builder.with_ansi(false).without_time().init();
    } else {
        builder.init();
    }
}

/// The address a local client reaches the node at: a wildcard listen
/// address is reached over loopback.
fn local_addr(config: &Config) -> std::net::SocketAddr {
    let mut addr = config.http.listen;
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr {
            std::net::SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            std::net::SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    addr
}

fn status(config: &Config, as_json: bool) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let url = format!("http://{}/api/sync/status", local_addr(config));
    let from_node = runtime.block_on(async {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()?;
        let response = client.get(&url).send().await?.error_for_status()?;
        response.json::<serde_json::Value>().await
    });
    let (doc, source) = match from_node {
        Ok(doc) => (doc, format!("running node at {}", local_addr(config))),
        Err(e) if e.is_connect() => {
            let path = config.store_path();
            anyhow::ensure!(
                path.exists(),
                "no node answers at {url} and there is no store at {}",
                path.display()
            );
            let store = Store::open(&path, &StoreOptions::default())?;
            let sync = SyncState::new(!config.kafka.brokers.trim().is_empty());
            let doc = crate::api::status_json(&store, &sync, config, SystemClock.now())?;
            (
                doc,
                format!("store file {} (node not running)", path.display()),
            )
        }
        Err(e) => return Err(anyhow::Error::new(e).context(format!("asking {url}"))),
    };
    if as_json {
        println!("{}", serde_json::to_string_pretty(&doc)?);
    } else {
        print!("{}", render_status(&doc, &source));
    }
    Ok(())
}

/// The human summary of a status document, most urgent first.
fn render_status(doc: &serde_json::Value, source: &str) -> String {
    use std::fmt::Write;
    let s = |v: &serde_json::Value| match v {
        serde_json::Value::Null => "-".to_owned(),
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    let mut out = String::new();
    let _ = writeln!(out, "node           {} (from {source})", s(&doc["nodeId"]));
    let stale = doc["stale"].as_bool().unwrap_or(true);
    let _ = writeln!(out, "stale          {}", if stale { "YES" } else { "no" });
    let kafka = &doc["kafka"];
    let _ = writeln!(
        out,
        "kafka          {}{}",
        match (kafka["configured"].as_bool(), kafka["connected"].as_bool()) {
            (Some(false), _) => "not configured",
            (_, Some(true)) => "connected",
            _ => "NOT CONNECTED",
        },
        kafka["lastError"]
            .as_str()
            .map(|e| format!(" — {e}"))
            .unwrap_or_default()
    );
    let _ = writeln!(out, "last event     {}", s(&doc["lastEventTime"]));
    let resync = &doc["lastResync"];
    let _ = writeln!(
        out,
        "last resync    {}",
        if resync.is_null() {
            "-".to_owned()
        } else {
            format!(
                "{} {} {}",
                s(&resync["at"]),
                s(&resync["result"]),
                s(&resync["detail"])
            )
        }
    );
    let _ = writeln!(out, "dead letters   {}", s(&doc["deadLetterCount"]));
    let e = &doc["entities"];
    let _ = writeln!(
        out,
        "entities       classes {}, teachers {}, assignments {}, tombstones {}",
        s(&e["classes"]),
        s(&e["teachers"]),
        s(&e["assignments"]),
        s(&e["tombstones"])
    );
    let _ = writeln!(out, "schools        {}", s(&doc["servedSchools"]));
    let partitions = doc["partitions"].as_array().cloned().unwrap_or_default();
    if partitions.is_empty() {
        let _ = writeln!(out, "partitions     none consumed yet");
    } else {
        let _ = writeln!(
            out,
            "\n{:<32} {:>9} {:>12} {:>14} {:>8}",
            "TOPIC", "PARTITION", "OFFSET", "HIGH-WATERMARK", "LAG"
        );
        for p in partitions {
            let _ = writeln!(
                out,
                "{:<32} {:>9} {:>12} {:>14} {:>8}",
                s(&p["topic"]),
                s(&p["partition"]),
                s(&p["offset"]),
                s(&p["highWatermark"]),
                s(&p["lag"])
            );
        }
    }
    out
}

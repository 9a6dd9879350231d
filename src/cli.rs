//! The command line (contract §5): parses arguments, loads configuration,
//! sets up logging, and maps every outcome to an exit code —
//! 0 success, 2 bad usage or invalid config, 1 runtime failure.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};

use crate::clock::{Clock, SystemClock};
use crate::config::{Config, ConfigError, DEFAULT_CONFIG_PATH};
use crate::state::NodeState;
use crate::status::SyncStatus;
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
    },
    /// Generate realistic Vietnamese EMIS data, deterministically from a seed:
    /// a snapshot file for `import` (--out), every entity's `created` event
    /// published to a broker (--brokers), then optionally a steady trickle of
    /// changes (--trickle), and the teacher ids for load scripts
    /// (--teacher-ids). For tests, benchmarks and load tests.
    Gen {
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

/// The entry point of the binary.
pub fn run() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve { config } => {
            let config = match load(config.as_deref()) {
                Ok(c) => c,
                Err(code) => return code,
            };
            if let Err(code) = check_token_files(&config) {
                return code;
            }
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
                if let Err(code) = check_token_files(&c) {
                    return code;
                }
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
        Command::Resync {
            config,
            schools,
            dry_run,
        } => with_config(&config, |c| resync(c, schools, dry_run)),
        Command::Export {
            config,
            schools,
            out,
        } => with_config(&config, |c| export(c, schools, &out)),
        Command::Import { config, file } => with_config(&config, |c| import(c, &file)),
        Command::Demo {
            scale,
            seed,
            listen,
            data_dir,
            rate,
            malformed_per_mille,
        } => {
            init_logging(&Config::default());
            let options = crate::demo::Options {
                spec: crate::gen::Spec::scale(&scale, seed).expect("clap checked the scale"),
                data_dir,
                listen,
                rate,
                malformed_per_mille,
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
        Command::Gen {
            scale,
            seed,
            schools,
            classes_per_school,
            teachers_per_school,
            out,
            teacher_ids,
            brokers,
            skip_initial,
            trickle,
            duration_secs,
            malformed_per_mille,
        } => {
            let mut spec = crate::gen::Spec::scale(&scale, seed).expect("clap checked the scale");
            spec.schools = schools.unwrap_or(spec.schools);
            spec.classes_per_school = classes_per_school.unwrap_or(spec.classes_per_school);
            spec.teachers_per_school = teachers_per_school.unwrap_or(spec.teachers_per_school);
            if out.is_none() && teacher_ids.is_none() && brokers.is_none() {
                eprintln!("emis-edge gen: nothing to do: give --out, --teacher-ids or --brokers");
                return ExitCode::from(2);
            }
            if brokers.is_none() && (trickle > 0 || skip_initial) {
                eprintln!("emis-edge gen: --trickle and --skip-initial need --brokers");
                return ExitCode::from(2);
            }
            let job = GenJob {
                province: crate::gen::Province::new(spec),
                out,
                teacher_ids,
                brokers,
                skip_initial,
                trickle,
                duration: duration_secs.map(Duration::from_secs),
                malformed_per_mille,
            };
            match generate(job) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail(&e),
            }
        }
    }
}

struct GenJob {
    province: crate::gen::Province,
    out: Option<PathBuf>,
    teacher_ids: Option<PathBuf>,
    brokers: Option<String>,
    skip_initial: bool,
    trickle: u32,
    duration: Option<Duration>,
    malformed_per_mille: u32,
}

fn generate(job: GenJob) -> anyhow::Result<()> {
    use std::io::Write;
    let p = &job.province;
    let schools = u64::from(p.spec.schools);
    if let Some(path) = &job.teacher_ids {
        let mut w = std::io::BufWriter::new(create(path)?);
        for s in 0..p.spec.schools {
            for t in 0..p.spec.teachers_per_school {
                writeln!(w, "{}", p.teacher_id(s, t))?;
            }
        }
        w.flush()?;
        eprintln!(
            "emis-edge gen: {} teacher ids written to {}",
            p.spec.teachers(),
            path.display()
        );
    }
    if let Some(path) = &job.out {
        let mut w = std::io::BufWriter::with_capacity(1 << 20, create(path)?);
        let mut tick = progress(Some(schools), "schools written");
        let records = p.write_snapshot(&mut w, |done| tick(u64::from(done)))?;
        w.flush()?;
        eprintln!(
            "emis-edge gen: {records} records of {schools} schools written to {}",
            path.display()
        );
    }
    let Some(brokers) = &job.brokers else {
        return Ok(());
    };
    let publisher = crate::gen::Publisher::connect(brokers, &Default::default())?;
    if !job.skip_initial {
        let mut tick = progress(Some(schools), "schools published");
        let mut sent = 0u64;
        for s in 0..p.spec.schools {
            for e in p.school(s) {
                publisher.send(&crate::gen::Message::of(&p.created_event(e)))?;
                sent += 1;
            }
            tick(u64::from(s) + 1);
        }
        publisher.flush(Duration::from_secs(300))?;
        eprintln!("emis-edge gen: {sent} events published to {brokers}");
    }
    if job.trickle > 0 {
        let rt = runtime()?;
        let (sent, malformed) = rt.block_on(async {
            let mut trickle =
                crate::gen::Trickle::new(p.clone(), SystemClock.now(), job.malformed_per_mille);
            let started = tokio::time::Instant::now();
            let mut tick = tokio::time::interval(Duration::from_millis(10));
            let mut shutdown = std::pin::pin!(crate::node::shutdown_signal());
            let (mut sent, mut malformed) = (0u64, 0u64);
            loop {
                tokio::select! {
                    _ = &mut shutdown => break,
                    _ = tick.tick() => {}
                }
                let elapsed = started.elapsed();
                if job.duration.is_some_and(|d| elapsed >= d) {
                    break;
                }
                let due = (elapsed.as_secs_f64() * f64::from(job.trickle)) as u64;
                while sent < due {
                    let m = trickle.next_message();
                    malformed += u64::from(m.malformed);
                    publisher.send(&m)?;
                    sent += 1;
                }
            }
            anyhow::Ok((sent, malformed))
        })?;
        publisher.flush(Duration::from_secs(60))?;
        eprintln!("emis-edge gen: {sent} changes published ({malformed} malformed)");
    }
    Ok(())
}

fn create(path: &Path) -> anyhow::Result<std::fs::File> {
    std::fs::File::create(path)
        .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", path.display()))
}

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

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

/// Opens the store when no node runs (the node holds it otherwise).
fn open_store(config: &Config) -> anyhow::Result<Arc<Store>> {
    let path = config.store_path();
    std::fs::create_dir_all(&config.node.data_dir)?;
    let options = StoreOptions {
        cache_bytes: config.store.cache_mb << 20,
    };
    Ok(Arc::new(Store::open(&path, &options)?))
}

/// How the CLI reaches the running node.
enum Ask {
    /// A read route (`/api/…`): sends the node's token, short timeout.
    Read,
    /// An admin route: loopback needs no token; may run for long.
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
        Ask::Read => node_client(config, Duration::from_secs(5))?,
        Ask::Admin => reqwest::Client::new(),
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

fn resync(config: &Config, schools: Vec<uuid::Uuid>, dry_run: bool) -> anyhow::Result<bool> {
    let Some(base) = config.resync.central_url.clone() else {
        config_error(&crate::config::ConfigError {
            key: "resync.central_url".into(),
            message: "must be set to resync".into(),
        });
        std::process::exit(2);
    };
    let rt = runtime()?;
    rt.block_on(async {
        let mut path = format!("/api/admin/resync?dryRun={dry_run}");
        if !schools.is_empty() {
            let ids: Vec<String> = schools.iter().map(|s| s.to_string()).collect();
            path.push_str(&format!("&school={}", ids.join(",")));
        }
        let doc = match ask_node(config, Ask::Admin, reqwest::Method::POST, &path, None).await? {
            Some(doc) => doc,
            None => {
                let store = open_store(config)?;
                let schools = crate::resync::schools_in_store(&store, config, schools)?;
                anyhow::ensure!(
                    !schools.is_empty(),
                    "no school to resync: set schools.ids or name --school"
                );
                let client = crate::resync::http_client(config)?;
                let report = crate::resync::run(
                    &store,
                    &client,
                    &base,
                    schools,
                    || SystemClock.now(),
                    dry_run,
                )
                .await;
                serde_json::to_value(report)?
            }
        };
        Ok(print_outcomes(&doc))
    })
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

fn export(config: &Config, schools: Vec<uuid::Uuid>, out: &Path) -> anyhow::Result<bool> {
    let rt = runtime()?;
    let file = std::fs::File::create(out)
        .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", out.display()))?;
    let mut writer = std::io::BufWriter::with_capacity(1 << 20, file);
    let mut tick = progress(None, "records exported");
    let schools_doc = rt.block_on(ask_node(
        config,
        Ask::Admin,
        reqwest::Method::GET,
        "/api/admin/schools",
        None,
    ))?;
    let total = match schools_doc {
        Some(doc) => {
            // Through the running node: its public snapshot route, per school.
            let schools: Vec<uuid::Uuid> = if schools.is_empty() {
                serde_json::from_value(doc["schools"].clone())?
            } else {
                schools
            };
            rt.block_on(async {
                let client = node_client(config, Duration::from_secs(3600))?;
                let mut lines = 0u64;
                for school in schools {
                    let url = format!(
                        "http://{}/api/schools/{school}/snapshot",
                        local_addr(config)
                    );
                    let r = client.get(&url).send().await?.error_for_status()?;
                    let mut body = r.bytes_stream();
                    use futures::StreamExt;
                    use std::io::Write;
                    while let Some(chunk) = body.next().await {
                        let chunk = chunk?;
                        lines += chunk.iter().filter(|b| **b == b'\n').count() as u64;
                        writer.write_all(&chunk)?;
                        tick(lines);
                    }
                }
                std::io::Write::flush(&mut writer)?;
                anyhow::Ok(lines)
            })?
        }
        None => {
            let store = open_store(config)?;
            let schools = crate::resync::schools_in_store(&store, config, schools)?;
            crate::resync::export(&store, &schools, &mut writer, tick)?
        }
    };
    eprintln!("emis-edge: wrote {total} lines to {}", out.display());
    Ok(true)
}

fn import(config: &Config, file: &Path) -> anyhow::Result<bool> {
    let size = std::fs::metadata(file)
        .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", file.display()))?
        .len();
    let rt = runtime()?;
    let via_node = rt.block_on(async {
        let f = tokio::fs::File::open(file).await?;
        let stream = tokio_util::io::ReaderStream::with_capacity(f, 1 << 20);
        ask_node(
            config,
            Ask::Admin,
            reqwest::Method::POST,
            "/api/admin/import",
            Some(reqwest::Body::wrap_stream(stream)),
        )
        .await
    })?;
    let doc = match via_node {
        Some(doc) => doc,
        None => {
            let store = open_store(config)?;
            let mut tick = progress(Some(size), "bytes imported");
            let f = std::fs::File::open(file)?;
            let counted = CountingReader {
                inner: f,
                read: 0,
                tick: &mut tick,
            };
            let outcomes = crate::resync::import(
                &store,
                &config.school_filter(),
                std::io::BufReader::with_capacity(1 << 20, counted),
                SystemClock.now(),
                |_| {},
            )?;
            render_documents(&store)?;
            serde_json::json!({ "schools": outcomes })
        }
    };
    Ok(print_outcomes(&doc))
}

/// Renders every queued teacher document, so that a node started on this
/// store serves each lookup with one read from the first request.
fn render_documents(store: &Store) -> anyhow::Result<()> {
    let pending = store.read()?.pending_docs()?;
    if pending == 0 {
        return Ok(());
    }
    let mut tick = progress(Some(pending), "teacher documents rendered");
    let mut done = 0u64;
    loop {
        let n = store.materialize(10_000, SystemClock.now())?;
        if n == 0 {
            return Ok(());
        }
        done += n as u64;
        tick(done);
    }
}

struct CountingReader<'a, R, F: FnMut(u64)> {
    inner: R,
    read: u64,
    tick: &'a mut F,
}

impl<R: std::io::Read, F: FnMut(u64)> std::io::Read for CountingReader<'_, R, F> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.read += n as u64;
        (self.tick)(self.read);
        Ok(n)
    }
}

/// Token files are configuration: a missing, empty or world-readable one
/// is exit code 2 naming the key (systemd does not restart on it).
fn check_token_files(c: &Config) -> Result<(), ExitCode> {
    for (key, check) in [
        ("http.token_file", c.load_tokens().map(|_| ())),
        ("resync.token_file", c.resync_token().map(|_| ())),
    ] {
        if let Err(e) = check {
            return Err(config_error(&crate::config::ConfigError {
                key: key.into(),
                message: format!("{e:#}"),
            }));
        }
    }
    Ok(())
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

/// The address a local client reaches the node at: a wildcard listen
/// address is reached over loopback.
fn local_addr(config: &Config) -> std::net::SocketAddr {
    crate::config::reachable(config.http.listen)
}

/// A client that sends the node's first API token, when it has any.
fn node_client(config: &Config, timeout: Duration) -> anyhow::Result<reqwest::Client> {
    let mut headers = reqwest::header::HeaderMap::new();
    if let Some(token) = config.load_tokens()?.into_iter().next() {
        let mut value = reqwest::header::HeaderValue::from_str(&format!("Bearer {token}"))?;
        value.set_sensitive(true);
        headers.insert(reqwest::header::AUTHORIZATION, value);
    }
    Ok(reqwest::Client::builder()
        .timeout(timeout)
        .default_headers(headers)
        .build()?)
}

fn status(config: &Config, as_json: bool) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let from_node = runtime.block_on(ask_node(
        config,
        Ask::Read,
        reqwest::Method::GET,
        "/api/sync/status",
        None,
    ))?;
    let (doc, source) = match from_node {
        Some(doc) => (
            serde_json::from_value::<SyncStatus>(doc)
                .context("the running node's status document is not what this release reads")?,
            format!("running node at {}", local_addr(config)),
        ),
        None => {
            let path = config.store_path();
            anyhow::ensure!(
                path.exists(),
                "no node answers at {} and there is no store at {}",
                local_addr(config),
                path.display()
            );
            let store = Store::open(
                &path,
                &StoreOptions {
                    cache_bytes: config.store.cache_mb << 20,
                },
            )?;
            let state = NodeState::new(Arc::new(store), config.clone(), Arc::new(SystemClock));
            (
                state.status()?,
                format!("store file {} (node not running)", path.display()),
            )
        }
    };
    if as_json {
        println!("{}", serde_json::to_string_pretty(&doc)?);
    } else {
        print!("{}", render_status(&doc, &source));
    }
    Ok(())
}

/// The human summary of a status document, most urgent first.
fn render_status(doc: &SyncStatus, source: &str) -> String {
    use std::fmt::Write;
    let or_dash = |v: Option<&str>| v.unwrap_or("-").to_owned();
    let num = |v: Option<i64>| v.map_or_else(|| "-".to_owned(), |n| n.to_string());
    let mut out = String::new();
    let _ = writeln!(out, "node           {} (from {source})", doc.node_id);
    let _ = writeln!(
        out,
        "stale          {}",
        if doc.stale { "YES" } else { "no" }
    );
    let kafka = &doc.kafka;
    let _ = writeln!(
        out,
        "kafka          {}{}",
        match (kafka.configured, kafka.connected) {
            (false, _) => "not configured",
            (true, true) => "connected",
            (true, false) => "NOT CONNECTED",
        },
        kafka
            .last_error
            .as_ref()
            .map(|e| format!(" — {e}"))
            .unwrap_or_default()
    );
    if let Some(e) = &doc.store_error {
        let _ = writeln!(
            out,
            "STORE ERROR    {e} (failing since {}, {} failed writes; reads still answer, the node \
             retries by itself)",
            or_dash(doc.store.failing_since.as_deref()),
            doc.store.write_failures
        );
    }
    if let Some(oor) = &kafka.offset_out_of_range {
        let _ = writeln!(
            out,
            "EVENTS LOST    {} {} (a resync repairs this)",
            oor.at, oor.detail
        );
    }
    for w in doc
        .workers
        .iter()
        .filter(|w| w.consecutive_errors > 0 || w.state == crate::worker::WorkerState::Dead)
    {
        let _ = writeln!(
            out,
            "WORKER         {} {:?}: {} ({} failures in a row)",
            w.name,
            w.state,
            or_dash(w.last_error.as_deref()),
            w.consecutive_errors
        );
    }
    let _ = writeln!(
        out,
        "caught up      {}",
        if doc.caught_up { "yes" } else { "no" }
    );
    let _ = writeln!(
        out,
        "last event     {}",
        or_dash(doc.last_event_time.as_deref())
    );
    let _ = writeln!(
        out,
        "last resync    {}",
        match &doc.last_resync {
            None => "-".to_owned(),
            Some(r) => format!("{} {} {}", r.at, r.result, r.detail),
        }
    );
    let _ = writeln!(out, "dead letters   {}", doc.dead_letter_count);
    let e = &doc.entities;
    let _ = writeln!(
        out,
        "entities       classes {}, teachers {}, assignments {}, tombstones {}",
        e.classes, e.teachers, e.assignments, e.tombstones
    );
    let _ = writeln!(out, "schools        {}", doc.served_schools);
    if doc.partitions.is_empty() {
        let _ = writeln!(out, "partitions     none consumed yet");
    } else {
        let _ = writeln!(
            out,
            "\n{:<32} {:>9} {:>12} {:>14} {:>8}",
            "TOPIC", "PARTITION", "OFFSET", "HIGH-WATERMARK", "LAG"
        );
        for p in &doc.partitions {
            let _ = writeln!(
                out,
                "{:<32} {:>9} {:>12} {:>14} {:>8}",
                p.topic,
                p.partition,
                num(p.offset),
                num(p.high_watermark),
                num(p.lag)
            );
        }
    }
    out
}

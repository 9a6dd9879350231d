//! The one way to start the test broker: [tansu](https://github.com/tansu-io/tansu),
//! a Kafka-compatible server, with in-memory storage on a loopback port and
//! the nine EMIS topics created. Used by the end-to-end tests (`tests/it`),
//! the ingest bench (`benches/ingest.rs`) and, through the `test-broker`
//! binary, the load scripts (`benches/load/lib.sh`).
//!
//! # Known faults of tansu 0.6.0 (memory storage)
//!
//! 1. A fetch from an offset *inside* a record batch starts at the *next*
//!    batch: the records of that batch after the offset are never returned.
//! 2. The "latest" offset it reports (the high watermark) is the last
//!    batch's base offset + 1, not the true end of the log.
//!
//! A node restarted at a stored offset inside a batch therefore loses
//! records through the broker's fault, and its `stored > latest` rule
//! (a recreated topic) reads everything again. A test that restarts a node
//! against tansu must produce one record per batch: set
//! `batch.num.messages=1` ([`ONE_RECORD_PER_BATCH`]) on its producer.
//! `docs/HARDENING.md` ("Testing against tansu") says the same.

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::ClientConfig;

/// The nine topics of the EMIS contract (`emis_edge::domain::EventType::ALL`
/// names the same; a test in `tests/it/e2e.rs` checks that they agree).
pub const TOPICS: [&str; 9] = [
    "emis.class.created",
    "emis.class.updated",
    "emis.class.deleted",
    "emis.teacher.created",
    "emis.teacher.updated",
    "emis.teacher.deleted",
    "emis.assignment.created",
    "emis.assignment.updated",
    "emis.assignment.deleted",
];

/// The producer setting a test that restarts a node against tansu needs
/// (see the crate documentation: tansu's fetch-inside-a-batch fault).
pub const ONE_RECORD_PER_BATCH: (&str, &str) = ("batch.num.messages", "1");

/// How long tansu may take to listen, and the topics to be created.
const STARTUP: Duration = Duration::from_secs(30);

/// What went wrong starting the broker, in words.
pub struct Error(String);

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::fmt::Debug for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Error {}

/// How to start the broker.
#[derive(Clone, Debug)]
pub struct Options {
    /// The loopback port; `None` picks a free one (and retries with another
    /// if tansu finds it taken).
    pub port: Option<u16>,
    /// Partitions of each of the nine topics.
    pub partitions: i32,
    /// tansu's own output: to this process's stdout and stderr, or discarded.
    pub show_logs: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            port: None,
            partitions: 3,
            show_logs: false,
        }
    }
}

/// A running tansu broker with the nine topics; killed when dropped.
///
/// Mind the broker's two faults (crate documentation) in a test that
/// restarts a node: produce with [`ONE_RECORD_PER_BATCH`].
pub struct Tansu {
    child: Child,
    brokers: String,
}

impl Tansu {
    /// The tansu binary: `EMIS_EDGE_TANSU`, else `tansu` on `PATH`, else
    /// `~/.cargo/bin/tansu` (where `cargo install tansu` puts it).
    pub fn binary() -> Option<PathBuf> {
        if let Some(p) = std::env::var_os("EMIS_EDGE_TANSU") {
            return Some(p.into());
        }
        let on_path = std::env::var_os("PATH")
            .into_iter()
            .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
            .map(|dir| dir.join("tansu"));
        let cargo_home = std::env::var_os("CARGO_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cargo")))
            .map(|home| home.join("bin").join("tansu"));
        on_path.chain(cargo_home).find(|p| is_executable(p))
    }

    /// For a test: starts tansu with `partitions` per topic, or returns
    /// `None` when tansu is missing and the developer opted out with
    /// `EMIS_EDGE_SKIP_TANSU=1`. A missing tansu fails the test otherwise,
    /// and always in CI (`CI` set); so does a broker that does not start.
    #[track_caller]
    pub fn for_test(partitions: i32) -> Option<Tansu> {
        let Some(bin) = Tansu::binary() else {
            let opted_out = std::env::var("EMIS_EDGE_SKIP_TANSU").is_ok_and(|v| v == "1");
            assert!(
                opted_out && std::env::var_os("CI").is_none(),
                "the tansu broker is needed, on PATH or in ~/.cargo/bin: `cargo install tansu \
                 --locked --features dynostore` (or set EMIS_EDGE_TANSU=/path/to/tansu; \
                 EMIS_EDGE_SKIP_TANSU=1 skips locally)"
            );
            eprintln!("SKIPPED: tansu not installed and EMIS_EDGE_SKIP_TANSU=1");
            return None;
        };
        let options = Options {
            partitions,
            ..Options::default()
        };
        Some(Tansu::start(&bin, &options).unwrap_or_else(|e| panic!("{e}")))
    }

    /// Starts `bin` as a broker with in-memory storage on 127.0.0.1, waits
    /// until it accepts connections and creates the nine topics.
    pub fn start(bin: &Path, options: &Options) -> Result<Tansu, Error> {
        // A free port can be taken between our probe and tansu's bind: then
        // tansu exits, and another port is tried.
        let attempts = if options.port.is_some() { 1 } else { 3 };
        let mut last = None;
        for _ in 0..attempts {
            let port = match options.port {
                Some(p) => p,
                None => free_port()?,
            };
            match Tansu::start_on(bin, port, options) {
                Ok(t) => return Ok(t),
                Err(Failure::Exited(e)) => last = Some(e),
                Err(Failure::Other(e)) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| Error("tansu did not start".into())))
    }

    fn start_on(bin: &Path, port: u16, options: &Options) -> Result<Tansu, Failure> {
        let url = format!("tcp://127.0.0.1:{port}");
        let output = || {
            if options.show_logs {
                Stdio::inherit()
            } else {
                Stdio::null()
            }
        };
        let child = Command::new(bin)
            .args(["broker", "--storage-engine", "memory://tansu/"])
            .args(["--listener-url", &url, "--advertised-listener-url", &url])
            .stdin(Stdio::null())
            .stdout(output())
            .stderr(output())
            .spawn()
            .map_err(|e| Failure::Other(Error(format!("cannot run {}: {e}", bin.display()))))?;
        let mut tansu = Tansu {
            child,
            brokers: format!("127.0.0.1:{port}"),
        };
        let deadline = Instant::now() + STARTUP;
        loop {
            tansu.exited_before("listening", port)?;
            if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                break;
            }
            if Instant::now() > deadline {
                return Err(Failure::Other(Error(format!(
                    "tansu did not listen on port {port} within {STARTUP:?}"
                ))));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let created = tansu.create_topics(options.partitions);
        // What answered may have been another process on a port tansu
        // could not bind.
        tansu.exited_before("creating the topics", port)?;
        created.map_err(Failure::Other)?;
        Ok(tansu)
    }

    fn exited_before(&mut self, what: &str, port: u16) -> Result<(), Failure> {
        match self.child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => Err(Failure::Exited(Error(format!(
                "tansu exited ({status}) before {what} on port {port}"
            )))),
            Err(e) => Err(Failure::Other(Error(format!("waiting for tansu: {e}")))),
        }
    }

    /// Creates the nine topics through the Kafka admin API and waits until
    /// the broker's metadata lists each with its partitions.
    fn create_topics(&self, partitions: i32) -> Result<(), Error> {
        let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
            .set("bootstrap.servers", &self.brokers)
            .create()
            .map_err(|e| Error(format!("admin client for {}: {e}", self.brokers)))?;
        let topics: Vec<_> = TOPICS
            .iter()
            .map(|t| NewTopic::new(t, partitions, TopicReplication::Fixed(1)))
            .collect();
        let options = AdminOptions::new().operation_timeout(Some(STARTUP));
        let results = futures::executor::block_on(admin.create_topics(&topics, &options))
            .map_err(|e| Error(format!("creating the topics on {}: {e}", self.brokers)))?;
        for result in results {
            if let Err((topic, code)) = result {
                return Err(Error(format!("creating topic {topic}: {code}")));
            }
        }
        let deadline = Instant::now() + STARTUP;
        for topic in TOPICS {
            loop {
                let found = admin
                    .inner()
                    .fetch_metadata(Some(topic), Duration::from_secs(5))
                    .ok()
                    .and_then(|m| {
                        m.topics()
                            .iter()
                            .find(|t| t.name() == topic && t.error().is_none())
                            .map(|t| t.partitions().len())
                    });
                if found == Some(partitions as usize) {
                    break;
                }
                if Instant::now() > deadline {
                    return Err(Error(format!(
                        "topic {topic} has {found:?} partitions on {}, expected {partitions}",
                        self.brokers
                    )));
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Ok(())
    }

    /// The bootstrap servers: `127.0.0.1:PORT`.
    pub fn brokers(&self) -> &str {
        &self.brokers
    }

    /// The broker's exit status if it has exited (it should not).
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }
}

impl Drop for Tansu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

enum Failure {
    /// tansu exited: on a picked port, worth another try.
    Exited(Error),
    Other(Error),
}

fn free_port() -> Result<u16, Error> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| Error(format!("no free loopback port: {e}")))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

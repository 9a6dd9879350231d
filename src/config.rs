//! Configuration: built-in defaults, then a TOML file, then environment
//! variables `EMIS_EDGE__SECTION__KEY` (contract §5).
//!
//! Loading fails fast with a [`ConfigError`] that names the offending key,
//! so that `check-config` and `serve` can say exactly what to fix.
//!
//! One piece on purpose (longer than the other modules): every key, its
//! default and its check sit side by side, so a key cannot be added
//! without its validation or its documented default.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::providers::{Format, Serialized, Toml};
use figment::Figment;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::domain::EventType;
pub use crate::domain::SchoolFilter;

/// Where `serve` looks when no `--config` is given.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/emis-edge/edge.toml";
/// Prefix of environment overrides; sections and keys are split by `__`.
pub const ENV_PREFIX: &str = "EMIS_EDGE__";
/// The store's file name inside `node.data_dir`.
pub const STORE_FILE: &str = "emis-edge.redb";

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub node: NodeConfig,
    pub http: HttpConfig,
    pub kafka: KafkaConfig,
    pub ingest: IngestConfig,
    pub upstream: UpstreamConfig,
    pub schools: SchoolsConfig,
    pub resync: ResyncConfig,
    pub store: StoreConfig,
    pub log: LogConfig,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NodeConfig {
    /// Names this node in status, logs and the default Kafka group id.
    pub id: String,
    /// Holds the redb file.
    pub data_dir: PathBuf,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    pub listen: SocketAddr,
    /// Serve `/health/*` and `/metrics` here instead of on `listen`.
    pub ops_listen: Option<SocketAddr>,
    /// Bearer tokens for `/api/*`, one per line; unset: no authentication.
    /// The file must not be readable by others.
    pub token_file: Option<PathBuf>,
    /// A read request taking longer is answered 408.
    pub request_timeout_secs: u64,
    /// Requests served at once; more wait their turn.
    pub max_concurrent_requests: usize,
    /// Connections open at once (per listener); more wait in the kernel's
    /// accept queue until one closes.
    pub max_connections: usize,
    /// A connection that has not sent a whole request head (request line
    /// and headers) within this long is closed; so is one idle this long
    /// between requests.
    pub header_read_timeout_secs: u64,
    /// The largest snapshot file `POST /api/admin/import` accepts (the only
    /// route that takes a request body).
    pub max_import_bytes: u64,
    /// Change-feed requests (`GET /api/changes` with `wait`) held open at
    /// once, waiting for a change; one more is answered `503`. Unset: half
    /// of `max_connections`, so that held long-polls never take the
    /// connections lookups need.
    pub max_long_polls: Option<usize>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaConfig {
    /// Comma-separated `host:port` list; empty means no Kafka (the node
    /// serves what its store holds and relies on resync/import).
    pub brokers: String,
    /// Defaults to `emis-edge-<node.id>`.
    pub group_id: Option<String>,
    pub topics: TopicsConfig,
    /// Passed to librdkafka as is (SASL, TLS, timeouts, …).
    pub properties: BTreeMap<String, String>,
    /// A batch closes after this many messages …
    pub batch_max_messages: usize,
    /// … or this long after its first message, once no more messages are
    /// waiting (a backlog is read in whole batches).
    pub batch_max_wait_ms: u64,
    /// `stale` in the sync status once the broker has been unreachable for
    /// this long.
    pub stale_after_secs: u64,
}

/// What the node accepts of what it takes in (Kafka events, snapshot,
/// import and feed lines).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IngestConfig {
    /// A change stamped more than this after a clock its source cannot
    /// fake (the Kafka record's timestamp; a snapshot's or a feed page's
    /// `asOf`) is refused (contract §2, "Time"), e.g. "1h", "15m".
    #[serde(with = "humantime_serde")]
    pub max_future_skew: Duration,
}

/// Following a parent node's change feed instead of Kafka (contract §6).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpstreamConfig {
    /// The parent node's base URL; unset: the node does not follow one.
    pub url: Option<String>,
    /// Bearer token for the parent (its `http.token_file`): the first
    /// token of this file is sent.
    pub token_file: Option<PathBuf>,
    /// How long the parent holds a request while nothing changed (0-60).
    pub wait_secs: u64,
    /// Changes per page (1-10000).
    pub limit: usize,
    /// The parent may take `wait_secs` plus this long to start answering,
    /// and this long between two reads of an answer, before the request is
    /// abandoned and retried.
    pub read_timeout_secs: u64,
    /// `stale` in the sync status once no page has come from the parent
    /// for this long. More than `wait_secs`.
    pub stale_after_secs: u64,
}

/// The topic of each event type; defaults are the event type names.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TopicsConfig {
    pub class_created: String,
    pub class_updated: String,
    pub class_deleted: String,
    pub teacher_created: String,
    pub teacher_updated: String,
    pub teacher_deleted: String,
    pub assignment_created: String,
    pub assignment_updated: String,
    pub assignment_deleted: String,
}

#[derive(Clone, Debug, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SchoolsConfig {
    /// The schools this node serves.
    pub ids: Vec<Uuid>,
    /// Serve every school (a provincial or national node).
    pub all: bool,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ResyncConfig {
    /// Base URL that serves `GET /api/schools/{id}/snapshot`; unset means
    /// no scheduled resync.
    pub central_url: Option<String>,
    pub interval_secs: u64,
    /// A school's snapshot download is abandoned after this long.
    pub timeout_secs: u64,
    /// Scheduled runs only audit ("shadow mode"): they log the drift per
    /// school and entity kind and change nothing.
    pub dry_run: bool,
    /// Bearer token for `central_url` (e.g. a provincial node with
    /// `http.token_file`): the first token of this file is sent.
    pub token_file: Option<PathBuf>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// How long a delete's tombstone is kept (e.g. "30d", "720h").
    #[serde(with = "humantime_serde")]
    pub tombstone_retention: Duration,
    /// redb page cache, MiB.
    pub cache_mb: usize,
    /// At start, the node compacts the store file (gives free pages back to
    /// the file system) when at least this share of it is free, 0.0–1.0;
    /// 1.0 never. Measuring it reads every page of the file once.
    pub compact_at_free_share: f64,
    /// Dead letters kept at most; the oldest beyond go first.
    pub dead_letter_max_count: u64,
    /// Dead letters older than this are dropped (e.g. "30d").
    #[serde(with = "humantime_serde")]
    pub dead_letter_retention: Duration,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// A tracing filter: "info", "emis_edge=debug,info", …; `RUST_LOG`
    /// overrides it.
    pub level: String,
}

impl Default for NodeConfig {
    fn default() -> Self {
        NodeConfig {
            id: "edge-01".into(),
            data_dir: "/var/lib/emis-edge".into(),
        }
    }
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            ops_listen: None,
            token_file: None,
            request_timeout_secs: 30,
            max_concurrent_requests: 1024,
            max_connections: 1024,
            header_read_timeout_secs: 10,
            max_import_bytes: 16 << 30,
            max_long_polls: None,
        }
    }
}

impl Default for KafkaConfig {
    fn default() -> Self {
        KafkaConfig {
            brokers: String::new(),
            group_id: None,
            topics: TopicsConfig::default(),
            properties: BTreeMap::new(),
            batch_max_messages: 100_000,
            batch_max_wait_ms: 20,
            stale_after_secs: 300,
        }
    }
}

impl Default for IngestConfig {
    fn default() -> Self {
        IngestConfig {
            max_future_skew: crate::domain::FutureSkew::DEFAULT.as_duration(),
        }
    }
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        UpstreamConfig {
            url: None,
            token_file: None,
            wait_secs: 30,
            limit: 1000,
            read_timeout_secs: 30,
            stale_after_secs: 300,
        }
    }
}

/// The most schools a follower follows: their ids must fit in one
/// `GET /api/changes` request head, which a node accepts up to 32 KiB
/// (`school=<id>&` is 44 bytes).
pub const MAX_FOLLOWED_SCHOOLS: usize = 500;

impl Default for TopicsConfig {
    fn default() -> Self {
        let n = |t: EventType| t.name().to_owned();
        TopicsConfig {
            class_created: n(EventType::ClassCreated),
            class_updated: n(EventType::ClassUpdated),
            class_deleted: n(EventType::ClassDeleted),
            teacher_created: n(EventType::TeacherCreated),
            teacher_updated: n(EventType::TeacherUpdated),
            teacher_deleted: n(EventType::TeacherDeleted),
            assignment_created: n(EventType::AssignmentCreated),
            assignment_updated: n(EventType::AssignmentUpdated),
            assignment_deleted: n(EventType::AssignmentDeleted),
        }
    }
}

impl TopicsConfig {
    /// Each configured topic with the event type it carries.
    pub fn all(&self) -> [(EventType, &str); 9] {
        use EventType::*;
        [
            (ClassCreated, &self.class_created),
            (ClassUpdated, &self.class_updated),
            (ClassDeleted, &self.class_deleted),
            (TeacherCreated, &self.teacher_created),
            (TeacherUpdated, &self.teacher_updated),
            (TeacherDeleted, &self.teacher_deleted),
            (AssignmentCreated, &self.assignment_created),
            (AssignmentUpdated, &self.assignment_updated),
            (AssignmentDeleted, &self.assignment_deleted),
        ]
        .map(|(t, s)| (t, s.as_str()))
    }
}

impl Default for ResyncConfig {
    fn default() -> Self {
        ResyncConfig {
            central_url: None,
            interval_secs: 86_400,
            timeout_secs: 300,
            dry_run: false,
            token_file: None,
        }
    }
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            tombstone_retention: Duration::from_secs(30 * 86_400),
            cache_mb: 64,
            compact_at_free_share: 0.5,
            // The store's own default (`store::DEAD_LETTER_MAX_COUNT`).
            dead_letter_max_count: 100_000,
            dead_letter_retention: Duration::from_secs(30 * 86_400),
        }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: "info".into(),
        }
    }
}

/// A configuration problem, with the key an operator must fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("config key `{key}`: {message}")]
pub struct ConfigError {
    pub key: String,
    pub message: String,
}

fn bad(key: &str, message: impl Into<String>) -> ConfigError {
    ConfigError {
        key: key.into(),
        message: message.into(),
    }
}

/// The address a client on this machine reaches a listener at: a wildcard
/// listen address (`0.0.0.0`, `[::]`) is reached over loopback.
pub fn reachable(mut addr: SocketAddr) -> SocketAddr {
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr {
            SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    addr
}

impl Config {
    /// Loads defaults, then `file` (which must exist when given), then the
    /// environment `env` (pass `std::env::vars()`), and validates the result.
    pub fn load(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let text = file
            .map(|path| {
                std::fs::read_to_string(path).map_err(|e| ConfigError {
                    key: "--config".into(),
                    message: format!("cannot read {}: {e}", path.display()),
                })
            })
            .transpose()?;
        Self::from_sources(text.as_deref(), env)
    }

    /// Parses the text of a configuration file over the built-in defaults
    /// and validates the result, with no environment overrides: what
    /// [`Config::load`] does with that file and an empty environment. No
    /// I/O, so it can be fed arbitrary text (the `config` fuzz target).
    pub fn from_toml_str(text: &str) -> Result<Config, ConfigError> {
        Self::from_sources(Some(text), std::iter::empty())
    }

    fn from_sources(
        text: Option<&str>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        if let Some(text) = text {
            figment = figment.merge(Toml::string(text));
        }
        // The overrides become one TOML document merged last, so that tests
        // can pass an explicit environment instead of the process's.
        let mut overrides = toml::Table::new();
        for (name, raw) in env {
            let Some(rest) = name.strip_prefix(ENV_PREFIX) else {
                continue;
            };
            let path: Vec<String> = rest.split("__").map(|s| s.to_ascii_lowercase()).collect();
            let key = path.join(".");
            if path.iter().any(String::is_empty) {
                return Err(bad(
                    &key,
                    format!("environment variable {name} has an empty part"),
                ));
            }
            let (last, parents) = path.split_last().expect("split yields one part at least");
            let mut table = &mut overrides;
            for part in parents {
                let entry = table
                    .entry(part.clone())
                    .or_insert_with(|| toml::Value::Table(toml::Table::new()));
                table = match entry {
                    toml::Value::Table(t) => t,
                    _ => return Err(bad(&key, format!("{name} conflicts with another variable"))),
                };
            }
            table.insert(last.clone(), parse_env_value(&raw));
        }
        figment = figment.merge(Toml::string(&overrides.to_string()));
        let config: Config = figment.extract().map_err(|e| ConfigError {
            key: key_path(&e.path),
            message: e.kind.to_string(),
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Checks what types alone cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let id = &self.node.id;
        if id.is_empty()
            || id.len() > 64
            || !id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        {
            return Err(bad(
                "node.id",
                format!("{id:?} must be 1–64 characters of A–Z, a–z, 0–9, '-', '_', '.'"),
            ));
        }
        if self
            .http
            .ops_listen
            .is_some_and(|o| o == self.http.listen && o.port() != 0)
        {
            return Err(bad("http.ops_listen", "must differ from http.listen"));
        }
        if self.http.request_timeout_secs == 0 {
            return Err(bad("http.request_timeout_secs", "must be at least 1"));
        }
        if !(1..=100_000).contains(&self.http.max_concurrent_requests) {
            return Err(bad(
                "http.max_concurrent_requests",
                "must be between 1 and 100000",
            ));
        }
        if !(1..=100_000).contains(&self.http.max_connections) {
            return Err(bad("http.max_connections", "must be between 1 and 100000"));
        }
        if !(1..=3600).contains(&self.http.header_read_timeout_secs) {
            return Err(bad(
                "http.header_read_timeout_secs",
                "must be between 1 and 3600",
            ));
        }
        if let Some(n) = self.http.max_long_polls {
            if n >= self.http.max_connections {
                return Err(bad(
                    "http.max_long_polls",
                    format!(
                        "{n} must be less than http.max_connections ({}): held long-polls must \
                         leave connections for lookups",
                        self.http.max_connections
                    ),
                ));
            }
        }
        if self.node.data_dir.as_os_str().is_empty() {
            return Err(bad("node.data_dir", "must not be empty"));
        }
        if self.schools.all && !self.schools.ids.is_empty() {
            return Err(bad(
                "schools.all",
                "set either `all = true` or a list of `ids`, not both",
            ));
        }
        let k = &self.kafka;
        if !(1..=100_000).contains(&k.batch_max_messages) {
            return Err(bad(
                "kafka.batch_max_messages",
                "must be between 1 and 100000",
            ));
        }
        if !(1..=1_000).contains(&k.batch_max_wait_ms) {
            return Err(bad("kafka.batch_max_wait_ms", "must be between 1 and 1000"));
        }
        if k.stale_after_secs == 0 {
            return Err(bad("kafka.stale_after_secs", "must be at least 1"));
        }
        if let Some(g) = &k.group_id {
            if g.trim().is_empty() {
                return Err(bad("kafka.group_id", "must not be empty when set"));
            }
        }
        for broker in k
            .brokers
            .split(',')
            .map(str::trim)
            .filter(|b| !b.is_empty())
        {
            let port_ok = broker
                .rsplit_once(':')
                .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
            if !port_ok {
                return Err(bad("kafka.brokers", format!("{broker:?} is not host:port")));
            }
        }
        let mut seen = BTreeSet::new();
        for (event_type, topic) in k.topics.all() {
            let key = format!("kafka.topics.{}", topic_key(event_type));
            if topic.is_empty() {
                return Err(bad(&key, "must not be empty"));
            }
            if !seen.insert(topic) {
                return Err(bad(&key, format!("topic {topic:?} is configured twice")));
            }
        }
        if let Some(url) = &self.resync.central_url {
            match reqwest::Url::parse(url) {
                Ok(u) if matches!(u.scheme(), "http" | "https") => {}
                Ok(u) => {
                    return Err(bad(
                        "resync.central_url",
                        format!("scheme {:?} is not http or https", u.scheme()),
                    ))
                }
                Err(e) => return Err(bad("resync.central_url", format!("{url:?}: {e}"))),
            }
        }
        self.validate_upstream()?;
        if self.ingest.max_future_skew < Duration::from_secs(1) {
            return Err(bad("ingest.max_future_skew", "must be at least 1s"));
        }
        if self.resync.timeout_secs == 0 {
            return Err(bad("resync.timeout_secs", "must be at least 1"));
        }
        if self.resync.interval_secs < 60 {
            return Err(bad("resync.interval_secs", "must be at least 60"));
        }
        if self.store.tombstone_retention < Duration::from_secs(3600) {
            return Err(bad("store.tombstone_retention", "must be at least 1h"));
        }
        if !(1..=65_536).contains(&self.store.cache_mb) {
            return Err(bad("store.cache_mb", "must be between 1 and 65536"));
        }
        if !(0.0..=1.0).contains(&self.store.compact_at_free_share) {
            return Err(bad(
                "store.compact_at_free_share",
                "must be between 0.0 and 1.0 (1.0: never)",
            ));
        }
        if !(1..=10_000_000).contains(&self.store.dead_letter_max_count) {
            return Err(bad(
                "store.dead_letter_max_count",
                "must be between 1 and 10000000",
            ));
        }
        if self.store.dead_letter_retention < Duration::from_secs(3600) {
            return Err(bad("store.dead_letter_retention", "must be at least 1h"));
        }
        if log_filter(&self.log.level).is_err() {
            return Err(bad(
                "log.level",
                format!("{:?} is not a tracing filter", self.log.level),
            ));
        }
        Ok(())
    }

    /// `[upstream]`: one live source per node, and named schools.
    fn validate_upstream(&self) -> Result<(), ConfigError> {
        let u = &self.upstream;
        if !(0..=60).contains(&u.wait_secs) {
            return Err(bad("upstream.wait_secs", "must be between 0 and 60"));
        }
        if !(1..=10_000).contains(&u.limit) {
            return Err(bad("upstream.limit", "must be between 1 and 10000"));
        }
        if !(1..=3600).contains(&u.read_timeout_secs) {
            return Err(bad(
                "upstream.read_timeout_secs",
                "must be between 1 and 3600",
            ));
        }
        if u.stale_after_secs <= u.wait_secs {
            return Err(bad(
                "upstream.stale_after_secs",
                format!(
                    "must be more than upstream.wait_secs ({}): an idle parent answers once \
                     per wait",
                    u.wait_secs
                ),
            ));
        }
        let Some(url) = &u.url else {
            return Ok(());
        };
        match reqwest::Url::parse(url) {
            Ok(parsed) if matches!(parsed.scheme(), "http" | "https") => {}
            Ok(parsed) => {
                return Err(bad(
                    "upstream.url",
                    format!("scheme {:?} is not http or https", parsed.scheme()),
                ))
            }
            Err(e) => return Err(bad("upstream.url", format!("{url:?}: {e}"))),
        }
        if !self.kafka.brokers.trim().is_empty() {
            return Err(bad(
                "upstream.url",
                "upstream.url and kafka.brokers are both set: a node has one live source, its \
                 parent's change feed or Kafka; remove one of them",
            ));
        }
        if self.schools.all || self.schools.ids.is_empty() {
            return Err(bad(
                "schools.ids",
                "upstream.url needs the list of schools to follow (schools.all cannot be \
                 followed: a parent's feed is asked for named schools)",
            ));
        }
        if self.schools.ids.len() > MAX_FOLLOWED_SCHOOLS {
            return Err(bad(
                "schools.ids",
                format!(
                    "{} schools: a follower follows at most {MAX_FOLLOWED_SCHOOLS} (their ids \
                     must fit in one request to the parent); split them over several nodes",
                    self.schools.ids.len()
                ),
            ));
        }
        Ok(())
    }

    /// Long-poll requests held at once (see `http.max_long_polls`).
    pub fn max_long_polls(&self) -> usize {
        self.http
            .max_long_polls
            .unwrap_or(self.http.max_connections / 2)
    }

    /// The token sent to `upstream.url`, if `upstream.token_file` is set.
    pub fn upstream_token(&self) -> anyhow::Result<Option<String>> {
        Ok(
            read_tokens("upstream.token_file", self.upstream.token_file.as_deref())?
                .into_iter()
                .next(),
        )
    }

    /// The API tokens of `http.token_file` (empty when unset).
    pub fn load_tokens(&self) -> anyhow::Result<Vec<String>> {
        read_tokens("http.token_file", self.http.token_file.as_deref())
    }

    /// The token sent to `resync.central_url`, if `resync.token_file` is set.
    pub fn resync_token(&self) -> anyhow::Result<Option<String>> {
        Ok(
            read_tokens("resync.token_file", self.resync.token_file.as_deref())?
                .into_iter()
                .next(),
        )
    }

    pub fn store_path(&self) -> PathBuf {
        self.node.data_dir.join(STORE_FILE)
    }

    /// `ingest.max_future_skew`, as the domain checks it.
    pub fn max_future_skew(&self) -> crate::domain::FutureSkew {
        crate::domain::FutureSkew::from_duration(self.ingest.max_future_skew)
    }

    pub fn group_id(&self) -> String {
        self.kafka
            .group_id
            .clone()
            .unwrap_or_else(|| format!("emis-edge-{}", self.node.id))
    }

    /// The schools this node serves: every school with `schools.all`,
    /// else exactly `schools.ids` (none when the list is empty: a node is
    /// never told to serve everything by leaving a key out; `serve` and
    /// `check-config` refuse that configuration, see
    /// [`Config::validate_serving`]).
    pub fn school_filter(&self) -> SchoolFilter {
        if self.schools.all {
            SchoolFilter::All
        } else {
            SchoolFilter::Only(self.schools.ids.iter().copied().collect())
        }
    }

    /// What a node that runs (`serve`, and `check-config`, which checks
    /// what `serve` would run with) needs beyond [`Config::validate`]: it
    /// must be told which schools it serves. An empty `schools.ids`
    /// without `schools.all = true` is refused rather than read as "every
    /// school", which on a school server would download and store the
    /// whole country. (The offline commands accept it: `status` must work
    /// on any configuration, and `import` then imports no school.)
    pub fn validate_serving(&self) -> Result<(), ConfigError> {
        if !self.schools.all && self.schools.ids.is_empty() {
            return Err(bad(
                "schools.ids",
                "is empty: list the schools this node serves, or set `schools.all = true` \
                 to serve every school (a provincial or national node)",
            ));
        }
        Ok(())
    }

    /// The effective configuration as TOML, secrets replaced by `"<redacted>"`.
    pub fn to_redacted_toml(&self) -> String {
        let mut shown = self.clone();
        for (key, value) in shown.kafka.properties.iter_mut() {
            if is_secret(key) {
                *value = "<redacted>".into();
            }
        }
        toml::to_string_pretty(&shown).expect("config always serializes")
    }
}

/// The tracing filter of `log.level` or `RUST_LOG`, each directive trimmed
/// first: tracing-subscriber 0.3.23 slices a directive at the offsets of
/// its trimmed text, so after a space `"info, emis_edge=debug"` was
/// refused, `"info, emis_edge"` matched nothing, and `"info, ề"` panicked
/// (found by the `config` fuzz target).
pub fn log_filter(spec: &str) -> Result<tracing_subscriber::EnvFilter, String> {
    let directives: Vec<&str> = spec.split(',').map(str::trim).collect();
    tracing_subscriber::EnvFilter::try_new(directives.join(",")).map_err(|e| e.to_string())
}

/// Whether a librdkafka property holds a secret.
pub fn is_secret(property: &str) -> bool {
    let p = property.to_ascii_lowercase();
    p.contains("password") || p.contains("secret")
}

/// A key as a TOML file spells it, e.g. `kafka.properties."sasl.password"`:
/// a part that is not a bare key (empty, a dot, non-ASCII) is quoted, so
/// that even `[""]` or `["a.b"]` is named unambiguously.
fn key_path(path: &[String]) -> String {
    if path.is_empty() {
        return "(top level)".to_owned();
    }
    let part = |p: &String| {
        let bare = !p.is_empty()
            && p.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-'));
        if bare {
            p.clone()
        } else {
            toml::Value::String(p.clone()).to_string()
        }
    };
    path.iter().map(part).collect::<Vec<_>>().join(".")
}

fn topic_key(t: EventType) -> String {
    t.name().trim_start_matches("emis.").replace('.', "_")
}

/// Environment values are TOML values when they parse as one (`true`,
/// `86400`, `["a", "b"]`), else plain strings.
fn parse_env_value(raw: &str) -> toml::Value {
    let doc = format!("v = {raw}");
    match toml::from_str::<toml::Table>(&doc) {
        Ok(mut t) => t
            .remove("v")
            .unwrap_or_else(|| toml::Value::String(raw.into())),
        Err(_) => toml::Value::String(raw.to_owned()),
    }
}

/// Tokens of a token file, one per line (`#` comments): refuses a file
/// others can read, and one without a token of 16+ characters.
fn read_tokens(key: &str, path: Option<&Path>) -> anyhow::Result<Vec<String>> {
    let Some(path) = path else {
        return Ok(Vec::new());
    };
    let shown = path.display();
    let meta = std::fs::metadata(path).map_err(|e| anyhow::anyhow!("{key} {shown}: {e}"))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = meta.permissions().mode() & 0o777;
        anyhow::ensure!(
            mode & 0o007 == 0,
            "{key} {shown} is readable by others (mode {mode:04o}); run `chmod 0640 {shown}`"
        );
    }
    let text = std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("{key} {shown}: {e}"))?;
    let tokens: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_owned)
        .collect();
    anyhow::ensure!(!tokens.is_empty(), "{key} {shown} holds no token");
    anyhow::ensure!(
        tokens.iter().all(|t| t.len() >= 16),
        "{key} {shown}: every token must be at least 16 characters"
    );
    Ok(tokens)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_example_configuration_loads_from_a_string() {
        let text = include_str!("../config/edge.example.toml");
        let config = Config::from_toml_str(text).unwrap();
        assert_eq!(config.node.id, "edge-hanoi-01");
        assert_eq!(config.schools.ids.len(), 2);
    }

    /// Found by the `config` fuzz target: printing a configuration with a
    /// string of more than 255 `'` in a row (here a node id) overflowed a
    /// counter in the TOML writer of toml 0.8 and panicked `check-config`.
    #[test]
    fn a_long_run_of_quotes_prints_and_reads_back() {
        let mut config = Config::default();
        config.node.id = format!("e{}", "'".repeat(300));
        let printed = config.to_redacted_toml();
        let back: toml::Table = toml::from_str(&printed).unwrap();
        assert_eq!(back["node"]["id"].as_str(), Some(config.node.id.as_str()));
    }

    /// Found by the `config` fuzz target: `['']` was reported as
    /// "config key ``", naming no key.
    #[test]
    fn an_error_names_an_empty_or_dotted_key_as_toml_spells_it() {
        let key = |text: &str| Config::from_toml_str(text).unwrap_err().key;
        assert_eq!(key("['']"), r#""""#);
        assert_eq!(key("[node]\n'' = 1"), r#"node."""#);
        assert_eq!(key("[\"trường\"]\nid = 1"), r#""trường""#);
        assert_eq!(
            key("[kafka.properties]\n\"sasl.password\" = []"),
            r#"kafka.properties."sasl.password""#
        );
        assert_eq!(key("[http]\nlistn = 1"), "http.listn");
    }

    /// Found by the `config` fuzz target: tracing-subscriber panicked on
    /// `log.level = "emis_edgi,  06h ề["` (check-config crashed instead of
    /// naming the key), and refused or misread a directive after ", ".
    #[test]
    fn log_levels_with_spaces_and_vietnamese_text_do_not_panic() {
        let e = Config::from_toml_str("[log]\nlevel = \"emis_edgi,  06h ề[\"").unwrap_err();
        assert_eq!(e.key, "log.level");
        assert!(log_filter("  ề=info").is_ok());
        assert!(log_filter("info,\u{a0}Đà_Nẵng").is_ok());
        assert_eq!(
            log_filter("info, emis_edge=debug").unwrap().to_string(),
            log_filter("info,emis_edge=debug").unwrap().to_string()
        );
        assert_eq!(
            log_filter("info, emis_edge").unwrap().to_string(),
            log_filter("info,emis_edge").unwrap().to_string()
        );
    }
}

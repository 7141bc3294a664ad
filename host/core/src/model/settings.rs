//! Server settings: the `[server]` section, read as written.

use serde::Deserialize;

/// Server settings, with paths as written (relative to the configuration file).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerSettings {
    #[serde(default = "default_listen")]
    pub listen: String,
    #[serde(default = "default_database")]
    pub database: String,
    /// Directory of built plugins, one subdirectory (with a `plugin.toml`) per plugin.
    #[serde(default)]
    pub plugins: Option<String>,
    /// Requests each ingestion partition may hold before the API answers 503.
    #[serde(default = "default_ingest_queue")]
    pub ingest_queue: usize,
    /// Ingestion partitions (worker threads); default: the number of CPUs.
    #[serde(default)]
    pub partitions: Option<usize>,
    /// How long an event `id` is remembered for deduplication.
    #[serde(default = "default_dedup_window_hours")]
    pub dedup_window_hours: u64,
    /// File of trusted ed25519 public keys: when set, only plugins signed by one install.
    #[serde(default)]
    pub trusted_keys: Option<String>,
    /// Consecutive failed calls (traps, timeouts) after which a plugin is disabled.
    #[serde(default = "default_plugin_failure_limit")]
    pub plugin_failure_limit: u64,
    /// The most memory and the longest call deadline a plugin's manifest may ask for; a plugin
    /// asking for more is not loaded.
    #[serde(default = "default_plugin_max_memory_mib")]
    pub plugin_max_memory_mib: u64,
    #[serde(default = "default_plugin_max_timeout_ms")]
    pub plugin_max_timeout_ms: u64,
    /// Threads connector calls run on, apart from the threads that serve HTTP.
    #[serde(default = "default_plugin_threads")]
    pub plugin_threads: usize,
    /// The most a profile may hold, in KiB: an event whose attribute updates would take a
    /// profile past it has them refused (its counters and visits still move).
    #[serde(default = "default_max_profile_kib")]
    pub max_profile_kib: u64,
    /// How often audience sizes are sampled for their history, for example `1m`.
    #[serde(default = "default_size_sample_interval")]
    pub audience_size_interval: String,
    /// Token every request other than ingestion and health must carry (`Authorization: Bearer`).
    /// `STARLING_ADMIN_TOKEN` in the environment overrides it.
    #[serde(default)]
    pub admin_token: Option<String>,
    /// Names this server is reached by (`Host` headers), besides its listen address and, on
    /// loopback, `localhost`; other names are refused (DNS rebinding).
    #[serde(default)]
    pub hostnames: Vec<String>,
    /// How far ahead of the server's clock an event's timestamp may be without a warning; any
    /// event dated after its receipt is applied at the time it was received.
    #[serde(default = "default_max_clock_skew")]
    pub max_clock_skew: String,
    /// How old an event sent to `POST /v1/events` may be; older ones are refused (imports take
    /// history of any age).
    #[serde(default = "default_max_event_age")]
    pub max_event_age: String,
    /// Open connections served at once; beyond them, new ones wait to be accepted.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// How long a client may take to send a request's headers, for example `10s`.
    #[serde(default = "default_header_timeout")]
    pub header_timeout: String,
    /// How long a client may take to send a request's body once its headers are in.
    #[serde(default = "default_body_timeout")]
    pub body_timeout: String,
    /// PEM certificate chain and private key: with both, the server speaks HTTPS only.
    #[serde(default)]
    pub tls_cert: Option<String>,
    #[serde(default)]
    pub tls_key: Option<String>,
    /// How the database is checked before the server starts on it: `quick` (SQLite's
    /// `quick_check`, the default), `full` (`integrity_check`) or `off`.
    #[serde(default)]
    pub check_at_start: StartCheck,
    /// Where acknowledged work is recorded: `file` (segment files next to the database, the
    /// default) or `memory` (not durable: for measuring the pipeline without the disk).
    #[serde(default)]
    pub event_log: EventLogKind,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StartCheck {
    #[default]
    Quick,
    Full,
    Off,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EventLogKind {
    #[default]
    File,
    Memory,
}

fn default_max_clock_skew() -> String {
    "10m".into()
}
fn default_max_event_age() -> String {
    "30d".into()
}
fn default_max_connections() -> usize {
    1024
}
fn default_header_timeout() -> String {
    "10s".into()
}
fn default_body_timeout() -> String {
    "30s".into()
}
fn default_plugin_max_memory_mib() -> u64 {
    256
}
fn default_plugin_max_timeout_ms() -> u64 {
    30_000
}
fn default_max_profile_kib() -> u64 {
    256
}
fn default_plugin_threads() -> usize {
    2
}
fn default_plugin_failure_limit() -> u64 {
    10
}
fn default_size_sample_interval() -> String {
    "1m".into()
}
fn default_ingest_queue() -> usize {
    256
}
fn default_dedup_window_hours() -> u64 {
    7 * 24
}

impl Default for ServerSettings {
    fn default() -> Self {
        ServerSettings {
            listen: default_listen(),
            database: default_database(),
            plugins: None,
            ingest_queue: default_ingest_queue(),
            partitions: None,
            dedup_window_hours: default_dedup_window_hours(),
            trusted_keys: None,
            plugin_failure_limit: default_plugin_failure_limit(),
            plugin_max_memory_mib: default_plugin_max_memory_mib(),
            plugin_max_timeout_ms: default_plugin_max_timeout_ms(),
            max_profile_kib: default_max_profile_kib(),
            plugin_threads: default_plugin_threads(),
            audience_size_interval: default_size_sample_interval(),
            admin_token: None,
            hostnames: Vec::new(),
            max_clock_skew: default_max_clock_skew(),
            max_event_age: default_max_event_age(),
            max_connections: default_max_connections(),
            header_timeout: default_header_timeout(),
            body_timeout: default_body_timeout(),
            tls_cert: None,
            tls_key: None,
            check_at_start: StartCheck::Quick,
            event_log: EventLogKind::File,
        }
    }
}

fn default_listen() -> String {
    "127.0.0.1:8080".into()
}
fn default_database() -> String {
    "starling.db".into()
}

/// `[cluster]`: the NATS servers the node joins, and how it takes part.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterSettings {
    /// NATS server URLs (`nats://host:port`).
    pub nats: Vec<String>,
    /// This node's name, unique in the cluster.
    pub node: String,
    /// How long a partition's lease lasts without renewal.
    pub lease_ms: i64,
    /// Copies JetStream keeps of the stream and buckets.
    pub replicas: usize,
    /// The base URL other nodes reach this one's HTTP API at (none: the address it listens on).
    pub advertise: Option<String>,
    /// How often the owner stores a snapshot of its state for the next owner to start from.
    pub snapshot_every_ms: i64,
    /// Most events the intake holds while no node serves (0: none is taken in, `503`).
    pub intake_limit: u64,
    /// Whether the partitions are spread over the live nodes (else one node holds them all).
    pub spread: bool,
    /// Spread: how long the stream keeps, for a node whose heartbeat lapsed, the records it has
    /// not applied (back later, it restores the latest snapshot instead).
    pub wait_for_absent_ms: i64,
}

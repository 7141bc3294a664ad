//! The configuration file: TOML in, a validated [`Model`] out, or every error found with its position.

use crate::condition::{CmpOp, Condition, Derived, Expected, Operand};
use crate::operations::{EventSpec, FieldSpec, FieldType, History, ImportDef, OnViolation, Retention, SourceDef};
use crate::stitch::{IdentitySettings, MergeRule};
use crate::value::{
    AttrType, DEFAULT_TIMELINE_AGE_MS, DEFAULT_TIMELINE_ENTRIES, MAX_ARRAY_ITEMS, MAX_FUNNEL_STEPS, MAX_ROLLING_WINDOW,
    MAX_TIMELINE_ENTRIES, Scope, Value,
};
use serde::Deserialize;
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::ops::Range;
use toml::Spanned;

/// Preloaded attributes every profile has; their names are reserved.
pub const PRELOADED: &[(&str, AttrType)] = &[
    ("first_seen", AttrType::Date),
    ("last_seen", AttrType::Date),
    ("event_count", AttrType::Number),
    ("visit_count", AttrType::Number),
    ("visit_start", AttrType::Date),
    ("visit_event_count", AttrType::Number),
    ("visit_duration_ms", AttrType::Number),
];

/// Preloaded attributes that change with every event.
pub const CHANGED_BY_EVERY_EVENT: &[&str] = &["last_seen", "event_count", "visit_event_count", "visit_duration_ms"];

pub const DEFAULT_VISIT_TIMEOUT_MINUTES: u64 = 30;
const MAX_VISIT_TIMEOUT_MINUTES: u64 = 24 * 60;

/// One problem in a configuration file, at a 1-based line and column.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    pub line: usize,
    pub column: usize,
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}: {}", self.line, self.column, self.message)
    }
}

/// All the problems found in a configuration file.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{} error(s) in configuration", .0.len())]
pub struct ConfigErrors(pub Vec<Diagnostic>);

impl ConfigErrors {
    /// Renders each diagnostic as `file:line:column: message`, one per line.
    pub fn render(&self, file: &str) -> String {
        self.0.iter().map(|d| format!("{file}:{d}\n")).collect()
    }
}

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
    /// How often audience sizes are sampled for their history, for example `1m`.
    #[serde(default = "default_size_sample_interval")]
    pub audience_size_interval: String,
    /// Token every request other than ingestion and health must carry (`Authorization: Bearer`).
    /// `STARLING_ADMIN_TOKEN` in the environment overrides it.
    #[serde(default)]
    pub admin_token: Option<String>,
    /// PEM certificate chain and private key: with both, the server speaks HTTPS only.
    #[serde(default)]
    pub tls_cert: Option<String>,
    #[serde(default)]
    pub tls_key: Option<String>,
    /// Where acknowledged work is recorded: `file` (segment files next to the database, the
    /// default) or `memory` (not durable: for measuring the pipeline without the disk).
    #[serde(default)]
    pub event_log: EventLogKind,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EventLogKind {
    #[default]
    File,
    Memory,
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
            audience_size_interval: default_size_sample_interval(),
            admin_token: None,
            tls_cert: None,
            tls_key: None,
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

#[derive(Debug, Clone)]
pub struct AttributeDef {
    pub name: String,
    pub scope: Scope,
    pub ty: AttrType,
    /// Event scope: where in the event's `data` the value is read.
    pub field: Option<Vec<String>>,
    /// Arrays and timelines: most items kept (oldest dropped first).
    pub max_entries: usize,
    /// Timelines: age after which entries expire.
    pub max_age_ms: i64,
    /// Funnels: the steps, in order.
    pub steps: Vec<FunnelStepDef>,
    /// How the values of two stitched profiles combine.
    pub merge: MergeRule,
}

#[derive(Debug, Clone, PartialEq)]
pub struct FunnelStepDef {
    pub name: String,
    pub required: bool,
}

/// When an enrichment runs.
#[derive(Debug, Clone, PartialEq)]
pub enum When {
    AnyEvent,
    NewVisitor,
    NewVisit,
    /// From the visit-end timer (or the first event after the timeout, whichever comes first).
    VisitEnded,
    Event(String),
}

/// Where an enrichment or action parameter takes a value from.
#[derive(Debug, Clone, PartialEq)]
pub enum Source {
    Const(Value),
    /// A dotted path into the event's `data`.
    Event(Vec<String>),
    /// The event's time.
    Now,
    Attribute(String),
}

#[derive(Debug, Clone, PartialEq)]
pub enum Operation {
    // number
    Increment(Source),
    Decrement(Source),
    Min(Source),
    Max(Source),
    RollingSum { source: Source, window: usize },
    RollingAvg { source: Source, window: usize },
    // any single value
    Set(Source),
    // string
    CaptureFirst(Source),
    CaptureMostFrequent(Source),
    Lowercase(Option<Source>),
    Uppercase(Option<Source>),
    // boolean
    Toggle,
    // badge
    AssignBadge,
    RemoveBadge,
    // set of strings and arrays
    AddToSet(Source),
    RemoveFromSet(Source),
    Union(String),
    Difference(String),
    TopKeys { tally: String, n: usize },
    Append(Source),
    // tally
    TallyIncrement { key: Source, by: Source },
    TallySet { key: Source, to: Source },
    TallyRemove { key: Source },
    // timeline
    CaptureEntry { fields: Vec<(String, Source)> },
    // funnel
    Advance { step: usize, fields: Vec<(String, Source)> },
    Reset,
    // any
    Clear,
}

#[derive(Debug, Clone)]
pub struct Enrichment {
    pub attribute: String,
    pub operation: Operation,
    pub when: When,
    pub condition: Option<Condition>,
}

/// A Wasm enricher to run after the built-in enrichments, in file order.
#[derive(Debug, Clone)]
pub struct EnricherRef {
    pub plugin: String,
    /// The attributes the enricher is shown; all stored ones when not given.
    pub reads: Option<Vec<String>>,
    pub span: Range<usize>,
}

#[derive(Debug, Clone)]
pub struct Audience {
    pub name: String,
    pub rule: Condition,
    /// The attributes the rule reads.
    pub inputs: Vec<String>,
    /// Whether membership can change with the passing of time alone.
    pub time_relative: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    Joined,
    Left,
    /// The visitor is in the audience when a visit starts (after its first event).
    VisitStarted,
    /// The visitor is in the audience when a visit ends.
    VisitEnded,
    /// Every event that matches (an event feed; no audience).
    Event,
    /// The profile is deleted (on request or by retention): every deleted profile, or with an
    /// audience only its members. Connectors see it as leaving that audience.
    Deleted,
}

impl Trigger {
    pub const ALL: [Trigger; 6] =
        [Trigger::Joined, Trigger::Left, Trigger::VisitStarted, Trigger::VisitEnded, Trigger::Event, Trigger::Deleted];

    pub fn name(self) -> &'static str {
        match self {
            Trigger::Joined => "joined",
            Trigger::Left => "left",
            Trigger::VisitStarted => "visit_started",
            Trigger::VisitEnded => "visit_ended",
            Trigger::Event => "event",
            Trigger::Deleted => "deleted",
        }
    }
}

#[derive(Debug, Clone)]
pub struct ActionDef {
    pub name: String,
    /// The audience the trigger is about; empty for event feeds.
    pub audience: String,
    pub trigger: Trigger,
    /// Event feeds: only events of this name.
    pub event: Option<String>,
    /// Event feeds: only events (and profiles) matching this.
    pub condition: Option<Condition>,
    pub connector: String,
    pub connector_span: Range<usize>,
    pub settings: BTreeMap<String, String>,
    pub params: Vec<(String, Source)>,
    pub delivery: DeliveryPolicy,
}

/// How an action's deliveries are paced.
#[derive(Debug, Clone, PartialEq)]
pub struct DeliveryPolicy {
    /// At most one action per visitor within this period; later firings are dropped.
    pub cooldown_ms: Option<i64>,
    /// Deliver this long after the trigger, and only if the visitor is still in (for `joined`)
    /// or still out of (for `left`) the audience then.
    pub delay_ms: Option<i64>,
    pub batch: Option<BatchPolicy>,
    /// Calls of this action's connector in flight at once.
    pub concurrency: usize,
    /// Attempts before an action becomes a dead letter.
    pub max_attempts: u32,
    /// Backoff before the first retry; it doubles per attempt (with jitter) up to `retry_max_ms`.
    pub retry_initial_ms: i64,
    pub retry_max_ms: i64,
}

impl Default for DeliveryPolicy {
    fn default() -> Self {
        DeliveryPolicy {
            cooldown_ms: None,
            delay_ms: None,
            batch: None,
            concurrency: 4,
            max_attempts: 12,
            retry_initial_ms: 1_000,
            retry_max_ms: 10 * 60_000,
        }
    }
}

/// Actions are handed to the connector together once any limit is reached.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchPolicy {
    pub max_items: usize,
    pub max_age_ms: i64,
    pub max_bytes: usize,
}

/// A validated configuration.
#[derive(Debug, Clone)]
pub struct Model {
    pub server: ServerSettings,
    /// Inactivity after which a visit ends, unless its data source has its own.
    pub visit_timeout_ms: i64,
    visit_timeout_by_source: HashMap<String, i64>,
    pub audience_size_interval_ms: i64,
    /// Which ids may stitch profiles.
    pub identity: IdentitySettings,
    pub attributes: Vec<AttributeDef>,
    attribute_index: HashMap<String, usize>,
    pub enrichments: Vec<Enrichment>,
    pub enrichers: Vec<EnricherRef>,
    pub audiences: Vec<Audience>,
    /// Attribute name → indexes of the audiences whose rules read it.
    readers: HashMap<String, Vec<usize>>,
    /// Indexes of the audiences with time-relative rules.
    pub time_relative: Vec<usize>,
    /// Indexes of the timeline attributes, whose entries expire.
    timelines: Vec<usize>,
    pub actions: Vec<ActionDef>,
    /// Per-plugin configuration values, handed to the plugin through its `config` interface.
    pub plugin_config: BTreeMap<String, BTreeMap<String, String>>,
    /// Data sources with their ingestion keys; when any is declared, ingestion requires a key.
    pub sources: Vec<SourceDef>,
    pub event_specs: Vec<EventSpec>,
    pub retention: Option<Retention>,
    /// How much history and how many finished actions are kept.
    pub history: History,
    pub imports: Vec<ImportDef>,
    source: String,
}

impl Model {
    pub fn attribute(&self, name: &str) -> Option<&AttributeDef> {
        self.attribute_index.get(name).map(|&i| &self.attributes[i])
    }

    /// The type of a declared or preloaded attribute.
    pub fn attribute_type(&self, name: &str) -> Option<AttrType> {
        self.attribute(name).map(|a| a.ty).or_else(|| preloaded_type(name))
    }

    /// The timeline attributes.
    pub fn timelines(&self) -> impl Iterator<Item = &AttributeDef> {
        self.timelines.iter().map(|&i| &self.attributes[i])
    }

    /// The visit timeout for events from `source`.
    pub fn visit_timeout_for(&self, source: Option<&str>) -> i64 {
        source.and_then(|s| self.visit_timeout_by_source.get(s)).copied().unwrap_or(self.visit_timeout_ms)
    }

    /// Indexes of the audiences that read attribute `name`.
    pub fn readers(&self, name: &str) -> &[usize] {
        self.readers.get(name).map_or(&[], Vec::as_slice)
    }

    pub fn audience(&self, name: &str) -> Option<&Audience> {
        self.audiences.iter().find(|a| a.name == name)
    }

    /// The spec events named `event` must follow.
    pub fn event_spec(&self, event: &str) -> Option<&EventSpec> {
        self.event_specs.iter().find(|s| s.event == event)
    }

    pub fn import(&self, name: &str) -> Option<&ImportDef> {
        self.imports.iter().find(|i| i.name == name)
    }

    /// 1-based line and column of a byte offset in the source this model was read from.
    pub fn position(&self, offset: usize) -> (usize, usize) {
        line_col(&self.source, offset)
    }

    /// A diagnostic at `span`, for checks made outside the core (for example unknown plugins).
    pub fn diagnostic(&self, span: &Range<usize>, message: impl Into<String>) -> Diagnostic {
        let (line, column) = self.position(span.start);
        Diagnostic { line, column, message: message.into() }
    }
}

pub fn preloaded_type(name: &str) -> Option<AttrType> {
    PRELOADED.iter().find(|(n, _)| *n == name).map(|(_, t)| *t)
}

fn line_col(source: &str, offset: usize) -> (usize, usize) {
    let before = &source[..offset.min(source.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

// ---- raw, position-carrying form of the file ----

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    server: ServerSettings,
    #[serde(default)]
    visits: RawVisits,
    #[serde(default)]
    identity: RawIdentity,
    #[serde(default)]
    attribute: Vec<Spanned<RawAttribute>>,
    #[serde(default)]
    enrichment: Vec<Spanned<RawEnrichment>>,
    #[serde(default)]
    enricher: Vec<Spanned<RawEnricher>>,
    #[serde(default)]
    audience: Vec<Spanned<RawAudience>>,
    #[serde(default)]
    action: Vec<Spanned<RawAction>>,
    #[serde(default)]
    plugin: BTreeMap<String, BTreeMap<String, String>>,
    #[serde(default)]
    source: Vec<Spanned<RawSource>>,
    #[serde(default)]
    event_spec: Vec<Spanned<RawEventSpec>>,
    retention: Option<Spanned<RawRetention>>,
    #[serde(default)]
    import: Vec<Spanned<RawImport>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSource {
    name: Spanned<String>,
    api_key: Spanned<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEventSpec {
    event: Spanned<String>,
    /// Field path → type; a trailing `?` makes the field optional.
    #[serde(default)]
    fields: BTreeMap<String, Spanned<String>>,
    #[serde(default = "yes")]
    allow_other_fields: bool,
    on_violation: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRetention {
    inactive_after: Option<Spanned<String>>,
    check_every: Option<Spanned<String>>,
    events: Option<Spanned<String>>,
    events_per_profile: Option<Spanned<i64>>,
    actions_kept: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawImport {
    name: Spanned<String>,
    event: Spanned<String>,
    #[serde(rename = "match")]
    matches: Spanned<String>,
    key: Option<Spanned<String>>,
    #[serde(default)]
    columns: BTreeMap<String, Spanned<String>>,
    timestamp: Option<Spanned<String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawVisits {
    timeout_minutes: Option<Spanned<u64>>,
    /// Per data source (the event's `source`), minutes.
    #[serde(default)]
    timeout_minutes_by_source: BTreeMap<String, Spanned<u64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAttribute {
    name: Spanned<String>,
    scope: Spanned<String>,
    #[serde(rename = "type")]
    ty: Spanned<String>,
    field: Option<Spanned<String>>,
    max_entries: Option<Spanned<u64>>,
    max_age: Option<Spanned<String>>,
    steps: Option<Spanned<Vec<RawStep>>>,
    merge: Option<Spanned<String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawIdentity {
    min_length: Option<Spanned<u64>>,
    blocked: Option<Vec<String>>,
    max_ids_per_profile: Option<Spanned<u64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStep {
    name: String,
    #[serde(default = "yes")]
    required: bool,
}

fn yes() -> bool {
    true
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEnrichment {
    attribute: Spanned<String>,
    op: Spanned<String>,
    value: Option<Spanned<toml::Value>>,
    event: Option<Spanned<String>>,
    from: Option<Spanned<String>>,
    key: Option<Spanned<String>>,
    window: Option<Spanned<u64>>,
    n: Option<Spanned<u64>>,
    step: Option<Spanned<String>>,
    fields: Option<BTreeMap<String, Spanned<String>>>,
    when: Option<Spanned<String>>,
    #[serde(rename = "if")]
    condition: Option<Spanned<RawCondition>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEnricher {
    plugin: Spanned<String>,
    #[serde(default)]
    reads: Option<Vec<Spanned<String>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAudience {
    name: Spanned<String>,
    rule: Spanned<RawCondition>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCondition {
    all: Option<Vec<Spanned<RawCondition>>>,
    any: Option<Vec<Spanned<RawCondition>>>,
    not: Option<Box<Spanned<RawCondition>>>,
    attribute: Option<Spanned<String>>,
    key: Option<Spanned<String>>,
    op: Option<Spanned<String>>,
    value: Option<Spanned<toml::Value>>,
    #[serde(default)]
    ignore_case: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAction {
    name: Spanned<String>,
    audience: Option<Spanned<String>>,
    trigger: Spanned<String>,
    event: Option<Spanned<String>>,
    #[serde(rename = "if")]
    condition: Option<Spanned<RawCondition>>,
    connector: Spanned<String>,
    #[serde(default)]
    settings: BTreeMap<String, String>,
    #[serde(default)]
    params: BTreeMap<String, Spanned<String>>,
    cooldown: Option<Spanned<String>>,
    delay: Option<Spanned<String>>,
    batch: Option<Spanned<RawBatch>>,
    concurrency: Option<Spanned<u64>>,
    max_attempts: Option<Spanned<u64>>,
    retry_initial: Option<Spanned<String>>,
    retry_max: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBatch {
    max_items: Option<u64>,
    max_age: Option<String>,
    max_bytes: Option<u64>,
}

/// Parses and validates a configuration file, reporting every error found.
pub fn parse(source: &str) -> Result<Model, ConfigErrors> {
    let raw: RawConfig = toml::from_str(source).map_err(|e| {
        let (line, column) = e.span().map_or((1, 1), |s| line_col(source, s.start));
        ConfigErrors(vec![Diagnostic { line, column, message: e.message().trim().to_string() }])
    })?;
    let mut v = Validator { source, errors: Vec::new(), attributes: HashMap::new() };
    let model = v.model(raw);
    if v.errors.is_empty() { Ok(model) } else { Err(ConfigErrors(v.errors)) }
}

/// Where a rule may be used, which decides what it may read.
#[derive(Clone, Copy, PartialEq)]
enum RuleUse {
    /// Audiences read stored attributes only.
    Audience,
    /// Enrichment conditions and event feeds also read the current event.
    WithEvent,
}

struct Validator<'a> {
    source: &'a str,
    errors: Vec<Diagnostic>,
    /// Declared attributes, by name.
    attributes: HashMap<String, AttributeDef>,
}

impl Validator<'_> {
    fn error(&mut self, span: Range<usize>, message: impl Into<String>) {
        let (line, column) = line_col(self.source, span.start);
        self.errors.push(Diagnostic { line, column, message: message.into() });
    }

    fn enricher(&mut self, raw: &RawEnricher) -> EnricherRef {
        let reads = raw.reads.as_ref().map(|names| {
            for name in names {
                match self.scope(name.get_ref()) {
                    Some(Scope::Event) => self.error(
                        name.span(),
                        format!("enricher reads `{}`, an event attribute; it sees the event itself", name.get_ref()),
                    ),
                    None if preloaded_type(name.get_ref()).is_none() => self.error(
                        name.span(),
                        format!("enricher reads `{}`, which is not a declared attribute", name.get_ref()),
                    ),
                    _ => {}
                }
            }
            names.iter().map(|n| n.get_ref().clone()).collect()
        });
        EnricherRef { plugin: raw.plugin.get_ref().clone(), reads, span: raw.plugin.span() }
    }

    fn lookup(&self, name: &str) -> Option<AttrType> {
        self.attributes.get(name).map(|a| a.ty).or_else(|| preloaded_type(name))
    }

    fn scope(&self, name: &str) -> Option<Scope> {
        self.attributes.get(name).map(|a| a.scope)
    }

    fn model(&mut self, raw: RawConfig) -> Model {
        let visit_timeout_minutes = match &raw.visits.timeout_minutes {
            Some(t) if *t.get_ref() == 0 || *t.get_ref() > MAX_VISIT_TIMEOUT_MINUTES => {
                self.error(
                    t.span(),
                    format!("visits.timeout_minutes must be between 1 and {MAX_VISIT_TIMEOUT_MINUTES}"),
                );
                DEFAULT_VISIT_TIMEOUT_MINUTES
            }
            Some(t) => *t.get_ref(),
            None => DEFAULT_VISIT_TIMEOUT_MINUTES,
        };
        let mut visit_timeout_by_source = HashMap::new();
        for (source, minutes) in &raw.visits.timeout_minutes_by_source {
            match *minutes.get_ref() {
                m @ 1..=MAX_VISIT_TIMEOUT_MINUTES => {
                    visit_timeout_by_source.insert(source.clone(), (m * 60_000) as i64);
                }
                _ => self.error(
                    minutes.span(),
                    format!(
                        "visits.timeout_minutes_by_source.{source} must be between 1 and {MAX_VISIT_TIMEOUT_MINUTES}"
                    ),
                ),
            }
        }
        let audience_size_interval_ms = match parse_duration(&raw.server.audience_size_interval) {
            Ok(ms) => ms,
            Err(msg) => {
                self.error(0..0, format!("server.audience_size_interval: {msg}"));
                60_000
            }
        };

        let mut attributes = Vec::new();
        let mut attribute_index = HashMap::new();
        for a in &raw.attribute {
            if let Some(def) = self.attribute(a.get_ref(), &attribute_index) {
                attribute_index.insert(def.name.clone(), attributes.len());
                self.attributes.insert(def.name.clone(), def.clone());
                attributes.push(def);
            }
        }

        let enrichments = raw.enrichment.iter().filter_map(|e| self.enrichment(e)).collect();

        let enrichers = raw.enricher.iter().map(|e| self.enricher(e.get_ref())).collect();

        let mut audiences: Vec<Audience> = Vec::new();
        for a in &raw.audience {
            let a = a.get_ref();
            let name = a.name.get_ref();
            if audiences.iter().any(|x| &x.name == name) {
                self.error(a.name.span(), format!("audience `{name}` is declared twice"));
                continue;
            }
            if let Some(rule) = self.condition(&a.rule, RuleUse::Audience) {
                let mut inputs = Vec::new();
                rule.attributes(&mut inputs);
                let time_relative = rule.is_time_relative();
                audiences.push(Audience { name: name.clone(), rule, inputs, time_relative });
            }
        }
        let mut readers: HashMap<String, Vec<usize>> = HashMap::new();
        for (i, audience) in audiences.iter().enumerate() {
            for input in &audience.inputs {
                readers.entry(input.clone()).or_default().push(i);
            }
        }
        let time_relative = audiences.iter().enumerate().filter(|(_, a)| a.time_relative).map(|(i, _)| i).collect();

        let mut actions: Vec<ActionDef> = Vec::new();
        for a in &raw.action {
            if let Some(action) = self.action(a.get_ref(), &raw.audience) {
                if actions.iter().any(|x| x.name == action.name) {
                    self.error(a.get_ref().name.span(), format!("action `{}` is declared twice", action.name));
                }
                actions.push(action);
            }
        }

        let identity = self.identity(&raw.identity);
        let sources = self.sources(&raw.source);
        let event_specs = self.event_specs(&raw.event_spec);
        let retention = raw.retention.as_ref().and_then(|r| self.retention(r.get_ref()));
        let history = raw.retention.as_ref().map_or_else(History::default, |r| self.history(r.get_ref()));
        let imports = self.imports(&raw.import);
        let timelines = (0..attributes.len()).filter(|&i| attributes[i].ty == AttrType::Timeline).collect();
        Model {
            server: raw.server,
            visit_timeout_ms: (visit_timeout_minutes * 60_000) as i64,
            visit_timeout_by_source,
            audience_size_interval_ms,
            identity,
            attributes,
            attribute_index,
            enrichments,
            enrichers,
            audiences,
            readers,
            time_relative,
            timelines,
            actions,
            plugin_config: raw.plugin,
            sources,
            event_specs,
            retention,
            history,
            imports,
            source: self.source.to_string(),
        }
    }

    fn attribute(&mut self, a: &RawAttribute, declared: &HashMap<String, usize>) -> Option<AttributeDef> {
        let name = a.name.get_ref();
        if !is_identifier(name) {
            self.error(a.name.span(), format!("attribute name `{name}` must be letters, digits and `_`"));
            return None;
        }
        if preloaded_type(name).is_some() {
            self.error(a.name.span(), format!("attribute `{name}` is preloaded; choose another name"));
            return None;
        }
        if declared.contains_key(name) {
            self.error(a.name.span(), format!("attribute `{name}` is declared twice"));
            return None;
        }
        let scope = match a.scope.get_ref().as_str() {
            "event" => Scope::Event,
            "visit" => Scope::Visit,
            "visitor" => Scope::Visitor,
            "omnichannel" => Scope::Omnichannel,
            other => {
                self.error(
                    a.scope.span(),
                    format!("unknown scope `{other}`: expected event, visit, visitor or omnichannel"),
                );
                return None;
            }
        };
        let Some(ty) = AttrType::parse(a.ty.get_ref()) else {
            let names: Vec<&str> = AttrType::ALL.iter().map(|t| t.name()).collect();
            self.error(a.ty.span(), format!("unknown type `{}`: expected one of {}", a.ty.get_ref(), names.join(", ")));
            return None;
        };
        let mut def = AttributeDef {
            name: name.clone(),
            scope,
            ty,
            field: None,
            max_entries: if ty == AttrType::Timeline { DEFAULT_TIMELINE_ENTRIES } else { MAX_ARRAY_ITEMS },
            max_age_ms: DEFAULT_TIMELINE_AGE_MS,
            steps: Vec::new(),
            merge: MergeRule::default_for(ty),
        };
        if let Some(m) = &a.merge {
            let allowed = MergeRule::allowed_for(ty);
            match MergeRule::parse(m.get_ref()) {
                Some(rule) if allowed.contains(&rule) => def.merge = rule,
                _ => {
                    let names: Vec<&str> = allowed.iter().map(|r| r.name()).collect();
                    self.error(
                        m.span(),
                        format!(
                            "merge rule `{}` does not apply to {} (use: {})",
                            m.get_ref(),
                            ty.name(),
                            names.join(", ")
                        ),
                    );
                }
            }
        }
        match (&a.field, scope) {
            (Some(f), Scope::Event) => match parse_event_path(f.get_ref()) {
                Some(path) => def.field = Some(path),
                None => self.error(f.span(), format!("`{}` is not a field path like `order.total`", f.get_ref())),
            },
            (None, Scope::Event) => self.error(a.name.span(), format!("event attribute `{name}` needs `field`")),
            (Some(f), _) => self.error(f.span(), "`field` is only for attributes of scope `event`"),
            (None, _) => {}
        }
        if scope == Scope::Event
            && !matches!(
                ty,
                AttrType::String
                    | AttrType::Number
                    | AttrType::Boolean
                    | AttrType::Date
                    | AttrType::SetOfStrings
                    | AttrType::ArrayOfStrings
                    | AttrType::ArrayOfNumbers
                    | AttrType::ArrayOfBooleans
            )
        {
            self.error(a.ty.span(), format!("an event attribute cannot be a {}", ty.name()));
        }
        if let Some(m) = &a.max_entries {
            let limit = if ty == AttrType::Timeline { MAX_TIMELINE_ENTRIES } else { MAX_ARRAY_ITEMS };
            match (ty, *m.get_ref() as usize) {
                (
                    AttrType::Timeline
                    | AttrType::ArrayOfStrings
                    | AttrType::ArrayOfNumbers
                    | AttrType::ArrayOfBooleans,
                    n,
                ) if (1..=limit).contains(&n) => def.max_entries = n,
                (
                    AttrType::Timeline
                    | AttrType::ArrayOfStrings
                    | AttrType::ArrayOfNumbers
                    | AttrType::ArrayOfBooleans,
                    _,
                ) => self.error(m.span(), format!("max_entries must be between 1 and {limit}")),
                _ => self.error(m.span(), "`max_entries` is only for arrays and timelines"),
            }
        }
        if let Some(age) = &a.max_age {
            if ty != AttrType::Timeline {
                self.error(age.span(), "`max_age` is only for timelines");
            } else {
                match parse_duration(age.get_ref()) {
                    Ok(ms) => def.max_age_ms = ms,
                    Err(msg) => self.error(age.span(), msg),
                }
            }
        }
        match (&a.steps, ty) {
            (Some(steps), AttrType::Funnel) => {
                let list = steps.get_ref();
                if list.is_empty() || list.len() > MAX_FUNNEL_STEPS {
                    self.error(steps.span(), format!("a funnel has between 1 and {MAX_FUNNEL_STEPS} steps"));
                } else if !list.iter().any(|s| s.required) {
                    self.error(steps.span(), "a funnel needs at least one required step");
                }
                for (i, s) in list.iter().enumerate() {
                    if list[..i].iter().any(|p| p.name == s.name) {
                        self.error(steps.span(), format!("funnel step `{}` is declared twice", s.name));
                    }
                }
                def.steps = list.iter().map(|s| FunnelStepDef { name: s.name.clone(), required: s.required }).collect();
            }
            (None, AttrType::Funnel) => self.error(a.ty.span(), format!("funnel `{name}` needs `steps`")),
            (Some(steps), _) => self.error(steps.span(), "`steps` is only for funnels"),
            (None, _) => {}
        }
        Some(def)
    }

    fn sources(&mut self, raw: &[Spanned<RawSource>]) -> Vec<SourceDef> {
        let mut sources: Vec<SourceDef> = Vec::new();
        for s in raw.iter().map(Spanned::get_ref) {
            let name = s.name.get_ref();
            if name.is_empty() || name.len() > 200 {
                self.error(s.name.span(), "source name must be 1 to 200 characters");
            } else if sources.iter().any(|x| x.name == *name) {
                self.error(s.name.span(), format!("source `{name}` is declared twice"));
            } else if s.api_key.get_ref().len() < 16 {
                self.error(s.api_key.span(), format!("source `{name}`: api_key must be at least 16 characters"));
            } else if sources.iter().any(|x| x.api_key == *s.api_key.get_ref()) {
                self.error(s.api_key.span(), format!("source `{name}`: api_key is already another source's key"));
            } else {
                sources.push(SourceDef { name: name.clone(), api_key: s.api_key.get_ref().clone() });
            }
        }
        sources
    }

    fn event_specs(&mut self, raw: &[Spanned<RawEventSpec>]) -> Vec<EventSpec> {
        let mut specs: Vec<EventSpec> = Vec::new();
        for spec in raw.iter().map(Spanned::get_ref) {
            let event = spec.event.get_ref();
            if specs.iter().any(|x| x.event == *event) {
                self.error(spec.event.span(), format!("event `{event}` has two specs"));
                continue;
            }
            let on_violation = match spec.on_violation.as_ref().map(|o| (o.get_ref().as_str(), o.span())) {
                None | Some(("reject", _)) => OnViolation::Reject,
                Some(("warn", _)) => OnViolation::Warn,
                Some((other, span)) => {
                    self.error(span, format!("on_violation `{other}`: expected reject or warn"));
                    OnViolation::Reject
                }
            };
            let mut fields = Vec::new();
            for (path, ty) in &spec.fields {
                let (name, required) = match ty.get_ref().strip_suffix('?') {
                    Some(t) => (t, false),
                    None => (ty.get_ref().as_str(), true),
                };
                let Some(field_type) = FieldType::parse(name) else {
                    let names: Vec<&str> = FieldType::ALL.iter().map(|t| t.name()).collect();
                    self.error(
                        ty.span(),
                        format!(
                            "fields.{path}: unknown type `{name}`: expected {} (with `?` when optional)",
                            names.join(", ")
                        ),
                    );
                    continue;
                };
                match parse_event_path(path) {
                    Some(path) => fields.push(FieldSpec { path, ty: field_type, required }),
                    None => self.error(ty.span(), format!("fields.{path}: not a field path like `order.total`")),
                }
            }
            specs.push(EventSpec {
                event: event.clone(),
                fields,
                allow_other_fields: spec.allow_other_fields,
                on_violation,
            });
        }
        specs
    }

    fn history(&mut self, raw: &RawRetention) -> History {
        let default = History::default();
        let at_least_a_minute =
            |this: &mut Self, raw: &Option<Spanned<String>>, name: &str, default: i64| match this.duration(raw) {
                Some(ms) if ms < 60_000 => {
                    this.error(raw.as_ref().expect("parsed").span(), format!("retention.{name} must be at least 1m"));
                    default
                }
                Some(ms) => ms,
                None => default,
            };
        let events_ms = at_least_a_minute(self, &raw.events, "events", default.events_ms);
        let actions_kept_ms = at_least_a_minute(self, &raw.actions_kept, "actions_kept", default.actions_kept_ms);
        let events_per_profile = match &raw.events_per_profile {
            Some(n) if *n.get_ref() < 1 => {
                self.error(n.span(), "retention.events_per_profile must be at least 1");
                default.events_per_profile
            }
            Some(n) => *n.get_ref() as usize,
            None => default.events_per_profile,
        };
        History { events_ms, events_per_profile, actions_kept_ms }
    }

    fn retention(&mut self, raw: &RawRetention) -> Option<Retention> {
        let inactive_after = raw.inactive_after.as_ref()?;
        let inactive_after_ms = self.duration(&Some(inactive_after.clone()))?;
        let check_every_ms = match &raw.check_every {
            None => 3_600_000,
            some => self.duration(some)?,
        };
        if inactive_after_ms < 60_000 {
            self.error(inactive_after.span(), "retention.inactive_after must be at least 1m");
            return None;
        }
        Some(Retention { inactive_after_ms, check_every_ms: check_every_ms.max(1_000) })
    }

    fn imports(&mut self, raw: &[Spanned<RawImport>]) -> Vec<ImportDef> {
        let mut imports: Vec<ImportDef> = Vec::new();
        for i in raw.iter().map(Spanned::get_ref) {
            let name = i.name.get_ref();
            if !is_identifier(name) {
                self.error(i.name.span(), format!("import name `{name}` must be letters, digits and `_`"));
                continue;
            }
            if imports.iter().any(|x| x.name == *name) {
                self.error(i.name.span(), format!("import `{name}` is declared twice"));
                continue;
            }
            let matches = i.matches.get_ref();
            match self.attributes.get(matches) {
                Some(a) if a.ty == AttrType::VisitorId => {}
                Some(_) => {
                    self.error(i.matches.span(), format!("match: `{matches}` is not a visitor_id attribute"));
                    continue;
                }
                None => {
                    self.error(i.matches.span(), format!("match: unknown attribute `{matches}`"));
                    continue;
                }
            }
            let key = i.key.as_ref().map_or_else(|| matches.clone(), |k| k.get_ref().clone());
            let mut columns = Vec::new();
            for (column, ty) in &i.columns {
                match FieldType::parse(ty.get_ref()) {
                    Some(t) => columns.push((column.clone(), t)),
                    None => {
                        let names: Vec<&str> = FieldType::ALL.iter().map(|t| t.name()).collect();
                        self.error(
                            ty.span(),
                            format!("columns.{column}: unknown type `{}`: expected {}", ty.get_ref(), names.join(", ")),
                        );
                    }
                }
            }
            let timestamp = i.timestamp.as_ref().map(|t| t.get_ref().clone());
            if let Some(t) = &i.timestamp
                && !columns.iter().any(|(c, ty)| c == t.get_ref() && *ty == FieldType::Timestamp)
            {
                self.error(t.span(), format!("timestamp: `{}` must be a column of type timestamp", t.get_ref()));
            }
            imports.push(ImportDef {
                name: name.clone(),
                event: i.event.get_ref().clone(),
                matches: matches.clone(),
                key,
                columns,
                timestamp,
            });
        }
        imports
    }

    fn identity(&mut self, raw: &RawIdentity) -> IdentitySettings {
        let mut settings = IdentitySettings::default();
        if let Some(n) = &raw.min_length {
            match *n.get_ref() {
                1..=256 => settings.min_length = *n.get_ref() as usize,
                _ => self.error(n.span(), "identity.min_length must be between 1 and 256"),
            }
        }
        if let Some(blocked) = &raw.blocked {
            settings.blocked = blocked.iter().map(|s| s.trim().to_lowercase()).collect();
        }
        if let Some(n) = &raw.max_ids_per_profile {
            match *n.get_ref() {
                2..=100_000 => settings.max_ids_per_profile = *n.get_ref() as usize,
                _ => self.error(n.span(), "identity.max_ids_per_profile must be between 2 and 100000"),
            }
        }
        settings
    }

    fn action(&mut self, a: &RawAction, declared: &[Spanned<RawAudience>]) -> Option<ActionDef> {
        let name = a.name.get_ref();
        let trigger = match Trigger::ALL.into_iter().find(|t| t.name() == a.trigger.get_ref()) {
            Some(t) => Some(t),
            None => {
                let names: Vec<&str> = Trigger::ALL.iter().map(|t| t.name()).collect();
                self.error(
                    a.trigger.span(),
                    format!("unknown trigger `{}`: expected one of {}", a.trigger.get_ref(), names.join(", ")),
                );
                None
            }
        };
        let audience = match (&a.audience, trigger) {
            (Some(aud), Some(Trigger::Event)) => {
                self.error(
                    aud.span(),
                    "an event feed (trigger = \"event\") has no audience; filter with `event` and `if`",
                );
                None
            }
            (Some(aud), _) => {
                if !declared.iter().any(|x| x.get_ref().name.get_ref() == aud.get_ref()) {
                    self.error(aud.span(), format!("unknown audience `{}`", aud.get_ref()));
                }
                Some(aud.get_ref().clone())
            }
            (None, Some(Trigger::Event | Trigger::Deleted)) => Some(String::new()),
            (None, _) => {
                self.error(a.name.span(), format!("action `{name}` needs `audience`"));
                None
            }
        };
        let is_feed = trigger == Some(Trigger::Event);
        if !is_feed && let Some(e) = &a.event {
            self.error(e.span(), "`event` filters event feeds only (trigger = \"event\")");
        }
        let condition = match &a.condition {
            Some(c) if !is_feed => {
                self.error(c.span(), "`if` filters event feeds only (trigger = \"event\")");
                None
            }
            Some(c) => Some(self.condition(c, RuleUse::WithEvent)?),
            None => None,
        };
        let mut params = Vec::new();
        for (key, src) in &a.params {
            match self.reference(src.get_ref()) {
                Ok(source) => params.push((key.clone(), source)),
                Err(msg) => self.error(src.span(), format!("params.{key}: {msg}")),
            }
        }
        let delivery = self.delivery_policy(a);
        Some(ActionDef {
            name: name.clone(),
            audience: audience?,
            trigger: trigger?,
            event: a.event.as_ref().map(|e| e.get_ref().clone()),
            condition,
            connector: a.connector.get_ref().clone(),
            connector_span: a.connector.span(),
            settings: a.settings.clone(),
            params,
            delivery,
        })
    }

    /// A parameter reference: an attribute name, `profile_id`, or `event.PATH`.
    fn reference(&self, s: &str) -> Result<Source, String> {
        if let Some(path) = s.strip_prefix("event.") {
            return parse_event_path(path)
                .map(Source::Event)
                .ok_or_else(|| format!("`{s}` is not a field path like `event.order.total`"));
        }
        if s == "profile_id" || self.lookup(s).is_some() {
            Ok(Source::Attribute(s.to_string()))
        } else {
            Err(format!("unknown attribute `{s}` (use an attribute name, `profile_id` or `event.FIELD`)"))
        }
    }

    fn duration(&mut self, raw: &Option<Spanned<String>>) -> Option<i64> {
        let raw = raw.as_ref()?;
        match parse_duration(raw.get_ref()) {
            Ok(ms) => Some(ms),
            Err(msg) => {
                self.error(raw.span(), msg);
                None
            }
        }
    }

    fn delivery_policy(&mut self, a: &RawAction) -> DeliveryPolicy {
        let mut policy = DeliveryPolicy {
            cooldown_ms: self.duration(&a.cooldown),
            delay_ms: self.duration(&a.delay),
            ..DeliveryPolicy::default()
        };
        if let Some(ms) = self.duration(&a.retry_initial) {
            policy.retry_initial_ms = ms;
        }
        if let Some(ms) = self.duration(&a.retry_max) {
            policy.retry_max_ms = ms;
        }
        if policy.retry_max_ms < policy.retry_initial_ms
            && let Some(span) = a.retry_max.as_ref().map(|r| r.span())
        {
            self.error(span, "retry_max must not be shorter than retry_initial");
        }
        if let Some(c) = &a.concurrency {
            match *c.get_ref() {
                1..=256 => policy.concurrency = *c.get_ref() as usize,
                _ => self.error(c.span(), "concurrency must be between 1 and 256"),
            }
        }
        if let Some(m) = &a.max_attempts {
            match *m.get_ref() {
                1..=1000 => policy.max_attempts = *m.get_ref() as u32,
                _ => self.error(m.span(), "max_attempts must be between 1 and 1000"),
            }
        }
        if let Some(b) = &a.batch {
            let raw = b.get_ref();
            let max_age_ms = match raw.max_age.as_deref().map(parse_duration) {
                None => Ok(1_000),
                Some(r) => r,
            };
            match (raw.max_items.unwrap_or(100), max_age_ms, raw.max_bytes.unwrap_or(1_000_000)) {
                (0, _, _) | (_, _, 0) => self.error(b.span(), "batch.max_items and batch.max_bytes must be positive"),
                (_, Err(msg), _) => self.error(b.span(), format!("batch.max_age: {msg}")),
                (items, Ok(age), bytes) => {
                    policy.batch =
                        Some(BatchPolicy { max_items: items as usize, max_age_ms: age, max_bytes: bytes as usize })
                }
            }
        }
        policy
    }

    fn enrichment(&mut self, raw: &Spanned<RawEnrichment>) -> Option<Enrichment> {
        let e = raw.get_ref();
        let name = e.attribute.get_ref();
        let Some(ty) = self.lookup(name) else {
            self.error(e.attribute.span(), format!("unknown attribute `{name}`"));
            return None;
        };
        if preloaded_type(name).is_some() {
            self.error(e.attribute.span(), format!("attribute `{name}` is preloaded and maintained by the engine"));
            return None;
        }
        if self.scope(name) == Some(Scope::Event) {
            self.error(
                e.attribute.span(),
                format!("event attribute `{name}` is read from each event; it cannot be enriched"),
            );
            return None;
        }
        let when = match e.when.as_ref().map(|w| w.get_ref().as_str()) {
            None | Some("any") => When::AnyEvent,
            Some("new_visitor") => When::NewVisitor,
            Some("new_visit") => When::NewVisit,
            Some("visit_ended") => When::VisitEnded,
            Some(other) => match other.strip_prefix("event:") {
                Some(ev) if !ev.is_empty() => When::Event(ev.to_string()),
                _ => {
                    let span = e.when.as_ref().map_or(raw.span(), |w| w.span());
                    self.error(
                        span,
                        format!(
                            "unknown trigger `{other}`: expected any, new_visitor, new_visit, visit_ended or event:NAME"
                        ),
                    );
                    return None;
                }
            },
        };
        let condition = match &e.condition {
            Some(c) => Some(self.condition(c, RuleUse::WithEvent)?),
            None => None,
        };
        let op = e.op.get_ref().as_str();
        let element = ty.element().unwrap_or(ty);
        use AttrType as T;
        let (operation, allowed): (Operation, &[&str]) = match (ty, op) {
            (T::Number, "increment" | "decrement") => {
                let by = self.source_for(e, T::Number)?.unwrap_or(Source::Const(Value::Number(1.0)));
                let operation = if op == "increment" { Operation::Increment(by) } else { Operation::Decrement(by) };
                (operation, &["value", "event", "from"])
            }
            (T::Number, "min" | "max") => {
                let s = self.required_source(e, T::Number)?;
                (if op == "min" { Operation::Min(s) } else { Operation::Max(s) }, &["value", "event", "from"])
            }
            (T::Number, "rolling_sum" | "rolling_avg") => {
                let source = self.required_source(e, T::Number)?;
                let window = match &e.window {
                    Some(w) if (1..=MAX_ROLLING_WINDOW as u64).contains(w.get_ref()) => *w.get_ref() as usize,
                    Some(w) => {
                        self.error(w.span(), format!("window must be between 1 and {MAX_ROLLING_WINDOW} values"));
                        return None;
                    }
                    None => {
                        self.error(e.op.span(), format!("`{op}` needs `window` (how many recent values)"));
                        return None;
                    }
                };
                let operation = if op == "rolling_sum" {
                    Operation::RollingSum { source, window }
                } else {
                    Operation::RollingAvg { source, window }
                };
                (operation, &["value", "event", "from", "window"])
            }
            (T::Number | T::String | T::VisitorId | T::Boolean | T::Date, "set")
            | (T::ArrayOfStrings | T::ArrayOfNumbers | T::ArrayOfBooleans | T::SetOfStrings, "set") => {
                (Operation::Set(self.required_source(e, ty)?), &["value", "event", "from"])
            }
            (T::String, "capture_first") => {
                (Operation::CaptureFirst(self.required_source(e, ty)?), &["value", "event", "from"])
            }
            (T::String, "capture_last") => (Operation::Set(self.required_source(e, ty)?), &["value", "event", "from"]),
            (T::String, "capture_most_frequent") => {
                (Operation::CaptureMostFrequent(self.required_source(e, ty)?), &["value", "event", "from"])
            }
            (T::String, "lowercase") => (Operation::Lowercase(self.source_for(e, ty)?), &["value", "event", "from"]),
            (T::String, "uppercase") => (Operation::Uppercase(self.source_for(e, ty)?), &["value", "event", "from"]),
            (T::Boolean, "toggle") => (Operation::Toggle, &[]),
            (T::Badge, "assign") => (Operation::AssignBadge, &[]),
            (T::Badge, "remove") => (Operation::RemoveBadge, &[]),
            (T::SetOfStrings, "add") => {
                (Operation::AddToSet(self.required_source(e, element)?), &["value", "event", "from"])
            }
            (T::SetOfStrings, "remove") => {
                (Operation::RemoveFromSet(self.required_source(e, element)?), &["value", "event", "from"])
            }
            (T::SetOfStrings, "union" | "difference") => {
                let from = self.source_attribute(e, &[T::SetOfStrings, T::ArrayOfStrings])?;
                (if op == "union" { Operation::Union(from) } else { Operation::Difference(from) }, &["from"])
            }
            (T::SetOfStrings, "top_keys") => {
                let tally = self.source_attribute(e, &[T::Tally])?;
                let n = match &e.n {
                    Some(n) if (1..=1000).contains(n.get_ref()) => *n.get_ref() as usize,
                    Some(n) => {
                        self.error(n.span(), "n must be between 1 and 1000");
                        return None;
                    }
                    None => {
                        self.error(e.op.span(), "`top_keys` needs `n` (how many keys)");
                        return None;
                    }
                };
                (Operation::TopKeys { tally, n }, &["from", "n"])
            }
            (T::ArrayOfStrings | T::ArrayOfNumbers | T::ArrayOfBooleans, "append") => {
                (Operation::Append(self.required_source(e, element)?), &["value", "event", "from"])
            }
            (T::Tally, "increment" | "set_key") => {
                let key = self.key(e)?;
                let operation = if op == "increment" {
                    let by = self.source_for(e, T::Number)?.unwrap_or(Source::Const(Value::Number(1.0)));
                    Operation::TallyIncrement { key, by }
                } else {
                    Operation::TallySet { key, to: self.required_source(e, T::Number)? }
                };
                (operation, &["key", "value", "event", "from"])
            }
            (T::Tally, "remove_key") => (Operation::TallyRemove { key: self.key(e)? }, &["key"]),
            (T::Timeline, "capture") => (Operation::CaptureEntry { fields: self.fields(e) }, &["fields"]),
            (T::Funnel, "advance") => {
                let steps = self.attributes.get(name).map(|a| a.steps.clone()).unwrap_or_default();
                let Some(step) = &e.step else {
                    self.error(e.op.span(), "`advance` needs `step`");
                    return None;
                };
                let Some(index) = steps.iter().position(|s| s.name == *step.get_ref()) else {
                    let names: Vec<&str> = steps.iter().map(|s| s.name.as_str()).collect();
                    self.error(
                        step.span(),
                        format!("funnel `{name}` has no step `{}` (steps: {})", step.get_ref(), names.join(", ")),
                    );
                    return None;
                };
                (Operation::Advance { step: index, fields: self.fields(e) }, &["step", "fields"])
            }
            (T::Funnel, "reset") => (Operation::Reset, &[]),
            (t, "clear") if t != T::Badge => (Operation::Clear, &[]),
            _ => {
                self.error(
                    e.op.span(),
                    format!(
                        "operation `{op}` does not apply to {} attribute `{name}` (use: {})",
                        ty.name(),
                        operations_for(ty)
                    ),
                );
                return None;
            }
        };
        let present = [
            ("value", e.value.as_ref().map(|v| v.span())),
            ("event", e.event.as_ref().map(|v| v.span())),
            ("from", e.from.as_ref().map(|v| v.span())),
            ("key", e.key.as_ref().map(|v| v.span())),
            ("window", e.window.as_ref().map(|v| v.span())),
            ("n", e.n.as_ref().map(|v| v.span())),
            ("step", e.step.as_ref().map(|v| v.span())),
            ("fields", e.fields.as_ref().and_then(|f| f.values().next()).map(|v| v.span())),
        ];
        for (field, span) in present {
            if let Some(span) = span
                && !allowed.contains(&field)
            {
                self.error(span, format!("`{field}` does not apply to operation `{op}`"));
            }
        }
        Some(Enrichment { attribute: name.clone(), operation, when, condition })
    }

    fn required_source(&mut self, e: &RawEnrichment, ty: AttrType) -> Option<Source> {
        let source = self.source_for(e, ty)?;
        if source.is_none() {
            self.error(e.op.span(), format!("`{}` needs `value`, `event` or `from`", e.op.get_ref()));
        }
        source
    }

    /// The value source of an enrichment (`value`, `event` or `from`), checked against `ty`.
    /// `None` on error; `Some(None)` when none is given.
    fn source_for(&mut self, e: &RawEnrichment, ty: AttrType) -> Option<Option<Source>> {
        let given =
            [e.value.as_ref().map(|v| v.span()), e.event.as_ref().map(|v| v.span()), e.from.as_ref().map(|v| v.span())];
        if given.iter().flatten().count() > 1 {
            self.error(
                given.iter().flatten().nth(1).cloned().unwrap_or_default(),
                "give one of `value`, `event` or `from`",
            );
            return None;
        }
        if let Some(path) = &e.event {
            return match parse_event_path(path.get_ref()) {
                Some(p) => Some(Some(Source::Event(p))),
                None => {
                    self.error(path.span(), format!("`{}` is not a field path like `order.total`", path.get_ref()));
                    None
                }
            };
        }
        if let Some(from) = &e.from {
            let name = from.get_ref();
            let Some(from_ty) = self.lookup(name) else {
                self.error(from.span(), format!("unknown attribute `{name}`"));
                return None;
            };
            let compatible = from_ty == ty
                || matches!(
                    (from_ty, ty),
                    (AttrType::String | AttrType::VisitorId, AttrType::String | AttrType::VisitorId)
                )
                || ty.element() == Some(from_ty);
            if !compatible {
                self.error(from.span(), format!("attribute `{name}` is {}, expected {}", from_ty.name(), ty.name()));
                return None;
            }
            return Some(Some(Source::Attribute(name.clone())));
        }
        let Some(v) = &e.value else { return Some(None) };
        if ty == AttrType::Date && v.get_ref().as_str() == Some("now") {
            return Some(Some(Source::Now));
        }
        let literal_ty = ty.element().filter(|_| !v.get_ref().is_array()).unwrap_or(ty);
        match literal(v.get_ref(), literal_ty) {
            Ok(val) => Some(Some(Source::Const(val))),
            Err(msg) => {
                self.error(v.span(), msg);
                None
            }
        }
    }

    fn source_attribute(&mut self, e: &RawEnrichment, types: &[AttrType]) -> Option<String> {
        let Some(from) = &e.from else {
            self.error(e.op.span(), format!("`{}` needs `from` (an attribute)", e.op.get_ref()));
            return None;
        };
        match self.lookup(from.get_ref()) {
            Some(t) if types.contains(&t) => Some(from.get_ref().clone()),
            Some(t) => {
                let names: Vec<&str> = types.iter().map(|t| t.name()).collect();
                self.error(
                    from.span(),
                    format!("attribute `{}` is {}, expected {}", from.get_ref(), t.name(), names.join(" or ")),
                );
                None
            }
            None => {
                self.error(from.span(), format!("unknown attribute `{}`", from.get_ref()));
                None
            }
        }
    }

    /// A tally key: a constant, or `event.PATH`.
    fn key(&mut self, e: &RawEnrichment) -> Option<Source> {
        let Some(key) = &e.key else {
            self.error(e.op.span(), format!("`{}` needs `key` (a constant or `event.FIELD`)", e.op.get_ref()));
            return None;
        };
        match key.get_ref().strip_prefix("event.") {
            Some(path) => match parse_event_path(path) {
                Some(p) => Some(Source::Event(p)),
                None => {
                    self.error(key.span(), format!("`{}` is not a field path like `event.category`", key.get_ref()));
                    None
                }
            },
            None => Some(Source::Const(Value::String(key.get_ref().clone()))),
        }
    }

    /// Captured values of a timeline entry or funnel step: name → attribute or `event.PATH`.
    fn fields(&mut self, e: &RawEnrichment) -> Vec<(String, Source)> {
        let mut out = Vec::new();
        for (key, src) in e.fields.iter().flatten() {
            match self.reference(src.get_ref()) {
                Ok(source) => out.push((key.clone(), source)),
                Err(msg) => self.error(src.span(), format!("fields.{key}: {msg}")),
            }
        }
        out
    }

    fn condition(&mut self, raw: &Spanned<RawCondition>, used: RuleUse) -> Option<Condition> {
        let c = raw.get_ref();
        let forms = [c.all.is_some(), c.any.is_some(), c.not.is_some(), c.attribute.is_some()];
        if forms.iter().filter(|f| **f).count() != 1 {
            self.error(
                raw.span(),
                "a condition is exactly one of: `all = [...]`, `any = [...]`, `not = {...}`, or `attribute` with `op`",
            );
            return None;
        }
        let group = |v: &mut Self, items: &[Spanned<RawCondition>]| {
            let parts: Vec<_> = items.iter().map(|i| v.condition(i, used)).collect();
            parts.into_iter().collect::<Option<Vec<_>>>()
        };
        if let Some(items) = &c.all {
            return Some(Condition::All(group(self, items)?));
        }
        if let Some(items) = &c.any {
            return Some(Condition::Any(group(self, items)?));
        }
        if let Some(inner) = &c.not {
            return Some(Condition::Not(Box::new(self.condition(inner, used)?)));
        }
        let attr = c.attribute.as_ref().expect("checked above");
        let Some(op_raw) = &c.op else {
            self.error(attr.span(), "condition needs `op`");
            return None;
        };
        let Some(op) = CmpOp::parse(op_raw.get_ref()) else {
            self.error(
                op_raw.span(),
                format!(
                    "unknown operator `{}`: expected one of {}",
                    op_raw.get_ref(),
                    CmpOp::ALL.iter().map(|o| o.symbol()).collect::<Vec<_>>().join(", ")
                ),
            );
            return None;
        };
        let (operand, ty) = self.operand(attr, c.key.as_ref(), used)?;
        if let Some(ty) = ty
            && !op.applies_to(ty)
        {
            let applicable: Vec<&str> = CmpOp::ALL.iter().filter(|o| o.applies_to(ty)).map(|o| o.symbol()).collect();
            self.error(
                op_raw.span(),
                format!(
                    "operator `{}` does not apply to {} `{}` (use: {})",
                    op.symbol(),
                    ty.name(),
                    operand.label(),
                    applicable.join(", ")
                ),
            );
            return None;
        }
        let expected = match (op.takes_value(), &c.value) {
            (false, None) => Expected::None,
            (false, Some(v)) => {
                self.error(v.span(), format!("operator `{}` takes no value", op.symbol()));
                return None;
            }
            (true, None) => {
                self.error(op_raw.span(), format!("operator `{}` needs a `value`", op.symbol()));
                return None;
            }
            (true, Some(v)) => match expected_value(op, ty, v.get_ref(), c.ignore_case) {
                Ok(x) => x,
                Err(msg) => {
                    self.error(v.span(), msg);
                    return None;
                }
            },
        };
        Some(Condition::Leaf { operand, op, expected, ignore_case: c.ignore_case })
    }

    /// What a leaf reads, and its type (`None` for untyped event fields).
    fn operand(
        &mut self,
        attr: &Spanned<String>,
        key: Option<&Spanned<String>>,
        used: RuleUse,
    ) -> Option<(Operand, Option<AttrType>)> {
        let name = attr.get_ref();
        if let Some(path) = name.strip_prefix("event.") {
            if used == RuleUse::Audience {
                self.error(attr.span(), "audiences read profile attributes only, not `event.` fields");
                return None;
            }
            let Some(path) = parse_event_path(path) else {
                self.error(attr.span(), format!("`{name}` is not a field path like `event.order.total`"));
                return None;
            };
            return Some((Operand::Event(path), None));
        }
        let (base, derived) = match name.split_once('.') {
            Some((base, prop)) => match Derived::ALL.into_iter().find(|d| d.name() == prop) {
                Some(d) => (base, Some(d)),
                None => {
                    let names: Vec<&str> = Derived::ALL.iter().map(|d| d.name()).collect();
                    self.error(attr.span(), format!("unknown property `{prop}` (properties: {})", names.join(", ")));
                    return None;
                }
            },
            None => (name.as_str(), None),
        };
        let Some(ty) = self.lookup(base) else {
            self.error(attr.span(), format!("unknown attribute `{base}`"));
            return None;
        };
        if used == RuleUse::Audience && self.scope(base) == Some(Scope::Event) {
            self.error(attr.span(), format!("audiences read profile attributes only; `{base}` is an event attribute"));
            return None;
        }
        match (derived, key) {
            (Some(_), Some(k)) => {
                self.error(k.span(), "give either `key` or a `.property`, not both");
                None
            }
            (Some(d), None) => match d.ty(ty) {
                Some(t) => Some((Operand::Derived(base.to_string(), d), Some(t))),
                None => {
                    self.error(attr.span(), format!("{} attribute `{base}` has no `{}`", ty.name(), d.name()));
                    None
                }
            },
            (None, Some(k)) if ty == AttrType::Tally => {
                Some((Operand::TallyKey(base.to_string(), k.get_ref().clone()), Some(AttrType::Number)))
            }
            (None, Some(k)) => {
                self.error(k.span(), format!("`key` applies to tallies; `{base}` is {}", ty.name()));
                None
            }
            (None, None) => Some((Operand::Attribute(base.to_string()), Some(ty))),
        }
    }
}

/// The operations an attribute type accepts, for error messages.
fn operations_for(ty: AttrType) -> &'static str {
    match ty {
        AttrType::Number => "increment, decrement, set, min, max, rolling_sum, rolling_avg, clear",
        AttrType::String => "set, capture_first, capture_last, capture_most_frequent, lowercase, uppercase, clear",
        AttrType::VisitorId | AttrType::Date => "set, clear",
        AttrType::Boolean => "set, toggle, clear",
        AttrType::Badge => "assign, remove",
        AttrType::SetOfStrings => "add, remove, union, difference, top_keys, set, clear",
        AttrType::ArrayOfStrings | AttrType::ArrayOfNumbers | AttrType::ArrayOfBooleans => "append, set, clear",
        AttrType::Tally => "increment, set_key, remove_key, clear",
        AttrType::Timeline => "capture, clear",
        AttrType::Funnel => "advance, reset, clear",
    }
}

/// The right-hand side of a comparison, read for operator `op` on a value of type `ty`.
fn expected_value(op: CmpOp, ty: Option<AttrType>, v: &toml::Value, ignore_case: bool) -> Result<Expected, String> {
    let typed = |v: &toml::Value, t: Option<AttrType>| match t {
        Some(t) => literal(v, t),
        None => untyped_literal(v),
    };
    match op {
        CmpOp::Regex => {
            let pattern = v.as_str().ok_or_else(|| format!("expected a regular expression, found {}", v.type_str()))?;
            regex::RegexBuilder::new(pattern)
                .case_insensitive(ignore_case)
                .size_limit(1 << 20)
                .build()
                .map(Expected::Regex)
                .map_err(|e| format!("invalid regular expression: {e}"))
        }
        CmpOp::WithinLast | CmpOp::NotWithinLast => {
            let s = v.as_str().ok_or_else(|| format!("expected a duration like \"30d\", found {}", v.type_str()))?;
            parse_duration(s).map(Expected::Duration)
        }
        CmpOp::Between => match v.as_array().map(Vec::as_slice) {
            Some([lo, hi]) => {
                let (lo, hi) = (typed(lo, ty)?, typed(hi, ty)?);
                Ok(Expected::Range(lo, hi))
            }
            _ => Err("`between` needs `value = [low, high]`".into()),
        },
        CmpOp::HasKey => v
            .as_str()
            .map(|s| Expected::Value(Value::String(s.into())))
            .ok_or_else(|| format!("expected a key (string), found {}", v.type_str())),
        _ => {
            let t = ty.map(|t| {
                t.element().unwrap_or(match t {
                    AttrType::VisitorId => AttrType::String,
                    other => other,
                })
            });
            typed(v, t).map(Expected::Value)
        }
    }
}

/// Parses a duration like `500ms`, `30s`, `15m`, `2h` or `7d` into milliseconds.
pub fn parse_duration(s: &str) -> Result<i64, String> {
    let not_one = || format!("`{s}` is not a duration like 30s, 15m, 2h or 7d");
    let d = humantime::parse_duration(s.trim()).map_err(|_| not_one())?;
    match i64::try_from(d.as_millis()) {
        Ok(ms) if ms > 0 => Ok(ms),
        _ => Err(format!("`{s}` must be positive and not absurdly long")),
    }
}

fn is_identifier(s: &str) -> bool {
    !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

fn parse_event_path(s: &str) -> Option<Vec<String>> {
    let parts: Vec<String> = s.split('.').map(str::to_string).collect();
    parts.iter().all(|p| !p.is_empty()).then_some(parts)
}

/// A constant of the given type from its TOML form.
fn literal(v: &toml::Value, ty: AttrType) -> Result<Value, String> {
    match (ty, v) {
        (AttrType::String, toml::Value::String(s)) => Ok(Value::String(s.clone())),
        (AttrType::Number, toml::Value::Integer(i)) => Ok(Value::Number(*i as f64)),
        (AttrType::Number, toml::Value::Float(f)) => Ok(Value::Number(*f)),
        (AttrType::Boolean | AttrType::Badge, toml::Value::Boolean(b)) => Ok(Value::Boolean(*b)),
        (AttrType::Date, toml::Value::String(s)) => crate::time::parse_rfc3339(s)
            .map(Value::Date)
            .ok_or_else(|| format!("`{s}` is not an RFC 3339 date like 2024-05-01T00:00:00Z")),
        (AttrType::Date, toml::Value::Datetime(d)) => crate::time::parse_rfc3339(&d.to_string())
            .map(Value::Date)
            .ok_or_else(|| format!("`{d}` needs a date, a time and an offset")),
        (AttrType::VisitorId, toml::Value::String(s)) => Ok(Value::String(s.clone())),
        (
            AttrType::SetOfStrings | AttrType::ArrayOfStrings | AttrType::ArrayOfNumbers | AttrType::ArrayOfBooleans,
            toml::Value::Array(items),
        ) => {
            let element = ty.element().expect("collections have elements");
            let values = items.iter().map(|i| literal(i, element)).collect::<Result<Vec<_>, _>>()?;
            Ok(Value::collection(ty, values))
        }
        (ty, other) => Err(format!("expected a {} value, found {}", ty.name(), other.type_str())),
    }
}

fn untyped_literal(v: &toml::Value) -> Result<Value, String> {
    match v {
        toml::Value::String(s) => Ok(Value::String(s.clone())),
        toml::Value::Integer(i) => Ok(Value::Number(*i as f64)),
        toml::Value::Float(f) => Ok(Value::Number(*f)),
        toml::Value::Boolean(b) => Ok(Value::Boolean(*b)),
        other => Err(format!("expected a string, number or boolean, found {}", other.type_str())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[[attribute]]
name = "spend"
scope = "visitor"
type = "number"

[[attribute]]
name = "vip"
scope = "visitor"
type = "badge"

[[enrichment]]
attribute = "spend"
op = "increment"
event = "total"
when = "event:purchase"

[[enrichment]]
attribute = "vip"
op = "assign"
if = { attribute = "spend", op = ">=", value = 100 }

[[audience]]
name = "big"
rule = { all = [{ attribute = "spend", op = ">", value = 50 }, { attribute = "vip", op = "is_assigned" }] }

[[action]]
name = "hook"
audience = "big"
trigger = "joined"
connector = "webhook"
params = { spend = "spend", id = "profile_id" }
"#;

    #[test]
    fn parses_a_complete_file() {
        let m = parse(GOOD).unwrap();
        assert_eq!(m.attributes.len(), 2);
        assert_eq!(m.enrichments[0].when, When::Event("purchase".into()));
        assert_eq!(m.audiences[0].name, "big");
        assert_eq!(m.actions[0].params.len(), 2);
        assert_eq!(m.visit_timeout_ms, 30 * 60_000);
    }

    #[test]
    fn reports_every_error_with_its_position() {
        let bad = r#"
[[attribute]]
name = "spend"
scope = "forever"
type = "number"

[[attribute]]
name = "tier"
scope = "visitor"
type = "colour"

[[audience]]
name = "big"
rule = { attribute = "spnd", op = ">", value = 50 }

[[action]]
name = "hook"
audience = "huge"
trigger = "joined"
connector = "webhook"
"#;
        let errs = parse(bad).unwrap_err().0;
        let rendered: Vec<String> = errs.iter().map(|d| d.to_string()).collect();
        assert_eq!(
            rendered,
            vec![
                "4:9: unknown scope `forever`: expected event, visit, visitor or omnichannel",
                "10:8: unknown type `colour`: expected one of string, number, boolean, date, badge, set_of_strings, array_of_strings, array_of_numbers, array_of_booleans, tally, timeline, funnel, visitor_id",
                "14:22: unknown attribute `spnd`",
                "18:12: unknown audience `huge`",
            ]
        );
    }

    #[test]
    fn an_enricher_reads_only_declared_stored_attributes() {
        let src = format!(
            "{GOOD}\n[[attribute]]\nname = \"total\"\nscope = \"event\"\ntype = \"number\"\nfield = \"total\"\n\n[[enricher]]\nplugin = \"tier\"\nreads = [\"spend\", \"event_count\"]\n"
        );
        let m = parse(&src).unwrap();
        assert_eq!(m.enrichers[0].reads, Some(vec!["spend".to_string(), "event_count".to_string()]));
        let bad = src.replace("reads = [\"spend\", \"event_count\"]", "reads = [\"spnd\", \"total\"]");
        let rendered: Vec<String> = parse(&bad).unwrap_err().0.iter().map(|d| d.to_string()).collect();
        let line = bad.lines().position(|l| l.starts_with("reads")).unwrap() + 1;
        assert_eq!(
            rendered,
            vec![
                format!("{line}:10: enricher reads `spnd`, which is not a declared attribute"),
                format!("{line}:18: enricher reads `total`, an event attribute; it sees the event itself"),
            ]
        );
    }

    #[test]
    fn delivery_policies() {
        let src = format!(
            "{GOOD}cooldown = \"1h\"\ndelay = \"2d\"\nbatch = {{ max_items = 50, max_age = \"5s\" }}\nconcurrency = 2\n"
        );
        let m = parse(&src).unwrap();
        let p = &m.actions[0].delivery;
        assert_eq!((p.cooldown_ms, p.delay_ms, p.concurrency), (Some(3_600_000), Some(172_800_000), 2));
        assert_eq!(p.batch, Some(BatchPolicy { max_items: 50, max_age_ms: 5_000, max_bytes: 1_000_000 }));
        let errs = parse(&format!("{GOOD}cooldown = \"soon\"\n")).unwrap_err().0;
        assert_eq!(errs[0].message, "`soon` is not a duration like 30s, 15m, 2h or 7d");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Ok(250));
        assert_eq!(parse_duration("15m"), Ok(900_000));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("5 parsecs").is_err());
        assert_eq!(parse_duration("1h 30m"), Ok(5_400_000));
    }

    #[test]
    fn syntax_errors_carry_a_position() {
        let errs = parse("[[attribute]]\nname = \"x\"\nscope = visitor\n").unwrap_err().0;
        assert_eq!(errs.len(), 1);
        assert_eq!(errs[0].line, 3, "{:?}", errs[0]);
    }

    #[test]
    fn unknown_fields_are_refused() {
        let errs =
            parse("[[attribute]]\nname = \"x\"\nscope = \"visit\"\ntype = \"string\"\ncolour = 1\n").unwrap_err().0;
        assert!(errs[0].message.contains("colour"), "{:?}", errs[0]);
        assert_eq!(errs[0].line, 5);
    }

    #[test]
    fn operators_must_fit_the_type() {
        let src = "[[attribute]]\nname = \"n\"\nscope = \"visit\"\ntype = \"number\"\n[[audience]]\nname = \"a\"\nrule = { attribute = \"n\", op = \"contains\", value = \"x\" }\n";
        let errs = parse(src).unwrap_err().0;
        assert!(errs[0].message.contains("does not apply"), "{:?}", errs);
    }

    #[test]
    fn value_types_are_checked() {
        let src = "[[attribute]]\nname = \"n\"\nscope = \"visit\"\ntype = \"number\"\n[[audience]]\nname = \"a\"\nrule = { attribute = \"n\", op = \">\", value = \"ten\" }\n";
        let errs = parse(src).unwrap_err().0;
        assert_eq!(errs[0].message, "expected a number value, found string");
    }

    #[test]
    fn operating_sections_are_checked_with_positions() {
        let src = r#"[[attribute]]
name = "email"
scope = "visitor"
type = "visitor_id"

[[attribute]]
name = "spend"
scope = "visitor"
type = "number"

[[source]]
name = "web"
api_key = "short"

[[event_spec]]
event = "purchase"
on_violation = "shrug"
fields = { total = "numbr", "order..id" = "string" }

[retention]
inactive_after = "forever"

[[import]]
name = "store"
event = "store_purchase"
match = "spend"
columns = { amount = "number" }

[[import]]
name = "pos"
event = "pos"
match = "email"
columns = { at = "string" }
timestamp = "at"
"#;
        let errs: Vec<String> = parse(src).unwrap_err().0.iter().map(ToString::to_string).collect();
        assert_eq!(
            errs,
            [
                "13:11: source `web`: api_key must be at least 16 characters",
                "17:16: on_violation `shrug`: expected reject or warn",
                "18:43: fields.order..id: not a field path like `order.total`",
                "18:20: fields.total: unknown type `numbr`: expected string, number, integer, boolean, array, object, timestamp (with `?` when optional)",
                "21:18: `forever` is not a duration like 30s, 15m, 2h or 7d",
                "26:9: match: `spend` is not a visitor_id attribute",
                "34:13: timestamp: `at` must be a column of type timestamp",
            ]
        );
        let good = r#"[[attribute]]
name = "email"
scope = "visitor"
type = "visitor_id"

[[source]]
name = "web"
api_key = "0123456789abcdef"

[[event_spec]]
event = "purchase"
on_violation = "warn"
allow_other_fields = false
fields = { "order.total" = "number", coupon = "string?" }

[retention]
inactive_after = "400d"
events = "30d"
events_per_profile = 200

[[import]]
name = "pos"
event = "pos"
match = "email"
key = "mail"
columns = { at = "timestamp" }
timestamp = "at"

[[action]]
name = "forget"
trigger = "deleted"
connector = "webhook"
"#;
        let model = parse(good).unwrap();
        assert_eq!(model.sources, [SourceDef { name: "web".into(), api_key: "0123456789abcdef".into() }]);
        let spec = model.event_spec("purchase").unwrap();
        assert_eq!((spec.on_violation, spec.allow_other_fields), (OnViolation::Warn, false));
        assert_eq!(
            spec.fields[1],
            FieldSpec { path: vec!["order".into(), "total".into()], ty: FieldType::Number, required: true }
        );
        assert!(!spec.fields[0].required);
        assert_eq!(model.retention, Some(Retention { inactive_after_ms: 400 * 86_400_000, check_every_ms: 3_600_000 }));
        assert_eq!(
            model.history,
            History { events_ms: 30 * 86_400_000, events_per_profile: 200, actions_kept_ms: 7 * 86_400_000 }
        );
        let import = model.import("pos").unwrap();
        assert_eq!((import.key.as_str(), import.timestamp.as_deref()), ("mail", Some("at")));
        assert_eq!((model.actions[0].trigger, model.actions[0].audience.as_str()), (Trigger::Deleted, ""));
    }
}

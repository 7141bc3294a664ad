//! The configuration file: TOML in, a validated [`Model`] out, or every error found with its position.

use crate::condition::{CmpOp, Condition, Operand};
use crate::value::{AttrType, Scope, Value};
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
}

fn default_plugin_failure_limit() -> u64 {
    10
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
}

/// When an enrichment runs.
#[derive(Debug, Clone, PartialEq)]
pub enum When {
    AnyEvent,
    NewVisitor,
    NewVisit,
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
    Increment(Source),
    Decrement(Source),
    Set(Source),
    AddToSet(Source),
    RemoveFromSet(Source),
    AssignBadge,
    RemoveBadge,
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
    pub span: Range<usize>,
}

#[derive(Debug, Clone)]
pub struct Audience {
    pub name: String,
    pub rule: Condition,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    Joined,
    Left,
}

impl Trigger {
    pub fn name(self) -> &'static str {
        match self {
            Trigger::Joined => "joined",
            Trigger::Left => "left",
        }
    }
}

#[derive(Debug, Clone)]
pub struct ActionDef {
    pub name: String,
    pub audience: String,
    pub trigger: Trigger,
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
    pub visit_timeout_ms: i64,
    pub attributes: Vec<AttributeDef>,
    attribute_index: HashMap<String, usize>,
    pub enrichments: Vec<Enrichment>,
    pub enrichers: Vec<EnricherRef>,
    pub audiences: Vec<Audience>,
    pub actions: Vec<ActionDef>,
    /// Per-plugin configuration values, handed to the plugin through its `config` interface.
    pub plugin_config: BTreeMap<String, BTreeMap<String, String>>,
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
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawVisits {
    timeout_minutes: Option<Spanned<u64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAttribute {
    name: Spanned<String>,
    scope: Spanned<String>,
    #[serde(rename = "type")]
    ty: Spanned<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEnrichment {
    attribute: Spanned<String>,
    op: Spanned<String>,
    value: Option<Spanned<toml::Value>>,
    event: Option<Spanned<String>>,
    when: Option<Spanned<String>>,
    #[serde(rename = "if")]
    condition: Option<Spanned<RawCondition>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEnricher {
    plugin: Spanned<String>,
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
    op: Option<Spanned<String>>,
    value: Option<Spanned<toml::Value>>,
    #[serde(default)]
    ignore_case: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAction {
    name: Spanned<String>,
    audience: Spanned<String>,
    trigger: Spanned<String>,
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
    let mut v = Validator { source, errors: Vec::new() };
    let model = v.model(raw);
    if v.errors.is_empty() { Ok(model) } else { Err(ConfigErrors(v.errors)) }
}

struct Validator<'a> {
    source: &'a str,
    errors: Vec<Diagnostic>,
}

impl Validator<'_> {
    fn error(&mut self, span: Range<usize>, message: impl Into<String>) {
        let (line, column) = line_col(self.source, span.start);
        self.errors.push(Diagnostic { line, column, message: message.into() });
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

        let mut attributes = Vec::new();
        let mut attribute_index = HashMap::new();
        for a in &raw.attribute {
            let a = a.get_ref();
            let name = a.name.get_ref();
            if !is_identifier(name) {
                self.error(a.name.span(), format!("attribute name `{name}` must be letters, digits and `_`"));
                continue;
            }
            if preloaded_type(name).is_some() {
                self.error(a.name.span(), format!("attribute `{name}` is preloaded; choose another name"));
                continue;
            }
            if attribute_index.contains_key(name) {
                self.error(a.name.span(), format!("attribute `{name}` is declared twice"));
                continue;
            }
            let scope = match a.scope.get_ref().as_str() {
                "visit" => Scope::Visit,
                "visitor" => Scope::Visitor,
                other => {
                    self.error(a.scope.span(), format!("unknown scope `{other}`: expected `visit` or `visitor`"));
                    continue;
                }
            };
            let ty = match a.ty.get_ref().as_str() {
                "string" => AttrType::String,
                "number" => AttrType::Number,
                "boolean" => AttrType::Boolean,
                "date" => AttrType::Date,
                "badge" => AttrType::Badge,
                "set_of_strings" => AttrType::SetOfStrings,
                other => {
                    self.error(
                        a.ty.span(),
                        format!(
                            "unknown type `{other}`: expected string, number, boolean, date, badge or set_of_strings"
                        ),
                    );
                    continue;
                }
            };
            attribute_index.insert(name.clone(), attributes.len());
            attributes.push(AttributeDef { name: name.clone(), scope, ty });
        }
        let types: HashMap<String, AttrType> = attributes.iter().map(|a| (a.name.clone(), a.ty)).collect();
        let lookup = |name: &str| types.get(name).copied().or_else(|| preloaded_type(name));

        let enrichments = raw.enrichment.iter().filter_map(|e| self.enrichment(e, &lookup)).collect();

        let enrichers = raw
            .enricher
            .iter()
            .map(|e| EnricherRef { plugin: e.get_ref().plugin.get_ref().clone(), span: e.get_ref().plugin.span() })
            .collect();

        let mut audiences: Vec<Audience> = Vec::new();
        for a in &raw.audience {
            let a = a.get_ref();
            let name = a.name.get_ref();
            if audiences.iter().any(|x| &x.name == name) {
                self.error(a.name.span(), format!("audience `{name}` is declared twice"));
                continue;
            }
            if let Some(rule) = self.condition(&a.rule, &lookup, false) {
                audiences.push(Audience { name: name.clone(), rule });
            }
        }

        let mut actions: Vec<ActionDef> = Vec::new();
        for a in &raw.action {
            let a = a.get_ref();
            let name = a.name.get_ref();
            if actions.iter().any(|x| &x.name == name) {
                self.error(a.name.span(), format!("action `{name}` is declared twice"));
            }
            let audience = a.audience.get_ref();
            if !raw.audience.iter().any(|x| x.get_ref().name.get_ref() == audience) {
                self.error(a.audience.span(), format!("unknown audience `{audience}`"));
            }
            let trigger = match a.trigger.get_ref().as_str() {
                "joined" => Some(Trigger::Joined),
                "left" => Some(Trigger::Left),
                other => {
                    self.error(a.trigger.span(), format!("unknown trigger `{other}`: expected `joined` or `left`"));
                    None
                }
            };
            let mut params = Vec::new();
            for (key, src) in &a.params {
                match parse_reference(src.get_ref(), &lookup) {
                    Ok(source) => params.push((key.clone(), source)),
                    Err(msg) => self.error(src.span(), format!("params.{key}: {msg}")),
                }
            }
            let delivery = self.delivery_policy(a);
            if let Some(trigger) = trigger {
                actions.push(ActionDef {
                    name: name.clone(),
                    audience: audience.clone(),
                    trigger,
                    connector: a.connector.get_ref().clone(),
                    connector_span: a.connector.span(),
                    settings: a.settings.clone(),
                    params,
                    delivery,
                });
            }
        }

        Model {
            server: raw.server,
            visit_timeout_ms: (visit_timeout_minutes * 60_000) as i64,
            attributes,
            attribute_index,
            enrichments,
            enrichers,
            audiences,
            actions,
            plugin_config: raw.plugin,
            source: self.source.to_string(),
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

    fn enrichment(
        &mut self,
        raw: &Spanned<RawEnrichment>,
        lookup: &dyn Fn(&str) -> Option<AttrType>,
    ) -> Option<Enrichment> {
        let e = raw.get_ref();
        let name = e.attribute.get_ref();
        let Some(ty) = lookup(name) else {
            self.error(e.attribute.span(), format!("unknown attribute `{name}`"));
            return None;
        };
        if preloaded_type(name).is_some() {
            self.error(e.attribute.span(), format!("attribute `{name}` is preloaded and maintained by the engine"));
            return None;
        }
        let when = match e.when.as_ref().map(|w| w.get_ref().as_str()) {
            None | Some("any") => When::AnyEvent,
            Some("new_visitor") => When::NewVisitor,
            Some("new_visit") => When::NewVisit,
            Some(other) => match other.strip_prefix("event:") {
                Some(ev) if !ev.is_empty() => When::Event(ev.to_string()),
                _ => {
                    let span = e.when.as_ref().map_or(raw.span(), |w| w.span());
                    self.error(
                        span,
                        format!("unknown trigger `{other}`: expected any, new_visitor, new_visit or event:NAME"),
                    );
                    return None;
                }
            },
        };
        let condition = match &e.condition {
            Some(c) => Some(self.condition(c, lookup, true)?),
            None => None,
        };
        let op = e.op.get_ref().as_str();
        let source = self.source_for(e, ty)?;
        let need_source = |v: &mut Self, s: Option<Source>| {
            if s.is_none() {
                v.error(e.op.span(), format!("`{op}` needs `value` or `event`"));
            }
            s
        };
        let operation = match (ty, op) {
            (AttrType::Number, "increment") => {
                Operation::Increment(source.unwrap_or(Source::Const(Value::Number(1.0))))
            }
            (AttrType::Number, "decrement") => {
                Operation::Decrement(source.unwrap_or(Source::Const(Value::Number(1.0))))
            }
            (AttrType::Number | AttrType::String | AttrType::Boolean | AttrType::Date, "set") => {
                Operation::Set(need_source(self, source)?)
            }
            (AttrType::SetOfStrings, "add") => Operation::AddToSet(need_source(self, source)?),
            (AttrType::SetOfStrings, "remove") => Operation::RemoveFromSet(need_source(self, source)?),
            (AttrType::Badge, "assign") => Operation::AssignBadge,
            (AttrType::Badge, "remove") => Operation::RemoveBadge,
            _ => {
                let allowed = match ty {
                    AttrType::Number => "increment, decrement, set",
                    AttrType::String | AttrType::Boolean | AttrType::Date => "set",
                    AttrType::SetOfStrings => "add, remove",
                    AttrType::Badge => "assign, remove",
                };
                self.error(
                    e.op.span(),
                    format!("operation `{op}` does not apply to {} attribute `{name}` (use: {allowed})", ty.name()),
                );
                return None;
            }
        };
        Some(Enrichment { attribute: name.clone(), operation, when, condition })
    }

    /// The value source of an enrichment, checked against the attribute's type.
    fn source_for(&mut self, e: &RawEnrichment, ty: AttrType) -> Option<Option<Source>> {
        match (&e.value, &e.event) {
            (Some(v), Some(_)) => {
                self.error(v.span(), "give either `value` or `event`, not both");
                None
            }
            (None, Some(path)) => match parse_event_path(path.get_ref()) {
                Some(p) => Some(Some(Source::Event(p))),
                None => {
                    self.error(path.span(), format!("`{}` is not a field path like `order.total`", path.get_ref()));
                    None
                }
            },
            (Some(v), None) => {
                if ty == AttrType::Date && v.get_ref().as_str() == Some("now") {
                    return Some(Some(Source::Now));
                }
                let element = if ty == AttrType::SetOfStrings { AttrType::String } else { ty };
                match literal(v.get_ref(), element) {
                    Ok(val) => Some(Some(Source::Const(val))),
                    Err(msg) => {
                        self.error(v.span(), msg);
                        None
                    }
                }
            }
            (None, None) => Some(None),
        }
    }

    fn condition(
        &mut self,
        raw: &Spanned<RawCondition>,
        lookup: &dyn Fn(&str) -> Option<AttrType>,
        allow_event: bool,
    ) -> Option<Condition> {
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
            let parts: Vec<_> = items.iter().map(|i| v.condition(i, lookup, allow_event)).collect();
            parts.into_iter().collect::<Option<Vec<_>>>()
        };
        if let Some(items) = &c.all {
            return Some(Condition::All(group(self, items)?));
        }
        if let Some(items) = &c.any {
            return Some(Condition::Any(group(self, items)?));
        }
        if let Some(inner) = &c.not {
            return Some(Condition::Not(Box::new(self.condition(inner, lookup, allow_event)?)));
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
        let name = attr.get_ref();
        let (operand, ty) = if let Some(path) = name.strip_prefix("event.") {
            if !allow_event {
                self.error(attr.span(), "audiences read profile attributes only, not `event.` fields");
                return None;
            }
            let Some(path) = parse_event_path(path) else {
                self.error(attr.span(), format!("`{name}` is not a field path like `event.order.total`"));
                return None;
            };
            (Operand::Event(path), None)
        } else {
            let Some(ty) = lookup(name) else {
                self.error(attr.span(), format!("unknown attribute `{name}`"));
                return None;
            };
            (Operand::Attribute(name.clone()), Some(ty))
        };
        if let Some(ty) = ty
            && !op.applies_to(ty)
        {
            self.error(
                op_raw.span(),
                format!("operator `{}` does not apply to {} attribute `{name}`", op.symbol(), ty.name()),
            );
            return None;
        }
        let value = match (op.takes_value(), &c.value) {
            (false, None) => None,
            (false, Some(v)) => {
                self.error(v.span(), format!("operator `{}` takes no value", op.symbol()));
                return None;
            }
            (true, None) => {
                self.error(op_raw.span(), format!("operator `{}` needs a `value`", op.symbol()));
                return None;
            }
            (true, Some(v)) => {
                let expected = match (ty, op) {
                    (Some(AttrType::SetOfStrings), _) => Some(AttrType::String),
                    (Some(AttrType::String), CmpOp::Contains | CmpOp::StartsWith | CmpOp::EndsWith) => {
                        Some(AttrType::String)
                    }
                    (t, _) => t,
                };
                let parsed = match expected {
                    Some(t) => literal(v.get_ref(), t),
                    None => untyped_literal(v.get_ref()),
                };
                match parsed {
                    Ok(val) => Some(val),
                    Err(msg) => {
                        self.error(v.span(), msg);
                        return None;
                    }
                }
            }
        };
        Some(Condition::Leaf { operand, op, value, ignore_case: c.ignore_case })
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

/// A parameter reference: an attribute name, or `event.PATH`.
fn parse_reference(s: &str, lookup: &dyn Fn(&str) -> Option<AttrType>) -> Result<Source, String> {
    if let Some(path) = s.strip_prefix("event.") {
        return parse_event_path(path)
            .map(Source::Event)
            .ok_or_else(|| format!("`{s}` is not a field path like `event.order.total`"));
    }
    if s == "profile_id" || lookup(s).is_some() {
        Ok(Source::Attribute(s.to_string()))
    } else {
        Err(format!("unknown attribute `{s}` (use an attribute name, `profile_id` or `event.FIELD`)"))
    }
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
                "4:9: unknown scope `forever`: expected `visit` or `visitor`",
                "10:8: unknown type `colour`: expected string, number, boolean, date, badge or set_of_strings",
                "14:22: unknown attribute `spnd`",
                "18:12: unknown audience `huge`",
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
}

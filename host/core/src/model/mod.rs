//! The domain model: a validated configuration, as the engine reads it.

mod action;
mod audience;
mod enrichment;
mod identity;
mod ingestion;
mod settings;

pub use action::{ActionDef, BatchPolicy, DeliveryPolicy, OnBackfill, Trigger};
pub use audience::Audience;
pub use enrichment::{EnricherRef, Enrichment, When};
pub use identity::{DEFAULT_BLOCKED_IDS, IdentitySettings};
pub use ingestion::{
    DataSource, EventSpec, FieldSpec, FieldType, History, ImportDef, OnViolation, Personalization, Retention,
    TealiumKey,
};
pub use settings::{ClusterSettings, EventLogKind, ServerSettings, StartCheck};

use crate::attribute::{AttributeDef, preloaded_type};
use crate::diagnostic::{Diagnostic, line_col};
use crate::value::AttrType;
use std::collections::{BTreeMap, HashMap};
use std::ops::Range;

pub const DEFAULT_VISIT_TIMEOUT_MINUTES: u64 = 30;

/// A validated configuration.
#[derive(Debug, Clone)]
pub struct Model {
    pub server: ServerSettings,
    /// Inactivity after which a visit ends, unless its data source has its own.
    pub visit_timeout_ms: i64,
    pub(crate) visit_timeout_by_source: HashMap<String, i64>,
    pub audience_size_interval_ms: i64,
    /// How long a client may take over a request's headers, and then over its body.
    pub header_timeout_ms: i64,
    /// How far ahead of the server an event may be dated without a warning, and how old it may be.
    pub max_clock_skew_ms: i64,
    pub max_event_age_ms: i64,
    pub body_timeout_ms: i64,
    /// Which ids may stitch profiles.
    pub identity: IdentitySettings,
    pub attributes: Vec<AttributeDef>,
    pub(crate) attribute_index: HashMap<String, usize>,
    pub enrichments: Vec<Enrichment>,
    pub enrichers: Vec<EnricherRef>,
    pub audiences: Vec<Audience>,
    /// Attribute name → indexes of the audiences whose rules read it.
    pub(crate) readers: HashMap<String, Vec<usize>>,
    /// Indexes of the audiences with time-relative rules.
    pub time_relative: Vec<usize>,
    /// Indexes of the timeline attributes, whose entries expire.
    pub(crate) timelines: Vec<usize>,
    pub actions: Vec<ActionDef>,
    /// Per-plugin configuration values, handed to the plugin through its `config` interface.
    pub plugin_config: BTreeMap<String, BTreeMap<String, String>>,
    /// Data sources with their ingestion keys; when any is declared, ingestion requires a key.
    pub sources: Vec<DataSource>,
    pub event_specs: Vec<EventSpec>,
    pub retention: Option<Retention>,
    /// How much history and how many finished actions are kept.
    pub history: History,
    pub imports: Vec<ImportDef>,
    pub personalization: Personalization,
    /// `[cluster]`: this server is one node of a cluster on NATS JetStream.
    pub cluster: Option<ClusterSettings>,
    pub(crate) source: String,
}

impl Model {
    pub fn attribute(&self, name: &str) -> Option<&AttributeDef> {
        self.attribute_index.get(name).map(|&i| &self.attributes[i])
    }

    /// The type of a declared or preloaded attribute.
    pub fn attribute_type(&self, name: &str) -> Option<AttrType> {
        self.attribute(name).map(|a| a.ty).or_else(|| preloaded_type(name))
    }

    /// Why events from data source `source` may not set visitor-id attribute `attribute`, when
    /// the source's `claims` leave it out.
    pub fn unclaimed(&self, source: Option<&str>, attribute: &str) -> Option<String> {
        let source = self.sources.iter().find(|s| Some(s.name.as_str()) == source)?;
        let claims = source.claims.as_ref()?;
        (!claims.iter().any(|c| c == attribute)).then(|| {
            format!(
                "visitor id `{attribute}` is not among the claims of source `{}` ({}); not set",
                source.name,
                if claims.is_empty() { "none".to_string() } else { claims.join(", ") }
            )
        })
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

    /// The data source whose key this is.
    pub fn source_by_name(&self, name: &str) -> Option<&DataSource> {
        self.sources.iter().find(|s| s.name == name)
    }

    pub fn action(&self, name: &str) -> Option<&ActionDef> {
        self.actions.iter().find(|a| a.name == name)
    }

    /// The plugins this configuration names: connectors of its actions and its enrichers.
    pub fn plugins_named(&self) -> std::collections::BTreeSet<&str> {
        let connectors = self.actions.iter().map(|a| a.connector.as_str());
        connectors.chain(self.enrichers.iter().map(|e| e.plugin.as_str())).collect()
    }

    /// The text this model was read from.
    pub fn source_text(&self) -> &str {
        &self.source
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

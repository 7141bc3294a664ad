//! The file as written: serde types that keep every value's position.

use crate::model::ServerSettings;
use serde::Deserialize;
use std::collections::BTreeMap;
use toml::Spanned;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    #[serde(default)]
    pub(super) server: ServerSettings,
    #[serde(default)]
    pub(super) visits: RawVisits,
    #[serde(default)]
    pub(super) identity: RawIdentity,
    #[serde(default)]
    pub(super) attribute: Vec<Spanned<RawAttribute>>,
    #[serde(default)]
    pub(super) enrichment: Vec<Spanned<RawEnrichment>>,
    #[serde(default)]
    pub(super) enricher: Vec<Spanned<RawEnricher>>,
    #[serde(default)]
    pub(super) audience: Vec<Spanned<RawAudience>>,
    #[serde(default)]
    pub(super) action: Vec<Spanned<RawAction>>,
    #[serde(default)]
    pub(super) plugin: BTreeMap<String, BTreeMap<String, String>>,
    #[serde(default)]
    pub(super) source: Vec<Spanned<RawSource>>,
    #[serde(default)]
    pub(super) event_spec: Vec<Spanned<RawEventSpec>>,
    pub(super) retention: Option<Spanned<RawRetention>>,
    #[serde(default)]
    pub(super) import: Vec<Spanned<RawImport>>,
    pub(super) personalization: Option<Spanned<RawPersonalization>>,
    pub(super) cluster: Option<Spanned<RawCluster>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCluster {
    pub(super) nats: Vec<Spanned<String>>,
    pub(super) node: Spanned<String>,
    pub(super) lease: Option<Spanned<String>>,
    pub(super) replicas: Option<Spanned<u32>>,
    pub(super) advertise: Option<Spanned<String>>,
    pub(super) snapshot_every: Option<Spanned<String>>,
    pub(super) intake_limit: Option<Spanned<i64>>,
    pub(super) placement: Option<Spanned<String>>,
    pub(super) wait_for_absent: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSource {
    pub(super) name: Spanned<String>,
    pub(super) api_key: Spanned<String>,
    pub(super) claims: Option<Vec<Spanned<String>>>,
    pub(super) segment: Option<Spanned<RawSegmentSource>>,
    pub(super) tealium: Option<Spanned<RawTealiumSource>>,
}

/// How Segment-format messages from a source map onto the profile.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSegmentSource {
    /// The visitor-id attribute a message's `userId` sets.
    pub(super) user_id: Option<Spanned<String>>,
}

/// The Tealium account, profile and data source key whose Collect requests a source receives.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTealiumSource {
    pub(super) account: Spanned<String>,
    pub(super) profile: Spanned<String>,
    pub(super) datasource: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPersonalization {
    #[serde(default)]
    pub(super) expose: Vec<Spanned<String>>,
    #[serde(default)]
    pub(super) origins: Vec<Spanned<String>>,
    pub(super) requests_per_minute: Option<Spanned<u32>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawEventSpec {
    pub(super) event: Spanned<String>,
    /// Field path → type; a trailing `?` makes the field optional.
    #[serde(default)]
    pub(super) fields: BTreeMap<String, Spanned<String>>,
    #[serde(default = "yes")]
    pub(super) allow_other_fields: bool,
    pub(super) on_violation: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRetention {
    pub(super) inactive_after: Option<Spanned<String>>,
    pub(super) check_every: Option<Spanned<String>>,
    pub(super) events: Option<Spanned<String>>,
    pub(super) events_per_profile: Option<Spanned<i64>>,
    pub(super) actions_kept: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawImport {
    pub(super) name: Spanned<String>,
    pub(super) event: Spanned<String>,
    #[serde(rename = "match")]
    pub(super) matches: Spanned<String>,
    pub(super) key: Option<Spanned<String>>,
    #[serde(default)]
    pub(super) columns: BTreeMap<String, Spanned<String>>,
    pub(super) timestamp: Option<Spanned<String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawVisits {
    pub(super) timeout_minutes: Option<Spanned<u64>>,
    /// Per data source (the event's `source`), minutes.
    #[serde(default)]
    pub(super) timeout_minutes_by_source: BTreeMap<String, Spanned<u64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAttribute {
    pub(super) name: Spanned<String>,
    pub(super) scope: Spanned<String>,
    #[serde(rename = "type")]
    pub(super) ty: Spanned<String>,
    pub(super) field: Option<Spanned<String>>,
    pub(super) max_entries: Option<Spanned<u64>>,
    pub(super) max_age: Option<Spanned<String>>,
    pub(super) steps: Option<Spanned<Vec<RawStep>>>,
    pub(super) merge: Option<Spanned<String>>,
    pub(super) max_per_profile: Option<Spanned<u64>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawIdentity {
    pub(super) min_length: Option<Spanned<u64>>,
    pub(super) blocked: Option<Vec<String>>,
    pub(super) max_ids_per_profile: Option<Spanned<u64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawStep {
    pub(super) name: String,
    #[serde(default = "yes")]
    pub(super) required: bool,
}

pub(super) fn yes() -> bool {
    true
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawEnrichment {
    pub(super) attribute: Spanned<String>,
    pub(super) op: Spanned<String>,
    pub(super) value: Option<Spanned<toml::Value>>,
    pub(super) event: Option<Spanned<String>>,
    pub(super) from: Option<Spanned<String>>,
    pub(super) key: Option<Spanned<String>>,
    pub(super) window: Option<Spanned<u64>>,
    pub(super) n: Option<Spanned<u64>>,
    pub(super) step: Option<Spanned<String>>,
    pub(super) fields: Option<BTreeMap<String, Spanned<String>>>,
    pub(super) when: Option<Spanned<String>>,
    #[serde(rename = "if")]
    pub(super) condition: Option<Spanned<RawCondition>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawEnricher {
    pub(super) plugin: Spanned<String>,
    #[serde(default)]
    pub(super) when: Option<Vec<Spanned<String>>>,
    #[serde(default)]
    pub(super) reads: Option<Vec<Spanned<String>>>,
    #[serde(default)]
    pub(super) writes: Option<Vec<Spanned<String>>>,
}

/// A rule on its own, as a preview is asked for.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRule {
    pub(super) rule: Spanned<RawCondition>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAudience {
    pub(super) name: Spanned<String>,
    pub(super) rule: Spanned<RawCondition>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCondition {
    pub(super) all: Option<Vec<Spanned<RawCondition>>>,
    pub(super) any: Option<Vec<Spanned<RawCondition>>>,
    pub(super) not: Option<Box<Spanned<RawCondition>>>,
    pub(super) attribute: Option<Spanned<String>>,
    pub(super) key: Option<Spanned<String>>,
    pub(super) op: Option<Spanned<String>>,
    pub(super) value: Option<Spanned<toml::Value>>,
    #[serde(default)]
    pub(super) ignore_case: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAction {
    pub(super) name: Spanned<String>,
    pub(super) audience: Option<Spanned<String>>,
    pub(super) trigger: Spanned<String>,
    pub(super) event: Option<Spanned<String>>,
    #[serde(rename = "if")]
    pub(super) condition: Option<Spanned<RawCondition>>,
    pub(super) connector: Spanned<String>,
    #[serde(default)]
    pub(super) settings: BTreeMap<String, String>,
    #[serde(default)]
    pub(super) params: BTreeMap<String, Spanned<String>>,
    pub(super) cooldown: Option<Spanned<String>>,
    pub(super) delay: Option<Spanned<String>>,
    pub(super) batch: Option<Spanned<RawBatch>>,
    pub(super) concurrency: Option<Spanned<u64>>,
    pub(super) max_attempts: Option<Spanned<u64>>,
    pub(super) retry_initial: Option<Spanned<String>>,
    pub(super) retry_max: Option<Spanned<String>>,
    pub(super) on_backfill: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawBatch {
    pub(super) max_items: Option<u64>,
    pub(super) max_age: Option<String>,
    pub(super) max_bytes: Option<u64>,
}

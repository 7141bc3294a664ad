//! The configuration file: TOML in, a validated [`Model`] out, or every error found with its
//! position. `raw` is the file as written; each other file checks one family of sections.

mod actions;
mod attributes;
mod audiences;
mod cluster;
mod enrichments;
mod identity;
mod ingestion;
mod raw;
#[cfg(test)]
mod tests;

use crate::attribute::{AttributeDef, preloaded_type};
use crate::diagnostic::line_col;
pub use crate::diagnostic::{ConfigErrors, Diagnostic};
use crate::literal::parse_duration;
use crate::model::{
    ActionDef, Audience, DEFAULT_VISIT_TIMEOUT_MINUTES, EnricherRef, Enrichment, History, Model, Personalization, When,
};
use crate::value::{AttrType, Scope};
use raw::{RawConfig, RawEnricher};
use std::collections::HashMap;
use std::ops::Range;
use toml::Spanned;

const MAX_VISIT_TIMEOUT_MINUTES: u64 = 24 * 60;

pub fn parse(source: &str) -> Result<Model, ConfigErrors> {
    let raw: RawConfig = toml::from_str(source).map_err(|e| {
        let (line, column) = e.span().map_or((1, 1), |s| line_col(source, s.start));
        ConfigErrors(vec![Diagnostic { line, column, message: e.message().trim().to_string() }])
    })?;
    let mut v = Validator { source, errors: Vec::new(), attributes: HashMap::new() };
    let model = v.model(raw);
    if v.errors.is_empty() { Ok(model) } else { Err(ConfigErrors(v.errors)) }
}

/// An audience rule written on its own (to preview it), read against `model`'s attributes:
/// TOML (`rule = { ... }`, or the inline table alone) or JSON (`{"rule": {...}}` or the rule
/// object alone). Errors name their line and column in the text as given.
pub fn parse_rule(model: &Model, text: &str) -> Result<crate::condition::Condition, ConfigErrors> {
    let one = |message: String| ConfigErrors(vec![Diagnostic { line: 1, column: 1, message }]);
    let (source, shift) = match serde_json::from_str::<serde_json::Value>(text) {
        Ok(json) => {
            let rule = match json {
                serde_json::Value::Object(mut fields) if fields.len() == 1 && fields.contains_key("rule") => {
                    fields.remove("rule").expect("checked")
                }
                other => other,
            };
            let rule = toml::Value::try_from(rule).map_err(|e| one(format!("the rule is not a rule: {e}")))?;
            let mut table = toml::Table::new();
            table.insert("rule".into(), rule);
            (toml::to_string(&table).map_err(|e| one(format!("the rule is not a rule: {e}")))?, 0)
        }
        Err(_) if text.trim_start().starts_with('{') => (format!("rule = {text}"), "rule = ".len()),
        Err(_) => (text.to_string(), 0),
    };
    let raw: raw::RawRule = toml::from_str(&source).map_err(|e| {
        let (line, column) = e.span().map_or((1, 1), |s| line_col(&source, s.start));
        let column = if line == 1 { column.saturating_sub(shift).max(1) } else { column };
        ConfigErrors(vec![Diagnostic { line, column, message: e.message().trim().to_string() }])
    })?;
    let attributes = model.attributes.iter().map(|a| (a.name.clone(), a.clone())).collect();
    let mut v = Validator { source: &source, errors: Vec::new(), attributes };
    let rule = v.condition(&raw.rule, RuleUse::Audience);
    if !v.errors.is_empty() {
        for e in &mut v.errors {
            if e.line == 1 {
                e.column = e.column.saturating_sub(shift).max(1);
            }
        }
        return Err(ConfigErrors(v.errors));
    }
    rule.ok_or_else(|| one("the rule could not be read".into()))
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
    pub(super) fn error(&mut self, span: Range<usize>, message: impl std::fmt::Display) {
        let (line, column) = line_col(self.source, span.start);
        self.errors.push(Diagnostic { line, column, message: message.to_string() });
    }

    pub(super) fn enricher(&mut self, raw: &RawEnricher) -> EnricherRef {
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
        let writes = raw.writes.as_ref().map(|names| {
            for name in names {
                match self.scope(name.get_ref()) {
                    Some(Scope::Event) => self.error(
                        name.span(),
                        format!(
                            "enricher writes `{}`, an event attribute, which is read from the event",
                            name.get_ref()
                        ),
                    ),
                    None => self.error(
                        name.span(),
                        format!("enricher writes `{}`, which is not a declared attribute", name.get_ref()),
                    ),
                    _ => {}
                }
            }
            names.iter().map(|n| n.get_ref().clone()).collect()
        });
        let when = match &raw.when {
            None => vec![When::AnyEvent],
            Some(list) if list.is_empty() => {
                self.error(raw.plugin.span(), format!("enricher `{}`: `when` lists no occasion", raw.plugin.get_ref()));
                Vec::new()
            }
            Some(list) => list.iter().filter_map(|w| self.when(w)).collect(),
        };
        EnricherRef { plugin: raw.plugin.get_ref().clone(), reads, writes, when, span: raw.plugin.span() }
    }

    pub(super) fn lookup(&self, name: &str) -> Option<AttrType> {
        self.attributes.get(name).map(|a| a.ty).or_else(|| preloaded_type(name))
    }

    pub(super) fn scope(&self, name: &str) -> Option<Scope> {
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
        let mut server_duration = |key: &str, value: &str, fallback: i64| match parse_duration(value) {
            Ok(ms) => ms,
            Err(msg) => {
                self.error(0..0, format!("server.{key}: {msg}"));
                fallback
            }
        };
        let audience_size_interval_ms =
            server_duration("audience_size_interval", &raw.server.audience_size_interval, 60_000);
        let header_timeout_ms = server_duration("header_timeout", &raw.server.header_timeout, 10_000);
        let body_timeout_ms = server_duration("body_timeout", &raw.server.body_timeout, 30_000);
        let max_clock_skew_ms = server_duration("max_clock_skew", &raw.server.max_clock_skew, 600_000);
        let max_event_age_ms = server_duration("max_event_age", &raw.server.max_event_age, 30 * 86_400_000);
        if !(1..=64).contains(&raw.server.plugin_threads) {
            self.error(0..0, "server.plugin_threads must be between 1 and 64".to_string());
        }
        if raw.server.max_profile_kib == 0 {
            self.error(0..0, "server.max_profile_kib must be at least 1".to_string());
        }
        if raw.server.max_connections == 0 {
            self.error(0..0, "server.max_connections must be at least 1".to_string());
        }

        let mut attributes = Vec::new();
        let mut attribute_index = HashMap::new();
        for a in &raw.attribute {
            if let Some(def) = self.attribute(a.get_ref(), &attribute_index) {
                attribute_index.insert(def.name.clone(), attributes.len());
                self.attributes.insert(def.name.clone(), def.clone());
                attributes.push(def);
            }
        }

        let sources = self.sources(&raw.source);
        // A Segment source's `userId` sets its visitor-id attribute before any declared enrichment.
        let mut enrichments: Vec<Enrichment> = sources
            .iter()
            .filter_map(|s| s.segment_user_id.as_ref())
            .map(|attribute| Enrichment::set_from_field(attribute, crate::wire::segment::USER_ID_FIELD))
            .collect();
        enrichments.extend(raw.enrichment.iter().filter_map(|e| self.enrichment(e)));

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
        let event_specs = self.event_specs(&raw.event_spec);
        let retention = raw.retention.as_ref().and_then(|r| self.retention(r.get_ref()));
        let history = raw.retention.as_ref().map_or_else(History::default, |r| self.history(r.get_ref()));
        let imports = self.imports(&raw.import);
        let personalization =
            raw.personalization.as_ref().map_or_else(Personalization::default, |p| self.personalization(p.get_ref()));
        let cluster = raw.cluster.as_ref().and_then(|c| self.cluster(c.get_ref()));
        let timelines = (0..attributes.len()).filter(|&i| attributes[i].ty == AttrType::Timeline).collect();
        Model {
            server: raw.server,
            visit_timeout_ms: (visit_timeout_minutes * 60_000) as i64,
            visit_timeout_by_source,
            audience_size_interval_ms,
            header_timeout_ms,
            body_timeout_ms,
            max_clock_skew_ms,
            max_event_age_ms,
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
            personalization,
            cluster,
            source: self.source.to_string(),
        }
    }

    pub(super) fn duration(&mut self, raw: &Option<Spanned<String>>) -> Option<i64> {
        let raw = raw.as_ref()?;
        match parse_duration(raw.get_ref()) {
            Ok(ms) => Some(ms),
            Err(msg) => {
                self.error(raw.span(), msg);
                None
            }
        }
    }
}

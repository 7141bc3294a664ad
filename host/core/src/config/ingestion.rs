//! `[[source]]`, `[[event_spec]]`, `[retention]` and `[[import]]`: how data comes in and how long it stays.

use super::Validator;
use super::raw::{
    RawEventSpec, RawImport, RawPersonalization, RawRetention, RawSegmentSource, RawSource, RawTealiumSource,
};
use crate::literal::{is_identifier, parse_event_path};
use crate::model::{
    DataSource, EventSpec, FieldSpec, FieldType, History, ImportDef, OnViolation, Personalization, Retention,
    TealiumKey,
};
use crate::value::AttrType;
use toml::Spanned;

impl Validator<'_> {
    pub(super) fn sources(&mut self, raw: &[Spanned<RawSource>]) -> Vec<DataSource> {
        let mut sources: Vec<DataSource> = Vec::new();
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
                let claims = s.claims.as_ref().map(|claims| {
                    for claim in claims {
                        match self.attributes.get(claim.get_ref()) {
                            Some(a) if a.ty == AttrType::VisitorId => {}
                            Some(_) => self.error(
                                claim.span(),
                                format!(
                                    "source `{name}` claims `{}`, which is not a visitor_id attribute",
                                    claim.get_ref()
                                ),
                            ),
                            None => self.error(
                                claim.span(),
                                format!(
                                    "source `{name}` claims `{}`, which is not a declared attribute",
                                    claim.get_ref()
                                ),
                            ),
                        }
                    }
                    claims.iter().map(|c| c.get_ref().clone()).collect()
                });
                let segment_user_id = s.segment.as_ref().and_then(|m| self.segment_user_id(name, m.get_ref(), &claims));
                let tealium = s.tealium.as_ref().and_then(|t| self.tealium_key(name, t, &sources));
                sources.push(DataSource {
                    name: name.clone(),
                    api_key: s.api_key.get_ref().clone(),
                    claims,
                    segment_user_id,
                    tealium,
                });
            }
        }
        sources
    }

    /// `[source.segment] user_id`: a visitor-id attribute the source may set.
    fn segment_user_id(
        &mut self,
        source: &str,
        raw: &RawSegmentSource,
        claims: &Option<Vec<String>>,
    ) -> Option<String> {
        let attribute = raw.user_id.as_ref()?;
        let name = attribute.get_ref();
        match self.attributes.get(name) {
            Some(a) if a.ty == AttrType::VisitorId => {}
            Some(_) => {
                self.error(
                    attribute.span(),
                    format!("source `{source}`: segment.user_id `{name}` is not a visitor_id attribute"),
                );
                return None;
            }
            None => {
                self.error(
                    attribute.span(),
                    format!("source `{source}`: segment.user_id `{name}` is not a declared attribute"),
                );
                return None;
            }
        }
        if claims.as_ref().is_some_and(|claims| !claims.contains(name)) {
            self.error(
                attribute.span(),
                format!("source `{source}`: segment.user_id `{name}` is not among the ids the source claims"),
            );
            return None;
        }
        Some(name.clone())
    }

    /// `[source.tealium]`: account, profile and data source, which no other source may name.
    fn tealium_key(
        &mut self,
        source: &str,
        raw: &Spanned<RawTealiumSource>,
        others: &[DataSource],
    ) -> Option<TealiumKey> {
        let t = raw.get_ref();
        for (what, value) in [("account", &t.account), ("profile", &t.profile)] {
            if value.get_ref().is_empty() {
                self.error(value.span(), format!("source `{source}`: tealium.{what} must not be empty"));
                return None;
            }
        }
        let key = TealiumKey {
            account: t.account.get_ref().clone(),
            profile: t.profile.get_ref().clone(),
            datasource: t.datasource.as_ref().map(|d| d.get_ref().clone()),
        };
        let overlaps = |other: &TealiumKey| {
            other.account == key.account
                && other.profile == key.profile
                && (other.datasource.is_none() || key.datasource.is_none() || other.datasource == key.datasource)
        };
        if let Some(other) = others.iter().find(|o| o.tealium.as_ref().is_some_and(overlaps)) {
            self.error(
                raw.span(),
                format!(
                    "source `{source}`: tealium account, profile and datasource are also source `{}`'s",
                    other.name
                ),
            );
            return None;
        }
        Some(key)
    }

    pub(super) fn personalization(&mut self, raw: &RawPersonalization) -> Personalization {
        for attribute in &raw.expose {
            let name = attribute.get_ref();
            match self.scope(name) {
                None => self
                    .error(attribute.span(), format!("personalization.expose: `{name}` is not a declared attribute")),
                Some(scope) if !scope.is_stored() => self.error(
                    attribute.span(),
                    format!("personalization.expose: `{name}` is an event attribute, which no profile holds"),
                ),
                Some(_) => {}
            }
        }
        for origin in &raw.origins {
            let o = origin.get_ref();
            let well_formed = o == "*"
                || ((o.starts_with("https://") || o.starts_with("http://"))
                    && !o.ends_with('/')
                    && o.split("://").nth(1).is_some_and(|host| !host.is_empty() && !host.contains('/')));
            if !well_formed {
                self.error(
                    origin.span(),
                    format!("personalization.origins: `{o}` is not an origin (scheme://host[:port], or \"*\")"),
                );
            }
        }
        let requests_per_minute = match &raw.requests_per_minute {
            Some(n) if *n.get_ref() == 0 => {
                self.error(n.span(), "personalization.requests_per_minute must be at least 1");
                0
            }
            Some(n) => *n.get_ref(),
            None => Personalization::DEFAULT_RATE,
        };
        Personalization {
            expose: raw.expose.iter().map(|a| a.get_ref().clone()).collect(),
            origins: raw.origins.iter().map(|o| o.get_ref().clone()).collect(),
            requests_per_minute,
        }
    }

    pub(super) fn event_specs(&mut self, raw: &[Spanned<RawEventSpec>]) -> Vec<EventSpec> {
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

    pub(super) fn history(&mut self, raw: &RawRetention) -> History {
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

    pub(super) fn retention(&mut self, raw: &RawRetention) -> Option<Retention> {
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

    pub(super) fn imports(&mut self, raw: &[Spanned<RawImport>]) -> Vec<ImportDef> {
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
}

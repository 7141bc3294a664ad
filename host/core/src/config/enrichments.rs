//! `[[enrichment]]` and `[[enricher]]`: when an operation runs; the operations themselves are
//! parsed by their family in `crate::enrich`.

use super::raw::RawEnrichment;
use super::{RuleUse, Validator};
use crate::attribute::preloaded_type;
use crate::enrich::{self, Spec};
use crate::model::{Enrichment, When};
use crate::value::Scope;
use toml::Spanned;

impl Validator<'_> {
    /// A `when` value: any, new_visitor, new_visit, visit_ended or event:NAME.
    pub(super) fn when(&mut self, raw: &Spanned<String>) -> Option<When> {
        let when = match raw.get_ref().as_str() {
            "any" => When::AnyEvent,
            "new_visitor" => When::NewVisitor,
            "new_visit" => When::NewVisit,
            "visit_ended" => When::VisitEnded,
            other => match other.strip_prefix("event:") {
                Some(ev) if !ev.is_empty() => When::Event(ev.to_string()),
                _ => {
                    self.error(
                        raw.span(),
                        format!(
                            "unknown `when` value `{other}`: expected any, new_visitor, new_visit, visit_ended or event:NAME"
                        ),
                    );
                    return None;
                }
            },
        };
        Some(when)
    }

    pub(super) fn enrichment(&mut self, raw: &Spanned<RawEnrichment>) -> Option<Enrichment> {
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
        let when = match &e.when {
            None => When::AnyEvent,
            Some(w) => self.when(w)?,
        };
        let condition = match &e.condition {
            Some(c) => Some(self.condition(c, RuleUse::WithEvent)?),
            None => None,
        };
        let steps = self.attributes.get(name).map(|a| a.steps.clone()).unwrap_or_default();
        let attributes = &self.attributes;
        let lookup = |n: &str| attributes.get(n).map(|a| a.ty).or_else(|| preloaded_type(n));
        let mut spec = Spec {
            attribute: name,
            ty,
            op: &e.op,
            value: e.value.as_ref(),
            event: e.event.as_ref(),
            from: e.from.as_ref(),
            key: e.key.as_ref(),
            window: e.window.as_ref(),
            n: e.n.as_ref(),
            step: e.step.as_ref(),
            fields: e.fields.as_ref(),
            steps: &steps,
            lookup: &lookup,
            problems: Vec::new(),
        };
        let operation = enrich::parse(&mut spec);
        let problems = std::mem::take(&mut spec.problems);
        let refused = !problems.is_empty();
        for (span, message) in problems {
            self.error(span, message);
        }
        let operation = operation.filter(|_| !refused)?;
        Some(Enrichment { attribute: name.clone(), operation, when, condition })
    }
}

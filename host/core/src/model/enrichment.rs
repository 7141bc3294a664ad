//! Enrichments: which operation runs on which attribute, and when.

use crate::condition::Condition;
use crate::enrich::Operation;
use std::ops::Range;

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

#[derive(Debug, Clone)]
pub struct Enrichment {
    pub attribute: String,
    pub operation: Operation,
    pub when: When,
    pub condition: Option<Condition>,
}

impl Enrichment {
    /// Sets `attribute` from the event field `field` on every event that carries it.
    pub fn set_from_field(attribute: &str, field: &str) -> Enrichment {
        let source = crate::attribute::ValueSource::Event(vec![field.to_string()]);
        Enrichment {
            attribute: attribute.to_string(),
            operation: crate::enrich::Operation::Any(crate::enrich::any::Op::Set(source)),
            when: When::AnyEvent,
            condition: None,
        }
    }
}

/// A Wasm enricher to run after the built-in enrichments, in file order.
#[derive(Debug, Clone)]
pub struct EnricherRef {
    pub plugin: String,
    /// The attributes the enricher is shown; all stored ones when not given.
    pub reads: Option<Vec<String>>,
    /// The attributes the enricher may set; when not given, every stored one but visitor ids
    /// (setting one stitches profiles, so it must be granted by name).
    pub writes: Option<Vec<String>>,
    /// When it runs: on every event unless the file says otherwise; `visit_ended` runs it when
    /// a visit ends.
    pub when: Vec<When>,
    pub span: Range<usize>,
}

impl EnricherRef {
    /// Whether the enricher may set `attribute`, of type `ty`.
    pub fn may_write(&self, attribute: &str, ty: crate::value::AttrType) -> bool {
        match &self.writes {
            Some(writes) => writes.iter().any(|w| w == attribute),
            None => ty != crate::value::AttrType::VisitorId,
        }
    }
}

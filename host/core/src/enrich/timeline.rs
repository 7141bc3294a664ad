//! Timelines (entries in time order, expiring by age and count): `capture`.

use super::{Inputs, Parsed, Spec, set};
use crate::attribute::{AttributeDef, ValueSource};
use crate::enrich::Operation;
use crate::profile::Profile;
use crate::value::{AttrType, TimelineEntry, Value};

#[derive(Debug, Clone, PartialEq)]
pub enum Op {
    /// Adds an entry at the event's time with the captured fields.
    Capture { fields: Vec<(String, ValueSource)> },
}

pub(super) fn names(ty: AttrType) -> &'static [&'static str] {
    match ty {
        AttrType::Timeline => &["capture"],
        _ => &[],
    }
}

pub(super) fn parse(spec: &mut Spec<'_>) -> Parsed {
    match (spec.ty, spec.op.get_ref().as_str()) {
        (AttrType::Timeline, "capture") => {
            Parsed::Op(Operation::Timeline(Op::Capture { fields: spec.fields() }), &["fields"])
        }
        _ => Parsed::NotHere,
    }
}

impl Op {
    pub(super) fn apply(&self, def: &AttributeDef, profile: &mut Profile, inputs: &impl Inputs) -> Result<(), String> {
        match self {
            Op::Capture { fields } => {
                let now = inputs.now();
                let (data, kept) = inputs.capture(profile, fields).split();
                let mut entries = match profile.attributes.remove(&def.name) {
                    Some(Value::Timeline(e)) => e,
                    _ => Vec::new(),
                };
                let at = entries.partition_point(|e| e.at_ms <= now);
                entries.insert(at, TimelineEntry { at_ms: now, data });
                trim(def, &mut entries, now);
                set(profile, def, Value::Timeline(entries));
                kept
            }
        }
    }
}

/// Drops entries past the timeline's age and count limits (oldest first).
pub fn trim(def: &AttributeDef, entries: &mut Vec<TimelineEntry>, now: i64) {
    let cutoff = now.saturating_sub(def.max_age_ms);
    entries.retain(|e| e.at_ms >= cutoff);
    let overflow = entries.len().saturating_sub(def.max_entries);
    entries.drain(..overflow);
}

#[cfg(test)]
mod tests {
    use crate::enrich::testing::{errors, run};
    use crate::value::Value;

    const ORDERS: &str =
        "[[attribute]]\nname = \"orders\"\nscope = \"visitor\"\ntype = \"timeline\"\nmax_entries = 2\n";

    #[test]
    fn captures_entries_and_keeps_the_latest() {
        let config = format!(
            "{ORDERS}[[enrichment]]\nattribute = \"orders\"\nop = \"capture\"\nfields = {{ total = \"event.t\" }}\n"
        );
        let p = run(&config, &[r#"{"t": 1}"#, r#"{"t": 2}"#, r#"{"t": 3}"#]);
        let Some(Value::Timeline(entries)) = p.get("orders") else { panic!("no timeline") };
        let totals: Vec<_> = entries.iter().map(|e| e.data["total"].clone()).collect();
        assert_eq!(totals, [serde_json::json!(2), serde_json::json!(3)]);
        let bad =
            format!("{ORDERS}[[enrichment]]\nattribute = \"orders\"\nop = \"capture\"\nfields = {{ t = \"nope\" }}\n");
        assert_eq!(
            errors(&bad),
            ["9:16: fields.t: unknown attribute `nope` (use an attribute name, `profile_id` or `event.FIELD`)"]
        );
    }
}

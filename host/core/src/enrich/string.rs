//! Strings: `capture_first`, `capture_last`, `capture_most_frequent`, `lowercase`, `uppercase`.

use super::{Inputs, Parsed, SOURCES, Spec, set};
use crate::attribute::{AttributeDef, ValueSource};
use crate::enrich::{Operation, any};
use crate::profile::Profile;
use crate::value::{AttrType, Value, clamp_string};

/// Most distinct values a "most frequent" capture counts; further new values are not counted.
pub const MAX_FREQUENCY_VALUES: usize = 1_000;

#[derive(Debug, Clone, PartialEq)]
pub enum Op {
    /// Keeps the first value seen.
    CaptureFirst(ValueSource),
    /// Keeps the value seen most often (ties go to the current one).
    CaptureMostFrequent(ValueSource),
    /// Lowercases the source, or the attribute itself when none is given.
    Lowercase(Option<ValueSource>),
    /// Uppercases the source, or the attribute itself when none is given.
    Uppercase(Option<ValueSource>),
}

pub(super) fn names(ty: AttrType) -> &'static [&'static str] {
    match ty {
        AttrType::String => &["capture_first", "capture_last", "capture_most_frequent", "lowercase", "uppercase"],
        _ => &[],
    }
}

pub(super) fn parse(spec: &mut Spec<'_>) -> Parsed {
    if spec.ty != AttrType::String {
        return Parsed::NotHere;
    }
    let ty = spec.ty;
    let op = match spec.op.get_ref().as_str() {
        "capture_first" => spec.required_source(ty).map(Op::CaptureFirst),
        // The last value seen is the value set by the latest event.
        "capture_last" => {
            return match spec.required_source(ty) {
                Some(source) => Parsed::Op(Operation::Any(any::Op::Set(source)), SOURCES),
                None => Parsed::Refused,
            };
        }
        "capture_most_frequent" => spec.required_source(ty).map(Op::CaptureMostFrequent),
        "lowercase" => spec.source_for(ty).ok().map(Op::Lowercase),
        "uppercase" => spec.source_for(ty).ok().map(Op::Uppercase),
        _ => return Parsed::NotHere,
    };
    match op {
        Some(op) => Parsed::Op(Operation::String(op), SOURCES),
        None => Parsed::Refused,
    }
}

impl Op {
    pub(super) fn apply(&self, def: &AttributeDef, profile: &mut Profile, inputs: &impl Inputs) -> Result<(), String> {
        let name = def.name.as_str();
        match self {
            Op::CaptureFirst(source) => {
                if !profile.attributes.contains_key(name)
                    && let Some(Value::String(s)) = inputs.read(source, def.ty, profile)?
                {
                    set(profile, def, Value::String(clamp_string(s)));
                }
            }
            Op::CaptureMostFrequent(source) => {
                let Some(Value::String(s)) = inputs.read(source, def.ty, profile)? else { return Ok(()) };
                let s = clamp_string(s);
                let counts = profile.frequencies.entry(name.to_string()).or_default();
                if counts.len() >= MAX_FREQUENCY_VALUES && !counts.contains_key(&s) {
                    return Err(format!("more than {MAX_FREQUENCY_VALUES} distinct values; `{s}` not counted"));
                }
                let count = *counts.entry(s.clone()).and_modify(|c| *c += 1).or_insert(1);
                let leader = match profile.attributes.get(name) {
                    Some(Value::String(current)) => counts.get(current).copied().unwrap_or(0),
                    _ => 0,
                };
                if count > leader || profile.attributes.get(name) == Some(&Value::String(s.clone())) {
                    set(profile, def, Value::String(s));
                }
            }
            Op::Lowercase(source) | Op::Uppercase(source) => {
                let value = match source {
                    Some(source) => inputs.read(source, def.ty, profile)?,
                    None => profile.attributes.get(name).cloned(),
                };
                if let Some(Value::String(s)) = value {
                    let s = if matches!(self, Op::Lowercase(_)) { s.to_lowercase() } else { s.to_uppercase() };
                    set(profile, def, Value::String(clamp_string(s)));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::enrich::testing::{errors, run};
    use crate::value::Value;

    const CITY: &str = "[[attribute]]\nname = \"city\"\nscope = \"visitor\"\ntype = \"string\"\n";

    fn with(op: &str) -> String {
        format!("{CITY}[[enrichment]]\nattribute = \"city\"\nop = \"{op}\"\nevent = \"c\"\n")
    }

    #[test]
    fn captures_first_last_and_most_frequent() {
        let events = [r#"{"c": "Oslo"}"#, r#"{"c": "Rome"}"#, r#"{"c": "Rome"}"#, r#"{"c": "Lima"}"#];
        let city = |op: &str| run(&with(op), &events).get("city");
        assert_eq!(city("capture_first"), Some(Value::String("Oslo".into())));
        assert_eq!(city("capture_last"), Some(Value::String("Lima".into())));
        assert_eq!(city("capture_most_frequent"), Some(Value::String("Rome".into())));
        assert_eq!(city("uppercase"), Some(Value::String("LIMA".into())));
    }

    #[test]
    fn a_capture_needs_a_source() {
        let bare = format!("{CITY}[[enrichment]]\nattribute = \"city\"\nop = \"capture_first\"\n");
        assert_eq!(errors(&bare), ["7:6: `capture_first` needs `value`, `event` or `from`"]);
    }
}

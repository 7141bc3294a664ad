//! Tallies (counts per key): `increment`, `set_key`, `remove_key`.

use super::{Inputs, Parsed, Spec, finite, key_string, number};
use crate::attribute::{AttributeDef, ValueSource};
use crate::enrich::Operation;
use crate::literal::parse_event_path;
use crate::profile::Profile;
use crate::value::{AttrType, MAX_TALLY_KEYS, Value};
use std::collections::BTreeMap;

#[derive(Debug, Clone, PartialEq)]
pub enum Op {
    /// Adds `by` (1 when not given) to the key's count.
    Increment {
        key: ValueSource,
        by: ValueSource,
    },
    SetKey {
        key: ValueSource,
        to: ValueSource,
    },
    RemoveKey {
        key: ValueSource,
    },
}

pub(super) fn names(ty: AttrType) -> &'static [&'static str] {
    match ty {
        AttrType::Tally => &["increment", "set_key", "remove_key"],
        _ => &[],
    }
}

pub(super) fn parse(spec: &mut Spec<'_>) -> Parsed {
    if spec.ty != AttrType::Tally {
        return Parsed::NotHere;
    }
    let name = spec.op.get_ref().as_str();
    if !matches!(name, "increment" | "set_key" | "remove_key") {
        return Parsed::NotHere;
    }
    let Some(key) = key(spec) else { return Parsed::Refused };
    let op = match name {
        "increment" => spec
            .source_for(AttrType::Number)
            .ok()
            .map(|by| Op::Increment { key, by: by.unwrap_or(ValueSource::Const(Value::Number(1.0))) }),
        "set_key" => spec.required_source(AttrType::Number).map(|to| Op::SetKey { key, to }),
        _ => return Parsed::Op(Operation::Tally(Op::RemoveKey { key }), &["key"]),
    };
    match op {
        Some(op) => Parsed::Op(Operation::Tally(op), &["key", "value", "event", "from"]),
        None => Parsed::Refused,
    }
}

/// A tally key: a constant, or `event.PATH`.
fn key(spec: &mut Spec<'_>) -> Option<ValueSource> {
    let Some(key) = spec.key else {
        let message = format!("`{}` needs `key` (a constant or `event.FIELD`)", spec.op.get_ref());
        spec.problem(spec.op.span(), message);
        return None;
    };
    match key.get_ref().strip_prefix("event.") {
        Some(path) => match parse_event_path(path) {
            Some(p) => Some(ValueSource::Event(p)),
            None => {
                spec.problem(key.span(), format!("`{}` is not a field path like `event.category`", key.get_ref()));
                None
            }
        },
        None => Some(ValueSource::Const(Value::String(key.get_ref().clone()))),
    }
}

impl Op {
    pub(super) fn apply(&self, def: &AttributeDef, profile: &mut Profile, inputs: &impl Inputs) -> Result<(), String> {
        match self {
            Op::Increment { key, by: amount } | Op::SetKey { key, to: amount } => {
                let Some(key) = key_string(inputs.read(key, AttrType::String, profile)?) else { return Ok(()) };
                let Some(amount) = number(inputs.read(amount, AttrType::Number, profile)?) else { return Ok(()) };
                let entry = profile.attributes.entry(def.name.clone()).or_insert_with(|| Value::Tally(BTreeMap::new()));
                let Value::Tally(tally) = entry else { unreachable!("type checked at load") };
                if !tally.contains_key(&key) && tally.len() >= MAX_TALLY_KEYS {
                    return Err(format!("tally is full ({MAX_TALLY_KEYS} keys); key `{key}` refused"));
                }
                let next = match self {
                    Op::Increment { .. } => tally.get(&key).copied().unwrap_or(0.0) + amount,
                    _ => amount,
                };
                tally.insert(key, finite(next)?);
            }
            Op::RemoveKey { key } => {
                let Some(key) = key_string(inputs.read(key, AttrType::String, profile)?) else { return Ok(()) };
                if let Some(Value::Tally(t)) = profile.attributes.get_mut(&def.name) {
                    t.remove(&key);
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

    const SEEN: &str = "[[attribute]]\nname = \"seen\"\nscope = \"visitor\"\ntype = \"tally\"\n";

    #[test]
    fn counts_per_key() {
        let config = format!(
            "{SEEN}[[enrichment]]\nattribute = \"seen\"\nop = \"increment\"\nkey = \"event.k\"\nevent = \"by\"\n\
             [[enrichment]]\nattribute = \"seen\"\nop = \"remove_key\"\nkey = \"gone\"\n"
        );
        let p = run(&config, &[r#"{"k": "x", "by": 2}"#, r#"{"k": "x", "by": 3}"#, r#"{"k": "gone", "by": 1}"#]);
        assert_eq!(p.get("seen"), Some(Value::Tally([("x".to_string(), 5.0)].into())));
        let keyless = format!("{SEEN}[[enrichment]]\nattribute = \"seen\"\nop = \"set_key\"\nvalue = 1\n");
        assert_eq!(errors(&keyless), ["7:6: `set_key` needs `key` (a constant or `event.FIELD`)"]);
    }
}

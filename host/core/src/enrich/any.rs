//! Any type but badges: `set` (scalars, sets and arrays), `clear`.

use super::{Inputs, Parsed, SOURCES, Spec, elements, fill, set};
use crate::attribute::{AttributeDef, ValueSource};
use crate::enrich::Operation;
use crate::profile::Profile;
use crate::value::{AttrType, Value, clamp_string};

#[derive(Debug, Clone, PartialEq)]
pub enum Op {
    /// Replaces the value (a set or array with the source's items).
    Set(ValueSource),
    /// Removes the value and what it was computed from.
    Clear,
}

pub(super) fn names(ty: AttrType) -> &'static [&'static str] {
    match ty {
        AttrType::Badge => &[],
        AttrType::Tally | AttrType::Timeline | AttrType::Funnel => &["clear"],
        _ => &["set", "clear"],
    }
}

pub(super) fn parse(spec: &mut Spec<'_>) -> Parsed {
    let names = names(spec.ty);
    match spec.op.get_ref().as_str() {
        "set" if names.contains(&"set") => match spec.required_source(spec.ty) {
            Some(source) => Parsed::Op(Operation::Any(Op::Set(source)), SOURCES),
            None => Parsed::Refused,
        },
        "clear" if names.contains(&"clear") => Parsed::Op(Operation::Any(Op::Clear), &[]),
        _ => Parsed::NotHere,
    }
}

impl Op {
    pub(super) fn apply(&self, def: &AttributeDef, profile: &mut Profile, inputs: &impl Inputs) -> Result<(), String> {
        match self {
            Op::Set(source) if def.ty.element().is_some() => {
                let items = elements(inputs, profile, source, def.ty)?;
                if items.is_empty() && inputs.read(source, def.ty, profile)?.is_none() {
                    return Ok(());
                }
                let mut value = Value::Set(Default::default());
                fill(def, &mut value, items, true)?;
                set(profile, def, value);
            }
            Op::Set(source) => {
                if let Some(v) = inputs.read(source, def.ty, profile)? {
                    set(profile, def, if let Value::String(s) = v { Value::String(clamp_string(s)) } else { v });
                }
            }
            Op::Clear => profile.clear(&def.name),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::enrich::testing::{errors, run};
    use crate::value::Value;

    #[test]
    fn sets_and_clears() {
        let config = "[[attribute]]\nname = \"d\"\nscope = \"visitor\"\ntype = \"date\"\n\
                      [[enrichment]]\nattribute = \"d\"\nop = \"set\"\nvalue = \"now\"\nwhen = \"event:e\"\n";
        assert!(matches!(run(config, &["{}"]).get("d"), Some(Value::Date(_))));
        let cleared = format!("{config}[[enrichment]]\nattribute = \"d\"\nop = \"clear\"\n");
        assert_eq!(run(&cleared, &["{}"]).get("d"), None);
        let typo = "[[attribute]]\nname = \"d\"\nscope = \"visitor\"\ntype = \"date\"\n\
                    [[enrichment]]\nattribute = \"d\"\nop = \"increment\"\n";
        assert_eq!(errors(typo), ["7:6: operation `increment` does not apply to date attribute `d` (use: set, clear)"]);
    }
}

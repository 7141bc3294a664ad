//! Booleans: `toggle`.

use super::{Parsed, Spec, set};
use crate::attribute::AttributeDef;
use crate::enrich::Operation;
use crate::profile::Profile;
use crate::value::{AttrType, Value};

#[derive(Debug, Clone, PartialEq)]
pub enum Op {
    /// Flips the value (an absent value counts as false).
    Toggle,
}

pub(super) fn names(ty: AttrType) -> &'static [&'static str] {
    match ty {
        AttrType::Boolean => &["toggle"],
        _ => &[],
    }
}

pub(super) fn parse(spec: &mut Spec<'_>) -> Parsed {
    match (spec.ty, spec.op.get_ref().as_str()) {
        (AttrType::Boolean, "toggle") => Parsed::Op(Operation::Boolean(Op::Toggle), &[]),
        _ => Parsed::NotHere,
    }
}

impl Op {
    pub(super) fn apply(&self, def: &AttributeDef, profile: &mut Profile) -> Result<(), String> {
        match self {
            Op::Toggle => {
                let current = matches!(profile.attributes.get(&def.name), Some(Value::Boolean(true)));
                set(profile, def, Value::Boolean(!current));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::enrich::testing::{errors, run};
    use crate::value::Value;

    const FLAG: &str = "[[attribute]]\nname = \"f\"\nscope = \"visitor\"\ntype = \"boolean\"\n";

    #[test]
    fn toggles_from_false() {
        let config = format!("{FLAG}[[enrichment]]\nattribute = \"f\"\nop = \"toggle\"\n");
        assert_eq!(run(&config, &["{}"]).get("f"), Some(Value::Boolean(true)));
        assert_eq!(run(&config, &["{}", "{}"]).get("f"), Some(Value::Boolean(false)));
        let with_value = format!("{FLAG}[[enrichment]]\nattribute = \"f\"\nop = \"toggle\"\nvalue = true\n");
        assert_eq!(errors(&with_value), ["8:9: `value` does not apply to operation `toggle`"]);
    }
}

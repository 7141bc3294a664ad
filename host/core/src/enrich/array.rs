//! Arrays of strings, numbers or booleans: `append` (the oldest items go past the limit).

use super::{Inputs, Parsed, SOURCES, Spec, elements, extend};
use crate::attribute::{AttributeDef, ValueSource};
use crate::enrich::Operation;
use crate::profile::Profile;
use crate::value::AttrType;

#[derive(Debug, Clone, PartialEq)]
pub enum Op {
    Append(ValueSource),
}

pub(super) fn names(ty: AttrType) -> &'static [&'static str] {
    if ty.is_array() { &["append"] } else { &[] }
}

pub(super) fn parse(spec: &mut Spec<'_>) -> Parsed {
    if !spec.ty.is_array() || spec.op.get_ref() != "append" {
        return Parsed::NotHere;
    }
    let element = spec.ty.element().expect("arrays have elements");
    match spec.required_source(element) {
        Some(source) => Parsed::Op(Operation::Array(Op::Append(source)), SOURCES),
        None => Parsed::Refused,
    }
}

impl Op {
    pub(super) fn apply(&self, def: &AttributeDef, profile: &mut Profile, inputs: &impl Inputs) -> Result<(), String> {
        match self {
            Op::Append(source) => {
                let items = elements(inputs, profile, source, def.ty)?;
                extend(def, profile, items)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::enrich::testing::run;
    use crate::value::Value;

    #[test]
    fn appends_and_drops_the_oldest_past_the_limit() {
        let config = "[[attribute]]\nname = \"a\"\nscope = \"visitor\"\ntype = \"array_of_numbers\"\nmax_entries = 3\n\
                      [[enrichment]]\nattribute = \"a\"\nop = \"append\"\nevent = \"x\"\n";
        let p = run(config, &[r#"{"x": 1}"#, r#"{"x": [2, 3]}"#, r#"{"x": 4}"#]);
        assert_eq!(p.get("a"), Some(Value::Numbers(vec![2.0, 3.0, 4.0])));
    }
}

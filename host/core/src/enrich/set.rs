//! Sets of strings: `add`, `remove`, `union`, `difference`, `top_keys`.

use super::{Inputs, Parsed, SOURCES, Spec, elements, extend, fill, set};
use crate::attribute::{AttributeDef, ValueSource};
use crate::enrich::Operation;
use crate::profile::Profile;
use crate::value::{AttrType, Value, tally_top};

#[derive(Debug, Clone, PartialEq)]
pub enum Op {
    Add(ValueSource),
    Remove(ValueSource),
    /// Adds the members of another set or array attribute.
    Union(String),
    /// Removes the members of another set or array attribute.
    Difference(String),
    /// The `n` keys of a tally attribute with the highest counts.
    TopKeys {
        tally: String,
        n: usize,
    },
}

pub(super) fn names(ty: AttrType) -> &'static [&'static str] {
    match ty {
        AttrType::SetOfStrings => &["add", "remove", "union", "difference", "top_keys"],
        _ => &[],
    }
}

pub(super) fn parse(spec: &mut Spec<'_>) -> Parsed {
    if spec.ty != AttrType::SetOfStrings {
        return Parsed::NotHere;
    }
    let (op, allowed): (Option<Op>, &'static [&'static str]) = match spec.op.get_ref().as_str() {
        "add" => (spec.required_source(AttrType::String).map(Op::Add), SOURCES),
        "remove" => (spec.required_source(AttrType::String).map(Op::Remove), SOURCES),
        name @ ("union" | "difference") => {
            let from = spec.source_attribute(&[AttrType::SetOfStrings, AttrType::ArrayOfStrings]);
            (from.map(|f| if name == "union" { Op::Union(f) } else { Op::Difference(f) }), &["from"])
        }
        "top_keys" => {
            let tally = spec.source_attribute(&[AttrType::Tally]);
            let n = match tally {
                Some(_) => spec.count(spec.n, 1..=1000, "`n` (how many keys)", "n must be between 1 and 1000"),
                None => None,
            };
            (tally.zip(n).map(|(tally, n)| Op::TopKeys { tally, n }), &["from", "n"])
        }
        _ => return Parsed::NotHere,
    };
    match op {
        Some(op) => Parsed::Op(Operation::Set(op), allowed),
        None => Parsed::Refused,
    }
}

impl Op {
    pub(super) fn apply(&self, def: &AttributeDef, profile: &mut Profile, inputs: &impl Inputs) -> Result<(), String> {
        match self {
            Op::Add(source) => {
                let items = elements(inputs, profile, source, def.ty)?;
                extend(def, profile, items)?;
            }
            Op::Remove(source) => {
                let items = elements(inputs, profile, source, def.ty)?;
                if let Some(Value::Set(s)) = profile.attributes.get_mut(&def.name) {
                    for item in items {
                        if let Value::String(m) = item {
                            s.remove(&m);
                        }
                    }
                }
            }
            Op::Union(from) | Op::Difference(from) => {
                let others: Vec<String> = match profile.attributes.get(from) {
                    Some(Value::Set(s)) => s.iter().cloned().collect(),
                    Some(Value::Strings(v)) => v.clone(),
                    _ => Vec::new(),
                };
                let mut value =
                    profile.attributes.remove(&def.name).unwrap_or_else(|| Value::collection(def.ty, Vec::new()));
                let result = if matches!(self, Op::Union(_)) {
                    fill(def, &mut value, others.into_iter().map(Value::String).collect(), false)
                } else {
                    if let Value::Set(s) = &mut value {
                        others.iter().for_each(|o| {
                            s.remove(o);
                        });
                    }
                    Ok(())
                };
                set(profile, def, value);
                result?;
            }
            Op::TopKeys { tally, n } => {
                let top = match profile.attributes.get(tally) {
                    Some(Value::Tally(t)) => tally_top(t, *n),
                    _ => Vec::new(),
                };
                set(profile, def, Value::Set(top.into_iter().collect()));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::enrich::testing::{errors, run};
    use crate::value::Value;

    const TAGS: &str = "[[attribute]]\nname = \"tags\"\nscope = \"visitor\"\ntype = \"set_of_strings\"\n";

    #[test]
    fn adds_and_removes_members() {
        let config = format!(
            "{TAGS}[[enrichment]]\nattribute = \"tags\"\nop = \"add\"\nevent = \"add\"\n\
             [[enrichment]]\nattribute = \"tags\"\nop = \"remove\"\nevent = \"drop\"\n"
        );
        let p = run(&config, &[r#"{"add": ["a", "b", "c"]}"#, r#"{"add": "d", "drop": "b"}"#]);
        assert_eq!(p.get("tags"), Some(Value::Set(["a", "c", "d"].map(String::from).into())));
    }

    #[test]
    fn top_keys_reads_a_tally() {
        let config = format!(
            "{TAGS}[[attribute]]\nname = \"seen\"\nscope = \"visitor\"\ntype = \"tally\"\n\
             [[enrichment]]\nattribute = \"seen\"\nop = \"increment\"\nkey = \"event.k\"\n\
             [[enrichment]]\nattribute = \"tags\"\nop = \"top_keys\"\nfrom = \"seen\"\nn = 1\n"
        );
        let p = run(&config, &[r#"{"k": "x"}"#, r#"{"k": "y"}"#, r#"{"k": "y"}"#]);
        assert_eq!(p.get("tags"), Some(Value::Set(["y".to_string()].into())));
        let unknown = format!("{TAGS}[[enrichment]]\nattribute = \"tags\"\nop = \"union\"\nfrom = \"nope\"\n");
        assert_eq!(errors(&unknown), ["8:8: unknown attribute `nope`"]);
    }
}

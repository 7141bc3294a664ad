//! Funnels (ordered steps, some required): `advance`, `reset`.

use super::{Inputs, Parsed, Spec, set};
use crate::attribute::{AttributeDef, ValueSource};
use crate::enrich::Operation;
use crate::profile::Profile;
use crate::value::{AttrType, FunnelStep, Value};

#[derive(Debug, Clone, PartialEq)]
pub enum Op {
    /// Reaches step `step` (an index into the funnel's steps) with the captured fields.
    Advance { step: usize, fields: Vec<(String, ValueSource)> },
    /// Starts the funnel over.
    Reset,
}

pub(super) fn names(ty: AttrType) -> &'static [&'static str] {
    match ty {
        AttrType::Funnel => &["advance", "reset"],
        _ => &[],
    }
}

pub(super) fn parse(spec: &mut Spec<'_>) -> Parsed {
    match (spec.ty, spec.op.get_ref().as_str()) {
        (AttrType::Funnel, "advance") => {
            let Some(step) = spec.step else {
                spec.problem(spec.op.span(), "`advance` needs `step`");
                return Parsed::Refused;
            };
            let Some(index) = spec.steps.iter().position(|s| s.name == *step.get_ref()) else {
                let names: Vec<&str> = spec.steps.iter().map(|s| s.name.as_str()).collect();
                let message = format!(
                    "funnel `{}` has no step `{}` (steps: {})",
                    spec.attribute,
                    step.get_ref(),
                    names.join(", ")
                );
                spec.problem(step.span(), message);
                return Parsed::Refused;
            };
            Parsed::Op(Operation::Funnel(Op::Advance { step: index, fields: spec.fields() }), &["step", "fields"])
        }
        (AttrType::Funnel, "reset") => Parsed::Op(Operation::Funnel(Op::Reset), &[]),
        _ => Parsed::NotHere,
    }
}

impl Op {
    pub(super) fn apply(&self, def: &AttributeDef, profile: &mut Profile, inputs: &impl Inputs) -> Result<(), String> {
        match self {
            Op::Advance { step, fields } => {
                let mut state = match profile.attributes.get(&def.name) {
                    Some(Value::Funnel(f)) => f.clone(),
                    _ => Default::default(),
                };
                if state.completed_ms.is_some() {
                    return Ok(());
                }
                let last = state.reached.last().and_then(|r| def.steps.iter().position(|s| s.name == r.step));
                let from = last.map_or(0, |l| l + 1);
                if *step < from {
                    return Ok(());
                }
                if let Some(skipped) = def.steps[from..*step].iter().find(|s| s.required) {
                    return Err(format!(
                        "step `{}` reached before required step `{}`; funnel unchanged",
                        def.steps[*step].name, skipped.name
                    ));
                }
                let now = inputs.now();
                let (data, kept) = inputs.capture(profile, fields).split();
                state.reached.push(FunnelStep { step: def.steps[*step].name.clone(), at_ms: now, data });
                if !def.steps[*step + 1..].iter().any(|s| s.required) {
                    state.completed_ms = Some(now);
                }
                set(profile, def, Value::Funnel(state));
                kept
            }
            Op::Reset => {
                profile.clear(&def.name);
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::enrich::testing::{errors, run};
    use crate::value::Value;

    const CHECKOUT: &str = "[[attribute]]\nname = \"checkout\"\nscope = \"visitor\"\ntype = \"funnel\"\n\
                            steps = [{ name = \"cart\" }, { name = \"paid\" }]\n";

    #[test]
    fn advances_in_order_and_completes() {
        let config = format!(
            "{CHECKOUT}[[enrichment]]\nattribute = \"checkout\"\nop = \"advance\"\nstep = \"cart\"\nwhen = \"event:e\"\n\
             [[enrichment]]\nattribute = \"checkout\"\nop = \"advance\"\nstep = \"paid\"\nif = {{ attribute = \"event.paid\", op = \"is_assigned\" }}\n"
        );
        let p = run(&config, &["{}", r#"{"paid": true}"#]);
        let Some(Value::Funnel(state)) = p.get("checkout") else { panic!("no funnel") };
        assert_eq!(state.reached.iter().map(|r| r.step.as_str()).collect::<Vec<_>>(), ["cart", "paid"]);
        assert!(state.completed_ms.is_some());
        let unknown =
            format!("{CHECKOUT}[[enrichment]]\nattribute = \"checkout\"\nop = \"advance\"\nstep = \"gone\"\n");
        assert_eq!(errors(&unknown), ["9:8: funnel `checkout` has no step `gone` (steps: cart, paid)"]);
    }
}

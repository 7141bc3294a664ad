//! Numbers: `increment`, `decrement`, `min`, `max`, `rolling_sum`, `rolling_avg`.

use super::{Inputs, Parsed, SOURCES, Spec, finite, number, set};
use crate::attribute::{AttributeDef, ValueSource};
use crate::enrich::Operation;
use crate::profile::Profile;
use crate::value::{AttrType, MAX_ROLLING_WINDOW, Value};

#[derive(Debug, Clone, PartialEq)]
pub enum Op {
    /// Adds the source (1 when not given).
    Increment(ValueSource),
    /// Subtracts the source (1 when not given).
    Decrement(ValueSource),
    Min(ValueSource),
    Max(ValueSource),
    /// The sum of the last `window` values.
    RollingSum {
        source: ValueSource,
        window: usize,
    },
    /// The mean of the last `window` values.
    RollingAvg {
        source: ValueSource,
        window: usize,
    },
}

pub(super) fn names(ty: AttrType) -> &'static [&'static str] {
    match ty {
        AttrType::Number => &["increment", "decrement", "min", "max", "rolling_sum", "rolling_avg"],
        _ => &[],
    }
}

pub(super) fn parse(spec: &mut Spec<'_>) -> Parsed {
    if spec.ty != AttrType::Number {
        return Parsed::NotHere;
    }
    let op = match spec.op.get_ref().as_str() {
        name @ ("increment" | "decrement") => {
            let Ok(by) = spec.source_for(AttrType::Number) else { return Parsed::Refused };
            let by = by.unwrap_or(ValueSource::Const(Value::Number(1.0)));
            if name == "increment" { Op::Increment(by) } else { Op::Decrement(by) }
        }
        name @ ("min" | "max") => {
            let Some(source) = spec.required_source(AttrType::Number) else { return Parsed::Refused };
            if name == "min" { Op::Min(source) } else { Op::Max(source) }
        }
        name @ ("rolling_sum" | "rolling_avg") => {
            let Some(source) = spec.required_source(AttrType::Number) else { return Parsed::Refused };
            let window = spec.count(
                spec.window,
                1..=MAX_ROLLING_WINDOW as u64,
                "`window` (how many recent values)",
                &format!("window must be between 1 and {MAX_ROLLING_WINDOW} values"),
            );
            let Some(window) = window else { return Parsed::Refused };
            let op = if name == "rolling_sum" {
                Op::RollingSum { source, window }
            } else {
                Op::RollingAvg { source, window }
            };
            return Parsed::Op(Operation::Number(op), &["value", "event", "from", "window"]);
        }
        _ => return Parsed::NotHere,
    };
    Parsed::Op(Operation::Number(op), SOURCES)
}

impl Op {
    pub(super) fn apply(&self, def: &AttributeDef, profile: &mut Profile, inputs: &impl Inputs) -> Result<(), String> {
        let current = |profile: &Profile| match profile.attributes.get(&def.name) {
            Some(Value::Number(n)) => Some(*n),
            _ => None,
        };
        match self {
            Op::Increment(source) | Op::Decrement(source) => {
                let Some(by) = number(inputs.read(source, AttrType::Number, profile)?) else { return Ok(()) };
                let by = if matches!(self, Op::Decrement(_)) { -by } else { by };
                let next = finite(current(profile).unwrap_or(0.0) + by)?;
                set(profile, def, Value::Number(next));
            }
            Op::Min(source) | Op::Max(source) => {
                let Some(n) = number(inputs.read(source, AttrType::Number, profile)?) else { return Ok(()) };
                let next = match (current(profile), self) {
                    (None, _) => n,
                    (Some(c), Op::Min(_)) => c.min(n),
                    (Some(c), _) => c.max(n),
                };
                set(profile, def, Value::Number(next));
            }
            Op::RollingSum { source, window } | Op::RollingAvg { source, window } => {
                let Some(n) = number(inputs.read(source, AttrType::Number, profile)?) else { return Ok(()) };
                finite(n)?;
                let samples = profile.rolling.entry(def.name.clone()).or_default();
                samples.push_back(n);
                while samples.len() > *window {
                    samples.pop_front();
                }
                let sum: f64 = samples.iter().sum();
                let value = if matches!(self, Op::RollingSum { .. }) { sum } else { sum / samples.len() as f64 };
                set(profile, def, Value::Number(value));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::enrich::testing::{errors, run};
    use crate::value::Value;

    const SPEND: &str = "[[attribute]]\nname = \"n\"\nscope = \"visitor\"\ntype = \"number\"\n";

    #[test]
    fn increments_decrements_and_keeps_extremes() {
        let ops = r#"
[[enrichment]]
attribute = "n"
op = "increment"
event = "x"
[[enrichment]]
attribute = "n"
op = "decrement"
"#;
        let p = run(&format!("{SPEND}{ops}"), &[r#"{"x": 5}"#, r#"{"x": 2.5}"#]);
        assert_eq!(p.get("n"), Some(Value::Number(5.5)));
        let max = format!("{SPEND}[[enrichment]]\nattribute = \"n\"\nop = \"max\"\nevent = \"x\"\n");
        assert_eq!(run(&max, &[r#"{"x": 5}"#, r#"{"x": 2}"#]).get("n"), Some(Value::Number(5.0)));
    }

    #[test]
    fn rolling_values_keep_their_window() {
        let avg =
            format!("{SPEND}[[enrichment]]\nattribute = \"n\"\nop = \"rolling_avg\"\nevent = \"x\"\nwindow = 2\n");
        let p = run(&avg, &[r#"{"x": 10}"#, r#"{"x": 2}"#, r#"{"x": 4}"#]);
        assert_eq!(p.get("n"), Some(Value::Number(3.0)));
        let no_window = format!("{SPEND}[[enrichment]]\nattribute = \"n\"\nop = \"rolling_sum\"\nevent = \"x\"\n");
        assert_eq!(errors(&no_window), ["7:6: `rolling_sum` needs `window` (how many recent values)"]);
    }
}

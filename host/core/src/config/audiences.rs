//! Rules (`[[audience]]` rules, enrichment `if`s and event-feed conditions): their operands,
//! operators and values.

use super::raw::RawCondition;
use super::{RuleUse, Validator};
use crate::condition::{CmpOp, Condition, Derived, Expected, Operand};
use crate::literal::{literal, parse_duration, parse_event_path, untyped_literal};
use crate::value::{AttrType, Scope, Value};
use toml::Spanned;

impl Validator<'_> {
    pub(super) fn condition(&mut self, raw: &Spanned<RawCondition>, used: RuleUse) -> Option<Condition> {
        let c = raw.get_ref();
        let forms = [c.all.is_some(), c.any.is_some(), c.not.is_some(), c.attribute.is_some()];
        if forms.iter().filter(|f| **f).count() != 1 {
            self.error(
                raw.span(),
                "a condition is exactly one of: `all = [...]`, `any = [...]`, `not = {...}`, or `attribute` with `op`",
            );
            return None;
        }
        let group = |v: &mut Self, items: &[Spanned<RawCondition>]| {
            let parts: Vec<_> = items.iter().map(|i| v.condition(i, used)).collect();
            parts.into_iter().collect::<Option<Vec<_>>>()
        };
        if let Some(items) = &c.all {
            return Some(Condition::All(group(self, items)?));
        }
        if let Some(items) = &c.any {
            return Some(Condition::Any(group(self, items)?));
        }
        if let Some(inner) = &c.not {
            return Some(Condition::Not(Box::new(self.condition(inner, used)?)));
        }
        let attr = c.attribute.as_ref().expect("checked above");
        let Some(op_raw) = &c.op else {
            self.error(attr.span(), "condition needs `op`");
            return None;
        };
        let Some(op) = CmpOp::parse(op_raw.get_ref()) else {
            self.error(
                op_raw.span(),
                format!(
                    "unknown operator `{}`: expected one of {}",
                    op_raw.get_ref(),
                    CmpOp::ALL.iter().map(|o| o.symbol()).collect::<Vec<_>>().join(", ")
                ),
            );
            return None;
        };
        let (operand, ty) = self.operand(attr, c.key.as_ref(), used)?;
        if let Some(ty) = ty
            && !op.applies_to(ty)
        {
            let applicable: Vec<&str> = CmpOp::ALL.iter().filter(|o| o.applies_to(ty)).map(|o| o.symbol()).collect();
            self.error(
                op_raw.span(),
                format!(
                    "operator `{}` does not apply to {} `{}` (use: {})",
                    op.symbol(),
                    ty.name(),
                    operand.label(),
                    applicable.join(", ")
                ),
            );
            return None;
        }
        let expected = match (op.takes_value(), &c.value) {
            (false, None) => Expected::None,
            (false, Some(v)) => {
                self.error(v.span(), format!("operator `{}` takes no value", op.symbol()));
                return None;
            }
            (true, None) => {
                self.error(op_raw.span(), format!("operator `{}` needs a `value`", op.symbol()));
                return None;
            }
            (true, Some(v)) => match expected_value(op, ty, v.get_ref(), c.ignore_case) {
                Ok(x) => x,
                Err(msg) => {
                    self.error(v.span(), msg);
                    return None;
                }
            },
        };
        Some(Condition::Leaf { operand, op, expected, ignore_case: c.ignore_case })
    }

    /// What a leaf reads, and its type (`None` for untyped event fields).
    pub(super) fn operand(
        &mut self,
        attr: &Spanned<String>,
        key: Option<&Spanned<String>>,
        used: RuleUse,
    ) -> Option<(Operand, Option<AttrType>)> {
        let name = attr.get_ref();
        if let Some(path) = name.strip_prefix("event.") {
            if used == RuleUse::Audience {
                self.error(attr.span(), "audiences read profile attributes only, not `event.` fields");
                return None;
            }
            let Some(path) = parse_event_path(path) else {
                self.error(attr.span(), format!("`{name}` is not a field path like `event.order.total`"));
                return None;
            };
            return Some((Operand::Event(path), None));
        }
        let (base, derived) = match name.split_once('.') {
            Some((base, prop)) => match Derived::ALL.into_iter().find(|d| d.name() == prop) {
                Some(d) => (base, Some(d)),
                None => {
                    let names: Vec<&str> = Derived::ALL.iter().map(|d| d.name()).collect();
                    self.error(attr.span(), format!("unknown property `{prop}` (properties: {})", names.join(", ")));
                    return None;
                }
            },
            None => (name.as_str(), None),
        };
        let Some(ty) = self.lookup(base) else {
            self.error(attr.span(), format!("unknown attribute `{base}`"));
            return None;
        };
        if used == RuleUse::Audience && self.scope(base) == Some(Scope::Event) {
            self.error(attr.span(), format!("audiences read profile attributes only; `{base}` is an event attribute"));
            return None;
        }
        match (derived, key) {
            (Some(_), Some(k)) => {
                self.error(k.span(), "give either `key` or a `.property`, not both");
                None
            }
            (Some(d), None) => match d.ty(ty) {
                Some(t) => Some((Operand::Derived(base.to_string(), d), Some(t))),
                None => {
                    self.error(attr.span(), format!("{} attribute `{base}` has no `{}`", ty.name(), d.name()));
                    None
                }
            },
            (None, Some(k)) if ty == AttrType::Tally => {
                Some((Operand::TallyKey(base.to_string(), k.get_ref().clone()), Some(AttrType::Number)))
            }
            (None, Some(k)) => {
                self.error(k.span(), format!("`key` applies to tallies; `{base}` is {}", ty.name()));
                None
            }
            (None, None) => Some((Operand::Attribute(base.to_string()), Some(ty))),
        }
    }
}

/// The right-hand side of a comparison, read for operator `op` on a value of type `ty`.
fn expected_value(op: CmpOp, ty: Option<AttrType>, v: &toml::Value, ignore_case: bool) -> Result<Expected, String> {
    let typed = |v: &toml::Value, t: Option<AttrType>| match t {
        Some(t) => literal(v, t),
        None => untyped_literal(v),
    };
    match op {
        CmpOp::Regex => {
            let pattern = v.as_str().ok_or_else(|| format!("expected a regular expression, found {}", v.type_str()))?;
            regex::RegexBuilder::new(pattern)
                .case_insensitive(ignore_case)
                .size_limit(1 << 20)
                .build()
                .map(Expected::Regex)
                .map_err(|e| format!("invalid regular expression: {e}"))
        }
        CmpOp::WithinLast | CmpOp::NotWithinLast => {
            let s = v.as_str().ok_or_else(|| format!("expected a duration like \"30d\", found {}", v.type_str()))?;
            parse_duration(s).map(Expected::Duration).map_err(|e| e.to_string())
        }
        CmpOp::Between => match v.as_array().map(Vec::as_slice) {
            Some([lo, hi]) => {
                let (lo, hi) = (typed(lo, ty)?, typed(hi, ty)?);
                Ok(Expected::Range(lo, hi))
            }
            _ => Err("`between` needs `value = [low, high]`".into()),
        },
        CmpOp::HasKey => v
            .as_str()
            .map(|s| Expected::Value(Value::String(s.into())))
            .ok_or_else(|| format!("expected a key (string), found {}", v.type_str())),
        _ => {
            let t = ty.map(|t| {
                t.element().unwrap_or(match t {
                    AttrType::VisitorId => AttrType::String,
                    other => other,
                })
            });
            typed(v, t).map(Expected::Value)
        }
    }
}

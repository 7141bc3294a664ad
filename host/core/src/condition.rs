//! Conditions: comparisons over attributes and event fields, combined with all / any / not.

use crate::value::{AttrType, Value};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CmpOp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
    Contains,
    StartsWith,
    EndsWith,
    IsAssigned,
    IsNotAssigned,
}

impl CmpOp {
    pub const ALL: [CmpOp; 11] = [
        CmpOp::Eq,
        CmpOp::Ne,
        CmpOp::Lt,
        CmpOp::Le,
        CmpOp::Gt,
        CmpOp::Ge,
        CmpOp::Contains,
        CmpOp::StartsWith,
        CmpOp::EndsWith,
        CmpOp::IsAssigned,
        CmpOp::IsNotAssigned,
    ];

    pub fn symbol(self) -> &'static str {
        match self {
            CmpOp::Eq => "=",
            CmpOp::Ne => "!=",
            CmpOp::Lt => "<",
            CmpOp::Le => "<=",
            CmpOp::Gt => ">",
            CmpOp::Ge => ">=",
            CmpOp::Contains => "contains",
            CmpOp::StartsWith => "starts_with",
            CmpOp::EndsWith => "ends_with",
            CmpOp::IsAssigned => "is_assigned",
            CmpOp::IsNotAssigned => "is_not_assigned",
        }
    }

    pub fn parse(s: &str) -> Option<CmpOp> {
        if s == "==" {
            return Some(CmpOp::Eq);
        }
        CmpOp::ALL.into_iter().find(|o| o.symbol() == s)
    }

    pub fn takes_value(self) -> bool {
        !matches!(self, CmpOp::IsAssigned | CmpOp::IsNotAssigned)
    }

    pub fn applies_to(self, ty: AttrType) -> bool {
        use CmpOp::*;
        match ty {
            AttrType::String => !matches!(self, Lt | Le | Gt | Ge),
            AttrType::Number | AttrType::Date => !matches!(self, Contains | StartsWith | EndsWith),
            AttrType::Boolean => matches!(self, Eq | Ne | IsAssigned | IsNotAssigned),
            AttrType::Badge => matches!(self, IsAssigned | IsNotAssigned),
            AttrType::SetOfStrings => matches!(self, Contains | IsAssigned | IsNotAssigned),
        }
    }
}

/// What a leaf condition reads.
#[derive(Debug, Clone, PartialEq)]
pub enum Operand {
    Attribute(String),
    /// A path into the current event's `data` (enrichment conditions only).
    Event(Vec<String>),
}

#[derive(Debug, Clone, PartialEq)]
pub enum Condition {
    All(Vec<Condition>),
    Any(Vec<Condition>),
    Not(Box<Condition>),
    Leaf { operand: Operand, op: CmpOp, value: Option<Value>, ignore_case: bool },
}

impl Condition {
    /// Evaluates the condition; `resolve` gives an operand's current value, if it has one.
    pub fn eval(&self, resolve: &dyn Fn(&Operand) -> Option<Value>) -> bool {
        match self {
            Condition::All(items) => items.iter().all(|c| c.eval(resolve)),
            Condition::Any(items) => items.iter().any(|c| c.eval(resolve)),
            Condition::Not(inner) => !inner.eval(resolve),
            Condition::Leaf { operand, op, value, ignore_case } => {
                compare(*op, resolve(operand).as_ref(), value.as_ref(), *ignore_case)
            }
        }
    }

    /// Names of the attributes this condition reads.
    pub fn attributes(&self, out: &mut Vec<String>) {
        match self {
            Condition::All(items) | Condition::Any(items) => items.iter().for_each(|c| c.attributes(out)),
            Condition::Not(inner) => inner.attributes(out),
            Condition::Leaf { operand: Operand::Attribute(a), .. } => {
                if !out.contains(a) {
                    out.push(a.clone());
                }
            }
            Condition::Leaf { .. } => {}
        }
    }
}

/// Compares an actual value with a condition's expected value. A missing value fails every
/// comparison but `is_not_assigned` (and `!=`, which holds when nothing equals).
pub fn compare(op: CmpOp, actual: Option<&Value>, expected: Option<&Value>, ignore_case: bool) -> bool {
    match op {
        CmpOp::IsAssigned => return is_assigned(actual),
        CmpOp::IsNotAssigned => return !is_assigned(actual),
        _ => {}
    }
    let (Some(actual), Some(expected)) = (actual, expected) else {
        return op == CmpOp::Ne;
    };
    let fold = |s: &str| if ignore_case { s.to_lowercase() } else { s.to_string() };
    match (actual, expected) {
        (Value::Set(set), Value::String(s)) => match op {
            CmpOp::Contains if ignore_case => set.iter().any(|m| fold(m) == fold(s)),
            CmpOp::Contains => set.contains(s),
            _ => false,
        },
        (Value::String(a), Value::String(e)) => {
            let (a, e) = (fold(a), fold(e));
            match op {
                CmpOp::Eq => a == e,
                CmpOp::Ne => a != e,
                CmpOp::Contains => a.contains(&e),
                CmpOp::StartsWith => a.starts_with(&e),
                CmpOp::EndsWith => a.ends_with(&e),
                CmpOp::Lt => a < e,
                CmpOp::Le => a <= e,
                CmpOp::Gt => a > e,
                CmpOp::Ge => a >= e,
                CmpOp::IsAssigned | CmpOp::IsNotAssigned => unreachable!("handled above"),
            }
        }
        (Value::Number(a), Value::Number(e)) => ordered(op, a.partial_cmp(e)),
        (Value::Date(a), Value::Date(e)) => ordered(op, Some(a.cmp(e))),
        (Value::Boolean(a), Value::Boolean(e)) => match op {
            CmpOp::Eq => a == e,
            CmpOp::Ne => a != e,
            _ => false,
        },
        _ => op == CmpOp::Ne,
    }
}

fn ordered(op: CmpOp, ord: Option<std::cmp::Ordering>) -> bool {
    use std::cmp::Ordering::*;
    let Some(ord) = ord else { return op == CmpOp::Ne };
    match op {
        CmpOp::Eq => ord == Equal,
        CmpOp::Ne => ord != Equal,
        CmpOp::Lt => ord == Less,
        CmpOp::Le => ord != Greater,
        CmpOp::Gt => ord == Greater,
        CmpOp::Ge => ord != Less,
        _ => false,
    }
}

fn is_assigned(v: Option<&Value>) -> bool {
    match v {
        None => false,
        Some(Value::String(s)) => !s.is_empty(),
        Some(Value::Set(s)) => !s.is_empty(),
        Some(Value::Boolean(b)) => *b,
        Some(_) => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(x: &str) -> Value {
        Value::String(x.into())
    }

    #[test]
    fn numbers_compare() {
        let n = Value::Number(10.0);
        assert!(compare(CmpOp::Ge, Some(&n), Some(&Value::Number(10.0)), false));
        assert!(compare(CmpOp::Gt, Some(&n), Some(&Value::Number(9.5)), false));
        assert!(!compare(CmpOp::Lt, Some(&n), Some(&Value::Number(10.0)), false));
        assert!(compare(CmpOp::Le, Some(&n), Some(&Value::Number(10.0)), false));
        assert!(compare(CmpOp::Ne, Some(&n), Some(&Value::Number(1.0)), false));
        assert!(compare(CmpOp::Eq, Some(&n), Some(&Value::Number(10.0)), false));
    }

    #[test]
    fn strings_compare_with_optional_case_folding() {
        assert!(compare(CmpOp::Eq, Some(&s("Gold")), Some(&s("gold")), true));
        assert!(!compare(CmpOp::Eq, Some(&s("Gold")), Some(&s("gold")), false));
        assert!(compare(CmpOp::Contains, Some(&s("newsletter-2024")), Some(&s("2024")), false));
        assert!(compare(CmpOp::StartsWith, Some(&s("newsletter")), Some(&s("news")), false));
        assert!(compare(CmpOp::EndsWith, Some(&s("newsletter")), Some(&s("letter")), false));
    }

    #[test]
    fn sets_contain() {
        let set = Value::Set(["shoes".to_string()].into());
        assert!(compare(CmpOp::Contains, Some(&set), Some(&s("shoes")), false));
        assert!(compare(CmpOp::Contains, Some(&set), Some(&s("SHOES")), true));
        assert!(!compare(CmpOp::Contains, Some(&set), Some(&s("hats")), false));
    }

    #[test]
    fn missing_values() {
        assert!(!compare(CmpOp::Gt, None, Some(&Value::Number(0.0)), false));
        assert!(compare(CmpOp::IsNotAssigned, None, None, false));
        assert!(!compare(CmpOp::IsAssigned, Some(&s("")), None, false));
        assert!(compare(CmpOp::IsAssigned, Some(&Value::Number(0.0)), None, false));
    }

    #[test]
    fn groups_combine() {
        let leaf = |op, v| Condition::Leaf {
            operand: Operand::Attribute("n".into()),
            op,
            value: Some(Value::Number(v)),
            ignore_case: false,
        };
        let resolve = |_: &Operand| Some(Value::Number(5.0));
        let c = Condition::All(vec![
            leaf(CmpOp::Gt, 1.0),
            Condition::Any(vec![leaf(CmpOp::Lt, 0.0), leaf(CmpOp::Eq, 5.0)]),
        ]);
        assert!(c.eval(&resolve));
        assert!(!Condition::Not(Box::new(c)).eval(&resolve));
    }
}

//! Conditions: comparisons over attributes and event fields, combined with all / any / not.
//! Time-relative operators (`within_last`, `not_within_last`) read the evaluation instant, and
//! report when their result would next change so the engine can wake the profile then.

use crate::value::{AttrType, Value, tally_favorite};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CmpOp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
    Between,
    Contains,
    NotContains,
    StartsWith,
    EndsWith,
    Regex,
    Before,
    After,
    WithinLast,
    NotWithinLast,
    HasKey,
    IsAssigned,
    IsNotAssigned,
}

impl CmpOp {
    pub const ALL: [CmpOp; 19] = [
        CmpOp::Eq,
        CmpOp::Ne,
        CmpOp::Lt,
        CmpOp::Le,
        CmpOp::Gt,
        CmpOp::Ge,
        CmpOp::Between,
        CmpOp::Contains,
        CmpOp::NotContains,
        CmpOp::StartsWith,
        CmpOp::EndsWith,
        CmpOp::Regex,
        CmpOp::Before,
        CmpOp::After,
        CmpOp::WithinLast,
        CmpOp::NotWithinLast,
        CmpOp::HasKey,
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
            CmpOp::Between => "between",
            CmpOp::Contains => "contains",
            CmpOp::NotContains => "not_contains",
            CmpOp::StartsWith => "starts_with",
            CmpOp::EndsWith => "ends_with",
            CmpOp::Regex => "regex",
            CmpOp::Before => "before",
            CmpOp::After => "after",
            CmpOp::WithinLast => "within_last",
            CmpOp::NotWithinLast => "not_within_last",
            CmpOp::HasKey => "has_key",
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

    /// Whether the result depends on the current time.
    pub fn is_time_relative(self) -> bool {
        matches!(self, CmpOp::WithinLast | CmpOp::NotWithinLast)
    }

    pub fn applies_to(self, ty: AttrType) -> bool {
        use CmpOp::*;
        if matches!(self, IsAssigned | IsNotAssigned) {
            return true;
        }
        match ty {
            AttrType::String | AttrType::VisitorId => {
                matches!(self, Eq | Ne | Contains | NotContains | StartsWith | EndsWith | Regex)
            }
            AttrType::Number => matches!(self, Eq | Ne | Lt | Le | Gt | Ge | Between),
            AttrType::Date => {
                matches!(self, Eq | Ne | Lt | Le | Gt | Ge | Between | Before | After | WithinLast | NotWithinLast)
            }
            AttrType::Boolean => matches!(self, Eq | Ne),
            AttrType::Badge | AttrType::Funnel => false,
            AttrType::SetOfStrings
            | AttrType::ArrayOfStrings
            | AttrType::ArrayOfNumbers
            | AttrType::ArrayOfBooleans => {
                matches!(self, Contains | NotContains)
            }
            AttrType::Tally => matches!(self, HasKey),
            AttrType::Timeline => matches!(self, WithinLast | NotWithinLast),
        }
    }
}

/// A property derived from a collection attribute, written `NAME.PROPERTY` in conditions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Derived {
    /// Tally: the key with the highest count.
    Favorite,
    /// Tally: the sum of all counts.
    Total,
    /// Set, array, tally, timeline, funnel: how many members, items, keys, entries or steps.
    Size,
    /// Timeline: the time of the newest entry.
    Last,
    /// Funnel: whether every required step was reached.
    Completed,
    /// Funnel: the last step reached.
    Step,
}

impl Derived {
    pub const ALL: [Derived; 6] =
        [Derived::Favorite, Derived::Total, Derived::Size, Derived::Last, Derived::Completed, Derived::Step];

    pub fn name(self) -> &'static str {
        match self {
            Derived::Favorite => "favorite",
            Derived::Total => "total",
            Derived::Size => "size",
            Derived::Last => "last",
            Derived::Completed => "completed",
            Derived::Step => "step",
        }
    }

    /// The type of this property of an attribute of type `of`, if it has it.
    pub fn ty(self, of: AttrType) -> Option<AttrType> {
        use AttrType::*;
        match (self, of) {
            (Derived::Favorite, Tally) => Some(String),
            (Derived::Total, Tally) => Some(Number),
            (
                Derived::Size,
                SetOfStrings | ArrayOfStrings | ArrayOfNumbers | ArrayOfBooleans | Tally | Timeline | Funnel,
            ) => Some(Number),
            (Derived::Last, Timeline) => Some(Date),
            (Derived::Completed, Funnel) => Some(Boolean),
            (Derived::Step, Funnel) => Some(String),
            _ => None,
        }
    }

    /// This property of `value`.
    pub fn of(self, value: &Value) -> Option<Value> {
        match (self, value) {
            (Derived::Favorite, Value::Tally(t)) => tally_favorite(t).map(Value::String),
            (Derived::Total, Value::Tally(t)) => Some(Value::Number(t.values().sum())),
            (Derived::Size, v) => v.size().map(|n| Value::Number(n as f64)),
            (Derived::Last, Value::Timeline(t)) => t.last().map(|e| Value::Date(e.at_ms)),
            (Derived::Completed, Value::Funnel(f)) => Some(Value::Boolean(f.completed_ms.is_some())),
            (Derived::Step, Value::Funnel(f)) => f.reached.last().map(|s| Value::String(s.step.clone())),
            _ => None,
        }
    }
}

/// What a leaf condition reads.
#[derive(Debug, Clone, PartialEq)]
pub enum Operand {
    Attribute(String),
    /// A derived property of an attribute (`categories.favorite`).
    Derived(String, Derived),
    /// The count of one key of a tally (`attribute = "categories", key = "shoes"`).
    TallyKey(String, String),
    /// A path into the current event's `data` (enrichment conditions and event feeds only).
    Event(Vec<String>),
}

impl Operand {
    /// The attribute this operand reads, if any.
    pub fn attribute(&self) -> Option<&str> {
        match self {
            Operand::Attribute(a) | Operand::Derived(a, _) | Operand::TallyKey(a, _) => Some(a),
            Operand::Event(_) => None,
        }
    }

    pub fn label(&self) -> String {
        match self {
            Operand::Attribute(a) => a.clone(),
            Operand::Derived(a, d) => format!("{a}.{}", d.name()),
            Operand::TallyKey(a, k) => format!("{a}[{k}]"),
            Operand::Event(path) => format!("event.{}", path.join(".")),
        }
    }
}

/// The right-hand side of a comparison.
#[derive(Debug, Clone)]
pub enum Expected {
    None,
    Value(Value),
    /// Inclusive bounds.
    Range(Value, Value),
    /// Compiled once, when the configuration is loaded.
    Regex(regex::Regex),
    /// A span of time, for `within_last` / `not_within_last`.
    Duration(i64),
}

/// Regexes compare by their source: two configurations that write the same rule have equal rules.
impl PartialEq for Expected {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Expected::None, Expected::None) => true,
            (Expected::Value(a), Expected::Value(b)) => a == b,
            (Expected::Range(a, b), Expected::Range(c, d)) => a == c && b == d,
            (Expected::Regex(a), Expected::Regex(b)) => a.as_str() == b.as_str(),
            (Expected::Duration(a), Expected::Duration(b)) => a == b,
            _ => false,
        }
    }
}

impl Expected {
    fn to_json(&self) -> serde_json::Value {
        match self {
            Expected::None => serde_json::Value::Null,
            Expected::Value(v) => v.to_json(),
            Expected::Range(lo, hi) => serde_json::json!([lo.to_json(), hi.to_json()]),
            Expected::Regex(r) => serde_json::Value::String(r.as_str().to_string()),
            Expected::Duration(ms) => serde_json::Value::String(
                humantime::format_duration(std::time::Duration::from_millis(*ms as u64)).to_string(),
            ),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Condition {
    All(Vec<Condition>),
    Any(Vec<Condition>),
    Not(Box<Condition>),
    Leaf { operand: Operand, op: CmpOp, expected: Expected, ignore_case: bool },
}

/// Gives an operand's current value, if it has one.
pub type Resolve<'a> = &'a dyn Fn(&Operand) -> Option<Value>;

impl Condition {
    /// Evaluates the condition at instant `now`.
    pub fn eval(&self, resolve: Resolve, now: i64) -> bool {
        match self {
            Condition::All(items) => items.iter().all(|c| c.eval(resolve, now)),
            Condition::Any(items) => items.iter().any(|c| c.eval(resolve, now)),
            Condition::Not(inner) => !inner.eval(resolve, now),
            Condition::Leaf { operand, op, expected, ignore_case } => {
                compare(*op, resolve(operand).as_ref(), expected, *ignore_case, now)
            }
        }
    }

    /// The condition tree with each leaf's current value and result.
    pub fn explain(&self, resolve: Resolve, now: i64) -> serde_json::Value {
        let group = |key: &str, items: &[Condition]| {
            let parts: Vec<_> = items.iter().map(|c| c.explain(resolve, now)).collect();
            serde_json::json!({ key: parts, "result": self.eval(resolve, now) })
        };
        match self {
            Condition::All(items) => group("all", items),
            Condition::Any(items) => group("any", items),
            Condition::Not(inner) => {
                serde_json::json!({ "not": inner.explain(resolve, now), "result": self.eval(resolve, now) })
            }
            Condition::Leaf { operand, op, expected, ignore_case } => {
                let actual = resolve(operand);
                serde_json::json!({
                    "attribute": operand.label(),
                    "op": op.symbol(),
                    "value": expected.to_json(),
                    "ignore_case": ignore_case,
                    "actual": actual.as_ref().map(Value::to_json),
                    "result": compare(*op, actual.as_ref(), expected, *ignore_case, now),
                })
            }
        }
    }

    /// The condition as JSON, in the shape the configuration file uses.
    pub fn describe(&self) -> serde_json::Value {
        let list = |items: &[Condition]| items.iter().map(Condition::describe).collect::<Vec<_>>();
        match self {
            Condition::All(items) => serde_json::json!({ "all": list(items) }),
            Condition::Any(items) => serde_json::json!({ "any": list(items) }),
            Condition::Not(inner) => serde_json::json!({ "not": inner.describe() }),
            Condition::Leaf { operand, op, expected, ignore_case } => {
                let mut leaf = serde_json::json!({ "attribute": operand.label(), "op": op.symbol() });
                if !matches!(expected, Expected::None) {
                    leaf["value"] = expected.to_json();
                }
                if *ignore_case {
                    leaf["ignore_case"] = true.into();
                }
                leaf
            }
        }
    }

    /// Names of the attributes this condition reads.
    pub fn attributes(&self, out: &mut Vec<String>) {
        self.visit_leaves(&mut |operand, _| {
            if let Some(a) = operand.attribute()
                && !out.iter().any(|x| x == a)
            {
                out.push(a.to_string());
            }
        });
    }

    /// Whether any leaf depends on the current time.
    pub fn is_time_relative(&self) -> bool {
        let mut found = false;
        self.visit_leaves(&mut |_, op| found |= op.is_time_relative());
        found
    }

    /// The earliest instant after `now` at which a time-relative leaf changes its result.
    pub fn next_change(&self, resolve: Resolve, now: i64) -> Option<i64> {
        match self {
            Condition::All(items) | Condition::Any(items) => {
                items.iter().filter_map(|c| c.next_change(resolve, now)).min()
            }
            Condition::Not(inner) => inner.next_change(resolve, now),
            Condition::Leaf { operand, op, expected: Expected::Duration(span), .. } if op.is_time_relative() => {
                let newest = match resolve(operand)? {
                    Value::Date(d) => d,
                    Value::Timeline(t) => t.iter().map(|e| e.at_ms).max()?,
                    _ => return None,
                };
                let flips_at = newest.saturating_add(*span).saturating_add(1);
                (flips_at > now).then_some(flips_at)
            }
            Condition::Leaf { .. } => None,
        }
    }

    fn visit_leaves(&self, f: &mut dyn FnMut(&Operand, CmpOp)) {
        match self {
            Condition::All(items) | Condition::Any(items) => items.iter().for_each(|c| c.visit_leaves(f)),
            Condition::Not(inner) => inner.visit_leaves(f),
            Condition::Leaf { operand, op, .. } => f(operand, *op),
        }
    }
}

/// Compares an actual value with a condition's expected value at instant `now`. A missing
/// value fails every comparison except the negative ones (`!=`, `not_contains`,
/// `not_within_last`, `is_not_assigned`).
pub fn compare(op: CmpOp, actual: Option<&Value>, expected: &Expected, ignore_case: bool, now: i64) -> bool {
    let negative = matches!(op, CmpOp::Ne | CmpOp::NotContains | CmpOp::NotWithinLast | CmpOp::IsNotAssigned);
    let Some(actual) = actual else { return negative };
    let fold = |s: &str| if ignore_case { s.to_lowercase() } else { s.to_string() };
    match (op, expected) {
        (CmpOp::IsAssigned, _) => is_assigned(actual),
        (CmpOp::IsNotAssigned, _) => !is_assigned(actual),
        (CmpOp::Regex, Expected::Regex(re)) => matches!(actual, Value::String(s) if re.is_match(s)),
        (CmpOp::WithinLast | CmpOp::NotWithinLast, Expected::Duration(span)) => {
            let since = now.saturating_sub(*span);
            let within = match actual {
                Value::Date(d) => *d >= since,
                Value::Timeline(t) => t.iter().any(|e| e.at_ms >= since),
                _ => false,
            };
            within == (op == CmpOp::WithinLast)
        }
        (CmpOp::Between, Expected::Range(lo, hi)) => {
            let (Some(a), Some(b)) = (ordering(actual, lo), ordering(actual, hi)) else { return false };
            a.is_ge() && b.is_le()
        }
        (CmpOp::Contains | CmpOp::NotContains, Expected::Value(e)) => {
            let found = match (actual, e) {
                (Value::String(a), Value::String(e)) => fold(a).contains(&fold(e)),
                (Value::Set(set), Value::String(e)) if !ignore_case => set.contains(e),
                (Value::Set(set), Value::String(e)) => set.iter().any(|m| fold(m) == fold(e)),
                (Value::Strings(items), Value::String(e)) => items.iter().any(|m| fold(m) == fold(e)),
                (Value::Numbers(items), Value::Number(e)) => items.contains(e),
                (Value::Booleans(items), Value::Boolean(e)) => items.contains(e),
                _ => false,
            };
            found == (op == CmpOp::Contains)
        }
        (CmpOp::HasKey, Expected::Value(Value::String(k))) => match actual {
            Value::Tally(t) if ignore_case => t.keys().any(|key| fold(key) == fold(k)),
            Value::Tally(t) => t.contains_key(k),
            _ => false,
        },
        (CmpOp::StartsWith | CmpOp::EndsWith, Expected::Value(Value::String(e))) => match actual {
            Value::String(a) if op == CmpOp::StartsWith => fold(a).starts_with(&fold(e)),
            Value::String(a) => fold(a).ends_with(&fold(e)),
            _ => false,
        },
        (_, Expected::Value(e)) => {
            if let (Value::String(a), Value::String(b)) = (actual, e)
                && ignore_case
            {
                return ordered(op, Some(fold(a).cmp(&fold(b))));
            }
            ordered(op, ordering(actual, e))
        }
        _ => false,
    }
}

fn ordering(a: &Value, b: &Value) -> Option<std::cmp::Ordering> {
    match (a, b) {
        (Value::Number(a), Value::Number(b)) => a.partial_cmp(b),
        (Value::Date(a), Value::Date(b)) => Some(a.cmp(b)),
        (Value::String(a), Value::String(b)) => Some(a.cmp(b)),
        (Value::Boolean(a), Value::Boolean(b)) => Some(a.cmp(b)),
        _ => None,
    }
}

fn ordered(op: CmpOp, ord: Option<std::cmp::Ordering>) -> bool {
    use std::cmp::Ordering::*;
    let Some(ord) = ord else { return op == CmpOp::Ne };
    match op {
        CmpOp::Eq => ord == Equal,
        CmpOp::Ne => ord != Equal,
        CmpOp::Lt | CmpOp::Before => ord == Less,
        CmpOp::Le => ord != Greater,
        CmpOp::Gt | CmpOp::After => ord == Greater,
        CmpOp::Ge => ord != Less,
        _ => false,
    }
}

fn is_assigned(v: &Value) -> bool {
    match v {
        Value::String(s) => !s.is_empty(),
        Value::Boolean(b) => *b,
        Value::Number(_) | Value::Date(_) | Value::Funnel(_) => true,
        other => other.size().is_some_and(|n| n > 0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::value::TimelineEntry;

    fn s(x: &str) -> Value {
        Value::String(x.into())
    }
    fn v(x: Value) -> Expected {
        Expected::Value(x)
    }
    fn cmp(op: CmpOp, actual: Option<Value>, expected: Expected) -> bool {
        compare(op, actual.as_ref(), &expected, false, 0)
    }

    #[test]
    fn equality_and_order() {
        let n = || Some(Value::Number(10.0));
        assert!(cmp(CmpOp::Eq, n(), v(Value::Number(10.0))));
        assert!(cmp(CmpOp::Ne, n(), v(Value::Number(1.0))));
        assert!(cmp(CmpOp::Ge, n(), v(Value::Number(10.0))));
        assert!(cmp(CmpOp::Gt, n(), v(Value::Number(9.5))));
        assert!(!cmp(CmpOp::Lt, n(), v(Value::Number(10.0))));
        assert!(cmp(CmpOp::Le, n(), v(Value::Number(10.0))));
        assert!(cmp(CmpOp::Eq, Some(Value::Boolean(true)), v(Value::Boolean(true))));
        assert!(cmp(CmpOp::Ne, Some(Value::Boolean(true)), v(Value::Boolean(false))));
    }

    #[test]
    fn between_is_inclusive() {
        let range = || Expected::Range(Value::Number(1.0), Value::Number(5.0));
        assert!(cmp(CmpOp::Between, Some(Value::Number(1.0)), range()));
        assert!(cmp(CmpOp::Between, Some(Value::Number(5.0)), range()));
        assert!(!cmp(CmpOp::Between, Some(Value::Number(5.1)), range()));
        let dates = Expected::Range(Value::Date(10), Value::Date(20));
        assert!(cmp(CmpOp::Between, Some(Value::Date(15)), dates));
    }

    #[test]
    fn strings_with_optional_case_folding() {
        assert!(compare(CmpOp::Eq, Some(&s("Gold")), &v(s("gold")), true, 0));
        assert!(!compare(CmpOp::Eq, Some(&s("Gold")), &v(s("gold")), false, 0));
        assert!(cmp(CmpOp::Contains, Some(s("newsletter-2024")), v(s("2024"))));
        assert!(cmp(CmpOp::NotContains, Some(s("newsletter")), v(s("2024"))));
        assert!(cmp(CmpOp::StartsWith, Some(s("newsletter")), v(s("news"))));
        assert!(compare(CmpOp::StartsWith, Some(&s("Newsletter")), &v(s("news")), true, 0));
        assert!(cmp(CmpOp::EndsWith, Some(s("newsletter")), v(s("letter"))));
        let re = regex::Regex::new(r"^[a-z]+@example\.com$").unwrap();
        assert!(cmp(CmpOp::Regex, Some(s("ann@example.com")), Expected::Regex(re.clone())));
        assert!(!cmp(CmpOp::Regex, Some(s("ann@example.org")), Expected::Regex(re)));
    }

    #[test]
    fn collections() {
        let set = || Some(Value::Set(["shoes".to_string()].into()));
        assert!(cmp(CmpOp::Contains, set(), v(s("shoes"))));
        assert!(compare(CmpOp::Contains, set().as_ref(), &v(s("SHOES")), true, 0));
        assert!(cmp(CmpOp::NotContains, set(), v(s("hats"))));
        assert!(cmp(CmpOp::Contains, Some(Value::Numbers(vec![1.0, 2.0])), v(Value::Number(2.0))));
        assert!(cmp(CmpOp::Contains, Some(Value::Booleans(vec![false])), v(Value::Boolean(false))));
        assert!(cmp(CmpOp::Contains, Some(Value::Strings(vec!["a".into()])), v(s("a"))));
        let tally = Some(Value::Tally([("shoes".to_string(), 2.0)].into()));
        assert!(cmp(CmpOp::HasKey, tally.clone(), v(s("shoes"))));
        assert!(!cmp(CmpOp::HasKey, tally, v(s("hats"))));
    }

    #[test]
    fn dates_and_time_relative() {
        let day = 86_400_000;
        let now = 100 * day;
        let at = |d| Some(Value::Date(d));
        assert!(cmp(CmpOp::Before, at(5), v(Value::Date(6))));
        assert!(cmp(CmpOp::After, at(7), v(Value::Date(6))));
        let within = |actual: Option<Value>| {
            compare(CmpOp::WithinLast, actual.as_ref(), &Expected::Duration(30 * day), false, now)
        };
        assert!(within(at(now - 29 * day)));
        assert!(within(at(now - 30 * day)));
        assert!(!within(at(now - 31 * day)));
        assert!(!within(None));
        assert!(compare(CmpOp::NotWithinLast, None, &Expected::Duration(day), false, now));
        let timeline = Value::Timeline(vec![TimelineEntry { at_ms: now - 2 * 3_600_000, data: Default::default() }]);
        assert!(compare(CmpOp::WithinLast, Some(&timeline), &Expected::Duration(3 * 3_600_000), false, now));
        assert!(!compare(CmpOp::WithinLast, Some(&timeline), &Expected::Duration(3_600_000), false, now));
    }

    #[test]
    fn time_relative_leaves_report_when_they_change() {
        let c = Condition::Leaf {
            operand: Operand::Attribute("last_purchase".into()),
            op: CmpOp::WithinLast,
            expected: Expected::Duration(1_000),
            ignore_case: false,
        };
        let resolve = |_: &Operand| Some(Value::Date(5_000));
        assert!(c.is_time_relative());
        assert_eq!(c.next_change(&resolve, 5_500), Some(6_001));
        assert!(c.eval(&resolve, 6_000));
        assert!(!c.eval(&resolve, 6_001));
        assert_eq!(c.next_change(&resolve, 6_001), None);
    }

    #[test]
    fn missing_values() {
        assert!(!cmp(CmpOp::Gt, None, v(Value::Number(0.0))));
        assert!(cmp(CmpOp::IsNotAssigned, None, Expected::None));
        assert!(!cmp(CmpOp::IsAssigned, Some(s("")), Expected::None));
        assert!(cmp(CmpOp::IsAssigned, Some(Value::Number(0.0)), Expected::None));
        assert!(!cmp(CmpOp::IsAssigned, Some(Value::Set(Default::default())), Expected::None));
        assert!(cmp(CmpOp::Ne, None, v(s("x"))));
    }

    #[test]
    fn derived_properties() {
        let tally = Value::Tally([("a".to_string(), 1.0), ("b".to_string(), 3.0)].into());
        assert_eq!(Derived::Favorite.of(&tally), Some(s("b")));
        assert_eq!(Derived::Total.of(&tally), Some(Value::Number(4.0)));
        assert_eq!(Derived::Size.of(&tally), Some(Value::Number(2.0)));
        assert_eq!(Derived::Favorite.ty(AttrType::Number), None);
    }

    #[test]
    fn groups_combine_and_explain() {
        let leaf = |op, x| Condition::Leaf {
            operand: Operand::Attribute("n".into()),
            op,
            expected: v(Value::Number(x)),
            ignore_case: false,
        };
        let resolve = |_: &Operand| Some(Value::Number(5.0));
        let c = Condition::All(vec![
            leaf(CmpOp::Gt, 1.0),
            Condition::Any(vec![leaf(CmpOp::Lt, 0.0), leaf(CmpOp::Eq, 5.0)]),
        ]);
        assert!(c.eval(&resolve, 0));
        assert!(!Condition::Not(Box::new(c.clone())).eval(&resolve, 0));
        let tree = c.explain(&resolve, 0);
        assert_eq!(tree["result"], true);
        assert_eq!(tree["all"][1]["any"][0]["result"], false);
        assert_eq!(tree["all"][1]["any"][1]["actual"], 5.0);
    }
}

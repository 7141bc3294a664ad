//! Enrichment operations, one file per family of attribute types. Each family's file holds
//! its operations: how they are read from an `[[enrichment]]` (which fields they take, checked
//! against the attribute's type), what they do to a profile, and their tests. Adding an
//! operation touches its family's file; adding a family adds it to [`FAMILIES`] and
//! [`Operation`].

pub mod any;
pub mod array;
pub mod badge;
pub mod boolean;
pub mod funnel;
pub mod number;
pub mod set;
pub mod string;
pub mod tally;
pub mod timeline;

use crate::attribute::{AttributeDef, FunnelStepDef, ValueSource};
use crate::literal::{literal, parse_event_path};
use crate::profile::Profile;
use crate::value::{AttrType, MAX_SET_MEMBERS, Value, clamp_string};
use std::collections::BTreeMap;
use std::ops::Range;
use toml::Spanned;

/// An enrichment operation, by family.
#[derive(Debug, Clone, PartialEq)]
pub enum Operation {
    Number(number::Op),
    String(string::Op),
    Boolean(boolean::Op),
    Badge(badge::Op),
    Set(set::Op),
    Array(array::Op),
    Tally(tally::Op),
    Timeline(timeline::Op),
    Funnel(funnel::Op),
    Any(any::Op),
}

/// One family's operations: the names it offers for a type, and its parser.
struct Family {
    names: fn(AttrType) -> &'static [&'static str],
    parse: fn(&mut Spec<'_>) -> Parsed,
}

/// Families in the order their names are listed in messages; `any` (set, clear) comes last.
const FAMILIES: &[Family] = &[
    Family { names: number::names, parse: number::parse },
    Family { names: string::names, parse: string::parse },
    Family { names: boolean::names, parse: boolean::parse },
    Family { names: badge::names, parse: badge::parse },
    Family { names: set::names, parse: set::parse },
    Family { names: array::names, parse: array::parse },
    Family { names: tally::names, parse: tally::parse },
    Family { names: timeline::names, parse: timeline::parse },
    Family { names: funnel::names, parse: funnel::parse },
    Family { names: any::names, parse: any::parse },
];

/// What a family made of an operation name.
pub(crate) enum Parsed {
    /// Not one of this family's operations for this type.
    NotHere,
    /// This family's, but wrongly given (the problems say why).
    Refused,
    /// The operation, and the fields it takes.
    Op(Operation, &'static [&'static str]),
}

/// A problem was recorded; the operation cannot be read.
pub(crate) struct Refused;

/// An `[[enrichment]]` as written, for the families to read their operation from.
pub struct Spec<'a> {
    pub attribute: &'a str,
    pub ty: AttrType,
    pub op: &'a Spanned<String>,
    pub value: Option<&'a Spanned<toml::Value>>,
    pub event: Option<&'a Spanned<String>>,
    pub from: Option<&'a Spanned<String>>,
    pub key: Option<&'a Spanned<String>>,
    pub window: Option<&'a Spanned<u64>>,
    pub n: Option<&'a Spanned<u64>>,
    pub step: Option<&'a Spanned<String>>,
    pub fields: Option<&'a BTreeMap<String, Spanned<String>>>,
    /// The attribute's funnel steps (funnels only).
    pub steps: &'a [FunnelStepDef],
    /// The type of a declared or preloaded attribute.
    pub lookup: &'a dyn Fn(&str) -> Option<AttrType>,
    /// Problems found, with their spans.
    pub problems: Vec<(Range<usize>, String)>,
}

/// Reads the operation of `spec`, or records why it cannot be read.
pub fn parse(spec: &mut Spec<'_>) -> Option<Operation> {
    let mut found = None;
    for family in FAMILIES {
        match (family.parse)(spec) {
            Parsed::NotHere => continue,
            Parsed::Refused => return None,
            Parsed::Op(operation, allowed) => {
                found = Some((operation, allowed));
                break;
            }
        }
    }
    let Some((operation, allowed)) = found else {
        let message = format!(
            "operation `{}` does not apply to {} attribute `{}` (use: {})",
            spec.op.get_ref(),
            spec.ty.name(),
            spec.attribute,
            operations_for(spec.ty)
        );
        spec.problem(spec.op.span(), message);
        return None;
    };
    let present = [
        ("value", spec.value.map(Spanned::span)),
        ("event", spec.event.map(Spanned::span)),
        ("from", spec.from.map(Spanned::span)),
        ("key", spec.key.map(Spanned::span)),
        ("window", spec.window.map(Spanned::span)),
        ("n", spec.n.map(Spanned::span)),
        ("step", spec.step.map(Spanned::span)),
        ("fields", spec.fields.and_then(|f| f.values().next()).map(Spanned::span)),
    ];
    for (field, span) in present {
        if let Some(span) = span
            && !allowed.contains(&field)
        {
            let message = format!("`{field}` does not apply to operation `{}`", spec.op.get_ref());
            spec.problem(span, message);
        }
    }
    Some(operation)
}

/// The operations an attribute type accepts, for error messages.
pub fn operations_for(ty: AttrType) -> String {
    FAMILIES.iter().flat_map(|f| (f.names)(ty)).copied().collect::<Vec<_>>().join(", ")
}

/// The value sources of an operation: `value`, `event` or `from`.
const SOURCES: &[&str] = &["value", "event", "from"];

impl Spec<'_> {
    fn op_name(&self) -> &str {
        self.op.get_ref()
    }

    fn problem(&mut self, span: Range<usize>, message: impl Into<String>) {
        self.problems.push((span, message.into()));
    }

    /// The value source (`value`, `event` or `from`), required.
    fn required_source(&mut self, ty: AttrType) -> Option<ValueSource> {
        let source = self.source_for(ty).ok()?;
        if source.is_none() {
            let message = format!("`{}` needs `value`, `event` or `from`", self.op_name());
            self.problem(self.op.span(), message);
        }
        source
    }

    /// The value source (`value`, `event` or `from`), checked against `ty`; `Ok(None)` when
    /// none is given.
    fn source_for(&mut self, ty: AttrType) -> Result<Option<ValueSource>, Refused> {
        let given = [self.value.map(Spanned::span), self.event.map(Spanned::span), self.from.map(Spanned::span)];
        if given.iter().flatten().count() > 1 {
            self.problem(
                given.iter().flatten().nth(1).cloned().unwrap_or_default(),
                "give one of `value`, `event` or `from`",
            );
            return Err(Refused);
        }
        if let Some(path) = self.event {
            return match parse_event_path(path.get_ref()) {
                Some(p) => Ok(Some(ValueSource::Event(p))),
                None => {
                    self.problem(path.span(), format!("`{}` is not a field path like `order.total`", path.get_ref()));
                    Err(Refused)
                }
            };
        }
        if let Some(from) = self.from {
            let name = from.get_ref();
            let Some(from_ty) = (self.lookup)(name) else {
                self.problem(from.span(), format!("unknown attribute `{name}`"));
                return Err(Refused);
            };
            if !from_ty.feeds(ty) {
                self.problem(from.span(), format!("attribute `{name}` is {}, expected {}", from_ty.name(), ty.name()));
                return Err(Refused);
            }
            return Ok(Some(ValueSource::Attribute(name.clone())));
        }
        let Some(v) = self.value else { return Ok(None) };
        if ty == AttrType::Date && v.get_ref().as_str() == Some("now") {
            return Ok(Some(ValueSource::Now));
        }
        let literal_ty = ty.element().filter(|_| !v.get_ref().is_array()).unwrap_or(ty);
        match literal(v.get_ref(), literal_ty) {
            Ok(val) => Ok(Some(ValueSource::Const(val))),
            Err(msg) => {
                self.problem(v.span(), msg);
                Err(Refused)
            }
        }
    }

    /// An attribute named by `from`, of one of `types`.
    fn source_attribute(&mut self, types: &[AttrType]) -> Option<String> {
        let Some(from) = self.from else {
            let message = format!("`{}` needs `from` (an attribute)", self.op_name());
            self.problem(self.op.span(), message);
            return None;
        };
        match (self.lookup)(from.get_ref()) {
            Some(t) if types.contains(&t) => Some(from.get_ref().clone()),
            Some(t) => {
                let names: Vec<&str> = types.iter().map(|t| t.name()).collect();
                let message =
                    format!("attribute `{}` is {}, expected {}", from.get_ref(), t.name(), names.join(" or "));
                self.problem(from.span(), message);
                None
            }
            None => {
                self.problem(from.span(), format!("unknown attribute `{}`", from.get_ref()));
                None
            }
        }
    }

    /// A whole number within `range`, required.
    fn count(
        &mut self,
        given: Option<&Spanned<u64>>,
        range: std::ops::RangeInclusive<u64>,
        needs: &str,
        out_of_range: &str,
    ) -> Option<usize> {
        match given {
            Some(w) if range.contains(w.get_ref()) => Some(*w.get_ref() as usize),
            Some(w) => {
                self.problem(w.span(), out_of_range);
                None
            }
            None => {
                let message = format!("`{}` needs {needs}", self.op_name());
                self.problem(self.op.span(), message);
                None
            }
        }
    }

    /// Captured values of a timeline entry or funnel step: name → attribute or `event.PATH`.
    fn fields(&mut self) -> Vec<(String, ValueSource)> {
        let mut out = Vec::new();
        for (key, src) in self.fields.into_iter().flatten() {
            match ValueSource::reference(src.get_ref(), |name| (self.lookup)(name).is_some()) {
                Ok(source) => out.push((key.clone(), source)),
                Err(msg) => self.problems.push((src.span(), format!("fields.{key}: {msg}"))),
            }
        }
        out
    }
}

/// What an operation reads besides the profile it changes: the event and the clock, through
/// the engine.
pub trait Inputs {
    /// The value of `source` as type `ty` (`None` when absent).
    fn read(&self, source: &ValueSource, ty: AttrType, profile: &Profile) -> Result<Option<Value>, String>;
    /// The values captured into a timeline entry or funnel step, and a warning naming the
    /// fields left out for being larger than `MAX_CAPTURED_BYTES`.
    fn capture(&self, profile: &Profile, fields: &[(String, ValueSource)]) -> Captured;
    /// The event's time.
    fn now(&self) -> i64;
}

/// Values captured from an event, within `MAX_CAPTURED_BYTES` each.
pub struct Captured {
    pub data: BTreeMap<String, serde_json::Value>,
    /// Says which fields were too large to keep.
    pub left_out: Option<String>,
}

impl Captured {
    /// The captured values, and the warning to return once they are stored.
    fn split(self) -> (BTreeMap<String, serde_json::Value>, Result<(), String>) {
        (self.data, self.left_out.map_or(Ok(()), Err))
    }
}

impl Operation {
    /// Applies the operation to attribute `def` of `profile`. An error is a warning: the
    /// operation did what its limits allowed.
    pub fn apply(&self, def: &AttributeDef, profile: &mut Profile, inputs: &impl Inputs) -> Result<(), String> {
        match self {
            Operation::Number(op) => op.apply(def, profile, inputs),
            Operation::String(op) => op.apply(def, profile, inputs),
            Operation::Boolean(op) => op.apply(def, profile),
            Operation::Badge(op) => op.apply(def, profile),
            Operation::Set(op) => op.apply(def, profile, inputs),
            Operation::Array(op) => op.apply(def, profile, inputs),
            Operation::Tally(op) => op.apply(def, profile, inputs),
            Operation::Timeline(op) => op.apply(def, profile, inputs),
            Operation::Funnel(op) => op.apply(def, profile, inputs),
            Operation::Any(op) => op.apply(def, profile, inputs),
        }
    }
}

fn set(profile: &mut Profile, def: &AttributeDef, value: Value) {
    profile.attributes.insert(def.name.clone(), value);
}

fn number(v: Option<Value>) -> Option<f64> {
    v.as_ref().and_then(Value::as_number)
}

fn key_string(v: Option<Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(clamp_string(s)),
        Value::Number(n) => Some(n.to_string()),
        Value::Boolean(b) => Some(b.to_string()),
        _ => None,
    }
}

fn finite(n: f64) -> Result<f64, String> {
    if n.is_finite() { Ok(n) } else { Err(format!("result {n} is not a finite number; value kept")) }
}

/// The operand of a collection operation as a list of elements (one value or many).
fn elements(
    inputs: &impl Inputs,
    profile: &Profile,
    source: &ValueSource,
    collection: AttrType,
) -> Result<Vec<Value>, String> {
    let element = collection.element().expect("collections have elements");
    let value = match inputs.read(source, collection, profile) {
        Ok(v) => v,
        Err(_) => inputs.read(source, element, profile)?,
    };
    Ok(match value {
        None => Vec::new(),
        Some(Value::Set(s)) => s.into_iter().map(Value::String).collect(),
        Some(Value::Strings(v)) => v.into_iter().map(Value::String).collect(),
        Some(Value::Numbers(v)) => v.into_iter().map(Value::Number).collect(),
        Some(Value::Booleans(v)) => v.into_iter().map(Value::Boolean).collect(),
        Some(single) => vec![single],
    })
}

/// Adds `items` to a set or array (emptied first when `replace`), within the documented
/// limits: a full set refuses new members, an array drops its oldest items.
pub fn fill(def: &AttributeDef, value: &mut Value, items: Vec<Value>, replace: bool) -> Result<(), String> {
    if replace {
        *value = Value::collection(def.ty, Vec::new());
    }
    let mut refused = None;
    match value {
        Value::Set(set) => {
            for item in items {
                if let Value::String(m) = item {
                    let m = clamp_string(m);
                    if set.len() < MAX_SET_MEMBERS || set.contains(&m) {
                        set.insert(m);
                    } else {
                        refused.get_or_insert(m);
                    }
                }
            }
        }
        Value::Strings(v) => v.extend(items.into_iter().filter_map(|i| key_string(Some(i)))),
        Value::Numbers(v) => v.extend(items.iter().filter_map(Value::as_number)),
        Value::Booleans(v) => {
            v.extend(items.into_iter().filter_map(|i| if let Value::Boolean(b) = i { Some(b) } else { None }))
        }
        _ => {}
    }
    let overflow = value.size().unwrap_or(0).saturating_sub(def.max_entries);
    match value {
        Value::Strings(v) => drop(v.drain(..overflow)),
        Value::Numbers(v) => drop(v.drain(..overflow)),
        Value::Booleans(v) => drop(v.drain(..overflow)),
        _ => {}
    }
    match refused {
        Some(m) => Err(format!("set is full ({MAX_SET_MEMBERS} members); `{m}` refused")),
        None => Ok(()),
    }
}

/// Adds `items` to the collection attribute `def` of `profile` (created empty if absent).
fn extend(def: &AttributeDef, profile: &mut Profile, items: Vec<Value>) -> Result<(), String> {
    if items.is_empty() {
        return Ok(());
    }
    let mut value = profile.attributes.remove(&def.name).unwrap_or_else(|| Value::collection(def.ty, Vec::new()));
    let result = fill(def, &mut value, items, false);
    set(profile, def, value);
    result
}

#[cfg(test)]
mod testing;

//! Attribute values, the types that constrain them, and their documented limits.

use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

/// Longest string an attribute holds; longer values are truncated at a char boundary.
pub const MAX_STRING_CHARS: usize = 1_000;
/// Most members a set of strings holds; further additions are refused.
pub const MAX_SET_MEMBERS: usize = 30_000;
/// Most items an array holds; appending past it drops the oldest items.
pub const MAX_ARRAY_ITEMS: usize = 1_000;
/// Most keys a tally holds; new keys past it are refused (existing keys still count).
pub const MAX_TALLY_KEYS: usize = 30_000;
/// Default and largest entry count of a timeline; older entries drop out first.
pub const DEFAULT_TIMELINE_ENTRIES: usize = 100;
pub const MAX_TIMELINE_ENTRIES: usize = 1_000;
/// Default age after which timeline entries expire.
pub const DEFAULT_TIMELINE_AGE_MS: i64 = 365 * 24 * 3_600_000;
/// Most steps a funnel may declare.
pub const MAX_FUNNEL_STEPS: usize = 32;
/// Largest window of a rolling sum or average, in samples.
pub const MAX_ROLLING_WINDOW: usize = 1_000;
/// Largest value a timeline entry or funnel step captures from an event, in stored bytes;
/// larger ones are left out of the capture (strings are cut to `MAX_STRING_CHARS` first).
pub const MAX_CAPTURED_BYTES: usize = 4_096;
/// Stored bytes counted for a number, a date or a value's framing.
const SCALAR_BYTES: usize = 16;

/// Scope of an attribute: where its value comes from and how long it lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    /// A field of the current event, read through the attribute's type; never stored.
    Event,
    /// Reset when a visit starts.
    Visit,
    /// Lives as long as the profile.
    Visitor,
    /// A visitor attribute fed by offline data (file imports) as well as by events.
    Omnichannel,
}

impl Scope {
    pub fn name(self) -> &'static str {
        match self {
            Scope::Event => "event",
            Scope::Visit => "visit",
            Scope::Visitor => "visitor",
            Scope::Omnichannel => "omnichannel",
        }
    }

    /// Whether profiles keep values of this scope (event attributes are read from the event).
    pub fn is_stored(self) -> bool {
        self != Scope::Event
    }
}

/// Declared type of an attribute.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AttrType {
    String,
    Number,
    Boolean,
    Date,
    Badge,
    SetOfStrings,
    ArrayOfStrings,
    ArrayOfNumbers,
    ArrayOfBooleans,
    Tally,
    Timeline,
    Funnel,
    VisitorId,
}

impl AttrType {
    pub const ALL: [AttrType; 13] = [
        AttrType::String,
        AttrType::Number,
        AttrType::Boolean,
        AttrType::Date,
        AttrType::Badge,
        AttrType::SetOfStrings,
        AttrType::ArrayOfStrings,
        AttrType::ArrayOfNumbers,
        AttrType::ArrayOfBooleans,
        AttrType::Tally,
        AttrType::Timeline,
        AttrType::Funnel,
        AttrType::VisitorId,
    ];

    pub fn name(self) -> &'static str {
        match self {
            AttrType::String => "string",
            AttrType::Number => "number",
            AttrType::Boolean => "boolean",
            AttrType::Date => "date",
            AttrType::Badge => "badge",
            AttrType::SetOfStrings => "set_of_strings",
            AttrType::ArrayOfStrings => "array_of_strings",
            AttrType::ArrayOfNumbers => "array_of_numbers",
            AttrType::ArrayOfBooleans => "array_of_booleans",
            AttrType::Tally => "tally",
            AttrType::Timeline => "timeline",
            AttrType::Funnel => "funnel",
            AttrType::VisitorId => "visitor_id",
        }
    }

    pub fn parse(s: &str) -> Option<AttrType> {
        AttrType::ALL.into_iter().find(|t| t.name() == s)
    }

    /// Whether `value` is a value of this type.
    pub fn admits(self, value: &Value) -> bool {
        matches!(
            (self, value),
            (AttrType::String | AttrType::VisitorId, Value::String(_))
                | (AttrType::Number, Value::Number(_))
                | (AttrType::Boolean, Value::Boolean(_))
                | (AttrType::Date, Value::Date(_))
                | (AttrType::Badge, Value::Boolean(true))
                | (AttrType::SetOfStrings, Value::Set(_))
                | (AttrType::ArrayOfStrings, Value::Strings(_))
                | (AttrType::ArrayOfNumbers, Value::Numbers(_))
                | (AttrType::ArrayOfBooleans, Value::Booleans(_))
                | (AttrType::Tally, Value::Tally(_))
                | (AttrType::Timeline, Value::Timeline(_))
                | (AttrType::Funnel, Value::Funnel(_))
        )
    }

    /// The type of one element, for collections that hold simple values.
    /// Reads an event value as the given type; numeric strings count as numbers, dates are
    /// RFC 3339 strings or epoch milliseconds.
    pub fn read_json(self, v: &serde_json::Value) -> Result<Value, String> {
        let ty = self;
        let found = || format!("expected {}, found {}", ty.name(), json_kind(v));
        let items = |element: AttrType| -> Result<Vec<Value>, String> {
            match v {
                serde_json::Value::Array(items) => items.iter().map(|i| element.read_json(i)).collect(),
                _ => Err(found()),
            }
        };
        match ty {
            AttrType::Number => match v {
                serde_json::Value::Number(n) => n.as_f64().map(Value::Number).ok_or_else(found),
                serde_json::Value::String(s) => s.trim().parse().map(Value::Number).map_err(|_| found()),
                _ => Err(found()),
            },
            AttrType::String | AttrType::VisitorId => match v {
                serde_json::Value::String(s) => Ok(Value::String(clamp_string(s.clone()))),
                serde_json::Value::Number(n) => Ok(Value::String(n.to_string())),
                serde_json::Value::Bool(b) => Ok(Value::String(b.to_string())),
                _ => Err(found()),
            },
            AttrType::Boolean | AttrType::Badge => v.as_bool().map(Value::Boolean).ok_or_else(found),
            AttrType::Date => match v {
                serde_json::Value::String(s) => crate::time::parse_rfc3339(s).map(Value::Date).ok_or_else(found),
                serde_json::Value::Number(n) => n.as_i64().map(Value::Date).ok_or_else(found),
                _ => Err(found()),
            },
            AttrType::SetOfStrings
            | AttrType::ArrayOfStrings
            | AttrType::ArrayOfNumbers
            | AttrType::ArrayOfBooleans => {
                Ok(Value::collection(ty, items(ty.element().expect("collections have elements"))?))
            }
            AttrType::Tally | AttrType::Timeline | AttrType::Funnel => {
                Err(format!("{} values are not read from events", ty.name()))
            }
        }
    }

    /// Most entries an attribute of this type may be given with `max_entries` (arrays and
    /// timelines only).
    pub fn max_entries_limit(self) -> Option<usize> {
        match self {
            AttrType::Timeline => Some(MAX_TIMELINE_ENTRIES),
            _ if self.is_array() => Some(MAX_ARRAY_ITEMS),
            _ => None,
        }
    }

    /// Whether this is an array type (ordered, capped by dropping the oldest).
    pub fn is_array(self) -> bool {
        matches!(self, AttrType::ArrayOfStrings | AttrType::ArrayOfNumbers | AttrType::ArrayOfBooleans)
    }

    /// Whether an attribute of this type can be the source of a value of type `target`: the
    /// same type, strings and visitor ids for each other, or an element of a collection.
    pub fn feeds(self, target: AttrType) -> bool {
        self == target
            || matches!(
                (self, target),
                (AttrType::String | AttrType::VisitorId, AttrType::String | AttrType::VisitorId)
            )
            || target.element() == Some(self)
    }

    pub fn element(self) -> Option<AttrType> {
        match self {
            AttrType::SetOfStrings | AttrType::ArrayOfStrings => Some(AttrType::String),
            AttrType::ArrayOfNumbers => Some(AttrType::Number),
            AttrType::ArrayOfBooleans => Some(AttrType::Boolean),
            _ => None,
        }
    }
}

/// One entry of a timeline: when, and the values captured from the event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TimelineEntry {
    pub at_ms: i64,
    pub data: BTreeMap<String, serde_json::Value>,
}

/// Where a visitor is in a funnel.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FunnelState {
    /// Steps reached, in order.
    pub reached: Vec<FunnelStep>,
    /// When the last required step was reached.
    pub completed_ms: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FunnelStep {
    pub step: String,
    pub at_ms: i64,
    pub data: BTreeMap<String, serde_json::Value>,
}

/// Stored bytes of the values a timeline entry or funnel step captured.
pub fn captured_bytes(data: &BTreeMap<String, serde_json::Value>) -> usize {
    data.iter().map(|(k, v)| k.len() + 3 + json_bytes(v)).sum()
}

/// About how many bytes `v` takes as JSON text.
pub fn json_bytes(v: &serde_json::Value) -> usize {
    match v {
        serde_json::Value::Null | serde_json::Value::Bool(_) => 5,
        serde_json::Value::Number(_) => SCALAR_BYTES,
        serde_json::Value::String(s) => s.len() + 2,
        serde_json::Value::Array(a) => 2 + a.iter().map(|x| json_bytes(x) + 1).sum::<usize>(),
        serde_json::Value::Object(o) => 2 + o.iter().map(|(k, x)| k.len() + 4 + json_bytes(x)).sum::<usize>(),
    }
}

/// A stored attribute value. Dates are milliseconds since the Unix epoch, UTC.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", content = "value", rename_all = "snake_case")]
pub enum Value {
    String(String),
    Number(f64),
    Boolean(bool),
    Date(i64),
    Set(BTreeSet<String>),
    Strings(Vec<String>),
    Numbers(Vec<f64>),
    Booleans(Vec<bool>),
    Tally(BTreeMap<String, f64>),
    /// Oldest entry first.
    Timeline(Vec<TimelineEntry>),
    Funnel(FunnelState),
}

impl Value {
    /// About how many bytes the value takes stored: its JSON text, give or take a few bytes per
    /// item. Cheap (no serialization): the profile size budget is checked on every event.
    pub fn stored_bytes(&self) -> usize {
        let text = |s: &String| s.len() + 3;
        SCALAR_BYTES
            + match self {
                Value::String(s) => text(s),
                Value::Number(_) | Value::Date(_) | Value::Boolean(_) => SCALAR_BYTES,
                Value::Set(s) => s.iter().map(text).sum(),
                Value::Strings(v) => v.iter().map(text).sum(),
                Value::Numbers(v) => v.len() * SCALAR_BYTES,
                Value::Booleans(v) => v.len() * 6,
                Value::Tally(t) => t.keys().map(|k| text(k) + SCALAR_BYTES).sum(),
                Value::Timeline(entries) => entries.iter().map(|e| SCALAR_BYTES + captured_bytes(&e.data)).sum(),
                Value::Funnel(f) => {
                    f.reached.iter().map(|s| text(&s.step) + SCALAR_BYTES + captured_bytes(&s.data)).sum()
                }
            }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            Value::String(_) => "string",
            Value::Number(_) => "number",
            Value::Boolean(_) => "boolean",
            Value::Date(_) => "date",
            Value::Set(_) => "set_of_strings",
            Value::Strings(_) => "array_of_strings",
            Value::Numbers(_) => "array_of_numbers",
            Value::Booleans(_) => "array_of_booleans",
            Value::Tally(_) => "tally",
            Value::Timeline(_) => "timeline",
            Value::Funnel(_) => "funnel",
        }
    }

    /// A set or array of type `ty` holding the `items` of its element type (others are left
    /// out); an empty set for any other type.
    pub fn collection(ty: AttrType, items: Vec<Value>) -> Value {
        let strings =
            |items: Vec<Value>| items.into_iter().filter_map(|v| if let Value::String(s) = v { Some(s) } else { None });
        match ty {
            AttrType::ArrayOfStrings => Value::Strings(strings(items).collect()),
            AttrType::ArrayOfNumbers => Value::Numbers(items.iter().filter_map(Value::as_number).collect()),
            AttrType::ArrayOfBooleans => Value::Booleans(
                items.iter().filter_map(|v| if let Value::Boolean(b) = v { Some(*b) } else { None }).collect(),
            ),
            _ => Value::Set(strings(items).collect()),
        }
    }

    pub fn as_number(&self) -> Option<f64> {
        if let Value::Number(n) = self { Some(*n) } else { None }
    }

    /// Number of members, items, keys or entries of a collection.
    pub fn size(&self) -> Option<usize> {
        match self {
            Value::Set(s) => Some(s.len()),
            Value::Strings(v) => Some(v.len()),
            Value::Numbers(v) => Some(v.len()),
            Value::Booleans(v) => Some(v.len()),
            Value::Tally(t) => Some(t.len()),
            Value::Timeline(t) => Some(t.len()),
            Value::Funnel(f) => Some(f.reached.len()),
            _ => None,
        }
    }

    /// The value as plain JSON, the way the profile API shows it (dates as RFC 3339).
    pub fn to_json(&self) -> serde_json::Value {
        use serde_json::{Value as J, json};
        let date = |ms: i64| J::String(crate::time::format_rfc3339(ms));
        match self {
            Value::String(s) => J::String(s.clone()),
            Value::Number(n) => number_json(*n),
            Value::Boolean(b) => J::Bool(*b),
            Value::Date(ms) => date(*ms),
            Value::Set(s) => J::Array(s.iter().cloned().map(J::String).collect()),
            Value::Strings(v) => J::Array(v.iter().cloned().map(J::String).collect()),
            Value::Numbers(v) => J::Array(v.iter().map(|n| number_json(*n)).collect()),
            Value::Booleans(v) => J::Array(v.iter().map(|b| J::Bool(*b)).collect()),
            Value::Tally(t) => json!({
                "counts": t.iter().map(|(k, v)| (k.clone(), number_json(*v))).collect::<serde_json::Map<_, _>>(),
                "favorite": tally_favorite(t),
            }),
            Value::Timeline(entries) => {
                J::Array(entries.iter().map(|e| json!({"at": date(e.at_ms), "data": e.data})).collect())
            }
            Value::Funnel(f) => json!({
                "steps": f.reached.iter().map(|s| json!({"step": s.step, "at": date(s.at_ms), "data": s.data})).collect::<Vec<_>>(),
                "completed": f.completed_ms.is_some(),
                "completed_at": f.completed_ms.map(date),
            }),
        }
    }
}

fn number_json(n: f64) -> serde_json::Value {
    serde_json::Number::from_f64(n).map(serde_json::Value::Number).unwrap_or(serde_json::Value::Null)
}

/// The key with the highest count; ties go to the alphabetically first key.
pub fn tally_favorite(tally: &BTreeMap<String, f64>) -> Option<String> {
    let mut best: Option<(&String, f64)> = None;
    for (k, v) in tally {
        if best.is_none_or(|(_, b)| *v > b) {
            best = Some((k, *v));
        }
    }
    best.map(|(k, _)| k.clone())
}

/// The `n` keys with the highest counts, highest first (ties alphabetical).
pub fn tally_top(tally: &BTreeMap<String, f64>, n: usize) -> Vec<String> {
    let mut pairs: Vec<(&String, f64)> = tally.iter().map(|(k, v)| (k, *v)).collect();
    pairs.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| a.0.cmp(b.0)));
    pairs.into_iter().take(n).map(|(k, _)| k.clone()).collect()
}

/// Truncates `s` to [`MAX_STRING_CHARS`] characters.
pub fn clamp_string(mut s: String) -> String {
    if let Some((idx, _)) = s.char_indices().nth(MAX_STRING_CHARS) {
        s.truncate(idx);
    }
    s
}

/// The JSON type of `v`, for messages such as "expected number, found string".
pub fn json_kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "boolean",
        serde_json::Value::Number(_) => "number",
        serde_json::Value::String(_) => "string",
        serde_json::Value::Array(_) => "array",
        serde_json::Value::Object(_) => "object",
    }
}

/// The JSON type of `v` with its article, for messages such as "expected a string, found a
/// number".
pub fn json_kind_phrase(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_strings_are_truncated_on_a_char_boundary() {
        let s = "é".repeat(MAX_STRING_CHARS + 5);
        let clamped = clamp_string(s);
        assert_eq!(clamped.chars().count(), MAX_STRING_CHARS);
    }

    #[test]
    fn types_admit_only_their_values() {
        assert!(AttrType::Number.admits(&Value::Number(1.0)));
        assert!(!AttrType::Number.admits(&Value::String("1".into())));
        assert!(AttrType::Badge.admits(&Value::Boolean(true)));
        assert!(!AttrType::Badge.admits(&Value::Boolean(false)));
        assert!(AttrType::VisitorId.admits(&Value::String("abc".into())));
        assert!(AttrType::ArrayOfNumbers.admits(&Value::Numbers(vec![1.0])));
        assert!(!AttrType::ArrayOfStrings.admits(&Value::Numbers(vec![1.0])));
        for t in AttrType::ALL {
            assert_eq!(AttrType::parse(t.name()), Some(t));
        }
    }

    #[test]
    fn tally_favorite_and_top() {
        let t: BTreeMap<String, f64> = [("a".into(), 2.0), ("b".into(), 5.0), ("c".into(), 5.0)].into();
        assert_eq!(tally_favorite(&t).as_deref(), Some("b"));
        assert_eq!(tally_top(&t, 2), vec!["b", "c"]);
        assert_eq!(tally_favorite(&BTreeMap::new()), None);
    }
}

//! Attribute values and the types that constrain them.

use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;

/// Longest string an attribute holds; longer values are truncated at a char boundary.
pub const MAX_STRING_CHARS: usize = 1_000;
/// Most members a set of strings holds; further additions are refused.
pub const MAX_SET_MEMBERS: usize = 30_000;

/// Scope of an attribute: how long its value lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    /// Reset when a visit starts.
    Visit,
    /// Lives as long as the profile.
    Visitor,
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
}

impl AttrType {
    pub fn name(self) -> &'static str {
        match self {
            AttrType::String => "string",
            AttrType::Number => "number",
            AttrType::Boolean => "boolean",
            AttrType::Date => "date",
            AttrType::Badge => "badge",
            AttrType::SetOfStrings => "set_of_strings",
        }
    }

    /// Whether `value` is a value of this type.
    pub fn admits(self, value: &Value) -> bool {
        matches!(
            (self, value),
            (AttrType::String, Value::String(_))
                | (AttrType::Number, Value::Number(_))
                | (AttrType::Boolean, Value::Boolean(_))
                | (AttrType::Date, Value::Date(_))
                | (AttrType::Badge, Value::Boolean(true))
                | (AttrType::SetOfStrings, Value::Set(_))
        )
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
}

impl Value {
    pub fn kind(&self) -> &'static str {
        match self {
            Value::String(_) => "string",
            Value::Number(_) => "number",
            Value::Boolean(_) => "boolean",
            Value::Date(_) => "date",
            Value::Set(_) => "set_of_strings",
        }
    }

    /// The value as plain JSON, the way the profile API shows it (dates as RFC 3339).
    pub fn to_json(&self) -> serde_json::Value {
        match self {
            Value::String(s) => serde_json::Value::String(s.clone()),
            Value::Number(n) => {
                serde_json::Number::from_f64(*n).map(serde_json::Value::Number).unwrap_or(serde_json::Value::Null)
            }
            Value::Boolean(b) => serde_json::Value::Bool(*b),
            Value::Date(ms) => serde_json::Value::String(crate::time::format_rfc3339(*ms)),
            Value::Set(s) => serde_json::Value::Array(s.iter().cloned().map(serde_json::Value::String).collect()),
        }
    }
}

/// Truncates `s` to [`MAX_STRING_CHARS`] characters.
pub fn clamp_string(mut s: String) -> String {
    if let Some((idx, _)) = s.char_indices().nth(MAX_STRING_CHARS) {
        s.truncate(idx);
    }
    s
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
    }
}

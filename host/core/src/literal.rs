//! Constants as written in the configuration: TOML values of a type, durations, field paths.

use crate::value::{AttrType, Value};

/// A duration that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    #[error("`{0}` is not a duration like 30s, 15m, 2h or 7d")]
    Unreadable(String),
    #[error("`{0}` must be positive and not absurdly long")]
    OutOfRange(String),
}

/// Parses a duration like `500ms`, `30s`, `15m`, `2h` or `7d` into milliseconds.
pub fn parse_duration(s: &str) -> Result<i64, DurationError> {
    let d = humantime::parse_duration(s.trim()).map_err(|_| DurationError::Unreadable(s.to_string()))?;
    match i64::try_from(d.as_millis()) {
        Ok(ms) if ms > 0 => Ok(ms),
        _ => Err(DurationError::OutOfRange(s.to_string())),
    }
}

pub fn is_identifier(s: &str) -> bool {
    !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

pub fn parse_event_path(s: &str) -> Option<Vec<String>> {
    let parts: Vec<String> = s.split('.').map(str::to_string).collect();
    parts.iter().all(|p| !p.is_empty()).then_some(parts)
}

/// A constant of the given type from its TOML form.
pub fn literal(v: &toml::Value, ty: AttrType) -> Result<Value, String> {
    match (ty, v) {
        (AttrType::String, toml::Value::String(s)) => Ok(Value::String(s.clone())),
        (AttrType::Number, toml::Value::Integer(i)) => Ok(Value::Number(*i as f64)),
        (AttrType::Number, toml::Value::Float(f)) => Ok(Value::Number(*f)),
        (AttrType::Boolean | AttrType::Badge, toml::Value::Boolean(b)) => Ok(Value::Boolean(*b)),
        (AttrType::Date, toml::Value::String(s)) => crate::time::parse_rfc3339(s)
            .map(Value::Date)
            .ok_or_else(|| format!("`{s}` is not an RFC 3339 date like 2024-05-01T00:00:00Z")),
        (AttrType::Date, toml::Value::Datetime(d)) => crate::time::parse_rfc3339(&d.to_string())
            .map(Value::Date)
            .ok_or_else(|| format!("`{d}` needs a date, a time and an offset")),
        (AttrType::VisitorId, toml::Value::String(s)) => Ok(Value::String(s.clone())),
        (
            AttrType::SetOfStrings | AttrType::ArrayOfStrings | AttrType::ArrayOfNumbers | AttrType::ArrayOfBooleans,
            toml::Value::Array(items),
        ) => {
            let element = ty.element().expect("collections have elements");
            let values = items.iter().map(|i| literal(i, element)).collect::<Result<Vec<_>, _>>()?;
            Ok(Value::collection(ty, values))
        }
        (ty, other) => Err(format!("expected a {} value, found {}", ty.name(), other.type_str())),
    }
}

pub fn untyped_literal(v: &toml::Value) -> Result<Value, String> {
    match v {
        toml::Value::String(s) => Ok(Value::String(s.clone())),
        toml::Value::Integer(i) => Ok(Value::Number(*i as f64)),
        toml::Value::Float(f) => Ok(Value::Number(*f)),
        toml::Value::Boolean(b) => Ok(Value::Boolean(*b)),
        other => Err(format!("expected a string, number or boolean, found {}", other.type_str())),
    }
}

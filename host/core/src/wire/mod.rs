//! The wire formats of tracking code people already run, read into events: Segment's HTTP
//! Tracking API (spoken by Segment's and RudderStack's libraries) and Tealium's Collect API.

pub mod segment;
pub mod tealium;

use crate::value::json_kind_phrase;
use serde_json::Value;

/// An optional string field; numbers are taken as their text (libraries send numeric ids).
fn optional_id(obj: &serde_json::Map<String, Value>, at: &str, field: &str) -> Result<Option<String>, String> {
    match obj.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.is_empty() => Ok(None),
        Some(Value::String(s)) if s.chars().count() > crate::ingest::MAX_ID_CHARS => {
            Err(format!("{at}{field}: longer than {} characters", crate::ingest::MAX_ID_CHARS))
        }
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(Value::Number(n)) => Ok(Some(n.to_string())),
        Some(other) => Err(format!("{at}{field}: expected a string, found {}", json_kind_phrase(other))),
    }
}

//! Conversions between the domain core's types and the WIT types plugins see.

use crate::types;
use starling_core::{Event, Profile, Value};

pub fn value_to_wit(v: &Value) -> types::AttributeValue {
    match v {
        Value::String(s) => types::AttributeValue::Text(s.clone()),
        Value::Number(n) => types::AttributeValue::Number(*n),
        Value::Boolean(b) => types::AttributeValue::Boolean(*b),
        Value::Date(ms) => types::AttributeValue::Date(*ms),
        Value::Set(s) => types::AttributeValue::StringSet(s.iter().cloned().collect()),
    }
}

/// The core value for a WIT value, or the name of a kind the core does not store.
pub fn value_from_wit(v: types::AttributeValue) -> Result<Value, &'static str> {
    match v {
        types::AttributeValue::Text(s) => Ok(Value::String(s)),
        types::AttributeValue::Number(n) => Ok(Value::Number(n)),
        types::AttributeValue::Boolean(b) => Ok(Value::Boolean(b)),
        types::AttributeValue::Date(ms) => Ok(Value::Date(ms)),
        types::AttributeValue::StringSet(s) => Ok(Value::Set(s.into_iter().collect())),
        types::AttributeValue::StringArray(_) => Err("string-array"),
        types::AttributeValue::NumberArray(_) => Err("number-array"),
        types::AttributeValue::BooleanArray(_) => Err("boolean-array"),
        types::AttributeValue::Tally(_) => Err("tally"),
        types::AttributeValue::Timeline(_) => Err("timeline"),
        types::AttributeValue::Json(_) => Err("json"),
    }
}

pub fn event_to_wit(e: &Event) -> types::Event {
    types::Event {
        id: e.id.clone(),
        name: e.name.clone(),
        visitor_id: e.visitor_id.clone(),
        timestamp_ms: e.timestamp_ms,
        data_json: serde_json::Value::Object(e.data.clone()).to_string(),
    }
}

pub fn profile_to_wit(p: &Profile) -> types::ProfileView {
    let mut attributes: Vec<types::Attribute> = starling_core::config::PRELOADED
        .iter()
        .filter_map(|(name, _)| {
            p.get(name).map(|v| types::Attribute { name: name.to_string(), value: value_to_wit(&v) })
        })
        .collect();
    attributes
        .extend(p.attributes.iter().map(|(name, v)| types::Attribute { name: name.clone(), value: value_to_wit(v) }));
    types::ProfileView {
        id: p.id.clone(),
        attributes,
        badges: p.badges.iter().cloned().collect(),
        audiences: p.audiences.iter().cloned().collect(),
    }
}

/// Converts an enricher's updates; an update of a kind the core cannot store is an error.
pub fn updates_from_wit(updates: Vec<types::AttributeUpdate>) -> Result<Vec<(String, Option<Value>)>, String> {
    updates
        .into_iter()
        .map(|u| match u.value {
            None => Ok((u.name, None)),
            Some(v) => value_from_wit(v)
                .map(|v| (u.name.clone(), Some(v)))
                .map_err(|kind| format!("attribute `{}`: {kind} values are not supported", u.name)),
        })
        .collect()
}

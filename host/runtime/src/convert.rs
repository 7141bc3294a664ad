//! Conversions between the domain core's types and the WIT types plugins see.

use crate::types;
use starling_core::value::TimelineEntry;
use starling_core::{Event, Profile, Value};

pub fn value_to_wit(v: &Value) -> types::AttributeValue {
    use types::AttributeValue as W;
    match v {
        Value::String(s) => W::Text(s.clone()),
        Value::Number(n) => W::Number(*n),
        Value::Boolean(b) => W::Boolean(*b),
        Value::Date(ms) => W::Date(*ms),
        Value::Set(s) => W::StringSet(s.iter().cloned().collect()),
        Value::Strings(v) => W::StringArray(v.clone()),
        Value::Numbers(v) => W::NumberArray(v.clone()),
        Value::Booleans(v) => W::BooleanArray(v.clone()),
        Value::Tally(t) => W::Tally(t.iter().map(|(k, v)| (k.clone(), *v)).collect()),
        Value::Timeline(entries) => W::Timeline(
            entries
                .iter()
                .map(|e| types::TimelineEntry {
                    at_ms: e.at_ms,
                    data_json: serde_json::to_string(&e.data).unwrap_or_default(),
                })
                .collect(),
        ),
        Value::Funnel(f) => W::Json(serde_json::to_string(f).unwrap_or_default()),
    }
}

/// The core value for a WIT value, or why it cannot be one.
pub fn value_from_wit(v: types::AttributeValue) -> Result<Value, String> {
    use types::AttributeValue as W;
    Ok(match v {
        W::Text(s) => Value::String(s),
        W::Number(n) => Value::Number(n),
        W::Boolean(b) => Value::Boolean(b),
        W::Date(ms) => Value::Date(ms),
        W::StringSet(s) => Value::Set(s.into_iter().collect()),
        W::StringArray(v) => Value::Strings(v),
        W::NumberArray(v) => Value::Numbers(v),
        W::BooleanArray(v) => Value::Booleans(v),
        W::Tally(pairs) => Value::Tally(pairs.into_iter().collect()),
        W::Timeline(entries) => Value::Timeline(
            entries
                .into_iter()
                .map(|e| {
                    let data = serde_json::from_str(&e.data_json)
                        .map_err(|err| format!("timeline entry data is not a JSON object: {err}"))?;
                    Ok(TimelineEntry { at_ms: e.at_ms, data })
                })
                .collect::<Result<_, String>>()?,
        ),
        W::Json(text) => {
            Value::Funnel(serde_json::from_str(&text).map_err(|err| format!("not a funnel state: {err}"))?)
        }
    })
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

/// The profile as an enricher sees it: every attribute, or only those named in `reads`.
pub fn profile_to_wit(p: &Profile, reads: Option<&[String]>) -> types::ProfileView {
    let attribute =
        |name: &str| p.get(name).map(|v| types::Attribute { name: name.to_string(), value: value_to_wit(&v) });
    let attributes = match reads {
        Some(names) => names.iter().filter_map(|name| attribute(name)).collect(),
        None => {
            let mut all: Vec<types::Attribute> =
                starling_core::attribute::Preloaded::ALL.iter().filter_map(|p| attribute(p.name())).collect();
            all.extend(
                p.attributes.iter().map(|(name, v)| types::Attribute { name: name.clone(), value: value_to_wit(v) }),
            );
            all
        }
    };
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
            Some(v) => {
                value_from_wit(v).map(|v| (u.name.clone(), Some(v))).map_err(|e| format!("attribute `{}`: {e}", u.name))
            }
        })
        .collect()
}

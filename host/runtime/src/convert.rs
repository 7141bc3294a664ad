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
        source: e.source.clone(),
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
        visit: types::Visit {
            number: p.visit_count.try_into().unwrap_or(u32::MAX),
            started_at_ms: p.visit_start_ms,
            event_count: p.visit_event_count.try_into().unwrap_or(u32::MAX),
            ended: p.visit_ended,
        },
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

/// The same values as `starling:plugin@0.1.0` has them, for components built against it.
pub(crate) mod v1 {
    use super::types;
    use crate::bindings::v1::types as old;

    fn value(v: types::AttributeValue) -> old::AttributeValue {
        use types::AttributeValue as W;
        match v {
            W::Text(s) => old::AttributeValue::Text(s),
            W::Number(n) => old::AttributeValue::Number(n),
            W::Boolean(b) => old::AttributeValue::Boolean(b),
            W::Date(ms) => old::AttributeValue::Date(ms),
            W::StringSet(s) => old::AttributeValue::StringSet(s),
            W::StringArray(v) => old::AttributeValue::StringArray(v),
            W::NumberArray(v) => old::AttributeValue::NumberArray(v),
            W::BooleanArray(v) => old::AttributeValue::BooleanArray(v),
            W::Tally(t) => old::AttributeValue::Tally(t),
            W::Timeline(entries) => old::AttributeValue::Timeline(
                entries.into_iter().map(|e| old::TimelineEntry { at_ms: e.at_ms, data_json: e.data_json }).collect(),
            ),
            W::Json(text) => old::AttributeValue::Json(text),
        }
    }

    fn value_back(v: old::AttributeValue) -> types::AttributeValue {
        use old::AttributeValue as O;
        match v {
            O::Text(s) => types::AttributeValue::Text(s),
            O::Number(n) => types::AttributeValue::Number(n),
            O::Boolean(b) => types::AttributeValue::Boolean(b),
            O::Date(ms) => types::AttributeValue::Date(ms),
            O::StringSet(s) => types::AttributeValue::StringSet(s),
            O::StringArray(v) => types::AttributeValue::StringArray(v),
            O::NumberArray(v) => types::AttributeValue::NumberArray(v),
            O::BooleanArray(v) => types::AttributeValue::BooleanArray(v),
            O::Tally(t) => types::AttributeValue::Tally(t),
            O::Timeline(entries) => types::AttributeValue::Timeline(
                entries.into_iter().map(|e| types::TimelineEntry { at_ms: e.at_ms, data_json: e.data_json }).collect(),
            ),
            O::Json(text) => types::AttributeValue::Json(text),
        }
    }

    /// 0.1.0 has no event source.
    pub(crate) fn event(e: &types::Event) -> old::Event {
        old::Event {
            id: e.id.clone(),
            name: e.name.clone(),
            visitor_id: e.visitor_id.clone(),
            timestamp_ms: e.timestamp_ms,
            data_json: e.data_json.clone(),
        }
    }

    /// 0.1.0 has no visit summary.
    pub(crate) fn profile(p: &types::ProfileView) -> old::ProfileView {
        old::ProfileView {
            id: p.id.clone(),
            attributes: p
                .attributes
                .iter()
                .map(|a| old::Attribute { name: a.name.clone(), value: value(a.value.clone()) })
                .collect(),
            badges: p.badges.clone(),
            audiences: p.audiences.clone(),
        }
    }

    pub(crate) fn updates(updates: Vec<old::AttributeUpdate>) -> Vec<types::AttributeUpdate> {
        updates.into_iter().map(|u| types::AttributeUpdate { name: u.name, value: u.value.map(value_back) }).collect()
    }

    /// 0.1.0 shows a deletion as leaving.
    pub(crate) fn action(a: &types::Action) -> old::Action {
        let trigger = match a.trigger {
            types::Trigger::Joined => old::Trigger::Joined,
            types::Trigger::Left | types::Trigger::Deleted => old::Trigger::Left,
            types::Trigger::VisitStarted => old::Trigger::VisitStarted,
            types::Trigger::VisitEnded => old::Trigger::VisitEnded,
            types::Trigger::Event => old::Trigger::Event,
        };
        old::Action {
            idempotency_key: a.idempotency_key.clone(),
            name: a.name.clone(),
            trigger,
            audience: a.audience.clone(),
            profile_id: a.profile_id.clone(),
            occurred_at_ms: a.occurred_at_ms,
            settings: a.settings.clone(),
            params: a.params.iter().map(|(k, v)| (k.clone(), value(v.clone()))).collect(),
        }
    }

    pub(crate) fn delivery_error(e: old::DeliveryError) -> types::DeliveryError {
        match e {
            old::DeliveryError::Retryable(m) => types::DeliveryError::Retryable(m),
            old::DeliveryError::Permanent(m) => types::DeliveryError::Permanent(m),
            old::DeliveryError::RateLimited(r) => types::DeliveryError::RateLimited(types::RateLimited {
                retry_after_ms: r.retry_after_ms,
                message: r.message,
            }),
        }
    }

    pub(crate) fn connector_info(info: old::ConnectorInfo) -> types::ConnectorInfo {
        let parameters = |list: Vec<old::Parameter>| {
            list.into_iter()
                .map(|p| types::Parameter { name: p.name, description: p.description, required: p.required })
                .collect()
        };
        types::ConnectorInfo {
            description: info.description,
            settings: parameters(info.settings),
            params: parameters(info.params),
        }
    }
}

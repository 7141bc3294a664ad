//! Segment's HTTP Tracking API: `/v1/batch` and the single calls (`/v1/track`, `/v1/t`, ...).
//!
//! A message becomes one event: `track` messages are named by their `event`, the other types by
//! the type (`page`, `screen`, `identify`, `group`, `alias`). The visitor is the `anonymousId`
//! (else `previousId` for an alias, else the `userId`); `messageId` is the event id; the message's
//! other fields (`properties`, `traits`, `context`, `userId`, `name`, `groupId`, ...) are the
//! event's data, read as `properties.price`, `context.page.url`. The time is corrected for the
//! client's clock as Segment documents: `received - (sentAt - timestamp)`.

use super::optional_id;
use crate::Event;
use crate::value::json_kind_phrase;
use serde_json::value::RawValue;
use serde_json::{Map, Value};
use std::collections::HashMap;

/// Largest message, as Segment allows.
pub const MAX_MESSAGE_BYTES: usize = 32 * 1024;
/// Largest batch, as Segment allows.
pub const MAX_BATCH_BYTES: usize = 500 * 1024;
/// The data field holding a message's `userId`.
pub const USER_ID_FIELD: &str = "userId";
/// Fields that describe the message rather than the visitor: not copied into the event's data.
const BOOKKEEPING: [&str; 8] =
    ["messageId", "timestamp", "originalTimestamp", "sentAt", "receivedAt", "writeKey", "integrations", "_metadata"];

/// The call a request makes, from its path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Call {
    Batch,
    Track,
    Identify,
    Page,
    Screen,
    Group,
    Alias,
}

impl Call {
    /// The call for a path's last segment: the full names and analytics.js's short forms.
    pub fn from_path(segment: &str) -> Option<Call> {
        Some(match segment {
            "batch" | "b" | "import" => Call::Batch,
            "track" | "t" => Call::Track,
            "identify" | "i" => Call::Identify,
            "page" | "p" => Call::Page,
            "screen" | "s" => Call::Screen,
            "group" | "g" => Call::Group,
            "alias" | "a" => Call::Alias,
            _ => return None,
        })
    }

    fn from_type(name: &str) -> Option<Call> {
        Some(match name {
            "track" => Call::Track,
            "identify" => Call::Identify,
            "page" => Call::Page,
            "screen" => Call::Screen,
            "group" => Call::Group,
            "alias" => Call::Alias,
            _ => return None,
        })
    }

    fn type_name(self) -> &'static str {
        match self {
            Call::Batch => "batch",
            Call::Track => "track",
            Call::Identify => "identify",
            Call::Page => "page",
            Call::Screen => "screen",
            Call::Group => "group",
            Call::Alias => "alias",
        }
    }
}

/// A request read: its events and the write key its body names, if any.
#[derive(Debug)]
pub struct Request {
    pub events: Vec<Event>,
    pub write_key: Option<String>,
}

/// Reads a request body (already decompressed) for `call`, received at `received_ms`.
pub fn parse(body: &[u8], call: Call, received_ms: i64) -> Result<Request, String> {
    if body.len() > MAX_BATCH_BYTES {
        return Err(format!("the request is {} bytes; a batch may have at most {MAX_BATCH_BYTES}", body.len()));
    }
    if call != Call::Batch {
        if body.len() > MAX_MESSAGE_BYTES {
            return Err(format!("the message is {} bytes; a message may have at most {MAX_MESSAGE_BYTES}", body.len()));
        }
        let Value::Object(top) = serde_json::from_slice(body).map_err(|e| malformed(&e))? else {
            return Err("the body must be a JSON object".into());
        };
        let write_key = optional_id(&top, "", "writeKey")?;
        let event = message(top, call, "", None, None, received_ms)?;
        return Ok(Request { events: vec![event], write_key });
    }
    // Messages stay raw until each is read, so that each one's size is the bytes it was sent as.
    let top: HashMap<String, &RawValue> = serde_json::from_slice(body)
        .map_err(|e| if e.is_data() { "the body must be a JSON object".to_string() } else { malformed(&e) })?;
    // A raw value reads as the value it was checked to be.
    let field = |name: &str| top.get(name).and_then(|raw| serde_json::from_str::<Value>(raw.get()).ok());
    let batch_fields: Map<String, Value> =
        ["writeKey", "sentAt"].into_iter().filter_map(|name| Some((name.to_string(), field(name)?))).collect();
    let write_key = optional_id(&batch_fields, "", "writeKey")?;
    let items: Vec<&RawValue> = match top.get("batch") {
        None => return Err("batch: missing field".into()),
        Some(raw) => serde_json::from_str(raw.get()).map_err(|_| match field("batch") {
            Some(Value::Null) | None => "batch: missing field".to_string(),
            Some(other) => format!("batch: expected an array, found {}", json_kind_phrase(&other)),
        })?,
    };
    if items.is_empty() {
        return Err("batch: the batch is empty".into());
    }
    if items.len() > crate::ingest::MAX_EVENTS_PER_REQUEST {
        return Err(format!(
            "batch: {} messages, at most {} per request",
            items.len(),
            crate::ingest::MAX_EVENTS_PER_REQUEST
        ));
    }
    let sent_at = time_field(&batch_fields, "", "sentAt")?;
    let context = match field("context") {
        None | Some(Value::Null) => None,
        Some(Value::Object(c)) => Some(c),
        Some(other) => return Err(format!("context: expected an object, found {}", json_kind_phrase(&other))),
    };
    let events = items
        .into_iter()
        .enumerate()
        .map(|(i, raw)| {
            let at = format!("batch[{i}].");
            let size = raw.get().len();
            if size > MAX_MESSAGE_BYTES {
                return Err(format!(
                    "{}: the message is {size} bytes; a message may have at most {MAX_MESSAGE_BYTES}",
                    at.trim_end_matches('.')
                ));
            }
            let item: Value = serde_json::from_str(raw.get()).map_err(|e| malformed(&e))?;
            let Value::Object(obj) = item else {
                return Err(format!(
                    "{}: expected a message object, found {}",
                    at.trim_end_matches('.'),
                    json_kind_phrase(&item)
                ));
            };
            let call = match obj.get("type") {
                Some(Value::String(t)) => Call::from_type(t).ok_or_else(|| {
                    format!("{at}type: `{t}` is not one of track, identify, page, screen, group, alias")
                })?,
                None | Some(Value::Null) => return Err(format!("{at}type: missing field")),
                Some(other) => return Err(format!("{at}type: expected a string, found {}", json_kind_phrase(other))),
            };
            message(obj, call, &at, sent_at, context.as_ref(), received_ms)
        })
        .collect::<Result<_, _>>()?;
    Ok(Request { events, write_key })
}

fn malformed(e: &serde_json::Error) -> String {
    format!("malformed JSON at line {} column {}: {}", e.line(), e.column(), crate::ingest::strip_position(e))
}

fn message(
    mut obj: Map<String, Value>,
    call: Call,
    at: &str,
    batch_sent_at: Option<i64>,
    batch_context: Option<&Map<String, Value>>,
    received_ms: i64,
) -> Result<Event, String> {
    let anonymous_id = optional_id(&obj, at, "anonymousId")?;
    let user_id = optional_id(&obj, at, USER_ID_FIELD)?;
    let previous_id = if call == Call::Alias { optional_id(&obj, at, "previousId")? } else { None };
    let visitor_id = anonymous_id
        .or(previous_id)
        .or(user_id.clone())
        .ok_or_else(|| format!("{at}anonymousId: missing; a message needs an anonymousId or a userId"))?;
    if let Some(user_id) = user_id {
        // Kept as text, the type of the visitor-id attribute it may set.
        obj.insert(USER_ID_FIELD.into(), Value::String(user_id));
    }
    let name = match call {
        Call::Track => match obj.get("event") {
            Some(Value::String(e)) if !e.trim().is_empty() && e.chars().count() <= crate::ingest::MAX_NAME_CHARS => {
                e.clone()
            }
            Some(Value::String(_)) => {
                return Err(format!("{at}event: must be 1 to {} characters", crate::ingest::MAX_NAME_CHARS));
            }
            None | Some(Value::Null) => return Err(format!("{at}event: missing field (a track call names its event)")),
            Some(other) => return Err(format!("{at}event: expected a string, found {}", json_kind_phrase(other))),
        },
        other => other.type_name().to_string(),
    };
    for field in ["properties", "traits", "context"] {
        match obj.get(field) {
            None | Some(Value::Object(_)) => {}
            Some(Value::Null) => {
                obj.remove(field);
            }
            Some(other) => return Err(format!("{at}{field}: expected an object, found {}", json_kind_phrase(other))),
        }
    }
    let id = optional_id(&obj, at, "messageId")?;
    let client_ms = match time_field(&obj, at, "originalTimestamp")? {
        Some(ms) => Some(ms),
        None => time_field(&obj, at, "timestamp")?,
    };
    let sent_at = time_field(&obj, at, "sentAt")?.or(batch_sent_at);
    let timestamp_ms = match (client_ms, sent_at) {
        (Some(client), Some(sent)) => received_ms - (sent - client),
        (Some(client), None) => client,
        (None, _) => received_ms,
    };
    if let Some(shared) = batch_context {
        match obj.entry("context") {
            serde_json::map::Entry::Vacant(v) => {
                v.insert(Value::Object(shared.clone()));
            }
            serde_json::map::Entry::Occupied(mut o) => {
                if let Value::Object(own) = o.get_mut() {
                    for (k, v) in shared {
                        own.entry(k.clone()).or_insert_with(|| v.clone());
                    }
                }
            }
        }
    }
    // RudderStack's libraries send an identify's traits in `context.traits` only: read alike.
    if call == Call::Identify
        && !obj.contains_key("traits")
        && let Some(traits) = obj.get("context").and_then(|c| c.get("traits")).filter(|t| t.is_object())
    {
        obj.insert("traits".into(), traits.clone());
    }
    for key in BOOKKEEPING {
        obj.remove(key);
    }
    obj.insert("type".into(), Value::String(call.type_name().into()));
    Ok(Event { id, name, visitor_id, source: None, timestamp_ms, data: obj })
}

/// Sets `context.ip` to `ip` (the address the request came from) on events whose message did
/// not give one, as Segment does.
pub fn fill_ip(events: &mut [Event], ip: &str) {
    for event in events {
        let context = event.data.entry("context").or_insert_with(|| Value::Object(Map::new()));
        if let Value::Object(context) = context {
            context.entry("ip").or_insert_with(|| Value::String(ip.to_string()));
        }
    }
}

/// A time field: RFC 3339, or an ISO 8601 time without offset taken as UTC (as some libraries send).
fn time_field(obj: &Map<String, Value>, at: &str, field: &str) -> Result<Option<i64>, String> {
    match obj.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => crate::time::parse_rfc3339(s)
            .or_else(|| {
                chrono::NaiveDateTime::parse_from_str(s, "%Y-%m-%dT%H:%M:%S%.f")
                    .ok()
                    .map(|t| t.and_utc().timestamp_millis())
            })
            .map(Some)
            .ok_or_else(|| format!("{at}{field}: `{s}` is not an ISO 8601 time like 2024-05-01T12:00:00.000Z")),
        Some(other) => Err(format!("{at}{field}: expected an ISO 8601 string, found {}", json_kind_phrase(other))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RECEIVED: i64 = 1_700_000_100_000;

    #[test]
    fn a_batch_becomes_events_named_by_track_or_type_with_ids_and_fields() {
        let body = br#"{"batch": [
            {"type": "page", "anonymousId": "a1", "messageId": "m1", "name": "Home",
             "properties": {"path": "/"}, "context": {"page": {"url": "https://shop.example/"}}},
            {"type": "track", "anonymousId": "a1", "event": "Order Completed", "messageId": "m2",
             "properties": {"revenue": 25.5}, "integrations": {"All": true}},
            {"type": "identify", "anonymousId": "a1", "userId": 42, "traits": {"email": "a@example.com"}},
            {"type": "alias", "previousId": "old", "userId": "u42"},
            {"type": "identify", "anonymousId": "a2", "userId": "u2", "context": {"traits": {"plan": "pro"}}}
        ], "writeKey": "wk", "context": {"library": {"name": "analytics-python"}}}"#;
        let request = parse(body, Call::Batch, RECEIVED).unwrap();
        assert_eq!(request.write_key.as_deref(), Some("wk"));
        let names: Vec<&str> = request.events.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names, ["page", "Order Completed", "identify", "alias", "identify"]);
        let e = &request.events;
        assert_eq!((e[0].id.as_deref(), e[0].visitor_id.as_str()), (Some("m1"), "a1"));
        assert_eq!(e[0].field(&["context".into(), "page".into(), "url".into()]), Some(&"https://shop.example/".into()));
        assert_eq!(e[0].field(&["context".into(), "library".into(), "name".into()]), Some(&"analytics-python".into()));
        assert_eq!(e[1].field(&["properties".into(), "revenue".into()]), Some(&serde_json::json!(25.5)));
        assert!(e[1].data.get("integrations").is_none() && e[1].data.get("messageId").is_none());
        assert_eq!(e[2].data.get("userId"), Some(&"42".into()), "numeric user ids are taken as text");
        assert_eq!(e[2].data.get("type"), Some(&"identify".into()));
        assert_eq!(e[3].visitor_id, "old", "an alias is applied to the previous id's profile");
        assert_eq!(e[4].field(&["traits".into(), "plan".into()]), Some(&"pro".into()), "context.traits as traits");
        assert!(e.iter().all(|e| e.timestamp_ms == RECEIVED), "no times: received");
    }

    #[test]
    fn the_senders_address_fills_a_missing_context_ip() {
        let body = br#"{"batch": [{"type": "page", "anonymousId": "a"},
            {"type": "page", "anonymousId": "b", "context": {"ip": "203.0.113.9"}}]}"#;
        let mut events = parse(body, Call::Batch, RECEIVED).unwrap().events;
        fill_ip(&mut events, "198.51.100.1");
        let ips: Vec<_> = events.iter().map(|e| e.data["context"]["ip"].as_str().unwrap()).collect();
        assert_eq!(ips, ["198.51.100.1", "203.0.113.9"]);
    }

    #[test]
    fn times_are_corrected_for_the_clients_clock() {
        // The client's clock is 1 hour behind: it says it sent at 00:59:59 what it made at 00:59:00.
        let body = br#"{"anonymousId": "a", "event": "x", "timestamp": "2023-11-14T21:14:00Z", "sentAt": "2023-11-14T21:14:59Z"}"#;
        let e = &parse(body, Call::Track, RECEIVED).unwrap().events[0];
        assert_eq!(e.timestamp_ms, RECEIVED - 59_000);
        let batch =
            br#"{"batch": [{"type": "track", "anonymousId": "a", "event": "x", "timestamp": "2023-11-14T21:14:58.5"}],
                         "sentAt": "2023-11-14T21:14:59.000+00:00"}"#;
        assert_eq!(parse(batch, Call::Batch, RECEIVED).unwrap().events[0].timestamp_ms, RECEIVED - 500);
        let unsent = br#"{"anonymousId": "a", "event": "x", "timestamp": "2023-11-14T22:14:00Z"}"#;
        assert_eq!(parse(unsent, Call::Track, RECEIVED).unwrap().events[0].timestamp_ms, 1_700_000_040_000);
    }

    #[test]
    fn bad_messages_are_named_by_position_and_field() {
        let cases: [(&[u8], Call, &str); 9] = [
            (br#"{"batch": [{"type": "track", "anonymousId": "a"}]}"#, Call::Batch, "batch[0].event: missing field"),
            (br#"{"batch": [{"type": "page"}]}"#, Call::Batch, "batch[0].anonymousId: missing"),
            (
                br#"{"batch": [{"type": "page", "anonymousId": "a"}, {"type": "buy"}]}"#,
                Call::Batch,
                "batch[1].type: `buy`",
            ),
            (br#"{"batch": [7]}"#, Call::Batch, "batch[0]: expected a message object, found a number"),
            (br#"{"batch": []}"#, Call::Batch, "batch: the batch is empty"),
            (br#"{"anonymousId": ["a"], "event": "x"}"#, Call::Track, "anonymousId: expected a string, found an array"),
            (br#"{"anonymousId": "a", "timestamp": "yesterday"}"#, Call::Page, "timestamp: `yesterday` is not"),
            (b"{\"anonymousId\": \"a\",\n \"event\": }", Call::Track, "malformed JSON at line 2 column 11"),
            (
                br#"{"batch": [{"type": "page", "anonymousId": "a", "context": 42}]}"#,
                Call::Batch,
                "batch[0].context: expected an object, found a number",
            ),
        ];
        for (body, call, expected) in cases {
            let error = parse(body, call, RECEIVED).unwrap_err();
            assert!(error.starts_with(expected), "{error:?} should start with {expected:?}");
        }
    }

    #[test]
    fn numbers_past_f64_and_deep_nesting_are_errors_not_panics() {
        let huge = br#"{"batch": [{"type": "track", "anonymousId": "a", "event": "x", "properties": {"n": 1e999}}]}"#;
        assert!(parse(huge, Call::Batch, RECEIVED).is_err());
        let deep = format!(
            r#"{{"batch": [{{"type": "page", "anonymousId": "a", "p": {}1{}}}]}}"#,
            "[".repeat(200),
            "]".repeat(200)
        );
        assert!(parse(deep.as_bytes(), Call::Batch, RECEIVED).unwrap_err().contains("recursion limit"));
    }

    #[test]
    fn segments_size_limits_hold() {
        let big = "x".repeat(MAX_MESSAGE_BYTES);
        let one = format!(r#"{{"anonymousId": "a", "event": "x", "properties": {{"p": "{big}"}}}}"#);
        assert!(parse(one.as_bytes(), Call::Track, RECEIVED).unwrap_err().contains("at most 32768"));
        let in_batch = format!(
            r#"{{"batch": [{{"type": "track", "anonymousId": "a", "event": "x", "properties": {{"p": "{big}"}}}}]}}"#
        );
        assert!(parse(in_batch.as_bytes(), Call::Batch, RECEIVED).unwrap_err().starts_with("batch[0]: the message is"));
        let many = format!(
            r#"{{"batch": [{}]}}"#,
            vec![r#"{"type":"page","anonymousId":"a","name":"0123456789012345678901234567890123456789"}"#; 7000]
                .join(",")
        );
        assert!(parse(many.as_bytes(), Call::Batch, RECEIVED).unwrap_err().contains("a batch may have at most 512000"));
    }
}

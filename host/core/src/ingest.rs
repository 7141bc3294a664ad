//! Reading `POST /v1/events` bodies: one event or `{"events": [...]}`, every field checked, with
//! errors that name the field.

use crate::model::OnViolation;
use crate::value::json_kind_phrase;
use crate::{Event, Model};

/// Most events one request may carry.
pub const MAX_EVENTS_PER_REQUEST: usize = 10_000;
pub(crate) const MAX_NAME_CHARS: usize = 200;
pub(crate) const MAX_ID_CHARS: usize = 256;

/// Parses a request body into events, stamping those without a timestamp with `now_ms`.
pub fn parse_events(body: &[u8], now_ms: i64) -> Result<Vec<Event>, String> {
    parse_request(body, now_ms).map(|(events, _)| events)
}

/// How a request's format names its events' fields in refusals and warnings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Naming {
    /// The events' array (`events`; Segment's `batch`), when the request holds several.
    pub list: Option<&'static str>,
    /// What an event's data fields are named under (`data.`; nothing where the event's data is
    /// the message or data layer itself).
    pub data: &'static str,
}

impl Naming {
    /// `POST /v1/events`: `events[3].data.total`, or `data.total` for a single event.
    pub fn native(batch: bool) -> Naming {
        Naming { list: batch.then_some("events"), data: "data." }
    }

    /// Where event `i`'s fields are named from (`events[3].`; nothing for a single event).
    pub fn event(&self, i: usize) -> String {
        self.list.map_or_else(String::new, |list| format!("{list}[{i}]."))
    }
}

/// Checks events against the data source their API key belongs to and against their event
/// specs. Events without a `source` take the key's. Returns the warnings of specs that accept
/// events breaking them, or the first reason to refuse the request, its fields named as
/// `naming` says.
pub fn check_events(
    events: &mut [Event],
    naming: Naming,
    key_source: Option<&str>,
    model: &Model,
) -> Result<Vec<String>, String> {
    let mut warnings = Vec::new();
    for (i, event) in events.iter_mut().enumerate() {
        let at = naming.event(i);
        if let Some(key_source) = key_source {
            match &event.source {
                None => event.source = Some(key_source.to_string()),
                Some(s) if s != key_source => {
                    return Err(format!("{at}source: `{s}` is not the data source of this API key (`{key_source}`)"));
                }
                Some(_) => {}
            }
        }
        if let Some(spec) = model.event_spec(&event.name) {
            let problems = spec.violations(event, naming.data);
            if problems.is_empty() {
                continue;
            }
            let problems: Vec<String> = problems.into_iter().map(|p| format!("{at}{p}")).collect();
            match spec.on_violation {
                OnViolation::Reject => return Err(problems.join("; ")),
                OnViolation::Warn => warnings.extend(problems),
            }
        }
    }
    Ok(warnings)
}

/// Bounds client clocks: an event dated after `now_ms` (its receipt) is applied at `now_ms`,
/// with a warning when it was more than `server.max_clock_skew` ahead, so that no client can
/// date an event into the future (where it would end visits, expire timelines, keep a profile
/// from retention, or leave an audience's time window). An event older than
/// `server.max_event_age` is refused. Returns the warnings and how many times were clamped.
pub fn bound_times(
    events: &mut [Event],
    naming: Naming,
    now_ms: i64,
    model: &Model,
) -> Result<(Vec<String>, u64), String> {
    let (mut warnings, mut clamped) = (Vec::new(), 0);
    for (i, event) in events.iter_mut().enumerate() {
        let at = naming.event(i);
        let written = crate::time::format_rfc3339(event.timestamp_ms);
        if now_ms - event.timestamp_ms > model.max_event_age_ms {
            return Err(format!(
                "{at}timestamp: {written} is older than server.max_event_age allows; import older events with `starling import`"
            ));
        }
        if event.timestamp_ms > now_ms {
            if event.timestamp_ms - now_ms > model.max_clock_skew_ms {
                warnings.push(format!(
                    "{at}timestamp: {written} is ahead of the server's clock by more than server.max_clock_skew; applied at its receipt"
                ));
            }
            event.timestamp_ms = now_ms;
            clamped += 1;
        }
    }
    Ok((warnings, clamped))
}

/// Parses a request body; also says whether it was a batch.
pub fn parse_request(body: &[u8], now_ms: i64) -> Result<(Vec<Event>, bool), String> {
    let value: serde_json::Value = serde_json::from_slice(body)
        .map_err(|e| format!("malformed JSON at line {} column {}: {}", e.line(), e.column(), strip_position(&e)))?;
    let serde_json::Value::Object(mut top) = value else {
        return Err("body must be an event object or {\"events\": [...]}".into());
    };
    if let Some(events) = top.remove("events") {
        if let Some(extra) = top.keys().next() {
            return Err(format!("{extra}: unknown field (a batch has only `events`)"));
        }
        let serde_json::Value::Array(items) = events else {
            return Err("events: expected an array".into());
        };
        if items.is_empty() {
            return Err("events: the batch is empty".into());
        }
        if items.len() > MAX_EVENTS_PER_REQUEST {
            return Err(format!("events: {} events, at most {MAX_EVENTS_PER_REQUEST} per request", items.len()));
        }
        let events = items
            .into_iter()
            .enumerate()
            .map(|(i, item)| parse_event(item, &format!("events[{i}]."), now_ms))
            .collect::<Result<_, _>>()?;
        Ok((events, true))
    } else {
        Ok((vec![parse_event(serde_json::Value::Object(top), "", now_ms)?], false))
    }
}

/// A serde_json error's message without its trailing position (callers say where).
pub fn strip_position(e: &serde_json::Error) -> String {
    let text = e.to_string();
    match text.rfind(" at line ") {
        Some(i) => text[..i].to_string(),
        None => text,
    }
}

fn parse_event(value: serde_json::Value, at: &str, now_ms: i64) -> Result<Event, String> {
    let serde_json::Value::Object(mut obj) = value else {
        return Err(format!("{}: expected an event object", at.trim_end_matches('.')));
    };
    let name = required_string(&mut obj, at, "event", MAX_NAME_CHARS)?;
    let visitor_id = required_string(&mut obj, at, "visitor_id", MAX_ID_CHARS)?;
    let id = match obj.remove("id") {
        None | Some(serde_json::Value::Null) => None,
        Some(serde_json::Value::String(s)) if !s.is_empty() && s.chars().count() <= MAX_ID_CHARS => Some(s),
        Some(serde_json::Value::String(_)) => {
            return Err(format!("{at}id: must be 1 to {MAX_ID_CHARS} characters"));
        }
        Some(other) => return Err(format!("{at}id: expected a string, found {}", json_kind_phrase(&other))),
    };
    let source = match obj.remove("source") {
        None | Some(serde_json::Value::Null) => None,
        Some(serde_json::Value::String(s)) if !s.is_empty() && s.chars().count() <= MAX_NAME_CHARS => Some(s),
        Some(serde_json::Value::String(_)) => {
            return Err(format!("{at}source: must be 1 to {MAX_NAME_CHARS} characters"));
        }
        Some(other) => return Err(format!("{at}source: expected a string, found {}", json_kind_phrase(&other))),
    };
    let timestamp_ms = match obj.remove("timestamp") {
        None | Some(serde_json::Value::Null) => now_ms,
        Some(serde_json::Value::String(s)) => crate::time::parse_rfc3339(&s)
            .ok_or_else(|| format!("{at}timestamp: `{s}` is not an RFC 3339 timestamp like 2024-05-01T12:00:00Z"))?,
        Some(other) => {
            return Err(format!("{at}timestamp: expected an RFC 3339 string, found {}", json_kind_phrase(&other)));
        }
    };
    let data = match obj.remove("data") {
        None | Some(serde_json::Value::Null) => serde_json::Map::new(),
        Some(serde_json::Value::Object(m)) => m,
        Some(other) => return Err(format!("{at}data: expected an object, found {}", json_kind_phrase(&other))),
    };
    if let Some(extra) = obj.keys().next() {
        return Err(format!(
            "{at}{extra}: unknown field (an event has event, visitor_id, id, source, timestamp, data)"
        ));
    }
    Ok(Event { id, name, visitor_id, source, timestamp_ms, data })
}

pub(crate) fn required_string(
    obj: &mut serde_json::Map<String, serde_json::Value>,
    at: &str,
    field: &str,
    max_chars: usize,
) -> Result<String, String> {
    match obj.remove(field) {
        None | Some(serde_json::Value::Null) => Err(format!("{at}{field}: missing field")),
        Some(serde_json::Value::String(s)) if s.trim().is_empty() => Err(format!("{at}{field}: must not be empty")),
        Some(serde_json::Value::String(s)) if s.chars().count() > max_chars => {
            Err(format!("{at}{field}: longer than {max_chars} characters"))
        }
        Some(serde_json::Value::String(s)) => Ok(s),
        Some(other) => Err(format!("{at}{field}: expected a string, found {}", json_kind_phrase(&other))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each format names its fields its own way, and a field's name is never rewritten as text:
    /// a data key that looks like a path stays as it was sent.
    #[test]
    fn refusals_and_warnings_name_fields_as_the_format_does() {
        let model = crate::parse(
            "[[event_spec]]\nevent = \"buy\"\nfields = { total = \"number\" }\n\n\
             [[event_spec]]\nevent = \"look\"\non_violation = \"warn\"\nallow_other_fields = false\nfields = {}\n",
        )
        .unwrap();
        let event = |name: &str, data: serde_json::Value| Event {
            id: None,
            name: name.into(),
            visitor_id: "v".into(),
            source: None,
            timestamp_ms: 0,
            data: data.as_object().unwrap().clone(),
        };
        let buys =
            || vec![event("buy", serde_json::json!({"total": 1})), event("buy", serde_json::json!({"total": "1"}))];
        let refusal = |naming: Naming| check_events(&mut buys(), naming, None, &model).unwrap_err();
        let problem = "total: expected number by the `buy` spec, found a string";
        assert_eq!(refusal(Naming::native(true)), format!("events[1].data.{problem}"));
        assert_eq!(refusal(Naming { list: Some("batch"), data: "" }), format!("batch[1].{problem}"));
        assert_eq!(refusal(Naming { list: Some("events"), data: "" }), format!("events[1].{problem}"));
        let mut one = vec![event("buy", serde_json::json!({"total": "1"}))];
        assert_eq!(check_events(&mut one, Naming::native(false), None, &model).unwrap_err(), format!("data.{problem}"));
        let mut odd = vec![event("look", serde_json::json!({"events[0].data.x": 1}))];
        let warnings = check_events(&mut odd, Naming { list: None, data: "" }, None, &model).unwrap();
        assert_eq!(warnings, ["events[0].data.x: not a field of the `look` spec"]);
    }

    #[test]
    fn one_event_or_a_batch() {
        let one = parse_events(br#"{"event":"view","visitor_id":"a","data":{"x":1}}"#, 7).unwrap();
        assert_eq!((one.len(), one[0].timestamp_ms), (1, 7));
        let two = parse_events(
            br#"{"events":[{"event":"view","visitor_id":"a"},{"event":"buy","visitor_id":"b","id":"e2","timestamp":"1970-01-01T00:00:01Z"}]}"#,
            7,
        )
        .unwrap();
        assert_eq!(two[1].id.as_deref(), Some("e2"));
        assert_eq!(two[1].timestamp_ms, 1_000);
    }

    #[test]
    fn errors_name_the_field() {
        let cases: &[(&[u8], &str)] = &[
            (br#"{"event":"view"}"#, "visitor_id: missing field"),
            (
                br#"{"events":[{"event":"v","visitor_id":"a"},{"event":5,"visitor_id":"b"}]}"#,
                "events[1].event: expected a string, found a number",
            ),
            (br#"{"event":"v","visitor_id":"a","data":[1]}"#, "data: expected an object, found an array"),
            (
                br#"{"event":"v","visitor_id":"a","timestamp":"soon"}"#,
                "timestamp: `soon` is not an RFC 3339 timestamp like 2024-05-01T12:00:00Z",
            ),
            (
                br#"{"event":"v","visitor_id":"a","colour":1}"#,
                "colour: unknown field (an event has event, visitor_id, id, source, timestamp, data)",
            ),
            (br#"{"events":{}}"#, "events: expected an array"),
            (b"{\"event\":\"v\",\n\"visitor_id\": }", "malformed JSON at line 2 column 15: expected value"),
        ];
        for (body, expected) in cases {
            assert_eq!(parse_events(body, 0).unwrap_err(), *expected);
        }
    }
}

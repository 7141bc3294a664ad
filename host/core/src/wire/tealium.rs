//! Tealium's Collect API: `POST /event` (a flat JSON data layer), `GET /event?...` (the same as a
//! query string, the pixel form) and `POST /bulk-event` (`{"shared": {...}, "events": [...]}`).
//!
//! `tealium_account`, `tealium_profile` and `tealium_datasource` name the data source,
//! `tealium_event` the event, `tealium_visitor_id` (or `tealium_vid`) the visitor, and
//! `tealium_timestamp_epoch` (seconds) its time when given; every other key is an event field.
//!
//! Tealium's libraries give every event a random number, `tealium_random` (16 digits), which a
//! retried request repeats: with the event's place in the request, it is the event's id, so a
//! request sent again is applied once. A client sending its own data layer sends a fresh one per
//! event, or none (its events then have no id).

use super::optional_id;
use crate::Event;
use crate::value::json_kind_phrase;
use serde_json::{Map, Value};

/// Keys that say where an event goes rather than what happened: not copied into its data.
const ROUTING: [&str; 7] = [
    "tealium_account",
    "tealium_profile",
    "tealium_datasource",
    "tealium_event",
    "tealium_visitor_id",
    "tealium_vid",
    "tealium_timestamp_epoch",
];

/// A Collect request read: the account, profile and data source it names, and its events.
#[derive(Debug)]
pub struct Collect {
    pub account: String,
    pub profile: String,
    pub datasource: Option<String>,
    pub events: Vec<Event>,
}

/// Reads the JSON body of `POST /event`.
pub fn parse_event(body: &[u8], received_ms: i64) -> Result<Collect, String> {
    let layer = object(body)?;
    let (account, profile, datasource) = route(&layer, "")?;
    let event = event(layer, 0, "", received_ms)?;
    Ok(Collect { account, profile, datasource, events: vec![event] })
}

/// Reads the query string of `GET /event`: every value a string, as the pixel sends it.
pub fn parse_query(pairs: impl IntoIterator<Item = (String, String)>, received_ms: i64) -> Result<Collect, String> {
    let layer: Map<String, Value> = pairs.into_iter().map(|(k, v)| (k, Value::String(v))).collect();
    let (account, profile, datasource) = route(&layer, "")?;
    let event = event(layer, 0, "", received_ms)?;
    Ok(Collect { account, profile, datasource, events: vec![event] })
}

/// Reads the JSON body of `POST /bulk-event`: each event is the shared data layer overlaid by its own.
pub fn parse_bulk(body: &[u8], received_ms: i64) -> Result<Collect, String> {
    let mut top = object(body)?;
    let shared = match top.remove("shared") {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(m)) => m,
        Some(other) => return Err(format!("shared: expected an object, found {}", json_kind_phrase(&other))),
    };
    let items = match top.remove("events") {
        Some(Value::Array(items)) if items.is_empty() => return Err("events: the batch is empty".into()),
        Some(Value::Array(items)) => items,
        None | Some(Value::Null) => return Err("events: missing field".into()),
        Some(other) => return Err(format!("events: expected an array, found {}", json_kind_phrase(&other))),
    };
    if let Some(extra) = top.keys().next() {
        return Err(format!("{extra}: unknown field (a bulk request has shared and events)"));
    }
    if items.len() > crate::ingest::MAX_EVENTS_PER_REQUEST {
        return Err(format!(
            "events: {} events, at most {} per request",
            items.len(),
            crate::ingest::MAX_EVENTS_PER_REQUEST
        ));
    }
    let mut first_route = None;
    let mut events = Vec::with_capacity(items.len());
    for (i, item) in items.into_iter().enumerate() {
        let at = format!("events[{i}].");
        let Value::Object(own) = item else {
            return Err(format!("events[{i}]: expected an object, found {}", json_kind_phrase(&item)));
        };
        let mut layer = shared.clone();
        layer.extend(own);
        let this_route = route(&layer, &at)?;
        match &first_route {
            None => first_route = Some(this_route),
            Some(first) if *first != this_route => {
                return Err(format!(
                    "{at}tealium_account: every event of a bulk request must name the same account, profile and datasource"
                ));
            }
            Some(_) => {}
        }
        events.push(event(layer, i, &at, received_ms)?);
    }
    let (account, profile, datasource) = first_route.expect("at least one event");
    Ok(Collect { account, profile, datasource, events })
}

fn object(body: &[u8]) -> Result<Map<String, Value>, String> {
    match serde_json::from_slice(body) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(other) => Err(format!("the body must be a JSON object, found {}", json_kind_phrase(&other))),
        Err(e) => Err(format!(
            "malformed JSON at line {} column {}: {}",
            e.line(),
            e.column(),
            crate::ingest::strip_position(&e)
        )),
    }
}

fn route(layer: &Map<String, Value>, at: &str) -> Result<(String, String, Option<String>), String> {
    let required = |field: &str| optional_id(layer, at, field)?.ok_or_else(|| format!("{at}{field}: missing field"));
    Ok((required("tealium_account")?, required("tealium_profile")?, optional_id(layer, at, "tealium_datasource")?))
}

/// The event a data layer describes; `index`: its place in the request.
fn event(mut layer: Map<String, Value>, index: usize, at: &str, received_ms: i64) -> Result<Event, String> {
    let name = optional_id(&layer, at, "tealium_event")?
        .ok_or_else(|| format!("{at}tealium_event: missing field (it names the event)"))?;
    let visitor_id = match optional_id(&layer, at, "tealium_visitor_id")? {
        Some(v) => v,
        None => optional_id(&layer, at, "tealium_vid")?
            .ok_or_else(|| format!("{at}tealium_visitor_id: missing field (it names the visitor)"))?,
    };
    let timestamp_ms = match layer.get("tealium_timestamp_epoch") {
        None | Some(Value::Null) => received_ms,
        Some(Value::Number(n)) => n.as_f64().map(|s| (s * 1000.0) as i64).unwrap_or(received_ms),
        Some(Value::String(s)) => s
            .trim()
            .parse::<f64>()
            .map(|s| (s * 1000.0) as i64)
            .map_err(|_| format!("{at}tealium_timestamp_epoch: `{s}` is not seconds since 1970"))?,
        Some(other) => {
            return Err(format!(
                "{at}tealium_timestamp_epoch: expected seconds since 1970, found {}",
                json_kind_phrase(other)
            ));
        }
    };
    let id = optional_id(&layer, at, "tealium_random")?.map(|random| format!("tealium-{random}-{index}"));
    for key in ROUTING {
        layer.remove(key);
    }
    Ok(Event { id, name, visitor_id, source: None, timestamp_ms, data: layer })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_data_layer_becomes_one_event_and_its_route() {
        let body = br#"{"tealium_account": "acme", "tealium_profile": "main", "tealium_datasource": "ds1",
            "tealium_event": "purchase", "tealium_visitor_id": "v1", "tealium_timestamp_epoch": 1700000000,
            "order_total": 12.5, "tealium_library_name": "python"}"#;
        let c = parse_event(body, 5).unwrap();
        assert_eq!((c.account.as_str(), c.profile.as_str(), c.datasource.as_deref()), ("acme", "main", Some("ds1")));
        let e = &c.events[0];
        assert_eq!((e.name.as_str(), e.visitor_id.as_str(), e.timestamp_ms), ("purchase", "v1", 1_700_000_000_000));
        assert_eq!(e.data.get("order_total"), Some(&serde_json::json!(12.5)));
        assert_eq!(e.data.get("tealium_library_name"), Some(&"python".into()), "other tealium_ keys are fields");
        assert!(e.data.get("tealium_account").is_none() && e.data.get("tealium_event").is_none());
        assert_eq!(e.id, None, "no tealium_random, no id");
    }

    #[test]
    fn tealium_random_and_the_events_place_are_its_id() {
        let body = br#"{"tealium_account": "acme", "tealium_profile": "main", "tealium_event": "view",
            "tealium_visitor_id": "v1", "tealium_random": "4831904726153809"}"#;
        let first = parse_event(body, 5).unwrap();
        assert_eq!(first.events[0].id.as_deref(), Some("tealium-4831904726153809-0"));
        assert_eq!(parse_event(body, 9).unwrap().events[0].id, first.events[0].id, "sent again, the same id");
        // One random shared by a bulk request's events: each keeps its own id.
        let bulk = br#"{"shared": {"tealium_account": "acme", "tealium_profile": "main", "tealium_visitor_id": "v3",
            "tealium_random": 77}, "events": [{"tealium_event": "a"}, {"tealium_event": "b"}]}"#;
        let ids: Vec<_> = parse_bulk(bulk, 9).unwrap().events.into_iter().map(|e| e.id.unwrap()).collect();
        assert_eq!(ids, ["tealium-77-0", "tealium-77-1"]);
        let wrong = br#"{"tealium_account": "acme", "tealium_profile": "main", "tealium_event": "view",
            "tealium_visitor_id": "v1", "tealium_random": [1]}"#;
        assert_eq!(parse_event(wrong, 0).unwrap_err(), "tealium_random: expected a string, found an array");
    }

    #[test]
    fn the_pixel_and_bulk_forms_read_alike() {
        let pairs = [
            ("tealium_account", "acme"),
            ("tealium_profile", "main"),
            ("tealium_event", "view"),
            ("tealium_vid", "v2"),
            ("page", "/a"),
        ];
        let c = parse_query(pairs.map(|(k, v)| (k.to_string(), v.to_string())), 9).unwrap();
        assert_eq!((c.events[0].visitor_id.as_str(), c.events[0].timestamp_ms, c.datasource), ("v2", 9, None));
        let bulk = br#"{"shared": {"tealium_account": "acme", "tealium_profile": "main", "tealium_visitor_id": "v3", "site": "x"},
            "events": [{"tealium_event": "a"}, {"tealium_event": "b", "site": "y"}]}"#;
        let c = parse_bulk(bulk, 9).unwrap();
        let sites: Vec<_> = c.events.iter().map(|e| (e.name.as_str(), e.data["site"].as_str().unwrap())).collect();
        assert_eq!(sites, [("a", "x"), ("b", "y")]);
    }

    #[test]
    fn what_is_missing_or_wrong_is_named() {
        let missing = br#"{"tealium_account": "acme", "tealium_profile": "main", "tealium_visitor_id": "v"}"#;
        assert!(parse_event(missing, 0).unwrap_err().starts_with("tealium_event: missing field"));
        let no_visitor = br#"{"tealium_account": "acme", "tealium_profile": "main", "tealium_event": "x"}"#;
        assert!(parse_event(no_visitor, 0).unwrap_err().starts_with("tealium_visitor_id: missing field"));
        assert!(
            parse_event(br#"{"tealium_profile": "main"}"#, 0)
                .unwrap_err()
                .starts_with("tealium_account: missing field")
        );
        let mixed =
            br#"{"events": [{"tealium_account": "a", "tealium_profile": "p", "tealium_event": "x", "tealium_vid": "v"},
            {"tealium_account": "b", "tealium_profile": "p", "tealium_event": "x", "tealium_vid": "v"}]}"#;
        assert!(parse_bulk(mixed, 0).unwrap_err().starts_with("events[1].tealium_account: every event"));
        assert!(parse_bulk(b"[1]", 0).unwrap_err().contains("found an array"));
    }
}

//! Operating settings read from the configuration: event specs, data sources and their API keys,
//! retention, and offline import definitions.

use crate::event::Event;
use crate::value::json_kind_phrase;

/// The JSON type an event field must have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FieldType {
    String,
    Number,
    Integer,
    Boolean,
    Array,
    Object,
    /// An RFC 3339 string.
    Timestamp,
}

impl FieldType {
    pub const ALL: [FieldType; 7] = [
        FieldType::String,
        FieldType::Number,
        FieldType::Integer,
        FieldType::Boolean,
        FieldType::Array,
        FieldType::Object,
        FieldType::Timestamp,
    ];

    pub fn name(self) -> &'static str {
        match self {
            FieldType::String => "string",
            FieldType::Number => "number",
            FieldType::Integer => "integer",
            FieldType::Boolean => "boolean",
            FieldType::Array => "array",
            FieldType::Object => "object",
            FieldType::Timestamp => "timestamp",
        }
    }

    pub fn parse(s: &str) -> Option<FieldType> {
        FieldType::ALL.into_iter().find(|t| t.name() == s)
    }

    pub fn matches(self, v: &serde_json::Value) -> bool {
        match self {
            FieldType::String => v.is_string(),
            FieldType::Number => v.is_number(),
            FieldType::Integer => v.is_i64() || v.is_u64(),
            FieldType::Boolean => v.is_boolean(),
            FieldType::Array => v.is_array(),
            FieldType::Object => v.is_object(),
            FieldType::Timestamp => v.as_str().and_then(crate::time::parse_rfc3339).is_some(),
        }
    }
}

/// What happens to an event that breaks its spec.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnViolation {
    /// The request is refused (400) and nothing from it is applied.
    Reject,
    /// The event is applied; the problem is reported in the answer, the log and the metrics.
    Warn,
}

/// One field of an event spec: a dotted path inside `data`.
#[derive(Debug, Clone, PartialEq)]
pub struct FieldSpec {
    pub path: Vec<String>,
    pub ty: FieldType,
    pub required: bool,
}

/// A named event type: the fields its `data` must and may carry.
#[derive(Debug, Clone, PartialEq)]
pub struct EventSpec {
    pub event: String,
    pub fields: Vec<FieldSpec>,
    /// Whether fields the spec does not list are allowed (top level of `data`).
    pub allow_other_fields: bool,
    pub on_violation: OnViolation,
}

impl EventSpec {
    /// Every way `event` breaks this spec, each naming the field.
    /// `data`: what the event's data fields are named under (`data.`, or nothing).
    pub fn violations(&self, event: &Event, data: &str) -> Vec<String> {
        let mut problems = Vec::new();
        for field in &self.fields {
            let name = field.path.join(".");
            match event.field(&field.path) {
                None | Some(serde_json::Value::Null) if field.required => {
                    problems.push(format!("{data}{name}: required by the `{}` spec, missing", self.event))
                }
                None | Some(serde_json::Value::Null) => {}
                Some(v) if !field.ty.matches(v) => problems.push(format!(
                    "{data}{name}: expected {} by the `{}` spec, found {}",
                    field.ty.name(),
                    self.event,
                    json_kind_phrase(v)
                )),
                Some(_) => {}
            }
        }
        if !self.allow_other_fields {
            for key in event.data.keys() {
                if !self.fields.iter().any(|f| f.path[0] == *key) {
                    problems.push(format!("{data}{key}: not a field of the `{}` spec", self.event));
                }
            }
        }
        problems
    }
}

/// A data source allowed to send events, and the key it must present.
#[derive(Debug, Clone, PartialEq)]
pub struct DataSource {
    pub name: String,
    pub api_key: String,
    /// The visitor-id attributes this source's events may set; `None`: all of them.
    pub claims: Option<Vec<String>>,
    /// The visitor-id attribute a Segment message's `userId` sets.
    pub segment_user_id: Option<String>,
    /// The Tealium Collect requests this source receives.
    pub tealium: Option<TealiumKey>,
}

/// What a Tealium Collect request names to be taken as a source's: its account, profile and
/// (when given) data source key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TealiumKey {
    pub account: String,
    pub profile: String,
    pub datasource: Option<String>,
}

impl TealiumKey {
    /// Whether a request naming `account`, `profile` and `datasource` belongs to this key.
    pub fn admits(&self, account: &str, profile: &str, datasource: Option<&str>) -> bool {
        self.account == account
            && self.profile == profile
            && (self.datasource.is_none() || self.datasource.as_deref() == datasource)
    }
}

/// `[personalization]`: what a page may read of its own visitor's profile.
#[derive(Debug, Clone, PartialEq)]
pub struct Personalization {
    /// Attributes shown besides audiences and badges.
    pub expose: Vec<String>,
    /// Origins whose pages may read (CORS); none: only same-origin pages.
    pub origins: Vec<String>,
    /// Reads one source key may make per minute.
    pub requests_per_minute: u32,
}

impl Personalization {
    pub const DEFAULT_RATE: u32 = 600;
}

/// Without a `[personalization]` table: nothing exposed, same-origin pages only, at the default
/// rate.
impl Default for Personalization {
    fn default() -> Personalization {
        Personalization { expose: Vec::new(), origins: Vec::new(), requests_per_minute: Personalization::DEFAULT_RATE }
    }
}

/// Profiles inactive for longer than `inactive_after_ms` are deleted, checked every `check_every_ms`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Retention {
    pub inactive_after_ms: i64,
    pub check_every_ms: i64,
}

/// What the store keeps of the past: each profile's event history (for unstitch and rebuilds),
/// by age (`retention.events`) and count (`retention.events_per_profile`), and finished
/// actions (`retention.actions_kept`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct History {
    pub events_ms: i64,
    pub events_per_profile: usize,
    pub actions_kept_ms: i64,
}

impl Default for History {
    fn default() -> History {
        History { events_ms: 90 * 86_400_000, events_per_profile: 1_500, actions_kept_ms: 7 * 86_400_000 }
    }
}

/// How rows of an offline file (CSV or JSON lines) become events for omnichannel attributes.
#[derive(Debug, Clone, PartialEq)]
pub struct ImportDef {
    pub name: String,
    /// The event each row becomes; enrichments `when = "event:NAME"` apply it to the profile.
    pub event: String,
    /// The visitor-id attribute whose values the key column holds.
    pub matches: String,
    /// The column holding the visitor id.
    pub key: String,
    /// Typed columns copied into the event's `data`; others are ignored.
    pub columns: Vec<(String, FieldType)>,
    /// A timestamp column giving the event time (default: the time of the import).
    pub timestamp: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(data: serde_json::Value) -> Event {
        Event {
            id: None,
            name: "purchase".into(),
            visitor_id: "v".into(),
            source: None,
            timestamp_ms: 0,
            data: data.as_object().unwrap().clone(),
        }
    }

    #[test]
    fn violations_name_the_field() {
        let spec = EventSpec {
            event: "purchase".into(),
            fields: vec![
                FieldSpec { path: vec!["order_id".into()], ty: FieldType::String, required: true },
                FieldSpec { path: vec!["order".into(), "total".into()], ty: FieldType::Number, required: true },
                FieldSpec { path: vec!["coupon".into()], ty: FieldType::String, required: false },
            ],
            allow_other_fields: false,
            on_violation: OnViolation::Reject,
        };
        assert!(
            spec.violations(&event(serde_json::json!({"order_id": "o1", "order": {"total": 5}})), "data.").is_empty()
        );
        assert_eq!(
            spec.violations(&event(serde_json::json!({"order": {"total": "5"}, "coupon": 3, "x": 1})), "data."),
            vec![
                "data.order_id: required by the `purchase` spec, missing",
                "data.order.total: expected number by the `purchase` spec, found a string",
                "data.coupon: expected string by the `purchase` spec, found a number",
                "data.x: not a field of the `purchase` spec",
            ]
        );
    }
}

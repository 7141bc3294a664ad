//! An incoming event, once validated.

/// A validated incoming event.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Event {
    pub id: Option<String>,
    pub name: String,
    pub visitor_id: String,
    /// The data source that sent it (web, app, ...), which decides its visit timeout.
    pub source: Option<String>,
    pub timestamp_ms: i64,
    /// The event's `data` object.
    pub data: serde_json::Map<String, serde_json::Value>,
}

impl Event {
    /// The value at a dotted path inside `data`.
    pub fn field(&self, path: &[String]) -> Option<&serde_json::Value> {
        let (first, rest) = path.split_first()?;
        rest.iter().try_fold(self.data.get(first)?, |v, key| v.get(key))
    }
}

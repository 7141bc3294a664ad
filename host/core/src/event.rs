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
    /// What deduplication remembers the event by: its id within its data source, so that one
    /// source (a web page's public key) cannot take an id another source will use (a
    /// point-of-sale order number) and have that event dropped as a repeat. `None` without an id.
    pub fn dedup_key(&self) -> Option<String> {
        let id = self.id.as_deref()?;
        Some(match &self.source {
            // A unit separator cannot occur in a source name.
            Some(source) => format!("{source}\u{1f}{id}"),
            None => id.to_string(),
        })
    }

    /// The value at a dotted path inside `data`.
    pub fn field(&self, path: &[String]) -> Option<&serde_json::Value> {
        let (first, rest) = path.split_first()?;
        rest.iter().try_fold(self.data.get(first)?, |v, key| v.get(key))
    }
}

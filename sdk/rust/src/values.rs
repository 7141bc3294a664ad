//! Conveniences over the WIT types.

use crate::{Action, AttributeValue, DeliveryError, ProfileView, RateLimited};

impl Action {
    /// A static setting of the action (for example `url`).
    pub fn setting(&self, name: &str) -> Option<&str> {
        self.settings.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    /// A mapped parameter.
    pub fn param(&self, name: &str) -> Option<&AttributeValue> {
        self.params.iter().find(|(k, _)| k == name).map(|(_, v)| v)
    }

    /// The mapped parameters as a JSON object.
    pub fn params_json(&self) -> serde_json::Value {
        serde_json::Value::Object(self.params.iter().map(|(k, v)| (k.clone(), v.to_json())).collect())
    }
}

impl ProfileView {
    /// The value of an attribute, if the profile has one.
    pub fn attribute(&self, name: &str) -> Option<&AttributeValue> {
        self.attributes.iter().find(|a| a.name == name).map(|a| &a.value)
    }

    /// The attribute as a number, if it is one.
    pub fn number(&self, name: &str) -> Option<f64> {
        match self.attribute(name)? {
            AttributeValue::Number(n) => Some(*n),
            _ => None,
        }
    }
}

impl AttributeValue {
    /// The value as plain JSON (dates as milliseconds since the epoch).
    pub fn to_json(&self) -> serde_json::Value {
        use serde_json::{Value, json};
        match self {
            AttributeValue::Text(s) => Value::String(s.clone()),
            AttributeValue::Number(n) => json!(n),
            AttributeValue::Boolean(b) => Value::Bool(*b),
            AttributeValue::Date(ms) => json!(ms),
            AttributeValue::StringSet(v) | AttributeValue::StringArray(v) => json!(v),
            AttributeValue::NumberArray(v) => json!(v),
            AttributeValue::BooleanArray(v) => json!(v),
            AttributeValue::Tally(entries) => {
                Value::Object(entries.iter().map(|(k, n)| (k.clone(), json!(n))).collect())
            }
            AttributeValue::Timeline(entries) => Value::Array(
                entries
                    .iter()
                    .map(|e| {
                        let data = serde_json::from_str(&e.data_json).unwrap_or(Value::Null);
                        json!({ "at_ms": e.at_ms, "data": data })
                    })
                    .collect(),
            ),
            AttributeValue::Json(s) => serde_json::from_str(s).unwrap_or(Value::Null),
        }
    }
}

impl DeliveryError {
    /// A failure worth retrying later (the host backs off).
    pub fn retryable(message: impl Into<String>) -> Self {
        DeliveryError::Retryable(message.into())
    }

    /// A failure that will not succeed on retry (the action is marked failed).
    pub fn permanent(message: impl Into<String>) -> Self {
        DeliveryError::Permanent(message.into())
    }

    /// The destination asked to wait `retry_after_ms` before the next call.
    pub fn rate_limited(retry_after_ms: u64, message: impl Into<String>) -> Self {
        DeliveryError::RateLimited(RateLimited { retry_after_ms, message: message.into() })
    }

    /// Classifies an HTTP status the usual way: 2xx is success; 429 is rate-limited (honouring
    /// `Retry-After` seconds, default 1 s); 408 and 5xx are retryable; other 4xx are permanent.
    ///
    /// ```
    /// use starling_sdk::DeliveryError;
    ///
    /// assert!(DeliveryError::from_status(204, None).is_ok());
    /// assert!(matches!(DeliveryError::from_status(503, None), Err(DeliveryError::Retryable(m)) if m == "HTTP 503"));
    /// assert!(matches!(DeliveryError::from_status(404, None), Err(DeliveryError::Permanent(m)) if m == "HTTP 404"));
    /// ```
    pub fn from_status(status: u16, retry_after: Option<&str>) -> Result<(), DeliveryError> {
        match status {
            200..=299 => Ok(()),
            429 => {
                let secs = retry_after.and_then(|v| v.trim().parse::<u64>().ok()).unwrap_or(1);
                Err(DeliveryError::rate_limited(secs * 1_000, "HTTP 429 Too Many Requests"))
            }
            408 | 500..=599 => Err(DeliveryError::retryable(format!("HTTP {status}"))),
            _ => Err(DeliveryError::permanent(format!("HTTP {status}"))),
        }
    }
}

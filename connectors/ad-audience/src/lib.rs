//! An ad-audience connector speaking the Marketing API of Meta's custom audiences: visitors
//! joining the audience are added to a custom audience, those leaving are removed, identified
//! only by SHA-256 hashes of their normalised email addresses (and phone numbers, when mapped).
//! Actions delivered together (the action's `batch` setting) go out as one request per custom
//! audience and direction, at most 10,000 people each:
//! `POST {api_base}/{audience_id}/users` to add, `DELETE` to remove, with a JSON body
//! `{"payload": {"schema": ["EMAIL_SHA256", ...], "data": [[hash, ...], ...]}}` and the token
//! in the `Authorization: Bearer` header.
//!
//! Settings: `audience_id` (required). Parameters: `email` (required), `phone` (optional; digits
//! only are kept, with the country code). Configuration: `access_token` (secret), `api_base`.
//! No identifier ever leaves in clear text.

use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use starling_sdk::http::Request;
use starling_sdk::{Action, Connector, ConnectorInfo, DeliveryError, Parameter, Trigger, config, export_connector};
use std::collections::BTreeMap;

/// The API's limit of people per request.
const MAX_PEOPLE: usize = 10_000;

struct AdAudience;

impl Connector for AdAudience {
    fn describe() -> ConnectorInfo {
        let parameter = |name: &str, description: &str, required| Parameter {
            name: name.into(),
            description: description.into(),
            required,
        };
        ConnectorInfo {
            description: "adds and removes hashed identifiers in an ad network's custom audience".into(),
            settings: vec![parameter("audience_id", "the custom audience id", true)],
            params: vec![
                parameter("email", "email address (sent only as a SHA-256 hash)", true),
                parameter("phone", "phone number with country code (sent only as a SHA-256 hash)", false),
            ],
        }
    }

    fn deliver(actions: Vec<Action>) -> Vec<Result<(), DeliveryError>> {
        let mut results: Vec<Result<(), DeliveryError>> = vec![Ok(()); actions.len()];
        let Some(token) = config::get("access_token") else {
            return vec![Err(DeliveryError::permanent("no `access_token` configured")); actions.len()];
        };
        let base = config::get("api_base").unwrap_or_else(|| "https://graph.facebook.com/v19.0".into());
        let with_phone = actions.iter().any(|a| a.param("phone").is_some());
        // (audience, method) → (action index, hashed row).
        let mut requests: BTreeMap<(&str, &str), Vec<(usize, Vec<String>)>> = BTreeMap::new();
        for (i, action) in actions.iter().enumerate() {
            let Some(audience) = action.setting("audience_id") else {
                results[i] = Err(DeliveryError::permanent(format!("action `{}` has no `audience_id`", action.name)));
                continue;
            };
            match row(action, with_phone) {
                Ok(row) => {
                    let method = if matches!(action.trigger, Trigger::Left | Trigger::Deleted) { "DELETE" } else { "POST" };
                    requests.entry((audience, method)).or_default().push((i, row));
                }
                Err(e) => results[i] = Err(e),
            }
        }
        let schema: &[&str] = if with_phone { &["EMAIL_SHA256", "PHONE_SHA256"] } else { &["EMAIL_SHA256"] };
        for ((audience, method), rows) in requests {
            for chunk in rows.chunks(MAX_PEOPLE) {
                let body = json!({
                    "payload": {
                        "schema": schema,
                        "data": chunk.iter().map(|(_, row)| row.clone()).collect::<Vec<_>>(),
                    },
                });
                let url = format!("{}/{audience}/users", base.trim_end_matches('/'));
                let result = Request::new(method, url)
                    .header("authorization", format!("Bearer {token}"))
                    .json(&body)
                    .send()
                    .map_err(DeliveryError::from)
                    .and_then(|response| {
                        response.delivery_result().map_err(|e| {
                            let answer: Value = serde_json::from_slice(&response.body).unwrap_or(Value::Null);
                            let reason = answer["error"]["message"].as_str().unwrap_or("");
                            with_reason(e, response.status, reason)
                        })
                    });
                for (i, _) in chunk {
                    results[*i] = result.clone();
                }
            }
        }
        results
    }
}

/// The hashed identifiers of one person, in schema order.
fn row(action: &Action, with_phone: bool) -> Result<Vec<String>, DeliveryError> {
    let email = match action.param("email").map(|v| v.to_json()) {
        Some(Value::String(email)) if email.contains('@') => email.trim().to_lowercase(),
        _ => return Err(DeliveryError::permanent(format!("profile {} has no email address", action.profile_id))),
    };
    let mut row = vec![sha256(&email)];
    if with_phone {
        let digits: String = match action.param("phone").map(|v| v.to_json()) {
            Some(Value::String(phone)) => phone.chars().filter(char::is_ascii_digit).collect(),
            _ => String::new(),
        };
        // An empty field is sent empty, not hashed: the API ignores it.
        row.push(if digits.is_empty() { String::new() } else { sha256(&digits) });
    }
    Ok(row)
}

fn sha256(text: &str) -> String {
    Sha256::digest(text.as_bytes()).iter().map(|b| format!("{b:02x}")).collect()
}

fn with_reason(error: DeliveryError, status: u16, reason: &str) -> DeliveryError {
    let message = format!("ad API answered {status} {reason}");
    match error {
        DeliveryError::Permanent(_) => DeliveryError::permanent(message),
        DeliveryError::Retryable(_) => DeliveryError::retryable(message),
        DeliveryError::RateLimited(r) => DeliveryError::rate_limited(r.retry_after_ms, message),
    }
}

export_connector!(AdAudience);

//! An email-list connector speaking Mailchimp's Marketing API: a visitor joining the audience is
//! subscribed to a list, leaving unsubscribes them. Actions delivered together (the action's
//! `batch` setting) go out as one "batch subscribe or unsubscribe" request per list:
//! `POST {api_base}/3.0/lists/{list_id}` with `{"members": [...], "update_existing": true}`,
//! at most 500 members per request.
//!
//! Settings: `list_id` (required), `status_on_join` (default `subscribed`; `pending` asks the
//! person to confirm first). Parameters: `email` (required); every other parameter becomes a
//! merge field of the same name (for example `FNAME = "first_name"`).
//! Configuration: `api_key` (secret, sent as HTTP basic auth), `api_base` (default
//! `https://DC.api.mailchimp.com`, DC taken from the key's `-us6` style suffix).
//!
//! Per-member errors in the answer (`errors[].email_address`) fail only those members' actions,
//! permanently; a failed request fails all of its actions (429 with `Retry-After` rate limited,
//! 5xx retried, other 4xx permanent).

use base64::Engine;
use serde_json::{Map, Value, json};
use starling_sdk::http::Request;
use starling_sdk::{Action, Connector, ConnectorInfo, DeliveryError, Parameter, Trigger, config, export_connector};
use std::collections::BTreeMap;

/// The API's limit of members per batch request.
const MAX_MEMBERS: usize = 500;

struct Mailchimp;

impl Connector for Mailchimp {
    fn describe() -> ConnectorInfo {
        let parameter = |name: &str, description: &str, required| Parameter {
            name: name.into(),
            description: description.into(),
            required,
        };
        ConnectorInfo {
            description: "subscribes audience members to an email list and unsubscribes those who leave".into(),
            settings: vec![
                parameter("list_id", "the list (audience) id", true),
                parameter("status_on_join", "subscribed (default) or pending (double opt-in)", false),
            ],
            params: vec![
                parameter("email", "the member's email address", true),
                parameter("MERGE_FIELD", "any other parameter is sent as a merge field of that name", false),
            ],
        }
    }

    fn deliver(actions: Vec<Action>) -> Vec<Result<(), DeliveryError>> {
        let mut results: Vec<Result<(), DeliveryError>> = vec![Ok(()); actions.len()];
        let api = match Api::from_config() {
            Ok(api) => api,
            Err(e) => return vec![Err(e); actions.len()],
        };
        // Members by list, keeping each action's index for its result.
        let mut lists: BTreeMap<&str, Vec<(usize, Value)>> = BTreeMap::new();
        for (i, action) in actions.iter().enumerate() {
            match member(action) {
                Ok((list, member)) => lists.entry(list).or_default().push((i, member)),
                Err(e) => results[i] = Err(e),
            }
        }
        for (list, members) in lists {
            for chunk in members.chunks(MAX_MEMBERS) {
                let outcome = api.batch(list, chunk);
                for (i, result) in outcome {
                    results[i] = result;
                }
            }
        }
        results
    }
}

struct Api {
    base: String,
    authorization: String,
}

impl Api {
    fn from_config() -> Result<Api, DeliveryError> {
        let key = config::get("api_key").ok_or_else(|| DeliveryError::permanent("no `api_key` configured"))?;
        let base = match config::get("api_base") {
            Some(base) => base.trim_end_matches('/').to_string(),
            None => {
                let dc = key.rsplit_once('-').map(|(_, dc)| dc).filter(|dc| !dc.is_empty()).ok_or_else(|| {
                    DeliveryError::permanent("`api_key` has no data-center suffix (like -us6) and no `api_base` is set")
                })?;
                format!("https://{dc}.api.mailchimp.com")
            }
        };
        let credentials = base64::engine::general_purpose::STANDARD.encode(format!("starling:{key}"));
        Ok(Api { base, authorization: format!("Basic {credentials}") })
    }

    /// One batch request; the result of each action in it.
    fn batch(&self, list: &str, members: &[(usize, Value)]) -> Vec<(usize, Result<(), DeliveryError>)> {
        let body = json!({
            "members": members.iter().map(|(_, m)| m.clone()).collect::<Vec<_>>(),
            "update_existing": true,
        });
        let url = format!("{}/3.0/lists/{}", self.base, list);
        let all = |result: Result<(), DeliveryError>| members.iter().map(|(i, _)| (*i, result.clone())).collect();
        let response = match Request::post(url).header("authorization", self.authorization.as_str()).json(&body).send()
        {
            Ok(response) => response,
            Err(e) => return all(Err(e.into())),
        };
        if let Err(e) = response.delivery_result() {
            let detail: Value = serde_json::from_slice(&response.body).unwrap_or(Value::Null);
            let reason = detail["detail"].as_str().or(detail["title"].as_str()).unwrap_or("");
            return all(Err(with_reason(e, response.status, reason)));
        }
        let answer: Value = serde_json::from_slice(&response.body).unwrap_or(Value::Null);
        let refused: BTreeMap<String, String> = answer["errors"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|e| {
                let email = e["email_address"].as_str()?.to_ascii_lowercase();
                let why = [e["error_code"].as_str(), e["error"].as_str()].into_iter().flatten().collect::<Vec<_>>();
                Some((email, why.join(": ")))
            })
            .collect();
        members
            .iter()
            .map(|(i, member)| {
                let email = member["email_address"].as_str().unwrap_or("").to_ascii_lowercase();
                match refused.get(&email) {
                    Some(why) => (*i, Err(DeliveryError::permanent(format!("list refused {email}: {why}")))),
                    None => (*i, Ok(())),
                }
            })
            .collect()
    }
}

/// The list an action is for and the member entry it asks for.
fn member(action: &Action) -> Result<(&str, Value), DeliveryError> {
    let list = action
        .setting("list_id")
        .ok_or_else(|| DeliveryError::permanent(format!("action `{}` has no `list_id` setting", action.name)))?;
    let email = match action.param("email").map(|v| v.to_json()) {
        Some(Value::String(email)) if email.contains('@') => email,
        _ => return Err(DeliveryError::permanent(format!("profile {} has no email address", action.profile_id))),
    };
    let status = match action.trigger {
        Trigger::Left | Trigger::Deleted => "unsubscribed",
        _ => action.setting("status_on_join").unwrap_or("subscribed"),
    };
    let merge_fields: Map<String, Value> = action
        .params
        .iter()
        .filter(|(name, _)| name != "email")
        .map(|(name, value)| (name.clone(), value.to_json()))
        .collect();
    let mut member = json!({ "email_address": email, "status": status, "status_if_new": status });
    if !merge_fields.is_empty() {
        member["merge_fields"] = Value::Object(merge_fields);
    }
    Ok((list, member))
}

fn with_reason(error: DeliveryError, status: u16, reason: &str) -> DeliveryError {
    let message = format!("list API answered {status} {reason}");
    match error {
        DeliveryError::Permanent(_) => DeliveryError::permanent(message),
        DeliveryError::Retryable(_) => DeliveryError::retryable(message),
        DeliveryError::RateLimited(r) => DeliveryError::rate_limited(r.retry_after_ms, message),
    }
}

export_connector!(Mailchimp);

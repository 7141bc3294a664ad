//! A chat connector for Slack-compatible incoming webhooks (Slack, Mattermost, Rocket.Chat):
//! one message per action, `POST`ed as JSON to the webhook URL.
//!
//! Settings: `text` (required), a template where `{audience}`, `{action}`, `{trigger}`,
//! `{profile}` and `{PARAM}` (any mapped parameter) are replaced; optional `channel`,
//! `username` and `icon_emoji` (honoured by webhooks that allow overriding them).
//! Configuration: `webhook_url` (secret), or the action setting `webhook_url`.
//!
//! The payload has the plain `text` (shown in notifications) and the same text as one `mrkdwn`
//! section block. Slack answers `200 ok`; `400 invalid_payload`, `403 action_prohibited`,
//! `404 channel_not_found` and `410 channel_is_archived` are permanent; `429` is rate limited
//! with its `Retry-After`; 5xx are retried.

use serde_json::{Value, json};
use starling_sdk::http::Request;
use starling_sdk::{Action, Connector, ConnectorInfo, DeliveryError, Parameter, Trigger, config, export_connector};

struct Slack;

impl Connector for Slack {
    fn describe() -> ConnectorInfo {
        let setting = |name: &str, description: &str, required| Parameter {
            name: name.into(),
            description: description.into(),
            required,
        };
        ConnectorInfo {
            description: "posts a message to a Slack-compatible incoming webhook".into(),
            settings: vec![
                setting("text", "message template: {audience} {action} {trigger} {profile} {PARAM}", true),
                setting("channel", "channel override, for webhooks that allow it", false),
                setting("username", "sender name override", false),
                setting("icon_emoji", "sender icon override, for example :tada:", false),
            ],
            params: Vec::new(),
        }
    }

    fn deliver(actions: Vec<Action>) -> Vec<Result<(), DeliveryError>> {
        let default_url = config::get("webhook_url");
        actions.iter().map(|a| post(a, default_url.as_deref())).collect()
    }
}

fn post(action: &Action, default_url: Option<&str>) -> Result<(), DeliveryError> {
    let url = action
        .setting("webhook_url")
        .or(default_url)
        .ok_or_else(|| DeliveryError::permanent("no `webhook_url` configured"))?;
    let template = action
        .setting("text")
        .ok_or_else(|| DeliveryError::permanent(format!("action `{}` has no `text` setting", action.name)))?;
    let text = render(template, action);
    let mut payload = json!({
        "text": text,
        "blocks": [{ "type": "section", "text": { "type": "mrkdwn", "text": text } }],
    });
    for key in ["channel", "username", "icon_emoji"] {
        if let Some(value) = action.setting(key) {
            payload[key] = Value::String(value.into());
        }
    }
    let response = Request::post(url).json(&payload).send()?;
    match response.status {
        200..=299 => Ok(()),
        status => {
            let reason = String::from_utf8_lossy(&response.body).chars().take(200).collect::<String>();
            response.delivery_result().map_err(|e| with_reason(e, status, &reason))
        }
    }
}

/// Adds Slack's one-word reason (`invalid_payload`, `channel_not_found`, …) to the error.
fn with_reason(error: DeliveryError, status: u16, reason: &str) -> DeliveryError {
    let message = format!("webhook answered {status} {reason}");
    match error {
        DeliveryError::Permanent(_) => DeliveryError::permanent(message),
        DeliveryError::Retryable(_) => DeliveryError::retryable(message),
        DeliveryError::RateLimited(r) => DeliveryError::rate_limited(r.retry_after_ms, message),
    }
}

/// Replaces `{name}` placeholders; unknown names are left as they are, so a typo shows.
fn render(template: &str, action: &Action) -> String {
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(start) = rest.find('{') {
        out.push_str(&rest[..start]);
        let after = &rest[start + 1..];
        match after.find('}') {
            Some(end) => {
                let name = &after[..end];
                match lookup(name, action) {
                    Some(value) => out.push_str(&escape(&value)),
                    None => out.push_str(&rest[start..start + end + 2]),
                }
                rest = &after[end + 1..];
            }
            None => {
                out.push_str(&rest[start..]);
                rest = "";
            }
        }
    }
    out.push_str(rest);
    out
}

fn lookup(name: &str, action: &Action) -> Option<String> {
    Some(match name {
        "audience" => action.audience.clone(),
        "action" => action.name.clone(),
        "profile" => action.profile_id.clone(),
        "trigger" => trigger_name(action.trigger).into(),
        _ => match action.param(name)?.to_json() {
            Value::String(s) => s,
            Value::Array(items) => items
                .iter()
                .map(|v| v.as_str().map(str::to_string).unwrap_or_else(|| v.to_string()))
                .collect::<Vec<_>>()
                .join(", "),
            other => other.to_string(),
        },
    })
}

/// Slack's mrkdwn reserves `&`, `<` and `>`; values from profiles must not form links or mentions.
fn escape(value: &str) -> String {
    value.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

fn trigger_name(t: Trigger) -> &'static str {
    match t {
        Trigger::Joined => "joined",
        Trigger::Left => "left",
        Trigger::VisitStarted => "visit_started",
        Trigger::VisitEnded => "visit_ended",
        Trigger::Event => "event",
        Trigger::Deleted => "deleted",
    }
}

export_connector!(Slack);

//! The webhook connector: one JSON POST per action.
//!
//! Settings: `url` (required; or the plugin configuration key `url` as a default).
//! Body: the action's mapped parameters as a JSON object.
//! Headers: `idempotency-key` (stable across retries), `x-starling-action`, `x-starling-trigger`,
//! `x-starling-audience`, `x-starling-profile`, and `authorization` from the secret `auth_header`
//! when configured.

use starling_sdk::http::Request;
use starling_sdk::{Action, Connector, ConnectorInfo, DeliveryError, Parameter, Trigger, config, export_connector};

struct Webhook;

impl Connector for Webhook {
    fn describe() -> ConnectorInfo {
        ConnectorInfo {
            description: "POSTs the mapped parameters of each action as a JSON object".into(),
            settings: vec![Parameter {
                name: "url".into(),
                description: "where to POST (http or https)".into(),
                required: true,
            }],
            params: Vec::new(),
        }
    }

    fn deliver(actions: Vec<Action>) -> Vec<Result<(), DeliveryError>> {
        let default_url = config::get("url");
        let auth = config::get("auth_header");
        actions.iter().map(|a| post(a, default_url.as_deref(), auth.as_deref())).collect()
    }
}

fn post(action: &Action, default_url: Option<&str>, auth: Option<&str>) -> Result<(), DeliveryError> {
    let url = action
        .setting("url")
        .or(default_url)
        .ok_or_else(|| DeliveryError::permanent(format!("action `{}` has no `url` setting", action.name)))?;
    let mut request = Request::post(url)
        .header("idempotency-key", action.idempotency_key.as_str())
        .header("x-starling-action", action.name.as_str())
        .header("x-starling-trigger", trigger_name(action.trigger))
        .header("x-starling-audience", action.audience.as_str())
        .header("x-starling-profile", action.profile_id.as_str())
        .json(&action.params_json());
    if let Some(auth) = auth {
        request = request.header("authorization", auth);
    }
    request.send()?.delivery_result()
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

export_connector!(Webhook);

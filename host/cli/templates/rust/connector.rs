//! {{name}}: a Starling connector. POSTs each action's parameters as a JSON object to its `url`
//! setting, with the bearer token from the secret `token` when configured.

use starling_sdk::http::Request;
use starling_sdk::{Action, Connector, ConnectorInfo, DeliveryError, Parameter, config, export_connector};

struct Plugin;

impl Connector for Plugin {
    fn describe() -> ConnectorInfo {
        ConnectorInfo {
            description: "POSTs each action's parameters as JSON".into(),
            settings: vec![Parameter { name: "url".into(), description: "where to POST".into(), required: true }],
            params: Vec::new(),
        }
    }

    fn deliver(actions: Vec<Action>) -> Vec<Result<(), DeliveryError>> {
        let token = config::get("token");
        actions.iter().map(|action| post(action, token.as_deref())).collect()
    }
}

fn post(action: &Action, token: Option<&str>) -> Result<(), DeliveryError> {
    let url = action.setting("url").ok_or_else(|| DeliveryError::permanent("no `url` setting"))?;
    let mut request =
        Request::post(url).header("idempotency-key", action.idempotency_key.as_str()).json(&action.params_json());
    if let Some(token) = token {
        request = request.header("authorization", format!("Bearer {token}"));
    }
    // 2xx: delivered; 408, 5xx and transport errors: retried; 429: after Retry-After; else failed.
    request.send()?.delivery_result()
}

export_connector!(Plugin);

//! `starling plugin test DIR`: builds a plugin and runs the cases of its `tests.toml` against it
//! in the same sandbox the server uses. Enricher cases give an event and a profile and expect
//! attribute updates; connector cases give an action and expect the request a loopback receiver
//! gets and the delivery result.
//!
//! ```toml
//! [config]                      # the plugin's configuration for every case
//! attribute = "last_event"
//!
//! [[case]]                      # an enricher case
//! name = "records the event name"
//! event = { name = "page_view", visitor_id = "v1", data = { path = "/" } }
//! profile = { last_event = "home" }
//! expect = { last_event = "page_view" }
//!
//! [[case]]                      # a connector case; `{receiver}` is the loopback receiver's URL
//! name = "posts the parameters"
//! action = { name = "notify", trigger = "joined", audience = "vip", profile_id = "v1",
//!            settings = { url = "{receiver}/hook" }, params = { email = "ann@example.com" } }
//! respond = 200                 # what the receiver answers (default 200)
//! expect = { method = "POST", path = "/hook", body = { email = "ann@example.com" }, result = "ok" }
//! ```

use anyhow::{Context, Result, anyhow, bail};
use serde::Deserialize;
use serde_json::Value as Json;
use starling_runtime::{Kind, PluginHost, types};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Suite {
    #[serde(default)]
    config: BTreeMap<String, String>,
    #[serde(rename = "case")]
    cases: Vec<Case>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Case {
    name: String,
    event: Option<TestEvent>,
    #[serde(default)]
    profile: BTreeMap<String, toml::Value>,
    action: Option<TestAction>,
    respond: Option<u16>,
    expect: toml::Table,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TestEvent {
    name: String,
    #[serde(default = "default_visitor")]
    visitor_id: String,
    #[serde(default)]
    data: toml::Table,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TestAction {
    name: String,
    #[serde(default = "default_trigger")]
    trigger: String,
    #[serde(default)]
    audience: String,
    #[serde(default = "default_visitor")]
    profile_id: String,
    #[serde(default)]
    settings: BTreeMap<String, String>,
    #[serde(default)]
    params: BTreeMap<String, toml::Value>,
}

fn default_visitor() -> String {
    "visitor-1".into()
}

fn default_trigger() -> String {
    "joined".into()
}

/// A request the loopback receiver got.
#[derive(Debug, Clone)]
struct Got {
    method: String,
    path: String,
    body: Json,
}

pub(crate) fn run(dir: &Path) -> Result<()> {
    let suite_path = dir.join("tests.toml");
    let text = std::fs::read_to_string(&suite_path).with_context(|| format!("reading {}", suite_path.display()))?;
    let suite: Suite = toml::from_str(&text).map_err(|e| anyhow!("{}: {e}", suite_path.display()))?;
    // Built next to `starling plugin build`'s output, so both share the guest tools and caches.
    let out = Path::new("target/plugin-test");
    crate::build::build_all(&[dir.to_path_buf()], out)?;
    let manifest_text = std::fs::read_to_string(dir.join("plugin.toml"))?;
    let manifest = starling_runtime::Manifest::parse(&manifest_text).map_err(|e| anyhow!("plugin.toml:{e}"))?;
    let host = PluginHost::new()?;
    host.load(&out.join(&manifest.name).join("plugin.toml"), suite.config.clone())?;
    let runtime = tokio::runtime::Runtime::new()?;
    let mut failed = 0;
    for case in &suite.cases {
        let outcome = runtime.block_on(run_case(&host, &manifest.name, manifest.kind, case));
        match outcome {
            Ok(()) => println!("ok   {}", case.name),
            Err(e) => {
                failed += 1;
                println!("FAIL {}: {e:#}", case.name);
            }
        }
    }
    if failed > 0 {
        bail!("{failed} of {} cases failed", suite.cases.len());
    }
    println!("{} cases passed", suite.cases.len());
    Ok(())
}

async fn run_case(host: &PluginHost, plugin: &str, kind: Kind, case: &Case) -> Result<()> {
    match (kind, &case.event, &case.action) {
        (Kind::Enricher, Some(event), None) => enricher_case(host, plugin, event, case).await,
        (Kind::Connector, None, Some(action)) => connector_case(host, plugin, action, case).await,
        (Kind::Enricher, _, _) => bail!("an enricher case needs `event` (and no `action`)"),
        (Kind::Connector, _, _) => bail!("a connector case needs `action` (and no `event`)"),
    }
}

async fn enricher_case(host: &PluginHost, plugin: &str, event: &TestEvent, case: &Case) -> Result<()> {
    let data = serde_json::to_value(&event.data)?;
    let event = types::Event {
        id: None,
        name: event.name.clone(),
        visitor_id: event.visitor_id.clone(),
        source: None,
        timestamp_ms: now_ms(),
        data_json: data.to_string(),
    };
    let attributes = case
        .profile
        .iter()
        .map(|(name, value)| Ok(types::Attribute { name: name.clone(), value: to_wit(name, value)? }))
        .collect::<Result<Vec<_>>>()?;
    let visit = types::Visit { number: 1, started_at_ms: event.timestamp_ms, event_count: 1, ended: false };
    let profile =
        types::ProfileView { id: event.visitor_id.clone(), attributes, badges: vec![], audiences: vec![], visit };
    let updates = host.enrich(plugin, &types::Occasion::Event(event), &profile).await?.map_err(|e| anyhow!("{e}"))?;
    let got: BTreeMap<String, Json> =
        updates.iter().map(|u| (u.name.clone(), u.value.as_ref().map_or(Json::Null, from_wit))).collect();
    let expected: BTreeMap<String, Json> =
        case.expect.iter().map(|(k, v)| Ok((k.clone(), normalise(serde_json::to_value(v)?)))).collect::<Result<_>>()?;
    if got != expected {
        bail!("expected updates {}, got {}", Json::from(expected.into_iter().collect::<serde_json::Map<_, _>>()), {
            Json::from(got.into_iter().collect::<serde_json::Map<_, _>>())
        });
    }
    Ok(())
}

async fn connector_case(host: &PluginHost, plugin: &str, action: &TestAction, case: &Case) -> Result<()> {
    let status = case.respond.unwrap_or(200);
    let got: Arc<Mutex<Vec<Got>>> = Arc::default();
    let recorder = got.clone();
    let app = axum::Router::new().fallback(
        move |method: axum::http::Method, uri: axum::http::Uri, body: axum::body::Bytes| {
            let recorder = recorder.clone();
            async move {
                let body = serde_json::from_slice(&body)
                    .unwrap_or_else(|_| Json::String(String::from_utf8_lossy(&body).into_owned()));
                recorder.lock().expect("recorder").push(Got {
                    method: method.to_string(),
                    path: uri.path().into(),
                    body,
                });
                axum::http::StatusCode::from_u16(status).unwrap_or(axum::http::StatusCode::OK)
            }
        },
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let receiver = format!("http://{}", listener.local_addr()?);
    let server = tokio::spawn(async move { axum::serve(listener, app).await });

    let trigger = match action.trigger.as_str() {
        "joined" => types::Trigger::Joined,
        "left" => types::Trigger::Left,
        "visit_started" => types::Trigger::VisitStarted,
        "visit_ended" => types::Trigger::VisitEnded,
        "event" => types::Trigger::Event,
        other => bail!("unknown trigger `{other}`: expected joined, left, visit_started, visit_ended or event"),
    };
    let wit_action = types::Action {
        idempotency_key: format!("{}-1", action.name),
        name: action.name.clone(),
        trigger,
        audience: action.audience.clone(),
        profile_id: action.profile_id.clone(),
        occurred_at_ms: now_ms(),
        settings: action.settings.iter().map(|(k, v)| (k.clone(), v.replace("{receiver}", &receiver))).collect(),
        params: action.params.iter().map(|(k, v)| Ok((k.clone(), to_wit(k, v)?))).collect::<Result<Vec<_>>>()?,
    };
    let results = host.deliver(plugin, std::slice::from_ref(&wit_action)).await.map_err(|e| anyhow!("{e}"));
    server.abort();
    let result = match results?.pop() {
        Some(Ok(())) => "ok".to_string(),
        Some(Err(types::DeliveryError::Retryable(m))) => format!("retryable: {m}"),
        Some(Err(types::DeliveryError::Permanent(m))) => format!("permanent: {m}"),
        Some(Err(types::DeliveryError::RateLimited(r))) => format!("rate-limited: {}", r.message),
        None => bail!("the connector returned no result"),
    };
    let expected_result = case.expect.get("result").and_then(|v| v.as_str()).unwrap_or("ok");
    if !result.starts_with(expected_result) {
        bail!("expected result `{expected_result}`, got `{result}`");
    }
    let requests = got.lock().expect("recorder").clone();
    let wants_request = ["method", "path", "body"].iter().any(|k| case.expect.contains_key(*k));
    if !wants_request {
        return Ok(());
    }
    let [request] = requests.as_slice() else {
        bail!("expected one request at the receiver, got {}", requests.len());
    };
    for (key, got_value) in [
        ("method", Json::String(request.method.clone())),
        ("path", Json::String(request.path.clone())),
        ("body", normalise(request.body.clone())),
    ] {
        if let Some(want) = case.expect.get(key) {
            let want = normalise(serde_json::to_value(want)?);
            if want != got_value {
                bail!("expected {key} {want}, got {got_value}");
            }
        }
    }
    Ok(())
}

/// A TOML value as the attribute value a plugin sees: strings, numbers, booleans, and arrays
/// of strings (a set).
fn to_wit(name: &str, value: &toml::Value) -> Result<types::AttributeValue> {
    use types::AttributeValue as W;
    Ok(match value {
        toml::Value::String(s) => W::Text(s.clone()),
        toml::Value::Integer(i) => W::Number(*i as f64),
        toml::Value::Float(f) => W::Number(*f),
        toml::Value::Boolean(b) => W::Boolean(*b),
        toml::Value::Array(items) => W::StringSet(
            items
                .iter()
                .map(|i| i.as_str().map(str::to_string).ok_or_else(|| anyhow!("`{name}`: only arrays of strings")))
                .collect::<Result<_>>()?,
        ),
        other => bail!("`{name}`: {} values are not supported in tests", other.type_str()),
    })
}

fn from_wit(value: &types::AttributeValue) -> Json {
    use types::AttributeValue as W;
    match value {
        W::Text(s) | W::Json(s) => Json::String(s.clone()),
        W::Number(n) => serde_json::json!(n),
        W::Boolean(b) => Json::Bool(*b),
        W::Date(d) => serde_json::json!(*d as f64),
        W::StringSet(v) | W::StringArray(v) => serde_json::json!(v),
        W::NumberArray(v) => serde_json::json!(v),
        W::BooleanArray(v) => serde_json::json!(v),
        W::Tally(pairs) => Json::Object(pairs.iter().map(|(k, n)| (k.clone(), serde_json::json!(n))).collect()),
        W::Timeline(_) => Json::String("(timeline)".into()),
    }
}

/// Integers and floats compare equal when they are the same number.
fn normalise(value: Json) -> Json {
    match value {
        Json::Number(n) => serde_json::json!(n.as_f64().unwrap_or(f64::NAN)),
        Json::Array(items) => Json::Array(items.into_iter().map(normalise).collect()),
        Json::Object(map) => Json::Object(map.into_iter().map(|(k, v)| (k, normalise(v))).collect()),
        other => other,
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

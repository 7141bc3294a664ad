//! End-to-end tests: the `starling` binary over real loopback HTTP, on a real SQLite file, with
//! components built from this repository's sources, calling loopback receivers.

mod cluster;
mod connectors;
mod delivery;
mod durability;
mod harness;
mod ingestion;
mod operations;
mod plugin_api;
mod reconfigure;
mod registry;
mod scaffold;
mod segments;
mod stitching;

use harness::{Receiver, Server, eventually, get_json, post_json};
use serde_json::json;
use std::path::Path;
use std::time::{Duration, Instant};

/// A shop configuration whose `big_spenders` audience fires the webhook on join.
fn shop_config(dir: &Path, receiver: &str, enrichers: &[&str]) -> std::path::PathBuf {
    let enrichers: String = enrichers.iter().map(|p| format!("[[enricher]]\nplugin = \"{p}\"\n")).collect();
    let text = format!(
        r#"
[server]
database = "starling.db"
plugins = "plugins"

[[attribute]]
name = "email"
scope = "visitor"
type = "string"

[[attribute]]
name = "spend"
scope = "visitor"
type = "number"

[[attribute]]
name = "tier"
scope = "visitor"
type = "string"

[[attribute]]
name = "vip"
scope = "visitor"
type = "badge"

[[attribute]]
name = "last_order"
scope = "visitor"
type = "date"

[[enrichment]]
attribute = "spend"
op = "increment"
event = "total"
when = "event:purchase"

[[enrichment]]
attribute = "email"
op = "set"
event = "email"

[[enrichment]]
attribute = "last_order"
op = "set"
value = "now"
when = "event:purchase"

[[enrichment]]
attribute = "vip"
op = "assign"
if = {{ attribute = "spend", op = ">=", value = 100 }}

{enrichers}
[plugin.value-tier]
spend_attribute = "spend"
tier_attribute = "tier"

[[audience]]
name = "big_spenders"
rule = {{ all = [{{ attribute = "spend", op = ">=", value = 100 }}, {{ attribute = "email", op = "is_assigned" }}] }}

[[action]]
name = "notify"
audience = "big_spenders"
trigger = "joined"
connector = "webhook"
settings = {{ url = "{receiver}/hooks/big" }}
params = {{ email = "email", spend = "spend", tier = "tier", who = "profile_id" }}
"#
    );
    let path = dir.join("starling.toml");
    std::fs::write(&path, text).unwrap();
    std::fs::create_dir_all(dir.join("plugins")).unwrap();
    path
}

fn purchase(visitor: &str, total: f64, email: Option<&str>) -> serde_json::Value {
    let mut data = json!({ "total": total });
    if let Some(e) = email {
        data["email"] = json!(e);
    }
    json!({ "event": "purchase", "visitor_id": visitor, "data": data })
}

#[tokio::test(flavor = "multi_thread")]
async fn an_event_stream_builds_a_profile_joins_an_audience_and_calls_the_webhook_once() {
    let receiver = Receiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let config = shop_config(dir.path(), &receiver.url, &["value-tier"]);
    for name in ["webhook", "value-tier"] {
        harness::install(harness::connectors(), name, &dir.path().join("plugins"), |m| m);
    }
    let server = Server::start(&config);
    let events = format!("{}/v1/events", server.url);

    let (status, body) = post_json(&events, &purchase("anon-42", 60.0, Some("ann@example.com"))).await;
    assert_eq!((status, &body), (202, &json!({"accepted": 1, "duplicates": 0})));
    let (_, profile) = get_json(&format!("{}/v1/profiles/anon-42", server.url)).await;
    assert_eq!(profile["audiences"], json!([]));
    assert_eq!(profile["attributes"]["tier"], "bronze");

    let (status, _) =
        post_json(&events, &json!({"events": [purchase("anon-42", 30.0, None), purchase("anon-42", 15.5, None)]}))
            .await;
    assert_eq!(status, 202);

    let (status, profile) = get_json(&format!("{}/v1/profiles/anon-42", server.url)).await;
    assert_eq!(status, 200);
    assert_eq!(profile["attributes"]["spend"], 105.5);
    assert_eq!(profile["attributes"]["email"], "ann@example.com");
    assert_eq!(profile["attributes"]["tier"], "silver", "set by the Wasm enricher");
    assert!(profile["attributes"]["last_order"].as_str().unwrap().ends_with('Z'));
    assert_eq!(profile["badges"], json!(["vip"]));
    assert_eq!(profile["audiences"], json!(["big_spenders"]));
    assert_eq!(profile["event_count"], 3);

    let got = eventually("the webhook call", Duration::from_secs(20), async || {
        let got = receiver.received();
        (!got.is_empty()).then_some(got)
    })
    .await;
    // More events for a member must not call again.
    post_json(&events, &purchase("anon-42", 1.0, None)).await;
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let got_later = receiver.received();
    assert_eq!(got_later.len(), 1, "exactly one request: {got_later:?}");
    let hook = &got[0];
    assert_eq!((hook.method.as_str(), hook.path.as_str()), ("POST", "/hooks/big"));
    assert_eq!(hook.body, json!({"email": "ann@example.com", "spend": 105.5, "tier": "silver", "who": "anon-42"}));
    assert_eq!(hook.headers["content-type"], "application/json");
    assert_eq!(hook.headers["x-starling-trigger"], "joined");
    assert_eq!(hook.headers["x-starling-audience"], "big_spenders");
    assert!(hook.headers["idempotency-key"].to_str().unwrap().starts_with("notify-"));

    let (_, actions) = get_json(&format!("{}/v1/actions", server.url)).await;
    assert_eq!(actions["actions"][0]["status"], "delivered");
    let (_, audiences) = get_json(&format!("{}/v1/audiences", server.url)).await;
    assert_eq!(audiences["audiences"][0]["size"], 1);
    server.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn profiles_and_memberships_survive_a_restart() {
    let receiver = Receiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let config = shop_config(dir.path(), &receiver.url, &[]);
    harness::install(harness::connectors(), "webhook", &dir.path().join("plugins"), |m| m);

    let server = Server::start(&config);
    let (status, _) =
        post_json(&format!("{}/v1/events", server.url), &purchase("v-1", 250.0, Some("v1@example.com"))).await;
    assert_eq!(status, 202);
    let (_, before) = get_json(&format!("{}/v1/profiles/v-1", server.url)).await;
    server.stop();

    let server = Server::start(&config);
    let (status, after) = get_json(&format!("{}/v1/profiles/v-1", server.url)).await;
    assert_eq!(status, 200);
    assert_eq!(after, before);
    assert_eq!(after["audiences"], json!(["big_spenders"]));
    let (_, audiences) = get_json(&format!("{}/v1/audiences", server.url)).await;
    assert_eq!(audiences["audiences"][0]["size"], 1);
    // The restarted server continues the profile rather than starting a new one.
    post_json(&format!("{}/v1/events", server.url), &purchase("v-1", 1.0, None)).await;
    let (_, continued) = get_json(&format!("{}/v1/profiles/v-1", server.url)).await;
    assert_eq!((continued["event_count"].as_u64(), continued["attributes"]["spend"].as_f64()), (Some(2), Some(251.0)));
    server.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_requests_get_a_clear_error_and_nothing_is_applied() {
    let receiver = Receiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let config = shop_config(dir.path(), &receiver.url, &[]);
    harness::install(harness::connectors(), "webhook", &dir.path().join("plugins"), |m| m);
    let server = Server::start(&config);
    let events = format!("{}/v1/events", server.url);

    let batch =
        json!({"events": [purchase("good-1", 500.0, Some("g@example.com")), {"event": "purchase", "data": {}}]});
    let (status, body) = post_json(&events, &batch).await;
    assert_eq!((status, body["error"].as_str()), (400, Some("events[1].visitor_id: missing field")));

    let (status, body) = post_json(&events, &json!({"event": "purchase", "visitor_id": 7})).await;
    assert_eq!((status, body["error"].as_str()), (400, Some("visitor_id: expected a string, found a number")));

    let r = harness::client()
        .post(&events)
        .header("content-type", "application/json")
        .body("{\"event\": ")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);
    let body: serde_json::Value = r.json().await.unwrap();
    assert!(body["error"].as_str().unwrap().starts_with("malformed JSON at line 1 column 10"), "{body}");

    let huge = json!({"event": "page_view", "visitor_id": "good-1", "data": {"blob": "x".repeat(1024 * 1024)}});
    let r = harness::client().post(&events).json(&huge).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 413);

    let (status, body) = get_json(&format!("{}/v1/profiles/good-1", server.url)).await;
    assert_eq!((status, body["error"].as_str()), (404, Some("no profile for id `good-1`")));
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(receiver.received().is_empty());
    server.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_connector_may_not_call_a_host_its_manifest_does_not_allow() {
    let receiver = Receiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let config = shop_config(dir.path(), &receiver.url, &[]);
    harness::install(harness::connectors(), "webhook", &dir.path().join("plugins"), |manifest| {
        let start = manifest.find("allowed_hosts").expect("manifest lists allowed hosts");
        let end = start + manifest[start..].find('\n').unwrap();
        format!("{}allowed_hosts = [\"https://api.example.com\"]{}", &manifest[..start], &manifest[end..])
    });
    let server = Server::start(&config);
    let (status, _) =
        post_json(&format!("{}/v1/events", server.url), &purchase("v-9", 150.0, Some("v9@example.com"))).await;
    assert_eq!(status, 202);

    let failed = eventually("the action to fail", Duration::from_secs(20), async || {
        let (_, actions) = get_json(&format!("{}/v1/actions?status=failed", server.url)).await;
        actions["actions"].as_array().and_then(|a| a.first().cloned())
    })
    .await;
    let error = failed["last_error"].as_str().unwrap();
    assert!(error.contains("request denied by the host"), "{error}");
    assert!(receiver.received().is_empty(), "no request may reach the receiver");
    assert!(server.logs().contains("is not in the plugin's allowed hosts"), "the host logs the refusal");
    server.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_plugin_that_loops_forever_is_stopped_and_the_server_keeps_answering() {
    let receiver = Receiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let config = shop_config(dir.path(), &receiver.url, &["spin-forever"]);
    harness::install(harness::connectors(), "webhook", &dir.path().join("plugins"), |m| m);
    harness::install(harness::test_plugins(), "spin-forever", &dir.path().join("plugins"), |m| m);
    let server = Server::start(&config);

    let started = Instant::now();
    let (status, body) = post_json(&format!("{}/v1/events", server.url), &purchase("v-loop", 20.0, None)).await;
    let took = started.elapsed();
    assert_eq!((status, &body), (202, &json!({"accepted": 1, "duplicates": 0})));
    assert!(took < Duration::from_secs(5), "the enricher's 100 ms deadline bounds the request: {took:?}");

    let (status, _) = get_json(&format!("{}/healthz", server.url)).await;
    assert_eq!(status, 200);
    let (status, profile) = get_json(&format!("{}/v1/profiles/v-loop", server.url)).await;
    assert_eq!((status, profile["attributes"]["spend"].as_f64()), (200, Some(20.0)));
    assert!(
        server.logs().contains("plugin `spin-forever` exceeded its 100 ms deadline and was stopped"),
        "{}",
        server.logs()
    );
    // And again: the plugin failing does not wedge the pipeline.
    let (status, _) = post_json(&format!("{}/v1/events", server.url), &purchase("v-loop", 5.0, None)).await;
    assert_eq!(status, 202);
    server.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn the_server_refuses_to_start_when_a_plugin_is_missing() {
    let dir = tempfile::tempdir().unwrap();
    let config = shop_config(dir.path(), "http://127.0.0.1:9", &[]);
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_starling"))
        .args(["serve", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("no plugin named `webhook` is installed"), "{stderr}");
}

#[test]
fn config_check_reports_every_error_with_file_line_and_column() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        "[[attribute]]\nname = \"spend\"\nscope = \"visitor\"\ntype = \"numbr\"\n\n[[audience]]\nname = \"a\"\nrule = { attribute = \"spnd\", op = \">\", value = 1 }\n",
    )
    .unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_starling"))
        .args(["config", "check"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    let file = path.display();
    assert!(stderr.contains(&format!("{file}:4:8: unknown type `numbr`")), "{stderr}");
    assert!(stderr.contains(&format!("{file}:8:22: unknown attribute `spnd`")), "{stderr}");

    let example = harness::root().join("examples/starling.toml");
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_starling"))
        .args(["config", "check"])
        .arg(&example)
        .arg("--plugins")
        .arg(harness::connectors())
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
}

//! The plugin interface as it evolves: enrichers built against 0.2.0 run when a visit ends and
//! see the visit, and components built against 0.1.0 before 0.2.0 existed (checked in under
//! `tests/fixtures/plugin-0.1.0`) still load and work beside it.

use crate::harness::{self, Receiver, Server, eventually, get_json, post_json};
use serde_json::json;
use std::path::Path;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread")]
async fn an_enricher_runs_when_a_visit_ends_and_sees_the_visits_attributes() {
    let receiver = Receiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        r#"
[server]
database = "starling.db"
plugins = "plugins"

[[attribute]]
name = "pages"
scope = "visit"
type = "number"
[[attribute]]
name = "last_visit_pages"
scope = "visitor"
type = "number"
[[attribute]]
name = "last_visit_minutes"
scope = "visitor"
type = "number"
[[attribute]]
name = "last_visit_events"
scope = "visitor"
type = "number"

[[enrichment]]
attribute = "pages"
op = "increment"
when = "event:page_view"

[[enricher]]
plugin = "visit-summary"
when = ["visit_ended"]

[[audience]]
name = "deep_readers"
rule = {{ attribute = "last_visit_pages", op = ">=", value = 3 }}

[[action]]
name = "deep"
audience = "deep_readers"
trigger = "joined"
connector = "webhook"
settings = {{ url = "{}/deep" }}
params = {{ pages = "last_visit_pages" }}
"#,
        receiver.url
    );
    let config = dir.path().join("starling.toml");
    std::fs::write(&config, text).unwrap();
    harness::install(harness::test_plugins(), "visit-summary", &dir.path().join("plugins"), |m| m);
    harness::install(harness::connectors(), "webhook", &dir.path().join("plugins"), |m| m);
    let server = Server::start_with(&config, &["--test-clock"]);
    let events = format!("{}/v1/events", server.url);
    for _ in 0..3 {
        assert_eq!(post_json(&events, &json!({"event": "page_view", "visitor_id": "ann"})).await.0, 202);
    }
    assert_eq!(post_json(&events, &json!({"event": "scroll", "visitor_id": "ann"})).await.0, 202);
    let (_, before) = get_json(&format!("{}/v1/profiles/ann", server.url)).await;
    assert!(before["attributes"].get("last_visit_pages").is_none(), "not run on events: {before}");

    let (status, _) = post_json(&format!("{}/v1/test/clock", server.url), &json!({"advance": "31m"})).await;
    assert_eq!(status, 200);
    let deep = eventually("the deep_readers webhook", Duration::from_secs(20), async || {
        receiver.received().into_iter().find(|r| r.path == "/deep")
    })
    .await;
    assert_eq!(deep.body, json!({"pages": 3.0}));
    let (_, after) = get_json(&format!("{}/v1/profiles/ann", server.url)).await;
    let attributes = &after["attributes"];
    assert_eq!(attributes["last_visit_pages"], json!(3.0), "the visit's own attribute, read at its end: {after}");
    assert_eq!(attributes["last_visit_events"], json!(4.0), "{after}");
    assert_eq!(
        attributes["last_visit_minutes"],
        json!(30.0),
        "the visit ends 30 minutes after its last event: {after}"
    );
    assert_eq!(after["visit_open"], json!(false));
    server.stop();
}

/// Copies a checked-in 0.1.0 component into `plugins`.
fn install_fixture(name: &str, plugins: &Path) {
    harness::install(&harness::root().join("tests/fixtures/plugin-0.1.0"), name, plugins, |m| m);
}

#[tokio::test(flavor = "multi_thread")]
async fn components_built_against_0_1_0_still_load_and_work() {
    let receiver = Receiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        r#"
[server]
database = "starling.db"
plugins = "plugins"

[[attribute]]
name = "lifetime_spend"
scope = "visitor"
type = "number"
[[attribute]]
name = "value_tier"
scope = "visitor"
type = "string"

[[enrichment]]
attribute = "lifetime_spend"
op = "increment"
event = "total"

[[enricher]]
plugin = "value-tier"
when = ["any", "visit_ended"]

[[audience]]
name = "gold"
rule = {{ attribute = "value_tier", op = "=", value = "gold" }}

[[action]]
name = "welcome"
audience = "gold"
trigger = "joined"
connector = "webhook"
settings = {{ url = "{url}/joined" }}
params = {{ tier = "value_tier" }}

[[action]]
name = "forget"
trigger = "deleted"
connector = "webhook"
settings = {{ url = "{url}/forget" }}
"#,
        url = receiver.url
    );
    let config = dir.path().join("starling.toml");
    std::fs::write(&config, text).unwrap();
    let plugins = dir.path().join("plugins");
    install_fixture("webhook", &plugins);
    install_fixture("value-tier", &plugins);
    // A 0.1.0 enricher knows only events: run at visit ends too, it is refused by name.
    let checked = std::process::Command::new(env!("CARGO_BIN_EXE_starling"))
        .args(["config", "check"])
        .arg(&config)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&checked.stderr);
    assert!(!checked.status.success(), "{stderr}");
    assert!(stderr.contains("plugin `value-tier` implements `starling:plugin/enricher@0.1.0`"), "{stderr}");
    let text =
        std::fs::read_to_string(&config).unwrap().replace(r#"when = ["any", "visit_ended"]"#, r#"when = ["any"]"#);
    std::fs::write(&config, text).unwrap();
    let server = Server::start_with(&config, &["--test-clock"]);

    let (_, listed) = get_json(&format!("{}/v1/plugins", server.url)).await;
    let worlds: Vec<String> =
        listed["plugins"].as_array().unwrap().iter().map(|p| p["world"].as_str().unwrap().to_string()).collect();
    assert_eq!(worlds, ["starling:plugin/enricher@0.1.0", "starling:plugin/connector@0.1.0"], "{listed}");

    let events = format!("{}/v1/events", server.url);
    let (status, _) = post_json(&events, &json!({"event": "buy", "visitor_id": "bo", "data": {"total": 600}})).await;
    assert_eq!(status, 202);
    let (_, profile) = get_json(&format!("{}/v1/profiles/bo", server.url)).await;
    assert_eq!(profile["attributes"]["value_tier"], "gold", "the 0.1.0 enricher ran: {profile}");
    let joined = eventually("the 0.1.0 webhook's delivery", Duration::from_secs(20), async || {
        receiver.received().into_iter().find(|r| r.path == "/joined")
    })
    .await;
    assert_eq!((joined.header("x-starling-trigger"), &joined.body), ("joined", &json!({"tier": "gold"})));

    // A visit ends: the 0.1.0 plugins go on, nothing fails.
    let (status, _) = post_json(&format!("{}/v1/test/clock", server.url), &json!({"advance": "31m"})).await;
    assert_eq!(status, 200);
    eventually("the visit's end", Duration::from_secs(20), async || {
        let (_, profile) = get_json(&format!("{}/v1/profiles/bo", server.url)).await;
        (profile["visit_open"] == json!(false)).then_some(())
    })
    .await;
    assert!(!server.logs().contains("enricher `value-tier` failed"), "{}", server.logs());

    // 0.1.0 has no `deleted` trigger: the connector sees the deletion as leaving.
    let deleted = harness::client().delete(format!("{}/v1/profiles/bo", server.url)).send().await.unwrap();
    assert_eq!(deleted.status().as_u16(), 200);
    let forget = eventually("the deletion notice", Duration::from_secs(20), async || {
        receiver.received().into_iter().find(|r| r.path == "/forget")
    })
    .await;
    assert_eq!(forget.header("x-starling-trigger"), "left");
    server.stop();
}

//! The segmentation model over HTTP with a clock the test moves: every action trigger, a visit
//! ending without another event, a time-relative audience left as time passes, and wake-ups
//! that survive a restart.

use crate::harness::{self, Receiver, Server, eventually, get_json, post_json};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::time::Duration;

fn config(dir: &Path, receiver: &str) -> PathBuf {
    let text = format!(
        r#"
[server]
database = "starling.db"
plugins = "plugins"

[[attribute]]
name = "spend"
scope = "visitor"
type = "number"
[[attribute]]
name = "last_purchase"
scope = "visitor"
type = "date"
[[attribute]]
name = "pages"
scope = "visit"
type = "number"
[[attribute]]
name = "pages_last_visit"
scope = "visitor"
type = "number"
[[attribute]]
name = "visitors"
scope = "visitor"
type = "number"
[[attribute]]
name = "visits"
scope = "visitor"
type = "number"

[[enrichment]]
attribute = "spend"
op = "increment"
event = "total"
when = "event:purchase"
[[enrichment]]
attribute = "last_purchase"
op = "set"
value = "now"
when = "event:purchase"
[[enrichment]]
attribute = "pages"
op = "increment"
[[enrichment]]
attribute = "visitors"
op = "increment"
when = "new_visitor"
[[enrichment]]
attribute = "visits"
op = "increment"
when = "new_visit"
[[enrichment]]
attribute = "pages_last_visit"
op = "set"
from = "pages"
when = "visit_ended"

[[audience]]
name = "spenders"
rule = {{ attribute = "spend", op = ">=", value = 100 }}
[[audience]]
name = "recent_buyers"
rule = {{ attribute = "last_purchase", op = "within_last", value = "7d" }}

[[action]]
name = "welcome"
audience = "spenders"
trigger = "joined"
connector = "webhook"
settings = {{ url = "{receiver}/joined" }}
[[action]]
name = "win_back"
audience = "recent_buyers"
trigger = "left"
connector = "webhook"
settings = {{ url = "{receiver}/left" }}
params = {{ spend = "spend" }}
[[action]]
name = "greet"
audience = "spenders"
trigger = "visit_started"
connector = "webhook"
settings = {{ url = "{receiver}/started" }}
[[action]]
name = "recap"
audience = "spenders"
trigger = "visit_ended"
connector = "webhook"
settings = {{ url = "{receiver}/ended" }}
params = {{ pages = "pages_last_visit" }}
[[action]]
name = "big_orders"
trigger = "event"
event = "purchase"
if = {{ attribute = "event.total", op = ">", value = 50 }}
connector = "webhook"
settings = {{ url = "{receiver}/feed" }}
params = {{ total = "event.total" }}
"#
    );
    let path = dir.join("starling.toml");
    std::fs::write(&path, text).unwrap();
    harness::install(harness::connectors(), "webhook", &dir.join("plugins"), |m| m);
    path
}

fn event(name: &str, visitor: &str, data: serde_json::Value) -> serde_json::Value {
    json!({ "event": name, "visitor_id": visitor, "data": data })
}

async fn advance(server: &Server, by: &str) {
    let (status, body) = post_json(&format!("{}/v1/test/clock", server.url), &json!({ "advance": by })).await;
    assert_eq!(status, 200, "{body}");
}

/// Waits until the receiver has `n` requests on `path`, and returns them.
async fn calls(receiver: &Receiver, path: &str, n: usize) -> Vec<crate::harness::Received> {
    eventually(&format!("{n} call(s) to {path}"), Duration::from_secs(20), async || {
        let got: Vec<_> = receiver.received().into_iter().filter(|r| r.path == path).collect();
        (got.len() >= n).then_some(got)
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn every_action_trigger_fires_over_http_as_events_arrive_and_time_passes() {
    let receiver = Receiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_with(&config(dir.path(), &receiver.url), &["--test-clock"]);
    let events = format!("{}/v1/events", server.url);
    let profile_url = format!("{}/v1/profiles/ann", server.url);

    // joined + event feed, from the event itself; and visit_started, since the visitor is in
    // the audience once the visit's first event is applied.
    post_json(&events, &event("purchase", "ann", json!({ "total": 120 }))).await;
    post_json(&events, &event("page_view", "ann", json!({}))).await;
    let joined = calls(&receiver, "/joined", 1).await;
    assert_eq!(joined[0].header("x-starling-trigger"), "joined");
    let feed = calls(&receiver, "/feed", 1).await;
    assert_eq!((feed[0].header("x-starling-trigger"), &feed[0].body), ("event", &json!({ "total": 120.0 })));
    calls(&receiver, "/started", 1).await;

    // The visit ends 30 minutes after the last event, with no further event: visit_ended
    // enrichments run and the visit_ended action fires.
    advance(&server, "31m").await;
    let ended = calls(&receiver, "/ended", 1).await;
    assert_eq!((ended[0].header("x-starling-trigger"), &ended[0].body), ("visit_ended", &json!({ "pages": 2.0 })));
    let (_, profile) = get_json(&profile_url).await;
    assert_eq!(
        (profile["visit_open"].clone(), profile["attributes"]["pages_last_visit"].clone()),
        (json!(false), json!(2.0))
    );

    // The next event starts a visit, and the visitor is a spender: visit_started.
    post_json(&events, &event("page_view", "ann", json!({}))).await;
    let started = calls(&receiver, "/started", 2).await;
    assert_eq!(started[1].header("x-starling-trigger"), "visit_started");

    // Eight days on, the purchase is no longer recent: the visitor leaves `recent_buyers`
    // without sending anything.
    let (_, why) = get_json(&format!("{profile_url}/explain/recent_buyers")).await;
    assert_eq!((why["member"].clone(), why["time_relative"].clone()), (json!(true), json!(true)));
    advance(&server, "8d").await;
    let left = calls(&receiver, "/left", 1).await;
    assert_eq!((left[0].header("x-starling-trigger"), &left[0].body), ("left", &json!({ "spend": 120.0 })));
    let (_, profile) = get_json(&profile_url).await;
    assert_eq!(profile["audiences"], json!(["spenders"]));
    // Enrichment triggers: any (pages), event:purchase (spend), new_visitor, new_visit, visit_ended.
    let attributes = &profile["attributes"];
    assert_eq!(
        [&attributes["spend"], &attributes["visitors"], &attributes["visits"], &attributes["pages_last_visit"]],
        [&json!(120.0), &json!(1.0), &json!(2.0), &json!(1.0)]
    );
    let (_, why) = get_json(&format!("{profile_url}/explain/recent_buyers")).await;
    assert_eq!((why["member"].clone(), why["result"].clone()), (json!(false), json!(false)));

    // Each trigger fired exactly as often as it should have (two visits started and ended).
    calls(&receiver, "/ended", 2).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Counted by idempotency key: a retried call is the same action.
    let count = |p: &str| receiver.received().iter().filter(|r| r.path == p).count();
    assert_eq!([count("/joined"), count("/feed"), count("/started"), count("/ended"), count("/left")], [1, 1, 2, 2, 1]);
    let (_, audiences) = get_json(&format!("{}/v1/audiences", server.url)).await;
    assert_eq!(audiences["audiences"][0]["size"], 1);
    assert_eq!(audiences["audiences"][1]["size"], 0);
    server.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pending_visit_end_survives_a_crash() {
    let receiver = Receiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path(), &receiver.url);
    let server = Server::start_with(&config, &["--test-clock"]);
    post_json(&format!("{}/v1/events", server.url), &event("purchase", "bo", json!({ "total": 150 }))).await;
    calls(&receiver, "/joined", 1).await;
    server.kill9();

    // Nothing runs while the server is down; after the restart the stored wake-up fires.
    let server = Server::start_with(&config, &["--test-clock"]);
    advance(&server, "45m").await;
    let ended = calls(&receiver, "/ended", 1).await;
    assert_eq!(ended[0].header("x-starling-trigger"), "visit_ended");
    let (_, profile) = get_json(&format!("{}/v1/profiles/bo", server.url)).await;
    assert_eq!(profile["visit_open"], false);
    server.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn the_clock_only_moves_when_the_server_was_started_for_tests() {
    let receiver = Receiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&config(dir.path(), &receiver.url));
    let (status, _) = post_json(&format!("{}/v1/test/clock", server.url), &json!({ "advance": "1d" })).await;
    assert_eq!(status, 404);
    server.stop();
}

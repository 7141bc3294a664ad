//! Ingestion from the tracking code people already run: Segment's Python and Node libraries,
//! RudderStack's Python SDK and Tealium's Python library (pinned in `tests/clients`, installed by
//! `scripts/clients.sh`) send to a real server, whose profiles, audiences and actions are checked.

use crate::harness::{self, Receiver, Server, eventually, get_json};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

const WRITE_KEY: &str = "segment-write-key-0123456789";
const DATASOURCE: &str = "ds42";

/// Installs the client libraries once per test run.
pub(crate) fn clients() -> &'static Path {
    static INSTALLED: OnceLock<PathBuf> = OnceLock::new();
    INSTALLED.get_or_init(|| {
        let root = harness::root();
        let status = Command::new(root.join("scripts/clients.sh")).status().expect("running scripts/clients.sh");
        assert!(status.success(), "scripts/clients.sh failed");
        root.join("tests/clients")
    })
}

pub(crate) fn tracking_config(dir: &Path, receiver: &str, personalization: &str) -> PathBuf {
    let text = format!(
        r#"
[server]
database = "starling.db"
plugins = "plugins"

[[source]]
name = "web"
api_key = "{WRITE_KEY}"
[source.segment]
user_id = "customer_id"

[[source]]
name = "store"
api_key = "store-key-0123456789abcdef"
[source.tealium]
account = "acme"
profile = "main"
datasource = "{DATASOURCE}"

[personalization]
{personalization}

[[attribute]]
name = "customer_id"
scope = "visitor"
type = "visitor_id"
[[attribute]]
name = "page_views"
scope = "visitor"
type = "number"
[[attribute]]
name = "spend"
scope = "visitor"
type = "number"
[[attribute]]
name = "email"
scope = "visitor"
type = "string"
[[attribute]]
name = "plan"
scope = "visitor"
type = "string"
[[attribute]]
name = "campaign"
scope = "visitor"
type = "string"

# Segment's calls: page, track names, identify traits, context.
[[enrichment]]
attribute = "page_views"
op = "increment"
when = "event:page"
[[enrichment]]
attribute = "spend"
op = "increment"
event = "properties.revenue"
when = "event:Order Completed"
[[enrichment]]
attribute = "email"
op = "set"
event = "traits.email"
when = "event:identify"
[[enrichment]]
attribute = "plan"
op = "set"
event = "traits.plan"
when = "event:identify"
[[enrichment]]
attribute = "campaign"
op = "set"
event = "context.campaign.source"

# Tealium's data layer.
[[enrichment]]
attribute = "page_views"
op = "increment"
when = "event:page_view"
[[enrichment]]
attribute = "spend"
op = "increment"
event = "order_total"
when = "event:purchase"
[[enrichment]]
attribute = "customer_id"
op = "set"
event = "customer_id"
[[enrichment]]
attribute = "email"
op = "set"
event = "email"
when = "event:login"
[[enrichment]]
attribute = "plan"
op = "set"
event = "plan"
when = "event:login"

[[audience]]
name = "big_spenders"
rule = {{ attribute = "spend", op = ">=", value = 100 }}

[[action]]
name = "welcome"
audience = "big_spenders"
trigger = "joined"
connector = "webhook"
settings = {{ url = "{receiver}/joined" }}
params = {{ customer_id = "customer_id", email = "email" }}
"#
    );
    let path = dir.join("starling.toml");
    std::fs::write(&path, text).unwrap();
    harness::install(harness::connectors(), "webhook", &dir.join("plugins"), |m| m);
    path
}

/// What the scenario of `tests/clients/send.py` must leave: one person across both devices and
/// the server-side id, every order counted once, one `joined` delivered.
async fn check_person(server: &Server, receiver: &Receiver, prefix: &str, campaign: Option<&str>) {
    let (status, a) = get_json(&format!("{}/v1/profiles/{prefix}-device-a", server.url)).await;
    assert_eq!(status, 200, "{a}");
    for other in ["device-b", "user"] {
        let (_, b) = get_json(&format!("{}/v1/profiles/{prefix}-{other}", server.url)).await;
        assert_eq!(b["id"], a["id"], "{prefix}-{other} is stitched into the same profile: {b}");
    }
    let attributes = &a["attributes"];
    assert_eq!(attributes["page_views"], json!(3.0), "{a}");
    assert_eq!(attributes["spend"], json!(115.0), "each order once, the retried one too: {a}");
    assert_eq!(attributes["email"], json!(format!("{prefix}@example.com")), "{a}");
    assert_eq!(attributes["plan"], json!("pro"), "{a}");
    assert_eq!(attributes["customer_id"], json!(format!("{prefix}-user")), "{a}");
    if let Some(campaign) = campaign {
        assert_eq!(attributes["campaign"], json!(campaign), "context is readable: {a}");
    }
    assert_eq!(a["audiences"], json!(["big_spenders"]), "{a}");
    eventually("the welcome webhook", Duration::from_secs(20), async || {
        receiver.received().iter().any(|r| r.path == "/joined").then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let joined: Vec<_> = receiver.received().into_iter().filter(|r| r.path == "/joined").collect();
    assert_eq!(joined.len(), 1, "one person joins once: {:?}", joined.iter().map(|r| &r.body).collect::<Vec<_>>());
    let body = joined[0].body.to_string();
    assert!(body.contains(&format!("{prefix}@example.com")), "{body}");
}

fn run(program: &Path, args: &[&str]) {
    let out = Command::new(program).args(args).current_dir(clients()).output().expect("running a client");
    assert!(
        out.status.success(),
        "{} {args:?} failed:\n{}\n{}",
        program.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn python() -> PathBuf {
    clients();
    harness::root().join("target/clients/venv/bin/python")
}

#[tokio::test(flavor = "multi_thread")]
async fn segments_python_library_tracks_pages_orders_and_an_identify_that_stitches() {
    let receiver = Receiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&tracking_config(dir.path(), &receiver.url, ""));
    run(&python(), &["send.py", "segment", &server.url, WRITE_KEY, "seg"]);
    check_person(&server, &receiver, "seg", Some("newsletter")).await;
    let (_, a) = get_json(&format!("{}/v1/profiles/seg-device-a/export", server.url)).await;
    let events = a["events"].as_array().unwrap();
    let home = events.iter().find(|e| e["data"]["name"] == "Home").expect("the page call is recorded");
    assert_eq!(home["event"], "page", "{home}");
    assert_eq!(home["data"]["context"]["library"]["name"], "analytics-python", "{home}");
    assert_eq!(home["data"]["context"]["ip"], "127.0.0.1", "the sender's address, as Segment records it: {home}");
    server.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn rudderstacks_python_sdk_speaks_the_same_api() {
    let receiver = Receiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&tracking_config(dir.path(), &receiver.url, ""));
    run(&python(), &["send.py", "rudder", &server.url, WRITE_KEY, "rud"]);
    check_person(&server, &receiver, "rud", Some("newsletter")).await;
    server.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn segments_node_library_batches_and_is_answered_as_segment_answers() {
    let receiver = Receiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&tracking_config(dir.path(), &receiver.url, ""));
    run(Path::new("node"), &["send-node.mjs", &server.url, WRITE_KEY, "node"]);
    check_person(&server, &receiver, "node", None).await;
    server.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn tealiums_python_library_sends_data_layers_to_collect() {
    let receiver = Receiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&tracking_config(dir.path(), &receiver.url, ""));
    run(&python(), &["send.py", "tealium", &server.url, DATASOURCE, "teal"]);
    check_person(&server, &receiver, "teal", None).await;
    let (_, a) = get_json(&format!("{}/v1/profiles/teal-device-a/export", server.url)).await;
    let events = a["events"].as_array().unwrap();
    let view = events.iter().find(|e| e["event"] == "page_view").expect("a page view is recorded");
    assert_eq!(view["data"]["tealium_library_name"], "python", "other keys are event fields: {view}");
    assert!(view["data"].get("tealium_account").is_none(), "{view}");
    server.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_tracking_requests_are_refused_with_the_reason_and_nothing_applied() {
    let receiver = Receiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&tracking_config(dir.path(), &receiver.url, ""));
    let client = harness::client();
    let post = async |path: &str, auth: Option<&str>, body: Value| {
        let mut request = client.post(format!("{}{path}", server.url)).json(&body);
        if let Some(key) = auth {
            request = request.basic_auth(key, Some(""));
        }
        let r = request.send().await.unwrap();
        (r.status().as_u16(), r.json::<Value>().await.unwrap_or(Value::Null))
    };
    let page = json!({"batch": [{"type": "page", "anonymousId": "bad-1"}]});
    let (status, body) = post("/v1/batch", None, page.clone()).await;
    assert_eq!((status, body["success"].clone()), (401, json!(false)), "{body}");
    assert!(body["error"].as_str().unwrap().contains("write key required"), "{body}");
    let (status, body) = post("/v1/batch", Some("not-the-key-0123456789"), page.clone()).await;
    assert_eq!(status, 401, "{body}");
    assert!(body["error"].as_str().unwrap().contains("write key is not valid"), "{body}");
    let mixed = json!({"batch": [{"type": "page", "anonymousId": "bad-1"}, {"type": "track", "anonymousId": "bad-1"}]});
    let (status, body) = post("/v1/b", Some(WRITE_KEY), mixed).await;
    assert_eq!(status, 400, "{body}");
    assert!(body["error"].as_str().unwrap().starts_with("batch[1].event: missing field"), "{body}");
    let big = json!({"anonymousId": "bad-1", "event": "x", "properties": {"p": "x".repeat(40_000)}});
    let (status, body) = post("/v1/track", Some(WRITE_KEY), big).await;
    assert_eq!(status, 400, "{body}");
    assert!(body["error"].as_str().unwrap().contains("at most 32768"), "{body}");
    // analytics.js names the key in the body and posts as text/plain (no CORS preflight).
    let r = client
        .post(format!("{}/v1/t", server.url))
        .header("content-type", "text/plain")
        .header("origin", "https://shop.example")
        .body(json!({"writeKey": WRITE_KEY, "anonymousId": "ok-1", "event": "Viewed"}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers().get("access-control-allow-origin").unwrap(), "*");
    assert_eq!((r.status().as_u16(), r.json::<Value>().await.unwrap()), (200, json!({"success": true})));
    let (status, _) = get_json(&format!("{}/v1/profiles/bad-1", server.url)).await;
    assert_eq!(status, 404, "nothing of a refused request was applied");
    assert_eq!(get_json(&format!("{}/v1/profiles/ok-1", server.url)).await.0, 200);
    // Tealium: a data source the configuration does not name, and a data layer without a visitor.
    let (status, body) = post(
        "/event",
        None,
        json!({"tealium_account": "acme", "tealium_profile": "main", "tealium_datasource": "other", "tealium_event": "x", "tealium_visitor_id": "bad-2"}),
    )
    .await;
    assert_eq!(status, 403, "{body}");
    assert!(body["error"].as_str().unwrap().contains("tealium_datasource `other`"), "{body}");
    let (status, body) = post(
        "/event",
        None,
        json!({"tealium_account": "acme", "tealium_profile": "main", "tealium_datasource": DATASOURCE, "tealium_event": "x"}),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert!(body["error"].as_str().unwrap().starts_with("tealium_visitor_id: missing field"), "{body}");
    // The pixel form answers an image.
    let r = client
        .get(format!(
            "{}/event?tealium_account=acme&tealium_profile=main&tealium_datasource={DATASOURCE}&tealium_event=page_view&tealium_visitor_id=px-1",
            server.url
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers().get("content-type").unwrap(), "image/gif");
    assert_eq!(&r.bytes().await.unwrap()[..6], b"GIF89a");
    let (_, px) = get_json(&format!("{}/v1/profiles/px-1", server.url)).await;
    assert_eq!(px["attributes"]["page_views"], json!(1.0), "{px}");
    // A Tealium request sent again (its events' `tealium_random` repeated) is applied once.
    let view = json!({"tealium_account": "acme", "tealium_profile": "main", "tealium_datasource": DATASOURCE,
        "tealium_event": "page_view", "tealium_visitor_id": "px-1", "tealium_random": "8304215967730412"});
    for _ in 0..2 {
        assert_eq!(post("/event", None, view.clone()).await.0, 200);
    }
    let (_, px) = get_json(&format!("{}/v1/profiles/px-1", server.url)).await;
    assert_eq!(px["attributes"]["page_views"], json!(2.0), "the pixel's view and this one, once: {px}");
    server.stop();
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Opens the shop page in headless Chromium with analytics.js pointed at `server`: a page view,
/// `user` signs in (identify), an order of `revenue`, then the page reads its visitor.
fn open_shop(server: &Server, page_port: u16, revenue: u32, user: &str) -> Value {
    clients();
    let out = Command::new("node")
        .args(["browser.mjs", &server.url, WRITE_KEY, &revenue.to_string(), &page_port.to_string(), user])
        .current_dir(clients())
        .output()
        .expect("running node");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "browser.mjs failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn analytics_js_in_chromium_tracks_and_the_page_personalises_itself() {
    let receiver = Receiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let page_port = free_port();
    let personalization = format!("expose = [\"page_views\"]\norigins = [\"http://127.0.0.1:{page_port}\"]");
    let server = Server::start(&tracking_config(dir.path(), &receiver.url, &personalization));

    // The shopper bought 100 earlier, recorded by the shop's backend with their user id only.
    let backend = harness::client()
        .post(format!("{}/v1/track", server.url))
        .basic_auth(WRITE_KEY, Some(""))
        .json(&json!({"userId": "shopper-big", "event": "Order Completed", "properties": {"revenue": 100}}))
        .send()
        .await
        .unwrap();
    assert_eq!(backend.status().as_u16(), 200);

    let big = open_shop(&server, page_port, 50, "shopper-big");
    assert_eq!(big["state"], "done", "{big}");
    assert_eq!(big["errors"], json!([]), "{big}");
    let visitor = big["visitor"].as_str().unwrap();
    let requests: Vec<&str> = big["requests"].as_array().unwrap().iter().map(|r| r.as_str().unwrap()).collect();
    for call in ["POST /v1/p", "POST /v1/i", "POST /v1/t"] {
        assert!(requests.contains(&call), "analytics.js sent {call}: {requests:?}");
    }
    assert!(requests.contains(&format!("GET /v1/visitor/{visitor}").as_str()), "{requests:?}");
    assert_eq!(
        big["view"],
        json!({"id": visitor, "known": true, "audiences": ["big_spenders"], "badges": [], "attributes": {"page_views": 1}}),
        "only audiences, badges and the exposed attributes: {big}"
    );
    assert_eq!(big["offer"], "Free shipping for our best customers (1 pages seen)", "{big}");

    let (_, profile) = get_json(&format!("{}/v1/profiles/{visitor}/export", server.url)).await;
    assert_eq!(profile["profile"]["attributes"]["spend"], json!(150.0), "the browser and the backend order: {profile}");
    assert_eq!(profile["profile"]["attributes"]["email"], json!("shopper-big@example.com"), "{profile}");
    let (_, known) = get_json(&format!("{}/v1/profiles/shopper-big", server.url)).await;
    assert_eq!(known["id"], profile["profile"]["id"], "identify stitched the browser to the shopper: {known}");
    let events = profile["events"].as_array().unwrap();
    let page = events.iter().find(|e| e["event"] == "page").expect("the page call");
    assert!(page["data"]["context"]["page"]["url"].as_str().unwrap().contains("/shop.html"), "{page}");
    assert!(page["data"]["context"]["userAgent"].as_str().unwrap().contains("Chrome"), "{page}");
    assert_eq!(page["data"]["context"]["library"]["name"], "analytics.js", "{page}");
    eventually("the welcome webhook", Duration::from_secs(20), async || {
        receiver.received().iter().any(|r| r.path == "/joined").then_some(())
    })
    .await;

    let small = open_shop(&server, page_port, 20, "shopper-small");
    assert_eq!(small["state"], "done", "{small}");
    assert_ne!(small["visitor"], big["visitor"], "a new browser is a new visitor");
    assert_eq!(small["view"]["audiences"], json!([]), "{small}");
    assert_eq!(small["offer"], Value::Null, "no offer for a visitor outside the audience: {small}");
    server.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn personalization_answers_allowed_origins_with_a_key_within_its_rate() {
    let receiver = Receiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let personalization = "expose = [\"plan\"]\norigins = [\"https://shop.example\"]\nrequests_per_minute = 3";
    let server = Server::start(&tracking_config(dir.path(), &receiver.url, personalization));
    let client = harness::client();
    let r = client
        .post(format!("{}/v1/identify", server.url))
        .basic_auth(WRITE_KEY, Some(""))
        .json(&json!({"anonymousId": "p-1", "userId": "u-1", "traits": {"plan": "pro", "email": "p@example.com"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let visitor = async |id: &str, key: Option<&str>, origin: &str| {
        let mut request = client.get(format!("{}/v1/visitor/{id}", server.url)).header("origin", origin);
        if let Some(key) = key {
            request = request.header("x-api-key", key);
        }
        request.send().await.unwrap()
    };
    let r = visitor("p-1", Some(WRITE_KEY), "https://shop.example").await;
    assert_eq!(r.headers().get("access-control-allow-origin").unwrap(), "https://shop.example");
    assert_eq!(r.headers().get("cache-control").unwrap(), "no-store, private");
    let view: Value = r.json().await.unwrap();
    assert_eq!(view["attributes"], json!({"plan": "pro"}), "email and customer_id are not exposed: {view}");
    let r = visitor("p-1", Some(WRITE_KEY), "https://evil.example").await;
    assert!(r.headers().get("access-control-allow-origin").is_none(), "another site's page cannot read the answer");
    let preflight = client
        .request(reqwest::Method::OPTIONS, format!("{}/v1/visitor/p-1", server.url))
        .header("origin", "https://shop.example")
        .header("access-control-request-method", "GET")
        .header("access-control-request-headers", "x-api-key")
        .send()
        .await
        .unwrap();
    assert_eq!(preflight.headers().get("access-control-allow-origin").unwrap(), "https://shop.example");
    let r = visitor("p-1", None, "https://shop.example").await;
    assert_eq!(r.status().as_u16(), 401);
    let r = visitor("nobody", Some(WRITE_KEY), "https://shop.example").await;
    assert_eq!(r.json::<Value>().await.unwrap()["known"], false);
    let r = visitor("p-1", Some(WRITE_KEY), "https://shop.example").await;
    assert_eq!(r.status().as_u16(), 429, "the fourth read with this key this minute");
    let wait: u64 = r.headers().get("retry-after").unwrap().to_str().unwrap().parse().unwrap();
    assert!((1..=60).contains(&wait), "{wait}");
    server.stop();
}

//! The connectors beyond the webhook, each against a loopback fake of its service that checks
//! method, path, headers and body the way the real service would receive them.

use crate::harness::{self, Answer, Receiver, Responder, Server, eventually, get_json, post_json};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// A configuration where a `signup` event stores a name, an email and a plan, and puts the
/// visitor in audience `trial` while `plan` is `trial`; `actions` and `plugin_config` appended.
fn config(dir: &Path, connector: &str, actions: &str, plugin_config: &str) -> PathBuf {
    let text = format!(
        r#"
[server]
database = "starling.db"
plugins = "plugins"

[[attribute]]
name = "name"
scope = "visitor"
type = "string"

[[attribute]]
name = "email"
scope = "visitor"
type = "string"

[[attribute]]
name = "plan"
scope = "visitor"
type = "string"

[[enrichment]]
attribute = "name"
op = "set"
event = "name"

[[enrichment]]
attribute = "email"
op = "set"
event = "email"

[[enrichment]]
attribute = "plan"
op = "set"
event = "plan"

[[audience]]
name = "trial"
rule = {{ attribute = "plan", op = "=", value = "trial" }}
{actions}
{plugin_config}
"#
    );
    let path = dir.join("starling.toml");
    std::fs::write(&path, text).unwrap();
    harness::install(harness::connectors(), connector, &dir.join("plugins"), |m| m);
    path
}

async fn signup(server: &Server, visitor: &str, name: &str, email: &str, plan: &str) {
    let (status, body) = post_json(
        &format!("{}/v1/events", server.url),
        &json!({"event": "signup", "visitor_id": visitor, "data": {"name": name, "email": email, "plan": plan}}),
    )
    .await;
    assert_eq!(status, 202, "{body}");
}

async fn action_rows(server: &Server, status: &str) -> Vec<serde_json::Value> {
    let (_, rows) = get_json(&format!("{}/v1/actions?status={status}", server.url)).await;
    rows["actions"].as_array().cloned().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_chat_connector_posts_a_slack_message_and_reports_slack_errors() {
    // The second message is refused the way Slack refuses an archived channel.
    let respond: Responder = Arc::new(|n| if n == 1 { (410, vec![]) } else { (200, vec![]) });
    let receiver = Receiver::start_on("127.0.0.1:0", respond).await;
    let dir = tempfile::tempdir().unwrap();
    let actions = r##"
[[action]]
name = "tell_sales"
audience = "trial"
trigger = "joined"
connector = "slack"
settings = { text = "*{name}* <{email}> started a {plan} ({audience}, {trigger}, {nope})", channel = "#growth", username = "Starling" }
params = { name = "name", email = "email", plan = "plan" }
"##;
    let plugin_config = format!("[plugin.slack]\nwebhook_url = \"{}/services/T000/B000/XXXX\"\n", receiver.url);
    let server = Server::start(&config(dir.path(), "slack", actions, &plugin_config));

    signup(&server, "ann", "Ann & <Co>", "ann@example.com", "trial").await;
    let got = eventually("the Slack message", Duration::from_secs(20), async || {
        let got = receiver.received();
        (!got.is_empty()).then_some(got)
    })
    .await;
    let message = &got[0];
    assert_eq!((message.method.as_str(), message.path.as_str()), ("POST", "/services/T000/B000/XXXX"));
    assert_eq!(message.header("content-type"), "application/json");
    // Values are escaped for mrkdwn; the template's own markup (here a link) is kept.
    let text = "*Ann &amp; &lt;Co&gt;* <ann@example.com> started a trial (trial, joined, {nope})";
    assert_eq!(
        message.body,
        json!({
            "text": text,
            "blocks": [{"type": "section", "text": {"type": "mrkdwn", "text": text}}],
            "channel": "#growth",
            "username": "Starling",
        })
    );
    eventually("the action delivered", Duration::from_secs(10), async || {
        (action_rows(&server, "delivered").await.len() == 1).then_some(())
    })
    .await;

    signup(&server, "bob", "Bob", "bob@example.com", "trial").await;
    let failed = eventually("the refused message to fail", Duration::from_secs(20), async || {
        action_rows(&server, "failed").await.first().cloned()
    })
    .await;
    assert_eq!(failed["profile_id"], "bob");
    assert!(failed["last_error"].as_str().unwrap().contains("410"), "{failed}");
    assert_eq!(receiver.received().len(), 2, "a permanent refusal is not retried");
    assert!(!server.logs().contains("/services/T000/B000/XXXX"), "the secret webhook URL stays out of the logs");
    server.stop();
}

fn batched(name: &str, connector: &str, trigger: &str, settings: &str, params: &str, max_items: u32) -> String {
    format!(
        "\n[[action]]\nname = \"{name}\"\naudience = \"trial\"\ntrigger = \"{trigger}\"\nconnector = \"{connector}\"\nsettings = {settings}\nparams = {params}\nbatch = {{ max_items = {max_items}, max_age = \"1s\" }}\n"
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn the_email_list_connector_subscribes_and_unsubscribes_in_batches() {
    // Refuses one member the way the list API does: 200, with the member under `errors`.
    let answer: Answer = Arc::new(|_, request| {
        let members = request.body["members"].as_array().cloned().unwrap_or_default();
        let refused: Vec<_> = members
            .iter()
            .filter(|m| m["email_address"] == "fake@example.com")
            .map(|m| json!({"email_address": m["email_address"], "error": "looks fake or invalid", "error_code": "ERROR_GENERIC"}))
            .collect();
        let body = json!({"new_members": [], "updated_members": [], "errors": refused, "error_count": refused.len()});
        (200, vec![("content-type", "application/json".to_string())], body.to_string())
    });
    let receiver = Receiver::answering("127.0.0.1:0", answer).await;
    let dir = tempfile::tempdir().unwrap();
    let settings = r#"{ list_id = "a1b2c3" }"#;
    let params = r#"{ email = "email", FNAME = "name" }"#;
    let actions = batched("subscribe", "mailchimp", "joined", settings, params, 3)
        + &batched("unsubscribe", "mailchimp", "left", settings, params, 3);
    let plugin_config = format!("[plugin.mailchimp]\napi_key = \"0123abcd-us6\"\napi_base = \"{}\"\n", receiver.url);
    let server = Server::start(&config(dir.path(), "mailchimp", &actions, &plugin_config));

    signup(&server, "ann", "Ann", "ann@example.com", "trial").await;
    signup(&server, "bob", "Bob", "bob@example.com", "trial").await;
    signup(&server, "fay", "Fay", "fake@example.com", "trial").await;
    let got = eventually("the batch subscribe request", Duration::from_secs(20), async || {
        let got = receiver.received();
        (!got.is_empty()).then_some(got)
    })
    .await;
    let batch = &got[0];
    assert_eq!((batch.method.as_str(), batch.path.as_str()), ("POST", "/3.0/lists/a1b2c3"));
    // Basic auth, any user name, the API key as password.
    assert_eq!(batch.header("authorization"), "Basic c3Rhcmxpbmc6MDEyM2FiY2QtdXM2");
    assert_eq!(batch.header("content-type"), "application/json");
    let mut members = batch.body["members"].as_array().unwrap().clone();
    members.sort_by_key(|m| m["email_address"].as_str().unwrap().to_string());
    let member = |email: &str, name: &str| json!({"email_address": email, "status": "subscribed", "status_if_new": "subscribed", "merge_fields": {"FNAME": name}});
    assert_eq!(
        members,
        vec![member("ann@example.com", "Ann"), member("bob@example.com", "Bob"), member("fake@example.com", "Fay")],
        "three actions, one request"
    );
    assert_eq!(batch.body["update_existing"], true);
    let failed = eventually("the refused member's action to fail", Duration::from_secs(10), async || {
        action_rows(&server, "failed").await.first().cloned()
    })
    .await;
    assert_eq!(failed["profile_id"], "fay");
    assert!(failed["last_error"].as_str().unwrap().contains("ERROR_GENERIC"), "{failed}");
    assert_eq!(action_rows(&server, "delivered").await.len(), 2);

    // Ann leaves the audience: a batch of one, sent when it is a second old.
    signup(&server, "ann", "Ann", "ann@example.com", "paid").await;
    let got = eventually("the unsubscribe request", Duration::from_secs(20), async || {
        let got = receiver.received();
        (got.len() == 2).then_some(got)
    })
    .await;
    assert_eq!(got[1].path, "/3.0/lists/a1b2c3");
    assert_eq!(
        got[1].body["members"],
        json!([{"email_address": "ann@example.com", "status": "unsubscribed", "status_if_new": "unsubscribed", "merge_fields": {"FNAME": "Ann"}}])
    );
    assert!(!server.logs().contains("0123abcd-us6"), "the API key stays out of the logs");
    server.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn the_ad_audience_connector_sends_only_hashed_identifiers_in_batches() {
    let answer: Answer = Arc::new(|_, request| {
        let rows = request.body["payload"]["data"].as_array().map_or(0, Vec::len);
        let body = json!({"audience_id": "6000000001", "num_received": rows, "num_invalid_entries": 0});
        (200, vec![("content-type", "application/json".to_string())], body.to_string())
    });
    let receiver = Receiver::answering("127.0.0.1:0", answer).await;
    let dir = tempfile::tempdir().unwrap();
    let settings = r#"{ audience_id = "6000000001" }"#;
    let params = r#"{ email = "email" }"#;
    let actions = batched("add", "ad-audience", "joined", settings, params, 2)
        + &batched("remove", "ad-audience", "left", settings, params, 2);
    let plugin_config =
        format!("[plugin.ad-audience]\naccess_token = \"tok-secret\"\napi_base = \"{}\"\n", receiver.url);
    let server = Server::start(&config(dir.path(), "ad-audience", &actions, &plugin_config));

    signup(&server, "ann", "Ann", "  Ann@Example.com ", "trial").await;
    signup(&server, "bob", "Bob", "bob@example.com", "trial").await;
    let got = eventually("the add request", Duration::from_secs(20), async || {
        let got = receiver.received();
        (!got.is_empty()).then_some(got)
    })
    .await;
    let hash = |s: &str| hex::encode(<sha2::Sha256 as sha2::Digest>::digest(s.as_bytes()));
    let add = &got[0];
    assert_eq!((add.method.as_str(), add.path.as_str()), ("POST", "/6000000001/users"));
    assert_eq!(add.header("authorization"), "Bearer tok-secret");
    let mut rows = add.body["payload"]["data"].as_array().unwrap().clone();
    rows.sort_by_key(|r| r[0].as_str().unwrap().to_string());
    let mut expected = vec![json!([hash("ann@example.com")]), json!([hash("bob@example.com")])];
    expected.sort_by_key(|r| r[0].as_str().unwrap().to_string());
    assert_eq!(add.body["payload"]["schema"], json!(["EMAIL_SHA256"]));
    assert_eq!(rows, expected, "trimmed, lowercased, hashed; two people in one request");
    assert!(!add.body.to_string().contains("example.com"), "no address in clear text");

    signup(&server, "bob", "Bob", "bob@example.com", "paid").await;
    let got = eventually("the remove request", Duration::from_secs(20), async || {
        let got = receiver.received();
        (got.len() == 2).then_some(got)
    })
    .await;
    assert_eq!((got[1].method.as_str(), got[1].path.as_str()), ("DELETE", "/6000000001/users"));
    assert_eq!(got[1].body["payload"]["data"], json!([[hash("bob@example.com")]]));
    eventually("all three actions delivered", Duration::from_secs(10), async || {
        (action_rows(&server, "delivered").await.len() == 3).then_some(())
    })
    .await;
    assert!(!server.logs().contains("tok-secret"), "the token stays out of the logs");
    server.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn the_c_enricher_derives_the_email_domain() {
    let dir = tempfile::tempdir().unwrap();
    let enricher = r#"
[[attribute]]
name = "email_domain"
scope = "visitor"
type = "string"

[[attribute]]
name = "business_email"
scope = "visitor"
type = "boolean"

[[enricher]]
plugin = "email-domain"
reads = ["email", "email_domain", "business_email"]
"#;
    let server = Server::start(&config(dir.path(), "email-domain", enricher, ""));
    signup(&server, "ann", "Ann", "Ann@Example.COM ", "trial").await;
    signup(&server, "bob", "Bob", "bob@gmail.com", "trial").await;
    signup(&server, "cy", "Cy", "no address", "trial").await;
    let profile = |id: &'static str| {
        let url = format!("{}/v1/profiles/{id}", server.url);
        async move { get_json(&url).await.1["attributes"].clone() }
    };
    let ann = profile("ann").await;
    assert_eq!((&ann["email_domain"], &ann["business_email"]), (&json!("example.com"), &json!(true)), "{ann}");
    let bob = profile("bob").await;
    assert_eq!((&bob["email_domain"], &bob["business_email"]), (&json!("gmail.com"), &json!(false)), "{bob}");
    let cy = profile("cy").await;
    assert!(cy.get("email_domain").is_none() && cy.get("business_email").is_none(), "{cy}");
    // Ann moves to a free-mail address: the enricher sees its earlier output and updates it.
    signup(&server, "ann", "Ann", "ann@proton.me", "trial").await;
    let ann = profile("ann").await;
    assert_eq!((&ann["email_domain"], &ann["business_email"]), (&json!("proton.me"), &json!(false)), "{ann}");
    assert!(!server.logs().contains("enricher `email-domain`"), "no enricher warning: {}", server.logs());
    server.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn the_javascript_crm_connector_upserts_contacts_with_fetch_within_its_allowed_hosts() {
    // The leave request is rate limited once, then accepted.
    let answer: Answer = Arc::new(|n, _| match n {
        1 => (429, vec![("retry-after", "1".to_string())], r#"{"message":"slow down"}"#.to_string()),
        _ => (200, vec![("content-type", "application/json".to_string())], r#"{"status":"COMPLETE"}"#.to_string()),
    });
    let receiver = Receiver::answering("127.0.0.1:0", answer).await;
    let dir = tempfile::tempdir().unwrap();
    let settings = r#"{ property = "in_trial" }"#;
    let params = r#"{ email = "email", firstname = "name" }"#;
    let actions = batched("crm_join", "crm", "joined", settings, params, 2)
        + &batched("crm_leave", "crm", "left", settings, params, 2);
    let plugin_config = format!("[plugin.crm]\naccess_token = \"pat-na1-secret\"\napi_base = \"{}\"\n", receiver.url);
    let server = Server::start(&config(dir.path(), "crm", &actions, &plugin_config));

    signup(&server, "ann", "Ann", "Ann@Example.com", "trial").await;
    signup(&server, "bob", "Bob", "bob@example.com", "trial").await;
    let got = eventually("the upsert", Duration::from_secs(30), async || {
        let got = receiver.received();
        (!got.is_empty()).then_some(got)
    })
    .await;
    let upsert = &got[0];
    assert_eq!((upsert.method.as_str(), upsert.path.as_str()), ("POST", "/crm/v3/objects/contacts/batch/upsert"));
    assert_eq!(upsert.header("authorization"), "Bearer pat-na1-secret");
    assert_eq!(upsert.header("content-type"), "application/json");
    let mut inputs = upsert.body["inputs"].as_array().unwrap().clone();
    inputs.sort_by_key(|i| i["id"].as_str().unwrap().to_string());
    let contact = |email: &str, name: &str, member: &str| json!({"idProperty": "email", "id": email, "properties": {"in_trial": member, "firstname": name}});
    assert_eq!(inputs, vec![contact("ann@example.com", "Ann", "true"), contact("bob@example.com", "Bob", "true")]);

    signup(&server, "bob", "Bob", "bob@example.com", "paid").await;
    let got = eventually("the leave, retried after the 429", Duration::from_secs(30), async || {
        let got = receiver.received();
        (got.len() == 3).then_some(got)
    })
    .await;
    assert_eq!(got[1].body, json!({"inputs": [contact("bob@example.com", "Bob", "false")]}));
    assert_eq!(got[2].body, got[1].body, "the same batch again");
    assert!(got[2].at - got[1].at >= Duration::from_secs(1), "no sooner than Retry-After");
    server.stop();

    // The same connector limited to the real service's host: fetch is refused by the host.
    let denied = tempfile::tempdir().unwrap();
    let path = config(denied.path(), "crm", &actions, &plugin_config);
    harness::install(harness::connectors(), "crm", &denied.path().join("plugins"), |manifest| {
        let start = manifest.find("allowed_hosts").expect("manifest lists allowed hosts");
        let end = start + manifest[start..].find('\n').unwrap();
        format!("{}allowed_hosts = [\"https://api.hubapi.com\"]{}", &manifest[..start], &manifest[end..])
    });
    let before = receiver.received().len();
    let server = Server::start(&path);
    signup(&server, "cy", "Cy", "cy@example.com", "trial").await;
    // StarlingMonkey's fetch traps rather than rejecting when the host refuses the request, so
    // the call fails as a whole and the action stays queued for retry; nothing leaves.
    let failed = eventually("the refused upsert to fail", Duration::from_secs(30), async || {
        let (_, rows) = get_json(&format!("{}/v1/actions", server.url)).await;
        rows["actions"]
            .as_array()?
            .iter()
            .find(|a| a["profile_id"] == "cy" && a["attempts"].as_u64() >= Some(1))
            .cloned()
    })
    .await;
    assert_ne!(failed["status"], "delivered", "{failed}");
    assert!(failed["last_error"].as_str().unwrap().contains("plugin `crm` failed"), "{failed}");
    assert_eq!(receiver.received().len(), before, "nothing reached the receiver");
    assert!(server.logs().contains("is not in the plugin's allowed hosts"), "{}", server.logs());
    server.stop();
}

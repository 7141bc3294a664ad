//! Operating the server: deletion and retention with connector delete actions, offline imports
//! through the CLI, live traces in the terminal, metrics and JSON logs, HTTPS, and the admin page
//! in headless Chromium.

use crate::harness::{self, Receiver, Server, eventually};
use serde_json::json;
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

const TOKEN: &str = "admin-token-for-tests-0123";
const KEY: &str = "web-key-for-tests-0123";

fn ops_config(dir: &Path, receiver: &str, server_extra: &str) -> PathBuf {
    let text = format!(
        r#"
[server]
database = "starling.db"
plugins = "plugins"
admin_token = "{TOKEN}"
audience_size_interval = "200ms"
{server_extra}

[[source]]
name = "web"
api_key = "{KEY}"

[retention]
inactive_after = "1h"
check_every = "1s"

[[attribute]]
name = "email"
scope = "visitor"
type = "visitor_id"

[[attribute]]
name = "spend"
scope = "visitor"
type = "number"

[[attribute]]
name = "store_spend"
scope = "omnichannel"
type = "number"

[[attribute]]
name = "stores"
scope = "omnichannel"
type = "set_of_strings"

[[enrichment]]
attribute = "email"
op = "set"
event = "email"

[[enrichment]]
attribute = "spend"
op = "increment"
event = "total"

[[enrichment]]
attribute = "store_spend"
op = "increment"
event = "amount"
when = "event:store_purchase"

[[enrichment]]
attribute = "stores"
op = "add"
event = "store"
when = "event:store_purchase"

[[audience]]
name = "spenders"
rule = {{ attribute = "spend", op = ">=", value = 100 }}

[[audience]]
name = "store_regulars"
rule = {{ attribute = "store_spend", op = ">=", value = 50 }}

[[action]]
name = "welcome"
audience = "spenders"
trigger = "joined"
connector = "webhook"
settings = {{ url = "{receiver}/joined" }}
params = {{ email = "email" }}

[[action]]
name = "regulars"
audience = "store_regulars"
trigger = "joined"
connector = "webhook"
settings = {{ url = "{receiver}/regulars" }}
params = {{ email = "email", store_spend = "store_spend" }}

[[action]]
name = "forget"
trigger = "deleted"
connector = "webhook"
settings = {{ url = "{receiver}/forget" }}
params = {{ email = "email" }}

[[event_spec]]
event = "purchase"
fields = {{ total = "number" }}

[[import]]
name = "store_purchases"
event = "store_purchase"
match = "email"
columns = {{ amount = "number", store = "string" }}
"#
    );
    let path = dir.join("starling.toml");
    std::fs::write(&path, text).unwrap();
    harness::install(harness::connectors(), "webhook", &dir.join("plugins"), |m| m);
    path
}

async fn ingest(server: &Server, body: serde_json::Value) -> serde_json::Value {
    let r = harness::client()
        .post(format!("{}/v1/events", server.url))
        .header("x-api-key", KEY)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 202);
    r.json().await.unwrap()
}

async fn admin_get(server: &Server, path: &str) -> (u16, serde_json::Value) {
    let r = harness::client().get(format!("{}{path}", server.url)).bearer_auth(TOKEN).send().await.unwrap();
    let status = r.status().as_u16();
    let text = r.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text)))
}

fn starling(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_starling")).args(args).env("STARLING_ADMIN_TOKEN", TOKEN).output().unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn deleting_a_person_fires_the_delete_action_and_retention_deletes_the_inactive() {
    let receiver = Receiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let config = ops_config(dir.path(), &receiver.url, "");
    let server = Server::start_with(&config, &["--test-clock"]);
    for (visitor, email) in [("ann", "ann@example.com"), ("bob", "bob@example.com"), ("cat", "cat@example.com")] {
        ingest(&server, json!({"event": "purchase", "visitor_id": visitor, "data": {"email": email, "total": 120}}))
            .await;
    }
    eventually("three welcome calls", Duration::from_secs(20), async || {
        (receiver.received().iter().filter(|r| r.path == "/joined").count() == 3).then_some(())
    })
    .await;

    let out = starling(&["profile", "--server", &server.url, "delete", "ann@example.com"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let answer: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!((answer["deleted"].as_bool(), answer["audit"]["reason"].as_str()), (Some(true), Some("request")));
    assert_eq!(answer["audit"]["actions_fired"], json!(["forget"]));
    assert!(!String::from_utf8_lossy(&out.stdout).contains("ann"), "no personal data in the audit record");
    let forget = eventually("the delete action", Duration::from_secs(20), async || {
        receiver.received().into_iter().find(|r| r.path == "/forget")
    })
    .await;
    assert_eq!(forget.body, json!({"email": "ann@example.com"}));
    assert_eq!(forget.header("x-starling-trigger"), "deleted", "connectors see a deletion as such");
    assert_eq!(admin_get(&server, "/v1/profiles/ann").await.0, 404);
    // Once carried out, nothing of the deletion request stays in the outbox either.
    eventually("the outbox to forget ann", Duration::from_secs(20), async || {
        let (_, actions) = admin_get(&server, "/v1/actions?limit=100").await;
        (!actions.to_string().contains("ann")).then_some(())
    })
    .await;
    let out = starling(&["profile", "--server", &server.url, "delete", "ann"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("404 Not Found: no profile for id `ann`"));
    // A single server is no cluster node: the cluster's status says so.
    let out = starling(&["cluster", "status", "--server", &server.url]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("is not a cluster node"), "{out:?}");

    // Two hours pass; bob is active again, cat is not: retention deletes cat only.
    let r = harness::client()
        .post(format!("{}/v1/test/clock", server.url))
        .bearer_auth(TOKEN)
        .json(&json!({"advance": "2h"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    ingest(&server, json!({"event": "view", "visitor_id": "bob"})).await;
    eventually("retention to delete cat", Duration::from_secs(20), async || {
        (admin_get(&server, "/v1/profiles/cat").await.0 == 404).then_some(())
    })
    .await;
    assert_eq!(admin_get(&server, "/v1/profiles/bob").await.0, 200);
    let (_, audit) = admin_get(&server, "/v1/audit").await;
    let reasons: Vec<&str> =
        audit["audit"].as_array().unwrap().iter().map(|r| r["detail"]["reason"].as_str().unwrap()).collect();
    assert_eq!(reasons, ["retention", "request"]);
    eventually("the delete action for cat", Duration::from_secs(20), async || {
        receiver.received().into_iter().find(|r| r.path == "/forget" && r.body == json!({"email": "cat@example.com"}))
    })
    .await;
    let (_, metrics) = admin_get(&server, "/metrics").await;
    let metrics = metrics.as_str().unwrap().to_string();
    assert!(metrics.contains("starling_profiles_deleted_total{reason=\"request\"} 1"), "{metrics}");
    assert!(metrics.contains("starling_profiles_deleted_total{reason=\"retention\"} 1"), "{metrics}");
    server.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn the_import_command_applies_rows_reports_rejects_and_continues_after_an_interruption() {
    let receiver = Receiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let config = ops_config(dir.path(), &receiver.url, "");
    let server = Server::start(&config);
    for (visitor, email) in [("ann", "ann@example.com"), ("bob", "bob@example.com")] {
        ingest(&server, json!({"event": "login", "visitor_id": visitor, "data": {"email": email}})).await;
    }
    let file = dir.path().join("store.csv");
    let mut csv = String::from("email,amount,store\n");
    for i in 0..10 {
        let who = if i % 2 == 0 { "ann@example.com" } else { "bob@example.com" };
        csv.push_str(&format!("{who},{},store-{}\n", 10 + i, i % 3));
    }
    csv.push_str("nobody@example.com,5,store-0\nann@example.com,lots,store-1\n");
    std::fs::write(&file, &csv).unwrap();

    // An earlier run stopped after four rows.
    let sha = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(csv.as_bytes()));
    let first: String = csv.lines().take(5).map(|l| format!("{l}\n")).collect();
    let r = harness::client()
        .post(format!("{}/v1/imports/store_purchases?format=csv&file={sha}", server.url))
        .bearer_auth(TOKEN)
        .body(first)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200, "{}", r.text().await.unwrap());

    let out = starling(&[
        "import",
        file.to_str().unwrap(),
        "--definition",
        "store_purchases",
        "--server",
        &server.url,
        "--rows-per-request",
        "3",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        stdout.contains("12 rows, 6 applied, 1 unmatched, 1 rejected, 0 already applied (continued after row 4)"),
        "{stdout}"
    );
    assert!(stdout.contains("row 12 (line 13): amount: `lots` is not a number"), "{stdout}");
    // Omnichannel attributes as if every row had been applied once.
    let (_, ann) = admin_get(&server, "/v1/profiles/ann@example.com").await;
    assert_eq!(ann["attributes"]["store_spend"], json!(10.0 + 12.0 + 14.0 + 16.0 + 18.0));
    assert_eq!(ann["attributes"]["stores"], json!(["store-0", "store-1", "store-2"]));
    assert_eq!(ann["audiences"], json!(["store_regulars"]));
    let (_, bob) = admin_get(&server, "/v1/profiles/bob").await;
    assert_eq!(bob["attributes"]["store_spend"], json!(11.0 + 13.0 + 15.0 + 17.0 + 19.0));
    let calls = eventually("two audience actions from the import", Duration::from_secs(20), async || {
        let got: Vec<_> = receiver.received().into_iter().filter(|r| r.path == "/regulars").collect();
        (got.len() == 2).then_some(got)
    })
    .await;
    // Each joined when its store spend crossed 50: ann at 10 + 12 + 14 + 16, bob at 11 + 13 + 15 + 17.
    let mut bodies: Vec<String> = calls.iter().map(|c| c.body.to_string()).collect();
    bodies.sort();
    assert_eq!(
        bodies,
        [r#"{"email":"ann@example.com","store_spend":52.0}"#, r#"{"email":"bob@example.com","store_spend":56.0}"#]
    );

    // Run again: everything was done.
    let out = starling(&["import", file.to_str().unwrap(), "--definition", "store_purchases", "--server", &server.url]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("0 applied") && stdout.contains("continued after row 12"), "{stdout}");
    let (_, ann_again) = admin_get(&server, "/v1/profiles/ann").await;
    assert_eq!(ann_again["attributes"]["store_spend"], ann["attributes"]["store_spend"]);

    let out = starling(&["import", file.to_str().unwrap(), "--definition", "nope", "--server", &server.url]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no import definition `nope`"));
    server.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn an_import_takes_memory_for_a_group_of_rows_not_for_the_file() {
    let receiver = Receiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let config = ops_config(dir.path(), &receiver.url, "");
    let server = Server::start(&config);
    ingest(&server, json!({"event": "login", "visitor_id": "ann", "data": {"email": "ann@example.com"}})).await;
    // 8 MB of rows; parsed all at once they took about 20 times the file.
    let mut csv = String::from("email,amount,store\n");
    let mut rows = 0;
    while csv.len() < 8 << 20 {
        csv.push_str(&format!("visitor-{rows}@example.com,{}.5,store number {}\n", rows % 500, rows % 17));
        rows += 1;
    }
    let file_kib = csv.len() as u64 / 1024;
    let before = server.peak_rss_kib();
    let r = harness::client()
        .post(format!("{}/v1/imports/store_purchases?format=csv", server.url))
        .bearer_auth(TOKEN)
        .body(csv)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let summary: serde_json::Value = r.json().await.unwrap();
    assert_eq!(summary["rows"], rows);
    assert_eq!(summary["unmatched"], rows);
    // The body itself, a group of rows, and SQLite's page cache growing with the writes (up to
    // 16 MiB): a few times the file, against twenty times when the file was parsed whole.
    let grown = server.peak_rss_kib().saturating_sub(before);
    assert!(grown < 6 * file_kib, "importing {file_kib} KiB took {grown} KiB more memory at the peak");
    server.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn the_trace_command_follows_a_visitor_through_every_step() {
    let receiver = Receiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let config = ops_config(dir.path(), &receiver.url, "");
    let server = Server::start(&config);
    let mut trace = Command::new(env!("CARGO_BIN_EXE_starling"))
        .args(["trace", "dee", "--server", &server.url])
        .env("STARLING_ADMIN_TOKEN", TOKEN)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let (tx, lines) = std::sync::mpsc::channel();
    let stdout = trace.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut seen = Vec::new();
    let wait_for = |marker: &str, seen: &mut Vec<String>| {
        while !seen.iter().any(|l| l.contains(marker)) {
            seen.push(
                lines.recv_timeout(Duration::from_secs(20)).unwrap_or_else(|_| panic!("no `{marker}` in {seen:#?}")),
            );
        }
    };
    wait_for("tracing", &mut seen);
    ingest(&server, json!({"event": "purchase", "visitor_id": "someone-else", "data": {"total": 500}})).await;
    ingest(
        &server,
        json!({"event": "purchase", "visitor_id": "dee", "data": {"email": "dee@example.com", "total": 150}}),
    )
    .await;
    // The delivery can be traced before the batch's commit is: each is waited for.
    wait_for("delivery of welcome", &mut seen);
    wait_for("  stored", &mut seen);
    let _ = trace.kill();
    let _ = trace.wait();
    let text = seen.join("\n");
    for expected in [
        "purchase from dee → profile dee, new visitor, new visit",
        "  enriched: email = \"dee@example.com\", spend = 150",
        "  audiences: joined [spenders], left []; member of [spenders]",
        "    spenders: {",
        "  queued: welcome via webhook (joined)",
        "  stored",
        "  delivery of welcome via webhook: delivered (attempt 1,",
    ] {
        assert!(text.contains(expected), "`{expected}` not in:\n{text}");
    }
    assert!(!text.contains("someone-else"), "{text}");
    server.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_count_what_happened_and_logs_can_be_json() {
    let receiver = Receiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let config = ops_config(dir.path(), &receiver.url, "");
    let server = Server::start_with(&config, &["--log-json"]);
    ingest(
        &server,
        json!({"event": "purchase", "visitor_id": "eve", "data": {"email": "eve@example.com", "total": 100}}),
    )
    .await;
    let r = harness::client()
        .post(format!("{}/v1/events", server.url))
        .header("x-api-key", KEY)
        .json(&json!({"event": "purchase", "visitor_id": "eve", "data": {"total": "lots"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"], "data.total: expected number by the `purchase` spec, found a string");
    let expected = [
        "starling_events_accepted_total 1",
        "starling_events_rejected_total{reason=\"spec\"} 1",
        "starling_deliveries_total{action=\"welcome\",result=\"delivered\"} 1",
        "starling_audience_size{name=\"spenders\"} 1",
        "starling_actions_pending{action=\"welcome\"} 0",
        "starling_plugin_calls{name=\"webhook\"} 1",
        "starling_plugin_failures{name=\"webhook\"} 0",
        "starling_delivery_seconds_count{action=\"welcome\"} 1",
        "starling_event_apply_seconds_count 1",
    ];
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let last = loop {
        let (_, m) = admin_get(&server, "/metrics").await;
        let last = m.as_str().unwrap().to_string();
        let missing: Vec<&&str> = expected.iter().filter(|e| !last.lines().any(|l| l == **e)).collect();
        if missing.is_empty() {
            break last;
        }
        assert!(std::time::Instant::now() < deadline, "{missing:?} not in\n{last}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(last.contains("# TYPE starling_commit_seconds histogram"), "{last}");
    assert_eq!(harness::client().get(format!("{}/metrics", server.url)).send().await.unwrap().status().as_u16(), 401);
    server.stop();
    let logs = std::fs::read_to_string(config.with_extension("log")).unwrap();
    let lines: Vec<serde_json::Value> =
        logs.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"))).collect();
    assert!(lines.iter().any(|l| l["fields"]["message"] == "plugins ready"), "{logs}");
    assert!(lines.iter().all(|l| l["level"].is_string() && l["timestamp"].is_string()), "{logs}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_server_speaks_https_when_given_a_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let status = Command::new("openssl")
        .args(["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2"])
        .args(["-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"])
        .args(["-keyout", "key.pem", "-out", "cert.pem"])
        .current_dir(dir.path())
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    let config = ops_config(dir.path(), "http://127.0.0.1:9", "tls_cert = \"cert.pem\"\ntls_key = \"key.pem\"");
    let server = Server::start(&config);
    assert!(server.url.starts_with("https://127.0.0.1:"), "{}", server.url);
    let out = Command::new("curl")
        .args(["-sS", "--cacert"])
        .arg(dir.path().join("cert.pem"))
        .arg(format!("{}/healthz", server.url))
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "{\"status\":\"ok\"}", "{}", String::from_utf8_lossy(&out.stderr));
    let plain = server.url.replace("https://", "http://");
    let out = Command::new("curl").args(["-sS", "--max-time", "5"]).arg(format!("{plain}/healthz")).output().unwrap();
    assert!(!String::from_utf8_lossy(&out.stdout).contains("ok"), "plain HTTP is not served");
    let out = Command::new("curl")
        .args(["-sS", "--cacert"])
        .arg(dir.path().join("cert.pem"))
        .arg(format!("{}/v1/audiences", server.url))
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("admin token (Authorization: Bearer) required"));
    server.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn the_admin_page_looks_up_a_profile_in_headless_chromium() {
    let receiver = Receiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let config = ops_config(dir.path(), &receiver.url, "");
    let server = Server::start(&config);
    ingest(
        &server,
        json!({"event": "purchase", "visitor_id": "fay", "data": {"email": "fay@example.com", "total": 130}}),
    )
    .await;
    ingest(
        &server,
        json!({"event": "purchase", "visitor_id": "gus", "data": {"email": "gus@example.com", "total": 20}}),
    )
    .await;
    // Let a few size samples accumulate for the charts.
    tokio::time::sleep(Duration::from_millis(800)).await;
    let shot = dir.path().join("admin.png");
    let out = Command::new(harness::root().join("scripts/admin-check.sh"))
        .arg(&server.url)
        .arg("fay@example.com")
        .arg(&shot)
        .arg(TOKEN)
        .output()
        .unwrap();
    let dom = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(dom.contains(r#"<strong id="profile-found">fay</strong>"#), "the lookup found the profile:\n{dom}");
    assert!(dom.contains(r#"<tr data-attribute="spend"><td>spend</td><td><code>130</code></td></tr>"#), "{dom}");
    assert!(dom.contains(r#"<tr data-audience="spenders"><td>spenders</td><td class="yes">yes</td>"#), "{dom}");
    assert!(dom.contains("✓ spend &gt;= 100  (is 130)"), "the explanation of the membership:\n{dom}");
    assert!(dom.contains(r#"<td class="size">1</td>"#), "audience sizes:\n{dom}");
    assert!(dom.contains(r#"data-plugin="webhook""#), "plugin status:\n{dom}");
    assert!(dom.contains(r#"<path d="M"#), "charts drawn:\n{dom}");
    assert!(!dom.contains(r#"<p class="error" id="profile-error">"#), "{dom}");
    let png = std::fs::read(&shot).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    assert!(png.len() > 20_000, "a real screenshot, not a blank page: {} bytes", png.len());
    // Without the token the page says what is wrong instead of showing data.
    let out = Command::new(harness::root().join("scripts/admin-check.sh"))
        .arg(&server.url)
        .arg("fay")
        .arg(dir.path().join("denied.png"))
        .output()
        .unwrap();
    let dom = String::from_utf8_lossy(&out.stdout);
    assert!(dom.contains("admin token (Authorization: Bearer) required"), "{dom}");
    assert!(!dom.contains(r#"<strong id="profile-found">"#), "{dom}");
    server.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_page_on_another_site_cannot_use_the_admin_api_or_rebind_a_name_to_it() {
    let receiver = Receiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let config = ops_config(dir.path(), &receiver.url, "");
    let server = Server::start(&config);
    ingest(&server, json!({"event": "view", "visitor_id": "ann"})).await;
    let profile = format!("{}/v1/profiles/ann", server.url);
    let client = harness::client();
    let status = |r: reqwest::Response| r.status().as_u16();

    // DNS rebinding: the attacker's name resolves to 127.0.0.1, the browser sends its Host.
    let rebound = client.get(&profile).bearer_auth(TOKEN).header("host", "attacker.example:80").send().await.unwrap();
    assert_eq!(rebound.status().as_u16(), 403);
    assert!(rebound.text().await.unwrap().contains("Host `attacker.example:80` is not a name of this server"));
    let events = client
        .post(format!("{}/v1/events", server.url))
        .header("host", "attacker.example")
        .header("x-api-key", KEY)
        .json(&json!({"event": "view", "visitor_id": "ann"}))
        .send()
        .await
        .unwrap();
    assert_eq!(status(events), 403, "ingestion too is refused under a name that is not the server's");
    let local = format!("{}/v1/profiles/ann", server.url.replace("127.0.0.1", "localhost"));
    assert_eq!(status(client.get(&local).bearer_auth(TOKEN).send().await.unwrap()), 200);

    // A cross-site form post (text/plain, no preflight) to an admin call.
    let unstitch = client
        .post(format!("{}/v1/profiles/ann/unstitch", server.url))
        .bearer_auth(TOKEN)
        .header("origin", "https://evil.example")
        .header("content-type", "text/plain")
        .body(r#"{"id":"ann"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(unstitch.status().as_u16(), 403);
    assert!(unstitch.text().await.unwrap().contains("admin requests from another site's page are refused"));
    let fetched = client.get(&profile).bearer_auth(TOKEN).header("sec-fetch-site", "cross-site").send().await;
    assert_eq!(status(fetched.unwrap()), 403);
    // Tracking code on a shop's pages posts from its own site: ingestion stays open to it.
    let tracked = client
        .post(format!("{}/v1/events", server.url))
        .header("origin", "https://shop.example")
        .header("x-api-key", KEY)
        .json(&json!({"event": "view", "visitor_id": "ann"}))
        .send()
        .await
        .unwrap();
    assert_eq!(status(tracked), 202);
    let (_, body) = admin_get(&server, "/v1/profiles/ann").await;
    assert_eq!(body["event_count"], 2);
    server.stop();

    // Off loopback, the server does not start without an admin token.
    let text = std::fs::read_to_string(dir.path().join("starling.toml")).unwrap();
    std::fs::write(dir.path().join("starling.toml"), text.replace(&format!("admin_token = \"{TOKEN}\""), "")).unwrap();
    let open = Command::new(env!("CARGO_BIN_EXE_starling"))
        .current_dir(dir.path())
        .args(["serve", "--config", "starling.toml", "--listen", "0.0.0.0:0"])
        .output()
        .unwrap();
    assert!(!open.status.success());
    let said = String::from_utf8_lossy(&open.stderr);
    assert!(said.contains("refusing to listen on 0.0.0.0:"), "{said}");
    assert!(said.contains("without an admin token"), "{said}");
}

/// Sends `bytes` on a new connection and returns what the server answered before it closed
/// the connection, and how long that took (or `None` if it said nothing within `wait`).
async fn raw_exchange(addr: &str, bytes: &[u8], wait: Duration) -> (Option<String>, Duration) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let started = std::time::Instant::now();
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(bytes).await.unwrap();
    let mut answer = Vec::new();
    match tokio::time::timeout(wait, stream.read_to_end(&mut answer)).await {
        Ok(_) => (Some(String::from_utf8_lossy(&answer).into_owned()), started.elapsed()),
        Err(_) => (None, started.elapsed()),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn slow_clients_are_cut_off_and_keys_are_checked_before_bodies() {
    let receiver = Receiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let limits = "header_timeout = \"1s\"\nbody_timeout = \"2s\"\nmax_connections = 4";
    let server = Server::start(&ops_config(dir.path(), &receiver.url, limits));
    let addr = server.url.trim_start_matches("http://").to_string();
    let wait = Duration::from_secs(10);

    // A key is checked from the headers: a request without one is answered at once, its
    // announced megabyte never read.
    let keyless = "POST /v1/events HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: 1000000\r\n\r\n";
    let (answer, took) = raw_exchange(&addr, keyless.as_bytes(), wait).await;
    let answer = answer.expect("an answer");
    assert!(answer.starts_with("HTTP/1.1 401"), "{answer}");
    assert!(took < Duration::from_millis(1500), "answered after {took:?}: the body was waited for");

    // Headers trickled and never finished: the connection is closed after header_timeout.
    let (answer, took) = raw_exchange(&addr, b"POST /v1/events HTTP/1.1\r\nHost: 127.0.0.1\r\n", wait).await;
    assert!(answer.is_some(), "the connection stayed open {took:?}");
    assert!(took >= Duration::from_millis(900) && took < Duration::from_secs(5), "{took:?}");

    // A body that stops coming: 408 after body_timeout, nothing applied.
    let partial = format!(
        "POST /v1/events HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Api-Key: {KEY}\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"event\":\"view\","
    );
    let (answer, took) = raw_exchange(&addr, partial.as_bytes(), wait).await;
    let answer = answer.expect("an answer");
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("did not arrive within server.body_timeout"), "{answer}");
    assert!(took >= Duration::from_millis(1900) && took < Duration::from_secs(6), "{took:?}");

    // Four connections held open (each sending its headers slowly, a byte at a time) fill the
    // server; a fifth waits to be accepted until one of them ends.
    let mut holders = Vec::new();
    for _ in 0..4 {
        let addr = addr.clone();
        holders.push(tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            let mut stream = tokio::net::TcpStream::connect(&addr).await.unwrap();
            stream.write_all(b"G").await.unwrap();
            tokio::time::sleep(Duration::from_millis(700)).await;
            drop(stream);
        }));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = std::time::Instant::now();
    let (status, _) = admin_get(&server, "/v1/audiences").await;
    assert_eq!(status, 200);
    assert!(started.elapsed() >= Duration::from_millis(300), "served at once beyond the cap: {:?}", started.elapsed());
    for holder in holders {
        holder.await.unwrap();
    }
    server.stop();
}

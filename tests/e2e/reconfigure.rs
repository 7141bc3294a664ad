//! Changing the configuration of a live server: apply over HTTP and SIGHUP, evolution of stored
//! data, backfills, previews and backtests.

use crate::harness::{self, Receiver, Server, eventually, get_json};
use serde_json::json;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

const PEOPLE: usize = 300;

fn before(receiver: &str) -> String {
    format!(
        r#"
[server]
database = "starling.db"
plugins = "plugins"

[[attribute]]
name = "a"
scope = "visitor"
type = "number"

[[attribute]]
name = "price"
scope = "visitor"
type = "number"

[[attribute]]
name = "code"
scope = "visitor"
type = "string"

[[attribute]]
name = "gone"
scope = "visitor"
type = "string"

[[enrichment]]
attribute = "a"
op = "set"
event = "a"

[[enrichment]]
attribute = "price"
op = "set"
event = "price"

[[enrichment]]
attribute = "code"
op = "set"
event = "code"

[[enrichment]]
attribute = "gone"
op = "set"
event = "gone"

[[audience]]
name = "big_a"
rule = {{ attribute = "a", op = ">", value = 100 }}

[[audience]]
name = "old_aud"
rule = {{ attribute = "gone", op = "is_assigned" }}

[[action]]
name = "old_hook"
audience = "old_aud"
trigger = "joined"
connector = "webhook"
settings = {{ url = "{receiver}/old" }}
retry_initial = "1h"
retry_max = "2h"
"#
    )
}

/// `before` changed: `price` becomes a string, `code` a number, `gone` and `old_aud` and
/// `old_hook` go, `big_a` changes its rule, `any_a` is added with one action that fires on
/// backfill and one that does not.
fn after(receiver: &str) -> String {
    before(receiver)
        .replace(
            "name = \"price\"\nscope = \"visitor\"\ntype = \"number\"",
            "name = \"price\"\nscope = \"visitor\"\ntype = \"string\"",
        )
        .replace(
            "name = \"code\"\nscope = \"visitor\"\ntype = \"string\"",
            "name = \"code\"\nscope = \"visitor\"\ntype = \"number\"",
        )
        .replace("[[attribute]]\nname = \"gone\"\nscope = \"visitor\"\ntype = \"string\"\n", "")
        .replace("[[enrichment]]\nattribute = \"gone\"\nop = \"set\"\nevent = \"gone\"\n", "")
        .split("[[audience]]\nname = \"old_aud\"")
        .next()
        .unwrap()
        .replace("value = 100 }", "value = 200 }")
        + &format!(
            r#"
[[audience]]
name = "any_a"
rule = {{ attribute = "a", op = "is_assigned" }}

[[action]]
name = "greet"
audience = "any_a"
trigger = "joined"
connector = "webhook"
settings = {{ url = "{receiver}/greet" }}
on_backfill = "fire"

[[action]]
name = "quiet"
audience = "any_a"
trigger = "joined"
connector = "webhook"
settings = {{ url = "{receiver}/quiet" }}
"#
        )
}

fn write_config(dir: &Path, text: &str) -> std::path::PathBuf {
    let path = dir.join("starling.toml");
    std::fs::write(&path, text).unwrap();
    std::fs::create_dir_all(dir.join("plugins")).unwrap();
    path
}

/// Person `i`: `a` = i, `price` = i, `code` numeric for even people only, `gone` set.
fn person(i: usize) -> serde_json::Value {
    let code = if i.is_multiple_of(2) { json!(format!("{}", 1000 + i)) } else { json!(format!("x{i}")) };
    json!({ "event": "seen", "visitor_id": format!("p{i}"), "data": { "a": i, "price": i, "code": code, "gone": "yes" } })
}

async fn send_people(server: &Server) {
    let events: Vec<_> = (0..PEOPLE).map(person).collect();
    for chunk in events.chunks(100) {
        let (status, _) = harness::post_json(&format!("{}/v1/events", server.url), &json!({ "events": chunk })).await;
        assert_eq!(status, 202);
    }
}

fn starling(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_starling")).args(args).output().unwrap()
}

fn text(output: &std::process::Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr))
}

async fn size(server: &Server, audience: &str) -> u64 {
    let (status, body) = get_json(&format!("{}/v1/audiences/{audience}", server.url)).await;
    assert_eq!(status, 200, "{body}");
    body["size"].as_u64().unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_configuration_applied_live_evolves_stored_data_and_backfills_memberships_exactly() {
    let dir = tempfile::tempdir().unwrap();
    // Deliveries of `old_hook` fail and wait an hour: they are pending when the action goes.
    let receiver = Receiver::start_on("127.0.0.1:0", std::sync::Arc::new(|_| (200, vec![]))).await;
    let failing = Receiver::start_on("127.0.0.1:0", std::sync::Arc::new(|_| (503, vec![]))).await;
    let config = write_config(dir.path(), &before(&failing.url));
    harness::install(harness::connectors(), "webhook", &dir.path().join("plugins"), |m| m);
    let server = Server::start(&config);
    send_people(&server).await;
    assert_eq!(size(&server, "old_aud").await, PEOPLE as u64);
    // Its lane tries, fails, and (its breaker open) leaves the rest waiting.
    eventually("old_hook's first attempts", Duration::from_secs(30), async || {
        (!failing.received().is_empty()).then_some(())
    })
    .await;
    let (_, v1) = get_json(&format!("{}/v1/config", server.url)).await;
    assert_eq!((v1["version"].as_i64(), v1["how"].as_str()), (Some(1), Some("start")), "{v1}");

    // What the change will do, offline.
    let new_file = dir.path().join("new.toml");
    std::fs::write(&new_file, after(&receiver.url)).unwrap();
    let diff = starling(&["config", "diff", config.to_str().unwrap(), new_file.to_str().unwrap()]);
    let diff_text = text(&diff);
    assert!(diff.status.success(), "{diff_text}");
    for expected in [
        "- dropped    gone",
        "~ converted  price  number → string",
        "~ converted  code  string → number",
        "+ added      any_a",
        "~ changed    big_a",
        "- removed    old_aud  (memberships removed; `left` does not fire)",
        "- removed    old_hook  (pending deliveries are cancelled)",
        "fire greet (on_backfill = \"fire\")",
    ] {
        assert!(diff_text.contains(expected), "`{expected}` missing from:\n{diff_text}");
    }

    // A change with an error changes nothing, and names the line and column.
    let broken = after(&receiver.url).replace("op = \"is_assigned\" }", "op = \"is_assigned\", value = 1, bogus = 2 }");
    std::fs::write(dir.path().join("broken.toml"), &broken).unwrap();
    let refused =
        starling(&["config", "apply", dir.path().join("broken.toml").to_str().unwrap(), "--server", &server.url]);
    let refused_text = text(&refused);
    assert!(!refused.status.success());
    let line = broken.lines().position(|l| l.contains("bogus")).unwrap() + 1;
    assert!(refused_text.contains(&format!("broken.toml:{line}:")), "{refused_text}");
    assert!(refused_text.contains("nothing was changed"), "{refused_text}");
    let (_, still) = get_json(&format!("{}/v1/config", server.url)).await;
    assert_eq!(still["version"], 1);
    assert_eq!(size(&server, "old_aud").await, PEOPLE as u64);

    // Applied: the command follows the backfill to its end.
    let applied = starling(&["config", "apply", new_file.to_str().unwrap(), "--server", &server.url]);
    let applied_text = text(&applied);
    assert!(applied.status.success(), "{applied_text}");
    assert!(applied_text.contains("applied as version 2"), "{applied_text}");
    assert!(applied_text.contains("backfill done"), "{applied_text}");
    assert!(applied_text.contains(&format!("{PEOPLE} memberships removed")), "{applied_text}");

    // Memberships are exact: as a from-scratch evaluation of the rules over the people sent.
    assert_eq!(size(&server, "any_a").await, PEOPLE as u64);
    assert_eq!(size(&server, "big_a").await, (0..PEOPLE).filter(|i| *i > 200).count() as u64);
    let (status, _) = get_json(&format!("{}/v1/audiences/old_aud", server.url)).await;
    assert_eq!(status, 404);
    let (_, any_a) = get_json(&format!("{}/v1/audiences/any_a", server.url)).await;
    assert_eq!(any_a["backfill"]["done"], any_a["backfill"]["total"], "{any_a}");
    assert_eq!(any_a["backfill"]["finished"], true, "{any_a}");

    // Stored values converted or dropped as documented.
    let (_, p7) = get_json(&format!("{}/v1/profiles/p7", server.url)).await;
    assert_eq!(p7["attributes"]["price"], "7", "{p7}");
    assert!(p7["attributes"].get("code").is_none(), "`x7` is not a number: dropped\n{p7}");
    assert!(p7["attributes"].get("gone").is_none(), "{p7}");
    assert!(!p7["audiences"].as_array().unwrap().contains(&json!("old_aud")), "{p7}");
    let (_, p8) = get_json(&format!("{}/v1/profiles/p8", server.url)).await;
    assert_eq!(p8["attributes"]["code"], 1008.0, "{p8}");

    // `greet` fires for every person the backfill joined; `quiet` for none; nothing `left`.
    eventually("greet for everyone", Duration::from_secs(60), async || {
        (receiver.received().iter().filter(|r| r.path == "/greet").count() >= PEOPLE).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let got = receiver.received();
    assert_eq!(got.iter().filter(|r| r.path == "/greet").count(), PEOPLE);
    assert_eq!(got.iter().filter(|r| r.path == "/quiet").count(), 0);
    // `old_hook`'s pending deliveries were cancelled.
    let (_, pending) = get_json(&format!("{}/v1/actions?status=pending&limit=1000", server.url)).await;
    assert!(!pending["actions"].as_array().unwrap().iter().any(|a| a["action"] == "old_hook"));
    let (_, cancelled) = get_json(&format!("{}/v1/actions?status=cancelled&limit=1000", server.url)).await;
    assert_eq!(cancelled["actions"].as_array().unwrap().iter().filter(|a| a["action"] == "old_hook").count(), PEOPLE);

    // The active configuration and the one before it.
    let (_, v2) = get_json(&format!("{}/v1/config", server.url)).await;
    assert_eq!((v2["version"].as_i64(), v2["how"].as_str()), (Some(2), Some("apply")), "{v2}");
    let sha = sha256_hex(&std::fs::read_to_string(&new_file).unwrap());
    assert_eq!(v2["sha256"], sha);
    let (_, history) = get_json(&format!("{}/v1/config/history", server.url)).await;
    assert_eq!(history["configurations"][0]["version"], 1, "{history}");

    // SIGHUP reads the file again: a new audience, backfilled.
    let hup = std::fs::read_to_string(&new_file).unwrap()
        + "\n[[audience]]\nname = \"small_a\"\nrule = { attribute = \"a\", op = \"<\", value = 10 }\n";
    std::fs::write(&config, &hup).unwrap();
    assert!(Command::new("kill").args(["-HUP", &server.pid().to_string()]).status().unwrap().success());
    eventually("the reloaded configuration", Duration::from_secs(30), async || {
        let (_, c) = get_json(&format!("{}/v1/config", server.url)).await;
        (c["version"] == 3
            && c["how"] == "reload"
            && c["backfill"]["version"] == 3
            && c["backfill"]["finished"] == true)
            .then_some(())
    })
    .await;
    assert_eq!(size(&server, "small_a").await, 10);

    // A restart on another file applies the difference as a live change would.
    server.stop();
    let restarted = hup.replace("value = 10 }", "value = 20 }");
    std::fs::write(&config, &restarted).unwrap();
    let server = Server::start(&config);
    eventually("the backfill after the restart", Duration::from_secs(30), async || {
        let (_, c) = get_json(&format!("{}/v1/config", server.url)).await;
        (c["version"] == 4 && c["how"] == "start" && c["backfill"]["version"] == 4 && c["backfill"]["finished"] == true)
            .then_some(())
    })
    .await;
    assert_eq!(size(&server, "small_a").await, 20);
    assert_eq!(size(&server, "any_a").await, PEOPLE as u64);
    assert!(
        server.logs().contains("starting on a configuration other than the one this database was last served with")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn configuration_changes_under_load_lose_no_event() {
    let dir = tempfile::tempdir().unwrap();
    let base = r#"
[server]
database = "starling.db"

[[attribute]]
name = "n"
scope = "visitor"
type = "number"

[[enrichment]]
attribute = "n"
op = "increment"
"#;
    let config = write_config(dir.path(), base);
    let server = Server::start(&config);
    const SENDERS: usize = 4;
    const BATCHES: usize = 60;
    let url = server.url.clone();
    let senders: Vec<_> = (0..SENDERS)
        .map(|s| {
            let url = url.clone();
            tokio::spawn(async move {
                for b in 0..BATCHES {
                    let events: Vec<_> = (0..20)
                        .map(|i| json!({ "event": "e", "visitor_id": format!("v{s}-{i}"), "id": format!("{s}-{b}-{i}") }))
                        .collect();
                    loop {
                        let (status, _) = harness::post_json(&format!("{url}/v1/events"), &json!({ "events": events })).await;
                        match status {
                            202 => break,
                            429 | 503 => tokio::time::sleep(Duration::from_millis(20)).await,
                            other => panic!("ingestion answered {other}"),
                        }
                    }
                }
            })
        })
        .collect();
    // Five changes while the senders run, each adding or changing an audience over `n`.
    for k in 0..5 {
        let text = format!(
            "{base}\n[[audience]]\nname = \"at_least\"\nrule = {{ attribute = \"n\", op = \">=\", value = {} }}\n",
            10 * (k + 1)
        );
        let r = harness::client().put(format!("{url}/v1/config")).body(text).send().await.unwrap();
        assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for s in senders {
        s.await.unwrap();
    }
    for s in 0..SENDERS {
        for i in 0..20 {
            let (_, p) = get_json(&format!("{url}/v1/profiles/v{s}-{i}")).await;
            assert_eq!(p["attributes"]["n"], BATCHES as f64, "v{s}-{i}: {p}");
            assert_eq!(p["event_count"], BATCHES, "v{s}-{i}: {p}");
        }
    }
    eventually("the last backfill", Duration::from_secs(30), async || {
        let (_, c) = get_json(&format!("{url}/v1/config")).await;
        (c["version"] == 6 && c["backfill"]["version"] == 6 && c["backfill"]["finished"] == true).then_some(())
    })
    .await;
    assert_eq!(size(&server, "at_least").await, (SENDERS * 20) as u64, "every profile has n = {BATCHES} ≥ 50");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rule_is_previewed_over_stored_profiles_and_a_change_is_backtested_over_recorded_events() {
    let dir = tempfile::tempdir().unwrap();
    let receiver = Receiver::start().await;
    let config = write_config(dir.path(), &before(&receiver.url));
    harness::install(harness::connectors(), "webhook", &dir.path().join("plugins"), |m| m);
    let server = Server::start(&config);
    send_people(&server).await;

    // Preview: TOML, JSON, and the command; nothing changes.
    let preview = |body: &str| {
        let (url, body) = (format!("{}/v1/audiences/preview", server.url), body.to_string());
        async move {
            let r = harness::client().post(url).body(body).send().await.unwrap();
            (r.status().as_u16(), r.json::<serde_json::Value>().await.unwrap())
        }
    };
    let (status, toml) = preview(r#"{ attribute = "a", op = ">=", value = 250 }"#).await;
    assert_eq!(status, 200, "{toml}");
    assert_eq!(toml["size"], 50);
    assert_eq!(toml["profiles"], PEOPLE);
    assert_eq!(toml["sample"].as_array().unwrap().len(), 10);
    let overlap =
        |a: &str| toml["overlap"].as_array().unwrap().iter().find(|o| o["audience"] == a).unwrap()["overlap"].clone();
    assert_eq!((overlap("big_a"), overlap("old_aud")), (json!(50), json!(50)));
    let (_, json_rule) = preview(r#"{"rule": {"attribute": "a", "op": ">=", "value": 250}}"#).await;
    assert_eq!(json_rule["size"], 50);
    let (status, bad) = preview(r#"{ attribute = "nope", op = "is_assigned" }"#).await;
    assert_eq!(status, 400);
    assert!(bad["error"].as_str().unwrap().contains("1:15"), "{bad}");
    let command = starling(&[
        "audience",
        "preview",
        "--rule",
        r#"{ attribute = "a", op = "<", value = 5 }"#,
        "--server",
        &server.url,
    ]);
    let command_text = text(&command);
    assert!(command.status.success(), "{command_text}");
    assert!(command_text.contains(&format!("5 of {PEOPLE} profiles match")), "{command_text}");
    let (_, v) = get_json(&format!("{}/v1/config", server.url)).await;
    assert_eq!(v["version"], 1, "a preview changes nothing");

    // Backtest: the recorded events through the running configuration and through `after`.
    let new_file = dir.path().join("new.toml");
    std::fs::write(&new_file, after(&receiver.url)).unwrap();
    let report =
        starling(&["backtest", new_file.to_str().unwrap(), "--since", "1h", "--json", "--server", &server.url]);
    let report_text = text(&report);
    assert!(report.status.success(), "{report_text}");
    let report: serde_json::Value = serde_json::from_slice(&report.stdout).unwrap();
    assert_eq!(report["events"], PEOPLE);
    let audience =
        |name: &str| report["audiences"].as_array().unwrap().iter().find(|a| a["audience"] == name).unwrap().clone();
    assert_eq!((audience("big_a")["running"].clone(), audience("big_a")["new"].clone()), (json!(199), json!(99)));
    assert_eq!((audience("any_a")["running"].clone(), audience("any_a")["new"].clone()), (json!(null), json!(PEOPLE)));
    assert_eq!(
        (audience("old_aud")["running"].clone(), audience("old_aud")["new"].clone()),
        (json!(PEOPLE), json!(null))
    );
    let action =
        |name: &str| report["actions"].as_array().unwrap().iter().find(|a| a["action"] == name).unwrap().clone();
    assert_eq!(
        (action("old_hook")["running"].clone(), action("old_hook")["new"].clone()),
        (json!(PEOPLE), json!(null))
    );
    assert_eq!(action("greet")["new"], PEOPLE, "replayed events join as they come: actions fire");
    let table = starling(&["backtest", new_file.to_str().unwrap(), "--since", "1h", "--server", &server.url]);
    let table_text = text(&table);
    assert!(table_text.contains("big_a") && table_text.contains("-100"), "{table_text}");
    // Nothing was delivered for the backtest, and nothing changed.
    assert!(receiver.received().iter().all(|r| r.path == "/old"), "a backtest delivers nothing");
    let (_, v) = get_json(&format!("{}/v1/config", server.url)).await;
    assert_eq!(v["version"], 1);
}

fn sha256_hex(text: &str) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(text.as_bytes()))
}

#[tokio::test(flavor = "multi_thread")]
async fn plugins_a_new_configuration_names_are_loaded_and_those_no_longer_named_unloaded() {
    let dir = tempfile::tempdir().unwrap();
    let receiver = Receiver::start().await;
    let bare = "[server]\ndatabase = \"starling.db\"\nplugins = \"plugins\"\n\n[[attribute]]\nname = \"n\"\nscope = \"visitor\"\ntype = \"number\"\n\n[[enrichment]]\nattribute = \"n\"\nop = \"increment\"\n\n[[audience]]\nname = \"seen\"\nrule = { attribute = \"n\", op = \">=\", value = 1 }\n";
    let config = write_config(dir.path(), bare);
    let server = Server::start(&config);
    let plugins = async || {
        let (_, p) = get_json(&format!("{}/v1/plugins", server.url)).await;
        p["plugins"].as_array().unwrap().iter().map(|p| p["name"].as_str().unwrap().to_string()).collect::<Vec<_>>()
    };
    assert!(plugins().await.is_empty());
    let hooked = format!(
        "{bare}\n[[action]]\nname = \"hook\"\naudience = \"seen\"\ntrigger = \"joined\"\nconnector = \"webhook\"\nsettings = {{ url = \"{}/hook\" }}\n",
        receiver.url
    );
    // Not installed: refused with the position of the name, nothing changes.
    let put = |text: String| {
        let url = format!("{}/v1/config", server.url);
        async move {
            let r = harness::client().put(url).body(text).send().await.unwrap();
            (r.status().as_u16(), r.json::<serde_json::Value>().await.unwrap())
        }
    };
    let (status, refused) = put(hooked.clone()).await;
    assert_eq!(status, 400, "{refused}");
    let line = hooked.lines().position(|l| l.starts_with("connector")).unwrap() + 1;
    assert_eq!(refused["errors"][0]["line"], line, "{refused}");
    assert!(refused["errors"][0]["message"].as_str().unwrap().contains("no plugin named `webhook`"), "{refused}");

    // Put in the plugin directory, then named: loaded, and it delivers.
    harness::install(harness::connectors(), "webhook", &dir.path().join("plugins"), |m| m);
    let (status, applied) = put(hooked).await;
    assert_eq!(status, 200, "{applied}");
    assert_eq!(applied["plan"]["plugins_loaded"], json!(["webhook"]));
    assert_eq!(plugins().await, ["webhook"]);
    harness::post_json(&format!("{}/v1/events", server.url), &json!({ "event": "e", "visitor_id": "v1" })).await;
    eventually("the webhook call", Duration::from_secs(30), async || (receiver.received().len() == 1).then_some(()))
        .await;

    // No longer named: unloaded.
    let (status, applied) = put(bare.to_string()).await;
    assert_eq!(status, 200, "{applied}");
    assert_eq!(applied["plan"]["plugins_unloaded"], json!(["webhook"]));
    assert!(plugins().await.is_empty());
}

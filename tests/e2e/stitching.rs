//! Identity stitching over HTTP: devices that log in with the same id become one profile,
//! unreliable ids never stitch, concurrent events lose nothing, and an unstitch restores both.

use crate::harness::{self, Receiver, Server, eventually, get_json, post_json};
use serde_json::json;
use starling_server::pipeline::worker_of;
use std::path::{Path, PathBuf};
use std::time::Duration;

const PARTITIONS: usize = 4;

fn config(dir: &Path, receiver: &str, identity: &str) -> PathBuf {
    let text = format!(
        r#"
[server]
database = "starling.db"
plugins = "plugins"
partitions = {PARTITIONS}

[identity]
{identity}

[[attribute]]
name = "email_hash"
scope = "visitor"
type = "visitor_id"
[[attribute]]
name = "page_views"
scope = "visitor"
type = "number"
[[attribute]]
name = "categories"
scope = "visitor"
type = "set_of_strings"

[[enrichment]]
attribute = "email_hash"
op = "set"
event = "email_hash"
when = "event:login"
[[enrichment]]
attribute = "page_views"
op = "increment"
when = "event:page_view"
[[enrichment]]
attribute = "categories"
op = "add"
event = "category"

[[audience]]
name = "browsers"
rule = {{ attribute = "page_views", op = ">=", value = 1 }}
[[audience]]
name = "engaged"
rule = {{ attribute = "page_views", op = ">=", value = 4 }}

[[action]]
name = "browsing"
audience = "browsers"
trigger = "joined"
connector = "webhook"
settings = {{ url = "{receiver}/browsers" }}
[[action]]
name = "engaged"
audience = "engaged"
trigger = "joined"
connector = "webhook"
settings = {{ url = "{receiver}/engaged" }}
params = {{ views = "page_views", who = "profile_id" }}
[[action]]
name = "disengaged"
audience = "engaged"
trigger = "left"
connector = "webhook"
settings = {{ url = "{receiver}/disengaged" }}
"#
    );
    let path = dir.join("starling.toml");
    std::fs::write(&path, text).unwrap();
    harness::install(harness::connectors(), "webhook", &dir.join("plugins"), |m| m);
    path
}

fn view(visitor: &str, category: &str) -> serde_json::Value {
    json!({ "event": "page_view", "visitor_id": visitor, "data": { "category": category } })
}

fn login(visitor: &str, hash: &str) -> serde_json::Value {
    json!({ "event": "login", "visitor_id": visitor, "data": { "email_hash": hash } })
}

/// Two anonymous ids, in different partitions when `apart`, in the same one otherwise.
fn devices(prefix: &str, apart: bool) -> (String, String) {
    let phone = format!("{prefix}-phone");
    let laptop = (0..1000)
        .map(|i| format!("{prefix}-laptop-{i}"))
        .find(|l| (worker_of(l, PARTITIONS) != worker_of(&phone, PARTITIONS)) == apart)
        .unwrap();
    (phone, laptop)
}

/// Requests received on `path` (each action is delivered once when nothing fails).
fn count(receiver: &Receiver, path: &str) -> usize {
    receiver.received().iter().filter(|r| r.path == path).count()
}

async fn two_devices_become_one_profile_and_unstitch_restores_both(apart: bool) {
    let _heavy = harness::exclusive().await;
    let receiver = Receiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&config(dir.path(), &receiver.url, ""));
    let events = format!("{}/v1/events", server.url);
    let profile = |id: &str| format!("{}/v1/profiles/{id}", server.url);
    let (phone, laptop) = devices(if apart { "apart" } else { "together" }, apart);
    let hash = "5f4dcc3b5aa765d61d8327deb882cf99";

    // Both browse anonymously: two profiles, each joins `browsers`.
    post_json(&events, &json!({ "events": [view(&phone, "shoes"), view(&phone, "shoes")] })).await;
    post_json(&events, &json!({ "events": [view(&laptop, "hats"), view(&laptop, "hats")] })).await;
    // The phone logs in: the hash is linked to the phone's profile.
    post_json(&events, &login(&phone, hash)).await;
    // The laptop logs in with the same hash: stitched into the profile that held it.
    let (status, _) = post_json(&events, &login(&laptop, hash)).await;
    assert_eq!(status, 202);

    for id in [phone.as_str(), laptop.as_str(), hash] {
        let (status, p) = get_json(&profile(id)).await;
        assert_eq!(status, 200, "lookup by {id}");
        assert_eq!(p["id"], json!(phone), "lookup by {id}");
        assert_eq!(p["attributes"]["page_views"], 4.0, "counters add");
        assert_eq!(p["attributes"]["categories"], json!(["hats", "shoes"]), "sets unite");
        assert_eq!(p["event_count"], 6);
        assert_eq!(p["audiences"], json!(["browsers", "engaged"]));
    }
    let engaged = eventually("the engaged action", Duration::from_secs(20), async || {
        let got: Vec<_> = receiver.received().into_iter().filter(|r| r.path == "/engaged").collect();
        (!got.is_empty()).then_some(got)
    })
    .await;
    assert_eq!(engaged[0].body, json!({ "views": 4.0, "who": phone }));
    let (_, graph) = get_json(&format!("{}/identity", profile(&laptop))).await;
    let mut ids = vec![phone.clone(), laptop.clone(), hash.to_string()];
    ids.sort();
    assert_eq!(graph["ids"], json!(ids));
    let kinds: Vec<&str> = graph["history"].as_array().unwrap().iter().map(|h| h["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, vec!["link", "merge"]);
    assert_eq!(graph["history"][1]["other_profile"], json!(laptop));

    // Unstitch the laptop with the CLI: both profiles are rebuilt from their events.
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_starling"))
        .args(["profile", "--server", &server.url, "unstitch", &laptop])
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let (_, p) = get_json(&profile(&laptop)).await;
    assert_eq!((p["id"].clone(), p["attributes"]["page_views"].clone()), (json!(laptop), json!(2.0)));
    assert_eq!(p["attributes"]["categories"], json!(["hats"]));
    assert_eq!(p["audiences"], json!(["browsers"]));
    let (_, p) = get_json(&profile(hash)).await;
    assert_eq!((p["id"].clone(), p["attributes"]["page_views"].clone()), (json!(phone), json!(2.0)));
    assert_eq!(p["audiences"], json!(["browsers"]));
    // The phone's profile left `engaged`; the laptop's new profile joined `browsers`.
    eventually("the disengaged action", Duration::from_secs(20), async || {
        (count(&receiver, "/disengaged") == 1).then_some(())
    })
    .await;
    eventually("browsers joined again", Duration::from_secs(20), async || {
        (count(&receiver, "/browsers") == 3).then_some(())
    })
    .await;

    // The laptop logging in again does not stitch it back.
    post_json(&events, &json!({ "events": [login(&laptop, hash), view(&laptop, "hats")] })).await;
    let (_, p) = get_json(&profile(&laptop)).await;
    assert_eq!((p["id"].clone(), p["attributes"]["page_views"].clone()), (json!(laptop), json!(3.0)));

    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        [count(&receiver, "/browsers"), count(&receiver, "/engaged"), count(&receiver, "/disengaged")],
        [3, 1, 1],
        "each action fired once per change"
    );
    server.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn devices_in_different_partitions_stitch_and_unstitch() {
    two_devices_become_one_profile_and_unstitch_restores_both(true).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn devices_in_the_same_partition_stitch_and_unstitch() {
    two_devices_become_one_profile_and_unstitch_restores_both(false).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn blocked_and_overshared_ids_never_stitch() {
    let receiver = Receiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&config(dir.path(), &receiver.url, "max_ids_per_profile = 3"));
    let events = format!("{}/v1/events", server.url);
    let id_of = async |v: &str| get_json(&format!("{}/v1/profiles/{v}", server.url)).await.1["id"].clone();

    // A placeholder id sent by broken clients never links anyone.
    for device in ["kiosk-1", "kiosk-2"] {
        post_json(&events, &json!({ "events": [view(device, "x"), login(device, "undefined")] })).await;
    }
    assert_eq!((id_of("kiosk-1").await, id_of("kiosk-2").await), (json!("kiosk-1"), json!("kiosk-2")));
    let (status, _) = get_json(&format!("{}/v1/profiles/undefined", server.url)).await;
    assert_eq!(status, 404);
    let (_, graph) = get_json(&format!("{}/v1/profiles/kiosk-1/identity", server.url)).await;
    assert_eq!(graph["history"][0]["kind"], "refused");
    assert!(graph["history"][0]["detail"].as_str().unwrap().contains("identity.blocked"), "{graph}");

    // A shared id stitches until the profile would hold more than 3 ids; then it is refused
    // and reported.
    let shared = "shared-family-account";
    for device in ["tv-1", "tv-2", "tv-3"] {
        post_json(&events, &json!({ "events": [view(device, "x"), login(device, shared)] })).await;
    }
    assert_eq!(
        (id_of("tv-1").await, id_of("tv-2").await, id_of("tv-3").await),
        (json!("tv-1"), json!("tv-1"), json!("tv-3"))
    );
    let (_, graph) = get_json(&format!("{}/v1/profiles/tv-3/identity", server.url)).await;
    let refusal = &graph["history"][0];
    assert_eq!(refusal["kind"], "refused");
    assert!(
        refusal["detail"].as_str().unwrap().contains("would link 4 ids (identity.max_ids_per_profile = 3)"),
        "{graph}"
    );
    assert!(server.logs().contains("not stitched"), "the refusal is logged");
    server.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn events_for_both_ids_during_a_merge_lose_no_update() {
    let _heavy = harness::exclusive().await;
    let receiver = Receiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&config(dir.path(), &receiver.url, ""));
    let events = format!("{}/v1/events", server.url);
    let (a, b) = devices("busy", true);
    let hash = "0123456789abcdef0123456789abcdef";
    const PER_CLIENT: usize = 150;

    // Four clients, two per device, send page views one request at a time; halfway, both
    // devices log in with the same hash.
    let mut clients = Vec::new();
    for (i, device) in [&a, &b, &a, &b].into_iter().enumerate() {
        let (events, device) = (events.clone(), device.clone());
        clients.push(tokio::spawn(async move {
            for n in 0..PER_CLIENT {
                if n == PER_CLIENT / 2 && i < 2 {
                    let (status, body) = post_json(&events, &login(&device, hash)).await;
                    assert_eq!(status, 202, "{body}");
                }
                let (status, body) = post_json(&events, &view(&device, "x")).await;
                assert_eq!(status, 202, "{body}");
            }
        }));
    }
    for c in clients {
        c.await.unwrap();
    }
    // The survivor is the device whose login linked the hash first.
    let (_, first) = get_json(&format!("{}/v1/profiles/{hash}", server.url)).await;
    assert!(first["id"] == json!(a) || first["id"] == json!(b), "{first}");
    for id in [&a, &b] {
        let (_, p) = get_json(&format!("{}/v1/profiles/{id}", server.url)).await;
        assert_eq!(p["id"], first["id"], "{p}");
        assert_eq!(p["attributes"]["page_views"], (4 * PER_CLIENT) as f64, "every page view counted once");
        assert_eq!(p["event_count"], 4 * PER_CLIENT + 2);
    }
    server.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn the_load_generator_finds_every_profile_adding_up_on_the_benchmark_configuration() {
    let _heavy = harness::exclusive().await;
    let dir = tempfile::tempdir().unwrap();
    let config = std::fs::read_to_string(harness::root().join("examples/benchmark.toml"))
        .unwrap()
        .replace("../target/bench/starling.db", "starling.db")
        .replace("../target/plugins", "plugins")
        .replace("[server]\n", &format!("[server]\npartitions = {PARTITIONS}\n"));
    let path = dir.path().join("starling.toml");
    std::fs::write(&path, config).unwrap();
    for plugin in ["webhook", "value-tier"] {
        harness::install(harness::connectors(), plugin, &dir.path().join("plugins"), |m| m);
    }
    let server = Server::start(&path);
    // Many people with two devices log in at about the same time on different partitions:
    // concurrent claims of one id must end as one profile, with nothing lost.
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_starling"))
        .args(["loadgen", "--server", &server.url, "--people", "400", "--events", "8000", "--batch", "50"])
        .args(["--connections", "8", "--two-devices", "0.5", "--verify"])
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&output.stderr));
    assert!(stdout.contains("applied 8000 events"), "{stdout}");
    assert!(stdout.contains(": 0 mismatches"), "{stdout}");
    server.stop();
}

//! Starling nodes on a three-server NATS JetStream cluster: one node owns every partition and
//! runs the engine on the replicated stream, the other stands by and forwards what it is asked.
//! A dead owner's partitions move to the standby, which rebuilds their state from the stream and
//! delivers what was pending, not what the owner had delivered, having applied each record with
//! the configuration the owner applied it with; an owner paused past its lease cannot write
//! once it wakes.

use crate::harness::{self, Receiver, Server, eventually, get_json, post_json};
use serde_json::json;
use starling_cluster::local::LocalNats;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const LEASE: &str = "3s";
/// The Segment write key of the nodes' web source.
const SEGMENT_KEY: &str = "segment-write-key-0123456789";

/// The benchmark configuration as node `node` of the cluster at `nats`, its action calling
/// `receiver` for every profile that becomes known.
fn node_config(dir: &Path, node: &str, nats: &LocalNats, receiver: &str) -> PathBuf {
    node_config_with(dir, node, nats, receiver, "")
}

/// [`node_config`] with `sources` added.
fn node_config_with(dir: &Path, node: &str, nats: &LocalNats, receiver: &str, sources: &str) -> PathBuf {
    let dir = dir.join(node);
    std::fs::create_dir_all(&dir).unwrap();
    let urls: Vec<String> = nats.urls.iter().map(|u| format!("\"{u}\"")).collect();
    let config = std::fs::read_to_string(harness::root().join("examples/benchmark.toml"))
        .unwrap()
        .replace("../target/bench/starling.db", "starling.db")
        .replace("../target/plugins", "plugins")
        .replace("http://127.0.0.1:9998/traced", &format!("{receiver}/traced"))
        + &format!(
            r#"
[[action]]
name = "welcome"
audience = "known"
trigger = "joined"
connector = "webhook"
settings = {{ url = "{receiver}/welcome" }}
params = {{ who = "profile_id" }}

{sources}
[cluster]
nats = [{}]
node = "{node}"
lease = "{LEASE}"
snapshot_every = "2s"
"#,
            urls.join(", ")
        );
    let path = dir.join("starling.toml");
    std::fs::write(&path, config).unwrap();
    for plugin in ["webhook", "value-tier"] {
        harness::install(harness::connectors(), plugin, &dir.join("plugins"), |m| m);
    }
    path
}

/// What `starling cluster status` prints of the cluster as `server` sees it.
fn cluster_status(server: &Server) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_starling"))
        .args(["cluster", "status", "--server", &server.url])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    stdout
}

/// What `server` says of the cluster (null while it cannot answer).
async fn cluster_view(server: &Server) -> serde_json::Value {
    match harness::client().get(format!("{}/v1/cluster", server.url)).send().await {
        Ok(response) => response.json().await.unwrap_or_default(),
        Err(_) => serde_json::Value::Null,
    }
}

/// Waits until `server` runs the engine on every partition.
async fn serving(server: &Server, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let view = cluster_view(server).await;
        if view["serving"] == true && view["partitions_held"] == 64 {
            return;
        }
        assert!(
            Instant::now() < deadline && harness::alive(server.pid()),
            "the node does not serve after {within:?}: {view}\n{}",
            server.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until `server` stands by ready: following the stream (its plugins loaded), the owner
/// known.
async fn standing_by(server: &Server) {
    eventually("the node to stand by, following the stream", FIRST_START, async || {
        let ready = server.logs().contains("following the stream") && cluster_view(server).await["owner"].is_string();
        ready.then_some(())
    })
    .await;
}

/// The first node of a cluster serving: it created the stream and buckets, and (on a first
/// run, on a busy machine) compiled its plugins.
const FIRST_START: Duration = Duration::from_secs(180);

/// Node `a`, serving every partition, and node `b`, standing by, following the stream.
async fn owner_and_standby(dir: &Path, nats: &LocalNats, receiver: &Receiver) -> (Server, Server) {
    let a = Server::start(&node_config(dir, "a", nats, &receiver.url));
    serving(&a, FIRST_START).await;
    let b = Server::start(&node_config(dir, "b", nats, &receiver.url));
    standing_by(&b).await;
    (a, b)
}

/// An admin token a test gives its nodes in their environment.
const ADMIN_TOKEN: &str = "cluster-admin-token";

/// [`owner_and_standby`] with a `web` source, whose key is [`SEGMENT_KEY`], taking Segment's
/// calls; `cluster`: more `[cluster]` settings; `env`: the nodes' environment.
async fn owner_and_standby_of_the_web_source(
    dir: &Path,
    nats: &LocalNats,
    receiver: &Receiver,
    cluster: &str,
    env: &[(&str, &str)],
) -> (Server, Server) {
    let web = format!("[[source]]\nname = \"web\"\napi_key = \"{SEGMENT_KEY}\"\n[source.segment]\n");
    let config = |node: &str| {
        let path = node_config_with(dir, node, nats, &receiver.url, &web);
        // `[cluster]` is the file's last table.
        let text = std::fs::read_to_string(&path).unwrap() + cluster;
        std::fs::write(&path, text).unwrap();
        path
    };
    let a = Server::start_with_env(&config("a"), &[], env);
    serving(&a, FIRST_START).await;
    let b = Server::start_with_env(&config("b"), &[], env);
    standing_by(&b).await;
    (a, b)
}

/// [`owner_and_standby`] with no snapshot stored within a test: the standby follows only the
/// stream.
async fn owner_and_standby_without_snapshots(dir: &Path, nats: &LocalNats, receiver: &Receiver) -> (Server, Server) {
    let config = |node: &str| {
        let path = node_config(dir, node, nats, &receiver.url);
        let text =
            std::fs::read_to_string(&path).unwrap().replace(r#"snapshot_every = "2s""#, r#"snapshot_every = "1h""#);
        std::fs::write(&path, text).unwrap();
        path
    };
    let a = Server::start(&config("a"));
    serving(&a, FIRST_START).await;
    let b = Server::start(&config("b"));
    standing_by(&b).await;
    (a, b)
}

/// A load of `events` from 200 people, `two_devices` of whom stitch two devices, at 400 events
/// a second (so that it is under way when a node or server is killed).
async fn loadgen(server: &Server, prefix: &str, events: usize, two_devices: f64) -> tokio::process::Child {
    loadgen_with(server, prefix, events, two_devices, &[]).await
}

async fn loadgen_with(
    server: &Server,
    prefix: &str,
    events: usize,
    two_devices: f64,
    more: &[&str],
) -> tokio::process::Child {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_starling"))
        .args(["loadgen", "--server", &server.url, "--people", "200", "--events", &events.to_string()])
        .args(["--batch", "25", "--connections", "4", "--rate", "400", "--resend", "--prefix", prefix])
        .args(["--two-devices", &two_devices.to_string()])
        .args(more)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

async fn finished(child: tokio::process::Child) -> String {
    let output = child.wait_with_output().await.unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).to_string();
    assert!(output.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&output.stderr));
    stdout
}

/// Checks through `server` that every person of a loadgen run with these options adds up
/// (`starling loadgen --verify-only`: on a spread cluster it reads after where the stream ends,
/// so the node has applied every event answered before, merges handed through the log among
/// them).
async fn verify(server: &Server, prefix: &str, events: usize, two_devices: f64) {
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_starling"))
        .args(["loadgen", "--server", &server.url, "--people", "200", "--events", &events.to_string()])
        .args(["--two-devices", &two_devices.to_string(), "--prefix", prefix, "--verify-only"])
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let trouble = || {
        let logs = server.logs();
        logs.lines().filter(|l| l.contains("WARN") || l.contains("ERROR")).collect::<Vec<_>>().join("\n")
    };
    if !stdout.contains(": 0 mismatches") {
        // The history of each profile that does not add up, to tell what was applied twice or lost.
        let mut histories = String::new();
        for device in stdout.lines().filter_map(|l| l.trim().split_once(": events").map(|(d, _)| d.to_string())) {
            let (_, export) = get_json(&format!("{}/v1/profiles/{device}/export", server.url)).await;
            let events: Vec<String> = export["events"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|e| format!("{}:{}", e["id"].as_str().unwrap_or("-"), e["event"].as_str().unwrap_or("-")))
                .collect();
            histories += &format!("{device}: {}\n", events.join(" "));
        }
        panic!("{stdout}\n{histories}\n{}", trouble());
    }
    assert!(output.status.success(), "{stdout}\n{}\n{}", String::from_utf8_lossy(&output.stderr), trouble());
    if cluster_view(server).await["placement"] == "spread" {
        assert!(stdout.contains("verifying after stream position"), "{stdout}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_owner_dies_under_load_and_the_standby_serves_every_profile_with_nothing_lost() {
    let _heavy = harness::exclusive().await;
    let mut nats = LocalNats::start(3).unwrap();
    let receiver = Receiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    // A node that joins stands by: ownership does not move, no partition is held twice.
    let (a, b) = owner_and_standby(dir.path(), &nats, &receiver).await;
    let view = eventually("b to see both nodes", Duration::from_secs(20), async || {
        let view = cluster_view(&b).await;
        (view["nodes"].as_array().map(Vec::len) == Some(2)).then_some(view)
    })
    .await;
    assert_eq!(
        (view["owner"].as_str(), view["serving"].as_bool(), view["partitions_held"].as_u64()),
        (Some("a"), Some(false), Some(0))
    );

    // A read through the standby is answered by the owner's engine.
    let (status, _) =
        post_json(&format!("{}/v1/events", b.url), &json!({"event": "page_view", "visitor_id": "probe", "data": {}}))
            .await;
    assert_eq!(status, 202);
    let read = harness::client().get(format!("{}/v1/profiles/probe", b.url)).send().await.unwrap();
    assert_eq!((read.status().as_u16(), read.headers()["x-starling-node"].to_str().unwrap()), (200, "a"));

    // Load through both nodes; the owner dies in the middle of it.
    let mut through_a = loadgen(&a, "la", 3_000, 0.5).await;
    let through_b = loadgen(&b, "lb", 3_000, 0.5).await;
    // Once the owner has stored a snapshot, and the stream has forgotten the records it
    // includes (so the standby cannot start from the stream alone), it dies.
    eventually("the owner to store a snapshot and truncate the stream", Duration::from_secs(20), async || {
        a.logs()
            .lines()
            .any(|line| line.contains("stream truncated before the snapshot") && !line.contains("records=0 "))
            .then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    let a_log = a.log.clone();
    a.kill9();
    let killed = Instant::now();
    serving(&b, Duration::from_secs(30)).await;
    let failover = killed.elapsed();
    // The standby followed the stream: it took over from its own copy (or, had it fallen
    // behind the latest snapshot, from that), applying only what it had not yet applied.
    assert!(
        b.logs().contains("following the stream") && b.logs().contains("event log replayed after the stored state"),
        "b:\n{}\na:\n{}",
        b.logs(),
        std::fs::read_to_string(&a_log).unwrap_or_default()
    );
    // The client of the dead node got no answer for what it sent last: it sends everything
    // again to the node left (what was acknowledged comes back a duplicate).
    through_a.kill().await.unwrap();
    finished(loadgen(&b, "la", 3_000, 0.5).await).await;
    let stdout = finished(through_b).await;
    // The load through the standby went on through the owner's death: some requests were
    // taken in while no node served, or refused (sent to the owner as it died), or lost with
    // their connection and sent again.
    let count_before = |marker: &str| -> u64 {
        let head = stdout.split(marker).next().filter(|h| h.len() < stdout.len()).unwrap_or_else(|| panic!("{stdout}"));
        head.rsplit(' ').next().and_then(|n| n.parse().ok()).unwrap_or_else(|| panic!("{stdout}"))
    };
    let taken_in = b.logs().contains("applied the events taken in while no node served");
    assert!(taken_in || count_before(" refused with 503") + count_before(" sent again") > 0, "{stdout}");
    assert!(failover < Duration::from_secs(10), "the standby served within {failover:?} of the owner's death");
    println!("failover: the standby served every partition {failover:?} after the owner was killed");

    // The stream's leader dies too: ingestion pauses for the election at most and goes on.
    let leader = nats_stream_leader(&b).await;
    let more = loadgen(&b, "lc", 2_000, 0.5).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    nats.kill9(leader);
    let output = more.wait_with_output().await.unwrap();
    let trouble: Vec<String> =
        b.logs().lines().filter(|l| l.contains("WARN") || l.contains("ERROR")).map(String::from).collect();
    assert!(output.status.success(), "{}\n{}", String::from_utf8_lossy(&output.stderr), trouble.join("\n"));

    for (prefix, events, two_devices) in [("la", 3_000, 0.5), ("lb", 3_000, 0.5), ("lc", 2_000, 0.5)] {
        verify(&b, prefix, events, two_devices).await;
    }
    every_action_delivered_once(&b, &receiver).await;
    b.stop();
}

/// Every action delivered (none pending as `server` sees them), and none under two keys.
async fn every_action_delivered_once(server: &Server, receiver: &Receiver) {
    every_action_delivered_once_but(server, receiver, &[]).await
}

/// [`every_action_delivered_once`], but for the profiles `rejoined`, which joined `known`
/// twice (split out of another after a merge), and were welcomed twice.
async fn every_action_delivered_once_but(server: &Server, receiver: &Receiver, rejoined: &[&str]) {
    none_pending(server).await;
    let mut keys: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for hook in receiver.received().iter().filter(|r| r.path == "/welcome") {
        keys.entry(hook.body["who"].as_str().unwrap().to_string())
            .or_default()
            .insert(hook.header("idempotency-key").to_string());
    }
    assert!(keys.len() > 100, "welcomes for the known people: {}", keys.len());
    let twice: Vec<_> = keys.iter().filter(|(who, k)| k.len() > 1 && !rejoined.contains(&who.as_str())).collect();
    assert!(twice.is_empty(), "profiles welcomed under two keys: {twice:?}");
}

/// Waits until no action is pending, as `server` sees them (gathered from every node).
async fn none_pending(server: &Server) {
    eventually("every action to be delivered", Duration::from_secs(60), async || {
        let (_, actions) = get_json(&format!("{}/v1/actions?status=pending&limit=1", server.url)).await;
        actions["actions"].as_array().is_some_and(Vec::is_empty).then_some(())
    })
    .await;
}

/// The NATS server (its index) leading the event stream, as the `nats` CLI-free way: the node's
/// status names it.
async fn nats_stream_leader(server: &Server) -> usize {
    let view = cluster_view(server).await;
    let leader = view["stream_leader"].as_str().unwrap_or_else(|| panic!("no stream leader: {view}"));
    leader.trim_start_matches('n').parse().unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn an_owner_paused_past_its_lease_cannot_write_when_it_wakes() {
    let _heavy = harness::exclusive().await;
    let nats = LocalNats::start(3).unwrap();
    let receiver = Receiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = owner_and_standby(dir.path(), &nats, &receiver).await;
    let event = |visitor: &str| json!({"event": "page_view", "visitor_id": visitor, "data": {"category": "hats"}});
    let (status, _) = post_json(&format!("{}/v1/events", a.url), &event("before")).await;
    assert_eq!(status, 202);

    let signal = |sig: &str| {
        std::process::Command::new("kill").arg(sig).arg(a.pid().to_string()).status().unwrap();
    };
    signal("-STOP");
    serving(&b, Duration::from_secs(30)).await;
    let (status, _) = post_json(&format!("{}/v1/events", b.url), &event("while-paused")).await;
    assert_eq!(status, 202);
    signal("-CONT");
    // Whatever the woken node was doing, it may not write: a request to it is refused, and it
    // stops once it sees the leases gone.
    let (status, _) = post_json(&format!("{}/v1/events", a.url), &event("after-waking")).await;
    assert_ne!(status, 202, "the paused owner acknowledged an event after losing its leases");
    eventually("the woken owner to stop", Duration::from_secs(30), async || (!harness::alive(a.pid())).then_some(()))
        .await;
    assert!(a.logs().contains("lost its partitions' leases"), "{}", a.logs());
    assert!(!dir.path().join("a/starling.db").exists(), "the overtaken node discards its state");
    for (visitor, known) in [("before", 200), ("while-paused", 200), ("after-waking", 404)] {
        let (status, profile) = get_json(&format!("{}/v1/profiles/{visitor}", b.url)).await;
        assert_eq!(status, known, "{visitor}");
        if known == 200 {
            assert_eq!(profile["event_count"], 1, "{visitor}: {profile}\nb:\n{}", b.logs());
        }
    }

    // An upgrade, one node at a time: a new node stands by, the owner stops cleanly and gives
    // its partitions up at once, without waiting for its leases to lapse.
    let c = Server::start(&node_config(dir.path(), "c", &nats, &receiver.url));
    standing_by(&c).await;
    // A node that joins late starts following from the latest snapshot: the stream no longer
    // holds what the snapshot includes.
    assert!(c.logs().contains("state restored from the latest snapshot"), "c:\n{}", c.logs());
    assert_eq!(cluster_view(&c).await["owner"], "b");
    // A configuration change made through a standby reaches the owner, and every node says
    // which version it runs.
    let (_, running) = get_json(&format!("{}/v1/config", c.url)).await;
    let changed = running["source"].as_str().unwrap().to_string()
        + "\n[[audience]]\nname = \"hat_browsers\"\nrule = { attribute = \"category_views\", key = \"hats\", op = \">=\", value = 1 }\n";
    let applied = harness::client().put(format!("{}/v1/config", c.url)).body(changed).send().await.unwrap();
    assert_eq!(applied.status().as_u16(), 200);
    let version = applied.json::<serde_json::Value>().await.unwrap()["version"].as_i64().unwrap();
    assert!(version > running["version"].as_i64().unwrap());
    eventually("every node to report the new version", Duration::from_secs(20), async || {
        let view = cluster_view(&c).await;
        let nodes = view["nodes"].as_array()?.clone();
        (view["config_version"] == version && nodes.iter().all(|n| n["config_version"] == version)).then_some(())
    })
    .await;

    let stopped = Instant::now();
    let b_logs = b.log.clone();
    b.stop();
    serving(&c, Duration::from_secs(30)).await;
    let handover = stopped.elapsed();
    for visitor in ["before", "while-paused"] {
        let (status, profile) = get_json(&format!("{}/v1/profiles/{visitor}", c.url)).await;
        let (_, export) = get_json(&format!("{}/v1/profiles/{visitor}/export", c.url)).await;
        assert_eq!(
            (status, profile["event_count"].as_u64()),
            (200, Some(1)),
            "{visitor}: {export}\nb:\n{}\nc:\n{}",
            std::fs::read_to_string(&b_logs).unwrap_or_default(),
            c.logs()
        );
    }
    // The new owner runs the configuration its predecessor ran, not its own file's.
    let (_, config) = get_json(&format!("{}/v1/config", c.url)).await;
    assert!(config["source"].as_str().unwrap().contains("hat_browsers"), "{config}");
    eventually("the new audience to hold both hat browsers", Duration::from_secs(20), async || {
        let (_, audience) = get_json(&format!("{}/v1/audiences/hat_browsers", c.url)).await;
        (audience["size"] == 2).then_some(())
    })
    .await;
    println!("handover: a stopped owner's partitions served by the next node {handover:?} after SIGTERM");
    c.stop();
}

/// A Segment call sent to a standby is recorded with its sender's address, not the standby's
/// (Segment's `context.ip`): the standby passes the address on, and the owner takes it from a
/// node of the cluster only.
#[tokio::test(flavor = "multi_thread")]
async fn a_call_forwarded_by_a_standby_keeps_its_senders_address() {
    // One NATS cluster starting at a time: several electing their leaders at once on a busy
    // machine have kept JetStream unavailable for minutes.
    let _heavy = harness::exclusive().await;
    let nats = LocalNats::start(3).unwrap();
    let receiver = Receiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = owner_and_standby_of_the_web_source(dir.path(), &nats, &receiver, "", &[]).await;
    // The sender is 127.0.0.2; the standby reaches the owner from 127.0.0.1.
    let sender = reqwest::Client::builder().local_address(std::net::IpAddr::from([127, 0, 0, 2])).build().unwrap();
    let track = |who: &str| json!({"type": "track", "event": "Probe", "anonymousId": who, "properties": {}});
    let sent = sender.post(format!("{}/v1/track", b.url)).basic_auth(SEGMENT_KEY, Some("")).json(&track("via-b"));
    assert_eq!(sent.send().await.unwrap().status(), 200);
    // A client cannot claim another address: the owner takes the header only from a node.
    let forged = sender
        .post(format!("{}/v1/track", a.url))
        .basic_auth(SEGMENT_KEY, Some(""))
        .header("x-starling-client", "203.0.113.9")
        .json(&track("forged"));
    assert_eq!(forged.send().await.unwrap().status(), 200);
    for (who, address) in [("via-b", "127.0.0.2"), ("forged", "127.0.0.2")] {
        let (status, export) = get_json(&format!("{}/v1/profiles/{who}/export", b.url)).await;
        assert_eq!(status, 200, "{export}");
        assert_eq!(export["events"][0]["data"]["context"]["ip"], address, "{who}: {export}");
    }
    let status = cluster_status(&b);
    for line in ["node b, partitions placed whole", "this node stands by"] {
        assert!(status.lines().any(|l| l == line), "no `{line}`:\n{status}");
    }
    let owner = format!("  a: {}, configuration version", a.url);
    assert!(status.lines().any(|l| l.starts_with(&owner) && l.ends_with(", owns every partition")), "{status}");
}

/// Placed whole, the NATS servers stop answering (paused): once the owner's leases are about
/// to lapse by its own clock, it answers reads from its database, saying so (another node may
/// serve once they lapse), through itself and through the standby; once the servers answer
/// again it renews them and its engine answers.
#[tokio::test(flavor = "multi_thread")]
async fn an_owner_cut_off_from_the_servers_answers_reads_from_its_copy_as_its_leases_lapse() {
    let _heavy = harness::exclusive().await;
    let nats = LocalNats::start(3).unwrap();
    let receiver = Receiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = owner_and_standby(dir.path(), &nats, &receiver).await;
    let (status, body) = post_json(&format!("{}/v1/events", a.url), &purchase("cut-whole", "before")).await;
    assert_eq!(status, 202, "{body}");
    let read = async |node: &Server| {
        let response = harness::client().get(format!("{}/v1/profiles/cut-whole", node.url)).send().await.unwrap();
        let header = |name: &str| response.headers().get(name).map(|v| v.to_str().unwrap().to_string());
        let said = [header("x-starling-answered-from"), header("x-starling-copy-reason")];
        (response.status().as_u16(), said, response.json::<serde_json::Value>().await.unwrap())
    };
    let (status, [from, _], profile) = read(&a).await;
    assert_eq!((status, from.as_deref()), (200, Some("engine")), "{profile}");

    for i in 0..3 {
        nats.pause(i);
    }
    for node in [&a, &b] {
        eventually("the owner to answer from its copy", Duration::from_secs(6), async || {
            let (status, [from, reason], profile) = read(node).await;
            (status == 200 && from.as_deref() == Some("copy")).then_some(())?;
            assert!(reason.is_some_and(|r| r.contains("lapsing")), "{profile}");
            assert_eq!(profile["attributes"]["purchase_count"], 1.0, "{profile}");
            Some(())
        })
        .await;
    }
    for i in 0..3 {
        nats.resume(i);
    }
    eventually("the owner's engine to answer again", Duration::from_secs(30), async || {
        let (status, [from, _], _) = read(&a).await;
        (status == 200 && from.as_deref() == Some("engine")).then_some(())
    })
    .await;
    // The standby, whose view of the owner may not have caught up yet, may take the event into
    // the intake (answered `202`, applied by the owner on its next round).
    let (status, body) = post_json(&format!("{}/v1/events", b.url), &purchase("cut-whole", "after")).await;
    assert_eq!(status, 202, "{body}");
    eventually("the owner to apply the event sent through the standby", Duration::from_secs(20), async || {
        let (status, [from, _], profile) = read(&a).await;
        (status == 200 && from.as_deref() == Some("engine") && profile["attributes"]["purchase_count"] == 2.0)
            .then_some(())
    })
    .await;
    a.stop();
    b.stop();
}

/// Events posted to a standby while no node serves (the owner was killed and its lease has not
/// lapsed yet, then the standby takes over) are taken in and answered `202`, not `503`, in the
/// native API and in the wire formats; the node that takes over applies them before what it is
/// sent next. An event sent again under its id is applied once, one without an id once, and bad
/// input or a wrong key is refused as the engine refuses it.
#[tokio::test(flavor = "multi_thread")]
async fn events_posted_during_a_failover_are_taken_in_and_applied_once() {
    let _heavy = harness::exclusive().await;
    let nats = LocalNats::start(3).unwrap();
    let receiver = Receiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    // Room for the three events taken in below, and no more; admin calls need a token from the
    // environment, which the nodes' own checks (the intake's, the copy's) take too.
    let env = [("STARLING_ADMIN_TOKEN", ADMIN_TOKEN)];
    let (a, b) = owner_and_standby_of_the_web_source(dir.path(), &nats, &receiver, "intake_limit = 3\n", &env).await;
    let events = format!("{}/v1/events", b.url);
    let page = |id: Option<&str>, visitor: &str| {
        let mut event = json!({"event": "page_view", "visitor_id": visitor, "data": {}});
        if let Some(id) = id {
            event["id"] = json!(id);
        }
        event
    };
    let post = async |url: &str, key: &str, body: &serde_json::Value| {
        let response = harness::client().post(url).header("x-api-key", key).json(body).send().await.unwrap();
        let node = response.headers().get("x-starling-node").map(|v| v.to_str().unwrap().to_string());
        (response.status().as_u16(), node, response.json::<serde_json::Value>().await.unwrap())
    };
    let (status, node, answer) = post(&events, SEGMENT_KEY, &page(Some("before"), "taken-1")).await;
    assert_eq!((status, node.as_deref(), answer.get("queued")), (202, Some("a"), None), "forwarded: {answer}");
    let read = async |path: &str| {
        let response = harness::client().get(format!("{}{path}", b.url)).bearer_auth(ADMIN_TOKEN).send().await.unwrap();
        let header = |name: &str| response.headers().get(name).map(|v| v.to_str().unwrap().to_string());
        let said = [header("x-starling-node"), header("x-starling-answered-from"), header("x-starling-copy-position")];
        (response.status().as_u16(), said, response.json::<serde_json::Value>().await.unwrap())
    };
    let (status, [node, from, _], _) = read("/v1/profiles/taken-1").await;
    assert_eq!((status, node.as_deref(), from.as_deref()), (200, Some("a"), Some("engine")), "forwarded to the owner");
    eventually("the standby's copy to include the first event", Duration::from_secs(30), async || {
        let following = cluster_view(&b).await["following"].clone();
        (following["applied_position"].as_u64() > Some(64) && following["positions_behind"] == 0).then_some(())
    })
    .await;

    let (status, _, audiences_before) = read("/v1/audiences").await;
    assert_eq!(status, 200, "{audiences_before}");
    let (status, _, config_before) = read("/v1/config").await;
    assert_eq!(status, 200, "{config_before}");
    a.kill9();
    // Profile reads are answered from the standby's copy, saying so; other reads wait. Keeping
    // up, the standby writes what it applies at once: the copy holds the first event.
    let (status, [node, from, position], export) = read("/v1/profiles/taken-1/export").await;
    assert_eq!((status, node.as_deref(), from.as_deref()), (200, Some("b"), Some("copy")), "{export}");
    assert!(position.and_then(|p| p.parse::<u64>().ok()) > Some(64), "the copy says how far it goes");
    assert_eq!(export["events"].as_array().map(Vec::len), Some(1), "{export}");
    let (status, [_, from, _], identity) = read("/v1/profiles/taken-1/identity").await;
    assert_eq!((status, from.as_deref(), identity["profile_id"].as_str()), (200, Some("copy"), Some("taken-1")));
    let cli = std::process::Command::new(env!("CARGO_BIN_EXE_starling"))
        .args(["profile", "show", "taken-1", "--server", &b.url, "--token", ADMIN_TOKEN])
        .output()
        .unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&cli.stdout), String::from_utf8_lossy(&cli.stderr));
    assert!(cli.status.success() && stdout.contains("taken-1"), "{stdout}{stderr}");
    assert!(stderr.contains("answered from node b's copy of the state, through stream position"), "{stderr}");
    let anonymous = harness::client().get(format!("{}/v1/profiles/taken-1", b.url)).send().await.unwrap();
    assert_eq!(anonymous.status(), 401, "the copy is read with the admin token only");
    let (status, [_, from, _], missing) = read("/v1/profiles/nobody").await;
    assert_eq!((status, from.as_deref()), (404, Some("copy")), "{missing}");
    // So are the other reads of stored state: a page's visitor (with its source key), the
    // audiences, the configuration (the one the owner published), why a profile is in an
    // audience or not, the actions.
    let visitor =
        harness::client().get(format!("{}/v1/visitor/taken-1", b.url)).header("x-api-key", SEGMENT_KEY).send().await;
    let visitor = visitor.unwrap();
    let from = visitor.headers().get("x-starling-answered-from").map(|v| v.to_str().unwrap().to_string());
    let (status, view) = (visitor.status().as_u16(), visitor.json::<serde_json::Value>().await.unwrap());
    assert_eq!((status, from.as_deref(), &view["known"]), (200, Some("copy"), &json!(true)), "{view}");
    let (status, [_, from, _], audiences) = read("/v1/audiences").await;
    assert_eq!((status, from.as_deref()), (200, Some("copy")), "{audiences}");
    let names = |answer: &serde_json::Value| {
        answer["audiences"].as_array().unwrap().iter().map(|a| a["name"].clone()).collect::<Vec<_>>()
    };
    assert_eq!(names(&audiences), names(&audiences_before), "the copy's audiences are the configuration's");
    let (status, [_, from, _], config) = read("/v1/config").await;
    assert_eq!((status, from.as_deref()), (200, Some("copy")), "{config}");
    assert_eq!(
        (&config["version"], &config["sha256"]),
        (&config_before["version"], &config_before["sha256"]),
        "{config}"
    );
    let (status, [_, from, _], explained) = read("/v1/profiles/taken-1/explain/known").await;
    assert_eq!((status, from.as_deref(), &explained["audience"]), (200, Some("copy"), &json!("known")), "{explained}");
    assert!(explained["member"].is_boolean() && explained["rule"].is_object(), "{explained}");
    let (status, [_, from, _], actions) = read("/v1/actions").await;
    assert_eq!((status, from.as_deref()), (200, Some("copy")), "{actions}");
    assert!(actions["actions"].is_array(), "{actions}");
    // What would write waits for a node to serve, and nothing of it is applied (the profile is
    // read whole below).
    let deletion = harness::client().delete(format!("{}/v1/profiles/taken-1", b.url)).bearer_auth(ADMIN_TOKEN);
    let deletion = deletion.send().await.unwrap();
    assert_eq!(deletion.status(), 503);
    assert!(deletion.headers().contains_key("retry-after"));
    let (status, node, answer) = post(&events, SEGMENT_KEY, &page(Some("during"), "taken-1")).await;
    assert_eq!((status, node.as_deref()), (202, Some("b")), "{answer}");
    assert_eq!((answer["queued"].clone(), answer["accepted"].clone()), (json!(true), json!(1)), "{answer}");
    assert!(cluster_view(&b).await["serving"] == false, "taken in before the standby serves");
    let (status, _, answer) = post(&events, SEGMENT_KEY, &page(Some("during"), "taken-1")).await;
    assert_eq!((status, answer["duplicates"].clone()), (202, json!(1)), "sent again: {answer}");
    let (status, _, answer) = post(&events, SEGMENT_KEY, &page(None, "taken-2")).await;
    assert_eq!((status, answer["accepted"].clone()), (202, json!(1)), "{answer}");
    let (status, _, answer) = post(&events, SEGMENT_KEY, &json!({"visitor_id": "taken-3"})).await;
    assert_eq!(status, 400, "{answer}");
    assert!(answer["error"].as_str().unwrap().contains("event"), "the error names the field: {answer}");
    let (status, _, answer) = post(&events, "not-a-key", &page(None, "taken-3")).await;
    assert_eq!(status, 401, "{answer}");
    // A Segment call: its write key checked, answered in Segment's shape.
    let track = json!({"type": "track", "event": "Probe", "anonymousId": "taken-4", "properties": {}});
    let segment =
        |key: &str| harness::client().post(format!("{}/v1/track", b.url)).basic_auth(key, Some("")).json(&track).send();
    let answer = segment(SEGMENT_KEY).await.unwrap();
    assert_eq!(answer.status(), 200);
    assert_eq!(answer.json::<serde_json::Value>().await.unwrap(), json!({"success": true}));
    assert_eq!(segment("not-a-key").await.unwrap().status(), 401);
    // The intake holds three events: at its limit, it takes no more.
    let over = harness::client().post(&events).header("x-api-key", SEGMENT_KEY).json(&page(Some("over"), "taken-5"));
    let over = over.send().await.unwrap();
    assert_eq!(over.status(), 503);
    assert!(over.headers().contains_key("retry-after"));
    let refusal = over.json::<serde_json::Value>().await.unwrap();
    assert!(refusal["error"].as_str().unwrap().contains("at most 3"), "{refusal}");
    assert!(cluster_view(&b).await["serving"] == false, "taken in before the standby serves");

    serving(&b, Duration::from_secs(30)).await;
    for (who, expected) in [("taken-1", 2), ("taken-2", 1), ("taken-4", 1)] {
        let (status, [_, from, _], export) = read(&format!("/v1/profiles/{who}/export")).await;
        assert_eq!(from.as_deref(), Some("engine"));
        assert_eq!(status, 200, "{export}");
        assert_eq!(export["events"].as_array().map(Vec::len), Some(expected), "{who}: {export}");
    }
    for refused in ["taken-3", "taken-5"] {
        let (status, _, _) = read(&format!("/v1/profiles/{refused}/export")).await;
        assert_eq!(status, 404, "the refused events were not taken in");
    }
    // Once applied, the intake forgets them.
    eventually("the intake to forget what was applied", Duration::from_secs(20), async || {
        (cluster_view(&b).await["intake_held"] == 0).then_some(())
    })
    .await;
}

/// What the owner delivered is not delivered again by the node that takes over, even with no
/// snapshot in between: the owner passes on how its deliveries ended, and the standby ends the
/// rows of its copy alike.
#[tokio::test(flavor = "multi_thread")]
async fn a_node_taking_over_does_not_deliver_again_what_the_owner_delivered() {
    let _heavy = harness::exclusive().await;
    let nats = LocalNats::start(3).unwrap();
    let receiver = Receiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    // No snapshot within the test: the standby's copy holds every action it applied as pending.
    let (a, b) = owner_and_standby_without_snapshots(dir.path(), &nats, &receiver).await;

    let people = 20;
    for i in 0..people {
        let login = json!({"event": "login", "visitor_id": format!("w{i}"), "data": {"email_hash": format!("e{i}")}});
        assert_eq!(post_json(&format!("{}/v1/events", a.url), &login).await.0, 202);
    }
    let welcomes = || receiver.received().iter().filter(|r| r.path == "/welcome").count();
    eventually("the owner to welcome everyone", Duration::from_secs(30), async || (welcomes() >= people).then_some(()))
        .await;
    // The owner passes outcomes on a few times a second, and the standby, which says how far
    // it follows, takes them; then the owner dies.
    let following = eventually("the standby to take the outcomes", Duration::from_secs(30), async || {
        let following = cluster_view(&b).await["following"].clone();
        (following["delivery_outcomes_taken"] == people && following["positions_behind"] == 0).then_some(following)
    })
    .await;
    assert!(following["applied_position"].as_u64() > Some(64), "{following}");
    assert_eq!(cluster_view(&a).await["following"], serde_json::Value::Null, "the owner follows nothing");
    a.kill9();
    serving(&b, Duration::from_secs(30)).await;
    // The new owner's lanes start at once: whatever it held as pending would be delivered now.
    eventually("nothing pending on the new owner", Duration::from_secs(30), async || {
        let (_, pending) = get_json(&format!("{}/v1/actions?status=pending&limit=1", b.url)).await;
        pending["actions"].as_array().is_some_and(Vec::is_empty).then_some(())
    })
    .await;
    let (_, delivered) = get_json(&format!("{}/v1/actions?status=delivered&limit=1000", b.url)).await;
    let welcomed = delivered["actions"].as_array().unwrap().iter().filter(|a| a["action"] == "welcome").count();
    assert_eq!(welcomed, people, "{delivered}");
    assert_eq!(welcomes(), people, "welcomes delivered again by the new owner\nb:\n{}", b.logs());
}

/// A standby applies each record with the configuration the owner applied it with: records the
/// owner applied just after a change, which the standby reads before the change is published,
/// wait for it.
#[tokio::test(flavor = "multi_thread")]
async fn a_standby_applies_each_record_with_the_configuration_the_owner_applied_it_with() {
    let _heavy = harness::exclusive().await;
    let nats = LocalNats::start(3).unwrap();
    let receiver = Receiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    // No snapshot to start the standby again from: it follows the stream alone.
    let (a, b) = owner_and_standby_without_snapshots(dir.path(), &nats, &receiver).await;
    let view = json!({"event": "page_view", "visitor_id": "counted", "data": {"category": "hats"}});
    let events = format!("{}/v1/events", a.url);
    assert_eq!(post_json(&events, &view).await.0, 202);
    // The standby follows: where it is once it applied that first view.
    let caught_up = async |after: u64| {
        eventually("the standby to apply what the owner wrote", Duration::from_secs(30), async || {
            let following = cluster_view(&b).await["following"].clone();
            let applied = following["applied_position"].as_u64()?;
            (applied > after && following["positions_behind"] == 0).then_some(applied)
        })
        .await
    };
    let before = caught_up(0).await;

    let (_, running) = get_json(&format!("{}/v1/config", a.url)).await;
    let changed = running["source"].as_str().unwrap().to_string()
        + "\n[[attribute]]\nname = \"views_counted\"\nscope = \"visitor\"\ntype = \"number\"\n\n\
           [[enrichment]]\nattribute = \"views_counted\"\nop = \"increment\"\nwhen = \"event:page_view\"\n";
    let applied = harness::client().put(format!("{}/v1/config", a.url)).body(changed).send().await.unwrap();
    assert_eq!(applied.status().as_u16(), 200);
    let version = applied.json::<serde_json::Value>().await.unwrap()["version"].as_i64().unwrap();
    // At once: the owner applies these with the new configuration before it is published.
    for _ in 0..5 {
        assert_eq!(post_json(&events, &view).await.0, 202);
    }
    let (_, owner) = get_json(&format!("{}/v1/profiles/counted", a.url)).await;
    assert_eq!((owner["event_count"].as_u64(), owner["attributes"]["views_counted"].as_f64()), (Some(6), Some(5.0)));
    caught_up(before + 4).await;
    assert!(b.logs().contains("the stream goes on with a newer configuration"), "b:\n{}", b.logs());

    a.kill9();
    serving(&b, Duration::from_secs(30)).await;
    let (_, taken_over) = get_json(&format!("{}/v1/profiles/counted", b.url)).await;
    assert_eq!(
        (taken_over["event_count"].as_u64(), taken_over["attributes"]["views_counted"].as_f64()),
        (Some(6), Some(5.0)),
        "{taken_over}\nb:\n{}",
        b.logs()
    );
    // The new owner goes on with the cluster's numbering of configurations.
    let (_, config) = get_json(&format!("{}/v1/config", b.url)).await;
    assert_eq!(config["version"].as_i64(), Some(version), "{config}");
}

/// [`node_config`] with the partitions spread over the live nodes.
fn spread_config(dir: &Path, node: &str, nats: &LocalNats, receiver: &str) -> PathBuf {
    let path = node_config(dir, node, nats, receiver);
    // `[cluster]` is the file's last table.
    // Audience sizes sampled each second, for their history gathered from every node.
    let text = std::fs::read_to_string(&path).unwrap().replacen(
        "[server]\n",
        "[server]\naudience_size_interval = \"1s\"\n",
        1,
    ) + "placement = \"spread\"\n";
    std::fs::write(&path, text).unwrap();
    path
}

/// The partitions a node's engine applies and logs, as it says.
async fn owned(server: &Server) -> BTreeSet<u64> {
    let view = cluster_view(server).await;
    view["owned"].as_array().into_iter().flatten().filter_map(|p| p.as_u64()).collect()
}

fn purchase(visitor: &str, id: &str) -> serde_json::Value {
    json!({ "event": "purchase", "visitor_id": visitor, "id": id, "data": { "order_total": 1 } })
}

/// Nodes `a` and `b` placing partitions spread: `a` starts and owns every partition, then `b`
/// joins. (d) Half the partitions move to `b`, and none is owned by both nodes at any moment
/// (the node receiving them is asked first: a partition moving between the two questions is
/// seen by neither, never by both).
async fn spread_pair(dir: &Path, nats: &LocalNats, receiver: &Receiver) -> (Server, Server) {
    let a = Server::start(&spread_config(dir, "a", nats, &receiver.url));
    eventually("a to own every partition", FIRST_START, async || (owned(&a).await.len() == 64).then_some(())).await;
    let b = Server::start(&spread_config(dir, "b", nats, &receiver.url));
    settled_half_each(&a, &b, FIRST_START).await;
    (a, b)
}

/// Waits for `a` and `b` to own 32 partitions each, checking throughout that none is owned by
/// both; returns what each owns.
async fn settled_half_each(a: &Server, b: &Server, within: Duration) -> (BTreeSet<u64>, BTreeSet<u64>) {
    let deadline = Instant::now() + within;
    loop {
        let on_b = owned(b).await;
        let on_a = owned(a).await;
        assert!(on_a.is_disjoint(&on_b), "owned by both: {:?}", on_a.intersection(&on_b).collect::<Vec<_>>());
        if on_a.len() == 32 && on_b.len() == 32 {
            return (on_a, on_b);
        }
        assert!(Instant::now() < deadline, "a owns {on_a:?}, b owns {on_b:?}\n{}", b.logs());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The first id `prefix-N` whose partition is one of `partitions`.
fn in_partitions(prefix: &str, partitions: &BTreeSet<u64>) -> String {
    (0..)
        .map(|i| format!("{prefix}-{i}"))
        .find(|d| partitions.contains(&(starling_log::partition_of(d) as u64)))
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn partitions_spread_over_the_nodes_stitch_across_them_and_move_when_a_node_dies() {
    let _heavy = harness::exclusive().await;
    let nats = LocalNats::start(3).unwrap();
    let receiver = Receiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = spread_pair(dir.path(), &nats, &receiver).await;
    let (on_a, on_b) = settled_half_each(&a, &b, Duration::ZERO).await;
    // Every node says who owns what (as of its last round).
    for node in [&a, &b] {
        let view = eventually("the node to see the partitions spread", Duration::from_secs(10), async || {
            let view = cluster_view(node).await;
            (view["partitions_per_node"] == json!({"a": 32, "b": 32})).then_some(view)
        })
        .await;
        assert_eq!(view["placement"], "spread");
    }

    // Two devices of one person, in partitions of different nodes, send purchases through both
    // nodes while they log in with one email hash, halfway.
    let (web, phone) = (in_partitions("web", &on_a), in_partitions("phone", &on_b));
    let hash = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
    const PER_CLIENT: usize = 40;
    let mut clients = Vec::new();
    for (i, (device, node)) in [(&web, &a), (&phone, &b), (&web, &b), (&phone, &a)].into_iter().enumerate() {
        let (events, device) = (format!("{}/v1/events", node.url), device.clone());
        clients.push(tokio::spawn(async move {
            for n in 0..PER_CLIENT {
                if n == PER_CLIENT / 2 && i < 2 {
                    let login = json!({"event": "login", "visitor_id": device, "data": {"email_hash": hash}});
                    let (status, body) = post_json(&events, &login).await;
                    assert_eq!(status, 202, "{body}");
                }
                let (status, body) = post_json(&events, &purchase(&device, &format!("c{i}-{n}"))).await;
                assert_eq!(status, 202, "{body}");
            }
        }));
    }
    for client in clients {
        client.await.unwrap();
    }
    // Read through either node, both devices are one profile holding every purchase once.
    for node in [&a, &b] {
        for device in [&web, &phone] {
            let url = format!("{}/v1/profiles/{device}", node.url);
            let deadline = Instant::now() + Duration::from_secs(20);
            let profile = loop {
                let (_, p) = get_json(&url).await;
                if p["attributes"]["purchase_count"] == (4 * PER_CLIENT) as f64 {
                    break p;
                }
                if Instant::now() > deadline {
                    let trouble = |s: &Server| {
                        s.logs()
                            .lines()
                            .filter(|l| l.contains("WARN") || l.contains("ERROR"))
                            .collect::<Vec<_>>()
                            .join("\n")
                    };
                    let (_, export) = get_json(&format!("{}/v1/profiles/{device}/export", node.url)).await;
                    let ids: BTreeSet<&str> =
                        export["events"].as_array().into_iter().flatten().filter_map(|e| e["id"].as_str()).collect();
                    let missing: Vec<String> = (0..4)
                        .flat_map(|c| (0..PER_CLIENT).map(move |n| format!("c{c}-{n}")))
                        .filter(|id| !ids.contains(id.as_str()))
                        .collect();
                    panic!(
                        "not every purchase in {device} through {}: missing {missing:?}: {p}\na:\n{}\nb:\n{}",
                        node.url,
                        trouble(&a),
                        trouble(&b)
                    );
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            };
            assert_eq!(profile["event_count"], 4 * PER_CLIENT + 2, "{profile}");
            let (_, other) =
                get_json(&format!("{}/v1/profiles/{}", node.url, if device == &web { &phone } else { &web })).await;
            assert_eq!(profile["id"], other["id"], "one profile: {profile} {other}");
        }
    }

    // The device that was not the survivor is unstitched, through the node owning its
    // partition (which forwards it to the profile's owner): it is split out into that node's
    // partition, which adopts it before the answer. Read at once through either node, each
    // device is a profile of its own again, with its purchases.
    let (_, merged) = get_json(&format!("{}/v1/profiles/{web}", a.url)).await;
    let split = if merged["id"] == web.as_str() { phone.clone() } else { web.clone() };
    let through = if split == web { &a } else { &b };
    let welcomed =
        |who: &str| receiver.received().iter().filter(|r| r.path == "/welcome" && r.body["who"] == who).count();
    // Counted once every earlier welcome is delivered.
    none_pending(&a).await;
    let welcomed_before = welcomed(&split);
    let (status, answer) = post_json(&format!("{}/v1/profiles/{split}/unstitch", through.url), &json!({})).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["events"][&split], (2 * PER_CLIENT + 1) as f64, "{answer}");
    assert_eq!(answer["adopted"], true, "{answer}");
    for node in [&a, &b] {
        for device in [&web, &phone] {
            let (status, profile) = get_json(&format!("{}/v1/profiles/{device}", node.url)).await;
            assert_eq!((status, &profile["id"]), (200, &json!(device)), "{device} through {}: {profile}", node.url);
            assert_eq!(profile["event_count"], 2 * PER_CLIENT + 1, "{profile}");
            assert_eq!(profile["attributes"]["purchase_count"], (2 * PER_CLIENT) as f64, "{profile}");
        }
    }
    let apart = async |node: &Server, device: &String| {
        let url = format!("{}/v1/profiles/{device}", node.url);
        let what = format!("{device} a profile of its own through {}", node.url);
        let profile = eventually(&what, Duration::from_secs(20), async || {
            let (_, p) = get_json(&url).await;
            (p["id"] == device.as_str() && p["attributes"]["purchase_count"] == (2 * PER_CLIENT) as f64).then_some(p)
        })
        .await;
        assert_eq!(profile["event_count"], 2 * PER_CLIENT + 1, "{profile}");
    };
    // It joined `known` again: welcomed once more, by the node that adopted it.
    eventually("the split-out profile to be welcomed", Duration::from_secs(20), async || {
        (welcomed(&split) == welcomed_before + 1).then_some(())
    })
    .await;

    // Another person's second device logs in through the node owning its partition, the
    // first device's profile being the other node's: read at once through that node, the
    // device is the first device's profile with both devices' events. (The read is forwarded
    // with the position of the records that stitched the device, and the owner answers once
    // it has followed them; before, it answered `503` until it had.) Read through the other
    // node after the position the login was answered with, it is too.
    for (i, (first_node, second_node, second_on)) in [(&a, &b, &on_b), (&b, &a, &on_a)].into_iter().enumerate() {
        let first_on = if i == 0 { &on_a } else { &on_b };
        let (laptop, tablet) =
            (in_partitions(&format!("laptop{i}"), first_on), in_partitions(&format!("tablet{i}"), second_on));
        // Its partition is the second node's: that node answers for it only once it knows it
        // as the first device's id.
        let email = in_partitions(&format!("email{i}"), second_on);
        let login = |device: &str| json!({"event": "login", "visitor_id": device, "data": {"email_hash": email}});
        for (node, event) in [(first_node, purchase(&laptop, &format!("l{i}"))), (first_node, login(&laptop))] {
            let (status, body) = post_json(&format!("{}/v1/events", node.url), &event).await;
            assert_eq!(status, 202, "{body}");
        }
        let by_email = format!("{}/v1/profiles/{email}", second_node.url);
        eventually("the second node to know the email as the first device's", Duration::from_secs(10), async || {
            let (_, p) = get_json(&by_email).await;
            (p["id"] == laptop.as_str()).then_some(())
        })
        .await;
        let mut position = 0;
        for event in [purchase(&tablet, &format!("t{i}")), login(&tablet)] {
            let (status, body) = post_json(&format!("{}/v1/events", second_node.url), &event).await;
            assert_eq!(status, 202, "{body}");
            position = body["position"].as_u64().unwrap_or_else(|| panic!("no stream position answered: {body}"));
        }
        // Through the first device's node, after the position the login was answered with: the
        // merge is applied there, for either device's id.
        for id in [&laptop, &tablet] {
            let url = format!("{}/v1/profiles/{id}?after={position}", first_node.url);
            let (status, profile) = get_json(&url).await;
            assert_eq!((status, &profile["id"]), (200, &json!(laptop)), "{id} read after {position}: {profile}");
            assert_eq!(profile["event_count"], 4, "{profile}");
        }
        let (status, answer) = get_json(&format!("{}/v1/profiles/{tablet}?after=soon", first_node.url)).await;
        assert_eq!(status, 400, "{answer}");
        assert!(answer["error"].as_str().unwrap_or_default().contains("`after`"), "{answer}");
        let (status, profile) = get_json(&format!("{}/v1/profiles/{tablet}", second_node.url)).await;
        assert_eq!((status, &profile["id"]), (200, &json!(laptop)), "{tablet} read at once: {profile}");
        assert_eq!(profile["event_count"], 4, "{profile}");
        assert_eq!(profile["attributes"]["purchase_count"], 2.0, "{profile}");
    }

    // The person of the first round (both devices and the email, in a's profile) is deleted
    // through b by the device in b's partitions: a, the profile's owner, deletes it, and no id
    // of theirs is found through either node. The deletion's audit record is a's: read through
    // b, the audit log is gathered from both nodes.
    let (laptop, tablet, email) =
        (in_partitions("laptop0", &on_a), in_partitions("tablet0", &on_b), in_partitions("email0", &on_b));
    let deletion = harness::client().delete(format!("{}/v1/profiles/{tablet}", b.url)).send().await.unwrap();
    let deleted: serde_json::Value = deletion.json().await.unwrap();
    assert_eq!(deleted["deleted"], true, "{deleted}");
    assert_eq!(deleted["audit"]["reason"], "request", "{deleted}");
    for node in [&a, &b] {
        for id in [&laptop, &tablet, &email] {
            let (status, answer) = get_json(&format!("{}/v1/profiles/{id}", node.url)).await;
            assert_eq!(status, 404, "{id} through {} after its deletion: {answer}", node.url);
        }
    }
    let audit = |own: bool| {
        let request = harness::client().get(format!("{}/v1/audit", b.url));
        let request = if own { request.header("x-starling-forwarded-by", "test") } else { request };
        async move {
            let response = request.send().await.unwrap();
            let from = response.headers().get("x-starling-gathered-from").map(|v| v.to_str().unwrap().to_string());
            (from, response.json::<serde_json::Value>().await.unwrap())
        }
    };
    let (from, gathered) = audit(false).await;
    assert_eq!(from.as_deref().map(|f| f.split(',').count()), Some(2), "{gathered}");
    let holds_the_deletion =
        |log: &serde_json::Value| log["audit"].as_array().unwrap().iter().any(|r| r["detail"] == deleted["audit"]);
    assert!(holds_the_deletion(&gathered), "{} not in the audit log through b: {gathered}", deleted["audit"]);
    let (_, own) = audit(true).await;
    assert!(!holds_the_deletion(&own), "b's own audit log: {own}");
    // Seen again through either node right after, each device starts a profile of its own.
    for (node, device) in [(&a, &tablet), (&b, &laptop)] {
        let (status, body) =
            post_json(&format!("{}/v1/events", node.url), &purchase(device, &format!("again-{device}"))).await;
        assert_eq!(status, 202, "{body}");
        let position = body["position"].as_u64().unwrap();
        for reader in [&a, &b] {
            let (status, profile) = get_json(&format!("{}/v1/profiles/{device}?after={position}", reader.url)).await;
            assert_eq!((status, &profile["id"]), (200, &json!(device)), "{device} through {}: {profile}", reader.url);
            assert_eq!(profile["event_count"], 1, "{profile}");
        }
    }

    // Through one node, people stitching two devices across both: `--verify` reads each
    // device through that node at once, after the stream position its last write was
    // answered, and finds every merge applied, the other node's too.
    let verified = finished(loadgen_with(&b, "sv", 1_000, 0.5, &["--verify"]).await).await;
    assert!(verified.contains(" 0 mismatches"), "{verified}");
    println!("through b: {}", verified.lines().find(|l| l.starts_with("verified")).unwrap_or_default());

    // (a) Load through both nodes, many people stitching two devices across the nodes; one
    // node dies under it and the other takes its partitions: nothing acknowledged is lost.
    let through_a = loadgen(&a, "sa", 3_000, 0.5).await;
    let mut through_b = loadgen(&b, "sb", 3_000, 0.5).await;
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    b.kill9();
    let killed = Instant::now();
    eventually("a to own every partition again", Duration::from_secs(30), async || {
        (owned(&a).await.len() == 64).then_some(())
    })
    .await;
    let failover = killed.elapsed();
    through_b.kill().await.unwrap();
    finished(loadgen(&a, "sb", 3_000, 0.5).await).await;
    finished(through_a).await;
    assert!(failover < Duration::from_secs(10), "a owned b's partitions {failover:?} after b died");
    println!("failover: a owned every partition {failover:?} after b was killed");
    for prefix in ["sa", "sb"] {
        verify(&a, prefix, 3_000, 0.5).await;
    }
    // The profile b adopted is a's now, from b's snapshot and records.
    apart(&a, &split).await;
    every_action_delivered_once_but(&a, &receiver, &[&split]).await;
    a.stop();
}

/// Spread, the stream forgets what every node's database and the latest snapshot hold (each
/// node says in its heartbeat how far its database goes), so it does not grow without end; a
/// node joining afterwards starts from the snapshot (the stream no longer holds what came
/// before it) and serves its share with every profile adding up.
#[tokio::test(flavor = "multi_thread")]
async fn the_spread_stream_forgets_what_every_node_holds_and_a_node_joining_starts_from_the_snapshot() {
    let _heavy = harness::exclusive().await;
    let nats = LocalNats::start(3).unwrap();
    let receiver = Receiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = spread_pair(dir.path(), &nats, &receiver).await;
    let (through_a, through_b) = (loadgen(&a, "ka", 2_000, 0.5).await, loadgen(&b, "kb", 2_000, 0.5).await);
    finished(through_a).await;
    finished(through_b).await;
    let written = cluster_view(&a).await["stream"]["last_position"].as_u64().unwrap();
    assert!(written > 4 * 64, "{written} records written");
    // Once a snapshot and both databases hold the last records, each partition keeps its last
    // one (and what was written since: a few visits ending).
    let held = eventually("the stream to forget what every node holds", Duration::from_secs(30), async || {
        let records = cluster_view(&b).await["stream"]["records"].as_u64()?;
        (records <= 2 * 64).then_some(records)
    })
    .await;
    println!("the stream holds {held} of the {written} records written");
    assert!(a.logs().contains("stream truncated before the snapshot"), "{}", a.logs());

    let c = Server::start(&spread_config(dir.path(), "c", &nats, &receiver.url));
    eventually("c to take its share", FIRST_START, async || {
        let (on_a, on_b, on_c) = (owned(&a).await, owned(&b).await, owned(&c).await);
        (on_c.len() >= 21 && on_a.len() + on_b.len() + on_c.len() == 64).then_some(())
    })
    .await;
    assert!(c.logs().contains("state restored from the latest snapshot"), "{}", c.logs());
    // Read through the node that joined: its partitions' profiles are its engine's own.
    for prefix in ["ka", "kb"] {
        verify(&c, prefix, 2_000, 0.5).await;
    }
    finished(loadgen(&c, "kc", 1_000, 0.5).await).await;
    // Events handed to a partition while it moved to c wait in the intake (acknowledged there)
    // until their owner applies them.
    eventually("the intake to be applied", Duration::from_secs(30), async || {
        (cluster_view(&a).await["intake_held"] == 0).then_some(())
    })
    .await;
    verify(&a, "kc", 1_000, 0.5).await;
    every_action_delivered_once(&a, &receiver).await;
    reads_over_every_profile_add_up(&b, &[&a, &b, &c]).await;
    for node in [a, b, c] {
        node.stop();
    }
}

/// Reads over every stored profile through `through` (an audience, a preview, a backtest) are
/// gathered from `nodes`: they add up what each node answers for its own partitions (asked as
/// a node gathering them asks), and name every node.
async fn reads_over_every_profile_add_up(through: &Server, nodes: &[&Server]) {
    let ask = async |server: &Server, own: bool, post: Option<&str>, path: &str| {
        let url = format!("{}{path}", server.url);
        let request = match post {
            Some(body) => harness::client().post(url).body(body.to_string()),
            None => harness::client().get(url),
        };
        let request = if own { request.header("x-starling-forwarded-by", "test") } else { request };
        let response = request.send().await.unwrap();
        let status = response.status();
        let from = response.headers().get("x-starling-gathered-from").map(|v| v.to_str().unwrap().to_string());
        let body: serde_json::Value = response.json().await.unwrap();
        assert_eq!(status, 200, "{path}: {body}");
        assert_eq!(from.map(|f| f.split(',').count()), (!own).then_some(nodes.len()), "{path}");
        body
    };
    let (_, config) = get_json(&format!("{}/v1/config", through.url)).await;
    let config = config["source"].as_str().unwrap().to_string();
    let rule = r#"rule = { attribute = "category_views", key = "shoes", op = ">=", value = 3 }"#;
    let reads = [
        (None, "/v1/audiences/shoes_fans"),
        (Some(rule), "/v1/audiences/preview"),
        (Some(&config), "/v1/backtest"),
        (None, "/v1/audiences/shoes_fans/history"),
    ];
    for (body, path) in reads {
        let whole = ask(through, false, body, path).await;
        let mut shares = Vec::new();
        for node in nodes {
            shares.push(ask(node, true, body, path).await);
        }
        let total = |f: &dyn Fn(&serde_json::Value) -> Option<u64>| {
            shares.iter().map(|share| f(share).unwrap_or_else(|| panic!("{path}: {share}"))).sum::<u64>()
        };
        let counts: Vec<(&str, u64, u64)> = match path {
            "/v1/audiences/shoes_fans" => {
                vec![("size", whole["size"].as_u64().unwrap(), total(&|s| s["size"].as_u64()))]
            }
            "/v1/audiences/preview" => vec![
                ("size", whole["size"].as_u64().unwrap(), total(&|s| s["size"].as_u64())),
                ("profiles", whole["profiles"].as_u64().unwrap(), total(&|s| s["profiles"].as_u64())),
            ],
            // The sizes sampled last, at the latest moment any node sampled (every node has
            // sampled since the load: each does every second).
            "/v1/audiences/shoes_fans/history" => {
                let last = |b: &serde_json::Value| b["samples"].as_array()?.last()?["size"].as_u64();
                vec![("latest sampled size", last(&whole).unwrap(), total(&last))]
            }
            _ => {
                let fans = |b: &serde_json::Value| {
                    b["audiences"].as_array()?.iter().find(|a| a["audience"] == "shoes_fans")?["stored_size"].as_u64()
                };
                vec![
                    ("events", whole["events"].as_u64().unwrap(), total(&|s| s["events"].as_u64())),
                    ("profiles", whole["profiles"].as_u64().unwrap(), total(&|s| s["profiles"].as_u64())),
                    ("shoes_fans stored", fans(&whole).unwrap(), total(&fans)),
                ]
            }
        };
        for (count, gathered, summed) in counts {
            assert!(summed > 0, "{path}: {count} is 0 on every node");
            assert_eq!(gathered, summed, "{path}: {count} gathered against each node's added up\n{whole}\n{shares:?}");
        }
    }
}

/// Spread, a node away for longer than the stream waits for it (`wait_for_absent`) finds, once
/// it wakes, that the stream forgot records it had not applied: it applies nothing after them
/// and stops, saying so. Started again, it restores the latest snapshot, follows on from it,
/// takes its share back, and every profile adds up through it.
#[tokio::test(flavor = "multi_thread")]
async fn a_spread_node_back_after_the_stream_forgot_what_it_lacked_stops_and_restarts_from_the_snapshot() {
    let _heavy = harness::exclusive().await;
    let nats = LocalNats::start(3).unwrap();
    let receiver = Receiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let config = |node: &str| {
        let path = spread_config(dir.path(), node, &nats, &receiver.url);
        let text = std::fs::read_to_string(&path).unwrap() + "wait_for_absent = \"1s\"\n";
        std::fs::write(&path, text).unwrap();
        path
    };
    let a = Server::start(&config("a"));
    eventually("a to own every partition", FIRST_START, async || (owned(&a).await.len() == 64).then_some(())).await;
    let mut b = Server::start(&config("b"));
    settled_half_each(&a, &b, FIRST_START).await;

    let signal = |sig: &str, pid: u32| {
        std::process::Command::new("kill").arg(sig).arg(pid.to_string()).status().unwrap();
    };
    signal("-STOP", b.pid());
    eventually("a to own every partition", Duration::from_secs(30), async || {
        (owned(&a).await.len() == 64).then_some(())
    })
    .await;
    finished(loadgen(&a, "fa", 2_000, 0.5).await).await;
    // b, away for longer than a second, is not waited for: the stream forgets what a's database
    // and the snapshot hold.
    eventually("the stream to forget what a holds", Duration::from_secs(30), async || {
        let records = cluster_view(&a).await["stream"]["records"].as_u64()?;
        (records <= 2 * 64).then_some(())
    })
    .await;
    let restored_before = b.logs().matches("state restored from the latest snapshot").count();
    signal("-CONT", b.pid());
    let exited = b.exits_within(Duration::from_secs(60));
    assert!(!exited.success(), "{exited}");
    assert!(b.logs().contains("the stream forgot records this node had not applied"), "{}", b.logs());
    drop(b);

    let b = Server::start(&config("b"));
    settled_half_each(&a, &b, Duration::from_secs(60)).await;
    assert_eq!(b.logs().matches("state restored from the latest snapshot").count(), restored_before + 1);
    for node in [&b, &a] {
        verify(node, "fa", 2_000, 0.5).await;
    }
    every_action_delivered_once(&a, &receiver).await;
    a.stop();
    b.stop();
}

/// Test (c) with partitions spread: a node is paused past its leases while the other takes its
/// partitions and goes on writing them; woken, the paused node writes nothing under its lapsed
/// leases, catches up with what was written meanwhile, and the partitions spread again.
#[tokio::test(flavor = "multi_thread")]
async fn a_paused_spread_node_cannot_write_when_it_wakes_and_catches_up() {
    let _heavy = harness::exclusive().await;
    let nats = LocalNats::start(3).unwrap();
    let receiver = Receiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = spread_pair(dir.path(), &nats, &receiver).await;

    // (c) b is paused past its leases; a takes b's partitions and is sent events for them.
    let (_, on_b) = settled_half_each(&a, &b, Duration::from_secs(30)).await;
    let visitor = in_partitions("paused", &on_b);
    let events = |node: &Server| format!("{}/v1/events", node.url);
    let (status, body) = post_json(&events(&b), &purchase(&visitor, "before")).await;
    assert_eq!(status, 202, "{body}");
    let signal = |sig: &str| {
        std::process::Command::new("kill").arg(sig).arg(b.pid().to_string()).status().unwrap();
    };
    signal("-STOP");
    let paused = Instant::now();
    eventually("a to own every partition", Duration::from_secs(30), async || {
        (owned(&a).await.len() == 64).then_some(())
    })
    .await;
    println!("a owned every partition {:?} after b was paused", paused.elapsed());
    // Several records of the partition, then a snapshot of a's copy: the stream keeps what b
    // has not followed yet.
    let snapshots_before = a.logs().matches("snapshot stored").count();
    let mut acknowledged = vec!["before".to_string()];
    for n in 0..3 {
        let id = format!("while-paused-{n}");
        let (status, body) = post_json(&events(&a), &purchase(&visitor, &id)).await;
        assert_eq!(status, 202, "{body}");
        acknowledged.push(id);
    }
    eventually("a to store a snapshot", Duration::from_secs(20), async || {
        (a.logs().matches("snapshot stored").count() > snapshots_before).then_some(())
    })
    .await;
    // Woken, b is sent events for the partition at once, before it has seen its leases gone:
    // whatever it answers, nothing it applied under a lapsed lease reaches the stream. What it
    // acknowledged is applied once, by the partition's owner; what it refused, not at all.
    signal("-CONT");
    let mut refused = Vec::new();
    for n in 0..20 {
        let id = format!("after-waking-{n}");
        let (status, _) = post_json(&events(&b), &purchase(&visitor, &id)).await;
        match status {
            202 => acknowledged.push(id),
            _ => refused.push(id),
        }
    }
    // b rejoins; the partitions spread again, never owned twice.
    settled_half_each(&a, &b, Duration::from_secs(60)).await;
    for node in [&a, &b] {
        let url = format!("{}/v1/profiles/{visitor}/export", node.url);
        let deadline = Instant::now() + Duration::from_secs(20);
        let (export, mut ids) = loop {
            let (_, export) = get_json(&url).await;
            let ids: Vec<String> = export["events"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|e| e["id"].as_str().map(String::from))
                .collect();
            if acknowledged.iter().all(|id| ids.contains(id)) {
                break (export, ids);
            }
            assert!(
                Instant::now() < deadline,
                "acknowledged {acknowledged:?}, refused {refused:?}, applied through {}: {ids:?}",
                node.url
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let applied = ids.len();
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), applied, "a purchase applied twice: {export}");
        assert!(!ids.iter().any(|id| refused.contains(id)), "a refused purchase was applied: {export}");
        assert_eq!(export["profile"]["attributes"]["purchase_count"], applied as f64, "{export}");
    }
    // The partition's owner holds them in its database (restored from a's snapshot and the
    // stream after it, if b took the partition back); the other node holds none of the profile.
    let partition = starling_log::partition_of(&visitor) as u64;
    let (owner, other) = if owned(&a).await.contains(&partition) { ("a", "b") } else { ("b", "a") };
    let events_in = |node: &str| {
        let conn = starling_store::open_reader(&dir.path().join(node).join("starling.db")).unwrap();
        starling_store::profile_events(&conn, &visitor).unwrap().into_iter().filter_map(|e| e.id).collect::<Vec<_>>()
    };
    let held = events_in(owner);
    assert!(acknowledged.iter().all(|id| held.contains(id)), "{owner} holds {held:?} of {acknowledged:?}");
    eventually("the other node to hold none of the profile", Duration::from_secs(10), async || {
        events_in(other).is_empty().then_some(())
    })
    .await;
    println!("b acknowledged {} of 20 events after waking, refused {}", 20 - refused.len(), refused.len());
    a.stop();
    b.stop();
}

/// Test (b) with partitions spread: the stream's leader dies under load through both nodes;
/// ingestion pauses for the election at most and goes on, and nothing is lost.
#[tokio::test(flavor = "multi_thread")]
async fn spread_nodes_lose_nothing_when_the_stream_leader_dies() {
    let _heavy = harness::exclusive().await;
    let mut nats = LocalNats::start(3).unwrap();
    let receiver = Receiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = spread_pair(dir.path(), &nats, &receiver).await;
    let through_a = loadgen(&a, "ta", 2_000, 0.5).await;
    let through_b = loadgen(&b, "tb", 2_000, 0.5).await;
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    nats.kill9(nats_stream_leader(&a).await);
    finished(through_a).await;
    finished(through_b).await;
    // Events handed to partitions while their leases lapsed in the election wait in the intake
    // (acknowledged there) until their owners apply them.
    let loaded = Instant::now();
    eventually("the intake to be applied", Duration::from_secs(60), async || {
        (cluster_view(&a).await["intake_held"] == 0).then_some(())
    })
    .await;
    println!("the intake was applied {:?} after the load ended", loaded.elapsed());
    for (node, prefix) in [(&a, "ta"), (&b, "tb"), (&a, "tb"), (&b, "ta")] {
        verify(node, prefix, 2_000, 0.5).await;
    }
    every_action_delivered_once(&a, &receiver).await;
    a.stop();
    b.stop();
}

/// Spread, the NATS servers stop answering (paused: connections open, nothing answered). A
/// node's ownership round then waits on the servers, yet each node stops applying its
/// partitions live by its own clock as their leases lapse: reads and writes of their profiles
/// are refused with `503` and `Retry-After` (no node keeps a copy of another's profiles), and
/// `/v1/cluster` still answers.
/// Once the servers answer again, the nodes take their partitions back, spread, and what was
/// acknowledged before is there.
#[tokio::test(flavor = "multi_thread")]
async fn spread_nodes_cut_off_from_the_servers_give_up_their_partitions_as_their_leases_lapse() {
    let _heavy = harness::exclusive().await;
    let nats = LocalNats::start(3).unwrap();
    let receiver = Receiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = spread_pair(dir.path(), &nats, &receiver).await;
    let (on_a, _) = settled_half_each(&a, &b, Duration::from_secs(30)).await;
    let visitor = in_partitions("cut", &on_a);
    let events = format!("{}/v1/events", a.url);
    let (status, body) = post_json(&events, &purchase(&visitor, "before")).await;
    assert_eq!(status, 202, "{body}");
    let read = async |node: &Server| {
        let url = format!("{}/v1/profiles/{visitor}", node.url);
        let response = harness::client().get(url).send().await.unwrap();
        let header =
            |name| response.headers().get(name).map(|v: &reqwest::header::HeaderValue| v.to_str().unwrap().to_string());
        let (from, retry) = (header("x-starling-answered-from"), header("retry-after"));
        (response.status().as_u16(), from, retry, response.json::<serde_json::Value>().await.unwrap())
    };
    let (status, from, _, profile) = read(&a).await;
    assert_eq!((status, from.as_deref()), (200, Some("engine")), "{profile}");
    // a's view of the owners catches up with b's last leases within a round.
    eventually("a's status to show each node's share", Duration::from_secs(10), async || {
        let status = cluster_status(&a);
        [("a", &a, " (this node)"), ("b", &b, "")]
            .into_iter()
            .all(|(name, node, me)| {
                let line = format!("  {name}{me}: {}, configuration version", node.url);
                status.lines().any(|l| l.starts_with(&line) && l.ends_with(", owns 32 partitions"))
            })
            .then_some(())
    })
    .await;

    for i in 0..3 {
        nats.pause(i);
    }
    let paused = Instant::now();
    // A lease is renewed at the latest with a third of its period (1 s) left: within that and
    // the node's check, each node gives up every partition, though no round returns meanwhile.
    for node in [&a, &b] {
        eventually("the node to give up its partitions", Duration::from_secs(4), async || {
            owned(node).await.is_empty().then_some(())
        })
        .await;
    }
    println!("both nodes gave up their partitions {:?} after the servers stopped answering", paused.elapsed());
    let status = cluster_status(&a);
    for line in [
        "this node applies 0 partitions live",
        "events taken in, waiting to be applied: not known (the servers did not answer)",
    ] {
        assert!(status.lines().any(|l| l == line), "no `{line}`:\n{status}");
    }
    // Through either node (b, whose last round saw a own the partition, forwards the read to a),
    // the read is refused until a node owns the partition again.
    for node in [&a, &b] {
        let (status, _, retry, answer) = read(node).await;
        assert_eq!((status, retry.as_deref()), (503, Some("1")), "{answer}");
        assert!(answer["error"].as_str().is_some_and(|e| e.contains("retry")), "{answer}");
    }
    // The publish may already be on its way to a stalled server, which stores it once resumed:
    // the answer says so, and the client sends the event again once the servers answer.
    let refused = purchase(&visitor, "cut-off");
    let (status, body) = post_json(&events, &refused).await;
    assert_eq!(status, 503, "an event no server acknowledged is refused: {body}");
    assert!(body["error"].as_str().is_some_and(|e| e.contains("send them again")), "{body}");
    println!("the event was refused: {body}");
    // `loadgen --verify-only` reads after where the stream ends: no node can say, so it fails
    // saying why rather than reading without it.
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_starling"))
        .args(["loadgen", "--server", &a.url, "--people", "10", "--events", "10", "--verify-only"])
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success() && stderr.contains("the node cannot reach the stream"), "{stderr}");

    for i in 0..3 {
        nats.resume(i);
    }
    settled_half_each(&a, &b, Duration::from_secs(60)).await;
    for event in [refused, purchase(&visitor, "after")] {
        let (status, body) = post_json(&events, &event).await;
        assert_eq!(status, 202, "{body}");
    }
    // A node that has not yet read the leases its peer took back refuses the read for a moment
    // (its first rounds after the outage may wait on a server still catching up: up to 30 s).
    for node in [&a, &b] {
        // What the node answered, printed when it changes (shown if the wait times out).
        let answered = std::sync::Mutex::new(String::new());
        eventually("the profile's owner to answer with the three purchases", Duration::from_secs(30), async || {
            let (status, from, retry, profile) = read(node).await;
            let purchases = &profile["attributes"]["purchase_count"];
            let seen = format!("{}: {status} from {from:?} (retry after {retry:?}), purchases {purchases}", node.url);
            if *answered.lock().unwrap() != seen {
                println!("{seen}");
                *answered.lock().unwrap() = seen;
            }
            (status == 200 && from.as_deref() == Some("engine") && profile["attributes"]["purchase_count"] == 3.0)
                .then_some(())
        })
        .await;
    }
    a.stop();
    b.stop();
}

//! Durability and backpressure: nothing acknowledged is lost, on kill -9 or under overload.

use crate::harness::{self, Receiver, Server, eventually, get_json};
use serde_json::json;
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

const VISITORS: usize = 500;
const ROUNDS: usize = 100;

fn regulars_config(dir: &Path, receiver: &str, server_extra: &str) -> PathBuf {
    let text = format!(
        r#"
[server]
database = "starling.db"
plugins = "plugins"
{server_extra}

[[audience]]
name = "regulars"
rule = {{ attribute = "event_count", op = ">=", value = {ROUNDS} }}

[[action]]
name = "welcome"
audience = "regulars"
trigger = "joined"
connector = "webhook"
settings = {{ url = "{receiver}/welcome" }}
params = {{ who = "profile_id" }}
"#
    );
    let path = dir.join("starling.toml");
    std::fs::write(&path, text).unwrap();
    harness::install(harness::connectors(), "webhook", &dir.join("plugins"), |m| m);
    path
}

/// Round `r`: one event for each visitor, each with its own id.
fn round(r: usize) -> serde_json::Value {
    let events: Vec<_> = (0..VISITORS)
        .map(|v| json!({"event": "view", "visitor_id": format!("v{v}"), "id": format!("v{v}-r{r}"), "data": {"round": r}}))
        .collect();
    json!({ "events": events })
}

async fn post(client: &reqwest::Client, url: &str, body: &serde_json::Value) -> Result<u16, reqwest::Error> {
    Ok(client.post(url).json(body).send().await?.status().as_u16())
}

#[tokio::test(flavor = "multi_thread")]
async fn acknowledged_events_survive_kill_9_and_their_actions_are_delivered() {
    let _alone = harness::exclusive().await;
    let receiver = Receiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let config = regulars_config(dir.path(), &receiver.url, "");
    let server = Server::start(&config);
    let url = format!("{}/v1/events", server.url);

    // Four clients post the 100 rounds (50,000 events) in batches; the server is killed midway.
    let acked = post_rounds_and_kill(server, &url, ROUNDS, round).await;

    let server = Server::start(&config);
    for v in [0, VISITORS / 2, VISITORS - 1] {
        let (_, p) = get_json(&format!("{}/v1/profiles/v{v}", server.url)).await;
        let count = p["event_count"].as_u64().unwrap() as usize;
        assert!(count >= acked.len(), "visitor v{v}: {count} events stored, {} acknowledged", acked.len());
    }
    // The sender retries every round it has no acknowledgement for; ids make that safe.
    resend_and_check_every_visitor(&server, &receiver, &acked).await;
    server.stop();
}

/// Four clients post rounds `0..rounds` (`body(r)` each) until a third are acknowledged, then
/// the server is killed with SIGKILL; returns the rounds acknowledged, fewer than all.
async fn post_rounds_and_kill(
    server: Server,
    url: &str,
    rounds: usize,
    body: fn(usize) -> serde_json::Value,
) -> HashSet<usize> {
    let next = Arc::new(AtomicUsize::new(0));
    let acked: Arc<std::sync::Mutex<HashSet<usize>>> = Arc::default();
    let mut clients = tokio::task::JoinSet::new();
    for _ in 0..4 {
        let (next, acked, url) = (next.clone(), acked.clone(), url.to_string());
        clients.spawn(async move {
            let client = harness::client();
            loop {
                let r = next.fetch_add(1, Ordering::SeqCst);
                if r >= rounds {
                    return;
                }
                match post(&client, &url, &body(r)).await {
                    Ok(202) => {
                        acked.lock().unwrap().insert(r);
                    }
                    _ => return,
                }
            }
        });
    }
    eventually("a third of the rounds acknowledged", Duration::from_secs(120), async || {
        (acked.lock().unwrap().len() >= rounds / 3).then_some(())
    })
    .await;
    server.kill9();
    while clients.join_next().await.is_some() {}
    let acked: HashSet<usize> = acked.lock().unwrap().clone();
    assert!(acked.len() < rounds, "the kill must land mid-stream");
    acked
}

/// kill -9 at moments spread over the cycle of writing applied state to SQLite (every 200 ms,
/// or at once for actions) and checkpointing its WAL (every 100 ms): with state held only in
/// memory and the log, while it is being written, while the WAL is copied back. After every
/// restart everything acknowledged so far is there; in the end every event is applied exactly
/// once and every welcome carries one idempotency key.
#[tokio::test(flavor = "multi_thread")]
async fn kills_across_the_materialization_and_checkpoint_cycle_lose_nothing() {
    let _alone = harness::exclusive().await;
    let receiver = Receiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let config = regulars_config(dir.path(), &receiver.url, "");
    let mut acked: HashSet<usize> = HashSet::new();
    let mut replayed = Vec::new();
    for kill_after_ms in [70u64, 190, 260, 330, 450, 610] {
        let server = Server::start(&config);
        replayed.push(replayed_records(&server.logs()));
        for v in [0, VISITORS / 3, VISITORS - 1] {
            let (_, p) = get_json(&format!("{}/v1/profiles/v{v}", server.url)).await;
            let count = p["event_count"].as_u64().unwrap_or(0) as usize;
            assert!(count >= acked.len(), "visitor v{v}: {count} events stored, {} acknowledged", acked.len());
        }
        let newly = post_rounds_and_kill_after(server, &acked, Duration::from_millis(kill_after_ms)).await;
        acked.extend(newly);
    }
    let server = Server::start(&config);
    replayed.push(replayed_records(&server.logs()));
    resend_and_check_every_visitor(&server, &receiver, &acked).await;
    eprintln!("records replayed at each start: {replayed:?}");
    assert!(replayed.iter().any(|n| *n > 0), "at least one kill left acknowledged work only in the log: {replayed:?}");
    server.stop();
}

/// Sends again every round not acknowledged, then checks that every visitor has every event
/// exactly once and that each visitor's welcome was delivered under one idempotency key.
async fn resend_and_check_every_visitor(server: &Server, receiver: &Receiver, acked: &HashSet<usize>) {
    let client = harness::client();
    for r in (0..ROUNDS).filter(|r| !acked.contains(r)) {
        assert_eq!(post(&client, &url_of(server), &round(r)).await.unwrap(), 202);
    }
    for v in 0..VISITORS {
        let (_, p) = get_json(&format!("{}/v1/profiles/v{v}", server.url)).await;
        assert_eq!(p["event_count"].as_u64(), Some(ROUNDS as u64), "visitor v{v}: every event exactly once");
    }
    let got = eventually("every visitor's welcome", Duration::from_secs(120), async || {
        let got = receiver.received();
        let who: HashSet<String> = got.iter().map(|r| r.header("x-starling-profile").to_string()).collect();
        (who.len() == VISITORS).then_some(got)
    })
    .await;
    let mut keys: HashMap<String, HashSet<String>> = HashMap::new();
    for r in &got {
        keys.entry(r.header("x-starling-profile").to_string())
            .or_default()
            .insert(r.header("idempotency-key").to_string());
    }
    assert!(keys.values().all(|k| k.len() == 1), "a visitor's repeated deliveries carry one idempotency key");
}

/// How many log records the last start of the server applied again (from its log lines).
fn replayed_records(logs: &str) -> usize {
    logs.lines()
        .rev()
        .find(|l| l.contains("event log replayed after the stored state"))
        .and_then(|l| l.split("records=").nth(1))
        .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|n| n.parse().ok())
        .expect("the start logs how many records it replayed")
}

/// Four clients post the rounds not yet acknowledged (and, once every round is, all of them
/// again, as duplicates) until `after` has passed since the first acknowledgement, then the
/// server is killed with SIGKILL; returns the rounds acknowledged.
async fn post_rounds_and_kill_after(server: Server, acked: &HashSet<usize>, after: Duration) -> HashSet<usize> {
    let url = url_of(&server);
    let mut order: Vec<usize> = (0..ROUNDS).filter(|r| !acked.contains(r)).collect();
    order.extend(acked.iter().copied());
    let order = Arc::new(order);
    let next = Arc::new(AtomicUsize::new(0));
    let acked: Arc<std::sync::Mutex<HashSet<usize>>> = Arc::default();
    let mut clients = tokio::task::JoinSet::new();
    for _ in 0..4 {
        let (order, next, acked, url) = (order.clone(), next.clone(), acked.clone(), url.clone());
        clients.spawn(async move {
            let client = harness::client();
            loop {
                let r = order[next.fetch_add(1, Ordering::SeqCst) % order.len()];
                match post(&client, &url, &round(r)).await {
                    Ok(202) => {
                        acked.lock().unwrap().insert(r);
                    }
                    // Busy: told to come back.
                    Ok(503) => tokio::time::sleep(Duration::from_millis(20)).await,
                    _ => return,
                }
            }
        });
    }
    eventually("a first round acknowledged", Duration::from_secs(120), async || {
        (!acked.lock().unwrap().is_empty()).then_some(())
    })
    .await;
    tokio::time::sleep(after).await;
    server.kill9();
    while clients.join_next().await.is_some() {}
    acked.lock().unwrap().clone()
}

fn url_of(server: &Server) -> String {
    format!("{}/v1/events", server.url)
}

#[tokio::test(flavor = "multi_thread")]
async fn overload_is_refused_with_retry_after_memory_stays_bounded_and_nothing_acknowledged_is_lost() {
    let _alone = harness::exclusive().await;
    let receiver = Receiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let config = regulars_config(dir.path(), &receiver.url, "partitions = 1\ningest_queue = 2");
    let server = Server::start(&config);
    let url = format!("{}/v1/events", server.url);

    let next = Arc::new(AtomicUsize::new(0));
    let outcomes: Arc<std::sync::Mutex<Vec<(usize, u16, bool)>>> = Arc::default();
    let deadline = Instant::now() + Duration::from_secs(8);
    let mut clients = tokio::task::JoinSet::new();
    for _ in 0..24 {
        let (next, outcomes, url) = (next.clone(), outcomes.clone(), url.clone());
        clients.spawn(async move {
            let client = harness::client();
            while Instant::now() < deadline {
                let b = next.fetch_add(1, Ordering::SeqCst);
                let events: Vec<_> = (0..1_000)
                    .map(|i| json!({"event": "view", "visitor_id": format!("b{b}"), "data": {"i": i}}))
                    .collect();
                let r = client.post(&url).json(&json!({"events": events})).send().await.unwrap();
                let retry_after = r.headers().get("retry-after").is_some();
                outcomes.lock().unwrap().push((b, r.status().as_u16(), retry_after));
            }
        });
    }
    let mut peak_kib = 0;
    while !clients.is_empty() {
        peak_kib = peak_kib.max(server.rss_kib());
        tokio::select! {
            _ = clients.join_next() => {}
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
    }
    let outcomes = outcomes.lock().unwrap().clone();
    let accepted: Vec<usize> = outcomes.iter().filter(|o| o.1 == 202).map(|o| o.0).collect();
    let refused: Vec<&(usize, u16, bool)> = outcomes.iter().filter(|o| o.1 == 503).collect();
    eprintln!(
        "overload: {} batches accepted, {} refused, peak RSS {} MiB",
        accepted.len(),
        refused.len(),
        peak_kib / 1024
    );
    assert!(!refused.is_empty(), "a client faster than the server must be told to back off");
    assert!(refused.iter().all(|o| o.2), "every 503 carries Retry-After");
    assert_eq!(accepted.len() + refused.len(), outcomes.len(), "only 202 or 503: {outcomes:?}");
    assert!(peak_kib < 400 * 1024, "resident memory stayed bounded: peak {} MiB", peak_kib / 1024);

    for b in accepted {
        let (status, p) = get_json(&format!("{}/v1/profiles/b{b}", server.url)).await;
        assert_eq!((status, p["event_count"].as_u64()), (200, Some(1_000)), "acknowledged batch b{b}");
    }
    for (b, _, _) in refused.iter().take(20) {
        let (status, _) = get_json(&format!("{}/v1/profiles/b{b}", server.url)).await;
        assert_eq!(status, 404, "a refused batch is not applied");
    }
    server.stop();
}

fn stitching_config(dir: &Path, receiver: &str) -> PathBuf {
    let text = format!(
        r#"
[server]
database = "starling.db"
plugins = "plugins"
partitions = 2

[[attribute]]
name = "email_hash"
scope = "visitor"
type = "visitor_id"

[[enrichment]]
attribute = "email_hash"
op = "set"
event = "email_hash"
when = "event:login"

[[audience]]
name = "both_devices"
rule = {{ attribute = "event_count", op = ">=", value = 4 }}

[[action]]
name = "welcome"
audience = "both_devices"
trigger = "joined"
connector = "webhook"
settings = {{ url = "{receiver}/welcome" }}
params = {{ who = "profile_id" }}
"#
    );
    let path = dir.join("starling.toml");
    std::fs::write(&path, text).unwrap();
    harness::install(harness::connectors(), "webhook", &dir.join("plugins"), |m| m);
    path
}

const PEOPLE_PER_ROUND: usize = 20;

/// Round `r`: 20 new people, each on a web and a phone device on different workers, each device
/// viewing a page and logging in with the person's email hash, so their profiles merge across
/// partitions.
fn merging_round(r: usize) -> serde_json::Value {
    let mut events = Vec::new();
    for i in 0..PEOPLE_PER_ROUND {
        let person = r * PEOPLE_PER_ROUND + i;
        for device in devices(person) {
            events.push(json!({"event": "view", "visitor_id": device, "id": format!("{device}-view")}));
            events.push(json!({"event": "login", "visitor_id": device, "id": format!("{device}-login"),
                "data": {"email_hash": format!("hash-{person}")}}));
        }
    }
    json!({ "events": events })
}

/// Two device ids of one person that belong to different workers (of two).
fn devices(person: usize) -> [String; 2] {
    let web = format!("web-{person}");
    let phone = (0..)
        .map(|n| format!("phone-{person}-{n}"))
        .find(|p| starling_server::pipeline::worker_of(p, 2) != starling_server::pipeline::worker_of(&web, 2))
        .unwrap();
    [web, phone]
}

#[tokio::test(flavor = "multi_thread")]
async fn merges_across_partitions_survive_kill_9_and_fire_once() {
    let _alone = harness::exclusive().await;
    let receiver = Receiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let config = stitching_config(dir.path(), &receiver.url);
    let server = Server::start(&config);
    let url = url_of(&server);
    let rounds = 60;
    let acked = post_rounds_and_kill(server, &url, rounds, merging_round).await;

    let server = Server::start(&config);
    // Acknowledged merges are there after the restart, before anything is sent again.
    for &r in &acked {
        let person = r * PEOPLE_PER_ROUND;
        let [web, phone] = devices(person);
        let (_, a) = get_json(&format!("{}/v1/profiles/{web}", server.url)).await;
        let (_, b) = get_json(&format!("{}/v1/profiles/{phone}", server.url)).await;
        assert_eq!(a["id"], b["id"], "person {person} of acknowledged round {r} is one profile");
        assert_eq!(a["event_count"], 4, "person {person}: both devices' events, once");
    }
    let client = harness::client();
    for r in (0..rounds).filter(|r| !acked.contains(r)) {
        assert_eq!(post(&client, &url_of(&server), &merging_round(r)).await.unwrap(), 202);
    }
    for person in 0..rounds * PEOPLE_PER_ROUND {
        let [web, phone] = devices(person);
        let (_, a) = get_json(&format!("{}/v1/profiles/{web}", server.url)).await;
        let (_, b) = get_json(&format!("{}/v1/profiles/{phone}", server.url)).await;
        assert_eq!(a["id"], b["id"], "person {person}: one profile");
        assert_eq!(a["event_count"], 4, "person {person}: every event exactly once");
    }
    let got = eventually("every person's welcome", Duration::from_secs(120), async || {
        let got = receiver.received();
        let who: HashSet<String> = got.iter().map(|r| r.header("x-starling-profile").to_string()).collect();
        (who.len() == rounds * PEOPLE_PER_ROUND).then_some(got)
    })
    .await;
    let mut keys: HashMap<String, HashSet<String>> = HashMap::new();
    for r in &got {
        keys.entry(r.header("x-starling-profile").to_string())
            .or_default()
            .insert(r.header("idempotency-key").to_string());
    }
    assert!(keys.values().all(|k| k.len() == 1), "a person's repeated deliveries carry one idempotency key");
    server.stop();
}

/// SIGTERM while four clients post: requests that arrive after it are answered 503 with
/// `Retry-After` (nothing applied), those under way are answered, the server exits within 10 s
/// having written everything to SQLite, and the next start replays nothing.
#[tokio::test(flavor = "multi_thread")]
async fn sigterm_under_load_refuses_new_requests_finishes_the_rest_and_exits_within_10_s() {
    let _alone = harness::exclusive().await;
    let receiver = Receiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let config = regulars_config(dir.path(), &receiver.url, "");
    let server = Server::start(&config);
    let url = url_of(&server);
    let next = Arc::new(AtomicUsize::new(0));
    let acked: Arc<std::sync::Mutex<HashSet<usize>>> = Arc::default();
    let refused = Arc::new(AtomicUsize::new(0));
    let mut clients = tokio::task::JoinSet::new();
    for _ in 0..4 {
        let (next, acked, refused, url) = (next.clone(), acked.clone(), refused.clone(), url.clone());
        clients.spawn(async move {
            let client = harness::client();
            let mut r = next.fetch_add(1, Ordering::SeqCst) % ROUNDS;
            loop {
                let Ok(response) = client.post(&url).json(&round(r)).send().await else { return };
                match response.status().as_u16() {
                    202 => {
                        acked.lock().unwrap().insert(r);
                        r = next.fetch_add(1, Ordering::SeqCst) % ROUNDS;
                    }
                    503 => {
                        assert_eq!(response.headers()["retry-after"], "5");
                        refused.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    other => panic!("unexpected {other}"),
                }
            }
        });
    }
    eventually("a third of the rounds acknowledged", Duration::from_secs(120), async || {
        (acked.lock().unwrap().len() >= ROUNDS / 3).then_some(())
    })
    .await;
    let took = server.terminate_within(Duration::from_secs(10));
    while clients.join_next().await.is_some() {}
    let acked = acked.lock().unwrap().clone();
    assert!(refused.load(Ordering::SeqCst) > 0, "requests after SIGTERM are refused with 503");
    eprintln!("exited {took:?} after SIGTERM; {} rounds acknowledged", acked.len());

    let server = Server::start(&config);
    assert_eq!(replayed_records(&server.logs()), 0, "a graceful stop leaves nothing to replay");
    for v in [0, VISITORS - 1] {
        let (_, p) = get_json(&format!("{}/v1/profiles/v{v}", server.url)).await;
        assert!(p["event_count"].as_u64().unwrap() as usize >= acked.len(), "{p}");
    }
    resend_and_check_every_visitor(&server, &receiver, &acked).await;
    server.stop();
}

/// `starling check` on a stopped server's files finds nothing on a healthy one; a damaged
/// SQLite page then stops the start with an error naming the file and the check, and
/// `starling check` lists the damage and fails.
#[tokio::test(flavor = "multi_thread")]
async fn a_damaged_database_stops_the_start_and_starling_check_says_what_it_found() {
    let receiver = Receiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let config = regulars_config(dir.path(), &receiver.url, "");
    let server = Server::start(&config);
    let client = harness::client();
    for r in 0..20 {
        assert_eq!(post(&client, &url_of(&server), &round(r)).await.unwrap(), 202);
    }
    server.stop();
    let check = || {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_starling"))
            .args(["check", "--config", config.to_str().unwrap()])
            .output()
            .unwrap();
        (
            out.status.success(),
            format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)),
        )
    };
    let (ok, report) = check();
    assert!(ok && report.contains("integrity_check ok") && report.contains("no damage found"), "{report}");

    // Scribble over a page in the middle of the file, as a failing disk might.
    let database = dir.path().join("starling.db");
    let mut bytes = std::fs::read(&database).unwrap();
    let page = bytes.len() / 4096 / 2;
    bytes[page * 4096..page * 4096 + 4096].fill(0x55);
    std::fs::write(&database, &bytes).unwrap();

    let mut serve = std::process::Command::new(env!("CARGO_BIN_EXE_starling"))
        .args(["serve", "--config", config.to_str().unwrap(), "--listen", "127.0.0.1:0"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    let status = loop {
        if let Some(status) = serve.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > Duration::from_secs(60) {
            serve.kill().unwrap();
            panic!("the server started on a damaged database");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let out = serve.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!status.success());
    assert!(
        stderr.contains(&format!("database {} is damaged: SQLite's quick_check found", database.display())),
        "{stderr}"
    );
    let (ok, report) = check();
    assert!(!ok, "{report}");
    assert!(report.contains("integrity_check found") && report.contains("damage found"), "{report}");
}

/// `starling backup` copies a serving instance's database while clients post (their requests
/// keep being answered); a copy restored onto a fresh directory starts a server holding every
/// profile, membership and pending action the original holds.
#[tokio::test(flavor = "multi_thread")]
async fn a_backup_taken_under_load_restores_every_profile_membership_and_pending_action() {
    let _alone = harness::exclusive().await;
    let dir = tempfile::tempdir().unwrap();
    // Nothing listens there: the welcomes stay pending, retried.
    let config = regulars_config(dir.path(), "http://127.0.0.1:9", "");
    let server = Server::start(&config);
    let url = url_of(&server);
    let next = Arc::new(AtomicUsize::new(0));
    let answered = Arc::new(AtomicUsize::new(0));
    let mut clients = tokio::task::JoinSet::new();
    for _ in 0..4 {
        let (next, answered, url) = (next.clone(), answered.clone(), url.clone());
        clients.spawn(async move {
            let client = harness::client();
            loop {
                let r = next.fetch_add(1, Ordering::SeqCst);
                if r >= ROUNDS {
                    return;
                }
                assert_eq!(post(&client, &url, &round(r)).await.unwrap(), 202);
                answered.fetch_add(1, Ordering::SeqCst);
            }
        });
    }
    eventually("some rounds in", Duration::from_secs(60), async || {
        (answered.load(Ordering::SeqCst) >= 10).then_some(())
    })
    .await;
    let backup = |file: &Path| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_starling"))
            .args(["backup", file.to_str().unwrap(), "--server", &server.url])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let before = answered.load(Ordering::SeqCst);
    let report = backup(&dir.path().join("during.db"));
    let during = answered.load(Ordering::SeqCst) - before;
    eprintln!("{report}{during} requests answered while the backup was taken");
    assert!(report.contains("reflecting event log position"), "{report}");
    while clients.join_next().await.is_some() {}

    // With the stream done, a copy of the serving instance, restored onto a fresh directory.
    backup(&dir.path().join("after.db"));
    let fresh = tempfile::tempdir().unwrap();
    let restored_config = regulars_config(fresh.path(), "http://127.0.0.1:9", "");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_starling"))
        .args(["restore", dir.path().join("after.db").to_str().unwrap(), "--config", restored_config.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let restored = Server::start(&restored_config);
    assert_eq!(replayed_records(&restored.logs()), 0);
    for v in 0..VISITORS {
        let path = format!("/v1/profiles/v{v}");
        let (_, original) = get_json(&format!("{}{path}", server.url)).await;
        let (_, copy) = get_json(&format!("{}{path}", restored.url)).await;
        assert_eq!(original, copy, "visitor v{v}");
        assert_eq!(original["event_count"], ROUNDS);
    }
    let (_, original) = get_json(&format!("{}/v1/audiences", server.url)).await;
    let (_, copy) = get_json(&format!("{}/v1/audiences", restored.url)).await;
    assert_eq!(original["audiences"][0]["size"], VISITORS);
    assert_eq!(original["audiences"][0]["size"], copy["audiences"][0]["size"]);
    let pending = async |server: &Server| {
        let (_, actions) = get_json(&format!("{}/v1/actions?limit=10000", server.url)).await;
        let mut ids: Vec<(i64, String)> = actions["actions"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|a| a["status"] != "delivered")
            .map(|a| (a["id"].as_i64().unwrap(), a["profile_id"].as_str().unwrap().to_string()))
            .collect();
        ids.sort();
        ids
    };
    let (original, copy) = (pending(&server).await, pending(&restored).await);
    assert_eq!(original.len(), VISITORS, "one pending welcome per visitor");
    assert_eq!(original, copy);
    restored.stop();
    server.stop();
}

/// A tmpfs mounted for a test, unmounted when dropped.
struct Mount(tempfile::TempDir);

impl Mount {
    /// A `size` tmpfs, or `None` (with the reason printed) where mounting is not allowed.
    fn tmpfs(size: &str) -> Option<Mount> {
        let dir = tempfile::tempdir().unwrap();
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .output();
        match out {
            Ok(out) if out.status.success() => Some(Mount(dir)),
            Ok(out) => {
                eprintln!("SKIPPED: mounting a tmpfs is not allowed here: {}", String::from_utf8_lossy(&out.stderr));
                None
            }
            Err(e) => {
                eprintln!("SKIPPED: no mount command: {e}");
                None
            }
        }
    }

    fn path(&self) -> &Path {
        self.0.path()
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("-l").arg(self.0.path()).status();
    }
}

/// The database on a small tmpfs that fills up: ingestion answers 507 naming the cause, reads
/// go on, `/healthz` and `/metrics` say so; once space is freed the server resumes by itself,
/// and nothing acknowledged is lost.
#[tokio::test(flavor = "multi_thread")]
async fn a_full_disk_refuses_events_with_507_and_the_server_resumes_when_space_is_freed() {
    let Some(mount) = Mount::tmpfs("64m") else { return };
    let _alone = harness::exclusive().await;
    let receiver = Receiver::start().await;
    // Everything on the small file system, the server's own log included: a log that cannot be
    // written must not stop the server.
    let config = regulars_config(mount.path(), &receiver.url, "");
    let server = Server::start(&config);
    let url = url_of(&server);
    let client = harness::client();
    assert_eq!(post(&client, &url, &round(0)).await.unwrap(), 202);
    // Leave about 1 MB free.
    let free = || {
        let out = std::process::Command::new("df").args(["--output=avail", "-B1"]).arg(mount.path()).output().unwrap();
        String::from_utf8_lossy(&out.stdout).lines().nth(1).unwrap().trim().parse::<u64>().unwrap()
    };
    let filler = mount.path().join("filler");
    std::fs::write(&filler, vec![0u8; (free() - 1_000_000) as usize]).unwrap();

    let mut acked = HashSet::from([0]);
    let mut refusal = None;
    for r in 1..ROUNDS {
        let response = client.post(&url).json(&round(r)).send().await.unwrap();
        match response.status().as_u16() {
            202 => {
                acked.insert(r);
            }
            507 => {
                assert_eq!(response.headers()["retry-after"], "1");
                refusal = Some(response.json::<serde_json::Value>().await.unwrap());
                break;
            }
            other => panic!("round {r}: {other} {}", response.text().await.unwrap()),
        }
    }
    let refusal = refusal.expect("the disk filled up");
    let message = refusal["error"].as_str().unwrap();
    assert!(
        message.starts_with("the disk is full (") && message.contains("none of these 500 events was stored"),
        "{message}"
    );
    let (status, health) = get_json(&format!("{}/healthz", server.url)).await;
    assert_eq!((status, health["status"].as_str()), (503, Some("disk_full")), "{health}");
    let (_, metrics) = harness::client()
        .get(format!("{}/metrics", server.url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .map(|t| ((), t))
        .unwrap();
    assert!(metrics.contains("starling_disk_full 1"), "{metrics}");
    let (status, profile) = get_json(&format!("{}/v1/profiles/v1", server.url)).await;
    assert_eq!(status, 200, "reads go on: {profile}");
    eprintln!("{} rounds acknowledged before the disk filled; refused with: {message}", acked.len());

    // Space comes back: the server goes on by itself.
    std::fs::remove_file(&filler).unwrap();
    let rest: Vec<usize> = (0..ROUNDS).filter(|r| !acked.contains(r)).collect();
    let last_answer = std::sync::Mutex::new(String::new());
    let accepted = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            let response = client.post(&url).json(&round(rest[0])).send().await.unwrap();
            if response.status() == 202 {
                return;
            }
            *last_answer.lock().unwrap() = format!("{} {}", response.status(), response.text().await.unwrap());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    if accepted.is_err() {
        eprintln!("the last answer: {}", last_answer.lock().unwrap());
        let logs = server.logs();
        let tail: Vec<&str> = logs.lines().rev().filter(|l| !l.contains("kept to try again")).take(15).collect();
        panic!("ingestion not accepted again; server log ends:\n{}", tail.join("\n"));
    }
    for r in &rest {
        let response = client.post(&url).json(&round(*r)).send().await.unwrap();
        let status = response.status().as_u16();
        assert_eq!(status, 202, "round {r}: {}", response.text().await.unwrap());
    }
    let (status, health) = get_json(&format!("{}/healthz", server.url)).await;
    assert_eq!((status, health["status"].as_str()), (200, Some("ok")), "{health}");
    for v in [0, VISITORS / 2, VISITORS - 1] {
        let (_, p) = get_json(&format!("{}/v1/profiles/v{v}", server.url)).await;
        assert_eq!(p["event_count"].as_u64(), Some(ROUNDS as u64), "visitor v{v}: every event once");
    }
    server.stop();
    // Restarted, everything acknowledged is still there.
    let server = Server::start(&config);
    let (_, p) = get_json(&format!("{}/v1/profiles/v7", server.url)).await;
    assert_eq!(p["event_count"].as_u64(), Some(ROUNDS as u64));
    server.stop();
}

//! `starling loadgen`: posts a realistic event stream to a running server over keep-alive
//! connections, reports throughput and latency percentiles, and checks afterwards that every
//! person's profile adds up.
//!
//! The stream: people browse (page views with a category and a user agent), add to cart, buy,
//! and some use two devices and log in on both with the same email hash, so their profiles
//! stitch. It is generated up front from a seed, so runs are repeatable and the expected totals
//! per person are known.

use anyhow::{Context, Result, bail};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde_json::json;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::Mutex;

#[derive(clap::Args)]
pub(crate) struct Options {
    /// The server.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    server: String,
    /// Distinct people.
    #[arg(long, default_value_t = 10_000)]
    people: usize,
    /// Events to send in total.
    #[arg(long, default_value_t = 200_000)]
    events: usize,
    /// Events per request.
    #[arg(long, default_value_t = 500)]
    batch: usize,
    /// Requests in flight at once, one keep-alive connection each.
    #[arg(long, default_value_t = 8)]
    connections: usize,
    /// Share of people with two devices who log in on both (their profiles stitch).
    #[arg(long, default_value_t = 0.2)]
    two_devices: f64,
    /// At most this many events per second; 0: as fast as the server takes them.
    #[arg(long, default_value_t = 0)]
    rate: u64,
    /// Have the server only parse and validate the requests (`?dry_run=true`), to measure the
    /// ceiling that parsing and HTTP put on ingestion.
    #[arg(long)]
    parse_only: bool,
    /// Afterwards, check every person's profile: events, purchases and spend must add up.
    #[arg(long)]
    verify: bool,
    /// Send nothing: only check the profiles a run with the same options sent (against another
    /// node, after a restart). On a spread cluster, reads after where the stream ends now.
    #[arg(long, conflicts_with = "verify")]
    verify_only: bool,
    /// Mark one event in N as traced (`data.trace = true`, `data.sent_us` = send time); with
    /// `--receiver`, measure how long until a connector's request for it arrives.
    #[arg(long, default_value_t = 0)]
    trace_every: usize,
    /// Listen here for the connector requests of traced events (they must carry `sent_us`).
    #[arg(long)]
    receiver: Option<String>,
    /// Seed of the generated stream.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Prefix of every id, so runs against one database do not mix.
    #[arg(long, default_value = "lg")]
    prefix: String,
    /// Give every event an id and send a request again when its connection fails (for up to
    /// 60 s): a server dying under the load does not end the run, and what is sent again is
    /// applied once.
    #[arg(long)]
    resend: bool,
}

/// How long a request refused for now (503, 429) is sent again, and with `--resend`, one whose
/// connection failed.
const RESEND_FOR: Duration = Duration::from_secs(60);

const CATEGORIES: &[&str] = &["shoes", "hats", "bags", "shirts", "coats", "socks", "belts", "watches"];
const USER_AGENTS: &[&str] = &[
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_4 like Mac OS X) Version/17.4 Mobile/15E148 Safari/604.1",
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/124.0 Safari/537.36",
    "Mozilla/5.0 (X11; Linux x86_64; rv:125.0) Gecko/20100101 Firefox/125.0",
];

/// One generated event, before it becomes JSON.
#[derive(Clone)]
enum Kind {
    Login { email_hash: String },
    PageView { category: &'static str, user_agent: &'static str },
    AddToCart { price: u32 },
    Purchase { total: u32 },
}

#[derive(Clone)]
struct Planned {
    /// The event's id: its place in the stream.
    id: String,
    device: String,
    kind: Kind,
    traced: bool,
}

/// What a person's profile must show once every event is applied.
#[derive(Default, Clone)]
struct Expected {
    events: u64,
    purchases: u64,
    spend: u64,
    devices: Vec<String>,
}

fn plan(o: &Options) -> (Vec<Planned>, Vec<Expected>) {
    let mut rng = SmallRng::seed_from_u64(o.seed);
    let mut people: Vec<Expected> = (0..o.people)
        .map(|p| {
            let mut devices = vec![format!("{}-{p}-a", o.prefix)];
            if rng.random_bool(o.two_devices) {
                devices.push(format!("{}-{p}-b", o.prefix));
            }
            Expected { devices, ..Expected::default() }
        })
        .collect();
    let mut started = vec![[false; 2]; o.people];
    let mut events = Vec::with_capacity(o.events);
    while events.len() < o.events {
        let p = rng.random_range(0..o.people);
        let d = rng.random_range(0..people[p].devices.len());
        let device = people[p].devices[d].clone();
        // Someone with two devices logs in first on each, so both profiles stitch.
        let kind = if people[p].devices.len() == 2 && !started[p][d] {
            // The prefix is part of the hash too: runs with other prefixes never stitch with these.
            Kind::Login { email_hash: format!("{}-{:032x}", o.prefix, (o.seed as u128) << 64 | p as u128) }
        } else {
            match rng.random_range(0..100) {
                0..70 => Kind::PageView {
                    category: CATEGORIES[rng.random_range(0..CATEGORIES.len())],
                    user_agent: USER_AGENTS[rng.random_range(0..USER_AGENTS.len())],
                },
                70..88 => Kind::AddToCart { price: rng.random_range(5..300) },
                _ => Kind::Purchase { total: rng.random_range(5..500) },
            }
        };
        started[p][d] = true;
        let person = &mut people[p];
        person.events += 1;
        if let Kind::Purchase { total } = kind {
            person.purchases += 1;
            person.spend += u64::from(total);
        }
        let traced = o.trace_every > 0 && events.len() % o.trace_every == 0;
        let id = format!("{}-e{}", o.prefix, events.len());
        events.push(Planned { id, device, kind, traced });
    }
    (events, people)
}

fn to_json(e: &Planned, with_id: bool) -> serde_json::Value {
    let mut data = match &e.kind {
        Kind::Login { email_hash } => json!({ "email_hash": email_hash }),
        Kind::PageView { category, user_agent } => json!({ "category": category, "user_agent": user_agent }),
        Kind::AddToCart { price } => json!({ "price": price }),
        Kind::Purchase { total } => json!({ "order_total": total }),
    };
    if e.traced {
        data["trace"] = json!(true);
        data["sent_us"] = json!(now_us());
    }
    let name = match e.kind {
        Kind::Login { .. } => "login",
        Kind::PageView { .. } => "page_view",
        Kind::AddToCart { .. } => "add_to_cart",
        Kind::Purchase { .. } => "purchase",
    };
    let mut event = json!({ "event": name, "visitor_id": e.device, "data": data });
    if with_id {
        event["id"] = json!(e.id);
    }
    event
}

fn now_us() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64)
}

#[derive(Default)]
struct Tally {
    latencies: Vec<Duration>,
    accepted: u64,
    duplicates: u64,
    refused: u64,
    resent: u64,
    /// The latest stream position a node of a spread cluster answered.
    position: Option<u64>,
}

pub(crate) fn run(o: Options) -> Result<()> {
    if o.people == 0 || o.events == 0 || o.batch == 0 || o.connections == 0 {
        bail!("--people, --events, --batch and --connections must be positive");
    }
    let started = Instant::now();
    let (events, people) = plan(&o);
    println!(
        "planned {} events for {} people ({} with two devices) in {:.1} s",
        events.len(),
        people.len(),
        people.iter().filter(|p| p.devices.len() == 2).count(),
        started.elapsed().as_secs_f64()
    );
    let runtime = tokio::runtime::Runtime::new()?;
    if o.verify_only {
        return runtime.block_on(async {
            let position = stream_position(&o.server).await?;
            verify(&o, &people, position).await
        });
    }
    runtime.block_on(drive(o, events, people))
}

async fn drive(o: Options, events: Vec<Planned>, people: Vec<Expected>) -> Result<()> {
    let traces = Arc::new(Mutex::new(Vec::<Duration>::new()));
    if let Some(addr) = &o.receiver {
        let listener =
            tokio::net::TcpListener::bind(addr).await.with_context(|| format!("--receiver: listening on {addr}"))?;
        let traces = traces.clone();
        let app = axum::Router::new().fallback(move |body: axum::body::Bytes| {
            let traces = traces.clone();
            async move {
                let arrived = now_us();
                if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&body) {
                    // One action, or a batch of them.
                    let items = v.as_array().cloned().unwrap_or_else(|| vec![v]);
                    let mut t = traces.lock().await;
                    for item in items {
                        if let Some(sent) = item["sent_us"].as_f64() {
                            t.push(Duration::from_micros(arrived.saturating_sub(sent as u64)));
                        }
                    }
                }
                axum::http::StatusCode::OK
            }
        });
        tokio::spawn(async move { axum::serve(listener, app).await });
    }

    let url =
        format!("{}/v1/events{}", o.server.trim_end_matches('/'), if o.parse_only { "?dry_run=true" } else { "" });
    let batches: Arc<Vec<Vec<Planned>>> = Arc::new(events.chunks(o.batch).map(<[Planned]>::to_vec).collect());
    let next = Arc::new(AtomicUsize::new(0));
    let scheduled = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..o.connections {
        let (batches, next, scheduled, url) = (batches.clone(), next.clone(), scheduled.clone(), url.clone());
        let (rate, resend) = (o.rate, o.resend);
        let client = reqwest::Client::builder().pool_max_idle_per_host(1).build()?;
        tasks.push(tokio::spawn(async move {
            let mut tally = Tally::default();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(batch) = batches.get(i) else { break };
                if rate > 0 {
                    let slot = scheduled.fetch_add(batch.len() as u64, Ordering::Relaxed);
                    tokio::time::sleep_until((start + Duration::from_secs_f64(slot as f64 / rate as f64)).into()).await;
                }
                let body =
                    json!({ "events": batch.iter().map(|e| to_json(e, resend)).collect::<Vec<_>>() }).to_string();
                let first_sent = Instant::now();
                loop {
                    let sent = Instant::now();
                    let response = match client
                        .post(&url)
                        .header("content-type", "application/json")
                        .body(body.clone())
                        .send()
                        .await
                    {
                        Ok(response) => response,
                        Err(e) if resend && first_sent.elapsed() < RESEND_FOR => {
                            tally.resent += 1;
                            tracing::debug!("sending again after: {e}");
                            tokio::time::sleep(Duration::from_millis(200)).await;
                            continue;
                        }
                        Err(e) => return Err(anyhow::Error::new(e).context("posting events")),
                    };
                    let status = response.status();
                    let retry_after = response.headers().get("retry-after").and_then(|v| v.to_str().ok()?.parse().ok());
                    let answer: serde_json::Value = response.json().await.unwrap_or_default();
                    if (status.as_u16() == 503 || status.as_u16() == 429) && first_sent.elapsed() < RESEND_FOR {
                        tally.refused += 1;
                        tokio::time::sleep(Duration::from_secs(retry_after.unwrap_or(1))).await;
                        continue;
                    }
                    if !status.is_success() {
                        bail!("the server answered {status}: {answer}");
                    }
                    tally.latencies.push(sent.elapsed());
                    tally.accepted += answer["accepted"].as_u64().or(answer["valid"].as_u64()).unwrap_or(0);
                    tally.duplicates += answer["duplicates"].as_u64().unwrap_or(0);
                    tally.position = tally.position.max(answer["position"].as_u64());
                    break;
                }
            }
            anyhow::Ok(tally)
        }));
    }
    let mut total = Tally::default();
    for task in tasks {
        let t = task.await??;
        total.latencies.extend(t.latencies);
        total.accepted += t.accepted;
        total.duplicates += t.duplicates;
        total.refused += t.refused;
        total.resent += t.resent;
        total.position = total.position.max(t.position);
    }
    let elapsed = start.elapsed();
    let sent = events.len() as f64;
    println!(
        "{} {} events in {:.2} s: {:.0} events/s ({} requests of {} over {} connections; {} refused with 503 and retried, {} sent again after a lost connection)",
        if o.parse_only { "parsed" } else { "applied" },
        total.accepted,
        elapsed.as_secs_f64(),
        sent / elapsed.as_secs_f64(),
        total.latencies.len(),
        o.batch,
        o.connections,
        total.refused,
        total.resent
    );
    println!("request latency (until the answer): {}", percentiles(&mut total.latencies));
    if total.accepted + total.duplicates != events.len() as u64 {
        bail!("sent {} events, the server accounted for {}", events.len(), total.accepted + total.duplicates);
    }
    if o.receiver.is_some() {
        let traced = events.iter().filter(|e| e.traced).count();
        let deadline = Instant::now() + Duration::from_secs(30);
        while traces.lock().await.len() < traced && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let mut t = traces.lock().await.clone();
        println!("event -> connector request ({} of {traced} traced events arrived): {}", t.len(), percentiles(&mut t));
    }
    if o.verify && !o.parse_only {
        verify(&o, &people, total.position).await?;
    }
    Ok(())
}

fn percentiles(samples: &mut [Duration]) -> String {
    if samples.is_empty() {
        return "no samples".into();
    }
    samples.sort_unstable();
    let at = |q: f64| samples[((samples.len() as f64 * q) as usize).min(samples.len() - 1)];
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    format!(
        "p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        ms(at(0.5)),
        ms(at(0.9)),
        ms(at(0.99)),
        ms(samples[samples.len() - 1])
    )
}

/// Where a spread cluster's stream ends now (`GET /v1/cluster`): every event answered before is
/// in the stream through it, so `--verify-only` reads after it as `--verify` reads after the
/// latest position its run was answered. `None` for a single node or a cluster placed whole,
/// whose one engine applies every event it answered.
async fn stream_position(server: &str) -> Result<Option<u64>> {
    let url = format!("{}/v1/cluster", server.trim_end_matches('/'));
    let response = read_retrying(&reqwest::Client::new(), &url).await.with_context(|| format!("reading {url}"))?;
    if response.status() == 404 {
        return Ok(None);
    }
    let status = response.status();
    let cluster: serde_json::Value = response.json().await.with_context(|| format!("reading {url}"))?;
    if !status.is_success() {
        bail!("{url} answered {status}: {cluster}");
    }
    if cluster["placement"] != "spread" {
        return Ok(None);
    }
    // Null while the node cannot reach the stream: a position is needed, so say so.
    let Some(position) = cluster["stream"]["last_position"].as_u64() else {
        bail!("{url}: the node cannot reach the stream to say where it ends ({})", cluster["stream"]);
    };
    println!("verifying after stream position {position}, where the stream ends now");
    Ok(Some(position))
}

/// Reads `url`, sending the read again while it is refused for now (503, 429: a partition
/// moving between nodes), as long as a refused event is sent again.
async fn read_retrying(client: &reqwest::Client, url: &str) -> Result<reqwest::Response> {
    let first_sent = Instant::now();
    loop {
        let response = client.get(url).send().await?;
        let status = response.status().as_u16();
        if (status == 503 || status == 429) && first_sent.elapsed() < RESEND_FOR {
            let retry_after = response.headers().get("retry-after").and_then(|v| v.to_str().ok()?.parse().ok());
            tokio::time::sleep(Duration::from_secs(retry_after.unwrap_or(1))).await;
            continue;
        }
        return Ok(response);
    }
}

/// For how long, from the start of the verification, a person whose profile does not add up is
/// read again before it is reported: on a spread cluster, the merge of two devices that
/// claimed one id at once on two nodes is decided once one node follows the other's claim,
/// after both were answered.
const SETTLE_WITHIN: Duration = Duration::from_secs(10);

/// What does not add up in `person`'s profile, read through each of their devices.
async fn check(client: &reqwest::Client, base: &str, after: &str, person: &Expected) -> Result<Vec<String>> {
    let mut problems = Vec::new();
    let mut ids = Vec::new();
    for device in &person.devices {
        let response = read_retrying(client, &format!("{base}/v1/profiles/{device}{after}")).await?;
        if response.status() == 404 {
            continue; // a device that sent nothing
        }
        let profile: serde_json::Value = response.json().await?;
        ids.push(profile["id"].clone());
        let got = (
            profile["event_count"].as_u64().unwrap_or(0),
            profile["attributes"]["purchase_count"].as_f64().unwrap_or(0.0) as u64,
            profile["attributes"]["lifetime_spend"].as_f64().unwrap_or(0.0) as u64,
        );
        let expected = (person.events, person.purchases, person.spend);
        if got != expected {
            problems.push(format!("{device}: events, purchases, spend = {got:?}, expected {expected:?}"));
        }
    }
    if ids.windows(2).any(|w| w[0] != w[1]) {
        problems.push(format!("{:?} are not one profile: {ids:?}", person.devices));
    }
    Ok(problems)
}

/// Reads every person's profile (through each of their devices) and compares it with what was
/// sent: one profile per person, event count, purchase count and spend. Reads after
/// `position` (through which every answered event is in the stream, on a spread cluster), so
/// that whichever node a read goes through has applied them all.
async fn verify(o: &Options, people: &[Expected], position: Option<u64>) -> Result<()> {
    let client = reqwest::Client::new();
    let after = position.map(|p| format!("?after={p}")).unwrap_or_default();
    let base = o.server.trim_end_matches('/').to_string();
    let checked = Arc::new(AtomicUsize::new(0));
    let settled_late = Arc::new(AtomicUsize::new(0));
    let problems = Arc::new(Mutex::new(Vec::new()));
    let people: Arc<Vec<Expected>> = Arc::new(people.iter().filter(|p| p.events > 0).cloned().collect());
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    let verifying = Instant::now();
    for _ in 0..o.connections {
        let (client, base, people, next, checked, settled_late, problems, after) = (
            client.clone(),
            base.clone(),
            people.clone(),
            next.clone(),
            checked.clone(),
            settled_late.clone(),
            problems.clone(),
            after.clone(),
        );
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(person) = people.get(i) else { break };
                let mut found = check(&client, &base, &after, person).await?;
                let first_found = !found.is_empty();
                while !found.is_empty() && verifying.elapsed() < SETTLE_WITHIN {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    found = check(&client, &base, &after, person).await?;
                }
                if first_found && found.is_empty() {
                    settled_late.fetch_add(1, Ordering::Relaxed);
                }
                problems.lock().await.extend(found);
                checked.fetch_add(1, Ordering::Relaxed);
            }
            anyhow::Ok(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    let problems = problems.lock().await;
    println!(
        "verified {} people: {} mismatches ({} added up only when read again)",
        checked.load(Ordering::Relaxed),
        problems.len(),
        settled_late.load(Ordering::Relaxed)
    );
    for p in problems.iter().take(10) {
        println!("  {p}");
    }
    if !problems.is_empty() {
        bail!("{} profiles do not add up", problems.len());
    }
    Ok(())
}

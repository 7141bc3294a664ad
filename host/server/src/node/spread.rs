//! A node of a cluster whose partitions are spread over the live nodes (`placement = "spread"`).
//!
//! Each node holds and applies live the partitions whose leases it holds, appending their
//! records to the stream; of the other partitions it follows only what their records changed of
//! the ids (see [`crate::owned`]), so that its own work finds which profile every id belongs to.
//! Events for a profile of a partition another node owns are handed to that node, which applies
//! them once it has followed the records before them (while no node owns the partition, they
//! wait in the intake for the next owner); reads of such a profile are forwarded to it, and
//! reads over every profile gathered from every node. A merge into another node's profile goes
//! through the stream as a hand record carrying the absorbed profile's state, which the
//! survivor's owner applies; of two claims of one id the one earlier in the log wins, on every
//! node. Each node stores a snapshot of its database; a node taking a partition (one joined,
//! one died) restores it from the snapshot holding it furthest and applies its records after
//! that, and drops a partition it gives up. Each node delivers the actions its partitions'
//! records decide and publishes how they ended.

use super::{
    CLIENT_HEADER, FORWARDED_HEADER, Joined, NODE_HEADER, OUTCOME_WAIT, OUTCOMES_WAITING, forward_to, join_when_ready,
    pass_on_outcomes, prepare, publish_config, publish_outcomes, settings_of, unavailable,
};

mod gather;
mod snapshots;
use crate::api::ApiError;
use crate::copy::ANSWERED_FROM_HEADER;
use crate::delivery::Outcomes;
use crate::owned::{Elsewhere, HandedReport, Owned, PartitionedEvents, Taker, Via};
use crate::pipeline::{IngestError, Source};
use crate::{App, Options, ServerError, Spread, http};
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderName, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use bytes::Bytes;
use futures_util::future::BoxFuture;
use starling_cluster::intake::Intake;
use starling_cluster::log::JetStreamLog;
use starling_cluster::outcomes::OutcomeStream;
use starling_cluster::stream::EventStream;
use starling_cluster::{Ownership, Peer, Placement};
use starling_core::Event;
use starling_log::{Partition, Position};
use starling_store::outcomes::{Outcome, Taken};
use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;

type Client = hyper_util::client::legacy::Client<hyper_util::client::legacy::connect::HttpConnector, axum::body::Body>;

/// What the ownership rounds last saw of the cluster.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Placed {
    /// The partitions whose leases this node holds now.
    held: Vec<Partition>,
    /// Each partition's owner, as the leases say (none while a lease has lapsed).
    owners: BTreeMap<Partition, String>,
    /// Live nodes, as their heartbeats describe them.
    nodes: BTreeMap<String, Peer>,
    shared_config: Option<i64>,
    stream_leader: Option<String>,
}

impl Placed {
    /// The URL of the node owning `partition`, unless it is this node or none does.
    fn owner_url(&self, me: &str, partition: Partition) -> Option<(String, String)> {
        let node = self.owners.get(&partition).filter(|n| *n != me)?;
        Some((node.clone(), self.nodes.get(node)?.url.clone()?))
    }

    /// Whether `address` is that of a live node's URL (nodes are recognised by the IP address
    /// in their URLs).
    fn is_node(&self, address: IpAddr) -> bool {
        let url_address = |url: &str| url.parse::<axum::http::Uri>().ok()?.host()?.parse::<IpAddr>().ok();
        self.nodes.values().any(|p| p.url.as_deref().and_then(url_address) == Some(address))
    }
}

/// Hands events to the node owning their profiles' partition (see [`Elsewhere`]).
struct Handing {
    node: String,
    placed: watch::Receiver<Placed>,
    client: Client,
    intake: Arc<Intake>,
}

/// The body of `POST /v1/cluster/handed`.
#[derive(serde::Serialize, serde::Deserialize)]
struct Handed {
    after: Position,
    events: Vec<Event>,
    /// Taken from the intake by the node handing them: the receiving node refuses those of
    /// profiles it does not own, rather than putting them back into the intake (where they
    /// would be kept out as the messages being applied, then forgotten with them) or handing
    /// them on (two nodes whose directories differ would hand them back and forth).
    #[serde(default)]
    from_intake: bool,
    /// Redirected by a take (see [`Via::Redirected`]): checked against their profiles' histories.
    #[serde(default)]
    redirected: bool,
}

impl Elsewhere for Handing {
    fn hand(
        &self,
        events: PartitionedEvents,
        after: Position,
        via: Via,
    ) -> BoxFuture<'static, Result<HandedReport, String>> {
        // One request per owner; events of a partition no other node owns now (a failover, a
        // rebalance under way, or this node taking it), and events another node handed here,
        // wait in the intake for the partition's next owner.
        let mut by_owner: BTreeMap<Option<(String, String)>, PartitionedEvents> = BTreeMap::new();
        {
            let placed = self.placed.borrow();
            for (partition, event) in events {
                let owner = placed.owner_url(&self.node, partition).filter(|_| via != Via::Intake);
                by_owner.entry(owner).or_default().push((partition, event));
            }
        }
        let (node, client, intake) = (self.node.clone(), self.client.clone(), self.intake.clone());
        Box::pin(async move {
            let mut report = HandedReport::default();
            for (owner, events) in by_owner {
                let taken = match owner {
                    Some((owner, url)) => {
                        let events_only = events.iter().map(|(_, e)| e.clone()).collect();
                        let handed = Handed {
                            after,
                            events: events_only,
                            from_intake: via == Via::Owner,
                            redirected: via == Via::Redirected,
                        };
                        match send_handed(&node, &client, &url, &handed).await {
                            Ok(taken) => taken,
                            Err(Unsent::Unreachable(e)) if matches!(via, Via::Owner | Via::Redirected) => {
                                return Err(format!("node `{owner}` cannot be reached: {e}"));
                            }
                            Err(Unsent::Unreachable(e)) => {
                                tracing::debug!(%owner, "the owner cannot be reached ({e}); the events wait in the intake");
                                into_intake(&node, &intake, events).await?
                            }
                            Err(Unsent::Refused(e)) => {
                                return Err(format!("node `{owner}` did not take the events: {e}"));
                            }
                        }
                    }
                    None if via == Via::Owner => {
                        return Err("no node owns the events' partition now; the intake keeps them".into());
                    }
                    None if via == Via::Redirected => {
                        return Err("no node owns the events' partition now; they are sent again".into());
                    }
                    None => into_intake(&node, &intake, events).await?,
                };
                report.accepted += taken.accepted;
                report.duplicates += taken.duplicates;
                report.position = report.position.max(taken.position);
            }
            Ok(report)
        })
    }
}

enum Unsent {
    /// Not sent: the owner can be tried elsewhere.
    Unreachable(String),
    /// Sent, and refused or not answered: the client sends the events again.
    Refused(String),
}

/// How long a node waits for another to take events it handed: that node may first wait for
/// its copy to follow the log (see [`crate::owned::Taker::take`]), then applies them.
const HAND_TIMEOUT: Duration = Duration::from_secs(30);

/// On a request forwarded to a profile's owner: the stream position to have followed before
/// answering (see [`answer`]).
const READ_AFTER_HEADER: &str = "x-starling-read-after";

/// The `after` query parameter of a request for a profile: a stream position, as an ingestion
/// answered it.
fn read_after(uri: &axum::http::Uri) -> Result<Option<Position>, ApiError> {
    #[derive(serde::Deserialize)]
    struct Query {
        after: Option<Position>,
    }
    axum::extract::Query::<Query>::try_from_uri(uri).map(|query| query.0.after).map_err(|e| {
        let why = e.body_text();
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("query parameter `after`: expected a stream position (an ingestion's `position`): {why}"),
        )
    })
}

async fn send_handed(node: &str, client: &Client, url: &str, handed: &Handed) -> Result<HandedReport, Unsent> {
    tokio::time::timeout(HAND_TIMEOUT, send_handed_once(node, client, url, handed))
        .await
        .unwrap_or_else(|_| Err(Unsent::Refused(format!("no answer within {} s", HAND_TIMEOUT.as_secs()))))
}

async fn send_handed_once(node: &str, client: &Client, url: &str, handed: &Handed) -> Result<HandedReport, Unsent> {
    let body = serde_json::to_vec(handed).expect("events serialize");
    let request = axum::http::Request::post(format!("{url}/v1/cluster/handed"))
        .header(axum::http::header::CONTENT_TYPE, "application/json")
        .header(FORWARDED_HEADER, node)
        .body(axum::body::Body::from(body))
        .map_err(|e| Unsent::Refused(e.to_string()))?;
    let response = client.request(request).await.map_err(|e| match e.is_connect() {
        true => Unsent::Unreachable(e.to_string()),
        false => Unsent::Refused(e.to_string()),
    })?;
    let status = response.status();
    let body = axum::body::to_bytes(axum::body::Body::new(response.into_body()), 64 * 1024)
        .await
        .map_err(|e| Unsent::Refused(e.to_string()))?;
    let answer: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    if !status.is_success() {
        return Err(Unsent::Refused(format!("{status}: {}", answer["error"].as_str().unwrap_or_default())));
    }
    let count = |key: &str| answer[key].as_u64().unwrap_or_default() as usize;
    Ok(HandedReport {
        accepted: count("accepted"),
        duplicates: count("duplicates"),
        position: answer["position"].as_u64(),
    })
}

async fn into_intake(node: &str, intake: &Intake, events: PartitionedEvents) -> Result<HandedReport, String> {
    let mut report = HandedReport::default();
    for (partition, mut event) in events {
        let id = crate::intake::intake_id(node, &mut event);
        let payload = Bytes::from(serde_json::to_vec(&event).expect("an event serializes"));
        match intake.publish(partition, &id, payload).await {
            Ok(true) => report.duplicates += 1,
            Ok(false) => report.accepted += 1,
            Err(e) => return Err(format!("the intake did not take the events: {e}")),
        }
    }
    Ok(report)
}

struct Front {
    node: String,
    engine: axum::Router,
    ingest: Arc<crate::pipeline::Ingest>,
    owned: Arc<Owned>,
    taker: Taker,
    placed: watch::Receiver<Placed>,
    client: Client,
    intake: Arc<Intake>,
    stream: Arc<EventStream>,
    ownership: Arc<Ownership>,
}

/// Serves `listener` as a node of a spread cluster until `shutdown` resolves.
pub(super) async fn serve(
    options: Options,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    let settings = options.model.cluster.clone().expect("a cluster node has [cluster] settings");
    let addr = listener.local_addr()?;
    let node_settings = settings_of(&settings, addr, Placement::Spread);
    let (url, lease) = (node_settings.url.clone().unwrap_or_default(), node_settings.lease);
    let mut shutdown = std::pin::pin!(shutdown);
    let Some(Joined { cluster, stream, snapshots, outcomes: outcome_stream, intake }) =
        join_when_ready(&settings.nats, &node_settings, &mut shutdown).await
    else {
        return Ok(());
    };
    let ownership = Arc::new(Ownership::new(cluster));
    let log = Arc::new(JetStreamLog::new(stream.clone(), ownership.clone(), tokio::runtime::Handle::current()));
    log.guard_truncation();
    tracing::info!(node = %settings.node, %url, "joined the cluster; its partitions are spread over the nodes");

    let (placed_tx, placed) = watch::channel(Placed::default());
    let rounds = tokio::spawn(run_rounds(ownership.clone(), stream.clone(), lease, placed_tx));
    let client: Client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http();
    let mut options = prepare(options, ownership.cluster(), &snapshots, Placement::Spread).await?;
    let owned = Arc::new(Owned::none());
    let handing =
        Handing { node: settings.node.clone(), placed: placed.clone(), client: client.clone(), intake: intake.clone() };
    let reported = Outcomes::default();
    options.event_log = Some(log.clone());
    options.outcomes = Some(reported.clone());
    options.spread = Some(Spread { owned: owned.clone(), elsewhere: Arc::new(handing) });
    let database = options.database.clone();
    let drain = http::Drain::default();
    let mut engine = App::start(options).await?;
    engine.listening_on(addr)?;
    engine.state.drain = drain.clone();
    let taker = engine.taker().expect("a spread node's engine takes handed events");
    let front = Arc::new(Front {
        node: settings.node.clone(),
        engine: engine.router(),
        ingest: engine.state.ingest.clone(),
        owned: owned.clone(),
        taker: taker.clone(),
        placed: placed.clone(),
        client,
        intake: intake.clone(),
        stream: stream.clone(),
        ownership: ownership.clone(),
    });
    let router = axum::Router::new()
        .route("/v1/cluster", get(status))
        .route("/v1/cluster/handed", post(take_handed))
        .fallback(answer)
        .layer(axum::extract::DefaultBodyLimit::max(crate::api::MAX_BODY_BYTES))
        .with_state(front.clone());
    let limits = http::Limits {
        max_connections: engine.state.config.model().server.max_connections.max(1),
        header_timeout: Duration::from_millis(engine.state.config.model().header_timeout_ms as u64),
    };
    let (stop_tx, mut stopping) = watch::channel(false);
    let serving = tokio::spawn(http::serve(listener, router, limits, drain.clone(), async move {
        let _ = stopping.wait_for(|s| *s).await;
    }));
    let passing_on = tokio::spawn(pass_on_outcomes(reported.clone(), outcome_stream.clone()));
    let lapsing = tokio::spawn(give_up_lapsed(ownership.clone(), owned.clone(), lease));
    let taking_outcomes = tokio::spawn(take_outcomes(database.clone(), outcome_stream.clone(), owned.clone()));
    let snapshot_every = Duration::from_millis(settings.snapshot_every_ms as u64);
    let snapshotting = tokio::spawn(snapshots::take_node_snapshots(snapshots::NodeSnapshots {
        node: settings.node.clone(),
        database: database.clone(),
        snapshots: snapshots.clone(),
        stream: stream.clone(),
        ownership: ownership.clone(),
        owned: owned.clone(),
        every: snapshot_every,
        wait_for_absent: Duration::from_millis(settings.wait_for_absent_ms as u64),
    }));

    let mut placed_rx = placed;
    let mut published = None;
    // The partitions applied live as of the last turn: one given up since is dropped here.
    let mut applied_live = 0u64;
    let mut applying: Option<tokio::task::JoinHandle<()>> = None;
    // What is kept for other partitions and was not applied or handed on at a take: sent
    // again at the next rounds until it is.
    let mut kept = Kept::default();
    let outcome = loop {
        if log.forgotten() {
            tracing::error!(node = %settings.node, "the stream forgot records this node had not applied; stopping");
            break Err(ServerError::Forgotten);
        }
        // What the stream must keep for this node (see `take_snapshots`).
        ownership.cluster().set_stored(&front.ingest.durable_positions());
        let held = placed_rx.borrow_and_update().held.clone();
        // A partition released (given to a node that joined), taken by another node, or whose
        // lease this node could not renew in time, is no longer applied live here: events for
        // it go to its owner from now on.
        let overtaken = log.overtaken_partitions();
        for partition in owned.partitions() {
            if !held.contains(&partition) || overtaken.contains(&partition) {
                owned.remove(partition);
                tracing::info!(partition, "partition given up");
            }
        }
        // A partition given up (here, or as its lease lapsed) is not kept: its profiles are
        // its owner's, and this node follows only its ids; taken again, it is restored.
        let given_up = applied_live & !owned.bits();
        drop_partitions(&front.ingest, (0..starling_log::PARTITIONS).filter(|p| given_up & (1 << p) != 0)).await;
        applied_live = owned.bits();
        let gaining: Vec<Partition> = held.iter().copied().filter(|p| !owned.owns(*p)).collect();
        if !gaining.is_empty() {
            let started = Instant::now();
            owned.start_taking(&gaining);
            match gain(&log, &taker, &settings.node, &gaining, &snapshots, ownership.cluster(), &database).await {
                Ok(applied) => {
                    // One whose lease lapsed meanwhile is taken again once it is held again.
                    let still = owned.taking();
                    for &partition in gaining.iter().filter(|p| still.contains(p)) {
                        owned.add(partition);
                    }
                    applied_live = owned.bits();
                    kept.to_apply = true;
                    kept.to_hand.extend(gaining.iter().copied());
                    tracing::info!(
                        partitions = ?gaining,
                        records = applied,
                        elapsed_ms = started.elapsed().as_millis() as u64,
                        "partitions taken: this node applies and logs them"
                    );
                }
                Err(e) => {
                    owned.stop_taking(&gaining);
                    tracing::warn!(partitions = ?gaining, "taking partitions: {e}")
                }
            }
            // One not taken after all (its lease lapsed during the take, or the take failed) is
            // dropped as one given up is: what the take restored and applied of it (profiles,
            // actions to deliver) is its owner's.
            drop_partitions(&front.ingest, gaining.iter().copied().filter(|p| !owned.owns(*p))).await;
        }
        kept.send(&front.ingest, &owned).await;
        // The owner of partition 0 publishes the configuration; the others run what it
        // published (a change made through any node is made on that one).
        if held.contains(&0) {
            publish_config(&engine, ownership.cluster(), &mut published).await;
        } else {
            adopt_published(&engine, ownership.cluster(), placed_rx.borrow().shared_config).await;
        }
        ownership.cluster().set_running_config(engine.state.config.active().version);
        // Events handed to the owned partitions while no node owned them.
        if applying.as_ref().is_none_or(|task| task.is_finished()) && !owned.is_none() {
            applying = Some(tokio::spawn(apply_intake(front.ingest.clone(), intake.clone(), owned.partitions())));
        }
        tokio::select! {
            changed = placed_rx.changed() => if changed.is_err() { break Ok(()) },
            _ = tokio::time::sleep(lease / 4) => {}
            _ = &mut shutdown => break Ok(()),
        }
    };
    let _ = stop_tx.send(true);
    let _ = serving.await;
    rounds.abort();
    lapsing.abort();
    snapshotting.abort();
    passing_on.abort();
    taking_outcomes.abort();
    if let Some(task) = applying {
        task.abort();
    }
    drop(front);
    engine.stop().await;
    // What the lanes finished while stopping, for the next owners not to deliver again.
    publish_outcomes(&reported, &outcome_stream).await;
    // Also after the stream forgot what this node lacks: its next start restores the latest
    // snapshot, so it need not hold the stream's truncation back meanwhile.
    if let Err(e) = ownership.release_all().await {
        tracing::warn!("leaving the cluster: {e}");
    }
    outcome
}

/// How often a node looks whether the leases of partitions it applies live are lapsing.
fn lapse_check_every(lease: Duration) -> Duration {
    lease / 10
}

/// Stops applying live each partition whose lease a round found another node had taken, or
/// released; and, while an ownership round is stuck (it waits on servers that do not answer
/// it, up to their request timeouts, longer than a lease), each whose lease is about to lapse
/// unrenewed by this node's clock: once it lapses, another node may take it. (The node's loop
/// does the same with what each round published, but it may be busy taking partitions for
/// longer than a lease.) Events for such a partition go to its owner or the intake (or are
/// refused while it cannot be reached), and reads of its profiles are refused, until a round
/// renews the lease and the partition is taken again.
async fn give_up_lapsed(ownership: Arc<Ownership>, owned: Arc<Owned>, lease: Duration) {
    loop {
        tokio::time::sleep(lapse_check_every(lease)).await;
        let stuck = ownership.round_stuck();
        let (leased, held) = (ownership.leased(), ownership.held());
        // Owned, or being taken (its records are logged as they are applied again).
        let lapsed: Vec<Partition> = owned
            .partitions()
            .into_iter()
            .chain(owned.taking())
            .filter(|p| !leased.contains(p) || (stuck && !held.contains(p)))
            .collect();
        for &partition in &lapsed {
            owned.remove(partition);
        }
        match (lapsed.is_empty(), stuck) {
            (true, _) => {}
            (false, true) => tracing::warn!(partitions = ?lapsed, "leases lapsing unrenewed: partitions given up"),
            (false, false) => tracing::info!(partitions = ?lapsed, "leases taken or released: partitions given up"),
        }
    }
}

/// Drops what this node holds of `partitions`, which it does not own: its profiles are their
/// owner's, and this node follows only their ids; taken again, each is restored.
async fn drop_partitions(ingest: &crate::pipeline::Ingest, partitions: impl Iterator<Item = Partition>) {
    for partition in partitions {
        match ingest.restore(partition, None, None).await {
            Ok(dropped) => tracing::debug!(partition, profiles = dropped.dropped, "partition not owned dropped"),
            Err(e) => tracing::warn!(partition, "dropping a partition not owned: {e}"),
        }
    }
}

/// Applies the configuration the owner of partition 0 published, if it is not the one this node
/// runs.
async fn adopt_published(engine: &App, cluster: &starling_cluster::Cluster, published: Option<i64>) {
    let active = engine.state.config.active();
    if published.is_none_or(|version| version == active.version) {
        return;
    }
    let shared = match cluster.shared_config().await {
        Ok(Some(shared)) if shared.sha256 != active.sha256 => shared,
        Ok(_) => return,
        Err(e) => {
            tracing::warn!("reading the published configuration: {e}");
            return;
        }
    };
    match crate::reconfigure::apply(&engine.state, shared.text, "cluster").await {
        Ok(applied) => tracing::info!(
            version = applied.version,
            published = shared.version,
            "running the configuration the cluster published"
        ),
        Err(e) => tracing::error!(
            published = shared.version,
            "the configuration the cluster published does not apply here: {e}"
        ),
    }
}

/// Fences `partitions` (just taken) off from their former owners, restores each from the
/// snapshot holding it furthest and applies its records after that. Returns how many records
/// it applied.
async fn gain(
    log: &JetStreamLog,
    taker: &Taker,
    node: &str,
    partitions: &[Partition],
    stored: &starling_cluster::snapshot::Snapshots,
    cluster: &starling_cluster::Cluster,
    database: &std::path::Path,
) -> Result<usize, String> {
    log.fence(partitions, &crate::pipeline::owner_record(node)).await.map_err(|e| format!("fencing: {e}"))?;
    let restoring = snapshots::fetch_for(stored, database, partitions).await?;
    let files: Vec<std::path::PathBuf> = restoring.iter().filter_map(|(_, file, _)| file.clone()).collect();
    // The stream forgets records only once a stored snapshot holds them. Forgotten past where
    // a partition is restored from, the listing was behind the store (a server catching up
    // after an election answered it), or a newer snapshot was stored since: the take is tried
    // again next round. (Reading the partition, the node would find records gone and stop, as
    // a node that fell behind the stream does.)
    let overtaken = match cluster.truncated().await {
        Ok(truncated) => match snapshots::overtaken(&restoring, &truncated) {
            Some((p, from)) => Err(format!(
                "the stream forgot partition {p}'s records before position {}, past the snapshot listed for it \
                 (at {from}); tried again next round",
                truncated[p as usize]
            )),
            None => Ok(()),
        },
        Err(e) => Err(format!("reading where the stream was truncated: {e}")),
    };
    let taken = match overtaken {
        Ok(()) => taker.take_partitions(restoring).await,
        Err(e) => Err(e),
    };
    for file in files {
        let _ = std::fs::remove_file(file);
    }
    taken
}

/// Applies the events the intake holds for `partitions`, then has it forget them.
async fn apply_intake(ingest: Arc<crate::pipeline::Ingest>, intake: Arc<Intake>, partitions: Vec<Partition>) {
    if intake.held().await.unwrap_or(0) == 0 {
        return;
    }
    for partition in partitions {
        let mut events = Vec::new();
        let read = intake
            .read_partition(partition, &mut |payload| {
                if let Ok(event) = serde_json::from_slice::<Event>(&payload) {
                    events.push(event);
                }
            })
            .await;
        let last = match read {
            Ok(0) => continue,
            Ok(last) => last,
            Err(e) => {
                tracing::warn!(partition, "reading the intake: {e}");
                return;
            }
        };
        let taken = events.len();
        // Not applied (a failed commit, some refused by the node they were handed to, the
        // engine stopping): the intake keeps them for the next round or owner; ids keep any
        // applied out. The other partitions' go on, unless the engine is stopping.
        match ingest.submit_from(events, Source::Intake).await {
            Ok(_) => {}
            Err(IngestError::Closed) => return,
            Err(e) => {
                tracing::warn!(partition, "applying the intake: {e}");
                continue;
            }
        }
        tracing::info!(partition, events = taken, "applied the events handed over while no node owned the partition");
        if let Err(e) = intake.forget_partition_through(partition, last).await {
            tracing::warn!(partition, "the intake did not forget what was applied: {e}");
        }
    }
}

/// Reads how the other nodes' deliveries ended and ends this copy's rows alike (those of the
/// partitions this node owns are its own to end).
async fn take_outcomes(database: std::path::PathBuf, stream: Arc<OutcomeStream>, owned: Arc<Owned>) {
    let conn = match starling_store::open_relaxed(&database) {
        Ok(conn) => Arc::new(std::sync::Mutex::new(conn)),
        Err(e) => {
            tracing::error!("delivery outcomes will not be taken: {e}");
            return;
        }
    };
    let (mut after, mut waiting): (u64, Vec<(Instant, Outcome)>) = (0, Vec::new());
    loop {
        tokio::time::sleep(super::FOLLOW_EVERY).await;
        let mut messages = Vec::new();
        let read = stream
            .read(after, &mut |sequence, payload| {
                after = sequence;
                messages.push(payload);
            })
            .await;
        // What was read before an error is taken all the same: `after` has gone past it.
        if let Err(e) = read {
            tracing::debug!("reading delivery outcomes: {e}");
        }
        let now = Instant::now();
        for payload in messages {
            if let Ok(outcomes) = serde_json::from_slice::<Vec<Outcome>>(&payload) {
                waiting.extend(outcomes.into_iter().map(|outcome| (now, outcome)));
            }
        }
        if waiting.is_empty() {
            continue;
        }
        let (conn, pending, owns_all) = (conn.clone(), std::mem::take(&mut waiting), owned.is_all());
        let taken = tokio::task::spawn_blocking(move || {
            let conn = conn.lock().expect("connection");
            let mut not_yet = Vec::new();
            for (read, outcome) in pending {
                match starling_store::outcomes::take(&conn, &outcome) {
                    Ok(Taken::NotYet) if !owns_all => not_yet.push((read, outcome)),
                    Ok(_) => {}
                    Err(e) => tracing::warn!("ending a row as another node's delivery ended: {e}"),
                }
            }
            not_yet
        })
        .await;
        if let Ok(mut not_yet) = taken {
            not_yet.retain(|(read, _)| read.elapsed() < OUTCOME_WAIT);
            let excess = not_yet.len().saturating_sub(OUTCOMES_WAITING);
            not_yet.drain(..excess);
            waiting = not_yet;
        }
    }
}

/// Keeps this node's leases, a few rounds per lease period, and publishes what it sees.
async fn run_rounds(
    ownership: Arc<Ownership>,
    stream: Arc<starling_cluster::stream::EventStream>,
    lease: Duration,
    placed: watch::Sender<Placed>,
) {
    let cluster = ownership.cluster();
    loop {
        if let Err(e) = ownership.tick().await {
            tracing::warn!("ownership round: {e}");
        }
        let previous = placed.borrow().clone();
        let next = Placed {
            held: ownership.held(),
            owners: match ownership.owners() {
                Some(owners) => owners.into_iter().map(|(p, o)| (p, o.node)).collect(),
                None => previous.owners,
            },
            nodes: ownership.live_peers().unwrap_or(previous.nodes),
            shared_config: cluster
                .shared_config()
                .await
                .map(|c| c.map(|c| c.version))
                .unwrap_or(previous.shared_config),
            stream_leader: stream.leader().await.unwrap_or_default(),
        };
        placed.send_if_modified(|p| {
            let changed = *p != next;
            *p = next;
            changed
        });
        tokio::time::sleep(lease / 4).await;
    }
}

/// `GET /v1/cluster`: this node, which partitions it applies live, who owns the others.
async fn status(State(front): State<Arc<Front>>) -> Response {
    let placed = front.placed.borrow().clone();
    let (intake_held, stream) = tokio::join!(within_status(front.intake.held()), within_status(front.stream.holds()));
    let mut by_node: BTreeMap<&str, usize> = BTreeMap::new();
    for node in placed.owners.values() {
        *by_node.entry(node).or_default() += 1;
    }
    let body = serde_json::json!({
        "node": front.node,
        "placement": "spread",
        "serving": true,
        "partitions_held": front.ownership.held().len(),
        // The partitions this node's engine applies and logs.
        "owned": front.owned.partitions(),
        "owners": placed.owners,
        "partitions_per_node": by_node,
        "stream_leader": placed.stream_leader,
        "config_version": placed.shared_config,
        // Events handed to partitions while no node owned them, not yet applied (null: the
        // intake is unreachable).
        "intake_held": intake_held,
        // What the stream holds: it forgets what every node's database and the latest snapshot
        // hold (null: the stream is unreachable).
        "stream": stream,
        "nodes": placed.nodes.iter().map(|(n, p)| serde_json::json!({"node": n, "url": p.url, "config_version": p.config_version})).collect::<Vec<_>>(),
    });
    axum::Json(body).into_response()
}

/// How long `GET /v1/cluster` waits for what it asks the servers: it answers during an outage
/// too, with what the node knows itself.
const STATUS_WAIT: Duration = Duration::from_secs(1);

/// What the servers answered `GET /v1/cluster` within [`STATUS_WAIT`] (`None`: not in time, or
/// an error).
async fn within_status<T>(asked: impl Future<Output = starling_cluster::Result<T>>) -> Option<T> {
    tokio::time::timeout(STATUS_WAIT, asked).await.ok()?.ok()
}

/// `POST /v1/cluster/handed`: events another node handed this one (only from a live node).
async fn take_handed(
    State(front): State<Arc<Front>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    axum::Json(handed): axum::Json<Handed>,
) -> Response {
    if !front.placed.borrow().is_node(peer.ip()) {
        let error = serde_json::json!({ "error": "only a node of the cluster hands events on" });
        return (StatusCode::FORBIDDEN, axum::Json(error)).into_response();
    }
    let source = match (handed.redirected, handed.from_intake) {
        (true, _) => Source::HandedRedirected,
        (false, true) => Source::HandedIntake,
        (false, false) => Source::Node,
    };
    match front.taker.take(handed.events, handed.after, source).await {
        Ok(report) => (StatusCode::ACCEPTED, axum::Json(report)).into_response(),
        Err(e) => unavailable(&e),
    }
}

/// What is kept for other partitions (`handed_over`) and was not sent since this node took
/// partitions: sent again every round until it is.
#[derive(Default)]
struct Kept {
    /// Merges and split-out profiles kept for this node's partitions, not applied: handed to
    /// the partitions taken, or restored with them (their profiles were to go into this node's).
    to_apply: bool,
    /// Partitions taken whose profiles' merges into other nodes' profiles are kept.
    to_hand: std::collections::BTreeSet<Partition>,
}

impl Kept {
    async fn send(&mut self, ingest: &crate::pipeline::Ingest, owned: &Owned) {
        if self.to_apply {
            match ingest.send_handed_over(|_| true).await {
                Ok(resent) => {
                    self.to_apply = false;
                    if resent > 0 {
                        tracing::info!(resent, "merges and split-out profiles kept for the partitions taken applied");
                    }
                }
                Err(e) => tracing::warn!("applying the merges handed to the partitions taken (again next round): {e}"),
            }
        }
        // A partition given up since is its next owner's to hand on.
        self.to_hand.retain(|p| owned.owns(*p));
        if !self.to_hand.is_empty() {
            match ingest.hand_kept(|p| self.to_hand.contains(&p)).await {
                Ok(merges) => {
                    self.to_hand.clear();
                    if merges > 0 {
                        tracing::info!(merges, "merges of the partitions taken handed on again");
                    }
                }
                Err(e) => tracing::warn!("handing on the merges of the partitions taken (again next round): {e}"),
            }
        }
        // Events a take redirected to survivors that another node owns, not taken there yet.
        ingest.apply_redirected().await;
    }
}

/// The profile id a request addresses (`/v1/profiles/{id}…`, `/v1/visitor/{id}`).
fn addressed_profile(request: &Request) -> Option<String> {
    let path = request.uri().path().strip_prefix("/v1/")?;
    let mut segments = path.split('/');
    match (segments.next(), segments.next()) {
        (Some("profiles" | "visitor"), Some(id)) if !id.is_empty() => {
            Some(percent_encoding::percent_decode_str(id).decode_utf8_lossy().into_owned())
        }
        _ => None,
    }
}

/// Any other request: a profile's to the node owning its partition, a read over every profile
/// to every node (see [`gather`]), the rest to this node's engine.
async fn answer(State(front): State<Arc<Front>>, request: Request) -> Response {
    let forwarded = request.headers().contains_key(FORWARDED_HEADER);
    // A configuration change is made by the owner of partition 0, which publishes it.
    if !forwarded && request.method() == Method::PUT && request.uri().path() == "/v1/config" {
        let coordinator = front.placed.borrow().owner_url(&front.node, 0);
        if let Some((node, url)) = coordinator {
            return forward_to(&front.node, &front.client, &url, request).await.unwrap_or_else(|e| {
                tracing::warn!(%node, "forwarding a configuration change: {e}");
                unavailable("the node that changes the cluster's configuration could not be reached; retry")
            });
        }
    }
    // A read over every profile: each node answers for its own partitions.
    if let Some(how) = gather::gathered(&request) {
        return gather::gather(&front, request, how).await;
    }
    if let Some(id) = addressed_profile(&request) {
        // A stream position to have followed first: the client's (the `position` an ingestion
        // answered, as `?after=`) or, forwarded, the forwarding node's (the client's, or where
        // its directory last pointed the id, if later: stitched, split out or its profile
        // deleted). Followed through it (a merge into one of this node's profiles among the
        // records, or a deletion), the node answers with those records applied, not with two
        // profiles still apart or with a profile the forwarding node knows is gone.
        let after = match forwarded {
            true => request.headers().get(READ_AFTER_HEADER).and_then(|v| v.to_str().ok()?.parse::<Position>().ok()),
            false => match read_after(request.uri()) {
                Ok(after) => after,
                Err(e) => return e.into_response(),
            },
        };
        if let Some(after) = after
            && let Err(e) = front.taker.followed_through(after).await
        {
            tracing::debug!(id, "a request for a profile after position {after}: {e}");
            return unavailable(&format!("the records through position {after} are not applied here yet; retry"));
        }
        let profile = match front.ingest.profile_of(&id) {
            Ok(profile) => profile,
            Err(e) => return unavailable(&format!("reading which profile the id belongs to: {e}")),
        };
        let partition = starling_log::partition_of(&profile);
        // Forwarded by a node that took this one for the owner (its view is a round old): the
        // engine answers if this node owns the partition; it holds no other partition's
        // profiles.
        if forwarded {
            if !front.owned.owns(partition) {
                return unavailable("the profile's partition moved to another node; retry");
            }
            return to_engine(&front, request).await;
        }
        if !front.owned.owns(partition) {
            let owner = front.placed.borrow().owner_url(&front.node, partition);
            // No node holds a copy of another's profiles: until one owns the partition, or
            // while its owner cannot be reached, the client retries.
            let Some((node, url)) = owner else {
                return unavailable(
                    "no node owns the profile's partition yet (a failover or a rebalance is under way); retry",
                );
            };
            let mut request = request;
            let headers = request.headers_mut();
            headers.remove(READ_AFTER_HEADER);
            let through = match front.ingest.pointed_through(&id) {
                Ok(through) => through,
                Err(e) => return unavailable(&format!("reading which profile the id belongs to: {e}")),
            };
            if let Some(after) = after.max(through) {
                headers.insert(HeaderName::from_static(READ_AFTER_HEADER), after.into());
            }
            return forward_to(&front.node, &front.client, &url, request).await.unwrap_or_else(|e| {
                tracing::warn!(%node, "forwarding to the profile's owner: {e}");
                unavailable("the profile's owner could not be reached; retry")
            });
        }
    }
    to_engine(&front, request).await
}

/// Has this node's engine answer `request`.
async fn to_engine(front: &Front, request: Request) -> Response {
    let request = with_client_address(front, request);
    let mut response = tower::ServiceExt::oneshot(front.engine.clone(), request).await.unwrap_or_else(|e| match e {});
    let headers = response.headers_mut();
    headers.insert(HeaderName::from_static(ANSWERED_FROM_HEADER), HeaderValue::from_static("engine"));
    if let Ok(node) = HeaderValue::from_str(&front.node) {
        headers.insert(HeaderName::from_static(NODE_HEADER), node);
    }
    response
}

/// As the whole placement's: a request a node forwarded is seen as from the client it names.
fn with_client_address(front: &Front, mut request: Request) -> Request {
    let claimed = request.headers_mut().remove(CLIENT_HEADER);
    let Some(&ConnectInfo(peer)) = request.extensions().get::<ConnectInfo<SocketAddr>>() else { return request };
    let client = claimed.and_then(|value| value.to_str().ok()?.parse::<IpAddr>().ok());
    if let Some(client) = client
        && front.placed.borrow().is_node(peer.ip())
    {
        request.extensions_mut().insert(ConnectInfo(SocketAddr::new(client, 0)));
    }
    request
}

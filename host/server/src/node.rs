//! A server as one node of a cluster on NATS JetStream (`[cluster]` in the configuration).
//!
//! The event log is the cluster's replicated stream ([`JetStreamLog`]); the virtual
//! partitions' leases say which node writes it. By default partitions are placed whole
//! ([`Placement::Whole`]): one node holds every lease and runs the engine, the others stand by
//! (below). Spread over the live nodes, each node runs the engine on its share (`node::spread`).
//! Every node answers the whole HTTP API: a standby forwards each request to the owner it reads
//! from the leases (`X-Starling-Node` on every answer names the node whose engine answered), so
//! that reads see exactly what the owner applied, not a copy that may lag. When the owner dies
//! its leases lapse; a standby takes them, appends a record to every partition that fences off
//! the former owner, and starts the engine, which derives its state from the stream (after what
//! its own database holds) and delivers the actions left pending, under the same idempotency
//! keys (they are made of log positions, which the stream keeps); the owner publishes how its
//! deliveries ended, and a standby's copy ends those rows too, so what was delivered is not
//! delivered again. An owner that finds it lost
//! a lease (paused past it, cut off) stops at once: its appends are refused from then on.

mod spread;

use crate::copy::ANSWERED_FROM_HEADER;
use crate::delivery::Outcomes;
use crate::follow::Follower;
use crate::{App, Options, ServerError, http};
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use starling_cluster::intake::Intake;
use starling_cluster::log::JetStreamLog;
use starling_cluster::outcomes::OutcomeStream;
use starling_cluster::snapshot::{Covered, Snapshots};
use starling_cluster::stream::EventStream;
use starling_cluster::{Cluster, Ownership, Peer, Placement, Settings, SharedConfig};
use starling_log::{PARTITIONS, Partition, Position};
use starling_store::outcomes::Outcome;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// Names the node whose engine answered.
pub const NODE_HEADER: &str = "x-starling-node";
/// Set on a request a standby forwards: the owner does not forward it again.
const FORWARDED_HEADER: &str = "x-starling-forwarded-by";
/// The address of the client a standby forwards for: the owner's engine takes it as the
/// request's peer (Segment's `context.ip`), if the request comes from a node of the cluster.
const CLIENT_HEADER: &str = "x-starling-client";
/// How long a stream's record ids are remembered to keep a repeated one out.
const DEDUP_WINDOW: Duration = Duration::from_secs(120);
/// The snapshot of the whole engine's state (every partition is on one node).
const SNAPSHOT: &str = "engine";

/// What the ownership rounds last saw.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct View {
    /// Whether this node holds every partition.
    holds_all: bool,
    /// Whether another node took a partition this node held, or wrote to one: from then on this
    /// node's state is not the partitions' (it stays so).
    overtaken: bool,
    /// The node holding the leases, and its URL.
    owner: Option<(String, Option<String>)>,
    /// Live nodes, as their heartbeats describe them.
    nodes: Vec<(String, Peer)>,
    /// The version of the configuration the owner last published.
    shared_config: Option<i64>,
    held: usize,
    /// The NATS server leading the event stream's replicas.
    stream_leader: Option<String>,
}

struct Front {
    node: String,
    engine: RwLock<Option<axum::Router>>,
    /// Ingestion while no node serves.
    taking: crate::intake::Taking,
    /// Profile reads while no node serves.
    copy: crate::copy::CopyReader,
    /// Held (shared) while a request is taken in; held alone while the engine starts serving.
    taking_in: tokio::sync::RwLock<()>,
    following: Arc<FollowProgress>,
    view: watch::Receiver<View>,
    client: hyper_util::client::legacy::Client<hyper_util::client::legacy::connect::HttpConnector, axum::body::Body>,
    ownership: Arc<Ownership>,
}

/// How long a node waits before trying again to join a cluster it could not reach.
const JOIN_RETRY: Duration = Duration::from_secs(1);

/// What a node opens on the cluster.
struct Joined {
    cluster: Cluster,
    stream: Arc<EventStream>,
    snapshots: Arc<Snapshots>,
    outcomes: Arc<OutcomeStream>,
    intake: Arc<Intake>,
}

/// This node's settings in the cluster, placing partitions by `placement`; other nodes reach it
/// at the advertised URL, or at the address it listens on.
fn settings_of(settings: &starling_core::model::ClusterSettings, addr: SocketAddr, placement: Placement) -> Settings {
    Settings {
        node: settings.node.clone(),
        lease: Duration::from_millis(settings.lease_ms as u64),
        replicas: settings.replicas,
        url: Some(settings.advertise.clone().unwrap_or_else(|| format!("http://{addr}"))),
        placement,
    }
}

/// Joins the cluster at `urls`, trying again while NATS is still starting or electing its
/// JetStream leader; `None` if `shutdown` resolves first.
async fn join_when_ready<F: Future<Output = ()>>(
    urls: &[String],
    settings: &Settings,
    shutdown: &mut std::pin::Pin<&mut F>,
) -> Option<Joined> {
    loop {
        match join(urls, settings.clone()).await {
            Ok(joined) => return Some(joined),
            Err(e) => tracing::warn!("the cluster cannot be joined yet ({e}); trying again"),
        }
        tokio::select! {
            _ = tokio::time::sleep(JOIN_RETRY) => {}
            _ = shutdown.as_mut() => return None,
        }
    }
}

/// Connects to the NATS servers and opens the streams and the snapshot store.
async fn join(urls: &[String], settings: Settings) -> Result<Joined, starling_cluster::ClusterError> {
    let cluster = Cluster::connect(urls, settings).await?;
    let stream = Arc::new(cluster.events(DEDUP_WINDOW).await?);
    let snapshots = Arc::new(cluster.snapshots().await?);
    let outcomes = Arc::new(cluster.outcomes().await?);
    let intake = Arc::new(cluster.intake(DEDUP_WINDOW).await?);
    Ok(Joined { cluster, stream, snapshots, outcomes, intake })
}

/// Serves `listener` as a cluster node until `shutdown` resolves, or until this node loses the
/// leases it ran the engine with (then returns [`ServerError::Fenced`]).
pub async fn serve(
    options: Options,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    let settings = options.model.cluster.clone().expect("a cluster node has [cluster] settings");
    if settings.spread {
        return spread::serve(options, listener, shutdown).await;
    }
    let addr = listener.local_addr()?;
    let node_settings = settings_of(&settings, addr, Placement::Whole);
    let (url, lease) = (node_settings.url.clone().unwrap_or_default(), node_settings.lease);
    let mut shutdown = std::pin::pin!(shutdown);
    let Some(Joined { cluster, stream, snapshots, outcomes: outcome_stream, intake }) =
        join_when_ready(&settings.nats, &node_settings, &mut shutdown).await
    else {
        return Ok(());
    };
    let ownership = Arc::new(Ownership::new(cluster));
    let log = Arc::new(JetStreamLog::new(stream.clone(), ownership.clone(), tokio::runtime::Handle::current()));
    tracing::info!(node = %settings.node, %url, "joined the cluster");

    let (view_tx, view) = watch::channel(View::default());
    let rounds = tokio::spawn(run_rounds(ownership.clone(), stream.clone(), log.clone(), lease, view_tx));
    let taking = crate::intake::Taking::new(
        // Checked as the engine checks requests: with `STARLING_ADMIN_TOKEN` too.
        Arc::new(crate::live::Live::new(Arc::new(options.model.clone()), options.admin_token.clone())),
        intake.clone(),
        &settings.node,
        addr,
    );
    let front = Arc::new(Front {
        node: settings.node.clone(),
        engine: RwLock::new(None),
        copy: crate::copy::CopyReader {
            database: options.database.clone().into(),
            checks: taking.clone(),
            personalization: Arc::default(),
        },
        taking,
        taking_in: tokio::sync::RwLock::new(()),
        following: Arc::default(),
        view: view.clone(),
        client: hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http(),
        ownership: ownership.clone(),
    });
    let router = axum::Router::new()
        .route("/v1/cluster", get(status))
        .fallback(answer)
        .layer(axum::extract::DefaultBodyLimit::max(crate::api::MAX_BODY_BYTES))
        .with_state(front.clone());

    let limits = http::Limits {
        max_connections: options.model.server.max_connections.max(1),
        header_timeout: Duration::from_millis(options.model.header_timeout_ms as u64),
    };
    let drain = http::Drain::default();
    let (stop_tx, mut stopping) = watch::channel(false);
    let serving = tokio::spawn(http::serve(listener, router, limits, drain.clone(), async move {
        let _ = stopping.wait_for(|s| *s).await;
    }));
    let mut view_rx = view;
    let database = options.database.clone();
    let mut options = Some(options);
    let mut app: Option<App> = None;
    let mut snapshotting = None;
    let mut published = None;
    let mut following: Option<Following> = None;
    // The intake's events queued on the engine, until they are applied.
    let mut applying: Option<tokio::task::JoinHandle<()>> = None;
    // How the owner's deliveries ended: kept by its lanes, published, taken by the followers.
    let (reported, mut passing_on) = (Outcomes::default(), None);
    let feed = OutcomeFeed { stream: outcome_stream.clone(), read: Arc::default() };
    let snapshot_every = Duration::from_millis(settings.snapshot_every_ms as u64);
    let outcome = loop {
        let (holds_all, overtaken, owner) = {
            let view = view_rx.borrow_and_update();
            (view.holds_all, view.overtaken, view.owner.clone())
        };
        // Standing by, the node follows the stream (started again when it stopped: behind the
        // latest snapshot, or at the first record applied with a newer configuration).
        if let Some(follow) = following.take_if(|f| f.task.is_finished()) {
            follow.stop().await;
        }
        let another_owner = owner.is_some_and(|(node, _)| node != front.node);
        if following.is_none()
            && app.is_none()
            && another_owner
            && !holds_all
            && !overtaken
            && let Some(start) = &options
        {
            let mut start = start.clone();
            match adopt_shared_config(&mut start, ownership.cluster()).await {
                Err(e) => tracing::warn!("following the stream: {e}"),
                Ok(published) => {
                    let model = Arc::new(start.model.clone());
                    front.taking.set_config(Arc::new(crate::live::Live::new(model, start.admin_token.clone())));
                    let sources = Sources {
                        log: log.clone(),
                        snapshots: snapshots.clone(),
                        outcomes: feed.clone(),
                        ownership: ownership.clone(),
                    };
                    let progress = front.following.clone();
                    following = Some(Following::start(start, sources, progress, published));
                }
            }
        }
        // A lease that lapsed without another node taking it (NATS unreachable for a while)
        // only pauses writing: the log refuses appends until this node renews.
        match (&app, holds_all) {
            (Some(_), _) if overtaken => {
                tracing::error!(node = %front.node, "this node lost its partitions' leases to another node; stopping");
                break Err(ServerError::Fenced);
            }
            (None, true) if !overtaken => {
                let Some(mut start) = options.take() else { break Ok(()) };
                start.outcomes = Some(reported.clone());
                if let Some(follow) = following.take() {
                    follow.stop().await;
                }
                match activate(start, ownership.cluster(), &log, &snapshots, &front.node, addr, &drain).await {
                    Ok(engine) => {
                        // Events taken in while no node served, those being taken in included,
                        // are queued before this node serves: a client that was answered `202`
                        // then reads them.
                        let taken_in = front.taking_in.write().await;
                        match crate::intake::apply(&engine, intake.clone()).await {
                            Ok(task) => applying = task,
                            Err(e) => tracing::warn!("{e}"),
                        }
                        *front.engine.write().expect("engine") = Some(engine.router());
                        drop(taken_in);
                        app = Some(engine);
                        passing_on = Some(tokio::spawn(pass_on_outcomes(reported.clone(), outcome_stream.clone())));
                        snapshotting = Some(tokio::spawn(take_snapshots(
                            database.clone(),
                            snapshots.clone(),
                            stream.clone(),
                            ownership.clone(),
                            snapshot_every,
                        )));
                    }
                    Err(e) => break Err(e),
                }
            }
            _ => {}
        }
        if let Some(engine) = &app {
            publish_config(engine, ownership.cluster(), &mut published).await;
            // Taken in since (by nodes that did not yet see this one serve).
            if applying.as_ref().is_none_or(|task| task.is_finished()) {
                match crate::intake::apply(engine, intake.clone()).await {
                    Ok(task) => applying = task,
                    Err(e) => tracing::warn!("{e}"),
                }
            }
        }
        tokio::select! {
            changed = view_rx.changed() => if changed.is_err() { break Err(ServerError::Cluster("ownership rounds stopped".into())) },
            _ = tokio::time::sleep(lease / 4) => {}
            _ = &mut shutdown => break Ok(()),
        }
    };
    front.engine.write().expect("engine").take();
    let _ = stop_tx.send(true);
    let _ = serving.await;
    if let Some(follow) = following.take() {
        follow.stop().await;
    }
    rounds.abort();
    if let Some(task) = snapshotting {
        task.abort();
    }
    if let Some(task) = passing_on {
        task.abort();
    }
    if let Some(app) = app {
        app.stop().await;
        // What the lanes finished while stopping, for the next owner not to deliver again.
        publish_outcomes(&reported, &outcome_stream).await;
    }
    if matches!(outcome, Err(ServerError::Fenced)) {
        // What this node holds may include work it could not log once another node had taken
        // over: the next start restores the latest snapshot and the stream instead.
        remove_database(&database)?;
        tracing::warn!("the local state was discarded; the next start rebuilds it from the cluster");
    }
    // Stopped cleanly: the next owner need not wait for the leases and the heartbeat to lapse.
    if outcome.is_ok()
        && let Err(e) = ownership.release_all().await
    {
        tracing::warn!("leaving the cluster: {e}");
    }
    outcome
}

/// How often a standby applies what the stream gained (a round that took longer is followed
/// by the next at once: the standby is behind).
const FOLLOW_EVERY: Duration = Duration::from_millis(250);

/// A standby following the stream into its database (see [`crate::follow`]).
struct Following {
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<Result<(), ServerError>>,
}

/// What a follower reads from the cluster.
struct Sources {
    log: Arc<JetStreamLog>,
    snapshots: Arc<Snapshots>,
    outcomes: OutcomeFeed,
    /// For the configuration the owner published.
    ownership: Arc<Ownership>,
}

impl Following {
    /// Follows with `options`, whose configuration is the one `published` (if any).
    fn start(
        options: Options,
        sources: Sources,
        progress: Arc<FollowProgress>,
        published: Option<SharedConfig>,
    ) -> Following {
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn(follow(options, sources, progress, published, stopped));
        Following { stop, task }
    }

    /// Stops following once what was applied is written to the database.
    async fn stop(self) {
        let _ = self.stop.send(true);
        match self.task.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!("following the stream stopped: {e}"),
            Err(e) => tracing::warn!("following the stream stopped: {e}"),
        }
    }
}

/// Applies the stream into the local database until `stop` is set. It starts from the latest
/// snapshot when the snapshot includes more of any partition than the database, and stops when
/// a later snapshot does (the stream forgets what snapshots include, so the records in between
/// may be gone: the next start restores that snapshot).
async fn follow(
    options: Options,
    sources: Sources,
    progress: Arc<FollowProgress>,
    published: Option<SharedConfig>,
    mut stop: watch::Receiver<bool>,
) -> Result<(), ServerError> {
    let Sources { log, snapshots, outcomes: feed, ownership } = sources;
    let started = std::time::Instant::now();
    let database = options.database.clone();
    restore(&database, &snapshots, Placement::Whole, ownership.cluster()).await?;
    let stream = log.clone();
    let log: Arc<dyn starling_log::EventLog> = log;
    let version = published.as_ref().map_or(0, |p| p.version);
    let mut follower = tokio::task::spawn_blocking(move || Follower::start(&options, published.as_ref(), log))
        .await
        .map_err(|e| ServerError::Cluster(e.to_string()))??;
    tracing::info!(elapsed_ms = started.elapsed().as_millis() as u64, "following the stream");
    // The latest snapshot whose delivery states this copy has taken.
    let mut adopted = 0;
    // Outcomes of the owner's deliveries whose rows this copy does not hold yet.
    let (mut waiting, mut ended) = (Vec::new(), 0);
    let mut round = Instant::now();
    // The stream's last position before the last read.
    let mut read_through: Option<Position> = None;
    let outcome = loop {
        tokio::select! {
            _ = stop.changed() => break Ok(()),
            _ = tokio::time::sleep(FOLLOW_EVERY.saturating_sub(round.elapsed())) => {}
        }
        round = Instant::now();
        // While the stream's last position has not moved since before the last read, nothing
        // is new: no read (each asks the servers for a consumer, which costs them more than the
        // rest of an idle round).
        let end = stream.last().await.ok();
        let entries = match end.is_some() && end == read_through {
            true => Vec::new(),
            false => match follower.read().await {
                Ok(entries) => entries,
                Err(e) => break Err(e),
            },
        };
        // Checked after the read: a snapshot is stored before the stream forgets what it
        // includes, so one that overtook this read is seen here.
        let covered = match snapshots.covers(SNAPSHOT).await {
            Ok(covered) => covered,
            Err(e) => break Err(ServerError::Cluster(e.to_string())),
        };
        let positions = follower.positions();
        if let Some(covered) = &covered
            && covered.0.iter().any(|(p, at)| *at > positions.get(p).copied().unwrap_or(0))
        {
            break Err(ServerError::Cluster(
                "the latest snapshot overtook the standby's copy; it starts again from it".into(),
            ));
        }
        // Records are applied with the configuration they were first applied with: at the
        // first one applied with a newer version, the follower stops, to start again with it
        // once it is published (it may not be yet). Records of the older version after it (an
        // owner's workers switch at their next batch) are then applied with that version, which
        // the database recorded when the follower started with it.
        let newer = entries.iter().position(|e| crate::pipeline::config_version_of(&e.payload) > version);
        let (now, later) = entries.split_at(newer.unwrap_or(entries.len()));
        // Records left for a newer configuration are read again next round.
        read_through = if later.is_empty() { end } else { None };
        let read_ms = round.elapsed().as_millis() as u64;
        if let Err(e) = follower.apply(now).await {
            break Err(e);
        }
        // Keeping up, the copy writes what it applied at once, so that reads of it (during a
        // failover) see it; behind, its writes stay large (every half second), to catch up.
        if !now.is_empty()
            && round.elapsed() < FOLLOW_EVERY
            && let Err(e) = follower.materialize().await
        {
            break Err(e);
        }
        tracing::debug!(
            records = now.len(),
            read_ms,
            elapsed_ms = round.elapsed().as_millis() as u64,
            "records applied"
        );
        let last = match stream.last().await {
            Ok(last) => last,
            Err(_) => starling_log::EventLog::next_position(&*stream).saturating_sub(1),
        };
        progress.applied(follower.positions().values().max().copied().unwrap_or(0), last);
        // What the owner had delivered when it stored its latest snapshot is not delivered
        // again by this node if it takes over.
        if let Some(covered) = covered
            && covered.last() > adopted
        {
            match adopt_deliveries(&database, &snapshots).await {
                Ok(changed) => {
                    adopted = covered.last();
                    tracing::debug!(
                        actions = changed,
                        covers = adopted,
                        "delivery states taken from the latest snapshot"
                    );
                }
                Err(e) => tracing::warn!("taking delivery states from the latest snapshot: {e}"),
            }
        }
        match take_outcomes(&follower, &feed, &mut waiting).await {
            Ok(n) => {
                ended += n;
                progress.outcomes_taken.fetch_add(n as u64, Ordering::SeqCst);
            }
            Err(e) => tracing::warn!("taking the owner's delivery outcomes: {e}"),
        }
        if let Some(first) = later.first() {
            let wanted = crate::pipeline::config_version_of(&first.payload);
            match ownership.cluster().shared_config().await {
                Ok(Some(published)) if published.version >= wanted => {
                    tracing::info!(version = wanted, "the stream goes on with a newer configuration");
                    break Ok(());
                }
                Ok(_) => {}
                Err(e) => tracing::warn!("reading the published configuration: {e}"),
            }
        }
    };
    progress.running.store(false, Ordering::SeqCst);
    // Stopped to take over (or to start again): the outcomes the owner published last end
    // their rows here too, once the rows are written.
    if outcome.is_ok() {
        let last = match follower.materialize().await {
            Ok(()) => take_outcomes(&follower, &feed, &mut waiting).await,
            Err(e) => Err(e),
        };
        match last {
            Ok(n) => ended += n,
            Err(e) => tracing::warn!("taking the owner's delivery outcomes: {e}"),
        }
    }
    tracing::info!(ended, not_yet_here = waiting.len(), "delivery outcomes taken from the owner");
    follower.stop().await?;
    outcome
}

/// How far this node's copy follows the stream, for `/v1/cluster`.
#[derive(Default)]
struct FollowProgress {
    running: AtomicBool,
    /// The highest stream position applied.
    applied: AtomicU64,
    /// The stream's last position when the last round read it.
    stream: AtomicU64,
    /// Rows of the copy ended by the owner's delivery outcomes.
    outcomes_taken: AtomicU64,
}

impl FollowProgress {
    fn applied(&self, applied: u64, stream: u64) {
        self.running.store(true, Ordering::SeqCst);
        self.applied.store(applied, Ordering::SeqCst);
        self.stream.store(stream, Ordering::SeqCst);
    }

    fn to_json(&self) -> serde_json::Value {
        if !self.running.load(Ordering::SeqCst) {
            return serde_json::Value::Null;
        }
        let (applied, stream) = (self.applied.load(Ordering::SeqCst), self.stream.load(Ordering::SeqCst));
        serde_json::json!({
            "applied_position": applied,
            "stream_position": stream,
            "positions_behind": stream.saturating_sub(applied),
            "delivery_outcomes_taken": self.outcomes_taken.load(Ordering::SeqCst),
        })
    }
}

/// The owner's delivery outcomes as followers read them: the stream, and how far this node's
/// followers have read it (a follower started again reads on from there).
#[derive(Clone)]
struct OutcomeFeed {
    stream: Arc<OutcomeStream>,
    read: Arc<AtomicU64>,
}

/// How long an outcome waits for the row it ends: the follower applies the record that
/// decides an action within a round or two of its owner.
const OUTCOME_WAIT: Duration = Duration::from_secs(30);
/// Outcomes a follower keeps waiting at most (the newest).
const OUTCOMES_WAITING: usize = 100_000;
/// The size of a message of outcomes (NATS's default largest payload is 1 MB).
const OUTCOME_MESSAGE_BYTES: usize = 256 * 1024;

/// Reads the outcomes published since the last read and ends this copy's rows alike; an
/// outcome whose row is not here yet waits for it. Returns how many rows ended.
async fn take_outcomes(
    follower: &Follower,
    feed: &OutcomeFeed,
    waiting: &mut Vec<(Instant, Outcome)>,
) -> Result<usize, ServerError> {
    let after = feed.read.load(Ordering::SeqCst);
    let (mut last, mut messages) = (after, Vec::new());
    feed.stream
        .read(after, &mut |sequence, payload| {
            last = sequence;
            messages.push(payload);
        })
        .await
        .map_err(|e| ServerError::Cluster(e.to_string()))?;
    feed.read.store(last, Ordering::SeqCst);
    let read = Instant::now();
    for payload in messages {
        match serde_json::from_slice::<Vec<Outcome>>(&payload) {
            Ok(outcomes) => waiting.extend(outcomes.into_iter().map(|outcome| (read, outcome))),
            Err(e) => tracing::warn!("a message of delivery outcomes that does not read: {e}"),
        }
    }
    if waiting.is_empty() {
        return Ok(0);
    }
    let (ended, mut not_yet) = follower.take_outcomes(std::mem::take(waiting)).await?;
    not_yet.retain(|(read, _)| read.elapsed() < OUTCOME_WAIT);
    let excess = not_yet.len().saturating_sub(OUTCOMES_WAITING);
    not_yet.drain(..excess);
    *waiting = not_yet;
    Ok(ended)
}

/// Publishes, a few times a second, how the owner's deliveries ended.
async fn pass_on_outcomes(reported: Outcomes, stream: Arc<OutcomeStream>) {
    loop {
        tokio::time::sleep(FOLLOW_EVERY).await;
        publish_outcomes(&reported, &stream).await;
    }
}

async fn publish_outcomes(reported: &Outcomes, stream: &OutcomeStream) {
    let outcomes = reported.take();
    let mut from = 0;
    while from < outcomes.len() {
        // As many as fit a message (an error text may be long).
        let (mut message, mut to) = (b"[".to_vec(), from);
        while to < outcomes.len() {
            let item = serde_json::to_vec(&outcomes[to]).expect("an outcome serializes");
            if item.len() + 2 > OUTCOME_MESSAGE_BYTES {
                // Its error text is too long to pass on: the action may be delivered again.
                tracing::warn!(origin = %outcomes[to].origin, "a delivery outcome too large to pass on");
                to += 1;
                continue;
            }
            if message.len() > 1 && message.len() + item.len() + 2 > OUTCOME_MESSAGE_BYTES {
                break;
            }
            if message.len() > 1 {
                message.push(b',');
            }
            message.extend(item);
            to += 1;
        }
        message.push(b']');
        if let Err(e) = stream.publish(message.into()).await {
            // Kept for the next round: a follower that takes over without them delivers those
            // actions again (under the same keys).
            tracing::warn!("publishing delivery outcomes: {e}");
            reported.add(outcomes[from..].to_vec());
            return;
        }
        from = to;
    }
}

/// Marks the actions the latest snapshot holds as delivered (or failed, or cancelled) so in the
/// local database too.
async fn adopt_deliveries(database: &Path, snapshots: &Snapshots) -> Result<usize, ServerError> {
    let copy = database.with_extension("deliveries");
    snapshots.fetch(SNAPSHOT, &copy).await.map_err(|e| ServerError::Cluster(e.to_string()))?;
    let (local, fetched) = (database.to_path_buf(), copy.clone());
    let adopted = tokio::task::spawn_blocking(move || {
        starling_store::adopt_deliveries(&starling_store::open(&local)?, &fetched).map_err(ServerError::from)
    })
    .await
    .map_err(|e| ServerError::Cluster(e.to_string()))?;
    let _ = std::fs::remove_file(&copy);
    adopted
}

/// Fences every partition off from former owners, restores the latest snapshot if it is ahead
/// of the local database, and starts the engine on the stream.
async fn activate(
    options: Options,
    cluster: &Cluster,
    log: &Arc<JetStreamLog>,
    snapshots: &Snapshots,
    node: &str,
    addr: std::net::SocketAddr,
    drain: &http::Drain,
) -> Result<App, ServerError> {
    let started = std::time::Instant::now();
    let partitions: Vec<_> = (0..PARTITIONS).collect();
    log.fence(&partitions, &crate::pipeline::owner_record(node))
        .await
        .map_err(|e| ServerError::Cluster(format!("fencing the partitions: {e}")))?;
    let mut options = prepare(options, cluster, snapshots, Placement::Whole).await?;
    options.event_log = Some(log.clone());
    let mut engine = App::start(options).await?;
    engine.listening_on(addr)?;
    engine.state.drain = drain.clone();
    tracing::info!(
        node,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "this node owns every partition and serves them"
    );
    Ok(engine)
}

/// Restores the latest snapshot if it is ahead of the local database, and takes the
/// configuration the cluster runs, numbered as the cluster numbers it.
async fn prepare(
    mut options: Options,
    cluster: &Cluster,
    snapshots: &Snapshots,
    placement: Placement,
) -> Result<Options, ServerError> {
    restore(&options.database, snapshots, placement, cluster).await?;
    if let Some(published) = adopt_shared_config(&mut options, cluster).await? {
        let database = options.database.clone();
        tokio::task::spawn_blocking(move || {
            let conn = starling_store::open(&database)?;
            let now = crate::system_clock();
            starling_store::continue_numbering(&conn, published.version, &published.sha256, &published.text, now)
        })
        .await
        .map_err(|e| ServerError::Cluster(e.to_string()))??;
    }
    Ok(options)
}

/// Takes the configuration the last owner published, if there is one: it may have been changed
/// while running since this node read its own file. (`[cluster]` stays this node's own.)
/// Returns the configuration published, if any.
async fn adopt_shared_config(options: &mut Options, cluster: &Cluster) -> Result<Option<SharedConfig>, ServerError> {
    let Some(shared) = cluster.shared_config().await.map_err(|e| ServerError::Cluster(e.to_string()))? else {
        return Ok(None);
    };
    if shared.text == options.model.source_text() {
        return Ok(Some(shared));
    }
    let mut model = starling_core::parse(&shared.text).map_err(|e| {
        ServerError::Cluster(format!(
            "the cluster's configuration (version {}) does not load here:\n{e}",
            shared.version
        ))
    })?;
    model.cluster = options.model.cluster.clone();
    tracing::info!(version = shared.version, "running the configuration the last owner published");
    options.model = model;
    Ok(Some(shared))
}

/// Publishes the configuration the engine runs when it changed (at start, or applied live).
async fn publish_config(app: &App, cluster: &Cluster, published: &mut Option<i64>) {
    let active = app.state.config.active();
    if *published == Some(active.version) || active.version == 0 {
        return;
    }
    let model = app.state.config.model();
    let shared = SharedConfig { version: active.version, sha256: active.sha256, text: model.source_text().to_string() };
    match cluster.publish_config(&shared).await {
        Ok(()) => {
            cluster.set_running_config(shared.version);
            *published = Some(shared.version);
            tracing::info!(version = shared.version, "configuration published to the cluster");
        }
        Err(e) => tracing::warn!("publishing the configuration: {e}"),
    }
}

/// Replaces the local database with the latest snapshot when the snapshot includes more of any
/// partition's log (a node that never owned the partitions, or did long ago): the stream no
/// longer holds the records before the snapshot's positions. The engine then applies only the
/// records after them.
async fn restore(
    database: &Path,
    snapshots: &Snapshots,
    placement: Placement,
    cluster: &Cluster,
) -> Result<(), ServerError> {
    let failed = |e: starling_cluster::ClusterError| ServerError::Cluster(format!("restoring a snapshot: {e}"));
    let (name, covered) = match placement {
        Placement::Whole => (SNAPSHOT.to_string(), snapshots.covers(SNAPSHOT).await.map_err(failed)?),
        // Spread, the freshest node's snapshot that the stream goes on from.
        Placement::Spread => {
            let truncated = cluster.truncated().await.map_err(failed)?;
            let usable =
                |covered: &Covered| truncated.iter().enumerate().all(|(p, t)| covered.of(p as Partition) >= *t);
            let freshest = snapshots
                .of_nodes()
                .await
                .map_err(failed)?
                .into_iter()
                .filter(|s| usable(&s.covered))
                .max_by_key(|s| s.covered.last());
            match freshest {
                Some(s) => (s.name, Some(s.covered)),
                None => (String::new(), None),
            }
        }
    };
    let Some(covered) = covered else { return Ok(()) };
    let path = database.to_path_buf();
    let local = tokio::task::spawn_blocking(move || -> Result<Covered, ServerError> {
        if !path.exists() {
            return Ok(Covered::default());
        }
        let conn = starling_store::open(&path)?;
        Ok(Covered(starling_store::log_positions(&conn)?))
    })
    .await
    .map_err(|e| ServerError::Cluster(e.to_string()))??;
    if covered.0.iter().all(|&(partition, position)| position <= local.of(partition)) {
        return Ok(());
    }
    let (covers, local) = (covered.last(), local.last());
    let started = std::time::Instant::now();
    let restoring = database.with_extension("restoring");
    snapshots.fetch(&name, &restoring).await.map_err(failed)?;
    remove_database(database)?;
    std::fs::rename(&restoring, database)?;
    tracing::info!(
        covers,
        local,
        elapsed_ms = started.elapsed().as_millis() as u64,
        snapshot = %name,
        "state restored from the latest snapshot; the log after it is applied next"
    );
    Ok(())
}

/// Removes the SQLite file and its WAL and shared-memory files.
fn remove_database(database: &Path) -> std::io::Result<()> {
    for suffix in ["", "-wal", "-shm"] {
        let mut name = database.as_os_str().to_os_string();
        name.push(suffix);
        match std::fs::remove_file(&name) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
    }
    Ok(())
}

/// Placed whole: stores a snapshot of the database every `every`, for the next owner to start
/// from, then has the stream forget the records it includes.
async fn take_snapshots(
    database: PathBuf,
    snapshots: Arc<Snapshots>,
    stream: Arc<EventStream>,
    ownership: Arc<Ownership>,
    every: Duration,
) {
    let mut last = 0;
    loop {
        tokio::time::sleep(every).await;
        if ownership.held().len() != PARTITIONS as usize {
            continue;
        }
        let started = std::time::Instant::now();
        let Some((covered, into)) = snapshot_of(&database).await else { continue };
        // A former owner (woken from a pause) must not replace a newer owner's snapshot.
        let covers = covered.last();
        let newer = snapshots.covers(SNAPSHOT).await.ok().flatten().is_some_and(|stored| stored.last() >= covers);
        if covers > last && !newer {
            let all: Vec<Partition> = (0..PARTITIONS).collect();
            match snapshots.put(SNAPSHOT, &into, &covered, &all).await {
                Ok(()) => {
                    last = covers;
                    tracing::info!(covers, elapsed_ms = started.elapsed().as_millis() as u64, "snapshot stored");
                    forget_snapshotted(&stream, &covered).await;
                }
                Err(e) => tracing::warn!("storing a snapshot: {e}"),
            }
        }
        let _ = std::fs::remove_file(&into);
    }
}

/// A consistent copy of the database, next to it, and the log positions it includes.
pub(super) async fn snapshot_of(database: &Path) -> Option<(Covered, PathBuf)> {
    let (from, into) = (database.to_path_buf(), database.with_extension("snapshot"));
    let copy = into.clone();
    let taken = tokio::task::spawn_blocking(move || {
        let _ = std::fs::remove_file(&copy);
        starling_store::snapshot(&from, &copy)
    })
    .await;
    match taken {
        Ok(Ok(positions)) => Some((Covered(positions), into)),
        Ok(Err(e)) => {
            tracing::warn!("taking a snapshot: {e}");
            None
        }
        Err(e) => {
            tracing::warn!("taking a snapshot: {e}");
            None
        }
    }
}

/// Spread, every node follows the others' partitions at its own pace (one paused, or catching
/// up after the stream's leader died, is behind the snapshot's copy): the stream forgets each
/// partition's records before the position both the snapshot and every node's database hold
/// (as their heartbeats say; a node whose heartbeat lapsed is waited for, at its last word, for
/// `wait_for_absent`: back within it, it follows on from where it was, back after it, it finds
/// records gone and stops, and its next start restores the latest snapshot), and records where,
/// first, for readers to find out whether they missed records. `forgotten` is where it last
/// did, not done again.
pub(super) async fn forget_held_everywhere(
    stream: &EventStream,
    cluster: &Cluster,
    covered: &Covered,
    wait_for_absent: Duration,
    forgotten: &mut Vec<Position>,
) {
    let held = match cluster.held_back(wait_for_absent).await {
        Ok(Some(held)) => held,
        Ok(None) => {
            tracing::debug!("the stream is kept whole: a node has not said what its database holds yet");
            return;
        }
        Err(e) => {
            tracing::warn!("the stream is kept whole: the nodes' heartbeats cannot be read: {e}");
            return;
        }
    };
    let before: Vec<Position> =
        (0..PARTITIONS).map(|p| covered.of(p).min(held.get(p as usize).copied().unwrap_or(0))).collect();
    if before == *forgotten {
        return;
    }
    if let Err(e) = cluster.record_truncation(&before).await {
        tracing::warn!("the stream is kept whole: where it is truncated cannot be recorded: {e}");
        return;
    }
    let forgetting = (0..PARTITIONS).zip(before.iter().copied()).filter(|(_, position)| *position > 0).collect();
    if forget_snapshotted(stream, &Covered(forgetting)).await {
        *forgotten = before;
    }
}

/// Has the stream forget each partition's records before the position a stored snapshot
/// includes: a new owner starts from the snapshot, so the stream's size follows the records
/// written since, not every record ever written.
async fn forget_snapshotted(stream: &EventStream, covered: &Covered) -> bool {
    let started = std::time::Instant::now();
    let mut forgotten = 0;
    for &(partition, position) in &covered.0 {
        match stream.forget_before(partition, position).await {
            Ok(n) => forgotten += n,
            Err(e) => {
                // Kept until the next snapshot: nothing is lost by keeping records longer.
                tracing::warn!(partition, "the stream did not forget records a snapshot includes: {e}");
                return false;
            }
        }
    }
    let elapsed_ms = started.elapsed().as_millis() as u64;
    // The point also moves in partitions that had nothing left to forget.
    if forgotten > 0 {
        tracing::info!(records = forgotten, elapsed_ms, "stream truncated before the snapshot");
    } else {
        tracing::debug!(elapsed_ms, "the stream's truncation point moved; no record to forget");
    }
    true
}

/// Keeps this node's leases, a few rounds per lease period, and publishes what it sees.
async fn run_rounds(
    ownership: Arc<Ownership>,
    stream: Arc<EventStream>,
    log: Arc<JetStreamLog>,
    lease: Duration,
    view: watch::Sender<View>,
) {
    let cluster = ownership.cluster();
    let mut overtaken = false;
    loop {
        match ownership.tick().await {
            Ok(changes) if !changes.lost.is_empty() => {
                tracing::warn!(partitions = changes.lost.len(), "partitions taken by another node");
                overtaken = true;
            }
            Ok(_) => {}
            Err(e) => tracing::warn!("ownership round: {e}"),
        }
        let held = ownership.held().len();
        let nodes = ownership.live_peers().unwrap_or_default();
        // Placed whole, the owner of partition 0 owns them all.
        let owner = match ownership.owners() {
            Some(owners) => owners.get(&0).map(|o| (o.node.clone(), nodes.get(&o.node).and_then(|p| p.url.clone()))),
            None => view.borrow().owner.clone(),
        };
        let shared_config = match cluster.shared_config().await {
            Ok(shared) => shared.map(|c| c.version),
            Err(_) => view.borrow().shared_config,
        };
        // Standing by, a node would start with the published configuration.
        if held == 0
            && let Some(version) = shared_config
        {
            cluster.set_running_config(version);
        }
        let stream_leader = stream.leader().await.unwrap_or_default();
        overtaken |= log.overtaken();
        let next = View {
            holds_all: held == PARTITIONS as usize,
            overtaken,
            owner,
            nodes: nodes.into_iter().collect(),
            shared_config,
            held,
            stream_leader,
        };
        view.send_if_modified(|v| {
            let changed = *v != next;
            *v = next;
            changed
        });
        tokio::time::sleep(lease / 4).await;
    }
}

/// `GET /v1/cluster`: this node, the owner, the live nodes.
async fn status(State(front): State<Arc<Front>>) -> Response {
    let view = front.view.borrow().clone();
    let serving = front.engine.read().expect("engine").is_some();
    let intake_held = front.taking.held().await;
    let body = serde_json::json!({
        "node": front.node,
        "placement": "whole",
        "serving": serving,
        "partitions_held": view.held,
        "owner": view.owner.as_ref().map(|(n, _)| n),
        "stream_leader": view.stream_leader,
        "config_version": view.shared_config,
        // Events taken in while no node served, not yet applied (null: the intake is unreachable).
        "intake_held": intake_held,
        // A standby's copy of the state, as it follows the stream (null on the owner).
        "following": front.following.to_json(),
        "nodes": view.nodes.iter().map(|(n, p)| serde_json::json!({"node": n, "url": p.url, "config_version": p.config_version})).collect::<Vec<_>>(),
    });
    axum::Json(body).into_response()
}

/// Any other request: to this node's engine if it runs, else to the owner's.
async fn answer(State(front): State<Arc<Front>>, request: Request) -> Response {
    let engine = front.engine.read().expect("engine").clone();
    if let Some(engine) = engine {
        // Leases about to lapse unrenewed while the round that would renew them is stuck (the
        // servers do not answer this node): once they lapse another node may serve, and this
        // one cannot tell. Reads are answered from the database the engine writes, saying so,
        // until a round renews them; writes wait for that in the log (or are refused).
        if crate::copy::answers(&request)
            && front.ownership.round_stuck()
            && front.ownership.held().len() < PARTITIONS as usize
        {
            let why = "this node's leases are lapsing unrenewed (the cluster's servers do not answer it)";
            return with_node(&front, front.copy.answer(request, why).await);
        }
        return to_engine(&front, engine, request).await;
    }
    let owner = front.view.borrow().owner.clone();
    let owner_url = match owner {
        Some((node, Some(url))) if node != front.node && !request.headers().contains_key(FORWARDED_HEADER) => Some(url),
        _ => None,
    };
    if crate::intake::takes(&request) {
        return forward_or_take_in(&front, owner_url.as_deref(), request).await;
    }
    let reads_copy = crate::copy::answers(&request);
    let Some(url) = owner_url else {
        let why = "no node of the cluster serves yet: the partitions' owner is being chosen";
        return if reads_copy { with_node(&front, front.copy.answer(request, why).await) } else { unavailable(why) };
    };
    if !reads_copy {
        return forward(&front, &url, request).await.unwrap_or_else(|e| owner_unreachable(&url, e));
    }
    // A read has no body: it can be sent again to the copy if the owner cannot be reached.
    let (parts, _) = request.into_parts();
    let again = Request::from_parts(parts.clone(), axum::body::Body::empty());
    match forward(&front, &url, Request::from_parts(parts, axum::body::Body::empty())).await {
        Ok(response) => response,
        Err(e) if e.is_connect() => {
            tracing::debug!("the owner at {url} cannot be reached ({e}); reading this node's copy");
            let why = "the partitions' owner cannot be reached (it died, or a failover is under way)";
            with_node(&front, front.copy.answer(again, why).await)
        }
        Err(e) => owner_unreachable(&url, e),
    }
}

/// Events posted to a node whose engine does not run (to `/v1/events` or in a wire format): forwarded
/// to the owner; taken in when no owner can take them (none is known, or its node cannot be reached:
/// it died and its lease has not lapsed yet), as a failover must not stop ingestion.
async fn forward_or_take_in(front: &Front, owner_url: Option<&str>, request: Request) -> Response {
    let (parts, body) = match crate::intake::body(request).await {
        Ok(read) => read,
        Err(refused) => return refused,
    };
    if let Some(url) = owner_url {
        let request = Request::from_parts(parts.clone(), axum::body::Body::from(body.clone()));
        match forward(front, url, request).await {
            Ok(response) => return response,
            // Sent, the owner may have applied it: only the client can tell by sending it again.
            Err(e) if !e.is_connect() => return owner_unreachable(url, e),
            Err(e) => tracing::debug!("the owner at {url} cannot be reached ({e}); taking events in"),
        }
    }
    // Taken in, or (the engine started meanwhile) sent to the engine: a node that starts its
    // engine waits for the requests it is taking in, so that it applies them before whatever
    // comes next.
    let _taking = front.taking_in.read().await;
    let engine = front.engine.read().expect("engine").clone();
    if let Some(engine) = engine {
        return to_engine(front, engine, Request::from_parts(parts, axum::body::Body::from(body))).await;
    }
    with_node(front, front.taking.take_in(parts, body).await)
}

/// Has this node's engine answer `request`.
async fn to_engine(front: &Front, engine: axum::Router, request: Request) -> Response {
    let request = with_client_address(front, request);
    let mut response = tower::ServiceExt::oneshot(engine, request).await.unwrap_or_else(|e| match e {});
    response.headers_mut().insert(HeaderName::from_static(ANSWERED_FROM_HEADER), HeaderValue::from_static("engine"));
    with_node(front, response)
}

/// Names this node on its answer.
fn with_node(front: &Front, mut response: Response) -> Response {
    if let Ok(node) = HeaderValue::from_str(&front.node) {
        response.headers_mut().insert(HeaderName::from_static(NODE_HEADER), node);
    }
    response
}

fn owner_unreachable(base: &str, e: hyper_util::client::legacy::Error) -> Response {
    tracing::warn!("forwarding to the owner at {base}: {e}");
    unavailable("the partitions' owner could not be reached; retry")
}

async fn forward(front: &Front, base: &str, request: Request) -> Result<Response, hyper_util::client::legacy::Error> {
    forward_to(&front.node, &front.client, base, request).await
}

/// Sends `request` to the node at `base` as node `node` forwarding it.
async fn forward_to(
    node: &str,
    client: &hyper_util::client::legacy::Client<hyper_util::client::legacy::connect::HttpConnector, axum::body::Body>,
    base: &str,
    request: Request,
) -> Result<Response, hyper_util::client::legacy::Error> {
    let (mut parts, body) = request.into_parts();
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let Ok(uri) = format!("{base}{path}").parse() else { return Ok(unavailable("the owner's URL is not usable")) };
    parts.uri = uri;
    parts.headers.remove(header::HOST);
    if let Ok(node) = HeaderValue::from_str(node) {
        parts.headers.insert(HeaderName::from_static(FORWARDED_HEADER), node);
    }
    match parts.extensions.get::<ConnectInfo<SocketAddr>>() {
        Some(ConnectInfo(client)) => {
            let address = HeaderValue::from_str(&client.ip().to_string()).expect("an address is a header value");
            parts.headers.insert(HeaderName::from_static(CLIENT_HEADER), address);
        }
        None => {
            parts.headers.remove(CLIENT_HEADER);
        }
    }
    let response = client.request(Request::from_parts(parts, body)).await?;
    Ok(response.map(axum::body::Body::new))
}

/// A request forwarded by a node of the cluster (its address is that of a live node's URL) is
/// seen by the engine as coming from the client the node forwarded for; from anyone else, the
/// client header is dropped. Nodes are recognised by the IP address in their URLs.
fn with_client_address(front: &Front, mut request: Request) -> Request {
    let claimed = request.headers_mut().remove(CLIENT_HEADER);
    let Some(&ConnectInfo(peer)) = request.extensions().get::<ConnectInfo<SocketAddr>>() else { return request };
    let url_address = |url: &str| url.parse::<axum::http::Uri>().ok()?.host()?.parse::<IpAddr>().ok();
    let from_node =
        front.view.borrow().nodes.iter().any(|(_, p)| p.url.as_deref().and_then(url_address) == Some(peer.ip()));
    let client = claimed.and_then(|value| value.to_str().ok()?.parse::<IpAddr>().ok());
    if let Some(client) = client
        && from_node
    {
        request.extensions_mut().insert(ConnectInfo(SocketAddr::new(client, 0)));
    }
    request
}

fn unavailable(message: &str) -> Response {
    let mut response =
        (StatusCode::SERVICE_UNAVAILABLE, axum::Json(serde_json::json!({ "error": message }))).into_response();
    response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    response
}

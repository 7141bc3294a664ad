//! Starling's engine and HTTP API: ingestion → identity → enrichment → audiences → outbox →
//! delivery, recorded in an event log and materialized in one SQLite file.

pub mod api;
pub mod auth;
mod copy;
pub mod delivery;
pub mod follow;
pub mod http;
pub mod import;
mod intake;
pub mod live;
pub mod logging;
pub mod node;
pub mod origin;
pub mod owned;
pub mod personalize;
pub mod pipeline;
pub mod reconfigure;
pub mod registry;
pub mod telemetry;
pub mod tls;
pub mod wire;

use starling_core::model::EventLogKind;
use starling_core::{Diagnostic, Model};
use starling_log::{EventLog, MemoryLog, SegmentLog};
use starling_runtime::{HostOptions, Kind, PluginHost};
use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::watch;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Store(#[from] starling_store::StoreError),
    #[error(transparent)]
    Plugin(#[from] starling_runtime::PluginError),
    #[error("configuration refers to plugins that are not usable:\n{}", .0.iter().map(|d| format!("  {d}")).collect::<Vec<_>>().join("\n"))]
    Plugins(Vec<Diagnostic>),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Log(#[from] starling_log::LogError),
    #[error("replaying the event log: {0}")]
    Replay(String),
    #[error("cluster: {0}")]
    Cluster(String),
    #[error(
        "this node lost its partitions' leases to another node (it was paused or cut off for longer than a lease); it stopped, and may be started again to stand by"
    )]
    Fenced,
    #[error(
        "the cluster's stream forgot records this node had not applied (it was paused or cut off for longer than the stream waits for a node); it stopped, and its next start restores the latest snapshot"
    )]
    Forgotten,
    #[error(
        "refusing to listen on {0} without an admin token: set server.admin_token or STARLING_ADMIN_TOKEN, or listen on a loopback address"
    )]
    Exposed(std::net::SocketAddr),
}

#[derive(Clone)]
pub struct Options {
    pub model: Model,
    pub database: PathBuf,
    pub plugins: Option<PathBuf>,
    /// Run on a clock that `POST /v1/test/clock` can move forward (for tests of visit ends and
    /// time-relative audiences).
    pub test_clock: bool,
    /// Overrides `server.admin_token` (from `STARLING_ADMIN_TOKEN`).
    pub admin_token: Option<String>,
    /// The keys of `server.trusted_keys`, read: every plugin loaded must be signed by one.
    pub trusted_keys: Option<Vec<String>>,
    /// An event log to record in instead of the one `server.event_log` names.
    pub event_log: Option<Arc<dyn EventLog>>,
    /// The file `model` was read from: SIGHUP reads it again and applies it.
    pub config_path: Option<PathBuf>,
    /// Where the delivery lanes keep how actions ended, for a cluster node to pass on.
    pub outcomes: Option<delivery::Outcomes>,
    /// Set on a node of a cluster whose partitions are spread over the nodes.
    pub spread: Option<Spread>,
}

/// What a node of a spread cluster runs with (see [`owned`]): the partitions it owns, and where
/// events for the others' profiles go.
#[derive(Clone)]
pub struct Spread {
    pub owned: Arc<owned::Owned>,
    pub elsewhere: Arc<dyn owned::Elsewhere>,
}

/// Milliseconds since the Unix epoch.
pub fn system_clock() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

static CLOCK_OFFSET_MS: AtomicI64 = AtomicI64::new(0);

/// The system clock plus however far [`advance_clock`] has moved it.
pub fn adjustable_clock() -> i64 {
    system_clock() + CLOCK_OFFSET_MS.load(Ordering::SeqCst)
}

/// Furthest [`adjustable_clock`] may be moved ahead of the system clock: a century, far beyond
/// any retention or delay, and far from the overflow of a millisecond count.
const MAX_CLOCK_OFFSET_MS: i64 = 100 * 366 * 86_400_000;

/// Moves [`adjustable_clock`] forward by `ms`; returns the new time, or why it was not moved.
pub fn advance_clock(ms: i64) -> Result<i64, String> {
    CLOCK_OFFSET_MS
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |offset| {
            offset.checked_add(ms).filter(|o| (0..=MAX_CLOCK_OFFSET_MS).contains(o))
        })
        .map_err(|offset| {
            format!("the clock may be moved at most 100 years ahead in all; it is {offset} ms ahead already")
        })?;
    Ok(adjustable_clock())
}

/// How often the wake-up table is polled.
const WAKEUP_POLL: std::time::Duration = std::time::Duration::from_millis(200);
/// Most profiles woken per pipeline submission.
const WAKEUP_BATCH: usize = 512;
/// How long sampled audience sizes are kept.
const SIZE_HISTORY_KEEP_MS: i64 = 90 * 24 * 3_600_000;

/// Every action and enricher of `model` must name a loaded plugin of the right kind.
pub fn check_plugins(model: &Model, plugins: &PluginHost) -> Vec<Diagnostic> {
    check_plugins_in(model, |name| plugins.get(name))
}

/// As [`check_plugins`], with plugins looked up by `get` (loaded ones, and ones about to be).
pub fn check_plugins_in(
    model: &Model,
    get: impl Fn(&str) -> Result<Arc<starling_runtime::Plugin>, starling_runtime::PluginError>,
) -> Vec<Diagnostic> {
    let mut problems = Vec::new();
    let mut check = |name: &str, span: &std::ops::Range<usize>, kind: Kind| match get(name) {
        Ok(p) if p.manifest.kind == kind => {}
        Err(starling_runtime::PluginError::NotLoaded(_)) => {
            problems.push(model.diagnostic(span, format!("no plugin named `{name}` is installed")))
        }
        Ok(p) => problems.push(
            model.diagnostic(span, format!("plugin `{name}` is a {}, not a {}", p.manifest.kind.name(), kind.name())),
        ),
        Err(e) => problems.push(model.diagnostic(span, e.to_string())),
    };
    for action in &model.actions {
        check(&action.connector, &action.connector_span, Kind::Connector);
    }
    for enricher in &model.enrichers {
        check(&enricher.plugin, &enricher.span, Kind::Enricher);
    }
    // A 0.1.0 enricher has no visit end to be called with: it would never run for one.
    for enricher in &model.enrichers {
        if enricher.when.contains(&starling_core::model::When::VisitEnded)
            && let Ok(plugin) = get(&enricher.plugin)
            && plugin.manifest.kind == Kind::Enricher
            && plugin.manifest.api() == starling_runtime::Api::V0_1
        {
            problems.push(model.diagnostic(
                &enricher.span,
                format!(
                    "plugin `{}` implements `{}`, whose enrichers are not called at a visit's end: \
                     rebuild it against starling:plugin@0.2.0, or remove `visit_ended` from `when`",
                    enricher.plugin, plugin.manifest.world
                ),
            ));
        }
    }
    problems
}

/// The plugin host a server on `model` runs, its compiled components cached under `blobs`.
fn plugin_host(
    model: &Model,
    blobs: &std::path::Path,
    trusted_keys: &Option<Vec<String>>,
) -> Result<PluginHost, ServerError> {
    Ok(PluginHost::with_options(HostOptions {
        cache_dir: Some(blobs.join("cache")),
        failure_limit: model.server.plugin_failure_limit,
        max_memory_mib: model.server.plugin_max_memory_mib,
        max_timeout_ms: model.server.plugin_max_timeout_ms,
        trusted_keys: trusted_keys.clone(),
        call_threads: model.server.plugin_threads,
    })?)
}

/// How many pipeline workers apply the partitions: `server.partitions`, or one per core.
fn workers(model: &Model) -> usize {
    model.server.partitions.unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get())).max(1)
}

/// A started engine: ingestion workers and delivery lanes are running; call [`App::serve`].
pub struct App {
    pub(crate) state: api::AppState,
    workers: Vec<std::thread::JoinHandle<()>>,
    /// Tasks that feed the pipeline (wake-ups); stopped before the workers.
    feeders: Vec<tokio::task::JoinHandle<()>>,
    stop_feeders: watch::Sender<bool>,
    lanes: Vec<tokio::task::JoinHandle<()>>,
    stop_delivery: watch::Sender<bool>,
    pub plugins: Arc<PluginHost>,
    database: std::path::PathBuf,
    taker: Option<owned::Taker>,
}

/// How long a stop waits for the deliveries under way; what is cut off stays pending in the
/// outbox and is delivered after the restart, under the same idempotency key.
const STOP_DELIVERIES: std::time::Duration = std::time::Duration::from_secs(2);

impl App {
    pub async fn start(options: Options) -> Result<App, ServerError> {
        let clock = if options.test_clock { adjustable_clock } else { system_clock };
        Self::start_with_clock(options, clock).await
    }

    pub async fn start_with_clock(options: Options, clock: fn() -> i64) -> Result<App, ServerError> {
        let test_clock = options.test_clock;
        let model = Arc::new(options.model);
        let database = options.database.clone();
        check_database(&database, model.server.check_at_start).await?;
        let blobs = starling_store::blob_dir(&database);
        let loading = std::time::Instant::now();
        let plugins = Arc::new(plugin_host(&model, &blobs, &options.trusted_keys)?);
        if let Some(dir) = &options.plugins {
            for plugin in plugins.load_dir(dir, &model.plugin_config)? {
                tracing::info!(plugin = %plugin.manifest.name, kind = plugin.manifest.kind.name(), sha256 = %plugin.sha256, "plugin loaded");
            }
        }
        let config = Arc::new(live::Live::new(model.clone(), options.admin_token.clone()));
        let mut registry =
            registry::Registry::new(plugins.clone(), config.clone(), starling_store::open(&database)?, blobs, clock);
        registry.sync()?;
        tracing::info!(
            plugins = plugins.names().len(),
            elapsed_ms = loading.elapsed().as_millis() as u64,
            "plugins ready"
        );
        let problems = check_plugins(&model, &plugins);
        if !problems.is_empty() {
            return Err(ServerError::Plugins(problems));
        }

        let read = Arc::new(Mutex::new(starling_store::open(&database)?));

        let telemetry = Arc::new(telemetry::Telemetry::new());
        let (stop_delivery, stopped) = watch::channel(false);
        let delivery = delivery::Lanes::new(plugins.clone(), database.clone(), clock, telemetry.clone());
        let (owned, elsewhere) = match &options.spread {
            Some(spread) => (spread.owned.clone(), Some(spread.elsewhere.clone())),
            None => (Arc::new(owned::Owned::all()), None),
        };
        let delivery = delivery.owning(owned.clone());
        let delivery = Arc::new(match options.outcomes {
            Some(outcomes) => delivery.reporting_to(outcomes),
            None => delivery,
        });
        delivery.follow(&model.actions)?;
        let mut lanes = vec![tokio::spawn(registry.run(stopped.clone()))];

        let log: Arc<dyn EventLog> = match (options.event_log, model.server.event_log) {
            (Some(log), _) => log,
            (None, EventLogKind::File) => Arc::new(SegmentLog::open(&starling_store::log_dir(&database))?),
            (None, EventLogKind::Memory) => {
                tracing::warn!("server.event_log = \"memory\": acknowledged events do not survive a restart");
                Arc::new(MemoryLog::new())
            }
        };

        let shared = pipeline::Shared {
            config: config.clone(),
            plugins: plugins.clone(),
            runtime: tokio::runtime::Handle::current(),
            lanes: delivery.clone(),
            clock,
            telemetry: telemetry.clone(),
            log: log.clone(),
            owned: owned.clone(),
            elsewhere,
        };
        let (ingest, workers) = pipeline::start(shared, workers(&model), model.server.ingest_queue.max(1), &database)?;

        // Checkpoints run during the replay too: a long one would otherwise grow the WAL, and
        // every commit into new WAL pages costs more than one into pages a checkpoint freed.
        // Nothing is truncated from the log before the replay is written.
        lanes.push(tokio::spawn(run_checkpoints(
            starling_store::open_relaxed(&database)?,
            ingest.log_state(),
            config.clone(),
            telemetry.clone(),
            clock,
            stopped.clone(),
        )));
        let replaying = std::time::Instant::now();
        let replayed = ingest.replay().await.map_err(|e| ServerError::Replay(e.to_string()))?;
        telemetry.metrics.log_records_replayed.inc_by(replayed as u64);
        tracing::info!(
            records = replayed,
            elapsed_ms = replaying.elapsed().as_millis() as u64,
            "event log replayed after the stored state"
        );
        let ingest = Arc::new(ingest);
        lanes.push(tokio::spawn(sample_audience_sizes(
            config.clone(),
            starling_store::open(&database)?,
            clock,
            stopped.clone(),
        )));
        let (stop_feeders, feeders_stopped) = watch::channel(false);
        let mut feeders = vec![tokio::spawn(run_wakeups(
            ingest.clone(),
            starling_store::open(&database)?,
            clock,
            feeders_stopped.clone(),
        ))];
        let taker = options.spread.as_ref().map(|_| {
            let (followed, through) = watch::channel(0);
            let positions: owned::Followed =
                Arc::new(tokio::sync::Mutex::new(ingest.stored_positions().into_iter().collect()));
            let others = owned::follow_others(
                ingest.clone(),
                log,
                owned.clone(),
                positions.clone(),
                followed,
                feeders_stopped.clone(),
            );
            feeders.push(tokio::spawn(others));
            owned::Taker { ingest: Arc::downgrade(&ingest), through, positions }
        });
        feeders.push(tokio::spawn(run_retention(
            ingest.clone(),
            starling_store::open(&database)?,
            config.clone(),
            clock,
            feeders_stopped.clone(),
        )));
        let state = api::AppState {
            ingest,
            read,
            config,
            clock,
            test_clock,
            telemetry,
            hosts: Arc::new(origin::Hosts::new(&model.server.hostnames)),
            plugins: plugins.clone(),
            queue_capacity: model.server.ingest_queue.max(1),
            drain: http::Drain::default(),
            database: database.clone(),
            lanes: delivery,
            plugin_dir: options.plugins.clone(),
            config_path: options.config_path.clone(),
            personalization: Arc::default(),
        };
        // The configuration the database was last served with may differ from this one: the
        // evolution rules apply as they do to a change made live.
        reconfigure::at_start(&state).await?;
        if let Some(path) = options.config_path.clone() {
            feeders.push(tokio::spawn(reconfigure::reload_on_hangup(state.clone(), path, feeders_stopped)));
        }

        Ok(App {
            state,
            workers,
            feeders,
            stop_feeders,
            lanes,
            stop_delivery,
            database: database.clone(),
            plugins,
            taker,
        })
    }

    /// On a node of a spread cluster: what takes the events other nodes hand this one.
    pub fn taker(&self) -> Option<owned::Taker> {
        self.taker.clone()
    }

    pub fn router(&self) -> axum::Router {
        api::router(self.state.clone())
    }

    fn http_limits(&self) -> http::Limits {
        let model = self.state.config.model();
        http::Limits {
            max_connections: model.server.max_connections.max(1),
            header_timeout: std::time::Duration::from_millis(model.header_timeout_ms as u64),
        }
    }

    /// Checks and records the address served: off loopback, only with an admin token (without
    /// one, anyone who can reach the port can read and delete profiles); the address is out of
    /// every plugin's reach, and a name `Host` headers may carry.
    pub(crate) fn listening_on(&self, addr: std::net::SocketAddr) -> Result<(), ServerError> {
        if !addr.ip().is_loopback() && !self.state.config.keys().admin_required() {
            return Err(ServerError::Exposed(addr));
        }
        self.state.plugins.refuse_listener(addr);
        self.state.hosts.listening_on(addr);
        Ok(())
    }

    /// Serves HTTP until `shutdown` resolves, then drains: in-flight requests finish, queued
    /// events are committed, and delivery stops after the calls under way.
    pub async fn serve(
        self,
        listener: tokio::net::TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), ServerError> {
        self.listening_on(listener.local_addr()?)?;
        http::serve(listener, self.router(), self.http_limits(), self.state.drain.clone(), shutdown).await;
        self.stop().await;
        Ok(())
    }

    /// As [`App::serve`], over HTTPS.
    pub async fn serve_tls(
        self,
        listener: tls::TlsListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), ServerError> {
        self.listening_on(axum::serve::Listener::local_addr(&listener)?)?;
        http::serve(listener, self.router(), self.http_limits(), self.state.drain.clone(), shutdown).await;
        self.stop().await;
        Ok(())
    }

    /// Stops the ingestion workers (after their queued work, which they write to SQLite) and
    /// the delivery lanes, and copies the WAL back into the database, so that the next start
    /// has nothing to replay.
    pub async fn stop(self) {
        let App { state, workers, feeders, stop_feeders, mut lanes, stop_delivery, database, .. } = self;
        let _ = stop_feeders.send(true);
        for feeder in feeders {
            let _ = feeder.await;
        }
        let delivery = state.lanes.clone();
        drop(state);
        for worker in workers {
            let _ = tokio::task::spawn_blocking(move || worker.join()).await;
        }
        let _ = stop_delivery.send(true);
        lanes.extend(delivery.stop());
        let deadline = tokio::time::Instant::now() + STOP_DELIVERIES;
        for mut lane in lanes {
            if tokio::time::timeout_at(deadline, &mut lane).await.is_err() {
                lane.abort();
            }
        }
        let checkpoint = tokio::task::spawn_blocking(move || {
            let conn = starling_store::open(&database)?;
            starling_store::truncate_wal(&conn)
        });
        match checkpoint.await {
            Ok(Ok(true)) => tracing::info!("database checkpointed"),
            Ok(Ok(false)) => tracing::info!("database checkpoint put off: a reader is still open"),
            Ok(Err(e)) => tracing::warn!("final checkpoint: {e}"),
            Err(e) => tracing::warn!("final checkpoint: {e}"),
        }
    }
}

/// Runs SQLite's consistency check on an existing database before anything reads or writes it:
/// a damaged page stops the start with an error naming the file and the check, instead of
/// serving what it holds.
async fn check_database(
    database: &std::path::Path,
    level: starling_core::model::StartCheck,
) -> Result<(), ServerError> {
    use starling_core::model::StartCheck;
    let level = match level {
        StartCheck::Off => return Ok(()),
        StartCheck::Quick => starling_store::Integrity::Quick,
        StartCheck::Full => starling_store::Integrity::Full,
    };
    if !database.exists() {
        return Ok(());
    }
    let started = std::time::Instant::now();
    let path = database.to_path_buf();
    tokio::task::spawn_blocking(move || starling_store::check_integrity(&path, level, 10))
        .await
        .map_err(|e| ServerError::Io(std::io::Error::other(e.to_string())))??;
    tracing::info!(check = ?level, elapsed_ms = started.elapsed().as_millis() as u64, "database checked");
    Ok(())
}

/// Hands profiles whose wake-up time has come to the pipeline, which ends their visits and
/// re-evaluates their time-relative audiences. Wake-ups live in the database, so they survive
/// restarts.
async fn run_wakeups(
    ingest: Arc<pipeline::Ingest>,
    conn: rusqlite::Connection,
    clock: fn() -> i64,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(WAKEUP_POLL) => {}
            _ = stop.changed() => return,
        }
        loop {
            let due = match starling_store::due_wakeups(&conn, clock(), WAKEUP_BATCH) {
                Ok(due) => due,
                Err(e) => {
                    tracing::warn!("reading wake-ups: {e}");
                    break;
                }
            };
            let full = due.len() == WAKEUP_BATCH;
            if due.is_empty() {
                break;
            }
            match ingest.wake(due).await {
                Ok(_) if full => continue,
                Ok(_) | Err(pipeline::IngestError::Busy) => break,
                Err(pipeline::IngestError::Closed) => return,
                Err(e) => {
                    tracing::warn!("wake-ups not applied: {e}");
                    break;
                }
            }
        }
    }
}

/// How often the WAL is copied back into the database.
const CHECKPOINT_EVERY: std::time::Duration = std::time::Duration::from_millis(100);
/// How often expired history and finished actions are pruned, and how many rows at a time.
const PRUNE_EVERY_MS: i64 = 1_000;
const PRUNE_CHUNK: usize = 2_000;
/// Longest a prune pass goes on deleting history chunk after chunk.
const PRUNE_BUDGET: std::time::Duration = std::time::Duration::from_millis(250);

/// Checkpoints the WAL in the background, so that no ingestion commit pays for it, then lets
/// the event log forget what the checkpoint made durable; prunes history and finished actions
/// past their retention.
async fn run_checkpoints(
    conn: rusqlite::Connection,
    log: pipeline::LogState,
    config: Arc<live::Live>,
    telemetry: Arc<telemetry::Telemetry>,
    clock: fn() -> i64,
    mut stop: watch::Receiver<bool>,
) {
    let conn = Arc::new(Mutex::new(conn));
    let mut last_prune_ms = 0;
    // Where the passes through the history and the outbox go on.
    let cursors = Arc::new(Mutex::new((0i64, 0i64)));
    let wal_holds_deleted = Arc::new(AtomicBool::new(false));
    loop {
        tokio::select! {
            _ = tokio::time::sleep(CHECKPOINT_EVERY) => {}
            _ = stop.changed() => return,
        }
        let (conn, state, telemetry, cursors) = (conn.clone(), log.clone(), telemetry.clone(), cursors.clone());
        let wal_holds_deleted = wal_holds_deleted.clone();
        let now = clock();
        let history = config.model().history;
        let prune = now - last_prune_ms >= PRUNE_EVERY_MS;
        if prune {
            last_prune_ms = now;
        }
        let done = tokio::task::spawn_blocking(move || -> Result<(), ServerError> {
            let conn = conn.lock().expect("checkpoint");
            let log = &state.log;
            // Read before the checkpoint: every record before it is in a commit the checkpoint
            // syncs (SQLite syncs the WAL before copying it back).
            let safe = state.truncation_point();
            let stored = starling_store::log_positions(&conn)?;
            let sealing = state.take_deletion();
            starling_store::checkpoint(&conn)?;
            state.checkpointed(stored);
            if sealing {
                log.seal()?;
                wal_holds_deleted.store(true, Ordering::SeqCst);
            }
            // A deletion's rows are zeroed in the database file (secure_delete); the WAL still
            // holds the pages as they were before it, until it is truncated.
            if wal_holds_deleted.load(Ordering::SeqCst) && starling_store::truncate_wal(&conn)? {
                wal_holds_deleted.store(false, Ordering::SeqCst);
            }
            let freed = log.truncate_before(safe)?;
            telemetry.metrics.log_bytes_truncated.inc_by(freed);
            telemetry.metrics.log_bytes.set(log.size_bytes() as i64);
            if prune {
                starling_store::prune_handoffs(&conn, safe)?;
                let mut cursors = cursors.lock().expect("prune cursors");
                // History is written in the order it is received: while whole chunks are past
                // their retention, go on (within a budget, so that pruning keeps up with any
                // ingestion rate); the first chunk with a row to keep means the rest is
                // recent, and the next pass starts from the oldest row again.
                let pruning = std::time::Instant::now();
                let mut events = 0;
                loop {
                    let (gone, next) =
                        starling_store::prune_history(&conn, now - history.events_ms, cursors.0, PRUNE_CHUNK)?;
                    events += gone;
                    match next {
                        Some(next) if gone == PRUNE_CHUNK => cursors.0 = next,
                        _ => {
                            cursors.0 = 0;
                            break;
                        }
                    }
                    if pruning.elapsed() >= PRUNE_BUDGET {
                        break;
                    }
                }
                // Finished actions sit between pending ones: the pass goes on from where it was, and on
                // to the next chunk while most of a chunk went.
                let mut actions = 0;
                loop {
                    let (gone, next) = starling_store::prune_done_actions(
                        &conn,
                        now - history.actions_kept_ms,
                        cursors.1,
                        PRUNE_CHUNK,
                    )?;
                    actions += gone;
                    cursors.1 = next.unwrap_or(0);
                    if next.is_none() || gone < PRUNE_CHUNK / 2 || pruning.elapsed() >= 2 * PRUNE_BUDGET {
                        break;
                    }
                }
                if events + actions > 0 {
                    tracing::debug!(events, actions, "forgot history and finished actions past their retention");
                }
            }
            Ok(())
        });
        if let Ok(Err(e)) = done.await {
            tracing::warn!("checkpointing: {e}");
        }
    }
}

/// How often the retention job looks whether the configuration has a retention now.
const RETENTION_UNSET_POLL: std::time::Duration = std::time::Duration::from_secs(60);

/// Most profiles deleted per pipeline submission by the retention job.
const RETENTION_BATCH: usize = 500;

/// Deletes profiles inactive for longer than the retention, as a deletion on request would.
async fn run_retention(
    ingest: Arc<pipeline::Ingest>,
    conn: rusqlite::Connection,
    config: Arc<live::Live>,
    clock: fn() -> i64,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        // The configuration may change between passes; without retention, look again later.
        let retention = config.model().retention;
        let every =
            retention.map_or(RETENTION_UNSET_POLL, |r| std::time::Duration::from_millis(r.check_every_ms as u64));
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.changed() => return,
        }
        let Some(retention) = config.model().retention else { continue };
        let cutoff = clock() - retention.inactive_after_ms;
        loop {
            let due = match starling_store::inactive_profiles(&conn, cutoff, RETENTION_BATCH) {
                Ok(due) if due.is_empty() => break,
                Ok(due) => due,
                Err(e) => {
                    tracing::warn!("reading inactive profiles: {e}");
                    break;
                }
            };
            let full = due.len() == RETENTION_BATCH;
            match ingest.delete(due, "retention", Some(cutoff)).await {
                Ok(deleted) => {
                    tracing::info!(deleted = deleted.len(), "retention: inactive profiles deleted");
                    if !full || deleted.is_empty() {
                        break;
                    }
                }
                Err(pipeline::IngestError::Closed) => return,
                Err(e) => {
                    tracing::warn!("retention: {e}");
                    break;
                }
            }
        }
    }
}

/// Records every audience's size at the configured interval, for the size history.
async fn sample_audience_sizes(
    config: Arc<live::Live>,
    mut conn: rusqlite::Connection,
    clock: fn() -> i64,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let model = config.model();
        let names: Vec<String> = model.audiences.iter().map(|a| a.name.clone()).collect();
        let every = std::time::Duration::from_millis(model.audience_size_interval_ms as u64);
        if let Err(e) = starling_store::sample_audience_sizes(&mut conn, &names, clock(), SIZE_HISTORY_KEEP_MS) {
            tracing::warn!("sampling audience sizes: {e}");
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.changed() => return,
        }
    }
}

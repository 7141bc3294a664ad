//! Starling's engine and HTTP API: ingestion → identity → enrichment → audiences → outbox →
//! delivery, on one SQLite file.

pub mod api;
pub mod delivery;
pub mod ingest;
pub mod pipeline;
pub mod registry;

use starling_core::{Diagnostic, Model};
use starling_runtime::{HostOptions, Kind, PluginHost};
use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use tokio::sync::{Notify, watch};

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
}

pub struct Options {
    pub model: Model,
    pub database: PathBuf,
    pub plugins: Option<PathBuf>,
}

/// Milliseconds since the Unix epoch.
pub fn system_clock() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

/// Every action and enricher of `model` must name a loaded plugin of the right kind.
pub fn check_plugins(model: &Model, plugins: &PluginHost) -> Vec<Diagnostic> {
    let mut problems = Vec::new();
    let mut check = |name: &str, span: &std::ops::Range<usize>, kind: Kind| match plugins.get(name) {
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
    problems
}

/// A started engine: ingestion workers and delivery lanes are running; call [`App::serve`].
pub struct App {
    state: api::AppState,
    workers: Vec<std::thread::JoinHandle<()>>,
    lanes: Vec<tokio::task::JoinHandle<()>>,
    stop_delivery: watch::Sender<bool>,
    pub plugins: Arc<PluginHost>,
}

impl App {
    pub async fn start(options: Options) -> Result<App, ServerError> {
        Self::start_with_clock(options, system_clock).await
    }

    pub async fn start_with_clock(options: Options, clock: fn() -> i64) -> Result<App, ServerError> {
        let model = Arc::new(options.model);
        let database = options.database.clone();
        let blobs = starling_store::blob_dir(&database);
        let loading = std::time::Instant::now();
        let plugins = Arc::new(PluginHost::with_options(HostOptions {
            cache_dir: Some(blobs.join("cache")),
            failure_limit: model.server.plugin_failure_limit,
        })?);
        if let Some(dir) = &options.plugins {
            for plugin in plugins.load_dir(dir, &model.plugin_config)? {
                tracing::info!(plugin = %plugin.manifest.name, kind = plugin.manifest.kind.name(), sha256 = %plugin.sha256, "plugin loaded");
            }
        }
        let mut registry =
            registry::Registry::new(plugins.clone(), model.clone(), starling_store::open(&database)?, blobs, clock);
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

        let (stop_delivery, stopped) = watch::channel(false);
        let mut wake = HashMap::new();
        let mut lanes = Vec::new();
        for action in &model.actions {
            let notify = Arc::new(Notify::new());
            wake.insert(action.name.clone(), notify.clone());
            let lane = delivery::Lane {
                action: action.clone(),
                plugins: plugins.clone(),
                conn: Arc::new(Mutex::new(starling_store::open(&database)?)),
                wake: notify,
                clock,
            };
            lanes.push(tokio::spawn(lane.run(stopped.clone())));
        }
        lanes.push(tokio::spawn(registry.run(stopped.clone())));

        let shared = pipeline::Shared {
            model: model.clone(),
            plugins: plugins.clone(),
            runtime: tokio::runtime::Handle::current(),
            lanes: Arc::new(wake),
            clock,
        };
        let partitions = model
            .server
            .partitions
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()))
            .max(1);
        let (ingest, workers) =
            pipeline::start(shared, partitions, model.server.ingest_queue.max(1), || starling_store::open(&database))?;

        Ok(App {
            state: api::AppState { ingest: Arc::new(ingest), read, model, clock },
            workers,
            lanes,
            stop_delivery,
            plugins,
        })
    }

    pub fn router(&self) -> axum::Router {
        api::router(self.state.clone())
    }

    /// Serves HTTP until `shutdown` resolves, then drains: in-flight requests finish, queued
    /// events are committed, and delivery stops after the calls under way.
    pub async fn serve(
        self,
        listener: tokio::net::TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), ServerError> {
        axum::serve(listener, self.router()).with_graceful_shutdown(shutdown).await?;
        self.stop().await;
        Ok(())
    }

    /// Stops the ingestion workers (after their queued work) and the delivery lanes.
    pub async fn stop(self) {
        let App { state, workers, lanes, stop_delivery, .. } = self;
        drop(state);
        for worker in workers {
            let _ = tokio::task::spawn_blocking(move || worker.join()).await;
        }
        let _ = stop_delivery.send(true);
        for lane in lanes {
            let _ = lane.await;
        }
    }
}

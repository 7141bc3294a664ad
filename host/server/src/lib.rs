//! Starling's engine and HTTP API: ingestion → identity → enrichment → audiences → outbox →
//! delivery, on one SQLite file.

pub mod api;
pub mod delivery;
pub mod ingest;
pub mod pipeline;

use starling_core::{Diagnostic, Model};
use starling_runtime::{Kind, PluginHost};
use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use tokio::sync::{Notify, mpsc, watch};

/// Requests waiting for the pipeline before new ones are answered 503.
const INGEST_QUEUE: usize = 1_024;

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
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Every action and enricher of `model` must name a loaded plugin of the right kind.
pub fn check_plugins(model: &Model, plugins: &PluginHost) -> Vec<Diagnostic> {
    let mut problems = Vec::new();
    let mut check = |name: &str, span: &std::ops::Range<usize>, kind: Kind| match plugins.get(name) {
        Ok(p) if p.manifest.kind == kind => {}
        Ok(p) => problems.push(model.diagnostic(span, format!("plugin `{name}` is a {}, not a {}", p.manifest.kind.name(), kind.name()))),
        Err(_) => problems.push(model.diagnostic(span, format!("no plugin named `{name}` is installed"))),
    };
    for action in &model.actions {
        check(&action.connector, &action.connector_span, Kind::Connector);
    }
    for enricher in &model.enrichers {
        check(&enricher.plugin, &enricher.span, Kind::Enricher);
    }
    problems
}

/// A started engine: the pipeline thread and delivery task are running; call [`App::serve`].
pub struct App {
    state: api::AppState,
    pipeline: std::thread::JoinHandle<()>,
    delivery: tokio::task::JoinHandle<()>,
    stop_delivery: watch::Sender<bool>,
    pub plugins: Arc<PluginHost>,
}

impl App {
    pub async fn start(options: Options) -> Result<App, ServerError> {
        Self::start_with_clock(options, system_clock).await
    }

    pub async fn start_with_clock(options: Options, clock: fn() -> i64) -> Result<App, ServerError> {
        let model = Arc::new(options.model);
        let plugins = Arc::new(PluginHost::new()?);
        if let Some(dir) = &options.plugins {
            for plugin in plugins.load_dir(dir, &model.plugin_config)? {
                tracing::info!(plugin = %plugin.manifest.name, kind = plugin.manifest.kind.name(), sha256 = %plugin.sha256, "plugin loaded");
            }
        }
        let problems = check_plugins(&model, &plugins);
        if !problems.is_empty() {
            return Err(ServerError::Plugins(problems));
        }

        let write = starling_store::open(&options.database)?;
        let read = Arc::new(Mutex::new(starling_store::open(&options.database)?));
        let delivery_conn = Arc::new(Mutex::new(starling_store::open(&options.database)?));

        let outbox = Arc::new(Notify::new());
        let (jobs, receiver) = mpsc::channel(INGEST_QUEUE);
        let pipeline = pipeline::Pipeline {
            model: model.clone(),
            plugins: plugins.clone(),
            runtime: tokio::runtime::Handle::current(),
            outbox: outbox.clone(),
            clock,
        };
        let pipeline = std::thread::Builder::new()
            .name("starling-pipeline".into())
            .spawn(move || pipeline.run(write, receiver))?;

        let (stop_delivery, stopped) = watch::channel(false);
        let delivery = delivery::Delivery { plugins: plugins.clone(), conn: delivery_conn, outbox, clock };
        let delivery = tokio::spawn(delivery.run(stopped));

        Ok(App { state: api::AppState { jobs, read, model, clock }, pipeline, delivery, stop_delivery, plugins })
    }

    pub fn router(&self) -> axum::Router {
        api::router(self.state.clone())
    }

    /// Serves HTTP until `shutdown` resolves, then drains: in-flight requests finish, queued
    /// events are committed, and delivery stops between attempts.
    pub async fn serve(
        self,
        listener: tokio::net::TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), ServerError> {
        axum::serve(listener, self.router()).with_graceful_shutdown(shutdown).await?;
        self.stop().await;
        Ok(())
    }

    /// Stops the pipeline (after its queued work) and the delivery loop.
    pub async fn stop(self) {
        let App { state, pipeline, delivery, stop_delivery, .. } = self;
        drop(state);
        let _ = tokio::task::spawn_blocking(move || pipeline.join()).await;
        let _ = stop_delivery.send(true);
        let _ = delivery.await;
    }
}

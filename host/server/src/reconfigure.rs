//! Changing the configuration of a running server (`PUT /v1/config`, SIGHUP), and starting on
//! a configuration other than the one the database was last served with. Either way the whole
//! new configuration is checked first (every error with its line and column; on any error
//! nothing changes), then swapped in between batches, and the evolution rules of
//! `starling_core::evolve` are applied: removed audiences' memberships and removed actions'
//! pending deliveries go, and added or changed audiences are backfilled over every stored
//! profile in the background (see `backfill`).

use crate::api::{ApiError, AppState};
use crate::live::{Active, Backfill, Live};
use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};
use starling_core::evolve::Plan;
use starling_core::{Diagnostic, Model};
use starling_runtime::{Plugin, PluginHost};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use tokio::sync::watch;

pub mod backfill;
pub mod backtest;
mod preview;

pub use backtest::post_backtest;
pub use preview::{SAMPLE as PREVIEW_SAMPLE, post_preview};

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("the configuration has {} error(s); nothing was changed", .0.len())]
    Invalid(Vec<Diagnostic>),
    #[error(transparent)]
    Store(#[from] starling_store::StoreError),
    #[error("{0}")]
    Pipeline(#[from] crate::pipeline::IngestError),
}

impl IntoResponse for ApplyError {
    fn into_response(self) -> Response {
        match self {
            ApplyError::Invalid(errors) => {
                let message = self_message(&errors);
                let errors: Vec<_> = errors
                    .iter()
                    .map(|d| serde_json::json!({ "line": d.line, "column": d.column, "message": d.message }))
                    .collect();
                (StatusCode::BAD_REQUEST, Json(serde_json::json!({ "error": message, "errors": errors })))
                    .into_response()
            }
            other => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, other.to_string()).into_response(),
        }
    }
}

fn self_message(errors: &[Diagnostic]) -> String {
    format!("the configuration has {} error(s); nothing was changed", errors.len())
}

/// What applying a configuration did.
#[derive(Debug, serde::Serialize)]
pub struct Applied {
    pub version: i64,
    pub sha256: String,
    pub unchanged: bool,
    pub plan: Plan,
    /// The plan as `starling config diff` prints it.
    pub summary: String,
    pub deliveries_cancelled: usize,
    pub memberships_removed: usize,
    pub backfill: Option<serde_json::Value>,
}

pub fn sha256_hex(text: &str) -> String {
    hex::encode(Sha256::digest(text.as_bytes()))
}

/// Checks `source` whole, then makes it the running configuration (see the module's comment).
/// `how`: `apply` (over HTTP) or `reload` (SIGHUP).
pub async fn apply(state: &AppState, source: String, how: &'static str) -> Result<Applied, ApplyError> {
    let _one_at_a_time = state.config.changing.lock().await;
    let mut new = starling_core::parse(&source).map_err(|e| ApplyError::Invalid(e.0))?;
    let old = state.config.model();
    let sha256 = sha256_hex(&source);
    let active = state.config.active();
    if sha256 == active.sha256 {
        return Ok(Applied {
            version: active.version,
            sha256,
            unchanged: true,
            plan: Plan::default(),
            summary: "no changes\n".into(),
            deliveries_cancelled: 0,
            memberships_removed: 0,
            backfill: None,
        });
    }
    keep_server_settings(&old, &mut new);
    let plan = Plan::new(&old, &new);
    let prepared = prepare_plugins(state, &plan, &new).await?;
    let problems = crate::check_plugins_in(&new, |name| match prepared.get(name) {
        Some(plugin) => Ok(plugin.clone()),
        None => state.plugins.get(name),
    });
    if !problems.is_empty() {
        return Err(ApplyError::Invalid(problems));
    }

    // Checked: from here on the change is made.
    for plugin in prepared.into_values() {
        let plugin = Arc::try_unwrap(plugin).unwrap_or_else(|_| unreachable!("prepared plugins are not shared"));
        tracing::info!(plugin = %plugin.manifest.name, "plugin loaded for the new configuration");
        state.plugins.insert(plugin);
    }
    let new = Arc::new(new);
    let now = (state.clock)();
    let plan_json = serde_json::to_value(&plan).expect("plans serialize");
    let (database, text) = (state.database.clone(), source.clone());
    let (sha, backfilled) = (sha256.clone(), !plan.touches_profiles());
    let version = blocking(move || {
        let conn = starling_store::open(&database)?;
        starling_store::record_config(&conn, &sha, &text, now, how, Some(&plan_json), backfilled)
    })
    .await?;
    state.config.swap(new.clone(), Active { version, sha256: sha256.clone(), applied_ms: now, how: how.into() });
    // Every partition applies its next batch with the new model; after this, none still uses
    // the old one, so what the old one could still write is removed for good below.
    state.ingest.barrier().await?;
    let (deliveries_cancelled, memberships_removed) = evolve_stored(state, &plan, &new, now).await?;
    let backfill = plan.touches_profiles().then(|| backfill::start(state, version, plan.backfilled()));
    tracing::info!(version, how, sha256 = %sha256, "configuration applied\n{plan}");
    if !plan.restart_needed.is_empty() {
        tracing::warn!(keys = ?plan.restart_needed, "server settings changed: they take effect at the next start");
    }
    Ok(Applied {
        version,
        sha256,
        unchanged: false,
        summary: plan.to_string(),
        plan,
        deliveries_cancelled,
        memberships_removed,
        backfill: backfill.map(|b| b.to_json()),
    })
}

/// Server settings (`[server]`) take effect at the next start: a running server keeps its own.
fn keep_server_settings(old: &Model, new: &mut Model) {
    new.server = old.server.clone();
    // A node's place in a cluster is its own, whichever node's file the change came from.
    new.cluster = old.cluster.clone();
    new.audience_size_interval_ms = old.audience_size_interval_ms;
    new.header_timeout_ms = old.header_timeout_ms;
    new.body_timeout_ms = old.body_timeout_ms;
    new.max_clock_skew_ms = old.max_clock_skew_ms;
    new.max_event_age_ms = old.max_event_age_ms;
}

/// Compiles the plugins a new configuration names that are not loaded, or whose `[plugin.NAME]`
/// values changed: from the plugin directory, or from the registry. Nothing is made callable.
async fn prepare_plugins(
    state: &AppState,
    plan: &Plan,
    new: &Model,
) -> Result<HashMap<String, Arc<Plugin>>, ApplyError> {
    let wanted: Vec<String> = plan.plugins_loaded.iter().chain(&plan.plugins_reconfigured).cloned().collect();
    if wanted.is_empty() {
        return Ok(HashMap::new());
    }
    let (plugins, dir, database) = (state.plugins.clone(), state.plugin_dir.clone(), state.database.clone());
    let configs = new.plugin_config.clone();
    let spans: HashMap<String, std::ops::Range<usize>> = new
        .actions
        .iter()
        .map(|a| (a.connector.clone(), a.connector_span.clone()))
        .chain(new.enrichers.iter().map(|e| (e.plugin.clone(), e.span.clone())))
        .collect();
    let model = Arc::new(new.clone());
    tokio::task::spawn_blocking(move || {
        let conn = starling_store::open(&database)?;
        let blobs = starling_store::blob_dir(&database);
        let mut prepared = HashMap::new();
        let mut problems = Vec::new();
        for name in wanted {
            let config = configs.get(&name).cloned().unwrap_or_default();
            let found = match (
                dir.as_deref().and_then(|d| PluginHost::find_in_dir(d, &name)),
                starling_store::installed_plugin(&conn, &name)?,
            ) {
                (Some(manifest), _) => Some(plugins.prepare(&manifest, config)),
                (None, Some(row)) => Some(crate::registry::prepare(&plugins, &blobs, &row, config)),
                // Not found: the plugin check names it, unless it is loaded already.
                (None, None) => None,
            };
            match found {
                Some(Ok(plugin)) => {
                    prepared.insert(name, Arc::new(plugin));
                }
                Some(Err(e)) => problems.push(model.diagnostic(&spans[&name], e.to_string())),
                None => {}
            }
        }
        match problems.is_empty() {
            true => Ok(prepared),
            false => Err(ApplyError::Invalid(problems)),
        }
    })
    .await
    .expect("preparing plugins")
}

/// The evolution rules that remove what the new configuration no longer has: pending
/// deliveries of removed actions (cancelled), memberships of removed audiences (without
/// `left`), delivery lanes of removed actions, and plugins no longer named (unless the
/// registry manages them). Returns how many deliveries and memberships went.
async fn evolve_stored(state: &AppState, plan: &Plan, new: &Model, now: i64) -> Result<(usize, usize), ApplyError> {
    state.lanes.follow(&new.actions)?;
    let (database, actions, audiences) =
        (state.database.clone(), plan.actions_removed.clone(), plan.audiences_removed.clone());
    let unloaded = plan.plugins_unloaded.clone();
    let plugins = state.plugins.clone();
    blocking(move || {
        let conn = starling_store::open(&database)?;
        let cancelled = starling_store::cancel_actions(&conn, &actions, now)?;
        let removed = starling_store::remove_memberships(&conn, &audiences)?;
        for name in unloaded {
            if starling_store::installed_plugin(&conn, &name)?.is_none() && plugins.remove(&name) {
                tracing::info!(plugin = %name, "plugin unloaded: no longer named by the configuration");
            }
        }
        Ok((cancelled, removed))
    })
    .await
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, starling_store::StoreError> + Send + 'static,
) -> Result<T, ApplyError> {
    Ok(tokio::task::spawn_blocking(f).await.expect("configuration task")?)
}

/// At start, after the event log is replayed: compares this configuration with the one the
/// database was last served with, and applies the evolution rules to the difference; resumes
/// a backfill that did not finish; records the configuration.
pub async fn at_start(state: &AppState) -> Result<(), crate::ServerError> {
    let model = state.config.model();
    let source = model.source_text().to_string();
    let sha256 = sha256_hex(&source);
    let database = state.database.clone();
    let (last, profiles) = tokio::task::spawn_blocking(move || -> Result<_, starling_store::StoreError> {
        let conn = starling_store::open(&database)?;
        Ok((starling_store::active_config(&conn)?, starling_store::count_profiles(&conn)?))
    })
    .await
    .expect("reading the configuration history")?;
    let now = (state.clock)();
    let all: Vec<String> = model.audiences.iter().map(|a| a.name.clone()).collect();
    let record = |plan: Option<serde_json::Value>, backfilled: bool| {
        let (database, source, sha) = (state.database.clone(), source.clone(), sha256.clone());
        tokio::task::spawn_blocking(move || {
            let conn = starling_store::open(&database)?;
            starling_store::record_config(&conn, &sha, &source, now, "start", plan.as_ref(), backfilled)
        })
    };
    let active = |version| Active { version, sha256: sha256.clone(), applied_ms: now, how: "start".into() };
    match last {
        Some(last) if last.sha256 == sha256 => {
            state.config.set_active(Active {
                version: last.version,
                sha256: last.sha256,
                applied_ms: last.applied_ms,
                how: last.how,
            });
            if last.backfilled_ms.is_none() {
                tracing::info!(
                    version = last.version,
                    "the backfill after the last configuration change did not finish: it starts again"
                );
                backfill::start(state, last.version, all);
            }
        }
        Some(last) => {
            let plan = match starling_core::parse(&last.source) {
                Ok(old) => Plan::new(&old, &model),
                // Written by another version of Starling: every audience is evaluated again.
                Err(_) => Plan { audiences_changed: all.clone(), ..Plan::default() },
            };
            let unfinished = last.backfilled_ms.is_none();
            let plan_json = serde_json::to_value(&plan).expect("plans serialize");
            let backfill = plan.touches_profiles() || unfinished;
            let version = record(Some(plan_json), !backfill).await.expect("recording the configuration")?;
            tracing::warn!(
                version,
                previous = last.version,
                "starting on a configuration other than the one this database was last served with; the change applies as a live change would\n{plan}"
            );
            state.config.set_active(active(version));
            let (cancelled, removed) = evolve_stored(state, &plan, &model, now).await.map_err(start_error)?;
            if cancelled + removed > 0 {
                tracing::info!(
                    deliveries_cancelled = cancelled,
                    memberships_removed = removed,
                    "configuration change applied to stored state"
                );
            }
            if backfill {
                let audiences = if unfinished { all } else { plan.backfilled() };
                backfill::start(state, version, audiences);
            }
        }
        None => {
            // A database from before configurations were recorded (or a new one): every
            // audience is evaluated once, which makes memberships exact.
            let version = record(None, profiles == 0).await.expect("recording the configuration")?;
            state.config.set_active(active(version));
            if profiles > 0 {
                backfill::start(state, version, all);
            }
        }
    }
    Ok(())
}

fn start_error(e: ApplyError) -> crate::ServerError {
    match e {
        ApplyError::Store(e) => crate::ServerError::Store(e),
        other => crate::ServerError::Replay(other.to_string()),
    }
}

/// Reads the configuration file again and applies it on every SIGHUP; errors are logged with
/// their positions, and the running configuration stays.
pub async fn reload_on_hangup(state: AppState, path: PathBuf, mut stop: watch::Receiver<bool>) {
    let Ok(mut hangups) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) else {
        tracing::warn!("cannot listen for SIGHUP: reload with `starling config apply`");
        return;
    };
    loop {
        tokio::select! {
            _ = hangups.recv() => {}
            _ = stop.changed() => return,
        }
        let source = match tokio::fs::read_to_string(&path).await {
            Ok(source) => source,
            Err(e) => {
                tracing::error!(file = %path.display(), "SIGHUP: cannot read the configuration, nothing changed: {e}");
                continue;
            }
        };
        match apply(&state, source, "reload").await {
            Ok(applied) if applied.unchanged => {
                tracing::info!(file = %path.display(), "SIGHUP: configuration unchanged")
            }
            Ok(applied) => {
                tracing::info!(file = %path.display(), version = applied.version, "SIGHUP: configuration reloaded")
            }
            Err(ApplyError::Invalid(errors)) => {
                let listed: String = errors.iter().map(|d| format!("\n  {}:{d}", path.display())).collect();
                tracing::error!("SIGHUP: {}; the running configuration stays:{listed}", self_message(&errors));
            }
            Err(e) => tracing::error!(file = %path.display(), "SIGHUP: the configuration was not applied: {e}"),
        }
    }
}

/// `PUT /v1/config`: the body is the whole configuration file.
pub async fn put_config(State(state): State<AppState>, body: String) -> Result<Json<Applied>, ApplyError> {
    apply(&state, body, "apply").await.map(Json)
}

/// `GET /v1/config`: the active configuration, its sha256, version and when it was applied.
pub async fn get_config(State(state): State<AppState>) -> Json<serde_json::Value> {
    let file = state.config_path.as_ref().map(|p| p.display().to_string());
    let mut config = config_json(&state.config.active(), state.config.model().source_text(), file);
    config["backfill"] = serde_json::json!(state.config.backfill().map(|b| b.to_json()));
    Json(config)
}

/// A configuration as `GET /v1/config` shows it; `file`: the one it was read from, if it was.
pub(crate) fn config_json(active: &Active, source: &str, file: Option<String>) -> serde_json::Value {
    serde_json::json!({
        "version": active.version,
        "sha256": active.sha256,
        "applied": starling_core::time::format_rfc3339(active.applied_ms),
        "applied_ms": active.applied_ms,
        "how": active.how,
        "file": file,
        "source": source,
        "backfill": null,
    })
}

/// `GET /v1/config/history`: the configurations applied before the active one, newest first
/// (`?source=true` with their text).
pub async fn get_config_history(
    State(state): State<AppState>,
    axum::extract::Query(q): axum::extract::Query<ConfigHistoryQuery>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let with_source = q.with_source();
    Ok(Json(crate::api::read(&state, move |c| config_history_of(c, with_source)).await?))
}

pub(crate) fn config_history_of(
    c: &rusqlite::Connection,
    with_source: bool,
) -> starling_store::Result<serde_json::Value> {
    Ok(serde_json::json!({ "configurations": starling_store::config_history(c, 1_000, with_source)? }))
}

#[derive(serde::Deserialize)]
pub struct ConfigHistoryQuery {
    source: Option<bool>,
}

impl ConfigHistoryQuery {
    pub(crate) fn with_source(&self) -> bool {
        self.source.unwrap_or(false)
    }
}

/// `GET /v1/audiences/{name}`: one audience, its size and the backfill that concerns it.
pub async fn get_audience(
    State(state): State<AppState>,
    axum::extract::Path(name): axum::extract::Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let (live, lookup) = (state.config.clone(), name.clone());
    let audience = crate::api::read(&state, move |c| audience_of(c, &live, &lookup)).await?;
    audience.map(Json).ok_or_else(|| no_audience(&name))
}

pub(crate) fn no_audience(name: &str) -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, format!("no audience named `{name}`"))
}

/// Audience `name` as the running configuration defines it, with its size and the backfill
/// that concerns it; `None` if it defines none of that name.
pub(crate) fn audience_of(
    c: &rusqlite::Connection,
    live: &Live,
    name: &str,
) -> starling_store::Result<Option<serde_json::Value>> {
    let model = live.model();
    let Some(audience) = model.audience(name) else { return Ok(None) };
    let size = starling_store::audience_size(c, name)?;
    let backfill = live.backfill_of(name).map(|b: Arc<Backfill>| {
        serde_json::json!({
            "version": b.version,
            "done": b.done.load(Ordering::Relaxed),
            "total": b.total.load(Ordering::Relaxed),
            "finished": b.finished.load(Ordering::SeqCst),
        })
    });
    Ok(Some(serde_json::json!({
        "name": audience.name,
        "size": size,
        "reads": audience.inputs,
        "time_relative": audience.time_relative,
        "rule": audience.rule.describe(),
        "backfill": backfill,
    })))
}

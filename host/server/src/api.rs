//! The HTTP API.

use crate::auth::Denied;
use crate::pipeline::Ingest;
use crate::telemetry::{ActionLabel, NameLabel, PartitionLabel, Telemetry};
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use bytes::Bytes;
use rusqlite::Connection;
use starling_core::Model;
use starling_core::ingest::Naming;
use starling_runtime::PluginHost;
use starling_store::OutboxStatus;
use std::sync::{Arc, Mutex};

/// Largest request body accepted.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;
/// Seconds a client is asked to wait when the server is saturated.
const RETRY_AFTER_SECS: &str = "1";

#[derive(Clone)]
pub struct AppState {
    pub ingest: Arc<Ingest>,
    pub read: Arc<Mutex<Connection>>,
    /// The running configuration (it can change while the server runs).
    pub config: Arc<crate::live::Live>,
    pub clock: fn() -> i64,
    /// Whether `POST /v1/test/clock` may move the clock (for tests of time-driven behaviour).
    pub test_clock: bool,
    pub telemetry: Arc<Telemetry>,
    /// The names requests may address this server by.
    pub hosts: Arc<crate::origin::Hosts>,
    pub plugins: Arc<PluginHost>,
    /// Requests each ingestion partition may hold.
    pub queue_capacity: usize,
    /// Set when the server is stopping: new requests are refused.
    pub drain: crate::http::Drain,
    /// The SQLite file, for backups.
    pub database: std::path::PathBuf,
    pub lanes: Arc<crate::delivery::Lanes>,
    /// Where plugins named by a new configuration are loaded from.
    pub plugin_dir: Option<std::path::PathBuf>,
    /// The configuration file, read again on SIGHUP.
    pub config_path: Option<std::path::PathBuf>,
    /// Personalization reads per source key this minute.
    pub personalization: Arc<crate::personalize::RateLimits>,
}

/// The OpenAPI document of this API.
pub const OPENAPI: &str = include_str!("openapi.json");
const ADMIN_PAGE: &str = include_str!("admin.html");

pub fn router(state: AppState) -> Router {
    let admin = Router::new()
        .route("/v1/profiles/{id}", get(get_profile).delete(delete_profile))
        .route("/v1/profiles/{id}/explain/{audience}", get(explain_membership))
        .route("/v1/profiles/{id}/identity", get(get_identity))
        .route("/v1/profiles/{id}/export", get(export_profile))
        .route("/v1/profiles/{id}/unstitch", post(unstitch))
        .route("/v1/audiences", get(get_audiences))
        .route("/v1/audiences/preview", post(crate::reconfigure::post_preview))
        .route("/v1/audiences/{name}", get(crate::reconfigure::get_audience))
        .route("/v1/config", get(crate::reconfigure::get_config).put(crate::reconfigure::put_config))
        .route("/v1/config/history", get(crate::reconfigure::get_config_history))
        .route("/v1/backtest", post(crate::reconfigure::post_backtest))
        .route("/v1/audiences/{name}/history", get(get_audience_history))
        .route("/v1/actions", get(get_actions))
        .route("/v1/dead-letters", get(get_dead_letters))
        .route("/v1/trace/{id}", get(trace))
        .route(
            "/v1/imports/{definition}",
            post(post_import).layer(DefaultBodyLimit::max(crate::import::MAX_UPLOAD_BYTES)),
        )
        .route("/v1/imports/{definition}/{file_sha256}", get(get_import))
        .route("/v1/audit", get(get_audit))
        .route("/v1/plugins", get(get_plugins))
        .route("/v1/backup", get(backup))
        .route("/metrics", get(metrics));
    // Moving the clock is an admin call like any other: it is routed before the admin layer.
    let admin = if state.test_clock { admin.route("/v1/test/clock", post(advance_clock)) } else { admin };
    let admin = admin.route_layer(axum::middleware::from_fn_with_state(state.clone(), require_admin));
    Router::new()
        .route(
            "/v1/events",
            post(post_events).layer(axum::middleware::from_fn_with_state(state.clone(), require_source_key)),
        )
        .merge(admin)
        .merge(crate::wire::routes())
        .merge(crate::personalize::routes(&state))
        .route("/healthz", get(health))
        .route("/v1/cluster", get(not_clustered))
        .route("/openapi.json", get(|| async { ([(header::CONTENT_TYPE, "application/json")], OPENAPI) }))
        .route("/admin", get(|| async { axum::response::Html(ADMIN_PAGE) }))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(tower_http::timeout::RequestBodyTimeoutLayer::new(std::time::Duration::from_millis(
            state.config.model().body_timeout_ms as u64,
        )))
        .layer(axum::middleware::from_fn_with_state(state.clone(), check_host))
        .layer(axum::middleware::from_fn_with_state(state.clone(), refuse_while_stopping))
        .with_state(state)
}

/// `GET /v1/cluster` on a server that is not a cluster node (a node's front answers it first).
async fn not_clustered() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "this server is not a cluster node (no [cluster] section)")
}

/// `ok`; or, while writes fail for lack of space, 503 saying so (reads still work).
async fn health(State(state): State<AppState>) -> Response {
    match state.telemetry.storage.full() {
        None => Json(serde_json::json!({"status": "ok"})).into_response(),
        Some(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({"status": "disk_full", "detail": reason, "ingestion": "refused (507)", "reads": "served"})),
        )
            .into_response(),
    }
}

/// Once the server is stopping, answers 503 with `Retry-After` and closes the connection, so
/// that clients retry elsewhere or after the restart; counts the requests it lets through.
async fn refuse_while_stopping(
    State(state): State<AppState>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if state.drain.is_stopping() {
        let mut response = ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "the server is stopping; nothing from this request was applied",
        )
        .into_response();
        let headers = response.headers_mut();
        headers.insert(header::RETRY_AFTER, header::HeaderValue::from_static("5"));
        headers.insert(header::CONNECTION, header::HeaderValue::from_static("close"));
        return response;
    }
    let _under_way = state.drain.enter();
    next.run(request).await
}

/// Refuses requests whose `Host` is not a name of this server.
async fn check_host(
    State(state): State<AppState>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    match crate::origin::refusal(&state.hosts, request.headers(), false) {
        None => next.run(request).await,
        Some(why) => ApiError::new(StatusCode::FORBIDDEN, why).into_response(),
    }
}

/// The data source an ingestion request's key speaks for (`None` without `[[source]]` keys).
#[derive(Clone)]
struct SourceKey(Option<String>);

/// Checks an ingestion request's key from its headers, before its body is read: a request
/// without a valid key costs the server no body.
async fn require_source_key(
    State(state): State<AppState>,
    mut request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    match state.config.keys().check_source(request.headers()) {
        Ok(source) => {
            request.extensions_mut().insert(SourceKey(source));
            next.run(request).await
        }
        Err(denied) => {
            state.telemetry.metrics.reject("unauthorized", 1);
            unauthorized(&denied, "ApiKey").into_response()
        }
    }
}

async fn require_admin(
    State(state): State<AppState>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if let Some(why) = crate::origin::refusal(&state.hosts, request.headers(), true) {
        return ApiError::new(StatusCode::FORBIDDEN, why).into_response();
    }
    match state.config.keys().check_admin(request.headers()) {
        Ok(()) => next.run(request).await,
        Err(denied) => unauthorized(&denied, "Bearer").into_response(),
    }
}

pub(crate) fn unauthorized(denied: &Denied, scheme: &'static str) -> impl IntoResponse {
    let mut response = ApiError::new(StatusCode::UNAUTHORIZED, denied.message()).into_response();
    response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static(scheme));
    response
}

/// An error answer: a status and a message naming the problem, as `{"error": "..."}`.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError { status, message: message.into() }
    }

    pub fn status(&self) -> StatusCode {
        self.status
    }

    pub fn message(&self) -> &str {
        &self.message
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, Json(serde_json::json!({ "error": self.message }))).into_response();
        if matches!(
            self.status,
            StatusCode::SERVICE_UNAVAILABLE | StatusCode::TOO_MANY_REQUESTS | StatusCode::INSUFFICIENT_STORAGE
        ) {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static(RETRY_AFTER_SECS));
        }
        response
    }
}

impl From<starling_store::StoreError> for ApiError {
    fn from(e: starling_store::StoreError) -> Self {
        tracing::error!("{e}");
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "storage error")
    }
}

/// A read could not wait for the state it must see (the pipeline is shutting down or failing).
impl From<crate::pipeline::IngestError> for ApiError {
    fn from(e: crate::pipeline::IngestError) -> Self {
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, e.to_string())
    }
}

#[derive(serde::Deserialize)]
struct EventsQuery {
    /// Only parse and validate: nothing is queued or stored.
    #[serde(default)]
    dry_run: bool,
}

async fn post_events(
    State(state): State<AppState>,
    Query(query): Query<EventsQuery>,
    axum::Extension(SourceKey(key_source)): axum::Extension<SourceKey>,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<serde_json::Value>), Response> {
    let metrics = &state.telemetry.metrics;
    let body = body.map_err(|rejection| {
        let status = rejection.status();
        metrics.reject(if status == StatusCode::PAYLOAD_TOO_LARGE { "too_large" } else { "invalid" }, 1);
        body_error(rejection).into_response()
    })?;
    let invalid = |reason: &str, message: String| {
        metrics.reject(reason, 1);
        ApiError::new(StatusCode::BAD_REQUEST, message).into_response()
    };
    let received_ms = (state.clock)();
    let (events, batch) =
        starling_core::ingest::parse_request(&body, received_ms).map_err(|m| invalid("invalid", m))?;
    let answer = admit(&state, events, Naming::native(batch), key_source.as_deref(), received_ms, query.dry_run)
        .await
        .map_err(IntoResponse::into_response)?;
    Ok((if query.dry_run { StatusCode::OK } else { StatusCode::ACCEPTED }, Json(answer)))
}

/// Bounds the times of parsed events, checks them against their source and specs, and (unless
/// `dry_run`) queues them, answering once they are durable: the answer of `POST /v1/events`.
/// Every ingestion format ends here.
pub(crate) async fn admit(
    state: &AppState,
    mut events: Vec<starling_core::Event>,
    naming: Naming,
    key_source: Option<&str>,
    received_ms: i64,
    dry_run: bool,
) -> Result<serde_json::Value, ApiError> {
    let metrics = &state.telemetry.metrics;
    let invalid = |reason: &str, message: String| {
        metrics.reject(reason, 1);
        ApiError::new(StatusCode::BAD_REQUEST, message)
    };
    let Checked { warnings, clamped, spec_warned } =
        check(&state.config.model(), &mut events, naming, key_source, received_ms)
            .map_err(|(reason, message)| invalid(reason, message))?;
    if dry_run {
        return Ok(serde_json::json!({ "valid": events.len(), "warnings": warnings }));
    }
    let n = events.len() as u64;
    // Busy, shutting down or a failed commit: nothing was acknowledged, the client may retry.
    let report = state.ingest.submit(events).await.map_err(|e| {
        if let Some(full) = state.telemetry.storage.full() {
            metrics.reject("disk_full", n);
            let lost = if n == 1 {
                "the event was not stored".to_string()
            } else {
                format!("none of these {n} events was stored")
            };
            let message = format!("the disk is full ({full}): {lost}; retry once space is freed");
            return ApiError::new(StatusCode::INSUFFICIENT_STORAGE, message);
        }
        metrics.reject("unavailable", n);
        let message = match e {
            // A write the log did not acknowledge may still be stored (a stalled server stores
            // what it was sent once it resumes): the repeat is what ids are for.
            crate::pipeline::IngestError::Failed(_) => {
                format!("{e}; they may be stored all the same: send them again (an event's `id` keeps a repeat out)")
            }
            e => e.to_string(),
        };
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, message)
    })?;
    metrics.events_accepted.inc_by(report.accepted as u64);
    metrics.events_duplicate.inc_by(report.duplicates as u64);
    metrics.spec_warnings.inc_by(spec_warned);
    metrics.event_times_clamped.inc_by(clamped);
    let mut answer = serde_json::to_value(report).expect("report serializes");
    if !warnings.is_empty() {
        answer["warnings"] = serde_json::json!(warnings);
    }
    Ok(answer)
}

/// What checking an ingestion request's events found.
pub(crate) struct Checked {
    pub warnings: Vec<String>,
    /// Events whose times were brought within bounds.
    pub clamped: u64,
    pub spec_warned: u64,
}

/// Bounds the times of parsed events and checks them against their source and specs: what
/// every ingestion format's events pass before they are queued. A refusal names its reason (a
/// metric label) and the problem.
pub(crate) fn check(
    model: &starling_core::Model,
    events: &mut [starling_core::Event],
    naming: Naming,
    key_source: Option<&str>,
    received_ms: i64,
) -> Result<Checked, (&'static str, String)> {
    let (mut warnings, clamped) =
        starling_core::ingest::bound_times(events, naming, received_ms, model).map_err(|m| ("too_old", m))?;
    let spec_warnings =
        starling_core::ingest::check_events(events, naming, key_source, model).map_err(|m| ("spec", m))?;
    let spec_warned = spec_warnings.len() as u64;
    warnings.extend(spec_warnings);
    for warning in &warnings {
        tracing::warn!(source = key_source.unwrap_or("-"), "event accepted with a warning: {warning}");
    }
    Ok(Checked { warnings, clamped, spec_warned })
}

pub(crate) fn body_error(rejection: BytesRejection) -> ApiError {
    let status = rejection.status();
    if status == StatusCode::PAYLOAD_TOO_LARGE {
        return ApiError::new(status, format!("request body is larger than {MAX_BODY_BYTES} bytes"));
    }
    let mut cause: Option<&dyn std::error::Error> = Some(&rejection);
    while let Some(error) = cause {
        if error.is::<tower_http::timeout::TimeoutError>() {
            return ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "the request body did not arrive within server.body_timeout; nothing was applied",
            );
        }
        cause = error.source();
    }
    ApiError::new(status, rejection.body_text())
}

pub(crate) async fn read<T: Send + 'static>(
    state: &AppState,
    f: impl FnOnce(&Connection) -> starling_store::Result<T> + Send + 'static,
) -> Result<T, ApiError> {
    // Every answered request is visible to the reads that follow it. With the disk full, what
    // is held in memory cannot be written: reads answer what is stored.
    if let Err(e) = state.ingest.materialize().await
        && state.telemetry.storage.full().is_none()
    {
        return Err(e.into());
    }
    let conn = state.read.clone();
    Ok(tokio::task::spawn_blocking(move || f(&conn.lock().expect("read connection")))
        .await
        .map_err(|_| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "read task failed"))??)
}

/// A consistent copy of the database, streamed: everything acknowledged before the request is
/// in it, ingestion goes on while it is written, and `X-Starling-Log-Position` says which event
/// log position it reflects.
async fn backup(State(state): State<AppState>) -> Result<Response, ApiError> {
    state.ingest.materialize().await?;
    static BACKUPS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = BACKUPS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let name = format!(".backup-{}-{n}.db", std::process::id());
    let copy = state.database.with_file_name(name);
    let (database, into) = (state.database.clone(), copy.clone());
    let position = tokio::task::spawn_blocking(move || {
        starling_store::snapshot(&database, &into)
            .map(|positions| positions.into_iter().map(|(_, p)| p).max().unwrap_or(0))
    })
    .await
    .map_err(|_| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "backup task failed"));
    let opened = match position {
        Ok(Ok(position)) => tokio::fs::File::open(&copy).await.map(|file| (position, file)).map_err(backup_io),
        Ok(Err(e)) => Err(e.into()),
        Err(e) => Err(e),
    };
    // Open (or failed), the copy leaves the directory at once; the open file streams on.
    let _ = std::fs::remove_file(&copy);
    let (position, file) = opened?;
    let length = file.metadata().await.map_err(backup_io)?.len();
    tracing::info!(position, bytes = length, "backup taken");
    Ok((
        [
            (header::CONTENT_TYPE, "application/vnd.sqlite3".to_string()),
            (header::CONTENT_LENGTH, length.to_string()),
            (header::CONTENT_DISPOSITION, "attachment; filename=\"starling-backup.db\"".to_string()),
            (header::HeaderName::from_static("x-starling-log-position"), position.to_string()),
        ],
        axum::body::Body::from_stream(tokio_util::io::ReaderStream::new(file)),
    )
        .into_response())
}

fn backup_io(e: std::io::Error) -> ApiError {
    ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, format!("reading the backup: {e}"))
}

async fn get_profile(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    // As the running configuration has it, even before a backfill reached it.
    let (lookup, model) = (id.clone(), state.config.model());
    let profile = read(&state, move |c| profile_of(c, &model, &lookup)).await?;
    profile.map(Json).ok_or_else(|| no_profile(&id))
}

async fn get_identity(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let lookup = id.clone();
    let graph = read(&state, move |c| identity_of(c, &lookup)).await?;
    graph.map(Json).ok_or_else(|| no_profile(&id))
}

async fn export_profile(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let (lookup, model) = (id.clone(), state.config.model());
    let export = read(&state, move |c| export_of(c, &model, &lookup)).await?;
    export.map(Json).ok_or_else(|| no_profile(&id))
}

pub(crate) fn no_profile(id: &str) -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, format!("no profile for id `{id}`"))
}

/// The profile an id belongs to, as `model` has it (even before a backfill reached it).
pub(crate) fn profile_of(c: &Connection, model: &Model, id: &str) -> starling_store::Result<Option<serde_json::Value>> {
    let Some(mut profile) = starling_store::find_profile(c, id)? else { return Ok(None) };
    starling_core::evolve::conform(model, &mut profile);
    Ok(Some(profile.to_json()))
}

/// The ids of the profile an id belongs to, and their history.
pub(crate) fn identity_of(c: &Connection, id: &str) -> starling_store::Result<Option<serde_json::Value>> {
    let Some(profile) = starling_store::resolve_identity(c, id)? else { return Ok(None) };
    let ids = starling_store::ids_of(c, &profile)?;
    let history = starling_store::identity_history(c, &profile)?;
    Ok(Some(serde_json::json!({ "profile_id": profile, "ids": ids, "history": history })))
}

/// Everything held about the person an id belongs to, for an access request: the profile, its
/// ids and their history, its events, memberships, and actions with the data each carries.
pub(crate) fn export_of(c: &Connection, model: &Model, id: &str) -> starling_store::Result<Option<serde_json::Value>> {
    let Some(profile_id) = starling_store::resolve_identity(c, id)? else { return Ok(None) };
    let Some(mut profile) = starling_store::load_profile(c, &profile_id)? else { return Ok(None) };
    starling_core::evolve::conform(model, &mut profile);
    let date = starling_core::time::format_rfc3339;
    let events: Vec<serde_json::Value> = starling_store::profile_events(c, &profile_id)?
        .into_iter()
        .map(|e| {
            serde_json::json!({
                "id": e.id, "event": e.name, "visitor_id": e.visitor_id, "source": e.source,
                "timestamp": date(e.timestamp_ms), "data": e.data,
            })
        })
        .collect();
    let memberships: Vec<serde_json::Value> = starling_store::memberships_of(c, &profile_id)?
        .into_iter()
        .map(|(audience, joined_ms)| serde_json::json!({ "audience": audience, "joined": date(joined_ms) }))
        .collect();
    Ok(Some(serde_json::json!({
        "profile": profile.to_json(),
        "ids": starling_store::ids_of(c, &profile_id)?,
        "identity_history": starling_store::identity_history(c, &profile_id)?,
        "events": events,
        "memberships": memberships,
        "actions": starling_store::actions_of(c, &profile_id)?,
    })))
}

/// How long an unstitch's answer waits for another node to adopt the profile split out: a
/// partition's new owner serves within this after its last owner died.
const ADOPTED_WITHIN: std::time::Duration = std::time::Duration::from_secs(10);

async fn unstitch(State(state): State<AppState>, Path(id): Path<String>) -> Result<Json<serde_json::Value>, ApiError> {
    match state.ingest.unstitch(&id).await {
        // Spread, a profile split out into another node's partition is that node's to adopt:
        // answered once it has, a read through any node finds it.
        Ok(mut result) if state.ingest.adopted_elsewhere(&id) => {
            let adopted = state.ingest.adopted(&id, ADOPTED_WITHIN).await;
            result["adopted"] =
                adopted.map_err(|e| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, e.to_string()))?.into();
            Ok(Json(result))
        }
        Ok(result) => Ok(Json(result)),
        Err(crate::pipeline::IngestError::Failed(reason)) => Err(ApiError::new(StatusCode::CONFLICT, reason)),
        Err(e) => Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, e.to_string())),
    }
}

async fn get_audiences(State(state): State<AppState>) -> Result<Json<serde_json::Value>, ApiError> {
    let live = state.config.clone();
    Ok(Json(read(&state, move |c| audiences_of(c, &live)).await?))
}

/// The audiences the running configuration defines, with their sampled sizes.
pub(crate) fn audiences_of(c: &Connection, live: &crate::live::Live) -> starling_store::Result<serde_json::Value> {
    let sizes = starling_store::audience_sizes(c)?;
    let backfill = live.backfill();
    let audiences: Vec<serde_json::Value> = live
        .model()
        .audiences
        .iter()
        .map(|a| {
            let size = sizes.iter().find(|(n, _)| *n == a.name).map_or(0, |(_, s)| *s);
            serde_json::json!({
                "name": a.name,
                "size": size,
                "reads": a.inputs,
                "time_relative": a.time_relative,
                "rule": a.rule.describe(),
                "backfill": backfill.as_ref().filter(|b| b.audiences.contains(&a.name)).map(|b| b.to_json()),
            })
        })
        .collect();
    Ok(serde_json::json!({ "audiences": audiences }))
}

#[derive(serde::Deserialize)]
pub(crate) struct HistoryQuery {
    /// RFC 3339; default: 24 hours ago.
    since: Option<String>,
}

impl HistoryQuery {
    /// Since when the samples of audience `name` are asked for, at `now`.
    pub(crate) fn since(&self, model: &Model, name: &str, now: i64) -> Result<i64, ApiError> {
        if model.audience(name).is_none() {
            return Err(crate::reconfigure::no_audience(name));
        }
        match &self.since {
            None => Ok(now - 24 * 3_600_000),
            Some(s) => starling_core::time::parse_rfc3339(s).ok_or_else(|| {
                ApiError::new(StatusCode::BAD_REQUEST, format!("since: `{s}` is not an RFC 3339 timestamp"))
            }),
        }
    }
}

async fn get_audience_history(
    State(state): State<AppState>,
    Path(name): Path<String>,
    Query(q): Query<HistoryQuery>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let since = q.since(&state.config.model(), &name, (state.clock)())?;
    Ok(Json(read(&state, move |c| audience_history_of(c, &name, since)).await?))
}

/// The sampled sizes of audience `name` since `since`.
pub(crate) fn audience_history_of(c: &Connection, name: &str, since: i64) -> starling_store::Result<serde_json::Value> {
    let samples: Vec<_> = starling_store::audience_size_history(c, name, since)?
        .into_iter()
        .map(|(at, size)| serde_json::json!({ "at": starling_core::time::format_rfc3339(at), "size": size }))
        .collect();
    Ok(serde_json::json!({ "audience": name, "samples": samples }))
}

async fn explain_membership(
    State(state): State<AppState>,
    Path((id, audience)): Path<(String, String)>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let (model, now) = (state.config.model(), (state.clock)());
    if model.audience(&audience).is_none() {
        return Err(crate::reconfigure::no_audience(&audience));
    }
    let lookup = id.clone();
    let explained = read(&state, move |c| explanation_of(c, &model, &lookup, &audience, now)).await?;
    explained.map(Json).ok_or_else(|| no_profile(&id))
}

/// Why the profile an id belongs to is in audience `audience` (which the model defines) or
/// not, at `now`; `None` if no profile holds the id.
pub(crate) fn explanation_of(
    c: &Connection,
    model: &Model,
    id: &str,
    audience: &str,
    now: i64,
) -> starling_store::Result<Option<serde_json::Value>> {
    let Some(mut profile) = starling_store::find_profile(c, id)? else { return Ok(None) };
    starling_core::evolve::conform(model, &mut profile);
    Ok(starling_core::engine::explain(model, &profile, audience, now))
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ClockChange {
    advance: String,
}

async fn advance_clock(
    body: Result<Json<ClockChange>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let Json(change) = body.map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.body_text()))?;
    let ms = starling_core::literal::parse_duration(&change.advance)
        .map_err(|m| ApiError::new(StatusCode::BAD_REQUEST, format!("advance: {m}")))?;
    let now = crate::advance_clock(ms).map_err(|m| ApiError::new(StatusCode::BAD_REQUEST, format!("advance: {m}")))?;
    Ok(Json(serde_json::json!({ "now": starling_core::time::format_rfc3339(now) })))
}

#[derive(serde::Deserialize)]
pub(crate) struct ActionsQuery {
    status: Option<String>,
    limit: Option<usize>,
}

impl ActionsQuery {
    /// The status asked for, if one is, and how many rows at most.
    pub(crate) fn parse(&self) -> Result<(Option<OutboxStatus>, usize), ApiError> {
        let status = match &self.status {
            None => None,
            Some(s) => Some(OutboxStatus::parse(s).ok_or_else(|| {
                let names: Vec<&str> = OutboxStatus::ALL.iter().map(|s| s.name()).collect();
                ApiError::new(StatusCode::BAD_REQUEST, format!("status: `{s}` is not one of {}", names.join(", ")))
            })?),
        };
        Ok((status, self.limit.unwrap_or(100).min(10_000)))
    }
}

async fn get_actions(
    State(state): State<AppState>,
    Query(q): Query<ActionsQuery>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let (status, limit) = q.parse()?;
    Ok(Json(read(&state, move |c| actions_of(c, status, limit)).await?))
}

pub(crate) fn actions_of(
    c: &Connection,
    status: Option<OutboxStatus>,
    limit: usize,
) -> starling_store::Result<serde_json::Value> {
    Ok(serde_json::json!({ "actions": starling_store::list_actions(c, status, limit)? }))
}

async fn get_dead_letters(
    State(state): State<AppState>,
    Query(q): Query<LimitQuery>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let limit = q.limit();
    Ok(Json(read(&state, move |c| dead_letters_of(c, limit)).await?))
}

pub(crate) fn dead_letters_of(c: &Connection, limit: usize) -> starling_store::Result<serde_json::Value> {
    Ok(serde_json::json!({ "dead_letters": starling_store::dead_letters(c, limit)? }))
}

async fn delete_profile(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let records = state
        .ingest
        .delete(vec![id.clone()], "request", None)
        .await
        .map_err(|e| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, e.to_string()))?;
    match records.into_iter().next() {
        Some(record) => Ok(Json(serde_json::json!({ "deleted": true, "audit": record }))),
        None => Err(no_profile(&id)),
    }
}

#[derive(serde::Deserialize)]
pub(crate) struct LimitQuery {
    limit: Option<usize>,
}

impl LimitQuery {
    pub(crate) fn limit(&self) -> usize {
        self.limit.unwrap_or(100).min(10_000)
    }
}

async fn get_audit(
    State(state): State<AppState>,
    Query(q): Query<LimitQuery>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let limit = q.limit();
    Ok(Json(read(&state, move |c| audit_of(c, limit)).await?))
}

pub(crate) fn audit_of(c: &Connection, limit: usize) -> starling_store::Result<serde_json::Value> {
    Ok(serde_json::json!({ "audit": starling_store::audit_records(c, limit)? }))
}

async fn get_plugins(State(state): State<AppState>) -> Result<Json<serde_json::Value>, ApiError> {
    let plugins: Vec<serde_json::Value> = state
        .plugins
        .names()
        .into_iter()
        .filter_map(|name| state.plugins.get(&name).ok())
        .map(|p| {
            let (calls, seconds) = p.call_time();
            let (failures, consecutive, disabled) = p.health();
            serde_json::json!({
                "name": p.manifest.name,
                "version": p.manifest.version,
                "kind": p.manifest.kind.name(),
                "world": p.manifest.world,
                "sha256": p.sha256,
                "status": if disabled.is_some() { "disabled" } else { "enabled" },
                "disabled_reason": disabled,
                "calls": calls,
                "call_seconds": seconds,
                "failures": failures,
                "consecutive_failures": consecutive,
            })
        })
        .collect();
    Ok(Json(serde_json::json!({ "plugins": plugins })))
}

async fn metrics(State(state): State<AppState>) -> Result<Response, ApiError> {
    let m = &state.telemetry.metrics;
    let (sizes, pending) =
        read(&state, |c| Ok((starling_store::audience_sizes(c)?, starling_store::pending_actions(c)?))).await?;
    let model = state.config.model();
    // Audiences and actions a configuration change removed leave the gauges.
    m.audience_size.clear();
    m.actions_pending.clear();
    for audience in &model.audiences {
        let size = sizes.iter().find(|(n, _)| *n == audience.name).map_or(0, |(_, s)| *s);
        m.audience_size.get_or_create(&NameLabel { name: audience.name.clone() }).set(size);
    }
    for action in &model.actions {
        let n = pending.iter().find(|(a, _)| *a == action.name).map_or(0, |(_, n)| *n);
        m.actions_pending.get_or_create(&ActionLabel { action: action.name.clone() }).set(n);
    }
    for (i, depth) in state.ingest.queue_depths(state.queue_capacity).into_iter().enumerate() {
        m.ingest_queue_depth.get_or_create(&PartitionLabel { partition: i.to_string() }).set(depth as i64);
    }
    for name in state.plugins.names() {
        let Ok(plugin) = state.plugins.get(&name) else { continue };
        let label = NameLabel { name };
        let (calls, seconds) = plugin.call_time();
        let (failures, _, disabled) = plugin.health();
        m.plugin_calls.get_or_create(&label).set(calls as i64);
        m.plugin_call_seconds.get_or_create(&label).set(seconds);
        m.plugin_failures.get_or_create(&label).set(failures as i64);
        m.plugin_disabled.get_or_create(&label).set(disabled.is_some() as i64);
    }
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], m.render()).into_response())
}

/// Follows a visitor's events live as server-sent events: one message per step, named by the
/// step (`received`, `enriched`, `evaluated`, `queued`, `committed`, `delivery`, `deleted`).
async fn trace(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<
    axum::response::sse::Sse<
        impl futures_core::Stream<Item = Result<axum::response::sse::Event, std::convert::Infallible>>,
    >,
    ApiError,
> {
    use axum::response::sse::{Event as Sse, KeepAlive};
    use tokio_stream::StreamExt;
    use tokio_stream::wrappers::BroadcastStream;
    let profile = state.ingest.profile_of(&id).map_err(|e| {
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, format!("reading which profile the id belongs to: {e}"))
    })?;
    let rx = state.telemetry.tracer.subscribe(&[id.clone(), profile.clone()]);
    let started = serde_json::json!({ "step": "tracing", "id": id, "profile_id": profile });
    let first = tokio_stream::once(Ok(Sse::default().event("tracing").data(started.to_string())));
    let steps = BroadcastStream::new(rx).map(|step| {
        Ok(match step {
            Ok(step) => Sse::default().event(step["step"].as_str().unwrap_or("step")).data(step.to_string()),
            Err(tokio_stream::wrappers::errors::BroadcastStreamRecvError::Lagged(n)) => {
                Sse::default().event("lagged").data(serde_json::json!({ "step": "lagged", "missed": n }).to_string())
            }
        })
    });
    Ok(axum::response::sse::Sse::new(first.chain(steps)).keep_alive(KeepAlive::default()))
}

#[derive(serde::Deserialize)]
struct ImportQuery {
    format: Option<crate::import::Format>,
    /// The whole file's SHA-256, when the body is one part of it.
    file: Option<String>,
    /// The number of the body's first row in the file (1 = first data row).
    #[serde(default = "first_row")]
    first_row: i64,
    /// Lines of the file before the body's first line (to report file lines).
    #[serde(default)]
    line_offset: u64,
}

fn first_row() -> i64 {
    1
}

async fn post_import(
    State(state): State<AppState>,
    Path(definition): Path<String>,
    Query(q): Query<ImportQuery>,
    request: axum::extract::Request,
) -> Result<Json<crate::import::Summary>, ApiError> {
    use axum::extract::FromRequest;
    let model = state.config.model();
    let Some(def) = model.import(&definition) else {
        let known: Vec<&str> = model.imports.iter().map(|i| i.name.as_str()).collect();
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no import definition `{definition}` (configured: {})", known.join(", ")),
        ));
    };
    let content_type =
        request.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
    // A form upload (`curl -F file=@store.csv`) or the file as the body.
    let (body, file_name) = if content_type.starts_with("multipart/form-data") {
        let mut form = axum::extract::Multipart::from_request(request, &state)
            .await
            .map_err(|e| ApiError::new(e.status(), e.body_text()))?;
        let mut upload = None;
        while let Some(field) = form.next_field().await.map_err(|e| ApiError::new(e.status(), e.body_text()))? {
            if field.name() == Some("file") {
                let name = field.file_name().map(str::to_string);
                upload = Some((field.bytes().await.map_err(|e| ApiError::new(e.status(), e.body_text()))?, name));
                break;
            }
        }
        upload.ok_or_else(|| ApiError::new(StatusCode::BAD_REQUEST, "file: the form has no `file` field"))?
    } else {
        (Bytes::from_request(request, &state).await.map_err(body_error)?, None)
    };
    let extension = file_name.as_deref().and_then(|n| n.rsplit_once('.')).map(|(_, e)| e.to_ascii_lowercase());
    let format = match (q.format, extension.as_deref()) {
        (Some(f), _) => f,
        (None, Some("csv")) => crate::import::Format::Csv,
        (None, Some("jsonl" | "ndjson")) => crate::import::Format::Jsonl,
        _ if content_type.starts_with("text/csv") => crate::import::Format::Csv,
        _ if content_type.contains("ndjson") || content_type.contains("jsonl") => crate::import::Format::Jsonl,
        _ => {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "format: say csv or jsonl (?format=, a .csv or .jsonl file name, or Content-Type text/csv or application/x-ndjson)",
            ));
        }
    };
    let importer = crate::import::Importer {
        ingest: state.ingest.clone(),
        read: state.read.clone(),
        telemetry: state.telemetry.clone(),
        clock: state.clock,
    };
    importer.run(def, format, &body, q.file, q.first_row, q.line_offset).await.map(Json).map_err(|e| match e {
        crate::import::ImportError::Invalid(m) => ApiError::new(StatusCode::BAD_REQUEST, m),
        crate::import::ImportError::Ingest(e) => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
        crate::import::ImportError::Store(e) => e.into(),
    })
}

async fn get_import(
    State(state): State<AppState>,
    Path((definition, file)): Path<(String, String)>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let (d, f) = (definition.clone(), file.clone());
    match read(&state, move |c| starling_store::import_progress(c, &f, &d)).await? {
        Some(progress) => {
            Ok(Json(serde_json::json!({ "definition": definition, "file_sha256": file, "progress": progress })))
        }
        None => Err(ApiError::new(StatusCode::NOT_FOUND, format!("no import of file {file} with `{definition}`"))),
    }
}

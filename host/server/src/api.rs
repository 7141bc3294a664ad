//! The HTTP API.

use crate::pipeline::Ingest;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use bytes::Bytes;
use rusqlite::Connection;
use starling_core::Model;
use std::sync::{Arc, Mutex};

/// Largest request body accepted.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;
/// Seconds a client is asked to wait when the server is saturated.
const RETRY_AFTER_SECS: &str = "1";

#[derive(Clone)]
pub struct AppState {
    pub ingest: Arc<Ingest>,
    pub read: Arc<Mutex<Connection>>,
    pub model: Arc<Model>,
    pub clock: fn() -> i64,
    /// Whether `POST /v1/test/clock` may move the clock (for tests of time-driven behaviour).
    pub test_clock: bool,
}

pub fn router(state: AppState) -> Router {
    let router =
        if state.test_clock { Router::new().route("/v1/test/clock", post(advance_clock)) } else { Router::new() };
    router
        .route("/v1/events", post(post_events))
        .route("/v1/profiles/{id}", get(get_profile))
        .route("/v1/profiles/{id}/explain/{audience}", get(explain_membership))
        .route("/v1/profiles/{id}/identity", get(get_identity))
        .route("/v1/profiles/{id}/unstitch", post(unstitch))
        .route("/v1/audiences", get(get_audiences))
        .route("/v1/audiences/{name}/history", get(get_audience_history))
        .route("/v1/actions", get(get_actions))
        .route("/v1/dead-letters", get(get_dead_letters))
        .route("/healthz", get(|| async { Json(serde_json::json!({"status": "ok"})) }))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state)
}

/// An error answer: a status and a message naming the problem, as `{"error": "..."}`.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError { status, message: message.into() }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, Json(serde_json::json!({ "error": self.message }))).into_response();
        if matches!(self.status, StatusCode::SERVICE_UNAVAILABLE | StatusCode::TOO_MANY_REQUESTS) {
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

#[derive(serde::Deserialize)]
struct EventsQuery {
    /// Only parse and validate: nothing is queued or stored.
    #[serde(default)]
    dry_run: bool,
}

async fn post_events(
    State(state): State<AppState>,
    Query(query): Query<EventsQuery>,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<serde_json::Value>), ApiError> {
    let body = body.map_err(|rejection| {
        let status = rejection.status();
        let message = if status == StatusCode::PAYLOAD_TOO_LARGE {
            format!("request body is larger than {MAX_BODY_BYTES} bytes")
        } else {
            rejection.body_text()
        };
        ApiError::new(status, message)
    })?;
    let events =
        crate::ingest::parse_events(&body, (state.clock)()).map_err(|m| ApiError::new(StatusCode::BAD_REQUEST, m))?;
    if query.dry_run {
        return Ok((StatusCode::OK, Json(serde_json::json!({ "valid": events.len() }))));
    }
    // Busy, shutting down or a failed commit: nothing was acknowledged, the client may retry.
    let report =
        state.ingest.submit(events).await.map_err(|e| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, e.to_string()))?;
    Ok((StatusCode::ACCEPTED, Json(serde_json::to_value(report).expect("report serializes"))))
}

async fn read<T: Send + 'static>(
    state: &AppState,
    f: impl FnOnce(&Connection) -> starling_store::Result<T> + Send + 'static,
) -> Result<T, ApiError> {
    let conn = state.read.clone();
    Ok(tokio::task::spawn_blocking(move || f(&conn.lock().expect("read connection")))
        .await
        .map_err(|_| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "read task failed"))??)
}

async fn get_profile(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let lookup = id.clone();
    match read(&state, move |c| starling_store::find_profile(c, &lookup)).await? {
        Some(profile) => Ok(Json(profile.to_json())),
        None => Err(ApiError::new(StatusCode::NOT_FOUND, format!("no profile for id `{id}`"))),
    }
}

async fn get_identity(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let lookup = id.clone();
    let graph = read(&state, move |c| {
        let Some(profile) = starling_store::resolve_identity(c, &lookup)? else { return Ok(None) };
        let ids = starling_store::ids_of(c, &profile)?;
        let history = starling_store::identity_history(c, &profile)?;
        Ok(Some(serde_json::json!({ "profile_id": profile, "ids": ids, "history": history })))
    })
    .await?;
    graph.map(Json).ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, format!("no profile for id `{id}`")))
}

async fn unstitch(State(state): State<AppState>, Path(id): Path<String>) -> Result<Json<serde_json::Value>, ApiError> {
    match state.ingest.unstitch(&id).await {
        Ok(result) => Ok(Json(result)),
        Err(crate::pipeline::IngestError::Failed(reason)) => Err(ApiError::new(StatusCode::CONFLICT, reason)),
        Err(e) => Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, e.to_string())),
    }
}

async fn get_audiences(State(state): State<AppState>) -> Result<Json<serde_json::Value>, ApiError> {
    let sizes = read(&state, starling_store::audience_sizes).await?;
    let audiences: Vec<serde_json::Value> = state
        .model
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
            })
        })
        .collect();
    Ok(Json(serde_json::json!({ "audiences": audiences })))
}

#[derive(serde::Deserialize)]
struct HistoryQuery {
    /// RFC 3339; default: 24 hours ago.
    since: Option<String>,
}

async fn get_audience_history(
    State(state): State<AppState>,
    Path(name): Path<String>,
    Query(q): Query<HistoryQuery>,
) -> Result<Json<serde_json::Value>, ApiError> {
    if state.model.audience(&name).is_none() {
        return Err(ApiError::new(StatusCode::NOT_FOUND, format!("no audience named `{name}`")));
    }
    let since = match &q.since {
        None => (state.clock)() - 24 * 3_600_000,
        Some(s) => starling_core::time::parse_rfc3339(s).ok_or_else(|| {
            ApiError::new(StatusCode::BAD_REQUEST, format!("since: `{s}` is not an RFC 3339 timestamp"))
        })?,
    };
    let audience = name.clone();
    let samples = read(&state, move |c| starling_store::audience_size_history(c, &audience, since)).await?;
    let samples: Vec<_> = samples
        .into_iter()
        .map(|(at, size)| serde_json::json!({ "at": starling_core::time::format_rfc3339(at), "size": size }))
        .collect();
    Ok(Json(serde_json::json!({ "audience": name, "samples": samples })))
}

async fn explain_membership(
    State(state): State<AppState>,
    Path((id, audience)): Path<(String, String)>,
) -> Result<Json<serde_json::Value>, ApiError> {
    if state.model.audience(&audience).is_none() {
        return Err(ApiError::new(StatusCode::NOT_FOUND, format!("no audience named `{audience}`")));
    }
    let lookup = id.clone();
    let Some(profile) = read(&state, move |c| starling_store::find_profile(c, &lookup)).await? else {
        return Err(ApiError::new(StatusCode::NOT_FOUND, format!("no profile for id `{id}`")));
    };
    let explained = starling_core::engine::explain(&state.model, &profile, &audience, (state.clock)())
        .expect("audience checked above");
    Ok(Json(explained))
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
    let ms = starling_core::config::parse_duration(&change.advance)
        .map_err(|m| ApiError::new(StatusCode::BAD_REQUEST, format!("advance: {m}")))?;
    let now = crate::advance_clock(ms);
    Ok(Json(serde_json::json!({ "now": starling_core::time::format_rfc3339(now) })))
}

#[derive(serde::Deserialize)]
struct ActionsQuery {
    status: Option<String>,
    limit: Option<usize>,
}

async fn get_actions(
    State(state): State<AppState>,
    Query(q): Query<ActionsQuery>,
) -> Result<Json<serde_json::Value>, ApiError> {
    if let Some(s) = &q.status
        && !["pending", "delivered", "failed", "cancelled"].contains(&s.as_str())
    {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("status: `{s}` is not one of pending, delivered, failed, cancelled"),
        ));
    }
    let limit = q.limit.unwrap_or(100).min(10_000);
    let rows = read(&state, move |c| starling_store::list_actions(c, q.status.as_deref(), limit)).await?;
    Ok(Json(serde_json::json!({ "actions": rows })))
}

async fn get_dead_letters(
    State(state): State<AppState>,
    Query(q): Query<ActionsQuery>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let limit = q.limit.unwrap_or(100).min(10_000);
    let rows = read(&state, move |c| starling_store::dead_letters(c, limit)).await?;
    Ok(Json(serde_json::json!({ "dead_letters": rows })))
}

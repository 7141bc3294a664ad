//! Reads answered from a cluster node's own copy of the state while no node can serve them (a
//! failover: the owner died and its lease has not lapsed yet, or a new owner is starting). The
//! copy is what this node applied of the stream as a standby, so it may lack the owner's last
//! records and the events taken in meanwhile: each answer says it comes from the copy, why, and
//! which stream position the copy includes. What would write or evaluate waits for a node to
//! serve (`503`).

use crate::api::{
    ActionsQuery, ApiError, HistoryQuery, LimitQuery, actions_of, audience_history_of, audiences_of, audit_of,
    dead_letters_of, explanation_of, export_of, identity_of, no_profile, profile_of,
};
use crate::intake::Taking;
use crate::personalize::RateLimits;
use crate::reconfigure::{ConfigHistoryQuery, audience_of, config_history_of, config_json, no_audience};
use crate::wire::Admission;
use axum::Json;
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use rusqlite::Connection;
use std::sync::Arc;

/// On every answer a cluster node gives: `engine` (the engine serving the profile answered, on
/// this node or the one it forwarded to) or `copy` (this node's copy, below).
pub(crate) const ANSWERED_FROM_HEADER: &str = "x-starling-answered-from";
/// On an answer from the copy: the last stream position the copy includes.
pub(crate) const COPY_POSITION_HEADER: &str = "x-starling-copy-position";
/// On an answer from the copy: why the engine did not answer.
pub(crate) const COPY_REASON_HEADER: &str = "x-starling-copy-reason";

/// Whether the copy can answer `request`: a read of stored state that writes nothing: one
/// profile (`GET /v1/profiles/{id}`, its `/identity`, `/export` and `/explain/{audience}`), a page's
/// visitor (`/v1/visitor/{id}`, and its CORS preflight), the audiences (`/v1/audiences`,
/// `/v1/audiences/{name}` and its `/history`), actions, dead letters, the audit log and the
/// configuration (`/v1/config` and its `/history`).
pub(crate) fn answers(request: &Request) -> bool {
    let segments: Vec<&str> = request.uri().path().strip_prefix("/v1/").unwrap_or_default().split('/').collect();
    let named = |name: &&str| !name.is_empty();
    let read = match segments.as_slice() {
        ["profiles", id] | ["profiles", id, "identity" | "export"] => named(id),
        ["profiles", id, "explain", audience] => named(id) && named(audience),
        ["visitor", id] => return named(id) && matches!(*request.method(), Method::GET | Method::OPTIONS),
        ["audiences"] | ["actions"] | ["dead-letters"] | ["audit"] | ["config"] | ["config", "history"] => true,
        // `preview` is an evaluation, posted.
        ["audiences", name] => named(name) && *name != "preview",
        ["audiences", name, "history"] => named(name),
        _ => false,
    };
    read && request.method() == Method::GET
}

/// A node's copy of the state, and how requests to it are checked (as the engine checks them).
#[derive(Clone)]
pub(crate) struct CopyReader {
    pub(crate) database: Arc<std::path::Path>,
    pub(crate) checks: Taking,
    /// Pages' reads of their visitor, counted per key as the engine counts them.
    pub(crate) personalization: Arc<RateLimits>,
}

impl CopyReader {
    /// Answers a request [`answers`] accepts from the copy; `reason` says why the engine could
    /// not.
    pub(crate) async fn answer(&self, request: Request, reason: &str) -> Response {
        let admin = axum::Router::new()
            .route("/v1/profiles/{id}", get(profile))
            .route("/v1/profiles/{id}/identity", get(identity))
            .route("/v1/profiles/{id}/export", get(export))
            .route("/v1/profiles/{id}/explain/{audience}", get(explanation))
            .route("/v1/audiences", get(audiences))
            .route("/v1/audiences/{name}", get(audience))
            .route("/v1/audiences/{name}/history", get(audience_history))
            .route("/v1/actions", get(actions))
            .route("/v1/dead-letters", get(dead_letters))
            .route("/v1/audit", get(audit))
            .route("/v1/config", get(config))
            .route("/v1/config/history", get(config_history))
            .route_layer(axum::middleware::from_fn_with_state(self.clone(), require_admin));
        let visitor = axum::Router::new()
            .route("/v1/visitor/{id}", get(visitor))
            .layer(crate::personalize::cors(self.checks.config()));
        let routes = admin
            .merge(visitor)
            .layer(axum::middleware::from_fn_with_state(self.clone(), check_host))
            .with_state(self.clone());
        let mut response = tower::ServiceExt::oneshot(routes, request).await.unwrap_or_else(|e| match e {});
        let headers = response.headers_mut();
        headers.insert(HeaderName::from_static(ANSWERED_FROM_HEADER), HeaderValue::from_static("copy"));
        if let Ok(reason) = HeaderValue::from_str(reason) {
            headers.insert(HeaderName::from_static(COPY_REASON_HEADER), reason);
        }
        response
    }

    /// Reads the copy in one transaction with the stream position it includes, which the
    /// answer states.
    async fn read<T: Send + 'static>(
        &self,
        reading: impl FnOnce(&Connection) -> starling_store::Result<T> + Send + 'static,
        answer: impl FnOnce(T) -> Response,
    ) -> Response {
        let database = self.database.clone();
        let read = tokio::task::spawn_blocking(move || -> starling_store::Result<_> {
            // Read-only: a copy being replaced (a snapshot restored) is an error, not a new file.
            let mut conn = starling_store::open_read_only(&database)?;
            let tx = conn.transaction()?;
            let position = starling_store::log_positions(&tx)?.into_iter().map(|(_, p)| p).max().unwrap_or(0);
            Ok((position, reading(&tx)?))
        })
        .await;
        let (position, found) = match read {
            Ok(Ok(read)) => read,
            Ok(Err(e)) => {
                tracing::warn!("reading this node's copy: {e}");
                return unavailable();
            }
            Err(_) => return unavailable(),
        };
        let mut response = answer(found);
        response.headers_mut().insert(HeaderName::from_static(COPY_POSITION_HEADER), HeaderValue::from(position));
        response
    }
}

/// Refuses requests whose `Host` is not a name of this server, as the engine does.
async fn check_host(State(copy): State<CopyReader>, request: Request, next: axum::middleware::Next) -> Response {
    match crate::origin::refusal(copy.checks.hosts(), request.headers(), false) {
        None => next.run(request).await,
        Some(why) => ApiError::new(StatusCode::FORBIDDEN, why).into_response(),
    }
}

/// Checks a request as the engine checks admin calls (a page on another site, admin token).
async fn require_admin(State(copy): State<CopyReader>, request: Request, next: axum::middleware::Next) -> Response {
    if let Some(why) = crate::origin::refusal(copy.checks.hosts(), request.headers(), true) {
        return ApiError::new(StatusCode::FORBIDDEN, why).into_response();
    }
    match copy.checks.config().keys().check_admin(request.headers()) {
        Ok(()) => next.run(request).await,
        Err(denied) => crate::api::unauthorized(&denied, "Bearer").into_response(),
    }
}

fn unavailable() -> Response {
    ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "no node serves yet and this node's copy cannot be read")
        .into_response()
}

fn json_or(found: Option<serde_json::Value>, missing: ApiError) -> Response {
    match found {
        Some(found) => Json(found).into_response(),
        None => missing.into_response(),
    }
}

async fn profile(State(copy): State<CopyReader>, Path(id): Path<String>) -> Response {
    let (model, lookup) = (copy.checks.config().model(), id.clone());
    copy.read(move |c| profile_of(c, &model, &lookup), |found| json_or(found, no_profile(&id))).await
}

async fn identity(State(copy): State<CopyReader>, Path(id): Path<String>) -> Response {
    let lookup = id.clone();
    copy.read(move |c| identity_of(c, &lookup), |found| json_or(found, no_profile(&id))).await
}

async fn export(State(copy): State<CopyReader>, Path(id): Path<String>) -> Response {
    let (model, lookup) = (copy.checks.config().model(), id.clone());
    copy.read(move |c| export_of(c, &model, &lookup), |found| json_or(found, no_profile(&id))).await
}

async fn explanation(State(copy): State<CopyReader>, Path((id, audience)): Path<(String, String)>) -> Response {
    let model = copy.checks.config().model();
    if model.audience(&audience).is_none() {
        return no_audience(&audience).into_response();
    }
    let (lookup, now) = (id.clone(), crate::system_clock());
    let reading = move |c: &Connection| explanation_of(c, &model, &lookup, &audience, now);
    copy.read(reading, |found| json_or(found, no_profile(&id))).await
}

async fn visitor(State(copy): State<CopyReader>, Path(id): Path<String>, headers: HeaderMap) -> Response {
    let live = copy.checks.config();
    if let Some(refused) = crate::personalize::refusal(&live, &copy.personalization, &headers) {
        return refused;
    }
    let lookup = id.clone();
    let reading = move |c: &Connection| starling_store::find_profile(c, &lookup);
    copy.read(reading, |found| crate::personalize::view(&live.model(), &id, found)).await
}

async fn audiences(State(copy): State<CopyReader>) -> Response {
    let live = copy.checks.config();
    copy.read(move |c| audiences_of(c, &live), |found| Json(found).into_response()).await
}

async fn audience(State(copy): State<CopyReader>, Path(name): Path<String>) -> Response {
    let (live, lookup) = (copy.checks.config(), name.clone());
    copy.read(move |c| audience_of(c, &live, &lookup), |found| json_or(found, no_audience(&name))).await
}

async fn audience_history(
    State(copy): State<CopyReader>,
    Path(name): Path<String>,
    Query(q): Query<HistoryQuery>,
) -> Response {
    let since = match q.since(&copy.checks.config().model(), &name, crate::system_clock()) {
        Ok(since) => since,
        Err(refused) => return refused.into_response(),
    };
    copy.read(move |c| audience_history_of(c, &name, since), |found| Json(found).into_response()).await
}

async fn actions(State(copy): State<CopyReader>, Query(q): Query<ActionsQuery>) -> Response {
    let (status, limit) = match q.parse() {
        Ok(parsed) => parsed,
        Err(refused) => return refused.into_response(),
    };
    copy.read(move |c| actions_of(c, status, limit), |found| Json(found).into_response()).await
}

async fn dead_letters(State(copy): State<CopyReader>, Query(q): Query<LimitQuery>) -> Response {
    let limit = q.limit();
    copy.read(move |c| dead_letters_of(c, limit), |found| Json(found).into_response()).await
}

async fn audit(State(copy): State<CopyReader>, Query(q): Query<LimitQuery>) -> Response {
    let limit = q.limit();
    copy.read(move |c| audit_of(c, limit), |found| Json(found).into_response()).await
}

/// The configuration this copy last applied records with (the owner's, as it published it).
async fn config(State(copy): State<CopyReader>) -> Response {
    let reading = |c: &Connection| starling_store::active_config(c);
    copy.read(reading, |found| match found {
        Some(record) => {
            let active = crate::live::Active {
                version: record.version,
                sha256: record.sha256,
                applied_ms: record.applied_ms,
                how: record.how,
            };
            Json(config_json(&active, &record.source, None)).into_response()
        }
        None => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "this node's copy has recorded no configuration yet")
            .into_response(),
    })
    .await
}

async fn config_history(State(copy): State<CopyReader>, Query(q): Query<ConfigHistoryQuery>) -> Response {
    let with_source = q.with_source();
    copy.read(move |c| config_history_of(c, with_source), |found| Json(found).into_response()).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(method: Method, path: &str) -> Request {
        Request::builder().method(method).uri(path).body(axum::body::Body::empty()).unwrap()
    }

    #[test]
    fn the_copy_answers_reads_of_stored_state_only() {
        let reads = [
            "/v1/profiles/v1",
            "/v1/profiles/v%201/identity",
            "/v1/profiles/v1/export",
            "/v1/profiles/v1/explain/vip",
            "/v1/visitor/v1",
            "/v1/audiences",
            "/v1/audiences/vip",
            "/v1/audiences/vip/history?since=2026-01-01T00:00:00Z",
            "/v1/actions?status=pending",
            "/v1/dead-letters",
            "/v1/audit",
            "/v1/config",
            "/v1/config/history?source=true",
        ];
        for path in reads {
            assert!(answers(&request(Method::GET, path)), "{path}");
        }
        assert!(answers(&request(Method::OPTIONS, "/v1/visitor/v1")), "a page's preflight");
        let others = [
            "/v1/profiles/",
            "/v1/profiles/v1/explain/",
            "/v1/profiles/v1/explain/a/b",
            "/v1/profiles/v1/export/x",
            "/v1/visitor/",
            "/v1/audiences/",
            "/v1/audiences/preview",
            "/v1/config/x",
            "/v1/trace/v1",
            "/v1/backup",
            "/metrics",
        ];
        for path in others {
            assert!(!answers(&request(Method::GET, path)), "{path}");
        }
        assert!(!answers(&request(Method::DELETE, "/v1/profiles/v1")), "a deletion waits for the engine");
        assert!(!answers(&request(Method::POST, "/v1/audiences/preview")), "an evaluation waits for the engine");
        assert!(!answers(&request(Method::PUT, "/v1/config")), "a change waits for the engine");
        assert!(!answers(&request(Method::OPTIONS, "/v1/audiences")), "only a page's visitor has a preflight");
    }
}

//! Reads of a profile answered from a cluster node's own copy of the state while no node can
//! serve it (a failover: the owner died and its lease has not lapsed yet, or a new owner is
//! starting). The copy is what this node applied of the stream as a standby, so it may lack the
//! owner's last records and the events taken in meanwhile: each answer says it comes from the
//! copy, why, and which stream position the copy includes. Everything else the owner's engine
//! answers waits for a node to serve (`503`).

use crate::api::{ApiError, export_of, identity_of, no_profile, profile_of};
use crate::intake::Taking;
use crate::wire::Admission;
use axum::Json;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use rusqlite::Connection;
use starling_core::Model;
use std::sync::Arc;

/// On every answer a cluster node gives: `engine` (the engine serving the profile answered, on
/// this node or the one it forwarded to) or `copy` (this node's copy, below).
pub(crate) const ANSWERED_FROM_HEADER: &str = "x-starling-answered-from";
/// On an answer from the copy: the last stream position the copy includes.
pub(crate) const COPY_POSITION_HEADER: &str = "x-starling-copy-position";
/// On an answer from the copy: why the engine did not answer.
pub(crate) const COPY_REASON_HEADER: &str = "x-starling-copy-reason";

/// Whether the copy can answer `request`: a read of one profile (`GET /v1/profiles/{id}`, its
/// `/identity` or `/export`).
pub(crate) fn answers(request: &Request) -> bool {
    let Some(rest) = request.uri().path().strip_prefix("/v1/profiles/") else { return false };
    let mut parts = rest.split('/');
    let (id, then, more) = (parts.next(), parts.next(), parts.next());
    request.method() == Method::GET
        && id.is_some_and(|id| !id.is_empty())
        && matches!(then, None | Some("identity" | "export"))
        && more.is_none()
}

/// A node's copy of the state, and how requests to it are checked (as the engine checks them).
#[derive(Clone)]
pub(crate) struct CopyReader {
    pub(crate) database: Arc<std::path::Path>,
    pub(crate) checks: Taking,
}

impl CopyReader {
    /// Answers a request [`answers`] accepts from the copy; `reason` says why the engine could
    /// not.
    pub(crate) async fn answer(&self, request: Request, reason: &str) -> Response {
        let routes = axum::Router::new()
            .route("/v1/profiles/{id}", get(profile))
            .route("/v1/profiles/{id}/identity", get(identity))
            .route("/v1/profiles/{id}/export", get(export))
            .with_state(self.clone());
        let mut response = tower::ServiceExt::oneshot(routes, request).await.unwrap_or_else(|e| match e {});
        let headers = response.headers_mut();
        headers.insert(HeaderName::from_static(ANSWERED_FROM_HEADER), HeaderValue::from_static("copy"));
        if let Ok(reason) = HeaderValue::from_str(reason) {
            headers.insert(HeaderName::from_static(COPY_REASON_HEADER), reason);
        }
        response
    }

    /// Checks the request as the engine's admin calls are checked, then reads the copy in one
    /// transaction with the position it includes.
    async fn read(&self, headers: &HeaderMap, id: String, reading: Reading) -> Response {
        if let Some(why) = crate::origin::refusal(self.checks.hosts(), headers, true) {
            return ApiError::new(StatusCode::FORBIDDEN, why).into_response();
        }
        let config = self.checks.config();
        if let Err(denied) = config.keys().check_admin(headers) {
            return crate::api::unauthorized(&denied, "Bearer").into_response();
        }
        let (database, model, lookup) = (self.database.clone(), config.model(), id.clone());
        let read = tokio::task::spawn_blocking(move || -> starling_store::Result<_> {
            // Read-only: a copy being replaced (a snapshot restored) is an error, not a new file.
            let mut conn = starling_store::open_read_only(&database)?;
            let tx = conn.transaction()?;
            let position = starling_store::log_positions(&tx)?.into_iter().map(|(_, p)| p).max().unwrap_or(0);
            Ok((position, reading(&tx, &model, &lookup)?))
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
        let mut response = match found {
            Some(found) => Json(found).into_response(),
            None => no_profile(&id).into_response(),
        };
        response.headers_mut().insert(HeaderName::from_static(COPY_POSITION_HEADER), HeaderValue::from(position));
        response
    }
}

fn unavailable() -> Response {
    ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "no node serves the profile yet and this node's copy cannot be read")
        .into_response()
}

/// Reads the copy: what a profile read finds for an id, as the model has it.
type Reading = fn(&Connection, &Model, &str) -> starling_store::Result<Option<serde_json::Value>>;

async fn profile(State(copy): State<CopyReader>, Path(id): Path<String>, headers: HeaderMap) -> Response {
    copy.read(&headers, id, profile_of).await
}

async fn identity(State(copy): State<CopyReader>, Path(id): Path<String>, headers: HeaderMap) -> Response {
    copy.read(&headers, id, |c, _, id| identity_of(c, id)).await
}

async fn export(State(copy): State<CopyReader>, Path(id): Path<String>, headers: HeaderMap) -> Response {
    copy.read(&headers, id, export_of).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(method: Method, path: &str) -> Request {
        Request::builder().method(method).uri(path).body(axum::body::Body::empty()).unwrap()
    }

    #[test]
    fn the_copy_answers_reads_of_one_profile_only() {
        for path in ["/v1/profiles/v1", "/v1/profiles/v%201/identity", "/v1/profiles/v1/export"] {
            assert!(answers(&request(Method::GET, path)), "{path}");
        }
        for path in ["/v1/profiles/", "/v1/profiles/v1/explain/a", "/v1/profiles/v1/export/x", "/v1/actions"] {
            assert!(!answers(&request(Method::GET, path)), "{path}");
        }
        assert!(!answers(&request(Method::DELETE, "/v1/profiles/v1")), "a deletion waits for the engine");
    }
}

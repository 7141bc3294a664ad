//! Ingestion while no node of a cluster serves (see [`starling_cluster::intake`]): between an
//! owner's death and a new owner serving, `POST /v1/events` on any node checks the events as
//! the engine would (key, body, times, specs), publishes each to its partition's intake subject
//! and answers `202` once the stream has them all, instead of `503`. The node that takes the
//! partitions queues what the intake holds on its engine before it serves (so whatever it is
//! sent next, reads included, comes after), and again on each of its rounds (for events taken
//! in while it was starting); once they are applied, the intake forgets them.
//!
//! An event is applied exactly once: the intake keeps a client's retry out by the event's id
//! (its `Nats-Msg-Id`), and an event without an id is given one here, so that the engine keeps
//! out a second application (a new owner that died after applying the intake, before it was
//! forgotten).

use crate::api::{ApiError, Checked};
use crate::live::Live;
use crate::wire::Admission;
use crate::{App, ServerError};
use axum::extract::{FromRequest, Request};
use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use sha2::{Digest, Sha256};
use starling_cluster::intake::Intake;
use starling_core::Event;
use starling_core::ingest::Naming;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use tokio::task::JoinHandle;

/// Whether `request` is one the intake can take: events posted to the native API or in a wire
/// format (Segment, Tealium).
pub(crate) fn takes(request: &Request) -> bool {
    let (method, path) = (request.method(), request.uri().path());
    (method == Method::POST && path == "/v1/events") || crate::wire::routed(method, path)
}

/// The body of a request [`takes`] accepts, read once: it may be forwarded, then taken in.
pub(crate) async fn body(request: Request) -> Result<(axum::http::request::Parts, Bytes), Response> {
    let (parts, body) = request.into_parts();
    let limited = Request::from_parts(parts.clone(), body);
    match Bytes::from_request(limited, &()).await {
        Ok(bytes) => Ok((parts, bytes)),
        Err(rejection) => Err(crate::api::body_error(rejection).into_response()),
    }
}

/// Taking events into the intake: what a cluster node's ingestion does while no node serves.
#[derive(Clone)]
pub(crate) struct Taking {
    /// The configuration events are checked with: the one the node would start with.
    config: Arc<RwLock<Arc<Live>>>,
    intake: Arc<Intake>,
    node: Arc<str>,
    /// The names requests may address this node by, as the engine checks them.
    hosts: Arc<crate::origin::Hosts>,
}

impl Taking {
    pub(crate) fn new(config: Arc<Live>, intake: Arc<Intake>, node: &str, listening: std::net::SocketAddr) -> Taking {
        let hosts = crate::origin::Hosts::new(&config.model().server.hostnames);
        hosts.listening_on(listening);
        Taking { config: Arc::new(RwLock::new(config)), intake, node: node.into(), hosts: Arc::new(hosts) }
    }

    /// How many events the intake holds (taken in, not yet applied and forgotten).
    pub(crate) async fn held(&self) -> Option<u64> {
        self.intake.held().await.ok()
    }

    /// The names requests may address this node by.
    pub(crate) fn hosts(&self) -> &crate::origin::Hosts {
        &self.hosts
    }

    pub(crate) fn set_config(&self, config: Arc<Live>) {
        *self.config.write().expect("configuration") = config;
    }

    /// Answers a request [`takes`] accepts, with its body read: as the engine would, saying
    /// `"queued": true` (the wire formats answer in their own shapes).
    pub(crate) async fn take_in(&self, parts: axum::http::request::Parts, body: Bytes) -> Response {
        if let Some(why) = crate::origin::refusal(&self.hosts, &parts.headers, false) {
            return ApiError::new(StatusCode::FORBIDDEN, why).into_response();
        }
        if parts.uri.path() != "/v1/events" {
            let request = Request::from_parts(parts, axum::body::Body::from(body));
            let formats = crate::wire::routes().with_state(self.clone());
            return tower::ServiceExt::oneshot(formats, request).await.unwrap_or_else(|e| match e {});
        }
        let config = self.config();
        let key_source = match config.keys().check_source(&parts.headers) {
            Ok(source) => source,
            Err(denied) => return crate::api::unauthorized(&denied, "ApiKey").into_response(),
        };
        let dry_run = parts.uri.query().is_some_and(|q| q.split('&').any(|p| p == "dry_run=true"));
        let received_ms = crate::system_clock();
        let (mut events, batch) = match starling_core::ingest::parse_request(&body, received_ms) {
            Ok(parsed) => parsed,
            Err(message) => return ApiError::new(StatusCode::BAD_REQUEST, message).into_response(),
        };
        if dry_run {
            let naming = Naming::native(batch);
            return match crate::api::check(&config.model(), &mut events, naming, key_source.as_deref(), received_ms) {
                Ok(Checked { warnings, .. }) => {
                    let answer = serde_json::json!({ "valid": events.len(), "warnings": warnings });
                    (StatusCode::OK, axum::Json(answer)).into_response()
                }
                Err((_, message)) => ApiError::new(StatusCode::BAD_REQUEST, message).into_response(),
            };
        }
        match self.admit(events, Naming::native(batch), key_source.as_deref(), received_ms).await {
            Ok(answer) => (StatusCode::ACCEPTED, axum::Json(answer)).into_response(),
            Err(refusal) => refusal.into_response(),
        }
    }

    /// Checks `events` and publishes each to its partition's intake subject.
    async fn publish(
        &self,
        mut events: Vec<Event>,
        naming: Naming,
        key_source: Option<&str>,
        received_ms: i64,
    ) -> Result<serde_json::Value, ApiError> {
        let Checked { warnings, .. } =
            crate::api::check(&self.config().model(), &mut events, naming, key_source, received_ms)
                .map_err(|(_, message)| ApiError::new(StatusCode::BAD_REQUEST, message))?;
        // The node taking over applies what the intake holds ahead of what it is sent next: the
        // limit (`cluster.intake_limit`) bounds how long new requests wait behind it. Beyond it,
        // events are refused as the engine refuses work beyond its queues.
        let limit = self.config().model().cluster.as_ref().map_or(0, |c| c.intake_limit);
        match self.intake.held().await {
            Ok(held) if held + events.len() as u64 <= limit => {}
            Ok(held) => {
                let message = format!(
                    "no node of the cluster serves yet, and the intake holds {held} events (at most {limit}); retry"
                );
                return Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, message));
            }
            Err(e) => {
                tracing::warn!("taking events in: {e}");
                let message = "no node of the cluster serves yet, and the intake cannot be reached; retry";
                return Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, message));
            }
        }
        let publishes = events.into_iter().map(|mut event| {
            let id = intake_id(&self.node, &mut event);
            let partition = starling_log::partition_of(&event.visitor_id);
            let payload = Bytes::from(serde_json::to_vec(&event).expect("an event serializes"));
            async move { self.intake.publish(partition, &id, payload).await }
        });
        let (mut accepted, mut duplicates) = (0, 0);
        for published in futures_util::future::join_all(publishes).await {
            match published {
                Ok(true) => duplicates += 1,
                Ok(false) => accepted += 1,
                // The client sends the request again; what the intake took is kept out then.
                Err(e) => {
                    tracing::warn!("taking events in: {e}");
                    let message = "no node of the cluster serves yet, and the intake could not take every event; retry";
                    return Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, message));
                }
            }
        }
        let mut answer = serde_json::json!({ "accepted": accepted, "duplicates": duplicates, "queued": true });
        if !warnings.is_empty() {
            answer["warnings"] = serde_json::json!(warnings);
        }
        Ok(answer)
    }
}

impl crate::wire::Admission for Taking {
    fn config(&self) -> Arc<Live> {
        self.config.read().expect("configuration").clone()
    }

    fn now_ms(&self) -> i64 {
        crate::system_clock()
    }

    fn reject(&self, reason: &str, events: u64) {
        tracing::debug!(reason, events, "events refused while no node serves");
    }

    fn admit(
        &self,
        events: Vec<Event>,
        naming: Naming,
        key_source: Option<&str>,
        received_ms: i64,
    ) -> impl Future<Output = Result<serde_json::Value, ApiError>> + Send {
        self.publish(events, naming, key_source, received_ms)
    }
}

/// The intake id of `event`: a digest of what the engine deduplicates it by; an event without
/// an id is given one first, unique to this node and process.
pub(crate) fn intake_id(node: &str, event: &mut Event) -> String {
    static TAKEN: AtomicU64 = AtomicU64::new(0);
    static RUN: std::sync::OnceLock<i64> = std::sync::OnceLock::new();
    if event.id.is_none() {
        let run = RUN.get_or_init(crate::system_clock);
        event.id = Some(format!("intake-{node}-{run}-{}", TAKEN.fetch_add(1, Ordering::Relaxed)));
    }
    let key = event.dedup_key().expect("the event has an id");
    let digest = Sha256::digest(key.as_bytes());
    digest[..16].iter().map(|b| format!("{b:02x}")).collect()
}

/// Queues what the intake holds on `app`'s engine, ahead of anything sent to it after; the task
/// returned waits until it is applied, then has the intake forget it. `None`: the intake was
/// empty.
pub(crate) async fn apply(app: &App, intake: Arc<Intake>) -> Result<Option<JoinHandle<()>>, ServerError> {
    let cluster = |e: starling_cluster::ClusterError| ServerError::Cluster(format!("applying the intake: {e}"));
    let mut events = Vec::new();
    let mut unreadable = 0;
    let last = intake
        .read(&mut |payload| match serde_json::from_slice::<Event>(&payload) {
            Ok(event) => events.push(event),
            Err(_) => unreadable += 1,
        })
        .await
        .map_err(cluster)?;
    if last == 0 {
        return Ok(None);
    }
    if unreadable > 0 {
        tracing::warn!(unreadable, "intake messages that are not events were skipped");
    }
    let (taken, started) = (events.len(), std::time::Instant::now());
    let queued =
        app.state.ingest.send(events).map_err(|e| ServerError::Cluster(format!("applying the intake: {e}")))?;
    Ok(Some(tokio::spawn(async move {
        // Not applied (the engine stopping, a failed commit): the intake keeps the events, and
        // the next owner, or this one's next round, applies them; ids keep any applied out.
        if let Err(e) = queued.durable().await {
            tracing::warn!("applying the intake: {e}");
            return;
        }
        let elapsed_ms = started.elapsed().as_millis() as u64;
        tracing::info!(events = taken, elapsed_ms, "applied the events taken in while no node served");
        if let Err(e) = intake.forget_through(last).await {
            tracing::warn!("the intake did not forget what was applied: {e}");
        }
    })))
}

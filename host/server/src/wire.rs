//! Ingestion in the wire formats tracking code already speaks: Segment's HTTP Tracking API
//! (`/v1/batch`, `/v1/track`, `/v1/t`, ...) and Tealium's Collect API (`/event`, `/bulk-event`).
//! Both read their requests into events (`starling_core::wire`) and hand them to the same
//! admission as `POST /v1/events`: the engine's ([`AppState`]), or, on a cluster node while no
//! node serves, the intake's (`crate::intake`).

use crate::api::{ApiError, AppState, MAX_BODY_BYTES};
use axum::Extension;
use axum::Router;
use axum::extract::rejection::BytesRejection;
use axum::extract::{ConnectInfo, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use base64::Engine;
use bytes::Bytes;
use starling_core::ingest::Naming;
use starling_core::wire::{segment, tealium};
use std::io::Read;
use std::net::SocketAddr;
use std::sync::Arc;

/// The paths of Segment's calls, with the short forms analytics.js uses.
pub const SEGMENT_PATHS: [&str; 15] =
    ["batch", "b", "import", "track", "t", "identify", "i", "page", "p", "screen", "s", "group", "g", "alias", "a"];

/// Where checked events go, and what they are checked against.
pub(crate) trait Admission: Clone + Send + Sync + 'static {
    /// The configuration events are checked against (keys, sources, specs).
    fn config(&self) -> Arc<crate::live::Live>;
    fn now_ms(&self) -> i64;
    /// Counts events refused for `reason`.
    fn reject(&self, reason: &str, events: u64);
    /// Checks parsed events and takes them: the answer of `POST /v1/events`.
    fn admit(
        &self,
        events: Vec<starling_core::Event>,
        naming: Naming,
        key_source: Option<&str>,
        received_ms: i64,
    ) -> impl Future<Output = Result<serde_json::Value, ApiError>> + Send;
}

impl Admission for AppState {
    fn config(&self) -> Arc<crate::live::Live> {
        self.config.clone()
    }

    fn now_ms(&self) -> i64 {
        (self.clock)()
    }

    fn reject(&self, reason: &str, events: u64) {
        self.telemetry.metrics.reject(reason, events);
    }

    fn admit(
        &self,
        events: Vec<starling_core::Event>,
        naming: Naming,
        key_source: Option<&str>,
        received_ms: i64,
    ) -> impl Future<Output = Result<serde_json::Value, ApiError>> + Send {
        crate::api::admit(self, events, naming, key_source, received_ms, false)
    }
}

/// The paths [`routes`] answers, and with which method.
pub(crate) fn routed(method: &axum::http::Method, path: &str) -> bool {
    let segment = path.strip_prefix("/v1/").is_some_and(|call| SEGMENT_PATHS.contains(&call));
    match *method {
        axum::http::Method::POST => segment || path == "/event" || path == "/bulk-event",
        axum::http::Method::GET => path == "/event",
        _ => false,
    }
}

/// Routes of both formats. Pages on any site send to them (as to Segment's and Tealium's
/// collectors), so they answer any origin; the write key or the Tealium data source decides
/// what is taken.
pub(crate) fn routes<S: Admission>() -> Router<S> {
    let mut router = Router::new();
    for path in SEGMENT_PATHS {
        let call = segment::Call::from_path(path).expect("every path names a call");
        router = router.route(
            &format!("/v1/{path}"),
            post(
                move |state: State<S>,
                      peer: Option<Extension<ConnectInfo<SocketAddr>>>,
                      headers: HeaderMap,
                      body: Result<Bytes, BytesRejection>| {
                    segment_call(state, call, peer.map(|Extension(ConnectInfo(peer))| peer), headers, body)
                },
            ),
        );
    }
    router
        .route("/event", post(tealium_event::<S>).get(tealium_pixel::<S>))
        .route("/bulk-event", post(tealium_bulk::<S>))
        .layer(
            tower_http::cors::CorsLayer::new()
                .allow_origin(tower_http::cors::Any)
                .allow_methods([axum::http::Method::GET, axum::http::Method::POST])
                .allow_headers([header::CONTENT_TYPE, header::AUTHORIZATION, header::CONTENT_ENCODING]),
        )
}

/// A refusal in the shape Segment's libraries read: `{"success": false, "error": ...}`.
fn refuse(state: &impl Admission, status: StatusCode, reason: &str, message: impl Into<String>) -> Response {
    state.reject(reason, 1);
    let mut response =
        (status, axum::Json(serde_json::json!({"success": false, "error": message.into()}))).into_response();
    if status == StatusCode::UNAUTHORIZED {
        response.headers_mut().insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Basic"));
    }
    response
}

/// Why a body was not read: status, metric reason, message.
type Unread = (StatusCode, &'static str, String);

/// The body, gunzipped when it says it is gzip, and no larger than `limit` once inflated.
fn inflate(headers: &HeaderMap, body: Result<Bytes, BytesRejection>, limit: usize) -> Result<Bytes, Unread> {
    let body = body.map_err(|rejection| {
        let status = rejection.status();
        if status == StatusCode::PAYLOAD_TOO_LARGE {
            (status, "too_large", format!("the request is larger than {MAX_BODY_BYTES} bytes"))
        } else {
            (status, "invalid", format!("the request could not be read: {rejection}"))
        }
    })?;
    let encoding = headers.get(header::CONTENT_ENCODING).and_then(|v| v.to_str().ok()).unwrap_or("identity");
    match encoding.trim().to_ascii_lowercase().as_str() {
        "identity" | "" => Ok(body),
        "gzip" => {
            let mut inflated = Vec::new();
            // One byte past the limit says it was over, without inflating a bomb further.
            let read = flate2::read::MultiGzDecoder::new(&body[..]).take(limit as u64 + 1).read_to_end(&mut inflated);
            match read {
                Err(e) => Err((StatusCode::BAD_REQUEST, "invalid", format!("the gzip body is damaged: {e}"))),
                Ok(n) if n > limit => Err((
                    StatusCode::BAD_REQUEST,
                    "too_large",
                    format!("the request inflates to more than {limit} bytes; a batch may have at most {limit}"),
                )),
                Ok(_) => Ok(inflated.into()),
            }
        }
        other => Err((
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "invalid",
            format!("Content-Encoding `{other}` is not supported (gzip is)"),
        )),
    }
}

/// The write key of a Segment request: the HTTP basic user, else the body's `writeKey`.
fn basic_user(headers: &HeaderMap) -> Option<String> {
    let encoded = headers.get(header::AUTHORIZATION)?.to_str().ok()?.strip_prefix("Basic ")?;
    let decoded = base64::engine::general_purpose::STANDARD.decode(encoded.trim()).ok()?;
    let text = String::from_utf8(decoded).ok()?;
    Some(text.split_once(':').map_or(text.clone(), |(user, _)| user.to_string()))
}

async fn segment_call<S: Admission>(
    State(state): State<S>,
    call: segment::Call,
    peer: Option<SocketAddr>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    // A too large message is one no retry will make smaller: 400, as Segment answers.
    let limit = if call == segment::Call::Batch { segment::MAX_BATCH_BYTES } else { segment::MAX_MESSAGE_BYTES };
    let body = match inflate(&headers, body, limit) {
        Ok(body) => body,
        Err((status, reason, message)) => return refuse(&state, status, reason, message),
    };
    let received_ms = state.now_ms();
    let mut request = match segment::parse(&body, call, received_ms) {
        Ok(request) => request,
        Err(message) => return refuse(&state, StatusCode::BAD_REQUEST, "invalid", message),
    };
    if let Some(peer) = peer {
        segment::fill_ip(&mut request.events, &peer.ip().to_string());
    }
    let keys = state.config().keys();
    let key_source = match basic_user(&headers).or(request.write_key) {
        Some(key) => match keys.source_of(&key) {
            Ok(source) => source,
            Err(denied) => {
                return refuse(
                    &state,
                    StatusCode::UNAUTHORIZED,
                    "unauthorized",
                    denied.message().replace("API key", "write key"),
                );
            }
        },
        None if keys.sources_required() => {
            return refuse(
                &state,
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "write key required (HTTP basic user, or writeKey)",
            );
        }
        None => None,
    };
    // A message's fields are its own (`properties.total`), in `batch[3].` of a batch.
    let naming = Naming { list: (call == segment::Call::Batch).then_some("batch"), data: "" };
    match state.admit(request.events, naming, key_source.as_deref(), received_ms).await {
        Ok(_) => axum::Json(serde_json::json!({"success": true})).into_response(),
        Err(refusal) => {
            let message = refusal.message().to_string();
            let mut response =
                (refusal.status(), axum::Json(serde_json::json!({"success": false, "error": message}))).into_response();
            if let Some(wait) = refusal.into_response().headers().get(header::RETRY_AFTER) {
                response.headers_mut().insert(header::RETRY_AFTER, wait.clone());
            }
            response
        }
    }
}

async fn tealium_event<S: Admission>(
    state: State<S>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    tealium_post(state, headers, body, tealium::parse_event, false).await
}

async fn tealium_bulk<S: Admission>(
    state: State<S>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    tealium_post(state, headers, body, tealium::parse_bulk, true).await
}

/// A Collect POST: the body inflated, read with `parse`, taken as its data source's.
async fn tealium_post<S: Admission>(
    State(state): State<S>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
    parse: fn(&[u8], i64) -> Result<tealium::Collect, String>,
    batch: bool,
) -> Response {
    let received_ms = state.now_ms();
    match inflate(&headers, body, MAX_BODY_BYTES) {
        Ok(body) => collect(&state, parse(&body, received_ms), batch, received_ms).await,
        Err((status, reason, message)) => collect_refusal(&state, status, reason, message),
    }
}

/// A 1×1 transparent GIF: what the pixel form answers, so an `<img>` loads.
const PIXEL: &[u8] = b"GIF89a\x01\x00\x01\x00\x80\x00\x00\x00\x00\x00\xff\xff\xff!\xf9\x04\x01\x00\x00\x00\x00,\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02D\x01\x00;";

async fn tealium_pixel<S: Admission>(State(state): State<S>, Query(pairs): Query<Vec<(String, String)>>) -> Response {
    let received_ms = state.now_ms();
    let answer = collect(&state, tealium::parse_query(pairs, received_ms), false, received_ms).await;
    if !answer.status().is_success() {
        return answer;
    }
    ([(header::CONTENT_TYPE, "image/gif"), (header::CACHE_CONTROL, "no-store")], PIXEL).into_response()
}

fn collect_refusal(state: &impl Admission, status: StatusCode, reason: &str, message: String) -> Response {
    state.reject(reason, 1);
    ApiError::new(status, message).into_response()
}

/// Takes a Collect request as the data source its account, profile and datasource name.
async fn collect(
    state: &impl Admission,
    parsed: Result<tealium::Collect, String>,
    batch: bool,
    received_ms: i64,
) -> Response {
    let request = match parsed {
        Ok(request) => request,
        Err(message) => return collect_refusal(state, StatusCode::BAD_REQUEST, "invalid", message),
    };
    let model = state.config().model();
    let key_source = if model.sources.is_empty() {
        None
    } else {
        let datasource = request.datasource.as_deref();
        match model
            .sources
            .iter()
            .find(|s| s.tealium.as_ref().is_some_and(|t| t.admits(&request.account, &request.profile, datasource)))
        {
            Some(source) => Some(source.name.clone()),
            None => {
                let message = format!(
                    "no data source takes tealium_account `{}`, tealium_profile `{}`{}",
                    request.account,
                    request.profile,
                    datasource.map(|d| format!(", tealium_datasource `{d}`")).unwrap_or_default()
                );
                return collect_refusal(state, StatusCode::FORBIDDEN, "unauthorized", message);
            }
        }
    };
    drop(model);
    // A data layer's fields are its own (`order_total`), in `events[3].` of a bulk request.
    let naming = Naming { list: batch.then_some("events"), data: "" };
    match state.admit(request.events, naming, key_source.as_deref(), received_ms).await {
        Ok(answer) => (StatusCode::OK, axum::Json(answer)).into_response(),
        Err(refusal) => refusal.into_response(),
    }
}

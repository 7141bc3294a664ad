//! A small blocking HTTP client over `wasi:http/outgoing-handler`.
//!
//! The host checks every request against the plugin's allowed hosts; a refused request fails
//! with [`HttpError::Denied`].

use crate::bindings::wasi::http::outgoing_handler;
use crate::bindings::wasi::http::types::{
    ErrorCode, Fields, IncomingBody, Method, OutgoingBody, OutgoingRequest, Scheme,
};
use crate::bindings::wasi::io::streams::StreamError;
use std::fmt;

/// Most bytes a response body may have before it is cut off.
const MAX_RESPONSE_BYTES: usize = 4 * 1024 * 1024;

/// Why a request got no response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HttpError {
    /// The URL could not be parsed.
    InvalidUrl(String),
    /// The host refused the request (destination not in the plugin's allowed hosts).
    Denied(String),
    /// Connection, protocol or timeout failure.
    Transport(String),
}

impl fmt::Display for HttpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HttpError::InvalidUrl(m) => write!(f, "invalid URL: {m}"),
            HttpError::Denied(m) => write!(f, "request denied by the host: {m}"),
            HttpError::Transport(m) => write!(f, "transport error: {m}"),
        }
    }
}

impl From<HttpError> for crate::DeliveryError {
    /// A denied request or a bad URL will not succeed later; transport errors may.
    fn from(e: HttpError) -> Self {
        match e {
            HttpError::Transport(_) => crate::DeliveryError::retryable(e.to_string()),
            HttpError::Denied(_) | HttpError::InvalidUrl(_) => crate::DeliveryError::permanent(e.to_string()),
        }
    }
}

/// An outgoing request, built step by step and sent with [`Request::send`].
///
/// ```
/// use starling_sdk::http::Request;
///
/// let request = Request::post("https://hooks.example.com/in")
///     .header("authorization", "Bearer abc")
///     .json(&serde_json::json!({ "profile": "p-1" }));
/// assert_eq!(request.url(), "https://hooks.example.com/in");
/// assert_eq!(request.headers()[1], ("content-type".to_string(), "application/json".to_string()));
/// ```
pub struct Request {
    method: Method,
    url: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

/// A response, read whole (bodies past 4 MiB are cut off).
///
/// ```
/// use starling_sdk::http::Response;
/// use starling_sdk::DeliveryError;
///
/// let busy = Response { status: 429, headers: vec![("Retry-After".into(), "30".into())], body: Vec::new() };
/// assert_eq!(busy.header("retry-after"), Some("30"));
/// assert!(matches!(busy.delivery_result(), Err(DeliveryError::RateLimited(r)) if r.retry_after_ms == 30_000));
/// ```
#[derive(Debug, Clone)]
pub struct Response {
    /// The HTTP status code.
    pub status: u16,
    /// Header names and values, in the order received.
    pub headers: Vec<(String, String)>,
    /// The body's bytes.
    pub body: Vec<u8>,
}

impl Response {
    /// The first value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    /// Maps the status to a delivery result (see [`crate::DeliveryError::from_status`]).
    pub fn delivery_result(&self) -> Result<(), crate::DeliveryError> {
        crate::DeliveryError::from_status(self.status, self.header("retry-after"))
    }
}

impl Request {
    /// A request with any method (`GET`, `POST`, ... or another name).
    pub fn new(method: &str, url: impl Into<String>) -> Self {
        let method = match method.to_ascii_uppercase().as_str() {
            "GET" => Method::Get,
            "POST" => Method::Post,
            "PUT" => Method::Put,
            "PATCH" => Method::Patch,
            "DELETE" => Method::Delete,
            "HEAD" => Method::Head,
            other => Method::Other(other.to_string()),
        };
        Request { method, url: url.into(), headers: Vec::new(), body: Vec::new() }
    }

    /// A `GET` request.
    pub fn get(url: impl Into<String>) -> Self {
        Self::new("GET", url)
    }

    /// A `POST` request.
    pub fn post(url: impl Into<String>) -> Self {
        Self::new("POST", url)
    }

    /// Adds a header.
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// Sets the body.
    pub fn body(mut self, body: impl Into<Vec<u8>>) -> Self {
        self.body = body.into();
        self
    }

    /// Sets a JSON body and its content type.
    pub fn json(self, value: &serde_json::Value) -> Self {
        self.header("content-type", "application/json").body(value.to_string())
    }

    /// The URL the request goes to.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The headers set so far, in order.
    pub fn headers(&self) -> &[(String, String)] {
        &self.headers
    }

    fn method_sends_body(&self) -> bool {
        matches!(self.method, Method::Post | Method::Put | Method::Patch)
    }

    /// Sends the request (with a `content-length`, so destinations need no chunked decoding)
    /// and reads the whole response.
    pub fn send(self) -> Result<Response, HttpError> {
        let (scheme, authority, path) = split_url(&self.url)?;
        let fields = Fields::new();
        let has_length = self.headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("content-length"));
        let length = (!has_length && (!self.body.is_empty() || self.method_sends_body()))
            .then(|| ("content-length".to_string(), self.body.len().to_string()));
        for (name, value) in self.headers.iter().chain(length.iter()) {
            fields
                .append(name, &value.as_bytes().to_vec())
                .map_err(|e| HttpError::InvalidUrl(format!("header `{name}`: {e:?}")))?;
        }
        let request = OutgoingRequest::new(fields);
        let bad = |what: &str| HttpError::InvalidUrl(format!("{what} refused in `{}`", self.url));
        request.set_method(&self.method).map_err(|_| bad("method"))?;
        request.set_scheme(Some(&scheme)).map_err(|_| bad("scheme"))?;
        request.set_authority(Some(authority)).map_err(|_| bad("authority"))?;
        request.set_path_with_query(Some(path)).map_err(|_| bad("path"))?;
        let body = request.body().map_err(|_| HttpError::Transport("request body unavailable".into()))?;
        let pending = outgoing_handler::handle(request, None).map_err(error_code)?;
        let written = write_body(&body, &self.body);
        let finished = written.and_then(|()| OutgoingBody::finish(body, None).map_err(error_code));
        pending.subscribe().block();
        let response = match pending.get() {
            Some(Ok(Ok(r))) => r,
            // A refused or failed request closes the body stream: report why it failed.
            Some(Ok(Err(code))) => return Err(error_code(code)),
            Some(Err(())) | None => return Err(HttpError::Transport("response already taken".into())),
        };
        finished?;
        let status = response.status();
        let headers = response
            .headers()
            .entries()
            .into_iter()
            .map(|(k, v)| (k, String::from_utf8_lossy(&v).into_owned()))
            .collect();
        let incoming = response.consume().map_err(|_| HttpError::Transport("response body unavailable".into()))?;
        let body = read_body(&incoming)?;
        drop(incoming);
        Ok(Response { status, headers, body })
    }
}

fn write_body(body: &OutgoingBody, bytes: &[u8]) -> Result<(), HttpError> {
    let stream = body.write().map_err(|_| HttpError::Transport("request body stream".into()))?;
    for chunk in bytes.chunks(4096) {
        stream.blocking_write_and_flush(chunk).map_err(|e| HttpError::Transport(format!("writing body: {e:?}")))?;
    }
    Ok(())
}

fn read_body(incoming: &IncomingBody) -> Result<Vec<u8>, HttpError> {
    let stream = incoming.stream().map_err(|_| HttpError::Transport("response body stream".into()))?;
    let mut body = Vec::new();
    loop {
        match stream.blocking_read(64 * 1024) {
            Ok(chunk) => {
                body.extend_from_slice(&chunk);
                if body.len() > MAX_RESPONSE_BYTES {
                    return Err(HttpError::Transport("response body too large".into()));
                }
            }
            Err(StreamError::Closed) => return Ok(body),
            Err(StreamError::LastOperationFailed(e)) => {
                return Err(HttpError::Transport(e.to_debug_string()));
            }
        }
    }
}

fn error_code(code: ErrorCode) -> HttpError {
    match code {
        ErrorCode::HttpRequestDenied => HttpError::Denied("destination not in the plugin's allowed hosts".into()),
        ErrorCode::DestinationIpProhibited => HttpError::Denied("destination address prohibited".into()),
        other => HttpError::Transport(format!("{other:?}")),
    }
}

fn split_url(url: &str) -> Result<(Scheme, &str, &str), HttpError> {
    let (scheme, rest) =
        url.split_once("://").ok_or_else(|| HttpError::InvalidUrl(format!("`{url}` has no scheme")))?;
    let scheme = match scheme.to_ascii_lowercase().as_str() {
        "http" => Scheme::Http,
        "https" => Scheme::Https,
        other => return Err(HttpError::InvalidUrl(format!("unsupported scheme `{other}`"))),
    };
    let split = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, path) = rest.split_at(split);
    if authority.is_empty() {
        return Err(HttpError::InvalidUrl(format!("`{url}` has no host")));
    }
    Ok((scheme, authority, if path.is_empty() { "/" } else { path }))
}

//! Outbound HTTP policy: a connector reaches only the hosts its manifest allows, checked by the
//! host on every request (redirects are not followed, so each hop is a new, checked request).
//! A host allowed through a wildcard must resolve to public addresses only, and plain HTTP then
//! goes to the very address that was checked. Requests go through a per-plugin pool of
//! keep-alive connections, so a connector's calls to one destination do not each pay for a
//! TCP (and TLS) handshake.

use crate::error::EgressError;
use hyper_util::client::legacy::{Client, connect::HttpConnector};
use std::sync::Arc;
use std::time::Duration;
use wasmtime_wasi_http::{Error as HttpError, RequestOptions, WasiBody, WasiHttpHooks};

/// The addresses the server itself listens on, which no plugin may reach, whatever its
/// manifest allows: a connector allowed `http://127.0.0.1:*` would otherwise reach the admin API.
pub type Listeners = Arc<std::sync::RwLock<Vec<std::net::SocketAddr>>>;

/// Keep-alive connections of one plugin, over plain HTTP or TLS (Mozilla's root certificates).
pub type HttpClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, WasiBody>;

/// Idle connections kept per destination, and for how long.
const POOL_IDLE_PER_HOST: usize = 32;
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// A connection pool for a plugin whose connects may take up to `connect_timeout`.
pub fn http_client(connect_timeout: Duration) -> HttpClient {
    static TLS: std::sync::OnceLock<rustls::ClientConfig> = std::sync::OnceLock::new();
    let tls = TLS.get_or_init(|| {
        let roots = rustls::RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.into() };
        rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .expect("ring supports the default TLS versions")
            .with_root_certificates(roots)
            .with_no_client_auth()
    });
    let mut tcp = HttpConnector::new();
    tcp.enforce_http(false);
    tcp.set_nodelay(true);
    tcp.set_connect_timeout(Some(connect_timeout));
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls.clone())
        .https_or_http()
        .enable_http1()
        .wrap_connector(tcp);
    Client::builder(hyper_util::rt::TokioExecutor::new())
        .pool_max_idle_per_host(POOL_IDLE_PER_HOST)
        .pool_idle_timeout(POOL_IDLE_TIMEOUT)
        .build(connector)
}

/// One allowed destination: `scheme://host[:port]` with `*` wildcards.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostPattern {
    scheme: String,
    host: String,
    /// `None` means any port.
    port: Option<u16>,
}

impl HostPattern {
    pub fn parse(pattern: &str) -> Result<HostPattern, EgressError> {
        let bad = |why: &'static str| EgressError::Pattern { pattern: pattern.to_string(), why };
        let (scheme, rest) = pattern.split_once("://").ok_or_else(|| bad("expected scheme://host[:port]"))?;
        let scheme = scheme.to_ascii_lowercase();
        if scheme != "http" && scheme != "https" {
            return Err(bad("scheme must be http or https"));
        }
        if rest.contains('/') {
            return Err(bad("give no path"));
        }
        let (host, port) = match rest.rsplit_once(':') {
            Some((h, "*")) => (h, None),
            Some((h, p)) => (h, Some(p.parse::<u16>().map_err(|_| bad("port must be a number or *"))?)),
            None => (rest, Some(if scheme == "https" { 443 } else { 80 })),
        };
        if host.is_empty() || (host.contains('*') && host != "*" && !host.starts_with("*.")) {
            return Err(bad("host must be a name, `*` or `*.domain`"));
        }
        Ok(HostPattern { scheme, host: host.to_ascii_lowercase(), port })
    }

    /// Whether the pattern names one host (not `*` or `*.domain`).
    pub fn is_exact(&self) -> bool {
        !self.host.contains('*')
    }

    pub fn matches(&self, scheme: &str, host: &str, port: u16) -> bool {
        let host = host.to_ascii_lowercase();
        let host_ok = match self.host.strip_prefix("*.") {
            _ if self.host == "*" => true,
            Some(suffix) => host.ends_with(&format!(".{suffix}")),
            None => self.host == host,
        };
        self.scheme.eq_ignore_ascii_case(scheme) && host_ok && self.port.is_none_or(|p| p == port)
    }
}

/// The per-plugin outbound HTTP policy, installed as the store's wasi:http hooks.
pub struct Egress {
    pub plugin: Arc<str>,
    pub allowed: Arc<[HostPattern]>,
    /// Cap on the wait for a response: the plugin's own call deadline (which also bounds
    /// connecting and reading the body).
    pub timeout: Duration,
    pub client: HttpClient,
    pub listeners: Listeners,
}

impl Egress {
    /// Whether a request to `uri` may leave, and if not, why. `Ok(true)` when a pattern names
    /// the host exactly; a host reached only through a wildcard must resolve to public addresses.
    pub fn check(&self, uri: &http::Uri) -> Result<bool, EgressError> {
        check_target(&self.allowed, uri)
    }
}

/// Whether a request to `uri` may leave under the allow-list `allowed` (see [`Egress::check`]).
pub fn check_target(allowed: &[HostPattern], uri: &http::Uri) -> Result<bool, EgressError> {
    let (scheme, host, port) = target(uri).map_err(EgressError::Target)?;
    let matching: Vec<&HostPattern> = allowed.iter().filter(|p| p.matches(scheme, host, port)).collect();
    if matching.is_empty() {
        Err(EgressError::NotAllowed { scheme: scheme.to_string(), host: host.to_string(), port })
    } else {
        Ok(matching.iter().any(|p| p.is_exact()))
    }
}

fn target(uri: &http::Uri) -> Result<(&str, &str, u16), String> {
    let scheme = uri.scheme_str().unwrap_or("");
    let host = uri.host().ok_or("request has no host")?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let port = uri.port_u16().unwrap_or(if scheme == "https" { 443 } else { 80 });
    Ok((scheme, host, port))
}

/// Loopback, private, link-local, multicast, reserved and other non-public addresses (and
/// IPv6 forms that embed an IPv4 address): reachable only when the manifest names the host,
/// never through a wildcard.
pub fn is_internal(ip: std::net::IpAddr) -> bool {
    use std::net::IpAddr;
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, ..] = v4.octets();
            v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_documentation()
                || v4.is_multicast()
                || (a == 100 && (64..128).contains(&b))
                || (a == 198 && (b == 18 || b == 19))
                || a == 0
                || a >= 240
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_internal(IpAddr::V4(v4));
            }
            let s = v6.segments();
            let first = s[0];
            v6.is_loopback()
                || v6.is_unspecified()
                || (first & 0xfe00) == 0xfc00 // unique local
                || (first & 0xffc0) == 0xfe80 // link-local
                || (first & 0xffc0) == 0xfec0 // site-local
                || (first & 0xff00) == 0xff00 // multicast
                || first == 0x2002 // 6to4, which carries an IPv4 address
                || (first == 0x0064 && s[1] == 0xff9b && s[2..6] == [0; 4]) // NAT64
                || s[..6] == [0; 6] // IPv4-compatible (::/96)
        }
    }
}

/// Whether a connection to `addr` would reach one of the server's own listeners.
pub fn reaches_listener(addr: std::net::SocketAddr, listeners: &[std::net::SocketAddr]) -> bool {
    let ip = canonical(addr.ip());
    listeners.iter().any(|l| {
        let own = canonical(l.ip());
        l.port() == addr.port() && (own == ip || (own.is_unspecified() && is_local(ip)))
    })
}

/// An IPv4 address written as IPv6 (`::ffff:a.b.c.d`) as the IPv4 address it is.
fn canonical(ip: std::net::IpAddr) -> std::net::IpAddr {
    match ip {
        std::net::IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, std::net::IpAddr::V4),
        v4 => v4,
    }
}

/// Whether `ip` is an address of this machine (a listener on all addresses answers there):
/// binding a socket to it succeeds only if it is.
fn is_local(ip: std::net::IpAddr) -> bool {
    ip.is_loopback() || ip.is_unspecified() || std::net::UdpSocket::bind((ip, 0)).is_ok()
}

/// Resolves the request's host and refuses the server's own listeners and, for a host allowed
/// only through a wildcard, internal addresses; returns the address to use.
async fn vetted_address(uri: &http::Uri, exact: bool, listeners: &Listeners) -> Result<std::net::SocketAddr, String> {
    let (_, host, port) = target(uri)?;
    let addrs: Vec<_> =
        tokio::net::lookup_host((host, port)).await.map_err(|e| format!("resolving {host}: {e}"))?.collect();
    let own = listeners.read().expect("listeners").clone();
    if let Some(addr) = addrs.iter().find(|a| reaches_listener(**a, &own)) {
        return Err(format!("{host}:{port} ({addr}) is this server's own listener, which no plugin may reach"));
    }
    if !exact && let Some(addr) = addrs.iter().find(|a| is_internal(a.ip())) {
        return Err(format!("{host} resolves to internal address {}, which a wildcard does not allow", addr.ip()));
    }
    addrs.first().copied().ok_or_else(|| format!("{host} has no address"))
}

/// Points a plain-HTTP request at the address that was checked, so a second lookup cannot
/// answer differently (DNS rebinding); the Host header keeps the name. HTTPS keeps the name:
/// the certificate must match it, so a rebound address cannot complete the handshake.
fn pin(request: &mut http::Request<WasiBody>, addr: std::net::SocketAddr) -> Result<(), String> {
    if request.uri().scheme_str() != Some("http") {
        return Ok(());
    }
    let mut parts = request.uri().clone().into_parts();
    parts.authority = Some(addr.to_string().parse().map_err(|e| format!("pinning {addr}: {e}"))?);
    *request.uri_mut() = http::Uri::from_parts(parts).map_err(|e| format!("pinning {addr}: {e}"))?;
    Ok(())
}

type ResponseFuture = Box<
    dyn Future<
            Output = Result<
                (http::Response<WasiBody>, Box<dyn Future<Output = Result<(), HttpError>> + Send>),
                HttpError,
            >,
        > + Send,
>;

impl WasiHttpHooks for Egress {
    fn send_request(
        &mut self,
        mut request: http::Request<WasiBody>,
        options: Option<RequestOptions>,
        fut: Box<dyn Future<Output = Result<(), HttpError>> + Send>,
    ) -> ResponseFuture {
        _ = fut;
        let exact = match self.check(request.uri()) {
            Ok(exact) => exact,
            Err(why) => {
                tracing::warn!(plugin = %self.plugin, "outbound request refused: {why}");
                return Box::new(async { Err(HttpError::HttpRequestDenied) });
            }
        };
        let (plugin, listeners) = (self.plugin.clone(), self.listeners.clone());
        let first_byte = options.and_then(|o| o.first_byte_timeout).map_or(self.timeout, |t| t.min(self.timeout));
        let client = self.client.clone();
        Box::new(async move {
            use http_body_util::BodyExt;
            let vetted = match vetted_address(request.uri(), exact, &listeners).await {
                Ok(addr) => pin(&mut request, addr),
                Err(why) => Err(why),
            };
            if let Err(why) = vetted {
                tracing::warn!(plugin = %plugin, "outbound request refused: {why}");
                return Err(HttpError::DestinationIpProhibited);
            }
            let response = match tokio::time::timeout(first_byte, client.request(request)).await {
                Err(_) => return Err(HttpError::HttpResponseTimeout),
                Ok(Err(e)) => return Err(request_error(&plugin, e)),
                Ok(Ok(response)) => response,
            };
            // The pool drives the connection; there is nothing more to wait for.
            let done = Box::new(async { Ok(()) }) as Box<dyn Future<Output = Result<(), HttpError>> + Send>;
            // However large a response claims to be, the host passes on at most this much of it.
            let body =
                |body| http_body_util::Limited::new(body, MAX_RESPONSE_BYTES).map_err(response_error).boxed_unsync();
            Ok((response.map(body), done))
        })
    }
}

/// The most of one response body a plugin is given; past it, reading fails.
pub const MAX_RESPONSE_BYTES: usize = 16 * 1024 * 1024;

/// The wasi:http error for a response body that failed or passed `MAX_RESPONSE_BYTES`.
fn response_error(error: Box<dyn std::error::Error + Send + Sync>) -> HttpError {
    match error.downcast::<hyper::Error>() {
        Ok(e) => HttpError::Hyper(*e),
        Err(other) if other.is::<http_body_util::LengthLimitError>() => {
            HttpError::HttpResponseBodySize(Some(MAX_RESPONSE_BYTES as u64))
        }
        Err(_) => HttpError::HttpProtocolError,
    }
}

/// The wasi:http error for a request the pool could not complete.
fn request_error(plugin: &str, error: hyper_util::client::legacy::Error) -> HttpError {
    use std::error::Error;
    let causes = || std::iter::successors(error.source(), |e| (*e).source());
    if error.is_connect() {
        tracing::debug!(plugin, "connecting: {error:?}");
        let timed_out = causes()
            .any(|e| e.downcast_ref::<std::io::Error>().is_some_and(|e| e.kind() == std::io::ErrorKind::TimedOut));
        return if timed_out { HttpError::ConnectionTimeout } else { HttpError::ConnectionRefused };
    }
    match causes().find_map(|e| e.downcast_ref::<hyper::Error>()) {
        Some(e) if e.is_timeout() => HttpError::HttpResponseTimeout,
        Some(e) if e.is_incomplete_message() || e.is_closed() => HttpError::ConnectionTerminated,
        _ => {
            tracing::debug!(plugin, "request failed: {error:?}");
            HttpError::HttpProtocolError
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allowed(patterns: &[&str], uri: &str) -> bool {
        let egress = Egress {
            plugin: "t".into(),
            allowed: patterns.iter().map(|p| HostPattern::parse(p).unwrap()).collect(),
            timeout: Duration::from_secs(1),
            client: http_client(Duration::from_secs(1)),
            listeners: Listeners::default(),
        };
        egress.check(&uri.parse().unwrap()).is_ok()
    }

    #[test]
    fn exact_hosts_and_default_ports() {
        assert!(allowed(&["https://api.example.com"], "https://api.example.com/x"));
        assert!(!allowed(&["https://api.example.com"], "https://api.example.com:8443/x"));
        assert!(!allowed(&["https://api.example.com"], "http://api.example.com/x"));
        assert!(!allowed(&["https://api.example.com"], "https://evil.com/x"));
    }

    #[test]
    fn wildcards() {
        assert!(allowed(&["http://127.0.0.1:*"], "http://127.0.0.1:41234/hook"));
        assert!(allowed(&["https://*.example.com"], "https://a.b.example.com/"));
        assert!(!allowed(&["https://*.example.com"], "https://example.com.evil.net/"));
        assert!(!allowed(&["https://*.example.com"], "https://notexample.com/"));
        assert!(allowed(&["https://*"], "https://anything.org/"));
        assert!(!allowed(&[], "https://anything.org/"));
    }

    #[test]
    fn only_exact_patterns_reach_internal_hosts() {
        let egress = Egress {
            plugin: "t".into(),
            allowed: ["http://127.0.0.1:*", "https://*"].iter().map(|p| HostPattern::parse(p).unwrap()).collect(),
            timeout: Duration::from_secs(1),
            client: http_client(Duration::from_secs(1)),
            listeners: Listeners::default(),
        };
        assert_eq!(egress.check(&"http://127.0.0.1:9000/x".parse().unwrap()), Ok(true));
        assert_eq!(egress.check(&"https://10.0.0.5/x".parse().unwrap()), Ok(false));
        for ip in [
            "127.0.0.1",
            "10.1.2.3",
            "192.168.0.1",
            "172.16.5.5",
            "169.254.169.254",
            "100.64.0.1",
            "::1",
            "fd00::1",
            "fe80::1",
            "::ffff:10.0.0.1",
            "64:ff9b::a00:1",
            "2002:a00:1::1",
            "::a00:1",
            "ff02::1",
            "fec0::1",
            "224.0.0.1",
            "239.255.255.250",
            "240.0.0.1",
            "255.255.255.254",
            "198.18.0.1",
            "198.19.255.255",
        ] {
            assert!(is_internal(ip.parse().unwrap()), "{ip}");
        }
        for ip in ["93.184.216.34", "8.8.8.8", "2606:4700::1111", "198.20.0.1", "223.255.255.255"] {
            assert!(!is_internal(ip.parse().unwrap()), "{ip}");
        }
    }

    #[test]
    fn the_servers_own_listeners_are_never_reached() {
        let on = |addr: &str, listeners: &[&str]| {
            let listeners: Vec<std::net::SocketAddr> = listeners.iter().map(|l| l.parse().unwrap()).collect();
            reaches_listener(addr.parse().unwrap(), &listeners)
        };
        assert!(on("127.0.0.1:8080", &["127.0.0.1:8080"]));
        assert!(on("[::ffff:127.0.0.1]:8080", &["127.0.0.1:8080"]));
        assert!(!on("127.0.0.1:8081", &["127.0.0.1:8080"]), "another port on loopback is another service");
        // A listener on every address answers on loopback and on the machine's own addresses.
        assert!(on("127.0.0.1:8080", &["0.0.0.0:8080"]));
        assert!(on("127.0.0.5:8080", &["0.0.0.0:8080"]));
        assert!(on("0.0.0.0:8080", &["0.0.0.0:8080"]));
        assert!(on("[::1]:8080", &["[::]:8080"]));
        assert!(!on("93.184.216.34:8080", &["0.0.0.0:8080"]), "not an address of this machine");
    }

    #[tokio::test]
    async fn a_manifest_allowing_loopback_does_not_reach_the_server() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let own = listener.local_addr().unwrap();
        let listeners = Listeners::default();
        listeners.write().unwrap().push(own);
        let uri: http::Uri = format!("http://127.0.0.1:{}/v1/profiles/x", own.port()).parse().unwrap();
        let refused = vetted_address(&uri, true, &listeners).await.unwrap_err();
        assert!(refused.contains("this server's own listener"), "{refused}");
        let named: http::Uri = format!("http://localhost:{}/v1/audit", own.port()).parse().unwrap();
        assert!(vetted_address(&named, true, &listeners).await.is_err(), "a name resolving to it is refused too");
        let other: http::Uri = "http://127.0.0.1:9/x".parse().unwrap();
        assert_eq!(vetted_address(&other, true, &listeners).await.unwrap().port(), 9);
    }

    #[test]
    fn plain_http_is_pinned_to_the_checked_address_and_keeps_its_host_header() {
        let mut request = http::Request::builder()
            .uri("http://hooks.example.com:8080/a?b=1")
            .header(http::header::HOST, "hooks.example.com:8080")
            .body(WasiBody::default())
            .unwrap();
        pin(&mut request, "93.184.216.34:8080".parse().unwrap()).unwrap();
        assert_eq!(request.uri().to_string(), "http://93.184.216.34:8080/a?b=1");
        assert_eq!(request.headers()[http::header::HOST], "hooks.example.com:8080");

        let mut v6 = http::Request::builder().uri("http://h.example.com/").body(WasiBody::default()).unwrap();
        pin(&mut v6, "[2606:4700::1111]:80".parse().unwrap()).unwrap();
        assert_eq!(v6.uri().to_string(), "http://[2606:4700::1111]:80/");

        let mut tls = http::Request::builder().uri("https://h.example.com/").body(WasiBody::default()).unwrap();
        pin(&mut tls, "93.184.216.34:443".parse().unwrap()).unwrap();
        assert_eq!(tls.uri().to_string(), "https://h.example.com/");
    }

    #[test]
    fn bad_patterns_are_refused() {
        for p in ["example.com", "ftp://x", "https://x/path", "https://a*b.com", "http://x:port"] {
            assert!(HostPattern::parse(p).is_err(), "{p}");
        }
    }
}

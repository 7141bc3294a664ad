//! Outbound HTTP policy: a connector reaches only the hosts its manifest allows, checked by the
//! host on every request (redirects are not followed, so each hop is a new, checked request).

use std::sync::Arc;
use wasmtime_wasi_http::{Error as HttpError, RequestOptions, WasiBody, WasiHttpHooks};

/// One allowed destination: `scheme://host[:port]` with `*` wildcards.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostPattern {
    scheme: String,
    host: String,
    /// `None` means any port.
    port: Option<u16>,
}

impl HostPattern {
    pub fn parse(pattern: &str) -> Result<HostPattern, String> {
        let bad = |why: &str| format!("allowed host `{pattern}`: {why}");
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
}

impl Egress {
    /// Whether a request to `uri` may leave, and if not, why.
    pub fn check(&self, uri: &http::Uri) -> Result<(), String> {
        let scheme = uri.scheme_str().unwrap_or("");
        let host = uri.host().ok_or("request has no host")?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let port = uri.port_u16().unwrap_or(if scheme == "https" { 443 } else { 80 });
        if self.allowed.iter().any(|p| p.matches(scheme, host, port)) {
            Ok(())
        } else {
            Err(format!("{scheme}://{host}:{port} is not in the plugin's allowed hosts"))
        }
    }
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
        request: http::Request<WasiBody>,
        options: Option<RequestOptions>,
        fut: Box<dyn Future<Output = Result<(), HttpError>> + Send>,
    ) -> ResponseFuture {
        _ = fut;
        if let Err(why) = self.check(request.uri()) {
            tracing::warn!(plugin = %self.plugin, "outbound request refused: {why}");
            return Box::new(async { Err(HttpError::HttpRequestDenied) });
        }
        Box::new(async move {
            use http_body_util::BodyExt;
            let (response, io) = wasmtime_wasi_http::default_send_request(request, options).await?;
            Ok((
                response.map(BodyExt::boxed_unsync),
                Box::new(io) as Box<dyn Future<Output = Result<(), HttpError>> + Send>,
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allowed(patterns: &[&str], uri: &str) -> bool {
        let egress =
            Egress { plugin: "t".into(), allowed: patterns.iter().map(|p| HostPattern::parse(p).unwrap()).collect() };
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
    fn bad_patterns_are_refused() {
        for p in ["example.com", "ftp://x", "https://x/path", "https://a*b.com", "http://x:port"] {
            assert!(HostPattern::parse(p).is_err(), "{p}");
        }
    }
}

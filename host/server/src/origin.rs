//! Which requests a browser may make: the `Host` a request names must be one this server is
//! reached by (a page on another site whose name resolves to this server's address, DNS
//! rebinding, names its own host), and admin requests must not come from another site's page
//! (`Origin` or `Sec-Fetch-Site` say so). Ingestion stays open to pages on other sites: that
//! is what tracking code on a shop's pages does, and its key says which source it speaks for.

use axum::http::{HeaderMap, header};
use std::net::{IpAddr, SocketAddr};

/// The names a request's `Host` may carry.
#[derive(Debug, Default)]
pub struct Hosts {
    /// Configured names (`server.hostnames`), lowercase, without ports.
    names: Vec<String>,
    /// The address the server listens on, once it does.
    listen: std::sync::OnceLock<SocketAddr>,
}

impl Hosts {
    pub fn new(names: &[String]) -> Hosts {
        Hosts { names: names.iter().map(|n| n.to_ascii_lowercase()).collect(), listen: Default::default() }
    }

    pub fn listening_on(&self, addr: SocketAddr) {
        let _ = self.listen.set(addr);
    }

    /// Whether `host` (a `Host` header's value) names this server: a configured name, the
    /// address it listens on, or, listening on loopback, `localhost`. With neither names nor
    /// a specific address to compare with (listening on every address), any host.
    pub fn allows(&self, host: &str) -> bool {
        let name = strip_port(host).to_ascii_lowercase();
        if self.names.contains(&name) {
            return true;
        }
        let Some(listen) = self.listen.get() else { return self.names.is_empty() };
        let ip = name.trim_start_matches('[').trim_end_matches(']').parse::<IpAddr>().ok();
        match listen.ip() {
            any if any.is_unspecified() => self.names.is_empty() || ip.is_some_and(|ip| ip.is_loopback()),
            own if own.is_loopback() => name == "localhost" || ip.is_some_and(|ip| ip.is_loopback()),
            own => ip == Some(own),
        }
    }
}

/// `host[:port]` or `[v6][:port]` without the port.
fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        return host.find(']').map_or(host, |end| &host[..=end]);
    }
    match host.rsplit_once(':') {
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) && !name.contains(':') => name,
        _ => host,
    }
}

/// Why a request is refused, if it is: its `Host` does not name this server, or (for admin
/// calls) a page on another site sent it.
pub fn refusal(hosts: &Hosts, headers: &HeaderMap, admin: bool) -> Option<String> {
    let host = headers.get(header::HOST).and_then(|h| h.to_str().ok());
    if let Some(host) = host
        && !hosts.allows(host)
    {
        return Some(format!("Host `{host}` is not a name of this server (add it to server.hostnames if it is)"));
    }
    if !admin {
        return None;
    }
    if let Some(site) = headers.get("sec-fetch-site").and_then(|s| s.to_str().ok())
        && (site == "cross-site" || site == "same-site")
    {
        return Some(format!("admin requests from another site's page are refused (Sec-Fetch-Site: {site})"));
    }
    let origin = headers.get(header::ORIGIN).and_then(|o| o.to_str().ok())?;
    let origin_host = origin.split_once("://").map_or(origin, |(_, rest)| rest);
    match host {
        Some(host) if origin_host.eq_ignore_ascii_case(host) => None,
        _ => Some(format!("admin requests from another site's page are refused (Origin: {origin})")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn on_loopback_only_loopback_names_are_served() {
        let hosts = Hosts::new(&[]);
        hosts.listening_on("127.0.0.1:8080".parse().unwrap());
        for good in ["127.0.0.1:8080", "localhost:8080", "localhost", "[::1]:8080", "LOCALHOST:1"] {
            assert!(hosts.allows(good), "{good}");
        }
        for rebound in ["attacker.example:8080", "attacker.example", "10.0.0.1:8080"] {
            assert!(!hosts.allows(rebound), "{rebound}");
        }
    }

    #[test]
    fn configured_names_and_the_listen_address() {
        let hosts = Hosts::new(&["cdp.shop.example".to_string()]);
        hosts.listening_on("10.1.2.3:443".parse().unwrap());
        assert!(hosts.allows("cdp.shop.example"));
        assert!(hosts.allows("CDP.shop.example:443"));
        assert!(hosts.allows("10.1.2.3"));
        assert!(!hosts.allows("localhost"));
        assert!(!hosts.allows("evil.example"));
        let everywhere = Hosts::new(&[]);
        everywhere.listening_on("0.0.0.0:8080".parse().unwrap());
        assert!(everywhere.allows("anything.example"), "no names to compare with");
    }

    #[test]
    fn admin_calls_from_another_sites_page_are_refused() {
        let hosts = Hosts::new(&[]);
        hosts.listening_on("127.0.0.1:8080".parse().unwrap());
        let cross = headers(&[("host", "127.0.0.1:8080"), ("origin", "https://evil.example")]);
        assert!(refusal(&hosts, &cross, true).unwrap().contains("Origin: https://evil.example"));
        assert_eq!(refusal(&hosts, &cross, false), None, "ingestion from pages on other sites is the point");
        let same = headers(&[("host", "127.0.0.1:8080"), ("origin", "http://127.0.0.1:8080")]);
        assert_eq!(refusal(&hosts, &same, true), None, "the admin page itself");
        let fetch = headers(&[("host", "127.0.0.1:8080"), ("sec-fetch-site", "cross-site")]);
        assert!(refusal(&hosts, &fetch, true).is_some());
        let rebound = headers(&[("host", "attacker.example:8080")]);
        assert!(refusal(&hosts, &rebound, false).unwrap().contains("not a name of this server"));
        assert_eq!(refusal(&hosts, &headers(&[]), true), None, "no browser: nothing to check");
    }
}

//! The egress allow-list: any pattern text parses or is refused with a reason; any URL is
//! allowed only when a pattern matches its scheme, host and port, and a pattern naming the
//! URL's own scheme, host and port always allows it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use starling_runtime::egress::{HostPattern, check_target};

fuzz_target!(|input: &str| {
    let mut lines = input.lines();
    let Some(url) = lines.next() else { return };
    let patterns: Vec<HostPattern> = lines.filter_map(|l| HostPattern::parse(l).ok()).collect();
    let Ok(uri) = url.parse::<http::Uri>() else { return };
    let allowed = check_target(&patterns, &uri);
    if let Ok(exact) = allowed {
        assert!(!patterns.is_empty(), "nothing is allowed by an empty list");
        assert!(!exact || patterns.iter().any(|p| p.is_exact()));
    }
    let (Some(scheme), Some(host)) = (uri.scheme_str(), uri.host()) else { return };
    let port = uri.port_u16().unwrap_or(if scheme.eq_ignore_ascii_case("https") { 443 } else { 80 });
    if let Ok(own) = HostPattern::parse(&format!("{scheme}://{}:{port}", host.trim_start_matches('[').trim_end_matches(']'))) {
        assert_eq!(check_target(std::slice::from_ref(&own), &uri).ok(), Some(own.is_exact()), "{url}");
    }
});

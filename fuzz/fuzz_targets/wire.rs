//! The tracking formats (Segment's HTTP Tracking API, Tealium's Collect API): any body, read as
//! each call, is either events or a message naming the problem, never a panic; what is read has
//! a name and a visitor, and Segment's bounds hold.
#![no_main]

use libfuzzer_sys::fuzz_target;
use starling_core::wire::{segment, tealium};

const CALLS: [&str; 7] = ["batch", "track", "identify", "page", "screen", "group", "alias"];

fuzz_target!(|body: &[u8]| {
    let now = 1_800_000_000_000;
    for call in CALLS {
        let call = segment::Call::from_path(call).expect("a call");
        if let Ok(mut request) = segment::parse(body, call, now) {
            assert!(body.len() <= segment::MAX_BATCH_BYTES);
            assert!(!request.events.is_empty() && request.events.len() <= starling_core::ingest::MAX_EVENTS_PER_REQUEST);
            assert!(request.events.iter().all(|e| !e.name.trim().is_empty() && !e.visitor_id.is_empty()));
            segment::fill_ip(&mut request.events, "192.0.2.1");
            assert!(request.events.iter().all(|e| e.data["context"]["ip"].is_string()));
        }
    }
    for read in [tealium::parse_event(body, now), tealium::parse_bulk(body, now)] {
        if let Ok(collect) = read {
            assert!(!collect.account.is_empty() && !collect.profile.is_empty());
            assert!(collect.events.iter().all(|e| !e.name.is_empty() && !e.visitor_id.is_empty()));
            assert!(collect.events.iter().all(|e| e.data.get("tealium_account").is_none()));
        }
    }
    if let Ok(text) = std::str::from_utf8(body) {
        let pairs = text.split('&').filter_map(|p| p.split_once('=')).map(|(k, v)| (k.to_string(), v.to_string()));
        let _ = tealium::parse_query(pairs, now);
    }
});

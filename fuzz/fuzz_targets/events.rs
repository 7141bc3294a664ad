//! Event validation: any request body is either events or a message naming the problem, never a
//! panic; accepted events then pass the source, spec and time checks without panicking either.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;

const MODEL: &str = r#"
[server]
max_event_age = "30d"

[[source]]
name = "web"
api_key = "web-key-0123456789"

[[event_spec]]
event = "purchase"
fields = { order_id = "string", total = "number", items = "array?", "customer.email" = "string?" }

[[event_spec]]
event = "search"
on_violation = "warn"
allow_other_fields = false
fields = { query = "string" }
"#;

fn model() -> &'static starling_core::Model {
    static MODEL_CELL: OnceLock<starling_core::Model> = OnceLock::new();
    MODEL_CELL.get_or_init(|| starling_core::parse(MODEL).expect("the fuzz model parses"))
}

fuzz_target!(|body: &[u8]| {
    let now = 1_800_000_000_000;
    let Ok((mut events, batch)) = starling_core::ingest::parse_request(body, now) else { return };
    assert!(!events.is_empty() && events.len() <= starling_core::ingest::MAX_EVENTS_PER_REQUEST);
    if starling_core::ingest::bound_times(&mut events, batch, now, model()).is_ok() {
        assert!(events.iter().all(|e| e.timestamp_ms <= now), "no event is dated after its receipt");
    }
    let _ = starling_core::ingest::check_events(&mut events, batch, Some("web"), model());
});

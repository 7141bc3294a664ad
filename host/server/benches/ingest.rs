//! Parsing and validating a request of 500 events (the load generator's batch), as
//! `POST /v1/events` does before anything is queued; and the same 500 events as a Segment batch
//! (`POST /v1/batch`) and a Tealium bulk request (`POST /bulk-event`), to show what reading the
//! other wire formats costs beside the native one.
//!
//! `cargo bench -p starling-server --bench ingest`

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use std::hint::black_box;

fn parse(c: &mut Criterion) {
    let events: Vec<serde_json::Value> = (0..500)
        .map(|i| {
            serde_json::json!({
                "event": "page_view",
                "visitor_id": format!("lg-{i}-a"),
                "data": {
                    "category": "shoes",
                    "user_agent": "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/124.0 Safari/537.36"
                }
            })
        })
        .collect();
    let body = serde_json::json!({ "events": events }).to_string();
    let mut group = c.benchmark_group("ingest");
    group.throughput(Throughput::Elements(500));
    group.bench_function("parse_500_events", |b| {
        b.iter(|| black_box(starling_core::ingest::parse_events(black_box(body.as_bytes()), 0).unwrap()))
    });

    let messages: Vec<serde_json::Value> = (0..500)
        .map(|i| {
            serde_json::json!({
                "type": "track",
                "event": "page_view",
                "anonymousId": format!("lg-{i}-a"),
                "messageId": format!("m-{i}"),
                "timestamp": "2026-12-01T10:00:00.000Z",
                "properties": { "category": "shoes" },
                "context": { "userAgent": "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/124.0 Safari/537.36" }
            })
        })
        .collect();
    let batch = serde_json::json!({ "batch": messages, "sentAt": "2026-12-01T10:00:01.000Z" }).to_string();
    let received = 1_796_000_000_000;
    group.bench_function("segment_batch_500", |b| {
        b.iter(|| {
            let call = starling_core::wire::segment::Call::Batch;
            black_box(starling_core::wire::segment::parse(black_box(batch.as_bytes()), call, received).unwrap())
        })
    });

    let layers: Vec<serde_json::Value> = (0..500)
        .map(|i| {
            serde_json::json!({
                "tealium_event": "page_view",
                "tealium_visitor_id": format!("lg-{i}-a"),
                "category": "shoes",
                "user_agent": "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/124.0 Safari/537.36"
            })
        })
        .collect();
    let shared = serde_json::json!({ "tealium_account": "acme", "tealium_profile": "main" });
    let bulk = serde_json::json!({ "shared": shared, "events": layers }).to_string();
    group.bench_function("tealium_bulk_500", |b| {
        b.iter(|| black_box(starling_core::wire::tealium::parse_bulk(black_box(bulk.as_bytes()), received).unwrap()))
    });
    group.finish();
}

criterion_group!(benches, parse);
criterion_main!(benches);

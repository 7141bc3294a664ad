//! Parsing and validating a request of 500 events (the load generator's batch), as
//! `POST /v1/events` does before anything is queued.
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
    group.finish();
}

criterion_group!(benches, parse);
criterion_main!(benches);

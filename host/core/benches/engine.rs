//! One event through the engine with the benchmark configuration (14 enrichments, 20
//! audiences; the Wasm enricher left out, its cost is measured with the runtime): a page view
//! and a purchase on a profile with some history.
//!
//! `cargo bench -p starling-core --bench engine`

use criterion::{Criterion, criterion_group, criterion_main};
use starling_core::{Event, NoCustomEnrichers, Profile, apply_event, parse};
use std::hint::black_box;

fn event(name: &str, t: i64, data: serde_json::Value) -> Event {
    Event {
        id: None,
        name: name.into(),
        visitor_id: "v".into(),
        source: None,
        timestamp_ms: t,
        data: data.as_object().cloned().unwrap_or_default(),
    }
}

fn engine(c: &mut Criterion) {
    let source =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/benchmark.toml")).unwrap();
    let mut model = parse(&source).unwrap();
    model.enrichers.clear();
    let mut profile = Profile::new("v");
    for (i, category) in ["shoes", "hats", "bags", "shoes"].into_iter().enumerate() {
        let e = event("page_view", i as i64, serde_json::json!({ "category": category }));
        apply_event(&model, &mut profile, &e, &mut NoCustomEnrichers);
    }
    let view = event("page_view", 10, serde_json::json!({ "category": "coats", "user_agent": "Mozilla/5.0" }));
    let purchase = event("purchase", 11, serde_json::json!({ "order_total": 120 }));
    let mut group = c.benchmark_group("apply_event");
    group.bench_function("page_view", |b| {
        b.iter(|| black_box(apply_event(&model, &mut profile, black_box(&view), &mut NoCustomEnrichers)))
    });
    group.bench_function("purchase", |b| {
        b.iter(|| black_box(apply_event(&model, &mut profile, black_box(&purchase), &mut NoCustomEnrichers)))
    });
    group.finish();
}

criterion_group!(benches, engine);
criterion_main!(benches);

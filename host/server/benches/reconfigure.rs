//! The work behind a configuration change, on the benchmark configuration (20 audiences) with
//! profiles made by a loadgen-like stream (8,192 visitors, 6 events each):
//! - `backfill/check_8192_profiles`: the backfill's scan step: stored profiles (JSON) parsed and
//!   checked against an added audience on every core (what `PUT /v1/config` runs over every
//!   profile; only those whose membership changes go on to their partition);
//! - `backtest/replay_8192_events`: recorded events replayed through the running and a new
//!   configuration at once (what `starling backtest` runs per event).
//!
//! `cargo bench -p starling-server --bench reconfigure`

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use starling_core::{Event, Model, NoCustomEnrichers, Profile, apply_event, parse};
use starling_server::reconfigure::backfill::stale_profiles;
use starling_server::reconfigure::backtest::{Scratch, replay_both};
use std::hint::black_box;
use std::sync::Arc;

const VISITORS: usize = 8_192;
const CATEGORIES: [&str; 6] = ["shoes", "hats", "bags", "shirts", "coats", "socks"];

fn model(extra: &str) -> Model {
    let source =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/benchmark.toml")).unwrap();
    let mut model = parse(&format!("{source}\n{extra}")).unwrap();
    // The Wasm enricher's cost is measured with the runtime.
    model.enrichers.clear();
    model
}

/// Six events per visitor: four page views, an add to cart, a purchase for every third.
fn events() -> Vec<(String, Event)> {
    let mut events = Vec::new();
    for v in 0..VISITORS {
        let id = format!("lg-{v}-a");
        let event = |name: &str, n: usize, data: serde_json::Value| Event {
            id: Some(format!("{id}-{n}")),
            name: name.into(),
            visitor_id: id.clone(),
            source: None,
            timestamp_ms: 1_700_000_000_000 + (v * 10 + n) as i64 * 1_000,
            data: data.as_object().cloned().unwrap_or_default(),
        };
        for n in 0..4 {
            let category = CATEGORIES[(v + n * 7) % CATEGORIES.len()];
            events.push((id.clone(), event("page_view", n, serde_json::json!({ "category": category }))));
        }
        events.push((id.clone(), event("add_to_cart", 4, serde_json::json!({ "price": (v % 90) + 10 }))));
        if v.is_multiple_of(3) {
            events.push((id.clone(), event("purchase", 5, serde_json::json!({ "order_total": (v % 300) + 20 }))));
        }
    }
    events
}

fn backfill(c: &mut Criterion) {
    let running = model("");
    let mut profiles: std::collections::HashMap<String, Profile> = Default::default();
    for (id, event) in events() {
        let profile = profiles.entry(id.clone()).or_insert_with(|| Profile::new(id));
        apply_event(&running, profile, &event, &mut NoCustomEnrichers);
    }
    let rows: Vec<(i64, String)> =
        profiles.values().enumerate().map(|(i, p)| (i as i64 + 1, serde_json::to_string(p).unwrap())).collect();
    let added = model(
        "[[audience]]\nname = \"browsed_twice\"\nrule = { attribute = \"event_count\", op = \">=\", value = 6 }\n",
    );
    let index = added.audiences.iter().position(|a| a.name == "browsed_twice").unwrap();
    let now = 1_800_000_000_000;
    let stale = stale_profiles(&added, &[index], now, &rows).unwrap();
    assert_eq!(stale.len(), VISITORS.div_ceil(3), "those with a purchase join");
    let mut group = c.benchmark_group("backfill");
    group.throughput(Throughput::Elements(rows.len() as u64));
    group.bench_function("check_8192_profiles", |b| {
        b.iter(|| black_box(stale_profiles(&added, &[index], now, black_box(&rows)).unwrap()))
    });
    group.finish();
}

fn backtest(c: &mut Criterion) {
    let (running, new) = (
        Arc::new(model("")),
        Arc::new(model(
            "[[audience]]\nname = \"browsed_twice\"\nrule = { attribute = \"event_count\", op = \">=\", value = 6 }\n",
        )),
    );
    let events: Vec<(String, Event)> = events().into_iter().take(8_192).collect();
    let mut group = c.benchmark_group("backtest");
    group.throughput(Throughput::Elements(events.len() as u64));
    group.bench_function("replay_8192_events", |b| {
        b.iter(|| {
            let (mut old, mut new) = (Scratch::new(running.clone()), Scratch::new(new.clone()));
            replay_both(black_box(&events), &mut old, &mut new, &mut NoCustomEnrichers, &mut NoCustomEnrichers);
            black_box((old.size("shoes_fans"), new.size("browsed_twice")))
        })
    });
    group.finish();
}

criterion_group!(benches, backfill, backtest);
criterion_main!(benches);

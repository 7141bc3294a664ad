//! The value-tier enricher three ways, in one run: native Rust, a Starling Wasm component
//! (connectors/value-tier, built from source), and an Extism plugin of the same logic
//! (host/bench/extism-value-tier). Measured alone (one call on a profile) and per event (the
//! engine with the benchmark configuration's 14 enrichments and 20 audiences around it).
//!
//! `scripts/bench-enricher.sh` builds both guests and runs this with the Extism side;
//! `cargo bench -p starling-bench --bench enricher` runs the native and Starling sides only.

use criterion::{BenchmarkGroup, Criterion, criterion_group, criterion_main, measurement::WallTime};
use starling_bench::{NativeValueTier, benchmark_model, built_plugin};
use starling_core::engine::Occasion;
use starling_core::{CustomEnrichers, Event, Model, Profile, apply_event};
use starling_runtime::{PluginHost, WasmEnrichers};
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

/// A profile with some history: page views in four categories and two purchases.
fn profile(model: &Model, custom: &mut dyn CustomEnrichers) -> Profile {
    let mut profile = Profile::new("v");
    for (i, category) in ["shoes", "hats", "bags", "shoes"].into_iter().enumerate() {
        let e = event("page_view", i as i64, serde_json::json!({ "category": category }));
        apply_event(model, &mut profile, &e, custom);
    }
    for (i, total) in [180, 95].into_iter().enumerate() {
        let e = event("purchase", 10 + i as i64, serde_json::json!({ "order_total": total }));
        apply_event(model, &mut profile, &e, custom);
    }
    profile
}

fn side(group: &mut BenchmarkGroup<WallTime>, label: &str, model: &Model, custom: &mut dyn CustomEnrichers) {
    let mut profile = profile(model, custom);
    assert!(profile.attributes.contains_key("value_tier"), "{label}: the enricher did not set value_tier");
    let view = event("page_view", 20, serde_json::json!({ "category": "coats" }));
    let enricher = &model.enrichers[0];
    group.bench_function(format!("{label}/call"), |b| {
        b.iter(|| black_box(custom.enrich(enricher, Occasion::Event(black_box(&view)), &profile).unwrap()))
    });
    group.bench_function(format!("{label}/page_view"), |b| {
        b.iter(|| black_box(apply_event(model, &mut profile, black_box(&view), custom)))
    });
}

fn enricher(c: &mut Criterion) {
    let model = benchmark_model();
    let config = model.plugin_config.get("value-tier").cloned().unwrap_or_default();
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let plugins = PluginHost::new().unwrap();
    plugins.load(&built_plugin("value-tier"), config.clone()).unwrap();
    let handle = runtime.handle().clone();

    let mut group = c.benchmark_group("value_tier");
    side(&mut group, "native", &model, &mut NativeValueTier { config: config.clone() });
    side(&mut group, "starling", &model, &mut WasmEnrichers::new(&plugins, &handle));
    #[cfg(feature = "extism")]
    side(&mut group, "extism", &model, &mut starling_bench::ExtismValueTier::load(&config));
    group.finish();
}

criterion_group!(benches, enricher);
criterion_main!(benches);

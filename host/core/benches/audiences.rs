//! Audience evaluation scaling: an event that changes the inputs of 10 audiences, in a model
//! with those 10 audiences alone and in one with 990 more that read other attributes. Only the
//! audiences whose inputs changed are re-evaluated, so the two should cost about the same.
//!
//! `cargo bench -p starling-core --bench audiences`

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use starling_core::{Event, Model, NoCustomEnrichers, Profile, apply_event, parse};
use std::fmt::Write;
use std::hint::black_box;

const ATTRIBUTES: usize = 1_000;
const TOUCHED: usize = 10;

/// 1,000 number attributes, 10 of them incremented by every event, and `audiences` audiences:
/// the first 10 read the touched attributes, the rest read one untouched attribute each
/// (with a mix of operators and groups, like real rules).
fn model(audiences: usize) -> Model {
    let mut config = String::new();
    for i in 0..ATTRIBUTES {
        writeln!(config, "[[attribute]]\nname = \"a{i}\"\nscope = \"visitor\"\ntype = \"number\"").unwrap();
    }
    for i in 0..TOUCHED {
        writeln!(config, "[[enrichment]]\nattribute = \"a{i}\"\nop = \"increment\"\nevent = \"n\"").unwrap();
    }
    for i in 0..audiences {
        writeln!(
            config,
            "[[audience]]\nname = \"aud{i}\"\nrule = {{ any = [{{ attribute = \"a{i}\", op = \">\", value = 1e12 }}, \
             {{ all = [{{ attribute = \"a{i}\", op = \"between\", value = [-2, -1] }}, {{ not = {{ attribute = \"a{i}\", op = \"is_not_assigned\" }} }}] }}] }}"
        )
        .unwrap();
    }
    parse(&config).expect("benchmark configuration is valid")
}

fn event(t: i64) -> Event {
    Event {
        id: None,
        name: "touch".into(),
        visitor_id: "v".into(),
        source: None,
        timestamp_ms: t,
        data: serde_json::json!({ "n": 1 }).as_object().cloned().unwrap(),
    }
}

fn scaling(c: &mut Criterion) {
    let mut group = c.benchmark_group("audience_evaluation");
    for audiences in [TOUCHED, ATTRIBUTES] {
        let model = model(audiences);
        let mut profile = Profile::new("v");
        apply_event(&model, &mut profile, &event(0), &mut NoCustomEnrichers);
        let e = event(1);
        group.bench_with_input(BenchmarkId::new("audiences", audiences), &audiences, |b, _| {
            b.iter(|| black_box(apply_event(&model, &mut profile, black_box(&e), &mut NoCustomEnrichers)))
        });
    }
    group.finish();
}

criterion_group!(benches, scaling);
criterion_main!(benches);

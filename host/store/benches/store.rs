//! Profile encode / decode, and a group commit the size the pipeline writes: 256 events with
//! their profiles in one transaction on a real SQLite file, through the ingestion writer's
//! connection (WAL, synchronous = NORMAL: the event log, not this commit, is synced before an
//! answer).
//!
//! `cargo bench -p starling-store --bench store`

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use starling_core::{Event, Profile, Value};
use std::hint::black_box;

fn profile(i: usize) -> Profile {
    let mut p = Profile::new(format!("visitor-{i}"));
    p.event_count = 40;
    p.visit_count = 3;
    p.attributes.insert("lifetime_spend".into(), Value::Number(1234.5));
    p.attributes.insert("email_hash".into(), Value::String("5f4dcc3b5aa765d61d8327deb882cf99".into()));
    p.attributes.insert("categories_viewed".into(), Value::Set(["shoes", "hats", "bags"].map(String::from).into()));
    p.attributes
        .insert("category_views".into(), Value::Tally([("shoes".to_string(), 12.0), ("hats".to_string(), 3.0)].into()));
    p.audiences.extend(["shoes_fans", "recent_buyers", "known"].map(String::from));
    p
}

fn codec(c: &mut Criterion) {
    let p = profile(1);
    let text = serde_json::to_string(&p).unwrap();
    c.bench_function("profile_encode", |b| b.iter(|| black_box(serde_json::to_string(black_box(&p)).unwrap())));
    c.bench_function("profile_decode", |b| {
        b.iter(|| black_box(serde_json::from_str::<Profile>(black_box(&text)).unwrap()))
    });
}

fn group_commit(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let mut conn = starling_store::open_writer(&dir.path().join("bench.db")).unwrap();
    let profiles: Vec<Profile> = (0..256).map(profile).collect();
    let events: Vec<Event> = (0..256)
        .map(|i| Event {
            id: None,
            name: "page_view".into(),
            visitor_id: format!("visitor-{i}"),
            source: None,
            timestamp_ms: i as i64,
            data: serde_json::json!({ "category": "shoes" }).as_object().cloned().unwrap(),
        })
        .collect();
    let mut group = c.benchmark_group("sqlite");
    group.sample_size(20);
    group.bench_function("commit_256_events_and_profiles", |b| {
        b.iter_batched(
            || (),
            |()| {
                let batch = starling_store::Batch::begin(&mut conn).unwrap();
                for (e, p) in events.iter().zip(&profiles) {
                    batch.log_event(e, &p.id, 0).unwrap();
                    batch.save_profile(p, 0, Some(0)).unwrap();
                    batch.set_wakeup(&p.id, Some(1_000)).unwrap();
                }
                batch.set_log_position(7, 1).unwrap();
                batch.commit().unwrap();
            },
            BatchSize::PerIteration,
        )
    });
    group.finish();
}

criterion_group!(benches, codec, group_commit);
criterion_main!(benches);

//! Appending to the embedded log: one request's record (500 events, about 100 KB) appended and
//! synced, and a small record appended and synced (the latency floor of an acknowledgement).
//!
//! `cargo bench -p starling-log --bench log`

use criterion::{Criterion, criterion_group, criterion_main};
use starling_log::{EventLog, SegmentLog};

fn append_and_sync(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let log = SegmentLog::open(dir.path()).unwrap();
    let request = vec![b'x'; 100_000];
    let small = vec![b'x'; 200];
    let mut group = c.benchmark_group("segment_log");
    group.sample_size(50);
    group.bench_function("append_sync_100kb", |b| {
        b.iter(|| {
            let position = log.append(&[(7, &request)]).unwrap()[0];
            log.sync(position).unwrap();
        })
    });
    group.bench_function("append_sync_200b", |b| {
        b.iter(|| {
            let position = log.append(&[(7, &small)]).unwrap()[0];
            log.sync(position).unwrap();
        })
    });
    group.bench_function("append_200b_unsynced", |b| b.iter(|| log.append(&[(7, &small)]).unwrap()));
    group.finish();
}

criterion_group!(benches, append_and_sync);
criterion_main!(benches);

//! Appending events to the cluster's replicated stream on a three-server NATS cluster on loopback
//! (R3, every write synced): one append at a time (the latency an ingestion request waits for),
//! and 256 in flight on one connection (what a node's ingestion can push); afterwards, the bytes
//! each event costs on disk across the three servers.
//!
//! Then the engine's view, the same for both of its logs: a worker's batch (8 records in as many
//! partitions) appended and made durable, on the embedded segment log (one `fdatasync`) and on
//! the stream through `JetStreamLog` (fenced appends, each acknowledged by the replicas).
//!
//! `cargo bench -p starling-cluster --bench stream`

use bytes::Bytes;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use starling_cluster::local::LocalNats;
use starling_cluster::log::JetStreamLog;
use starling_cluster::{Cluster, Ownership, Placement, Settings};
use starling_log::EventLog;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// An event as ingestion would publish it: about 300 bytes of JSON.
fn event(i: u64) -> Bytes {
    Bytes::from(format!(
        r#"{{"event":"page_view","visitor_id":"lg-{i}-a","timestamp_ms":1796000000000,"data":{{"category":"shoes","user_agent":"Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/124.0 Safari/537.36"}}}}"#
    ))
}

fn stream(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let nats = LocalNats::start(3).unwrap();
    let settings = Settings {
        node: "bench".into(),
        lease: Duration::from_secs(3),
        replicas: 3,
        url: None,
        placement: Placement::Whole,
    };
    let (cluster, events) = runtime.block_on(async {
        let deadline = Instant::now() + Duration::from_secs(30);
        let cluster = loop {
            match Cluster::connect(&nats.urls, settings.clone()).await {
                Ok(cluster) => break cluster,
                Err(e) if Instant::now() < deadline => {
                    eprintln!("waiting for JetStream: {e}");
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                Err(e) => panic!("{e}"),
            }
        };
        let events = cluster.events(Duration::from_secs(120)).await.unwrap();
        (cluster, events)
    });
    let before = nats.disk_bytes();
    let next = AtomicU64::new(0);
    let id = || next.fetch_add(1, Ordering::Relaxed);
    let mut group = c.benchmark_group("stream");
    group.sample_size(10).measurement_time(Duration::from_secs(10));
    group.throughput(Throughput::Elements(1));
    group.bench_function("append_one_at_a_time", |b| {
        b.iter_custom(|n| {
            runtime.block_on(async {
                let started = Instant::now();
                for _ in 0..n {
                    let i = id();
                    events.append((i % 64) as u16, &format!("e{i}"), event(i)).await.unwrap();
                }
                started.elapsed()
            })
        })
    });
    const IN_FLIGHT: u64 = 256;
    group.throughput(Throughput::Elements(IN_FLIGHT));
    group.bench_function("append_256_in_flight", |b| {
        b.iter_custom(|n| {
            runtime.block_on(async {
                let started = Instant::now();
                for _ in 0..n {
                    let appends = (0..IN_FLIGHT).map(|_| {
                        let i = id();
                        let events = &events;
                        async move { events.append((i % 64) as u16, &format!("e{i}"), event(i)).await.unwrap() }
                    });
                    futures_util::future::join_all(appends).await;
                }
                started.elapsed()
            })
        })
    });
    group.finish();
    let appended = next.load(Ordering::Relaxed);
    let grown = nats.disk_bytes().saturating_sub(before);
    println!(
        "{appended} events of {} bytes appended: {} bytes on disk across 3 servers, {:.0} per event ({:.0} per copy)",
        event(0).len(),
        grown,
        grown as f64 / appended as f64,
        grown as f64 / appended as f64 / 3.0
    );

    // The engine's two logs, one batch of 8 records at a time.
    let dir = tempfile::tempdir().unwrap();
    let segments = starling_log::SegmentLog::open(&dir.path().join("log")).unwrap();
    let ownership = Arc::new(Ownership::new(cluster));
    runtime.block_on(async {
        let deadline = Instant::now() + Duration::from_secs(30);
        while ownership.held().len() < 64 {
            assert!(Instant::now() < deadline, "the bench node took every partition");
            ownership.tick().await.unwrap();
        }
    });
    let replicated = JetStreamLog::new(Arc::new(events), ownership.clone(), runtime.handle().clone());
    runtime
        .block_on(replicated.fence(&(0..64).collect::<Vec<_>>(), b"{\"work\":\"owner\",\"node\":\"bench\"}"))
        .unwrap();
    let keep_leases = runtime.spawn({
        let ownership = ownership.clone();
        async move {
            loop {
                let _ = ownership.tick().await;
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    });
    let payloads: Vec<Bytes> = (0..8).map(event).collect();
    let mut group = c.benchmark_group("event_log");
    group.sample_size(20).measurement_time(Duration::from_secs(10));
    group.throughput(Throughput::Elements(8));
    for (name, log) in [("segment_file", &segments as &dyn EventLog), ("jetstream_r3", &replicated as &dyn EventLog)] {
        let mut batch = 0u16;
        group.bench_function(format!("batch_of_8_durable/{name}"), |b| {
            b.iter(|| {
                batch = batch.wrapping_add(1);
                let records: Vec<(u16, &[u8])> =
                    payloads.iter().enumerate().map(|(i, p)| ((batch * 8 + i as u16) % 64, p.as_ref())).collect();
                let positions = log.append(&records).unwrap();
                log.sync(*positions.last().unwrap()).unwrap();
            })
        });
    }
    group.finish();
    keep_leases.abort();
}

criterion_group!(benches, stream);
criterion_main!(benches);

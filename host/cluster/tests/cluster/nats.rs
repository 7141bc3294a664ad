//! Nodes joining a real NATS JetStream cluster on loopback ([`LocalNats`]).

use starling_cluster::local::LocalNats;
use starling_cluster::{Changes, Cluster, Ownership, Placement, Settings};
use starling_log::Partition;
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub(crate) const LEASE: Duration = Duration::from_secs(3);

/// Every test's three nats-servers fsync each write: on a two-core machine, all of this binary's
/// clusters at once starve the lease timings the tests check, so at most two run at a time.
static TURNS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(2);

/// Three nats-servers as one cluster, once a turn is free (held until the returned permit drops).
pub(crate) async fn three_servers() -> (LocalNats, tokio::sync::SemaphorePermit<'static>) {
    let turn = TURNS.acquire().await.expect("the semaphore is never closed");
    (LocalNats::start(3).expect("nats-server starts"), turn)
}

/// As [`three_servers`], with no other cluster running: for the test that times a failover.
pub(crate) async fn three_servers_alone() -> (LocalNats, tokio::sync::SemaphorePermit<'static>) {
    let turn = TURNS.acquire_many(2).await.expect("the semaphore is never closed");
    (LocalNats::start(3).expect("nats-server starts"), turn)
}

/// Connects as `node`, waiting for the cluster to elect its JetStream leader.
pub(crate) async fn join(nats: &LocalNats, node: &str) -> Arc<Ownership> {
    let settings = Settings { node: node.into(), lease: LEASE, replicas: 3, url: None, placement: Placement::Spread };
    // A fresh cluster elects its JetStream leader in seconds; on a loaded two-core machine it
    // has taken more than 30.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match Cluster::connect(&nats.urls, settings.clone()).await {
            Ok(cluster) => return Arc::new(Ownership::new(cluster)),
            Err(e) if Instant::now() < deadline => {
                eprintln!("waiting for JetStream: {e}");
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Err(e) => panic!("JetStream did not come up: {e}"),
        }
    }
}

/// Runs `ownership`'s rounds until `stop` is set; returns what each round changed.
pub(crate) fn run(
    ownership: Arc<Ownership>,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> tokio::task::JoinHandle<Vec<Changes>> {
    tokio::spawn(async move {
        let mut rounds = Vec::new();
        while !stop.load(std::sync::atomic::Ordering::SeqCst) {
            match ownership.tick().await {
                Ok(changes) => rounds.push(changes),
                Err(e) => eprintln!("{}: {e}", ownership.cluster().node()),
            }
            tokio::time::sleep(LEASE / 5).await;
        }
        rounds
    })
}

/// Waits until `check` holds, sampling that no partition is held by two nodes at once.
pub(crate) async fn until(
    what: &str,
    nodes: &[&Arc<Ownership>],
    timeout: Duration,
    check: impl Fn(&[Vec<Partition>]) -> bool,
) {
    let deadline = Instant::now() + timeout;
    loop {
        let held: Vec<Vec<Partition>> = nodes.iter().map(|n| n.held()).collect();
        let mut seen = BTreeSet::new();
        for (i, list) in held.iter().enumerate() {
            for p in list {
                assert!(seen.insert(*p), "partition {p} held by two nodes at once (node {i}): {held:?}");
            }
        }
        if check(&held) {
            return;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}: {held:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub(crate) fn counts(held: &[Vec<Partition>]) -> Vec<usize> {
    held.iter().map(Vec::len).collect()
}

//! Partition ownership: partitions spread over the live nodes with none owned twice, a paused
//! owner is fenced once another node took over, a node that joins gets its share, and leases
//! go on, never held twice, through the loss of the NATS server leading them.

use crate::nats::{LEASE, counts, join, run, three_servers, three_servers_alone, until};
use starling_cluster::{ClusterError, Owner};
use starling_log::PARTITIONS;
use starling_log::Partition;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread")]
async fn partitions_spread_over_live_nodes_a_joiner_gets_its_share_and_none_is_owned_twice() {
    let (nats, _turn) = three_servers().await;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let a = join(&nats, "a").await;
    // The first round takes every partition, and says so of the owners without reading the
    // leases again.
    let first = a.tick().await.unwrap();
    assert_eq!(first.gained.len(), PARTITIONS as usize);
    let owners = a.owners().unwrap();
    assert!(owners.len() == PARTITIONS as usize && owners.values().all(|o| o.node == "a"), "{owners:?}");
    let running_a = run(a.clone(), stop.clone());
    until("a to hold every partition", &[&a], Duration::from_secs(20), |h| h[0].len() == PARTITIONS as usize).await;

    let b = join(&nats, "b").await;
    let running_b = run(b.clone(), stop.clone());
    until("an even split", &[&a, &b], Duration::from_secs(20), |h| counts(h) == [32, 32]).await;
    let c = join(&nats, "c").await;
    let running_c = run(c.clone(), stop.clone());
    until("thirds", &[&a, &b, &c], Duration::from_secs(20), |h| counts(h) == [22, 21, 21]).await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let rounds = [running_a.await.unwrap(), running_b.await.unwrap(), running_c.await.unwrap()];
    let moved_from_a: usize = rounds[0].iter().map(|r| r.released.len()).sum();
    assert_eq!(moved_from_a, 64 - 22, "a gave up only what the joiners took (sticky)");
    assert!(rounds.iter().flatten().all(|r| r.lost.is_empty()), "no lease was lost on the way");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_paused_owner_is_fenced_once_another_node_took_its_partitions() {
    let (nats, _turn) = three_servers_alone().await;
    let stop_a = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop_b = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let a = join(&nats, "a").await;
    let b = join(&nats, "b").await;
    let running_a = run(a.clone(), stop_a.clone());
    let running_b = run(b.clone(), stop_b.clone());
    until("an even split", &[&a, &b], Duration::from_secs(20), |h| counts(h) == [32, 32]).await;
    let partition = a.held()[0];
    a.commit(partition, 41).await.unwrap();
    let before = a.lease(partition).unwrap();

    // `a` stops renewing (as a SIGSTOPped process would): after its lease, `b` takes everything.
    stop_a.store(true, std::sync::atomic::Ordering::SeqCst);
    running_a.await.unwrap();
    let taken_at = Instant::now();
    until("b to take over", &[&a, &b], Duration::from_secs(20), |h| h[1].len() == 64).await;
    let failover = taken_at.elapsed();
    assert!(a.held().is_empty(), "an expired lease is not acted on");
    let owners = b.cluster().owners().await.unwrap();
    assert_eq!(owners[&partition].applied, 41, "the new owner starts from what a committed");
    // What b's rounds say of the owners, the leases it took in them included, is what the
    // bucket holds.
    let nodes = |owners: BTreeMap<Partition, Owner>| -> Vec<(Partition, String)> {
        owners.into_iter().map(|(p, o)| (p, o.node)).collect()
    };
    let read = nodes(owners.clone());
    assert_eq!(read.len(), 64);
    let deadline = Instant::now() + Duration::from_secs(5);
    while b.owners().map(nodes) != Some(read.clone()) {
        assert!(Instant::now() < deadline, "b's rounds saw {:?}, the bucket holds {read:?}", b.owners().map(nodes));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // `a` wakes up with its old lease: every write it tries is refused.
    let err = a.commit(partition, 42).await.unwrap_err();
    assert!(matches!(err, ClusterError::Fenced { partition: p } if p == partition), "{err}");
    let mut stale = before.clone();
    assert!(matches!(a.cluster().renew(&mut stale).await, Err(ClusterError::Fenced { .. })));
    assert!(matches!(a.cluster().release(before).await, Err(ClusterError::Fenced { .. })));
    let owners = b.cluster().owners().await.unwrap();
    assert_eq!((owners[&partition].node.as_str(), owners[&partition].applied), ("b", 41));
    stop_b.store(true, std::sync::atomic::Ordering::SeqCst);
    running_b.await.unwrap();
    eprintln!("failover after the last renewal: {failover:?} (lease {LEASE:?})");
    assert!(failover < LEASE * 4, "b took over within a few lease periods: {failover:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn leases_go_on_through_the_loss_of_the_nats_server_leading_them() {
    let (mut nats, _turn) = three_servers().await;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let a = join(&nats, "a").await;
    let b = join(&nats, "b").await;
    let running_a = run(a.clone(), stop.clone());
    let running_b = run(b.clone(), stop.clone());
    until("an even split", &[&a, &b], Duration::from_secs(20), |h| counts(h) == [32, 32]).await;
    let before = (a.held(), b.held());
    let leader = a.cluster().leases_leader().await.unwrap().expect("the leases' stream has a leader");
    let index: usize = leader.trim_start_matches('n').parse().unwrap();
    nats.kill9(index);
    // Through the election that follows, and after it, no partition is ever held by two nodes
    // (`until` checks every sample), and the two live nodes end up with half each again.
    tokio::time::sleep(LEASE * 3).await;
    until("an even split after the election", &[&a, &b], Duration::from_secs(30), |h| counts(h) == [32, 32]).await;
    let new_leader = a.cluster().leases_leader().await.unwrap().expect("a new leader");
    assert_ne!(new_leader, leader);
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let rounds = [running_a.await.unwrap(), running_b.await.unwrap()];
    let moved: usize = rounds.iter().flatten().map(|r| r.lost.len() + r.released.len()).sum();
    // Whether ownership stayed put depends on how long the election took against the lease.
    eprintln!("after the leader's loss: {moved} partitions moved; same owners: {}", (a.held(), b.held()) == before);
}

//! The event stream: records acknowledged while the server leading the stream is killed are all
//! there afterwards, once each, in order within their partition; a record sent again under its
//! id is stored once.

use crate::nats::{join, three_servers};
use bytes::Bytes;
use starling_cluster::stream::EventStream;
use starling_log::Partition;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

const PER_SENDER: usize = 1_500;

#[tokio::test(flavor = "multi_thread")]
async fn records_acknowledged_through_a_leader_failure_are_all_kept_once() {
    let (mut nats, _turn) = three_servers().await;
    let (a, b) = (join(&nats, "a").await, join(&nats, "b").await);
    let (events_a, events_b) = (
        a.cluster().events(Duration::from_secs(120)).await.unwrap(),
        b.cluster().events(Duration::from_secs(120)).await.unwrap(),
    );
    let first = events_a.append(3, "probe", Bytes::from_static(b"probe")).await.unwrap();
    let again = events_b.append(3, "probe", Bytes::from_static(b"probe")).await.unwrap();
    assert_eq!((again.position, again.duplicate, first.duplicate), (first.position, true, false), "stored once");

    let leader = events_a.leader().await.unwrap().expect("the stream has a leader");
    let senders: Vec<_> = [("a", events_a), ("b", events_b)]
        .into_iter()
        .map(|(name, events)| {
            tokio::spawn(async move {
                let mut acked = BTreeMap::new();
                let mut longest_wait = Duration::ZERO;
                for i in 0..PER_SENDER {
                    let id = format!("{name}-{i}");
                    let partition = (i % 64) as Partition;
                    let started = Instant::now();
                    // A client retries under the same id until acknowledged, as ingestion does.
                    let appended = loop {
                        match events.append(partition, &id, Bytes::from(id.clone())).await {
                            Ok(appended) => break appended,
                            Err(_) if started.elapsed() < Duration::from_secs(30) => {
                                tokio::time::sleep(Duration::from_millis(50)).await
                            }
                            Err(e) => panic!("{id} not acknowledged within 30 s: {e}"),
                        }
                    };
                    longest_wait = longest_wait.max(started.elapsed());
                    acked.insert(id, (partition, appended.position));
                }
                (acked, longest_wait, events)
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let index: usize = leader.trim_start_matches('n').parse().unwrap();
    nats.kill9(index);
    let mut acked = BTreeMap::new();
    let mut pause = Duration::ZERO;
    let mut reader = None;
    for sender in senders {
        let (sent, longest, events) = sender.await.unwrap();
        acked.extend(sent);
        pause = pause.max(longest);
        reader = Some(events);
    }
    let reader = reader.unwrap();
    assert_ne!(reader.leader().await.unwrap().as_deref(), Some(leader.as_str()), "a new leader was elected");

    let mut stored: BTreeMap<String, (Partition, u64)> = BTreeMap::new();
    for partition in 0..64 {
        let mut last = 0;
        for (position, payload) in read_after_election(&reader, partition).await {
            assert!(position > last, "positions grow within partition {partition}");
            last = position;
            let id = String::from_utf8(payload.to_vec()).unwrap();
            assert!(stored.insert(id.clone(), (partition, position)).is_none(), "{id} stored twice");
        }
    }
    stored.remove("probe");
    assert_eq!(stored.len(), 2 * PER_SENDER, "every acknowledged record, no other");
    assert_eq!(stored, acked, "each where and as it was acknowledged");
    eprintln!("longest wait for an acknowledgement across the leader's loss: {pause:?}");
    // Read after a position: only what follows.
    let (partition, position) = acked["a-700"];
    let mut after = Vec::new();
    reader.read(partition, position, &mut |p, _| after.push(p)).await.unwrap();
    assert!(after.iter().all(|p| *p > position) && !after.is_empty());
}

/// Every record of `partition`, read again (for up to 30 s) when a read fails: right after an
/// election the new leader may not answer a read in time, and a reader tries again, as a
/// node's next round does.
async fn read_after_election(reader: &EventStream, partition: Partition) -> Vec<(u64, Bytes)> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut records = Vec::new();
        match reader.read(partition, 0, &mut |position, payload| records.push((position, payload))).await {
            Ok(()) => return records,
            Err(e) if Instant::now() < deadline => {
                eprintln!("reading partition {partition} after the election: {e}");
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Err(e) => panic!("partition {partition} not readable within 30 s of the election: {e}"),
        }
    }
}

/// Forgetting a partition's records before a snapshot's position leaves that record and the
/// later ones, the other partitions untouched, and appends conditional on the last position
/// going on as before.
#[tokio::test(flavor = "multi_thread")]
async fn records_a_snapshot_includes_are_forgotten_and_appends_go_on() {
    let (nats, _turn) = three_servers().await;
    let node = join(&nats, "a").await;
    let events = node.cluster().events(Duration::from_secs(120)).await.unwrap();
    let mut written: BTreeMap<Partition, Vec<u64>> = BTreeMap::new();
    for i in 0..30u64 {
        let partition = (i % 3) as Partition;
        let last = written.get(&partition).and_then(|p| p.last().copied()).unwrap_or(0);
        let position =
            events.append_after(partition, last, &format!("r{i}"), Bytes::from(format!("r{i}"))).await.unwrap();
        written.entry(partition).or_default().push(position);
    }
    let read = |partition: Partition| {
        let events = &events;
        async move {
            let mut positions = Vec::new();
            events.read(partition, 0, &mut |position, _| positions.push(position)).await.unwrap();
            positions
        }
    };
    // Partition 1 is snapshotted at its 7th record; partition 2 at its last.
    let (kept_from, last_of_2) = (written[&1][6], *written[&2].last().unwrap());
    assert_eq!(events.forget_before(1, kept_from).await.unwrap(), 6);
    assert_eq!(events.forget_before(2, last_of_2).await.unwrap(), 9);
    assert_eq!(read(0).await, written[&0], "another partition keeps everything");
    assert_eq!(read(1).await, written[&1][6..].to_vec());
    assert_eq!(read(2).await, vec![last_of_2], "a partition keeps its last record");
    assert_eq!(events.last_position(2).await.unwrap(), last_of_2);
    // Appends conditional on the last position go on; one that missed a record is refused.
    let next = events.append_after(2, last_of_2, "after", Bytes::from_static(b"after")).await.unwrap();
    assert!(next > last_of_2);
    let stale = events.append_after(2, last_of_2, "stale", Bytes::from_static(b"stale")).await;
    assert!(matches!(stale, Err(starling_cluster::ClusterError::Behind { partition: 2, .. })), "{stale:?}");
    // Asked to forget past the partition's last record, the stream still keeps that record.
    assert_eq!(events.forget_before(2, next + 1_000).await.unwrap(), 1);
    assert_eq!(events.last_position(2).await.unwrap(), next);
}

/// A read deletes the consumer it reads through once done: a standby reads every partition
/// several times a second, and consumers left to lapse (after 30 s) piled up on the servers
/// until they refused new ones. (Fails with the deletion left out: 20 consumers left.)
#[tokio::test(flavor = "multi_thread")]
async fn reads_leave_no_consumer_behind() {
    use futures_util::StreamExt;
    let (nats, _turn) = three_servers().await;
    let node = join(&nats, "a").await;
    let events = node.cluster().events(Duration::from_secs(120)).await.unwrap();
    let mut last = 0;
    for i in 0..3 {
        last = events.append_after(5, last, &format!("r{i}"), Bytes::from(format!("r{i}"))).await.unwrap();
    }
    for _ in 0..20 {
        let mut visited = 0;
        events.read(5, 0, &mut |_, _| visited += 1).await.unwrap();
        assert_eq!(visited, 3);
    }
    let client = async_nats::connect(nats.urls.as_slice()).await.unwrap();
    let stream = async_nats::jetstream::new(client).get_stream("STARLING_EVENTS").await.unwrap();
    let consumers: Vec<String> = stream.consumer_names().filter_map(async |n| n.ok()).collect().await;
    // One the client recreated during a read (`{name}_{n}`, rare) is left to lapse.
    let left: Vec<&String> = consumers.iter().filter(|name| !name.contains('_')).collect();
    assert!(left.is_empty(), "consumers left: {left:?}");
}

/// A read of a truncated partition visits only the records after the position it starts from,
/// each once, even when its consumer is deleted under it and the client recreates it (as a
/// busy machine's missed heartbeat does): recreated before it delivered anything, a consumer
/// starts again from the subject's first record, which truncation keeps at the snapshot's
/// position.
#[tokio::test(flavor = "multi_thread")]
async fn a_read_whose_consumer_is_recreated_visits_each_later_record_once() {
    use futures_util::StreamExt;
    let (nats, _turn) = three_servers().await;
    let node = join(&nats, "a").await;
    let events = node.cluster().events(Duration::from_secs(120)).await.unwrap();
    let mut written = Vec::new();
    for i in 0..5 {
        let last = written.last().copied().unwrap_or(0);
        written.push(events.append_after(7, last, &format!("r{i}"), Bytes::from(format!("r{i}"))).await.unwrap());
    }
    let snapshot = written[1];
    events.forget_before(7, snapshot).await.unwrap();

    // Another client deletes every consumer of the stream as fast as it can.
    let client = async_nats::connect(nats.urls.as_slice()).await.unwrap();
    let stream = async_nats::jetstream::new(client).get_stream("STARLING_EVENTS").await.unwrap();
    let deleting = tokio::spawn(async move {
        loop {
            let names: Vec<String> = stream.consumer_names().filter_map(async |n| n.ok()).collect().await;
            for name in names {
                let _ = stream.delete_consumer(&name).await;
            }
        }
    });
    let mut finished = 0;
    for _ in 0..40 {
        let mut visited = Vec::new();
        let read = tokio::time::timeout(
            Duration::from_secs(2),
            events.read(7, snapshot, &mut |position, _| visited.push(position)),
        )
        .await;
        if let Ok(Ok(())) = read {
            finished += 1;
            assert_eq!(visited, written[2..].to_vec(), "records after {snapshot}");
        }
    }
    deleting.abort();
    // A read whose consumer is deleted over and over may not finish in time; most do.
    assert!(finished >= 10, "only {finished} of 40 reads finished");
}

/// One read of several partitions, each from a position of its own, visits each partition's
/// records after its position, once, in the stream's order, and nothing of the partitions it
/// did not name; a read of partitions that hold nothing after their positions returns at once.
#[tokio::test(flavor = "multi_thread")]
async fn a_read_of_several_partitions_visits_each_after_its_own_position() {
    let (nats, _turn) = three_servers().await;
    let node = join(&nats, "a").await;
    let events = node.cluster().events(Duration::from_secs(120)).await.unwrap();
    let mut written: BTreeMap<Partition, Vec<u64>> = BTreeMap::new();
    for i in 0..30u64 {
        let partition = [3, 9, 40][(i % 3) as usize];
        let record = events.append(partition, &format!("r{i}"), Bytes::from(format!("r{i}"))).await.unwrap();
        written.entry(partition).or_default().push(record.position);
    }
    let from = [(3, written[&3][6]), (40, 0)];
    let mut visited = Vec::new();
    events
        .read_partitions(&from, &mut |partition, position, payload| visited.push((partition, position, payload)))
        .await
        .unwrap();
    let mut expected: Vec<(Partition, u64)> = written[&3][7..].iter().map(|p| (3, *p)).collect();
    expected.extend(written[&40].iter().map(|p| (40, *p)));
    expected.sort_by_key(|(_, position)| *position);
    let read: Vec<(Partition, u64)> = visited.iter().map(|(partition, position, _)| (*partition, *position)).collect();
    assert_eq!(read, expected, "partitions 3 after {} and 40 from its start", from[0].1);
    let first_of_40 = visited.iter().find(|(partition, _, _)| *partition == 40).unwrap();
    assert_eq!(first_of_40.2, Bytes::from("r2"), "each record's own payload");

    let through = [(3, *written[&3].last().unwrap()), (9, *written[&9].last().unwrap())];
    let started = Instant::now();
    let mut nothing = 0;
    events.read_partitions(&through, &mut |_, _, _| nothing += 1).await.unwrap();
    assert_eq!(nothing, 0, "nothing after the partitions' last records");
    assert!(started.elapsed() < Duration::from_secs(2), "an empty read waited {:?}", started.elapsed());
}

/// Delivery outcomes published to their stream are read on from where a reader left off.
#[tokio::test(flavor = "multi_thread")]
async fn outcomes_are_read_on_from_where_the_reader_left_off() {
    let (nats, _turn) = three_servers().await;
    let node = join(&nats, "a").await;
    let outcomes = node.cluster().outcomes().await.unwrap();
    let mut sequences = Vec::new();
    for i in 0..3 {
        sequences.push(outcomes.publish(Bytes::from(format!("m{i}"))).await.unwrap());
    }
    let read = |after: u64| {
        let outcomes = &outcomes;
        async move {
            let mut read = Vec::new();
            outcomes.read(after, &mut |sequence, payload| read.push((sequence, payload))).await.unwrap();
            read
        }
    };
    let all = read(0).await;
    assert_eq!(all.iter().map(|(_, p)| p.as_ref()).collect::<Vec<_>>(), [b"m0", b"m1", b"m2"]);
    let rest = read(sequences[0]).await;
    assert_eq!(rest.iter().map(|(s, _)| *s).collect::<Vec<_>>(), sequences[1..].to_vec());
    assert!(read(sequences[2]).await.is_empty(), "nothing after the last");
}

/// A record sent again after the stream stored it (its acknowledgement was lost: a busy
/// server) is not refused as behind the partition: it is the partition's last record. (Fails
/// without that check: an owner would take its own record for another node's and stop.)
#[tokio::test(flavor = "multi_thread")]
async fn a_record_sent_again_after_it_was_stored_is_the_partitions_last() {
    use starling_cluster::ClusterError;
    let (nats, _turn) = three_servers().await;
    let node = join(&nats, "a").await;
    let events = node.cluster().events(Duration::from_secs(120)).await.unwrap();
    let first = events.append_after(9, 0, "r1", Bytes::from_static(b"r1")).await.unwrap();
    let again = events.append_after(9, 0, "r1", Bytes::from_static(b"r1")).await.unwrap();
    assert_eq!(again, first, "the stored record's position");
    let other = events.append_after(9, 0, "r2", Bytes::from_static(b"r2")).await;
    assert!(
        matches!(&other, Err(ClusterError::Behind { partition: 9, last }) if last.as_deref() == Some("r1")),
        "{other:?}"
    );
}

/// A node taking partitions over fences each one after the last record written there, even a
/// record a former owner writes between the fence's read of the last position and its append:
/// that record was acknowledged to its client, so it stays, before the fence. (Fails without
/// the fence reading the last position again: the takeover is refused as behind.)
#[tokio::test(flavor = "multi_thread")]
async fn a_fence_goes_after_records_a_former_owner_writes_meanwhile() {
    use starling_cluster::ClusterError;
    use starling_cluster::log::JetStreamLog;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    const PARTITION: Partition = 7;
    const FENCES: usize = 20;
    let (nats, _turn) = three_servers().await;
    let (former, taking) = (join(&nats, "former").await, join(&nats, "taking").await);
    let written_by_former = former.cluster().events(Duration::from_secs(120)).await.unwrap();
    let stream = Arc::new(taking.cluster().events(Duration::from_secs(120)).await.unwrap());
    let log = JetStreamLog::new(stream.clone(), taking.clone(), tokio::runtime::Handle::current());

    // The former owner writes without pause, each record after the partition's last.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = tokio::spawn({
        let stop = stop.clone();
        async move {
            let (mut written, mut last) = (0usize, 0);
            while !stop.load(Ordering::SeqCst) {
                let id = format!("former-{written}");
                match written_by_former.append_after(PARTITION, last, &id, Bytes::from(id.clone())).await {
                    Ok(position) => (last, written) = (position, written + 1),
                    Err(ClusterError::Behind { .. }) => {
                        last = written_by_former.last_position(PARTITION).await.unwrap()
                    }
                    Err(e) => panic!("{e}"),
                }
            }
            written
        }
    });
    for _ in 0..FENCES {
        log.fence(&[PARTITION], b"fence").await.unwrap();
    }
    stop.store(true, Ordering::SeqCst);
    let written = writer.await.unwrap();
    assert!(!log.overtaken(), "fencing is not being overtaken");

    let mut records = Vec::new();
    stream
        .read(PARTITION, 0, &mut |_, payload| records.push(String::from_utf8(payload.to_vec()).unwrap()))
        .await
        .unwrap();
    let fences = records.iter().filter(|r| *r == "fence").count();
    let former: Vec<&String> = records.iter().filter(|r| *r != "fence").collect();
    assert_eq!(fences, FENCES);
    assert_eq!(former.len(), written, "every acknowledged record is kept");
    eprintln!("{written} records written by the former owner around {FENCES} fences");
}

/// Spread, the stream forgets only what every node's database holds, as their heartbeats say:
/// a node that has not said yet holds the truncation back, one that left or has been away for
/// longer than it is waited for does not. A node that was away that long finds, after its next
/// read, that the stream forgot records it had not applied, instead of applying what follows
/// them. (Without the guard, the read returns the records after the gap as if nothing were
/// missing: the last read below.)
#[tokio::test(flavor = "multi_thread")]
async fn a_read_behind_the_truncation_fails_and_heartbeats_say_how_far_it_may_go() {
    use starling_cluster::log::JetStreamLog;
    use starling_log::{Entry, EventLog, Position};
    use std::sync::Arc;
    const PARTITION: Partition = 7;
    const WAITED: Duration = Duration::from_secs(600);
    let (nats, _turn) = three_servers().await;
    let (a, b, c) = (join(&nats, "a").await, join(&nats, "b").await, join(&nats, "c").await);
    for node in [&a, &b, &c] {
        node.cluster().heartbeat().await.unwrap();
    }
    assert_eq!(a.cluster().held_back(WAITED).await.unwrap(), None, "no node said what it holds");
    a.cluster().set_stored(&[(PARTITION, 40), (8, 10)]);
    b.cluster().set_stored(&[(PARTITION, 30), (8, 20)]);
    a.cluster().heartbeat().await.unwrap();
    b.cluster().heartbeat().await.unwrap();
    assert_eq!(a.cluster().held_back(WAITED).await.unwrap(), None, "c has not said what it holds");
    c.cluster().set_stored(&[(PARTITION, 35), (8, 5)]);
    c.cluster().heartbeat().await.unwrap();
    let held = a.cluster().held_back(WAITED).await.unwrap().expect("every node said");
    assert_eq!((held[PARTITION as usize], held[8], held[9]), (30, 5, 0));
    b.cluster().leave().await.unwrap();
    let client = async_nats::connect(nats.urls[0].as_str()).await.unwrap();
    let heartbeats = async_nats::jetstream::new(client).get_key_value("starling-nodes").await.unwrap();
    assert_eq!(heartbeats.get("b").await.unwrap(), None, "a node that left leaves no heartbeat behind");
    assert!(heartbeats.get("a").await.unwrap().is_some());
    let held = a.cluster().held_back(WAITED).await.unwrap().unwrap();
    assert_eq!((held[PARTITION as usize], held[8]), (35, 5), "a node that left is not waited for");
    // c's heartbeat lapses; a's is renewed: with no time waited for absent nodes, c is not.
    tokio::time::sleep(crate::nats::LEASE + Duration::from_millis(200)).await;
    a.cluster().heartbeat().await.unwrap();
    let held = a.cluster().held_back(Duration::ZERO).await.unwrap().unwrap();
    assert_eq!((held[PARTITION as usize], held[8]), (40, 10), "c was away for longer than it is waited for");

    let stream = Arc::new(a.cluster().events(Duration::from_secs(120)).await.unwrap());
    let mut positions = Vec::new();
    for i in 0..10 {
        let id = format!("r{i}");
        positions.push(stream.append(PARTITION, &id, Bytes::from(id.clone())).await.unwrap().position);
    }
    let mut truncated = vec![0; 64];
    truncated[PARTITION as usize] = positions[5];
    a.cluster().record_truncation(&truncated).await.unwrap();
    assert!(stream.forget_before(PARTITION, positions[5]).await.unwrap() >= 5);
    let read = |log: Arc<JetStreamLog>, after: Position| {
        tokio::task::spawn_blocking(move || {
            let mut read: Vec<Position> = Vec::new();
            let result = log.read(&[(PARTITION, after)], &mut |entry: Entry| read.push(entry.position));
            result.map(|()| read)
        })
    };
    let guarded = || {
        let log = Arc::new(JetStreamLog::new(stream.clone(), a.clone(), tokio::runtime::Handle::current()));
        log.guard_truncation();
        log
    };

    let behind = guarded();
    let error = read(behind.clone(), positions[2]).await.unwrap().expect_err("records after it are gone");
    assert!(error.to_string().contains("forgot partition 7's records"), "{error}");
    assert!(behind.forgotten());

    let level = guarded();
    assert_eq!(read(level.clone(), positions[5]).await.unwrap().unwrap(), positions[6..].to_vec());
    assert!(!level.forgotten());

    let unguarded = Arc::new(JetStreamLog::new(stream.clone(), a.clone(), tokio::runtime::Handle::current()));
    assert_eq!(read(unguarded, positions[2]).await.unwrap().unwrap(), positions[5..].to_vec(), "the gap unseen");
}

/// An append waiting for its partition's lease goes through once the lease is renewed (a NATS
/// election outlasting it), but not once the partition was fenced meanwhile, as a node that
/// lost it and takes it back does: the append was drafted before, without what was written in
/// between, and would otherwise go after the fence.
#[tokio::test(flavor = "multi_thread")]
async fn an_append_waiting_for_its_lease_is_refused_if_the_partition_was_taken_again_meanwhile() {
    use starling_cluster::log::JetStreamLog;
    use starling_log::EventLog;
    use std::sync::Arc;
    const PARTITION: Partition = 7;
    let (nats, _turn) = three_servers().await;
    let node = join(&nats, "a").await;
    let stream = Arc::new(node.cluster().events(Duration::from_secs(120)).await.unwrap());
    let log = Arc::new(JetStreamLog::new(stream, node.clone(), tokio::runtime::Handle::current()));
    while !node.held().contains(&PARTITION) {
        node.tick().await.unwrap();
    }
    log.fence(&[PARTITION], b"fence").await.unwrap();
    let lapsed = async || {
        while node.held().contains(&PARTITION) {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    let append = |log: Arc<JetStreamLog>| tokio::task::spawn_blocking(move || log.append(&[(PARTITION, b"record")]));

    lapsed().await;
    let waiting = append(log.clone());
    tokio::time::sleep(Duration::from_millis(300)).await;
    node.tick().await.unwrap();
    waiting.await.unwrap().expect("renewed, the lease lets the append through");

    lapsed().await;
    let waiting = append(log.clone());
    tokio::time::sleep(Duration::from_millis(300)).await;
    log.fence(&[PARTITION], b"fence").await.unwrap();
    node.tick().await.unwrap();
    let refused = waiting.await.unwrap().expect_err("taken again, the partition refuses the append");
    assert!(refused.to_string().contains("lost and taken again"), "{refused}");
}

//! The event stream as the engine's [`EventLog`]: the node that holds a partition's lease
//! appends its records to the partition's subject, each publish conditional on the subject's
//! last position being the one this node last saw. A node whose lease lapsed is refused before
//! it publishes; one paused between that check and the publish is refused by the stream once
//! the new owner has written its first record (see [`JetStreamLog::fence`]). Either way a
//! record is never written out of order, and nothing the new owner wrote is overwritten.
//!
//! The engine calls a log from its worker threads; this one runs the client on a Tokio runtime
//! and waits for it there. An append returns once the stream acknowledged it, so
//! [`EventLog::sync`] has nothing left to do.

use crate::Ownership;
use crate::stream::EventStream;
use bytes::Bytes;
use starling_log::{Entry, EventLog, LogError, PARTITIONS, Partition, Position};
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// How long a reading of the stream's size is reused.
const SIZE_KEPT: Duration = Duration::from_secs(5);
/// How long a request the stream cannot take (its servers electing a leader) is tried again.
const RETRY_FOR: Duration = Duration::from_secs(20);
const RETRY_EVERY: Duration = Duration::from_millis(100);
/// How many times an append refused with no other node's record after what it followed is sent
/// again.
const SPURIOUS_REFUSALS: usize = 5;

/// Runs `attempt` until it succeeds, fails for a reason other than reaching the servers, or
/// [`RETRY_FOR`] has passed.
async fn retried<T, F: Future<Output = crate::Result<T>>>(mut attempt: impl FnMut() -> F) -> crate::Result<T> {
    let started = Instant::now();
    loop {
        match attempt().await {
            Err(crate::ClusterError::Nats(e)) if started.elapsed() < RETRY_FOR => {
                tracing::debug!("the event stream is unavailable, trying again: {e}");
                tokio::time::sleep(RETRY_EVERY).await;
            }
            done => return done,
        }
    }
}

pub struct JetStreamLog {
    stream: Arc<EventStream>,
    ownership: Arc<Ownership>,
    runtime: tokio::runtime::Handle,
    /// The last position of each partition's subject that this node wrote or read.
    last: Vec<AtomicU64>,
    /// One past the highest position seen.
    next: AtomicU64,
    size: Mutex<Option<(Instant, u64)>>,
    /// Numbers this process's records (with `run`, their ids in the stream).
    records: AtomicU64,
    run: String,
    /// Per partition: the stream refused an append because another node wrote to the
    /// partition, so this node's state is no longer the partition's (until it takes it again).
    overtaken: Vec<AtomicBool>,
    /// Per partition: how many times this node fenced it (took it).
    fences: Vec<AtomicU64>,
    /// Whether reads check that the stream still holds every record after the positions read
    /// from (see [`JetStreamLog::guard_truncation`]).
    guarded: AtomicBool,
    /// A read found that the stream forgot records after a position it read from.
    forgotten: AtomicBool,
}

fn remote(e: impl std::fmt::Display) -> LogError {
    LogError::Remote(e.to_string())
}

impl JetStreamLog {
    pub fn new(stream: Arc<EventStream>, ownership: Arc<Ownership>, runtime: tokio::runtime::Handle) -> JetStreamLog {
        let run = format!("{}-{}", ownership.cluster().node(), crate::now_ms());
        JetStreamLog {
            stream,
            ownership,
            runtime,
            last: (0..PARTITIONS).map(|_| AtomicU64::new(0)).collect(),
            next: AtomicU64::new(1),
            size: Mutex::new(None),
            records: AtomicU64::new(0),
            run,
            overtaken: (0..PARTITIONS).map(|_| AtomicBool::new(false)).collect(),
            fences: (0..PARTITIONS).map(|_| AtomicU64::new(0)).collect(),
            guarded: AtomicBool::new(false),
            forgotten: AtomicBool::new(false),
        }
    }

    /// Has every read check, after it, where the stream was last truncated
    /// ([`crate::Cluster::truncated`]), and fail if that is past a position it read from: the
    /// records in between may be gone, and applying what follows them would build a wrong state.
    /// For spread placement, where the stream is truncated behind every node's database but a
    /// node away for long enough is not waited for.
    pub fn guard_truncation(&self) {
        self.guarded.store(true, Ordering::SeqCst);
    }

    /// Whether a read found the stream truncated past where it read from: this node's state
    /// cannot be brought up to date from the stream any more, only from a snapshot.
    pub fn forgotten(&self) -> bool {
        self.forgotten.load(Ordering::SeqCst)
    }

    /// The position of the stream's last record, in any partition, as the servers say now (one
    /// try: it reports progress, and must not hold a follower's round through an election).
    pub async fn last(&self) -> Result<Position, LogError> {
        self.stream.last().await.map_err(remote)
    }

    /// Whether another node wrote to a partition this node was writing.
    pub fn overtaken(&self) -> bool {
        self.overtaken.iter().any(|o| o.load(Ordering::SeqCst))
    }

    /// The partitions another node wrote to while this node was writing them.
    pub fn overtaken_partitions(&self) -> Vec<Partition> {
        (0..PARTITIONS).filter(|p| self.overtaken[*p as usize].load(Ordering::SeqCst)).collect()
    }

    fn saw(&self, partition: Partition, position: Position) {
        self.last[partition as usize].fetch_max(position, Ordering::SeqCst);
        self.next.fetch_max(position + 1, Ordering::SeqCst);
    }

    /// Appends a record that changes nothing to each of `partitions` (just gained): from then
    /// on the stream refuses any record from a former owner that has not seen it.
    ///
    /// A former owner's append can land between reading a partition's last position and the
    /// fence after it (one it had in flight, or one from a paused owner past its lease check).
    /// That record was acknowledged to its client, so it stays: the fence reads the last
    /// position again and goes after it, and the engine applies the record like any other.
    pub async fn fence(&self, partitions: &[Partition], marker: &[u8]) -> Result<(), LogError> {
        for &partition in partitions {
            // Before the fence goes after the partition's last record: an append waiting for
            // the lease meanwhile must not follow it (see `append`).
            self.fences[partition as usize].fetch_add(1, Ordering::SeqCst);
            let started = Instant::now();
            loop {
                let last = retried(|| self.stream.last_position(partition)).await.map_err(remote)?;
                self.saw(partition, last);
                match self.append_in(partition, vec![Bytes::copy_from_slice(marker)]).await {
                    Ok(_) => {
                        self.overtaken[partition as usize].store(false, Ordering::SeqCst);
                        break;
                    }
                    Err(crate::ClusterError::Behind { .. }) if started.elapsed() < RETRY_FOR => {
                        tracing::debug!(partition, "a former owner wrote while fencing; fencing after its record");
                    }
                    Err(e) => return Err(remote(e)),
                }
            }
        }
        Ok(())
    }

    async fn append_in(&self, partition: Partition, payloads: Vec<Bytes>) -> crate::Result<Vec<Position>> {
        let mut positions = Vec::with_capacity(payloads.len());
        for payload in payloads {
            let id = format!("{}-{}", self.run, self.records.fetch_add(1, Ordering::SeqCst));
            let mut refused = 0;
            let position = loop {
                let last = self.last[partition as usize].load(Ordering::SeqCst);
                match retried(|| self.stream.append_after(partition, last, &id, payload.clone())).await {
                    // The servers sometimes refuse a publish under load though the partition
                    // ends where it expected (seen here several times a run on a 2-core
                    // machine), and answer the same publish right after. Refused so, or after a
                    // record of this process's own, no other node wrote after what this node
                    // knows: the record is sent again after the partition's last.
                    Err(crate::ClusterError::Behind { last: last_id, .. }) if refused < SPURIOUS_REFUSALS => {
                        let actual = retried(|| self.stream.last_position(partition)).await?;
                        if actual != last && !last_id.as_deref().is_some_and(|id| self.written_here(id)) {
                            break Err(crate::ClusterError::Behind { partition, last: last_id });
                        }
                        refused += 1;
                        tracing::debug!(
                            partition,
                            expected = last,
                            actual,
                            "an append refused with no other node's record; sent again"
                        );
                        self.saw(partition, actual);
                    }
                    appended => break appended,
                }
            }?;
            self.saw(partition, position);
            positions.push(position);
        }
        Ok(positions)
    }

    /// Whether the record `id` names was written by this process.
    fn written_here(&self, id: &str) -> bool {
        id.strip_prefix(self.run.as_str()).is_some_and(|rest| rest.starts_with('-'))
    }
}

impl EventLog for JetStreamLog {
    fn append(&self, records: &[(Partition, &[u8])]) -> starling_log::Result<Vec<Position>> {
        // Once the stream refused an append for missing another node's records, this node is
        // no longer the partition's owner, whatever its view of the leases says yet: a read
        // since (the failed batch's partition applied again) may have moved its last positions
        // past the new owner's records, and an append on them would be taken.
        if let Some((partition, _)) = records.iter().find(|(p, _)| self.overtaken[*p as usize].load(Ordering::SeqCst)) {
            return Err(remote(crate::ClusterError::Overtaken { partition: *partition }));
        }
        // A lease that lapsed while the servers could not be reached (an election) is renewed
        // once they can: the append waits for that, as long as it would retry the stream.
        let fences: Vec<u64> = records.iter().map(|(p, _)| self.fences[*p as usize].load(Ordering::SeqCst)).collect();
        let waiting = Instant::now();
        loop {
            let held = self.ownership.held();
            let Some((partition, _)) = records.iter().find(|(p, _)| !held.contains(p)) else { break };
            if self.overtaken[*partition as usize].load(Ordering::SeqCst) {
                return Err(remote(crate::ClusterError::Overtaken { partition: *partition }));
            }
            if waiting.elapsed() >= RETRY_FOR {
                return Err(remote(crate::ClusterError::Fenced { partition: *partition }));
            }
            self.runtime.block_on(async { tokio::time::sleep(RETRY_EVERY).await });
        }
        // Lost and taken again while this append waited (a node paused past its leases that
        // rejoins): the records were drafted on a state without what the other node wrote in
        // between, and the fence would let them go after it.
        if let Some(((partition, _), _)) = records
            .iter()
            .zip(&fences)
            .find(|((p, _), fenced)| self.fences[*p as usize].load(Ordering::SeqCst) != **fenced)
        {
            return Err(remote(crate::ClusterError::Refenced { partition: *partition }));
        }
        // Records of one partition go one after another (each is conditional on the last);
        // partitions go side by side.
        let mut by_partition: Vec<(Partition, Vec<usize>)> = Vec::new();
        for (i, (partition, _)) in records.iter().enumerate() {
            match by_partition.iter_mut().find(|(p, _)| p == partition) {
                Some((_, indices)) => indices.push(i),
                None => by_partition.push((*partition, vec![i])),
            }
        }
        let appends = by_partition.iter().map(|(partition, indices)| {
            let payloads = indices.iter().map(|&i| Bytes::copy_from_slice(records[i].1)).collect();
            self.append_in(*partition, payloads)
        });
        let done = self.runtime.block_on(futures_util::future::join_all(appends));
        let mut positions = vec![0; records.len()];
        for ((_, indices), result) in by_partition.iter().zip(done) {
            let appended = result.map_err(|e| {
                if let crate::ClusterError::Behind { partition, last } = &e {
                    if last.as_deref().is_some_and(|id| !self.written_here(id)) {
                        self.overtaken[*partition as usize].store(true, Ordering::SeqCst);
                    } else {
                        // Its own record last, or none: the engine applies the partition again
                        // from the log.
                        tracing::warn!(partition, ?last, "a partition's log does not end where this node expected");
                    }
                }
                remote(e)
            })?;
            for (&i, position) in indices.iter().zip(appended) {
                positions[i] = position;
            }
        }
        Ok(positions)
    }

    fn sync(&self, _position: Position) -> starling_log::Result<()> {
        Ok(())
    }

    fn read(&self, after: &[(Partition, Position)], visit: &mut dyn FnMut(Entry)) -> starling_log::Result<()> {
        let started = Instant::now();
        let mut entries = self
            .runtime
            .block_on(retried(|| async {
                let mut entries = Vec::new();
                let mut visit = |partition, position, payload: Bytes| {
                    entries.push(Entry { position, partition, payload: payload.to_vec() })
                };
                self.stream.read_partitions(after, &mut visit).await.map(|()| entries)
            }))
            .map_err(remote)?;
        if let Some(last) = entries.iter().map(|e| e.position).max() {
            // Where an append expects a partition to end is learnt from fencing it and from this
            // node's own appends, never from reading it: a batch drafted before this node lost
            // the partition, still waiting for its lease when the node takes the partition
            // again, would otherwise be appended after records its state never saw.
            self.next.fetch_max(last + 1, Ordering::SeqCst);
        }
        if started.elapsed() > Duration::from_secs(1) {
            tracing::debug!(
                partitions = after.len(),
                records = entries.len(),
                elapsed_ms = started.elapsed().as_millis() as u64,
                "slow read"
            );
        }
        if self.guarded.load(Ordering::SeqCst) {
            // After the read: the truncation is recorded before the records go.
            let truncated = self.runtime.block_on(retried(|| self.ownership.cluster().truncated())).map_err(remote)?;
            if let Some(&(partition, from)) =
                after.iter().find(|(p, from)| truncated.get(*p as usize).is_some_and(|before| from < before))
            {
                self.forgotten.store(true, Ordering::SeqCst);
                return Err(remote(format!(
                    "the stream forgot partition {partition}'s records before position {}, and this node had \
                     applied it only through {from}",
                    truncated[partition as usize]
                )));
            }
        }
        entries.sort_by_key(|e| e.position);
        entries.into_iter().for_each(visit);
        Ok(())
    }

    /// The stream forgets records once a stored snapshot includes them (the node's snapshot
    /// task does it); what the engine has written to SQLite alone is not enough.
    fn truncate_before(&self, _position: Position) -> starling_log::Result<u64> {
        Ok(0)
    }

    fn seal(&self) -> starling_log::Result<()> {
        Ok(())
    }

    fn next_position(&self) -> Position {
        self.next.load(Ordering::SeqCst)
    }

    /// The stream's last position, as its servers say now: other nodes write to it too.
    fn last_written(&self) -> starling_log::Result<Position> {
        let last = self.runtime.block_on(retried(|| self.stream.last())).map_err(remote)?;
        self.next.fetch_max(last + 1, Ordering::SeqCst);
        Ok(last)
    }

    /// The stream numbers records itself, always upwards.
    fn continue_after(&self, _position: Position) {}

    fn size_bytes(&self) -> u64 {
        let mut size = self.size.lock().expect("stream size");
        match *size {
            Some((at, bytes)) if at.elapsed() < SIZE_KEPT => bytes,
            _ => {
                let bytes = self.runtime.block_on(self.stream.size_bytes()).unwrap_or(0);
                *size = Some((Instant::now(), bytes));
                bytes
            }
        }
    }
}

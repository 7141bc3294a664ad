//! Events taken in while no node serves the partitions (the moments of a failover): one
//! JetStream stream, `STARLING_INTAKE`, with a subject per virtual partition
//! (`starling.intake.<N>`), replicated and synced like the event stream. Any node publishes an
//! event there under an id (`Nats-Msg-Id`: a client's retry is stored once) and acknowledges it
//! once the stream has it; the node that takes the partitions applies what the intake holds
//! before it serves, then has the intake forget it.

use crate::stream::{open_partitioned, read_subject, read_through};
use crate::{Result, nats};
use async_nats::jetstream::{self, message::PublishMessage, stream};
use bytes::Bytes;
use starling_log::Partition;
use std::sync::Mutex;
use std::time::{Duration, Instant};

const STREAM: &str = "STARLING_INTAKE";
const SUBJECT_PREFIX: &str = "starling.intake";
/// How long a reading of how many messages the intake holds is reused (with what this node
/// published since added).
const HELD_KEPT: Duration = Duration::from_millis(100);

/// A handle on the intake stream.
pub struct Intake {
    js: jetstream::Context,
    stream: stream::Stream,
    held: Mutex<Option<(Instant, u64)>>,
}

impl Intake {
    /// Opens the stream, creating it the first time with `replicas` copies and a window of
    /// `dedup` during which a repeated id is recognised.
    pub async fn open(js: jetstream::Context, replicas: usize, dedup: Duration) -> Result<Intake> {
        let stream = open_partitioned(&js, STREAM, SUBJECT_PREFIX, replicas, dedup).await?;
        Ok(Intake { js, stream, held: Mutex::new(None) })
    }

    /// Publishes `payload` to `partition`'s subject under `id`; returns once the stream has it,
    /// saying whether it held it already.
    pub async fn publish(&self, partition: Partition, id: &str, payload: Bytes) -> Result<bool> {
        let message = PublishMessage::build().payload(payload).message_id(id);
        let subject = format!("{SUBJECT_PREFIX}.{partition}");
        let ack = self.js.send_publish(subject, message).await.map_err(nats)?.await.map_err(nats)?;
        if !ack.duplicate
            && let Some((_, held)) = self.held.lock().expect("intake size").as_mut()
        {
            *held += 1;
        }
        Ok(ack.duplicate)
    }

    /// How many messages the intake holds, as the servers said at most [`HELD_KEPT`] ago, with
    /// what this node published since.
    pub async fn held(&self) -> Result<u64> {
        if let Some((at, held)) = *self.held.lock().expect("intake size")
            && at.elapsed() < HELD_KEPT
        {
            return Ok(held);
        }
        let held = self.stream.get_info().await.map_err(nats)?.state.messages;
        *self.held.lock().expect("intake size") = Some((Instant::now(), held));
        Ok(held)
    }

    /// Calls `visit` with each message the intake holds, in the order taken in, up to the last
    /// one when the read starts; returns that one's sequence (0: the intake held none).
    pub async fn read(&self, visit: &mut (dyn FnMut(Bytes) + Send)) -> Result<u64> {
        let state = self.stream.get_info().await.map_err(nats)?.state;
        if state.messages == 0 {
            return Ok(0);
        }
        let mut visit = |_, payload| visit(payload);
        read_through(&self.stream, &format!("{SUBJECT_PREFIX}.>"), 0, state.last_sequence, &mut visit).await?;
        Ok(state.last_sequence)
    }

    /// Calls `visit` with each message of `partition` the intake holds, in the order taken in;
    /// returns the last one's sequence (0: none). A node owning some of the partitions takes
    /// theirs.
    pub async fn read_partition(&self, partition: Partition, visit: &mut (dyn FnMut(Bytes) + Send)) -> Result<u64> {
        let mut last = 0;
        let mut visit = |sequence, payload| {
            last = sequence;
            visit(payload)
        };
        read_subject(&self.stream, &format!("{SUBJECT_PREFIX}.{partition}"), 0, &mut visit).await?;
        Ok(last)
    }

    /// Forgets `partition`'s messages up to `sequence` (applied); returns how many.
    pub async fn forget_partition_through(&self, partition: Partition, sequence: u64) -> Result<u64> {
        let subject = format!("{SUBJECT_PREFIX}.{partition}");
        let purged = self.stream.purge().filter(subject).sequence(sequence + 1).await.map_err(nats)?;
        *self.held.lock().expect("intake size") = None;
        Ok(purged.purged)
    }

    /// Forgets every message up to `sequence` (applied); returns how many.
    pub async fn forget_through(&self, sequence: u64) -> Result<u64> {
        let purged = self.stream.purge().sequence(sequence + 1).await.map_err(nats)?;
        *self.held.lock().expect("intake size") = None;
        Ok(purged.purged)
    }
}

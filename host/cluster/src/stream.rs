//! The cluster's event stream: one JetStream stream, `STARLING_EVENTS`, with a subject per
//! virtual partition (`starling.events.<N>`), replicated like the buckets. A record is durable
//! once its publish is acknowledged (the servers sync every write: `sync_interval: always`); a
//! record published twice under one id (a client's retry) is stored once. Its stream sequence is
//! its log position: it grows within a partition, and a partition's owner reads its subject
//! after the position its committed state includes.

use crate::{ClusterError, Result, nats};
use async_nats::jetstream::{self, consumer, message::PublishMessage, stream};
use bytes::Bytes;
use futures_util::StreamExt;
use starling_log::{Partition, Position};
use std::time::Duration;

const STREAM: &str = "STARLING_EVENTS";
const SUBJECT_PREFIX: &str = "starling.events";
/// How long a read of the event stream waits for the records it expects.
const READ_WITHIN: Duration = Duration::from_secs(10);

fn subject(partition: Partition) -> String {
    format!("{SUBJECT_PREFIX}.{partition}")
}

/// A published record's place, and whether the stream already held it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Appended {
    pub position: Position,
    pub duplicate: bool,
}

/// What the stream holds, as its servers say: records and bytes (one copy), and the position of
/// its last record in any partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Holds {
    pub records: u64,
    pub bytes: u64,
    pub last_position: Position,
}

/// A handle on the event stream.
pub struct EventStream {
    js: jetstream::Context,
    stream: stream::Stream,
}

impl EventStream {
    /// Opens the stream, creating it the first time with `replicas` copies and a window of
    /// `dedup` during which a repeated record id is recognised.
    pub async fn open(js: jetstream::Context, replicas: usize, dedup: Duration) -> Result<EventStream> {
        let stream = open_partitioned(&js, STREAM, SUBJECT_PREFIX, replicas, dedup).await?;
        Ok(EventStream { js, stream })
    }

    /// Publishes `payload` to `partition` under `id` and returns once the stream has it.
    pub async fn append(&self, partition: Partition, id: &str, payload: Bytes) -> Result<Appended> {
        let message = PublishMessage::build().payload(payload).message_id(id);
        let ack = self.js.send_publish(subject(partition), message).await.map_err(nats)?.await.map_err(nats)?;
        Ok(Appended { position: ack.sequence, duplicate: ack.duplicate })
    }

    /// Publishes `payload` to `partition` only if the partition's last record is at `last` (0:
    /// it has none): a writer that missed another's records is refused
    /// ([`ClusterError::Behind`]) instead of writing out of order.
    /// `id` keeps a record sent again (its acknowledgement was lost) from being stored twice.
    pub async fn append_after(
        &self,
        partition: Partition,
        last: Position,
        id: &str,
        payload: Bytes,
    ) -> Result<Position> {
        let message = PublishMessage::build().payload(payload).message_id(id).expected_last_subject_sequence(last);
        let ack = self.js.send_publish(subject(partition), message).await.map_err(nats)?;
        match ack.await {
            Ok(ack) => Ok(ack.sequence),
            // A publish sent again because its acknowledgement was lost (a busy server) can be
            // refused as not following the last record when the first send was stored: that
            // last record is then this one.
            Err(e) if wrong_last_sequence(&e) => {
                let last = match self.stream.get_last_raw_message_by_subject(&subject(partition)).await {
                    Ok(stored) => {
                        let stored_id = stored.headers.get(async_nats::header::NATS_MESSAGE_ID).map(|v| v.to_string());
                        if stored_id.as_deref() == Some(id) {
                            return Ok(stored.sequence);
                        }
                        stored_id
                    }
                    Err(e) if e.kind() == stream::LastRawMessageErrorKind::NoMessageFound => None,
                    Err(e) => return Err(nats(e)),
                };
                Err(ClusterError::Behind { partition, last })
            }
            Err(e) => Err(nats(e)),
        }
    }

    /// The position of `partition`'s last record (0: none).
    pub async fn last_position(&self, partition: Partition) -> Result<Position> {
        last_of(&self.stream, &subject(partition)).await
    }

    /// Forgets `partition`'s records before `position` (a snapshot includes them). The record at
    /// `position`, and the partition's last record in any case, stay, so the partition's last
    /// position, on which every append is conditional, never goes back to none. Returns how
    /// many records were forgotten.
    pub async fn forget_before(&self, partition: Partition, position: Position) -> Result<u64> {
        let last = self.last_position(partition).await?;
        if last == 0 {
            return Ok(0);
        }
        let purged = self.stream.purge().filter(subject(partition)).sequence(position.min(last)).await.map_err(nats)?;
        Ok(purged.purged)
    }

    /// The position of the stream's last record, in any partition (0: none yet).
    pub async fn last(&self) -> Result<Position> {
        Ok(self.stream.get_info().await.map_err(nats)?.state.last_sequence)
    }

    /// What the stream holds now (what it has not forgotten), one request.
    pub async fn holds(&self) -> Result<Holds> {
        let state = self.stream.get_info().await.map_err(nats)?.state;
        Ok(Holds { records: state.messages, bytes: state.bytes, last_position: state.last_sequence })
    }

    /// Bytes the stream holds (one copy).
    pub async fn size_bytes(&self) -> Result<u64> {
        Ok(self.stream.get_info().await.map_err(nats)?.state.bytes)
    }

    /// Calls `visit` with each record of `partition` after `after`, in order, up to the last one
    /// the partition holds when the read starts.
    pub async fn read(
        &self,
        partition: Partition,
        after: Position,
        visit: &mut (dyn FnMut(Position, Bytes) + Send),
    ) -> Result<()> {
        self.read_partitions(&[(partition, after)], &mut |_, position, payload| visit(position, payload)).await
    }

    /// Calls `visit` with each record of the partitions `after` names, after the position given
    /// for each, in the stream's order, up to the last one they hold when the read starts. One
    /// consumer reads them all: a follower reads every partition it does not own several times
    /// a second, and a consumer (and a last-position request) per partition and read cost the
    /// servers more than the records themselves.
    pub async fn read_partitions(
        &self,
        after: &[(Partition, Position)],
        visit: &mut (dyn FnMut(Partition, Position, Bytes) + Send),
    ) -> Result<()> {
        let Some(start) = after.iter().map(|(_, from)| from + 1).min() else { return Ok(()) };
        let mut from = [None; starling_log::PARTITIONS as usize];
        for &(partition, position) in after {
            from[partition as usize] = Some(position);
        }
        let name = read_consumer_name();
        let mut subjects: Vec<String> = after.iter().map(|(partition, _)| subject(*partition)).collect();
        let (filter_subject, filter_subjects) = match subjects.len() {
            1 => (subjects.remove(0), Vec::new()),
            _ => (String::new(), subjects),
        };
        let consumer = self
            .stream
            .create_consumer(consumer::pull::OrderedConfig {
                name: Some(name.clone()),
                filter_subject,
                filter_subjects,
                deliver_policy: consumer::DeliverPolicy::ByStartSequence { start_sequence: start },
                ..Default::default()
            })
            .await
            .map_err(nats)?;
        let pending = consumer.cached_info().num_pending;
        let read = if pending == 0 {
            Ok(())
        } else {
            // Records truncated away while the read waits for them (all of them before the
            // positions read from) would leave it waiting: it fails, and is tried again.
            tokio::time::timeout(READ_WITHIN, visit_pending(consumer, start, pending, &from, visit))
                .await
                .unwrap_or_else(|_| Err(ClusterError::Nats(format!("a read of {} partitions timed out", after.len()))))
        };
        // Left to lapse, each read's consumer would stay on the servers for the ordered
        // consumer's inactivity threshold (30 s): a follower reading several times a second
        // piles up thousands, until the servers refuse new ones. (One the client recreated
        // meanwhile, named `{name}_{n}`, lapses.)
        if let Err(e) = self.stream.delete_consumer(&name).await {
            tracing::debug!(consumer = %name, "a read's consumer not deleted: {e}");
        }
        read
    }

    /// The NATS server leading the stream's replicas, if known.
    pub async fn leader(&self) -> Result<Option<String>> {
        let info = self.stream.get_info().await.map_err(nats)?;
        Ok(info.cluster.and_then(|c| c.leader))
    }
}

/// Opens the stream `name`, with a subject per partition under `prefix`, creating it the first
/// time on disk with `replicas` copies and a window of `dedup` during which a repeated id is
/// recognised.
pub(crate) async fn open_partitioned(
    js: &jetstream::Context,
    name: &str,
    prefix: &str,
    replicas: usize,
    dedup: Duration,
) -> Result<stream::Stream> {
    let config = stream::Config {
        name: name.to_string(),
        subjects: vec![format!("{prefix}.*")],
        num_replicas: replicas,
        storage: stream::StorageType::File,
        duplicate_window: dedup,
        ..Default::default()
    };
    js.get_or_create_stream(config).await.map_err(nats)
}

/// The sequence of `subject`'s last message in `stream` (0: none).
pub(crate) async fn last_of(stream: &stream::Stream, subject: &str) -> Result<u64> {
    match stream.get_last_raw_message_by_subject(subject).await {
        Ok(message) => Ok(message.sequence),
        Err(e) if e.kind() == stream::LastRawMessageErrorKind::NoMessageFound => Ok(0),
        Err(e) => Err(nats(e)),
    }
}

/// Calls `visit` with each message of `subject` in `stream` after sequence `after`, in order, up
/// to the last one the subject holds when the read starts.
pub(crate) async fn read_subject(
    stream: &stream::Stream,
    subject: &str,
    after: u64,
    visit: &mut (dyn FnMut(u64, Bytes) + Send),
) -> Result<()> {
    let last = last_of(stream, subject).await?;
    read_through(stream, subject, after, last, visit).await
}

/// Calls `visit` with each message of `subjects` (a subject or a wildcard) in `stream` after
/// sequence `after`, in order, up to sequence `last`, which the stream must hold.
pub(crate) async fn read_through(
    stream: &stream::Stream,
    subject: &str,
    after: u64,
    last: u64,
    visit: &mut (dyn FnMut(u64, Bytes) + Send),
) -> Result<()> {
    if last <= after {
        return Ok(());
    }
    let name = read_consumer_name();
    let consumer = stream
        .create_consumer(consumer::pull::OrderedConfig {
            name: Some(name.clone()),
            filter_subject: subject.to_string(),
            deliver_policy: consumer::DeliverPolicy::ByStartSequence { start_sequence: after + 1 },
            ..Default::default()
        })
        .await
        .map_err(nats)?;
    let read = visit_until(consumer, subject, after, last, visit).await;
    // Left to lapse, each read's consumer would stay on the servers for the ordered consumer's
    // inactivity threshold (30 s): a standby reading every partition several times a second
    // piles up thousands, until the servers refuse new ones. (One the client recreated
    // meanwhile, named `{name}_{n}`, lapses.)
    if let Err(e) = stream.delete_consumer(&name).await {
        tracing::debug!(consumer = %name, "a read's consumer not deleted: {e}");
    }
    read
}

async fn visit_until(
    consumer: consumer::Consumer<consumer::pull::OrderedConfig>,
    subject: &str,
    after: u64,
    last: u64,
    visit: &mut (dyn FnMut(u64, Bytes) + Send),
) -> Result<()> {
    let mut messages = consumer.messages().await.map_err(nats)?;
    let mut visited = after;
    // Messages forgotten while the read waits for them (an intake partition another node
    // applied and purged) would leave it waiting: it fails once none comes for a while.
    let idle = || ClusterError::Nats(format!("no message of {subject} came within {READ_WITHIN:?}, up to {last}"));
    while let Some(message) = tokio::time::timeout(READ_WITHIN, messages.next()).await.map_err(|_| idle())? {
        let message = message.map_err(nats)?;
        let sequence = message.info().map_err(nats)?.stream_sequence;
        // An ordered consumer that the client recreates (a missed heartbeat on a busy machine)
        // before it delivered anything starts again from the subject's first message, which a
        // truncated partition keeps at the position a snapshot includes: a message at or
        // before one already visited is not visited again.
        if sequence <= visited {
            continue;
        }
        visited = sequence;
        visit(sequence, message.payload.clone());
        if sequence >= last {
            return Ok(());
        }
    }
    Err(ClusterError::Nats(format!("the stream ended before sequence {last} of {subject}")))
}

/// Visits the `pending` messages from sequence `start` on that `consumer` had when it was created
/// (or until none is left), each of a partition after the position `from` gives for it.
async fn visit_pending(
    consumer: consumer::Consumer<consumer::pull::OrderedConfig>,
    start: u64,
    mut pending: u64,
    from: &[Option<Position>],
    visit: &mut (dyn FnMut(Partition, Position, Bytes) + Send),
) -> Result<()> {
    let mut messages = consumer.messages().await.map_err(nats)?;
    let mut visited = 0;
    while let Some(message) = messages.next().await {
        let message = message.map_err(nats)?;
        let info = message.info().map_err(nats)?;
        let sequence = info.stream_sequence;
        // A consumer the client recreated (a missed heartbeat on a busy machine) before it
        // delivered anything starts again from the first message of its subjects, which a
        // truncated partition keeps at the position a snapshot includes: a message before the
        // start, or at or before one already visited, is not visited again.
        if sequence < start || sequence <= visited {
            continue;
        }
        visited = sequence;
        pending = pending.saturating_sub(1).min(info.pending);
        let partition = message.subject.rsplit('.').next().and_then(|p| p.parse::<Partition>().ok());
        if let Some(partition) =
            partition.filter(|p| from.get(*p as usize).copied().flatten().is_some_and(|f| sequence > f))
        {
            visit(partition, sequence, message.payload.clone());
        }
        if pending == 0 {
            return Ok(());
        }
    }
    Err(ClusterError::Nats("the stream ended before the read did".to_string()))
}

/// A name for a read's consumer, unique across processes and reads.
fn read_consumer_name() -> String {
    static RUN: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    static READS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let run = RUN.get_or_init(|| format!("{}-{}", std::process::id(), crate::now_ms()));
    format!("starling-read-{run}-{}", READS.fetch_add(1, std::sync::atomic::Ordering::Relaxed))
}

/// Whether a publish was refused for not following the subject's last record. The servers
/// this project pins (2.15) answer with the constant-message code (10164), which the client
/// does not name as it does the older one (10071).
fn wrong_last_sequence(e: &jetstream::context::PublishError) -> bool {
    e.kind() == jetstream::context::PublishErrorKind::WrongLastSequence
        || std::error::Error::source(e)
            .and_then(|source| source.downcast_ref::<jetstream::Error>())
            .is_some_and(|refusal| refusal.error_code() == jetstream::ErrorCode::STREAM_WRONG_LAST_SEQUENCE_CONSTANT)
}

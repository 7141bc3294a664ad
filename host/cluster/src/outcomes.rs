//! How the owner's deliveries ended, passed on to the nodes that follow its event stream: one
//! JetStream stream, `STARLING_OUTCOMES`, with one subject, replicated like the event stream.
//! Its messages are kept for an hour: a follower reads on from where it left off, and one that
//! starts from a snapshot finds older outcomes in it. Losing one costs a delivery made twice
//! under its idempotency key after a takeover, nothing more: the stream does not sync every
//! write.

use crate::stream::read_subject;
use crate::{Result, nats};
use async_nats::jetstream::{self, stream};
use bytes::Bytes;
use std::time::Duration;

const STREAM: &str = "STARLING_OUTCOMES";
const SUBJECT: &str = "starling.outcomes";
const KEPT: Duration = Duration::from_secs(3_600);

/// A handle on the outcome stream.
pub struct OutcomeStream {
    js: jetstream::Context,
    stream: stream::Stream,
}

impl OutcomeStream {
    /// Opens the stream, creating it the first time with `replicas` copies.
    pub async fn open(js: jetstream::Context, replicas: usize) -> Result<OutcomeStream> {
        let config = stream::Config {
            name: STREAM.to_string(),
            subjects: vec![SUBJECT.to_string()],
            num_replicas: replicas,
            storage: stream::StorageType::File,
            max_age: KEPT,
            ..Default::default()
        };
        let stream = js.get_or_create_stream(config).await.map_err(nats)?;
        Ok(OutcomeStream { js, stream })
    }

    /// Publishes a message of outcomes; returns its sequence once the stream has it.
    pub async fn publish(&self, payload: Bytes) -> Result<u64> {
        let ack = self.js.publish(SUBJECT, payload).await.map_err(nats)?.await.map_err(nats)?;
        Ok(ack.sequence)
    }

    /// Calls `visit` with each message after sequence `after`, in order, up to the last one
    /// when the read starts.
    pub async fn read(&self, after: u64, visit: &mut (dyn FnMut(u64, Bytes) + Send)) -> Result<()> {
        read_subject(&self.stream, SUBJECT, after, visit).await
    }
}

//! The cluster crate against real NATS servers: ownership of partitions and the event stream.

mod nats;
mod ownership;
mod stream;

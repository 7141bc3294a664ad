//! Starling's event log: the durable record. Every piece of work the engine applies (events,
//! wake-ups, merges, deletions, unstitches) is appended here, in the order it is applied, and
//! synced before it is acknowledged; profiles, memberships and the outbox are derived from it
//! and kept in SQLite together with the log position they include.
//!
//! The log is split into a fixed number of virtual [`partitions`](partition), each a sequence of
//! records in order. [`EventLog`] is the seam between the engine and a backend:
//! [`SegmentLog`] (segment files with checksums, the default: no server to run) and
//! [`MemoryLog`] (tests and the in-memory ceiling). A replicated log can be a backend of its own
//! as long as an append is durable once [`EventLog::sync`] returns and positions grow within a
//! partition.

mod memory;
pub mod partition;
mod segment;

pub use memory::MemoryLog;
pub use partition::{PARTITIONS, Partition, partition_of, profile_hash};
pub use segment::{LogCheck, SegmentLog};

/// A record's place in the log. Positions grow within a partition; this crate's backends number
/// all partitions' records in one sequence, starting at 1.
pub type Position = u64;

/// One record read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub position: Position,
    pub partition: Partition,
    pub payload: Vec<u8>,
}

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("event log {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("event log {path}: damaged record at byte {offset}: {reason}")]
    Damaged { path: String, offset: u64, reason: String },
    #[error("event log record of {0} bytes is larger than the limit")]
    TooLarge(usize),
    /// A log kept by servers elsewhere refused or could not take the request.
    #[error("replicated event log: {0}")]
    Remote(String),
}

pub type Result<T> = std::result::Result<T, LogError>;

/// An append-only log of partitioned records.
pub trait EventLog: Send + Sync {
    /// Appends `records` (partition, payload) in order and returns each one's position. They are
    /// readable at once but durable only after [`EventLog::sync`] up to the last position.
    fn append(&self, records: &[(Partition, &[u8])]) -> Result<Vec<Position>>;

    /// Returns once every record up to `position` is durable. Callers from several threads are
    /// served by one sync where they can be (group commit).
    fn sync(&self, position: Position) -> Result<()>;

    /// Calls `visit` with every record of the partitions named, each after its partition's
    /// position, in log order.
    fn read(&self, after: &[(Partition, Position)], visit: &mut dyn FnMut(Entry)) -> Result<()>;

    /// Forgets records before `position` in every partition (their effects are stored
    /// elsewhere). Returns the bytes freed.
    fn truncate_before(&self, position: Position) -> Result<u64>;

    /// Closes the records written so far to further appends, so that a later truncation past
    /// them frees their bytes (a segment backend starts a new segment).
    fn seal(&self) -> Result<()>;

    /// The position the next record will get.
    fn next_position(&self) -> Position;

    /// The position of the last record written, by anyone writing to the log: a read after
    /// this call returns every record up to it. Where only this process writes, the one before
    /// [`EventLog::next_position`].
    fn last_written(&self) -> Result<Position> {
        Ok(self.next_position().saturating_sub(1))
    }

    /// Makes later records' positions greater than `position`: positions recorded elsewhere
    /// (in a materialized checkpoint) must never be handed out again, even if the log lost
    /// its tail.
    fn continue_after(&self, position: Position);

    /// Bytes the log holds.
    fn size_bytes(&self) -> u64;
}

//! Which virtual partitions an engine applies live. On one server, all of them. On a cluster
//! node whose partitions are spread over the nodes, those whose leases it holds: of the others,
//! written by their owners, it follows only what their records changed of the ids (a claim, a
//! merge, a split, a deletion), which its own work reads; events for their profiles are handed
//! to their owners, and a partition it takes is restored from a snapshot and the stream.
use crate::pipeline::{Ingest, IngestReport, Source};
use futures_util::future::BoxFuture;
use starling_core::Event;
use starling_log::{EventLog, PARTITIONS, Partition, Position};
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::watch;

const _: () = assert!(PARTITIONS as u32 == u64::BITS, "one bit per virtual partition");

/// The partitions owned, one bit each, and how many times they changed; and the partitions
/// being taken (their records applied again before they are owned).
#[derive(Debug)]
pub struct Owned {
    owned: AtomicU64,
    changes: AtomicU64,
    taking: AtomicU64,
}

impl Owned {
    pub fn all() -> Owned {
        Owned::with(u64::MAX)
    }

    pub fn none() -> Owned {
        Owned::with(0)
    }

    pub fn of(partitions: impl IntoIterator<Item = Partition>) -> Owned {
        Owned::with(mask(partitions))
    }

    fn with(owned: u64) -> Owned {
        Owned { owned: AtomicU64::new(owned), changes: AtomicU64::new(0), taking: AtomicU64::new(0) }
    }

    /// Marks `partitions` as being taken: their records are applied again here, as their
    /// owner's, and what that decides for their profiles (a merge into one, a claim of one
    /// overtaken) is this engine's to apply and log, though events for them are not taken live
    /// until they are owned ([`Owned::add`]) or given up ([`Owned::stop_taking`]).
    pub fn start_taking(&self, partitions: &[Partition]) {
        self.taking.fetch_or(mask(partitions.iter().copied()), Ordering::SeqCst);
    }

    pub fn stop_taking(&self, partitions: &[Partition]) {
        self.taking.fetch_and(!mask(partitions.iter().copied()), Ordering::SeqCst);
    }

    /// The partitions being taken.
    pub fn taking(&self) -> Vec<Partition> {
        (0..PARTITIONS).filter(|p| self.taking.load(Ordering::SeqCst) & (1 << p) != 0).collect()
    }

    /// Whether the partition is owned or being taken: its work is this engine's to apply and log.
    pub fn applies(&self, partition: Partition) -> bool {
        (self.owned.load(Ordering::SeqCst) | self.taking.load(Ordering::SeqCst)) & (1 << partition) != 0
    }

    /// Whether the profile's partition is owned or being taken.
    pub fn applies_profile(&self, profile_id: &str) -> bool {
        self.applies(starling_log::partition_of(profile_id))
    }

    /// How many times a partition was added or removed: unchanged between two reads, the
    /// partitions owned were owned all along.
    pub fn changes(&self) -> u64 {
        self.changes.load(Ordering::SeqCst)
    }

    pub fn owns(&self, partition: Partition) -> bool {
        self.owned.load(Ordering::SeqCst) & (1 << partition) != 0
    }

    /// Whether the profile's partition is owned.
    pub fn owns_profile(&self, profile_id: &str) -> bool {
        self.owns(starling_log::partition_of(profile_id))
    }

    /// Owns nothing: the engine only follows (a standby).
    pub fn is_none(&self) -> bool {
        self.owned.load(Ordering::SeqCst) == 0
    }

    /// Owns every partition.
    pub fn is_all(&self) -> bool {
        self.owned.load(Ordering::SeqCst) == u64::MAX
    }

    /// Owns the partition (taken: no longer being taken).
    pub fn add(&self, partition: Partition) {
        self.changes.fetch_add(1, Ordering::SeqCst);
        self.owned.fetch_or(1 << partition, Ordering::SeqCst);
        self.taking.fetch_and(!(1 << partition), Ordering::SeqCst);
    }

    /// Neither owns nor takes the partition any more.
    pub fn remove(&self, partition: Partition) {
        self.changes.fetch_add(1, Ordering::SeqCst);
        self.owned.fetch_and(!(1 << partition), Ordering::SeqCst);
        self.taking.fetch_and(!(1 << partition), Ordering::SeqCst);
    }

    /// One bit per partition owned.
    pub fn bits(&self) -> u64 {
        self.owned.load(Ordering::SeqCst)
    }

    /// The partitions owned.
    pub fn partitions(&self) -> Vec<Partition> {
        (0..PARTITIONS).filter(|p| self.owns(*p)).collect()
    }

    /// The partitions not owned.
    pub fn others(&self) -> Vec<Partition> {
        (0..PARTITIONS).filter(|p| !self.owns(*p)).collect()
    }
}

fn mask(partitions: impl IntoIterator<Item = Partition>) -> u64 {
    partitions.into_iter().fold(0, |mask, p| mask | (1 << p))
}

/// Where events for profiles of partitions another node owns go: to that node, which applies
/// them once it has followed the log through `after` (the records that sent them there, a
/// merge among them, are then applied on it too).
/// Events, each with the partition of the profile it is for.
pub type PartitionedEvents = Vec<(Partition, Event)>;

pub trait Elsewhere: Send + Sync {
    /// Hands on `events`, each for a profile of the partition it is paired with, as `via`
    /// allows; resolves once they are durable where they went (answered as an ingestion is).
    /// `after`: 0 when they need not wait for any record.
    fn hand(
        &self,
        events: PartitionedEvents,
        after: Position,
        via: Via,
    ) -> BoxFuture<'static, Result<HandedReport, String>>;
}

/// Where events for another node's partitions may go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    /// To the partition's owner, or into the intake while no node owns it (events a client sent
    /// here, or that a merge moved to another profile).
    OwnerOrIntake,
    /// Into the intake, for the partition's owner (events another node handed here: the two
    /// nodes' views of the owners differed for a moment, and handed back they could go back
    /// and forth).
    Intake,
    /// To the partition's owner only, refused while none can take them (events taken from the
    /// intake, which keeps them until they are applied: put back, they would be kept out as
    /// the same messages, then forgotten with them).
    Owner,
    /// To the partition's owner only, refused while none can take them, to be checked there
    /// against the profile's history rather than the events that node has seen (events a take
    /// redirected to a survivor: seen already, by that node too, maybe; the node that
    /// redirected them keeps them until they are applied).
    Redirected,
}

/// What the node events were handed to answered.
#[derive(Debug, Clone, Copy, Default)]
pub struct HandedReport {
    pub accepted: usize,
    pub duplicates: usize,
    /// The stream position through which the node that took them wrote their records.
    pub position: Option<Position>,
}

/// How often a node applies what the other nodes wrote (each round reads every partition it
/// follows from the log: more often costs the log's servers more than it saves).
const FOLLOW_EVERY: Duration = Duration::from_millis(100);
/// How long events handed to this node wait for it to follow the records before them.
const FOLLOW_WAIT: Duration = Duration::from_secs(10);

/// The last position applied of each partition followed; held while records are applied, so
/// that a catch-up and a round of following apply one after the other.
pub(crate) type Followed = Arc<tokio::sync::Mutex<HashMap<Partition, Position>>>;

/// Applies the id changes of the partitions other nodes own as their records are written, in
/// log order, alongside this engine's own work; `through` says the log position through which
/// it has.
pub(crate) async fn follow_others(
    ingest: Arc<Ingest>,
    log: Arc<dyn EventLog>,
    owned: Arc<Owned>,
    positions: Followed,
    through: watch::Sender<Position>,
    mut stop: watch::Receiver<bool>,
) {
    // The stream's last position before the last read, and the partitions it read: while
    // neither moved, nothing is new to read. (A read asks the servers for a consumer, which
    // costs them more than the rest of an idle round.)
    let mut read_through: Option<(Position, Vec<Partition>)> = None;
    loop {
        let round = async {
            let mut positions = positions.lock().await;
            // Everything written before this is in the read after it.
            let last = log.clone();
            let end = tokio::task::spawn_blocking(move || last.last_written())
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| e.to_string())?;
            let others = owned.others();
            if read_through.as_ref().is_none_or(|(through, read)| *through != end || *read != others) {
                apply_after(&ingest, &mut positions, others.clone()).await?;
                read_through = Some((end, others));
            }
            through.send_replace(end);
            Ok::<(), String>(())
        };
        if let Err(e) = round.await {
            tracing::warn!("applying the other nodes' records: {e}");
        }
        tokio::select! {
            _ = tokio::time::sleep(FOLLOW_EVERY) => {}
            _ = stop.changed() => return,
        }
    }
}

/// Reads the records of `partitions` after the positions followed, and applies their id
/// changes.
async fn apply_after(
    ingest: &Ingest,
    positions: &mut HashMap<Partition, Position>,
    partitions: Vec<Partition>,
) -> Result<usize, String> {
    // A partition this node owned until now was written here, not followed: its database
    // holds it further than the last record followed of it.
    let durable: HashMap<Partition, Position> = ingest.durable_positions().into_iter().collect();
    let after = partitions
        .into_iter()
        .map(|p| {
            let followed = positions.get(&p).copied().unwrap_or(0);
            (p, followed.max(durable.get(&p).copied().unwrap_or(0)))
        })
        .collect();
    let entries = ingest.read_after(after).await.map_err(|e| e.to_string())?;
    ingest.follow(&entries).await.map_err(|e| e.to_string())?;
    for entry in &entries {
        let last = positions.entry(entry.partition).or_default();
        *last = (*last).max(entry.position);
    }
    Ok(entries.len())
}

/// Takes events other nodes handed this one (see [`Elsewhere`]), and partitions this node gains.
#[derive(Clone)]
pub struct Taker {
    /// Weak, so that a node stopping stops its workers whoever holds this.
    pub(crate) ingest: std::sync::Weak<Ingest>,
    pub(crate) through: watch::Receiver<Position>,
    pub(crate) positions: Followed,
}

impl Taker {
    /// Applies `events` once this node has followed the log through `after`, and answers as
    /// an ingestion does.
    pub async fn take(&self, events: Vec<Event>, after: Position, source: Source) -> Result<IngestReport, String> {
        self.followed_through(after).await?;
        let ingest = self.ingest.upgrade().ok_or("this node is stopping")?;
        ingest.submit_from(events, source).await.map_err(|e| e.to_string())
    }

    /// Waits until this node has followed the log through `after` (at most [`FOLLOW_WAIT`]).
    pub async fn followed_through(&self, after: Position) -> Result<(), String> {
        let mut through = self.through.clone();
        match tokio::time::timeout(FOLLOW_WAIT, through.wait_for(|through| *through >= after)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(_)) => Err("this node is stopping".into()),
            Err(_) => Err(format!("this node has not followed the log through position {after} yet")),
        }
    }

    /// Restores partitions just taken (and fenced) as `restoring` says (each from a snapshot
    /// file, as of its position in it, or from nothing), then applies their records after
    /// that: then they may be owned. Returns how many records it applied.
    pub async fn take_partitions(
        &self,
        restoring: Vec<(Partition, Option<std::path::PathBuf>, Position)>,
    ) -> Result<usize, String> {
        let ingest = self.ingest.upgrade().ok_or("this node is stopping")?;
        let mut positions = self.positions.lock().await;
        // The ids are not restored with the partition: they are this node's, followed. Followed
        // to the partition's end first, so that those its records changed before the snapshot
        // are here too.
        let partitions: Vec<Partition> = restoring.iter().map(|(p, _, _)| *p).collect();
        apply_after(&ingest, &mut positions, partitions).await?;
        let mut after = Vec::new();
        for (partition, snapshot, position) in restoring {
            let restored = ingest.restore(partition, snapshot, Some(position)).await.map_err(|e| e.to_string())?;
            tracing::debug!(
                partition,
                position,
                dropped = restored.dropped,
                profiles = restored.profiles,
                "partition restored"
            );
            after.push((partition, position));
        }
        let entries = ingest.read_after(after).await.map_err(|e| e.to_string())?;
        ingest.take_over(&entries).await.map_err(|e| e.to_string())?;
        // Written, so that the merges sent next (see `Ingest::send_handed_over`) read the
        // profiles they absorb as the records left them.
        ingest.materialize().await.map_err(|e| e.to_string())?;
        for entry in &entries {
            let last = positions.entry(entry.partition).or_default();
            *last = (*last).max(entry.position);
        }
        let applied = entries.len();
        // Written, with the merges they handed over (to send those not yet applied).
        ingest.materialize().await.map_err(|e| e.to_string())?;
        Ok(applied)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_partition_is_one_bit() {
        let owned = Owned::of([0, 5, 63]);
        assert!(owned.owns(0) && owned.owns(5) && owned.owns(63) && !owned.owns(1));
        assert_eq!(owned.partitions(), vec![0, 5, 63]);
        assert_eq!(owned.others().len(), 61);
        assert!(Owned::all().is_all() && Owned::none().is_none() && !owned.is_none() && !owned.is_all());
        owned.add(1);
        owned.remove(5);
        assert_eq!(owned.partitions(), vec![0, 1, 63]);
        owned.start_taking(&[7, 8]);
        assert!(owned.applies(7) && !owned.owns(7) && owned.applies(0) && !owned.applies(9));
        owned.add(7);
        owned.remove(8);
        assert!(owned.taking().is_empty() && owned.owns(7) && !owned.applies(8));
    }
}

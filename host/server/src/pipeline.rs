//! The event pipeline. Profiles are spread over the event log's virtual partitions by a stable
//! hash, and partitions over worker threads, so one profile is only ever updated by one worker.
//! Each worker applies a group of queued requests onto the state it holds in memory, appends
//! what it applied to the event log (one record per partition the group touched: the events of
//! all its requests together, in the order applied), and syncs the log
//! (one sync shared by the workers); a request is answered only after every record holding its
//! work is synced. The derived state is written to SQLite later, in larger transactions that
//! record the log positions they include (at once for what other parts of the server must read
//! from SQLite without delay); reads of the store first ask for it to be written. At start,
//! each worker replays its partitions' records after the stored positions.
//!
//! Stitching moves ids between profiles, and so between partitions. A shared directory maps
//! every id whose profile is named differently to that profile (SQLite's, with what the
//! workers linked lately held in memory); the router and the workers consult it. When a worker finds that an id it applied belongs to a profile another worker
//! owns, it commits, points the directory at the surviving profile, and sends that worker a
//! merge; events for the absorbed profile still queued on it are forwarded behind the merge.

mod changes;
mod directory;

use crate::logging::pseudonym;
use crate::owned::{Elsewhere, Owned, PartitionedEvents, Via};
use crate::telemetry::{Telemetry, Written};
use changes::Changes;
pub use changes::{Absorbed, Adoption, Carried, IdChange};
use directory::Directory;
use sha2::{Digest, Sha256};
use starling_core::engine::rebuild;
use starling_core::model::{ActionDef, Trigger};
use starling_core::stitch::visitor_ids;
use starling_core::{
    CustomEnrichers, Event, IdRefusal, Membership, Model, Outcome, PendingAction, Profile, apply_delete, apply_event,
    apply_merge, apply_time,
};
use starling_log::{Entry, EventLog, Partition, Position};
use starling_runtime::{PluginHost, WasmEnrichers};
use starling_store::{Batch, Claimed, IdentityLink, StoreError};
use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};

/// Most requests applied as one batch (one log append, one answer).
const MAX_JOBS_PER_BATCH: usize = 256;
/// Most events in one log record: a batch's events for one partition beyond it start another.
const MAX_EVENTS_PER_RECORD: usize = 1_000;
/// How long applied state may stay in a worker's memory before it is written to SQLite, and
/// how many events it may gather: a profile touched many times in between is written once, in
/// one transaction. Work that other parts of the server read from SQLite at once (actions for
/// the delivery lanes, merges for another partition, new claims on ids) is written right away.
const MATERIALIZE_EVERY: std::time::Duration = std::time::Duration::from_millis(500);
const MATERIALIZE_EVENTS: usize = 50_000;
/// How long a worker's queue stays empty before it writes what it holds, if it holds at most
/// so many events.
const IDLE_BEFORE_WRITING: std::time::Duration = std::time::Duration::from_millis(2);
const IDLE_WRITE_EVENTS: usize = 1_000;
/// Profiles kept in memory between batches, per partition, before the cache is emptied: enough
/// for the visitors active at once; a larger cache costs memory without saving many reads.
const PROFILE_CACHE_LIMIT: usize = 10_000;
/// How often worker 0 starts forgetting event ids older than the dedup window, and how many
/// ids it looks at after each batch until it has been through them all.
const PRUNE_EVERY_MS: i64 = 60_000;
const PRUNE_CHUNK: usize = 2_000;
/// How long a worker whose recovery could not read the log waits before it tries again.
const RECOVER_AGAIN_AFTER: std::time::Duration = std::time::Duration::from_secs(1);
/// How many merges decided again a worker remembers (see `Worker::note_decided_again`).
const DECIDED_AGAIN_LIMIT: usize = 100_000;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct IngestReport {
    pub accepted: usize,
    pub duplicates: usize,
    /// On a spread node, the stream position through which the request's records (and the
    /// records they handed on) are: a read sent to any node `after` it finds them applied.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub position: Option<Position>,
}

/// A worker's answer to a job.
pub struct Reply {
    pub report: IngestReport,
    /// Answers of the work this job handed to other partitions (forwarded events, merges);
    /// the job is done when they are.
    pub handed_on: Vec<oneshot::Receiver<Result<Reply, String>>>,
}

pub struct IngestJob {
    pub work: Work,
    pub reply: oneshot::Sender<Result<Reply, String>>,
    /// Room on the partition's bounded queue, held until the job is applied (client work only).
    _room: Option<OwnedSemaphorePermit>,
    /// The log record this job applies again, at start.
    replay: Option<ReplayOf>,
    /// Where the job's events came from, which says where those for another node's partition
    /// may go (see [`crate::owned::Via`]).
    source: Source,
}

/// Where events came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// A client (or this node's own work).
    Client,
    /// Another node, which handed them here.
    Node,
    /// The intake, which keeps them until they are applied.
    Intake,
    /// Another node, which took them from the intake: the intake keeps them until they are
    /// applied, and they are not handed on again (see [`Worker::hand_on`]).
    HandedIntake,
    /// A take, which found them in a record applied again but no longer of that record's
    /// partition (see [`Ingest::take_over`]): seen already, they are new to their profile.
    Redirected,
    /// Another node, whose take redirected them (see [`Source::Redirected`]) to a profile this
    /// node owns: checked against the profile's history, and not handed on again (that node
    /// keeps them and sends them again).
    HandedRedirected,
}

impl IngestJob {
    /// Work that reads the store as committed, or a replayed record (committed with its own
    /// position), runs in a batch of its own after everything queued before it.
    fn runs_alone(&self) -> bool {
        self.replay.is_some() || self.reads_committed()
    }

    /// Work that reads what SQLite holds (a profile's history, its ids) as the whole truth.
    fn reads_committed(&self) -> bool {
        matches!(self.work, Work::Unstitch { .. } | Work::Adopt(_) | Work::Delete { .. } | Work::Restore { .. })
    }
}

/// A record of the event log, applied again.
#[derive(Debug, Clone, Copy)]
struct ReplayOf {
    partition: Partition,
    position: Position,
    now_ms: i64,
    /// Events the record's worker handed to this one (the directory named one of its
    /// profiles): applied as part of the record, without a record of their own. Appended
    /// anew, they would take a position past the records still to apply.
    handed: bool,
}

/// What a partition worker is asked to do.
pub enum Work {
    Events(Vec<Event>),
    /// Profiles whose wake-up time has come (visit end, time-relative audiences).
    Wakeups(Vec<String>),
    /// Stitch one profile into another this partition owns.
    Merge(MergeRequest),
    /// A claim of one of this partition's profiles was overtaken by one earlier in the log.
    Overtaken(Overtaken),
    /// Adopt a profile another node split out into this partition.
    Adopt(Adoption),
    /// A hand record applied again: the absorbed profile left the partition with the merge
    /// named `origin`.
    HandedAway {
        absorbed: String,
        origin: Option<String>,
    },
    /// Split a wrongly stitched id back out of its profile.
    Unstitch {
        id: String,
        /// Applied again: the profile its record split it out of (the directory may have
        /// followed the split already, on a node taking the partition).
        from: Option<String>,
        done: oneshot::Sender<Result<serde_json::Value, String>>,
    },
    /// Delete the profiles these ids belong to, everywhere; with `inactive_before`, only those
    /// still inactive since then (retention). Answers the audit record of each deletion.
    Delete {
        ids: Vec<String>,
        reason: &'static str,
        inactive_before: Option<i64>,
        done: DeletionReply,
    },
    /// What a record of a partition another node owns changed of the ids (see [`Carried`]).
    Follow(Carried),
    /// Merges of this partition's profiles into other nodes' profiles, kept and not applied
    /// yet: handed on again (see [`Worker::hand_to_other_nodes`]).
    Hand(Vec<MergeRequest>),
    /// Take the state of a partition this engine takes from a snapshot (none: from the log's
    /// start), as of the partition's `position` in it; the records after it are applied next.
    /// Without a position, drop the partition's state (given up: its ids are followed on).
    Restore {
        partition: Partition,
        snapshot: Option<std::path::PathBuf>,
        position: Option<Position>,
        done: oneshot::Sender<Result<starling_store::RestoredPartition, String>>,
    },
    /// Write what the partition holds in memory to SQLite, so that reads see it.
    Materialize,
    /// A backfill's work on stored profiles after a configuration change: bring each in line
    /// with the model and evaluate `audiences` for it. Not logged: until a backfill is recorded
    /// done, it is made again at start.
    Reconcile {
        ids: Vec<String>,
        audiences: Vec<String>,
        done: oneshot::Sender<Reconciled>,
    },
}

/// What a backfill did to the profiles of one piece of work.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct Reconciled {
    pub examined: u64,
    /// Profiles whose stored state changed.
    pub changed: u64,
    pub joined: u64,
    pub left: u64,
    /// Values of a changed type kept (converted) or dropped; values of removed attributes.
    pub converted: u64,
    pub dropped: u64,
    pub removed: u64,
    /// Actions fired (`on_backfill = "fire"`).
    pub fired: u64,
}

impl Reconciled {
    pub fn add(&mut self, other: &Reconciled) {
        self.examined += other.examined;
        self.changed += other.changed;
        self.joined += other.joined;
        self.left += other.left;
        self.converted += other.converted;
        self.dropped += other.dropped;
        self.removed += other.removed;
        self.fired += other.fired;
    }
}

/// The draft index of work that is not logged: its actions have no origin record.
const UNLOGGED: usize = usize::MAX;

/// Absorb profile `absorbed` into `survivor`, because id `via` links them.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct MergeRequest {
    pub survivor: String,
    pub absorbed: String,
    pub via: String,
    pub attribute: String,
    pub event_id: Option<String>,
    /// Its name (see [`merge_origin`]): the log record of the partition that handed the merge
    /// on, and what it merges; a replay of that record hands it on again, and the survivor's
    /// partition applies a merge of one name once.
    #[serde(default)]
    pub origin: Option<String>,
    /// The absorbed profile's state, when the survivor is of another node's partition.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub absorbed_state: Option<Box<Absorbed>>,
    /// Applied again from its record: whether its first application merged (the record says
    /// so in its changes). Then it does again whatever the ids say now.
    #[serde(skip)]
    pub merged_first: Option<bool>,
}

#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error("ingestion queue is full; retry later")]
    Busy,
    #[error("shutting down")]
    Closed,
    #[error("events not acknowledged: {0}")]
    Failed(String),
    #[error("the profile's partition ({0}) is another node's")]
    Elsewhere(Partition),
}

/// A record of the event log: one piece of work as applied, with the time it was applied at,
/// so that a replay decides exactly what the first run decided.
#[derive(serde::Deserialize)]
#[serde(tag = "work", rename_all = "snake_case")]
enum Logged {
    Events {
        now_ms: i64,
        events: Vec<Event>,
    },
    Wakeups {
        now_ms: i64,
        profiles: Vec<String>,
    },
    Merge {
        now_ms: i64,
        merge: MergeRequest,
    },
    Unstitch {
        now_ms: i64,
        id: String,
    },
    Adopt {
        now_ms: i64,
        adoption: Adoption,
    },
    Delete {
        now_ms: i64,
        ids: Vec<String>,
        reason: String,
        inactive_before: Option<i64>,
    },
    /// A merge into a profile of another node's partition, with the absorbed profile's state:
    /// that node applies it when it follows this record; applied again here, the absorbed
    /// profile leaves (see [`Work::HandedAway`]).
    Hand {
        merge: HandedProfile,
    },
    /// A node took the partition (a replicated log's fence): nothing to apply.
    Owner {
        #[serde(rename = "node")]
        _node: String,
    },
}

/// Of a hand record's merge, the profile handed away and the merge's name.
#[derive(serde::Deserialize)]
struct HandedProfile {
    absorbed: String,
    #[serde(default)]
    origin: Option<String>,
}

/// The record a node appends to each partition it takes, in a replicated log.
pub fn owner_record(node: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({ "work": "owner", "node": node })).expect("a record serializes")
}

/// The history this node holds of `profile`: stored, and applied since (by this batch or
/// earlier ones not yet written).
fn copy_history(
    conn: &rusqlite::Connection,
    p: &Pending,
    batch: &[IngestJob],
    profile: &str,
) -> Result<Vec<Event>, StoreError> {
    let mut events = starling_store::profile_events(conn, profile)?;
    for write in &p.effects.writes {
        match write {
            Write::Event { event: HistoryEvent::Taken(event), profile: to, .. } if to == profile => {
                events.push(event.clone())
            }
            Write::Event { event: HistoryEvent::InBatch { job, event }, profile: to, .. } if to == profile => {
                if let Work::Events(list) = &batch[*job].work {
                    events.extend(list.get(*event).cloned());
                }
            }
            _ => {}
        }
    }
    Ok(events)
}

/// The record handing `merge` (with the absorbed profile's state) to another node's partition.
fn hand_record(merge: &MergeRequest) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({ "work": "hand", "merge": merge })).expect("a record serializes")
}

/// The merge a hand record carries (`None`: another kind of record).
fn handed_merge(payload: &[u8]) -> Option<MergeRequest> {
    #[derive(serde::Deserialize)]
    struct Hand {
        work: String,
        merge: Option<MergeRequest>,
    }
    let hand: Hand = serde_json::from_slice(payload).ok()?;
    (hand.work == "hand").then_some(hand.merge).flatten()
}

/// A record as written: its work, and the version of the configuration it was applied with
/// (a standby following the stream applies it with the same one).
#[derive(serde::Serialize)]
struct Stamped<'a> {
    #[serde(flatten)]
    logged: LoggedRef<'a>,
    config: i64,
    /// See [`Stamp::independent`].
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    independent: bool,
    /// What it changed of the ids other partitions' work reads (see [`Carried`]).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    changes: Vec<&'a IdChange>,
}

/// What a record says of how it was applied.
#[derive(serde::Deserialize, Default)]
struct Stamp {
    /// The version of the configuration it was applied with (0: not said, or a record from
    /// before records said it).
    #[serde(default)]
    config: i64,
    /// Applying it read and changed only its own worker's profiles and ids (and claimed ids no
    /// profile held): its batch held only events and wake-ups, and its events stitched, merged
    /// and handed on nothing. Applied again, it may go side by side with other workers'
    /// independent records; any other record waits for the records before it, and the records
    /// after it wait for it.
    #[serde(default)]
    independent: bool,
}

impl Stamp {
    fn of(payload: &[u8]) -> Stamp {
        serde_json::from_slice(payload).unwrap_or_default()
    }
}

/// The version of the configuration the record `payload` was applied with (0: not said, or a
/// record from before records said it).
pub fn config_version_of(payload: &[u8]) -> i64 {
    Stamp::of(payload).config
}

/// [`Logged`] as written, borrowing from the batch.
#[derive(serde::Serialize)]
#[serde(tag = "work", rename_all = "snake_case")]
enum LoggedRef<'a> {
    Events { now_ms: i64, events: Vec<&'a Event> },
    Wakeups { now_ms: i64, profiles: &'a [String] },
    Merge { now_ms: i64, merge: &'a MergeRequest },
    Unstitch { now_ms: i64, id: &'a str },
    Adopt { now_ms: i64, adoption: &'a Adoption },
    Delete { now_ms: i64, ids: &'a [String], reason: &'a str, inactive_before: Option<i64> },
}

impl Logged {
    /// The record at `position` as the work to apply again, and when it was first applied;
    /// `None` for a record with nothing to apply.
    fn decode(payload: &[u8], position: Position) -> Result<Option<(Work, i64)>, String> {
        let logged: Logged =
            serde_json::from_slice(payload).map_err(|e| format!("event log record {position} is unreadable: {e}"))?;
        let reason = |r: &str| -> &'static str {
            match r {
                "retention" => "retention",
                _ => "request",
            }
        };
        Ok(Some(match logged {
            Logged::Events { now_ms, events } => (Work::Events(events), now_ms),
            Logged::Wakeups { now_ms, profiles } => (Work::Wakeups(profiles), now_ms),
            Logged::Merge { now_ms, mut merge } => {
                let merged = Carried::of(payload, position)
                    .changes
                    .iter()
                    .any(|change| matches!(change, IdChange::Merged { absorbed, .. } if *absorbed == merge.absorbed));
                merge.merged_first = Some(merged);
                (Work::Merge(merge), now_ms)
            }
            Logged::Unstitch { now_ms, id } => {
                let from = Carried::of(payload, position).changes.into_iter().find_map(|change| match change {
                    IdChange::Split { id: split, from, .. } if split == id => Some(from),
                    _ => None,
                });
                (Work::Unstitch { id, from, done: oneshot::channel().0 }, now_ms)
            }
            Logged::Adopt { now_ms, adoption } => (Work::Adopt(adoption), now_ms),
            Logged::Delete { now_ms, ids, reason: r, inactive_before } => {
                (Work::Delete { ids, reason: reason(&r), inactive_before, done: oneshot::channel().0 }, now_ms)
            }
            // Its merge is the survivor's node's; its time is of no matter here.
            Logged::Hand { merge } => (Work::HandedAway { absorbed: merge.absorbed, origin: merge.origin }, 0),
            Logged::Owner { .. } => return Ok(None),
        }))
    }
}

/// What applying an event did that other workers' work may depend on, counted before and after
/// it: an event that left the counts as they were touched only its worker's profiles and ids.
/// Claiming an id no profile holds is not counted: a later record that reads the id finds it
/// held by another worker's profile and stitches (so it is not independent and waits), and one
/// that claims it too (written side by side) is settled by log order as the first run settled it.
struct Crossings {
    /// Merges, events for other workers, overtaken claims, profiles leaving for another worker
    /// or absorbed.
    held: [usize; 5],
    /// How many writes were held when counting started.
    writes: usize,
}

impl Crossings {
    fn at(p: &Pending) -> Crossings {
        Crossings { held: Crossings::held(p), writes: p.effects.writes.len() }
    }

    fn held(p: &Pending) -> [usize; 5] {
        [p.merges.len(), p.forwards.len(), p.overtaken.len(), p.leaving.len(), p.moved.len()]
    }

    /// Whether anything was stitched, merged, split or handed on since.
    fn crossed_since(&self, p: &Pending) -> bool {
        let crossing = |w: &Write| matches!(w, Write::Merge { .. } | Write::Split { .. } | Write::SplitAway { .. });
        self.held != Crossings::held(p)
            || p.effects.writes.get(self.writes..).is_some_and(|new| new.iter().any(crossing))
    }
}

/// What a record of this batch will hold, by job and partition.
enum Draft {
    /// (job, index into its events), in the order applied.
    Events(Vec<(usize, usize)>),
    Wakeups(Vec<String>),
    Merge(MergeRequest),
    Unstitch(String),
    Adopt(Adoption),
    Delete(Vec<String>),
}

/// The log position from which each worker has appended records whose state is not yet
/// committed (`u64::MAX`: none). Records before the lowest are in SQLite.
#[derive(Default)]
pub struct Materialized {
    inflight: Vec<AtomicU64>,
    /// A deletion was committed since the log was last sealed.
    deleted: AtomicBool,
    /// The start's replay is applying records: one at a time, so each worker waits on the
    /// others most of the time, and would otherwise write what it holds while it does.
    replaying: AtomicBool,
    /// Each partition's position the database held at the last checkpoint, which made it
    /// durable.
    durable: Mutex<Vec<(Partition, Position)>>,
}

fn directory_unread(e: StoreError) -> IngestError {
    IngestError::Failed(format!("reading which profile an id belongs to: {e}"))
}

/// The front of the pipeline: routes work to the partition that owns its profile.
pub struct Ingest {
    partitions: Vec<mpsc::UnboundedSender<IngestJob>>,
    room: Vec<Arc<Semaphore>>,
    directory: Directory,
    log: Arc<dyn EventLog>,
    materialized: Arc<Materialized>,
    /// The log position each partition's stored state included at start.
    stored: HashMap<Partition, Position>,
    /// The workers' shared writer, for reading the merges handed over after a replay and the
    /// configurations records were applied with.
    writer: Arc<Mutex<rusqlite::Connection>>,
    /// The configuration the workers apply with (a replay switches it record by record).
    config: Arc<crate::live::Live>,
    owned: Arc<Owned>,
    clock: fn() -> i64,
    /// Which records' actions may be delivered: a record read from the log is durable.
    durable: Arc<crate::delivery::Durable>,
    /// See `Worker::redirected`.
    redirected: Arc<Mutex<Vec<Event>>>,
}

impl Ingest {
    /// Queues `events` on their partitions, all or nothing, and waits until they are durable.
    pub async fn submit(&self, events: Vec<Event>) -> Result<IngestReport, IngestError> {
        self.send(events)?.durable().await
    }

    /// [`Ingest::submit`] for events from `source`.
    pub async fn submit_from(&self, events: Vec<Event>, source: Source) -> Result<IngestReport, IngestError> {
        self.send_events(events, source)?.durable().await
    }

    /// Queues due profiles on their partitions and waits until what time did to them is durable.
    pub async fn wake(&self, profiles: Vec<String>) -> Result<IngestReport, IngestError> {
        let n = self.partitions.len();
        let mut groups: Vec<Vec<String>> = (0..n).map(|_| Vec::new()).collect();
        // Another node wakes its partitions' profiles.
        for id in profiles.into_iter().filter(|id| self.owned.owns_profile(id)) {
            groups[worker_of(&id, n)].push(id);
        }
        self.queue(groups.into_iter().map(|g| (!g.is_empty()).then_some(Work::Wakeups(g))).collect(), false).await
    }

    /// Splits `id` out of the profile it is stitched into, rebuilding both from their events.
    pub async fn unstitch(&self, id: &str) -> Result<serde_json::Value, IngestError> {
        let n = self.partitions.len();
        let profile = self.profile_of(id).map_err(directory_unread)?;
        self.check_owned(&profile)?;
        let (done, result) = oneshot::channel();
        let mut work: Vec<Option<Work>> = (0..n).map(|_| None).collect();
        work[worker_of(&profile, n)] = Some(Work::Unstitch { id: id.to_string(), from: None, done });
        self.queue(work, false).await?;
        result.await.map_err(|_| IngestError::Closed)?.map_err(IngestError::Failed)
    }

    /// Whether a profile split out for `id` is another node's to adopt (its partition is).
    pub fn adopted_elsewhere(&self, id: &str) -> bool {
        !self.owned.owns_profile(id)
    }

    /// Waits, for at most `within`, until no adoption of the profile split out for `id` is kept
    /// here unapplied (the node adopting it logged it, and this one followed that record).
    /// Whether none is.
    pub async fn adopted(&self, id: &str, within: std::time::Duration) -> Result<bool, IngestError> {
        let suffix = split_suffix(id);
        let started = std::time::Instant::now();
        loop {
            let (writer, suffix) = (self.writer.clone(), suffix.clone());
            let kept = tokio::task::spawn_blocking(move || {
                let writer = writer.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                starling_store::keeps_unapplied_ending(&writer, &suffix)
            })
            .await
            .map_err(|_| IngestError::Closed)?
            .map_err(|e| IngestError::Failed(e.to_string()))?;
            if !kept {
                return Ok(true);
            }
            if started.elapsed() >= within {
                return Ok(false);
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }

    /// Deletes the profiles `ids` belong to, with everything about them; fires `deleted` actions.
    /// Answers one audit record per profile deleted (none for an unknown id).
    pub async fn delete(
        &self,
        ids: Vec<String>,
        reason: &'static str,
        inactive_before: Option<i64>,
    ) -> Result<Vec<serde_json::Value>, IngestError> {
        let n = self.partitions.len();
        let mut groups: Vec<Vec<String>> = (0..n).map(|_| Vec::new()).collect();
        for id in ids {
            let profile = self.profile_of(&id).map_err(directory_unread)?;
            self.check_owned(&profile)?;
            groups[worker_of(&profile, n)].push(id);
        }
        let mut work: Vec<Option<Work>> = (0..n).map(|_| None).collect();
        let mut answers = Vec::new();
        for (i, ids) in groups.into_iter().enumerate().filter(|(_, g)| !g.is_empty()) {
            let (done, answer) = oneshot::channel();
            work[i] = Some(Work::Delete { ids, reason, inactive_before, done });
            answers.push(answer);
        }
        self.queue(work, false).await?;
        let mut records = Vec::new();
        for answer in answers {
            records.extend(answer.await.map_err(|_| IngestError::Closed)?.map_err(IngestError::Failed)?);
        }
        Ok(records)
    }

    /// Work on a profile of a partition another node owns is that node's.
    fn check_owned(&self, profile: &str) -> Result<(), IngestError> {
        match self.owned.owns_profile(profile) {
            true => Ok(()),
            false => Err(IngestError::Elsewhere(starling_log::partition_of(profile))),
        }
    }

    /// Waits until everything applied so far is written to SQLite, so that a read of the store
    /// sees every answered request (workers otherwise keep recent changes in memory for a while).
    pub async fn materialize(&self) -> Result<(), IngestError> {
        if self.materialized.inflight.iter().all(|p| p.load(Ordering::SeqCst) == u64::MAX) {
            return Ok(());
        }
        let n = self.partitions.len();
        self.queue((0..n).map(|_| Some(Work::Materialize)).collect(), false).await.map(|_| ())
    }

    /// Waits until every partition has applied a batch after this call: from then on, none
    /// applies anything with a configuration swapped out before it.
    pub async fn barrier(&self) -> Result<(), IngestError> {
        let n = self.partitions.len();
        self.queue((0..n).map(|_| Some(Work::Materialize)).collect(), false).await.map(|_| ())
    }

    /// A backfill's work on stored profiles `ids` (see [`Work::Reconcile`]).
    pub async fn reconcile(&self, ids: Vec<String>, audiences: &[String]) -> Result<Reconciled, IngestError> {
        let n = self.partitions.len();
        let mut groups: Vec<Vec<String>> = (0..n).map(|_| Vec::new()).collect();
        // Another node reconciles its partitions' profiles.
        for id in ids.into_iter().filter(|id| self.owned.owns_profile(id)) {
            groups[worker_of(&id, n)].push(id);
        }
        let mut results = Vec::new();
        let work = groups
            .into_iter()
            .map(|ids| {
                (!ids.is_empty()).then(|| {
                    let (done, result) = oneshot::channel();
                    results.push(result);
                    Work::Reconcile { ids, audiences: audiences.to_vec(), done }
                })
            })
            .collect();
        self.queue(work, false).await?;
        let mut total = Reconciled::default();
        for result in results {
            total.add(&result.await.map_err(|_| IngestError::Closed)?);
        }
        Ok(total)
    }

    /// The profile an id belongs to now.
    pub fn profile_of(&self, id: &str) -> Result<String, StoreError> {
        self.directory.profile_of(id)
    }

    /// A log position the records that last pointed `id` (into a profile, or back at itself)
    /// are at or before; `None` for an id naming its own profile since longer than memory
    /// holds it.
    pub fn pointed_through(&self, id: &str) -> Result<Option<Position>, StoreError> {
        self.directory.pointed_through(id)
    }

    /// What the checkpoint task needs to trim the log; it holds no queue, so it does not keep
    /// the workers running.
    pub fn log_state(&self) -> LogState {
        LogState { log: self.log.clone(), materialized: self.materialized.clone() }
    }

    /// Applies again, in log order, every record after the position its partition's stored
    /// state includes: what was acknowledged but not yet committed to SQLite when the last run
    /// stopped (see [`Ingest::apply_records`]), then sends the merges handed over and not
    /// applied by their partition (the replay sends none itself). Returns how many records were
    /// read. Until it returns, the log is not truncated.
    pub async fn replay(&self) -> Result<usize, IngestError> {
        let reading = std::time::Instant::now();
        let entries = self.read_after(self.stored_positions()).await?;
        tracing::info!(
            records = entries.len(),
            elapsed_ms = reading.elapsed().as_millis() as u64,
            "event log read after the stored state"
        );
        if let Some(first) = entries.first()
            && self.stored.is_empty()
            && first.position > 1
        {
            tracing::warn!(
                first = first.position,
                "the database holds no state but the event log starts at position {}: its earlier \
                 records were truncated after an earlier database stored them; replaying what remains",
                first.position
            );
        }
        // A restart on a changed file, or after a change just before a crash: each record with
        // the configuration it was first applied with.
        self.apply_records(&entries).await?;
        self.directory.settle(self.log.next_position().saturating_sub(1));
        let n = self.partitions.len();
        self.queue((0..n).map(|_| Some(Work::Materialize)).collect(), false).await?;
        // Merges whose partition had not logged them when the last run stopped.
        let resent = self.send_handed_over(|_| true).await?;
        if resent > 0 {
            tracing::info!(resent, "merges and split-out profiles handed over before the restart sent again");
        }
        // What the replay applied is written before the log may forget anything.
        self.queue((0..n).map(|_| Some(Work::Materialize)).collect(), false).await?;
        // A merge sent again that found nothing to merge (its absorbed profile is not here)
        // never will: it is forgotten, not sent again at every start.
        let found_nothing: Vec<String> = self
            .handed_over()?
            .into_iter()
            .filter(|m| self.owned.owns_profile(&m.survivor))
            .filter_map(|m| m.origin)
            .collect();
        if !found_nothing.is_empty() {
            let writer = self.writer.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            starling_store::forget_handed_over(&writer, &found_nothing)
                .map_err(|e| IngestError::Failed(e.to_string()))?;
            tracing::warn!(merges = found_nothing.len(), "merges handed over found nothing to merge and are forgotten");
        }
        for inflight in &self.materialized.inflight {
            inflight.store(u64::MAX, Ordering::SeqCst);
        }
        Ok(entries.len())
    }

    /// Sends again the merges handed over to owned partitions that `partitions` accepts and
    /// that they have not applied (a start, or a node taking partitions whose owner died before
    /// it applied them), and the profiles split out into them not adopted yet; waits until they
    /// are applied. Returns how many were sent.
    pub async fn send_handed_over(&self, partitions: impl Fn(Partition) -> bool) -> Result<usize, IngestError> {
        let n = self.partitions.len();
        // Those for another node's partitions are that node's to apply (and log).
        let handed_over: Vec<MergeRequest> = self
            .handed_over()?
            .into_iter()
            .filter(|m| self.owned.owns_profile(&m.survivor) && partitions(starling_log::partition_of(&m.survivor)))
            .collect();
        let resent = handed_over.len();
        // A worker's are queued at once, so that it applies them in batches; the workers take
        // turns, so that two merges of one pair of profiles in opposite directions are never
        // applied side by side (each would absorb the other).
        let mut by_worker: Vec<Vec<MergeRequest>> = (0..n).map(|_| Vec::new()).collect();
        for merge in handed_over {
            by_worker[worker_of(&merge.survivor, n)].push(merge);
        }
        // One not applied (its batch held a record of a partition lost meanwhile, say) stays
        // kept: the others are sent all the same, and the caller sends the kept ones again.
        let mut failed = Failed::default();
        for merges in by_worker {
            let mut sent = Vec::with_capacity(merges.len());
            for merge in merges {
                let mut jobs: Vec<Option<Work>> = (0..n).map(|_| None).collect();
                // One whose absorbed profile is of a partition this node owns (and not merged
                // already) goes through that profile's worker: from then on the profile's ids go
                // to the survivor, and the merge carries the profile as it is by then (what was
                // applied to it since the state was kept: a live event after a take, before this).
                let (absorbeds, survivors) = (worker_of(&merge.absorbed, n), worker_of(&merge.survivor, n));
                match self.owned.owns_profile(&merge.absorbed) && !self.was_merged_away(&merge.absorbed)? {
                    true => jobs[absorbeds] = Some(Work::Hand(vec![merge])),
                    false => jobs[survivors] = Some(Work::Merge(merge)),
                }
                sent.push(self.dispatch(jobs, false)?);
            }
            for merge in sent {
                failed.note(merge.durable().await);
            }
        }
        // So are the profiles split out into them: adopted once (a partition's state says
        // which it adopted).
        let adoptions: Vec<Adoption> = self
            .kept_adoptions()?
            .into_iter()
            .filter(|a| self.owned.owns_profile(&a.id) && partitions(starling_log::partition_of(&a.id)))
            .collect();
        let resent = resent + adoptions.len();
        for adoption in adoptions {
            let mut jobs: Vec<Option<Work>> = (0..n).map(|_| None).collect();
            let to = worker_of(&adoption.id, n);
            jobs[to] = Some(Work::Adopt(adoption));
            failed.note(self.queue(jobs, false).await);
        }
        failed.into_result(resent)
    }

    /// Hands on again the merges kept for other nodes' profiles of profiles in `partitions`
    /// (just taken): their last owner may have stopped before it did, or the survivor's owner
    /// before applying them. Returns how many.
    pub async fn hand_kept(&self, partitions: impl Fn(Partition) -> bool) -> Result<usize, IngestError> {
        let n = self.partitions.len();
        let mut by_worker: Vec<Vec<MergeRequest>> = (0..n).map(|_| Vec::new()).collect();
        let mut kept = 0;
        for merge in self.handed_over()? {
            if partitions(starling_log::partition_of(&merge.absorbed)) && !self.owned.owns_profile(&merge.survivor) {
                by_worker[worker_of(&merge.absorbed, n)].push(merge);
                kept += 1;
            }
        }
        let work = by_worker.into_iter().map(|m| (!m.is_empty()).then_some(Work::Hand(m))).collect();
        self.queue(work, false).await?;
        Ok(kept)
    }

    /// The configuration this database recorded as `version`, if it did and it still parses.
    fn recorded_config(&self, version: i64) -> Result<Option<(Arc<Model>, crate::live::Active)>, IngestError> {
        let recorded = {
            let writer = self.writer.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            starling_store::config_version(&writer, version).map_err(|e| IngestError::Failed(e.to_string()))?
        };
        let Some(recorded) = recorded else { return Ok(None) };
        match starling_core::parse(&recorded.source) {
            Ok(model) => Ok(Some((
                Arc::new(model),
                crate::live::Active {
                    version,
                    sha256: recorded.sha256,
                    applied_ms: recorded.applied_ms,
                    how: recorded.how,
                },
            ))),
            Err(e) => {
                tracing::warn!(version, "records of configuration {version} are applied with this start's: {e}");
                Ok(None)
            }
        }
    }

    fn was_merged_away(&self, profile: &str) -> Result<bool, IngestError> {
        let writer = self.writer.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        starling_store::was_merged_away(&writer, profile).map_err(|e| IngestError::Failed(e.to_string()))
    }

    /// Merges handed over to another partition that it has not applied.
    fn handed_over(&self) -> Result<Vec<MergeRequest>, IngestError> {
        self.kept(false)
    }

    /// Profiles split out into another partition that it has not adopted.
    fn kept_adoptions(&self) -> Result<Vec<Adoption>, IngestError> {
        self.kept(true)
    }

    /// What is kept until another partition applies it (`handed_over`): the profiles split out
    /// (`adoptions`) or the merges.
    fn kept<T: serde::de::DeserializeOwned>(&self, adoptions: bool) -> Result<Vec<T>, IngestError> {
        let writer = self.writer.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let stored = starling_store::handed_over(&writer).map_err(|e| IngestError::Failed(e.to_string()))?;
        Ok(stored
            .into_iter()
            .filter(|(origin, _)| is_split_origin(origin) == adoptions)
            .filter_map(|(origin, kept)| match serde_json::from_str::<T>(&kept) {
                Ok(kept) => Some(kept),
                Err(e) => {
                    tracing::error!(origin, "kept for another partition and unreadable, not sent again: {e}");
                    None
                }
            })
            .collect())
    }

    /// Each partition's position the database holds durably (as of the last checkpoint).
    pub fn durable_positions(&self) -> Vec<(Partition, Position)> {
        self.materialized.durable.lock().expect("durable positions").clone()
    }

    /// Each partition's position its stored state included at start.
    pub fn stored_positions(&self) -> Vec<(Partition, Position)> {
        (0..starling_log::PARTITIONS).map(|vp| (vp, self.stored.get(&vp).copied().unwrap_or(0))).collect()
    }

    /// The log's records after the partitions' positions `after`, in log order.
    pub async fn read_after(&self, after: Vec<(Partition, Position)>) -> Result<Vec<Entry>, IngestError> {
        let mut entries = Vec::new();
        let log = self.log.clone();
        let read =
            tokio::task::spawn_blocking(move || log.read(&after, &mut |entry| entries.push(entry)).map(|()| entries));
        let entries = read
            .await
            .map_err(|e| IngestError::Failed(e.to_string()))?
            .map_err(|e| IngestError::Failed(format!("reading the event log: {e}")))?;
        // Records another node appended (a partition taken, a hand record followed) are as
        // durable as this node's synced ones: the actions they decide need not wait for this
        // node's next append to pass their positions.
        if let Some(last) = entries.iter().map(|e| e.position).max() {
            self.durable.synced(last);
        }
        Ok(entries)
    }

    /// Applies log records again, in log order, each at the time it was first applied, by its
    /// partition's worker, and with the configuration it was first applied with when this
    /// database recorded it (the current one goes on afterwards): records of a change's
    /// moments, which workers applied some with the old configuration after others applied
    /// some with the new one, come out as they first did.
    pub async fn apply_records(&self, entries: &[Entry]) -> Result<(), IngestError> {
        self.materialized.replaying.store(true, Ordering::SeqCst);
        let applied = self.apply_logged(entries, Applying::Replay).await;
        self.materialized.replaying.store(false, Ordering::SeqCst);
        applied
    }

    /// Takes the state of `partition` (which this engine takes) from `snapshot` as of
    /// `position` (no snapshot: none, and the partition's records from the log's start); with
    /// no position, drops it (given up: only its ids are followed from now on).
    pub async fn restore(
        &self,
        partition: Partition,
        snapshot: Option<std::path::PathBuf>,
        position: Option<Position>,
    ) -> Result<starling_store::RestoredPartition, IngestError> {
        let n = self.partitions.len();
        let (done, restored) = oneshot::channel();
        let mut work: Vec<Option<Work>> = (0..n).map(|_| None).collect();
        work[partition as usize % n] = Some(Work::Restore { partition, snapshot, position, done });
        self.queue(work, false).await?;
        restored.await.map_err(|_| IngestError::Closed)?.map_err(IngestError::Failed)
    }

    /// Applies what records other nodes wrote, of partitions this engine does not own, changed
    /// of the ids (see [`Carried`]), while the owned partitions go on live.
    pub async fn follow(&self, entries: &[Entry]) -> Result<(), IngestError> {
        self.apply_logged(entries, Applying::Follow).await
    }

    /// Applies the records of partitions this engine takes, as [`Ingest::apply_records`] does,
    /// while the owned partitions go on live: merges the records hand to owned partitions are
    /// applied live, and logged.
    pub async fn take_over(&self, entries: &[Entry]) -> Result<(), IngestError> {
        self.apply_logged(entries, Applying::TakeOver).await?;
        self.apply_redirected().await;
        Ok(())
    }

    /// Applies the events takes redirected to the survivors of merges they decided again:
    /// anew, not as part of the records they were in, so that they are logged in their
    /// profiles' partitions, which a later take applies again. Those not applied (a survivor's
    /// partition moved since, and its owner could not take them) are kept, to be sent again at
    /// the node's next round.
    pub async fn apply_redirected(&self) {
        let redirected =
            std::mem::take(&mut *self.redirected.lock().unwrap_or_else(std::sync::PoisonError::into_inner));
        if redirected.is_empty() {
            return;
        }
        // Once each: a take may redirect again an event kept to be sent again. (Those without
        // an id cannot be told apart.)
        let mut once = HashSet::new();
        let redirected: Vec<Event> = redirected
            .into_iter()
            .filter(|e| e.dedup_key().is_none_or(|key| once.insert((e.visitor_id.clone(), key))))
            .collect();
        let events = redirected.len();
        match self.submit_from(redirected.clone(), Source::Redirected).await {
            Ok(_) => tracing::debug!(events, "events after merges decided again applied to their survivors"),
            Err(e) => {
                // Those applied meanwhile are in their profiles' histories: sent again, they
                // are duplicates there.
                tracing::warn!(
                    events,
                    "events after merges decided again not applied to their survivors (again next round): {e}"
                );
                self.redirected.lock().unwrap_or_else(std::sync::PoisonError::into_inner).extend(redirected);
            }
        }
    }

    async fn apply_logged(&self, entries: &[Entry], applying: Applying) -> Result<(), IngestError> {
        let starting = (self.config.model(), self.config.active());
        let applied = self.apply_in_order(entries, applying).await;
        if !Arc::ptr_eq(&self.config.model(), &starting.0) {
            self.config.swap(starting.0, starting.1);
        }
        applied
    }

    /// Workers take the configuration at each record, so the loop waits for the records queued
    /// before switching.
    async fn apply_in_order(&self, entries: &[Entry], applying: Applying) -> Result<(), IngestError> {
        let live = applying != Applying::Replay;
        let n = self.partitions.len();
        // A worker applies the records queued to it in order, without waiting for this loop in
        // between. Before a record of another worker, the loop waits for what is queued (and
        // the work it handed on), unless both are independent (see `Stamp::independent`): then
        // the workers apply them side by side.
        let mut queued = Replaying::default();
        let mut unrecorded = HashSet::new();
        for entry in entries {
            // A merge another node hands to a profile this one owns is applied here, live, and
            // logged in the survivor's partition with the state it carries.
            if applying == Applying::Follow
                && let Some(merge) = handed_merge(&entry.payload)
            {
                // Kept until applied, by this node or whichever owns the survivor's partition
                // next (taking it, a node applies the merges kept for it).
                // From now on the absorbed profile's ids route to the survivor, as on the node
                // that handed the merge on (otherwise an event for them would go back and forth
                // between the two).
                let ids = {
                    let writer = self.writer.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                    if let Some(origin) = &merge.origin {
                        let request = serde_json::to_string(&merge).expect("merges serialize");
                        starling_store::keep_handed_over(&writer, origin, &request)
                            .map_err(|e| IngestError::Failed(e.to_string()))?;
                    }
                    // The events the merge carries reach the survivor with it: one sent here
                    // again before the merge is applied (an ingestion retried after the
                    // absorbed profile's owner applied it) is a duplicate, not a new event.
                    if let Some(state) = &merge.absorbed_state {
                        let keys: Vec<String> = state.events.iter().filter_map(Event::dedup_key).collect();
                        starling_store::mark_seen(&writer, &keys, (self.clock)())
                            .map_err(|e| IngestError::Failed(e.to_string()))?;
                    }
                    starling_store::ids_of(&writer, &merge.absorbed).map_err(|e| IngestError::Failed(e.to_string()))?
                };
                let moved = ids
                    .into_iter()
                    .chain(self.directory.stitched_into(&merge.absorbed))
                    .chain([merge.absorbed.clone()]);
                self.directory.point(moved.map(|id| (id, merge.survivor.clone())).collect::<Vec<_>>(), entry.position);
                if self.owned.owns_profile(&merge.survivor) {
                    queued.wait().await?;
                    let mut jobs: Vec<Option<Work>> = (0..n).map(|_| None).collect();
                    let to = worker_of(&merge.survivor, n);
                    jobs[to] = Some(Work::Merge(merge));
                    queued.records.push(self.dispatch_jobs(jobs, false, None, Source::Client)?);
                    queued.wait().await?;
                }
                continue;
            }
            let Some((work, now_ms)) = Logged::decode(&entry.payload, entry.position).map_err(IngestError::Failed)?
            else {
                continue;
            };
            let work = match applying {
                Applying::Follow => Work::Follow(Carried::of(&entry.payload, entry.position)),
                _ => work,
            };
            let adoptions = match &work {
                Work::Follow(carried) => self.keep_adoptions(carried)?,
                _ => Vec::new(),
            };
            let stamp = Stamp::of(&entry.payload);
            let version = stamp.config;
            if version != self.config.active().version
                && !unrecorded.contains(&version)
                && let Some((model, active)) = match self.recorded_config(version)? {
                    None => {
                        unrecorded.insert(version);
                        None
                    }
                    found => found,
                }
            {
                queued.wait().await?;
                tracing::info!(
                    version,
                    position = entry.position,
                    "records applied again with the configuration they were applied with"
                );
                self.config.swap(model, active);
            }
            let worker = entry.partition as usize % n;
            // Another node's merge may absorb a profile this node applies live: its worker
            // writes what it holds first (the record that handed the merge on may be this
            // node's own, still in memory), as a live merge waits for the absorbed side's commit.
            let absorbed_owned: Vec<&String> = match &work {
                Work::Merge(merge) => vec![&merge.absorbed],
                Work::Follow(carried) => carried
                    .changes
                    .iter()
                    .filter_map(|change| match change {
                        IdChange::Merged { absorbed, .. } => Some(absorbed),
                        _ => None,
                    })
                    .collect(),
                _ => Vec::new(),
            };
            let absorbed_owned: Vec<&String> =
                absorbed_owned.into_iter().filter(|absorbed| self.owned.owns_profile(absorbed)).collect();
            if live && !absorbed_owned.is_empty() {
                queued.wait().await?;
                let mut jobs: Vec<Option<Work>> = (0..n).map(|_| None).collect();
                for absorbed in absorbed_owned {
                    jobs[worker_of(absorbed, n)] = Some(Work::Materialize);
                }
                self.queue(jobs, false).await?;
            }
            let waits_for = if stamp.independent { &queued.dependent_to } else { &queued.to };
            if waits_for.iter().any(|w| *w != worker) {
                queued.wait().await?;
            }
            let mut jobs: Vec<Option<Work>> = (0..n).map(|_| None).collect();
            jobs[worker] = Some(work);
            let replay = ReplayOf { partition: entry.partition, position: entry.position, now_ms, handed: false };
            queued.records.push(self.dispatch_jobs(jobs, false, Some(replay), Source::Client)?);
            queued.to.insert(worker);
            if !stamp.independent {
                queued.dependent_to.insert(worker);
            }
            // A profile split out into a partition this node owns is adopted here, live, and
            // logged in that partition.
            for adoption in adoptions.into_iter().filter(|a| self.owned.owns_profile(&a.id)) {
                queued.wait().await?;
                let mut jobs: Vec<Option<Work>> = (0..n).map(|_| None).collect();
                let to = worker_of(&adoption.id, n);
                jobs[to] = Some(Work::Adopt(adoption));
                queued.records.push(self.dispatch_jobs(jobs, false, None, Source::Client)?);
                queued.wait().await?;
            }
        }
        queued.wait().await
    }

    /// The profiles split out into other nodes' partitions by the followed record `carried`,
    /// kept until adopted, by whichever node owns the partition (now, or when it takes it).
    fn keep_adoptions(&self, carried: &Carried) -> Result<Vec<Adoption>, IngestError> {
        let adoptions: Vec<Adoption> = carried
            .changes
            .iter()
            .filter_map(|change| match change {
                IdChange::Split { id, from, events: Some(events) } => Some(Adoption {
                    id: id.clone(),
                    from: from.clone(),
                    origin: split_origin(carried.position, id),
                    events: events.clone(),
                }),
                _ => None,
            })
            .collect();
        if !adoptions.is_empty() {
            let writer = self.writer.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            for adoption in &adoptions {
                let kept = serde_json::to_string(adoption).expect("adoptions serialize");
                starling_store::keep_handed_over(&writer, &adoption.origin, &kept)
                    .map_err(|e| IngestError::Failed(e.to_string()))?;
            }
        }
        Ok(adoptions)
    }

    /// Requests queued on each partition, for the queue-depth metric.
    pub fn queue_depths(&self, capacity: usize) -> Vec<usize> {
        self.room.iter().map(|r| capacity.saturating_sub(r.available_permits())).collect()
    }

    /// Sends one piece of work per partition (index = partition) and waits for it to be durable.
    async fn queue(&self, work: Vec<Option<Work>>, client: bool) -> Result<IngestReport, IngestError> {
        self.dispatch(work, client)?.durable().await
    }

    /// Queues `events` without waiting: work sent later for the same profiles is applied after
    /// it. Wait for the answer with [`Queued::durable`].
    pub fn send(&self, events: Vec<Event>) -> Result<Queued, IngestError> {
        self.send_events(events, Source::Client)
    }

    fn send_events(&self, events: Vec<Event>, source: Source) -> Result<Queued, IngestError> {
        let n = self.partitions.len();
        let mut groups: Vec<Vec<Event>> = (0..n).map(|_| Vec::new()).collect();
        for event in events {
            groups[worker_of(&self.profile_of(&event.visitor_id).map_err(directory_unread)?, n)].push(event);
        }
        let work = groups.into_iter().map(|g| (!g.is_empty()).then_some(Work::Events(g))).collect();
        self.dispatch_jobs(work, true, None, source)
    }

    /// Sends one piece of work per partition. Client work must find room on every partition it
    /// goes to, or none of it is queued.
    fn dispatch(&self, work: Vec<Option<Work>>, client: bool) -> Result<Queued, IngestError> {
        self.dispatch_jobs(work, client, None, Source::Client)
    }

    fn dispatch_jobs(
        &self,
        mut work: Vec<Option<Work>>,
        client: bool,
        replay: Option<ReplayOf>,
        source: Source,
    ) -> Result<Queued, IngestError> {
        let mut rooms = Vec::new();
        for (i, w) in work.iter().enumerate() {
            if w.is_some() {
                let room = match client {
                    true => Some(self.room[i].clone().try_acquire_owned().map_err(|_| IngestError::Busy)?),
                    false => None,
                };
                rooms.push((i, room));
            }
        }
        let mut pending = VecDeque::with_capacity(rooms.len());
        for (i, room) in rooms {
            let (reply, answer) = oneshot::channel();
            let job = IngestJob { work: work[i].take().expect("queued work"), reply, _room: room, replay, source };
            self.partitions[i].send(job).map_err(|_| IngestError::Closed)?;
            pending.push_back(answer);
        }
        Ok(Queued { pending })
    }
}

/// How log records are applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Applying {
    /// Again, by a start or a standby: every record's work.
    Replay,
    /// Another node's, of partitions this engine does not own: their id changes only.
    Follow,
    /// Of partitions this engine takes: their work, while the owned partitions go on live.
    TakeOver,
}

/// Records queued to workers to be applied again, not yet waited for.
#[derive(Default)]
struct Replaying {
    records: Vec<Queued>,
    /// The workers they were queued to.
    to: HashSet<usize>,
    /// The workers a record not independent was queued to.
    dependent_to: HashSet<usize>,
}

impl Replaying {
    /// Waits until the records queued, and the work they handed on, are applied.
    async fn wait(&mut self) -> Result<(), IngestError> {
        for applied in self.records.drain(..) {
            applied.durable().await?;
        }
        self.to.clear();
        self.dependent_to.clear();
        Ok(())
    }
}

/// Pieces of work sent one after another whatever becomes of each: how many failed, and why
/// the first did.
#[derive(Default)]
struct Failed {
    count: usize,
    first: Option<IngestError>,
}

impl Failed {
    fn note<T>(&mut self, outcome: Result<T, IngestError>) {
        if let Err(e) = outcome {
            self.count += 1;
            self.first.get_or_insert(e);
        }
    }

    /// `done` when none failed; otherwise the first failure, a shutdown as it is.
    fn into_result(self, done: usize) -> Result<usize, IngestError> {
        match self.first {
            None => Ok(done),
            Some(IngestError::Failed(e)) => {
                Err(IngestError::Failed(format!("{} of {done} not applied: {e}", self.count)))
            }
            Some(e) => Err(e),
        }
    }
}

/// The answer to a piece of work.
type Answer = oneshot::Receiver<Result<Reply, String>>;

/// What a batch answers once its records are on disk.
struct Answers {
    batch: Vec<IngestJob>,
    /// Per job, its report and the answers of the work it handed on; or why nothing was stored.
    outcome: Result<(Vec<IngestReport>, Vec<Vec<Answer>>), String>,
    woken: HashSet<String>,
    unstitched: Vec<(oneshot::Sender<Result<serde_json::Value, String>>, serde_json::Value)>,
    traces: Vec<(Vec<String>, Vec<serde_json::Value>)>,
    deleted: Vec<(DeletionReply, Vec<serde_json::Value>)>,
}

impl Answers {
    /// Answers every job; `synced` is whether the log holds the batch on disk.
    fn send(self, synced: Result<(), String>, shared: &Shared) {
        let outcome = synced.and(self.outcome);
        let (reports, handed_on) = match outcome {
            Ok(done) => done,
            Err(e) => {
                for (done, _) in self.unstitched {
                    let _ = done.send(Err(e.clone()));
                }
                for (done, _) in self.deleted {
                    let _ = done.send(Err(e.clone()));
                }
                for job in self.batch {
                    match job.work {
                        Work::Unstitch { done, .. } => {
                            let _ = done.send(Err(e.clone()));
                        }
                        Work::Delete { done, .. } => {
                            let _ = done.send(Err(e.clone()));
                        }
                        _ => {}
                    }
                    let _ = job.reply.send(Err(e.clone()));
                }
                return;
            }
        };
        for (done, result) in self.unstitched {
            let _ = done.send(Ok(result));
        }
        // Traces first, so a trace reads queued before the delivery it caused.
        let tracer = &shared.telemetry.tracer;
        for (ids, steps) in self.traces {
            let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
            for step in steps {
                tracer.emit(&ids, step);
            }
            tracer.emit(&ids, serde_json::json!({ "step": "committed" }));
        }
        // Connectors are called only for actions whose cause is on disk.
        for action in &self.woken {
            shared.lanes.wake(action);
        }
        for (done, records) in self.deleted {
            let _ = done.send(Ok(records));
        }
        for ((job, report), handed_on) in self.batch.into_iter().zip(reports).zip(handed_on) {
            let _ = job.reply.send(Ok(Reply { report, handed_on }));
        }
    }
}

/// Syncs the log for the workers, in order, and sends each batch's answers once it is on disk.
/// One sync covers every batch appended before it, so under load the workers' batches share
/// syncs, and a worker applies its next batch while the last one is being synced.
fn run_syncer(shared: Shared, batches: std::sync::mpsc::Receiver<(Position, Answers)>) {
    while let Ok((upto, answers)) = batches.recv() {
        let syncing = std::time::Instant::now();
        let synced = shared.log.sync(upto).map_err(|e| {
            shared.telemetry.storage.failed(Written::EventLog, &e);
            format!("event log not synced: {e}")
        });
        shared.telemetry.metrics.log_sync_seconds.observe(syncing.elapsed().as_secs_f64());
        match &synced {
            Ok(()) => shared.lanes.durable.synced(upto),
            Err(e) => tracing::error!("{e}"),
        }
        answers.send(synced, &shared);
    }
}

/// The event log and how far its records are materialized.
#[derive(Clone)]
pub struct LogState {
    pub log: Arc<dyn EventLog>,
    materialized: Arc<Materialized>,
}

impl LogState {
    /// The position before which every record's state is committed to SQLite: once a
    /// checkpoint has made those commits durable, the log can forget what is before it.
    pub fn truncation_point(&self) -> Position {
        if self.materialized.replaying.load(Ordering::SeqCst) {
            return 0;
        }
        let end = self.log.next_position();
        self.materialized.inflight.iter().map(|p| p.load(Ordering::SeqCst)).fold(end, Position::min)
    }

    /// Records each partition's position the database held when a checkpoint, just done, made
    /// what it held durable.
    pub fn checkpointed(&self, positions: Vec<(Partition, Position)>) {
        *self.materialized.durable.lock().expect("durable positions") = positions;
    }

    /// Whether a deletion was committed since the last call: the log's open segment may hold
    /// the deleted person's events and should be sealed, so the next truncation removes it.
    pub fn take_deletion(&self) -> bool {
        self.materialized.deleted.swap(false, Ordering::SeqCst)
    }
}

/// Work sent to the partitions, not yet known to be durable.
pub struct Queued {
    pending: VecDeque<oneshot::Receiver<Result<Reply, String>>>,
}

impl Queued {
    /// Waits until the work, and everything it handed on to other partitions, is committed.
    pub async fn durable(mut self) -> Result<IngestReport, IngestError> {
        let mut total = IngestReport::default();
        while let Some(answer) = self.pending.pop_front() {
            let reply = answer.await.map_err(|_| IngestError::Closed)?.map_err(IngestError::Failed)?;
            total.accepted += reply.report.accepted;
            total.duplicates += reply.report.duplicates;
            total.position = total.position.max(reply.report.position);
            self.pending.extend(reply.handed_on);
        }
        Ok(total)
    }
}

/// The worker a profile's work goes to: the owner of its virtual partition.
pub fn worker_of(profile_id: &str, workers: usize) -> usize {
    starling_log::partition_of(profile_id) as usize % workers
}

/// Everything a worker needs.
#[derive(Clone)]
pub struct Shared {
    /// The configuration; each batch is applied with the model current when it starts.
    pub config: Arc<crate::live::Live>,
    pub plugins: Arc<PluginHost>,
    pub runtime: tokio::runtime::Handle,
    /// Delivery lanes, woken when their actions are queued.
    pub lanes: Arc<crate::delivery::Lanes>,
    pub clock: fn() -> i64,
    pub telemetry: Arc<Telemetry>,
    pub log: Arc<dyn EventLog>,
    /// The partitions this engine applies live and logs. A standby's owns none: it applies a
    /// log another node writes and appends nothing; work a record hands on (a merge, events
    /// whose profile moved) is applied as a start's replay applies it, without a record of its
    /// own. A node of a spread cluster owns some: records of the others are followed, merges
    /// they hand to an owned partition are applied live, and events for their profiles go
    /// `elsewhere`.
    pub owned: Arc<Owned>,
    pub elsewhere: Option<Arc<dyn Elsewhere>>,
}

/// Starts `n` workers on `database`, each reading through its own connection and all
/// committing through one. SQLite drops a connection's page cache whenever another connection
/// has committed, so one connection for every worker's commits keeps the B-tree pages they
/// write to warm (commits take turns on SQLite's one write lock anyway).
pub fn start(
    shared: Shared,
    n: usize,
    queue: usize,
    database: &std::path::Path,
) -> Result<(Ingest, Vec<std::thread::JoinHandle<()>>), StoreError> {
    let writer = starling_store::open_writer(database)?;
    let directory = Directory::load(&writer, database.to_path_buf())?;
    let stored: HashMap<Partition, Position> = starling_store::log_positions(&writer)?.into_iter().collect();
    // Positions the store recorded are never handed out again, even if the log lost its tail.
    if let Some(last) = stored.values().max() {
        shared.log.continue_after(*last);
    }
    let writer = Arc::new(Mutex::new(writer));
    // Nothing may be truncated until every worker has replayed its partitions.
    let materialized = Arc::new(Materialized {
        inflight: (0..n).map(|_| AtomicU64::new(0)).collect(),
        deleted: AtomicBool::new(false),
        replaying: AtomicBool::new(false),
        durable: Mutex::new(stored.iter().map(|(p, position)| (*p, *position)).collect()),
    });
    let (senders, receivers): (Vec<_>, Vec<_>) = (0..n).map(|_| mpsc::unbounded_channel()).unzip();
    // Workers hold weak handles to each other, so the queues close when the `Ingest` is dropped.
    let peers: Vec<_> = senders.iter().map(mpsc::UnboundedSender::downgrade).collect();
    let mut handles = Vec::with_capacity(n + 1);
    let (syncer, batches) = std::sync::mpsc::channel();
    let decided_again = Arc::new(Mutex::new(HashSet::new()));
    let redirected = Arc::new(Mutex::new(Vec::new()));
    for (index, rx) in receivers.into_iter().enumerate() {
        let worker = Worker {
            model: shared.config.model(),
            version: 0,
            shared: shared.clone(),
            index,
            partitions: n,
            peers: peers.clone(),
            replaying: None,
            decided_again: decided_again.clone(),
            redirected: redirected.clone(),
            directory: directory.clone(),
            writer: writer.clone(),
            cache: Cache::default(),
            pending: Pending::default(),
            stored: stored.clone(),
            recovering: false,
            failed: None,
            recover_again: None,
            last_prune_ms: 0,
            pruning: None,
            deletions: 0,
            materialized: materialized.clone(),
            syncer: syncer.clone(),
        };
        let conn = starling_store::open_reader(database)?;
        let handle = std::thread::Builder::new()
            .name(format!("starling-ingest-{index}"))
            .spawn(move || worker.run(conn, rx))
            .map_err(|e| StoreError::Corrupt { id: "worker".into(), message: e.to_string() })?;
        handles.push(handle);
    }
    // Joined after the workers: it ends once they have all stopped and their answers are sent.
    let syncing = shared.clone();
    drop(syncer);
    let handle = std::thread::Builder::new()
        .name("starling-log-sync".into())
        .spawn(move || run_syncer(syncing, batches))
        .map_err(|e| StoreError::Corrupt { id: "syncer".into(), message: e.to_string() })?;
    handles.push(handle);
    let room = (0..n).map(|_| Arc::new(Semaphore::new(queue))).collect();
    let log = shared.log.clone();
    let config = shared.config.clone();
    let owned = shared.owned.clone();
    let clock = shared.clock;
    let durable = shared.lanes.durable.clone();
    Ok((
        Ingest {
            partitions: senders,
            room,
            directory,
            log,
            materialized,
            stored,
            writer,
            config,
            owned,
            clock,
            durable,
            redirected,
        },
        handles,
    ))
}

struct Worker {
    /// The model the batch under way is applied with, and its version (records say it).
    model: Arc<Model>,
    version: i64,
    shared: Shared,
    index: usize,
    partitions: usize,
    peers: Vec<mpsc::WeakUnboundedSender<IngestJob>>,
    /// The record the batch under way applies again, if it does.
    replaying: Option<ReplayOf>,
    /// Spread, profiles whose merge into another partition's profile a worker decided while
    /// applying records again (see `Worker::note_decided_again`); shared, as the events that go
    /// to the survivor pass through its worker.
    decided_again: Arc<Mutex<HashSet<String>>>,
    /// Events a take redirects to the survivor of a merge it decided again, applied once the
    /// take is done (see `Ingest::take_over`).
    redirected: Arc<Mutex<Vec<Event>>>,
    directory: Directory,
    /// The connection every worker commits through.
    writer: Arc<Mutex<rusqlite::Connection>>,
    cache: Cache,
    /// What is applied and logged but not yet in SQLite.
    pending: Pending,
    /// The log position up to which each partition's state in SQLite includes the log.
    stored: HashMap<Partition, Position>,
    /// Applying this worker's log records again after a batch failed.
    recovering: bool,
    /// Why this worker takes no more work: its state could not be derived again.
    failed: Option<String>,
    /// A recovery that could not read what it needed (the log's servers electing a leader):
    /// whether it applied its own records only, and when it failed. Tried again with the next
    /// work after [`RECOVER_AGAIN_AFTER`]; meanwhile `failed` refuses work.
    recover_again: Option<(bool, std::time::Instant)>,
    last_prune_ms: i64,
    /// The id after which the pass through seen event ids under way continues.
    pruning: Option<String>,
    /// Deletions made, to tell them apart in audit records.
    deletions: u64,
    materialized: Arc<Materialized>,
    /// Where answers go to wait for the log to reach the disk.
    syncer: std::sync::mpsc::Sender<(Position, Answers)>,
}

/// A write decided while applying events, performed at commit.
enum Write {
    /// `claim`: an id this profile's event named, not linked to any profile yet. Two
    /// partitions may claim one id at once: the claim earlier in the log wins, whichever is
    /// written first, as when the log is applied again; the other's profile merges into it.
    Link {
        visitor: String,
        profile: String,
        claim: Option<Claim>,
    },
    /// An event for the profile's history, applied at `now_ms`.
    Event {
        event: HistoryEvent,
        profile: String,
        now_ms: i64,
    },
    Join {
        profile: String,
        audience: String,
        at_ms: i64,
    },
    Leave {
        profile: String,
        audience: String,
    },
    /// `cause`: the log record the action's origin is made of; `partition`: that record's
    /// partition (the profile's until the record is known), whose owner delivers the action.
    Enqueue {
        action: PendingAction,
        due_ms: i64,
        condition: Option<&'static str>,
        cause: Cause,
        partition: Partition,
    },
    Fired {
        action: String,
        profile: String,
        at_ms: i64,
    },
    Identity(IdentityLink),
    /// `carried`: the absorbed profile's state came with the merge (what is held of it here is
    /// a copy, and goes).
    Merge {
        absorbed: String,
        survivor: String,
        carried: bool,
    },
    Split {
        id: String,
        from: String,
    },
    /// `id` is a value of the capped visitor-id attribute `attribute` (see `IdChange::Capped`).
    Capped {
        id: String,
        attribute: String,
    },
    /// Keep the adoption of a profile split out into another node's partition until that node
    /// adopts it (named after its record, once the record's position is known: `cause`).
    KeepAdoption {
        cause: Cause,
        adoption: Adoption,
    },
    /// [`Write::Split`] of an id whose profile is another node's: its events go from here.
    SplitAway {
        id: String,
        from: String,
    },
    /// A merge handed on from another partition's log record, applied in the partition.
    Handoff(String, Partition),
    /// Forget the ids of another node's profile, deleted there.
    Forget(String),
    /// Remove what is held of a profile merged into another node's (not its ids).
    DropCopy(String),
    /// Forget a merge kept until applied (see `handed_over`): another node applied it.
    Unkeep(String),
    /// Keep the history and memberships of a profile of another node's partition, merged into
    /// `survivor` (or split out for it).
    Adopt {
        survivor: String,
        events: Vec<Event>,
        memberships: Vec<(String, i64)>,
    },
    /// Remove the profile everywhere and leave an audit record (`detail` gains what was removed).
    Delete {
        profile: String,
        detail: serde_json::Value,
        now_ms: i64,
    },
}

/// A claim overtaken by one earlier in the log, written after it (see [`Write::Link`]): the
/// overtaken claim's profile merges into the winner's, as it does when the log is applied
/// again and the claims are written in log order. Not logged: applied again, the two claims'
/// records make it again.
#[derive(Debug, Clone)]
pub struct Overtaken {
    /// The overtaken claim, as it was recorded.
    claim: IdentityLink,
    /// The profile that holds the id now.
    winner: String,
    /// The overtaken claim's log record.
    position: Position,
}

/// A claim on an id (see [`Write::Link`]).
struct Claim {
    /// The job of the batch that made it, meaning something only while that batch is applied.
    job: usize,
    /// The log record that made it.
    cause: Cause,
    link: IdentityLink,
    /// Made by another node's record, followed: if it loses, that node merges its profile.
    followed: bool,
}

/// The name of a merge decided by the log record at `position`: what it merges, via which id,
/// so that it is named alike however it was decided (an id found linked, a claim that lost at
/// its write, a claim overtaken later), live or when the log is applied again; the survivor's
/// partition applies a merge of one name once.
/// The merge of the profile whose claim (made by the record at `position`) lost into the
/// `owner` of the id (see [`Overtaken`]).
fn lost_claim_merge(
    directory: &Directory,
    claim: &IdentityLink,
    owner: &str,
    position: Option<Position>,
) -> Result<MergeRequest, StoreError> {
    let mut merge = MergeRequest {
        survivor: directory.profile_of(owner)?,
        absorbed: claim.profile_id.clone(),
        via: claim.visitor_id.clone(),
        attribute: claim.attribute.clone().unwrap_or_default(),
        event_id: claim.event_id.clone(),
        origin: None,
        absorbed_state: None,
        merged_first: None,
    };
    merge.origin = position.map(|position| merge_origin(position, &merge));
    Ok(merge)
}

fn merge_origin(position: Position, merge: &MergeRequest) -> String {
    let digest = Sha256::digest(format!("{}\u{1f}{}", merge.via, merge.absorbed).as_bytes());
    format!("{position}.{}", hex::encode(&digest[..8]))
}

/// The name of the adoption of the profile `id` split out by the record at `position`: kept
/// with the merges handed over (`handed_over`), applied once (`handoffs`).
fn split_origin(position: Position, id: &str) -> String {
    format!("{position}{}", split_suffix(id))
}

/// What every adoption of the profile split out for `id` is named with, after its position.
fn split_suffix(id: &str) -> String {
    format!(".split-{}", hex::encode(&Sha256::digest(id.as_bytes())[..8]))
}

fn is_split_origin(origin: &str) -> bool {
    origin.contains(".split-")
}

/// The log record that decided a write: a draft of the batch being applied, then, once the
/// batch is appended, that record's position (none for work that is not logged).
#[derive(Debug, Clone, Copy)]
enum Cause {
    Draft(usize),
    Record(Option<Position>),
}

impl Cause {
    fn position(self) -> Option<Position> {
        match self {
            Cause::Record(position) => position,
            Cause::Draft(_) => unreachable!("causes are resolved when their batch is appended"),
        }
    }
}

/// An event to keep in the profile's history: where it is in the batch being applied, then,
/// once the batch is appended, the event itself (the batch goes on to be answered).
enum HistoryEvent {
    InBatch { job: usize, event: usize },
    Taken(Event),
}

/// Where the audit records of a deletion request go.
type DeletionReply = oneshot::Sender<Result<Vec<serde_json::Value>, String>>;

/// Whether the directory moved an event's id to another profile, and by which records.
#[derive(Debug, Clone, Copy)]
enum Moved {
    No,
    /// By records at or before this position.
    Through(Position),
    /// By this worker's latest records (this batch's, or earlier ones not yet written).
    ByThisWorker,
}

/// What a worker has applied and logged but not yet written to SQLite (the state its reads
/// must see on top of the store's), and what the batch being applied hands on once appended.
#[derive(Default)]
struct Pending {
    /// Profiles touched since the last materialization (out of the cache, which holds only
    /// what SQLite holds).
    touched: HashMap<String, (Profile, Loaded)>,
    /// Ids linked since the last materialization → profile.
    links: HashMap<String, String>,
    /// Event ids applied since the last materialization.
    seen: HashSet<String>,
    /// Merges handed on by other partitions applied since the last materialization.
    handoffs: HashSet<String>,
    /// The last log position of each partition the state includes.
    positions: HashMap<Partition, Position>,
    /// Events applied since the last materialization, and when its first batch was applied.
    events: usize,
    since: Option<std::time::Instant>,
    /// Where the writes of the batch being applied start in `effects.writes`.
    batch_start: usize,
    /// The batch must be materialized before it is answered.
    urgent: bool,
    /// Profiles absorbed in this batch → their survivor.
    moved: HashMap<String, String>,
    /// Profiles deleted in this batch (absorbed): not saved.
    gone: HashSet<String>,
    /// Profiles merged into another since the last materialization: SQLite still holds them
    /// until then, but they are gone, and a second merge of one must not add it twice.
    absorbed: HashSet<String>,
    effects: Effects,
    /// Directory changes to publish after the batch, or before SQLite holds them if sooner.
    directory: Vec<(String, String)>,
    /// Merges for other partitions, sent after commit, with the job (if it is in the batch
    /// being applied) and the log record that caused them.
    merges: Vec<(Option<usize>, Cause, MergeRequest)>,
    /// Events for profiles other partitions own, per job and partition.
    forwards: Vec<(usize, usize, Vec<Event>)>,
    /// Events for profiles of partitions another node owns, per job, with the partition and
    /// whether the directory moved the event's id to another profile: handed on after the batch
    /// is logged.
    elsewhere: Vec<(usize, Partition, Moved, Event)>,
    /// Where the events of the batch's jobs came from, for those not from a client (see
    /// [`IngestJob::source`]): what they hand on goes with them.
    sources: HashMap<usize, Source>,
    /// Claims of other partitions' profiles that claims of this partition overtook, sent
    /// after they are written.
    overtaken: Vec<Overtaken>,
    /// Profiles whose merge into another partition's profile is sent after commit.
    leaving: HashSet<String>,
    /// Events a merge of a pair merged already carried beyond what the survivor holds, for the
    /// survivor (see [`Worker::merge`]).
    late: Vec<(String, Event)>,
    /// Merges that carried the absorbed profile's state while this node held a copy of it:
    /// (survivor, absorbed). The copy's events the state lacks go to the survivor (see
    /// [`Worker::merge`]).
    outgrown: Vec<(String, String)>,
    /// Unstitch results, sent after commit.
    unstitched: Vec<(oneshot::Sender<Result<serde_json::Value, String>>, serde_json::Value)>,
    /// Trace steps for traced visitors (the ids they are traced by), sent after commit.
    traces: Vec<(Vec<String>, Vec<serde_json::Value>)>,
    /// Audit records of deletions, sent after commit.
    deleted: Vec<(DeletionReply, Vec<serde_json::Value>)>,
    /// The log records this batch appends: (job, partition, what).
    drafts: Vec<(usize, Partition, Draft)>,
    /// What the batch's records changed of the ids, by draft.
    changes: Changes,
    /// Records applied again from the log (other nodes' records followed among them) are held
    /// here: written to SQLite before the next live batch (see [`Worker::process`]).
    replayed: bool,
}

impl Pending {
    /// Whether nothing is held that SQLite lacks.
    fn is_clean(&self) -> bool {
        self.since.is_none() && self.effects.writes.is_empty() && self.touched.is_empty()
    }

    /// Notes an item of `job` in its partition's record (`extend` adds it to the partition's
    /// last record of the batch, whichever job started it, if it is of the same kind; `fresh`
    /// starts one): a partition's records keep the order its items were applied in. Actions
    /// decided from now on take their origin from that record.
    fn draft(
        &mut self,
        job: usize,
        profile: &str,
        extend: impl FnOnce(&mut Draft) -> bool,
        fresh: impl FnOnce() -> Draft,
    ) {
        let partition = starling_log::partition_of(profile);
        let last = self.drafts.iter().rposition(|(_, vp, _)| *vp == partition);
        self.effects.record_index = match last {
            Some(i) if extend(&mut self.drafts[i].2) => i,
            _ => {
                self.drafts.push((job, partition, fresh()));
                self.drafts.len() - 1
            }
        };
    }
}

impl Worker {
    fn run(mut self, mut conn: rusqlite::Connection, mut jobs: mpsc::UnboundedReceiver<IngestJob>) {
        // An unstitch rebuilds profiles from their stored history, so it runs in a batch of its
        // own, after everything applied before it is written to SQLite.
        let mut carried: Option<IngestJob> = None;
        loop {
            let Some(first) = carried.take().or_else(|| self.next_job(&conn, &mut jobs)) else { break };
            let mut batch = vec![first];
            while batch.len() < MAX_JOBS_PER_BATCH && !batch[0].runs_alone() {
                match jobs.try_recv() {
                    Ok(job) if job.runs_alone() => {
                        carried = Some(job);
                        break;
                    }
                    Ok(job) => batch.push(job),
                    Err(_) => break,
                }
            }
            // A replayed record is applied at the time it was first applied, and alone.
            let (now, replayed) = match &batch[0].replay {
                Some(r) => (r.now_ms, Some((r.partition, r.position))),
                None => ((self.shared.clock)(), None),
            };
            self.replaying = batch[0].replay;
            self.process(&mut conn, batch, now, replayed);
            self.replaying = None;
            self.prune();
        }
        // Everything applied is in SQLite before the worker stops (the log has it anyway).
        self.materialize(&conn, &mut []);
    }

    /// Waits for the next job; meanwhile writes what is held in memory to SQLite once it is
    /// due, or, while little is held (a light load), once the queue has been empty for a moment:
    /// idle time is free, and a small write holds up the next job less than a large one. Under
    /// a heavy load the writes stay large, so that a page touched by many events is written once.
    fn next_job(
        &mut self,
        conn: &rusqlite::Connection,
        jobs: &mut mpsc::UnboundedReceiver<IngestJob>,
    ) -> Option<IngestJob> {
        loop {
            let Some(since) = self.pending.since else { return jobs.blocking_recv() };
            let due = (since + MATERIALIZE_EVERY).saturating_duration_since(std::time::Instant::now());
            let idle_write =
                self.pending.events <= IDLE_WRITE_EVENTS && !self.materialized.replaying.load(Ordering::SeqCst);
            let wait = match idle_write {
                true => due.min(IDLE_BEFORE_WRITING),
                false => due,
            };
            if !wait.is_zero()
                && let Ok(job) = self.shared.runtime.block_on(async { tokio::time::timeout(wait, jobs.recv()).await })
            {
                return job;
            }
            self.materialize(conn, &mut []);
        }
    }

    /// Applies a batch, hands on what belongs to other partitions, and leaves the answers to
    /// the syncer, which sends them once the log holds the batch on disk; meanwhile this worker
    /// goes on with the next batch. What the batch changed stays in memory until it is due to
    /// be written to SQLite (or must be at once). `replayed`: the batch is that log record
    /// again (on disk already).
    fn process(
        &mut self,
        conn: &mut rusqlite::Connection,
        mut batch: Vec<IngestJob>,
        now: i64,
        replayed: Option<(Partition, Position)>,
    ) {
        let (current, version) = self.shared.config.model_and_version();
        if !Arc::ptr_eq(&current, &self.model) {
            self.adopt(current);
        }
        self.version = version;
        if let Some((own_records_only, failed_at)) = self.recover_again
            && failed_at.elapsed() >= RECOVER_AGAIN_AFTER
        {
            self.recover_again = None;
            self.failed = None;
            self.recover(conn, own_records_only);
        }
        // Work that reads the store as committed sees everything applied before it. On a node
        // that follows other nodes' partitions, live work sees everything followed: a live
        // batch that fails is forgotten with all this worker holds in memory, and only this
        // node's own records are applied again (see `recover`), so what it followed must be in
        // SQLite already. What its own live batches applied may wait: the log holds it.
        if batch[0].reads_committed() || (replayed.is_none() && self.spread() && self.pending.replayed) {
            self.materialize(conn, &mut []);
        }
        let outcome = match self.refusal(batch[0].reads_committed()) {
            Some(refused) => {
                tracing::warn!(partition = self.index, "work refused: {refused}");
                Err(refused)
            }
            // A record this copy applied already (a read that visited it twice, or a batch
            // failed and applied again from the log) is not applied twice.
            None if !self.replaying.is_some_and(|r| r.handed)
                && replayed.is_some_and(|(partition, position)| position <= self.applied_through(partition)) =>
            {
                tracing::debug!(partition = self.index, position = replayed.map(|r| r.1), "record applied already");
                Ok((vec![IngestReport::default(); batch.len()], batch.iter().map(|_| Vec::new()).collect()))
            }
            None => self.apply_batch(conn, &mut batch, now, replayed),
        };
        let p = &mut self.pending;
        let mut answers = Answers {
            batch,
            outcome,
            woken: std::mem::take(&mut p.effects.woken),
            unstitched: std::mem::take(&mut p.unstitched),
            traces: std::mem::take(&mut p.traces),
            deleted: std::mem::take(&mut p.deleted),
        };
        match replayed {
            Some(_) => answers.send(Ok(()), &self.shared),
            // Everything appended so far, so that no answer (not even "duplicate") comes
            // before the records it depends on are on disk.
            None => {
                let upto = self.shared.log.next_position().saturating_sub(1);
                if self.spread()
                    && let Ok((reports, _)) = &mut answers.outcome
                {
                    reports.iter_mut().for_each(|report| report.position = Some(upto));
                }
                if let Err(unsent) = self.syncer.send((upto, answers)) {
                    unsent.0.1.send(Err("shutting down".into()), &self.shared);
                }
            }
        }
    }

    /// Whether this engine is a node whose partitions are spread over the nodes (owning some,
    /// all, or for a moment none of them): of the records other nodes write, it applies only
    /// what they changed of the ids.
    fn spread(&self) -> bool {
        self.shared.elsewhere.is_some()
    }

    /// The last position of `partition` this worker applied (written to SQLite or not).
    fn applied_through(&self, partition: Partition) -> Position {
        let stored = self.stored.get(&partition).copied().unwrap_or(0);
        self.pending.positions.get(&partition).map_or(stored, |pending| stored.max(*pending))
    }

    /// Applies a batch onto what is held in memory, writes it all to SQLite when that is due,
    /// and hands on what belongs to other partitions. Returns per job its report and the answers
    /// of the work it handed on.
    #[allow(clippy::type_complexity)]
    fn apply_batch(
        &mut self,
        conn: &mut rusqlite::Connection,
        batch: &mut [IngestJob],
        now: i64,
        replayed: Option<(Partition, Position)>,
    ) -> Result<(Vec<IngestReport>, Vec<Vec<Answer>>), String> {
        // On a node following others, a live batch after no followed record held in memory
        // starts from a state SQLite holds for the other nodes' partitions: if it fails, only
        // this node's own records are derived again (otherwise everything is).
        let own_records_only = replayed.is_none() && self.spread() && !self.pending.replayed;
        let mut p = std::mem::take(&mut self.pending);
        p.batch_start = p.effects.writes.len();
        p.urgent = false;
        let result = self.apply(conn, batch, &mut p, now, replayed).map_err(|e| {
            let to = if matches!(e, BatchError::Log(_)) { Written::EventLog } else { Written::Database };
            self.shared.telemetry.storage.failed(to, &e);
            e.to_string()
        });
        match result {
            Ok(reports) => {
                self.shared.telemetry.storage.succeeded(Written::EventLog);
                p.replayed |= replayed.is_some();
                self.pending = p;
                let mut handed_on: Vec<Vec<Answer>> = (0..batch.len()).map(|_| Vec::new()).collect();
                self.settle_batch();
                let due = self.pending.events >= MATERIALIZE_EVENTS
                    || self.pending.since.is_some_and(|since| since.elapsed() >= MATERIALIZE_EVERY);
                if self.pending.urgent || due || batch[0].reads_committed() || !self.write_early() {
                    self.materialize(conn, &mut handed_on);
                }
                self.hand_on(&mut handed_on);
                Ok((reports, handed_on))
            }
            Err(e) => {
                tracing::error!(partition = self.index, "event batch not applied: {e}");
                // What this worker held in memory may be half changed by the batch: it is
                // derived again from SQLite and the log.
                if self.recovering {
                    self.failed = Some(format!("the partition's state could not be derived again: {e}"));
                } else {
                    self.recover(conn, own_records_only);
                    self.send_again(batch, replayed);
                }
                Err(e)
            }
        }
    }

    /// Takes a new configuration between batches: what is held in memory is brought in line
    /// with it (the evolution rules of `starling_core::evolve`); the cache, which holds what
    /// SQLite holds, is emptied, and profiles read from SQLite are brought in line as they are.
    fn adopt(&mut self, model: Arc<Model>) {
        self.cache.profiles.clear();
        for (profile, _) in self.pending.touched.values_mut() {
            starling_core::evolve::conform(&model, profile);
        }
        self.model = model;
    }

    /// Why new work cannot be taken now: the partition's state is lost until a restart, or
    /// what is held in memory could not be written to SQLite for so long that it would grow
    /// without bound.
    fn refusal(&self, reads_committed: bool) -> Option<String> {
        if let Some(failed) = &self.failed {
            return Some(failed.clone());
        }
        let p = &self.pending;
        if reads_committed && p.since.is_some() {
            return Some("the database is not up to date with the event log; retry later".into());
        }
        (p.events >= 4 * MATERIALIZE_EVENTS)
            .then(|| format!("{} applied events could not be written to the database; retry later", p.events))
    }

    /// Writes what is held in memory to SQLite in one transaction with the log positions it
    /// includes, then settles the cache. Merges decided at commit (an id claimed concurrently)
    /// are sent to their partitions, answered to the jobs in `handed_on` they belong to. On
    /// failure everything stays in memory (the log holds it) and is tried again later.
    fn materialize(&mut self, conn: &rusqlite::Connection, handed_on: &mut [Vec<Answer>]) {
        let mut p = std::mem::take(&mut self.pending);
        if p.is_clean() {
            self.pending = p;
            if !self.recovering {
                self.materialized.inflight[self.index].store(u64::MAX, Ordering::SeqCst);
            }
            return;
        }
        let committing = std::time::Instant::now();
        match self.commit(&mut p) {
            Ok(lost_claims) => {
                self.shared.telemetry.storage.succeeded(Written::Database);
                self.shared.telemetry.metrics.commit_seconds.observe(committing.elapsed().as_secs_f64());
                for (claim, owner) in lost_claims {
                    if let Err(e) = self.lost_claim(conn, &mut p, claim, owner) {
                        tracing::error!(partition = self.index, "merging an id claimed concurrently: {e}");
                    }
                }
                self.settle_cache(&mut p);
                for (partition, position) in p.positions.iter() {
                    let stored = self.stored.entry(*partition).or_default();
                    *stored = (*stored).max(*position);
                }
                p.effects.writes.clear();
                p.effects.fired.clear();
                p.seen.clear();
                p.absorbed.clear();
                p.handoffs.clear();
                p.positions.clear();
                p.events = 0;
                p.since = None;
                p.batch_start = 0;
                p.replayed = false;
                if !self.recovering {
                    self.materialized.inflight[self.index].store(u64::MAX, Ordering::SeqCst);
                }
                self.pending = p;
                self.hand_on(handed_on);
                // What this commit linked is in SQLite now: memory need not hold it.
                if let Err(e) = self.directory.prune(directory::HELD_FOR) {
                    tracing::warn!(partition = self.index, "the directory of ids kept what SQLite holds: {e}");
                }
            }
            Err(e) => {
                self.shared.telemetry.storage.failed(Written::Database, &e);
                tracing::error!(
                    partition = self.index,
                    "applied state not written to the database, kept to try again: {e}"
                );
                // Tried again one interval from now; merges held until then are answered to nobody.
                p.since = Some(std::time::Instant::now());
                for (job, _, _) in &mut p.merges {
                    *job = None;
                }
                self.pending = p;
            }
        }
    }

    /// After a batch that could not be applied whole: forgets what is held in memory and
    /// applies again, from the log, what this worker's partitions logged after the positions
    /// SQLite holds (its records hand nothing on: a record that does is written to SQLite
    /// before its merge is sent). `own_records_only`: SQLite holds everything applied of the
    /// partitions other nodes own, whose later records are applied as they are followed, in
    /// log order with the other workers' (applied here, a merge among them would find the
    /// profile it absorbs without the other workers' records before it).
    fn recover(&mut self, conn: &mut rusqlite::Connection, own_records_only: bool) {
        self.pending = Pending::default();
        self.cache = Cache::default();
        // Nothing is truncated from the log until the records are applied again.
        let materialized = self.materialized.clone();
        let inflight = &materialized.inflight[self.index];
        inflight.store(0, Ordering::SeqCst);
        self.recovering = true;
        self.apply_own_records(conn, own_records_only);
        self.recovering = false;
        if self.failed.is_none() {
            self.materialize(conn, &mut []);
        }
    }

    fn apply_own_records(&mut self, conn: &mut rusqlite::Connection, owned_only: bool) {
        let stored: HashMap<Partition, Position> = match starling_store::log_positions(conn) {
            Ok(positions) => positions.into_iter().collect(),
            Err(e) => {
                self.failed = Some(format!("reading the stored log positions: {e}"));
                self.recover_again = Some((owned_only, std::time::Instant::now()));
                return;
            }
        };
        // What is held in memory was forgotten: SQLite's positions are what is applied.
        self.stored = stored.clone();
        let after: Vec<(Partition, Position)> = (0..starling_log::PARTITIONS)
            .filter(|vp| *vp as usize % self.partitions == self.index)
            .filter(|vp| !owned_only || self.shared.owned.applies(*vp))
            .map(|vp| (vp, stored.get(&vp).copied().unwrap_or(0)))
            .collect();
        let mut entries = Vec::new();
        if let Err(e) = self.shared.log.read(&after, &mut |entry| entries.push(entry)) {
            self.failed = Some(format!("reading the event log: {e}"));
            self.recover_again = Some((owned_only, std::time::Instant::now()));
            return;
        }
        let replayed = entries.len();
        for entry in entries {
            let (work, now_ms) = match Logged::decode(&entry.payload, entry.position) {
                Ok(Some(decoded)) => decoded,
                Ok(None) => continue,
                Err(e) => {
                    self.failed = Some(e);
                    return;
                }
            };
            let (reply, _) = oneshot::channel();
            let replay = ReplayOf { partition: entry.partition, position: entry.position, now_ms, handed: false };
            let job = IngestJob { work, reply, _room: None, replay: Some(replay), source: Source::Client };
            self.process(conn, vec![job], now_ms, Some((entry.partition, entry.position)));
        }
        tracing::info!(partition = self.index, records = replayed, "state derived again from the log");
    }

    /// Sends this worker again the merges and overtaken claims of a batch it could not apply:
    /// other workers handed them on once, and their clients' retries do not make them again
    /// (only the next start would). Queued behind what waits; one applied since is skipped by
    /// its origin.
    fn send_again(&self, batch: &[IngestJob], replayed: Option<(Partition, Position)>) {
        if replayed.is_some() || self.shared.owned.is_none() {
            return;
        }
        let owned = &self.shared.owned;
        for job in batch {
            let (to, work) = match &job.work {
                Work::Merge(merge) if owned.owns_profile(&merge.survivor) => (self.index, Work::Merge(merge.clone())),
                // The survivor's partition was taken by another node meanwhile, which never saw
                // this merge (this node applied it live, as the owner of both partitions): it is
                // handed on from the absorbed profile's partition, as a merge into another
                // node's profile is. (Of partitions this node owns neither of now, the absorbed
                // profile's next owner hands it on: kept in `handed_over`, restored with the
                // partition's snapshot, or decided again from its records.)
                Work::Merge(merge) if self.spread() && owned.owns_profile(&merge.absorbed) => {
                    (worker_of(&merge.absorbed, self.partitions), Work::Hand(vec![merge.clone()]))
                }
                Work::Overtaken(overtaken) if owned.owns_profile(&overtaken.claim.profile_id) => {
                    (self.index, Work::Overtaken(overtaken.clone()))
                }
                _ => continue,
            };
            if !self.send_to(to, work) {
                return;
            }
        }
    }

    /// Hands `merge` on from the absorbed profile's partition: its worker appends a hand record
    /// there, which the survivor's owner follows and applies.
    fn hand_from_absorbed(&self, merge: MergeRequest) {
        let to = worker_of(&merge.absorbed, self.partitions);
        if !self.send_to(to, Work::Hand(vec![merge])) {
            tracing::warn!(partition = to, "shutting down: a merge to hand on dropped");
        }
    }

    /// Queues `work` on worker `to` (this one included), answering nobody; false once it stopped.
    fn send_to(&self, to: usize, work: Work) -> bool {
        let Some(worker) = self.peers[to].upgrade() else { return false };
        let (reply, _) = oneshot::channel();
        worker.send(IngestJob { work, reply, _room: None, replay: None, source: Source::Client }).is_ok()
    }

    /// On a spread node, gives each merge into another partition's profile the absorbed
    /// profile's state (read from SQLite, written by now), so that the survivor's partition
    /// logs a merge that needs no other partition applied again (the partition may move to a
    /// node that holds no other). A merge for another node's partition is appended as a hand
    /// record in the absorbed profile's partition; the survivor's owner applies it when it
    /// follows the record. The merge stays in `handed_over` (sent again at start) until then.
    fn hand_to_other_nodes(&mut self) {
        if !self.spread()
            || self.pending.since.is_some()
            || self.materialized.replaying.load(Ordering::SeqCst)
            || self.pending.merges.is_empty()
        {
            return;
        }
        // A partition taken applies its records again: the merges they decide for this node's
        // partitions are sent live, with the state; those for another node's are handed on once
        // the partition is taken (see `Ingest::hand_kept`).
        let replaying = self.replaying.is_some();
        let owned = self.shared.owned.clone();
        let mut merges = std::mem::take(&mut self.pending.merges);
        let mut records = Vec::new();
        {
            let writer = self.writer.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            // The absorbed profile's state as this node holds it now: a state kept with the merge
            // earlier may lack what a partition taken since applied again; one this node no
            // longer holds is carried as kept.
            for (_, _, merge) in merges.iter_mut() {
                let state = (|| -> Result<Option<Absorbed>, StoreError> {
                    let Some(profile) = starling_store::load_profile(&writer, &merge.absorbed)? else {
                        return Ok(merge.absorbed_state.take().map(|state| *state));
                    };
                    let events = starling_store::profile_events(&writer, &merge.absorbed)?;
                    let memberships = starling_store::memberships_of(&writer, &merge.absorbed)?;
                    Ok(Some(Absorbed { profile, events, memberships }))
                })();
                match state {
                    Ok(state) => {
                        tracing::debug!(
                            absorbed = %merge.absorbed,
                            events = state.as_ref().map_or(0, |s| s.events.len()),
                            origin = ?merge.origin,
                            "a merge into another partition carries the absorbed profile's state"
                        );
                        merge.absorbed_state = state.map(Box::new)
                    }
                    Err(e) => tracing::error!(partition = self.index, "reading a profile merged into another: {e}"),
                }
                // Kept with its state: sent again (at a start, by a node taking the survivor's
                // partition), it needs no copy of the absorbed profile.
                if let Some(origin) = &merge.origin
                    && merge.absorbed_state.is_some()
                {
                    let request = serde_json::to_string(&*merge).expect("merges serialize");
                    if let Err(e) = starling_store::keep_handed_over(&writer, origin, &request) {
                        tracing::error!(partition = self.index, "keeping a merge with its state: {e}");
                    }
                }
            }
        }
        // Of a partition this node no longer owns, the next owner hands them on (they are kept
        // in `handed_over`, which it restores): appended here, they would wait for a lease.
        merges.retain(|(_, _, merge)| match owned.owns_profile(&merge.survivor) {
            true => true,
            false => {
                if owned.owns_profile(&merge.absorbed) && !replaying {
                    records.push((starling_log::partition_of(&merge.absorbed), hand_record(merge)));
                }
                false
            }
        });
        self.pending.merges = merges;
        let records: Vec<(Partition, &[u8])> = records.iter().map(|(p, r)| (*p, r.as_slice())).collect();
        if !records.is_empty()
            && let Err(e) = self.shared.log.append(&records)
        {
            tracing::error!(partition = self.index, "merges for another node's partitions not handed on: {e}");
        }
    }

    /// Points the directory at the profiles `changes` link ids to.
    fn publish(&self, changes: Vec<(String, String)>) {
        // The records that linked them are appended (or, followed, read) by now.
        let logged = self.shared.log.next_position().saturating_sub(1);
        self.directory.point(changes, logged);
    }

    /// Publishes directory changes, then sends merges (once written to SQLite) and forwarded
    /// events to the partitions that own their profiles; the answers to wait for go to the jobs
    /// of the batch being answered (`handed_on`, by job).
    fn hand_on(&mut self, handed_on: &mut [Vec<Answer>]) {
        self.hand_to_other_nodes();
        let changes = std::mem::take(&mut self.pending.directory);
        self.publish(changes);
        let pending = &mut self.pending;
        let logged = self.shared.log.next_position().saturating_sub(1);
        let merges = match pending.since {
            // Not yet written: the survivor's partition would read the absorbed profile stale.
            Some(_) => Vec::new(),
            // A start's replay sends no merge: the survivor's partition logged each merge it
            // applied, and applies it again at that record, in its place (what it decides
            // keeps its origin); the others are in `handed_over`, sent once the replay is done.
            None if self.materialized.replaying.load(Ordering::SeqCst) => {
                pending.merges.clear();
                Vec::new()
            }
            // Nor is a merge for a partition another node owns sent: that node applies it once
            // it follows the record that handed it on, and logs it; this node applies it at
            // that record (meanwhile it is in `handed_over`).
            None => {
                let owned = &self.shared.owned;
                pending.merges.drain(..).filter(|(_, _, m)| owned.owns_profile(&m.survivor)).collect()
            }
        };
        let merges = merges
            .into_iter()
            .map(|(job, _, m)| (job, worker_of(&m.survivor, self.partitions), Work::Merge(m), Source::Client));
        let sources = std::mem::take(&mut pending.sources);
        let source = |job: usize| sources.get(&job).copied().unwrap_or(Source::Client);
        let forwards =
            pending.forwards.drain(..).map(|(job, to, events)| (Some(job), to, Work::Events(events), source(job)));
        // A record applied again (alone in its batch) waits for the claims it overtook to be
        // given up: the records after it find the profiles as they were left (independent
        // records applied side by side claim an id in another order than first written).
        let overtaking = self.replaying.map(|_| 0);
        // On a spread node, a profile whose claim was overtaken is merged by the node owning
        // its partition: this one if it owns or takes it. Otherwise the merge is kept, and the
        // partition's next taker hands it on (see `Ingest::hand_kept`): the owner may be another
        // node (which follows the claim that overtook it, and names the merge alike), or none
        // for the moment (this node's lease lapsed).
        let spread = self.shared.elsewhere.is_some();
        let owned = self.shared.owned.clone();
        let (overtaken, kept): (Vec<Overtaken>, Vec<Overtaken>) =
            pending.overtaken.drain(..).partition(|o| !spread || owned.applies_profile(&o.claim.profile_id));
        let overtaken = overtaken
            .into_iter()
            .map(|o| (overtaking, worker_of(&o.claim.profile_id, self.partitions), Work::Overtaken(o), Source::Client));
        if !kept.is_empty() {
            let writer = self.writer.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            for o in &kept {
                let merge = match lost_claim_merge(&self.directory, &o.claim, &o.winner, Some(o.position)) {
                    Ok(merge) => merge,
                    Err(e) => {
                        tracing::error!(partition = self.index, "keeping the merge of a claim overtaken: {e}");
                        continue;
                    }
                };
                let (origin, request) = (merge.origin.clone().unwrap_or_default(), serde_json::to_string(&merge));
                if let Err(e) = starling_store::keep_handed_over(&writer, &origin, &request.expect("merges serialize"))
                {
                    tracing::error!(partition = self.index, "keeping the merge of a claim overtaken: {e}");
                }
            }
        }
        // Events a replayed record forwards are applied as part of it, at its time.
        let replay = self.replaying.map(|r| ReplayOf { handed: true, ..r });
        for (job, to, work, source) in merges.collect::<Vec<_>>().into_iter().chain(forwards).chain(overtaken) {
            let (reply, answer) = oneshot::channel();
            let replay = replay.filter(|_| matches!(work, Work::Events(_)));
            match self.peers[to].upgrade() {
                Some(peer) if peer.send(IngestJob { work, reply, _room: None, replay, source }).is_ok() => {
                    if let Some(waiting) = job.and_then(|j| handed_on.get_mut(j)) {
                        waiting.push(answer);
                    }
                }
                _ => tracing::warn!(partition = to, "shutting down: work for another partition dropped"),
            }
        }
        if !pending.elsewhere.is_empty()
            && let Some(elsewhere) = &self.shared.elsewhere
        {
            // An event whose id the directory moved to another profile is applied there after
            // the records that moved it (a merge in a record the receiving node may not have
            // followed yet): this batch's, or those the directory names; any other, at once
            // (its id names its own profile everywhere).
            let mut handed: Vec<(usize, Position, PartitionedEvents)> = Vec::new();
            for (job, partition, moved, event) in pending.elsewhere.drain(..) {
                let after = match moved {
                    Moved::No => 0,
                    Moved::Through(position) => position.clamp(1, logged),
                    Moved::ByThisWorker => logged,
                };
                match handed.iter_mut().find(|(j, a, _)| *j == job && *a == after) {
                    Some((_, _, events)) => events.push((partition, event)),
                    None => handed.push((job, after, vec![(partition, event)])),
                }
            }
            for (job, after, events) in handed {
                let (reply, answer) = oneshot::channel();
                // An event another node handed here goes on to a node again only if the
                // directory moved it (to a profile that node owns, as of the batch's records).
                let via = match source(job) {
                    Source::Client => Via::OwnerOrIntake,
                    Source::Redirected => Via::Redirected,
                    Source::Node if after > 0 => Via::OwnerOrIntake,
                    Source::Node => Via::Intake,
                    Source::Intake => Via::Owner,
                    // Handed on again, they could go back and forth between two nodes whose
                    // directories differ (one not yet past a merge the other decided): refused,
                    // they are tried again from the intake, or by the node that redirected
                    // them, once the directories agree.
                    Source::HandedIntake | Source::HandedRedirected => {
                        let (reply, answer) = oneshot::channel();
                        let again = match source(job) {
                            Source::HandedIntake => "the intake keeps them",
                            _ => "the node that redirected them sends them again",
                        };
                        let _ = reply.send(Err(format!(
                            "the events' ids belong to another node's profiles, as this node has them; {again}"
                        )));
                        if let Some(waiting) = handed_on.get_mut(job) {
                            waiting.push(answer);
                        }
                        continue;
                    }
                };
                let handing = elsewhere.hand(events, after, via);
                self.shared.runtime.spawn(async move {
                    let answered = handing.await.map(|handed| Reply {
                        report: IngestReport {
                            accepted: handed.accepted,
                            duplicates: handed.duplicates,
                            position: handed.position,
                        },
                        handed_on: Vec::new(),
                    });
                    let _ = reply.send(answered);
                });
                if let Some(waiting) = handed_on.get_mut(job) {
                    waiting.push(answer);
                }
            }
        }
    }

    fn prune(&mut self) {
        let now = (self.shared.clock)();
        if self.index != 0 {
            return;
        }
        if self.pruning.is_none() {
            if now - self.last_prune_ms < PRUNE_EVERY_MS {
                return;
            }
            self.last_prune_ms = now;
            self.pruning = Some(String::new());
        }
        let window_ms = self.model.server.dedup_window_hours as i64 * 3_600_000;
        let after = self.pruning.take().unwrap_or_default();
        let writer = self.writer.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        match starling_store::prune_seen_events(&writer, now - window_ms, &after, PRUNE_CHUNK) {
            Ok((forgotten, next)) => {
                if forgotten > 0 {
                    tracing::debug!("forgot {forgotten} event ids older than the dedup window");
                }
                self.pruning = next;
            }
            Err(e) => tracing::warn!("pruning event ids: {e}"),
        }
    }

    /// Applies a group of jobs in memory, then writes it in one transaction.
    fn apply(
        &mut self,
        conn: &mut rusqlite::Connection,
        batch: &mut [IngestJob],
        p: &mut Pending,
        now: i64,
        replayed: Option<(Partition, Position)>,
    ) -> Result<Vec<IngestReport>, BatchError> {
        let model = self.model.clone();
        let dedup_since = now - model.server.dedup_window_hours as i64 * 3_600_000;
        let (plugins, runtime) = (self.shared.plugins.clone(), self.shared.runtime.clone());
        let mut enrichers = WasmEnrichers::new(&plugins, &runtime);
        let telemetry = self.shared.telemetry.clone();
        let mut reports = Vec::with_capacity(batch.len());
        // The batch's records (by draft) whose events crossed to other workers' state.
        let mut crossed: HashSet<usize> = HashSet::new();

        for j in 0..batch.len() {
            let job = &mut batch[j];
            let source = job.source;
            let mut report = IngestReport::default();
            if job.source != Source::Client {
                p.sources.insert(j, job.source);
            }
            match &mut job.work {
                Work::Events(events) => {
                    for (e, event) in events.iter().enumerate() {
                        let named = self.profile_of(p, &event.visitor_id)?;
                        let pid = self.follow(p, &named);
                        // Spread, a record's events were applied to its partition's profiles. One
                        // whose id the directory now gives another partition's profile was applied
                        // to a profile of the record's partition that a merge since decided to move
                        // there: once that merge is applied (the ids say so), the hand record that
                        // moved the profile carried the event with it, and it is not applied
                        // twice; until then it goes to that profile, as it first did. A merge
                        // this worker decided again, at an earlier record applied again (its
                        // first run decided it later, or not at all), carried none of this
                        // record's events: they go to its survivor, when this node's, once the
                        // take is done, in a record of the survivor's partition (applied here
                        // as part of this record, they would be in no record of that partition,
                        // and a later take of it would lose them).
                        let pid = match replayed {
                            Some((partition, _)) if self.spread() && starling_log::partition_of(&pid) != partition => {
                                match starling_store::resolve_identity(conn, &event.visitor_id)? {
                                    // (Holding it, SQLite names the absorbed profile until the
                                    // survivor's worker writes the merge, then the survivor.)
                                    Some(holder)
                                        if self.shared.owned.owns_profile(&pid)
                                            && (self.was_decided_again(&holder)
                                                || self.was_decided_again(&event.visitor_id)) =>
                                    {
                                        self.redirected
                                            .lock()
                                            .unwrap_or_else(std::sync::PoisonError::into_inner)
                                            .push(event.clone());
                                        continue;
                                    }
                                    Some(holder) if starling_log::partition_of(&holder) == partition => holder,
                                    None if starling_log::partition_of(&event.visitor_id) == partition => {
                                        event.visitor_id.clone()
                                    }
                                    _ => continue,
                                }
                            }
                            _ => pid,
                        };
                        if replayed.is_none() && self.spread() && !self.shared.owned.owns_profile(&pid) {
                            // Applied here before its profile merged into another node's (which
                            // the merge carried it to): sent again, it is a duplicate.
                            if let Some(key) = event.dedup_key()
                                && !matches!(source, Source::Redirected | Source::HandedRedirected)
                                && (p.seen.contains(&key) || starling_store::event_seen(conn, &key, dedup_since)?)
                            {
                                report.duplicates += 1;
                                continue;
                            }
                            let id = &event.visitor_id;
                            let moved = if pid == *id {
                                Moved::No
                            } else if pid != named || p.links.contains_key(id) {
                                Moved::ByThisWorker
                            } else {
                                self.directory.stitched_through(id)?.map_or(Moved::ByThisWorker, Moved::Through)
                            };
                            p.elsewhere.push((j, starling_log::partition_of(&pid), moved, event.clone()));
                            continue;
                        }
                        let owner = worker_of(&pid, self.partitions);
                        if owner != self.index {
                            forward(p, j, owner, event.clone());
                            continue;
                        }
                        // A record holds no duplicate (its first application left them out): applied
                        // again, its events are not checked against the ids seen, which may hold
                        // them already (a partition taken again, restored to before them).
                        // One redirected by a take was seen already (here too, maybe, applied to
                        // the absorbed profile since the last write): it is a duplicate only if
                        // its profile holds it.
                        let duplicate = |key: String, p: &mut Pending| match source {
                            Source::Redirected | Source::HandedRedirected => {
                                p.seen.insert(key);
                                self.history_ids(conn, p, &pid)
                                    .map(|held| event.id.as_ref().is_some_and(|id| held.contains(id)))
                            }
                            _ => Ok(!p.seen.insert(key.clone())
                                || (replayed.is_none() && starling_store::event_seen(conn, &key, dedup_since)?)),
                        };
                        if let Some(key) = event.dedup_key()
                            && duplicate(key, p)?
                        {
                            report.duplicates += 1;
                            continue;
                        }
                        p.draft(
                            j,
                            &pid,
                            |d| match d {
                                Draft::Events(list) if list.len() < MAX_EVENTS_PER_RECORD => {
                                    list.push((j, e));
                                    true
                                }
                                _ => false,
                            },
                            || Draft::Events(vec![(j, e)]),
                        );
                        let (record, crossings) = (p.effects.record_index, Crossings::at(p));
                        self.link_own_id(conn, p, &event.visitor_id, &pid)?;
                        let profile = load(&model, &mut self.cache, conn, &mut p.touched, now, &pid)?;
                        let traced = telemetry.tracer.watches(&[&event.visitor_id, &pid]);
                        let before = traced.then(|| profile.to_json());
                        let started = std::time::Instant::now();
                        let outcome = apply_event(&model, profile, event, &mut enrichers);
                        telemetry.metrics.event_apply_seconds.observe(started.elapsed().as_secs_f64());
                        if let Some(before) = before {
                            let steps = trace_steps(&model, event, &before, profile, &outcome, now);
                            p.traces.push((vec![event.visitor_id.clone(), pid.clone()], steps));
                        }
                        for warning in &outcome.warnings {
                            tracing::warn!(visitor = %pseudonym(&event.visitor_id), event = %event.name, "{warning}");
                        }
                        if outcome.over_budget {
                            telemetry.metrics.profile_budget_refusals.inc();
                        }
                        for refusal in &outcome.refused_ids {
                            telemetry.metrics.count_id_refusal(*refusal);
                        }
                        p.effects.writes.push(Write::Event {
                            event: HistoryEvent::InBatch { job: j, event: e },
                            profile: pid.clone(),
                            now_ms: now,
                        });
                        p.effects.record(conn, &model, &pid, outcome, now)?;
                        self.check_ids(conn, p, &model, &pid, event, j, now)?;
                        if crossings.crossed_since(p) {
                            crossed.insert(record);
                        }
                        report.accepted += 1;
                    }
                }
                Work::Wakeups(ids) => {
                    // Written at once: the wake-up task reads the rescheduled times from SQLite.
                    p.urgent = true;
                    for profile_id in ids.iter() {
                        if p.moved.contains_key(profile_id)
                            || p.absorbed.contains(profile_id)
                            || worker_of(profile_id, self.partitions) != self.index
                        {
                            continue;
                        }
                        p.draft(
                            j,
                            profile_id,
                            |d| match d {
                                Draft::Wakeups(list) => {
                                    list.push(profile_id.clone());
                                    true
                                }
                                _ => false,
                            },
                            || Draft::Wakeups(vec![profile_id.clone()]),
                        );
                        let profile = load(&model, &mut self.cache, conn, &mut p.touched, now, profile_id)?;
                        if profile.wakeup_ms.is_some_and(|due| due <= now) {
                            let outcome = apply_time(&model, profile, now, &mut enrichers);
                            p.effects.record(conn, &model, profile_id, outcome, now)?;
                        }
                        // Rescheduled even when nothing was due, so a stale row cannot wake it again.
                        if let Some((_, loaded)) = p.touched.get_mut(profile_id) {
                            loaded.woken = true;
                        }
                        report.accepted += 1;
                    }
                }
                Work::Merge(request) => {
                    let request = request.clone();
                    // Sent while the survivor's partition was this node's, which it is no longer
                    // (its lease lapsed): it could not be logged. Its next owner never saw it, and
                    // this node's directory already sends the absorbed profile's events there: it
                    // is handed on from the absorbed profile's partition, as a merge into another
                    // node's profile is. (Kept, it is sent again when the absorbed profile's
                    // partition is taken, if this node does not own that either.)
                    if replayed.is_none() && self.spread() && !self.shared.owned.applies_profile(&request.survivor) {
                        if self.shared.owned.owns_profile(&request.absorbed) {
                            tracing::debug!(origin = ?request.origin, "a merge for a partition no longer owned is handed on");
                            self.hand_from_absorbed(request);
                        } else {
                            tracing::debug!(origin = ?request.origin, "a merge for a partition no longer owned is left kept");
                        }
                        reports.push(report);
                        continue;
                    }
                    let applied = match &request.origin {
                        Some(origin) => p.handoffs.contains(origin) || starling_store::handoff_applied(conn, origin)?,
                        None => false,
                    };
                    if !applied {
                        p.draft(j, &request.survivor, |_| false, || Draft::Merge(request.clone()));
                        let (origin, request_survivor) = (request.origin.clone(), request.survivor.clone());
                        // A merge that found nothing may find it when its origin is replayed.
                        if self.merge(conn, p, &model, request, j, now)?
                            && let Some(origin) = origin
                        {
                            p.handoffs.insert(origin.clone());
                            let partition = starling_log::partition_of(&request_survivor);
                            p.effects.writes.push(Write::Handoff(origin, partition));
                        }
                    } else if self.spread()
                        && let Some(state) = &request.absorbed_state
                    {
                        // Applied already, from another state of the absorbed profile (a node
                        // taking its partition handed it on again from there): what this state
                        // carries beyond the survivor's history goes to the survivor.
                        let survivor = self.follow(p, &self.directory.profile_of(&request.survivor)?);
                        if worker_of(&survivor, self.partitions) == self.index
                            && self.shared.owned.applies_profile(&survivor)
                        {
                            let held = self.history_ids(conn, p, &survivor)?;
                            let beyond: Vec<Event> = state
                                .events
                                .iter()
                                .filter(|e| e.id.as_ref().is_some_and(|id| !held.contains(id)))
                                .cloned()
                                .collect();
                            if !beyond.is_empty() {
                                p.draft(j, &survivor, |_| false, || Draft::Merge(request.clone()));
                                p.late.extend(beyond.into_iter().map(|e| (survivor.clone(), e)));
                            }
                        }
                    }
                }
                Work::Overtaken(overtaken) => {
                    let Overtaken { claim, winner, position } = overtaken.clone();
                    let merge = lost_claim_merge(&self.directory, &claim, &winner, Some(position))?;
                    p.merges.push((None, Cause::Record(Some(position)), merge));
                    self.lost_claim(conn, p, claim, winner)?;
                    p.urgent = true;
                }
                Work::Delete { ids, reason, inactive_before, done } => {
                    let (placeholder, _) = oneshot::channel();
                    let done = std::mem::replace(done, placeholder);
                    let mut records = Vec::new();
                    for id in ids.iter() {
                        p.draft(
                            j,
                            &self.directory.profile_of(id)?,
                            |d| match d {
                                Draft::Delete(list) => {
                                    list.push(id.clone());
                                    true
                                }
                                _ => false,
                            },
                            || Draft::Delete(vec![id.clone()]),
                        );
                        if let Some(record) = self.delete(conn, p, &model, id, reason, *inactive_before, now)? {
                            records.push(record);
                            report.accepted += 1;
                        }
                    }
                    p.deleted.push((done, records));
                }
                Work::Unstitch { id, from, done } => {
                    let (placeholder, _) = oneshot::channel();
                    let done = std::mem::replace(done, placeholder);
                    let profile = match from {
                        Some(from) => from.clone(),
                        None => self.directory.profile_of(id)?,
                    };
                    p.draft(j, &profile, |_| false, || Draft::Unstitch(id.clone()));
                    match self.unstitch(conn, p, &model, id, from.as_deref(), &mut enrichers, now)? {
                        Ok(result) => p.unstitched.push((done, result)),
                        Err(refusal) => {
                            let _ = done.send(Err(refusal));
                        }
                    }
                }
                Work::Adopt(adoption) => {
                    let applied = p.handoffs.contains(&adoption.origin)
                        || starling_store::handoff_applied(conn, &adoption.origin)?;
                    // A partition given up since is its next owner's to adopt into (kept).
                    if !applied && self.shared.owned.applies_profile(&adoption.id) {
                        p.draft(j, &adoption.id, |_| false, || Draft::Adopt(adoption.clone()));
                        self.adopt_split(conn, p, &model, adoption, &mut enrichers, now)?;
                        report.accepted += 1;
                    }
                }
                Work::HandedAway { absorbed, origin } => {
                    // Once the survivor's node applied the merge (this node no longer keeps
                    // it), the absorbed profile's rows go, as they went from the node that
                    // handed it; until then they stay, the state it is handed on again with.
                    let applied = match origin {
                        Some(origin) => !starling_store::is_handed_over(conn, origin)?,
                        None => false,
                    };
                    if applied && !p.gone.contains(absorbed) {
                        p.touched.remove(absorbed);
                        self.cache.profiles.remove(absorbed);
                        p.effects.writes.push(Write::DropCopy(absorbed.clone()));
                        p.gone.insert(absorbed.clone());
                    }
                }
                Work::Follow(carried) => {
                    // Written at once: a followed claim is settled at its write.
                    p.urgent = true;
                    let position = carried.position;
                    for change in std::mem::take(&mut carried.changes) {
                        self.follow_change(conn, p, change, position, j, now)?;
                    }
                }
                Work::Hand(merges) => {
                    p.urgent = true;
                    // From the hand record on, the absorbed profile's ids go to the survivor (an
                    // event applied here after its state is read would not go with it).
                    for merge in merges.iter() {
                        let mut ids: BTreeSet<String> =
                            starling_store::ids_of(conn, &merge.absorbed)?.into_iter().collect();
                        ids.extend(self.directory.stitched_into(&merge.absorbed));
                        ids.insert(merge.absorbed.clone());
                        p.leaving.insert(merge.absorbed.clone());
                        p.directory.extend(ids.into_iter().map(|id| (id, merge.survivor.clone())));
                    }
                    // The job waits for those merged here (see `Ingest::send_handed_over`).
                    p.merges.extend(std::mem::take(merges).into_iter().map(|m| (Some(j), Cause::Record(None), m)));
                }
                Work::Restore { partition, snapshot, position, done } => {
                    let (placeholder, _) = oneshot::channel();
                    let done = std::mem::replace(done, placeholder);
                    let restored = {
                        let mut writer = self.writer.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                        let is_of = |id: &str| starling_log::partition_of(id) == *partition;
                        starling_store::restore_partition(
                            &mut writer,
                            snapshot.as_deref(),
                            *partition,
                            *position,
                            &is_of,
                        )
                    };
                    if restored.is_ok() {
                        // What this worker knew of the partition is what the restored state says.
                        self.cache.profiles.retain(|id, _| starling_log::partition_of(id) != *partition);
                        if let Some(position) = position {
                            self.stored.insert(*partition, *position);
                        }
                    }
                    let _ = done.send(restored.map_err(|e| e.to_string()));
                }
                Work::Materialize => p.urgent = true,
                Work::Reconcile { ids, audiences, done } => {
                    // Written before it is answered: the backfill's progress counts it as done.
                    p.urgent = true;
                    p.effects.record_index = UNLOGGED;
                    let (placeholder, _) = oneshot::channel();
                    let done = std::mem::replace(done, placeholder);
                    let indexes: Vec<usize> =
                        audiences.iter().filter_map(|a| model.audiences.iter().position(|x| &x.name == a)).collect();
                    let mut result = Reconciled::default();
                    for id in ids.iter() {
                        if p.moved.contains_key(id)
                            || p.gone.contains(id)
                            || p.absorbed.contains(id)
                            || worker_of(id, self.partitions) != self.index
                        {
                            continue;
                        }
                        let mut conformed = starling_core::evolve::Conformed::default();
                        if !p.touched.contains_key(id) {
                            let stored = match self.cache.profiles.remove(id) {
                                Some(cached) => Some(cached),
                                None => starling_store::load_profile(conn, id)?,
                            };
                            // Deleted or stitched into another since the scan read it.
                            let Some(mut stored) = stored else { continue };
                            conformed = starling_core::evolve::conform(&model, &mut stored);
                            self.cache.profiles.insert(id.clone(), stored);
                        }
                        let profile = load(&model, &mut self.cache, conn, &mut p.touched, now, id)?;
                        let (_, outcome) = starling_core::evolve::backfill(&model, profile, &indexes, now);
                        result.examined += 1;
                        result.changed += u64::from(conformed.changed() || !outcome.changes.is_empty());
                        result.joined += outcome.joined().len() as u64;
                        result.left += outcome.left().len() as u64;
                        result.converted += conformed.converted as u64;
                        result.dropped += conformed.dropped.len() as u64;
                        result.removed += conformed.removed as u64;
                        result.fired += outcome.actions.len() as u64;
                        p.effects.record(conn, &model, id, outcome, now)?;
                    }
                    let _ = done.send(result);
                }
            }
            for (survivor, absorbed) in std::mem::take(&mut p.outgrown) {
                let held = self.history_ids(conn, p, &survivor)?;
                let beyond = copy_history(conn, p, batch, &absorbed)?
                    .into_iter()
                    .filter(|e| e.id.as_ref().is_some_and(|id| !held.contains(id)));
                p.late.extend(beyond.map(|e| (survivor.clone(), e)));
            }
            // Events a merge carried beyond what the survivor held (see `Worker::merge`), as
            // part of the work that merged.
            for (survivor, event) in std::mem::take(&mut p.late) {
                let profile = load(&model, &mut self.cache, conn, &mut p.touched, now, &survivor)?;
                let outcome = apply_event(&model, profile, &event, &mut enrichers);
                p.seen.extend(event.dedup_key());
                p.effects.writes.push(Write::Event {
                    event: HistoryEvent::Taken(event),
                    profile: survivor.clone(),
                    now_ms: now,
                });
                p.effects.record(conn, &model, &survivor, outcome, now)?;
            }
            reports.push(report);
        }

        // The log keeps everything from the first record whose state is not in SQLite.
        let inflight = &self.materialized.inflight[self.index];
        let handed = self.replaying.is_some_and(|r| r.handed);
        let positions: Vec<Position> = match replayed {
            Some((_, position)) => {
                if inflight.load(Ordering::SeqCst) == u64::MAX {
                    inflight.store(position, Ordering::SeqCst);
                }
                // Handed on by the record's worker, which holds the record's position and
                // names its actions.
                match handed {
                    true => Vec::new(),
                    false => vec![position; p.drafts.len()],
                }
            }
            // A standby logs nothing of its own; a spread node that owns nothing at the moment
            // (its leases lapsed) writes nothing it could not log.
            None if p.drafts.is_empty() || (self.shared.owned.is_none() && !self.spread()) => Vec::new(),
            None if let Some((_, partition, _)) =
                p.drafts.iter().find(|(_, vp, _)| !self.shared.owned.applies(*vp)) =>
            {
                return Err(BatchError::Log(starling_log::LogError::Remote(format!(
                    "partition {partition} is another node's: its records are that node's to write"
                ))));
            }
            None => {
                let plain = batch.iter().all(|job| matches!(job.work, Work::Events(_) | Work::Wakeups(_)));
                let payloads: Vec<Vec<u8>> = p
                    .drafts
                    .iter()
                    .enumerate()
                    .map(|(i, (job, _, draft))| {
                        let stamp = (self.version, plain && !crossed.contains(&i), p.changes.of(i));
                        encode(batch, *job, draft, now, stamp)
                    })
                    .collect();
                let records: Vec<(Partition, &[u8])> =
                    p.drafts.iter().zip(&payloads).map(|((_, vp, _), bytes)| (*vp, bytes.as_slice())).collect();
                if inflight.load(Ordering::SeqCst) == u64::MAX {
                    inflight.store(self.shared.log.next_position(), Ordering::SeqCst);
                }
                let appended = self.shared.log.append(&records)?;
                if let Some(first) = appended.iter().min() {
                    self.shared.lanes.durable.appended(*first);
                }
                self.shared.telemetry.metrics.log_bytes_appended.inc_by(payloads.iter().map(|b| b.len() as u64).sum());
                appended
            }
        };
        // The batch is in the log: what it decided now names its records, and owns its events.
        let mut events: Vec<Vec<Option<Event>>> = batch
            .iter_mut()
            .map(|job| match &mut job.work {
                Work::Events(list) => std::mem::take(list).into_iter().map(Some).collect(),
                _ => Vec::new(),
            })
            .collect();
        let resolve = |cause: &mut Cause| {
            if let Cause::Draft(i) = *cause {
                *cause = Cause::Record(positions.get(i).copied());
            }
        };
        // Events a replayed record handed here have no record of their own: the claims and
        // merges they decide are that record's (unplaced, a claim could not be overtaken, and a
        // merge for another node's partition would not be kept until applied). Not their
        // actions: the record's worker numbers its own under the record's position.
        let handed_by = self.replaying.filter(|r| r.handed).map(|r| r.position);
        let decided = |cause: &mut Cause| match handed_by {
            Some(position) if matches!(cause, Cause::Draft(_)) => *cause = Cause::Record(Some(position)),
            _ => resolve(cause),
        };
        for write in &mut p.effects.writes[p.batch_start..] {
            match write {
                Write::Event { event, .. } => {
                    if let HistoryEvent::InBatch { job, event: e } = *event {
                        *event = HistoryEvent::Taken(events[job][e].take().expect("each event is kept once"));
                    }
                }
                Write::Enqueue { cause, partition, .. } => {
                    if let Cause::Draft(i) = *cause {
                        *partition = match replayed {
                            Some((record, _)) => record,
                            None => p.drafts.get(i).map_or(*partition, |(_, vp, _)| *vp),
                        };
                    }
                    resolve(cause)
                }
                Write::Link { claim: Some(claim), .. } => decided(&mut claim.cause),
                Write::KeepAdoption { cause, adoption } => {
                    resolve(cause);
                    if let Some(position) = cause.position() {
                        adoption.origin = split_origin(position, &adoption.id);
                    }
                }
                _ => {}
            }
        }
        // The merges this batch decided are named after the record that caused them, so a
        // replay of it hands on nothing twice (those named already keep their names).
        for (_, cause, merge) in p.merges.iter_mut().filter(|(_, cause, _)| matches!(cause, Cause::Draft(_))) {
            decided(cause);
            merge.origin = cause.position().map(|position| merge_origin(position, merge));
        }
        for ((_, partition, _), position) in p.drafts.iter().zip(&positions) {
            p.positions.insert(*partition, *position);
        }
        if let Some((partition, position)) = replayed.filter(|_| !handed) {
            p.positions.insert(partition, position);
        }
        p.drafts.clear();
        p.changes.clear();
        p.events += reports.iter().map(|r| r.accepted).sum::<usize>();
        // A merge alone (an overtaken claim's) is written too: one for another node's
        // partition is only kept, in `handed_over`, until that node applies it.
        let changed = !p.effects.writes.is_empty() || !p.touched.is_empty() || !p.positions.is_empty();
        if p.since.is_none() && (changed || !p.merges.is_empty()) {
            p.since = Some(std::time::Instant::now());
        }
        // A merge for another partition needs the absorbed profile in SQLite; a delayed action
        // checks memberships in SQLite when it comes due.
        p.urgent |= !p.merges.is_empty()
            || p.effects.writes[p.batch_start..].iter().any(|w| matches!(w, Write::Enqueue { condition: Some(_), .. }));
        Ok(reports)
    }

    /// Writes what is held in memory, with the log positions it includes, in one transaction.
    /// Returns the claims on ids another partition linked first, with the job of the batch
    /// being applied each came from, if it did.
    fn commit(&mut self, p: &mut Pending) -> Result<Vec<(IdentityLink, String)>, StoreError> {
        let history = self.model.history;
        let mut writer = self.writer.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let tx = Batch::begin(&mut writer)?;
        let mut actions_per_position = HashMap::new();
        let mut deleted = false;
        let mut lost_claims = Vec::new();
        let mut handed_over = Vec::new();
        let mut overtook = Vec::new();
        for (index, write) in p.effects.writes.iter().enumerate() {
            match write {
                Write::Link { visitor, profile, claim: None } => {
                    let linked = starling_store::survivor_of(tx.connection(), profile)?;
                    if tx.link_identity(visitor, &linked)? && linked != *profile {
                        p.directory.push((visitor.clone(), linked));
                    }
                }
                Write::Link { visitor, profile, claim: Some(claim) } if claim.followed => {
                    // A followed claim that lost, lost on its own node too, which merges its
                    // profile; one that overtook a claim of this node's makes that profile merge.
                    match write_claim(&tx, visitor, profile, claim)? {
                        ClaimWritten::Lost(_) => {}
                        ClaimWritten::Done { linked } => p.directory.push((visitor.clone(), linked)),
                        ClaimWritten::Overtook(overtaken) => {
                            p.directory.push((visitor.clone(), overtaken.winner.clone()));
                            overtook.push(overtaken);
                        }
                    }
                }
                Write::Link { visitor, profile, claim: Some(claim) } => {
                    match write_claim(&tx, visitor, profile, claim)? {
                        ClaimWritten::Done { linked } => {
                            if linked != *profile {
                                p.directory.push((visitor.clone(), linked));
                            }
                        }
                        ClaimWritten::Lost(owner) => {
                            // Merged into the owner's profile, as if the link had been seen
                            // before the claim.
                            let merge = lost_claim_merge(&self.directory, &claim.link, &owner, claim.cause.position())?;
                            let job = (index >= p.batch_start).then_some(claim.job);
                            handed_over.push((job, claim.cause, merge));
                            lost_claims.push((claim.link.clone(), owner));
                        }
                        ClaimWritten::Overtook(overtaken) => {
                            if overtaken.winner != *profile {
                                p.directory.push((visitor.clone(), overtaken.winner.clone()));
                            }
                            overtook.push(overtaken);
                        }
                    }
                }
                Write::Event { event: HistoryEvent::Taken(event), profile, now_ms } => {
                    tx.log_event(event, profile, *now_ms)?
                }
                Write::Event { event: HistoryEvent::InBatch { .. }, .. } => {
                    unreachable!("events are taken when their batch is appended")
                }
                Write::Join { profile, audience, at_ms } => tx.join(profile, audience, *at_ms)?,
                Write::Leave { profile, audience } => tx.leave(profile, audience)?,
                Write::Enqueue { .. } => enqueue(&tx, write, &mut actions_per_position)?,
                Write::Fired { action, profile, at_ms } => tx.mark_fired(action, profile, *at_ms)?,
                Write::Identity(link) => tx.record_identity(link)?,
                Write::Merge { absorbed, survivor, carried } => {
                    // Followed, the survivor may be merged away here already (by another
                    // worker, following its partition): the ids go where the survivor's went.
                    let survivor = match starling_store::survivor_of(tx.connection(), survivor)? {
                        now if now != *absorbed => now,
                        _ => survivor.clone(),
                    };
                    // Every id SQLite moves, pointed before it does (see `Directory::prune`):
                    // ids linked since the merge was decided move too.
                    let moved = starling_store::ids_of(tx.connection(), absorbed)?;
                    p.directory.extend(moved.into_iter().map(|id| (id, survivor.clone())));
                    match carried {
                        false => tx.merge_profiles(absorbed, &survivor)?,
                        true => tx.merge_carried(absorbed, &survivor)?,
                    }
                }
                Write::Split { id, from } => tx.split_identity(id, from)?,
                Write::SplitAway { id, from } => tx.split_identity_away(id, from)?,
                Write::Capped { id, attribute } => tx.mark_capped(id, attribute)?,
                Write::KeepAdoption { adoption, .. } if !adoption.origin.is_empty() => {
                    tx.hand_over(&adoption.origin, &serde_json::to_string(adoption).expect("adoptions serialize"))?
                }
                Write::KeepAdoption { .. } => {}
                Write::Handoff(origin, partition) => tx.record_handoff(origin, *partition)?,
                Write::Forget(profile) => {
                    point_ids_at_themselves(&tx, profile, &mut p.directory)?;
                    tx.forget_ids(profile)?;
                }
                Write::Unkeep(origin) => tx.unkeep(origin)?,
                Write::DropCopy(profile) => tx.drop_copy(profile)?,
                Write::Adopt { survivor, events, memberships } => {
                    for event in events {
                        tx.log_event(event, survivor, event.timestamp_ms)?;
                    }
                    for (audience, joined_ms) in memberships {
                        tx.join(survivor, audience, *joined_ms)?;
                    }
                }
                Write::Delete { profile, detail, now_ms } => {
                    deleted = true;
                    point_ids_at_themselves(&tx, profile, &mut p.directory)?;
                    let removed = tx.delete_profile(profile)?;
                    let mut detail = detail.clone();
                    detail["removed"] = serde_json::json!(removed);
                    tx.audit(*now_ms, "profile_deleted", &detail)?;
                    if let Some(record) = p
                        .deleted
                        .iter_mut()
                        .flat_map(|(_, r)| r.iter_mut())
                        .find(|r| r["deletion"] == detail["deletion"])
                    {
                        *record = detail;
                    }
                }
            }
        }
        let mut rescheduled = Vec::new();
        for (id, (profile, loaded)) in p.touched.iter() {
            let change = loaded.reschedule(profile);
            if change != Reschedule::Keep {
                let due = if let Reschedule::At(due) = change { Some(due) } else { None };
                tx.set_wakeup(id, due)?;
                rescheduled.push((id.clone(), due));
            }
            let index = last_seen_step(profile.last_seen_ms);
            tx.save_profile(profile, loaded.now_ms, (loaded.last_seen_step != Some(index)).then_some(index))?;
            // The history is trimmed each time a profile's count passes a step beyond the cap.
            let (cap, step) = (history.events_per_profile as u64, HISTORY_TRIM_STEP);
            if profile.event_count > cap && profile.event_count / step != loaded.event_count / step {
                tx.trim_history(id, history.events_per_profile)?;
            }
        }
        // Merges for other partitions are kept until applied, so that one lost with a crash
        // after this commit is sent again at start.
        for (_, _, merge) in p.merges.iter().chain(&handed_over) {
            if let Some(origin) = &merge.origin {
                tx.hand_over(origin, &serde_json::to_string(merge).expect("merges serialize"))?;
            }
        }
        for (partition, position) in &p.positions {
            tx.set_log_position(*partition, *position)?;
        }
        // Published before SQLite holds them (see `Directory::prune`).
        self.publish(std::mem::take(&mut p.directory));
        tx.commit()?;
        p.merges.extend(handed_over);
        p.overtaken.extend(overtook);
        for (id, due) in rescheduled {
            if let Some((profile, _)) = p.touched.get_mut(&id) {
                profile.scheduled_wakeup_ms = due;
            }
        }
        if deleted {
            self.materialized.deleted.store(true, Ordering::SeqCst);
        }
        Ok(lost_claims)
    }

    /// Writes the batch's actions and ids linked at once, in a transaction of their own.
    /// Returns whether that was enough: when another partition claimed one of the ids first, or
    /// the write failed, everything must be written (and the claim settled) instead.
    fn write_early(&mut self) -> bool {
        let mut writes = std::mem::take(&mut self.pending.effects.writes);
        let start = self.pending.batch_start;
        // In the order they were decided: an action's key is its rank among its record's.
        let early: Vec<usize> = (start..writes.len()).filter(|i| written_early(&writes[*i])).collect();
        if early.is_empty() {
            self.pending.effects.writes = writes;
            return true;
        }
        let writing = std::time::Instant::now();
        // Published before SQLite holds them (see `Directory::prune`).
        let changes = std::mem::take(&mut self.pending.directory);
        self.publish(changes);
        let written = {
            let mut writer = self.writer.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            write_early_in(&mut writer, early.iter().map(|i| &writes[*i]))
        };
        self.shared.telemetry.metrics.early_write_seconds.observe(writing.elapsed().as_secs_f64());
        let done = match written {
            Ok(Some(overtook)) => {
                self.pending.overtaken.extend(overtook);
                true
            }
            Ok(None) => false,
            Err(e) => {
                tracing::warn!(partition = self.index, "actions and claims not written at once: {e}");
                false
            }
        };
        if done {
            let mut index = 0;
            writes.retain(|_| {
                index += 1;
                early.binary_search(&(index - 1)).is_err()
            });
        }
        self.pending.effects.writes = writes;
        done
    }

    /// After a commit, keeps the profiles it wrote in the cache.
    fn settle_cache(&mut self, p: &mut Pending) {
        if self.cache.profiles.len() + p.touched.len() > PROFILE_CACHE_LIMIT {
            self.cache = Cache::default();
        }
        self.cache.identities.extend(p.links.drain());
        for id in &p.leaving {
            self.cache.profiles.remove(id);
        }
        // Only profiles this partition owns are cached: a profile split out for another
        // partition (unstitch) or handed over (merge) is read from the store by its owner.
        let (leaving, index, partitions) = (&p.leaving, self.index, self.partitions);
        self.cache.profiles.extend(
            p.touched
                .drain()
                .filter(|(id, _)| !leaving.contains(id) && worker_of(id, partitions) == index)
                .map(|(id, (profile, _))| (id, profile)),
        );
        p.leaving.clear();
    }

    /// After a batch: forgets what it made stale in the cache. Every id of a merged or deleted
    /// profile was repointed in the directory: forgetting those ids is enough, without scanning
    /// the whole cache.
    fn settle_batch(&mut self) {
        let p = &mut self.pending;
        if !p.gone.is_empty() {
            for (id, _) in &p.directory {
                self.cache.identities.remove(id);
            }
        }
        for id in &p.gone {
            self.cache.profiles.remove(id);
        }
        p.gone.clear();
        p.moved.clear();
    }

    /// Another partition linked the id this batch's profile claimed, first: the profile is
    /// merged into that one, as if the link had been seen before the claim.
    fn lost_claim(
        &mut self,
        conn: &rusqlite::Connection,
        p: &mut Pending,
        claim: IdentityLink,
        owner: String,
    ) -> Result<(), StoreError> {
        let (id, absorbed) = (claim.visitor_id, claim.profile_id);
        p.links.remove(&id);
        p.directory.retain(|(d, _)| *d != id);
        self.cache.identities.insert(id.clone(), owner.clone());
        let survivor = self.directory.profile_of(&owner)?;
        let mut ids = starling_store::ids_of(conn, &absorbed)?;
        ids.push(absorbed.clone());
        // The claim may have been published already.
        ids.push(id.clone());
        self.note_decided_again(&absorbed);
        p.leaving.insert(absorbed.clone());
        p.directory.extend(ids.into_iter().map(|i| (i, survivor.clone())));
        tracing::debug!(id = %id, profile = %absorbed, owner = %survivor, "id claimed concurrently; merging");
        Ok(())
    }

    /// Notes a merge of `absorbed` into another partition's profile decided while applying a
    /// record again: the records after it that its first run applied to `absorbed` (deciding
    /// the merge later, or not at all) hold events the merge did not carry. Held until the
    /// engine stops, a few per partition taken; bounded all the same.
    fn note_decided_again(&self, absorbed: &str) {
        if self.replaying.is_some() && self.spread() {
            let mut decided = self.decided_again.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            if decided.len() >= DECIDED_AGAIN_LIMIT {
                decided.clear();
            }
            decided.insert(absorbed.to_string());
        }
    }

    fn was_decided_again(&self, absorbed: &str) -> bool {
        self.decided_again.lock().unwrap_or_else(std::sync::PoisonError::into_inner).contains(absorbed)
    }

    /// The profile an id belongs to, as far as this batch knows.
    fn profile_of(&self, p: &Pending, id: &str) -> Result<String, StoreError> {
        match p.links.get(id) {
            Some(profile) => Ok(profile.clone()),
            None => self.directory.profile_of(id),
        }
    }

    /// Follows profiles absorbed in this batch to their survivor.
    fn follow(&self, p: &Pending, profile: &str) -> String {
        let mut current = profile.to_string();
        while let Some(next) = p.moved.get(&current) {
            current = next.clone();
        }
        current
    }

    /// Records the link of an id to the profile named after it, the first time it is seen.
    fn link_own_id(
        &mut self,
        conn: &rusqlite::Connection,
        p: &mut Pending,
        visitor: &str,
        profile: &str,
    ) -> Result<(), StoreError> {
        // An id stitched once that names its own profile again (split out, or its profile
        // deleted, by another worker or node) may be cached as linked before that: SQLite says.
        // Linked there to another profile, it is linked again: that profile's deletion is not
        // written yet (see `Batch::forget_ids` for one written after this).
        let once_stitched = visitor == profile && self.directory.maybe_stitched(visitor);
        let linked_elsewhere = |linked: &str| visitor == profile && linked != profile;
        if p.links.contains_key(visitor) || (!once_stitched && self.cache.identities.contains_key(visitor)) {
            return Ok(());
        }
        // Spread, an id routed to another profile (merged into it on another node, whose
        // merge this node has not applied yet) is linked by the node owning it, and moves with
        // the merge: linked here, it would say the merge was applied.
        if visitor != profile && self.spread() {
            return Ok(());
        }
        match starling_store::resolve_identity(conn, visitor)? {
            Some(pid) if !linked_elsewhere(&pid) => {
                self.cache.identities.insert(visitor.to_string(), pid);
            }
            _ => {
                self.cache.identities.remove(visitor);
                p.links.insert(visitor.to_string(), profile.to_string());
                p.effects.writes.push(Write::Link {
                    visitor: visitor.to_string(),
                    profile: profile.to_string(),
                    claim: None,
                });
                let linked = IdChange::Linked { id: visitor.to_string(), profile: profile.to_string(), claimed: false };
                p.changes.push(p.effects.record_index, linked);
            }
        }
        Ok(())
    }

    /// The log position of the claim that linked `id`, if it was made by a logged record.
    fn claimed_at(&self, conn: &rusqlite::Connection, p: &Pending, id: &str) -> Result<Option<Position>, StoreError> {
        if p.links.contains_key(id) {
            return Ok(p.effects.writes.iter().rev().find_map(|w| match w {
                Write::Link { visitor, claim: Some(claim), .. } if visitor == id => claim.cause.position(),
                _ => None,
            }));
        }
        starling_store::claimed_at(conn, id)
    }

    /// The profile an id is linked to, if any.
    fn owner_of(&self, conn: &rusqlite::Connection, p: &Pending, id: &str) -> Result<Option<String>, StoreError> {
        let owner = match p.links.get(id).or_else(|| self.cache.identities.get(id)) {
            Some(o) => Some(o.clone()),
            None => starling_store::resolve_identity(conn, id)?,
        };
        match owner {
            Some(owner) => Ok(Some(self.follow(p, &self.directory.profile_of(&owner)?))),
            None => Ok(None),
        }
    }

    /// How many ids are linked to a profile: those SQLite holds, and those linked or stitched
    /// since, by this worker (held in memory) or any (the directory).
    /// Why profile `pid` and profile `owner` may not be stitched (see `held_ids_conflict`).
    fn held_ids_conflict(
        &self,
        conn: &rusqlite::Connection,
        p: &Pending,
        model: &Model,
        pid: &str,
        owner: &str,
    ) -> Result<Option<String>, StoreError> {
        if model.attributes.iter().all(|a| a.max_per_profile.is_none()) {
            return Ok(None);
        }
        let Some((profile, _)) = p.touched.get(pid) else { return Ok(None) };
        // The owner may be another partition's: its stored state then, which lags by at most
        // the batch it is writing.
        let stored;
        let other = match p.touched.get(owner).map(|(o, _)| o).or_else(|| self.cache.profiles.get(owner)) {
            Some(o) => o,
            None => match starling_store::load_profile(conn, owner)? {
                Some(o) => {
                    stored = o;
                    &stored
                }
                // Another node's: the capped values linked to it, as its records said.
                None => {
                    let capped = starling_store::capped_ids_of(conn, owner)?;
                    return Ok(starling_core::stitch::held_values_conflict(model, profile, &capped));
                }
            },
        };
        Ok(starling_core::stitch::held_ids_conflict(model, profile, other))
    }

    fn id_count(&self, conn: &rusqlite::Connection, p: &Pending, profile: &str) -> Result<usize, StoreError> {
        let mut ids: HashSet<String> = starling_store::ids_of(conn, profile)?.into_iter().collect();
        ids.extend(p.links.iter().filter(|(_, owner)| *owner == profile).map(|(id, _)| id.clone()));
        ids.extend(p.directory.iter().filter(|(_, owner)| owner == profile).map(|(id, _)| id.clone()));
        ids.extend(self.directory.stitched_into(profile));
        Ok(ids.len())
    }

    /// Links the visitor ids an event left on the profile: a new id is linked to it; an id that
    /// another profile holds stitches the two, into the profile that held the id.
    #[allow(clippy::too_many_arguments)]
    fn check_ids(
        &mut self,
        conn: &rusqlite::Connection,
        p: &mut Pending,
        model: &Model,
        pid: &str,
        event: &Event,
        job: usize,
        now: i64,
    ) -> Result<(), StoreError> {
        if p.leaving.contains(pid) {
            return Ok(());
        }
        let ids = match p.touched.get(pid) {
            Some((profile, _)) => visitor_ids(model, profile),
            None => return Ok(()),
        };
        for (attribute, id) in ids {
            if id == pid
                || p.links.get(&id).is_some_and(|o| o == pid)
                || self.cache.identities.get(&id).is_some_and(|o| o == pid)
            {
                continue;
            }
            let record = |kind, other: Option<&str>, detail: Option<String>| {
                Write::Identity(IdentityLink {
                    profile_id: pid.to_string(),
                    visitor_id: id.clone(),
                    kind,
                    other_id: other.map(str::to_string),
                    attribute: Some(attribute.clone()),
                    event_id: event.id.clone(),
                    at_ms: now,
                    detail,
                })
            };
            if let Some(reason) = model.identity.refuses(&id) {
                if self.cache.refused.insert((id.clone(), pid.to_string())) {
                    tracing::warn!(profile = %pseudonym(pid), attribute = %attribute, "id not linked: {reason}");
                    p.effects.writes.push(record("refused", None, Some(reason)));
                }
                continue;
            }
            let mut owner = self.owner_of(conn, p, &id)?;
            // A record applied again whose claim is earlier in the log than the one that linked
            // the id here (a claim of another node's, or an independent record's applied side by
            // side) claims it: at its write it overtakes the later claim, as it did live.
            if let Some(replaying) = self.replaying
                && owner.is_some()
                && self.claimed_at(conn, p, &id)?.is_some_and(|claimed| claimed > replaying.position)
            {
                owner = None;
            }
            if owner.as_deref() == Some(pid) {
                self.cache.identities.insert(id, pid.to_string());
                continue;
            }
            // A profile split out of another is not stitched back to it by the same ids.
            if let Some(o) = &owner
                && (starling_store::was_unstitched(conn, pid, o)? || starling_store::was_unstitched(conn, o, pid)?)
            {
                continue;
            }
            if let Some(o) = &owner
                && let Some(reason) = self.held_ids_conflict(conn, p, model, pid, o)?
            {
                if self.cache.refused.insert((id.clone(), pid.to_string())) {
                    tracing::warn!(profile = %pseudonym(pid), attribute = %attribute, "not stitched: {reason}");
                    self.shared.telemetry.metrics.count_id_refusal(IdRefusal::MaxPerProfile);
                    p.effects.writes.push(record("refused", owner.as_deref(), Some(reason)));
                }
                continue;
            }
            let cap = model.identity.max_ids_per_profile;
            let total = self.id_count(conn, p, pid)? + owner.as_deref().map_or(Ok(1), |o| self.id_count(conn, p, o))?;
            if total > cap {
                let reason = match &owner {
                    Some(o) => format!(
                        "stitching with profile `{o}` would link {total} ids (identity.max_ids_per_profile = {cap})"
                    ),
                    None => format!("the profile would hold {total} ids (identity.max_ids_per_profile = {cap})"),
                };
                if self.cache.refused.insert((id.clone(), pid.to_string())) {
                    tracing::warn!(profile = %pseudonym(pid), id = %pseudonym(&id), "not stitched: {reason}");
                    p.effects.writes.push(record("refused", owner.as_deref(), Some(reason)));
                }
                continue;
            }
            match owner {
                None => {
                    p.links.insert(id.clone(), pid.to_string());
                    let claim = match record("link", None, None) {
                        Write::Identity(link) => {
                            Some(Claim { job, cause: Cause::Draft(p.effects.record_index), link, followed: false })
                        }
                        _ => unreachable!("record makes identity writes"),
                    };
                    p.effects.writes.push(Write::Link { visitor: id.clone(), profile: pid.to_string(), claim });
                    let linked = IdChange::Linked { id: id.clone(), profile: pid.to_string(), claimed: true };
                    p.changes.push(p.effects.record_index, linked);
                    if model.attribute(&attribute).is_some_and(|def| def.max_per_profile.is_some()) {
                        p.effects.writes.push(Write::Capped { id: id.clone(), attribute: attribute.clone() });
                        p.changes.push(p.effects.record_index, IdChange::Capped { id: id.clone(), attribute });
                    }
                    p.directory.push((id, pid.to_string()));
                }
                Some(survivor) => {
                    let request = MergeRequest {
                        survivor,
                        absorbed: pid.to_string(),
                        via: id,
                        attribute,
                        event_id: event.id.clone(),
                        origin: None,
                        absorbed_state: None,
                        merged_first: None,
                    };
                    self.merge(conn, p, model, request, job, now)?;
                    return Ok(());
                }
            }
        }
        Ok(())
    }

    /// Absorbs `request.absorbed` into `request.survivor` here if this partition owns the
    /// survivor; otherwise hands the merge to the partition that does, after commit.
    fn merge(
        &mut self,
        conn: &rusqlite::Connection,
        p: &mut Pending,
        model: &Model,
        request: MergeRequest,
        job: usize,
        now: i64,
    ) -> Result<bool, StoreError> {
        let survivor = self.follow(p, &self.directory.profile_of(&request.survivor)?);
        let absorbed = self.follow(p, &request.absorbed);
        if survivor == absorbed {
            return Ok(true);
        }
        let mut ids: BTreeSet<String> = starling_store::ids_of(conn, &absorbed)?.into_iter().collect();
        ids.extend(p.links.iter().filter(|(_, o)| **o == absorbed).map(|(id, _)| id.clone()));
        ids.extend(self.directory.stitched_into(&absorbed));
        ids.insert(absorbed.clone());
        // Spread, the survivor is this node's to merge into if it owns the survivor's partition
        // or is taking it.
        let ours = self.shared.owned.applies_profile(&survivor);
        if worker_of(&survivor, self.partitions) != self.index || (self.spread() && !ours) {
            // Spread, a record applied again decides no merge the stream holds already (its
            // hand record, kept here, or the survivor's record applying it): the partition
            // taken is replayed on ids ahead of its restored state, and a merge decided again
            // would read the absorbed profile as the replay left it.
            if let Some(replaying) = self.replaying
                && self.spread()
            {
                let origin = merge_origin(replaying.position, &MergeRequest { origin: None, ..request.clone() });
                if starling_store::handoff_applied(conn, &origin)?
                    || starling_store::is_handed_over(conn, &origin)?
                    || starling_store::was_merged_away(conn, &absorbed)?
                {
                    return Ok(true);
                }
            }
            // The survivor's partition merges, after this batch (holding the absorbed
            // profile's last state) commits; from then on its ids route there.
            self.note_decided_again(&absorbed);
            p.leaving.insert(absorbed.clone());
            p.directory.extend(ids.into_iter().map(|id| (id, survivor.clone())));
            let record = p.effects.record_index;
            p.merges.push((
                Some(job),
                Cause::Draft(record),
                MergeRequest { survivor, absorbed, origin: None, ..request },
            ));
            return Ok(true);
        }
        // Merged already by another request (an id claimed twice at once gives two), not yet
        // written: as once it is, there is nothing left to merge.
        let absorbed_profile = match p.absorbed.contains(&absorbed) {
            true => None,
            false => match p.touched.remove(&absorbed) {
                Some((profile, _)) => Some(profile),
                None => match self.cache.profiles.remove(&absorbed) {
                    Some(profile) => Some(profile),
                    None => starling_store::load_profile(conn, &absorbed)?,
                },
            },
        };
        // The absorbed profile of another node's partition comes with the merge, unless it was
        // merged already (two merges of one pair: a claim that lost, and a later event naming
        // the id), as the profiles merged away say (kept through a partition's restore; the
        // ids are no guide: they move to the survivor's when the hand record is followed).
        let merged_already = |p: &Pending| -> Result<bool, StoreError> {
            Ok(p.absorbed.contains(&absorbed) || starling_store::was_merged_away(conn, &absorbed)?)
        };
        let carried = match request.merged_first {
            Some(false) => None,
            None if merged_already(p)? => None,
            _ => request.absorbed_state.clone(),
        };
        // What the merge carried is what it moved the first time: it goes before a copy held
        // here (restored with a partition taken, its events since applied elsewhere). The
        // copy may hold events the state lacks all the same: applied live here between a take
        // of its partition and the merge kept for it, or by a record applied again after the
        // one that decided the merge. Those the survivor lacks go to it once this work is done.
        let absorbed_profile = match &carried {
            Some(state) => {
                if absorbed_profile.is_some() {
                    p.outgrown.push((survivor.clone(), absorbed.clone()));
                }
                Some(state.profile.clone())
            }
            None => absorbed_profile,
        };
        let Some(mut absorbed_profile) = absorbed_profile else {
            // Merged already (a merge of the same two from the other side, or sent again after
            // a restart): the absorbed profile's own id is the survivor's.
            if self.owner_of(conn, p, &absorbed)?.as_deref() == Some(survivor.as_str()) {
                tracing::debug!(absorbed = %pseudonym(&absorbed), survivor = %pseudonym(&survivor), "merged already");
                // The pair merged from an earlier state of the absorbed profile (a partition
                // taken applied its records again, deciding the merge a second time on a later
                // event): the events this state carries beyond it go to the survivor.
                if let Some(state) = &request.absorbed_state {
                    let held = self.history_ids(conn, p, &survivor)?;
                    let beyond = state.events.iter().filter(|e| e.id.as_ref().is_some_and(|id| !held.contains(id)));
                    p.late.extend(beyond.map(|e| (survivor.clone(), e.clone())));
                }
                return Ok(true);
            }
            tracing::warn!(absorbed = %pseudonym(&absorbed), survivor = %pseudonym(&survivor), "nothing to merge: profile not found");
            return Ok(false);
        };
        starling_core::evolve::conform(model, &mut absorbed_profile);
        let survivor_profile = load(model, &mut self.cache, conn, &mut p.touched, now, &survivor)?;
        let outcome = apply_merge(model, survivor_profile, absorbed_profile, now);
        tracing::debug!(
            survivor = %survivor,
            absorbed = %absorbed,
            via = %request.via,
            origin = ?request.origin,
            carried_events = ?carried.as_ref().map(|state| state.events.len()),
            "profiles stitched"
        );
        let was_carried = carried.is_some();
        if let Some(state) = carried {
            // Its events are seen here from now on: one sent again is a duplicate.
            p.seen.extend(state.events.iter().filter_map(Event::dedup_key));
            let Absorbed { events, memberships, .. } = *state;
            p.effects.writes.push(Write::Adopt { survivor: survivor.clone(), events, memberships });
        }
        p.effects.writes.push(Write::Merge {
            absorbed: absorbed.clone(),
            survivor: survivor.clone(),
            carried: was_carried,
        });
        let merged =
            IdChange::Merged { absorbed: absorbed.clone(), survivor: survivor.clone(), origin: request.origin.clone() };
        p.changes.push(p.effects.record_index, merged);
        p.effects.writes.push(Write::Identity(IdentityLink {
            profile_id: survivor.clone(),
            visitor_id: request.via.clone(),
            kind: "merge",
            other_id: Some(absorbed.clone()),
            attribute: Some(request.attribute.clone()),
            event_id: request.event_id.clone(),
            at_ms: now,
            detail: Some(format!("ids moved: {}", ids.iter().cloned().collect::<Vec<_>>().join(", "))),
        }));
        p.effects.record(conn, model, &survivor, outcome, now)?;
        // Until written, the ids moved are known here (finding an id's owner, the ids to move in
        // a later merge) and in the directory (counting a profile's ids, in any partition).
        for id in &ids {
            p.links.insert(id.clone(), survivor.clone());
        }
        p.directory.extend(ids.into_iter().map(|id| (id, survivor.clone())));
        p.moved.insert(absorbed.clone(), survivor);
        p.absorbed.insert(absorbed.clone());
        p.gone.insert(absorbed);
        Ok(true)
    }

    /// The ids of the events in `profile`'s history, stored or carried to it in this batch.
    fn history_ids(
        &self,
        conn: &rusqlite::Connection,
        p: &Pending,
        profile: &str,
    ) -> Result<HashSet<String>, StoreError> {
        let mut ids: HashSet<String> =
            starling_store::profile_events(conn, profile)?.into_iter().filter_map(|e| e.id).collect();
        for write in &p.effects.writes {
            match write {
                Write::Adopt { survivor, events, .. } if survivor == profile => {
                    ids.extend(events.iter().filter_map(|e| e.id.clone()))
                }
                Write::Event { event: HistoryEvent::Taken(event), profile: to, .. } if to == profile => {
                    ids.extend(event.id.clone())
                }
                _ => {}
            }
        }
        ids.extend(p.late.iter().filter(|(to, _)| to == profile).filter_map(|(_, e)| e.id.clone()));
        Ok(ids)
    }

    /// Applies a change another node's record made to the ids (see [`Carried`]): the profile
    /// an id belongs to moves as it did there; claims are settled at their write, by log order.
    fn follow_change(
        &mut self,
        conn: &rusqlite::Connection,
        p: &mut Pending,
        change: IdChange,
        position: Position,
        job: usize,
        now: i64,
    ) -> Result<(), StoreError> {
        let identity = |profile: &str, id: &str, kind, other: Option<String>| IdentityLink {
            profile_id: profile.to_string(),
            visitor_id: id.to_string(),
            kind,
            other_id: other,
            attribute: None,
            event_id: None,
            at_ms: now,
            detail: None,
        };
        match change {
            IdChange::Linked { id, profile, claimed: false } => {
                p.effects.writes.push(Write::Link { visitor: id, profile, claim: None });
            }
            IdChange::Linked { id, profile, claimed: true } => {
                let link = identity(&profile, &id, "link", None);
                let claim = Claim { job, cause: Cause::Record(Some(position)), link, followed: true };
                p.effects.writes.push(Write::Link { visitor: id, profile, claim: Some(claim) });
            }
            IdChange::Merged { absorbed, survivor, origin } => {
                // Applied by the survivor's owner: not to be sent again from here. (Not marked
                // applied here: this node's state holds none of it, and a node that takes the
                // survivor's partition later applies that record again.)
                if let Some(origin) = origin {
                    p.effects.writes.push(Write::Unkeep(origin));
                }
                let mut ids: BTreeSet<String> = starling_store::ids_of(conn, &absorbed)?.into_iter().collect();
                ids.extend(self.directory.stitched_into(&absorbed));
                ids.insert(absorbed.clone());
                // This node's profile, absorbed by the survivor's owner: its rows go.
                p.touched.remove(&absorbed);
                self.cache.profiles.remove(&absorbed);
                p.effects.writes.push(Write::Merge {
                    absorbed: absorbed.clone(),
                    survivor: survivor.clone(),
                    carried: true,
                });
                p.directory.extend(ids.into_iter().map(|id| (id, survivor.clone())));
                p.gone.insert(absorbed);
            }
            IdChange::Split { id, from, .. } => {
                p.effects.writes.push(Write::Split { id: id.clone(), from: from.clone() });
                p.effects.writes.push(Write::Identity(identity(&id, &id, "unstitched", Some(from))));
                p.directory.push((id.clone(), id));
            }
            IdChange::Capped { id, attribute } => p.effects.writes.push(Write::Capped { id, attribute }),
            // Adopted by the partition's owner: not to be adopted again from here.
            IdChange::Adopted { origin, .. } => p.effects.writes.push(Write::Unkeep(origin)),
            IdChange::Deleted { profile } => {
                let mut ids: BTreeSet<String> = starling_store::ids_of(conn, &profile)?.into_iter().collect();
                ids.extend(self.directory.stitched_into(&profile));
                p.effects.writes.push(Write::Forget(profile));
                p.directory.extend(ids.into_iter().map(|id| (id.clone(), id)));
            }
        }
        Ok(())
    }

    /// Deletes the profile `id` belongs to: `deleted` actions are queued with what they need
    /// from the profile, then everything about it is removed at commit. `None` when there is no
    /// such profile, or (retention) it has been active since `inactive_before`.
    #[allow(clippy::too_many_arguments)]
    fn delete(
        &mut self,
        conn: &rusqlite::Connection,
        p: &mut Pending,
        model: &Model,
        id: &str,
        reason: &str,
        inactive_before: Option<i64>,
        now: i64,
    ) -> Result<Option<serde_json::Value>, StoreError> {
        let pid = self.follow(p, &self.directory.profile_of(id)?);
        if worker_of(&pid, self.partitions) != self.index || p.gone.contains(&pid) {
            return Ok(None);
        }
        let stored = match p.touched.remove(&pid) {
            Some((profile, _)) => Some(profile),
            None => match self.cache.profiles.remove(&pid) {
                Some(profile) => Some(profile),
                None => starling_store::load_profile(conn, &pid)?,
            },
        };
        let Some(profile) = stored else { return Ok(None) };
        if inactive_before.is_some_and(|before| profile.last_seen_ms >= before) {
            self.cache.profiles.insert(pid, profile);
            return Ok(None);
        }
        let mut ids: BTreeSet<String> = starling_store::ids_of(conn, &pid)?.into_iter().collect();
        ids.insert(pid.clone());
        p.links.retain(|id, owner| {
            if *owner == pid {
                ids.insert(id.clone());
            }
            *owner != pid
        });
        let outcome = apply_delete(model, &profile, now);
        self.deletions += 1;
        // Identifies the deletion within this answer; the audit record carries no personal data.
        let deletion = format!("{}-{}-{}", self.index, now, self.deletions);
        let detail = serde_json::json!({
            "deletion": deletion,
            "reason": reason,
            "ids": ids.len(),
            "audiences": profile.audiences.len(),
            "actions_fired": outcome.actions.iter().map(|a| a.action.clone()).collect::<Vec<_>>(),
        });
        p.effects.writes.push(Write::Delete { profile: pid.clone(), detail: detail.clone(), now_ms: now });
        p.changes.push(p.effects.record_index, IdChange::Deleted { profile: pid.clone() });
        p.effects.record(conn, model, &pid, outcome, now)?;
        p.directory.extend(ids.iter().map(|id| (id.clone(), id.clone())));
        self.cache.identities.retain(|_, owner| *owner != pid);
        tracing::info!(reason, ids = ids.len(), "profile deleted");
        self.shared
            .telemetry
            .metrics
            .profiles_deleted
            .get_or_create(&crate::telemetry::ReasonLabel { reason: reason.to_string() })
            .inc();
        p.traces.push((
            ids.iter().cloned().collect(),
            vec![serde_json::json!({ "step": "deleted", "reason": reason, "actions_queued": detail["actions_fired"] })],
        ));
        p.gone.insert(pid);
        Ok(Some(detail))
    }

    /// Splits `id` out of its profile (`recorded`: the one its record split it out of, applied
    /// again): both are rebuilt from their logged events, and the resulting audience changes
    /// fire. `Ok(Err(..))` when there is nothing to split.
    #[allow(clippy::too_many_arguments)]
    fn unstitch(
        &mut self,
        conn: &rusqlite::Connection,
        p: &mut Pending,
        model: &Model,
        id: &str,
        recorded: Option<&str>,
        enrichers: &mut dyn CustomEnrichers,
        now: i64,
    ) -> Result<Result<serde_json::Value, String>, StoreError> {
        let from = match recorded {
            Some(from) => from.to_string(),
            None => self.follow(p, &self.directory.profile_of(id)?),
        };
        if from == id {
            return Ok(Err(match starling_store::resolve_identity(conn, id)? {
                None => format!("no profile has the id `{id}`"),
                Some(_) => format!("`{id}` is not stitched to another profile"),
            }));
        }
        if worker_of(&from, self.partitions) != self.index {
            return Ok(Err(format!("`{id}` moved while being unstitched; try again")));
        }
        let before = load(model, &mut self.cache, conn, &mut p.touched, now, &from)?.audiences.clone();
        let (split_events, kept_events): (Vec<Event>, Vec<Event>) =
            starling_store::profile_events(conn, &from)?.into_iter().partition(|e| e.visitor_id == id);
        let (kept, kept_outcome) = rebuild(model, &from, &kept_events, &before, enrichers, now);
        let (split, split_outcome) = rebuild(model, id, &split_events, &BTreeSet::new(), enrichers, now);
        let result = serde_json::json!({
            "id": id,
            "from": from,
            "events": { from.as_str(): kept_events.len(), id: split_events.len() },
            "profiles": [kept.to_json(), split.to_json()],
        });
        p.effects.record(conn, model, &from, kept_outcome, now)?;
        p.touched.get_mut(&from).expect("loaded above").0 = kept;
        // Spread, a profile split out into another node's partition is that node's: the events
        // that moved go to it with the record, and it adopts them (rebuilding the profile and
        // firing what it joins). Here the id moves and those events go.
        if self.spread() && !self.shared.owned.applies_profile(id) {
            p.effects.writes.push(Write::SplitAway { id: id.to_string(), from: from.clone() });
            // Kept here too, with the split: should the id's owner stop before it adopts them,
            // this node may be the one taking its partition (it does not follow its own).
            if self.replaying.is_none() {
                let adoption = Adoption {
                    id: id.to_string(),
                    from: from.clone(),
                    origin: String::new(),
                    events: split_events.clone(),
                };
                p.effects.writes.push(Write::KeepAdoption { cause: Cause::Draft(p.effects.record_index), adoption });
            }
            let change = IdChange::Split { id: id.to_string(), from: from.clone(), events: Some(split_events) };
            p.changes.push(p.effects.record_index, change);
        } else {
            p.effects.writes.push(Write::Split { id: id.to_string(), from: from.clone() });
            let change = IdChange::Split { id: id.to_string(), from: from.clone(), events: None };
            p.changes.push(p.effects.record_index, change);
            p.effects.writes.push(Write::Identity(IdentityLink {
                profile_id: id.to_string(),
                visitor_id: id.to_string(),
                kind: "unstitched",
                other_id: Some(from.clone()),
                attribute: None,
                event_id: None,
                at_ms: now,
                detail: Some(format!("{} event(s) moved", split_events.len())),
            }));
            p.effects.record(conn, model, id, split_outcome, now)?;
            p.touched.insert(id.to_string(), (split, Loaded { now_ms: now, ..Loaded::default() }));
        }
        p.directory.push((id.to_string(), id.to_string()));
        self.cache.identities.insert(id.to_string(), id.to_string());
        tracing::debug!(id = %id, from = %from, "id unstitched");
        Ok(Ok(result))
    }

    /// Adopts the profile another node split out into this partition (see [`Adoption`]): rebuilt
    /// from the events that moved with its id and any sent here since, its audience changes
    /// fire here, where its actions are delivered.
    fn adopt_split(
        &mut self,
        conn: &rusqlite::Connection,
        p: &mut Pending,
        model: &Model,
        adoption: &Adoption,
        enrichers: &mut dyn CustomEnrichers,
        now: i64,
    ) -> Result<(), StoreError> {
        let Adoption { id, origin, .. } = adoption;
        let before = load(model, &mut self.cache, conn, &mut p.touched, now, id)?.audiences.clone();
        let held = starling_store::profile_events(conn, id)?;
        let held_ids: HashSet<&String> = held.iter().filter_map(|e| e.id.as_ref()).collect();
        let carried: Vec<Event> = adoption
            .events
            .iter()
            .filter(|e| e.id.as_ref().is_none_or(|event_id| !held_ids.contains(event_id)))
            .cloned()
            .collect();
        let mut history: Vec<Event> = held.iter().chain(&carried).cloned().collect();
        history.sort_by_key(|e| e.timestamp_ms);
        let (profile, outcome) = rebuild(model, id, &history, &before, enrichers, now);
        tracing::debug!(id = %id, from = %adoption.from, events = carried.len(), "split-out profile adopted");
        p.seen.extend(carried.iter().filter_map(Event::dedup_key));
        p.effects.writes.push(Write::Adopt { survivor: id.clone(), events: carried, memberships: Vec::new() });
        p.effects.record(conn, model, id, outcome, now)?;
        p.touched.get_mut(id).expect("loaded above").0 = profile;
        p.handoffs.insert(origin.clone());
        p.effects.writes.push(Write::Handoff(origin.clone(), starling_log::partition_of(id)));
        p.changes.push(p.effects.record_index, IdChange::Adopted { id: id.clone(), origin: origin.clone() });
        p.directory.push((id.clone(), id.clone()));
        Ok(())
    }
}

/// What applying one event did, step by step, for a trace: the event, the attributes the
/// enrichments changed, the audiences it joined and left with the conditions that decided it,
/// and the actions it queued.
fn trace_steps(
    model: &Model,
    event: &Event,
    before: &serde_json::Value,
    after: &Profile,
    outcome: &Outcome,
    now: i64,
) -> Vec<serde_json::Value> {
    let after_json = after.to_json();
    let changed: serde_json::Map<String, serde_json::Value> = after_json["attributes"]
        .as_object()
        .into_iter()
        .flatten()
        .filter(|(name, value)| before["attributes"].get(name.as_str()) != Some(*value))
        .map(|(name, value)| (name.clone(), value.clone()))
        .collect();
    let removed: Vec<&String> = before["attributes"]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(name, _)| name)
        .filter(|name| after_json["attributes"].get(name.as_str()).is_none())
        .collect();
    let conditions: serde_json::Map<String, serde_json::Value> = outcome
        .changes
        .iter()
        .map(|c| match c {
            Membership::Joined { audience, .. } | Membership::Left { audience, .. } => audience,
        })
        .filter_map(|a| Some((a.clone(), starling_core::engine::explain(model, after, a, now)?)))
        .collect();
    let actions: Vec<serde_json::Value> = outcome
        .actions
        .iter()
        .map(|a| serde_json::json!({ "action": a.action, "connector": a.connector, "trigger": a.trigger.name(), "audience": a.audience }))
        .collect();
    vec![
        serde_json::json!({
            "step": "received",
            "event": event.name,
            "id": event.id,
            "visitor_id": event.visitor_id,
            "profile_id": after.id,
            "timestamp": starling_core::time::format_rfc3339(event.timestamp_ms),
            "data": event.data,
            "new_visitor": outcome.new_visitor,
            "new_visit": outcome.new_visit,
        }),
        serde_json::json!({ "step": "enriched", "changed": changed, "removed": removed, "warnings": outcome.warnings }),
        serde_json::json!({
            "step": "evaluated",
            "joined": outcome.joined(),
            "left": outcome.left(),
            "audiences": after.audiences,
            "conditions": conditions,
        }),
        serde_json::json!({ "step": "queued", "actions": actions }),
    ]
}

/// Writes an outbox row, keyed by the log position that decided it, its profile and its rank
/// among the actions that position decided for the profile (all written in one transaction, in
/// order). Ranked per profile, a key does not depend on what the record did to other profiles,
/// which a record applied again on a partition taken over may do otherwise (an event whose
/// profile was merged away since is not applied there).
fn enqueue(tx: &Batch, write: &Write, per_position: &mut HashMap<(Position, String), usize>) -> Result<(), StoreError> {
    let Write::Enqueue { action, due_ms, condition, cause, partition } = write else { return Ok(()) };
    let origin = cause.position().map(|position| {
        let n = per_position.entry((position, action.profile_id.clone())).or_default();
        *n += 1;
        format!("{position}.{:016x}.{}", starling_log::profile_hash(&action.profile_id), *n - 1)
    });
    tx.enqueue(action, &action_payload(action), *due_ms, *condition, origin.as_deref(), *partition)?;
    Ok(())
}

/// Whether a write is made before the rest of its batch's state, at once: an action for the
/// delivery lanes (which read the outbox), an id linked to a profile (other partitions find
/// ids' owners and count profiles' ids in SQLite). Both are idempotent when the whole state is
/// written later or replayed.
fn written_early(write: &Write) -> bool {
    matches!(write, Write::Enqueue { condition: None, .. } | Write::Link { .. })
}

/// Points each id of `profile` at itself in the directory before SQLite forgets the links
/// (see `Directory::prune`): the profile is deleted, here or on another node.
fn point_ids_at_themselves(tx: &Batch, profile: &str, directory: &mut Vec<(String, String)>) -> Result<(), StoreError> {
    let forgotten = starling_store::ids_of(tx.connection(), profile)?;
    directory.extend(forgotten.into_iter().map(|id| (id.clone(), id)));
    Ok(())
}

/// What writing a claim left to do.
enum ClaimWritten {
    /// The id is linked to `linked`: the claiming profile, or the profile it was merged into
    /// here already (see `starling_store::survivor_of`).
    Done { linked: String },
    /// The claim overtook another, whose profile's worker is to be told.
    Overtook(Overtaken),
    /// The id was linked to this profile first: the claim lost.
    Lost(String),
}

/// Writes `profile`'s claim on id `visitor`.
fn write_claim(tx: &Batch, visitor: &str, profile: &str, claim: &Claim) -> Result<ClaimWritten, StoreError> {
    let linked = starling_store::survivor_of(tx.connection(), profile)?;
    Ok(match tx.claim_identity(visitor, &linked, claim.cause.position())? {
        Claimed::Linked => {
            if !claim.followed {
                tx.record_identity(&claim.link)?;
            }
            ClaimWritten::Done { linked }
        }
        Claimed::Held => ClaimWritten::Done { linked },
        Claimed::Lost { owner } => ClaimWritten::Lost(owner),
        Claimed::Overtook { overtaken, position } => {
            if !claim.followed {
                tx.record_identity(&claim.link)?;
            }
            ClaimWritten::Overtook(Overtaken { claim: overtaken, winner: linked, position })
        }
    })
}

/// Writes actions and ids linked in one transaction; returns the claims of other profiles
/// overtaken, or none (and nothing written) when an id claimed was linked to another profile
/// first, or is to be linked to the profile its own was merged into (the directory is pointed
/// at that before the write, at commit).
fn write_early_in<'w>(
    writer: &mut rusqlite::Connection,
    writes: impl Iterator<Item = &'w Write>,
) -> Result<Option<Vec<Overtaken>>, StoreError> {
    let tx = Batch::begin(writer)?;
    let mut overtook = Vec::new();
    let mut per_position = HashMap::new();
    for write in writes {
        match write {
            Write::Link { visitor, profile, claim: None } => {
                if starling_store::survivor_of(tx.connection(), profile)? != *profile {
                    return Ok(None);
                }
                tx.link_identity(visitor, profile)?;
            }
            Write::Link { visitor, profile, claim: Some(claim) } => match write_claim(&tx, visitor, profile, claim)? {
                ClaimWritten::Done { linked } if linked == *profile => {}
                ClaimWritten::Overtook(overtaken) if overtaken.winner == *profile => overtook.push(overtaken),
                ClaimWritten::Done { .. } | ClaimWritten::Overtook(_) | ClaimWritten::Lost(_) => return Ok(None),
            },
            Write::Enqueue { .. } => enqueue(&tx, write, &mut per_position)?,
            _ => unreachable!("only actions and claims are written early"),
        }
    }
    tx.commit()?;
    Ok(Some(overtook))
}

/// Queues an event for the partition that owns its profile.
fn forward(p: &mut Pending, job: usize, to: usize, event: Event) {
    match p.forwards.iter_mut().find(|(j, t, _)| *j == job && *t == to) {
        Some((_, _, events)) => events.push(event),
        None => p.forwards.push((job, to, vec![event])),
    }
}

/// A profile's history is trimmed to `retention.events_per_profile` whenever its event count
/// passes a multiple of this (so not with every event).
const HISTORY_TRIM_STEP: u64 = 100;

/// Why a batch was not stored.
#[derive(Debug, thiserror::Error)]
enum BatchError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Log(#[from] starling_log::LogError),
}

/// A draft started by `batch[job]` as the log record it becomes.
/// `stamp`: the configuration's version, whether the record is independent, its id changes.
fn encode(batch: &[IngestJob], job: usize, draft: &Draft, now_ms: i64, stamp: (i64, bool, Vec<&IdChange>)) -> Vec<u8> {
    let (config, independent, changes) = stamp;
    let event = |(job, i): &(usize, usize)| match &batch[*job].work {
        Work::Events(events) => &events[*i],
        _ => unreachable!("an events draft names events"),
    };
    let logged = match (draft, &batch[job].work) {
        (Draft::Events(items), _) => LoggedRef::Events { now_ms, events: items.iter().map(event).collect() },
        (Draft::Wakeups(profiles), _) => LoggedRef::Wakeups { now_ms, profiles },
        (Draft::Merge(merge), _) => LoggedRef::Merge { now_ms, merge },
        (Draft::Unstitch(id), _) => LoggedRef::Unstitch { now_ms, id },
        (Draft::Adopt(adoption), _) => LoggedRef::Adopt { now_ms, adoption },
        (Draft::Delete(ids), Work::Delete { reason, inactive_before, .. }) => {
            LoggedRef::Delete { now_ms, ids, reason, inactive_before: *inactive_before }
        }
        _ => unreachable!("a draft is of its job's kind"),
    };
    serde_json::to_vec(&Stamped { logged, config, independent, changes }).expect("log records serialize")
}

/// Granularity of the retention index on profiles: a profile's entry moves at most once per
/// step, not with every event.
const LAST_SEEN_STEP_MS: i64 = 3_600_000;

fn last_seen_step(last_seen_ms: i64) -> i64 {
    last_seen_ms - last_seen_ms.rem_euclid(LAST_SEEN_STEP_MS)
}

/// What the store holds for a touched profile, to write only what changed.
#[derive(Default)]
struct Loaded {
    /// The retention index's value, when the profile is stored.
    last_seen_step: Option<i64>,
    /// Its scheduled wake-up came due since it was loaded.
    woken: bool,
    /// Its event count when loaded.
    event_count: u64,
    /// When it was last changed (the time of the last batch that touched it).
    now_ms: i64,
}

impl Loaded {
    /// Whether the scheduled wake-up must change: an earlier one is needed, or the scheduled
    /// one came due. A later one waits for the scheduled one, which then finds nothing due and
    /// reschedules.
    fn reschedule(&self, profile: &Profile) -> Reschedule {
        let scheduled = profile.scheduled_wakeup_ms;
        match profile.wakeup_ms {
            Some(due) if self.woken || scheduled.is_none_or(|s| due < s) => Reschedule::At(due),
            None if self.woken => Reschedule::Never,
            _ => Reschedule::Keep,
        }
    }
}

/// What to do with a profile's scheduled wake-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reschedule {
    /// Leave it as it is.
    Keep,
    At(i64),
    /// Nothing is due any more.
    Never,
}

/// The profile for `profile_id`, changed at `now`: as held in memory, or loaded from the cache
/// or the store.
fn load<'t>(
    model: &Model,
    cache: &mut Cache,
    conn: &rusqlite::Connection,
    touched: &'t mut HashMap<String, (Profile, Loaded)>,
    now: i64,
    profile_id: &str,
) -> Result<&'t mut Profile, StoreError> {
    if let Some((_, loaded)) = touched.get_mut(profile_id) {
        loaded.now_ms = now;
    } else {
        // The cache holds profiles read since the model last changed: conformed already.
        let stored = match cache.profiles.remove(profile_id) {
            Some(p) => Some(p),
            None => starling_store::load_profile(conn, profile_id)?.map(|mut profile| {
                let conformed = starling_core::evolve::conform(model, &mut profile);
                if !conformed.dropped.is_empty() {
                    tracing::debug!(profile = %pseudonym(profile_id), dropped = ?conformed.dropped, "values of a changed type dropped");
                }
                profile
            }),
        };
        let loaded = Loaded {
            last_seen_step: stored.as_ref().map(|p| last_seen_step(p.last_seen_ms)),
            woken: false,
            event_count: stored.as_ref().map_or(0, |p| p.event_count),
            now_ms: now,
        };
        let profile = stored.unwrap_or_else(|| Profile::new(profile_id.to_string()));
        touched.insert(profile_id.to_string(), (profile, loaded));
    }
    Ok(&mut touched.get_mut(profile_id).expect("inserted above").0)
}

/// Writes and wake-ups decided while applying a batch.
#[derive(Default)]
struct Effects {
    writes: Vec<Write>,
    /// Last firing per (action, profile) within this batch, for frequency caps.
    fired: HashMap<(String, String), i64>,
    /// Actions with new work for their delivery lanes.
    woken: HashSet<String>,
    /// The draft (log record) the work being applied belongs to.
    record_index: usize,
}

impl Effects {
    /// Turns an outcome into writes: membership changes in order, then actions (frequency
    /// capped, delayed as configured).
    fn record(
        &mut self,
        conn: &rusqlite::Connection,
        model: &Model,
        profile_id: &str,
        outcome: Outcome,
        now: i64,
    ) -> Result<(), StoreError> {
        for change in outcome.changes {
            self.writes.push(match change {
                Membership::Joined { audience, at_ms } => {
                    Write::Join { profile: profile_id.to_string(), audience, at_ms }
                }
                Membership::Left { audience, .. } => Write::Leave { profile: profile_id.to_string(), audience },
            });
        }
        for action in outcome.actions {
            let def = model.actions.iter().find(|a| a.name == action.action).expect("actions come from the model");
            let key = (action.action.clone(), profile_id.to_string());
            if let Some(cooldown) = def.delivery.cooldown_ms {
                let last = match self.fired.get(&key) {
                    Some(t) => Some(*t),
                    None => starling_store::last_fired(conn, &action.action, profile_id)?,
                };
                // The server's clock, never the event's: spaced timestamps would defeat the cap.
                if last.is_some_and(|t| now - t < cooldown) {
                    tracing::debug!(action = %action.action, profile = %profile_id, "frequency cap: not fired");
                    continue;
                }
                self.fired.insert(key, now);
                self.writes.push(Write::Fired {
                    action: action.action.clone(),
                    profile: profile_id.to_string(),
                    at_ms: now,
                });
            }
            let (due_ms, condition) = schedule(def, &action, now);
            self.woken.insert(action.action.clone());
            let partition = starling_log::partition_of(&action.profile_id);
            let cause = Cause::Draft(self.record_index);
            self.writes.push(Write::Enqueue { action, due_ms, condition, cause, partition });
        }
        Ok(())
    }
}

/// When an action is due, and for delayed actions the membership it requires then.
fn schedule(def: &ActionDef, action: &PendingAction, now: i64) -> (i64, Option<&'static str>) {
    match def.delivery.delay_ms {
        None => (now, None),
        Some(delay) => {
            let condition = match action.trigger {
                Trigger::Joined | Trigger::VisitStarted | Trigger::VisitEnded => Some("member"),
                Trigger::Left => Some("not_member"),
                Trigger::Event | Trigger::Deleted => None,
            };
            (now + delay, condition)
        }
    }
}

/// What the outbox keeps to rebuild an action at delivery time.
pub fn action_payload(action: &PendingAction) -> serde_json::Value {
    serde_json::json!({
        "settings": action.settings,
        "params": action.params,
    })
}

#[derive(Default)]
struct Cache {
    identities: HashMap<String, String>,
    profiles: HashMap<String, Profile>,
    /// (id, profile) pairs already refused and reported.
    refused: HashSet<(String, String)>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitions_are_stable_and_spread() {
        assert_eq!(worker_of("anon-1", 4), worker_of("anon-1", 4));
        let used: HashSet<usize> = (0..100).map(|i| worker_of(&format!("v{i}"), 4)).collect();
        assert_eq!(used.len(), 4);
    }

    #[test]
    fn a_later_wakeup_waits_for_the_scheduled_one_and_an_earlier_one_replaces_it() {
        let profile = |wakeup_ms, scheduled_wakeup_ms| Profile { wakeup_ms, scheduled_wakeup_ms, ..Profile::new("p") };
        let (quiet, woken) = (Loaded::default(), Loaded { woken: true, ..Loaded::default() });
        // Nothing scheduled yet: schedule it.
        assert_eq!(quiet.reschedule(&profile(Some(100), None)), Reschedule::At(100));
        // Each event moves the visit's end later: the scheduled wake-up stays.
        assert_eq!(quiet.reschedule(&profile(Some(200), Some(100))), Reschedule::Keep);
        assert_eq!(quiet.reschedule(&profile(None, Some(100))), Reschedule::Keep);
        // Something due earlier replaces it.
        assert_eq!(quiet.reschedule(&profile(Some(50), Some(100))), Reschedule::At(50));
        // The scheduled one came due: the real one (or none) takes its place.
        assert_eq!(woken.reschedule(&profile(Some(200), Some(100))), Reschedule::At(200));
        assert_eq!(woken.reschedule(&profile(None, Some(100))), Reschedule::Never);
    }

    const CLOCK_MS: i64 = 1_700_000_000_000;

    /// A pipeline on a fresh database, writing to (or, following, reading) `log`.
    struct Running {
        _dir: tempfile::TempDir,
        database: std::path::PathBuf,
        ingest: Ingest,
        workers: Vec<std::thread::JoinHandle<()>>,
        /// The partitions this engine applies live (all, or none when following).
        owned: Arc<Owned>,
    }

    impl Running {
        fn start(workers: usize, log: Arc<dyn EventLog>, following: bool) -> Running {
            Running::with_config("[server]\npartitions = 2\n", workers, log, following)
        }

        fn with_config(config: &str, workers: usize, log: Arc<dyn EventLog>, following: bool) -> Running {
            Running::handing(config, workers, log, following, None)
        }

        /// `elsewhere`: where events for profiles of partitions this engine does not own go.
        fn handing(
            config: &str,
            workers: usize,
            log: Arc<dyn EventLog>,
            following: bool,
            elsewhere: Option<Arc<dyn Elsewhere>>,
        ) -> Running {
            let dir = tempfile::tempdir().unwrap();
            let database = dir.path().join("starling.db");
            drop(starling_store::open(&database).unwrap());
            let model = Arc::new(starling_core::config::parse(config).unwrap());
            let plugins = Arc::new(PluginHost::new().unwrap());
            let telemetry = Arc::new(Telemetry::new());
            let clock: fn() -> i64 = || CLOCK_MS;
            let owned = Arc::new(if following { Owned::none() } else { Owned::all() });
            let shared = Shared {
                config: Arc::new(crate::live::Live::new(model, None)),
                plugins: plugins.clone(),
                runtime: tokio::runtime::Handle::current(),
                lanes: Arc::new(crate::delivery::Lanes::new(plugins, database.clone(), clock, telemetry.clone())),
                clock,
                telemetry,
                log,
                owned: owned.clone(),
                elsewhere,
            };
            let (ingest, workers) = start(shared, workers, 16, &database).unwrap();
            Running { _dir: dir, database, ingest, workers, owned }
        }

        fn profile(&self, id: &str) -> Option<Profile> {
            let conn = starling_store::open(&self.database).unwrap();
            starling_store::load_profile(&conn, id).unwrap()
        }

        fn stop(self) {
            drop(self.ingest);
            for worker in self.workers {
                worker.join().unwrap();
            }
        }
    }

    /// Profiles stitched by an email hash their logins carry.
    const STITCHING: &str = r#"
        [server]
        partitions = 2
        [[attribute]]
        name = "email_hash"
        scope = "visitor"
        type = "visitor_id"
        [[enrichment]]
        attribute = "email_hash"
        op = "set"
        event = "email_hash"
        when = "event:login"
    "#;

    fn login(visitor: &str, n: i64) -> Event {
        let mut login = Event { name: "login".into(), ..event(visitor, n) };
        login.data.insert("email_hash".into(), "b58996c504c5638798eb6b511e6f49af".into());
        login
    }

    fn event(visitor: &str, n: i64) -> Event {
        Event {
            id: None,
            name: "view".into(),
            visitor_id: visitor.into(),
            source: None,
            timestamp_ms: CLOCK_MS + n,
            data: serde_json::Map::new(),
        }
    }

    /// Two requests to merge one profile into another, with different origins (an id claimed by
    /// two partitions at once gives a merge from each side), reach the survivor before it writes
    /// the first: the absorbed profile is added once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_profile_merged_twice_before_it_is_written_is_added_once() {
        let running = Running::start(2, Arc::new(starling_log::MemoryLog::new()), false);
        // Two profiles on different workers.
        let absorbed = (0..).map(|i| format!("visitor-{i}")).find(|id| worker_of(id, 2) == 1).unwrap();
        let survivor = (0..).map(|i| format!("visitor-{i}")).find(|id| worker_of(id, 2) == 0).unwrap();
        let ingest = &running.ingest;
        ingest.submit(vec![event(&survivor, 0), event(&absorbed, 0), event(&absorbed, 0)]).await.unwrap();
        ingest.materialize().await.unwrap();
        let merge = |origin: &str| {
            Work::Merge(MergeRequest {
                survivor: survivor.clone(),
                absorbed: absorbed.clone(),
                via: "email".into(),
                attribute: "email_hash".into(),
                event_id: None,
                origin: Some(origin.into()),
                absorbed_state: None,
                merged_first: None,
            })
        };
        ingest.queue(vec![Some(merge("7.0")), None], false).await.unwrap();
        ingest.queue(vec![Some(merge("7.claim0")), None], false).await.unwrap();
        ingest.materialize().await.unwrap();
        let merged = running.profile(&survivor).unwrap();
        assert_eq!(merged.event_count, 3, "the survivor's event and the absorbed profile's two");
        assert!(running.profile(&absorbed).is_none());
        // Once written, the same merge sent again (after a restart) is recognised as done, so
        // it is not kept to be sent again at every start.
        ingest.queue(vec![Some(merge("9.0")), None], false).await.unwrap();
        ingest.materialize().await.unwrap();
        let conn = starling_store::open(&running.database).unwrap();
        assert!(starling_store::handoff_applied(&conn, "9.0").unwrap());
        assert_eq!(running.profile(&survivor).unwrap().event_count, 3);
        running.stop();
    }

    /// Each record carries what it changed of the ids: the ids it linked (claims marked), the
    /// merge it applied, in the record of the partition that applied it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn records_carry_the_id_changes_they_made() {
        let log = Arc::new(starling_log::MemoryLog::new());
        let running = Running::with_config(STITCHING, 2, log.clone(), false);
        let first = (0..).map(|i| format!("visitor-{i}")).find(|id| worker_of(id, 2) == 0).unwrap();
        let second = (0..).map(|i| format!("visitor-{i}")).find(|id| worker_of(id, 2) == 1).unwrap();
        running.ingest.submit(vec![event(&first, 0), login(&first, 1)]).await.unwrap();
        running.ingest.submit(vec![event(&second, 2), login(&second, 3)]).await.unwrap();
        running.ingest.materialize().await.unwrap();
        let mut records = Vec::new();
        let all: Vec<(Partition, Position)> = (0..starling_log::PARTITIONS).map(|p| (p, 0)).collect();
        log.read(&all, &mut |entry| records.push(entry)).unwrap();
        // The merge handed from one worker to the other is named; the name aside.
        let unnamed = |change| match change {
            IdChange::Merged { absorbed, survivor, origin } => {
                assert!(origin.is_some(), "a merge handed on is named");
                IdChange::Merged { absorbed, survivor, origin: None }
            }
            change => change,
        };
        let changes: Vec<(Partition, IdChange)> = records
            .iter()
            .flat_map(|e| Carried::of(&e.payload, e.position).changes.into_iter().map(|c| (e.partition, unnamed(c))))
            .collect();
        let email = "b58996c504c5638798eb6b511e6f49af".to_string();
        let linked =
            |id: &str, profile: &str, claimed| IdChange::Linked { id: id.into(), profile: profile.into(), claimed };
        let of = starling_log::partition_of;
        assert_eq!(
            changes,
            [
                (of(&first), linked(&first, &first, false)),
                (of(&first), linked(&email, &first, true)),
                (of(&second), linked(&second, &second, false)),
                (of(&first), IdChange::Merged { absorbed: second.clone(), survivor: first.clone(), origin: None }),
            ],
            "{records:?}"
        );
        running.stop();
    }

    /// An id merged into another profile, seen again once that profile is deleted, starts a
    /// profile of its own that its id finds (the worker that first linked the id to itself
    /// does not take that for the link now).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_id_seen_again_after_its_profile_was_deleted_finds_its_new_profile() {
        let log = Arc::new(starling_log::MemoryLog::new());
        let running = Running::with_config(STITCHING, 2, log, false);
        let on = |w| (0..).map(|i| format!("visitor-{i}")).find(|id| worker_of(id, 2) == w).unwrap();
        let (first, second) = (on(0), on(1));
        running.ingest.submit(vec![event(&first, 0), login(&first, 1)]).await.unwrap();
        running.ingest.submit(vec![event(&second, 2), login(&second, 3)]).await.unwrap();
        assert_eq!(running.ingest.profile_of(&second).unwrap(), first);
        running.ingest.delete(vec![second.clone()], "request", None).await.unwrap();
        running.ingest.submit(vec![event(&second, 4)]).await.unwrap();
        running.ingest.materialize().await.unwrap();
        let conn = starling_store::open(&running.database).unwrap();
        assert_eq!(starling_store::resolve_identity(&conn, &second).unwrap().as_deref(), Some(second.as_str()));
        let profile = starling_store::find_profile(&conn, &second).unwrap().expect("found by its id");
        assert_eq!(profile.event_count, 1);
        assert!(starling_store::find_profile(&conn, &first).unwrap().is_none(), "deleted");
        running.stop();
    }

    /// A node following partitions it does not own applies only what their records changed of
    /// the ids: it finds each id's profile as the node that wrote them does, claims at their
    /// records' positions, and holds none of their profiles.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_follower_applies_only_the_id_changes() {
        let log = Arc::new(starling_log::MemoryLog::new());
        let writer = Running::with_config(STITCHING, 2, log.clone(), false);
        let on = |w| (0..).map(|i| format!("visitor-{i}")).filter(move |id| worker_of(id, 2) == w);
        let (first, second, gone) = (on(0).next().unwrap(), on(1).next().unwrap(), on(1).nth(1).unwrap());
        writer.ingest.submit(vec![event(&first, 0), login(&first, 1), event(&gone, 2)]).await.unwrap();
        writer.ingest.submit(vec![event(&second, 3), login(&second, 4)]).await.unwrap();
        writer.ingest.delete(vec![gone.clone()], "request", None).await.unwrap();
        writer.ingest.materialize().await.unwrap();

        let follower = Running::with_config(STITCHING, 2, log.clone(), true);
        let elsewhere = (0..).map(|i| format!("mine-{i}")).find(|id| {
            ![&first, &second, &gone].iter().any(|p| starling_log::partition_of(p) == starling_log::partition_of(id))
        });
        follower.owned.add(starling_log::partition_of(&elsewhere.unwrap()));
        let entries = follower.ingest.read_after(follower.ingest.stored_positions()).await.unwrap();
        follower.ingest.follow(&entries).await.unwrap();
        follower.ingest.materialize().await.unwrap();

        let email = "b58996c504c5638798eb6b511e6f49af";
        assert!(follower.profile(&first).is_none() && follower.profile(&second).is_none(), "no copies");
        assert_eq!(follower.ingest.profile_of(&second).unwrap(), first);
        assert_eq!(follower.ingest.profile_of(email).unwrap(), first);
        let (written, followed) =
            (starling_store::open(&writer.database).unwrap(), starling_store::open(&follower.database).unwrap());
        for id in [&first, &second, &gone, &email.to_string()] {
            assert_eq!(
                starling_store::resolve_identity(&followed, id).unwrap(),
                starling_store::resolve_identity(&written, id).unwrap(),
                "{id}"
            );
        }
        assert_eq!(
            starling_store::claimed_at(&followed, email).unwrap(),
            starling_store::claimed_at(&written, email).unwrap()
        );
        assert_eq!(starling_store::resolve_identity(&followed, &gone).unwrap(), None, "deleted there");
        writer.stop();
        follower.stop();
    }

    /// The actions of records another node appended are delivered without waiting for this
    /// node's next append: a record read from the log is durable, though this node's last
    /// synced append comes before it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn records_read_from_the_log_are_durable() {
        let log = Arc::new(starling_log::MemoryLog::new());
        let node = Running::start(2, log.clone(), true);
        let writer = Running::start(2, log.clone(), false);
        let (mine, theirs) = ("visitor-0", "visitor-1");
        assert_ne!(starling_log::partition_of(mine), starling_log::partition_of(theirs));
        node.owned.add(starling_log::partition_of(mine));
        node.ingest.submit(vec![event(mine, 0)]).await.unwrap();
        writer.ingest.submit(vec![event(theirs, 1)]).await.unwrap();
        let last = log.next_position() - 1;
        assert!(!node.ingest.durable.covers(Some(last)), "past this node's own appends");

        let entries = node.ingest.read_after(vec![(starling_log::partition_of(theirs), 0)]).await.unwrap();
        assert_eq!(entries.iter().map(|e| e.position).max(), Some(last));
        assert!(node.ingest.durable.covers(Some(last)));
        node.stop();
        writer.stop();
    }

    /// Follows every partition `node` does not own from the log's start, and writes it.
    async fn follow_others(node: &Running) {
        let others: Vec<(Partition, Position)> = node.owned.others().into_iter().map(|p| (p, 0)).collect();
        let entries = node.ingest.read_after(others).await.unwrap();
        node.ingest.follow(&entries).await.unwrap();
        node.ingest.materialize().await.unwrap();
    }

    /// Stitching across two nodes: the node whose profile's event names an id the other
    /// node's profile claimed hands the merge on with the profile's state; the survivor's owner
    /// applies it from that state, and the first node's rows go once it follows the merge.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_merge_into_another_nodes_profile_carries_the_absorbed_state() {
        let log = Arc::new(starling_log::MemoryLog::new());
        // Its own two events and the three of the profile it absorbed.
        let (a, b, first, second) = stitched_across_two_nodes(&log).await;
        let conn = starling_store::open(&a.database).unwrap();
        assert_eq!(starling_store::profile_events(&conn, &first).unwrap().len(), 5, "the absorbed history kept");
        follow_others(&b).await;
        assert!(b.profile(&second).is_none(), "gone from the node that handed it on");
        assert_eq!(b.ingest.profile_of(&second).unwrap(), first);
        assert!(a.profile(&second).is_none() && b.profile(&first).is_none(), "no copies");
        a.stop();
        b.stop();
    }

    /// An unstitch whose split-out id is of another node's partition: the record carries the
    /// events that move, the node owning that partition adopts them (and logs it there), the
    /// splitting node keeps no copy; a node taking the partition before its owner adopted
    /// them adopts them from what it kept, and a node following the adoption forgets it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_profile_split_out_into_another_nodes_partition_is_adopted_there() {
        let log = Arc::new(starling_log::MemoryLog::new());
        let (a, b, first, second) = stitched_across_two_nodes(&log).await;
        unstitch_on(&a, &first, &second).await;
        let node = || Running::handing(STITCHING, 2, log.clone(), true, Some(Arc::new(Handed::default())));
        let (c, d) = (node(), node());
        let split_here = starling_store::open(&a.database).unwrap();
        assert!(a.profile(&second).is_none(), "no copy on the node that split it");
        assert!(starling_store::profile_events(&split_here, &second).unwrap().is_empty());

        // c follows the split, not owning the partition: it keeps it.
        follow_others(&c).await;
        assert!(c.profile(&second).is_none());
        follow_others(&b).await;
        let adopted = b.profile(&second).unwrap();
        assert_eq!(adopted.event_count, 3);
        assert_eq!(b.ingest.profile_of(&second).unwrap(), second);
        let conn = starling_store::open(&b.database).unwrap();
        assert_eq!(starling_store::profile_events(&conn, &second).unwrap().len(), 3);
        let mut records = Vec::new();
        log.read(&[(starling_log::partition_of(&second), 0)], &mut |entry| records.push(entry)).unwrap();
        let adopt = |e: &Entry| serde_json::from_slice::<serde_json::Value>(&e.payload).unwrap()["work"] == "adopt";
        assert_eq!(records.iter().filter(|e| adopt(e)).count(), 1, "logged in the partition adopted into");

        // c takes the partition as if b had not adopted it: it adopts what it kept, once.
        c.owned.add(starling_log::partition_of(&second));
        let take = |p: Partition| p == starling_log::partition_of(&second);
        assert_eq!(c.ingest.send_handed_over(take).await.unwrap(), 1);
        assert_eq!(c.ingest.send_handed_over(take).await.unwrap(), 0, "adopted once");
        assert_eq!(c.profile(&second).unwrap().event_count, 3);

        // d follows both records: the split, then its adoption; nothing is left kept.
        follow_others(&d).await;
        let kept = starling_store::handed_over(&starling_store::open(&d.database).unwrap()).unwrap();
        assert!(kept.is_empty(), "{kept:?}");
        assert!(d.profile(&second).is_none());
        for node in [a, b, c, d] {
            node.stop();
        }
    }

    /// The node that split a profile out into another node's partition sees it adopted once
    /// it follows that node's `adopt` record (an unstitch's answer waits for it).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_splitting_node_sees_the_adoption_once_it_follows_the_adopt_record() {
        let log = Arc::new(starling_log::MemoryLog::new());
        let (a, b, first, second) = stitched_across_two_nodes(&log).await;
        unstitch_on(&a, &first, &second).await;
        assert!(a.ingest.adopted_elsewhere(&second) && !a.ingest.adopted_elsewhere(&first));
        let moment = std::time::Duration::from_millis(100);
        assert!(!a.ingest.adopted(&second, moment).await.unwrap(), "not adopted yet");
        follow_others(&b).await;
        assert!(!a.ingest.adopted(&second, moment).await.unwrap(), "its adoption not followed here yet");
        let (adopted, ()) =
            tokio::join!(a.ingest.adopted(&second, std::time::Duration::from_secs(10)), follow_others(&a));
        assert!(adopted.unwrap(), "followed");
        a.stop();
        b.stop();
    }

    /// `node` follows the other partitions, then takes `partition` with no snapshot: its records
    /// from the log's start, applied again.
    async fn take_from_the_logs_start(node: &Running, partition: Partition) {
        follow_others(node).await;
        node.owned.add(partition);
        node.ingest.restore(partition, None, Some(0)).await.unwrap();
        let entries = node.ingest.read_after(vec![(partition, 0)]).await.unwrap();
        node.ingest.take_over(&entries).await.unwrap();
        node.ingest.materialize().await.unwrap();
    }

    /// Nodes `a` and `b` on `config`, owning the partitions of `first` and `second`.
    fn two_nodes(config: &str, log: &Arc<starling_log::MemoryLog>) -> (Running, Running, String, String) {
        let (first, second) = in_two_partitions();
        let node = || Running::handing(config, 2, log.clone(), true, Some(Arc::new(Handed::default())));
        let (a, b) = (node(), node());
        a.owned.add(starling_log::partition_of(&first));
        b.owned.add(starling_log::partition_of(&second));
        (a, b, first, second)
    }

    /// Nodes `a` and `b`, owning the partitions of `first` and `second`: the two profiles were
    /// stitched across them (into `first`, on `a`).
    async fn stitched_across_two_nodes(log: &Arc<starling_log::MemoryLog>) -> (Running, Running, String, String) {
        let (a, b, first, second) = two_nodes(STITCHING, log);
        a.ingest.submit(vec![event(&first, 0), login(&first, 1)]).await.unwrap();
        a.ingest.materialize().await.unwrap();
        follow_others(&b).await;
        b.ingest.submit(vec![event(&second, 2), event(&second, 3), login(&second, 4)]).await.unwrap();
        b.ingest.materialize().await.unwrap();
        follow_others(&a).await;
        assert_eq!(a.profile(&first).unwrap().event_count, 5);
        (a, b, first, second)
    }

    /// Unstitches `second` on `a`: its three events go.
    async fn unstitch_on(a: &Running, first: &str, second: &str) {
        let answer = a.ingest.unstitch(second).await.unwrap();
        assert_eq!(answer["events"][second], 3, "{answer}");
        a.ingest.materialize().await.unwrap();
        assert_eq!(a.profile(first).unwrap().event_count, 2);
    }

    /// The node that split a profile out into another node's partition keeps it too: taking
    /// that partition before its owner adopted it, it adopts it, and keeps it no longer.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_node_that_split_a_profile_out_adopts_it_if_it_takes_the_partition_first() {
        let log = Arc::new(starling_log::MemoryLog::new());
        let (a, b, first, second) = stitched_across_two_nodes(&log).await;
        // b follows the merge (its rows of `second` go) and stores a snapshot.
        follow_others(&b).await;
        let snapshots = tempfile::tempdir().unwrap();
        let snapshot = snapshots.path().join("b.db");
        let partition = starling_log::partition_of(&second);
        let positions = starling_store::snapshot(&b.database, &snapshot).unwrap();
        let position = positions.iter().find(|(p, _)| *p == partition).map(|(_, at)| *at).unwrap();
        unstitch_on(&a, &first, &second).await;
        let kept =
            |node: &Running| starling_store::handed_over(&starling_store::open(&node.database).unwrap()).unwrap();
        assert_eq!(kept(&a).len(), 1, "kept with the split");
        // b stops before it follows the split; a takes its partition from b's snapshot.
        b.stop();
        a.owned.add(partition);
        a.ingest.restore(partition, Some(snapshot), Some(position)).await.unwrap();
        let entries = a.ingest.read_after(vec![(partition, position)]).await.unwrap();
        a.ingest.take_over(&entries).await.unwrap();
        assert_eq!(a.ingest.send_handed_over(|p| p == partition).await.unwrap(), 1);
        a.ingest.materialize().await.unwrap();
        assert_eq!(a.profile(&second).unwrap().event_count, 3);
        assert!(kept(&a).is_empty(), "adopted: no longer kept");
        a.stop();
    }

    /// A node taking a partition from the log's start (no snapshot yet) applies again the
    /// events of a profile merged into another node's, split out again and adopted back: at
    /// its hand record the profile leaves, as it left the node that handed it on, and the
    /// adoption brings its events back once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_profile_handed_away_leaves_a_partition_taken_from_the_logs_start() {
        let log = Arc::new(starling_log::MemoryLog::new());
        let (a, b, first, second) = stitched_across_two_nodes(&log).await;
        follow_others(&b).await;
        unstitch_on(&a, &first, &second).await;
        follow_others(&b).await;
        assert_eq!(b.profile(&second).unwrap().event_count, 3, "adopted");
        let c = Running::handing(STITCHING, 2, log.clone(), true, Some(Arc::new(Handed::default())));
        take_from_the_logs_start(&c, starling_log::partition_of(&second)).await;
        assert_eq!(c.profile(&second).unwrap().event_count, 3, "as on b");
        let conn = starling_store::open(&c.database).unwrap();
        assert_eq!(starling_store::profile_events(&conn, &second).unwrap().len(), 3);
        for node in [a, b, c] {
            node.stop();
        }
    }

    /// A node taking a partition decides again a merge its last owner had not decided (that
    /// node had not followed the earlier claim of the id yet): the events the last owner applied
    /// to the absorbed profile after the claim's record were not carried with the merge, and go
    /// to the survivor. (They were skipped as if carried, and lost.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn events_after_a_merge_decided_again_on_a_take_go_to_the_survivor() {
        // The later record applied before the survivor's worker wrote the merge, then after.
        for written_between in [false, true] {
            merge_decided_again_on_a_take(written_between).await;
        }
    }

    async fn merge_decided_again_on_a_take(written_between: bool) {
        let log = Arc::new(starling_log::MemoryLog::new());
        let (a, b, first, second) = two_nodes(STITCHING, &log);
        a.ingest.submit(vec![event_with_id(&first, 0), login(&first, 1)]).await.unwrap();
        a.ingest.materialize().await.unwrap();
        // b has not followed a's claim: its login links the email to `second`, and so does the
        // event after it.
        b.ingest.submit(vec![event_with_id(&second, 2), login(&second, 3)]).await.unwrap();
        b.ingest.submit(vec![event_with_id(&second, 4)]).await.unwrap();
        b.ingest.materialize().await.unwrap();
        assert_eq!(b.profile(&second).unwrap().event_count, 3);
        b.stop();
        // a takes b's partition from the log's start: there the claim loses to a's, earlier.
        let partition = starling_log::partition_of(&second);
        match written_between {
            false => take_from_the_logs_start(&a, partition).await,
            true => {
                follow_others(&a).await;
                a.owned.add(partition);
                a.ingest.restore(partition, None, Some(0)).await.unwrap();
                let entries = a.ingest.read_after(vec![(partition, 0)]).await.unwrap();
                a.ingest.take_over(&entries[..1]).await.unwrap();
                a.ingest.materialize().await.unwrap();
                a.ingest.take_over(&entries[1..]).await.unwrap();
                a.ingest.materialize().await.unwrap();
            }
        }
        assert_eq!(a.ingest.profile_of(&second).unwrap(), first);
        let conn = starling_store::open(&a.database).unwrap();
        let history: BTreeSet<String> =
            starling_store::profile_events(&conn, &first).unwrap().into_iter().filter_map(|e| e.id).collect();
        assert_eq!(history, ["e-0", "e-2", "e-4"].map(String::from).into(), "each event with an id, once");
        assert_eq!(a.profile(&first).unwrap().event_count, 5);
        // What a holds is in the survivor's partition's records: a node taking that partition
        // from the log's start finds it too.
        let c = Running::handing(STITCHING, 2, log.clone(), true, Some(Arc::new(Handed::default())));
        take_from_the_logs_start(&c, starling_log::partition_of(&first)).await;
        let conn = starling_store::open(&c.database).unwrap();
        let history: BTreeSet<String> =
            starling_store::profile_events(&conn, &first).unwrap().into_iter().filter_map(|e| e.id).collect();
        assert_eq!(history, ["e-0", "e-2", "e-4"].map(String::from).into(), "taken again from the log");
        assert_eq!(c.profile(&first).unwrap().event_count, 5);
        a.stop();
        c.stop();
    }

    /// As above, with the survivor of a third node's partition: the node taking the partition
    /// keeps the merge it decided again, applies the later event to the absorbed profile as the
    /// first run did, and hands the merge on once the take is done, with the absorbed profile
    /// as it is then; the survivor's owner gets every event.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn events_after_a_merge_decided_again_on_a_take_go_to_another_nodes_survivor() {
        let log = Arc::new(starling_log::MemoryLog::new());
        let (a, b, first, second) = two_nodes(STITCHING, &log);
        a.ingest.submit(vec![event_with_id(&first, 0), login(&first, 1)]).await.unwrap();
        a.ingest.materialize().await.unwrap();
        b.ingest.submit(vec![event_with_id(&second, 2), login(&second, 3)]).await.unwrap();
        b.ingest.submit(vec![event_with_id(&second, 4)]).await.unwrap();
        b.ingest.materialize().await.unwrap();
        b.stop();
        let c = Running::handing(STITCHING, 2, log.clone(), true, Some(Arc::new(Handed::default())));
        let partition = starling_log::partition_of(&second);
        take_from_the_logs_start(&c, partition).await;
        c.ingest.hand_kept(|p| p == partition).await.unwrap();
        c.ingest.materialize().await.unwrap();
        follow_others(&a).await;
        let conn = starling_store::open(&a.database).unwrap();
        let history: BTreeSet<String> =
            starling_store::profile_events(&conn, &first).unwrap().into_iter().filter_map(|e| e.id).collect();
        assert_eq!(history, ["e-0", "e-2", "e-4"].map(String::from).into(), "each event with an id, once");
        assert_eq!(a.profile(&first).unwrap().event_count, 5);
        a.stop();
        c.stop();
    }

    /// Events a take redirected to a survivor whose partition this node no longer owns when the
    /// take is done go to the survivor's owner as redirected (checked there against the
    /// profile's history: that node may have seen them); while no node takes them, they are
    /// kept and sent again, and applied here once the partition is this node's again.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn events_a_take_redirected_to_a_survivor_it_lost_are_handed_on_or_kept() {
        let log = Arc::new(starling_log::MemoryLog::new());
        let (first, second) = in_two_partitions();
        let handed = Arc::new(Handed::default());
        let a = Running::handing(STITCHING, 2, log.clone(), true, Some(handed.clone()));
        a.owned.add(starling_log::partition_of(&first));
        let redirect = |n| a.ingest.redirected.lock().unwrap().push(event_with_id(&second, n));
        redirect(0);
        a.ingest.apply_redirected().await;
        assert_eq!(*handed.vias.lock().unwrap(), [Via::Redirected], "to the owner only, as redirected");
        assert!(a.ingest.redirected.lock().unwrap().is_empty());

        handed.refusing.store(true, Ordering::SeqCst);
        redirect(1);
        a.ingest.apply_redirected().await;
        assert_eq!(a.ingest.redirected.lock().unwrap().len(), 1, "kept while no node takes it");
        a.owned.add(starling_log::partition_of(&second));
        // Redirected again by a later take meanwhile.
        redirect(1);
        a.ingest.apply_redirected().await;
        assert!(a.ingest.redirected.lock().unwrap().is_empty());
        a.ingest.materialize().await.unwrap();
        let conn = starling_store::open(&a.database).unwrap();
        let history: Vec<String> =
            starling_store::profile_events(&conn, &second).unwrap().into_iter().filter_map(|e| e.id).collect();
        assert_eq!(history, ["e-1"], "applied here, once, once the partition is this node's");
        a.stop();
    }

    /// Events another node's take redirected here are checked against their profile's history,
    /// not the events this node has seen (it may have applied them to the absorbed profile, which
    /// it no longer holds); not owning their profile, this node refuses them rather than hand
    /// them on again.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn events_redirected_here_are_checked_against_the_profiles_history() {
        let log = Arc::new(starling_log::MemoryLog::new());
        let (a, _, first, second) = two_nodes(STITCHING, &log);
        // Seen here: applied to another profile of this node's partition.
        let other = (0..)
            .map(|i| format!("other-{i}"))
            .find(|id| starling_log::partition_of(id) == starling_log::partition_of(&first))
            .unwrap();
        a.ingest.submit(vec![event_with_id(&other, 0)]).await.unwrap();
        let seen = a.ingest.submit_from(vec![event_with_id(&first, 0)], Source::Node).await.unwrap();
        assert_eq!(seen.duplicates, 1, "handed as any event, it is a duplicate");
        let taken = a.ingest.submit_from(vec![event_with_id(&first, 0)], Source::HandedRedirected).await.unwrap();
        assert_eq!((taken.accepted, taken.duplicates), (1, 0), "new to its profile");
        let again = a.ingest.submit_from(vec![event_with_id(&first, 0)], Source::HandedRedirected).await.unwrap();
        assert_eq!(again.duplicates, 1, "held by its profile now");
        a.ingest.materialize().await.unwrap();
        assert_eq!(a.profile(&first).unwrap().event_count, 1);
        let refused = a.ingest.submit_from(vec![event_with_id(&second, 1)], Source::HandedRedirected).await;
        assert!(refused.unwrap_err().to_string().contains("the node that redirected them sends them again"));
        a.stop();
    }

    /// An unstitch applied again by a node taking the partition from a snapshot of the stitched
    /// profile (its ids followed the split already: the id is a profile of its own there)
    /// splits what its record split.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_unstitch_applied_again_by_a_node_taking_the_partition_splits_what_it_split() {
        let log = Arc::new(starling_log::MemoryLog::new());
        let (a, b, first, second) = stitched_across_two_nodes(&log).await;
        let snapshots = tempfile::tempdir().unwrap();
        let snapshot = snapshots.path().join("a.db");
        let partition = starling_log::partition_of(&first);
        let positions = starling_store::snapshot(&a.database, &snapshot).unwrap();
        let position = positions.iter().find(|(p, _)| *p == partition).map(|(_, at)| *at).unwrap();
        unstitch_on(&a, &first, &second).await;
        let c = Running::handing(STITCHING, 2, log.clone(), true, Some(Arc::new(Handed::default())));
        follow_others(&c).await;
        assert_eq!(c.ingest.profile_of(&second).unwrap(), second, "the split followed");
        // c takes a's partition from the snapshot, then its records after it: the unstitch.
        c.owned.add(partition);
        c.ingest.restore(partition, Some(snapshot), Some(position)).await.unwrap();
        let entries = c.ingest.read_after(vec![(partition, position)]).await.unwrap();
        c.ingest.take_over(&entries).await.unwrap();
        c.ingest.materialize().await.unwrap();
        assert_eq!(c.profile(&first).unwrap().event_count, 2, "as on a: {:?}", a.profile(&first));
        assert!(c.profile(&second).is_none(), "b's");
        for node in [a, b, c] {
            node.stop();
        }
    }

    /// An email hash capped at one per profile; a customer id that stitches.
    const CAPPED: &str = r#"
        [server]
        partitions = 2
        [[attribute]]
        name = "email_hash"
        scope = "visitor"
        type = "visitor_id"
        max_per_profile = 1
        [[attribute]]
        name = "customer_id"
        scope = "visitor"
        type = "visitor_id"
        [[enrichment]]
        attribute = "email_hash"
        op = "set"
        event = "email_hash"
        when = "event:login"
        [[enrichment]]
        attribute = "customer_id"
        op = "set"
        event = "customer_id"
        when = "event:order"
    "#;

    /// `max_per_profile` across nodes: a profile whose event names an id another node's
    /// profile holds is not stitched to it when the two would hold more capped values than
    /// allowed, known here from the capped ids that node's records linked.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_profiles_of_two_nodes_holding_different_capped_ids_are_not_stitched() {
        let log = Arc::new(starling_log::MemoryLog::new());
        let (a, b, first, second) = two_nodes(CAPPED, &log);
        let with = |visitor: &str, name: &str, field: &str, value: &str, n| {
            let mut e = Event { name: name.into(), ..event(visitor, n) };
            e.data.insert(field.into(), value.into());
            e
        };
        a.ingest.submit(vec![with(&first, "login", "email_hash", "first-email", 0)]).await.unwrap();
        a.ingest.submit(vec![with(&first, "order", "customer_id", "customer-7", 1)]).await.unwrap();
        a.ingest.materialize().await.unwrap();
        follow_others(&b).await;
        b.ingest.submit(vec![with(&second, "login", "email_hash", "second-email", 2)]).await.unwrap();
        b.ingest.submit(vec![with(&second, "order", "customer_id", "customer-7", 3)]).await.unwrap();
        b.ingest.materialize().await.unwrap();

        assert_eq!(b.ingest.profile_of(&second).unwrap(), second, "not stitched");
        assert!(b.profile(&second).is_some());
        let mut records = Vec::new();
        log.read(&[(starling_log::partition_of(&second), 0)], &mut |entry| records.push(entry)).unwrap();
        assert!(records.iter().all(|e| handed_merge(&e.payload).is_none()), "no merge handed on");
        let conn = starling_store::open(&b.database).unwrap();
        let history = starling_store::identity_history(&conn, &second).unwrap();
        let refused = history.iter().find(|h| h["kind"] == "refused").expect("a refusal recorded");
        assert!(refused.to_string().contains("max_per_profile = 1"), "{refused}");
        a.stop();
        b.stop();
    }

    /// The merge of the first hand record in `partition`, waiting up to 5 s for one.
    async fn hand_record_in(log: &dyn EventLog, partition: Partition) -> Option<MergeRequest> {
        for _ in 0..500 {
            let mut records = Vec::new();
            log.read(&[(partition, 0)], &mut |entry| records.push(entry)).unwrap();
            if let Some(handed) = records.iter().find_map(|entry| handed_merge(&entry.payload)) {
                return Some(handed);
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        None
    }

    /// Appends the hand record of a merge of `absorbed` into `survivor` (decided by the record
    /// at `record`, by an email hash) that carries `state`, in the absorbed profile's partition.
    fn append_hand_record(log: &dyn EventLog, survivor: &str, absorbed: &str, record: Position, state: Absorbed) {
        let mut merge = MergeRequest {
            survivor: survivor.to_string(),
            absorbed: absorbed.to_string(),
            via: "b58996c504c5638798eb6b511e6f49af".into(),
            attribute: "email_hash".into(),
            event_id: None,
            origin: None,
            absorbed_state: Some(Box::new(state)),
            merged_first: None,
        };
        merge.origin = Some(merge_origin(record, &merge));
        log.append(&[(starling_log::partition_of(absorbed), &hand_record(&merge))]).unwrap();
    }

    /// Two visitors whose profiles are in two partitions.
    fn in_two_partitions() -> (String, String) {
        let ids = (0..).map(|i| format!("visitor-{i}"));
        let first = ids.clone().next().unwrap();
        let second = ids.skip(1).find(|id| starling_log::partition_of(id) != starling_log::partition_of(&first));
        (first, second.unwrap())
    }

    /// An event of `visitor` with the id `e-{n}`.
    fn event_with_id(visitor: &str, n: i64) -> Event {
        Event { id: Some(format!("e-{n}")), ..event(visitor, n) }
    }

    /// One pair merged twice, from two states of the absorbed profile (a node taking its
    /// partition decided the merge again on a later event, applied to the absorbed profile as it
    /// first was), then the first merge handed on again from a third state: the survivor takes
    /// the events each later state carries beyond what it holds.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_second_merge_of_a_pair_brings_the_events_the_first_lacked() {
        let (survivor, absorbed) = in_two_partitions();
        // The absorbed profile as the node owning it held it, after one event, then two.
        let other = Running::start(2, Arc::new(starling_log::MemoryLog::new()), false);
        let mut states = Vec::new();
        for n in 0..3 {
            other.ingest.submit(vec![event_with_id(&absorbed, n)]).await.unwrap();
            other.ingest.materialize().await.unwrap();
            let conn = starling_store::open(&other.database).unwrap();
            let events = starling_store::profile_events(&conn, &absorbed).unwrap();
            states.push(Absorbed { profile: other.profile(&absorbed).unwrap(), events, memberships: Vec::new() });
        }
        other.stop();
        let log = Arc::new(starling_log::MemoryLog::new());
        let node = Running::handing(STITCHING, 2, log.clone(), true, Some(Arc::new(Handed::default())));
        node.owned.add(starling_log::partition_of(&survivor));
        node.ingest.submit(vec![event_with_id(&survivor, 10)]).await.unwrap();
        node.ingest.materialize().await.unwrap();
        for (record, state) in [100, 101, 100].into_iter().zip(states) {
            append_hand_record(&*log, &survivor, &absorbed, record, state);
        }
        follow_others(&node).await;
        node.ingest.materialize().await.unwrap();
        let merged = node.profile(&survivor).unwrap();
        assert_eq!(merged.event_count, 4, "its own, the first state's, and one more from each later state");
        let conn = starling_store::open(&node.database).unwrap();
        let history: Vec<_> =
            starling_store::profile_events(&conn, &survivor).unwrap().into_iter().filter_map(|e| e.id).collect();
        assert_eq!(history, ["e-0", "e-1", "e-2", "e-10"]);
        node.stop();
    }

    /// An event the absorbed profile's node applied reaches the survivor's node with the merge
    /// carrying it. Sent there again while the merge is kept, before it is applied (an
    /// ingestion retried after the first node applied it and its answer was lost), it is a
    /// duplicate: the survivor holds it once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_event_a_kept_merge_carries_is_a_duplicate_when_sent_again() {
        let (survivor, absorbed) = in_two_partitions();
        let other = Running::start(2, Arc::new(starling_log::MemoryLog::new()), false);
        other.ingest.submit(vec![event_with_id(&absorbed, 0)]).await.unwrap();
        other.ingest.materialize().await.unwrap();
        let conn = starling_store::open(&other.database).unwrap();
        let events = starling_store::profile_events(&conn, &absorbed).unwrap();
        let state = Absorbed { profile: other.profile(&absorbed).unwrap(), events, memberships: Vec::new() };
        other.stop();
        let log = Arc::new(starling_log::MemoryLog::new());
        let node = Running::handing(STITCHING, 2, log.clone(), true, Some(Arc::new(Handed::default())));
        let survivors = starling_log::partition_of(&survivor);
        node.owned.add(survivors);
        node.ingest.submit(vec![event_with_id(&survivor, 10)]).await.unwrap();
        node.ingest.materialize().await.unwrap();
        // The hand record is followed while the survivor's lease has lapsed: the merge is kept.
        node.owned.remove(survivors);
        append_hand_record(&*log, &survivor, &absorbed, 100, state);
        let absorbeds = starling_log::partition_of(&absorbed);
        let entries = node.ingest.read_after(vec![(absorbeds, 0)]).await.unwrap();
        node.ingest.follow(&entries).await.unwrap();
        node.owned.add(survivors);
        let again = node.ingest.submit(vec![event_with_id(&absorbed, 0)]).await.unwrap();
        assert_eq!((again.accepted, again.duplicates), (0, 1), "the event the kept merge carries");
        assert_eq!(node.ingest.send_handed_over(|_| true).await.unwrap(), 1);
        node.ingest.materialize().await.unwrap();
        assert_eq!(node.profile(&survivor).unwrap().event_count, 2, "its own, and the one carried, once");
        let conn = starling_store::open(&node.database).unwrap();
        let history: Vec<_> =
            starling_store::profile_events(&conn, &survivor).unwrap().into_iter().filter_map(|e| e.id).collect();
        assert_eq!(history, ["e-0", "e-10"]);
        node.stop();
    }

    /// The merges kept for the partitions a node takes are all sent, whatever becomes of one:
    /// a batch refused (its partition lost meanwhile) does not keep the other workers' merges
    /// from being applied. (It did: the first failure ended the sending, and a merge never sent
    /// stayed kept, its absorbed profile's events missing from the survivor until a next take.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_merges_kept_for_partitions_taken_are_all_sent_when_one_fails() {
        let visitors = (0..).map(|i| format!("visitor-{i}"));
        let on = |worker| visitors.clone().filter(move |id| worker_of(id, 2) == worker);
        let (lost, survivor) = (on(0).next().unwrap(), on(1).next().unwrap());
        let partitions = [&lost, &survivor].map(|id| starling_log::partition_of(id));
        let absorbed: Vec<String> =
            visitors.clone().filter(|id| !partitions.contains(&starling_log::partition_of(id))).take(2).collect();
        // The two absorbed profiles, as another node held them.
        let other = Running::start(2, Arc::new(starling_log::MemoryLog::new()), false);
        let events = absorbed.iter().zip(0..).map(|(id, n)| event_with_id(id, n)).collect();
        other.ingest.submit(events).await.unwrap();
        other.ingest.materialize().await.unwrap();
        let conn = starling_store::open(&other.database).unwrap();
        let state = |id: &String| Absorbed {
            profile: other.profile(id).unwrap(),
            events: starling_store::profile_events(&conn, id).unwrap(),
            memberships: Vec::new(),
        };
        let states = [state(&absorbed[0]), state(&absorbed[1])];
        other.stop();

        let log = Arc::new(GatedLog::default());
        log.open();
        let node = Running::handing(STITCHING, 2, log.clone(), true, Some(Arc::new(Handed::default())));
        partitions.iter().for_each(|p| node.owned.add(*p));
        node.ingest.submit(vec![event_with_id(&lost, 10), event_with_id(&survivor, 11)]).await.unwrap();
        node.ingest.materialize().await.unwrap();
        // The hand records are followed while the survivors' leases have lapsed: kept.
        partitions.iter().for_each(|p| node.owned.remove(*p));
        for ((to, from), (state, record)) in
            [&lost, &survivor].into_iter().zip(&absorbed).zip(states.into_iter().zip(100..))
        {
            append_hand_record(&*log, to, from, record, state);
        }
        let absorbeds = absorbed.iter().map(|id| (starling_log::partition_of(id), 0)).collect();
        let entries = node.ingest.read_after(absorbeds).await.unwrap();
        node.ingest.follow(&entries).await.unwrap();
        // Taken again; the first worker's partition is lost as its merge is logged.
        partitions.iter().for_each(|p| node.owned.add(*p));
        *log.losing.lock().unwrap() = Some(node.owned.clone());
        *log.refuse.lock().unwrap() = Some(partitions[0]);
        let sent = node.ingest.send_handed_over(|_| true).await;
        assert!(matches!(&sent, Err(IngestError::Failed(e)) if e.starts_with("1 of 2 not applied")), "{sent:?}");
        node.ingest.materialize().await.unwrap();
        assert_eq!(node.profile(&survivor).unwrap().event_count, 2, "its own, and the one its merge carried");
        let conn = starling_store::open(&node.database).unwrap();
        let kept: Vec<String> = starling_store::handed_over(&conn)
            .unwrap()
            .into_iter()
            .map(|(_, request)| serde_json::from_str::<MergeRequest>(&request).unwrap().survivor)
            .collect();
        assert_eq!(kept, [lost], "the lost partition's, for its next owner");
        node.stop();
    }

    /// A record applied a second time (a read that visited it twice, a batch applied again
    /// from the log) changes nothing, whether the first time is still in memory or in SQLite.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_record_applied_again_changes_nothing() {
        let running = Running::start(2, Arc::new(starling_log::MemoryLog::new()), true);
        let record = |position: u64| {
            let event = event("visitor", position as i64);
            let payload = serde_json::to_vec(&LoggedRef::Events { now_ms: CLOCK_MS, events: vec![&event] }).unwrap();
            Entry { position, partition: starling_log::partition_of("visitor"), payload }
        };
        let count = || running.profile("visitor").map(|p| p.event_count);
        running.ingest.apply_records(&[record(3), record(3)]).await.unwrap();
        running.ingest.materialize().await.unwrap();
        assert_eq!(count(), Some(1), "read twice in one go");
        running.ingest.apply_records(&[record(3), record(5)]).await.unwrap();
        running.ingest.materialize().await.unwrap();
        assert_eq!(count(), Some(2), "the first already in SQLite, the second new");
        running.stop();
    }

    /// A merge one worker hands to another is logged by the survivor's worker; applying the
    /// log again (a restart, a node taking over) applies it there, in its place, and the
    /// survivor's later records after it: the profile comes out as it was.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_merge_handed_to_another_worker_applies_again_in_its_place() {
        let config = STITCHING;
        let log = Arc::new(starling_log::MemoryLog::new());
        let live = Running::with_config(config, 2, log.clone(), false);
        let absorbed = (0..).map(|i| format!("visitor-{i}")).find(|id| worker_of(id, 2) == 1).unwrap();
        let survivor = (0..).map(|i| format!("visitor-{i}")).find(|id| worker_of(id, 2) == 0).unwrap();
        live.ingest.submit(vec![event(&survivor, 0), login(&survivor, 1)]).await.unwrap();
        live.ingest.materialize().await.unwrap();
        live.ingest.submit(vec![event(&absorbed, 2), login(&absorbed, 3)]).await.unwrap();
        for n in 4..8 {
            live.ingest.submit(vec![event(&survivor, n), event(&absorbed, n)]).await.unwrap();
        }
        live.ingest.materialize().await.unwrap();
        let merged = live.profile(&survivor).unwrap();
        assert_eq!(merged.event_count, 12);
        assert!(live.profile(&absorbed).is_none(), "merged into the survivor");
        live.stop();

        let restarted = Running::with_config(config, 2, log.clone(), false);
        restarted.ingest.replay().await.unwrap();
        let applied = restarted.profile(&survivor).unwrap();
        assert_eq!(applied.to_json(), merged.to_json());
        assert!(restarted.profile(&absorbed).is_none());
        restarted.stop();
    }

    /// A record applied again after the directory changed (a merge its own worker decided
    /// earlier in the replay) forwards its events to the survivor's worker, which applies them
    /// as part of that record: that worker's later records are applied too. (Logged anew, the
    /// forwarded events took a position past them, and they were skipped as applied.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn events_a_replayed_record_forwards_are_applied_as_part_of_it() {
        let survivor = (0..).map(|i| format!("visitor-{i}")).find(|id| worker_of(id, 2) == 0).unwrap();
        let visitor = (0..).map(|i| format!("visitor-{i}")).find(|id| worker_of(id, 2) == 1).unwrap();
        let log = Arc::new(starling_log::MemoryLog::new());
        let records = [
            (&survivor, vec![event(&survivor, 0), login(&survivor, 1)]),
            (&visitor, vec![login(&visitor, 2)]),
            (&visitor, vec![event(&visitor, 3), event(&visitor, 4)]),
            (&survivor, vec![event(&survivor, 5), event(&survivor, 6)]),
        ];
        for (profile, events) in &records {
            let payload =
                serde_json::to_vec(&LoggedRef::Events { now_ms: CLOCK_MS, events: events.iter().collect() }).unwrap();
            log.append(&[(starling_log::partition_of(profile), &payload)]).unwrap();
        }
        let restarted = Running::with_config(STITCHING, 2, log.clone(), false);
        restarted.ingest.replay().await.unwrap();
        let merged = restarted.profile(&survivor).unwrap();
        assert_eq!(merged.event_count, 7, "its own four, the two forwarded, and the visitor's login");
        assert!(restarted.profile(&visitor).is_none());
        restarted.stop();
    }

    /// Events a record of a partition being taken hands to another worker (the directory moved
    /// their id since the record was written) may stitch the profile they reach into one of
    /// another node's partition: that merge is named after the record and kept until applied,
    /// as every merge decided for another node's partition is; an id they claim is claimed at
    /// the record's position.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn what_events_a_record_taken_over_hands_on_decide_is_the_records() {
        let on = |w| (0..).map(|i| format!("visitor-{i}")).filter(move |id| worker_of(id, 2) == w);
        let (claimer, moved) = (on(0).next().unwrap(), on(0).nth(1).unwrap());
        let survivor = on(1).next().unwrap();
        let login_as = |visitor: &str, n: i64, email: &str| {
            let mut login = login(visitor, n);
            login.data.insert("email_hash".into(), email.into());
            login
        };
        let log = Arc::new(starling_log::MemoryLog::new());
        let append = |profile: &str, events: &[Event]| {
            let payload =
                serde_json::to_vec(&LoggedRef::Events { now_ms: CLOCK_MS, events: events.iter().collect() }).unwrap();
            log.append(&[(starling_log::partition_of(profile), &payload)]).unwrap()[0]
        };
        append(&claimer, &[event(&claimer, 0), login_as(&claimer, 1, "first")]);
        append(&survivor, &[event(&survivor, 2), login_as(&survivor, 3, "second")]);
        // The follower moves `moved` to `survivor` here (a merge for a partition it does not own).
        append(&moved, &[event(&moved, 4), login_as(&moved, 5, "second")]);
        // Written before its writer knew.
        let login_position = append(&moved, &[login_as(&moved, 6, "third"), login_as(&moved, 7, "first")]);

        let follower = Running::with_config(STITCHING, 2, log.clone(), true);
        let entries = follower.ingest.read_after(follower.ingest.stored_positions()).await.unwrap();
        follower.ingest.take_over(&entries).await.unwrap();
        follower.ingest.materialize().await.unwrap();
        assert_eq!(follower.profile(&survivor).unwrap().event_count, 4, "its own two and the logins handed to it");
        let conn = starling_store::open(&follower.database).unwrap();
        assert_eq!(starling_store::claimed_at(&conn, "third").unwrap(), Some(login_position));
        let kept: Vec<MergeRequest> = starling_store::handed_over(&conn)
            .unwrap()
            .into_iter()
            .map(|(_, request)| serde_json::from_str(&request).unwrap())
            .collect();
        let merged = |m: &MergeRequest| (m.survivor.clone(), m.absorbed.clone());
        assert_eq!(
            kept.iter().map(merged).collect::<Vec<_>>(),
            [(survivor.clone(), moved.clone()), (claimer.clone(), survivor.clone())],
            "{kept:?}"
        );
        let handed = MergeRequest { origin: None, ..kept[1].clone() };
        assert_eq!(kept[1].origin, Some(merge_origin(login_position, &handed)));
        follower.stop();
    }

    /// Where events handed to another node went, the log position each hand waited for, and
    /// how they were to go; while `refusing`, no node takes them.
    #[derive(Default)]
    struct Handed {
        hands: Mutex<Vec<(Position, Vec<String>)>>,
        vias: Mutex<Vec<Via>>,
        refusing: AtomicBool,
    }

    impl Elsewhere for Handed {
        fn hand(
            &self,
            events: PartitionedEvents,
            after: Position,
            via: Via,
        ) -> futures_util::future::BoxFuture<'static, Result<crate::owned::HandedReport, String>> {
            if self.refusing.load(Ordering::SeqCst) {
                return Box::pin(async { Err("no node owns the events' partition now".to_string()) });
            }
            let ids = events.iter().map(|(_, event)| event.visitor_id.clone()).collect::<Vec<_>>();
            let accepted = ids.len();
            self.hands.lock().unwrap().push((after, ids));
            self.vias.lock().unwrap().push(via);
            Box::pin(async move { Ok(crate::owned::HandedReport { accepted, duplicates: 0, position: None }) })
        }
    }

    /// An event whose id a merge moved to another node's profile is handed to that node to be
    /// applied once it has followed the record that moved it, not the log's latest: an id
    /// stitched long ago costs the receiving node no wait.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_event_for_an_id_stitched_earlier_waits_only_for_the_record_that_stitched_it() {
        let visitors = (0..).map(|i| format!("visitor-{i}"));
        let mine = visitors.clone().next().unwrap();
        let others: Vec<String> = visitors
            .skip(1)
            .filter(|id| starling_log::partition_of(id) != starling_log::partition_of(&mine))
            .take(3)
            .collect();
        let (survivor, moved, unrelated) = (&others[0], &others[1], &others[2]);
        let log = Arc::new(starling_log::MemoryLog::new());
        let record = |profile: &str, logged: LoggedRef, changes: &[IdChange]| {
            let stamped = Stamped { logged, config: 0, independent: false, changes: changes.iter().collect() };
            log.append(&[(starling_log::partition_of(profile), &serde_json::to_vec(&stamped).unwrap())]).unwrap()[0]
        };
        let append = |profile: &str, events: &[Event]| {
            let own = IdChange::Linked { id: profile.into(), profile: profile.into(), claimed: false };
            record(profile, LoggedRef::Events { now_ms: CLOCK_MS, events: events.iter().collect() }, &[own])
        };
        // The other node's records: the second login names the email the first claimed, and the
        // survivor's partition merges the second profile into the first.
        append(survivor, &[login(survivor, 0)]);
        append(moved, &[login(moved, 1)]);
        let merge = MergeRequest {
            survivor: survivor.clone(),
            absorbed: moved.clone(),
            via: "email".into(),
            attribute: "email_hash".into(),
            event_id: None,
            origin: None,
            absorbed_state: None,
            merged_first: None,
        };
        let merged = IdChange::Merged { absorbed: moved.clone(), survivor: survivor.clone(), origin: None };
        let stitched_at = record(survivor, LoggedRef::Merge { now_ms: CLOCK_MS, merge: &merge }, &[merged]);
        let handed = Arc::new(Handed::default());
        let node = Running::handing(STITCHING, 2, log.clone(), true, Some(handed.clone()));
        node.owned.add(starling_log::partition_of(&mine));
        let entries = node.ingest.read_after(node.ingest.stored_positions()).await.unwrap();
        node.ingest.follow(&entries).await.unwrap();
        assert_eq!(node.ingest.profile_of(moved).unwrap(), *survivor);
        // The log goes on.
        let latest = (0..3).map(|n| append(unrelated, &[event(unrelated, 2 + n)])).next_back().unwrap();
        node.ingest.submit(vec![event(moved, 10), event(unrelated, 11)]).await.unwrap();
        let mut handed = handed.hands.lock().unwrap().clone();
        handed.sort();
        assert_eq!(handed, [(0, vec![unrelated.clone()]), (stitched_at, vec![moved.clone()])], "latest: {latest}");
        node.stop();
    }

    /// On a node owning some partitions, a claim it made live that a followed record written
    /// before it overtakes merges the claimer into the earlier claim's profile, of a partition
    /// another node owns: that merge, all the overtaking decides here, is kept in
    /// `handed_over` until that node applies it. (Unwritten, it was dropped: the node taking
    /// that partition next found nothing to apply, and the two profiles stayed apart.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_claim_overtaken_by_a_followed_record_keeps_its_merge_for_the_other_nodes_partition() {
        let visitors = (0..).map(|i| format!("visitor-{i}"));
        let claimer = visitors.clone().next().unwrap();
        let claimer_partition = starling_log::partition_of(&claimer);
        let earlier = visitors.skip(1).find(|id| starling_log::partition_of(id) != claimer_partition).unwrap();
        let login_as = |visitor: &str, n: i64| {
            let mut login = login(visitor, n);
            login.data.insert("email_hash".into(), "shared".into());
            login
        };
        let log = Arc::new(starling_log::MemoryLog::new());
        // The other node's claim, written first; this node has not followed it yet.
        let spread = || Running::handing(STITCHING, 2, log.clone(), true, Some(Arc::new(Handed::default())));
        let other = spread();
        other.owned.add(starling_log::partition_of(&earlier));
        other.ingest.submit(vec![event(&earlier, 0), login_as(&earlier, 1)]).await.unwrap();

        let node = spread();
        node.owned.add(claimer_partition);
        node.ingest.submit(vec![event(&claimer, 2), login_as(&claimer, 3)]).await.unwrap();
        node.ingest.materialize().await.unwrap();
        let entries = node.ingest.read_after(vec![(starling_log::partition_of(&earlier), 0)]).await.unwrap();
        node.ingest.follow(&entries).await.unwrap();
        node.ingest.materialize().await.unwrap();

        let conn = starling_store::open(&node.database).unwrap();
        let kept: Vec<(String, String)> = starling_store::handed_over(&conn)
            .unwrap()
            .into_iter()
            .map(|(_, request)| serde_json::from_str::<MergeRequest>(&request).unwrap())
            .map(|m| (m.survivor, m.absorbed))
            .collect();
        assert_eq!(kept, [(earlier.clone(), claimer.clone())], "the merge kept for the earlier claim's owner");
        // That node applies it when it follows the hand record.
        follow_others(&other).await;
        assert_eq!(other.profile(&earlier).unwrap().event_count, 4, "its two and the claimer's two");
        node.stop();
        other.stop();
    }

    /// On a node owning some partitions, what its live batches applied stays in memory until
    /// due, but the id changes it followed are written before its next live batch: a live batch
    /// that fails then derives again only its own records, from the log, and neither is lost.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_live_batch_loses_neither_what_was_followed_nor_earlier_live_batches() {
        let visitors = (0..).map(|i| format!("visitor-{i}"));
        let mine = visitors.clone().next().unwrap();
        let (my_partition, my_worker) = (starling_log::partition_of(&mine), worker_of(&mine, 2));
        // Another node's profile, applied by the same worker.
        let theirs = visitors
            .skip(1)
            .find(|id| starling_log::partition_of(id) != my_partition && worker_of(id, 2) == my_worker)
            .unwrap();
        let log = Arc::new(GatedLog::default());
        log.open();
        let node = Running::start(2, log.clone(), true);
        node.owned.add(my_partition);
        node.ingest.submit(vec![event(&mine, 0)]).await.unwrap();
        let events = [event(&theirs, 1), login(&theirs, 2)];
        let claim = IdChange::Linked { id: "their-email".into(), profile: theirs.clone(), claimed: true };
        let logged = LoggedRef::Events { now_ms: CLOCK_MS, events: events.iter().collect() };
        let payload =
            serde_json::to_vec(&Stamped { logged, config: 0, independent: false, changes: vec![&claim] }).unwrap();
        let claimed = log.append(&[(starling_log::partition_of(&theirs), &payload)]).unwrap()[0];
        let entries = node.ingest.read_after(vec![(starling_log::partition_of(&theirs), 0)]).await.unwrap();
        node.ingest.follow(&entries).await.unwrap();
        node.ingest.submit(vec![event(&mine, 3)]).await.unwrap();
        node.ingest.submit(vec![event(&mine, 4)]).await.unwrap();
        *log.refuse.lock().unwrap() = Some(my_partition);
        assert!(node.ingest.submit(vec![event(&mine, 5)]).await.is_err(), "the batch failed");
        node.ingest.materialize().await.unwrap();
        assert_eq!(node.profile(&mine).unwrap().event_count, 3, "the live batches before the failed one");
        let conn = starling_store::open(&node.database).unwrap();
        assert_eq!(starling_store::resolve_identity(&conn, "their-email").unwrap(), Some(theirs.clone()), "followed");
        assert_eq!(starling_store::claimed_at(&conn, "their-email").unwrap(), Some(claimed));
        assert!(node.profile(&theirs).is_none(), "their profile is theirs only");
        node.stop();
    }

    /// A configuration with a `views` attribute that nothing counts, and one counting `view`
    /// events into it.
    const NOT_COUNTING: &str =
        "[server]\npartitions = 2\n[[attribute]]\nname = \"views\"\nscope = \"visitor\"\ntype = \"number\"\n";
    fn counting() -> String {
        format!("{NOT_COUNTING}[[enrichment]]\nattribute = \"views\"\nop = \"increment\"\nwhen = \"event:view\"\n")
    }

    /// A restart on a changed configuration file applies the records after the stored state
    /// with the configuration they were first applied with, which this database recorded;
    /// the start's own applies from then on.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn records_are_applied_again_with_the_configuration_they_name() {
        let log = Arc::new(starling_log::MemoryLog::new());
        let restarted = Running::with_config(NOT_COUNTING, 2, log.clone(), false);
        let conn = starling_store::open(&restarted.database).unwrap();
        let version = starling_store::record_config(&conn, "counting", &counting(), 0, "start", None, true).unwrap();
        // Two views applied with the counting configuration before a crash, not yet in SQLite.
        let events = [event("visitor-0", 0), event("visitor-0", 1)];
        let logged = LoggedRef::Events { now_ms: CLOCK_MS, events: events.iter().collect() };
        let payload =
            serde_json::to_vec(&Stamped { logged, config: version, independent: false, changes: Vec::new() }).unwrap();
        log.append(&[(starling_log::partition_of("visitor-0"), &payload)]).unwrap();

        restarted.ingest.replay().await.unwrap();
        let views = |running: &Running| running.profile("visitor-0").unwrap().attributes.get("views").cloned();
        assert_eq!(views(&restarted), Some(starling_core::Value::Number(2.0)), "counted as when first applied");
        assert!(restarted.ingest.config.model().enrichments.is_empty(), "the start's configuration goes on");
        restarted.ingest.submit(vec![event("visitor-0", 2)]).await.unwrap();
        restarted.ingest.materialize().await.unwrap();
        assert_eq!(views(&restarted), Some(starling_core::Value::Number(2.0)));
        assert_eq!(restarted.profile("visitor-0").unwrap().event_count, 3);
        restarted.stop();
    }

    /// A standby applies each record with the configuration the owner applied it with, when
    /// its database recorded that one: after a change, the owner's workers switch at their
    /// next batch, so a record of the old configuration can follow one of the new.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_standby_applies_records_of_an_older_configuration_after_a_newer_with_the_older() {
        let log = Arc::new(starling_log::MemoryLog::new());
        let standby = Running::with_config(&counting(), 2, log.clone(), true);
        let conn = starling_store::open(&standby.database).unwrap();
        let old = starling_store::record_config(&conn, "old", NOT_COUNTING, 0, "start", None, true).unwrap();
        let new = starling_store::record_config(&conn, "new", &counting(), 0, "change", None, true).unwrap();
        standby.ingest.config.set_active(crate::live::Active { version: new, ..Default::default() });
        let record = |visitor: &str, config: i64| {
            let events = [event(visitor, 0)];
            let logged = LoggedRef::Events { now_ms: CLOCK_MS, events: events.iter().collect() };
            let payload =
                serde_json::to_vec(&Stamped { logged, config, independent: false, changes: Vec::new() }).unwrap();
            Entry { position: 0, partition: starling_log::partition_of(visitor), payload }
        };
        let entries: Vec<Entry> = [record("visitor-0", new), record("visitor-1", old), record("visitor-2", new)]
            .into_iter()
            .enumerate()
            .map(|(i, entry)| Entry { position: i as u64 + 1, ..entry })
            .collect();
        standby.ingest.apply_records(&entries).await.unwrap();
        standby.ingest.materialize().await.unwrap();
        let views = |visitor: &str| standby.profile(visitor).unwrap().attributes.get("views").cloned();
        assert_eq!(views("visitor-0"), Some(starling_core::Value::Number(1.0)));
        assert_eq!(views("visitor-1"), None, "applied with the configuration that did not count");
        assert_eq!(views("visitor-2"), Some(starling_core::Value::Number(1.0)));
        assert!(!standby.ingest.config.model().enrichments.is_empty(), "the standby's configuration goes on");
        standby.stop();
    }

    /// A merge handed over whose absorbed profile is not here finds nothing when it is sent
    /// again at start, and is forgotten rather than sent again at every start.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_merge_handed_over_that_finds_nothing_is_forgotten_at_start() {
        let running = Running::start(2, Arc::new(starling_log::MemoryLog::new()), false);
        let merge = MergeRequest {
            survivor: "visitor-0".into(),
            absorbed: "nobody".into(),
            via: "h".into(),
            attribute: "email_hash".into(),
            event_id: None,
            origin: Some("3.0".into()),
            absorbed_state: None,
            merged_first: None,
        };
        let mut conn = starling_store::open(&running.database).unwrap();
        let tx = Batch::begin(&mut conn).unwrap();
        tx.hand_over("3.0", &serde_json::to_string(&merge).unwrap()).unwrap();
        tx.commit().unwrap();
        running.ingest.replay().await.unwrap();
        assert!(starling_store::handed_over(&conn).unwrap().is_empty());
        running.stop();
    }

    /// A log whose appends wait until the test opens it; with `held_in_log`, only appends to
    /// that partition wait, once they are in the log (their positions taken). With `refuse`
    /// set, the next append to that partition is refused; with `losing` set too, the partition
    /// is no longer owned there (as when another node took it: the stream refuses the append).
    #[derive(Default)]
    struct GatedLog {
        log: starling_log::MemoryLog,
        held_in_log: Option<Partition>,
        refuse: Mutex<Option<Partition>>,
        losing: Mutex<Option<Arc<Owned>>>,
        /// Reads that fail before one succeeds.
        unreadable: AtomicU64,
        open: Mutex<bool>,
        opened: std::sync::Condvar,
        appends: AtomicU64,
    }

    impl GatedLog {
        fn open(&self) {
            *self.open.lock().unwrap() = true;
            self.opened.notify_all();
        }
    }

    impl EventLog for GatedLog {
        fn append(&self, records: &[(Partition, &[u8])]) -> starling_log::Result<Vec<Position>> {
            self.appends.fetch_add(1, Ordering::SeqCst);
            let mut refuse = self.refuse.lock().unwrap();
            if let Some(partition) = *refuse
                && records.iter().any(|(p, _)| *p == partition)
            {
                *refuse = None;
                if let Some(owned) = self.losing.lock().unwrap().take() {
                    owned.remove(partition);
                }
                return Err(starling_log::LogError::Remote("refused once".into()));
            }
            drop(refuse);
            let wait = || {
                let open = self.open.lock().unwrap();
                drop(self.opened.wait_while(open, |open| !*open).unwrap());
            };
            match self.held_in_log {
                None => {
                    wait();
                    self.log.append(records)
                }
                Some(held) if records.iter().any(|(partition, _)| *partition == held) => {
                    let appended = self.log.append(records);
                    wait();
                    appended
                }
                Some(_) => self.log.append(records),
            }
        }
        fn sync(&self, position: Position) -> starling_log::Result<()> {
            self.log.sync(position)
        }
        fn read(&self, after: &[(Partition, Position)], visit: &mut dyn FnMut(Entry)) -> starling_log::Result<()> {
            if self.unreadable.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok() {
                return Err(starling_log::LogError::Remote("unreadable for now".into()));
            }
            self.log.read(after, visit)
        }
        fn truncate_before(&self, position: Position) -> starling_log::Result<u64> {
            self.log.truncate_before(position)
        }
        fn seal(&self) -> starling_log::Result<()> {
            self.log.seal()
        }
        fn next_position(&self) -> Position {
            self.log.next_position()
        }
        fn continue_after(&self, position: Position) {
            self.log.continue_after(position)
        }
        fn size_bytes(&self) -> u64 {
            self.log.size_bytes()
        }
    }

    /// Two workers claim one id at once, and the claim later in the log is written first: the
    /// claim earlier in the log wins all the same, so that the log applied again (a standby, a
    /// restart), where the claims are written in log order, stitches the two alike and decides
    /// no merge the live run did not. (Before, the claim written first won: live, the first
    /// visitor merged into the second; applied again, the second into the first, and that
    /// merge was left to be sent again at a takeover.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_claim_earlier_in_the_log_wins_though_written_second() {
        let first = (0..).map(|i| format!("visitor-{i}")).find(|id| worker_of(id, 2) == 0).unwrap();
        let second = (0..).map(|i| format!("visitor-{i}")).find(|id| worker_of(id, 2) == 1).unwrap();
        let log = Arc::new(GatedLog { held_in_log: Some(starling_log::partition_of(&first)), ..Default::default() });
        let live = Running::with_config(STITCHING, 2, log.clone(), false);
        // The first login is appended and held before it is written; the second is appended
        // after it and written first.
        let held = live.ingest.send(vec![login(&first, 0)]).unwrap();
        while log.appends.load(Ordering::SeqCst) == 0 {
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        live.ingest.submit(vec![login(&second, 1)]).await.unwrap();
        log.open();
        held.durable().await.unwrap();
        // The second visitor's worker learns its claim was overtaken and merges into the first.
        for _ in 0..500 {
            live.ingest.materialize().await.unwrap();
            if live.profile(&second).is_none() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        let email = "b58996c504c5638798eb6b511e6f49af";
        let conn = starling_store::open(&live.database).unwrap();
        assert_eq!(starling_store::resolve_identity(&conn, email).unwrap(), Some(first.clone()));
        assert_eq!(starling_store::resolve_identity(&conn, &second).unwrap(), Some(first.clone()));
        assert!(live.profile(&second).is_none(), "merged into the first");
        let merged = live.profile(&first).unwrap();
        assert_eq!(merged.event_count, 2);
        assert!(starling_store::handed_over(&conn).unwrap().is_empty());
        // The merge is named after what the second record merges, as the log applied again
        // names it: the record's other merges may not take that name.
        let merge = MergeRequest {
            survivor: first.clone(),
            absorbed: second.clone(),
            via: email.into(),
            attribute: "email_hash".into(),
            event_id: None,
            origin: None,
            absorbed_state: None,
            merged_first: None,
        };
        assert!(starling_store::handoff_applied(&conn, &merge_origin(2, &merge)).unwrap());
        live.stop();

        let mut entries = Vec::new();
        let everything: Vec<(Partition, Position)> = (0..starling_log::PARTITIONS).map(|p| (p, 0)).collect();
        log.read(&everything, &mut |entry| entries.push(entry)).unwrap();
        let copy = Running::with_config(STITCHING, 2, log.clone(), true);
        copy.ingest.apply_records(&entries).await.unwrap();
        copy.ingest.materialize().await.unwrap();
        assert_eq!(copy.profile(&first).unwrap().to_json(), merged.to_json());
        assert!(copy.profile(&second).is_none());
        let conn = starling_store::open(&copy.database).unwrap();
        assert_eq!(starling_store::resolve_identity(&conn, email).unwrap(), Some(first.clone()));
        let decided_apart = starling_store::handed_over(&conn).unwrap();
        assert!(decided_apart.is_empty(), "merges the live run did not make: {decided_apart:?}");
        copy.stop();
    }

    /// A merge handed to a worker whose batch then fails (its log append refused) is applied
    /// once the worker has derived its state again, not at the next start only: the client's
    /// retry is a duplicate and decides nothing. (Fails without the merge sent again: the
    /// second visitor's profile stays apart.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_merge_whose_batch_failed_is_applied_again() {
        let first = (0..).map(|i| format!("visitor-{i}")).find(|id| worker_of(id, 2) == 0).unwrap();
        let second = (0..).map(|i| format!("visitor-{i}")).find(|id| worker_of(id, 2) == 1).unwrap();
        let log = Arc::new(GatedLog::default());
        log.open();
        let running = Running::with_config(STITCHING, 2, log.clone(), false);
        running.ingest.submit(vec![login(&first, 0)]).await.unwrap();
        // The first visitor's next record, the merge of the second into it, is refused.
        *log.refuse.lock().unwrap() = Some(starling_log::partition_of(&first));
        let second_login = Event { id: Some("second-login".into()), ..login(&second, 1) };
        let refused = running.ingest.submit(vec![second_login.clone()]).await;
        assert!(refused.is_err(), "the merge's batch failed: {refused:?}");
        assert!(log.refuse.lock().unwrap().is_none(), "the refusal was used");
        // The client sends its request again: a duplicate; the merge comes from the worker.
        let again = running.ingest.submit(vec![second_login]).await.unwrap();
        assert_eq!(again.duplicates, 1);
        for _ in 0..500 {
            running.ingest.materialize().await.unwrap();
            if running.profile(&second).is_none() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert!(running.profile(&second).is_none(), "merged into the first");
        assert_eq!(running.profile(&first).unwrap().event_count, 2);
        let conn = starling_store::open(&running.database).unwrap();
        assert!(starling_store::handed_over(&conn).unwrap().is_empty());
        running.stop();
    }

    /// A spread node over an open gated log, owning the partitions of two visitors, one on
    /// each of its two workers: (node, log, the first visitor, the second).
    fn owning_two_partitions() -> (Running, Arc<GatedLog>, String, String) {
        let ids = (0..).map(|i| format!("visitor-{i}"));
        let first = ids.clone().find(|id| worker_of(id, 2) == 0).unwrap();
        let second = ids.clone().find(|id| worker_of(id, 2) == 1).unwrap();
        let log = Arc::new(GatedLog::default());
        log.open();
        let node = Running::handing(STITCHING, 2, log.clone(), true, Some(Arc::new(Handed::default())));
        node.owned.add(starling_log::partition_of(&first));
        node.owned.add(starling_log::partition_of(&second));
        (node, log, first, second)
    }

    /// Keeps a merge of `absorbed` into `survivor` (origin `7.kept`) on `node`, as one decided
    /// for a partition it takes.
    fn keep_merge(node: &Running, survivor: &str, absorbed: &str, state: Option<Absorbed>) {
        let merge = MergeRequest {
            survivor: survivor.into(),
            absorbed: absorbed.into(),
            via: "b58996c504c5638798eb6b511e6f49af".into(),
            attribute: "email_hash".into(),
            event_id: None,
            origin: Some("7.kept".into()),
            absorbed_state: state.map(Box::new),
            merged_first: None,
        };
        let request = serde_json::to_string(&merge).unwrap();
        starling_store::keep_handed_over(&starling_store::open(&node.database).unwrap(), "7.kept", &request).unwrap();
    }

    /// Spread, a merge this node applied live as the owner of both profiles' partitions, whose
    /// batch the stream then refused (another node took the survivor's partition meanwhile),
    /// is handed on from the absorbed profile's partition, with its state, for the survivor's
    /// new owner, which never saw it. (Before, it was dropped: the two profiles stayed apart.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_merge_refused_as_its_survivors_partition_was_taken_is_handed_on() {
        let (node, log, first, second) = owning_two_partitions();
        let (survivors, absorbeds) = (starling_log::partition_of(&first), starling_log::partition_of(&second));
        node.ingest.submit(vec![login(&first, 0)]).await.unwrap();
        *log.losing.lock().unwrap() = Some(node.owned.clone());
        *log.refuse.lock().unwrap() = Some(survivors);
        let _ = node.ingest.submit(vec![login(&second, 1)]).await;
        let handed = hand_record_in(&*log, absorbeds).await.expect("a hand record in the absorbed profile's partition");
        assert!(!node.owned.owns(survivors), "the refusal took the survivor's partition");
        assert_eq!((handed.survivor.as_str(), handed.absorbed.as_str()), (first.as_str(), second.as_str()));
        let state = handed.absorbed_state.expect("the absorbed profile's state");
        assert_eq!(state.events.len(), 1, "the second visitor's login");
        node.stop();
    }

    /// Spread, a merge kept for a partition this node was taking, sent to it once taken, while
    /// another node took the partition back: it is handed on from the absorbed profile's
    /// partition, which this node owns, for the survivor's owner, which never saw it. (Before,
    /// it stayed kept here while this node's directory sent the absorbed profile's events to
    /// that node, which sent them back.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_kept_merge_whose_survivors_partition_was_taken_back_is_handed_on() {
        let (node, log, survivor, absorbed) = owning_two_partitions();
        let (survivors, absorbeds) = (starling_log::partition_of(&survivor), starling_log::partition_of(&absorbed));
        // Another visitor of the survivor's partition.
        let mut of_survivors =
            (0..).map(|i| format!("visitor-{i}")).filter(|id| starling_log::partition_of(id) == survivors);
        let blocker = of_survivors.nth(1).unwrap();
        node.ingest.submit(vec![event(&survivor, 0), event(&absorbed, 1)]).await.unwrap();
        node.ingest.materialize().await.unwrap();
        keep_merge(&node, &survivor, &absorbed, None);

        // The survivor's worker waits in an append while the kept merge is queued behind it,
        // and the survivor's partition is lost meanwhile.
        *log.open.lock().unwrap() = false;
        let appended = log.appends.load(Ordering::SeqCst);
        let _blocked = node.ingest.send(vec![event(&blocker, 2)]).unwrap();
        for _ in 0..500 {
            if log.appends.load(Ordering::SeqCst) > appended {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert!(log.appends.load(Ordering::SeqCst) > appended, "the survivor's worker appends");
        let ingest = &node.ingest;
        let sending = ingest.send_handed_over(|_| true);
        let losing = async {
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            node.owned.remove(survivors);
            log.open();
        };
        let (sent, ()) = tokio::join!(sending, losing);
        assert_eq!(sent.unwrap(), 1, "sent while the survivor's partition was owned");

        let handed = hand_record_in(&*log, absorbeds).await.expect("a hand record in the absorbed profile's partition");
        assert_eq!((handed.survivor.as_str(), handed.origin.as_deref()), (survivor.as_str(), Some("7.kept")));
        let state = handed.absorbed_state.expect("the absorbed profile's state");
        assert_eq!(state.events.len(), 1, "the absorbed profile's event");
        node.stop();
    }

    /// Spread, a merge kept with the absorbed profile's state for a partition this node took is
    /// sent once the take is done; meanwhile an event for the absorbed profile was applied to
    /// its copy here. The survivor gets that event too: when this node owns the absorbed
    /// profile's partition, the merge goes through its worker and carries the copy as it is by
    /// then; when not (a copy it holds all the same), the copy's events the state lacks go to
    /// the survivor. (Before, the carried state replaced the copy, and the event was lost.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_event_applied_to_the_absorbed_copy_before_its_kept_merge_goes_to_the_survivor() {
        for absorbeds_owned in [true, false] {
            event_before_a_kept_merge(absorbeds_owned).await;
        }
    }

    async fn event_before_a_kept_merge(absorbeds_owned: bool) {
        let (node, _log, survivor, absorbed) = owning_two_partitions();
        node.ingest.submit(vec![event_with_id(&survivor, 0), event_with_id(&absorbed, 1)]).await.unwrap();
        node.ingest.materialize().await.unwrap();
        let state = {
            let conn = starling_store::open(&node.database).unwrap();
            Absorbed {
                profile: starling_store::load_profile(&conn, &absorbed).unwrap().unwrap(),
                events: starling_store::profile_events(&conn, &absorbed).unwrap(),
                memberships: starling_store::memberships_of(&conn, &absorbed).unwrap(),
            }
        };
        keep_merge(&node, &survivor, &absorbed, Some(state));
        node.ingest.submit(vec![event_with_id(&absorbed, 2)]).await.unwrap();
        if !absorbeds_owned {
            node.ingest.materialize().await.unwrap();
            node.owned.remove(starling_log::partition_of(&absorbed));
        }

        assert_eq!(node.ingest.send_handed_over(|_| true).await.unwrap(), 1);
        node.ingest.materialize().await.unwrap();
        let conn = starling_store::open(&node.database).unwrap();
        let history = |profile: &str| -> BTreeSet<String> {
            starling_store::profile_events(&conn, profile).unwrap().into_iter().filter_map(|e| e.id).collect()
        };
        assert!(history(&absorbed).is_empty(), "absorbed's partition owned: {absorbeds_owned}");
        assert_eq!(
            history(&survivor),
            BTreeSet::from(["e-0".to_string(), "e-1".into(), "e-2".into()]),
            "absorbed's partition owned: {absorbeds_owned}"
        );
        assert_eq!(node.profile(&survivor).unwrap().event_count, 3);
        node.stop();
    }

    /// Spread, a merge kept for a partition taken, sent through its absorbed profile's worker,
    /// whose survivor's partition is lost as the merge is logged: the survivor's next owner
    /// never saw it, and this node, owning the absorbed profile's partition, hands it on from
    /// there, with the absorbed profile's state.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_kept_merge_refused_as_its_survivors_partition_is_lost_is_handed_on() {
        let (node, log, survivor, absorbed) = owning_two_partitions();
        let (survivors, absorbeds) = (starling_log::partition_of(&survivor), starling_log::partition_of(&absorbed));
        node.ingest.submit(vec![event_with_id(&survivor, 0), event_with_id(&absorbed, 1)]).await.unwrap();
        node.ingest.materialize().await.unwrap();
        keep_merge(&node, &survivor, &absorbed, None);
        *log.losing.lock().unwrap() = Some(node.owned.clone());
        *log.refuse.lock().unwrap() = Some(survivors);

        let sent = node.ingest.send_handed_over(|_| true).await;
        assert!(matches!(&sent, Err(IngestError::Failed(e)) if e.starts_with("1 of 1 not applied")), "{sent:?}");
        assert!(!node.owned.owns(survivors), "the refusal took the survivor's partition");
        let handed = hand_record_in(&*log, absorbeds).await.expect("a hand record in the absorbed profile's partition");
        assert_eq!((handed.survivor.as_str(), handed.origin.as_deref()), (survivor.as_str(), Some("7.kept")));
        let state = handed.absorbed_state.expect("the absorbed profile's state");
        assert_eq!(state.events.len(), 1, "the absorbed profile's event");
        node.stop();
    }

    /// Spread, events another node took from the intake and handed here go no further when this
    /// node's directory puts them on yet another node's profile: refused, they stay in the
    /// intake for the next try. (Handed on, they went back and forth between two nodes whose
    /// directories differed, each hop waiting on the next.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn events_handed_from_the_intake_are_not_handed_on_again() {
        let handed = Arc::new(Handed::default());
        let node = Running::handing(STITCHING, 2, Arc::new(starling_log::MemoryLog::new()), true, Some(handed.clone()));
        let (mine, theirs) = ("visitor-0", "visitor-1");
        node.owned.add(starling_log::partition_of(mine));
        assert!(!node.owned.owns_profile(theirs));

        let refused = node.ingest.submit_from(vec![event(mine, 0), event(theirs, 1)], Source::HandedIntake).await;
        assert!(refused.unwrap_err().to_string().contains("the intake keeps them"));
        assert!(handed.hands.lock().unwrap().is_empty(), "handed to no node");
        // From this node's own intake, or a client, they go on to their owner.
        node.ingest.submit_from(vec![event(theirs, 2)], Source::Intake).await.unwrap();
        assert_eq!(handed.hands.lock().unwrap().len(), 1);
        node.ingest.materialize().await.unwrap();
        assert_eq!(node.profile(mine).unwrap().event_count, 1, "its own profile's event is applied");
        node.stop();
    }

    /// A worker whose batch failed and whose recovery then could not read the log (its servers
    /// electing a leader) refuses work for a moment, then derives its state again and takes
    /// work as before. (Before, it refused all work until the next start.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_recovery_that_could_not_read_the_log_is_tried_again() {
        let visitor = "visitor-0";
        let log = Arc::new(GatedLog::default());
        log.open();
        let running = Running::start(1, log.clone(), false);
        running.ingest.submit(vec![event(visitor, 0)]).await.unwrap();
        *log.refuse.lock().unwrap() = Some(starling_log::partition_of(visitor));
        log.unreadable.store(1, Ordering::SeqCst);
        assert!(running.ingest.submit(vec![event(visitor, 1)]).await.is_err(), "the batch failed");
        assert_eq!(log.unreadable.load(Ordering::SeqCst), 0, "the recovery's read failed");
        let refused = running.ingest.submit(vec![event(visitor, 2)]).await.unwrap_err();
        assert!(refused.to_string().contains("reading the event log"), "{refused}");
        tokio::time::sleep(RECOVER_AGAIN_AFTER).await;
        running.ingest.submit(vec![event(visitor, 3)]).await.unwrap();
        running.ingest.materialize().await.unwrap();
        assert_eq!(running.profile(visitor).unwrap().event_count, 2, "the first event and the last");
        running.stop();
    }

    /// The requests a worker applies as one batch make one record per partition they touch,
    /// holding their events in the order applied; applied again into another database (a
    /// standby following, a restart), the records give the same profiles.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_batch_of_requests_is_one_record_per_partition_and_applies_again_alike() {
        let log = Arc::new(GatedLog::default());
        let running = Running::start(1, log.clone(), false);
        // Three visitors in three partitions.
        let mut visitors: Vec<String> = Vec::new();
        for id in (0..).map(|i| format!("visitor-{i}")) {
            if visitors.iter().all(|v| starling_log::partition_of(v) != starling_log::partition_of(&id)) {
                visitors.push(id);
            }
            if visitors.len() == 3 {
                break;
            }
        }
        let request = |n: i64| visitors.iter().map(|v| event(v, n)).collect::<Vec<_>>();
        // The first request's batch waits in its append while four more are queued behind it.
        let first = running.ingest.send(request(0)).unwrap();
        while log.appends.load(Ordering::SeqCst) == 0 {
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        let queued: Vec<Queued> = (1..5).map(|n| running.ingest.send(request(n)).unwrap()).collect();
        log.open();
        first.durable().await.unwrap();
        for answer in queued {
            answer.durable().await.unwrap();
        }
        running.ingest.materialize().await.unwrap();

        let mut entries = Vec::new();
        let everything: Vec<(Partition, Position)> = (0..starling_log::PARTITIONS).map(|p| (p, 0)).collect();
        log.read(&everything, &mut |entry| entries.push(entry)).unwrap();
        let events_of = |entry: &Entry| match Logged::decode(&entry.payload, entry.position).unwrap() {
            Some((Work::Events(events), _)) => events.iter().map(|e| e.timestamp_ms - CLOCK_MS).collect::<Vec<_>>(),
            _ => panic!("record {} holds no events", entry.position),
        };
        assert_eq!(entries.len(), 6, "three records for the first batch, three for the four requests after it");
        for entry in &entries[3..] {
            assert_eq!(events_of(entry), vec![1, 2, 3, 4], "the batch's events of the partition, in order");
        }

        let copy = Running::start(2, log.clone(), true);
        copy.ingest.apply_records(&entries).await.unwrap();
        copy.ingest.materialize().await.unwrap();
        for visitor in &visitors {
            let (live, applied) = (running.profile(visitor).unwrap(), copy.profile(visitor).unwrap());
            assert_eq!(applied.event_count, 5);
            assert_eq!(applied.to_json(), live.to_json(), "{visitor}");
        }
        running.stop();
        copy.stop();
    }

    #[test]
    fn the_retention_index_moves_once_per_step() {
        assert_eq!(last_seen_step(LAST_SEEN_STEP_MS + 5), LAST_SEEN_STEP_MS);
        assert_eq!(last_seen_step(2 * LAST_SEEN_STEP_MS - 1), LAST_SEEN_STEP_MS);
        assert!(last_seen_step(12_345) <= 12_345);
    }
}

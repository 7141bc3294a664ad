//! Starling on several nodes, on NATS JetStream: which node owns which virtual partition.
//!
//! Each of the 64 virtual partitions (`starling_log::partition_of`) has at most one owner at a
//! time, held as a lease in the JetStream key-value bucket `starling-partitions` (key `p<N>`,
//! replicated like the cluster's streams). A lease is a value `{node, until_ms, applied}` and
//! its KV revision is the fencing token: every renewal and every commit of the partition's
//! progress (`applied`, the log position its state includes) is a compare-and-set on the
//! revision the owner last wrote, so an owner that was paused past its lease and woke up after
//! another node took the partition finds the revision moved and cannot write ([`Fenced`]).
//!
//! Nodes announce themselves in the bucket `starling-nodes` (a heartbeat with an expiry). Every
//! node computes the same target owners from the live nodes and the current owners
//! ([`assign::assign`]: even, sticky), takes the free partitions the target gives it, renews
//! those it keeps and releases those the target gives to a node that joined.
//! A node back in contact after it could not reach the cluster (a NATS election, a network cut)
//! waits two lease periods before taking partitions from nodes whose heartbeats lapsed, since
//! those were most likely cut off the same way: ownership stays put through an outage.
//!
//! With spread placement a heartbeat also says which log position of each partition the node's
//! database holds durably: the stream forgets only what every node holds, or has a snapshot of
//! ([`Cluster::held_back`], [`Cluster::record_truncation`]).
//!
//! [`Fenced`]: ClusterError::Fenced

pub mod assign;
pub mod intake;
pub mod local;
pub mod log;
pub mod outcomes;
pub mod snapshot;
pub mod stream;

use async_nats::jetstream::{self, kv};
use bytes::Bytes;
use starling_log::{PARTITIONS, Partition, Position};
use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

const PARTITIONS_BUCKET: &str = "starling-partitions";
const NODES_BUCKET: &str = "starling-nodes";
/// How long a heartbeat is kept after it was last written: longer than the longest a node
/// may be told to wait for an absent one (`wait_for_absent`, at most 7 days).
const HEARTBEATS_KEPT: Duration = Duration::from_secs(8 * 24 * 3600);
const CONFIG_BUCKET: &str = "starling-config";
const CONFIG_KEY: &str = "active";
/// The key (in the configuration bucket) holding where the stream was last truncated.
const TRUNCATED_KEY: &str = "truncated";

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("NATS: {0}")]
    Nats(String),
    /// Another node wrote the partition's lease since this node last did: it is no longer the
    /// owner and must not write anything of the partition.
    #[error("partition {partition} is no longer this node's (another node holds its lease)")]
    Fenced { partition: Partition },
    /// The partition's log does not end where this writer expected: another node wrote to it.
    /// `last` is the id of the partition's last record (`None`: it holds none), which says
    /// whose it is.
    #[error("partition {partition}'s log has records this node has not applied (another node wrote to it)")]
    Behind { partition: Partition, last: Option<String> },
    /// The stream refused one of this node's appends for another node's record: this node is
    /// no longer the owner, whatever its view of the leases says yet, and writes nothing more.
    #[error(
        "another node wrote to partition {partition}'s log: this node is no longer its owner and writes nothing more"
    )]
    Overtaken { partition: Partition },
    /// The partition was taken again while an append waited for its lease: what the append
    /// holds was drafted without the records written since it was lost.
    #[error(
        "partition {partition} was lost and taken again while this batch waited for its lease: the batch was drafted without what was written in between"
    )]
    Refenced { partition: Partition },
    /// Another node holds an unexpired lease on the partition.
    #[error("partition {partition} is held by node `{node}`")]
    Taken { partition: Partition, node: String },
}

pub type Result<T> = std::result::Result<T, ClusterError>;

fn nats(e: impl std::fmt::Display) -> ClusterError {
    ClusterError::Nats(e.to_string())
}

/// How a node takes part.
#[derive(Debug, Clone)]
pub struct Settings {
    /// This node's name, unique in the cluster.
    pub node: String,
    /// How long a lease (and a heartbeat) lasts without renewal: how long a dead node's
    /// partitions wait before another node takes them.
    pub lease: Duration,
    /// Copies JetStream keeps of the buckets (3 on a three-server cluster).
    pub replicas: usize,
    /// The base URL of this node's HTTP API, for the other nodes.
    pub url: Option<String>,
    pub placement: Placement,
}

/// How partitions are placed on the live nodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// An even share on every node ([`assign::assign`]).
    Spread,
    /// All on one node, the others standing by ([`assign::whole`]).
    Whole,
}

/// What a node's heartbeat says.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct Heartbeat {
    until_ms: i64,
    url: Option<String>,
    #[serde(default)]
    config_version: Option<i64>,
    /// Each partition's log position the node's database holds durably (spread placement).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    stored: Option<Vec<Position>>,
}

/// A live node, as its heartbeat describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    /// The base URL of its HTTP API.
    pub url: Option<String>,
    /// The version of the configuration it runs (or, standing by, would start with).
    pub config_version: Option<i64>,
}

/// The configuration the owner runs, published for every node (bucket `starling-config`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SharedConfig {
    /// The owner's configuration version (its database's count of configurations applied).
    pub version: i64,
    pub sha256: String,
    /// The file's text.
    pub text: String,
}

/// What the bucket holds for a partition.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct Holding {
    node: String,
    until_ms: i64,
    /// The log position the owner's committed state of the partition includes.
    applied: Position,
}

/// A partition this node holds: valid while `until_ms` has not passed and `revision` is the
/// bucket's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub partition: Partition,
    /// The fencing token: the KV revision this node last wrote.
    pub revision: u64,
    pub until_ms: i64,
    pub applied: Position,
}

/// The current holder of a partition, as the bucket says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    pub node: String,
    pub until_ms: i64,
    pub applied: Position,
    pub revision: u64,
}

pub(crate) fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

fn key(partition: Partition) -> String {
    format!("p{partition}")
}

/// A connection to the cluster's buckets, as one node.
pub struct Cluster {
    settings: Settings,
    js: jetstream::Context,
    partitions: kv::Store,
    nodes: kv::Store,
    config: kv::Store,
    /// The configuration version this node runs, for its heartbeat.
    running: Mutex<Option<i64>>,
    /// What this node's database holds durably of each partition, for its heartbeat.
    stored: Mutex<Option<Vec<Position>>>,
}

impl Cluster {
    /// Connects to the NATS servers at `urls` and opens (creating them the first time) the
    /// buckets.
    pub async fn connect(urls: &[String], settings: Settings) -> Result<Cluster> {
        let addresses: Vec<async_nats::ServerAddr> =
            urls.iter().map(|u| u.parse().map_err(nats)).collect::<Result<_>>()?;
        let client = async_nats::ConnectOptions::new()
            .name(format!("starling {}", settings.node))
            .retry_on_initial_connect()
            .connect(addresses)
            .await
            .map_err(nats)?;
        let js = jetstream::new(client);
        let bucket = |name: &str| kv::Config {
            bucket: name.to_string(),
            history: 1,
            num_replicas: settings.replicas,
            storage: jetstream::stream::StorageType::File,
            ..Default::default()
        };
        let partitions = js.create_or_update_key_value(bucket(PARTITIONS_BUCKET)).await.map_err(nats)?;
        // A heartbeat not written for longer than any node waits for an absent one goes (names
        // of nodes that never came back would otherwise pile up, and every round reads them).
        let heartbeats = kv::Config { max_age: HEARTBEATS_KEPT, ..bucket(NODES_BUCKET) };
        let nodes = js.create_or_update_key_value(heartbeats).await.map_err(nats)?;
        let config = js.create_or_update_key_value(bucket(CONFIG_BUCKET)).await.map_err(nats)?;
        Ok(Cluster { settings, js, partitions, nodes, config, running: Mutex::new(None), stored: Mutex::new(None) })
    }

    pub fn node(&self) -> &str {
        &self.settings.node
    }

    /// Opens the cluster's event stream (see [`stream`]), keeping repeated record ids out for
    /// `dedup`.
    pub async fn events(&self, dedup: Duration) -> Result<stream::EventStream> {
        stream::EventStream::open(self.js.clone(), self.settings.replicas, dedup).await
    }

    /// Opens the stream of events taken in while no node serves (see [`intake`]), keeping
    /// repeated ids out for `dedup`.
    pub async fn intake(&self, dedup: Duration) -> Result<intake::Intake> {
        intake::Intake::open(self.js.clone(), self.settings.replicas, dedup).await
    }

    /// Opens the stream of delivery outcomes (see [`outcomes`]).
    pub async fn outcomes(&self) -> Result<outcomes::OutcomeStream> {
        outcomes::OutcomeStream::open(self.js.clone(), self.settings.replicas).await
    }

    /// Opens the snapshot store (see [`snapshot`]).
    pub async fn snapshots(&self) -> Result<snapshot::Snapshots> {
        snapshot::Snapshots::open(&self.js, self.settings.replicas).await
    }

    /// The NATS server leading the leases' replicated stream (its Raft leader), if known.
    pub async fn leases_leader(&self) -> Result<Option<String>> {
        let info = self.partitions.stream.get_info().await.map_err(nats)?;
        Ok(info.cluster.and_then(|c| c.leader))
    }

    /// Says this node is alive for another lease period.
    pub async fn heartbeat(&self) -> Result<()> {
        let beat = Heartbeat {
            until_ms: now_ms() + self.settings.lease.as_millis() as i64,
            url: self.settings.url.clone(),
            config_version: *self.running.lock().expect("running configuration"),
            stored: self.stored.lock().expect("stored positions").clone(),
        };
        let value = serde_json::to_vec(&beat).expect("a heartbeat serializes");
        self.nodes.put(&self.settings.node, Bytes::from(value)).await.map_err(nats)?;
        Ok(())
    }

    /// Says this node is gone, removing its heartbeat: the others stop counting on it at once.
    pub async fn leave(&self) -> Result<()> {
        self.nodes.purge(&self.settings.node).await.map_err(nats)
    }

    /// Says which configuration version this node runs (in its next heartbeats).
    pub fn set_running_config(&self, version: i64) {
        *self.running.lock().expect("running configuration") = Some(version);
    }

    /// Says (in its next heartbeats) which log position of each partition this node's database
    /// holds durably.
    pub fn set_stored(&self, positions: &[(Partition, Position)]) {
        let mut stored = vec![0; PARTITIONS as usize];
        for &(partition, position) in positions {
            stored[partition as usize] = position;
        }
        *self.stored.lock().expect("stored positions") = Some(stored);
    }

    /// For each partition, the log position every node's database holds durably: the nodes
    /// live, and those whose heartbeat lapsed less than `absent_for` ago without leaving (paused,
    /// cut off, or restarting after a crash), which go on from their last word. `None` while one
    /// of them has not said (a node starting), or none has.
    pub async fn held_back(&self, absent_for: Duration) -> Result<Option<Vec<Position>>> {
        let since = now_ms() - absent_for.as_millis() as i64;
        let mut held: Option<Vec<Position>> = None;
        for (_, beat) in self.heartbeats().await? {
            // A node that left cleanly (its heartbeat removed) restores the latest snapshot if
            // it is behind it.
            if beat.until_ms <= since {
                continue;
            }
            let Some(stored) = beat.stored else { return Ok(None) };
            let held = held.get_or_insert_with(|| vec![Position::MAX; PARTITIONS as usize]);
            for (held, stored) in held.iter_mut().zip(stored) {
                *held = (*held).min(stored);
            }
        }
        Ok(held)
    }

    /// Records that the stream forgets each partition's records before `before` (never less
    /// than it recorded already); recorded before the records go, so that a reader that finds
    /// it behind this after a read knows the read may have missed records.
    pub async fn record_truncation(&self, before: &[Position]) -> Result<()> {
        let mut truncated = self.truncated().await?;
        truncated.resize(PARTITIONS as usize, 0);
        for (truncated, before) in truncated.iter_mut().zip(before) {
            *truncated = (*truncated).max(*before);
        }
        let value = serde_json::to_vec(&truncated).expect("positions serialize");
        self.config.put(TRUNCATED_KEY, Bytes::from(value)).await.map_err(nats)?;
        Ok(())
    }

    /// Where the stream forgot each partition's records before (empty: nowhere yet).
    pub async fn truncated(&self) -> Result<Vec<Position>> {
        match self.config.get(TRUNCATED_KEY).await.map_err(nats)? {
            Some(value) => serde_json::from_slice(&value).map_err(nats),
            None => Ok(Vec::new()),
        }
    }

    /// Publishes the configuration the owner runs.
    pub async fn publish_config(&self, config: &SharedConfig) -> Result<()> {
        let value = serde_json::to_vec(config).expect("a configuration serializes");
        self.config.put(CONFIG_KEY, Bytes::from(value)).await.map_err(nats)?;
        Ok(())
    }

    /// The configuration the owner last published.
    pub async fn shared_config(&self) -> Result<Option<SharedConfig>> {
        match self.config.get(CONFIG_KEY).await.map_err(nats)? {
            Some(value) => Ok(Some(serde_json::from_slice(&value).map_err(nats)?)),
            None => Ok(None),
        }
    }

    /// Every node's last heartbeat, by name.
    async fn heartbeats(&self) -> Result<BTreeMap<String, Heartbeat>> {
        use futures_util::TryStreamExt;
        let names: Vec<String> = self.nodes.keys().await.map_err(nats)?.try_collect().await.map_err(nats)?;
        let mut beats = BTreeMap::new();
        for name in names {
            if let Some(value) = self.nodes.get(&name).await.map_err(nats)?
                && let Ok(beat) = serde_json::from_slice::<Heartbeat>(&value)
            {
                beats.insert(name, beat);
            }
        }
        Ok(beats)
    }

    /// The nodes whose heartbeat has not expired, by name.
    pub async fn live_peers(&self) -> Result<BTreeMap<String, Peer>> {
        let now = now_ms();
        Ok(self
            .heartbeats()
            .await?
            .into_iter()
            .filter(|(_, beat)| beat.until_ms > now)
            .map(|(name, beat)| (name, Peer { url: beat.url, config_version: beat.config_version }))
            .collect())
    }

    async fn holding(&self, partition: Partition) -> Result<Option<(Holding, u64)>> {
        let Some(entry) = self.partitions.entry(key(partition)).await.map_err(nats)? else { return Ok(None) };
        if entry.operation != kv::Operation::Put {
            return Ok(None);
        }
        let holding = serde_json::from_slice(&entry.value).map_err(nats)?;
        Ok(Some((holding, entry.revision)))
    }

    /// Every partition's last holder, whether its lease has expired or not.
    pub async fn holders(&self) -> Result<BTreeMap<Partition, Owner>> {
        let mut holders = BTreeMap::new();
        for partition in 0..PARTITIONS {
            if let Some((h, revision)) = self.holding(partition).await? {
                holders.insert(partition, Owner { node: h.node, until_ms: h.until_ms, applied: h.applied, revision });
            }
        }
        Ok(holders)
    }

    /// The holder of `partition` whose lease has not expired, if any (one read).
    pub async fn owner_of(&self, partition: Partition) -> Result<Option<Owner>> {
        let now = now_ms();
        Ok(self.holding(partition).await?.and_then(|(h, revision)| {
            (h.until_ms > now).then_some(Owner { node: h.node, until_ms: h.until_ms, applied: h.applied, revision })
        }))
    }

    /// Every partition's holder whose lease has not expired.
    pub async fn owners(&self) -> Result<BTreeMap<Partition, Owner>> {
        let now = now_ms();
        Ok(self.holders().await?.into_iter().filter(|(_, o)| o.until_ms > now).collect())
    }

    /// Takes `partition` if no other node holds an unexpired lease on it. The lease keeps the
    /// position the last owner committed.
    pub async fn acquire(&self, partition: Partition) -> Result<Lease> {
        let until_ms = now_ms() + self.settings.lease.as_millis() as i64;
        let written = match self.holding(partition).await? {
            Some((h, _)) if h.node != self.settings.node && h.until_ms > now_ms() => {
                return Err(ClusterError::Taken { partition, node: h.node });
            }
            Some((h, revision)) => {
                let holding = Holding { node: self.settings.node.clone(), until_ms, applied: h.applied };
                self.partitions
                    .update(key(partition), encode(&holding), revision)
                    .await
                    .map(|revision| (revision, h.applied))
                    .map_err(|e| self.lost_race(partition, e))
            }
            None => {
                let holding = Holding { node: self.settings.node.clone(), until_ms, applied: 0 };
                match self.partitions.create(key(partition), encode(&holding)).await {
                    Ok(revision) => Ok((revision, 0)),
                    Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {
                        Err(ClusterError::Taken { partition, node: "another node".into() })
                    }
                    Err(e) => Err(nats(e)),
                }
            }
        };
        let (revision, applied) = written?;
        Ok(Lease { partition, revision, until_ms, applied })
    }

    fn lost_race(&self, partition: Partition, e: kv::UpdateError) -> ClusterError {
        if e.kind() == kv::UpdateErrorKind::WrongLastRevision {
            ClusterError::Taken { partition, node: "another node".into() }
        } else {
            nats(e)
        }
    }

    /// Writes the lease anew (for another lease period, with `applied`), only if this node's
    /// last write is still the bucket's: the fencing check.
    async fn write(&self, lease: &mut Lease, until_ms: i64, applied: Position) -> Result<()> {
        let holding = Holding { node: self.settings.node.clone(), until_ms, applied };
        let mut revision = lease.revision;
        // Twice at most: an earlier write of this node may have been stored with its answer lost.
        for _ in 0..2 {
            match self.partitions.update(key(lease.partition), encode(&holding), revision).await {
                Ok(written) => {
                    *lease = Lease { partition: lease.partition, revision: written, until_ms, applied };
                    return Ok(());
                }
                Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => {
                    // Only this node writes its own name: if the bucket holds it, the write that
                    // moved the revision was this node's (its acknowledgement lost in an
                    // election), not another node's takeover.
                    match self.holding(lease.partition).await? {
                        Some((current, stored)) if current.node == self.settings.node && stored != revision => {
                            revision = stored;
                        }
                        _ => return Err(ClusterError::Fenced { partition: lease.partition }),
                    }
                }
                Err(e) => return Err(nats(e)),
            }
        }
        Err(ClusterError::Fenced { partition: lease.partition })
    }

    /// Extends the lease for another period.
    pub async fn renew(&self, lease: &mut Lease) -> Result<()> {
        let until = now_ms() + self.settings.lease.as_millis() as i64;
        self.write(lease, until, lease.applied).await
    }

    /// Records that the partition's state includes the log up to `applied` (and renews): what a
    /// later owner restores from. Refused with [`ClusterError::Fenced`] once another node took
    /// the partition.
    pub async fn commit(&self, lease: &mut Lease, applied: Position) -> Result<()> {
        let until = now_ms() + self.settings.lease.as_millis() as i64;
        self.write(lease, until, applied).await
    }

    /// Gives the partition up at once (its lease expires now), keeping its committed position.
    pub async fn release(&self, mut lease: Lease) -> Result<()> {
        let applied = lease.applied;
        self.write(&mut lease, 0, applied).await
    }
}

fn encode(holding: &Holding) -> Bytes {
    Bytes::from(serde_json::to_vec(holding).expect("a holding serializes"))
}

/// What a round of [`Ownership::tick`] changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Changes {
    pub gained: Vec<Partition>,
    /// Given to a node that joined.
    pub released: Vec<Partition>,
    /// Taken by another node while this one was not renewing (paused, cut off).
    pub lost: Vec<Partition>,
}

/// This node's share of the partitions, kept by calling [`Ownership::tick`] a few times per
/// lease period.
pub struct Ownership {
    cluster: Cluster,
    held: Mutex<BTreeMap<Partition, Lease>>,
    /// Whether the last round failed to reach the cluster.
    cut_off: AtomicBool,
    /// Until when (ms) this node, back in contact after being cut off, leaves alone the
    /// partitions of nodes whose heartbeats lapsed: they were most likely cut off too.
    settling_until_ms: AtomicI64,
    /// The live nodes the last round read (none if it failed).
    peers: Mutex<Option<BTreeMap<String, Peer>>>,
    /// Each partition's owner as the last round read the leases, with what the round itself
    /// renewed, released and took (none if it failed).
    owners: Mutex<Option<BTreeMap<Partition, Owner>>>,
    /// When (ms) the round under way started (0: none is), and how long the last one took.
    round_started_ms: AtomicI64,
    last_round_ms: AtomicI64,
}

impl Ownership {
    pub fn new(cluster: Cluster) -> Ownership {
        Ownership {
            cluster,
            held: Mutex::default(),
            cut_off: AtomicBool::new(false),
            settling_until_ms: AtomicI64::new(0),
            peers: Mutex::default(),
            owners: Mutex::default(),
            round_started_ms: AtomicI64::new(0),
            last_round_ms: AtomicI64::new(0),
        }
    }

    /// The live nodes as the last round read them, `None` if it failed: what a node
    /// publishes of the cluster needs no second read of every heartbeat.
    pub fn live_peers(&self) -> Option<BTreeMap<String, Peer>> {
        self.peers.lock().expect("live peers").clone()
    }

    /// Each partition's owner whose lease had not expired as the last round read the leases,
    /// with what the round changed itself; `None` if it failed. What a node
    /// publishes of the cluster needs no second read of every lease.
    pub fn owners(&self) -> Option<BTreeMap<Partition, Owner>> {
        self.owners.lock().expect("owners").clone()
    }

    pub fn cluster(&self) -> &Cluster {
        &self.cluster
    }

    /// Whether a round has been under way for longer than half a lease period: it waits on
    /// servers that do not answer (a round takes milliseconds, a second on a loaded machine).
    pub fn round_stuck(&self) -> bool {
        let started = self.round_started_ms.load(Ordering::SeqCst);
        started != 0 && now_ms() - started > self.cluster.settings.lease.as_millis() as i64 / 2
    }

    /// The margin before a lease expires within which `held` no longer counts it.
    fn margin_ms(&self) -> i64 {
        (self.cluster.settings.lease.as_millis() / 5) as i64
    }

    /// The partitions this node may act for now: held, with a lease that has not expired by this
    /// node's clock (less a margin for the time a write to the bucket takes).
    pub fn held(&self) -> Vec<Partition> {
        let margin = self.margin_ms();
        let now = now_ms();
        let held = self.held.lock().expect("held leases");
        held.values().filter(|l| l.until_ms - margin > now).map(|l| l.partition).collect()
    }

    /// The partitions whose leases this node holds, expired by its clock or not: a lease
    /// another node took (found at a renewal) or released is no longer among them.
    pub fn leased(&self) -> Vec<Partition> {
        self.held.lock().expect("held leases").keys().copied().collect()
    }

    /// The lease of a held partition, for committing progress.
    pub fn lease(&self, partition: Partition) -> Option<Lease> {
        self.held.lock().expect("held leases").get(&partition).cloned()
    }

    /// Records progress of a held partition; a fenced commit drops the lease.
    pub async fn commit(&self, partition: Partition, applied: Position) -> Result<()> {
        let Some(mut lease) = self.lease(partition) else { return Err(ClusterError::Fenced { partition }) };
        let result = self.cluster.commit(&mut lease, applied).await;
        let mut held = self.held.lock().expect("held leases");
        match &result {
            Ok(()) => {
                held.insert(partition, lease);
            }
            Err(ClusterError::Fenced { .. }) => {
                held.remove(&partition);
            }
            Err(_) => {}
        }
        result
    }

    /// Gives up every partition this node holds (a graceful stop): another node takes them at
    /// once instead of after their leases lapse.
    pub async fn release_all(&self) -> Result<()> {
        let held: Vec<Lease> = std::mem::take(&mut *self.held.lock().expect("held leases")).into_values().collect();
        for lease in held {
            self.cluster.release(lease).await?;
        }
        self.cluster.leave().await
    }

    /// One round: heartbeat, then renew what this node keeps, release what the target gives to
    /// another node, and take the free partitions the target gives this one.
    pub async fn tick(&self) -> Result<Changes> {
        let started = now_ms();
        self.round_started_ms.store(started, Ordering::SeqCst);
        let round = self.round().await;
        self.round_started_ms.store(0, Ordering::SeqCst);
        self.last_round_ms.store(now_ms() - started, Ordering::SeqCst);
        self.cut_off.store(round.is_err(), Ordering::SeqCst);
        if round.is_err() {
            *self.peers.lock().expect("live peers") = None;
            *self.owners.lock().expect("owners") = None;
        }
        round
    }

    async fn round(&self) -> Result<Changes> {
        self.cluster.heartbeat().await?;
        if self.cut_off.load(Ordering::SeqCst) {
            // A node that could not reach the cluster cannot tell a dead node from one that lost
            // contact as it did (a NATS election): it waits two lease periods for the others'
            // heartbeats before taking their lapsed partitions.
            let settle = 2 * self.cluster.settings.lease.as_millis() as i64;
            self.settling_until_ms.store(now_ms() + settle, Ordering::SeqCst);
        }
        let peers = self.cluster.live_peers().await?;
        let live: Vec<String> = peers.keys().cloned().collect();
        *self.peers.lock().expect("live peers") = Some(peers);
        let holders = self.cluster.holders().await?;
        let now = now_ms();
        let settling = now < self.settling_until_ms.load(Ordering::SeqCst);
        // A partition stays with its last holder while that node is live, even if its lease
        // lapsed (a pause, a NATS election longer than the lease): it takes the lease back.
        let current: BTreeMap<Partition, String> = holders
            .iter()
            .filter(|(_, o)| o.until_ms > now || live.contains(&o.node))
            .map(|(p, o)| (*p, o.node.clone()))
            .collect();
        let mut owners: BTreeMap<Partition, Owner> =
            holders.iter().filter(|(_, o)| o.until_ms > now).map(|(p, o)| (*p, o.clone())).collect();
        // What the round does to the leases, laid over what it read of them.
        let mut owned_now: BTreeMap<Partition, Option<Owner>> = BTreeMap::new();
        let target = match self.cluster.settings.placement {
            Placement::Spread => assign::assign(&live, &current),
            Placement::Whole => assign::whole(&live, &current),
        };
        let me = self.cluster.node().to_string();
        // A lease is kept as it is if it will still have more than the margin of `held` (and a
        // tenth of the period to spare) once the next round has renewed it: rounds come every
        // quarter period plus their own time, and a round's renewal comes up to a round's time
        // after it starts. Each renewal is a replicated, synced write: while rounds are quick, a
        // lease is renewed every other round; on a loaded machine, every round.
        let lease_ms = self.cluster.settings.lease.as_millis() as i64;
        let last_round = self.last_round_ms.load(Ordering::SeqCst);
        let renew_within = lease_ms / 4 + 2 * last_round + self.margin_ms() + lease_ms / 10;
        let mut changes = Changes::default();
        let held: Vec<Lease> = self.held.lock().expect("held leases").values().cloned().collect();
        for mut lease in held {
            let partition = lease.partition;
            let result = if target.get(&partition) == Some(&me) {
                // No other node may take a lease before it lapses.
                if lease.until_ms - now_ms() > renew_within {
                    Ok(Some(lease))
                } else {
                    self.cluster.renew(&mut lease).await.map(|()| Some(lease))
                }
            } else {
                changes.released.push(partition);
                self.cluster.release(lease).await.map(|()| None)
            };
            let mut held = self.held.lock().expect("held leases");
            match result {
                Ok(Some(lease)) => {
                    owned_now.insert(partition, Some(self.owner(&lease)));
                    held.insert(partition, lease);
                }
                Ok(None) => {
                    owned_now.insert(partition, None);
                    held.remove(&partition);
                }
                Err(ClusterError::Fenced { .. }) => {
                    // Another node's now; which one, the next round reads.
                    owned_now.insert(partition, None);
                    held.remove(&partition);
                    changes.released.retain(|p| *p != partition);
                    changes.lost.push(partition);
                }
                Err(e) => return Err(e),
            }
        }
        for (partition, node) in &target {
            let free = owners.get(partition).is_none_or(|o| o.node == me)
                && !(settling && holders.get(partition).is_some_and(|o| o.node != me));
            if *node != me || !free || self.held.lock().expect("held leases").contains_key(partition) {
                continue;
            }
            match self.cluster.acquire(*partition).await {
                Ok(lease) => {
                    owned_now.insert(*partition, Some(self.owner(&lease)));
                    self.held.lock().expect("held leases").insert(*partition, lease);
                    changes.gained.push(*partition);
                }
                Err(ClusterError::Taken { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        for (partition, owner) in owned_now {
            match owner {
                Some(owner) => owners.insert(partition, owner),
                None => owners.remove(&partition),
            };
        }
        *self.owners.lock().expect("owners") = Some(owners);
        Ok(changes)
    }

    /// `lease` as its owner, this node.
    fn owner(&self, lease: &Lease) -> Owner {
        Owner {
            node: self.cluster.node().to_string(),
            until_ms: lease.until_ms,
            applied: lease.applied,
            revision: lease.revision,
        }
    }
}

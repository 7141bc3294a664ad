//! Snapshots of the derived state in the JetStream object store (bucket `starling-snapshots`,
//! replicated like the stream): a new owner restores the latest instead of deriving the state
//! from the whole stream, then applies only the records after the positions it includes.

use crate::{ClusterError, Result, nats};
use async_nats::jetstream::{self, object_store};
use starling_log::{Partition, Position};
use std::path::Path;
use tokio::io::AsyncWriteExt;

const BUCKET: &str = "starling-snapshots";
/// The object's metadata key holding the last log position the snapshot includes.
const COVERS: &str = "covers";
/// The metadata key holding each partition's position (`partition:position,...`).
const POSITIONS: &str = "positions";
/// The metadata key holding the partitions whose whole state a snapshot holds (`1,2,...`):
/// spread, a node's snapshot holds its own partitions whole and of the others the ids only.
const WHOLE: &str = "whole";
/// The prefix of the names of spread nodes' snapshots (then the node's name).
const NODE_PREFIX: &str = "node.";

/// The log positions a snapshot includes, by partition.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Covered(pub Vec<(Partition, Position)>);

impl Covered {
    /// The last position any partition reached.
    pub fn last(&self) -> Position {
        self.0.iter().map(|(_, p)| *p).max().unwrap_or(0)
    }

    /// The position `partition` reached (0: none of its records).
    pub fn of(&self, partition: Partition) -> Position {
        self.0.iter().find(|(p, _)| *p == partition).map_or(0, |(_, position)| *position)
    }

    fn encode(&self) -> String {
        self.0.iter().map(|(p, position)| format!("{p}:{position}")).collect::<Vec<_>>().join(",")
    }

    fn decode(text: &str) -> Result<Covered> {
        let pair = |item: &str| -> Option<(Partition, Position)> {
            let (p, position) = item.split_once(':')?;
            Some((p.parse().ok()?, position.parse().ok()?))
        };
        let pairs = text.split(',').filter(|item| !item.is_empty()).map(|item| {
            pair(item).ok_or_else(|| ClusterError::Nats(format!("a snapshot's positions are unreadable: `{item}`")))
        });
        Ok(Covered(pairs.collect::<Result<_>>()?))
    }
}

/// A snapshot stored by a spread node.
#[derive(Debug, Clone)]
pub struct NodeSnapshot {
    pub name: String,
    pub covered: Covered,
    /// The partitions whose whole state it holds.
    pub whole: Vec<Partition>,
}

/// The name of node `node`'s snapshot.
pub fn node_snapshot(node: &str) -> String {
    format!("{NODE_PREFIX}{node}")
}

pub struct Snapshots {
    store: object_store::ObjectStore,
}

impl Snapshots {
    pub(crate) async fn open(js: &jetstream::Context, replicas: usize) -> Result<Snapshots> {
        let store = match js.get_object_store(BUCKET).await {
            Ok(store) => store,
            Err(_) => js
                .create_object_store(object_store::Config {
                    bucket: BUCKET.to_string(),
                    num_replicas: replicas,
                    storage: jetstream::stream::StorageType::File,
                    ..Default::default()
                })
                .await
                .map_err(nats)?,
        };
        Ok(Snapshots { store })
    }

    /// Stores the file at `path` as snapshot `name`, which includes the log up to `covered`
    /// and holds the whole state of partitions `whole`.
    pub async fn put(&self, name: &str, path: &Path, covered: &Covered, whole: &[Partition]) -> Result<()> {
        let mut file = tokio::fs::File::open(path).await.map_err(nats)?;
        let whole = whole.iter().map(|p| p.to_string()).collect::<Vec<_>>().join(",");
        let meta = object_store::ObjectMetadata {
            name: name.to_string(),
            metadata: [
                (COVERS.to_string(), covered.last().to_string()),
                (POSITIONS.to_string(), covered.encode()),
                (WHOLE.to_string(), whole),
            ]
            .into(),
            ..Default::default()
        };
        self.store.put(meta, &mut file).await.map_err(nats)?;
        Ok(())
    }

    /// The log positions snapshot `name` includes (none: there is no snapshot, or one stored
    /// without its partitions' positions).
    pub async fn covers(&self, name: &str) -> Result<Option<Covered>> {
        match self.store.info(name).await {
            Ok(info) if !info.deleted => info.metadata.get(POSITIONS).map(|text| Covered::decode(text)).transpose(),
            Ok(_) => Ok(None),
            Err(e) if e.kind() == object_store::InfoErrorKind::NotFound => Ok(None),
            Err(e) => Err(nats(e)),
        }
    }

    /// The spread nodes' snapshots.
    pub async fn of_nodes(&self) -> Result<Vec<NodeSnapshot>> {
        use futures_util::StreamExt;
        let mut listed = self.store.list().await.map_err(nats)?;
        let mut found = Vec::new();
        while let Some(info) = listed.next().await {
            let info = info.map_err(nats)?;
            if info.deleted || !info.name.starts_with(NODE_PREFIX) {
                continue;
            }
            let Some(positions) = info.metadata.get(POSITIONS) else { continue };
            let whole = info.metadata.get(WHOLE).map(String::as_str).unwrap_or_default();
            let whole = whole.split(',').filter_map(|p| p.parse().ok()).collect();
            found.push(NodeSnapshot { name: info.name.clone(), covered: Covered::decode(positions)?, whole });
        }
        Ok(found)
    }

    /// Writes snapshot `name` into the new file `to`; returns the positions it includes.
    pub async fn fetch(&self, name: &str, to: &Path) -> Result<Option<Covered>> {
        let Some(covers) = self.covers(name).await? else { return Ok(None) };
        let mut object = self.store.get(name).await.map_err(nats)?;
        let mut file = tokio::fs::File::create(to).await.map_err(nats)?;
        tokio::io::copy(&mut object, &mut file).await.map_err(nats)?;
        file.flush().await.map_err(nats)?;
        file.sync_all().await.map_err(nats)?;
        Ok(Some(covers))
    }
}

//! Snapshots of the derived state in the JetStream object store (bucket `starling-snapshots`,
//! replicated like the stream): a new owner restores the latest instead of deriving the state
//! from the whole stream, then applies only the records after the positions it includes.

use crate::{Result, nats};
use async_nats::jetstream::{self, object_store};
use starling_log::Position;
use std::path::Path;
use tokio::io::AsyncWriteExt;

const BUCKET: &str = "starling-snapshots";
/// The object's metadata key holding the last log position the snapshot includes.
const COVERS: &str = "covers";

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

    /// Stores the file at `path` as snapshot `name`, which includes the log up to `covers`.
    pub async fn put(&self, name: &str, path: &Path, covers: Position) -> Result<()> {
        let mut file = tokio::fs::File::open(path).await.map_err(nats)?;
        let meta = object_store::ObjectMetadata {
            name: name.to_string(),
            metadata: [(COVERS.to_string(), covers.to_string())].into(),
            ..Default::default()
        };
        self.store.put(meta, &mut file).await.map_err(nats)?;
        Ok(())
    }

    /// The last log position snapshot `name` includes (none: there is no snapshot).
    pub async fn covers(&self, name: &str) -> Result<Option<Position>> {
        match self.store.info(name).await {
            Ok(info) if !info.deleted => Ok(info.metadata.get(COVERS).and_then(|c| c.parse().ok())),
            Ok(_) => Ok(None),
            Err(e) if e.kind() == object_store::InfoErrorKind::NotFound => Ok(None),
            Err(e) => Err(nats(e)),
        }
    }

    /// Writes snapshot `name` into the new file `to`; returns the position it includes.
    pub async fn fetch(&self, name: &str, to: &Path) -> Result<Option<Position>> {
        let Some(covers) = self.covers(name).await? else { return Ok(None) };
        let mut object = self.store.get(name).await.map_err(nats)?;
        let mut file = tokio::fs::File::create(to).await.map_err(nats)?;
        tokio::io::copy(&mut object, &mut file).await.map_err(nats)?;
        file.flush().await.map_err(nats)?;
        file.sync_all().await.map_err(nats)?;
        Ok(Some(covers))
    }
}

//! A standby's copy of the engine's state. The standby applies the stream as it grows, the way
//! a start applies the log after the stored state, into a database of its own; when it takes
//! the partitions over, only what was written since its last round is left to apply. It
//! delivers nothing and writes nothing to the stream: the owner decides, the follower repeats.

use crate::telemetry::Telemetry;
use crate::{Options, ServerError, delivery, live, pipeline};
use starling_log::{Entry, EventLog, LogError, Partition, Position};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// A log another node writes, read here.
struct ReadOnly(Arc<dyn EventLog>);

impl EventLog for ReadOnly {
    fn append(&self, _records: &[(Partition, &[u8])]) -> starling_log::Result<Vec<Position>> {
        Err(LogError::Remote("a standby does not write to the stream".into()))
    }

    fn sync(&self, _position: Position) -> starling_log::Result<()> {
        Ok(())
    }

    fn read(&self, after: &[(Partition, Position)], visit: &mut dyn FnMut(Entry)) -> starling_log::Result<()> {
        self.0.read(after, visit)
    }

    fn truncate_before(&self, _position: Position) -> starling_log::Result<u64> {
        Ok(0)
    }

    fn seal(&self) -> starling_log::Result<()> {
        Ok(())
    }

    fn next_position(&self) -> Position {
        self.0.next_position()
    }

    fn continue_after(&self, _position: Position) {}

    fn size_bytes(&self) -> u64 {
        self.0.size_bytes()
    }
}

pub struct Follower {
    ingest: pipeline::Ingest,
    workers: Vec<std::thread::JoinHandle<()>>,
    /// The last position applied in each partition.
    positions: HashMap<Partition, Position>,
    /// Checkpoints the WAL the workers' commits grow.
    checkpoints: Arc<Mutex<rusqlite::Connection>>,
}

impl Follower {
    /// Loads the plugins (compiling them into the cache a takeover loads them from) and starts
    /// a pipeline on the database that follows `log`.
    pub fn start(options: &Options, log: Arc<dyn EventLog>) -> Result<Follower, ServerError> {
        let model = Arc::new(options.model.clone());
        let database = options.database.clone();
        drop(starling_store::open(&database)?);
        let plugins =
            Arc::new(crate::plugin_host(&model, &starling_store::blob_dir(&database), &options.trusted_keys)?);
        if let Some(dir) = &options.plugins {
            plugins.load_dir(dir, &model.plugin_config)?;
        }
        let telemetry = Arc::new(Telemetry::new());
        let clock = crate::system_clock;
        let shared = pipeline::Shared {
            config: Arc::new(live::Live::new(model.clone(), None)),
            plugins: plugins.clone(),
            runtime: tokio::runtime::Handle::current(),
            // No lane runs: the owner delivers.
            lanes: Arc::new(delivery::Lanes::new(plugins, database.clone(), clock, telemetry.clone())),
            clock,
            telemetry,
            log: Arc::new(ReadOnly(log)),
            following: true,
        };
        let (ingest, workers) = pipeline::start(
            shared,
            crate::workers(&model),
            model.server.ingest_queue.max(1),
            || starling_store::open_writer(&database),
            || starling_store::open_reader(&database),
        )?;
        let positions = ingest.stored_positions().into_iter().collect();
        let checkpoints = Arc::new(Mutex::new(starling_store::open_relaxed(&database)?));
        Ok(Follower { ingest, workers, positions, checkpoints })
    }

    /// The last position applied in each partition.
    pub fn positions(&self) -> &HashMap<Partition, Position> {
        &self.positions
    }

    /// The records written since the last round.
    pub async fn read(&self) -> Result<Vec<Entry>, ServerError> {
        let after = self.positions.iter().map(|(p, position)| (*p, *position)).collect();
        self.ingest.read_after(after).await.map_err(|e| ServerError::Replay(e.to_string()))
    }

    /// Applies `entries` (read by [`Follower::read`]) and checkpoints the database.
    pub async fn apply(&mut self, entries: &[Entry]) -> Result<(), ServerError> {
        self.ingest.apply_records(entries).await.map_err(|e| ServerError::Replay(e.to_string()))?;
        for entry in entries {
            let last = self.positions.entry(entry.partition).or_default();
            *last = (*last).max(entry.position);
        }
        let checkpoints = self.checkpoints.clone();
        tokio::task::spawn_blocking(move || starling_store::checkpoint(&checkpoints.lock().expect("checkpoint")))
            .await
            .map_err(|e| ServerError::Replay(e.to_string()))??;
        Ok(())
    }

    /// Stops the workers once they have written what they hold.
    pub async fn stop(self) -> Result<(), ServerError> {
        let Follower { ingest, workers, checkpoints, .. } = self;
        drop(ingest);
        tokio::task::spawn_blocking(move || {
            for worker in workers {
                let _ = worker.join();
            }
            starling_store::checkpoint(&checkpoints.lock().expect("checkpoint")).map(|_| ())
        })
        .await
        .map_err(|e| ServerError::Replay(e.to_string()))??;
        Ok(())
    }
}

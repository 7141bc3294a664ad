//! A standby's copy of the engine's state. The standby applies the stream as it grows, the way
//! a start applies the log after the stored state, into a database of its own; when it takes
//! the partitions over, only what was written since its last round is left to apply. It
//! delivers nothing and writes nothing to the stream: the owner decides, the follower repeats.

use crate::telemetry::Telemetry;
use crate::{Options, ServerError, delivery, live, pipeline};
use starling_cluster::SharedConfig;
use starling_log::{Entry, EventLog, LogError, Partition, Position};
use starling_store::outcomes::{Outcome, Taken};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

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
    /// A connection of its own: it checkpoints the WAL the workers' commits grow, and ends
    /// rows as the owner's deliveries ended.
    conn: Arc<Mutex<rusqlite::Connection>>,
}

impl Follower {
    /// Loads the plugins (compiling them into the cache a takeover loads them from) and starts
    /// a pipeline on the database that follows `log`. `published`: the configuration the
    /// cluster runs, which `options` holds; the database records it, so that records applied
    /// with it are applied with it again after the follower moved on to a newer one.
    pub fn start(
        options: &Options,
        published: Option<&SharedConfig>,
        log: Arc<dyn EventLog>,
    ) -> Result<Follower, ServerError> {
        let model = Arc::new(options.model.clone());
        let database = options.database.clone();
        let config = Arc::new(live::Live::new(model.clone(), None));
        let conn = starling_store::open(&database)?;
        if let Some(published) = published {
            let SharedConfig { version, sha256, text } = published;
            starling_store::continue_numbering(&conn, *version, sha256, text, crate::system_clock())?;
            config.set_active(live::Active { version: *version, sha256: sha256.clone(), ..Default::default() });
        }
        drop(conn);
        let plugins =
            Arc::new(crate::plugin_host(&model, &starling_store::blob_dir(&database), &options.trusted_keys)?);
        if let Some(dir) = &options.plugins {
            plugins.load_dir(dir, &model.plugin_config)?;
        }
        let telemetry = Arc::new(Telemetry::new());
        let clock = crate::system_clock;
        let shared = pipeline::Shared {
            config,
            plugins: plugins.clone(),
            runtime: tokio::runtime::Handle::current(),
            // No lane runs: the owner delivers.
            lanes: Arc::new(delivery::Lanes::new(plugins, database.clone(), clock, telemetry.clone())),
            clock,
            telemetry,
            log: Arc::new(ReadOnly(log)),
            owned: Arc::new(crate::owned::Owned::none()),
            elsewhere: None,
        };
        let (ingest, workers) =
            pipeline::start(shared, crate::workers(&model), model.server.ingest_queue.max(1), &database)?;
        let positions = ingest.stored_positions().into_iter().collect();
        let conn = Arc::new(Mutex::new(starling_store::open_relaxed(&database)?));
        Ok(Follower { ingest, workers, positions, conn })
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
        let conn = self.conn.clone();
        tokio::task::spawn_blocking(move || starling_store::checkpoint(&conn.lock().expect("connection")))
            .await
            .map_err(|e| ServerError::Replay(e.to_string()))??;
        Ok(())
    }

    /// Waits until what was applied is written to the database.
    pub async fn materialize(&self) -> Result<(), ServerError> {
        self.ingest.materialize().await.map_err(|e| ServerError::Replay(e.to_string()))
    }

    /// Ends this copy's rows as the owner's deliveries ended (see
    /// [`starling_store::outcomes`]). Returns how many rows ended, and the outcomes (with when
    /// they were read) of rows this copy does not hold yet.
    pub async fn take_outcomes(
        &self,
        outcomes: Vec<(Instant, Outcome)>,
    ) -> Result<(usize, Vec<(Instant, Outcome)>), ServerError> {
        let conn = self.conn.clone();
        tokio::task::spawn_blocking(move || -> Result<_, ServerError> {
            let conn = conn.lock().expect("connection");
            let (mut ended, mut not_yet) = (0, Vec::new());
            for (read, outcome) in outcomes {
                match starling_store::outcomes::take(&conn, &outcome)? {
                    Taken::Ended => ended += 1,
                    Taken::Settled => {}
                    Taken::NotYet => not_yet.push((read, outcome)),
                }
            }
            Ok((ended, not_yet))
        })
        .await
        .map_err(|e| ServerError::Replay(e.to_string()))?
    }

    /// Stops the workers once they have written what they hold.
    pub async fn stop(self) -> Result<(), ServerError> {
        let Follower { ingest, workers, conn, .. } = self;
        drop(ingest);
        tokio::task::spawn_blocking(move || {
            for worker in workers {
                let _ = worker.join();
            }
            starling_store::checkpoint(&conn.lock().expect("connection")).map(|_| ())
        })
        .await
        .map_err(|e| ServerError::Replay(e.to_string()))??;
        Ok(())
    }
}

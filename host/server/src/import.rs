//! Offline imports: rows of a CSV or JSON-lines file become events for the profiles their key
//! column names, and go through the same pipeline as live events (enrichments fill omnichannel
//! attributes, audiences are evaluated, actions fire).
//!
//! Imports resume: progress is kept per file (by content hash) and definition, each row's event
//! carries an id made of the file hash and row number, so a row applied twice is recognised as a
//! duplicate, and a file sent again continues after the last row recorded.

use crate::pipeline::{Ingest, IngestError, Queued};
use crate::telemetry::ImportLabel;
use rusqlite::Connection;
use starling_core::Event;
use starling_core::import::{Row, csv_rows, jsonl_rows, to_event};
use starling_core::model::ImportDef;
use starling_store::ImportProgress;
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

/// Largest file accepted in one upload; larger files go in parts (as `starling import` sends them).
pub const MAX_UPLOAD_BYTES: usize = 64 * 1024 * 1024;
/// Rows handed to the pipeline at once; progress is recorded after each group.
const ROWS_PER_SUBMIT: usize = 500;
/// Rejected rows listed in a summary; the count covers them all.
const MAX_REJECTIONS_LISTED: usize = 1_000;
/// Groups sent to the pipeline before the oldest must be durable.
const GROUPS_IN_FLIGHT: usize = 4;
/// How long a full ingestion queue is waited for before the import gives up.
const BUSY_PATIENCE: std::time::Duration = std::time::Duration::from_secs(60);

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    Csv,
    Jsonl,
}

/// A group of rows handed to the pipeline, and what to count when it is durable.
struct Sent {
    queued: Option<Queued>,
    /// The group's last row, when it moves the import's progress.
    last_row: Option<i64>,
    submitted: i64,
    unmatched: i64,
    rejected: i64,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Rejected {
    pub row: i64,
    pub line: u64,
    pub reason: String,
}

#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Summary {
    pub definition: String,
    pub file_sha256: String,
    /// Rows in this upload.
    pub rows: i64,
    /// Rows skipped because an earlier run had done them.
    pub skipped: i64,
    pub applied: i64,
    pub unmatched: i64,
    /// Rows whose event had been applied before (same file and row).
    pub duplicates: i64,
    pub rejected_count: i64,
    pub rejected: Vec<Rejected>,
    /// Totals for the file over every run.
    pub progress: ImportProgress,
}

#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Ingest(#[from] IngestError),
    #[error(transparent)]
    Store(#[from] starling_store::StoreError),
}

/// What an import needs from the running server.
pub struct Importer {
    pub ingest: Arc<Ingest>,
    pub read: Arc<Mutex<Connection>>,
    pub telemetry: Arc<crate::telemetry::Telemetry>,
    pub clock: fn() -> i64,
}

impl Importer {
    /// Imports `body`: the whole file, or the part of it whose first row is row `first_row` of
    /// the file and whose line 1 is line `line_offset + 1`.
    pub async fn run(
        &self,
        def: &ImportDef,
        format: Format,
        body: &[u8],
        file_sha256: Option<String>,
        first_row: i64,
        line_offset: u64,
    ) -> Result<Summary, ImportError> {
        let file_sha256 = file_sha256.unwrap_or_else(|| hex::encode(<sha2::Sha256 as sha2::Digest>::digest(body)));
        if file_sha256.len() != 64 || !file_sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(ImportError::Invalid("file: expected the file's SHA-256 as 64 hex digits".into()));
        }
        if first_row < 1 {
            return Err(ImportError::Invalid("first_row: rows are numbered from 1".into()));
        }
        // Rows are parsed a group at a time: memory follows the group, not the file.
        let mut rows = match format {
            Format::Csv => csv_rows(def, body, first_row),
            Format::Jsonl => jsonl_rows(def, body, first_row),
        }
        .map_err(ImportError::Invalid)?
        .map(|row| Row { line: row.line + line_offset, ..row });
        let (sha, name) = (file_sha256.clone(), def.name.clone());
        let mut progress = self.db(move |c| starling_store::import_progress(c, &sha, &name)).await?.unwrap_or_default();
        let mut summary =
            Summary { definition: def.name.clone(), file_sha256: file_sha256.clone(), ..Summary::default() };
        let now = (self.clock)();
        let mut in_flight: VecDeque<Sent> = VecDeque::new();
        loop {
            let group: Vec<Row> = rows.by_ref().take(ROWS_PER_SUBMIT).collect();
            let Some(last_row) = group.last().map(|r| r.number) else { break };
            summary.rows += group.len() as i64;
            let mut candidates = Vec::new();
            let mut rejected = 0;
            for row in group {
                if row.number <= progress.rows_done {
                    summary.skipped += 1;
                    continue;
                }
                let event = row.fields.and_then(|fields| to_event(def, &file_sha256, row.number, fields, now));
                match event {
                    Ok(e) => candidates.push(e),
                    Err(reason) => {
                        rejected += 1;
                        if summary.rejected.len() < MAX_REJECTIONS_LISTED {
                            summary.rejected.push(Rejected { row: row.number, line: row.line, reason });
                        }
                    }
                }
            }
            // Only rows whose id is linked to a profile apply: an import never creates profiles.
            let keys: Vec<String> = candidates.iter().map(|e| e.visitor_id.clone()).collect();
            self.ingest.materialize().await?;
            let known = self
                .db(move |c| {
                    keys.iter()
                        .map(|k| starling_store::resolve_identity(c, k).map(|p| p.is_some()))
                        .collect::<Result<Vec<_>, _>>()
                })
                .await?;
            let unmatched = known.iter().filter(|k| !**k).count() as i64;
            let events: Vec<Event> = candidates.into_iter().zip(known).filter(|(_, k)| *k).map(|(e, _)| e).collect();
            let sent = Sent {
                queued: None,
                last_row: Some(last_row).filter(|&n| n > progress.rows_done),
                submitted: events.len() as i64,
                unmatched,
                rejected,
            };
            // Groups are sent while earlier ones commit; progress advances in file order.
            let queued = if events.is_empty() {
                None
            } else {
                let started = std::time::Instant::now();
                loop {
                    match self.ingest.send(events.clone()) {
                        Ok(queued) => break Some(queued),
                        Err(IngestError::Busy) => match in_flight.pop_front() {
                            Some(front) => self.settle(front, def, &file_sha256, &mut summary, &mut progress).await?,
                            None if started.elapsed() < BUSY_PATIENCE => {
                                tokio::time::sleep(std::time::Duration::from_millis(50)).await
                            }
                            None => return Err(IngestError::Busy.into()),
                        },
                        Err(e) => return Err(e.into()),
                    }
                }
            };
            in_flight.push_back(Sent { queued, ..sent });
            while in_flight.len() > GROUPS_IN_FLIGHT {
                let front = in_flight.pop_front().expect("non-empty");
                self.settle(front, def, &file_sha256, &mut summary, &mut progress).await?;
            }
        }
        while let Some(front) = in_flight.pop_front() {
            self.settle(front, def, &file_sha256, &mut summary, &mut progress).await?;
        }
        tracing::info!(
            definition = %def.name,
            rows = summary.rows,
            applied = summary.applied,
            unmatched = summary.unmatched,
            rejected = summary.rejected_count,
            skipped = summary.skipped,
            "import done"
        );
        summary.progress = progress;
        Ok(summary)
    }

    /// Waits for a sent group to be durable, then counts it and records the progress.
    async fn settle(
        &self,
        sent: Sent,
        def: &ImportDef,
        file_sha256: &str,
        summary: &mut Summary,
        progress: &mut ImportProgress,
    ) -> Result<(), ImportError> {
        let report = match sent.queued {
            Some(queued) => queued.durable().await?,
            None => Default::default(),
        };
        let duplicates = report.duplicates as i64;
        let applied = sent.submitted - duplicates;
        summary.applied += applied;
        summary.duplicates += duplicates;
        summary.unmatched += sent.unmatched;
        summary.rejected_count += sent.rejected;
        let metrics = &self.telemetry.metrics;
        for (outcome, n) in [
            ("applied", applied),
            ("duplicate", duplicates),
            ("unmatched", sent.unmatched),
            ("rejected", sent.rejected),
        ] {
            if n > 0 {
                metrics
                    .import_rows
                    .get_or_create(&ImportLabel { definition: def.name.clone(), outcome: outcome.to_string() })
                    .inc_by(n as u64);
            }
        }
        let Some(last) = sent.last_row else { return Ok(()) };
        progress.rows_done = last;
        progress.applied += applied;
        progress.unmatched += sent.unmatched;
        progress.rejected += sent.rejected;
        let (sha, name, p) = (file_sha256.to_string(), def.name.clone(), progress.clone());
        let at = (self.clock)();
        self.db(move |c| starling_store::record_import_progress(c, &sha, &name, &p, at)).await
    }

    async fn db<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> starling_store::Result<T> + Send + 'static,
    ) -> Result<T, ImportError> {
        let conn = self.read.clone();
        Ok(tokio::task::spawn_blocking(move || f(&conn.lock().expect("read connection")))
            .await
            .map_err(|_| ImportError::Invalid("import task failed".into()))??)
    }
}

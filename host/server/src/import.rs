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
use starling_core::model::{FieldType, ImportDef};
use starling_core::value::json_kind_phrase;
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

/// One row of the file, by its number (1 = first data row) and the file line it starts on.
struct Row {
    number: i64,
    line: u64,
    fields: Result<serde_json::Map<String, serde_json::Value>, String>,
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
            Format::Csv => csv_rows(def, body, first_row)?,
            Format::Jsonl => jsonl_rows(def, body, first_row)?,
        }
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

/// A row as the event the definition makes of it.
fn to_event(
    def: &ImportDef,
    file_sha256: &str,
    row: i64,
    mut fields: serde_json::Map<String, serde_json::Value>,
    now: i64,
) -> Result<Event, String> {
    let visitor_id = match fields.get(&def.key) {
        Some(serde_json::Value::String(s)) if !s.trim().is_empty() => s.trim().to_string(),
        Some(serde_json::Value::Number(n)) => n.to_string(),
        None | Some(serde_json::Value::Null) => return Err(format!("{}: missing (the visitor id to match)", def.key)),
        Some(serde_json::Value::String(_)) => return Err(format!("{}: empty (the visitor id to match)", def.key)),
        Some(other) => return Err(format!("{}: expected a string, found {}", def.key, json_kind_phrase(other))),
    };
    let timestamp_ms = match &def.timestamp {
        Some(column) => match fields.get(column).and_then(|v| v.as_str()) {
            // History of any age is what imports are for; a row dated in the future is applied
            // at the time it is imported, as an event sent ahead of its receipt would be.
            Some(s) => starling_core::time::parse_rfc3339(s)
                .ok_or_else(|| format!("{column}: `{s}` is not RFC 3339"))?
                .min(now),
            None => return Err(format!("{column}: missing (the row's time)")),
        },
        None => now,
    };
    let mut data = serde_json::Map::new();
    for (column, _) in &def.columns {
        if let Some(v) = fields.remove(column).filter(|v| !v.is_null()) {
            data.insert(column.clone(), v);
        }
    }
    data.insert(def.key.clone(), serde_json::Value::String(visitor_id.clone()));
    Ok(Event {
        id: Some(format!("import:{}:{}:{row}", def.name, &file_sha256[..16])),
        name: def.event.clone(),
        visitor_id,
        source: Some(format!("import:{}", def.name)),
        timestamp_ms,
        data,
    })
}

/// The rows of a CSV file, parsed as they are taken; the header is checked first.
fn csv_rows<'a>(
    def: &'a ImportDef,
    body: &'a [u8],
    first_row: i64,
) -> Result<Box<dyn Iterator<Item = Row> + Send + 'a>, ImportError> {
    let mut reader = csv::ReaderBuilder::new().flexible(false).from_reader(body);
    let headers = reader
        .headers()
        .map_err(|e| ImportError::Invalid(format!("CSV header: {e}")))?
        .iter()
        .map(|h| h.trim().to_string())
        .collect::<Vec<_>>();
    if !headers.contains(&def.key) {
        return Err(ImportError::Invalid(format!(
            "CSV header has no `{}` column (the visitor id to match); it has: {}",
            def.key,
            headers.join(", ")
        )));
    }
    let rows = reader.into_records().enumerate().map(move |(i, record)| {
        let number = first_row + i as i64;
        let (line, fields) = match record {
            Err(e) => {
                let line = e.position().map_or(0, |p| p.line());
                (line, Err(format!("malformed CSV: {}", strip_csv_position(&e.to_string()))))
            }
            Ok(record) => {
                let line = record.position().map_or(0, |p| p.line());
                let mut fields = serde_json::Map::new();
                let mut problem = None;
                for (header, cell) in headers.iter().zip(record.iter()) {
                    let ty = if *header == def.key {
                        Some(FieldType::String)
                    } else {
                        def.columns.iter().find(|(c, _)| c == header).map(|(_, t)| *t)
                    };
                    let Some(ty) = ty else { continue };
                    match typed_cell(cell, ty) {
                        Ok(Some(v)) => {
                            fields.insert(header.clone(), v);
                        }
                        Ok(None) => {}
                        Err(m) => {
                            problem.get_or_insert(format!("{header}: {m}"));
                        }
                    }
                }
                (line, problem.map_or(Ok(fields), Err))
            }
        };
        Row { number, line, fields }
    });
    Ok(Box::new(rows))
}

/// A csv error's message without its trailing position (the summary names the row and line).
fn strip_csv_position(message: &str) -> String {
    message.split(" (line").next().unwrap_or(message).to_string()
}

/// A CSV cell as a value of the column's type; an empty cell is no value.
fn typed_cell(cell: &str, ty: FieldType) -> Result<Option<serde_json::Value>, String> {
    let cell = cell.trim();
    if cell.is_empty() {
        return Ok(None);
    }
    let value = match ty {
        FieldType::String => serde_json::Value::String(cell.to_string()),
        FieldType::Timestamp => {
            starling_core::time::parse_rfc3339(cell).ok_or_else(|| format!("`{cell}` is not an RFC 3339 timestamp"))?;
            serde_json::Value::String(cell.to_string())
        }
        FieldType::Number => cell
            .parse::<f64>()
            .ok()
            .filter(|n| n.is_finite())
            .and_then(serde_json::Number::from_f64)
            .map(serde_json::Value::Number)
            .ok_or_else(|| format!("`{cell}` is not a number"))?,
        FieldType::Integer => {
            serde_json::Value::from(cell.parse::<i64>().map_err(|_| format!("`{cell}` is not an integer"))?)
        }
        FieldType::Boolean => match cell.to_ascii_lowercase().as_str() {
            "true" | "yes" | "1" => serde_json::Value::Bool(true),
            "false" | "no" | "0" => serde_json::Value::Bool(false),
            _ => return Err(format!("`{cell}` is not a boolean (true/false)")),
        },
        FieldType::Array | FieldType::Object => {
            let v: serde_json::Value =
                serde_json::from_str(cell).map_err(|_| format!("`{cell}` is not JSON {}", ty.name()))?;
            if !ty.matches(&v) {
                return Err(format!("expected {}, found {}", ty.name(), json_kind_phrase(&v)));
            }
            v
        }
    };
    Ok(Some(value))
}

/// The rows of a JSON-lines file (blank lines skipped), parsed as they are taken.
fn jsonl_rows<'a>(
    def: &'a ImportDef,
    body: &'a [u8],
    first_row: i64,
) -> Result<Box<dyn Iterator<Item = Row> + Send + 'a>, ImportError> {
    let text = std::str::from_utf8(body).map_err(|e| ImportError::Invalid(format!("JSON lines: not UTF-8: {e}")))?;
    let lines = text.lines().enumerate().filter(|(_, line)| !line.trim().is_empty());
    let rows = lines.zip(first_row..).map(move |((i, line), number)| {
        let fields = match serde_json::from_str::<serde_json::Value>(line) {
            Err(e) => {
                Err(format!("malformed JSON at column {}: {}", e.column(), starling_core::ingest::strip_position(&e)))
            }
            Ok(serde_json::Value::Object(obj)) => check_object(def, obj),
            Ok(other) => Err(format!("expected an object, found {}", json_kind_phrase(&other))),
        };
        Row { number, line: i as u64 + 1, fields }
    });
    Ok(Box::new(rows))
}

fn check_object(
    def: &ImportDef,
    obj: serde_json::Map<String, serde_json::Value>,
) -> Result<serde_json::Map<String, serde_json::Value>, String> {
    for (column, ty) in &def.columns {
        if let Some(v) = obj.get(column).filter(|v| !v.is_null())
            && !ty.matches(v)
        {
            return Err(format!("{column}: expected {}, found {}", ty.name(), json_kind_phrase(v)));
        }
    }
    Ok(obj)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn def() -> ImportDef {
        ImportDef {
            name: "store".into(),
            event: "store_purchase".into(),
            matches: "email_hash".into(),
            key: "email_hash".into(),
            columns: vec![
                ("amount".into(), FieldType::Number),
                ("bought_at".into(), FieldType::Timestamp),
                ("store".into(), FieldType::String),
            ],
            timestamp: Some("bought_at".into()),
        }
    }

    #[test]
    fn csv_rows_are_typed_and_bad_rows_named() {
        let body = b"email_hash,amount,bought_at,store,ignored\n\
            h1,12.5,2024-05-01T10:00:00Z,Oslo,x\n\
            h2,lots,2024-05-01T10:00:00Z,Oslo,x\n\
            h3,3,yesterday,Oslo,x\n\
            ,3,2024-05-01T10:00:00Z,Oslo,x\n";
        let def = def();
        let rows = csv_rows(&def, body, 1).unwrap();
        let events: Vec<Result<Event, String>> =
            rows.into_iter().map(|r| r.fields.and_then(|f| to_event(&def, &"ab".repeat(32), r.number, f, 0))).collect();
        let first = events[0].as_ref().unwrap();
        assert_eq!(first.visitor_id, "h1");
        assert_eq!(first.data["amount"], serde_json::json!(12.5));
        assert!(!first.data.contains_key("ignored"));
        assert_eq!(first.id.as_deref(), Some("import:store:abababababababab:1"));
        assert_eq!(events[1].as_ref().unwrap_err(), "amount: `lots` is not a number");
        assert_eq!(events[2].as_ref().unwrap_err(), "bought_at: `yesterday` is not an RFC 3339 timestamp");
        assert_eq!(events[3].as_ref().unwrap_err(), "email_hash: missing (the visitor id to match)");
        assert!(
            matches!(csv_rows(&def, b"id,amount\n1,2\n", 1), Err(ImportError::Invalid(m)) if m.contains("no `email_hash` column"))
        );
    }

    #[test]
    fn json_lines_are_checked_per_line() {
        let body = b"{\"email_hash\":\"h1\",\"amount\":3,\"bought_at\":\"2024-05-01T10:00:00Z\"}\n\n{\"email_hash\":\"h2\",\"amount\":\"3\"}\n{oops\n";
        let def = def();
        let rows: Vec<Row> = jsonl_rows(&def, body, 10).unwrap().collect();
        assert_eq!(rows.iter().map(|r| (r.number, r.line)).collect::<Vec<_>>(), vec![(10, 1), (11, 3), (12, 4)]);
        assert!(rows[0].fields.is_ok());
        assert_eq!(rows[1].fields.as_ref().unwrap_err(), "amount: expected number, found a string");
        assert!(rows[2].fields.as_ref().unwrap_err().starts_with("malformed JSON at column 2"));
    }
}

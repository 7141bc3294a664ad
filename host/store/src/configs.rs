//! The configurations a database was served with, and the reads and writes a configuration
//! change makes: removed audiences and actions, scans of every profile (backfills, previews)
//! and of the recorded events (backtests).

use crate::{Result, StoreError, write_gate};
use rusqlite::{Connection, OptionalExtension, params};
use starling_core::{Event, Profile};

/// One configuration as it was applied.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ConfigRecord {
    pub version: i64,
    pub sha256: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub source: String,
    pub applied_ms: i64,
    /// `start`, `apply` (over HTTP), `reload` (SIGHUP) or `cluster` (run by a cluster's
    /// previous owner).
    pub how: String,
    /// What the change did, as the plan's JSON.
    pub plan: Option<serde_json::Value>,
    /// When the backfill over stored profiles it needed was done.
    pub backfilled_ms: Option<i64>,
}

const COLUMNS: &str = "version, sha256, source, applied_ms, how, plan, backfilled_ms";

fn record(r: &rusqlite::Row) -> rusqlite::Result<ConfigRecord> {
    let plan: Option<String> = r.get(5)?;
    Ok(ConfigRecord {
        version: r.get(0)?,
        sha256: r.get(1)?,
        source: r.get(2)?,
        applied_ms: r.get(3)?,
        how: r.get(4)?,
        plan: plan.and_then(|p| serde_json::from_str(&p).ok()),
        backfilled_ms: r.get(6)?,
    })
}

/// Records a configuration as the active one; returns its version.
pub fn record_config(
    conn: &Connection,
    sha256: &str,
    source: &str,
    applied_ms: i64,
    how: &str,
    plan: Option<&serde_json::Value>,
    backfilled: bool,
) -> Result<i64> {
    let _gate = write_gate();
    conn.prepare_cached(
        "INSERT INTO configurations (sha256, source, applied_ms, how, plan, backfilled_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )?
    .execute(params![sha256, source, applied_ms, how, plan.map(|p| p.to_string()), backfilled.then_some(applied_ms)])?;
    Ok(conn.last_insert_rowid())
}

/// Records `source`, which a cluster's previous owner ran and published as `version`, as this
/// database's configuration `version`, unless the database has that version or a later one:
/// the node that takes the cluster over goes on with the cluster's numbering (records in the
/// stream say which version applied them). Its backfill counts as not done, so the start
/// backfills every audience: the previous owner's backfills changed memberships that the
/// stream does not hold. Returns whether it was recorded.
pub fn continue_numbering(conn: &Connection, version: i64, sha256: &str, source: &str, at_ms: i64) -> Result<bool> {
    let _gate = write_gate();
    let recorded = conn
        .prepare_cached(
            "INSERT INTO configurations (version, sha256, source, applied_ms, how, plan, backfilled_ms)
             SELECT ?1, ?2, ?3, ?4, 'cluster', NULL, NULL
             WHERE NOT EXISTS (SELECT 1 FROM configurations WHERE version >= ?1)",
        )?
        .execute(params![version, sha256, source, at_ms])?;
    Ok(recorded == 1)
}

/// The configuration last applied, if any was recorded.
pub fn active_config(conn: &Connection) -> Result<Option<ConfigRecord>> {
    Ok(conn
        .prepare_cached(&format!("SELECT {COLUMNS} FROM configurations ORDER BY version DESC LIMIT 1"))?
        .query_row([], record)
        .optional()?)
}

/// The configuration recorded as `version`, with its text.
pub fn config_version(conn: &Connection, version: i64) -> Result<Option<ConfigRecord>> {
    Ok(conn
        .prepare_cached(&format!("SELECT {COLUMNS} FROM configurations WHERE version = ?1"))?
        .query_row([version], record)
        .optional()?)
}

/// The configurations applied before the active one, newest first, without their text unless
/// `with_source`.
pub fn config_history(conn: &Connection, limit: usize, with_source: bool) -> Result<Vec<ConfigRecord>> {
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT {COLUMNS} FROM configurations WHERE version < (SELECT max(version) FROM configurations)
         ORDER BY version DESC LIMIT ?1"
    ))?;
    let rows = stmt.query_map([limit as i64], record)?;
    let mut records: Vec<ConfigRecord> = rows.collect::<rusqlite::Result<_>>()?;
    if !with_source {
        records.iter_mut().for_each(|r| r.source.clear());
    }
    Ok(records)
}

/// Marks the backfill after configuration `version` as done.
pub fn finish_backfill(conn: &Connection, version: i64, at_ms: i64) -> Result<()> {
    let _gate = write_gate();
    conn.prepare_cached("UPDATE configurations SET backfilled_ms = ?2 WHERE version = ?1")?
        .execute(params![version, at_ms])?;
    Ok(())
}

/// Cancels the pending deliveries of actions no longer configured; returns how many.
pub fn cancel_actions(conn: &Connection, actions: &[String], now_ms: i64) -> Result<usize> {
    let _gate = write_gate();
    let mut stmt = conn.prepare_cached(
        "UPDATE outbox SET status = 'cancelled', next_attempt_ms = ?2,
         last_error = 'the action was removed from the configuration'
         WHERE status = 'pending' AND action = ?1",
    )?;
    let mut cancelled = 0;
    for action in actions {
        cancelled += stmt.execute(params![action, now_ms])?;
    }
    Ok(cancelled)
}

/// Removes every membership of audiences no longer configured; returns how many.
pub fn remove_memberships(conn: &Connection, audiences: &[String]) -> Result<usize> {
    let _gate = write_gate();
    let mut stmt = conn.prepare_cached("DELETE FROM memberships WHERE audience = ?1")?;
    let mut removed = 0;
    for audience in audiences {
        removed += stmt.execute([audience])?;
    }
    Ok(removed)
}

pub fn count_profiles(conn: &Connection) -> Result<u64> {
    Ok(conn.prepare_cached("SELECT count(*) FROM profiles")?.query_row([], |r| r.get::<_, i64>(0))? as u64)
}

/// Up to `limit` stored profiles after row `after`, in storage order, each with its row: a scan
/// of every profile goes on from the last row it saw. Each row is handed to `each` as it is
/// read (its JSON text), so that the caller decides what to parse.
pub fn profiles_after(
    conn: &Connection,
    after: i64,
    limit: usize,
    mut each: impl FnMut(i64, &str) -> Result<()>,
) -> Result<Option<i64>> {
    let mut stmt = conn.prepare_cached("SELECT rowid, data FROM profiles WHERE rowid > ?1 ORDER BY rowid LIMIT ?2")?;
    let mut rows = stmt.query(params![after, limit as i64])?;
    let mut last = None;
    while let Some(row) = rows.next()? {
        let rowid: i64 = row.get(0)?;
        let data = row.get_ref(1)?.as_str().map_err(rusqlite::Error::from)?;
        each(rowid, data)?;
        last = Some(rowid);
    }
    Ok(last)
}

/// Parses a stored profile's JSON.
pub fn read_profile(rowid: i64, data: &str) -> Result<Profile> {
    serde_json::from_str(data).map_err(|e| StoreError::Corrupt { id: format!("row {rowid}"), message: e.to_string() })
}

/// The recorded events received since `since_ms`, in the order they were received, each with
/// the profile it was applied to.
pub fn events_since(conn: &Connection, since_ms: i64, mut each: impl FnMut(&str, Event) -> Result<()>) -> Result<u64> {
    let mut stmt = conn.prepare_cached(
        "SELECT event_id, name, COALESCE(visitor_id, profile_id), source, ts_ms, data, profile_id FROM events
         WHERE coalesce(received_ms, ts_ms) >= ?1 ORDER BY seq",
    )?;
    let mut rows = stmt.query([since_ms])?;
    let mut n = 0;
    while let Some(r) = rows.next()? {
        let data = r.get_ref(5)?.as_str().map_err(rusqlite::Error::from)?;
        let data = serde_json::from_str(data)
            .map_err(|e| StoreError::Corrupt { id: format!("event {n}"), message: format!("event data: {e}") })?;
        let profile = r.get_ref(6)?.as_str().map_err(rusqlite::Error::from)?;
        let event = Event {
            id: r.get(0)?,
            name: r.get(1)?,
            visitor_id: r.get(2)?,
            source: r.get(3)?,
            timestamp_ms: r.get(4)?,
            data,
        };
        each(profile, event)?;
        n += 1;
    }
    Ok(n)
}

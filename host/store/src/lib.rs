//! Starling's storage: one SQLite file (WAL mode) holding profiles, identities, audience
//! memberships, the event log and the action outbox.
//!
//! Durability: `synchronous = FULL`, so a committed transaction is on disk before `commit`
//! returns; the server acknowledges events only after the transaction holding them commits.

use rusqlite::{Connection, OptionalExtension, Transaction, params};
use starling_core::{PendingAction, Profile};
use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("stored profile `{id}` is unreadable: {message}")]
    Corrupt { id: String, message: String },
}

pub type Result<T> = std::result::Result<T, StoreError>;

const SCHEMA_VERSION: i64 = 1;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS profiles (
    id          TEXT PRIMARY KEY,
    data        TEXT NOT NULL,
    updated_ms  INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS identities (
    visitor_id  TEXT PRIMARY KEY,
    profile_id  TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS identities_by_profile ON identities(profile_id);
CREATE TABLE IF NOT EXISTS memberships (
    profile_id  TEXT NOT NULL,
    audience    TEXT NOT NULL,
    joined_ms   INTEGER NOT NULL,
    PRIMARY KEY (profile_id, audience)
);
CREATE INDEX IF NOT EXISTS memberships_by_audience ON memberships(audience);
CREATE TABLE IF NOT EXISTS events (
    seq         INTEGER PRIMARY KEY,
    event_id    TEXT UNIQUE,
    profile_id  TEXT NOT NULL,
    name        TEXT NOT NULL,
    ts_ms       INTEGER NOT NULL,
    data        TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_by_profile ON events(profile_id, seq);
CREATE TABLE IF NOT EXISTS outbox (
    id              INTEGER PRIMARY KEY,
    action          TEXT NOT NULL,
    connector       TEXT NOT NULL,
    trigger         TEXT NOT NULL,
    audience        TEXT NOT NULL,
    profile_id      TEXT NOT NULL,
    occurred_ms     INTEGER NOT NULL,
    payload         TEXT NOT NULL,
    status          TEXT NOT NULL DEFAULT 'pending',
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_ms INTEGER NOT NULL,
    last_error      TEXT,
    delivered_ms    INTEGER
);
CREATE INDEX IF NOT EXISTS outbox_due ON outbox(status, next_attempt_ms);
";

/// Opens (creating if needed) the database and brings its schema up to date.
pub fn open(path: &Path) -> Result<Connection> {
    let conn = Connection::open(path)?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    conn.busy_timeout(std::time::Duration::from_secs(10))?;
    let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    if version < SCHEMA_VERSION {
        conn.execute_batch(SCHEMA)?;
        conn.pragma_update(None, "user_version", SCHEMA_VERSION)?;
    }
    Ok(conn)
}

/// The profile id a visitor id is linked to, if any.
pub fn resolve_identity(conn: &Connection, visitor_id: &str) -> Result<Option<String>> {
    Ok(conn
        .prepare_cached("SELECT profile_id FROM identities WHERE visitor_id = ?1")?
        .query_row([visitor_id], |r| r.get(0))
        .optional()?)
}

pub fn load_profile(conn: &Connection, profile_id: &str) -> Result<Option<Profile>> {
    let data: Option<String> = conn
        .prepare_cached("SELECT data FROM profiles WHERE id = ?1")?
        .query_row([profile_id], |r| r.get(0))
        .optional()?;
    data.map(|d| {
        serde_json::from_str(&d).map_err(|e| StoreError::Corrupt { id: profile_id.into(), message: e.to_string() })
    })
    .transpose()
}

/// Looks a profile up by any id linked to it.
pub fn find_profile(conn: &Connection, any_id: &str) -> Result<Option<Profile>> {
    match resolve_identity(conn, any_id)? {
        Some(pid) => load_profile(conn, &pid),
        None => Ok(None),
    }
}

pub fn event_seen(conn: &Connection, event_id: &str) -> Result<bool> {
    Ok(conn
        .prepare_cached("SELECT 1 FROM events WHERE event_id = ?1")?
        .query_row([event_id], |_| Ok(()))
        .optional()?
        .is_some())
}

/// Writes made while applying a batch of events; committed together.
pub struct Batch<'c> {
    tx: Transaction<'c>,
}

impl<'c> Batch<'c> {
    pub fn begin(conn: &'c mut Connection) -> Result<Batch<'c>> {
        Ok(Batch { tx: conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)? })
    }

    /// The transaction's connection, for reads that must see this batch's writes.
    pub fn connection(&self) -> &Connection {
        &self.tx
    }

    pub fn link_identity(&self, visitor_id: &str, profile_id: &str) -> Result<()> {
        self.tx
            .prepare_cached("INSERT OR IGNORE INTO identities (visitor_id, profile_id) VALUES (?1, ?2)")?
            .execute([visitor_id, profile_id])?;
        Ok(())
    }

    pub fn log_event(&self, event: &starling_core::Event, profile_id: &str) -> Result<()> {
        let data = serde_json::Value::Object(event.data.clone()).to_string();
        self.tx
            .prepare_cached("INSERT INTO events (event_id, profile_id, name, ts_ms, data) VALUES (?1, ?2, ?3, ?4, ?5)")?
            .execute(params![event.id, profile_id, event.name, event.timestamp_ms, data])?;
        Ok(())
    }

    pub fn save_profile(&self, profile: &Profile, now_ms: i64) -> Result<()> {
        let data = serde_json::to_string(profile).expect("profiles serialize");
        self.tx
            .prepare_cached(
                "INSERT INTO profiles (id, data, updated_ms) VALUES (?1, ?2, ?3)
                 ON CONFLICT(id) DO UPDATE SET data = excluded.data, updated_ms = excluded.updated_ms",
            )?
            .execute(params![profile.id, data, now_ms])?;
        Ok(())
    }

    pub fn join(&self, profile_id: &str, audience: &str, at_ms: i64) -> Result<()> {
        self.tx
            .prepare_cached("INSERT OR IGNORE INTO memberships (profile_id, audience, joined_ms) VALUES (?1, ?2, ?3)")?
            .execute(params![profile_id, audience, at_ms])?;
        Ok(())
    }

    pub fn leave(&self, profile_id: &str, audience: &str) -> Result<()> {
        self.tx
            .prepare_cached("DELETE FROM memberships WHERE profile_id = ?1 AND audience = ?2")?
            .execute([profile_id, audience])?;
        Ok(())
    }

    /// Queues an action for delivery; returns its outbox id.
    pub fn enqueue(&self, action: &PendingAction, payload: &serde_json::Value) -> Result<i64> {
        self.tx
            .prepare_cached(
                "INSERT INTO outbox (action, connector, trigger, audience, profile_id, occurred_ms, payload, next_attempt_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?6)",
            )?
            .execute(params![
                action.action,
                action.connector,
                action.trigger.name(),
                action.audience,
                action.profile_id,
                action.occurred_at_ms,
                payload.to_string(),
            ])?;
        Ok(self.tx.last_insert_rowid())
    }

    pub fn commit(self) -> Result<()> {
        Ok(self.tx.commit()?)
    }
}

/// One row of the outbox.
#[derive(Debug, Clone, serde::Serialize)]
pub struct OutboxEntry {
    pub id: i64,
    pub action: String,
    pub connector: String,
    pub trigger: String,
    pub audience: String,
    pub profile_id: String,
    pub occurred_ms: i64,
    #[serde(skip)]
    pub payload: String,
    pub status: String,
    pub attempts: i64,
    pub next_attempt_ms: i64,
    pub last_error: Option<String>,
    pub delivered_ms: Option<i64>,
}

impl OutboxEntry {
    /// Stable across retries and restarts: the key a destination deduplicates on.
    pub fn idempotency_key(&self) -> String {
        format!("{}-{}", self.action, self.id)
    }

    fn from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<OutboxEntry> {
        Ok(OutboxEntry {
            id: r.get(0)?,
            action: r.get(1)?,
            connector: r.get(2)?,
            trigger: r.get(3)?,
            audience: r.get(4)?,
            profile_id: r.get(5)?,
            occurred_ms: r.get(6)?,
            payload: r.get(7)?,
            status: r.get(8)?,
            attempts: r.get(9)?,
            next_attempt_ms: r.get(10)?,
            last_error: r.get(11)?,
            delivered_ms: r.get(12)?,
        })
    }
}

const OUTBOX_COLUMNS: &str = "id, action, connector, trigger, audience, profile_id, occurred_ms, payload, status, attempts, next_attempt_ms, last_error, delivered_ms";

/// Pending actions due at `now_ms`, oldest first.
pub fn due_actions(conn: &Connection, now_ms: i64, limit: usize) -> Result<Vec<OutboxEntry>> {
    let sql = format!(
        "SELECT {OUTBOX_COLUMNS} FROM outbox WHERE status = 'pending' AND next_attempt_ms <= ?1 ORDER BY id LIMIT ?2"
    );
    let mut stmt = conn.prepare_cached(&sql)?;
    let rows = stmt.query_map(params![now_ms, limit as i64], OutboxEntry::from_row)?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

/// The time the next pending action is due, if any.
pub fn next_due(conn: &Connection) -> Result<Option<i64>> {
    Ok(conn.query_row("SELECT MIN(next_attempt_ms) FROM outbox WHERE status = 'pending'", [], |r| r.get(0))?)
}

/// Outbox rows, newest first, optionally with one status.
pub fn list_actions(conn: &Connection, status: Option<&str>, limit: usize) -> Result<Vec<OutboxEntry>> {
    let sql = format!(
        "SELECT {OUTBOX_COLUMNS} FROM outbox WHERE (?1 IS NULL OR status = ?1) ORDER BY id DESC LIMIT ?2"
    );
    let mut stmt = conn.prepare_cached(&sql)?;
    let rows = stmt.query_map(params![status, limit as i64], OutboxEntry::from_row)?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

/// The result of one delivery attempt.
#[derive(Debug, Clone, PartialEq)]
pub enum Attempt {
    Delivered,
    /// Try again at the given time.
    Retry { at_ms: i64, error: String },
    /// Give up: `failed` for permanent errors, `dead` for exhausted retries.
    GiveUp { status: &'static str, error: String },
}

pub fn record_attempt(conn: &Connection, id: i64, attempt: &Attempt, now_ms: i64) -> Result<()> {
    match attempt {
        Attempt::Delivered => conn.execute(
            "UPDATE outbox SET status = 'delivered', attempts = attempts + 1, delivered_ms = ?2, last_error = NULL WHERE id = ?1",
            params![id, now_ms],
        )?,
        Attempt::Retry { at_ms, error } => conn.execute(
            "UPDATE outbox SET attempts = attempts + 1, next_attempt_ms = ?2, last_error = ?3 WHERE id = ?1",
            params![id, at_ms, error],
        )?,
        Attempt::GiveUp { status, error } => conn.execute(
            "UPDATE outbox SET status = ?2, attempts = attempts + 1, last_error = ?3 WHERE id = ?1",
            params![id, status, error],
        )?,
    };
    Ok(())
}

/// Current member count of every audience that has members.
pub fn audience_sizes(conn: &Connection) -> Result<Vec<(String, i64)>> {
    let mut stmt = conn.prepare_cached("SELECT audience, COUNT(*) FROM memberships GROUP BY audience")?;
    let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use starling_core::config::Trigger;

    fn action() -> PendingAction {
        PendingAction {
            action: "hook".into(),
            connector: "webhook".into(),
            trigger: Trigger::Joined,
            audience: "vips".into(),
            profile_id: "p1".into(),
            occurred_at_ms: 5,
            settings: Default::default(),
            params: vec![],
        }
    }

    #[test]
    fn survives_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.db");
        {
            let mut conn = open(&path).unwrap();
            let batch = Batch::begin(&mut conn).unwrap();
            let mut p = Profile::new("p1");
            p.event_count = 3;
            p.audiences.insert("vips".into());
            batch.link_identity("anon-1", "p1").unwrap();
            batch.save_profile(&p, 10).unwrap();
            batch.join("p1", "vips", 10).unwrap();
            batch.enqueue(&action(), &serde_json::json!({})).unwrap();
            batch.commit().unwrap();
        }
        let conn = open(&path).unwrap();
        let p = find_profile(&conn, "anon-1").unwrap().unwrap();
        assert_eq!(p.event_count, 3);
        assert_eq!(audience_sizes(&conn).unwrap(), vec![("vips".to_string(), 1)]);
        assert_eq!(due_actions(&conn, 5, 10).unwrap().len(), 1);
        assert_eq!(due_actions(&conn, 4, 10).unwrap().len(), 0);
    }

    #[test]
    fn an_uncommitted_batch_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let mut conn = open(&dir.path().join("s.db")).unwrap();
        {
            let batch = Batch::begin(&mut conn).unwrap();
            batch.link_identity("anon-1", "p1").unwrap();
            batch.save_profile(&Profile::new("p1"), 1).unwrap();
        }
        assert!(find_profile(&conn, "anon-1").unwrap().is_none());
    }

    #[test]
    fn attempts_move_rows_through_their_states() {
        let dir = tempfile::tempdir().unwrap();
        let mut conn = open(&dir.path().join("s.db")).unwrap();
        let batch = Batch::begin(&mut conn).unwrap();
        let id = batch.enqueue(&action(), &serde_json::json!({})).unwrap();
        batch.commit().unwrap();
        record_attempt(&conn, id, &Attempt::Retry { at_ms: 100, error: "HTTP 503".into() }, 6).unwrap();
        assert!(due_actions(&conn, 99, 10).unwrap().is_empty());
        let row = &due_actions(&conn, 100, 10).unwrap()[0];
        assert_eq!((row.attempts, row.last_error.as_deref()), (1, Some("HTTP 503")));
        record_attempt(&conn, id, &Attempt::Delivered, 101).unwrap();
        assert_eq!(list_actions(&conn, Some("delivered"), 10).unwrap()[0].delivered_ms, Some(101));
        assert_eq!(next_due(&conn).unwrap(), None);
    }
}

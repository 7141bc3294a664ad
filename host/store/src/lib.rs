//! Starling's materialized state: one SQLite file (WAL mode) holding profiles, identities,
//! audience memberships, each profile's event history and the action outbox, derived from the
//! event log (`starling-log`), with the log position each partition's state includes.
//!
//! Durability: the event log is the record. Ingestion commits here do not wait for the disk
//! (`synchronous = NORMAL`): after a crash, the state is the last commit that reached the disk
//! plus a replay of the log after the positions it recorded.

use rusqlite::{Connection, OpenFlags, OptionalExtension, Transaction, params};
use starling_core::model::Trigger;
use starling_core::{PendingAction, Profile};
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::path::Path;

mod configs;
pub mod outcomes;
pub use configs::{
    ConfigRecord, active_config, cancel_actions, config_history, config_version, continue_numbering, count_profiles,
    events_since, finish_backfill, profiles_after, read_profile, record_config, remove_memberships,
};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("stored profile `{id}` is unreadable: {message}")]
    Corrupt { id: String, message: String },
    #[error(
        "database {path} is damaged: SQLite's {check} found: {}; nothing was started (`starling check` lists every problem; restore a backup with `starling restore`)",
        problems.join("; ")
    )]
    Damaged { path: String, check: &'static str, problems: Vec<String> },
    #[error(
        "database schema version {found}; this build reads version {reads} (a read-only connection does not migrate)"
    )]
    Schema { found: i64, reads: i64 },
}

/// How thoroughly [`check_integrity`] reads the database.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Integrity {
    /// `PRAGMA quick_check`: every page and b-tree is well formed (not that indexes match).
    Quick,
    /// `PRAGMA integrity_check`: the quick check, and every index matches its table.
    Full,
}

/// Reads the database at `path` with SQLite's own consistency check; a damaged file is an
/// error naming it, the check and (up to `max_problems`) what the check found.
pub fn check_integrity(path: &Path, level: Integrity, max_problems: usize) -> Result<()> {
    let check = match level {
        Integrity::Quick => "quick_check",
        Integrity::Full => "integrity_check",
    };
    let damaged = |problems| StoreError::Damaged { path: path.display().to_string(), check, problems };
    let conn = Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    let found: rusqlite::Result<Vec<String>> = (|| {
        let mut stmt = conn.prepare(&format!("PRAGMA {check}({max_problems})"))?;
        let rows = stmt.query_map([], |r| r.get::<_, String>(0))?;
        rows.collect()
    })();
    match found {
        Ok(rows) if rows == ["ok"] => Ok(()),
        Ok(rows) => Err(damaged(rows)),
        // SQLite may stop at a page it cannot read at all.
        Err(rusqlite::Error::SqliteFailure(e, message))
            if matches!(e.code, rusqlite::ErrorCode::DatabaseCorrupt | rusqlite::ErrorCode::NotADatabase) =>
        {
            Err(damaged(vec![message.unwrap_or_else(|| e.to_string())]))
        }
        Err(e) => Err(e.into()),
    }
}

pub type Result<T> = std::result::Result<T, StoreError>;

const SCHEMA_VERSION: i64 = 13;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS profiles (
    id          TEXT PRIMARY KEY,
    data        TEXT NOT NULL,
    updated_ms  INTEGER NOT NULL,
    -- For retention: no later than the latest event's time (rounded down, so that the index
    -- changes rarely); candidates are checked against the profile itself.
    last_seen_ms INTEGER
);
CREATE INDEX IF NOT EXISTS profiles_by_last_seen ON profiles(last_seen_ms);
CREATE TABLE IF NOT EXISTS identities (
    visitor_id  TEXT PRIMARY KEY,
    profile_id  TEXT NOT NULL,
    -- A link made by a claim (an id a profile's event named first): the claim's log record.
    -- Two partitions can claim one id at once; the claim earlier in the log wins, as it does
    -- when the log is applied again. Cleared when the id moves (merge, unstitch): only a claim
    -- still as made can be overtaken.
    claimed_at  INTEGER,
    -- The visitor-id attribute with a `max_per_profile` the id is a value of: what a node
    -- knows of the capped values of a profile another node holds.
    attribute   TEXT
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
    event_id    TEXT,
    profile_id  TEXT NOT NULL,
    name        TEXT NOT NULL,
    ts_ms       INTEGER NOT NULL,
    data        TEXT NOT NULL,
    source      TEXT,
    visitor_id  TEXT,
    -- When the server received it, for `retention.events`.
    received_ms INTEGER
);
CREATE INDEX IF NOT EXISTS events_by_profile ON events(profile_id, seq);
-- Merges handed on by another partition's log record (`position.index`) and applied here: a
-- replay of that record hands them on again.
CREATE TABLE IF NOT EXISTS handoffs (
    origin      TEXT PRIMARY KEY,
    position    INTEGER NOT NULL,
    -- The partition whose state holds the merge (the survivor's): restored with it.
    partition   INTEGER
) WITHOUT ROWID;
-- Merges this node's partitions handed over to another partition (the request as JSON), kept
-- until that partition has applied them (`handoffs`), so that a crash cannot lose one.
CREATE TABLE IF NOT EXISTS handed_over (
    origin      TEXT PRIMARY KEY,
    request     TEXT NOT NULL
) WITHOUT ROWID;
-- The log position each virtual partition's state here includes; replay starts after it.
CREATE TABLE IF NOT EXISTS log_positions (
    partition   INTEGER PRIMARY KEY,
    position    INTEGER NOT NULL
);
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
    delivered_ms    INTEGER,
    -- For delayed actions: 'member' or 'not_member' of `audience` when due, else cancelled.
    condition       TEXT,
    -- Where in the event log the action was decided (`position.index`): a replay of that
    -- record finds the row already there, and the idempotency key is made of it.
    origin          TEXT,
    -- The virtual partition of that record: its owner delivers the action.
    log_partition   INTEGER
);
CREATE INDEX IF NOT EXISTS outbox_due ON outbox(status, action, next_attempt_ms);
CREATE UNIQUE INDEX IF NOT EXISTS outbox_by_origin ON outbox(origin) WHERE origin IS NOT NULL;
CREATE TABLE IF NOT EXISTS dead_letters (
    id              INTEGER PRIMARY KEY,
    action          TEXT NOT NULL,
    connector       TEXT NOT NULL,
    trigger         TEXT NOT NULL,
    audience        TEXT NOT NULL,
    profile_id      TEXT NOT NULL,
    occurred_ms     INTEGER NOT NULL,
    payload         TEXT NOT NULL,
    attempts        INTEGER NOT NULL,
    last_error      TEXT,
    condition       TEXT,
    died_ms         INTEGER NOT NULL,
    origin          TEXT
);
CREATE TABLE IF NOT EXISTS action_fired (
    action      TEXT NOT NULL,
    profile_id  TEXT NOT NULL,
    last_ms     INTEGER NOT NULL,
    PRIMARY KEY (action, profile_id)
);
-- When each profile must be looked at without an event (visit end, time-relative audiences).
CREATE TABLE IF NOT EXISTS wakeups (
    profile_id  TEXT PRIMARY KEY,
    due_ms      INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS wakeups_due ON wakeups(due_ms);
-- Provenance of every identity decision: links, merges, refusals, unstitches.
CREATE TABLE IF NOT EXISTS identity_links (
    seq         INTEGER PRIMARY KEY,
    profile_id  TEXT NOT NULL,
    visitor_id  TEXT NOT NULL,
    -- 'link' | 'merge' | 'refused' | 'unstitched'
    kind        TEXT NOT NULL,
    -- merge: the absorbed profile; unstitched: the profile it was split from
    other_id    TEXT,
    attribute   TEXT,
    event_id    TEXT,
    at_ms       INTEGER NOT NULL,
    detail      TEXT
);
CREATE INDEX IF NOT EXISTS identity_links_by_profile ON identity_links(profile_id, seq);
CREATE INDEX IF NOT EXISTS identity_links_by_visitor ON identity_links(visitor_id, kind);
-- Profiles merged into another (of any partition, as the ids followed say): a second merge of
-- one (two decisions for one pair) finds it merged. Kept when a partition is restored.
CREATE TABLE IF NOT EXISTS merged_away (
    absorbed    TEXT PRIMARY KEY,
    survivor    TEXT NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS merged_away_by_survivor ON merged_away(survivor);
-- Sampled audience sizes, for plotting.
CREATE TABLE IF NOT EXISTS audience_sizes (
    at_ms       INTEGER NOT NULL,
    audience    TEXT NOT NULL,
    size        INTEGER NOT NULL,
    PRIMARY KEY (audience, at_ms)
);
-- Without a rowid: one B-tree keyed by the id, instead of a table and its key's index.
CREATE TABLE IF NOT EXISTS seen_events (
    event_id    TEXT PRIMARY KEY,
    seen_ms     INTEGER NOT NULL
) WITHOUT ROWID;
-- What was done to people's data, without personal data: deletions and their reasons.
CREATE TABLE IF NOT EXISTS audit_log (
    seq         INTEGER PRIMARY KEY,
    at_ms       INTEGER NOT NULL,
    kind        TEXT NOT NULL,
    detail      TEXT NOT NULL
);
-- Every configuration this database was served with, newest last; a backfill over stored
-- profiles after a change is done when `backfilled_ms` is set.
CREATE TABLE IF NOT EXISTS configurations (
    version       INTEGER PRIMARY KEY,
    sha256        TEXT NOT NULL,
    source        TEXT NOT NULL,
    applied_ms    INTEGER NOT NULL,
    -- 'start' | 'apply' | 'reload' | 'cluster' (run by the cluster's previous owner)
    how           TEXT NOT NULL,
    plan          TEXT,
    backfilled_ms INTEGER
);
-- Progress of offline imports, per file (by content hash) and definition, so they resume.
CREATE TABLE IF NOT EXISTS imports (
    file_sha256 TEXT NOT NULL,
    definition  TEXT NOT NULL,
    rows_done   INTEGER NOT NULL,
    applied     INTEGER NOT NULL,
    unmatched   INTEGER NOT NULL,
    rejected    INTEGER NOT NULL,
    started_ms  INTEGER NOT NULL,
    updated_ms  INTEGER NOT NULL,
    PRIMARY KEY (file_sha256, definition)
);
";

/// Opens the database for writes whose loss in a power failure is harmless: their commits do
/// not wait for the disk (WAL, `synchronous = NORMAL`: the database stays consistent, and the
/// next fully synchronous commit of any connection makes them durable too). Delivery results
/// are written this way: a result lost with the machine's power means the action is delivered
/// again with the same idempotency key, which at-least-once delivery allows. Its writes are
/// small, so it keeps SQLite's default page cache.
pub fn open_relaxed(path: &Path) -> Result<Connection> {
    let conn = open(path)?;
    conn.pragma_update(None, "wal_autocheckpoint", 0)?;
    conn.pragma_update(None, "mmap_size", 0)?;
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    Ok(conn)
}

/// Opens the database for reads made between other connections' commits: no memory map (see
/// [`open_writer`]) and a 16 MiB page cache, which a batch's reads of profiles and seen ids
/// fill between those commits (a 2 MiB or 8 MiB cache ingested about 12% fewer events/s).
pub fn open_reader(path: &Path) -> Result<Connection> {
    let conn = open(path)?;
    conn.pragma_update(None, "mmap_size", 0)?;
    conn.pragma_update(None, "cache_size", -16384)?;
    Ok(conn)
}

/// Opens the database for point lookups made between other connections' commits (which drop
/// its page cache): SQLite's default 2 MiB cache, no memory map.
pub fn open_lookup(path: &Path) -> Result<Connection> {
    let conn = open(path)?;
    conn.pragma_update(None, "mmap_size", 0)?;
    Ok(conn)
}

/// Opens the database read-only, as it is: neither created nor migrated if it is not there or
/// not current (another process's database being replaced, for instance), but an error.
pub fn open_read_only(path: &Path) -> Result<Connection> {
    let conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX)?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    if version != SCHEMA_VERSION {
        return Err(StoreError::Schema { found: version, reads: SCHEMA_VERSION });
    }
    Ok(conn)
}

/// Opens the database for a writer whose commits must not pay for checkpoints: the WAL is
/// copied back into the database by [`checkpoint`], called from elsewhere, instead of by
/// whichever commit crosses SQLite's threshold (a latency spike of many milliseconds). Its page
/// cache is large enough to hold a big batch's B-tree pages without spilling them to the WAL
/// mid-transaction; it has no memory map, because SQLite drops a connection's cache, and unmaps
/// its map, whenever another connection has committed, and a writer sharing the file with
/// others would spend its time mapping and unmapping.
pub fn open_writer(path: &Path) -> Result<Connection> {
    let conn = open_reader(path)?;
    conn.pragma_update(None, "wal_autocheckpoint", 0)?;
    // The event log is the record: a commit here need not reach the disk before the answer
    // (a lost one is replayed from the log), only stay consistent.
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    Ok(conn)
}

/// The log position each partition's stored state includes.
pub fn log_positions(conn: &Connection) -> Result<Vec<(u16, u64)>> {
    let mut stmt = conn.prepare_cached("SELECT partition, position FROM log_positions")?;
    let rows = stmt.query_map([], |r| Ok((r.get::<_, u16>(0)?, r.get::<_, i64>(1)? as u64)))?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

/// Writes a consistent copy of the database at `database` into the new file `into` (SQLite's
/// `VACUUM INTO`, inside one read transaction: writers go on meanwhile) and returns the event
/// log position of each partition the copy reflects.
pub fn snapshot(database: &Path, into: &Path) -> Result<Vec<(u16, u64)>> {
    let conn = Connection::open_with_flags(database, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    conn.execute("VACUUM INTO ?1", [into.to_string_lossy()])?;
    let copy = Connection::open_with_flags(into, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    log_positions(&copy)
}

/// What restoring one partition did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RestoredPartition {
    /// Profiles of the partition this database held before, removed.
    pub dropped: usize,
    /// Profiles taken from the snapshot.
    pub profiles: usize,
}

/// Makes the state of virtual partition `partition` (the profiles `is_of` accepts, the
/// actions its records decided) the state the database at `snapshot` holds of it, or none
/// without a snapshot, and records `position` as the partition's (none: left as it is): its
/// records after that are applied next. The ids stay as they are (every partition's are kept
/// up to date here); a profile the snapshot holds whose own id a profile of another partition
/// holds now (merged into it since, its state carried there) is not taken; one merged into a
/// profile of the partition is (the partition's records after the snapshot merge it again).
pub fn restore_partition(
    conn: &mut Connection,
    snapshot: Option<&Path>,
    partition: u16,
    position: Option<u64>,
    is_of: &dyn Fn(&str) -> bool,
) -> Result<RestoredPartition> {
    if let Some(snapshot) = snapshot {
        conn.execute("ATTACH DATABASE ?1 AS snap", [snapshot.to_string_lossy()])?;
    }
    let restored = restore_partition_in(conn, snapshot.is_some(), partition, position, is_of);
    if snapshot.is_some() {
        conn.execute("DETACH DATABASE snap", [])?;
    }
    restored
}

fn restore_partition_in(
    conn: &mut Connection,
    from_snapshot: bool,
    partition: u16,
    position: Option<u64>,
    is_of: &dyn Fn(&str) -> bool,
) -> Result<RestoredPartition> {
    const PER_PROFILE: [&str; 6] =
        ["events", "memberships", "wakeups", "action_fired", "identity_links", "dead_letters"];
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let ids_of = |table: &str| -> Result<Vec<String>> {
        let mut stmt = tx.prepare(&format!("SELECT id FROM {table}"))?;
        let ids = stmt.query_map([], |r| r.get::<_, String>(0))?.collect::<rusqlite::Result<Vec<String>>>()?;
        Ok(ids.into_iter().filter(|id| is_of(id)).collect())
    };
    let mut restored = RestoredPartition::default();
    for id in ids_of("main.profiles")? {
        for table in PER_PROFILE {
            tx.execute(&format!("DELETE FROM main.{table} WHERE profile_id = ?1"), [&id])?;
        }
        tx.execute("DELETE FROM main.profiles WHERE id = ?1", [&id])?;
        restored.dropped += 1;
    }
    tx.execute("DELETE FROM main.outbox WHERE log_partition = ?1", [partition])?;
    tx.execute("DELETE FROM main.handoffs WHERE partition = ?1", [partition])?;
    if from_snapshot {
        // Columns named, without the row ids, which are this database's own.
        let columns = |table: &str| -> Result<String> {
            let mut stmt = tx.prepare(&format!("SELECT name, pk FROM pragma_table_info('{table}')"))?;
            let names = stmt
                .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            let rowid = |name: &str| {
                matches!((table, name), ("events" | "identity_links", "seq") | ("dead_letters" | "outbox", "id"))
            };
            Ok(names.into_iter().filter(|(name, _)| !rowid(name)).map(|(name, _)| name).collect::<Vec<_>>().join(", "))
        };
        for id in ids_of("snap.profiles")? {
            let moved: Option<String> = tx
                .query_row("SELECT profile_id FROM main.identities WHERE visitor_id = ?1", [&id], |r| r.get(0))
                .optional()?;
            if moved.is_some_and(|owner| !is_of(&owner)) {
                continue;
            }
            tx.execute("INSERT INTO main.profiles SELECT * FROM snap.profiles WHERE id = ?1", [&id])?;
            for table in PER_PROFILE {
                let cols = columns(table)?;
                tx.execute(
                    &format!("INSERT OR IGNORE INTO main.{table} ({cols}) SELECT {cols} FROM snap.{table} WHERE profile_id = ?1"),
                    [&id],
                )?;
            }
            restored.profiles += 1;
        }
        let cols = columns("outbox")?;
        tx.execute(
            &format!(
                "INSERT OR IGNORE INTO main.outbox ({cols}) SELECT {cols} FROM snap.outbox WHERE log_partition = ?1"
            ),
            [partition],
        )?;
        tx.execute("INSERT OR IGNORE INTO main.seen_events SELECT * FROM snap.seen_events", [])?;
        tx.execute(
            "INSERT OR IGNORE INTO main.handoffs (origin, position, partition)
             SELECT origin, position, partition FROM snap.handoffs WHERE partition = ?1",
            [partition],
        )?;
        let handed: Vec<(String, String)> = {
            let mut stmt = tx.prepare("SELECT origin, request FROM snap.handed_over")?;
            stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?.collect::<rusqlite::Result<_>>()?
        };
        for (origin, request) in handed {
            let absorbed = serde_json::from_str::<serde_json::Value>(&request)
                .ok()
                .and_then(|r| r["absorbed"].as_str().map(str::to_string));
            if absorbed.is_some_and(|absorbed| is_of(&absorbed)) {
                tx.execute(
                    "INSERT OR IGNORE INTO main.handed_over (origin, request) VALUES (?1, ?2)",
                    [&origin, &request],
                )?;
            }
        }
    }
    if let Some(position) = position {
        tx.execute(
            "INSERT INTO main.log_positions (partition, position) VALUES (?1, ?2)
             ON CONFLICT(partition) DO UPDATE SET position = excluded.position",
            rusqlite::params![partition, position],
        )?;
    }
    tx.commit()?;
    Ok(restored)
}

/// Takes the delivery states of actions from the database at `snapshot` (a copy another node
/// wrote while delivering them): a row pending here that the copy holds as delivered, failed or
/// cancelled takes its state. Rows are matched by origin (the log position that decided them),
/// the same on every node that applied the log. Returns how many rows changed.
pub fn adopt_deliveries(conn: &Connection, snapshot: &Path) -> Result<usize> {
    conn.execute("ATTACH DATABASE ?1 AS snapshot", [snapshot.to_string_lossy()])?;
    let adopted = {
        let _gate = write_gate();
        conn.execute(
            "UPDATE outbox SET status = s.status, attempts = s.attempts, delivered_ms = s.delivered_ms,
                 last_error = s.last_error
             FROM snapshot.outbox AS s
             WHERE outbox.origin = s.origin AND outbox.status = 'pending' AND s.status <> 'pending'",
            [],
        )
    };
    conn.execute("DETACH DATABASE snapshot", [])?;
    Ok(adopted?)
}

/// Whether the merge handed on from log record `origin` was applied.
pub fn handoff_applied(conn: &Connection, origin: &str) -> Result<bool> {
    Ok(conn.prepare_cached("SELECT 1 FROM handoffs WHERE origin = ?1")?.exists([origin])?)
}

/// Whether the merge named `origin` is kept here, handed over (applied or not).
pub fn is_handed_over(conn: &Connection, origin: &str) -> Result<bool> {
    Ok(conn.prepare_cached("SELECT 1 FROM handed_over WHERE origin = ?1")?.exists([origin])?)
}

/// Whether a merge or adoption whose origin ends with `suffix` is kept here and not applied.
pub fn keeps_unapplied_ending(conn: &Connection, suffix: &str) -> Result<bool> {
    let pattern = format!("%{}", suffix.replace('\\', "\\\\").replace('%', "\\%").replace('_', "\\_"));
    Ok(conn
        .prepare_cached(
            "SELECT 1 FROM handed_over WHERE origin LIKE ?1 ESCAPE '\\' \
             AND origin NOT IN (SELECT origin FROM handoffs)",
        )?
        .exists([pattern])?)
}

/// Merges handed over and not yet applied: (origin, request).
pub fn handed_over(conn: &Connection) -> Result<Vec<(String, String)>> {
    let mut stmt = conn.prepare_cached(
        "SELECT origin, request FROM handed_over WHERE origin NOT IN (SELECT origin FROM handoffs) ORDER BY origin",
    )?;
    let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

/// Keeps a merge another node handed to a partition (see [`handed_over`]) until it is applied:
/// whichever node owns the partition when, applies it. The request replaces one kept under its
/// origin (it now carries the absorbed profile's state).
pub fn keep_handed_over(conn: &Connection, origin: &str, request: &str) -> Result<()> {
    let _gate = write_gate();
    conn.prepare_cached("INSERT OR REPLACE INTO handed_over (origin, request) VALUES (?1, ?2)")?
        .execute([origin, request])?;
    Ok(())
}

/// Marks the event ids `keys` as seen at `seen_ms` (events applied on another node, on
/// their way here): the same ids sent again are duplicates.
pub fn mark_seen(conn: &Connection, keys: &[String], seen_ms: i64) -> Result<()> {
    let _gate = write_gate();
    let tx = conn.unchecked_transaction()?;
    {
        let mut insert = tx.prepare_cached("INSERT OR IGNORE INTO seen_events (event_id, seen_ms) VALUES (?1, ?2)")?;
        for key in keys {
            insert.execute(params![key, seen_ms])?;
        }
    }
    tx.commit()?;
    Ok(())
}

/// Forgets merges handed over that will never be applied (their absorbed profile is gone).
pub fn forget_handed_over(conn: &Connection, origins: &[String]) -> Result<usize> {
    let _gate = write_gate();
    let tx = conn.unchecked_transaction()?;
    let mut forgotten = 0;
    {
        let mut delete = tx.prepare_cached("DELETE FROM handed_over WHERE origin = ?1")?;
        for origin in origins {
            forgotten += delete.execute([origin])?;
        }
    }
    tx.commit()?;
    Ok(forgotten)
}

/// Forgets merges handed over that were applied, then applied handoffs from records before
/// `position`, which the log no longer holds.
pub fn prune_handoffs(conn: &Connection, position: u64) -> Result<usize> {
    let _gate = write_gate();
    conn.execute("DELETE FROM handed_over WHERE origin IN (SELECT origin FROM handoffs)", [])?;
    Ok(conn.execute("DELETE FROM handoffs WHERE position < ?1", [position as i64])?)
}

/// Looks at the next `limit` history events after sequence `after` (oldest first) and forgets
/// those received before `before_ms`. Returns how many went and where the next look starts
/// (`None`: the end was reached, start again from the beginning). Each look reads at most
/// `limit` rows, so the write lock is never held for a scan of the whole table.
pub fn prune_history(conn: &Connection, before_ms: i64, after: i64, limit: usize) -> Result<(usize, Option<i64>)> {
    prune_chunk(
        conn,
        "SELECT max(seq), count(*) FROM (SELECT seq FROM events WHERE seq > ?1 ORDER BY seq LIMIT ?2)",
        "DELETE FROM events WHERE seq > ?1 AND seq <= ?2 AND coalesce(received_ms, ts_ms) < ?3",
        before_ms,
        after,
        limit,
    )
}

/// As [`prune_history`], for outbox rows done (delivered, failed or cancelled) whose last
/// attempt was before `before_ms`.
pub fn prune_done_actions(conn: &Connection, before_ms: i64, after: i64, limit: usize) -> Result<(usize, Option<i64>)> {
    prune_chunk(
        conn,
        "SELECT max(id), count(*) FROM (SELECT id FROM outbox WHERE id > ?1 ORDER BY id LIMIT ?2)",
        "DELETE FROM outbox WHERE id > ?1 AND id <= ?2 AND status IN ('delivered', 'failed', 'cancelled')
         AND next_attempt_ms < ?3",
        before_ms,
        after,
        limit,
    )
}

fn prune_chunk(
    conn: &Connection,
    range: &str,
    delete: &str,
    before_ms: i64,
    after: i64,
    limit: usize,
) -> Result<(usize, Option<i64>)> {
    let (last, seen): (Option<i64>, i64) =
        conn.prepare_cached(range)?.query_row(params![after, limit as i64], |r| Ok((r.get(0)?, r.get(1)?)))?;
    let Some(last) = last else { return Ok((0, None)) };
    let _gate = write_gate();
    let gone = conn.prepare_cached(delete)?.execute(params![after, last, before_ms])?;
    Ok((gone, (seen as usize == limit).then_some(last)))
}

/// How long a connection waits for another's lock before giving up.
const BUSY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// WAL frames (4 KiB pages) past which a fully checkpointed WAL is truncated.
const WAL_RESTART_FRAMES: i64 = 4_096;

/// Copies what it can of the WAL into the database without blocking writers or readers. Once
/// the WAL is large and fully copied, truncates it: SQLite only starts a WAL over when no
/// reader is using it at the moment a writer begins, which a busy server never offers, so left
/// alone the file grows without bound. The restart holds off this process's writers, so it
/// does not wait: if a reader is still using the WAL, it is tried again at the next checkpoint
/// (waiting, with SQLite's busy handler sleeping in steps of up to 100 ms, held every writer up
/// for 5 to 61 ms, 367 times in 5 minutes at 1,000 events/s). Returns the frames in the WAL
/// and how many of them are checkpointed.
pub fn checkpoint(conn: &Connection) -> Result<(i64, i64)> {
    let pages = |sql| conn.query_row(sql, [], |r| Ok((r.get::<_, i64>(1)?, r.get::<_, i64>(2)?)));
    let (log, done) = pages("PRAGMA wal_checkpoint(PASSIVE)")?;
    if log >= WAL_RESTART_FRAMES && log == done {
        let _gate = write_gate();
        conn.busy_timeout(std::time::Duration::ZERO)?;
        let restarted = pages("PRAGMA wal_checkpoint(RESTART)");
        conn.busy_timeout(BUSY_TIMEOUT)?;
        return Ok(restarted?);
    }
    Ok((log, done))
}

/// Opens (creating if needed) the database and brings its schema up to date.
pub fn open(path: &Path) -> Result<Connection> {
    let conn = Connection::open(path)?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    // The hottest pages are read through a memory map instead of a read() copy per page. Each
    // connection maps the file on its own and every mapped page counts as resident memory, so
    // the map is kept small.
    conn.pragma_update(None, "mmap_size", 32i64 << 20)?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    // Deleted rows are overwritten with zeros, so that a deleted person's data does not stay
    // readable in freed pages of the file.
    conn.pragma_update(None, "secure_delete", "ON")?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    if version < SCHEMA_VERSION {
        if version >= 1 {
            // Later versions record each event's data source and the id it was sent with.
            add_column_if_missing(&conn, "events", "source", "TEXT")?;
            add_column_if_missing(&conn, "events", "visitor_id", "TEXT")?;
            if !has_column(&conn, "profiles", "last_seen_ms")? {
                add_column_if_missing(&conn, "profiles", "last_seen_ms", "INTEGER")?;
                conn.execute_batch("UPDATE profiles SET last_seen_ms = json_extract(data, '$.last_seen_ms')")?;
            }
        }
        if (1..6).contains(&version) {
            add_column_if_missing(&conn, "events", "received_ms", "INTEGER")?;
            add_column_if_missing(&conn, "outbox", "origin", "TEXT")?;
            add_column_if_missing(&conn, "dead_letters", "origin", "TEXT")?;
        }
        if (1..8).contains(&version) {
            add_column_if_missing(&conn, "identities", "claimed_at", "INTEGER")?;
        }
        if (1..9).contains(&version) {
            add_column_if_missing(&conn, "outbox", "log_partition", "INTEGER")?;
        }
        if (1..11).contains(&version) {
            add_column_if_missing(&conn, "handoffs", "partition", "INTEGER")?;
        }
        if (1..12).contains(&version) {
            add_column_if_missing(&conn, "identities", "attribute", "TEXT")?;
        }
        if (1..5).contains(&version) {
            conn.execute_batch(
                "BEGIN;
                 CREATE TABLE IF NOT EXISTS seen_events (event_id TEXT PRIMARY KEY, seen_ms INTEGER NOT NULL);
                 CREATE TABLE seen_events_v5 (event_id TEXT PRIMARY KEY, seen_ms INTEGER NOT NULL) WITHOUT ROWID;
                 INSERT INTO seen_events_v5 SELECT event_id, seen_ms FROM seen_events;
                 DROP TABLE seen_events;
                 ALTER TABLE seen_events_v5 RENAME TO seen_events;
                 COMMIT;",
            )?;
        }
        conn.execute_batch(SCHEMA)?;
        conn.pragma_update(None, "user_version", SCHEMA_VERSION)?;
    }
    Ok(conn)
}

fn has_column(conn: &Connection, table: &str, column: &str) -> Result<bool> {
    Ok(conn
        .prepare(&format!("SELECT 1 FROM pragma_table_info('{table}') WHERE name = ?1"))?
        .query_row([column], |_| Ok(()))
        .optional()?
        .is_some())
}

fn add_column_if_missing(conn: &Connection, table: &str, column: &str, decl: &str) -> Result<()> {
    if !has_column(conn, table, column)? {
        conn.execute_batch(&format!("ALTER TABLE {table} ADD COLUMN {column} {decl}"))?;
    }
    Ok(())
}

/// Profiles whose latest event is older than `before_ms`, oldest first.
pub fn inactive_profiles(conn: &Connection, before_ms: i64, limit: usize) -> Result<Vec<String>> {
    let mut stmt =
        conn.prepare_cached("SELECT id FROM profiles WHERE last_seen_ms < ?1 ORDER BY last_seen_ms LIMIT ?2")?;
    let rows = stmt.query_map(params![before_ms, limit as i64], |r| r.get(0))?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

/// The latest audit records, newest first.
pub fn audit_records(conn: &Connection, limit: usize) -> Result<Vec<serde_json::Value>> {
    let mut stmt = conn.prepare_cached("SELECT seq, at_ms, kind, detail FROM audit_log ORDER BY seq DESC LIMIT ?1")?;
    let rows = stmt.query_map([limit as i64], |r| {
        let detail: String = r.get(3)?;
        Ok(serde_json::json!({
            "seq": r.get::<_, i64>(0)?,
            "at_ms": r.get::<_, i64>(1)?,
            "kind": r.get::<_, String>(2)?,
            "detail": serde_json::from_str::<serde_json::Value>(&detail).unwrap_or(serde_json::Value::Null),
        }))
    })?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

/// Removes an outbox row.
pub fn forget_action(conn: &Connection, id: i64) -> Result<()> {
    conn.prepare_cached("DELETE FROM outbox WHERE id = ?1")?.execute([id])?;
    Ok(())
}

/// Forgets a deletion notice that could not be delivered: its payload names the deleted person,
/// so it is not kept as a dead letter; an audit record without personal data says it failed.
pub fn forget_failed_deletion_notice(conn: &Connection, id: i64, now_ms: i64) -> Result<()> {
    let _gate = write_gate();
    let tx = conn.unchecked_transaction()?;
    let failed: Option<(String, i64, Option<String>)> = tx
        .query_row(
            "SELECT action, attempts, last_error FROM dead_letters WHERE id = ?1 UNION ALL
             SELECT action, attempts, last_error FROM outbox WHERE id = ?1",
            [id],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .optional()?;
    tx.execute("DELETE FROM dead_letters WHERE id = ?1", [id])?;
    tx.execute("DELETE FROM outbox WHERE id = ?1", [id])?;
    if let Some((action, attempts, error)) = failed {
        let detail = serde_json::json!({ "action": action, "attempts": attempts, "error": error });
        tx.execute(
            "INSERT INTO audit_log (at_ms, kind, detail) VALUES (?1, 'deletion_notice_failed', ?2)",
            params![now_ms, detail.to_string()],
        )?;
    }
    tx.commit()?;
    Ok(())
}

/// Copies the whole WAL into the database and truncates it to nothing, so that the bytes of
/// deleted rows do not stay in it. Like the restart in [`checkpoint`] it does not wait for
/// readers: returns `false` when one was still in the WAL, to be tried again.
pub fn truncate_wal(conn: &Connection) -> Result<bool> {
    let _gate = write_gate();
    conn.busy_timeout(std::time::Duration::ZERO)?;
    let busy = conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| r.get::<_, i64>(0));
    conn.busy_timeout(BUSY_TIMEOUT)?;
    Ok(busy? == 0)
}

/// Pending actions per action name, for the queue-depth metric.
pub fn pending_actions(conn: &Connection) -> Result<Vec<(String, i64)>> {
    let mut stmt =
        conn.prepare_cached("SELECT action, COUNT(*) FROM outbox WHERE status = 'pending' GROUP BY action")?;
    let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

/// How far an import of one file with one definition has come.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct ImportProgress {
    pub rows_done: i64,
    pub applied: i64,
    pub unmatched: i64,
    pub rejected: i64,
}

pub fn import_progress(conn: &Connection, file_sha256: &str, definition: &str) -> Result<Option<ImportProgress>> {
    Ok(conn
        .prepare_cached(
            "SELECT rows_done, applied, unmatched, rejected FROM imports WHERE file_sha256 = ?1 AND definition = ?2",
        )?
        .query_row([file_sha256, definition], |r| {
            Ok(ImportProgress { rows_done: r.get(0)?, applied: r.get(1)?, unmatched: r.get(2)?, rejected: r.get(3)? })
        })
        .optional()?)
}

pub fn record_import_progress(
    conn: &Connection,
    file_sha256: &str,
    definition: &str,
    progress: &ImportProgress,
    now_ms: i64,
) -> Result<()> {
    conn.prepare_cached(
        "INSERT INTO imports (file_sha256, definition, rows_done, applied, unmatched, rejected, started_ms, updated_ms)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?7)
         ON CONFLICT(file_sha256, definition) DO UPDATE SET rows_done = excluded.rows_done,
         applied = excluded.applied, unmatched = excluded.unmatched, rejected = excluded.rejected,
         updated_ms = excluded.updated_ms",
    )?
    .execute(params![
        file_sha256,
        definition,
        progress.rows_done,
        progress.applied,
        progress.unmatched,
        progress.rejected,
        now_ms
    ])?;
    Ok(())
}

/// The profile id a visitor id is linked to, if any.
pub fn resolve_identity(conn: &Connection, visitor_id: &str) -> Result<Option<String>> {
    Ok(conn
        .prepare_cached("SELECT profile_id FROM identities WHERE visitor_id = ?1")?
        .query_row([visitor_id], |r| r.get(0))
        .optional()?)
}

/// The log position of the claim that linked `visitor_id` to its profile, if it was claimed
/// by a logged record.
pub fn claimed_at(conn: &Connection, visitor_id: &str) -> Result<Option<u64>> {
    let claimed: Option<Option<i64>> = conn
        .prepare_cached("SELECT claimed_at FROM identities WHERE visitor_id = ?1")?
        .query_row([visitor_id], |r| r.get(0))
        .optional()?;
    Ok(claimed.flatten().map(|p| p as u64))
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

/// Whether an event with this deduplication key (`Event::dedup_key`: its id within its data
/// source) was applied at or after `since_ms` (the dedup window).
pub fn event_seen(conn: &Connection, event_id: &str, since_ms: i64) -> Result<bool> {
    Ok(conn
        .prepare_cached("SELECT 1 FROM seen_events WHERE event_id = ?1 AND seen_ms >= ?2")?
        .query_row(params![event_id, since_ms], |_| Ok(()))
        .optional()?
        .is_some())
}

/// Forgets event ids seen before `before_ms` among the next `chunk` ids after `after` in key
/// order. Returns how many it forgot and the id to continue after, or `None` at the end. Ids
/// have no index by time (one more B-tree written per event), so the table is walked a chunk at
/// a time, each a short transaction, instead of in one scan that holds off every writer.
pub fn prune_seen_events(
    conn: &Connection,
    before_ms: i64,
    after: &str,
    chunk: usize,
) -> Result<(usize, Option<String>)> {
    let last: Option<String> = conn
        .prepare_cached(
            "SELECT max(event_id) FROM (SELECT event_id FROM seen_events WHERE event_id > ?1 ORDER BY event_id LIMIT ?2)",
        )?
        .query_row(params![after, chunk as i64], |r| r.get(0))?;
    let Some(last) = last else { return Ok((0, None)) };
    let _gate = write_gate();
    let forgotten = conn
        .prepare_cached("DELETE FROM seen_events WHERE event_id > ?1 AND event_id <= ?2 AND seen_ms < ?3")?
        .execute(params![after, last, before_ms])?;
    Ok((forgotten, Some(last)))
}

/// When `action` last fired for `profile_id`, for frequency capping.
pub fn last_fired(conn: &Connection, action: &str, profile_id: &str) -> Result<Option<i64>> {
    Ok(conn
        .prepare_cached("SELECT last_ms FROM action_fired WHERE action = ?1 AND profile_id = ?2")?
        .query_row([action, profile_id], |r| r.get(0))
        .optional()?)
}

pub fn is_member(conn: &Connection, profile_id: &str, audience: &str) -> Result<bool> {
    Ok(conn
        .prepare_cached("SELECT 1 FROM memberships WHERE profile_id = ?1 AND audience = ?2")?
        .query_row([profile_id, audience], |_| Ok(()))
        .optional()?
        .is_some())
}

static WRITE_GATE: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Serializes this process's write transactions. SQLite allows one writer at a time and makes
/// the others sleep and retry (in steps of milliseconds); queueing on a mutex instead hands the
/// lock over as soon as it is free. Other processes still wait through the busy timeout.
fn write_gate() -> std::sync::MutexGuard<'static, ()> {
    WRITE_GATE.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Writes made while applying a batch of events; committed together.
pub struct Batch<'c> {
    // Declared before the gate, so the transaction ends before the gate opens.
    tx: Transaction<'c>,
    _gate: std::sync::MutexGuard<'static, ()>,
}

impl<'c> Batch<'c> {
    pub fn begin(conn: &'c mut Connection) -> Result<Batch<'c>> {
        let gate = write_gate();
        Ok(Batch { tx: conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?, _gate: gate })
    }

    /// The transaction's connection, for reads that must see this batch's writes.
    pub fn connection(&self) -> &Connection {
        &self.tx
    }

    /// Links `visitor_id` to `profile_id` unless it is linked already; returns whether it was
    /// this call that linked it.
    pub fn link_identity(&self, visitor_id: &str, profile_id: &str) -> Result<bool> {
        let inserted = self
            .tx
            .prepare_cached("INSERT OR IGNORE INTO identities (visitor_id, profile_id) VALUES (?1, ?2)")?
            .execute([visitor_id, profile_id])?;
        Ok(inserted == 1)
    }

    /// Marks `visitor_id` a value of the capped visitor-id attribute `attribute` (see
    /// [`capped_ids_of`]).
    pub fn mark_capped(&self, visitor_id: &str, attribute: &str) -> Result<()> {
        self.tx
            .prepare_cached("UPDATE identities SET attribute = ?2 WHERE visitor_id = ?1")?
            .execute([visitor_id, attribute])?;
        Ok(())
    }

    /// Links `visitor_id` to `profile_id` for a claim made by the log record at `position`
    /// (none for work not logged). An id linked already stays linked, unless by a claim later
    /// in the log, which this one overtakes.
    pub fn claim_identity(&self, visitor_id: &str, profile_id: &str, position: Option<u64>) -> Result<Claimed> {
        let existing: Option<(String, Option<i64>)> = self
            .tx
            .prepare_cached("SELECT profile_id, claimed_at FROM identities WHERE visitor_id = ?1")?
            .query_row([visitor_id], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()?;
        let position = position.map(|p| p as i64);
        let overtaken = match existing {
            None => {
                self.tx
                    .prepare_cached("INSERT INTO identities (visitor_id, profile_id, claimed_at) VALUES (?1, ?2, ?3)")?
                    .execute(params![visitor_id, profile_id, position])?;
                return Ok(Claimed::Linked);
            }
            Some((owner, _)) if owner == profile_id => return Ok(Claimed::Held),
            Some((owner, Some(claimed_at))) if position.is_some_and(|p| p < claimed_at) => {
                // The overtaken claim as it was recorded, for the merge its profile now makes.
                let recorded: Option<(Option<String>, Option<String>, i64)> = self
                    .tx
                    .prepare_cached(
                        "SELECT attribute, event_id, at_ms FROM identity_links
                         WHERE visitor_id = ?1 AND profile_id = ?2 AND kind = 'link' ORDER BY seq DESC LIMIT 1",
                    )?
                    .query_row([visitor_id, &owner], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
                    .optional()?;
                let (attribute, event_id, at_ms) = recorded.unwrap_or((None, None, 0));
                let overtaken = IdentityLink {
                    profile_id: owner,
                    visitor_id: visitor_id.to_string(),
                    kind: "link",
                    other_id: None,
                    attribute,
                    event_id,
                    at_ms,
                    detail: None,
                };
                Claimed::Overtook { overtaken, position: claimed_at as u64 }
            }
            Some((owner, _)) => return Ok(Claimed::Lost { owner }),
        };
        self.tx
            .prepare_cached("UPDATE identities SET profile_id = ?2, claimed_at = ?3 WHERE visitor_id = ?1")?
            .execute(params![visitor_id, profile_id, position])?;
        Ok(overtaken)
    }

    pub fn log_event(&self, event: &starling_core::Event, profile_id: &str, now_ms: i64) -> Result<()> {
        if let Some(key) = event.dedup_key() {
            self.tx
                .prepare_cached("INSERT OR REPLACE INTO seen_events (event_id, seen_ms) VALUES (?1, ?2)")?
                .execute(params![key, now_ms])?;
        }
        let data = serde_json::Value::Object(event.data.clone()).to_string();
        self.tx
            .prepare_cached(
                "INSERT INTO events (event_id, profile_id, name, ts_ms, data, source, visitor_id, received_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            )?
            .execute(params![
                event.id,
                profile_id,
                event.name,
                event.timestamp_ms,
                data,
                event.source,
                event.visitor_id,
                now_ms
            ])?;
        Ok(())
    }

    /// Writes the profile. `last_seen_index` is the value for the retention index (no later
    /// than the profile's last event), or `None` to leave the stored row's value as it is.
    pub fn save_profile(&self, profile: &Profile, now_ms: i64, last_seen_index: Option<i64>) -> Result<()> {
        let data = serde_json::to_string(profile).expect("profiles serialize");
        if last_seen_index.is_none() {
            let updated = self
                .tx
                .prepare_cached("UPDATE profiles SET data = ?2, updated_ms = ?3 WHERE id = ?1")?
                .execute(params![profile.id, data, now_ms])?;
            if updated == 1 {
                return Ok(());
            }
        }
        self.tx
            .prepare_cached(
                "INSERT INTO profiles (id, data, updated_ms, last_seen_ms) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT(id) DO UPDATE SET data = excluded.data, updated_ms = excluded.updated_ms,
                 last_seen_ms = excluded.last_seen_ms",
            )?
            .execute(params![profile.id, data, now_ms, last_seen_index.unwrap_or(profile.last_seen_ms)])?;
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

    /// Queues an action for delivery at `due_ms`; returns its outbox id, or `None` when the
    /// row from `origin` is there already (a replay of the log). `condition` (`member` /
    /// `not_member`) is checked when a delayed action comes due.
    pub fn enqueue(
        &self,
        action: &PendingAction,
        payload: &serde_json::Value,
        due_ms: i64,
        condition: Option<&str>,
        origin: Option<&str>,
        partition: u16,
    ) -> Result<Option<i64>> {
        let inserted = self
            .tx
            .prepare_cached(
                "INSERT OR IGNORE INTO outbox (action, connector, trigger, audience, profile_id, occurred_ms, payload, next_attempt_ms, condition, origin, log_partition)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
            )?
            .execute(params![
                action.action,
                action.connector,
                action.trigger.name(),
                action.audience,
                action.profile_id,
                action.occurred_at_ms,
                payload.to_string(),
                due_ms,
                condition,
                origin,
                partition,
            ])?;
        Ok((inserted == 1).then(|| self.tx.last_insert_rowid()))
    }

    /// Records that the merge handed on from log record `origin` (`position.index`) is applied.
    pub fn record_handoff(&self, origin: &str, partition: u16) -> Result<()> {
        let position: i64 = origin.split('.').next().and_then(|p| p.parse().ok()).unwrap_or_default();
        self.tx
            .prepare_cached("INSERT OR IGNORE INTO handoffs (origin, position, partition) VALUES (?1, ?2, ?3)")?
            .execute(params![origin, position, partition])?;
        Ok(())
    }

    /// Keeps a merge handed over to another partition until it is applied there.
    pub fn hand_over(&self, origin: &str, request: &str) -> Result<()> {
        self.tx
            .prepare_cached("INSERT OR IGNORE INTO handed_over (origin, request) VALUES (?1, ?2)")?
            .execute([origin, request])?;
        Ok(())
    }

    /// Records that this commit includes the log up to `position` for `partition`.
    pub fn set_log_position(&self, partition: u16, position: u64) -> Result<()> {
        self.tx
            .prepare_cached(
                "INSERT INTO log_positions (partition, position) VALUES (?1, ?2)
                 ON CONFLICT(partition) DO UPDATE SET position = max(position, excluded.position)",
            )?
            .execute(params![partition, position as i64])?;
        Ok(())
    }

    /// Keeps the newest `keep` events of a profile's history, forgetting older ones.
    pub fn trim_history(&self, profile_id: &str, keep: usize) -> Result<usize> {
        Ok(self
            .tx
            .prepare_cached(
                "DELETE FROM events WHERE profile_id = ?1 AND seq <= (
                     SELECT seq FROM events WHERE profile_id = ?1 ORDER BY seq DESC LIMIT 1 OFFSET ?2)",
            )?
            .execute(params![profile_id, keep as i64])?)
    }

    /// Records that `action` fired for `profile_id`, for frequency capping.
    pub fn mark_fired(&self, action: &str, profile_id: &str, at_ms: i64) -> Result<()> {
        self.tx
            .prepare_cached(
                "INSERT INTO action_fired (action, profile_id, last_ms) VALUES (?1, ?2, ?3)
                 ON CONFLICT(action, profile_id) DO UPDATE SET last_ms = excluded.last_ms",
            )?
            .execute(params![action, profile_id, at_ms])?;
        Ok(())
    }

    /// Records an identity decision (see the `identity_links` table).
    pub fn record_identity(&self, link: &IdentityLink) -> Result<()> {
        self.tx
            .prepare_cached(
                "INSERT INTO identity_links (profile_id, visitor_id, kind, other_id, attribute, event_id, at_ms, detail)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            )?
            .execute(params![
                link.profile_id,
                link.visitor_id,
                link.kind,
                link.other_id,
                link.attribute,
                link.event_id,
                link.at_ms,
                link.detail
            ])?;
        Ok(())
    }

    /// Records `absorbed` as merged into `survivor`, and moves its ids there.
    fn merged_away(&self, absorbed: &str, survivor: &str) -> Result<()> {
        self.tx
            .prepare_cached("INSERT OR REPLACE INTO merged_away (absorbed, survivor) VALUES (?1, ?2)")?
            .execute([absorbed, survivor])?;
        self.tx
            .prepare_cached("UPDATE identities SET profile_id = ?2, claimed_at = NULL WHERE profile_id = ?1")?
            .execute([absorbed, survivor])?;
        Ok(())
    }

    /// Moves everything of profile `absorbed` to `survivor`: its ids, event log and memberships
    /// (the survivor's own rows win); then deletes the absorbed profile.
    pub fn merge_profiles(&self, absorbed: &str, survivor: &str) -> Result<()> {
        let tx = &self.tx;
        self.merged_away(absorbed, survivor)?;
        tx.prepare_cached("UPDATE events SET profile_id = ?2 WHERE profile_id = ?1")?.execute([absorbed, survivor])?;
        tx.prepare_cached(
            "INSERT OR IGNORE INTO memberships (profile_id, audience, joined_ms)
             SELECT ?2, audience, joined_ms FROM memberships WHERE profile_id = ?1",
        )?
        .execute([absorbed, survivor])?;
        tx.prepare_cached("DELETE FROM memberships WHERE profile_id = ?1")?.execute([absorbed])?;
        tx.prepare_cached("DELETE FROM profiles WHERE id = ?1")?.execute([absorbed])?;
        tx.prepare_cached("DELETE FROM wakeups WHERE profile_id = ?1")?.execute([absorbed])?;
        Ok(())
    }

    /// As [`Batch::merge_profiles`], for a merge that carried the absorbed profile's state
    /// (kept for `survivor` separately): the ids move; what this database held of `absorbed`
    /// (a copy) goes.
    pub fn merge_carried(&self, absorbed: &str, survivor: &str) -> Result<()> {
        self.merged_away(absorbed, survivor)?;
        self.drop_copy(absorbed)
    }

    /// Removes what this database holds of profile `profile_id` (its row, history, memberships
    /// and wake-ups), and nothing else: a copy of a profile merged into another node's.
    pub fn drop_copy(&self, profile_id: &str) -> Result<()> {
        let tx = &self.tx;
        for table in ["events", "memberships", "wakeups"] {
            tx.prepare_cached(&format!("DELETE FROM {table} WHERE profile_id = ?1"))?.execute([profile_id])?;
        }
        tx.prepare_cached("DELETE FROM profiles WHERE id = ?1")?.execute([profile_id])?;
        Ok(())
    }

    /// Splits visitor id `id` out of profile `from` into a profile of its own (named `id`): the
    /// id and the events sent with it move.
    pub fn split_identity(&self, id: &str, from: &str) -> Result<()> {
        let tx = &self.tx;
        // A profile of its own again: it may be merged anew. What was merged into it before
        // stays in `from` (only the id and its events move), and so do later links to those.
        tx.prepare_cached("DELETE FROM merged_away WHERE absorbed = ?1")?.execute([id])?;
        tx.prepare_cached("UPDATE merged_away SET survivor = ?2 WHERE survivor = ?1")?.execute([id, from])?;
        tx.prepare_cached("UPDATE identities SET profile_id = ?1, claimed_at = NULL WHERE visitor_id = ?1")?
            .execute([id])?;
        tx.prepare_cached("UPDATE events SET profile_id = ?1 WHERE profile_id = ?2 AND visitor_id = ?1")?
            .execute([id, from])?;
        Ok(())
    }

    /// Splits visitor id `id` out of profile `from` into a profile of its own held elsewhere
    /// (another node's partition): the id moves, and the events sent with it go from here.
    pub fn split_identity_away(&self, id: &str, from: &str) -> Result<()> {
        self.split_identity(id, from)?;
        self.tx.prepare_cached("DELETE FROM events WHERE profile_id = ?1")?.execute([id])?;
        Ok(())
    }

    /// Forgets the merge named `origin` kept until applied: another node applied it.
    pub fn unkeep(&self, origin: &str) -> Result<()> {
        self.tx.prepare_cached("DELETE FROM handed_over WHERE origin = ?1")?.execute([origin])?;
        Ok(())
    }

    /// Forgets the ids of profile `profile_id`, another node's that was deleted there.
    pub fn forget_ids(&self, profile_id: &str) -> Result<usize> {
        self.forget_merges_into(profile_id)?;
        self.keep_profiles_started_since(profile_id)?;
        Ok(self.tx.prepare_cached("DELETE FROM identities WHERE profile_id = ?1")?.execute([profile_id])?)
    }

    /// Of the ids linked to deleted profile `profile_id`, those that started a profile of their
    /// own since (another worker applied an event for one once the directory had pointed it
    /// at itself, before this deletion was written, and its own link did not replace this
    /// one) stay linked, to that profile.
    fn keep_profiles_started_since(&self, profile_id: &str) -> Result<()> {
        self.tx
            .prepare_cached(
                "UPDATE identities SET profile_id = visitor_id, claimed_at = NULL, attribute = NULL
                 WHERE profile_id = ?1 AND visitor_id <> ?1 AND visitor_id IN (SELECT id FROM profiles)",
            )?
            .execute([profile_id])?;
        Ok(())
    }

    /// Forgets the merges into deleted profile `profile_id`, and into those merged into it: an
    /// id of theirs seen again starts a profile of its own (see [`survivor_of`]).
    fn forget_merges_into(&self, profile_id: &str) -> Result<()> {
        self.tx
            .prepare_cached(
                "WITH RECURSIVE merged_into(absorbed) AS (
                     SELECT absorbed FROM merged_away WHERE survivor = ?1
                     UNION SELECT m.absorbed FROM merged_away m JOIN merged_into i ON m.survivor = i.absorbed)
                 DELETE FROM merged_away WHERE absorbed IN merged_into",
            )?
            .execute([profile_id])?;
        Ok(())
    }

    /// Removes every row about profile `profile_id`: the profile, its ids and their history,
    /// event log, memberships, actions (pending or done) and dead letters, frequency caps and
    /// wake-ups. Returns how many rows of each went, for the audit record.
    pub fn delete_profile(&self, profile_id: &str) -> Result<BTreeMap<&'static str, usize>> {
        let tx = &self.tx;
        self.forget_merges_into(profile_id)?;
        self.keep_profiles_started_since(profile_id)?;
        let mut removed = BTreeMap::new();
        for (what, sql) in [
            ("profile", "DELETE FROM profiles WHERE id = ?1"),
            ("ids", "DELETE FROM identities WHERE profile_id = ?1"),
            ("identity_records", "DELETE FROM identity_links WHERE profile_id = ?1 OR other_id = ?1"),
            // The ids of the person's events, as deduplication remembers them (`Event::dedup_key`),
            // before the events go. Ids of events already pruned from the history expire with
            // the dedup window.
            (
                "event_ids",
                "DELETE FROM seen_events WHERE event_id IN (
                     SELECT CASE WHEN source IS NULL THEN event_id ELSE source || char(31) || event_id END
                     FROM events WHERE profile_id = ?1 AND event_id IS NOT NULL)",
            ),
            ("events", "DELETE FROM events WHERE profile_id = ?1"),
            ("memberships", "DELETE FROM memberships WHERE profile_id = ?1"),
            // A deletion notice still to be delivered (an earlier deletion of a reused id) stays.
            (
                "actions",
                "DELETE FROM outbox WHERE profile_id = ?1 AND NOT (trigger = 'deleted' AND status = 'pending')",
            ),
            ("dead_letters", "DELETE FROM dead_letters WHERE profile_id = ?1"),
            ("frequency_caps", "DELETE FROM action_fired WHERE profile_id = ?1"),
            ("wakeups", "DELETE FROM wakeups WHERE profile_id = ?1"),
        ] {
            removed.insert(what, tx.prepare_cached(sql)?.execute([profile_id])?);
        }
        Ok(removed)
    }

    /// Appends an audit record; `detail` must hold no personal data.
    pub fn audit(&self, at_ms: i64, kind: &str, detail: &serde_json::Value) -> Result<()> {
        self.tx.prepare_cached("INSERT INTO audit_log (at_ms, kind, detail) VALUES (?1, ?2, ?3)")?.execute(params![
            at_ms,
            kind,
            detail.to_string()
        ])?;
        Ok(())
    }

    /// Records when the profile must next be woken; `None` forgets it.
    pub fn set_wakeup(&self, profile_id: &str, due_ms: Option<i64>) -> Result<()> {
        match due_ms {
            Some(due) => self
                .tx
                .prepare_cached(
                    "INSERT INTO wakeups (profile_id, due_ms) VALUES (?1, ?2)
                 ON CONFLICT(profile_id) DO UPDATE SET due_ms = excluded.due_ms",
                )?
                .execute(params![profile_id, due])?,
            None => {
                self.tx.prepare_cached("DELETE FROM wakeups WHERE profile_id = ?1")?.execute(params![profile_id])?
            }
        };
        Ok(())
    }

    pub fn commit(self) -> Result<()> {
        Ok(self.tx.commit()?)
    }
}

/// Where an outbox row is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OutboxStatus {
    /// Waiting for its lane (possibly for a retry or a delay).
    Pending,
    Delivered,
    /// Refused by the destination for good.
    Failed,
    /// A delayed action whose condition no longer held.
    Cancelled,
}

impl OutboxStatus {
    pub const ALL: [OutboxStatus; 4] =
        [OutboxStatus::Pending, OutboxStatus::Delivered, OutboxStatus::Failed, OutboxStatus::Cancelled];

    pub fn name(self) -> &'static str {
        match self {
            OutboxStatus::Pending => "pending",
            OutboxStatus::Delivered => "delivered",
            OutboxStatus::Failed => "failed",
            OutboxStatus::Cancelled => "cancelled",
        }
    }

    pub fn parse(s: &str) -> Option<OutboxStatus> {
        OutboxStatus::ALL.into_iter().find(|status| status.name() == s)
    }
}

impl std::fmt::Display for OutboxStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.name())
    }
}

impl rusqlite::ToSql for OutboxStatus {
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        Ok(self.name().into())
    }
}

impl rusqlite::types::FromSql for OutboxStatus {
    fn column_result(value: rusqlite::types::ValueRef<'_>) -> rusqlite::types::FromSqlResult<Self> {
        let text = value.as_str()?;
        OutboxStatus::parse(text)
            .ok_or_else(|| rusqlite::types::FromSqlError::Other(format!("unknown outbox status `{text}`").into()))
    }
}

/// Reads a trigger column.
fn trigger_at(r: &rusqlite::Row<'_>, column: usize) -> rusqlite::Result<Trigger> {
    let text: String = r.get(column)?;
    Trigger::parse(&text).ok_or_else(|| {
        rusqlite::Error::FromSqlConversionFailure(
            column,
            rusqlite::types::Type::Text,
            format!("unknown trigger `{text}`").into(),
        )
    })
}

/// One row of the outbox.
#[derive(Debug, Clone, serde::Serialize)]
pub struct OutboxEntry {
    pub id: i64,
    pub action: String,
    pub connector: String,
    pub trigger: Trigger,
    pub audience: String,
    pub profile_id: String,
    pub occurred_ms: i64,
    #[serde(skip)]
    pub payload: String,
    pub status: OutboxStatus,
    pub attempts: i64,
    pub next_attempt_ms: i64,
    pub last_error: Option<String>,
    pub delivered_ms: Option<i64>,
    pub condition: Option<String>,
    /// Where in the event log the action was decided.
    #[serde(skip)]
    pub origin: Option<String>,
}

impl OutboxEntry {
    /// The log position of the record that decided the action (none: decided by work that is
    /// not logged, a backfill's).
    pub fn cause_position(&self) -> Option<u64> {
        self.origin.as_deref()?.split('.').next()?.parse().ok()
    }

    /// Stable across retries, restarts, replays of the log and dead-letter replays: the key a
    /// destination deduplicates on. Made of the log position that decided the action, so a
    /// row lost with the machine's power and rebuilt from the log keeps it.
    pub fn idempotency_key(&self) -> String {
        match &self.origin {
            Some(origin) => format!("{}-{origin}", self.action),
            None => format!("{}-{}", self.action, self.id),
        }
    }

    fn from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<OutboxEntry> {
        Ok(OutboxEntry {
            id: r.get(0)?,
            action: r.get(1)?,
            connector: r.get(2)?,
            trigger: trigger_at(r, 3)?,
            audience: r.get(4)?,
            profile_id: r.get(5)?,
            occurred_ms: r.get(6)?,
            payload: r.get(7)?,
            status: r.get(8)?,
            attempts: r.get(9)?,
            next_attempt_ms: r.get(10)?,
            last_error: r.get(11)?,
            delivered_ms: r.get(12)?,
            condition: r.get(13)?,
            origin: r.get(14)?,
        })
    }
}

const OUTBOX_COLUMNS: &str = "id, action, connector, trigger, audience, profile_id, occurred_ms, payload, status, attempts, next_attempt_ms, last_error, delivered_ms, condition, origin";

/// Whether a row's partition (`log_partition`) is one of those owned (a bit per partition,
/// parameter `?{param}`); rows written before rows had one are everyone's.
fn owned_row(param: usize) -> String {
    format!("(log_partition IS NULL OR (?{param} >> log_partition) & 1 = 1)")
}

/// Pending rows of one action due at `now_ms` whose partitions are `owned` (a bit per
/// partition), oldest first.
pub fn due_actions(conn: &Connection, action: &str, now_ms: i64, limit: usize, owned: u64) -> Result<Vec<OutboxEntry>> {
    let sql = format!(
        "SELECT {OUTBOX_COLUMNS} FROM outbox WHERE status = 'pending' AND action = ?1 AND next_attempt_ms <= ?2 AND {} ORDER BY id LIMIT ?3",
        owned_row(4)
    );
    let mut stmt = conn.prepare_cached(&sql)?;
    let rows = stmt.query_map(params![action, now_ms, limit as i64, owned as i64], OutboxEntry::from_row)?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

/// When the next pending row of `action` whose partition is `owned` is due, if any.
pub fn next_due(conn: &Connection, action: &str, owned: u64) -> Result<Option<i64>> {
    let sql = format!(
        "SELECT MIN(next_attempt_ms) FROM outbox WHERE status = 'pending' AND action = ?1 AND {}",
        owned_row(2)
    );
    Ok(conn.prepare_cached(&sql)?.query_row(params![action, owned as i64], |r| r.get(0))?)
}

/// A profile's memberships with when each began, by audience.
pub fn memberships_of(conn: &Connection, profile_id: &str) -> Result<Vec<(String, i64)>> {
    let mut stmt =
        conn.prepare_cached("SELECT audience, joined_ms FROM memberships WHERE profile_id = ?1 ORDER BY audience")?;
    let rows = stmt.query_map([profile_id], |r| Ok((r.get(0)?, r.get(1)?)))?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

/// A profile's actions (outbox rows and dead letters) with the data each carries, oldest first.
pub fn actions_of(conn: &Connection, profile_id: &str) -> Result<Vec<serde_json::Value>> {
    let sql = format!("SELECT {OUTBOX_COLUMNS} FROM outbox WHERE profile_id = ?1 ORDER BY id");
    let mut stmt = conn.prepare_cached(&sql)?;
    let rows = stmt.query_map([profile_id], OutboxEntry::from_row)?;
    let mut actions = Vec::new();
    for entry in rows {
        let entry = entry?;
        let mut value = serde_json::to_value(&entry).expect("an outbox row serializes");
        value["data"] = serde_json::from_str(&entry.payload).unwrap_or(serde_json::Value::Null);
        actions.push(value);
    }
    let mut stmt = conn.prepare_cached(
        "SELECT id, action, trigger, audience, occurred_ms, payload, attempts, last_error, died_ms FROM dead_letters WHERE profile_id = ?1 ORDER BY id",
    )?;
    let dead = stmt.query_map([profile_id], |r| {
        Ok(serde_json::json!({
            "id": r.get::<_, i64>(0)?,
            "action": r.get::<_, String>(1)?,
            "trigger": r.get::<_, String>(2)?,
            "audience": r.get::<_, String>(3)?,
            "occurred_ms": r.get::<_, i64>(4)?,
            "data": serde_json::from_str::<serde_json::Value>(&r.get::<_, String>(5)?).unwrap_or(serde_json::Value::Null),
            "status": "dead",
            "attempts": r.get::<_, i64>(6)?,
            "last_error": r.get::<_, Option<String>>(7)?,
            "died_ms": r.get::<_, i64>(8)?,
        }))
    })?;
    for row in dead {
        actions.push(row?);
    }
    Ok(actions)
}

/// Outbox rows, newest first, optionally with one status.
pub fn list_actions(conn: &Connection, status: Option<OutboxStatus>, limit: usize) -> Result<Vec<OutboxEntry>> {
    let sql =
        format!("SELECT {OUTBOX_COLUMNS} FROM outbox WHERE (?1 IS NULL OR status = ?1) ORDER BY id DESC LIMIT ?2");
    let mut stmt = conn.prepare_cached(&sql)?;
    let rows = stmt.query_map(params![status, limit as i64], OutboxEntry::from_row)?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

/// The result of one delivery attempt.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Attempt {
    Delivered,
    /// Try again at the given time.
    Retry {
        at_ms: i64,
        error: String,
    },
    /// Give up on a permanent error: the row stays, `failed`.
    Fail {
        error: String,
    },
    /// Give up after the last retry: the row moves to the dead letters.
    Bury {
        error: String,
    },
    /// A delayed action whose condition no longer holds.
    Cancel {
        reason: String,
    },
}

pub fn record_attempt(conn: &Connection, id: i64, attempt: &Attempt, now_ms: i64) -> Result<()> {
    let _gate = write_gate();
    match attempt {
        Attempt::Delivered => conn.execute(
            "UPDATE outbox SET status = 'delivered', attempts = attempts + 1, delivered_ms = ?2, last_error = NULL WHERE id = ?1",
            params![id, now_ms],
        )?,
        Attempt::Retry { at_ms, error } => conn.execute(
            "UPDATE outbox SET attempts = attempts + 1, next_attempt_ms = ?2, last_error = ?3 WHERE id = ?1",
            params![id, at_ms, error],
        )?,
        Attempt::Bury { error } => {
            let tx = conn.unchecked_transaction()?;
            tx.execute(
                "INSERT INTO dead_letters (id, action, connector, trigger, audience, profile_id, occurred_ms, payload, attempts, last_error, condition, died_ms, origin)
                 SELECT id, action, connector, trigger, audience, profile_id, occurred_ms, payload, attempts + 1, ?2, condition, ?3, origin FROM outbox WHERE id = ?1",
                params![id, error, now_ms],
            )?;
            tx.execute("DELETE FROM outbox WHERE id = ?1", [id])?;
            tx.commit()?;
            1
        }
        Attempt::Fail { error } => conn.execute(
            "UPDATE outbox SET status = ?2, attempts = attempts + 1, last_error = ?3 WHERE id = ?1",
            params![id, OutboxStatus::Failed, error],
        )?,
        Attempt::Cancel { reason } => conn.execute(
            "UPDATE outbox SET status = 'cancelled', last_error = ?2 WHERE id = ?1",
            params![id, reason],
        )?,
    };
    Ok(())
}

/// A dead letter: an action that exhausted its retries.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DeadLetter {
    pub id: i64,
    pub action: String,
    pub connector: String,
    pub trigger: Trigger,
    pub audience: String,
    pub profile_id: String,
    pub occurred_ms: i64,
    pub attempts: i64,
    pub last_error: Option<String>,
    pub died_ms: i64,
}

pub fn dead_letters(conn: &Connection, limit: usize) -> Result<Vec<DeadLetter>> {
    let mut stmt = conn.prepare_cached(
        "SELECT id, action, connector, trigger, audience, profile_id, occurred_ms, attempts, last_error, died_ms
         FROM dead_letters ORDER BY id DESC LIMIT ?1",
    )?;
    let rows = stmt.query_map([limit as i64], |r| {
        Ok(DeadLetter {
            id: r.get(0)?,
            action: r.get(1)?,
            connector: r.get(2)?,
            trigger: trigger_at(r, 3)?,
            audience: r.get(4)?,
            profile_id: r.get(5)?,
            occurred_ms: r.get(6)?,
            attempts: r.get(7)?,
            last_error: r.get(8)?,
            died_ms: r.get(9)?,
        })
    })?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

/// Moves dead letters (one id, or all when `None`) back to the outbox as pending, due now,
/// with their attempts reset. They keep their id, hence their idempotency key. Returns how many.
pub fn replay_dead_letters(conn: &mut Connection, id: Option<i64>, now_ms: i64) -> Result<usize> {
    let _gate = write_gate();
    let tx = conn.transaction()?;
    let moved = tx.execute(
        "INSERT INTO outbox (id, action, connector, trigger, audience, profile_id, occurred_ms, payload, status, attempts, next_attempt_ms, last_error, condition, origin)
         SELECT id, action, connector, trigger, audience, profile_id, occurred_ms, payload, 'pending', 0, ?2, last_error, condition, origin
         FROM dead_letters WHERE ?1 IS NULL OR id = ?1",
        params![id, now_ms],
    )?;
    tx.execute("DELETE FROM dead_letters WHERE ?1 IS NULL OR id = ?1", params![id])?;
    tx.commit()?;
    Ok(moved)
}

/// Current member count of every audience that has members.
pub fn audience_sizes(conn: &Connection) -> Result<Vec<(String, i64)>> {
    let mut stmt = conn.prepare_cached("SELECT audience, COUNT(*) FROM memberships GROUP BY audience")?;
    let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

/// What became of a claim on an id (see [`Batch::claim_identity`]).
#[derive(Debug, Clone, PartialEq)]
pub enum Claimed {
    /// The id is linked to the claiming profile.
    Linked,
    /// The id was linked to the claiming profile already.
    Held,
    /// The id was linked to `owner` first.
    Lost { owner: String },
    /// The id was linked by a claim later in the log (`overtaken`, made by the record at
    /// `position`), which now has lost: it is linked to the claiming profile.
    Overtook { overtaken: IdentityLink, position: u64 },
}

/// One identity decision, as recorded in `identity_links`.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct IdentityLink {
    pub profile_id: String,
    pub visitor_id: String,
    pub kind: &'static str,
    pub other_id: Option<String>,
    pub attribute: Option<String>,
    pub event_id: Option<String>,
    pub at_ms: i64,
    pub detail: Option<String>,
}

/// The ids linked to a profile.
pub fn ids_of(conn: &Connection, profile_id: &str) -> Result<Vec<String>> {
    let mut stmt =
        conn.prepare_cached("SELECT visitor_id FROM identities WHERE profile_id = ?1 ORDER BY visitor_id")?;
    let rows = stmt.query_map([profile_id], |r| r.get(0))?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

/// Visits every id linked to a profile other than the one named after it, one row at a time
/// (there may be millions).
pub fn each_stitched_id(conn: &Connection, mut visit: impl FnMut(String)) -> Result<()> {
    let mut stmt = conn.prepare("SELECT visitor_id FROM identities WHERE visitor_id <> profile_id")?;
    let mut rows = stmt.query([])?;
    while let Some(row) = rows.next()? {
        visit(row.get(0)?);
    }
    Ok(())
}

/// The ids linked to `profile_id` that are values of a capped visitor-id attribute, by
/// attribute: the values a profile another node holds is known to hold here.
pub fn capped_ids_of(conn: &Connection, profile_id: &str) -> Result<BTreeMap<String, BTreeSet<String>>> {
    let mut stmt = conn.prepare_cached(
        "SELECT attribute, visitor_id FROM identities WHERE profile_id = ?1 AND attribute IS NOT NULL",
    )?;
    let mut capped: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for row in stmt.query_map([profile_id], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))? {
        let (attribute, id) = row?;
        capped.entry(attribute).or_default().insert(id);
    }
    Ok(capped)
}

/// Whether profile `id` was split out of profile `profile_id` (they may not stitch again).
pub fn was_unstitched(conn: &Connection, id: &str, profile_id: &str) -> Result<bool> {
    Ok(conn
        .prepare_cached(
            "SELECT 1 FROM identity_links WHERE visitor_id = ?1 AND kind = 'unstitched' AND other_id = ?2 LIMIT 1",
        )?
        .query_row([id, profile_id], |_| Ok(()))
        .optional()?
        .is_some())
}

/// The profile holding `profile`'s ids here: `profile` itself, or, merged away (see
/// `merged_away`), the profile it was merged into, followed through that one's merges.
/// A link to a profile merged away (its claim or own link applied after the merge, by another
/// worker following another partition) goes there, as it would have moved with the merge.
pub fn survivor_of(conn: &Connection, profile: &str) -> Result<String> {
    let mut survivor = profile.to_string();
    // Merges make no cycle; a database holding one all the same is not followed round it.
    let mut seen = HashSet::new();
    while seen.insert(survivor.clone()) {
        let next: Option<String> = conn
            .prepare_cached("SELECT survivor FROM merged_away WHERE absorbed = ?1")?
            .query_row([&survivor], |r| r.get(0))
            .optional()?;
        match next {
            Some(next) => survivor = next,
            None => break,
        }
    }
    Ok(survivor)
}

/// Whether profile `absorbed` was merged into another (see `merged_away`).
pub fn was_merged_away(conn: &Connection, absorbed: &str) -> Result<bool> {
    Ok(conn
        .prepare_cached("SELECT 1 FROM merged_away WHERE absorbed = ?1")?
        .query_row([absorbed], |_| Ok(()))
        .optional()?
        .is_some())
}

/// The identity history of a profile, oldest first.
pub fn identity_history(conn: &Connection, profile_id: &str) -> Result<Vec<serde_json::Value>> {
    let mut stmt = conn.prepare_cached(
        "SELECT visitor_id, kind, other_id, attribute, event_id, at_ms, detail FROM identity_links
         WHERE profile_id = ?1 OR other_id = ?1 ORDER BY seq",
    )?;
    let rows = stmt.query_map([profile_id], |r| {
        Ok(serde_json::json!({
            "id": r.get::<_, String>(0)?,
            "kind": r.get::<_, String>(1)?,
            "other_profile": r.get::<_, Option<String>>(2)?,
            "attribute": r.get::<_, Option<String>>(3)?,
            "event_id": r.get::<_, Option<String>>(4)?,
            "at": starling_core::time::format_rfc3339(r.get(5)?),
            "detail": r.get::<_, Option<String>>(6)?,
        }))
    })?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

/// The logged events of a profile, oldest first, as they were received.
pub fn profile_events(conn: &Connection, profile_id: &str) -> Result<Vec<starling_core::Event>> {
    let mut stmt = conn.prepare_cached(
        "SELECT event_id, name, COALESCE(visitor_id, profile_id), source, ts_ms, data FROM events
         WHERE profile_id = ?1 ORDER BY ts_ms, seq",
    )?;
    let rows = stmt.query_map([profile_id], |r| {
        Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get::<_, String>(5)?))
    })?;
    let mut events = Vec::new();
    for row in rows {
        let (id, name, visitor_id, source, timestamp_ms, data) = row?;
        let data = serde_json::from_str(&data)
            .map_err(|e| StoreError::Corrupt { id: profile_id.to_string(), message: format!("event data: {e}") })?;
        events.push(starling_core::Event { id, name, visitor_id, source, timestamp_ms, data });
    }
    Ok(events)
}

/// Profiles whose wake-up time has come, earliest first.
pub fn due_wakeups(conn: &Connection, now_ms: i64, limit: usize) -> Result<Vec<String>> {
    let mut stmt = conn.prepare_cached("SELECT profile_id FROM wakeups WHERE due_ms <= ?1 ORDER BY due_ms LIMIT ?2")?;
    let rows = stmt.query_map(params![now_ms, limit as i64], |r| r.get(0))?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

/// The member count of one audience.
pub fn audience_size(conn: &Connection, audience: &str) -> Result<i64> {
    Ok(conn
        .prepare_cached("SELECT COUNT(*) FROM memberships WHERE audience = ?1")?
        .query_row([audience], |r| r.get(0))?)
}

/// Records the current size of every audience in `audiences` at `now_ms`, and forgets samples
/// older than `keep_ms`.
pub fn sample_audience_sizes(conn: &mut Connection, audiences: &[String], now_ms: i64, keep_ms: i64) -> Result<()> {
    let _gate = write_gate();
    let sizes: std::collections::HashMap<String, i64> = audience_sizes(conn)?.into_iter().collect();
    let tx = conn.transaction()?;
    {
        let mut insert =
            tx.prepare_cached("INSERT OR REPLACE INTO audience_sizes (at_ms, audience, size) VALUES (?1, ?2, ?3)")?;
        for a in audiences {
            insert.execute(params![now_ms, a, sizes.get(a).copied().unwrap_or(0)])?;
        }
        tx.execute("DELETE FROM audience_sizes WHERE at_ms < ?1", [now_ms - keep_ms])?;
    }
    tx.commit()?;
    Ok(())
}

/// Sampled sizes of `audience` since `since_ms`, oldest first.
pub fn audience_size_history(conn: &Connection, audience: &str, since_ms: i64) -> Result<Vec<(i64, i64)>> {
    let mut stmt = conn
        .prepare_cached("SELECT at_ms, size FROM audience_sizes WHERE audience = ?1 AND at_ms >= ?2 ORDER BY at_ms")?;
    let rows = stmt.query_map(params![audience, since_ms], |r| Ok((r.get(0)?, r.get(1)?)))?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A partition restored from another node's snapshot: its profiles, their history and
    /// memberships and the actions its records decided become the snapshot's; what this
    /// database held of it goes; other partitions and the ids stay; a profile merged into another
    /// partition's since the snapshot is not taken, one merged within the partition is.
    #[test]
    fn a_partition_restored_from_a_snapshot_is_the_snapshots() {
        let dir = tempfile::tempdir().unwrap();
        let event = |visitor: &str, id: &str| starling_core::Event {
            id: Some(id.into()),
            name: "view".into(),
            visitor_id: visitor.into(),
            source: None,
            timestamp_ms: 5,
            data: Default::default(),
        };
        let write = |path: &Path, profiles: &[(&str, &str)], outbox_partition: u16| {
            let mut conn = open(path).unwrap();
            let tx = Batch::begin(&mut conn).unwrap();
            for (profile, event_id) in profiles {
                tx.save_profile(&Profile::new(profile.to_string()), 0, Some(0)).unwrap();
                tx.log_event(&event(profile, event_id), profile, 5).unwrap();
                tx.join(profile, "everyone", 5).unwrap();
                tx.link_identity(profile, profile).unwrap();
            }
            tx.commit().unwrap();
            conn.execute(
                "INSERT INTO outbox (action, connector, trigger, audience, profile_id, occurred_ms, payload,
                 next_attempt_ms, origin, log_partition) VALUES ('a', 'c', 'joined', 'everyone', ?1, 5, '{}', 5, ?2, ?3)",
                params![profiles[0].0, format!("9.{outbox_partition}"), outbox_partition],
            )
            .unwrap();
        };
        let of_p = |id: &str| id.starts_with('p');
        let (snapshot, local) = (dir.path().join("snapshot.db"), dir.path().join("local.db"));
        write(&snapshot, &[("p-kept", "e1"), ("p-merged", "e2"), ("q-other", "e3"), ("p-inner", "e6")], 7);
        write(&local, &[("p-stale", "e4"), ("q-mine", "e5")], 7);
        let mut conn = open(&local).unwrap();
        {
            let tx = Batch::begin(&mut conn).unwrap();
            tx.link_identity("p-merged", "q-mine").unwrap();
            tx.link_identity("p-inner", "p-kept").unwrap();
            tx.commit().unwrap();
        }
        let restored = restore_partition(&mut conn, Some(&snapshot), 7, Some(42), &of_p).unwrap();
        assert_eq!(restored, RestoredPartition { dropped: 1, profiles: 2 });
        assert!(load_profile(&conn, "p-inner").unwrap().is_some(), "merged within the partition: merged again");
        assert!(load_profile(&conn, "p-kept").unwrap().is_some());
        assert!(load_profile(&conn, "p-stale").unwrap().is_none(), "what this database held of the partition goes");
        assert!(load_profile(&conn, "p-merged").unwrap().is_none(), "merged away since the snapshot");
        assert!(load_profile(&conn, "q-mine").unwrap().is_some() && load_profile(&conn, "q-other").unwrap().is_none());
        assert_eq!(profile_events(&conn, "p-kept").unwrap().len(), 1);
        assert_eq!(memberships_of(&conn, "p-kept").unwrap().len(), 1);
        assert!(event_seen(&conn, "e1", 0).unwrap());
        let outbox: Vec<String> = conn
            .prepare("SELECT profile_id FROM outbox WHERE log_partition = 7")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap();
        assert_eq!(outbox, ["p-kept"], "the partition's actions are the snapshot's");
        assert_eq!(log_positions(&conn).unwrap(), [(7, 42)]);
        assert_eq!(resolve_identity(&conn, "p-stale").unwrap().as_deref(), Some("p-stale"), "ids stay");

        // Given up: dropped, its position left as it is.
        let dropped = restore_partition(&mut conn, None, 7, None, &of_p).unwrap();
        assert_eq!(dropped, RestoredPartition { dropped: 2, profiles: 0 });
        assert!(load_profile(&conn, "p-kept").unwrap().is_none());
        assert_eq!(log_positions(&conn).unwrap(), [(7, 42)]);
    }

    #[test]
    fn a_version_4_database_keeps_its_seen_event_ids_in_the_new_table() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v4.db");
        {
            // Today's schema with version 4's table of seen ids.
            let old = open(&path).unwrap();
            old.execute_batch(
                "DROP TABLE seen_events;
                 CREATE TABLE seen_events (event_id TEXT PRIMARY KEY, seen_ms INTEGER NOT NULL);
                 INSERT INTO seen_events VALUES ('evt-1', 1000);
                 PRAGMA user_version = 4;",
            )
            .unwrap();
        }
        let conn = open(&path).unwrap();
        assert!(event_seen(&conn, "evt-1", 0).unwrap());
        assert!(!event_seen(&conn, "evt-2", 0).unwrap());
        let sql: String =
            conn.query_row("SELECT sql FROM sqlite_master WHERE name = 'seen_events'", [], |r| r.get(0)).unwrap();
        assert!(sql.ends_with("WITHOUT ROWID"), "{sql}");
        assert_eq!(conn.pragma_query_value(None, "user_version", |r| r.get::<_, i64>(0)).unwrap(), SCHEMA_VERSION);
    }

    #[test]
    fn the_wal_starts_over_once_checkpointed_even_while_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let mut writer = open_writer(&path).unwrap();
        let checkpointer = open(&path).unwrap();
        let reader = open(&path).unwrap();
        let write_pages = |conn: &mut Connection, round: usize, n: usize| {
            let tx = Batch::begin(conn).unwrap();
            for i in 0..n {
                tx.save_profile(&Profile::new(format!("p{round}-{i}-{}", "x".repeat(4000))), 0, Some(0)).unwrap();
            }
            tx.commit().unwrap();
        };
        for round in 0..6 {
            write_pages(&mut writer, round, 1_000);
            // A reader is always somewhere in the WAL on a busy server.
            let _: i64 = reader.query_row("SELECT COUNT(*) FROM profiles", [], |r| r.get(0)).unwrap();
        }
        let (log, done) = checkpoint(&checkpointer).unwrap();
        assert!(log >= WAL_RESTART_FRAMES, "enough frames to restart: {log}");
        assert_eq!(log, done);
        write_pages(&mut writer, 99, 1);
        let (log, _) = checkpoint(&checkpointer).unwrap();
        assert!(log < 100, "the next write started the WAL over: {log} frames");
    }

    #[test]
    fn a_restart_does_not_wait_for_a_reader_in_the_wal() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let mut writer = open_writer(&path).unwrap();
        let checkpointer = open(&path).unwrap();
        let reader = open(&path).unwrap();
        let tx = Batch::begin(&mut writer).unwrap();
        for i in 0..6_000 {
            tx.save_profile(&Profile::new(format!("p{i}-{}", "x".repeat(4000))), 0, Some(0)).unwrap();
        }
        tx.commit().unwrap();
        // A read transaction left open on the WAL: a restart would wait for it to end.
        reader.execute_batch("BEGIN").unwrap();
        let _: i64 = reader.query_row("SELECT COUNT(*) FROM profiles", [], |r| r.get(0)).unwrap();
        let started = std::time::Instant::now();
        let (log, done) = checkpoint(&checkpointer).unwrap();
        assert!(started.elapsed() < std::time::Duration::from_secs(2), "waited {:?}", started.elapsed());
        assert!(log >= WAL_RESTART_FRAMES && log == done, "copied back, not started over: {log}/{done}");
        reader.execute_batch("COMMIT").unwrap();
        // Tried again at the next checkpoint, once the reader has left.
        checkpoint(&checkpointer).unwrap();
        let tx = Batch::begin(&mut writer).unwrap();
        tx.save_profile(&Profile::new("after".to_string()), 0, Some(0)).unwrap();
        tx.commit().unwrap();
        let (log, _) = checkpoint(&checkpointer).unwrap();
        assert!(log < 100, "the next write started the WAL over: {log} frames");
    }

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
    fn a_deletion_keeps_an_earlier_deletions_pending_notice_and_a_failed_notice_keeps_nothing_personal() {
        let dir = tempfile::tempdir().unwrap();
        let mut conn = open(&dir.path().join("d.db")).unwrap();
        let notice = PendingAction { trigger: Trigger::Deleted, audience: String::new(), ..action() };
        let payload = serde_json::json!({ "email": "ann@example.com" });
        let first = {
            let batch = Batch::begin(&mut conn).unwrap();
            batch.save_profile(&Profile::new("p1"), 0, Some(0)).unwrap();
            batch.delete_profile("p1").unwrap();
            let id = batch.enqueue(&notice, &payload, 5, None, None, 0).unwrap().unwrap();
            batch.commit().unwrap();
            id
        };
        // The id is reused, and its new profile deleted before the first notice went out.
        let batch = Batch::begin(&mut conn).unwrap();
        batch.save_profile(&Profile::new("p1"), 0, Some(0)).unwrap();
        batch.enqueue(&action(), &serde_json::json!({}), 5, None, None, 0).unwrap();
        let removed = batch.delete_profile("p1").unwrap();
        batch.commit().unwrap();
        assert_eq!(removed["actions"], 1, "the joined action goes, the pending notice stays");
        let pending = due_actions(&conn, "hook", 10, 10, u64::MAX).unwrap();
        assert_eq!(pending.iter().map(|e| e.id).collect::<Vec<_>>(), vec![first]);

        record_attempt(&conn, first, &Attempt::Bury { error: "503 from the destination".into() }, 20).unwrap();
        forget_failed_deletion_notice(&conn, first, 20).unwrap();
        let dump: String = conn
            .query_row(
                "SELECT coalesce(group_concat(x, '|'), '') FROM (SELECT payload AS x FROM dead_letters UNION ALL SELECT payload FROM outbox UNION ALL SELECT kind || detail FROM audit_log)",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert!(!dump.contains("ann@example.com"), "{dump}");
        assert!(dump.contains("deletion_notice_failed") && dump.contains("503 from the destination"), "{dump}");
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
            batch.save_profile(&p, 10, Some(0)).unwrap();
            batch.join("p1", "vips", 10).unwrap();
            batch.enqueue(&action(), &serde_json::json!({}), 5, None, None, 0).unwrap();
            batch.commit().unwrap();
        }
        let conn = open(&path).unwrap();
        let p = find_profile(&conn, "anon-1").unwrap().unwrap();
        assert_eq!(p.event_count, 3);
        assert_eq!(audience_sizes(&conn).unwrap(), vec![("vips".to_string(), 1)]);
        assert_eq!(due_actions(&conn, "hook", 5, 10, u64::MAX).unwrap().len(), 1);
        assert_eq!(due_actions(&conn, "hook", 4, 10, u64::MAX).unwrap().len(), 0);
    }

    #[test]
    fn a_node_reads_only_the_rows_of_the_partitions_it_owns() {
        let dir = tempfile::tempdir().unwrap();
        let mut conn = open(&dir.path().join("s.db")).unwrap();
        let batch = Batch::begin(&mut conn).unwrap();
        for (origin, partition) in [("1.0", 0), ("2.0", 5), ("3.0", 63)] {
            batch.enqueue(&action(), &serde_json::json!({}), 5, None, Some(origin), partition).unwrap();
        }
        batch.commit().unwrap();
        conn.execute("INSERT INTO outbox (action, connector, trigger, audience, profile_id, occurred_ms, payload, next_attempt_ms, origin) SELECT action, connector, trigger, audience, profile_id, occurred_ms, payload, 7, '4.0' FROM outbox LIMIT 1", []).unwrap();
        let origins = |owned: u64| -> Vec<String> {
            due_actions(&conn, "hook", 10, 10, owned).unwrap().into_iter().filter_map(|e| e.origin).collect()
        };
        assert_eq!(origins(u64::MAX), ["1.0", "2.0", "3.0", "4.0"]);
        assert_eq!(origins(1 << 5 | 1 << 63), ["2.0", "3.0", "4.0"], "a row from before partitions is everyone's");
        assert_eq!(origins(0), ["4.0"]);
        assert_eq!(next_due(&conn, "hook", 1 << 63).unwrap(), Some(5));
        assert_eq!(next_due(&conn, "hook", 0).unwrap(), Some(7));
    }

    #[test]
    fn an_uncommitted_batch_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let mut conn = open(&dir.path().join("s.db")).unwrap();
        {
            let batch = Batch::begin(&mut conn).unwrap();
            batch.link_identity("anon-1", "p1").unwrap();
            batch.save_profile(&Profile::new("p1"), 1, Some(0)).unwrap();
        }
        assert!(find_profile(&conn, "anon-1").unwrap().is_none());
    }

    /// A profile merged away leads to the profile holding its ids now, through later merges;
    /// deleting that profile forgets the merges into it, so that an id of theirs seen again
    /// starts a profile of its own.
    #[test]
    fn a_profile_merged_away_leads_to_its_survivor_until_that_is_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let mut conn = open(&dir.path().join("s.db")).unwrap();
        let batch = Batch::begin(&mut conn).unwrap();
        for profile in ["phone", "laptop", "tablet", "other"] {
            batch.link_identity(profile, profile).unwrap();
        }
        batch.merge_carried("phone", "laptop").unwrap();
        batch.merge_carried("laptop", "tablet").unwrap();
        assert_eq!(survivor_of(batch.connection(), "phone").unwrap(), "tablet");
        assert_eq!(survivor_of(batch.connection(), "laptop").unwrap(), "tablet");
        assert_eq!(survivor_of(batch.connection(), "tablet").unwrap(), "tablet");
        assert_eq!(survivor_of(batch.connection(), "unknown").unwrap(), "unknown");
        // A cycle no merge makes is not followed round.
        batch.merge_carried("other", "cycle").unwrap();
        batch.merge_carried("cycle", "other").unwrap();
        assert!(["other", "cycle"].contains(&survivor_of(batch.connection(), "other").unwrap().as_str()));
        batch.delete_profile("tablet").unwrap();
        for profile in ["phone", "laptop", "tablet"] {
            assert_eq!(survivor_of(batch.connection(), profile).unwrap(), profile, "{profile}");
        }
        batch.merge_carried("cycle", "away").unwrap();
        batch.forget_ids("away").unwrap();
        assert_eq!(
            survivor_of(batch.connection(), "cycle").unwrap(),
            "cycle",
            "forgotten on another node's deletion too"
        );
    }

    /// An id of a deleted profile that started a profile of its own before the deletion was
    /// written (its own link ignored, as the old one was still there) keeps it: deleting,
    /// or forgetting another node's deletion, leaves it linked to its own profile.
    #[test]
    fn an_id_that_started_its_own_profile_before_its_old_one_was_deleted_keeps_it() {
        let dir = tempfile::tempdir().unwrap();
        let mut conn = open(&dir.path().join("s.db")).unwrap();
        let batch = Batch::begin(&mut conn).unwrap();
        for (id, profile) in [("laptop", "laptop"), ("tablet", "laptop"), ("email", "laptop")] {
            batch.link_identity(id, profile).unwrap();
        }
        batch.save_profile(&Profile::new("laptop".to_string()), 0, Some(0)).unwrap();
        batch.save_profile(&Profile::new("tablet".to_string()), 0, Some(0)).unwrap();
        assert!(!batch.link_identity("tablet", "tablet").unwrap(), "linked already");
        batch.delete_profile("laptop").unwrap();
        assert_eq!(resolve_identity(batch.connection(), "tablet").unwrap().as_deref(), Some("tablet"));
        assert_eq!(resolve_identity(batch.connection(), "email").unwrap(), None);
        assert_eq!(resolve_identity(batch.connection(), "laptop").unwrap(), None);
        // Another node's deletion, followed: the ids are forgotten alike.
        for (id, profile) in [("phone", "web"), ("watch", "web")] {
            batch.link_identity(id, profile).unwrap();
        }
        batch.save_profile(&Profile::new("watch".to_string()), 0, Some(0)).unwrap();
        batch.forget_ids("web").unwrap();
        assert_eq!(resolve_identity(batch.connection(), "watch").unwrap().as_deref(), Some("watch"));
        assert_eq!(resolve_identity(batch.connection(), "phone").unwrap(), None);
    }

    /// An id split out of a profile leaves behind what was merged into its old profile: a late
    /// link to one of those goes to the profile split from, where its ids are.
    #[test]
    fn a_split_leaves_the_profiles_merged_into_the_split_id_with_the_profile_split_from() {
        let dir = tempfile::tempdir().unwrap();
        let mut conn = open(&dir.path().join("s.db")).unwrap();
        let batch = Batch::begin(&mut conn).unwrap();
        for profile in ["phone", "laptop", "tablet"] {
            batch.link_identity(profile, profile).unwrap();
        }
        batch.merge_profiles("tablet", "laptop").unwrap();
        batch.merge_profiles("laptop", "phone").unwrap();
        batch.split_identity("laptop", "phone").unwrap();
        assert_eq!(survivor_of(batch.connection(), "laptop").unwrap(), "laptop");
        assert_eq!(survivor_of(batch.connection(), "tablet").unwrap(), "phone");
        assert_eq!(resolve_identity(batch.connection(), "tablet").unwrap().as_deref(), Some("phone"));
    }

    #[test]
    fn a_claim_earlier_in_the_log_overtakes_one_linked_before_it() {
        let dir = tempfile::tempdir().unwrap();
        let mut conn = open(&dir.path().join("s.db")).unwrap();
        let batch = Batch::begin(&mut conn).unwrap();
        assert_eq!(batch.claim_identity("ann@x", "b", Some(20)).unwrap(), Claimed::Linked);
        assert_eq!(batch.claim_identity("ann@x", "b", Some(20)).unwrap(), Claimed::Held);
        // Later in the log, or not logged: lost to the first.
        assert_eq!(batch.claim_identity("ann@x", "c", Some(21)).unwrap(), Claimed::Lost { owner: "b".into() });
        assert_eq!(batch.claim_identity("ann@x", "c", None).unwrap(), Claimed::Lost { owner: "b".into() });
        let overtaken = |claimed| match claimed {
            Claimed::Overtook { overtaken, position } => (overtaken.profile_id, overtaken.attribute, position),
            other => panic!("not overtaken: {other:?}"),
        };
        let claim = IdentityLink {
            profile_id: "b".into(),
            visitor_id: "ann@x".into(),
            kind: "link",
            other_id: None,
            attribute: Some("email".into()),
            event_id: None,
            at_ms: 5,
            detail: None,
        };
        batch.record_identity(&claim).unwrap();
        assert_eq!(
            overtaken(batch.claim_identity("ann@x", "a", Some(19)).unwrap()),
            ("b".to_string(), Some("email".to_string()), 20)
        );
        assert_eq!(overtaken(batch.claim_identity("ann@x", "z", Some(12)).unwrap()).2, 19);
        assert_eq!(resolve_identity(batch.connection(), "ann@x").unwrap().as_deref(), Some("z"));
        // Moved by a merge, the id is no longer a claim as made: nothing overtakes it.
        batch.merge_profiles("z", "y").unwrap();
        assert_eq!(batch.claim_identity("ann@x", "a", Some(1)).unwrap(), Claimed::Lost { owner: "y".into() });
        // An id linked otherwise (a visitor's own) is never overtaken.
        batch.link_identity("anon-1", "anon-1").unwrap();
        assert_eq!(batch.claim_identity("anon-1", "a", Some(1)).unwrap(), Claimed::Lost { owner: "anon-1".into() });
    }

    #[test]
    fn a_replayed_action_is_stored_once_and_keyed_by_its_log_position() {
        let dir = tempfile::tempdir().unwrap();
        let mut conn = open(&dir.path().join("s.db")).unwrap();
        for _ in 0..2 {
            let batch = Batch::begin(&mut conn).unwrap();
            batch.enqueue(&action(), &serde_json::json!({}), 5, None, Some("17.0"), 0).unwrap();
            batch.set_log_position(3, 17).unwrap();
            batch.set_log_position(3, 12).unwrap();
            batch.commit().unwrap();
        }
        let rows = due_actions(&conn, "hook", 5, 10, u64::MAX).unwrap();
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].idempotency_key(), "hook-17.0");
        assert_eq!(log_positions(&conn).unwrap(), vec![(3, 17)]);
    }

    #[test]
    fn history_is_trimmed_to_the_newest_events_and_by_age() {
        let dir = tempfile::tempdir().unwrap();
        let mut conn = open(&dir.path().join("s.db")).unwrap();
        let batch = Batch::begin(&mut conn).unwrap();
        for i in 0..10 {
            let event = starling_core::Event {
                id: Some(format!("e{i}")),
                name: "view".into(),
                visitor_id: "p1".into(),
                source: None,
                timestamp_ms: i,
                data: Default::default(),
            };
            batch.log_event(&event, "p1", i * 100).unwrap();
        }
        assert_eq!(batch.trim_history("p1", 6).unwrap(), 4);
        batch.commit().unwrap();
        let names: Vec<i64> = profile_events(&conn, "p1").unwrap().iter().map(|e| e.timestamp_ms).collect();
        assert_eq!(names, vec![4, 5, 6, 7, 8, 9]);
        // Two rows at a time: the six kept after trimming were received at 400 to 900.
        assert_eq!(prune_history(&conn, 700, 0, 2).unwrap(), (2, Some(6)));
        assert_eq!(prune_history(&conn, 700, 6, 100).unwrap(), (1, None));
        assert_eq!(profile_events(&conn, "p1").unwrap().len(), 3);
    }

    #[test]
    fn attempts_move_rows_through_their_states() {
        let dir = tempfile::tempdir().unwrap();
        let mut conn = open(&dir.path().join("s.db")).unwrap();
        let batch = Batch::begin(&mut conn).unwrap();
        let id = batch.enqueue(&action(), &serde_json::json!({}), 5, None, None, 0).unwrap().unwrap();
        batch.commit().unwrap();
        record_attempt(&conn, id, &Attempt::Retry { at_ms: 100, error: "HTTP 503".into() }, 6).unwrap();
        assert!(due_actions(&conn, "hook", 99, 10, u64::MAX).unwrap().is_empty());
        let row = &due_actions(&conn, "hook", 100, 10, u64::MAX).unwrap()[0];
        assert_eq!((row.attempts, row.last_error.as_deref()), (1, Some("HTTP 503")));
        record_attempt(&conn, id, &Attempt::Delivered, 101).unwrap();
        assert_eq!(list_actions(&conn, Some(OutboxStatus::Delivered), 10).unwrap()[0].delivered_ms, Some(101));
        assert_eq!(next_due(&conn, "hook", u64::MAX).unwrap(), None);
    }

    #[test]
    fn dead_letters_keep_their_error_and_replay_with_the_same_id() {
        let dir = tempfile::tempdir().unwrap();
        let mut conn = open(&dir.path().join("s.db")).unwrap();
        let batch = Batch::begin(&mut conn).unwrap();
        let id = batch.enqueue(&action(), &serde_json::json!({"x": 1}), 5, None, None, 0).unwrap().unwrap();
        batch.commit().unwrap();
        record_attempt(&conn, id, &Attempt::Bury { error: "HTTP 500".into() }, 9).unwrap();
        assert!(list_actions(&conn, None, 10).unwrap().is_empty());
        let dead = dead_letters(&conn, 10).unwrap();
        assert_eq!((dead[0].id, dead[0].attempts, dead[0].last_error.as_deref()), (id, 1, Some("HTTP 500")));
        assert_eq!(replay_dead_letters(&mut conn, None, 20).unwrap(), 1);
        assert!(dead_letters(&conn, 10).unwrap().is_empty());
        let again = &due_actions(&conn, "hook", 20, 10, u64::MAX).unwrap()[0];
        assert_eq!((again.id, again.attempts, again.payload.as_str()), (id, 0, r#"{"x":1}"#));
    }

    /// A standby's copy takes the delivery states another node's copy holds, by origin.
    #[test]
    fn delivery_states_are_adopted_from_another_copy_by_origin() {
        let dir = tempfile::tempdir().unwrap();
        let (here, there) = (dir.path().join("here.db"), dir.path().join("there.db"));
        let mut ids = Vec::new();
        for path in [&here, &there] {
            let mut conn = open(path).unwrap();
            let batch = Batch::begin(&mut conn).unwrap();
            let first =
                batch.enqueue(&action(), &serde_json::json!({"n": 0}), 5, None, Some("7.0"), 0).unwrap().unwrap();
            batch.enqueue(&action(), &serde_json::json!({"n": 1}), 5, None, Some("7.1"), 0).unwrap();
            batch.commit().unwrap();
            ids.push(first);
        }
        record_attempt(&open(&there).unwrap(), ids[1], &Attempt::Delivered, 9).unwrap();
        let conn = open(&here).unwrap();
        assert_eq!(adopt_deliveries(&conn, &there).unwrap(), 1);
        let due: Vec<String> =
            due_actions(&conn, "hook", 20, 10, u64::MAX).unwrap().into_iter().map(|a| a.payload).collect();
        assert_eq!(due, vec![r#"{"n":1}"#.to_string()], "only the action not delivered there is still due here");
        assert_eq!(adopt_deliveries(&conn, &there).unwrap(), 0, "adopted once");
    }

    #[test]
    fn an_outcome_from_another_copy_ends_the_row_of_its_origin_once() {
        use crate::outcomes::{Outcome, Taken, take};
        let dir = tempfile::tempdir().unwrap();
        let mut conn = open(&dir.path().join("copy.db")).unwrap();
        let batch = Batch::begin(&mut conn).unwrap();
        batch.enqueue(&action(), &serde_json::json!({"n": 0}), 5, None, Some("7.0"), 0).unwrap();
        batch.enqueue(&action(), &serde_json::json!({"n": 1}), 5, None, Some("7.1"), 0).unwrap();
        batch.commit().unwrap();
        let outcome = |origin: &str, attempt: Attempt| Outcome { origin: origin.into(), attempt, at_ms: 9 };
        let delivered = outcome("7.0", Attempt::Delivered);
        // Outcomes cross the cluster as JSON.
        let delivered: Outcome = serde_json::from_str(&serde_json::to_string(&delivered).unwrap()).unwrap();
        assert_eq!(take(&conn, &delivered).unwrap(), Taken::Ended);
        assert_eq!(take(&conn, &delivered).unwrap(), Taken::Settled, "ended once");
        let buried = outcome("7.1", Attempt::Bury { error: "gone".into() });
        assert_eq!(take(&conn, &buried).unwrap(), Taken::Ended);
        assert_eq!(take(&conn, &buried).unwrap(), Taken::Settled, "a dead letter is ended");
        assert_eq!(take(&conn, &outcome("8.0", Attempt::Delivered)).unwrap(), Taken::NotYet);
        assert!(due_actions(&conn, "hook", 20, 10, u64::MAX).unwrap().is_empty(), "nothing left to deliver here");
        let row = list_actions(&conn, None, 10).unwrap().into_iter().find(|a| a.origin.as_deref() == Some("7.0"));
        assert_eq!(row.map(|r| (r.status, r.delivered_ms)), Some((OutboxStatus::Delivered, Some(9))));
    }

    #[test]
    fn a_node_taking_a_cluster_over_goes_on_with_its_numbering_of_configurations() {
        let dir = tempfile::tempdir().unwrap();
        let conn = open(&dir.path().join("s.db")).unwrap();
        assert_eq!(record_config(&conn, "s1", "one", 1, "start", None, true).unwrap(), 1);
        assert!(continue_numbering(&conn, 5, "s5", "five", 2).unwrap());
        let active = active_config(&conn).unwrap().unwrap();
        assert_eq!((active.version, active.how.as_str(), active.backfilled_ms), (5, "cluster", None));
        assert!(!continue_numbering(&conn, 5, "s5", "five", 3).unwrap(), "recorded once");
        assert!(!continue_numbering(&conn, 4, "s4", "four", 3).unwrap(), "never backwards");
        assert_eq!(record_config(&conn, "s6", "six", 4, "apply", None, true).unwrap(), 6, "numbering goes on");
    }

    #[test]
    fn event_ids_are_remembered_for_the_window() {
        let dir = tempfile::tempdir().unwrap();
        let mut conn = open(&dir.path().join("s.db")).unwrap();
        let event = starling_core::Event {
            id: Some("e1".into()),
            name: "x".into(),
            visitor_id: "v".into(),
            source: None,
            timestamp_ms: 0,
            data: Default::default(),
        };
        let batch = Batch::begin(&mut conn).unwrap();
        batch.log_event(&event, "v", 1_000).unwrap();
        batch.commit().unwrap();
        assert!(event_seen(&conn, "e1", 500).unwrap());
        assert!(!event_seen(&conn, "e1", 1_001).unwrap(), "outside the window");
        let (forgotten, next) = prune_seen_events(&conn, 2_000, "", 10).unwrap();
        assert_eq!((forgotten, next.as_deref()), (1, Some("e1")));
        assert_eq!(prune_seen_events(&conn, 2_000, "e1", 10).unwrap(), (0, None), "the end of the table");
    }
}

/// Where installed plugin components are kept, by sha256, next to the database file.
/// The directory of the event log's segment files, next to the database.
pub fn log_dir(database: &Path) -> std::path::PathBuf {
    let mut name = database.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(".log");
    database.with_file_name(name)
}

pub fn blob_dir(database: &Path) -> std::path::PathBuf {
    let mut name = database.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(".plugins");
    database.with_file_name(name)
}

/// A plugin in the registry.
#[derive(Debug, Clone, serde::Serialize)]
pub struct InstalledPlugin {
    pub name: String,
    pub version: String,
    pub kind: String,
    pub world: String,
    pub sha256: String,
    pub size: i64,
    /// The manifest as installed.
    pub manifest: String,
    /// Hex public key that signed the plugin, if it was signed.
    pub signed_by: Option<String>,
    /// The `plugin.sig` it was installed with.
    #[serde(skip)]
    pub signature: Option<String>,
    pub enabled: bool,
    /// Why the plugin is in its state (for example why it was disabled).
    pub status: String,
    pub failures: i64,
    pub consecutive_failures: i64,
    pub installed_ms: i64,
    /// Changes whenever the plugin is installed, enabled or disabled: servers reload on it.
    pub updated_ms: i64,
}

const REGISTRY_SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS plugins (
    name                 TEXT PRIMARY KEY,
    version              TEXT NOT NULL,
    kind                 TEXT NOT NULL,
    world                TEXT NOT NULL,
    sha256               TEXT NOT NULL,
    size                 INTEGER NOT NULL,
    manifest             TEXT NOT NULL,
    signed_by            TEXT,
    signature            TEXT,
    enabled              INTEGER NOT NULL,
    status               TEXT NOT NULL,
    failures             INTEGER NOT NULL DEFAULT 0,
    consecutive_failures INTEGER NOT NULL DEFAULT 0,
    installed_ms         INTEGER NOT NULL,
    updated_ms           INTEGER NOT NULL
);
";

fn ensure_registry(conn: &Connection) -> Result<()> {
    conn.execute_batch(REGISTRY_SCHEMA)?;
    Ok(())
}

const PLUGIN_COLUMNS: &str = "name, version, kind, world, sha256, size, manifest, signed_by, signature, enabled, status, failures, consecutive_failures, installed_ms, updated_ms";

fn plugin_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<InstalledPlugin> {
    Ok(InstalledPlugin {
        name: r.get(0)?,
        version: r.get(1)?,
        kind: r.get(2)?,
        world: r.get(3)?,
        sha256: r.get(4)?,
        size: r.get(5)?,
        manifest: r.get(6)?,
        signed_by: r.get(7)?,
        signature: r.get(8)?,
        enabled: r.get(9)?,
        status: r.get(10)?,
        failures: r.get(11)?,
        consecutive_failures: r.get(12)?,
        installed_ms: r.get(13)?,
        updated_ms: r.get(14)?,
    })
}

/// Installs a plugin, replacing any installed version of the same name.
pub fn install_plugin(conn: &Connection, p: &InstalledPlugin) -> Result<()> {
    let _gate = write_gate();
    ensure_registry(conn)?;
    conn.execute(
        &format!(
            "INSERT OR REPLACE INTO plugins ({PLUGIN_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)"
        ),
        params![
            p.name,
            p.version,
            p.kind,
            p.world,
            p.sha256,
            p.size,
            p.manifest,
            p.signed_by,
            p.signature,
            p.enabled,
            p.status,
            p.failures,
            p.consecutive_failures,
            p.installed_ms,
            p.updated_ms
        ],
    )?;
    Ok(())
}

pub fn installed_plugins(conn: &Connection) -> Result<Vec<InstalledPlugin>> {
    ensure_registry(conn)?;
    let mut stmt = conn.prepare_cached(&format!("SELECT {PLUGIN_COLUMNS} FROM plugins ORDER BY name"))?;
    let rows = stmt.query_map([], plugin_from_row)?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

pub fn installed_plugin(conn: &Connection, name: &str) -> Result<Option<InstalledPlugin>> {
    ensure_registry(conn)?;
    Ok(conn
        .prepare_cached(&format!("SELECT {PLUGIN_COLUMNS} FROM plugins WHERE name = ?1"))?
        .query_row([name], plugin_from_row)
        .optional()?)
}

/// Removes a plugin; returns whether it was installed.
pub fn remove_plugin(conn: &Connection, name: &str) -> Result<bool> {
    let _gate = write_gate();
    ensure_registry(conn)?;
    Ok(conn.execute("DELETE FROM plugins WHERE name = ?1", [name])? > 0)
}

/// Enables or disables a plugin, resetting its consecutive failures; returns whether it exists.
pub fn set_plugin_enabled(conn: &Connection, name: &str, enabled: bool, status: &str, now_ms: i64) -> Result<bool> {
    let _gate = write_gate();
    ensure_registry(conn)?;
    Ok(conn.execute(
        "UPDATE plugins SET enabled = ?2, status = ?3, consecutive_failures = 0, updated_ms = ?4 WHERE name = ?1",
        params![name, enabled, status, now_ms],
    )? > 0)
}

/// Records a running server's view of a plugin's health. A plugin the server disabled is
/// disabled in the registry too, with the reason.
pub fn record_plugin_health(
    conn: &Connection,
    name: &str,
    failures: i64,
    consecutive: i64,
    disabled: Option<&str>,
    now_ms: i64,
) -> Result<()> {
    let _gate = write_gate();
    ensure_registry(conn)?;
    match disabled {
        None => conn.execute(
            "UPDATE plugins SET failures = ?2, consecutive_failures = ?3 WHERE name = ?1",
            params![name, failures, consecutive],
        )?,
        Some(reason) => conn.execute(
            "UPDATE plugins SET failures = ?2, consecutive_failures = ?3, enabled = 0, status = ?4, updated_ms = ?5
             WHERE name = ?1 AND enabled = 1",
            params![name, failures, consecutive, reason, now_ms],
        )?,
    };
    Ok(())
}

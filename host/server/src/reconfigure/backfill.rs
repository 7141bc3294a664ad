//! Backfill: after a configuration change, every stored profile is read (in storage order, a
//! chunk at a time, parsed and checked on every core) and those that the change concerns (a
//! value to convert or drop, a membership of a removed audience, an added or changed audience
//! whose rule now says otherwise) are sent to their partitions, which bring them in line with
//! the profile as they hold it (see `pipeline::Work::Reconcile`). Changes made by events after
//! the swap are applied with the new model already, so the scan of what SQLite held at the swap
//! misses nothing: memberships end exact.

use crate::api::AppState;
use crate::live::Backfill;
use crate::pipeline::Reconciled;
use starling_core::{Model, Profile};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

/// Profiles read from SQLite per step.
const CHUNK: usize = 8_192;

/// Starts a backfill of `audiences` for configuration `version` in the background, taking
/// over the audiences of one still under way.
pub(crate) fn start(state: &AppState, version: i64, mut audiences: Vec<String>) -> Arc<Backfill> {
    let model = state.config.model();
    if let Some(previous) = state.config.backfill()
        && !previous.finished.load(Ordering::SeqCst)
    {
        for audience in &previous.audiences {
            if model.audience(audience).is_some() && !audiences.contains(audience) {
                audiences.push(audience.clone());
            }
        }
    }
    let backfill = Arc::new(Backfill { version, audiences, ..Backfill::default() });
    state.config.start_backfill(backfill.clone());
    tokio::spawn(run(state.clone(), backfill.clone()));
    backfill
}

async fn run(state: AppState, backfill: Arc<Backfill>) {
    let started = std::time::Instant::now();
    match scan(&state, &backfill).await {
        Ok(Some(done)) => {
            let database = state.database.clone();
            let (version, now) = (backfill.version, (state.clock)());
            let recorded = tokio::task::spawn_blocking(move || {
                let conn = starling_store::open(&database)?;
                starling_store::finish_backfill(&conn, version, now)
            })
            .await
            .expect("recording the backfill");
            if let Err(e) = recorded {
                tracing::warn!(version, "backfill done but not recorded (it is made again at the next start): {e}");
            }
            backfill.finished.store(true, Ordering::SeqCst);
            let seconds = started.elapsed().as_secs_f64();
            let profiles = backfill.done.load(Ordering::Relaxed);
            tracing::info!(
                version,
                audiences = ?backfill.audiences,
                profiles,
                profiles_per_second = (profiles as f64 / seconds.max(1e-9)) as u64,
                changed = done.changed,
                joined = done.joined,
                left = done.left,
                converted = done.converted,
                dropped = done.dropped,
                removed = done.removed,
                fired = done.fired,
                "backfill done"
            );
            if done.dropped > 0 {
                tracing::warn!(
                    values = done.dropped,
                    "values of attributes whose type changed could not be converted and were dropped"
                );
            }
        }
        Ok(None) => tracing::info!(version = backfill.version, "backfill stopped: a newer configuration took over"),
        Err(e) => {
            tracing::error!(version = backfill.version, "backfill stopped (it is made again at the next start): {e}");
            *backfill.stopped.lock().expect("backfill") = Some(e);
        }
    }
}

/// Goes through every stored profile; `None` when a newer backfill took over.
async fn scan(state: &AppState, backfill: &Arc<Backfill>) -> Result<Option<Reconciled>, String> {
    let database = state.database.clone();
    let conn = tokio::task::spawn_blocking(move || starling_store::open_reader(&database))
        .await
        .expect("opening a reader")
        .map_err(|e| e.to_string())?;
    let conn = Arc::new(Mutex::new(conn));
    let total = {
        let conn = conn.clone();
        tokio::task::spawn_blocking(move || starling_store::count_profiles(&conn.lock().expect("reader")))
            .await
            .expect("counting profiles")
            .map_err(|e| e.to_string())?
    };
    backfill.total.store(total, Ordering::Relaxed);
    let mut after = 0;
    let mut done = Reconciled::default();
    loop {
        if state.config.backfill().is_none_or(|b| !Arc::ptr_eq(&b, backfill)) {
            return Ok(None);
        }
        let model = state.config.model();
        let audiences: Vec<usize> =
            backfill.audiences.iter().filter_map(|name| model.audiences.iter().position(|a| &a.name == name)).collect();
        let now = (state.clock)();
        let conn = conn.clone();
        let step = tokio::task::spawn_blocking(move || {
            let (rows, last) = read_chunk(&conn.lock().expect("reader"), after)?;
            let stale = stale_profiles(&model, &audiences, now, &rows)?;
            Ok::<_, starling_store::StoreError>((stale, rows.len(), last))
        })
        .await
        .expect("backfill step")
        .map_err(|e| e.to_string())?;
        let (stale, read, last) = step;
        if !stale.is_empty() {
            let result = state.ingest.reconcile(stale, &backfill.audiences).await.map_err(|e| e.to_string())?;
            backfill.changed.fetch_add(result.changed, Ordering::Relaxed);
            done.add(&result);
        }
        backfill.done.fetch_add(read as u64, Ordering::Relaxed);
        match last {
            Some(last) => after = last,
            None => break,
        }
    }
    // Profiles created after the count are not in `total`.
    let seen = backfill.done.load(Ordering::Relaxed);
    backfill.total.fetch_max(seen, Ordering::Relaxed);
    Ok(Some(done))
}

/// A stored profile: its row and its JSON.
pub type StoredRow = (i64, String);

/// Up to a chunk of stored profiles after row `after` (their JSON), and the last row read
/// (`None` at the end): a scan of every profile reads them this way.
pub(super) fn read_chunk(
    conn: &rusqlite::Connection,
    after: i64,
) -> Result<(Vec<StoredRow>, Option<i64>), starling_store::StoreError> {
    let mut rows = Vec::with_capacity(CHUNK);
    let last = starling_store::profiles_after(conn, after, CHUNK, |rowid, data| {
        rows.push((rowid, data.to_string()));
        Ok(())
    })?;
    Ok((rows, last))
}

/// The ids of the profiles among `rows` (stored JSON) that the configuration change concerns,
/// parsed and checked on every core.
pub fn stale_profiles(
    model: &Model,
    audiences: &[usize],
    now: i64,
    rows: &[(i64, String)],
) -> Result<Vec<String>, starling_store::StoreError> {
    for_each_profile(rows, |profile| {
        starling_core::evolve::is_stale(model, profile, audiences, now).then(|| profile.id.clone())
    })
}

/// Parses `rows` on every core and keeps what `keep` answers for each profile, in row order.
pub fn for_each_profile<T: Send>(
    rows: &[(i64, String)],
    keep: impl Fn(&Profile) -> Option<T> + Sync,
) -> Result<Vec<T>, starling_store::StoreError> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(rows.len().max(1));
    let per_thread = rows.len().div_ceil(threads).max(1);
    let keep = &keep;
    let parts: Vec<Result<Vec<T>, starling_store::StoreError>> = std::thread::scope(|scope| {
        let handles: Vec<_> = rows
            .chunks(per_thread)
            .map(|part| {
                scope.spawn(move || {
                    let mut kept = Vec::new();
                    for (rowid, data) in part {
                        let profile = starling_store::read_profile(*rowid, data)?;
                        kept.extend(keep(&profile));
                    }
                    Ok(kept)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("profile scan thread")).collect()
    });
    let mut all = Vec::new();
    for part in parts {
        all.extend(part?);
    }
    Ok(all)
}

//! Delivering the outbox. Each action has its own lane: its own queue (its outbox rows), its own
//! concurrency limit and its own circuit breaker, so a slow or dead destination never holds up
//! another. A lane hands due rows to the action's connector (one per call, or in batches when
//! the action batches) and records each result: delivered; retried with backoff and jitter (or
//! after the destination's Retry-After); failed for good on a permanent error; moved to the dead
//! letters after the action's maximum attempts.

use crate::owned::Owned;
use crate::telemetry::{ActionLabel, ResultLabel, Telemetry};
use rusqlite::Connection;
use starling_core::Value;
use starling_core::model::{ActionDef, Trigger};
use starling_runtime::{PluginHost, convert, types};
#[cfg(test)]
use starling_store::OutboxStatus;
use starling_store::outcomes::Outcome;
use starling_store::{Attempt, OutboxEntry};
use std::collections::{BTreeMap, HashSet};
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{Notify, Semaphore, watch};

/// Longest sleep between outbox scans when nothing wakes a lane.
const IDLE_POLL: Duration = Duration::from_millis(500);
/// Consecutive failed calls that open a lane's circuit breaker.
const BREAKER_THRESHOLD: u32 = 5;
const BREAKER_FIRST_OPEN_MS: i64 = 1_000;
const BREAKER_MAX_OPEN_MS: i64 = 30_000;
/// Rows one unbatched scan may start.
const SCAN: usize = 256;
/// Outcomes kept for a cluster node to pass on; beyond it (the stream unreachable for long)
/// further ones are not kept, and a node taking over delivers those actions again.
const OUTCOMES_KEPT: usize = 100_000;

/// How the actions of a cluster node's lanes ended, until the node passes them on to the nodes
/// that follow its stream: those end the rows of their copies alike, and do not deliver them
/// again if they take over.
#[derive(Clone, Default)]
pub struct Outcomes(Arc<Mutex<Vec<Outcome>>>);

impl Outcomes {
    pub(crate) fn add(&self, ended: Vec<Outcome>) {
        let mut kept = self.0.lock().expect("outcomes");
        let room = OUTCOMES_KEPT.saturating_sub(kept.len());
        kept.extend(ended.into_iter().take(room));
    }

    /// The outcomes kept so far, no longer kept.
    pub fn take(&self) -> Vec<Outcome> {
        std::mem::take(&mut *self.0.lock().expect("outcomes"))
    }
}

/// One action's delivery lane.
pub struct Lane {
    pub action: ActionDef,
    pub plugins: Arc<PluginHost>,
    pub conn: Arc<Mutex<Connection>>,
    pub wake: Arc<Notify>,
    pub clock: fn() -> i64,
    pub telemetry: Arc<Telemetry>,
    pub outcomes: Option<Outcomes>,
    pub durable: Arc<Durable>,
    pub owned: Arc<Owned>,
}

/// How far the event log is on disk, as the pipeline's syncer last said. A worker writes a
/// batch's actions to the outbox before the log is synced (so that the lanes need not wait for
/// the batch to be written out): a lane scanning for another reason meanwhile leaves the rows
/// whose deciding record may not be on disk yet, so no connector is called for an action whose
/// cause could still be lost. The syncer wakes their lanes once it has synced.
#[derive(Debug)]
pub struct Durable {
    /// The last position synced by this run (0: none yet). A sync covers every record appended
    /// before it, so every position up to it is on disk, records read at start included.
    synced: AtomicU64,
    /// The first position this run appended (none: `u64::MAX`); before the first sync, the
    /// records before it (read from disk at start) are on disk.
    first_appended: AtomicU64,
}

impl Default for Durable {
    fn default() -> Durable {
        Durable { synced: AtomicU64::new(0), first_appended: AtomicU64::new(u64::MAX) }
    }
}

impl Durable {
    /// A worker appended records from `first` on (before writing what they decided).
    pub fn appended(&self, first: u64) {
        self.first_appended.fetch_min(first, Ordering::SeqCst);
    }

    /// The syncer has the log on disk through `position`.
    pub fn synced(&self, position: u64) {
        self.synced.fetch_max(position, Ordering::SeqCst);
    }

    /// Whether the action decided by the record at `position` (none: by work not logged) may
    /// be delivered.
    pub fn covers(&self, position: Option<u64>) -> bool {
        let Some(position) = position else { return true };
        match self.synced.load(Ordering::SeqCst) {
            0 => position < self.first_appended.load(Ordering::SeqCst),
            synced => position <= synced,
        }
    }
}

/// The running lanes, one per configured action; they follow configuration changes.
pub struct Lanes {
    pub plugins: Arc<PluginHost>,
    pub database: std::path::PathBuf,
    pub clock: fn() -> i64,
    pub telemetry: Arc<Telemetry>,
    outcomes: Option<Outcomes>,
    running: Mutex<std::collections::HashMap<String, Running>>,
    pub durable: Arc<Durable>,
    /// The partitions whose actions these lanes deliver (another node's are that node's).
    owned: Arc<Owned>,
}

struct Running {
    action: ActionDef,
    wake: Arc<Notify>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Lanes {
    pub fn new(
        plugins: Arc<PluginHost>,
        database: std::path::PathBuf,
        clock: fn() -> i64,
        telemetry: Arc<Telemetry>,
    ) -> Lanes {
        Lanes {
            plugins,
            database,
            clock,
            telemetry,
            outcomes: None,
            running: Mutex::default(),
            durable: Arc::default(),
            owned: Arc::new(Owned::all()),
        }
    }

    /// Delivers only the actions of the partitions `owned` (a node of a spread cluster).
    pub fn owning(self, owned: Arc<Owned>) -> Lanes {
        Lanes { owned, ..self }
    }

    /// Keeps how each action ended in `outcomes` too (see [`Outcomes`]).
    pub fn reporting_to(self, outcomes: Outcomes) -> Lanes {
        Lanes { outcomes: Some(outcomes), ..self }
    }

    /// Tells the lane of `action` that it has new work.
    pub fn wake(&self, action: &str) {
        if let Some(lane) = self.running.lock().expect("lanes").get(action) {
            lane.wake.notify_one();
        }
    }

    /// Runs one lane per action of `actions`: starts lanes for new actions, stops those of
    /// actions no longer there, and restarts a lane whose action changed once its calls under
    /// way are done (so that no row is delivered by both).
    pub fn follow(&self, actions: &[ActionDef]) -> Result<(), starling_store::StoreError> {
        let mut running = self.running.lock().expect("lanes");
        let gone: Vec<String> = running
            .iter()
            .filter(|(name, lane)| actions.iter().all(|a| &a.name != *name || !a.same_as(&lane.action)))
            .map(|(name, _)| name.clone())
            .collect();
        let mut ending = std::collections::HashMap::new();
        for name in gone {
            let lane = running.remove(&name).expect("listed above");
            let _ = lane.stop.send(true);
            ending.insert(name, lane.task);
        }
        let starting: Vec<&ActionDef> = actions.iter().filter(|a| !running.contains_key(&a.name)).collect();
        for action in starting {
            let (stop, stopped) = watch::channel(false);
            let wake = Arc::new(Notify::new());
            let lane = Lane {
                action: action.clone(),
                plugins: self.plugins.clone(),
                conn: Arc::new(Mutex::new(starling_store::open_relaxed(&self.database)?)),
                wake: wake.clone(),
                clock: self.clock,
                telemetry: self.telemetry.clone(),
                outcomes: self.outcomes.clone(),
                durable: self.durable.clone(),
                owned: self.owned.clone(),
            };
            let previous = ending.remove(&action.name);
            let task = tokio::spawn(async move {
                if let Some(previous) = previous {
                    let _ = previous.await;
                }
                lane.run(stopped).await
            });
            running.insert(action.name.clone(), Running { action: action.clone(), wake, stop, task });
        }
        Ok(())
    }

    /// Stops every lane; returns their tasks, which end once their calls under way are done.
    pub fn stop(&self) -> Vec<tokio::task::JoinHandle<()>> {
        let mut running = self.running.lock().expect("lanes");
        running
            .drain()
            .map(|(_, lane)| {
                let _ = lane.stop.send(true);
                lane.task
            })
            .collect()
    }
}

/// Opens after repeated failed calls; while open the lane makes no calls, and its rows wait.
#[derive(Default)]
struct Breaker {
    failures: u32,
    opened: u32,
    open_until_ms: i64,
}

impl Breaker {
    fn record(&mut self, ok: bool, now: i64, lane: &str) {
        if ok {
            *self = Breaker::default();
            return;
        }
        self.failures += 1;
        if self.failures >= BREAKER_THRESHOLD {
            let open_ms = (BREAKER_FIRST_OPEN_MS << self.opened.min(5)).min(BREAKER_MAX_OPEN_MS);
            self.opened += 1;
            self.failures = 0;
            self.open_until_ms = now + open_ms;
            tracing::warn!(action = lane, open_ms, "circuit breaker open: destination keeps failing");
        }
    }
}

impl Lane {
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let name = self.action.name.clone();
        let policy = self.action.delivery.clone();
        let slots = Arc::new(Semaphore::new(policy.concurrency));
        let in_flight: Arc<Mutex<HashSet<i64>>> = Arc::default();
        let breaker: Arc<Mutex<Breaker>> = Arc::default();
        let mut calls = tokio::task::JoinSet::new();
        let limit = policy.batch.as_ref().map_or(SCAN, |b| b.max_items);
        loop {
            if *shutdown.borrow() {
                break;
            }
            while calls.try_join_next().is_some() {}
            let now = (self.clock)();
            let open_until = breaker.lock().expect("breaker").open_until_ms;
            if open_until > now {
                self.pause(Some(open_until - now), &mut shutdown).await;
                continue;
            }
            // Rows in flight when the query starts are skipped. The set must not be read again
            // after the query: a call finishing in between would have been read as still
            // pending, and be delivered twice.
            let busy: HashSet<i64> = in_flight.lock().expect("in flight").clone();
            let (action, scan, owned) = (name.clone(), limit + busy.len(), self.owned.bits());
            let due =
                self.db(move |c| starling_store::due_actions(c, &action, now, scan, owned)).await.unwrap_or_else(|e| {
                    tracing::error!(action = %name, "reading the outbox: {e}");
                    Vec::new()
                });
            let mut due: Vec<OutboxEntry> = due
                .into_iter()
                .filter(|e| !busy.contains(&e.id) && self.durable.covers(e.cause_position()))
                .take(limit)
                .collect();
            if due.is_empty() {
                let action = name.clone();
                let next = self.db(move |c| starling_store::next_due(c, &action, owned)).await.ok().flatten();
                let wait = match next {
                    Some(t) if t > now => Some(t - now),
                    Some(_) => Some(20),
                    None => None,
                };
                self.pause(wait, &mut shutdown).await;
                continue;
            }
            due = self.check_conditions(due, now).await;
            if due.is_empty() {
                continue;
            }
            if let Some(batch) = &policy.batch {
                let bytes: usize = due.iter().map(|e| e.payload.len()).sum();
                let oldest = due.iter().map(|e| e.next_attempt_ms).min().unwrap_or(now);
                let flush_at = oldest + batch.max_age_ms;
                if due.len() < batch.max_items && bytes < batch.max_bytes && flush_at > now {
                    self.pause(Some(flush_at - now), &mut shutdown).await;
                    continue;
                }
            }
            let groups: Vec<Vec<OutboxEntry>> =
                if policy.batch.is_some() { vec![due] } else { due.into_iter().map(|e| vec![e]).collect() };
            for group in groups {
                let permit = tokio::select! {
                    p = slots.clone().acquire_owned() => p.expect("semaphore open"),
                    _ = shutdown.changed() => break,
                };
                in_flight.lock().expect("in flight").extend(group.iter().map(|e| e.id));
                let (plugins, conn, clock) = (self.plugins.clone(), self.conn.clone(), self.clock);
                let telemetry = self.telemetry.clone();
                let (flying, health, outcomes) = (in_flight.clone(), breaker.clone(), self.outcomes.clone());
                let (connector, lane, retries) = (self.action.connector.clone(), name.clone(), Retries::of(&policy));
                calls.spawn(async move {
                    let called = deliver(&plugins, &conn, clock, &telemetry, &connector, &group, retries).await;
                    health.lock().expect("breaker").record(called.healthy, clock(), &lane);
                    if let Some(outcomes) = outcomes {
                        outcomes.add(called.ended);
                    }
                    let mut flying = flying.lock().expect("in flight");
                    for e in &group {
                        flying.remove(&e.id);
                    }
                    drop(permit);
                });
                if breaker.lock().expect("breaker").open_until_ms > (self.clock)() {
                    break;
                }
            }
        }
        // Let calls under way finish and record their results.
        while calls.join_next().await.is_some() {}
    }

    async fn pause(&self, wait_ms: Option<i64>, shutdown: &mut watch::Receiver<bool>) {
        let wait = wait_ms.map_or(IDLE_POLL, |ms| Duration::from_millis(ms.clamp(1, 500) as u64));
        tokio::select! {
            _ = self.wake.notified() => {}
            _ = tokio::time::sleep(wait) => {}
            _ = shutdown.changed() => {}
        }
    }

    /// Cancels delayed actions whose membership condition no longer holds.
    async fn check_conditions(&self, due: Vec<OutboxEntry>, now: i64) -> Vec<OutboxEntry> {
        if due.iter().all(|e| e.condition.is_none()) {
            return due;
        }
        let checked = self
            .db(move |c| {
                let (mut keep, mut ended) = (Vec::with_capacity(due.len()), Vec::new());
                for entry in due {
                    let wanted = match entry.condition.as_deref() {
                        Some("member") => true,
                        Some("not_member") => false,
                        _ => {
                            keep.push(entry);
                            continue;
                        }
                    };
                    if starling_store::is_member(c, &entry.profile_id, &entry.audience)? == wanted {
                        keep.push(entry);
                    } else {
                        let reason = format!(
                            "cancelled: visitor is no longer {} `{}`",
                            if wanted { "in" } else { "out of" },
                            entry.audience
                        );
                        let attempt = Attempt::Cancel { reason };
                        starling_store::record_attempt(c, entry.id, &attempt, now)?;
                        ended.extend(entry.origin.map(|origin| Outcome { origin, attempt, at_ms: now }));
                    }
                }
                Ok((keep, ended))
            })
            .await;
        let (keep, ended) = checked.unwrap_or_default();
        if let Some(outcomes) = &self.outcomes {
            outcomes.add(ended);
        }
        keep
    }

    async fn db<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> starling_store::Result<T> + Send + 'static,
    ) -> starling_store::Result<T> {
        let conn = self.conn.clone();
        tokio::task::spawn_blocking(move || f(&conn.lock().expect("delivery connection"))).await.expect("outbox task")
    }
}

/// The retry policy of one action.
#[derive(Debug, Clone, Copy)]
struct Retries {
    max_attempts: i64,
    initial_ms: i64,
    max_ms: i64,
}

impl Retries {
    fn of(policy: &starling_core::model::DeliveryPolicy) -> Retries {
        Retries {
            max_attempts: policy.max_attempts as i64,
            initial_ms: policy.retry_initial_ms,
            max_ms: policy.retry_max_ms,
        }
    }
}

/// One connector call for `entries`; returns whether the destination is healthy (anything but
/// a failed call or all-retryable results), and how the actions that ended did.
async fn deliver(
    plugins: &PluginHost,
    conn: &Mutex<Connection>,
    clock: fn() -> i64,
    telemetry: &Telemetry,
    connector: &str,
    entries: &[OutboxEntry],
    retries: Retries,
) -> Called {
    let actions: Vec<types::Action> = entries.iter().map(to_wit).collect();
    let started = std::time::Instant::now();
    let outcome = plugins.deliver(connector, &actions).await;
    let elapsed = started.elapsed().as_secs_f64();
    let now = clock();
    let attempts: Vec<Attempt> = match outcome {
        Ok(results) => entries.iter().zip(results).map(|(e, r)| attempt_for(e, r, now, retries)).collect(),
        Err(err) => {
            tracing::warn!(connector, "delivery call failed: {err}");
            entries.iter().map(|e| retry(e, now, err.to_string(), None, retries)).collect()
        }
    };
    let healthy = attempts.iter().any(|a| matches!(a, Attempt::Delivered | Attempt::Fail { .. }));
    let conn = conn.lock().expect("delivery connection");
    let mut ended = Vec::new();
    for (entry, attempt) in entries.iter().zip(&attempts) {
        match starling_store::outcomes::conclude(&conn, entry.id, entry.trigger, attempt, now) {
            Ok(()) if !matches!(attempt, Attempt::Retry { .. }) => ended
                .extend(entry.origin.clone().map(|origin| Outcome { origin, attempt: attempt.clone(), at_ms: now })),
            Ok(()) => {}
            Err(e) => tracing::error!(action = entry.id, "recording a delivery attempt: {e}"),
        }
        let result = match attempt {
            Attempt::Delivered => "delivered",
            Attempt::Retry { .. } => "retry",
            Attempt::Fail { .. } => "failed",
            Attempt::Bury { .. } => "dead",
            Attempt::Cancel { .. } => "cancelled",
        };
        let metrics = &telemetry.metrics;
        let action = entry.action.clone();
        metrics.delivery_seconds.get_or_create(&ActionLabel { action: action.clone() }).observe(elapsed);
        metrics.deliveries.get_or_create(&ResultLabel { action, result: result.to_string() }).inc();
        let error = match attempt {
            Attempt::Retry { error, .. } | Attempt::Fail { error } | Attempt::Bury { error } => Some(error.as_str()),
            _ => None,
        };
        telemetry.tracer.emit(
            &[&entry.profile_id],
            serde_json::json!({
                "step": "delivery",
                "action": entry.action,
                "connector": connector,
                "attempt": entry.attempts + 1,
                "result": result,
                "error": error,
                "elapsed_ms": elapsed * 1e3,
            }),
        );
        match attempt {
            Attempt::Delivered => tracing::debug!(id = entry.id, action = %entry.action, "delivered"),
            Attempt::Retry { error, .. } => {
                tracing::info!(id = entry.id, action = %entry.action, "will retry: {error}")
            }
            Attempt::Fail { error } => tracing::warn!(id = entry.id, action = %entry.action, "failed: {error}"),
            Attempt::Bury { error } => {
                tracing::warn!(id = entry.id, action = %entry.action, "moved to the dead letters: {error}")
            }
            Attempt::Cancel { .. } => {}
        }
    }
    Called { healthy, ended }
}

/// What one connector call did.
struct Called {
    healthy: bool,
    /// The actions that ended (all but those to be retried), with an origin to be known by.
    ended: Vec<Outcome>,
}

fn attempt_for(entry: &OutboxEntry, result: Result<(), types::DeliveryError>, now: i64, retries: Retries) -> Attempt {
    match result {
        Ok(()) => Attempt::Delivered,
        Err(types::DeliveryError::Permanent(m)) => Attempt::Fail { error: format!("permanent: {m}") },
        Err(types::DeliveryError::Retryable(m)) => retry(entry, now, format!("retryable: {m}"), None, retries),
        Err(types::DeliveryError::RateLimited(r)) => {
            retry(entry, now, format!("rate limited: {}", r.message), Some(r.retry_after_ms as i64), retries)
        }
    }
}

/// The next attempt: after `after_ms` when the destination asked, else exponential backoff
/// with ±20% jitter; a dead letter after the last attempt.
fn retry(entry: &OutboxEntry, now: i64, error: String, after_ms: Option<i64>, retries: Retries) -> Attempt {
    if entry.attempts + 1 >= retries.max_attempts {
        let max = retries.max_attempts;
        return Attempt::Bury { error: format!("{error} (gave up after {max} attempts)") };
    }
    let delay = after_ms.unwrap_or_else(|| {
        let base = retries.initial_ms.saturating_mul(1 << entry.attempts.min(20)).min(retries.max_ms);
        let spread = base / 5;
        let noise = std::collections::hash_map::RandomState::new().hash_one((entry.id, entry.attempts)) as i64;
        base - spread + noise.rem_euclid(2 * spread + 1)
    });
    Attempt::Retry { at_ms: now + delay, error }
}

fn to_wit(entry: &OutboxEntry) -> types::Action {
    #[derive(serde::Deserialize)]
    struct Payload {
        settings: BTreeMap<String, String>,
        params: Vec<(String, Value)>,
    }
    let payload: Payload =
        serde_json::from_str(&entry.payload).unwrap_or(Payload { settings: BTreeMap::new(), params: Vec::new() });
    let trigger = match entry.trigger {
        Trigger::Joined => types::Trigger::Joined,
        Trigger::Left => types::Trigger::Left,
        // Connectors built against 0.1.0 see it as `left` (the runtime converts).
        Trigger::Deleted => types::Trigger::Deleted,
        Trigger::VisitStarted => types::Trigger::VisitStarted,
        Trigger::VisitEnded => types::Trigger::VisitEnded,
        Trigger::Event => types::Trigger::Event,
    };
    types::Action {
        idempotency_key: entry.idempotency_key(),
        name: entry.action.clone(),
        trigger,
        audience: entry.audience.clone(),
        profile_id: entry.profile_id.clone(),
        occurred_at_ms: entry.occurred_ms,
        settings: payload.settings.into_iter().collect(),
        params: payload.params.iter().map(|(k, v)| (k.clone(), convert::value_to_wit(v))).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_action_waits_until_the_record_that_decided_it_is_on_disk() {
        let durable = Durable::default();
        assert!(durable.covers(Some(40)), "nothing appended by this run: every record was read from disk");
        durable.appended(41);
        durable.appended(43);
        assert!(durable.covers(Some(40)) && durable.covers(None));
        assert!(!durable.covers(Some(41)) && !durable.covers(Some(43)), "appended, not synced");
        durable.synced(42);
        assert!(durable.covers(Some(42)) && !durable.covers(Some(43)));
        durable.synced(41);
        assert!(durable.covers(Some(42)), "a late sync of less does not go back");
        durable.synced(43);
        assert!(durable.covers(Some(43)));
    }

    fn entry(attempts: i64) -> OutboxEntry {
        OutboxEntry {
            id: 1,
            action: "a".into(),
            connector: "c".into(),
            trigger: Trigger::Joined,
            audience: "x".into(),
            profile_id: "p".into(),
            occurred_ms: 0,
            payload: "{}".into(),
            status: OutboxStatus::Pending,
            attempts,
            next_attempt_ms: 0,
            last_error: None,
            delivered_ms: None,
            condition: None,
            origin: None,
        }
    }

    const RETRIES: Retries = Retries { max_attempts: 12, initial_ms: 1_000, max_ms: 10_000 };

    #[test]
    fn backoff_grows_with_jitter_up_to_its_cap_and_honours_retry_after() {
        for attempts in 0..8 {
            let Attempt::Retry { at_ms, .. } = retry(&entry(attempts), 0, "x".into(), None, RETRIES) else { panic!() };
            let base = (1_000 << attempts).min(10_000);
            assert!((base * 4 / 5..=base * 6 / 5).contains(&at_ms), "{attempts}: {at_ms}");
        }
        let Attempt::Retry { at_ms, .. } = retry(&entry(0), 100, "x".into(), Some(30_000), RETRIES) else { panic!() };
        assert_eq!(at_ms, 30_100);
    }

    #[test]
    fn retries_end_in_the_dead_letters() {
        assert!(matches!(retry(&entry(11), 0, "x".into(), None, RETRIES), Attempt::Bury { .. }));
        let three = Retries { max_attempts: 3, ..RETRIES };
        assert!(matches!(retry(&entry(1), 0, "x".into(), None, three), Attempt::Retry { .. }));
    }

    #[test]
    fn permanent_errors_are_not_retried() {
        let a = attempt_for(&entry(0), Err(types::DeliveryError::Permanent("HTTP 400".into())), 0, RETRIES);
        assert_eq!(a, Attempt::Fail { error: "permanent: HTTP 400".into() });
    }

    #[test]
    fn the_breaker_opens_after_repeated_failures_and_closes_on_success() {
        let mut b = Breaker::default();
        for _ in 0..BREAKER_THRESHOLD - 1 {
            b.record(false, 0, "t");
        }
        assert_eq!(b.open_until_ms, 0);
        b.record(false, 0, "t");
        assert_eq!(b.open_until_ms, BREAKER_FIRST_OPEN_MS);
        b.record(true, 10, "t");
        assert_eq!((b.failures, b.open_until_ms), (0, 0));
    }
}

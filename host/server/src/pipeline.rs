//! The event pipeline. Events are partitioned by visitor over worker threads, so one profile is
//! only ever updated by one worker. Each worker applies a group of queued requests in memory,
//! then writes everything in one SQLite transaction (group commit); a request is answered only
//! after every transaction holding its events has committed.

use starling_core::config::{ActionDef, Trigger};
use starling_core::{
    CustomEnrichers, Event, Membership, Model, Outcome, PendingAction, Profile, apply_event, apply_time,
};
use starling_runtime::{PluginHost, convert};
use starling_store::{Batch, StoreError};
use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
use std::sync::Arc;
use tokio::sync::{Notify, mpsc, oneshot};

/// Most requests folded into one transaction.
const MAX_JOBS_PER_COMMIT: usize = 256;
/// Profiles kept in memory between batches before the cache is emptied.
const PROFILE_CACHE_LIMIT: usize = 100_000;
/// How often worker 0 forgets event ids older than the dedup window.
const PRUNE_EVERY_MS: i64 = 60_000;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct IngestReport {
    pub accepted: usize,
    pub duplicates: usize,
}

pub struct IngestJob {
    pub work: Work,
    pub reply: oneshot::Sender<Result<IngestReport, String>>,
}

/// What a partition worker is asked to do.
pub enum Work {
    Events(Vec<Event>),
    /// Profiles whose wake-up time has come (visit end, time-relative audiences).
    Wakeups(Vec<String>),
}

#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error("ingestion queue is full; retry later")]
    Busy,
    #[error("shutting down")]
    Closed,
    #[error("events not stored: {0}")]
    Failed(String),
}

/// The front of the pipeline: routes each event to its visitor's partition.
pub struct Ingest {
    partitions: Vec<mpsc::Sender<IngestJob>>,
}

impl Ingest {
    /// Queues `events` on their partitions, all or nothing, and waits until they are durable.
    pub async fn submit(&self, events: Vec<Event>) -> Result<IngestReport, IngestError> {
        let n = self.partitions.len();
        let mut groups: Vec<Vec<Event>> = (0..n).map(|_| Vec::new()).collect();
        for event in events {
            groups[partition_of(&event.visitor_id, n)].push(event);
        }
        self.queue(groups.into_iter().map(|g| (!g.is_empty()).then_some(Work::Events(g))).collect()).await
    }

    /// Queues due profiles on their partitions and waits until what time did to them is durable.
    pub async fn wake(&self, profiles: Vec<String>) -> Result<IngestReport, IngestError> {
        let n = self.partitions.len();
        let mut groups: Vec<Vec<String>> = (0..n).map(|_| Vec::new()).collect();
        for id in profiles {
            groups[partition_of(&id, n)].push(id);
        }
        self.queue(groups.into_iter().map(|g| (!g.is_empty()).then_some(Work::Wakeups(g))).collect()).await
    }

    /// Sends one piece of work per partition (index = partition), all or nothing.
    async fn queue(&self, mut work: Vec<Option<Work>>) -> Result<IngestReport, IngestError> {
        // Reserve room on every partition first, so a full queue refuses the whole request.
        let mut permits = Vec::new();
        for (i, w) in work.iter().enumerate() {
            if w.is_some() {
                let permit = self.partitions[i].try_reserve().map_err(|e| match e {
                    mpsc::error::TrySendError::Full(()) => IngestError::Busy,
                    mpsc::error::TrySendError::Closed(()) => IngestError::Closed,
                })?;
                permits.push((i, permit));
            }
        }
        let mut answers = Vec::with_capacity(permits.len());
        for (i, permit) in permits {
            let (reply, answer) = oneshot::channel();
            permit.send(IngestJob { work: work[i].take().expect("reserved for work"), reply });
            answers.push(answer);
        }
        let mut total = IngestReport::default();
        for answer in answers {
            let report = answer.await.map_err(|_| IngestError::Closed)?.map_err(IngestError::Failed)?;
            total.accepted += report.accepted;
            total.duplicates += report.duplicates;
        }
        Ok(total)
    }
}

/// The partition a visitor's events go to; stable across restarts.
pub fn partition_of(visitor_id: &str, partitions: usize) -> usize {
    (BuildHasherDefault::<DefaultHasher>::default().hash_one(visitor_id) % partitions as u64) as usize
}

/// Everything a worker needs.
#[derive(Clone)]
pub struct Shared {
    pub model: Arc<Model>,
    pub plugins: Arc<PluginHost>,
    pub runtime: tokio::runtime::Handle,
    /// Delivery lanes by action name, woken when their actions are queued.
    pub lanes: Arc<HashMap<String, Arc<Notify>>>,
    pub clock: fn() -> i64,
}

/// Starts `n` workers, each with its own connection from `open`.
pub fn start(
    shared: Shared,
    n: usize,
    queue: usize,
    open: impl Fn() -> Result<rusqlite::Connection, StoreError>,
) -> Result<(Ingest, Vec<std::thread::JoinHandle<()>>), StoreError> {
    let mut senders = Vec::with_capacity(n);
    let mut handles = Vec::with_capacity(n);
    for index in 0..n {
        let (tx, rx) = mpsc::channel(queue);
        let worker = Worker { shared: shared.clone(), index, cache: Cache::default(), last_prune_ms: 0 };
        let conn = open()?;
        let handle = std::thread::Builder::new()
            .name(format!("starling-ingest-{index}"))
            .spawn(move || worker.run(conn, rx))
            .map_err(|e| StoreError::Corrupt { id: "worker".into(), message: e.to_string() })?;
        senders.push(tx);
        handles.push(handle);
    }
    Ok((Ingest { partitions: senders }, handles))
}

struct Worker {
    shared: Shared,
    index: usize,
    cache: Cache,
    last_prune_ms: i64,
}

/// A write decided while applying events, performed at commit.
enum Write {
    Link { visitor: String, profile: String },
    Event { job: usize, event: usize, profile: String },
    Join { profile: String, audience: String, at_ms: i64 },
    Leave { profile: String, audience: String },
    Enqueue { action: PendingAction, due_ms: i64, condition: Option<&'static str> },
    Fired { action: String, profile: String, at_ms: i64 },
}

impl Worker {
    fn run(mut self, mut conn: rusqlite::Connection, mut jobs: mpsc::Receiver<IngestJob>) {
        while let Some(first) = jobs.blocking_recv() {
            let mut batch = vec![first];
            while batch.len() < MAX_JOBS_PER_COMMIT {
                match jobs.try_recv() {
                    Ok(job) => batch.push(job),
                    Err(_) => break,
                }
            }
            match self.apply(&mut conn, &batch) {
                Ok((reports, woken)) => {
                    for action in woken {
                        if let Some(lane) = self.shared.lanes.get(&action) {
                            lane.notify_one();
                        }
                    }
                    for (job, report) in batch.into_iter().zip(reports) {
                        let _ = job.reply.send(Ok(report));
                    }
                }
                Err(e) => {
                    tracing::error!(partition = self.index, "event batch not stored: {e}");
                    self.cache = Cache::default();
                    for job in batch {
                        let _ = job.reply.send(Err(e.to_string()));
                    }
                }
            }
            self.prune(&conn);
        }
    }

    fn prune(&mut self, conn: &rusqlite::Connection) {
        let now = (self.shared.clock)();
        if self.index != 0 || now - self.last_prune_ms < PRUNE_EVERY_MS {
            return;
        }
        self.last_prune_ms = now;
        let window_ms = self.shared.model.server.dedup_window_hours as i64 * 3_600_000;
        match starling_store::prune_seen_events(conn, now - window_ms) {
            Ok(n) if n > 0 => tracing::info!("forgot {n} event ids older than the dedup window"),
            Ok(_) => {}
            Err(e) => tracing::warn!("pruning event ids: {e}"),
        }
    }

    /// Applies a group of jobs in memory, then writes it in one transaction.
    fn apply(
        &mut self,
        conn: &mut rusqlite::Connection,
        jobs: &[IngestJob],
    ) -> Result<(Vec<IngestReport>, HashSet<String>), StoreError> {
        let model = self.shared.model.clone();
        let now = (self.shared.clock)();
        let dedup_since = now - model.server.dedup_window_hours as i64 * 3_600_000;
        let mut enrichers = WasmEnrichers { plugins: &self.shared.plugins, runtime: &self.shared.runtime };
        // Profiles touched by this batch (with the wake-up time they were loaded with), out of
        // the cache so a failed commit leaves it clean.
        let mut touched: HashMap<String, (Profile, Option<i64>)> = HashMap::new();
        let mut links: HashMap<String, String> = HashMap::new();
        let mut seen_ids: HashSet<&str> = HashSet::new();
        let mut effects = Effects::default();
        let mut reports = Vec::with_capacity(jobs.len());

        for (j, job) in jobs.iter().enumerate() {
            let mut report = IngestReport::default();
            match &job.work {
                Work::Events(events) => {
                    for (e, event) in events.iter().enumerate() {
                        if let Some(id) = event.id.as_deref()
                            && (!seen_ids.insert(id) || starling_store::event_seen(conn, id, dedup_since)?)
                        {
                            report.duplicates += 1;
                            continue;
                        }
                        let profile_id =
                            match self.cache.identities.get(&event.visitor_id).or(links.get(&event.visitor_id)) {
                                Some(pid) => pid.clone(),
                                None => match starling_store::resolve_identity(conn, &event.visitor_id)? {
                                    Some(pid) => pid,
                                    None => {
                                        links.insert(event.visitor_id.clone(), event.visitor_id.clone());
                                        effects.writes.push(Write::Link {
                                            visitor: event.visitor_id.clone(),
                                            profile: event.visitor_id.clone(),
                                        });
                                        event.visitor_id.clone()
                                    }
                                },
                            };
                        let profile = load(&mut self.cache, conn, &mut touched, &profile_id)?;
                        let outcome = apply_event(&model, profile, event, &mut enrichers);
                        for warning in &outcome.warnings {
                            tracing::warn!(visitor = %event.visitor_id, event = %event.name, "{warning}");
                        }
                        effects.writes.push(Write::Event { job: j, event: e, profile: profile_id.clone() });
                        effects.record(conn, &model, &profile_id, outcome, now)?;
                        report.accepted += 1;
                    }
                }
                Work::Wakeups(ids) => {
                    for profile_id in ids {
                        let profile = load(&mut self.cache, conn, &mut touched, profile_id)?;
                        if profile.wakeup_ms.is_some_and(|due| due <= now) {
                            let outcome = apply_time(&model, profile, now);
                            effects.record(conn, &model, profile_id, outcome, now)?;
                        }
                        // Written even when nothing was due, so a stale row cannot wake it again.
                        if let Some((_, loaded)) = touched.get_mut(profile_id) {
                            *loaded = Some(i64::MIN);
                        }
                        report.accepted += 1;
                    }
                }
            }
            reports.push(report);
        }

        let batch = Batch::begin(conn)?;
        for write in &effects.writes {
            match write {
                Write::Link { visitor, profile } => batch.link_identity(visitor, profile)?,
                Write::Event { job, event, profile } => {
                    let Work::Events(events) = &jobs[*job].work else { unreachable!("event writes come from events") };
                    batch.log_event(&events[*event], profile, now)?
                }
                Write::Join { profile, audience, at_ms } => batch.join(profile, audience, *at_ms)?,
                Write::Leave { profile, audience } => batch.leave(profile, audience)?,
                Write::Enqueue { action, due_ms, condition } => {
                    batch.enqueue(action, &action_payload(action), *due_ms, *condition)?;
                }
                Write::Fired { action, profile, at_ms } => batch.mark_fired(action, profile, *at_ms)?,
            }
        }
        for (profile, loaded_wakeup) in touched.values() {
            batch.save_profile(profile, now)?;
            if profile.wakeup_ms != *loaded_wakeup {
                batch.set_wakeup(&profile.id, profile.wakeup_ms)?;
            }
        }
        batch.commit()?;
        if self.cache.profiles.len() + touched.len() > PROFILE_CACHE_LIMIT {
            self.cache = Cache::default();
        }
        self.cache.identities.extend(links);
        self.cache.profiles.extend(touched.into_iter().map(|(id, (p, _))| (id, p)));
        Ok((reports, effects.woken))
    }
}

/// The profile for `profile_id` in this batch, loading it from the cache or the store.
fn load<'t>(
    cache: &mut Cache,
    conn: &rusqlite::Connection,
    touched: &'t mut HashMap<String, (Profile, Option<i64>)>,
    profile_id: &str,
) -> Result<&'t mut Profile, StoreError> {
    if !touched.contains_key(profile_id) {
        let profile = match cache.profiles.remove(profile_id) {
            Some(p) => p,
            None => {
                starling_store::load_profile(conn, profile_id)?.unwrap_or_else(|| Profile::new(profile_id.to_string()))
            }
        };
        let wakeup = profile.wakeup_ms;
        touched.insert(profile_id.to_string(), (profile, wakeup));
    }
    Ok(&mut touched.get_mut(profile_id).expect("inserted above").0)
}

/// Writes and wake-ups decided while applying a batch.
#[derive(Default)]
struct Effects {
    writes: Vec<Write>,
    /// Last firing per (action, profile) within this batch, for frequency caps.
    fired: HashMap<(String, String), i64>,
    /// Actions with new work for their delivery lanes.
    woken: HashSet<String>,
}

impl Effects {
    /// Turns an outcome into writes: membership changes in order, then actions (frequency
    /// capped, delayed as configured).
    fn record(
        &mut self,
        conn: &rusqlite::Connection,
        model: &Model,
        profile_id: &str,
        outcome: Outcome,
        now: i64,
    ) -> Result<(), StoreError> {
        for change in outcome.changes {
            self.writes.push(match change {
                Membership::Joined { audience, at_ms } => {
                    Write::Join { profile: profile_id.to_string(), audience, at_ms }
                }
                Membership::Left { audience, .. } => Write::Leave { profile: profile_id.to_string(), audience },
            });
        }
        for action in outcome.actions {
            let def = model.actions.iter().find(|a| a.name == action.action).expect("actions come from the model");
            let key = (action.action.clone(), profile_id.to_string());
            if let Some(cooldown) = def.delivery.cooldown_ms {
                let last = match self.fired.get(&key) {
                    Some(t) => Some(*t),
                    None => starling_store::last_fired(conn, &action.action, profile_id)?,
                };
                if last.is_some_and(|t| action.occurred_at_ms - t < cooldown) {
                    tracing::debug!(action = %action.action, profile = %profile_id, "frequency cap: not fired");
                    continue;
                }
                self.fired.insert(key, action.occurred_at_ms);
                self.writes.push(Write::Fired {
                    action: action.action.clone(),
                    profile: profile_id.to_string(),
                    at_ms: action.occurred_at_ms,
                });
            }
            let (due_ms, condition) = schedule(def, &action, now);
            self.woken.insert(action.action.clone());
            self.writes.push(Write::Enqueue { action, due_ms, condition });
        }
        Ok(())
    }
}

/// When an action is due, and for delayed actions the membership it requires then.
fn schedule(def: &ActionDef, action: &PendingAction, now: i64) -> (i64, Option<&'static str>) {
    match def.delivery.delay_ms {
        None => (now, None),
        Some(delay) => {
            let condition = match action.trigger {
                Trigger::Joined | Trigger::VisitStarted | Trigger::VisitEnded => Some("member"),
                Trigger::Left => Some("not_member"),
                Trigger::Event => None,
            };
            (action.occurred_at_ms.max(now) + delay, condition)
        }
    }
}

/// What the outbox keeps to rebuild an action at delivery time.
pub fn action_payload(action: &PendingAction) -> serde_json::Value {
    serde_json::json!({
        "settings": action.settings,
        "params": action.params,
    })
}

#[derive(Default)]
struct Cache {
    identities: HashMap<String, String>,
    profiles: HashMap<String, Profile>,
}

/// Runs Wasm enrichers from a worker thread.
struct WasmEnrichers<'a> {
    plugins: &'a PluginHost,
    runtime: &'a tokio::runtime::Handle,
}

impl CustomEnrichers for WasmEnrichers<'_> {
    fn enrich(
        &mut self,
        plugin: &str,
        event: &Event,
        profile: &Profile,
    ) -> Result<Vec<starling_core::engine::Update>, String> {
        let (event, view) = (convert::event_to_wit(event), convert::profile_to_wit(profile));
        let updates =
            self.runtime.block_on(self.plugins.enrich(plugin, &event, &view)).map_err(|e| e.to_string())??;
        convert::updates_from_wit(updates)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitions_are_stable_and_spread() {
        assert_eq!(partition_of("anon-1", 4), partition_of("anon-1", 4));
        let used: HashSet<usize> = (0..100).map(|i| partition_of(&format!("v{i}"), 4)).collect();
        assert_eq!(used.len(), 4);
    }
}

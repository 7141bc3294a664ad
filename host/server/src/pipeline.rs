//! The event pipeline: one thread owns the write connection, applies events to profiles and
//! commits many requests per transaction (group commit). A request is answered only after the
//! transaction holding its events has committed.

use starling_core::{CustomEnrichers, Event, Model, PendingAction, Profile, apply_event};
use starling_runtime::{PluginHost, convert};
use starling_store::{Batch, StoreError};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use tokio::sync::{Notify, mpsc, oneshot};

/// Most requests folded into one transaction.
const MAX_JOBS_PER_COMMIT: usize = 256;
/// Profiles kept in memory between batches before the cache is emptied.
const PROFILE_CACHE_LIMIT: usize = 100_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct IngestReport {
    pub accepted: usize,
    pub duplicates: usize,
}

pub struct IngestJob {
    pub events: Vec<Event>,
    pub reply: oneshot::Sender<Result<IngestReport, String>>,
}

pub struct Pipeline {
    pub model: Arc<Model>,
    pub plugins: Arc<PluginHost>,
    pub runtime: tokio::runtime::Handle,
    /// Woken when actions were queued.
    pub outbox: Arc<Notify>,
    pub clock: fn() -> i64,
}

impl Pipeline {
    /// Runs until every sender of `jobs` is dropped, then returns after the last commit.
    pub fn run(self, mut conn: rusqlite::Connection, mut jobs: mpsc::Receiver<IngestJob>) {
        let mut cache = Cache::default();
        while let Some(first) = jobs.blocking_recv() {
            let mut batch = vec![first];
            while batch.len() < MAX_JOBS_PER_COMMIT {
                match jobs.try_recv() {
                    Ok(job) => batch.push(job),
                    Err(_) => break,
                }
            }
            match self.apply(&mut conn, &mut cache, &batch) {
                Ok((reports, queued)) => {
                    if queued {
                        self.outbox.notify_one();
                    }
                    for (job, report) in batch.into_iter().zip(reports) {
                        let _ = job.reply.send(Ok(report));
                    }
                }
                Err(e) => {
                    tracing::error!("event batch not stored: {e}");
                    cache = Cache::default();
                    for job in batch {
                        let _ = job.reply.send(Err(e.to_string()));
                    }
                }
            }
        }
    }

    fn apply(
        &self,
        conn: &mut rusqlite::Connection,
        cache: &mut Cache,
        jobs: &[IngestJob],
    ) -> Result<(Vec<IngestReport>, bool), StoreError> {
        let now = (self.clock)();
        let mut enrichers = WasmEnrichers { plugins: &self.plugins, runtime: &self.runtime };
        // Profiles touched by this batch, taken out of the cache so a failed commit leaves it clean.
        let mut touched: HashMap<String, Profile> = HashMap::new();
        let mut new_links: Vec<(String, String)> = Vec::new();
        let mut seen_ids: HashSet<&str> = HashSet::new();
        let mut queued = false;
        let mut reports = Vec::with_capacity(jobs.len());
        let batch = Batch::begin(conn)?;
        for job in jobs {
            let mut report = IngestReport { accepted: 0, duplicates: 0 };
            for event in &job.events {
                if let Some(id) = event.id.as_deref()
                    && (!seen_ids.insert(id) || starling_store::event_seen(batch.connection(), id)?)
                {
                    report.duplicates += 1;
                    continue;
                }
                let profile_id = match cache.identities.get(&event.visitor_id).or_else(|| {
                    new_links.iter().find(|(v, _)| *v == event.visitor_id).map(|(_, p)| p)
                }) {
                    Some(pid) => pid.clone(),
                    None => match starling_store::resolve_identity(batch.connection(), &event.visitor_id)? {
                        Some(pid) => pid,
                        None => {
                            batch.link_identity(&event.visitor_id, &event.visitor_id)?;
                            new_links.push((event.visitor_id.clone(), event.visitor_id.clone()));
                            event.visitor_id.clone()
                        }
                    },
                };
                if !touched.contains_key(&profile_id) {
                    let profile = match cache.profiles.remove(&profile_id) {
                        Some(p) => p,
                        None => starling_store::load_profile(batch.connection(), &profile_id)?
                            .unwrap_or_else(|| Profile::new(profile_id.clone())),
                    };
                    touched.insert(profile_id.clone(), profile);
                }
                let profile = touched.get_mut(&profile_id).expect("inserted above");
                let outcome = apply_event(&self.model, profile, event, &mut enrichers);
                for warning in &outcome.warnings {
                    tracing::warn!(visitor = %event.visitor_id, event = %event.name, "{warning}");
                }
                batch.log_event(event, &profile_id)?;
                for audience in &outcome.joined {
                    batch.join(&profile_id, audience, event.timestamp_ms)?;
                }
                for audience in &outcome.left {
                    batch.leave(&profile_id, audience)?;
                }
                for action in &outcome.actions {
                    batch.enqueue(action, &action_payload(action))?;
                    queued = true;
                }
                report.accepted += 1;
            }
            reports.push(report);
        }
        for profile in touched.values() {
            batch.save_profile(profile, now)?;
        }
        batch.commit()?;
        if cache.profiles.len() + touched.len() > PROFILE_CACHE_LIMIT {
            *cache = Cache::default();
        }
        cache.identities.extend(new_links);
        cache.profiles.extend(touched);
        Ok((reports, queued))
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

/// Runs Wasm enrichers from the pipeline thread.
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
        let updates = self
            .runtime
            .block_on(self.plugins.enrich(plugin, &event, &view))
            .map_err(|e| e.to_string())??;
        convert::updates_from_wit(updates)
    }
}

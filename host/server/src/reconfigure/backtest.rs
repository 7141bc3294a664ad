//! Backtest: the events recorded in a window (the profiles' event history) replayed through the
//! running configuration and through a new one, each on scratch profiles in memory, delivering
//! nothing; reports per audience its size under each, and per action how often it would have
//! fired. Both replays start from empty profiles at the window's start (each event applied to
//! the profile it was recorded for), so they compare like with like.

use super::ApplyError;
use crate::api::{ApiError, AppState};
use axum::Json;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use starling_core::{CustomEnrichers, Event, Model, Profile};
use starling_runtime::WasmEnrichers;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

/// Events replayed per step (both configurations in parallel).
const CHUNK: usize = 16_384;

#[derive(serde::Deserialize)]
pub struct BacktestQuery {
    /// How far back the replay starts (`7d`, `12h`); default 7 days.
    since: Option<String>,
}

/// One configuration's replay: profiles in memory, and how often each action fired.
pub struct Scratch {
    model: Arc<Model>,
    profiles: HashMap<String, Profile>,
    fired: BTreeMap<String, u64>,
}

impl Scratch {
    pub fn new(model: Arc<Model>) -> Scratch {
        Scratch { model, profiles: HashMap::new(), fired: BTreeMap::new() }
    }

    /// Applies `events`, each to the profile it was recorded for.
    pub fn replay(&mut self, events: &[(String, Event)], enrichers: &mut dyn CustomEnrichers) {
        for (profile_id, event) in events {
            let profile = self.profiles.entry(profile_id.clone()).or_insert_with(|| Profile::new(profile_id.clone()));
            let outcome = starling_core::apply_event(&self.model, profile, event, enrichers);
            for action in outcome.actions {
                *self.fired.entry(action.action).or_default() += 1;
            }
        }
    }

    /// What time does up to `now` (visits ending, time-relative audiences).
    fn finish(&mut self, now: i64, enrichers: &mut dyn CustomEnrichers) {
        for profile in self.profiles.values_mut() {
            if profile.wakeup_ms.is_some_and(|due| due <= now) {
                for action in starling_core::apply_time(&self.model, profile, now, enrichers).actions {
                    *self.fired.entry(action.action).or_default() += 1;
                }
            }
        }
    }

    pub fn size(&self, audience: &str) -> Option<u64> {
        self.model.audience(audience)?;
        Some(self.profiles.values().filter(|p| p.audiences.contains(audience)).count() as u64)
    }

    pub fn fired(&self, action: &str) -> Option<u64> {
        self.model.action(action)?;
        Some(self.fired.get(action).copied().unwrap_or(0))
    }
}

/// Replays `events` through both configurations at once, on two threads.
pub fn replay_both(
    events: &[(String, Event)],
    old: &mut Scratch,
    new: &mut Scratch,
    old_enrichers: &mut (dyn CustomEnrichers + Send),
    new_enrichers: &mut (dyn CustomEnrichers + Send),
) {
    std::thread::scope(|scope| {
        scope.spawn(|| old.replay(events, old_enrichers));
        new.replay(events, new_enrichers);
    });
}

/// `POST /v1/backtest?since=7d`: the body is the new configuration file.
pub async fn post_backtest(
    State(state): State<AppState>,
    Query(q): Query<BacktestQuery>,
    body: String,
) -> Result<Json<serde_json::Value>, Response> {
    let new = starling_core::parse(&body).map_err(|e| ApplyError::Invalid(e.0).into_response())?;
    let problems = crate::check_plugins(&new, &state.plugins);
    if !problems.is_empty() {
        return Err(ApplyError::Invalid(problems).into_response());
    }
    let since = q.since.as_deref().unwrap_or("7d");
    let window_ms = starling_core::literal::parse_duration(since).map_err(|e| {
        ApiError::new(StatusCode::BAD_REQUEST, format!("since: {e} (for example `7d` or `12h`)")).into_response()
    })?;
    state.ingest.materialize().await.map_err(|e| ApiError::from(e).into_response())?;
    let now = (state.clock)();
    let since_ms = now - window_ms;
    let running = state.config.model();
    let new = Arc::new(new);
    let (database, plugins) = (state.database.clone(), state.plugins.clone());
    let runtime = tokio::runtime::Handle::current();
    let (old_model, new_model) = (running.clone(), new.clone());
    let started = std::time::Instant::now();
    let replayed = tokio::task::spawn_blocking(move || {
        let conn = starling_store::open_reader(&database)?;
        let (mut old, mut new) = (Scratch::new(old_model), Scratch::new(new_model));
        // One thread reads and parses the next chunk while the two replays run.
        let (chunks, next) = std::sync::mpsc::sync_channel::<Vec<(String, Event)>>(2);
        let events = std::thread::scope(|scope| {
            let reader = scope.spawn(move || {
                let mut chunk = Vec::with_capacity(CHUNK);
                let events = starling_store::events_since(&conn, since_ms, |profile, event| {
                    chunk.push((profile.to_string(), event));
                    if chunk.len() == CHUNK {
                        // Refused only once the replays stopped (a panic, which the scope reports).
                        let _ = chunks.send(std::mem::replace(&mut chunk, Vec::with_capacity(CHUNK)));
                    }
                    Ok(())
                });
                let _ = chunks.send(chunk);
                drop(chunks);
                events.map(|events| (events, conn))
            });
            let (mut old_enrichers, mut new_enrichers) =
                (WasmEnrichers::new(&plugins, &runtime), WasmEnrichers::new(&plugins, &runtime));
            for chunk in next {
                replay_both(&chunk, &mut old, &mut new, &mut old_enrichers, &mut new_enrichers);
            }
            old.finish(now, &mut old_enrichers);
            new.finish(now, &mut new_enrichers);
            reader.join().expect("backtest reader")
        });
        let (events, conn) = events?;
        let live_sizes: HashMap<String, i64> = starling_store::audience_sizes(&conn)?.into_iter().collect();
        Ok::<_, starling_store::StoreError>((events, old, new, live_sizes))
    })
    .await
    .map_err(|_| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "backtest task failed").into_response())?
    .map_err(|e| ApiError::from(e).into_response())?;
    let (events, old, new_replay, live_sizes) = replayed;
    let seconds = started.elapsed().as_secs_f64();
    let mut audiences: Vec<&str> = running.audiences.iter().map(|a| a.name.as_str()).collect();
    audiences.extend(new.audiences.iter().map(|a| a.name.as_str()).filter(|n| running.audience(n).is_none()));
    let audiences: Vec<serde_json::Value> = audiences
        .into_iter()
        .map(|name| {
            serde_json::json!({
                "audience": name,
                "running": old.size(name),
                "new": new_replay.size(name),
                "stored_size": live_sizes.get(name),
            })
        })
        .collect();
    let mut actions: Vec<&str> = running.actions.iter().map(|a| a.name.as_str()).collect();
    actions.extend(new.actions.iter().map(|a| a.name.as_str()).filter(|n| running.action(n).is_none()));
    let actions: Vec<serde_json::Value> = actions
        .into_iter()
        .map(|name| serde_json::json!({ "action": name, "running": old.fired(name), "new": new_replay.fired(name) }))
        .collect();
    Ok(Json(serde_json::json!({
        "since": starling_core::time::format_rfc3339(since_ms),
        "events": events,
        "profiles": old.profiles.len(),
        "elapsed_ms": (seconds * 1000.0) as u64,
        "events_per_second": (events as f64 / seconds.max(1e-9)) as u64,
        "audiences": audiences,
        "actions": actions,
    })))
}

//! Delivering the outbox: due actions are grouped by connector, handed to the connector's
//! component, and each result recorded: delivered, retried with backoff and jitter (or after the
//! destination's Retry-After), failed for good on a permanent error, or dead after too many tries.

use rusqlite::Connection;
use starling_core::Value;
use starling_runtime::{PluginHost, convert, types};
use starling_store::{Attempt, OutboxEntry};
use std::collections::{BTreeMap, HashMap};
use std::hash::BuildHasher;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{Notify, watch};

/// Attempts before an action is moved to the dead letters.
pub const MAX_ATTEMPTS: i64 = 12;
const FIRST_RETRY_MS: i64 = 1_000;
const MAX_RETRY_MS: i64 = 10 * 60 * 1_000;
/// Longest sleep between outbox scans when nothing wakes the loop.
const IDLE_POLL: Duration = Duration::from_millis(500);
const BATCH: usize = 256;

pub struct Delivery {
    pub plugins: Arc<PluginHost>,
    pub conn: Arc<Mutex<Connection>>,
    pub outbox: Arc<Notify>,
    pub clock: fn() -> i64,
}

impl Delivery {
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        loop {
            if *shutdown.borrow() {
                return;
            }
            let now = (self.clock)();
            let due = match self.db(move |c| starling_store::due_actions(c, now, BATCH)).await {
                Ok(due) => due,
                Err(e) => {
                    tracing::error!("reading the outbox: {e}");
                    Vec::new()
                }
            };
            if due.is_empty() {
                let next = self.db(starling_store::next_due).await.ok().flatten();
                let wait = next.map_or(IDLE_POLL, |t| Duration::from_millis((t - now).clamp(0, 500) as u64));
                tokio::select! {
                    _ = self.outbox.notified() => {}
                    _ = tokio::time::sleep(wait) => {}
                    _ = shutdown.changed() => {}
                }
                continue;
            }
            let mut by_connector: HashMap<String, Vec<OutboxEntry>> = HashMap::new();
            for entry in due {
                by_connector.entry(entry.connector.clone()).or_default().push(entry);
            }
            let mut tasks = tokio::task::JoinSet::new();
            for (connector, entries) in by_connector {
                let (plugins, conn, clock) = (self.plugins.clone(), self.conn.clone(), self.clock);
                tasks.spawn(async move { deliver_group(&plugins, &conn, clock, &connector, entries).await });
            }
            while tasks.join_next().await.is_some() {}
        }
    }

    async fn db<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> starling_store::Result<T> + Send + 'static,
    ) -> starling_store::Result<T> {
        let conn = self.conn.clone();
        tokio::task::spawn_blocking(move || f(&conn.lock().expect("delivery connection")))
            .await
            .expect("outbox task")
    }
}

async fn deliver_group(
    plugins: &PluginHost,
    conn: &Mutex<Connection>,
    clock: fn() -> i64,
    connector: &str,
    entries: Vec<OutboxEntry>,
) {
    let actions: Vec<types::Action> = entries.iter().map(to_wit).collect();
    let outcome = plugins.deliver(connector, &actions).await;
    let now = clock();
    let attempts: Vec<Attempt> = match outcome {
        Ok(results) => entries.iter().zip(results).map(|(e, r)| attempt_for(e, r, now)).collect(),
        Err(err) => {
            tracing::warn!(connector, "delivery call failed: {err}");
            entries.iter().map(|e| retry(e, now, err.to_string(), None)).collect()
        }
    };
    let conn = conn.lock().expect("delivery connection");
    for (entry, attempt) in entries.iter().zip(&attempts) {
        if let Err(e) = starling_store::record_attempt(&conn, entry.id, attempt, now) {
            tracing::error!(action = entry.id, "recording a delivery attempt: {e}");
        }
        match attempt {
            Attempt::Delivered => tracing::debug!(action = entry.id, connector, "delivered"),
            Attempt::Retry { error, .. } => tracing::info!(action = entry.id, connector, "will retry: {error}"),
            Attempt::GiveUp { status, error } => tracing::warn!(action = entry.id, connector, status, "{error}"),
        }
    }
}

fn attempt_for(entry: &OutboxEntry, result: Result<(), types::DeliveryError>, now: i64) -> Attempt {
    match result {
        Ok(()) => Attempt::Delivered,
        Err(types::DeliveryError::Permanent(m)) => Attempt::GiveUp { status: "failed", error: format!("permanent: {m}") },
        Err(types::DeliveryError::Retryable(m)) => retry(entry, now, format!("retryable: {m}"), None),
        Err(types::DeliveryError::RateLimited(r)) => {
            retry(entry, now, format!("rate limited: {}", r.message), Some(r.retry_after_ms as i64))
        }
    }
}

/// The next attempt: after `after_ms` when the destination asked, else exponential backoff
/// with ±20% jitter; dead after [`MAX_ATTEMPTS`].
fn retry(entry: &OutboxEntry, now: i64, error: String, after_ms: Option<i64>) -> Attempt {
    if entry.attempts + 1 >= MAX_ATTEMPTS {
        return Attempt::GiveUp { status: "dead", error: format!("{error} (gave up after {MAX_ATTEMPTS} attempts)") };
    }
    let delay = after_ms.unwrap_or_else(|| {
        let base = (FIRST_RETRY_MS << entry.attempts.min(20)).min(MAX_RETRY_MS);
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
    let payload: Payload = serde_json::from_str(&entry.payload)
        .unwrap_or(Payload { settings: BTreeMap::new(), params: Vec::new() });
    let trigger = match entry.trigger.as_str() {
        "left" => types::Trigger::Left,
        "visit_started" => types::Trigger::VisitStarted,
        "visit_ended" => types::Trigger::VisitEnded,
        "event" => types::Trigger::Event,
        _ => types::Trigger::Joined,
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

    fn entry(attempts: i64) -> OutboxEntry {
        OutboxEntry {
            id: 1,
            action: "a".into(),
            connector: "c".into(),
            trigger: "joined".into(),
            audience: "x".into(),
            profile_id: "p".into(),
            occurred_ms: 0,
            payload: "{}".into(),
            status: "pending".into(),
            attempts,
            next_attempt_ms: 0,
            last_error: None,
            delivered_ms: None,
        }
    }

    #[test]
    fn backoff_grows_with_jitter_and_honours_retry_after() {
        for attempts in 0..5 {
            let Attempt::Retry { at_ms, .. } = retry(&entry(attempts), 0, "x".into(), None) else { panic!() };
            let base = FIRST_RETRY_MS << attempts;
            assert!((base * 4 / 5..=base * 6 / 5).contains(&at_ms), "{attempts}: {at_ms}");
        }
        let Attempt::Retry { at_ms, .. } = retry(&entry(0), 100, "x".into(), Some(30_000)) else { panic!() };
        assert_eq!(at_ms, 30_100);
    }

    #[test]
    fn retries_end_in_the_dead_letters() {
        assert!(matches!(retry(&entry(MAX_ATTEMPTS - 1), 0, "x".into(), None), Attempt::GiveUp { status: "dead", .. }));
    }

    #[test]
    fn permanent_errors_are_not_retried() {
        let a = attempt_for(&entry(0), Err(types::DeliveryError::Permanent("HTTP 400".into())), 0);
        assert_eq!(a, Attempt::GiveUp { status: "failed", error: "permanent: HTTP 400".into() });
    }
}

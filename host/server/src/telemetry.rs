//! What the engine tells its operators: Prometheus metrics, and live traces of chosen visitors.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use tokio::sync::broadcast;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ActionLabel {
    pub action: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub action: String,
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct NameLabel {
    pub name: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PartitionLabel {
    pub partition: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ImportLabel {
    pub definition: String,
    pub outcome: String,
}

/// Every metric the server exports. Counters and histograms are updated where things happen;
/// gauges read from the store and the plugin host are set when `/metrics` is scraped.
pub struct Metrics {
    registry: Registry,
    pub events_accepted: Counter,
    pub events_duplicate: Counter,
    pub events_rejected: Family<ReasonLabel, Counter>,
    pub spec_warnings: Counter,
    pub event_times_clamped: Counter,
    pub profile_budget_refusals: Counter,
    pub identity_refusals: Family<ReasonLabel, Counter>,
    pub event_apply_seconds: Histogram,
    pub commit_seconds: Histogram,
    pub early_write_seconds: Histogram,
    pub log_sync_seconds: Histogram,
    pub log_bytes_appended: Counter,
    pub log_records_replayed: Counter,
    pub log_bytes: Gauge,
    pub log_bytes_truncated: Counter,
    pub delivery_seconds: Family<ActionLabel, Histogram>,
    pub deliveries: Family<ResultLabel, Counter>,
    pub profiles_deleted: Family<ReasonLabel, Counter>,
    pub import_rows: Family<ImportLabel, Counter>,
    pub ingest_queue_depth: Family<PartitionLabel, Gauge>,
    pub actions_pending: Family<ActionLabel, Gauge>,
    pub audience_size: Family<NameLabel, Gauge>,
    pub plugin_calls: Family<NameLabel, Gauge>,
    pub plugin_call_seconds: Family<NameLabel, Gauge<f64, AtomicU64>>,
    pub plugin_failures: Family<NameLabel, Gauge>,
    pub plugin_disabled: Family<NameLabel, Gauge>,
}

impl Telemetry {
    /// Registers the gauges kept outside `Metrics`.
    pub fn new() -> Telemetry {
        let mut telemetry = Telemetry::default();
        telemetry.metrics.registry.register(
            "disk_full",
            "1 while writes fail for lack of disk space (ingestion answers 507)",
            telemetry.storage.gauge.clone(),
        );
        telemetry
    }
}

impl Default for Metrics {
    fn default() -> Self {
        let latency = || Histogram::new(exponential_buckets(0.000_005, 2.0, 22));
        let mut m = Metrics {
            registry: Registry::with_prefix("starling"),
            events_accepted: Counter::default(),
            events_duplicate: Counter::default(),
            events_rejected: Family::default(),
            spec_warnings: Counter::default(),
            event_times_clamped: Counter::default(),
            profile_budget_refusals: Counter::default(),
            identity_refusals: Family::default(),
            event_apply_seconds: latency(),
            commit_seconds: latency(),
            early_write_seconds: latency(),
            log_sync_seconds: latency(),
            log_bytes_appended: Counter::default(),
            log_records_replayed: Counter::default(),
            log_bytes: Gauge::default(),
            log_bytes_truncated: Counter::default(),
            delivery_seconds: Family::new_with_constructor(|| Histogram::new(exponential_buckets(0.000_05, 2.0, 20))),
            deliveries: Family::default(),
            profiles_deleted: Family::default(),
            import_rows: Family::default(),
            ingest_queue_depth: Family::default(),
            actions_pending: Family::default(),
            audience_size: Family::default(),
            plugin_calls: Family::default(),
            plugin_call_seconds: Family::default(),
            plugin_failures: Family::default(),
            plugin_disabled: Family::default(),
        };
        let r = &mut m.registry;
        r.register("events_accepted", "Events stored and applied", m.events_accepted.clone());
        r.register("events_duplicate", "Events skipped as already seen (same id)", m.events_duplicate.clone());
        r.register("events_rejected", "Events refused, by reason", m.events_rejected.clone());
        r.register("event_spec_warnings", "Events applied although they break their spec", m.spec_warnings.clone());
        r.register(
            "event_times_clamped",
            "Events dated after their receipt, applied at the time they were received",
            m.event_times_clamped.clone(),
        );
        r.register(
            "profile_budget_refusals",
            "Events whose attribute updates were refused for taking a profile past server.max_profile_kib",
            m.profile_budget_refusals.clone(),
        );
        r.register(
            "identity_refusals",
            "Visitor ids not set or not stitched: unclaimed by the event's source, or past max_per_profile",
            m.identity_refusals.clone(),
        );
        r.register(
            "event_apply_seconds",
            "Time to apply one event: identity, enrichment, audience evaluation",
            m.event_apply_seconds.clone(),
        );
        r.register(
            "commit_seconds",
            "Time to store one batch: event log append, SQLite commit, log sync",
            m.commit_seconds.clone(),
        );
        r.register(
            "early_write_seconds",
            "Time to write a batch's id claims and actions ahead of its state, in a SQLite transaction of their own",
            m.early_write_seconds.clone(),
        );
        r.register(
            "log_sync_seconds",
            "Time a batch waited for the event log to reach the disk (syncs shared by workers)",
            m.log_sync_seconds.clone(),
        );
        r.register("log_appended_bytes", "Bytes of records appended to the event log", m.log_bytes_appended.clone());
        r.register(
            "log_replayed_records",
            "Event log records applied again at start (after the stored state)",
            m.log_records_replayed.clone(),
        );
        r.register("log_bytes", "Bytes the event log holds on disk", m.log_bytes.clone());
        r.register(
            "log_truncated_bytes",
            "Bytes of the event log freed after checkpoints",
            m.log_bytes_truncated.clone(),
        );
        r.register("delivery_seconds", "Time of one connector call, by action", m.delivery_seconds.clone());
        r.register("deliveries", "Delivery attempts by action and result", m.deliveries.clone());
        r.register("profiles_deleted", "Profiles deleted, by reason", m.profiles_deleted.clone());
        r.register("import_rows", "Rows of offline imports, by definition and outcome", m.import_rows.clone());
        r.register("ingest_queue_depth", "Requests queued per ingestion partition", m.ingest_queue_depth.clone());
        r.register("actions_pending", "Actions waiting in the outbox, by action", m.actions_pending.clone());
        r.register("audience_size", "Profiles in each audience", m.audience_size.clone());
        r.register("plugin_calls", "Calls made to each plugin", m.plugin_calls.clone());
        r.register("plugin_call_seconds", "Seconds spent in calls to each plugin", m.plugin_call_seconds.clone());
        r.register("plugin_failures", "Failed calls (traps, timeouts) per plugin", m.plugin_failures.clone());
        r.register("plugin_disabled", "1 when a plugin is disabled after repeated failures", m.plugin_disabled.clone());
        m
    }
}

impl Metrics {
    pub fn reject(&self, reason: &str, events: u64) {
        self.events_rejected.get_or_create(&ReasonLabel { reason: reason.to_string() }).inc_by(events);
    }

    pub fn count_id_refusal(&self, refusal: starling_core::IdRefusal) {
        self.identity_refusals.get_or_create(&ReasonLabel { reason: refusal.name().to_string() }).inc();
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).expect("writing to a string");
        out
    }
}

/// Live traces: subscribers per visitor or profile id, each receiving every step of that
/// visitor's events as JSON. Costs one atomic load per event while nobody traces.
#[derive(Default)]
pub struct Tracer {
    active: AtomicU64,
    channels: RwLock<HashMap<String, broadcast::Sender<Arc<serde_json::Value>>>>,
}

/// Steps kept for a subscriber that reads slowly; older ones are dropped (and counted).
const TRACE_BACKLOG: usize = 1024;

impl Tracer {
    /// Follows `ids` (a visitor id and the profile it belongs to) on one channel.
    pub fn subscribe(&self, ids: &[String]) -> broadcast::Receiver<Arc<serde_json::Value>> {
        let mut channels = self.channels.write().expect("tracer lock");
        channels.retain(|_, tx| tx.receiver_count() > 0);
        let tx =
            ids.iter().find_map(|id| channels.get(id).cloned()).unwrap_or_else(|| broadcast::channel(TRACE_BACKLOG).0);
        let rx = tx.subscribe();
        for id in ids {
            channels.insert(id.clone(), tx.clone());
        }
        self.active.store(channels.len() as u64, Ordering::Release);
        rx
    }

    /// Whether anyone traces any of `ids`.
    pub fn watches(&self, ids: &[&str]) -> bool {
        if self.active.load(Ordering::Acquire) == 0 {
            return false;
        }
        let channels = self.channels.read().expect("tracer lock");
        ids.iter().any(|id| channels.get(*id).is_some_and(|tx| tx.receiver_count() > 0))
    }

    /// Sends `step` to whoever traces any of `ids` (once per channel).
    pub fn emit(&self, ids: &[&str], step: serde_json::Value) {
        if self.active.load(Ordering::Acquire) == 0 {
            return;
        }
        let channels = self.channels.read().expect("tracer lock");
        let step = Arc::new(step);
        let mut sent: Vec<&broadcast::Sender<_>> = Vec::new();
        for id in ids {
            if let Some(tx) = channels.get(*id)
                && !sent.iter().any(|s| s.same_channel(tx))
            {
                let _ = tx.send(step.clone());
                sent.push(tx);
            }
        }
    }
}

/// Metrics and traces, shared by the API, the pipeline and the delivery lanes.
#[derive(Default)]
pub struct Telemetry {
    pub metrics: Metrics,
    pub tracer: Tracer,
    pub storage: Storage,
}

/// What a write that may fail for lack of space went to.
#[derive(Debug, Clone, Copy)]
pub enum Written {
    EventLog = 0,
    Database = 1,
}

/// Whether writes are failing for lack of disk space, and why: per file kind, set where a
/// write to it fails so, cleared by a later write to it that succeeds (the server resumes by
/// itself once space is freed). A small write may still fit on a nearly full disk while a
/// larger one does not: a success clears the state only once no write has failed for
/// `FULL_HOLD`.
#[derive(Default)]
pub struct Storage {
    full: [std::sync::Mutex<Option<(std::time::Instant, String)>>; 2],
    gauge: Gauge,
}

const FULL_HOLD: std::time::Duration = std::time::Duration::from_secs(1);

impl Storage {
    /// Records a failed write; says whether it failed for lack of space.
    pub fn failed(&self, to: Written, error: &(dyn std::error::Error + 'static)) -> bool {
        if !out_of_space(error) {
            return false;
        }
        let was = self.full[to as usize]
            .lock()
            .expect("storage state")
            .replace((std::time::Instant::now(), error.to_string()));
        if was.is_none() {
            self.gauge.set(1);
            tracing::error!("the disk is full ({to:?}): {error}; new events are refused (507) until space is freed");
        }
        true
    }

    /// Records a write that succeeded.
    pub fn succeeded(&self, to: Written) {
        let mut state = self.full[to as usize].lock().expect("storage state");
        if state.as_ref().is_some_and(|(at, _)| at.elapsed() >= FULL_HOLD) {
            *state = None;
            drop(state);
            tracing::info!("disk space available again ({to:?}): writes resumed");
            if self.full().is_none() {
                self.gauge.set(0);
            }
        }
    }

    /// Why writes are failing for lack of space, while they are.
    pub fn full(&self) -> Option<String> {
        self.full.iter().find_map(|f| f.lock().expect("storage state").as_ref().map(|(_, why)| why.clone()))
    }
}

/// Whether `error`, or an error it was caused by, is the file system's "no space" (or quota)
/// or SQLite's "database or disk is full".
pub fn out_of_space(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(error);
    while let Some(e) = cause {
        if let Some(io) = e.downcast_ref::<std::io::Error>()
            && (io.kind() == std::io::ErrorKind::StorageFull || matches!(io.raw_os_error(), Some(28 | 122)))
        {
            return true;
        }
        if let Some(rusqlite::Error::SqliteFailure(f, _)) = e.downcast_ref::<rusqlite::Error>()
            && f.code == rusqlite::ErrorCode::DiskFull
        {
            return true;
        }
        cause = e.source();
    }
    false
}

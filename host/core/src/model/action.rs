//! Actions: what fires when a visitor joins or leaves an audience, and how it is delivered.

use crate::attribute::ValueSource;
use crate::condition::Condition;
use std::collections::BTreeMap;
use std::ops::Range;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Trigger {
    Joined,
    Left,
    /// The visitor is in the audience when a visit starts (after its first event).
    VisitStarted,
    /// The visitor is in the audience when a visit ends.
    VisitEnded,
    /// Every event that matches (an event feed; no audience).
    Event,
    /// The profile is deleted (on request or by retention): every deleted profile, or with an
    /// audience only its members. Connectors see it as leaving that audience.
    Deleted,
}

impl Trigger {
    pub const ALL: [Trigger; 6] =
        [Trigger::Joined, Trigger::Left, Trigger::VisitStarted, Trigger::VisitEnded, Trigger::Event, Trigger::Deleted];

    pub fn parse(s: &str) -> Option<Trigger> {
        Trigger::ALL.into_iter().find(|t| t.name() == s)
    }

    pub fn name(self) -> &'static str {
        match self {
            Trigger::Joined => "joined",
            Trigger::Left => "left",
            Trigger::VisitStarted => "visit_started",
            Trigger::VisitEnded => "visit_ended",
            Trigger::Event => "event",
            Trigger::Deleted => "deleted",
        }
    }
}

impl std::fmt::Display for Trigger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.name())
    }
}

#[derive(Debug, Clone)]
pub struct ActionDef {
    pub name: String,
    /// The audience the trigger is about; empty for event feeds.
    pub audience: String,
    pub trigger: Trigger,
    /// Event feeds: only events of this name.
    pub event: Option<String>,
    /// Event feeds: only events (and profiles) matching this.
    pub condition: Option<Condition>,
    pub connector: String,
    pub connector_span: Range<usize>,
    pub settings: BTreeMap<String, String>,
    pub params: Vec<(String, ValueSource)>,
    pub delivery: DeliveryPolicy,
    /// Whether membership changes found by a backfill (after a configuration change) fire it.
    pub on_backfill: OnBackfill,
}

impl ActionDef {
    /// Whether two definitions do the same, wherever they are written in their files.
    pub fn same_as(&self, other: &ActionDef) -> bool {
        (&self.name, &self.audience, self.trigger, &self.event, &self.condition, &self.connector)
            == (&other.name, &other.audience, other.trigger, &other.event, &other.condition, &other.connector)
            && (&self.settings, &self.params, &self.delivery, self.on_backfill)
                == (&other.settings, &other.params, &other.delivery, other.on_backfill)
    }
}

/// What a `joined` or `left` action does about membership changes a backfill finds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OnBackfill {
    /// Only changes made by events and time fire the action (the default: a new audience does
    /// not greet every stored profile at once).
    #[default]
    Skip,
    /// Changes found by a backfill fire it too, paced by its delivery lane.
    Fire,
}

/// How an action's deliveries are paced.
#[derive(Debug, Clone, PartialEq)]
pub struct DeliveryPolicy {
    /// At most one action per visitor within this period; later firings are dropped.
    pub cooldown_ms: Option<i64>,
    /// Deliver this long after the trigger, and only if the visitor is still in (for `joined`)
    /// or still out of (for `left`) the audience then.
    pub delay_ms: Option<i64>,
    pub batch: Option<BatchPolicy>,
    /// Calls of this action's connector in flight at once.
    pub concurrency: usize,
    /// Attempts before an action becomes a dead letter.
    pub max_attempts: u32,
    /// Backoff before the first retry; it doubles per attempt (with jitter) up to `retry_max_ms`.
    pub retry_initial_ms: i64,
    pub retry_max_ms: i64,
}

impl Default for DeliveryPolicy {
    fn default() -> Self {
        DeliveryPolicy {
            cooldown_ms: None,
            delay_ms: None,
            batch: None,
            concurrency: 4,
            max_attempts: 12,
            retry_initial_ms: 1_000,
            retry_max_ms: 10 * 60_000,
        }
    }
}

/// Actions are handed to the connector together once any limit is reached.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchPolicy {
    pub max_items: usize,
    pub max_age_ms: i64,
    pub max_bytes: usize,
}

//! A visitor profile: preloaded counters, declared attributes, badges and audience memberships.

use crate::attribute::Preloaded;
use crate::value::Value;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, VecDeque};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Profile {
    pub id: String,
    pub first_seen_ms: i64,
    pub last_seen_ms: i64,
    pub event_count: u64,
    pub visit_count: u64,
    pub visit_start_ms: i64,
    pub visit_event_count: u64,
    #[serde(default)]
    pub attributes: BTreeMap<String, Value>,
    #[serde(default)]
    pub badges: BTreeSet<String>,
    #[serde(default)]
    pub audiences: BTreeSet<String>,
    /// Recent values behind rolling sums and averages, by attribute.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub rolling: BTreeMap<String, VecDeque<f64>>,
    /// Value counts behind "most frequent" captures, by attribute.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub frequencies: BTreeMap<String, BTreeMap<String, u64>>,
    /// The values each visitor-id attribute with `max_per_profile` has held, so that the
    /// limit holds when the attribute changes or two profiles are stitched.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub held_ids: BTreeMap<String, BTreeSet<String>>,
    /// Whether the current visit has ended (by timeout); the next event starts a new one.
    #[serde(default)]
    pub visit_ended: bool,
    /// The current visit's inactivity timeout when it is not the default (set by the data
    /// source of its latest event).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub visit_timeout_ms: Option<i64>,
    /// When the engine must look at this profile again without an event (visit end, or a
    /// time-relative audience changing).
    #[serde(default)]
    pub wakeup_ms: Option<i64>,
    /// The wake-up the store has scheduled. It may come before `wakeup_ms`: each event moves
    /// the visit's end, and rescheduling it every time would cost a write per event, so an
    /// early wake-up finds nothing due and schedules the real one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheduled_wakeup_ms: Option<i64>,
}

/// One attribute of a profile as it was at some point (see `Profile::save`).
#[derive(Debug, Clone)]
pub struct SavedAttribute {
    pub name: String,
    value: Option<Value>,
    rolling: Option<VecDeque<f64>>,
    frequencies: Option<BTreeMap<String, u64>>,
    badge: bool,
    /// `Profile::attribute_bytes` when saved.
    pub bytes: usize,
}

impl SavedAttribute {
    /// The attribute's value when saved.
    pub fn value(&self) -> Option<&Value> {
        self.value.as_ref()
    }
}

impl Profile {
    /// A profile never seen before; its first event starts its first visit.
    pub fn new(id: impl Into<String>) -> Profile {
        Profile {
            id: id.into(),
            first_seen_ms: 0,
            last_seen_ms: 0,
            event_count: 0,
            visit_count: 0,
            visit_start_ms: 0,
            visit_event_count: 0,
            attributes: BTreeMap::new(),
            badges: BTreeSet::new(),
            audiences: BTreeSet::new(),
            rolling: BTreeMap::new(),
            frequencies: BTreeMap::new(),
            held_ids: BTreeMap::new(),
            visit_ended: false,
            visit_timeout_ms: None,
            wakeup_ms: None,
            scheduled_wakeup_ms: None,
        }
    }

    pub fn is_new(&self) -> bool {
        self.event_count == 0
    }

    /// Removes attribute `name`'s value and what it was computed from.
    pub fn clear(&mut self, name: &str) {
        self.attributes.remove(name);
        self.rolling.remove(name);
        self.frequencies.remove(name);
    }

    /// About how many bytes the profile takes stored (see `Value::stored_bytes`).
    pub fn stored_bytes(&self) -> usize {
        const FIXED_BYTES: usize = 256;
        let names = |s: &BTreeSet<String>| s.iter().map(|n| n.len() + 3).sum::<usize>();
        FIXED_BYTES
            + self.id.len()
            + names(&self.badges)
            + names(&self.audiences)
            + self.held_ids.values().map(names).sum::<usize>()
            + self
                .attributes
                .keys()
                .chain(self.rolling.keys())
                .chain(self.frequencies.keys())
                .map(|n| n.len() + 3)
                .sum::<usize>()
            + self.attributes.keys().map(|n| self.attribute_bytes(n)).sum::<usize>()
    }

    /// About how many bytes attribute `name` takes stored, with what it is computed from.
    pub fn attribute_bytes(&self, name: &str) -> usize {
        self.attributes.get(name).map_or(0, Value::stored_bytes)
            + self.rolling.get(name).map_or(0, |r| r.len() * 16)
            + self.frequencies.get(name).map_or(0, |f| f.keys().map(|v| v.len() + 19).sum())
            + if self.badges.contains(name) { name.len() + 3 } else { 0 }
    }

    /// Attribute `name` as it is now, to put back with `restore`.
    pub fn save(&self, name: &str) -> SavedAttribute {
        SavedAttribute {
            name: name.to_string(),
            value: self.attributes.get(name).cloned(),
            rolling: self.rolling.get(name).cloned(),
            frequencies: self.frequencies.get(name).cloned(),
            badge: self.badges.contains(name),
            bytes: self.attribute_bytes(name),
        }
    }

    /// Puts back an attribute as it was saved.
    pub fn restore(&mut self, saved: SavedAttribute) {
        let name = saved.name;
        match saved.value {
            Some(v) => self.attributes.insert(name.clone(), v),
            None => self.attributes.remove(&name),
        };
        match saved.rolling {
            Some(r) => self.rolling.insert(name.clone(), r),
            None => self.rolling.remove(&name),
        };
        match saved.frequencies {
            Some(f) => self.frequencies.insert(name.clone(), f),
            None => self.frequencies.remove(&name),
        };
        if saved.badge {
            self.badges.insert(name);
        } else {
            self.badges.remove(&name);
        }
    }

    /// The current value of a declared or preloaded attribute. Badges read as `true` when assigned.
    pub fn get(&self, name: &str) -> Option<Value> {
        if self.is_new() {
            return self.attributes.get(name).cloned();
        }
        if let Some(preloaded) = Preloaded::parse(name) {
            return Some(self.preloaded(preloaded));
        }
        if self.badges.contains(name) {
            return Some(Value::Boolean(true));
        }
        self.attributes.get(name).cloned()
    }

    /// The value of a preloaded attribute.
    pub fn preloaded(&self, attribute: Preloaded) -> Value {
        match attribute {
            Preloaded::FirstSeen => Value::Date(self.first_seen_ms),
            Preloaded::LastSeen => Value::Date(self.last_seen_ms),
            Preloaded::EventCount => Value::Number(self.event_count as f64),
            Preloaded::VisitCount => Value::Number(self.visit_count as f64),
            Preloaded::VisitStart => Value::Date(self.visit_start_ms),
            Preloaded::VisitEventCount => Value::Number(self.visit_event_count as f64),
            Preloaded::VisitDurationMs => Value::Number((self.last_seen_ms - self.visit_start_ms) as f64),
        }
    }

    /// The profile as the API shows it.
    pub fn to_json(&self) -> serde_json::Value {
        let attributes: serde_json::Map<String, serde_json::Value> =
            self.attributes.iter().map(|(k, v)| (k.clone(), v.to_json())).collect();
        let date = |ms| serde_json::Value::String(crate::time::format_rfc3339(ms));
        serde_json::json!({
            "id": self.id,
            "first_seen": date(self.first_seen_ms),
            "last_seen": date(self.last_seen_ms),
            "event_count": self.event_count,
            "visit_count": self.visit_count,
            "visit_start": date(self.visit_start_ms),
            "visit_event_count": self.visit_event_count,
            "attributes": attributes,
            "badges": self.badges,
            "audiences": self.audiences,
            "visit_open": !self.visit_ended,
        })
    }
}

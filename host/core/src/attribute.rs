//! What an attribute is: its definition, where values come from, how two profiles' values
//! combine when stitched, and the attributes every profile has.

use crate::literal::parse_event_path;
use crate::value::{AttrType, Scope, Value};

/// The attributes every profile has, kept by the engine; their names are reserved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Preloaded {
    FirstSeen,
    LastSeen,
    EventCount,
    VisitCount,
    VisitStart,
    VisitEventCount,
    VisitDurationMs,
}

impl Preloaded {
    pub const ALL: [Preloaded; 7] = [
        Preloaded::FirstSeen,
        Preloaded::LastSeen,
        Preloaded::EventCount,
        Preloaded::VisitCount,
        Preloaded::VisitStart,
        Preloaded::VisitEventCount,
        Preloaded::VisitDurationMs,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Preloaded::FirstSeen => "first_seen",
            Preloaded::LastSeen => "last_seen",
            Preloaded::EventCount => "event_count",
            Preloaded::VisitCount => "visit_count",
            Preloaded::VisitStart => "visit_start",
            Preloaded::VisitEventCount => "visit_event_count",
            Preloaded::VisitDurationMs => "visit_duration_ms",
        }
    }

    pub fn parse(name: &str) -> Option<Preloaded> {
        // A match, not a search of `ALL`: every attribute read by a rule asks this first.
        Some(match name {
            "first_seen" => Preloaded::FirstSeen,
            "last_seen" => Preloaded::LastSeen,
            "event_count" => Preloaded::EventCount,
            "visit_count" => Preloaded::VisitCount,
            "visit_start" => Preloaded::VisitStart,
            "visit_event_count" => Preloaded::VisitEventCount,
            "visit_duration_ms" => Preloaded::VisitDurationMs,
            _ => return None,
        })
    }

    pub fn ty(self) -> AttrType {
        match self {
            Preloaded::FirstSeen | Preloaded::LastSeen | Preloaded::VisitStart => AttrType::Date,
            _ => AttrType::Number,
        }
    }

    /// Whether every event changes it (so audiences reading it are evaluated on every event).
    pub fn changed_by_every_event(self) -> bool {
        matches!(
            self,
            Preloaded::LastSeen | Preloaded::EventCount | Preloaded::VisitEventCount | Preloaded::VisitDurationMs
        )
    }
}

/// The type of a preloaded attribute.
pub fn preloaded_type(name: &str) -> Option<AttrType> {
    Preloaded::parse(name).map(Preloaded::ty)
}

#[derive(Debug, Clone)]
pub struct AttributeDef {
    pub name: String,
    pub scope: Scope,
    pub ty: AttrType,
    /// Event scope: where in the event's `data` the value is read.
    pub field: Option<Vec<String>>,
    /// Arrays and timelines: most items kept (oldest dropped first).
    pub max_entries: usize,
    /// Timelines: age after which entries expire.
    pub max_age_ms: i64,
    /// Funnels: the steps, in order.
    pub steps: Vec<FunnelStepDef>,
    /// How the values of two stitched profiles combine.
    pub merge: MergeRule,
    /// Visitor ids: how many different values one profile may hold (a second email hash is
    /// not set, and profiles holding different ones are not stitched).
    pub max_per_profile: Option<usize>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct FunnelStepDef {
    pub name: String,
    pub required: bool,
}

/// Where an enrichment or action parameter takes a value from.
#[derive(Debug, Clone, PartialEq)]
pub enum ValueSource {
    Const(Value),
    /// A dotted path into the event's `data`.
    Event(Vec<String>),
    /// The event's time.
    Now,
    Attribute(String),
}

/// How two profiles' values of one attribute combine when the profiles are stitched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MergeRule {
    /// Numbers add; tallies add per key.
    Add,
    Min,
    Max,
    /// The value of the profile seen most recently (if it has one).
    Latest,
    /// The value of the profile seen first (if it has one).
    Earliest,
    /// Sets and badges: members of either.
    Union,
    /// Arrays: the earlier profile's items, then the later one's (then capped).
    Append,
    /// Timelines: entries of both, in time order (then capped).
    Interleave,
    /// Funnels: the one that reached more steps (a completed one wins).
    MostAdvanced,
}

impl MergeRule {
    pub const ALL: [MergeRule; 9] = [
        MergeRule::Add,
        MergeRule::Min,
        MergeRule::Max,
        MergeRule::Latest,
        MergeRule::Earliest,
        MergeRule::Union,
        MergeRule::Append,
        MergeRule::Interleave,
        MergeRule::MostAdvanced,
    ];

    pub fn name(self) -> &'static str {
        match self {
            MergeRule::Add => "add",
            MergeRule::Min => "min",
            MergeRule::Max => "max",
            MergeRule::Latest => "latest",
            MergeRule::Earliest => "earliest",
            MergeRule::Union => "union",
            MergeRule::Append => "append",
            MergeRule::Interleave => "interleave",
            MergeRule::MostAdvanced => "most_advanced",
        }
    }

    pub fn parse(s: &str) -> Option<MergeRule> {
        MergeRule::ALL.into_iter().find(|r| r.name() == s)
    }

    /// The rule used for a type unless the attribute names another.
    pub fn default_for(ty: AttrType) -> MergeRule {
        match ty {
            AttrType::Number | AttrType::Tally => MergeRule::Add,
            AttrType::String | AttrType::VisitorId | AttrType::Boolean => MergeRule::Latest,
            AttrType::Date => MergeRule::Max,
            AttrType::Badge | AttrType::SetOfStrings => MergeRule::Union,
            AttrType::ArrayOfStrings | AttrType::ArrayOfNumbers | AttrType::ArrayOfBooleans => MergeRule::Append,
            AttrType::Timeline => MergeRule::Interleave,
            AttrType::Funnel => MergeRule::MostAdvanced,
        }
    }

    /// The rules an attribute of type `ty` may use.
    pub fn allowed_for(ty: AttrType) -> &'static [MergeRule] {
        use MergeRule::*;
        match ty {
            AttrType::Number => &[Add, Min, Max, Latest, Earliest],
            AttrType::Date => &[Max, Min, Latest, Earliest],
            AttrType::String | AttrType::VisitorId | AttrType::Boolean => &[Latest, Earliest],
            AttrType::Badge | AttrType::SetOfStrings => &[Union, Latest, Earliest],
            AttrType::ArrayOfStrings | AttrType::ArrayOfNumbers | AttrType::ArrayOfBooleans => {
                &[Append, Latest, Earliest]
            }
            AttrType::Tally => &[Add, Max, Latest, Earliest],
            AttrType::Timeline => &[Interleave, Latest, Earliest],
            AttrType::Funnel => &[MostAdvanced, Latest, Earliest],
        }
    }
}

impl ValueSource {
    /// A reference as written in `fields` and action `params`: an attribute name (for which
    /// `known` says yes), `profile_id`, or `event.PATH`.
    pub fn reference(s: &str, known: impl Fn(&str) -> bool) -> Result<ValueSource, String> {
        if let Some(path) = s.strip_prefix("event.") {
            return parse_event_path(path)
                .map(ValueSource::Event)
                .ok_or_else(|| format!("`{s}` is not a field path like `event.order.total`"));
        }
        if s == "profile_id" || known(s) {
            Ok(ValueSource::Attribute(s.to_string()))
        } else {
            Err(format!("unknown attribute `{s}` (use an attribute name, `profile_id` or `event.FIELD`)"))
        }
    }
}

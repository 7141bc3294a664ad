//! Applying one event (or the passing of time) to one profile: visit bookkeeping,
//! enrichments, audiences, actions.
//!
//! Order for an event: end the previous visit if it timed out (visit-ended enrichments,
//! audiences, visit-ended actions), start a new visit if needed, update the preloaded
//! attributes, run built-in enrichments in file order, then Wasm enrichers in file order, then
//! re-evaluate the audiences whose inputs changed (all of them on a visit's first event), then
//! fire actions.

use crate::attribute::{AttributeDef, Preloaded, ValueSource};
use crate::condition::Operand;
use crate::enrich::{Captured, Inputs, fill, timeline};
use crate::event::Event;
use crate::model::{EnricherRef, Model, Trigger, When};
use crate::profile::{Profile, SavedAttribute};
use crate::value::{
    AttrType, MAX_CAPTURED_BYTES, MAX_SET_MEMBERS, MAX_TALLY_KEYS, Scope, Value, clamp_string, json_bytes,
};
use std::collections::{BTreeMap, BTreeSet};

/// An action to put in the outbox.
#[derive(Debug, Clone, PartialEq)]
pub struct PendingAction {
    pub action: String,
    pub connector: String,
    pub trigger: Trigger,
    pub audience: String,
    pub profile_id: String,
    pub occurred_at_ms: i64,
    pub settings: BTreeMap<String, String>,
    pub params: Vec<(String, Value)>,
}

/// What applying an event or a timer did.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Outcome {
    pub new_visitor: bool,
    pub new_visit: bool,
    /// A visit ended (by timeout) during this step.
    pub visit_ended: bool,
    /// Membership changes, in order (an audience may be left at visit end and joined again).
    pub changes: Vec<Membership>,
    pub actions: Vec<PendingAction>,
    /// Problems that did not stop the event (an event value of the wrong type, an enricher error).
    pub warnings: Vec<String>,
    /// The event's attribute updates were refused: they would have taken the profile past its
    /// size budget (`server.max_profile_kib`).
    pub over_budget: bool,
    /// Visitor ids the event carried that were not set, and why.
    pub refused_ids: Vec<IdRefusal>,
}

/// Why a visitor id an event carried was not set on its profile.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdRefusal {
    /// The event's data source does not claim the id's attribute.
    Unclaimed,
    /// The profile already holds as many values of the attribute as `max_per_profile` allows.
    MaxPerProfile,
}

impl IdRefusal {
    pub fn name(self) -> &'static str {
        match self {
            IdRefusal::Unclaimed => "unclaimed",
            IdRefusal::MaxPerProfile => "max_per_profile",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Membership {
    Joined { audience: String, at_ms: i64 },
    Left { audience: String, at_ms: i64 },
}

impl Outcome {
    pub fn joined(&self) -> Vec<&str> {
        self.changes
            .iter()
            .filter_map(|c| if let Membership::Joined { audience, .. } = c { Some(audience.as_str()) } else { None })
            .collect()
    }

    pub fn left(&self) -> Vec<&str> {
        self.changes
            .iter()
            .filter_map(|c| if let Membership::Left { audience, .. } = c { Some(audience.as_str()) } else { None })
            .collect()
    }
}

/// An attribute update requested by a custom (Wasm) enricher; `None` removes the attribute.
pub type Update = (String, Option<Value>);

/// Why a custom enricher gave no updates; applying the event goes on without them.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnricherError {
    /// The enricher could not be called (not loaded, disabled, trapped, out of time).
    #[error("{0}")]
    Call(String),
    /// The enricher ran and answered an error of its own.
    #[error("{0}")]
    Answered(String),
    /// The enricher's answer could not be read as updates.
    #[error("{0}")]
    Unreadable(String),
}

/// Why a custom enricher is called: an event, or the end of the visit at an instant (the
/// profile still holds the visit's attributes).
#[derive(Debug, Clone, Copy)]
pub enum Occasion<'a> {
    Event(&'a Event),
    VisitEnded(i64),
}

/// Runs custom enrichers; implemented by the host runtime.
pub trait CustomEnrichers {
    fn enrich(
        &mut self,
        enricher: &EnricherRef,
        occasion: Occasion<'_>,
        profile: &Profile,
    ) -> Result<Vec<Update>, EnricherError>;
}

/// For models without custom enrichers, and for tests.
pub struct NoCustomEnrichers;

impl CustomEnrichers for NoCustomEnrichers {
    fn enrich(&mut self, enricher: &EnricherRef, _: Occasion<'_>, _: &Profile) -> Result<Vec<Update>, EnricherError> {
        Err(EnricherError::Call(format!("enricher `{}` is not loaded", enricher.plugin)))
    }
}

/// Audiences to re-evaluate: those reading an attribute that changed.
struct Dirty<'m> {
    model: &'m Model,
    audiences: Vec<usize>,
}

impl<'m> Dirty<'m> {
    fn new(model: &'m Model) -> Self {
        Dirty { model, audiences: model.time_relative.clone() }
    }

    fn mark(&mut self, attribute: &str) {
        self.audiences.extend_from_slice(self.model.readers(attribute));
    }

    fn into_sorted(mut self) -> Vec<usize> {
        self.audiences.sort_unstable();
        self.audiences.dedup();
        self.audiences
    }
}

/// Applies `event` to `profile` in the order described at the top of this module.
pub fn apply_event(model: &Model, profile: &mut Profile, event: &Event, custom: &mut dyn CustomEnrichers) -> Outcome {
    let mut out = Outcome { new_visitor: profile.is_new(), ..Outcome::default() };
    let t = event.timestamp_ms;
    let timeout = visit_timeout(model, profile);
    if !out.new_visitor && !profile.visit_ended && t - profile.last_seen_ms > timeout {
        end_visit(model, profile, profile.last_seen_ms + timeout, custom, &mut out);
    }
    out.new_visit = out.new_visitor || profile.visit_ended;
    if out.new_visitor {
        profile.first_seen_ms = t;
    }
    if out.new_visit {
        start_visit(model, profile, t);
    }
    profile.event_count += 1;
    profile.visit_event_count += 1;
    profile.last_seen_ms = profile.last_seen_ms.max(t);
    profile.first_seen_ms = profile.first_seen_ms.min(t);
    let timeout = model.visit_timeout_for(event.source.as_deref());
    profile.visit_timeout_ms = (timeout != model.visit_timeout_ms).then_some(timeout);

    let mut dirty = Dirty::new(model);
    for preloaded in Preloaded::ALL.into_iter().filter(|p| p.changed_by_every_event()) {
        dirty.mark(preloaded.name());
    }
    expire_timelines(model, profile, t, &mut dirty);
    let (new_visitor, new_visit) = (out.new_visitor, out.new_visit);
    let runs = |when: &When| match when {
        When::AnyEvent => true,
        When::NewVisitor => new_visitor,
        When::NewVisit => new_visit,
        When::VisitEnded => false,
        When::Event(name) => *name == event.name,
    };
    let mut undo = Undo::default();
    run_enrichments(model, profile, Some(event), t, &runs, &mut dirty, &mut out, &mut undo);
    run_enrichers(model, profile, Occasion::Event(event), &runs, custom, &mut dirty, &mut out, &mut undo);
    undo.limit_claims(model, event, profile, &mut out);
    undo.limit_held_ids(model, profile, &mut out);
    undo.enforce(model, profile, &mut out);

    let to_evaluate = if out.new_visit { (0..model.audiences.len()).collect() } else { dirty.into_sorted() };
    let first = out.changes.len();
    evaluate(model, profile, Some(event), t, &to_evaluate, &mut out);
    let changes = out.changes[first..].to_vec();
    fire(model, profile, Some(event), t, &changes, out.new_visit, false, &mut out);
    profile.wakeup_ms = next_wakeup(model, profile, t);
    out
}

/// What the passing of time does to `profile` at instant `now`: ends a visit that timed out,
/// and re-evaluates audiences with time-relative rules. Called when `profile.wakeup_ms` is due.
pub fn apply_time(model: &Model, profile: &mut Profile, now: i64, custom: &mut dyn CustomEnrichers) -> Outcome {
    let mut out = Outcome::default();
    if profile.is_new() {
        profile.wakeup_ms = None;
        return out;
    }
    let visit_end = profile.last_seen_ms + visit_timeout(model, profile);
    if !profile.visit_ended && now > visit_end {
        end_visit(model, profile, visit_end, custom, &mut out);
    }
    let mut dirty = Dirty::new(model);
    expire_timelines(model, profile, now, &mut dirty);
    let to_evaluate = dirty.into_sorted();
    let first = out.changes.len();
    evaluate(model, profile, None, now, &to_evaluate, &mut out);
    let changes = out.changes[first..].to_vec();
    fire(model, profile, None, now, &changes, false, false, &mut out);
    profile.wakeup_ms = next_wakeup(model, profile, now);
    out
}

/// Stitches `absorbed` into `survivor` at instant `now`: attributes merge by their rules, then
/// every audience is evaluated once against the memberships either profile had. An audience
/// both were in and the merged profile still qualifies for changes nothing; one only the merged
/// profile qualifies for is one `joined`.
pub fn apply_merge(model: &Model, survivor: &mut Profile, absorbed: Profile, now: i64) -> Outcome {
    let mut out = Outcome::default();
    let before: BTreeSet<String> = survivor.audiences.union(&absorbed.audiences).cloned().collect();
    crate::stitch::merge_profiles(model, survivor, absorbed);
    survivor.audiences = before;
    reevaluate_all(model, survivor, now, &mut out);
    out
}

/// Rebuilds profile `id` from `events` (oldest first), as when a wrongly stitched id is split
/// back out. Nothing fires for the replayed history: the outcome holds only the membership
/// changes between `before` and the rebuilt profile at `now`, and their actions.
pub fn rebuild(
    model: &Model,
    id: &str,
    events: &[Event],
    before: &BTreeSet<String>,
    custom: &mut dyn CustomEnrichers,
    now: i64,
) -> (Profile, Outcome) {
    let mut profile = Profile::new(id);
    let mut out = Outcome::default();
    for event in events {
        out.warnings.extend(apply_event(model, &mut profile, event, custom).warnings);
    }
    if !profile.is_new() && now - profile.last_seen_ms > visit_timeout(model, &profile) {
        profile.visit_ended = true;
    }
    profile.audiences = before.clone();
    reevaluate_all(model, &mut profile, now, &mut out);
    (profile, out)
}

fn reevaluate_all(model: &Model, profile: &mut Profile, now: i64, out: &mut Outcome) {
    let mut dirty = Dirty::new(model);
    expire_timelines(model, profile, now, &mut dirty);
    let all: Vec<usize> = (0..model.audiences.len()).collect();
    let first = out.changes.len();
    evaluate(model, profile, None, now, &all, out);
    let changes = out.changes[first..].to_vec();
    fire(model, profile, None, now, &changes, false, false, out);
    profile.wakeup_ms = next_wakeup(model, profile, now);
}

/// Evaluates `audiences` (indexes into `model.audiences`) for `profile` at instant `now`, as a
/// backfill does after a configuration change; the outcome holds the membership changes and
/// the `joined`/`left` actions they fire.
pub fn reevaluate(model: &Model, profile: &mut Profile, audiences: &[usize], now: i64) -> Outcome {
    let mut out = Outcome::default();
    let mut dirty = Dirty::new(model);
    expire_timelines(model, profile, now, &mut dirty);
    evaluate(model, profile, None, now, audiences, &mut out);
    let changes = out.changes.clone();
    fire(model, profile, None, now, &changes, false, false, &mut out);
    profile.wakeup_ms = next_wakeup(model, profile, now);
    out
}

/// Whether `profile` meets audience rule `rule` at instant `now` (a rule not in the model, to
/// preview it).
pub fn meets(model: &Model, profile: &Profile, rule: &crate::condition::Condition, now: i64) -> bool {
    rule.eval(&|o| resolve(model, profile, None, o), now)
}

/// Whether evaluating `audiences` for `profile` at `now` would change a membership.
pub fn would_change(model: &Model, profile: &Profile, audiences: &[usize], now: i64) -> bool {
    audiences.iter().any(|&i| {
        let audience = &model.audiences[i];
        audience.rule.eval(&|o| resolve(model, profile, None, o), now) != profile.audiences.contains(&audience.name)
    })
}

/// When the engine must next look at `profile` without an event, as of instant `now`.
pub fn next_wakeup(model: &Model, profile: &Profile, now: i64) -> Option<i64> {
    if profile.is_new() {
        return None;
    }
    let visit_end = (!profile.visit_ended).then(|| profile.last_seen_ms + visit_timeout(model, profile) + 1);
    let resolve = |o: &Operand| resolve(model, profile, None, o);
    let change = model.time_relative.iter().filter_map(|&i| model.audiences[i].rule.next_change(&resolve, now)).min();
    // An audience reading a timeline may change when its oldest entry expires.
    let expiry = model
        .timelines()
        .filter(|def| !model.readers(&def.name).is_empty())
        .filter_map(|def| match profile.attributes.get(&def.name) {
            Some(Value::Timeline(entries)) => entries.first().map(|e| e.at_ms.saturating_add(def.max_age_ms) + 1),
            _ => None,
        })
        .min();
    [visit_end, change, expiry].into_iter().flatten().min()
}

/// The inactivity timeout of the profile's current visit.
fn visit_timeout(model: &Model, profile: &Profile) -> i64 {
    profile.visit_timeout_ms.unwrap_or(model.visit_timeout_ms)
}

/// Why `profile` is or is not in `audience` at instant `now`: the rule with every leaf's value.
pub fn explain(model: &Model, profile: &Profile, audience: &str, now: i64) -> Option<serde_json::Value> {
    let a = model.audience(audience)?;
    let resolve = |o: &Operand| resolve(model, profile, None, o);
    Some(serde_json::json!({
        "audience": a.name,
        "member": profile.audiences.contains(&a.name),
        "result": a.rule.eval(&resolve, now),
        "reads": a.inputs,
        "time_relative": a.time_relative,
        "rule": a.rule.explain(&resolve, now),
    }))
}

/// Ends the current visit at `at`: visit-ended enrichments, every audience re-evaluated, and
/// visit-ended actions for the audiences the visitor is in.
fn end_visit(model: &Model, profile: &mut Profile, at: i64, custom: &mut dyn CustomEnrichers, out: &mut Outcome) {
    profile.visit_ended = true;
    out.visit_ended = true;
    let mut dirty = Dirty::new(model);
    let mut undo = Undo::default();
    let runs = |w: &When| *w == When::VisitEnded;
    run_enrichments(model, profile, None, at, &runs, &mut dirty, out, &mut undo);
    run_enrichers(model, profile, Occasion::VisitEnded(at), &runs, custom, &mut dirty, out, &mut undo);
    undo.limit_held_ids(model, profile, out);
    undo.enforce(model, profile, out);
    let all: Vec<usize> = (0..model.audiences.len()).collect();
    let first = out.changes.len();
    evaluate(model, profile, None, at, &all, out);
    let changes = out.changes[first..].to_vec();
    fire(model, profile, None, at, &changes, false, true, out);
}

fn start_visit(model: &Model, profile: &mut Profile, t: i64) {
    profile.visit_count += 1;
    profile.visit_start_ms = t;
    profile.visit_event_count = 0;
    profile.visit_ended = false;
    for a in model.attributes.iter().filter(|a| a.scope == Scope::Visit) {
        profile.attributes.remove(&a.name);
        profile.badges.remove(&a.name);
        profile.rolling.remove(&a.name);
        profile.frequencies.remove(&a.name);
    }
}

/// Attributes as they were before the current event changed them, to put back when the
/// event's updates would take the profile past its size budget.
#[derive(Default)]
struct Undo(Vec<SavedAttribute>);

impl Undo {
    fn save(&mut self, profile: &Profile, name: &str) {
        if !self.0.iter().any(|s| s.name == name) {
            self.0.push(profile.save(name));
        }
    }

    /// Puts back the visitor ids the event changed that its data source does not claim.
    fn limit_claims(&mut self, model: &Model, event: &Event, profile: &mut Profile, out: &mut Outcome) {
        let mut i = 0;
        while i < self.0.len() {
            let saved = &self.0[i];
            let changed = saved.value() != profile.attributes.get(&saved.name);
            let is_id = model.attribute(&saved.name).is_some_and(|d| d.ty == AttrType::VisitorId);
            match model.unclaimed(event.source.as_deref(), &saved.name).filter(|_| changed && is_id) {
                None => i += 1,
                Some(reason) => {
                    out.warnings.push(reason);
                    out.refused_ids.push(IdRefusal::Unclaimed);
                    let saved = self.0.remove(i);
                    profile.restore(saved);
                }
            }
        }
    }

    /// Keeps each visitor-id attribute with `max_per_profile` within it: a new value past the
    /// limit is put back to what it was.
    fn limit_held_ids(&mut self, model: &Model, profile: &mut Profile, out: &mut Outcome) {
        let mut i = 0;
        while i < self.0.len() {
            let saved = &self.0[i];
            let name = saved.name.clone();
            let (Some(max), Some(Value::String(new))) =
                (model.attribute(&name).and_then(|d| d.max_per_profile), profile.attributes.get(&name))
            else {
                i += 1;
                continue;
            };
            let held = profile.held_ids.entry(name.clone()).or_default();
            if let Some(Value::String(old)) = saved.value() {
                held.insert(old.clone());
            }
            if held.contains(new) || held.len() < max {
                held.insert(new.clone());
                i += 1;
                continue;
            }
            out.warnings.push(format!(
                "visitor id `{name}`: the profile already holds {} (max_per_profile = {max}); the new one is not set",
                held.len()
            ));
            out.refused_ids.push(IdRefusal::MaxPerProfile);
            let saved = self.0.remove(i);
            profile.restore(saved);
        }
    }

    /// Puts every saved attribute back when the profile is over its budget and the changes
    /// since saving grew it (a profile over a lowered budget may still shrink), and says so.
    fn enforce(self, model: &Model, profile: &mut Profile, out: &mut Outcome) {
        let limit = model.server.max_profile_kib as usize * 1024;
        let size = profile.stored_bytes();
        if size <= limit {
            return;
        }
        let grown: isize = self.0.iter().map(|s| profile.attribute_bytes(&s.name) as isize - s.bytes as isize).sum();
        if grown <= 0 {
            return;
        }
        for saved in self.0 {
            profile.restore(saved);
        }
        out.over_budget = true;
        out.warnings.push(format!(
            "the profile would hold about {size} bytes, over its budget of {limit} (server.max_profile_kib): \
             this event's attribute updates were refused"
        ));
    }
}

#[allow(clippy::too_many_arguments)]
fn run_enrichments(
    model: &Model,
    profile: &mut Profile,
    event: Option<&Event>,
    now: i64,
    runs: &dyn Fn(&When) -> bool,
    dirty: &mut Dirty,
    out: &mut Outcome,
    undo: &mut Undo,
) {
    for e in &model.enrichments {
        if !runs(&e.when) {
            continue;
        }
        if let Some(c) = &e.condition
            && !c.eval(&|o| resolve(model, profile, event, o), now)
        {
            continue;
        }
        let def = model.attribute(&e.attribute).expect("validated at load");
        undo.save(profile, &e.attribute);
        match e.operation.apply(def, profile, &EngineInputs { model, event, now }) {
            Ok(()) => dirty.mark(&e.attribute),
            Err(w) => out.warnings.push(format!("enrichment of `{}`: {w}", e.attribute)),
        }
    }
}

/// Re-evaluates the audiences at `indexes`, recording membership changes at instant `now`.
fn evaluate(
    model: &Model,
    profile: &mut Profile,
    event: Option<&Event>,
    now: i64,
    indexes: &[usize],
    out: &mut Outcome,
) {
    for &i in indexes {
        let audience = &model.audiences[i];
        let now_in = audience.rule.eval(&|o| resolve(model, profile, event, o), now);
        let was_in = profile.audiences.contains(&audience.name);
        if now_in && !was_in {
            profile.audiences.insert(audience.name.clone());
            out.changes.push(Membership::Joined { audience: audience.name.clone(), at_ms: now });
        } else if was_in && !now_in {
            profile.audiences.remove(&audience.name);
            out.changes.push(Membership::Left { audience: audience.name.clone(), at_ms: now });
        }
    }
}

/// Queues the actions that `changes` (and a visit starting or ending, or the event itself) fire.
#[allow(clippy::too_many_arguments)]
fn fire(
    model: &Model,
    profile: &Profile,
    event: Option<&Event>,
    at: i64,
    changes: &[Membership],
    visit_started: bool,
    visit_ended: bool,
    out: &mut Outcome,
) {
    let resolve = |o: &Operand| resolve(model, profile, event, o);
    for action in &model.actions {
        let fired = match action.trigger {
            Trigger::Joined => {
                changes.iter().any(|c| matches!(c, Membership::Joined { audience, .. } if *audience == action.audience))
            }
            Trigger::Left => {
                changes.iter().any(|c| matches!(c, Membership::Left { audience, .. } if *audience == action.audience))
            }
            Trigger::VisitStarted => visit_started && profile.audiences.contains(&action.audience),
            Trigger::VisitEnded => visit_ended && profile.audiences.contains(&action.audience),
            Trigger::Deleted => false,
            Trigger::Event => event.is_some_and(|e| {
                action.event.as_ref().is_none_or(|name| *name == e.name)
                    && action.condition.as_ref().is_none_or(|c| c.eval(&resolve, at))
            }),
        };
        if !fired {
            continue;
        }
        let params = action
            .params
            .iter()
            .filter_map(|(k, src)| source_value(model, profile, event, at, src).map(|v| (k.clone(), v)))
            .collect();
        out.actions.push(PendingAction {
            action: action.name.clone(),
            connector: action.connector.clone(),
            trigger: action.trigger,
            audience: action.audience.clone(),
            profile_id: profile.id.clone(),
            occurred_at_ms: at,
            settings: action.settings.clone(),
            params,
        });
    }
}

/// The actions that deleting `profile` fires: every `deleted` action without an audience, and
/// those whose audience the profile was in. Parameters are read before the profile goes.
pub fn apply_delete(model: &Model, profile: &Profile, now: i64) -> Outcome {
    let mut out = Outcome::default();
    for action in model.actions.iter().filter(|a| a.trigger == Trigger::Deleted) {
        if !action.audience.is_empty() && !profile.audiences.contains(&action.audience) {
            continue;
        }
        let params = action
            .params
            .iter()
            .filter_map(|(k, src)| source_value(model, profile, None, now, src).map(|v| (k.clone(), v)))
            .collect();
        out.actions.push(PendingAction {
            action: action.name.clone(),
            connector: action.connector.clone(),
            trigger: Trigger::Deleted,
            audience: action.audience.clone(),
            profile_id: profile.id.clone(),
            occurred_at_ms: now,
            settings: action.settings.clone(),
            params,
        });
    }
    out
}

/// The current value of what a condition reads.
fn resolve(model: &Model, profile: &Profile, event: Option<&Event>, operand: &Operand) -> Option<Value> {
    match operand {
        Operand::Attribute(name) => attribute_value(model, profile, event, name),
        Operand::Derived(name, property) => property.of(&attribute_value(model, profile, event, name)?),
        Operand::TallyKey(name, key) => match profile.attributes.get(name) {
            Some(Value::Tally(t)) => t.get(key).map(|n| Value::Number(*n)),
            _ => None,
        },
        Operand::Event(path) => event?.field(path).and_then(json_to_value),
    }
}

/// A stored attribute, or an event attribute read from the current event.
fn attribute_value(model: &Model, profile: &Profile, event: Option<&Event>, name: &str) -> Option<Value> {
    match model.attribute(name) {
        Some(AttributeDef { scope: Scope::Event, field: Some(path), ty, .. }) => ty.read_json(event?.field(path)?).ok(),
        _ => profile.get(name),
    }
}

fn source_value(model: &Model, profile: &Profile, event: Option<&Event>, now: i64, src: &ValueSource) -> Option<Value> {
    match src {
        ValueSource::Const(v) => Some(v.clone()),
        ValueSource::Now => Some(Value::Date(now)),
        ValueSource::Event(path) => event?.field(path).and_then(json_to_value),
        ValueSource::Attribute(name) if name == "profile_id" => Some(Value::String(profile.id.clone())),
        ValueSource::Attribute(name) => attribute_value(model, profile, event, name),
    }
}

/// Converts an event value without a declared type (for conditions on `event.` fields and params).
fn json_to_value(v: &serde_json::Value) -> Option<Value> {
    match v {
        serde_json::Value::String(s) => Some(Value::String(s.clone())),
        serde_json::Value::Number(n) => n.as_f64().map(Value::Number),
        serde_json::Value::Bool(b) => Some(Value::Boolean(*b)),
        serde_json::Value::Array(items) => {
            if let Some(strings) = items.iter().map(|i| i.as_str().map(str::to_string)).collect::<Option<Vec<_>>>() {
                Some(Value::Strings(strings))
            } else {
                items.iter().map(serde_json::Value::as_f64).collect::<Option<Vec<_>>>().map(Value::Numbers)
            }
        }
        _ => None,
    }
}

/// The operand of an operation, read as `ty`. `Ok(None)` when the event or profile lacks it.
fn operand(
    model: &Model,
    profile: &Profile,
    event: Option<&Event>,
    now: i64,
    src: &ValueSource,
    ty: AttrType,
) -> Result<Option<Value>, String> {
    match src {
        ValueSource::Const(v) => Ok(Some(v.clone())),
        ValueSource::Now => Ok(Some(Value::Date(now))),
        ValueSource::Event(path) => match event.and_then(|e| e.field(path)) {
            None | Some(serde_json::Value::Null) => Ok(None),
            Some(v) => ty.read_json(v).map(Some).map_err(|e| format!("event field `{}`: {e}", path.join("."))),
        },
        ValueSource::Attribute(name) => Ok(attribute_value(model, profile, event, name)),
    }
}

/// What enrichment operations read: the event, the clock and the other attributes.
struct EngineInputs<'a> {
    model: &'a Model,
    event: Option<&'a Event>,
    now: i64,
}

impl Inputs for EngineInputs<'_> {
    fn read(&self, source: &ValueSource, ty: AttrType, profile: &Profile) -> Result<Option<Value>, String> {
        operand(self.model, profile, self.event, self.now, source, ty)
    }

    fn capture(&self, profile: &Profile, fields: &[(String, ValueSource)]) -> Captured {
        capture(self.model, profile, self.event, self.now, fields)
    }

    fn now(&self) -> i64 {
        self.now
    }
}

/// Values captured into a timeline entry or funnel step: strings cut to `MAX_STRING_CHARS`,
/// values still over `MAX_CAPTURED_BYTES` (objects and arrays copied from the event) left out.
fn capture(
    model: &Model,
    profile: &Profile,
    event: Option<&Event>,
    now: i64,
    fields: &[(String, ValueSource)],
) -> Captured {
    let mut data = BTreeMap::new();
    let mut too_large = Vec::new();
    for (k, src) in fields {
        let value = match src {
            ValueSource::Event(path) => event.and_then(|e| e.field(path)).cloned(),
            other => source_value(model, profile, event, now, other).map(|v| v.to_json()),
        };
        let value = match value {
            Some(serde_json::Value::String(s)) => serde_json::Value::String(clamp_string(s)),
            Some(v) => v,
            None => continue,
        };
        let bytes = json_bytes(&value);
        if bytes > MAX_CAPTURED_BYTES {
            too_large.push(format!("`{k}` ({bytes} bytes)"));
        } else {
            data.insert(k.clone(), value);
        }
    }
    let left_out = (!too_large.is_empty())
        .then(|| format!("captured values over {MAX_CAPTURED_BYTES} bytes left out: {}", too_large.join(", ")));
    Captured { data, left_out }
}

/// Drops expired timeline entries, marking the audiences that read a timeline that changed.
fn expire_timelines(model: &Model, profile: &mut Profile, now: i64, dirty: &mut Dirty) {
    for def in model.timelines() {
        if let Some(Value::Timeline(entries)) = profile.attributes.get_mut(&def.name) {
            let before = entries.len();
            timeline::trim(def, entries, now);
            if entries.len() != before {
                dirty.mark(&def.name);
            }
        }
    }
}

/// Whether every update sets an attribute the enricher may write.
/// Runs the custom enrichers whose `when` matches, in file order.
#[allow(clippy::too_many_arguments)]
fn run_enrichers(
    model: &Model,
    profile: &mut Profile,
    occasion: Occasion<'_>,
    runs: &dyn Fn(&When) -> bool,
    custom: &mut dyn CustomEnrichers,
    dirty: &mut Dirty<'_>,
    out: &mut Outcome,
    undo: &mut Undo,
) {
    for enricher in model.enrichers.iter().filter(|e| e.when.iter().any(runs)) {
        match custom.enrich(enricher, occasion, profile) {
            Ok(updates) => {
                for (name, _) in &updates {
                    undo.save(profile, name);
                }
                match granted(model, enricher, &updates).and_then(|()| apply_updates(model, profile, updates)) {
                    Ok(names) => names.iter().for_each(|n| dirty.mark(n)),
                    Err(w) => out.warnings.push(format!("enricher `{}`: {w}; nothing applied", enricher.plugin)),
                }
            }
            Err(e) => out.warnings.push(format!("enricher `{}` failed: {e}", enricher.plugin)),
        }
    }
}

fn granted(model: &Model, enricher: &EnricherRef, updates: &[Update]) -> Result<(), String> {
    for (name, _) in updates {
        if let Some(def) = model.attribute(name)
            && !enricher.may_write(name, def.ty)
        {
            return Err(match &enricher.writes {
                Some(_) => format!("attribute `{name}` is not in the enricher's `writes`"),
                None => format!("visitor id `{name}` may be set only when the enricher's `writes` names it"),
            });
        }
    }
    Ok(())
}

/// Applies a custom enricher's updates all or nothing: each must name a declared, stored
/// attribute and carry a value of its type. Returns the names of the attributes changed.
fn apply_updates(model: &Model, profile: &mut Profile, updates: Vec<Update>) -> Result<Vec<String>, String> {
    for (name, value) in &updates {
        let Some(def) = model.attribute(name) else {
            return Err(format!("unknown attribute `{name}`"));
        };
        if def.scope == Scope::Event {
            return Err(format!("event attribute `{name}` is read from the event, not set"));
        }
        if let Some(v) = value
            && !def.ty.admits(v)
        {
            return Err(format!("attribute `{name}` is {}, update is {}", def.ty.name(), v.kind()));
        }
        let limit = match value {
            Some(Value::Set(_)) => MAX_SET_MEMBERS,
            Some(Value::Tally(_)) => MAX_TALLY_KEYS,
            _ => usize::MAX,
        };
        if value.as_ref().and_then(Value::size).is_some_and(|n| n > limit) {
            return Err(format!("attribute `{name}` may hold at most {limit} members or keys"));
        }
    }
    let mut changed = Vec::with_capacity(updates.len());
    for (name, value) in updates {
        let def = model.attribute(&name).expect("checked above");
        match (def.ty, value) {
            (AttrType::Badge, Some(_)) => {
                profile.badges.insert(name.clone());
            }
            (AttrType::Badge, None) => {
                profile.badges.remove(&name);
            }
            (_, None) => {
                profile.attributes.remove(&name);
            }
            (_, Some(Value::String(s))) => {
                profile.attributes.insert(name.clone(), Value::String(clamp_string(s)));
            }
            (AttrType::Timeline, Some(Value::Timeline(mut entries))) => {
                entries.sort_by_key(|e| e.at_ms);
                let newest = entries.last().map_or(0, |e| e.at_ms);
                timeline::trim(def, &mut entries, newest);
                profile.attributes.insert(name.clone(), Value::Timeline(entries));
            }
            (_, Some(mut v)) => {
                if def.ty.element().is_some() {
                    let items: Vec<Value> = match &v {
                        Value::Set(s) => s.iter().cloned().map(Value::String).collect(),
                        Value::Strings(s) => s.iter().cloned().map(Value::String).collect(),
                        Value::Numbers(n) => n.iter().copied().map(Value::Number).collect(),
                        Value::Booleans(b) => b.iter().copied().map(Value::Boolean).collect(),
                        _ => Vec::new(),
                    };
                    fill(def, &mut v, items, true)?;
                }
                profile.attributes.insert(name.clone(), v);
            }
        }
        changed.push(name);
    }
    Ok(changed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse;

    const MODEL: &str = r#"
[[attribute]]
name = "spend"
scope = "visitor"
type = "number"
[[attribute]]
name = "email"
scope = "visitor"
type = "string"
[[attribute]]
name = "categories"
scope = "visitor"
type = "set_of_strings"
[[attribute]]
name = "vip"
scope = "visitor"
type = "badge"
[[attribute]]
name = "last_purchase"
scope = "visitor"
type = "date"
[[attribute]]
name = "pages"
scope = "visit"
type = "number"

[[enrichment]]
attribute = "spend"
op = "increment"
event = "total"
when = "event:purchase"
[[enrichment]]
attribute = "email"
op = "set"
event = "email"
[[enrichment]]
attribute = "categories"
op = "add"
event = "category"
[[enrichment]]
attribute = "last_purchase"
op = "set"
value = "now"
when = "event:purchase"
[[enrichment]]
attribute = "pages"
op = "increment"
when = "event:page_view"
[[enrichment]]
attribute = "vip"
op = "assign"
if = { attribute = "spend", op = ">=", value = 100 }

[[audience]]
name = "vips"
rule = { all = [{ attribute = "vip", op = "is_assigned" }, { attribute = "email", op = "is_assigned" }] }

[[action]]
name = "welcome"
audience = "vips"
trigger = "joined"
connector = "webhook"
settings = { url = "http://example.com" }
params = { email = "email", spend = "spend", order = "event.order_id" }

[[action]]
name = "goodbye"
audience = "vips"
trigger = "left"
connector = "webhook"
"#;

    fn event(name: &str, t: i64, data: serde_json::Value) -> Event {
        Event {
            id: None,
            name: name.into(),
            visitor_id: "v1".into(),
            source: None,
            timestamp_ms: t,
            data: data.as_object().cloned().unwrap_or_default(),
        }
    }

    #[test]
    fn a_visitor_qualifies_and_an_action_fires_once() {
        let model = parse(MODEL).unwrap();
        let mut p = Profile::new("v1");
        let o = apply_event(
            &model,
            &mut p,
            &event("page_view", 1_000, serde_json::json!({"category": "shoes"})),
            &mut NoCustomEnrichers,
        );
        assert!(o.new_visitor && o.new_visit && o.joined().is_empty());
        let o = apply_event(
            &model,
            &mut p,
            &event("purchase", 2_000, serde_json::json!({"total": 60, "email": "a@b.c"})),
            &mut NoCustomEnrichers,
        );
        assert!(o.joined().is_empty());
        let o = apply_event(
            &model,
            &mut p,
            &event("purchase", 3_000, serde_json::json!({"total": "45.5", "order_id": "o-9"})),
            &mut NoCustomEnrichers,
        );
        assert_eq!(o.joined(), vec!["vips"]);
        assert_eq!(o.actions.len(), 1);
        let a = &o.actions[0];
        assert_eq!(a.action, "welcome");
        assert_eq!(
            a.params,
            vec![
                ("email".into(), Value::String("a@b.c".into())),
                ("order".into(), Value::String("o-9".into())),
                ("spend".into(), Value::Number(105.5)),
            ]
        );
        assert_eq!(p.get("spend"), Some(Value::Number(105.5)));
        assert_eq!(p.get("last_purchase"), Some(Value::Date(3_000)));
        assert_eq!(p.event_count, 3);
        assert!(p.badges.contains("vip"));
        let o = apply_event(&model, &mut p, &event("page_view", 4_000, serde_json::json!({})), &mut NoCustomEnrichers);
        assert!(o.joined().is_empty() && o.actions.is_empty(), "no second join");
    }

    #[test]
    fn visit_scope_resets_after_inactivity() {
        let model = parse(MODEL).unwrap();
        let mut p = Profile::new("v1");
        for t in [0, 1_000, 2_000] {
            apply_event(&model, &mut p, &event("page_view", t, serde_json::json!({})), &mut NoCustomEnrichers);
        }
        assert_eq!(p.get("pages"), Some(Value::Number(3.0)));
        let later = 2_000 + model.visit_timeout_ms + 1;
        let o = apply_event(&model, &mut p, &event("page_view", later, serde_json::json!({})), &mut NoCustomEnrichers);
        assert!(o.new_visit && !o.new_visitor);
        assert_eq!(p.get("pages"), Some(Value::Number(1.0)));
        assert_eq!(p.visit_count, 2);
        assert_eq!(p.visit_event_count, 1);
    }

    #[test]
    fn wrong_event_types_warn_and_change_nothing() {
        let model = parse(MODEL).unwrap();
        let mut p = Profile::new("v1");
        let o = apply_event(
            &model,
            &mut p,
            &event("purchase", 0, serde_json::json!({"total": "lots"})),
            &mut NoCustomEnrichers,
        );
        assert_eq!(o.warnings.len(), 1, "{:?}", o.warnings);
        assert!(o.warnings[0].contains("event field `total`"));
        assert_eq!(p.get("spend"), None);
    }

    #[derive(Clone)]
    struct Fixed(Vec<Update>);
    impl CustomEnrichers for Fixed {
        fn enrich(&mut self, _: &EnricherRef, _: Occasion<'_>, _: &Profile) -> Result<Vec<Update>, EnricherError> {
            Ok(self.0.clone())
        }
    }

    #[test]
    fn custom_updates_are_type_checked_all_or_nothing() {
        let src = format!("{MODEL}\n[[enricher]]\nplugin = \"tier\"\n");
        let model = parse(&src).unwrap();
        let mut p = Profile::new("v1");
        let mut bad = Fixed(vec![
            ("email".into(), Some(Value::String("x@y.z".into()))),
            ("spend".into(), Some(Value::String("many".into()))),
        ]);
        let o = apply_event(&model, &mut p, &event("x", 0, serde_json::json!({})), &mut bad);
        assert!(
            o.warnings[0].contains("attribute `spend` is number, update is string; nothing applied"),
            "{:?}",
            o.warnings
        );
        assert_eq!(p.get("email"), None);
        let mut good = Fixed(vec![("email".into(), Some(Value::String("x@y.z".into())))]);
        apply_event(&model, &mut p, &event("x", 1, serde_json::json!({})), &mut good);
        assert_eq!(p.get("email"), Some(Value::String("x@y.z".into())));
    }

    #[test]
    fn an_enricher_sets_only_what_it_may_write_and_visitor_ids_only_by_name() {
        let ids =
            format!("{MODEL}\n[[attribute]]\nname = \"email_hash\"\nscope = \"visitor\"\ntype = \"visitor_id\"\n");
        let stitching = Fixed(vec![("email_hash".into(), Some(Value::String("victim".into())))]);
        let apply = |config: &str, enricher: &mut Fixed| {
            let model = parse(config).unwrap();
            let mut p = Profile::new("v1");
            let o = apply_event(&model, &mut p, &event("x", 0, serde_json::json!({})), enricher);
            (p, o.warnings)
        };
        let (p, warnings) = apply(&format!("{ids}\n[[enricher]]\nplugin = \"tier\"\n"), &mut stitching.clone());
        assert_eq!(p.get("email_hash"), None, "no `writes`: a visitor id is not the enricher's to set");
        assert!(warnings[0].contains("visitor id `email_hash` may be set only when the enricher's `writes` names it"));
        let granted = format!("{ids}\n[[enricher]]\nplugin = \"tier\"\nwrites = [\"email_hash\"]\n");
        let (p, warnings) = apply(&granted, &mut stitching.clone());
        assert_eq!(p.get("email_hash"), Some(Value::String("victim".into())), "{warnings:?}");
        let (p, warnings) = apply(&granted, &mut Fixed(vec![("spend".into(), Some(Value::Number(5.0)))]));
        assert_eq!(p.get("spend"), None);
        assert!(
            warnings[0].contains("attribute `spend` is not in the enricher's `writes`; nothing applied"),
            "{warnings:?}"
        );
        let unknown = granted.replace("writes = [\"email_hash\"]", "writes = [\"emial_hash\"]");
        let errors = parse(&unknown).unwrap_err();
        assert!(
            errors
                .0
                .iter()
                .any(|e| e.message.contains("enricher writes `emial_hash`, which is not a declared attribute"))
        );
    }

    #[test]
    fn updates_past_the_profile_budget_are_refused_and_the_rest_of_the_event_applies() {
        let model = parse(&format!("[server]\nmax_profile_kib = 4\n{MODEL}")).unwrap();
        let mut p = Profile::new("v1");
        let long = |i: usize| format!("{i:04}{}", "x".repeat(996));
        for i in 0..3 {
            let o = apply_event(
                &model,
                &mut p,
                &event("view", i, serde_json::json!({ "category": long(i as usize) })),
                &mut NoCustomEnrichers,
            );
            assert!(!o.over_budget, "{:?}", o.warnings);
        }
        let before = p.get("categories");
        let o = apply_event(
            &model,
            &mut p,
            &event("view", 10, serde_json::json!({ "category": long(3), "email": "a@b.c" })),
            &mut NoCustomEnrichers,
        );
        assert!(o.over_budget);
        assert!(
            o.warnings.iter().any(|w| w.contains("over its budget of 4096 (server.max_profile_kib)")),
            "{:?}",
            o.warnings
        );
        assert_eq!(p.get("categories"), before, "the member that would pass the budget is refused");
        assert_eq!(p.get("email"), None, "the event's updates are refused together");
        assert_eq!(p.event_count, 4, "counters still move");
        assert_eq!(p.last_seen_ms, 10);
        assert!(p.stored_bytes() <= 4096);

        // A profile over a lowered budget may still shrink or keep its size.
        let lowered = format!(
            "[server]\nmax_profile_kib = 1\n{MODEL}\n[[enricher]]\nplugin = \"trim\"\nwrites = [\"categories\"]\n"
        );
        let lowered = parse(&lowered).unwrap();
        let mut custom = Fixed(vec![("categories".into(), None)]);
        let o = apply_event(&lowered, &mut p, &event("view", 11, serde_json::json!({})), &mut custom);
        assert!(!o.over_budget, "{:?}", o.warnings);
        assert_eq!(p.get("categories"), None);
    }

    #[test]
    fn captures_cut_strings_and_leave_out_large_values() {
        let config = "[[attribute]]\nname = \"orders\"\nscope = \"visitor\"\ntype = \"timeline\"\n\
            [[enrichment]]\nattribute = \"orders\"\nop = \"capture\"\n\
            fields = { note = \"event.note\", cart = \"event.cart\", total = \"event.total\" }\n";
        let model = parse(config).unwrap();
        let mut p = Profile::new("v1");
        let cart: Vec<String> = (0..500).map(|i| format!("item-{i}")).collect();
        let data = serde_json::json!({ "note": "n".repeat(5_000), "cart": cart, "total": 12 });
        let o = apply_event(&model, &mut p, &event("order", 0, data), &mut NoCustomEnrichers);
        let Some(Value::Timeline(entries)) = p.get("orders") else { panic!("no timeline") };
        let entry = &entries[0].data;
        assert_eq!(entry["note"].as_str().unwrap().len(), crate::value::MAX_STRING_CHARS);
        assert_eq!(entry["total"], serde_json::json!(12));
        assert!(!entry.contains_key("cart"));
        assert!(
            o.warnings.iter().any(|w| w.contains("captured values over 4096 bytes left out: `cart`")),
            "{:?}",
            o.warnings
        );
    }

    const IDS: &str = r#"
[[source]]
name = "web"
api_key = "web-key-0123456789"
claims = []

[[source]]
name = "login"
api_key = "login-key-0123456789"
claims = ["email_hash"]

[[attribute]]
name = "email_hash"
scope = "visitor"
type = "visitor_id"
max_per_profile = 1

[[attribute]]
name = "crm_id"
scope = "visitor"
type = "visitor_id"

[[enrichment]]
attribute = "email_hash"
op = "set"
event = "email_hash"

[[enrichment]]
attribute = "crm_id"
op = "set"
event = "crm_id"
"#;

    fn from(source: &str, t: i64, data: serde_json::Value) -> Event {
        Event { source: Some(source.into()), ..event("login", t, data) }
    }

    #[test]
    fn a_source_sets_only_the_visitor_ids_it_claims() {
        let model = parse(IDS).unwrap();
        let mut p = Profile::new("v1");
        let o = apply_event(
            &model,
            &mut p,
            &from("web", 0, serde_json::json!({"email_hash": "h1"})),
            &mut NoCustomEnrichers,
        );
        assert_eq!(p.get("email_hash"), None);
        assert_eq!(o.refused_ids, [IdRefusal::Unclaimed]);
        assert!(o.warnings[0].contains("visitor id `email_hash` is not among the claims of source `web` (none)"));
        let o = apply_event(
            &model,
            &mut p,
            &from("login", 1, serde_json::json!({"email_hash": "h1", "crm_id": "c1"})),
            &mut NoCustomEnrichers,
        );
        assert_eq!(p.get("email_hash"), Some(Value::String("h1".into())));
        assert_eq!(p.get("crm_id"), None, "login claims only email_hash");
        assert_eq!(o.refused_ids, [IdRefusal::Unclaimed]);
        // Events of no declared source (imports, open ingestion) are not limited.
        apply_event(&model, &mut p, &event("x", 2, serde_json::json!({"crm_id": "c1"})), &mut NoCustomEnrichers);
        assert_eq!(p.get("crm_id"), Some(Value::String("c1".into())));

        let errors = parse(&IDS.replace("claims = []", "claims = [\"crm\"]")).unwrap_err();
        assert!(errors.0[0].message.contains("source `web` claims `crm`, which is not a declared attribute"));
    }

    #[test]
    fn a_profile_holds_at_most_max_per_profile_values_of_an_id() {
        let model = parse(IDS).unwrap();
        let mut p = Profile::new("v1");
        let login = |t, hash: &str| from("login", t, serde_json::json!({ "email_hash": hash }));
        apply_event(&model, &mut p, &login(0, "h1"), &mut NoCustomEnrichers);
        let o = apply_event(&model, &mut p, &login(1, "h1"), &mut NoCustomEnrichers);
        assert!(o.refused_ids.is_empty(), "the same id again is fine");
        let o = apply_event(&model, &mut p, &login(2, "h2"), &mut NoCustomEnrichers);
        assert_eq!(o.refused_ids, [IdRefusal::MaxPerProfile]);
        assert!(o.warnings[0].contains("the profile already holds 1 (max_per_profile = 1)"), "{:?}", o.warnings);
        assert_eq!(p.get("email_hash"), Some(Value::String("h1".into())));

        // Two profiles holding different hashes may not be stitched; one without a hash may.
        let mut other = Profile::new("v2");
        apply_event(&model, &mut other, &login(3, "h2"), &mut NoCustomEnrichers);
        let conflict = crate::stitch::held_ids_conflict(&model, &p, &other).unwrap();
        assert!(conflict.contains("hold 2 different `email_hash` ids (max_per_profile = 1)"), "{conflict}");
        let mut anonymous = Profile::new("v3");
        apply_event(&model, &mut anonymous, &event("view", 4, serde_json::json!({})), &mut NoCustomEnrichers);
        assert_eq!(crate::stitch::held_ids_conflict(&model, &p, &anonymous), None);
        // A merged profile remembers what both held.
        let mut survivor = anonymous.clone();
        apply_merge(&model, &mut survivor, p.clone(), 5);
        assert!(crate::stitch::held_ids_conflict(&model, &survivor, &other).is_some());
    }
}

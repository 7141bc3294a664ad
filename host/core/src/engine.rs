//! Applying one event to one profile: visit bookkeeping, enrichments, audiences, actions.

use crate::condition::Operand;
use crate::config::{Model, Operation, Source, Trigger, When};
use crate::profile::Profile;
use crate::value::{AttrType, MAX_SET_MEMBERS, Scope, Value, clamp_string};
use std::collections::BTreeMap;

/// A validated incoming event.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub id: Option<String>,
    pub name: String,
    pub visitor_id: String,
    pub timestamp_ms: i64,
    /// The event's `data` object.
    pub data: serde_json::Map<String, serde_json::Value>,
}

impl Event {
    /// The value at a dotted path inside `data`.
    pub fn field(&self, path: &[String]) -> Option<&serde_json::Value> {
        let (first, rest) = path.split_first()?;
        rest.iter().try_fold(self.data.get(first)?, |v, key| v.get(key))
    }
}

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

/// What applying an event did.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Outcome {
    pub new_visitor: bool,
    pub new_visit: bool,
    pub joined: Vec<String>,
    pub left: Vec<String>,
    pub actions: Vec<PendingAction>,
    /// Problems that did not stop the event (an event value of the wrong type, an enricher error).
    pub warnings: Vec<String>,
}

/// An attribute update requested by a custom (Wasm) enricher; `None` removes the attribute.
pub type Update = (String, Option<Value>);

/// Runs custom enrichers; implemented by the host runtime.
pub trait CustomEnrichers {
    fn enrich(&mut self, plugin: &str, event: &Event, profile: &Profile) -> Result<Vec<Update>, String>;
}

/// For models without custom enrichers, and for tests.
pub struct NoCustomEnrichers;

impl CustomEnrichers for NoCustomEnrichers {
    fn enrich(&mut self, plugin: &str, _: &Event, _: &Profile) -> Result<Vec<Update>, String> {
        Err(format!("enricher `{plugin}` is not loaded"))
    }
}

/// Applies `event` to `profile` in the documented order: visit bookkeeping, built-in
/// enrichments in file order, custom enrichers in file order, then audience evaluation.
pub fn apply_event(model: &Model, profile: &mut Profile, event: &Event, custom: &mut dyn CustomEnrichers) -> Outcome {
    let mut out = Outcome { new_visitor: profile.is_new(), ..Outcome::default() };
    let t = event.timestamp_ms;
    out.new_visit = out.new_visitor || t - profile.last_seen_ms > model.visit_timeout_ms;
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

    for e in &model.enrichments {
        let runs = match &e.when {
            When::AnyEvent => true,
            When::NewVisitor => out.new_visitor,
            When::NewVisit => out.new_visit,
            When::Event(name) => *name == event.name,
        };
        if !runs {
            continue;
        }
        if let Some(c) = &e.condition
            && !c.eval(&|o| resolve(profile, event, o))
        {
            continue;
        }
        if let Err(w) = apply_operation(model, profile, event, &e.attribute, &e.operation) {
            out.warnings.push(format!("enrichment of `{}`: {w}", e.attribute));
        }
    }

    for enricher in &model.enrichers {
        match custom.enrich(&enricher.plugin, event, profile) {
            Ok(updates) => {
                if let Err(w) = apply_updates(model, profile, updates) {
                    out.warnings.push(format!("enricher `{}`: {w}; nothing applied", enricher.plugin));
                }
            }
            Err(e) => out.warnings.push(format!("enricher `{}` failed: {e}", enricher.plugin)),
        }
    }

    for audience in &model.audiences {
        let now_in = audience.rule.eval(&|o| resolve(profile, event, o));
        let was_in = profile.audiences.contains(&audience.name);
        if now_in && !was_in {
            profile.audiences.insert(audience.name.clone());
            out.joined.push(audience.name.clone());
        } else if was_in && !now_in {
            profile.audiences.remove(&audience.name);
            out.left.push(audience.name.clone());
        }
    }

    for action in &model.actions {
        let fired = match action.trigger {
            Trigger::Joined => out.joined.contains(&action.audience),
            Trigger::Left => out.left.contains(&action.audience),
        };
        if fired {
            let params = action
                .params
                .iter()
                .filter_map(|(k, src)| source_value(profile, event, src).map(|v| (k.clone(), v)))
                .collect();
            out.actions.push(PendingAction {
                action: action.name.clone(),
                connector: action.connector.clone(),
                trigger: action.trigger,
                audience: action.audience.clone(),
                profile_id: profile.id.clone(),
                occurred_at_ms: t,
                settings: action.settings.clone(),
                params,
            });
        }
    }
    out
}

fn start_visit(model: &Model, profile: &mut Profile, t: i64) {
    profile.visit_count += 1;
    profile.visit_start_ms = t;
    profile.visit_event_count = 0;
    for a in model.attributes.iter().filter(|a| a.scope == Scope::Visit) {
        profile.attributes.remove(&a.name);
        profile.badges.remove(&a.name);
    }
}

fn resolve(profile: &Profile, event: &Event, operand: &Operand) -> Option<Value> {
    match operand {
        Operand::Attribute(name) => profile.get(name),
        Operand::Event(path) => event.field(path).and_then(json_to_value),
    }
}

fn source_value(profile: &Profile, event: &Event, src: &Source) -> Option<Value> {
    match src {
        Source::Const(v) => Some(v.clone()),
        Source::Now => Some(Value::Date(event.timestamp_ms)),
        Source::Event(path) => event.field(path).and_then(json_to_value),
        Source::Attribute(name) if name == "profile_id" => Some(Value::String(profile.id.clone())),
        Source::Attribute(name) => profile.get(name),
    }
}

/// Converts an event value without a declared type (for conditions on `event.` fields and params).
fn json_to_value(v: &serde_json::Value) -> Option<Value> {
    match v {
        serde_json::Value::String(s) => Some(Value::String(s.clone())),
        serde_json::Value::Number(n) => n.as_f64().map(Value::Number),
        serde_json::Value::Bool(b) => Some(Value::Boolean(*b)),
        serde_json::Value::Array(items) => {
            items.iter().map(|i| i.as_str().map(str::to_string)).collect::<Option<_>>().map(Value::Set)
        }
        _ => None,
    }
}

/// Reads an event value as the given type; numeric strings count as numbers, dates are
/// RFC 3339 strings or epoch milliseconds.
fn typed(v: &serde_json::Value, ty: AttrType) -> Result<Value, String> {
    let found = || format!("expected {}, found {}", ty.name(), json_kind(v));
    match ty {
        AttrType::Number => match v {
            serde_json::Value::Number(n) => n.as_f64().map(Value::Number).ok_or_else(found),
            serde_json::Value::String(s) => s.trim().parse().map(Value::Number).map_err(|_| found()),
            _ => Err(found()),
        },
        AttrType::String => match v {
            serde_json::Value::String(s) => Ok(Value::String(clamp_string(s.clone()))),
            serde_json::Value::Number(n) => Ok(Value::String(n.to_string())),
            serde_json::Value::Bool(b) => Ok(Value::String(b.to_string())),
            _ => Err(found()),
        },
        AttrType::Boolean | AttrType::Badge => v.as_bool().map(Value::Boolean).ok_or_else(found),
        AttrType::Date => match v {
            serde_json::Value::String(s) => crate::time::parse_rfc3339(s).map(Value::Date).ok_or_else(found),
            serde_json::Value::Number(n) => n.as_i64().map(Value::Date).ok_or_else(found),
            _ => Err(found()),
        },
        AttrType::SetOfStrings => match v {
            serde_json::Value::Array(items) => items
                .iter()
                .map(|i| i.as_str().map(str::to_string))
                .collect::<Option<_>>()
                .map(Value::Set)
                .ok_or_else(found),
            _ => Err(found()),
        },
    }
}

fn json_kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "boolean",
        serde_json::Value::Number(_) => "number",
        serde_json::Value::String(_) => "string",
        serde_json::Value::Array(_) => "array",
        serde_json::Value::Object(_) => "object",
    }
}

/// The operand of an operation, read as `ty`. `Ok(None)` when the event lacks the field.
fn operand(event: &Event, src: &Source, ty: AttrType) -> Result<Option<Value>, String> {
    match src {
        Source::Const(v) => Ok(Some(v.clone())),
        Source::Now => Ok(Some(Value::Date(event.timestamp_ms))),
        Source::Event(path) => match event.field(path) {
            None | Some(serde_json::Value::Null) => Ok(None),
            Some(v) => typed(v, ty).map(Some).map_err(|e| format!("event field `{}`: {e}", path.join("."))),
        },
        Source::Attribute(_) => unreachable!("attribute sources are only used by action params"),
    }
}

fn apply_operation(
    model: &Model,
    profile: &mut Profile,
    event: &Event,
    name: &str,
    op: &Operation,
) -> Result<(), String> {
    let ty = model.attribute_type(name).expect("validated at load");
    match op {
        Operation::Increment(src) | Operation::Decrement(src) => {
            let Some(Value::Number(by)) = operand(event, src, AttrType::Number)? else { return Ok(()) };
            let by = if matches!(op, Operation::Decrement(_)) { -by } else { by };
            let current = match profile.attributes.get(name) {
                Some(Value::Number(n)) => *n,
                _ => 0.0,
            };
            let next = current + by;
            if !next.is_finite() {
                return Err(format!("result {next} is not a finite number; value kept"));
            }
            profile.attributes.insert(name.to_string(), Value::Number(next));
        }
        Operation::Set(src) => {
            if let Some(v) = operand(event, src, ty)? {
                profile.attributes.insert(name.to_string(), v);
            }
        }
        Operation::AddToSet(src) | Operation::RemoveFromSet(src) => {
            let members =
                match operand(event, src, AttrType::SetOfStrings).or_else(|_| operand(event, src, AttrType::String))? {
                    None => return Ok(()),
                    Some(Value::Set(s)) => s.into_iter().collect::<Vec<_>>(),
                    Some(Value::String(s)) => vec![s],
                    Some(other) => return Err(format!("expected string, found {}", other.kind())),
                };
            let entry = profile.attributes.entry(name.to_string()).or_insert_with(|| Value::Set(Default::default()));
            let Value::Set(set) = entry else { unreachable!("type checked at load") };
            for m in members {
                if matches!(op, Operation::RemoveFromSet(_)) {
                    set.remove(&m);
                } else if set.len() < MAX_SET_MEMBERS {
                    set.insert(clamp_string(m));
                } else if !set.contains(&m) {
                    return Err(format!("set is full ({MAX_SET_MEMBERS} members); `{m}` refused"));
                }
            }
        }
        Operation::AssignBadge => {
            profile.badges.insert(name.to_string());
        }
        Operation::RemoveBadge => {
            profile.badges.remove(name);
        }
    }
    Ok(())
}

/// Applies a custom enricher's updates all or nothing: each must name a declared attribute
/// and carry a value of its type.
fn apply_updates(model: &Model, profile: &mut Profile, updates: Vec<Update>) -> Result<(), String> {
    for (name, value) in &updates {
        let Some(def) = model.attribute(name) else {
            return Err(format!("unknown attribute `{name}`"));
        };
        if let Some(v) = value
            && !def.ty.admits(v)
        {
            return Err(format!("attribute `{name}` is {}, update is {}", def.ty.name(), v.kind()));
        }
    }
    for (name, value) in updates {
        let ty = model.attribute(&name).map(|d| d.ty);
        match (ty, value) {
            (Some(AttrType::Badge), Some(_)) => {
                profile.badges.insert(name);
            }
            (Some(AttrType::Badge), None) => {
                profile.badges.remove(&name);
            }
            (_, Some(Value::String(s))) => {
                profile.attributes.insert(name, Value::String(clamp_string(s)));
            }
            (_, Some(v)) => {
                profile.attributes.insert(name, v);
            }
            (_, None) => {
                profile.attributes.remove(&name);
            }
        }
    }
    Ok(())
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
        assert!(o.new_visitor && o.new_visit && o.joined.is_empty());
        let o = apply_event(
            &model,
            &mut p,
            &event("purchase", 2_000, serde_json::json!({"total": 60, "email": "a@b.c"})),
            &mut NoCustomEnrichers,
        );
        assert!(o.joined.is_empty());
        let o = apply_event(
            &model,
            &mut p,
            &event("purchase", 3_000, serde_json::json!({"total": "45.5", "order_id": "o-9"})),
            &mut NoCustomEnrichers,
        );
        assert_eq!(o.joined, vec!["vips"]);
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
        assert!(o.joined.is_empty() && o.actions.is_empty(), "no second join");
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

    struct Fixed(Vec<Update>);
    impl CustomEnrichers for Fixed {
        fn enrich(&mut self, _: &str, _: &Event, _: &Profile) -> Result<Vec<Update>, String> {
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
}

//! Changing the configuration of a system that holds profiles: what a new configuration does to
//! stored data ([`Plan`], from two models), and bringing one profile in line with a model
//! ([`conform`]). The same rules apply when a configuration is applied live and when a server
//! starts on a configuration other than the one its data was last served with:
//!
//! - a removed attribute's values are dropped (with what they were computed from);
//! - an attribute whose type changed keeps its value where the conversion loses nothing (a
//!   number and a string that reads as that number, a string, number or boolean and a set or
//!   array of one), otherwise the value is dropped and counted;
//! - a removed audience's memberships are removed without firing `left`;
//! - added audiences, and audiences whose rule or inputs changed, are evaluated over every
//!   stored profile (a backfill); their `joined` and `left` actions fire only where the action
//!   says `on_backfill = "fire"`;
//! - a removed action's pending deliveries are cancelled;
//! - changed enrichments apply from the next event.

use crate::attribute::AttributeDef;
use crate::engine::{Outcome, reevaluate};
use crate::model::{Model, OnBackfill, Trigger};
use crate::profile::Profile;
use crate::value::{AttrType, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

/// What replacing configuration `old` with `new` does.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct Plan {
    /// Stored attributes no longer declared (or no longer stored): their values are dropped.
    pub attributes_dropped: Vec<String>,
    /// Stored attributes whose type changed: values convert or are dropped.
    pub attributes_converted: Vec<Conversion>,
    pub audiences_added: Vec<String>,
    /// Audiences whose rule changed, or an attribute it reads changed type or went away.
    pub audiences_changed: Vec<String>,
    pub audiences_removed: Vec<String>,
    pub actions_added: Vec<String>,
    pub actions_changed: Vec<String>,
    pub actions_removed: Vec<String>,
    /// `joined`/`left` actions of backfilled audiences that fire for changes a backfill finds.
    pub actions_fired_by_backfill: Vec<String>,
    /// Built-in enrichments or Wasm enrichers changed: they apply from the next event.
    pub enrichments_changed: bool,
    pub plugins_loaded: Vec<String>,
    pub plugins_unloaded: Vec<String>,
    /// Plugins whose `[plugin.NAME]` values changed: loaded again with them.
    pub plugins_reconfigured: Vec<String>,
    /// `[server]` keys that differ: they take effect at the next start.
    pub restart_needed: Vec<String>,
    /// Other sections that changed (sources, visits, identity, retention, ...): they apply
    /// from the next request.
    pub sections_changed: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Conversion {
    pub attribute: String,
    pub from: &'static str,
    pub to: &'static str,
}

impl Plan {
    pub fn new(old: &Model, new: &Model) -> Plan {
        let mut plan = Plan::default();
        let stored = |m: &Model, name: &str| m.attribute(name).filter(|a| a.scope.is_stored()).map(|a| a.ty);
        for a in old.attributes.iter().filter(|a| a.scope.is_stored()) {
            match stored(new, &a.name) {
                None => plan.attributes_dropped.push(a.name.clone()),
                Some(ty) if ty != a.ty && !same_values(a.ty, ty) => plan.attributes_converted.push(Conversion {
                    attribute: a.name.clone(),
                    from: a.ty.name(),
                    to: ty.name(),
                }),
                Some(_) => {}
            }
        }
        let retyped: BTreeSet<&str> = plan
            .attributes_dropped
            .iter()
            .map(String::as_str)
            .chain(plan.attributes_converted.iter().map(|c| c.attribute.as_str()))
            .collect();
        for audience in &new.audiences {
            match old.audience(&audience.name) {
                None => plan.audiences_added.push(audience.name.clone()),
                Some(before) => {
                    let inputs_changed = audience
                        .inputs
                        .iter()
                        .any(|i| retyped.contains(i.as_str()) || old.attribute_type(i) != new.attribute_type(i));
                    if before.rule != audience.rule || inputs_changed {
                        plan.audiences_changed.push(audience.name.clone());
                    }
                }
            }
        }
        plan.audiences_removed =
            old.audiences.iter().filter(|a| new.audience(&a.name).is_none()).map(|a| a.name.clone()).collect();
        for action in &new.actions {
            match old.action(&action.name) {
                None => plan.actions_added.push(action.name.clone()),
                Some(before) if !before.same_as(action) => plan.actions_changed.push(action.name.clone()),
                Some(_) => {}
            }
        }
        plan.actions_removed =
            old.actions.iter().filter(|a| new.action(&a.name).is_none()).map(|a| a.name.clone()).collect();
        let backfilled = plan.backfilled();
        plan.actions_fired_by_backfill = new
            .actions
            .iter()
            .filter(|a| matches!(a.trigger, Trigger::Joined | Trigger::Left) && a.on_backfill == OnBackfill::Fire)
            .filter(|a| backfilled.contains(&a.audience))
            .map(|a| a.name.clone())
            .collect();
        let enrichers = |m: &Model| {
            m.enrichers
                .iter()
                .map(|e| format!("{} {:?} {:?} {:?}", e.plugin, e.reads, e.writes, e.when))
                .collect::<Vec<_>>()
        };
        plan.enrichments_changed =
            format!("{:?}", old.enrichments) != format!("{:?}", new.enrichments) || enrichers(old) != enrichers(new);
        let (was, is) = (old.plugins_named(), new.plugins_named());
        plan.plugins_loaded = is.difference(&was).map(|s| s.to_string()).collect();
        plan.plugins_unloaded = was.difference(&is).map(|s| s.to_string()).collect();
        plan.plugins_reconfigured = is
            .intersection(&was)
            .filter(|name| old.plugin_config.get(**name) != new.plugin_config.get(**name))
            .map(|s| s.to_string())
            .collect();
        let (old_sections, new_sections) = (sections(old), sections(new));
        let server = |s: &BTreeMap<String, toml::Value>| match s.get("server") {
            Some(toml::Value::Table(t)) => t.clone(),
            _ => toml::Table::new(),
        };
        let (old_server, new_server) = (server(&old_sections), server(&new_sections));
        let keys: BTreeSet<&String> = old_server.keys().chain(new_server.keys()).collect();
        plan.restart_needed = keys
            .into_iter()
            .filter(|k| old_server.get(*k) != new_server.get(*k))
            .map(|k| format!("server.{k}"))
            .collect();
        const COMPARED_ABOVE: [&str; 7] =
            ["server", "attribute", "audience", "action", "enrichment", "enricher", "plugin"];
        let names: BTreeSet<&String> = old_sections.keys().chain(new_sections.keys()).collect();
        plan.sections_changed = names
            .into_iter()
            .filter(|k| !COMPARED_ABOVE.contains(&k.as_str()) && old_sections.get(*k) != new_sections.get(*k))
            .cloned()
            .collect();
        plan
    }

    /// Audiences to evaluate over every stored profile: the added and the changed ones.
    pub fn backfilled(&self) -> Vec<String> {
        self.audiences_added.iter().chain(&self.audiences_changed).cloned().collect()
    }

    /// Whether stored profiles must be looked at (values to drop or convert, memberships to
    /// remove, audiences to backfill).
    pub fn touches_profiles(&self) -> bool {
        !(self.attributes_dropped.is_empty()
            && self.attributes_converted.is_empty()
            && self.audiences_added.is_empty()
            && self.audiences_changed.is_empty()
            && self.audiences_removed.is_empty())
    }

    pub fn is_empty(&self) -> bool {
        *self == Plan::default()
    }
}

/// Whether two types hold their values the same way (no conversion needed).
fn same_values(a: AttrType, b: AttrType) -> bool {
    matches!((a, b), (AttrType::String, AttrType::VisitorId) | (AttrType::VisitorId, AttrType::String))
}

/// The configuration's top-level sections as TOML values, to tell which changed.
fn sections(model: &Model) -> BTreeMap<String, toml::Value> {
    toml::from_str::<toml::Table>(model.source_text()).map(|t| t.into_iter().collect()).unwrap_or_default()
}

impl fmt::Display for Plan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_empty() {
            return writeln!(f, "no changes");
        }
        let line = |f: &mut fmt::Formatter<'_>, mark: &str, what: &str, name: &str, note: &str| {
            writeln!(f, "  {mark} {what:<10} {name}{}{note}", if note.is_empty() { "" } else { "  " })
        };
        if !self.attributes_dropped.is_empty() || !self.attributes_converted.is_empty() {
            writeln!(f, "attributes")?;
            for name in &self.attributes_dropped {
                line(f, "-", "dropped", name, "(its values are removed from every profile)")?;
            }
            for c in &self.attributes_converted {
                let note = format!(
                    "{} → {} (values that convert without loss are kept, others dropped and counted)",
                    c.from, c.to
                );
                line(f, "~", "converted", &c.attribute, &note)?;
            }
        }
        if !(self.audiences_added.is_empty() && self.audiences_changed.is_empty() && self.audiences_removed.is_empty())
        {
            writeln!(f, "audiences")?;
            for name in &self.audiences_added {
                line(f, "+", "added", name, "(evaluated over every stored profile)")?;
            }
            for name in &self.audiences_changed {
                line(f, "~", "changed", name, "(evaluated again over every stored profile)")?;
            }
            for name in &self.audiences_removed {
                line(f, "-", "removed", name, "(memberships removed; `left` does not fire)")?;
            }
        }
        if !(self.actions_added.is_empty() && self.actions_changed.is_empty() && self.actions_removed.is_empty()) {
            writeln!(f, "actions")?;
            for name in &self.actions_added {
                line(f, "+", "added", name, "")?;
            }
            for name in &self.actions_changed {
                line(f, "~", "changed", name, "(pending deliveries are made as the new definition says)")?;
            }
            for name in &self.actions_removed {
                line(f, "-", "removed", name, "(pending deliveries are cancelled)")?;
            }
        }
        if !self.backfilled().is_empty() {
            match self.actions_fired_by_backfill.is_empty() {
                true => {
                    writeln!(f, "backfill: membership changes it finds fire no action (no on_backfill = \"fire\")")?
                }
                false => writeln!(
                    f,
                    "backfill: membership changes it finds fire {} (on_backfill = \"fire\")",
                    self.actions_fired_by_backfill.join(", ")
                )?,
            }
        }
        if self.enrichments_changed {
            writeln!(f, "enrichments: changed; they apply from the next event (stored values stay as they are)")?;
        }
        let plugins = [
            ("loaded", &self.plugins_loaded),
            ("unloaded", &self.plugins_unloaded),
            ("reconfigured", &self.plugins_reconfigured),
        ];
        for (what, names) in plugins.iter().filter(|(_, names)| !names.is_empty()) {
            writeln!(f, "plugins {what}: {}", names.join(", "))?;
        }
        if !self.sections_changed.is_empty() {
            writeln!(f, "changed, from the next request: {}", self.sections_changed.join(", "))?;
        }
        if !self.restart_needed.is_empty() {
            writeln!(f, "take effect at the next start: {}", self.restart_needed.join(", "))?;
        }
        Ok(())
    }
}

/// What [`conform`] did to a profile.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Conformed {
    /// Values of attributes no longer declared, and badges and ids of such attributes.
    pub removed: usize,
    pub converted: usize,
    /// Values whose type changed and that could not be converted without loss.
    pub dropped: Vec<String>,
    /// Memberships of audiences no longer declared.
    pub memberships_removed: usize,
}

impl Conformed {
    pub fn changed(&self) -> bool {
        self.removed + self.converted + self.dropped.len() + self.memberships_removed > 0
    }
}

/// Brings a stored profile in line with `model` (the rules at the top of this module). Cheap
/// when nothing is to be done: it runs on every profile read from the store.
pub fn conform(model: &Model, profile: &mut Profile) -> Conformed {
    let mut done = Conformed::default();
    let kept = Kept(model);
    if profile.attributes.iter().any(|(name, value)| !kept.value(name, value)) {
        let names: Vec<String> = profile.attributes.keys().cloned().collect();
        for name in names {
            let Some(def) = kept.stored(&name) else {
                profile.clear(&name);
                done.removed += 1;
                continue;
            };
            if def.ty.admits(&profile.attributes[&name]) {
                continue;
            }
            let value = profile.attributes.remove(&name).expect("listed above");
            profile.clear(&name);
            match convert(def, value) {
                Some(converted) => {
                    profile.attributes.insert(name, converted);
                    done.converted += 1;
                }
                None => done.dropped.push(name),
            }
        }
    }
    let before = profile.badges.len();
    profile.badges.retain(|name| kept.badge(name));
    done.removed += before - profile.badges.len();
    let before = profile.held_ids.len();
    profile.held_ids.retain(|name, _| kept.id(name));
    done.removed += before - profile.held_ids.len();
    for derived in [&mut profile.rolling as &mut dyn Retain, &mut profile.frequencies] {
        derived.retain_names(&|name| kept.stored(name).is_some());
    }
    let before = profile.audiences.len();
    profile.audiences.retain(|a| kept.audience(a));
    done.memberships_removed = before - profile.audiences.len();
    done
}

/// What [`conform`] keeps of a stored profile under a model; [`is_stale`] asks the same.
struct Kept<'m>(&'m Model);

impl Kept<'_> {
    fn stored(&self, name: &str) -> Option<&AttributeDef> {
        self.0.attribute(name).filter(|a| a.scope.is_stored())
    }

    fn value(&self, name: &str, value: &Value) -> bool {
        self.stored(name).is_some_and(|def| def.ty.admits(value))
    }

    fn badge(&self, name: &str) -> bool {
        self.stored(name).is_some_and(|def| def.ty == AttrType::Badge)
    }

    fn id(&self, name: &str) -> bool {
        self.stored(name).is_some_and(|def| def.ty == AttrType::VisitorId)
    }

    fn audience(&self, name: &str) -> bool {
        self.0.audience(name).is_some()
    }
}

/// The maps of values attributes are computed from, by attribute name.
trait Retain {
    fn retain_names(&mut self, keep: &dyn Fn(&str) -> bool);
}

impl<V> Retain for BTreeMap<String, V> {
    fn retain_names(&mut self, keep: &dyn Fn(&str) -> bool) {
        self.retain(|name, _| keep(name));
    }
}

/// `value` as a value of `def`'s type, when nothing is lost on the way.
fn convert(def: &AttributeDef, value: Value) -> Option<Value> {
    let one = |v: Value| Value::collection(def.ty, vec![v]);
    match (value, def.ty) {
        (Value::Number(n), AttrType::String | AttrType::VisitorId) => Some(Value::String(format_number(n))),
        (Value::String(s), AttrType::Number) => {
            s.trim().parse::<f64>().ok().filter(|n| n.is_finite()).map(Value::Number)
        }
        (v @ Value::String(_), AttrType::SetOfStrings | AttrType::ArrayOfStrings) => Some(one(v)),
        (v @ Value::Number(_), AttrType::ArrayOfNumbers) => Some(one(v)),
        (v @ Value::Boolean(_), AttrType::ArrayOfBooleans) => Some(one(v)),
        _ => None,
    }
}

/// A number as text, as it would be written (`3`, not `3.0`).
fn format_number(n: f64) -> String {
    if n.fract() == 0.0 && n.abs() < 1e15 { format!("{}", n as i64) } else { n.to_string() }
}

/// Whether bringing `profile` in line with `model` changes anything, or one of `audiences`
/// (indexes into `model.audiences`) would change membership; without changing it. A backfill
/// asks this of every stored profile and sends only those that answer yes to their partition.
pub fn is_stale(model: &Model, profile: &Profile, audiences: &[usize], now: i64) -> bool {
    needs_conform(model, profile) || crate::engine::would_change(model, profile, audiences, now)
}

fn needs_conform(model: &Model, profile: &Profile) -> bool {
    let kept = Kept(model);
    profile.attributes.iter().any(|(name, value)| !kept.value(name, value))
        || profile.badges.iter().any(|b| !kept.badge(b))
        || profile.held_ids.keys().any(|n| !kept.id(n))
        || profile.rolling.keys().chain(profile.frequencies.keys()).any(|n| kept.stored(n).is_none())
        || profile.audiences.iter().any(|a| !kept.audience(a))
}

/// A backfill's work on one profile: conform it, evaluate `audiences` (indexes into
/// `model.audiences`) at `now`, and fire only the `joined`/`left` actions that say
/// `on_backfill = "fire"`.
pub fn backfill(model: &Model, profile: &mut Profile, audiences: &[usize], now: i64) -> (Conformed, Outcome) {
    let conformed = conform(model, profile);
    let mut out = reevaluate(model, profile, audiences, now);
    out.actions.retain(|a| model.action(&a.action).is_some_and(|def| def.on_backfill == OnBackfill::Fire));
    (conformed, out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Membership, parse};

    const OLD: &str = r#"
[server]
listen = "127.0.0.1:8080"

[[attribute]]
name = "a"
scope = "visitor"
type = "number"

[[attribute]]
name = "code"
scope = "visitor"
type = "string"

[[attribute]]
name = "gone"
scope = "visitor"
type = "string"

[[attribute]]
name = "tags"
scope = "visitor"
type = "string"

[[audience]]
name = "big"
rule = { attribute = "a", op = ">", value = 5 }

[[audience]]
name = "old"
rule = { attribute = "gone", op = "is_assigned" }

[[action]]
name = "hook"
audience = "old"
trigger = "joined"
connector = "webhook"
"#;

    const NEW: &str = r#"
[server]
listen = "127.0.0.1:9090"

[[attribute]]
name = "a"
scope = "visitor"
type = "string"

[[attribute]]
name = "code"
scope = "visitor"
type = "number"

[[attribute]]
name = "tags"
scope = "visitor"
type = "set_of_strings"

[[audience]]
name = "big"
rule = { attribute = "a", op = "=", value = "7" }

[[audience]]
name = "any_a"
rule = { attribute = "a", op = "is_assigned" }

[[action]]
name = "greet"
audience = "any_a"
trigger = "joined"
connector = "webhook"
on_backfill = "fire"

[[action]]
name = "quiet"
audience = "any_a"
trigger = "joined"
connector = "webhook"
"#;

    fn stored(attributes: &[(&str, Value)], audiences: &[&str]) -> Profile {
        let mut p = Profile::new("p1");
        p.event_count = 1;
        p.attributes = attributes.iter().map(|(n, v)| (n.to_string(), v.clone())).collect();
        p.audiences = audiences.iter().map(|a| a.to_string()).collect();
        p
    }

    #[test]
    fn a_plan_names_what_a_change_does() {
        let plan = Plan::new(&parse(OLD).unwrap(), &parse(NEW).unwrap());
        assert_eq!(plan.attributes_dropped, ["gone"]);
        let converted: Vec<_> =
            plan.attributes_converted.iter().map(|c| (c.attribute.as_str(), c.from, c.to)).collect();
        assert_eq!(
            converted,
            [("a", "number", "string"), ("code", "string", "number"), ("tags", "string", "set_of_strings")]
        );
        assert_eq!(plan.audiences_added, ["any_a"]);
        assert_eq!(plan.audiences_changed, ["big"]);
        assert_eq!(plan.audiences_removed, ["old"]);
        assert_eq!((plan.actions_added.len(), plan.actions_removed.as_slice()), (2, &["hook".to_string()][..]));
        assert_eq!(plan.actions_fired_by_backfill, ["greet"]);
        assert_eq!(plan.restart_needed, ["server.listen"]);
        assert!(plan.touches_profiles());
        let text = plan.to_string();
        assert!(text.contains("- dropped    gone"), "{text}");
        assert!(text.contains("- removed    old  (memberships removed; `left` does not fire)"), "{text}");
        assert!(text.contains("fire greet (on_backfill = \"fire\")"), "{text}");
        assert!(Plan::new(&parse(NEW).unwrap(), &parse(NEW).unwrap()).is_empty());
    }

    #[test]
    fn a_rule_moved_elsewhere_in_the_file_is_not_a_change() {
        let moved = NEW.replace("[[audience]]\nname = \"big\"", "\n\n[[audience]]\nname = \"big\"");
        let plan = Plan::new(&parse(NEW).unwrap(), &parse(&moved).unwrap());
        assert!(plan.is_empty(), "{plan}");
    }

    #[test]
    fn conforming_converts_what_converts_and_drops_the_rest() {
        let model = parse(NEW).unwrap();
        let mut p = stored(
            &[
                ("a", Value::Number(7.0)),
                ("code", Value::String("abc".into())),
                ("gone", Value::String("x".into())),
                ("tags", Value::String("red".into())),
            ],
            &["old", "big"],
        );
        let done = conform(&model, &mut p);
        assert_eq!(p.attributes.get("a"), Some(&Value::String("7".into())));
        assert_eq!(p.attributes.get("tags"), Some(&Value::Set(["red".to_string()].into())));
        assert!(!p.attributes.contains_key("code") && !p.attributes.contains_key("gone"));
        assert_eq!(done, Conformed { removed: 1, converted: 2, dropped: vec!["code".into()], memberships_removed: 1 });
        assert!(!conform(&model, &mut p).changed(), "conforming twice changes nothing");

        let mut p = stored(&[("code", Value::String(" 12.5 ".into()))], &[]);
        conform(&model, &mut p);
        assert_eq!(p.attributes.get("code"), Some(&Value::Number(12.5)));
    }

    #[test]
    fn a_backfill_joins_stored_profiles_and_fires_only_what_says_so() {
        let model = parse(NEW).unwrap();
        let any_a = model.audiences.iter().position(|a| a.name == "any_a").unwrap();
        let p = stored(&[("a", Value::String("3".into()))], &[]);
        assert!(is_stale(&model, &p, &[any_a], 0));
        let mut p = p;
        let (_, out) = backfill(&model, &mut p, &[any_a], 1_000);
        assert_eq!(out.changes, [Membership::Joined { audience: "any_a".into(), at_ms: 1_000 }]);
        let fired: Vec<&str> = out.actions.iter().map(|a| a.action.as_str()).collect();
        assert_eq!(fired, ["greet"], "`quiet` skips changes found by a backfill");
        assert!(!is_stale(&model, &p, &[any_a], 2_000));
        let old_shape = stored(&[("a", Value::Number(3.0))], &["any_a"]);
        assert!(is_stale(&model, &old_shape, &[], 0), "a value of the old type is stale");
    }

    /// A backfill sends a profile to be conformed exactly when conforming would change it:
    /// ids held under an attribute that is no longer of type `visitor_id` included.
    #[test]
    fn a_profile_is_stale_exactly_when_conforming_changes_it() {
        let model = parse(NEW).unwrap();
        let mut p = stored(&[("a", Value::String("3".into()))], &[]);
        assert!(!is_stale(&model, &p, &[], 0));
        p.held_ids.insert("a".into(), ["x".to_string()].into());
        assert!(is_stale(&model, &p, &[], 0), "`a` holds no ids");
        assert!(conform(&model, &mut p).changed());
        assert!(p.held_ids.is_empty() && !is_stale(&model, &p, &[], 0));
    }

    #[test]
    fn on_backfill_is_checked() {
        let bad = NEW.replace("on_backfill = \"fire\"", "on_backfill = \"always\"");
        let errors = parse(&bad).unwrap_err().render("f");
        assert!(errors.contains("unknown on_backfill `always`: expected \"skip\" or \"fire\""), "{errors}");
        let feed = "[[action]]\nname = \"f\"\ntrigger = \"event\"\nconnector = \"webhook\"\non_backfill = \"fire\"\n";
        let errors = parse(feed).unwrap_err().render("f");
        assert!(errors.contains("5:15") && errors.contains("`joined` and `left` actions only"), "{errors}");
    }

    #[test]
    fn a_rule_alone_reads_as_toml_or_json() {
        let model = parse(NEW).unwrap();
        let toml = crate::config::parse_rule(&model, r#"{ attribute = "a", op = "is_assigned" }"#).unwrap();
        let json = crate::config::parse_rule(&model, r#"{"rule": {"attribute": "a", "op": "is_assigned"}}"#).unwrap();
        assert_eq!(toml, json);
        assert_eq!(toml, model.audience("any_a").unwrap().rule);
        let errors = crate::config::parse_rule(&model, r#"{ attribute = "nope", op = "is_assigned" }"#).unwrap_err();
        assert!(errors.render("rule").contains("nope"), "{}", errors.render("rule"));
        assert_eq!((errors.0[0].line, errors.0[0].column), (1, 15), "{}", errors.render("rule"));
    }
}

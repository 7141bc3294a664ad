//! Identity stitching: the merge rule of each attribute type, and the guards that keep
//! unreliable ids (too short, placeholders, ids shared by too many people) from stitching.

use crate::attribute::{AttributeDef, MergeRule};
use crate::model::Model;
use crate::profile::Profile;
use crate::value::{AttrType, FunnelState, MAX_SET_MEMBERS, MAX_TALLY_KEYS, Scope, Value};
use std::collections::{BTreeMap, BTreeSet};

/// Merges `absorbed` into `survivor`, attribute by attribute, by each attribute's rule. The
/// survivor keeps its id; audiences are left for the caller to re-evaluate.
pub fn merge_profiles(model: &Model, survivor: &mut Profile, absorbed: Profile) {
    let survivor_is_newer = survivor.last_seen_ms >= absorbed.last_seen_ms;
    let survivor_is_older = survivor.first_seen_ms <= absorbed.first_seen_ms;
    for def in model.attributes.iter().filter(|d| d.scope != Scope::Event) {
        let rule = def.merge;
        if def.ty == AttrType::Badge {
            let (mine, theirs) = (survivor.badges.contains(&def.name), absorbed.badges.contains(&def.name));
            let keep = match rule {
                MergeRule::Latest => {
                    if survivor_is_newer {
                        mine
                    } else {
                        theirs
                    }
                }
                MergeRule::Earliest => {
                    if survivor_is_older {
                        mine
                    } else {
                        theirs
                    }
                }
                _ => mine || theirs,
            };
            if keep {
                survivor.badges.insert(def.name.clone());
            } else {
                survivor.badges.remove(&def.name);
            }
            continue;
        }
        let theirs = absorbed.attributes.get(&def.name).cloned();
        let mine = survivor.attributes.remove(&def.name);
        let merged = match (mine, theirs) {
            (None, None) => None,
            (Some(v), None) | (None, Some(v)) => Some(v),
            (Some(a), Some(b)) => Some(merge_values(def, a, b, survivor_is_newer, survivor_is_older)),
        };
        if let Some(v) = merged {
            survivor.attributes.insert(def.name.clone(), v);
        }
    }
    for (name, ids) in absorbed.held_ids {
        survivor.held_ids.entry(name).or_default().extend(ids);
    }
    for (name, counts) in absorbed.frequencies {
        let mine = survivor.frequencies.entry(name).or_default();
        for (value, n) in counts {
            *mine.entry(value).or_default() += n;
        }
    }
    if !survivor_is_newer {
        survivor.rolling = absorbed.rolling;
        survivor.visit_start_ms = absorbed.visit_start_ms;
        survivor.visit_event_count = absorbed.visit_event_count;
        survivor.visit_ended = absorbed.visit_ended;
        survivor.visit_timeout_ms = absorbed.visit_timeout_ms;
    }
    survivor.first_seen_ms = survivor.first_seen_ms.min(absorbed.first_seen_ms);
    survivor.last_seen_ms = survivor.last_seen_ms.max(absorbed.last_seen_ms);
    survivor.event_count += absorbed.event_count;
    survivor.visit_count += absorbed.visit_count;
}

/// `a` is the survivor's value, `b` the absorbed profile's.
fn merge_values(def: &AttributeDef, a: Value, b: Value, a_is_newer: bool, a_is_older: bool) -> Value {
    match (def.merge, a, b) {
        (MergeRule::Latest, a, b) => {
            if a_is_newer {
                a
            } else {
                b
            }
        }
        (MergeRule::Earliest, a, b) => {
            if a_is_older {
                a
            } else {
                b
            }
        }
        (MergeRule::Add, Value::Number(x), Value::Number(y)) if (x + y).is_finite() => Value::Number(x + y),
        (MergeRule::Add | MergeRule::Max, Value::Tally(mut x), Value::Tally(y)) => {
            for (k, v) in y {
                if !x.contains_key(&k) && x.len() >= MAX_TALLY_KEYS {
                    continue;
                }
                let entry = x.entry(k).or_insert(if def.merge == MergeRule::Add { 0.0 } else { v });
                *entry = if def.merge == MergeRule::Add { *entry + v } else { entry.max(v) };
            }
            Value::Tally(x)
        }
        (MergeRule::Min, Value::Number(x), Value::Number(y)) => Value::Number(x.min(y)),
        (MergeRule::Max, Value::Number(x), Value::Number(y)) => Value::Number(x.max(y)),
        (MergeRule::Min, Value::Date(x), Value::Date(y)) => Value::Date(x.min(y)),
        (MergeRule::Max, Value::Date(x), Value::Date(y)) => Value::Date(x.max(y)),
        (MergeRule::Union, Value::Set(mut x), Value::Set(y)) => {
            for m in y {
                if x.len() >= MAX_SET_MEMBERS {
                    break;
                }
                x.insert(m);
            }
            Value::Set(x)
        }
        (MergeRule::Append, a, b) => {
            let (first, second) = if a_is_older { (a, b) } else { (b, a) };
            let cap = def.max_entries;
            match (first, second) {
                (Value::Strings(x), Value::Strings(y)) => Value::Strings(concat_capped(x, y, cap)),
                (Value::Numbers(x), Value::Numbers(y)) => Value::Numbers(concat_capped(x, y, cap)),
                (Value::Booleans(x), Value::Booleans(y)) => Value::Booleans(concat_capped(x, y, cap)),
                (first, _) => first,
            }
        }
        (MergeRule::Interleave, Value::Timeline(mut x), Value::Timeline(y)) => {
            x.extend(y);
            x.sort_by_key(|e| e.at_ms);
            let overflow = x.len().saturating_sub(def.max_entries);
            x.drain(..overflow);
            Value::Timeline(x)
        }
        (MergeRule::MostAdvanced, Value::Funnel(x), Value::Funnel(y)) => Value::Funnel(most_advanced(x, y)),
        // A sum that is not finite keeps the survivor's value, as an increment would.
        (_, a, _) => a,
    }
}

/// `x` then `y`, keeping the last `cap` items.
fn concat_capped<T>(mut x: Vec<T>, y: Vec<T>, cap: usize) -> Vec<T> {
    x.extend(y);
    let overflow = x.len().saturating_sub(cap);
    x.drain(..overflow);
    x
}

fn most_advanced(a: FunnelState, b: FunnelState) -> FunnelState {
    let rank = |f: &FunnelState| (f.completed_ms.is_some(), f.reached.len());
    if rank(&b) > rank(&a) { b } else { a }
}

/// Visitor ids held in the profile's `visitor_id` attributes, by attribute.
/// Why profiles `a` and `b` may not be stitched: together they would hold more values of a
/// visitor-id attribute than its `max_per_profile` (two people's email hashes, say).
pub fn held_ids_conflict(model: &Model, a: &Profile, b: &Profile) -> Option<String> {
    held_values_conflict(model, a, &capped_values(model, b))
}

/// The values `profile` holds of each visitor-id attribute with a `max_per_profile`.
pub fn capped_values(model: &Model, profile: &Profile) -> BTreeMap<String, BTreeSet<String>> {
    model
        .attributes
        .iter()
        .filter(|def| def.max_per_profile.is_some())
        .map(|def| {
            let mut ids = profile.held_ids.get(&def.name).cloned().unwrap_or_default();
            if let Some(Value::String(s)) = profile.attributes.get(&def.name) {
                ids.insert(s.clone());
            }
            (def.name.clone(), ids)
        })
        .collect()
}

/// [`held_ids_conflict`] with a profile known only by the values it holds of each capped
/// attribute, `other` (one another node holds).
pub fn held_values_conflict(model: &Model, a: &Profile, other: &BTreeMap<String, BTreeSet<String>>) -> Option<String> {
    let held = capped_values(model, a);
    model.attributes.iter().find_map(|def| {
        let max = def.max_per_profile?;
        let (mine, theirs) = (held.get(&def.name)?, other.get(&def.name));
        let together = mine.union(theirs.unwrap_or(&BTreeSet::new())).count();
        (together > max)
            .then(|| format!("the two profiles hold {together} different `{}` ids (max_per_profile = {max})", def.name))
    })
}

pub fn visitor_ids(model: &Model, profile: &Profile) -> BTreeMap<String, String> {
    model
        .attributes
        .iter()
        .filter(|d| d.ty == AttrType::VisitorId)
        .filter_map(|d| match profile.attributes.get(&d.name) {
            Some(Value::String(s)) if !s.is_empty() => Some((d.name.clone(), s.clone())),
            _ => None,
        })
        .collect()
}

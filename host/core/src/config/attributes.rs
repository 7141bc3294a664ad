//! `[[attribute]]`: declarations, with their types, limits and merge rules.

use super::Validator;
use super::raw::RawAttribute;
use crate::attribute::{AttributeDef, FunnelStepDef, MergeRule, preloaded_type};
use crate::literal::{is_identifier, parse_duration, parse_event_path};
use crate::value::{
    AttrType, DEFAULT_TIMELINE_AGE_MS, DEFAULT_TIMELINE_ENTRIES, MAX_ARRAY_ITEMS, MAX_FUNNEL_STEPS, Scope,
};
use std::collections::HashMap;

impl Validator<'_> {
    pub(super) fn attribute(&mut self, a: &RawAttribute, declared: &HashMap<String, usize>) -> Option<AttributeDef> {
        let name = a.name.get_ref();
        if !is_identifier(name) {
            self.error(a.name.span(), format!("attribute name `{name}` must be letters, digits and `_`"));
            return None;
        }
        if preloaded_type(name).is_some() {
            self.error(a.name.span(), format!("attribute `{name}` is preloaded; choose another name"));
            return None;
        }
        if declared.contains_key(name) {
            self.error(a.name.span(), format!("attribute `{name}` is declared twice"));
            return None;
        }
        let scope = match a.scope.get_ref().as_str() {
            "event" => Scope::Event,
            "visit" => Scope::Visit,
            "visitor" => Scope::Visitor,
            "omnichannel" => Scope::Omnichannel,
            other => {
                self.error(
                    a.scope.span(),
                    format!("unknown scope `{other}`: expected event, visit, visitor or omnichannel"),
                );
                return None;
            }
        };
        let Some(ty) = AttrType::parse(a.ty.get_ref()) else {
            let names: Vec<&str> = AttrType::ALL.iter().map(|t| t.name()).collect();
            self.error(a.ty.span(), format!("unknown type `{}`: expected one of {}", a.ty.get_ref(), names.join(", ")));
            return None;
        };
        let mut def = AttributeDef {
            name: name.clone(),
            scope,
            ty,
            field: None,
            max_entries: if ty == AttrType::Timeline { DEFAULT_TIMELINE_ENTRIES } else { MAX_ARRAY_ITEMS },
            max_age_ms: DEFAULT_TIMELINE_AGE_MS,
            steps: Vec::new(),
            merge: MergeRule::default_for(ty),
            max_per_profile: None,
        };
        if let Some(m) = &a.max_per_profile {
            match *m.get_ref() {
                _ if ty != AttrType::VisitorId => {
                    self.error(m.span(), "`max_per_profile` is only for visitor_id attributes")
                }
                n @ 1..=1_000 => def.max_per_profile = Some(n as usize),
                _ => self.error(m.span(), "max_per_profile must be between 1 and 1000"),
            }
        }
        if let Some(m) = &a.merge {
            let allowed = MergeRule::allowed_for(ty);
            match MergeRule::parse(m.get_ref()) {
                Some(rule) if allowed.contains(&rule) => def.merge = rule,
                _ => {
                    let names: Vec<&str> = allowed.iter().map(|r| r.name()).collect();
                    self.error(
                        m.span(),
                        format!(
                            "merge rule `{}` does not apply to {} (use: {})",
                            m.get_ref(),
                            ty.name(),
                            names.join(", ")
                        ),
                    );
                }
            }
        }
        match (&a.field, scope) {
            (Some(f), Scope::Event) => match parse_event_path(f.get_ref()) {
                Some(path) => def.field = Some(path),
                None => self.error(f.span(), format!("`{}` is not a field path like `order.total`", f.get_ref())),
            },
            (None, Scope::Event) => self.error(a.name.span(), format!("event attribute `{name}` needs `field`")),
            (Some(f), _) => self.error(f.span(), "`field` is only for attributes of scope `event`"),
            (None, _) => {}
        }
        if scope == Scope::Event
            && !matches!(
                ty,
                AttrType::String
                    | AttrType::Number
                    | AttrType::Boolean
                    | AttrType::Date
                    | AttrType::SetOfStrings
                    | AttrType::ArrayOfStrings
                    | AttrType::ArrayOfNumbers
                    | AttrType::ArrayOfBooleans
            )
        {
            self.error(a.ty.span(), format!("an event attribute cannot be a {}", ty.name()));
        }
        if let Some(m) = &a.max_entries {
            match ty.max_entries_limit() {
                Some(limit) if (1..=limit).contains(&(*m.get_ref() as usize)) => {
                    def.max_entries = *m.get_ref() as usize
                }
                Some(limit) => self.error(m.span(), format!("max_entries must be between 1 and {limit}")),
                None => self.error(m.span(), "`max_entries` is only for arrays and timelines"),
            }
        }
        if let Some(age) = &a.max_age {
            if ty != AttrType::Timeline {
                self.error(age.span(), "`max_age` is only for timelines");
            } else {
                match parse_duration(age.get_ref()) {
                    Ok(ms) => def.max_age_ms = ms,
                    Err(msg) => self.error(age.span(), msg),
                }
            }
        }
        match (&a.steps, ty) {
            (Some(steps), AttrType::Funnel) => {
                let list = steps.get_ref();
                if list.is_empty() || list.len() > MAX_FUNNEL_STEPS {
                    self.error(steps.span(), format!("a funnel has between 1 and {MAX_FUNNEL_STEPS} steps"));
                } else if !list.iter().any(|s| s.required) {
                    self.error(steps.span(), "a funnel needs at least one required step");
                }
                for (i, s) in list.iter().enumerate() {
                    if list[..i].iter().any(|p| p.name == s.name) {
                        self.error(steps.span(), format!("funnel step `{}` is declared twice", s.name));
                    }
                }
                def.steps = list.iter().map(|s| FunnelStepDef { name: s.name.clone(), required: s.required }).collect();
            }
            (None, AttrType::Funnel) => self.error(a.ty.span(), format!("funnel `{name}` needs `steps`")),
            (Some(steps), _) => self.error(steps.span(), "`steps` is only for funnels"),
            (None, _) => {}
        }
        Some(def)
    }
}

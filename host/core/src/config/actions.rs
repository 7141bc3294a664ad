//! `[[action]]`: triggers, connectors, parameters and delivery policies.

use super::raw::{RawAction, RawAudience};
use super::{RuleUse, Validator};
use crate::attribute::ValueSource;
use crate::literal::parse_duration;
use crate::model::{ActionDef, BatchPolicy, DeliveryPolicy, OnBackfill, Trigger};
use toml::Spanned;

impl Validator<'_> {
    pub(super) fn action(&mut self, a: &RawAction, declared: &[Spanned<RawAudience>]) -> Option<ActionDef> {
        let name = a.name.get_ref();
        let trigger = match Trigger::ALL.into_iter().find(|t| t.name() == a.trigger.get_ref()) {
            Some(t) => Some(t),
            None => {
                let names: Vec<&str> = Trigger::ALL.iter().map(|t| t.name()).collect();
                self.error(
                    a.trigger.span(),
                    format!("unknown trigger `{}`: expected one of {}", a.trigger.get_ref(), names.join(", ")),
                );
                None
            }
        };
        let audience = match (&a.audience, trigger) {
            (Some(aud), Some(Trigger::Event)) => {
                self.error(
                    aud.span(),
                    "an event feed (trigger = \"event\") has no audience; filter with `event` and `if`",
                );
                None
            }
            (Some(aud), _) => {
                if !declared.iter().any(|x| x.get_ref().name.get_ref() == aud.get_ref()) {
                    self.error(aud.span(), format!("unknown audience `{}`", aud.get_ref()));
                }
                Some(aud.get_ref().clone())
            }
            (None, Some(Trigger::Event | Trigger::Deleted)) => Some(String::new()),
            (None, _) => {
                self.error(a.name.span(), format!("action `{name}` needs `audience`"));
                None
            }
        };
        let is_feed = trigger == Some(Trigger::Event);
        if !is_feed && let Some(e) = &a.event {
            self.error(e.span(), "`event` filters event feeds only (trigger = \"event\")");
        }
        let condition = match &a.condition {
            Some(c) if !is_feed => {
                self.error(c.span(), "`if` filters event feeds only (trigger = \"event\")");
                None
            }
            Some(c) => Some(self.condition(c, RuleUse::WithEvent)?),
            None => None,
        };
        let mut params = Vec::new();
        for (key, src) in &a.params {
            match ValueSource::reference(src.get_ref(), |name| self.lookup(name).is_some()) {
                Ok(source) => params.push((key.clone(), source)),
                Err(msg) => self.error(src.span(), format!("params.{key}: {msg}")),
            }
        }
        let delivery = self.delivery_policy(a);
        let on_backfill = match &a.on_backfill {
            None => OnBackfill::Skip,
            Some(v) => match (v.get_ref().as_str(), trigger) {
                (_, Some(t)) if !matches!(t, Trigger::Joined | Trigger::Left) => {
                    self.error(v.span(), "`on_backfill` applies to `joined` and `left` actions only");
                    OnBackfill::Skip
                }
                ("skip", _) => OnBackfill::Skip,
                ("fire", _) => OnBackfill::Fire,
                (other, _) => {
                    self.error(v.span(), format!("unknown on_backfill `{other}`: expected \"skip\" or \"fire\""));
                    OnBackfill::Skip
                }
            },
        };
        Some(ActionDef {
            name: name.clone(),
            audience: audience?,
            trigger: trigger?,
            event: a.event.as_ref().map(|e| e.get_ref().clone()),
            condition,
            connector: a.connector.get_ref().clone(),
            connector_span: a.connector.span(),
            settings: a.settings.clone(),
            params,
            delivery,
            on_backfill,
        })
    }

    pub(super) fn delivery_policy(&mut self, a: &RawAction) -> DeliveryPolicy {
        let mut policy = DeliveryPolicy {
            cooldown_ms: self.duration(&a.cooldown),
            delay_ms: self.duration(&a.delay),
            ..DeliveryPolicy::default()
        };
        if let Some(ms) = self.duration(&a.retry_initial) {
            policy.retry_initial_ms = ms;
        }
        if let Some(ms) = self.duration(&a.retry_max) {
            policy.retry_max_ms = ms;
        }
        if policy.retry_max_ms < policy.retry_initial_ms
            && let Some(span) = a.retry_max.as_ref().map(|r| r.span())
        {
            self.error(span, "retry_max must not be shorter than retry_initial");
        }
        if let Some(c) = &a.concurrency {
            match *c.get_ref() {
                1..=256 => policy.concurrency = *c.get_ref() as usize,
                _ => self.error(c.span(), "concurrency must be between 1 and 256"),
            }
        }
        if let Some(m) = &a.max_attempts {
            match *m.get_ref() {
                1..=1000 => policy.max_attempts = *m.get_ref() as u32,
                _ => self.error(m.span(), "max_attempts must be between 1 and 1000"),
            }
        }
        if let Some(b) = &a.batch {
            let raw = b.get_ref();
            let max_age_ms = match raw.max_age.as_deref().map(parse_duration) {
                None => Ok(1_000),
                Some(r) => r,
            };
            match (raw.max_items.unwrap_or(100), max_age_ms, raw.max_bytes.unwrap_or(1_000_000)) {
                (0, _, _) | (_, _, 0) => self.error(b.span(), "batch.max_items and batch.max_bytes must be positive"),
                (_, Err(msg), _) => self.error(b.span(), format!("batch.max_age: {msg}")),
                (items, Ok(age), bytes) => {
                    policy.batch =
                        Some(BatchPolicy { max_items: items as usize, max_age_ms: age, max_bytes: bytes as usize })
                }
            }
        }
        policy
    }
}

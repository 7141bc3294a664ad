//! The value-tier enricher: sets a string attribute to `bronze`, `silver` or `gold` from a
//! number attribute holding lifetime spend.
//!
//! Configuration (all optional): `spend_attribute` (default `lifetime_spend`), `tier_attribute`
//! (default `value_tier`), `silver` (default 100) and `gold` (default 500) thresholds.

use starling_sdk::{
    AttributeUpdate, AttributeValue, EnrichError, Enricher, Event, ProfileView, config, export_enricher,
};

struct ValueTier;

impl Enricher for ValueTier {
    fn enrich(_event: Event, profile: ProfileView) -> Result<Vec<AttributeUpdate>, EnrichError> {
        let spend_attribute = config::get("spend_attribute").unwrap_or_else(|| "lifetime_spend".into());
        let tier_attribute = config::get("tier_attribute").unwrap_or_else(|| "value_tier".into());
        let silver = threshold("silver", 100.0).map_err(EnrichError::Misconfigured)?;
        let gold = threshold("gold", 500.0).map_err(EnrichError::Misconfigured)?;
        let Some(spend) = profile.number(&spend_attribute) else {
            return Ok(Vec::new());
        };
        let tier = tier(spend, silver, gold);
        let current = profile.attribute(&tier_attribute);
        if matches!(current, Some(AttributeValue::Text(t)) if t == tier) {
            return Ok(Vec::new());
        }
        Ok(vec![AttributeUpdate { name: tier_attribute, value: Some(AttributeValue::Text(tier.into())) }])
    }
}

fn threshold(key: &str, default: f64) -> Result<f64, String> {
    match config::get(key) {
        None => Ok(default),
        Some(v) => v.trim().parse().map_err(|_| format!("configuration `{key}` = `{v}` is not a number")),
    }
}

fn tier(spend: f64, silver: f64, gold: f64) -> &'static str {
    if spend >= gold {
        "gold"
    } else if spend >= silver {
        "silver"
    } else {
        "bronze"
    }
}

export_enricher!(ValueTier);

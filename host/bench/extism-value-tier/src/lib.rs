//! The value-tier enricher (connectors/value-tier) written the way an Extism plugin is: the host
//! passes the event and profile as JSON and reads the attribute updates back as JSON.

use extism_pdk::{FnResult, Json, config, plugin_fn};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

#[derive(Deserialize)]
pub struct Input {
    pub profile: Profile,
}

#[derive(Deserialize)]
pub struct Profile {
    pub attributes: BTreeMap<String, serde_json::Value>,
}

#[derive(Serialize)]
pub struct Update {
    pub name: String,
    pub value: serde_json::Value,
}

#[plugin_fn]
pub fn enrich(Json(input): Json<Input>) -> FnResult<Json<Vec<Update>>> {
    let spend_attribute = config::get("spend_attribute")?.unwrap_or_else(|| "lifetime_spend".into());
    let tier_attribute = config::get("tier_attribute")?.unwrap_or_else(|| "value_tier".into());
    let silver = threshold("silver", 100.0)?;
    let gold = threshold("gold", 500.0)?;
    let Some(spend) = input.profile.attributes.get(&spend_attribute).and_then(|v| v.as_f64()) else {
        return Ok(Json(Vec::new()));
    };
    let tier = tier(spend, silver, gold);
    if input.profile.attributes.get(&tier_attribute).and_then(|v| v.as_str()) == Some(tier) {
        return Ok(Json(Vec::new()));
    }
    Ok(Json(vec![Update { name: tier_attribute, value: tier.into() }]))
}

fn threshold(key: &str, default: f64) -> FnResult<f64> {
    match config::get(key)? {
        None => Ok(default),
        Some(v) => Ok(v.trim().parse().map_err(|_| extism_pdk::Error::msg(format!("configuration `{key}` = `{v}` is not a number")))?),
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

//! What the benchmarks share: the value-tier enricher's logic in native Rust, and where the
//! plugin components built by `starling plugin build` are.

use starling_core::engine::{EnricherError, Occasion, Update};
use starling_core::model::EnricherRef;
use starling_core::{CustomEnrichers, Profile, Value};
use std::collections::BTreeMap;
use std::path::PathBuf;

/// The repository's root.
pub fn repo() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
}

/// The benchmark configuration (14 enrichments, 20 audiences, the value-tier Wasm enricher).
pub fn benchmark_model() -> starling_core::Model {
    let source = std::fs::read_to_string(repo().join("examples/benchmark.toml")).expect("examples/benchmark.toml");
    starling_core::parse(&source).expect("examples/benchmark.toml is valid")
}

/// A plugin's manifest as `starling plugin build` leaves it, or a message saying how to build it.
pub fn built_plugin(name: &str) -> PathBuf {
    let manifest = repo().join("target/plugins").join(name).join("plugin.toml");
    assert!(
        manifest.is_file(),
        "{} is missing: run `cargo run --release -p starling-cli -- plugin build` first",
        manifest.display()
    );
    manifest
}

/// connectors/value-tier in native Rust: the same configuration lookups, comparisons and result.
pub struct NativeValueTier {
    pub config: BTreeMap<String, String>,
}

impl NativeValueTier {
    fn threshold(&self, key: &str, default: f64) -> Result<f64, String> {
        match self.config.get(key) {
            None => Ok(default),
            Some(v) => v.trim().parse().map_err(|_| format!("configuration `{key}` = `{v}` is not a number")),
        }
    }
}

impl CustomEnrichers for NativeValueTier {
    fn enrich(&mut self, _: &EnricherRef, _: Occasion<'_>, profile: &Profile) -> Result<Vec<Update>, EnricherError> {
        let spend_attribute = self.config.get("spend_attribute").cloned().unwrap_or_else(|| "lifetime_spend".into());
        let tier_attribute = self.config.get("tier_attribute").cloned().unwrap_or_else(|| "value_tier".into());
        let silver = self.threshold("silver", 100.0).map_err(EnricherError::Answered)?;
        let gold = self.threshold("gold", 500.0).map_err(EnricherError::Answered)?;
        let Some(Value::Number(spend)) = profile.attributes.get(&spend_attribute) else {
            return Ok(Vec::new());
        };
        let tier = tier(*spend, silver, gold);
        if matches!(profile.attributes.get(&tier_attribute), Some(Value::String(t)) if t == tier) {
            return Ok(Vec::new());
        }
        Ok(vec![(tier_attribute, Some(Value::String(tier.into())))])
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

/// The same enricher as an Extism plugin (host/bench/extism-value-tier): event and profile go in
/// as JSON, updates come back as JSON, the way Extism hosts and plugins exchange data.
#[cfg(feature = "extism")]
pub struct ExtismValueTier {
    pub plugin: extism::Plugin,
}

#[cfg(feature = "extism")]
impl ExtismValueTier {
    pub fn load(config: &BTreeMap<String, String>) -> ExtismValueTier {
        let wasm = repo().join("target/guest/wasm32-unknown-unknown/release/extism_value_tier.wasm");
        assert!(wasm.is_file(), "{} is missing: run scripts/bench-enricher.sh", wasm.display());
        let manifest =
            extism::Manifest::new([extism::Wasm::data(std::fs::read(wasm).expect("reading the Extism plugin"))])
                .with_config(config.iter().map(|(k, v)| (k.clone(), v.clone())));
        ExtismValueTier { plugin: extism::Plugin::new(&manifest, [], false).expect("loading the Extism plugin") }
    }
}

#[cfg(feature = "extism")]
impl CustomEnrichers for ExtismValueTier {
    fn enrich(
        &mut self,
        enricher: &EnricherRef,
        occasion: Occasion<'_>,
        profile: &Profile,
    ) -> Result<Vec<Update>, EnricherError> {
        let Occasion::Event(event) = occasion else { return Ok(Vec::new()) };
        // The same view a Starling enricher gets: the attributes it reads, or all of them.
        let attributes: serde_json::Map<String, serde_json::Value> = match &enricher.reads {
            Some(names) => names.iter().filter_map(|n| profile.get(n).map(|v| (n.clone(), v.to_json()))).collect(),
            None => profile.attributes.iter().map(|(k, v)| (k.clone(), v.to_json())).collect(),
        };
        let input = serde_json::json!({
            "event": {
                "id": event.id, "name": event.name, "visitor_id": event.visitor_id,
                "timestamp_ms": event.timestamp_ms, "data": event.data,
            },
            "profile": {
                "id": profile.id, "attributes": attributes, "badges": profile.badges, "audiences": profile.audiences,
            },
        });
        let output = self
            .plugin
            .call::<String, &[u8]>("enrich", input.to_string())
            .map_err(|e| EnricherError::Call(e.to_string()))?;
        let updates: Vec<serde_json::Value> =
            serde_json::from_slice(output).map_err(|e| EnricherError::Unreadable(e.to_string()))?;
        updates
            .into_iter()
            .map(|u| {
                let unreadable = |what: &str| EnricherError::Unreadable(what.to_string());
                let name = u["name"].as_str().ok_or_else(|| unreadable("update without a name"))?.to_string();
                let value = u["value"].as_str().ok_or_else(|| unreadable("update without a text value"))?.to_string();
                Ok((name, Some(Value::String(value))))
            })
            .collect()
    }
}

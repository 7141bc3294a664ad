//! {{name}}: a Starling enricher. Sets a string attribute (configuration `attribute`, default
//! `last_event`) to the name of the latest event.

use starling_sdk::{
    AttributeUpdate, AttributeValue, EnrichError, Enricher, Event, ProfileView, config, export_enricher,
};

struct Plugin;

impl Enricher for Plugin {
    fn enrich(event: Event, profile: ProfileView) -> Result<Vec<AttributeUpdate>, EnrichError> {
        let attribute = config::get("attribute").unwrap_or_else(|| "last_event".into());
        if matches!(profile.attribute(&attribute), Some(AttributeValue::Text(t)) if *t == event.name) {
            return Ok(Vec::new());
        }
        Ok(vec![AttributeUpdate { name: attribute, value: Some(AttributeValue::Text(event.name)) }])
    }
}

export_enricher!(Plugin);

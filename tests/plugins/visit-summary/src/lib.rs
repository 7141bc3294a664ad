//! A test enricher run on visit ends: copies the visit's `pages` attribute (a visit-scoped number)
//! into `last_visit_pages`, and the visit's length and event count into `last_visit_minutes`
//! and `last_visit_events`. On events it does nothing; a visit end without pages is a bad input.

use starling_sdk::{AttributeUpdate, AttributeValue, EnrichError, Enricher, Event, ProfileView, export_enricher};

struct VisitSummary;

impl Enricher for VisitSummary {
    fn enrich(_event: Event, _profile: ProfileView) -> Result<Vec<AttributeUpdate>, EnrichError> {
        Ok(Vec::new())
    }

    fn visit_ended(at_ms: i64, profile: ProfileView) -> Result<Vec<AttributeUpdate>, EnrichError> {
        let pages = profile.number("pages").ok_or_else(|| EnrichError::BadInput("the visit has no pages".into()))?;
        let minutes = (at_ms - profile.visit.started_at_ms) as f64 / 60_000.0;
        let number = |name: &str, n: f64| AttributeUpdate { name: name.into(), value: Some(AttributeValue::Number(n)) };
        Ok(vec![
            number("last_visit_pages", pages),
            number("last_visit_minutes", minutes.round()),
            number("last_visit_events", f64::from(profile.visit.event_count)),
        ])
    }
}

export_enricher!(VisitSummary);

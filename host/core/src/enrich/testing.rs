//! Helpers for the families' tests: a configuration in, a profile or the errors out.

use crate::engine::{NoCustomEnrichers, apply_event};
use crate::event::Event;
use crate::profile::Profile;

/// The profile after events named `e` with these `data` objects, one second apart.
pub(super) fn run(config: &str, data: &[&str]) -> Profile {
    let model = crate::parse(config).unwrap_or_else(|e| panic!("{}", e.render("test.toml")));
    let mut profile = Profile::new("p");
    for (i, data) in data.iter().enumerate() {
        let event = Event {
            id: None,
            name: "e".into(),
            visitor_id: "p".into(),
            source: None,
            timestamp_ms: 1_700_000_000_000 + i as i64 * 1_000,
            data: serde_json::from_str(data).expect("test data is a JSON object"),
        };
        let outcome = apply_event(&model, &mut profile, &event, &mut NoCustomEnrichers);
        assert!(outcome.warnings.is_empty(), "{:?}", outcome.warnings);
    }
    profile
}

/// The errors in `config`, as `line:column: message`.
pub(super) fn errors(config: &str) -> Vec<String> {
    match crate::parse(config) {
        Ok(_) => Vec::new(),
        Err(e) => e.0.iter().map(ToString::to_string).collect(),
    }
}

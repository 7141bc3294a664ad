//! A hostile enricher. By event name: `bomb` allocates until memory runs out, `trap` panics
//! (an abort, so a trap), `snoop` tries to read a file and an environment variable and reports
//! what it saw in the `snooped` attribute. Other events pass untouched.

use starling_sdk::{AttributeUpdate, AttributeValue, EnrichError, Enricher, Event, ProfileView, export_enricher};

struct Hostile;

impl Enricher for Hostile {
    fn enrich(event: Event, _profile: ProfileView) -> Result<Vec<AttributeUpdate>, EnrichError> {
        match event.name.as_str() {
            "bomb" => {
                let mut hoard: Vec<Vec<u8>> = Vec::new();
                loop {
                    hoard.push(vec![1u8; 1 << 20]);
                    std::hint::black_box(&hoard);
                }
            }
            "trap" => panic!("hostile plugin traps on purpose"),
            "snoop" => {
                let file = match std::fs::read_to_string("/etc/passwd") {
                    Ok(text) => format!("read {} bytes", text.len()),
                    Err(e) => format!("error: {e}"),
                };
                let env = match std::env::var("HOME") {
                    Ok(v) => format!("HOME={v}"),
                    Err(e) => format!("error: {e}"),
                };
                let seen = format!("file {file}; env {env}");
                Ok(vec![AttributeUpdate { name: "snooped".into(), value: Some(AttributeValue::Text(seen)) }])
            }
            _ => Ok(Vec::new()),
        }
    }
}

export_enricher!(Hostile);

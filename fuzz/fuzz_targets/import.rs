//! Offline files: any bytes, read as CSV and as JSON lines for an import definition, give rows
//! that are each an event or a reason naming the problem (or the whole file is refused with a
//! message), never a panic; row numbers count up from the first.
#![no_main]

use libfuzzer_sys::fuzz_target;
use starling_core::model::{FieldType, ImportDef};

fn definition() -> ImportDef {
    ImportDef {
        name: "store".into(),
        event: "store_purchase".into(),
        matches: "email_hash".into(),
        key: "email_hash".into(),
        columns: vec![
            ("amount".into(), FieldType::Number),
            ("count".into(), FieldType::Integer),
            ("paid".into(), FieldType::Boolean),
            ("bought_at".into(), FieldType::Timestamp),
            ("items".into(), FieldType::Array),
            ("meta".into(), FieldType::Object),
            ("store".into(), FieldType::String),
        ],
        timestamp: Some("bought_at".into()),
    }
}

fuzz_target!(|body: &[u8]| {
    let def = definition();
    let now = 1_800_000_000_000;
    let sha = "ab".repeat(32);
    for rows in [starling_core::import::csv_rows(&def, body, 1), starling_core::import::jsonl_rows(&def, body, 1)] {
        let Ok(rows) = rows else { continue };
        let mut expected = 1;
        for row in rows {
            assert_eq!(row.number, expected, "rows are numbered in order");
            expected += 1;
            if let Ok(event) = row.fields.and_then(|f| starling_core::import::to_event(&def, &sha, row.number, f, now)) {
                assert!(!event.visitor_id.is_empty());
                assert!(event.timestamp_ms <= now, "a row is never dated after its import");
            }
        }
    }
});

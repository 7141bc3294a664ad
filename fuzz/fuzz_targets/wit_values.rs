//! Values crossing into and out of plugins: any JSON read as an attribute of each type becomes
//! a WIT value and comes back the same; any event and profile convert to their WIT views.
#![no_main]

use libfuzzer_sys::fuzz_target;
use starling_core::value::AttrType;
use starling_runtime::convert;

fuzz_target!(|body: &[u8]| {
    let Ok(json) = serde_json::from_slice::<serde_json::Value>(body) else { return };
    for ty in AttrType::ALL {
        let Ok(value) = ty.read_json(&json) else { continue };
        let back = convert::value_from_wit(convert::value_to_wit(&value));
        assert_eq!(back.as_ref(), Ok(&value), "{} {json}", ty.name());
    }
    if let serde_json::Value::Object(data) = &json {
        let event = starling_core::Event {
            id: None,
            name: "e".into(),
            visitor_id: "v".into(),
            source: None,
            timestamp_ms: 0,
            data: data.clone(),
        };
        let _ = convert::event_to_wit(&event);
    }
    if let Ok(profile) = serde_json::from_value::<starling_core::Profile>(json) {
        let _ = convert::profile_to_wit(&profile, None);
    }
});

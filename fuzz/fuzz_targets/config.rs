//! The configuration parser: any text is either a model or errors with positions, never a panic,
//! and every error's position lies inside the text.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    if let Err(errors) = starling_core::parse(text) {
        let lines = text.split('\n').count();
        for e in &errors.0 {
            assert!(e.line <= lines.max(1), "{e:?} past the last line ({lines})");
        }
    }
});

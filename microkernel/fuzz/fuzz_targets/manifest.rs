//! Arbitrary manifest text: parsing and validation return diagnostics, never panic, and every
//! diagnostic points inside the text.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use microkernel::manifest::Manifest;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    match Manifest::parse(Path::new("fuzz.toml"), text) {
        Ok(m) => assert!(!m.services.is_empty()),
        Err(e) => {
            let lines = text.lines().count().max(1);
            for d in e.diagnostics() {
                assert!(d.line >= 1 && d.line <= lines + 1, "{d:?}");
            }
        }
    }
});

//! The log redaction helpers run inside the server's error path: they must never panic, and
//! must never let a generated key through.
#![no_main]
use cellcrypt_core::redact::{mask_generated_keys, redact_quoted};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let masked = mask_generated_keys(text);
    assert!(!masked.to_ascii_lowercase().contains("cck1-") || masked.contains("CCK1-<redacted>"));
    let _ = redact_quoted(text);
    let _ = redact_quoted(&masked);
});

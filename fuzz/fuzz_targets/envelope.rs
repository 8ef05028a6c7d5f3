//! The envelope parser and the text form: any input is either refused or parsed consistently.
#![no_main]
use cellcrypt_core::envelope::{self, Envelope};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(env) = Envelope::parse(data) {
        let overhead = if env.version() == cellcrypt_core::FORMAT_V1 { envelope::OVERHEAD_V1 } else { cellcrypt_core::OVERHEAD };
        assert_eq!(env.plaintext_len() + overhead, data.len());
        assert_eq!(env.ciphertext().len(), env.plaintext_len());
        assert_eq!(env.as_bytes(), data);
        // the text form round-trips
        let text = envelope::encode_text(data);
        assert_eq!(envelope::decode_text(text.as_bytes()).unwrap().unwrap(), data);
    }
    // the text grammar never panics, and what it accepts parses as an envelope
    if let Ok(Some(bytes)) = envelope::decode_text(data) {
        assert!(Envelope::parse(&bytes).is_ok());
    }
});

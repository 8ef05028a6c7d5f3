//! The administrator's key parser (generated-key checksum, passphrase rules): never panics,
//! and whatever it accepts is stable under parsing its own canonical text.
#![no_main]
use cellcrypt_core::AdminKey;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(key) = AdminKey::parse(text) {
        let again = AdminKey::parse(key.as_str()).expect("a key's canonical text parses");
        assert_eq!(again.as_str(), key.as_str());
        assert_eq!(again.is_generated(), key.is_generated());
    }
});

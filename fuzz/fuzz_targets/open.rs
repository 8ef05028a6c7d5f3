//! Decryption: random bytes, and every mutation of a valid envelope, are refused with an error,
//! never opened to wrong plaintext, never a panic.
#![no_main]
use cellcrypt_core::{Keyring, NonceSource, OpenError, SecretKey};
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;

fn fixture() -> &'static (Keyring, Vec<u8>) {
    static F: OnceLock<(Keyring, Vec<u8>)> = OnceLock::new();
    F.get_or_init(|| {
        let mut ring = Keyring::new();
        ring.insert(1, &SecretKey::from_bytes([7; 32]), true);
        let env = ring.current().unwrap().seal(&mut NonceSource::from_os(), b"text;UTF8", b"a secret value");
        (ring, env)
    })
}

fuzz_target!(|data: &[u8]| {
    let (ring, valid) = fixture();
    // raw input as an envelope
    match ring.open(data, b"text;UTF8") {
        Ok(plain) => assert!(data == valid.as_slice() && plain == b"a secret value"),
        Err(OpenError::Malformed(_) | OpenError::UnknownKeyId(_) | OpenError::Failed(_)) => {}
    }
    // the input as a list of (position, xor) edits to the valid envelope
    let mut mutated = valid.clone();
    for pair in data.chunks(2) {
        if let [pos, x] = pair {
            let i = *pos as usize % mutated.len();
            mutated[i] ^= *x;
        }
    }
    if data.len() % 7 == 3 {
        mutated.truncate(data.len() % mutated.len());
    }
    match ring.open(&mutated, b"text;UTF8") {
        Ok(plain) => assert!(mutated == *valid && plain == b"a secret value"),
        Err(_) => assert!(mutated != *valid),
    }
});

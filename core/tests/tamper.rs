//! Tampering and round-trip properties of sealed envelopes.

use cellcrypt_core::{envelope, Keyring, NonceSource, OpenError, SecretKey};
use proptest::prelude::*;

fn ring() -> Keyring {
    let mut k = Keyring::new();
    k.insert(1, &SecretKey::from_bytes([0x11; 32]), false);
    k.insert(2, &SecretKey::from_bytes([0x22; 32]), true);
    k
}

#[test]
fn every_single_bit_flip_fails() {
    let k = ring();
    let mut n = NonceSource::from_os();
    let mut flips = 0;
    for pt in [&b""[..], b"x", b"a secret mailbox password", &[0u8; 300][..]] {
        let env = k.current().unwrap().seal(&mut n, b"text", pt);
        assert_eq!(k.open(&env, b"text").unwrap(), pt);
        for bit in 0..env.len() * 8 {
            let mut t = env.clone();
            t[bit / 8] ^= 1 << (bit % 8);
            let r = k.open(&t, b"text");
            assert!(r.is_err(), "flipping bit {bit} of a {}-byte envelope was accepted", env.len());
            // The region decides the error: version byte → malformed, key id → unknown key or
            // failure, everything else → the opaque failure.
            match bit / 8 {
                0 => assert!(matches!(r, Err(OpenError::Malformed(_)))),
                1..=4 => assert!(matches!(r, Err(OpenError::UnknownKeyId(_)) | Err(OpenError::Failed(_)))),
                _ => assert!(matches!(r, Err(OpenError::Failed(_)))),
            }
            flips += 1;
        }
    }
    println!("single-bit flips rejected: {flips}");
}

#[test]
fn truncation_and_extension_fail() {
    let k = ring();
    let mut n = NonceSource::from_os();
    let env = k.current().unwrap().seal(&mut n, b"", b"0123456789");
    for len in 0..env.len() {
        assert!(k.open(&env[..len], b"").is_err(), "truncated to {len} accepted");
    }
    let mut longer = env.clone();
    longer.push(0);
    assert!(k.open(&longer, b"").is_err());
}

#[test]
fn swapped_key_id_fails() {
    let k = ring();
    let mut n = NonceSource::from_os();
    let mut env = k.current().unwrap().seal(&mut n, b"", b"value");
    env[1..5].copy_from_slice(&1u32.to_be_bytes());
    assert!(matches!(k.open(&env, b""), Err(OpenError::Failed(_))));
}

proptest! {
    #[test]
    fn round_trip(pt in proptest::collection::vec(any::<u8>(), 0..4096), ctx in proptest::collection::vec(any::<u8>(), 0..64)) {
        let k = ring();
        let mut n = NonceSource::from_os();
        let env = k.current().unwrap().seal(&mut n, &ctx, &pt);
        prop_assert_eq!(env.len(), envelope::sealed_len(pt.len()));
        prop_assert_eq!(k.open(&env, &ctx).unwrap(), pt.clone());
        let text = envelope::encode_text(&env);
        prop_assert_eq!(envelope::decode_text(text.as_bytes()).unwrap(), Some(env.clone()));
        let mut other = ctx.clone();
        other.push(0);
        prop_assert!(k.open(&env, &other).is_err());
    }
}

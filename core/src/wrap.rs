//! Wrapping an older key version's data key under the current key, for the length of a key
//! change.
//!
//! During a change from version `n` to `n+1`, cells sealed under `n` must stay readable until
//! re-encryption has moved them all, yet key providers hold only the current key. So the
//! database keeps, next to version `n`'s fingerprint, its data key sealed with AES-256-GCM under
//! version `n+1`'s wrap key (an HKDF sub-key of the new master key). The wrapped key is useless
//! without the current key, and it is dropped once no cell needs it.
//!
//! Format: an ordinary v1 envelope whose key id is the *wrapping* version, with the AAD context
//! `pg_cellcrypt keywrap;<wrapped version>`, so a wrapped key cannot be moved to another version.

use crate::cipher::DataCipher;
use crate::error::DecryptionFailed;
use crate::envelope::Envelope;
use crate::nonce::NonceSource;
use crate::secret::SecretKey;
use zeroize::Zeroizing;

/// What a wrapped key is: an older data key version, or a blind-index key version.
#[derive(Clone, Copy)]
enum Wrapped {
    Data(u32),
    Index(u32),
}

fn context(what: Wrapped) -> Vec<u8> {
    match what {
        Wrapped::Data(v) => format!("pg_cellcrypt keywrap;{v}").into_bytes(),
        Wrapped::Index(v) => format!("pg_cellcrypt keywrap;index;{v}").into_bytes(),
    }
}

fn wrap(wrap_key: &SecretKey, wrapping_version: u32, what: Wrapped, key: &SecretKey) -> Vec<u8> {
    let cipher = DataCipher::new(wrapping_version, wrap_key);
    let mut nonces = NonceSource::from_os();
    cipher.seal(&mut nonces, &context(what), key.expose())
}

fn unwrap(wrap_key: &SecretKey, wrapping_version: u32, what: Wrapped, wrapped: &[u8]) -> Result<SecretKey, DecryptionFailed> {
    let env = Envelope::parse(wrapped).map_err(|_| DecryptionFailed)?;
    if env.key_id() != wrapping_version || env.plaintext_len() != SecretKey::LEN {
        return Err(DecryptionFailed);
    }
    let cipher = DataCipher::new(wrapping_version, wrap_key);
    let mut out = Zeroizing::new([0u8; 32]);
    cipher.open_into(&env, &context(what), &mut out[..])?;
    Ok(SecretKey::from_bytes(*out))
}

/// Seals `data_key` (of `wrapped_version`) under `wrap_key` (of `wrapping_version`).
pub fn wrap_data_key(wrap_key: &SecretKey, wrapping_version: u32, wrapped_version: u32, data_key: &SecretKey) -> Vec<u8> {
    wrap(wrap_key, wrapping_version, Wrapped::Data(wrapped_version), data_key)
}

/// Opens a wrapped data key. Fails (opaquely) on a wrong wrap key, a wrong version or tampering.
pub fn unwrap_data_key(wrap_key: &SecretKey, wrapping_version: u32, wrapped_version: u32, wrapped: &[u8]) -> Result<SecretKey, DecryptionFailed> {
    unwrap(wrap_key, wrapping_version, Wrapped::Data(wrapped_version), wrapped)
}

/// Seals blind-index key `index_version` under the data key version `wrapping_version`'s wrap key.
/// The index key is random and independent of the data key, so a data key change only
/// re-wraps it and blind indexes stay valid.
pub fn wrap_index_key(wrap_key: &SecretKey, wrapping_version: u32, index_version: u32, index_key: &SecretKey) -> Vec<u8> {
    wrap(wrap_key, wrapping_version, Wrapped::Index(index_version), index_key)
}

/// Opens a wrapped blind-index key.
pub fn unwrap_index_key(wrap_key: &SecretKey, wrapping_version: u32, index_version: u32, wrapped: &[u8]) -> Result<SecretKey, DecryptionFailed> {
    unwrap(wrap_key, wrapping_version, Wrapped::Index(index_version), wrapped)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wraps_and_refuses_the_wrong_key_version_or_bytes() {
        let wrap = SecretKey::random();
        let data = SecretKey::random();
        let w = wrap_data_key(&wrap, 2, 1, &data);
        assert_eq!(unwrap_data_key(&wrap, 2, 1, &w).unwrap().expose(), data.expose());
        assert!(unwrap_data_key(&SecretKey::random(), 2, 1, &w).is_err());
        assert!(unwrap_data_key(&wrap, 3, 1, &w).is_err());
        assert!(unwrap_data_key(&wrap, 2, 7, &w).is_err());
        let mut t = w.clone();
        *t.last_mut().unwrap() ^= 1;
        assert!(unwrap_data_key(&wrap, 2, 1, &t).is_err());
        assert!(unwrap_data_key(&wrap, 2, 1, &w[..10]).is_err());
        // a wrapped data key is not a wrapped index key, and the other way round
        assert!(unwrap_index_key(&wrap, 2, 1, &w).is_err());
        let wi = wrap_index_key(&wrap, 2, 1, &data);
        assert_eq!(unwrap_index_key(&wrap, 2, 1, &wi).unwrap().expose(), data.expose());
        assert!(unwrap_data_key(&wrap, 2, 1, &wi).is_err());
    }
}

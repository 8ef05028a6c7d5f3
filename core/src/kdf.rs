//! From an administrator's key string to key material.
//!
//! ```text
//! generated key (CCK1-..., 256 random bits):
//!   master    = HKDF-SHA256(salt, ikm = the key's 32 bytes, info = "pg_cellcrypt v2 master key")
//! passphrase (default build only):
//!   master    = Argon2id(passphrase, salt, params) -> 32 bytes
//! data key    = HKDF-SHA256-Expand(master, "pg_cellcrypt v1 data key")
//! wrap key    = HKDF-SHA256-Expand(master, "pg_cellcrypt v1 key wrap key")
//! fingerprint = HKDF-SHA256-Expand(master, "pg_cellcrypt v1 fingerprint")[..16]
//! ```
//! A passphrase goes through Argon2id, which is memory-hard: a stolen fingerprint and salt cost
//! an attacker one Argon2id run per guess. A generated key has full entropy (256 bits from the
//! DRBG), so stretching it buys nothing; from 0.2.0 its key versions are derived with HKDF
//! ([`KdfParams::HKDF`], stored as zero costs), an approved KDF (SP 800-56C), which is what lets
//! a FIPS build use them. Key versions made before with Argon2id keep their parameters and are
//! derived as they were made. The salt is random per database (and per key version), stored in
//! the database next to the fingerprint: both are public.
//!
//! A FIPS build runs only approved algorithms: it refuses passphrases (there is no approved
//! password-based KDF as strong as Argon2id, and SP 800-132's PBKDF2 is not a fit for keys an
//! attacker can test offline against the stored fingerprint) and key versions derived with
//! Argon2id; see the README's FIPS section for moving a database to a generated key.

use crate::admin_key::AdminKey;
use crate::secret::SecretKey;
use argon2::{Algorithm, Argon2, Params, Version};
use aws_lc_rs::hkdf::{KeyType, Prk, Salt, HKDF_SHA256};
use std::fmt;
use zeroize::Zeroizing;

pub const SALT_LEN: usize = 16;
pub const FINGERPRINT_LEN: usize = 16;

/// The weakest Argon2id parameters a new key version may be derived with: OWASP's minimum for
/// Argon2id (19 MiB, 2 passes, 1 lane). Settings cannot go below it; key versions already
/// stored keep the parameters they were made with.
pub const KDF_FLOOR: KdfParams = KdfParams { m_cost_kib: 19 * 1024, t_cost: 2, p_cost: 1 };

/// Argon2id cost parameters. Stored with each key version so a key can be verified later with
/// the parameters it was derived with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KdfParams {
    pub m_cost_kib: u32,
    pub t_cost: u32,
    pub p_cost: u32,
}

impl KdfParams {
    /// The parameters stored for a key version derived with HKDF from a generated key: all
    /// costs zero (Argon2id refuses them, so no Argon2id version can have them).
    pub const HKDF: KdfParams = KdfParams { m_cost_kib: 0, t_cost: 0, p_cost: 0 };

    pub fn is_hkdf(&self) -> bool {
        *self == Self::HKDF
    }

    /// The largest Argon2id costs a stored key version may ask for: 4 GiB, 64 passes, 16 lanes.
    pub const CAP: KdfParams = KdfParams { m_cost_kib: 4 * 1024 * 1024, t_cost: 64, p_cost: 16 };

    /// The smallest Argon2id costs a stored key version may have: 0.1.0's floor. Pinned on
    /// purpose, apart from [`KDF_FLOOR`] (what new versions get): raising the floor for new
    /// versions must never make a stored version underivable. Never raise this one.
    pub const STORED_MIN: KdfParams = KdfParams { m_cost_kib: 19 * 1024, t_cost: 2, p_cost: 1 };

    /// Refuses parameters no key version of this extension was made with: anything but
    /// [`KdfParams::HKDF`] or Argon2id costs between [`KdfParams::STORED_MIN`] and
    /// [`KdfParams::CAP`]. A
    /// keyring row comes from a dump a restore accepted: costs below the floor would make the
    /// fingerprint the load reports a cheap guessing target, and huge ones exhaust memory.
    pub fn check_stored(&self) -> Result<(), KdfError> {
        let within = |v: u32, lo: u32, hi: u32| (lo..=hi).contains(&v);
        if self.is_hkdf()
            || (within(self.m_cost_kib, Self::STORED_MIN.m_cost_kib, Self::CAP.m_cost_kib)
                && within(self.t_cost, Self::STORED_MIN.t_cost, Self::CAP.t_cost)
                && within(self.p_cost, Self::STORED_MIN.p_cost, Self::CAP.p_cost))
        {
            Ok(())
        } else {
            Err(KdfError(format!(
                "the stored key derivation parameters ({} KiB, {} passes, {} lanes) are out of range: the keyring row is damaged or forged",
                self.m_cost_kib, self.t_cost, self.p_cost
            )))
        }
    }

    /// What a new key version of `key` is derived with: HKDF for a generated key, else
    /// Argon2id with `argon2` (the settings).
    pub fn for_new_version(key: &AdminKey, argon2: KdfParams) -> KdfParams {
        if key.is_generated() {
            Self::HKDF
        } else {
            argon2
        }
    }
}

impl Default for KdfParams {
    /// OWASP's recommended Argon2id setting: 19 MiB, 2 passes, 1 lane.
    fn default() -> Self {
        KdfParams { m_cost_kib: 19 * 1024, t_cost: 2, p_cost: 1 }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KdfError(pub String);

impl fmt::Display for KdfError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid key derivation parameters: {}", self.0)
    }
}
impl std::error::Error for KdfError {}

/// A fresh random salt.
pub fn new_salt() -> [u8; SALT_LEN] {
    let mut s = [0u8; SALT_LEN];
    crate::nonce::random_fill(&mut s);
    s
}

/// An HKDF output length.
pub(crate) struct Len(pub(crate) usize);

impl KeyType for Len {
    fn len(&self) -> usize {
        self.0
    }
}

/// The 256-bit master key of one key version. Zeroized on drop, no `Debug`.
pub struct MasterKey(SecretKey);

impl MasterKey {
    /// The master key of `key` for a key version with `salt` and `params`: HKDF for
    /// [`KdfParams::HKDF`] (a generated key only), else Argon2id over the key's canonical text
    /// (not in a FIPS build).
    pub fn derive(key: &AdminKey, salt: &[u8], params: &KdfParams) -> Result<Self, KdfError> {
        params.check_stored()?;
        if params.is_hkdf() {
            return Self::derive_hkdf(key, salt);
        }
        if crate::fips::ENABLED {
            return Err(KdfError(
                "this key version was derived with Argon2id, which a FIPS build does not run (only approved algorithms run in FIPS mode)".into(),
            ));
        }
        let p = Params::new(params.m_cost_kib, params.t_cost, params.p_cost, Some(SecretKey::LEN))
            .map_err(|e| KdfError(e.to_string()))?;
        let argon = Argon2::new(Algorithm::Argon2id, Version::V0x13, p);
        let mut out = Zeroizing::new([0u8; 32]);
        argon
            .hash_password_into(key.as_str().as_bytes(), salt, &mut out[..])
            .map_err(|e| KdfError(e.to_string()))?;
        Ok(MasterKey(SecretKey::from_bytes(*out)))
    }

    fn derive_hkdf(key: &AdminKey, salt: &[u8]) -> Result<Self, KdfError> {
        let bytes = key.key_bytes().ok_or_else(|| {
            KdfError("this key version takes a generated key (from generate_data_encryption_key()), and this is a passphrase".into())
        })?;
        if salt.is_empty() {
            return Err(KdfError("empty salt".into()));
        }
        let mut out = Zeroizing::new([0u8; 32]);
        Salt::new(HKDF_SHA256, salt)
            .extract(&bytes[..])
            .expand(&[b"pg_cellcrypt v2 master key"], Len(32))
            .and_then(|okm| okm.fill(&mut out[..]))
            .expect("32 bytes is a valid HKDF-SHA256 output length");
        Ok(MasterKey(SecretKey::from_bytes(*out)))
    }

    /// Rebuilds a master key from its 32 bytes (as a process-shared key cache holds them).
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        MasterKey(SecretKey::from_bytes(bytes))
    }

    /// The raw 32 bytes, for a process-shared key cache. Never log or store them.
    pub fn expose(&self) -> &[u8; 32] {
        self.0.expose()
    }

    /// HKDF-SHA256-Expand with the master key as the pseudorandom key (aws-lc-rs keeps its
    /// copy of the PRK in a buffer it zeroizes on drop).
    fn expand(&self, info: &[u8], out: &mut [u8]) {
        let prk = Prk::new_less_safe(HKDF_SHA256, self.0.expose());
        prk.expand(&[info], Len(out.len()))
            .and_then(|okm| okm.fill(out))
            .expect("HKDF output length is within limits");
    }

    /// The key that seals cell values.
    pub fn data_key(&self) -> SecretKey {
        let mut k = Zeroizing::new([0u8; 32]);
        self.expand(b"pg_cellcrypt v1 data key", &mut k[..]);
        SecretKey::from_bytes(*k)
    }

    /// The key that wraps older versions' data keys during a key change (see [`crate::wrap`]).
    pub fn wrap_key(&self) -> SecretKey {
        let mut k = Zeroizing::new([0u8; 32]);
        self.expand(b"pg_cellcrypt v1 key wrap key", &mut k[..]);
        SecretKey::from_bytes(*k)
    }

    /// The public identifier of this key.
    pub fn fingerprint(&self) -> Fingerprint {
        let mut f = [0u8; FINGERPRINT_LEN];
        self.expand(b"pg_cellcrypt v1 fingerprint", &mut f);
        Fingerprint(f)
    }

    /// The keys one version gives the processes that use it (see [`VersionKeys`]).
    pub fn version_keys(&self) -> VersionKeys {
        VersionKeys { fingerprint: self.fingerprint(), data: self.data_key(), wrap: self.wrap_key() }
    }
}

/// What a key version gives the processes that use it: the data key that seals values and the
/// wrap key that older versions' data keys and the blind-index key are wrapped under. Both are
/// derived from the master key, which is then dropped: backends and the shared key cache keep
/// these, never the master key or the administrator's key text. No `Debug`, no `Clone`.
pub struct VersionKeys {
    pub fingerprint: Fingerprint,
    pub data: SecretKey,
    pub wrap: SecretKey,
}

impl VersionKeys {
    /// A second copy (zeroized on drop like the first).
    pub fn duplicate(&self) -> VersionKeys {
        VersionKeys { fingerprint: self.fingerprint, data: SecretKey::from_bytes(*self.data.expose()), wrap: SecretKey::from_bytes(*self.wrap.expose()) }
    }
}

/// A public identifier of a key: safe to store, show and log. Displayed as 32 lowercase hex
/// digits in four groups, e.g. `3f2a91bc-0d1e6f77-a4b2c3d4-e5f60718`.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Fingerprint(pub [u8; FINGERPRINT_LEN]);

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, b) in self.0.iter().enumerate() {
            if i > 0 && i % 4 == 0 {
                f.write_str("-")?;
            }
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl std::str::FromStr for Fingerprint {
    type Err = ();
    fn from_str(s: &str) -> Result<Self, ()> {
        let hex: Vec<u8> = s.bytes().filter(|&c| c != b'-').collect();
        if hex.len() != FINGERPRINT_LEN * 2 {
            return Err(());
        }
        let mut out = [0u8; FINGERPRINT_LEN];
        for (i, pair) in hex.chunks(2).enumerate() {
            let hi = (pair[0] as char).to_digit(16).ok_or(())?;
            let lo = (pair[1] as char).to_digit(16).ok_or(())?;
            out[i] = (hi * 16 + lo) as u8;
        }
        Ok(Fingerprint(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fast() -> KdfParams {
        KDF_FLOOR
    }

    #[test]
    #[cfg(not(feature = "fips"))] // passphrases and Argon2id do not run in a FIPS build
    fn same_key_same_salt_same_fingerprint() {
        let k = AdminKey::generate();
        let spelled = AdminKey::parse(&k.as_str().to_lowercase()).unwrap();
        let salt = new_salt();
        let a = MasterKey::derive(&k, &salt, &fast()).unwrap();
        let b = MasterKey::derive(&spelled, &salt, &fast()).unwrap();
        assert_eq!(a.fingerprint(), b.fingerprint());
        assert_eq!(a.data_key().expose(), b.data_key().expose());
        assert_ne!(a.data_key().expose(), a.wrap_key().expose());
        assert_eq!(MasterKey::from_bytes(*a.expose()).fingerprint(), a.fingerprint());
        let fp = a.fingerprint().to_string();
        assert_eq!(fp.len(), 35);
        assert_eq!(fp.parse::<Fingerprint>().unwrap(), a.fingerprint());
    }

    /// The sub-keys of a fixed master key against HKDF-SHA256-Expand computed by another
    /// implementation (Python's hmac: T(1) = HMAC(master, info || 0x01)). Stored fingerprints
    /// and every key derived from a master key depend on these bytes.
    #[test]
    fn sub_keys_known_answers() {
        let hex = |b: &[u8]| b.iter().map(|b| format!("{b:02x}")).collect::<String>();
        let mut bytes = [0u8; 32];
        for (i, b) in bytes.iter_mut().enumerate() {
            *b = i as u8 + 1;
        }
        let m = MasterKey::from_bytes(bytes);
        assert_eq!(hex(m.data_key().expose()), "f671199861ff044cfc4b45dd4962b86583883b2b94558d4ba6c47109e9370364");
        assert_eq!(hex(m.wrap_key().expose()), "77f7920829d1b19fe170f72972ed05d11ed771245e3684da789c3e9a7852a6ca");
        assert_eq!(hex(&m.fingerprint().0), "23146036d276604af6377c96e286c7cf");
    }

    #[test]
    #[cfg(not(feature = "fips"))] // passphrases and Argon2id do not run in a FIPS build
    fn other_salt_or_key_other_fingerprint() {
        let k = AdminKey::generate();
        let a = MasterKey::derive(&k, &new_salt(), &fast()).unwrap();
        let b = MasterKey::derive(&k, &new_salt(), &fast()).unwrap();
        assert_ne!(a.fingerprint(), b.fingerprint());
        let c = MasterKey::derive(&AdminKey::generate(), &[1; 16], &fast()).unwrap();
        let d = MasterKey::derive(&AdminKey::generate(), &[1; 16], &fast()).unwrap();
        assert_ne!(c.fingerprint(), d.fingerprint());
    }

    /// A generated key's version from 0.2.0: HKDF-SHA256 (RFC 5869) from the key's 32 bytes,
    /// against Python's hmac. A passphrase cannot be derived so, and a FIPS build derives no
    /// Argon2id version.
    #[test]
    fn generated_keys_derive_with_hkdf() {
        let key = AdminKey::from_key_bytes_for_tests([7; 32]);
        let salt: Vec<u8> = (0u8..16).collect();
        let params = KdfParams::for_new_version(&key, KdfParams::default());
        assert!(params.is_hkdf());
        let m = MasterKey::derive(&key, &salt, &params).unwrap();
        assert_eq!(hex::encode(m.expose()), "8712374260cc458b4e040ad080693e6eb144bf63aa9cacc5d30e4ae29a6e4fdb");
        assert!(MasterKey::derive(&key, &[], &params).is_err());
        if !crate::fips::ENABLED {
            let pass = AdminKey::parse("correct horse battery staple violet 1987 umbrella").unwrap();
            assert!(!KdfParams::for_new_version(&pass, KdfParams::default()).is_hkdf());
            let e = MasterKey::derive(&pass, &salt, &KdfParams::HKDF).err().unwrap();
            assert!(e.0.contains("takes a generated key"), "{}", e.0);
            // The same generated key under Argon2id has another master key.
            assert_ne!(MasterKey::derive(&key, &salt, &fast()).unwrap().expose(), m.expose());
        } else {
            assert!(MasterKey::derive(&key, &salt, &fast()).err().unwrap().0.contains("Argon2id"));
            assert_eq!(AdminKey::parse("correct horse battery staple violet 1987 umbrella").err(), Some(crate::AdminKeyError::PassphraseInFipsMode));
        }
    }

    #[test]
    fn stored_parameters_are_checked_at_their_bounds() {
        let p = |m, t, l| KdfParams { m_cost_kib: m, t_cost: t, p_cost: l };
        for ok in [KdfParams::HKDF, KdfParams::STORED_MIN, KDF_FLOOR, KdfParams::CAP, p(19 * 1024, 64, 16), p(4 * 1024 * 1024, 2, 1)] {
            assert!(ok.check_stored().is_ok(), "{ok:?}");
        }
        for bad in [
            p(19 * 1024 - 1, 2, 1),
            p(19 * 1024, 1, 1),
            p(19 * 1024, 2, 0),
            p(4 * 1024 * 1024 + 1, 2, 1),
            p(19 * 1024, 65, 1),
            p(19 * 1024, 2, 17),
            p(0, 0, 1),
            p(0, 2, 0),
            p(u32::MAX, 2, 1),
        ] {
            let e = bad.check_stored().unwrap_err();
            assert!(e.0.contains("out of range"), "{bad:?}: {}", e.0);
            let key = AdminKey::from_key_bytes_for_tests([1; 32]);
            assert!(MasterKey::derive(&key, &[1; 16], &bad).is_err(), "derived with {bad:?}");
        }
        // The stored minimum never rises with the floor for new versions.
        assert!(KdfParams::STORED_MIN.m_cost_kib <= KDF_FLOOR.m_cost_kib && KdfParams::STORED_MIN.t_cost <= KDF_FLOOR.t_cost);
    }
}

//! # cellcrypt-core
//!
//! The crypto core of pg_cellcrypt. It has no PostgreSQL dependency, so it can be unit-tested,
//! fuzzed and benchmarked alone. The extension (`pg_cellcrypt`) is a thin layer over it.
//!
//! | module | concern |
//! |---|---|
//! | [`envelope`] | the versioned, self-describing ciphertext format and its text form |
//! | [`cipher`] | AES-256-GCM sealing and opening of one value under an HKDF-derived value key; a keyring of cached ciphers |
//! | [`nonce`] | the 192-bit nonces, from AWS-LC's DRBG in 4 KiB draws (fork-safe); every key and salt |
//! | [`fips`] | which AWS-LC this build links (the FIPS module or not), FIPS mode, the self-tests `_PG_init` runs |
//! | [`admin_key`] | the administrator's key string: the copy-safe generated format and passphrase rules |
//! | [`blind`] | blind indexes: HMAC-SHA256 of a normalized plaintext under an independent index key |
//! | [`kdf`] | HKDF (generated keys) or Argon2id (passphrases) from an admin key to a master key; HKDF sub-keys; the public fingerprint |
//! | [`wrap`] | sealing an older version's data key under the current key during a key change |
//! | [`redact`] | masking keys and quoted strings in log messages (used by the extension's log hook) |
//! | [`secret`] | [`SecretKey`]: 256-bit key material, zeroized on drop, no `Debug` |
//! | [`error`] | the error types; every decryption failure is the one opaque [`DecryptionFailed`] |
//!
//! ## No usage limit per key
//! NIST SP 800-38D allows at most 2^32 encryptions under one AES-GCM key with random 96-bit
//! nonces. Values are therefore not sealed under the data key itself but under value keys
//! derived from it and from 96 of the value's 192 random nonce bits (envelope format version 2,
//! see [`envelope`] and [`cipher`]); a process seals at most 2^16 values under one value key
//! before it draws a new salt. The data key can seal any number of values, and no count has to
//! be kept across backends. Values of format version 1 (sealed under the data key itself,
//! by development builds before 0.1.0) are still opened; re-encryption and updates rewrite them in version 2.

#![deny(unsafe_code)]

pub mod admin_key;
pub mod blind;
pub mod cipher;
pub mod envelope;
pub mod error;
pub mod fips;
pub mod kdf;
pub mod nonce;
pub mod redact;
pub mod secret;
pub mod wrap;

pub use admin_key::AdminKey;
pub use cipher::{DataCipher, Keyring, OpenError};
pub use envelope::{Envelope, FORMAT_V1, FORMAT_V2, OVERHEAD};
pub use error::{AdminKeyError, DecryptionFailed, EnvelopeError};
pub use kdf::{Fingerprint, KdfParams, MasterKey, VersionKeys};
pub use nonce::NonceSource;
pub use secret::SecretKey;

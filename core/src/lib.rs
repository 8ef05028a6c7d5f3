//! # cellcrypt-core
//!
//! The crypto core of pg_cellcrypt. It has no PostgreSQL dependency, so it can be unit-tested,
//! fuzzed and benchmarked alone. The extension (`pg_cellcrypt`) is a thin layer over it.
//!
//! | module | concern |
//! |---|---|
//! | [`envelope`] | the versioned, self-describing ciphertext format and its text form |
//! | [`cipher`] | AES-256-GCM sealing and opening of one value; a keyring of cached ciphers |
//! | [`nonce`] | the per-process CSPRNG that draws 96-bit nonces (fork-safe, no syscall per value) |
//! | [`admin_key`] | the administrator's key string: the copy-safe generated format and passphrase rules |
//! | [`blind`] | blind indexes: HMAC-SHA256 of a normalized plaintext under an independent index key |
//! | [`kdf`] | Argon2id from an admin key to a master key; HKDF sub-keys; the public fingerprint |
//! | [`wrap`] | sealing an older version's data key under the current key during a key change |
//! | [`redact`] | masking keys and quoted strings in log messages (used by the extension's log hook) |
//! | [`secret`] | [`SecretKey`]: 256-bit key material, zeroized on drop, no `Debug` |
//! | [`error`] | the error types; every decryption failure is the one opaque [`DecryptionFailed`] |
//!
//! ## The 2^32 limit of random GCM nonces
//! NIST SP 800-38D allows at most 2^32 encryptions under one key with random 96-bit nonces
//! (collision probability then below 2^-32). The plan, in three parts:
//! 1. every [`DataCipher`] counts the values it seals ([`DataCipher::sealed_count`]);
//! 2. the extension's key management adds these counts up per key version across backends and
//!    shows them in its status, warning from 2^31 seals on and recommending a key change;
//! 3. a key change re-encrypts every cell under a fresh key (a new key id), which starts a new
//!    budget. Yearly key changes, as the product recommends, keep any realistic database far
//!    below the limit (2^32 is 136 inserts or updates per second, every second, for a year).
//!
//! Part 1 is here; parts 2 and 3 belong to the extension's key management.

#![deny(unsafe_code)]

pub mod admin_key;
pub mod blind;
pub mod cipher;
pub mod envelope;
pub mod error;
pub mod kdf;
pub mod nonce;
pub mod redact;
pub mod secret;
pub mod wrap;

pub use admin_key::AdminKey;
pub use cipher::{DataCipher, Keyring, OpenError};
pub use envelope::{Envelope, FORMAT_V1, OVERHEAD};
pub use error::{AdminKeyError, DecryptionFailed, EnvelopeError};
pub use kdf::{Fingerprint, KdfParams, MasterKey};
pub use nonce::NonceSource;
pub use secret::SecretKey;

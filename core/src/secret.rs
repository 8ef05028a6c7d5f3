//! Key material.

use zeroize::{Zeroize, ZeroizeOnDrop};

/// 256 bits of key material. Zeroized on drop. It deliberately implements neither `Debug` nor
/// `Display` nor `Clone`, so it cannot end up in a log line or an error message by accident.
#[derive(Zeroize, ZeroizeOnDrop)]
pub struct SecretKey(Box<[u8; 32]>);

impl SecretKey {
    pub const LEN: usize = 32;

    /// Takes ownership of the bytes; the caller's copy should be zeroized by the caller.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        let mut boxed = Box::new([0u8; 32]);
        boxed.copy_from_slice(&bytes);
        let mut bytes = bytes;
        bytes.zeroize();
        SecretKey(boxed)
    }

    /// Builds a key from a slice of exactly 32 bytes.
    pub fn from_slice(bytes: &[u8]) -> Option<Self> {
        if bytes.len() != Self::LEN {
            return None;
        }
        let mut boxed = Box::new([0u8; 32]);
        boxed.copy_from_slice(bytes);
        Some(SecretKey(boxed))
    }

    /// A fresh random key from AWS-LC's DRBG (the FIPS module's in a FIPS build).
    pub fn random() -> Self {
        let mut boxed = Box::new([0u8; 32]);
        crate::nonce::random_fill(&mut boxed[..]);
        SecretKey(boxed)
    }

    pub fn expose(&self) -> &[u8; 32] {
        &self.0
    }
}

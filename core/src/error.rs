//! Error types of the crypto core. None of them carries key material or plaintext.

use std::fmt;

/// The one opaque decryption error. It says nothing about why the tag did not verify (wrong key,
/// wrong type context, tampering or truncation all look the same), and nothing about the plaintext.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecryptionFailed;

impl fmt::Display for DecryptionFailed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("decryption failed: the value is corrupted, was tampered with, or was not encrypted under this key for this type")
    }
}
impl std::error::Error for DecryptionFailed {}

/// Why a byte string or its text form is not a well-formed envelope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EnvelopeError {
    /// Fewer bytes than the header, nonce and tag of its version need (`min`).
    TooShort { len: usize, min: usize },
    /// A format version this build does not know.
    UnknownVersion(u8),
    /// The text after the `$cc$` prefix is not canonical padded base64.
    BadBase64,
}

impl fmt::Display for EnvelopeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EnvelopeError::TooShort { len, min } => {
                write!(f, "envelope is {len} bytes long, shorter than the {min} bytes of header, nonce and tag")
            }
            EnvelopeError::UnknownVersion(v) => write!(
                f,
                "envelope format version {v} is not supported (this build reads versions {} and {})",
                crate::envelope::FORMAT_V1,
                crate::envelope::FORMAT_V2
            ),
            EnvelopeError::BadBase64 => f.write_str(
                "the text after the \"$cc$\" prefix is not canonical base64 (RFC 4648 alphabet, '=' padding, no whitespace)",
            ),
        }
    }
}
impl std::error::Error for EnvelopeError {}

/// Why an administrator's key string was refused. Messages never echo the key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdminKeyError {
    /// A generated key (`CCK1-...`) with the wrong number of characters: truncated or extended.
    WrongLength { expected: usize, found: usize },
    /// A generated key with a character outside the alphabet, at this 1-based position.
    InvalidCharacter { position: usize },
    /// A generated key whose checksum does not match: mistyped.
    BadChecksum,
    /// A passphrase shorter than the minimum.
    TooShort { min: usize, found: usize },
    /// A passphrase with too little entropy (repetitive, tiny alphabet).
    TooLittleEntropy { min_bits: u32, estimated_bits: u32 },
    /// A passphrase a strength estimator (zxcvbn) guesses in fewer than 10^10 tries: words,
    /// names, dates, keyboard runs, repeats.
    Guessable { guesses_log10: u32 },
    /// A passphrase given to a FIPS build, which takes generated keys only.
    PassphraseInFipsMode,
}

/// The fewest guesses (log10) a passphrase must take a strength estimator: zxcvbn's top score.
pub const MIN_GUESSES_LOG10: u32 = 10;

impl fmt::Display for AdminKeyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AdminKeyError::WrongLength { expected, found } => write!(
                f,
                "generated key has {found} key characters, expected {expected}: it was truncated or extended while copying"
            ),
            AdminKeyError::InvalidCharacter { position } => write!(
                f,
                "generated key has an invalid character at position {position}"
            ),
            AdminKeyError::BadChecksum => f.write_str(
                "generated key checksum does not match: a character was mistyped or changed while copying",
            ),
            AdminKeyError::TooShort { min, found } => write!(
                f,
                "key is too short: {found} characters, at least {min} required"
            ),
            AdminKeyError::TooLittleEntropy { min_bits, estimated_bits } => write!(
                f,
                "key has too little entropy: about {estimated_bits} bits, at least {min_bits} required"
            ),
            AdminKeyError::Guessable { guesses_log10 } => write!(
                f,
                "passphrase is guessable: about 10^{guesses_log10} guesses (common words, names, dates, keyboard patterns or repeats), at least 10^{MIN_GUESSES_LOG10} required"
            ),
            AdminKeyError::PassphraseInFipsMode => f.write_str(
                "this is a FIPS build, which accepts only generated keys (from generate_data_encryption_key()), not passphrases",
            ),
        }
    }
}
impl std::error::Error for AdminKeyError {}

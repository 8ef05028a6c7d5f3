//! The administrator's key string.
//!
//! Two kinds of key string are accepted:
//!
//! * **Generated keys**, from [`AdminKey::generate`]: `CCK1-` followed by 60 characters of
//!   Crockford base32 in groups of four, e.g. `CCK1-7Q2M-...-K9XD`. They carry 256 random bits
//!   (52 characters) and a 40-bit checksum (8 characters, the first 40 bits of SHA-256 over a
//!   domain tag and the key bytes). They are plain ASCII letters, digits and dashes, so no
//!   editor, terminal or code page can mangle them (the seed documents warn that Dynamics'
//!   generated keys are random Unicode). Parsing forgives what copying does: surrounding and
//!   embedded whitespace or line breaks, lower case, and the look-alikes `O`→`0`, `I`/`L`→`1`.
//!   It refuses a truncated or extended key (wrong length) and a mistyped one (checksum: an
//!   error slips through with probability 2^-40).
//! * **Passphrases**: any other string, used byte for byte after trimming surrounding
//!   whitespace. A passphrase must be at least [`MIN_PASSPHRASE_CHARS`] characters long and its
//!   estimated entropy (length times the Shannon entropy of its character distribution) at
//!   least [`MIN_PASSPHRASE_BITS`] bits, and the zxcvbn estimator must rate it at its top score
//!   (at least 10^10 guesses): character counts alone accept `Password1234Password1234`.
//!
//! The canonical text of a key ([`AdminKey::as_str`]) is what goes into the KDF, so two spellings
//! of the same generated key derive the same key.

use crate::error::AdminKeyError;
use aws_lc_rs::digest::{Context, SHA256};
use subtle::ConstantTimeEq;
use zeroize::{Zeroize, Zeroizing};

pub const GENERATED_PREFIX: &str = "CCK1-";
const ALPHABET: &[u8; 32] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";
/// Characters that carry the 256 key bits.
pub const KEY_CHARS: usize = 52;
/// Characters of checksum.
pub const CHECKSUM_CHARS: usize = 8;
pub const GENERATED_CHARS: usize = KEY_CHARS + CHECKSUM_CHARS;
const GROUP: usize = 4;
const CHECKSUM_DOMAIN: &[u8] = b"pg_cellcrypt generated key v1\0";

pub const MIN_PASSPHRASE_CHARS: usize = 20;
pub const MIN_PASSPHRASE_BITS: u32 = 80;

/// An administrator's key string, validated and in canonical form. Zeroized on drop, no `Debug`.
pub struct AdminKey {
    text: Zeroizing<String>,
    generated: bool,
}

impl AdminKey {
    /// A fresh key in the copy-safe generated format: 256 bits of AWS-LC's DRBG (the FIPS
    /// module's in a FIPS build), full entropy.
    pub fn generate() -> Self {
        let mut bytes = Zeroizing::new([0u8; 32]);
        crate::nonce::random_fill(&mut bytes[..]);
        AdminKey { text: format_generated(&bytes), generated: true }
    }

    /// Validates a key string typed or pasted by an administrator.
    pub fn parse(input: &str) -> Result<Self, AdminKeyError> {
        let trimmed = input.trim();
        if is_generated_form(trimmed) {
            let bytes = decode_generated(&trimmed[GENERATED_PREFIX.len()..])?;
            return Ok(AdminKey { text: format_generated(&bytes), generated: true });
        }
        if crate::fips::ENABLED {
            return Err(AdminKeyError::PassphraseInFipsMode);
        }
        check_passphrase(trimmed)?;
        Ok(AdminKey { text: Zeroizing::new(trimmed.to_owned()), generated: false })
    }

    /// The canonical text: what the KDF consumes and what retrieval shows.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    pub fn is_generated(&self) -> bool {
        self.generated
    }

    /// The generated key of these 32 bytes.
    #[cfg(test)]
    pub(crate) fn from_key_bytes_for_tests(bytes: [u8; 32]) -> Self {
        AdminKey { text: format_generated(&bytes), generated: true }
    }

    /// The 256 key bits of a generated key (what HKDF derives its master key from); `None` for
    /// a passphrase.
    pub fn key_bytes(&self) -> Option<Zeroizing<[u8; 32]>> {
        if !self.generated {
            return None;
        }
        let body = &self.text[GENERATED_PREFIX.len()..];
        Some(decode_generated(body).expect("a generated key's canonical text decodes"))
    }

    /// True when both are the same key: their canonical texts, which the KDF consumes, are
    /// equal. Compared in constant time (`subtle`), and derives nothing (a key change uses it to
    /// see that the given key is already the current one without a second Argon2id run).
    pub fn same_as(&self, other: &AdminKey) -> bool {
        self.text.as_bytes().ct_eq(other.text.as_bytes()).into()
    }
}

/// True when the text claims the generated format (and so must pass its checks).
pub fn is_generated_form(s: &str) -> bool {
    s.len() >= GENERATED_PREFIX.len()
        && s.as_bytes()[..GENERATED_PREFIX.len()].eq_ignore_ascii_case(GENERATED_PREFIX.as_bytes())
}

/// The first 40 bits of SHA-256(domain || key bytes).
fn checksum_bits(bytes: &[u8; 32]) -> u64 {
    let mut h = Context::new(&SHA256);
    h.update(CHECKSUM_DOMAIN);
    h.update(bytes);
    let d = h.finish();
    d.as_ref()[..5].iter().fold(0u64, |acc, &b| (acc << 8) | u64::from(b))
}

fn format_generated(bytes: &[u8; 32]) -> Zeroizing<String> {
    let mut chars = Zeroizing::new(Vec::with_capacity(GENERATED_CHARS));
    // 256 bits + 4 zero bits = 52 five-bit groups.
    let mut acc: u64 = 0;
    let mut nbits = 0;
    for &b in bytes.iter() {
        acc = (acc << 8) | u64::from(b);
        nbits += 8;
        while nbits >= 5 {
            nbits -= 5;
            chars.push(ALPHABET[((acc >> nbits) & 31) as usize]);
        }
    }
    chars.push(ALPHABET[((acc << (5 - nbits)) & 31) as usize]);
    acc.zeroize();
    let sum = checksum_bits(bytes);
    for i in (0..CHECKSUM_CHARS).rev() {
        chars.push(ALPHABET[((sum >> (5 * i)) & 31) as usize]);
    }
    let mut out = Zeroizing::new(String::with_capacity(GENERATED_PREFIX.len() + GENERATED_CHARS + GENERATED_CHARS / GROUP));
    out.push_str(GENERATED_PREFIX);
    for (i, c) in chars.iter().enumerate() {
        if i > 0 && i % GROUP == 0 {
            out.push('-');
        }
        out.push(*c as char);
    }
    out
}

fn symbol_value(c: u8) -> Option<u8> {
    let c = match c.to_ascii_uppercase() {
        b'O' => b'0',
        b'I' | b'L' => b'1',
        other => other,
    };
    ALPHABET.iter().position(|&a| a == c).map(|p| p as u8)
}

fn decode_generated(body: &str) -> Result<Zeroizing<[u8; 32]>, AdminKeyError> {
    let mut values = Zeroizing::new(Vec::with_capacity(GENERATED_CHARS));
    for (i, c) in body.bytes().enumerate() {
        if c == b'-' || c.is_ascii_whitespace() {
            continue;
        }
        match symbol_value(c) {
            Some(v) => values.push(v),
            None => return Err(AdminKeyError::InvalidCharacter { position: GENERATED_PREFIX.len() + i + 1 }),
        }
    }
    if values.len() != GENERATED_CHARS {
        return Err(AdminKeyError::WrongLength { expected: GENERATED_CHARS, found: values.len() });
    }
    let mut bytes = Zeroizing::new([0u8; 32]);
    let mut acc: u64 = 0;
    let mut nbits = 0;
    let mut n = 0;
    for &v in values[..KEY_CHARS].iter() {
        acc = (acc << 5) | u64::from(v);
        nbits += 5;
        if nbits >= 8 && n < 32 {
            nbits -= 8;
            bytes[n] = (acc >> nbits) as u8;
            n += 1;
        }
    }
    let pad = acc & ((1 << nbits) - 1);
    acc.zeroize();
    let mut sum = 0u64;
    for &v in values[KEY_CHARS..].iter() {
        sum = (sum << 5) | u64::from(v);
    }
    if pad != 0 || n != 32 || sum != checksum_bits(&bytes) {
        return Err(AdminKeyError::BadChecksum);
    }
    Ok(bytes)
}

/// Estimated entropy in bits: length times the Shannon entropy of the character distribution.
pub fn estimated_entropy_bits(s: &str) -> u32 {
    let chars: Vec<char> = s.chars().collect();
    if chars.is_empty() {
        return 0;
    }
    let mut counts: std::collections::HashMap<char, usize> = std::collections::HashMap::new();
    for c in &chars {
        *counts.entry(*c).or_default() += 1;
    }
    let n = chars.len() as f64;
    let h: f64 = counts.values().map(|&k| {
        let p = k as f64 / n;
        -p * p.log2()
    }).sum();
    (h * n).floor() as u32
}

fn check_passphrase(s: &str) -> Result<(), AdminKeyError> {
    let len = s.chars().count();
    if len < MIN_PASSPHRASE_CHARS {
        return Err(AdminKeyError::TooShort { min: MIN_PASSPHRASE_CHARS, found: len });
    }
    let bits = estimated_entropy_bits(s);
    if bits < MIN_PASSPHRASE_BITS {
        return Err(AdminKeyError::TooLittleEntropy { min_bits: MIN_PASSPHRASE_BITS, estimated_bits: bits });
    }
    // Then a maintained estimator, which knows what character counts do not: dictionary words,
    // names, dates, keyboard runs, l33t substitutions and repeats ("Password1234Password1234").
    let estimate = zxcvbn::zxcvbn(s, &[]);
    if u8::from(estimate.score()) < 4 {
        return Err(AdminKeyError::Guessable { guesses_log10: estimate.guesses_log10().floor().max(0.0) as u32 });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The checksum against SHA-256 computed by another implementation (Python's hashlib):
    /// every generated key handed out so far must keep parsing.
    #[test]
    fn checksum_known_answer() {
        let mut bytes = [0u8; 32];
        for (i, b) in bytes.iter_mut().enumerate() {
            *b = i as u8;
        }
        assert_eq!(checksum_bits(&bytes), 0xe7_47f1_4fe9);
    }

    #[test]
    fn generated_keys_are_ascii_grouped_and_reparse() {
        let k = AdminKey::generate();
        let s = k.as_str();
        assert!(s.is_ascii());
        assert!(s.starts_with(GENERATED_PREFIX));
        let groups: Vec<&str> = s[GENERATED_PREFIX.len()..].split('-').collect();
        assert_eq!(groups.len(), GENERATED_CHARS / GROUP);
        assert!(groups.iter().all(|g| g.len() == GROUP));
        let again = AdminKey::parse(s).unwrap();
        assert_eq!(again.as_str(), s);
        assert!(again.is_generated());
    }

    #[test]
    #[cfg(not(feature = "fips"))] // passphrases and Argon2id do not run in a FIPS build
    fn same_as_compares_canonical_forms() {
        let k = AdminKey::generate();
        let retyped = AdminKey::parse(&k.as_str().to_lowercase()).unwrap();
        assert!(k.same_as(&retyped), "a generated key typed in lower case is the same key");
        assert!(!k.same_as(&AdminKey::generate()));
        let p = AdminKey::parse("  correct horse battery staple 42!  ").unwrap();
        assert!(p.same_as(&AdminKey::parse("correct horse battery staple 42!").unwrap()));
        assert!(!p.same_as(&AdminKey::parse("correct horse battery staple 43!").unwrap()));
        assert!(!p.same_as(&k));
    }

    #[test]
    fn copy_damage_is_forgiven_or_caught() {
        let k = AdminKey::generate();
        let s = k.as_str().to_owned();
        // lower case, line breaks, surrounding space: same key
        let messy = format!("  {}\n", s.to_lowercase().replacen('-', "-\r\n", 3));
        assert_eq!(AdminKey::parse(&messy).unwrap().as_str(), s);
        // truncated
        let cut = &s[..s.len() - 1];
        assert!(matches!(AdminKey::parse(cut), Err(AdminKeyError::WrongLength { .. })));
        // invalid character (U is not in Crockford base32)
        let bad = format!("{}U{}", &s[..6], &s[7..]);
        assert_eq!(AdminKey::parse(&bad).err(), Some(AdminKeyError::InvalidCharacter { position: 7 }));
    }

    #[test]
    #[cfg(not(feature = "fips"))] // passphrases and Argon2id do not run in a FIPS build
    fn passphrase_rules() {
        assert!(matches!(AdminKey::parse("short"), Err(AdminKeyError::TooShort { .. })));
        assert!(matches!(AdminKey::parse("aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"), Err(AdminKeyError::TooLittleEntropy { .. })));
        assert!(matches!(AdminKey::parse("abababababababababababababab"), Err(AdminKeyError::TooLittleEntropy { .. })));
        // Long enough and varied enough by character counts, but guessable.
        for weak in ["Password1234Password1234", "qwertyuiopasdfghjkl1234", "iloveyou iloveyou 2024!"] {
            assert!(matches!(AdminKey::parse(weak), Err(AdminKeyError::Guessable { .. })), "{weak}");
        }
        let p = AdminKey::parse("  correct horse battery staple 1987 ").unwrap();
        assert_eq!(p.as_str(), "correct horse battery staple 1987");
        assert!(!p.is_generated());
        // Generated keys are always accepted, whatever the estimator thinks of their letters.
        for _ in 0..50 {
            assert!(AdminKey::parse(AdminKey::generate().as_str()).is_ok());
        }
    }
}

//! Blind indexes: a keyed hash of a normalized plaintext, for equality lookups and unique
//! constraints on encrypted columns.
//!
//! ```text
//! blind index = HMAC-SHA256(index key, "pg_cellcrypt blind v1;" type ";" normalization ";" value)[..16]
//! ```
//!
//! * The **index key** is 256 random bits, independent of the data key (the database keeps it
//!   wrapped under the current data key), so changing the data key leaves blind indexes valid.
//! * 16 bytes (128 bits) are kept: collisions between distinct values are negligible
//!   (birthday bound 2^64), and the index stays small.
//! * The type and the normalization are bound into the hash, so `'a'` under `lower` and `'a'`
//!   under `exact`, or text and bytea with the same bytes, never match.
//!
//! **What it reveals:** which cells hold equal (normalized) values, and so their frequencies,
//! to anyone who can read the index or the column's blind index; and, to anyone who may compute
//! blind indexes, whether a cell equals a guess. Use it for high-entropy identifiers (e-mail
//! addresses, national IDs, account numbers), not for low-cardinality values (a yes/no field, a
//! salary band), where equality patterns are the secret.

use crate::secret::SecretKey;
use aws_lc_rs::hmac::{self, HMAC_SHA256};
use std::borrow::Cow;
use zeroize::Zeroizing;

pub const BLIND_INDEX_LEN: usize = 16;

/// How a text is normalized before hashing, chosen per index.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Normalization {
    /// The value byte for byte.
    Exact,
    /// Unicode lower case (locale-independent, so the result never changes).
    Lower,
    /// Leading and trailing Unicode white space removed.
    Trim,
    /// Both: trimmed, then lower-cased.
    LowerTrim,
}

impl Normalization {
    pub const NAMES: [&'static str; 4] = ["exact", "lower", "trim", "lower_trim"];

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "exact" => Some(Normalization::Exact),
            "lower" => Some(Normalization::Lower),
            "trim" => Some(Normalization::Trim),
            "lower_trim" => Some(Normalization::LowerTrim),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Normalization::Exact => "exact",
            Normalization::Lower => "lower",
            Normalization::Trim => "trim",
            Normalization::LowerTrim => "lower_trim",
        }
    }

    /// Applies the normalization to a UTF-8 text.
    pub fn apply(self, s: &str) -> Cow<'_, str> {
        match self {
            Normalization::Exact => Cow::Borrowed(s),
            Normalization::Trim => Cow::Borrowed(s.trim()),
            Normalization::Lower => Cow::Owned(s.to_lowercase()),
            Normalization::LowerTrim => Cow::Owned(s.trim().to_lowercase()),
        }
    }
}

/// The key of the blind index of registered column `column` (its binding id): derived from the
/// index key, so that equal values in two columns have unrelated blind indexes.
pub fn column_key(key: &SecretKey, column: u32) -> SecretKey {
    const DOMAIN: &[u8] = b"pg_cellcrypt blind column key v1;";
    let mut msg = [0u8; DOMAIN.len() + 4];
    msg[..DOMAIN.len()].copy_from_slice(DOMAIN);
    msg[DOMAIN.len()..].copy_from_slice(&column.to_be_bytes());
    let mut k = Zeroizing::new([0u8; 32]);
    hmac::sign_to_buffer(&hmac::Key::new(HMAC_SHA256, key.expose()), &msg, &mut k[..])
        .expect("a 32-byte buffer holds an HMAC-SHA256 tag");
    SecretKey::from_slice(&k[..]).expect("32 bytes")
}

/// The blind index of `value`, of type `type_tag` (e.g. "text", "bytea"), already normalized
/// with `norm` by the caller.
pub fn blind_index(key: &SecretKey, type_tag: &str, norm: Normalization, value: &[u8]) -> [u8; BLIND_INDEX_LEN] {
    ColumnIndexKey::new(key).index(type_tag, norm, value)
}

/// A column's blind-index key, keyed once (aws-lc's HMAC context with its pads absorbed,
/// cleansed when freed): what a scan or `CREATE INDEX` hashes every value with. Setting an
/// HMAC key up costs as much as hashing a short value, so the extension keeps one per column.
pub struct ColumnIndexKey(hmac::Key);

impl ColumnIndexKey {
    /// Keyed with a column key (from [`column_key`]).
    pub fn new(column_key: &SecretKey) -> Self {
        ColumnIndexKey(hmac::Key::new(HMAC_SHA256, column_key.expose()))
    }

    /// The key of registered column `column` under index key `index_key`.
    pub fn for_column(index_key: &SecretKey, column: u32) -> Self {
        Self::new(&column_key(index_key, column))
    }

    /// The blind index of `value` (see [`blind_index`]).
    pub fn index(&self, type_tag: &str, norm: Normalization, value: &[u8]) -> [u8; BLIND_INDEX_LEN] {
        index_with(&self.0, type_tag, norm, value)
    }
}

fn index_with(key: &hmac::Key, type_tag: &str, norm: Normalization, value: &[u8]) -> [u8; BLIND_INDEX_LEN] {
    let mut mac = hmac::Context::with_key(key);
    mac.update(b"pg_cellcrypt blind v1;");
    mac.update(type_tag.as_bytes());
    mac.update(b";");
    mac.update(norm.name().as_bytes());
    mac.update(b";");
    mac.update(value);
    let full = mac.sign();
    let mut out = [0u8; BLIND_INDEX_LEN];
    out.copy_from_slice(&full.as_ref()[..BLIND_INDEX_LEN]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    #[test]
    fn a_kept_column_key_hashes_as_a_fresh_one() {
        let index_key = SecretKey::from_bytes([3; 32]);
        let kept = ColumnIndexKey::for_column(&index_key, 7);
        for v in [&b""[..], b"x", b"alice@example.com", &[0u8; 300][..]] {
            assert_eq!(kept.index("text", Normalization::Exact, v), blind_index(&column_key(&index_key, 7), "text", Normalization::Exact, v));
        }
    }

    #[test]
    fn equal_values_match_and_everything_else_differs() {
        let k = SecretKey::from_bytes([3; 32]);
        let a = blind_index(&k, "text", Normalization::Exact, b"alice@example.com");
        assert_eq!(a, blind_index(&k, "text", Normalization::Exact, b"alice@example.com"));
        assert_ne!(a, blind_index(&k, "text", Normalization::Exact, b"alice@example.org"));
        assert_ne!(a, blind_index(&k, "text", Normalization::Lower, b"alice@example.com"));
        assert_ne!(a, blind_index(&k, "bytea", Normalization::Exact, b"alice@example.com"));
        assert_ne!(a, blind_index(&SecretKey::from_bytes([4; 32]), "text", Normalization::Exact, b"alice@example.com"));
        // The construction against HMAC-SHA256 computed by another implementation (Python's
        // hmac): HMAC([3; 32], "pg_cellcrypt blind v1;text;exact;alice@example.com")[..16].
        // Stored blind indexes depend on these bytes.
        assert_eq!(hex(&a), "6d1c21b367eb42abbc0cd338dedbcff9");
    }

    #[test]
    fn each_column_has_its_own_key() {
        let k = SecretKey::from_bytes([3; 32]);
        let (a, b) = (column_key(&k, 1), column_key(&k, 2));
        assert_ne!(a.expose(), b.expose());
        assert_eq!(a.expose(), column_key(&k, 1).expose());
        assert_ne!(blind_index(&a, "text", Normalization::Exact, b"x"), blind_index(&b, "text", Normalization::Exact, b"x"));
        // HMAC([3; 32], "pg_cellcrypt blind column key v1;" || 1u32 big-endian), by Python's hmac.
        assert_eq!(hex(a.expose()), "46ff4dc5d7aa0b262184e2d675d15d8b36b9b071f276c86e4272b7f097b14053");
    }

    #[test]
    fn normalizations() {
        assert_eq!(Normalization::LowerTrim.apply("  ÄliCE@Example.COM \n"), "älice@example.com");
        assert_eq!(Normalization::Trim.apply("\u{2003}x\u{2003}"), "x");
        assert_eq!(Normalization::Exact.apply(" X "), " X ");
        for n in Normalization::NAMES {
            assert_eq!(Normalization::parse(n).unwrap().name(), n);
        }
        assert_eq!(Normalization::parse("LOWER"), None);
    }
}

//! The envelope: one encrypted value, self-describing and versioned.
//!
//! ## Binary layout (format version 1)
//! ```text
//! offset  size  field
//!      0     1  format version (1)
//!      1     4  key id, big-endian u32: the key version in the database (low 16 bits) and the
//!               blind-index binding (high 16 bits; 0 for a value bound to no column)
//!      5    12  nonce, 96 random bits
//!     17     n  ciphertext (same length as the plaintext)
//!   17+n    16  GCM tag
//! ```
//! The 5 header bytes (version and key id) are authenticated as AAD, followed by a caller-chosen
//! context (the extension binds the plaintext type there). So is the binding: a value sealed for
//! the blind index of one registered column carries that column's id, and the id cannot be
//! changed or removed without the key. Values written before bindings existed have key versions
//! far below 2^16, so they read as bound to nothing: the format did not change. Changing the version, the key id,
//! the nonce, any ciphertext byte, the tag, or opening with another context fails.
//! The overhead is [`OVERHEAD`] = 33 bytes per value.
//!
//! ## Text form
//! `$cc$` followed by the whole binary envelope in canonical RFC 4648 base64 (standard alphabet,
//! `=` padding, no whitespace, no non-zero trailing bits). [`decode_text`] is strict: a string
//! with the prefix either decodes to a well-formed envelope or is an error; a string without the
//! prefix is not an envelope at all.

use crate::error::EnvelopeError;
use base64::engine::general_purpose::STANDARD;
use base64::Engine;

/// The only format version this build writes and reads.
pub const FORMAT_V1: u8 = 1;
pub const VERSION_LEN: usize = 1;
pub const KEY_ID_LEN: usize = 4;
/// Version and key id: the part of the envelope that is authenticated as AAD.
pub const HEADER_LEN: usize = VERSION_LEN + KEY_ID_LEN;
pub const NONCE_LEN: usize = 12;
pub const TAG_LEN: usize = 16;
/// The largest key version (the low 16 bits of the key id).
pub const MAX_KEY_VERSION: u32 = 0xffff;
/// The largest blind-index binding (the high 16 bits of the key id).
pub const MAX_BINDING: u32 = 0xffff;
/// Bytes an envelope adds to its plaintext.
pub const OVERHEAD: usize = HEADER_LEN + NONCE_LEN + TAG_LEN;
/// Where the ciphertext starts.
pub const CIPHERTEXT_OFFSET: usize = HEADER_LEN + NONCE_LEN;
/// The prefix that marks the text form of an envelope.
pub const TEXT_PREFIX: &str = "$cc$";

/// Length of the envelope that seals `plaintext_len` bytes.
pub const fn sealed_len(plaintext_len: usize) -> usize {
    plaintext_len + OVERHEAD
}

/// A parsed, well-formed (not yet authenticated) envelope borrowing its bytes.
#[derive(Clone, Copy)]
pub struct Envelope<'a> {
    bytes: &'a [u8],
}

impl<'a> Envelope<'a> {
    /// Checks the structure: length and known version. Says nothing about authenticity.
    pub fn parse(bytes: &'a [u8]) -> Result<Self, EnvelopeError> {
        if bytes.len() < OVERHEAD {
            // A short buffer that still names an unknown version reports the version: it is the
            // more useful reason (a newer format, not a truncation).
            if let Some(&v) = bytes.first() {
                if v != FORMAT_V1 {
                    return Err(EnvelopeError::UnknownVersion(v));
                }
            }
            return Err(EnvelopeError::TooShort { len: bytes.len() });
        }
        if bytes[0] != FORMAT_V1 {
            return Err(EnvelopeError::UnknownVersion(bytes[0]));
        }
        Ok(Envelope { bytes })
    }

    pub fn version(&self) -> u8 {
        self.bytes[0]
    }

    /// The key version the value is sealed under.
    pub fn key_id(&self) -> u32 {
        read_key_id(self.bytes) & MAX_KEY_VERSION
    }

    /// The blind-index column the value is bound to (0: none).
    pub fn binding(&self) -> u32 {
        read_key_id(self.bytes) >> 16
    }

    pub fn header(&self) -> &'a [u8] {
        &self.bytes[..HEADER_LEN]
    }

    pub fn nonce(&self) -> &'a [u8] {
        &self.bytes[HEADER_LEN..CIPHERTEXT_OFFSET]
    }

    pub fn ciphertext(&self) -> &'a [u8] {
        &self.bytes[CIPHERTEXT_OFFSET..self.bytes.len() - TAG_LEN]
    }

    pub fn tag(&self) -> &'a [u8] {
        &self.bytes[self.bytes.len() - TAG_LEN..]
    }

    /// Length of the plaintext this envelope holds.
    pub fn plaintext_len(&self) -> usize {
        self.bytes.len() - OVERHEAD
    }

    pub fn as_bytes(&self) -> &'a [u8] {
        self.bytes
    }
}

fn read_key_id(bytes: &[u8]) -> u32 {
    u32::from_be_bytes([bytes[1], bytes[2], bytes[3], bytes[4]])
}

/// Writes the header (version, key version and binding) into the first [`HEADER_LEN`] bytes of
/// `out`.
pub fn write_header(out: &mut [u8], key_id: u32, binding: u32) {
    assert!(key_id <= MAX_KEY_VERSION && binding <= MAX_BINDING, "key version or binding out of range");
    out[0] = FORMAT_V1;
    out[1..HEADER_LEN].copy_from_slice(&((binding << 16) | key_id).to_be_bytes());
}

/// Length of the text form of an envelope of `len` bytes.
pub fn text_len(len: usize) -> usize {
    TEXT_PREFIX.len() + len.div_ceil(3) * 4
}

/// The text form: `$cc$` + canonical base64.
pub fn encode_text(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(text_len(bytes.len()));
    s.push_str(TEXT_PREFIX);
    STANDARD.encode_string(bytes, &mut s);
    s
}

/// True when `text` claims to be an envelope (has the prefix). Such text must then decode.
pub fn looks_like_text(text: &[u8]) -> bool {
    text.starts_with(TEXT_PREFIX.as_bytes())
}

/// Decodes the text form. `Ok(None)`: not an envelope (no prefix). `Ok(Some(bytes))`: a
/// well-formed envelope. `Err`: has the prefix but is not a well-formed envelope.
pub fn decode_text(text: &[u8]) -> Result<Option<Vec<u8>>, EnvelopeError> {
    if !looks_like_text(text) {
        return Ok(None);
    }
    let b64 = &text[TEXT_PREFIX.len()..];
    let bytes = STANDARD.decode(b64).map_err(|_| EnvelopeError::BadBase64)?;
    Envelope::parse(&bytes)?;
    Ok(Some(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overhead_is_33() {
        assert_eq!(OVERHEAD, 33);
        assert_eq!(sealed_len(0), 33);
    }

    #[test]
    fn parse_rejects_short_and_unknown_version() {
        assert_eq!(Envelope::parse(&[]).err(), Some(EnvelopeError::TooShort { len: 0 }));
        assert_eq!(Envelope::parse(&[1; 32]).err(), Some(EnvelopeError::TooShort { len: 32 }));
        let mut b = vec![0u8; 40];
        b[0] = 2;
        assert_eq!(Envelope::parse(&b).err(), Some(EnvelopeError::UnknownVersion(2)));
        b[0] = 1;
        b[1..5].copy_from_slice(&7u32.to_be_bytes());
        let e = Envelope::parse(&b).unwrap();
        assert_eq!(e.key_id(), 7);
        assert_eq!(e.binding(), 0);
        b[1..5].copy_from_slice(&((3u32 << 16) | 7).to_be_bytes());
        let e = Envelope::parse(&b).unwrap();
        assert_eq!((e.key_id(), e.binding()), (7, 3));
        assert_eq!(e.plaintext_len(), 7);
        assert_eq!(e.nonce().len(), NONCE_LEN);
        assert_eq!(e.tag().len(), TAG_LEN);
    }

    #[test]
    fn text_form_is_strict() {
        let mut b = vec![0u8; 34];
        b[0] = 1;
        let t = encode_text(&b);
        assert!(t.starts_with("$cc$"));
        assert_eq!(t.len(), text_len(b.len()));
        assert_eq!(decode_text(t.as_bytes()).unwrap(), Some(b.clone()));
        // no prefix: not an envelope
        assert_eq!(decode_text(b"hello").unwrap(), None);
        assert_eq!(decode_text(b" $cc$AAAA").unwrap(), None);
        // prefix but bad base64, whitespace, missing padding, too short, unknown version
        assert_eq!(decode_text(b"$cc$!!!!").err(), Some(EnvelopeError::BadBase64));
        let with_space = format!("{} ", t);
        assert_eq!(decode_text(with_space.as_bytes()).err(), Some(EnvelopeError::BadBase64));
        let unpadded = t.trim_end_matches('=');
        assert_eq!(decode_text(unpadded.as_bytes()).err(), Some(EnvelopeError::BadBase64));
        assert_eq!(decode_text(b"$cc$AQAA").err(), Some(EnvelopeError::TooShort { len: 3 }));
        assert_eq!(decode_text(b"$cc$").err(), Some(EnvelopeError::TooShort { len: 0 }));
        let mut v2 = b.clone();
        v2[0] = 9;
        assert_eq!(
            decode_text(encode_text(&v2).as_bytes()).err(),
            Some(EnvelopeError::UnknownVersion(9))
        );
    }
}

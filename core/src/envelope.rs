//! The envelope: one encrypted value, self-describing and versioned.
//!
//! ## Binary layout (format version 2, written since 0.2.0)
//! ```text
//! offset  size  field
//!      0     1  format version (2)
//!      1     4  key id, big-endian u32: the key version in the database (low 16 bits) and the
//!               blind-index binding (high 16 bits; 0 for a value bound to no column)
//!      5    24  nonce, 192 random bits: the first 12 bytes (the salt) choose the value key, the last
//!               12 are its GCM nonce
//!     29     n  ciphertext (same length as the plaintext)
//!   29+n    16  GCM tag
//! ```
//! Values are sealed under value keys: HKDF-SHA256 (RFC 5869) of the data key, with the first
//! 12 nonce bytes (the salt) in the `info` (see [`crate::cipher`]). A process seals at most
//! 2^16 values, all within one transaction, under one salt, each with its own random GCM nonce.
//! A data key therefore never reaches GCM's limit of 2^32 random nonces under one key: no usage
//! count is needed, and a key change is never forced by volume.
//!
//! ## Format version 1 (read, never written)
//! Version byte 1, the same key id, a 12-byte nonce used with the data key itself, the
//! ciphertext and the tag: 33 bytes of overhead. Values written by development builds before 0.1.0 stay readable;
//! re-encryption (a key change) and any update rewrite them in version 2.
//!
//! Both versions authenticate the 5 header bytes (version and key id) as AAD, followed by a
//! caller-chosen context (the extension binds the plaintext type there). So is the binding: a
//! value sealed for the blind index of one registered column carries that column's id, and the
//! id cannot be changed or removed without the key. Changing the version, the key id, the
//! nonce, any ciphertext byte, the tag, or opening with another context fails.
//! The overhead is [`OVERHEAD`] = 45 bytes per value.
//!
//! ## Text form
//! `$cc$` followed by the whole binary envelope in canonical RFC 4648 base64 (standard alphabet,
//! `=` padding, no whitespace, no non-zero trailing bits). [`decode_text`] is strict: a string
//! with the prefix either decodes to a well-formed envelope or is an error; a string without the
//! prefix is not an envelope at all.

use crate::error::EnvelopeError;
use base64::engine::general_purpose::STANDARD;
use base64::Engine;

/// Format version 1: a random 96-bit nonce under the data key. Read, never written.
pub const FORMAT_V1: u8 = 1;
/// Format version 2: values under value keys derived from the data key and a 96-bit salt (see
/// `cipher`). The only version written (0.1.0 wrote it too, with a salt per value).
pub const FORMAT_V2: u8 = 2;
pub const VERSION_LEN: usize = 1;
pub const KEY_ID_LEN: usize = 4;
/// Version and key id: the part of the envelope that is authenticated as AAD.
pub const HEADER_LEN: usize = VERSION_LEN + KEY_ID_LEN;
/// The nonce of a version 2 envelope (the value key's salt, then the GCM nonce).
pub const NONCE_LEN: usize = 24;
/// The nonce of a version 1 envelope (the GCM nonce).
pub const NONCE_LEN_V1: usize = 12;
/// The GCM nonce of either version.
pub const GCM_NONCE_LEN: usize = 12;
pub const TAG_LEN: usize = 16;
/// The largest key version (the low 16 bits of the key id).
pub const MAX_KEY_VERSION: u32 = 0xffff;
/// The largest blind-index binding (the high 16 bits of the key id).
pub const MAX_BINDING: u32 = 0xffff;
/// Bytes an envelope adds to its plaintext (version 2).
pub const OVERHEAD: usize = HEADER_LEN + NONCE_LEN + TAG_LEN;
/// Bytes a version 1 envelope adds to its plaintext.
pub const OVERHEAD_V1: usize = HEADER_LEN + NONCE_LEN_V1 + TAG_LEN;
/// Where the ciphertext starts (version 2).
pub const CIPHERTEXT_OFFSET: usize = HEADER_LEN + NONCE_LEN;
/// The prefix that marks the text form of an envelope.
pub const TEXT_PREFIX: &str = "$cc$";

/// Length of the (version 2) envelope that seals `plaintext_len` bytes.
pub const fn sealed_len(plaintext_len: usize) -> usize {
    plaintext_len + OVERHEAD
}

/// The nonce length of format `version`, if this build reads it.
const fn nonce_len_of(version: u8) -> Option<usize> {
    match version {
        FORMAT_V1 => Some(NONCE_LEN_V1),
        FORMAT_V2 => Some(NONCE_LEN),
        _ => None,
    }
}

/// A parsed, well-formed (not yet authenticated) envelope borrowing its bytes.
#[derive(Clone, Copy)]
pub struct Envelope<'a> {
    bytes: &'a [u8],
}

impl<'a> Envelope<'a> {
    /// Checks the structure: length and known version. Says nothing about authenticity.
    pub fn parse(bytes: &'a [u8]) -> Result<Self, EnvelopeError> {
        // An unknown version is reported even for a short buffer: it is the more useful reason
        // (a newer format, not a truncation).
        let Some(&v) = bytes.first() else { return Err(EnvelopeError::TooShort { len: 0, min: OVERHEAD }) };
        let Some(nonce_len) = nonce_len_of(v) else { return Err(EnvelopeError::UnknownVersion(v)) };
        let min = HEADER_LEN + nonce_len + TAG_LEN;
        if bytes.len() < min {
            return Err(EnvelopeError::TooShort { len: bytes.len(), min });
        }
        Ok(Envelope { bytes })
    }

    fn nonce_len(&self) -> usize {
        if self.bytes[0] == FORMAT_V1 {
            NONCE_LEN_V1
        } else {
            NONCE_LEN
        }
    }

    fn ciphertext_offset(&self) -> usize {
        HEADER_LEN + self.nonce_len()
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

    /// The whole nonce field: 12 bytes in version 1, 24 in version 2.
    pub fn nonce(&self) -> &'a [u8] {
        &self.bytes[HEADER_LEN..self.ciphertext_offset()]
    }

    pub fn ciphertext(&self) -> &'a [u8] {
        &self.bytes[self.ciphertext_offset()..self.bytes.len() - TAG_LEN]
    }

    pub fn tag(&self) -> &'a [u8] {
        &self.bytes[self.bytes.len() - TAG_LEN..]
    }

    /// Length of the plaintext this envelope holds.
    pub fn plaintext_len(&self) -> usize {
        self.bytes.len() - self.ciphertext_offset() - TAG_LEN
    }

    pub fn as_bytes(&self) -> &'a [u8] {
        self.bytes
    }
}

fn read_key_id(bytes: &[u8]) -> u32 {
    u32::from_be_bytes([bytes[1], bytes[2], bytes[3], bytes[4]])
}

/// Writes the version 2 header (version, key version and binding) into the first
/// [`HEADER_LEN`] bytes of `out`.
pub fn write_header(out: &mut [u8], key_id: u32, binding: u32) {
    assert!(key_id <= MAX_KEY_VERSION && binding <= MAX_BINDING, "key version or binding out of range");
    out[0] = FORMAT_V2;
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
    fn overheads() {
        assert_eq!(OVERHEAD, 45);
        assert_eq!(OVERHEAD_V1, 33);
        assert_eq!(sealed_len(0), 45);
    }

    #[test]
    fn parse_rejects_short_and_unknown_version() {
        assert_eq!(Envelope::parse(&[]).err(), Some(EnvelopeError::TooShort { len: 0, min: 45 }));
        assert_eq!(Envelope::parse(&[1; 32]).err(), Some(EnvelopeError::TooShort { len: 32, min: 33 }));
        assert_eq!(Envelope::parse(&[2; 44]).err(), Some(EnvelopeError::TooShort { len: 44, min: 45 }));
        let mut b = vec![0u8; 50];
        b[0] = 3;
        assert_eq!(Envelope::parse(&b).err(), Some(EnvelopeError::UnknownVersion(3)));
        assert_eq!(Envelope::parse(&b[..4]).err(), Some(EnvelopeError::UnknownVersion(3)));
        for (version, nonce, offset) in [(1u8, 12usize, 17usize), (2, 24, 29)] {
            b[0] = version;
            b[1..5].copy_from_slice(&7u32.to_be_bytes());
            let e = Envelope::parse(&b).unwrap();
            assert_eq!((e.version(), e.key_id(), e.binding()), (version, 7, 0));
            b[1..5].copy_from_slice(&((3u32 << 16) | 7).to_be_bytes());
            let e = Envelope::parse(&b).unwrap();
            assert_eq!((e.key_id(), e.binding()), (7, 3));
            assert_eq!(e.plaintext_len(), 50 - offset - TAG_LEN);
            assert_eq!(e.nonce().len(), nonce);
            assert_eq!(e.ciphertext().len(), e.plaintext_len());
            assert_eq!(e.tag().len(), TAG_LEN);
        }
    }

    #[test]
    fn text_form_is_strict() {
        let mut b = vec![0u8; 46];
        b[0] = 2;
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
        assert_eq!(decode_text(b"$cc$AQAA").err(), Some(EnvelopeError::TooShort { len: 3, min: 33 }));
        assert_eq!(decode_text(b"$cc$").err(), Some(EnvelopeError::TooShort { len: 0, min: 45 }));
        let mut v9 = b.clone();
        v9[0] = 9;
        assert_eq!(decode_text(encode_text(&v9).as_bytes()).err(), Some(EnvelopeError::UnknownVersion(9)));
    }
}

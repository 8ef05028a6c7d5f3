//! Sealing and opening one value with AES-256-GCM, and the keyring of cached ciphers.
//!
//! A value is sealed (envelope version 2) under a key of its own:
//! `HKDF-SHA256(salt = "pg_cellcrypt v2", ikm = data key, info = "pg_cellcrypt value key" ||
//! first 12 nonce bytes)`, 32 bytes, with the last 12 nonce bytes as the GCM nonce (the shape
//! of XAES-256-GCM, built from HKDF so that no primitive is our own). The HKDF extract step is
//! done once per data key; each value costs one HKDF expand (aws-lc's `HKDF_expand`: the HMAC
//! key set-up and one output block, four SHA-256 blocks) and one AES-GCM key set-up (an
//! `EVP_AEAD_CTX`). Version 1 values are opened with the data key itself.
//!
//! The primitives are AWS-LC's, through `aws-lc-rs` (AES-256-GCM, HKDF-SHA256, HMAC-SHA256).

use crate::envelope::{self, Envelope, CIPHERTEXT_OFFSET, FORMAT_V1, GCM_NONCE_LEN, HEADER_LEN, TAG_LEN};
use crate::error::{DecryptionFailed, EnvelopeError};
use crate::nonce::NonceSource;
use crate::secret::SecretKey;
use aws_lc_rs::aead::{self, LessSafeKey, UnboundKey, AES_256_GCM};
use aws_lc_rs::hkdf::{self, Prk, HKDF_SHA256};
use aws_lc_rs::hmac;
use std::fmt;
use zeroize::Zeroizing;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Largest AAD context a caller may bind. Contexts are short type tags.
pub const MAX_CONTEXT_LEN: usize = 64;

/// HKDF's extract salt for value keys.
pub const VALUE_KEY_SALT: &[u8] = b"pg_cellcrypt v2";
/// The start of HKDF's `info` for a value key; the first 12 nonce bytes follow.
pub const VALUE_KEY_INFO: &[u8] = b"pg_cellcrypt value key";

/// The HKDF state of one data key: its pseudorandom key, held by aws-lc-rs's [`Prk`] (in a
/// buffer it zeroizes on drop).
struct ValueKeys(Prk);

/// HKDF output of one AES-256 key.
struct Aes256KeyLen;

impl hkdf::KeyType for Aes256KeyLen {
    fn len(&self) -> usize {
        32
    }
}

impl ValueKeys {
    /// HKDF-Extract, once per data key: `PRK = HMAC-SHA256(salt, data key)` (RFC 5869, 2.2).
    /// aws-lc-rs's own `Salt::extract` defers the extraction and repeats it on every expansion,
    /// which would double the cost of a small value; the PRK passes through a zeroizing buffer.
    fn new(data_key: &SecretKey) -> Self {
        let mut prk = Zeroizing::new([0u8; 32]);
        hmac::sign_to_buffer(&hmac::Key::new(hmac::HMAC_SHA256, VALUE_KEY_SALT), data_key.expose(), &mut prk[..])
            .expect("a 32-byte buffer holds an HMAC-SHA256 tag");
        ValueKeys(Prk::new_less_safe(HKDF_SHA256, &prk[..]))
    }

    /// The AES-256-GCM key of the value whose nonce starts with `salt` (12 bytes). The derived
    /// key bytes live only in a zeroizing buffer; the AEAD context aws-lc keeps is cleansed
    /// when it is freed.
    fn cipher(&self, salt: &[u8]) -> LessSafeKey {
        let info = [VALUE_KEY_INFO, salt];
        let mut key = Zeroizing::new([0u8; 32]);
        self.0
            .expand(&info, Aes256KeyLen)
            .and_then(|okm| okm.fill(&mut key[..]))
            .expect("32 bytes is a valid HKDF-SHA256 output length");
        aes_256_gcm(&key[..])
    }
}

/// An AES-256-GCM key object (aws-lc's `EVP_AEAD_CTX`, cleansed when freed).
fn aes_256_gcm(key: &[u8]) -> LessSafeKey {
    LessSafeKey::new(UnboundKey::new(&AES_256_GCM, key).expect("a 32-byte key is valid for AES-256-GCM"))
}

fn nonce(bytes: &[u8]) -> Result<aead::Nonce, DecryptionFailed> {
    aead::Nonce::try_assume_unique_for_key(bytes).map_err(|_| DecryptionFailed)
}

/// Encrypts `buf` in place under `key`, returning the tag.
fn gcm_seal(key: &LessSafeKey, nonce_bytes: &[u8], aad: &[u8], buf: &mut [u8]) -> [u8; TAG_LEN] {
    let tag = key
        .seal_in_place_separate_tag(nonce(nonce_bytes).expect("a GCM nonce is 12 bytes"), aead::Aad::from(aad), buf)
        .expect("AES-GCM refuses only inputs above 64 GiB, which PostgreSQL values cannot reach");
    let mut out = [0u8; TAG_LEN];
    out.copy_from_slice(tag.as_ref());
    out
}

/// Verifies `tag` and decrypts `ciphertext` into `out` (of the same length) under `key`. On
/// failure `out` holds nothing of the plaintext (aws-lc clears it), and callers zero it too.
fn gcm_open(key: &LessSafeKey, nonce_bytes: &[u8], aad: &[u8], ciphertext: &[u8], tag: &[u8], out: &mut [u8]) -> Result<(), DecryptionFailed> {
    if nonce_bytes.len() != GCM_NONCE_LEN || tag.len() != TAG_LEN || ciphertext.len() != out.len() {
        return Err(DecryptionFailed);
    }
    key.open_separate_gather(nonce(nonce_bytes)?, aead::Aad::from(aad), ciphertext, tag, out).map_err(|_| DecryptionFailed)
}

/// One key, ready to use. Values are sealed under keys derived from it (see the module docs);
/// the AES key schedule of the data key itself is kept for opening version 1 values and for
/// the raw known-answer tests. The cipher states are zeroized on drop (aws-lc cleanses its
/// AEAD contexts and aws-lc-rs its HKDF secret).
pub struct DataCipher {
    key_id: u32,
    aead: LessSafeKey,
    values: ValueKeys,
    sealed: AtomicU64,
}

impl DataCipher {
    pub fn new(key_id: u32, key: &SecretKey) -> Self {
        DataCipher {
            key_id,
            aead: aes_256_gcm(key.expose()),
            values: ValueKeys::new(key),
            sealed: AtomicU64::new(0),
        }
    }

    pub fn key_id(&self) -> u32 {
        self.key_id
    }

    /// How many values this cipher has sealed in this process.
    pub fn sealed_count(&self) -> u64 {
        self.sealed.load(Ordering::Relaxed)
    }

    /// Seals `plaintext` into `out`, which must be exactly `sealed_len(plaintext.len())` bytes.
    /// One copy of the plaintext, encrypted in place; no allocation.
    pub fn seal_into(&self, nonces: &mut NonceSource, context: &[u8], plaintext: &[u8], out: &mut [u8]) {
        self.seal_bound_into(nonces, context, 0, plaintext, out)
    }

    /// As [`DataCipher::seal_into`], for a value bound to blind-index column `binding` (see the
    /// envelope's layout).
    pub fn seal_bound_into(&self, nonces: &mut NonceSource, context: &[u8], binding: u32, plaintext: &[u8], out: &mut [u8]) {
        assert_eq!(out.len(), envelope::sealed_len(plaintext.len()), "output buffer has the wrong length");
        out[CIPHERTEXT_OFFSET..CIPHERTEXT_OFFSET + plaintext.len()].copy_from_slice(plaintext);
        self.seal_in_place(nonces, context, binding, out);
    }

    /// Seals the plaintext that already stands where the ciphertext goes in `out` (a version 2
    /// envelope's worth of bytes): writes the header and a fresh nonce, encrypts in place under
    /// the value's own key, appends the tag.
    fn seal_in_place(&self, nonces: &mut NonceSource, context: &[u8], binding: u32, out: &mut [u8]) {
        let (head, rest) = out.split_at_mut(CIPHERTEXT_OFFSET);
        envelope::write_header(head, self.key_id, binding);
        nonces.fill(&mut head[HEADER_LEN..CIPHERTEXT_OFFSET]);
        let (body, tag_out) = rest.split_at_mut(rest.len() - TAG_LEN);
        let aad = Aad::new(&head[..HEADER_LEN], context);
        let (salt, nonce) = head[HEADER_LEN..].split_at(GCM_NONCE_LEN);
        let tag = gcm_seal(&self.values.cipher(salt), nonce, aad.as_slice(), body);
        tag_out.copy_from_slice(&tag);
        self.sealed.fetch_add(1, Ordering::Relaxed);
    }

    /// The raw AES-256-GCM primitive under the data key itself (version 1 values were sealed
    /// so): encrypts `buf` in place under `nonce` (12 bytes) and `aad`, returning the tag.
    /// Callers outside this crate need it only for known-answer tests; values are sealed with
    /// [`DataCipher::seal_into`], which draws the nonce and derives the value's key.
    pub fn gcm_encrypt_in_place(&self, nonce: &[u8], aad: &[u8], buf: &mut [u8]) -> [u8; TAG_LEN] {
        gcm_seal(&self.aead, nonce, aad, buf)
    }

    /// The raw AES-256-GCM primitive that opening a version 1 value uses: verifies `tag` and
    /// decrypts `buf` in place under the data key. On failure `buf` is zeroed: nothing of a
    /// failed decryption is ever visible.
    pub fn gcm_decrypt_in_place(&self, nonce: &[u8], aad: &[u8], buf: &mut [u8], tag: &[u8]) -> Result<(), DecryptionFailed> {
        let ciphertext = buf.to_vec();
        let opened = gcm_open(&self.aead, nonce, aad, &ciphertext, tag, buf);
        if opened.is_err() {
            buf.fill(0);
        }
        opened
    }

    /// Moves a value from `old` to this cipher without a second buffer: the ciphertext is opened
    /// into `out` (exactly `sealed_len(env.plaintext_len())` bytes) with `old`, and sealed again in place
    /// under this cipher with a fresh nonce. The plaintext exists only inside `out`, between the
    /// two steps; on failure `out` is zeroed, as with [`DataCipher::open_into`]. The value keeps
    /// its blind-index binding.
    pub fn reseal_into(&self, old: &DataCipher, env: &Envelope<'_>, context: &[u8], nonces: &mut NonceSource, out: &mut [u8]) -> Result<(), DecryptionFailed> {
        self.reseal_bound_into(old, env, context, env.binding(), nonces, out)
    }

    /// As [`DataCipher::reseal_into`], binding the value to blind-index column `binding`.
    pub fn reseal_bound_into(
        &self,
        old: &DataCipher,
        env: &Envelope<'_>,
        context: &[u8],
        binding: u32,
        nonces: &mut NonceSource,
        out: &mut [u8],
    ) -> Result<(), DecryptionFailed> {
        let len = out.len();
        if len != envelope::sealed_len(env.plaintext_len()) || old.open_into(env, context, &mut out[CIPHERTEXT_OFFSET..len - TAG_LEN]).is_err() {
            out.fill(0);
            return Err(DecryptionFailed);
        }
        self.seal_in_place(nonces, context, binding, out);
        Ok(())
    }

    /// Seals into a new vector.
    pub fn seal(&self, nonces: &mut NonceSource, context: &[u8], plaintext: &[u8]) -> Vec<u8> {
        let mut out = vec![0u8; envelope::sealed_len(plaintext.len())];
        self.seal_into(nonces, context, plaintext, &mut out);
        out
    }

    /// Opens a parsed envelope into `out` (exactly `plaintext_len()` bytes). On failure `out` is
    /// zeroed: nothing of a failed decryption is ever visible.
    pub fn open_into(&self, env: &Envelope<'_>, context: &[u8], out: &mut [u8]) -> Result<(), DecryptionFailed> {
        if env.key_id() != self.key_id || out.len() != env.plaintext_len() {
            out.fill(0);
            return Err(DecryptionFailed);
        }
        let aad = Aad::new(env.header(), context);
        let opened = if env.version() == FORMAT_V1 {
            gcm_open(&self.aead, env.nonce(), aad.as_slice(), env.ciphertext(), env.tag(), out)
        } else {
            let (salt, nonce) = env.nonce().split_at(GCM_NONCE_LEN);
            gcm_open(&self.values.cipher(salt), nonce, aad.as_slice(), env.ciphertext(), env.tag(), out)
        };
        if opened.is_err() {
            out.fill(0);
            return Err(DecryptionFailed);
        }
        Ok(())
    }
}

/// The additional authenticated data: the envelope header followed by the caller's context,
/// built on the stack.
struct Aad {
    buf: [u8; HEADER_LEN + MAX_CONTEXT_LEN],
    len: usize,
}

impl Aad {
    fn new(header: &[u8], context: &[u8]) -> Self {
        assert!(context.len() <= MAX_CONTEXT_LEN, "AAD context too long");
        let mut buf = [0u8; HEADER_LEN + MAX_CONTEXT_LEN];
        buf[..HEADER_LEN].copy_from_slice(header);
        buf[HEADER_LEN..HEADER_LEN + context.len()].copy_from_slice(context);
        Aad { buf, len: HEADER_LEN + context.len() }
    }
    fn as_slice(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

/// Why opening an envelope failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OpenError {
    /// Not a well-formed envelope.
    Malformed(EnvelopeError),
    /// The envelope names a key id this keyring does not hold (retired, or not restored).
    UnknownKeyId(u32),
    /// Authentication failed. Opaque on purpose.
    Failed(DecryptionFailed),
}

impl fmt::Display for OpenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OpenError::Malformed(e) => write!(f, "malformed envelope: {e}"),
            OpenError::UnknownKeyId(id) => write!(f, "envelope was encrypted under key id {id}, which is not loaded"),
            OpenError::Failed(e) => e.fmt(f),
        }
    }
}
impl std::error::Error for OpenError {}

/// The keys a process can use: one current key for sealing plus older keys that may still open
/// values during a key change (as rustls keeps a current and a previous ticket key).
#[derive(Default)]
pub struct Keyring {
    current: Option<Arc<DataCipher>>,
    /// A database holds one or two key versions, three during a change: a vector searched
    /// linearly beats hashing here.
    all: Vec<(u32, Arc<DataCipher>)>,
}

impl Keyring {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a key that can open values; `current` makes it the key new values are sealed with.
    pub fn insert(&mut self, key_id: u32, key: &SecretKey, current: bool) {
        let cipher = Arc::new(DataCipher::new(key_id, key));
        if current {
            self.current = Some(cipher.clone());
        }
        self.all.retain(|(id, _)| *id != key_id);
        self.all.push((key_id, cipher));
    }

    /// Removes a key: values sealed under it can no longer be opened by this keyring.
    pub fn remove(&mut self, key_id: u32) {
        self.all.retain(|(id, _)| *id != key_id);
        if self.current.as_ref().map(|c| c.key_id()) == Some(key_id) {
            self.current = None;
        }
    }

    pub fn current(&self) -> Option<&Arc<DataCipher>> {
        self.current.as_ref()
    }

    pub fn get(&self, key_id: u32) -> Option<&Arc<DataCipher>> {
        self.all.iter().find(|(id, _)| *id == key_id).map(|(_, c)| c)
    }

    pub fn key_ids(&self) -> Vec<u32> {
        let mut ids: Vec<u32> = self.all.iter().map(|(id, _)| *id).collect();
        ids.sort_unstable();
        ids
    }

    pub fn is_empty(&self) -> bool {
        self.all.is_empty()
    }

    /// Parses and opens `bytes`, choosing the key by the envelope's key id.
    pub fn open(&self, bytes: &[u8], context: &[u8]) -> Result<Vec<u8>, OpenError> {
        let env = Envelope::parse(bytes).map_err(OpenError::Malformed)?;
        let cipher = self.get(env.key_id()).ok_or(OpenError::UnknownKeyId(env.key_id()))?;
        let mut out = vec![0u8; env.plaintext_len()];
        cipher.open_into(&env, context, &mut out).map_err(OpenError::Failed)?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring() -> Keyring {
        let mut k = Keyring::new();
        k.insert(1, &SecretKey::from_bytes([7; 32]), true);
        k
    }

    #[test]
    fn round_trip_and_context_binding() {
        let k = ring();
        let mut n = NonceSource::from_os();
        let c = k.current().unwrap();
        let env = c.seal(&mut n, b"text", b"hello");
        assert_eq!(env.len(), 5 + 45);
        assert_eq!(env[0], 2);
        assert_eq!(k.open(&env, b"text").unwrap(), b"hello");
        assert_eq!(k.open(&env, b"bytea"), Err(OpenError::Failed(DecryptionFailed)));
        assert_eq!(c.sealed_count(), 1);
    }

    #[test]
    fn same_plaintext_gives_different_envelopes() {
        let k = ring();
        let mut n = NonceSource::from_os();
        let c = k.current().unwrap();
        assert_ne!(c.seal(&mut n, b"", b"x"), c.seal(&mut n, b"", b"x"));
    }

    #[test]
    fn reseal_moves_a_value_to_the_new_key_and_fails_closed() {
        let mut k = ring();
        let mut n = NonceSource::from_os();
        let sealed = k.current().unwrap().seal(&mut n, b"text", b"a salary");
        k.insert(2, &SecretKey::from_bytes([8; 32]), true);
        let (old, new) = (k.get(1).unwrap().clone(), k.current().unwrap().clone());
        let env = Envelope::parse(&sealed).unwrap();
        let mut out = vec![0u8; sealed.len()];
        new.reseal_into(&old, &env, b"text", &mut n, &mut out).unwrap();
        // A version 1 value moves to version 2 (12 bytes longer).
        let mut v1 = vec![1u8];
        v1.extend_from_slice(&1u32.to_be_bytes());
        let mut aad = v1.clone();
        aad.extend_from_slice(b"text");
        v1.extend_from_slice(&[9u8; 12]);
        let mut body = b"a salary".to_vec();
        let tag = old.gcm_encrypt_in_place(&[9u8; 12], &aad, &mut body);
        v1.extend_from_slice(&body);
        v1.extend_from_slice(&tag);
        assert_eq!(k.open(&v1, b"text").unwrap(), b"a salary");
        let v1env = Envelope::parse(&v1).unwrap();
        let mut moved = vec![0u8; v1.len() + 12];
        new.reseal_into(&old, &v1env, b"text", &mut n, &mut moved).unwrap();
        assert_eq!((moved[0], Envelope::parse(&moved).unwrap().key_id()), (2, 2));
        assert_eq!(k.open(&moved, b"text").unwrap(), b"a salary");
        assert_eq!(Envelope::parse(&out).unwrap().key_id(), 2);
        assert_ne!(out[CIPHERTEXT_OFFSET..], sealed[CIPHERTEXT_OFFSET..]);
        assert_eq!(k.open(&out, b"text").unwrap(), b"a salary");
        // Wrong context, wrong old key, tampered tag, wrong length: an error and a zeroed buffer.
        let mut tampered = sealed.clone();
        *tampered.last_mut().unwrap() ^= 1;
        let tampered = Envelope::parse(&tampered).unwrap();
        let cases = [(&old, &env, &b"bytea"[..], sealed.len()), (&new, &env, &b"text"[..], sealed.len()), (&old, &tampered, &b"text"[..], sealed.len()), (&old, &env, &b"text"[..], sealed.len() + 1)];
        for (old_cipher, e, ctx, len) in cases {
            let mut out = vec![0xAAu8; len];
            assert_eq!(new.reseal_into(old_cipher, e, ctx, &mut n, &mut out), Err(DecryptionFailed));
            assert!(out.iter().all(|&b| b == 0));
        }
    }

    #[test]
    fn unknown_and_removed_keys() {
        let mut k = ring();
        let mut n = NonceSource::from_os();
        let env = k.current().unwrap().seal(&mut n, b"", b"v");
        k.insert(2, &SecretKey::from_bytes([8; 32]), true);
        assert_eq!(k.current().unwrap().key_id(), 2);
        assert_eq!(k.open(&env, b"").unwrap(), b"v");
        k.remove(1);
        assert_eq!(k.open(&env, b""), Err(OpenError::UnknownKeyId(1)));
    }

    #[test]
    fn wrong_key_with_same_id_fails() {
        let k = ring();
        let mut other = Keyring::new();
        other.insert(1, &SecretKey::from_bytes([9; 32]), true);
        let mut n = NonceSource::from_os();
        let env = other.current().unwrap().seal(&mut n, b"", b"secret");
        assert_eq!(k.open(&env, b""), Err(OpenError::Failed(DecryptionFailed)));
    }
}

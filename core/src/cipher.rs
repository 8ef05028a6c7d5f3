//! Sealing and opening one value with AES-256-GCM, and the keyring of cached ciphers.
//!
//! A value is sealed (envelope version 2) under a key derived from the data key:
//! `HKDF-SHA256(salt = "pg_cellcrypt v2", ikm = data key, info = "pg_cellcrypt value key" ||
//! first 12 nonce bytes)`, 32 bytes, with the last 12 nonce bytes as the GCM nonce (the shape
//! of XAES-256-GCM, built from HKDF so that no primitive is our own). Version 1 values are
//! opened with the data key itself.
//!
//! **Value keys are reused, nonces are not.** A process seals up to [`VALUES_PER_SALT`] values
//! with one salt (so one value key), each with its own random 96-bit GCM nonce, then draws a
//! new salt; the extension also ends the value key at the end of every transaction
//! ([`DataCipher::end_value_key`]), so a salt groups the values one backend sealed in one
//! transaction, much as the transaction id in their row headers does (a salt stays with a value
//! that an UPDATE of other columns or an `INSERT ... SELECT` copies; see the README's threat
//! model). Under one value key the chance that two of its at most 2^16 random
//! nonces collide is below 2^-65 (about N * 2^-81 over N values sealed in all); the 24-byte
//! nonce of every value is unique as before, and the format is unchanged (a reader cannot tell,
//! and values sealed one key per value keep opening). Deriving
//! a value key costs about 270 ns (an HMAC and an AES-GCM key set-up, whose GHASH table is
//! large on AVX-512 machines) against about 90 ns for sealing 100 bytes, so a key per value
//! would have quadrupled the cost of a small cell. Opening keeps the last [`OPEN_CACHE`] value
//! keys it derived: values written together (one transaction) share a salt and are usually read
//! together.
//!
//! The primitives are AWS-LC's, through `aws-lc-rs` (AES-256-GCM, HMAC-SHA256, HKDF-SHA256).
//! In a FIPS build (cargo feature `fips`) value keys are derived with the module's HKDF
//! (extract and expand, an approved KDF of SP 800-56C) and sealing uses the module's
//! `EVP_aead_aes_256_gcm_randnonce`, which draws the GCM nonce inside the module as FIPS 140-3
//! IG C.H asks. The bytes are the same either way (a unit test checks it).

use crate::envelope::{self, Envelope, CIPHERTEXT_OFFSET, FORMAT_V1, GCM_NONCE_LEN, HEADER_LEN, TAG_LEN};
use crate::error::{DecryptionFailed, EnvelopeError};
use crate::nonce::NonceSource;
use crate::secret::SecretKey;
use aws_lc_rs::aead::{self, LessSafeKey, UnboundKey, AES_256_GCM};
#[cfg(not(feature = "fips"))]
use aws_lc_rs::hmac;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use zeroize::Zeroizing;

/// Largest AAD context a caller may bind. Contexts are short type tags.
pub const MAX_CONTEXT_LEN: usize = 64;

/// HKDF's extract salt for value keys.
pub const VALUE_KEY_SALT: &[u8] = b"pg_cellcrypt v2";
/// The start of HKDF's `info` for a value key; the first 12 nonce bytes follow.
pub const VALUE_KEY_INFO: &[u8] = b"pg_cellcrypt value key";

/// Values one process seals under one value key (one salt) before it draws a new salt.
pub const VALUES_PER_SALT: u32 = 1 << 16;
/// Value keys kept for opening, per data key and process.
pub const OPEN_CACHE: usize = 8;

/// The value-key derivation of one data key.
///
/// The default build keeps the pseudorandom key as a keyed HMAC-SHA256 (aws-lc's `HMAC_CTX`
/// with the inner and outer pads already absorbed, cleansed when freed): HKDF-Expand of one
/// 32-byte block is `T(1) = HMAC-SHA256(PRK, info || 0x01)` (RFC 5869, 2.3), two SHA-256
/// blocks. aws-lc's `HKDF_expand` sets the HMAC key up again on every call. A FIPS build runs
/// the module's HKDF (extract and expand) from the data key instead, an approved service.
struct ValueKeys {
    #[cfg(not(feature = "fips"))]
    prk: hmac::Key,
    #[cfg(feature = "fips")]
    data_key: SecretKey,
}

impl ValueKeys {
    /// HKDF-Extract, once per data key: `PRK = HMAC-SHA256(salt, data key)` (RFC 5869, 2.2).
    /// The PRK passes through a zeroizing buffer into the keyed HMAC context.
    #[cfg(not(feature = "fips"))]
    fn new(data_key: &SecretKey) -> Self {
        let mut prk = Zeroizing::new([0u8; 32]);
        hmac::sign_to_buffer(&hmac::Key::new(hmac::HMAC_SHA256, VALUE_KEY_SALT), data_key.expose(), &mut prk[..])
            .expect("a 32-byte buffer holds an HMAC-SHA256 tag");
        ValueKeys { prk: hmac::Key::new(hmac::HMAC_SHA256, &prk[..]) }
    }

    #[cfg(feature = "fips")]
    fn new(data_key: &SecretKey) -> Self {
        ValueKeys { data_key: SecretKey::from_slice(data_key.expose()).expect("32 bytes") }
    }

    /// The 32-byte key of the values whose nonce starts with `salt` (12 bytes), in a zeroizing
    /// buffer: HKDF-Expand(PRK, VALUE_KEY_INFO || salt, 32).
    #[cfg(not(feature = "fips"))]
    fn value_key(&self, salt: &[u8]) -> Zeroizing<[u8; 32]> {
        let mut msg = [0u8; VALUE_KEY_INFO.len() + GCM_NONCE_LEN + 1];
        msg[..VALUE_KEY_INFO.len()].copy_from_slice(VALUE_KEY_INFO);
        msg[VALUE_KEY_INFO.len()..VALUE_KEY_INFO.len() + GCM_NONCE_LEN].copy_from_slice(salt);
        msg[VALUE_KEY_INFO.len() + GCM_NONCE_LEN] = 0x01;
        let mut key = Zeroizing::new([0u8; 32]);
        hmac::sign_to_buffer(&self.prk, &msg, &mut key[..]).expect("a 32-byte buffer holds an HMAC-SHA256 tag");
        key
    }

    #[cfg(feature = "fips")]
    fn value_key(&self, salt: &[u8]) -> Zeroizing<[u8; 32]> {
        value_key_hkdf(&self.data_key, salt)
    }
}

/// A value key by the module's HKDF service (`Salt::extract`, then expand): what a FIPS build
/// runs, and in the default build the reference the fast path is tested against.
#[cfg_attr(not(feature = "fips"), allow(dead_code))]
fn value_key_hkdf(data_key: &SecretKey, salt: &[u8]) -> Zeroizing<[u8; 32]> {
    use aws_lc_rs::hkdf::{Salt, HKDF_SHA256};
    let mut key = Zeroizing::new([0u8; 32]);
    Salt::new(HKDF_SHA256, VALUE_KEY_SALT)
        .extract(data_key.expose())
        .expand(&[VALUE_KEY_INFO, salt], crate::kdf::Len(32))
        .and_then(|okm| okm.fill(&mut key[..]))
        .expect("32 bytes is a valid HKDF-SHA256 output length");
    key
}

/// The key values are sealed with: the GCM nonce comes from the caller (drawn from the DRBG)
/// in the default build, and from inside the module in a FIPS build.
#[cfg(not(feature = "fips"))]
type SealKey = LessSafeKey;
#[cfg(feature = "fips")]
type SealKey = aead::RandomizedNonceKey;

#[cfg(not(feature = "fips"))]
fn seal_key(key: &[u8]) -> SealKey {
    aes_256_gcm(key)
}

#[cfg(feature = "fips")]
fn seal_key(key: &[u8]) -> SealKey {
    aead::RandomizedNonceKey::new(&AES_256_GCM, key).expect("a 32-byte key is valid for AES-256-GCM")
}

/// The value key this process seals with, and how many more values it may seal.
struct SealSlot {
    salt: [u8; GCM_NONCE_LEN],
    key: SealKey,
    left: u32,
    fork_generation: u64,
}

/// The value keys of one data key this process holds (each an aws-lc AEAD context, cleansed
/// when freed).
#[derive(Default)]
struct ValueKeyCache {
    seal: Option<SealSlot>,
    open: [Option<([u8; GCM_NONCE_LEN], LessSafeKey)>; OPEN_CACHE],
    next_open: usize,
}

impl ValueKeyCache {
    /// The slot to seal the next value with: the current one, or one under a fresh salt when
    /// it has sealed [`VALUES_PER_SALT`] values or the process forked since it was made.
    fn seal_slot(&mut self, values: &ValueKeys, nonces: &mut NonceSource) -> &mut SealSlot {
        let generation = crate::nonce::fork_generation();
        if !matches!(&self.seal, Some(s) if s.left > 0 && s.fork_generation == generation) {
            let mut salt = [0u8; GCM_NONCE_LEN];
            nonces.fill(&mut salt);
            let key = seal_key(&values.value_key(&salt)[..]);
            self.seal = Some(SealSlot { salt, key, left: VALUES_PER_SALT, fork_generation: generation });
        }
        let slot = self.seal.as_mut().expect("just set");
        slot.left -= 1;
        slot
    }

    /// The key that opens values whose nonce starts with `salt`.
    fn open_key(&mut self, values: &ValueKeys, salt: &[u8]) -> &LessSafeKey {
        let found = self.open.iter().position(|e| matches!(e, Some((s, _)) if s[..] == *salt));
        let i = match found {
            Some(i) => i,
            None => {
                let i = self.next_open;
                self.next_open = (i + 1) % OPEN_CACHE;
                let mut s = [0u8; GCM_NONCE_LEN];
                s.copy_from_slice(salt);
                self.open[i] = Some((s, aes_256_gcm(&values.value_key(salt)[..])));
                i
            }
        };
        &self.open[i].as_ref().expect("just set").1
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

/// The self-test of AES-256-GCM through the functions values use (NIST's GCM test case 14: zero
/// key, zero nonce, one zero block), sealing and opening.
/// A FIPS build does not seal with a caller's nonce (a non-approved service there): it opens
/// the vector, and seals and opens a block through the module's random-nonce key instead.
pub(crate) fn gcm_known_answer() -> bool {
    let key = aes_256_gcm(&[0u8; 32]);
    let (ct, tag) = (hex16("cea7403d4d606b6e074ec5d3baf39d18"), hex16("d0d1c8a799996bf0265b98b5d48ab919"));
    let mut back = [0xffu8; 16];
    let opens = gcm_open(&key, &[0u8; 12], &[], &ct, &tag, &mut back).is_ok() && back == [0u8; 16];
    let mut bad_tag = tag;
    bad_tag[0] ^= 1;
    let refuses = gcm_open(&key, &[0u8; 12], &[], &ct, &bad_tag, &mut back).is_err();
    opens && refuses && seal_known_answer(&key, &ct, &tag)
}

#[cfg(not(feature = "fips"))]
fn seal_known_answer(key: &LessSafeKey, ct: &[u8; 16], tag: &[u8; 16]) -> bool {
    let mut buf = [0u8; 16];
    let t = gcm_seal(key, &[0u8; 12], &[], &mut buf);
    buf == *ct && t == *tag
}

#[cfg(feature = "fips")]
fn seal_known_answer(_key: &LessSafeKey, _ct: &[u8; 16], _tag: &[u8; 16]) -> bool {
    let k = seal_key(&[0x24u8; 32]);
    let mut buf = *b"sixteen byte msg";
    let Ok((nonce, t)) = k.seal_in_place_separate_tag(aead::Aad::from(&b"aad"[..]), &mut buf) else { return false };
    let mut back = [0u8; 16];
    let opener = aes_256_gcm(&[0x24u8; 32]);
    buf != *b"sixteen byte msg" && gcm_open(&opener, nonce.as_ref(), b"aad", &buf, t.as_ref(), &mut back).is_ok() && back == *b"sixteen byte msg"
}

/// The self-test of the value-key derivation this build runs, against RFC 5869's HKDF
/// computed by another implementation (Python's hmac).
pub(crate) fn value_key_known_answer() -> bool {
    let salt: Vec<u8> = (0u8..12).collect();
    let key = ValueKeys::new(&SecretKey::from_bytes([0x11; 32])).value_key(&salt);
    key[..] == hex_bytes("3d10566e551a82d6e3e8393c0958cfb5a4d9af57dda56a917ac22d3d769bb3c9")[..]
}

fn hex16(s: &str) -> [u8; 16] {
    let mut out = [0u8; 16];
    out.copy_from_slice(&hex_bytes(s));
    out
}

pub(crate) fn hex_bytes(s: &str) -> Vec<u8> {
    (0..s.len() / 2).map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).expect("hex")).collect()
}

/// One key, ready to use. Values are sealed under keys derived from it (see the module docs);
/// the AES key schedule of the data key itself is kept for opening version 1 values and for
/// the raw known-answer tests. The cipher states are zeroized on drop (aws-lc cleanses its
/// AEAD contexts and aws-lc-rs its HKDF secret).
pub struct DataCipher {
    key_id: u32,
    aead: LessSafeKey,
    values: ValueKeys,
    cache: Mutex<ValueKeyCache>,
    sealed: AtomicU64,
}

impl DataCipher {
    pub fn new(key_id: u32, key: &SecretKey) -> Self {
        DataCipher {
            key_id,
            aead: aes_256_gcm(key.expose()),
            values: ValueKeys::new(key),
            cache: Mutex::new(ValueKeyCache::default()),
            sealed: AtomicU64::new(0),
        }
    }

    pub fn key_id(&self) -> u32 {
        self.key_id
    }

    /// Stops sealing under the current value key: the next value draws a new salt. The
    /// extension calls it at the end of every transaction, so that two transactions never
    /// share a salt (a salt in the clear would otherwise link the values a backend wrote
    /// across transactions: different users of one pooled connection, say).
    pub fn end_value_key(&self) {
        self.cache.lock().unwrap_or_else(PoisonError::into_inner).seal = None;
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
    /// envelope's worth of bytes): writes the header, the salt of the current value key and a
    /// fresh GCM nonce, encrypts in place, appends the tag.
    fn seal_in_place(&self, nonces: &mut NonceSource, context: &[u8], binding: u32, out: &mut [u8]) {
        let (head, rest) = out.split_at_mut(CIPHERTEXT_OFFSET);
        envelope::write_header(head, self.key_id, binding);
        let (body, tag_out) = rest.split_at_mut(rest.len() - TAG_LEN);
        let aad = Aad::new(&head[..HEADER_LEN], context);
        let (salt_out, nonce_out) = head[HEADER_LEN..].split_at_mut(GCM_NONCE_LEN);
        let mut cache = self.cache.lock().unwrap_or_else(PoisonError::into_inner);
        let slot = cache.seal_slot(&self.values, nonces);
        salt_out.copy_from_slice(&slot.salt);
        #[cfg(not(feature = "fips"))]
        let tag = {
            nonces.fill(nonce_out);
            gcm_seal(&slot.key, nonce_out, aad.as_slice(), body)
        };
        #[cfg(feature = "fips")]
        let tag = {
            let (nonce, tag) = slot
                .key
                .seal_in_place_separate_tag(aead::Aad::from(aad.as_slice()), body)
                .expect("AES-GCM refuses only inputs above 64 GiB, which PostgreSQL values cannot reach");
            nonce_out.copy_from_slice(nonce.as_ref());
            let mut t = [0u8; TAG_LEN];
            t.copy_from_slice(tag.as_ref());
            t
        };
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
            let mut cache = self.cache.lock().unwrap_or_else(PoisonError::into_inner);
            gcm_open(cache.open_key(&self.values, salt), nonce, aad.as_slice(), env.ciphertext(), env.tag(), out)
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

    /// [`DataCipher::end_value_key`] on every key: values sealed from now on draw new salts.
    pub fn end_value_keys(&self) {
        for (_, c) in &self.all {
            c.end_value_key();
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

    #[test]
    fn value_key_paths_agree_and_match_rfc_5869() {
        assert!(gcm_known_answer());
        assert!(value_key_known_answer());
        let data = SecretKey::from_bytes([0x42; 32]);
        let values = ValueKeys::new(&data);
        for salt in [[0u8; 12], [0xff; 12], *b"0123456789ab"] {
            assert_eq!(values.value_key(&salt)[..], value_key_hkdf(&data, &salt)[..]);
        }
    }

    #[test]
    fn a_value_key_seals_at_most_values_per_salt_values_then_a_new_salt_is_drawn() {
        let _serial = crate::nonce::FORK_TESTS.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let c = DataCipher::new(1, &SecretKey::random());
        let mut n = NonceSource::from_os();
        let salt = |v: &[u8]| v[HEADER_LEN..HEADER_LEN + GCM_NONCE_LEN].to_vec();
        let nonce = |v: &[u8]| v[HEADER_LEN + GCM_NONCE_LEN..CIPHERTEXT_OFFSET].to_vec();
        let first = c.seal(&mut n, b"t", b"x");
        let mut nonces = std::collections::HashSet::new();
        nonces.insert(nonce(&first));
        for _ in 1..VALUES_PER_SALT {
            let v = c.seal(&mut n, b"t", b"x");
            assert_eq!(salt(&v), salt(&first));
            assert!(nonces.insert(nonce(&v)), "a GCM nonce repeated under one value key");
        }
        let next = c.seal(&mut n, b"t", b"x");
        assert_ne!(salt(&next), salt(&first), "the {}th value drew a new salt", VALUES_PER_SALT + 1);
        // A fork gives the child a new salt at once.
        crate::nonce::tests_bump_fork_generation();
        let after_fork = c.seal(&mut n, b"t", b"x");
        assert_ne!(salt(&after_fork), salt(&next));
    }

    #[test]
    fn values_of_more_salts_than_the_open_cache_holds_open_in_any_order() {
        let _serial = crate::nonce::FORK_TESTS.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let c = DataCipher::new(1, &SecretKey::random());
        let mut n = NonceSource::from_os();
        let mut sealed = Vec::new();
        for i in 0..(OPEN_CACHE * 2 + 1) {
            // Each fork makes the next value draw a new salt.
            crate::nonce::tests_bump_fork_generation();
            sealed.push((i, c.seal(&mut n, b"t", format!("value {i}").as_bytes())));
        }
        let salts: std::collections::HashSet<_> = sealed.iter().map(|(_, v)| v[HEADER_LEN..HEADER_LEN + GCM_NONCE_LEN].to_vec()).collect();
        assert_eq!(salts.len(), sealed.len());
        for order in [sealed.iter().collect::<Vec<_>>(), sealed.iter().rev().collect(), sealed.iter().step_by(3).chain(sealed.iter()).collect()] {
            for (i, v) in order {
                let env = Envelope::parse(v).unwrap();
                let mut out = vec![0u8; env.plaintext_len()];
                c.open_into(&env, b"t", &mut out).unwrap();
                assert_eq!(out, format!("value {i}").as_bytes());
                let mut bad = vec![0u8; env.plaintext_len()];
                assert!(c.open_into(&env, b"other context", &mut bad).is_err());
            }
        }
    }

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

//! The encrypted column types: `encrypted_text`, `encrypted_bytea`, `encrypted_jsonb`,
//! `encrypted_numeric`, `encrypted_date`, `encrypted_timestamptz` and `encrypted_int8`.
//!
//! One implementation serves all seven. On disk a value is a varlena holding one envelope
//! (see `cellcrypt_core::envelope`): 45 bytes of overhead plus the varlena header (33 for values
//! written by development builds before 0.1.0, in format version 1). What is
//! sealed is the plaintext's own representation:
//!
//! | type | plaintext bytes | AAD context |
//! |---|---|---|
//! | `encrypted_text` | the text's bytes, in the database encoding | `text;<encoding>` |
//! | `encrypted_bytea` | the bytes | `bytea` |
//! | `encrypted_jsonb` | PostgreSQL's jsonb binary image | `jsonb;le;<encoding>` |
//! | `encrypted_numeric` | PostgreSQL's numeric binary image | `numeric;le` |
//! | `encrypted_date` | the day number, 4 bytes big-endian | `date` |
//! | `encrypted_timestamptz` | microseconds since 2000-01-01 UTC, 8 bytes big-endian | `timestamptz` |
//! | `encrypted_int8` | 8 bytes big-endian | `int8` |
//!
//! The context binds the plaintext type (and, where the image depends on them, the database
//! encoding and the byte order), so a value moved to another type, or into a database where its
//! bytes would mean something else, fails to decrypt instead of returning wrong plaintext.
//!
//! ## SQL surface (the install SQL is at the end of this file)
//! * input: text that starts with `$cc$` is an envelope, taken as is (that is how `pg_dump`
//!   output is restored) and must be well-formed (else 22P02); anything else is plaintext of
//!   the plain type and is encrypted;
//! * output: the envelope's text form, `$cc$` + base64, safe to show, dump and log;
//! * send/recv: the envelope bytes (binary COPY round-trips; recv accepts only envelopes);
//! * `encrypt(plain)`: always encrypts; it is the ASSIGNMENT cast from the plain type (and from
//!   `varchar` to `encrypted_text`), so parameters typed as the plain type encrypt on INSERT;
//! * `decrypt(encrypted)`: the plaintext; also the EXPLICIT cast back to the plain type.
//!   Only superusers and members of `data_encryption_reader` may decrypt: the function checks
//!   membership itself and refuses others with 42501 and a hint (see `policy.rs`).

use crate::backend_local::BackendLocal;
use crate::{errors, keys};
use cellcrypt_core::envelope::{self, Envelope};
use cellcrypt_core::DataCipher;
use pgrx::pg_sys::{self, Datum, Oid};
use pgrx::prelude::*;
use pgrx::PgSqlErrorCode;
use std::cell::RefCell;
use std::ffi::CStr;

/// The plain types that have an encrypted counterpart.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Kind {
    Text,
    Bytea,
    Jsonb,
    Numeric,
    Date,
    Timestamptz,
    Int8,
}

impl Kind {
    pub const ALL: [Kind; 7] = [Kind::Text, Kind::Bytea, Kind::Jsonb, Kind::Numeric, Kind::Date, Kind::Timestamptz, Kind::Int8];

    pub const fn plain_name(self) -> &'static str {
        match self {
            Kind::Text => "text",
            Kind::Bytea => "bytea",
            Kind::Jsonb => "jsonb",
            Kind::Numeric => "numeric",
            Kind::Date => "date",
            Kind::Timestamptz => "timestamptz",
            Kind::Int8 => "int8",
        }
    }

    pub const fn type_name(self) -> &'static str {
        match self {
            Kind::Text => "encrypted_text",
            Kind::Bytea => "encrypted_bytea",
            Kind::Jsonb => "encrypted_jsonb",
            Kind::Numeric => "encrypted_numeric",
            Kind::Date => "encrypted_date",
            Kind::Timestamptz => "encrypted_timestamptz",
            Kind::Int8 => "encrypted_int8",
        }
    }

    fn plain_oid(self) -> Oid {
        match self {
            Kind::Text => pg_sys::TEXTOID,
            Kind::Bytea => pg_sys::BYTEAOID,
            Kind::Jsonb => pg_sys::JSONBOID,
            Kind::Numeric => pg_sys::NUMERICOID,
            Kind::Date => pg_sys::DATEOID,
            Kind::Timestamptz => pg_sys::TIMESTAMPTZOID,
            Kind::Int8 => pg_sys::INT8OID,
        }
    }

    /// Length of the plaintext image of pass-by-value types.
    const fn fixed_len(self) -> Option<usize> {
        match self {
            Kind::Date => Some(4),
            Kind::Timestamptz | Kind::Int8 => Some(8),
            _ => None,
        }
    }

    fn from_type_name(name: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.type_name() == name)
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Type OID → kind, learned on first sight (the types' OIDs differ per database).
static KIND_BY_OID: BackendLocal<RefCell<Vec<(Oid, Kind)>>> = BackendLocal::new(RefCell::new(Vec::new()));
/// AAD contexts, built once per backend (they depend on the database encoding).
static CONTEXTS: BackendLocal<RefCell<Option<[Vec<u8>; 7]>>> = BackendLocal::new(RefCell::new(None));

fn kind_of_type(typoid: Oid) -> Kind {
    if let Some(k) = KIND_BY_OID.with(|m| m.borrow().iter().find(|(o, _)| *o == typoid).map(|(_, k)| *k)) {
        return k;
    }
    // SAFETY: syscache lookup of a type that exists (we are its I/O function).
    let name = unsafe { CStr::from_ptr(pg_sys::format_type_be(typoid)) }.to_string_lossy().into_owned();
    let bare = name.rsplit('.').next().unwrap_or(&name).trim_matches('"');
    let kind = Kind::from_type_name(bare).unwrap_or_else(|| {
        errors::raise(
            PgSqlErrorCode::ERRCODE_DATATYPE_MISMATCH,
            format!("type {name} is not a pg_cellcrypt encrypted type"),
            None,
            None,
        )
    });
    KIND_BY_OID.with(|m| m.borrow_mut().push((typoid, kind)));
    kind
}

fn with_context<R>(kind: Kind, f: impl FnOnce(&[u8]) -> R) -> R {
    CONTEXTS.with(|c| {
        let mut c = c.borrow_mut();
        let ctx = c.get_or_insert_with(|| {
            // SAFETY: the database encoding is fixed for the life of a backend.
            let enc = unsafe { CStr::from_ptr(pg_sys::GetDatabaseEncodingName()) }.to_string_lossy().into_owned();
            let order = if cfg!(target_endian = "little") { "le" } else { "be" };
            Kind::ALL.map(|k| match k {
                Kind::Text => format!("text;{enc}"),
                Kind::Jsonb => format!("jsonb;{order};{enc}"),
                Kind::Numeric => format!("numeric;{order}"),
                other => other.plain_name().to_owned(),
            }
            .into_bytes())
        });
        f(&ctx[kind.index()])
    })
}

// ---------------------------------------------------------------------------------------------
// Varlena helpers

/// The bytes of a varlena datum, detoasted (short headers are read in place).
///
/// # Safety
/// `d` must be a non-null varlena datum valid for the current memory context.
pub(crate) unsafe fn varlena_bytes<'a>(d: Datum) -> &'a [u8] {
    let p = d.cast_mut_ptr::<pg_sys::varlena>();
    // pg_detoast_datum_packed's own test, done here: an inline, uncompressed value (every
    // cell-sized one) is read where it lies, without a guarded call into the server per value.
    let p = if pgrx::varlena::varatt_is_1b_e(p) || pgrx::varlena::varatt_is_4b_c(p) { pg_sys::pg_detoast_datum_packed(p) } else { p };
    std::slice::from_raw_parts(pgrx::varlena::vardata_any(p) as *const u8, pgrx::varlena::varsize_any_exhdr(p))
}

/// PostgreSQL's MaxAllocSize: the largest value palloc hands out (1 GB - 1).
const MAX_ALLOC_SIZE: usize = 0x3fff_ffff;

/// A new palloc'd varlena of `len` data bytes, filled by `fill`.
pub(crate) fn new_varlena(len: usize, fill: impl FnOnce(&mut [u8])) -> Datum {
    let total = len + pg_sys::VARHDRSZ;
    if total > MAX_ALLOC_SIZE {
        errors::raise(
            PgSqlErrorCode::ERRCODE_PROGRAM_LIMIT_EXCEEDED,
            format!("encrypted value would be {total} bytes, more than the 1 GB limit of a PostgreSQL value"),
            None,
            None,
        );
    }
    // SAFETY: palloc raises on failure; we write exactly `total` bytes.
    unsafe {
        let p = pg_sys::palloc(total) as *mut pg_sys::varlena;
        pgrx::varlena::set_varsize_4b(p, total as i32);
        let data = std::slice::from_raw_parts_mut((p as *mut u8).add(pg_sys::VARHDRSZ), len);
        fill(data);
        Datum::from(p)
    }
}

// ---------------------------------------------------------------------------------------------
// Encrypting and decrypting

/// Seals `plaintext` under the database's current key into a new encrypted datum.
pub fn seal(kind: Kind, plaintext: &[u8]) -> Datum {
    seal_bound(kind, plaintext, 0)
}

/// Seals `plaintext` bound to blind-index column `binding` (0: none), and remembers the value
/// as written from plaintext by this backend (see [`bind_to_column`]).
fn seal_bound(kind: Kind, plaintext: &[u8], binding: u32) -> Datum {
    let keys = keys::loaded();
    let cipher = current_cipher(&keys);
    new_varlena(envelope::sealed_len(plaintext.len()), |out| {
        with_context(kind, |ctx| keys::with_nonces(|n| cipher.seal_bound_into(n, ctx, binding, plaintext, out)));
        FRESH.with(|f| f.borrow_mut().remember(&out[envelope::HEADER_LEN..envelope::CIPHERTEXT_OFFSET]));
    })
}

// ---------------------------------------------------------------------------------------------
// Blind-index bindings (see blind_index.rs)

/// The last values this backend sealed from plaintext: their nonces, with the role that sealed
/// each. A value among them, met again by the same role, was written from its plaintext by
/// that role (a parameter cast with encrypt(), then assigned to the column; a literal, which
/// PostgreSQL encrypts before it applies the column's type modifier), so binding it to a column
/// tells that role nothing it did not know. A value sealed by another role (a SECURITY DEFINER
/// function of a reader, say, or before a SET ROLE) is not fresh for this one.
struct Fresh {
    entries: [([u8; envelope::NONCE_LEN], Oid); FRESH_LEN],
    next: usize,
}

/// How many values the ring remembers: a statement prepared with a literal for a registered
/// column must run before this many other values are sealed in its session.
const FRESH_LEN: usize = 256;

impl Fresh {
    fn remember(&mut self, nonce: &[u8]) {
        // SAFETY: the current user, backend state.
        let user = unsafe { pg_sys::GetUserId() };
        let e = &mut self.entries[self.next];
        e.0.copy_from_slice(nonce);
        e.1 = user;
        self.next = (self.next + 1) % FRESH_LEN;
    }

    /// Newest first: a value is usually bound right after it was sealed.
    fn contains(&self, nonce: &[u8]) -> bool {
        // SAFETY: the current user, backend state.
        let user = unsafe { pg_sys::GetUserId() };
        (1..=FRESH_LEN).map(|back| &self.entries[(self.next + FRESH_LEN - back) % FRESH_LEN]).any(|(n, u)| n[..] == *nonce && *u == user)
    }
}

static FRESH: BackendLocal<RefCell<Fresh>> =
    BackendLocal::new(RefCell::new(Fresh { entries: [([0; envelope::NONCE_LEN], pg_sys::InvalidOid); FRESH_LEN], next: 0 }));

/// The same value, re-sealed under the current key and bound to blind-index column `binding`.
///
/// # Safety
/// `d` must be a non-null `encrypted_text` datum.
pub unsafe fn rebind(d: Datum, binding: u32) -> Datum {
    let keys = keys::loaded();
    let env = envelope_of(Kind::Text, d);
    reseal(Kind::Text, &keys, &env, binding, "bind", "The value comes from another database or was encrypted under a retired key.")
}

/// `env` re-sealed under the current key and bound to blind-index column `binding` (0: none), in
/// a new datum: opened and sealed again inside that datum's own buffer, so the plaintext has no
/// second copy. Raises 42704 (with `doing` and `hint`) when this database lacks the key `env`
/// is under, and XX001 when it does not open.
///
/// # Safety
/// `env` must be the envelope of a datum of `kind`'s encrypted type.
unsafe fn reseal(kind: Kind, keys: &keys::LoadedKeys, env: &Envelope, binding: u32, doing: &str, hint: &str) -> Datum {
    let old = cipher_of(keys, kind, env.key_id(), doing, hint);
    let new = current_cipher(keys);
    let mut ok = false;
    let out = new_varlena(envelope::sealed_len(env.plaintext_len()), |out| {
        ok = with_context(kind, |ctx| keys::with_nonces(|n| new.reseal_bound_into(old, env, ctx, binding, n, out))).is_ok();
    });
    if !ok {
        pg_sys::pfree(out.cast_mut_ptr());
        errors::decryption_failed(kind.type_name());
    }
    out
}

/// The value to store in an `encrypted_text` column of typmod `typmod` (a column registered
/// for a blind index has its binding id as typmod): the value itself when it is already bound
/// to that column; else bound to it, when it was just written from plaintext by this backend or
/// the caller may decrypt; else refused (42501). Otherwise anyone able to copy envelopes into a
/// registered column could compute the blind index of values from any other column.
///
/// # Safety
/// `d` must be a non-null `encrypted_text` datum.
pub unsafe fn bind_to_column(d: Datum, typmod: i32) -> Datum {
    if typmod <= 0 {
        return d;
    }
    let binding = typmod as u32;
    let env = envelope_of(Kind::Text, d);
    if env.binding() == binding {
        return d;
    }
    let fresh = env.binding() == 0 && FRESH.with(|f| f.borrow().contains(env.nonce()));
    if !fresh && !crate::roles::current_user_has(crate::roles::READER) {
        errors::raise(
            PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
            "permission denied to copy an encrypted value into a column with a blind index",
            Some("Values of a column registered for a blind index are bound to it when they are written as plaintext. A value copied from elsewhere could otherwise have its blind index computed without the right to decrypt it."),
            Some("Write the plaintext (it is encrypted and bound to the column), or copy the values as a member of data_encryption_reader."),
        )
    }
    rebind(d, binding)
}

// typmod_in(cstring[]) → integer: `encrypted_text(<blind-index column id>)`, as
// register_blind_index() declares a registered column.
v1_function!(pg_finfo_cellcrypt_typmod_in, cellcrypt_typmod_in, |fcinfo| {
    let mut n = 0;
    let items = pg_sys::ArrayGetIntegerTypmods(arg(fcinfo, 0).cast_mut_ptr(), &mut n);
    let id = if n == 1 { *items } else { -1 };
    if !(1..=envelope::MAX_BINDING as i32).contains(&id) {
        errors::raise(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            "invalid type modifier for encrypted_text: it is the id of a column registered for a blind index (1 to 65535)",
            None,
            Some("Register a column with SELECT register_blind_index('table', 'column', 'normalization'); rather than writing the modifier yourself."),
        )
    }
    Datum::from(id)
});

// typmod_out(integer) → cstring: `(<id>)`.
v1_function!(pg_finfo_cellcrypt_typmod_out, cellcrypt_typmod_out, |fcinfo| {
    let typmod = arg(fcinfo, 0).value() as i32;
    let text = if typmod > 0 { format!("({typmod})") } else { String::new() };
    let c = std::ffi::CString::new(text).expect("no NUL");
    Datum::from(pg_sys::pstrdup(c.as_ptr()))
});

// cellcrypt.bind_to_column(encrypted_text, typmod integer, explicit boolean) → encrypted_text:
// the length-coercion cast that PostgreSQL applies to every value stored into a column of
// typmod `typmod` (see bind_to_column).
v1_function!(pg_finfo_cellcrypt_bind_to_column, cellcrypt_bind_to_column, |fcinfo| {
    bind_to_column(arg(fcinfo, 0), arg(fcinfo, 1).value() as i32)
});

/// The cipher of the current key; raises when the database has none.
fn current_cipher(keys: &keys::LoadedKeys) -> &DataCipher {
    match keys.ring.current() {
        Some(cipher) => cipher,
        None => keys::KeyUnavailable::NoKeyConfigured.raise(),
    }
}

/// The envelope in `d`; raises XX001 when it is not one.
///
/// # Safety
/// `d` must be a non-null varlena datum valid for the current memory context.
unsafe fn envelope_of<'a>(kind: Kind, d: Datum) -> Envelope<'a> {
    match Envelope::parse(varlena_bytes(d)) {
        Ok(env) => env,
        Err(_) => errors::decryption_failed(kind.type_name()),
    }
}

/// The cipher of key version `key_id`; raises 42704, saying what could not be done and what to
/// do about it, when this database does not have that version.
fn cipher_of<'k>(keys: &'k keys::LoadedKeys, kind: Kind, key_id: u32, doing: &str, hint: &str) -> &'k DataCipher {
    match keys.ring.get(key_id) {
        Some(cipher) => cipher,
        None => {
            let ids = keys.ring.key_ids();
            // The version right after this node's newest, in a Citus database: this may be a
            // worker whose part of a cluster key change is still prepared (the coordinator
            // committed; COMMIT PREPARED has not arrived). Not a lost value: say how to finish
            // the change, after the caller's hint. (No role lookup here: this runs in parallel
            // workers too, where switching users is not allowed.)
            let next_version = ids.last().is_some_and(|&newest| newest.checked_add(1) == Some(key_id));
            let hint = if next_version && crate::citus::citus_in_database() {
                format!(
                    "{hint} On a Citus worker, its part of a cluster key change may still be prepared (pg_prepared_xacts; never ROLLBACK PREPARED it): a superuser runs SELECT recover_prepared_transactions(); on the coordinator, or Citus does it within citus.recover_2pc_interval."
                )
            } else {
                hint.to_owned()
            };
            errors::unknown_key_version(kind.type_name(), key_id, &ids, doing, &hint)
        }
    }
}

/// Encrypts a datum of the plain type.
///
/// # Safety
/// `d` must be a non-null datum of `kind`'s plain type.
pub unsafe fn encrypt_plain_datum(kind: Kind, d: Datum) -> Datum {
    match kind.fixed_len() {
        Some(4) => seal(kind, &(d.value() as i32).to_be_bytes()),
        Some(_) => seal(kind, &(d.value() as i64).to_be_bytes()),
        None => seal(kind, varlena_bytes(d)),
    }
}

/// The blind-index column an `encrypted_text` value is bound to (0: none).
///
/// # Safety
/// `d` must be a non-null `encrypted_text` datum.
pub unsafe fn binding_of(d: Datum) -> u32 {
    envelope_of(Kind::Text, d).binding()
}

/// True when `typoid` is this extension's `encrypted_text` (not a type of that name elsewhere).
pub fn is_encrypted_text(typoid: Oid) -> bool {
    let schema = crate::store::extension_namespace();
    if schema == pg_sys::InvalidOid {
        return false;
    }
    // SAFETY: a syscache lookup, released before returning; NULL for a missing type.
    unsafe {
        let tup = pg_sys::SearchSysCache1(pg_sys::SysCacheIdentifier::TYPEOID as i32, Datum::from(typoid));
        if tup.is_null() {
            return false;
        }
        let t = pg_sys::heap_tuple_get_struct::<pg_sys::FormData_pg_type>(tup);
        let ours = CStr::from_ptr((*t).typname.data.as_ptr()).to_bytes() == b"encrypted_text" && (*t).typnamespace == schema;
        pg_sys::ReleaseSysCache(tup);
        ours
    }
}

/// Raises 42501 unless the current user may decrypt.
pub fn check_reader() {
    if !crate::roles::current_user_has(crate::roles::READER) {
        errors::decrypt_denied()
    }
}

/// Raises 42501 unless the current user may decrypt, remembering a positive answer for this
/// call site and user in `fn_extra` (as PostgreSQL checks EXECUTE once per query, not per row).
///
/// # Safety
/// `fcinfo` must be the call's own.
unsafe fn check_reader_at(fcinfo: pg_sys::FunctionCallInfo) {
    let flinfo = (*fcinfo).flinfo;
    let user = pg_sys::GetUserId();
    if fn_extra::<Oid>(flinfo) == Some(user) {
        return;
    }
    check_reader();
    set_fn_extra(flinfo, user);
}

/// What this call site keeps in `fn_extra`, if anything. Each function stores one type there.
///
/// # Safety
/// `flinfo` must be null or the call's own, and its `fn_extra` null or set by [`set_fn_extra`]
/// with the same `T`.
pub(crate) unsafe fn fn_extra<T: Copy>(flinfo: *mut pg_sys::FmgrInfo) -> Option<T> {
    if flinfo.is_null() || (*flinfo).fn_extra.is_null() {
        None
    } else {
        Some(*((*flinfo).fn_extra as *const T))
    }
}

/// Keeps `value` for this call site, in the call site's memory context (nothing without an
/// `FmgrInfo`).
///
/// # Safety
/// As for [`fn_extra`].
pub(crate) unsafe fn set_fn_extra<T: Copy>(flinfo: *mut pg_sys::FmgrInfo, value: T) {
    if flinfo.is_null() {
        return;
    }
    if (*flinfo).fn_extra.is_null() {
        (*flinfo).fn_extra = pg_sys::MemoryContextAlloc((*flinfo).fn_mcxt, std::mem::size_of::<T>());
    }
    ((*flinfo).fn_extra as *mut T).write(value);
}

/// Decrypts an encrypted datum into a datum of the plain type. The caller has checked that
/// the current user may decrypt.
///
/// # Safety
/// `d` must be a non-null datum of `kind`'s encrypted type.
pub unsafe fn decrypt_datum(kind: Kind, d: Datum) -> Datum {
    let env = envelope_of(kind, d);
    let keys = keys::loaded();
    let cipher = cipher_of(
        &keys,
        kind,
        env.key_id(),
        "decrypt",
        "The value comes from another database or was encrypted under a retired key. Restore it from a backup of this database.",
    );
    with_context(kind, |ctx| match kind.fixed_len() {
        Some(n) => {
            let mut buf = zeroize::Zeroizing::new([0u8; 8]);
            if env.plaintext_len() != n || cipher.open_into(&env, ctx, &mut buf[..n]).is_err() {
                errors::decryption_failed(kind.type_name());
            }
            if n == 4 {
                Datum::from(i32::from_be_bytes(buf[..4].try_into().unwrap()))
            } else {
                Datum::from(i64::from_be_bytes(buf[..8].try_into().unwrap()))
            }
        }
        None => {
            let mut ok = true;
            let out = new_varlena(env.plaintext_len(), |out| ok = cipher.open_into(&env, ctx, out).is_ok());
            if !ok {
                pg_sys::pfree(out.cast_mut_ptr());
                errors::decryption_failed(kind.type_name());
            }
            out
        }
    })
}

/// Re-seals an encrypted datum under the current key. A value already under the current key is
/// returned as is. The plaintext exists only in a zeroized buffer inside this function.
///
/// # Safety
/// `d` must be a non-null datum of `kind`'s encrypted type.
pub unsafe fn reencrypt_datum(kind: Kind, d: Datum) -> Datum {
    let keys = keys::loaded();
    let env = envelope_of(kind, d);
    if env.key_id() == keys.current_version {
        return d;
    }
    // A value keeps its blind-index binding.
    let out = reseal(
        kind,
        &keys,
        &env,
        env.binding(),
        "re-encrypt",
        "Find the row with WHERE encryption_key_version(column) = <version> and restore it from a backup, or delete it; then change the key again.",
    );
    RESEALED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    out
}

/// Values this backend has moved to the current key with [`reencrypt_datum`] (a value already
/// under it is not counted): re-encryption counts the values of a batch by the difference.
static RESEALED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

pub fn resealed_count() -> u64 {
    RESEALED.load(std::sync::atomic::Ordering::Relaxed)
}

/// Opens an encrypted datum into a zeroized buffer, for callers that use the plaintext only
/// inside the server (blind indexes). No reader check: nothing is returned.
///
/// # Safety
/// `d` must be a non-null datum of `kind`'s encrypted type.
pub unsafe fn open_to_vec(kind: Kind, d: Datum, doing: &str, unknown_key_hint: &str) -> zeroize::Zeroizing<Vec<u8>> {
    let keys = keys::loaded();
    let env = envelope_of(kind, d);
    let cipher = cipher_of(&keys, kind, env.key_id(), doing, unknown_key_hint);
    let mut plain = zeroize::Zeroizing::new(vec![0u8; env.plaintext_len()]);
    if with_context(kind, |ctx| cipher.open_into(&env, ctx, &mut plain)).is_err() {
        errors::decryption_failed(kind.type_name());
    }
    plain
}

/// Parses `input` as a value of the plain type, without letting the value reach an error
/// message: the plain type's own error (which would quote it) is replaced by ours.
unsafe fn parse_plain(kind: Kind, input: &CStr) -> Datum {
    let mut func = pg_sys::InvalidOid;
    let mut ioparam = pg_sys::InvalidOid;
    pg_sys::getTypeInputInfo(kind.plain_oid(), &mut func, &mut ioparam);
    let ptr = input.as_ptr().cast_mut();
    PgTryBuilder::new(|| Datum::from(pg_sys::OidInputFunctionCall(func, ptr, ioparam, -1).value()))
        .catch_others(|_| errors::invalid_plaintext(kind.type_name(), kind.plain_name()))
        .execute()
}

// ---------------------------------------------------------------------------------------------
// The C-callable functions

macro_rules! v1_function {
    ($finfo:ident, $name:ident, |$fcinfo:ident| $body:block) => {
        #[unsafe(no_mangle)]
        #[doc(hidden)]
        pub extern "C" fn $finfo() -> &'static pg_sys::Pg_finfo_record {
            const V1: pg_sys::Pg_finfo_record = pg_sys::Pg_finfo_record { api_version: 1 };
            &V1
        }

        #[unsafe(no_mangle)]
        #[pg_guard]
        pub unsafe extern "C-unwind" fn $name(fcinfo: pg_sys::FunctionCallInfo) -> Datum {
            unsafe fn body($fcinfo: pg_sys::FunctionCallInfo) -> Datum $body
            body(fcinfo)
        }
    };
}

pub(crate) use v1_function;

pub(crate) unsafe fn arg(fcinfo: pg_sys::FunctionCallInfo, n: usize) -> Datum {
    pgrx::fcinfo::pg_getarg_datum_raw(fcinfo, n)
}

// typinput(cstring, typioparam oid, typmod int4)
v1_function!(pg_finfo_cellcrypt_in, cellcrypt_in, |fcinfo| {
    let input = CStr::from_ptr(arg(fcinfo, 0).cast_mut_ptr());
    let kind = kind_of_type(Oid::from(arg(fcinfo, 1).value() as u32));
    let typmod = arg(fcinfo, 2).value() as i32;
    match envelope::decode_text(input.to_bytes()) {
        Ok(Some(bytes)) => {
            let d = new_varlena(bytes.len(), |out| out.copy_from_slice(&bytes));
            if kind == Kind::Text { bind_to_column(d, typmod) } else { d }
        }
        Err(e) => errors::invalid_envelope(kind.type_name(), &e),
        Ok(None) => match kind {
            // The parser already checked the text against the database encoding. Plaintext
            // stored into a registered column is sealed bound to it.
            Kind::Text => seal_bound(kind, input.to_bytes(), typmod.max(0) as u32),
            _ => encrypt_plain_datum(kind, parse_plain(kind, input)),
        },
    }
});

// typoutput(encrypted) → cstring: the text form of the envelope.
v1_function!(pg_finfo_cellcrypt_out, cellcrypt_out, |fcinfo| {
    let bytes = varlena_bytes(arg(fcinfo, 0));
    let len = envelope::text_len(bytes.len());
    let p = pg_sys::palloc(len + 1) as *mut u8;
    let text = envelope::encode_text(bytes);
    std::ptr::copy_nonoverlapping(text.as_ptr(), p, len);
    *p.add(len) = 0;
    Datum::from(p)
});

// ---------------------------------------------------------------------------------------------
// The binary format.
//
// An envelope in binary (binary COPY, binary results, a binary parameter) is
// [`BINARY_MAGIC`] followed by the envelope bytes. Anything else a client sends in binary is
// the plaintext in the plain type's own binary format (a driver that sends a bytea parameter
// as binary, an int8 as 8 bytes), received by the plain type's receive function and encrypted.
// The ambiguity, as `$cc$` is for text: a plaintext that starts with the magic and continues as
// a well-formed envelope is taken for an envelope. A bytea can; a text can only in a client
// encoding where 0xCC 0xCC is valid (it is not UTF-8); no jsonb or numeric binary value can
// (0xCC is neither a jsonb version nor a positive digit count), and the fixed-size types are
// too short to hold an envelope.

/// The four bytes that start the binary form of an envelope.
pub const BINARY_MAGIC: &[u8; 4] = b"\xCC\xCCcc";

/// True when `bytes` is a well-formed envelope that opens under this database's keys as a
/// value of `kind`.
fn opens_here(kind: Kind, bytes: &[u8]) -> bool {
    let Ok(env) = Envelope::parse(bytes) else { return false };
    keys::try_loaded().is_ok_and(|keys| opens_with(&keys, kind, &env))
}

/// True when `env` opens under `keys` as a value of `kind` (the plaintext, in a zeroized buffer,
/// is dropped at once).
fn opens_with(keys: &keys::LoadedKeys, kind: Kind, env: &Envelope) -> bool {
    let Some(cipher) = keys.ring.get(env.key_id()) else { return false };
    let mut out = zeroize::Zeroizing::new(vec![0u8; env.plaintext_len()]);
    with_context(kind, |ctx| cipher.open_into(env, ctx, &mut out)).is_ok()
}

// typsend(encrypted) → bytea: the magic, then the envelope.
v1_function!(pg_finfo_cellcrypt_send, cellcrypt_send, |fcinfo| {
    let env = varlena_bytes(arg(fcinfo, 0));
    new_varlena(BINARY_MAGIC.len() + env.len(), |out| {
        out[..BINARY_MAGIC.len()].copy_from_slice(BINARY_MAGIC);
        out[BINARY_MAGIC.len()..].copy_from_slice(env);
    })
});

// typreceive(internal StringInfo, typioparam oid, typmod int4): an envelope after the magic,
// validated; or plaintext in the plain type's binary format, encrypted.
v1_function!(pg_finfo_cellcrypt_recv, cellcrypt_recv, |fcinfo| {
    let buf = &mut *(arg(fcinfo, 0).cast_mut_ptr::<pg_sys::StringInfoData>());
    let kind = kind_of_type(Oid::from(arg(fcinfo, 1).value() as u32));
    let typmod = arg(fcinfo, 2).value() as i32;
    let start = buf.cursor as usize;
    let end = buf.len as usize;
    let bytes = std::slice::from_raw_parts((buf.data as *const u8).add(start), end - start);
    let d = if let Some(env) = bytes.strip_prefix(BINARY_MAGIC.as_slice()) {
        if let Err(e) = Envelope::parse(env) {
            errors::invalid_binary_envelope(kind.type_name(), &e);
        }
        buf.cursor = buf.len;
        new_varlena(env.len(), |out| out.copy_from_slice(env))
    } else if opens_here(kind, bytes) {
        // A bare envelope, as builds before the magic sent them (binary COPY files, a
        // publisher of a binary subscription): taken as the envelope only when it opens under
        // this database's keys as this type, which plaintext cannot do short of a GCM forgery.
        buf.cursor = buf.len;
        new_varlena(bytes.len(), |out| out.copy_from_slice(bytes))
    } else {
        let (mut receive, mut ioparam) = (pg_sys::InvalidOid, pg_sys::InvalidOid);
        pg_sys::getTypeBinaryInputInfo(kind.plain_oid(), &mut receive, &mut ioparam);
        let buf: *mut pg_sys::StringInfoData = buf;
        // The receive function's message may quote the value (jsonb's, text's): not shown.
        let plain = PgTryBuilder::new(|| Datum::from(pg_sys::OidReceiveFunctionCall(receive, buf, ioparam, -1).value()))
            .catch_others(|_| errors::invalid_binary_plaintext(kind.type_name(), kind.plain_name()))
            .execute();
        encrypt_plain_datum(kind, plain)
    };
    if kind == Kind::Text { bind_to_column(d, typmod) } else { d }
});

// cellcrypt.reencrypt(encrypted) → encrypted: the same value under the current key.
v1_function!(pg_finfo_cellcrypt_reencrypt, cellcrypt_reencrypt, |fcinfo| {
    crate::reencrypt::require_batch();
    // One function serves every encrypted type: the argument's type, looked up once per call
    // site and kept in `fn_extra` (a re-encryption batch calls it for every row).
    let flinfo = (*fcinfo).flinfo;
    let kind = fn_extra::<Kind>(flinfo).unwrap_or_else(|| {
        let kind = kind_of_type(pg_sys::get_fn_expr_argtype(flinfo, 0));
        set_fn_extra(flinfo, kind);
        kind
    });
    reencrypt_datum(kind, arg(fcinfo, 0))
});

// encryption_key_version(encrypted) → integer: the key version a value is sealed under. Reads
// only the envelope's header, needs no key and reveals nothing about the plaintext.
v1_function!(pg_finfo_cellcrypt_key_version, cellcrypt_key_version, |fcinfo| {
    let bytes = varlena_bytes(arg(fcinfo, 0));
    match Envelope::parse(bytes) {
        Ok(env) => Datum::from(env.key_id() as i32),
        Err(e) => errors::invalid_binary_envelope("encrypted value", &e),
    }
});

// cellcrypt.opens(encrypted) → boolean: whether the value opens under this database's live
// keys. What a data-only restore checks before it replaces the keyring (key_admin.rs): such a
// value is data the keyring rows in place are needed for. Says yes or no, nothing else, and
// only inside that check (42501 otherwise: it would be an oracle). When the keys cannot be
// loaded, every value counts as opening (the caller then refuses).
v1_function!(pg_finfo_cellcrypt_opens, cellcrypt_opens, |fcinfo| {
    if !crate::store::in_restore_check() {
        errors::raise(
            PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
            "cellcrypt.opens() is internal to pg_cellcrypt's restore check",
            None,
            Some("Use encryption_key_version(column) to see which key version a value is under."),
        )
    }
    let flinfo = (*fcinfo).flinfo;
    let kind = fn_extra::<Kind>(flinfo).unwrap_or_else(|| {
        let kind = kind_of_type(pg_sys::get_fn_expr_argtype(flinfo, 0));
        set_fn_extra(flinfo, kind);
        kind
    });
    let Ok(env) = Envelope::parse(varlena_bytes(arg(fcinfo, 0))) else {
        return Datum::from(false);
    };
    let Ok(keys) = keys::try_loaded() else {
        return Datum::from(true);
    };
    Datum::from(opens_with(&keys, kind, &env))
});

macro_rules! kind_functions {
    ($kind:expr, $fi_enc:ident, $enc:ident, $fi_dec:ident, $dec:ident) => {
        v1_function!($fi_enc, $enc, |fcinfo| { encrypt_plain_datum($kind, arg(fcinfo, 0)) });
        v1_function!($fi_dec, $dec, |fcinfo| {
            check_reader_at(fcinfo);
            decrypt_datum($kind, arg(fcinfo, 0))
        });
    };
}

// ---------------------------------------------------------------------------------------------
// Assignment parity: the casts into each encrypted type from every type that has an implicit or
// assignment cast to its plain type (pg_cast, read at CREATE EXTENSION). One C function serves
// them all: it converts the value as PostgreSQL converts it for the plain column (the same cast
// function, a binary relabeling, or I/O conversion, found as an assignment finds it), then
// seals it.

/// How a source type becomes the plain type.
#[derive(Clone, Copy)]
enum Conversion {
    /// The cast function and its number of arguments (a length-coercing one takes the typmod,
    /// -1 here, and whether the cast is explicit, false).
    Function(Oid, i32),
    Relabel,
    ViaIo { output: Oid, input: Oid, ioparam: Oid },
}

#[derive(Clone, Copy)]
struct AssignPath {
    kind: Kind,
    conversion: Conversion,
}

/// The conversion of this cast function, from its own signature; cached in `fn_extra`.
unsafe fn assign_path(flinfo: *mut pg_sys::FmgrInfo) -> AssignPath {
    if let Some(path) = fn_extra::<AssignPath>(flinfo) {
        return path;
    }
    let mut argtypes: *mut Oid = std::ptr::null_mut();
    let mut nargs = 0;
    let target = pg_sys::get_func_signature((*flinfo).fn_oid, &mut argtypes, &mut nargs);
    let source = *argtypes;
    let kind = kind_of_type(target);
    let plain = kind.plain_oid();
    let mut func = pg_sys::InvalidOid;
    let conversion = match pg_sys::find_coercion_pathway(plain, source, pg_sys::CoercionContext::COERCION_ASSIGNMENT, &mut func) {
        pg_sys::CoercionPathType::COERCION_PATH_FUNC => {
            // The caller needs EXECUTE on the cast function, as when PostgreSQL runs the cast.
            #[cfg(any(feature = "pg13", feature = "pg14", feature = "pg15"))]
            let acl = pg_sys::pg_proc_aclcheck(func, pg_sys::GetUserId(), pg_sys::ACL_EXECUTE as pg_sys::AclMode);
            #[cfg(not(any(feature = "pg13", feature = "pg14", feature = "pg15")))]
            let acl = pg_sys::object_aclcheck(pg_sys::ProcedureRelationId, func, pg_sys::GetUserId(), pg_sys::ACL_EXECUTE as pg_sys::AclMode);
            if acl != pg_sys::AclResult::ACLCHECK_OK {
                pg_sys::aclcheck_error(acl, pg_sys::ObjectType::OBJECT_FUNCTION, pg_sys::get_func_name(func));
            }
            Conversion::Function(func, pg_sys::get_func_nargs(func))
        }
        pg_sys::CoercionPathType::COERCION_PATH_RELABELTYPE => Conversion::Relabel,
        pg_sys::CoercionPathType::COERCION_PATH_COERCEVIAIO => {
            let (mut output, mut varlena, mut input, mut ioparam) = (pg_sys::InvalidOid, false, pg_sys::InvalidOid, pg_sys::InvalidOid);
            pg_sys::getTypeOutputInfo(source, &mut output, &mut varlena);
            pg_sys::getTypeInputInfo(plain, &mut input, &mut ioparam);
            Conversion::ViaIo { output, input, ioparam }
        }
        _ => errors::raise(
            PgSqlErrorCode::ERRCODE_CANNOT_COERCE,
            format!(
                "{} has no assignment cast to {}",
                CStr::from_ptr(pg_sys::format_type_be(source)).to_string_lossy(),
                kind.plain_name()
            ),
            None,
            None,
        ),
    };
    let path = AssignPath { kind, conversion };
    set_fn_extra(flinfo, path);
    path
}

v1_function!(pg_finfo_cellcrypt_assign, cellcrypt_assign, |fcinfo| { assign(fcinfo) });
// The symbols the integer casts of earlier builds name (their install scripts created them
// with these); the same function now.
v1_function!(pg_finfo_cellcrypt_int4_to_encrypted_int8, cellcrypt_int4_to_encrypted_int8, |fcinfo| { assign(fcinfo) });
v1_function!(pg_finfo_cellcrypt_int8_to_encrypted_numeric, cellcrypt_int8_to_encrypted_numeric, |fcinfo| { assign(fcinfo) });
v1_function!(pg_finfo_cellcrypt_int4_to_encrypted_numeric, cellcrypt_int4_to_encrypted_numeric, |fcinfo| { assign(fcinfo) });

unsafe fn assign(fcinfo: pg_sys::FunctionCallInfo) -> Datum {
    let path = assign_path((*fcinfo).flinfo);
    let value = arg(fcinfo, 0);
    let plain = match path.conversion {
        Conversion::Function(f, 1) => pg_sys::OidFunctionCall1Coll(f, (*fcinfo).fncollation, value),
        Conversion::Function(f, 2) => pg_sys::OidFunctionCall2Coll(f, (*fcinfo).fncollation, value, Datum::from(-1i32)),
        Conversion::Function(f, _) => pg_sys::OidFunctionCall3Coll(f, (*fcinfo).fncollation, value, Datum::from(-1i32), Datum::from(false)),
        Conversion::Relabel => value,
        Conversion::ViaIo { output, input, ioparam } => {
            // The input function's message may quote the value (jsonb_in does): not shown.
            let text = pg_sys::OidOutputFunctionCall(output, value);
            PgTryBuilder::new(|| Datum::from(pg_sys::OidInputFunctionCall(input, text, ioparam, -1).value()))
                .catch_others(|_| errors::invalid_plaintext(path.kind.type_name(), path.kind.plain_name()))
                .execute()
        }
    };
    encrypt_plain_datum(path.kind, plain)
}

kind_functions!(Kind::Text, pg_finfo_cellcrypt_encrypt_text, cellcrypt_encrypt_text, pg_finfo_cellcrypt_decrypt_text, cellcrypt_decrypt_text);
kind_functions!(Kind::Bytea, pg_finfo_cellcrypt_encrypt_bytea, cellcrypt_encrypt_bytea, pg_finfo_cellcrypt_decrypt_bytea, cellcrypt_decrypt_bytea);
kind_functions!(Kind::Jsonb, pg_finfo_cellcrypt_encrypt_jsonb, cellcrypt_encrypt_jsonb, pg_finfo_cellcrypt_decrypt_jsonb, cellcrypt_decrypt_jsonb);
kind_functions!(Kind::Numeric, pg_finfo_cellcrypt_encrypt_numeric, cellcrypt_encrypt_numeric, pg_finfo_cellcrypt_decrypt_numeric, cellcrypt_decrypt_numeric);
kind_functions!(Kind::Date, pg_finfo_cellcrypt_encrypt_date, cellcrypt_encrypt_date, pg_finfo_cellcrypt_decrypt_date, cellcrypt_decrypt_date);
kind_functions!(Kind::Timestamptz, pg_finfo_cellcrypt_encrypt_timestamptz, cellcrypt_encrypt_timestamptz, pg_finfo_cellcrypt_decrypt_timestamptz, cellcrypt_decrypt_timestamptz);
kind_functions!(Kind::Int8, pg_finfo_cellcrypt_encrypt_int8, cellcrypt_encrypt_int8, pg_finfo_cellcrypt_decrypt_int8, cellcrypt_decrypt_int8);

// ---------------------------------------------------------------------------------------------
// Install SQL: one loop over the kinds creates each type with its functions and casts.
pgrx::extension_sql!(
    r#"
DO $$
DECLARE
    k text;
    t text;
BEGIN
    FOREACH k IN ARRAY ARRAY['text', 'bytea', 'jsonb', 'numeric', 'date', 'timestamptz', 'int8'] LOOP
        t := 'encrypted_' OPERATOR(pg_catalog.||) k;
        EXECUTE pg_catalog.format('CREATE TYPE @extschema@.%I', t);
        EXECUTE pg_catalog.format($f$CREATE FUNCTION @extschema@.%1$I(cstring, oid, integer) RETURNS @extschema@.%2$I
                          AS 'MODULE_PATHNAME', 'cellcrypt_in' LANGUAGE c STABLE STRICT PARALLEL SAFE$f$, t OPERATOR(pg_catalog.||) '_in', t);
        EXECUTE pg_catalog.format($f$CREATE FUNCTION @extschema@.%1$I(@extschema@.%2$I) RETURNS cstring
                          AS 'MODULE_PATHNAME', 'cellcrypt_out' LANGUAGE c IMMUTABLE STRICT PARALLEL SAFE$f$, t OPERATOR(pg_catalog.||) '_out', t);
        EXECUTE pg_catalog.format($f$CREATE FUNCTION @extschema@.%1$I(internal, oid, integer) RETURNS @extschema@.%2$I
                          AS 'MODULE_PATHNAME', 'cellcrypt_recv' LANGUAGE c STABLE STRICT PARALLEL SAFE$f$, t OPERATOR(pg_catalog.||) '_recv', t);
        EXECUTE pg_catalog.format($f$CREATE FUNCTION @extschema@.%1$I(@extschema@.%2$I) RETURNS bytea
                          AS 'MODULE_PATHNAME', 'cellcrypt_send' LANGUAGE c IMMUTABLE STRICT PARALLEL SAFE$f$, t OPERATOR(pg_catalog.||) '_send', t);
        EXECUTE pg_catalog.format($f$CREATE TYPE @extschema@.%1$I (
                              INPUT = @extschema@.%2$I, OUTPUT = @extschema@.%3$I,
                              RECEIVE = @extschema@.%4$I, SEND = @extschema@.%5$I,
                              INTERNALLENGTH = VARIABLE, ALIGNMENT = int4, STORAGE = external,
                              CATEGORY = 'U')$f$, t, t OPERATOR(pg_catalog.||) '_in', t OPERATOR(pg_catalog.||) '_out', t OPERATOR(pg_catalog.||) '_recv', t OPERATOR(pg_catalog.||) '_send');
        EXECUTE pg_catalog.format('COMMENT ON TYPE @extschema@.%I IS %L', t,
                       k OPERATOR(pg_catalog.||) ', encrypted with AES-256-GCM by pg_cellcrypt; decrypt() or ::' OPERATOR(pg_catalog.||) k OPERATOR(pg_catalog.||) ' returns the plaintext');

        -- encrypt(plain) always encrypts; it is also the assignment cast from the plain type.
        -- VOLATILE: each call seals anew, so equal plaintexts of different rows never share a
        -- ciphertext (a STABLE one could be memoized). Citus therefore refuses an UPDATE of a
        -- distributed table that seals a typed parameter ($1::text); an untyped one is sealed
        -- by the type's input function, on the coordinator (README, Scaling out with Citus).
        EXECUTE pg_catalog.format($f$CREATE FUNCTION @extschema@.encrypt(%1$s) RETURNS @extschema@.%2$I
                          AS 'MODULE_PATHNAME', %3$L LANGUAGE c VOLATILE STRICT PARALLEL SAFE$f$, k, t, 'cellcrypt_encrypt_' OPERATOR(pg_catalog.||) k);
        EXECUTE pg_catalog.format('CREATE CAST (%s AS @extschema@.%I) WITH FUNCTION @extschema@.encrypt(%s) AS ASSIGNMENT', k, t, k);

        -- decrypt(encrypted) is the explicit cast back; reserved to data_encryption_reader.
        EXECUTE pg_catalog.format($f$CREATE FUNCTION @extschema@.decrypt(@extschema@.%1$I) RETURNS %2$s
                          AS 'MODULE_PATHNAME', %3$L LANGUAGE c STABLE STRICT PARALLEL SAFE$f$, t, k, 'cellcrypt_decrypt_' OPERATOR(pg_catalog.||) k);
        EXECUTE pg_catalog.format('CREATE CAST (@extschema@.%I AS %s) WITH FUNCTION @extschema@.decrypt(@extschema@.%I)', t, k, t);
        -- decrypt() checks membership in data_encryption_reader itself (42501 with a hint).

        -- Key changes: which key version a value is under (public), and re-sealing (internal).
        EXECUTE pg_catalog.format($f$CREATE FUNCTION @extschema@.encryption_key_version(@extschema@.%1$I) RETURNS integer
                          AS 'MODULE_PATHNAME', 'cellcrypt_key_version' LANGUAGE c IMMUTABLE STRICT PARALLEL SAFE$f$, t);
        -- The same, under a name only the extension's owner controls: what re-encryption's
        -- statements call (a schema other roles may create in, or rename, is never named there).
        EXECUTE pg_catalog.format($f$CREATE FUNCTION cellcrypt.key_version(@extschema@.%1$I) RETURNS integer
                          AS 'MODULE_PATHNAME', 'cellcrypt_key_version' LANGUAGE c IMMUTABLE STRICT PARALLEL SAFE$f$, t);
        EXECUTE pg_catalog.format($f$CREATE FUNCTION cellcrypt.opens(@extschema@.%1$I) RETURNS boolean
                          AS 'MODULE_PATHNAME', 'cellcrypt_opens' LANGUAGE c STABLE STRICT PARALLEL RESTRICTED$f$, t);
        EXECUTE pg_catalog.format($f$CREATE FUNCTION cellcrypt.reencrypt(@extschema@.%1$I) RETURNS @extschema@.%1$I
                          AS 'MODULE_PATHNAME', 'cellcrypt_reencrypt' LANGUAGE c VOLATILE STRICT PARALLEL UNSAFE$f$, t);
        -- cellcrypt.reencrypt() refuses to run outside a re-encryption batch (reencrypt.rs); the
        -- batch runs as the table's owner, who must be able to call it.
    END LOOP;
END
$$;

-- Blind-index bindings (types.rs, blind_index.rs): a column registered for a blind index is
-- declared encrypted_text(<id>), and every value stored into it passes the length coercion,
-- which binds it to the column.
CREATE FUNCTION cellcrypt.encrypted_text_typmod_in(cstring[]) RETURNS integer
    AS 'MODULE_PATHNAME', 'cellcrypt_typmod_in' LANGUAGE c IMMUTABLE STRICT PARALLEL SAFE;
CREATE FUNCTION cellcrypt.encrypted_text_typmod_out(integer) RETURNS cstring
    AS 'MODULE_PATHNAME', 'cellcrypt_typmod_out' LANGUAGE c IMMUTABLE STRICT PARALLEL SAFE;
ALTER TYPE @extschema@.encrypted_text SET (TYPMOD_IN = cellcrypt.encrypted_text_typmod_in, TYPMOD_OUT = cellcrypt.encrypted_text_typmod_out);
CREATE FUNCTION cellcrypt.bind_to_column(@extschema@.encrypted_text, integer, boolean) RETURNS @extschema@.encrypted_text
    AS 'MODULE_PATHNAME', 'cellcrypt_bind_to_column' LANGUAGE c STABLE STRICT PARALLEL SAFE;
CREATE CAST (@extschema@.encrypted_text AS @extschema@.encrypted_text)
    WITH FUNCTION cellcrypt.bind_to_column(@extschema@.encrypted_text, integer, boolean) AS IMPLICIT;

-- Assignment parity, derived from pg_cast: every type with an implicit or assignment cast to a
-- plain type (varchar, bpchar and name to text; int2, int4, float4, float8, money and int8 to
-- numeric; date and timestamp to timestamptz; json to jsonb; ...) may be assigned to the
-- encrypted type too, converted as the plain cast converts it, then sealed (cellcrypt_assign,
-- a C function: a SQL body would be parsed with the caller's search_path). Internal types
-- (category Z: "char", pg_node_tree, statistics; named, as PostgreSQL 14 files them under S) and types
-- outside pg_catalog are left out. The automatic I/O conversion of any type
-- to text, which pg_cast does not list, is not mirrored: cast to text first.
DO $$
DECLARE
    r record;
BEGIN
    FOR r IN
        SELECT s.oid AS source, s.typname AS source_name, k AS plain
          FROM pg_catalog.unnest(ARRAY['text', 'bytea', 'jsonb', 'numeric', 'date', 'timestamptz', 'int8']) k
          JOIN pg_catalog.pg_cast c ON c.casttarget OPERATOR(pg_catalog.=) k::pg_catalog.regtype
          JOIN pg_catalog.pg_type s ON s.oid OPERATOR(pg_catalog.=) c.castsource
         WHERE c.castcontext OPERATOR(pg_catalog.=) ANY ('{a,i}'::pg_catalog."char"[])
           AND c.castsource OPERATOR(pg_catalog.<>) c.casttarget
           AND s.typtype OPERATOR(pg_catalog.=) 'b' AND s.typcategory OPERATOR(pg_catalog.<>) 'Z'
           AND s.typname OPERATOR(pg_catalog.<>) ALL ('{char,pg_node_tree,pg_ndistinct,pg_dependencies,pg_mcv_list}'::pg_catalog.name[])
           AND s.typnamespace OPERATOR(pg_catalog.=) 'pg_catalog'::pg_catalog.regnamespace
         ORDER BY 3, 2
    LOOP
        EXECUTE pg_catalog.format($f$CREATE FUNCTION cellcrypt.%1$I(%2$s) RETURNS @extschema@.%3$I
                          AS 'MODULE_PATHNAME', 'cellcrypt_assign' LANGUAGE c VOLATILE STRICT PARALLEL SAFE$f$,
                          r.source_name OPERATOR(pg_catalog.||) '_to_encrypted_' OPERATOR(pg_catalog.||) r.plain,
                          r.source::pg_catalog.regtype, 'encrypted_' OPERATOR(pg_catalog.||) r.plain);
        EXECUTE pg_catalog.format('CREATE CAST (%s AS @extschema@.%I) WITH FUNCTION cellcrypt.%I(%s) AS ASSIGNMENT',
                          r.source::pg_catalog.regtype, 'encrypted_' OPERATOR(pg_catalog.||) r.plain,
                          r.source_name OPERATOR(pg_catalog.||) '_to_encrypted_' OPERATOR(pg_catalog.||) r.plain, r.source::pg_catalog.regtype);
    END LOOP;
END
$$;
"#,
    name = "types",
    requires = ["roles"]
);


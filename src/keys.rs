//! The data encryption key of a database: what the database stores about it, and how a backend
//! loads and caches it.
//!
//! ## What lives where
//! * **In the database** (`cellcrypt.keyring`): what verifies and identifies each key version:
//!   its version, public fingerprint, KDF salt and parameters (HKDF or Argon2id), state, who created it and
//!   when. Never a usable key. During a key change, older versions also keep their data key
//!   wrapped under the current key (`cellcrypt_core::wrap`), useless without it.
//! * **In the key provider** ([`crate::providers`]): the administrator's key string of the
//!   current version.
//! * **In shared memory** ([`crate::key_cache`]): the keys derived from each database's
//!   current key version (data key and wrap key), once one backend has loaded it; never the
//!   master key, and the administrator's key text only with the `none` provider.
//! * **In each backend**: the derived keys it uses, as a [`Keyring`] of ready ciphers. The
//!   master key exists only while a backend derives it (HKDF or Argon2id, on a load from the provider
//!   or in a key call) and is zeroized at once. It is checked on every key access
//!   against the shared generation counter (one atomic load), so a key change is noticed as
//!   soon as it commits, and once per transaction against the keyring table's identity, so
//!   `DROP`/`CREATE EXTENSION` is noticed.

use crate::backend_local::BackendLocal;
use crate::errors;
use crate::key_cache;
use crate::providers;
use cellcrypt_core::kdf::MasterKey;
use cellcrypt_core::{AdminKey, Keyring, NonceSource, SecretKey, VersionKeys};
use pgrx::{pg_sys, PgSqlErrorCode};
use std::cell::{Cell, RefCell};
use std::rc::Rc;

/// The keys this backend holds for its database.
pub struct LoadedKeys {
    keyring_relid: pg_sys::Oid,
    pub(crate) generation: u64,
    pub ring: Keyring,
    pub current_version: u32,
    /// The current version's wrap key (the blind-index key is wrapped under it).
    pub wrap: SecretKey,
    /// The data key of every version in `ring`, for re-wrapping during a change.
    pub data_keys: Vec<(u32, SecretKey)>,
    /// The current blind-index key and its version (independent of the data key).
    pub index_key: Option<(u32, SecretKey)>,
    /// The keyed HMAC of each registered column hashed so far, under `index_key`.
    pub column_index_keys: RefCell<Vec<(u32, Rc<cellcrypt_core::blind::ColumnIndexKey>)>>,
}

/// Why the database's key is not usable in this backend.
#[derive(Clone)]
pub enum KeyUnavailable {
    /// The keyring has no current key version (should not happen after CREATE EXTENSION).
    NoKeyConfigured,
    /// The provider does not have the key of this version: e.g. after a restore elsewhere.
    NotInProvider { version: u32, fingerprint: String },
    /// The provider's key does not match the stored fingerprint.
    FingerprintMismatch { version: u32, expected: String, found: String },
    /// The key provider could not be read.
    ProviderError(String),
    /// The version's master key cannot be derived: see [`Underivable`].
    NotDerivable(Underivable, String),
}

/// Why a key version's master key cannot be derived from a key.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Underivable {
    /// An Argon2id version (a passphrase's, or any key's before 0.2.0) in a FIPS build.
    Fips,
    /// The version's stored derivation parameters are out of range: the row was altered.
    Damaged,
    /// A passphrase for a version of a generated key: another key.
    WrongKind,
}

impl Underivable {
    fn tag(self) -> &'static str {
        match self {
            Underivable::Fips => "fips",
            Underivable::Damaged => "damaged",
            Underivable::WrongKind => "kind",
        }
    }

    fn from_tag(t: &str) -> Option<Self> {
        Some(match t {
            "fips" => Underivable::Fips,
            "damaged" => Underivable::Damaged,
            "kind" => Underivable::WrongKind,
            _ => return None,
        })
    }

    /// Why `row`'s master key cannot be derived from `key` (called once derivation failed).
    pub fn of(row: &KeyRow, key: &AdminKey) -> Self {
        if row.params.check_stored().is_err() {
            Underivable::Damaged
        } else if row.params.is_hkdf() && key.key_bytes().is_none() {
            Underivable::WrongKind
        } else if cellcrypt_core::fips::ENABLED && !row.params.is_hkdf() {
            Underivable::Fips
        } else {
            Underivable::Damaged
        }
    }
}

/// What to do about a keyring row whose derivation parameters are out of range.
pub const DAMAGED_KEYRING_HINT: &str = "The keyring row of this key version was altered (its key derivation parameters are out of range): restore cellcrypt.keyring from a backup or the dump it came from.";

/// What to do when a key version cannot be derived here.
pub const NOT_DERIVABLE_HINT: &str = "A FIPS build derives only key versions of generated keys made by 0.2.0 or later. Change the key on a default build first (SELECT set_data_encryption_key(generate_data_encryption_key());), let the re-encryption complete, then install the FIPS build; see the README's FIPS section.";

pub const RESTORE_HINT: &str = "Restore the database's key with SELECT set_data_encryption_key('<the original key>'); as an administrator over a secure connection.";

/// True on a standby (a server in recovery): its keyring is replayed from the primary, and key
/// calls cannot run there.
pub fn on_standby() -> bool {
    // SAFETY: reads shared recovery state.
    unsafe { pg_sys::RecoveryInProgress() }
}

/// What to do about a key that is not loaded: restore it, or on a standby (where key calls
/// cannot run) give the standby's provider the primary's current key.
fn restore_hint() -> &'static str {
    if on_standby() {
        "This server is a standby: give its key provider the primary's current key (copy the key file, or update the key command's source). No restart is needed."
    } else {
        RESTORE_HINT
    }
}

impl KeyUnavailable {
    pub fn raise(&self) -> ! {
        match self {
            KeyUnavailable::NoKeyConfigured => errors::raise(
                PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
                "no data encryption key is configured in this database",
                None,
                Some("Reinstall the extension (DROP EXTENSION pg_cellcrypt CASCADE; CREATE EXTENSION pg_cellcrypt;) or restore the key."),
            ),
            KeyUnavailable::NotInProvider { version, fingerprint } => errors::raise(
                PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
                format!("the data encryption key of this database is not loaded (key version {version}, fingerprint {fingerprint})"),
                Some(&format!(
                    "The key provider \"{}\" has no key for this database, as after a restore into another cluster or, with provider \"none\", after a restart.",
                    providers::name(providers::current())
                )),
                Some(restore_hint()),
            ),
            KeyUnavailable::FingerprintMismatch { version, expected, found } => errors::raise(
                PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
                format!("the data encryption key of this database is not loaded: the key provider holds a different key (key version {version})"),
                Some(&format!("Expected fingerprint {expected}, the provider's key has fingerprint {found}. This happens after a restore into another database or cluster, or on a standby after a key change on the primary.")),
                Some(restore_hint()),
            ),
            KeyUnavailable::ProviderError(e) => errors::raise(
                PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
                format!("could not read the data encryption key: {e}"),
                None,
                Some("Check pg_cellcrypt.key_provider, pg_cellcrypt.key_directory or pg_cellcrypt.key_command, and the key file's permissions."),
            ),
            KeyUnavailable::NotDerivable(Underivable::Fips, why) => errors::raise(
                PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
                format!("the data encryption key of this database cannot be derived by this build of pg_cellcrypt: {why}"),
                Some(&format!("Crypto module: {}.", cellcrypt_core::fips::module())),
                Some(NOT_DERIVABLE_HINT),
            ),
            KeyUnavailable::NotDerivable(Underivable::Damaged, why) => errors::raise(
                PgSqlErrorCode::ERRCODE_DATA_CORRUPTED,
                format!("the data encryption key of this database cannot be derived: {why}"),
                None,
                Some(DAMAGED_KEYRING_HINT),
            ),
            KeyUnavailable::NotDerivable(Underivable::WrongKind, why) => errors::raise(
                PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
                format!("the data encryption key of this database is not loaded: the key provider holds a different key ({why})"),
                None,
                Some(restore_hint()),
            ),
        }
    }
}

static LOADED: BackendLocal<RefCell<Option<Rc<LoadedKeys>>>> = BackendLocal::new(RefCell::new(None));
static NONCES: BackendLocal<RefCell<Option<NonceSource>>> = BackendLocal::new(RefCell::new(None));
static VALIDATED_THIS_XACT: BackendLocal<Cell<bool>> = BackendLocal::new(Cell::new(false));

/// The transaction ended: the next key access checks the cache against the keyring again, and
/// the next value sealed draws a new salt (no two transactions share a value key, see
/// cellcrypt_core::cipher).
pub fn end_of_transaction() {
    VALIDATED_THIS_XACT.with(|v| v.set(false));
    LOADED.with(|l| {
        if let Some(k) = l.borrow().as_ref() {
            k.ring.end_value_keys();
        }
    });
}

pub fn keyring_relid() -> pg_sys::Oid {
    // SAFETY: syscache lookups inside a transaction.
    unsafe {
        let nsp = pg_sys::get_namespace_oid(c"cellcrypt".as_ptr(), true);
        if nsp == pg_sys::InvalidOid {
            return pg_sys::InvalidOid;
        }
        pg_sys::get_relname_relid(c"keyring".as_ptr(), nsp)
    }
}

/// Forgets this backend's keys.
pub fn invalidate() {
    LOADED.with(|l| *l.borrow_mut() = None);
    LAST_FAILURE.with(|f| *f.borrow_mut() = None);
}

/// The keys of this database, loading them on first use. Raises the fitting error when the key
/// is not available.
pub fn loaded() -> Rc<LoadedKeys> {
    match try_loaded() {
        Ok(k) => k,
        Err(e) => e.raise(),
    }
}

pub fn try_loaded() -> Result<Rc<LoadedKeys>, KeyUnavailable> {
    if !VALIDATED_THIS_XACT.with(|v| v.get()) {
        let relid = keyring_relid();
        let loaded = LOADED.with(|l| l.borrow().as_ref().map(|k| (k.keyring_relid, k.current_version, k.index_key.as_ref().map(|(v, _)| *v))));
        let stale = match loaded {
            None => false,
            Some((r, _, _)) if r != relid => true,
            // A standby learns of a key change (or an index key rotation) only through the rows
            // it replays: the primary's commit bumps the primary's shared generation, not the
            // standby's. So a standby compares the versions once per transaction.
            Some((_, current, index)) => on_standby() && crate::store::current_versions() != (Some(current), index),
        };
        if stale {
            invalidate();
        }
        VALIDATED_THIS_XACT.with(|v| v.set(true));
    }
    let generation = key_cache::generation();
    if let Some(k) = LOADED.with(|l| l.borrow().clone()) {
        // Keys this transaction staged stay in use until it ends, whatever other databases'
        // changes do to the shared generation (`keystate.rs` drops them at the end).
        if k.generation == generation || k.generation == STAGED {
            return Ok(k);
        }
    }
    // A load that failed is not tried again for a moment (same generation): a query over many
    // rows, or many calls, would otherwise run the key provider and the key derivation for each.
    let stamp = providers::stamp();
    if let Some(e) = LAST_FAILURE.with(|f| {
        f.borrow()
            .as_ref()
            .filter(|l| l.generation == generation && l.stamp == stamp && l.at.elapsed() < FAILURE_KEPT)
            .map(|l| l.error.clone())
    }) {
        return Err(e);
    }
    match load(generation) {
        Ok(k) => {
            let k = Rc::new(k);
            LOADED.with(|l| *l.borrow_mut() = Some(k.clone()));
            LAST_FAILURE.with(|f| *f.borrow_mut() = None);
            Ok(k)
        }
        Err(e) => {
            if !matches!(e, KeyUnavailable::NoKeyConfigured) {
                LAST_FAILURE.with(|f| *f.borrow_mut() = Some(Failure { at: std::time::Instant::now(), generation, stamp, error: e.clone() }));
            }
            Err(e)
        }
    }
}

/// How long a failed key load is answered from memory (see [`try_loaded`]). A key restore or
/// change, which loads the key itself, any key change (a new generation), and a key file that
/// changed (a standby given the primary's new key) end it at once.
const FAILURE_KEPT: std::time::Duration = std::time::Duration::from_secs(5);

struct Failure {
    at: std::time::Instant,
    generation: u64,
    stamp: u64,
    error: KeyUnavailable,
}

thread_local! {
    static LAST_FAILURE: RefCell<Option<Failure>> = const { RefCell::new(None) };
}

/// True when the database has a key and this backend could load and verify it.
pub fn is_active() -> bool {
    try_loaded().map(|k| k.ring.current().is_some()).unwrap_or(false)
}

/// The generation of keys a transaction staged for itself: never stale until it ends.
pub const STAGED: u64 = u64::MAX;

/// Sets this backend's keys (`keystate.rs` installs the keys a transaction staged, and puts
/// back the enclosing ones when a subtransaction rolls back).
pub fn set_loaded(keys: Option<Rc<LoadedKeys>>) {
    match keys {
        Some(k) => LOADED.with(|l| *l.borrow_mut() = Some(k)),
        None => invalidate(),
    }
}

/// Runs `f` with this backend's nonce source (created on first use, after fork).
pub fn with_nonces<R>(f: impl FnOnce(&mut NonceSource) -> R) -> R {
    NONCES.with(|n| {
        let mut n = n.borrow_mut();
        f(n.get_or_insert_with(NonceSource::from_os))
    })
}

pub use crate::store::KeyRow;

/// The keyring's live rows (current first, then previous versions, newest first), read with
/// the latest snapshot, as catalogs are: a key change that committed after this transaction
/// began is seen, whatever the isolation level.
pub fn read_key_rows() -> Vec<KeyRow> {
    crate::store::key_rows()
}

/// True when `entries` (a key file's) hold the key of the keyring's current version: verified
/// with its key derivation against its fingerprint.
pub fn file_holds_current_key(entries: &[(u32, zeroize::Zeroizing<String>)]) -> bool {
    let rows = read_key_rows();
    rows.first().filter(|r| r.state == "current").is_some_and(|current| file_holds_key(current, entries))
}

/// True when `entries` (a key file's) hold the key of `row`'s version.
pub fn file_holds_key(row: &KeyRow, entries: &[(u32, zeroize::Zeroizing<String>)]) -> bool {
    is_key_of(row, entries.iter().filter(|(v, _)| *v == row.version).map(|(_, text)| text.as_str()))
}

/// True when one of `texts` is `row`'s key: verified against its fingerprint.
pub fn is_key_of<'a>(row: &KeyRow, mut texts: impl Iterator<Item = &'a str>) -> bool {
    texts.any(|text| AdminKey::parse(text).is_ok_and(|k| verify(row, &k).is_ok()))
}

/// Why a key is not the key of a key version.
pub enum VerifyError {
    /// It is another key: the fingerprint it has.
    Mismatch(String),
    /// The version's master key cannot be derived from it here: a passphrase for an HKDF
    /// version, or an Argon2id version in a FIPS build. No secret is in the text.
    NotDerivable(Underivable, String),
}

/// Derives `key`'s master key with the row's salt and parameters and checks it against the
/// row's fingerprint.
pub fn verify(row: &KeyRow, key: &AdminKey) -> Result<MasterKey, VerifyError> {
    let master = MasterKey::derive(key, &row.salt, &row.params)
        .map_err(|e| VerifyError::NotDerivable(Underivable::of(row, key), format!("key version {}: {}", row.version, e.0)))?;
    let found = master.fingerprint().to_string();
    if found != row.fingerprint {
        return Err(VerifyError::Mismatch(found));
    }
    Ok(master)
}

/// The current version's derived keys: from the shared cache, or else from the provider
/// (derived, verified against the fingerprint; the master key is dropped at once), which then
/// fills the cache.
///
/// One load from the provider runs at a time per database (one key command, one key derivation):
/// the backends that need the key meanwhile wait for it, then take the keys it left in the
/// cache, or the failure it recorded there (for [`FAILURE_KEPT`], while neither the key
/// generation nor the provider's settings change), instead of running the provider again.
pub fn current_version_keys(current: &KeyRow) -> Result<VersionKeys, KeyUnavailable> {
    let cached = || {
        key_cache::get().filter(|c| c.version == current.version && c.keys.fingerprint.to_string() == current.fingerprint).map(|c| c.keys)
    };
    if let Some(keys) = cached() {
        return Ok(keys);
    }
    let of = key_cache::LoadOf {
        generation: key_cache::generation(),
        stamp: providers::stamp(),
        version: current.version,
        fingerprint: current.fingerprint.parse::<cellcrypt_core::Fingerprint>().map(|f| f.0).unwrap_or_default(),
    };
    let load = || match from_provider(current) {
        Ok((master, text)) => {
            let keys = master.version_keys();
            drop(master);
            drop(text);
            key_cache::put(current.version, &keys, None);
            Ok(keys)
        }
        Err(e) => {
            key_cache::record_failure(of, &encode_failure(&e));
            Err(e)
        }
    };
    // Without a slot of its own (every one holds another live database's key) the database
    // has nowhere to leave a result for those waiting: each load runs on its own, as before.
    if !key_cache::reserve() {
        return load();
    }
    crate::policy::one_key_load_at_a_time(|| {
        if let Some(keys) = cached() {
            return Ok(keys);
        }
        if let Some(e) = key_cache::recent_failure(of, FAILURE_KEPT).and_then(|f| decode_failure(&f)) {
            return Err(e);
        }
        load()
    })
}

const SEP: char = '\u{1f}';

/// A failed load as text for the shared cache: no secret is in any variant.
fn encode_failure(e: &KeyUnavailable) -> String {
    match e {
        KeyUnavailable::NoKeyConfigured => "none".to_owned(),
        KeyUnavailable::NotInProvider { version, fingerprint } => format!("missing{SEP}{version}{SEP}{fingerprint}"),
        KeyUnavailable::FingerprintMismatch { version, expected, found } => format!("mismatch{SEP}{version}{SEP}{expected}{SEP}{found}"),
        KeyUnavailable::ProviderError(m) => format!("provider{SEP}{m}"),
        KeyUnavailable::NotDerivable(r, m) => format!("underivable{SEP}{}{SEP}{m}", r.tag()),
    }
}

/// The inverse of [`encode_failure`]. A message is the last field and may hold the separator
/// itself (a key command's error output): each tag splits only as often as it has fields.
pub(crate) fn decode_failure(s: &str) -> Option<KeyUnavailable> {
    let (tag, rest) = s.split_once(SEP).unwrap_or((s, ""));
    let fields = |n: usize| -> Vec<&str> { rest.splitn(n, SEP).collect() };
    Some(match tag {
        "none" if rest.is_empty() => KeyUnavailable::NoKeyConfigured,
        "missing" => match fields(2).as_slice() {
            [v, fp] => KeyUnavailable::NotInProvider { version: v.parse().ok()?, fingerprint: (*fp).to_owned() },
            _ => return None,
        },
        "mismatch" => match fields(3).as_slice() {
            [v, expected, found] => KeyUnavailable::FingerprintMismatch { version: v.parse().ok()?, expected: (*expected).to_owned(), found: (*found).to_owned() },
            _ => return None,
        },
        "provider" => KeyUnavailable::ProviderError(rest.to_owned()),
        "underivable" => match fields(2).as_slice() {
            [r, m] => KeyUnavailable::NotDerivable(Underivable::from_tag(r)?, (*m).to_owned()),
            _ => return None,
        },
        _ => return None,
    })
}

/// `encode_failure` then `decode_failure` gives the same failure back (messages with the
/// separator in them included); for the #[pg_test] of the shared failure record.
#[cfg(any(test, feature = "pg_test"))]
pub(crate) fn failure_round_trips(e: &KeyUnavailable) -> bool {
    decode_failure(&encode_failure(e)).is_some_and(|d| encode_failure(&d) == encode_failure(e))
}

/// The administrator's key text of the current version, verified: from the provider (the key
/// file, the command), or with the `none` provider from the shared cache, its only copy.
pub fn current_key_text(current: &KeyRow) -> Result<zeroize::Zeroizing<String>, KeyUnavailable> {
    if providers::current() == crate::gucs::KeyProvider::None {
        return key_cache::key_text(current.version, &current.fingerprint)
            .ok_or_else(|| KeyUnavailable::NotInProvider { version: current.version, fingerprint: current.fingerprint.clone() });
    }
    from_provider(current).map(|(_, text)| text)
}

/// The current version's key from the provider: every line of this version (a key file may
/// hold the key a restore replaced under the same version), else a bare key; the first whose
/// derived master key matches the fingerprint.
fn from_provider(current: &KeyRow) -> Result<(MasterKey, zeroize::Zeroizing<String>), KeyUnavailable> {
    let stored = providers::read().map_err(KeyUnavailable::ProviderError)?;
    let mut candidates: Vec<&zeroize::Zeroizing<String>> = stored.iter().filter(|(v, _)| *v == Some(current.version)).map(|(_, k)| k).collect();
    if candidates.is_empty() {
        candidates = stored.iter().filter(|(v, _)| v.is_none()).map(|(_, k)| k).collect();
    }
    if candidates.is_empty() {
        return Err(KeyUnavailable::NotInProvider { version: current.version, fingerprint: current.fingerprint.clone() });
    }
    let mut failure = None;
    for key_text in candidates {
        let key = match AdminKey::parse(key_text) {
            Ok(k) => k,
            Err(e) => {
                failure.get_or_insert(KeyUnavailable::ProviderError(format!("the key provider holds an invalid key: {e}")));
                continue;
            }
        };
        match verify(current, &key) {
            Ok(master) => return Ok((master, zeroize::Zeroizing::new(key.as_str().to_owned()))),
            Err(VerifyError::Mismatch(found)) => {
                failure = Some(KeyUnavailable::FingerprintMismatch { version: current.version, expected: current.fingerprint.clone(), found });
            }
            Err(VerifyError::NotDerivable(r, why)) => {
                failure = Some(KeyUnavailable::NotDerivable(r, why));
            }
        }
    }
    Err(failure.expect("at least one candidate was tried"))
}

/// Builds the keys of this database from the keyring rows and the current version's keys: the
/// current data key plus every previous version whose wrapped data key opens.
pub fn assemble(relid: pg_sys::Oid, generation: u64, rows: &[KeyRow], keys: VersionKeys) -> LoadedKeys {
    let current = &rows[0];
    let mut others = Vec::new();
    for row in rows.iter().skip(1) {
        let Some(w) = &row.wrapped else { continue };
        match cellcrypt_core::wrap::unwrap_data_key(&keys.wrap, current.version, row.version, w) {
            Ok(k) => others.push((row.version, k)),
            Err(_) => pgrx::warning!(
                "pg_cellcrypt: the wrapped key of version {} does not open under key version {}; values under it cannot be read",
                row.version,
                current.version
            ),
        }
    }
    let index_key = crate::store::index_key_row().and_then(|(v, wrapped, under)| {
        if under != current.version {
            return None;
        }
        cellcrypt_core::wrap::unwrap_index_key(&keys.wrap, current.version, v, &wrapped).ok().map(|k| (v, k))
    });
    LoadedKeys::build(relid, generation, current.version, keys.data, keys.wrap, others, index_key)
}

impl LoadedKeys {
    /// The OID of the keyring table these keys were loaded for (a new one after DROP and
    /// CREATE EXTENSION).
    pub fn keyring_relid(&self) -> pg_sys::Oid {
        self.keyring_relid
    }

    /// The current version's data and wrap keys plus older versions' data keys.
    pub fn build(
        relid: pg_sys::Oid,
        generation: u64,
        current_version: u32,
        data: SecretKey,
        wrap: SecretKey,
        others: Vec<(u32, SecretKey)>,
        index_key: Option<(u32, SecretKey)>,
    ) -> Self {
        let mut ring = Keyring::new();
        ring.insert(current_version, &data, true);
        let mut data_keys = vec![(current_version, data)];
        for (v, k) in others {
            if v != current_version {
                ring.insert(v, &k, false);
                data_keys.push((v, k));
            }
        }
        LoadedKeys { keyring_relid: relid, generation, ring, current_version, wrap, data_keys, index_key, column_index_keys: RefCell::new(Vec::new()) }
    }
}

fn load(generation: u64) -> Result<LoadedKeys, KeyUnavailable> {
    let relid = keyring_relid();
    let rows = read_key_rows();
    let Some(current) = rows.first().filter(|r| r.state == "current") else {
        return Err(KeyUnavailable::NoKeyConfigured);
    };
    let keys = current_version_keys(current)?;
    Ok(assemble(relid, generation, &rows, keys))
}

/// The current generation, for keys built by [`assemble`] now.
pub fn generation_now() -> u64 {
    key_cache::generation()
}

// What the database stores about keys: the keyring and the blind-index key, both carried by
// pg_dump, and the trigger that lets rows from a dump replace the key CREATE EXTENSION made.
pgrx::extension_sql!(
    r#"
CREATE TABLE cellcrypt.keyring (
    key_version        integer PRIMARY KEY CHECK (key_version OPERATOR(pg_catalog.>) 0),
    fingerprint        text NOT NULL,
    kdf_salt           bytea NOT NULL,
    kdf_memory_kib     integer NOT NULL,
    kdf_iterations     integer NOT NULL,
    kdf_parallelism    integer NOT NULL,
    state              text NOT NULL CHECK (state OPERATOR(pg_catalog.=) ANY ('{current,previous,retired}'::pg_catalog.text[])),
    provider           text NOT NULL,
    created_at         timestamptz NOT NULL DEFAULT pg_catalog.now(),
    created_by         name NOT NULL DEFAULT session_user,
    -- previous versions only: the data key, sealed under the current version's wrap key
    wrapped_data_key   bytea,
    reencrypted_values bigint,
    -- true for rows that arrived from a dump (they replaced the key CREATE EXTENSION made),
    -- until a key call uses them; restored_by names the restoring session (pid@start)
    restored           boolean NOT NULL DEFAULT false,
    restored_by        text
);
CREATE UNIQUE INDEX keyring_one_current ON cellcrypt.keyring ((true)) WHERE state OPERATOR(pg_catalog.=) 'current';
COMMENT ON TABLE cellcrypt.keyring IS 'Key versions of this database: fingerprints and KDF parameters only, never a usable key';
-- pg_dump carries the keyring, so a restored database knows which key it needs.
SELECT pg_catalog.pg_extension_config_dump('cellcrypt.keyring', '');

-- The blind-index key: random, independent of the data key, stored only wrapped under the
-- current data key (blind_index.rs).
CREATE TABLE cellcrypt.index_key (
    key_version   integer PRIMARY KEY CHECK (key_version OPERATOR(pg_catalog.>) 0),
    wrapped_key   bytea,
    wrapped_under integer NOT NULL,
    state         text NOT NULL CHECK (state OPERATOR(pg_catalog.=) ANY ('{current,retired}'::pg_catalog.text[])),
    created_at    timestamptz NOT NULL DEFAULT pg_catalog.now(),
    created_by    name NOT NULL DEFAULT session_user,
    restored      boolean NOT NULL DEFAULT false,
    restored_by   text
);
CREATE UNIQUE INDEX index_key_one_current ON cellcrypt.index_key ((true)) WHERE state OPERATOR(pg_catalog.=) 'current';
COMMENT ON TABLE cellcrypt.index_key IS 'Blind-index key versions, each only wrapped under the current data key';
SELECT pg_catalog.pg_extension_config_dump('cellcrypt.index_key', '');

-- Where this database's key file was last written: the cluster's system identifier, the
-- database's OID and the key directory. Not carried by pg_dump (a database restored elsewhere
-- must not find its key by itself); carried by pg_upgrade, which copies the tables but gives
-- the new cluster a new system identifier: the first use after the upgrade copies the key file
-- named here to the new cluster's name (providers.rs).
CREATE TABLE cellcrypt.key_location (
    one_row                    boolean PRIMARY KEY DEFAULT true CHECK (one_row),
    system_identifier          text NOT NULL,
    database_oid               oid NOT NULL,
    key_directory              text NOT NULL,
    -- this table's own OID (pg_upgrade keeps it; a copy made any other way has its own)
    table_oid                  oid NOT NULL,
    -- where it was before the system identifier last changed
    previous_system_identifier text,
    previous_key_directory     text,
    recorded_at                timestamptz NOT NULL DEFAULT pg_catalog.now()
);
REVOKE ALL ON cellcrypt.key_location FROM PUBLIC;
COMMENT ON TABLE cellcrypt.key_location IS 'Where the file provider last wrote this database''s key file (survives pg_upgrade, not pg_dump)';

-- Rows that arrive from a dump replace the key CREATE EXTENSION generated for this database;
-- the database then waits for its original key (set_data_encryption_key restores it). A
-- restore is the rows one session inserts (restored_by: its pid and start time), in one
-- transaction (COPY) or many (--inserts):
-- * A row identical to one in place (a dump of this very database) keeps the one in place,
--   marked as kept by this session (restored_by), so the rest of the same restore does not
--   replace it; it stays a row of the database's own (restored stays false).
-- * Any other row replaces the rows in place (every row not of this session), only while no
--   table holds a value that opens under them: otherwise the restore is refused
--   (cellcrypt._refuse_restore_over_live_data, key_admin.rs). The rows replaced are kept in
--   cellcrypt.replaced_key_row.
CREATE TABLE cellcrypt.replaced_key_row (
    table_name  text NOT NULL,
    key_row     jsonb NOT NULL,
    replaced_at timestamptz NOT NULL DEFAULT pg_catalog.now()
);
REVOKE ALL ON cellcrypt.replaced_key_row FROM PUBLIC;
COMMENT ON TABLE cellcrypt.replaced_key_row IS 'Key table rows that a restore from a dump replaced (kept, never used)';
CREATE FUNCTION cellcrypt._keyring_write_is_internal() RETURNS boolean
    AS 'MODULE_PATHNAME', 'cellcrypt_keyring_write_is_internal' LANGUAGE c VOLATILE;
CREATE FUNCTION cellcrypt._refuse_restore_over_live_data() RETURNS void
    AS 'MODULE_PATHNAME', 'cellcrypt_refuse_restore_over_live_data' LANGUAGE c VOLATILE;
CREATE FUNCTION cellcrypt._before_insert_from_dump() RETURNS trigger LANGUAGE plpgsql
    SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    me text;
BEGIN
    IF NOT cellcrypt._keyring_write_is_internal() THEN
        me := pg_catalog.pg_backend_pid()::pg_catalog.text OPERATOR(pg_catalog.||) '@' OPERATOR(pg_catalog.||)
              COALESCE((SELECT a.backend_start::pg_catalog.text FROM pg_catalog.pg_stat_get_activity(pg_catalog.pg_backend_pid()) a), '');
        IF TG_TABLE_NAME OPERATOR(pg_catalog.=) 'keyring' THEN
            UPDATE cellcrypt.keyring k SET restored_by = me
             WHERE k.key_version OPERATOR(pg_catalog.=) NEW.key_version
               AND k.fingerprint OPERATOR(pg_catalog.=) NEW.fingerprint
               AND k.kdf_salt OPERATOR(pg_catalog.=) NEW.kdf_salt
               AND k.kdf_memory_kib OPERATOR(pg_catalog.=) NEW.kdf_memory_kib
               AND k.kdf_iterations OPERATOR(pg_catalog.=) NEW.kdf_iterations
               AND k.kdf_parallelism OPERATOR(pg_catalog.=) NEW.kdf_parallelism
               AND k.state OPERATOR(pg_catalog.=) NEW.state
               AND (k.wrapped_data_key OPERATOR(pg_catalog.=) NEW.wrapped_data_key
                    OR (k.wrapped_data_key IS NULL AND NEW.wrapped_data_key IS NULL));
        ELSE
            UPDATE cellcrypt.index_key k SET restored_by = me
             WHERE k.key_version OPERATOR(pg_catalog.=) NEW.key_version
               AND k.wrapped_under OPERATOR(pg_catalog.=) NEW.wrapped_under
               AND k.state OPERATOR(pg_catalog.=) NEW.state
               AND (k.wrapped_key OPERATOR(pg_catalog.=) NEW.wrapped_key
                    OR (k.wrapped_key IS NULL AND NEW.wrapped_key IS NULL));
        END IF;
        IF FOUND THEN
            RETURN NULL;
        END IF;
        PERFORM cellcrypt._refuse_restore_over_live_data();
        EXECUTE pg_catalog.format(
            'WITH gone AS (DELETE FROM %I.%I k WHERE k.restored_by IS DISTINCT FROM %L RETURNING k.*) '
            'INSERT INTO cellcrypt.replaced_key_row (table_name, key_row) SELECT %L, pg_catalog.to_jsonb(gone) FROM gone',
            TG_TABLE_SCHEMA, TG_TABLE_NAME, me, TG_TABLE_NAME);
        NEW.restored := true;
        NEW.restored_by := me;
    END IF;
    RETURN NEW;
END
$$;
REVOKE ALL ON FUNCTION cellcrypt._before_insert_from_dump() FROM PUBLIC;
REVOKE ALL ON FUNCTION cellcrypt._keyring_write_is_internal() FROM PUBLIC;
REVOKE ALL ON FUNCTION cellcrypt._refuse_restore_over_live_data() FROM PUBLIC;
CREATE TRIGGER keyring_before_insert BEFORE INSERT ON cellcrypt.keyring
    FOR EACH ROW EXECUTE FUNCTION cellcrypt._before_insert_from_dump();
CREATE TRIGGER index_key_before_insert BEFORE INSERT ON cellcrypt.index_key
    FOR EACH ROW EXECUTE FUNCTION cellcrypt._before_insert_from_dump();
"#,
    name = "keyring"
);
